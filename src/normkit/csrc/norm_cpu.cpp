// normkit._C: the CPU backend's compiled kernels and its eager launch path.
//
//  * forward / backward: layer norm and RMS norm on contiguous (M, N) tensors, with the fused
//    residual add and prenorm output, exactly the contract of normkit.backends.base.Backend
//    (semantics: normkit.reference). Rows are spread over torch's intra-op thread pool
//    (at::parallel_for, so torch.set_num_threads is the knob) in chunks that depend on the
//    shape only; the gain/bias gradients are summed per chunk and the chunk partials added in
//    chunk order, so every result is bit-identical for any thread count. The kernels are the
//    one C++ forward and backward kernel, fused::forward_rows (fused_cpu.cpp) and
//    fused::fused_backward (fused_backward.cpp), with the options off.
//  * norm: the whole eager call (reshape, kernels, autograd node) in C++, for the Python fast
//    path of normkit.functional: a launch costs what a native torch op costs. Its autograd node
//    is NormBackward (norm_node.cpp); under create_graph=True its backward is built from
//    differentiable ATen ops (double backward).
#include <ATen/Parallel.h>
#include <c10/core/impl/TorchDispatchModeTLS.h>
#include <torch/csrc/Dtype.h>
#include <torch/csrc/autograd/python_variable.h>
#include <torch/csrc/jit/frontend/tracer.h>
#include <torch/extension.h>

#include <mutex>
#include <set>
#include <vector>

#include "arg_checks.h"
#include "cpu_runtime.h"
#include "fused_args.h"

namespace normkit {
namespace {

using at::Tensor;

// --- forward ------------------------------------------------------------------------------------

// The forward on rows x n contiguous elements of x (any shape; rows, n > 0): the fused kernel's
// plain call (fused_cpu.cpp), with s, mean and rstd written where defined.
void launch_forward(const Tensor& x, int64_t rows, int64_t n, const c10::optional<Tensor>& r,
                    const c10::optional<Tensor>& w, const c10::optional<Tensor>& b, const Tensor& y, const Tensor& s,
                    const Tensor& mean, const Tensor& rstd, double eps, bool is_rms) {
  fused::FwdCall c;
  c.rows = rows;
  c.n = n;
  c.x = x;
  c.residual = r.value_or(Tensor());
  c.weight = w.value_or(Tensor());
  c.bias = b.value_or(Tensor());
  c.y = y;
  c.s = s;
  c.mean = mean;
  c.rstd = rstd;
  c.eps = eps;
  c.is_rms = is_rms;
  c.sum_dtype = c.out_dtype = x.scalar_type();
  fused::forward_rows(c);
}

// x / residual / out / dy / s / dsum of the raw kernels: contiguous 2-D CPU tensors.
void check_2d(const Tensor& t, const char* name) {
  check_tensor(t, name, 2, true);
  check_kernel_dtype(t, name);
}

}  // namespace

// (y, s, mean, rstd) on a contiguous (M, N) x: s is undefined unless store_sum and a residual,
// mean undefined for RMS norm. y_out, when defined, receives y (a contiguous buffer like x
// that shares no memory with the inputs).
std::vector<Tensor> forward(const Tensor& x_in, const c10::optional<Tensor>& residual_in,
                            const c10::optional<Tensor>& weight, const c10::optional<Tensor>& bias, double eps,
                            bool is_rms, bool store_sum, const c10::optional<Tensor>& y_out) {
  check_2d(x_in, "x");
  const bool has_res = residual_in.has_value() && residual_in->defined();
  if (has_res) {
    check_2d(*residual_in, "residual");
    check_sizes(*residual_in, "residual", x_in.sizes());
    check_dtype(*residual_in, "residual", x_in.scalar_type());
  }
  const int64_t rows = x_in.size(0), n = x_in.size(1);
  check_param(weight, "weight", n);
  check_param(bias, "bias", n);
  check_eps(eps);
  Tensor y;
  if (y_out.has_value() && y_out->defined()) {
    y = *y_out;
    check_2d(y, "out");
    check_sizes(y, "out", x_in.sizes());
    check_dtype(y, "out", x_in.scalar_type());
    check_writable(y, "out");
    check_no_overlap(y, "out", x_in, "x");
    if (has_res) check_no_overlap(y, "out", *residual_in, "residual");
    if (weight.has_value()) check_no_overlap(y, "out", *weight, "weight");
    if (bias.has_value()) check_no_overlap(y, "out", *bias, "bias");
  } else {
    y = empty_output(x_in);
  }
  const Tensor x = resolved(x_in);
  const auto residual = resolved(residual_in);
  const auto acc = acc_type(x.scalar_type());
  Tensor s = (store_sum && has_res) ? empty_output(x) : Tensor();
  Tensor rstd = at::empty({rows}, x.options().dtype(acc));
  Tensor mean = is_rms ? Tensor() : at::empty({rows}, x.options().dtype(acc));
  if (rows == 0 || n == 0) {
    fill_empty_stats(mean, rstd);
    return {y, s, mean, rstd};
  }
  launch_forward(x, rows, n, residual, weight, bias, y, s, mean, rstd, eps, is_rms);
  return {y, s, mean, rstd};
}

// The eager call with gradients: the kernels and their autograd node (norm_node.cpp).
std::vector<Tensor> norm_with_grad(const Tensor& x, const c10::optional<Tensor>& residual,
                                   const c10::optional<Tensor>& weight, const c10::optional<Tensor>& bias, int64_t n,
                                   double eps, bool is_rms);

namespace {

// --- backward -----------------------------------------------------------------------------------

// (dx, dweight, dbias) on contiguous (M, N) tensors; dweight/dbias (N,) in the compute dtype: the
// fused backward kernel (fused_backward.cpp) with the options off, after the checks of this
// entry point (dy, s and dsum of one dtype).
std::vector<Tensor> backward(const Tensor& dy, const c10::optional<Tensor>& dsum, const Tensor& s,
                             const c10::optional<Tensor>& weight, const c10::optional<Tensor>& mean,
                             const Tensor& rstd, bool is_rms) {
  check_2d(dy, "dy");
  check_2d(s, "s");
  check_sizes(s, "s", dy.sizes());
  check_dtype(s, "s", dy.scalar_type());
  if (dsum.has_value() && dsum->defined()) {
    check_2d(*dsum, "dsum");
    check_sizes(*dsum, "dsum", dy.sizes());
    check_dtype(*dsum, "dsum", dy.scalar_type());
  }
  auto g = fused::fused_backward(dy, c10::nullopt, dsum, s, weight, c10::nullopt, c10::nullopt, mean, rstd, 0.0, is_rms,
                                 0.0, 0, {true, false, false, true, true, false, false}, dy.scalar_type(), c10::nullopt);
  return {g[0], g[3], g[4]};
}

// The forward without anything to differentiate: x (..., N) contiguous; outputs shaped like
// x (no views, no statistics stored). Arguments checked by norm.
// y_buf / s_buf, when defined, receive y / s (contiguous buffers like x that share no memory
// with the inputs or each other: try_norm's checks).
std::vector<Tensor> forward_nd(const Tensor& x, int64_t n, const c10::optional<Tensor>& r,
                               const c10::optional<Tensor>& w, const c10::optional<Tensor>& b, double eps, bool is_rms,
                               bool store_sum, const Tensor& y_buf = Tensor(), const Tensor& s_buf = Tensor()) {
  Tensor y = y_buf.defined() ? y_buf : empty_output(x);
  Tensor s = r.has_value() && store_sum ? (s_buf.defined() ? s_buf : empty_output(x)) : Tensor();
  if (x.numel() == 0) return {y, s};
  const int64_t rows = x.numel() / n;
  launch_forward(x, rows, n, r, w, b, y, s, Tensor(), Tensor(), eps, is_rms);
  return {y, s};
}

// --- the eager call ------------------------------------------------------------------------------

// The eager call on a contiguous x (..., N): returns [y] or [y, s] (s only with a residual;
// without one the prenorm output is x itself, returned by the caller). Without anything to
// differentiate it runs the kernels with no autograd node, and forms s without storing it
// unless prenorm asks for it (with autograd s is always stored: backward reads it).
// y_buf / s_buf: out= / residual_out= buffers for a call without gradients (try_norm).
std::vector<Tensor> norm(const Tensor& x_in, int64_t n, const c10::optional<Tensor>& weight,
                         const c10::optional<Tensor>& bias, double eps, bool is_rms,
                         const c10::optional<Tensor>& residual, bool prenorm, const Tensor& y_buf = Tensor(),
                         const Tensor& s_buf = Tensor()) {
  check_tensor(x_in, "x", -1, true);
  check_kernel_dtype(x_in, "x");
  TORCH_CHECK_VALUE(n >= 0, "n: expected the normalized size, >= 0, got ", n);
  TORCH_CHECK(n == 0 ? x_in.numel() == 0 : x_in.numel() % n == 0, "x: expected a whole number of rows of n = ", n,
              " elements, got sizes ", x_in.sizes());
  if (residual.has_value() && residual->defined()) {
    check_tensor(*residual, "residual", -1, true);
    check_sizes(*residual, "residual", x_in.sizes());
    check_dtype(*residual, "residual", x_in.scalar_type());
  }
  check_param(weight, "weight", n);
  check_param(bias, "bias", n);
  check_eps(eps);
  // negative-bit views (torch._neg_view) resolved here, differentiably: the kernels read raw data
  const Tensor x = resolved(x_in);
  auto r = resolved(residual), w = resolved(weight), b = resolved(bias);
  if (grad_needed(x, r, w, b)) return norm_with_grad(x, r, w, b, n, eps, is_rms);
  auto res = forward_nd(x, n, r, w, b, eps, is_rms, prenorm, y_buf, s_buf);
  if (!res[1].defined()) return {res[0]};
  return {res[0], res[1]};
}

// The "native" route of normkit.functional in one call: checks that the call is one the
// compiled path serves (exact torch.Tensor input, contiguous, strided, on the CPU, a kernel
// dtype, a normalized_shape matching its trailing dims, matching gain / bias / residual, a
// finite float eps >= 0, no dropout (or, without gradients, a float rate in (0, 1): the fused
// kernel, run_fused), a bool prenorm, no TorchDispatchMode, not jit-tracing) and
// runs it, returning y or (y, s); returns None for any other call, which then takes the
// validated general path (whose errors name the argument). Nothing here raises for a call it
// does not understand, and no Python error is left pending. (The Python side asks first what
// only Python knows: torch.compile, torch.func transforms, forward AD and the backend choice.)
struct NativeCall {
  Tensor x;
  int64_t n = 1, k = 1;  // the normalized dims' numel and count
  c10::optional<Tensor> w, b, r;
  double eps = 0.0;
  double dropout_p = 0.0;  // > 0 only where parse_native_call was asked to allow it
};

// An exact Python int as int64, or false (a bool, another type, or out of range: no error set).
bool exact_int(PyObject* o, int64_t& out) {
  if (!PyLong_CheckExact(o)) return false;
  int overflow = 0;
  const long long v = PyLong_AsLongLongAndOverflow(o, &overflow);
  if (overflow != 0 || (v == -1 && PyErr_Occurred())) {
    PyErr_Clear();
    return false;
  }
  out = v;
  return true;
}

// A gain or bias: None, or a torch.Tensor / nn.Parameter on the CPU of a kernel dtype and of the
// normalized shape.
bool parse_param(py::handle obj, at::IntArrayRef shape, c10::optional<Tensor>& out) {
  if (obj.is_none()) return true;
  if (!THPVariable_Check(obj.ptr())) return false;
  PyTypeObject* t = Py_TYPE(obj.ptr());
  if (t != reinterpret_cast<PyTypeObject*>(THPVariableClass) && t != reinterpret_cast<PyTypeObject*>(ParameterClass))
    return false;
  const Tensor& p = THPVariable_Unpack(obj.ptr());
  if (!p.device().is_cpu() || p.layout() != at::kStrided || !is_kernel_dtype(p.scalar_type()) || p.sizes() != shape)
    return false;
  out = p;
  return true;
}

bool parse_native_call(py::handle x_obj, py::handle shape_obj, py::handle w_obj, py::handle b_obj, py::handle eps_obj,
                       py::handle r_obj, py::handle dropout_obj, bool allow_dropout, NativeCall& call) {
  auto* tensor_type = reinterpret_cast<PyTypeObject*>(THPVariableClass);
  if (Py_TYPE(x_obj.ptr()) != tensor_type) return false;
  const Tensor& x = THPVariable_Unpack(x_obj.ptr());
  if (x.is_nested()) return false;  // no sizes(): the Python side runs each component
  if (!x.device().is_cpu() || x.layout() != at::kStrided || !is_kernel_dtype(x.scalar_type())) return false;
  const auto dtype = x.scalar_type();
  if (!x.is_contiguous() || x.numel() == 0) return false;
  if (!PyFloat_CheckExact(eps_obj.ptr())) return false;
  const double eps = PyFloat_AS_DOUBLE(eps_obj.ptr());
  if (!(std::isfinite(eps) && eps >= 0.0)) return false;  // the general path computes what the formula gives
  int64_t p_int = -1;
  double p = 0.0;
  if (PyFloat_CheckExact(dropout_obj.ptr())) p = PyFloat_AS_DOUBLE(dropout_obj.ptr());
  else if (!(exact_int(dropout_obj.ptr(), p_int) && p_int == 0)) return false;
  if (p != 0.0 && !(allow_dropout && p > 0.0 && p < 1.0)) return false;  // (a NaN fails both)
  // normalized_shape: an int, or a tuple / torch.Size of ints, equal to x's trailing sizes
  int64_t dims[8];
  int64_t k = 0;
  if (PyLong_CheckExact(shape_obj.ptr())) {
    if (!exact_int(shape_obj.ptr(), dims[k++])) return false;
  } else if (PyTuple_Check(shape_obj.ptr())) {
    const Py_ssize_t len = PyTuple_GET_SIZE(shape_obj.ptr());
    if (len < 1 || len > 8) return false;
    for (Py_ssize_t i = 0; i < len; ++i) {
      if (!exact_int(PyTuple_GET_ITEM(shape_obj.ptr(), i), dims[k++])) return false;
    }
  } else {
    return false;
  }
  if (x.dim() < k) return false;
  const at::IntArrayRef shape(dims, k);
  if (x.sizes().slice(x.dim() - k) != shape) return false;
  int64_t n = 1;
  for (int64_t i = 0; i < k; ++i) n *= dims[i];  // x's sizes: the product is at most x.numel()
  c10::optional<Tensor> w, b, r;
  if (!parse_param(w_obj, shape, w) || !parse_param(b_obj, shape, b)) return false;
  if (!r_obj.is_none()) {
    if (Py_TYPE(r_obj.ptr()) != tensor_type) return false;
    const Tensor& rt = THPVariable_Unpack(r_obj.ptr());
    if (!rt.device().is_cpu() || rt.layout() != at::kStrided || rt.scalar_type() != dtype || rt.sizes() != x.sizes() ||
        !rt.is_contiguous())
      return false;
    r = rt;
  }
  if (c10::impl::TorchDispatchModeTLS::stack_len() != 0 || torch::jit::tracer::isTracing()) return false;
  call.x = x;
  call.n = n;
  call.k = k;
  call.w = w;
  call.b = b;
  call.r = r;
  call.eps = eps;
  call.dropout_p = p;
  return true;
}

// An out= / residual_out= buffer the native call writes itself: an exact torch.Tensor on the
// CPU, contiguous, of x's sizes and dtype, writable, not requiring grad, and sharing no memory
// (at::get_overlap_status says so, not "too hard") with x, the residual, the gain, the bias or
// `other` (the other buffer, may be undefined). False for anything else: the general path then
// fills it, or names the error.
// (dtype: the buffer's, x's by default; `more`: further tensors it must not share memory with.)
bool parse_buffer(py::handle obj, const NativeCall& c, const Tensor& other, Tensor& out,
                  c10::optional<at::ScalarType> dtype = c10::nullopt, std::initializer_list<Tensor> more = {}) {
  if (Py_TYPE(obj.ptr()) != reinterpret_cast<PyTypeObject*>(THPVariableClass)) return false;
  const Tensor& t = THPVariable_Unpack(obj.ptr());
  if (!t.device().is_cpu() || t.layout() != at::kStrided || t.scalar_type() != dtype.value_or(c.x.scalar_type()) ||
      t.sizes() != c.x.sizes() || !t.is_contiguous() || t.is_neg() || t.is_conj() || t.requires_grad())
    return false;
  auto apart = [&](const Tensor& read) { return !read.defined() || at::get_overlap_status(t, read) == at::MemOverlapStatus::No; };
  if (!apart(c.x) || !apart(c.r.value_or(Tensor())) || !apart(c.w.value_or(Tensor())) || !apart(c.b.value_or(Tensor())) ||
      !apart(other))
    return false;
  for (const Tensor& read : more)
    if (!apart(read)) return false;
  out = t;
  return true;
}

// What a call has beyond NativeCall, for the fused kernel: try_fused's options, or nothing but
// the buffers for try_norm's dropout call.
struct FusedExtras {
  Tensor x1, rowscale;
  c10::optional<Tensor> w1, b1;
  c10::optional<at::ScalarType> sum_dtype, out_dtype;  // x's dtype where not given
  bool want_masks = false;
  Tensor y_buf, y1_buf, s_buf;  // out=, out1=, residual_out= (undefined where not given)
};

// The fused kernel (normkit.contract) on the (rows, n) views of a call try_norm or try_fused
// accepted, as ops.run's "eager_no_grad" runs it: with dropout, its seed drawn from torch's
// default generator as normkit.reference.draw_dropout_seed draws it (one randint in
// [0, 2^31 - 1)), so torch.manual_seed gives the same masks and leaves the generator in the
// same state as the Python path. Returns flash-attn's outputs: y, then y1 (weight1), s
// (prenorm: the buffer, x itself where no sum is formed, or the kernel's), mask, mask1
// (want_masks); y alone when that is all.
py::object run_fused(py::handle x_obj, const NativeCall& c, const FusedExtras& e, bool is_rms, bool prenorm) {
  const int64_t seed =
      c.dropout_p > 0.0 ? at::randint(0, 2147483647, {}, at::TensorOptions().dtype(at::kLong)).item<int64_t>() : 0;
  const int64_t rows = c.x.numel() / c.n;
  auto rows_view = [&](const Tensor& t) -> c10::optional<Tensor> {
    if (!t.defined()) return c10::nullopt;
    return t.view({rows, c.n});
  };
  auto param = [&](const c10::optional<Tensor>& t) -> c10::optional<Tensor> {
    if (!t.has_value()) return c10::nullopt;
    return t->reshape({c.n}).contiguous();
  };
  const Tensor x2 = c.x.view({rows, c.n});
  const auto dt = c.x.scalar_type();
  auto res = fused::fused_forward(
      x2, rows_view(c.r.value_or(Tensor())), rows_view(e.x1),
      e.rowscale.defined() ? c10::optional<Tensor>(e.rowscale.view({rows})) : c10::nullopt, param(c.w), param(c.b),
      param(e.w1), param(e.b1), c.eps, is_rms, c.dropout_p, seed, e.sum_dtype.value_or(dt), e.out_dtype.value_or(dt),
      prenorm, e.want_masks, rows_view(e.y_buf), rows_view(e.y1_buf), rows_view(e.s_buf));
  auto shaped = [&](const Tensor& buf, const Tensor& t) -> py::object {
    if (buf.defined()) return py::cast(buf);
    if (!t.defined()) return py::none();
    return py::cast(t.view(c.x.sizes()));
  };
  std::vector<py::object> outs{shaped(e.y_buf, res[0])};
  if (e.w1) outs.push_back(shaped(e.y1_buf, res[1]));
  if (prenorm)
    outs.push_back(!e.s_buf.defined() && res[2].is_same(x2) ? py::reinterpret_borrow<py::object>(x_obj)  // s is x
                                                             : shaped(e.s_buf, res[2]));
  if (e.want_masks) {
    outs.push_back(shaped(Tensor(), res[5]));
    outs.push_back(shaped(Tensor(), res[6]));
  }
  if (outs.size() == 1) return outs[0];
  py::tuple t(outs.size());
  for (size_t k = 0; k < outs.size(); ++k) t[k] = outs[k];
  return t;
}

py::object try_norm(py::handle x_obj, py::handle shape_obj, py::handle w_obj, py::handle b_obj, py::handle eps_obj,
                    py::handle is_rms_obj, py::handle r_obj, py::handle prenorm_obj, py::handle dropout_obj,
                    py::handle out_obj, py::handle residual_out_obj) {
  const bool is_rms = arg_bool(is_rms_obj, "is_rms");  // normkit's own flag, not the user's
  if (!PyBool_Check(prenorm_obj.ptr())) return py::none();  // the general path names the error
  NativeCall c;
  if (!parse_native_call(x_obj, shape_obj, w_obj, b_obj, eps_obj, r_obj, dropout_obj, true, c)) return py::none();
  const bool prenorm = prenorm_obj.ptr() == Py_True;
  const bool drop = c.dropout_p > 0.0;
  // dropout: only without gradients (with them the general path builds the node whose backward
  // regenerates the masks)
  if (drop && grad_needed(c.x, c.r, c.w, c.b)) return py::none();
  // buffers: only for a call without gradients (with them the general path fills the buffers by
  // a differentiable copy), residual_out only for a prenorm sum the kernel forms (a residual,
  // or dropout)
  Tensor y_buf, s_buf;
  if (!out_obj.is_none() || !residual_out_obj.is_none()) {
    if (grad_needed(c.x, c.r, c.w, c.b)) return py::none();
    if (!residual_out_obj.is_none() &&
        !(prenorm && (c.r.has_value() || drop) && parse_buffer(residual_out_obj, c, Tensor(), s_buf)))
      return py::none();
    if (!out_obj.is_none() && !parse_buffer(out_obj, c, s_buf, y_buf)) return py::none();
  }
  if (drop) {  // the fused kernel (its dropout), nothing else of the options
    FusedExtras e;
    e.y_buf = y_buf;
    e.s_buf = s_buf;
    return run_fused(x_obj, c, e, is_rms, prenorm);
  }
  auto out = norm(c.x, c.n, c.w, c.b, c.eps, is_rms, c.r, prenorm, y_buf, s_buf);
  if (!prenorm) return py::cast(out[0]);
  return py::make_tuple(out[0], c.r.has_value() ? out[1] : c.x);
}

// The native route of a call with flash-attn's options (dispatch.fused_norm) in one C++ call,
// as try_norm is for a plain call: the Python path around the kernel cost 14-52 us on a small
// call (benchmarks/results/call-overhead-2026-12-07d-before-amd-epyc.json), and 0.2-0.4 ms
// after a large one (its code and data evicted by the call's streams; printed, BENCHMARKS.md).
// Accepts only calls it checks completely, each as plan_call would accept it: parse_native_call's
// checks (the trailing dims normalized; a float dropout rate in [0, 1), 0 when not training),
// bool flags, no dim=, not casting_mode="llama", a residual of x's dtype (or float32 with
// residual_in_fp32), x1 like x, weight1 / bias1 like weight, a rowscale of x's leading shape
// (not with x1), out_dtype None or a kernel dtype, buffers as try_norm's (contiguous, of the
// result's dtype, apart from every input and each other), and nothing needing gradients (the
// general path builds the autograd node). Runs the fused kernel on the (rows, n) views, the
// dropout seed drawn only with dropout, as ops.run's "eager_no_grad" draws it, and returns
// flash-attn's tuple: y, then y1 (weight1), s (prenorm), mask, mask1 (return_dropout_mask); y
// alone when that is all. None for any other call, with no Python error pending.
py::object try_fused(py::handle x_obj, py::handle shape_obj, py::handle w_obj, py::handle b_obj, py::handle eps_obj,
                     py::handle is_rms_obj, py::handle r_obj, py::handle prenorm_obj, py::handle dropout_obj,
                     py::handle fp32_obj, py::handle x1_obj, py::handle w1_obj, py::handle b1_obj,
                     py::handle rowscale_obj, py::handle mask_obj, py::handle out_dtype_obj, py::handle out_obj,
                     py::handle out1_obj, py::handle residual_out_obj, py::handle dim_obj, py::handle llama_obj) {
  const bool is_rms = arg_bool(is_rms_obj, "is_rms");  // normkit's own flags, not the user's
  if (arg_bool(llama_obj, "llama") || !dim_obj.is_none()) return py::none();
  for (py::handle flag : {prenorm_obj, fp32_obj, mask_obj})
    if (!PyBool_Check(flag.ptr())) return py::none();
  const bool prenorm = prenorm_obj.ptr() == Py_True, in_fp32 = fp32_obj.ptr() == Py_True;
  const bool want_masks = mask_obj.ptr() == Py_True;
  NativeCall c;
  if (!parse_native_call(x_obj, shape_obj, w_obj, b_obj, eps_obj, py::none(), dropout_obj, true, c)) return py::none();
  auto* tensor_type = reinterpret_cast<PyTypeObject*>(THPVariableClass);
  const auto dt = c.x.scalar_type();
  auto exact = [&](py::handle obj, Tensor& out) {  // an exact torch.Tensor, contiguous and on the CPU
    if (Py_TYPE(obj.ptr()) != tensor_type) return false;
    out = THPVariable_Unpack(obj.ptr());
    return out.device().is_cpu() && out.layout() == at::kStrided && out.is_contiguous() && !out.is_neg() &&
           !out.is_conj();
  };
  if (!r_obj.is_none()) {  // x's dtype, or float32 with residual_in_fp32
    Tensor r;
    if (!exact(r_obj, r) || r.sizes() != c.x.sizes() || !(r.scalar_type() == dt || (in_fp32 && r.scalar_type() == at::kFloat)))
      return py::none();
    c.r = r;
  }
  Tensor x1, rowscale;
  if (!x1_obj.is_none() && !(exact(x1_obj, x1) && x1.scalar_type() == dt && x1.sizes() == c.x.sizes())) return py::none();
  const auto lead = c.x.sizes().slice(0, c.x.dim() - c.k), shape = c.x.sizes().slice(c.x.dim() - c.k);
  c10::optional<Tensor> w1, b1;
  if (!parse_param(w1_obj, shape, w1) || !parse_param(b1_obj, shape, b1)) return py::none();
  if ((w1 && !c.w) || (b1 && !w1)) return py::none();  // plan_call names the error
  if (!rowscale_obj.is_none() &&
      (x1.defined() || !exact(rowscale_obj, rowscale) || !is_kernel_dtype(rowscale.scalar_type()) ||
       rowscale.sizes() != lead))
    return py::none();
  at::ScalarType odt = dt;
  if (!out_dtype_obj.is_none()) {
    if (!THPDtype_Check(out_dtype_obj.ptr())) return py::none();
    odt = reinterpret_cast<THPDtype*>(out_dtype_obj.ptr())->scalar_type;
    if (!is_kernel_dtype(odt)) return py::none();
  }
  const at::ScalarType base = c.r ? c.r->scalar_type() : dt;
  const at::ScalarType sdt = in_fp32 ? at::promote_types(base, at::kFloat) : base;
  auto opt = [](const Tensor& t) { return t.defined() ? c10::optional<Tensor>(t) : c10::nullopt; };
  if (grad_needed(c.x, c.r, c.w, c.b, opt(x1), w1, b1, opt(rowscale))) return py::none();
  const Tensor w1t = w1.value_or(Tensor()), b1t = b1.value_or(Tensor());
  Tensor y_buf, y1_buf, s_buf;
  if (!residual_out_obj.is_none() &&
      !(prenorm && parse_buffer(residual_out_obj, c, Tensor(), s_buf, sdt, {x1, w1t, b1t, rowscale})))
    return py::none();
  if (!out1_obj.is_none() && !(w1 && parse_buffer(out1_obj, c, s_buf, y1_buf, odt, {x1, w1t, b1t, rowscale})))
    return py::none();
  if (!out_obj.is_none() && !parse_buffer(out_obj, c, s_buf, y_buf, odt, {x1, w1t, b1t, rowscale, y1_buf}))
    return py::none();

  FusedExtras e{x1, rowscale, w1, b1, sdt, odt, want_masks, y_buf, y1_buf, s_buf};
  return run_fused(x_obj, c, e, is_rms, prenorm);
}

bool accepts(py::handle x_obj, py::handle shape_obj, py::handle w_obj, py::handle b_obj, py::handle eps_obj,
             py::handle r_obj, py::handle dropout_obj) {
  NativeCall c;
  if (!parse_native_call(x_obj, shape_obj, w_obj, b_obj, eps_obj, r_obj, dropout_obj, true, c)) return false;
  return c.dropout_p == 0.0 || !grad_needed(c.x, c.r, c.w, c.b);  // try_norm's rule
}

}  // namespace
}  // namespace normkit

namespace normkit {
void register_rnn(py::module& m);       // rnn_cpu.cpp
void register_norm_dim(py::module& m);  // norm_dim_cpu.cpp
void register_fused(py::module& m);     // fused_cpu.cpp
}

// The torch this module was compiled against (setup.py defines both): the loader compares them
// with the running torch, and refuses a mismatch (normkit.backends.cpu).
#ifndef NORMKIT_BUILT_TORCH
#define NORMKIT_BUILT_TORCH "unknown"
#endif
#ifndef NORMKIT_BUILT_CXX11_ABI
#define NORMKIT_BUILT_CXX11_ABI -1
#endif

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "normkit's compiled CPU kernels (see normkit.backends.cpu)";
  m.attr("BUILT_TORCH") = NORMKIT_BUILT_TORCH;
  m.attr("BUILT_CXX11_ABI") = NORMKIT_BUILT_CXX11_ABI;
  // How many of torch's intra-op threads at::parallel_for reaches from this module: a build
  // without OpenMP compiles torch's header-only OpenMP backend out and runs every loop serially.
  m.def("parallel_threads", []() {
    std::mutex mu;
    std::set<int> ids;
    at::parallel_for(0, at::get_num_threads(), 1, [&](int64_t, int64_t) {
      std::lock_guard<std::mutex> lock(mu);
      ids.insert(at::get_thread_num());
    });
    return static_cast<int64_t>(ids.size());
  }, "the number of distinct threads one at::parallel_for over get_num_threads() items runs on");
  m.def("set_wide_vectors", &normkit::set_wide_vectors, py::arg("on"),
        "turn the option loop's AVX-512 code on (where the CPU has it) or off; returns the previous setting");
  m.def("wide_vectors", &normkit::wide_vectors, "whether the option loop runs its AVX-512 code");
  m.def("bf16_vectors", &normkit::bf16_vectors,
        "whether the option loop rounds bfloat16 outputs with AVX-512 BF16's vcvtneps2bf16 (else in integer vector "
        "operations)");
  m.def("set_scratch_offset", [](int64_t offset) {
    TORCH_CHECK_VALUE(offset >= -1, "set_scratch_offset: expected an offset >= 0 in bytes, or -1, got ", offset);
    return normkit::scratch_offset_override().exchange(offset);
  }, py::arg("offset"),
        "for benchmarks: lay the row loops' scratch rows one after another, the first `offset` bytes after the "
        "chunk's first stream in its page (-1: their own placement, clear of 4K aliasing); returns the previous "
        "setting");
  // For the tests: the page offsets ScratchRows gives `count` rows of n floats for a chunk of
  // `rows` rows (-1: enough rows to be placed) beside up to four streams, each (address, row
  // stride in bytes).
  m.def("scratch_row_offsets", [](int count, int64_t n, const std::vector<std::pair<int64_t, int64_t>>& streams,
                                  int64_t rows) {
    TORCH_CHECK_VALUE(count >= 0 && n > 0 && streams.size() <= 4 && rows >= -1,
                      "scratch_row_offsets: expected count >= 0, n > 0, rows >= -1 and at most four streams");
    if (rows == -1) rows = (normkit::kPlaceMinElements + n - 1) / n;
    normkit::RowStream s[4] = {};
    for (size_t k = 0; k < streams.size(); ++k)
      s[k] = {reinterpret_cast<const void*>(static_cast<uintptr_t>(streams[k].first)), streams[k].second};
    const normkit::ScratchRows<float> scratch(count, n, rows, {s[0], s[1], s[2], s[3]});
    std::vector<int64_t> offsets;
    for (int k = 0; k < count; ++k)
      offsets.push_back(static_cast<int64_t>(reinterpret_cast<uintptr_t>(scratch.row(k)) % normkit::kPageBytes));
    return offsets;
  }, "the page offsets of count scratch rows of n floats for a chunk of rows rows beside streams "
     "[(address, row_bytes)]",
        py::arg("count"), py::arg("n"), py::arg("streams"), py::arg("rows") = -1);
  // For the tests: whether the overlapped loop writes in descending column order with its output
  // streams at `stores` (up to two addresses), the write's loads at `loads` (up to five) and the
  // next row's read at `next_loads` (up to three).
  m.def("writes_descend", [](const std::vector<int64_t>& stores, const std::vector<int64_t>& loads,
                             const std::vector<int64_t>& next_loads) {
    TORCH_CHECK_VALUE(stores.size() <= 2 && loads.size() <= 5 && next_loads.size() <= 3,
                      "writes_descend: at most two stores, five loads and three next loads");
    const auto ptr = [](int64_t a) { return reinterpret_cast<const void*>(static_cast<uintptr_t>(a)); };
    const void* st[2] = {};
    const void* ld[5] = {};
    const void* nx[3] = {};
    for (size_t k = 0; k < stores.size(); ++k) st[k] = ptr(stores[k]);
    for (size_t k = 0; k < loads.size(); ++k) ld[k] = ptr(loads[k]);
    for (size_t k = 0; k < next_loads.size(); ++k) nx[k] = ptr(next_loads[k]);
    return normkit::writes_descend({st[0], st[1]}, {ld[0], ld[1], ld[2], ld[3], ld[4]}, {nx[0], nx[1], nx[2]});
  }, "whether the overlapped row loop writes in descending column order (4K aliasing)", py::arg("stores"),
        py::arg("loads"), py::arg("next_loads") = std::vector<int64_t>{});
  normkit::register_rnn(m);
  normkit::register_norm_dim(m);
  normkit::register_fused(m);
  using OptTensor = c10::optional<at::Tensor>;
  m.def("forward",
        [](const at::Tensor& x, const OptTensor& r, const OptTensor& w, const OptTensor& b, py::handle eps,
           py::handle is_rms, py::handle store_sum, const OptTensor& out) {
          return normkit::forward(x, r, w, b, normkit::arg_float(eps, "eps"), normkit::arg_bool(is_rms, "is_rms"),
                                  normkit::arg_bool(store_sum, "store_sum"), out);
        },
        "layer/RMS norm forward on contiguous (M, N): (y, s, mean, rstd)",
        py::arg("x"), py::arg("residual"), py::arg("weight"), py::arg("bias"), py::arg("eps"), py::arg("is_rms"),
        py::arg("store_sum"), py::arg("out") = py::none());
  m.def("backward",
        [](const at::Tensor& dy, const OptTensor& dsum, const at::Tensor& s, const OptTensor& w, const OptTensor& mean,
           const at::Tensor& rstd, py::handle is_rms) {
          return normkit::backward(dy, dsum, s, w, mean, rstd, normkit::arg_bool(is_rms, "is_rms"));
        },
        "layer/RMS norm backward on contiguous (M, N): (dx, dweight, dbias)",
        py::arg("dy"), py::arg("dsum"), py::arg("s"), py::arg("weight"), py::arg("mean"), py::arg("rstd"),
        py::arg("is_rms"));
  m.def("norm",
        [](const at::Tensor& x, py::handle n, const OptTensor& w, const OptTensor& b, py::handle eps, py::handle is_rms,
           const OptTensor& r, py::handle prenorm) {
          return normkit::norm(x, normkit::arg_int(n, "n"), w, b, normkit::arg_float(eps, "eps"),
                               normkit::arg_bool(is_rms, "is_rms"), r, normkit::arg_bool(prenorm, "prenorm"));
        },
        "the eager call with autograd: [y], or [y, s] with a residual (without autograd: when prenorm)",
        py::arg("x"), py::arg("n"), py::arg("weight"), py::arg("bias"), py::arg("eps"), py::arg("is_rms"),
        py::arg("residual"), py::arg("prenorm") = true);
  m.def("try_fused", &normkit::try_fused,
        "the native route of a call with fused options: run it and return its outputs, or None for a call it "
        "does not serve",
        py::arg("x"), py::arg("normalized_shape"), py::arg("weight"), py::arg("bias"), py::arg("eps"),
        py::arg("is_rms"), py::arg("residual"), py::arg("prenorm"), py::arg("dropout_p"), py::arg("residual_in_fp32"),
        py::arg("x1"), py::arg("weight1"), py::arg("bias1"), py::arg("rowscale"), py::arg("return_dropout_mask"),
        py::arg("out_dtype"), py::arg("out"), py::arg("out1"), py::arg("residual_out"), py::arg("dim"),
        py::arg("llama"));
  m.def("accepts", &normkit::accepts, "whether try_norm would run this call (its checks only)");
  m.def("try_norm", &normkit::try_norm,
        "the native route: y, (y, s), or None when the call is not one it serves; out / residual_out: buffers "
        "it writes (a call without gradients)",
        py::arg("x"), py::arg("normalized_shape"), py::arg("weight"), py::arg("bias"), py::arg("eps"), py::arg("is_rms"),
        py::arg("residual"), py::arg("prenorm"), py::arg("dropout_p"), py::arg("out") = py::none(),
        py::arg("residual_out") = py::none());
}
