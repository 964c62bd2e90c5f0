//! Sensitivity: how much quantizing each layer would hurt the loss.
//!
//! HAWQ-V2's sensitivity Ω_i = (Tr(H_i)/n_i)·‖Q(W_i) − W_i‖² needs per-layer Hessian traces of the
//! calibration loss. They come from curvature–vector products ([`hvp`]) fed to a trace estimator
//! that stops only when its confidence intervals say it may ([`hutchinson`]: Hutchinson and a
//! per-layer Hutch++). Around them sit the measures a researcher compares them with: top
//! eigenvalues ([`eigen`]), empirical Fisher, first-order and weight-error proxies, and the
//! measured loss increase of quantizing one layer ([`proxies`]). [`estimate`] runs the chosen
//! estimators and writes everything into one [`SensitivityReport`].
//!
//! Reports are deterministic: probes come from mixq's own seeded generator ([`stats`]), and the
//! report holds no wall-clock time (the CLI prints it), so the same model, data and settings give
//! the same bytes.

pub mod eigen;
pub mod hutchinson;
pub mod hvp;
pub mod proxies;
pub mod report;
pub mod stats;

pub use eigen::{top_eigenvalues, EigenSettings, LayerEigen};
pub use hutchinson::{hutchinson, hutchpp, LayerTrace, Progress, TraceEstimate, TraceSettings};
pub use hvp::{Curvature, HvpEngine, DEFAULT_BATCH_SIZE};
pub use report::{LayerSensitivity, SensitivityReport, REPORT_FORMAT, REPORT_VERSION};

use crate::error::{Error, Result};
use crate::model::data::Dataset;
use crate::model::QuantModel;
use crate::quant::{Format, Granularity, QuantSpec};
use serde::{Deserialize, Serialize};
use serde_json::json;
use std::str::FromStr;

/// The estimators [`estimate`] can run.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Estimator {
    /// Hutchinson traces with the CI stopping rule.
    Hutchinson,
    /// Hutch++-style traces (low-rank sketch + Hutchinson on the remainder).
    Hutchpp,
    /// Empirical Fisher trace.
    Fisher,
    /// First-order |g·ΔW| and weight error ‖ΔW‖² per format.
    Grad,
    /// Measured loss increase per layer and format.
    Measured,
    /// Top eigenvalue per layer.
    Eigen,
}

impl Estimator {
    /// All estimators, for help texts.
    pub const ALL: [Estimator; 6] =
        [Estimator::Hutchinson, Estimator::Hutchpp, Estimator::Fisher, Estimator::Grad, Estimator::Measured, Estimator::Eigen];
}

impl std::fmt::Display for Estimator {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Estimator::Hutchinson => "hutchinson",
            Estimator::Hutchpp => "hutchpp",
            Estimator::Fisher => "fisher",
            Estimator::Grad => "grad",
            Estimator::Measured => "measured",
            Estimator::Eigen => "eigen",
        })
    }
}

impl FromStr for Estimator {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        Estimator::ALL
            .into_iter()
            .find(|e| e.to_string() == s)
            .ok_or_else(|| Error::invalid("estimator", s, "valid: hutchinson, hutchpp, fisher, grad, measured, eigen"))
    }
}

/// Everything [`estimate`] needs besides the model and data.
#[derive(Debug, Clone, PartialEq)]
pub struct SensitivitySettings {
    /// Estimators to run (their results share one report).
    pub estimators: Vec<Estimator>,
    /// Curvature matrix of the trace and eigenvalue estimators.
    pub curvature: Curvature,
    /// Calibration batch size.
    pub batch_size: usize,
    /// Trace estimator settings (seed included).
    pub trace: TraceSettings,
    /// Power-iteration settings.
    pub eigen: EigenSettings,
    /// Formats for the `grad` and `measured` estimators.
    pub formats: Vec<Format>,
    /// Granularity of those formats.
    pub granularity: Granularity,
}

impl Default for SensitivitySettings {
    fn default() -> Self {
        SensitivitySettings {
            estimators: vec![Estimator::Hutchinson],
            curvature: Curvature::Hessian,
            batch_size: DEFAULT_BATCH_SIZE,
            trace: TraceSettings::default(),
            eigen: EigenSettings::default(),
            formats: vec![
                Format::Int { bits: 2, signed: true },
                Format::Int { bits: 4, signed: true },
                Format::Int { bits: 8, signed: true },
            ],
            granularity: Granularity::PerChannel,
        }
    }
}

/// Hex SHA-256 over a dataset's `x` and `y` (dtype, shape and bytes).
pub fn data_hash(data: &Dataset) -> Result<String> {
    let mut bytes = Vec::new();
    for t in std::iter::once(&data.x).chain(data.y.as_ref()) {
        let t = t.contiguous();
        bytes.extend_from_slice(format!("{:?}{:?}", t.kind(), t.size()).as_bytes());
        let n = t.numel();
        let mut buf = vec![0u8; n * t.kind().elt_size_in_bytes()];
        t.f_copy_data_u8(&mut buf, n)?;
        bytes.extend_from_slice(&buf);
    }
    Ok(crate::util::sha256_hex(&bytes))
}

fn fmt_key(spec: &QuantSpec) -> String {
    spec.format.to_string()
}

/// Runs the estimators of `settings` on `model` over `data` and collects their results;
/// `progress` sees each pass of the trace estimators.
pub fn estimate(
    model: &dyn QuantModel,
    data: &Dataset,
    settings: &SensitivitySettings,
    progress: &mut dyn FnMut(&Progress),
) -> Result<SensitivityReport> {
    if settings.estimators.is_empty() {
        return Err(Error::invalid("estimator", "", "give at least one estimator"));
    }
    let engine = HvpEngine::new(model, data, settings.batch_size, settings.curvature)?;
    let mut layers: Vec<LayerSensitivity> = engine
        .layers()
        .iter()
        .map(|l| LayerSensitivity {
            name: l.name.clone(),
            params: l.params,
            trace: None,
            trace_std_err: None,
            probes: 0,
            converged: false,
            top_eigenvalue: None,
            fisher_trace: None,
            measured_delta_loss: Default::default(),
            extra: Default::default(),
        })
        .collect();
    let specs: Vec<QuantSpec> = settings.formats.iter().map(|&f| QuantSpec::new(f, settings.granularity)).collect();
    let mut probes_used = json!(null);
    for est in &settings.estimators {
        match est {
            Estimator::Hutchinson | Estimator::Hutchpp => {
                let r = if *est == Estimator::Hutchinson {
                    hutchinson(&engine, &settings.trace, progress)?
                } else {
                    hutchpp(&engine, &settings.trace, progress)?
                };
                probes_used = json!(r.probes);
                for (l, t) in layers.iter_mut().zip(&r.layers) {
                    l.trace = Some(t.trace);
                    l.trace_std_err = Some(t.std_err);
                    l.probes = t.probes;
                    l.converged = t.converged;
                    l.extra.insert("trace_ci95".into(), json!(t.ci95));
                    l.extra.insert("trace_per_param".into(), json!(t.trace / l.params.max(1) as f64));
                }
            }
            Estimator::Fisher => {
                for (l, f) in layers.iter_mut().zip(engine.fisher_trace()?) {
                    l.fisher_trace = Some(f);
                }
            }
            Estimator::Grad => {
                for (l, row) in layers.iter_mut().zip(proxies::first_order(&engine, &specs)?) {
                    let lin: serde_json::Map<_, _> = specs.iter().zip(&row).map(|(s, v)| (fmt_key(s), json!(v.0))).collect();
                    let err: serde_json::Map<_, _> = specs.iter().zip(&row).map(|(s, v)| (fmt_key(s), json!(v.1))).collect();
                    l.extra.insert("first_order".into(), lin.into());
                    l.extra.insert("weight_error".into(), err.into());
                }
            }
            Estimator::Measured => {
                for (l, row) in layers.iter_mut().zip(proxies::measured_delta_loss(&engine, &specs)?) {
                    l.measured_delta_loss = specs.iter().zip(row).map(|(s, v)| (fmt_key(s), v)).collect();
                }
            }
            Estimator::Eigen => {
                for (l, e) in layers.iter_mut().zip(top_eigenvalues(&engine, &settings.eigen)?) {
                    l.top_eigenvalue = Some(e.value);
                    l.extra.insert("eigen_iters".into(), json!(e.iters));
                    l.extra.insert("eigen_converged".into(), json!(e.converged));
                }
            }
        }
    }
    let t = &settings.trace;
    let settings_json = json!({
        "estimators": settings.estimators.iter().map(|e| e.to_string()).collect::<Vec<_>>(),
        "curvature": settings.curvature.to_string(),
        "loss": if data.has_labels() { "cross-entropy" } else { "kl-to-fp32" },
        "seed": t.seed,
        "tol": t.tol,
        "tol_floor": t.tol_floor,
        "min_probes": t.min_probes,
        "max_probes": t.max_probes,
        "block": t.block,
        "sketch": t.sketch,
        "ci": "95% two-sided, Student t",
        "batch_size": settings.batch_size,
        "samples": data.len(),
        "eigen_tol": settings.eigen.tol,
        "eigen_max_iters": settings.eigen.max_iters,
        "formats": specs.iter().map(|s| s.to_string()).collect::<Vec<_>>(),
        "probes": probes_used,
        "hvps": engine.hvp_count(),
    });
    Ok(SensitivityReport {
        format: REPORT_FORMAT.to_string(),
        version: REPORT_VERSION,
        model: model.name().to_string(),
        model_sha256: model.weights_hash(),
        data: data.name.clone(),
        data_sha256: data_hash(data)?,
        settings: settings_json,
        layers,
    })
}
