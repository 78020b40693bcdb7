// The row passes of the fused kernels (fused_cpu.cpp): the contract of
// normkit.contract, one row at a time, each option a compile-time switch.
//
// Design: a row is a short sequence of passes over an Acc row buffer that stays in L1/L2
// (8 KiB for a float32 row of 2048): the sum passes (x * rowscale * keep / (1 - p) with the
// residual added in the same pass when there is no x1; else + x1 * keep1 / (1 - p), then
// + residual), a rounding pass to the sum dtype S when it is not exact (writing s when stored),
// then one pass that takes the row statistics (row_math.h, the one C++ statistics
// implementation) and writes y and y1 in one loop. Each pass is templated on the one or two
// dtypes it touches and on the flags that change its inner loop, never on the whole
// (T, R, S, O) x flags product: a few dozen small instantiations instead of thousands, and a
// call pays only for the passes its options turn on. The buffer passes cost L1 bandwidth, not
// memory bandwidth: at 2 threads the kernels run near the copy's memory limit, at 1 thread (one
// core streams 35 GB/s on Zen 4) the statistics' two reads of the row and the write pass are
// the bound. The plain call (x [+ residual], nothing else) has a loop of its own (plain_rows
// below): one read of x and r, one write of y (and s).
//
// Dropout: a counter-based hash, so a mask is a pure function of (seed, stream, row, column)
// and needs no state, no storage and no order: any thread computes any element, backward
// regenerates it. keep = fmix32(col_key[j] ^ row_key[i]) >= p * 2^32, where col_key and row_key
// are splitmix64 draws from (seed, stream) (col_key tabulated once per call) and fmix32 is
// murmur3's finalizer: 32-bit multiplies and shifts, which vectorize on every x86-64 clone.
// Distinct columns of a row hash distinct inputs (fmix32 is a bijection), and the XOR of two
// random keys gives rows no shifted-copy structure.
#pragma once

#include <cmath>
#include <cstdint>
#include <cstring>
#include <type_traits>
#include <utility>
#include <vector>

#include "row_math.h"

namespace normkit {
namespace fused {

// --- the dropout stream -----------------------------------------------------------------------

NORMKIT_INLINE uint64_t splitmix64(uint64_t z) {
  z += 0x9E3779B97F4A7C15ull;
  z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
  z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
  return z ^ (z >> 31);
}

NORMKIT_INLINE uint32_t fmix32(uint32_t h) {
  h ^= h >> 16;
  h *= 0x85EBCA6Bu;
  h ^= h >> 13;
  h *= 0xC2B2AE35u;
  h ^= h >> 16;
  return h;
}

// One dropout stream of one call: stream 0 drops x, stream 1 drops x1.
struct DropStream {
  std::vector<uint32_t> col_key;  // (N,)
  uint64_t row_base = 0;
  uint32_t threshold = 0;  // keep where hash >= threshold

  DropStream() = default;
  DropStream(int64_t seed, int stream, int64_t n, double p) {
    const uint64_t base = splitmix64(splitmix64(static_cast<uint64_t>(seed)) ^ static_cast<uint64_t>(stream + 1));
    col_key.resize(static_cast<size_t>(n));
    for (int64_t j = 0; j < n; ++j) col_key[j] = static_cast<uint32_t>(splitmix64(base + static_cast<uint64_t>(j)) >> 32);
    row_base = splitmix64(base ^ 0xD1B54A32D192ED03ull);
    threshold = static_cast<uint32_t>(std::min(4294967295.0, std::floor(p * 4294967296.0 + 0.5)));
  }
  NORMKIT_INLINE uint32_t row_key(int64_t i) const {
    return static_cast<uint32_t>(splitmix64(row_base + static_cast<uint64_t>(i)) >> 32);
  }
};

// Which terms of an option call's sum the option loop drops (a template switch of it): none, x
// alone (the call has no x1), or x and x1.
enum class Dropout { none, x, x_and_x1 };

// What one row's dropout needs (null col_key: no dropout on this term).
template <typename Acc>
struct DropRow {
  const uint32_t* col_key = nullptr;
  uint32_t row_key = 0;
  uint32_t threshold = 0;
  Acc scale = 1;  // 1 / (1 - p), rounded to Acc as torch rounds the Python float
};

// Whether dropout keeps element j of the row (forward and backward draw the same). The loops
// pass a local copy of their DropRow: its fields then stay in registers, where a mask store
// (uint8_t, which may alias anything) would otherwise reload them from memory.
template <typename Acc>
NORMKIT_INLINE bool keep_at(const DropRow<Acc>& d, int64_t j) {
  return fmix32(d.col_key[j] ^ d.row_key) >= d.threshold;
}

// The dropout factor of an element, scale where it is kept, else 0: v * keep_factor(k, scale)
// is the contract's (v * k) * scale bit for bit, with one product instead of two. A kept v gives
// v * scale either way (v * 1 is v); a dropped v gives v * 0 either way (a zero of v's sign, or
// NaN for an infinite or NaN v), since scale = 1 / (1 - p) is positive and finite (p < 1).
template <typename Acc>
NORMKIT_INLINE Acc keep_factor(bool keep, Acc scale) {
  return keep ? scale : Acc(0);
}

// --- sum passes ---------------------------------------------------------------------------------

// The sum passes are compiled without floating-point contraction (and so are their callers in
// fused_cpu.cpp): an FMA would round (v * scale) + buf once where the contract (and the
// reference) round twice, and s would differ from the reference's in the last bit.
#pragma GCC push_options
#pragma GCC optimize("fp-contract=off")

// buf (=, or += when ACCUM) ((Acc(x) * rs) * keep) * scale, keep written to mask when MASK;
// without DROP, buf (=, +=) Acc(x) * rs (rs = 1 is exact).
template <typename T, typename Acc, bool DROP, bool MASK, bool ACCUM>
NORMKIT_INLINE void sum_x_row(const T* x, int64_t n, Acc rs, const DropRow<Acc>& d, uint8_t* mask, Acc* buf) {
  if constexpr (DROP) {
    const DropRow<Acc> dr = d;
#pragma omp simd
    for (int64_t j = 0; j < n; ++j) {
      // a select, not a bool -> float conversion: GCC leaves the latter scalar
      const bool keep = keep_at(dr, j);
      const Acc v = (load<T, Acc>(x[j]) * rs) * keep_factor(keep, dr.scale);
      if constexpr (ACCUM) buf[j] += v; else buf[j] = v;
      if constexpr (MASK) mask[j] = keep ? uint8_t(1) : uint8_t(0);
    }
  } else {
#pragma omp simd
    for (int64_t j = 0; j < n; ++j) {
      const Acc v = load<T, Acc>(x[j]) * rs;
      if constexpr (ACCUM) buf[j] += v; else buf[j] = v;
    }
  }
}

// buf = ((Acc(x) * rs) * keep) * scale + Acc(r) (the x term and the residual, the sum without
// x1, in one pass), s = buf when STORE (S == Acc: rounding to S is exact); masks as sum_x_row.
template <typename T, typename R, typename Acc, bool DROP, bool MASK, bool STORE>
NORMKIT_INLINE void sum_xr_row(const T* x, const R* r, int64_t n, Acc rs, const DropRow<Acc>& d, uint8_t* mask, Acc* s,
                               Acc* buf) {
  const DropRow<Acc> dr = d;
#pragma omp simd
  for (int64_t j = 0; j < n; ++j) {
    Acc v = load<T, Acc>(x[j]) * rs;
    if constexpr (DROP) {
      const bool keep = keep_at(dr, j);
      v = v * keep_factor(keep, dr.scale);
      if constexpr (MASK) mask[j] = keep ? uint8_t(1) : uint8_t(0);
    }
    v = v + load<R, Acc>(r[j]);
    buf[j] = v;
    if constexpr (STORE) s[j] = v;
  }
}

// buf += Acc(r)
template <typename R, typename Acc>
NORMKIT_INLINE void add_row(const R* r, int64_t n, Acc* buf) {
#pragma omp simd
  for (int64_t j = 0; j < n; ++j) buf[j] += load<R, Acc>(r[j]);
}

// out = AccW(round_S(buf)), the sum as stored, read back; s = round_S(buf) when STORE.
template <typename S, typename AccS, typename AccW, bool STORE>
NORMKIT_INLINE void round_row(const AccS* buf, int64_t n, S* s, AccW* out) {
#pragma omp simd
  for (int64_t j = 0; j < n; ++j) {
    const S v = store<S>(buf[j]);
    if constexpr (STORE) s[j] = v;
    out[j] = load<S, AccW>(v);
  }
}

#pragma GCC pop_options

// --- the normalization pass -----------------------------------------------------------------------

template <typename Acc>
struct NormArgs {
  const Acc *w, *b, *w1, *b1;  // each may be null (gain 1, bias 0)
  Acc eps;
  bool is_rms;
  Acc* mean;  // null for RMS norm
  Acc* rstd;  // null when not wanted
  // y and y1 written through an L1 stage with non-temporal stores (row_math.h's stream_bytes;
  // the outputs as can_stream_bytes asks): for calls past cpu_runtime.h's outputs_stream
  bool stream = false;
};

// The next row's inputs, read while this row's output is written: up to three streams (x,
// residual, x1), each `bytes` long per row, asked into L2 a slice at a time as the slices of
// the output are written. (A row is a read phase, then a write phase: one core alone keeps too
// few misses in flight to stream both, and a burst of prefetches at the start of a row fills
// the miss queue and stalls; measured in benchmarks/bench_fused_kernel.py.)
struct NextRow {
  const char* p[3] = {nullptr, nullptr, nullptr};
  int64_t elem_bytes[3] = {0, 0, 0};
};

constexpr int64_t kWriteSlice = kStage;

// y = round_O(s_hat w + b) and y1 = round_O(s_hat w1 + b1) in one loop (both output streams in
// flight together); w, b, w1, b1 all given (the launcher supplies ones / zeros: exact).
template <typename O, typename Src, typename Acc>
NORMKIT_INLINE void write_row_pair(const Src* src, O* y, O* y1, int64_t n, const RowStats<Acc>& st,
                                   const NormArgs<Acc>& a, int64_t j0) {
  const Acc mean = st.mean, rstd = st.rstd, lo = st.lo;
  const Acc *w = a.w + j0, *b = a.b + j0, *w1 = a.w1 + j0, *b1 = a.b1 + j0;
#pragma omp simd
  for (int64_t j = 0; j < n; ++j) {
    const Acc h = ((load<Src, Acc>(src[j]) - mean) - lo) * rstd;
    y[j] = store<O>(h * w[j] + b[j]);
    y1[j] = store<O>(h * w1[j] + b1[j]);
  }
}

// Row i's statistics (row_math.h) and y = round_O(s_hat w + b), y1 = round_O(s_hat w1 + b1)
// (y1 when not null).
template <typename Src, typename O, typename Acc>
NORMKIT_INLINE void norm_row(const Src* src, int64_t n, const NormArgs<Acc>& a, O* y, O* y1, int64_t i,
                             const NextRow& next) {
  const RowStats<Acc> st = row_stats<Src, Acc>(src, n, a.eps, a.is_rms);
  alignas(64) O stage[kWriteSlice], stage1[kWriteSlice];  // a.stream: the slice, then streamed out
  for (int64_t j0 = 0; j0 < n; j0 += kWriteSlice) {
    const int64_t len = std::min(kWriteSlice, n - j0);
    O* yd = a.stream ? stage : y + j0;
    O* y1d = a.stream ? stage1 : (y1 ? y1 + j0 : nullptr);
    if (y1) write_row_pair<O, Src, Acc>(src + j0, yd, y1d, len, st, a, j0);
    else write_row<O, Src, Acc>(src + j0, yd, len, st, a.w ? a.w + j0 : nullptr, a.b ? a.b + j0 : nullptr);
    if (a.stream) {
      stream_bytes(y + j0, stage, len * static_cast<int64_t>(sizeof(O)));
      if (y1) stream_bytes(y1 + j0, stage1, len * static_cast<int64_t>(sizeof(O)));
    }
    for (int k = 0; k < 3; ++k) {
      if (!next.p[k]) continue;
      const char* lo = next.p[k] + j0 * next.elem_bytes[k];
      const char* hi = next.p[k] + (j0 + len) * next.elem_bytes[k];
      for (const char* q = lo; q < hi; q += 64) __builtin_prefetch(q, 0, 2);
    }
  }
  if (a.mean) a.mean[i] = st.mean;
  if (a.rstd) a.rstd[i] = st.rstd;
}

// --- the plain forward: x [+ residual], no other option -------------------------------------------

// The row a plain call with a residual sums: s = round_T(x + r) (the unfused x + r, rounded once
// to the input dtype), formed as it is read (row_math.h's RowRead interface), kept in buf (Acc)
// for the output pass and stored to s when STORE.
template <typename T, typename Acc, bool STORE, bool Stream>
struct SumRead {
  const T *x, *r;
  Acc* buf;
  T* s;
  static constexpr int64_t kElemBytes = sizeof(T);
  NORMKIT_INLINE Acc value(int64_t j) const { return load<T, Acc>(store<T>(load<T, Acc>(x[j]) + load<T, Acc>(r[j]))); }
  template <int B = 32>
  NORMKIT_INLINE vec_t<Acc, B> vec(int64_t j) const {
    const vec_t<Acc, B> v = round_vec<T, Acc, B>(load_vec<T, Acc, B>(x + j) + load_vec<T, Acc, B>(r + j));
    std::memcpy(buf + j, &v, sizeof(v));
    if constexpr (STORE) store_vec<T, Acc, Stream, B>(s + j, v);
    return v;
  }
  NORMKIT_INLINE Acc one(int64_t j) const {
    const Acc v = value(j);
    buf[j] = v;
    if constexpr (STORE) s[j] = store<T>(v);
    return v;
  }
  NORMKIT_INLINE void prefetch(int64_t j) const {
    __builtin_prefetch(x + j, 0, kPrefetchLocality);
    __builtin_prefetch(r + j, 0, kPrefetchLocality);
  }
};

// The one-read row loop: rows lo..hi of a call, row i read as in_of(i, keep) forms it (a
// RowRead of the input, or a reader that forms the sum as it reads and keeps it in `keep`, an
// Acc row, cur or nxt), its statistics from that one read (row_math.h: shifted sums, rarely the
// exact second pass), its output a second read, from src_of(i, keep): with overlap, in the loop
// that forms row i + 1 (write_row_sums_next into out_of(i)), else a pass of its own
// (write(i, src, stats)). cur, nxt: two Acc rows (the row being written and the row being
// formed; ScratchRows places them) when the reader forms one, else null.
template <typename Acc>
struct RowLoop {
  int64_t n;
  Acc eps;
  bool is_rms, overlap;
  Acc *mean, *rstd;  // each may be null (RMS norm; no statistics wanted)
  bool descend;      // the overlapped loop writes in descending column order (cpu_runtime.h writes_descend)
};

//
// B: the overlapped loop's vector bytes (write_row_sums_next): 64 only in AVX-512 code.
template <typename Src, typename Acc, int B = 32, typename InOf, typename SrcOf, typename OutOf, typename Write>
NORMKIT_INLINE void one_read_rows(const RowLoop<Acc>& L, int64_t lo, int64_t hi, Acc* cur, Acc* nxt, const InOf& in_of,
                                  const SrcOf& src_of, const OutOf& out_of, const Write& write) {
  const int64_t n = L.n;
  // (every lambda here always inlined: an out-of-line copy would be baseline code, no clone)
  auto shift_of = [&](const auto& in) NORMKIT_INLINE_LAMBDA { return L.is_rms ? Acc(0) : row_shift<Acc>(in, n); };
  const auto first = in_of(lo, cur);
  ShiftedSums<Acc> sums = row_sums<Acc>(first, n, shift_of(first));
  for (int64_t i = lo; i < hi; ++i) {
    const Src* src = src_of(i, cur);
    const RowStats<Acc> st = finish_stats<Src, Acc>(src, n, sums, L.eps, L.is_rms);
    if (L.mean) L.mean[i] = st.mean;
    if (L.rstd) L.rstd[i] = st.rstd;
    if (i + 1 == hi) {
      write(i, src, st);
      break;
    }
    const auto next = in_of(i + 1, nxt);
    const Acc shift = shift_of(next);
    if (L.overlap) {
      sums = L.descend ? write_row_sums_next<Src, Acc, B, true>(src, out_of(i), next, n, st, shift)
                       : write_row_sums_next<Src, Acc, B, false>(src, out_of(i), next, n, st, shift);
    } else {
      write(i, src, st);
      sums = row_sums<Acc>(next, n, shift);
    }
    std::swap(cur, nxt);
  }
}

// A layer norm overlaps each row's output write with the next row's read (RowLoop::overlap)
// on calls of at least kOverlapMinBytes (the memory-bound regime) and on rows of at most
// kOverlapMaxRowBytes at any size: the loop's streams (this row, the next, w, b,
// y) of such rows stay in L1, where it runs 0.35 cycles per element against 0.42 for a
// statistics pass then an output pass (768 and 1024 wide, data in L2/L3, Zen 4). At 4096 wide
// in cache the two are even, and from L3 right after other work the overlapped loop is slower.
// An RMS norm overlaps only in the memory-bound regime: its statistics pass is cheap enough that
// in cache the separate passes were as fast or faster (1024 wide, 1 thread, measured under
// load), but from DRAM they left it at 1.2-1.4x a copy's time where the overlapped layer norm
// took 0.8-0.9x (4096 x 2048 float32, 1 thread, Zen 3). Never for Half, whose stores the loop
// would write one element at a time (store_vec).
constexpr int64_t kOverlapMinBytes = int64_t(4) << 20;
constexpr int64_t kOverlapMaxRowBytes = int64_t(8) << 10;

// Whether a call of `rows` rows of row_bytes (input dtype) takes the overlapped loop;
// vector_stores: its outputs are stored as vectors (no Half).
inline bool overlap_pays(int64_t rows, int64_t row_bytes, bool is_rms, bool vector_stores) {
  return rows > 1 && vector_stores &&
         (rows * row_bytes >= kOverlapMinBytes || (!is_rms && row_bytes <= kOverlapMaxRowBytes));
}

template <typename T, typename Acc>
struct PlainFwdArgs {
  const T* x;
  const T* r;  // residual or null
  T* s;        // the stored sum or null (only with r)
  T* y;
  const Acc *w, *b;                    // each may be null (gain 1, bias 0)
  const Acc *w_or_ones, *b_or_zeros;   // w / b materialized, for the overlapped loop
  Acc *mean, *rstd;                    // each may be null (RMS norm; no statistics wanted)
  int64_t n;
  Acc eps;
  bool is_rms;
  // overlap: write each row's output in the loop that sums the next (write_row_sums_next);
  // stream: that loop's non-temporal stores and prefetch (the call is past outputs_stream);
  // descend: that loop's writes in descending column order (4K aliasing: writes_descend)
  bool overlap, stream, descend;
};

// Rows lo..hi of a plain call (one_read_rows): x read as it is, or x + r formed as it is read
// (SumRead). cur, nxt: two rows with a residual, else null.
template <typename T, typename Acc, bool Res, bool STORE, bool Stream>
NORMKIT_INLINE void plain_rows_as(const PlainFwdArgs<T, Acc>& a, int64_t lo, int64_t hi, Acc* cur, Acc* nxt) {
  using Src = std::conditional_t<Res, Acc, T>;
  const int64_t n = a.n;
  one_read_rows<Src, Acc>(
      {n, a.eps, a.is_rms, a.overlap, a.mean, a.rstd, a.descend}, lo, hi, cur, nxt,
      [&](int64_t i, Acc* keep) NORMKIT_INLINE_LAMBDA {
        if constexpr (Res)
          return SumRead<T, Acc, STORE, Stream>{a.x + i * n, a.r + i * n, keep, STORE ? a.s + i * n : nullptr};
        else
          return RowRead<T, Acc>{a.x + i * n};
      },
      [&](int64_t i, const Acc* keep) NORMKIT_INLINE_LAMBDA -> const Src* {
        if constexpr (Res) return keep; else return a.x + i * n;
      },
      [&](int64_t i) NORMKIT_INLINE_LAMBDA { return RowWrite<T, Acc, Stream>{a.y + i * n, a.w_or_ones, a.b_or_zeros}; },
      [&](int64_t i, const Src* src, const RowStats<Acc>& st) NORMKIT_INLINE_LAMBDA {
        if constexpr (Stream) write_row_streamed<T, Src, Acc>(src, a.y + i * n, n, st, a.w, a.b);
        else write_row<T, Src, Acc>(src, a.y + i * n, n, st, a.w, a.b);
      });
  if constexpr (Stream) stream_fence();
}

// plain_rows_as for the call's case. (No streaming for Half, whose stores are not vectors: can_stream.)
template <typename T, typename Acc>
NORMKIT_INLINE void plain_rows(const PlainFwdArgs<T, Acc>& a, int64_t lo, int64_t hi, Acc* cur, Acc* nxt) {
  constexpr bool kStream = !std::is_same_v<T, c10::Half>;
  if (a.stream && kStream) {
    if (!a.r) plain_rows_as<T, Acc, false, false, kStream>(a, lo, hi, cur, nxt);
    else if (a.s) plain_rows_as<T, Acc, true, true, kStream>(a, lo, hi, cur, nxt);
    else plain_rows_as<T, Acc, true, false, kStream>(a, lo, hi, cur, nxt);
  } else {
    if (!a.r) plain_rows_as<T, Acc, false, false, false>(a, lo, hi, cur, nxt);
    else if (a.s) plain_rows_as<T, Acc, true, true, false>(a, lo, hi, cur, nxt);
    else plain_rows_as<T, Acc, true, false, false>(a, lo, hi, cur, nxt);
  }
}

// --- the option forward: every option in the one-read loop -----------------------------------------

// The keep test of kWidth<float, B> elements from j (keep_at on each lane): all-ones lanes where
// dropout keeps the element.
template <int B = 32>
NORMKIT_INLINE i32v<B> keep_vec(const DropRow<float>& d, int64_t j) {
  u32v<B> h;
  std::memcpy(&h, d.col_key + j, sizeof(h));
  h ^= d.row_key;
  h ^= h >> 16;
  h *= 0x85EBCA6Bu;
  h ^= h >> 13;
  h *= 0xC2B2AE35u;
  h ^= h >> 16;
  const u32v<B> threshold = u32v<B>{} + d.threshold;
  return h >= threshold;
}

// keep_factor of each lane: scale where keep, else 0.0f (the bits of scale, masked).
template <int B = 32>
NORMKIT_INLINE vec_t<float, B> kept_scale(i32v<B> keep, float scale) {
  int32_t scale_bits;
  std::memcpy(&scale_bits, &scale, sizeof(scale_bits));
  const i32v<B> bits = keep & scale_bits;
  vec_t<float, B> out;
  std::memcpy(&out, &bits, sizeof(out));
  return out;
}

// The keep mask of kWidth<float, B> lanes stored as bytes 1 (kept) / 0. For 32-byte vectors the
// low byte of each lane is gathered by two shuffles (vpshufb within each 16-byte half, vpermd
// of the halves' first four bytes): __builtin_convertvector compiles to eight extracts and a
// chain of scalar shifts there, whose eight general registers the loop then spills its
// pointers for, even on calls that store no mask.
template <int B = 32>
NORMKIT_INLINE void store_mask_vec(uint8_t* m, i32v<B> keep) {
  u32v<B> one;
  std::memcpy(&one, &keep, sizeof(one));
  one >>= 31;  // 1 where kept (keep's lanes are all ones or zero): no constant to hold
  if constexpr (B == 32) {
    using u8x32 = typename VecOf<uint8_t, 32>::type;
    u8x32 b;
    std::memcpy(&b, &one, sizeof(b));
    const u8x32 packed = __builtin_shufflevector(b, b, 0, 4, 8, 12, 0, 4, 8, 12, 0, 4, 8, 12, 0, 4, 8, 12, 16, 20, 24,
                                                 28, 16, 20, 24, 28, 16, 20, 24, 28, 16, 20, 24, 28);
    u32x8 d;
    std::memcpy(&d, &packed, sizeof(d));
    const auto low = __builtin_shufflevector(d, d, 0, 4);
    std::memcpy(m, &low, sizeof(low));
  } else {
    const auto bytes = __builtin_convertvector(one, typename VecOf<uint8_t, B / 4>::type);
    std::memcpy(m, &bytes, sizeof(bytes));
  }
}

// The sum of an option call, formed as it is read (row_math.h's RowRead interface), in the
// contract's order with each product and sum rounded as written (the loops that use it are
// compiled without floating-point contraction, as the sum passes above):
//   t = ((Acc(x) rho) k) / (1 - p) [+ (Acc(x1) k1) / (1 - p)] [+ Acc(r)],  s = round_S(t),
// kept in buf as Acc(s), stored to s and the keep masks to mask / mask1 when they are not null.
// The options are run-time fields (a test per vector, the same for every vector of the call),
// except the two that cost most in the loop: D (the keep hash and its tests) and Stream
// (non-temporal stores and the prefetch), template switches. With dropout, whether there is an
// x1 is a template switch too (D): a run-time x1 would hold its hash's three constants (row key,
// threshold, scale) in vector registers for the whole loop, and the 16 of AVX2 then spill.
template <typename T, typename R, typename S, Dropout D, bool Stream>
struct OptRead {
  using Acc = float;
  static constexpr bool Drop = D != Dropout::none;
  const T *x, *x1;          // x1 may be null
  const R* r;               // may be null
  S* s;                     // may be null
  Acc* buf;
  uint8_t *mask, *mask1;    // may be null
  DropRow<Acc> d, d1;       // read only when Drop (d1: with x1)
  Acc rs;                   // the row's rowscale, 1 without (exact)
  static constexpr int64_t kElemBytes = sizeof(T);

  // whether the sum has an x1 term (a constant under dropout)
  NORMKIT_INLINE bool has_x1() const {
    if constexpr (D == Dropout::none) return x1 != nullptr;
    else return D == Dropout::x_and_x1;
  }

  NORMKIT_INLINE Acc form(int64_t j, bool& keep, bool& keep1) const {
    Acc v = load<T, Acc>(x[j]) * rs;
    if constexpr (Drop) {
      keep = keep_at(d, j);
      v = v * keep_factor(keep, d.scale);
    }
    if (has_x1()) {
      Acc v1 = load<T, Acc>(x1[j]);
      if constexpr (Drop) {
        keep1 = keep_at(d1, j);
        v1 = v1 * keep_factor(keep1, d1.scale);
      }
      v = v + v1;
    }
    if (r) v = v + load<R, Acc>(r[j]);
    return v;
  }
  NORMKIT_INLINE Acc value(int64_t j) const {
    bool keep, keep1;
    return load<S, Acc>(store<S>(form(j, keep, keep1)));
  }
  NORMKIT_INLINE Acc one(int64_t j) const {
    bool keep = true, keep1 = true;
    const S v = store<S>(form(j, keep, keep1));
    if (mask) mask[j] = keep ? uint8_t(1) : uint8_t(0);
    if (mask1) mask1[j] = keep1 ? uint8_t(1) : uint8_t(0);
    if (s) s[j] = v;
    return buf[j] = load<S, Acc>(v);
  }
  template <int B = 32>
  NORMKIT_INLINE vec_t<Acc, B> vec(int64_t j) const {
    vec_t<Acc, B> v = load_vec<T, Acc, B>(x + j) * rs;
    if constexpr (Drop) {
      const i32v<B> keep = keep_vec<B>(d, j);
      v = v * kept_scale<B>(keep, d.scale);
      if (mask) store_mask_vec<B>(mask + j, keep);
    }
    if (has_x1()) {
      vec_t<Acc, B> v1 = load_vec<T, Acc, B>(x1 + j);
      if constexpr (Drop) {
        const i32v<B> keep1 = keep_vec<B>(d1, j);
        v1 = v1 * kept_scale<B>(keep1, d1.scale);
        if (mask1) store_mask_vec<B>(mask1 + j, keep1);
      }
      v = v + v1;
    }
    if (r) v = v + load_vec<R, Acc, B>(r + j);
    v = round_vec<S, Acc, B>(v);
    std::memcpy(buf + j, &v, sizeof(v));
    if (s) store_vec<S, Acc, Stream, B>(s + j, v);
    return v;
  }
  NORMKIT_INLINE void prefetch(int64_t j) const {
    __builtin_prefetch(x + j, 0, kPrefetchLocality);
    if (has_x1()) __builtin_prefetch(x1 + j, 0, kPrefetchLocality);
    if (r) {
      __builtin_prefetch(r + j, 0, kPrefetchLocality);
      // a residual wider than x: two of its lines per line of x
      if constexpr (sizeof(R) > sizeof(T)) __builtin_prefetch(r + j + 64 / sizeof(R), 0, kPrefetchLocality);
    }
  }
};

// y = h w + b and, when y1 is not null, y1 = h w1 + b1 of each normalized element h, stored as O
// (float32, or bfloat16 rounded in vector operations: store_vec) (write_row_sums_next's output;
// w, b, w1, b1 not null); Stream as RowWrite's.
//
// Cvt: bfloat16 rounded by store_bf16_cvt (the same bits; code compiled for avx512bf16 only).
template <typename O, bool Stream, bool Cvt = false>
struct OptWrite {
  using Acc = float;
  static constexpr bool stream = Stream;
  O *y, *y1;
  const Acc *w, *b, *w1, *b1;
  template <int B = 32>
  NORMKIT_INLINE void vec(int64_t j, vec_t<Acc, B> h) const {
    vec_t<Acc, B> wv, bv;
    std::memcpy(&wv, w + j, sizeof(wv));
    std::memcpy(&bv, b + j, sizeof(bv));
    put<B>(y + j, h * wv + bv);
    if (y1) {
      std::memcpy(&wv, w1 + j, sizeof(wv));
      std::memcpy(&bv, b1 + j, sizeof(bv));
      put<B>(y1 + j, h * wv + bv);
    }
  }
  template <int B>
  NORMKIT_INLINE void put(O* p, vec_t<Acc, B> v) const {
#if defined(NORMKIT_WIDE)
    if constexpr (Cvt) {
      static_assert(B == 32);
      return store_bf16_cvt<Stream>(p, v);
    }
#endif
    store_vec<O, Acc, Stream, B>(p, v);
  }
  NORMKIT_INLINE void one(int64_t j, Acc h) const {
    y[j] = store<O>(h * w[j] + b[j]);
    if (y1) y1[j] = store<O>(h * w1[j] + b1[j]);
  }
  // the whole row, in a pass of its own: a chunk's last row, with no next row to overlap
  // (write_row's `omp simd` loops)
  template <typename Src>
  NORMKIT_INLINE void row(const Src* src, int64_t n, const RowStats<Acc>& st) const {
    write_row<O, Src, Acc>(src, y, n, st, w, b);
    if (y1) write_row<O, Src, Acc>(src, y1, n, st, w1, b1);
  }
};

// A layer-norm call of the option loop (rows that overlap: fused_options_cpu.cpp's
// option_rows): x (T), the sum formed with a residual R and stored as S (Formed: else x is
// normalized as it is), y and y1 O (float32 or bfloat16); Acc float.
template <typename T, typename R, typename S, typename O>
struct OptFwdArgs {
  const T *x, *x1;
  const R* r;
  S* s;
  O *y, *y1;
  const float *w, *b, *w1, *b1;  // materialized: ones / zeros where the call has none
  const float* rowscale;         // (M,) or null
  uint8_t *mask, *mask1;
  const DropStream *d0, *d1;     // null without dropout (d1: without x1)
  float scale;                   // 1 / (1 - p)
  float *mean, *rstd;
  int64_t n;
  float eps;
  bool descend;  // the loop's writes in descending column order (4K aliasing: writes_descend)
};

// Rows lo..hi of an option call (one_read_rows, each row's output written in the loop that forms
// the next). cur, nxt: two rows when Formed, else null. D: dropout (Formed; a.d0 not null, and a.x1
// and a.d1 not null just when D is x_and_x1); Stream: the outputs are written with non-temporal
// stores (the call is past outputs_stream).
//
// B: the loop's vector bytes, 64 only in AVX-512 code (write_row_sums_next).
template <typename T, typename R, typename S, typename O, bool Formed, Dropout D, bool Stream, int B = 32,
          bool Cvt = false>
NORMKIT_INLINE void opt_rows(const OptFwdArgs<T, R, S, O>& a, int64_t lo, int64_t hi, float* cur, float* nxt) {
  using Acc = float;
  using Src = std::conditional_t<Formed, Acc, T>;
  const int64_t n = a.n;
  auto drop_row = [&](const DropStream* ds, int64_t i) NORMKIT_INLINE_LAMBDA {
    DropRow<Acc> d;
    if (ds) d = {ds->col_key.data(), ds->row_key(i), ds->threshold, a.scale};
    return d;
  };
  auto out_of = [&](int64_t i) NORMKIT_INLINE_LAMBDA {
    return OptWrite<O, Stream, Cvt>{a.y + i * n, a.y1 ? a.y1 + i * n : nullptr, a.w, a.b, a.w1, a.b1};
  };
  one_read_rows<Src, Acc, B>(
      {n, a.eps, /*is_rms=*/false, /*overlap=*/true, a.mean, a.rstd, a.descend}, lo, hi, cur, nxt,
      [&](int64_t i, Acc* keep) NORMKIT_INLINE_LAMBDA {
        if constexpr (Formed) {
          const int64_t off = i * n;
          return OptRead<T, R, S, D, Stream>{a.x + off, a.x1 ? a.x1 + off : nullptr, a.r ? a.r + off : nullptr,
                                  a.s ? a.s + off : nullptr, keep, a.mask ? a.mask + off : nullptr,
                                  a.mask1 ? a.mask1 + off : nullptr, drop_row(a.d0, i),
                                  D == Dropout::x_and_x1 ? drop_row(a.d1, i) : DropRow<Acc>{},
                                  a.rowscale ? a.rowscale[i] : Acc(1)};
        } else {
          return RowRead<T, Acc>{a.x + i * n};
        }
      },
      [&](int64_t i, const Acc* keep) NORMKIT_INLINE_LAMBDA -> const Src* {
        if constexpr (Formed) return keep; else return a.x + i * n;
      },
      out_of, [&](int64_t i, const Src* src, const RowStats<Acc>& st) NORMKIT_INLINE_LAMBDA { out_of(i).row(src, n, st); });
  if constexpr (Stream) stream_fence();
}

// --- backward passes ------------------------------------------------------------------------------

// g (=, or += when ACCUM) Acc(dy) * w
template <typename O, typename Acc, bool ACCUM>
NORMKIT_INLINE void grad_g_row(const O* dy, int64_t n, const Acc* w, Acc* g) {
#pragma omp simd
  for (int64_t j = 0; j < n; ++j) {
    const Acc v = load<O, Acc>(dy[j]) * w[j];
    if constexpr (ACCUM) g[j] += v; else g[j] = v;
  }
}

// The one pass of a backward row after its two means (row_math.h's grad_means for RMS norm,
// grad_means_centred for layer norm), reading s and dy once more:
//   ds = (dy w - s_hat c_gx - c_g) rstd + dsum,  out = round_Out(ds) (out2 too when TWO),
//   dw += dy s_hat (NW), db += dy (NB)  (one chunk's partial sums, rows in order).
// Out is the dtype of dx (and dresidual) in the plain case, or Acc for the ds buffer the option
// passes read. This expression, in this order, is the eager node's backward of old: the plain
// fused call and the native one give the same bits (tests/test_fused_kernel_cpu.py). The sum
// with dsum stays in the expression when there is none (+ 0: what the old loop compiled to, and
// it decides the sign of a zero ds).
template <typename S, typename O, typename Out, typename Acc, bool DSUM, bool NW, bool NB, bool TWO>
NORMKIT_INLINE void grad_row(const S* s, const O* dy, const S* dsum, int64_t n, const Acc* w, const RowStats<Acc>& st,
                             Acc c_g, Acc c_gx, Out* out, Out* out2, Acc* dw, Acc* db) {
  const Acc mu = st.mean, mu_lo = st.lo, rs = st.rstd;
#pragma omp simd
  for (int64_t j = 0; j < n; ++j) {
    const Acc xh = ((load<S, Acc>(s[j]) - mu) - mu_lo) * rs;
    const Acc d = load<O, Acc>(dy[j]);
    Acc extra;
    if constexpr (DSUM) extra = load<S, Acc>(dsum[j]); else extra = Acc(0);
    // (rounded per store: a bfloat16 local would keep GCC from vectorizing the loop)
    const Acc v = (d * w[j] - xh * c_gx - c_g) * rs + extra;
    out[j] = store<Out>(v);
    if constexpr (TWO) out2[j] = store<Out>(v);
    if constexpr (NW) dw[j] += d * xh;
    if constexpr (NB) db[j] += d;
  }
}

// ds = (g - s_hat * c_gx - c_g) * rstd, s_hat kept in shat when SHAT (for dW / dW1).
template <typename S, typename Acc, bool SHAT>
NORMKIT_INLINE void grad_ds_row(const S* s, const Acc* g, int64_t n, const RowStats<Acc>& st, Acc c_g, Acc c_gx, Acc* ds,
                                Acc* shat) {
  const Acc mu = st.mean, lo = st.lo, rs = st.rstd;
#pragma omp simd
  for (int64_t j = 0; j < n; ++j) {
    const Acc xh = ((load<S, Acc>(s[j]) - mu) - lo) * rs;
    ds[j] = (g[j] - xh * c_gx - c_g) * rs;
    if constexpr (SHAT) shat[j] = xh;
  }
}

// out = round_T(((ds * rs) * keep) * scale) (the dx of x, rs = 1 for x1), or round_T(ds)
// without DROP and rs = 1.
template <typename T, typename Acc, bool DROP>
NORMKIT_INLINE void grad_out_row(const Acc* ds, int64_t n, Acc rs, const DropRow<Acc>& d, T* out) {
  if constexpr (DROP) {
    const DropRow<Acc> dr = d;
#pragma omp simd
    for (int64_t j = 0; j < n; ++j) {
      const bool keep = keep_at(dr, j);
      out[j] = store<T>((ds[j] * rs) * keep_factor(keep, dr.scale));
    }
  } else {
#pragma omp simd
    for (int64_t j = 0; j < n; ++j) out[j] = store<T>(ds[j] * rs);
  }
}

// dw += dy * s_hat (NW), db += dy (NB): one chunk's partial sums, rows in order.
template <typename O, typename Acc, bool NW, bool NB>
NORMKIT_INLINE void grad_param_row(const O* dy, const Acc* shat, int64_t n, Acc* dw, Acc* db) {
#pragma omp simd
  for (int64_t j = 0; j < n; ++j) {
    const Acc d = load<O, Acc>(dy[j]);
    if constexpr (NW) dw[j] += d * shat[j];
    if constexpr (NB) db[j] += d;
  }
}

}  // namespace fused
}  // namespace normkit
