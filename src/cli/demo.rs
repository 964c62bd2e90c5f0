//! `mixq demo`: the built-in digits CNN, its layers, and every format as a uniform baseline.

use super::args::ModelArgs;
use super::render::{layers_table, metrics_row, metrics_table};
use super::table::thousands;
use crate::eval::{self, Reference};
use crate::model;
use crate::pipeline::evaluate::uniform_baselines;
use crate::quant::{Format, Granularity, QuantSpec};
use anyhow::{Context, Result};
use clap::Args;

/// `mixq demo`.
#[derive(Args, Debug)]
pub struct DemoArgs {
    /// Granularity of the uniform baselines.
    #[arg(long, default_value = "channel")]
    granularity: String,
}

/// Runs `mixq demo`.
pub fn run(a: DemoArgs) -> Result<()> {
    let granularity: Granularity = a.granularity.parse()?;
    let args = ModelArgs { model: model::zoo::DEFAULT.to_string(), data: Some("digits:test".to_string()) };
    let (model, data) = super::args::load(&args, "test")?;
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
    let specs: Vec<QuantSpec> =
        Format::all().into_iter().map(|f| QuantSpec::new(f, if f.is_keep() { Granularity::PerTensor } else { granularity })).collect();
    let bar = super::progress::bar(specs.len() as u64, "uniform baselines");
    let results = uniform_baselines(model.as_ref(), &data, &reference, &specs, &mut |s| {
        bar.set_message(s.format.to_string());
        bar.inc(1);
    });
    bar.finish_and_clear();
    println!("Uniform baselines: every layer's weights in one format ({granularity} scales, min–max ranges), vs FP32:");
    let mut t = metrics_table();
    for (spec, r) in specs.iter().zip(results) {
        let (m, size) = r.with_context(|| format!("uniform {}", spec.format))?;
        t.row(metrics_row(spec.format.to_string(), &m, &size));
    }
    print!("{}", t.render("  "));
    Ok(())
}
