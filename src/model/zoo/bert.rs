//! A BERT encoder in tch `nn`, loaded from a Hugging Face checkpoint (`config.json` +
//! `model.safetensors`) by the checkpoint's own parameter names.
//!
//! The computation is Hugging Face's `BertModel` in evaluation mode (no dropout) with absolute
//! position embeddings and token type 0 everywhere: embeddings (word + position + token type) →
//! LayerNorm → N × [self-attention (query, key, value, softmax(q kᵀ/√d + mask) v) → dense →
//! LayerNorm(· + input) → intermediate dense → GELU (erf) → output dense → LayerNorm(· + ·)].
//! The pooler is not part of it (sentence-transformers does not use it); its weights are ignored.
//!
//! Every size comes from `config.json`; a value this encoder does not implement (another
//! activation, relative positions, a decoder) is an error naming the field. Token ids come in as
//! int64 `[N, L]` padded with the tokenizer's pad id, and the attention mask is derived from
//! them (`id != pad_token_id`). Trailing columns that are padding in every row of a batch are cut
//! before the first layer: the outputs of real tokens do not depend on them, and a batch of short
//! sentences then costs what its longest sentence costs, not what `L` would.
//!
//! Attention is written out (matmul, softmax, matmul) rather than through a fused
//! scaled-dot-product kernel, so that it is twice differentiable on every device: the curvature
//! products differentiate the backward pass.

use crate::error::{Error, Result};
use crate::model::{LayerInfo, LayerKind};
use serde_json::Value;
use std::collections::HashMap;
use std::path::Path;
use tch::nn::{self, Module};
use tch::{Kind, Tensor};

/// The fields of a Hugging Face BERT `config.json` this encoder reads.
#[derive(Debug, Clone, PartialEq)]
pub struct BertConfig {
    /// Vocabulary size (rows of the word embedding).
    pub vocab_size: i64,
    /// Width of every hidden state.
    pub hidden_size: i64,
    /// Number of encoder layers.
    pub num_hidden_layers: i64,
    /// Attention heads per layer (`hidden_size` must be a multiple).
    pub num_attention_heads: i64,
    /// Width of the feed-forward layer.
    pub intermediate_size: i64,
    /// Rows of the position embedding: the longest sequence the model takes.
    pub max_position_embeddings: i64,
    /// Rows of the token-type embedding.
    pub type_vocab_size: i64,
    /// Epsilon of every LayerNorm.
    pub layer_norm_eps: f64,
    /// Id of the padding token (attention mask: `id != pad_token_id`).
    pub pad_token_id: i64,
}

impl BertConfig {
    /// Reads and checks `config.json`.
    pub fn load(path: &Path) -> Result<BertConfig> {
        let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
        let v: Value = serde_json::from_str(&text).map_err(|e| Error::parse(path, format!("not JSON: {e}")))?;
        BertConfig::from_json(&v, path)
    }

    /// Checks a parsed `config.json` (`path` names it in errors).
    pub fn from_json(v: &Value, path: &Path) -> Result<BertConfig> {
        let bad = |field: &str, msg: String| Error::parse(path, format!("field `{field}`: {msg}"));
        let int = |field: &str| -> Result<i64> {
            match v.get(field) {
                None => Err(bad(field, "missing (a positive integer)".into())),
                Some(x) => x.as_i64().filter(|&n| n > 0).ok_or_else(|| bad(field, format!("{x} is not a positive integer"))),
            }
        };
        // Values with a default in Hugging Face's BertConfig may be absent; present, they must be
        // the one this encoder implements.
        let must_be = |field: &str, allowed: &[&str], default: &str| -> Result<()> {
            let got = match v.get(field) {
                None | Some(Value::Null) => default.to_string(),
                Some(Value::String(s)) => s.clone(),
                Some(x) => x.to_string(),
            };
            if allowed.contains(&got.as_str()) {
                Ok(())
            } else {
                Err(bad(field, format!("{got:?} is not supported; mixq's BERT encoder implements {}", allowed.join(", "))))
            }
        };
        must_be("model_type", &["bert"], "bert")?;
        must_be("hidden_act", &["gelu"], "gelu")?;
        must_be("position_embedding_type", &["absolute"], "absolute")?;
        for flag in ["is_decoder", "add_cross_attention"] {
            if v.get(flag).and_then(Value::as_bool).unwrap_or(false) {
                return Err(bad(flag, "true is not supported; mixq's BERT encoder is an encoder without cross-attention".into()));
            }
        }
        let c = BertConfig {
            vocab_size: int("vocab_size")?,
            hidden_size: int("hidden_size")?,
            num_hidden_layers: int("num_hidden_layers")?,
            num_attention_heads: int("num_attention_heads")?,
            intermediate_size: int("intermediate_size")?,
            max_position_embeddings: int("max_position_embeddings")?,
            type_vocab_size: int("type_vocab_size")?,
            layer_norm_eps: match v.get("layer_norm_eps") {
                None => 1e-12,
                Some(x) => x.as_f64().filter(|e| *e > 0.0).ok_or_else(|| bad("layer_norm_eps", format!("{x} is not a positive number")))?,
            },
            pad_token_id: match v.get("pad_token_id") {
                None => 0,
                Some(x) => x.as_i64().filter(|&p| p >= 0).ok_or_else(|| bad("pad_token_id", format!("{x} is not a token id")))?,
            },
        };
        if c.hidden_size % c.num_attention_heads != 0 {
            return Err(bad("num_attention_heads", format!("{} does not divide hidden_size {}", c.num_attention_heads, c.hidden_size)));
        }
        if c.pad_token_id >= c.vocab_size {
            return Err(bad("pad_token_id", format!("{} is outside the vocabulary (vocab_size {})", c.pad_token_id, c.vocab_size)));
        }
        Ok(c)
    }
}

/// One encoder layer's modules.
#[derive(Debug)]
struct BertLayer {
    /// `encoder.layer.{i}`.
    prefix: String,
    query: nn::Linear,
    key: nn::Linear,
    value: nn::Linear,
    attn_out: nn::Linear,
    attn_ln: nn::LayerNorm,
    intermediate: nn::Linear,
    output: nn::Linear,
    out_ln: nn::LayerNorm,
}

/// The Linear sub-modules of an encoder layer, in forward order, with their names under
/// `encoder.layer.{i}`.
const LINEAR_NAMES: [&str; 6] =
    ["attention.self.query", "attention.self.key", "attention.self.value", "attention.output.dense", "intermediate.dense", "output.dense"];

/// A BERT encoder whose parameters live in a [`nn::VarStore`] under the checkpoint's names.
#[derive(Debug)]
pub struct Bert {
    /// The configuration it was built from.
    pub config: BertConfig,
    word: nn::Embedding,
    position: nn::Embedding,
    token_type: nn::Embedding,
    emb_ln: nn::LayerNorm,
    layers: Vec<BertLayer>,
}

/// A dotted path `a.b.c` under `root`.
fn sub<'a>(root: &nn::Path<'a>, dotted: &str) -> nn::Path<'a> {
    dotted.split('.').fold(root.clone(), |p, s| p / s)
}

impl Bert {
    /// The architecture of `config` in `vs` (parameters initialised by tch; load real ones
    /// with [`load_safetensors`]).
    pub fn new(vs: &nn::VarStore, config: &BertConfig) -> Bert {
        let root = vs.root();
        let c = config;
        let ln = |p: nn::Path| nn::layer_norm(p, vec![c.hidden_size], nn::LayerNormConfig { eps: c.layer_norm_eps, ..Default::default() });
        let lin = |p: nn::Path, i: i64, o: i64| nn::linear(p, i, o, Default::default());
        let emb = |p: nn::Path, n: i64| nn::embedding(p, n, c.hidden_size, Default::default());
        let e = sub(&root, "embeddings");
        let word = emb(&e / "word_embeddings", c.vocab_size);
        let position = emb(&e / "position_embeddings", c.max_position_embeddings);
        let token_type = emb(&e / "token_type_embeddings", c.type_vocab_size);
        let emb_ln = ln(&e / "LayerNorm");
        let (h, f) = (c.hidden_size, c.intermediate_size);
        let layers = (0..c.num_hidden_layers)
            .map(|i| {
                let prefix = format!("encoder.layer.{i}");
                let p = sub(&root, &prefix);
                BertLayer {
                    query: lin(sub(&p, LINEAR_NAMES[0]), h, h),
                    key: lin(sub(&p, LINEAR_NAMES[1]), h, h),
                    value: lin(sub(&p, LINEAR_NAMES[2]), h, h),
                    attn_out: lin(sub(&p, LINEAR_NAMES[3]), h, h),
                    attn_ln: ln(sub(&p, "attention.output.LayerNorm")),
                    intermediate: lin(sub(&p, LINEAR_NAMES[4]), h, f),
                    output: lin(sub(&p, LINEAR_NAMES[5]), f, h),
                    out_ln: ln(sub(&p, "output.LayerNorm")),
                    prefix,
                }
            })
            .collect();
        Bert { config: config.clone(), word, position, token_type, emb_ln, layers }
    }

    /// The encoder's Linear layers in forward order (6 per encoder layer), with their MACs for
    /// a sample of `seq_len` tokens (every token passes through every Linear).
    pub fn layer_infos(&self, seq_len: i64) -> Vec<LayerInfo> {
        let mut out = Vec::new();
        for l in &self.layers {
            let mods = [&l.query, &l.key, &l.value, &l.attn_out, &l.intermediate, &l.output];
            for (name, m) in LINEAR_NAMES.iter().zip(mods) {
                let shape = m.ws.size();
                let params: i64 = shape.iter().product();
                out.push(LayerInfo {
                    name: format!("{}.{name}", l.prefix),
                    kind: LayerKind::Linear,
                    shape,
                    params,
                    macs: params * seq_len,
                });
            }
        }
        out
    }

    /// Hidden states `[N, L', H]` and the attention mask `[N, L']` (1 for real tokens, float)
    /// of token ids `[N, L]`, where `L' ≤ L` drops trailing columns that are padding in every
    /// row. `hook(layer, input)` replaces the input of each Linear layer (in forward order).
    pub fn forward(&self, ids: &Tensor, hook: &dyn Fn(&str, &Tensor) -> Result<Tensor>) -> Result<(Tensor, Tensor)> {
        let c = &self.config;
        let size = ids.size();
        if size.len() != 2 || ids.kind() != Kind::Int64 {
            return Err(Error::Unsupported(format!("BERT takes int64 token ids [N, L]; got {:?} of shape {size:?}", ids.kind())));
        }
        let (n, l_in) = (size[0], size[1]);
        if l_in > c.max_position_embeddings {
            return Err(Error::Unsupported(format!(
                "sequences of {l_in} tokens are longer than the model's max_position_embeddings {}",
                c.max_position_embeddings
            )));
        }
        if l_in == 0 {
            return Err(Error::Unsupported("BERT takes sequences of at least one token; got L = 0".into()));
        }
        let real = ids.ne(c.pad_token_id);
        // Columns up to the last one holding a real token in any row (at least one column).
        let last = real.any_dim(0, false).to_kind(Kind::Int64) * Tensor::arange_start(1, l_in + 1, (Kind::Int64, ids.device()));
        let keep = i64::try_from(last.max())?.max(1);
        let ids = ids.narrow(1, 0, keep);
        let mask = real.narrow(1, 0, keep).to_kind(Kind::Float);
        let positions = Tensor::arange(keep, (Kind::Int64, ids.device())).unsqueeze(0);
        let types = Tensor::zeros([1, keep], (Kind::Int64, ids.device()));
        let emb = self.word.forward(&ids) + self.position.forward(&positions) + self.token_type.forward(&types);
        let mut h = self.emb_ln.forward(&emb);
        // Additive attention bias [N, 1, 1, L']: 0 for real tokens, the most negative float for
        // padding (as Hugging Face builds it).
        let bias: Tensor = (mask.ones_like() - &mask) * f64::from(f32::MIN);
        let bias = bias.view([n, 1, 1, keep]);
        let heads = c.num_attention_heads;
        let d = c.hidden_size / heads;
        let scale = 1.0 / (d as f64).sqrt();
        let lin = |m: &nn::Linear, name: &str, prefix: &str, x: &Tensor| -> Result<Tensor> {
            let x = hook(&format!("{prefix}.{name}"), x)?;
            Ok(m.forward(&x))
        };
        for layer in &self.layers {
            let p = layer.prefix.as_str();
            let split = |t: Tensor| t.view([n, keep, heads, d]).transpose(1, 2);
            let q = split(lin(&layer.query, LINEAR_NAMES[0], p, &h)?);
            let k = split(lin(&layer.key, LINEAR_NAMES[1], p, &h)?);
            let v = split(lin(&layer.value, LINEAR_NAMES[2], p, &h)?);
            let scores = q.matmul(&k.transpose(-1, -2)) * scale + &bias;
            let probs = scores.softmax(-1, Kind::Float);
            let ctx = probs.matmul(&v).transpose(1, 2).contiguous().view([n, keep, c.hidden_size]);
            let a = layer.attn_ln.forward(&(lin(&layer.attn_out, LINEAR_NAMES[3], p, &ctx)? + &h));
            let f = lin(&layer.intermediate, LINEAR_NAMES[4], p, &a)?.gelu("none");
            h = layer.out_ln.forward(&(lin(&layer.output, LINEAR_NAMES[5], p, &f)? + &a));
        }
        Ok((h, mask))
    }
}

/// Checkpoint tensors the encoder does not use, and may therefore be in the file: the pooler
/// (sentence-transformers pools the hidden states itself) and the `position_ids` buffer older
/// checkpoints carry.
fn unused_tensor(name: &str) -> bool {
    name.starts_with("pooler.") || name == "embeddings.position_ids"
}

/// Copies every variable of `vs` from the safetensors file at `path`, by name. A missing tensor,
/// a shape that differs from what `config.json` implies, a non-float dtype, or a tensor the
/// encoder has no place for (other than [`unused_tensor`]s) is an error naming the tensor.
pub fn load_safetensors(vs: &nn::VarStore, path: &Path) -> Result<()> {
    let file: HashMap<String, Tensor> =
        Tensor::read_safetensors(path).map_err(|e| Error::parse(path, format!("cannot read safetensors: {e}")))?.into_iter().collect();
    let vars = vs.variables();
    let mut names: Vec<&String> = vars.keys().collect();
    names.sort();
    tch::no_grad(|| -> Result<()> {
        for name in names {
            let var = &vars[name];
            let src = file.get(name).ok_or_else(|| {
                Error::parse(path, format!("no tensor `{name}` (the BERT encoder of config.json needs it, shape {:?})", var.size()))
            })?;
            if src.size() != var.size() {
                return Err(Error::parse(
                    path,
                    format!("tensor `{name}` has shape {:?}; config.json implies {:?}", src.size(), var.size()),
                ));
            }
            if !matches!(src.kind(), Kind::Float | Kind::Half | Kind::BFloat16 | Kind::Double) {
                return Err(Error::parse(path, format!("tensor `{name}` has dtype {:?}; weights must be floating point", src.kind())));
            }
            var.shallow_clone().f_copy_(&src.to_kind(Kind::Float))?;
        }
        Ok(())
    })?;
    let mut extra: Vec<&String> = file.keys().filter(|k| !vars.contains_key(*k) && !unused_tensor(k)).collect();
    if !extra.is_empty() {
        extra.sort();
        let shown: Vec<String> = extra.iter().take(5).map(|k| format!("`{k}`")).collect();
        return Err(Error::parse(
            path,
            format!(
                "{} tensor(s) the BERT encoder of config.json has no place for: {}{} (a checkpoint of another architecture, or config.json does not match it)",
                extra.len(),
                shown.join(", "),
                if extra.len() > 5 { ", …" } else { "" }
            ),
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn tiny() -> Value {
        json!({"model_type": "bert", "vocab_size": 50, "hidden_size": 8, "num_hidden_layers": 2, "num_attention_heads": 2,
               "intermediate_size": 16, "max_position_embeddings": 12, "type_vocab_size": 2, "layer_norm_eps": 1e-12,
               "pad_token_id": 0, "hidden_act": "gelu"})
    }

    #[test]
    fn config_errors_name_the_field() {
        let p = Path::new("config.json");
        assert!(BertConfig::from_json(&tiny(), p).is_ok());
        for (field, value, expect) in [
            ("hidden_act", json!("relu"), "`hidden_act`"),
            ("position_embedding_type", json!("relative_key"), "`position_embedding_type`"),
            ("num_attention_heads", json!(3), "does not divide"),
            ("hidden_size", json!(-8), "`hidden_size`"),
            ("is_decoder", json!(true), "`is_decoder`"),
            ("model_type", json!("gpt2"), "`model_type`"),
        ] {
            let mut v = tiny();
            v[field] = value;
            let e = BertConfig::from_json(&v, p).unwrap_err().to_string();
            assert!(e.contains(expect) && e.contains("config.json"), "{field}: {e}");
        }
        let mut v = tiny();
        v.as_object_mut().unwrap().remove("vocab_size");
        assert!(BertConfig::from_json(&v, p).unwrap_err().to_string().contains("`vocab_size`: missing"));
    }

    #[test]
    fn padding_does_not_change_real_tokens() {
        let c = BertConfig::from_json(&tiny(), Path::new("c")).unwrap();
        let vs = nn::VarStore::new(tch::Device::Cpu);
        let bert = Bert::new(&vs, &c);
        assert_eq!(bert.layer_infos(12).len(), 12);
        assert_eq!(bert.layer_infos(12)[4].shape, [16, 8]);
        let id = |h: &str, x: &Tensor| -> Result<Tensor> {
            let _ = h;
            Ok(x.shallow_clone())
        };
        let short = Tensor::from_slice(&[3i64, 7, 9, 4]).view([1, 4]);
        let padded = Tensor::from_slice(&[3i64, 7, 9, 4, 0, 0, 0, 0, 5, 6, 0, 0, 0, 0, 0, 0]).view([2, 8]);
        let (a, _) = tch::no_grad(|| bert.forward(&short, &id)).unwrap();
        let (b, mask) = tch::no_grad(|| bert.forward(&padded, &id)).unwrap();
        assert_eq!(b.size(), [2, 4, 8], "trailing all-padding columns are cut");
        assert_eq!(Vec::<f32>::try_from(mask.get(1)).unwrap(), [1.0, 1.0, 0.0, 0.0]);
        let diff = f64::try_from((a.get(0) - b.get(0)).abs().max()).unwrap();
        assert!(diff < 1e-5, "row 0 changed by padding another row: {diff:e}");
    }
}
