//! The crate's one error type. Every public function checks its inputs (shapes, code ranges,
//! scales) before any `unsafe` code runs, and reports what it expected, what it got, and what to do.

/// Errors of the low-bit kernels.
#[derive(Debug, thiserror::Error)]
pub enum KernelError {
    /// A buffer or tensor does not have the length / shape the operation needs.
    #[error("{what}: expected {expected}, got {got}")]
    Shape {
        /// Which argument.
        what: String,
        /// What the operation needs.
        expected: String,
        /// What it was given.
        got: String,
    },
    /// The scales do not describe whole groups that divide the inner dimension.
    #[error("group size: {scales_per_row} scales per row do not divide the inner dimension {k} into equal groups; pass one scale per group of a size that divides {k} (one per row for per-channel)")]
    Group {
        /// Scales per row given.
        scales_per_row: usize,
        /// Inner dimension.
        k: usize,
    },
    /// A code is not on the format's grid (out of range, or not a representable FP value).
    #[error("{format} code at index {index} is {value}, which is not on the grid ({rule})")]
    Code {
        /// The format being packed.
        format: &'static str,
        /// Flat index of the offending code.
        index: usize,
        /// The offending value.
        value: String,
        /// What the grid allows.
        rule: &'static str,
    },
    /// A scale is zero, negative, NaN or infinite.
    #[error("scale at index {index} is {value}; scales must be positive and finite")]
    Scale {
        /// Flat index of the offending scale.
        index: usize,
        /// The offending value.
        value: f32,
    },
    /// The operation does not support this format or device.
    #[error("unsupported: {0}")]
    Unsupported(String),
    /// A libtorch operation failed.
    #[error("libtorch: {0}")]
    Torch(#[from] tch::TchError),
}

/// `Result` with [`KernelError`].
pub type Result<T> = std::result::Result<T, KernelError>;

pub(crate) fn shape(what: impl Into<String>, expected: impl ToString, got: impl ToString) -> KernelError {
    KernelError::Shape { what: what.into(), expected: expected.to_string(), got: got.to_string() }
}
