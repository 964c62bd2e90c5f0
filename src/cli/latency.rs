//! `mixq latency`: a measured latency table, layer × format → µs, for latency budgets
//! (`mixq allocate --latency FILE --budget latency=…`).
//!
//! Every quantizable layer is one GEMM `y[M, N] = x[M, K] · Wᵀ`: a linear layer with `N` outputs
//! and `K` inputs, a convolution through im2col with `N` = output channels, `K` = in/groups·kh·kw
//! and `M` = batch · output pixels. `M` per sample comes from the layer table's MACs
//! (MACs = M·N·K), so it holds for any model mixq can load, TorchScript included. Each shape is
//! timed under each candidate format with the `mixq-kernels` CPU kernels on random weights of the
//! layer's shape and group size (the values do not change the time), FP32 with libtorch's
//! `linear`; the median of `--reps` runs after `--warmup` runs is written.
//!
//! What the table leaves out: im2col itself (a convolution's patch copy), biases, activations and
//! everything between layers; embedding lookups (no GEMM) are skipped with a warning. Scale type
//! and clipping do not change a kernel's work, so `int4` and `int4/channel/f32/mse` time the same.

use super::progress;
use super::table::{thousands, Table};
use super::ModelArgs;
use crate::cost::{parse_candidates, spec_label, LatencyTable};
use crate::eval::kernels::{kernel_group, weight_format, KERNEL_FORMATS};
use crate::model::{LayerInfo, LayerKind};
use crate::quant::{out_inner, Format, QuantSpec};
use anyhow::{bail, Context, Result};
use clap::Args;
use mixq_kernels::timing::time_shape_fp32_libtorch;
use mixq_kernels::{time_shape, TimingOptions};
use std::path::PathBuf;

/// The candidate formats timed when `--formats` is not given.
pub const DEFAULT_FORMATS: &str = "int4,int8,fp8-e4m3,fp32";

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

/// A layer's GEMM shape: `n` outputs, `k` inputs, `m` rows per sample.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct GemmShape {
    /// Output features / channels.
    pub n: usize,
    /// Inner dimension (in/groups·kh·kw for a convolution).
    pub k: usize,
    /// Rows per sample: 1 for a linear layer on a vector, output pixels for a convolution.
    pub m_per_sample: usize,
}

/// The GEMM a layer runs, or `None` for layers without one (embeddings; layers with 0 MACs, whose
/// use the layer discovery did not see).
pub fn gemm_shape(info: &LayerInfo) -> Option<GemmShape> {
    if info.kind == LayerKind::Embedding || info.macs <= 0 || info.params <= 0 {
        return None;
    }
    let (n, k) = out_inner(&info.shape);
    let m = (info.macs as f64 / info.params as f64).round().max(1.0) as usize;
    Some(GemmShape { n: n as usize, k: k as usize, m_per_sample: m })
}

/// Checks that every spec can be timed: a kernels format or fp32.
pub fn check_timeable(specs: &[QuantSpec]) -> Result<()> {
    for s in specs {
        if s.format != Format::Fp32 && weight_format(s.format).is_none() {
            bail!(
                "format `{}` cannot be timed: the kernels run {KERNEL_FORMATS} (with any granularity), and fp32 is timed with \
                 libtorch; pass --formats with those (e.g. {DEFAULT_FORMATS})",
                spec_label(s)
            );
        }
    }
    Ok(())
}

/// Median latency in µs of one layer's GEMM at `rows` rows under `spec`.
pub fn time_layer(shape: GemmShape, rows: usize, spec: &QuantSpec, opts: TimingOptions) -> Result<f64> {
    let t = if spec.format == Format::Fp32 {
        time_shape_fp32_libtorch(shape.n, shape.k, rows, opts)?
    } else {
        let Some(wf) = weight_format(spec.format) else {
            bail!("format `{}` has no kernel (the kernels run {KERNEL_FORMATS})", spec_label(spec))
        };
        time_shape(shape.n, shape.k, wf, kernel_group(spec.granularity, shape.k), rows, opts)?
    };
    Ok(t.median_s * 1e6)
}

/// One measured entry.
#[derive(Debug, Clone, PartialEq)]
pub struct LatencyRow {
    /// Layer name.
    pub layer: String,
    /// Format label ([`spec_label`]), as the cost table names it.
    pub format: String,
    /// Median latency in µs.
    pub latency_us: f64,
}

/// The CSV `layer,format,latency_us` that [`LatencyTable::from_csv`] reads, with `comments` as
/// leading `#` lines.
pub fn to_csv(rows: &[LatencyRow], comments: &[String]) -> String {
    let mut s = String::new();
    for c in comments {
        s.push_str(&format!("# {c}\n"));
    }
    s.push_str("layer,format,latency_us\n");
    for r in rows {
        s.push_str(&format!("{},{},{:.3}\n", r.layer, r.format, r.latency_us));
    }
    s
}

/// Runs `mixq latency`.
pub fn run(a: LatencyArgs) -> Result<()> {
    let specs = parse_candidates(&a.formats)?;
    check_timeable(&specs)?;
    if a.batch == 0 || a.reps == 0 {
        bail!("--batch and --reps must be at least 1");
    }
    let (model, _) = super::load(&a.model)?;
    let opts = TimingOptions { warmup: a.warmup, repeats: a.reps, seed: a.seed };
    let layers: Vec<(&LayerInfo, GemmShape)> = model
        .layers()
        .iter()
        .filter_map(|l| match gemm_shape(l) {
            Some(g) => Some((l, g)),
            None => {
                tracing::warn!(layer = %l.name, "no GEMM to time ({} layer, {} MACs per sample); left out of the table", l.kind, l.macs);
                eprintln!("warning: layer `{}` ({}, {} MACs per sample) has no GEMM to time; left out", l.name, l.kind, l.macs);
                None
            }
        })
        .collect();
    if layers.is_empty() {
        bail!("model `{}` has no layer with a GEMM to time", model.name());
    }
    let bar = progress::bar((layers.len() * specs.len()) as u64, "timing");
    // µs per (layer, spec index); None where the spec does not fit the layer.
    let mut grid: Vec<Vec<Option<f64>>> = vec![vec![None; specs.len()]; layers.len()];
    // The kernels' formats first, then fp32: libtorch's OpenMP workers spin after each op and
    // would take the CPU from the kernels' rayon workers timed right after them.
    let mut order: Vec<usize> = (0..specs.len()).collect();
    order.sort_by_key(|&i| specs[i].format == Format::Fp32);
    for &si in &order {
        let spec = &specs[si];
        let label = spec_label(spec);
        for ((info, g), line) in layers.iter().zip(grid.iter_mut()) {
            bar.set_message(format!("{} {label}", info.name));
            if spec.check_fits(&info.name, &info.shape).is_ok() {
                let rows = g.m_per_sample * a.batch;
                let us = time_layer(*g, rows, spec, opts)
                    .with_context(|| format!("timing layer `{}` as {label} (N {} × K {}, M {rows})", info.name, g.n, g.k))?;
                line[si] = Some(us);
            }
            bar.inc(1);
        }
    }
    bar.finish_and_clear();
    let mut rows = Vec::new();
    for ((info, _), line) in layers.iter().zip(&grid) {
        for (spec, us) in specs.iter().zip(line) {
            if let Some(us) = us {
                rows.push(LatencyRow { layer: info.name.clone(), format: spec_label(spec), latency_us: *us });
            }
        }
    }
    let comments = vec![
        format!("mixq latency: model {}, batch {}, median of {} runs after {} warm-up runs, seed {}", model.name(), a.batch, a.reps, a.warmup, a.seed),
        format!(
            "kernels: mixq-kernels ({} on this CPU), fp32: libtorch linear; one GEMM per layer (convolutions as im2col GEMMs, im2col not timed)",
            if mixq_kernels::isa_available(mixq_kernels::Isa::Avx2) { "AVX2" } else { "scalar" }
        ),
    ];
    let csv = to_csv(&rows, &comments);
    // What `mixq allocate --latency` reads: check before writing.
    LatencyTable::from_csv(&csv, &a.output)?;
    crate::util::write_atomic(&a.output, csv.as_bytes())?;

    println!("{}: GEMM latency per layer at batch {} (median of {} runs, µs)", model.name(), a.batch, a.reps);
    let mut header: Vec<String> = vec!["layer".into(), "kind".into(), "N × K".into(), "M".into()];
    header.extend(specs.iter().map(spec_label));
    let header_refs: Vec<&str> = header.iter().map(String::as_str).collect();
    let mut right = vec![false, false, true, true];
    right.extend(specs.iter().map(|_| true));
    let mut t = Table::new(&header_refs, &right);
    let mut totals = vec![Some(0.0f64); specs.len()];
    for ((info, g), line) in layers.iter().zip(&grid) {
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
    println!("latency table written to {} ({} entries)", a.output.display(), rows.len());
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::zoo::DigitsResNet;
    use crate::model::QuantModel;

    #[test]
    fn gemm_shapes_of_the_zoo_model() {
        let m = DigitsResNet::untrained();
        let stem = gemm_shape(m.layer("stem.conv").unwrap()).unwrap();
        assert_eq!(stem, GemmShape { n: 32, k: 9, m_per_sample: 64 });
        let down = gemm_shape(m.layer("layer2.0.downsample.0").unwrap()).unwrap();
        assert_eq!(down, GemmShape { n: 64, k: 32, m_per_sample: 16 });
        let fc = gemm_shape(m.layer("fc").unwrap()).unwrap();
        assert_eq!(fc, GemmShape { n: 10, k: 128, m_per_sample: 1 });
    }

    #[test]
    fn untimeable_formats_are_named() {
        let err = check_timeable(&parse_candidates("int4,int3,fp32").unwrap()).unwrap_err().to_string();
        assert!(err.contains("`int3`") && err.contains("fp8-e4m3") && err.contains("fp32"), "{err}");
        check_timeable(&parse_candidates("int4/group:32,int8-asym,fp4-e2m1/group:32,fp32").unwrap()).unwrap();
    }

    #[test]
    fn csv_round_trips_through_the_latency_reader() {
        let rows = vec![
            LatencyRow { layer: "fc".into(), format: "int4/group:32".into(), latency_us: 1.25 },
            LatencyRow { layer: "fc".into(), format: "fp32".into(), latency_us: 3.0 },
        ];
        let csv = to_csv(&rows, &["made by a test".into()]);
        let t = LatencyTable::from_csv(&csv, std::path::Path::new("test.csv")).unwrap();
        assert_eq!(t.entries[&("fc".to_string(), "int4/group:32".to_string())], 1.25);
        assert_eq!(t.entries[&("fc".to_string(), "fp32".to_string())], 3.0);
    }
}
