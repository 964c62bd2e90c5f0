//! The `mixq` binary end to end: exit codes, messages, and files written (or not) on error.

mod common;

use common::mixq;
use std::path::{Path, PathBuf};
use std::process::Output;

fn tmp(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("mixq-cli-{}-{name}", std::process::id()));
    std::fs::create_dir_all(&d).unwrap();
    d
}

fn text(o: &Output) -> (String, String) {
    (String::from_utf8_lossy(&o.stdout).into_owned(), String::from_utf8_lossy(&o.stderr).into_owned())
}

const FIXTURE: &str = "tests/fixtures/tiny_cnn.pt";

fn write_config(dir: &Path, body: &str) -> PathBuf {
    let p = dir.join("config.json");
    std::fs::write(&p, body).unwrap();
    p
}

#[test]
fn layers_of_a_torchscript_model_without_ld_library_path() {
    let d = tmp("layers");
    let o = mixq(&["layers", "--model", FIXTURE, "--data", "digits:calib"], &d);
    let (out, err) = text(&o);
    assert!(o.status.success(), "{err}");
    for name in ["features.0", "features.2", "classifier.0", "classifier.2"] {
        assert!(out.contains(name), "{name} missing from\n{out}");
    }
    let o = mixq(&["layers", "--model", FIXTURE, "--data", "digits:calib", "--json"], &d);
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(v["layers"].as_array().unwrap().len(), 4);
}

#[test]
fn eval_writes_a_report() {
    let d = tmp("eval");
    let cfg = write_config(
        &d,
        r#"{"format":"mixq.quant-config","version":1,"default":{"weight":"int4"},"layers":{"classifier.2":{"weight":"int8"}}}"#,
    );
    let report = d.join("out/report.json");
    let o =
        mixq(&["eval", "--model", FIXTURE, "--data", "digits:test", "--config", cfg.to_str().unwrap(), "-o", report.to_str().unwrap()], &d);
    let (out, err) = text(&o);
    assert!(o.status.success(), "{err}");
    assert!(out.contains("classifier.2") && out.contains("int8/channel") && out.contains("agreement"), "{out}");
    let v: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&report).unwrap()).unwrap();
    assert_eq!(v["format"], "mixq.eval-report");
    assert_eq!(v["version"], 1);
    let agreement = v["quantized"]["agreement"].as_f64().unwrap();
    assert!((0.0..=1.0).contains(&agreement));
    assert_eq!(v["fp32"]["agreement"].as_f64().unwrap(), 1.0);
    assert!(v["size"]["avg_bits"].as_f64().unwrap() < 5.0);
}

/// Every bad config: exit code ≠ 0, a message naming the problem, and no report written.
#[test]
fn bad_configs_fail_cleanly_and_write_nothing() {
    let d = tmp("bad");
    let cases: &[(&str, &[&str])] = &[
        (
            r#"{"format":"mixq.quant-config","version":1,"default":{"weight":"int8"},"layers":{"features.1":{"weight":"int4"}}}"#,
            &["unknown layer `features.1`", "features.0"],
        ),
        (r#"{"format":"mixq.quant-config","version":7,"default":{"weight":"int8"}}"#, &["version 7", "reads version 1"]),
        (r#"{"format":"mixq.quant-config","version":1,"default":{"weight":"int3.5"}}"#, &["int3.5", "valid formats"]),
        (
            r#"{"format":"mixq.quant-config","version":1,"default":{"weight":"int4","granularity":"group:32"}}"#,
            &["features.0", "does not divide"],
        ),
        (r#"{"format":"mixq.quant-config","version":1,"default":{"weight":"int8","activation":"int8"}}"#, &["activation", "native model"]),
        (r#"{"format":"mixq.quant-config","version":1,"default":{"weight":"int8"}"#, &["not valid JSON"]),
    ];
    for (body, needles) in cases {
        let cfg = write_config(&d, body);
        let report = d.join("report.json");
        let o = mixq(
            &["eval", "--model", FIXTURE, "--data", "digits:test", "--config", cfg.to_str().unwrap(), "-o", report.to_str().unwrap()],
            &d,
        );
        let (_, err) = text(&o);
        assert!(!o.status.success(), "accepted {body}");
        assert!(!err.contains("panicked"), "{err}");
        for n in *needles {
            assert!(err.contains(n), "`{n}` missing from: {err}");
        }
        assert!(!report.exists(), "a report was written for {body}");
    }
}

#[test]
fn bad_model_and_data_name_the_file() {
    let d = tmp("badinput");
    let o = mixq(&["layers", "--model", "no/such/model.pt"], &d);
    let (_, err) = text(&o);
    assert!(!o.status.success() && err.contains("no/such/model.pt") && err.contains("digits-resnet"), "{err}");
    let o = mixq(&["layers", "--model", FIXTURE, "--data", "no/such/data.safetensors"], &d);
    let (_, err) = text(&o);
    assert!(!o.status.success() && err.contains("no/such/data.safetensors"), "{err}");
}

#[test]
fn formats_lists_every_format() {
    let d = tmp("formats");
    let o = mixq(&["formats"], &d);
    let (out, _) = text(&o);
    assert!(o.status.success());
    for f in mixq::quant::Format::all() {
        assert!(out.contains(&f.to_string()), "{f}");
    }
}

/// The zoo-model tests share one MIXQ_HOME (so the digits CNN is trained once) and take turns.
fn zoo_home() -> (std::sync::MutexGuard<'static, ()>, PathBuf) {
    static LOCK: std::sync::Mutex<()> = std::sync::Mutex::new(());
    (LOCK.lock().unwrap_or_else(|e| e.into_inner()), tmp("zoo-home"))
}

/// The demo end to end: trains the zoo model into a fresh MIXQ_HOME, prints layers and a
/// baseline row for every format, FP32 at the bottom with full agreement.
#[test]
fn demo_prints_layers_and_uniform_baselines() {
    let (_guard, d) = zoo_home();
    let o = mixq(&["demo"], &d);
    let (out, err) = text(&o);
    assert!(o.status.success(), "{err}");
    assert!(out.contains("layer3.0.conv2") && out.contains("Uniform baselines"), "{out}");
    for f in mixq::quant::Format::all() {
        assert!(out.lines().any(|l| l.trim_start().starts_with(&format!("{f} "))), "no row for {f}:\n{out}");
    }
    let fp32 = out.lines().find(|l| l.trim_start().starts_with("fp32 ")).unwrap();
    assert!(fp32.contains("100.00 %"), "{fp32}");
    assert!(d.join("zoo").read_dir().unwrap().next().is_some(), "weights cached under MIXQ_HOME/zoo");
}

/// The whole pipeline: the config respects the budget, validates, and the mixed model is
/// evaluated beside the uniform candidates.
#[test]
fn search_writes_a_config_within_budget() {
    let (_guard, d) = zoo_home();
    let cfg = d.join("search/config.json");
    let sens = d.join("search/sens.json");
    let o = mixq(
        &["search", "--budget", "avg-bits=4.5", "--max-probes", "12", "-o", cfg.to_str().unwrap(), "--sens-output", sens.to_str().unwrap()],
        &d,
    );
    let (out, err) = text(&o);
    assert!(o.status.success(), "{err}");
    assert!(out.contains("mixed (this search)") && out.contains("uniform int4") && out.contains("gap"), "{out}");
    let config = mixq::config::QuantConfig::load(&cfg).unwrap();
    let report = mixq::sensitivity::SensitivityReport::load(&sens).unwrap();
    assert_eq!(config.layers.len(), report.layers.len(), "every layer is listed in the config");
    // The budget counts scales: recompute the average bits from the config itself.
    let (mut bits, mut params) = (0u64, 0i64);
    for l in &report.layers {
        let shape = &mixq::model::zoo::load("digits-resnet", Some(&d.join("zoo"))).unwrap().layer(&l.name).unwrap().shape.clone();
        bits += config.layers[&l.name].spec().storage_bits(shape);
        params += l.params;
    }
    assert!(bits as f64 / params as f64 <= 4.5 + 1e-9, "avg bits {} over budget", bits as f64 / params as f64);
    // An impossible budget fails with the smallest achievable value and writes nothing.
    let cfg2 = d.join("search/none.json");
    let o = mixq(&["search", "--budget", "avg-bits=1", "--max-probes", "4", "-o", cfg2.to_str().unwrap()], &d);
    let (_, err) = text(&o);
    assert!(!o.status.success() && err.contains("smallest achievable"), "{err}");
    assert!(!cfg2.exists());
}

/// Reads a CSV written by `mixq pareto` (through the library's reader, which checks its
/// format line): the header and the rows as strings.
fn read_csv(path: &Path) -> (Vec<String>, Vec<Vec<String>>) {
    let csv = mixq::pipeline::pareto::FrontCsv::load(path).unwrap();
    (csv.header, csv.rows)
}

fn col(header: &[String], rows: &[Vec<String>], name: &str) -> Vec<f64> {
    let i = header.iter().position(|h| h == name).unwrap_or_else(|| panic!("no column {name} in {header:?}"));
    rows.iter().map(|r| r[i].parse().unwrap_or_else(|_| panic!("{name}: `{}`", r[i]))).collect()
}

fn allocate_objective(d: &Path, table: &Path, budget: &str) -> Result<f64, String> {
    let o = mixq(&["allocate", "--cost-table", table.to_str().unwrap(), "--budget", budget, "--json"], d);
    if !o.status.success() {
        return Err(String::from_utf8_lossy(&o.stderr).into_owned());
    }
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    Ok(v["objective"].as_f64().unwrap())
}

/// `pareto --breakpoints` on a cost table: resource strictly up, objective strictly down; each
/// breakpoint is `allocate`'s optimum at its own budget and one byte less gives the previous step;
/// every point of an evenly spaced sweep lies on the step function the breakpoints define.
#[test]
fn pareto_breakpoints_are_the_exact_steps_of_the_front() {
    let d = tmp("breakpoints");
    let table = d.join("t.csv");
    std::fs::write(&table, mixq::cost::synthetic(3, 6, 4).to_csv()).unwrap();
    let (front, svg) = (d.join("front.csv"), d.join("front.svg"));
    let t = table.to_str().unwrap();
    let o = mixq(
        &["pareto", "--cost-table", t, "--sweep", "size", "--breakpoints", "-o", front.to_str().unwrap(), "--svg", svg.to_str().unwrap()],
        &d,
    );
    let (out, err) = text(&o);
    assert!(o.status.success(), "{err}");
    assert!(out.contains("breakpoints of the size front"), "{out}");
    let (h, rows) = read_csv(&front);
    let (used, obj) = (col(&h, &rows, "size_used"), col(&h, &rows, "objective"));
    assert!(used.len() >= 5, "{} breakpoints", used.len());
    for i in 1..used.len() {
        assert!(used[i] > used[i - 1] && obj[i] < obj[i - 1], "row {i}: ({}, {}) after ({}, {})", used[i], obj[i], used[i - 1], obj[i - 1]);
    }
    let close = |a: f64, b: f64| (a - b).abs() <= 1e-9 * a.abs().max(b.abs()).max(1e-300);
    for i in [0, used.len() / 2, used.len() - 1] {
        let at = allocate_objective(&d, &table, &format!("size={}B", used[i])).unwrap();
        assert!(close(at, obj[i]), "breakpoint {i}: allocate gives {at}, pareto {}", obj[i]);
        match allocate_objective(&d, &table, &format!("size={}B", used[i] - 1.0)) {
            Ok(below) => assert!(i > 0 && close(below, obj[i - 1]), "below breakpoint {i}: {below} vs previous {}", obj[i - 1]),
            Err(e) => assert!(i == 0 && e.contains("smallest achievable"), "{e}"),
        }
    }
    let svg_text = std::fs::read_to_string(&svg).unwrap();
    assert!(svg_text.starts_with("<svg") && svg_text.contains("predicted Σ Ω"), "{svg_text}");
    // An evenly spaced sweep samples the same step function.
    let sweep = d.join("sweep.csv");
    let o = mixq(&["pareto", "--cost-table", t, "--sweep", "size", "--points", "9", "-o", sweep.to_str().unwrap()], &d);
    assert!(o.status.success(), "{}", text(&o).1);
    let (hs, rs) = read_csv(&sweep);
    for (limit, o) in col(&hs, &rs, "size_limit").into_iter().zip(col(&hs, &rs, "objective")) {
        let k = used.iter().rposition(|&u| u <= limit * (1.0 + 1e-9)).expect("a breakpoint below every feasible limit");
        assert!(close(o, obj[k]), "sweep at {limit}: {o}, step function {}", obj[k]);
    }
}

/// Infeasible budgets exit non-zero with each budget's smallest achievable value and write
/// nothing; `--robust` without standard errors says what it needs.
#[test]
fn allocate_infeasible_and_robust_without_report() {
    let d = tmp("infeasible");
    let table = d.join("t.csv");
    std::fs::write(&table, mixq::cost::synthetic(5, 4, 3).to_csv()).unwrap();
    let cfg = d.join("cfg.json");
    let t = table.to_str().unwrap();
    let o = mixq(&["allocate", "--cost-table", t, "--budget", "avg-bits=1", "--budget", "size=100%", "-o", cfg.to_str().unwrap()], &d);
    let (_, err) = text(&o);
    assert!(!o.status.success() && err.contains("avg-bits limit 1.000 bits/w is below the smallest achievable"), "{err}");
    assert!(err.contains("size limit") && !err.contains("panicked"), "{err}");
    assert!(!cfg.exists());
    let o = mixq(&["allocate", "--cost-table", t, "--budget", "avg-bits=6", "--robust"], &d);
    let (_, err) = text(&o);
    assert!(!o.status.success() && err.contains("--robust needs"), "{err}");
}

/// Robust search on the TorchScript fixture, then the robust breakpoint front evaluated on data:
/// the robust objective is never below the nominal optimum at the same budget, every point has
/// measured columns, and the SVG carries both series.
#[test]
fn robust_search_and_evaluated_front() {
    let d = tmp("robust");
    let (cfg, sens) = (d.join("cfg.json"), d.join("sens.json"));
    let o = mixq(
        &[
            "search",
            "--model",
            FIXTURE,
            "--data",
            "digits:calib",
            "--eval-data",
            "digits:test",
            "--budget",
            "avg-bits=4",
            "--max-probes",
            "12",
            "--robust",
            "-o",
            cfg.to_str().unwrap(),
            "--sens-output",
            sens.to_str().unwrap(),
        ],
        &d,
    );
    let (out, err) = text(&o);
    assert!(o.status.success(), "{err}");
    assert!(out.contains("Robust vs nominal") && out.contains("robust config") && out.contains("mixed (this search, robust)"), "{out}");
    let v: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&cfg).unwrap()).unwrap();
    let r = &v["provenance"]["robust"];
    assert_eq!(r["z"], 1.96);
    assert!(r["robust_objective"].as_f64().unwrap() >= r["nominal_objective"].as_f64().unwrap() * (1.0 - 1e-9), "{r}");
    let (front, svg) = (d.join("front.csv"), d.join("front.svg"));
    let o = mixq(
        &[
            "pareto",
            "--sens",
            sens.to_str().unwrap(),
            "--robust",
            "2",
            "--breakpoints",
            "--eval",
            "--eval-data",
            "digits:test",
            "-o",
            front.to_str().unwrap(),
            "--svg",
            svg.to_str().unwrap(),
        ],
        &d,
    );
    let (out, err) = text(&o);
    assert!(o.status.success(), "{err}");
    assert!(out.contains("robust costs: Tr + 2·s.e.") && out.contains("Measured on digits:test"), "{out}");
    let (h, rows) = read_csv(&front);
    let (obj, nominal, on_nominal) =
        (col(&h, &rows, "objective"), col(&h, &rows, "nominal_optimum"), col(&h, &rows, "objective_nominal_costs"));
    for i in 0..rows.len() {
        assert!(obj[i] >= nominal[i] * (1.0 - 1e-9) - 1e-300, "row {i}: robust {} < nominal {}", obj[i], nominal[i]);
        assert!(on_nominal[i] >= nominal[i] * (1.0 - 1e-9) - 1e-300, "row {i}: the nominal optimum is not optimal");
    }
    let kl = col(&h, &rows, "kl");
    let acc = col(&h, &rows, "accuracy");
    // KL of near-identical outputs comes out a few 1e-9 below zero in f32.
    assert!(kl.iter().all(|&k| k >= -1e-6) && acc.iter().all(|a| (0.0..=1.0).contains(a)), "{kl:?} {acc:?}");
    // The largest configuration keeps FP32's outputs far better than the smallest.
    assert!(kl.last().unwrap() < kl.first().unwrap(), "{kl:?}");
    let svg_text = std::fs::read_to_string(&svg).unwrap();
    assert!(svg_text.contains("measured KL") && svg_text.contains("robust costs") && svg_text.contains("right axis"), "svg");
}

/// `search --act-formats`: activation traces join the report, the options become
/// weight@activation pairs, a BOPs budget that all-FP32 activations cannot meet moves layers to
/// int8 inputs, the config carries them, and `mixq eval` applies the config.
#[test]
fn search_with_activation_formats_writes_activation_settings() {
    let (_guard, d) = zoo_home();
    let cfg = d.join("act/config.json");
    let o = mixq(
        &[
            "search",
            "--act-formats",
            "int8,fp32",
            "--budget",
            "avg-bits=4",
            "--budget",
            "bops=100M",
            "--max-probes",
            "8",
            "-o",
            cfg.to_str().unwrap(),
        ],
        &d,
    );
    let (out, err) = text(&o);
    assert!(o.status.success(), "{err}");
    assert!(out.contains("bops"), "{out}");
    let config = mixq::config::QuantConfig::load(&cfg).unwrap();
    let int8_inputs = config.layers.values().filter(|s| s.activation == Some(mixq::quant::Format::Int { bits: 8, signed: true })).count();
    assert!(int8_inputs > 0, "a 100M-BOP budget needs int8 activations somewhere: {config:?}");
    let o = mixq(&["eval", "--config", cfg.to_str().unwrap()], &d);
    let (out, err) = text(&o);
    assert!(o.status.success() && out.contains("config"), "{out}\n{err}");
}
