//! `mixq allocate`: sensitivity report (or a user cost table) + budgets → QuantConfig.

use super::table::{thousands, Table};
use crate::alloc::{compare_robust, solve, Allocation, Budget, Constraints, RobustComparison, SolverKind};
use crate::config::ModelRef;
use crate::cost::{parse_candidates, BuildOptions, CostTable, LatencyTable, Proxy};
use crate::model::{self, data::Dataset, QuantModel};
use crate::sensitivity::report::SensitivityReport;
use anyhow::{bail, Context, Result};
use clap::Args;
use serde_json::json;
use std::collections::BTreeMap;
use std::path::PathBuf;

/// Where the cost table comes from: a sensitivity report and its model, or a table file.
#[derive(Args, Debug)]
pub struct CostArgs {
    /// Sensitivity report (JSON, `mixq.sensitivity-report`).
    #[arg(long)]
    pub sens: Option<PathBuf>,
    /// Model: zoo name or TorchScript file (default: the report's model).
    #[arg(long)]
    pub model: Option<String>,
    /// Data for TorchScript layer discovery (default: the report's data).
    #[arg(long)]
    pub data: Option<String>,
    /// Candidate formats, comma-separated: `int2,int3,int4,int8,fp32` (the default);
    /// `FORMAT[/GRANULARITY][/SCALE][/CLIPPING]`, e.g. `int4/group:32`, `fp4-e2m1/group:32`.
    #[arg(long)]
    pub formats: Option<String>,
    /// Predicted loss increase Ω: hessian (Tr(H)/n·‖ΔW‖²), measured, fisher, weight-error.
    #[arg(long, value_enum, default_value_t = Proxy::Hessian)]
    pub proxy: Proxy,
    /// Activation bits counted in BOPs (without --act-formats).
    #[arg(long, default_value_t = 32)]
    pub act_bits: u32,
    /// Also search each layer's input-activation format, comma-separated (e.g. `int8,fp32`):
    /// options become `WEIGHT@ACT` pairs, Ω adds (Tr(H_a)/n_a)·E‖Q_a(a) − a‖² measured on the
    /// report's data, BOPs use the activation bits. Needs a native model and a report made with
    /// `--estimator hutchpp,activation`.
    #[arg(long)]
    pub act_formats: Option<String>,
    /// Latency table (CSV `layer,format,latency_us`) for latency budgets.
    #[arg(long)]
    pub latency: Option<PathBuf>,
    /// Solve this cost table (CSV or JSON, `layer,format,cost,bytes,bops,latency_us[,params,bits]`)
    /// instead of building one from a report; no model needed.
    #[arg(long)]
    pub cost_table: Option<PathBuf>,
    /// Write the cost table used (CSV, or JSON when the name ends in `.json`; the nominal one
    /// under --robust).
    #[arg(long)]
    pub write_cost_table: Option<PathBuf>,
    /// Robust mode: solve with each layer's upper confidence bound Tr + Z·s.e. (Z defaults to
    /// 1.96) in place of its trace, and report which layers change format against the nominal
    /// solution and both solutions' objectives under both cost tables (needs a report with
    /// standard errors and the hessian proxy).
    #[arg(long, value_name = "Z", num_args = 0..=1, default_missing_value = "1.96")]
    pub robust: Option<f64>,
}

/// Tie groups, pins and allowed formats.
#[derive(Args, Debug)]
pub struct ConstraintArgs {
    /// Layers that must share a format: `a,b,c` or a regex `re:layer1\..*` (repeatable).
    #[arg(long = "tie")]
    pub ties: Vec<String>,
    /// Pin layers to a format: `PATTERN=FORMAT`, e.g. `stem.conv=int8` (repeatable).
    #[arg(long = "pin")]
    pub pins: Vec<String>,
    /// Restrict layers to formats: `PATTERN=F1,F2` (repeatable).
    #[arg(long = "allow")]
    pub allow: Vec<String>,
}

/// `mixq allocate`.
#[derive(Args, Debug)]
pub struct AllocateArgs {
    #[command(flatten)]
    pub(crate) cost: CostArgs,
    #[command(flatten)]
    pub(crate) constraints: ConstraintArgs,
    /// Budget (repeatable): `size=2.1MB`, `avg-bits=4.5`, `bops=1.2G`, `latency=3ms`, or relative
    /// between the smallest and largest configuration: `size=40%`.
    #[arg(long = "budget", required = true)]
    pub budgets: Vec<String>,
    /// Solver: auto (exact for one budget, HiGHS otherwise), exact, highs, greedy.
    #[arg(long, value_enum, default_value_t = SolverKind::Auto)]
    pub solver: SolverKind,
    /// Write the QuantConfig (JSON) here, atomically.
    #[arg(short, long)]
    pub output: Option<PathBuf>,
    /// Print the allocation as JSON on stdout instead of the table.
    #[arg(long)]
    pub json: bool,
}

/// A cost table and what it came from.
pub struct Costs {
    /// The table (nominal costs).
    pub table: CostTable,
    /// Under `--robust`: z and the table with upper-bound costs.
    pub robust: Option<(f64, CostTable)>,
    /// The model the table was built from, when one was loaded.
    pub loaded: Option<Box<dyn QuantModel>>,
    /// Provenance entries.
    pub provenance: BTreeMap<String, serde_json::Value>,
    /// The model reference for the config.
    pub model: Option<ModelRef>,
}

fn file_sha(path: &PathBuf) -> Result<String> {
    let bytes = std::fs::read(path).with_context(|| format!("reading {}", path.display()))?;
    Ok(crate::util::sha256_hex(&bytes))
}

/// Builds or loads the cost table of `a`.
pub fn costs(a: &CostArgs) -> Result<Costs> {
    let mut prov = BTreeMap::new();
    if let Some(z) = a.robust {
        crate::cost::check_robust_z(z)?;
    }
    let mut robust = None;
    let mut loaded = None;
    let (table, model_ref) = if let Some(path) = &a.cost_table {
        if a.sens.is_some() {
            bail!("give either --cost-table or --sens, not both");
        }
        if a.robust.is_some() {
            bail!("--robust needs the traces' standard errors: give --sens REPORT.json instead of --cost-table");
        }
        let t = CostTable::load(path)?;
        prov.insert("cost_table".into(), json!({"path": path.display().to_string(), "sha256": file_sha(path)?}));
        (t, a.model.as_ref().map(|m| ModelRef { name: m.clone(), weights_sha256: None }))
    } else {
        let Some(sens) = &a.sens else { bail!("give --sens REPORT.json (a sensitivity report) or --cost-table TABLE.csv") };
        let report = SensitivityReport::load(sens)?;
        let spec = a.model.clone().unwrap_or_else(|| report.model.clone());
        let data_spec = a.data.clone().unwrap_or_else(|| report.data.clone());
        let data = if model::zoo::NAMES.contains(&spec.as_str()) {
            None
        } else {
            Some(Dataset::load(&data_spec).with_context(|| format!("loading data `{data_spec}`"))?)
        };
        let m = model::load(&spec, data.as_ref()).with_context(|| format!("loading model `{spec}`"))?;
        let hash = m.weights_hash();
        if !report.model_sha256.is_empty() && report.model_sha256 != hash {
            tracing::warn!("the sensitivity report was made for weights {} but model `{spec}` has {hash}", report.model_sha256);
        }
        let candidates = match &a.formats {
            Some(f) => parse_candidates(f)?,
            None => crate::cost::default_candidates(),
        };
        let latency = a.latency.as_ref().map(|p| LatencyTable::load(p)).transpose()?;
        let activations = match &a.act_formats {
            None => None,
            Some(list) => {
                let formats = crate::cost::parse_activation_formats(list)?;
                let Some(hooks) = m.input_hooks() else {
                    bail!("--act-formats needs a native mixq model (e.g. digits-resnet); `{spec}` is a TorchScript module, whose activations mixq cannot quantize")
                };
                let calib = Dataset::load(&data_spec).with_context(|| format!("loading data `{data_spec}`"))?.into_kind(m.input_kind())?;
                calib.check_for(m.as_ref())?;
                prov.insert("act_formats".into(), json!(formats.iter().map(|f| f.to_string()).collect::<Vec<_>>()));
                Some(crate::cost::ActivationErrors::measure(hooks, &calib, &formats, crate::sensitivity::DEFAULT_BATCH_SIZE)?)
            }
        };
        let opts = BuildOptions { proxy: a.proxy, activation_bits: a.act_bits, latency, robust_z: None, activations };
        let t = match a.robust {
            Some(z) => {
                let (t, r) = CostTable::build_nominal_and_robust(m.as_ref(), &report, &candidates, &opts, z)?;
                robust = Some((z, r));
                prov.insert("robust_z".into(), json!(z));
                t
            }
            None => CostTable::build(m.as_ref(), &report, &candidates, &opts)?,
        };
        prov.insert("sensitivity".into(), json!({"path": sens.display().to_string(), "sha256": file_sha(sens)?}));
        prov.insert("proxy".into(), json!(a.proxy.to_string()));
        prov.insert("candidates".into(), json!(candidates.iter().map(crate::cost::spec_label).collect::<Vec<_>>()));
        loaded = Some(m);
        (t, Some(ModelRef { name: spec, weights_sha256: Some(hash) }))
    };
    if let Some(out) = &a.write_cost_table {
        table.save(out)?;
        eprintln!("cost table written to {}", out.display());
    }
    Ok(Costs { table, robust, loaded, provenance: prov, model: model_ref })
}

/// The constraints of `c` with `budgets`.
pub fn constraints(c: &ConstraintArgs, budgets: &[String]) -> Result<Constraints> {
    Ok(Constraints {
        budgets: budgets.iter().map(|b| b.parse::<Budget>()).collect::<crate::Result<_>>()?,
        ties: c.ties.iter().map(|t| t.parse()).collect::<crate::Result<_>>()?,
        pins: c.pins.iter().map(|t| t.parse()).collect::<crate::Result<_>>()?,
        allowed: c.allow.iter().map(|t| t.parse()).collect::<crate::Result<_>>()?,
    })
}

/// The per-layer table and the budget lines of an allocation.
pub fn render(a: &Allocation) -> String {
    let mut t = Table::new(&["layer", "params", "Tr/n", "format", "bits/w", "Ω"], &[false, true, true, false, true, true]);
    for l in &a.layers {
        t.row(vec![
            l.name.clone(),
            thousands(l.params),
            l.trace_per_param.map(|x| format!("{x:.3e}")).unwrap_or_else(|| "—".into()),
            l.format.clone(),
            if l.params > 0 { format!("{:.2}", l.bits as f64 / l.params as f64) } else { "—".into() },
            format!("{:.3e}", l.cost),
        ]);
    }
    let mut s = t.render("  ");
    s.push('\n');
    for b in &a.budgets {
        s.push_str(&format!("  budget {:<16} used {} of {}\n", b.budget, b.used_display, b.limit_display));
    }
    s.push_str(&format!(
        "  objective Σ Ω = {:.6e}, lower bound {:.6e}, gap {:.2e} ({}, {:.2} ms){}\n",
        a.objective,
        a.bound,
        a.gap,
        a.solver,
        a.time_s * 1e3,
        a.note.as_ref().map(|n| format!("; {n}")).unwrap_or_default()
    ));
    s
}

/// What the robust solution changes against the nominal one: the layers whose format differs and
/// both solutions' Σ Ω under both cost tables.
pub fn render_robust(c: &RobustComparison) -> String {
    let n = c.nominal.layers.len();
    let mut s = format!("Robust vs nominal (costs from Tr + {}·s.e. vs Tr): {} of {n} layers change format\n", c.z, c.changed.len());
    if !c.changed.is_empty() {
        let mut t = Table::new(&["layer", "nominal", "robust"], &[false, false, false]);
        for ch in &c.changed {
            t.row(vec![ch.layer.clone(), ch.nominal.clone(), ch.robust.clone()]);
        }
        s.push_str(&t.render("  "));
    }
    let mut t = Table::new(&["Σ Ω of", "nominal costs", "robust costs"], &[false, true, true]);
    t.row(vec!["nominal config".into(), format!("{:.4e}", c.nominal.objective), format!("{:.4e}", c.nominal_under_robust)]);
    t.row(vec!["robust config".into(), format!("{:.4e}", c.robust_under_nominal), format!("{:.4e}", c.robust.objective)]);
    s.push_str(&t.render("  "));
    s
}

/// The provenance entry of a robust solution.
pub fn robust_provenance(c: &RobustComparison) -> serde_json::Value {
    json!({
        "z": c.z,
        "changed_layers": c.changed.len(),
        "changes": c.changed,
        "nominal_objective": c.nominal.objective,
        "robust_objective": c.robust.objective,
        "nominal_config_under_robust_costs": c.nominal_under_robust,
        "robust_config_under_nominal_costs": c.robust_under_nominal,
    })
}

/// Runs `mixq allocate`.
pub fn run(a: AllocateArgs) -> Result<()> {
    let c = costs(&a.cost)?;
    let cons = constraints(&a.constraints, &a.budgets)?;
    let (alloc, cmp) = match &c.robust {
        Some((z, rt)) => {
            let cmp = compare_robust(&c.table, rt, *z, &cons, a.solver)?;
            (cmp.robust.clone(), Some(cmp))
        }
        None => (solve(&c.table, &cons, a.solver)?, None),
    };
    let mut cfg = alloc.to_config(c.model.clone())?;
    cfg.provenance.extend(c.provenance.clone());
    cfg.provenance.insert("command".into(), json!(std::env::args().collect::<Vec<_>>().join(" ")));
    if let Some(cmp) = &cmp {
        cfg.provenance.insert("robust".into(), robust_provenance(cmp));
    }
    if let Some(out) = &a.output {
        cfg.save(out)?;
    }
    if a.json {
        match &cmp {
            Some(cmp) => println!("{}", serde_json::to_string_pretty(cmp)?),
            None => println!("{}", serde_json::to_string_pretty(&alloc)?),
        }
    } else {
        print!("{}", render(&alloc));
        if let Some(cmp) = &cmp {
            println!();
            print!("{}", render_robust(cmp));
        }
        if let Some(out) = &a.output {
            println!("config written to {}", out.display());
        }
    }
    Ok(())
}
