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

use crate::error::{Error, Result};
use crate::model::data::Dataset;
use crate::model::loss::loss;
use crate::model::{LayerInfo, QuantModel, Target};
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

struct Batch {
    x: Tensor,
    target: BatchTarget,
    /// Share of the samples: n_b / N.
    weight: f64,
}

impl Batch {
    fn target(&self) -> Target<'_> {
        match &self.target {
            BatchTarget::Labels(y) => Target::Labels(y),
            BatchTarget::Teacher(t) => Target::Teacher(t),
        }
    }
}

/// Computes curvature–vector products of a model's mean calibration loss with respect to the
/// weights of its quantizable layers (one tensor per layer, in the model's layer order).
///
/// The loss is cross-entropy when the data has labels, else KL(FP32 ‖ model) against the logits
/// the model produced when the engine was created.
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

/// Σ_i ⟨a_i, b_i⟩ as a scalar tensor (part of the graph when `a` is).
fn dot_all(a: &[Tensor], b: &[Tensor]) -> Tensor {
    let mut acc: Option<Tensor> = None;
    for (x, y) in a.iter().zip(b) {
        let d = (x * y).sum(Kind::Float);
        acc = Some(match acc {
            None => d,
            Some(s) => s + d,
        });
    }
    acc.unwrap_or_else(|| Tensor::from(0f32))
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
            batches.push(Batch { x, target, weight: nb / n });
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
        let mut total = 0.0;
        for b in &self.batches {
            let (_, l) = tch::no_grad(|| self.batch_loss(b))?;
            total += b.weight * l.double_value(&[]);
        }
        Ok(total)
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
        let mut out: Vec<Vec<Tensor>> = probes.iter().map(|_| zeros_like_all(&self.weights)).collect();
        if probes.is_empty() {
            return Ok(out);
        }
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
        Ok(out)
    }

    fn hessian_batch(&self, b: &Batch, probes: &[Vec<Tensor>], out: &mut [Vec<Tensor>]) -> Result<()> {
        let (_, l) = self.batch_loss(b)?;
        let grads = Tensor::f_run_backward(&[&l], &self.weights, true, true)?;
        // A weight the loss does not depend on has no gradient and no curvature.
        let live: Vec<usize> = (0..grads.len()).filter(|&i| grads[i].defined() && grads[i].requires_grad()).collect();
        if live.is_empty() {
            return Ok(());
        }
        let g: Vec<Tensor> = live.iter().map(|&i| grads[i].shallow_clone()).collect();
        let n = probes.len();
        for (k, v) in probes.iter().enumerate() {
            let vl: Vec<Tensor> = live.iter().map(|&i| v[i].shallow_clone()).collect();
            let d = dot_all(&g, &vl);
            let hv = Tensor::f_run_backward(&[&d], &self.weights, k + 1 < n, false)?;
            for (acc, h) in out[k].iter_mut().zip(hv) {
                if h.defined() {
                    *acc += h * b.weight;
                }
            }
        }
        Ok(())
    }

    fn ggn_batch(&self, b: &Batch, probes: &[Vec<Tensor>], out: &mut [Vec<Tensor>]) -> Result<()> {
        let (z, _) = self.batch_loss(b)?;
        // J^T u as a function of a dummy u: differentiating ⟨J^T u, v⟩ with respect to u gives J v.
        let u = Tensor::zeros_like(&z).set_requires_grad(true);
        let zu = (&z * &u).sum(Kind::Float);
        let jtu = Tensor::f_run_backward(&[&zu], &self.weights, true, true)?;
        let live: Vec<usize> = (0..jtu.len()).filter(|&i| jtu[i].defined() && jtu[i].requires_grad()).collect();
        if live.is_empty() {
            return Ok(());
        }
        let jtu_live: Vec<Tensor> = live.iter().map(|&i| jtu[i].shallow_clone()).collect();
        // Hessian of the mean cross-entropy (and of the mean KL) w.r.t. the logits, row by row:
        // (diag(p) − p pᵀ)/B with p = softmax(z).
        let p = z.detach().softmax(-1, Kind::Float);
        let bsz = z.size()[0] as f64;
        let n = probes.len();
        for (k, v) in probes.iter().enumerate() {
            let vl: Vec<Tensor> = live.iter().map(|&i| v[i].shallow_clone()).collect();
            let d = dot_all(&jtu_live, &vl);
            let jv = Tensor::f_run_backward(&[&d], &[&u], true, false)?.remove(0);
            let jv = if jv.defined() { jv } else { Tensor::zeros_like(&z) };
            let pj = (&p * &jv).sum_dim_intlist(-1, true, Kind::Float);
            let r = (&p * &jv - &p * pj) / bsz;
            let zr = (&z * r.detach()).sum(Kind::Float);
            let gv = Tensor::f_run_backward(&[&zr], &self.weights, k + 1 < n, false)?;
            for (acc, h) in out[k].iter_mut().zip(gv) {
                if h.defined() {
                    *acc += h * b.weight;
                }
            }
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
