//! Activation sensitivity (HAWQ-V2): the trace of the Hessian of the loss with respect to each
//! quantizable layer's input activation, by Hutchinson's estimator.
//!
//! Quantizing a layer's input adds an error δ to it; to second order the loss grows by
//! ½ δᵀ H_a δ, with H_a the Hessian of the loss w.r.t. that input, so Tr(H_a)/n_a plays for
//! activations the role Tr(H_W)/n_W plays for weights. The products H_a v come from a zero
//! perturbation ε, requiring gradients, added to every quantized layer's input inside the forward
//! pass ([`InputHooks`]): g = ∂L/∂ε with a graph, then ∂(g·v)/∂ε (the backward pass of g seeded
//! with v). Only native models can do this; a TorchScript module has no hook inside its forward
//! pass.
//!
//! The loss is the mean over the calibration set (cross-entropy with labels, else KL to the
//! model's own outputs, as in [`crate::sensitivity::hvp`]). Samples do not interact, so H_a is
//! block-diagonal over samples and the reported trace is the mean per-sample trace
//! (1/N) Σ_s Tr(H_a,s), whatever the batch size. Probes are seeded Rademacher vectors drawn per
//! (probe, batch) from mixq's own generator; all layers share every probe and every pass.

use super::hutchinson::{LayerTrace, Progress};
use super::stats::{rademacher, t975, Welford};
use crate::error::{Error, Result};
use crate::model::data::Dataset;
use crate::model::loss::loss;
use crate::model::{QuantModel, Target};
use serde::{Deserialize, Serialize};
use std::cell::RefCell;
use tch::{Kind, Tensor};

/// Probe stream of activation probes (distinct from the weight estimators' streams).
const STREAM: u64 = 0x4143_5449; // "ACTI"

/// A model whose forward pass lets the caller rewrite the input of every quantizable layer.
pub trait InputHooks: QuantModel {
    /// Logits of `x`, with `hook(layer, input)` replacing the input of each quantizable layer
    /// (called once per layer use, in forward order). Gradients flow through the hook's result.
    fn forward_with_input_hook(&self, x: &Tensor, hook: &dyn Fn(&str, &Tensor) -> Result<Tensor>) -> Result<Tensor>;
}

/// Settings of the activation-trace estimator.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ActivationSettings {
    /// Relative 95 % CI half-width each layer must reach.
    pub tol: f64,
    /// Probes before the stopping rule is first tested.
    pub min_probes: u64,
    /// Hard limit on probes.
    pub max_probes: u64,
    /// Probes per pass over the data (they share forward passes).
    pub block: u64,
    /// Seed of the probes.
    pub seed: u64,
    /// Calibration batch size.
    pub batch_size: usize,
}

impl Default for ActivationSettings {
    fn default() -> Self {
        ActivationSettings { tol: 0.05, min_probes: 10, max_probes: 200, block: 4, seed: 0, batch_size: 256 }
    }
}

/// One layer's input-activation Hessian trace.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ActivationTrace {
    /// Fully qualified layer name.
    pub name: String,
    /// Elements of the layer's input per sample.
    pub numel_per_sample: i64,
    /// Mean per-sample trace, its standard error, CI and probes.
    pub trace: LayerTrace,
}

enum BatchTarget {
    Labels(Tensor),
    Teacher(Tensor),
}

/// Curvature–vector products w.r.t. the quantizable layers' input activations.
pub struct ActivationEngine<'a> {
    model: &'a dyn InputHooks,
    batches: Vec<(Tensor, BatchTarget, f64)>,
    layers: Vec<String>,
}

impl std::fmt::Debug for ActivationEngine<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ActivationEngine").field("model", &self.model.name()).field("batches", &self.batches.len()).finish()
    }
}

/// Probe `k` of one batch, given the per-layer input shapes: per-layer tensors of those shapes.
pub type ProbeFn<'a> = dyn FnMut(usize, &[Vec<i64>]) -> Vec<Tensor> + 'a;

/// The perturbations a hooked forward pass added, in call order: (layer, ε).
type Perturbations = RefCell<Vec<(String, Tensor)>>;

impl<'a> ActivationEngine<'a> {
    /// An engine over `data` in batches of `batch_size` (at least 1).
    pub fn new(model: &'a dyn InputHooks, data: &Dataset, batch_size: usize) -> Result<Self> {
        if data.is_empty() {
            return Err(Error::Data { source_name: data.name.clone(), msg: "no samples: sensitivity needs calibration data".into() });
        }
        let n = data.len() as f64;
        let mut batches = Vec::new();
        for (x, y) in data.batches(batch_size.max(1)) {
            let nb = x.size()[0] as f64;
            let target = match y {
                Some(y) => BatchTarget::Labels(y),
                None => BatchTarget::Teacher(tch::no_grad(|| model.forward(&x))?.detach()),
            };
            batches.push((x, target, nb / n));
        }
        Ok(ActivationEngine { model, batches, layers: model.layers().iter().map(|l| l.name.clone()).collect() })
    }

    /// The quantizable layers, in the order of every per-layer vector.
    pub fn layers(&self) -> &[String] {
        &self.layers
    }

    /// Number of calibration batches.
    pub fn num_batches(&self) -> usize {
        self.batches.len()
    }

    /// Forward pass of batch `b` with a fresh zero perturbation on every layer input; returns
    /// the batch loss and the perturbations, one per layer (in layer order).
    fn perturbed_loss(&self, b: usize) -> Result<(Tensor, Vec<Tensor>)> {
        let (x, target, _) = &self.batches[b];
        let eps: Perturbations = RefCell::new(Vec::new());
        let hook = |layer: &str, a: &Tensor| -> Result<Tensor> {
            let e = Tensor::zeros_like(a).detach().set_requires_grad(true);
            let out = a + &e;
            eps.borrow_mut().push((layer.to_string(), e));
            Ok(out)
        };
        let logits = self.model.forward_with_input_hook(x, &hook)?;
        let l = match target {
            BatchTarget::Labels(y) => loss(&logits, Target::Labels(y)),
            BatchTarget::Teacher(t) => loss(&logits, Target::teacher(self.model.output_kind(), t)),
        };
        let mut eps = eps.into_inner();
        let mut ordered = Vec::with_capacity(self.layers.len());
        for name in &self.layers {
            let k = eps.iter().position(|(n, _)| n == name).ok_or_else(|| Error::Model {
                model: self.model.name().to_string(),
                msg: format!("the hooked forward pass never reached the input of layer `{name}`"),
            })?;
            let (_, e) = eps.remove(k);
            ordered.push(e);
        }
        if let Some((name, _)) = eps.first() {
            return Err(Error::Model {
                model: self.model.name().to_string(),
                msg: format!("layer `{name}` is applied more than once; activation sensitivity needs one input per layer"),
            });
        }
        Ok((l, ordered))
    }

    /// Per-layer input shapes of batch `b` (one forward pass, no graph).
    pub fn input_shapes(&self, b: usize) -> Result<Vec<Vec<i64>>> {
        let (_, eps) = tch::no_grad(|| self.perturbed_loss(b))?;
        Ok(eps.iter().map(Tensor::size).collect())
    }

    /// For each probe (`probe(k, shapes)` gives per-layer tensors of batch `b`'s input shapes),
    /// the per-layer quadratic forms vᵀ H_a v of batch `b`'s mean loss, weighted by the batch's
    /// share of the samples. All probes share one forward pass and first backward.
    pub fn quadratic_forms(&self, b: usize, k: usize, probe: &mut ProbeFn<'_>) -> Result<Vec<Vec<f64>>> {
        let weight = self.batches[b].2;
        tch::with_grad(|| {
            let (l, eps) = self.perturbed_loss(b)?;
            let shapes: Vec<Vec<i64>> = eps.iter().map(Tensor::size).collect();
            let grads = Tensor::f_run_backward(&[&l], &eps, true, true)?;
            let live: Vec<usize> = (0..grads.len()).filter(|&i| grads[i].defined() && grads[i].requires_grad()).collect();
            let mut out = Vec::with_capacity(k);
            for p in 0..k {
                let v = probe(p, &shapes);
                let mut row = vec![0.0; eps.len()];
                if !live.is_empty() {
                    // H_a v: the gradient's backward pass seeded with the probe (no ⟨g, v⟩ node).
                    let g: Vec<&Tensor> = live.iter().map(|&i| &grads[i]).collect();
                    let vl: Vec<&Tensor> = live.iter().map(|&i| &v[i]).collect();
                    let hv = super::autograd::grad(&g, &vl, &eps, p + 1 < k, false)?;
                    for (i, h) in hv.iter().enumerate() {
                        if h.defined() {
                            row[i] = weight * (h.to_kind(Kind::Double) * v[i].to_kind(Kind::Double)).sum(Kind::Double).double_value(&[]);
                        }
                    }
                }
                out.push(row);
            }
            Ok(out)
        })
    }
}

/// Per-layer traces of the Hessian w.r.t. each quantizable layer's input activation, by
/// Hutchinson with the 95 % CI stopping rule of [`ActivationSettings::tol`].
pub fn activation_traces(model: &dyn InputHooks, data: &Dataset, s: &ActivationSettings) -> Result<Vec<ActivationTrace>> {
    activation_traces_with_progress(model, data, s, &mut |_| {})
}

/// The progress of a pass: probes so far, the worst relative CI half-width among the layers not
/// yet converged, and how many have.
fn pass_progress(stats: &[Welford], s: &ActivationSettings) -> Progress {
    let mut worst: f64 = 0.0;
    let mut converged = 0;
    for w in stats {
        let ci = t975(w.n.saturating_sub(1)) * w.std_err();
        if w.n >= s.min_probes.max(2) && ci <= s.tol * w.mean.abs() {
            converged += 1;
        } else {
            worst = worst.max(if w.mean != 0.0 { ci / w.mean.abs() } else { f64::INFINITY });
        }
    }
    Progress { probes: stats.first().map(|w| w.n).unwrap_or(0), worst_rel_ci: worst, converged }
}

/// [`activation_traces`], calling `progress` after every pass of `s.block` probes, as the
/// weight-trace estimators do. Each probe is one curvature–vector product (all layers and
/// batches together), so the products made are the traces' `probes`.
pub fn activation_traces_with_progress(
    model: &dyn InputHooks,
    data: &Dataset,
    s: &ActivationSettings,
    progress: &mut dyn FnMut(&Progress),
) -> Result<Vec<ActivationTrace>> {
    if s.max_probes < 2 || s.block == 0 || s.tol.is_nan() || s.tol <= 0.0 {
        return Err(Error::invalid(
            "activation settings",
            format!("max_probes {} block {} tol {}", s.max_probes, s.block, s.tol),
            "need max_probes ≥ 2, block ≥ 1, tol > 0",
        ));
    }
    let engine = ActivationEngine::new(model, data, s.batch_size)?;
    let nl = engine.layers().len();
    let nb = engine.num_batches() as u64;
    let mut stats = vec![Welford::default(); nl];
    let mut k = 0u64;
    let shapes0 = engine.input_shapes(0)?;
    let numel: Vec<i64> = shapes0.iter().map(|s| s[1..].iter().product()).collect();
    loop {
        let m = s.block.min(s.max_probes - k);
        let mut sums = vec![vec![0.0; nl]; m as usize];
        for b in 0..engine.num_batches() {
            let rows = engine
                .quadratic_forms(b, m as usize, &mut |p, shapes| rademacher(shapes, s.seed, STREAM, (k + p as u64) * nb + b as u64))?;
            for (acc, row) in sums.iter_mut().zip(rows) {
                for (a, r) in acc.iter_mut().zip(row) {
                    *a += r;
                }
            }
        }
        for row in &sums {
            for (w, x) in stats.iter_mut().zip(row) {
                w.push(*x);
            }
        }
        k += m;
        let p = pass_progress(&stats, s);
        progress(&p);
        let done = p.converged == nl;
        if done || k >= s.max_probes {
            return Ok(engine
                .layers()
                .iter()
                .zip(&stats)
                .zip(numel)
                .map(|((name, w), n)| {
                    let ci = t975(w.n.saturating_sub(1)) * w.std_err();
                    ActivationTrace {
                        name: name.clone(),
                        numel_per_sample: n,
                        trace: LayerTrace {
                            trace: w.mean,
                            std_err: w.std_err(),
                            ci95: ci,
                            probes: w.n,
                            converged: w.n >= s.min_probes.max(2) && ci <= s.tol * w.mean.abs(),
                        },
                    }
                })
                .collect());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::zoo::DigitsResNet;

    /// Exact trace of layer `li`'s input Hessian: the sum of its diagonal, one unit-vector
    /// product per input element, over all batches.
    fn exact_trace(engine: &ActivationEngine<'_>, li: usize) -> Result<f64> {
        let mut total = 0.0;
        for b in 0..engine.num_batches() {
            let n: i64 = engine.input_shapes(b)?[li].iter().product();
            let rows = engine.quadratic_forms(b, n as usize, &mut |p, shapes| {
                shapes
                    .iter()
                    .enumerate()
                    .map(|(i, s)| {
                        let t = Tensor::zeros(s.as_slice(), (Kind::Float, tch::Device::Cpu));
                        if i == li {
                            let _ = t.view(-1).get(p as i64).fill_(1.0);
                        }
                        t
                    })
                    .collect()
            })?;
            total += rows.iter().map(|r| r[li]).sum::<f64>();
        }
        Ok(total)
    }

    /// Standard errors a correct estimate may be off by (a 4σ event has probability 6e-5).
    const SIGMAS: f64 = 4.0;

    #[test]
    fn activation_traces_match_the_exact_input_hessian() -> Result<()> {
        let model = DigitsResNet::untrained();
        let data = Dataset::digits("calib")?.take(2);
        let whole = ActivationEngine::new(&model, &data, 2)?;
        let split = ActivationEngine::new(&model, &data, 1)?;
        let names = whole.layers().to_vec();
        let s = ActivationSettings { tol: 1e-3, min_probes: 100, max_probes: 100, batch_size: 2, ..Default::default() };
        let est = activation_traces(&model, &data, &s)?;
        assert_eq!(est.iter().map(|e| e.name.clone()).collect::<Vec<_>>(), names);
        // The two layers with small inputs: the stem (the image, 64 values) and fc (128 pooled features).
        for name in ["stem.conv", "fc"] {
            let li = names.iter().position(|n| n == name).expect("layer");
            let exact = exact_trace(&whole, li)?;
            // Batching must not change the mean loss (checked on the cheaper layer).
            let exact_split = if name == "stem.conv" { exact_trace(&split, li)? } else { exact };
            assert!(
                (exact - exact_split).abs() <= 1e-5 * exact.abs().max(1e-12),
                "{name}: trace {exact} with one batch, {exact_split} with batches of 1 sample: the mean loss must not depend on batching"
            );
            let t = &est[li].trace;
            eprintln!("{name}: exact {exact:.6e}, Hutchinson {:.6e} ± {:.2e} (s.e.), {} probes", t.trace, t.std_err, t.probes);
            assert!(
                (t.trace - exact).abs() <= SIGMAS * t.std_err + 1e-9 * exact.abs(),
                "{name}: Hutchinson {} ± {} (s.e.) vs exact {exact}: off by more than {SIGMAS} s.e.",
                t.trace,
                t.std_err
            );
        }
        Ok(())
    }

    #[test]
    fn every_layer_input_gets_one_perturbation() -> Result<()> {
        let model = DigitsResNet::untrained();
        let data = Dataset::digits("calib")?.take(3);
        let engine = ActivationEngine::new(&model, &data, 3)?;
        let shapes = engine.input_shapes(0)?;
        assert_eq!(shapes.len(), model.layers().len());
        assert_eq!(shapes[0], vec![3, 1, 8, 8], "stem input is the image");
        assert_eq!(shapes.last().expect("fc").len(), 2, "fc input is the pooled features [N, C]");
        Ok(())
    }
}
