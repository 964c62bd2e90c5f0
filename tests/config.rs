//! Quant config: JSON Schema agreement, round trips, resolution order, and validation errors.

mod common;

use common::Toy;
use mixq::config::{LayerSetting, QuantConfig, Rule, CONFIG_SCHEMA};
use mixq::model::QuantModel;
use mixq::quant::{Format, Granularity, QuantSpec};
use std::path::{Path, PathBuf};
use tch::Tensor;

fn examples() -> Vec<PathBuf> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("src/config/examples");
    let mut v: Vec<PathBuf> =
        std::fs::read_dir(&dir).unwrap().map(|e| e.unwrap().path()).filter(|p| p.extension().is_some_and(|e| e == "json")).collect();
    v.sort();
    assert!(v.len() >= 3, "expected example configs in {}", dir.display());
    v
}

fn schema() -> jsonschema::Validator {
    let s: serde_json::Value = serde_json::from_str(CONFIG_SCHEMA).unwrap();
    jsonschema::validator_for(&s).expect("the schema itself is valid")
}

#[test]
fn examples_validate_against_schema_and_parse() {
    let v = schema();
    for p in examples() {
        let text = std::fs::read_to_string(&p).unwrap();
        let json: serde_json::Value = serde_json::from_str(&text).unwrap();
        let errors: Vec<String> = v.iter_errors(&json).map(|e| e.to_string()).collect();
        assert!(errors.is_empty(), "{}: {errors:?}", p.display());
        let c = QuantConfig::from_json(&text, &p).unwrap_or_else(|e| panic!("{e}"));
        // Round trip: what mixq writes is what it read, and it also satisfies the schema.
        let again = QuantConfig::from_json(&c.to_json(), &p).unwrap();
        assert_eq!(again, c, "{}", p.display());
        assert!(v.is_valid(&serde_json::from_str(&c.to_json()).unwrap()), "{}", p.display());
    }
}

#[test]
fn generated_configs_validate_against_schema() {
    let v = schema();
    for f in Format::all() {
        for g in [Granularity::PerTensor, Granularity::PerChannel, Granularity::PerGroup(16), Granularity::PerGroup(32)] {
            let mut spec = QuantSpec::new(f, g);
            if f.has_zero_point() {
                spec.scale = mixq::quant::ScaleType::F32;
            }
            let mut c = QuantConfig::uniform(LayerSetting::weight(spec));
            c.rules.push(Rule {
                pattern: "fc".into(),
                setting: LayerSetting { activation: Some(Format::Int { bits: 8, signed: false }), ..LayerSetting::weight(spec) },
            });
            let json: serde_json::Value = serde_json::from_str(&c.to_json()).unwrap();
            let errors: Vec<String> = v.iter_errors(&json).map(|e| e.to_string()).collect();
            assert!(errors.is_empty(), "{f} {g}: {errors:?}\n{}", c.to_json());
            assert_eq!(QuantConfig::from_json(&c.to_json(), Path::new("gen.json")).unwrap(), c);
        }
    }
}

#[test]
fn schema_and_parser_reject_the_same_bad_configs() {
    let v = schema();
    let bad = [
        r#"{"format":"mixq.quant-config","version":1,"default":{"weight":"int9"}}"#,
        r#"{"format":"mixq.quant-config","version":2,"default":{"weight":"int8"}}"#,
        r#"{"format":"mixq.quant-config","version":1,"default":{"weight":"int8","granularity":"group:1"}}"#,
        r#"{"format":"mixq.quant-config","version":1,"default":{"weight":"int8","scale":"f8"}}"#,
        r#"{"format":"mixq.quant-config","version":1,"default":{"weight":"int8"},"extra":1}"#,
        r#"{"format":"mixq.quant-config","version":1}"#,
        r#"{"format":"other","version":1,"default":{"weight":"int8"}}"#,
    ];
    for text in bad {
        let json: serde_json::Value = serde_json::from_str(text).unwrap();
        assert!(!v.is_valid(&json), "schema accepted {text}");
        assert!(QuantConfig::from_json(text, Path::new("bad.json")).is_err(), "parser accepted {text}");
    }
}

#[test]
fn resolution_is_exact_then_rule_then_default() {
    let model = Toy::new();
    let text = std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("src/config/examples/mixed-digits-resnet.json")).unwrap();
    let c = QuantConfig::from_json(&text, Path::new("mixed.json")).unwrap();
    let plan = c.resolve(&model).unwrap();
    let by_name = |n: &str| plan.iter().find(|r| r.layer.name == n).unwrap();
    assert_eq!(by_name("stem.conv").source, "layers");
    assert_eq!(by_name("stem.conv").weight.format, Format::Int { bits: 8, signed: true });
    assert_eq!(by_name("layer1.0.conv1").source, "rules[0]");
    assert_eq!(by_name("layer1.0.conv1").weight.granularity, Granularity::PerGroup(32));
    assert_eq!(by_name("fc").source, "layers");
    assert_eq!(by_name("fc").weight.format, Format::Fp8E4M3);
    // A rule must match the whole name: `layer1\..*` does not match `xlayer1.0`.
    let mut c2 = QuantConfig::uniform(LayerSetting::default());
    c2.rules.push(Rule {
        pattern: "conv1".into(),
        setting: LayerSetting { weight: Format::Int { bits: 4, signed: true }, ..Default::default() },
    });
    let plan = c2.resolve(&model).unwrap();
    assert!(plan.iter().all(|r| r.source == "default"), "a partial match must not count");
}

#[test]
fn unknown_layer_names_the_closest_layers() {
    let model = Toy::new();
    let mut c = QuantConfig::uniform(LayerSetting::default());
    c.layers.insert("layer1.0.conv3".into(), LayerSetting::default());
    let e = c.resolve(&model).unwrap_err().to_string();
    assert!(e.contains("unknown layer `layer1.0.conv3`") && e.contains("layer1.0.conv1"), "{e}");
}

#[test]
fn group_that_does_not_divide_is_an_error_naming_the_layer() {
    let model = Toy::new();
    let c = QuantConfig::uniform(LayerSetting {
        weight: Format::Int { bits: 4, signed: true },
        granularity: Some(Granularity::PerGroup(32)),
        ..Default::default()
    });
    let e = c.resolve(&model).unwrap_err().to_string();
    assert!(e.contains("stem.conv") && e.contains("does not divide"), "{e}");
}

#[test]
fn invalid_regex_names_the_rule() {
    let model = Toy::new();
    let mut c = QuantConfig::uniform(LayerSetting::default());
    c.rules.push(Rule { pattern: "layer1.(".into(), setting: LayerSetting::default() });
    let e = c.resolve(&model).unwrap_err().to_string();
    assert!(e.contains("rules[0].pattern") && e.contains("regex"), "{e}");
}

#[test]
fn activation_quant_on_a_model_without_it_is_refused() {
    let model = Toy::new();
    let c = QuantConfig::uniform(LayerSetting {
        weight: Format::Int { bits: 8, signed: true },
        activation: Some(Format::Int { bits: 8, signed: false }),
        ..Default::default()
    });
    let e = c.resolve(&model).unwrap_err().to_string();
    assert!(e.contains("activation") && e.contains("native model"), "{e}");
}

#[test]
fn apply_then_restore_gives_back_the_exact_weights() {
    let model = Toy::new();
    let before: Vec<Tensor> = model.named_parameters().iter().map(|(_, t)| t.copy()).collect();
    let c = QuantConfig::uniform(LayerSetting { weight: Format::Int { bits: 2, signed: true }, ..Default::default() });
    let plan = c.resolve(&model).unwrap();
    {
        let _applied = mixq::model::apply(&model, &plan).unwrap();
        let changed = model.named_parameters().iter().zip(&before).any(|((_, t), b)| !t.equal(b));
        assert!(changed, "int2 must change some weight");
    }
    for ((n, t), b) in model.named_parameters().iter().zip(&before) {
        assert!(t.equal(b), "{n} not restored bit for bit");
    }
}

#[test]
fn size_counts_scales() {
    let model = Toy::new();
    let c = QuantConfig::uniform(LayerSetting { weight: Format::Int { bits: 8, signed: true }, ..Default::default() });
    let plan = c.resolve(&model).unwrap();
    let size = mixq::eval::model_size(&model, &plan);
    let params: i64 = model.layers().iter().map(|l| l.params).sum();
    let scales: i64 = model.layers().iter().map(|l| l.shape[0]).sum();
    assert_eq!(size.weight_bytes as i64, params + scales * 2);
    assert!(size.avg_bits > 8.0 && size.avg_bits < 8.6, "{}", size.avg_bits);
}

#[test]
fn save_is_atomic_and_loadable() {
    let dir = std::env::temp_dir().join(format!("mixq-config-test-{}", std::process::id()));
    let p = dir.join("c.json");
    let c = QuantConfig::uniform(LayerSetting { weight: Format::Fp8E5M2, ..Default::default() });
    c.save(&p).unwrap();
    assert_eq!(QuantConfig::load(&p).unwrap(), c);
    let e = QuantConfig::load(&dir.join("missing.json")).unwrap_err().to_string();
    assert!(e.contains("missing.json"), "{e}");
    std::fs::remove_dir_all(&dir).unwrap();
}
