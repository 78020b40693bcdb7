// normkit._C.fused_forward / fused_backward: the fused kernel contract of
// normkit.contract (residual of any dtype, x1, rowscale, weight1/bias1, dropout with
// its masks, sum and output dtypes, caller's buffers) on contiguous (M, N) tensors, in one pass
// over memory.
//
// The row passes are in fused_rows.h. Here each pass is instantiated once per dtype pair and
// flag set it is used with, compiled for each instruction set (NORMKIT_CLONES), and a call
// picks its passes once (function pointers in a plan) before the rows run: the per-row cost of
// the choice is a handful of indirect calls, the inner loops carry no option tests. Rows run
// in chunks fixed by the shape (cpu_runtime.h), the parameter gradients are summed per chunk
// and the chunk partials added in chunk order, so every result is bit-identical for any thread
// count. The plain call (no option: x [+ residual] [, s] and y all in x's dtype), which the
// native path (normkit::forward, norm_cpu.cpp) runs too, takes one loop instead of passes
// (fused_rows.h, plain_rows): statistics from one read, taken as the sum is formed, and each
// row's output written in the loop that reads the next row.
#include <torch/extension.h>

#include <fstream>
#include <string>
#include <vector>

#include "arg_checks.h"
#include "cpu_runtime.h"
#include "fused_args.h"
#include "fused_rows.h"
#include "row_math.h"

namespace normkit {
namespace {

using fused::acc_of;
using fused::DropRow;
using fused::DropStream;
using fused::NormArgs;
using fused::OptTensor;
using fused::Tensor;
using fused::arg_dtype;
using fused::as_rowscale;
using fused::data_or_null;
using fused::param_or;
using fused::check_dropout;
using fused::check_rows;
using fused::given;
using fused::with_dtype;

// --- the passes, one cloned function per instantiation -----------------------------------------

template <typename Acc>
using XPass = void (*)(const void*, int64_t, Acc, const DropRow<Acc>&, uint8_t*, Acc*);
template <typename Acc>
using AddPass = void (*)(const void*, int64_t, Acc*);
template <typename AccS, typename AccW>
using RoundPass = void (*)(const AccS*, int64_t, void*, AccW*);
template <typename Acc>
using XrPass = void (*)(const void*, const void*, int64_t, Acc, const DropRow<Acc>&, uint8_t*, void*, Acc*);
template <typename Acc>
using NormPass = void (*)(const void*, int64_t, const NormArgs<Acc>&, void*, void*, int64_t, const fused::NextRow&);

// The sum passes without floating-point contraction (as their bodies in fused_rows.h): the sum
// is formed in the contract's order, each product and sum rounded as written, bit for bit the
// reference's s. The normalization keeps FMAs, as the other kernels.
#pragma GCC push_options
#pragma GCC optimize("fp-contract=off")
template <typename T, typename Acc, bool DROP, bool MASK, bool ACCUM>
NORMKIT_CLONES void x_pass(const void* x, int64_t n, Acc rs, const DropRow<Acc>& d, uint8_t* mask, Acc* buf) {
  fused::sum_x_row<T, Acc, DROP, MASK, ACCUM>(static_cast<const T*>(x), n, rs, d, mask, buf);
}
template <typename R, typename Acc>
NORMKIT_CLONES void add_pass(const void* r, int64_t n, Acc* buf) {
  fused::add_row<R, Acc>(static_cast<const R*>(r), n, buf);
}
template <typename T, typename R, typename Acc, bool DROP, bool MASK, bool STORE>
NORMKIT_CLONES void xr_pass(const void* x, const void* r, int64_t n, Acc rs, const DropRow<Acc>& d, uint8_t* mask,
                            void* s, Acc* buf) {
  fused::sum_xr_row<T, R, Acc, DROP, MASK, STORE>(static_cast<const T*>(x), static_cast<const R*>(r), n, rs, d, mask,
                                                  static_cast<Acc*>(s), buf);
}
template <typename S, typename AccS, typename AccW, bool STORE>
NORMKIT_CLONES void round_pass(const AccS* buf, int64_t n, void* s, AccW* out) {
  fused::round_row<S, AccS, AccW, STORE>(buf, n, static_cast<S*>(s), out);
}
#pragma GCC pop_options

template <typename Src, typename O, typename Acc>
NORMKIT_CLONES void norm_pass(const void* src, int64_t n, const NormArgs<Acc>& a, void* y, void* y1, int64_t i,
                              const fused::NextRow& next) {
  fused::norm_row<Src, O, Acc>(static_cast<const Src*>(src), n, a, static_cast<O*>(y), static_cast<O*>(y1), i, next);
}

template <typename T, typename Acc, bool ACCUM>
XPass<Acc> pick_x(bool drop, bool mask) {
  if (!drop) return &x_pass<T, Acc, false, false, ACCUM>;
  return mask ? &x_pass<T, Acc, true, true, ACCUM> : &x_pass<T, Acc, true, false, ACCUM>;
}

// x + residual in one pass for the common (x, residual) dtype pairs (the residual in x's dtype
// or float32); other pairs take x_pass then add_pass. s is stored in the pass when exact.
template <typename T, typename R, typename Acc>
XrPass<Acc> pick_xr(bool drop, bool mask, bool store) {
  constexpr bool common = std::is_same_v<R, T> || (std::is_same_v<R, float> && !std::is_same_v<T, double>);
  if constexpr (common && std::is_same_v<Acc, acc_of<T>>) {
    if (drop) return mask ? &xr_pass<T, R, Acc, true, true, false> : &xr_pass<T, R, Acc, true, false, false>;
    return store ? &xr_pass<T, R, Acc, false, false, true> : &xr_pass<T, R, Acc, false, false, false>;
  }
  return nullptr;
}

// --- forward ---------------------------------------------------------------------------------------

template <typename AccS, typename AccW>
struct FwdPlan {
  int64_t n = 0;
  bool sum = false;  // a sum is formed (else x is normalized as it is)
  XPass<AccS> x_pass = nullptr, x1_pass = nullptr;
  AddPass<AccS> r_pass = nullptr;
  XrPass<AccS> xr_pass = nullptr;  // x + r in one pass (then x_pass and r_pass are null), s stored when s_in_xr
  bool s_in_xr = false;
  RoundPass<AccS, AccW> round_pass = nullptr;  // null: the buffer already holds s (AccS == AccW == S)
  NormPass<AccW> norm_pass = nullptr;
  const char *x = nullptr, *x1 = nullptr, *r = nullptr;
  char *s = nullptr, *y = nullptr, *y1 = nullptr;
  int64_t xb = 0, rb = 0, sb = 0, ob = 0;  // element bytes of x / x1, residual, s, y / y1
  uint8_t *mask = nullptr, *mask1 = nullptr;
  const AccS* rowscale = nullptr;
  const DropStream *d0 = nullptr, *d1 = nullptr;
  AccS scale = 1;
  NormArgs<AccW> norm{};  // norm.stream: y and y1 streamed out (norm_row)
  bool s_stream = false;  // s (AccS == AccW, the buffer itself) streamed out after the sum passes
};

template <typename AccS, typename AccW>
void fwd_rows(const FwdPlan<AccS, AccW>& p, int64_t lo, int64_t hi) {
  const int64_t n = p.n;
  const auto at = [&](const void* q, int64_t elem_bytes) { return first_row(q, lo, n, elem_bytes); };
  const ScratchRows<AccS> buf_s(p.sum ? 1 : 0, n, hi - lo,
                                {at(p.x, p.xb), at(p.x1, p.xb), at(p.r, p.rb), at(p.s, p.sb), at(p.y, p.ob),
                                 at(p.y1, p.ob), at(p.mask, 1), at(p.mask1, 1), {p.norm.w, 0}, {p.norm.b, 0},
                                 {p.norm.w1, 0}, {p.norm.b1, 0}});
  const bool own_w = p.sum && !std::is_same_v<AccS, AccW>;  // a row of its own for the sum as AccW
  const ScratchRows<AccW> buf_w(own_w ? 1 : 0, n, hi - lo,
                                {{own_w ? buf_s.row(0) : nullptr, 0}, at(p.x, p.xb), at(p.r, p.rb), at(p.s, p.sb),
                                 at(p.y, p.ob), at(p.y1, p.ob)});
  AccS* const row_s = p.sum ? buf_s.row(0) : nullptr;
  AccW* src_w = nullptr;
  if constexpr (std::is_same_v<AccS, AccW>) src_w = row_s; else src_w = own_w ? buf_w.row(0) : nullptr;
  for (int64_t i = lo; i < hi; ++i) {
    const int64_t off = i * n;
    void* y1 = p.y1 ? p.y1 + off * p.ob : nullptr;
    fused::NextRow next;
    if (i + 1 < hi) {
      next.p[0] = p.x + (off + n) * p.xb;
      next.elem_bytes[0] = p.xb;
      if (p.r) {
        next.p[1] = p.r + (off + n) * p.rb;
        next.elem_bytes[1] = p.rb;
      }
      if (p.x1) {
        next.p[2] = p.x1 + (off + n) * p.xb;
        next.elem_bytes[2] = p.xb;
      }
    }
    if (!p.sum) {
      p.norm_pass(p.x + off * p.xb, n, p.norm, p.y + off * p.ob, y1, i, next);
      continue;
    }
    DropRow<AccS> d;
    if (p.d0) d = {p.d0->col_key.data(), p.d0->row_key(i), p.d0->threshold, p.scale};
    const AccS rs = p.rowscale ? p.rowscale[i] : AccS(1);
    uint8_t* mask = p.mask ? p.mask + off : nullptr;
    if (p.xr_pass) {
      p.xr_pass(p.x + off * p.xb, p.r + off * p.rb, n, rs, d, mask, p.s_in_xr ? p.s + off * p.sb : nullptr, row_s);
    } else {
      p.x_pass(p.x + off * p.xb, n, rs, d, mask, row_s);
    }
    if (p.x1_pass) {
      DropRow<AccS> d1;
      if (p.d1) d1 = {p.d1->col_key.data(), p.d1->row_key(i), p.d1->threshold, p.scale};
      p.x1_pass(p.x1 + off * p.xb, n, AccS(1), d1, p.mask1 ? p.mask1 + off : nullptr, row_s);
    }
    if (p.r_pass) p.r_pass(p.r + off * p.rb, n, row_s);
    if (p.round_pass) p.round_pass(row_s, n, p.s ? p.s + off * p.sb : nullptr, src_w);
    if (p.s_stream) stream_bytes(p.s + off * p.sb, row_s, n * p.sb);
    p.norm_pass(src_w, n, p.norm, p.y + off * p.ob, y1, i, next);
  }
  if (p.norm.stream || p.s_stream) stream_fence();
}

// --- the plain call: x [+ residual] [, s stored] in one dtype, no other option ---------------------

template <typename T, typename Acc>
NORMKIT_CLONES void plain_pass(const fused::PlainFwdArgs<T, Acc>& a, int64_t lo, int64_t hi, Acc* cur, Acc* nxt) {
  fused::plain_rows<T, Acc>(a, lo, hi, cur, nxt);
}

template <typename T>
void plain_forward(const fused::FwdCall& c, int64_t rows, int64_t n) {
  using Acc = acc_of<T>;
  constexpr auto acc = c10::CppTypeToScalarType<Acc>::value;
  const Tensor w = as_param(c.weight, acc), b = as_param(c.bias, acc);
  fused::PlainFwdArgs<T, Acc> a{};
  a.x = c.x.const_data_ptr<T>();
  a.r = data_or_null<const T>(c.residual);
  a.s = data_or_null<T>(c.s);
  a.y = data_or_null<T>(c.y);
  a.w = data_or_null<const Acc>(w);
  a.b = data_or_null<const Acc>(b);
  a.mean = data_or_null<Acc>(c.mean);
  a.rstd = data_or_null<Acc>(c.rstd);
  a.n = n;
  a.eps = static_cast<Acc>(c.eps);
  a.is_rms = c.is_rms;
  const int64_t row_bytes = n * static_cast<int64_t>(sizeof(T));
  const int64_t streams = 2 + (a.r ? 1 : 0) + (a.s ? 1 : 0);  // x, y, residual, s
  // inputs and outputs together past outputs_stream: the outputs would not stay cached, so they are
  // streamed (in the overlapped loop by its stores, else through a stage: write_row_streamed)
  a.stream = outputs_stream(streams * rows * row_bytes) && can_stream<T, Acc>(a.y, n) &&
             (!a.s || can_stream<T, Acc>(a.s, n));
  Tensor w_or_ones, b_or_zeros;
  if (fused::overlap_pays(rows, row_bytes, c.is_rms, !std::is_same_v<T, c10::Half>)) {
    a.overlap = true;
    w_or_ones = param_or(w, n, 1.0, acc, c.x.options());
    b_or_zeros = param_or(b, n, 0.0, acc, c.x.options());
    a.w_or_ones = w_or_ones.const_data_ptr<Acc>();
    a.b_or_zeros = b_or_zeros.const_data_ptr<Acc>();
    // (with a residual the row normalized is a scratch row, which ScratchRows keeps clear of y,
    // and x and the residual are read ahead, for the next row)
    a.descend = writes_descend({a.y}, {a.r ? nullptr : a.x, sizeof(T) == sizeof(Acc) ? a.w_or_ones : nullptr,
                                       sizeof(T) == sizeof(Acc) ? a.b_or_zeros : nullptr},
                               {a.r ? a.x : nullptr, a.r});
  }
  const int64_t per = rows_per_chunk(rows, n);
  for_each_chunk((rows + per - 1) / per, is_serial(rows, n), [&](int64_t k) {
    const int64_t lo = k * per;
    if (!a.r) return plain_pass<T, Acc>(a, lo, std::min(rows, lo + per), nullptr, nullptr);
    const int64_t hi = std::min(rows, lo + per);
    const auto at = [&](const void* q) { return first_row(q, lo, n, sizeof(T)); };
    const ScratchRows<Acc> buf(2, n, hi - lo, {at(a.x), at(a.r), at(a.s), at(a.y), {a.w_or_ones, 0},
                                               {a.b_or_zeros, 0}, {a.w, 0}, {a.b, 0}});
    plain_pass<T, Acc>(a, lo, hi, buf.row(0), buf.row(1));
  });
}

}  // namespace

void fused::forward_rows(const FwdCall& c) {
  const int64_t rows = c.rows, n = c.n;
  const bool has_r = c.residual.defined(), has_x1 = c.x1.defined(), has_rs = c.rowscale.defined();
  const bool has_w1 = c.weight1.defined(), drop = c.dropout_p > 0.0, store_sum = c.s.defined();
  const bool masks = c.mask.defined();
  const double dropout_p = c.dropout_p;
  const int64_t seed = c.seed;
  const auto tdt = c.x.scalar_type(), sdt = c.sum_dtype, odt = c.out_dtype;
  const auto rdt = has_r ? c.residual.scalar_type() : tdt;
  // the plain call (no option; x, residual, s and y of one dtype): one loop, no row passes
  if (!has_x1 && !has_rs && !drop && !has_w1 && sdt == tdt && odt == tdt && rdt == tdt && (has_r || !store_sum)) {
    with_dtype(tdt, [&](auto t_tag) { plain_forward<decltype(t_tag)>(c, rows, n); });
    return;
  }
  // a call with options: the same loop, the options its run-time fields (fused_options_cpu.cpp)
  if (fused::option_rows(c)) return;
  const bool acc_s_double = tdt == at::kDouble || rdt == at::kDouble;
  const bool acc_w_double = tdt == at::kDouble || sdt == at::kDouble;
  const auto acc_w = acc_w_double ? at::kDouble : at::kFloat;
  // contract.sum_is_input, unless the caller asked for s in a buffer of its own
  const bool sum = has_r || has_x1 || has_rs || drop || sdt != tdt || store_sum;
  const Tensor &x = c.x, &r = c.residual, &x1 = c.x1, &y = c.y, &y1 = c.y1, &s = c.s;
  const Tensor &mean = c.mean, &rstd = c.rstd, &mask = c.mask, &mask1 = c.mask1;
  const auto opts = x.options();
  const DropStream d0 = drop ? DropStream(seed, 0, n, dropout_p) : DropStream();
  const DropStream d1 = drop && has_x1 ? DropStream(seed, 1, n, dropout_p) : DropStream();

  auto run = [&](auto acc_s_tag, auto acc_w_tag) {
    using AccS = decltype(acc_s_tag);
    using AccW = decltype(acc_w_tag);
    Tensor w = as_param(c.weight, acc_w), b = as_param(c.bias, acc_w), w1 = as_param(c.weight1, acc_w),
           b1 = as_param(c.bias1, acc_w);
    if (has_w1) {  // y and y1 are written in one loop (norm_row), which reads all four
      w = param_or(w, n, 1.0, acc_w, opts);
      b = param_or(b, n, 0.0, acc_w, opts);
      b1 = param_or(b1, n, 0.0, acc_w, opts);
    }
    FwdPlan<AccS, AccW> p;
    p.n = n;
    p.sum = sum;
    p.x = static_cast<const char*>(x.const_data_ptr());
    p.xb = x.element_size();
    p.y = static_cast<char*>(y.data_ptr());
    p.y1 = data_or_null<char>(y1);
    p.ob = y.element_size();
    p.norm = {data_or_null<const AccW>(w), data_or_null<const AccW>(b), data_or_null<const AccW>(w1),
              data_or_null<const AccW>(b1), static_cast<AccW>(c.eps), c.is_rms, data_or_null<AccW>(mean),
              data_or_null<AccW>(rstd)};
    // past outputs_stream the outputs are streamed: y and y1 by norm_row, s after the sum
    // passes when it is the buffer itself (S == AccS == AccW; a rounded s is stored as it is)
    const bool s_exact = store_sum && sdt == (std::is_same_v<AccS, double> ? at::kDouble : at::kFloat) &&
                         std::is_same_v<AccS, AccW>;
    const int64_t elem_bytes = x.element_size() * (has_x1 ? 2 : 1) + (has_r ? r.element_size() : 0) +
                               (store_sum ? s.element_size() : 0) + y.element_size() * (has_w1 ? 2 : 1) +
                               (masks ? (has_x1 ? 2 : 1) : 0);
    const int64_t out_row = n * static_cast<int64_t>(y.element_size());
    p.norm.stream = outputs_stream(rows * n * elem_bytes) && can_stream_bytes(p.y, out_row) &&
                    (!has_w1 || can_stream_bytes(p.y1, out_row));
    p.s_stream = p.norm.stream && sum && s_exact && can_stream_bytes(s.data_ptr(), n * static_cast<int64_t>(s.element_size()));
    with_dtype(odt, [&](auto o_tag) {
      using O = decltype(o_tag);
      if (sum) {
        p.norm_pass = &norm_pass<AccW, O, AccW>;
      } else {
        with_dtype(tdt, [&](auto t_tag) {
          using T = decltype(t_tag);
          if constexpr (std::is_same_v<acc_of<T>, AccW>) p.norm_pass = &norm_pass<T, O, AccW>;
        });
      }
    });
    if (sum) {
      with_dtype(tdt, [&](auto t_tag) {
        using T = decltype(t_tag);
        if constexpr (!std::is_same_v<T, double> || std::is_same_v<AccS, double>) {
          p.x_pass = pick_x<T, AccS, false>(drop, masks);
          if (has_x1) p.x1_pass = pick_x<T, AccS, true>(drop, masks);
          if (has_r && !has_x1) {
            // s stored in the x + r pass when S is AccS (exact) and nothing converts it further
            // (unless it is streamed out after the passes)
            const bool s_here = s_exact && !p.s_stream;
            with_dtype(rdt, [&](auto r_tag) {
              p.xr_pass = pick_xr<T, decltype(r_tag), AccS>(drop, masks, s_here);
              p.s_in_xr = p.xr_pass && s_here && !drop;
            });
          }
        }
      });
      if (has_r) {
        p.r = static_cast<const char*>(r.const_data_ptr());
        p.rb = r.element_size();
        with_dtype(rdt, [&](auto r_tag) {
          using R = decltype(r_tag);
          if constexpr (!std::is_same_v<R, double> || std::is_same_v<AccS, double>)
            if (!p.xr_pass) p.r_pass = &add_pass<R, AccS>;
        });
      }
      const bool store_s = store_sum && !p.s_in_xr && !p.s_stream;
      with_dtype(sdt, [&](auto s_tag) {
        using S = decltype(s_tag);
        if (store_s) p.round_pass = &round_pass<S, AccS, AccW, true>;
        else if (!(std::is_same_v<S, AccS> && std::is_same_v<AccS, AccW>)) p.round_pass = &round_pass<S, AccS, AccW, false>;
      });
      if (store_sum) {
        p.s = static_cast<char*>(s.data_ptr());
        p.sb = s.element_size();
      }
      if (has_x1) p.x1 = static_cast<const char*>(x1.const_data_ptr());
      if (has_rs) p.rowscale = c.rowscale.const_data_ptr<AccS>();
      if (drop) {
        p.d0 = &d0;
        p.d1 = has_x1 ? &d1 : nullptr;
        p.scale = static_cast<AccS>(1.0 / (1.0 - dropout_p));
      }
      if (masks) {
        p.mask = static_cast<uint8_t*>(mask.data_ptr());
        p.mask1 = data_or_null<uint8_t>(mask1);
      }
    }
    TORCH_INTERNAL_ASSERT(p.norm_pass && (!sum || p.x_pass || p.xr_pass) && (!has_r || !sum || p.r_pass || p.xr_pass));
    const int64_t per = rows_per_chunk(rows, n);
    for_each_chunk((rows + per - 1) / per, is_serial(rows, n),
                   [&](int64_t k) { fwd_rows(p, k * per, std::min(rows, (k + 1) * per)); });
  };
  if (acc_s_double && acc_w_double) run(double{}, double{});
  else if (acc_s_double) run(double{}, float{});
  else if (acc_w_double) run(float{}, double{});
  else run(float{}, float{});
}

namespace {

// A buffer the kernel writes: shape, dtype, layout, and no memory shared with `reads`.
void check_buffer(const Tensor& buf, const char* name, at::IntArrayRef sizes, at::ScalarType dtype,
                  const std::vector<std::pair<const OptTensor*, const char*>>& reads) {
  check_tensor(buf, name, 2, true);
  check_sizes(buf, name, sizes);
  check_dtype(buf, name, dtype);
  check_writable(buf, name);
  for (const auto& [t, tname] : reads)
    if (given(*t)) check_no_overlap(buf, name, **t, tname);
}

}  // namespace

std::vector<Tensor> fused::fused_forward(const Tensor& x_in, const OptTensor& residual_in, const OptTensor& x1_in,
                                  const OptTensor& rowscale_in, const OptTensor& weight, const OptTensor& bias,
                                  const OptTensor& weight1, const OptTensor& bias1, double eps, bool is_rms,
                                  double dropout_p, int64_t seed, at::ScalarType sdt, at::ScalarType odt,
                                  bool store_sum, bool store_mask, const OptTensor& out, const OptTensor& out1,
                                  const OptTensor& residual_out) {
  check_tensor(x_in, "x", 2, true);
  check_kernel_dtype(x_in, "x");
  const int64_t rows = x_in.size(0), n = x_in.size(1);
  const auto sizes = x_in.sizes();
  const bool has_r = given(residual_in), has_x1 = given(x1_in), has_w1 = given(weight1);
  if (has_r) check_rows(*residual_in, "residual", sizes);
  if (has_x1) {
    check_rows(*x1_in, "x1", sizes);
    check_dtype(*x1_in, "x1", x_in.scalar_type());
  }
  check_param(weight, "weight", n);
  check_param(bias, "bias", n);
  check_param(weight1, "weight1", n);
  check_param(bias1, "bias1", n);
  TORCH_CHECK_VALUE(has_w1 || !given(bias1), "bias1: expected weight1 with bias1 (y1 = s_hat * weight1 + bias1), got weight1=None");
  TORCH_CHECK_VALUE(has_w1 || !given(out1), "out1: expected weight1 with out1 (y1 is computed only with weight1), got weight1=None");
  TORCH_CHECK_VALUE(store_sum || !given(residual_out), "residual_out: expected store_sum=True with a residual_out buffer, got store_sum=False");
  check_eps(eps);
  check_dropout(dropout_p);
  const auto tdt = x_in.scalar_type();
  const auto rdt = has_r ? residual_in->scalar_type() : tdt;
  const bool acc_s_double = tdt == at::kDouble || rdt == at::kDouble;
  const bool acc_w_double = tdt == at::kDouble || sdt == at::kDouble;
  const auto acc_w = acc_w_double ? at::kDouble : at::kFloat;
  const auto acc_s = acc_s_double ? at::kDouble : at::kFloat;
  const OptTensor rowscale_c = as_rowscale(rowscale_in, rows, acc_s);
  const bool has_rs = given(rowscale_c), drop = dropout_p > 0.0;
  // contract.sum_is_input, unless the caller asked for s in a buffer of its own
  const bool sum = has_r || has_x1 || has_rs || drop || sdt != tdt || given(residual_out);
  const OptTensor x_opt(x_in);
  const std::vector<std::pair<const OptTensor*, const char*>> reads = {
      {&x_opt, "x"}, {&residual_in, "residual"}, {&x1_in, "x1"}, {&rowscale_in, "rowscale"},
      {&weight, "weight"}, {&bias, "bias"}, {&weight1, "weight1"}, {&bias1, "bias1"}};
  std::vector<std::pair<const OptTensor*, const char*>> reads_out = reads;
  if (given(out)) check_buffer(*out, "out", sizes, odt, reads);
  if (given(out1)) {
    reads_out.push_back({&out, "out"});
    check_buffer(*out1, "out1", sizes, odt, reads_out);
  }
  if (given(residual_out)) {
    reads_out.push_back({&out1, "out1"});
    if (!given(out1)) reads_out.push_back({&out, "out"});
    check_buffer(*residual_out, "residual_out", sizes, sdt, reads_out);
  }

  const Tensor x = resolved(x_in);
  const OptTensor r = resolved(residual_in), x1 = resolved(x1_in);
  auto opts = x.options();
  Tensor y = given(out) ? *out : advise_huge_pages(at::empty({rows, n}, opts.dtype(odt)));
  Tensor y1 = !has_w1 ? Tensor() : given(out1) ? *out1 : advise_huge_pages(at::empty({rows, n}, opts.dtype(odt)));
  Tensor s;
  if (store_sum) s = !sum ? x_in : given(residual_out) ? *residual_out : advise_huge_pages(at::empty({rows, n}, opts.dtype(sdt)));
  const bool masks = store_mask && drop;
  Tensor mask = masks ? at::empty({rows, n}, opts.dtype(at::kBool)) : Tensor();
  Tensor mask1 = masks && has_x1 ? at::empty({rows, n}, opts.dtype(at::kBool)) : Tensor();
  Tensor mean = is_rms ? Tensor() : at::empty({rows}, opts.dtype(acc_w));
  Tensor rstd = at::empty({rows}, opts.dtype(acc_w));
  if (rows == 0 || n == 0) {
    fill_empty_stats(mean, rstd);
    return {y, y1, s, mean, rstd, mask, mask1};
  }
  fused::FwdCall c;
  c.rows = rows;
  c.n = n;
  c.x = x;
  c.residual = r.value_or(Tensor());
  c.x1 = x1.value_or(Tensor());
  c.rowscale = rowscale_c.value_or(Tensor());
  c.weight = weight.value_or(Tensor());
  c.bias = bias.value_or(Tensor());
  c.weight1 = weight1.value_or(Tensor());
  c.bias1 = bias1.value_or(Tensor());
  c.y = y;
  c.y1 = y1;
  c.s = sum ? s : Tensor();
  c.mask = mask;
  c.mask1 = mask1;
  c.mean = mean;
  c.rstd = rstd;
  c.eps = eps;
  c.is_rms = is_rms;
  c.dropout_p = dropout_p;
  c.seed = seed;
  c.sum_dtype = sdt;
  c.out_dtype = odt;
  fused::forward_rows(c);
  return {y, y1, s, mean, rstd, mask, mask1};
}

py::object py_tensor_or_none(const Tensor& t) { return t.defined() ? py::cast(t) : py::none(); }

namespace {

py::tuple as_tuple(const std::vector<Tensor>& v) {
  py::tuple out(v.size());
  for (size_t k = 0; k < v.size(); ++k) out[k] = py_tensor_or_none(v[k]);
  return out;
}

}  // namespace

void register_fused(py::module& m) {
  m.def("fused_forward",
        [](py::handle x, py::handle residual, py::handle x1, py::handle rowscale, py::handle weight, py::handle bias,
           py::handle weight1, py::handle bias1, py::handle eps, py::handle is_rms, py::handle dropout_p,
           py::handle seed, py::handle sum_dtype, py::handle out_dtype, py::handle store_sum, py::handle store_mask,
           py::handle out, py::handle out1, py::handle residual_out) {
          auto res = fused::fused_forward(
              arg_tensor(x, "x"), arg_optional_tensor(residual, "residual"), arg_optional_tensor(x1, "x1"),
              arg_optional_tensor(rowscale, "rowscale"), arg_optional_tensor(weight, "weight"),
              arg_optional_tensor(bias, "bias"), arg_optional_tensor(weight1, "weight1"),
              arg_optional_tensor(bias1, "bias1"), arg_float(eps, "eps"), arg_bool(is_rms, "is_rms"),
              arg_float(dropout_p, "dropout_p"), arg_int(seed, "seed"), arg_dtype(sum_dtype, "sum_dtype"),
              arg_dtype(out_dtype, "out_dtype"), arg_bool(store_sum, "store_sum"), arg_bool(store_mask, "store_mask"),
              arg_optional_tensor(out, "out"), arg_optional_tensor(out1, "out1"),
              arg_optional_tensor(residual_out, "residual_out"));
          return as_tuple(res);
        },
        "the fused forward of normkit.contract on contiguous (M, N): (y, y1, s, mean, rstd, mask, mask1)",
        py::arg("x"), py::arg("residual"), py::arg("x1"), py::arg("rowscale"), py::arg("weight"), py::arg("bias"),
        py::arg("weight1"), py::arg("bias1"), py::arg("eps"), py::arg("is_rms"), py::arg("dropout_p"), py::arg("seed"),
        py::arg("sum_dtype"), py::arg("out_dtype"), py::arg("store_sum"), py::arg("store_mask"),
        py::arg("out") = py::none(), py::arg("out1") = py::none(), py::arg("residual_out") = py::none());
  m.def("fused_backward",
        [](py::handle dy, py::handle dy1, py::handle dsum, py::handle s, py::handle weight, py::handle weight1,
           py::handle rowscale, py::handle mean, py::handle rstd, py::handle eps, py::handle is_rms,
           py::handle dropout_p, py::handle seed, py::handle needs, py::handle x_dtype, py::handle residual_dtype) {
          TORCH_CHECK_TYPE(PyTuple_Check(needs.ptr()) && PyTuple_GET_SIZE(needs.ptr()) == 7,
                           "needs: expected a tuple of 7 bools (dx, dx1, dresidual, dweight, dbias, dweight1, dbias1), "
                           "got ", type_name(needs));
          static const char* names[7] = {"needs[0] (dx)", "needs[1] (dx1)", "needs[2] (dresidual)",
                                         "needs[3] (dweight)", "needs[4] (dbias)", "needs[5] (dweight1)",
                                         "needs[6] (dbias1)"};
          std::vector<bool> nd(7);
          for (int k = 0; k < 7; ++k) nd[k] = arg_bool(PyTuple_GET_ITEM(needs.ptr(), k), names[k]);
          const auto rdt = residual_dtype.is_none() ? c10::optional<at::ScalarType>()
                                                    : c10::optional<at::ScalarType>(arg_dtype(residual_dtype, "residual_dtype"));
          auto res = fused::fused_backward(
              arg_optional_tensor(dy, "dy"), arg_optional_tensor(dy1, "dy1"), arg_optional_tensor(dsum, "dsum"),
              arg_tensor(s, "s"), arg_optional_tensor(weight, "weight"), arg_optional_tensor(weight1, "weight1"),
              arg_optional_tensor(rowscale, "rowscale"), arg_optional_tensor(mean, "mean"), arg_tensor(rstd, "rstd"),
              arg_float(eps, "eps"), arg_bool(is_rms, "is_rms"), arg_float(dropout_p, "dropout_p"),
              arg_int(seed, "seed"), nd, arg_dtype(x_dtype, "x_dtype"), rdt);
          return as_tuple(res);
        },
        "the fused backward of normkit.contract: (dx, dx1, dresidual, dweight, dbias, dweight1, dbias1), "
        "None where needs says so",
        py::arg("dy"), py::arg("dy1"), py::arg("dsum"), py::arg("s"), py::arg("weight"), py::arg("weight1"),
        py::arg("rowscale"), py::arg("mean"), py::arg("rstd"), py::arg("eps"), py::arg("is_rms"),
        py::arg("dropout_p"), py::arg("seed"), py::arg("needs"), py::arg("x_dtype"), py::arg("residual_dtype"));
}

}  // namespace normkit
