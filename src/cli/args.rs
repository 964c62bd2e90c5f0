//! Flags shared by several subcommands, and their translation into the library's types. CLI
//! vocabulary (flag names, `ValueEnum`s) stays here; the library takes plain types.

use crate::alloc::{Budget, Constraints, SolverKind};
use crate::cost::Proxy;
use crate::pipeline::costs::{CostSettings, CostSource};
use anyhow::{bail, Context, Result};
use clap::{Args, ValueEnum};
use std::path::PathBuf;

/// Which model and data.
#[derive(Args, Debug)]
pub struct ModelArgs {
    /// A zoo model name (`digits-resnet`, `minilm`) or a TorchScript file (`.pt`).
    #[arg(long, default_value = "digits-resnet")]
    pub model: String,
    /// Data: `digits[:train|calib|test]`, a `.safetensors` file (tensors `x`, optional `y`),
    /// `X.npy[,Y.npy]`, or for text models `stdlib-text[:calib|test|all][:N]` (default: the
    /// model's own, `digits:test`; for minilm `stdlib-text:test:1000`).
    #[arg(long)]
    pub data: Option<String>,
}

/// `--solver`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, ValueEnum)]
pub enum SolverArg {
    /// Exact branch-and-bound with one budget (or none), HiGHS otherwise.
    #[default]
    Auto,
    /// Exact multiple-choice knapsack branch-and-bound (at most one budget).
    Exact,
    /// 0/1 ILP through good_lp + HiGHS (any budgets).
    Highs,
    /// Greedy / LP-rounding baseline.
    Greedy,
}

impl From<SolverArg> for SolverKind {
    fn from(s: SolverArg) -> SolverKind {
        match s {
            SolverArg::Auto => SolverKind::Auto,
            SolverArg::Exact => SolverKind::Exact,
            SolverArg::Highs => SolverKind::Highs,
            SolverArg::Greedy => SolverKind::Greedy,
        }
    }
}

/// `--proxy`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, ValueEnum)]
pub enum ProxyArg {
    /// HAWQ-V2/V3: (Tr(H_i)/n_i)·‖Q_f(W_i) − W_i‖² (needs `trace`).
    #[default]
    Hessian,
    /// The measured loss increase with only this layer quantized (needs `measured_delta_loss` for
    /// every candidate).
    Measured,
    /// (F_i/n_i)·‖Q_f(W_i) − W_i‖² with the empirical Fisher trace F_i (needs `fisher_trace`).
    Fisher,
    /// ‖Q_f(W_i) − W_i‖² alone (no sensitivity: every weight counts the same).
    WeightError,
}

impl From<ProxyArg> for Proxy {
    fn from(p: ProxyArg) -> Proxy {
        match p {
            ProxyArg::Hessian => Proxy::Hessian,
            ProxyArg::Measured => Proxy::Measured,
            ProxyArg::Fisher => Proxy::Fisher,
            ProxyArg::WeightError => Proxy::WeightError,
        }
    }
}

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
    #[arg(long, value_enum, default_value_t = ProxyArg::Hessian)]
    pub proxy: ProxyArg,
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

impl CostArgs {
    /// The library's cost source and settings for these flags.
    pub fn source_and_settings(&self) -> Result<(CostSource, CostSettings)> {
        if let Some(z) = self.robust {
            crate::cost::check_robust_z(z)?;
        }
        let source = match (&self.cost_table, &self.sens) {
            (Some(_), Some(_)) => bail!("give either --cost-table or --sens, not both"),
            (Some(path), None) => {
                if self.robust.is_some() {
                    bail!("--robust needs the traces' standard errors: give --sens REPORT.json instead of --cost-table");
                }
                CostSource::Table { path: path.clone(), model: self.model.clone() }
            }
            (None, Some(path)) => CostSource::Report { path: path.clone(), model: self.model.clone(), data: self.data.clone() },
            (None, None) => bail!("give --sens REPORT.json (a sensitivity report) or --cost-table TABLE.csv"),
        };
        let settings = CostSettings {
            candidates: candidates(self.formats.as_deref())?,
            proxy: self.proxy.into(),
            activation_bits: self.act_bits,
            activation_formats: activation_formats(self.act_formats.as_deref())?,
            latency: self.latency.clone(),
            robust_z: self.robust,
        };
        Ok((source, settings))
    }
}

/// `--formats`, or the default candidates.
pub fn candidates(formats: Option<&str>) -> Result<Vec<crate::quant::QuantSpec>> {
    Ok(match formats {
        Some(f) => crate::cost::parse_candidates(f).context("--formats")?,
        None => crate::cost::default_candidates(),
    })
}

/// `--act-formats`, if given.
pub fn activation_formats(list: Option<&str>) -> Result<Option<Vec<crate::quant::Format>>> {
    list.map(crate::cost::parse_activation_formats).transpose().context("--act-formats")
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

impl ConstraintArgs {
    /// The constraints of these flags with `budgets`.
    pub fn with_budgets(&self, budgets: &[String]) -> Result<Constraints> {
        Ok(Constraints {
            budgets: budgets.iter().map(|b| b.parse::<Budget>()).collect::<crate::Result<_>>()?,
            ties: self.ties.iter().map(|t| t.parse()).collect::<crate::Result<_>>()?,
            pins: self.pins.iter().map(|t| t.parse()).collect::<crate::Result<_>>()?,
            allowed: self.allow.iter().map(|t| t.parse()).collect::<crate::Result<_>>()?,
        })
    }
}

/// The command line as one string, for provenance.
pub fn command_line() -> String {
    std::env::args().collect::<Vec<_>>().join(" ")
}

/// Loads `--model` and `--data` (without `--data`, the model's data for `role`, `calib` or
/// `test`).
pub fn load(args: &ModelArgs, role: &str) -> Result<(Box<dyn crate::model::QuantModel>, crate::model::data::Dataset)> {
    let spec = crate::pipeline::data_spec(&args.model, args.data.as_deref(), role);
    Ok(crate::pipeline::load_model_and_data(&args.model, &spec)?)
}
