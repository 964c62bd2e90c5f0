//! The losses mixq's sensitivity and evaluation use: cross-entropy against labels, or the
//! distillation loss KL(teacher ‖ student) against the full-precision model's logits when the data
//! has no labels.

use super::Target;
use tch::{Kind, Reduction, Tensor};

/// Mean loss of `logits` (`[N, C]`) against `target`.
pub fn loss(logits: &Tensor, target: Target<'_>) -> Tensor {
    match target {
        Target::Labels(y) => logits.cross_entropy_loss::<Tensor>(y, None, Reduction::Mean, -100, 0.0),
        Target::Teacher(t) => kl_divergence(t, logits).mean(Kind::Float),
    }
}

/// Per-sample KL(softmax(p_logits) ‖ softmax(q_logits)), in nats, `[N]`.
pub fn kl_divergence(p_logits: &Tensor, q_logits: &Tensor) -> Tensor {
    let lp = p_logits.log_softmax(-1, Kind::Float);
    let lq = q_logits.log_softmax(-1, Kind::Float);
    (lp.exp() * (&lp - &lq)).sum_dim_intlist(-1, false, Kind::Float)
}
