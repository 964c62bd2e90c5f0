//! Top eigenvalue of each layer's Hessian block (HAWQ-V1), by Lanczos with full
//! reorthogonalization ([`lanczos`], what [`top_eigenvalues`] runs) or by power iteration
//! ([`power_iteration`]), on layer-restricted products.
//!
//! A probe that is zero outside layer i gives H_{·i} v_i, whose block i is H_ii v_i; all layers
//! iterate together and share each batch's forward pass ([`HvpEngine::hvp_many`]). Both methods
//! return the eigenvalue of largest magnitude (negative when the block's most negative curvature
//! dominates), which is what a worst-case perturbation bound needs.
//!
//! **Why Lanczos.** Power iteration's error shrinks like (λ₂/λ₁)^{2k}: slowly when the top of the
//! spectrum is crowded, as it is in Hessian blocks. Lanczos builds the Krylov space of the same
//! products and takes the best eigenvalue in it (the Ritz value of the tridiagonal T_k, solved by
//! nalgebra's `SymmetricEigen`); its error shrinks with the Chebyshev rate, about
//! exp(−4k·√(gap/spread)). Keeping every basis vector and orthogonalizing against all of them
//! (twice) costs memory (k float64 vectors per layer) but avoids the ghost eigenvalues of plain
//! Lanczos; past [`LANCZOS_MEMORY_LIMIT`] for all layers together, [`top_eigenvalues`] falls back
//! to power iteration.
//!
//! **Stopping.** Lanczos stops a layer when the residual ‖H y − θ y‖ = β_k |s_k| of its extreme
//! Ritz pair is at most `tol`·|θ|: some eigenvalue of the block then lies within `tol`·|θ| of θ
//! (a bound, not a heuristic), or when the Krylov space is invariant, or when it spans the layer.
//! Power iteration stops when the Rayleigh quotient changes by less than `tol`, relatively (a
//! heuristic: slow convergence can stop it early).

use super::hvp::HvpEngine;
use super::stats::{rademacher, stream};
use crate::error::Result;
use nalgebra::{DMatrix, SymmetricEigen};
use serde::{Deserialize, Serialize};
use tch::{Device, Kind, Tensor};

/// Settings of the eigenvalue iterations.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct EigenSettings {
    /// Lanczos: stop a layer when its Ritz residual is at most this fraction of |θ|. Power
    /// iteration: when the Rayleigh quotient changes by less than this, relatively.
    pub tol: f64,
    /// Iteration limit (products per layer).
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
    /// The eigenvalue of largest magnitude (Ritz value or Rayleigh quotient at the last iterate).
    pub value: f64,
    /// Iterations (products) used.
    pub iters: u64,
    /// Whether the stopping rule was met.
    pub converged: bool,
}

/// A batch of block products: for each `(layer, v)` with `v` a flat float64 vector of that
/// layer's size, the flat float64 product of the layer's curvature block with `v`.
pub type BlockOp<'a> = dyn FnMut(&[(usize, Tensor)]) -> Result<Vec<Tensor>> + 'a;

fn dot(a: &Tensor, b: &Tensor) -> f64 {
    a.dot(b).double_value(&[])
}

fn norm(t: &Tensor) -> f64 {
    dot(t, t).sqrt()
}

/// Flat float64 start vectors (Rademacher, seeded), one per layer.
fn start_vectors(shapes: &[Vec<i64>], seed: u64, device: Device) -> Vec<Tensor> {
    rademacher(shapes, seed, stream::POWER, 0).into_iter().map(|t| t.flatten(0, -1).to_kind(Kind::Double).to_device(device)).collect()
}

/// Block products of `engine` on flat float64 vectors: one pass of [`HvpEngine::hvp_many`].
fn engine_op<'e>(engine: &'e HvpEngine<'_>) -> impl FnMut(&[(usize, Tensor)]) -> Result<Vec<Tensor>> + 'e {
    let shapes = engine.shapes();
    move |batch: &[(usize, Tensor)]| {
        let w = engine.weights();
        let probes: Vec<Vec<Tensor>> = batch
            .iter()
            .map(|(i, v)| {
                (0..w.len())
                    .map(|j| {
                        if j == *i {
                            v.to_kind(w[j].kind()).reshape(shapes[j].as_slice())
                        } else {
                            Tensor::zeros(shapes[j].as_slice(), (w[j].kind(), w[j].device()))
                        }
                    })
                    .collect()
            })
            .collect();
        let hvs = engine.hvp_many(&probes)?;
        Ok(batch.iter().zip(hvs).map(|((i, _), hv)| hv[*i].flatten(0, -1).to_kind(Kind::Double)).collect())
    }
}

fn engine_device(engine: &HvpEngine<'_>) -> Device {
    engine.weights().first().map(Tensor::device).unwrap_or(Device::Cpu)
}

/// Most memory the Lanczos bases of all layers may take together (float64 vectors); beyond it
/// [`top_eigenvalues`] falls back to power iteration, which keeps one vector per layer.
pub const LANCZOS_MEMORY_LIMIT: u64 = 2 << 30;

/// Bytes the Lanczos bases would take at most: Σ_i n_i · min(max_iters, n_i) · 8.
pub fn lanczos_memory(shapes: &[Vec<i64>], max_iters: u64) -> u64 {
    shapes
        .iter()
        .map(|s| {
            let n = s.iter().product::<i64>().max(0) as u64;
            n.saturating_mul(max_iters.min(n)).saturating_mul(8)
        })
        .fold(0u64, u64::saturating_add)
}

/// The top eigenvalue of every layer's block: by [`lanczos`], or by [`power_iteration`] when the
/// Krylov bases would exceed [`LANCZOS_MEMORY_LIMIT`] (large layers with many iterations).
pub fn top_eigenvalues(engine: &HvpEngine<'_>, s: &EigenSettings) -> Result<Vec<LayerEigen>> {
    let bytes = lanczos_memory(&engine.shapes(), s.max_iters);
    if bytes > LANCZOS_MEMORY_LIMIT {
        tracing::warn!(
            bytes,
            limit = LANCZOS_MEMORY_LIMIT,
            "Lanczos bases would need {:.1} GiB; using power iteration (one vector per layer) for the top eigenvalues",
            bytes as f64 / (1u64 << 30) as f64
        );
        return power_iteration(engine, s);
    }
    lanczos(engine, s)
}

/// The top eigenvalue of every layer's block by Lanczos with full reorthogonalization.
pub fn lanczos(engine: &HvpEngine<'_>, s: &EigenSettings) -> Result<Vec<LayerEigen>> {
    let shapes = engine.shapes();
    let device = engine_device(engine);
    lanczos_op(&shapes, s, device, &mut engine_op(engine))
}

/// The top eigenvalue of every layer's block by power iteration.
pub fn power_iteration(engine: &HvpEngine<'_>, s: &EigenSettings) -> Result<Vec<LayerEigen>> {
    let shapes = engine.shapes();
    let device = engine_device(engine);
    power_op(&shapes, s, device, &mut engine_op(engine))
}

/// Power iteration on any block operator (layer sizes from `shapes`).
pub fn power_op(shapes: &[Vec<i64>], s: &EigenSettings, device: Device, op: &mut BlockOp<'_>) -> Result<Vec<LayerEigen>> {
    let nl = shapes.len();
    let mut v: Vec<Tensor> = start_vectors(shapes, s.seed, device).into_iter().map(|t| &t / norm(&t).max(f64::MIN_POSITIVE)).collect();
    let mut out: Vec<LayerEigen> = (0..nl).map(|_| LayerEigen { value: 0.0, iters: 0, converged: false }).collect();
    for _ in 0..s.max_iters {
        let active: Vec<usize> = (0..nl).filter(|&i| !out[i].converged).collect();
        if active.is_empty() {
            break;
        }
        let batch: Vec<(usize, Tensor)> = active.iter().map(|&i| (i, v[i].shallow_clone())).collect();
        let hvs = op(&batch)?;
        for (&i, h) in active.iter().zip(hvs) {
            let lambda = dot(&h, &v[i]);
            let prev = out[i].value;
            out[i].iters += 1;
            out[i].value = lambda;
            if out[i].iters > 1 && (lambda - prev).abs() <= s.tol * lambda.abs().max(f64::MIN_POSITIVE) {
                out[i].converged = true;
            }
            let n = norm(&h);
            if n > 0.0 {
                v[i] = h / n;
            } else {
                out[i].converged = true;
            }
        }
    }
    Ok(out)
}

/// One layer's Lanczos state.
struct Krylov {
    /// Orthonormal basis q_0..q_k (flat, float64).
    q: Vec<Tensor>,
    alpha: Vec<f64>,
    beta: Vec<f64>,
    /// Size of the layer (the Krylov space cannot grow beyond it).
    dim: usize,
}

impl Krylov {
    /// Ritz value of largest magnitude of T_k and its residual norm β_k |s_k|.
    fn extreme_ritz(&self, beta_k: f64) -> (f64, f64) {
        let k = self.alpha.len();
        let t = DMatrix::from_fn(k, k, |r, c| {
            if r == c {
                self.alpha[r]
            } else if r + 1 == c {
                self.beta[r]
            } else if c + 1 == r {
                self.beta[c]
            } else {
                0.0
            }
        });
        let e = SymmetricEigen::new(t);
        let j = (0..k).max_by(|&a, &b| e.eigenvalues[a].abs().total_cmp(&e.eigenvalues[b].abs())).unwrap_or(0);
        (e.eigenvalues[j], beta_k * e.eigenvectors[(k - 1, j)].abs())
    }
}

/// Removes from `w` its components along `basis`, twice ("twice is enough", Parlett).
fn orthogonalize(mut w: Tensor, basis: &[Tensor]) -> Tensor {
    for _ in 0..2 {
        for q in basis {
            let c = dot(q, &w);
            w -= q * c;
        }
    }
    w
}

/// Lanczos with full reorthogonalization on any block operator (layer sizes from `shapes`).
pub fn lanczos_op(shapes: &[Vec<i64>], s: &EigenSettings, device: Device, op: &mut BlockOp<'_>) -> Result<Vec<LayerEigen>> {
    let nl = shapes.len();
    let mut kry: Vec<Krylov> = start_vectors(shapes, s.seed, device)
        .into_iter()
        .map(|t| {
            let dim = t.numel();
            let q0 = &t / norm(&t).max(f64::MIN_POSITIVE);
            Krylov { q: vec![q0], alpha: Vec::new(), beta: Vec::new(), dim }
        })
        .collect();
    let mut out: Vec<LayerEigen> = (0..nl).map(|_| LayerEigen { value: 0.0, iters: 0, converged: false }).collect();
    for _ in 0..s.max_iters {
        let active: Vec<usize> = (0..nl).filter(|&i| !out[i].converged).collect();
        if active.is_empty() {
            break;
        }
        let batch: Vec<(usize, Tensor)> = active.iter().map(|&i| (i, kry[i].q.last().expect("basis").shallow_clone())).collect();
        let hvs = op(&batch)?;
        for (&i, w) in active.iter().zip(hvs) {
            let k = &mut kry[i];
            let q = k.q.last().expect("basis");
            let a = dot(q, &w);
            k.alpha.push(a);
            // Full reorthogonalization subsumes the three-term recurrence w − α q_k − β q_{k−1}.
            let w = orthogonalize(w, &k.q);
            let b = norm(&w);
            let (theta, resid) = k.extreme_ritz(b);
            let o = &mut out[i];
            o.iters += 1;
            o.value = theta;
            let scale = k.alpha.iter().map(|x| x.abs()).chain(k.beta.iter().copied()).fold(0.0, f64::max);
            let invariant = b <= 1e-12 * scale.max(f64::MIN_POSITIVE);
            if resid <= s.tol * theta.abs() || invariant || k.q.len() >= k.dim {
                o.converged = true;
            } else {
                k.beta.push(b);
                k.q.push(w / b);
            }
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A symmetric `n×n` float64 matrix Q diag(λ) Qᵀ with a seeded random orthogonal Q.
    fn sym(eigs: &[f64], seed: i64) -> Tensor {
        tch::manual_seed(seed);
        let n = eigs.len() as i64;
        let (q, _) = Tensor::linalg_qr(&Tensor::randn([n, n], (Kind::Double, Device::Cpu)), "reduced");
        let d = Tensor::from_slice(eigs);
        q.matmul(&d.diag_embed(0, -2, -1)).matmul(&q.tr())
    }

    fn matrix_op(ms: &[Tensor]) -> impl FnMut(&[(usize, Tensor)]) -> Result<Vec<Tensor>> + '_ {
        move |b: &[(usize, Tensor)]| Ok(b.iter().map(|(i, v)| ms[*i].mv(v)).collect())
    }

    fn shapes_of(ms: &[Tensor]) -> Vec<Vec<i64>> {
        ms.iter().map(|m| vec![m.size()[0]]).collect()
    }

    /// Spectra: a crowded top (λ₂/λ₁ ≈ 0.96, slow for power iteration), a dominant negative
    /// eigenvalue, and a tiny layer that Lanczos spans exactly.
    fn spectra() -> Vec<(Vec<f64>, f64)> {
        let crowded: Vec<f64> = (0..200).map(|j| 1.0 * 0.97f64.powi(j) - 0.2).collect();
        let mut negative: Vec<f64> = (0..150).map(|j| (j as f64) / 150.0).collect();
        negative[17] = -3.0;
        negative[3] = -2.7;
        let tiny = vec![0.5, -0.1, 0.25];
        vec![(crowded, 0.8), (negative, -3.0), (tiny, 0.5)]
    }

    const REL_TOL: f64 = 1e-4;

    #[test]
    fn lanczos_finds_the_eigenvalue_of_largest_magnitude() -> Result<()> {
        let sp = spectra();
        let ms: Vec<Tensor> = sp.iter().enumerate().map(|(i, (e, _))| sym(e, i as i64)).collect();
        let s = EigenSettings { tol: REL_TOL, max_iters: 300, seed: 1 };
        let r = lanczos_op(&shapes_of(&ms), &s, Device::Cpu, &mut matrix_op(&ms))?;
        for (i, ((_, want), got)) in sp.iter().zip(&r).enumerate() {
            let rel = (got.value - want).abs() / want.abs();
            assert!(got.converged, "layer {i}: not converged after {} iterations", got.iters);
            assert!(rel <= REL_TOL, "layer {i}: Lanczos {} vs exact {want}: rel error {rel:.2e} > {REL_TOL:.0e}", got.value);
        }
        // The tiny layer: the Krylov space spans it after 3 products, so the answer is exact.
        assert!(r[2].iters <= 3 && (r[2].value - 0.5).abs() < 1e-12, "{:?}", r[2]);
        Ok(())
    }

    /// [`lanczos_op`] or [`power_op`].
    type Method = fn(&[Vec<i64>], &EigenSettings, Device, &mut BlockOp<'_>) -> Result<Vec<LayerEigen>>;

    /// Relative error of each method after exactly m products, for m = 1..=max.
    fn error_curve(method: Method, m: &Tensor, want: f64, max: u64) -> Result<Vec<f64>> {
        let ms = [m.shallow_clone()];
        let shapes = shapes_of(&ms);
        (1..=max)
            .map(|it| {
                let s = EigenSettings { tol: 0.0, max_iters: it, seed: 3 };
                Ok((method(&shapes, &s, Device::Cpu, &mut matrix_op(&ms))?[0].value - want).abs() / want.abs())
            })
            .collect()
    }

    fn first_below(curve: &[f64], tol: f64) -> Option<usize> {
        curve.iter().position(|&e| e <= tol).map(|p| p + 1)
    }

    #[test]
    fn lanczos_needs_fewer_products_than_power_iteration() -> Result<()> {
        let (eigs, want) = &spectra()[0];
        let m = sym(eigs, 7);
        let lz = error_curve(lanczos_op, &m, *want, 40)?;
        let pw = error_curve(power_op, &m, *want, 200)?;
        for tol in [1e-2, 1e-4, 1e-8] {
            let (l, p) = (first_below(&lz, tol), first_below(&pw, tol));
            eprintln!("crowded spectrum (λ₂/λ₁ ≈ 0.96), rel error ≤ {tol:.0e}: Lanczos {l:?} products, power iteration {p:?}");
            let l = l.expect("Lanczos reaches the tolerance");
            assert!(p.is_none_or(|p| l < p), "Lanczos {l} products, power iteration {p:?}");
        }
        Ok(())
    }

    #[test]
    fn lanczos_memory_counts_at_most_the_layer_dimension() {
        assert_eq!(lanczos_memory(&[vec![3], vec![10, 10]], 50), 3 * 3 * 8 + 100 * 50 * 8);
        assert!(lanczos_memory(&[vec![4096, 4096]], 100) > LANCZOS_MEMORY_LIMIT);
    }

    #[test]
    fn power_iteration_still_works() -> Result<()> {
        let m = sym(&[2.0, 1.0, 0.5, -0.5, 0.1], 11);
        let ms = [m];
        let s = EigenSettings { tol: 1e-10, max_iters: 500, seed: 0 };
        let r = power_op(&shapes_of(&ms), &s, Device::Cpu, &mut matrix_op(&ms))?;
        assert!((r[0].value - 2.0).abs() < 1e-8 && r[0].converged, "{:?}", r[0]);
        Ok(())
    }

    /// Lanczos against power iteration on real products: the TorchScript fixture on digits:calib.
    /// Slow-ish (hundreds of products); run with `cargo test --lib eigen -- --ignored --nocapture`.
    #[test]
    #[ignore]
    fn lanczos_and_power_iteration_on_the_torchscript_fixture() -> Result<()> {
        use crate::model::data::Dataset;
        use crate::model::torchscript::TorchScriptModel;
        use crate::sensitivity::Curvature;
        let data = Dataset::digits("calib")?;
        let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/tiny_cnn.pt");
        let model = TorchScriptModel::load(&path, &data.x.narrow(0, 0, 8))?;
        let engine = HvpEngine::new(&model, &data, 256, Curvature::Hessian)?;
        let reference = lanczos(&engine, &EigenSettings { tol: 1e-6, max_iters: 300, seed: 5 })?;
        let s = EigenSettings::default();
        let (n0, lz) = (engine.hvp_count(), lanczos(&engine, &s)?);
        let (n1, pw) = (engine.hvp_count(), power_iteration(&engine, &s)?);
        let n2 = engine.hvp_count();
        for (i, l) in engine.layers().iter().enumerate() {
            let (r, a, b) = (&reference[i], &lz[i], &pw[i]);
            eprintln!(
                "{:<13} reference {:.6e} ({} it, conv {}) | lanczos {:.6e} rel err {:.1e}, {} it, conv {} | power {:.6e} rel err {:.1e}, {} it, conv {}",
                l.name,
                r.value,
                r.iters,
                r.converged,
                a.value,
                (a.value - r.value).abs() / r.value.abs(),
                a.iters,
                a.converged,
                b.value,
                (b.value - r.value).abs() / r.value.abs(),
                b.iters,
                b.converged
            );
            assert!((a.value - r.value).abs() <= 2.0 * s.tol * r.value.abs(), "{}: {a:?} vs {r:?}", l.name);
        }
        eprintln!("products: lanczos {}, power iteration {}", n1 - n0, n2 - n1);
        Ok(())
    }
}
