// Row statistics, normalization and the normalized gradient for one contiguous row: the C++
// counterparts of normkit.reference.statistics / normalize / normalized_gradient, shared by the
// norm kernels (norm_cpu.cpp) and the LN-LSTM/GRU steps (rnn_cpu.cpp).
//
// Semantics (normkit.reference): the statistics are computed in Acc (float, or double for
// double input) by the corrected two-pass algorithm (Chan, Golub & LeVeque 1983): the mean,
// then the sum of squared deviations and of the deviations themselves, which refines the mean
// (exact for a constant row) and keeps the variance exact at large means. Sums run in blocks
// of kBlock elements summed in Acc (vectorized: `omp simd reduction` lets the compiler keep
// one partial sum per vector lane), the blocks added in double.
#pragma once

#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <type_traits>

// Everything here is inlined into the kernels that use it: they are compiled once per
// instruction set (target_clones), and a call out of a clone would run baseline code.
#define NORMKIT_INLINE inline __attribute__((always_inline))

// The kernels' hot functions, compiled once per instruction set (AVX-512, AVX2, baseline x86-64);
// the dynamic loader picks the clone this CPU runs, so one build runs on every x86-64 machine.
// (-DNORMKIT_NO_CLONES, the sanitizer build: one baseline copy, a third of the compile time.)
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__) && !defined(NORMKIT_NO_CLONES)
#define NORMKIT_CLONES __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#else
#define NORMKIT_CLONES
#endif

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
template <typename Acc>
struct Vec;
template <>
struct Vec<float> {
  typedef float type __attribute__((vector_size(32)));
};
template <>
struct Vec<double> {
  typedef double type __attribute__((vector_size(32)));
};
template <typename Acc>
using vec_t = typename Vec<Acc>::type;
template <typename Acc>
constexpr int kWidth = 32 / sizeof(Acc);

// kWidth elements from p as a vector of Acc.
template <typename T, typename Acc>
NORMKIT_INLINE vec_t<Acc> load_vec(const T* p) {
  vec_t<Acc> v;
  if constexpr (std::is_same_v<T, Acc>) {
    std::memcpy(&v, p, sizeof(v));
  } else if constexpr (std::is_same_v<T, c10::BFloat16> && std::is_same_v<Acc, float>) {  // (a bf16 dy of a float64 call: the loop below)
    typedef uint16_t u16x8 __attribute__((vector_size(16)));
    typedef uint32_t u32x8 __attribute__((vector_size(32)));
    u16x8 h;
    std::memcpy(&h, p, sizeof(h));
    u32x8 bits = __builtin_convertvector(h, u32x8) << 16;
    std::memcpy(&v, &bits, sizeof(v));
  } else {
    for (int k = 0; k < kWidth<Acc>; ++k) v[k] = load<T, Acc>(p[k]);
  }
  return v;
}

template <typename Acc>
NORMKIT_INLINE Acc hsum(vec_t<Acc> a) {
  Acc out = 0;
  for (int k = 0; k < kWidth<Acc>; ++k) out += a[k];
  return out;
}

// The sums over one block of len elements of f0 and f1, each given (vector, scalar) forms:
// f0v(j) -> vec_t over elements j..j+kWidth-1, f0s(j) -> Acc for the tail.
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
  for (; j + W <= len; j += W) fv(j, a0, a1);
  Acc t0 = 0, t1 = 0;
  for (; j < len; ++j) fs(j, t0, t1);
  out0 += static_cast<double>(hsum<Acc>((a0 + b0) + (c0 + d0)) + t0);
  out1 += static_cast<double>(hsum<Acc>((a1 + b1) + (c1 + d1)) + t1);
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

// row_sum(next, n) (the same sums in the same order, so the same bits) while writing this
// row's output y[j] = (src[j] - mean) * rstd * w[j] + b[j] (w, b not null) in the same loop: the
// read of the next row from memory and the write of this row's output overlap, as in a copy,
// instead of a read-only pass followed by a write-only pass.
template <typename Acc>
struct RowStats;

template <typename T, typename Acc>
NORMKIT_INLINE Acc write_row_sum_next(const T* src, T* y, const T* next, int64_t n, const RowStats<Acc>& st,
                                      const Acc* w, const Acc* b);

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

// (mean, 1/sqrt(var + eps)) of a row; for RMS norm the mean is 0 and var = mean(s^2).
template <typename T, typename Acc>
NORMKIT_INLINE RowStats<Acc> row_stats_from_mean(const T* src, int64_t n, Acc mean, Acc eps, bool is_rms);

template <typename T, typename Acc>
NORMKIT_INLINE RowStats<Acc> row_stats(const T* src, int64_t n, Acc eps, bool is_rms) {
  return row_stats_from_mean<T, Acc>(src, n, is_rms ? Acc(0) : row_sum<T, Acc>(src, n) / static_cast<Acc>(n), eps, is_rms);
}

// The second pass of row_stats, from the first pass's mean (0 for RMS norm).
template <typename T, typename Acc>
NORMKIT_INLINE RowStats<Acc> row_stats_from_mean(const T* src, int64_t n, Acc mean, Acc eps, bool is_rms) {
  double ss = 0.0, sd = 0.0;
  for (int64_t j0 = 0; j0 < n; j0 += kBlock) {
    const T* p = src + j0;
    block_sums<Acc>(
        std::min(kBlock, n - j0),
        [&](int64_t j, vec_t<Acc>& s2, vec_t<Acc>& s1) {
          vec_t<Acc> d = load_vec<T, Acc>(p + j) - mean;
          s2 += d * d;
          s1 += d;
        },
        [&](int64_t j, Acc& s2, Acc& s1) {
          Acc d = load<T, Acc>(p[j]) - mean;
          s2 += d * d;
          s1 += d;
        },
        ss, sd);
  }
  double var = ss / static_cast<double>(n);
  Acc lo = 0;
  if (!is_rms) {
    double c = sd / static_cast<double>(n);
    const double refined = static_cast<double>(mean) + c;
    mean = static_cast<Acc>(refined);
    lo = static_cast<Acc>(refined - static_cast<double>(mean));
    var = std::max(var - c * c, 0.0);
  }
  return {mean, Acc(1) / std::sqrt(static_cast<Acc>(var) + eps), lo};
}

template <typename T, typename Acc>
NORMKIT_INLINE Acc write_row_sum_next(const T* src, T* y, const T* next, int64_t n, const RowStats<Acc>& st,
                                      const Acc* w, const Acc* b) {
  constexpr int W = kWidth<Acc>;
  const Acc mean = st.mean, rstd = st.rstd, lo = st.lo;
  double total = 0.0, unused = 0.0;
  for (int64_t j0 = 0; j0 < n; j0 += kBlock) {
    const T* p = next + j0;
    const T* s = src + j0;
    T* yo = y + j0;
    const Acc* wp = w + j0;
    const Acc* bp = b + j0;
    block_sums<Acc>(
        std::min(kBlock, n - j0),
        [&](int64_t j, vec_t<Acc>& s0, vec_t<Acc>&) {
          s0 += load_vec<T, Acc>(p + j);
          vec_t<Acc> wv, bv;
          std::memcpy(&wv, wp + j, sizeof(wv));
          std::memcpy(&bv, bp + j, sizeof(bv));
          const vec_t<Acc> v = ((load_vec<T, Acc>(s + j) - mean) - lo) * rstd * wv + bv;
          for (int k = 0; k < W; ++k) yo[j + k] = store<T>(v[k]);
        },
        [&](int64_t j, Acc& s0, Acc&) {
          s0 += load<T, Acc>(p[j]);
          yo[j] = store<T>(((load<T, Acc>(s[j]) - mean) - lo) * rstd * wp[j] + bp[j]);
        },
        total, unused);
  }
  return static_cast<Acc>(total);
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

// The two row means of the normalized gradient: mean(g) and mean(g * s_hat), g = dy * w (w not null).
template <typename T, typename Acc>
struct GradMeans {
  Acc g;
  Acc g_shat;
};

// (TD: dy's type, T by default; the fused backward passes its Acc buffer of g with w = ones.)
template <typename T, typename Acc, typename TD = T>
NORMKIT_INLINE GradMeans<T, Acc> grad_means(const T* s, const TD* dy, int64_t n, RowStats<Acc> st, const Acc* w) {
  double sum_g = 0.0, sum_gx = 0.0;
  const Acc mean = st.mean, rstd = st.rstd, lo = st.lo;
  for (int64_t j0 = 0; j0 < n; j0 += kBlock) {
    const T* sp = s + j0;
    const TD* dp = dy + j0;
    const Acc* wp = w + j0;
    block_sums<Acc>(
        std::min(kBlock, n - j0),
        [&](int64_t j, vec_t<Acc>& sg, vec_t<Acc>& sgx) {
          vec_t<Acc> w_v;
          std::memcpy(&w_v, wp + j, sizeof(w_v));
          vec_t<Acc> g = load_vec<TD, Acc>(dp + j) * w_v;
          sg += g;
          sgx += g * (((load_vec<T, Acc>(sp + j) - mean) - lo) * rstd);
        },
        [&](int64_t j, Acc& sg, Acc& sgx) {
          Acc g = load<TD, Acc>(dp[j]) * wp[j];
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
template <typename T, typename Acc, typename TD = T>
NORMKIT_INLINE GradMeans<T, Acc> grad_means_centred(const T* s, const TD* dy, int64_t n, Acc hi, Acc rstd, const Acc* w,
                                                    Acc& lo) {
  double sum_g = 0.0, sum_gd = 0.0, sum_d = 0.0;
  for (int64_t j0 = 0; j0 < n; j0 += kBlock) {
    const T* sp = s + j0;
    const TD* dp = dy + j0;
    const Acc* wp = w + j0;
    block_sums3<Acc>(
        std::min(kBlock, n - j0),
        [&](int64_t j, vec_t<Acc>& sg, vec_t<Acc>& sgd, vec_t<Acc>& sd) {
          vec_t<Acc> w_v;
          std::memcpy(&w_v, wp + j, sizeof(w_v));
          const vec_t<Acc> g = load_vec<TD, Acc>(dp + j) * w_v;
          const vec_t<Acc> d = load_vec<T, Acc>(sp + j) - hi;
          sg += g;
          sgd += g * d;
          sd += d;
        },
        [&](int64_t j, Acc& sg, Acc& sgd, Acc& sd) {
          const Acc g = load<TD, Acc>(dp[j]) * wp[j];
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
