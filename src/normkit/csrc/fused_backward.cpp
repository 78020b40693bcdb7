// normkit._C.fused_backward: the backward of the fused kernel contract
// (normkit.contract) on contiguous (M, N) tensors, computing and allocating only the
// gradients asked for; the one C++ backward kernel (the eager node of norm_node.cpp and the raw
// _C.backward call it with the options off).
//
// Per row, after row_math.h's two means of the normalized gradient (grad_means /
// grad_means_centred, which also recover the mean's lo part), one pass (fused_rows.h's
// grad_row) reads s and dy once more, forms ds and adds the row's dy * s_hat and dy to the
// chunk's dW / dB partials, added in chunk order afterwards (thread-count independent):
//  * the plain call (dy only, no dy1, dropout, rowscale or dx1; s, dy, dsum, dx and dresidual of
//    one dtype): that pass also adds dsum and writes dx (and dresidual) itself: two reads of
//    the row, one write, as in a copy;
//  * every option call: the same pass writes ds into an Acc row buffer (L1), then dsum is added
//    and each wanted output written from it (dresidual, dx with rowscale and the regenerated
//    keep mask, dx1); with dy1 (weight1) of dy's dtype the means and that pass form
//    g = dy w + dy1 w1 in registers and add all four parameter partials (dy2_pass); only a dy1
//    of another dtype than dy takes the older route through a g buffer, its partials in a pass
//    of their own.
#include <torch/extension.h>

#include <type_traits>
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

// The row's two gradient means, c_g = mean(g) (0 for RMS norm) and c_gx = mean(g s_hat), of g
// (row_math.h's GainedGrad / GainedGrad2); for layer norm st.lo is recovered from the saved
// mean (hi) on the way.
template <typename S, typename Acc, typename G>
NORMKIT_INLINE void row_grad_means(const S* s, const G& grad, int64_t n, bool is_rms, RowStats<Acc>& st, Acc& c_g,
                                   Acc& c_gx) {
  if (is_rms) {
    c_g = 0;
    c_gx = grad_means<S, Acc>(s, grad, n, st).g_shat;
  } else {
    const auto m = grad_means_centred<S, Acc>(s, grad, n, st.mean, st.rstd, st.lo);
    c_g = m.g;
    c_gx = m.g_shat;
  }
}

// The row means of g and g * s_hat, g in an Acc buffer (read with a unit gain).
template <typename S, typename Acc>
NORMKIT_CLONES void means_pass(const void* s_v, const Acc* g, int64_t n, bool is_rms, const Acc* ones, RowStats<Acc>& st,
                               Acc& c_g, Acc& c_gx) {
  row_grad_means<S>(static_cast<const S*>(s_v), GainedGrad<Acc, Acc>{g, ones}, n, is_rms, st, c_g, c_gx);
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

// Means and ds of a row without dy1 straight from dy (g = dy w is formed in registers), with
// the chunk's dW / dB partials: ds into the Acc buffer, for the option passes.
template <typename Acc>
using DyPass = void (*)(const void*, const void*, int64_t, const Acc*, bool, RowStats<Acc>&, Acc*, Acc*, Acc*);

template <typename S, typename O, typename Acc, bool NW, bool NB>
NORMKIT_CLONES void dy_pass(const void* s_v, const void* dy_v, int64_t n, const Acc* w, bool is_rms, RowStats<Acc>& st,
                            Acc* ds, Acc* dw, Acc* db) {
  const S* s = static_cast<const S*>(s_v);
  const O* dy = static_cast<const O*>(dy_v);
  Acc c_g = 0, c_gx = 0;
  row_grad_means<S>(s, GainedGrad<O, Acc>{dy, w}, n, is_rms, st, c_g, c_gx);
  grad_row<S, O, Acc, Acc, false, NW, NB, false>(s, dy, nullptr, n, w, st, c_g, c_gx, ds, nullptr, dw, db);
}

// dy_pass for a call with two outputs (dy and dy1 of one dtype): the means of
// g = dy w + dy1 w1 formed in registers, then one pass over s, dy and dy1 writing ds and adding
// the chunk's partials dw += dy s_hat, dw1 += dy1 s_hat (NW), db += dy, db1 += dy1 (NB). A
// partial nobody asked for goes to a scratch row (bwd_rows), so four flags take two switches.
template <typename Acc>
using Dy2Pass = void (*)(const void*, const void*, const void*, int64_t, const Acc*, const Acc*, bool, RowStats<Acc>&,
                         Acc*, Acc* const*);

template <typename S, typename O, typename Acc, bool NW, bool NB>
NORMKIT_CLONES void dy2_pass(const void* s_v, const void* dy_v, const void* dy1_v, int64_t n, const Acc* w,
                             const Acc* w1, bool is_rms, RowStats<Acc>& st, Acc* ds, Acc* const* partials) {
  const S* s = static_cast<const S*>(s_v);
  const O* dy = static_cast<const O*>(dy_v);
  const O* dy1 = static_cast<const O*>(dy1_v);
  Acc c_g = 0, c_gx = 0;
  row_grad_means<S>(s, GainedGrad2<O, Acc>{dy, dy1, w, w1}, n, is_rms, st, c_g, c_gx);
  Acc *dw = partials[0], *db = partials[1], *dw1 = partials[2], *db1 = partials[3];
  const Acc mu = st.mean, lo = st.lo, rs = st.rstd;
#pragma omp simd
  for (int64_t j = 0; j < n; ++j) {
    const Acc xh = ((load<S, Acc>(s[j]) - mu) - lo) * rs;
    const Acc d = load<O, Acc>(dy[j]), d1 = load<O, Acc>(dy1[j]);
    ds[j] = (d * w[j] + d1 * w1[j] - xh * c_gx - c_g) * rs;
    if constexpr (NW) {
      dw[j] += d * xh;
      dw1[j] += d1 * xh;
    }
    if constexpr (NB) {
      db[j] += d;
      db1[j] += d1;
    }
  }
}

// f(NW, NB) with the run-time flags as std::bool_constant: the pass that accumulates the
// parameter partials asked for (dweight: NW, dbias: NB), one instantiation per pair.
template <typename F>
decltype(auto) with_param_grads(bool nw, bool nb, const F& f) {
  using Yes = std::true_type;
  using No = std::false_type;
  if (nw && nb) return f(Yes{}, Yes{});
  if (nw) return f(Yes{}, No{});
  if (nb) return f(No{}, Yes{});
  return f(No{}, No{});
}

template <typename S, typename O, typename Acc>
Dy2Pass<Acc> pick_dy2_pass(bool nw, bool nb) {
  return with_param_grads(nw, nb, [](auto w, auto b) -> Dy2Pass<Acc> {
    return &dy2_pass<S, O, Acc, decltype(w)::value, decltype(b)::value>;
  });
}

template <typename S, typename O, typename Acc>
DyPass<Acc> pick_dy_pass(bool nw, bool nb) {
  return with_param_grads(nw, nb, [](auto w, auto b) -> DyPass<Acc> {
    return &dy_pass<S, O, Acc, decltype(w)::value, decltype(b)::value>;
  });
}

// --- the plain call -------------------------------------------------------------------------------

template <typename Acc>
struct PlainArgs {
  const void *s, *dy, *dsum;  // dsum may be null
  void *out, *out2;           // dx and / or dresidual (out2 null: one output)
  const Acc *w, *mean, *rstd;  // w: ones when absent; mean null for RMS norm
  int64_t n;
};

template <typename Acc>
using PlainRows = void (*)(const PlainArgs<Acc>&, int64_t, int64_t, Acc*, Acc*);

// Rows lo..hi of the plain call (one dtype T): per row the two means, then grad_row writing dx
// (and dresidual); dwp / dbp (N,) receive the chunk's partial sums when NW / NB.
template <typename T, typename Acc, bool DSUM, bool NW, bool NB, bool TWO>
NORMKIT_CLONES void plain_rows(const PlainArgs<Acc>& a, int64_t lo, int64_t hi, Acc* dwp, Acc* dbp) {
  const int64_t n = a.n;
  const T* s = static_cast<const T*>(a.s);
  const T* dy = static_cast<const T*>(a.dy);
  const T* dsum = static_cast<const T*>(a.dsum);
  T* out = static_cast<T*>(a.out);
  T* out2 = static_cast<T*>(a.out2);
  if constexpr (NW) std::fill(dwp, dwp + n, Acc(0));
  if constexpr (NB) std::fill(dbp, dbp + n, Acc(0));
  for (int64_t i = lo; i < hi; ++i) {
    const int64_t off = i * n;
    const T* si = s + off;
    const T* dyi = dy + off;
    RowStats<Acc> st{a.mean ? a.mean[i] : Acc(0), a.rstd[i]};
    Acc c_g = 0, c_gx = 0;
    row_grad_means<T>(si, GainedGrad<T, Acc>{dyi, a.w}, n, !a.mean, st, c_g, c_gx);
    grad_row<T, T, T, Acc, DSUM, NW, NB, TWO>(si, dyi, DSUM ? dsum + off : nullptr, n, a.w, st, c_g, c_gx, out + off,
                                               TWO ? out2 + off : nullptr, dwp, dbp);
  }
}

template <typename T, typename Acc, bool DSUM, bool TWO>
PlainRows<Acc> pick_plain_params(bool nw, bool nb) {
  return with_param_grads(nw, nb, [](auto w, auto b) -> PlainRows<Acc> {
    return &plain_rows<T, Acc, DSUM, decltype(w)::value, decltype(b)::value, TWO>;
  });
}

template <typename T, typename Acc>
PlainRows<Acc> pick_plain(bool dsum, bool two, bool nw, bool nb) {
  if (dsum) return two ? pick_plain_params<T, Acc, true, true>(nw, nb) : pick_plain_params<T, Acc, true, false>(nw, nb);
  return two ? pick_plain_params<T, Acc, false, true>(nw, nb) : pick_plain_params<T, Acc, false, false>(nw, nb);
}

// null when neither partial is asked for
template <typename O, typename Acc>
ParamPass<Acc> pick_param(bool nw, bool nb) {
  return with_param_grads(nw, nb, [](auto w, auto b) -> ParamPass<Acc> {
    constexpr bool NW = decltype(w)::value, NB = decltype(b)::value;
    if constexpr (NW || NB) return &param_pass<O, Acc, NW, NB>;
    else return nullptr;
  });
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
  DyPass<Acc> dy_pass = nullptr;  // without dy1: means, ds and the dW / dB partials from dy
  Dy2Pass<Acc> dy2_pass = nullptr;  // dy and dy1 of one dtype: the same with both outputs
  GPass<Acc> g_pass = nullptr, g1_pass = nullptr;  // with dy1 (or neither): g in a buffer first
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
  const bool via_g = !p.dy_pass && !p.dy2_pass;
  const bool need_shat = via_g && (p.p_pass || p.p1_pass);
  const int64_t off_c = chunk * n;
  const auto at = [&](const void* q, int64_t elem_bytes) { return first_row(q, lo, n, elem_bytes); };
  const auto part_row = [&](const Acc* part) -> RowStream { return {part ? part + off_c : nullptr, 0}; };
  // ds; g and s_hat when via_g; dy2_pass's four scratch partials
  const ScratchRows<Acc> rows(1 + (via_g ? 1 : 0) + (need_shat ? 1 : 0) + (p.dy2_pass ? 4 : 0), n, hi - lo,
                              {at(p.s, p.sb), at(p.dy, p.ob), at(p.dy1, p.ob1), at(p.dsum, p.db_), at(p.dres, p.rb),
                               at(p.dx, p.tb), at(p.dx1, p.tb), {p.w, 0}, {p.w1, 0}, part_row(p.dw), part_row(p.db),
                               part_row(p.dw1), part_row(p.db1)});
  int next_row = 0;
  Acc* const ds = rows.row(next_row++);
  Acc* const g = via_g ? rows.row(next_row++) : nullptr;
  Acc* const shat = need_shat ? rows.row(next_row++) : nullptr;
  for (Acc* part : {p.dw, p.db, p.dw1, p.db1})
    if (part) std::fill(part + off_c, part + off_c + n, Acc(0));
  auto chunk_part = [&](Acc* part) { return part ? part + off_c : nullptr; };
  // dy2_pass's four partials: the chunk's rows, or scratch rows (never read) for those not wanted
  Acc* partials[4] = {};
  if (p.dy2_pass) {
    Acc* const wanted[4] = {p.dw, p.db, p.dw1, p.db1};
    for (int k = 0; k < 4; ++k) partials[k] = wanted[k] ? wanted[k] + off_c : rows.row(next_row + k);
  }
  for (int64_t i = lo; i < hi; ++i) {
    const int64_t off = i * n;
    RowStats<Acc> st{p.mean ? p.mean[i] : Acc(0), p.rstd[i]};
    if (p.dy2_pass) {
      p.dy2_pass(p.s + off * p.sb, p.dy + off * p.ob, p.dy1 + off * p.ob1, n, p.w, p.w1, p.is_rms, st, ds, partials);
    } else if (p.dy_pass) {
      p.dy_pass(p.s + off * p.sb, p.dy + off * p.ob, n, p.w, p.is_rms, st, ds, chunk_part(p.dw), chunk_part(p.db));
    } else {
      if (p.g_pass) p.g_pass(p.dy + off * p.ob, n, p.w, g);
      if (p.g1_pass) p.g1_pass(p.dy1 + off * p.ob1, n, p.w1, g);
      if (!p.g_pass && !p.g1_pass) std::fill(g, g + n, Acc(0));
      Acc c_g = 0, c_gx = 0;
      p.means(p.s + off * p.sb, g, n, p.is_rms, p.ones, st, c_g, c_gx);
      p.ds_pass(p.s + off * p.sb, g, n, st, c_g, c_gx, ds, shat);
    }
    if (p.dsum_pass) p.dsum_pass(p.dsum + off * p.db_, n, ds);
    if (p.dres_pass) p.dres_pass(ds, n, Acc(1), DropRow<Acc>{}, p.dres + off * p.rb);
    if (p.dx_pass) {
      DropRow<Acc> d;
      if (p.d0) d = {p.d0->col_key.data(), p.d0->row_key(i), p.d0->threshold, p.scale};
      p.dx_pass(ds, n, p.rowscale ? p.rowscale[i] : Acc(1), d, p.dx + off * p.tb);
    }
    if (p.dx1_pass) {
      DropRow<Acc> d;
      if (p.d1) d = {p.d1->col_key.data(), p.d1->row_key(i), p.d1->threshold, p.scale};
      p.dx1_pass(ds, n, Acc(1), d, p.dx1 + off * p.tb);
    }
    if (p.p_pass && via_g) p.p_pass(p.dy + off * p.ob, shat, n, chunk_part(p.dw), chunk_part(p.db));
    if (p.p1_pass && via_g) p.p1_pass(p.dy1 + off * p.ob1, shat, n, chunk_part(p.dw1), chunk_part(p.db1));
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
  const bool any_out = need_dx || need_dx1 || need_dres;
  const bool p0 = has_dy && (need_dw || need_db), p1 = has_dy1 && (need_dw1 || need_db1);
  // a parameter gradient is summed from dy (dy1) over every row; without it, it is zero
  const bool some_rows = rows > 0 && n > 0;
  auto param = [&](bool need, bool summed) {
    if (!need) return Tensor();
    return summed && some_rows ? at::empty({n}, opts.dtype(acc)) : at::zeros({n}, opts.dtype(acc));
  };
  Tensor dw = param(need_dw, p0), db = param(need_db, p0), dw1 = param(need_dw1, p1), db1 = param(need_db1, p1);
  if (rows == 0 || n == 0 || (!any_out && !p0 && !p1)) return {dx, dx1, dres, dw, db, dw1, db1};

  const Tensor s = resolved(s_in);
  const OptTensor dy = resolved(dy_in), dy1 = resolved(dy1_in), dsum = resolved(dsum_in);
  const bool drop = dropout_p > 0.0;
  const DropStream d0 = drop && need_dx ? DropStream(seed, 0, n, dropout_p) : DropStream();
  const DropStream d1 = drop && need_dx1 ? DropStream(seed, 1, n, dropout_p) : DropStream();
  // the chunks of rows whose dW / dB partials are added in chunk order: a shape-only split (one
  // chunk for a call small enough to run serially)
  const bool serial = is_serial(rows, n);
  const int64_t per = serial ? rows : rows_per_chunk(rows, n), chunks = (rows + per - 1) / per;
  // the plain call: one pass per row after the means writes dx / dresidual (see the header)
  const auto s_dtype = s.scalar_type();
  const bool plain = has_dy && !has_dy1 && !drop && !rowscale.defined() && !need_dx1 && (need_dx || need_dres) &&
                     dy->scalar_type() == s_dtype && (!has_dsum || dsum->scalar_type() == s_dtype) &&
                     (!need_dx || x_dtype == s_dtype) && (!need_dres || *residual_dtype == s_dtype);

  auto run = [&](auto acc_tag) {
    using Acc = decltype(acc_tag);
    Tensor w = as_param(weight, acc), w1 = as_param(weight1, acc);
    // a unit gain where one is missing, and for the means of a g buffer (see bwd_rows)
    const bool two = has_dy && has_dy1 && dy->scalar_type() == dy1->scalar_type();
    const bool via_g = !(has_dy && !has_dy1) && !two;
    const Tensor ones = !w.defined() || (has_dy1 && !w1.defined()) || (!plain && via_g) ? at::ones({n}, opts.dtype(acc))
                                                                                           : Tensor();
    BwdPlan<Acc> p;
    p.n = n;
    p.is_rms = is_rms;
    p.ones = data_or_null<const Acc>(ones);
    p.w = w.defined() ? w.const_data_ptr<Acc>() : p.ones;
    p.w1 = w1.defined() ? w1.const_data_ptr<Acc>() : p.ones;
    p.mean = data_or_null<const Acc>(mean);
    p.rstd = rstd.const_data_ptr<Acc>();
    p.rowscale = data_or_null<const Acc>(rowscale);
    p.s = static_cast<const char*>(s.const_data_ptr());
    p.sb = s.element_size();
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
    auto sum_partials = [&] {
      constexpr int64_t kCols = 1024;
      const std::pair<Acc*, Tensor*> totals[] = {{p.dw, &dw}, {p.db, &db}, {p.dw1, &dw1}, {p.db1, &db1}};
      for_each_chunk((n + kCols - 1) / kCols, n <= kCols, [&](int64_t blk) {
        const int64_t lo = blk * kCols, hi = std::min(n, lo + kCols);
        for (const auto& [src, dst] : totals)
          if (src) sum_chunks<Acc>(src, chunks, n, lo, hi, dst->template data_ptr<Acc>());
      });
    };
    if (plain) {
      const Tensor& out = need_dx ? dx : dres;
      PlainArgs<Acc> a{p.s, dy->const_data_ptr(), has_dsum ? dsum->const_data_ptr() : nullptr, out.data_ptr(),
                       need_dx && need_dres ? dres.data_ptr() : nullptr, p.w, p.mean, p.rstd, n};
      PlainRows<Acc> rows_fn = nullptr;
      with_dtype(s_dtype, [&](auto t_tag) {
        using T = decltype(t_tag);
        if constexpr (std::is_same_v<acc_of<T>, Acc>)
          rows_fn = pick_plain<T, Acc>(has_dsum, a.out2 != nullptr, p.dw != nullptr, p.db != nullptr);
      });
      TORCH_INTERNAL_ASSERT(rows_fn);
      for_each_chunk(chunks, serial, [&](int64_t c) {
        rows_fn(a, c * per, std::min(rows, (c + 1) * per), p.dw ? p.dw + c * n : nullptr, p.db ? p.db + c * n : nullptr);
      });
      sum_partials();
      return;
    }
    with_dtype(s.scalar_type(), [&](auto s_tag) {
      using S = decltype(s_tag);
      if constexpr (!std::is_same_v<S, double> || std::is_same_v<Acc, double>) {
        p.means = &means_pass<S, Acc>;
        p.ds_pass = (p0 && need_dw) || (p1 && need_dw1) ? &ds_pass<S, Acc, true> : &ds_pass<S, Acc, false>;
        if (has_dy && (!has_dy1 || two)) {
          const bool nw = p.dw || p.dw1, nb = p.db || p.db1;
          with_dtype(dy->scalar_type(), [&](auto o_tag) {
            using O = decltype(o_tag);
            if (two)
              p.dy2_pass = pick_dy2_pass<S, O, Acc>(nw, nb);
            else
              p.dy_pass = pick_dy_pass<S, O, Acc>(nw, nb);
          });
        }
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
    TORCH_INTERNAL_ASSERT(p.means && p.ds_pass && (!has_dy || p.g_pass) && (!has_dy1 || p.g1_pass) &&
                          (!need_dx || p.dx_pass) && (!need_dx1 || p.dx1_pass) && (!need_dres || p.dres_pass) &&
                          (!has_dsum || p.dsum_pass));
    for_each_chunk(chunks, serial, [&](int64_t c) { bwd_rows(p, c * per, std::min(rows, (c + 1) * per), c); });
    sum_partials();
  };
  if (acc_double) run(double{}); else run(float{});
  return {dx, dx1, dres, dw, db, dw1, db1};
}

}  // namespace fused
}  // namespace normkit
