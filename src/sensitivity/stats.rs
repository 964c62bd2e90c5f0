//! Seeded probes and running statistics.
//!
//! Probes come from mixq's own SplitMix64 stream, never libtorch's global generator: probe k of
//! seed s is the same tensor on every machine, in every thread, whatever ran before — which is
//! what makes reports reproducible byte for byte and lets shards of one run use disjoint probes.

use tch::{Kind, Tensor};

pub use crate::util::SplitMix64;

impl SplitMix64 {
    /// The generator of probe `index` of `seed` (independent streams per index).
    pub fn for_probe(seed: u64, stream: u64, index: u64) -> SplitMix64 {
        let mut a = SplitMix64(seed ^ stream.rotate_left(32));
        let base = a.next_u64();
        let mut b = SplitMix64(base ^ index.wrapping_mul(0xD1B5_4A32_D192_ED03));
        SplitMix64(b.next_u64())
    }
}

/// Stream ids, so that the probes of different estimators never coincide.
pub mod stream {
    /// Hutchinson probes.
    pub const HUTCHINSON: u64 = 1;
    /// Hutch++ sketch vectors.
    pub const SKETCH: u64 = 2;
    /// Hutch++ residual probes.
    pub const RESIDUAL: u64 = 3;
    /// Power-iteration start vectors.
    pub const POWER: u64 = 4;
}

/// A full-model Rademacher probe (±1 entries, float32), one tensor per shape.
pub fn rademacher(shapes: &[Vec<i64>], seed: u64, stream: u64, index: u64) -> Vec<Tensor> {
    let mut rng = SplitMix64::for_probe(seed, stream, index);
    shapes
        .iter()
        .map(|s| {
            let n: i64 = s.iter().product();
            let mut v = Vec::with_capacity(n as usize);
            let mut bits = 0u64;
            for k in 0..n {
                if k % 64 == 0 {
                    bits = rng.next_u64();
                }
                v.push(if bits & 1 == 1 { 1f32 } else { -1f32 });
                bits >>= 1;
            }
            Tensor::from_slice(&v).reshape(s.as_slice()).to_kind(Kind::Float)
        })
        .collect()
}

/// Welford's running mean and variance.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct Welford {
    /// Samples seen.
    pub n: u64,
    /// Running mean.
    pub mean: f64,
    /// Sum of squared deviations from the mean.
    pub m2: f64,
}

impl Welford {
    /// Adds one sample.
    pub fn push(&mut self, x: f64) {
        self.n += 1;
        let d = x - self.mean;
        self.mean += d / self.n as f64;
        self.m2 += d * (x - self.mean);
    }

    /// Pools two sets of samples (Chan et al.): the statistics of their union.
    pub fn merge(&self, other: &Welford) -> Welford {
        let n = self.n + other.n;
        if n == 0 {
            return Welford::default();
        }
        let d = other.mean - self.mean;
        let mean = self.mean + d * other.n as f64 / n as f64;
        let m2 = self.m2 + other.m2 + d * d * (self.n as f64) * (other.n as f64) / n as f64;
        Welford { n, mean, m2 }
    }

    /// Unbiased sample variance (infinite with fewer than two samples).
    pub fn variance(&self) -> f64 {
        if self.n < 2 {
            f64::INFINITY
        } else {
            self.m2 / (self.n - 1) as f64
        }
    }

    /// Standard error of the mean.
    pub fn std_err(&self) -> f64 {
        (self.variance() / self.n.max(1) as f64).sqrt()
    }
}

/// The 97.5 % quantile of Student's t with `df` degrees of freedom (two-sided 95 % intervals),
/// by the Cornish–Fisher expansion around the normal quantile; within 0.3 % of the exact value
/// from 3 degrees of freedom on, exact tabulated values below.
pub fn t975(df: u64) -> f64 {
    match df {
        0 => f64::INFINITY,
        1 => 12.706,
        2 => 4.303,
        3 => 3.182,
        _ => {
            let z: f64 = 1.959_963_984_540_054;
            let v = df as f64;
            z + (z.powi(3) + z) / (4.0 * v)
                + (5.0 * z.powi(5) + 16.0 * z.powi(3) + 3.0 * z) / (96.0 * v * v)
                + (3.0 * z.powi(7) + 19.0 * z.powi(5) + 17.0 * z.powi(3) - 15.0 * z) / (384.0 * v * v * v)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn welford_matches_two_pass_and_merges() {
        let xs: Vec<f64> = (0..50).map(|i| ((i * 37) % 11) as f64 * 0.3 - 1.0).collect();
        let mut w = Welford::default();
        xs.iter().for_each(|&x| w.push(x));
        let mean = xs.iter().sum::<f64>() / 50.0;
        let var = xs.iter().map(|x| (x - mean).powi(2)).sum::<f64>() / 49.0;
        assert!((w.mean - mean).abs() < 1e-12 && (w.variance() - var).abs() < 1e-12);
        let (mut a, mut b) = (Welford::default(), Welford::default());
        xs[..17].iter().for_each(|&x| a.push(x));
        xs[17..].iter().for_each(|&x| b.push(x));
        let m = a.merge(&b);
        assert_eq!(m.n, 50);
        assert!((m.mean - mean).abs() < 1e-12 && (m.variance() - var).abs() < 1e-12);
    }

    #[test]
    fn t_quantiles_match_tables() {
        for (df, want) in [(4, 2.776), (9, 2.262), (19, 2.093), (29, 2.045), (99, 1.984)] {
            assert!((t975(df) - want).abs() / want < 3e-3, "df {df}: {} vs {want}", t975(df));
        }
    }

    #[test]
    fn probes_are_deterministic_and_balanced() {
        let shapes = vec![vec![10, 20], vec![7]];
        let a = rademacher(&shapes, 3, stream::HUTCHINSON, 5);
        let b = rademacher(&shapes, 3, stream::HUTCHINSON, 5);
        let c = rademacher(&shapes, 3, stream::HUTCHINSON, 6);
        assert!(a[0].equal(&b[0]) && a[1].equal(&b[1]));
        assert!(!a[0].equal(&c[0]));
        assert_eq!(a[0].abs().sum(Kind::Float).double_value(&[]), 200.0);
        assert!(a[0].sum(Kind::Float).double_value(&[]).abs() < 60.0);
    }
}
