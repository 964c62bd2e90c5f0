//! The cost model: for every layer and every candidate format, the predicted loss increase Ω and
//! the resources the choice uses (bytes, bits, BOPs, latency).
//!
//! The allocator never looks at a model or a sensitivity report: it solves over a [`CostTable`].
//! Keeping the table as its own, serializable stage has two uses. The solvers can be tested and
//! benchmarked on tables alone, and users can bring sensitivities from other tools or papers (a
//! CSV or JSON of `layer,format,cost,bytes,bops,latency_us`) and have mixq solve them exactly.
//!
//! [`CostTable::build`] makes a table from a model and a [`SensitivityReport`]; the default
//! objective is HAWQ-V2/V3's Ω_i(f) = (Tr(H_i)/n_i)·‖Q_f(W_i) − W_i‖², alternatives are chosen by
//! [`Proxy`]. With activation formats ([`BuildOptions::activations`]) each option is a (weight,
//! activation) pair labelled `WEIGHT@ACT`, whose Ω adds HAWQ-V2's activation term
//! (Tr(H_a)/n_a)·E‖Q_a(a) − a‖² and whose BOPs use the activation bits. [`io`] reads and writes
//! tables.

mod build;
pub mod io;
mod synthetic;

pub use build::{
    check_robust_z, default_candidates, pair_label, parse_activation_formats, parse_candidates, ActivationErrors, BuildOptions,
    LatencyTable, Proxy, ROBUST_Z_DEFAULT,
};
pub use synthetic::synthetic;

use crate::error::{Error, Result};
use crate::quant::{Format, QuantSpec};
use serde::{Deserialize, Serialize};

/// One candidate format for one layer, with its predicted cost and resources.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CostOption {
    /// The format label: `int4` (per-channel, default scale, min–max), or a full spec such as
    /// `int4/group:32` or `fp4-e2m1/group:16/e4m3/mse` (see [`QuantSpec::label`]); user tables may use
    /// any label, but only labels that parse as a spec can be written as a quant config. With
    /// activation formats: `WEIGHT@ACT`, e.g. `int4@int8` ([`parse_option`]).
    pub format: String,
    /// Predicted loss increase Ω (the objective the allocator minimizes).
    pub cost: f64,
    /// Storage bytes of the layer's weight (scales and zero points included).
    pub bytes: u64,
    /// Storage bits of the layer's weight (exact; `bytes` is this rounded up to bytes).
    pub bits: u64,
    /// Bit operations per sample: MACs × weight bits × activation bits.
    pub bops: f64,
    /// Measured latency in microseconds, if known.
    pub latency_us: Option<f64>,
}

impl CostOption {
    /// The quant spec of this option, if its label is one (see [`QuantSpec::from_str`]).
    pub fn spec(&self) -> Result<QuantSpec> {
        Ok(parse_option(&self.format)?.0)
    }
}

/// The candidate options of one layer.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LayerCosts {
    /// Fully qualified layer name.
    pub name: String,
    /// Number of weights n_i (0 when a user table does not say; then `avg-bits` budgets use the
    /// bits of the options).
    pub params: i64,
    /// Tr(H_i)/n_i used for the costs, if they came from a Hessian trace (for reports).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub trace_per_param: Option<f64>,
    /// The candidate formats, in the order of the candidates.
    pub options: Vec<CostOption>,
}

impl LayerCosts {
    /// The option labelled `format`.
    pub fn option(&self, format: &str) -> Option<&CostOption> {
        self.options.iter().find(|o| o.format == format)
    }
}

/// Layers × candidate formats → cost and resources. Layers keep the model's order.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CostTable {
    /// Per-layer options.
    pub layers: Vec<LayerCosts>,
}

impl CostTable {
    /// Total number of weights.
    pub fn total_params(&self) -> i64 {
        self.layers.iter().map(|l| l.params).sum()
    }

    /// The entry of layer `name`, or an error with the closest names.
    pub fn layer(&self, name: &str) -> Result<&LayerCosts> {
        self.layers.iter().find(|l| l.name == name).ok_or_else(|| Error::unknown_layer(name, self.layers.iter().map(|l| l.name.as_str())))
    }

    /// Checks the table: at least one layer, unique layer names, at least one option per layer,
    /// unique labels per layer, finite costs, finite non-negative BOPs and latencies.
    pub fn validate(&self) -> Result<()> {
        if self.layers.is_empty() {
            return Err(Error::invalid("cost table", "", "the table has no layers"));
        }
        let mut seen = std::collections::HashSet::new();
        for l in &self.layers {
            if !seen.insert(l.name.as_str()) {
                return Err(Error::invalid("cost table", &l.name, "layer appears twice"));
            }
            if l.options.is_empty() {
                return Err(Error::invalid("cost table", &l.name, "layer has no candidate formats"));
            }
            let mut fs = std::collections::HashSet::new();
            for o in &l.options {
                let field = format!("layer `{}` format `{}`", l.name, o.format);
                if !fs.insert(o.format.as_str()) {
                    return Err(Error::invalid(field, &o.format, "format appears twice for this layer"));
                }
                if !o.cost.is_finite() {
                    return Err(Error::invalid(format!("{field} cost"), o.cost.to_string(), "cost must be a finite number"));
                }
                if !o.bops.is_finite() || o.bops < 0.0 {
                    return Err(Error::invalid(format!("{field} bops"), o.bops.to_string(), "BOPs must be finite and ≥ 0"));
                }
                if let Some(t) = o.latency_us {
                    if !t.is_finite() || t < 0.0 {
                        return Err(Error::invalid(format!("{field} latency_us"), t.to_string(), "latency must be finite and ≥ 0"));
                    }
                }
            }
        }
        Ok(())
    }
}

/// Parses an option label: a weight spec ([`QuantSpec::from_str`]), optionally followed by `@ACT`, the
/// format of the layer's input activation ([`pair_label`]).
pub fn parse_option(label: &str) -> Result<(QuantSpec, Option<Format>)> {
    match label.split_once('@') {
        None => Ok((label.parse::<QuantSpec>()?, None)),
        Some((w, a)) => Ok((w.parse::<QuantSpec>()?, Some(a.parse()?))),
    }
}
