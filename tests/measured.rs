//! The measured-ΔL estimator on several workers: model replicas are deep and faithful copies, the
//! parallel estimator gives the serial numbers bit for bit (native and TorchScript models), a
//! failing pass names its layer and format, and zero workers are rejected.

mod common;

use anyhow::Result;
use mixq::model::data::Dataset;
use mixq::model::torchscript::TorchScriptModel;
use mixq::model::zoo::DigitsResNet;
use mixq::model::ResolvedLayer;
use mixq::model::{LayerInfo, LayerKind, QuantModel};
use mixq::quant::{Format, Granularity, QuantSpec};
use mixq::sensitivity::proxies::{measured_delta_loss, measured_delta_loss_auto, measured_delta_loss_jobs};
use mixq::sensitivity::{estimate_with, Curvature, Estimator, HvpEngine, RunOptions, SensitivitySettings};
use std::path::Path;
use tch::Tensor;

/// Calibration batch size of these tests: 179 digits:calib samples in batches of 64, 64, 51, so
/// that the batch weighting is exercised.
const BATCH: usize = 64;

fn specs() -> Vec<QuantSpec> {
    [Format::Int { bits: 2, signed: true }, Format::Int { bits: 4, signed: true }, Format::Int { bits: 8, signed: true }, Format::Fp32]
        .into_iter()
        .map(|f| QuantSpec::new(f, Granularity::PerChannel))
        .collect()
}

fn fixture(name: &str) -> std::path::PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures").join(name)
}

/// Serial and parallel ΔL of `model` on `data`, compared bit for bit; also checks that
/// libtorch's thread count is put back.
fn check_parallel_equals_serial(model: &dyn QuantModel, data: &Dataset, jobs: usize) -> Result<()> {
    let engine = HvpEngine::new(model, data, BATCH, Curvature::Hessian)?;
    let specs = specs();
    let threads = tch::get_num_threads();
    let serial = measured_delta_loss(&engine, &specs)?;
    let parallel = measured_delta_loss_jobs(&engine, &specs, jobs)?;
    assert_eq!(tch::get_num_threads(), threads, "libtorch's thread count is restored");
    // Whichever way the automatic choice goes (it depends on the machine's speed), same numbers.
    assert_eq!(measured_delta_loss_auto(&engine, &specs, jobs)?, serial);
    assert_eq!(serial.len(), model.layers().len());
    for ((layer, s), p) in model.layers().iter().zip(&serial).zip(&parallel) {
        for ((spec, a), b) in specs.iter().zip(s).zip(p) {
            assert!(
                a.to_bits() == b.to_bits(),
                "{} layer {} at {}: serial {a:e}, parallel ({jobs} jobs) {b:e}, difference {:e} (expected none)",
                model.name(),
                layer.name,
                spec.format,
                b - a
            );
        }
        assert_eq!(s.last(), Some(&0.0), "{}: fp32 changes nothing", layer.name);
        assert!(s[0] != 0.0, "{}: int2 changes the loss", layer.name);
    }
    Ok(())
}

#[test]
fn parallel_equals_serial_native() -> Result<()> {
    let model = DigitsResNet::untrained();
    let data = Dataset::digits("calib")?;
    model.replicate()?;
    // Two workers (the cores of the project's machines) and an odd three.
    check_parallel_equals_serial(&model, &data, 2)?;
    check_parallel_equals_serial(&model, &data, 3)
}

#[test]
fn parallel_equals_serial_torchscript() -> Result<()> {
    let data = Dataset::digits("calib")?;
    let model = TorchScriptModel::load(&fixture("tiny_cnn.pt"), &data.x.narrow(0, 0, 4))?;
    model.replicate()?;
    check_parallel_equals_serial(&model, &data, 2)
}

#[test]
fn parallel_equals_serial_without_labels() -> Result<()> {
    // KL to the FP32 logits: the workers get the teacher logits of the engine's model.
    let model = DigitsResNet::untrained();
    let calib = Dataset::digits("calib")?;
    let data = Dataset { name: "digits:calib (no labels)".into(), x: calib.x.shallow_clone(), y: None };
    check_parallel_equals_serial(&model, &data, 2)
}

fn quantize_plan(layer: &LayerInfo) -> [ResolvedLayer; 1] {
    let spec = QuantSpec::new(Format::Int { bits: 2, signed: true }, Granularity::PerChannel);
    [ResolvedLayer { layer: layer.clone(), weight: spec, activation: None, source: "test".into() }]
}

/// Replicas copy the model as it is now and are independent of it afterwards.
fn check_replica(model: &dyn QuantModel, x: &Tensor) -> Result<()> {
    let layer = model.layers()[1].clone();
    let w = model.weight(&layer.name)?.detach().copy();
    let y = tch::no_grad(|| model.forward(x))?;
    // A faithful copy: same weights, same outputs.
    let replica = model.replicate()?;
    assert_eq!(replica.name(), model.name());
    assert_eq!(replica.layers(), model.layers());
    assert!(replica.weight(&layer.name)?.equal(&w));
    assert!(tch::no_grad(|| replica.forward(x))?.equal(&y), "{}: the replica's outputs differ", model.name());
    // Quantizing the replica leaves the model unchanged.
    let applied = mixq::model::apply(replica.as_ref(), &quantize_plan(&layer))?;
    assert!(!replica.weight(&layer.name)?.equal(&w), "int2 changes the weight");
    assert!(model.weight(&layer.name)?.equal(&w), "{}: quantizing the replica changed the model", model.name());
    assert!(tch::no_grad(|| model.forward(x))?.equal(&y));
    applied.restore();
    // A replica of a modified model has the modification, and keeps it when the model is restored.
    let applied = mixq::model::apply(model, &quantize_plan(&layer))?;
    let wq = model.weight(&layer.name)?.detach().copy();
    let replica = model.replicate()?;
    applied.restore();
    assert!(model.weight(&layer.name)?.equal(&w));
    assert!(replica.weight(&layer.name)?.equal(&wq), "{}: the replica lost the quantized weight", model.name());
    // A replica moves to another thread and runs there.
    let xs = x.copy();
    let out = std::thread::spawn(move || -> mixq::Result<Vec<i64>> { Ok(tch::no_grad(|| replica.forward(&xs))?.size()) })
        .join()
        .map_err(|_| anyhow::anyhow!("replica thread panicked"))??;
    assert_eq!(out, y.size());
    Ok(())
}

#[test]
fn replicas_are_independent_copies() -> Result<()> {
    let data = Dataset::digits("calib")?;
    let x = data.x.narrow(0, 0, 16);
    check_replica(&DigitsResNet::untrained(), &x)?;
    check_replica(&TorchScriptModel::load(&fixture("tiny_cnn.pt"), &data.x.narrow(0, 0, 4))?, &x)
}

/// A two-layer linear classifier whose forward pass fails once layer `b` is quantized, and
/// which replicates (so that the failure happens in a worker).
struct Faulty {
    layers: Vec<LayerInfo>,
    params: Vec<(String, Tensor)>,
    b_fp32: Tensor,
}

impl Faulty {
    fn new() -> Faulty {
        let mut rng = mixq::util::SplitMix64(3);
        let mk = |name: &str, shape: Vec<i64>| LayerInfo {
            name: name.into(),
            kind: LayerKind::Linear,
            params: shape.iter().product(),
            macs: 0,
            shape,
        };
        let layers = vec![mk("a", vec![16, 64]), mk("b", vec![10, 16])];
        let params: Vec<(String, Tensor)> = layers
            .iter()
            .map(|l| {
                let t = Tensor::from_slice(&rng.normals(l.params as usize, 0.3)).reshape(&l.shape).set_requires_grad(true);
                (format!("{}.weight", l.name), t)
            })
            .collect();
        let b_fp32 = params[1].1.detach().copy();
        Faulty { layers, params, b_fp32 }
    }
}

impl QuantModel for Faulty {
    test_model_basics!("faulty", [1, 8, 8], 10);
    fn forward(&self, x: &Tensor) -> mixq::Result<Tensor> {
        if !self.params[1].1.detach().equal(&self.b_fp32) {
            return Err(mixq::Error::Unsupported("cannot run with a quantized `b`".into()));
        }
        Ok(x.flatten(1, -1).matmul(&self.params[0].1.tr()).tanh().matmul(&self.params[1].1.tr()))
    }
    fn replicate(&self) -> mixq::Result<Box<dyn QuantModel + Send>> {
        Ok(Box::new(Faulty {
            layers: self.layers.clone(),
            params: self.params.iter().map(|(n, t)| (n.clone(), t.detach().copy().set_requires_grad(true))).collect(),
            b_fp32: self.b_fp32.copy(),
        }))
    }
}

#[test]
fn a_failing_pass_names_layer_and_format() -> Result<()> {
    let model = Faulty::new();
    let data = Dataset::digits("calib")?;
    let engine = HvpEngine::new(&model, &data, BATCH, Curvature::Hessian)?;
    let threads = tch::get_num_threads();
    for jobs in [1, 2] {
        let err = measured_delta_loss_jobs(&engine, &specs(), jobs).unwrap_err().to_string();
        assert!(err.contains("layer `b` at int2") && err.contains("quantized `b`"), "jobs {jobs}: {err}");
        assert_eq!(tch::get_num_threads(), threads, "libtorch's thread count is restored after an error");
    }
    // The model is left unquantized.
    assert!(model.params[1].1.detach().equal(&model.b_fp32));
    Ok(())
}

#[test]
fn zero_jobs_is_rejected() -> Result<()> {
    let model = Faulty::new();
    let data = Dataset::digits("calib")?;
    let settings = SensitivitySettings { estimators: vec![Estimator::Measured], ..Default::default() };
    let err = estimate_with(&model, &data, &settings, &RunOptions { jobs: 0, ..Default::default() }, &mut |_| {}).unwrap_err();
    assert!(err.to_string().contains("--jobs"), "{err}");
    let engine = HvpEngine::new(&model, &data, BATCH, Curvature::Hessian)?;
    let err = measured_delta_loss_jobs(&engine, &specs(), 0).unwrap_err();
    assert!(err.to_string().contains("--jobs"), "{err}");
    // The CLI checks before loading anything.
    let home = std::env::temp_dir().join(format!("mixq-measured-{}", std::process::id()));
    let out = common::mixq(&["sensitivity", "--estimator", "measured", "--jobs", "0"], &home);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && stderr.contains("--jobs"), "{stderr}");
    Ok(())
}

/// digits-resnet without `replicate` (the trait's default: cannot be replicated).
struct Plain(DigitsResNet);

impl QuantModel for Plain {
    fn name(&self) -> &str {
        self.0.name()
    }
    fn layers(&self) -> &[LayerInfo] {
        self.0.layers()
    }
    fn input_shape(&self) -> &[i64] {
        self.0.input_shape()
    }
    fn num_classes(&self) -> i64 {
        self.0.num_classes()
    }
    fn named_parameters(&self) -> Vec<(String, Tensor)> {
        self.0.named_parameters()
    }
    fn forward(&self, x: &Tensor) -> mixq::Result<Tensor> {
        self.0.forward(x)
    }
}

#[test]
fn unreplicable_models_run_serially() -> Result<()> {
    let model = Plain(DigitsResNet::untrained());
    let err = model.replicate().err().map(|e| e.to_string()).unwrap_or_default();
    assert!(err.contains("cannot be replicated"), "{err}");
    let data = Dataset::digits("calib")?;
    let engine = HvpEngine::new(&model, &data, BATCH, Curvature::Hessian)?;
    let specs = &specs()[..2];
    let a = measured_delta_loss(&engine, specs)?;
    let b = measured_delta_loss_jobs(&engine, specs, 2)?;
    assert_eq!(a, b);
    Ok(())
}
