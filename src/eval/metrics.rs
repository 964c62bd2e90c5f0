//! Accuracy, loss, KL divergence and top-1 agreement against the FP32 model, and model size.

use crate::config::QuantConfig;
use crate::error::Result;
use crate::model::data::Dataset;
use crate::model::loss::kl_divergence;
use crate::model::QuantModel;
use crate::model::ResolvedLayer;
use serde::{Deserialize, Serialize};
use tch::{Kind, Reduction, Tensor};

/// Batch size of evaluation forward passes.
pub const EVAL_BATCH: usize = 256;

/// The FP32 model's logits on a dataset: what every quantized model is compared with.
pub struct Reference {
    /// Logits `[N, C]`.
    pub logits: Tensor,
}

impl Reference {
    /// Runs the (unquantized) model over `data`.
    pub fn compute(model: &dyn QuantModel, data: &Dataset) -> Result<Self> {
        Ok(Reference { logits: logits(model, data)? })
    }
}

/// What a config costs in storage.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct SizeReport {
    /// Bytes of all parameters: quantizable weights under the config (scales and zero points
    /// included), everything else (biases, norms) in FP32.
    pub total_bytes: u64,
    /// Bytes of the quantizable weights under the config.
    pub weight_bytes: u64,
    /// Average bits per quantizable weight, scales and zero points included.
    pub avg_bits: f64,
}

/// Model size under a resolved config.
pub fn model_size(model: &dyn QuantModel, plan: &[ResolvedLayer]) -> SizeReport {
    let weight_bits: u64 = plan.iter().map(|r| r.weight.storage_bits(&r.layer.shape)).sum();
    let weight_elems: i64 = plan.iter().map(|r| r.layer.params).sum();
    let quantized: std::collections::HashSet<String> = plan.iter().map(|r| format!("{}.weight", r.layer.name)).collect();
    let other_bytes: u64 = model.named_parameters().iter().filter(|(n, _)| !quantized.contains(n)).map(|(_, t)| t.numel() as u64 * 4).sum();
    let weight_bytes = weight_bits.div_ceil(8);
    SizeReport {
        total_bytes: weight_bytes + other_bytes,
        weight_bytes,
        avg_bits: if weight_elems > 0 { weight_bits as f64 / weight_elems as f64 } else { 0.0 },
    }
}

/// The quality of a (quantized) model on a dataset, relative to its FP32 self.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct Metrics {
    /// Number of samples.
    pub samples: i64,
    /// Top-1 accuracy in [0, 1], when the data has labels.
    pub accuracy: Option<f64>,
    /// Mean cross-entropy against the labels, or, without labels, mean KL to the FP32 model.
    pub loss: f64,
    /// Mean KL(FP32 ‖ quantized) of the predictive distributions, in nats.
    pub kl: f64,
    /// Fraction of samples whose top-1 class equals the FP32 model's.
    pub agreement: f64,
}

/// Logits of `model` over `data`, batch by batch, without gradients.
pub fn logits(model: &dyn QuantModel, data: &Dataset) -> Result<Tensor> {
    let mut outs = Vec::new();
    for (x, _) in data.batches(EVAL_BATCH) {
        outs.push(tch::no_grad(|| model.forward(&x))?);
    }
    Ok(Tensor::cat(&outs, 0))
}

/// Evaluates the model as it is now (apply a config first to evaluate it) against `reference`.
pub fn evaluate(model: &dyn QuantModel, data: &Dataset, reference: &Reference) -> Result<Metrics> {
    let out = logits(model, data)?;
    let n = out.size()[0];
    let pred = out.argmax(-1, false);
    let ref_pred = reference.logits.argmax(-1, false);
    let kl = kl_divergence(&reference.logits, &out).mean(Kind::Double).double_value(&[]);
    let agreement = pred.eq_tensor(&ref_pred).to_kind(Kind::Double).mean(Kind::Double).double_value(&[]);
    let (accuracy, loss) = match &data.y {
        Some(y) => (
            Some(pred.eq_tensor(y).to_kind(Kind::Double).mean(Kind::Double).double_value(&[])),
            out.cross_entropy_loss::<Tensor>(y, None, Reduction::Mean, -100, 0.0).double_value(&[]),
        ),
        None => (None, kl),
    };
    Ok(Metrics { samples: n, accuracy, loss, kl, agreement })
}

/// Resolves `config` for `model`, applies it, evaluates, and restores the FP32 weights.
pub fn evaluate_config(
    model: &dyn QuantModel,
    data: &Dataset,
    reference: &Reference,
    config: &QuantConfig,
) -> Result<(Metrics, SizeReport)> {
    let plan = config.resolve(model)?;
    let size = model_size(model, &plan);
    let applied = crate::model::apply(model, &plan)?;
    let report = evaluate(model, data, reference);
    applied.restore();
    Ok((report?, size))
}
