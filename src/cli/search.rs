//! `mixq search`: the whole pipeline in one command — sensitivity → cost table → exact
//! allocation → config → evaluation of the mixed model beside uniform baselines.

use super::allocate::{constraints, render as render_allocation, render_robust, robust_provenance, ConstraintArgs};
use super::{metrics_row, metrics_table, ModelArgs};
use crate::alloc::{compare_robust, solve, SolverKind};
use crate::config::{LayerSetting, ModelRef, QuantConfig};
use crate::cost::{default_candidates, parse_candidates, BuildOptions, CostTable, Proxy};
use crate::eval::{self, Reference};
use crate::model::data::Dataset;
use crate::sensitivity::{self, Estimator, SensitivitySettings, TraceSettings};
use anyhow::{bail, Context, Result};
use clap::Args;
use serde_json::json;
use std::path::PathBuf;
use std::time::Instant;

/// `mixq search`.
#[derive(Args, Debug)]
pub struct SearchArgs {
    /// A zoo model name (`digits-resnet`) or a TorchScript file (`.pt`).
    #[arg(long, default_value = "digits-resnet")]
    pub model: String,
    /// Calibration data for the sensitivities (same forms as `--eval-data`).
    #[arg(long, default_value = "digits:calib")]
    pub data: String,
    /// Data the mixed and uniform models are evaluated on: `digits[:split]`, `.safetensors`, `X.npy[,Y.npy]`.
    #[arg(long, default_value = "digits:test")]
    pub eval_data: String,
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
    #[arg(long, value_enum, default_value_t = SolverKind::Auto)]
    pub solver: SolverKind,
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

/// Runs `mixq search`.
pub fn run(a: SearchArgs) -> Result<()> {
    let estimator: Estimator = a.estimator.parse()?;
    if !matches!(estimator, Estimator::Hutchinson | Estimator::Hutchpp) {
        bail!("--estimator {estimator}: search needs Hessian traces; use hutchpp or hutchinson (other proxies: `mixq sensitivity` + `mixq allocate --proxy`)");
    }
    if let Some(z) = a.robust {
        crate::cost::check_robust_z(z)?;
    }
    let cons = constraints(&a.constraints, &a.budgets)?;
    let candidates = match &a.formats {
        Some(f) => parse_candidates(f)?,
        None => default_candidates(),
    };
    let (model, calib) = super::load(&ModelArgs { model: a.model.clone(), data: a.data.clone() })?;
    let eval_data =
        Dataset::load(&a.eval_data).with_context(|| format!("loading data `{}`", a.eval_data))?.into_kind(model.input_kind())?;
    eval_data.check_for(model.as_ref())?;

    // 1. Sensitivity (and activation traces when activation formats are searched).
    let act_formats = a.act_formats.as_deref().map(crate::cost::parse_activation_formats).transpose()?;
    if act_formats.is_some() && model.input_hooks().is_none() {
        bail!(
            "--act-formats needs a native mixq model (e.g. digits-resnet); `{}` is a TorchScript module, whose activations mixq cannot quantize",
            model.name()
        );
    }
    let mut estimators = vec![estimator];
    if act_formats.is_some() {
        estimators.push(Estimator::Activation);
    }
    let settings = SensitivitySettings {
        estimators,
        curvature: a.curvature.parse()?,
        trace: TraceSettings { tol: a.tol, max_probes: a.max_probes, seed: a.seed, sketch: a.sketch, ..TraceSettings::default() },
        ..SensitivitySettings::default()
    };
    let start = Instant::now();
    let opts = sensitivity::RunOptions {
        cache_dir: Some(sensitivity::report::default_cache_dir()),
        read_cache: !a.no_cache,
        ..Default::default()
    };
    let est = super::sensitivity::estimate_cached(model.as_ref(), &calib, &settings, &opts, "sensitivity")
        .with_context(|| format!("sensitivity of {} on {}", model.name(), calib.name))?;
    let report = est.report;
    let hvps = report.settings["hvps"].as_u64().unwrap_or(0);
    let unconverged = report.layers.iter().filter(|l| !l.converged).count();
    let how = match est.origin {
        sensitivity::Origin::Cached(_) => format!("cached report ({hvps} curvature-vector products when computed)"),
        _ => format!("{hvps} curvature-vector products in {:.1} s", start.elapsed().as_secs_f64()),
    };
    eprintln!(
        "sensitivity: {how} on {} ({} samples); {} of {} layers within ±{:.0} %",
        calib.name,
        calib.len(),
        report.layers.len() - unconverged,
        report.layers.len(),
        100.0 * a.tol
    );
    if let Some(p) = &a.sens_output {
        report.save(p)?;
    }

    // 2. Costs and allocation.
    let activations = match &act_formats {
        None => None,
        Some(formats) => {
            let hooks = model.input_hooks().expect("checked before the sensitivity run");
            Some(crate::cost::ActivationErrors::measure(hooks, &calib, formats, settings.batch_size)?)
        }
    };
    let opts = BuildOptions { proxy: Proxy::Hessian, activation_bits: 32, latency: None, robust_z: None, activations };
    let (alloc, cmp) = match a.robust {
        Some(z) => {
            let (nominal, robust) = CostTable::build_nominal_and_robust(model.as_ref(), &report, &candidates, &opts, z)?;
            let cmp = compare_robust(&nominal, &robust, z, &cons, a.solver)?;
            (cmp.robust.clone(), Some(cmp))
        }
        None => (solve(&CostTable::build(model.as_ref(), &report, &candidates, &opts)?, &cons, a.solver)?, None),
    };
    let mut config =
        alloc.to_config(Some(ModelRef { name: model.name().to_string(), weights_sha256: Some(report.model_sha256.clone()) }))?;
    config.provenance.insert("command".into(), json!(std::env::args().collect::<Vec<_>>().join(" ")));
    config.provenance.insert(
        "sensitivity".into(),
        json!({"estimator": estimator.to_string(), "data": calib.name, "data_sha256": report.data_sha256, "seed": a.seed, "tol": a.tol,
               "max_probes": a.max_probes, "hvps": hvps, "layers_converged": report.layers.len() - unconverged}),
    );
    config.provenance.insert("candidates".into(), json!(candidates.iter().map(crate::cost::spec_label).collect::<Vec<_>>()));
    if let Some(f) = &act_formats {
        config.provenance.insert("act_formats".into(), json!(f.iter().map(|f| f.to_string()).collect::<Vec<_>>()));
    }
    if let Some(cmp) = &cmp {
        config.provenance.insert("robust".into(), robust_provenance(cmp));
    }
    config.save(&a.output)?;

    println!(
        "mixq search: {} — sensitivities on {}, evaluation on {} ({} samples)",
        model.name(),
        calib.name,
        eval_data.name,
        eval_data.len()
    );
    println!();
    let mut t = super::table::Table::new(&["layer", "params", "trace ± 95% CI", "converged"], &[false, true, true, false]);
    for l in &report.layers {
        let ci = l.extra.get("trace_ci95").and_then(|v| v.as_f64()).unwrap_or(f64::NAN);
        t.row(vec![
            l.name.clone(),
            super::table::thousands(l.params),
            l.trace.map(|tr| format!("{tr:.3e} ± {ci:.1e}")).unwrap_or_else(|| "—".into()),
            if l.converged { "yes".into() } else { format!("no ({} probes)", l.probes) },
        ]);
    }
    print!("{}", t.render("  "));
    println!();
    println!("Allocation ({}):", a.budgets.join(", "));
    print!("{}", render_allocation(&alloc));
    if let Some(cmp) = &cmp {
        println!();
        print!("{}", render_robust(cmp));
    }
    println!("config written to {}", a.output.display());
    println!();

    // 3. Evaluation: the mixed config beside every uniform candidate.
    let reference = Reference::compute(model.as_ref(), &eval_data)?;
    let mut rows = Vec::new();
    let (mixed, mixed_size) = eval::evaluate_config(model.as_ref(), &eval_data, &reference, &config)?;
    let label = if cmp.is_some() { "mixed (this search, robust)" } else { "mixed (this search)" };
    rows.push((mixed_size.total_bytes, metrics_row(label.into(), &mixed, &mixed_size)));
    if let Some(cmp) = cmp.as_ref().filter(|c| !c.changed.is_empty()) {
        let nominal = cmp.nominal.to_config(None)?;
        let (r, size) = eval::evaluate_config(model.as_ref(), &eval_data, &reference, &nominal)?;
        rows.push((size.total_bytes, metrics_row("mixed (nominal)".into(), &r, &size)));
    }
    for spec in &candidates {
        let uniform = QuantConfig::uniform(LayerSetting::weight(*spec));
        match eval::evaluate_config(model.as_ref(), &eval_data, &reference, &uniform) {
            Ok((r, size)) => rows.push((size.total_bytes, metrics_row(format!("uniform {}", crate::cost::spec_label(spec)), &r, &size))),
            Err(e) => tracing::warn!("uniform {spec} does not apply to every layer: {e}"),
        }
    }
    rows.sort_by_key(|(bytes, _)| *bytes);
    let mut m = metrics_table();
    for (_, r) in rows {
        m.row(r);
    }
    println!("Mixed precision vs uniform baselines on {} (sorted by size):", eval_data.name);
    print!("{}", m.render("  "));
    Ok(())
}
