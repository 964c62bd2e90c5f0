//! Hessian-vector products of the calibration loss with respect to the quantizable weights.
//!
//! Every curvature estimator in mixq reduces to products `H v` (or `G v` for the Gauss–Newton
//! matrix): forming H is impossible beyond a few thousand weights, while one product costs about
//! two backward passes. The products are taken by double backward through libtorch autograd, so
//! they work the same for native zoo models and TorchScript modules.
//!
//! The loss is the mean over the calibration set; larger sets are processed batch by batch, each
//! batch's product weighted by its share of the samples, and only one batch's graph is alive at a
//! time (memory is bounded by the batch size, not the data size). Several probes can share one
//! batch graph ([`HvpEngine::hvp_many`]): the forward pass and the first backward are paid once.
//!
//! Each product's second backward pass is seeded with the probe itself
//! (`torch::autograd::grad(g, w, grad_outputs = v)`, through [`super::autograd`]) rather than
//! differentiating the scalar Σ_i ⟨g_i, v_i⟩: the same numbers, without a mul, a sum and an add
//! per layer in the graph of every product. That is what PyTorch code (PyHessian) does.

use super::autograd;
use crate::error::{Error, Result};
use crate::model::data::Dataset;
use crate::model::loss::{loss, OutputCurvature};
use crate::model::{LayerInfo, OutputKind, QuantModel, Target};
use serde::{Deserialize, Serialize};
use std::cell::Cell;
use std::str::FromStr;
use tch::{Kind, Tensor};

/// Default calibration batch size of HVPs.
pub const DEFAULT_BATCH_SIZE: usize = 256;

/// Which curvature matrix the products use.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum Curvature {
    /// The loss Hessian (indefinite away from a minimum: traces can be negative).
    #[default]
    Hessian,
    /// The generalized Gauss–Newton matrix J^T H_z J (H_z: Hessian of the loss w.r.t. the
    /// logits), positive semi-definite, equal to the Hessian at a perfect fit.
    Ggn,
}

impl std::fmt::Display for Curvature {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Curvature::Hessian => "hessian",
            Curvature::Ggn => "ggn",
        })
    }
}

impl FromStr for Curvature {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        match s {
            "hessian" => Ok(Curvature::Hessian),
            "ggn" => Ok(Curvature::Ggn),
            _ => Err(Error::invalid("curvature", s, "valid: hessian, ggn")),
        }
    }
}

/// What one calibration batch's loss is measured against.
enum BatchTarget {
    Labels(Tensor),
    Teacher(Tensor),
}

/// One calibration batch with what its loss is measured against.
pub(crate) struct Batch {
    x: Tensor,
    target: BatchTarget,
    /// Share of the samples: n_b / N.
    weight: f64,
    /// The model's outputs (logits or embeddings), which decide the teacher loss.
    kind: OutputKind,
}

impl Batch {
    fn target(&self) -> Target<'_> {
        match &self.target {
            BatchTarget::Labels(y) => Target::Labels(y),
            BatchTarget::Teacher(t) => Target::teacher(self.kind, t),
        }
    }

    /// A copy sharing no storage with this batch (a tch `Tensor` is `Send` but not `Sync`, so a
    /// worker thread needs its own).
    pub(crate) fn deep_copy(&self) -> Batch {
        let target = match &self.target {
            BatchTarget::Labels(y) => BatchTarget::Labels(y.copy()),
            BatchTarget::Teacher(t) => BatchTarget::Teacher(t.copy()),
        };
        Batch { x: self.x.copy(), target, weight: self.weight, kind: self.kind }
    }
}

/// Mean loss of `model` over `batches`, without gradients: [`HvpEngine::loss_value`] on the
/// engine's model, and the measured-ΔL workers on their replicas.
pub(crate) fn mean_loss(model: &dyn QuantModel, batches: &[Batch]) -> Result<f64> {
    let mut total = 0.0;
    for b in batches {
        let l = tch::no_grad(|| -> Result<Tensor> { Ok(loss(&model.forward(&b.x)?, b.target())) })?;
        total += b.weight * l.f_double_value(&[])?;
    }
    Ok(total)
}

/// Computes curvature–vector products of a model's mean calibration loss with respect to the
/// weights of its quantizable layers (one tensor per layer, in the model's layer order).
///
/// The loss is cross-entropy when the data has labels, else KL(FP32 ‖ model) against the logits
/// the model produced when the engine was created (for an embedding model, the squared error to
/// its FP32 embeddings, [`crate::model::loss::embedding_distillation`]).
pub struct HvpEngine<'a> {
    model: &'a dyn QuantModel,
    layers: Vec<LayerInfo>,
    weights: Vec<Tensor>,
    batches: Vec<Batch>,
    curvature: Curvature,
    hvps: Cell<u64>,
}

impl std::fmt::Debug for HvpEngine<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HvpEngine").field("model", &self.model.name()).field("batches", &self.batches.len()).finish()
    }
}

fn zeros_like_all(ws: &[Tensor]) -> Vec<Tensor> {
    ws.iter().map(Tensor::zeros_like).collect()
}

/// Replaces undefined gradients (weights the output does not depend on) by zeros.
fn defined_or_zero(grads: Vec<Tensor>, like: &[Tensor]) -> Vec<Tensor> {
    grads.into_iter().zip(like).map(|(g, w)| if g.defined() { g } else { Tensor::zeros_like(w) }).collect()
}

/// Adds one batch's products `hv` (per layer; undefined where the layer has no curvature),
/// weighted by the batch's share `weight`, to a probe's running sums `acc`. The first
/// contribution is taken as it is when the weight is 1 (a single batch: no multiply, no copy),
/// unless libtorch handed back the probe tensor itself (a pass-through backward), so that a
/// result never shares storage with its probe.
fn accumulate(acc: &mut [Option<Tensor>], hv: Vec<Tensor>, probe: &[Tensor], weight: f64) {
    for ((a, h), v) in acc.iter_mut().zip(hv).zip(probe) {
        if !h.defined() {
            continue;
        }
        match a {
            None if weight == 1.0 && h.data_ptr() != v.data_ptr() => *a = Some(h),
            None => *a = Some(h * weight),
            Some(a) => *a += h * weight,
        }
    }
}

impl<'a> HvpEngine<'a> {
    /// An engine over `data` in batches of `batch_size` (at least 1).
    pub fn new(model: &'a dyn QuantModel, data: &Dataset, batch_size: usize, curvature: Curvature) -> Result<Self> {
        if data.is_empty() {
            return Err(Error::Data { source_name: data.name.clone(), msg: "no samples: sensitivity needs calibration data".into() });
        }
        let layers = model.layers().to_vec();
        let mut weights = Vec::with_capacity(layers.len());
        for l in &layers {
            let w = model.weight(&l.name)?;
            if !w.requires_grad() {
                return Err(Error::Model {
                    model: model.name().to_string(),
                    msg: format!("weight of layer `{}` does not require gradients; curvature needs autograd through it", l.name),
                });
            }
            weights.push(w);
        }
        let n = data.len() as f64;
        let mut batches = Vec::new();
        for (x, y) in data.batches(batch_size) {
            let nb = x.size()[0] as f64;
            let target = match y {
                Some(y) => BatchTarget::Labels(y),
                None => BatchTarget::Teacher(tch::no_grad(|| model.forward(&x))?.detach()),
            };
            batches.push(Batch { x, target, weight: nb / n, kind: model.output_kind() });
        }
        Ok(HvpEngine { model, layers, weights, batches, curvature, hvps: Cell::new(0) })
    }

    /// The quantizable layers, in the order of every per-layer vector.
    pub fn layers(&self) -> &[LayerInfo] {
        &self.layers
    }

    /// The layers' weights (sharing storage with the model).
    pub fn weights(&self) -> &[Tensor] {
        &self.weights
    }

    /// The model.
    pub fn model(&self) -> &dyn QuantModel {
        self.model
    }

    /// The curvature matrix the products use.
    pub fn curvature(&self) -> Curvature {
        self.curvature
    }

    /// Curvature–vector products computed so far (one per probe, all batches together).
    pub fn hvp_count(&self) -> u64 {
        self.hvps.get()
    }

    /// Number of calibration batches.
    pub fn num_batches(&self) -> usize {
        self.batches.len()
    }

    /// Shapes of the per-layer vectors.
    pub fn shapes(&self) -> Vec<Vec<i64>> {
        self.weights.iter().map(Tensor::size).collect()
    }

    fn batch_loss(&self, b: &Batch) -> Result<(Tensor, Tensor)> {
        let logits = self.model.forward(&b.x)?;
        let l = loss(&logits, b.target());
        Ok((logits, l))
    }

    /// Mean calibration loss of the model as it is now.
    pub fn loss_value(&self) -> Result<f64> {
        mean_loss(self.model, &self.batches)
    }

    /// The calibration batches, as every product and loss uses them.
    pub(crate) fn batches(&self) -> &[Batch] {
        &self.batches
    }

    /// Gradient of the mean calibration loss, per layer.
    pub fn gradient(&self) -> Result<Vec<Tensor>> {
        tch::with_grad(|| {
            let mut acc = zeros_like_all(&self.weights);
            for b in &self.batches {
                let (_, l) = self.batch_loss(b)?;
                let g = defined_or_zero(Tensor::f_run_backward(&[&l], &self.weights, false, false)?, &self.weights);
                for (a, g) in acc.iter_mut().zip(g) {
                    *a += g * b.weight;
                }
            }
            Ok(acc)
        })
    }

    /// Per-layer squared gradient norms Σ_n ‖∇_i ℓ_n‖² / N over single samples (the empirical
    /// Fisher trace). Without labels the teacher's top class serves as the label, since the
    /// KL gradient vanishes at the FP32 model.
    pub fn fisher_trace(&self) -> Result<Vec<f64>> {
        if self.model.output_kind() == OutputKind::Embedding {
            return Err(Error::Unsupported(format!(
                "the empirical Fisher needs labels or a classifier's top class; {} is an embedding model (its distillation gradient vanishes at FP32)",
                self.model.name()
            )));
        }
        tch::with_grad(|| {
            let mut acc = vec![0.0; self.weights.len()];
            let mut count = 0usize;
            for b in &self.batches {
                let labels = match &b.target {
                    BatchTarget::Labels(y) => y.shallow_clone(),
                    BatchTarget::Teacher(t) => t.argmax(-1, false),
                };
                let nb = b.x.size()[0];
                for s in 0..nb {
                    let x = b.x.narrow(0, s, 1);
                    let y = labels.narrow(0, s, 1);
                    let logits = self.model.forward(&x)?;
                    let l = loss(&logits, Target::Labels(&y));
                    let g = defined_or_zero(Tensor::f_run_backward(&[&l], &self.weights, false, false)?, &self.weights);
                    for (a, g) in acc.iter_mut().zip(&g) {
                        *a += g.square().sum(Kind::Double).double_value(&[]);
                    }
                    count += 1;
                }
            }
            Ok(acc.into_iter().map(|a| a / count.max(1) as f64).collect())
        })
    }

    /// One product `H v` (or `G v`), per layer.
    pub fn hvp(&self, v: &[Tensor]) -> Result<Vec<Tensor>> {
        let v: Vec<Tensor> = v.iter().map(Tensor::shallow_clone).collect();
        Ok(self.hvp_many(std::slice::from_ref(&v))?.remove(0))
    }

    /// Products with several probes, sharing each batch's forward pass and first backward.
    pub fn hvp_many(&self, probes: &[Vec<Tensor>]) -> Result<Vec<Vec<Tensor>>> {
        for (k, v) in probes.iter().enumerate() {
            if v.len() != self.weights.len() {
                return Err(Error::invalid("probe", k.to_string(), format!("has {} tensors, expected {}", v.len(), self.weights.len())));
            }
            for (t, w) in v.iter().zip(&self.weights) {
                if t.size() != w.size() {
                    return Err(Error::invalid("probe", k.to_string(), format!("shape {:?}, expected {:?}", t.size(), w.size())));
                }
            }
        }
        if probes.is_empty() {
            return Ok(Vec::new());
        }
        // Running sums over the batches; `None` until a batch contributes (zeros if none does).
        let mut out: Vec<Vec<Option<Tensor>>> = probes.iter().map(|_| self.weights.iter().map(|_| None).collect()).collect();
        tch::with_grad(|| -> Result<()> {
            for b in &self.batches {
                match self.curvature {
                    Curvature::Hessian => self.hessian_batch(b, probes, &mut out)?,
                    Curvature::Ggn => self.ggn_batch(b, probes, &mut out)?,
                }
            }
            Ok(())
        })?;
        self.hvps.set(self.hvps.get() + probes.len() as u64);
        Ok(out
            .into_iter()
            .map(|hv| hv.into_iter().zip(&self.weights).map(|(h, w)| h.unwrap_or_else(|| Tensor::zeros_like(w))).collect())
            .collect())
    }

    /// Adds batch `b`'s share of `H v` for every probe to `out`: one forward pass and one
    /// backward pass with `create_graph`, then per probe a backward pass through the gradient's
    /// graph seeded with the probe (`torch.autograd.grad(g, w, grad_outputs=v)`), keeping the
    /// graph for the next probe.
    fn hessian_batch(&self, b: &Batch, probes: &[Vec<Tensor>], out: &mut [Vec<Option<Tensor>>]) -> Result<()> {
        let (_, l) = self.batch_loss(b)?;
        let grads = Tensor::f_run_backward(&[&l], &self.weights, true, true)?;
        // A weight the loss does not depend on has no gradient and no curvature.
        let live: Vec<usize> = (0..grads.len()).filter(|&i| grads[i].defined() && grads[i].requires_grad()).collect();
        if live.is_empty() {
            return Ok(());
        }
        let g: Vec<&Tensor> = live.iter().map(|&i| &grads[i]).collect();
        let n = probes.len();
        for (k, v) in probes.iter().enumerate() {
            let vl: Vec<&Tensor> = live.iter().map(|&i| &v[i]).collect();
            let hv = autograd::grad(&g, &vl, &self.weights, k + 1 < n, false)?;
            accumulate(&mut out[k], hv, v, b.weight);
        }
        Ok(())
    }

    /// Adds batch `b`'s share of `G v = Jᵀ H_z J v` for every probe to `out`.
    fn ggn_batch(&self, b: &Batch, probes: &[Vec<Tensor>], out: &mut [Vec<Option<Tensor>>]) -> Result<()> {
        let (z, _) = self.batch_loss(b)?;
        // J^T u as a function of a dummy u (the backward pass of the logits seeded with u, its
        // graph kept): differentiating it seeded with v gives J v.
        let u = Tensor::zeros_like(&z).set_requires_grad(true);
        let jtu = autograd::grad(&[&z], &[&u], &self.weights, true, true)?;
        let live: Vec<usize> = (0..jtu.len()).filter(|&i| jtu[i].defined() && jtu[i].requires_grad()).collect();
        if live.is_empty() {
            return Ok(());
        }
        let jtu_live: Vec<&Tensor> = live.iter().map(|&i| &jtu[i]).collect();
        let u_in = std::slice::from_ref(&u);
        // Hessian of the batch's mean loss w.r.t. the outputs.
        let hz = OutputCurvature::new(self.model.output_kind(), &z);
        let n = probes.len();
        for (k, v) in probes.iter().enumerate() {
            let vl: Vec<&Tensor> = live.iter().map(|&i| &v[i]).collect();
            let jv = autograd::grad(&jtu_live, &vl, u_in, true, false)?.remove(0);
            let jv = if jv.defined() { jv } else { Tensor::zeros_like(&z) };
            let r = hz.apply(&jv);
            // J^T r: the logits' backward pass seeded with r.
            let gv = autograd::grad(&[&z], &[&r], &self.weights, k + 1 < n, false)?;
            accumulate(&mut out[k], gv, v, b.weight);
        }
        Ok(())
    }

    /// The exact curvature block of layer `layer` (`[n_i, n_i]`, float64), one product per
    /// weight with unit vectors. Only for tiny layers: it costs n_i products.
    pub fn exact_block(&self, layer: usize) -> Result<Tensor> {
        let n =
            self.weights.get(layer).map(Tensor::numel).ok_or_else(|| Error::invalid("layer index", layer.to_string(), "out of range"))?;
        let shape = self.weights[layer].size();
        let mut rows = Vec::with_capacity(n);
        const CHUNK: usize = 64;
        let mut j = 0;
        while j < n {
            let m = CHUNK.min(n - j);
            let probes: Vec<Vec<Tensor>> = (j..j + m)
                .map(|c| {
                    let mut v = zeros_like_all(&self.weights);
                    let e = Tensor::zeros([n as i64], (Kind::Float, tch::Device::Cpu));
                    let _ = e.get(c as i64).fill_(1.0);
                    v[layer] = e.reshape(shape.as_slice());
                    v
                })
                .collect();
            for hv in self.hvp_many(&probes)? {
                rows.push(hv[layer].flatten(0, -1).to_kind(Kind::Double));
            }
            j += m;
        }
        let h = Tensor::stack(&rows, 0);
        // Symmetrize away float rounding.
        Ok((&h + h.tr()) / 2.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::data::Dataset;
    use crate::model::torchscript::TorchScriptModel;
    use crate::sensitivity::stats::rademacher;
    use std::time::Instant;

    /// The products as mixq took them before the grad_outputs shim (one batch): the gradient of
    /// the scalar Σ_i ⟨g_i, v_i⟩ by `run_backward`, added to zeros times the batch weight.
    fn dot_product_backward(engine: &HvpEngine<'_>, probes: &[Vec<Tensor>]) -> Result<Vec<Vec<Tensor>>> {
        let b = &engine.batches[0];
        tch::with_grad(|| {
            let (_, l) = engine.batch_loss(b)?;
            let g = Tensor::f_run_backward(&[&l], &engine.weights, true, true)?;
            let n = probes.len();
            let mut out = Vec::with_capacity(n);
            for (k, v) in probes.iter().enumerate() {
                let mut d: Option<Tensor> = None;
                for (x, y) in g.iter().zip(v) {
                    let t = (x * y).sum(Kind::Float);
                    d = Some(match d {
                        None => t,
                        Some(s) => s + t,
                    });
                }
                let d = d.expect("layers");
                let hv = Tensor::f_run_backward(&[&d], &engine.weights, k + 1 < n, false)?;
                let mut acc: Vec<Tensor> = engine.weights.iter().map(Tensor::zeros_like).collect();
                for (a, h) in acc.iter_mut().zip(hv) {
                    if h.defined() {
                        *a += h * b.weight;
                    }
                }
                out.push(acc);
            }
            Ok(out)
        })
    }

    fn fixture_engine(data: &Dataset) -> Result<(TorchScriptModel, Vec<Vec<i64>>)> {
        let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/tiny_cnn.pt");
        let model = TorchScriptModel::load(&path, &data.x.narrow(0, 0, 8))?;
        let shapes = model.layers().iter().map(|l| model.weight(&l.name).map(|w| w.size())).collect::<Result<Vec<_>>>()?;
        Ok((model, shapes))
    }

    #[test]
    fn grad_outputs_products_equal_the_dot_product_backward() -> Result<()> {
        let data = Dataset::digits("calib")?;
        let (model, shapes) = fixture_engine(&data)?;
        let engine = HvpEngine::new(&model, &data, 256, Curvature::Hessian)?;
        let probes: Vec<_> = (0..4).map(|i| rademacher(&shapes, 0, 1, i)).collect();
        let new = engine.hvp_many(&probes)?;
        let old = dot_product_backward(&engine, &probes)?;
        for (k, (a, b)) in new.iter().zip(&old).enumerate() {
            for (i, (x, y)) in a.iter().zip(b).enumerate() {
                let diff = (x - y).abs().max().double_value(&[]);
                let scale = y.abs().max().double_value(&[]);
                assert!(diff <= 1e-6 * scale, "probe {k} layer {i}: max |new − old| {diff:e} of max |old| {scale:e}");
            }
        }
        Ok(())
    }

    /// Interleaved A/B timing in one process (load from other jobs hits both sides alike):
    /// `OMP_NUM_THREADS=1 cargo test --lib hvp::tests::ab_timing -- --ignored --nocapture`.
    #[test]
    #[ignore = "timing, not a test: run by hand"]
    fn ab_timing() -> Result<()> {
        let data = Dataset::digits("calib")?;
        let (model, shapes) = fixture_engine(&data)?;
        let engine = HvpEngine::new(&model, &data, 256, Curvature::Hessian)?;
        let probes: Vec<_> = (0..16).map(|i| rademacher(&shapes, 0, 1, i)).collect();
        let rounds: usize = std::env::var("AB_ROUNDS").ok().and_then(|r| r.parse().ok()).unwrap_or(40);
        println!("libtorch intra-op threads: {}", tch::get_num_threads());
        // (minimum, median) of a list of times.
        let stats = |t: &mut Vec<f64>| {
            t.sort_by(f64::total_cmp);
            (t[0], t[t.len() / 2])
        };
        for k in [1usize, 4, 16] {
            let (mut t_new, mut t_old) = (Vec::new(), Vec::new());
            for _ in 0..rounds {
                let t = Instant::now();
                engine.hvp_many(&probes[..k])?;
                t_new.push(t.elapsed().as_secs_f64() * 1e3 / k as f64);
                let t = Instant::now();
                dot_product_backward(&engine, &probes[..k])?;
                t_old.push(t.elapsed().as_secs_f64() * 1e3 / k as f64);
            }
            let ((nmin, nmed), (omin, omed)) = (stats(&mut t_new), stats(&mut t_old));
            println!(
                "{k:>2} per pass, {rounds} alternations, ms per product min / median: grad_outputs {nmin:.2} / {nmed:.2}, Σ⟨g,v⟩ backward {omin:.2} / {omed:.2}"
            );
        }
        // The same, grad_outputs only, with and without the biases requiring gradients (the
        // PyTorch side of experiments/pyhessian freezes them; mixq's TorchScript model does not).
        let layer_weights: Vec<String> = model.layers().iter().map(|l| format!("{}.weight", l.name)).collect();
        let others: Vec<Tensor> =
            model.named_parameters().into_iter().filter(|(n, t)| t.requires_grad() && !layer_weights.contains(n)).map(|(_, t)| t).collect();
        let (mut t_live, mut t_frozen) = (Vec::new(), Vec::new());
        for _ in 0..rounds {
            for (freeze, ts) in [(false, &mut t_live), (true, &mut t_frozen)] {
                for t in &others {
                    let _ = t.shallow_clone().set_requires_grad(!freeze);
                }
                let t = Instant::now();
                engine.hvp_many(&probes)?;
                ts.push(t.elapsed().as_secs_f64() * 1e3 / 16.0);
            }
        }
        for t in &others {
            let _ = t.shallow_clone().set_requires_grad(true);
        }
        let ((lmin, lmed), (fmin, fmed)) = (stats(&mut t_live), stats(&mut t_frozen));
        println!(
            "16 per pass, grad_outputs, {} other parameters: requiring grad {lmin:.2} / {lmed:.2}, frozen {fmin:.2} / {fmed:.2} ms per product (min / median)",
            others.len()
        );
        Ok(())
    }
}
