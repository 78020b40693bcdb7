// The argument helpers the fused entry points share (fused_cpu.cpp: forward and the Python
// bindings, fused_backward.cpp: backward).
#pragma once

#include <torch/csrc/Dtype.h>
#include <torch/extension.h>

#include <cmath>
#include <type_traits>
#include <vector>

#include "arg_checks.h"
#include "cpu_runtime.h"

namespace normkit {
namespace fused {

using at::Tensor;
using OptTensor = c10::optional<Tensor>;

template <typename T>
using acc_of = std::conditional_t<std::is_same_v<T, double>, double, float>;

// f(T{}) for a kernel dtype.
template <typename F>
decltype(auto) with_dtype(at::ScalarType t, const F& f) {
  switch (t) {
    case at::kFloat: return f(float{});
    case at::kDouble: return f(double{});
    case at::kBFloat16: return f(c10::BFloat16{});
    case at::kHalf: return f(c10::Half{});
    default: TORCH_CHECK_TYPE(false, "normkit fused kernels: unsupported dtype ", t);
  }
}


inline at::ScalarType arg_dtype(py::handle h, const char* name) {
  TORCH_CHECK_TYPE(THPDtype_Check(h.ptr()), name, ": expected a torch.dtype, got ", type_name(h));
  const auto t = reinterpret_cast<THPDtype*>(h.ptr())->scalar_type;
  TORCH_CHECK_TYPE(is_kernel_dtype(t), name, ": expected float32, float64, bfloat16 or float16, got ", t);
  return t;
}

inline bool given(const OptTensor& t) { return t.has_value() && t->defined(); }

// t's elements as T, or null for an undefined tensor (what the call does not have).
template <typename T>
T* data_or_null(const Tensor& t) {
  return t.defined() ? static_cast<T*>(t.data_ptr()) : nullptr;
}

// A gain / bias as a contiguous (n,) tensor of acc (as_param), `fill` (1 for a gain, 0 for a
// bias: exact) where the call has none: for the loops that read all of w, b, w1, b1.
inline Tensor param_or(const Tensor& p, int64_t n, double fill, at::ScalarType acc, const at::TensorOptions& opts) {
  const Tensor t = as_param(p, acc);
  return t.defined() ? t : at::full({n}, fill, opts.dtype(acc));
}

inline void check_rows(const Tensor& t, const char* name, at::IntArrayRef sizes) {
  check_tensor(t, name, 2, true);
  check_kernel_dtype(t, name);
  check_sizes(t, name, sizes);
}

// rowscale: (M,) any kernel dtype, read as a contiguous Acc copy.
inline Tensor as_rowscale(const OptTensor& rs, int64_t rows, at::ScalarType acc) {
  if (!given(rs)) return Tensor();
  check_tensor(*rs, "rowscale", 1, false);
  check_kernel_dtype(*rs, "rowscale");
  check_sizes(*rs, "rowscale", {rows});
  return as_param(rs, acc);
}

inline void check_dropout(double p) {
  TORCH_CHECK_VALUE(std::isfinite(p) && p >= 0.0 && p < 1.0, "dropout_p: expected a number in [0, 1), got ", p);
}


// One forward call after its checks, with its outputs allocated: what the kernel reads and
// writes, an undefined tensor for what the call does not have. rowscale: (M,) contiguous in
// the sum's compute dtype (as_rowscale); s: the sum buffer, undefined when the call forms no
// sum (contract.sum_is_input) or does not store it; mean / rstd may be undefined (not wanted).
struct FwdCall {
  int64_t rows = 0, n = 0;  // the tensors hold rows x n contiguous elements (any shape)
  Tensor x, residual, x1, rowscale, weight, bias, weight1, bias1;
  Tensor y, y1, s, mask, mask1, mean, rstd;
  double eps = 0.0;
  bool is_rms = false;
  double dropout_p = 0.0;
  int64_t seed = 0;
  at::ScalarType sum_dtype = at::kFloat, out_dtype = at::kFloat;
};

// The fused forward kernel (fused_cpu.cpp) on a call of at least one row of at least one element.
void forward_rows(const FwdCall& c);

// forward_rows for a call with options in the one-read row loop (fused_options_cpu.cpp); false,
// having done nothing, for a dtype set that loop is not built for.
bool option_rows(const FwdCall& c);

// The fused forward of normkit.contract on contiguous (M, N) tensors (fused_cpu.cpp): y, y1, s,
// mean, rstd, mask, mask1 (undefined where the call has none).
std::vector<Tensor> fused_forward(const Tensor& x, const OptTensor& residual, const OptTensor& x1,
                                  const OptTensor& rowscale, const OptTensor& weight, const OptTensor& bias,
                                  const OptTensor& weight1, const OptTensor& bias1, double eps, bool is_rms,
                                  double dropout_p, int64_t seed, at::ScalarType sum_dtype, at::ScalarType out_dtype,
                                  bool store_sum, bool store_mask, const OptTensor& out, const OptTensor& out1,
                                  const OptTensor& residual_out);

// The fused backward (fused_backward.cpp): needs = (dx, dx1, dresidual, dweight, dbias, dweight1, dbias1).
std::vector<Tensor> fused_backward(const OptTensor& dy, const OptTensor& dy1, const OptTensor& dsum, const Tensor& s,
                                   const OptTensor& weight, const OptTensor& weight1, const OptTensor& rowscale,
                                   const OptTensor& mean, const Tensor& rstd, double eps, bool is_rms, double dropout_p,
                                   int64_t seed, const std::vector<bool>& needs, at::ScalarType x_dtype,
                                   c10::optional<at::ScalarType> residual_dtype);

}  // namespace fused
}  // namespace normkit
