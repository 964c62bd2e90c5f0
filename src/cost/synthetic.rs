//! Seeded synthetic cost tables, for solver benchmarks, cross-checks and the PuLP comparison:
//! layer sizes spread over two decades, HAWQ-like costs (sensitivity × 4^−bits with noise),
//! exact storage of per-channel int formats, BOPs and latencies that grow with the bits.

use super::{CostOption, CostTable, LayerCosts};
use crate::util::SplitMix64;

/// A random table of `layers` layers × `formats` candidates (1..=8: int2…int8 then fp32, the
/// highest-precision ones kept when fewer are asked for, fp32 always last).
pub fn synthetic(seed: u64, layers: usize, formats: usize) -> CostTable {
    let all: [(&str, u64); 8] = [("int2", 2), ("int3", 3), ("int4", 4), ("int5", 5), ("int6", 6), ("int7", 7), ("int8", 8), ("fp32", 32)];
    let k = formats.clamp(1, 8);
    let chosen = &all[8 - k..];
    let mut r = SplitMix64(seed);
    let layers = (0..layers)
        .map(|i| {
            let out = 16 << (r.next_u64() % 6);
            let inner = 16 << (r.next_u64() % 6);
            let params = (out * inner) as i64;
            let sens = 10f64.powf(-2.0 + 3.0 * r.next_f64());
            let macs = params as f64 * (1 + r.next_u64() % 64) as f64;
            let options = chosen
                .iter()
                .map(|&(f, b)| {
                    let cost = if b == 32 { 0.0 } else { sens * params as f64 * 4f64.powi(-(b as i32)) * (0.8 + 0.4 * r.next_f64()) };
                    let bits = params as u64 * b + if b == 32 { 0 } else { out as u64 * 16 };
                    CostOption {
                        format: f.into(),
                        cost,
                        bytes: bits.div_ceil(8),
                        bits,
                        bops: macs * b as f64 * 32.0,
                        latency_us: Some(params as f64 * 1e-4 * (0.5 + b as f64 / 8.0) * (0.9 + 0.2 * r.next_f64())),
                    }
                })
                .collect();
            LayerCosts { name: format!("layers.{i}.proj"), params, trace_per_param: None, options }
        })
        .collect();
    CostTable { layers }
}
