//! A config applied to a model and measured against the FP32 model → an [`EvalReport`]
//! (`mixq.eval-report`, version 1), with its reader.

use crate::config::{LayerSetting, QuantConfig};
use crate::error::{Error, Result};
use crate::eval::kernels::{evaluate_config_kernels, KernelEval};
use crate::eval::{self, Metrics, Reference, SizeReport};
use crate::model::data::Dataset;
use crate::model::{QuantModel, ResolvedLayer};
use crate::quant::QuantSpec;
use serde::{Deserialize, Serialize};
use std::path::Path;

/// `"format"` of an evaluation report.
pub const EVAL_REPORT_FORMAT: &str = "mixq.eval-report";
/// The evaluation-report version this build reads and writes.
pub const EVAL_REPORT_VERSION: u64 = 1;

/// What `mixq eval` writes: the FP32 and quantized metrics of a config on a dataset, its size,
/// and, when it was also run through the kernels, that run. Fields are in the order the file
/// has them (alphabetical, as every JSON file mixq writes).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EvalReport {
    /// The config file (as given).
    pub config: String,
    /// The data (spec name).
    pub data: String,
    /// Always [`EVAL_REPORT_FORMAT`].
    pub format: String,
    /// The FP32 model's metrics (its agreement with itself is 1, KL 0).
    pub fp32: Metrics,
    /// The config run through the low-bit kernels, when asked for.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub kernels: Option<KernelEval>,
    /// The model (zoo name or file).
    pub model: String,
    /// The quantized model's metrics (fake quantization).
    pub quantized: Metrics,
    /// Storage of the quantized model.
    pub size: SizeReport,
    /// Always [`EVAL_REPORT_VERSION`].
    pub version: u64,
}

impl EvalReport {
    /// The report as pretty JSON with a final newline (the bytes [`EvalReport::save`] writes).
    pub fn to_json(&self) -> String {
        // Through a `Value`, whose maps are sorted, so nested structs are sorted too.
        let v = serde_json::to_value(self).expect("an eval report is plain data");
        serde_json::to_string_pretty(&v).expect("a JSON value serializes")
    }

    /// Parses a report; `origin` names the file in errors.
    pub fn from_json(text: &str, origin: &Path) -> Result<Self> {
        let v = crate::util::parse_versioned_json(text, origin, EVAL_REPORT_FORMAT, EVAL_REPORT_VERSION, "mixq evaluation report")?;
        serde_json::from_value(v).map_err(|e| Error::parse(origin, format!("not a valid evaluation report: {e}")))
    }

    /// Reads a report file.
    pub fn load(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
        Self::from_json(&text, path)
    }

    /// Writes the report atomically.
    pub fn save(&self, path: &Path) -> Result<()> {
        crate::util::write_atomic(path, format!("{}\n", self.to_json()).as_bytes())
    }
}

/// An evaluated config: the report, the resolved per-layer plan, and the FP32 model's size.
pub struct Evaluation {
    /// The report.
    pub report: EvalReport,
    /// Each layer's resolved quantization.
    pub plan: Vec<ResolvedLayer>,
    /// Storage of the FP32 model.
    pub fp32_size: SizeReport,
}

/// Applies `config` (named `config_name` in the report) to `model`, measures it on `data`
/// against the FP32 model, and with `kernels` also runs it through the low-bit kernels.
pub fn evaluate(model: &dyn QuantModel, data: &Dataset, config: &QuantConfig, config_name: &str, kernels: bool) -> Result<Evaluation> {
    let plan = config.resolve(model).map_err(|e| e.context(format!("config {config_name}")))?;
    let reference = Reference::compute(model, data)?;
    let fp32 = eval::evaluate(model, data, &reference)?;
    let fp32_size = eval::model_size(model, &QuantConfig::uniform(Default::default()).resolve(model)?);
    let (quantized, size) = eval::evaluate_config(model, data, &reference, config)?;
    let kernels = if kernels {
        Some(evaluate_config_kernels(model, data, &reference, config).map_err(|e| e.context("evaluating through the kernels"))?.0)
    } else {
        None
    };
    let report = EvalReport {
        config: config_name.to_string(),
        data: data.name.clone(),
        format: EVAL_REPORT_FORMAT.to_string(),
        fp32,
        kernels,
        model: model.name().to_string(),
        quantized,
        size,
        version: EVAL_REPORT_VERSION,
    };
    Ok(Evaluation { report, plan, fp32_size })
}

/// Every layer's weights in each of `specs` in turn, measured on `data` against `reference`:
/// one result per spec, an error where the spec does not apply to every layer (a group size
/// that does not divide a layer's input dimension); `progress` sees each spec first.
pub fn uniform_baselines(
    model: &dyn QuantModel,
    data: &Dataset,
    reference: &Reference,
    specs: &[QuantSpec],
    progress: &mut dyn FnMut(&QuantSpec),
) -> Vec<Result<(Metrics, SizeReport)>> {
    specs
        .iter()
        .map(|spec| {
            progress(spec);
            eval::evaluate_config(model, data, reference, &QuantConfig::uniform(LayerSetting::weight(*spec)))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn report() -> EvalReport {
        let m = Metrics { samples: 10, accuracy: Some(0.9), loss: 0.25, kl: 0.01, agreement: 0.95, embedding: None };
        EvalReport {
            config: "c.json".into(),
            data: "digits:test".into(),
            format: EVAL_REPORT_FORMAT.into(),
            fp32: Metrics { kl: 0.0, agreement: 1.0, ..m },
            kernels: None,
            model: "digits-resnet".into(),
            quantized: m,
            size: SizeReport { total_bytes: 100, weight_bytes: 80, avg_bits: 4.0 },
            version: EVAL_REPORT_VERSION,
        }
    }

    #[test]
    fn report_round_trips_and_rejects_other_versions() {
        let r = report();
        let text = r.to_json();
        assert_eq!(EvalReport::from_json(&text, Path::new("r.json")).unwrap(), r);
        let v2 = text.replace("\"version\": 1", "\"version\": 2");
        let err = EvalReport::from_json(&v2, Path::new("r.json")).unwrap_err().to_string();
        assert!(err.contains("r.json") && err.contains("version 2"), "{err}");
        let extra = text.replacen('{', "{\n  \"surprise\": 1,", 1);
        let err = EvalReport::from_json(&extra, Path::new("r.json")).unwrap_err().to_string();
        assert!(err.contains("surprise"), "{err}");
    }

    #[test]
    fn keys_are_sorted_at_every_level() {
        let text = report().to_json();
        let keys: Vec<&str> = text.lines().filter(|l| l.starts_with("  \"")).map(|l| l.trim().split('"').nth(1).unwrap()).collect();
        let mut sorted = keys.clone();
        sorted.sort();
        assert_eq!(keys, sorted);
        let fp32 = text.split("\"fp32\": {").nth(1).unwrap().split('}').next().unwrap();
        assert!(fp32.find("accuracy").unwrap() < fp32.find("samples").unwrap(), "{fp32}");
    }
}
