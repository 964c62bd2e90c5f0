//! Integration tests of the native zoo model `digits-resnet`: training reaches the accuracy the
//! demo relies on, the weight cache round-trips, training is deterministic, the layer table is
//! consistent with the parameters, and second derivatives flow through the forward pass.

use mixq::model::data::Dataset;
use mixq::model::zoo::{self, DigitsResNet};
use mixq::model::{loss, LayerKind, QuantModel, Target};
use mixq::quant::{fake_quantize, Format, Granularity, QuantSpec};
use std::path::PathBuf;
use tch::{Kind, Tensor};

/// The FP32 accuracy the demo needs on digits:test.
const MIN_TEST_ACCURACY: f64 = 0.95;

struct TempDir(PathBuf);

impl TempDir {
    fn new(tag: &str) -> TempDir {
        let d = std::env::temp_dir().join(format!("mixq-zoo-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        TempDir(d)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn accuracy(m: &dyn QuantModel, d: &Dataset) -> f64 {
    let mut correct = 0i64;
    tch::no_grad(|| {
        for (x, y) in d.batches(256) {
            let pred = m.forward(&x).unwrap().argmax(-1, false);
            correct += i64::try_from(pred.eq_tensor(&y.unwrap()).sum(Kind::Int64)).unwrap();
        }
    });
    correct as f64 / d.len() as f64
}

/// One test, so the two trainings do not compete for the CPU with each other: train into a
/// fresh cache, load from the cache, train again into a second cache, compare.
#[test]
fn trains_to_accuracy_caches_and_is_deterministic() {
    let a = TempDir::new("a");
    let t0 = std::time::Instant::now();
    let trained = zoo::load("digits-resnet", Some(&a.0)).unwrap();
    eprintln!("training took {:.1} s", t0.elapsed().as_secs_f64());
    let cache = DigitsResNet::cache_path(&a.0);
    assert!(cache.exists(), "cache file {} written", cache.display());
    let leftovers: Vec<_> =
        std::fs::read_dir(&a.0).unwrap().filter_map(|e| e.ok()).filter(|e| e.file_name().to_string_lossy().starts_with(".tmp-")).collect();
    assert!(leftovers.is_empty(), "no temporary files left behind");

    let test = Dataset::load_for("digits:test", trained.as_ref()).unwrap();
    let acc = accuracy(trained.as_ref(), &test);
    eprintln!("digits-resnet FP32 accuracy on digits:test: {:.2}%", 100.0 * acc);
    assert!(acc >= MIN_TEST_ACCURACY, "accuracy {acc} < {MIN_TEST_ACCURACY}");

    let t1 = std::time::Instant::now();
    let cached = zoo::load("digits-resnet", Some(&a.0)).unwrap();
    assert!(t1.elapsed().as_secs_f64() < 5.0, "second load reads the cache");
    assert_eq!(cached.weights_hash(), trained.weights_hash());
    assert_eq!(accuracy(cached.as_ref(), &test), acc);

    // Layers differ in sensitivity: quantize one layer at a time to int2 per channel.
    let mut drops = Vec::new();
    for l in trained.layers() {
        let mut w = trained.weight(&l.name).unwrap();
        let saved = w.detach().copy();
        let spec = QuantSpec::new(Format::Int { bits: 2, signed: true }, Granularity::PerChannel);
        let q = fake_quantize(&saved, &spec).unwrap();
        tch::no_grad(|| w.copy_(&q));
        let drop = acc - accuracy(trained.as_ref(), &test);
        tch::no_grad(|| w.copy_(&saved));
        eprintln!("{:<24} {:>8} params  int2/channel accuracy drop {:>6.2} pp", l.name, l.params, 100.0 * drop);
        drops.push(drop);
    }
    assert_eq!(accuracy(trained.as_ref(), &test), acc, "weights restored");
    let (lo, hi) = drops.iter().fold((f64::MAX, f64::MIN), |(lo, hi), &d| (lo.min(d), hi.max(d)));
    assert!(hi - lo > 0.01, "layers differ in sensitivity: drops {drops:?}");

    let b = TempDir::new("b");
    let again = zoo::load("digits-resnet", Some(&b.0)).unwrap();
    assert_eq!(again.weights_hash(), trained.weights_hash(), "two trainings give identical weights");
}

#[test]
fn layers_match_parameters() {
    let m = DigitsResNet::untrained();
    let layers = m.layers();
    assert!(layers.len() >= 8, "{} layers", layers.len());
    let names: std::collections::HashSet<&str> = layers.iter().map(|l| l.name.as_str()).collect();
    assert_eq!(names.len(), layers.len(), "unique FQNs");
    let params: std::collections::HashMap<String, Tensor> = m.named_parameters().into_iter().collect();
    for l in layers {
        let w = params.get(&format!("{}.weight", l.name)).unwrap_or_else(|| panic!("no parameter {}.weight", l.name));
        assert_eq!(w.size(), l.shape, "{}", l.name);
        assert_eq!(l.params, w.numel() as i64);
        assert!(l.macs >= l.params);
        assert_eq!(m.weight(&l.name).unwrap().size(), l.shape);
    }
    assert_eq!(layers.first().unwrap().name, "stem.conv");
    assert_eq!(layers.last().unwrap().kind, LayerKind::Linear);
    let widths: std::collections::BTreeSet<i64> = layers.iter().map(|l| l.shape[0]).collect();
    assert!(widths.len() >= 3, "varied widths {widths:?}");
}

#[test]
fn bad_weight_files_are_errors() {
    let dir = TempDir::new("bad");
    std::fs::create_dir_all(&dir.0).unwrap();
    let p = dir.0.join("garbage.safetensors");
    std::fs::write(&p, b"not a safetensors file").unwrap();
    let e = DigitsResNet::from_safetensors(&p).unwrap_err().to_string();
    assert!(e.contains("garbage.safetensors"), "{e}");
    let e = zoo::load("resnet18", Some(&dir.0)).err().unwrap().to_string();
    assert!(e.contains("digits-resnet"), "{e}");
}

#[test]
fn activation_quant_hooks_and_second_derivatives() {
    let m = DigitsResNet::untrained();
    assert!(m.supports_activation_quant());
    for l in m.layers() {
        m.set_activation_quant(&l.name, Some(Format::Int { bits: 8, signed: false })).unwrap();
    }
    let e = m.set_activation_quant("layer9.conv", Some(Format::Fp8E4M3)).unwrap_err().to_string();
    assert!(e.contains("unknown layer"), "{e}");

    let d = Dataset::load("digits:calib").unwrap().take(16);
    let plain = DigitsResNet::untrained();
    let coarse = DigitsResNet::untrained();
    coarse.set_activation_quant("layer1.0.conv1", Some(Format::Int { bits: 2, signed: false })).unwrap();
    let (a, b) = tch::no_grad(|| (plain.forward(&d.x).unwrap(), coarse.forward(&d.x).unwrap()));
    assert!(f64::try_from((a - b).abs().max()).unwrap() > 0.0, "2-bit activations change the logits");

    let logits = m.forward(&d.x).unwrap();
    assert_eq!(logits.size(), [16, 10]);
    let l = loss::loss(&logits, Target::Labels(d.y.as_ref().unwrap()));
    let w = m.weight("layer2.0.conv2").unwrap();
    // Hessian-vector product: grad, dot with a probe, grad again.
    let g = Tensor::run_backward(&[&l], &[&w], true, true).pop().unwrap();
    let v = Tensor::ones_like(&w);
    let hv = Tensor::run_backward(&[&(&g * &v).sum(Kind::Float)], &[&w], false, false).pop().unwrap();
    assert_eq!(hv.size(), w.size());
    assert!(f64::try_from(hv.abs().sum(Kind::Float)).unwrap().is_finite());
    for l in m.layers() {
        m.set_activation_quant(&l.name, None).unwrap();
    }
}
