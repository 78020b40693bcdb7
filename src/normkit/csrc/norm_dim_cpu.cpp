// Layer norm / RMS norm over a middle block of dims, without moving them last: x (contiguous)
// viewed as (outer, N, inner), each of the outer * inner columns normalized over its N
// elements (stride inner). What normkit.layer_norm(x, shape, dim=d) and layer_norm_2d (NCHW,
// statistics over C per pixel) compute; a permute to the last dim would copy the whole tensor
// twice. Semantics as normkit.reference: statistics in float (double for double input) by the
// corrected two-pass algorithm, then y = (x - mean) * rstd * w[n] + b[n].
//
// Work is split into (outer index, tile of kTile columns): a tile's statistics are vectors over
// its columns, so every loop runs along inner, contiguous, and vectorizes. Sums run in blocks of
// kBlock elements of N in Acc, the blocks added in double (as the row kernels). The gain/bias
// gradients are summed per chunk of outer indices (fixed by the shape) and the chunks added in
// order, so results do not depend on the thread count.
#include <ATen/Parallel.h>
#include <torch/extension.h>

#include <vector>

#include "arg_checks.h"
#include "cpu_runtime.h"
#include "differentiable_backward.h"
#include "row_math.h"

namespace normkit {
namespace {

using at::Tensor;
constexpr int64_t kTile = 64;

template <typename T, typename Acc>
struct DimArgs {
  const T* x;
  const Acc* w;  // (N,) or null
  const Acc* b;
  T* y;
  Acc* mean;  // (outer, inner) or null
  Acc* rstd;
  int64_t outer, n, inner;
  Acc eps;
  bool is_rms;
};

// Statistics and output of columns [i0, i0 + len) of outer index o.
template <typename T, typename Acc>
NORMKIT_INLINE void dim_fwd_tile(const DimArgs<T, Acc>& a, int64_t o, int64_t i0, int64_t len) {
  const int64_t n = a.n, inner = a.inner;
  const T* x = a.x + o * n * inner + i0;
  double tot[kTile], tot_d[kTile];
  Acc mean[kTile], lo[kTile], rstd[kTile], blk[kTile], blk_d[kTile];
  for (int64_t i = 0; i < len; ++i) tot[i] = 0.0;
  if (!a.is_rms) {
    for (int64_t k0 = 0; k0 < n; k0 += kBlock) {
      for (int64_t i = 0; i < len; ++i) blk[i] = 0;
      for (int64_t k = k0; k < std::min(n, k0 + kBlock); ++k) {
        const T* xr = x + k * inner;
#pragma omp simd
        for (int64_t i = 0; i < len; ++i) blk[i] += load<T, Acc>(xr[i]);
      }
      for (int64_t i = 0; i < len; ++i) tot[i] += static_cast<double>(blk[i]);
    }
  }
  for (int64_t i = 0; i < len; ++i) {
    mean[i] = a.is_rms ? Acc(0) : static_cast<Acc>(tot[i]) / static_cast<Acc>(n);
    tot[i] = 0.0;
    tot_d[i] = 0.0;
  }
  for (int64_t k0 = 0; k0 < n; k0 += kBlock) {
    for (int64_t i = 0; i < len; ++i) blk[i] = blk_d[i] = 0;
    for (int64_t k = k0; k < std::min(n, k0 + kBlock); ++k) {
      const T* xr = x + k * inner;
#pragma omp simd
      for (int64_t i = 0; i < len; ++i) {
        const Acc d = load<T, Acc>(xr[i]) - mean[i];
        blk[i] += d * d;
        blk_d[i] += d;
      }
    }
    for (int64_t i = 0; i < len; ++i) {
      tot[i] += static_cast<double>(blk[i]);
      tot_d[i] += static_cast<double>(blk_d[i]);
    }
  }
  for (int64_t i = 0; i < len; ++i) {
    double var = tot[i] / static_cast<double>(n);
    lo[i] = 0;
    if (!a.is_rms) {  // the mean as hi + lo, as row_math.h's RowStats
      const double c = tot_d[i] / static_cast<double>(n);
      const double refined = static_cast<double>(mean[i]) + c;
      mean[i] = static_cast<Acc>(refined);
      lo[i] = static_cast<Acc>(refined - static_cast<double>(mean[i]));
      var = std::max(var - c * c, 0.0);
    }
    rstd[i] = Acc(1) / std::sqrt(static_cast<Acc>(var) + a.eps);
  }
  T* y = a.y + o * n * inner + i0;
  for (int64_t k = 0; k < n; ++k) {
    const T* xr = x + k * inner;
    T* yr = y + k * inner;
    const Acc w = a.w ? a.w[k] : Acc(1), b = a.b ? a.b[k] : Acc(0);
#pragma omp simd
    for (int64_t i = 0; i < len; ++i) yr[i] = store<T>(((load<T, Acc>(xr[i]) - mean[i]) - lo[i]) * rstd[i] * w + b);
  }
  if (a.mean) std::copy(mean, mean + len, a.mean + o * inner + i0);
  if (a.rstd) std::copy(rstd, rstd + len, a.rstd + o * inner + i0);
}

template <typename T, typename Acc>
struct DimBwdArgs {
  const T* x;
  const T* dy;
  const Acc* w;  // never null
  const Acc* mean;  // null for RMS norm
  const Acc* rstd;
  T* dx;
  int64_t outer, n, inner;
};

// dx of columns [i0, i0 + len) of outer index o; their dy * x_hat and dy added to dwp / dbp (N,).
template <typename T, typename Acc>
NORMKIT_INLINE void dim_bwd_tile(const DimBwdArgs<T, Acc>& a, int64_t o, int64_t i0, int64_t len, Acc* dwp, Acc* dbp) {
  const int64_t n = a.n, inner = a.inner;
  const int64_t base = o * n * inner + i0;
  const T* x = a.x + base;
  const T* dy = a.dy + base;
  Acc mu[kTile], lo[kTile], rs[kTile], blk_g[kTile], blk_gx[kTile], m_g[kTile], m_gx[kTile];
  double tot_g[kTile], tot_gx[kTile];
  for (int64_t i = 0; i < len; ++i) {
    mu[i] = a.mean ? a.mean[o * inner + i0 + i] : Acc(0);
    rs[i] = a.rstd[o * inner + i0 + i];
    tot_g[i] = tot_gx[i] = 0.0;
    lo[i] = 0;
  }
  if (a.mean) {  // lo of the mean (hi + lo, see the forward): the mean of x - hi
    for (int64_t k0 = 0; k0 < n; k0 += kBlock) {
      for (int64_t i = 0; i < len; ++i) blk_g[i] = 0;
      for (int64_t k = k0; k < std::min(n, k0 + kBlock); ++k) {
        const T* xr = x + k * inner;
#pragma omp simd
        for (int64_t i = 0; i < len; ++i) blk_g[i] += load<T, Acc>(xr[i]) - mu[i];
      }
      for (int64_t i = 0; i < len; ++i) tot_g[i] += static_cast<double>(blk_g[i]);
    }
    for (int64_t i = 0; i < len; ++i) {
      lo[i] = static_cast<Acc>(tot_g[i] / static_cast<double>(n));
      tot_g[i] = 0.0;
    }
  }
  for (int64_t k0 = 0; k0 < n; k0 += kBlock) {
    for (int64_t i = 0; i < len; ++i) blk_g[i] = blk_gx[i] = 0;
    for (int64_t k = k0; k < std::min(n, k0 + kBlock); ++k) {
      const T* xr = x + k * inner;
      const T* dr = dy + k * inner;
      const Acc w = a.w[k];
#pragma omp simd
      for (int64_t i = 0; i < len; ++i) {
        const Acc g = load<T, Acc>(dr[i]) * w;
        blk_g[i] += g;
        blk_gx[i] += g * (((load<T, Acc>(xr[i]) - mu[i]) - lo[i]) * rs[i]);
      }
    }
    for (int64_t i = 0; i < len; ++i) {
      tot_g[i] += static_cast<double>(blk_g[i]);
      tot_gx[i] += static_cast<double>(blk_gx[i]);
    }
  }
  for (int64_t i = 0; i < len; ++i) {
    m_g[i] = a.mean ? static_cast<Acc>(tot_g[i]) / static_cast<Acc>(n) : Acc(0);
    m_gx[i] = static_cast<Acc>(tot_gx[i]) / static_cast<Acc>(n);
  }
  T* dx = a.dx + base;
  for (int64_t k = 0; k < n; ++k) {
    const T* xr = x + k * inner;
    const T* dr = dy + k * inner;
    T* out = dx + k * inner;
    const Acc w = a.w[k];
    Acc sw = 0, sb = 0;
#pragma omp simd reduction(+ : sw, sb)
    for (int64_t i = 0; i < len; ++i) {
      const Acc xh = ((load<T, Acc>(xr[i]) - mu[i]) - lo[i]) * rs[i];
      const Acc d = load<T, Acc>(dr[i]);
      out[i] = store<T>((d * w - xh * m_gx[i] - m_g[i]) * rs[i]);
      sw += d * xh;
      sb += d;
    }
    dwp[k] += sw;
    dbp[k] += sb;
  }
}

#define NORMKIT_DIM_KERNELS(T, ACC)                                                                          \
  NORMKIT_CLONES void dim_fwd(const DimArgs<T, ACC>& a, int64_t o) {                                        \
    for (int64_t i0 = 0; i0 < a.inner; i0 += kTile) dim_fwd_tile<T, ACC>(a, o, i0, std::min(kTile, a.inner - i0)); \
  }                                                                                                          \
  NORMKIT_CLONES void dim_bwd(const DimBwdArgs<T, ACC>& a, int64_t o, ACC* dwp, ACC* dbp) {                 \
    for (int64_t i0 = 0; i0 < a.inner; i0 += kTile)                                                          \
      dim_bwd_tile<T, ACC>(a, o, i0, std::min(kTile, a.inner - i0), dwp, dbp);                               \
  }
NORMKIT_DIM_KERNELS(float, float)
NORMKIT_DIM_KERNELS(double, double)
NORMKIT_DIM_KERNELS(c10::BFloat16, float)
NORMKIT_DIM_KERNELS(c10::Half, float)

// [y, mean, rstd]; mean undefined for RMS norm. Arguments checked by norm_dim.
std::vector<Tensor> dim_forward(const Tensor& x, int64_t outer, int64_t n, int64_t inner,
                                const c10::optional<Tensor>& weight, const c10::optional<Tensor>& bias, double eps,
                                bool is_rms) {
  TORCH_CHECK(x.is_contiguous() && x.device().is_cpu() && x.numel() == outer * n * inner && !x.is_neg(),
              "x: expected a contiguous CPU tensor of outer * N * inner elements");
  const auto acc = acc_type(x.scalar_type());
  Tensor w = as_param(weight, acc), b = as_param(bias, acc);
  Tensor y = empty_output(x);
  Tensor rstd = at::empty({outer, inner}, x.options().dtype(acc));
  Tensor mean = is_rms ? Tensor() : at::empty({outer, inner}, x.options().dtype(acc));
  if (x.numel() == 0) {
    fill_empty_stats(mean, rstd);
    return {y, mean, rstd};
  }
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "normkit_dim_forward", [&] {
    using Acc = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;
    DimArgs<scalar_t, Acc> a{.x = x.const_data_ptr<scalar_t>(),
                             .w = w.defined() ? w.const_data_ptr<Acc>() : nullptr,
                             .b = b.defined() ? b.const_data_ptr<Acc>() : nullptr,
                             .y = y.data_ptr<scalar_t>(),
                             .mean = mean.defined() ? mean.data_ptr<Acc>() : nullptr,
                             .rstd = rstd.data_ptr<Acc>(),
                             .outer = outer,
                             .n = n,
                             .inner = inner,
                             .eps = static_cast<Acc>(eps),
                             .is_rms = is_rms};
    for_each_chunk(outer, x.numel() <= kSerialMaxElements, [&](int64_t o) { dim_fwd(a, o); });
  });
  return {y, mean, rstd};
}

// [dx, dweight, dbias] (dweight / dbias (N,) in the compute dtype).
std::vector<Tensor> dim_backward(const Tensor& dy, const Tensor& x, int64_t outer, int64_t n, int64_t inner,
                                 const Tensor& weight, const Tensor& mean, const Tensor& rstd) {
  const auto acc = acc_type(x.scalar_type());
  Tensor w = weight.defined() ? as_param(weight, acc) : at::ones({n}, x.options().dtype(acc));
  Tensor dyc = resolved(dy.contiguous());
  Tensor dx = empty_output(x);
  if (x.numel() == 0)  // no rows to split (outer == 0 would divide by zero below)
    return {dx, at::zeros({n}, x.options().dtype(acc)), at::zeros({n}, x.options().dtype(acc))};
  const int64_t chunks = std::min<int64_t>(outer, 64);
  const int64_t per = (outer + chunks - 1) / chunks;
  Tensor dw_part = at::zeros({chunks, n}, x.options().dtype(acc)), db_part = at::zeros({chunks, n}, x.options().dtype(acc));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "normkit_dim_backward", [&] {
    using Acc = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;
    DimBwdArgs<scalar_t, Acc> a{.x = x.const_data_ptr<scalar_t>(),
                                .dy = dyc.const_data_ptr<scalar_t>(),
                                .w = w.const_data_ptr<Acc>(),
                                .mean = mean.defined() ? mean.const_data_ptr<Acc>() : nullptr,
                                .rstd = rstd.const_data_ptr<Acc>(),
                                .dx = dx.data_ptr<scalar_t>(),
                                .outer = outer,
                                .n = n,
                                .inner = inner};
    Acc* dwp = dw_part.data_ptr<Acc>();
    Acc* dbp = db_part.data_ptr<Acc>();
    for_each_chunk(chunks, x.numel() <= kSerialMaxElements, [&](int64_t c) {
      for (int64_t o = c * per; o < std::min(outer, (c + 1) * per); ++o) dim_bwd(a, o, dwp + c * n, dbp + c * n);
    });
  });
  return {dx, dw_part.sum(0), db_part.sum(0)};  // the chunk partials, added in chunk order
}

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

struct NormDimFunction : public torch::autograd::Function<NormDimFunction> {
  static variable_list forward(AutogradContext* ctx, const Tensor& x, const c10::optional<Tensor>& weight,
                               const c10::optional<Tensor>& bias, int64_t outer, int64_t n, int64_t inner, double eps,
                               bool is_rms) {
    auto out = dim_forward(x, outer, n, inner, weight, bias, eps, is_rms);
    ctx->save_for_backward({x, weight.value_or(Tensor())});
    ctx->saved_data["mean"] = out[1];
    ctx->saved_data["rstd"] = out[2];
    ctx->saved_data["dims"] = std::vector<int64_t>{outer, n, inner};
    ctx->saved_data["eps"] = eps;
    ctx->saved_data["is_rms"] = is_rms;
    ctx->saved_data["bias_dtype"] = bias.has_value() ? static_cast<int64_t>(bias->scalar_type()) : int64_t(-1);
    ctx->saved_data["bias_shape"] = bias.has_value() ? bias->sizes().vec() : std::vector<int64_t>{};
    return {out[0]};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    auto saved = ctx->get_saved_variables();
    const Tensor& x = saved[0];
    const Tensor& weight = saved[1];
    const auto dims = ctx->saved_data["dims"].toIntVector();
    const int64_t outer = dims[0], n = dims[1], inner = dims[2];
    const bool is_rms = ctx->saved_data["is_rms"].toBool();
    Tensor dy = grads[0];
    Tensor dx, dw, db;
    // create_graph, or a vmap batch of gradients (no memory to read): differentiable ops,
    // statistics recomputed from x
    if (at::GradMode::is_enabled() || !dy.has_storage()) {
      auto g = differentiable_backward(dy.reshape({outer, n, inner}), Tensor(), x.reshape({outer, n, inner}), weight,
                                       ctx->saved_data["eps"].toDouble(), is_rms, 1);
      dx = g[0].to(x.scalar_type()).reshape(x.sizes());
      dw = g[1];
      db = g[2];
    } else {
      Tensor mean = ctx->saved_data["mean"].toTensor();
      auto r = dim_backward(dy, x, outer, n, inner, weight, mean, ctx->saved_data["rstd"].toTensor());
      dx = r[0];
      dw = r[1];
      db = r[2];
    }
    int64_t edge = 0;
    const bool need_x = ctx->needs_input_grad(edge++);
    const bool need_w = weight.defined() && ctx->needs_input_grad(edge++);
    const int64_t bias_dtype = ctx->saved_data["bias_dtype"].toInt();
    const bool need_b = bias_dtype >= 0 && ctx->needs_input_grad(edge++);
    return {need_x ? dx : Tensor(),
            need_w ? dw.to(weight.scalar_type()).view(weight.sizes()) : Tensor(),
            need_b ? db.to(static_cast<at::ScalarType>(bias_dtype)).view(ctx->saved_data["bias_shape"].toIntVector())
                   : Tensor(),
            Tensor(), Tensor(), Tensor(), Tensor(), Tensor()};
  }
};

// normalize x (any strides; made contiguous) over its dims [start, start + k): y with x's shape.
Tensor norm_dim(const Tensor& x_in, int64_t start, int64_t k, const c10::optional<Tensor>& weight,
                const c10::optional<Tensor>& bias, double eps, bool is_rms) {
  check_tensor(x_in, "x", -1, false);
  check_kernel_dtype(x_in, "x");
  TORCH_CHECK_INDEX(start >= 0 && start < x_in.dim(), "start: expected a dim of x in [0, ", x_in.dim(), "), got ", start);
  TORCH_CHECK_INDEX(k >= 1 && k <= x_in.dim() - start, "k: expected 1 <= k <= ", x_in.dim() - start,
                    " (dims from start = ", start, " to the last of x's ", x_in.dim(), "), got ", k);
  int64_t outer = 1, n = 1, inner = 1;
  for (int64_t d = 0; d < x_in.dim(); ++d) {
    int64_t& part = d < start ? outer : d < start + k ? n : inner;
    // an empty x may have sizes whose product does not fit 64 bits
    TORCH_CHECK(!__builtin_mul_overflow(part, x_in.size(d), &part), "x: sizes ", x_in.sizes(),
                " give a normalized or batch size beyond 64 bits");
  }
  check_param(weight, "weight", n);
  check_param(bias, "bias", n);
  check_eps(eps);
  // resolved before the autograd node (differentiably): the kernels read raw data
  const Tensor x = resolved(x_in);
  auto w = resolved(weight), b = resolved(bias);
  if (grad_needed(x, w, b))
    return NormDimFunction::apply(x.contiguous(), w, b, outer, n, inner, eps, is_rms)[0];
  return dim_forward(x.contiguous(), outer, n, inner, w, b, eps, is_rms)[0];
}

}  // namespace

void register_norm_dim(py::module& m) {
  m.def("norm_dim",
        [](const Tensor& x, py::handle start, py::handle k, const c10::optional<Tensor>& w,
           const c10::optional<Tensor>& b, py::handle eps, py::handle is_rms) {
          return norm_dim(x, arg_int(start, "start"), arg_int(k, "k"), w, b, arg_float(eps, "eps"),
                          arg_bool(is_rms, "is_rms"));
        },
        "layer/RMS norm over dims [start, start + k) of a CPU tensor, in place of a permute",
        py::arg("x"), py::arg("start"), py::arg("k"), py::arg("weight"), py::arg("bias"), py::arg("eps"),
        py::arg("is_rms"));
}

}  // namespace normkit
