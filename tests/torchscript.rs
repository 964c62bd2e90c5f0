//! TorchScript models as `QuantModel`s, checked against PyTorch: the fixtures in tests/fixtures
//! and their JSON (layers with MACs from forward hooks, reference logits) come from
//! tests/fixtures/make_fixture.py.

use anyhow::{Context, Result};
use mixq::model::loss::loss;
use mixq::model::torchscript::TorchScriptModel;
use mixq::model::{LayerInfo, QuantModel, Target};
use std::path::{Path, PathBuf};
use tch::{Kind, Tensor};

/// Largest absolute difference allowed between our logits and PyTorch's (same libtorch, same
/// kernels: differences come only from thread scheduling of reductions).
const FORWARD_TOL: f64 = 1e-5;

fn fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures").join(name)
}

/// A fixture's reference data.
struct Reference {
    input: Tensor,
    output: Tensor,
    layers: Vec<LayerInfo>,
}

fn reference(stem: &str) -> Result<Reference> {
    let path = fixture(&format!("{stem}.json"));
    let text = std::fs::read_to_string(&path).with_context(|| format!("reading {}", path.display()))?;
    let v: serde_json::Value = serde_json::from_str(&text)?;
    assert_eq!(v["format"], "mixq.test-fixture");
    assert_eq!(v["version"], 1);
    let shape = |key: &str| -> Result<Vec<i64>> { Ok(serde_json::from_value(v[key].clone())?) };
    let input_shape = shape("input_shape")?;
    let input = match v["input_dtype"].as_str() {
        Some("float32") => Tensor::from_slice(&serde_json::from_value::<Vec<f32>>(v["input"].clone())?),
        Some("int64") => Tensor::from_slice(&serde_json::from_value::<Vec<i64>>(v["input"].clone())?),
        other => anyhow::bail!("unexpected input dtype {other:?}"),
    }
    .reshape(&input_shape);
    let output = Tensor::from_slice(&serde_json::from_value::<Vec<f32>>(v["output"].clone())?).reshape(shape("output_shape")?);
    let layers = serde_json::from_value(v["layers"].clone())?;
    Ok(Reference { input, output, layers })
}

fn max_abs_diff(a: &Tensor, b: &Tensor) -> f64 {
    (a - b).abs().max().double_value(&[])
}

fn load(stem: &str) -> Result<(TorchScriptModel, Reference)> {
    let r = reference(stem)?;
    let m = TorchScriptModel::load(&fixture(&format!("{stem}.pt")), &r.input)?;
    Ok((m, r))
}

#[test]
fn cnn_layers_match_pytorch_hooks() -> Result<()> {
    let (m, r) = load("tiny_cnn")?;
    assert_eq!(m.layers(), r.layers.as_slice(), "layers differ from the PyTorch forward hooks");
    assert_eq!(m.input_shape(), &[1, 8, 8]);
    assert_eq!(m.input_kind(), Kind::Float);
    assert_eq!(m.num_classes(), 10);
    assert!(m.name().ends_with("tiny_cnn.pt"));
    let names: Vec<String> = m.named_parameters().into_iter().map(|(n, _)| n).collect();
    assert_eq!(
        names,
        [
            "features.0.weight",
            "features.0.bias",
            "features.2.weight",
            "features.2.bias",
            "classifier.0.weight",
            "classifier.0.bias",
            "classifier.2.weight",
            "classifier.2.bias"
        ]
    );
    Ok(())
}

#[test]
fn embedding_layers_match_pytorch_hooks() -> Result<()> {
    // Traced (not scripted), int64 token ids, an embedding, a per-token linear (MACs = T·in·out),
    // and a LayerNorm whose rank-1 weight is not a layer.
    let (m, r) = load("tiny_embed")?;
    assert_eq!(m.layers(), r.layers.as_slice(), "layers differ from the PyTorch forward hooks");
    assert_eq!(m.input_kind(), Kind::Int64);
    assert_eq!(m.input_shape(), &[6]);
    assert_eq!(m.num_classes(), 5);
    Ok(())
}

#[test]
fn loops_branches_grouped_conv_and_matmul_match_pytorch_hooks() -> Result<()> {
    // Scripted: a grouped conv, `x @ weight.t()` (aten::matmul on a transposed view), a linear
    // applied twice in a loop (MACs twice), and `alt` on a branch the sample does not take (0 MACs).
    let (m, r) = load("tiny_misc")?;
    assert_eq!(m.layers(), r.layers.as_slice(), "layers differ from the PyTorch forward hooks");
    Ok(())
}

#[test]
fn forward_matches_pytorch() -> Result<()> {
    for stem in ["tiny_cnn", "tiny_embed", "tiny_misc"] {
        let (m, r) = load(stem)?;
        let out = m.forward(&r.input)?;
        assert_eq!(out.size(), r.output.size());
        let d = max_abs_diff(&out, &r.output);
        assert!(d <= FORWARD_TOL, "{stem}: max |ours - pytorch| = {d:e} > {FORWARD_TOL:e}");
    }
    Ok(())
}

#[test]
fn in_place_weight_rewrite_changes_the_model() -> Result<()> {
    let (m, r) = load("tiny_cnn")?;
    let before = m.forward(&r.input)?.detach();
    for layer in ["features.2", "classifier.0"] {
        let w = m.weight(layer)?;
        let saved = w.detach().copy();
        tch::no_grad(|| {
            let mut w = w.shallow_clone();
            w.copy_(&(&saved * 0.5));
        });
        let changed = m.forward(&r.input)?.detach();
        assert!(max_abs_diff(&changed, &before) > 1e-4, "rewriting {layer} did not change the output");
        tch::no_grad(|| {
            let mut w = w.shallow_clone();
            w.copy_(&saved);
        });
        let restored = m.forward(&r.input)?.detach();
        assert!(restored.equal(&before), "restoring {layer} did not restore the output exactly");
    }
    Ok(())
}

#[test]
fn hessian_vector_product_through_torchscript() -> Result<()> {
    let (m, r) = load("tiny_cnn")?;
    let params: Vec<Tensor> = m.named_parameters().into_iter().map(|(_, t)| t).collect();
    assert!(params.iter().all(|p| p.requires_grad()), "TorchScript parameters must require grad");
    let labels = Tensor::from_slice(&[0i64, 3, 7, 9]);
    let l = loss(&m.forward(&r.input)?, Target::Labels(&labels));
    let grads = Tensor::run_backward(&[&l], &params, true, true);
    tch::manual_seed(0);
    let v: Vec<Tensor> = params.iter().map(|p| Tensor::randn(p.size(), (Kind::Float, p.device()))).collect();
    let dot = grads.iter().zip(&v).map(|(g, v)| (g * v).sum(Kind::Float)).fold(Tensor::from(0f32), |a, b| a + b);
    let hv = Tensor::run_backward(&[&dot], &params, false, false);
    let norm: f64 = hv.iter().map(|h| h.square().sum(Kind::Double).double_value(&[])).sum::<f64>().sqrt();
    assert!(norm.is_finite() && norm > 0.0, "‖Hv‖ = {norm}");
    Ok(())
}

#[test]
fn activation_quantization_is_refused_clearly() -> Result<()> {
    let (m, _) = load("tiny_cnn")?;
    assert!(!m.supports_activation_quant());
    let err = m.set_activation_quant("features.0", None).expect_err("TorchScript has no activation hooks").to_string();
    assert!(err.contains("TorchScript") && err.contains("features.0"), "{err}");
    Ok(())
}

#[test]
fn missing_file_names_the_path() {
    let path = fixture("no_such_model.pt");
    let err = TorchScriptModel::load(&path, &Tensor::zeros([2, 1, 8, 8], (Kind::Float, tch::Device::Cpu))).expect_err("missing file");
    let msg = err.to_string();
    assert!(matches!(err, mixq::Error::Model { .. }), "{msg}");
    assert!(msg.contains(&path.display().to_string()), "{msg}");
}

#[test]
fn non_torchscript_file_names_the_path() {
    let path = fixture("make_fixture.py");
    let err = TorchScriptModel::load(&path, &Tensor::zeros([2, 1, 8, 8], (Kind::Float, tch::Device::Cpu))).expect_err("not an archive");
    let msg = err.to_string();
    assert!(matches!(err, mixq::Error::Model { .. }), "{msg}");
    assert!(msg.contains(&path.display().to_string()) && msg.contains("not a TorchScript archive"), "{msg}");
    assert!(msg.len() < 800, "message not shortened: {msg}");
}

#[test]
fn wrong_sample_shape_names_the_path_and_the_cause() {
    let path = fixture("tiny_cnn.pt");
    // 3 channels where the first conv wants 1.
    let err = TorchScriptModel::load(&path, &Tensor::zeros([2, 3, 8, 8], (Kind::Float, tch::Device::Cpu))).expect_err("bad shape");
    let msg = err.to_string();
    assert!(matches!(err, mixq::Error::Model { .. }), "{msg}");
    assert!(msg.contains(&path.display().to_string()) && msg.contains("[2, 3, 8, 8]") && msg.contains("channels"), "{msg}");
    assert!(!msg.contains("Traceback") && msg.len() < 800, "message not shortened: {msg}");
    // Token ids into the image model: a dtype error, also reported.
    let err = TorchScriptModel::load(&path, &Tensor::zeros([2, 1, 8, 8], (Kind::Int64, tch::Device::Cpu))).expect_err("bad dtype");
    assert!(err.to_string().contains(&path.display().to_string()), "{err}");
}

#[test]
fn forward_on_a_wrong_batch_is_an_error_not_a_panic() -> Result<()> {
    let (m, _) = load("tiny_cnn")?;
    let err = m.forward(&Tensor::zeros([2, 1, 5], (Kind::Float, tch::Device::Cpu))).expect_err("bad batch");
    assert!(err.to_string().contains("tiny_cnn.pt"), "{err}");
    Ok(())
}
