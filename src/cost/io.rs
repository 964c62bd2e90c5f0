//! Reading and writing cost tables, so that sensitivities from other tools can be solved by mixq
//! and the tables mixq builds can be inspected or edited.
//!
//! CSV: one row per (layer, format), header `layer,format,cost,bytes,bops,latency_us,params,bits`
//! in any column order. `layer`, `format`, `cost` and `bytes` are required; `bops`, `latency_us`
//! (empty = unknown), `params` and `bits` (default `8·bytes`) are optional. Lines starting with
//! `#` and empty lines are skipped. Layers keep the order of their first row. Errors name the file,
//! the line and the field.
//!
//! JSON: `{"format": "mixq.cost-table", "version": 1, "layers": [...]}` with the fields of
//! [`CostTable`].

use super::{CostOption, CostTable, LayerCosts};
use crate::error::{Error, Result};
use serde::{Deserialize, Serialize};
use std::collections::HashMap;
use std::path::Path;
use std::rc::Rc;

/// The `"format"` field of a cost table in JSON.
pub const COST_TABLE_FORMAT: &str = "mixq.cost-table";
/// The cost-table version this build reads and writes.
pub const COST_TABLE_VERSION: u64 = 1;

const CSV_HEADER: &str = "layer,format,cost,bytes,bops,latency_us,params,bits";

/// One parsed CSV row, with what is needed to name it in an error.
pub(crate) struct Record<'a> {
    origin: &'a Path,
    line: usize,
    columns: Rc<HashMap<String, usize>>,
    fields: Vec<&'a str>,
}

impl Record<'_> {
    /// The field `name` ("" when the column is absent).
    pub(crate) fn get(&self, name: &str) -> &str {
        self.columns.get(name).and_then(|&i| self.fields.get(i)).copied().unwrap_or("")
    }
    /// An error on field `field` of this line.
    pub(crate) fn err(&self, field: &str, msg: impl std::fmt::Display) -> Error {
        Error::parse(self.origin, format!("line {}, field `{field}` (`{}`): {msg}", self.line, self.get(field)))
    }
    /// The field parsed as a number (finite).
    pub(crate) fn num<T: std::str::FromStr>(&self, field: &str) -> Result<T> {
        let s = self.get(field);
        if s.is_empty() {
            return Err(self.err(field, "missing value"));
        }
        let v: T = s.parse().map_err(|_| self.err(field, "not a number"))?;
        Ok(v)
    }
    /// The field parsed as a number, or None when empty.
    pub(crate) fn opt_num<T: std::str::FromStr>(&self, field: &str) -> Result<Option<T>> {
        if self.get(field).is_empty() {
            Ok(None)
        } else {
            self.num(field).map(Some)
        }
    }
}

/// Splits a CSV text into records, checking that the header has the `required` columns and only
/// known (`required` + `optional`) ones.
pub(crate) fn csv_records<'a>(text: &'a str, origin: &'a Path, required: &[&str], optional: &[&str]) -> Result<Vec<Record<'a>>> {
    let mut lines = text.lines().enumerate().filter(|(_, l)| !l.trim().is_empty() && !l.trim_start().starts_with('#'));
    let (hline, header) =
        lines.next().ok_or_else(|| Error::parse(origin, format!("empty file; expected a CSV header `{}`", required.join(","))))?;
    let mut columns = HashMap::new();
    for (i, h) in header.split(',').map(str::trim).enumerate() {
        if !required.contains(&h) && !optional.contains(&h) {
            return Err(Error::parse(
                origin,
                format!(
                    "line {}: unknown column `{h}`; columns are {} (required) and {} (optional)",
                    hline + 1,
                    required.join(","),
                    optional.join(",")
                ),
            ));
        }
        if columns.insert(h.to_string(), i).is_some() {
            return Err(Error::parse(origin, format!("line {}: column `{h}` appears twice", hline + 1)));
        }
    }
    for r in required {
        if !columns.contains_key(*r) {
            return Err(Error::parse(origin, format!("line {}: missing column `{r}` in the header", hline + 1)));
        }
    }
    let columns = Rc::new(columns);
    let ncol = columns.len();
    let mut out = Vec::new();
    for (i, l) in lines {
        if l.contains('"') {
            return Err(Error::parse(origin, format!("line {}: quoted fields are not supported", i + 1)));
        }
        let fields: Vec<&str> = l.split(',').map(str::trim).collect();
        if fields.len() != ncol {
            return Err(Error::parse(origin, format!("line {}: {} fields, the header has {ncol}", i + 1, fields.len())));
        }
        out.push(Record { origin, line: i + 1, columns: Rc::clone(&columns), fields });
    }
    Ok(out)
}

#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct JsonTable {
    format: String,
    version: u64,
    layers: Vec<LayerCosts>,
}

impl CostTable {
    /// The table as CSV (header `layer,format,cost,bytes,bops,latency_us,params,bits`); numbers
    /// are written so that they read back exactly.
    pub fn to_csv(&self) -> String {
        let mut s = String::from(CSV_HEADER);
        s.push('\n');
        for l in &self.layers {
            for o in &l.options {
                let lat = o.latency_us.map(|t| t.to_string()).unwrap_or_default();
                s.push_str(&format!("{},{},{},{},{},{},{},{}\n", l.name, o.format, o.cost, o.bytes, o.bops, lat, l.params, o.bits));
            }
        }
        s
    }

    /// Parses a CSV table; `origin` names the file in errors.
    pub fn from_csv(text: &str, origin: &Path) -> Result<CostTable> {
        let rows = csv_records(text, origin, &["layer", "format", "cost", "bytes"], &["bops", "latency_us", "params", "bits"])?;
        if rows.is_empty() {
            return Err(Error::parse(origin, "the table has a header but no rows"));
        }
        let mut layers: Vec<LayerCosts> = Vec::new();
        let mut index: HashMap<String, usize> = HashMap::new();
        for r in &rows {
            let name = r.get("layer");
            if name.is_empty() {
                return Err(r.err("layer", "missing layer name"));
            }
            let format = r.get("format");
            if format.is_empty() {
                return Err(r.err("format", "missing format"));
            }
            let cost: f64 = r.num("cost")?;
            if !cost.is_finite() {
                return Err(r.err("cost", "cost must be finite"));
            }
            let bytes: u64 = r.num("bytes").map_err(|_| r.err("bytes", "must be a whole number of bytes ≥ 0"))?;
            let bits: u64 = match r.opt_num::<u64>("bits").map_err(|_| r.err("bits", "must be a whole number ≥ 0"))? {
                Some(b) if b.div_ceil(8) != bytes => return Err(r.err("bits", format!("{b} bits is not {bytes} bytes rounded up"))),
                Some(b) => b,
                None => bytes * 8,
            };
            let bops: f64 = r.opt_num("bops")?.unwrap_or(0.0);
            if !bops.is_finite() || bops < 0.0 {
                return Err(r.err("bops", "must be finite and ≥ 0"));
            }
            let latency_us: Option<f64> = r.opt_num("latency_us")?;
            if latency_us.is_some_and(|t| !t.is_finite() || t < 0.0) {
                return Err(r.err("latency_us", "must be finite and ≥ 0"));
            }
            let params: Option<i64> = r.opt_num("params").map_err(|_| r.err("params", "must be a whole number ≥ 0"))?;
            if params.is_some_and(|p| p < 0) {
                return Err(r.err("params", "must be ≥ 0"));
            }
            let li = *index.entry(name.to_string()).or_insert_with(|| {
                layers.push(LayerCosts { name: name.to_string(), params: params.unwrap_or(0), trace_per_param: None, options: Vec::new() });
                layers.len() - 1
            });
            let layer = &mut layers[li];
            if let Some(p) = params {
                if layer.params != p {
                    return Err(r.err("params", format!("layer `{name}` has {} params on an earlier line", layer.params)));
                }
            }
            if layer.option(format).is_some() {
                return Err(r.err("format", format!("layer `{name}` already has a row for this format")));
            }
            layer.options.push(CostOption { format: format.to_string(), cost, bytes, bits, bops, latency_us });
        }
        let table = CostTable { layers };
        table.validate().map_err(|e| Error::parse(origin, e.to_string()))?;
        Ok(table)
    }

    /// The table as JSON (`"format": "mixq.cost-table"`, version 1), with a trailing newline.
    pub fn to_json(&self) -> String {
        let t = JsonTable { format: COST_TABLE_FORMAT.into(), version: COST_TABLE_VERSION, layers: self.layers.clone() };
        let mut s = serde_json::to_string_pretty(&t).expect("a cost table always serializes");
        s.push('\n');
        s
    }

    /// Parses a JSON table; `origin` names the file in errors.
    pub fn from_json(text: &str, origin: &Path) -> Result<CostTable> {
        let value = crate::util::parse_versioned_json(text, origin, COST_TABLE_FORMAT, COST_TABLE_VERSION, "mixq cost table")?;
        let t: JsonTable = serde_json::from_value(value).map_err(|e| Error::parse(origin, e.to_string()))?;
        let table = CostTable { layers: t.layers };
        table.validate().map_err(|e| Error::parse(origin, e.to_string()))?;
        Ok(table)
    }

    /// Reads a table: JSON when the file name ends in `.json`, CSV otherwise.
    pub fn load(path: &Path) -> Result<CostTable> {
        let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
        if is_json(path) {
            Self::from_json(&text, path)
        } else {
            Self::from_csv(&text, path)
        }
    }

    /// Writes the table atomically: JSON when the name ends in `.json`, CSV otherwise.
    pub fn save(&self, path: &Path) -> Result<()> {
        let text = if is_json(path) { self.to_json() } else { self.to_csv() };
        crate::util::write_atomic(path, text.as_bytes())
    }
}

fn is_json(path: &Path) -> bool {
    path.extension().is_some_and(|e| e.eq_ignore_ascii_case("json"))
}
