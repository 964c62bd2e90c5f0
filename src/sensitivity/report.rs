//! `SensitivityReport`: per-layer curvature statistics, the contract between the sensitivity
//! engine (which writes it) and the cost model / allocator (which read it); where reports are
//! cached ([`default_cache_dir`], [`cache_key`]); and how shard reports pool ([`merge`]). Each
//! trace layer keeps its raw probe statistics in `extra.trace_stats` (`n`, `mean`, `m2` of the
//! random samples, and the exact `offset` of Hutch++'s sketch), which is what makes pooling exact;
//! the total over the layers ([`SensitivityReport::total_trace`]) keeps the same statistics of
//! its own per-probe samples.

use super::hutchinson::{TotalTrace, TraceSettings};
use super::stats::Welford;
use crate::error::{Error, Result};
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};

/// The `"format"` field of a sensitivity report.
pub const REPORT_FORMAT: &str = "mixq.sensitivity-report";
/// The report version this build reads and writes.
pub const REPORT_VERSION: u64 = 1;

/// One layer's sensitivity statistics. Every estimator fills `name`, `params` and the fields it
/// measures; the others stay `None`.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct LayerSensitivity {
    /// Fully qualified layer name.
    pub name: String,
    /// Number of weights n_i.
    pub params: i64,
    /// Estimated Tr(H_i) of the loss Hessian block of this layer's weight.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub trace: Option<f64>,
    /// Standard error of `trace`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub trace_std_err: Option<f64>,
    /// Probes (or samples) used for this layer.
    #[serde(default)]
    pub probes: u64,
    /// Whether the stopping rule was met for this layer.
    #[serde(default)]
    pub converged: bool,
    /// Top Hessian eigenvalue of the layer block, if estimated.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub top_eigenvalue: Option<f64>,
    /// Empirical Fisher trace, if estimated.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub fisher_trace: Option<f64>,
    /// Estimated mean per-sample trace of the Hessian w.r.t. this layer's input activation
    /// (HAWQ-V2's activation sensitivity; `activation` estimator, native models only).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub activation_trace: Option<f64>,
    /// Standard error of `activation_trace`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub activation_trace_std_err: Option<f64>,
    /// Elements of this layer's input per sample (n_a, to normalise `activation_trace`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub activation_numel: Option<i64>,
    /// Probes of the activation-trace estimator.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub activation_probes: Option<u64>,
    /// Whether the activation trace met the stopping rule.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub activation_converged: Option<bool>,
    /// Measured loss increase when only this layer is quantized, per format name.
    #[serde(default, skip_serializing_if = "std::collections::BTreeMap::is_empty")]
    pub measured_delta_loss: std::collections::BTreeMap<String, f64>,
    /// Other estimator-specific values (e.g. first-order |g·ΔW| per format).
    #[serde(default, skip_serializing_if = "std::collections::BTreeMap::is_empty")]
    pub extra: std::collections::BTreeMap<String, serde_json::Value>,
}

impl LayerSensitivity {
    /// Tr(H_i)/n_i, the average curvature per weight (HAWQ-V2's normalised trace).
    pub fn trace_per_param(&self) -> Option<f64> {
        self.trace.map(|t| t / self.params.max(1) as f64)
    }

    /// Tr(H_a)/n_a, the average activation curvature per input element.
    pub fn activation_trace_per_element(&self) -> Option<f64> {
        match (self.activation_trace, self.activation_numel) {
            (Some(t), Some(n)) => Some(t / n.max(1) as f64),
            _ => None,
        }
    }

    /// The trace as the cost model should use it: negative estimates (a layer where the loss is
    /// not at a minimum, or noise around zero) clamped at 0, with a warning on the log. Quantization
    /// noise is not aimed along negative-curvature directions, so a negative second-order term
    /// would only credit a layer with a gain it will not see.
    pub fn clamped_trace(&self) -> Option<f64> {
        self.trace.map(|t| {
            if t < 0.0 {
                tracing::warn!(
                    "layer {}: negative Hessian trace {t:.3e} clamped at 0 (use --curvature ggn for a PSD curvature)",
                    self.name
                );
            }
            t.max(0.0)
        })
    }
}

/// A sensitivity report (JSON, `"format": "mixq.sensitivity-report"`, version 1).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SensitivityReport {
    /// Always `mixq.sensitivity-report`.
    pub format: String,
    /// Always 1.
    pub version: u64,
    /// Model name (zoo name or path).
    pub model: String,
    /// SHA-256 of the model weights.
    pub model_sha256: String,
    /// Data spec (e.g. `digits:calib`).
    pub data: String,
    /// SHA-256 of the data used.
    pub data_sha256: String,
    /// Estimator settings, seed included (free-form, written by the estimator).
    pub settings: serde_json::Value,
    /// Per-layer statistics, in the model's layer order.
    pub layers: Vec<LayerSensitivity>,
    /// Σ_i Tr(H_i) over the layers with its own standard error, from per-probe samples of the
    /// total (the trace estimators; absent from reports of other estimators, from reports
    /// written before mixq recorded it, and from runs resumed from such a checkpoint). An
    /// optional field: version-1 reports without it still read.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub total_trace: Option<TotalTrace>,
}

impl SensitivityReport {
    /// Parses a report; `origin` names the file in errors.
    pub fn from_json(text: &str, origin: &Path) -> Result<Self> {
        let value = crate::util::parse_versioned_json(text, origin, REPORT_FORMAT, REPORT_VERSION, "mixq sensitivity report")?;
        serde_json::from_value(value).map_err(|e| Error::parse(origin, e.to_string()))
    }

    /// Reads a report file.
    pub fn load(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
        Self::from_json(&text, path)
    }

    /// Pretty JSON with a trailing newline.
    pub fn to_json(&self) -> String {
        let mut s = serde_json::to_string_pretty(self).expect("a SensitivityReport always serializes");
        s.push('\n');
        s
    }

    /// Writes the report atomically.
    pub fn save(&self, path: &Path) -> Result<()> {
        crate::util::write_atomic(path, self.to_json().as_bytes())
    }

    /// The entry of layer `name`.
    pub fn layer(&self, name: &str) -> Result<&LayerSensitivity> {
        self.layers.iter().find(|l| l.name == name).ok_or_else(|| Error::unknown_layer(name, self.layers.iter().map(|l| l.name.as_str())))
    }
}

/// The directory of cached reports and checkpoints: `$MIXQ_HOME/cache/sensitivity`, or
/// `~/.cache/mixq/cache/sensitivity` (the same home as the zoo's weights).
pub fn default_cache_dir() -> PathBuf {
    let home = std::env::var_os("MIXQ_HOME").filter(|h| !h.is_empty()).map(PathBuf::from).unwrap_or_else(|| {
        let user_home = std::env::var_os("HOME").map(PathBuf::from).unwrap_or_else(std::env::temp_dir);
        user_home.join(".cache").join("mixq")
    });
    home.join("cache").join("sensitivity")
}

/// The cache key of a run: a hash of everything its report depends on — mixq's version, the
/// report version, model and data (names and SHA-256) and the settings (seed and shard included).
pub fn cache_key(model: &str, model_sha256: &str, data: &str, data_sha256: &str, settings: &serde_json::Value) -> String {
    let v = serde_json::json!({
        "format": REPORT_FORMAT,
        "version": REPORT_VERSION,
        "mixq": env!("CARGO_PKG_VERSION"),
        "model": model,
        "model_sha256": model_sha256,
        "data": data,
        "data_sha256": data_sha256,
        "settings": settings,
    });
    crate::util::sha256_hex(v.to_string().as_bytes())[..32].to_string()
}

/// The settings keys that differ between shards of one run (and are recomputed by a merge).
const PER_SHARD_KEYS: [&str; 3] = ["shard", "probes", "hvps"];

/// A report's shard: (count, indices); an unsharded report is shard 0 of 1.
fn shard_of(r: &SensitivityReport, path: &Path) -> Result<(u64, Vec<u64>)> {
    match r.settings.get("shard") {
        None => Ok((1, vec![0])),
        Some(s) => {
            let count = s["count"].as_u64();
            let indices = s["indices"].as_array().map(|a| a.iter().filter_map(|i| i.as_u64()).collect::<Vec<_>>());
            match (count, indices) {
                (Some(c), Some(ix)) if c > 0 && !ix.is_empty() && ix.iter().all(|&i| i < c) => Ok((c, ix)),
                _ => Err(Error::parse(path, format!("malformed `settings.shard` {s}: expected {{\"count\": n, \"indices\": [k, ...]}}"))),
            }
        }
    }
}

/// The running statistics and exact part of every layer's trace (`extra.trace_stats`).
fn trace_stats(r: &SensitivityReport, path: &Path) -> Result<Vec<(Welford, f64)>> {
    r.layers
        .iter()
        .map(|l| {
            let s = l.extra.get("trace_stats");
            let f = |k: &str| s.and_then(|s| s[k].as_f64());
            match (s.and_then(|s| s["n"].as_u64()), f("mean"), f("m2"), f("offset")) {
                (Some(n), Some(mean), Some(m2), Some(offset)) => Ok((Welford { n, mean, m2 }, offset)),
                _ => Err(Error::parse(
                    path,
                    format!(
                        "layer {}: no probe statistics (`extra.trace_stats`) to pool; only hutchinson/hutchpp reports of this mixq version merge: rerun it",
                        l.name
                    ),
                )),
            }
        })
        .collect()
}

/// A layer with its trace fields cleared: what must agree between the inputs of a merge.
fn without_trace(l: &LayerSensitivity) -> LayerSensitivity {
    let mut l = l.clone();
    l.trace = None;
    l.trace_std_err = None;
    l.probes = 0;
    l.converged = false;
    for k in ["trace_ci95", "trace_per_param", "trace_stats"] {
        l.extra.remove(k);
    }
    l
}

/// Pools reports of disjoint shards of one run (same model weights, data and settings) into the
/// report of their union: per layer the Welford sums are combined (Chan et al.), and standard
/// error, 95 % CI, probes and the converged flag (with the run's `tol`, `tol_floor`,
/// `min_probes`) are recomputed from the pooled sums. The result does not depend on the order
/// of `inputs`; when the shards cover the whole run it equals the unsharded report of the same
/// probes up to float rounding (and has no `shard` entry). Hutch++ shards must agree on the
/// sketch part (they do when computed by the same build). `inputs` pairs each report with the
/// file it came from, for the error messages.
pub fn merge(inputs: &[(PathBuf, SensitivityReport)]) -> Result<SensitivityReport> {
    if inputs.len() < 2 {
        return Err(Error::invalid("merge", inputs.len().to_string(), "give at least two reports to merge"));
    }
    let name = |p: &Path| p.display().to_string();
    let mut parts = Vec::with_capacity(inputs.len());
    for (path, r) in inputs {
        parts.push((path, r, shard_of(r, path)?, trace_stats(r, path)?));
    }
    let (p0, r0, count0): (&PathBuf, &SensitivityReport, u64) = (parts[0].0, parts[0].1, parts[0].2 .0);
    let strip = |r: &SensitivityReport| -> serde_json::Value {
        let mut s = r.settings.clone();
        if let Some(o) = s.as_object_mut() {
            for k in PER_SHARD_KEYS {
                o.remove(k);
            }
        }
        s
    };
    let settings0 = strip(r0);
    for (p, r, (count, _), _) in &parts[1..] {
        let differ = |what: &str, a: &dyn std::fmt::Display, b: &dyn std::fmt::Display| {
            Error::invalid(
                "merge",
                format!("{} + {}", name(p0), name(p)),
                format!("they are of different {what} ({a} vs {b}); only shards of one run merge"),
            )
        };
        if r.model_sha256 != r0.model_sha256 {
            return Err(differ("model weights (SHA-256)", &r0.model_sha256, &r.model_sha256));
        }
        if r.data_sha256 != r0.data_sha256 {
            return Err(differ("data (SHA-256)", &r0.data_sha256, &r.data_sha256));
        }
        let s = strip(r);
        if s != settings0 {
            let (a, b) = (settings0.as_object(), s.as_object());
            let mut keys: Vec<&String> = a.into_iter().chain(b).flat_map(|o| o.keys()).collect();
            keys.sort();
            keys.dedup();
            let key = keys.into_iter().find(|k| settings0.get(k.as_str()) != s.get(k.as_str())).map(|k| k.as_str()).unwrap_or("?");
            let show = |v: Option<&serde_json::Value>| v.map(|v| v.to_string()).unwrap_or_else(|| "absent".into());
            return Err(differ(&format!("settings: `{key}`"), &show(settings0.get(key)), &show(s.get(key))));
        }
        if *count != count0 {
            return Err(differ("shard counts", &count0, count));
        }
        let names = |r: &SensitivityReport| r.layers.iter().map(|l| (l.name.clone(), l.params)).collect::<Vec<_>>();
        if names(r) != names(r0) {
            return Err(differ("layers", &r0.layers.len(), &r.layers.len()));
        }
        for (a, b) in r0.layers.iter().zip(&r.layers) {
            if without_trace(a) != without_trace(b) {
                return Err(differ(&format!("non-trace results for layer {}", a.name), &"one value", &"another"));
            }
        }
    }
    // Disjoint shards.
    let mut owner: std::collections::BTreeMap<u64, &PathBuf> = Default::default();
    for (p, _, (_, ix), _) in &parts {
        for i in ix {
            if let Some(q) = owner.insert(*i, p) {
                return Err(Error::invalid(
                    "merge",
                    format!("{} + {}", name(q), name(p)),
                    format!("both hold shard {i}/{count0}: their probes are the same, and pooling them would count them twice"),
                ));
            }
        }
    }
    // Pool in shard order, so that the result does not depend on the order of the arguments.
    parts.sort_by_key(|(_, _, (_, ix), _)| ix.iter().copied().min());
    let nl = r0.layers.len();
    let mut stats = vec![Welford::default(); nl];
    let mut offsets = vec![0.0; nl];
    for (_, _, _, st) in &parts {
        for (i, (w, o)) in st.iter().enumerate() {
            stats[i] = stats[i].merge(w);
            offsets[i] += o / parts.len() as f64;
        }
    }
    let total: f64 = offsets.iter().map(|o| o.abs()).sum();
    for (p, _, _, st) in &parts {
        let worst = st.iter().zip(&offsets).map(|((_, o), m)| (o - m).abs()).fold(0.0, f64::max);
        if worst > crate::sensitivity::hutchinson::SKETCH_AGREEMENT * total {
            return Err(Error::invalid(
                "merge",
                name(p),
                format!("its Hutch++ sketch part differs from the other shards' by {worst:.3e} (of {total:.3e}): shards computed by different builds or hardware do not merge"),
            ));
        }
    }
    let num = |k: &str| {
        settings0
            .get(k)
            .and_then(|v| v.as_f64())
            .ok_or_else(|| Error::parse(p0.as_path(), format!("settings.{k} missing: not a trace report")))
    };
    // The total pools like a layer; it is dropped if any shard lacks it (an older build's report).
    let totals: Option<Vec<_>> = parts.iter().map(|(_, r, _, _)| r.total_trace.as_ref().map(|t| t.stats)).collect();
    let total_trace = totals.map(|ts| {
        let w = ts.iter().fold(Welford::default(), |acc, t| acc.merge(&t.welford()));
        TotalTrace::new(ts.iter().map(|t| t.offset / ts.len() as f64).sum(), w)
    });
    let rule =
        TraceSettings { tol: num("tol")?, tol_floor: num("tol_floor")?, min_probes: num("min_probes")? as u64, ..Default::default() };
    let (traces, _) = crate::sensitivity::hutchinson::summarize(&offsets, &stats, &rule);
    let mut merged = r0.clone();
    for ((l, t), (w, o)) in merged.layers.iter_mut().zip(&traces).zip(stats.iter().zip(&offsets)) {
        l.trace = Some(t.trace);
        l.trace_std_err = Some(t.std_err);
        l.probes = t.probes;
        l.converged = t.converged;
        l.extra.insert("trace_ci95".into(), serde_json::json!(t.ci95));
        l.extra.insert("trace_per_param".into(), serde_json::json!(t.trace / l.params.max(1) as f64));
        l.extra.insert("trace_stats".into(), serde_json::json!({"n": w.n, "mean": w.mean, "m2": w.m2, "offset": o}));
    }
    let sum = |k: &str| parts.iter().map(|(_, r, _, _)| r.settings.get(k).and_then(|v| v.as_u64()).unwrap_or(0)).sum::<u64>();
    let mut settings = settings0.clone();
    settings["probes"] = serde_json::json!(sum("probes"));
    settings["hvps"] = serde_json::json!(sum("hvps"));
    let indices: Vec<u64> = owner.keys().copied().collect();
    if indices.len() as u64 != count0 {
        settings["shard"] = serde_json::json!({"count": count0, "indices": indices});
    }
    merged.settings = settings;
    merged.total_trace = total_trace;
    Ok(merged)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::data::Dataset;
    use crate::model::zoo::DigitsResNet;
    use crate::sensitivity::{estimate, Estimator, SensitivitySettings, Shard};

    #[test]
    fn shards_pool_the_total_trace() -> Result<()> {
        let model = DigitsResNet::untrained();
        let data = Dataset::digits("calib")?.take(8);
        for est in [Estimator::Hutchinson, Estimator::Hutchpp] {
            let trace =
                TraceSettings { min_probes: 7, max_probes: 7, block: 2, tol: 1e-9, tol_floor: 0.0, sketch: 2, ..Default::default() };
            let whole = SensitivitySettings { estimators: vec![est], batch_size: 8, trace, ..Default::default() };
            let all = estimate(&model, &data, &whole, &mut |_| {})?;
            let mut shards = Vec::new();
            for k in [1, 0] {
                let s = SensitivitySettings {
                    trace: TraceSettings { shard: Shard { index: k, count: 2 }, ..whole.trace.clone() },
                    ..whole.clone()
                };
                shards.push((PathBuf::from(format!("shard{k}.json")), estimate(&model, &data, &s, &mut |_| {})?));
            }
            let merged = merge(&shards)?;
            let (m, w) = (merged.total_trace.as_ref().expect("merged total"), all.total_trace.as_ref().expect("total"));
            assert_eq!(m.probes, 7);
            for (a, b, what) in [(m.trace, w.trace, "trace"), (m.std_err, w.std_err, "s.e."), (m.ci95, w.ci95, "CI")] {
                assert!((a - b).abs() <= 1e-9 * b.abs().max(1e-300), "{est}: merged total {what} {a} vs whole run {b}");
            }
            // A shard of an older build (no total): the merge has none, rather than a wrong one.
            shards[0].1.total_trace = None;
            assert!(merge(&shards)?.total_trace.is_none());
            // The field round-trips through JSON, and a report without it still reads.
            let back = SensitivityReport::from_json(&all.to_json(), Path::new("r.json"))?;
            assert_eq!(back, all);
            let old = SensitivityReport { total_trace: None, ..all.clone() };
            assert!(!old.to_json().contains("total_trace"));
            assert_eq!(SensitivityReport::from_json(&old.to_json(), Path::new("r.json"))?, old);
        }
        Ok(())
    }
}
