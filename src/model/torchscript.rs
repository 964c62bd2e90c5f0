//! TorchScript modules (`torch.jit.script` or `torch.jit.trace`, saved with `torch.jit.save`) as
//! [`QuantModel`]s, so that mixq can search bit widths for any PyTorch classifier without a native
//! port.
//!
//! Why it looks like this:
//! - **Layers** are the parameters named `<prefix>.weight` of rank 4 (conv) or 2 (linear or
//!   embedding), in `named_parameters` order; the layer's name is `<prefix>`, the FQN PyTorch uses.
//! - **Kind and MACs** need to know which op uses each weight and at which shapes, which tch's
//!   `CModule` cannot tell (no hooks, no graph). A small C++ shim (`csrc/torchscript_layers.cpp`,
//!   called through [`shim`]) runs the forward pass on the sample batch under a libtorch op
//!   observer and reports every conv / linear / matmul / embedding call that took a parameter,
//!   with its shapes. The MACs per sample are then exact: `output elements × (in/groups · kh · kw)`
//!   for a convolution, `output elements × contraction length` for linear and matmul ops,
//!   `input elements × (out/groups · kh · kw)` for a transposed convolution, 0 for an embedding
//!   lookup; summed over every call (a layer applied twice counts twice) and divided by the batch
//!   size. They are measured on the sample, so for models whose work depends on the input length
//!   (token sequences) they hold for the sample's shape.
//! - A rank-2 weight that feeds no recognised op (used through some other op, or only on a branch
//!   the sample does not take) is reported as a linear layer with 0 MACs, and a warning is logged:
//!   its cost under a BOPs budget is then unknown, not zero.
//! - **Weights** are the module's own parameter tensors: quantizing one in place (under no_grad,
//!   `copy_`) changes the module's output, which is how [`crate::model::apply`] applies a configuration.
//! - The forward pass runs in eval mode with gradients enabled, so the sensitivity estimators can
//!   take Hessian-vector products through it (double backward works through TorchScript).
//! - Activation quantization needs hooks inside the forward pass: not offered (the trait's default
//!   error says so).

mod shim;

use super::{LayerInfo, LayerKind, QuantModel};
use crate::error::{Error, Result};
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use tch::{CModule, IValue, Kind, Tensor};

/// Longest libtorch message kept in an error (libtorch messages can run to pages).
const MAX_TORCH_MESSAGE: usize = 400;

/// A TorchScript classifier loaded from a file.
pub struct TorchScriptModel {
    name: String,
    path: PathBuf,
    module: CModule,
    params: Vec<(String, Tensor)>,
    layers: Vec<LayerInfo>,
    input_shape: Vec<i64>,
    input_kind: Kind,
    num_classes: i64,
}

impl std::fmt::Debug for TorchScriptModel {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TorchScriptModel")
            .field("path", &self.path)
            .field("layers", &self.layers)
            .field("input_shape", &self.input_shape)
            .field("input_kind", &self.input_kind)
            .field("num_classes", &self.num_classes)
            .finish_non_exhaustive()
    }
}

impl TorchScriptModel {
    /// Loads the TorchScript module at `path` onto `sample`'s device, in eval mode, and finds its
    /// quantizable layers by running its forward pass on `sample`, a batch `[N, ...]` of real
    /// inputs (float images, int64 token ids, ...). The sample fixes [`QuantModel::input_shape`]
    /// and [`QuantModel::input_kind`]; the output must be logits `[N, C]`.
    ///
    /// Errors ([`Error::Model`], naming the path): the file is missing or not a TorchScript
    /// archive, the forward pass fails on the sample (wrong shape or dtype), or the output is not
    /// `[N, C]`.
    pub fn load(path: &Path, sample: &Tensor) -> Result<TorchScriptModel> {
        let name = path.display().to_string();
        let model_err = |msg: String| Error::Model { model: name.clone(), msg };
        if let Err(e) = std::fs::metadata(path) {
            return Err(model_err(format!("cannot read the TorchScript file: {e}")));
        }
        let batch = match sample.size().first() {
            Some(&n) if n > 0 => n,
            _ => return Err(model_err(format!("the sample batch must have shape [N, ...] with N ≥ 1, got {:?}", sample.size()))),
        };
        let mut module = CModule::load_on_device(path, sample.device()).map_err(|e| {
            model_err(format!(
                "not a TorchScript archive (save the model with torch.jit.save after torch.jit.script or torch.jit.trace): {}",
                short_torch_message(&e.to_string())
            ))
        })?;
        module.f_set_eval().map_err(|e| model_err(format!("cannot switch to eval mode: {}", short_torch_message(&e.to_string()))))?;

        let output = tch::no_grad(|| module.forward_is(&[IValue::Tensor(sample.shallow_clone())])).map_err(|e| {
            model_err(format!(
                "the forward pass fails on the sample batch (shape {:?}, {:?}): {}",
                sample.size(),
                sample.kind(),
                short_torch_message(&e.to_string())
            ))
        })?;
        let num_classes = match &output {
            IValue::Tensor(t) if t.dim() == 2 && t.size()[0] == batch => t.size()[1],
            IValue::Tensor(t) => {
                return Err(model_err(format!(
                    "the forward pass returns a tensor of shape {:?} for a batch of {batch}; mixq needs logits [N, C]",
                    t.size()
                )))
            }
            other => {
                return Err(model_err(format!("the forward pass returns {}, not a tensor; mixq needs logits [N, C]", ivalue_kind(other))))
            }
        };

        let params = module
            .named_parameters()
            .map_err(|e| model_err(format!("cannot list the parameters: {}", short_torch_message(&e.to_string()))))?;
        let trace = shim::trace_layer_uses(path, sample)
            .map_err(|e| model_err(format!("layer discovery failed on the sample batch: {}", short_torch_message(&e))))?;
        let weights: Vec<(String, Vec<i64>)> = params.iter().map(|(n, t)| (n.clone(), t.size())).collect();
        let (layers, unused) = layers_from_trace(&weights, &trace.uses, batch);
        for layer in unused {
            tracing::warn!(
                model = %name,
                layer = %layer,
                "weight `{layer}.weight` feeds no conv, linear, matmul or embedding op in the forward pass on the sample: \
                 reported as linear with 0 MACs (its compute cost is unknown)"
            );
        }
        Ok(TorchScriptModel {
            name,
            path: path.to_path_buf(),
            module,
            params,
            layers,
            input_shape: sample.size()[1..].to_vec(),
            input_kind: sample.kind(),
            num_classes,
        })
    }

    /// The file the model was loaded from.
    pub fn path(&self) -> &Path {
        &self.path
    }
}

impl QuantModel for TorchScriptModel {
    fn name(&self) -> &str {
        &self.name
    }

    fn layers(&self) -> &[LayerInfo] {
        &self.layers
    }

    fn input_shape(&self) -> &[i64] {
        &self.input_shape
    }

    fn input_kind(&self) -> Kind {
        self.input_kind
    }

    fn num_classes(&self) -> i64 {
        self.num_classes
    }

    fn named_parameters(&self) -> Vec<(String, Tensor)> {
        self.params.iter().map(|(n, t)| (n.clone(), t.shallow_clone())).collect()
    }

    /// Saves the module as it is now (parameters and buffers, with any weights quantized in
    /// place) to a temporary file and loads it back: the replica does not depend on the file the
    /// model came from still being there or unchanged. Layers and shapes are not rediscovered.
    fn replicate(&self) -> Result<Box<dyn QuantModel + Send>> {
        static COUNTER: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
        let model_err = |msg: String| Error::Model { model: self.name.clone(), msg };
        let k = COUNTER.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let tmp = std::env::temp_dir().join(format!(".mixq-replica-{}-{k}.pt", std::process::id()));
        let saved = self.module.save(&tmp);
        let device = self.params.first().map(|(_, t)| t.device()).unwrap_or(tch::Device::Cpu);
        let loaded = saved.and_then(|()| CModule::load_on_device(&tmp, device));
        let _ = std::fs::remove_file(&tmp);
        let mut module = loaded.map_err(|e| {
            model_err(format!("cannot replicate the module through {}: {}", tmp.display(), short_torch_message(&e.to_string())))
        })?;
        module
            .f_set_eval()
            .map_err(|e| model_err(format!("cannot switch the replica to eval mode: {}", short_torch_message(&e.to_string()))))?;
        let params = module
            .named_parameters()
            .map_err(|e| model_err(format!("cannot list the replica's parameters: {}", short_torch_message(&e.to_string()))))?;
        let same = params.len() == self.params.len()
            && params.iter().zip(&self.params).all(|((n, t), (m, u))| n == m && t.size() == u.size() && t.kind() == u.kind());
        if !same {
            return Err(model_err("the replica's parameters differ from the model's (names, shapes or dtypes)".into()));
        }
        Ok(Box::new(TorchScriptModel {
            name: self.name.clone(),
            path: self.path.clone(),
            module,
            params,
            layers: self.layers.clone(),
            input_shape: self.input_shape.clone(),
            input_kind: self.input_kind,
            num_classes: self.num_classes,
        }))
    }

    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let logits = self.module.forward_ts(&[x]).map_err(|e| Error::Model {
            model: self.name.clone(),
            msg: format!("forward pass failed on a batch of shape {:?}: {}", x.size(), short_torch_message(&e.to_string())),
        })?;
        if logits.dim() != 2 || logits.size()[1] != self.num_classes {
            return Err(Error::Model {
                model: self.name.clone(),
                msg: format!("forward pass returned shape {:?}; expected logits [N, {}]", logits.size(), self.num_classes),
            });
        }
        Ok(logits)
    }
}

/// What an op call contributes to the weights it uses.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Contribution {
    /// A convolution: its MACs (for the whole batch).
    Conv(i64),
    /// A linear or matmul op: its MACs (for the whole batch).
    Linear(i64),
    /// An embedding lookup.
    Embedding,
}

/// Classifies one op call and counts its multiply-accumulates over the whole batch.
/// `None` when the op is not recognised or its shapes are missing.
fn contribution(u: &shim::OpUse) -> Option<Contribution> {
    let numel = |s: &[i64]| s.iter().product::<i64>();
    let shape = |i: usize| u.inputs.get(i).and_then(|x| x.as_ref()).map(|x| x.shape.as_slice());
    let out = u.output.as_deref();
    match u.op.as_str() {
        "aten::conv1d"
        | "aten::conv2d"
        | "aten::conv3d"
        | "aten::_convolution"
        | "aten::convolution"
        | "aten::conv_transpose1d"
        | "aten::conv_transpose2d"
        | "aten::conv_transpose3d" => {
            let w = shape(1)?;
            let per_row = numel(w) / (*w.first()?).max(1); // in/groups·kh·kw, or out/groups·kh·kw transposed
            let positions = if u.transposed { numel(shape(0)?) } else { numel(out?) };
            Some(Contribution::Conv(positions * per_row))
        }
        "aten::embedding" | "aten::embedding_bag" | "aten::_embedding_bag" => Some(Contribution::Embedding),
        // Contraction length: the last dimension of the left operand.
        "aten::linear" | "aten::matmul" | "aten::mm" | "aten::bmm" | "aten::mv" => {
            Some(Contribution::Linear(numel(out?) * *shape(0)?.last()?))
        }
        "aten::addmm" | "aten::baddbmm" | "aten::addmv" => Some(Contribution::Linear(numel(out?) * *shape(1)?.last()?)),
        _ => None,
    }
}

/// Builds the quantizable layers from the parameters (name, shape, in named_parameters order) and
/// the traced op calls. Returns the layers and the names of rank-2 layers no recognised op used.
fn layers_from_trace(params: &[(String, Vec<i64>)], uses: &[shim::OpUse], batch: i64) -> (Vec<LayerInfo>, Vec<String>) {
    // Per parameter: (total MACs over the batch, seen as conv, as linear, as embedding).
    let mut seen: HashMap<&str, (i64, bool, bool, bool)> = HashMap::new();
    for u in uses {
        let Some(c) = contribution(u) else { continue };
        let mut names: Vec<&str> = u.inputs.iter().flatten().filter_map(|i| i.param.as_deref()).collect();
        names.sort_unstable();
        names.dedup();
        for n in names {
            let e = seen.entry(n).or_default();
            match c {
                Contribution::Conv(m) => {
                    e.0 += m;
                    e.1 = true;
                }
                Contribution::Linear(m) => {
                    e.0 += m;
                    e.2 = true;
                }
                Contribution::Embedding => e.3 = true,
            }
        }
    }
    let mut layers = Vec::new();
    let mut unused = Vec::new();
    for (pname, shape) in params {
        let Some(name) = pname.strip_suffix(".weight") else { continue };
        if shape.len() != 4 && shape.len() != 2 {
            continue;
        }
        let (total, _conv, linear, embedding) = seen.get(pname.as_str()).copied().unwrap_or_default();
        if !seen.contains_key(pname.as_str()) {
            unused.push(name.to_string());
        }
        let kind = if shape.len() == 4 {
            LayerKind::Conv2d
        } else if embedding && !linear {
            LayerKind::Embedding
        } else {
            // Linear use, a weight tied between an embedding and a linear op (the MACs are the
            // linear op's), or no use at all.
            LayerKind::Linear
        };
        layers.push(LayerInfo {
            name: name.to_string(),
            kind,
            shape: shape.clone(),
            params: shape.iter().product(),
            macs: (total + batch / 2) / batch.max(1),
        });
    }
    (layers, unused)
}

/// The useful part of a libtorch error: without the C++ backtrace and, for TorchScript errors,
/// only the final `RuntimeError: ...` line rather than the serialized-code traceback; at most
/// [`MAX_TORCH_MESSAGE`] characters.
fn short_torch_message(msg: &str) -> String {
    let msg = msg.split("Exception raised from").next().unwrap_or(msg);
    let lines: Vec<&str> = msg.lines().map(str::trim).filter(|l| !l.is_empty()).collect();
    let line = if msg.contains("Traceback of TorchScript") { lines.last() } else { lines.first() };
    let line = line.copied().unwrap_or("(no message)");
    if line.chars().count() > MAX_TORCH_MESSAGE {
        let mut s: String = line.chars().take(MAX_TORCH_MESSAGE).collect();
        s.push('…');
        s
    } else {
        line.to_string()
    }
}

/// A short description of a non-tensor forward output, for error messages.
fn ivalue_kind(v: &IValue) -> &'static str {
    match v {
        IValue::None => "None",
        IValue::Tuple(_) => "a tuple",
        IValue::GenericList(_) | IValue::TensorList(_) | IValue::DoubleList(_) | IValue::IntList(_) | IValue::BoolList(_) => "a list",
        IValue::GenericDict(_) => "a dict",
        IValue::String(_) | IValue::StringList(_) => "a string",
        IValue::Double(_) | IValue::Int(_) | IValue::Bool(_) => "a scalar",
        _ => "an object",
    }
}

#[cfg(test)]
mod tests {
    use super::shim::{OpInput, OpUse};
    use super::*;

    fn input(shape: &[i64], param: Option<&str>) -> Option<OpInput> {
        Some(OpInput { shape: shape.to_vec(), param: param.map(str::to_string) })
    }

    fn op(op: &str, inputs: Vec<Option<OpInput>>, output: &[i64]) -> OpUse {
        OpUse { op: op.to_string(), transposed: op.contains("transpose"), inputs, output: Some(output.to_vec()) }
    }

    #[test]
    fn conv_linear_embedding_macs() {
        let params = vec![
            ("emb.weight".to_string(), vec![50, 16]),
            ("conv.weight".to_string(), vec![8, 2, 3, 3]),
            ("conv.bias".to_string(), vec![8]),
            ("fc.weight".to_string(), vec![10, 16]),
        ];
        let uses = vec![
            op("aten::embedding", vec![input(&[50, 16], Some("emb.weight")), input(&[4, 6], None), None], &[4, 6, 16]),
            // groups = 2: weight [8, 4/2, 3, 3], output [4, 8, 5, 5]
            op(
                "aten::conv2d",
                vec![input(&[4, 4, 7, 7], None), input(&[8, 2, 3, 3], Some("conv.weight")), input(&[8], Some("conv.bias"))],
                &[4, 8, 5, 5],
            ),
            // applied per token: [4, 6, 16] → [4, 6, 10]
            op("aten::linear", vec![input(&[4, 6, 16], None), input(&[10, 16], Some("fc.weight")), None], &[4, 6, 10]),
        ];
        let (layers, unused) = layers_from_trace(&params, &uses, 4);
        assert!(unused.is_empty());
        let got: Vec<_> = layers.iter().map(|l| (l.name.as_str(), l.kind, l.macs, l.params)).collect();
        assert_eq!(
            got,
            vec![
                ("emb", LayerKind::Embedding, 0, 800),
                ("conv", LayerKind::Conv2d, 8 * 25 * 2 * 9, 144),
                ("fc", LayerKind::Linear, 6 * 10 * 16, 160)
            ]
        );
    }

    #[test]
    fn matmul_with_transposed_weight_reuse_and_unused() {
        let params = vec![("w.weight".to_string(), vec![10, 16]), ("lonely.weight".to_string(), vec![3, 3])];
        let mm = op("aten::matmul", vec![input(&[2, 16], None), input(&[16, 10], Some("w.weight"))], &[2, 10]);
        let addmm = op("aten::addmm", vec![None, input(&[2, 16], None), input(&[16, 10], Some("w.weight"))], &[2, 10]);
        let (layers, unused) = layers_from_trace(&params, &[mm, addmm], 2);
        assert_eq!(layers[0].kind, LayerKind::Linear);
        assert_eq!(layers[0].macs, 2 * 160);
        assert_eq!(layers[1].macs, 0);
        assert_eq!(unused, vec!["lonely".to_string()]);
    }

    #[test]
    fn transposed_conv_counts_input_positions() {
        // ConvTranspose2d(4 → 6, 3x3): weight [4, 6, 3, 3]; each input element feeds 6·9 MACs.
        let params = vec![("up.weight".to_string(), vec![4, 6, 3, 3])];
        let u = op("aten::conv_transpose2d", vec![input(&[1, 4, 5, 5], None), input(&[4, 6, 3, 3], Some("up.weight"))], &[1, 6, 7, 7]);
        let (layers, _) = layers_from_trace(&params, &[u], 1);
        assert_eq!(layers[0].macs, 100 * 54);
    }

    #[test]
    fn torch_messages_are_shortened() {
        let ts = "The following operation failed in the TorchScript interpreter.\nTraceback of TorchScript (most recent call last):\n  File \"x.py\"\n    ~~~ <--- HERE\nRuntimeError: Input type (long int) and bias type (float) should be the same\n";
        assert_eq!(short_torch_message(ts), "RuntimeError: Input type (long int) and bias type (float) should be the same");
        let cpp = "open file failed because of errno 2\nException raised from x at y.cpp:3\nframe #0: ...";
        assert_eq!(short_torch_message(cpp), "open file failed because of errno 2");
        assert!(short_torch_message(&"x".repeat(1000)).chars().count() <= MAX_TORCH_MESSAGE + 1);
    }
}
