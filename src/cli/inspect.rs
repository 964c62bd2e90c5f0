//! `mixq layers`, `mixq formats`, `mixq synthetic`: what a model, the formats and a synthetic
//! cost table look like.

use super::args::ModelArgs;
use super::table::{thousands, Table};
use crate::quant::{Format, Granularity, QuantSpec};
use anyhow::Result;
use clap::Args;
use serde_json::json;
use std::path::PathBuf;

/// `mixq layers`.
#[derive(Args, Debug)]
pub struct LayersArgs {
    #[command(flatten)]
    model: ModelArgs,
    /// Print JSON instead of a table.
    #[arg(long)]
    json: bool,
}

/// Runs `mixq layers`.
pub fn layers(a: LayersArgs) -> Result<()> {
    let (model, _) = super::args::load(&a.model, "test")?;
    if a.json {
        println!("{}", serde_json::to_string_pretty(&json!({"model": model.name(), "layers": model.layers()}))?);
    } else {
        let params: i64 = model.layers().iter().map(|l| l.params).sum();
        println!("{}: {} quantizable layers, {} weights", model.name(), model.layers().len(), thousands(params));
        print!("{}", super::render::layers_table(model.as_ref()));
    }
    Ok(())
}

/// Runs `mixq formats`.
pub fn formats() -> Result<()> {
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

/// Runs `mixq synthetic`.
pub fn synthetic(a: SyntheticArgs) -> Result<()> {
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
