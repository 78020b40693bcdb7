// The autograd node of normkit._C.norm (the native route's eager call with gradients).
//
// NormBackward is written as torch's generated nodes are (NativeLayerNormBackward0: saved
// tensors as SavedVariable fields, scalars as plain fields, edges from collect_next_edges,
// outputs attached by set_history), not as a torch::autograd::Function: its CppNode demangles
// its own type name and locks a mutex on every backward, keeps the scalars in a string-keyed
// hash map, and wraps the outputs through the general custom-Function path. On a call of a few
// rows, where all the time is per-call overhead, that machinery cost ~10 us of a ~48 us
// forward + backward (LayerNorm 1 x 768, fp32, one thread) against torch's ~38 us.
//
// Saved tensors are SavedVariables, so everything torch gives its own nodes holds here:
// version-counter errors when a saved tensor is modified in place, "backward through the
// graph a second time" after release, saved-tensor hooks (torch.autograd.graph.
// saved_tensors_hooks, save_on_cpu) on all four tensors (x or s, weight, mean, rstd), anomaly
// mode's forward traceback. Compiled autograd runs the backward as an opaque call, as it runs
// a CppNode (compiled_args / apply_with_saved below).
#include <ATen/FuncTorchTLS.h>
#include <torch/csrc/autograd/functions/utils.h>
#include <torch/csrc/dynamo/compiled_autograd.h>
#include <torch/extension.h>

#include <array>
#include <vector>

#include "arg_checks.h"
#include "cpu_runtime.h"
#include "differentiable_backward.h"
#include "fused_args.h"

namespace normkit {

// (y, s, mean, rstd) on a contiguous (M, N) x (norm_cpu.cpp).
std::vector<at::Tensor> forward(const at::Tensor& x_in, const c10::optional<at::Tensor>& residual_in,
                                const c10::optional<at::Tensor>& weight, const c10::optional<at::Tensor>& bias,
                                double eps, bool is_rms, bool store_sum, const c10::optional<at::Tensor>& y_out);

namespace {

using at::Tensor;
using torch::autograd::SavedVariable;
using torch::autograd::variable_list;

Tensor cast(const Tensor& t, at::ScalarType dtype) { return t.scalar_type() == dtype ? t : t.to(dtype); }

// A parameter gradient (N,) in the parameter's dtype and shape (a view only for a multi-dim one:
// each view is a dispatcher call).
Tensor as_param_grad(const Tensor& g, at::ScalarType dtype, at::IntArrayRef sizes) {
  const Tensor t = cast(g, dtype);
  return t.sizes() == sizes ? t : t.view(sizes);
}

// What the backward needs besides the saved tensors (the bias itself is not needed, only its
// dtype and sizes; bias_dtype is Undefined without a bias).
struct NormScalars {
  int64_t n = 0, rows = 0;
  double eps = 0.0;
  bool is_rms = false;
  at::ScalarType bias_dtype = at::ScalarType::Undefined;
  std::vector<int64_t> bias_sizes;
};

// Which gradients to compute, by next edge: x, residual, weight, bias.
using Needs = std::array<bool, 4>;

// The gradients (dx, dresidual, dweight, dbias; undefined where not needed) from grads (dy)
// or (dy, dsum), either possibly undefined. saved: x, or s with a residual, of x's shape.
variable_list norm_backward(const variable_list& grads, const Tensor& saved, const Tensor& weight, const Tensor& mean,
                            const Tensor& rstd, const NormScalars& a, const Needs& needs) {
  const int64_t n = a.n, rows = a.rows;
  const bool flat = saved.dim() == 2 && saved.size(1) == n;  // (M, N) already: no views
  const Tensor s = flat ? saved : saved.view({rows, n});
  const bool has_res = grads.size() > 1;
  auto flat_grad = [&](const Tensor& g) {
    if (!g.defined()) return Tensor();
    return resolved((g.dim() == 2 && g.size(1) == n ? g : g.reshape({rows, n})).contiguous());
  };
  Tensor dy = grads[0].defined() ? flat_grad(grads[0]) : at::zeros_like(s);
  Tensor dsum = has_res ? flat_grad(grads[1]) : Tensor();
  const auto [need_x, need_res, need_w, need_b] = needs;
  Tensor dx, dw, db;
  // create_graph=True, or a vmap batch of gradients (is_grads_batched: a BatchedTensor has no
  // memory to read): the backward as ATen ops, which autograd and vmap see through
  const bool batched = !dy.has_storage() || (dsum.defined() && !dsum.has_storage());
  if (at::GradMode::is_enabled() || batched) {
    auto g = differentiable_backward(dy, dsum, s, weight, a.eps, a.is_rms);
    dx = g[0], dw = g[1], db = g[2];
  } else {
    // the fused backward kernel with the options off, computing only what is needed (dx
    // serves x and the residual alike)
    auto opt = [](const Tensor& t) { return t.defined() ? c10::optional<Tensor>(t) : c10::nullopt; };
    auto g = fused::fused_backward(opt(dy), c10::nullopt, opt(dsum), s, opt(weight), c10::nullopt, c10::nullopt,
                                   opt(mean), rstd, a.eps, a.is_rms, 0.0, 0,
                                   {need_x || need_res, false, false, need_w, need_b, false, false}, s.scalar_type(),
                                   c10::nullopt);
    dx = g[0], dw = g[3], db = g[4];
  }
  if (dx.defined() && !flat) dx = dx.view(saved.sizes());
  return {need_x ? dx : Tensor(), need_res ? dx : Tensor(),
          need_w ? as_param_grad(dw, weight.scalar_type(), weight.sizes()) : Tensor(),
          need_b ? as_param_grad(db, a.bias_dtype, a.bias_sizes) : Tensor()};
}

// norm_backward with its arguments packed as IValues, the form compiled autograd calls at run
// time: saved tensors (s, weight, mean, rstd), then n, rows, eps, flags, bias dtype, bias sizes.
// flags: bit 0 is_rms, bits 1-4 the needs.
variable_list norm_backward_packed(const variable_list& grads, const std::vector<c10::IValue>& args) {
  NormScalars a;
  a.n = args[4].toInt();
  a.rows = args[5].toInt();
  a.eps = args[6].toDouble();
  const int64_t flags = args[7].toInt();
  a.is_rms = flags & 1;
  a.bias_dtype = static_cast<at::ScalarType>(args[8].toInt());
  a.bias_sizes = args[9].toIntVector();
  const Needs needs{bool(flags & 2), bool(flags & 4), bool(flags & 8), bool(flags & 16)};
  auto tensor = [&](int i) { return args[i].isNone() ? Tensor() : args[i].toTensor(); };
  return norm_backward(grads, tensor(0), tensor(1), tensor(2), tensor(3), a, needs);
}

struct NormBackward : public torch::autograd::Node {
  // x, or s when there is a residual: s is an output, and double backward reaches x through it
  SavedVariable s_;
  SavedVariable weight_, mean_, rstd_;  // weight_ and (RMS norm) mean_ may hold no tensor
  bool s_is_output_ = false;
  NormScalars scalars_;

  std::string name() const override { return "normkit::NormBackward"; }

  Needs needs() const {
    return {task_should_compute_output(0), task_should_compute_output(1), task_should_compute_output(2),
            task_should_compute_output(3)};
  }

  variable_list apply(variable_list&& grads) override {
    std::lock_guard<std::mutex> lock(mutex_);  // release_variables may run on another thread
    return norm_backward(grads, s_.unpack(getptr()), weight_.unpack(), mean_.unpack(), rstd_.unpack(), scalars_,
                         needs());
  }

  void release_variables() override {
    std::lock_guard<std::mutex> lock(mutex_);
    s_.reset_data();
    weight_.reset_data();
    mean_.reset_data();
    rstd_.reset_data();
  }

  void compiled_args(torch::dynamo::autograd::CompiledNodeArgs& args) const override {
    args.collect(s_, s_is_output_);
    args.collect(weight_, false);
    args.collect(mean_, false);
    args.collect(rstd_, false);
    args.collect(scalars_.n);
    args.collect(scalars_.rows);
    args.collect(scalars_.eps);
    args.collect(scalars_.is_rms);
    args.collect(scalars_.bias_dtype);
    args.collect(scalars_.bias_sizes);
  }

  // The kernels read real memory, so compiled autograd calls the backward opaquely, as it calls
  // a CppNode that is not traceable: bound once per graph, run with the saved tensors packed.
  variable_list apply_with_saved(const variable_list& inputs,
                                 torch::dynamo::autograd::SwapSavedVariables& saved) override {
    saved.before(s_);
    saved.before(weight_);
    saved.before(mean_);
    saved.before(rstd_);
    const Needs need = needs();
    const int64_t flags = int64_t(scalars_.is_rms) | int64_t(need[0]) << 1 | int64_t(need[1]) << 2 |
                          int64_t(need[2]) << 3 | int64_t(need[3]) << 4;
    std::vector<c10::IValue> args{s_.unpack(getptr()),
                                  weight_.unpack(),
                                  mean_.unpack(),
                                  rstd_.unpack(),
                                  scalars_.n,
                                  scalars_.rows,
                                  scalars_.eps,
                                  flags,
                                  static_cast<int64_t>(scalars_.bias_dtype),
                                  scalars_.bias_sizes};
    std::vector<at::TypePtr> schema;
    schema.reserve(args.size());
    for (const auto& v : args) schema.emplace_back(v.isTensor() ? at::TensorType::get() : v.type());
    const auto& py = torch::dynamo::autograd::getPyCompilerInterface();
    const auto fn_name = py->bind_function(saved.get_py_compiler(), name(), norm_backward_packed, schema,
                                           /*is_custom_function=*/true, /*is_traceable=*/false);
    const auto output_metadata =
        torch::dynamo::autograd::IValuePacker<std::vector<std::optional<torch::autograd::InputMetadata>>>::pack(
            torch::dynamo::autograd::get_input_metadata(next_edges()));
    auto results = py->call_function(saved.get_py_compiler(), "apply_functional", fn_name, inputs, args,
                                     output_metadata);
    saved.after(s_);
    saved.after(weight_);
    saved.after(mean_);
    saved.after(rstd_);
    return results;
  }
};

}  // namespace

// The eager call with gradients (norm_cpu.cpp's norm, once it has checked the arguments):
// the kernels, then the node. Returns [y] or [y, s].
std::vector<Tensor> norm_with_grad(const Tensor& x, const c10::optional<Tensor>& residual,
                                   const c10::optional<Tensor>& weight, const c10::optional<Tensor>& bias, int64_t n,
                                   double eps, bool is_rms) {
  // A C++ node has no torch.func rule and no forward-mode formula: normkit.functional sends
  // both to the composite; a direct call is refused here, as a torch::autograd::Function is.
  if (const auto& functorch_tls = at::functorch::functorchTLSAccessor()) functorch_tls->checkSupportsCppAutogradFunction();
  TORCH_CHECK(!torch::autograd::isFwGradDefined(x) && !torch::autograd::isFwGradDefined(residual) &&
                  !torch::autograd::isFwGradDefined(weight) && !torch::autograd::isFwGradDefined(bias),
              "normkit._C.norm: forward-mode AD is not implemented here (normkit.layer_norm / rms_norm take dual "
              "tensors to the composite path)");
  const bool has_res = residual.has_value();
  const int64_t rows = n == 0 ? 0 : x.numel() / n;  // n == 0: an empty x, viewed as (0, 0)
  const bool flat = x.dim() == 2 && x.size(1) == n;  // (M, N) already: no views (each is a dispatcher call)
  auto node = c10::make_intrusive<NormBackward>();
  node->set_next_edges(torch::autograd::collect_next_edges(x, residual, weight, bias));
  Tensor y, s, mean, rstd;
  {
    // Below autograd, as a native op's kernel runs: nothing is recorded, and the reshapes of
    // x and of the results are plain aliases, so y and s are not views (in-place ops on them
    // then work as on any op's output).
    at::AutoDispatchBelowADInplaceOrView guard;
    auto as_2d = [&](const Tensor& t) { return flat ? t : t.view({rows, n}); };
    auto r2 = has_res ? c10::optional<Tensor>(as_2d(*residual)) : c10::nullopt;
    auto out = normkit::forward(as_2d(x), r2, weight, bias, eps, is_rms, has_res, c10::nullopt);
    y = flat ? out[0] : out[0].view(x.sizes());
    if (has_res) s = flat ? out[1] : out[1].view(x.sizes());
    mean = std::move(out[2]);
    rstd = std::move(out[3]);
  }
  torch::autograd::set_history(y, node);
  if (has_res) torch::autograd::set_history(s, node);
  // s is saved after set_history: an output is saved without its grad_fn (no reference cycle)
  node->s_ = has_res ? SavedVariable(s, true) : SavedVariable(x, false);
  node->s_is_output_ = has_res;
  node->weight_ = SavedVariable(weight, false);
  node->mean_ = SavedVariable(mean, false);
  node->rstd_ = SavedVariable(rstd, false);
  NormScalars& a = node->scalars_;
  a.n = n;
  a.rows = rows;
  a.eps = eps;
  a.is_rms = is_rms;
  if (bias.has_value()) {
    a.bias_dtype = bias->scalar_type();
    a.bias_sizes = bias->sizes().vec();
  }
  if (has_res) return {y, s};
  return {y};
}

}  // namespace normkit
