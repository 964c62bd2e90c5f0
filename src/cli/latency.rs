//! `mixq latency`: a measured latency table, layer × format → µs, for latency budgets
//! (`mixq allocate --latency FILE --budget latency=…`); what is timed and what is left out:
//! [`crate::pipeline::latency`].

use super::args::ModelArgs;
use super::table::{thousands, Table};
use crate::cost::parse_candidates;
use crate::pipeline::latency::{gemm_layers, latency_table, LatencySettings, DEFAULT_FORMATS};
use crate::quant::QuantSpec;
use anyhow::{bail, Context, Result};
use clap::Args;
use mixq_kernels::TimingOptions;
use std::path::PathBuf;

/// `mixq latency`.
#[derive(Args, Debug)]
pub struct LatencyArgs {
    #[command(flatten)]
    model: ModelArgs,
    /// Formats to time, comma-separated labels as in `mixq allocate --formats`: int4, int4-asym,
    /// int8, int8-asym, fp8-e4m3, fp4-e2m1 (kernels; any `/group:N`), fp32 (libtorch).
    #[arg(long, default_value = DEFAULT_FORMATS)]
    formats: String,
    /// Samples per forward pass: a layer's GEMM has batch × (output pixels) rows.
    #[arg(long, default_value_t = 1)]
    batch: usize,
    /// Timed runs per layer and format (the median is written).
    #[arg(long, default_value_t = 15)]
    reps: usize,
    /// Untimed runs first.
    #[arg(long, default_value_t = 3)]
    warmup: usize,
    /// Seed of the random weights and activations.
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Write the table here (CSV `layer,format,latency_us`), atomically.
    #[arg(short, long)]
    output: PathBuf,
}

/// Runs `mixq latency`.
pub fn run(a: LatencyArgs) -> Result<()> {
    let specs = parse_candidates(&a.formats).context("--formats")?;
    crate::pipeline::latency::check_timeable(&specs).context("--formats")?;
    if a.batch == 0 || a.reps == 0 {
        bail!("--batch and --reps must be at least 1");
    }
    let (model, _) = super::args::load(&a.model, "test")?;
    let (layers, skipped) = gemm_layers(model.as_ref());
    for l in &skipped {
        tracing::warn!(layer = %l.name, "no GEMM to time ({} layer, {} MACs per sample); left out of the table", l.kind, l.macs);
        eprintln!("warning: layer `{}` ({}, {} MACs per sample) has no GEMM to time; left out", l.name, l.kind, l.macs);
    }
    let settings = LatencySettings { specs, batch: a.batch, timing: TimingOptions { warmup: a.warmup, repeats: a.reps, seed: a.seed } };
    let bar = super::progress::bar((layers.len() * settings.specs.len()) as u64, "timing");
    let run = latency_table(model.name(), layers, &settings, &mut |info, label| {
        bar.set_message(format!("{} {label}", info.name));
        bar.inc(1);
    })?;
    bar.finish_and_clear();
    crate::util::write_atomic(&a.output, run.csv.as_bytes())?;

    let specs = &settings.specs;
    println!("{}: GEMM latency per layer at batch {} (median of {} runs, µs)", model.name(), a.batch, a.reps);
    let mut header: Vec<String> = vec!["layer".into(), "kind".into(), "N × K".into(), "M".into()];
    header.extend(specs.iter().map(QuantSpec::label));
    let header_refs: Vec<&str> = header.iter().map(String::as_str).collect();
    let mut right = vec![false, false, true, true];
    right.extend(specs.iter().map(|_| true));
    let mut t = Table::new(&header_refs, &right);
    let mut totals = vec![Some(0.0f64); specs.len()];
    for ((info, g), line) in run.layers.iter().zip(&run.grid) {
        let mut cells =
            vec![info.name.clone(), info.kind.to_string(), format!("{} × {}", g.n, g.k), thousands((g.m_per_sample * a.batch) as i64)];
        for (i, us) in line.iter().enumerate() {
            cells.push(us.map(|u| format!("{u:.1}")).unwrap_or_else(|| "—".into()));
            totals[i] = match (totals[i], us) {
                (Some(t), Some(u)) => Some(t + u),
                _ => None,
            };
        }
        t.row(cells);
    }
    let mut cells = vec!["total (uniform)".to_string(), String::new(), String::new(), String::new()];
    cells.extend(totals.iter().map(|t| t.map(|u| format!("{u:.1}")).unwrap_or_else(|| "—".into())));
    t.row(cells);
    print!("{}", t.render("  "));
    println!("latency table written to {} ({} entries)", a.output.display(), run.rows.len());
    Ok(())
}
