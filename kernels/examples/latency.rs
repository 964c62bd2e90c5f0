//! Prints the median latency of `y = x · Wᵀ` for one shape under each format, with
//! [`mixq_kernels::time_shape`] (the function `mixq latency` builds on).
//! Usage: `cargo run --release -p mixq-kernels --example latency -- N K M [GROUP]`.
use mixq_kernels::{time_shape, TimingOptions, WeightFormat};

fn main() -> anyhow::Result<()> {
    let a: Vec<usize> = std::env::args().skip(1).map(|s| s.parse()).collect::<Result<_, _>>()?;
    let (n, k, m) = match a[..] {
        [n, k, m, ..] => (n, k, m),
        _ => anyhow::bail!("usage: latency N K M [GROUP]"),
    };
    let group = a.get(3).copied().unwrap_or(64);
    for (f, g) in [
        (WeightFormat::Int4 { asymmetric: false }, group),
        (WeightFormat::Int4 { asymmetric: true }, group),
        (WeightFormat::Int4 { asymmetric: false }, k),
        (WeightFormat::Int8 { asymmetric: false }, k),
        (WeightFormat::Fp8E4M3, k),
        (WeightFormat::Fp4E2M1, 32),
    ] {
        let t = time_shape(n, k, f, g, m, TimingOptions { warmup: 3, repeats: 21, seed: 0 })?;
        println!("{:<10} group {:>5}  {n}x{k} m={m}: median {:.3} ms (min {:.3})", f.name(), g, t.median_s * 1e3, t.min_s * 1e3);
    }
    Ok(())
}
