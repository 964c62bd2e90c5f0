//! `mixq eval`: a config applied to a model and measured against FP32 (optionally through the
//! low-bit kernels) → the `mixq.eval-report` JSON and a table.

use super::args::ModelArgs;
use super::render::{metrics_row, metrics_table_for};
use super::table::Table;
use crate::config::QuantConfig;
use crate::pipeline::evaluate::evaluate;
use anyhow::Result;
use clap::Args;
use std::path::PathBuf;

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

/// Runs `mixq eval`.
pub fn run(a: EvalArgs) -> Result<()> {
    let config = QuantConfig::load(&a.config)?;
    let (model, data) = super::args::load(&a.model, "test")?;
    let ev = evaluate(model.as_ref(), &data, &config, &a.config.display().to_string(), a.kernels)?;
    let report = &ev.report;
    if let Some(out) = &a.output {
        report.save(out)?;
    }
    if a.json {
        println!("{}", report.to_json());
        return Ok(());
    }
    let kernels = report.kernels.as_ref();
    println!("{} on {} ({} samples), config {}", model.name(), data.name, data.len(), a.config.display());
    let mut header = vec!["layer", "weight", "activation", "from"];
    if kernels.is_some() {
        header.push("runs on (--kernels)");
    }
    let mut t = Table::new(&header, &vec![false; header.len()]);
    for (i, r) in ev.plan.iter().enumerate() {
        let mut row = vec![
            r.layer.name.clone(),
            r.weight.to_string(),
            r.activation.map(|f| f.to_string()).unwrap_or_else(|| "—".into()),
            r.source.clone(),
        ];
        if let Some(k) = kernels {
            row.push(k.layers.get(i).map(|l| l.path.to_string()).unwrap_or_default());
        }
        t.row(row);
    }
    print!("{}", t.render("  "));
    println!();
    let mut m = metrics_table_for(model.output_kind());
    m.row(metrics_row("fp32".into(), &report.fp32, &ev.fp32_size));
    m.row(metrics_row(if kernels.is_some() { "config (fake quant)".into() } else { "config".into() }, &report.quantized, &report.size));
    if let Some(k) = kernels {
        m.row(metrics_row("config (kernels)".into(), &k.report, &report.size));
    }
    print!("{}", m.render("  "));
    if let Some(k) = kernels {
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
