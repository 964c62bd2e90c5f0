//! Number formats and fake quantization.
//!
//! [`format`] defines the formats, granularities and storage costs; the numerics live in
//! [`fake`] (quantize–dequantize of weights and activations with libtorch ops, the values the
//! low-bit kernels must reproduce exactly), built on `grid` (rounding onto each format's element
//! grid) and `scale` (scale ranges and the rounding of scales to their storage type).

pub mod fake;
pub mod format;
mod grid;
mod scale;

pub use fake::{dequantize, fake_quantize, fake_quantize_activation, quantize, Quantized};
pub use format::{out_inner, Clipping, Format, Granularity, QuantSpec, ScaleType};
pub use grid::FP4_E2M1_VALUES;
