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

use super::hvp::HvpEngine;
use super::stats::{rademacher, stream, t975, Welford};
use crate::error::{Error, Result};
use serde::{Deserialize, Serialize};
use tch::{Kind, Tensor};

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
}

impl Default for TraceSettings {
    fn default() -> Self {
        TraceSettings { tol: 0.05, tol_floor: 1e-3, min_probes: 10, max_probes: 200, block: 4, seed: 0, sketch: 8 }
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

/// The result of a trace estimation.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TraceEstimate {
    /// Per layer, in the engine's layer order.
    pub layers: Vec<LayerTrace>,
    /// Random probes used (residual probes for Hutch++).
    pub probes: u64,
    /// Curvature–vector products used, sketch included.
    pub hvps: u64,
}

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
fn summarize(offset: &[f64], stats: &[Welford], s: &TraceSettings) -> (Vec<LayerTrace>, Progress) {
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
    s.validate()?;
    let start = engine.hvp_count();
    let shapes = engine.shapes();
    let nl = shapes.len();
    let offset = vec![0.0; nl];
    let mut stats = vec![Welford::default(); nl];
    let mut k = 0u64;
    loop {
        let m = s.block.min(s.max_probes - k);
        let probes: Vec<Vec<Tensor>> = (k..k + m).map(|i| rademacher(&shapes, s.seed, stream::HUTCHINSON, i)).collect();
        let hvs = engine.hvp_many(&probes)?;
        for (v, hv) in probes.iter().zip(&hvs) {
            for (i, w) in stats.iter_mut().enumerate() {
                w.push(layer_dot(&v[i], &hv[i]));
            }
        }
        k += m;
        let (layers, p) = summarize(&offset, &stats, s);
        progress(&p);
        if p.converged == nl || k >= s.max_probes {
            return Ok(TraceEstimate { layers, probes: k, hvps: engine.hvp_count() - start });
        }
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
    let mut stats = vec![Welford::default(); nl];
    let mut m_done = 0u64;
    loop {
        let m = s.block.min(s.max_probes - m_done);
        let rg: Vec<Tensor> =
            (m_done..m_done + m).map(|i| project(flat(&rademacher(&shapes, s.seed, stream::RESIDUAL, i)).to_kind(Kind::Double))).collect();
        let probes: Vec<Vec<Tensor>> = rg.iter().map(|c| unflat(&c.to_kind(Kind::Float), &shapes)).collect();
        let hvs = engine.hvp_many(&probes)?;
        for (g, hv) in rg.iter().zip(&hvs) {
            let rhrg = project(flat(hv).to_kind(Kind::Double));
            for (w, d) in stats.iter_mut().zip(layer_dots(g, &rhrg, &shapes)) {
                w.push(d);
            }
        }
        m_done += m;
        let (layers, p) = summarize(&offset, &stats, s);
        progress(&p);
        if p.converged == nl || m_done >= s.max_probes {
            return Ok(TraceEstimate { layers, probes: m_done, hvps: engine.hvp_count() - start });
        }
    }
}
