//! Vector–Jacobian products with a given seed: `torch::autograd::grad(outputs, inputs,
//! grad_outputs)`, through the C++ shim `csrc/autograd_grad.cpp`.
//!
//! Why: tch 0.26 offers only `Tensor::run_backward(tensors, inputs, keep_graph, create_graph)`,
//! which seeds each output with ones. A product `J^T v` (the second backward of a Hessian–vector
//! product, or the Gauss–Newton `J v` and `J^T r`) then has to differentiate the scalar
//! Σ_i ⟨out_i, v_i⟩, which adds a mul, a sum and an add per output to the graph and runs their
//! backward on every product. Seeding the backward pass with `v`, as PyTorch's
//! `torch.autograd.grad(..., grad_outputs=v)` does, gives the same gradients without them.

use crate::error::{Error, Result};
use std::ffi::{c_char, c_int, CStr};
use tch::Tensor;
use torch_sys::C_tensor;

extern "C" {
    fn mixq_autograd_grad(
        outputs: *const *const C_tensor,
        grad_outputs: *const *const C_tensor,
        n_outputs: c_int,
        inputs: *const *const C_tensor,
        n_inputs: c_int,
        retain_graph: c_int,
        create_graph: c_int,
        results: *mut *mut C_tensor,
        err: *mut *mut c_char,
    ) -> c_int;
    fn mixq_autograd_free_error(s: *mut c_char);
}

/// A call that does not fit `torch::autograd::grad` (a bug in the caller, not bad user input).
fn invalid(value: impl Into<String>, msg: String) -> Error {
    Error::invalid("autograd::grad arguments", value, msg)
}

/// Gradients of `outputs` with respect to `inputs`, the backward pass seeded with
/// `grad_outputs` (one per output, of its shape): Σ_j J_j^T `grad_outputs[j]` per input.
/// `keep_graph` keeps the graph for another backward pass through it; `create_graph` makes the
/// results differentiable. An input the outputs do not depend on gets an undefined tensor.
/// libtorch's errors (an output that does not require gradients, an input that is not a leaf
/// of the graph and does not require gradients, a freed graph) come back as [`Error::Torch`].
pub(crate) fn grad(
    outputs: &[&Tensor],
    grad_outputs: &[&Tensor],
    inputs: &[Tensor],
    keep_graph: bool,
    create_graph: bool,
) -> Result<Vec<Tensor>> {
    if outputs.len() != grad_outputs.len() {
        return Err(invalid(
            format!("{} grad_outputs", grad_outputs.len()),
            format!("{} outputs; give one grad_output per output", outputs.len()),
        ));
    }
    for (j, (o, s)) in outputs.iter().zip(grad_outputs).enumerate() {
        if !o.defined() || !s.defined() {
            return Err(invalid(format!("output {j}"), "it or its grad_output is an undefined tensor".into()));
        }
        if o.size() != s.size() {
            return Err(invalid(
                format!("grad_output {j}"),
                format!("shape {:?} where its output has shape {:?}; they must match", s.size(), o.size()),
            ));
        }
    }
    if let Some(i) = inputs.iter().position(|t| !t.defined()) {
        return Err(invalid(format!("input {i}"), "an undefined tensor".into()));
    }
    if outputs.is_empty() || inputs.is_empty() {
        return Ok(inputs.iter().map(|_| Tensor::new()).collect());
    }
    let too_many = |what: &str, n: usize| invalid(format!("{n} {what}"), "more than the shim takes".into());
    let n_outputs = c_int::try_from(outputs.len()).map_err(|_| too_many("outputs", outputs.len()))?;
    let n_inputs = c_int::try_from(inputs.len()).map_err(|_| too_many("inputs", inputs.len()))?;
    let outs: Vec<*const C_tensor> = outputs.iter().map(|t| t.as_ptr()).collect();
    let seeds: Vec<*const C_tensor> = grad_outputs.iter().map(|t| t.as_ptr()).collect();
    let ins: Vec<*const C_tensor> = inputs.iter().map(Tensor::as_ptr).collect();
    let mut results: Vec<*mut C_tensor> = vec![std::ptr::null_mut(); inputs.len()];
    let mut err: *mut c_char = std::ptr::null_mut();
    // SAFETY: `outs`, `seeds` (n_outputs each) and `ins` (n_inputs) hold the `torch::Tensor*`
    // pointers of tensors borrowed for the duration of the call, which the shim only reads;
    // `results` has room for n_inputs pointers and `err` is a valid location. The shim catches
    // every C++ exception, so nothing unwinds across the boundary.
    let rc = unsafe {
        mixq_autograd_grad(
            outs.as_ptr(),
            seeds.as_ptr(),
            n_outputs,
            ins.as_ptr(),
            n_inputs,
            c_int::from(keep_graph),
            c_int::from(create_graph),
            results.as_mut_ptr(),
            &mut err,
        )
    };
    if rc != 0 {
        let msg = if err.is_null() {
            "torch::autograd::grad failed (and its error message could not be allocated)".to_string()
        } else {
            // SAFETY: a non-null `err` is the shim's malloc'ed, NUL-terminated copy of the message.
            let m = unsafe { CStr::from_ptr(err) }.to_string_lossy().into_owned();
            // SAFETY: `err` came from mixq_autograd_grad and is freed exactly once, by its own free.
            unsafe { mixq_autograd_free_error(err) };
            m
        };
        return Err(Error::Torch(tch::TchError::Torch(msg)));
    }
    let mut grads = Vec::with_capacity(results.len());
    for p in results {
        if p.is_null() {
            // Not reached (the shim fills every slot on success); the pointers already wrapped
            // are freed when `grads` drops.
            return Err(Error::Torch(tch::TchError::Torch("torch::autograd::grad returned a null tensor".into())));
        }
        // SAFETY: on success each `p` is a `new torch::Tensor(...)` the shim hands over to us,
        // wrapped exactly once, so tch's Drop frees it exactly once.
        grads.push(unsafe { Tensor::from_ptr(p) });
    }
    Ok(grads)
}

#[cfg(test)]
mod tests {
    use super::*;
    use tch::{Device, Kind};

    fn leaf(v: &[f32]) -> Tensor {
        Tensor::from_slice(v).set_requires_grad(true)
    }

    #[test]
    fn seeds_the_backward_pass_with_grad_outputs() {
        let x = leaf(&[1.0, 2.0, 3.0]);
        let unused = leaf(&[5.0]);
        let y = tch::with_grad(|| &x * &x);
        let v = Tensor::from_slice(&[1.0f32, 0.5, -2.0]);
        let g = grad(&[&y], &[&v], &[x.shallow_clone(), unused.shallow_clone()], false, false).unwrap();
        // d(x²)/dx · v = 2 x v
        assert_eq!(Vec::<f32>::try_from(&g[0]).unwrap(), vec![2.0, 2.0, -12.0]);
        assert!(!g[1].defined(), "an unused input gets an undefined tensor");
    }

    #[test]
    fn second_order_matches_run_backward_of_the_dot_product() {
        let x = leaf(&[0.3, -1.2, 0.7, 2.0]);
        let v = Tensor::from_slice(&[1.0f32, -1.0, 1.0, 1.0]);
        tch::with_grad(|| {
            let l = (&x * &x * &x).sum(Kind::Float) + (&x.sin() * &x).sum(Kind::Float);
            let g = Tensor::run_backward(&[&l], &[&x], true, true).remove(0);
            let d = (&g * &v).sum(Kind::Float);
            let old = Tensor::run_backward(&[&d], &[&x], true, false).remove(0);
            let new = grad(&[&g], &[&v], &[x.shallow_clone()], false, false).unwrap().remove(0);
            assert_eq!(Vec::<f32>::try_from(&old).unwrap(), Vec::<f32>::try_from(&new).unwrap());
        });
    }

    #[test]
    fn errors_come_back_as_errors() {
        let x = leaf(&[1.0, 2.0]);
        let y = tch::with_grad(|| &x * 2.0);
        let v3 = Tensor::ones([3], (Kind::Float, Device::Cpu));
        let e = grad(&[&y], &[&v3], &[x.shallow_clone()], false, false).unwrap_err();
        assert!(e.to_string().contains("shape"), "{e}");
        let e = grad(&[&y], &[], &[x.shallow_clone()], false, false).unwrap_err();
        assert!(e.to_string().contains("one grad_output per output"), "{e}");
        // libtorch's own error: the output does not require gradients.
        let c = Tensor::ones([2], (Kind::Float, Device::Cpu));
        let v2 = Tensor::ones([2], (Kind::Float, Device::Cpu));
        let e = grad(&[&c], &[&v2], &[x.shallow_clone()], false, false).unwrap_err();
        assert!(matches!(e, Error::Torch(_)), "{e}");
        // A graph freed by a first pass without keep_graph.
        let y = tch::with_grad(|| (&x * &x).exp());
        grad(&[&y], &[&v2], &[x.shallow_clone()], false, false).unwrap();
        let e = grad(&[&y], &[&v2], &[x.shallow_clone()], false, false).unwrap_err();
        assert!(matches!(e, Error::Torch(_)), "{e}");
    }
}
