//! Cost-model tests: Ω from a model and a hand-made sensitivity report, negative traces clamped,
//! CSV/JSON round trips, malformed tables rejected with file, line and field.

use mixq::cost::{parse_candidates, BuildOptions, CostTable, LatencyTable, Proxy};
use mixq::model::{LayerInfo, LayerKind, QuantModel};
use mixq::quant::{fake_quantize, QuantSpec};
use mixq::sensitivity::report::{LayerSensitivity, SensitivityReport};
use std::path::Path;
use tch::{Kind, Tensor};

/// Relative tolerance of Ω against a direct computation (same ops, f64 sums).
const OMEGA_RTOL: f64 = 1e-9;

struct Tiny {
    layers: Vec<LayerInfo>,
    params: Vec<(String, Tensor)>,
}

impl Tiny {
    fn new() -> Self {
        tch::manual_seed(0);
        let shapes = [("a", vec![8i64, 16]), ("b", vec![4i64, 8])];
        let mut layers = Vec::new();
        let mut params = Vec::new();
        for (n, s) in shapes {
            let numel: i64 = s.iter().product();
            layers.push(LayerInfo { name: n.into(), kind: LayerKind::Linear, shape: s.clone(), params: numel, macs: numel });
            params.push((format!("{n}.weight"), Tensor::randn(s.as_slice(), (Kind::Float, tch::Device::Cpu))));
        }
        Tiny { layers, params }
    }
}

impl QuantModel for Tiny {
    fn name(&self) -> &str {
        "tiny"
    }
    fn layers(&self) -> &[LayerInfo] {
        &self.layers
    }
    fn input_shape(&self) -> &[i64] {
        &[16]
    }
    fn num_classes(&self) -> i64 {
        4
    }
    fn named_parameters(&self) -> Vec<(String, Tensor)> {
        self.params.iter().map(|(n, t)| (n.clone(), t.shallow_clone())).collect()
    }
    fn forward(&self, x: &Tensor) -> mixq::Result<Tensor> {
        Ok(x.matmul(&self.params[0].1.tr()).relu().matmul(&self.params[1].1.tr()))
    }
}

fn report(traces: [f64; 2]) -> SensitivityReport {
    let layer = |name: &str, params: i64, trace: f64| LayerSensitivity {
        name: name.into(),
        params,
        trace: Some(trace),
        trace_std_err: Some(0.1),
        probes: 10,
        converged: true,
        top_eigenvalue: None,
        fisher_trace: Some(2.0 * trace.abs()),
        measured_delta_loss: [("int2".to_string(), 0.5), ("int4".to_string(), 0.1), ("int8".to_string(), 0.01)].into_iter().collect(),
        extra: Default::default(),
        ..Default::default()
    };
    SensitivityReport {
        format: "mixq.sensitivity-report".into(),
        version: 1,
        model: "tiny".into(),
        model_sha256: String::new(),
        data: "none".into(),
        data_sha256: String::new(),
        settings: serde_json::json!({}),
        layers: vec![layer("a", 128, traces[0]), layer("b", 32, traces[1])],
        total_trace: None,
    }
}

#[test]
fn hessian_cost_is_trace_per_param_times_weight_error() {
    let m = Tiny::new();
    let cands = parse_candidates("int2,int4,int8,fp32").unwrap();
    let t = CostTable::build(&m, &report([12.8, 3.2]), &cands, &BuildOptions::default()).unwrap();
    assert_eq!(t.layers.len(), 2);
    for (l, tr) in t.layers.iter().zip([12.8, 3.2]) {
        let w = m.weight(&l.name).unwrap();
        for o in &l.options {
            let spec = o.format.parse::<QuantSpec>().unwrap();
            let e2 = (fake_quantize(&w, &spec).unwrap() - &w).square().sum(Kind::Double).double_value(&[]);
            let want = tr / l.params as f64 * e2;
            assert!((o.cost - want).abs() <= OMEGA_RTOL * want.abs().max(1e-30), "{} {}: {} vs {want}", l.name, o.format, o.cost);
            assert_eq!(o.bits, spec.storage_bits(&m.layers[0..2].iter().find(|x| x.name == l.name).unwrap().shape));
            assert_eq!(o.bytes, o.bits.div_ceil(8));
        }
        // Fewer bits never cost less here (min–max int grids nest poorly, but 2 < 4 < 8 holds on Gaussians).
        let c: Vec<f64> = l.options.iter().map(|o| o.cost).collect();
        assert!(c[0] > c[1] && c[1] > c[2] && c[3] == 0.0, "{c:?}");
        assert_eq!(l.options[0].bops, l.params as f64 * 2.0 * 32.0);
    }
}

#[test]
fn negative_trace_is_clamped_to_zero() {
    let m = Tiny::new();
    let t = CostTable::build(&m, &report([-1.0, 3.2]), &parse_candidates("int2,int8").unwrap(), &BuildOptions::default()).unwrap();
    assert!(t.layers[0].options.iter().all(|o| o.cost == 0.0));
    assert!(t.layers[1].options.iter().all(|o| o.cost > 0.0));
}

#[test]
fn other_proxies() {
    let m = Tiny::new();
    let c = parse_candidates("int2,int4,int8,fp32").unwrap();
    let r = report([12.8, 3.2]);
    let measured = CostTable::build(&m, &r, &c, &BuildOptions { proxy: Proxy::Measured, ..Default::default() }).unwrap();
    assert_eq!(measured.layers[0].options.iter().map(|o| o.cost).collect::<Vec<_>>(), vec![0.5, 0.1, 0.01, 0.0]);
    let h = CostTable::build(&m, &r, &c, &BuildOptions::default()).unwrap();
    let f = CostTable::build(&m, &r, &c, &BuildOptions { proxy: Proxy::Fisher, ..Default::default() }).unwrap();
    let e = CostTable::build(&m, &r, &c, &BuildOptions { proxy: Proxy::WeightError, activation_bits: 8, ..Default::default() }).unwrap();
    for ((lh, lf), le) in h.layers.iter().zip(&f.layers).zip(&e.layers) {
        for ((oh, of), oe) in lh.options.iter().zip(&lf.options).zip(&le.options) {
            assert!((of.cost - 2.0 * oh.cost).abs() <= OMEGA_RTOL * of.cost.abs().max(1e-30));
            assert!((oe.cost * lh.trace_per_param.unwrap() - oh.cost).abs() <= OMEGA_RTOL * oh.cost.abs().max(1e-30));
            assert_eq!(oe.bops * 4.0, oh.bops);
        }
    }
    // Missing measured formats are an error naming the layer and format.
    let e = CostTable::build(&m, &r, &parse_candidates("int3").unwrap(), &BuildOptions { proxy: Proxy::Measured, ..Default::default() })
        .unwrap_err()
        .to_string();
    assert!(e.contains("`a`") && e.contains("int3"), "{e}");
}

#[test]
fn csv_and_json_round_trip() {
    let m = Tiny::new();
    let lat = LatencyTable::from_csv("layer,format,latency_us\na,int4,1.5\nb,int4/channel,0.25\n", Path::new("lat.csv")).unwrap();
    let opts = BuildOptions { latency: Some(lat), ..Default::default() };
    let t = CostTable::build(&m, &report([12.8, 3.2]), &parse_candidates("int2,int4,int4/group:8,fp32").unwrap(), &opts).unwrap();
    assert_eq!(t.layers[1].option("int4").unwrap().latency_us, Some(0.25));
    assert_eq!(t.layers[0].option("int2").unwrap().latency_us, None);
    let back = CostTable::from_csv(&t.to_csv(), Path::new("t.csv")).unwrap();
    // CSV carries no Tr/n column.
    let mut t2 = t.clone();
    t2.layers.iter_mut().for_each(|l| l.trace_per_param = None);
    assert_eq!(back, t2);
    assert_eq!(CostTable::from_json(&t.to_json(), Path::new("t.json")).unwrap(), t);
    let dir = std::env::temp_dir().join(format!("mixq-cost-{}", std::process::id()));
    for name in ["t.csv", "t.json"] {
        let p = dir.join(name);
        t.save(&p).unwrap();
        assert_eq!(CostTable::load(&p).unwrap().layers.len(), 2);
    }
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn malformed_csv_names_file_line_and_field() {
    let cases = [
        ("layer,format,cost,bytes\nfc,int4,abc,10\n", "line 2, field `cost`"),
        ("layer,format,cost,bytes\nfc,int4,1.0,-3\n", "line 2, field `bytes`"),
        ("layer,format,cost\nfc,int4,1.0\n", "missing column `bytes`"),
        ("layer,format,cost,bytes,colour\n", "unknown column `colour`"),
        ("layer,format,cost,bytes\n\nfc,int4,1.0,10\nfc,int4,2.0,10\n", "line 4, field `format`"),
        ("layer,format,cost,bytes\nfc,int4,1.0\n", "line 2: 3 fields"),
        ("layer,format,cost,bytes\nfc,int4,NaN,10\n", "line 2, field `cost`"),
        ("layer,format,cost,bytes,latency_us\nfc,int4,1,10,-1\n", "line 2, field `latency_us`"),
        ("", "empty file"),
    ];
    for (text, want) in cases {
        let e = CostTable::from_csv(text, Path::new("costs.csv")).unwrap_err().to_string();
        assert!(e.starts_with("costs.csv") && e.contains(want), "{text:?}: got `{e}`, want `{want}`");
    }
    let e = CostTable::from_json("{\"format\": \"mixq.cost-table\", \"version\": 2, \"layers\": []}", Path::new("c.json")).unwrap_err();
    assert!(e.to_string().contains("version 2"), "{e}");
}

#[test]
fn spec_labels_round_trip() {
    for s in ["int4", "int3-asym", "fp32", "int4/group:32", "fp4-e2m1/group:16", "int8/tensor/mse", "fp8-e4m3"] {
        assert_eq!(s.parse::<QuantSpec>().unwrap().label(), s);
    }
    assert_eq!(QuantSpec::keep().label(), "fp32");
    assert!("int4/blah".parse::<QuantSpec>().is_err());
    assert!(parse_candidates(" , ").is_err());
}

/// Robust costs: each layer's Ω uses Tr + z·s.e. (clamped at 0) over the same ‖ΔW‖², so every
/// robust cost is ≥ its nominal cost, z = 0 gives the nominal table, and the resources are equal.
#[test]
fn robust_costs_use_the_upper_bound_of_each_trace() {
    let m = Tiny::new();
    let cands = parse_candidates("int2,int4,int8,fp32").unwrap();
    // Layer `a` has a negative trace whose upper bound is positive: clamped to 0 nominally, not robustly.
    let mut r = report([12.8, -0.05]);
    r.layers[1].trace_std_err = Some(0.5);
    let z = 1.96;
    let (nominal, robust) = CostTable::build_nominal_and_robust(&m, &r, &cands, &BuildOptions::default(), z).unwrap();
    assert_eq!(nominal, CostTable::build(&m, &r, &cands, &BuildOptions::default()).unwrap());
    assert_eq!(robust, CostTable::build(&m, &r, &cands, &BuildOptions { robust_z: Some(z), ..Default::default() }).unwrap());
    for ((ln, lr), ls) in nominal.layers.iter().zip(&robust.layers).zip(&r.layers) {
        let se = ls.trace_std_err.unwrap();
        let ucb = (ls.trace.unwrap() + z * se).max(0.0);
        for (on, or) in ln.options.iter().zip(&lr.options) {
            assert_eq!((&on.format, on.bytes, on.bits, on.bops), (&or.format, or.bytes, or.bits, or.bops));
            assert!(or.cost >= on.cost, "{} {}: robust {} < nominal {}", ln.name, on.format, or.cost, on.cost);
            let w = m.weight(&ln.name).unwrap();
            let e2 =
                (fake_quantize(&w, &on.format.parse::<QuantSpec>().unwrap()).unwrap() - &w).square().sum(Kind::Double).double_value(&[]);
            let want = ucb / ln.params as f64 * e2;
            assert!((or.cost - want).abs() <= OMEGA_RTOL * want.abs().max(1e-30), "{} {}: {} vs {want}", ln.name, on.format, or.cost);
        }
    }
    assert!(nominal.layers[1].options[0].cost == 0.0 && robust.layers[1].options[0].cost > 0.0);
    let (n0, r0) = CostTable::build_nominal_and_robust(&m, &r, &cands, &BuildOptions::default(), 0.0).unwrap();
    assert_eq!(n0.layers[0], r0.layers[0]);
}

#[test]
fn robust_costs_need_standard_errors_and_the_hessian_proxy() {
    let m = Tiny::new();
    let cands = parse_candidates("int2,int8").unwrap();
    let mut r = report([12.8, 3.2]);
    r.layers[1].trace_std_err = None;
    let e = CostTable::build_nominal_and_robust(&m, &r, &cands, &BuildOptions::default(), 1.96).unwrap_err().to_string();
    assert!(e.contains("`b`") && e.contains("standard error"), "{e}");
    let r = report([12.8, 3.2]);
    let fisher = BuildOptions { proxy: Proxy::Fisher, ..Default::default() };
    let e = CostTable::build_nominal_and_robust(&m, &r, &cands, &fisher, 1.96).unwrap_err().to_string();
    assert!(e.contains("hessian"), "{e}");
    for bad in [-1.0, f64::NAN] {
        let e = CostTable::build_nominal_and_robust(&m, &r, &cands, &BuildOptions::default(), bad).unwrap_err().to_string();
        assert!(e.contains("--robust"), "{e}");
    }
}

// ---- Activation formats in the cost model (issue 4). ----

/// Activation formats searched with the weights on the zoo model: (weight, activation) pair
/// options, Ω = Ω_w + (Tr_a/n_a)·E‖Q_a(a) − a‖², BOPs proportional to the activation bits, a
/// BOPs budget pushes activations down, and the config carries the activation formats.
#[test]
fn activation_formats_make_pair_options_with_both_terms() -> anyhow::Result<()> {
    use mixq::alloc::{solve, Budget, Constraints, SolverKind};
    use mixq::config::QuantConfig;
    use mixq::cost::{pair_label, parse_activation_formats, ActivationErrors};
    use mixq::model::data::Dataset;
    use mixq::model::zoo::DigitsResNet;
    use mixq::quant::Format;
    use mixq::sensitivity::{estimate, Estimator, SensitivitySettings, TraceSettings};

    let model = DigitsResNet::untrained();
    let data = Dataset::digits("calib")?.take(24);
    let s = SensitivitySettings {
        estimators: vec![Estimator::Activation],
        batch_size: 12,
        trace: TraceSettings { seed: 1, min_probes: 2, max_probes: 4, block: 2, ..Default::default() },
        ..Default::default()
    };
    let mut report = estimate(&model, &data, &s, &mut |_| {})?;
    for (i, l) in report.layers.iter_mut().enumerate() {
        l.trace = Some(1.0 + i as f64);
        // The activation term must be visible next to the weight term of this untrained model.
        l.activation_trace = l.activation_trace.map(|t| t.abs().max(1e-3) * 1e3);
    }
    let acts = parse_activation_formats("int8,fp32")?;
    assert_eq!(acts, [Format::Int { bits: 8, signed: true }, Format::Fp32]);
    let ae = ActivationErrors::measure(&model, &data, &acts, 10)?;
    let cands = parse_candidates("int4,int8")?;
    let weights_only = CostTable::build(&model, &report, &cands, &BuildOptions::default())?;
    let pairs = CostTable::build(&model, &report, &cands, &BuildOptions { activations: Some(ae.clone()), ..Default::default() })?;
    for (lw, lp) in weights_only.layers.iter().zip(&pairs.layers) {
        let sens = report.layer(&lp.name)?;
        let fa = sens.activation_trace.unwrap() / sens.activation_numel.unwrap() as f64;
        let errs = ae.layer(&lp.name)?;
        assert!(errs[0] > 0.0 && errs[1] == 0.0, "{}: errors {errs:?}", lp.name);
        assert_eq!(lp.options.len(), 4, "{}", lp.name);
        for w in &lw.options {
            for (f, e) in acts.iter().zip(errs) {
                let label = pair_label(&w.format, *f);
                let o = lp.option(&label).unwrap_or_else(|| panic!("{}: no option {label}", lp.name));
                let want = w.cost + fa * e;
                assert!((o.cost - want).abs() <= OMEGA_RTOL * want.abs(), "{} {label}: Ω {} vs {want}", lp.name, o.cost);
                assert_eq!((o.bytes, o.bits), (w.bytes, w.bits));
                assert_eq!(o.bops, w.bops * f64::from(f.bits()) / 32.0, "{} {label}", lp.name);
            }
        }
    }
    // Unconstrained: fp32 inputs cost nothing. A BOPs budget of int8×int8 everywhere moves some
    // layers to int8 inputs; the smallest possible BOPs (int4×int8 everywhere) moves all.
    let free = solve(&pairs, &Constraints::default(), SolverKind::Exact)?;
    assert!(free.layers.iter().all(|l| l.format.ends_with("@fp32")), "{:?}", free.layers);
    let macs: f64 = model.layers().iter().map(|l| l.macs as f64).sum();
    let bops = |a: &mixq::alloc::Allocation| a.layers.iter().map(|l| l.bops).sum::<f64>();
    let int8_inputs = |a: &mixq::alloc::Allocation| a.layers.iter().filter(|l| l.format.ends_with("@int8")).count();
    let budget: Budget = format!("bops={}", macs * 64.0).parse()?;
    let tight = solve(&pairs, &Constraints { budgets: vec![budget], ..Default::default() }, SolverKind::Exact)?;
    assert!(bops(&tight) <= macs * 64.0 && int8_inputs(&tight) > 0, "{:?}", tight.layers);
    let budget: Budget = format!("bops={}", macs * 32.0).parse()?;
    let tightest = solve(&pairs, &Constraints { budgets: vec![budget], ..Default::default() }, SolverKind::Exact)?;
    assert!(tightest.layers.iter().all(|l| l.format == "int4@int8"), "{:?}", tightest.layers);
    assert!(tightest.objective >= tight.objective && tight.objective >= free.objective);
    // The config carries the activation formats, round-trips through JSON, and resolves.
    let cfg = tight.to_config(None)?;
    let back = QuantConfig::from_json(&cfg.to_json(), Path::new("cfg.json"))?;
    assert_eq!(back, cfg);
    for (r, l) in back.resolve(&model)?.iter().zip(&tight.layers) {
        let want = if l.format.ends_with("@int8") { Some(acts[0]) } else { None };
        assert_eq!(r.activation, want, "{} {}", r.layer.name, l.format);
        assert_eq!(Some(r.weight.label().as_str()), l.format.split('@').next());
    }
    let cfg_free = free.to_config(None)?;
    assert!(cfg_free.layers.values().all(|s| s.activation.is_none()));
    // A report without activation traces is refused with what to run.
    let plain = SensitivityReport {
        layers: report.layers.iter().map(|l| LayerSensitivity { activation_trace: None, ..l.clone() }).collect(),
        ..report.clone()
    };
    let err = CostTable::build(&model, &plain, &cands, &BuildOptions { activations: Some(ae), ..Default::default() }).unwrap_err();
    assert!(format!("{err}").contains("--estimator hutchpp,activation"), "{err}");
    Ok(())
}
