// fused::option_rows: the fused forward of a layer norm call with options (x1, rowscale, dropout
// and its masks, weight1 / bias1, a residual or sum of float32 beside a bfloat16 / float16 x) in
// the one-read row loop the plain call runs (fused_rows.h: one_read_rows with OptRead /
// OptWrite): each row's sum formed as it is read, its statistics from that one read, its output
// written in the loop that forms the next row. The options are run-time fields of the loop (a
// predictable test per vector), so one instantiation per dtype set (T, R, S) serves every
// option mix: 9 dtype sets (float32 throughout; bfloat16 x with its own or a float32 residual
// and sum; float16 x with a float32 sum), each for a float32 y, and the float32 / bfloat16 ones
// for a bfloat16 y (rounded by vcvtneps2bf16 on CPUs with AVX-512 BF16, in integer vector
// operations on the others). Two switches are template arguments, by measurement: dropout (its
// hash and tests; 0.90x the time of the run-time switch, 1 thread, in cache and from DRAM,
// Zen 4) and the streaming stores (tested in every store). Other calls (RMS norm with options, whose
// rows do not overlap; float64; a float16 y; a bfloat16 y with weight1 or dropout) take
// fused_cpu.cpp's row passes, measured faster for them (option_rows).
#include <torch/extension.h>

#include <cstdint>
#include <type_traits>
#include <vector>

#include "cpu_runtime.h"
#include "fused_args.h"
#include "fused_rows.h"

namespace normkit {
namespace {

using fused::DropStream;
using fused::Tensor;

// The loop without floating-point contraction: the sum is formed in the contract's order, each
// product and sum rounded as written (bit for bit the reference's s; an FMA would round
// (x * rowscale) + r once).
#pragma GCC push_options
#pragma GCC optimize("fp-contract=off")
template <typename T, typename R, typename S, typename O, bool Formed, fused::Dropout D, bool Stream>
NORMKIT_CLONES void opt_pass_narrow(const fused::OptFwdArgs<T, R, S, O>& a, int64_t lo, int64_t hi, float* cur, float* nxt) {
  fused::opt_rows<T, R, S, O, Formed, D, Stream>(a, lo, hi, cur, nxt);
}
#if defined(NORMKIT_WIDE)
// The loop with 64-byte vectors: AVX-512 code only, run where wide_vectors() says so.
template <typename T, typename R, typename S, typename O, bool Formed, fused::Dropout D, bool Stream>
NORMKIT_WIDE_TARGET void opt_pass_wide(const fused::OptFwdArgs<T, R, S, O>& a, int64_t lo, int64_t hi, float* cur, float* nxt) {
  fused::opt_rows<T, R, S, O, Formed, D, Stream, 64>(a, lo, hi, cur, nxt);
}
// The loop with a bfloat16 y rounded by vcvtneps2bf16 (store_bf16_cvt): AVX-512 BF16 code only,
// run where bf16_vectors() says so.
template <typename T, typename R, typename S, typename O, bool Formed, fused::Dropout D, bool Stream>
NORMKIT_BF16_TARGET void opt_pass_cvt(const fused::OptFwdArgs<T, R, S, O>& a, int64_t lo, int64_t hi, float* cur, float* nxt) {
  fused::opt_rows<T, R, S, O, Formed, D, Stream, 32, true>(a, lo, hi, cur, nxt);
}
#endif
#pragma GCC pop_options

// Which code a pass runs: the 32-byte loop (every x86-64), the 64-byte loop, or the 32-byte
// loop whose bfloat16 y is rounded by vcvtneps2bf16.
enum class Code { narrow, wide, cvt };

template <typename T, typename R, typename S, typename O, bool Formed, fused::Dropout D, bool Stream, Code K>
void opt_pass(const fused::OptFwdArgs<T, R, S, O>& a, int64_t lo, int64_t hi, float* cur, float* nxt) {
#if defined(NORMKIT_WIDE)
  if constexpr (K == Code::wide) opt_pass_wide<T, R, S, O, Formed, D, Stream>(a, lo, hi, cur, nxt);
  else if constexpr (K == Code::cvt) opt_pass_cvt<T, R, S, O, Formed, D, Stream>(a, lo, hi, cur, nxt);
  else  // (no 32-byte code is built for what only the other codes run)
#endif
    opt_pass_narrow<T, R, S, O, Formed, D, Stream>(a, lo, hi, cur, nxt);
}

template <typename T, typename R, typename S, typename O, bool Formed>
void option_forward(const fused::FwdCall& c) {
  using fused::data_or_null;
  using fused::param_or;
  const int64_t rows = c.rows, n = c.n;
  const auto opts = c.x.options();
  const bool has_w1 = c.weight1.defined(), drop = c.dropout_p > 0.0;
  // the loop reads all four of w, b (and w1, b1): ones / zeros where the call has none
  const Tensor w = param_or(c.weight, n, 1.0, at::kFloat, opts), b = param_or(c.bias, n, 0.0, at::kFloat, opts);
  const Tensor w1 = has_w1 ? param_or(c.weight1, n, 1.0, at::kFloat, opts) : Tensor();
  const Tensor b1 = has_w1 ? param_or(c.bias1, n, 0.0, at::kFloat, opts) : Tensor();
  const DropStream d0 = drop ? DropStream(c.seed, 0, n, c.dropout_p) : DropStream();
  const DropStream d1 = drop && c.x1.defined() ? DropStream(c.seed, 1, n, c.dropout_p) : DropStream();

  fused::OptFwdArgs<T, R, S, O> a{};
  a.x = c.x.const_data_ptr<T>();
  a.x1 = data_or_null<const T>(c.x1);
  a.r = data_or_null<const R>(c.residual);
  a.s = data_or_null<S>(c.s);
  a.y = data_or_null<O>(c.y);
  a.y1 = data_or_null<O>(c.y1);
  a.w = w.const_data_ptr<float>();
  a.b = b.const_data_ptr<float>();
  a.w1 = data_or_null<const float>(w1);
  a.b1 = data_or_null<const float>(b1);
  a.rowscale = data_or_null<const float>(c.rowscale);
  a.mask = data_or_null<uint8_t>(c.mask);
  a.mask1 = data_or_null<uint8_t>(c.mask1);
  a.d0 = drop ? &d0 : nullptr;
  a.d1 = drop && a.x1 ? &d1 : nullptr;
  a.scale = static_cast<float>(1.0 / (1.0 - c.dropout_p));
  a.mean = data_or_null<float>(c.mean);
  a.rstd = data_or_null<float>(c.rstd);
  a.n = n;
  a.eps = static_cast<float>(c.eps);
  // every stream of the call, per element: past outputs_stream the outputs are streamed
  const int64_t elem_bytes = sizeof(T) * (a.x1 ? 2 : 1) + (a.r ? sizeof(R) : 0) + (a.s ? sizeof(S) : 0) +
                             sizeof(O) * (a.y1 ? 2 : 1) + (a.mask ? 1 : 0) + (a.mask1 ? 1 : 0);
  const bool stream = outputs_stream(rows * n * elem_bytes) && can_stream<O, float>(a.y, n) &&
                      (!a.y1 || can_stream<O, float>(a.y1, n)) && (!a.s || can_stream<S, float>(a.s, n));
  // The wide loop (64-byte vectors, where the CPU has AVX-512) for dropout on x alone, one
  // stream in and one out: the hash makes that loop compute-bound, and 16 lanes a vector halve
  // its instructions. Against the 32-byte loop (Zen 4, 4096 x 2048 from DRAM, builds alternated
  // in one process, same bits; six processes each, results/ab-2026-12-07d-wide-*) dropout ran
  // 1.25-1.54x (1 thread) and 1.13-1.52x (2 threads) as fast. Without the hash it did not pay:
  // rowscale alone 0.82-0.93x (1 thread, five processes), a second output (weight1) 0.80-0.83x,
  // and in a harness a residual 0.85-0.88x and x1 0.90x (cause not found). Its streamed float32
  // stores are 64 bytes: y's rows (and s's) must start on 64-byte lines.
  const bool wide = drop && wide_vectors() && !a.r && !a.x1 && !a.y1 &&
                    (!stream || (can_stream<O, float, 64>(a.y, n) && (!a.s || can_stream<S, float, 64>(a.s, n))));
  // the rows of one chunk, by the call's template switches (dropout only where a sum is formed,
  // and not with a bfloat16 y: option_rows)
  constexpr bool y_bf16 = std::is_same_v<O, c10::BFloat16>, CanDrop = Formed && !y_bf16;
  using fused::Dropout;
  constexpr Dropout kDropX = CanDrop ? Dropout::x : Dropout::none;
  constexpr Dropout kDropBoth = CanDrop ? Dropout::x_and_x1 : Dropout::none;
  auto run = [&](auto code, int64_t lo, int64_t hi, float* cur, float* nxt) {
    constexpr Code K = decltype(code)::value;
    if (stream) {
      if (CanDrop && drop && a.x1) opt_pass<T, R, S, O, Formed, kDropBoth, true, K>(a, lo, hi, cur, nxt);
      else if (CanDrop && drop) opt_pass<T, R, S, O, Formed, kDropX, true, K>(a, lo, hi, cur, nxt);
      else opt_pass<T, R, S, O, Formed, Dropout::none, true, K>(a, lo, hi, cur, nxt);
    } else {
      if (CanDrop && drop && a.x1) opt_pass<T, R, S, O, Formed, kDropBoth, false, K>(a, lo, hi, cur, nxt);
      else if (CanDrop && drop) opt_pass<T, R, S, O, Formed, kDropX, false, K>(a, lo, hi, cur, nxt);
      else opt_pass<T, R, S, O, Formed, Dropout::none, false, K>(a, lo, hi, cur, nxt);
    }
  };
  // Descending writes (4K aliasing: writes_descend) for a float32 y, against the parameters and
  // the inputs of y's element size: x as the row normalized (not Formed: else a scratch row,
  // which ScratchRows keeps clear of y), or, Formed, x, the residual and x1 as the next row's
  // read. The wide loop's mirrored 64-byte vectors stay on 64-byte lines only where its vectors
  // cover a multiple of 16 columns.
  if constexpr (sizeof(O) == sizeof(float)) {
    const auto same_size = [](const auto* p) -> const void* { return sizeof(*p) == sizeof(O) ? p : nullptr; };
    const void* x_row = Formed ? nullptr : same_size(a.x);
    a.descend = writes_descend({a.y, a.y1}, {x_row, a.w, a.b, a.w1, a.b1},
                               {Formed ? same_size(a.x) : nullptr, same_size(a.r), same_size(a.x1)}) &&
                (!wide || (n - n % 8) % 16 == 0);
  }
  // a bfloat16 y: rounded by vcvtneps2bf16 where the CPU has it (bf16_vectors), else by the
  // 32-byte loop's integer rounding
  const bool cvt = y_bf16 && bf16_vectors();
  auto pass = [&](int64_t lo, int64_t hi, float* cur, float* nxt) {
    if constexpr (CanDrop) {
      if (wide) {  // dropout on x alone
        if (stream) return opt_pass<T, R, S, O, true, Dropout::x, true, Code::wide>(a, lo, hi, cur, nxt);
        return opt_pass<T, R, S, O, true, Dropout::x, false, Code::wide>(a, lo, hi, cur, nxt);
      }
    }
    if constexpr (y_bf16) {
      if (cvt) return run(std::integral_constant<Code, Code::cvt>{}, lo, hi, cur, nxt);
    }
    run(std::integral_constant<Code, Code::narrow>{}, lo, hi, cur, nxt);
  };
  const int64_t per = rows_per_chunk(rows, n);
  for_each_chunk((rows + per - 1) / per, is_serial(rows, n), [&](int64_t k) {
    const int64_t lo = k * per, hi = std::min(rows, lo + per);
    if (!Formed) return pass(lo, hi, nullptr, nullptr);
    const auto at = [&](const auto* p) { return first_row(p, lo, n, sizeof(*p)); };
    const ScratchRows<float> buf(2, n, hi - lo,
                                 {at(a.x), at(a.x1), at(a.r), at(a.s), at(a.y), at(a.y1), at(a.mask), at(a.mask1),
                                  {a.w, 0}, {a.b, 0}, {a.w1, 0}, {a.b1, 0},
                                  {drop ? d0.col_key.data() : nullptr, 0}, {a.d1 ? d1.col_key.data() : nullptr, 0}});
    pass(lo, hi, buf.row(0), buf.row(1));
  });
}

// f(R{}, S{}) for the (residual, sum) dtypes the loop is built for with input T: (T, T), and for
// bfloat16 / float16 T also (T, float32) (residual_in_fp32) and (float32, float32); not a
// float16 sum, whose rows do not overlap (option_rows). A call without a residual passes its
// sum dtype as the residual's. Returns false for another.
template <typename T, typename F>
bool with_sum_dtypes(at::ScalarType rdt, at::ScalarType sdt, const F& f) {
  constexpr auto tdt = c10::CppTypeToScalarType<T>::value;
  if constexpr (!std::is_same_v<T, c10::Half>)
    if (rdt == tdt && sdt == tdt) return f(T{}, T{}), true;
  if constexpr (!std::is_same_v<T, float>) {
    if (rdt == tdt && sdt == at::kFloat) return f(T{}, float{}), true;
    if (rdt == at::kFloat && sdt == at::kFloat) return f(float{}, float{}), true;
  }
  return false;
}

}  // namespace

bool fused::option_rows(const FwdCall& c) {
  const auto tdt = c.x.scalar_type(), sdt = c.sum_dtype, odt = c.out_dtype;
  const auto rdt = c.residual.defined() ? c.residual.scalar_type() : sdt;
  // y float32, or bfloat16 from a float32 or bfloat16 x, one output, no dropout. Against the row
  // passes, 4096 x 2048, builds alternated in one process, 1 and 2 threads:
  //   - Zen 4, rounded by vcvtneps2bf16 (store_bf16_cvt; three processes,
  //     results/ab-2026-12-07e-bf16-cvt-*): out_dtype=bfloat16 1.06-1.31x as fast, bfloat16
  //     residual_in_fp32 with prenorm 1.15-1.32x, residual + x1 1.02-1.11x, residual + rowscale
  //     0.98-1.03x;
  //   - Zen 3 (AVX2), rounded in integer operations (row_math.h bf16_bits; two processes,
  //     results/ab-2026-12-07f-bf16-narrow-*): 1.46-1.55x, 1.24-1.36x, 1.26-1.31x, 1.06-1.16x.
  // Not kept (printed): weight1 (two bfloat16 outputs) 0.80-0.86x on Zen 4 and 0.37-0.39x on
  // Zen 3 (y and y1 at one page offset, as fresh tensors of one size are: 4K aliasing of the
  // two store streams; 64+ bytes apart it ran about as fast as the row passes); bfloat16 dropout on x alone 0.84x (Zen 4, 32-byte loop), 0.59-1.05x
  // in 64-byte vectors (unstable), 0.88-0.90x on Zen 3.
  const bool y_bf16 = odt == at::kBFloat16 && (tdt == at::kFloat || tdt == at::kBFloat16) && !c.weight1.defined() &&
                      c.dropout_p == 0.0;
  // (the option loop is layer norm's: opt_rows normalizes with the mean)
  if (c.is_rms || (odt != at::kFloat && !y_bf16) || tdt == at::kDouble || rdt == at::kDouble || sdt == at::kDouble) return false;
  // contract.sum_is_input, unless the caller asked for s in a buffer of its own
  const bool formed = c.residual.defined() || c.x1.defined() || c.rowscale.defined() || c.dropout_p > 0.0 ||
                      sdt != tdt || c.s.defined();
  // Only the calls whose rows overlap (layer norm, fused_rows.h's overlap_pays), each row's
  // output written in the loop that forms the next: the gain over the row passes. Measured
  // against them (benchmarks/bench_option_paths.py, results/option-paths-2026-12-06-amd-epyc.json;
  // Zen 4, 1 thread, 4096 x 2048, builds alternated): layer norm with x1, rowscale, dropout
  // 2.97 / 2.18-2.29 / 2.01 a copy against 3.29-3.58 / 2.56-2.76 / 2.16-2.29. Without the
  // overlap the row passes' `omp simd` loops (16 lanes on AVX-512, the loop's vectors are 8)
  // were faster: RMS norm with dropout 2.87 against 2.06-2.28, with rowscale 2.76-2.79 against
  // 2.55-2.58.
  const bool vector_stores = !(formed && sdt == at::kHalf);  // a float16 sum: element stores (store_vec)
  const int64_t row_bytes = c.n * static_cast<int64_t>(c.x.element_size());
  if (!fused::overlap_pays(c.rows, row_bytes, c.is_rms, vector_stores)) return false;
  bool ran = false;
  auto run = [&](auto o_tag) {
    using O = decltype(o_tag);
    with_dtype(tdt, [&](auto t_tag) {
      using T = decltype(t_tag);
      if constexpr (!std::is_same_v<T, double> && (std::is_same_v<O, float> || !std::is_same_v<T, c10::Half>)) {
        if (!formed) {
          option_forward<T, T, T, O, false>(c);
          ran = true;
          return;
        }
        ran = with_sum_dtypes<T>(rdt, sdt, [&](auto r_tag, auto s_tag) {
          option_forward<T, decltype(r_tag), decltype(s_tag), O, true>(c);
        });
      }
    });
  };
  if (y_bf16) run(c10::BFloat16{});
  else run(float{});
  return ran;
}

}  // namespace normkit
