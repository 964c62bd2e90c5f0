//! Low-bit matrix kernels for mixq.
//!
//! mixq decides which number format each layer's weights get; this crate makes those formats run
//! for real, so that a configuration's latency can be measured rather than guessed, and its
//! accuracy computed through the same arithmetic a deployment would use.
//!
//! - [`pack`]: packed layouts for INT4 (two per byte, group scales, optional zero points), INT8,
//!   FP8 E4M3 and FP4 E2M1, with exact round trips. The input is codes + scales as a quantizer
//!   produces them (`mixq::quant::quantize`); dequantized values equal mixq's fake quantization
//!   bit for bit.
//! - [`gemm`]: `y = x · Wᵀ` with FP32 activations (weight-only GEMV and small-M GEMM) and W8A8
//!   (dynamic per-row INT8 activations, INT32 accumulation), W4A8-dynamic (int4 weights against
//!   activations quantized to INT8 per block of 32, ggml's q4 × q8_0 scheme: a separate mode,
//!   since it rounds the activations), AVX2 + FMA when the CPU has it
//!   (run-time detection), a portable scalar kernel otherwise, rayon across blocks of output rows.
//!   All `unsafe` code lives in the private `avx2` module, behind these safe, shape-checked
//!   functions.
//! - [`torch`]: libtorch references and ops for comparison, and [`torch::QLinear`], one layer
//!   whose device is chosen at run time (native kernels on CPU, libtorch's ops on CUDA).
//! - [`timing`]: the median latency of one shape, for latency tables.
//!
//! The crate does not depend on `mixq`; `mixq` depends on it.
#![deny(missing_docs)]

#[cfg(target_arch = "x86_64")]
mod avx2;
pub mod error;
pub mod gemm;
pub mod pack;
pub mod timing;
pub mod torch;

pub use error::{KernelError, Result};
pub use gemm::{
    isa_available, matmul, matmul_isa, matmul_w4a8, matmul_w4a8_isa, matmul_w8a8, matmul_w8a8_isa, quantize_activations,
    quantize_activations_blocks, selected_isa, BlockQuantizedActivations, Isa, QuantizedActivations, ACT_BLOCK,
};
pub use pack::{PackedWeight, WeightFormat};
pub use timing::{random_weight, read_bytes, read_bytes_all_threads, time_shape, Timing, TimingOptions};
pub use torch::{LibtorchOp, LibtorchWeight, QLinear};
