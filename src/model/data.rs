//! Datasets: the embedded UCI digits, and user data from `.safetensors` or `.npy` files.
//!
//! Sensitivity estimation needs calibration data and evaluation needs test data; both come through
//! one [`Dataset`] type so every stage sees the same tensors in the same order. The UCI digits are
//! compiled into the library ([`DIGITS_SAFETENSORS`]) so the demo and the tests run anywhere
//! without downloads. User files are parsed here rather than through libtorch so that a malformed
//! file (wrong magic, truncated data, an unsupported dtype, a missing tensor) gets a message that
//! names the file and says what would be valid; [`Dataset::check_for`] then says exactly how the
//! data fails to fit a model before any forward pass runs.
//!
//! Specs accepted by [`Dataset::load`]:
//! - `digits` (= `digits:test`), `digits:train`, `digits:calib`, `digits:test`, `digits:all`;
//! - `PATH.safetensors` with a tensor `x` and optionally `y`;
//! - `X.npy` or `X.npy,Y.npy`.
//!
//! and by [`Dataset::load_for`], which tokenizes text with the model's own tokenizer
//! ([`QuantModel::encode_text`]):
//! - `stdlib-text[:calib|test|all][:N]` (plain `stdlib-text` is `stdlib-text:test`): sentences
//!   of the Python standard library's docstrings ([`crate::model::corpus`]), the first `N` of
//!   the split when `N` is given. The sentences of a text data set are ordered by length (the
//!   model pads a batch to its longest sentence), without labels.

use crate::error::{Error, Result};
use crate::model::corpus::{self, StdlibCorpus};
use crate::model::{OutputKind, QuantModel};
use std::path::Path;
use tch::{Kind, Tensor};

/// The UCI hand-written digits (1,797 8×8 images, values 0..16), as built by
/// `data/digits/make_digits.py`: uint8 tensors `x` `[1797, 64]`, `y` `[1797]` and `split` `[1797]`
/// (0 = train, 1 = calib, 2 = test).
pub const DIGITS_SAFETENSORS: &[u8] = include_bytes!("../../data/digits/digits.safetensors");

/// The name used for the embedded digits file in error messages.
const DIGITS_SOURCE: &str = "<embedded digits>";

/// The digits splits and their codes in the `split` tensor.
const DIGITS_SPLITS: [(&str, Option<u8>); 4] = [("train", Some(0)), ("calib", Some(1)), ("test", Some(2)), ("all", None)];

/// A dataset held in memory (on the CPU).
pub struct Dataset {
    /// Where it came from, e.g. `digits:test` or a path.
    pub name: String,
    /// Inputs `[N, ...]` (FP32, or int64 token ids).
    pub x: Tensor,
    /// Labels `[N]` (int64), if any.
    pub y: Option<Tensor>,
}

impl std::fmt::Debug for Dataset {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Dataset")
            .field("name", &self.name)
            .field("x", &(self.x.size(), self.x.kind()))
            .field("y", &self.y.as_ref().map(|y| (y.size(), y.kind())))
            .finish()
    }
}

impl Clone for Dataset {
    fn clone(&self) -> Self {
        Dataset { name: self.name.clone(), x: self.x.shallow_clone(), y: self.y.as_ref().map(Tensor::shallow_clone) }
    }
}

impl Dataset {
    /// Loads `spec`: `digits[:train|calib|test|all]`, `PATH.safetensors`, or `X.npy[,Y.npy]`.
    ///
    /// Digits images become FP32 `[N, 1, 8, 8]` in `[0, 1]`. From files, floating-point `x`
    /// becomes FP32 and integer `x` int64 (token ids; see [`Dataset::into_kind`] to convert);
    /// labels become int64 `[N]`.
    pub fn load(spec: &str) -> Result<Dataset> {
        let spec = spec.trim();
        if TextSpec::parse(spec).is_some() {
            return Err(Error::invalid(
                "data",
                spec,
                "text data is tokenized by the model that reads it: load it together with a model that takes text (e.g. minilm)",
            ));
        }
        if spec == "digits" || spec.starts_with("digits:") {
            let split = spec.strip_prefix("digits").unwrap_or("").trim_start_matches(':');
            return Dataset::digits(if split.is_empty() { "test" } else { split });
        }
        if let Some((xs, ys)) = spec.split_once(',') {
            let (xs, ys) = (xs.trim(), ys.trim());
            if !is_ext(xs, "npy") || !is_ext(ys, "npy") {
                return Err(Error::invalid("data", spec, "a comma separates two .npy files: `X.npy,Y.npy`"));
            }
            return Dataset::from_npy(Path::new(xs), Some(Path::new(ys)));
        }
        if is_ext(spec, "safetensors") {
            return Dataset::from_safetensors(Path::new(spec));
        }
        if is_ext(spec, "npy") {
            return Dataset::from_npy(Path::new(spec), None);
        }
        Err(Error::invalid(
            "data",
            spec,
            "valid data: digits, digits:train, digits:calib, digits:test, digits:all, PATH.safetensors (tensor `x`, optional `y`), X.npy or X.npy,Y.npy; for text models stdlib-text:calib, stdlib-text:test, stdlib-text:all (optionally :N)",
        ))
    }

    /// Loads `spec` and makes it fit `model`: converts `x` to the model's input dtype (integer
    /// images to FP32; integral floats to int64 token ids) and runs [`Dataset::check_for`].
    /// Text specs (`stdlib-text…`) are tokenized by the model.
    pub fn load_for(spec: &str, model: &dyn QuantModel) -> Result<Dataset> {
        let d = match TextSpec::parse(spec.trim()) {
            Some(t) => Dataset::text(&t?, model)?,
            None => Dataset::load(spec)?.into_kind(model.input_kind())?,
        };
        d.check_for(model)?;
        Ok(d)
    }

    /// One split of the embedded UCI digits: `train`, `calib`, `test` or `all`.
    pub fn digits(split: &str) -> Result<Dataset> {
        let code = DIGITS_SPLITS.iter().find(|(n, _)| *n == split).map(|(_, c)| *c).ok_or_else(|| {
            Error::invalid(
                "digits split",
                split,
                "valid splits: digits:train, digits:calib, digits:test, digits:all (plain `digits` is digits:test)",
            )
        })?;
        let source = Path::new(DIGITS_SOURCE);
        let tensors = parse_safetensors(source, DIGITS_SAFETENSORS)?;
        let get = |name: &str| {
            tensors
                .iter()
                .find(|t| t.name == name)
                .ok_or_else(|| Error::parse(source, format!("no tensor `{name}` (the file is built by data/digits/make_digits.py)")))
        };
        let x = get("x")?.to_tensor()?.to_kind(Kind::Float) / 16.0;
        let y = get("y")?.to_tensor()?.to_kind(Kind::Int64);
        let s = get("split")?.to_tensor()?;
        let n = x.size()[0];
        let x = x.reshape([n, 1, 8, 8]);
        let (x, y) = match code {
            None => (x, y),
            Some(c) => {
                let idx = s.eq(i64::from(c)).nonzero().squeeze_dim(1);
                (x.index_select(0, &idx), y.index_select(0, &idx))
            }
        };
        Ok(Dataset { name: format!("digits:{split}"), x, y: Some(y) })
    }

    /// Loads a `.safetensors` file with a tensor `x` and optionally `y`.
    pub fn from_safetensors(path: &Path) -> Result<Dataset> {
        let bytes = std::fs::read(path).map_err(|e| Error::io(path, e))?;
        let tensors = parse_safetensors(path, &bytes)?;
        let names = || tensors.iter().map(|t| format!("`{}`", t.name)).collect::<Vec<_>>().join(", ");
        let x = tensors.iter().find(|t| t.name == "x").ok_or_else(|| {
            Error::parse(
                path,
                format!("no tensor `x` (inputs [N, ...]); the file has {}; mixq reads `x` and, optionally, labels `y`", names()),
            )
        })?;
        let x = inputs(path, x.to_tensor()?, x.dtype)?;
        let y = match tensors.iter().find(|t| t.name == "y") {
            Some(y) => Some(labels(path, y.to_tensor()?, x.size()[0])?),
            None => None,
        };
        Ok(Dataset { name: path.display().to_string(), x, y })
    }

    /// Loads inputs from `x_path` and, optionally, labels from `y_path` (both `.npy`).
    pub fn from_npy(x_path: &Path, y_path: Option<&Path>) -> Result<Dataset> {
        let (x, dtype) = read_npy(x_path)?;
        let x = inputs(x_path, x, dtype)?;
        let (y, name) = match y_path {
            Some(p) => {
                let (y, _) = read_npy(p)?;
                (Some(labels(p, y, x.size()[0])?), format!("{},{}", x_path.display(), p.display()))
            }
            None => (None, x_path.display().to_string()),
        };
        Ok(Dataset { name, x, y })
    }

    /// Number of samples.
    pub fn len(&self) -> usize {
        self.x.size().first().copied().unwrap_or(0).max(0) as usize
    }

    /// True when there are no samples.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// True when the dataset has labels.
    pub fn has_labels(&self) -> bool {
        self.y.is_some()
    }

    /// Shape of one sample (without the batch dimension).
    pub fn sample_shape(&self) -> Vec<i64> {
        self.x.size().get(1..).map(<[i64]>::to_vec).unwrap_or_default()
    }

    /// Consecutive batches of at most `batch_size` samples (at least 1), in dataset order.
    pub fn batches(&self, batch_size: usize) -> impl Iterator<Item = (Tensor, Option<Tensor>)> + '_ {
        let n = self.len() as i64;
        let bs = batch_size.max(1) as i64;
        (0..n).step_by(bs as usize).map(move |start| {
            let len = bs.min(n - start);
            (self.x.narrow(0, start, len), self.y.as_ref().map(|y| y.narrow(0, start, len)))
        })
    }

    /// The first `n` samples (all of them if `n` is larger).
    pub fn take(&self, n: usize) -> Dataset {
        let n = n.min(self.len()) as i64;
        let name = if n as usize == self.len() { self.name.clone() } else { format!("{}[..{n}]", self.name) };
        Dataset { name, x: self.x.narrow(0, 0, n), y: self.y.as_ref().map(|y| y.narrow(0, 0, n)) }
    }

    /// The samples at `indices`, in that order.
    pub fn subset(&self, indices: &[i64]) -> Result<Dataset> {
        let n = self.len() as i64;
        if let Some(bad) = indices.iter().find(|&&i| i < 0 || i >= n) {
            return Err(Error::Data {
                source_name: self.name.clone(),
                msg: format!("subset index {bad} is out of range; the dataset has {n} samples"),
            });
        }
        let idx = Tensor::from_slice(indices);
        Ok(Dataset {
            name: format!("{}[subset of {}]", self.name, indices.len()),
            x: self.x.index_select(0, &idx),
            y: self.y.as_ref().map(|y| y.index_select(0, &idx)),
        })
    }

    /// Converts `x` to `kind`: integers to floats always; floats to int64 only when every value is
    /// a whole number (token ids saved as floats).
    pub fn into_kind(self, kind: Kind) -> Result<Dataset> {
        let from = self.x.kind();
        if from == kind {
            return Ok(self);
        }
        if is_float_kind(kind) {
            let x = self.x.to_kind(kind);
            return Ok(Dataset { x, ..self });
        }
        if is_float_kind(from) {
            let whole = self.x.numel() == 0 || bool::try_from(self.x.eq_tensor(&self.x.round()).all()).unwrap_or(false);
            if !whole {
                return Err(Error::Data {
                    source_name: self.name.clone(),
                    msg: format!("x holds non-integer {from:?} values, but the model takes {kind:?} token ids; save x as an integer array"),
                });
            }
        }
        let x = self.x.to_kind(kind);
        Ok(Dataset { x, ..self })
    }

    /// Checks that this data fits `model`: per-sample shape, input dtype, and labels (one per
    /// sample, each in `0..num_classes`).
    pub fn check_for(&self, model: &dyn QuantModel) -> Result<()> {
        let err = |msg: String| Error::Data { source_name: self.name.clone(), msg };
        let size = self.x.size();
        let want = model.input_shape();
        let n = size.first().copied().unwrap_or(0);
        if size.is_empty() {
            return Err(err(format!("x is a scalar, but model {} expects a batch of samples of shape {want:?}", model.name())));
        }
        if n == 0 {
            return Err(err(format!(
                "x has no samples (shape {size:?}); model {} needs at least one sample of shape {want:?}",
                model.name()
            )));
        }
        if &size[1..] != want {
            let per_sample: i64 = size[1..].iter().product();
            let want_numel: i64 = want.iter().product();
            let mut full = vec![n];
            full.extend_from_slice(want);
            let hint = if per_sample == want_numel {
                format!("; reshape to {full:?}")
            } else {
                format!("; each sample has {per_sample} values, the model needs {want_numel}")
            };
            return Err(err(format!("x has shape {size:?} but model {} expects samples of shape {want:?}{hint}", model.name())));
        }
        let kind = model.input_kind();
        if self.x.kind() != kind {
            let hint =
                if is_float_kind(kind) { "convert the images to float32" } else { "save x as an integer (int64) array of token ids" };
            return Err(err(format!("x has dtype {:?} but model {} expects {kind:?} inputs; {hint}", self.x.kind(), model.name())));
        }
        if let (Some(_), OutputKind::Embedding) = (&self.y, model.output_kind()) {
            return Err(err(format!(
                "the data has labels (y), but model {} is an embedding model: it is measured against its own FP32 embeddings; leave y out",
                model.name()
            )));
        }
        if let Some(y) = &self.y {
            let ys = y.size();
            if ys.len() != 1 || ys[0] != n {
                return Err(err(format!("y has shape {ys:?} but x has {n} samples; y must be class indices of shape [{n}]")));
            }
            if y.kind() != Kind::Int64 {
                return Err(err(format!("y has dtype {:?}; labels must be int64 class indices", y.kind())));
            }
            let c = model.num_classes();
            let lo = i64::try_from(y.min()).map_err(Error::Torch)?;
            let hi = i64::try_from(y.max()).map_err(Error::Torch)?;
            if lo < 0 || hi >= c {
                let bad = if lo < 0 { lo } else { hi };
                return Err(err(format!(
                    "label {bad} is out of range: model {} has {c} classes, so labels must lie in 0..={}",
                    model.name(),
                    c - 1
                )));
            }
        }
        Ok(())
    }
}

/// A parsed `stdlib-text[:split][:N]` spec.
#[derive(Debug, Clone, PartialEq)]
struct TextSpec {
    split: String,
    count: Option<usize>,
}

/// The prefix of text data specs.
const TEXT_PREFIX: &str = "stdlib-text";

impl TextSpec {
    /// None when `spec` is not a text spec; Some(Err) when it is one with a bad split or count.
    fn parse(spec: &str) -> Option<Result<TextSpec>> {
        let rest = spec.strip_prefix(TEXT_PREFIX)?;
        if !(rest.is_empty() || rest.starts_with(':')) {
            return None;
        }
        let mut parts = rest.split(':').skip(1);
        let split = parts.next().filter(|s| !s.is_empty()).unwrap_or("test").to_string();
        let count = parts.next();
        let bad = |msg: String| Some(Err(Error::invalid("data", spec, msg)));
        if parts.next().is_some() || !corpus::SPLITS.contains(&split.as_str()) {
            return bad(format!("text data is {TEXT_PREFIX}[:SPLIT][:N] with SPLIT one of {}", corpus::SPLITS.join(", ")));
        }
        let count = match count.map(str::parse::<usize>) {
            None => None,
            Some(Ok(n)) if n > 0 => Some(n),
            Some(_) => return bad(format!("`{}` is not a positive number of sentences", count.unwrap_or(""))),
        };
        Some(Ok(TextSpec { split, count }))
    }
}

impl Dataset {
    /// Sentences of the standard-library corpus for `spec`, tokenized by `model`.
    fn text(spec: &TextSpec, model: &dyn QuantModel) -> Result<Dataset> {
        let corpus = StdlibCorpus::load()?;
        let all = corpus.split(&spec.split)?;
        let name = match spec.count {
            Some(n) => format!("{TEXT_PREFIX}:{}:{n}", spec.split),
            None => format!("{TEXT_PREFIX}:{}", spec.split),
        };
        let n = spec.count.unwrap_or(all.len());
        if n > all.len() {
            return Err(Error::Data {
                source_name: name,
                msg: format!(
                    "the {} split has {} sentences (from {}); ask for at most that many",
                    spec.split,
                    all.len(),
                    corpus.root.display()
                ),
            });
        }
        let mut sentences = all[..n].to_vec();
        // Stable: equal lengths keep the corpus order.
        sentences.sort_by_key(String::len);
        let x = model.encode_text(&sentences)?;
        Ok(Dataset { name, x, y: None })
    }
}

fn is_ext(path: &str, ext: &str) -> bool {
    Path::new(path).extension().is_some_and(|e| e.eq_ignore_ascii_case(ext))
}

fn is_float_kind(k: Kind) -> bool {
    matches!(k, Kind::Float | Kind::Double | Kind::Half | Kind::BFloat16)
}

/// Turns a raw `x` into the dataset's input tensor: floats → FP32, integers → int64.
fn inputs(path: &Path, x: Tensor, dtype: &str) -> Result<Tensor> {
    if x.dim() == 0 {
        return Err(Error::parse(path, "x is a scalar; it must have a leading sample dimension [N, ...]"));
    }
    Ok(match x.kind() {
        Kind::Bool => {
            return Err(Error::parse(
                path,
                format!("x has dtype {dtype} (boolean); inputs must be floating-point images or integer token ids"),
            ))
        }
        k if is_float_kind(k) => x.to_kind(Kind::Float),
        _ => x.to_kind(Kind::Int64),
    })
}

/// Turns a raw `y` into int64 labels `[n]`; accepts `[n, 1]` and floats holding whole numbers.
fn labels(path: &Path, y: Tensor, n: i64) -> Result<Tensor> {
    let size = y.size();
    let y = match size.as_slice() {
        [m] if *m == n => y,
        [m, 1] if *m == n => y.reshape([n]),
        _ => {
            return Err(Error::parse(
                path,
                format!("y has shape {size:?} but x has {n} samples; y must hold one class index per sample, shape [{n}]"),
            ))
        }
    };
    if matches!(y.kind(), Kind::Bool) {
        return Err(Error::parse(path, "y is boolean; labels must be integer class indices 0..C-1"));
    }
    if is_float_kind(y.kind()) {
        let whole = y.numel() == 0 || bool::try_from(y.eq_tensor(&y.round()).all()).unwrap_or(false);
        if !whole {
            return Err(Error::parse(
                path,
                format!("y holds non-integer {:?} values; labels must be integer class indices 0..C-1", y.kind()),
            ));
        }
    }
    Ok(y.to_kind(Kind::Int64))
}

/// One tensor of a parsed file: its name, dtype string, shape and raw little-endian bytes.
struct RawTensor<'a> {
    name: String,
    dtype: &'static str,
    kind: Kind,
    shape: Vec<i64>,
    data: &'a [u8],
}

impl RawTensor<'_> {
    fn to_tensor(&self) -> Result<Tensor> {
        Tensor::f_from_data_size(self.data, &self.shape, self.kind).map_err(Error::Torch)
    }
}

const SAFETENSORS_DTYPES: [(&str, Kind); 10] = [
    ("F64", Kind::Double),
    ("F32", Kind::Float),
    ("F16", Kind::Half),
    ("BF16", Kind::BFloat16),
    ("I64", Kind::Int64),
    ("I32", Kind::Int),
    ("I16", Kind::Int16),
    ("I8", Kind::Int8),
    ("U8", Kind::Uint8),
    ("BOOL", Kind::Bool),
];

/// Number of bytes of `shape` at `elem` bytes per element, or None on overflow / negative dims.
fn byte_len(shape: &[i64], elem: usize) -> Option<usize> {
    shape.iter().try_fold(elem, |acc, &d| usize::try_from(d).ok().and_then(|d| acc.checked_mul(d)))
}

/// Parses a safetensors buffer: an 8-byte little-endian header length, a JSON header
/// `{name: {dtype, shape, data_offsets}, "__metadata__": {...}}`, then the data.
fn parse_safetensors<'a>(path: &Path, bytes: &'a [u8]) -> Result<Vec<RawTensor<'a>>> {
    let not_st = "is not a safetensors file (expected an 8-byte little-endian header length, then a JSON header)";
    let head: [u8; 8] = bytes
        .get(..8)
        .and_then(|b| b.try_into().ok())
        .ok_or_else(|| Error::parse(path, format!("file of {} bytes {not_st}", bytes.len())))?;
    let hlen = u64::from_le_bytes(head);
    let hend = usize::try_from(hlen).ok().and_then(|h| h.checked_add(8)).filter(|&e| e <= bytes.len()).ok_or_else(|| {
        Error::parse(path, format!("header length {hlen} exceeds the file size {}: the file is truncated or {not_st}", bytes.len()))
    })?;
    let header: serde_json::Value = serde_json::from_slice(&bytes[8..hend])
        .map_err(|e| Error::parse(path, format!("bad safetensors JSON header ({e}); the file {not_st}")))?;
    let obj =
        header.as_object().ok_or_else(|| Error::parse(path, format!("safetensors header is not a JSON object; the file {not_st}")))?;
    let data = &bytes[hend..];
    let mut out = Vec::new();
    for (name, info) in obj {
        if name == "__metadata__" {
            continue;
        }
        let bad = |msg: String| Error::parse(path, format!("tensor `{name}`: {msg}"));
        let dtype_s = info.get("dtype").and_then(|d| d.as_str()).ok_or_else(|| bad("no `dtype` string in the header".into()))?;
        let (dtype, kind) = SAFETENSORS_DTYPES.iter().find(|(d, _)| *d == dtype_s).copied().ok_or_else(|| {
            let valid: Vec<&str> = SAFETENSORS_DTYPES.iter().map(|(d, _)| *d).collect();
            bad(format!("unsupported dtype {dtype_s}; mixq reads {}", valid.join(", ")))
        })?;
        let shape: Vec<i64> = info
            .get("shape")
            .and_then(|s| s.as_array())
            .and_then(|a| a.iter().map(|d| d.as_i64().filter(|&d| d >= 0)).collect::<Option<Vec<_>>>())
            .ok_or_else(|| bad("no valid `shape` (a list of non-negative integers) in the header".into()))?;
        let offs: Vec<usize> = info
            .get("data_offsets")
            .and_then(|s| s.as_array())
            .and_then(|a| a.iter().map(|d| d.as_u64().and_then(|d| usize::try_from(d).ok())).collect::<Option<Vec<_>>>())
            .filter(|o| o.len() == 2 && o[0] <= o[1])
            .ok_or_else(|| bad("no valid `data_offsets` [begin, end] in the header".into()))?;
        let want = byte_len(&shape, kind.elt_size_in_bytes()).ok_or_else(|| bad(format!("shape {shape:?} is too large")))?;
        if offs[1] - offs[0] != want {
            return Err(bad(format!(
                "data_offsets {offs:?} span {} bytes, but shape {shape:?} of {dtype} needs {want}",
                offs[1] - offs[0]
            )));
        }
        if offs[1] > data.len() {
            return Err(bad(format!(
                "data ends at byte {} but the file has only {} data bytes: the file is truncated",
                offs[1],
                data.len()
            )));
        }
        out.push(RawTensor { name: name.clone(), dtype, kind, shape, data: &data[offs[0]..offs[1]] });
    }
    Ok(out)
}

/// dtypes read from `.npy` files: numpy descr (without byte order) → (name, kind).
const NPY_DTYPES: [(&str, &str, Kind); 7] = [
    ("f4", "float32", Kind::Float),
    ("f8", "float64", Kind::Double),
    ("u1", "uint8", Kind::Uint8),
    ("i1", "int8", Kind::Int8),
    ("i2", "int16", Kind::Int16),
    ("i4", "int32", Kind::Int),
    ("i8", "int64", Kind::Int64),
];

/// Reads a `.npy` file (format versions 1–3, little-endian, C order).
fn read_npy(path: &Path) -> Result<(Tensor, &'static str)> {
    let bytes = std::fs::read(path).map_err(|e| Error::io(path, e))?;
    let raw = parse_npy(path, &bytes)?;
    Ok((raw.to_tensor()?, raw.dtype))
}

fn parse_npy<'a>(path: &Path, bytes: &'a [u8]) -> Result<RawTensor<'a>> {
    const MAGIC: &[u8] = b"\x93NUMPY";
    if bytes.len() < 10 || &bytes[..6] != MAGIC {
        return Err(Error::parse(path, "not a .npy file (bad magic; expected \\x93NUMPY as written by numpy.save)"));
    }
    let major = bytes[6];
    let (hlen, start) = match major {
        1 => (usize::from(u16::from_le_bytes([bytes[8], bytes[9]])), 10),
        2 | 3 => {
            let b = bytes.get(8..12).ok_or_else(|| Error::parse(path, "truncated .npy header"))?;
            (u32::from_le_bytes([b[0], b[1], b[2], b[3]]) as usize, 12)
        }
        v => return Err(Error::parse(path, format!(".npy format version {v} is not supported; mixq reads versions 1, 2 and 3"))),
    };
    let header = bytes
        .get(start..start + hlen)
        .ok_or_else(|| Error::parse(path, format!("truncated .npy header ({hlen} bytes announced, file has {})", bytes.len())))?;
    let header = std::str::from_utf8(header).map_err(|_| Error::parse(path, ".npy header is not text"))?;
    let descr = npy_field(header, "descr").ok_or_else(|| Error::parse(path, format!(".npy header has no 'descr': {header}")))?;
    let descr = descr.trim().trim_matches(|c| c == '\'' || c == '"');
    let fortran = npy_field(header, "fortran_order").map(|v| v.trim().starts_with("True")).unwrap_or(false);
    let shape_s = npy_field(header, "shape").ok_or_else(|| Error::parse(path, format!(".npy header has no 'shape': {header}")))?;
    let shape: Vec<i64> = shape_s
        .trim()
        .trim_start_matches('(')
        .trim_end_matches(')')
        .split(',')
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .map(|s| s.trim_end_matches('L').parse::<i64>())
        .collect::<std::result::Result<_, _>>()
        .map_err(|_| Error::parse(path, format!(".npy header has a bad shape {shape_s}")))?;
    let valid = || NPY_DTYPES.iter().map(|(_, n, _)| *n).collect::<Vec<_>>().join(", ");
    let (order, code) = (descr.get(..1).unwrap_or(""), descr.get(1..).unwrap_or(""));
    if order == ">" {
        return Err(Error::parse(
            path,
            format!("dtype {descr} is big-endian; save a little-endian array (arr.astype(arr.dtype.newbyteorder('<')))"),
        ));
    }
    if !matches!(order, "<" | "|" | "=") {
        return Err(Error::parse(path, format!("unsupported dtype {descr}; mixq reads little-endian {}", valid())));
    }
    let (_, dtype, kind) = NPY_DTYPES
        .iter()
        .find(|(c, _, _)| *c == code)
        .copied()
        .ok_or_else(|| Error::parse(path, format!("unsupported dtype {descr}; mixq reads {}", valid())))?;
    if fortran {
        return Err(Error::parse(path, "array is in Fortran order; save a C-order array (numpy.ascontiguousarray)"));
    }
    let data = &bytes[start + hlen..];
    let want = byte_len(&shape, kind.elt_size_in_bytes()).ok_or_else(|| Error::parse(path, format!("shape {shape:?} is too large")))?;
    if data.len() < want {
        return Err(Error::parse(
            path,
            format!("truncated: shape {shape:?} of {dtype} needs {want} data bytes, the file has {}", data.len()),
        ));
    }
    if data.len() > want {
        return Err(Error::parse(
            path,
            format!("{} bytes after the data of shape {shape:?} of {dtype}; the file is not a single .npy array", data.len() - want),
        ));
    }
    Ok(RawTensor { name: path.display().to_string(), dtype, kind, shape, data })
}

/// The text of `key`'s value in a numpy header dict `{'descr': '<f4', 'fortran_order': False, 'shape': (3, 4), }`.
fn npy_field<'h>(header: &'h str, key: &str) -> Option<&'h str> {
    let pat_sq = format!("'{key}'");
    let pat_dq = format!("\"{key}\"");
    let at = header.find(&pat_sq).map(|i| i + pat_sq.len()).or_else(|| header.find(&pat_dq).map(|i| i + pat_dq.len()))?;
    let rest = header[at..].trim_start().strip_prefix(':')?.trim_start();
    let end = if rest.starts_with('(') { rest.find(')').map(|i| i + 1)? } else { rest.find([',', '}']).unwrap_or(rest.len()) };
    Some(&rest[..end])
}

#[cfg(test)]
mod tests {
    use super::*;

    fn npy_bytes(descr: &str, shape: &str, data: &[u8]) -> Vec<u8> {
        let mut h = format!("{{'descr': '{descr}', 'fortran_order': False, 'shape': {shape}, }}");
        while (10 + h.len() + 1) % 64 != 0 {
            h.push(' ');
        }
        h.push('\n');
        let mut b = b"\x93NUMPY\x01\x00".to_vec();
        b.extend_from_slice(&(h.len() as u16).to_le_bytes());
        b.extend_from_slice(h.as_bytes());
        b.extend_from_slice(data);
        b
    }

    #[test]
    fn digits_splits_partition_the_data() {
        let all = Dataset::digits("all").unwrap();
        assert_eq!(all.x.size(), [1797, 1, 8, 8]);
        let sizes: Vec<usize> = ["train", "calib", "test"].iter().map(|s| Dataset::digits(s).unwrap().len()).collect();
        assert_eq!(sizes.iter().sum::<usize>(), 1797);
        assert!(sizes[1] >= 128, "calib split has {} samples", sizes[1]);
        let max = f64::try_from(all.x.max()).unwrap();
        assert!((max - 1.0).abs() < 1e-6, "digits scaled to [0, 1], max {max}");
        assert_eq!(Dataset::load("digits").unwrap().name, "digits:test");
    }

    #[test]
    fn unknown_split_and_spec_are_rejected() {
        let e = Dataset::load("digits:valid").unwrap_err().to_string();
        assert!(e.contains("digits:calib"), "{e}");
        let e = Dataset::load("data.csv").unwrap_err().to_string();
        assert!(e.contains(".safetensors") && e.contains(".npy"), "{e}");
    }

    #[test]
    fn text_specs() {
        assert!(TextSpec::parse("digits:calib").is_none());
        assert!(TextSpec::parse("stdlib-textual").is_none());
        let t = |s: &str| TextSpec::parse(s).unwrap();
        assert_eq!(t("stdlib-text").unwrap(), TextSpec { split: "test".into(), count: None });
        assert_eq!(t("stdlib-text:calib:64").unwrap(), TextSpec { split: "calib".into(), count: Some(64) });
        assert!(t("stdlib-text:valid").unwrap_err().to_string().contains("calib, test, all"));
        assert!(t("stdlib-text:test:0").unwrap_err().to_string().contains("positive number"));
        assert!(t("stdlib-text:test:5:6").is_err());
        let e = Dataset::load("stdlib-text:calib").unwrap_err().to_string();
        assert!(e.contains("tokenized by the model"), "{e}");
    }

    #[test]
    fn npy_header_parsing() {
        let b = npy_bytes("<f4", "(2, 3)", &[0u8; 24]);
        let t = parse_npy(Path::new("a.npy"), &b).unwrap();
        assert_eq!(t.shape, vec![2, 3]);
        assert_eq!(t.kind, Kind::Float);
        let b = npy_bytes("<i8", "(5,)", &[0u8; 40]);
        assert_eq!(parse_npy(Path::new("a.npy"), &b).unwrap().shape, vec![5]);
        let b = npy_bytes(">f4", "(2,)", &[0u8; 8]);
        assert!(parse_npy(Path::new("a.npy"), &b).err().unwrap().to_string().contains("big-endian"));
        let b = npy_bytes("<c8", "(2,)", &[0u8; 16]);
        assert!(parse_npy(Path::new("a.npy"), &b).err().unwrap().to_string().contains("unsupported dtype <c8"));
        let b = npy_bytes("<f4", "(2, 3)", &[0u8; 20]);
        assert!(parse_npy(Path::new("a.npy"), &b).err().unwrap().to_string().contains("truncated"));
    }

    #[test]
    fn safetensors_header_errors() {
        let p = Path::new("t.safetensors");
        assert!(parse_safetensors(p, b"abc").err().unwrap().to_string().contains("not a safetensors file"));
        let mut b = 1000u64.to_le_bytes().to_vec();
        b.extend_from_slice(b"{}");
        assert!(parse_safetensors(p, &b).err().unwrap().to_string().contains("truncated"));
        let h = br#"{"x":{"dtype":"C64","shape":[1],"data_offsets":[0,8]}}"#;
        let mut b = (h.len() as u64).to_le_bytes().to_vec();
        b.extend_from_slice(h);
        b.extend_from_slice(&[0; 8]);
        let e = parse_safetensors(p, &b).err().unwrap().to_string();
        assert!(e.contains("unsupported dtype C64") && e.contains("F32"), "{e}");
    }

    #[test]
    fn batches_cover_all_samples_in_order() {
        let d = Dataset::digits("calib").unwrap();
        let mut seen = 0;
        for (x, y) in d.batches(50) {
            let n = x.size()[0];
            assert!(n <= 50);
            assert_eq!(y.unwrap().size(), [n]);
            seen += n as usize;
        }
        assert_eq!(seen, d.len());
        let t = d.take(7);
        assert_eq!(t.len(), 7);
        let s = d.subset(&[3, 1]).unwrap();
        assert_eq!(s.x.get(1), d.x.get(1));
        assert!(d.subset(&[10_000]).is_err());
    }
}
