//! The pipeline as library functions: what `mixq search`, `allocate`, `pareto`, `latency` and
//! `eval` do, callable from the CLI, the tests and the experiments alike.
//!
//! Each stage below it ([`crate::model`] → [`crate::sensitivity`] → [`crate::cost`] →
//! [`crate::alloc`] → [`crate::config`] → [`crate::eval`]) does one thing; the functions here
//! chain them the way a user runs them, with typed inputs and outputs and nothing printed:
//!
//! - [`costs`]: a cost table from a sensitivity report and its model, or from a table file;
//! - [`allocate`]: costs + constraints → allocation (nominal or robust) → a config with its
//!   provenance;
//! - [`search`]: sensitivity → costs → allocation → config, then the mixed model measured beside
//!   every uniform candidate;
//! - [`pareto`]: the front of one budget (sampled or every exact breakpoint), optionally robust
//!   and measured, as a versioned CSV;
//! - [`latency`]: every layer's GEMM timed per format with the low-bit kernels → the latency
//!   table that latency budgets read;
//! - [`evaluate`]: a config applied to a model and measured against FP32 → a versioned
//!   [`evaluate::EvalReport`] with its reader.
//!
//! The CLI (`crate::cli`) parses flags into these inputs, calls one of these functions and
//! prints what it returns; progress goes through callbacks so that the library never writes to
//! the terminal.

pub mod allocate;
pub mod costs;
pub mod evaluate;
pub mod latency;
pub mod pareto;
pub mod search;

use crate::error::{Error, Result};
use crate::model::data::Dataset;
use crate::model::{self, QuantModel};

/// Loads data `data_spec` and model `model_spec` (whose layers a TorchScript module discovers on
/// that data), converts the data to the model's input dtype and checks that it fits the model.
/// A zoo model is loaded first, so that it can tokenize text data. Errors say which of the two
/// failed to load.
pub fn load_model_and_data(model_spec: &str, data_spec: &str) -> Result<(Box<dyn QuantModel>, Dataset)> {
    if model::zoo::NAMES.contains(&model_spec) {
        let model = model::load(model_spec, None).map_err(|e| e.context(format!("loading model `{model_spec}`")))?;
        let data = load_data_for(data_spec, model.as_ref())?;
        return Ok((model, data));
    }
    let data = Dataset::load(data_spec).map_err(|e| e.context(format!("loading data `{data_spec}`")))?;
    let model = model::load(model_spec, Some(&data)).map_err(|e| e.context(format!("loading model `{model_spec}`")))?;
    let data = data.into_kind(model.input_kind())?;
    data.check_for(model.as_ref())?;
    Ok((model, data))
}

/// Loads data `spec` for `model` (text tokenized by the model, converted to its input dtype,
/// checked against its input shape; [`Dataset::load_for`]); errors name the data.
pub fn load_data_for(spec: &str, model: &dyn QuantModel) -> Result<Dataset> {
    Dataset::load_for(spec, model).map_err(|e| e.context(format!("loading data `{spec}`")))
}

/// The data spec for `role` (`calib` or `test`): `given`, else the zoo model's default
/// ([`model::zoo::default_data`]), else `digits:ROLE`.
pub fn data_spec(model: &str, given: Option<&str>, role: &str) -> String {
    given
        .map(str::to_string)
        .or_else(|| model::zoo::default_data(model, role).map(str::to_string))
        .unwrap_or_else(|| format!("digits:{role}"))
}

/// Hex SHA-256 of a file's bytes (for provenance).
pub fn file_sha256(path: &std::path::Path) -> Result<String> {
    let bytes = std::fs::read(path).map_err(|e| Error::io(path, e))?;
    Ok(crate::util::sha256_hex(&bytes))
}
