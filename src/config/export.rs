//! Exporters: a resolved [`QuantConfig`] in the files that deployment tools read.
//!
//! A config names layers by their PyTorch FQN and formats by mixq's own names; llama.cpp and the
//! Hugging Face libraries name both differently and cannot express every mixq format. Each exporter
//! therefore works from the config and the model's layer list alone (no weights are needed, so a
//! layer list as the `layers` command prints it is enough), maps every layer to the nearest thing
//! the target can store, and says per layer where that is an approximation ([`Export::notes`]).
//! A layer the target cannot name or express at all is an error that names it, unless
//! [`ExportOptions::skip_unmappable`] asks to leave it to the target's default with a note.
//!
//! - [`ExportTarget::LlamaCpp`]: a tensor-type file for `llama-quantize --tensor-type-file`, with
//!   GGUF tensor names (`blk.3.attn_q.weight`) and ggml type names (`q4_K`), plus the command line.
//!   Checked against llama.cpp's source (ggml-org/llama.cpp, `tools/quantize/quantize.cpp` at
//!   commit 03161a4eb9a2ec66ef97789f347c5a28279f06ea, `src/llama-quant.cpp` at commit
//!   007dbbf3fd17eefe9b47fee45f48f7ba5e62b714): the file is read token by token (`file >> arg`, so
//!   any whitespace separates entries and there is no comment syntax), each token is
//!   `pattern=type` split at the first `=`, the pattern is lower-cased and used as a `std::regex`
//!   with `regex_search` (unanchored), and the first matching pattern wins. Unanchored,
//!   `output.weight` would also match `blk.0.attn_output.weight`, so every pattern here is the
//!   exact name, anchored and escaped (`^blk\.0\.attn_output\.weight$`). Overrides apply only when
//!   the base type on the command line is a quantized type, and a type whose block does not divide
//!   a tensor's row length falls back (q4_K → q5_0, …, or stops for q8_0): the exporter writes that
//!   fallback itself, so the file says what llama.cpp will store.
//! - [`ExportTarget::Hf`]: a compressed-tensors `quantization_config` (`config_groups` of
//!   `targets` + `weights`/`input_activations` QuantizationArgs, and `ignore`), the declarative
//!   per-module format that llm-compressor writes and vLLM and transformers read, checked against
//!   vllm-project/compressed-tensors `src/compressed_tensors/quantization/quant_args.py`,
//!   `quant_scheme.py`, `quant_config.py` and `lifecycle/apply.py` at commit
//!   ac8e2ba82f4e0d5eaa40069f8fc642738f124cd4. Its scheme fields forbid unknown keys, so only the
//!   fields that version defines are written (`scale_dtype` needs compressed-tensors 0.13 or newer).
//! - [`ExportTarget::Json`]: mixq's own resolved per-layer view (`mixq.resolved-config`).

use crate::config::QuantConfig;
use crate::error::{Error, Result};
use crate::model::ResolvedLayer;
use crate::model::{LayerInfo, LayerKind};
use crate::quant::{out_inner, Clipping, Format, Granularity, QuantSpec, ScaleType};
use serde::ser::SerializeMap;
use serde::{Deserialize, Serialize, Serializer};
use std::collections::BTreeMap;
use std::fmt;
use std::path::Path;
use std::str::FromStr;

/// The `"format"` of the resolved per-layer view ([`ExportTarget::Json`]).
pub const RESOLVED_FORMAT: &str = "mixq.resolved-config";
/// The version of the resolved per-layer view.
pub const RESOLVED_VERSION: u64 = 1;
/// The `"format"` of the Hugging Face export, which wraps a compressed-tensors config.
pub const HF_FORMAT: &str = "mixq.hf-quantization-config";
/// The version of the Hugging Face export.
pub const HF_VERSION: u64 = 1;

/// Where an export goes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ExportTarget {
    /// A `--tensor-type-file` for llama.cpp's `llama-quantize` (GGUF tensor names, ggml types).
    LlamaCpp,
    /// A compressed-tensors `quantization_config` (Hugging Face transformers, llm-compressor, vLLM).
    Hf,
    /// mixq's own resolved per-layer view.
    Json,
}

impl fmt::Display for ExportTarget {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            ExportTarget::LlamaCpp => "llama-cpp",
            ExportTarget::Hf => "hf",
            ExportTarget::Json => "json",
        })
    }
}

impl FromStr for ExportTarget {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        Ok(match s.trim().to_ascii_lowercase().as_str() {
            "llama-cpp" | "llama.cpp" | "llamacpp" | "gguf" => ExportTarget::LlamaCpp,
            "hf" | "compressed-tensors" => ExportTarget::Hf,
            "json" => ExportTarget::Json,
            _ => return Err(Error::invalid("export target", s, "valid targets: llama-cpp, hf, json")),
        })
    }
}

/// How an export treats what its target cannot hold.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct ExportOptions {
    /// Leave layers the target cannot name or express out of the export, with a note, instead of
    /// failing (llama.cpp then gives them its base type; compressed-tensors leaves them unquantized).
    pub skip_unmappable: bool,
}

/// One exported file and what a person deploying it should know.
#[derive(Debug, Clone, PartialEq)]
pub struct Export {
    /// The target it was made for.
    pub target: ExportTarget,
    /// The file's content.
    pub text: String,
    /// One line per layer whose mapping is approximate, falls back, or was skipped, plus a few
    /// lines about the export as a whole.
    pub notes: Vec<String>,
    /// llama.cpp only: the base type for `llama-quantize` (an ftype name such as `Q4_K_S`).
    pub base_type: Option<String>,
}

impl Export {
    /// Writes the file atomically (temp file + rename).
    pub fn save(&self, path: &Path) -> Result<()> {
        crate::util::write_atomic(path, self.text.as_bytes())
    }

    /// The command that consumes the file written at `path` (llama.cpp only).
    pub fn command(&self, path: &Path) -> Option<String> {
        let base = self.base_type.as_deref()?;
        Some(format!(
            "llama-quantize --pure --tensor-type-file {} model-f32.gguf model-mixq.gguf {base}",
            shell_quote(&path.display().to_string())
        ))
    }
}

fn shell_quote(s: &str) -> String {
    if !s.is_empty() && s.chars().all(|c| c.is_ascii_alphanumeric() || "/._-+=:,@".contains(c)) {
        s.to_string()
    } else {
        format!("'{}'", s.replace('\'', r"'\''"))
    }
}

/// A model's layer list as the `layers` command prints it with `--json`:
/// `{"model": "...", "layers": [{"name", "kind", "shape", "params", "macs"}, ...]}`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LayerList {
    /// The model's name.
    pub model: String,
    /// Its quantizable layers, in forward order.
    pub layers: Vec<LayerInfo>,
}

impl LayerList {
    /// Parses a layer list; `origin` names the file in errors.
    pub fn from_json(text: &str, origin: &Path) -> Result<Self> {
        let list: LayerList = serde_json::from_str(text).map_err(|e| {
            Error::parse(
                origin,
                format!("not a layer list ({e}); expected {{\"model\": NAME, \"layers\": [{{\"name\", \"kind\", \"shape\", \"params\", \"macs\"}}, ...]}}, as the layers command prints it in JSON"),
            )
        })?;
        if list.layers.is_empty() {
            return Err(Error::parse(origin, "the layer list has no layers"));
        }
        let mut seen = std::collections::HashSet::new();
        for l in &list.layers {
            if !seen.insert(l.name.as_str()) {
                return Err(Error::parse(origin, format!("layer `{}` is listed twice", l.name)));
            }
        }
        Ok(list)
    }

    /// Reads a layer list file.
    pub fn load(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
        Self::from_json(&text, path)
    }
}

/// Resolves `config` against `layers` (of the model `model`) and writes it for `target`.
pub fn export(config: &QuantConfig, layers: &[LayerInfo], model: &str, target: ExportTarget, opts: ExportOptions) -> Result<Export> {
    let resolved = config.resolve_layers(layers, model)?;
    match target {
        ExportTarget::LlamaCpp => llama_cpp(&resolved, opts),
        ExportTarget::Hf => hf(&resolved, opts),
        ExportTarget::Json => Ok(Export { target, text: resolved_json(config, &resolved, model), notes: Vec::new(), base_type: None }),
    }
}

// ---------------------------------------------------------------------------------------------
// llama.cpp
// ---------------------------------------------------------------------------------------------

/// The ggml tensor types the llama.cpp exporter writes. [`GgmlType::name`] is ggml's `type_name`,
/// which `llama-quantize` matches case-insensitively.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum GgmlType {
    /// 2-bit k-quant.
    Q2K,
    /// 3-bit k-quant.
    Q3K,
    /// 4-bit k-quant.
    Q4K,
    /// 5-bit k-quant.
    Q5K,
    /// 6-bit k-quant.
    Q6K,
    /// 4-bit, FP16 scale per 32 (llama.cpp's fallback for q2_K/q3_K).
    Q4_0,
    /// 5-bit, FP16 scale per 32 (llama.cpp's fallback for q4_K).
    Q5_0,
    /// 5-bit, FP16 scale and min per 32 (llama.cpp's fallback for q5_K).
    Q5_1,
    /// 8-bit, FP16 scale per 32.
    Q8_0,
    /// OCP MX FP4: E2M1 elements, E8M0 scale per 32.
    Mxfp4,
    /// IEEE half.
    F16,
    /// bfloat16.
    Bf16,
    /// IEEE single.
    F32,
}

impl GgmlType {
    /// ggml's name of the type (`q4_K`, `q8_0`, `f16`, …).
    pub fn name(self) -> &'static str {
        match self {
            GgmlType::Q2K => "q2_K",
            GgmlType::Q3K => "q3_K",
            GgmlType::Q4K => "q4_K",
            GgmlType::Q5K => "q5_K",
            GgmlType::Q6K => "q6_K",
            GgmlType::Q4_0 => "q4_0",
            GgmlType::Q5_0 => "q5_0",
            GgmlType::Q5_1 => "q5_1",
            GgmlType::Q8_0 => "q8_0",
            GgmlType::Mxfp4 => "mxfp4",
            GgmlType::F16 => "f16",
            GgmlType::Bf16 => "bf16",
            GgmlType::F32 => "f32",
        }
    }

    /// Elements per block: a tensor's row length must be a multiple of it.
    pub fn block_size(self) -> i64 {
        match self {
            GgmlType::Q2K | GgmlType::Q3K | GgmlType::Q4K | GgmlType::Q5K | GgmlType::Q6K => 256,
            GgmlType::Q4_0 | GgmlType::Q5_0 | GgmlType::Q5_1 | GgmlType::Q8_0 | GgmlType::Mxfp4 => 32,
            GgmlType::F16 | GgmlType::Bf16 | GgmlType::F32 => 1,
        }
    }

    /// Storage bits per weight (block bytes × 8 / block size).
    pub fn bits_per_weight(self) -> f64 {
        match self {
            GgmlType::Q2K => 2.625,
            GgmlType::Q3K => 3.4375,
            GgmlType::Q4K | GgmlType::Q4_0 => 4.5,
            GgmlType::Q5K | GgmlType::Q5_0 => 5.5,
            GgmlType::Q6K => 6.5625,
            GgmlType::Q5_1 => 6.0,
            GgmlType::Q8_0 => 8.5,
            GgmlType::Mxfp4 => 4.25,
            GgmlType::F16 | GgmlType::Bf16 => 16.0,
            GgmlType::F32 => 32.0,
        }
    }

    /// What the type stores, for the notes.
    fn describe(self) -> &'static str {
        match self {
            GgmlType::Q2K => "2-bit with a 4-bit scale and min per 16 weights in 256-weight super-blocks",
            GgmlType::Q3K => "3-bit symmetric with a 6-bit scale per 16 weights in 256-weight super-blocks",
            GgmlType::Q4K => "4-bit with a 6-bit scale and min per 32 weights in 256-weight super-blocks",
            GgmlType::Q5K => "5-bit with a 6-bit scale and min per 32 weights in 256-weight super-blocks",
            GgmlType::Q6K => "6-bit symmetric with an 8-bit scale per 16 weights in 256-weight super-blocks",
            GgmlType::Q4_0 => "4-bit with an FP16 scale per 32 weights",
            GgmlType::Q5_0 => "5-bit with an FP16 scale per 32 weights",
            GgmlType::Q5_1 => "5-bit with an FP16 scale and min per 32 weights",
            GgmlType::Q8_0 => "8-bit symmetric with an FP16 scale per 32 weights",
            GgmlType::Mxfp4 => "FP4 E2M1 with a power-of-two (E8M0) scale per 32 weights",
            GgmlType::F16 => "IEEE half",
            GgmlType::Bf16 => "bfloat16",
            GgmlType::F32 => "FP32",
        }
    }

    /// llama.cpp's own fallback when the row length is not a multiple of the block
    /// (`tensor_type_fallback` in `src/llama-quant.cpp`); `None` where it defines none.
    fn llama_cpp_fallback(self) -> Option<GgmlType> {
        match self {
            GgmlType::Q2K | GgmlType::Q3K => Some(GgmlType::Q4_0),
            GgmlType::Q4K => Some(GgmlType::Q5_0),
            GgmlType::Q5K => Some(GgmlType::Q5_1),
            GgmlType::Q6K => Some(GgmlType::Q8_0),
            _ => None,
        }
    }

    /// The `llama-quantize` file type whose default tensor type is this one and that adds no
    /// imatrix requirement (`Q2_K`, not `Q2_K_S`); `None` for types that are no good base.
    fn ftype(self) -> Option<&'static str> {
        Some(match self {
            GgmlType::Q2K => "Q2_K",
            GgmlType::Q3K => "Q3_K_S",
            GgmlType::Q4K => "Q4_K_S",
            GgmlType::Q5K => "Q5_K_S",
            GgmlType::Q6K => "Q6_K",
            GgmlType::Q4_0 => "Q4_0",
            GgmlType::Q5_0 => "Q5_0",
            GgmlType::Q5_1 => "Q5_1",
            GgmlType::Q8_0 => "Q8_0",
            GgmlType::Mxfp4 | GgmlType::F16 | GgmlType::Bf16 | GgmlType::F32 => return None,
        })
    }
}

impl fmt::Display for GgmlType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// The nearest ggml type for a weight spec, and `None` when it stores the same thing (same element
/// grid, block and scale type) or `Some(why not)`. llama.cpp re-quantizes the original weights
/// with its own scale search either way; "the same" means the same number format.
pub fn ggml_type_for(spec: &QuantSpec) -> (GgmlType, Option<String>) {
    let t = match spec.format {
        Format::Fp32 => return (GgmlType::F32, None),
        Format::Fp16 => return (GgmlType::F16, None),
        Format::Bf16 => return (GgmlType::Bf16, None),
        Format::Int { bits: 2, .. } => GgmlType::Q2K,
        Format::Int { bits: 3, .. } => GgmlType::Q3K,
        Format::Int { bits: 4, .. } => GgmlType::Q4K,
        Format::Int { bits: 5, .. } => GgmlType::Q5K,
        Format::Int { bits: 6, .. } => GgmlType::Q6K,
        Format::Int { .. } | Format::Fp8E4M3 | Format::Fp8E5M2 => GgmlType::Q8_0,
        Format::Fp4E2M1 => GgmlType::Mxfp4,
    };
    let same = match (spec.format, t) {
        (Format::Int { bits: 8, signed: true }, GgmlType::Q8_0) => {
            spec.granularity == Granularity::PerGroup(32) && spec.scale == ScaleType::F16 && spec.clipping == Clipping::MinMax
        }
        (Format::Fp4E2M1, GgmlType::Mxfp4) => {
            spec.granularity == Granularity::PerGroup(32) && spec.scale == ScaleType::E8M0 && spec.clipping == Clipping::MinMax
        }
        _ => false,
    };
    if same {
        return (t, None);
    }
    let mut why = format!("{t} is {}", t.describe());
    match spec.format {
        Format::Fp8E4M3 | Format::Fp8E5M2 => why.push_str("; ggml has no FP8 weight type"),
        Format::Int { bits: 7, .. } => why.push_str("; ggml has no 7-bit type, this one has more bits"),
        _ => {}
    }
    (t, Some(why))
}

/// The GGUF tensor name llama.cpp's converter gives a Hugging Face Llama module
/// (`model.layers.3.self_attn.q_proj` → `blk.3.attn_q.weight`), or `None` for other names.
/// From gguf-py's `tensor_mapping.py` and `constants.py` (the `llama-hf` entries).
pub fn gguf_tensor_name(fqn: &str) -> Option<String> {
    match fqn {
        "model.embed_tokens" => return Some("token_embd.weight".into()),
        "lm_head" => return Some("output.weight".into()),
        _ => {}
    }
    let rest = fqn.strip_prefix("model.layers.")?;
    let (block, module) = rest.split_once('.')?;
    if block.is_empty() || !block.bytes().all(|b| b.is_ascii_digit()) || (block.len() > 1 && block.starts_with('0')) {
        return None;
    }
    let gguf = match module {
        "self_attn.q_proj" => "attn_q",
        "self_attn.k_proj" => "attn_k",
        "self_attn.v_proj" => "attn_v",
        "self_attn.o_proj" => "attn_output",
        "mlp.gate_proj" => "ffn_gate",
        "mlp.up_proj" => "ffn_up",
        "mlp.down_proj" => "ffn_down",
        _ => return None,
    };
    Some(format!("blk.{block}.{gguf}.weight"))
}

const LLAMA_NAMES: &str = "model.embed_tokens, lm_head, model.layers.N.self_attn.{q,k,v,o}_proj, model.layers.N.mlp.{gate,up,down}_proj";

/// The anchored, escaped regex that matches exactly one tensor name in llama.cpp's
/// (unanchored, `std::regex_search`) tensor-type matching.
fn exact_pattern(name: &str) -> String {
    format!("^{}$", regex::escape(name))
}

fn llama_cpp(resolved: &[ResolvedLayer], opts: ExportOptions) -> Result<Export> {
    let mut notes = Vec::new();
    let mut lines = Vec::new();
    let mut params_by_type: BTreeMap<GgmlType, i64> = BTreeMap::new();
    let (mut mixq_bits, mut ggml_bits, mut params, mut approximate) = (0.0f64, 0.0f64, 0i64, 0usize);
    for r in resolved {
        let name = &r.layer.name;
        let Some(tensor) = gguf_tensor_name(name) else {
            let msg = format!(
                "layer `{name}` has no GGUF tensor name: the llama.cpp export maps Hugging Face Llama module names ({LLAMA_NAMES})"
            );
            if opts.skip_unmappable {
                notes.push(format!("{name}: skipped (not a Llama module name); llama-quantize gives it the base type"));
                continue;
            }
            return Err(Error::Unsupported(msg));
        };
        let (wanted, why) = ggml_type_for(&r.weight);
        let (_, row) = out_inner(&r.layer.shape);
        let t = if row % wanted.block_size() == 0 {
            if let Some(why) = why {
                approximate += 1;
                notes.push(format!("{name} -> {tensor}: {} -> {wanted}, an approximation: {why}", r.weight));
            }
            wanted
        } else {
            // What llama-quantize would store instead; where it defines no fallback it stops, so
            // the file asks for f16 (which fits any row length) itself.
            let (t, how) = match wanted.llama_cpp_fallback().filter(|f| row % f.block_size() == 0) {
                Some(f) => (f, format!("llama-quantize's own fallback for {wanted}")),
                None => (GgmlType::F16, format!("llama-quantize has no fallback for {wanted} and would stop")),
            };
            approximate += 1;
            notes.push(format!(
                "{name} -> {tensor}: {} -> {t}, an approximation: row length {row} is not a multiple of {wanted}'s block of {} ({how}); {t} is {}",
                r.weight,
                wanted.block_size(),
                t.describe()
            ));
            t
        };
        if let Some(act) = r.activation {
            notes.push(format!(
                "{name}: activation format {act} not exported; llama.cpp chooses the activation type of each matrix product itself"
            ));
        }
        lines.push(format!("{}={}", exact_pattern(&tensor), t.name()));
        *params_by_type.entry(t).or_default() += r.layer.params;
        mixq_bits += r.weight.storage_bits(&r.layer.shape) as f64;
        ggml_bits += t.bits_per_weight() * r.layer.params as f64;
        params += r.layer.params;
    }
    if lines.is_empty() {
        return Err(Error::Unsupported(format!(
            "no layer has a GGUF tensor name; the llama.cpp export maps Hugging Face Llama module names ({LLAMA_NAMES})"
        )));
    }
    // The base type: the quantized type that covers the most weights. It must be a quantized type,
    // or llama-quantize ignores every override.
    let base = params_by_type
        .iter()
        .filter(|(t, _)| t.ftype().is_some())
        .max_by_key(|(t, n)| (**n, std::cmp::Reverse(**t)))
        .map(|(t, _)| *t)
        .unwrap_or(GgmlType::Q8_0);
    let ftype = base.ftype().unwrap_or("Q8_0");
    if let Some(n) = params_by_type.get(&GgmlType::F32) {
        notes.push(format!(
            "{n} weights at f32: full precision only when the source GGUF holds FP32 weights (convert_hf_to_gguf.py --outtype f32); otherwise they are the source's values widened"
        ));
    }
    notes.push(format!(
        "{} tensors, {} in the same number format as the config and {approximate} approximated; {:.3} bits/w as ggml stores them ({:.3} bits/w in mixq's formats); base type {ftype} applies only to tensors the file does not name",
        lines.len(),
        lines.len() - approximate,
        ggml_bits / params.max(1) as f64,
        mixq_bits / params.max(1) as f64
    ));
    let mut text = lines.join("\n");
    text.push('\n');
    Ok(Export { target: ExportTarget::LlamaCpp, text, notes, base_type: Some(ftype.to_string()) })
}

// ---------------------------------------------------------------------------------------------
// Hugging Face: compressed-tensors
// ---------------------------------------------------------------------------------------------

/// compressed-tensors `QuantizationArgs` (only the fields mixq sets; the rest keep their defaults).
#[derive(Debug, Clone, PartialEq, Serialize)]
struct CtArgs {
    num_bits: u32,
    #[serde(rename = "type")]
    kind: &'static str,
    symmetric: bool,
    strategy: &'static str,
    group_size: Option<u32>,
    dynamic: bool,
    observer: Option<&'static str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    scale_dtype: Option<&'static str>,
}

/// compressed-tensors `QuantizationScheme`.
#[derive(Debug, Clone, PartialEq, Serialize)]
struct CtScheme {
    targets: Vec<String>,
    weights: CtArgs,
    input_activations: Option<CtArgs>,
    output_activations: Option<CtArgs>,
}

/// Groups in order (`group_0`, `group_1`, …), serialized as a JSON object in that order.
#[derive(Debug)]
struct Groups(Vec<CtScheme>);

impl Serialize for Groups {
    fn serialize<S: Serializer>(&self, s: S) -> std::result::Result<S::Ok, S::Error> {
        let mut m = s.serialize_map(Some(self.0.len()))?;
        for (i, g) in self.0.iter().enumerate() {
            m.serialize_entry(&format!("group_{i}"), g)?;
        }
        m.end()
    }
}

/// compressed-tensors `QuantizationConfig`.
#[derive(Debug, Serialize)]
struct CtConfig {
    quant_method: &'static str,
    format: &'static str,
    quantization_status: &'static str,
    config_groups: Groups,
    ignore: Vec<String>,
    kv_cache_scheme: Option<()>,
    global_compression_ratio: Option<f64>,
}

#[derive(Debug, Serialize)]
struct HfNote {
    layer: String,
    note: String,
}

#[derive(Debug, Serialize)]
struct HfExport {
    format: &'static str,
    version: u64,
    library: &'static str,
    quantization_config: CtConfig,
    notes: Vec<HfNote>,
}

fn scale_dtype(scale: ScaleType) -> &'static str {
    match scale {
        ScaleType::F32 => "torch.float32",
        ScaleType::F16 => "torch.float16",
        ScaleType::E8M0 => "torch.uint8",
        ScaleType::E4M3 => "torch.float8_e4m3fn",
    }
}

/// The compressed-tensors weight args for a spec, with a note where they are an approximation,
/// or `Err(why)` when compressed-tensors cannot express the format.
fn ct_weight_args(spec: &QuantSpec) -> std::result::Result<(CtArgs, Option<String>), String> {
    let mut notes: Vec<String> = Vec::new();
    let (num_bits, kind, symmetric) = match spec.format {
        Format::Int { bits, signed } => (u32::from(bits), "int", signed),
        Format::Fp8E4M3 => (8, "float", true),
        Format::Fp4E2M1 => (4, "float", true),
        Format::Fp8E5M2 => return Err("compressed-tensors' 8-bit float type is E4M3 only (no E5M2); use fp8-e4m3".into()),
        Format::Bf16 | Format::Fp16 | Format::Fp32 => {
            return Err(format!("{} keeps the weights unquantized: it belongs in `ignore`", spec.format))
        }
    };
    let (mut strategy, group_size) = match spec.granularity {
        Granularity::PerTensor => ("tensor", None),
        Granularity::PerChannel => ("channel", None),
        Granularity::PerGroup(g) => ("group", Some(g)),
    };
    let mut scale = Some(scale_dtype(spec.scale));
    match (spec.format, spec.scale) {
        (Format::Fp4E2M1, ScaleType::E4M3) => {
            // NVFP4: FP8 E4M3 scales per group under one FP32 scale per tensor.
            if let Some(g) = group_size {
                strategy = "tensor_group";
                if g != 16 {
                    notes.push(format!("NVFP4 kernels expect groups of 16, this layer has {g}"));
                }
            } else {
                notes.push("E4M3 scales without groups: written as plain E4M3 scales, without NVFP4's per-tensor FP32 scale".into());
            }
        }
        (Format::Fp4E2M1, ScaleType::E8M0) if group_size != Some(32) => {
            notes.push(format!("MXFP4 kernels expect power-of-two scales per 32 weights, this layer has {}", spec.granularity));
        }
        (Format::Int { .. } | Format::Fp8E4M3, ScaleType::E8M0 | ScaleType::E4M3) => {
            notes.push(format!(
                "{} scales written as FP16: compressed-tensors reads uint8 (E8M0) and E4M3 scales only for its MX and NVFP4 float formats",
                spec.scale
            ));
            scale = Some(scale_dtype(ScaleType::F16));
        }
        _ => {}
    }
    let observer = match spec.clipping {
        Clipping::MinMax => "minmax",
        Clipping::Mse => "mse",
    };
    let args = CtArgs { num_bits, kind, symmetric, strategy, group_size, dynamic: false, observer: Some(observer), scale_dtype: scale };
    Ok((args, (!notes.is_empty()).then(|| notes.join("; "))))
}

/// Dynamic activation args for an activation format: mixq scales each sample (row of the layer
/// input) on the fly, which compressed-tensors' dynamic per-token strategy does for `[tokens, d]`.
fn ct_activation_args(format: Format) -> std::result::Result<CtArgs, String> {
    let (num_bits, kind, symmetric) = match format {
        Format::Int { bits, signed } => (u32::from(bits), "int", signed),
        Format::Fp8E4M3 => (8, "float", true),
        other => {
            return Err(format!(
                "activation format {other} has no dynamic per-token form in compressed-tensors (int2..int8 and fp8-e4m3 do)"
            ))
        }
    };
    Ok(CtArgs { num_bits, kind, symmetric, strategy: "token", group_size: None, dynamic: true, observer: None, scale_dtype: None })
}

/// The shards of one layer vLLM fuses (`q_proj`, …) with the group each landed in.
type FusedShards<'a> = Vec<(&'a str, Option<usize>)>;

fn hf(resolved: &[ResolvedLayer], opts: ExportOptions) -> Result<Export> {
    let mut groups: Vec<CtScheme> = Vec::new();
    let mut ignore = Vec::new();
    let mut notes: Vec<HfNote> = Vec::new();
    let mut scheme_of: BTreeMap<&str, usize> = BTreeMap::new();
    let mut kept: BTreeMap<Format, usize> = BTreeMap::new();
    for r in resolved {
        let name = &r.layer.name;
        let mut skip = |why: String| -> Result<()> {
            if opts.skip_unmappable {
                notes.push(HfNote { layer: name.clone(), note: format!("skipped, left unquantized: {why}") });
                Ok(())
            } else {
                Err(Error::Unsupported(format!("layer `{name}` ({}): {why}", r.weight)))
            }
        };
        if r.layer.kind == LayerKind::Conv2d {
            skip("compressed-tensors quantizes Linear and Embedding modules only, and this layer is a conv2d".into())?;
            continue;
        }
        if r.weight.format.is_keep() {
            *kept.entry(r.weight.format).or_default() += 1;
            ignore.push(name.clone());
            continue;
        }
        let (weights, note) = match ct_weight_args(&r.weight) {
            Ok(x) => x,
            Err(why) => {
                skip(why)?;
                continue;
            }
        };
        let input_activations = match r.activation.map(ct_activation_args).transpose() {
            Ok(x) => x,
            Err(why) => {
                skip(why)?;
                continue;
            }
        };
        if let Some(n) = note {
            notes.push(HfNote { layer: name.clone(), note: format!("approximation: {n}") });
        }
        let i = match groups.iter().position(|g| g.weights == weights && g.input_activations == input_activations) {
            Some(i) => i,
            None => {
                groups.push(CtScheme { targets: Vec::new(), weights, input_activations, output_activations: None });
                groups.len() - 1
            }
        };
        groups[i].targets.push(name.clone());
        scheme_of.insert(name, i);
    }
    if groups.is_empty() {
        return Err(Error::Unsupported("no layer is quantized in a form compressed-tensors can express; nothing to export".into()));
    }
    for (format, n) in &kept {
        notes.push(HfNote {
            layer: "*".into(),
            note: format!("{n} layer(s) at {format} are listed in `ignore`: they keep the checkpoint's own dtype (compressed-tensors has no per-module dtype)"),
        });
    }
    if groups.iter().any(|g| g.weights.kind == "int" && g.weights.symmetric) {
        notes.push(HfNote {
            layer: "*".into(),
            note: "the consumer recomputes scales from the original weights: compressed-tensors' symmetric int scale is amax / ((2^b - 1) / 2) on the grid -2^(b-1)..2^(b-1)-1, mixq's is amax / (2^(b-1) - 1)".into(),
        });
    }
    // vLLM fuses q/k/v and gate/up into one layer and rejects shards with different schemes.
    let mut blocks: BTreeMap<(&str, &str), FusedShards> = BTreeMap::new();
    for r in resolved {
        for (shards, fused) in [(&["q_proj", "k_proj", "v_proj"][..], "qkv_proj"), (&["gate_proj", "up_proj"][..], "gate_up_proj")] {
            if let Some((prefix, last)) = r.layer.name.rsplit_once('.') {
                if shards.contains(&last) {
                    blocks.entry((prefix, fused)).or_default().push((last, scheme_of.get(r.layer.name.as_str()).copied()));
                }
            }
        }
    }
    for ((prefix, fused), shards) in &blocks {
        if shards.len() > 1 && shards.iter().any(|s| s.1 != shards[0].1) {
            let list: Vec<String> = shards
                .iter()
                .map(|(n, g)| format!("{n}: {}", g.map(|g| format!("group_{g}")).unwrap_or_else(|| "unquantized".into())))
                .collect();
            notes.push(HfNote {
                layer: format!("{prefix}.{fused}"),
                note: format!("vLLM fuses these into {fused} and needs one scheme for all of them; here {}", list.join(", ")),
            });
        }
    }
    let out = HfExport {
        format: HF_FORMAT,
        version: HF_VERSION,
        library: "compressed-tensors",
        quantization_config: CtConfig {
            quant_method: "compressed-tensors",
            format: "dense",
            quantization_status: "initialized",
            config_groups: Groups(groups),
            ignore,
            kv_cache_scheme: None,
            global_compression_ratio: None,
        },
        notes,
    };
    let notes = out.notes.iter().map(|n| format!("{}: {}", n.layer, n.note)).collect();
    Ok(Export { target: ExportTarget::Hf, text: pretty(&out), notes, base_type: None })
}

// ---------------------------------------------------------------------------------------------
// mixq's own resolved view
// ---------------------------------------------------------------------------------------------

#[derive(Debug, Serialize)]
struct WeightView {
    format: String,
    granularity: Option<String>,
    scale: Option<String>,
    clipping: String,
}

#[derive(Debug, Serialize)]
struct LayerView<'a> {
    name: &'a str,
    kind: LayerKind,
    shape: &'a [i64],
    params: i64,
    weight: WeightView,
    activation: Option<String>,
    bits_per_weight: f64,
    bytes: u64,
    source: &'a str,
}

#[derive(Debug, Serialize)]
struct Totals {
    layers: usize,
    params: i64,
    bytes: u64,
    bits_per_weight: f64,
}

#[derive(Debug, Serialize)]
struct ResolvedView<'a> {
    format: &'static str,
    version: u64,
    model: &'a str,
    config: BTreeMap<&'static str, serde_json::Value>,
    layers: Vec<LayerView<'a>>,
    totals: Totals,
}

fn resolved_json(config: &QuantConfig, resolved: &[ResolvedLayer], model: &str) -> String {
    let layers: Vec<LayerView> = resolved
        .iter()
        .map(|r| {
            let w = &r.weight;
            let keep = w.format.is_keep();
            LayerView {
                name: &r.layer.name,
                kind: r.layer.kind,
                shape: &r.layer.shape,
                params: r.layer.params,
                weight: WeightView {
                    format: w.format.to_string(),
                    granularity: (!keep).then(|| w.granularity.to_string()),
                    scale: (!keep).then(|| w.scale.to_string()),
                    clipping: w.clipping.to_string(),
                },
                activation: r.activation.map(|a| a.to_string()),
                bits_per_weight: round6(w.effective_bits(&r.layer.shape)),
                bytes: w.storage_bytes(&r.layer.shape),
                source: &r.source,
            }
        })
        .collect();
    let params: i64 = layers.iter().map(|l| l.params).sum();
    let bits: u64 = resolved.iter().map(|r| r.weight.storage_bits(&r.layer.shape)).sum();
    let mut cfg = BTreeMap::new();
    cfg.insert("format", serde_json::json!(config.format));
    cfg.insert("version", serde_json::json!(config.version));
    if let Some(m) = &config.model {
        cfg.insert("model", serde_json::to_value(m).expect("a ModelRef serializes"));
    }
    let view = ResolvedView {
        format: RESOLVED_FORMAT,
        version: RESOLVED_VERSION,
        model,
        config: cfg,
        totals: Totals {
            layers: layers.len(),
            params,
            bytes: layers.iter().map(|l| l.bytes).sum(),
            bits_per_weight: round6(bits as f64 / params.max(1) as f64),
        },
        layers,
    };
    pretty(&view)
}

/// Rounds to 6 decimals so that the JSON does not carry float noise.
fn round6(x: f64) -> f64 {
    (x * 1e6).round() / 1e6
}

fn pretty<T: Serialize>(v: &T) -> String {
    let mut s = serde_json::to_string_pretty(v).expect("export views always serialize");
    s.push('\n');
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gguf_names_of_llama_modules() {
        assert_eq!(gguf_tensor_name("model.layers.0.self_attn.q_proj").as_deref(), Some("blk.0.attn_q.weight"));
        assert_eq!(gguf_tensor_name("model.layers.31.self_attn.o_proj").as_deref(), Some("blk.31.attn_output.weight"));
        assert_eq!(gguf_tensor_name("model.layers.7.mlp.down_proj").as_deref(), Some("blk.7.ffn_down.weight"));
        assert_eq!(gguf_tensor_name("model.embed_tokens").as_deref(), Some("token_embd.weight"));
        assert_eq!(gguf_tensor_name("lm_head").as_deref(), Some("output.weight"));
        for bad in [
            "fc",
            "model.layers.x.mlp.up_proj",
            "model.layers.01.mlp.up_proj",
            "model.layers..mlp.up_proj",
            "model.layers.0.mlp.fc1",
            "layers.0.mlp.up_proj",
        ] {
            assert_eq!(gguf_tensor_name(bad), None, "{bad}");
        }
    }

    #[test]
    fn exact_formats_and_approximations() {
        let q8 = QuantSpec::new(Format::Int { bits: 8, signed: true }, Granularity::PerGroup(32));
        assert_eq!(ggml_type_for(&q8), (GgmlType::Q8_0, None));
        let q8ch = QuantSpec::new(Format::Int { bits: 8, signed: true }, Granularity::PerChannel);
        assert!(matches!(ggml_type_for(&q8ch), (GgmlType::Q8_0, Some(_))));
        let mx = QuantSpec::new(Format::Fp4E2M1, Granularity::PerGroup(32));
        assert_eq!(ggml_type_for(&mx), (GgmlType::Mxfp4, None));
        let nv = QuantSpec::new(Format::Fp4E2M1, Granularity::PerGroup(16));
        assert!(matches!(ggml_type_for(&nv), (GgmlType::Mxfp4, Some(_))));
        for (bits, t) in
            [(2, GgmlType::Q2K), (3, GgmlType::Q3K), (4, GgmlType::Q4K), (5, GgmlType::Q5K), (6, GgmlType::Q6K), (7, GgmlType::Q8_0)]
        {
            for signed in [true, false] {
                let (got, why) = ggml_type_for(&QuantSpec::new(Format::Int { bits, signed }, Granularity::PerGroup(32)));
                assert_eq!(got, t, "int{bits} signed={signed}");
                assert!(why.is_some(), "int{bits}: k-quants are never mixq's grid");
                // The mapping never stores fewer bits per element than the config asks for.
                assert!(got.bits_per_weight() >= f64::from(bits), "int{bits} -> {got}");
            }
        }
        assert_eq!(ggml_type_for(&QuantSpec::keep()), (GgmlType::F32, None));
    }

    #[test]
    fn fallbacks_keep_at_least_the_bits() {
        for t in [GgmlType::Q2K, GgmlType::Q3K, GgmlType::Q4K, GgmlType::Q5K, GgmlType::Q6K] {
            let f = t.llama_cpp_fallback().unwrap();
            assert_eq!(f.block_size(), 32);
            assert!(f.bits_per_weight() >= t.bits_per_weight(), "{t} -> {f}");
        }
    }

    #[test]
    fn patterns_are_anchored_and_escaped() {
        let p = exact_pattern("output.weight");
        let re = regex::Regex::new(&p).unwrap();
        assert!(re.is_match("output.weight"));
        assert!(!re.is_match("blk.0.attn_output.weight"));
        assert!(!re.is_match("outputXweight"));
    }

    #[test]
    fn targets_parse() {
        assert_eq!("llama-cpp".parse::<ExportTarget>().unwrap(), ExportTarget::LlamaCpp);
        assert_eq!("HF".parse::<ExportTarget>().unwrap(), ExportTarget::Hf);
        let e = "onnx".parse::<ExportTarget>().unwrap_err().to_string();
        assert!(e.contains("onnx") && e.contains("llama-cpp, hf, json"), "{e}");
    }

    #[test]
    fn shell_quoting() {
        assert_eq!(shell_quote("out/types.txt"), "out/types.txt");
        assert_eq!(shell_quote("my file"), "'my file'");
        assert_eq!(shell_quote("it's"), r"'it'\''s'");
    }
}
