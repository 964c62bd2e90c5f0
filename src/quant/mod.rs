//! Number formats and fake quantization.
//!
//! [`format`] defines the formats, granularities and storage costs; the numerics live in
//! [`fake`] (quantize–dequantize of weights and activations with libtorch ops, the values the
//! low-bit kernels must reproduce exactly).

pub mod fake;
pub mod format;

pub use fake::{fake_quantize, fake_quantize_activation, quantize, Quantized};
pub use format::{out_inner, Clipping, Format, Granularity, QuantSpec, ScaleType};
