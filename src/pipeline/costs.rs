//! The cost table an allocation solves: built from a sensitivity report and its model, or read
//! from a table file (costs from another tool), with the provenance the config records.

use crate::config::ModelRef;
use crate::cost::{ActivationErrors, BuildOptions, CostTable, LatencyTable, Proxy};
use crate::error::{Error, Result};
use crate::model::data::Dataset;
use crate::model::{self, QuantModel};
use crate::quant::{Format, QuantSpec};
use crate::sensitivity::report::SensitivityReport;
use serde_json::json;
use std::collections::BTreeMap;
use std::path::PathBuf;

/// Where a cost table comes from.
#[derive(Debug, Clone)]
pub enum CostSource {
    /// A sensitivity report (`mixq.sensitivity-report`), with the model and data to build the
    /// table for (default: the report's own).
    Report {
        /// The report file.
        path: PathBuf,
        /// Model spec (zoo name or TorchScript file); `None`: the report's model.
        model: Option<String>,
        /// Data spec for TorchScript layer discovery and activation errors; `None`: the report's.
        data: Option<String>,
    },
    /// A cost table file (CSV or JSON), solved as it is.
    Table {
        /// The table file.
        path: PathBuf,
        /// The model the table belongs to, recorded in the config (not loaded).
        model: Option<String>,
    },
}

/// How a table is built from a report.
#[derive(Debug, Clone)]
pub struct CostSettings {
    /// Candidate formats per layer.
    pub candidates: Vec<QuantSpec>,
    /// The predicted loss increase Ω.
    pub proxy: Proxy,
    /// Activation bits counted in BOPs when activation formats are not searched.
    pub activation_bits: u32,
    /// Activation formats searched per layer (options become `WEIGHT@ACT` pairs).
    pub activation_formats: Option<Vec<Format>>,
    /// A measured latency table (for latency budgets).
    pub latency: Option<PathBuf>,
    /// Robust costs from Tr + z·s.e. besides the nominal ones.
    pub robust_z: Option<f64>,
}

impl Default for CostSettings {
    fn default() -> Self {
        CostSettings {
            candidates: crate::cost::default_candidates(),
            proxy: Proxy::Hessian,
            activation_bits: 32,
            activation_formats: None,
            latency: None,
            robust_z: None,
        }
    }
}

/// A cost table and what it came from.
pub struct Costs {
    /// The table (nominal costs).
    pub table: CostTable,
    /// With robust costs: z and the table with upper-bound costs.
    pub robust: Option<(f64, CostTable)>,
    /// The model the table was built from, when one was loaded.
    pub loaded: Option<Box<dyn QuantModel>>,
    /// Provenance entries for the config.
    pub provenance: BTreeMap<String, serde_json::Value>,
    /// The model reference for the config.
    pub model: Option<ModelRef>,
}

/// Checks that activation formats can be searched on `model`: a native mixq model, whose forward
/// pass has input hooks (TorchScript modules do not).
pub fn check_activation_search(model: &dyn QuantModel) -> Result<()> {
    model.input_hooks().map(|_| ()).ok_or_else(|| no_hooks(model))
}

fn no_hooks(model: &dyn QuantModel) -> Error {
    Error::Unsupported(format!(
        "searching activation formats needs a native mixq model (e.g. digits-resnet); `{}` is a TorchScript module, whose \
         activations mixq cannot quantize",
        model.name()
    ))
}

/// The activation quantization errors E‖Q_a(a) − a‖² of `model`'s layer inputs under each of
/// `formats`, measured on `calib` (what activation-format options add to Ω); see
/// [`check_activation_search`].
pub fn activation_errors(model: &dyn QuantModel, calib: &Dataset, formats: &[Format]) -> Result<ActivationErrors> {
    let hooks = model.input_hooks().ok_or_else(|| no_hooks(model))?;
    ActivationErrors::measure(hooks, calib, formats, crate::sensitivity::DEFAULT_BATCH_SIZE)
}

/// Builds (from a report) or reads (from a file) the cost table of `source`.
pub fn costs(source: &CostSource, settings: &CostSettings) -> Result<Costs> {
    if let Some(z) = settings.robust_z {
        crate::cost::check_robust_z(z)?;
    }
    let mut provenance = BTreeMap::new();
    match source {
        CostSource::Table { path, model } => {
            if settings.robust_z.is_some() {
                return Err(Error::Unsupported(
                    "robust costs need the traces' standard errors: build the table from a sensitivity report".into(),
                ));
            }
            let table = CostTable::load(path)?;
            provenance.insert("cost_table".into(), json!({"path": path.display().to_string(), "sha256": super::file_sha256(path)?}));
            let model = model.as_ref().map(|m| ModelRef { name: m.clone(), weights_sha256: None });
            Ok(Costs { table, robust: None, loaded: None, provenance, model })
        }
        CostSource::Report { path, model: model_spec, data: data_spec } => {
            let report = SensitivityReport::load(path)?;
            let spec = model_spec.clone().unwrap_or_else(|| report.model.clone());
            let data_spec = data_spec.clone().unwrap_or_else(|| report.data.clone());
            let data = if model::zoo::NAMES.contains(&spec.as_str()) {
                None
            } else {
                Some(Dataset::load(&data_spec).map_err(|e| e.context(format!("loading data `{data_spec}`")))?)
            };
            let m = model::load(&spec, data.as_ref()).map_err(|e| e.context(format!("loading model `{spec}`")))?;
            let hash = m.weights_hash();
            if !report.model_sha256.is_empty() && report.model_sha256 != hash {
                tracing::warn!("the sensitivity report was made for weights {} but model `{spec}` has {hash}", report.model_sha256);
            }
            let latency = settings.latency.as_ref().map(|p| LatencyTable::load(p)).transpose()?;
            let activations = match &settings.activation_formats {
                None => None,
                Some(formats) => {
                    check_activation_search(m.as_ref())?;
                    let calib = super::load_data_for(&data_spec, m.as_ref())?;
                    provenance.insert("act_formats".into(), json!(formats.iter().map(|f| f.to_string()).collect::<Vec<_>>()));
                    Some(activation_errors(m.as_ref(), &calib, formats)?)
                }
            };
            let opts =
                BuildOptions { proxy: settings.proxy, activation_bits: settings.activation_bits, latency, robust_z: None, activations };
            let mut robust = None;
            let table = match settings.robust_z {
                Some(z) => {
                    let (t, r) = CostTable::build_nominal_and_robust(m.as_ref(), &report, &settings.candidates, &opts, z)?;
                    robust = Some((z, r));
                    provenance.insert("robust_z".into(), json!(z));
                    t
                }
                None => CostTable::build(m.as_ref(), &report, &settings.candidates, &opts)?,
            };
            provenance.insert("sensitivity".into(), json!({"path": path.display().to_string(), "sha256": super::file_sha256(path)?}));
            provenance.insert("proxy".into(), json!(settings.proxy.to_string()));
            provenance.insert("candidates".into(), json!(settings.candidates.iter().map(QuantSpec::label).collect::<Vec<_>>()));
            Ok(Costs { table, robust, loaded: Some(m), provenance, model: Some(ModelRef { name: spec, weights_sha256: Some(hash) }) })
        }
    }
}
