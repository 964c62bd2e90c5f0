//! `mixq search`: the whole pipeline in one command — sensitivity → cost table → exact
//! allocation → config → evaluation of the mixed model beside uniform baselines.

use super::args::{ConstraintArgs, ModelArgs, SolverArg};
use super::render;
use super::table::{thousands, Table};
use crate::pipeline::costs::check_activation_search;
use crate::pipeline::load_data_for;
use crate::pipeline::search::{compare_with_uniform, plan, SearchSettings};
use crate::sensitivity::report::default_cache_dir;
use crate::sensitivity::{self, Estimator, RunOptions, TraceSettings};
use anyhow::{bail, Context, Result};
use clap::Args;
use std::path::PathBuf;
use std::time::Instant;

/// `mixq search`.
#[derive(Args, Debug)]
pub struct SearchArgs {
    /// A zoo model name (`digits-resnet`, `minilm`) or a TorchScript file (`.pt`).
    #[arg(long, default_value = "digits-resnet")]
    pub model: String,
    /// Calibration data for the sensitivities (same forms as `--eval-data`; default: the
    /// model's own, `digits:calib`; for minilm `stdlib-text:calib:64`).
    #[arg(long)]
    pub data: Option<String>,
    /// Data the mixed and uniform models are evaluated on: `digits[:split]`, `.safetensors`,
    /// `X.npy[,Y.npy]`, `stdlib-text[:split][:N]` (default: `digits:test`; for minilm
    /// `stdlib-text:test:1000`).
    #[arg(long)]
    pub eval_data: Option<String>,
    /// Budgets, e.g. `avg-bits=4.5`, `size=120KB`, `size=40%`, `bops=2G`; repeat for several.
    #[arg(long = "budget", required = true)]
    pub budgets: Vec<String>,
    /// Candidate formats, comma-separated (default `int2,int3,int4,int8,fp32`, per-channel).
    #[arg(long)]
    pub formats: Option<String>,
    /// Tie groups, pins, allowed formats.
    #[command(flatten)]
    pub constraints: ConstraintArgs,
    /// Solver.
    #[arg(long, value_enum, default_value_t = SolverArg::Auto)]
    pub solver: SolverArg,
    /// Trace estimator: `hutchpp` (fewer products for the same confidence interval on the
    /// digits CNN, measured) or `hutchinson`.
    #[arg(long, default_value = "hutchpp")]
    pub estimator: String,
    /// Curvature: `ggn` (Gauss–Newton, positive semi-definite; with Hutch++ and `--sketch 32` it
    /// reaches the ±5 % tolerance on every digits-resnet layer in 76 products, where the
    /// indefinite `hessian` had not within 300) or `hessian` (HAWQ-V2's exact Hessian).
    #[arg(long, default_value = "ggn")]
    pub curvature: String,
    /// Hutch++ sketch size (2 × this many products up front; the rest of the curvature is then
    /// estimated by residual probes).
    #[arg(long, default_value_t = 32)]
    pub sketch: u64,
    /// Relative 95 % CI half-width at which a layer's trace counts as converged.
    #[arg(long, default_value_t = 0.05)]
    pub tol: f64,
    /// At most this many probes (Hutch++: residual probes).
    #[arg(long, default_value_t = 100)]
    pub max_probes: u64,
    /// Seed of the probes.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Where the config is written (atomically).
    #[arg(short, long, default_value = "mixq-config.json")]
    pub output: PathBuf,
    /// Recompute the sensitivities even when an identical run is cached (under
    /// `$MIXQ_HOME/cache/sensitivity/`), and replace the cached report.
    #[arg(long)]
    pub no_cache: bool,
    /// Also write the sensitivity report here.
    #[arg(long)]
    pub sens_output: Option<PathBuf>,
    /// Robust mode: allocate with each layer's upper confidence bound Tr + Z·s.e. (Z defaults to
    /// 1.96), report which layers change against the nominal allocation, and evaluate both.
    #[arg(long, value_name = "Z", num_args = 0..=1, default_missing_value = "1.96")]
    pub robust: Option<f64>,
    /// Also search each layer's input-activation format, comma-separated (e.g. `int8,fp32`):
    /// adds activation traces to the sensitivity run; options become `WEIGHT@ACT` pairs, Ω adds
    /// (Tr(H_a)/n_a)·E‖Q_a(a) − a‖², BOPs use the activation bits (native models only).
    #[arg(long)]
    pub act_formats: Option<String>,
}

impl SearchArgs {
    /// The library's search settings for these flags.
    fn settings(&self) -> Result<SearchSettings> {
        let estimator: Estimator = self.estimator.parse()?;
        if !matches!(estimator, Estimator::Hutchinson | Estimator::Hutchpp) {
            bail!("--estimator {estimator}: search needs Hessian traces; use hutchpp or hutchinson (other proxies: `mixq sensitivity` + `mixq allocate --proxy`)");
        }
        let settings = SearchSettings {
            estimator,
            curvature: self.curvature.parse()?,
            trace: TraceSettings {
                tol: self.tol,
                max_probes: self.max_probes,
                seed: self.seed,
                sketch: self.sketch,
                ..TraceSettings::default()
            },
            candidates: super::args::candidates(self.formats.as_deref())?,
            constraints: self.constraints.with_budgets(&self.budgets)?,
            solver: self.solver.into(),
            robust_z: self.robust,
            activation_formats: super::args::activation_formats(self.act_formats.as_deref())?,
            run: RunOptions { cache_dir: Some(default_cache_dir()), read_cache: !self.no_cache, ..Default::default() },
        };
        settings.validate()?;
        Ok(settings)
    }
}

/// Runs `mixq search`.
pub fn run(a: SearchArgs) -> Result<()> {
    let settings = a.settings()?;
    let (model, calib) = super::args::load(&ModelArgs { model: a.model.clone(), data: a.data.clone() }, "calib")?;
    let eval_data = load_data_for(&crate::pipeline::data_spec(&a.model, a.eval_data.as_deref(), "test"), model.as_ref())?;
    if settings.activation_formats.is_some() {
        check_activation_search(model.as_ref()).context("--act-formats")?;
    }

    // 1. Sensitivity, costs, allocation, config.
    let start = Instant::now();
    let (bar, mut progress) = super::sensitivity::probe_progress(&settings.trace, "sensitivity");
    let planned = plan(model.as_ref(), &calib, &settings, &super::args::command_line(), &mut progress)?;
    bar.finish_and_clear();
    let est = &planned.sensitivity;
    super::sensitivity::print_origin(model.name(), &est.origin);
    let report = &est.report;
    let hvps = planned.hvps();
    let how = match est.origin {
        sensitivity::Origin::Cached(_) => format!("cached report ({hvps} curvature-vector products when computed)"),
        _ => format!("{hvps} curvature-vector products in {:.1} s", start.elapsed().as_secs_f64()),
    };
    eprintln!(
        "sensitivity: {how} on {} ({} samples); {} of {} layers within ±{:.0} %",
        calib.name,
        calib.len(),
        planned.converged(),
        report.layers.len(),
        100.0 * a.tol
    );
    if let Some(p) = &a.sens_output {
        report.save(p)?;
    }
    planned.config.save(&a.output)?;

    println!(
        "mixq search: {} — sensitivities on {}, evaluation on {} ({} samples)",
        model.name(),
        calib.name,
        eval_data.name,
        eval_data.len()
    );
    println!();
    let mut t = Table::new(&["layer", "params", "trace ± 95% CI", "converged"], &[false, true, true, false]);
    for l in &report.layers {
        let ci = l.extra.get("trace_ci95").and_then(|v| v.as_f64()).unwrap_or(f64::NAN);
        t.row(vec![
            l.name.clone(),
            thousands(l.params),
            l.trace.map(|tr| format!("{tr:.3e} ± {ci:.1e}")).unwrap_or_else(|| "—".into()),
            if l.converged { "yes".into() } else { format!("no ({} probes)", l.probes) },
        ]);
    }
    print!("{}", t.render("  "));
    println!();
    println!("Allocation ({}):", a.budgets.join(", "));
    print!("{}", render::allocation(&planned.alloc));
    if let Some(cmp) = &planned.robust {
        println!();
        print!("{}", render::robust(cmp));
    }
    println!("config written to {}", a.output.display());
    println!();

    // 2. Evaluation: the mixed config beside every uniform candidate.
    let cmp = compare_with_uniform(model.as_ref(), &eval_data, &planned, &settings.candidates)?;
    for (spec, e) in cmp.skipped {
        tracing::warn!("uniform {spec} does not apply to every layer: {e}");
    }
    let mut m = render::metrics_table_for(model.output_kind());
    for r in cmp.rows {
        m.row(render::metrics_row(r.label, &r.metrics, &r.size));
    }
    println!("Mixed precision vs uniform baselines on {} (sorted by size):", eval_data.name);
    print!("{}", m.render("  "));
    Ok(())
}
