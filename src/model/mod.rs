//! Models mixq can quantize: one [`QuantModel`] abstraction over the native zoo models
//! ([`zoo`]) and any TorchScript module ([`torchscript`]).
//!
//! A model exposes its quantizable layers (conv, linear and embedding weights) by their fully
//! qualified PyTorch names, a forward pass, and its parameters. Weight quantization is done from
//! outside by rewriting weight tensors in place (see [`apply`]), so it works the same
//! for every model; activation quantization needs hooks inside the forward pass and is offered by
//! native models only.

pub mod apply;
pub mod corpus;
pub mod data;
pub mod loss;
pub mod torchscript;
pub mod zoo;

use crate::error::{Error, Result};
use crate::quant::Format;
use crate::sensitivity::activation::InputHooks;
use serde::{Deserialize, Serialize};

pub use apply::{apply, Applied, ResolvedLayer};
use tch::{Kind, Tensor};

/// The kind of a quantizable layer.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LayerKind {
    /// 2-D convolution, weight `[out, in/groups, kh, kw]`.
    Conv2d,
    /// Fully connected, weight `[out, in]`.
    Linear,
    /// Embedding table, weight `[num_embeddings, dim]`.
    Embedding,
}

impl std::fmt::Display for LayerKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            LayerKind::Conv2d => "conv2d",
            LayerKind::Linear => "linear",
            LayerKind::Embedding => "embedding",
        })
    }
}

/// One quantizable layer.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LayerInfo {
    /// Fully qualified name, as in PyTorch's state_dict without the `.weight` suffix
    /// (e.g. `layer1.0.conv1`).
    pub name: String,
    /// Conv, linear or embedding.
    pub kind: LayerKind,
    /// Weight shape.
    pub shape: Vec<i64>,
    /// Number of weight elements.
    pub params: i64,
    /// Multiply–accumulates per sample (0 for embeddings, which are lookups).
    pub macs: i64,
}

/// What a model's forward pass returns, which decides its loss and its fidelity metrics.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum OutputKind {
    /// Class logits `[N, C]`: cross-entropy against labels, or KL(FP32 ‖ quantized) without;
    /// accuracy, KL and top-1 agreement.
    #[default]
    Logits,
    /// Sentence embeddings `[N, D]`: distillation to the FP32 embeddings (squared error); cosine
    /// to FP32, nearest-neighbour recall and the rank correlation of pairwise similarities.
    Embedding,
}

/// What the loss compares the model's output to.
pub enum Target<'a> {
    /// Class labels (int64 `[N]`): cross-entropy.
    Labels(&'a Tensor),
    /// Logits of the full-precision model (`[N, C]`): KL(teacher ‖ student), for data without labels.
    Teacher(&'a Tensor),
    /// Embeddings of the full-precision model (`[N, D]`): ½‖student − teacher‖² per sample
    /// ([`loss::embedding_distillation`]).
    TeacherEmbedding(&'a Tensor),
}

impl<'a> Target<'a> {
    /// The distillation target for the full-precision outputs `t` of a model whose outputs are
    /// `kind`: KL for logits, squared error for embeddings.
    pub fn teacher(kind: OutputKind, t: &'a Tensor) -> Target<'a> {
        match kind {
            OutputKind::Logits => Target::Teacher(t),
            OutputKind::Embedding => Target::TeacherEmbedding(t),
        }
    }
}

/// A model (a classifier or a sentence encoder) whose layers mixq can quantize.
pub trait QuantModel {
    /// A short name for logs and reports (zoo name or file path).
    fn name(&self) -> &str;

    /// The quantizable layers, in forward order.
    fn layers(&self) -> &[LayerInfo];

    /// Shape of one input sample (without the batch dimension).
    fn input_shape(&self) -> &[i64];

    /// dtype of the input (Float for images, Int64 for token ids).
    fn input_kind(&self) -> Kind {
        Kind::Float
    }

    /// Number of classes (width of the logits); for an embedding model, the embedding width.
    fn num_classes(&self) -> i64;

    /// What [`QuantModel::forward`] returns: logits (the default) or embeddings.
    fn output_kind(&self) -> OutputKind {
        OutputKind::Logits
    }

    /// Token ids `[N, L]` (int64, `L` = [`QuantModel::input_shape`]) of sentences, for models
    /// that take text; the default is an error naming the model.
    fn encode_text(&self, texts: &[String]) -> Result<Tensor> {
        let _ = texts;
        Err(Error::Unsupported(format!(
            "model {} does not take text (it has no tokenizer); text data needs a model such as minilm",
            self.name()
        )))
    }

    /// All trainable parameters by fully qualified name. The tensors share storage with the model.
    fn named_parameters(&self) -> Vec<(String, Tensor)>;

    /// Logits `[N, num_classes]` (or embeddings, see [`QuantModel::output_kind`]) of a batch, in
    /// evaluation mode. Gradients flow when enabled.
    fn forward(&self, x: &Tensor) -> Result<Tensor>;

    /// Whether activations at layer inputs can be quantized.
    fn supports_activation_quant(&self) -> bool {
        false
    }

    /// Quantizes (Some) or stops quantizing (None) the input activation of `layer`.
    fn set_activation_quant(&self, layer: &str, format: Option<Format>) -> Result<()> {
        let _ = format;
        Err(Error::Unsupported(format!(
            "activation quantization (asked for layer `{layer}`) needs a native mixq model; {} is a TorchScript module, for which mixq quantizes weights only",
            self.name()
        )))
    }

    /// The model's hooked forward pass, for activation sensitivity ([`InputHooks`]): native
    /// models return themselves; a TorchScript module has no hook inside its forward pass (None).
    fn input_hooks(&self) -> Option<&dyn InputHooks> {
        None
    }

    /// An independent deep copy of the model as it is now (weights included, quantized or not),
    /// which can be moved to another thread: quantizing a weight of the replica leaves this model
    /// unchanged. Used to run the measured-ΔL estimator on several threads, one replica each.
    ///
    /// Models that cannot be replicated return [`Error::Unsupported`] (the default), and callers
    /// fall back to working on the one model.
    fn replicate(&self) -> Result<Box<dyn QuantModel + Send>> {
        Err(Error::Unsupported(format!("model {} cannot be replicated (no deep copy implemented)", self.name())))
    }

    /// The weight of a quantizable layer (shares storage with the model).
    fn weight(&self, layer: &str) -> Result<Tensor> {
        if !self.layers().iter().any(|l| l.name == layer) {
            return Err(Error::unknown_layer(layer, self.layers().iter().map(|l| l.name.as_str())));
        }
        let key = format!("{layer}.weight");
        self.named_parameters()
            .into_iter()
            .find(|(n, _)| *n == key)
            .map(|(_, t)| t)
            .ok_or_else(|| Error::Model { model: self.name().to_string(), msg: format!("layer `{layer}` has no parameter `{key}`") })
    }

    /// The layer named `name`, or an error with the closest names.
    fn layer(&self, name: &str) -> Result<&LayerInfo> {
        self.layers()
            .iter()
            .find(|l| l.name == name)
            .ok_or_else(|| Error::unknown_layer(name, self.layers().iter().map(|l| l.name.as_str())))
    }

    /// Hex SHA-256 over the names, shapes and values of all parameters (for provenance and caches).
    fn weights_hash(&self) -> String {
        let mut bytes = Vec::new();
        let mut params = self.named_parameters();
        params.sort_by(|a, b| a.0.cmp(&b.0));
        for (name, t) in params {
            bytes.extend_from_slice(name.as_bytes());
            let t = t.detach().to_kind(Kind::Float).contiguous();
            for d in t.size() {
                bytes.extend_from_slice(&d.to_le_bytes());
            }
            let v: Vec<f32> = Vec::try_from(t.flatten(0, -1)).unwrap_or_default();
            for x in v {
                bytes.extend_from_slice(&x.to_le_bytes());
            }
        }
        crate::util::sha256_hex(&bytes)
    }
}

/// Loads a model: a zoo name (trained and cached on first use) or a TorchScript file, whose
/// layers are discovered with a forward pass on a sample of `data` (required for TorchScript).
pub fn load(spec: &str, data: Option<&data::Dataset>) -> Result<Box<dyn QuantModel>> {
    let model: Box<dyn QuantModel> = if let Some(name) = zoo::NAMES.iter().find(|n| **n == spec) {
        zoo::load(name, None)?
    } else {
        let path = std::path::Path::new(spec);
        if !path.exists() {
            return Err(Error::Model {
                model: spec.to_string(),
                msg: format!("no such file, and not a zoo model (zoo models: {})", zoo::NAMES.join(", ")),
            });
        }
        let data = data.ok_or_else(|| Error::Model {
            model: spec.to_string(),
            msg: "a TorchScript model needs sample data to discover its layers".to_string(),
        })?;
        let sample = data.x.narrow(0, 0, (data.len() as i64).min(8));
        Box::new(torchscript::TorchScriptModel::load(path, &sample)?)
    };
    if model.layers().is_empty() {
        return Err(Error::Model {
            model: spec.to_string(),
            msg: "no quantizable layers found (parameters named `<layer>.weight` of rank 2 or 4). A module saved after \
                  torch.jit.freeze keeps its weights as constants: save it without freezing"
                .to_string(),
        });
    }
    Ok(model)
}
