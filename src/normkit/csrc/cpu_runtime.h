// How the compiled CPU kernels get threads, buffers and parameters: shared by norm_cpu.cpp and
// norm_dim_cpu.cpp (the row math they share is in row_math.h).
#pragma once

#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#if defined(__linux__)
#include <sys/mman.h>  // madvise(MADV_HUGEPAGE): Linux only, and advice only
#endif

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <fstream>
#include <initializer_list>
#include <limits>
#include <string>
#include <vector>

#include "isa.h"

namespace normkit {

// Calls of at most this many elements run in the calling thread: waking the pool costs more.
constexpr int64_t kSerialMaxElements = 1 << 15;

// The work split of the row kernels (norm_cpu.cpp, fused_cpu.cpp): chunks of whole rows, their
// size a function of the shape only, so per-chunk partial sums are thread-count independent.
constexpr int64_t kMaxChunks = 64;
constexpr int64_t kMinChunkRows = 8;
constexpr int64_t kMinChunkElements = 1 << 14;

inline int64_t rows_per_chunk(int64_t rows, int64_t n) {
  int64_t per = std::max({(rows + kMaxChunks - 1) / kMaxChunks, kMinChunkRows, (kMinChunkElements + std::max<int64_t>(n, 1) - 1) / std::max<int64_t>(n, 1)});
  return std::max<int64_t>(std::min(per, rows), 1);
}

inline bool is_serial(int64_t rows, int64_t n) { return rows == 1 || rows * n <= kSerialMaxElements; }

// f(chunk) for chunks 0..n_chunks-1, handed out one at a time to torch's threads (a core busy
// with another process then delays one chunk, not half the work). Which chunk computes what
// depends on the caller's shape-only split, never on the thread count.
template <typename F>
void for_each_chunk(int64_t n_chunks, bool serial, const F& f) {
  const int64_t threads = at::get_num_threads();
  if (serial || n_chunks == 1 || threads == 1 || at::in_parallel_region()) {
    for (int64_t c = 0; c < n_chunks; ++c) f(c);
    return;
  }
  std::atomic<int64_t> next{0};
  at::parallel_for(0, std::min(threads, n_chunks), 1, [&](int64_t, int64_t) {
    for (int64_t c = next.fetch_add(1); c < n_chunks; c = next.fetch_add(1)) f(c);
  });
}

// --- scratch rows clear of 4K aliasing ------------------------------------------------------
//
// On x86 cores a load that follows a store still in flight whose address agrees with its own in
// the low 12 bits (the offset in a 4 KiB page) waits for that store, though the two addresses
// differ ("4K aliasing"). The row loops store and load their Acc scratch rows (a row formed as
// x + residual, then read back to write y) column by column beside the call's tensors, so a
// scratch row that starts a line or two before a tensor in its page pays on every vector: layer
// norm + residual with prenorm, 4096 x 2048 float32, 1 thread, ran 2.1-2.8x slower with its rows
// 0-128 bytes before x, r, y and s in their pages than elsewhere (Zen 3). Left to the heap, that
// offset was a lottery per process; ScratchRows places each row instead.
constexpr int64_t kPageBytes = 4096;
constexpr int64_t kLineBytes = 64;

// A tensor a row loop reads or writes beside its scratch rows: its first row's address, and its
// row stride in bytes (0: a parameter row, the same for every row).
struct RowStream {
  const void* first;
  int64_t row_bytes;
};

// The RowStream of a (rows, n) tensor of elem_bytes elements at base, for the chunk that starts at
// row lo; none (null) for a null base.
inline RowStream first_row(const void* base, int64_t lo, int64_t n, int64_t elem_bytes) {
  return {base ? static_cast<const char*>(base) + lo * n * elem_bytes : nullptr, n * elem_bytes};
}

// The page offset, a multiple of kLineBytes, farthest (circularly, in bytes) from every offset in
// `taken` (each in [0, kPageBytes)); 0 when taken is empty.
inline int64_t clear_page_offset(std::vector<int64_t> taken) {
  if (taken.empty()) return 0;
  std::sort(taken.begin(), taken.end());
  int64_t best_gap = -1, best = 0;
  for (size_t k = 0; k < taken.size(); ++k) {
    const int64_t from = taken[k];
    const int64_t gap = (k + 1 < taken.size() ? taken[k + 1] : taken[0] + kPageBytes) - from;
    if (gap > best_gap) best_gap = gap, best = from + gap / 2;
  }
  return (best / kLineBytes * kLineBytes) % kPageBytes;
}

// Chunks of fewer elements (rows x n) take their scratch rows one after another, unplaced: the
// placement (a larger block, the offsets sorted) cost 1-2 us a call, 2.6x the time of a 1 x 768
// layer norm + residual (Zen 3), where aliasing can cost only a few rows.
constexpr int64_t kPlaceMinElements = int64_t(1) << 16;

// For benchmarks (benchmarks/bench_page_offsets.py --shift scratch): at a value >= 0, a placed
// chunk's scratch rows start `offset` bytes after its first stream's offset in the page (rounded
// down to a line) instead of where ScratchRows would put them; -1, the default: their placement.
inline std::atomic<int64_t>& scratch_offset_override() {
  static std::atomic<int64_t> offset{-1};
  return offset;
}

// `count` scratch rows of n Acc elements for a chunk of chunk_rows rows. From kPlaceMinElements
// elements a chunk on, the rows are whole pages apart, so all start at one page offset: the line
// farthest from the streams' offsets (their first four rows: a row stride that is no multiple of
// 4 KiB moves a stream's offset from row to row). Smaller chunks take their rows one after
// another wherever the heap puts them. Zeroed.
//
// Rows at one offset, not each at its own: a loop that forms the next row in one scratch row
// while it normalizes the other stores and loads both a column apart, and with its store queue
// full (three store streams: layer norm + residual with prenorm) a load waits for a store to the
// other row a few hundred bytes back in the page. Placed each "farthest from the streams and the
// rows before", the two rows of one process landed 640 bytes apart and ran prenorm 10-20 %
// slower than one row offset at almost any line of the page (4096 x 2048 float32, 1 thread,
// Zen 3; results/page-offsets-2026-12-08-scratch-rows-each-amd-epyc-zen3.json).
template <typename Acc>
class ScratchRows {
 public:
  ScratchRows(int count, int64_t n, int64_t chunk_rows, std::initializer_list<RowStream> streams) : rows_(count) {
    const int64_t row_bytes = (n * static_cast<int64_t>(sizeof(Acc)) + kLineBytes - 1) / kLineBytes * kLineBytes;
    if (chunk_rows * n < kPlaceMinElements) {
      storage_.assign(static_cast<size_t>(count * row_bytes + kLineBytes), 0);
      const uintptr_t first = at_page_offset(reinterpret_cast<uintptr_t>(storage_.data()), -1);
      for (int k = 0; k < count; ++k) rows_[k] = reinterpret_cast<Acc*>(first + k * row_bytes);
      return;
    }
    const int64_t stride = (row_bytes + kPageBytes - 1) / kPageBytes * kPageBytes;
    storage_.assign(static_cast<size_t>(count * stride + kPageBytes), 0);
    const int64_t forced = scratch_offset_override().load(std::memory_order_relaxed);
    int64_t want;
    if (forced >= 0) {
      const RowStream* s = streams.begin();
      while (s != streams.end() && !s->first) ++s;
      const uintptr_t from = s == streams.end() ? 0 : reinterpret_cast<uintptr_t>(s->first);
      want = static_cast<int64_t>((from + static_cast<uintptr_t>(forced)) % kPageBytes);
    } else {
      std::vector<int64_t> taken;
      taken.reserve(4 * streams.size());
      for (const RowStream& s : streams) {
        if (!s.first) continue;
        for (int64_t k = 0; k < (s.row_bytes ? 4 : 1); ++k)
          taken.push_back(static_cast<int64_t>((reinterpret_cast<uintptr_t>(s.first) + k * s.row_bytes) % kPageBytes));
      }
      want = clear_page_offset(taken);
    }
    const uintptr_t first = at_page_offset(reinterpret_cast<uintptr_t>(storage_.data()), want);
    for (int k = 0; k < count; ++k) rows_[k] = reinterpret_cast<Acc*>(first + k * stride);
  }
  Acc* row(int k) const { return rows_[k]; }

 private:
  // The first address from p on whose page offset is `want` rounded down to a line (-1: the
  // first on a line); at most kPageBytes - 1 bytes on.
  static uintptr_t at_page_offset(uintptr_t p, int64_t want) {
    const uintptr_t line = (p + kLineBytes - 1) & ~uintptr_t(kLineBytes - 1);
    if (want < 0) return line;
    const int64_t to = want / kLineBytes * kLineBytes;
    return line + (to - static_cast<int64_t>(line % kPageBytes) + kPageBytes) % kPageBytes;
  }
  std::vector<char> storage_;
  std::vector<Acc*> rows_;
};

// The overlapped row loop (row_math.h write_row_sums_next) stores y[c], then a vector or two later
// loads the row it normalizes (x's row, or a scratch row) and w, b at c + 8, c + 16: with y a line
// after x in its page every such load waits (4K aliasing; y 64 bytes after x: 1.7-1.8x the time,
// 128 bytes: 1.1-1.2x; layer norm, RMS norm, + residual with prenorm, + weight1; 4096 x 2048
// float32, 1 thread, Zen 3, benchmarks/bench_page_offsets.py). Written in descending column order
// the loads that follow a store are at lower columns, which alias only a stream a line or two
// before the store's. Which offsets tensors have is the allocator's choice (heap tensors are
// 64-byte aligned anywhere in a page), so the loop picks the order per call.
constexpr int64_t kAliasWindowBytes = 256;

// Whether stores to `store` followed, in ascending address order, by loads of `load` alias: the
// store stream 1..kAliasWindowBytes ahead of the load stream in the page.
inline bool aliases_ahead(const void* store, const void* load) {
  const auto d = static_cast<int64_t>((reinterpret_cast<uintptr_t>(store) - reinterpret_cast<uintptr_t>(load)) %
                                      static_cast<uintptr_t>(kPageBytes));
  return d > 0 && d <= kAliasWindowBytes;
}

// Whether the overlapped loop writes its outputs (`stores`, y and y1) in descending column order:
// ascending, a store stream would alias the loads that follow it, those of the write (`loads`:
// the row normalized, when it is the input, and the parameters) or of the next row's read
// (`next_loads`: x, the residual, x1), and descending none of the write's would (the read runs
// ascending, so descending writes cross it once a row). Null pointers are skipped; the streams
// have one element size (else their offsets drift apart along a row).
inline bool writes_descend(std::initializer_list<const void*> stores, std::initializer_list<const void*> loads,
                           std::initializer_list<const void*> next_loads = {}) {
  bool up = false, down = false;
  for (const void* st : stores) {
    if (!st) continue;
    for (const void* ld : loads) {
      if (!ld) continue;
      up = up || aliases_ahead(st, ld);
      down = down || aliases_ahead(ld, st);
    }
    for (const void* ld : next_loads)
      if (ld) up = up || aliases_ahead(st, ld);
  }
  return up && !down;
}

// The last-level cache's size: the largest cache sysfs lists for cpu0, else 32 MiB. Not
// sysconf(_SC_LEVEL3_CACHE_SIZE): glibc derives it from CPUID, which a VM may report wrongly
// (320 MiB on the project's 32 MiB Zen 4 VM).
inline int64_t last_level_cache_bytes() {
  static const int64_t bytes = [] {
    int64_t best = 0;
    for (int index = 0; index < 8; ++index) {
      const std::string path = "/sys/devices/system/cpu/cpu0/cache/index" + std::to_string(index) + "/size";
      std::ifstream f(path);
      int64_t v = 0;
      std::string unit;
      if (!(f >> v)) continue;
      f >> unit;  // "32768K" reads as 32768 then "K"
      if (!unit.empty() && (unit[0] == 'K' || unit[0] == 'k')) v <<= 10;
      if (!unit.empty() && (unit[0] == 'M' || unit[0] == 'm')) v <<= 20;
      best = std::max(best, v);
    }
    return best > 0 ? best : (int64_t(32) << 20);
  }();
  return bytes;
}

// Whether a call whose inputs and outputs together span `bytes` writes its outputs with
// non-temporal stores (they save the read of each output line before its write, and leave the
// cache to the inputs): from half the last-level cache up, which other cores and other tenants
// share. Measured on a Zen 4 VM (32 MiB L3; benchmarks/results/stream-threshold-2026-12-07-amd-epyc.txt):
// layer norm calls of 16-24 MiB ran 1.05-1.37x faster streamed, 1 and 2 threads, allocating or
// into out=; calls of 32 MiB and more stream either way.
inline bool outputs_stream(int64_t bytes) { return bytes >= last_level_cache_bytes() / 2; }

// A fresh output of 4 MiB or more is advised to use transparent huge pages before the first
// write: a fresh 64 MiB tensor otherwise takes 16k page faults (several times the kernel's time).
inline at::Tensor advise_huge_pages(at::Tensor out) {
  const size_t nbytes = out.numel() * out.element_size();
  constexpr size_t kHuge = 1 << 21, kMin = 4 << 20;
#if defined(__linux__) && defined(MADV_HUGEPAGE)
  if (nbytes >= kMin) {
    uintptr_t p = reinterpret_cast<uintptr_t>(out.data_ptr());
    uintptr_t lo = (p + kHuge - 1) & ~(kHuge - 1), hi = (p + nbytes) & ~(kHuge - 1);
    if (hi > lo) madvise(reinterpret_cast<void*>(lo), hi - lo, MADV_HUGEPAGE);  // advice only
  }
#endif
  return out;
}

// A contiguous output like `like` (huge pages advised).
inline at::Tensor empty_output(const at::Tensor& like) {
  return advise_huge_pages(at::empty_like(like, at::MemoryFormat::Contiguous));
}

// The (rows,) statistics of an empty call: what torch's native_layer_norm gives (mean 0, rstd
// NaN when N == 0; nothing to hold when rows == 0). mean may be undefined (RMS norm).
inline void fill_empty_stats(const at::Tensor& mean, const at::Tensor& rstd) {
  if (mean.defined()) mean.zero_();
  rstd.fill_(std::numeric_limits<double>::quiet_NaN());
}

// Whether the option loop may run its wide code (fused_rows.h: 64-byte vectors, compiled for
// AVX-512 / x86-64-v4 only): true where this CPU has it, unless set_wide_vectors(false) turned it
// off (the tests run each call both ways: the 32-byte loop is what an AVX2 machine runs).
inline std::atomic<bool>& wide_vectors_flag() {
#if defined(NORMKIT_WIDE)
  static std::atomic<bool> on{__builtin_cpu_supports("x86-64-v4") != 0};
#else
  static std::atomic<bool> on{false};
#endif
  return on;
}
inline bool wide_vectors() { return wide_vectors_flag().load(std::memory_order_relaxed); }
// Turns the wide code on (where the CPU has it) or off; returns the previous setting.
inline bool set_wide_vectors(bool on) {
#if defined(NORMKIT_WIDE)
  on = on && __builtin_cpu_supports("x86-64-v4");
#else
  on = false;
#endif
  return wide_vectors_flag().exchange(on);
}

// Whether the option loop may round its bfloat16 outputs with AVX-512 BF16's conversion
// (row_math.h store_bf16_cvt): where the CPU has it and the wide code is on (set_wide_vectors
// turns both off: the tests compare each call's bits both ways).
inline bool bf16_vectors() {
#if defined(NORMKIT_WIDE)
  static const bool has = __builtin_cpu_supports("avx512bf16") != 0;
  return has && wide_vectors();
#else
  return false;
#endif
}

// The dtype statistics and accumulations use: double for double input, else float.
inline at::ScalarType acc_type(at::ScalarType t) { return t == at::kDouble ? at::kDouble : at::kFloat; }

// A gain/bias as a contiguous Acc tensor (read as (N,) through its pointer), or an undefined
// tensor for none. A view with the negative / conjugate bit is resolved (a copy): its raw data
// hold the other sign.
inline at::Tensor as_param(const c10::optional<at::Tensor>& p, at::ScalarType acc) {
  if (!p.has_value() || !p->defined()) return at::Tensor();
  if (p->scalar_type() == acc && p->is_contiguous() && !p->is_neg() && !p->is_conj()) return *p;
  at::Tensor t = p->to(acc).contiguous();
  if (t.is_neg()) t = t.resolve_neg();
  return t.is_conj() ? t.resolve_conj() : t;
}

}  // namespace normkit
