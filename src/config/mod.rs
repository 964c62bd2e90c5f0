//! `QuantConfig`: which format each layer uses, as a versioned JSON file.
//!
//! The config is the contract between the allocator (which writes it) and everything that
//! consumes it (evaluation, kernels, deployment exporters), so it is strict: unknown fields,
//! unknown layers, unknown formats, unsupported versions and granularities that do not fit a
//! layer's shape are all errors with a message that names the field and what would be valid.
//!
//! A layer's setting resolves as torchao's `FqnToConfig` does: the exact fully qualified name in
//! `layers`, else the first rule in `rules` whose regex matches the whole name, else `default`.
//! Each entry is complete on its own: fields it omits take the built-in defaults (per-channel
//! granularity, the format's default scale type, min–max clipping), not the values of `default`.
//! The JSON Schema of the file is `src/config/quant-config.v1.schema.json`.

pub mod export;

use crate::error::{Error, Result};
use crate::model::{LayerInfo, QuantModel, ResolvedLayer};
use crate::quant::{Clipping, Format, Granularity, QuantSpec, ScaleType};
use regex::Regex;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::path::Path;

/// The `"format"` field of every config file.
pub const CONFIG_FORMAT: &str = "mixq.quant-config";
/// The config version this build reads and writes.
pub const CONFIG_VERSION: u64 = 1;
/// The JSON Schema of config version 1.
pub const CONFIG_SCHEMA: &str = include_str!("quant-config.v1.schema.json");

/// How one layer is quantized, as written in the config.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LayerSetting {
    /// Weight format; `fp32` (or `none`) keeps full precision.
    pub weight: Format,
    /// Which weights share a scale; default `channel`.
    #[serde(default, skip_serializing_if = "Option::is_none", with = "opt_str")]
    pub granularity: Option<Granularity>,
    /// Storage type of the scales; default depends on the format (see [`Format::default_scale`]).
    #[serde(default, skip_serializing_if = "Option::is_none", with = "opt_str")]
    pub scale: Option<ScaleType>,
    /// Range selection; default `minmax`.
    #[serde(default, skip_serializing_if = "Option::is_none", with = "opt_str")]
    pub clipping: Option<Clipping>,
    /// Format of the layer's input activation (native models only); absent: not quantized.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub activation: Option<Format>,
}

impl LayerSetting {
    /// A weight-only setting with the built-in defaults for everything else.
    pub fn weight(spec: QuantSpec) -> Self {
        let gran = (!spec.format.is_keep()).then_some(spec.granularity);
        let scale = (spec.scale != spec.format.default_scale(spec.granularity) && !spec.format.is_keep()).then_some(spec.scale);
        let clipping = (spec.clipping != Clipping::MinMax).then_some(spec.clipping);
        LayerSetting { weight: spec.format, granularity: gran, scale, clipping, activation: None }
    }

    /// The weight quantization this setting asks for.
    pub fn spec(&self) -> QuantSpec {
        let granularity = self.granularity.unwrap_or(Granularity::PerChannel);
        QuantSpec {
            format: self.weight,
            granularity,
            scale: self.scale.unwrap_or_else(|| self.weight.default_scale(granularity)),
            clipping: self.clipping.unwrap_or_default(),
        }
    }
}

impl Default for LayerSetting {
    fn default() -> Self {
        LayerSetting { weight: Format::Fp32, granularity: None, scale: None, clipping: None, activation: None }
    }
}

/// A regex rule: layers whose whole name matches `pattern` get `setting`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Rule {
    /// A regular expression (Rust `regex` syntax) that must match the whole layer name.
    pub pattern: String,
    /// The setting for matching layers.
    #[serde(flatten)]
    pub setting: LayerSetting,
}

/// The model a config was made for.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ModelRef {
    /// Zoo name or path.
    pub name: String,
    /// SHA-256 of the weights ([`QuantModel::weights_hash`]).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub weights_sha256: Option<String>,
}

/// A per-layer quantization config (JSON, `"format": "mixq.quant-config"`, version 1).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct QuantConfig {
    /// Always `mixq.quant-config`.
    pub format: String,
    /// Always 1 for this build.
    pub version: u64,
    /// The model the config was made for (informational; checked when present).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub model: Option<ModelRef>,
    /// The setting of layers not named in `layers` and matched by no rule.
    pub default: LayerSetting,
    /// Exact fully qualified layer names → setting.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub layers: BTreeMap<String, LayerSetting>,
    /// Regex rules, tried in order after the exact names.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub rules: Vec<Rule>,
    /// Where the config came from: tool, command, budgets, objective, solver, gap, sensitivity
    /// source and hash. Free-form; written by the stage that made the config.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub provenance: BTreeMap<String, serde_json::Value>,
}

impl QuantConfig {
    /// A config with `default` for every layer and nothing else.
    pub fn uniform(default: LayerSetting) -> Self {
        QuantConfig {
            format: CONFIG_FORMAT.to_string(),
            version: CONFIG_VERSION,
            model: None,
            default,
            layers: BTreeMap::new(),
            rules: Vec::new(),
            provenance: BTreeMap::new(),
        }
    }

    /// Parses a config from JSON text; `origin` names the file in errors.
    pub fn from_json(text: &str, origin: &Path) -> Result<Self> {
        let value = crate::util::parse_versioned_json(text, origin, CONFIG_FORMAT, CONFIG_VERSION, "mixq quant config")?;
        serde_json::from_value(value).map_err(|e| Error::parse(origin, e.to_string()))
    }

    /// Reads a config file.
    pub fn load(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
        Self::from_json(&text, path)
    }

    /// Pretty JSON with a trailing newline (deterministic: maps are ordered).
    pub fn to_json(&self) -> String {
        let mut s = serde_json::to_string_pretty(self).expect("a QuantConfig always serializes");
        s.push('\n');
        s
    }

    /// Writes the config atomically (temp file + rename).
    pub fn save(&self, path: &Path) -> Result<()> {
        crate::util::write_atomic(path, self.to_json().as_bytes())
    }

    /// Resolves every layer of `model` (exact name → first matching rule → default) and validates
    /// the result: everything [`QuantConfig::resolve_layers`] checks, plus activation formats on a
    /// model without activation quantization and a `model.weights_sha256` that does not match.
    pub fn resolve(&self, model: &dyn QuantModel) -> Result<Vec<ResolvedLayer>> {
        if let Some(ModelRef { weights_sha256: Some(want), name }) = &self.model {
            let got = model.weights_hash();
            if &got != want {
                tracing::warn!("config was made for model {name} with weights {want:.12}…, this model's weights are {got:.12}…");
            }
        }
        let out = self.resolve_layers(model.layers(), model.name())?;
        if !model.supports_activation_quant() {
            if let Some((r, act)) = out.iter().find_map(|r| r.activation.map(|a| (r, a))) {
                return Err(Error::Unsupported(format!(
                    "{} asks for {act} activations at layer `{}`, but {} is a TorchScript model: mixq quantizes its weights only; activation quantization needs a native model",
                    r.source,
                    r.layer.name,
                    model.name()
                )));
            }
        }
        Ok(out)
    }

    /// Resolves a list of layers without a model (exact name → first matching rule → default):
    /// what the exporters use, from a layer list alone. Errors on unknown layer names (with the
    /// closest existing names), invalid regexes and group sizes that do not divide a layer's input
    /// dimension; `target` names the model in warnings about rules that match nothing.
    pub fn resolve_layers(&self, layers: &[LayerInfo], target: &str) -> Result<Vec<ResolvedLayer>> {
        for name in self.layers.keys() {
            if !layers.iter().any(|l| &l.name == name) {
                return Err(Error::unknown_layer(name, layers.iter().map(|l| l.name.as_str())));
            }
        }
        let rules = self
            .rules
            .iter()
            .enumerate()
            .map(|(i, r)| {
                Regex::new(&format!("^(?:{})$", r.pattern))
                    .map(|re| (i, re, &r.setting))
                    .map_err(|e| Error::invalid(format!("rules[{i}].pattern"), &r.pattern, format!("not a valid regex: {e}")))
            })
            .collect::<Result<Vec<_>>>()?;
        let mut out = Vec::with_capacity(layers.len());
        for layer in layers {
            let (setting, source) = if let Some(s) = self.layers.get(&layer.name) {
                (s, "layers".to_string())
            } else if let Some((i, _, s)) = rules.iter().find(|(_, re, _)| re.is_match(&layer.name)) {
                (*s, format!("rules[{i}]"))
            } else {
                (&self.default, "default".to_string())
            };
            let spec = setting.spec();
            spec.check_fits(&layer.name, &layer.shape)?;
            out.push(ResolvedLayer { layer: layer.clone(), weight: spec, activation: setting.activation.filter(|a| !a.is_keep()), source });
        }
        for (i, re, _) in &rules {
            if !layers.iter().any(|l| re.is_match(&l.name)) {
                tracing::warn!("rules[{i}] (`{}`) matches no layer of {target}", self.rules[*i].pattern);
            }
        }
        Ok(out)
    }
}

/// Serde helpers for optional values that serialize as their `Display` string.
mod opt_str {
    use serde::{Deserialize, Deserializer, Serializer};
    use std::fmt::Display;
    use std::str::FromStr;

    pub fn serialize<T: Display, S: Serializer>(v: &Option<T>, s: S) -> Result<S::Ok, S::Error> {
        match v {
            Some(v) => s.collect_str(v),
            None => s.serialize_none(),
        }
    }

    pub fn deserialize<'de, T, D>(d: D) -> Result<Option<T>, D::Error>
    where
        T: FromStr,
        T::Err: Display,
        D: Deserializer<'de>,
    {
        let s: Option<String> = Option::deserialize(d)?;
        s.map(|s| s.parse().map_err(serde::de::Error::custom)).transpose()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn example() -> QuantConfig {
        let mut c = QuantConfig::uniform(LayerSetting { weight: Format::Int { bits: 8, signed: true }, ..Default::default() });
        c.layers.insert(
            "fc".into(),
            LayerSetting {
                weight: Format::Int { bits: 4, signed: false },
                granularity: Some(Granularity::PerGroup(32)),
                ..Default::default()
            },
        );
        c.rules.push(Rule { pattern: "layer1\\..*".into(), setting: LayerSetting { weight: Format::Fp8E4M3, ..Default::default() } });
        c.provenance.insert("tool".into(), serde_json::json!("mixq test"));
        c
    }

    #[test]
    fn json_round_trip() {
        let c = example();
        let back = QuantConfig::from_json(&c.to_json(), Path::new("x.json")).unwrap();
        assert_eq!(back, c);
        assert_eq!(back.to_json(), c.to_json());
    }

    #[test]
    fn wrong_version_and_format_are_rejected() {
        let mut v: serde_json::Value = serde_json::from_str(&example().to_json()).unwrap();
        v["version"] = 2.into();
        let e = QuantConfig::from_json(&v.to_string(), Path::new("c.json")).unwrap_err().to_string();
        assert!(e.contains("c.json") && e.contains("version 2") && e.contains("reads version 1"), "{e}");
        v["version"] = 1.into();
        v["format"] = "something-else".into();
        let e = QuantConfig::from_json(&v.to_string(), Path::new("c.json")).unwrap_err().to_string();
        assert!(e.contains("not a mixq quant config"), "{e}");
    }

    #[test]
    fn unknown_fields_and_formats_are_rejected() {
        let text = r#"{"format":"mixq.quant-config","version":1,"default":{"weight":"int8","granularty":"channel"}}"#;
        let e = QuantConfig::from_json(text, Path::new("c.json")).unwrap_err().to_string();
        assert!(e.contains("granularty"), "{e}");
        let text = r#"{"format":"mixq.quant-config","version":1,"default":{"weight":"int9"}}"#;
        let e = QuantConfig::from_json(text, Path::new("c.json")).unwrap_err().to_string();
        assert!(e.contains("int9") && e.contains("2 to 8 bits"), "{e}");
    }

    #[test]
    fn setting_spec_defaults() {
        let s = LayerSetting { weight: Format::Fp4E2M1, granularity: Some(Granularity::PerGroup(16)), ..Default::default() };
        assert_eq!(s.spec().scale, ScaleType::E4M3);
        let back = LayerSetting::weight(s.spec());
        assert_eq!(back, s);
    }
}
