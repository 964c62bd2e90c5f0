//! mixq — mixed-precision quantization search.
//!
//! The pipeline runs in one direction: [`model`] (layers, forward, loss) → sensitivity →
//! cost → allocation → [`config`] (per-layer formats, JSON) → [`eval`] (apply the config with
//! fake quantization and measure). [`quant`] holds the number formats shared by every stage.
#![deny(missing_docs)]

pub mod alloc;
pub mod cli;
pub mod config;
pub mod cost;
pub mod error;
pub mod eval;
pub mod model;
pub mod pipeline;
pub mod plot;
pub mod quant;
pub mod sensitivity;
pub mod util;

pub use error::{Error, Result};
