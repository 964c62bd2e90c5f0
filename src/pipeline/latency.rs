//! A measured latency table, layer × format → µs, for latency budgets.
//!
//! Every quantizable layer is one GEMM `y[M, N] = x[M, K] · Wᵀ`: a linear layer with `N` outputs
//! and `K` inputs, a convolution through im2col with `N` = output channels, `K` = in/groups·kh·kw
//! and `M` = batch · output pixels. `M` per sample comes from the layer table's MACs
//! (MACs = M·N·K), so it holds for any model mixq can load, TorchScript included. Each shape is
//! timed under each candidate format with the `mixq-kernels` CPU kernels on random weights of the
//! layer's shape and group size (the values do not change the time), FP32 with libtorch's
//! `linear`; the median of the repeats after the warm-up runs is written.
//!
//! What the table leaves out: im2col itself (a convolution's patch copy), biases, activations and
//! everything between layers; embedding lookups (no GEMM) are left out. Scale type and clipping
//! do not change a kernel's work, so `int4` and `int4/channel/f32/mse` time the same.

use crate::cost::LatencyTable;
use crate::error::{Error, Result};
use crate::eval::kernels::{kernel_group, weight_format, KERNEL_FORMATS};
use crate::model::{LayerInfo, LayerKind, QuantModel};
use crate::quant::{out_inner, Format, QuantSpec};
use mixq_kernels::timing::time_shape_fp32_libtorch;
use mixq_kernels::{time_shape, TimingOptions};
use std::path::Path;

/// The candidate formats timed when none are given.
pub const DEFAULT_FORMATS: &str = "int4,int8,fp8-e4m3,fp32";

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
            return Err(Error::invalid(
                "format",
                s.label(),
                format!(
                    "cannot be timed: the kernels run {KERNEL_FORMATS} (with any granularity), and fp32 is timed with libtorch; \
                     choose formats among those (e.g. {DEFAULT_FORMATS})"
                ),
            ));
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
            return Err(Error::invalid("format", spec.label(), format!("no kernel (the kernels run {KERNEL_FORMATS})")));
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
    /// Format label ([`QuantSpec::label`]), as the cost table names it.
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

/// What to time.
#[derive(Debug, Clone)]
pub struct LatencySettings {
    /// The formats.
    pub specs: Vec<QuantSpec>,
    /// Samples per forward pass (a layer's GEMM has batch × rows per sample rows).
    pub batch: usize,
    /// Warm-up runs, timed repeats, seed.
    pub timing: TimingOptions,
}

/// The layers of `model` that run a GEMM, with their shapes, and those that do not (left out of
/// a latency table).
pub fn gemm_layers(model: &dyn QuantModel) -> (Vec<(LayerInfo, GemmShape)>, Vec<LayerInfo>) {
    let (mut timed, mut skipped) = (Vec::new(), Vec::new());
    for l in model.layers() {
        match gemm_shape(l) {
            Some(g) => timed.push((l.clone(), g)),
            None => skipped.push(l.clone()),
        }
    }
    (timed, skipped)
}

/// A timed table.
#[derive(Debug, Clone)]
pub struct LatencyRun {
    /// The timed layers and their GEMM shapes.
    pub layers: Vec<(LayerInfo, GemmShape)>,
    /// µs per (layer, spec index); None where the spec does not fit the layer.
    pub grid: Vec<Vec<Option<f64>>>,
    /// The entries, layer by layer.
    pub rows: Vec<LatencyRow>,
    /// The CSV (checked to read back as a [`LatencyTable`]).
    pub csv: String,
}

/// Times every layer of `layers` (see [`gemm_layers`]) under every spec of `settings`;
/// `progress` sees each (layer, format label) before it is timed. `model_name` goes into the
/// CSV's comment lines.
pub fn latency_table(
    model_name: &str,
    layers: Vec<(LayerInfo, GemmShape)>,
    settings: &LatencySettings,
    progress: &mut dyn FnMut(&LayerInfo, &str),
) -> Result<LatencyRun> {
    check_timeable(&settings.specs)?;
    if settings.batch == 0 || settings.timing.repeats == 0 {
        return Err(Error::invalid("latency settings", "0", "the batch and the number of timed runs must be at least 1"));
    }
    if layers.is_empty() {
        return Err(Error::Model { model: model_name.to_string(), msg: "no layer with a GEMM to time".into() });
    }
    let specs = &settings.specs;
    let mut grid: Vec<Vec<Option<f64>>> = vec![vec![None; specs.len()]; layers.len()];
    // The kernels' formats first, then fp32: libtorch's OpenMP workers spin after each op and
    // would take the CPU from the kernels' rayon workers timed right after them.
    let mut order: Vec<usize> = (0..specs.len()).collect();
    order.sort_by_key(|&i| specs[i].format == Format::Fp32);
    for &si in &order {
        let spec = &specs[si];
        let label = spec.label();
        for ((info, g), line) in layers.iter().zip(grid.iter_mut()) {
            progress(info, &label);
            if spec.check_fits(&info.name, &info.shape).is_ok() {
                let rows = g.m_per_sample * settings.batch;
                let us = time_layer(*g, rows, spec, settings.timing)
                    .map_err(|e| e.context(format!("timing layer `{}` as {label} (N {} × K {}, M {rows})", info.name, g.n, g.k)))?;
                line[si] = Some(us);
            }
        }
    }
    let mut rows = Vec::new();
    for ((info, _), line) in layers.iter().zip(&grid) {
        for (spec, us) in specs.iter().zip(line) {
            if let Some(us) = us {
                rows.push(LatencyRow { layer: info.name.clone(), format: spec.label(), latency_us: *us });
            }
        }
    }
    let t = &settings.timing;
    let comments = vec![
        format!(
            "mixq latency: model {model_name}, batch {}, median of {} runs after {} warm-up runs, seed {}",
            settings.batch, t.repeats, t.warmup, t.seed
        ),
        format!(
            "kernels: mixq-kernels ({} on this CPU), fp32: libtorch linear; one GEMM per layer (convolutions as im2col GEMMs, im2col not timed)",
            if mixq_kernels::isa_available(mixq_kernels::Isa::Avx2) { "AVX2" } else { "scalar" }
        ),
    ];
    let csv = to_csv(&rows, &comments);
    // What a latency budget reads: check it before anyone writes it.
    LatencyTable::from_csv(&csv, Path::new("<latency table>"))?;
    Ok(LatencyRun { layers, grid, rows, csv })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cost::parse_candidates;
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

    #[test]
    fn a_small_table_has_every_fitting_entry() {
        let m = DigitsResNet::untrained();
        let (layers, skipped) = gemm_layers(&m);
        assert!(skipped.is_empty());
        let layers: Vec<_> = layers.into_iter().filter(|(l, _)| l.name == "fc").collect();
        let settings = LatencySettings {
            specs: parse_candidates("int8,fp32").unwrap(),
            batch: 1,
            timing: TimingOptions { warmup: 0, repeats: 1, seed: 0 },
        };
        let mut seen = Vec::new();
        let run = latency_table("digits-resnet", layers, &settings, &mut |l, f| seen.push(format!("{} {f}", l.name))).unwrap();
        assert_eq!(seen, ["fc int8", "fc fp32"]);
        assert_eq!(run.rows.len(), 2);
        assert!(run.rows.iter().all(|r| r.latency_us > 0.0 && r.layer == "fc"));
        assert!(run.csv.starts_with("# mixq latency: model digits-resnet"));
    }
}
