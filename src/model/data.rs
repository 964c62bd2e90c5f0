//! Datasets: the embedded UCI digits, and user data from `.safetensors` or `.npy`. STUB.

use crate::error::Result;
use tch::Tensor;

/// A dataset held in memory.
pub struct Dataset {
    /// Where it came from, e.g. `digits:test` or a path.
    pub name: String,
    /// Inputs `[N, ...]` (FP32, or int64 token ids).
    pub x: Tensor,
    /// Labels `[N]` (int64), if any.
    pub y: Option<Tensor>,
}

impl Dataset {
    /// Loads `spec`: `digits[:train|calib|test]`, `PATH.safetensors`, or `X.npy[,Y.npy]`.
    pub fn load(spec: &str) -> Result<Dataset> {
        Err(crate::error::Error::Unsupported(format!("data {spec}: not implemented yet")))
    }
}
