//! The losses mixq's sensitivity and evaluation use: cross-entropy against labels, the
//! distillation loss KL(teacher ‖ student) against the full-precision model's logits when the data
//! has no labels, and for embedding models the squared error to the full-precision embeddings.
//!
//! The embedding loss ½‖e − e_FP32‖² (per sample, averaged) is zero with a zero residual at the
//! FP32 weights, so its Hessian there is exactly the Gauss–Newton matrix Jᵀ J / N: the
//! curvature that says how far a weight perturbation moves the embeddings. For unit-norm
//! embeddings it equals 1 − cos(e, e_FP32).

use super::{OutputKind, Target};
use tch::{Kind, Reduction, Tensor};

/// Mean loss of `output` (logits `[N, C]` or embeddings `[N, D]`) against `target`.
pub fn loss(output: &Tensor, target: Target<'_>) -> Tensor {
    match target {
        Target::Labels(y) => output.cross_entropy_loss::<Tensor>(y, None, Reduction::Mean, -100, 0.0),
        Target::Teacher(t) => kl_divergence(t, output).mean(Kind::Float),
        Target::TeacherEmbedding(t) => embedding_distillation(t, output).mean(Kind::Float),
    }
}

/// Per-sample KL(softmax(p_logits) ‖ softmax(q_logits)), in nats, `[N]`.
pub fn kl_divergence(p_logits: &Tensor, q_logits: &Tensor) -> Tensor {
    let lp = p_logits.log_softmax(-1, Kind::Float);
    let lq = q_logits.log_softmax(-1, Kind::Float);
    (lp.exp() * (&lp - &lq)).sum_dim_intlist(-1, false, Kind::Float)
}

/// Per-sample ½‖student − teacher‖² of embeddings `[N, D]`, `[N]`.
pub fn embedding_distillation(teacher: &Tensor, student: &Tensor) -> Tensor {
    (student - teacher).square().sum_dim_intlist(-1, false, Kind::Float) * 0.5
}

/// The Hessian of a batch's mean loss with respect to the model's outputs `z` (`[B, C]`), as an
/// operator: the middle factor H_z of the Gauss–Newton product Jᵀ H_z J v.
pub enum OutputCurvature {
    /// Cross-entropy or KL on logits: row by row (diag(p) − p pᵀ)/B with p = softmax(z).
    Softmax {
        /// softmax(z), detached.
        p: Tensor,
        /// The batch size B.
        batch: f64,
    },
    /// The embedding distillation loss: I / B.
    Identity {
        /// The batch size B.
        batch: f64,
    },
}

impl OutputCurvature {
    /// H_z at outputs `z` of a model whose outputs are `kind`.
    pub fn new(kind: OutputKind, z: &Tensor) -> OutputCurvature {
        let batch = z.size()[0] as f64;
        match kind {
            OutputKind::Logits => OutputCurvature::Softmax { p: z.detach().softmax(-1, Kind::Float), batch },
            OutputKind::Embedding => OutputCurvature::Identity { batch },
        }
    }

    /// H_z · jv, for `jv` of the outputs' shape.
    pub fn apply(&self, jv: &Tensor) -> Tensor {
        match self {
            OutputCurvature::Softmax { p, batch } => {
                let pjv = p * jv;
                let pj = pjv.sum_dim_intlist(-1, true, Kind::Float);
                (pjv - p * pj) / *batch
            }
            OutputCurvature::Identity { batch } => jv / *batch,
        }
    }
}
