// Row statistics, normalization and the normalized gradient for one contiguous row: the C++
// counterparts of normkit.reference.statistics / normalize / normalized_gradient, shared by the
// norm kernels (norm_cpu.cpp) and the LN-LSTM/GRU steps (rnn_cpu.cpp).
//
// Semantics (normkit.reference): the statistics are computed in Acc (float, or double for
// double input) from the shifted sums S1 = sum(x - K), S2 = sum((x - K)^2) of one pass over
// the row (Chan, Golub & LeVeque 1983): mean = K + S1/n, var = S2/n - (S1/n)^2. With K the
// row's mean this is the corrected two-pass algorithm (exact for a constant row, exact
// variance at large means); K is instead a cheap estimate of the mean (the mean of the row's
// first 32 elements), which costs one read of the row instead of two, and the corrected
// second pass runs only when the estimate was too far off to keep that accuracy (see
// row_stats). Sums run in blocks of kBlock elements summed in Acc, the blocks added in double.
#pragma once

#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include "isa.h"

#if defined(__SSE2__)
#include <emmintrin.h>  // non-temporal stores (SSE2: every x86-64 clone has them)
#endif
#if defined(NORMKIT_WIDE)
#include <immintrin.h>  // (declares the AVX-512 builtin the wide loop's stores use: stream_vector)
#endif

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <type_traits>

namespace normkit {

constexpr int64_t kBlock = 2048;

// --- element conversion: every kernel reads inputs as Acc and writes outputs as T ---------------

template <typename T, typename Acc>
NORMKIT_INLINE Acc load(T v) {
  return static_cast<Acc>(v);
}

template <>
NORMKIT_INLINE float load<c10::BFloat16, float>(c10::BFloat16 v) {
  uint32_t bits = static_cast<uint32_t>(v.x) << 16;
  float out;
  std::memcpy(&out, &bits, sizeof(out));
  return out;
}

template <typename T>
NORMKIT_INLINE T store(float v) {
  return static_cast<T>(v);
}

// float -> bfloat16, round to nearest even; a NaN stays a (quiet) NaN. Branch-free, so the
// loops that inline it still vectorize.
template <>
NORMKIT_INLINE c10::BFloat16 store<c10::BFloat16>(float v) {
  uint32_t b;
  std::memcpy(&b, &v, sizeof(b));
  uint32_t hi = b >> 16;
  uint32_t rounded = (b + 0x7FFFu + (hi & 1u)) >> 16;
  uint32_t is_nan = (b & 0x7FFFFFFFu) > 0x7F800000u;
  c10::BFloat16 out;
  out.x = static_cast<uint16_t>(is_nan ? (hi | 0x0040u) : rounded);
  return out;
}

template <typename T>
NORMKIT_INLINE T store(double v) {
  return static_cast<T>(v);
}

// --- row statistics ---------------------------------------------------------------------------

// Sums keep four vector accumulators (GCC vector extensions: 32 bytes each, which every
// x86-64 clone maps to its registers), so the adds are not serialized on one register's
// latency; the lanes are added pairwise at the end. The order is fixed by the code, so results
// are deterministic. Within a block the sums are in Acc, the blocks are added in double.
//
// B, a vector's bytes: 32 everywhere, except in the wide loop (write_row_sums_next<..., 64>),
// which is compiled only for AVX-512 (x86-64-v4) and there maps a 64-byte vector to one register.
template <typename E, int B>
struct VecOf {
  typedef E type __attribute__((vector_size(B)));
};
template <typename Acc, int B = 32>
using vec_t = typename VecOf<Acc, B>::type;
template <typename Acc, int B = 32>
constexpr int kWidth = B / sizeof(Acc);
template <int B = 32>
using u32v = typename VecOf<uint32_t, B>::type;  // kWidth<float, B> lanes of 32 bits
template <int B = 32>
using i32v = typename VecOf<int32_t, B>::type;
typedef u32v<32> u32x8;

// kWidth<Acc, B> elements from p as a vector of Acc.
template <typename T, typename Acc, int B = 32>
NORMKIT_INLINE vec_t<Acc, B> load_vec(const T* p) {
  vec_t<Acc, B> v;
  if constexpr (std::is_same_v<T, Acc>) {
    std::memcpy(&v, p, sizeof(v));
  } else if constexpr (std::is_same_v<T, c10::BFloat16> && std::is_same_v<Acc, float>) {  // (a bf16 dy of a float64 call: the loop below)
    typename VecOf<uint16_t, B / 2>::type h;
    std::memcpy(&h, p, sizeof(h));
    const u32v<B> bits = __builtin_convertvector(h, u32v<B>) << 16;
    std::memcpy(&v, &bits, sizeof(v));
  } else {
    for (int k = 0; k < kWidth<Acc, B>; ++k) v[k] = load<T, Acc>(p[k]);
  }
  return v;
}

template <typename Acc>
NORMKIT_INLINE Acc hsum(vec_t<Acc> a) {
  Acc out = 0;
  for (int k = 0; k < kWidth<Acc>; ++k) out += a[k];
  return out;
}

// block_sums' end, from element j of the block: the vectors left (into a), the scalar tail,
// then each sum's accumulators added pairwise, in a fixed order.
template <typename Acc, typename FV, typename FS>
NORMKIT_INLINE void block_sums_finish(int64_t j, int64_t len, const FV& fv, const FS& fs, vec_t<Acc>& a0,
                                      vec_t<Acc> b0, vec_t<Acc> c0, vec_t<Acc> d0, vec_t<Acc>& a1, vec_t<Acc> b1,
                                      vec_t<Acc> c1, vec_t<Acc> d1, double& out0, double& out1) {
  constexpr int W = kWidth<Acc>;
  for (; j + W <= len; j += W) fv(j, a0, a1);
  Acc t0 = 0, t1 = 0;
  for (; j < len; ++j) fs(j, t0, t1);
  out0 += static_cast<double>(hsum<Acc>((a0 + b0) + (c0 + d0)) + t0);
  out1 += static_cast<double>(hsum<Acc>((a1 + b1) + (c1 + d1)) + t1);
}

// The sums over one block of len elements of f0 and f1, each given (vector, scalar) forms:
// f0v(j) -> vec_t over elements j..j+kWidth-1, f0s(j) -> Acc for the tail.
// (fv's accumulators are vec_t<Acc>&: 32 bytes, kWidth<Acc> lanes.)
template <typename Acc, typename FV, typename FS>
NORMKIT_INLINE void block_sums(int64_t len, const FV& fv, const FS& fs, double& out0, double& out1) {
  constexpr int W = kWidth<Acc>;
  vec_t<Acc> a0 = {}, b0 = {}, c0 = {}, d0 = {}, a1 = {}, b1 = {}, c1 = {}, d1 = {};
  int64_t j = 0;
  for (; j + 4 * W <= len; j += 4 * W) {
    fv(j, a0, a1);
    fv(j + W, b0, b1);
    fv(j + 2 * W, c0, c1);
    fv(j + 3 * W, d0, d1);
  }
  block_sums_finish<Acc>(j, len, fv, fs, a0, b0, c0, d0, a1, b1, c1, d1, out0, out1);
}

// block_sums with 64-byte vectors (16 float lanes, AVX-512: the wide loop): fv takes
// vec_t<Acc, 64>& accumulators in the main loop and vec_t<Acc>& after it. Lane for lane the
// same sums in the same order as block_sums, so the same bits: the low and high halves of the
// accumulator of elements j..j+15 are block_sums' a and b, those of j+16..j+31 its c and d.
template <typename Acc, typename FV, typename FS>
NORMKIT_INLINE void block_sums_wide(int64_t len, const FV& fv, const FS& fs, double& out0, double& out1) {
  static_assert(std::is_same_v<Acc, float>);
  constexpr int W = kWidth<Acc, 64>;
  vec_t<Acc, 64> ab0 = {}, cd0 = {}, ab1 = {}, cd1 = {};
  int64_t j = 0;
  for (; j + 2 * W <= len; j += 2 * W) {
    fv(j, ab0, ab1);
    fv(j + W, cd0, cd1);
  }
  auto lo = [](vec_t<Acc, 64> v) NORMKIT_INLINE_LAMBDA -> vec_t<Acc> {
    return __builtin_shufflevector(v, v, 0, 1, 2, 3, 4, 5, 6, 7);
  };
  auto hi = [](vec_t<Acc, 64> v) NORMKIT_INLINE_LAMBDA -> vec_t<Acc> {
    return __builtin_shufflevector(v, v, 8, 9, 10, 11, 12, 13, 14, 15);
  };
  vec_t<Acc> a0 = lo(ab0), b0 = hi(ab0), c0 = lo(cd0), d0 = hi(cd0);
  vec_t<Acc> a1 = lo(ab1), b1 = hi(ab1), c1 = lo(cd1), d1 = hi(cd1);
  block_sums_finish<Acc>(j, len, fv, fs, a0, b0, c0, d0, a1, b1, c1, d1, out0, out1);
}

// block_sums with three sums (fv / fs take three accumulators).
template <typename Acc, typename FV, typename FS>
NORMKIT_INLINE void block_sums3(int64_t len, const FV& fv, const FS& fs, double& out0, double& out1, double& out2) {
  constexpr int W = kWidth<Acc>;
  vec_t<Acc> a0 = {}, b0 = {}, a1 = {}, b1 = {}, a2 = {}, b2 = {};
  int64_t j = 0;
  for (; j + 2 * W <= len; j += 2 * W) {
    fv(j, a0, a1, a2);
    fv(j + W, b0, b1, b2);
  }
  for (; j + W <= len; j += W) fv(j, a0, a1, a2);
  Acc t0 = 0, t1 = 0, t2 = 0;
  for (; j < len; ++j) fs(j, t0, t1, t2);
  out0 += static_cast<double>(hsum<Acc>(a0 + b0) + t0);
  out1 += static_cast<double>(hsum<Acc>(a1 + b1) + t1);
  out2 += static_cast<double>(hsum<Acc>(a2 + b2) + t2);
}

// sum_j load(src[j]), blocked.
template <typename T, typename Acc>
NORMKIT_INLINE Acc row_sum(const T* src, int64_t n) {
  double total = 0.0, unused = 0.0;
  for (int64_t j0 = 0; j0 < n; j0 += kBlock) {
    const T* p = src + j0;
    block_sums<Acc>(
        std::min(kBlock, n - j0), [&](int64_t j, vec_t<Acc>& s0, vec_t<Acc>&) { s0 += load_vec<T, Acc>(p + j); },
        [&](int64_t j, Acc& s0, Acc&) { s0 += load<T, Acc>(p[j]); }, total, unused);
  }
  return static_cast<Acc>(total);
}

// The mean is kept as hi + lo: hi, the mean rounded to Acc (what forward saves), and lo, the
// rounding error of hi (a few ulps of hi). Rows are centred as (x - hi) - lo: x - hi is exact
// for x near the mean, so a row with a mean of 1e4 and unit spread is centred to float32
// precision rather than to hi's ulp (6e-5 relative at 1e3, 1e-3 at 1e4), which the output and
// the gradient would otherwise carry.
template <typename Acc>
struct RowStats {
  Acc mean;  // hi; 0 for RMS norm
  Acc rstd;
  Acc lo = 0;
};

// sum((x - K)^2) and sum(x - K) over a row, for the shift K.
template <typename Acc>
struct ShiftedSums {
  Acc shift = 0;
  double ss = 0.0, sd = 0.0;
};

// The locality of the readers' software prefetch (prefetch(j) below, write_row_sums_next's, of
// the next row kPrefetchBytes ahead): 2, prefetcht1, into L2. Into L1 (3, prefetcht0) the
// prefetches of one or two input streams 4 KiB ahead ask for more lines than L1 can have in
// flight; into L2 the overlapped loop ran 1.2-1.3x faster from DRAM (1 thread, Zen 4, 1024-8192
// wide: plain, formed, + residual; dropout 1.0-1.04x), and further ahead (6-8 KiB) was slower.
constexpr int kPrefetchLocality = 2;

// What a sum pass reads as its row, element by element: here a row as it is in memory (a row
// formed as it is read, x + residual, is fused::SumRead). value(j): element j, no side effect;
// vec(j) / one(j): kWidth elements from j / element j, as the pass consumes them (a formed row
// keeps them as it goes); prefetch(j): ask for the row's memory at element j.
template <typename T, typename Acc>
struct RowRead {
  const T* p;
  static constexpr int64_t kElemBytes = sizeof(T);
  NORMKIT_INLINE Acc value(int64_t j) const { return load<T, Acc>(p[j]); }
  template <int B = 32>
  NORMKIT_INLINE vec_t<Acc, B> vec(int64_t j) const { return load_vec<T, Acc, B>(p + j); }
  NORMKIT_INLINE Acc one(int64_t j) const { return value(j); }
  NORMKIT_INLINE void prefetch(int64_t j) const { __builtin_prefetch(p + j, 0, kPrefetchLocality); }
};

// The shift: the mean of the row's first (up to) 32 elements, a cheap estimate of the row's
// mean (a standard error of std / 5.7 on independent elements), summed in a fixed order.
template <typename Acc, typename In>
NORMKIT_INLINE Acc row_shift(const In& in, int64_t n) {
  const int64_t m = std::min<int64_t>(n, 32);
  Acc s = 0;
  for (int64_t j = 0; j < m; ++j) s += in.value(j);
  return s / static_cast<Acc>(m);
}

// The sums' vector step and scalar step (block_sums), shared by the sum loops below so that
// they give the same bits for the same row.
template <typename Acc, int B = 32>
NORMKIT_INLINE void shifted_step(vec_t<Acc, B> v, Acc shift, vec_t<Acc, B>& s2, vec_t<Acc, B>& s1) {
  const vec_t<Acc, B> d = v - shift;
  s2 += d * d;
  s1 += d;
}
template <typename Acc>
NORMKIT_INLINE void shifted_step(Acc v, Acc shift, Acc& s2, Acc& s1) {
  const Acc d = v - shift;
  s2 += d * d;
  s1 += d;
}

// The shifted sums of the row `in` reads (consuming it: a formed row is kept as it goes).
template <typename Acc, typename In>
NORMKIT_INLINE ShiftedSums<Acc> row_sums(const In& in_ref, int64_t n, Acc shift) {
  const In in = in_ref;  // a local copy, as in write_row_sums_next
  ShiftedSums<Acc> out;
  out.shift = shift;
  for (int64_t j0 = 0; j0 < n; j0 += kBlock) {
    block_sums<Acc>(
        std::min(kBlock, n - j0),
        [&](int64_t j, vec_t<Acc>& s2, vec_t<Acc>& s1) NORMKIT_INLINE_LAMBDA {
          shifted_step<Acc>(in.vec(j0 + j), shift, s2, s1);
        },
        [&](int64_t j, Acc& s2, Acc& s1) NORMKIT_INLINE_LAMBDA { shifted_step<Acc>(in.one(j0 + j), shift, s2, s1); },
        out.ss, out.sd);
  }
  return out;
}

template <typename T, typename Acc>
NORMKIT_INLINE ShiftedSums<Acc> shifted_sums(const T* src, int64_t n, Acc shift) {
  return row_sums<Acc>(RowRead<T, Acc>{src}, n, shift);
}

// The statistics from the shifted sums (for RMS norm the shift is 0: mean 0, var = mean(x^2)).
// Returns whether they carry the corrected two-pass algorithm's accuracy: with c = mean - K,
// the sums' rounding (relative gamma, all of S2's terms >= 0) leaves an error of about
// gamma * (var + 2|c| std + 3 c^2) in var = S2/n - c^2 against gamma * var when K is the mean;
// |c| <= std / 2 keeps it within 3x of that (the mean's error, gamma * (std + |c|), within
// 1.5x), which the error tests' 2x-torch margin holds with room. A row that fails it (a
// shift far from the mean: a row with a trend or outliers in its first elements) takes the
// corrected second pass from the mean found here. A constant row gives c = 0 and var = 0
// exactly; a NaN or inf in the row fails the test and takes the pass that propagates it.
template <typename Acc>
NORMKIT_INLINE bool stats_from_sums(const ShiftedSums<Acc>& s, int64_t n, Acc eps, bool is_rms, RowStats<Acc>& st) {
  double var = s.ss / static_cast<double>(n);
  bool accurate = true;
  st.lo = 0;
  st.mean = s.shift;
  if (!is_rms) {
    const double c = s.sd / static_cast<double>(n);
    const double refined = static_cast<double>(s.shift) + c;
    st.mean = static_cast<Acc>(refined);
    st.lo = static_cast<Acc>(refined - static_cast<double>(st.mean));
    var = std::max(var - c * c, 0.0);
    accurate = 4.0 * c * c <= var;
  }
  st.rstd = Acc(1) / std::sqrt(static_cast<Acc>(var) + eps);
  return accurate;
}

// The corrected second pass: the statistics from the sums shifted by the row's mean (0 for
// RMS norm), found by an earlier pass.
template <typename T, typename Acc>
NORMKIT_INLINE RowStats<Acc> row_stats_from_mean(const T* src, int64_t n, Acc mean, Acc eps, bool is_rms) {
  RowStats<Acc> st;
  stats_from_sums<Acc>(shifted_sums<T, Acc>(src, n, mean), n, eps, is_rms, st);
  return st;
}

// The statistics from sums shifted by `s.shift`, taking the corrected second pass over src
// when the shift was too far from the mean (stats_from_sums).
template <typename T, typename Acc>
NORMKIT_INLINE RowStats<Acc> finish_stats(const T* src, int64_t n, const ShiftedSums<Acc>& s, Acc eps, bool is_rms) {
  RowStats<Acc> st;
  if (stats_from_sums<Acc>(s, n, eps, is_rms, st)) return st;
  return row_stats_from_mean<T, Acc>(src, n, st.mean, eps, is_rms);
}

// (mean, 1/sqrt(var + eps)) of a row; for RMS norm the mean is 0 and var = mean(s^2). One
// read of the row for RMS norm and, nearly always, for layer norm (row_shift).
template <typename T, typename Acc>
NORMKIT_INLINE RowStats<Acc> row_stats(const T* src, int64_t n, Acc eps, bool is_rms) {
  const Acc shift = is_rms ? Acc(0) : row_shift<Acc>(RowRead<T, Acc>{src}, n);
  return finish_stats<T, Acc>(src, n, shifted_sums<T, Acc>(src, n, shift), eps, is_rms);
}

// Each lane of v rounded to bfloat16 as store<BFloat16> rounds it, the result in the lane's
// upper 16 bits (the lower 16 are left as they come out): b + 0x7FFF + (bit 16 of b) rounds to
// nearest even, and a NaN keeps its sign and upper bits with the quiet bit set (store's hi |
// 0x0040). Five integer operations, a compare and a blend on AVX2 (the rounding of every float
// checked against store<BFloat16> bit for bit, all 2^32 of them, when this was written).
template <int B = 32>
NORMKIT_INLINE u32v<B> bf16_upper(vec_t<float, B> v) {
  u32v<B> b;
  std::memcpy(&b, &v, sizeof(b));
  const u32v<B> rounded = b + (((b >> 16) & 1u) + 0x7FFFu);
  const i32v<B> nan = v != v;
  return nan ? (b | 0x00400000u) : rounded;
}

// The bfloat16 bits of kWidth<float, B> floats: store<BFloat16> in vector operations.
template <int B = 32>
NORMKIT_INLINE typename VecOf<uint16_t, B / 2>::type bf16_bits(vec_t<float, B> v) {
  const u32v<B> w = bf16_upper<B>(v);
  if constexpr (B == 32) {
    // the upper halves of each 16-byte half to its low 8 bytes (vpshufb), then the two halves'
    // low 8 bytes together (vpermq): two instructions on AVX2 (a plain shuffle of the 8 upper
    // halves compiles to four)
    using u16x16 = typename VecOf<uint16_t, 32>::type;
    using u64x4 = typename VecOf<uint64_t, 32>::type;
    u16x16 h;
    std::memcpy(&h, &w, sizeof(h));
    const u16x16 in_halves = __builtin_shufflevector(h, h, 1, 3, 5, 7, 1, 3, 5, 7, 9, 11, 13, 15, 9, 11, 13, 15);
    u64x4 q;
    std::memcpy(&q, &in_halves, sizeof(q));
    const auto low = __builtin_shufflevector(q, q, 0, 2);
    typename VecOf<uint16_t, 16>::type out;
    std::memcpy(&out, &low, sizeof(out));
    return out;
  } else {
    return __builtin_convertvector(w >> 16, typename VecOf<uint16_t, B / 2>::type);
  }
}

// v rounded to S and read back as Acc: load<S, Acc>(store<S>(v)) on each lane.
template <typename S, typename Acc, int B = 32>
NORMKIT_INLINE vec_t<Acc, B> round_vec(vec_t<Acc, B> v) {
  if constexpr (std::is_same_v<S, Acc>) {
    return v;
  } else if constexpr (std::is_same_v<S, c10::BFloat16> && std::is_same_v<Acc, float>) {
    const u32v<B> bits = bf16_upper<B>(v) & 0xFFFF0000u;
    vec_t<Acc, B> out;
    std::memcpy(&out, &bits, sizeof(out));
    return out;
  } else {
    for (int k = 0; k < kWidth<Acc, B>; ++k) v[k] = load<S, Acc>(store<S>(v[k]));
    return v;
  }
}

// The bytes of v to p with non-temporal stores: 16-byte stores (SSE2; p 16-byte aligned), or for
// a 64-byte v one 64-byte store (AVX-512: only in the wide loop's code; p 64-byte aligned).
template <int Bytes>
NORMKIT_INLINE void stream_vector(void* p, const void* v) {
#if defined(__SSE2__)
#if defined(NORMKIT_WIDE)
  if constexpr (Bytes == 64) {
    typedef float f32x16 __attribute__((vector_size(64)));
    f32x16 q;
    std::memcpy(&q, v, 64);
    __builtin_ia32_movntps512(static_cast<float*>(p), q);  // a builtin, not the intrinsic: no target check here
    return;
  }
#endif
  for (int k = 0; k < Bytes / 16; ++k) {
    __m128i q;
    std::memcpy(&q, static_cast<const char*>(v) + 16 * k, 16);
    _mm_stream_si128(static_cast<__m128i*>(p) + k, q);
  }
#else
  std::memcpy(p, v, Bytes);
#endif
}

// The alignment store_vec<T, Acc, true, B> asks of p: its non-temporal store's.
template <typename T, typename Acc, int B>
constexpr int64_t kStreamAlign = (std::is_same_v<T, Acc> && B == 64) ? 64 : 16;

// kWidth<Acc, B> elements of v stored to p as T (float -> bfloat16 rounded as store<BFloat16>, in
// vector operations: the fused loop below is written with vectors, not for `omp simd`).
// Stream: non-temporal stores (stream_vector; p aligned to kStreamAlign), for outputs that
// will not stay cached (beyond the last-level cache), where they save the read of each output line before its write.
template <typename T, typename Acc, bool Stream, int B = 32>
NORMKIT_INLINE void store_vec(T* p, vec_t<Acc, B> v) {
  if constexpr (std::is_same_v<T, Acc>) {
    if constexpr (Stream) stream_vector<B>(p, &v);
    else std::memcpy(p, &v, sizeof(v));
  } else if constexpr (std::is_same_v<T, c10::BFloat16> && std::is_same_v<Acc, float>) {
    const auto h = bf16_bits<B>(v);
    if constexpr (Stream) stream_vector<B / 2>(p, &h);
    else std::memcpy(p, &h, sizeof(h));
  } else {
    for (int k = 0; k < kWidth<Acc, B>; ++k) p[k] = store<T>(v[k]);
  }
}

#if defined(NORMKIT_WIDE)
// store_vec<BFloat16, float, Stream> (8 lanes) with AVX-512 BF16's conversion (vcvtneps2bf16,
// one instruction for bf16_bits' seven and two shuffles): the same bits, NaN included, except for float32
// denormals, which the instruction flushes to zero where store<BFloat16> rounds them; a vector
// with one (vfpclassps) takes store_vec. Only in code compiled for avx512bf16
// (NORMKIT_BF16_TARGET; builtins, not the intrinsics, as stream_vector's).
template <bool Stream>
NORMKIT_INLINE void store_bf16_cvt(c10::BFloat16* p, vec_t<float> v) {
  typedef float f32x8 __attribute__((vector_size(32)));
  constexpr int kDenormal = 0x20;  // vfpclassps' class of denormals
  f32x8 f;
  std::memcpy(&f, &v, sizeof(f));
  if (__builtin_ia32_fpclassps256_mask(f, kDenormal, 0xFF)) return store_vec<c10::BFloat16, float, Stream>(p, v);
  const auto h = __builtin_ia32_cvtneps2bf16_v8sf(f);
  if constexpr (Stream) stream_vector<16>(p, &h);
  else std::memcpy(p, &h, sizeof(h));
}
#endif

// Whether store_vec<T, Acc, true, B> can write rows of n elements starting at y.
template <typename T, typename Acc, int B = 32>
inline bool can_stream(const T* y, int64_t n) {
#if defined(__SSE2__)
  constexpr bool vector_store = std::is_same_v<T, Acc> || std::is_same_v<T, c10::BFloat16>;
  constexpr int64_t align = kStreamAlign<T, Acc, B>;
  return vector_store && reinterpret_cast<uintptr_t>(y) % align == 0 && (n * static_cast<int64_t>(sizeof(T))) % align == 0;
#else
  (void)y, (void)n;
  return false;
#endif
}

// Call after the last store_vec<..., true> of a thread's work: orders the non-temporal stores
// before whatever the thread does next (they are weakly ordered).
inline void stream_fence() {
#if defined(__SSE2__)
  _mm_sfence();
#endif
}

// bytes from src to dst with non-temporal stores (SSE2, 16 bytes each): dst 16-byte aligned and
// bytes a multiple of 16 (can_stream_bytes), else (and without SSE2) a plain copy. For the
// passes whose loops store one element at a time (`omp simd` loops of any dtype): they write a
// slice into an L1 stage, then stream it out, which saves the read of each output line before
// its write (the L1 round trip costs less than that read beyond the last-level cache).
NORMKIT_INLINE void stream_bytes(void* dst, const void* src, int64_t bytes) {
#if defined(__SSE2__)
  if (reinterpret_cast<uintptr_t>(dst) % 16 == 0 && bytes % 16 == 0) {
    auto* d = static_cast<__m128i*>(dst);
    const auto* q = static_cast<const __m128i*>(src);
    for (int64_t k = 0; k < bytes / 16; ++k) _mm_stream_si128(d + k, _mm_loadu_si128(q + k));
    return;
  }
#endif
  std::memcpy(dst, src, static_cast<size_t>(bytes));
}

// Whether stream_bytes streams rows of row_bytes starting at p.
inline bool can_stream_bytes(const void* p, int64_t row_bytes) {
#if defined(__SSE2__)
  return reinterpret_cast<uintptr_t>(p) % 16 == 0 && row_bytes % 16 == 0;
#else
  (void)p, (void)row_bytes;
  return false;
#endif
}

// Elements of one stage: write_row_streamed's slices and the stages of the row passes (a
// float32 stage is 4 KiB, in L1).
constexpr int64_t kStage = 1024;

// How far ahead of the loads write_row_sums_next<Stream = true> prefetches the next row.
constexpr int64_t kPrefetchBytes = 4096;

// The output of a row written by write_row_sums_next: y = h w + b of each normalized element h,
// as T (w, b not null: ones / zeros materialized when the call has none). Stream: non-temporal
// stores (store_vec) and, in write_row_sums_next, the prefetch of the next row.
template <typename T, typename Acc, bool Stream>
struct RowWrite {
  T* y;
  const Acc *w, *b;
  static constexpr bool stream = Stream;
  template <int B = 32>
  NORMKIT_INLINE void vec(int64_t j, vec_t<Acc, B> h) const {
    vec_t<Acc, B> wv, bv;
    std::memcpy(&wv, w + j, sizeof(wv));
    std::memcpy(&bv, b + j, sizeof(bv));
    store_vec<T, Acc, Stream, B>(y + j, h * wv + bv);
  }
  NORMKIT_INLINE void one(int64_t j, Acc h) const { y[j] = store<T>(h * w[j] + b[j]); }
};

// row_sums(next, n, shift) (the same sums in the same order, so the same bits) while writing
// this row's output, out.vec / out.one of h = ((src[j] - hi) - lo) * rstd (a RowWrite: y = h w
// + b), in the same loop: the read of the next row from memory and the write of this row's
// output overlap, as in a copy, instead of a read-only pass followed by a write-only pass.
// out.stream: non-temporal stores (store_vec) and a software prefetch of the next row
// kPrefetchBytes ahead: together (either alone does not) they bring the loop from 0.7x to 0.9x
// of a copy's bandwidth from DRAM on a Zen 4 EPYC; in cache the prefetch costs 5-10 %, so only
// for calls whose inputs and outputs together are past outputs_stream (cpu_runtime.h). (src: the row as it
// is, or the Acc buffer a formed row was kept in.)
//
// B: the vectors' bytes, 32, or 64 in the wide loop (block_sums_wide: the same bits), whose code
// is compiled for AVX-512 only (NORMKIT_WIDE_TARGET callers).
//
// Descend: the output's vectors written in descending column order (cpu_runtime.h
// writes_descend: 4K aliasing), each mirrored in the columns the vectors cover, [0, nv): the
// vector that comes with the read of columns c..c+w-1 writes columns nv-c-w..nv-c-1; the scalar
// tail stays in place. The same values: only the order of the writes changes. A compile-time
// switch: chosen at run time per vector, the column select cost 5-13 % on the compute-bound
// two-output and bfloat16-output loops (+ weight1/bias1, out_dtype=bfloat16; Zen 3).
template <typename Src, typename Acc, int B = 32, bool Descend = false, typename In, typename Out>
NORMKIT_INLINE ShiftedSums<Acc> write_row_sums_next(const Src* src, const Out& out_in, const In& next_in, int64_t n,
                                                    const RowStats<Acc>& st, Acc shift) {
  // local copies: their fields stay in registers, where the output stores (memcpy, which may
  // alias anything) would otherwise reload each of them from memory after every store
  const Out out = out_in;
  const In next = next_in;
  constexpr int64_t kLine = 64 / In::kElemBytes, kAhead = kPrefetchBytes / In::kElemBytes;
  const Acc mean = st.mean, rstd = st.rstd, lo = st.lo;
  const int64_t nv = n - n % kWidth<Acc>;  // the columns the vectors cover
  ShiftedSums<Acc> sums;
  sums.shift = shift;
  for (int64_t j0 = 0; j0 < n; j0 += kBlock) {
    const Src* s = src + j0;
    // (s2, s1: vec_t<Acc, VB>&, VB = 32, or 64 in block_sums_wide's main loop)
    auto fv = [&](int64_t j, auto& s2, auto& s1) NORMKIT_INLINE_LAMBDA {
      constexpr int VB = sizeof(s2);
      constexpr int64_t kW = VB / sizeof(Acc);
      if (out.stream) {
        if (j % kLine == 0) next.prefetch(j0 + j + kAhead);
      }
      shifted_step<Acc, VB>(next.template vec<VB>(j0 + j), shift, s2, s1);
      const int64_t c = Descend ? nv - kW - (j0 + j) : j0 + j;
      out.template vec<VB>(c, ((load_vec<Src, Acc, VB>(src + c) - mean) - lo) * rstd);
    };
    auto fs = [&](int64_t j, Acc& s2, Acc& s1) NORMKIT_INLINE_LAMBDA {
      shifted_step<Acc>(next.one(j0 + j), shift, s2, s1);
      out.one(j0 + j, ((load<Src, Acc>(s[j]) - mean) - lo) * rstd);
    };
    if constexpr (B == 64) block_sums_wide<Acc>(std::min(kBlock, n - j0), fv, fs, sums.ss, sums.sd);
    else block_sums<Acc>(std::min(kBlock, n - j0), fv, fs, sums.ss, sums.sd);
  }
  return sums;
}

// y[j] = (src[j] - mean) * rstd * w[j] + b[j]; w/b may be null (gain 1, bias 0).
template <typename T, typename S, typename Acc>
NORMKIT_INLINE void write_row(const S* src, T* y, int64_t n, RowStats<Acc> st, const Acc* w, const Acc* b) {
  const Acc mean = st.mean, rstd = st.rstd, lo = st.lo;
  if (w && b) {
#pragma omp simd
    for (int64_t j = 0; j < n; ++j) y[j] = store<T>(((load<S, Acc>(src[j]) - mean) - lo) * rstd * w[j] + b[j]);
  } else if (w) {
#pragma omp simd
    for (int64_t j = 0; j < n; ++j) y[j] = store<T>(((load<S, Acc>(src[j]) - mean) - lo) * rstd * w[j]);
  } else if (b) {
#pragma omp simd
    for (int64_t j = 0; j < n; ++j) y[j] = store<T>(((load<S, Acc>(src[j]) - mean) - lo) * rstd + b[j]);
  } else {
#pragma omp simd
    for (int64_t j = 0; j < n; ++j) y[j] = store<T>(((load<S, Acc>(src[j]) - mean) - lo) * rstd);
  }
}

// write_row, each kStage slice written to an L1 stage and streamed out to y (stream_bytes; y as
// can_stream_bytes asks, or the copy is plain): the same values.
template <typename T, typename S, typename Acc>
NORMKIT_INLINE void write_row_streamed(const S* src, T* y, int64_t n, RowStats<Acc> st, const Acc* w, const Acc* b) {
  alignas(64) T stage[kStage];
  for (int64_t j0 = 0; j0 < n; j0 += kStage) {
    const int64_t len = std::min(kStage, n - j0);
    write_row<T, S, Acc>(src + j0, stage, len, st, w ? w + j0 : nullptr, b ? b + j0 : nullptr);
    stream_bytes(y + j0, stage, len * static_cast<int64_t>(sizeof(T)));
  }
}

// The two row means of the normalized gradient: mean(g) and mean(g * s_hat).
template <typename T, typename Acc>
struct GradMeans {
  Acc g;
  Acc g_shat;
};

// g, the gradient reaching the normalized row through its gain: g = dy w (w not null), as a
// vector of elements j..j+kWidth-1 (vec) and as one element (at). TD is dy's type; the fused
// backward also passes its Acc buffer of g with w = ones.
template <typename TD, typename Acc>
struct GainedGrad {
  const TD* dy;
  const Acc* w;
  NORMKIT_INLINE vec_t<Acc> vec(int64_t j) const {
    vec_t<Acc> w_v;
    std::memcpy(&w_v, w + j, sizeof(w_v));
    return load_vec<TD, Acc>(dy + j) * w_v;
  }
  NORMKIT_INLINE Acc at(int64_t j) const { return load<TD, Acc>(dy[j]) * w[j]; }
};

// g of a call with two outputs y = s_hat w + b, y1 = s_hat w1 + b1: g = dy w + dy1 w1, formed
// in registers (no row buffer).
template <typename TD, typename Acc>
struct GainedGrad2 {
  const TD *dy, *dy1;
  const Acc *w, *w1;
  NORMKIT_INLINE vec_t<Acc> vec(int64_t j) const {
    vec_t<Acc> w_v, w1_v;
    std::memcpy(&w_v, w + j, sizeof(w_v));
    std::memcpy(&w1_v, w1 + j, sizeof(w1_v));
    return load_vec<TD, Acc>(dy + j) * w_v + load_vec<TD, Acc>(dy1 + j) * w1_v;
  }
  NORMKIT_INLINE Acc at(int64_t j) const { return load<TD, Acc>(dy[j]) * w[j] + load<TD, Acc>(dy1[j]) * w1[j]; }
};

// The means of g (a GainedGrad or GainedGrad2) over a row with statistics st.
template <typename T, typename Acc, typename G>
NORMKIT_INLINE GradMeans<T, Acc> grad_means(const T* s, const G& grad, int64_t n, RowStats<Acc> st) {
  double sum_g = 0.0, sum_gx = 0.0;
  const Acc mean = st.mean, rstd = st.rstd, lo = st.lo;
  for (int64_t j0 = 0; j0 < n; j0 += kBlock) {
    const T* sp = s + j0;
    block_sums<Acc>(
        std::min(kBlock, n - j0),
        [&](int64_t j, vec_t<Acc>& sg, vec_t<Acc>& sgx) {
          vec_t<Acc> g = grad.vec(j0 + j);
          sg += g;
          sgx += g * (((load_vec<T, Acc>(sp + j) - mean) - lo) * rstd);
        },
        [&](int64_t j, Acc& sg, Acc& sgx) {
          Acc g = grad.at(j0 + j);
          sg += g;
          sgx += g * (((load<T, Acc>(sp[j]) - mean) - lo) * rstd);
        },
        sum_g, sum_gx);
  }
  return {static_cast<Acc>(sum_g) / static_cast<Acc>(n), static_cast<Acc>(sum_gx) / static_cast<Acc>(n)};
}

// grad_means for a layer-norm row whose mean is known only as hi (backward): the lo part is
// the mean of s - hi, summed in the same pass, and sum(g * s_hat) is corrected for it after
// the pass: sum(g (s - hi - lo)) = sum(g (s - hi)) - lo sum(g). Returns the means and sets lo.
template <typename T, typename Acc, typename G>
NORMKIT_INLINE GradMeans<T, Acc> grad_means_centred(const T* s, const G& grad, int64_t n, Acc hi, Acc rstd, Acc& lo) {
  double sum_g = 0.0, sum_gd = 0.0, sum_d = 0.0;
  for (int64_t j0 = 0; j0 < n; j0 += kBlock) {
    const T* sp = s + j0;
    block_sums3<Acc>(
        std::min(kBlock, n - j0),
        [&](int64_t j, vec_t<Acc>& sg, vec_t<Acc>& sgd, vec_t<Acc>& sd) {
          const vec_t<Acc> g = grad.vec(j0 + j);
          const vec_t<Acc> d = load_vec<T, Acc>(sp + j) - hi;
          sg += g;
          sgd += g * d;
          sd += d;
        },
        [&](int64_t j, Acc& sg, Acc& sgd, Acc& sd) {
          const Acc g = grad.at(j0 + j);
          const Acc d = load<T, Acc>(sp[j]) - hi;
          sg += g;
          sgd += g * d;
          sd += d;
        },
        sum_g, sum_gd, sum_d);
  }
  const double lo_d = sum_d / static_cast<double>(n);
  lo = static_cast<Acc>(lo_d);
  const double m_gx = (sum_gd - lo_d * sum_g) * static_cast<double>(rstd) / static_cast<double>(n);
  return {static_cast<Acc>(sum_g) / static_cast<Acc>(n), static_cast<Acc>(m_gx)};
}

}  // namespace normkit
