//! Timing one kernel shape, for latency tables (`mixq latency`) and quick checks: warm-up runs
//! first (page faults, thread pool start, caches), then the median of repeated runs, which a
//! stray context switch moves far less than the mean.

use crate::error::{shape, Result};
use crate::gemm::matmul;
use crate::pack::{e2m1_to_f32, e4m3_to_f32, PackedWeight, WeightFormat};
use std::time::Instant;

/// How [`time_shape`] measures.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TimingOptions {
    /// Untimed runs first.
    pub warmup: usize,
    /// Timed runs (at least one).
    pub repeats: usize,
    /// Seed of the random weights and activations.
    pub seed: u64,
}

impl Default for TimingOptions {
    fn default() -> Self {
        TimingOptions { warmup: 3, repeats: 15, seed: 0 }
    }
}

/// Result of [`time_shape`], in seconds.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Timing {
    /// Median of the timed runs.
    pub median_s: f64,
    /// Fastest run.
    pub min_s: f64,
    /// Slowest run.
    pub max_s: f64,
    /// Number of timed runs.
    pub repeats: usize,
}

/// Times `y[m, n] = x[m, k] · Wᵀ` for a random weight of `format` with groups of `group`
/// (`group = k` for per-channel) on the CPU kernels.
pub fn time_shape(n: usize, k: usize, format: WeightFormat, group: usize, m: usize, opts: TimingOptions) -> Result<Timing> {
    let w = random_weight(format, n, k, group, opts.seed)?;
    if m == 0 {
        return Err(shape("m (activation rows)", "m > 0", m));
    }
    let mut rng = SplitMix(opts.seed ^ 0x5eed);
    let x: Vec<f32> = (0..m * k).map(|_| rng.unit() * 2.0 - 1.0).collect();
    let mut y = vec![0f32; m * n];
    measure(opts, || matmul(&x, m, &w, &mut y))
}

/// Times `y[m, n] = x[m, k] · Wᵀ` in FP32 with libtorch's `linear` (what an FP32 layer runs) on
/// the CPU, with random weights and activations from `opts.seed`: the full-precision row of a
/// latency table, measured the same way as [`time_shape`].
pub fn time_shape_fp32_libtorch(n: usize, k: usize, m: usize, opts: TimingOptions) -> Result<Timing> {
    if n == 0 || k == 0 || m == 0 {
        return Err(shape("FP32 GEMM shape (n, k, m)", "all > 0", format!("({n}, {k}, {m})")));
    }
    let mut rng = SplitMix(opts.seed);
    let w: Vec<f32> = (0..n * k).map(|_| rng.unit() - 0.5).collect();
    let x: Vec<f32> = (0..m * k).map(|_| rng.unit() * 2.0 - 1.0).collect();
    let w = tch::Tensor::f_from_slice(&w)?.f_reshape([n as i64, k as i64])?;
    let x = tch::Tensor::f_from_slice(&x)?.f_reshape([m as i64, k as i64])?;
    tch::no_grad(|| measure(opts, || x.f_linear::<tch::Tensor>(&w, None).map(drop).map_err(Into::into)))
}

/// Runs `f` `opts.warmup` times untimed, then `opts.repeats` (at least one) times timed.
fn measure(opts: TimingOptions, mut f: impl FnMut() -> Result<()>) -> Result<Timing> {
    for _ in 0..opts.warmup {
        f()?;
    }
    let mut t = Vec::with_capacity(opts.repeats.max(1));
    for _ in 0..opts.repeats.max(1) {
        let s = Instant::now();
        f()?;
        t.push(s.elapsed().as_secs_f64());
    }
    t.sort_by(f64::total_cmp);
    Ok(Timing { median_s: t[t.len() / 2], min_s: t[0], max_s: t[t.len() - 1], repeats: t.len() })
}

/// The bytes of `v` summed as wrapping `u64`s, on one thread: a read-only pass over memory, the
/// roofline of the benchmarks and A/B tools (and the evicting read before a cold call).
pub fn read_bytes(v: &[u8]) -> u64 {
    v.chunks_exact(8).map(|c| u64::from_le_bytes(c.try_into().unwrap_or([0; 8]))).fold(0, u64::wrapping_add)
}

/// [`read_bytes`] on all of rayon's threads, each a contiguous range of 1 MiB pieces (as the
/// kernels' tasks).
pub fn read_bytes_all_threads(v: &[u8]) -> u64 {
    use rayon::prelude::*;
    v.par_chunks(1 << 20).map(read_bytes).reduce(|| 0, u64::wrapping_add)
}

/// A random packed weight `[n, k]` (uniform codes over the whole grid, scales in `[0.5, 1.5) / 64`),
/// deterministic in `seed`. Errors when `group` does not divide `k`.
pub fn random_weight(format: WeightFormat, n: usize, k: usize, group: usize, seed: u64) -> Result<PackedWeight> {
    if group == 0 || !k.is_multiple_of(group) {
        return Err(crate::error::KernelError::Group { scales_per_row: k.checked_div(group).unwrap_or(0), k });
    }
    let mut rng = SplitMix(seed);
    let gs = n * (k / group);
    let scales: Vec<f32> = (0..gs).map(|_| (0.5 + rng.unit()) / 64.0).collect();
    match format {
        WeightFormat::Int4 { asymmetric } | WeightFormat::Int8 { asymmetric } => {
            let bits = format.bits() as u32;
            let (lo, span) = if asymmetric { (0i64, 1i64 << bits) } else { (-(1i64 << (bits - 1)), 1i64 << bits) };
            let codes: Vec<i32> = (0..n * k).map(|_| (lo + (rng.next() % span as u64) as i64) as i32).collect();
            let zeros: Option<Vec<i32>> = asymmetric.then(|| (0..gs).map(|_| (rng.next() % span as u64) as i32).collect());
            PackedWeight::pack_int(format, &codes, &scales, zeros.as_deref(), n, k)
        }
        WeightFormat::Fp8E4M3 => {
            let v: Vec<f32> = (0..n * k)
                .map(|_| loop {
                    let b = rng.next() as u8;
                    if b & 0x7F != 0x7F {
                        break e4m3_to_f32(b);
                    }
                })
                .collect();
            PackedWeight::pack_float(format, &v, &scales, n, k)
        }
        WeightFormat::Fp4E2M1 => {
            let v: Vec<f32> = (0..n * k).map(|_| e2m1_to_f32(rng.next() as u8 & 15)).collect();
            PackedWeight::pack_float(format, &v, &scales, n, k)
        }
    }
}

/// SplitMix64, enough for test data (no dependency on `rand`).
pub(crate) struct SplitMix(pub u64);

impl SplitMix {
    pub(crate) fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }
    /// Uniform in `[0, 1)`.
    pub(crate) fn unit(&mut self) -> f32 {
        (self.next() >> 40) as f32 / (1u64 << 24) as f32
    }
}
