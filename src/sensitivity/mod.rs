//! Sensitivity: how much quantizing each layer would hurt the loss.
//!
//! HAWQ-V2's sensitivity Ω_i = (Tr(H_i)/n_i)·‖Q(W_i) − W_i‖² needs per-layer Hessian traces of the
//! calibration loss. They come from curvature–vector products ([`hvp`]) fed to a trace estimator
//! that stops only when its confidence intervals say it may ([`hutchinson`]: Hutchinson and a
//! per-layer Hutch++). Around them sit the measures a researcher compares them with: top
//! eigenvalues ([`eigen`]), empirical Fisher, first-order and weight-error proxies, and the
//! measured loss increase of quantizing one layer ([`proxies`]), and HAWQ-V2's activation
//! sensitivity, the trace of the Hessian w.r.t. each layer's input ([`activation`], native models
//! only, reached through [`crate::model::QuantModel::input_hooks`]). [`estimate`] runs the chosen
//! estimators and writes everything into one [`SensitivityReport`].
//!
//! Reports are deterministic: probes come from mixq's own seeded generator ([`stats`]), and the
//! report holds no wall-clock time (the CLI prints it), so the same model, data and settings give
//! the same bytes. That is what makes three things sound: [`estimate_with`] caches finished
//! reports keyed by a hash of model weights, data and settings ([`report::cache_key`]);
//! it checkpoints the trace estimators' running sums so that a killed run resumes to the same
//! report; and shards of one run ([`Shard`]) pool into the report of the whole run
//! ([`report::merge`]).

pub mod activation;
mod autograd;
pub mod eigen;
pub mod hutchinson;
pub mod hvp;
pub mod proxies;
pub mod report;
pub mod stats;

pub use activation::{activation_traces, ActivationSettings, ActivationTrace, InputHooks};
pub use eigen::{top_eigenvalues, EigenSettings, LayerEigen};
pub use hutchinson::{
    hutchinson, hutchinson_resumable, hutchpp, hutchpp_resumable, LayerTrace, Progress, Shard, TraceEstimate, TraceSettings, TraceState,
};
pub use hvp::{Curvature, HvpEngine, DEFAULT_BATCH_SIZE};
pub use report::{merge, LayerSensitivity, SensitivityReport, REPORT_FORMAT, REPORT_VERSION};

use crate::error::{Error, Result};
use crate::model::data::Dataset;
use crate::model::QuantModel;
use crate::quant::{Format, Granularity, QuantSpec};
use serde::{Deserialize, Serialize};
use serde_json::json;
use std::path::PathBuf;
use std::str::FromStr;
use std::time::{Duration, Instant};

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
    /// Trace of the Hessian w.r.t. each layer's input activation (HAWQ-V2; native models).
    Activation,
}

impl Estimator {
    /// All estimators, for help texts.
    pub const ALL: [Estimator; 7] = [
        Estimator::Hutchinson,
        Estimator::Hutchpp,
        Estimator::Fisher,
        Estimator::Grad,
        Estimator::Measured,
        Estimator::Eigen,
        Estimator::Activation,
    ];
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
            Estimator::Activation => "activation",
        })
    }
}

impl FromStr for Estimator {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        Estimator::ALL
            .into_iter()
            .find(|e| e.to_string() == s)
            .ok_or_else(|| Error::invalid("estimator", s, "valid: hutchinson, hutchpp, fisher, grad, measured, eigen, activation"))
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

/// The settings as the report records them, before the run (the cache key hashes these).
fn settings_json(settings: &SensitivitySettings, data: &Dataset) -> serde_json::Value {
    let t = &settings.trace;
    let specs: Vec<QuantSpec> = settings.formats.iter().map(|&f| QuantSpec::new(f, settings.granularity)).collect();
    let mut v = json!({
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
    });
    if !t.shard.is_whole() {
        v["shard"] = json!({"count": t.shard.count, "indices": [t.shard.index]});
    }
    v
}

/// Checks the settings before any work: at least one estimator, and a shard only of a single
/// trace estimator (the other estimators are not random sums that could be pooled).
pub fn validate(settings: &SensitivitySettings) -> Result<()> {
    if settings.estimators.is_empty() {
        return Err(Error::invalid("estimator", "", "give at least one estimator"));
    }
    let sh = settings.trace.shard;
    if !sh.is_whole() && !matches!(settings.estimators.as_slice(), [Estimator::Hutchinson] | [Estimator::Hutchpp]) {
        let given = settings.estimators.iter().map(|e| e.to_string()).collect::<Vec<_>>().join(",");
        return Err(Error::invalid(
            "shard",
            sh.to_string(),
            format!("--shard splits the probes of one trace estimator (hutchinson or hutchpp), not `{given}`: run fisher, grad, measured, eigen and activation once, without --shard"),
        ));
    }
    if settings.estimators.iter().any(|e| matches!(e, Estimator::Hutchinson | Estimator::Hutchpp | Estimator::Activation)) {
        settings.trace.validate()?;
    }
    Ok(())
}

/// The activation-trace settings of a run: the trace estimators' tolerance, probes, block and
/// seed, and the calibration batch size.
fn activation_settings(settings: &SensitivitySettings) -> ActivationSettings {
    let t = &settings.trace;
    ActivationSettings {
        tol: t.tol,
        min_probes: t.min_probes,
        max_probes: t.max_probes,
        block: t.block,
        seed: t.seed,
        batch_size: settings.batch_size,
    }
}

/// Where [`estimate_with`] caches reports and checkpoints, and whether it may use them.
#[derive(Debug, Clone, PartialEq)]
pub struct RunOptions {
    /// Directory of cached reports (`<key>.json`) and checkpoints (`<key>.partial.json`);
    /// `None`: neither.
    pub cache_dir: Option<PathBuf>,
    /// Return a cached report when one exists (false: recompute, and replace it).
    pub read_cache: bool,
    /// Continue from a checkpoint of an interrupted run with the same key, if there is one.
    pub resume: bool,
    /// Least time between two checkpoints (zero: after every pass).
    pub checkpoint_every: Duration,
    /// Workers of the measured estimator, each with its own model replica (1: serial, with
    /// libtorch's own threads; at least 1). Not part of the cache key: the report is the same.
    pub jobs: usize,
    /// Use the `jobs` workers only when the passes would take at least
    /// [`proxies::MIN_PARALLEL_SECONDS`] serially ([`proxies::measured_delta_loss_auto`]); false:
    /// always (an explicit `--jobs`).
    pub jobs_auto: bool,
}

impl Default for RunOptions {
    fn default() -> Self {
        RunOptions {
            cache_dir: None,
            read_cache: true,
            resume: false,
            checkpoint_every: Duration::from_secs(10),
            jobs: proxies::default_jobs(),
            jobs_auto: true,
        }
    }
}

/// Where a report of [`estimate_with`] came from.
#[derive(Debug, Clone, PartialEq)]
pub enum Origin {
    /// Computed from scratch.
    Computed,
    /// Read from the cache file.
    Cached(PathBuf),
    /// Continued from a checkpoint after this many probes (summed over the trace estimators).
    Resumed {
        /// The checkpoint file.
        checkpoint: PathBuf,
        /// Probes it held.
        probes: u64,
    },
}

/// A report, its exact JSON text (for a cached report: the file's bytes, so that a cache hit
/// writes the same bytes as the run that filled it), and where it came from.
#[derive(Debug, Clone)]
pub struct Estimated {
    /// The report.
    pub report: SensitivityReport,
    /// Its JSON text.
    pub json: String,
    /// Computed, cached or resumed.
    pub origin: Origin,
    /// The cache key of model, data and settings.
    pub key: String,
}

/// `"format"` of a checkpoint file.
pub const CHECKPOINT_FORMAT: &str = "mixq.sensitivity-checkpoint";
/// The checkpoint version this build reads and writes.
pub const CHECKPOINT_VERSION: u64 = 1;

/// A checkpoint: per trace estimator, its state after its last completed pass.
struct Checkpoint {
    path: PathBuf,
    key: String,
    states: std::collections::BTreeMap<String, serde_json::Value>,
    last: Instant,
}

impl Checkpoint {
    fn save(&mut self) -> Result<()> {
        let v = json!({"format": CHECKPOINT_FORMAT, "version": CHECKPOINT_VERSION, "key": self.key, "estimators": self.states});
        crate::util::write_atomic(&self.path, format!("{v:#}\n").as_bytes())?;
        self.last = Instant::now();
        Ok(())
    }

    fn load(path: &std::path::Path, key: &str) -> Result<std::collections::BTreeMap<String, serde_json::Value>> {
        let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
        let v = crate::util::parse_versioned_json(&text, path, CHECKPOINT_FORMAT, CHECKPOINT_VERSION, "mixq sensitivity checkpoint")?;
        if v["key"].as_str() != Some(key) {
            return Err(Error::parse(path, "checkpoint of other settings: delete it, or run without --resume"));
        }
        let states = v["estimators"].as_object().ok_or_else(|| Error::parse(path, "missing `estimators`: delete the file"))?;
        Ok(states.iter().map(|(k, v)| (k.clone(), v.clone())).collect())
    }
}

/// Runs the estimators of `settings` on `model` over `data` and collects their results;
/// `progress` sees each pass of the trace estimators. No cache, no checkpoints: see
/// [`estimate_with`].
pub fn estimate(
    model: &dyn QuantModel,
    data: &Dataset,
    settings: &SensitivitySettings,
    progress: &mut dyn FnMut(&Progress),
) -> Result<SensitivityReport> {
    Ok(estimate_with(model, data, settings, &RunOptions::default(), progress)?.report)
}

/// [`estimate`] with a report cache and checkpoints in `opts.cache_dir`: returns the cached
/// report of the same model weights, data and settings if there is one (and `opts.read_cache`);
/// otherwise computes it, saving the trace estimators' state at most every
/// `opts.checkpoint_every` (atomically), continuing from such a checkpoint if `opts.resume`, and
/// caching the finished report (the checkpoint is then removed). Only the trace estimators
/// resume; the others are deterministic and rerun.
pub fn estimate_with(
    model: &dyn QuantModel,
    data: &Dataset,
    settings: &SensitivitySettings,
    opts: &RunOptions,
    progress: &mut dyn FnMut(&Progress),
) -> Result<Estimated> {
    validate(settings)?;
    proxies::check_jobs(opts.jobs)?;
    if settings.estimators.contains(&Estimator::Activation) && model.input_hooks().is_none() {
        return Err(Error::Unsupported(format!(
            "activation sensitivity (--estimator activation) needs a native mixq model (e.g. digits-resnet), whose forward pass \
             can perturb each layer's input; {} is a TorchScript module: drop `activation` from the estimators",
            model.name()
        )));
    }
    let model_sha256 = model.weights_hash();
    let data_sha256 = data_hash(data)?;
    let mut settings_json = settings_json(settings, data);
    let key = report::cache_key(model.name(), &model_sha256, &data.name, &data_sha256, &settings_json);
    let cache_file = opts.cache_dir.as_ref().map(|d| d.join(format!("{key}.json")));
    if let (Some(path), true) = (&cache_file, opts.read_cache) {
        if path.exists() {
            match std::fs::read_to_string(path)
                .map_err(|e| Error::io(path, e))
                .and_then(|t| Ok((SensitivityReport::from_json(&t, path)?, t)))
            {
                Ok((report, json)) if report.model_sha256 == model_sha256 && report.data_sha256 == data_sha256 => {
                    return Ok(Estimated { report, json, origin: Origin::Cached(path.clone()), key });
                }
                Ok(_) => tracing::warn!("{}: cached report of other weights or data; recomputing", path.display()),
                Err(e) => tracing::warn!("ignoring unreadable cached report ({e}); recomputing"),
            }
        }
    }
    let mut ckpt = opts.cache_dir.as_ref().map(|d| Checkpoint {
        path: d.join(format!("{key}.partial.json")),
        key: key.clone(),
        states: Default::default(),
        last: Instant::now(),
    });
    let mut origin = Origin::Computed;
    if let Some(c) = &mut ckpt {
        if c.path.exists() {
            if opts.resume {
                c.states = Checkpoint::load(&c.path, &key)?;
                let probes = c.states.values().filter_map(|v| v["probes"].as_u64()).sum();
                origin = Origin::Resumed { checkpoint: c.path.clone(), probes };
            } else {
                tracing::warn!(
                    "{}: an interrupted run with these settings left a checkpoint; --resume continues it (starting over)",
                    c.path.display()
                );
            }
        }
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
            ..Default::default()
        })
        .collect();
    let specs: Vec<QuantSpec> = settings.formats.iter().map(|&f| QuantSpec::new(f, settings.granularity)).collect();
    let mut probes_used = json!(null);
    let mut total_trace = None;
    // Products a resumed trace estimator would have made without the interruption, minus those
    // it made (its recomputed sketch): the report counts the work of an uninterrupted run.
    let mut hvp_adjust: i64 = 0;
    for est in &settings.estimators {
        match est {
            Estimator::Hutchinson | Estimator::Hutchpp => {
                let name = est.to_string();
                let from = match ckpt.as_ref().and_then(|c| c.states.get(&name)) {
                    Some(v) => Some(TraceState::from_json(v, &ckpt.as_ref().map(|c| c.path.clone()).unwrap_or_default())?),
                    None => None,
                };
                let every = opts.checkpoint_every;
                let mut save = |st: &TraceState| -> Result<()> {
                    if let Some(c) = &mut ckpt {
                        if c.last.elapsed() >= every {
                            c.states.insert(name.clone(), st.to_json());
                            c.save()?;
                        }
                    }
                    Ok(())
                };
                let before = engine.hvp_count();
                let r = if *est == Estimator::Hutchinson {
                    hutchinson_resumable(&engine, &settings.trace, from, &mut save, progress)?
                } else {
                    hutchpp_resumable(&engine, &settings.trace, from, &mut save, progress)?
                };
                hvp_adjust += r.hvps as i64 - (engine.hvp_count() - before) as i64;
                if let Some(c) = &mut ckpt {
                    // The finished estimator, so that an interruption in the next ones keeps it.
                    c.states.insert(name.clone(), r.state.to_json());
                    c.save()?;
                }
                probes_used = json!(r.probes);
                total_trace = r.total.clone();
                for (i, (l, t)) in layers.iter_mut().zip(&r.layers).enumerate() {
                    l.trace = Some(t.trace);
                    l.trace_std_err = Some(t.std_err);
                    l.probes = t.probes;
                    l.converged = t.converged;
                    l.extra.insert("trace_ci95".into(), json!(t.ci95));
                    l.extra.insert("trace_per_param".into(), json!(t.trace / l.params.max(1) as f64));
                    let w = &r.state.stats[i];
                    l.extra.insert("trace_stats".into(), json!({"n": w.n, "mean": w.mean, "m2": w.m2, "offset": r.state.offset[i]}));
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
                let rows = if opts.jobs_auto {
                    proxies::measured_delta_loss_auto(&engine, &specs, opts.jobs)?
                } else {
                    proxies::measured_delta_loss_jobs(&engine, &specs, opts.jobs)?
                };
                for (l, row) in layers.iter_mut().zip(rows) {
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
            Estimator::Activation => {
                let hooks = model.input_hooks().ok_or_else(|| Error::Unsupported("activation sensitivity needs a native model".into()))?;
                let traces = activation::activation_traces_with_progress(hooks, data, &activation_settings(settings), progress)?;
                // One curvature–vector product per probe (its own engine's, not `engine`'s).
                hvp_adjust += traces.first().map_or(0, |a| a.trace.probes as i64);
                for (l, a) in layers.iter_mut().zip(traces) {
                    if a.name != l.name {
                        return Err(Error::Model {
                            model: model.name().to_string(),
                            msg: format!("activation traces in another layer order (`{}` where `{}` was expected)", a.name, l.name),
                        });
                    }
                    l.activation_trace = Some(a.trace.trace);
                    l.activation_trace_std_err = Some(a.trace.std_err);
                    l.activation_numel = Some(a.numel_per_sample);
                    l.activation_probes = Some(a.trace.probes);
                    l.activation_converged = Some(a.trace.converged);
                    l.extra.insert("activation_trace_ci95".into(), json!(a.trace.ci95));
                }
            }
        }
    }
    settings_json["probes"] = probes_used;
    settings_json["hvps"] = json!((engine.hvp_count() as i64 + hvp_adjust).max(0));
    let report = SensitivityReport {
        format: REPORT_FORMAT.to_string(),
        version: REPORT_VERSION,
        model: model.name().to_string(),
        model_sha256,
        data: data.name.clone(),
        data_sha256,
        settings: settings_json,
        layers,
        total_trace,
    };
    let json = report.to_json();
    if let Some(path) = &cache_file {
        crate::util::write_atomic(path, json.as_bytes())?;
    }
    if let Some(c) = &ckpt {
        if c.path.exists() {
            std::fs::remove_file(&c.path).map_err(|e| Error::io(&c.path, e))?;
        }
    }
    Ok(Estimated { report, json, origin, key })
}
