// torch::autograd::grad with grad_outputs, for src/sensitivity/autograd.rs.
//
// Why C++: tch 0.26 exposes only `Tensor::run_backward(tensors, inputs, keep_graph,
// create_graph)`, which seeds every output with ones. A vector–Jacobian product J^T v then has to
// be taken as the gradient of the scalar Σ_i ⟨out_i, v_i⟩, which adds a mul, a sum and an add per
// output to the graph and runs their backward on every product. torch::autograd::grad seeds the
// backward pass with v directly, as `torch.autograd.grad(outputs, inputs, grad_outputs=v)` does
// in Python: no extra graph nodes.
//
// Tensors cross the boundary as `torch::Tensor*` (what tch's C_tensor pointers are); results are
// allocated with `new torch::Tensor(...)`, as torch-sys allocates its own results, so that the
// Rust side wraps them with `Tensor::from_ptr` and tch's Drop frees them. Every C++ exception is
// caught and returned as a message: nothing unwinds into Rust.

#include <torch/csrc/autograd/autograd.h>

#include <cstdlib>
#include <cstring>
#include <exception>
#include <stdexcept>
#include <string>
#include <vector>

namespace {

// Frees the results written so far and returns `msg` as a malloc'ed copy in `*err` (null if that
// allocation fails). Throws nothing: it runs inside the catch blocks below.
int fail(const char* msg, int n_inputs, at::Tensor** results, char** err) noexcept {
  for (int i = 0; i < n_inputs; ++i) {
    delete results[i];
    results[i] = nullptr;
  }
  size_t n = std::strlen(msg);
  char* p = static_cast<char*>(std::malloc(n + 1));
  if (p != nullptr) std::memcpy(p, msg, n + 1);
  *err = p;
  return 1;
}

}  // namespace

extern "C" {

// Computes the gradients of `outputs` (n_outputs tensors) with respect to `inputs` (n_inputs
// tensors), seeding the backward pass with `grad_outputs` (one per output, same shapes), i.e.
// torch::autograd::grad(outputs, inputs, grad_outputs, retain_graph, create_graph,
// allow_unused=true). On success returns 0 and writes n_inputs newly allocated tensors to
// `results` (an undefined tensor for an input the outputs do not depend on); the caller owns
// them. On failure returns 1, leaves every `results[i]` null, and writes to `*err` a malloc'ed
// message (null if even that allocation failed), to be freed with mixq_autograd_free_error.
int mixq_autograd_grad(const at::Tensor* const* outputs, const at::Tensor* const* grad_outputs, int n_outputs,
                       const at::Tensor* const* inputs, int n_inputs, int retain_graph, int create_graph,
                       at::Tensor** results, char** err) {
  *err = nullptr;
  for (int i = 0; i < n_inputs; ++i) results[i] = nullptr;
  try {
    std::vector<at::Tensor> outs, seeds, ins;
    outs.reserve(n_outputs);
    seeds.reserve(n_outputs);
    ins.reserve(n_inputs);
    for (int i = 0; i < n_outputs; ++i) {
      outs.push_back(*outputs[i]);
      seeds.push_back(*grad_outputs[i]);
    }
    for (int i = 0; i < n_inputs; ++i) ins.push_back(*inputs[i]);
    std::vector<at::Tensor> grads = torch::autograd::grad(outs, ins, seeds, retain_graph != 0, create_graph != 0,
                                                          /*allow_unused=*/true);
    if (grads.size() != static_cast<size_t>(n_inputs)) {
      throw std::runtime_error("torch::autograd::grad returned " + std::to_string(grads.size()) +
                               " gradients for " + std::to_string(n_inputs) + " inputs");
    }
    for (int i = 0; i < n_inputs; ++i) results[i] = new at::Tensor(std::move(grads[i]));
    return 0;
  } catch (const c10::Error& e) {
    // A failure (even an allocation failure half-way through the results) leaves nothing behind.
    return fail(e.what_without_backtrace(), n_inputs, results, err);
  } catch (const std::exception& e) {
    return fail(e.what(), n_inputs, results, err);
  } catch (...) {
    return fail("unknown C++ exception in torch::autograd::grad", n_inputs, results, err);
  }
}

// Frees a message returned by mixq_autograd_grad.
void mixq_autograd_free_error(char* s) { std::free(s); }

}  // extern "C"
