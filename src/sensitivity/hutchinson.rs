//! Per-layer Hessian traces by Hutchinson's estimator with an honest stopping rule, and a
//! Hutch++-style variance-reduced variant.
//!
//! One full-model Rademacher probe v gives every layer a sample s_i = v_i · (Hv)_i with
//! E[s_i] = Tr(H_ii), so all layers are estimated from the same products. Existing tools stop
//! when the running mean stops moving, which can stop after a handful of probes several percent
//! off; here every layer's 95 % confidence interval (Student t × standard error) must be within
//! `tol` × |Tr(H_ii)|, or within `tol_floor` × Σ_j |Tr(H_jj)| (so that layers whose trace is
//! near zero cannot stall the run: their absolute error is negligible for the allocation), or the
//! run stops at `max_probes` and says which layers did not converge.
//!
//! Negative traces (the loss is not at a minimum along that layer) are reported as measured. The
//! cost model clamps them at zero with a warning ([`crate::sensitivity::LayerSensitivity::clamped_trace`]);
//! `--curvature ggn` uses the positive semi-definite Gauss–Newton matrix instead.
//!
//! **Hutch++ per layer.** With Q an orthonormal basis of H S for a random sketch S (k products)
//! and R = I − QQᵀ, for each layer's selector P_i:
//! Tr(P_i H) = Σ_j (q_j)_i·(Hq_j)_i + Σ_j (q_j)_i·(RHq_j)_i + Tr(P_i RHR).
//! The first two terms are exact given HQ (k more products); the last is estimated by Hutchinson
//! on Rg, whose variance no longer contains the dominant curvature directions.
//!
//! **Resuming and sharding.** Probe j is drawn from (seed, j) alone ([`rademacher`]), and all a
//! run carries from pass to pass is a [`TraceState`] (per-layer Welford sums and the probe
//! count). So a run can be checkpointed after any pass and continued later with the same result,
//! and `n` machines can each run the probes j ≡ k (mod n) ([`Shard`]) and pool their sums
//! afterwards ([`crate::sensitivity::report::merge`]). A shard runs its whole share (no early
//! stop): the stopping rule is a statement about the pooled statistics, so it is re-evaluated
//! at the merge. Hutch++ shards too: the sketch depends only on the seed, so every shard
//! recomputes the same sketch (2k products each) and draws its own share of residual probes;
//! the merge checks that the shards' exact parts agree.
//!
//! **The total.** Σ_i Tr(H_ii) over the quantizable layers comes with its own standard error,
//! from the per-probe samples of the total (Σ_i s_i of one probe). The layers' samples come from
//! the same probes and are correlated, so √Σ_i se_i² would be wrong (too small when they are
//! positively correlated). For Hutch++ the sketch part of the total is exact and only the
//! residual samples, summed over the layers per probe, carry error.

use super::hvp::HvpEngine;
use super::stats::{rademacher, stream, t975, Welford};
use crate::error::{Error, Result};
use serde::{Deserialize, Serialize};
use std::str::FromStr;
use tch::{Kind, Tensor};

/// Which share of the probes a run draws: probe indices j < `max_probes` with j ≡ `index`
/// (mod `count`). `0/1` is the whole run.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Shard {
    /// k, in 0..count.
    pub index: u64,
    /// n ≥ 1.
    pub count: u64,
}

impl Default for Shard {
    fn default() -> Self {
        Shard { index: 0, count: 1 }
    }
}

impl Shard {
    /// Whether this is the whole run (`0/1`).
    pub fn is_whole(&self) -> bool {
        self.count == 1
    }

    /// How many of the probe indices 0..total belong to this shard.
    pub fn share(&self, total: u64) -> u64 {
        if total > self.index {
            (total - self.index).div_ceil(self.count)
        } else {
            0
        }
    }

    /// The global probe index of this shard's `j`-th probe.
    pub fn global(&self, j: u64) -> u64 {
        self.index + j * self.count
    }
}

impl std::fmt::Display for Shard {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.index, self.count)
    }
}

impl FromStr for Shard {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        let bad = |msg: &str| Error::invalid("shard", s, msg);
        let (k, n) = s.split_once('/').ok_or_else(|| bad("expected k/n, e.g. 0/4 for the first of four shards"))?;
        let k: u64 = k.trim().parse().map_err(|_| bad("k in k/n must be a whole number ≥ 0, e.g. 0/4"))?;
        let n: u64 = n.trim().parse().map_err(|_| bad("n in k/n must be a whole number ≥ 1, e.g. 0/4"))?;
        if n == 0 {
            return Err(bad("n must be at least 1"));
        }
        if k >= n {
            return Err(bad(&format!("k must be below n: the shards of {n} are 0/{n} … {}/{n}", n - 1)));
        }
        Ok(Shard { index: k, count: n })
    }
}

/// Settings of the trace estimators.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TraceSettings {
    /// Relative 95 % CI half-width each layer must reach.
    pub tol: f64,
    /// Absolute floor, relative to Σ_j |Tr(H_jj)|: a half-width below it also counts.
    pub tol_floor: f64,
    /// Probes before the stopping rule is first tested.
    pub min_probes: u64,
    /// Hard limit on probes (residual probes for Hutch++).
    pub max_probes: u64,
    /// Probes per pass over the data (they share forward passes; the stop is tested per pass).
    pub block: u64,
    /// Seed of the probes.
    pub seed: u64,
    /// Hutch++ sketch size k (ignored by Hutchinson).
    pub sketch: u64,
    /// The share of the probes this run draws.
    #[serde(default)]
    pub shard: Shard,
}

impl Default for TraceSettings {
    fn default() -> Self {
        TraceSettings { tol: 0.05, tol_floor: 1e-3, min_probes: 10, max_probes: 200, block: 4, seed: 0, sketch: 8, shard: Shard::default() }
    }
}

impl TraceSettings {
    /// Checks the ranges.
    pub fn validate(&self) -> Result<()> {
        if !(self.tol > 0.0 && self.tol.is_finite()) {
            return Err(Error::invalid("tol", self.tol.to_string(), "must be a positive number, e.g. 0.05"));
        }
        if !(self.tol_floor >= 0.0 && self.tol_floor.is_finite()) {
            return Err(Error::invalid("tol floor", self.tol_floor.to_string(), "must be ≥ 0"));
        }
        if self.max_probes < 2 {
            return Err(Error::invalid("max probes", self.max_probes.to_string(), "must be at least 2 (a CI needs two samples)"));
        }
        if self.block == 0 {
            return Err(Error::invalid("block", "0", "must be at least 1"));
        }
        let sh = self.shard;
        if sh.count == 0 || sh.index >= sh.count {
            return Err(Error::invalid("shard", sh.to_string(), "expected k/n with 0 ≤ k < n"));
        }
        // The last shard has the fewest probes; every shard needs two for a standard error.
        let fewest = Shard { index: sh.count - 1, ..sh }.share(self.max_probes);
        if fewest < 2 {
            return Err(Error::invalid(
                "shard",
                sh.to_string(),
                format!(
                    "{} probes split {} ways leave {fewest} probe(s) to a shard; each shard needs at least 2: raise --max-probes to at least {}",
                    self.max_probes,
                    sh.count,
                    sh.count.saturating_mul(2)
                ),
            ));
        }
        Ok(())
    }
}

/// One layer's trace estimate.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LayerTrace {
    /// Estimated Tr(H_ii).
    pub trace: f64,
    /// Its standard error.
    pub std_err: f64,
    /// 95 % CI half-width (t quantile × standard error).
    pub ci95: f64,
    /// Probes used.
    pub probes: u64,
    /// Whether the stopping rule was met.
    pub converged: bool,
}

/// The estimate of the total Σ_i Tr(H_ii) over the quantizable layers, with the statistics
/// it came from (what a merge of shards pools).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TotalTrace {
    /// Estimated Σ_i Tr(H_ii).
    pub trace: f64,
    /// Its standard error, from the per-probe samples of the total (not √Σ se_i²: the layers'
    /// samples come from the same probes and are correlated).
    pub std_err: f64,
    /// 95 % CI half-width (t quantile × standard error).
    pub ci95: f64,
    /// Probes used.
    pub probes: u64,
    /// The raw statistics, as a layer's `extra.trace_stats`.
    pub stats: TotalStats,
}

/// Running statistics of the per-probe samples of the random part of the total, and its exact
/// part.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct TotalStats {
    /// Samples.
    pub n: u64,
    /// Their mean.
    pub mean: f64,
    /// Their sum of squared deviations from the mean (Welford's M2).
    pub m2: f64,
    /// The exact part (Hutch++'s sketch terms summed over the layers; 0 for Hutchinson).
    pub offset: f64,
}

impl TotalStats {
    /// The running statistics of the samples.
    pub fn welford(&self) -> Welford {
        Welford { n: self.n, mean: self.mean, m2: self.m2 }
    }
}

impl TotalTrace {
    /// The total of an exact part `offset` and the random samples `w`.
    pub fn new(offset: f64, w: Welford) -> Self {
        let std_err = w.std_err();
        TotalTrace {
            trace: offset + w.mean,
            std_err,
            ci95: t975(w.n.saturating_sub(1)) * std_err,
            probes: w.n,
            stats: TotalStats { n: w.n, mean: w.mean, m2: w.m2, offset },
        }
    }
}

/// The result of a trace estimation.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TraceEstimate {
    /// Per layer, in the engine's layer order.
    pub layers: Vec<LayerTrace>,
    /// The total over the layers (`None` when resumed from a checkpoint of a build that did
    /// not record it).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub total: Option<TotalTrace>,
    /// Random probes used (residual probes for Hutch++).
    pub probes: u64,
    /// Curvature–vector products used, sketch included (for a resumed run: as if it had not
    /// been interrupted).
    pub hvps: u64,
    /// The final state: the per-layer sums a merge pools.
    #[serde(skip)]
    pub state: TraceState,
}

/// Everything a trace estimation carries from one pass to the next: enough to checkpoint a run
/// and continue it later with the same result, or to pool shards.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct TraceState {
    /// This run's (shard's) probes so far.
    pub probes: u64,
    /// Curvature–vector products so far, sketch included.
    pub hvps: u64,
    /// The exact part of each layer's trace (Hutch++'s sketch terms; zeros for Hutchinson).
    pub offset: Vec<f64>,
    /// Running statistics of each layer's random samples.
    pub stats: Vec<Welford>,
    /// Running statistics of the per-probe sums of the layers' random samples (`None` when
    /// resumed from a checkpoint written before mixq recorded them).
    pub total: Option<Welford>,
}

impl TraceState {
    /// The state before the first probe.
    pub fn new(offset: Vec<f64>, hvps: u64) -> Self {
        let stats = vec![Welford::default(); offset.len()];
        TraceState { probes: 0, hvps, offset, stats, total: Some(Welford::default()) }
    }

    /// JSON with every float as its exact bit pattern (hex), so that a resumed run continues
    /// from exactly the numbers it stopped at: decimal floats need not parse back bit for bit.
    pub fn to_json(&self) -> serde_json::Value {
        let hex = |x: f64| format!("{:016x}", x.to_bits());
        let mut v = serde_json::json!({
            "probes": self.probes,
            "hvps": self.hvps,
            "offset": self.offset.iter().map(|&o| hex(o)).collect::<Vec<_>>(),
            "stats": self.stats.iter().map(|w| serde_json::json!([w.n, hex(w.mean), hex(w.m2)])).collect::<Vec<_>>(),
        });
        if let Some(w) = &self.total {
            v["total"] = serde_json::json!([w.n, hex(w.mean), hex(w.m2)]);
        }
        v
    }

    /// Reads [`TraceState::to_json`]; `origin` names the file in errors.
    pub fn from_json(v: &serde_json::Value, origin: &std::path::Path) -> Result<Self> {
        let bad = || Error::parse(origin, "malformed trace state in checkpoint: delete the file, or run without --resume");
        let float = |v: &serde_json::Value| v.as_str().and_then(|s| u64::from_str_radix(s, 16).ok()).map(f64::from_bits).ok_or_else(bad);
        let probes = v["probes"].as_u64().ok_or_else(bad)?;
        let hvps = v["hvps"].as_u64().ok_or_else(bad)?;
        let offset = v["offset"].as_array().ok_or_else(bad)?.iter().map(float).collect::<Result<Vec<_>>>()?;
        let stats = v["stats"]
            .as_array()
            .ok_or_else(bad)?
            .iter()
            .map(|w| Ok(Welford { n: w[0].as_u64().ok_or_else(bad)?, mean: float(&w[1])?, m2: float(&w[2])? }))
            .collect::<Result<Vec<_>>>()?;
        // Checkpoints written before the total was recorded have no `total`: the resumed run
        // then reports no total.
        let total = match v.get("total") {
            None => None,
            Some(w) => Some(Welford { n: w[0].as_u64().ok_or_else(bad)?, mean: float(&w[1])?, m2: float(&w[2])? }),
        };
        if stats.len() != offset.len() || stats.iter().any(|w| w.n != probes) || total.is_some_and(|w| w.n != probes) {
            return Err(bad());
        }
        Ok(TraceState { probes, hvps, offset, stats, total })
    }
}

/// Called with the state after every pass; an error aborts the run (and is returned).
pub type Checkpoint<'a> = &'a mut dyn FnMut(&TraceState) -> Result<()>;

/// What a progress callback sees after each pass.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Progress {
    /// Probes so far.
    pub probes: u64,
    /// Largest CI half-width relative to |trace| over the layers not yet converged (0 when all are).
    pub worst_rel_ci: f64,
    /// Layers converged so far.
    pub converged: usize,
}

/// Per-layer statistics of the random part, plus an exact offset (Hutch++'s deterministic part).
pub(crate) fn summarize(offset: &[f64], stats: &[Welford], s: &TraceSettings) -> (Vec<LayerTrace>, Progress) {
    let traces: Vec<f64> = offset.iter().zip(stats).map(|(o, w)| o + w.mean).collect();
    let total_abs: f64 = traces.iter().map(|t| t.abs()).sum();
    let mut worst: f64 = 0.0;
    let mut converged = 0;
    let layers: Vec<LayerTrace> = traces
        .iter()
        .zip(stats)
        .map(|(&trace, w)| {
            let se = w.std_err();
            let ci = t975(w.n.saturating_sub(1)) * se;
            let ok = w.n >= s.min_probes.max(2) && (ci <= s.tol * trace.abs() || ci <= s.tol_floor * total_abs);
            if ok {
                converged += 1;
            } else {
                worst = worst.max(if trace != 0.0 { ci / trace.abs() } else { f64::INFINITY });
            }
            LayerTrace { trace, std_err: se, ci95: ci, probes: w.n, converged: ok }
        })
        .collect();
    let probes = stats.first().map(|w| w.n).unwrap_or(0);
    (layers, Progress { probes, worst_rel_ci: worst, converged })
}

fn layer_dot(a: &Tensor, b: &Tensor) -> f64 {
    (a.to_kind(Kind::Double) * b.to_kind(Kind::Double)).sum(Kind::Double).double_value(&[])
}

/// Hutchinson's estimator of every layer's Hessian trace, stopped by the CI rule.
pub fn hutchinson(engine: &HvpEngine<'_>, s: &TraceSettings, progress: &mut dyn FnMut(&Progress)) -> Result<TraceEstimate> {
    hutchinson_resumable(engine, s, None, &mut |_| Ok(()), progress)
}

/// [`hutchinson`], continued from `from` (a state an earlier run with the same settings passed
/// to its checkpoint callback) and calling `checkpoint` after every pass.
pub fn hutchinson_resumable(
    engine: &HvpEngine<'_>,
    s: &TraceSettings,
    from: Option<TraceState>,
    checkpoint: Checkpoint<'_>,
    progress: &mut dyn FnMut(&Progress),
) -> Result<TraceEstimate> {
    s.validate()?;
    let shapes = engine.shapes();
    let state = match from {
        Some(st) => check_resumed(st, shapes.len(), None)?,
        None => TraceState::new(vec![0.0; shapes.len()], 0),
    };
    run_passes(s, state, checkpoint, progress, &mut |idx| {
        let probes: Vec<Vec<Tensor>> = idx.iter().map(|&i| rademacher(&shapes, s.seed, stream::HUTCHINSON, i)).collect();
        let hvs = engine.hvp_many(&probes)?;
        Ok(probes.iter().zip(&hvs).map(|(v, hv)| v.iter().zip(hv).map(|(a, b)| layer_dot(a, b)).collect()).collect())
    })
}

/// Checks that a state to resume from fits this model (and, for Hutch++, this sketch).
fn check_resumed(st: TraceState, layers: usize, offset: Option<&[f64]>) -> Result<TraceState> {
    if st.stats.len() != layers || st.offset.len() != layers {
        return Err(Error::invalid(
            "resume",
            format!("{} layers", st.stats.len()),
            format!("the checkpoint is of a model with {} layers, this one has {layers}: run without --resume", st.stats.len()),
        ));
    }
    if let Some(now) = offset {
        let total: f64 = now.iter().map(|o| o.abs()).sum();
        let worst = st.offset.iter().zip(now).map(|(a, b)| (a - b).abs()).fold(0.0, f64::max);
        if worst > SKETCH_AGREEMENT * total.max(f64::MIN_POSITIVE) {
            return Err(Error::invalid(
                "resume",
                "hutchpp",
                format!("the recomputed Hutch++ sketch differs from the checkpoint's by {worst:.3e} (of Σ|offset| {total:.3e}): different hardware or libtorch? run without --resume"),
            ));
        }
    }
    Ok(st)
}

/// Relative agreement (of Σ|exact part|) required of two computations of the same Hutch++
/// sketch: bit-identical on one machine, float32 rounding apart across machines.
pub const SKETCH_AGREEMENT: f64 = 1e-4;

/// Per-layer samples of the probes with the given global indices, one row per probe.
type Samples<'a> = &'a mut dyn FnMut(&[u64]) -> Result<Vec<Vec<f64>>>;

/// The loop shared by both estimators: passes of `s.block` probes (global indices of this
/// shard) through `samples`, which returns per probe the per-layer samples; after each pass the
/// checkpoint, the progress callback, and the stopping rule (a shard runs its whole share).
fn run_passes(
    s: &TraceSettings,
    mut st: TraceState,
    checkpoint: Checkpoint<'_>,
    progress: &mut dyn FnMut(&Progress),
    samples: Samples<'_>,
) -> Result<TraceEstimate> {
    let limit = s.shard.share(s.max_probes);
    let nl = st.stats.len();
    loop {
        if st.probes > 0 {
            let (layers, p) = summarize(&st.offset, &st.stats, s);
            progress(&p);
            if st.probes >= limit || (s.shard.is_whole() && p.converged == nl) {
                let total = st.total.map(|w| TotalTrace::new(st.offset.iter().sum(), w));
                return Ok(TraceEstimate { layers, total, probes: st.probes, hvps: st.hvps, state: st });
            }
        }
        let m = s.block.min(limit - st.probes);
        let idx: Vec<u64> = (st.probes..st.probes + m).map(|j| s.shard.global(j)).collect();
        for sample in samples(&idx)? {
            if let Some(t) = &mut st.total {
                t.push(sample.iter().sum());
            }
            for (w, x) in st.stats.iter_mut().zip(sample) {
                w.push(x);
            }
        }
        st.probes += m;
        st.hvps += m;
        checkpoint(&st)?;
    }
}

/// Flattens a per-layer vector into one column.
fn flat(v: &[Tensor]) -> Tensor {
    Tensor::cat(&v.iter().map(|t| t.flatten(0, -1)).collect::<Vec<_>>(), 0)
}

/// Splits a column back into per-layer tensors.
fn unflat(col: &Tensor, shapes: &[Vec<i64>]) -> Vec<Tensor> {
    let mut out = Vec::with_capacity(shapes.len());
    let mut off = 0;
    for s in shapes {
        let n: i64 = s.iter().product();
        out.push(col.narrow(0, off, n).reshape(s.as_slice()));
        off += n;
    }
    out
}

/// Per-layer dots of two flat columns.
fn layer_dots(a: &Tensor, b: &Tensor, shapes: &[Vec<i64>]) -> Vec<f64> {
    unflat(a, shapes).iter().zip(unflat(b, shapes)).map(|(x, y)| layer_dot(x, &y)).collect()
}

/// The Hutch++-style estimator adapted to per-layer traces (see the module docs): `s.sketch`
/// sketch products, as many for HQ, then residual probes until the CI rule holds.
pub fn hutchpp(engine: &HvpEngine<'_>, s: &TraceSettings, progress: &mut dyn FnMut(&Progress)) -> Result<TraceEstimate> {
    hutchpp_resumable(engine, s, None, &mut |_| Ok(()), progress)
}

/// [`hutchpp`], continued from `from` and calling `checkpoint` after every pass. The sketch is
/// recomputed on resume (it depends only on the seed) and must agree with the checkpoint's.
pub fn hutchpp_resumable(
    engine: &HvpEngine<'_>,
    s: &TraceSettings,
    from: Option<TraceState>,
    checkpoint: Checkpoint<'_>,
    progress: &mut dyn FnMut(&Progress),
) -> Result<TraceEstimate> {
    s.validate()?;
    let start = engine.hvp_count();
    let shapes = engine.shapes();
    let nl = shapes.len();
    let total: i64 = shapes.iter().map(|s| s.iter().product::<i64>()).sum();
    let k = s.sketch.min(total.max(1) as u64);
    let mut offset = vec![0.0; nl];
    let q = if k > 0 {
        let sketch: Vec<Vec<Tensor>> = (0..k).map(|i| rademacher(&shapes, s.seed, stream::SKETCH, i)).collect();
        let y = engine.hvp_many(&sketch)?;
        let ymat = Tensor::stack(&y.iter().map(|c| flat(c).to_kind(Kind::Double)).collect::<Vec<_>>(), 1);
        let (q, _) = Tensor::f_linalg_qr(&ymat, "reduced")?;
        let qcols: Vec<Vec<Tensor>> = (0..k as i64).map(|j| unflat(&q.select(1, j).to_kind(Kind::Float), &shapes)).collect();
        let hq = engine.hvp_many(&qcols)?;
        let hqmat = Tensor::stack(&hq.iter().map(|c| flat(c).to_kind(Kind::Double)).collect::<Vec<_>>(), 1);
        // R H Q = HQ − Q (Qᵀ HQ)
        let rhq = &hqmat - q.matmul(&q.tr().matmul(&hqmat));
        for j in 0..k as i64 {
            let qj = q.select(1, j);
            let a = layer_dots(&qj, &hqmat.select(1, j), &shapes);
            let b = layer_dots(&qj, &rhq.select(1, j), &shapes);
            for i in 0..nl {
                offset[i] += a[i] + b[i];
            }
        }
        Some(q)
    } else {
        None
    };
    let project = |col: Tensor| -> Tensor {
        match &q {
            Some(q) => &col - q.matmul(&q.tr().matmul(&col)),
            None => col,
        }
    };
    let state = match from {
        Some(st) => check_resumed(st, nl, Some(&offset))?,
        None => TraceState::new(offset, engine.hvp_count() - start),
    };
    run_passes(s, state, checkpoint, progress, &mut |idx| {
        let rg: Vec<Tensor> =
            idx.iter().map(|&i| project(flat(&rademacher(&shapes, s.seed, stream::RESIDUAL, i)).to_kind(Kind::Double))).collect();
        let probes: Vec<Vec<Tensor>> = rg.iter().map(|c| unflat(&c.to_kind(Kind::Float), &shapes)).collect();
        let hvs = engine.hvp_many(&probes)?;
        Ok(rg.iter().zip(&hvs).map(|(g, hv)| layer_dots(g, &project(flat(hv).to_kind(Kind::Double)), &shapes)).collect())
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::data::Dataset;
    use crate::model::zoo::DigitsResNet;
    use crate::sensitivity::hvp::Curvature;

    /// Relative agreement of the same numbers summed in another order.
    const REL: f64 = 1e-9;

    fn close(a: f64, b: f64) -> bool {
        (a - b).abs() <= REL * a.abs().max(b.abs()).max(1e-300)
    }

    fn fixed(probes: u64) -> TraceSettings {
        TraceSettings { min_probes: probes, max_probes: probes, block: 3, tol: 1e-9, tol_floor: 0.0, ..Default::default() }
    }

    #[test]
    fn the_total_comes_from_per_probe_totals() -> Result<()> {
        let model = DigitsResNet::untrained();
        let data = Dataset::digits("calib")?.take(8);
        let engine = HvpEngine::new(&model, &data, 8, Curvature::Hessian)?;
        let s = fixed(7);
        let r = hutchinson(&engine, &s, &mut |_| {})?;
        let total = r.total.as_ref().expect("a fresh run records its total");
        // The samples of the total, recomputed probe by probe.
        let shapes = engine.shapes();
        let mut w = Welford::default();
        for i in 0..s.max_probes {
            let v = rademacher(&shapes, s.seed, stream::HUTCHINSON, i);
            let hv = engine.hvp(&v)?;
            w.push(v.iter().zip(&hv).map(|(a, b)| layer_dot(a, b)).sum());
        }
        let sum: f64 = r.layers.iter().map(|l| l.trace).sum();
        assert!(close(total.trace, sum), "total {} vs Σ layer traces {sum}", total.trace);
        assert!(close(total.trace, w.mean), "total {} vs recomputed {}", total.trace, w.mean);
        assert!(close(total.std_err, w.std_err()), "s.e. {} vs recomputed {}", total.std_err, w.std_err());
        assert_eq!(total.probes, s.max_probes);
        assert_eq!(total.stats.offset, 0.0);
        assert!(close(total.ci95, t975(s.max_probes - 1) * total.std_err));
        // Minkowski: the sample s.d. of a sum is at most the sum of the s.d.s.
        let sum_se: f64 = r.layers.iter().map(|l| l.std_err).sum();
        assert!(total.std_err <= sum_se * (1.0 + REL), "s.e. {} > Σ se_i {sum_se}", total.std_err);
        Ok(())
    }

    #[test]
    fn the_hutchpp_total_is_its_exact_sketch_part_plus_residual_samples() -> Result<()> {
        let model = DigitsResNet::untrained();
        let data = Dataset::digits("calib")?.take(8);
        let engine = HvpEngine::new(&model, &data, 8, Curvature::Ggn)?;
        let s = TraceSettings { sketch: 3, ..fixed(5) };
        let r = hutchpp(&engine, &s, &mut |_| {})?;
        let total = r.total.as_ref().expect("total");
        let sum: f64 = r.layers.iter().map(|l| l.trace).sum();
        assert!(close(total.trace, sum), "total {} vs Σ layer traces {sum}", total.trace);
        assert!(close(total.stats.offset, r.state.offset.iter().sum()));
        assert!(total.std_err > 0.0 && total.std_err.is_finite());
        Ok(())
    }

    #[test]
    fn trace_state_json_keeps_the_total_and_reads_checkpoints_without_it() -> Result<()> {
        let mut st = TraceState::new(vec![0.5, -1.25], 7);
        for x in [0.1, 0.7, -0.3] {
            st.stats[0].push(x);
            st.stats[1].push(2.0 * x);
            st.total.as_mut().expect("total").push(3.0 * x);
        }
        st.probes = 3;
        let origin = std::path::Path::new("ckpt.json");
        assert_eq!(TraceState::from_json(&st.to_json(), origin)?, st);
        let mut old = st.to_json();
        old.as_object_mut().expect("object").remove("total");
        assert_eq!(TraceState::from_json(&old, origin)?, TraceState { total: None, ..st.clone() });
        let mut bad = st.to_json();
        bad["total"][0] = serde_json::json!(2);
        assert!(TraceState::from_json(&bad, origin).is_err(), "a total over other probes is refused");
        Ok(())
    }
}
