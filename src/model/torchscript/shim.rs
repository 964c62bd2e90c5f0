//! The Rust side of `csrc/torchscript_layers.cpp`: one FFI call that runs a TorchScript module's
//! forward pass under a libtorch op observer and returns, as JSON, every call of a conv, linear,
//! matmul or embedding op that took a parameter, with its input and output shapes.
//!
//! This is the only `unsafe` code outside `kernels/`: tch's `CModule` offers no hooks and no
//! graph, and counting multiply-accumulates exactly needs the shapes at each weight's op.

use serde::Deserialize;
use std::ffi::{c_char, c_int, CStr, CString};
use std::path::Path;
use tch::Tensor;

extern "C" {
    fn mixq_ts_layer_uses(path: *const c_char, sample: *const torch_sys::C_tensor, out: *mut *mut c_char) -> c_int;
    fn mixq_ts_free(s: *mut c_char);
}

/// What the observer saw during one forward pass.
#[derive(Debug, Clone, Deserialize)]
pub(crate) struct Trace {
    /// Names of the module's parameters (as in its state_dict), in named_parameters order.
    #[allow(dead_code)] // read by the unit tests; kept for debugging output
    pub params: Vec<String>,
    /// Calls of recognised ops that took at least one parameter, in call order.
    pub uses: Vec<OpUse>,
}

/// One call of a recognised op (`aten::conv2d`, `aten::linear`, `aten::embedding`, ...).
#[derive(Debug, Clone, Deserialize)]
pub(crate) struct OpUse {
    /// The op, e.g. `aten::conv2d`.
    pub op: String,
    /// A transposed convolution (MACs follow the input, not the output).
    pub transposed: bool,
    /// The op's positional arguments: `None` for non-tensors.
    pub inputs: Vec<Option<OpInput>>,
    /// Shape of the op's (first) result, if it was a tensor.
    pub output: Option<Vec<i64>>,
}

/// One tensor argument of an op call.
#[derive(Debug, Clone, Deserialize)]
pub(crate) struct OpInput {
    /// Its shape.
    pub shape: Vec<i64>,
    /// The parameter it is (same data pointer and element count), if any.
    pub param: Option<String>,
}

/// Loads the module at `path` a second time inside the shim, runs its forward pass on `sample`
/// (copied to the CPU) without gradients, and returns what the observer saw. The error is
/// libtorch's message.
pub(crate) fn trace_layer_uses(path: &Path, sample: &Tensor) -> Result<Trace, String> {
    let path_str = path.to_str().ok_or_else(|| "the path is not valid UTF-8".to_string())?;
    let c_path = CString::new(path_str).map_err(|_| "the path contains a NUL byte".to_string())?;
    let mut out: *mut c_char = std::ptr::null_mut();
    // SAFETY: `c_path` is a NUL-terminated string that outlives the call; `sample.as_ptr()` is the
    // `torch::Tensor*` tch owns, valid for the call and only read by the shim; `out` is a valid
    // location for the shim's malloc'ed result, which we free below with the shim's own free.
    let rc = unsafe { mixq_ts_layer_uses(c_path.as_ptr(), sample.as_ptr(), &mut out) };
    if out.is_null() {
        return Err("the layer-discovery shim returned nothing (out of memory?)".to_string());
    }
    // SAFETY: `out` is non-null and NUL-terminated (made by the shim's strdup-like copy).
    let text = unsafe { CStr::from_ptr(out) }.to_string_lossy().into_owned();
    // SAFETY: `out` came from mixq_ts_layer_uses and is freed exactly once.
    unsafe { mixq_ts_free(out) };
    if rc != 0 {
        return Err(text);
    }
    serde_json::from_str(&text).map_err(|e| format!("the layer-discovery shim returned malformed JSON ({e})"))
}
