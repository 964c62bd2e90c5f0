//! The `mixq` command line: one subcommand per stage, plus `search` (the whole pipeline) and
//! `demo`. The binary's `main` only parses arguments and calls [`run`]; every subcommand parses
//! its flags into the library's types, calls one function of [`crate::pipeline`] (or of a stage)
//! and prints what it returns.

pub mod allocate;
pub mod args;
pub mod demo;
pub mod eval;
pub mod export;
pub mod inspect;
pub mod latency;
pub mod pareto;
pub mod progress;
pub mod render;
pub mod search;
pub mod sensitivity;
pub mod table;

use anyhow::Result;
use clap::{Parser, Subcommand};

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
    Layers(inspect::LayersArgs),
    /// Evaluate a quant config: accuracy, loss, KL and top-1 agreement vs FP32, and size.
    Eval(eval::EvalArgs),
    /// List the number formats with their storage cost per weight.
    Formats,
    /// Run the demo: the built-in digits CNN, its layers, and uniform baselines for every format.
    Demo(demo::DemoArgs),
    /// Per-layer sensitivity: Hessian traces with confidence intervals, eigenvalues, proxies.
    Sensitivity(sensitivity::SensitivityArgs),
    /// Choose a format per layer: minimal predicted loss within budgets → QuantConfig.
    Allocate(allocate::AllocateArgs),
    /// Sweep a budget and write the predicted Pareto front (CSV, SVG).
    Pareto(pareto::ParetoArgs),
    /// Write a seeded synthetic cost table (solver benchmarks, the PuLP comparison).
    Synthetic(inspect::SyntheticArgs),
    /// The whole pipeline: sensitivity → allocation under budgets → config → evaluation of the
    /// mixed model beside uniform baselines.
    Search(search::SearchArgs),
    /// Time every layer's GEMM under candidate formats with the low-bit kernels → latency CSV
    /// for `allocate --latency`.
    Latency(latency::LatencyArgs),
    /// Write a config for a deployment tool: llama.cpp's llama-quantize, compressed-tensors, or JSON.
    Export(export::ExportArgs),
}

/// Runs a parsed command line.
pub fn run(cli: Cli) -> Result<()> {
    init_logging(cli.verbose);
    match cli.command {
        Command::Layers(a) => inspect::layers(a),
        Command::Eval(a) => eval::run(a),
        Command::Formats => inspect::formats(),
        Command::Demo(a) => demo::run(a),
        Command::Sensitivity(a) => sensitivity::run(a),
        Command::Allocate(a) => allocate::run(a),
        Command::Pareto(a) => pareto::run(a),
        Command::Search(a) => search::run(a),
        Command::Synthetic(a) => inspect::synthetic(a),
        Command::Latency(a) => latency::run(a),
        Command::Export(a) => export::run(a),
    }
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
