//! Top eigenvalue of each layer's Hessian block (HAWQ-V1) by power iteration on
//! layer-restricted products.
//!
//! A probe that is zero outside layer i gives H_{·i} v_i, whose block i is H_ii v_i; all layers
//! iterate together and share each batch's forward pass ([`HvpEngine::hvp_many`]). Power
//! iteration converges to the eigenvalue of largest magnitude (negative when the block's most
//! negative curvature dominates), which is what a worst-case perturbation bound needs.

use super::hvp::HvpEngine;
use super::stats::{rademacher, stream};
use crate::error::Result;
use serde::{Deserialize, Serialize};
use tch::{Kind, Tensor};

/// Settings of the power iteration.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct EigenSettings {
    /// Stop a layer when the Rayleigh quotient changes by less than this, relatively.
    pub tol: f64,
    /// Iteration limit.
    pub max_iters: u64,
    /// Seed of the start vectors.
    pub seed: u64,
}

impl Default for EigenSettings {
    fn default() -> Self {
        EigenSettings { tol: 1e-4, max_iters: 100, seed: 0 }
    }
}

/// One layer's top eigenvalue.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LayerEigen {
    /// The eigenvalue of largest magnitude (Rayleigh quotient at the last iterate).
    pub value: f64,
    /// Iterations (products) used.
    pub iters: u64,
    /// Whether the relative change fell below `tol`.
    pub converged: bool,
}

fn norm(t: &Tensor) -> f64 {
    t.to_kind(Kind::Double).square().sum(Kind::Double).double_value(&[]).sqrt()
}

/// The top eigenvalue of every layer's block.
pub fn top_eigenvalues(engine: &HvpEngine<'_>, s: &EigenSettings) -> Result<Vec<LayerEigen>> {
    let shapes = engine.shapes();
    let nl = shapes.len();
    let start = rademacher(&shapes, s.seed, stream::POWER, 0);
    let mut v: Vec<Tensor> = start.into_iter().map(|t| &t / norm(&t).max(f64::MIN_POSITIVE)).collect();
    let mut out: Vec<LayerEigen> = (0..nl).map(|_| LayerEigen { value: 0.0, iters: 0, converged: false }).collect();
    for _ in 0..s.max_iters {
        let active: Vec<usize> = (0..nl).filter(|&i| !out[i].converged).collect();
        if active.is_empty() {
            break;
        }
        let probes: Vec<Vec<Tensor>> = active
            .iter()
            .map(|&i| {
                (0..nl)
                    .map(|j| if j == i { v[i].shallow_clone() } else { Tensor::zeros(shapes[j].as_slice(), (Kind::Float, v[j].device())) })
                    .collect()
            })
            .collect();
        let hvs = engine.hvp_many(&probes)?;
        for (&i, hv) in active.iter().zip(hvs) {
            let h = &hv[i];
            let lambda = (h.to_kind(Kind::Double) * v[i].to_kind(Kind::Double)).sum(Kind::Double).double_value(&[]);
            let prev = out[i].value;
            out[i].iters += 1;
            out[i].value = lambda;
            if out[i].iters > 1 && (lambda - prev).abs() <= s.tol * lambda.abs().max(f64::MIN_POSITIVE) {
                out[i].converged = true;
            }
            let n = norm(h);
            if n > 0.0 {
                v[i] = h / n;
            } else {
                out[i].converged = true;
            }
        }
    }
    Ok(out)
}
