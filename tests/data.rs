//! Integration tests of `mixq::model::data`: the embedded digits, user files in safetensors and
//! npy format written to a temporary directory, and the errors for malformed files and data that
//! does not fit a model.

mod common;

use common::Toy;
use mixq::model::data::Dataset;
use std::path::PathBuf;
use tch::{Kind, Tensor};

/// A temporary directory removed on drop.
struct TempDir(PathBuf);

impl TempDir {
    fn new(tag: &str) -> TempDir {
        let d = std::env::temp_dir().join(format!("mixq-data-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir_all(&d).unwrap();
        TempDir(d)
    }
    fn write(&self, name: &str, bytes: &[u8]) -> String {
        let p = self.0.join(name);
        std::fs::write(&p, bytes).unwrap();
        p.display().to_string()
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// A safetensors file from (name, dtype, shape, raw bytes) entries.
fn safetensors(tensors: &[(&str, &str, &[i64], Vec<u8>)]) -> Vec<u8> {
    let mut header = serde_json::Map::new();
    let mut data = Vec::new();
    for (name, dtype, shape, bytes) in tensors {
        let begin = data.len();
        data.extend_from_slice(bytes);
        header.insert(name.to_string(), serde_json::json!({"dtype": dtype, "shape": shape, "data_offsets": [begin, data.len()]}));
    }
    let h = serde_json::to_vec(&serde_json::Value::Object(header)).unwrap();
    let mut out = (h.len() as u64).to_le_bytes().to_vec();
    out.extend_from_slice(&h);
    out.extend_from_slice(&data);
    out
}

/// A version-1 .npy file.
fn npy(descr: &str, shape: &[i64], data: &[u8]) -> Vec<u8> {
    let dims: Vec<String> = shape.iter().map(|d| d.to_string()).collect();
    let shape_s = if dims.len() == 1 { format!("({},)", dims[0]) } else { format!("({})", dims.join(", ")) };
    let mut h = format!("{{'descr': '{descr}', 'fortran_order': False, 'shape': {shape_s}, }}");
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

fn f32_bytes(v: &[f32]) -> Vec<u8> {
    v.iter().flat_map(|x| x.to_le_bytes()).collect()
}

fn i64_bytes(v: &[i64]) -> Vec<u8> {
    v.iter().flat_map(|x| x.to_le_bytes()).collect()
}

fn mock() -> Toy {
    Toy::new()
}

#[test]
fn digits_splits_are_disjoint_stratified_and_labelled() {
    let train = Dataset::load("digits:train").unwrap();
    let calib = Dataset::load("digits:calib").unwrap();
    let test = Dataset::load("digits").unwrap();
    let all = Dataset::load("digits:all").unwrap();
    assert_eq!(train.len() + calib.len() + test.len(), all.len());
    assert_eq!(all.len(), 1797);
    assert!(calib.len() >= 128);
    assert_eq!(test.name, "digits:test");
    for d in [&train, &calib, &test] {
        assert_eq!(d.sample_shape(), [1, 8, 8]);
        assert_eq!(d.x.kind(), Kind::Float);
        let counts = d.y.as_ref().unwrap().bincount::<Tensor>(None, 10);
        let min = i64::try_from(counts.min()).unwrap();
        assert!(min as f64 >= 0.08 * d.len() as f64, "{}: every class present in proportion, counts {counts}", d.name);
        d.check_for(&mock()).unwrap();
    }
    // Splits are disjoint: no test image appears (with its label) in train.
    let key = |d: &Dataset| -> Vec<Vec<i64>> {
        let x = (&d.x * 16.0).round().to_kind(Kind::Int64).flatten(1, -1);
        let x: Vec<Vec<i64>> = Vec::try_from(x).unwrap();
        x
    };
    let train_keys: std::collections::HashSet<Vec<i64>> = key(&train).into_iter().collect();
    let dup = key(&test).into_iter().filter(|k| train_keys.contains(k)).count();
    assert!(dup <= 2, "{dup} test images also in train (the raw data has a few exact duplicates at most)");
}

#[test]
fn safetensors_float_and_integer_inputs() {
    let dir = TempDir::new("st");
    let x: Vec<f32> = (0..3 * 64).map(|i| i as f32 / 100.0).collect();
    let p =
        dir.write("ok.safetensors", &safetensors(&[("x", "F32", &[3, 1, 8, 8], f32_bytes(&x)), ("y", "I64", &[3], i64_bytes(&[0, 9, 4]))]));
    let d = Dataset::load(&p).unwrap();
    assert_eq!(d.len(), 3);
    assert_eq!(d.x.kind(), Kind::Float);
    assert_eq!(Vec::<i64>::try_from(d.y.as_ref().unwrap()).unwrap(), [0, 9, 4]);
    d.check_for(&mock()).unwrap();
    let batches: Vec<_> = d.batches(2).collect();
    assert_eq!(batches.len(), 2);
    assert_eq!(batches[1].0.size(), [1, 1, 8, 8]);

    // uint8 images without labels: kept as int64 by `load`, converted by `load_for`.
    let p = dir.write("u8.safetensors", &safetensors(&[("x", "U8", &[2, 1, 8, 8], vec![7u8; 128])]));
    let d = Dataset::load(&p).unwrap();
    assert_eq!(d.x.kind(), Kind::Int64);
    assert!(!d.has_labels());
    let e = d.check_for(&mock()).unwrap_err().to_string();
    assert!(e.contains("dtype Int64") && e.contains("expects Float"), "{e}");
    let d = Dataset::load_for(&p, &mock()).unwrap();
    assert_eq!(d.x.kind(), Kind::Float);
}

#[test]
fn safetensors_errors_name_the_problem() {
    let dir = TempDir::new("st-bad");
    let no_x = dir.write("no_x.safetensors", &safetensors(&[("inputs", "F32", &[1, 64], f32_bytes(&[0.0; 64]))]));
    let e = Dataset::load(&no_x).unwrap_err().to_string();
    assert!(e.contains("no_x.safetensors") && e.contains("no tensor `x`") && e.contains("`inputs`"), "{e}");

    let mut truncated = safetensors(&[("x", "F32", &[4, 64], f32_bytes(&[0.0; 256]))]);
    truncated.truncate(truncated.len() - 10);
    let p = dir.write("trunc.safetensors", &truncated);
    let e = Dataset::load(&p).unwrap_err().to_string();
    assert!(e.contains("trunc.safetensors") && e.contains("truncated"), "{e}");

    let p = dir.write("magic.safetensors", b"PK\x03\x04 this is a zip");
    let e = Dataset::load(&p).unwrap_err().to_string();
    assert!(e.contains("not a safetensors file"), "{e}");

    let p = dir.write("dtype.safetensors", &safetensors(&[("x", "F8_E4M3", &[2, 4], vec![0u8; 8])]));
    let e = Dataset::load(&p).unwrap_err().to_string();
    assert!(e.contains("unsupported dtype F8_E4M3") && e.contains("U8"), "{e}");

    let p = dir.write(
        "ylen.safetensors",
        &safetensors(&[("x", "F32", &[2, 1, 8, 8], f32_bytes(&[0.0; 128])), ("y", "I64", &[3], i64_bytes(&[0, 1, 2]))]),
    );
    let e = Dataset::load(&p).unwrap_err().to_string();
    assert!(e.contains("y has shape [3] but x has 2 samples"), "{e}");

    let missing = dir.0.join("missing.safetensors");
    let e = Dataset::load(missing.to_str().unwrap()).unwrap_err().to_string();
    assert!(e.contains("missing.safetensors") && e.contains("No such file"), "{e}");
}

#[test]
fn check_for_says_what_the_model_expects() {
    let dir = TempDir::new("check");
    let p = dir.write("flat.safetensors", &safetensors(&[("x", "F32", &[100, 64], f32_bytes(&[0.5; 6400]))]));
    let d = Dataset::load(&p).unwrap();
    let e = d.check_for(&mock()).unwrap_err().to_string();
    assert!(e.contains("x has shape [100, 64] but model toy expects samples of shape [1, 8, 8]; reshape to [100, 1, 8, 8]"), "{e}");
    assert!(e.contains("flat.safetensors"), "{e}");

    let p = dir.write("wrong.safetensors", &safetensors(&[("x", "F32", &[2, 3, 5], f32_bytes(&[0.5; 30]))]));
    let e = Dataset::load(&p).unwrap().check_for(&mock()).unwrap_err().to_string();
    assert!(e.contains("each sample has 15 values, the model needs 64"), "{e}");

    let p = dir.write(
        "labels.safetensors",
        &safetensors(&[("x", "F32", &[2, 1, 8, 8], f32_bytes(&[0.0; 128])), ("y", "I64", &[2], i64_bytes(&[3, 10]))]),
    );
    let e = Dataset::load(&p).unwrap().check_for(&mock()).unwrap_err().to_string();
    assert!(e.contains("label 10 is out of range") && e.contains("0..=9"), "{e}");
}

#[test]
fn npy_pairs_load_and_malformed_npy_fails() {
    let dir = TempDir::new("npy");
    let x: Vec<f64> = (0..2 * 64).map(|i| i as f64).collect();
    let xb: Vec<u8> = x.iter().flat_map(|v| v.to_le_bytes()).collect();
    let xp = dir.write("x.npy", &npy("<f8", &[2, 1, 8, 8], &xb));
    let yp = dir.write("y.npy", &npy("<i4", &[2], &[1, 0, 0, 0, 7, 0, 0, 0]));
    let d = Dataset::load(&format!("{xp},{yp}")).unwrap();
    assert_eq!(d.x.kind(), Kind::Float);
    assert_eq!(d.x.size(), [2, 1, 8, 8]);
    assert_eq!(Vec::<i64>::try_from(d.y.as_ref().unwrap()).unwrap(), [1, 7]);
    d.check_for(&mock()).unwrap();

    let u8p = dir.write("u8.npy", &npy("|u1", &[3, 64], &[1u8; 192]));
    let d = Dataset::load(&u8p).unwrap();
    assert_eq!((d.len(), d.x.kind(), d.has_labels()), (3, Kind::Int64, false));

    let i64p = dir.write("ids.npy", &npy("<i8", &[2, 4], &i64_bytes(&[1, 2, 3, 4, 5, 6, 7, 8])));
    assert_eq!(Dataset::load(&i64p).unwrap().x.kind(), Kind::Int64);

    let bad = dir.write("bad.npy", b"not numpy at all");
    let e = Dataset::load(&bad).unwrap_err().to_string();
    assert!(e.contains("bad.npy") && e.contains("bad magic"), "{e}");

    let short = dir.write("short.npy", &npy("<f4", &[4, 64], &[0u8; 100]));
    let e = Dataset::load(&short).unwrap_err().to_string();
    assert!(e.contains("short.npy") && e.contains("truncated"), "{e}");

    let cplx = dir.write("c.npy", &npy("<c16", &[2], &[0u8; 32]));
    let e = Dataset::load(&cplx).unwrap_err().to_string();
    assert!(e.contains("unsupported dtype <c16") && e.contains("float32"), "{e}");

    let e = Dataset::load(&format!("{xp},labels.csv")).unwrap_err().to_string();
    assert!(e.contains("X.npy,Y.npy"), "{e}");
}

#[test]
fn take_and_subset_are_deterministic() {
    let d = Dataset::load("digits:calib").unwrap();
    let a = d.take(10);
    let b = d.take(10);
    assert_eq!(a.x, b.x);
    assert_eq!(a.len(), 10);
    assert_eq!(d.take(100_000).len(), d.len());
    let s = d.subset(&[5, 0]).unwrap();
    assert_eq!(s.x.get(1), d.x.get(0));
    assert!(d.subset(&[-1]).is_err());
}

/// The standard-library text corpus: at least 2,000 prose sentences, deterministic, calibration
/// and test splits disjoint and together the whole corpus. Skips (with a message) on a machine
/// whose Python standard library cannot be found.
#[test]
fn stdlib_text_corpus() {
    use mixq::model::corpus::{self, StdlibCorpus};
    let root = match corpus::stdlib_dir() {
        Ok(r) => r,
        Err(e) => {
            eprintln!("skipping: {e}");
            return;
        }
    };
    let c = StdlibCorpus::build(&root).unwrap();
    println!("{} sentences from {} files under {}; the first five:", c.sentences.len(), c.files, root.display());
    for s in &c.sentences[..5] {
        println!("  {s}");
    }
    assert!(c.sentences.len() >= corpus::MIN_SENTENCES);
    assert!(c.sentences.iter().all(|s| corpus::is_prose(s)));
    let again = StdlibCorpus::build(&root).unwrap();
    assert_eq!(c.sentences, again.sentences, "same library, same seed: same sentences in the same order");
    let calib: std::collections::HashSet<&String> = c.split("calib").unwrap().iter().collect();
    let test = c.split("test").unwrap();
    assert!(test.iter().all(|s| !calib.contains(s)), "calibration and test sentences are disjoint");
    assert_eq!(calib.len() + test.len(), c.sentences.len(), "no duplicates; the splits cover the corpus");
    assert!(c.split("valid").is_err());
    // A model without a tokenizer cannot take text.
    let e = Dataset::load_for("stdlib-text:calib:8", &mixq::model::zoo::DigitsResNet::untrained()).unwrap_err().to_string();
    assert!(e.contains("does not take text"), "{e}");
}
