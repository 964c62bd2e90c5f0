//! The `mixq` binary end to end: exit codes, messages, and files written (or not) on error.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

fn mixq(args: &[&str], home: &Path) -> Output {
    Command::new(env!("CARGO_BIN_EXE_mixq"))
        .args(args)
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .env("MIXQ_HOME", home)
        .env_remove("LD_LIBRARY_PATH")
        .output()
        .expect("the mixq binary runs")
}

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
