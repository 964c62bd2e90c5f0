//! `mixq export`: a config in the form a deployment tool reads (thin layer over
//! [`crate::config::export`]).

use crate::config::export::{self, ExportOptions, ExportTarget, LayerList};
use crate::config::QuantConfig;
use anyhow::{Context, Result};
use clap::{Args, ValueEnum};
use std::path::PathBuf;

/// Export targets on the command line.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum To {
    /// A `--tensor-type-file` for llama.cpp's `llama-quantize` (GGUF tensor names, ggml types).
    LlamaCpp,
    /// A compressed-tensors `quantization_config` (llm-compressor, transformers, vLLM).
    Hf,
    /// mixq's own resolved per-layer view.
    Json,
}

impl From<To> for ExportTarget {
    fn from(t: To) -> Self {
        match t {
            To::LlamaCpp => ExportTarget::LlamaCpp,
            To::Hf => ExportTarget::Hf,
            To::Json => ExportTarget::Json,
        }
    }
}

/// `mixq export`.
#[derive(Args, Debug)]
pub struct ExportArgs {
    /// The quant config (JSON, `mixq.quant-config` version 1).
    #[arg(long)]
    pub config: PathBuf,
    /// What to write.
    #[arg(long, value_enum)]
    pub to: To,
    /// The model's layer list, as `mixq layers --json` prints it; no model is loaded.
    #[arg(long, conflicts_with = "model")]
    pub layers: Option<PathBuf>,
    /// Or load this model (zoo name or file) for its layer list.
    #[arg(long)]
    pub model: Option<String>,
    /// Sample data for `--model`, which a TorchScript model needs to discover its layers
    /// (`digits[:split]`, a `.safetensors` file, or `X.npy[,Y.npy]`).
    #[arg(long, requires = "model", default_value = "digits:calib")]
    pub data: String,
    /// Leave layers the target cannot name or express out of the export, with a warning, instead
    /// of failing.
    #[arg(long)]
    pub skip_unmappable: bool,
    /// The output file, written atomically.
    #[arg(short, long)]
    pub output: PathBuf,
}

/// Runs `mixq export`.
pub fn run(a: ExportArgs) -> Result<()> {
    let config = QuantConfig::load(&a.config)?;
    let (model, layers) = match (&a.layers, &a.model) {
        (Some(path), _) => {
            let list = LayerList::load(path)?;
            (list.model, list.layers)
        }
        (None, Some(spec)) => {
            let (m, _) = crate::pipeline::load_model_and_data(spec, &a.data)?;
            (m.name().to_string(), m.layers().to_vec())
        }
        (None, None) => {
            let hint = config.model.as_ref().map(|m| format!(" (this config was made for `{}`)", m.name)).unwrap_or_default();
            anyhow::bail!(
                "mixq export needs the model's layer names: pass --layers FILE (from `mixq layers --model M --json`) or --model M{hint}"
            );
        }
    };
    let target = ExportTarget::from(a.to);
    let out = export::export(&config, &layers, &model, target, ExportOptions { skip_unmappable: a.skip_unmappable })
        .map_err(|e| match e {
            crate::Error::Unsupported(msg) if !a.skip_unmappable => {
                anyhow::anyhow!("{msg}; --skip-unmappable leaves such layers out with a warning")
            }
            e => e.into(),
        })
        .with_context(|| format!("exporting {} to {target}", a.config.display()))?;
    out.save(&a.output)?;
    for n in &out.notes {
        eprintln!("note: {n}");
    }
    eprintln!("{target} export of {} ({} layers of {model}) written to {}", a.config.display(), layers.len(), a.output.display());
    if let Some(cmd) = out.command(&a.output) {
        println!("{cmd}");
    }
    Ok(())
}
