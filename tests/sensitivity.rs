//! The sensitivity engine against exact curvature: on models small enough to form each layer's
//! Hessian block by autograd (one product per weight), every estimated trace must lie within the
//! estimator's stated error bars and the power iteration must find the top eigenvalue; plus the
//! relations the products must satisfy (symmetry, batching, Hessian = GGN at the FP32 teacher)
//! and byte-identical reports for equal seeds.

mod common;

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
            let v = rng.borrow_mut().normals(n as usize, scale);
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
    test_model_basics!("test-mlp", [1, 8, 8], 10);
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

// ---- Cache, resume, shards and merge (issue 3). ----

use mixq::sensitivity::{
    estimate_with, hutchinson_resumable, hutchpp_resumable, merge, Origin, RunOptions, SensitivityReport, Shard, TraceEstimate, TraceState,
};
use std::path::PathBuf;

/// Pooled shards vs one run of the same probes: the products are the same, only the order of
/// float sums (and the grouping of probes into passes) differs.
const MERGE_REL_TOL: f64 = 1e-6;

fn scratch(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("mixq-sens-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

fn close(a: f64, b: f64, tol: f64) -> bool {
    (a - b).abs() <= tol * a.abs().max(b.abs()).max(1e-30)
}

/// Settings that never stop early (tol 1e-9, no floor), so that a whole run uses every probe.
fn no_early_stop(est: Estimator, max_probes: u64) -> SensitivitySettings {
    SensitivitySettings {
        estimators: vec![est],
        batch_size: 32,
        trace: TraceSettings { seed: 7, tol: 1e-9, tol_floor: 0.0, min_probes: 2, max_probes, block: 3, sketch: 4, ..Default::default() },
        ..Default::default()
    }
}

fn with_shard(s: &SensitivitySettings, k: u64, n: u64) -> SensitivitySettings {
    SensitivitySettings { trace: TraceSettings { shard: Shard { index: k, count: n }, ..s.trace.clone() }, ..s.clone() }
}

#[test]
fn shards_merged_equal_the_whole_run() -> Result<()> {
    let model = Mlp::new(6);
    let data = calib(48)?;
    for est in [Estimator::Hutchinson, Estimator::Hutchpp] {
        let whole_settings = no_early_stop(est, 20);
        let whole = estimate(&model, &data, &whole_settings, &mut |_| {})?;
        // 20 probes in 3 shards: 7 + 7 + 6, given in scrambled order.
        let mut shards = Vec::new();
        for k in [2, 0, 1] {
            let r = estimate(&model, &data, &with_shard(&whole_settings, k, 3), &mut |_| {})?;
            assert_eq!(r.settings["probes"], serde_json::json!(Shard { index: k, count: 3 }.share(20)));
            shards.push((PathBuf::from(format!("shard{k}.json")), r));
        }
        let merged = merge(&shards)?;
        for (m, w) in merged.layers.iter().zip(&whole.layers) {
            let (mt, wt) = (m.trace.unwrap(), w.trace.unwrap());
            let (ms, ws) = (m.trace_std_err.unwrap(), w.trace_std_err.unwrap());
            assert!(close(mt, wt, MERGE_REL_TOL), "{est} layer {}: merged trace {mt} vs whole run {wt}", m.name);
            assert!(close(ms, ws, MERGE_REL_TOL), "{est} layer {}: merged s.e. {ms} vs whole run {ws}", m.name);
            let (mc, wc) = (m.extra["trace_ci95"].as_f64().unwrap(), w.extra["trace_ci95"].as_f64().unwrap());
            assert!(close(mc, wc, MERGE_REL_TOL), "{est} layer {}: merged CI {mc} vs {wc}", m.name);
            assert_eq!((m.probes, m.converged), (w.probes, w.converged), "{est} layer {}", m.name);
        }
        // The same settings as the whole run (no `shard` left); Hutch++ shards each paid the sketch.
        let mut ms = merged.settings.clone();
        let mut ws = whole.settings.clone();
        let sketch_hvps = if est == Estimator::Hutchpp { 2 * 4 } else { 0 };
        assert_eq!(ms["hvps"].as_u64().unwrap(), ws["hvps"].as_u64().unwrap() + 2 * sketch_hvps);
        ms["hvps"] = serde_json::json!(0);
        ws["hvps"] = serde_json::json!(0);
        assert_eq!(ms, ws, "{est}");
        // Order of the arguments does not matter.
        shards.reverse();
        assert_eq!(merge(&shards)?.to_json(), merged.to_json());
        // Two of three shards: a valid, smaller pool that still says which part of the run it is.
        let part = merge(&shards[..2])?;
        assert_eq!(part.settings["shard"]["count"], 3);
        assert_eq!(part.layers[0].probes, shards[0].1.layers[0].probes + shards[1].1.layers[0].probes);
        // ...and it merges with the third into the same report.
        let again = merge(&[(PathBuf::from("part.json"), part), shards[2].clone()])?;
        for (a, b) in again.layers.iter().zip(&merged.layers) {
            assert!(close(a.trace.unwrap(), b.trace.unwrap(), 1e-12) && a.probes == b.probes);
        }
    }
    Ok(())
}

#[test]
fn merge_reevaluates_the_stopping_rule() -> Result<()> {
    let model = Mlp::new(6);
    let data = calib(48)?;
    let mut s = no_early_stop(Estimator::Hutchinson, 40);
    s.trace.tol = 0.25;
    s.trace.min_probes = 30;
    let shards: Vec<(PathBuf, SensitivityReport)> = (0..2)
        .map(|k| Ok((PathBuf::from(format!("s{k}")), estimate(&model, &data, &with_shard(&s, k, 2), &mut |_| {})?)))
        .collect::<Result<_>>()?;
    // 20 probes per shard are below min_probes: no shard layer has converged; the pool of 40 can.
    assert!(shards.iter().all(|(_, r)| r.layers.iter().all(|l| !l.converged)));
    let merged = merge(&shards)?;
    let total: f64 = merged.layers.iter().map(|l| l.trace.unwrap().abs()).sum();
    for l in &merged.layers {
        let ci = l.extra["trace_ci95"].as_f64().unwrap();
        let rule = l.probes >= 30 && (ci <= 0.25 * l.trace.unwrap().abs() || ci <= s.trace.tol_floor * total);
        assert_eq!(l.converged, rule, "{}: ci {ci}, trace {:?}", l.name, l.trace);
    }
    assert!(merged.layers.iter().any(|l| l.converged), "pooled 40 probes at tol 0.25 should converge some layer: {:?}", merged.layers);
    Ok(())
}

fn expect_err<T: std::fmt::Debug>(r: mixq::Result<T>, needles: &[&str]) {
    let msg = format!("{:#}", r.expect_err("should be refused"));
    for n in needles {
        assert!(msg.contains(n), "error `{msg}` should mention `{n}`");
    }
}

#[test]
fn merge_and_shard_refuse_bad_input_with_clear_errors() -> Result<()> {
    let model = Mlp::new(6);
    let data = calib(32)?;
    let s = no_early_stop(Estimator::Hutchinson, 8);
    let shard = |s: &SensitivitySettings, m: &Mlp, k| estimate(m, &data, &with_shard(s, k, 2), &mut |_| {});
    let a = (PathBuf::from("a.json"), shard(&s, &model, 0)?);
    let b = (PathBuf::from("b.json"), shard(&s, &model, 1)?);
    expect_err(merge(&[a.clone(), a.clone()]), &["a.json", "shard 0/2", "twice"]);
    expect_err(merge(std::slice::from_ref(&a)), &["at least two"]);
    let other_seed = SensitivitySettings { trace: TraceSettings { seed: 8, ..s.trace.clone() }, ..s.clone() };
    expect_err(merge(&[a.clone(), (PathBuf::from("c.json"), shard(&other_seed, &model, 1)?)]), &["a.json", "c.json", "`seed`"]);
    expect_err(merge(&[a.clone(), (PathBuf::from("d.json"), shard(&s, &Mlp::new(9), 1)?)]), &["d.json", "model weights"]);
    let four = SensitivitySettings { trace: TraceSettings { shard: Shard { index: 1, count: 4 }, ..s.trace.clone() }, ..s.clone() };
    expect_err(merge(&[a.clone(), (PathBuf::from("e.json"), estimate(&model, &data, &four, &mut |_| {})?)]), &["e.json", "shard counts"]);
    let fisher = SensitivitySettings { estimators: vec![Estimator::Fisher], ..s.clone() };
    let f = estimate(&model, &data, &fisher, &mut |_| {})?;
    expect_err(merge(&[(PathBuf::from("f.json"), f), b.clone()]), &["f.json", "trace_stats"]);
    // Shards: syntax, range, size, and estimators.
    for (bad, why) in
        [("1/0", "at least 1"), ("3/3", "below n"), ("a/2", "whole number"), ("2", "k/n"), ("-1/3", "whole number"), ("", "k/n")]
    {
        expect_err(bad.parse::<Shard>(), &[why]);
    }
    assert_eq!("2/5".parse::<Shard>()?, Shard { index: 2, count: 5 });
    let tiny = SensitivitySettings { trace: TraceSettings { shard: Shard { index: 0, count: 5 }, ..s.trace.clone() }, ..s.clone() };
    expect_err(estimate(&model, &data, &tiny, &mut |_| {}), &["at least 10"]);
    let mixed = SensitivitySettings { estimators: vec![Estimator::Hutchinson, Estimator::Fisher], ..with_shard(&s, 0, 2) };
    expect_err(estimate(&model, &data, &mixed, &mut |_| {}), &["one trace estimator", "hutchinson,fisher"]);
    Ok(())
}

/// A resumable trace estimator: (state to resume from, checkpoint callback) → estimate.
type Resumable<'a> = dyn Fn(Option<TraceState>, &mut dyn FnMut(&TraceState) -> mixq::Result<()>) -> mixq::Result<TraceEstimate> + 'a;

/// An error returned by the checkpoint callback after `passes` passes, as a kill would stop the run.
fn interrupted(run: &Resumable<'_>, passes: usize) -> TraceState {
    let mut saved = None;
    let mut n = 0;
    let r = run(None, &mut |st| {
        saved = Some(st.to_json());
        n += 1;
        if n == passes {
            Err(mixq::Error::Unsupported("killed".into()))
        } else {
            Ok(())
        }
    });
    assert!(r.is_err(), "the run should have been interrupted");
    TraceState::from_json(&saved.unwrap(), Path::new("<checkpoint>")).unwrap()
}

#[test]
fn resumed_estimators_equal_uninterrupted_ones() -> Result<()> {
    let model = Mlp::new(7);
    let data = calib(48)?;
    let engine = HvpEngine::new(&model, &data, 16, Curvature::Hessian)?;
    let s = TraceSettings { seed: 3, tol: 0.05, max_probes: 30, block: 2, sketch: 3, ..Default::default() };
    let runs: [(&str, Box<Resumable>); 2] = [
        ("hutchinson", Box::new(|from, ck| hutchinson_resumable(&engine, &s, from, ck, &mut |_| {}))),
        ("hutchpp", Box::new(|from, ck| hutchpp_resumable(&engine, &s, from, ck, &mut |_| {}))),
    ];
    for (name, run) in &runs {
        let whole = run(None, &mut |_| Ok(()))?;
        let state = interrupted(run.as_ref(), 3);
        assert_eq!(state.probes, 6, "{name}");
        let resumed = run(Some(state), &mut |_| Ok(()))?;
        assert_eq!(resumed, whole, "{name}: resumed run differs from the uninterrupted one");
    }
    // A checkpoint of another model is refused, not misread.
    let wrong = TraceState::new(vec![0.0; 5], 0);
    expect_err(hutchinson_resumable(&engine, &s, Some(wrong), &mut |_| Ok(()), &mut |_| {}), &["5 layers"]);
    Ok(())
}

#[test]
fn reports_are_cached_by_weights_data_and_settings() -> Result<()> {
    let model = Mlp::new(8);
    let data = calib(32)?;
    let dir = scratch("cache");
    let opts = RunOptions { cache_dir: Some(dir.clone()), checkpoint_every: std::time::Duration::ZERO, ..Default::default() };
    let s = SensitivitySettings { estimators: vec![Estimator::Hutchinson], batch_size: 32, ..no_early_stop(Estimator::Hutchinson, 8) };
    let first = estimate_with(&model, &data, &s, &opts, &mut |_| {})?;
    assert_eq!(first.origin, Origin::Computed);
    assert_eq!(first.json, estimate(&model, &data, &s, &mut |_| {})?.to_json(), "the cache does not change the report");
    let second = estimate_with(&model, &data, &s, &opts, &mut |_| panic!("a cached report needs no probes"))?;
    assert_eq!(second.origin, Origin::Cached(dir.join(format!("{}.json", first.key))));
    assert_eq!(second.json, first.json);
    // No checkpoint is left behind by a finished run.
    let left: Vec<_> = std::fs::read_dir(&dir)?.filter_map(|e| e.ok()).map(|e| e.file_name().to_string_lossy().into_owned()).collect();
    assert_eq!(left, vec![format!("{}.json", first.key)]);
    // --no-cache recomputes; another seed, other weights or other data is another key.
    let fresh = estimate_with(&model, &data, &s, &RunOptions { read_cache: false, ..opts.clone() }, &mut |_| {})?;
    assert_eq!((fresh.origin, fresh.json), (Origin::Computed, first.json.clone()));
    let seed = SensitivitySettings { trace: TraceSettings { seed: 99, ..s.trace.clone() }, ..s.clone() };
    assert_eq!(estimate_with(&model, &data, &seed, &opts, &mut |_| {})?.origin, Origin::Computed);
    assert_eq!(estimate_with(&Mlp::new(9), &data, &s, &opts, &mut |_| {})?.origin, Origin::Computed);
    assert_eq!(estimate_with(&model, &calib(31)?, &s, &opts, &mut |_| {})?.origin, Origin::Computed);
    std::fs::remove_dir_all(&dir)?;
    Ok(())
}

#[test]
fn cli_killed_run_resumes_to_the_same_report_and_shards_merge() -> Result<()> {
    let dir = scratch("cli");
    let (home_a, home_b) = (dir.join("a"), dir.join("b"));
    let base = [
        "sensitivity",
        "--model",
        "tests/fixtures/tiny_cnn.pt",
        "--data",
        "digits:calib",
        "--estimator",
        "hutchinson",
        "--curvature",
        "hessian",
        "--tol",
        "1e-9",
        "--tol-floor",
        "0",
    ];
    let out = |name: &str| dir.join(name).to_string_lossy().into_owned();
    let run = |home: &Path, extra: &[&str]| -> Result<(std::process::Output, String)> {
        let o = common::mixq_command(home, &[&base[..], extra].concat()).output()?;
        let err = String::from_utf8_lossy(&o.stderr).into_owned();
        Ok((o, err))
    };
    // Kill a run (SIGKILL: no chance to clean up) as soon as it has checkpointed its first pass
    // of 4 probes (of 16).
    let ckpt_dir = home_a.join("cache/sensitivity");
    let mut child =
        common::mixq_command(&home_a, &[&base[..], &["--max-probes", "16", "--checkpoint-every", "0", "-o", &out("killed.json")]].concat())
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()?;
    let t0 = std::time::Instant::now();
    let partial = loop {
        let found = std::fs::read_dir(&ckpt_dir)
            .ok()
            .and_then(|d| d.filter_map(|e| e.ok()).map(|e| e.path()).find(|p| p.to_string_lossy().ends_with(".partial.json")));
        if let Some(p) = found {
            break p;
        }
        assert!(t0.elapsed().as_secs() < 120, "no checkpoint after 120 s");
        std::thread::sleep(std::time::Duration::from_millis(2));
    };
    child.kill()?;
    child.wait()?;
    assert!(partial.exists() && !dir.join("killed.json").exists(), "the run should have been killed mid-way");
    let (o, err) = run(&home_a, &["--max-probes", "16", "--checkpoint-every", "0", "--resume", "-o", &out("resumed.json")])?;
    assert!(o.status.success() && err.contains("resumed after"), "{err}");
    assert!(!partial.exists(), "the finished run removes its checkpoint");
    let (o, err) = run(&home_b, &["--max-probes", "16", "-o", &out("whole.json")])?;
    assert!(o.status.success(), "{err}");
    assert_eq!(std::fs::read(dir.join("resumed.json"))?, std::fs::read(dir.join("whole.json"))?, "resumed vs uninterrupted report");
    // A second identical run comes from the cache, byte for byte.
    let (o, err) = run(&home_b, &["--max-probes", "16", "-o", &out("again.json")])?;
    assert!(o.status.success() && err.contains("reusing the cached"), "{err}");
    assert_eq!(std::fs::read(dir.join("again.json"))?, std::fs::read(dir.join("whole.json"))?);
    // Shards through the CLI, and their merge.
    for k in ["0/2", "1/2"] {
        let (o, err) = run(&home_b, &["--max-probes", "8", "--shard", k, "-o", &out(&format!("shard{}.json", &k[..1]))])?;
        assert!(o.status.success(), "{err}");
    }
    let m = common::mixq_command(&home_b, &["sensitivity", "merge", &out("shard0.json"), &out("shard1.json"), "-o", &out("merged.json")])
        .output()?;
    assert!(m.status.success(), "{}", String::from_utf8_lossy(&m.stderr));
    let merged = SensitivityReport::load(&dir.join("merged.json"))?;
    assert!(merged.settings.get("shard").is_none() && merged.layers.iter().all(|l| l.probes == 8));
    // Bad input: a clear message, a failure exit, no panic, no file.
    for (args, needle) in [
        (vec!["--shard", "2/2"], "k must be below n"),
        (vec!["--shard", "x"], "expected k/n"),
        (vec!["--shard", "0/2", "--estimator", "fisher"], "one trace estimator"),
        (vec!["--checkpoint-every=-1"], "--checkpoint-every"),
    ] {
        let (o, err) = run(&home_b, &[&args[..], &["-o", &out("bad.json")]].concat())?;
        assert!(!o.status.success() && err.contains(needle) && !err.contains("panicked"), "{args:?}: {err}");
        assert!(!dir.join("bad.json").exists());
    }
    let s0 = out("shard0.json");
    let m = common::mixq_command(&home_b, &["sensitivity", "merge", &s0, &s0, "-o", &out("bad.json")]).output()?;
    let err = String::from_utf8_lossy(&m.stderr);
    assert!(!m.status.success() && err.contains("shard0.json") && err.contains("twice"), "{err}");
    std::fs::remove_dir_all(&dir)?;
    Ok(())
}

// ---- Activation sensitivity (issue 3, HAWQ-V2). ----

/// Activation traces through `estimate` on the zoo model: finite, with a standard error, for
/// every layer, next to the weight estimators; the same seed gives the same bytes; cached like
/// the other deterministic estimators; refused for shards and for TorchScript models.
#[test]
fn activation_estimator_gives_finite_traces_and_refuses_torchscript() -> Result<()> {
    let model = DigitsResNet::untrained();
    let data = calib(24)?;
    let s = SensitivitySettings {
        estimators: vec![Estimator::Fisher, Estimator::Activation],
        batch_size: 12,
        trace: TraceSettings { seed: 3, tol: 1e-9, tol_floor: 0.0, min_probes: 2, max_probes: 4, block: 2, ..Default::default() },
        ..Default::default()
    };
    let r = estimate(&model, &data, &s, &mut |_| {})?;
    assert_eq!(r.layers.len(), model.layers().len());
    for (l, info) in r.layers.iter().zip(model.layers()) {
        assert_eq!(l.name, info.name);
        let (t, se) = (l.activation_trace.expect("activation trace"), l.activation_trace_std_err.expect("its standard error"));
        assert!(t.is_finite() && se.is_finite() && se >= 0.0, "{}: trace {t} ± {se}", l.name);
        assert!(l.activation_numel.is_some_and(|n| n > 0), "{}: numel {:?}", l.name, l.activation_numel);
        assert_eq!(l.activation_probes, Some(4), "{}", l.name);
        assert_eq!(l.activation_converged, Some(false), "{}: tol 1e-9 cannot be met in 4 probes", l.name);
        assert!(l.fisher_trace.is_some_and(f64::is_finite), "{}", l.name);
        assert!(l.activation_trace_per_element().is_some_and(f64::is_finite));
    }
    // The stem sees the 1×8×8 image; the classifier its 128 pooled features.
    assert_eq!(r.layers[0].activation_numel, Some(64));
    assert_eq!(r.layers.last().and_then(|l| l.activation_numel), Some(128));
    // Same seed → same bytes; the JSON round-trips; the table shows the activation columns.
    let again = estimate(&model, &data, &s, &mut |_| {})?;
    assert_eq!(r.to_json(), again.to_json());
    assert_eq!(SensitivityReport::from_json(&r.to_json(), Path::new("r.json"))?, r);
    let table = mixq::cli::render::sensitivity(&r);
    assert!(table.contains("act trace ± 95% CI") && table.contains("act Tr/n"), "{table}");
    // Old reports (no activation fields) still load, and write no activation fields.
    let plain = estimate(&model, &data, &SensitivitySettings { estimators: vec![Estimator::Fisher], ..s.clone() }, &mut |_| {})?;
    assert!(!plain.to_json().contains("activation"), "{}", plain.to_json());
    // Cached like the other deterministic estimators.
    let dir = scratch("activation");
    let opts = RunOptions { cache_dir: Some(dir.clone()), ..Default::default() };
    let first = estimate_with(&model, &data, &s, &opts, &mut |_| {})?;
    let second = estimate_with(&model, &data, &s, &opts, &mut |_| {})?;
    assert_eq!(first.origin, Origin::Computed);
    assert!(matches!(second.origin, Origin::Cached(_)), "{:?}", second.origin);
    assert_eq!(first.json, second.json);
    assert_eq!(first.report, r);
    std::fs::remove_dir_all(&dir)?;
    // Not shardable.
    let sharded = SensitivitySettings { estimators: vec![Estimator::Activation], ..with_shard(&s, 0, 2) };
    expect_err(estimate(&model, &data, &sharded, &mut |_| {}), &["--shard", "activation", "without --shard"]);
    // TorchScript: a clear error before any work.
    let ts = TorchScriptModel::load(&fixture("tiny_cnn.pt"), &data.x.narrow(0, 0, 4))?;
    assert!(ts.input_hooks().is_none());
    let only = SensitivitySettings { estimators: vec![Estimator::Activation], ..s.clone() };
    expect_err(estimate(&ts, &data, &only, &mut |_| {}), &["activation sensitivity", "native", "TorchScript"]);
    Ok(())
}
