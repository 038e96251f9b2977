// Activation checkpointing as PyTorch's reentrant `torch.utils.checkpoint` does it, for blocks
// whose forward is a Rust closure: the forward runs the closure without building a graph and
// keeps only its inputs; the backward re-runs it with grad enabled on detached copies of those
// inputs, under the autocast state of the forward, and back-propagates through the recomputed
// graph (parameters the closure reads get their .grad accumulated there). No C++ exception
// crosses into Rust: entry points return NULL or a malloc'd message freed by dt_free_message.
#include <ATen/autocast_mode.h>
#include <torch/autograd.h>

#include "shim_error.h"

#include <cstdlib>
#include <stdexcept>
#include <string>

extern "C" {
// Runs the closure on `n` inputs (owned by the callee) and stores its output's handle (owned by
// the caller) in `output`. Returns 0 on success, else writes a message into `error`.
typedef int (*dt_ckpt_run_fn)(
    const void* closure, at::Tensor** inputs, int n, at::Tensor** output, char* error, size_t len);
// Drops the caller's reference to a closure.
typedef void (*dt_ckpt_release_fn)(const void* closure);
}

namespace {

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

// The Rust closure a graph node holds a reference to, released with the node.
struct Closure : torch::CustomClassHolder {
  dt_ckpt_run_fn run;
  dt_ckpt_release_fn release;
  const void* data;
  Closure(dt_ckpt_run_fn r, dt_ckpt_release_fn rel, const void* d) : run(r), release(rel), data(d) {}
  ~Closure() override { release(data); }

  at::Tensor operator()(const variable_list& inputs) const {
    std::vector<at::Tensor*> handles;
    for (const auto& t : inputs) {
      handles.push_back(new at::Tensor(t));
    }
    at::Tensor* output = nullptr;
    char error[512] = {0};
    // The callee owns the input handles from here on, whatever it returns.
    if (run(data, handles.data(), static_cast<int>(handles.size()), &output, error, sizeof error) != 0) {
      throw std::runtime_error(std::string("checkpointed block: ") + error);
    }
    at::Tensor result = std::move(*output);
    delete output;
    return result;
  }
};

// Autocast per device type as the forward saw it, re-entered around the recomputation.
struct AutocastState {
  bool enabled[2];
  at::ScalarType dtype[2];
  static constexpr at::DeviceType kDevices[2] = {at::kCPU, at::kCUDA};

  static AutocastState current() {
    AutocastState s;
    for (int i = 0; i < 2; ++i) {
      s.enabled[i] = at::autocast::is_autocast_enabled(kDevices[i]);
      s.dtype[i] = at::autocast::get_autocast_dtype(kDevices[i]);
    }
    return s;
  }

  void apply() const {
    for (int i = 0; i < 2; ++i) {
      at::autocast::set_autocast_enabled(kDevices[i], enabled[i]);
      at::autocast::set_autocast_dtype(kDevices[i], dtype[i]);
    }
  }
};

// Puts the forward's autocast state in place for a scope, and the previous one back after it.
class AutocastScope {
 public:
  explicit AutocastScope(const AutocastState& state) : previous_(AutocastState::current()) {
    state.apply();
    at::autocast::increment_nesting();
  }
  ~AutocastScope() {
    if (at::autocast::decrement_nesting() == 0) {
      at::autocast::clear_cache();
    }
    previous_.apply();
  }

 private:
  AutocastState previous_;
};

struct Checkpoint : torch::autograd::Function<Checkpoint> {
  // `inputs` as a TensorList: Function::apply takes a std::vector for a non-tensor argument.
  static at::Tensor forward(AutogradContext* ctx, at::TensorList inputs, c10::IValue closure) {
    // Function::apply runs this without grad mode: the block builds no graph.
    auto state = AutocastState::current();
    ctx->saved_data["closure"] = closure;
    ctx->saved_data["autocast"] = c10::IValue(std::vector<int64_t>{
        state.enabled[0], static_cast<int64_t>(state.dtype[0]), state.enabled[1],
        static_cast<int64_t>(state.dtype[1])});
    ctx->save_for_backward(inputs.vec());
    return run(ctx, inputs.vec());
  }

  static variable_list backward(AutogradContext* ctx, variable_list grad_outputs) {
    auto saved = ctx->get_saved_variables();
    // One gradient per forward argument: the inputs', then none for the closure.
    variable_list grads(saved.size() + 1);
    if (!grad_outputs[0].defined()) {
      return grads;
    }
    auto a = ctx->saved_data["autocast"].toIntVector();
    AutocastState state{{a[0] != 0, a[2] != 0},
                        {static_cast<at::ScalarType>(a[1]), static_cast<at::ScalarType>(a[3])}};
    variable_list detached;
    for (size_t i = 0; i < saved.size(); ++i) {
      detached.push_back(saved[i].detach().requires_grad_(ctx->needs_input_grad(i)));
    }
    at::Tensor output;
    {
      at::AutoGradMode grad_mode(true);
      AutocastScope autocast(state);
      output = run(ctx, detached);
    }
    if (output.requires_grad()) {
      torch::autograd::backward({output}, {grad_outputs[0]});
    }
    for (size_t i = 0; i < saved.size(); ++i) {
      if (ctx->needs_input_grad(i)) {
        grads[i] = detached[i].grad();
      }
    }
    return grads;
  }

  static at::Tensor run(AutogradContext* ctx, const variable_list& inputs) {
    auto holder = ctx->saved_data["closure"].toCapsule();
    return (*static_cast<const Closure*>(holder.get()))(inputs);
  }
};

}  // namespace

extern "C" {

// Frees a message returned by any of difftune's shims (see shim_error.h).
void dt_free_message(char* message) { std::free(message); }

int dt_grad_enabled() { return at::GradMode::is_enabled() ? 1 : 0; }

// Applies the checkpointed block to `n` inputs; `*output` receives a new handle. The node takes
// over one reference to `closure` (released through `release`, also on failure).
char* dt_ckpt_apply(
    dt_ckpt_run_fn run,
    dt_ckpt_release_fn release,
    const void* closure,
    at::Tensor** inputs,
    int n,
    at::Tensor** output) {
  return difftune::guarded("unknown C++ exception in a checkpointed block", [&] {
    auto holder = c10::make_intrusive<Closure>(run, release, closure);
    variable_list list;
    for (int i = 0; i < n; ++i) {
      list.push_back(*inputs[i]);
    }
    auto capsule = c10::IValue::make_capsule(std::move(holder));
    *output = new at::Tensor(Checkpoint::apply(at::TensorList(list), capsule));
  });
}

}  // extern "C"
