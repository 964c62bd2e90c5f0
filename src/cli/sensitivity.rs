//! `mixq sensitivity`: per-layer curvature and proxies → a `mixq.sensitivity-report` JSON;
//! cached, resumable, shardable; `mixq sensitivity merge` pools shards.

use super::args::ModelArgs;
use super::progress;
use crate::quant::{Format, Granularity};
use crate::sensitivity::{
    self, Curvature, EigenSettings, Estimator, Origin, Progress, RunOptions, SensitivityReport, SensitivitySettings, Shard, TraceSettings,
};
use anyhow::{Context, Result};
use clap::{Args, Subcommand};
use std::path::PathBuf;
use std::time::{Duration, Instant};

/// `mixq sensitivity`.
#[derive(Args, Debug)]
#[command(args_conflicts_with_subcommands = true, subcommand_negates_reqs = true)]
pub struct SensitivityArgs {
    /// `merge`: pool shard reports (otherwise: estimate).
    #[command(subcommand)]
    pub action: Option<SensitivityAction>,
    /// A zoo model name (`digits-resnet`, `minilm`) or a TorchScript file (`.pt`).
    #[arg(long, default_value = "digits-resnet")]
    pub model: String,
    /// Calibration data: `digits[:train|calib|test]`, a `.safetensors` file (tensors `x`, optional
    /// `y`), `X.npy[,Y.npy]`, or `stdlib-text[:split][:N]` for text models (default: the model's
    /// own, `digits:calib`; for minilm `stdlib-text:calib:64`). Without labels the loss is KL to
    /// the model's FP32 outputs (for embedding models, the squared error to its FP32 embeddings).
    #[arg(long)]
    pub data: Option<String>,
    /// Estimators, comma-separated: hutchinson, hutchpp, fisher, grad (|g·ΔW| and ‖ΔW‖² per
    /// format), measured (loss increase per layer and format), eigen (top eigenvalue per layer),
    /// activation (trace of the Hessian w.r.t. each layer's input, HAWQ-V2; native models only;
    /// uses --tol, --min-probes, --max-probes and --seed). Default hutchpp: on the demo CNN its
    /// sketch cut the per-layer variance 2.3–8.1× against hutchinson (README, "Status").
    #[arg(long, value_delimiter = ',', default_value = "hutchpp")]
    pub estimator: Vec<String>,
    /// Curvature of the trace and eigenvalue estimators: ggn (Gauss–Newton, positive
    /// semi-definite; with hutchpp and --sketch 32 every layer of the demo CNN is within ±5 % in
    /// 76 products, 9 s) or hessian (HAWQ's exact Hessian: indefinite, and on a trained model
    /// with near-zero loss its traces are small against their noise — it did not reach ±5 %
    /// within 300 probes there).
    #[arg(long, default_value = "ggn")]
    pub curvature: String,
    /// Stop when every layer's 95 % CI half-width is at most this fraction of |trace|.
    #[arg(long, default_value_t = 0.05)]
    pub tol: f64,
    /// ...or at most this fraction of Σ|trace| over all layers (near-zero layers cannot stall).
    #[arg(long, default_value_t = 1e-3)]
    pub tol_floor: f64,
    /// Probes before the stopping rule is first tested.
    #[arg(long, default_value_t = 10)]
    pub min_probes: u64,
    /// Most probes (residual probes for hutchpp).
    #[arg(long, default_value_t = 200)]
    pub max_probes: u64,
    /// Hutch++ sketch size (costs twice as many products up front).
    #[arg(long, default_value_t = 32)]
    pub sketch: u64,
    /// Seed of the random probes.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Calibration batch size (memory is bounded by one batch's graph).
    #[arg(long, default_value_t = sensitivity::DEFAULT_BATCH_SIZE)]
    pub batch_size: usize,
    /// Formats of the grad and measured estimators, comma-separated.
    #[arg(long, value_delimiter = ',', default_value = "int2,int4,int8")]
    pub formats: Vec<String>,
    /// Granularity of those formats (`tensor`, `channel`, `group:N`).
    #[arg(long, default_value = "channel")]
    pub granularity: String,
    /// Write the report (JSON) here, atomically.
    #[arg(short, long)]
    pub output: Option<PathBuf>,
    /// Print the JSON report on stdout instead of the table.
    #[arg(long)]
    pub json: bool,
    /// Run only shard k of n (e.g. `--shard 0/4`): the probes j < --max-probes with j ≡ k (mod n),
    /// all of them (no early stop). One trace estimator only; pool the n reports with
    /// `mixq sensitivity merge`. Hutch++ shards each recompute the same sketch.
    #[arg(long)]
    pub shard: Option<String>,
    /// Continue an interrupted run with the same model, data and settings from its last
    /// checkpoint (same report as an uninterrupted run).
    #[arg(long)]
    pub resume: bool,
    /// Recompute even if a report of the same model weights, data and settings is cached in
    /// $MIXQ_HOME/cache/sensitivity (the new report replaces it).
    #[arg(long)]
    pub no_cache: bool,
    /// Seconds between checkpoints of the running probe statistics (0: after every pass).
    #[arg(long, default_value_t = 10.0)]
    pub checkpoint_every: f64,
    /// Workers of the measured estimator (other estimators ignore it): each evaluates
    /// (layer, format) pairs on its own copy of the model with one libtorch thread; same report
    /// as 1 (serial, libtorch's own threads). Default: the number of cores, used when the
    /// passes would take at least 0.5 s serially (timed on the first pass; below that, copying
    /// the model costs more than it saves — experiments/measured-parallel). An explicit value is
    /// always used. Models that cannot be copied run serially.
    #[arg(long)]
    pub jobs: Option<usize>,
}

/// Subcommands of `mixq sensitivity`.
#[derive(Subcommand, Debug)]
pub enum SensitivityAction {
    /// Pool the reports of disjoint shards of one run (`--shard k/n`) into one report: pooled
    /// mean and variance, standard error, CI, probes, converged re-evaluated with the run's tol.
    Merge(MergeArgs),
}

/// `mixq sensitivity merge`.
#[derive(Args, Debug)]
pub struct MergeArgs {
    /// Shard reports of the same model, data and settings.
    #[arg(required = true, num_args = 2..)]
    pub reports: Vec<PathBuf>,
    /// Write the merged report (JSON) here, atomically.
    #[arg(short, long)]
    pub output: PathBuf,
    /// Print the JSON report on stdout instead of the table.
    #[arg(long)]
    pub json: bool,
}

fn settings(a: &SensitivityArgs) -> Result<SensitivitySettings> {
    let estimators = a.estimator.iter().map(|e| e.parse::<Estimator>()).collect::<Result<Vec<_>, _>>()?;
    let curvature: Curvature = a.curvature.parse()?;
    let formats = a.formats.iter().map(|f| f.parse::<Format>()).collect::<Result<Vec<_>, _>>()?;
    let granularity: Granularity = a.granularity.parse()?;
    let trace = TraceSettings {
        tol: a.tol,
        tol_floor: a.tol_floor,
        min_probes: a.min_probes,
        max_probes: a.max_probes,
        seed: a.seed,
        sketch: a.sketch,
        shard: match &a.shard {
            Some(s) => s.parse::<Shard>()?,
            None => Shard::default(),
        },
        ..Default::default()
    };
    trace.validate()?;
    if a.batch_size == 0 {
        anyhow::bail!("--batch-size must be at least 1");
    }
    let s = SensitivitySettings {
        estimators,
        curvature,
        batch_size: a.batch_size,
        trace,
        eigen: EigenSettings { seed: a.seed, ..Default::default() },
        formats,
        granularity,
    };
    sensitivity::validate(&s)?;
    Ok(s)
}

fn run_options(a: &SensitivityArgs) -> Result<RunOptions> {
    let every = Duration::try_from_secs_f64(a.checkpoint_every)
        .map_err(|_| anyhow::anyhow!("--checkpoint-every {}: give seconds ≥ 0, e.g. 10", a.checkpoint_every))?;
    Ok(RunOptions {
        cache_dir: Some(sensitivity::report::default_cache_dir()),
        read_cache: !a.no_cache,
        resume: a.resume,
        checkpoint_every: every,
        jobs: match a.jobs {
            Some(0) => anyhow::bail!("--jobs 0: give at least 1 worker (1 runs the measured estimator serially)"),
            Some(n) => n,
            None => sensitivity::proxies::default_jobs(),
        },
        jobs_auto: a.jobs.is_none(),
    })
}

/// A progress bar of the trace estimators' probes (hidden when stderr is not a terminal) and the
/// callback that moves it.
pub fn probe_progress(t: &TraceSettings, what: &str) -> (indicatif::ProgressBar, impl FnMut(&Progress)) {
    let bar = progress::bar(t.shard.share(t.max_probes), what);
    let b = bar.clone();
    let update = move |p: &Progress| {
        b.set_position(p.probes);
        b.set_message(if p.worst_rel_ci.is_finite() && p.worst_rel_ci > 0.0 {
            format!("worst layer CI ±{:.1} %, {} converged", 100.0 * p.worst_rel_ci, p.converged)
        } else {
            format!("{} converged", p.converged)
        });
    };
    (bar, update)
}

/// The line on stderr when a report comes from the cache or a checkpoint.
pub fn print_origin(model: &str, origin: &Origin) {
    match origin {
        Origin::Cached(p) => eprintln!(
            "{model}: reusing the cached sensitivity report {} (same weights, data and settings; --no-cache recomputes)",
            p.display()
        ),
        Origin::Resumed { checkpoint, probes } => {
            eprintln!("{model}: resumed after {probes} probes from the checkpoint {}", checkpoint.display())
        }
        Origin::Computed => {}
    }
}

/// Runs `mixq sensitivity`.
pub fn run(a: SensitivityArgs) -> Result<()> {
    if let Some(SensitivityAction::Merge(m)) = a.action {
        return merge(m);
    }
    let settings = settings(&a)?;
    let opts = run_options(&a)?;
    let (model, data) = super::args::load(&ModelArgs { model: a.model.clone(), data: a.data.clone() }, "calib")?;
    let start = Instant::now();
    let (bar, mut progress) = probe_progress(&settings.trace, "probes");
    let est = sensitivity::estimate_with(model.as_ref(), &data, &settings, &opts, &mut progress)
        .with_context(|| format!("sensitivity of {} on {}", model.name(), data.name))?;
    bar.finish_and_clear();
    print_origin(model.name(), &est.origin);
    let report = &est.report;
    let elapsed = start.elapsed().as_secs_f64();
    if let Some(out) = &a.output {
        crate::util::write_atomic(out, est.json.as_bytes())?;
    }
    if est.origin == Origin::Computed || matches!(est.origin, Origin::Resumed { .. }) {
        let hvps = report.settings["hvps"].as_u64().unwrap_or(0);
        eprintln!("{}: {} curvature-vector products in {:.1} s on {} samples", model.name(), hvps, elapsed, data.len());
    }
    let shard = settings.trace.shard;
    if !shard.is_whole() {
        eprintln!(
            "shard {shard}: {} of {} probes; pool the {} shard reports with `mixq sensitivity merge`",
            shard.share(settings.trace.max_probes),
            settings.trace.max_probes,
            shard.count
        );
    }
    if a.json {
        print!("{}", est.json);
        return Ok(());
    }
    print!("{}", super::render::sensitivity(report));
    if let Some(out) = &a.output {
        println!("report written to {}", out.display());
    }
    Ok(())
}

fn merge(m: MergeArgs) -> Result<()> {
    let inputs = m.reports.iter().map(|p| Ok((p.clone(), SensitivityReport::load(p)?))).collect::<Result<Vec<_>>>()?;
    let merged = sensitivity::merge(&inputs)?;
    merged.save(&m.output)?;
    let shard = &merged.settings["shard"];
    eprintln!(
        "merged {} reports: {} probes{}",
        inputs.len(),
        merged.settings["probes"],
        if shard.is_null() {
            String::new()
        } else {
            format!(" (still a part of the run: shards {} of {})", shard["indices"], shard["count"])
        }
    );
    if m.json {
        print!("{}", merged.to_json());
        return Ok(());
    }
    print!("{}", super::render::sensitivity(&merged));
    println!("report written to {}", m.output.display());
    Ok(())
}
