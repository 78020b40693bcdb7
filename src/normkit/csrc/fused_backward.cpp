// normkit._C.fused_backward: the backward of the fused kernel contract
// (normkit.contract) on contiguous (M, N) tensors, computing and allocating only the
// gradients asked for. Row passes in fused_rows.h, the plan-of-passes design of fused_cpu.cpp:
// per row, g = dy w + dy1 w1 into an Acc buffer, the two row means of the normalized gradient
// (row_math.h's grad_means / grad_means_centred, which also recover the mean's lo part), ds,
// then each wanted output from ds (dresidual, dx with rowscale and the regenerated keep mask,
// dx1) and the per-chunk partials of dW / dB / dW1 / dB1, added in chunk order afterwards.
#include <torch/extension.h>

#include <vector>

#include "arg_checks.h"
#include "cpu_runtime.h"
#include "fused_args.h"
#include "fused_rows.h"
#include "row_math.h"

namespace normkit {
namespace fused {
namespace {

template <typename Acc>
using GPass = void (*)(const void*, int64_t, const Acc*, Acc*);
template <typename Acc>
using MeansPass = void (*)(const void*, const Acc*, int64_t, bool, const Acc*, RowStats<Acc>&, Acc&, Acc&);
template <typename Acc>
using DsPass = void (*)(const void*, const Acc*, int64_t, const RowStats<Acc>&, Acc, Acc, Acc*, Acc*);
template <typename Acc>
using AddPass = void (*)(const void*, int64_t, Acc*);
template <typename Acc>
using OutPass = void (*)(const Acc*, int64_t, Acc, const DropRow<Acc>&, void*);
template <typename Acc>
using ParamPass = void (*)(const void*, const Acc*, int64_t, Acc*, Acc*);

template <typename O, typename Acc, bool ACCUM>
NORMKIT_CLONES void g_pass(const void* dy, int64_t n, const Acc* w, Acc* g) {
  grad_g_row<O, Acc, ACCUM>(static_cast<const O*>(dy), n, w, g);
}

// The row means of g and g * s_hat (g in an Acc buffer, read with a unit gain); for layer norm
// st.lo is recovered from the saved mean (hi) on the way.
template <typename S, typename Acc>
NORMKIT_CLONES void means_pass(const void* s_v, const Acc* g, int64_t n, bool is_rms, const Acc* ones, RowStats<Acc>& st,
                               Acc& c_g, Acc& c_gx) {
  const S* s = static_cast<const S*>(s_v);
  if (is_rms) {
    const auto m = grad_means<S, Acc, Acc>(s, g, n, st, ones);
    c_g = 0;
    c_gx = m.g_shat;
  } else {
    const auto m = grad_means_centred<S, Acc, Acc>(s, g, n, st.mean, st.rstd, ones, st.lo);
    c_g = m.g;
    c_gx = m.g_shat;
  }
}

template <typename S, typename Acc, bool SHAT>
NORMKIT_CLONES void ds_pass(const void* s, const Acc* g, int64_t n, const RowStats<Acc>& st, Acc c_g, Acc c_gx, Acc* ds,
                            Acc* shat) {
  grad_ds_row<S, Acc, SHAT>(static_cast<const S*>(s), g, n, st, c_g, c_gx, ds, shat);
}

template <typename D, typename Acc>
NORMKIT_CLONES void add_pass(const void* d, int64_t n, Acc* buf) {
  add_row<D, Acc>(static_cast<const D*>(d), n, buf);
}

template <typename T, typename Acc, bool DROP>
NORMKIT_CLONES void out_pass(const Acc* ds, int64_t n, Acc rs, const DropRow<Acc>& d, void* out) {
  grad_out_row<T, Acc, DROP>(ds, n, rs, d, static_cast<T*>(out));
}

template <typename O, typename Acc, bool NW, bool NB>
NORMKIT_CLONES void param_pass(const void* dy, const Acc* shat, int64_t n, Acc* dw, Acc* db) {
  grad_param_row<O, Acc, NW, NB>(static_cast<const O*>(dy), shat, n, dw, db);
}

template <typename O, typename Acc>
ParamPass<Acc> pick_param(bool nw, bool nb) {
  if (nw && nb) return &param_pass<O, Acc, true, true>;
  if (nw) return &param_pass<O, Acc, true, false>;
  if (nb) return &param_pass<O, Acc, false, true>;
  return nullptr;
}

// out[j] = sum_c part[c, j], in chunk order, for columns lo..hi.
template <typename Acc>
NORMKIT_CLONES void sum_chunks(const Acc* part, int64_t chunks, int64_t n, int64_t lo, int64_t hi, Acc* out) {
  std::copy(part + lo, part + hi, out + lo);
  for (int64_t c = 1; c < chunks; ++c) {
    const Acc* pc = part + c * n;
#pragma omp simd
    for (int64_t j = lo; j < hi; ++j) out[j] += pc[j];
  }
}

template <typename Acc>
struct BwdPlan {
  int64_t n = 0;
  const char *dy = nullptr, *dy1 = nullptr, *dsum = nullptr, *s = nullptr;
  int64_t ob = 0, ob1 = 0, db_ = 0, sb = 0;
  const Acc *w = nullptr, *w1 = nullptr, *ones = nullptr;  // w / w1: ones when absent
  const Acc *mean = nullptr, *rstd = nullptr, *rowscale = nullptr;
  bool is_rms = false;
  GPass<Acc> g_pass = nullptr, g1_pass = nullptr;
  MeansPass<Acc> means = nullptr;
  DsPass<Acc> ds_pass = nullptr;
  AddPass<Acc> dsum_pass = nullptr;
  OutPass<Acc> dres_pass = nullptr, dx_pass = nullptr, dx1_pass = nullptr;
  char *dres = nullptr, *dx = nullptr, *dx1 = nullptr;
  int64_t rb = 0, tb = 0;
  const DropStream *d0 = nullptr, *d1 = nullptr;
  Acc scale = 1;
  ParamPass<Acc> p_pass = nullptr, p1_pass = nullptr;  // (dw, db), (dw1, db1) partials
  Acc *dw = nullptr, *db = nullptr, *dw1 = nullptr, *db1 = nullptr;  // (chunks, N) partials, or null
};

template <typename Acc>
void bwd_rows(const BwdPlan<Acc>& p, int64_t lo, int64_t hi, int64_t chunk) {
  const int64_t n = p.n;
  std::vector<Acc> g(n), ds(n), shat(p.ds_pass && (p.p_pass || p.p1_pass) ? n : 0);
  const int64_t off_c = chunk * n;
  for (Acc* part : {p.dw, p.db, p.dw1, p.db1})
    if (part) std::fill(part + off_c, part + off_c + n, Acc(0));
  auto chunk_part = [&](Acc* part) { return part ? part + off_c : nullptr; };
  for (int64_t i = lo; i < hi; ++i) {
    const int64_t off = i * n;
    if (p.g_pass) p.g_pass(p.dy + off * p.ob, n, p.w, g.data());
    if (p.g1_pass) p.g1_pass(p.dy1 + off * p.ob1, n, p.w1, g.data());
    if (!p.g_pass && !p.g1_pass) std::fill(g.begin(), g.end(), Acc(0));
    RowStats<Acc> st{p.mean ? p.mean[i] : Acc(0), p.rstd[i]};
    Acc c_g = 0, c_gx = 0;
    p.means(p.s + off * p.sb, g.data(), n, p.is_rms, p.ones, st, c_g, c_gx);
    p.ds_pass(p.s + off * p.sb, g.data(), n, st, c_g, c_gx, ds.data(), shat.data());
    if (p.dsum_pass) p.dsum_pass(p.dsum + off * p.db_, n, ds.data());
    if (p.dres_pass) p.dres_pass(ds.data(), n, Acc(1), DropRow<Acc>{}, p.dres + off * p.rb);
    if (p.dx_pass) {
      DropRow<Acc> d;
      if (p.d0) d = {p.d0->col_key.data(), p.d0->row_key(i), p.d0->threshold, p.scale};
      p.dx_pass(ds.data(), n, p.rowscale ? p.rowscale[i] : Acc(1), d, p.dx + off * p.tb);
    }
    if (p.dx1_pass) {
      DropRow<Acc> d;
      if (p.d1) d = {p.d1->col_key.data(), p.d1->row_key(i), p.d1->threshold, p.scale};
      p.dx1_pass(ds.data(), n, Acc(1), d, p.dx1 + off * p.tb);
    }
    if (p.p_pass) p.p_pass(p.dy + off * p.ob, shat.data(), n, chunk_part(p.dw), chunk_part(p.db));
    if (p.p1_pass) p.p1_pass(p.dy1 + off * p.ob1, shat.data(), n, chunk_part(p.dw1), chunk_part(p.db1));
  }
}

}  // namespace

std::vector<Tensor> fused_backward(const OptTensor& dy_in, const OptTensor& dy1_in, const OptTensor& dsum_in,
                                   const Tensor& s_in, const OptTensor& weight, const OptTensor& weight1,
                                   const OptTensor& rowscale_in, const OptTensor& mean_in, const Tensor& rstd_in,
                                   double eps, bool is_rms, double dropout_p, int64_t seed,
                                   const std::vector<bool>& needs, at::ScalarType x_dtype,
                                   c10::optional<at::ScalarType> residual_dtype) {
  check_tensor(s_in, "s", 2, true);
  check_kernel_dtype(s_in, "s");
  const int64_t rows = s_in.size(0), n = s_in.size(1);
  const auto sizes = s_in.sizes();
  const bool has_dy = given(dy_in), has_dy1 = given(dy1_in), has_dsum = given(dsum_in);
  if (has_dy) check_rows(*dy_in, "dy", sizes);
  if (has_dy1) check_rows(*dy1_in, "dy1", sizes);
  if (has_dsum) check_rows(*dsum_in, "dsum", sizes);
  check_param(weight, "weight", n);
  check_param(weight1, "weight1", n);
  TORCH_CHECK_VALUE(!has_dy1 || given(weight1), "weight1: expected the gain of y1 with dy1, got None");
  check_eps(eps);
  check_dropout(dropout_p);
  TORCH_CHECK(is_rms || given(mean_in), "mean: expected the row means saved by the layer-norm forward, got None");
  const bool need_dx = needs[0], need_dx1 = needs[1], need_dres = needs[2], need_dw = needs[3], need_db = needs[4],
             need_dw1 = needs[5], need_db1 = needs[6];
  TORCH_CHECK_VALUE(!need_dres || residual_dtype.has_value(),
                    "residual_dtype: expected the residual's dtype when needs asks for dresidual, got None");
  const bool acc_double = s_in.scalar_type() == at::kDouble || x_dtype == at::kDouble;
  const auto acc = acc_double ? at::kDouble : at::kFloat;
  auto stat = [&](const Tensor& t, const char* name) {
    check_tensor(t, name, -1, false);
    check_kernel_dtype(t, name);
    TORCH_CHECK(t.numel() == rows, name, ": expected ", rows, " values (one per row of s), got sizes ", t.sizes());
    return resolved(t.to(acc).contiguous());
  };
  const Tensor rstd = stat(rstd_in, "rstd");
  const Tensor mean = is_rms ? Tensor() : stat(*mean_in, "mean");
  const Tensor rowscale = as_rowscale(rowscale_in, rows, acc);

  auto opts = s_in.options();
  auto full = [&](at::ScalarType dt) { return advise_huge_pages(at::empty({rows, n}, opts.dtype(dt))); };
  Tensor dx = need_dx ? full(x_dtype) : Tensor();
  Tensor dx1 = need_dx1 ? full(x_dtype) : Tensor();
  Tensor dres = need_dres ? full(*residual_dtype) : Tensor();
  // a parameter gradient is summed from dy (dy1); without it, it is zero
  auto param = [&](bool need) { return need ? at::zeros({n}, opts.dtype(acc)) : Tensor(); };
  Tensor dw = param(need_dw), db = param(need_db), dw1 = param(need_dw1), db1 = param(need_db1);
  const bool any_out = need_dx || need_dx1 || need_dres;
  const bool p0 = has_dy && (need_dw || need_db), p1 = has_dy1 && (need_dw1 || need_db1);
  if (rows == 0 || n == 0 || (!any_out && !p0 && !p1)) return {dx, dx1, dres, dw, db, dw1, db1};

  const Tensor s = resolved(s_in);
  const OptTensor dy = resolved(dy_in), dy1 = resolved(dy1_in), dsum = resolved(dsum_in);
  const bool drop = dropout_p > 0.0;
  const DropStream d0 = drop && need_dx ? DropStream(seed, 0, n, dropout_p) : DropStream();
  const DropStream d1 = drop && need_dx1 ? DropStream(seed, 1, n, dropout_p) : DropStream();
  const int64_t per = rows_per_chunk(rows, n), chunks = (rows + per - 1) / per;

  auto run = [&](auto acc_tag) {
    using Acc = decltype(acc_tag);
    const Tensor ones = at::ones({n}, opts.dtype(acc));
    Tensor w = as_param(weight, acc), w1 = as_param(weight1, acc);
    BwdPlan<Acc> p;
    p.n = n;
    p.is_rms = is_rms;
    p.ones = ones.const_data_ptr<Acc>();
    p.w = w.defined() ? w.const_data_ptr<Acc>() : p.ones;
    p.w1 = w1.defined() ? w1.const_data_ptr<Acc>() : p.ones;
    p.mean = mean.defined() ? mean.const_data_ptr<Acc>() : nullptr;
    p.rstd = rstd.const_data_ptr<Acc>();
    p.rowscale = rowscale.defined() ? rowscale.const_data_ptr<Acc>() : nullptr;
    p.s = static_cast<const char*>(s.const_data_ptr());
    p.sb = s.element_size();
    with_dtype(s.scalar_type(), [&](auto s_tag) {
      using S = decltype(s_tag);
      if constexpr (!std::is_same_v<S, double> || std::is_same_v<Acc, double>) {
        p.means = &means_pass<S, Acc>;
        p.ds_pass = (p0 && need_dw) || (p1 && need_dw1) ? &ds_pass<S, Acc, true> : &ds_pass<S, Acc, false>;
      }
    });
    auto pick_dy = [&](const OptTensor& t, bool accum, GPass<Acc>& g, ParamPass<Acc>& pp, bool nw, bool nb,
                       const char*& ptr, int64_t& bytes) {
      if (!given(t)) return;
      ptr = static_cast<const char*>(t->const_data_ptr());
      bytes = t->element_size();
      with_dtype(t->scalar_type(), [&](auto o_tag) {
        using O = decltype(o_tag);  // any dtype: a float64 dy of a float32 call is read as float
        g = accum ? &g_pass<O, Acc, true> : &g_pass<O, Acc, false>;
        pp = pick_param<O, Acc>(nw, nb);
      });
    };
    pick_dy(dy, false, p.g_pass, p.p_pass, need_dw, need_db, p.dy, p.ob);
    pick_dy(dy1, has_dy, p.g1_pass, p.p1_pass, need_dw1, need_db1, p.dy1, p.ob1);
    if (has_dsum) {
      p.dsum = static_cast<const char*>(dsum->const_data_ptr());
      p.db_ = dsum->element_size();
      with_dtype(dsum->scalar_type(), [&](auto d_tag) {
        using D = decltype(d_tag);
        p.dsum_pass = &add_pass<D, Acc>;
      });
    }
    auto pick_out = [&](const Tensor& t, bool with_drop, OutPass<Acc>& op, char*& ptr, int64_t& bytes) {
      if (!t.defined()) return;
      ptr = static_cast<char*>(t.data_ptr());
      bytes = t.element_size();
      with_dtype(t.scalar_type(), [&](auto t_tag) {
        using T = decltype(t_tag);  // dresidual may be float64 in a float32 call
        op = with_drop ? &out_pass<T, Acc, true> : &out_pass<T, Acc, false>;
      });
    };
    pick_out(dres, false, p.dres_pass, p.dres, p.rb);
    pick_out(dx, drop, p.dx_pass, p.dx, p.tb);
    pick_out(dx1, drop, p.dx1_pass, p.dx1, p.tb);
    if (drop) {
      p.d0 = need_dx ? &d0 : nullptr;
      p.d1 = need_dx1 ? &d1 : nullptr;
      p.scale = static_cast<Acc>(1.0 / (1.0 - dropout_p));
    }
    // (chunks, N) partials of each wanted parameter gradient that dy / dy1 feeds
    std::vector<Tensor> parts;
    auto part = [&](bool want) -> Acc* {
      if (!want) return nullptr;
      parts.push_back(at::empty({chunks, n}, opts.dtype(acc)));
      return parts.back().data_ptr<Acc>();
    };
    p.dw = part(p0 && need_dw);
    p.db = part(p0 && need_db);
    p.dw1 = part(p1 && need_dw1);
    p.db1 = part(p1 && need_db1);
    TORCH_INTERNAL_ASSERT(p.means && p.ds_pass && (!has_dy || p.g_pass) && (!has_dy1 || p.g1_pass) &&
                          (!need_dx || p.dx_pass) && (!need_dx1 || p.dx1_pass) && (!need_dres || p.dres_pass) &&
                          (!has_dsum || p.dsum_pass));
    for_each_chunk(chunks, is_serial(rows, n),
                   [&](int64_t c) { bwd_rows(p, c * per, std::min(rows, (c + 1) * per), c); });
    constexpr int64_t kCols = 1024;
    const std::pair<Acc*, Tensor*> totals[] = {{p.dw, &dw}, {p.db, &db}, {p.dw1, &dw1}, {p.db1, &db1}};
    for_each_chunk((n + kCols - 1) / kCols, n <= kCols, [&](int64_t blk) {
      const int64_t lo = blk * kCols, hi = std::min(n, lo + kCols);
      for (const auto& [src, dst] : totals)
        if (src) sum_chunks<Acc>(src, chunks, n, lo, hi, dst->template data_ptr<Acc>());
    });
  };
  if (acc_double) run(double{}); else run(float{});
  return {dx, dx1, dres, dw, db, dw1, db1};
}

}  // namespace fused
}  // namespace normkit
