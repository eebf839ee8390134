// Runtime of the CPU kernels, shared by every CPU capability and compiled once
// (csrc/cpu/runtime.cpp): tuning knobs, the phase timer, the scratch pool and its buffers,
// and the cache that carries a forward's state to the backward of the same call.
//
// Nothing here depends on the instruction set: the per-capability kernels
// (csrc/cpu/*_kernel_<capability>.cpp) call it, and it never calls them.
#pragma once

#include <ATen/ATen.h>

#include <algorithm>
#include <chrono>
#include <cstdint>
#include <cstring>
#include <ctime>
#include <limits>
#include <map>
#include <memory>
#include <mutex>
#include <utility>
#include <vector>

#include "../contract.h"

namespace adaptau {
namespace cpu {

// The positive integer in the environment variable `name`, else fallback.
int64_t env_int(const char* name, int64_t fallback);

struct Tuning {
  int64_t chunk_bytes;         // normalized item rows (or item-gradient accumulator) per chunk
  int64_t sort_rows;           // per-row mode: rows per sort block
  int64_t max_groups;          // upper bound on G (partial buffers merged in a fixed order)
  int64_t partial_bytes;       // memory cap for the G partial buffers
  int64_t row_block;           // GEMM modes: rows per block
  int64_t col_block;           // GEMM modes: candidates per block
  int64_t max_pairs;           // per-row: (row, negative) pairs per row block (8 M: the state kept
                               // for the backward, ~12 bytes per pair, stays near 100 MiB)
  int64_t saved_scores_bytes;  // GEMM modes: the forward keeps its [B, M] scores up to this size
};

// The knobs, read once from ADAPTAU_CPU_* environment variables (defaults in runtime.cpp).
const Tuning& tuning();

// ADAPTAU_CPU_PROFILE=1 prints the time of each phase to stderr.
class PhaseTimer {
 public:
  PhaseTimer();
  void mark(const char* what);

 private:
  bool on_;
  std::chrono::steady_clock::time_point t_;
  std::clock_t c_;
};

// Scratch memory. Large blocks are kept in a small process-wide pool between calls:
// fresh multi-megabyte allocations are page-faulted (and zeroed by the kernel) on first
// touch, which cost more than the kernels themselves at the paper's sizes. The pool
// holds at most kPoolCap bytes of idle blocks; ADAPTAU_CPU_POOL=0 disables it.
class Pool {
 public:
  static Pool& get();
  // A block of at least `bytes` (64-byte aligned; whole transparent huge pages from
  // kHugeMin bytes on); got = its size, to be passed back to release().
  void* acquire(size_t bytes, size_t& got);
  void release(void* p, size_t bytes);

 private:
  Pool();
  static constexpr size_t kMinPooled = size_t(1) << 16;
  static constexpr size_t kHugeMin = size_t(1) << 19;
  static constexpr size_t kHuge = size_t(1) << 21;
  static constexpr size_t kPoolCap = size_t(256) << 20;
  bool enabled_ = true;
  std::mutex mu_;
  std::multimap<size_t, void*> free_;
  size_t idle_ = 0;
};

// An uninitialized array of n T from the pool, returned to it on destruction.
template <typename T>
class Buf {
 public:
  Buf() = default;
  explicit Buf(int64_t n) {
    size_t got = 0;
    p_ = static_cast<T*>(Pool::get().acquire(sizeof(T) * static_cast<size_t>(std::max<int64_t>(n, 1)), got));
    bytes_ = got;
  }
  Buf(Buf&& o) noexcept : p_(o.p_), bytes_(o.bytes_) { o.p_ = nullptr; }
  Buf& operator=(Buf&& o) noexcept {
    if (this != &o) {
      Pool::get().release(p_, bytes_);
      p_ = o.p_;
      bytes_ = o.bytes_;
      o.p_ = nullptr;
    }
    return *this;
  }
  Buf(const Buf&) = delete;
  Buf& operator=(const Buf&) = delete;
  ~Buf() { Pool::get().release(p_, bytes_); }
  T* get() const { return p_; }
  T& operator[](int64_t i) const { return p_[i]; }

 private:
  T* p_ = nullptr;
  size_t bytes_ = 0;
};

template <typename T>
Buf<T> make_buf(int64_t n) {
  return Buf<T>(n);
}

template <typename T>
Buf<T> make_zero_buf(int64_t n) {
  Buf<T> b = make_buf<T>(n);
  std::memset(b.get(), 0, sizeof(T) * std::max<int64_t>(n, 1));
  return b;
}

// A [rows, cols] tensor whose memory comes from the pool (and goes back to it when the
// tensor dies): the item gradient is as big as the table, and a fresh allocation of it
// is page-faulted and zeroed by the OS on every call.
at::Tensor pooled_empty(int64_t rows, int64_t cols, const at::TensorOptions& opts);

// Grain size for at::parallel_for: items that together do at least ~kMinWork units of
// work (multiply-adds, roughly). Small problems then run inline on the calling thread:
// an OpenMP region costs microseconds on an idle machine and milliseconds when the
// cores are shared with other busy processes.
constexpr int64_t kMinWork = int64_t(1) << 20;
inline int64_t grain(int64_t work_per_item) {
  return std::max<int64_t>(1, kMinWork / std::max<int64_t>(1, work_per_item));
}

template <typename T>
constexpr T neg_inf() {
  return -std::numeric_limits<T>::infinity();
}

template <typename T>
constexpr T norm_eps() {
  return T(kNormEps);
}

// Identity of every input of a call: the saved state is reused only by the backward of the
// call that made it (same tensors, same version counters, same options, same CPU
// capability: the state's layout depends on the vector width).
struct SavedKey {
  std::vector<std::pair<const void*, int64_t>> ids;
  std::vector<int64_t> opts;
  bool valid = true;
  bool operator==(const SavedKey& o) const { return valid && o.valid && ids == o.ids && opts == o.opts; }
};

// What a forward keeps for the backward of the same call (per-row: Saved, about 8 bytes
// per pair; GEMM modes: SavedTiles, 4 or 8 bytes per score), type-erased: the key holds
// the options and the capability, which fix the type. At most two are kept;
// ADAPTAU_CPU_PLAN_CACHE=0 disables it. An entry is taken (removed) by the backward
// whose key matches; a new entry evicts the oldest of the two.
class SavedCache {
 public:
  static SavedCache& get();
  // Whether put() would keep an entry under this key (so a forward can skip building what
  // would be dropped).
  bool accepts(const SavedKey& key) const { return enabled_ && key.valid; }
  void put(const SavedKey& key, std::shared_ptr<void> value);
  std::shared_ptr<void> take(const SavedKey& key);

 private:
  SavedCache();
  bool enabled_;
  std::mutex mu_;
  std::vector<std::pair<SavedKey, std::shared_ptr<void>>> entries_;
};

}  // namespace cpu
}  // namespace adaptau
