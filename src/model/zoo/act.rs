//! Activation quantization at layer inputs, shared by the native zoo models: a table of
//! per-layer input formats, and the quantizer each model's forward pass calls on a layer's
//! input before the layer (and before the caller's [`crate::sensitivity::activation::InputHooks`]
//! hook).

use crate::error::{Error, Result};
use crate::quant::Format;
use std::collections::HashMap;
use std::sync::Mutex;
use tch::Tensor;

/// The input-activation formats of a model's layers (absent: full precision).
#[derive(Debug, Default)]
pub(crate) struct ActivationTable(Mutex<HashMap<String, Format>>);

impl ActivationTable {
    /// A table holding `formats`.
    pub(crate) fn with(formats: HashMap<String, Format>) -> Self {
        ActivationTable(Mutex::new(formats))
    }

    /// Quantizes (Some) or stops quantizing (None) the input of `layer` of model `model`.
    pub(crate) fn set(&self, model: &str, layer: &str, format: Option<Format>) -> Result<()> {
        let mut map = self.0.lock().map_err(|_| poisoned(model))?;
        match format {
            Some(f) => map.insert(layer.to_string(), f),
            None => map.remove(layer),
        };
        Ok(())
    }

    /// The formats as they are now (a copy: a forward pass reads one consistent table).
    pub(crate) fn snapshot(&self, model: &str) -> Result<HashMap<String, Format>> {
        self.0.lock().map(|m| m.clone()).map_err(|_| poisoned(model))
    }
}

fn poisoned(model: &str) -> Error {
    Error::Model { model: model.to_string(), msg: "activation-quantization table poisoned".into() }
}

/// The input `x` of `layer` as the layer sees it: fake-quantized when `formats` has a format for
/// the layer. When `x` is part of an autograd graph the quantizer is wrapped in a straight-through
/// estimator (`x + (q(x) − x).detach()`): the values are the quantized ones, the gradient is the
/// identity, so sensitivities and HVPs still reach the weights of earlier layers.
pub(crate) fn quantized_input(formats: &HashMap<String, Format>, layer: &str, x: &Tensor) -> Result<Tensor> {
    Ok(match formats.get(layer) {
        Some(f) if x.requires_grad() => {
            let q = crate::quant::fake_quantize_activation(x, *f)?;
            x + (q - x).detach()
        }
        Some(f) => crate::quant::fake_quantize_activation(x, *f)?,
        None => x.shallow_clone(),
    })
}
