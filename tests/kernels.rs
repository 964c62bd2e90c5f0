//! The packed layouts of `mixq-kernels` against mixq's fake quantization: pack the codes and
//! scales `mixq::quant::quantize` returns, dequantize with the kernels crate, and compare with
//! `fake_quantize` and `dequantize` bit for bit (up to the sign of zero, see below), over every
//! format the kernels store, per-channel and per-group, min–max and MSE clipping, and every
//! scale storage type. Then the CPU kernels on those weights against a libtorch FP32 matmul.

use mixq::quant::{dequantize, fake_quantize, quantize, Clipping, Format, Granularity, QuantSpec, ScaleType};
use mixq_kernels::{matmul, PackedWeight, WeightFormat};
use tch::{Kind, Tensor};

/// Relative tolerance (to the sum of |x|·|w|) of an FP32 kernel against libtorch's FP32 matmul on
/// the same dequantized weights: only the summation order differs.
const FP32_ORDER_RTOL: f32 = 1e-5;

fn vec_f32(t: &Tensor) -> Vec<f32> {
    Vec::<f32>::try_from(t.to_kind(Kind::Float).contiguous().view([-1])).unwrap()
}

fn vec_i32(t: &Tensor) -> Vec<i32> {
    Vec::<i32>::try_from(t.to_kind(Kind::Int).contiguous().view([-1])).unwrap()
}

/// The kernels' format for a mixq format, if the kernels store it.
fn kernel_format(f: Format) -> Option<WeightFormat> {
    match f {
        Format::Int { bits: 4, signed } => Some(WeightFormat::Int4 { asymmetric: !signed }),
        Format::Int { bits: 8, signed } => Some(WeightFormat::Int8 { asymmetric: !signed }),
        Format::Fp8E4M3 => Some(WeightFormat::Fp8E4M3),
        Format::Fp4E2M1 => Some(WeightFormat::Fp4E2M1),
        _ => None,
    }
}

fn pack(w: &Tensor, spec: &QuantSpec) -> PackedWeight {
    let (n, k) = (w.size()[0] as usize, w.size()[1] as usize);
    let q = quantize(w, spec).unwrap();
    let f = kernel_format(spec.format).unwrap();
    let scales = vec_f32(&q.scales);
    let p = if f.is_int() {
        let codes = vec_i32(&q.codes);
        let zeros = q.zero_points.as_ref().map(vec_i32);
        let p = PackedWeight::pack_int(f, &codes, &scales, zeros.as_deref(), n, k).unwrap();
        let (c2, z2) = p.unpack_int().unwrap();
        assert_eq!(c2, codes, "{spec}: int codes round trip");
        assert_eq!(z2, zeros, "{spec}: zero points round trip");
        p
    } else {
        let codes = vec_f32(&q.codes);
        let p = PackedWeight::pack_float(f, &codes, &scales, n, k).unwrap();
        let c2 = p.unpack_float().unwrap();
        assert!(c2.iter().zip(&codes).all(|(a, b)| a.to_bits() == b.to_bits()), "{spec}: FP codes round trip");
        p
    };
    // dequantize(quantize(w)) goes through int32 codes exactly like the kernels: equal bits.
    let deq = vec_f32(&dequantize(&q, spec, &w.size()).unwrap());
    let kd = p.dequantize();
    for (i, (a, b)) in kd.iter().zip(&deq).enumerate() {
        assert_eq!(a.to_bits(), b.to_bits(), "{spec}: index {i}: kernels {a:e}, mixq dequantize {b:e}");
    }
    p
}

fn specs() -> Vec<QuantSpec> {
    let mut v = Vec::new();
    let formats = [
        Format::Int { bits: 4, signed: true },
        Format::Int { bits: 4, signed: false },
        Format::Int { bits: 8, signed: true },
        Format::Int { bits: 8, signed: false },
        Format::Fp8E4M3,
        Format::Fp4E2M1,
    ];
    for f in formats {
        for g in [Granularity::PerChannel, Granularity::PerGroup(32), Granularity::PerGroup(16)] {
            for clipping in [Clipping::MinMax, Clipping::Mse] {
                let base = QuantSpec { clipping, ..QuantSpec::new(f, g) };
                v.push(base);
                for scale in [ScaleType::F32, ScaleType::F16, ScaleType::E8M0, ScaleType::E4M3] {
                    if scale != base.scale {
                        v.push(QuantSpec { scale, ..base });
                    }
                }
            }
        }
    }
    v
}

#[test]
fn packed_weights_equal_fake_quantization() {
    tch::manual_seed(5);
    // Heavy-tailed rows with an exactly-zero group and tiny values, K = 96 (3 blocks of 32).
    let w = Tensor::randn([7, 96], (Kind::Float, tch::Device::Cpu)) * Tensor::linspace(0.01, 3.0, 96, (Kind::Float, tch::Device::Cpu));
    let _ = w.narrow(0, 2, 1).narrow(1, 0, 32).fill_(0.0);
    for spec in specs() {
        let Ok(fake) = fake_quantize(&w, &spec) else { continue };
        let p = pack(&w, &spec);
        let fake = vec_f32(&fake);
        // fake_quantize keeps the sign of a zero that rounded from a negative value (-0.0 · s);
        // the int32 codes (and the kernels) have only +0. Values compare equal.
        for (i, (a, b)) in p.dequantize().iter().zip(&fake).enumerate() {
            assert!(a == b, "{spec}: index {i}: kernels {a:e}, fake_quantize {b:e}");
        }
    }
}

#[test]
fn kernels_on_mixq_weights_match_libtorch() {
    tch::manual_seed(6);
    let (n, k) = (33, 192);
    let w = Tensor::randn([n, k], (Kind::Float, tch::Device::Cpu));
    for spec in [
        QuantSpec::new(Format::Int { bits: 4, signed: true }, Granularity::PerGroup(64)),
        QuantSpec::new(Format::Int { bits: 4, signed: false }, Granularity::PerGroup(32)),
        QuantSpec::new(Format::Int { bits: 8, signed: true }, Granularity::PerChannel),
        QuantSpec::new(Format::Fp8E4M3, Granularity::PerChannel),
        QuantSpec::new(Format::Fp4E2M1, Granularity::PerGroup(32)),
    ] {
        let p = pack(&w, &spec);
        for m in [1usize, 5] {
            let x = Tensor::randn([m as i64, k], (Kind::Float, tch::Device::Cpu));
            let want = vec_f32(&x.matmul(&fake_quantize(&w, &spec).unwrap().tr()));
            let bound = vec_f32(&x.abs().matmul(&fake_quantize(&w, &spec).unwrap().abs().tr()));
            let mut y = vec![0f32; m * n as usize];
            matmul(&vec_f32(&x), m, &p, &mut y).unwrap();
            for i in 0..y.len() {
                let tol = FP32_ORDER_RTOL * bound[i] + 1e-6;
                assert!((y[i] - want[i]).abs() <= tol, "{spec} m={m}: index {i}: got {}, expected {}, tolerance {tol}", y[i], want[i]);
            }
        }
    }
}
