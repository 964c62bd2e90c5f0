//! Every CPU kernel against libtorch's FP32 matmul on the dequantized weight, over odd shapes
//! (N = 1, K not a multiple of 32, M = 1 … 257), both instruction sets; packing errors; the
//! libtorch ops and the CUDA path (skipped without a GPU).

use mixq_kernels::torch::{cuda_available, dequantized_tensor};
use mixq_kernels::{
    isa_available, matmul_isa, matmul_w4a8_isa, matmul_w8a8_isa, quantize_activations, quantize_activations_blocks, random_weight,
    time_shape, Isa, KernelError, LibtorchOp, LibtorchWeight, PackedWeight, QLinear, TimingOptions, WeightFormat, ACT_BLOCK,
};
use tch::{Device, Kind, Tensor};

/// Relative tolerance, to `Σ |x|·|w|`, of an FP32-accumulating kernel against libtorch FP32 on
/// the same values: only the summation order differs (K ≤ 1000 here: ~K·2^-24 worst case).
const FP32_ORDER_RTOL: f32 = 1e-5;
/// Relative tolerance, to `Σ |x|·|w|`, of libtorch's int4pack / int8pack ops against FP32 on the
/// same dequantized weight (they round activations or scales to BF16 on some paths).
const LIBTORCH_LOWBIT_RTOL: f32 = 1e-2;
/// Relative tolerance, to `Σ |x̂|·|w|`, of the W4A8 kernels against libtorch FP32 on the
/// block-quantized activations `x̂` and the dequantized weight: the integer sums inside a block are
/// exact, so only FP32 rounding of the per-block products and of their sum is left, as for
/// [`FP32_ORDER_RTOL`] (the AVX2 kernel sums the raw nibbles 0..=15 and subtracts the zero-point
/// term `z · Σ q` afterwards; on these shapes the worst error is still below 3e-7 of the bound).
const W4A8_RTOL: f32 = 1e-5;

const FORMATS: [WeightFormat; 6] = [
    WeightFormat::Int4 { asymmetric: false },
    WeightFormat::Int4 { asymmetric: true },
    WeightFormat::Int8 { asymmetric: false },
    WeightFormat::Int8 { asymmetric: true },
    WeightFormat::Fp8E4M3,
    WeightFormat::Fp4E2M1,
];

fn isas() -> Vec<Isa> {
    [Isa::Scalar, Isa::Avx2].into_iter().filter(|i| isa_available(*i)).collect()
}

fn rand_x(m: usize, k: usize, seed: i64) -> Vec<f32> {
    tch::manual_seed(seed);
    Vec::<f32>::try_from(Tensor::randn([(m * k) as i64], (Kind::Float, Device::Cpu))).unwrap()
}

/// `x · Wᵀ` and `|x| · |W|ᵀ` by libtorch in FP32.
fn reference(x: &[f32], m: usize, wd: &Tensor) -> (Vec<f32>, Vec<f32>) {
    let xt = Tensor::from_slice(x).reshape([m as i64, -1]);
    let y = xt.matmul(&wd.tr());
    let b = xt.abs().matmul(&wd.abs().tr());
    (Vec::try_from(y.view([-1])).unwrap(), Vec::try_from(b.view([-1])).unwrap())
}

fn assert_close(what: &str, got: &[f32], want: &[f32], bound: &[f32], rtol: f32) {
    assert_eq!(got.len(), want.len(), "{what}: length");
    let mut worst = (0usize, 0f32);
    for i in 0..got.len() {
        let tol = rtol * bound[i] + 1e-6;
        let err = (got[i] - want[i]).abs();
        assert!(err <= tol, "{what}: index {i}: got {}, expected {}, tolerance {tol}", got[i], want[i]);
        if err / tol > worst.1 {
            worst = (i, err / tol);
        }
    }
}

#[test]
fn weight_only_kernels_match_libtorch_fp32() {
    // (n, k, group): N = 1, K with a tail after the last 32-block, per-group, per-channel, a group
    // that is not a multiple of 32 (scalar path under Auto).
    let shapes = [(1, 64, 32), (1, 37, 37), (13, 96, 32), (9, 100, 100), (17, 600, 200), (5, 48, 16), (40, 256, 64)];
    weight_only_matches_libtorch(&shapes, &[1, 2, 3, 7, 18], 0, 0);
}

/// `matmul` on every format, `(n, k, group)` shape, `m` and instruction set against libtorch FP32
/// on the dequantized weight (`FP32_ORDER_RTOL`); AVX2 must refuse a group that is neither a
/// multiple of 32 nor the whole row. Weight seed `10 · shape + format + wseed`, activation seed
/// `100 · shape + m + xseed`.
fn weight_only_matches_libtorch(shapes: &[(usize, usize, usize)], ms: &[usize], wseed: usize, xseed: usize) {
    for (si, &(n, k, group)) in shapes.iter().enumerate() {
        for (fi, &f) in FORMATS.iter().enumerate() {
            let w = random_weight(f, n, k, group, (si * 10 + fi + wseed) as u64).unwrap();
            let wd = dequantized_tensor(&w).unwrap();
            for &m in ms {
                let x = rand_x(m, k, (si * 100 + m + xseed) as i64);
                let (want, bound) = reference(&x, m, &wd);
                for isa in isas() {
                    let mut y = vec![f32::NAN; m * n];
                    let r = matmul_isa(&x, m, &w, &mut y, isa);
                    if isa == Isa::Avx2 && group % 32 != 0 && group != k {
                        assert!(matches!(r, Err(KernelError::Unsupported(_))), "{f} group {group}: AVX2 must refuse");
                        continue;
                    }
                    r.unwrap();
                    assert_close(&format!("{f} {isa:?} n={n} k={k} g={group} m={m}"), &y, &want, &bound, FP32_ORDER_RTOL);
                }
            }
        }
    }
}

#[test]
fn large_m_and_m_257() {
    let (n, k) = (19, 160);
    for &f in &FORMATS {
        let w = random_weight(f, n, k, 32, 3).unwrap();
        let wd = dequantized_tensor(&w).unwrap();
        for m in [64usize, 257] {
            let x = rand_x(m, k, m as i64);
            let (want, bound) = reference(&x, m, &wd);
            for isa in isas() {
                let mut y = vec![0f32; m * n];
                matmul_isa(&x, m, &w, &mut y, isa).unwrap();
                assert_close(&format!("{f} {isa:?} m={m}"), &y, &want, &bound, FP32_ORDER_RTOL);
            }
        }
    }
}

/// The AVX2 W8A8 kernels (the `maddubs` one for small M, the INT16 panel one from M = 4 on)
/// give the scalar kernel's result bit for bit: the same exact INT32 sums and the same FP32
/// expression. Shapes: N = 1 and N not a multiple of the 4-row tile, the 16-row panel or the
/// 64-row task (70: two tasks), K below 16,
/// with a tail of 8 / 12, K over one panel chunk (512), M = 1 … 257 across the panel threshold.
#[test]
fn w8a8_avx2_equals_scalar_bit_for_bit() {
    if !isa_available(Isa::Avx2) {
        return;
    }
    for &(n, k) in &[(1usize, 40usize), (5, 8), (21, 600), (37, 1100), (16, 512), (70, 520), (9, 4200)] {
        let w = random_weight(WeightFormat::Int8 { asymmetric: false }, n, k, k, 5).unwrap();
        for m in [1usize, 2, 3, 4, 5, 7, 17, 130, 257] {
            let x = rand_x(m, k, 3);
            let (mut a, mut b) = (vec![0f32; m * n], vec![0f32; m * n]);
            matmul_w8a8_isa(&x, m, &w, &mut a, Isa::Scalar).unwrap();
            matmul_w8a8_isa(&x, m, &w, &mut b, Isa::Avx2).unwrap();
            for (i, (p, q)) in a.iter().zip(&b).enumerate() {
                assert_eq!(p.to_bits(), q.to_bits(), "w8a8 n={n} k={k} m={m}: index {i}: avx2 {q}, scalar {p}");
            }
        }
    }
}

#[test]
fn w8a8_matches_libtorch_on_quantized_activations() {
    for &(n, k) in &[(1usize, 40usize), (21, 96), (8, 1000)] {
        let w = random_weight(WeightFormat::Int8 { asymmetric: false }, n, k, k, 9).unwrap();
        let wd = dequantized_tensor(&w).unwrap();
        for m in [1usize, 3, 17, 130] {
            let x = rand_x(m, k, 77);
            let q = quantize_activations(&x, m, k).unwrap();
            let xd: Vec<f32> = q.codes.iter().enumerate().map(|(i, &c)| f32::from(c) * q.scales[i / k]).collect();
            let (want, bound) = reference(&xd, m, &wd);
            for isa in isas() {
                let mut y = vec![0f32; m * n];
                matmul_w8a8_isa(&x, m, &w, &mut y, isa).unwrap();
                assert_close(&format!("w8a8 {isa:?} n={n} k={k} m={m}"), &y, &want, &bound, FP32_ORDER_RTOL);
            }
        }
    }
    // Only symmetric per-channel int8 weights.
    let w = random_weight(WeightFormat::Int8 { asymmetric: false }, 2, 64, 32, 1).unwrap();
    assert!(matches!(matmul_w8a8_isa(&[0.0; 64], 1, &w, &mut [0.0; 2], Isa::Auto), Err(KernelError::Unsupported(_))));
}

#[test]
fn activation_quantization_rounds_ties_to_even() {
    let q = quantize_activations(&[127.0, 0.5, 1.5, -2.5, 0.0, 0.0, 0.0, 0.0], 2, 4).unwrap();
    assert_eq!(q.codes, vec![127, 0, 2, -2, 0, 0, 0, 0]);
    assert_eq!(q.scales, vec![1.0, 1.0]);
    assert!(quantize_activations(&[f32::NAN], 1, 1).is_err());
}

#[test]
fn shape_errors_not_panics() {
    let w = random_weight(WeightFormat::Int4 { asymmetric: false }, 4, 64, 32, 0).unwrap();
    let mut y = vec![0f32; 4];
    assert!(matches!(matmul_isa(&[0.0; 63], 1, &w, &mut y, Isa::Auto), Err(KernelError::Shape { .. })));
    assert!(matches!(matmul_isa(&[0.0; 64], 1, &w, &mut [0.0; 3], Isa::Auto), Err(KernelError::Shape { .. })));
    assert!(matches!(matmul_isa(&[], 0, &w, &mut [], Isa::Auto), Err(KernelError::Shape { .. })));
    // K not a multiple of the group: rejected when packing.
    assert!(matches!(random_weight(WeightFormat::Int4 { asymmetric: false }, 2, 100, 32, 0), Err(KernelError::Group { .. })));
    let e = PackedWeight::pack_int(WeightFormat::Int4 { asymmetric: false }, &[0; 200], &[1.0; 6], None, 2, 100).unwrap_err();
    assert!(e.to_string().contains("divide"), "{e}");
}

#[test]
fn libtorch_cpu_lowbit_ops_agree() {
    let (n, k) = (16, 256);
    let x = rand_x(3, k, 1);
    let xt = Tensor::from_slice(&x).reshape([3, k as i64]);
    for (f, group, op) in [
        (WeightFormat::Int8 { asymmetric: false }, k, LibtorchOp::Int8Pack),
        (WeightFormat::Int4 { asymmetric: false }, 64, LibtorchOp::Int4Pack),
        (WeightFormat::Int4 { asymmetric: true }, 32, LibtorchOp::Int4Pack),
    ] {
        let w = random_weight(f, n, k, group, 4).unwrap();
        let (want, bound) = reference(&x, 3, &dequantized_tensor(&w).unwrap());
        let lw = LibtorchWeight::new(&w, op, Device::Cpu).unwrap();
        let y = Vec::<f32>::try_from(lw.forward(&xt).unwrap().view([-1])).unwrap();
        assert_close(&format!("libtorch {op:?} {f}"), &y, &want, &bound, LIBTORCH_LOWBIT_RTOL);
    }
}

/// Nearest E4M3 value to `v` (`|v| <= 448`), ties to the even code: an independent reference for
/// the FP8 activations of `_scaled_mm`.
fn e4m3_round(v: f32) -> f32 {
    let value = |code: u32| {
        let (e, m) = (code >> 3, code & 7);
        if e == 0 {
            m as f32 / 8.0 * 2f32.powi(-6)
        } else {
            (1.0 + m as f32 / 8.0) * 2f32.powi(e as i32 - 7)
        }
    };
    // Codes 0..=126 are the finite non-negative values (127 is NaN).
    let a = v.abs();
    let best = (0u32..127).min_by(|&c, &d| ((value(c) - a).abs(), c & 1).partial_cmp(&((value(d) - a).abs(), d & 1)).unwrap()).unwrap();
    value(best).copysign(v)
}

/// libtorch's activation-quantizing ops behind `LibtorchWeight`, on CPU: `_int_mm` gives
/// `matmul_w8a8`'s result bit for bit (the same per-row INT8 activations, INT32 sums and scaling);
/// `_scaled_mm` equals libtorch FP32 on the E4M3-rounded activations (one scale per tensor,
/// `amax / 448`) and the dequantized weight; other formats are refused.
#[test]
fn libtorch_int_mm_and_scaled_mm() {
    for &(n, k) in &[(24usize, 64usize), (5, 40), (16, 256)] {
        let w8 = random_weight(WeightFormat::Int8 { asymmetric: false }, n, k, k, 7).unwrap();
        let wf = random_weight(WeightFormat::Fp8E4M3, n, k, k, 8).unwrap();
        let int_mm = LibtorchWeight::new(&w8, LibtorchOp::IntMm, Device::Cpu).unwrap();
        let scaled_mm = LibtorchWeight::new(&wf, LibtorchOp::ScaledMm, Device::Cpu).unwrap();
        for m in [1usize, 3, 17, 20] {
            let x = rand_x(m, k, (n + m) as i64);
            let xt = Tensor::from_slice(&x).reshape([m as i64, k as i64]);
            let y = Vec::<f32>::try_from(int_mm.forward(&xt).unwrap().view([-1])).unwrap();
            let mut want = vec![f32::NAN; m * n];
            matmul_w8a8_isa(&x, m, &w8, &mut want, Isa::Auto).unwrap();
            assert!(y.iter().zip(&want).all(|(a, b)| a.to_bits() == b.to_bits()), "_int_mm n={n} k={k} m={m}: {y:?} vs {want:?}");

            let amax = x.iter().fold(0f32, |a, v| a.max(v.abs()));
            let s = amax / 448.0;
            let xh: Vec<f32> = x.iter().map(|v| e4m3_round(v / s) * s).collect();
            let (want, bound) = reference(&xh, m, &dequantized_tensor(&wf).unwrap());
            let y = Vec::<f32>::try_from(scaled_mm.forward(&xt).unwrap().view([-1])).unwrap();
            assert_close(&format!("_scaled_mm n={n} k={k} m={m}"), &y, &want, &bound, FP32_ORDER_RTOL);
        }
    }
    // CUDA (cuBLASLt): the same results up to FP32 summation order, rows padded below 17.
    if cuda_available() {
        let (n, k) = (32usize, 128usize);
        for (f, op) in [(WeightFormat::Int8 { asymmetric: false }, LibtorchOp::IntMm), (WeightFormat::Fp8E4M3, LibtorchOp::ScaledMm)] {
            let w = random_weight(f, n, k, k, 9).unwrap();
            let cpu = LibtorchWeight::new(&w, op, Device::Cpu).unwrap();
            let gpu = LibtorchWeight::new(&w, op, Device::Cuda(0)).unwrap();
            for m in [1usize, 17, 20] {
                let x = rand_x(m, k, m as i64);
                let xt = Tensor::from_slice(&x).reshape([m as i64, k as i64]);
                let want = Vec::<f32>::try_from(cpu.forward(&xt).unwrap().view([-1])).unwrap();
                let y =
                    Vec::<f32>::try_from(gpu.forward(&xt.to_device(Device::Cuda(0))).unwrap().to_device(Device::Cpu).view([-1])).unwrap();
                let bound: Vec<f32> = want.iter().map(|v| v.abs().max(1.0)).collect();
                assert_close(&format!("{op:?} on CUDA, m={m}"), &y, &want, &bound, FP32_ORDER_RTOL);
            }
        }
    } else {
        eprintln!("libtorch_int_mm_and_scaled_mm: no CUDA device, CUDA part skipped");
    }
    let w4 = random_weight(WeightFormat::Int4 { asymmetric: false }, 8, 64, 32, 1).unwrap();
    assert!(matches!(LibtorchWeight::new(&w4, LibtorchOp::IntMm, Device::Cpu), Err(KernelError::Unsupported(_))));
    assert!(matches!(LibtorchWeight::new(&w4, LibtorchOp::ScaledMm, Device::Cpu), Err(KernelError::Unsupported(_))));
    let fp8_grouped = random_weight(WeightFormat::Fp8E4M3, 8, 64, 32, 1).unwrap();
    assert!(matches!(LibtorchWeight::new(&fp8_grouped, LibtorchOp::ScaledMm, Device::Cpu), Err(KernelError::Unsupported(_))));
}

#[test]
fn qlinear_cpu_and_cuda() {
    let (n, k) = (24, 128);
    let x = rand_x(5, k, 2);
    let xt = Tensor::from_slice(&x).reshape([5, k as i64]);
    let mut devices = vec![Device::Cpu];
    if cuda_available() {
        devices.push(Device::Cuda(0));
    } else {
        eprintln!("qlinear_cpu_and_cuda: no CUDA device, CUDA part skipped");
        assert!(QLinear::new(random_weight(WeightFormat::Fp8E4M3, n, k, k, 0).unwrap(), Device::Cuda(0)).is_err());
    }
    for &f in &FORMATS {
        let group = if f.bits() == 8 { k } else { 64 };
        let w = random_weight(f, n, k, group, 5).unwrap();
        let (want, bound) = reference(&x, 5, &dequantized_tensor(&w).unwrap());
        for &d in &devices {
            let l = QLinear::new(w.clone(), d).unwrap();
            let y = Vec::<f32>::try_from(l.forward(&xt).unwrap().to_device(Device::Cpu).view([-1])).unwrap();
            let rtol = if d == Device::Cpu { FP32_ORDER_RTOL } else { LIBTORCH_LOWBIT_RTOL };
            assert_close(&format!("QLinear {f} on {d:?}"), &y, &want, &bound, rtol);
        }
    }
}

#[test]
fn time_shape_runs() {
    let t = time_shape(16, 64, WeightFormat::Int4 { asymmetric: false }, 32, 2, TimingOptions { warmup: 1, repeats: 3, seed: 1 }).unwrap();
    assert_eq!(t.repeats, 3);
    assert!(t.min_s <= t.median_s && t.median_s <= t.max_s);
}

#[test]
fn identity_activations_give_the_dequantized_weight_exactly() {
    // x = I (m = k): y[i, r] = W[r, i] with no rounding, so every decoder (AVX2 and scalar) must
    // produce exactly PackedWeight::dequantize's values.
    for &f in &FORMATS {
        for &(n, k, group) in &[(5usize, 64usize, 32usize), (3, 70, 70), (4, 128, 64)] {
            let w = random_weight(f, n, k, group, 11).unwrap();
            let want = w.dequantize();
            let mut x = vec![0f32; k * k];
            for i in 0..k {
                x[i * k + i] = 1.0;
            }
            for isa in isas() {
                for m in [1usize, k] {
                    let mut y = vec![0f32; m * n];
                    matmul_isa(&x[..m * k], m, &w, &mut y, isa).unwrap();
                    for i in 0..m {
                        for r in 0..n {
                            assert!(
                                y[i * n + r] == want[r * k + i],
                                "{f} {isa:?} m={m}: W[{r}, {i}] got {}, expected {}",
                                y[i * n + r],
                                want[r * k + i]
                            );
                        }
                    }
                }
            }
        }
    }
}

/// Every finite FP8 E4M3 code (subnormals, both zeros, the largest normals) decodes exactly, in
/// the GEMV kernel (`m = 1`, one unit vector at a time) and the GEMM kernel (`m = k`, identity).
#[test]
fn every_fp8_code_decodes_exactly() {
    let mut v: Vec<f32> = (0u8..=255)
        .filter(|b| b & 0x7F != 0x7F)
        .map(|b| {
            let (e, m) = (i32::from((b >> 3) & 15), f32::from(b & 7));
            let a = if e == 0 { m / 8.0 * 2f32.powi(-6) } else { (1.0 + m / 8.0) * 2f32.powi(e - 7) };
            if b & 0x80 != 0 {
                -a
            } else {
                a
            }
        })
        .collect();
    v.extend([0.0, 0.0]);
    let k = v.len();
    let w = PackedWeight::pack_float(WeightFormat::Fp8E4M3, &v, &[0.37], 1, k).unwrap();
    let want = w.dequantize();
    for isa in isas() {
        for i in 0..k {
            let mut x = vec![0f32; k];
            x[i] = 1.0;
            let mut y = [f32::NAN];
            matmul_isa(&x, 1, &w, &mut y, isa).unwrap();
            // By value: a sum of products gives +0 for the code -0.
            assert!(y[0] == want[i], "{isa:?} m=1 code index {i}: got {}, expected {}", y[0], want[i]);
        }
        let mut x = vec![0f32; k * k];
        for i in 0..k {
            x[i * k + i] = 1.0;
        }
        let mut y = vec![f32::NAN; k];
        matmul_isa(&x, k, &w, &mut y, isa).unwrap();
        for i in 0..k {
            assert!(y[i] == want[i], "{isa:?} m=k code index {i}: got {}, expected {}", y[i], want[i]);
        }
    }
}

/// Shapes above the serial threshold (rayon tasks, software prefetch running past the last row)
/// and just below it give the same results against libtorch, for every format.
#[test]
fn threaded_and_serial_sizes_match_libtorch() {
    for &(n, k, m) in &[(260usize, 2080usize, 1usize), (67, 2080, 3), (3, 2080, 1), (1, 32, 1)] {
        for &f in &FORMATS {
            let w = random_weight(f, n, k, 32, 21).unwrap();
            let wd = dequantized_tensor(&w).unwrap();
            let x = rand_x(m, k, 5);
            let (want, bound) = reference(&x, m, &wd);
            for isa in isas() {
                let mut y = vec![f32::NAN; m * n];
                matmul_isa(&x, m, &w, &mut y, isa).unwrap();
                assert_close(&format!("{f} {isa:?} n={n} k={k} m={m}"), &y, &want, &bound, FP32_ORDER_RTOL);
            }
        }
    }
}

const INT4: [WeightFormat; 2] = [WeightFormat::Int4 { asymmetric: false }, WeightFormat::Int4 { asymmetric: true }];

/// (n, k, group) for the int4 kernels (W4A8 and the FP32-activation GEMV): N = 1; per
/// channel with an odd number of 32-blocks and a K tail (37, 100, 96); groups of 32 and 160 (an
/// odd number of blocks per group: pairs straddle groups); groups of 64 and 128 (whole pairs per
/// group); a long row; a K tail of 18 (past half a block); rows longer than the prefetch
/// distance, an odd count (prefetches run past each row's end).
const INT4_PAIR_SHAPES: [(usize, usize, usize); 11] = [
    (1, 64, 32),
    (1, 37, 37),
    (13, 96, 32),
    (9, 100, 100),
    (5, 96, 96),
    (7, 320, 160),
    (40, 256, 64),
    (17, 640, 128),
    (3, 4096, 64),
    (6, 50, 50),
    (11, 14336, 64),
];

/// The FP32-activation int4 GEMV (`m = 1`) against libtorch, and exact on unit vectors, over the
/// W4A8 kernel's shapes (long rows, prefetch past row ends, odd blocks per group).
#[test]
fn int4_gemv_over_pair_shapes() {
    for (si, &(n, k, group)) in INT4_PAIR_SHAPES.iter().enumerate() {
        for (fi, &f) in INT4.iter().enumerate() {
            let w = random_weight(f, n, k, group, (si * 10 + fi) as u64).unwrap();
            let wd = dequantized_tensor(&w).unwrap();
            let x = rand_x(1, k, si as i64);
            let (want, bound) = reference(&x, 1, &wd);
            let exact = w.dequantize();
            for isa in isas() {
                let mut y = vec![f32::NAN; n];
                matmul_isa(&x, 1, &w, &mut y, isa).unwrap();
                assert_close(&format!("{f} {isa:?} n={n} k={k} g={group} m=1"), &y, &want, &bound, FP32_ORDER_RTOL);
                for t in [0, k / 2, k - 1] {
                    let mut e = vec![0f32; k];
                    e[t] = 1.0;
                    matmul_isa(&e, 1, &w, &mut y, isa).unwrap();
                    for r in 0..n {
                        assert!(
                            y[r] == exact[r * k + t],
                            "{f} {isa:?} n={n} k={k} g={group}: W[{r}, {t}] got {}, expected {}",
                            y[r],
                            exact[r * k + t]
                        );
                    }
                }
            }
        }
    }
}

#[test]
fn w4a8_matches_libtorch_on_quantized_activations() {
    let shapes = INT4_PAIR_SHAPES;
    for (si, &(n, k, group)) in shapes.iter().enumerate() {
        for (fi, &f) in INT4.iter().enumerate() {
            let w = random_weight(f, n, k, group, (si * 10 + fi) as u64).unwrap();
            let wd = dequantized_tensor(&w).unwrap();
            for m in [1usize, 2, 3, 7, 18] {
                let x = rand_x(m, k, (si * 100 + m) as i64);
                let q = quantize_activations_blocks(&x, m, k).unwrap();
                let (want, bound) = reference(&q.dequantize(), m, &wd);
                for isa in isas() {
                    let mut y = vec![f32::NAN; m * n];
                    matmul_w4a8_isa(&x, m, &w, &mut y, isa).unwrap();
                    assert_close(&format!("w4a8 {f} {isa:?} n={n} k={k} g={group} m={m}"), &y, &want, &bound, W4A8_RTOL);
                }
            }
        }
    }
}

#[test]
fn w4a8_large_m_and_m_257() {
    let (n, k) = (19, 192);
    for &f in &INT4 {
        for group in [32, 64, 96, k] {
            let w = random_weight(f, n, k, group, 3).unwrap();
            let wd = dequantized_tensor(&w).unwrap();
            for m in [64usize, 257] {
                let x = rand_x(m, k, m as i64);
                let q = quantize_activations_blocks(&x, m, k).unwrap();
                let (want, bound) = reference(&q.dequantize(), m, &wd);
                for isa in isas() {
                    let mut y = vec![0f32; m * n];
                    matmul_w4a8_isa(&x, m, &w, &mut y, isa).unwrap();
                    assert_close(&format!("w4a8 {f} g={group} {isa:?} m={m}"), &y, &want, &bound, W4A8_RTOL);
                }
            }
        }
    }
}

#[test]
fn w4a8_activation_rounding_error_is_within_its_bound() {
    // |x − x̂| ≤ scale_x(block) / 2 per element, so against FP32 activations the W4A8 result may
    // differ by at most Σ_t scale_x(t) / 2 · |w_t| (plus FP32 rounding).
    let (n, k, m) = (11, 200, 4);
    for &f in &INT4 {
        let w = random_weight(f, n, k, k, 5).unwrap();
        let wd = w.dequantize();
        let x = rand_x(m, k, 6);
        let q = quantize_activations_blocks(&x, m, k).unwrap();
        let (want, bound) = reference(&x, m, &dequantized_tensor(&w).unwrap());
        let kb = k.div_ceil(ACT_BLOCK);
        let mut y = vec![0f32; m * n];
        matmul_w4a8_isa(&x, m, &w, &mut y, Isa::Auto).unwrap();
        for i in 0..m {
            for r in 0..n {
                let e: f32 = (0..k).map(|t| q.scales[i * kb + t / ACT_BLOCK] / 2.0 * wd[r * k + t].abs()).sum();
                let tol = e * (1.0 + 1e-3) + W4A8_RTOL * bound[i * n + r];
                let err = (y[i * n + r] - want[i * n + r]).abs();
                assert!(err <= tol, "w4a8 {f}: y[{i}, {r}] got {}, FP32 {}, bound {tol}", y[i * n + r], want[i * n + r]);
            }
        }
    }
}

#[test]
fn w4a8_block_quantization_and_refusals() {
    // Ties to even, per block: the second block has its own scale.
    let mut x = vec![0f32; 40];
    x[0] = 127.0;
    x[1] = 0.5;
    x[2] = 1.5;
    x[3] = -2.5;
    x[32] = 2.0;
    x[33] = 1.0;
    let q = quantize_activations_blocks(&x, 1, 40).unwrap();
    assert_eq!(&q.codes[..4], &[127, 0, 2, -2]);
    assert_eq!(&q.codes[32..34], &[127, 64]);
    assert_eq!(q.scales, vec![1.0, 2.0 / 127.0]);
    assert!(quantize_activations_blocks(&[f32::INFINITY], 1, 1).is_err());
    assert!(quantize_activations_blocks(&[0.0; 3], 2, 2).is_err());
    // Only int4, and only groups the 32-blocks do not straddle.
    let w8 = random_weight(WeightFormat::Int8 { asymmetric: false }, 2, 64, 64, 1).unwrap();
    assert!(matches!(matmul_w4a8_isa(&[0.0; 64], 1, &w8, &mut [0.0; 2], Isa::Auto), Err(KernelError::Unsupported(_))));
    let w16 = random_weight(WeightFormat::Int4 { asymmetric: false }, 2, 64, 16, 1).unwrap();
    assert!(matches!(matmul_w4a8_isa(&[0.0; 64], 1, &w16, &mut [0.0; 2], Isa::Scalar), Err(KernelError::Unsupported(_))));
    let w = random_weight(WeightFormat::Int4 { asymmetric: false }, 2, 64, 32, 1).unwrap();
    assert!(matches!(matmul_w4a8_isa(&[0.0; 63], 1, &w, &mut [0.0; 2], Isa::Auto), Err(KernelError::Shape { .. })));
}

/// The AVX2 broadcast kernel for `m > 1` (`avx2::panels`) around its tile and chunk sizes and the
/// dispatch threshold: N around the panel width (16) and the task width (up to 64 columns, threaded
/// from 2^21 multiply-adds), K around the panel chunk (256) with and without a tail after the last
/// 32-block, M around the register tiles (6 rows, and 12 and 4 for panels of at most 8 columns) and
/// the threshold (16) below which `avx2::rows` runs, per group and per channel.
#[test]
fn panel_kernel_tails_match_libtorch() {
    let shapes = [
        (1usize, 37usize, 37usize),
        (7, 256, 64),
        (8, 288, 32),
        (9, 257, 257),
        (15, 512, 128),
        (16, 300, 300),
        (17, 96, 32),
        (33, 544, 32),
        (65, 600, 600),
        (130, 704, 64),
    ];
    // Every group here is a multiple of 32 or the whole row: no AVX2 refusal.
    assert!(shapes.iter().all(|&(_, k, g)| g % 32 == 0 || g == k));
    weight_only_matches_libtorch(&shapes, &[15, 16, 17, 18, 19, 20, 21, 24, 25], 500, 7);
}

/// Identity activations through the broadcast kernel over several panel chunks (k = 320: chunks
/// of 256 and 64, groups of 64; k = 300: 256, then 44 with a 12-element tail, per channel),
/// serial (n = 19) and in column tasks (n = 70 at m = k = 300, over 2^21 multiply-adds): the dequantized weight
/// exactly, every output written (NaN-filled `y`).
#[test]
fn panel_kernel_identity_over_chunks_is_exact() {
    for &f in &FORMATS {
        for &(n, k, group) in &[(19usize, 320usize, 64usize), (70, 300, 300)] {
            let mut x = vec![0f32; k * k];
            for i in 0..k {
                x[i * k + i] = 1.0;
            }
            let w = random_weight(f, n, k, group, 13).unwrap();
            let want = w.dequantize();
            for isa in isas() {
                for m in [15usize, 16, 19, k] {
                    let mut y = vec![f32::NAN; m * n];
                    matmul_isa(&x[..m * k], m, &w, &mut y, isa).unwrap();
                    for i in 0..m {
                        for r in 0..n {
                            assert!(y[i * n + r] == want[r * k + i], "{f} {isa:?} n={n} m={m}: W[{r}, {i}] got {}", y[i * n + r]);
                        }
                    }
                }
            }
        }
    }
}
