//! Evaluation: apply a config to a model with fake quantization, measure what it costs.
//!
//! [`apply`] rewrites the weights of the quantized layers in place (and switches on activation
//! quantization for native models), and puts the FP32 weights back when the guard it returns is
//! dropped. [`metrics`] runs the model over a dataset and compares it with its FP32 self.

pub mod kernels;
pub mod metrics;

pub use metrics::{evaluate, evaluate_config, model_size, Metrics, Reference, SizeReport};
