//! Exporters: golden files for llama.cpp, compressed-tensors and mixq's resolved view of a 2-block
//! Llama config; llama.cpp's own tensor-type matching replayed on the file; the compressed-tensors
//! groups against the resolved specs; clear errors for bad inputs; atomic writes from the CLI.
//!
//! The goldens live in `tests/fixtures/export/`; `MIXQ_BLESS=1 cargo test --test export` rewrites
//! them (review the diff). `check_llama_cpp.py` and `check_hf.py` there check the same files
//! against a real `llama-quantize` and the real compressed-tensors library (README: Exports).

mod common;

use common::mixq;
use mixq::config::export::{self, gguf_tensor_name, ExportOptions, ExportTarget, LayerList};
use mixq::config::QuantConfig;
use mixq::model::{LayerInfo, LayerKind};
use regex::Regex;
use std::path::{Path, PathBuf};

const DIR: &str = "tests/fixtures/export";
const CONFIG: &str = "tests/fixtures/export/tiny-llama-2l.config.json";
const LAYERS: &str = "tests/fixtures/export/tiny-llama-2l.layers.json";

fn path(rel: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join(rel)
}

fn fixture() -> (QuantConfig, LayerList) {
    (QuantConfig::load(&path(CONFIG)).unwrap(), LayerList::load(&path(LAYERS)).unwrap())
}

fn run(target: ExportTarget) -> export::Export {
    let (config, list) = fixture();
    export::export(&config, &list.layers, &list.model, target, ExportOptions::default()).unwrap_or_else(|e| panic!("{target}: {e}"))
}

/// Compares `got` with the golden file `name` (or rewrites it under `MIXQ_BLESS=1`), naming the
/// first line that differs.
fn golden(name: &str, got: &str) {
    let p = path(&format!("{DIR}/{name}"));
    if std::env::var_os("MIXQ_BLESS").is_some() {
        std::fs::write(&p, got).unwrap();
        return;
    }
    let want = std::fs::read_to_string(&p).unwrap_or_else(|e| panic!("{}: {e} (MIXQ_BLESS=1 writes it)", p.display()));
    if want != got {
        let (i, (w, g)) = want
            .lines()
            .zip(got.lines())
            .enumerate()
            .find(|(_, (w, g))| w != g)
            .unwrap_or((want.lines().count().min(got.lines().count()), ("<end>", "<end>")));
        panic!("{} differs at line {}:\n  golden: {w}\n  got:    {g}\n(MIXQ_BLESS=1 rewrites the golden)", p.display(), i + 1);
    }
}

fn tmp(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("mixq-export-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

#[test]
fn llama_cpp_golden() {
    let e = run(ExportTarget::LlamaCpp);
    golden("tiny-llama-2l.tensor-types.txt", &e.text);
    golden("tiny-llama-2l.llama-cpp.notes.txt", &(e.notes.join("\n") + "\n"));
    assert_eq!(e.base_type.as_deref(), Some("Q4_K_S"));
    assert_eq!(
        e.command(Path::new("out/types.txt")).unwrap(),
        "llama-quantize --pure --tensor-type-file out/types.txt model-f32.gguf model-mixq.gguf Q4_K_S"
    );
}

#[test]
fn hf_golden() {
    golden("tiny-llama-2l.hf.json", &run(ExportTarget::Hf).text);
}

#[test]
fn json_golden() {
    golden("tiny-llama-2l.resolved.json", &run(ExportTarget::Json).text);
}

/// llama.cpp's reading of a tensor-type file (tools/quantize/quantize.cpp, src/llama-quant.cpp):
/// whitespace-separated `pattern=type` tokens split at the first `=`, the pattern lower-cased and
/// searched (unanchored) in the tensor name, the first match winning.
fn llama_cpp_lookup<'a>(file: &'a str, tensor: &str) -> Option<&'a str> {
    file.split_whitespace().find_map(|tok| {
        let (pat, ty) = tok.split_once('=').expect("every token has a `=`");
        Regex::new(&pat.to_lowercase()).unwrap().is_match(tensor).then_some(ty)
    })
}

#[test]
fn llama_cpp_matching_gives_every_tensor_its_own_entry() {
    let (config, list) = fixture();
    let resolved = config.resolve_layers(&list.layers, &list.model).unwrap();
    let e = run(ExportTarget::LlamaCpp);
    let notes = e.notes.join("\n");
    for r in &resolved {
        let tensor = gguf_tensor_name(&r.layer.name).unwrap();
        let ty = llama_cpp_lookup(&e.text, &tensor).unwrap_or_else(|| panic!("{tensor} matches no entry"));
        let (want, _) = export::ggml_type_for(&r.weight);
        // Either the nearest type, or a fallback that the notes state for this layer.
        if ty != want.name() {
            assert!(
                notes.contains(&format!("{} -> {tensor}: {} -> {ty}, an approximation: row length", r.layer.name, r.weight)),
                "{tensor}: {ty}"
            );
        }
    }
    // Tensors the file does not name (norms) match nothing: they keep llama-quantize's own rules.
    for other in ["output_norm.weight", "blk.0.attn_norm.weight", "blk.1.ffn_norm.weight", "blk.10.attn_q.weight"] {
        assert_eq!(llama_cpp_lookup(&e.text, other), None, "{other}");
    }
    // The replay is faithful: an unanchored `output.weight` first would capture attn_output too.
    let unanchored = format!("output.weight=q8_0\n{}", e.text);
    assert_eq!(llama_cpp_lookup(&unanchored, "blk.1.attn_output.weight"), Some("q8_0"));
    // No comments, no blank tokens: every token parses as `pattern=type` with a ggml type name.
    let names = ["q2_K", "q3_K", "q4_K", "q5_K", "q6_K", "q4_0", "q5_0", "q5_1", "q8_0", "mxfp4", "f16", "bf16", "f32"];
    for tok in e.text.split_whitespace() {
        let (_, ty) = tok.split_once('=').unwrap();
        assert!(names.contains(&ty), "{tok}");
    }
}

#[test]
fn llama_cpp_rows_never_break_the_block_size() {
    let (config, list) = fixture();
    let e = run(ExportTarget::LlamaCpp);
    let block = |ty: &str| match ty {
        "q2_K" | "q3_K" | "q4_K" | "q5_K" | "q6_K" => 256,
        "f16" | "bf16" | "f32" => 1,
        _ => 32,
    };
    for r in config.resolve_layers(&list.layers, &list.model).unwrap() {
        let ty = llama_cpp_lookup(&e.text, &gguf_tensor_name(&r.layer.name).unwrap()).unwrap();
        let row = r.layer.shape[1];
        assert_eq!(row % block(ty), 0, "{}: {ty} with rows of {row}", r.layer.name);
    }
}

#[test]
fn hf_groups_partition_the_layers_and_match_their_specs() {
    let (config, list) = fixture();
    let resolved = config.resolve_layers(&list.layers, &list.model).unwrap();
    let v: serde_json::Value = serde_json::from_str(&run(ExportTarget::Hf).text).unwrap();
    assert_eq!(v["format"], "mixq.hf-quantization-config");
    assert_eq!(v["version"], 1);
    let qc = &v["quantization_config"];
    assert_eq!(qc["quant_method"], "compressed-tensors");
    let ignore: Vec<&str> = qc["ignore"].as_array().unwrap().iter().map(|x| x.as_str().unwrap()).collect();
    let groups = qc["config_groups"].as_object().unwrap();
    for r in &resolved {
        let name = r.layer.name.as_str();
        let owners: Vec<&serde_json::Value> =
            groups.values().filter(|g| g["targets"].as_array().unwrap().iter().any(|t| t == name)).collect();
        if r.weight.format.is_keep() {
            assert!(owners.is_empty() && ignore.contains(&name), "{name} keeps full precision");
            continue;
        }
        assert_eq!(owners.len(), 1, "{name} must be in exactly one group");
        assert!(!ignore.contains(&name), "{name}");
        let w = &owners[0]["weights"];
        assert_eq!(w["num_bits"], u64::from(r.weight.format.bits()), "{name}");
        assert_eq!(w["type"], if r.weight.format.is_float() { "float" } else { "int" }, "{name}");
        assert_eq!(w["symmetric"], !r.weight.format.has_zero_point(), "{name}");
        let (strategy, group) = match r.weight.granularity {
            mixq::quant::Granularity::PerTensor => ("tensor", serde_json::Value::Null),
            mixq::quant::Granularity::PerChannel => ("channel", serde_json::Value::Null),
            mixq::quant::Granularity::PerGroup(g) => ("group", g.into()),
        };
        assert_eq!((w["strategy"].as_str().unwrap(), &w["group_size"]), (strategy, &group), "{name}");
        match r.activation {
            Some(a) => assert_eq!(owners[0]["input_activations"]["num_bits"], u64::from(a.bits()), "{name}"),
            None => assert!(owners[0]["input_activations"].is_null(), "{name}"),
        }
    }
    // Groups are distinct schemes: no two groups have the same weights and activations.
    let schemes: Vec<String> = groups.values().map(|g| format!("{}{}", g["weights"], g["input_activations"])).collect();
    let mut dedup = schemes.clone();
    dedup.sort();
    dedup.dedup();
    assert_eq!(dedup.len(), schemes.len());
}

#[test]
fn resolved_json_totals_agree_with_its_layers() {
    let v: serde_json::Value = serde_json::from_str(&run(ExportTarget::Json).text).unwrap();
    assert_eq!((v["format"].as_str(), v["version"].as_u64()), (Some("mixq.resolved-config"), Some(1)));
    let layers = v["layers"].as_array().unwrap();
    assert_eq!(layers.len(), 16);
    let bytes: u64 = layers.iter().map(|l| l["bytes"].as_u64().unwrap()).sum();
    let params: i64 = layers.iter().map(|l| l["params"].as_i64().unwrap()).sum();
    assert_eq!(v["totals"]["bytes"].as_u64(), Some(bytes));
    assert_eq!(v["totals"]["params"].as_i64(), Some(params));
    let sources: Vec<&str> = layers.iter().map(|l| l["source"].as_str().unwrap()).collect();
    for s in ["layers", "rules[0]", "rules[1]", "default"] {
        assert!(sources.contains(&s), "{s}");
    }
}

fn cnn_layers() -> Vec<LayerInfo> {
    let mk = |name: &str, kind, shape: Vec<i64>| LayerInfo { name: name.into(), kind, params: shape.iter().product(), macs: 0, shape };
    vec![mk("conv1", LayerKind::Conv2d, vec![16, 1, 3, 3]), mk("fc", LayerKind::Linear, vec![10, 64])]
}

fn int8() -> QuantConfig {
    QuantConfig::from_json(r#"{"format":"mixq.quant-config","version":1,"default":{"weight":"int8"}}"#, Path::new("c.json")).unwrap()
}

#[test]
fn non_llama_names_are_an_error_or_skipped_with_a_note() {
    let layers = cnn_layers();
    let e = export::export(&int8(), &layers, "cnn", ExportTarget::LlamaCpp, ExportOptions::default()).unwrap_err().to_string();
    assert!(e.contains("`conv1`") && e.contains("model.layers.N.self_attn.{q,k,v,o}_proj"), "{e}");
    // Skipping every layer leaves nothing to export: still an error.
    let e =
        export::export(&int8(), &layers, "cnn", ExportTarget::LlamaCpp, ExportOptions { skip_unmappable: true }).unwrap_err().to_string();
    assert!(e.contains("no layer has a GGUF tensor name"), "{e}");
    // With one Llama layer among them, the others are skipped and each is named in a note.
    let mut mixed = layers.clone();
    mixed.push(LayerInfo { name: "lm_head".into(), kind: LayerKind::Linear, shape: vec![512, 256], params: 512 * 256, macs: 0 });
    let out = export::export(&int8(), &mixed, "mixed", ExportTarget::LlamaCpp, ExportOptions { skip_unmappable: true }).unwrap();
    assert_eq!(out.text, "^output\\.weight$=q8_0\n");
    for n in ["conv1", "fc"] {
        assert!(out.notes.iter().any(|l| l.starts_with(&format!("{n}: skipped"))), "{n}: {:?}", out.notes);
    }
}

#[test]
fn hf_rejects_what_compressed_tensors_cannot_express() {
    let (_, list) = fixture();
    let e5m2 = QuantConfig::from_json(
        r#"{"format":"mixq.quant-config","version":1,"default":{"weight":"int4"},"layers":{"lm_head":{"weight":"fp8-e5m2"}}}"#,
        Path::new("c.json"),
    )
    .unwrap();
    let e = export::export(&e5m2, &list.layers, &list.model, ExportTarget::Hf, ExportOptions::default()).unwrap_err().to_string();
    assert!(e.contains("`lm_head`") && e.contains("E5M2") && e.contains("fp8-e4m3"), "{e}");
    let out = export::export(&e5m2, &list.layers, &list.model, ExportTarget::Hf, ExportOptions { skip_unmappable: true }).unwrap();
    let v: serde_json::Value = serde_json::from_str(&out.text).unwrap();
    let qc = v["quantization_config"].to_string();
    assert!(!qc.contains("\"lm_head\""), "a skipped layer is in no group and not in `ignore`: {qc}");
    assert!(out.notes.iter().any(|n| n.starts_with("lm_head: skipped")), "{:?}", out.notes);
    // compressed-tensors quantizes Linear and Embedding modules only.
    let e = export::export(&int8(), &cnn_layers(), "cnn", ExportTarget::Hf, ExportOptions::default()).unwrap_err().to_string();
    assert!(e.contains("`conv1`") && e.contains("conv2d"), "{e}");
    // The same layer list is fine for mixq's own view.
    export::export(&int8(), &cnn_layers(), "cnn", ExportTarget::Json, ExportOptions::default()).unwrap();
}

#[test]
fn bad_configs_and_layer_lists_are_clear_errors() {
    let (_, list) = fixture();
    let unknown_layer = QuantConfig::from_json(
        r#"{"format":"mixq.quant-config","version":1,"default":{"weight":"int4"},"layers":{"model.layers.0.mlp.gate_prj":{"weight":"int8"}}}"#,
        Path::new("c.json"),
    )
    .unwrap();
    let e = export::export(&unknown_layer, &list.layers, &list.model, ExportTarget::LlamaCpp, ExportOptions::default())
        .unwrap_err()
        .to_string();
    assert!(e.contains("gate_prj") && e.contains("model.layers.0.mlp.gate_proj"), "{e}");
    let bad_group = QuantConfig::from_json(
        r#"{"format":"mixq.quant-config","version":1,"default":{"weight":"int4","granularity":"group:48"}}"#,
        Path::new("c.json"),
    )
    .unwrap();
    let e = export::export(&bad_group, &list.layers, &list.model, ExportTarget::Hf, ExportOptions::default()).unwrap_err().to_string();
    assert!(e.contains("model.embed_tokens") && e.contains("does not divide"), "{e}");
    let e = LayerList::from_json(r#"{"model":"m","layers":[{"name":"fc"}]}"#, Path::new("l.json")).unwrap_err().to_string();
    assert!(e.contains("l.json") && e.contains("layer list"), "{e}");
    let e = LayerList::from_json(r#"{"model":"m","layers":[]}"#, Path::new("l.json")).unwrap_err().to_string();
    assert!(e.contains("no layers"), "{e}");
}

fn files_in(dir: &Path) -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir(dir).unwrap().map(|e| e.unwrap().file_name().to_string_lossy().into_owned()).collect();
    v.sort();
    v
}

#[test]
fn cli_writes_the_goldens_and_prints_the_command() {
    let d = tmp("cli");
    for (to, file, golden_name) in [
        ("llama-cpp", "types.txt", "tiny-llama-2l.tensor-types.txt"),
        ("hf", "hf.json", "tiny-llama-2l.hf.json"),
        ("json", "resolved.json", "tiny-llama-2l.resolved.json"),
    ] {
        let out = d.join(file);
        let o = mixq(&["export", "--config", CONFIG, "--layers", LAYERS, "--to", to, "-o", out.to_str().unwrap()], &d);
        let (stdout, stderr) = (String::from_utf8_lossy(&o.stdout), String::from_utf8_lossy(&o.stderr));
        assert!(o.status.success(), "{to}: {stderr}");
        assert_eq!(std::fs::read_to_string(&out).unwrap(), std::fs::read_to_string(path(&format!("{DIR}/{golden_name}"))).unwrap(), "{to}");
        if to == "llama-cpp" {
            assert_eq!(
                stdout.trim(),
                format!("llama-quantize --pure --tensor-type-file {} model-f32.gguf model-mixq.gguf Q4_K_S", out.display())
            );
            assert!(stderr.contains("note: lm_head -> output.weight: int6/channel -> q6_K, an approximation"), "{stderr}");
        } else {
            assert!(stdout.is_empty(), "{to}: {stdout}");
        }
    }
    assert_eq!(files_in(&d), ["hf.json", "resolved.json", "types.txt"], "no temporary files are left");
}

#[test]
fn cli_errors_leave_the_output_untouched() {
    let d = tmp("errors");
    let out = d.join("types.txt");
    std::fs::write(&out, "previous\n").unwrap();
    let o = d.join("out");
    let args = |config: &str, layers: &str, to: &str| -> (bool, String) {
        let r = mixq(&["export", "--config", config, "--layers", layers, "--to", to, "-o", out.to_str().unwrap()], &o);
        (r.status.success(), String::from_utf8_lossy(&r.stderr).into_owned())
    };
    // A version this build does not read.
    let v2 = d.join("v2.json");
    std::fs::write(&v2, std::fs::read_to_string(path(CONFIG)).unwrap().replace("\"version\": 1", "\"version\": 2")).unwrap();
    let (ok, err) = args(v2.to_str().unwrap(), LAYERS, "llama-cpp");
    assert!(!ok && err.contains("v2.json") && err.contains("version 2") && err.contains("reads version 1"), "{err}");
    // An unknown format.
    let bad = d.join("int9.json");
    std::fs::write(&bad, r#"{"format":"mixq.quant-config","version":1,"default":{"weight":"int9"}}"#).unwrap();
    let (ok, err) = args(bad.to_str().unwrap(), LAYERS, "hf");
    assert!(!ok && err.contains("int9") && err.contains("2 to 8 bits"), "{err}");
    // Non-Llama names: the CLI says how to skip them.
    let cnn = d.join("cnn.layers.json");
    std::fs::write(&cnn, serde_json::json!({"model": "cnn", "layers": cnn_layers()}).to_string()).unwrap();
    let int8_path = d.join("int8.json");
    std::fs::write(&int8_path, int8().to_json()).unwrap();
    let (ok, err) = args(int8_path.to_str().unwrap(), cnn.to_str().unwrap(), "llama-cpp");
    assert!(!ok && err.contains("`conv1`") && err.contains("--skip-unmappable"), "{err}");
    // No layer names at all.
    let r = mixq(&["export", "--config", CONFIG, "--to", "json", "-o", out.to_str().unwrap()], &o);
    let err = String::from_utf8_lossy(&r.stderr);
    assert!(!r.status.success() && err.contains("--layers") && err.contains("tiny-llama-2l"), "{err}");
    assert_eq!(std::fs::read_to_string(&out).unwrap(), "previous\n", "a failed export never touches the output");
    assert_eq!(files_in(&d), ["cnn.layers.json", "int8.json", "int9.json", "types.txt", "v2.json"]);
}
