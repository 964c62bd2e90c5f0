//! `SensitivityReport`: per-layer curvature statistics, the contract between the sensitivity
//! engine (which writes it) and the cost model / allocator (which read it).

use crate::error::{Error, Result};
use serde::{Deserialize, Serialize};
use std::path::Path;

/// The `"format"` field of a sensitivity report.
pub const REPORT_FORMAT: &str = "mixq.sensitivity-report";
/// The report version this build reads and writes.
pub const REPORT_VERSION: u64 = 1;

/// One layer's sensitivity statistics. Every estimator fills `name`, `params` and the fields it
/// measures; the others stay `None`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LayerSensitivity {
    /// Fully qualified layer name.
    pub name: String,
    /// Number of weights n_i.
    pub params: i64,
    /// Estimated Tr(H_i) of the loss Hessian block of this layer's weight.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub trace: Option<f64>,
    /// Standard error of `trace`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub trace_std_err: Option<f64>,
    /// Probes (or samples) used for this layer.
    #[serde(default)]
    pub probes: u64,
    /// Whether the stopping rule was met for this layer.
    #[serde(default)]
    pub converged: bool,
    /// Top Hessian eigenvalue of the layer block, if estimated.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub top_eigenvalue: Option<f64>,
    /// Empirical Fisher trace, if estimated.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub fisher_trace: Option<f64>,
    /// Measured loss increase when only this layer is quantized, per format name.
    #[serde(default, skip_serializing_if = "std::collections::BTreeMap::is_empty")]
    pub measured_delta_loss: std::collections::BTreeMap<String, f64>,
    /// Other estimator-specific values (e.g. first-order |g·ΔW| per format).
    #[serde(default, skip_serializing_if = "std::collections::BTreeMap::is_empty")]
    pub extra: std::collections::BTreeMap<String, serde_json::Value>,
}

impl LayerSensitivity {
    /// Tr(H_i)/n_i, the average curvature per weight (HAWQ-V2's normalised trace).
    pub fn trace_per_param(&self) -> Option<f64> {
        self.trace.map(|t| t / self.params.max(1) as f64)
    }

    /// The trace as the cost model should use it: negative estimates (a layer where the loss is
    /// not at a minimum, or noise around zero) clamped at 0, with a warning on the log. Quantization
    /// noise is not aimed along negative-curvature directions, so a negative second-order term
    /// would only credit a layer with a gain it will not see.
    pub fn clamped_trace(&self) -> Option<f64> {
        self.trace.map(|t| {
            if t < 0.0 {
                tracing::warn!(
                    "layer {}: negative Hessian trace {t:.3e} clamped at 0 (use --curvature ggn for a PSD curvature)",
                    self.name
                );
            }
            t.max(0.0)
        })
    }
}

/// A sensitivity report (JSON, `"format": "mixq.sensitivity-report"`, version 1).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SensitivityReport {
    /// Always `mixq.sensitivity-report`.
    pub format: String,
    /// Always 1.
    pub version: u64,
    /// Model name (zoo name or path).
    pub model: String,
    /// SHA-256 of the model weights.
    pub model_sha256: String,
    /// Data spec (e.g. `digits:calib`).
    pub data: String,
    /// SHA-256 of the data used.
    pub data_sha256: String,
    /// Estimator settings, seed included (free-form, written by the estimator).
    pub settings: serde_json::Value,
    /// Per-layer statistics, in the model's layer order.
    pub layers: Vec<LayerSensitivity>,
}

impl SensitivityReport {
    /// Parses a report; `origin` names the file in errors.
    pub fn from_json(text: &str, origin: &Path) -> Result<Self> {
        let value = crate::util::parse_versioned_json(text, origin, REPORT_FORMAT, REPORT_VERSION, "mixq sensitivity report")?;
        serde_json::from_value(value).map_err(|e| Error::parse(origin, e.to_string()))
    }

    /// Reads a report file.
    pub fn load(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
        Self::from_json(&text, path)
    }

    /// Pretty JSON with a trailing newline.
    pub fn to_json(&self) -> String {
        let mut s = serde_json::to_string_pretty(self).expect("a SensitivityReport always serializes");
        s.push('\n');
        s
    }

    /// Writes the report atomically.
    pub fn save(&self, path: &Path) -> Result<()> {
        crate::util::write_atomic(path, self.to_json().as_bytes())
    }

    /// The entry of layer `name`.
    pub fn layer(&self, name: &str) -> Result<&LayerSensitivity> {
        self.layers.iter().find(|l| l.name == name).ok_or_else(|| Error::unknown_layer(name, self.layers.iter().map(|l| l.name.as_str())))
    }
}
