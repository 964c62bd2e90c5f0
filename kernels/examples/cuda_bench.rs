//! CUDA timings for `kernels/cuda-check.sh`: [`QLinear`] on `cuda:0` (libtorch's int8pack /
//! int4pack ops, dequantized FP32 for the FP formats) and the activation-quantizing ops
//! (`_int_mm` for int8, `_scaled_mm` for FP8) against a libtorch FP32 matmul, at the bench shapes
//! and M = 1, 8, 32, 128; median of 20 runs after 5 warm-ups, synchronised.
//! Prints a note and exits 0 when there is no CUDA device.
use mixq_kernels::torch::cuda_available;
use mixq_kernels::{random_weight, LibtorchOp, LibtorchWeight, QLinear, WeightFormat};
use std::time::Instant;
use tch::{Cuda, Device, Kind, Tensor};

fn median(f: &mut dyn FnMut()) -> f64 {
    for _ in 0..5 {
        f();
    }
    Cuda::synchronize(0);
    let mut t: Vec<f64> = (0..20)
        .map(|_| {
            let s = Instant::now();
            f();
            Cuda::synchronize(0);
            s.elapsed().as_secs_f64()
        })
        .collect();
    t.sort_by(f64::total_cmp);
    t[t.len() / 2]
}

fn main() -> anyhow::Result<()> {
    if !cuda_available() {
        println!("cuda_bench: no CUDA device; nothing to time");
        return Ok(());
    }
    let dev = Device::Cuda(0);
    println!("{:<10} {:>11} {:>4} {:>10} {:>10} {:>8}  op", "format", "N x K", "M", "qlinear", "fp32", "speed-up");
    for (n, k) in [(768usize, 768usize), (768, 3072), (4096, 4096), (4096, 11008)] {
        for (f, g) in
            [(WeightFormat::Int4 { asymmetric: false }, 128), (WeightFormat::Int8 { asymmetric: false }, k), (WeightFormat::Fp8E4M3, k)]
        {
            let w = random_weight(f, n, k, g, 1)?;
            let fp32 = LibtorchWeight::new(&w, LibtorchOp::Fp32, dev)?;
            // One row per M: `forward` against libtorch FP32 on the same activations.
            let rows = |label: &str, forward: &dyn Fn(&Tensor) -> mixq_kernels::Result<Tensor>| {
                for m in [1i64, 8, 32, 128] {
                    let x = Tensor::randn([m, k as i64], (Kind::Float, dev));
                    let tq = median(&mut || drop(forward(&x).expect("low-bit op")));
                    let tf = median(&mut || drop(fp32.forward(&x).expect("fp32")));
                    let shape = format!("{n}x{k}");
                    println!("{:<10} {shape:>11} {m:>4} {:>8.3}ms {:>8.3}ms {:>7.2}x  {label}", f.name(), tq * 1e3, tf * 1e3, tf / tq);
                }
            };
            let q = QLinear::new(w, dev)?;
            rows(&format!("QLinear {:?}", q.libtorch_op()), &|x| q.forward(x));
            // The activation-quantizing ops on the same weight: W8A8 (`_int_mm`), FP8 × FP8 (`_scaled_mm`).
            let op = match f {
                WeightFormat::Int8 { .. } => LibtorchOp::IntMm,
                WeightFormat::Fp8E4M3 => LibtorchOp::ScaledMm,
                _ => continue,
            };
            let lw = LibtorchWeight::new(q.weight(), op, dev)?;
            rows(op.name(), &|x| lw.forward(x));
        }
    }
    Ok(())
}
