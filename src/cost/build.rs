//! Building a [`CostTable`] from a model and a sensitivity report.

use super::{CostOption, CostTable, LayerCosts};
use crate::error::{Error, Result};
use crate::model::data::Dataset;
use crate::model::QuantModel;
use crate::quant::{fake_quantize, fake_quantize_activation, Format, Granularity, QuantSpec};
use crate::sensitivity::activation::InputHooks;
use crate::sensitivity::report::{LayerSensitivity, SensitivityReport};
use std::cell::RefCell;
use std::collections::HashMap;
use std::path::Path;
use std::str::FromStr;
use tch::{Kind, Tensor};

/// Which predicted loss increase Ω a cost table uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Proxy {
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

impl std::fmt::Display for Proxy {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Proxy::Hessian => "hessian",
            Proxy::Measured => "measured",
            Proxy::Fisher => "fisher",
            Proxy::WeightError => "weight-error",
        })
    }
}

/// Measured latencies: (layer, format label) → microseconds, from a CSV `layer,format,latency_us`.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct LatencyTable {
    /// (layer, format label) → µs.
    pub entries: HashMap<(String, String), f64>,
}

impl LatencyTable {
    /// Reads a latency CSV (header `layer,format,latency_us`, in any column order).
    pub fn load(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
        Self::from_csv(&text, path)
    }

    /// Parses a latency CSV; `origin` names the file in errors.
    pub fn from_csv(text: &str, origin: &Path) -> Result<Self> {
        let rows = super::io::csv_records(text, origin, &["layer", "format", "latency_us"], &[])?;
        let mut entries = HashMap::new();
        for r in rows {
            let t: f64 = r.num("latency_us")?;
            if t < 0.0 {
                return Err(r.err("latency_us", "latency must be ≥ 0"));
            }
            let key = (r.get("layer").to_string(), QuantSpec::canonical_label(r.get("format")));
            if entries.insert(key, t).is_some() {
                return Err(r.err("format", "this layer and format appear twice"));
            }
        }
        Ok(LatencyTable { entries })
    }
}

/// How a cost table is built.
#[derive(Debug, Clone, PartialEq)]
pub struct BuildOptions {
    /// The objective.
    pub proxy: Proxy,
    /// Activation bits in BOPs (32 unless activations are quantized); unused with `activations`.
    pub activation_bits: u32,
    /// Search activation formats too: each layer's options become (weight, activation) pairs
    /// labelled `WEIGHT@ACT` ([`pair_label`]), Ω gains (Tr(H_a)/n_a)·E‖Q_a(a) − a‖² (needs the
    /// report's activation traces) and BOPs use the activation format's bits.
    pub activations: Option<ActivationErrors>,
    /// Measured latencies, if any.
    pub latency: Option<LatencyTable>,
    /// Robust costs: use each layer's upper confidence bound Tr + z·s.e. (clamped at 0) instead of
    /// the trace (Hessian proxy only; needs `trace_std_err` in the report).
    pub robust_z: Option<f64>,
}

impl Default for BuildOptions {
    fn default() -> Self {
        BuildOptions { proxy: Proxy::Hessian, activation_bits: 32, latency: None, robust_z: None, activations: None }
    }
}

/// The label of a (weight, activation) option: `int4@int8` (weights `int4`, inputs `int8`).
pub fn pair_label(weight_label: &str, activation: Format) -> String {
    format!("{weight_label}@{activation}")
}

/// Activation quantization errors on calibration data: per layer and activation format, the mean
/// per-sample ‖Q_a(a) − a‖² of the layer's input a, with Q_a = [`fake_quantize_activation`] (what
/// evaluation applies; per-sample dynamic scale, so the value does not depend on batching).
#[derive(Debug, Clone, PartialEq)]
pub struct ActivationErrors {
    /// The activation formats, in option order.
    pub formats: Vec<Format>,
    /// Per layer (model order): name and the error of each format.
    pub layers: Vec<(String, Vec<f64>)>,
}

impl ActivationErrors {
    /// Measures the errors of `formats` (fp32: 0) at every quantizable layer's input through the
    /// hooked forward pass over `data`, in batches of `batch_size`.
    pub fn measure(model: &dyn InputHooks, data: &Dataset, formats: &[Format], batch_size: usize) -> Result<Self> {
        if formats.is_empty() {
            return Err(Error::invalid("activation formats", "", "give at least one activation format, e.g. int8,fp32"));
        }
        if data.is_empty() {
            return Err(Error::Data { source_name: data.name.clone(), msg: "no samples: activation errors need calibration data".into() });
        }
        let sums: RefCell<Vec<(String, Vec<f64>)>> =
            RefCell::new(model.layers().iter().map(|l| (l.name.clone(), vec![0.0; formats.len()])).collect());
        let failed: RefCell<Option<Error>> = RefCell::new(None);
        for (x, _) in data.batches(batch_size.max(1)) {
            let hook = |layer: &str, a: &Tensor| -> Result<Tensor> {
                let mut sums = sums.borrow_mut();
                let Some((_, row)) = sums.iter_mut().find(|(n, _)| n == layer) else {
                    return Ok(a.shallow_clone());
                };
                for (acc, &f) in row.iter_mut().zip(formats) {
                    if f != Format::Fp32 {
                        let q = fake_quantize_activation(a, f)?;
                        *acc += (q - a.to_kind(Kind::Float)).f_square()?.f_sum(Kind::Double)?.f_double_value(&[])?;
                    }
                }
                Ok(a.shallow_clone())
            };
            if let Err(e) = tch::no_grad(|| model.forward_with_input_hook(&x, &hook)) {
                *failed.borrow_mut() = Some(e);
                break;
            }
        }
        if let Some(e) = failed.into_inner() {
            return Err(e);
        }
        let n = data.len() as f64;
        let layers = sums.into_inner().into_iter().map(|(name, row)| (name, row.into_iter().map(|v| v / n).collect())).collect();
        Ok(ActivationErrors { formats: formats.to_vec(), layers })
    }

    /// The errors of layer `name`.
    pub fn layer(&self, name: &str) -> Result<&[f64]> {
        self.layers
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.as_slice())
            .ok_or_else(|| Error::invalid("activation errors", name, "no activation errors were measured for this layer (another model?)"))
    }
}

/// Parses a comma-separated activation-format list such as `int8,fp32`.
pub fn parse_activation_formats(list: &str) -> Result<Vec<Format>> {
    let mut out: Vec<Format> = Vec::new();
    for item in list.split(',').map(str::trim).filter(|s| !s.is_empty()) {
        let f: Format = item.parse().map_err(|e: Error| Error::invalid("activation formats", list, e.to_string()))?;
        if !out.contains(&f) {
            out.push(f);
        }
    }
    if out.is_empty() {
        return Err(Error::invalid("activation formats", list, "give at least one activation format, e.g. int8,fp32"));
    }
    Ok(out)
}

/// (Tr(H_a)/n_a) of a layer from the report, clamped at 0; an error naming what to run if absent.
fn activation_factor(sens: &LayerSensitivity) -> Result<f64> {
    let v = sens.activation_trace_per_element().ok_or_else(|| {
        Error::invalid(
            format!("sensitivity of layer `{}`", sens.name),
            "activation_trace",
            "searching activation formats needs the activation traces of every layer: make the report with \
             `mixq sensitivity --estimator hutchpp,activation` (native models only)",
        )
    })?;
    if !v.is_finite() {
        return Err(Error::invalid(format!("sensitivity of layer `{}`", sens.name), v.to_string(), "`activation_trace` is not finite"));
    }
    if v < 0.0 {
        tracing::warn!(layer = %sens.name, "activation trace {v:.3e} is negative (estimate noise); clamped to 0");
    }
    Ok(v.max(0.0))
}

/// z of a two-sided 95 % normal interval, the default of `--robust`.
pub const ROBUST_Z_DEFAULT: f64 = 1.96;

/// The default candidates: int2, int3, int4, int8 (symmetric, per-channel) and fp32.
pub fn default_candidates() -> Vec<QuantSpec> {
    let mut v: Vec<QuantSpec> =
        [2u8, 3, 4, 8].iter().map(|&bits| QuantSpec::new(Format::Int { bits, signed: true }, Granularity::PerChannel)).collect();
    v.push(QuantSpec::keep());
    v
}

/// Parses a comma-separated candidate list such as `int2,int4,int8,fp4-e2m1/group:32,fp32`.
pub fn parse_candidates(list: &str) -> Result<Vec<QuantSpec>> {
    let mut out: Vec<QuantSpec> = Vec::new();
    for item in list.split(',').map(str::trim).filter(|s| !s.is_empty()) {
        let spec = item.parse::<QuantSpec>().map_err(|e| Error::invalid("candidate formats", list, e.to_string()))?;
        if !out.contains(&spec) {
            out.push(spec);
        }
    }
    if out.is_empty() {
        return Err(Error::invalid("candidate formats", list, "give at least one format, e.g. int2,int4,int8,fp32"));
    }
    Ok(out)
}

impl CostTable {
    /// Builds the table for `model`'s layers × `candidates`, with costs from `report` by
    /// `opts.proxy`. ‖Q_f(W) − W‖² is computed with [`fake_quantize`] on the model's weights, so
    /// the cost sees exactly the values evaluation will use.
    ///
    /// A negative trace (possible for a Hutchinson estimate of a layer with near-zero curvature) is
    /// clamped at 0 with a warning naming the layer: a negative predicted loss increase would make
    /// the allocator prefer the coarsest format for the wrong reason. Candidates that do not fit a
    /// layer (a group size that does not divide its input dimension) are left out for that layer.
    pub fn build(model: &dyn QuantModel, report: &SensitivityReport, candidates: &[QuantSpec], opts: &BuildOptions) -> Result<CostTable> {
        let mut v = build_tables(model, report, candidates, opts, &[opts.robust_z])?;
        Ok(v.pop().expect("one table per z"))
    }

    /// The nominal table and the robust one (traces replaced by Tr + z·s.e., clamped at 0), from
    /// one pass over the weights; `opts.robust_z` is ignored. The two tables have the same layers,
    /// options and resources, and every robust cost is ≥ its nominal cost (for z ≥ 0).
    pub fn build_nominal_and_robust(
        model: &dyn QuantModel,
        report: &SensitivityReport,
        candidates: &[QuantSpec],
        opts: &BuildOptions,
        z: f64,
    ) -> Result<(CostTable, CostTable)> {
        let mut v = build_tables(model, report, candidates, opts, &[None, Some(z)])?;
        let robust = v.pop().expect("two tables");
        let nominal = v.pop().expect("two tables");
        Ok((nominal, robust))
    }
}

/// Checks a robust z: finite and ≥ 0.
pub fn check_robust_z(z: f64) -> Result<()> {
    if !z.is_finite() || z < 0.0 {
        return Err(Error::invalid("--robust", z.to_string(), "z must be a finite number ≥ 0 (1.96: a 95 % two-sided normal interval)"));
    }
    Ok(())
}

/// One table per entry of `zs` (None: nominal traces, Some(z): upper bounds), sharing the
/// quantization errors.
fn build_tables(
    model: &dyn QuantModel,
    report: &SensitivityReport,
    candidates: &[QuantSpec],
    opts: &BuildOptions,
    zs: &[Option<f64>],
) -> Result<Vec<CostTable>> {
    if candidates.is_empty() {
        return Err(Error::invalid("candidates", "", "give at least one candidate format"));
    }
    for z in zs.iter().flatten() {
        check_robust_z(*z)?;
        if opts.proxy != Proxy::Hessian {
            return Err(Error::invalid(
                "--robust",
                z.to_string(),
                format!("robust costs need the hessian proxy (the report has standard errors only for traces), not `{}`", opts.proxy),
            ));
        }
    }
    let mut tables: Vec<Vec<LayerCosts>> = vec![Vec::new(); zs.len()];
    for info in model.layers() {
        let sens = report.layer(&info.name)?;
        let factors: Vec<f64> = zs.iter().map(|z| sensitivity_factor(sens, opts.proxy, *z)).collect::<Result<_>>()?;
        let w = model.weight(&info.name)?.detach().to_kind(Kind::Float);
        let mut options: Vec<Vec<CostOption>> = vec![Vec::new(); zs.len()];
        for spec in candidates {
            if spec.check_fits(&info.name, &info.shape).is_err() {
                continue;
            }
            let label = spec.label();
            let err2 = if spec.format == Format::Fp32 {
                0.0
            } else {
                let q = fake_quantize(&w, spec)?;
                (q - &w).f_square()?.f_sum(Kind::Double)?.f_double_value(&[])?
            };
            let bits = spec.storage_bits(&info.shape);
            // One option per activation format (or one with the fixed activation bits).
            let acts: Vec<(String, f64, u32)> = match &opts.activations {
                None => vec![(label.clone(), 0.0, opts.activation_bits)],
                Some(ae) => {
                    let fa = activation_factor(sens)?;
                    let errs = ae.layer(&info.name)?;
                    ae.formats.iter().zip(errs).map(|(&f, &e)| (pair_label(&label, f), fa * e, f.bits())).collect()
                }
            };
            for (option_label, act_cost, act_bits) in acts {
                let latency_us = opts.latency.as_ref().and_then(|t| t.entries.get(&(info.name.clone(), option_label.clone())).copied());
                for (out, factor) in options.iter_mut().zip(&factors) {
                    let cost = match opts.proxy {
                        Proxy::Measured => measured(sens, spec, &label)?,
                        _ => factor * err2,
                    };
                    out.push(CostOption {
                        format: option_label.clone(),
                        cost: cost + act_cost,
                        bytes: bits.div_ceil(8),
                        bits,
                        bops: info.macs as f64 * f64::from(spec.format.bits()) * f64::from(act_bits),
                        latency_us,
                    });
                }
            }
        }
        if options[0].is_empty() {
            return Err(Error::invalid(
                format!("candidates for layer `{}`", info.name),
                candidates.iter().map(QuantSpec::label).collect::<Vec<_>>().join(","),
                format!("no candidate fits the layer's shape {:?}", info.shape),
            ));
        }
        for ((t, options), factor) in tables.iter_mut().zip(options).zip(&factors) {
            let trace_per_param = matches!(opts.proxy, Proxy::Hessian).then_some(*factor);
            t.push(LayerCosts { name: info.name.clone(), params: info.params, trace_per_param, options });
        }
    }
    tables
        .into_iter()
        .map(|layers| {
            let table = CostTable { layers };
            table.validate()?;
            Ok(table)
        })
        .collect()
}

/// The per-weight sensitivity multiplying ‖ΔW‖² (1 for `WeightError`, unused for `Measured`);
/// with `robust_z`, the trace's upper confidence bound Tr + z·s.e.
fn sensitivity_factor(sens: &LayerSensitivity, proxy: Proxy, robust_z: Option<f64>) -> Result<f64> {
    let n = sens.params.max(1) as f64;
    let (value, field) = match proxy {
        Proxy::Hessian => (sens.trace, "trace"),
        Proxy::Fisher => (sens.fisher_trace, "fisher_trace"),
        Proxy::WeightError | Proxy::Measured => return Ok(1.0),
    };
    let v = value.ok_or_else(|| {
        Error::invalid(
            format!("sensitivity of layer `{}`", sens.name),
            field,
            format!("the report has no `{field}` for this layer; run the estimator that fills it, or choose another proxy"),
        )
    })?;
    if !v.is_finite() {
        return Err(Error::invalid(format!("sensitivity of layer `{}`", sens.name), v.to_string(), format!("`{field}` is not finite")));
    }
    if let Some(z) = robust_z {
        let se = sens.trace_std_err.filter(|s| s.is_finite() && *s >= 0.0).ok_or_else(|| {
            Error::invalid(
                format!("sensitivity of layer `{}`", sens.name),
                "trace_std_err",
                "robust costs need the standard error of every trace; the report has none (or a bad one) for this layer",
            )
        })?;
        return Ok((v + z * se).max(0.0) / n);
    }
    if v < 0.0 {
        tracing::warn!(layer = %sens.name, "{field} {v:.3e} is negative (estimate noise on a flat layer); clamped to 0");
        return Ok(0.0);
    }
    Ok(v / n)
}

fn measured(sens: &LayerSensitivity, spec: &QuantSpec, label: &str) -> Result<f64> {
    let keys = [label.to_string(), spec.to_string(), spec.format.to_string()];
    if spec.format == Format::Fp32 {
        return Ok(keys.iter().find_map(|k| sens.measured_delta_loss.get(k).copied()).unwrap_or(0.0));
    }
    keys.iter().find_map(|k| sens.measured_delta_loss.get(k).copied()).ok_or_else(|| {
        Error::invalid(
            format!("measured_delta_loss of layer `{}`", sens.name),
            label,
            format!(
                "the report has no measured loss increase for this format (it has: {}); measure it or choose another proxy",
                sens.measured_delta_loss.keys().cloned().collect::<Vec<_>>().join(", ")
            ),
        )
    })
}

impl FromStr for Proxy {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        [Proxy::Hessian, Proxy::Measured, Proxy::Fisher, Proxy::WeightError]
            .into_iter()
            .find(|p| p.to_string().eq_ignore_ascii_case(s))
            .ok_or_else(|| Error::invalid("proxy", s, "valid: hessian, measured, fisher, weight-error"))
    }
}
