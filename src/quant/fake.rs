//! Fake quantization (quantize then dequantize) with libtorch ops. STUB: being implemented.

use super::format::{Format, QuantSpec};
use crate::error::Result;
use tch::Tensor;

/// Integer (or FP code) representation of a quantized weight, for kernels and tests.
pub struct Quantized {
    /// Codes, `[out, inner]`: integers for int formats (as int32), the FP32 grid values for FP formats.
    pub codes: Tensor,
    /// Scales, one per group: `[out, inner / g]` (per-tensor: `[1, 1]`, per-channel: `[out, 1]`), FP32
    /// values exactly representable in the spec's scale type (times the tensor scale for E4M3).
    pub scales: Tensor,
    /// Zero points for asymmetric int formats, same shape as `scales`.
    pub zero_points: Option<Tensor>,
}

/// Quantizes then dequantizes `w` (out-channel first) under `spec`; returns an FP32 tensor of `w`'s shape.
pub fn fake_quantize(w: &Tensor, spec: &QuantSpec) -> Result<Tensor> {
    let _ = spec;
    Ok(w.shallow_clone())
}

/// Quantizes `w` under `spec` into codes and scales.
pub fn quantize(w: &Tensor, spec: &QuantSpec) -> Result<Quantized> {
    let _ = spec;
    Ok(Quantized { codes: w.shallow_clone(), scales: Tensor::ones([1, 1], (tch::Kind::Float, tch::Device::Cpu)), zero_points: None })
}

/// Dynamic per-sample fake quantization of an activation `[N, ...]` to `format`.
pub fn fake_quantize_activation(x: &Tensor, format: Format) -> Result<Tensor> {
    let _ = format;
    Ok(x.shallow_clone())
}
