//! Seeded synthetic cost tables, for solver benchmarks, cross-checks and the PuLP comparison:
//! layer sizes spread over two decades, HAWQ-like costs (sensitivity × 4^−bits with noise),
//! exact storage of per-channel int formats, BOPs and latencies that grow with the bits.

use super::{CostOption, CostTable, LayerCosts};

/// SplitMix64: a tiny, stable generator (the same table for the same seed on every platform).
struct SplitMix(u64);

impl SplitMix {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }
    fn unif(&mut self) -> f64 {
        (self.next() >> 11) as f64 / (1u64 << 53) as f64
    }
}

/// A random table of `layers` layers × `formats` candidates (1..=8: int2…int8 then fp32, the
/// highest-precision ones kept when fewer are asked for, fp32 always last).
pub fn synthetic(seed: u64, layers: usize, formats: usize) -> CostTable {
    let all: [(&str, u64); 8] = [("int2", 2), ("int3", 3), ("int4", 4), ("int5", 5), ("int6", 6), ("int7", 7), ("int8", 8), ("fp32", 32)];
    let k = formats.clamp(1, 8);
    let chosen = &all[8 - k..];
    let mut r = SplitMix(seed);
    let layers = (0..layers)
        .map(|i| {
            let out = 16 << (r.next() % 6);
            let inner = 16 << (r.next() % 6);
            let params = (out * inner) as i64;
            let sens = 10f64.powf(-2.0 + 3.0 * r.unif());
            let macs = params as f64 * (1 + r.next() % 64) as f64;
            let options = chosen
                .iter()
                .map(|&(f, b)| {
                    let cost = if b == 32 { 0.0 } else { sens * params as f64 * 4f64.powi(-(b as i32)) * (0.8 + 0.4 * r.unif()) };
                    let bits = params as u64 * b + if b == 32 { 0 } else { out as u64 * 16 };
                    CostOption {
                        format: f.into(),
                        cost,
                        bytes: bits.div_ceil(8),
                        bits,
                        bops: macs * b as f64 * 32.0,
                        latency_us: Some(params as f64 * 1e-4 * (0.5 + b as f64 / 8.0) * (0.9 + 0.2 * r.unif())),
                    }
                })
                .collect();
            LayerCosts { name: format!("layers.{i}.proj"), params, trace_per_param: None, options }
        })
        .collect();
    CostTable { layers }
}
