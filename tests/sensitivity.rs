//! The sensitivity engine against exact curvature: on models small enough to form each layer's
//! Hessian block by autograd (one product per weight), every estimated trace must lie within the
//! estimator's stated error bars and the power iteration must find the top eigenvalue; plus the
//! relations the products must satisfy (symmetry, batching, Hessian = GGN at the FP32 teacher)
//! and byte-identical reports for equal seeds.

use anyhow::Result;
use mixq::model::data::Dataset;
use mixq::model::torchscript::TorchScriptModel;
use mixq::model::zoo::DigitsResNet;
use mixq::model::{LayerInfo, LayerKind, QuantModel};
use mixq::quant::Format;
use mixq::sensitivity::{
    estimate, hutchinson, hutchpp, stats::rademacher, top_eigenvalues, Curvature, EigenSettings, Estimator, HvpEngine, SensitivitySettings,
    TraceSettings,
};
use std::path::Path;
use tch::{Kind, Tensor};

/// A test passes when |estimate − exact| ≤ this many standard errors. The estimator's own stop
/// uses a 95 % interval (≈2 s.e.); 4 s.e. keeps the test from failing by chance (p < 1e-4 per
/// layer and seed for a near-normal mean) while still catching any bias larger than a few s.e.
const CI_SIGMAS: f64 = 4.0;
/// Relative tolerance of the power iteration's top eigenvalue.
const EIGEN_REL_TOL: f64 = 1e-2;
/// Relative agreement of two computations of the same product in float32.
const PRODUCT_REL_TOL: f64 = 1e-4;

/// A two-layer MLP on the 64 digits pixels (64→16→10, tanh): 1,184 weights, small enough for
/// exact Hessian blocks, smooth so that its Hessian is not piecewise constant.
struct Mlp {
    layers: Vec<LayerInfo>,
    params: Vec<(String, Tensor)>,
}

impl Mlp {
    fn new(seed: i64) -> Self {
        // mixq's own generator, not libtorch's global one: tests run in parallel threads, and a
        // shared generator would give each run different weights.
        let rng = std::cell::RefCell::new(mixq::util::SplitMix64(seed as u64));
        let mk = |name: &str, shape: Vec<i64>| LayerInfo {
            name: name.into(),
            kind: LayerKind::Linear,
            params: shape.iter().product(),
            macs: shape.iter().product(),
            shape,
        };
        let layers = vec![mk("fc1", vec![16, 64]), mk("fc2", vec![10, 16])];
        let p = |shape: &[i64], scale: f64| {
            let n: i64 = shape.iter().product();
            let mut r = rng.borrow_mut();
            // Box–Muller normals.
            let v: Vec<f32> = (0..n)
                .map(|_| {
                    let (u1, u2) = (r.next_f64().max(1e-300), r.next_f64());
                    ((-2.0 * u1.ln()).sqrt() * (2.0 * std::f64::consts::PI * u2).cos() * scale) as f32
                })
                .collect();
            Tensor::from_slice(&v).reshape(shape).set_requires_grad(true)
        };
        let params = vec![
            ("fc1.weight".to_string(), p(&[16, 64], 0.3)),
            ("fc1.bias".to_string(), p(&[16], 0.1)),
            ("fc2.weight".to_string(), p(&[10, 16], 0.5)),
            ("fc2.bias".to_string(), p(&[10], 0.1)),
        ];
        Mlp { layers, params }
    }
}

impl QuantModel for Mlp {
    fn name(&self) -> &str {
        "test-mlp"
    }
    fn layers(&self) -> &[LayerInfo] {
        &self.layers
    }
    fn input_shape(&self) -> &[i64] {
        &[1, 8, 8]
    }
    fn num_classes(&self) -> i64 {
        10
    }
    fn named_parameters(&self) -> Vec<(String, Tensor)> {
        self.params.iter().map(|(n, t)| (n.clone(), t.shallow_clone())).collect()
    }
    fn forward(&self, x: &Tensor) -> mixq::Result<Tensor> {
        let p = |i: usize| &self.params[i].1;
        let h = x.flatten(1, -1).linear(p(0), Some(p(1))).tanh();
        Ok(h.linear(p(2), Some(p(3))))
    }
}

fn calib(n: usize) -> Result<Dataset> {
    Ok(Dataset::digits("calib")?.take(n))
}

fn unlabeled(d: &Dataset) -> Dataset {
    Dataset { name: format!("{} (no labels)", d.name), x: d.x.shallow_clone(), y: None }
}

/// Exact trace and eigenvalue of largest magnitude of every layer's block.
fn exact(engine: &HvpEngine<'_>) -> Result<Vec<(f64, f64)>> {
    let mut out = Vec::new();
    for i in 0..engine.layers().len() {
        let h = engine.exact_block(i)?;
        let tr = h.trace().double_value(&[]);
        let ev = h.linalg_eigvalsh("L");
        let (lo, hi) = (ev.min().double_value(&[]), ev.max().double_value(&[]));
        out.push((tr, if hi.abs() >= lo.abs() { hi } else { lo }));
    }
    Ok(out)
}

fn check_traces(what: &str, engine: &HvpEngine<'_>, exact: &[(f64, f64)], seeds: std::ops::Range<u64>) -> Result<()> {
    for seed in seeds {
        let s = TraceSettings { seed, tol: 0.05, max_probes: 300, ..Default::default() };
        for (name, r) in [("hutchinson", hutchinson(engine, &s, &mut |_| {})?), ("hutchpp", hutchpp(engine, &s, &mut |_| {})?)] {
            for ((l, t), (tr, _)) in engine.layers().iter().zip(&r.layers).zip(exact) {
                let err = (t.trace - tr).abs();
                assert!(
                    err <= CI_SIGMAS * t.std_err + 1e-9 * tr.abs(),
                    "{what} {name} seed {seed} layer {}: estimate {:.6} ± {:.6} (s.e.), exact {tr:.6}, error {err:.6} > {CI_SIGMAS} s.e.",
                    l.name,
                    t.trace,
                    t.std_err
                );
                assert!(t.std_err.is_finite() && t.probes >= s.min_probes, "{what} {name}: {} probes", t.probes);
            }
        }
    }
    Ok(())
}

#[test]
fn mlp_traces_and_eigenvalues_match_exact_hessian() -> Result<()> {
    let model = Mlp::new(1);
    let data = calib(64)?;
    for (curvature, seeds) in [(Curvature::Hessian, 0..3), (Curvature::Ggn, 10..12)] {
        let engine = HvpEngine::new(&model, &data, 32, curvature)?;
        let ex = exact(&engine)?;
        check_traces(&format!("mlp {curvature}"), &engine, &ex, seeds)?;
        let eig = top_eigenvalues(&engine, &EigenSettings { tol: 1e-7, max_iters: 500, seed: 0 })?;
        for ((l, e), (_, top)) in engine.layers().iter().zip(&eig).zip(&ex) {
            let rel = (e.value - top).abs() / top.abs();
            assert!(rel <= EIGEN_REL_TOL, "mlp {curvature} layer {}: power iteration {} vs exact {top} (rel {rel:.2e})", l.name, e.value);
        }
    }
    Ok(())
}

#[test]
fn ggn_blocks_are_positive_semidefinite() -> Result<()> {
    let model = Mlp::new(2);
    let data = calib(64)?;
    let engine = HvpEngine::new(&model, &data, 64, Curvature::Ggn)?;
    for i in 0..engine.layers().len() {
        let ev = engine.exact_block(i)?.linalg_eigvalsh("L");
        let (lo, hi) = (ev.min().double_value(&[]), ev.max().double_value(&[]));
        assert!(lo >= -1e-5 * hi, "GGN block {i}: smallest eigenvalue {lo}, largest {hi}");
    }
    Ok(())
}

fn rel_diff(a: &[Tensor], b: &[Tensor]) -> f64 {
    let num: f64 = a.iter().zip(b).map(|(x, y)| (x - y).square().sum(Kind::Double).double_value(&[])).sum();
    let den: f64 = a.iter().map(|x| x.square().sum(Kind::Double).double_value(&[])).sum();
    (num / den.max(1e-30)).sqrt()
}

#[test]
fn products_are_symmetric_batch_independent_and_hessian_equals_ggn_at_the_teacher() -> Result<()> {
    let model = Mlp::new(3);
    let data = calib(50)?;
    let whole = HvpEngine::new(&model, &data, 50, Curvature::Hessian)?;
    let batched = HvpEngine::new(&model, &data, 7, Curvature::Hessian)?;
    let shapes = whole.shapes();
    let u = rademacher(&shapes, 9, 99, 0);
    let v = rademacher(&shapes, 9, 99, 1);
    let hv = whole.hvp(&v)?;
    let hu = whole.hvp(&u)?;
    let d = |a: &[Tensor], b: &[Tensor]| -> f64 { a.iter().zip(b).map(|(x, y)| (x * y).sum(Kind::Double).double_value(&[])).sum() };
    let (uhv, vhu) = (d(&u, &hv), d(&v, &hu));
    assert!((uhv - vhu).abs() <= PRODUCT_REL_TOL * uhv.abs().max(vhu.abs()), "uᵀHv {uhv} vs vᵀHu {vhu}");
    let r = rel_diff(&hv, &batched.hvp(&v)?);
    assert!(r <= PRODUCT_REL_TOL, "batch 50 vs batches of 7: relative difference {r:.2e}");
    // Several probes sharing one graph give the same products as one at a time.
    let sc = |x: &[Tensor]| -> Vec<Tensor> { x.iter().map(Tensor::shallow_clone).collect() };
    let many = whole.hvp_many(&[sc(&u), sc(&v)])?;
    assert!(rel_diff(&hu, &many[0]) <= PRODUCT_REL_TOL && rel_diff(&hv, &many[1]) <= PRODUCT_REL_TOL);
    // Without labels the loss is KL to the FP32 logits, minimal at the FP32 model: Hessian = GGN.
    let nolabels = unlabeled(&data);
    let h = HvpEngine::new(&model, &nolabels, 16, Curvature::Hessian)?.hvp(&v)?;
    let g = HvpEngine::new(&model, &nolabels, 16, Curvature::Ggn)?.hvp(&v)?;
    let r = rel_diff(&g, &h);
    assert!(r <= 1e-3, "KL Hessian vs GGN at the teacher: relative difference {r:.2e}");
    Ok(())
}

fn fixture(name: &str) -> std::path::PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures").join(name)
}

#[test]
fn torchscript_small_layers_match_exact_hessian() -> Result<()> {
    let data = calib(64)?;
    let model = TorchScriptModel::load(&fixture("tiny_cnn.pt"), &data.x.narrow(0, 0, 4))?;
    let engine = HvpEngine::new(&model, &data, 64, Curvature::Hessian)?;
    // The two small layers (72 and 320 weights): their exact blocks are cheap.
    let small: Vec<usize> = engine.layers().iter().enumerate().filter(|(_, l)| l.params <= 400).map(|(i, _)| i).collect();
    assert_eq!(small.len(), 2);
    let s = TraceSettings { seed: 5, max_probes: 300, ..Default::default() };
    let r = hutchinson(&engine, &s, &mut |_| {})?;
    for i in small {
        let tr = engine.exact_block(i)?.trace().double_value(&[]);
        let t = &r.layers[i];
        assert!(
            (t.trace - tr).abs() <= CI_SIGMAS * t.std_err,
            "tiny_cnn layer {}: {} ± {} vs exact {tr}",
            engine.layers()[i].name,
            t.trace,
            t.std_err
        );
    }
    Ok(())
}

#[test]
fn stop_rule_is_honest() -> Result<()> {
    let model = Mlp::new(4);
    let data = calib(64)?;
    let engine = HvpEngine::new(&model, &data, 64, Curvature::Hessian)?;
    let s = TraceSettings { tol: 0.05, max_probes: 400, ..Default::default() };
    let r = hutchinson(&engine, &s, &mut |_| {})?;
    let total: f64 = r.layers.iter().map(|l| l.trace.abs()).sum();
    for l in &r.layers {
        if l.converged {
            assert!(l.ci95 <= s.tol * l.trace.abs() || l.ci95 <= s.tol_floor * total, "{l:?}");
            assert!(l.probes >= s.min_probes);
        }
    }
    assert!(r.probes <= s.max_probes && r.hvps == r.probes);
    // A budget too small to converge says so.
    let r = hutchinson(&engine, &TraceSettings { tol: 1e-6, max_probes: 12, ..Default::default() }, &mut |_| {})?;
    assert_eq!(r.probes, 12);
    assert!(r.layers.iter().all(|l| !l.converged));
    Ok(())
}

#[test]
fn same_seed_gives_identical_report_bytes() -> Result<()> {
    let model = Mlp::new(5);
    let data = calib(48)?;
    let settings = SensitivitySettings {
        estimators: vec![Estimator::Hutchinson, Estimator::Fisher, Estimator::Grad, Estimator::Measured],
        batch_size: 16,
        trace: TraceSettings { seed: 11, max_probes: 40, ..Default::default() },
        formats: vec![Format::Int { bits: 2, signed: true }, Format::Int { bits: 8, signed: true }, Format::Fp32],
        ..Default::default()
    };
    let a = estimate(&model, &data, &settings, &mut |_| {})?.to_json();
    let b = estimate(&model, &data, &settings, &mut |_| {})?.to_json();
    assert_eq!(a, b);
    let other = SensitivitySettings { trace: TraceSettings { seed: 12, ..settings.trace.clone() }, ..settings.clone() };
    let c = estimate(&model, &data, &other, &mut |_| {})?;
    assert_ne!(a, c.to_json());
    // Round trip, and the proxies' relations.
    let r = mixq::sensitivity::SensitivityReport::from_json(&a, Path::new("<test>"))?;
    assert_eq!(r.to_json(), a);
    let engine = HvpEngine::new(&model, &data, 16, Curvature::Hessian)?;
    let g = engine.gradient()?;
    for (l, g) in r.layers.iter().zip(&g) {
        assert_eq!(l.measured_delta_loss["fp32"], 0.0, "{}: quantizing to fp32 changes nothing", l.name);
        let we = &l.extra["weight_error"];
        assert!(we["int2"].as_f64().unwrap() > we["int8"].as_f64().unwrap(), "{}: {we}", l.name);
        // Jensen: the mean squared per-sample gradient is at least the squared mean gradient.
        let gn = g.square().sum(Kind::Double).double_value(&[]);
        assert!(l.fisher_trace.unwrap() >= gn * (1.0 - 1e-6), "{}: Fisher {:?} < ‖g‖² {gn}", l.name, l.fisher_trace);
    }
    assert_eq!(r.model_sha256, model.weights_hash());
    Ok(())
}

#[test]
fn zoo_model_products_work() -> Result<()> {
    let model = DigitsResNet::untrained();
    let data = calib(32)?;
    let engine = HvpEngine::new(&model, &data, 16, Curvature::Hessian)?;
    let shapes = engine.shapes();
    let (u, v) = (rademacher(&shapes, 1, 99, 0), rademacher(&shapes, 1, 99, 1));
    let hv = engine.hvp(&v)?;
    let hu = engine.hvp(&u)?;
    let d = |a: &[Tensor], b: &[Tensor]| -> f64 { a.iter().zip(b).map(|(x, y)| (x * y).sum(Kind::Double).double_value(&[])).sum() };
    let (uhv, vhu) = (d(&u, &hv), d(&v, &hu));
    assert!((uhv - vhu).abs() <= 1e-3 * uhv.abs().max(vhu.abs()), "uᵀHv {uhv} vs vᵀHu {vhu}");
    assert_eq!(engine.hvp_count(), 2);
    Ok(())
}
