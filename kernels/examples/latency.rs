//! Prints the median latency of `y = x · Wᵀ` for one shape under each format, with
//! [`mixq_kernels::time_shape`] (the function `mixq latency` builds on),
//! and libtorch's FP32 GEMM on the same shape (the baseline `mixq latency` prints as `fp32`).
//! Usage: `cargo run --release -p mixq-kernels --example latency -- N K M [GROUP]` (GROUP defaults
//! to 64, or to K when 64 does not divide K; a format whose group does not divide K is skipped).
use mixq_kernels::timing::time_shape_fp32_libtorch;
use mixq_kernels::{time_shape, TimingOptions, WeightFormat};

fn main() -> anyhow::Result<()> {
    let a: Vec<usize> = std::env::args().skip(1).map(|s| s.parse()).collect::<Result<_, _>>()?;
    let (n, k, m) = match a[..] {
        [n, k, m, ..] => (n, k, m),
        _ => anyhow::bail!("usage: latency N K M [GROUP]"),
    };
    let group = a.get(3).copied().unwrap_or(if k % 64 == 0 { 64 } else { k });
    let opts = TimingOptions { warmup: 3, repeats: 21, seed: 0 };
    for (f, g) in [
        (WeightFormat::Int4 { asymmetric: false }, group),
        (WeightFormat::Int4 { asymmetric: true }, group),
        (WeightFormat::Int4 { asymmetric: false }, k),
        (WeightFormat::Int8 { asymmetric: false }, k),
        (WeightFormat::Fp8E4M3, k),
        (WeightFormat::Fp4E2M1, 32),
    ] {
        if k % g != 0 {
            continue;
        }
        let t = time_shape(n, k, f, g, m, opts)?;
        println!("{:<10} group {:>5}  {n}x{k} m={m}: median {:.4} ms (min {:.4})", f.name(), g, t.median_s * 1e3, t.min_s * 1e3);
    }
    let t = time_shape_fp32_libtorch(n, k, m, opts)?;
    println!("{:<10} libtorch  {n}x{k} m={m}: median {:.4} ms (min {:.4})", "fp32", t.median_s * 1e3, t.min_s * 1e3);
    Ok(())
}
