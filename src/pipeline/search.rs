//! The whole search: sensitivity → cost table → allocation → config ([`plan`]), then the mixed
//! model measured beside every uniform candidate ([`compare_with_uniform`]).

use super::allocate::{robust_provenance, solve_nominal_or_robust};
use crate::alloc::{Allocation, Constraints, RobustComparison, SolverKind};
use crate::config::{ModelRef, QuantConfig};
use crate::cost::{BuildOptions, CostTable, Proxy};
use crate::error::{Error, Result};
use crate::eval::{self, Metrics, Reference, SizeReport};
use crate::model::data::Dataset;
use crate::model::QuantModel;
use crate::quant::{Format, QuantSpec};
use crate::sensitivity::{self, Curvature, Estimated, Estimator, Progress, RunOptions, SensitivitySettings, TraceSettings};
use serde_json::json;

/// What a search needs besides the model and data.
#[derive(Debug, Clone)]
pub struct SearchSettings {
    /// Trace estimator: Hutch++ or Hutchinson.
    pub estimator: Estimator,
    /// Curvature of the traces.
    pub curvature: Curvature,
    /// Trace estimator settings (tolerance, probes, sketch, seed).
    pub trace: TraceSettings,
    /// Candidate formats per layer.
    pub candidates: Vec<QuantSpec>,
    /// Budgets, tie groups, pins, allowed formats.
    pub constraints: Constraints,
    /// Solver.
    pub solver: SolverKind,
    /// Robust allocation on Tr + z·s.e.
    pub robust_z: Option<f64>,
    /// Activation formats searched per layer (native models).
    pub activation_formats: Option<Vec<Format>>,
    /// Report cache and checkpoints.
    pub run: RunOptions,
}

impl SearchSettings {
    /// Checks what can be checked before any work: a trace estimator, a valid robust z and
    /// trace settings.
    pub fn validate(&self) -> Result<()> {
        if !matches!(self.estimator, Estimator::Hutchinson | Estimator::Hutchpp) {
            return Err(Error::invalid(
                "estimator",
                self.estimator.to_string(),
                "a search needs Hessian traces: use hutchpp or hutchinson (other proxies: a sensitivity report and an allocation with that proxy)",
            ));
        }
        if let Some(z) = self.robust_z {
            crate::cost::check_robust_z(z)?;
        }
        Ok(())
    }

    /// The sensitivity run of the search: the trace estimator, plus activation traces when
    /// activation formats are searched.
    pub fn sensitivity(&self) -> SensitivitySettings {
        let mut estimators = vec![self.estimator];
        if self.activation_formats.is_some() {
            estimators.push(Estimator::Activation);
        }
        SensitivitySettings { estimators, curvature: self.curvature, trace: self.trace.clone(), ..SensitivitySettings::default() }
    }
}

/// The result of [`plan`]: the sensitivity report, the allocation and its config.
pub struct Planned {
    /// The sensitivity report and where it came from (computed, cached, resumed).
    pub sensitivity: Estimated,
    /// The allocation written to the config (the robust one in robust mode).
    pub alloc: Allocation,
    /// Robust vs nominal, in robust mode.
    pub robust: Option<RobustComparison>,
    /// The config, with provenance.
    pub config: QuantConfig,
}

impl Planned {
    /// Curvature-vector products the report took.
    pub fn hvps(&self) -> u64 {
        self.sensitivity.report.settings["hvps"].as_u64().unwrap_or(0)
    }

    /// Layers whose trace reached the tolerance.
    pub fn converged(&self) -> usize {
        self.sensitivity.report.layers.iter().filter(|l| l.converged).count()
    }
}

/// Sensitivity on `calib` (cached per `settings.run`; `progress` sees each pass), the cost table,
/// and the allocation under the constraints → the config, whose provenance records `command`,
/// the sensitivity run, the candidates and the robust comparison.
pub fn plan(
    model: &dyn QuantModel,
    calib: &Dataset,
    settings: &SearchSettings,
    command: &str,
    progress: &mut dyn FnMut(&Progress),
) -> Result<Planned> {
    settings.validate()?;
    if settings.activation_formats.is_some() {
        super::costs::check_activation_search(model)?;
    }
    let sens = settings.sensitivity();
    let est = sensitivity::estimate_with(model, calib, &sens, &settings.run, progress)
        .map_err(|e| e.context(format!("sensitivity of {} on {}", model.name(), calib.name)))?;
    let report = &est.report;

    let activations = match &settings.activation_formats {
        None => None,
        Some(formats) => Some(super::costs::activation_errors(model, calib, formats)?),
    };
    let opts = BuildOptions { proxy: Proxy::Hessian, activation_bits: 32, latency: None, robust_z: None, activations };
    let (table, robust_table) = match settings.robust_z {
        Some(z) => {
            let (nominal, robust) = CostTable::build_nominal_and_robust(model, report, &settings.candidates, &opts, z)?;
            (nominal, Some((z, robust)))
        }
        None => (CostTable::build(model, report, &settings.candidates, &opts)?, None),
    };
    let (alloc, robust) = solve_nominal_or_robust(&table, robust_table.as_ref(), &settings.constraints, settings.solver)?;

    let model_ref = ModelRef { name: model.name().to_string(), weights_sha256: Some(report.model_sha256.clone()) };
    let config = alloc.to_config(Some(model_ref))?;
    let mut planned = Planned { sensitivity: est, alloc, robust, config };
    let (t, hvps, converged) = (&settings.trace, planned.hvps(), planned.converged());
    let prov = &mut planned.config.provenance;
    prov.insert("command".into(), json!(command));
    prov.insert(
        "sensitivity".into(),
        json!({"estimator": settings.estimator.to_string(), "data": calib.name, "data_sha256": planned.sensitivity.report.data_sha256,
               "seed": t.seed, "tol": t.tol, "max_probes": t.max_probes, "hvps": hvps, "layers_converged": converged}),
    );
    prov.insert("candidates".into(), json!(settings.candidates.iter().map(QuantSpec::label).collect::<Vec<_>>()));
    if let Some(f) = &settings.activation_formats {
        prov.insert("act_formats".into(), json!(f.iter().map(|f| f.to_string()).collect::<Vec<_>>()));
    }
    if let Some(cmp) = &planned.robust {
        prov.insert("robust".into(), robust_provenance(cmp));
    }
    Ok(planned)
}

/// One measured configuration.
#[derive(Debug, Clone, PartialEq)]
pub struct Measured {
    /// What it is (`mixed (this search)`, `uniform int4`, …).
    pub label: String,
    /// Its metrics against FP32.
    pub metrics: Metrics,
    /// Its storage.
    pub size: SizeReport,
}

/// The measured configurations of [`compare_with_uniform`].
#[derive(Debug)]
pub struct Comparison {
    /// The mixed config(s) and the uniform candidates, sorted by size.
    pub rows: Vec<Measured>,
    /// Uniform candidates that do not apply to every layer, with why.
    pub skipped: Vec<(QuantSpec, Error)>,
}

/// The planned config measured on `data` beside (in robust mode, when layers changed) the
/// nominal allocation and every uniform candidate that applies to every layer, sorted by size.
/// Candidates that do not apply (a group size that does not divide a layer) are returned apart.
pub fn compare_with_uniform(model: &dyn QuantModel, data: &Dataset, planned: &Planned, candidates: &[QuantSpec]) -> Result<Comparison> {
    let reference = Reference::compute(model, data)?;
    let mut rows = Vec::new();
    let (metrics, size) = eval::evaluate_config(model, data, &reference, &planned.config)?;
    let label = if planned.robust.is_some() { "mixed (this search, robust)" } else { "mixed (this search)" };
    rows.push(Measured { label: label.into(), metrics, size });
    if let Some(cmp) = planned.robust.as_ref().filter(|c| !c.changed.is_empty()) {
        let (metrics, size) = eval::evaluate_config(model, data, &reference, &cmp.nominal.to_config(None)?)?;
        rows.push(Measured { label: "mixed (nominal)".into(), metrics, size });
    }
    let mut skipped = Vec::new();
    for (spec, r) in candidates.iter().zip(super::evaluate::uniform_baselines(model, data, &reference, candidates, &mut |_| {})) {
        match r {
            Ok((metrics, size)) => rows.push(Measured { label: format!("uniform {}", spec.label()), metrics, size }),
            Err(e) => skipped.push((*spec, e)),
        }
    }
    rows.sort_by_key(|r| r.size.total_bytes);
    Ok(Comparison { rows, skipped })
}
