// The norm's backward as differentiable ATen ops, for the eager nodes' create_graph=True (and a
// vmap batch of gradients, which has no memory for a kernel to read): the statistics are
// recomputed from s, so a second derivative sees them. The math of
// normkit.reference.fused_backward with the options off; shared by norm_node.cpp (rows) and
// norm_dim_cpu.cpp (the strided layout).
#pragma once

#include <ATen/ATen.h>

#include <vector>

#include "cpu_runtime.h"

namespace normkit {

// s normalized along dim (every other dim indexes rows), with gain weight (N elements, or
// undefined) and dsum (undefined: none) added to ds:
//   ds = (g - s_hat mean(g s_hat) - mean(g)) rstd + dsum,  g = dy w  (no mean(g) for RMS norm),
// returned in dy's dtype, with dW = sum(dy s_hat) and dB = sum(dy) over every dim but dim (in
// the accumulation dtype).
inline std::vector<at::Tensor> differentiable_backward(const at::Tensor& dy, const at::Tensor& dsum,
                                                       const at::Tensor& s, const at::Tensor& weight, double eps,
                                                       bool is_rms, int64_t dim = -1) {
  using at::Tensor;
  const auto acc = acc_type(s.scalar_type());
  const int64_t d = dim < 0 ? dim + s.dim() : dim;
  std::vector<int64_t> row_dims, gain_shape(s.dim(), 1);
  for (int64_t k = 0; k < s.dim(); ++k)
    if (k != d) row_dims.push_back(k);
  gain_shape[d] = s.size(d);
  Tensor s_a = s.to(acc);
  Tensor s_hat, rstd;
  if (is_rms) {
    rstd = at::rsqrt(s_a.square().mean(d, true) + eps);
    s_hat = s_a * rstd;
  } else {
    Tensor mean = s_a.mean(d, true);
    mean = mean + (s_a - mean).mean(d, true);  // hi + lo, as the kernels' statistics
    Tensor centred = s_a - mean;
    rstd = at::rsqrt(centred.square().mean(d, true) + eps);
    s_hat = centred * rstd;
  }
  Tensor dy_a = dy.to(acc);
  Tensor g = weight.defined() ? dy_a * weight.reshape(gain_shape).to(acc) : dy_a;
  Tensor inner = g - s_hat * (g * s_hat).mean(d, true);
  if (!is_rms) inner = inner - g.mean(d, true);
  Tensor ds = inner * rstd;
  if (dsum.defined()) ds = ds + dsum.to(acc);
  return {ds.to(dy.scalar_type()), (dy_a * s_hat).sum(row_dims), dy_a.sum(row_dims)};
}

}  // namespace normkit
