//! The library's one error type. Every variant carries the context a user needs to fix the input:
//! the file, layer or field, what was found, and what would be valid.

use std::path::PathBuf;

/// Errors returned by the mixq library.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A file could not be read or written.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The underlying error.
        source: std::io::Error,
    },
    /// A file's content is malformed (wrong magic, truncated, bad JSON, ...).
    #[error("{path}: {msg}")]
    Parse {
        /// The file (or a name such as `<embedded digits>`).
        path: PathBuf,
        /// What is wrong, and what would be valid.
        msg: String,
    },
    /// A versioned output file has a format/version this build cannot read.
    #[error("{path}: unsupported {what} version {got}; this mixq reads version {expected}")]
    Version {
        /// The file.
        path: PathBuf,
        /// The kind of file, e.g. `mixq.quant-config`.
        what: String,
        /// The version found.
        got: u64,
        /// The version supported.
        expected: u64,
    },
    /// A number format, granularity or option string is not recognised or not valid.
    #[error("invalid {field} `{value}`: {msg}")]
    Invalid {
        /// The field or flag, e.g. `weight format` or `layers.fc.granularity`.
        field: String,
        /// The value given.
        value: String,
        /// What is wrong and what would be valid.
        msg: String,
    },
    /// A layer name that the model does not have.
    #[error("unknown layer `{name}`{}", suggest(.closest))]
    UnknownLayer {
        /// The name given.
        name: String,
        /// The closest existing layer names.
        closest: Vec<String>,
    },
    /// Data whose shape or dtype does not fit the model.
    #[error("{source_name}: {msg}")]
    Data {
        /// Where the data came from (a path or `digits:test`).
        source_name: String,
        /// What is wrong, and what the model expects.
        msg: String,
    },
    /// A model that cannot be loaded or does not behave as a classifier mixq can handle.
    #[error("model {model}: {msg}")]
    Model {
        /// The model path or zoo name.
        model: String,
        /// What is wrong.
        msg: String,
    },
    /// An operation the model does not support (e.g. activation quantization on TorchScript).
    #[error("{0}")]
    Unsupported(String),
    /// No configuration satisfies every budget (a solver outcome, not a malformed input): each
    /// budget with its limit and the smallest value any allowed configuration reaches.
    #[error("budget {}: no configuration fits: {}{}; raise a budget, or allow smaller formats",
        .budgets.iter().map(|b| format!("`{}`", b.budget)).collect::<Vec<_>>().join(" "),
        .budgets.iter().map(|b| b.to_string()).collect::<Vec<_>>().join("; "),
        .joint.as_ref().map(|j| format!("; {j}")).unwrap_or_default())]
    Infeasible {
        /// Every budget of the problem, with its limit and smallest achievable value.
        budgets: Vec<crate::alloc::Shortfall>,
        /// Why the budgets fail together when each is reachable alone (None when one is not).
        joint: Option<String>,
    },
    /// An error raised inside libtorch.
    #[error("libtorch: {0}")]
    Torch(#[from] tch::TchError),
    /// An error of the low-bit kernels (mixq-kernels).
    #[error("kernels: {0}")]
    Kernel(#[from] mixq_kernels::KernelError),
    /// Another error, with what was being done when it happened (printed as
    /// `context: error`, the chain `anyhow` prints with `{:#}`).
    #[error("{context}")]
    Context {
        /// What was being done, e.g. ``loading data `digits:calib` ``.
        context: String,
        /// The error.
        source: Box<Error>,
    },
}

fn suggest(closest: &[String]) -> String {
    if closest.is_empty() {
        String::new()
    } else {
        format!("; did you mean {}?", closest.iter().map(|c| format!("`{c}`")).collect::<Vec<_>>().join(", "))
    }
}

/// The library's result type.
pub type Result<T, E = Error> = std::result::Result<T, E>;

impl Error {
    /// An I/O error on `path`.
    pub fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        Error::Io { path: path.into(), source }
    }
    /// A parse error in `path`.
    pub fn parse(path: impl Into<PathBuf>, msg: impl Into<String>) -> Self {
        Error::Parse { path: path.into(), msg: msg.into() }
    }
    /// An invalid value for `field`.
    pub fn invalid(field: impl Into<String>, value: impl Into<String>, msg: impl Into<String>) -> Self {
        Error::Invalid { field: field.into(), value: value.into(), msg: msg.into() }
    }
    /// This error with what was being done when it happened.
    pub fn context(self, context: impl Into<String>) -> Self {
        Error::Context { context: context.into(), source: Box::new(self) }
    }
    /// An unknown layer name, with the closest names among `known` as suggestions.
    pub fn unknown_layer<'a>(name: &str, known: impl IntoIterator<Item = &'a str>) -> Self {
        Error::UnknownLayer { name: name.to_string(), closest: crate::util::closest(name, known, 3) }
    }
}
