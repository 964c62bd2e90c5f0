//! Evaluation through the real low-bit kernels of `mixq-kernels`, not fake quantization.
//!
//! Fake quantization ([`crate::model::apply`]) runs the FP32 model on rounded weights: it measures
//! what the *numbers* of a format cost, but not what a deployment computes. This module runs each
//! quantized layer through a packed weight and the kernels' GEMM ([`QLinear`]): the weight is
//! quantized by [`quantize`] into codes and scales, packed (two int4 / FP4 codes per byte, one
//! int8 / FP8 code per byte, FP32 group scales, zero points), and multiplied by the kernels —
//! linear layers directly, convolutions as a GEMM over the im2col patches of their input. Agreement
//! with fake quantization up to FP32 summation order is then a check of the whole chain (codes,
//! packing, decoding, GEMM), and a config's accuracy is reported through the arithmetic a CPU
//! deployment would run.
//!
//! What runs where:
//! - weights in int4, int4-asym, int8, int8-asym, fp8-e4m3 or fp4-e2m1 (any granularity, scale
//!   type and clipping) of linear layers and ungrouped convolutions: the kernels ([`LayerPath::Kernel`]);
//! - other formats (int2, int3, int5–int7, their asym forms, fp8-e5m2, bf16, fp16) and grouped
//!   convolutions: fake-quantized weights through libtorch's conv / linear ([`LayerPath::FakeQuant`]);
//! - fp32: libtorch on the FP32 weight ([`LayerPath::Fp32`]).
//!
//! Activations stay FP32 at the kernels' input: a config's input-activation format is applied with
//! [`fake_quantize_activation`] before the layer, exactly as the fake-quantized model does (the
//! kernels' W8A8 path quantizes per GEMM row, a different scheme, so it is not used here).
//!
//! The model's forward pass must be run layer by layer, and [`QuantModel`] offers no per-layer
//! hook: [`KernelModel`] replays the forward pass of the zoo model `digits-resnet` from its
//! parameters and layer table (stem, residual blocks `layerI.0`, mean pool, `fc`). Before it is
//! used, the replay is checked against the model's own forward pass with FP32 weights (they must
//! agree to [`REPLAY_RTOL`]), so a change of the zoo architecture is an error, not a silent
//! mismatch. TorchScript modules are opaque to mixq (no hooks) and are rejected with a message.

use crate::config::QuantConfig;
use crate::error::{Error, Result};
use crate::eval::metrics::{evaluate, logits, model_size, Metrics, Reference, SizeReport};
use crate::model::data::Dataset;
use crate::model::ResolvedLayer;
use crate::model::{LayerInfo, LayerKind, QuantModel};
use crate::quant::{fake_quantize, fake_quantize_activation, out_inner, quantize, Format, Granularity, QuantSpec};
use mixq_kernels::{KernelError, PackedWeight, QLinear, WeightFormat};
use serde::{Deserialize, Serialize};
use std::cell::RefCell;
use std::collections::HashMap;
use tch::{Device, Kind, Tensor};

/// The weight formats the kernels run (with any granularity, scale type and clipping), for
/// messages.
pub const KERNEL_FORMATS: &str = "int4, int4-asym, int8, int8-asym, fp8-e4m3, fp4-e2m1";

/// Relative tolerance (to the largest |logit|) of the replayed forward pass against the model's
/// own, both with FP32 weights: the same libtorch ops in the same order, so only a different
/// architecture exceeds it.
pub const REPLAY_RTOL: f64 = 1e-5;

/// The kernels' storage format for a mixq format, if the kernels have one.
pub fn weight_format(f: Format) -> Option<WeightFormat> {
    match f {
        Format::Int { bits: 4, signed } => Some(WeightFormat::Int4 { asymmetric: !signed }),
        Format::Int { bits: 8, signed } => Some(WeightFormat::Int8 { asymmetric: !signed }),
        Format::Fp8E4M3 => Some(WeightFormat::Fp8E4M3),
        Format::Fp4E2M1 => Some(WeightFormat::Fp4E2M1),
        _ => None,
    }
}

/// The kernels' group size along the inner dimension `k` for a granularity: `k` for per-tensor
/// (one scale, repeated per row) and per-channel, `g` for `group:g`.
pub fn kernel_group(granularity: Granularity, k: usize) -> usize {
    match granularity {
        Granularity::PerGroup(g) => g as usize,
        _ => k,
    }
}

fn kernel_error(layer: &str, spec: &QuantSpec, e: KernelError) -> Error {
    Error::Unsupported(format!("layer `{layer}`: the kernels cannot run its weight as {spec}: {e}"))
}

fn floats(t: &Tensor) -> Result<Vec<f32>> {
    Ok(Vec::<f32>::try_from(t.f_to_kind(Kind::Float)?.f_contiguous()?.f_view([-1])?)?)
}

fn ints(t: &Tensor) -> Result<Vec<i32>> {
    Ok(Vec::<i32>::try_from(t.f_to_kind(Kind::Int)?.f_contiguous()?.f_view([-1])?)?)
}

/// Quantizes `w` (`[out, ...]`, viewed as `[out, inner]`) under `spec` with [`quantize`] and packs
/// the codes and scales for the kernels. The packed weight dequantizes to exactly
/// `fake_quantize(w, spec)` (up to the sign of zero). Errors for formats the kernels do not store
/// (see [`KERNEL_FORMATS`]) and for everything [`quantize`] rejects; `layer` names the layer in
/// messages.
pub fn pack_weight(layer: &str, w: &Tensor, spec: &QuantSpec) -> Result<PackedWeight> {
    let format = weight_format(spec.format).ok_or_else(|| {
        Error::Unsupported(format!("layer `{layer}`: the kernels do not run {} weights; they run {KERNEL_FORMATS}", spec.format))
    })?;
    let q = quantize(w, spec)?;
    let (n, k) = out_inner(&w.size());
    let (n, k) = (n as usize, k as usize);
    let group = kernel_group(spec.granularity, k);
    // Per-tensor: one scale (and zero point) for the whole weight, repeated on every row.
    let per_row = |v: Vec<f32>| if v.len() == 1 { vec![v[0]; n] } else { v };
    let scales = per_row(floats(&q.scales)?);
    if scales.len() != n * (k / group.max(1)) {
        return Err(Error::Unsupported(format!("layer `{layer}`: {} scales for a [{n}, {k}] weight with groups of {group}", scales.len())));
    }
    let packed = if format.is_int() {
        let zeros = match &q.zero_points {
            Some(z) => {
                let z = ints(z)?;
                Some(if z.len() == 1 { vec![z[0]; n] } else { z })
            }
            None => None,
        };
        PackedWeight::pack_int(format, &ints(&q.codes)?, &scales, zeros.as_deref(), n, k)
    } else {
        PackedWeight::pack_float(format, &floats(&q.codes)?, &scales, n, k)
    };
    packed.map_err(|e| kernel_error(layer, spec, e))
}

/// How one layer runs in a [`KernelModel`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum LayerPath {
    /// Packed weight and the kernels' GEMM (im2col for convolutions).
    Kernel,
    /// Fake-quantized weight through libtorch's conv / linear (a format or layer the kernels do
    /// not run).
    FakeQuant,
    /// The FP32 weight through libtorch.
    Fp32,
}

impl std::fmt::Display for LayerPath {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            LayerPath::Kernel => "kernels",
            LayerPath::FakeQuant => "fake-quant (libtorch)",
            LayerPath::Fp32 => "fp32 (libtorch)",
        })
    }
}

/// One layer prepared for [`KernelModel`]: its weight either packed for the kernels or as a
/// (fake-quantized or FP32) libtorch tensor, its bias, and its input-activation format.
#[derive(Debug)]
pub struct KernelLayer {
    info: LayerInfo,
    path: LayerPath,
    /// Set for [`LayerPath::Kernel`].
    qlinear: Option<QLinear>,
    /// The libtorch weight for the other paths (the layer's shape).
    weight: Option<Tensor>,
    bias: Option<Tensor>,
    activation: Option<Format>,
}

/// Where a convolution's output pixels come from: stride and zero padding (square, dilation 1).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ConvGeometry {
    /// Stride.
    pub stride: i64,
    /// Zero padding on each side.
    pub padding: i64,
}

impl KernelLayer {
    /// Prepares the layer of `r` from `model`'s weight and bias (copied: the layer does not share
    /// storage with the model). `fp32_only` keeps the FP32 weight whatever `r` says (the replay
    /// check).
    fn new(model: &dyn QuantModel, r: &ResolvedLayer, fp32_only: bool) -> Result<Self> {
        let name = &r.layer.name;
        let w = model.weight(name)?.detach().f_to_kind(Kind::Float)?.f_contiguous()?.copy();
        let bias = model.named_parameters().into_iter().find(|(n, _)| *n == format!("{name}.bias")).map(|(_, t)| t.detach().copy());
        let (path, qlinear, weight) = if fp32_only || r.weight.format == Format::Fp32 {
            (LayerPath::Fp32, None, Some(w))
        } else if weight_format(r.weight.format).is_some() && r.layer.kind != LayerKind::Embedding {
            let packed = pack_weight(name, &w, &r.weight)?;
            let ql = QLinear::new(packed, Device::Cpu).map_err(|e| kernel_error(name, &r.weight, e))?;
            (LayerPath::Kernel, Some(ql), None)
        } else {
            (LayerPath::FakeQuant, None, Some(fake_quantize(&w, &r.weight)?))
        };
        let activation = if fp32_only { None } else { r.activation };
        Ok(KernelLayer { info: r.layer.clone(), path, qlinear, weight, bias, activation })
    }

    /// How the layer runs.
    pub fn path(&self) -> LayerPath {
        self.path
    }

    /// The layer's output for input `x` (`[N, in]` for linear, `[N, C, H, W]` for a convolution
    /// with `geometry`).
    fn forward(&self, x: &Tensor, geometry: Option<ConvGeometry>) -> Result<Tensor> {
        let x = match self.activation {
            Some(f) => fake_quantize_activation(x, f)?,
            None => x.shallow_clone(),
        };
        let name = &self.info.name;
        let bad = |msg: String| Error::Model { model: "kernel evaluation".into(), msg: format!("layer `{name}`: {msg}") };
        match (self.info.kind, geometry) {
            (LayerKind::Linear, _) => {
                let y = match (&self.qlinear, &self.weight) {
                    (Some(q), _) => q.forward(&x).map_err(|e| bad(e.to_string()))?,
                    (None, Some(w)) => return Ok(x.f_linear(w, self.bias.as_ref())?),
                    _ => return Err(bad("no weight".into())),
                };
                Ok(match &self.bias {
                    Some(b) => y.f_add(b)?,
                    None => y,
                })
            }
            (LayerKind::Conv2d, Some(g)) => {
                let (s, p) = ([g.stride, g.stride], [g.padding, g.padding]);
                match (&self.qlinear, &self.weight) {
                    (Some(q), _) => {
                        let shape = &self.info.shape;
                        let (o, kh, kw) = (shape[0], shape[2], shape[3]);
                        let xs = x.size();
                        if xs.len() != 4 || xs[1] != shape[1] {
                            return Err(bad(format!("input {xs:?} does not fit a conv weight {shape:?}")));
                        }
                        let (oh, ow) = ((xs[2] + 2 * p[0] - kh) / s[0] + 1, (xs[3] + 2 * p[1] - kw) / s[1] + 1);
                        // im2col: [N, C·kh·kw, L] with the columns in the weight's (c, kh, kw) order.
                        let cols = x.f_im2col([kh, kw], [1, 1], p, s)?;
                        let rows = cols.f_transpose(1, 2)?.f_reshape([-1, shape[1] * kh * kw])?;
                        let y = q.forward(&rows).map_err(|e| bad(e.to_string()))?;
                        let y = y.f_reshape([xs[0], oh * ow, o])?.f_permute([0, 2, 1])?.f_reshape([xs[0], o, oh, ow])?;
                        Ok(match &self.bias {
                            Some(b) => y.f_add(&b.f_reshape([1, o, 1, 1])?)?,
                            None => y,
                        })
                    }
                    (None, Some(w)) => Ok(x.f_conv2d(w, self.bias.as_ref(), s, p, [1, 1], 1)?),
                    _ => Err(bad("no weight".into())),
                }
            }
            (kind, _) => Err(bad(format!("a {kind} layer cannot run here"))),
        }
    }
}

/// A model whose quantized layers run through the kernels (see the module docs): a
/// [`QuantModel`] whose [`QuantModel::forward`] replays the wrapped model's forward pass layer by
/// layer. Parameters, layers and shapes are the wrapped model's; the wrapped model is never
/// modified.
pub struct KernelModel<'m> {
    inner: &'m dyn QuantModel,
    layers: HashMap<String, KernelLayer>,
    blocks: usize,
    /// Outputs of `forward`, kept while recording (one kernel pass gives metrics and logits).
    recorded: RefCell<Option<Vec<Tensor>>>,
}

/// The zoo models whose forward pass [`KernelModel`] can replay.
pub const REPLAYABLE: &[&str] = &["digits-resnet"];

impl<'m> KernelModel<'m> {
    /// Prepares `model` under the resolved config `plan` (one entry per layer). Errors when the
    /// model's forward pass cannot be replayed (a TorchScript module, another architecture), when
    /// the replay disagrees with the model, or when a weight cannot be packed.
    pub fn new(model: &'m dyn QuantModel, plan: &[ResolvedLayer]) -> Result<Self> {
        if !REPLAYABLE.contains(&model.name()) {
            return Err(Error::Unsupported(format!(
                "evaluation through the kernels replays the forward pass layer by layer, which mixq can do for the zoo \
                 model{} {} only; `{}` is opaque to it (a TorchScript module has no per-layer hooks). Evaluate it \
                 with fake quantization (without --kernels)",
                if REPLAYABLE.len() > 1 { "s" } else { "" },
                REPLAYABLE.join(", "),
                model.name()
            )));
        }
        let blocks = Self::check_layout(model)?;
        let fp32 = Self::build(model, plan, true, blocks)?;
        fp32.check_replay()?;
        Self::build(model, plan, false, blocks)
    }

    fn build(model: &'m dyn QuantModel, plan: &[ResolvedLayer], fp32_only: bool, blocks: usize) -> Result<Self> {
        let mut layers = HashMap::new();
        for r in plan {
            layers.insert(r.layer.name.clone(), KernelLayer::new(model, r, fp32_only)?);
        }
        for l in model.layers() {
            if !layers.contains_key(&l.name) {
                return Err(Error::invalid("resolved config", &l.name, "the plan has no entry for this layer"));
            }
        }
        Ok(KernelModel { inner: model, layers, blocks, recorded: RefCell::new(None) })
    }

    /// The digits-resnet layout: `stem.conv`, blocks `layerI.0.{conv1, conv2[, downsample.0]}`
    /// for I = 1, 2, …, then `fc`, and nothing else. Returns the number of blocks.
    fn check_layout(model: &dyn QuantModel) -> Result<usize> {
        let names: Vec<&str> = model.layers().iter().map(|l| l.name.as_str()).collect();
        let mut expected = vec!["stem.conv".to_string()];
        let mut blocks = 0;
        while names.contains(&format!("layer{}.0.conv1", blocks + 1).as_str()) {
            blocks += 1;
            let p = format!("layer{blocks}.0");
            expected.push(format!("{p}.conv1"));
            expected.push(format!("{p}.conv2"));
            if names.contains(&format!("{p}.downsample.0").as_str()) {
                expected.push(format!("{p}.downsample.0"));
            }
        }
        expected.push("fc".into());
        if names != expected {
            return Err(Error::Model {
                model: model.name().to_string(),
                msg: format!("kernel evaluation expects the layers {expected:?} (the digits-resnet layout), found {names:?}"),
            });
        }
        Ok(blocks)
    }

    /// The replay with FP32 weights against the model's own forward pass on a fixed input.
    fn check_replay(&self) -> Result<()> {
        let mut shape = vec![4i64];
        shape.extend_from_slice(self.inner.input_shape());
        let numel: i64 = shape.iter().product();
        let x = (Tensor::f_arange(numel, (Kind::Float, Device::Cpu))?.f_mul_scalar(0.37)?.f_sin()?.f_abs()?.f_mul_scalar(16.0)?)
            .f_reshape(shape.as_slice())?;
        let want = tch::no_grad(|| self.inner.forward(&x))?;
        let got = tch::no_grad(|| self.forward(&x))?;
        let diff = (&got - &want).f_abs()?.f_max()?.f_double_value(&[])?;
        let scale = want.f_abs()?.f_max()?.f_double_value(&[])?.max(1e-30);
        if diff.is_nan() || diff > REPLAY_RTOL * scale {
            return Err(Error::Model {
                model: self.inner.name().to_string(),
                msg: format!(
                    "the kernel evaluator's replay of the forward pass disagrees with the model (max |Δlogit| {diff:.3e}, \
                     largest |logit| {scale:.3e}): the architecture changed; update src/eval/kernels.rs"
                ),
            });
        }
        Ok(())
    }

    /// How each layer runs, in the model's layer order.
    pub fn paths(&self) -> Vec<(String, LayerPath)> {
        self.inner.layers().iter().filter_map(|l| self.layers.get(&l.name).map(|k| (l.name.clone(), k.path))).collect()
    }

    /// Runs layer `name` on `x`; a convolution keeps "same" padding (k / 2) and gets the stride
    /// that maps `x`'s spatial size to the output size recorded in the layer table (MACs / weights).
    fn layer(&self, name: &str, x: &Tensor) -> Result<Tensor> {
        let l = self.layers.get(name).ok_or_else(|| Error::unknown_layer(name, self.layers.keys().map(String::as_str)))?;
        let geometry = (l.info.kind == LayerKind::Conv2d).then(|| {
            let out_area = (l.info.macs / l.info.params.max(1)).max(1);
            let in_area = x.size().iter().skip(2).product::<i64>();
            let stride = ((in_area as f64 / out_area as f64).sqrt().round() as i64).max(1);
            ConvGeometry { stride, padding: l.info.shape[2] / 2 }
        });
        l.forward(x, geometry)
    }
}

impl QuantModel for KernelModel<'_> {
    fn name(&self) -> &str {
        self.inner.name()
    }

    fn layers(&self) -> &[LayerInfo] {
        self.inner.layers()
    }

    fn input_shape(&self) -> &[i64] {
        self.inner.input_shape()
    }

    fn input_kind(&self) -> Kind {
        self.inner.input_kind()
    }

    fn num_classes(&self) -> i64 {
        self.inner.num_classes()
    }

    fn named_parameters(&self) -> Vec<(String, Tensor)> {
        self.inner.named_parameters()
    }

    /// The digits-resnet forward pass: stem → relu, per block relu(conv2(relu(conv1(h))) +
    /// shortcut(h)), mean over the spatial dimensions, fc.
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let mut h = self.layer("stem.conv", x)?.f_relu()?;
        for i in 1..=self.blocks {
            let p = format!("layer{i}.0");
            let y = self.layer(&format!("{p}.conv1"), &h)?.f_relu()?;
            let y = self.layer(&format!("{p}.conv2"), &y)?;
            let down = format!("{p}.downsample.0");
            let shortcut = if self.layers.contains_key(&down) { self.layer(&down, &h)? } else { h.shallow_clone() };
            h = y.f_add(&shortcut)?.f_relu()?;
        }
        let pooled = h.f_mean_dim([2i64, 3].as_slice(), false, Kind::Float)?;
        let out = self.layer("fc", &pooled)?;
        if let Some(v) = self.recorded.borrow_mut().as_mut() {
            v.push(out.shallow_clone());
        }
        Ok(out)
    }
}

/// One layer of a [`KernelEval`].
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct KernelLayerReport {
    /// Layer name.
    pub layer: String,
    /// The weight spec's label (`int4`, `int4/group:32`, …).
    pub weight: String,
    /// How the layer ran.
    pub path: LayerPath,
}

/// A config evaluated through the kernels, with its agreement with fake quantization.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct KernelEval {
    /// Accuracy, loss, KL and agreement vs FP32 of the model run through the kernels.
    pub report: Metrics,
    /// How each layer ran.
    pub layers: Vec<KernelLayerReport>,
    /// Largest |logit(kernels) − logit(fake quantization)| over the data.
    pub max_abs_diff_vs_fake: f64,
    /// Largest |logit| of the fake-quantized model (the scale of the difference).
    pub max_abs_logit: f64,
    /// Fraction of samples whose top-1 class is the same through the kernels and with fake
    /// quantization.
    pub agreement_vs_fake: f64,
}

/// libtorch's intra-op threads set to one while alive, then put back.
///
/// libtorch's OpenMP workers spin for a while after each parallel region, and the kernels'
/// rayon workers spin too: alternating the two on a small machine (a kernel GEMM, then libtorch's
/// im2col, relu and add) made an evaluation of the digits test split take 30 s instead of 4 s on
/// two cores. The libtorch ops around the kernels are light, so they run on one thread. The
/// setting is process-wide: other threads' libtorch ops are slower meanwhile, not wrong.
struct OneTorchThread(i32);

impl OneTorchThread {
    fn new() -> Self {
        let n = tch::get_num_threads();
        tch::set_num_threads(1);
        OneTorchThread(n)
    }
}

impl Drop for OneTorchThread {
    fn drop(&mut self) {
        tch::set_num_threads(self.0);
    }
}

/// Logits of `model` under `config` with fake quantization ([`crate::model::apply`]), and through
/// the kernels ([`KernelModel`]), over `data`.
pub fn logits_fake_and_kernels(model: &dyn QuantModel, data: &Dataset, config: &QuantConfig) -> Result<(Tensor, Tensor)> {
    let plan = config.resolve(model)?;
    let km = KernelModel::new(model, &plan)?;
    let kernels = {
        let _threads = OneTorchThread::new();
        logits(&km, data)?
    };
    let applied = crate::model::apply(model, &plan)?;
    let fake = logits(model, data);
    applied.restore();
    Ok((fake?, kernels))
}

/// Evaluates `config` on `model` through the kernels: the metrics of [`evaluate`] against
/// `reference`, the model size, how each layer ran, and the difference to fake quantization.
pub fn evaluate_config_kernels(
    model: &dyn QuantModel,
    data: &Dataset,
    reference: &Reference,
    config: &QuantConfig,
) -> Result<(KernelEval, SizeReport)> {
    let plan = config.resolve(model)?;
    let size = model_size(model, &plan);
    let km = KernelModel::new(model, &plan)?;
    // One pass through the kernels: the metrics, and the logits recorded on the way.
    *km.recorded.borrow_mut() = Some(Vec::new());
    let report = {
        let _threads = OneTorchThread::new();
        evaluate(&km, data, reference)?
    };
    let outputs = km.recorded.borrow_mut().take().unwrap_or_default();
    let kernels = Tensor::f_cat(&outputs, 0)?;
    if kernels.size().first() != Some(&report.samples) {
        return Err(Error::Model {
            model: model.name().to_string(),
            msg: format!("kernel evaluation recorded {:?} logits for {} samples", kernels.size(), report.samples),
        });
    }
    let applied = crate::model::apply(model, &plan)?;
    let fake = logits(model, data);
    applied.restore();
    let fake = fake?;
    let diff = (&kernels - &fake).f_abs()?.f_max()?.f_double_value(&[])?;
    let max_abs_logit = fake.f_abs()?.f_max()?.f_double_value(&[])?;
    let agreement_vs_fake = kernels
        .f_argmax(-1, false)?
        .f_eq_tensor(&fake.f_argmax(-1, false)?)?
        .f_to_kind(Kind::Double)?
        .f_mean(Kind::Double)?
        .f_double_value(&[])?;
    let layers = plan
        .iter()
        .map(|r| KernelLayerReport {
            layer: r.layer.name.clone(),
            weight: r.weight.label(),
            path: km.layers.get(&r.layer.name).map(|l| l.path).unwrap_or(LayerPath::Fp32),
        })
        .collect();
    Ok((KernelEval { report, layers, max_abs_diff_vs_fake: diff, max_abs_logit, agreement_vs_fake }, size))
}
