//! The `mixq` command line: one subcommand per stage, plus `demo`. The binary's `main` only
//! parses arguments and calls [`run`]; every subcommand is a thin layer over the library.

pub mod allocate;
pub mod latency;
pub mod pareto;
pub mod progress;
pub mod search;
pub mod sensitivity;
pub mod table;

use crate::config::{LayerSetting, QuantConfig};
use crate::eval::{self, Metrics, Reference, SizeReport};
use crate::model::{self, data::Dataset, QuantModel};
use crate::quant::{Format, Granularity, QuantSpec};
use anyhow::{Context, Result};
use clap::{Args, Parser, Subcommand};
use serde_json::json;
use std::path::PathBuf;
use table::{bytes, thousands, Table};

/// mixq: mixed-precision quantization search — per-layer sensitivities, exact bit-width
/// allocation, and evaluation of the quantized model.
#[derive(Parser, Debug)]
#[command(name = "mixq", version, about, long_about = None)]
pub struct Cli {
    /// More log output on stderr (-v: info, -vv: debug).
    #[arg(short, long, action = clap::ArgAction::Count, global = true)]
    pub verbose: u8,
    /// The subcommand.
    #[command(subcommand)]
    pub command: Command,
}

/// Subcommands.
#[derive(Subcommand, Debug)]
pub enum Command {
    /// List a model's quantizable layers (name, kind, shape, parameters, MACs per sample).
    Layers(LayersArgs),
    /// Evaluate a quant config: accuracy, loss, KL and top-1 agreement vs FP32, and size.
    Eval(EvalArgs),
    /// List the number formats with their storage cost per weight.
    Formats,
    /// Run the demo: the built-in digits CNN, its layers, and uniform baselines for every format.
    Demo(DemoArgs),
    /// Per-layer sensitivity: Hessian traces with confidence intervals, eigenvalues, proxies.
    Sensitivity(sensitivity::SensitivityArgs),
    /// Choose a format per layer: minimal predicted loss within budgets → QuantConfig.
    Allocate(allocate::AllocateArgs),
    /// Sweep a budget and write the predicted Pareto front (CSV, SVG).
    Pareto(pareto::ParetoArgs),
    /// Write a seeded synthetic cost table (solver benchmarks, the PuLP comparison).
    Synthetic(SyntheticArgs),
    /// The whole pipeline: sensitivity → allocation under budgets → config → evaluation of the
    /// mixed model beside uniform baselines.
    Search(search::SearchArgs),
    /// Time every layer's GEMM under candidate formats with the low-bit kernels → latency CSV
    /// for `allocate --latency`.
    Latency(latency::LatencyArgs),
}

/// `mixq synthetic`.
#[derive(Args, Debug)]
pub struct SyntheticArgs {
    /// Seed of the generator (the benchmarks use 1).
    #[arg(long, default_value_t = 1)]
    pub seed: u64,
    /// Number of layers.
    #[arg(long, default_value_t = 2000)]
    pub layers: usize,
    /// Candidate formats per layer, 1 to 8 (int2 … int8, fp32; the highest-precision ones kept).
    #[arg(long, default_value_t = 8)]
    pub formats: usize,
    /// Output table (CSV, or JSON when the name ends in `.json`).
    #[arg(short, long)]
    pub output: PathBuf,
}

/// Which model and data.
#[derive(Args, Debug)]
pub struct ModelArgs {
    /// A zoo model name (`digits-resnet`) or a TorchScript file (`.pt`).
    #[arg(long, default_value = "digits-resnet")]
    pub model: String,
    /// Data: `digits[:train|calib|test]`, a `.safetensors` file (tensors `x`, optional `y`), or
    /// `X.npy[,Y.npy]`.
    #[arg(long, default_value = "digits:test")]
    pub data: String,
}

/// `mixq layers`.
#[derive(Args, Debug)]
pub struct LayersArgs {
    #[command(flatten)]
    model: ModelArgs,
    /// Print JSON instead of a table.
    #[arg(long)]
    json: bool,
}

/// `mixq eval`.
#[derive(Args, Debug)]
pub struct EvalArgs {
    #[command(flatten)]
    model: ModelArgs,
    /// The quant config (JSON, `mixq.quant-config` version 1).
    #[arg(long)]
    config: PathBuf,
    /// Write the evaluation report (JSON) here, atomically.
    #[arg(short, long)]
    output: Option<PathBuf>,
    /// Print the JSON report on stdout instead of the table.
    #[arg(long)]
    json: bool,
    /// Also run the config through the real low-bit kernels (mixq-kernels): packed weights and the
    /// kernels' GEMM for int4, int8, fp8-e4m3 and fp4-e2m1 layers (convolutions through im2col),
    /// fake quantization for other formats; reports the metrics and the difference to fake
    /// quantization. Zoo model only.
    #[arg(long)]
    kernels: bool,
}

/// `mixq demo`.
#[derive(Args, Debug)]
pub struct DemoArgs {
    /// Granularity of the uniform baselines.
    #[arg(long, default_value = "channel")]
    granularity: String,
}

/// Runs a parsed command line.
pub fn run(cli: Cli) -> Result<()> {
    init_logging(cli.verbose);
    match cli.command {
        Command::Layers(a) => layers(a),
        Command::Eval(a) => eval_cmd(a),
        Command::Formats => formats(),
        Command::Demo(a) => demo(a),
        Command::Sensitivity(a) => sensitivity::run(a),
        Command::Allocate(a) => allocate::run(a),
        Command::Pareto(a) => pareto::run(a),
        Command::Search(a) => search::run(a),
        Command::Synthetic(a) => synthetic(a),
        Command::Latency(a) => latency::run(a),
    }
}

fn synthetic(a: SyntheticArgs) -> Result<()> {
    if !(1..=8).contains(&a.formats) {
        anyhow::bail!("--formats {}: a synthetic table has 1 to 8 formats per layer", a.formats);
    }
    if a.layers == 0 {
        anyhow::bail!("--layers 0: a synthetic table needs at least one layer");
    }
    crate::cost::synthetic(a.seed, a.layers, a.formats).save(&a.output)?;
    eprintln!("synthetic table ({} layers × {} formats, seed {}) written to {}", a.layers, a.formats, a.seed, a.output.display());
    Ok(())
}

fn init_logging(verbose: u8) {
    let level = match verbose {
        0 => "warn",
        1 => "info",
        _ => "debug",
    };
    let filter = tracing_subscriber::EnvFilter::try_from_env("MIXQ_LOG").unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(level));
    let _ = tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr).without_time().try_init();
}

fn load(args: &ModelArgs) -> Result<(Box<dyn QuantModel>, Dataset)> {
    let data = Dataset::load(&args.data).with_context(|| format!("loading data `{}`", args.data))?;
    let model = model::load(&args.model, Some(&data)).with_context(|| format!("loading model `{}`", args.model))?;
    let data = data.into_kind(model.input_kind())?;
    data.check_for(model.as_ref())?;
    Ok((model, data))
}

fn layers_table(model: &dyn QuantModel) -> String {
    let mut t = Table::new(&["layer", "kind", "shape", "params", "MACs/sample"], &[false, false, false, true, true]);
    for l in model.layers() {
        t.row(vec![l.name.clone(), l.kind.to_string(), format!("{:?}", l.shape), thousands(l.params), thousands(l.macs)]);
    }
    t.render("  ")
}

fn layers(a: LayersArgs) -> Result<()> {
    let (model, _) = load(&a.model)?;
    if a.json {
        println!("{}", serde_json::to_string_pretty(&json!({"model": model.name(), "layers": model.layers()}))?);
    } else {
        let params: i64 = model.layers().iter().map(|l| l.params).sum();
        println!("{}: {} quantizable layers, {} weights", model.name(), model.layers().len(), thousands(params));
        print!("{}", layers_table(model.as_ref()));
    }
    Ok(())
}

fn report_json(
    model: &dyn QuantModel,
    data: &Dataset,
    config: &str,
    fp32: &Metrics,
    q: &Metrics,
    size: &SizeReport,
) -> serde_json::Value {
    json!({
        "format": "mixq.eval-report",
        "version": 1,
        "model": model.name(),
        "data": data.name,
        "config": config,
        "fp32": fp32,
        "quantized": q,
        "size": size,
    })
}

pub(crate) fn metrics_row(label: String, r: &Metrics, size: &SizeReport) -> Vec<String> {
    vec![
        label,
        format!("{:.2}", size.avg_bits),
        bytes(size.total_bytes),
        r.accuracy.map(|a| format!("{:.2} %", 100.0 * a)).unwrap_or_else(|| "—".into()),
        format!("{:.4}", r.loss),
        format!("{:.2e}", r.kl),
        format!("{:.2} %", 100.0 * r.agreement),
    ]
}

pub(crate) fn metrics_table() -> Table {
    Table::new(&["weights", "bits/w", "size", "accuracy", "loss", "KL(FP32‖Q)", "agreement"], &[false, true, true, true, true, true, true])
}

fn eval_cmd(a: EvalArgs) -> Result<()> {
    let config = QuantConfig::load(&a.config)?;
    let (model, data) = load(&a.model)?;
    let plan = config.resolve(model.as_ref()).with_context(|| format!("config {}", a.config.display()))?;
    let reference = Reference::compute(model.as_ref(), &data)?;
    let fp32 = eval::evaluate(model.as_ref(), &data, &reference)?;
    let fp32_size = eval::model_size(model.as_ref(), &QuantConfig::uniform(LayerSetting::default()).resolve(model.as_ref())?);
    let (q, size) = eval::evaluate_config(model.as_ref(), &data, &reference, &config)?;
    let kernels = if a.kernels {
        Some(
            eval::kernels::evaluate_config_kernels(model.as_ref(), &data, &reference, &config).context("evaluating through the kernels")?.0,
        )
    } else {
        None
    };
    let mut report = report_json(model.as_ref(), &data, &a.config.display().to_string(), &fp32, &q, &size);
    if let Some(k) = &kernels {
        report["kernels"] = serde_json::to_value(k)?;
    }
    if let Some(out) = &a.output {
        crate::util::write_atomic(out, format!("{}\n", serde_json::to_string_pretty(&report)?).as_bytes())?;
    }
    if a.json {
        println!("{}", serde_json::to_string_pretty(&report)?);
        return Ok(());
    }
    println!("{} on {} ({} samples), config {}", model.name(), data.name, data.len(), a.config.display());
    let mut header = vec!["layer", "weight", "activation", "from"];
    if kernels.is_some() {
        header.push("runs on (--kernels)");
    }
    let mut t = Table::new(&header, &vec![false; header.len()]);
    for (i, r) in plan.iter().enumerate() {
        let mut row = vec![
            r.layer.name.clone(),
            r.weight.to_string(),
            r.activation.map(|f| f.to_string()).unwrap_or_else(|| "—".into()),
            r.source.clone(),
        ];
        if let Some(k) = &kernels {
            row.push(k.layers.get(i).map(|l| l.path.to_string()).unwrap_or_default());
        }
        t.row(row);
    }
    print!("{}", t.render("  "));
    println!();
    let mut m = metrics_table();
    m.row(metrics_row("fp32".into(), &fp32, &fp32_size));
    m.row(metrics_row(if kernels.is_some() { "config (fake quant)".into() } else { "config".into() }, &q, &size));
    if let Some(k) = &kernels {
        m.row(metrics_row("config (kernels)".into(), &k.report, &size));
    }
    print!("{}", m.render("  "));
    if let Some(k) = &kernels {
        println!(
            "kernels vs fake quantization: max |Δlogit| {:.2e} (largest |logit| {:.2}), same top-1 on {:.2} % of samples",
            k.max_abs_diff_vs_fake,
            k.max_abs_logit,
            100.0 * k.agreement_vs_fake
        );
    }
    if let Some(out) = &a.output {
        println!("report written to {}", out.display());
    }
    Ok(())
}

fn formats() -> Result<()> {
    let shape = [4096i64, 4096];
    let mut t = Table::new(
        &["format", "bits", "per-channel bits/w", "group:32 bits/w", "default scale (group:32)"],
        &[false, true, true, true, false],
    );
    for f in Format::all() {
        let ch = QuantSpec::new(f, Granularity::PerChannel);
        let g = QuantSpec::new(f, Granularity::PerGroup(32));
        t.row(vec![
            f.to_string(),
            f.bits().to_string(),
            format!("{:.3}", ch.effective_bits(&shape)),
            if f.is_keep() { "—".into() } else { format!("{:.3}", g.effective_bits(&shape)) },
            if f.is_keep() { "—".into() } else { g.scale.to_string() },
        ]);
    }
    println!("Storage per weight of a 4096×4096 layer, scales and zero points included:");
    print!("{}", t.render("  "));
    Ok(())
}

fn demo(a: DemoArgs) -> Result<()> {
    let granularity: Granularity = a.granularity.parse()?;
    let args = ModelArgs { model: model::zoo::DEFAULT.to_string(), data: "digits:test".to_string() };
    let (model, data) = load(&args)?;
    let params: i64 = model.layers().iter().map(|l| l.params).sum();
    println!("mixq demo: {} on the UCI digits test split ({} samples)", model.name(), data.len());
    println!();
    println!("{} quantizable layers, {} weights:", model.layers().len(), thousands(params));
    print!("{}", layers_table(model.as_ref()));
    println!();
    let reference = Reference::compute(model.as_ref(), &data)?;
    let fp32 = eval::evaluate(model.as_ref(), &data, &reference)?;
    println!("FP32: accuracy {:.2} %, loss {:.4}", 100.0 * fp32.accuracy.unwrap_or(f64::NAN), fp32.loss);
    println!();
    let formats: Vec<Format> = Format::all();
    let bar = progress::bar(formats.len() as u64, "uniform baselines");
    let mut rows = Vec::new();
    for f in formats {
        bar.set_message(f.to_string());
        let setting = LayerSetting::weight(QuantSpec::new(f, if f.is_keep() { Granularity::PerTensor } else { granularity }));
        let (r, size) = eval::evaluate_config(model.as_ref(), &data, &reference, &QuantConfig::uniform(setting))
            .with_context(|| format!("uniform {f}"))?;
        rows.push(metrics_row(f.to_string(), &r, &size));
        bar.inc(1);
    }
    bar.finish_and_clear();
    println!("Uniform baselines: every layer's weights in one format ({granularity} scales, min–max ranges), vs FP32:");
    let mut t = metrics_table();
    for r in rows {
        t.row(r);
    }
    print!("{}", t.render("  "));
    Ok(())
}
