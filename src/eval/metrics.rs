//! Accuracy, loss, KL divergence and top-1 agreement against the FP32 model, and model size; for
//! embedding models ([`OutputKind::Embedding`]) the fidelity of the embeddings instead
//! ([`EmbeddingMetrics`]): mean cosine to FP32, recall@10 of the FP32 nearest neighbours over the
//! evaluation set, and the Spearman correlation of all pairwise similarities.

use crate::config::QuantConfig;
use crate::error::{Error, Result};
use crate::model::data::Dataset;
use crate::model::loss::{embedding_distillation, kl_divergence};
use crate::model::ResolvedLayer;
use crate::model::{OutputKind, QuantModel};
use serde::{Deserialize, Serialize};
use tch::{Kind, Reduction, Tensor};

/// Batch size of evaluation forward passes.
pub const EVAL_BATCH: usize = 256;

/// The FP32 model's logits on a dataset: what every quantized model is compared with.
pub struct Reference {
    /// Logits `[N, C]` (embeddings `[N, D]` for an embedding model).
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
    /// Mean cross-entropy against the labels, or, without labels, mean KL to the FP32 model; for
    /// an embedding model the mean distillation loss ½‖e − e_FP32‖² (= 1 − cos for unit vectors).
    pub loss: f64,
    /// Mean KL(FP32 ‖ quantized) of the predictive distributions, in nats (NaN, `null` in JSON,
    /// for an embedding model).
    #[serde(deserialize_with = "nan_if_null")]
    pub kl: f64,
    /// Fraction of samples whose top-1 class equals the FP32 model's (NaN, `null` in JSON, for
    /// an embedding model).
    #[serde(deserialize_with = "nan_if_null")]
    pub agreement: f64,
    /// Fidelity of the embeddings, for an embedding model (absent for classifiers).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub embedding: Option<EmbeddingMetrics>,
}

/// A number, or NaN for `null` (serde_json writes NaN as `null`).
fn nan_if_null<'de, D: serde::Deserializer<'de>>(d: D) -> std::result::Result<f64, D::Error> {
    Ok(Option::<f64>::deserialize(d)?.unwrap_or(f64::NAN))
}

/// Neighbours per sentence in [`EmbeddingMetrics::recall_at_10`].
pub const RECALL_K: usize = 10;

/// How close a quantized model's embeddings are to the FP32 model's, over one evaluation set.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct EmbeddingMetrics {
    /// Mean cosine similarity between each sample's quantized and FP32 embedding.
    pub mean_cosine: f64,
    /// The smallest of those cosines.
    pub min_cosine: f64,
    /// For each sample, the share of its [`RECALL_K`] nearest FP32 neighbours (by cosine, among
    /// the other samples of the set) that are among its `RECALL_K` nearest quantized neighbours
    /// (quantized query against quantized set), averaged over the samples.
    pub recall_at_10: f64,
    /// Spearman rank correlation between the FP32 and the quantized cosine similarities of all
    /// pairs of distinct samples (ranks by sorting; ties are not averaged).
    pub spearman: f64,
}

/// Rows scaled to unit norm (cosines become dot products).
fn unit_rows(e: &Tensor) -> Tensor {
    let e = e.to_kind(Kind::Double);
    let n = e.norm_scalaropt_dim(2, [1i64].as_slice(), true).clamp_min(1e-12);
    e / n
}

/// [`EmbeddingMetrics`] of embeddings `out` against `reference` (both `[N, D]`, N ≥ 2).
pub fn embedding_metrics(reference: &Tensor, out: &Tensor) -> Result<EmbeddingMetrics> {
    let n = reference.size()[0];
    if n < 2 || out.size() != reference.size() {
        return Err(Error::Unsupported(format!(
            "embedding metrics need two sets of the same shape with at least 2 samples; got {:?} and {:?}",
            reference.size(),
            out.size()
        )));
    }
    let (r, q) = (unit_rows(reference), unit_rows(out));
    let cos = (&r * &q).sum_dim_intlist(1, false, Kind::Double);
    let (sr, sq) = (r.matmul(&r.tr()), q.matmul(&q.tr()));
    // Nearest neighbours among the other samples: the diagonal (the sample itself) pushed below
    // every cosine.
    let k = RECALL_K.min(n as usize - 1) as i64;
    let eye = Tensor::eye(n, (Kind::Double, tch::Device::Cpu)) * 10.0;
    let (_, nr) = (&sr - &eye).topk(k, 1, true, true);
    let (_, nq) = (&sq - &eye).topk(k, 1, true, true);
    // |top_k(FP32) ∩ top_k(quantized)| per row, through one-hot rows.
    let hits = Tensor::zeros([n, n], (Kind::Double, tch::Device::Cpu)).scatter_value(1, &nr, 1.0);
    let found = hits.gather(1, &nq, false).sum(Kind::Double);
    let recall = found.double_value(&[]) / (n * k) as f64;
    // Pairwise similarities of distinct pairs (upper triangle).
    let iu = Tensor::ones([n, n], (Kind::Bool, tch::Device::Cpu)).triu(1);
    let (pr, pq) = (sr.masked_select(&iu), sq.masked_select(&iu));
    Ok(EmbeddingMetrics {
        mean_cosine: cos.mean(Kind::Double).double_value(&[]),
        min_cosine: cos.min().double_value(&[]),
        recall_at_10: recall,
        spearman: spearman(&pr, &pq),
    })
}

/// Spearman's rank correlation of two equally long vectors: Pearson's correlation of their
/// ranks (ties ranked by position, not averaged).
pub fn spearman(a: &Tensor, b: &Tensor) -> f64 {
    let rank = |t: &Tensor| t.argsort(0, false).argsort(0, false).to_kind(Kind::Double);
    let (ra, rb) = (rank(a), rank(b));
    let (ca, cb) = (&ra - ra.mean(Kind::Double), &rb - rb.mean(Kind::Double));
    let num = (&ca * &cb).sum(Kind::Double).double_value(&[]);
    let den = (ca.square().sum(Kind::Double).double_value(&[]) * cb.square().sum(Kind::Double).double_value(&[])).sqrt();
    if den > 0.0 {
        num / den
    } else {
        f64::NAN
    }
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
    if model.output_kind() == OutputKind::Embedding {
        let loss = embedding_distillation(&reference.logits, &out).mean(Kind::Double).double_value(&[]);
        let embedding = Some(embedding_metrics(&reference.logits, &out)?);
        return Ok(Metrics { samples: n, accuracy: None, loss, kl: f64::NAN, agreement: f64::NAN, embedding });
    }
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
    Ok(Metrics { samples: n, accuracy, loss, kl, agreement, embedding: None })
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

#[cfg(test)]
mod tests {
    use super::*;
    use tch::Device;

    /// Tolerance of the metrics' float64 arithmetic.
    const EPS: f64 = 1e-9;

    fn random(n: i64, d: i64, seed: u64) -> Tensor {
        let v = crate::util::SplitMix64(seed).normals((n * d) as usize, 1.0);
        Tensor::from_slice(&v).view([n, d])
    }

    #[test]
    fn identical_embeddings_are_perfect() {
        let e = random(40, 16, 1);
        let m = embedding_metrics(&e, &(&e * 3.0)).unwrap();
        assert!((m.mean_cosine - 1.0).abs() < EPS && (m.min_cosine - 1.0).abs() < EPS, "{m:?}");
        assert!((m.recall_at_10 - 1.0).abs() < EPS && (m.spearman - 1.0).abs() < EPS, "{m:?}");
    }

    #[test]
    fn metrics_fall_with_noise_and_match_hand_counts() {
        let e = random(60, 16, 2);
        let small = embedding_metrics(&e, &(&e + random(60, 16, 3) * 0.1)).unwrap();
        let large = embedding_metrics(&e, &(&e + random(60, 16, 3) * 1.0)).unwrap();
        assert!(small.mean_cosine > large.mean_cosine && small.recall_at_10 > large.recall_at_10 && small.spearman > large.spearman);
        assert!(large.min_cosine <= large.mean_cosine);
        // Unrelated embeddings: recall near chance (k / (n − 1)), Spearman near 0.
        let other = embedding_metrics(&e, &random(60, 16, 4)).unwrap();
        assert!(other.recall_at_10 < 0.4 && other.spearman.abs() < 0.2, "{other:?}");
        // Spearman of a monotone transform is 1, of a reversed order −1.
        let a = Tensor::from_slice(&[0.1f64, 0.5, 0.2, 0.9, 0.3]);
        assert!((spearman(&a, &a.exp()) - 1.0).abs() < EPS);
        assert!((spearman(&a, &(-&a)) + 1.0).abs() < EPS);
        // Four points on a line: 0 and 1 are each other's nearest; with k = 3 = n − 1 every
        // neighbour set is everything else, so recall is 1 whatever the order.
        let line = Tensor::from_slice(&[1.0f64, 0.0, 0.9, 0.1, 0.0, 1.0, 0.1, 0.9]).view([4, 2]);
        let swapped = line.index_select(0, &Tensor::from_slice(&[1i64, 0, 3, 2]));
        assert!((embedding_metrics(&line, &swapped).unwrap().recall_at_10 - 1.0).abs() < EPS);
        assert!(embedding_metrics(&Tensor::zeros([1, 4], (Kind::Float, Device::Cpu)), &Tensor::zeros([1, 4], (Kind::Float, Device::Cpu)))
            .is_err());
    }
}
