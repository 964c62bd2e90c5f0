// Finds, for a TorchScript module, which parameters the weight-bearing aten ops (convolution,
// linear, matmul, embedding) use during a forward pass, and with which input and output shapes.
// From these, src/model/torchscript.rs derives each layer's kind and exact multiply-accumulates.
//
// Why C++: tch's CModule exposes neither hooks nor the graph. This shim loads the module with
// torch::jit::load and runs its forward with a thread-local RecordFunction observer (the mechanism
// the PyTorch profiler uses). The observer sees every aten op the interpreter dispatches, with its
// inputs and outputs, whether the module was scripted or traced, and also inside loops, branches
// and called functions. An op counts as a use of a parameter when one of its tensor inputs has
// the parameter's data pointer and element count (so `x @ self.weight.t()` counts too). Only the
// outermost recognised op is recorded: aten::linear calls aten::matmul inside, which is skipped.
//
// The result is returned as a JSON string (see mixq_ts_layer_uses) so the Rust side needs one
// unsafe call and no C++ types.

#include <torch/script.h>
#include <torch/csrc/jit/runtime/graph_executor.h>

#include <ATen/record_function.h>

#include <cstdlib>
#include <cstring>
#include <exception>
#include <sstream>
#include <string>
#include <vector>

namespace {

// One call of a recognised op that uses a parameter.
struct Use {
  std::string op;
  bool transposed = false;
  // Per positional input: shape (empty optional when not a tensor) and parameter name (empty
  // when the input is not a parameter).
  std::vector<std::pair<bool, std::vector<int64_t>>> input_shapes;
  std::vector<std::string> input_params;
  std::vector<int64_t> output;
  bool has_output = false;
};

struct Param {
  std::string name;
  const void* data;
  int64_t numel;
};

// State of the observer; thread-local because RecordFunction callbacks are plain function
// pointers and the observer is registered for the calling thread only.
thread_local std::vector<Param>* t_params = nullptr;
thread_local std::vector<Use>* t_uses = nullptr;
thread_local int t_depth = 0;

enum class OpClass { None, Conv, ConvTransposed, Linear, Embedding };

OpClass classify(const char* name) {
  static const char* conv[] = {"aten::conv1d", "aten::conv2d", "aten::conv3d", "aten::_convolution",
                               "aten::convolution"};
  static const char* conv_t[] = {"aten::conv_transpose1d", "aten::conv_transpose2d",
                                 "aten::conv_transpose3d"};
  static const char* linear[] = {"aten::linear", "aten::matmul", "aten::mm",     "aten::addmm",
                                 "aten::bmm",    "aten::baddbmm", "aten::addmv", "aten::mv"};
  static const char* embedding[] = {"aten::embedding", "aten::embedding_bag", "aten::_embedding_bag"};
  for (auto n : conv)
    if (std::strcmp(name, n) == 0) return OpClass::Conv;
  for (auto n : conv_t)
    if (std::strcmp(name, n) == 0) return OpClass::ConvTransposed;
  for (auto n : linear)
    if (std::strcmp(name, n) == 0) return OpClass::Linear;
  for (auto n : embedding)
    if (std::strcmp(name, n) == 0) return OpClass::Embedding;
  return OpClass::None;
}

std::string param_of(const at::Tensor& t) {
  if (!t.defined() || !t.has_storage() || t.numel() == 0) return "";
  const void* data = t.data_ptr();
  for (const auto& p : *t_params) {
    if (p.data == data && p.numel == t.numel()) return p.name;
  }
  return "";
}

// Marks the use recorded at start, so that the end callback knows whether to fill its output.
struct UseContext : public at::ObserverContext {
  long index = -1;
};

std::unique_ptr<at::ObserverContext> on_start(const at::RecordFunction& fn) {
  OpClass cls = classify(fn.name());
  if (cls == OpClass::None || t_uses == nullptr) return nullptr;
  auto ctx = std::make_unique<UseContext>();
  if (t_depth > 0) {  // inside another recognised op: counted there
    t_depth += 1;
    return ctx;
  }
  // Everything that may throw happens before t_depth changes, so that a failed start (whose end
  // callback then gets no context) leaves the depth balanced.
  Use use;
  use.op = fn.name();
  bool any_param = false;
  // The boxed dispatch path (the TorchScript interpreter's) hands the observer the whole
  // interpreter stack, not only the op's arguments: the arguments are its last entries.
  auto schema = fn.operator_schema();
  auto stack = fn.inputs();
  if (!schema.has_value() || stack.size() < schema->arguments().size()) {
    t_depth += 1;  // cannot be read: not recorded (its parameter then shows no use)
    return ctx;
  }
  size_t num_args = schema->arguments().size();
  auto inputs = stack.slice(stack.size() - num_args);
  for (size_t i = 0; i < inputs.size(); ++i) {
    const c10::IValue& v = inputs[i];
    if (v.isTensor()) {
      const at::Tensor& t = v.toTensor();
      use.input_shapes.emplace_back(true, t.defined() ? t.sizes().vec() : std::vector<int64_t>{});
      std::string p = param_of(t);
      any_param = any_param || !p.empty();
      use.input_params.push_back(p);
    } else {
      use.input_shapes.emplace_back(false, std::vector<int64_t>{});
      use.input_params.emplace_back();
    }
  }
  use.transposed = cls == OpClass::ConvTransposed;
  if ((use.op == "aten::_convolution" || use.op == "aten::convolution") && inputs.size() > 6 &&
      inputs[6].isBool()) {
    use.transposed = inputs[6].toBool();
  }
  if (any_param) {
    t_uses->push_back(std::move(use));
    ctx->index = static_cast<long>(t_uses->size()) - 1;
  }
  t_depth += 1;
  return ctx;
}

void on_end(const at::RecordFunction& fn, at::ObserverContext* ctx_base) {
  if (ctx_base == nullptr || t_uses == nullptr) return;
  auto* ctx = static_cast<UseContext*>(ctx_base);
  t_depth -= 1;
  if (ctx->index < 0) return;
  Use& use = (*t_uses)[ctx->index];
  // As with the inputs, the boxed path reports the whole stack: the op's results are its last
  // entries. All recognised ops return one tensor first (embedding_bag returns four).
  auto schema = fn.operator_schema();
  const auto& stack = fn.outputs();
  size_t num_returns = schema.has_value() ? schema->returns().size() : 1;
  if (stack.size() >= num_returns && num_returns > 0 && stack[stack.size() - num_returns].isTensor()) {
    use.output = stack[stack.size() - num_returns].toTensor().sizes().vec();
    use.has_output = true;
  }
}

// Removes the observer and clears the thread-local state on every exit path.
struct ObserverGuard {
  at::CallbackHandle handle;
  ObserverGuard(std::vector<Param>* params, std::vector<Use>* uses) {
    t_params = params;
    t_uses = uses;
    t_depth = 0;
    handle = at::addThreadLocalCallback(at::RecordFunctionCallback(on_start, on_end)
                                            .needsInputs(true)
                                            .needsOutputs(true)
                                            .scopes({at::RecordScope::FUNCTION}));
  }
  ~ObserverGuard() {
    at::removeCallback(handle);
    t_params = nullptr;
    t_uses = nullptr;
    t_depth = 0;
  }
};

void json_string(std::ostringstream& o, const std::string& s) {
  o << '"';
  for (char c : s) {
    switch (c) {
      case '"': o << "\\\""; break;
      case '\\': o << "\\\\"; break;
      case '\n': o << "\\n"; break;
      case '\t': o << "\\t"; break;
      default:
        if (static_cast<unsigned char>(c) < 0x20) {
          char buf[8];
          std::snprintf(buf, sizeof buf, "\\u%04x", c);
          o << buf;
        } else {
          o << c;
        }
    }
  }
  o << '"';
}

void json_shape(std::ostringstream& o, const std::vector<int64_t>& s) {
  o << '[';
  for (size_t i = 0; i < s.size(); ++i) o << (i ? "," : "") << s[i];
  o << ']';
}

std::string to_json(const std::vector<Param>& params, const std::vector<Use>& uses) {
  std::ostringstream o;
  o << "{\"params\":[";
  for (size_t i = 0; i < params.size(); ++i) {
    o << (i ? "," : "");
    json_string(o, params[i].name);
  }
  o << "],\"uses\":[";
  for (size_t i = 0; i < uses.size(); ++i) {
    const Use& u = uses[i];
    o << (i ? "," : "") << "{\"op\":";
    json_string(o, u.op);
    o << ",\"transposed\":" << (u.transposed ? "true" : "false") << ",\"inputs\":[";
    for (size_t j = 0; j < u.input_shapes.size(); ++j) {
      o << (j ? "," : "");
      if (!u.input_shapes[j].first) {
        o << "null";
        continue;
      }
      o << "{\"shape\":";
      json_shape(o, u.input_shapes[j].second);
      o << ",\"param\":";
      if (u.input_params[j].empty()) {
        o << "null";
      } else {
        json_string(o, u.input_params[j]);
      }
      o << '}';
    }
    o << "],\"output\":";
    if (u.has_output) {
      json_shape(o, u.output);
    } else {
      o << "null";
    }
    o << '}';
  }
  o << "]}";
  return o.str();
}

char* dup(const std::string& s) {
  char* p = static_cast<char*>(std::malloc(s.size() + 1));
  if (p != nullptr) std::memcpy(p, s.c_str(), s.size() + 1);
  return p;
}

}  // namespace

extern "C" {

// Loads the TorchScript module at `path` (on the CPU), runs its forward once on `sample` (a
// torch::Tensor*, moved to the CPU) without gradients, in eval mode, with graph optimisations
// off, and writes to `*out` a malloc'ed JSON string:
//   {"params": [name, ...],
//    "uses": [{"op": "aten::conv2d", "transposed": false,
//              "inputs": [{"shape": [..], "param": "features.0.weight" | null} | null, ...],
//              "output": [..] | null}, ...]}
// in call order. Returns 0 on success; otherwise 1 and `*out` holds the error message.
// Free `*out` with mixq_ts_free.
int mixq_ts_layer_uses(const char* path, const at::Tensor* sample, char** out) {
  *out = nullptr;
  try {
    torch::jit::Module module = torch::jit::load(std::string(path), c10::Device(c10::kCPU));
    module.eval();
    std::vector<Param> params;
    for (const auto& p : module.named_parameters(/*recurse=*/true)) {
      const at::Tensor& t = p.value;
      if (!t.defined() || !t.has_storage() || t.numel() == 0) continue;
      params.push_back(Param{p.name, t.data_ptr(), t.numel()});
    }
    std::vector<Use> uses;
    at::Tensor x = sample->to(c10::Device(c10::kCPU));
    {
      torch::NoGradGuard no_grad;
      torch::jit::GraphOptimizerEnabledGuard no_opt(false);
      ObserverGuard observer(&params, &uses);
      module.forward({x});
    }
    *out = dup(to_json(params, uses));
    return *out == nullptr ? 1 : 0;
  } catch (const c10::Error& e) {
    *out = dup(e.what_without_backtrace());
  } catch (const std::exception& e) {
    *out = dup(e.what());
  } catch (...) {
    *out = dup("unknown C++ exception");
  }
  return 1;
}

// Frees a string returned by mixq_ts_layer_uses.
void mixq_ts_free(char* s) { std::free(s); }

}  // extern "C"
