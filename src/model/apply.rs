//! Applying a per-layer quantization to a model, and undoing it: the model capability that
//! every stage which measures a quantized model uses (evaluation, measured ΔL, kernels checks).

use crate::error::Result;
use crate::model::{LayerInfo, QuantModel};
use crate::quant::{fake_quantize, Format, QuantSpec};
use tch::Tensor;

/// The resolved quantization of one layer.
#[derive(Debug, Clone, PartialEq)]
pub struct ResolvedLayer {
    /// The layer.
    pub layer: LayerInfo,
    /// Weight quantization.
    pub weight: QuantSpec,
    /// Input activation format, if quantized.
    pub activation: Option<Format>,
    /// Where the setting came from: `layers`, `rules[i]` or `default`.
    pub source: String,
}

/// A model with a config applied. Dropping it (or calling [`Applied::restore`]) puts back the
/// FP32 weights bit for bit and switches activation quantization off again.
pub struct Applied<'m> {
    model: &'m dyn QuantModel,
    saved: Vec<(Tensor, Tensor)>,
    activations: Vec<String>,
}

/// Fake-quantizes the weights of every layer in `plan` in place and switches on the input
/// activation quantization it asks for. Layers whose weight format is a keep format other than
/// fp32 (bf16, fp16) are rounded too. On error, everything done so far is undone.
pub fn apply<'m>(model: &'m dyn QuantModel, plan: &[ResolvedLayer]) -> Result<Applied<'m>> {
    let mut applied = Applied { model, saved: Vec::new(), activations: Vec::new() };
    for r in plan {
        if r.weight.format != crate::quant::Format::Fp32 {
            let w = model.weight(&r.layer.name)?;
            let q = tch::no_grad(|| fake_quantize(&w.detach(), &r.weight))?;
            let backup = w.detach().copy();
            tch::no_grad(|| w.detach().copy_(&q));
            applied.saved.push((w, backup));
        }
        if let Some(act) = r.activation {
            model.set_activation_quant(&r.layer.name, Some(act))?;
            applied.activations.push(r.layer.name.clone());
        }
    }
    Ok(applied)
}

impl Applied<'_> {
    /// Puts the FP32 weights back and switches activation quantization off.
    pub fn restore(mut self) {
        self.undo();
    }

    fn undo(&mut self) {
        for (w, backup) in self.saved.drain(..) {
            tch::no_grad(|| w.detach().copy_(&backup));
        }
        for name in self.activations.drain(..) {
            // Switching off cannot fail for a layer that was switched on.
            let _ = self.model.set_activation_quant(&name, None);
        }
    }
}

impl Drop for Applied<'_> {
    fn drop(&mut self) {
        self.undo();
    }
}
