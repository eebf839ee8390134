// adaptau fused sampled-softmax loss: the CPU backend (forward and backward).
//
// Implements torch.ops.adaptau.fused_forward / fused_backward for CPU tensors with the
// contract written in adaptau/ops.py. Nothing of size [B, M, D] is ever built.
//
// Per-row negatives (neg_mode 0); details above per_row_forward.
//   sort     each block of 64 rows' pairs is counting-sorted by (item chunk, row); a chunk
//            is a power-of-two range of table rows whose normalized copy fits in L2
//            (ADAPTAU_CPU_CHUNK_BYTES, 256 KiB), so gathers hit L2 and one thread owns a
//            chunk.
//   forward  G groups of chunks in parallel: normalize each referenced table row once;
//            for every row's run in the chunk, ŝ = <û, r̂> with the user vector in
//            registers, and a flash-style running state per (group, row): max m, Σe^{l-m},
//            Σe^{l-m}·ŝ and Σe^{l-m}·r̂. Rows merge their G states in group order → lse.
//   backward the state gives the user gradient and dβ directly; one more pass over the
//            pairs, from the scores the forward stored, adds d·û to the chunk's item-
//            gradient accumulator (owned by its thread: no atomics, no [N, D] copies).
//            The forward's sort, scores and states are kept for the backward of the same
//            call (SavedCache, keyed on every input's data pointer and version counter);
//            without them the backward recomputes them.
// Shared (neg_mode 1) and in-batch (neg_mode 2) negatives: every row sees the same
// candidates, so scores are blocked matrix products (register-tiled micro-kernel over
// packed candidate panels) with a running max. The forward keeps the [B, M] scores for the
// backward of the same call when they fit ADAPTAU_CPU_SAVED_SCORES_BYTES (32 MiB; else the
// backward recomputes each tile); the backward accumulates candidate gradients per group
// of row blocks, merged in group order.
//
// Numerics: accumulation in float32 for float16/bfloat16/float32 inputs (the first two
// are upcast on entry and their gradients cast back) and float64 for float64; running-max
// log-sum-exp. Determinism: G and every other partition depend on the problem only, never
// on the thread count, and every sum has a fixed order, so results are bitwise identical
// run to run and across thread counts (tests/test_cpu_backend.py checks 1, 2, 3 threads).
// The grouped passes use at most G = ADAPTAU_CPU_GROUPS (8) threads. Scratch comes from a
// process-wide pool; blocks of 512 KiB and more are transparent huge pages.
// ADAPTAU_CPU_PROFILE=1 prints per-phase times to stderr.
//
// Cost at the paper's shape (B=2048, M=1024, D=64, AVX2): ~98 instructions per pair for
// forward+backward inside this library under callgrind, at ~2 per cycle, so instruction
// count is what matters: the per-run micro-kernels are forced inline, the inner loops keep
// the row stride a compile-time constant and the sort stores each pair's row offset in the
// chunk buffer (an addressing mode of the loads, no index arithmetic), lanes are
// broadcast by immediate (no control registers to spill), the scatter's loads stay in
// their own register, the sort runs on unsigned indices unrolled by 4 with a vectorized
// range check (which raises Python's IndexError; ops.py leaves the indices to this
// backend), and in the common case (normalized, no logq, no hit removal, |β| small
// enough for the fixed reference) a run's exps and sums are one loop with masked tails and
// no running max, and the backward reuses the forward's exps. See benchmarks/README.md.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <map>
#include <mutex>
#include <string>
#include <memory>
#include <tuple>
#include <vector>

#include <sys/mman.h>

#include "contract.h"
#include "cpu_simd.h"

#include <chrono>
#include <cstdio>
#include <ctime>

namespace adaptau {
namespace cpu {
namespace {

// ------------------------------------------------------------------------------ tuning
int64_t env_int(const char* name, int64_t fallback) {
  const char* s = std::getenv(name);
  if (s == nullptr || *s == '\0') return fallback;
  char* end = nullptr;
  long long v = std::strtoll(s, &end, 10);
  return (end != s && v > 0) ? static_cast<int64_t>(v) : fallback;
}

struct Tuning {
  int64_t chunk_bytes;      // normalized item rows (or item-gradient accumulator) per chunk
  int64_t sort_rows;        // per-row mode: rows per sort block
  int64_t max_groups;       // upper bound on G (partial buffers merged in a fixed order)
  int64_t partial_bytes;    // memory cap for the G partial buffers
  int64_t row_block;        // GEMM modes: rows per block
  int64_t col_block;        // GEMM modes: candidates per block
  int64_t max_pairs;        // per-row: (row, negative) pairs per row block (8 M: the state kept
                            // for the backward, ~12 bytes per pair, stays near 100 MiB)
  int64_t saved_scores_bytes;  // GEMM modes: the forward keeps its [B, M] scores up to this size
};

const Tuning& tuning() {
  static const Tuning t{
      env_int("ADAPTAU_CPU_CHUNK_BYTES", 256 << 10),
      env_int("ADAPTAU_CPU_SORT_ROWS", 64),
      env_int("ADAPTAU_CPU_GROUPS", 8),
      env_int("ADAPTAU_CPU_PARTIAL_BYTES", 32 << 20),
      env_int("ADAPTAU_CPU_ROW_BLOCK", 64),
      env_int("ADAPTAU_CPU_COL_BLOCK", 256),
      env_int("ADAPTAU_CPU_MAX_PAIRS", int64_t(1) << 23),
      env_int("ADAPTAU_CPU_SAVED_SCORES_BYTES", int64_t(32) << 20),
  };
  return t;
}

// ADAPTAU_CPU_PROFILE=1 prints the time of each phase to stderr.
struct PhaseTimer {
  bool on;
  std::chrono::steady_clock::time_point t;
  std::clock_t c;
  PhaseTimer()
      : on(env_int("ADAPTAU_CPU_PROFILE", 0) > 0), t(std::chrono::steady_clock::now()), c(std::clock()) {}
  void mark(const char* what) {
    if (!on) return;
    auto now = std::chrono::steady_clock::now();
    std::clock_t cn = std::clock();
    std::fprintf(stderr, "[adaptau cpu] %-16s wall %8.3f ms  cpu %8.3f ms\n", what,
                 std::chrono::duration<double, std::milli>(now - t).count(),
                 1000.0 * double(cn - c) / CLOCKS_PER_SEC);
    t = now;
    c = cn;
  }
};

// Scratch memory. Large blocks are kept in a small process-wide pool between calls:
// fresh multi-megabyte allocations are page-faulted (and zeroed by the kernel) on first
// touch, which cost more than the kernels themselves at the paper's sizes. The pool
// holds at most kPoolCap bytes of idle blocks; ADAPTAU_CPU_POOL=0 disables it.
class Pool {
 public:
  static Pool& get() {
    static Pool* pool = new Pool();  // never destroyed (may be used at exit)
    return *pool;
  }
  void* acquire(size_t bytes, size_t& got) {
    // Blocks of at least kHugeMin bytes are whole 2 MiB transparent huge pages: the
    // per-row passes touch every row's slots, 4·M bytes apart, and with 4 KiB pages each
    // run would cost a TLB miss.
    const bool huge = bytes >= kHugeMin;
    const size_t size = huge ? (bytes + kHuge - 1) / kHuge * kHuge : round_up64(bytes);
    if (enabled_ && size >= kMinPooled) {
      std::lock_guard<std::mutex> lock(mu_);
      auto it = free_.lower_bound(size);
      if (it != free_.end() && it->first <= 2 * size) {
        got = it->first;
        void* p = it->second;
        idle_ -= got;
        free_.erase(it);
        return p;
      }
    }
    got = size;
    void* p = std::aligned_alloc(huge ? kHuge : 64, size);
    TORCH_CHECK(p != nullptr, "adaptau cpu: out of memory allocating ", bytes, " bytes of scratch");
#ifdef MADV_HUGEPAGE
    if (huge) madvise(p, size, MADV_HUGEPAGE);
#endif
    return p;
  }
  void release(void* p, size_t bytes) {
    if (p == nullptr) return;
    if (enabled_ && bytes >= kMinPooled) {
      std::lock_guard<std::mutex> lock(mu_);
      if (idle_ + bytes <= kPoolCap) {
        free_.emplace(bytes, p);
        idle_ += bytes;
        return;
      }
    }
    std::free(p);
  }

 private:
  Pool() {
    const char* e = std::getenv("ADAPTAU_CPU_POOL");
    enabled_ = !(e != nullptr && std::string(e) == "0");
  }
  static size_t round_up64(size_t b) { return (std::max<size_t>(b, 1) + 63) / 64 * 64; }
  static constexpr size_t kMinPooled = size_t(1) << 16;
  static constexpr size_t kHugeMin = size_t(1) << 19;
  static constexpr size_t kHuge = size_t(1) << 21;
  static constexpr size_t kPoolCap = size_t(256) << 20;
  bool enabled_ = true;
  std::mutex mu_;
  std::multimap<size_t, void*> free_;
  size_t idle_ = 0;
};

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
at::Tensor pooled_empty(int64_t rows, int64_t cols, const at::TensorOptions& opts) {
  const size_t bytes = static_cast<size_t>(std::max<int64_t>(rows * cols, 1)) * opts.dtype().itemsize();
  size_t got = 0;
  void* p = Pool::get().acquire(bytes, got);
  return at::from_blob(p, {rows, cols}, [got](void* q) { Pool::get().release(q, got); }, opts);
}

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

// --------------------------------------------------------------------- small vector ops
// Row helpers. kD > 0 states that the row length D (n) is the compile-time constant kD:
// same arithmetic in the same order, but the loops unroll completely. The per-row passes
// over whole tables (chunk normalization, the item rows' Jacobian) call them once per
// row, where a loop of 8 vectors otherwise costs as much in loop control as in work.
template <int64_t kD>
constexpr int64_t row_len(int64_t n) {
  return kD > 0 ? kD : n;
}

// <a, b> over n unpadded elements, fixed association order.
template <int64_t kD = 0, typename T>
inline T dot_plain(const T* a, const T* b, int64_t n) {
  using V = Vec<T>;
  constexpr int W = V::W;
  n = row_len<kD>(n);
  typename V::R acc = V::zero();
  int64_t i = 0;
  for (; i + W <= n; i += W) acc = V::fma(V::load(a + i), V::load(b + i), acc);
  T s = V::hsum(acc);
  for (; i < n; ++i) s += a[i] * b[i];
  return s;
}

// out[0:D] = x[0:D] * scale, out[D:Dp] = 0.
template <int64_t kD = 0, typename T>
inline void scale_pad(T* out, const T* x, T scale, int64_t D, int64_t Dp) {
  D = row_len<kD>(D);
  for (int64_t i = 0; i < D; ++i) out[i] = x[i] * scale;
  for (int64_t i = D; i < Dp; ++i) out[i] = T(0);
}

// Writes the normalized (or copied) row into out (padded) and returns the raw norm.
template <int64_t kD = 0, typename T>
inline T load_row(T* out, const T* x, int64_t D, int64_t Dp, bool normalize) {
  if (!normalize) {
    scale_pad<kD>(out, x, T(1), D, Dp);
    return T(1);
  }
  const T norm = std::sqrt(dot_plain<kD>(x, x, D));
  scale_pad<kD>(out, x, T(1) / std::max(norm, norm_eps<T>()), D, Dp);
  return norm;
}

// Gradient through x -> x / max(||x||, eps): out = (g - xh <xh, g>) / max(norm, eps)
// (norm > eps) or g / eps. xh and g are padded (zeros past D); out has D elements.
template <int64_t kD = 0, typename T>
inline void normalize_backward(T* out, const T* g, const T* xh, T norm, int64_t D, bool normalize) {
  D = row_len<kD>(D);
  if (!normalize) {
    for (int64_t i = 0; i < D; ++i) out[i] = g[i];
    return;
  }
  if (norm > norm_eps<T>()) {
    const T proj = dot_plain<kD>(xh, g, D);
    const T inv = T(1) / norm;
    for (int64_t i = 0; i < D; ++i) out[i] = (g[i] - xh[i] * proj) * inv;
  } else {
    const T inv = T(1) / norm_eps<T>();
    for (int64_t i = 0; i < D; ++i) out[i] = g[i] * inv;
  }
}

// Online log-sum-exp state update with the logits lg[0:n) (lg padded with -inf up to a
// multiple of W). (m, s): running max and sum of exp(logit - m).
template <typename T>
inline void lse_update(const T* lg, int64_t n, T& m, T& s) {
  using V = Vec<T>;
  constexpr int W = V::W;
  typename V::R vm = V::set1(neg_inf<T>());
  for (int64_t k = 0; k < n; k += W) vm = V::max(vm, V::load(lg + k));
  const T mx = V::hmax(vm);
  if (mx == neg_inf<T>()) return;
  if (mx > m) {
    s = (m == neg_inf<T>()) ? T(0) : s * std::exp(m - mx);
    m = mx;
  }
  const typename V::R vmx = V::set1(m);
  typename V::R acc = V::zero();
  for (int64_t k = 0; k < n; k += W) acc = V::add(acc, V::exp(V::sub(V::load(lg + k), vmx)));
  s += V::hsum(acc);
}

template <typename T>
inline T lse_finish(T m, T s) {
  return (m == neg_inf<T>() || !(s > T(0))) ? neg_inf<T>() : m + std::log(s);
}

inline int64_t round_up(int64_t x, int64_t m) { return (x + m - 1) / m * m; }

// --------------------------------------------------------- per-row run micro-kernels
template <typename T, int NV>
struct RunOps {
  using V = Vec<T>;
  using R = typename V::R;
  static constexpr int W = V::W;
  static constexpr int64_t kDp = int64_t(NV) * W;  // the padded row length when NV > 0

  // The row of a chunk buffer at element offset `off` (the plan's pairs carry the offsets of
  // their rows, not item indices: Plan::sorted). Offsets are below 2^31, so as uint32 they
  // widen for free and the row is an addressing mode of each load, scaled by sizeof(T):
  // no shift, no add per pair.
  static ADAPTAU_HOT_INLINE T* row(const T* rows, int32_t off) {
    return const_cast<T*>(rows) + static_cast<uint32_t>(off);
  }

  // out[k] = <u, rows + off[k]>, k < n.
  static ADAPTAU_HOT_INLINE void dots(const T* __restrict__ u, const T* __restrict__ rows,
                          const int32_t* __restrict__ idx, int64_t n,
                          int64_t Dp, T* __restrict__ out) {
    if constexpr (NV > 0) {
      // (pinned: else GCC hoists the NV addresses u + v·W out of the caller's loop over the
      // run's blocks and keeps them on the stack, 3 instructions per vector per run)
      const T* up = pinned(u);
      R uu[NV];
#pragma GCC unroll 16
      for (int v = 0; v < NV; ++v) uu[v] = V::load(up + v * W);
      int64_t k = 0;
      for (; k + 4 <= n; k += 4) {
        const T* r0 = row(rows, idx[k]);
        const T* r1 = row(rows, idx[k + 1]);
        const T* r2 = row(rows, idx[k + 2]);
        const T* r3 = row(rows, idx[k + 3]);
        R a0 = V::mul(uu[0], V::load(r0)), a1 = V::mul(uu[0], V::load(r1));
        R a2 = V::mul(uu[0], V::load(r2)), a3 = V::mul(uu[0], V::load(r3));
        for (int v = 1; v < NV; ++v) {
          a0 = V::fma(uu[v], V::load(r0 + v * W), a0);
          a1 = V::fma(uu[v], V::load(r1 + v * W), a1);
          a2 = V::fma(uu[v], V::load(r2 + v * W), a2);
          a3 = V::fma(uu[v], V::load(r3 + v * W), a3);
        }
        V::hsum4(a0, a1, a2, a3, out + k);
      }
      for (; k < n; ++k) {
        const T* r0 = row(rows, idx[k]);
        R a0 = V::mul(uu[0], V::load(r0));
        for (int v = 1; v < NV; ++v) a0 = V::fma(uu[v], V::load(r0 + v * W), a0);
        out[k] = V::hsum(a0);
      }
    } else {
      const int64_t nv = Dp / W;
      for (int64_t k = 0; k < n; ++k) {
        const T* r0 = row(rows, idx[k]);
        R a0 = V::mul(V::load(u), V::load(r0));
        for (int64_t v = 1; v < nv; ++v) a0 = V::fma(V::load(u + v * W), V::load(r0 + v * W), a0);
        out[k] = V::hsum(a0);
      }
    }
  }

  // v = (fresh ? 0 : v * keep) + sum_k coef[k] * (rows + off[k])   (k < n; v padded to Dp).
  // The coefficients were just stored as vectors: they are loaded W at a time and spread
  // lane by lane in registers (V::lane), not re-loaded one float at a time (which stalls on
  // store-to-load forwarding). The old v is folded in at the end, off the FMA chains.
  static ADAPTAU_HOT_INLINE void gather_axpy(T* __restrict__ v, bool fresh, T keep, const T* __restrict__ coef,
                                 const T* __restrict__ rows, const int32_t* __restrict__ idx,
                                 int64_t n, int64_t Dp) {
    if constexpr (NV > 0 && NV <= 8) {
      R g[NV];
#pragma GCC unroll 16
      for (int j = 0; j < NV; ++j) g[j] = V::zero();
      int64_t k = 0;
      for (; k + W <= n; k += W) {
        const typename V::Halves cw = V::halves(V::load(coef + k));
        static_for<W>([&](auto i) ADAPTAU_HOT_LAMBDA {
          const R c = V::template lane<i>(cw);
          const T* r = row(rows, idx[k + i]);
          for (int j = 0; j < NV; ++j) g[j] = V::fma(c, V::load(r + j * W), g[j]);
        });
      }
      for (; k < n; ++k) {
        const R c = V::set1(coef[k]);
        const T* r = row(rows, idx[k]);
        for (int j = 0; j < NV; ++j) g[j] = V::fma(c, V::load(r + j * W), g[j]);
      }
      const R kv = V::set1(keep);
#pragma GCC unroll 16
      for (int j = 0; j < NV; ++j) V::store(v + j * W, fresh ? g[j] : V::fma(kv, V::load(v + j * W), g[j]));
    } else {
      const int64_t nv = Dp / W;
      const R kv = V::set1(keep);
      for (int64_t i = 0; i < nv; ++i) V::store(v + i * W, fresh ? V::zero() : V::mul(kv, V::load(v + i * W)));
      for (int64_t k = 0; k < n; ++k) {
        const R c = V::set1(coef[k]);
        const T* r = row(rows, idx[k]);
        for (int64_t i = 0; i < nv; ++i) V::store(v + i * W, V::fma(c, V::load(r + i * W), V::load(v + i * W)));
      }
    }
  }

  // (acc + off[k])[0:Dp] += coef[k] * (scale * u)   (k < n; rows of acc padded to Dp).
  static ADAPTAU_HOT_INLINE void scatter_axpy(T* __restrict__ acc, const int32_t* __restrict__ idx,
                                  const T* __restrict__ coef, const T* __restrict__ u, T scale,
                                  int64_t n, int64_t Dp) {
    if constexpr (NV > 0 && NV <= 8) {
      R uu[NV];
      const R vs = V::set1(scale);
      for (int v_ = 0; v_ < NV; ++v_) uu[v_] = V::mul(vs, V::load(u + v_ * W));
      int64_t k = 0;
      for (; k + W <= n; k += W) {  // coefficients spread from a register (see gather_axpy)
        const typename V::Halves cw = V::halves(V::load(coef + k));
        static_for<W>([&](auto i) ADAPTAU_HOT_LAMBDA {
          const R c = V::template lane<i>(cw);
          T* a = pinned(row(acc, idx[k + i]));
          // load, FMA into the loaded register, store: 3 instructions per vector and one
          // temporary. (Left to itself the compiler folds the load into the FMA, which then
          // overwrites a copy of c per vector, and with uu and c live it spills.)
          for (int v_ = 0; v_ < NV; ++v_)
            V::store(a + v_ * W, V::fma(c, uu[v_], V::in_register(V::load(a + v_ * W))));
        });
      }
      for (; k < n; ++k) {
        const R c = V::set1(coef[k]);
        T* a = pinned(row(acc, idx[k]));
        for (int v_ = 0; v_ < NV; ++v_)
          V::store(a + v_ * W, V::fma(c, uu[v_], V::in_register(V::load(a + v_ * W))));
      }
    } else {
      const int64_t nv = Dp / W;
      const R vs = V::set1(scale);
      for (int64_t k = 0; k < n; ++k) {
        const R c = V::set1(coef[k]);
        T* a = row(acc, idx[k]);
        for (int64_t i = 0; i < nv; ++i)
          V::store(a + i * W, V::fma(c, V::mul(vs, V::load(u + i * W)), V::load(a + i * W)));
      }
    }
  }
};

// -------------------------------------------------------------------- GEMM micro-kernel
// One register tile of tile_gemm (below): MR output rows i..i+MR-1 (A rows clamped to
// ni-1: the extra rows are computed and not stored) × 2 vectors of columns [d, d + 2W)
// (TWO; else one vector).
template <typename T, int MR, bool TWO>
ADAPTAU_HOT_INLINE void tile_gemm_block(T* __restrict__ out, int64_t ldo, const T* __restrict__ A,
                                        int64_t lda, int64_t sa, const T* __restrict__ X, int64_t ldx,
                                        int64_t i, int64_t ni, int64_t nj, int64_t d, bool accumulate) {
  using V = Vec<T>;
  using R = typename V::R;
  constexpr int W = V::W;
  const T* a[MR];
#pragma GCC unroll 8
  for (int r = 0; r < MR; ++r) a[r] = A + std::min<int64_t>(i + r, ni - 1) * lda;
  R c0[MR], c1[MR];
#pragma GCC unroll 8
  for (int r = 0; r < MR; ++r) c0[r] = c1[r] = V::zero();
  const T* x = X + d;
  for (int64_t j = 0; j < nj; ++j, x += ldx) {
    const R x0 = V::load(x);
    const R x1 = TWO ? V::load(x + W) : V::zero();
    const int64_t o = j * sa;
#pragma GCC unroll 8
    for (int r = 0; r < MR; ++r) {
      const R av = V::set1(a[r][o]);
      c0[r] = V::fma(av, x0, c0[r]);
      if (TWO) c1[r] = V::fma(av, x1, c1[r]);
    }
  }
#pragma GCC unroll 8
  for (int r = 0; r < MR; ++r) {
    if (i + r >= ni) break;
    T* o = out + (i + r) * ldo + d;
    V::store(o, accumulate ? V::add(V::load(o), c0[r]) : c0[r]);
    if (TWO) V::store(o + W, accumulate ? V::add(V::load(o + W), c1[r]) : c1[r]);
  }
}

// out[i][0:Dp] (+)= sum_{j < nj} A[i*lda + j*sa] * X[j*ldx + 0:Dp]   for i < ni (added to
// out when accumulate, else stored). Register-blocked: 6 outputs × 2 vectors, 12
// accumulators (with the two X vectors and a broadcast, 15 of AVX2's 16 registers), each
// loaded X vector used 6 times; 4 outputs (8 accumulators, too few chains for two FMA
// pipes of 4-cycle latency) ran the GEMM modes' tiles 25-30% slower. Every sum runs over
// j in order (deterministic, and the same sums whatever the blocking). Serves the GEMM
// modes' score tiles (score_tile) and their backward: dU = dS·C (i = row, j = candidate)
// and dC = dSᵀ·U (i = candidate, j = row) straight from the row-major dS tile, with no
// transpose.
template <typename T>
void tile_gemm(T* __restrict__ out, int64_t ldo, const T* __restrict__ A, int64_t lda, int64_t sa,
               const T* __restrict__ X, int64_t ldx, int64_t ni, int64_t nj, int64_t Dp,
               bool accumulate) {
  constexpr int W = Vec<T>::W;
  constexpr int kMR = 6;
  for (int64_t d = 0; d < Dp; d += 2 * W) {
    const bool two = d + 2 * W <= Dp;
    for (int64_t i = 0; i < ni; i += kMR) {
      if (two)
        tile_gemm_block<T, kMR, true>(out, ldo, A, lda, sa, X, ldx, i, ni, nj, d, accumulate);
      else
        tile_gemm_block<T, kMR, false>(out, ldo, A, lda, sa, X, ldx, i, ni, nj, d, accumulate);
    }
  }
}

// S[r*lds + c] = sum_d U[r*ldu + d] * C[c][d] for r < nr, c < nc (nc multiple of 2W), with
// the candidates packed in panels of 2W columns: C[c][d] = CT[(c/2W)*D*2W + d*2W + c%2W]
// (contiguous per panel: no cache-set aliasing however many candidates there are).
template <typename T>
void score_tile(const T* __restrict__ U, int64_t ldu, int64_t nr, const T* __restrict__ CT,
                int64_t nc, int64_t D, T* __restrict__ S, int64_t lds) {
  constexpr int W = Vec<T>::W;
  for (int64_t c = 0; c < nc; c += 2 * W)
    tile_gemm(S + c, lds, U, ldu, 1, CT + (c / (2 * W)) * D * 2 * W, 2 * W, nr, D, 2 * W, false);
}

// ------------------------------------------------------------------------- context
// Identity of every input of a call: the saved state is reused only by the backward of the
// call that made it (same tensors, same version counters, same options).
struct SavedKey {
  std::vector<std::pair<const void*, int64_t>> ids;
  std::vector<int64_t> opts;
  bool valid = true;
  bool operator==(const SavedKey& o) const { return valid && o.valid && ids == o.ids && opts == o.opts; }
};

// What every pass needs per row: the positives as int32, the normalized user rows and
// the positive scores. Per-row mode keeps them with the forward's plan (Saved), so the
// backward of the same call does not recompute them.
template <typename T>
struct PreparedRows {
  std::vector<int32_t> pos;  // [B]
  Buf<T> uhat;               // [B][Dp]
  std::vector<T> unorm;      // [B]
  std::vector<T> spos;       // [B]
};

template <typename T>
struct Ctx {
  // shapes and options
  int64_t B = 0, N = 0, D = 0, Dp = 0, M = 0;
  int64_t neg_mode = 0;
  bool include_pos = false, normalize = true, remove_hits = false;
  // inputs (accumulation dtype, contiguous)
  const T* user = nullptr;
  const T* items = nullptr;
  const T* alpha = nullptr;
  const T* beta = nullptr;
  const T* logq = nullptr;  // may be null
  const void* neg = nullptr;
  bool neg_is_int64 = true;
  SavedKey key;  // identity of the call's inputs (the forward's saved state)
  // derived (prepare_rows), owned by `rows`
  std::shared_ptr<const PreparedRows<T>> rows;
  const int32_t* pos = nullptr;  // [B]
  const T* uhat = nullptr;       // [B][Dp] normalized user rows, zero padded
  const T* unorm = nullptr;      // [B]
  const T* spos = nullptr;       // [B] positive scores ŝ(b, pos[b])
};

// Raises the IndexError of Python's range check (adaptau/ops.py, which leaves the indices
// to this backend: the kernel checks them anyway, vectorized, before using any): the first
// index outside [0, N) in row-major order, named `name[i]` (cols == 0) or `name[b, m]`.
[[noreturn]] void throw_index_error(const char* name, const void* data, bool is64, int64_t count,
                                    int64_t cols, int64_t N) {
  for (int64_t k = 0; k < count; ++k) {
    const int64_t v = is64 ? static_cast<const int64_t*>(data)[k] : static_cast<const int32_t*>(data)[k];
    if (v >= 0 && v < N) continue;
    if (cols > 0)
      TORCH_CHECK_INDEX(false, name, "[", k / cols, ", ", k % cols, "] = ", v,
                        " is out of range for an item table with ", N, " rows");
    TORCH_CHECK_INDEX(false, name, "[", k, "] = ", v, " is out of range for an item table with ", N, " rows");
  }
  TORCH_CHECK_INDEX(false, name, ": an index is out of range for an item table with ", N, " rows");
}

std::vector<int32_t> indices_to_i32(const at::Tensor& t, int64_t N, const char* name) {
  const int64_t n = t.numel();
  const bool is64 = t.scalar_type() == at::kLong;
  std::vector<int32_t> out(n);
  bool ok;
  if (is64) {
    ok = indices_below(t.data_ptr<int64_t>(), n, static_cast<uint32_t>(N), out.data());
  } else {
    const int32_t* p = t.data_ptr<int32_t>();
    ok = indices_below(p, n, static_cast<uint32_t>(N));
    std::copy(p, p + n, out.begin());
  }
  if (!ok) throw_index_error(name, t.data_ptr(), is64, n, 0, N);
  return out;
}

// Normalized user rows and positive scores (both modes), or the ones a forward kept.
// (Each row gathers its positive's table row, a likely cache miss: hence the small grain.)
template <typename T>
void prepare_rows(Ctx<T>& cx, const at::Tensor& pos, std::shared_ptr<const PreparedRows<T>> kept) {
  if (kept == nullptr) {
    const int64_t B = cx.B, D = cx.D, Dp = cx.Dp;
    auto pr = std::make_shared<PreparedRows<T>>();
    pr->pos = indices_to_i32(pos, cx.N, "pos");
    pr->uhat = make_buf<T>(B * Dp);
    pr->unorm.assign(B, T(0));
    pr->spos.assign(B, T(0));
    at::parallel_for(0, B, grain(16 * D), [&](int64_t b0, int64_t b1) {
      for (int64_t b = b0; b < b1; ++b) {
        T* uh = pr->uhat.get() + b * Dp;
        pr->unorm[b] = load_row(uh, cx.user + b * D, D, Dp, cx.normalize);
        const T* xp = cx.items + int64_t(pr->pos[b]) * D;
        T s = dot_plain(uh, xp, D);
        if (cx.normalize) s *= T(1) / std::max(std::sqrt(dot_plain(xp, xp, D)), norm_eps<T>());
        pr->spos[b] = s;
      }
    });
    kept = std::move(pr);
  }
  cx.rows = std::move(kept);
  cx.pos = cx.rows->pos.data();
  cx.uhat = cx.rows->uhat.get();
  cx.unorm = cx.rows->unorm.data();
  cx.spos = cx.rows->spos.data();
}

// ======================================================================= per-row mode
// Rows are processed in blocks of at most ADAPTAU_CPU_MAX_PAIRS pairs (all rows at the
// paper's sizes). Per block:
//   sort      each row's M items are counting-sorted by item chunk (a power-of-two range
//             of table rows whose normalized copy fits in L2), inside the row's own slots:
//             the row's pairs of chunk c are sorted[bl*M + off[bl][c] .. off[bl][c+1]).
//   score     G groups of contiguous chunks (about equal pair counts; G from the problem
//             only) run in parallel; the thread owning a chunk normalizes its referenced
//             table rows once into an L2 buffer, then for every row's run in the chunk:
//             ŝ = <û, r̂> (user vector in registers), logits l = β·ŝ - logq, and a
//             flash-style running state per (group, row): max m, Σe^{l-m}, Σe^{l-m}·ŝ and
//             the vector Σe^{l-m}·r̂. The states are merged per row in group order.
//   forward   lse from the merged state and the positive.
//   backward  g·β·e^{m-lse}·Σe^{l-m}r̂ is the user gradient of the negatives and
//             g·e^{m-lse}·Σe^{l-m}ŝ the gradient of β, so only the item gradients need a
//             second pass over the pairs: d = g·β·e^{ŝβ - logq - lse} from the stored ŝ,
//             acc[item] += d·û in the chunk's accumulator, owned by its thread (no atomics,
//             no per-thread [N, D] copies), then the normalization's Jacobian per chunk row.
// The forward keeps its sort, scores and states for the backward of the same call
// (SavedCache); on a miss the backward recomputes them.

// The n indices neg[off, off + n) as int32: neg itself when it is int32, else converted
// into li. ok = every one is inside [0, N); when it is not, nothing may use them. The checks
// are max-reductions (vectorized), not a branch per index.
inline const int32_t* block_items(const void* neg, bool is64, int64_t off, int64_t n, int64_t N,
                                  int32_t* li, bool& ok) {
  if (!is64) {
    const int32_t* p = static_cast<const int32_t*>(neg) + off;
    ok = indices_below(p, n, static_cast<uint32_t>(N));
    return p;
  }
  ok = indices_below(static_cast<const int64_t*>(neg) + off, n, static_cast<uint32_t>(N), li);
  return li;
}

constexpr int64_t kBlock = 256;  // pairs processed at a time

// lse and loss of a row from its negatives' (m, s) and the positive logit.
template <typename T>
inline void finish_row(bool include_pos, T m, T s, T pos_logit, T& lse, T& loss) {
  if (include_pos) {
    if (pos_logit > m) {
      s = (m == neg_inf<T>() ? T(0) : s * std::exp(m - pos_logit)) + T(1);
      m = pos_logit;
    } else {
      s += std::exp(pos_logit - m);
    }
  }
  lse = lse_finish(m, s);
  loss = (lse == neg_inf<T>()) ? T(0) : lse - pos_logit;
}

struct Plan {
  int shift = 4;                // chunk c holds table rows [c << shift, (c + 1) << shift)
  int64_t CI = 16;              // rows of a chunk buffer: 2^shift, or N when one chunk is the table
  int64_t C = 1, r0 = 0, nb = 0, M = 0;
  int64_t RB = 64;              // rows per sort block
  std::vector<int32_t> off;     // [nblocks][C*RB + 1] run starts inside each block's slots
  // [nb*M] the pairs' items, per block of RB rows ordered by (chunk, row, m), each as the
  // element offset of its row in the chunk's buffer, (item - base)·Dp (< 2^31): the gathers
  // address a row straight from it; local_row() gives back item - base.
  Buf<int32_t> sorted;
  int64_t Dp = 0;               // row stride of the chunk buffers
  int row_shift = -1;           // log2(Dp) when Dp is a power of two
  int64_t local_row(int32_t off) const {
    return row_shift >= 0 ? int64_t(uint32_t(off) >> row_shift) : int64_t(uint32_t(off)) / Dp;
  }
  std::vector<int64_t> ctot;    // [C] pairs per chunk
  std::vector<int64_t> gchunk;  // [G+1] chunk ranges of the groups
  int64_t capacity = 0;
  // f(bl, k0, k1) for every row bl (in order) with a non-empty run [k0, k1) in chunk c.
  template <typename F>
  void for_runs(int64_t c, F&& f) const {
    const int64_t E = C * RB + 1;
    for (int64_t j = 0, r0b = 0; r0b < nb; ++j, r0b += RB) {
      const int32_t* o = off.data() + j * E + c * RB;
      const int64_t sb = r0b * M, rows = std::min(RB, nb - r0b);
      for (int64_t r = 0; r < rows; ++r)
        if (o[r] != o[r + 1]) f(r0b + r, sb + o[r], sb + o[r + 1]);
    }
  }
};

// log2 of the rows per chunk: the chunk's rows fit chunk_bytes, unless the run starts
// (about nb per chunk) would outnumber max_entries; never more than one chunk for the
// whole table (with very few negatives per row, nb·(C + 2) <= max_entries cannot hold),
// and never a chunk of 2^31 elements or more (the pairs carry element offsets in int32).
int chunk_shift(int64_t row_bytes, int64_t row_elems, int64_t chunk_bytes, int64_t N, int64_t nb,
                int64_t max_entries) {
  int shift = 4;
  const auto fits = [&](int s) { return (int64_t(1) << s) * row_elems <= (int64_t(1) << 31); };
  while (shift < 30 && (int64_t(2) << shift) * row_bytes <= chunk_bytes && fits(shift + 1)) ++shift;
  while (shift < 31 && ((N - 1) >> shift) > 0 && (((N - 1) >> shift) + 2) * nb > max_entries &&
         fits(shift + 1))
    ++shift;
  return shift;
}

template <typename T>
void build_plan(const Ctx<T>& cx, Plan& pl, int64_t r0, int64_t nb) {
  const int64_t M = cx.M, N = cx.N, C = pl.C, RB = pl.RB, E = C * RB + 1;
  const int shift = pl.shift;
  const int64_t nblk = (nb + RB - 1) / RB;
  pl.r0 = r0;
  pl.nb = nb;
  pl.M = M;
  pl.Dp = cx.Dp;
  pl.row_shift = (cx.Dp & (cx.Dp - 1)) == 0 ? __builtin_ctzll(static_cast<unsigned long long>(cx.Dp)) : -1;
  pl.off.resize(nblk * E);
  if (pl.capacity < nb * M) {
    pl.sorted = make_buf<int32_t>(nb * M);
    pl.capacity = nb * M;
  }
  std::atomic<bool> bad{false};
  at::parallel_for(0, nblk, grain(4 * RB * M + E), [&](int64_t j0, int64_t j1) {
    // li: the block's items as int32 (int64 input); tmp: the block sorted (both stay in L2
    // from block to block), then copied out sequentially: scattering straight into the big
    // sorted array would miss the cache on nearly every store. cnt[r * C + c]: the count,
    // then the write cursor, of row r's run in chunk c (row-major, so the inner loops index
    // it by the chunk alone).
    // Unsigned counters and indices (all checked to lie in [0, N) first): 32-bit values
    // extend to addresses for free, where signed ones would need a sign extension each. The
    // counting loops are unrolled by hand: `#pragma GCC unroll 4` on the plain loops (tried)
    // adds the row's counter offset per index, +1 instruction per pair in each loop.
    std::vector<int32_t> li(cx.neg_is_int64 ? RB * M : 0), tmp(RB * M);
    std::vector<uint32_t> cnt(RB * C);
    const int sh = shift;  // a local: the captured one is re-read after every counter store
    // what a pair stores: its row's element offset in the chunk buffer
    const uint32_t low = static_cast<uint32_t>((int64_t(1) << shift) - 1), dp32 = static_cast<uint32_t>(cx.Dp);
    bool ok = true;
    for (int64_t j = j0; j < j1; ++j) {
      const int64_t rows = std::min(RB, nb - j * RB);
      bool in_range = true;
      const int32_t* __restrict__ l =
          block_items(cx.neg, cx.neg_is_int64, (r0 + j * RB) * M, rows * M, N, li.data(), in_range);
      if (!in_range) {
        ok = false;
        continue;
      }
      std::fill(cnt.begin(), cnt.end(), 0u);
      for (int64_t r = 0; r < rows; ++r) {
        const uint32_t* __restrict__ lr = reinterpret_cast<const uint32_t*>(l + r * M);
        uint32_t* __restrict__ h = cnt.data() + r * C;
        int64_t k = 0;
        for (; k + 4 <= M; k += 4) {
          const uint32_t c0 = lr[k] >> sh, c1 = lr[k + 1] >> sh, c2 = lr[k + 2] >> sh, c3 = lr[k + 3] >> sh;
          h[c0]++;
          h[c1]++;
          h[c2]++;
          h[c3]++;
        }
        for (; k < M; ++k) h[lr[k] >> sh]++;
      }
      // Run starts in (chunk, row) order; rows past the block's end get empty runs.
      int32_t* __restrict__ o = pl.off.data() + j * E;
      int32_t start = 0;
      for (int64_t c = 0; c < C; ++c)
        for (int64_t r = 0; r < RB; ++r) {
          o[c * RB + r] = start;
          if (r < rows) {
            uint32_t& h = cnt[r * C + c];
            const int32_t n = static_cast<int32_t>(h);
            h = static_cast<uint32_t>(start);
            start += n;
          }
        }
      o[C * RB] = start;
      int32_t* __restrict__ dst = tmp.data();
      for (int64_t r = 0; r < rows; ++r) {
        const uint32_t* __restrict__ lr = reinterpret_cast<const uint32_t*>(l + r * M);
        uint32_t* __restrict__ cur = cnt.data() + r * C;
        uint32_t* __restrict__ out = reinterpret_cast<uint32_t*>(dst);
        int64_t k = 0;
        for (; k + 4 <= M; k += 4) {
          for (int i = 0; i < 4; ++i) {
            const uint32_t v = lr[k + i];
            out[cur[v >> sh]++] = (v & low) * dp32;
          }
        }
        for (; k < M; ++k) {
          const uint32_t v = lr[k];
          out[cur[v >> sh]++] = (v & low) * dp32;
        }
      }
      std::memcpy(pl.sorted.get() + j * RB * M, dst, sizeof(int32_t) * rows * M);
    }
    if (!ok) bad.store(true);
  });
  if (bad.load()) throw_index_error("neg", cx.neg, cx.neg_is_int64, cx.B * M, M, N);
  pl.ctot.assign(C, 0);
  for (int64_t j = 0; j < nblk; ++j) {
    const int32_t* o = pl.off.data() + j * E;
    for (int64_t c = 0; c < C; ++c) pl.ctot[c] += o[(c + 1) * RB] - o[c * RB];
  }
  // Groups: contiguous chunk ranges with about the same number of pairs.
  const int64_t G = std::max<int64_t>(1, std::min<int64_t>(tuning().max_groups, C));
  pl.gchunk.assign(G + 1, C);
  pl.gchunk[0] = 0;
  const int64_t P = nb * M;
  int64_t c = 0, acc = 0;
  for (int64_t g = 1; g < G; ++g) {
    const int64_t target = P * g / G;
    while (c < C && acc < target) acc += pl.ctot[c++];
    pl.gchunk[g] = std::max(c, pl.gchunk[g - 1]);
  }
}

// What the score pass leaves for the rest (one block of rows): the scores of the pairs in
// the plan's order and the merged running state of each row's negatives.
template <typename T>
struct PairState {
  Buf<T> score;            // [nb*M] ŝ of each pair, or e = exp(β·ŝ - |β|) when exp_scores
  bool exp_scores = false; // the score pass used the fixed reference (see fixed_reference)
  std::vector<T> m, s, w;  // [nb] max logit, Σe^{l-m}, Σe^{l-m}·ŝ
  Buf<T> v;                // [nb][Dp] Σe^{l-m}·r̂
  std::vector<T> rm, rs;   // [nb] max and Σe^{l'-m'} of the raw logits l' = ŝ - logq (compute_raw)
};


template <typename T>
struct Saved {
  Plan plan;
  PairState<T> state;
  std::shared_ptr<const PreparedRows<T>> rows;
};

// What a forward keeps for the backward of the same call (per-row: Saved, about 8 bytes
// per pair; GEMM modes: SavedTiles, 4 or 8 bytes per score). At most two are kept;
// ADAPTAU_CPU_PLAN_CACHE=0 disables it.
class SavedCache {
 public:
  static SavedCache& get() {
    static SavedCache* cache = new SavedCache();
    return *cache;
  }
  // Whether put() would keep an entry under this key (so a forward can skip building what
  // would be dropped).
  bool accepts(const SavedKey& key) const { return enabled_ && key.valid; }
  void put(const SavedKey& key, std::shared_ptr<void> value) {
    if (!accepts(key)) return;
    std::lock_guard<std::mutex> lock(mu_);
    for (auto it = entries_.begin(); it != entries_.end(); ++it)
      if (it->first == key) {
        entries_.erase(it);
        break;
      }
    entries_.emplace_back(key, std::move(value));
    while (entries_.size() > 2) entries_.erase(entries_.begin());
  }
  std::shared_ptr<void> take(const SavedKey& key) {
    if (!accepts(key)) return nullptr;
    std::lock_guard<std::mutex> lock(mu_);
    for (auto it = entries_.begin(); it != entries_.end(); ++it)
      if (it->first == key) {
        std::shared_ptr<void> p = std::move(it->second);
        entries_.erase(it);
        return p;
      }
    return nullptr;
  }

 private:
  SavedCache() {
    const char* e = std::getenv("ADAPTAU_CPU_PLAN_CACHE");
    enabled_ = !(e != nullptr && std::string(e) == "0");
  }
  bool enabled_;
  std::mutex mu_;
  std::vector<std::pair<SavedKey, std::shared_ptr<void>>> entries_;
};

// f(std::integral_constant<int64_t, kD>{}): kD = the padded width NV·W when the rows need
// no padding (D equals it), so the row helpers' loops unroll (row_len); else kD = 0.
template <typename T, int NV, typename F>
ADAPTAU_HOT_INLINE void with_row_len(int64_t D, F&& f) {
  constexpr int64_t kDp = RunOps<T, NV>::kDp;
  if (NV > 0 && D == kDp)
    f(std::integral_constant<int64_t, kDp>{});
  else
    f(std::integral_constant<int64_t, 0>{});
}

// Normalizes (or copies) the rows of chunk c that its pairs reference into buf (padded):
// all rows when the chunk is dense, else only the referenced ones (stamped with id).
// (Kept out of line: inlined, it changes the register allocation of the score pass's
// run loops for the worse.)
template <typename T, int NV>
__attribute__((noinline)) void load_chunk(const Ctx<T>& cx, const Plan& pl, int64_t c, int64_t base, int64_t nloc, T* buf,
                std::vector<int64_t>& stamp, int64_t id) {
  const int64_t D = cx.D, Dp = cx.Dp;
  if (pl.ctot[c] >= nloc / 2) {
    with_row_len<T, NV>(D, [&](auto kd) {
      constexpr int64_t kD = decltype(kd)::value;
      for (int64_t r = 0; r < nloc; ++r) load_row<kD>(buf + r * Dp, cx.items + (base + r) * D, D, Dp, cx.normalize);
    });
    return;
  }
  pl.for_runs(c, [&](int64_t, int64_t k0, int64_t k1) {
    for (int64_t k = k0; k < k1; ++k) {
      const int64_t r = pl.local_row(pl.sorted[k]);
      if (stamp[r] != id) {
        stamp[r] = id;
        load_row(buf + r * Dp, cx.items + (base + r) * D, D, Dp, cx.normalize);
      }
    }
  });
}

// Logits of a run of chunk rows [base, ...): lg[k] = scale·sc[k] - logq[item k] - shift
// (-inf for an accidental hit when remove_hits; item k = base + pl.local_row(off[k])),
// padded with -inf to a multiple of W. Returns their max.
template <typename T>
inline T run_logits(const Ctx<T>& cx, const Plan& pl, int64_t base, const int32_t* __restrict__ idx,
                    const T* __restrict__ sc, int64_t n, T scale, T shift, int32_t p, T* __restrict__ lg) {
  using V = Vec<T>;
  constexpr int W = V::W;
  const int64_t npad = round_up(n, W);
  T mx = neg_inf<T>();
  if (cx.logq == nullptr && !cx.remove_hits) {
    const typename V::R vs = V::set1(scale), vsh = V::set1(shift);
    typename V::R vm = V::set1(neg_inf<T>());
    int64_t k = 0;
    for (; k + W <= n; k += W) {
      const typename V::R l = V::sub(V::mul(vs, V::load(sc + k)), vsh);
      V::store(lg + k, l);
      vm = V::max(vm, l);
    }
    mx = V::hmax(vm);
    for (; k < n; ++k) {
      lg[k] = scale * sc[k] - shift;
      mx = std::max(mx, lg[k]);
    }
  } else {
    for (int64_t k = 0; k < n; ++k) {
      const int64_t item = base + pl.local_row(idx[k]);
      const bool drop = cx.remove_hits && item == p;
      const T l = drop ? neg_inf<T>() : scale * sc[k] - (cx.logq ? cx.logq[item] : T(0)) - shift;
      lg[k] = l;
      mx = std::max(mx, l);
    }
  }
  for (int64_t k = n; k < npad; ++k) lg[k] = neg_inf<T>();
  return mx;
}

// out[k] = f(x[k]) for the n values of a run, W at a time; the last vector is read from a
// zero-padded copy (never past the run's slots) and written whole (out has room, npad).
template <typename T, typename F>
ADAPTAU_HOT_INLINE void map_run(const T* __restrict__ x, int64_t n, T* __restrict__ out, F f) {
  using V = Vec<T>;
  constexpr int W = V::W;
  int64_t k = 0;
  for (; k + W <= n; k += W) V::store(out + k, f(V::load(x + k)));
  if (k < n) {
    alignas(64) T t[W] = {};
    std::copy(x + k, x + n, t);
    V::store(out + k, f(V::load(t)));
  }
}

// Fixed reference: with normalized vectors and no logq, a row's logits β·ŝ lie in
// [-|β|, |β|], so exp(β·ŝ - |β|) ∈ [e^{-2|β|}, 1] neither overflows nor, for |β| up to this
// bound, underflows (V::exp is exact down to -87 in float32). Rows then need no running max:
// no max pass, no rescaling between runs, and the exps can be kept for the backward.
template <typename T>
constexpr T fixed_reference_max_beta() {
  return sizeof(T) == 4 ? T(40) : T(300);
}

// The raw loss's terms (normalized, no logq): exp(ŝ - 1) of a vector of scores, lanes from
// `left` on zeroed. Cosines are at most 1, so the raw log-sum-exp needs no running max
// (reference 1 for every row); add_raw folds a run's sum into its (group, row) state.
template <typename T>
ADAPTAU_HOT_INLINE typename Vec<T>::R raw_exp(typename Vec<T>::R sv, int left) {
  using V = Vec<T>;
  const typename V::R r = V::exp(V::sub(sv, V::set1(T(1))));
  return left < V::W ? V::keep_first(r, left) : r;
}

template <typename T>
ADAPTAU_HOT_INLINE void add_raw(T& rm, T& rs, typename Vec<T>::R racc) {
  rm = T(1);
  rs += Vec<T>::hsum(racc);
}

// What every run of a score pass's thread shares in the fixed-reference case: the chunk
// buffer, a scratch for the scores and the (group, row) states (indexed by gb = g·nb + row).
template <typename T>
struct FixedRunArgs {
  const T* buf;
  int64_t Dp;
  T* sc;              // [kBlock + W] scores scratch
  T *m, *s, *w, *v;   // states: max (|β|), Σe, Σe·ŝ, Σe·row ([Dp] each)
  bool compute_raw;
  T *rm, *rs;         // raw loss states (compute_raw)
};

// One block (at most kBlock pairs) of a run in the fixed-reference case: the scores
// ŝ = <u, row>, e = exp(β·ŝ - |β|) stored in the pairs' slots dst, and state gb: m = |β|,
// s += Σe, w += Σe·ŝ, v (+)= Σe·row (fresh: the row's first block in this group), and with
// compute_raw the raw loss's Σexp(ŝ - 1) into rs (rm = 1). Out of line, with few
// arguments: inlined into the loop over runs, GCC spilled more than the call costs.
template <typename T, int NV>
__attribute__((noinline)) void fixed_run(const FixedRunArgs<T>& a, int64_t gb, const T* __restrict__ u,
                                         T beta, const int32_t* __restrict__ idx, int64_t n,
                                         T* __restrict__ dst) {
  using Ops = RunOps<T, NV>;
  using V = Vec<T>;
  constexpr int W = V::W;
  T* __restrict__ sc = a.sc;
  Ops::dots(u, a.buf, idx, n, a.Dp, sc);
  const typename V::R vb = V::set1(beta), vnref = V::set1(-std::abs(beta));
  typename V::R es = V::zero(), ews = V::zero(), racc = V::zero();
  const bool compute_raw = a.compute_raw;
  for (int64_t k = 0; k < n; k += W) {
    const typename V::R sv = V::load_after_hsum4(sc + k);
    typename V::R e = V::exp(V::fma(vb, sv, vnref));
    const int left = static_cast<int>(std::min<int64_t>(W, n - k));
    if (left < W) {
      e = V::keep_first(e, left);
      V::store_first(dst + k, e, left);
    } else {
      V::store(dst + k, e);
    }
    es = V::add(es, e);
    ews = V::fma(e, sv, ews);
    if (compute_raw) racc = V::add(racc, raw_exp<T>(sv, left));
  }
  if (compute_raw) add_raw(a.rm[gb], a.rs[gb], racc);
  const bool fresh = a.m[gb] == neg_inf<T>();
  a.m[gb] = std::abs(beta);
  a.s[gb] += V::hsum(es);
  a.w[gb] += V::hsum(ews);
  Ops::gather_axpy(a.v + gb * a.Dp, fresh, T(1), dst, a.buf, idx, n, a.Dp);
}

// Score pass over one block of rows (see the section comment): fills st.
template <typename T, int NV>
void score_pass(const Ctx<T>& cx, const Plan& pl, PairState<T>& st, bool compute_raw) {
  using Ops = RunOps<T, NV>;
  using V = Vec<T>;
  constexpr int W = V::W;
  const int64_t nb = pl.nb, M = pl.M, Dp = cx.Dp, N = cx.N, CI = pl.CI, r0 = pl.r0;
  const int shift = pl.shift;
  const int64_t G = static_cast<int64_t>(pl.gchunk.size()) - 1;
  if (st.score.get() == nullptr) st.score = make_buf<T>(nb * M);
  std::vector<T> gm(G * nb, neg_inf<T>()), gs(G * nb, T(0)), gw(G * nb, T(0));
  std::vector<T> grm(compute_raw ? G * nb : 0, neg_inf<T>()), grs(compute_raw ? G * nb : 0, T(0));
  Buf<T> gv = make_buf<T>(G * nb * Dp);
  // Raw logits ŝ - logq: with normalized vectors and no logq they lie in [-1, 1].
  const bool raw_fixed_ref = cx.normalize && cx.logq == nullptr;
  // The common case (normalized, no logq, no hit removal): logits β·ŝ straight from the
  // scores, both exps in one loop, no per-run logits buffer or scalar tails.
  const bool plain = raw_fixed_ref && !cx.remove_hits;
  bool fixed = plain;
  for (int64_t b = r0; b < r0 + nb && fixed; ++b) fixed = std::abs(cx.beta[b]) <= fixed_reference_max_beta<T>();
  st.exp_scores = fixed;
  at::parallel_for(0, G, grain(3 * nb * M * Dp / G), [&](int64_t g0, int64_t g1) {
    Buf<T> buf = make_buf<T>(CI * Dp);
    std::vector<int64_t> stamp(CI, -1);
    alignas(64) T lg[kBlock + W];
    alignas(64) T ex[kBlock + W];
    alignas(64) T sc[kBlock + W];
    std::fill(sc, sc + kBlock + W, T(0));  // lanes past a run's end stay finite
    for (int64_t g = g0; g < g1; ++g) {
      for (int64_t c = pl.gchunk[g]; c < pl.gchunk[g + 1]; ++c) {
        if (pl.ctot[c] == 0) continue;
        const int64_t base = c << shift;
        const int64_t nloc = std::min(CI, N - base);
        load_chunk<T, NV>(cx, pl, c, base, nloc, buf.get(), stamp, c + r0 * pl.C);
        if (fixed) {
          const FixedRunArgs<T> fa{buf.get(), Dp, sc, gm.data(), gs.data(), gw.data(), gv.get(),
                                   compute_raw, grm.data(), grs.data()};
          // (pointers captured by value, not through the enclosing lambda's references: they
          // stay in registers across the calls instead of being reloaded after each)
          const int64_t gnb = g * nb, stride = Dp;
          T* const score = st.score.get();
          const int32_t* const sorted = pl.sorted.get();
          const T* const betas = cx.beta + r0;
          const T* const users = cx.uhat + r0 * Dp;
          pl.for_runs(c, [&fa, gnb, stride, score, sorted, betas, users](int64_t bl, int64_t k0, int64_t k1) {
            for (int64_t kk = k0; kk < k1; kk += kBlock)
              fixed_run<T, NV>(fa, gnb + bl, users + bl * stride, betas[bl], sorted + kk,
                               std::min(kBlock, k1 - kk), score + kk);
          });
          continue;
        }
        pl.for_runs(c, [&](int64_t bl, int64_t k0, int64_t k1) {
          const int64_t b = r0 + bl, gb = g * nb + bl;
          const T* u = cx.uhat + b * Dp;
          const T beta = cx.beta[b];
          const int32_t p = cx.pos[b];
          for (int64_t kk = k0; kk < k1; kk += kBlock) {
            const int64_t n = std::min(kBlock, k1 - kk);
            const int64_t npad = round_up(n, W);
            const int32_t* idx = pl.sorted.get() + kk;
            Ops::dots(u, buf.get(), idx, n, Dp, sc);
            const typename V::R vb = V::set1(beta);
            T mx;
            if (plain) {
              // Logits β·ŝ straight from the scores. Pad lanes repeat sc[0], so the max needs
              // no mask; the sums below mask them instead.
              for (int64_t k = n; k < npad; ++k) sc[k] = sc[0];
              T* dst = st.score.get() + kk;
              int64_t k = 0;
              for (; k + W <= n; k += W) {
                const typename V::R v = V::load_after_hsum4(sc + k);
                V::store(sc + k, v);
                V::store(dst + k, v);
              }
              if (k < n) {
                V::store(sc + k, V::load_after_hsum4(sc + k));
                for (; k < n; ++k) dst[k] = sc[k];
              }
              typename V::R vmx = V::set1(neg_inf<T>());
              for (k = 0; k < npad; k += W) vmx = V::max(vmx, V::mul(vb, V::load(sc + k)));
              mx = V::hmax(vmx);
            } else {
              for (int64_t k = n; k < npad; ++k) sc[k] = T(0);
              for (int64_t k = 0; k < npad; k += W) V::store(sc + k, V::load_after_hsum4(sc + k));
              std::memcpy(st.score.get() + kk, sc, sizeof(T) * n);
              if (compute_raw && raw_fixed_ref) {
                // as raw_exp, through the logits (hit removal drops the positive's slots)
                run_logits(cx, pl, base, idx, sc, n, T(1), T(1), p, lg);
                typename V::R acc = V::zero();
                for (int64_t k = 0; k < npad; k += W) acc = V::add(acc, V::exp(V::load(lg + k)));
                add_raw(grm[gb], grs[gb], acc);
              } else if (compute_raw) {
                run_logits(cx, pl, base, idx, sc, n, T(1), T(0), p, lg);
                lse_update(lg, npad, grm[gb], grs[gb]);
              }
              mx = run_logits(cx, pl, base, idx, sc, n, beta, T(0), p, lg);  // lg padded with -inf
            }
            if (mx == neg_inf<T>()) continue;
            T& m = gm[gb];
            const bool fresh = m == neg_inf<T>();
            const T mn = fresh ? mx : std::max(m, mx);
            const T keep = fresh ? T(0) : (mn == m ? T(1) : std::exp(m - mn));
            const typename V::R vmn = V::set1(mn), vnmn = V::set1(-mn);
            typename V::R es = V::zero(), ews = V::zero(), racc = V::zero();
            const int tail = static_cast<int>(n - (npad - W));
            for (int64_t k = 0; k < npad; k += W) {
              const typename V::R sv = V::load(sc + k);
              // (plain: β·ŝ - m in one rounding)
              typename V::R e = V::exp(plain ? V::fma(vb, sv, vnmn) : V::sub(V::load(lg + k), vmn));
              if (k + W > n) e = V::keep_first(e, tail);
              V::store(ex + k, e);
              es = V::add(es, e);
              ews = V::fma(e, sv, ews);
              if (plain && compute_raw) racc = V::add(racc, raw_exp<T>(sv, k + W > n ? tail : W));
            }
            if (plain && compute_raw) add_raw(grm[gb], grs[gb], racc);
            gs[gb] = gs[gb] * keep + V::hsum(es);
            gw[gb] = gw[gb] * keep + V::hsum(ews);
            m = mn;
            Ops::gather_axpy(gv.get() + gb * Dp, fresh, keep, ex, buf.get(), idx, n, Dp);
          }
        });
      }
    }
  });
  // Merge the groups of each row, in group order.
  st.m.assign(nb, neg_inf<T>());
  st.s.assign(nb, T(0));
  st.w.assign(nb, T(0));
  if (st.v.get() == nullptr) st.v = make_buf<T>(nb * Dp);
  if (compute_raw) {
    st.rm.assign(nb, neg_inf<T>());
    st.rs.assign(nb, T(0));
  }
  at::parallel_for(0, nb, grain(4 * G * Dp), [&](int64_t b0, int64_t b1) {
    for (int64_t bl = b0; bl < b1; ++bl) {
      T m = neg_inf<T>();
      for (int64_t g = 0; g < G; ++g) m = std::max(m, gm[g * nb + bl]);
      T s = T(0), w = T(0);
      T* v = st.v.get() + bl * Dp;
      std::fill(v, v + Dp, T(0));
      if (m != neg_inf<T>()) {
        for (int64_t g = 0; g < G; ++g) {
          const int64_t gb = g * nb + bl;
          if (gm[gb] == neg_inf<T>()) continue;
          const T f = std::exp(gm[gb] - m);
          s += f * gs[gb];
          w += f * gw[gb];
          const T* gvr = gv.get() + gb * Dp;
          for (int64_t i = 0; i < Dp; ++i) v[i] += f * gvr[i];
        }
      }
      st.m[bl] = m;
      st.s[bl] = s;
      st.w[bl] = w;
      if (compute_raw) {
        T rm = neg_inf<T>(), rs = T(0);
        for (int64_t g = 0; g < G; ++g) rm = std::max(rm, grm[g * nb + bl]);
        if (rm != neg_inf<T>())
          for (int64_t g = 0; g < G; ++g)
            if (grm[g * nb + bl] != neg_inf<T>()) rs += std::exp(grm[g * nb + bl] - rm) * grs[g * nb + bl];
        st.rm[bl] = rm;
        st.rs[bl] = rs;
      }
    }
  });
}

template <typename T>
std::pair<int64_t, int> per_row_blocking(const Ctx<T>& cx) {
  const Tuning& tu = tuning();
  const int64_t Bb = std::max<int64_t>(1, std::min<int64_t>(cx.B, tu.max_pairs / cx.M));
  const int shift = chunk_shift(cx.Dp * int64_t(sizeof(T)), cx.Dp, tu.chunk_bytes, cx.N, Bb, tu.max_pairs);
  return {Bb, shift};
}

template <typename T>
void init_plan(const Ctx<T>& cx, Plan& pl, int shift) {
  pl.shift = shift;
  pl.CI = std::min(int64_t(1) << shift, cx.N);  // (C > 1 implies 2^shift < N)
  // The pairs carry their rows' offsets in a chunk buffer as int32 (Plan::sorted):
  // chunk_shift keeps chunks below 2^31 elements unless a single row of 16-row chunks
  // is already too long, which only an absurd embedding size can make.
  TORCH_CHECK(pl.CI * cx.Dp <= (int64_t(1) << 31),
              "adaptau cpu backend: embedding dimension ", cx.D, " is too large for the per-row "
              "kernel (a chunk of ", pl.CI, " rows would exceed 2^31 elements)");
  pl.C = ((cx.N - 1) >> shift) + 1;
  pl.RB = std::max<int64_t>(1, std::min(tuning().sort_rows, (int64_t(1) << 18) / cx.M));
}

template <typename T, int NV>
void per_row_forward(Ctx<T>& cx, T* loss, T* lse_out, T* raw, bool compute_raw) {
  const int64_t B = cx.B;
  PhaseTimer pt;
  const auto [Bb, shift] = per_row_blocking(cx);
  auto saved = std::make_shared<Saved<T>>();
  Plan& pl = saved->plan;
  PairState<T>& st = saved->state;
  init_plan(cx, pl, shift);
  for (int64_t r0 = 0; r0 < B; r0 += Bb) {
    const int64_t nb = std::min(Bb, B - r0);
    build_plan(cx, pl, r0, nb);
    pt.mark("fwd sort");
    score_pass<T, NV>(cx, pl, st, compute_raw);
    pt.mark("fwd scores");
    for (int64_t bl = 0; bl < nb; ++bl) {
      const int64_t b = r0 + bl;
      finish_row(cx.include_pos, st.m[bl], st.s[bl], cx.alpha[b] * cx.spos[b], lse_out[b], loss[b]);
      if (compute_raw) {
        T unused;
        finish_row(cx.include_pos, st.rm[bl], st.rs[bl], cx.spos[b], unused, raw[b]);
      }
    }
    pt.mark("fwd rows");
  }
  if (Bb >= B) {
    saved->rows = cx.rows;
    SavedCache::get().put(cx.key, saved);
  }
}

// Per-row quantities of the backward: g (0 for an empty row), d(loss)/d(pos score).
template <typename T>
struct RowGrad {
  std::vector<T> g, dpos, p_pos;
};

template <typename T>
RowGrad<T> row_grad(const Ctx<T>& cx, const T* grad_loss, const T* lse) {
  RowGrad<T> rg;
  rg.g.resize(cx.B);
  rg.dpos.resize(cx.B);
  rg.p_pos.resize(cx.B);
  for (int64_t b = 0; b < cx.B; ++b) {
    const bool empty = !(lse[b] > neg_inf<T>());
    const T g = empty ? T(0) : grad_loss[b];
    const T pp = (cx.include_pos && !empty) ? std::exp(cx.alpha[b] * cx.spos[b] - lse[b]) : T(0);
    rg.g[b] = g;
    rg.p_pos[b] = pp;
    rg.dpos[b] = g * cx.alpha[b] * (pp - T(1));
  }
  return rg;
}

// grad_user rows [r0, r0+nb) from the normalized-space gradient (the sum of nparts
// partials [nparts][nb][Dp] in order, plus the positive's term), and the scale gradients
// (q: Σ_k P_k ŝ_k per row, in nparts partials).
template <typename T>
void finish_rows(const Ctx<T>& cx, const RowGrad<T>& rg, int64_t r0, int64_t nb, const T* gu_parts,
                 int64_t nparts, const T* q_parts, T* grad_user, T* grad_alpha, T* grad_beta,
                 bool need_scale) {
  const int64_t D = cx.D, Dp = cx.Dp;
  at::parallel_for(0, nb, grain(4 * (nparts + 2) * Dp), [&](int64_t b0, int64_t b1) {
    std::vector<T> gu(Dp), ph(Dp);
    for (int64_t bl = b0; bl < b1; ++bl) {
      const int64_t b = r0 + bl;
      std::copy(gu_parts + bl * Dp, gu_parts + (bl + 1) * Dp, gu.begin());
      for (int64_t g = 1; g < nparts; ++g) {
        const T* part = gu_parts + (g * nb + bl) * Dp;
        for (int64_t i = 0; i < Dp; ++i) gu[i] += part[i];
      }
      const T dp = rg.dpos[b];
      if (dp != T(0)) {
        load_row(ph.data(), cx.items + int64_t(cx.pos[b]) * D, D, Dp, cx.normalize);
        for (int64_t i = 0; i < D; ++i) gu[i] += dp * ph[i];
      }
      normalize_backward(grad_user + b * D, gu.data(), cx.uhat + b * Dp, cx.unorm[b], D,
                         cx.normalize);
      if (need_scale) {
        T q = T(0);
        for (int64_t g = 0; g < nparts; ++g) q += q_parts[g * nb + bl];
        grad_beta[b] = rg.g[b] * q;
        grad_alpha[b] = rg.g[b] * cx.spos[b] * (rg.p_pos[b] - T(1));
      } else {
        grad_beta[b] = T(0);
        grad_alpha[b] = T(0);
      }
    }
  });
}

// Item-gradient pass over one block of rows: per chunk (G groups in parallel), d = g·β·P
// of every pair from its stored score, acc[item] += d·û (and the positives' d·û), then
// the chunk's rows of grad_items: written (single block), or summed over the blocks with
// the normalization's Jacobian applied after the last one.
template <typename T, int NV>
void item_grad_pass(const Ctx<T>& cx, const Plan& pl, const PairState<T>& st, const RowGrad<T>& rg,
                    const T* lse, const std::vector<int32_t>& pstart, const std::vector<int32_t>& prow,
                    T* grad_items, bool first, bool last, bool single) {
  using Ops = RunOps<T, NV>;
  using V = Vec<T>;
  constexpr int W = V::W;
  const int64_t nb = pl.nb, Dp = cx.Dp, D = cx.D, N = cx.N, CI = pl.CI, r0 = pl.r0;
  const int shift = pl.shift;
  const int64_t G = static_cast<int64_t>(pl.gchunk.size()) - 1;
  const bool plain = cx.logq == nullptr && !cx.remove_hits;  // logits are β·ŝ
  // exp_scores: the row factor g·β·exp(m - lse) of the stored e = exp(β·ŝ - m), m the row's
  // fixed reference kept in the state (0 for a skipped row)
  std::vector<T> efac(st.exp_scores ? nb : 0);
  for (int64_t bl = 0; bl < static_cast<int64_t>(efac.size()); ++bl) {
    const int64_t b = r0 + bl;
    efac[bl] = rg.g[b] == T(0) ? T(0) : rg.g[b] * cx.beta[b] * std::exp(st.m[bl] - lse[b]);
  }
  at::parallel_for(0, G, grain(2 * nb * pl.M * Dp / G), [&](int64_t g0, int64_t g1) {
    Buf<T> acc = make_zero_buf<T>(CI * Dp);  // zero between chunks: rows are cleared as written
    std::vector<T> xh(Dp);
    alignas(64) T lg[kBlock + W];
    for (int64_t g = g0; g < g1; ++g) {
      for (int64_t c = pl.gchunk[g]; c < pl.gchunk[g + 1]; ++c) {
        const int64_t base = c << shift;
        const int64_t nloc = std::min(CI, N - base);
        if (pl.ctot[c] > 0) {
          pl.for_runs(c, [&](int64_t bl, int64_t k0, int64_t k1) {
            const int64_t b = r0 + bl;
            if (rg.g[b] == T(0)) return;
            const T* u = cx.uhat + b * Dp;
            const T beta = cx.beta[b];
            const T l_b = lse[b];
            const int32_t p = cx.pos[b];
            const typename V::R vg = V::set1(rg.g[b] * beta);
            for (int64_t kk = k0; kk < k1; kk += kBlock) {
              const int64_t n = std::min(kBlock, k1 - kk);
              const int64_t npad = round_up(n, W);
              const int32_t* idx = pl.sorted.get() + kk;
              const T* sc = st.score.get() + kk;
              if (st.exp_scores) {
                // d = g·β·exp(m - lse)·e with e = exp(β·ŝ - m) stored (m = |β|): the row factor
                // scales û once per run and the stored e are the coefficients as they are
                Ops::scatter_axpy(acc.get(), idx, sc, u, efac[bl], n, Dp);
                continue;
              }
              if (plain) {  // d = g·β·exp(β·ŝ - lse) straight from the scores
                const typename V::R vb = V::set1(beta), vl = V::set1(l_b);
                map_run(sc, n, lg, [&](typename V::R x) { return V::mul(vg, V::exp(V::sub(V::mul(vb, x), vl))); });
              } else {
                run_logits(cx, pl, base, idx, sc, n, beta, l_b, p, lg);
                for (int64_t k = 0; k < npad; k += W) V::store(lg + k, V::mul(vg, V::exp(V::load(lg + k))));
              }
              Ops::scatter_axpy(acc.get(), idx, lg, u, T(1), n, Dp);
            }
          });
        }
        // Positives of this chunk (rows of this block).
        for (int64_t j = pstart[c]; j < pstart[c + 1]; ++j) {
          const int64_t b = prow[j];
          const T dp = rg.dpos[b];
          if (b < r0 || b >= r0 + nb || dp == T(0)) continue;
          T* a = acc.get() + (cx.pos[b] - base) * Dp;
          const T* u = cx.uhat + b * Dp;
          for (int64_t i = 0; i < Dp; ++i) a[i] += dp * u[i];
        }
        // Item-gradient rows of the chunk.
        for (int64_t r = 0; r < nloc; ++r) {
          T* out = grad_items + (base + r) * D;
          T* a = acc.get() + r * Dp;
          const T* x = cx.items + (base + r) * D;
          if (single) {
            with_row_len<T, NV>(D, [&](auto kd) {
              constexpr int64_t kD = decltype(kd)::value;
              const T nrm = load_row<kD>(xh.data(), x, D, Dp, cx.normalize);
              normalize_backward<kD>(out, a, xh.data(), nrm, D, cx.normalize);
              std::memset(a, 0, sizeof(T) * row_len<kD>(Dp));
            });
            continue;
          }
          if (first)
            std::memcpy(out, a, sizeof(T) * D);
          else
            for (int64_t i = 0; i < D; ++i) out[i] += a[i];
          std::memset(a, 0, sizeof(T) * Dp);
          if (last && cx.normalize) {
            const T n = std::sqrt(dot_plain(x, x, D));
            if (n > norm_eps<T>()) {
              const T inv = T(1) / n;
              const T proj = inv * inv * dot_plain(x, out, D);
              for (int64_t i = 0; i < D; ++i) out[i] = (out[i] - x[i] * proj) * inv;
            } else {
              for (int64_t i = 0; i < D; ++i) out[i] *= T(1) / norm_eps<T>();
            }
          }
        }
      }
    }
  });
}

// Backward, per block of rows: the forward's plan and state when the cache has them (one
// block), else the sort and score pass again; then the item-gradient pass and the rows.
template <typename T, int NV>
void per_row_backward(Ctx<T>& cx, std::shared_ptr<Saved<T>> saved, const T* grad_loss, const T* lse,
                      T* grad_user, T* grad_items, T* grad_alpha, T* grad_beta, bool need_scale) {
  const int64_t B = cx.B, Dp = cx.Dp;
  PhaseTimer pt;
  RowGrad<T> rg = row_grad(cx, grad_loss, lse);
  const auto [Bb, shift] = per_row_blocking(cx);
  const bool single = Bb >= B;
  const bool cached = saved != nullptr && single;  // (the forward keeps single blocks only)
  if (!cached) {
    saved = std::make_shared<Saved<T>>();
    init_plan(cx, saved->plan, shift);
  }
  Plan& pl = saved->plan;
  PairState<T>& st = saved->state;
  const int64_t C = pl.C;
  // Positives by chunk (stable in b).
  std::vector<int32_t> pstart(C + 1, 0), prow(B);
  for (int64_t b = 0; b < B; ++b) pstart[(cx.pos[b] >> pl.shift) + 1]++;
  for (int64_t c = 0; c < C; ++c) pstart[c + 1] += pstart[c];
  {
    std::vector<int32_t> pcur(pstart.begin(), pstart.end() - 1);
    for (int64_t b = 0; b < B; ++b) prow[pcur[cx.pos[b] >> pl.shift]++] = static_cast<int32_t>(b);
  }
  pt.mark(cached ? "bwd setup (saved)" : "bwd setup");
  Buf<T> gu = make_buf<T>(Bb * Dp);
  std::vector<T> q(Bb);
  for (int64_t r0 = 0; r0 < B; r0 += Bb) {
    const int64_t nb = std::min(Bb, B - r0);
    if (!cached) {
      build_plan(cx, pl, r0, nb);
      score_pass<T, NV>(cx, pl, st, false);
      pt.mark("bwd recompute");
    }
    item_grad_pass<T, NV>(cx, pl, st, rg, lse, pstart, prow, grad_items, r0 == 0, r0 + nb == B, single);
    pt.mark("bwd items");
    // Negatives' user gradient (normalized space) and Σ_k P_k ŝ_k from the state.
    at::parallel_for(0, nb, grain(2 * Dp), [&](int64_t b0, int64_t b1) {
      for (int64_t bl = b0; bl < b1; ++bl) {
        const int64_t b = r0 + bl;
        const T f = (rg.g[b] == T(0) || st.m[bl] == neg_inf<T>()) ? T(0) : std::exp(st.m[bl] - lse[b]);
        const T cu = rg.g[b] * cx.beta[b] * f;
        const T* v = st.v.get() + bl * Dp;
        T* o = gu.get() + bl * Dp;
        for (int64_t i = 0; i < Dp; ++i) o[i] = cu * v[i];
        q[bl] = f * st.w[bl];
      }
    });
    finish_rows(cx, rg, r0, nb, gu.get(), 1, q.data(), grad_user, grad_alpha, grad_beta, need_scale);
    pt.mark("bwd rows");
  }
}

// ============================================================ shared / in-batch modes
template <typename T>
struct Cands {
  int64_t Mc = 0, Mp = 0;
  std::vector<int32_t> idx;  // [Mc] item of each candidate
  Buf<T> chat;               // [Mc][Dp] normalized candidate rows
  Buf<T> ct;                 // candidates in panels of 2W columns (see score_tile), zero padded
  std::vector<T> lq;         // [Mp] logq of each candidate (0 past Mc)
  std::vector<T> cnorm;      // [Mc]
};

template <typename T>
Cands<T> prepare_cands(const Ctx<T>& cx, const at::Tensor& neg) {
  Cands<T> cd;
  constexpr int W = Vec<T>::W;
  cd.idx = cx.neg_mode == kNegShared ? indices_to_i32(neg, cx.N, "neg")
                                       : std::vector<int32_t>(cx.pos, cx.pos + cx.B);
  cd.Mc = static_cast<int64_t>(cd.idx.size());
  cd.Mp = round_up(cd.Mc, 2 * W);
  const int64_t Mc = cd.Mc, Mp = cd.Mp, D = cx.D, Dp = cx.Dp;
  cd.chat = make_buf<T>(Mc * Dp);
  cd.ct = make_zero_buf<T>(D * Mp);
  cd.lq.assign(Mp, T(0));
  cd.cnorm.resize(Mc);
  at::parallel_for(0, Mc, grain(4 * D), [&](int64_t m0, int64_t m1) {
    for (int64_t m = m0; m < m1; ++m) {
      T* row = cd.chat.get() + m * Dp;
      cd.cnorm[m] = load_row(row, cx.items + int64_t(cd.idx[m]) * D, D, Dp, cx.normalize);
      T* panel = cd.ct.get() + (m / (2 * W)) * D * 2 * W + (m % (2 * W));
      for (int64_t d = 0; d < D; ++d) panel[d * 2 * W] = row[d];
      if (cx.logq) cd.lq[m] = cx.logq[cd.idx[m]];
    }
  });
  return cd;
}

// What a GEMM-mode forward keeps for the backward of the same call (SavedCache): the
// candidates, the prepared rows and every score ŝ [B][Mp] (when they fit
// ADAPTAU_CPU_SAVED_SCORES_BYTES), so the backward does one GEMM fewer per tile.
template <typename T>
struct SavedTiles {
  Cands<T> cd;
  Buf<T> S;
  std::shared_ptr<const PreparedRows<T>> rows;
};

// Logits of one tile row: lg[c] for columns [c0, c0+nc) of row b (padded with -inf to ncp).
template <typename T>
inline void tile_logits(const Ctx<T>& cx, const Cands<T>& cd, int64_t b, const T* s, int64_t c0,
                        int64_t nc, T scale, bool with_logq, T shift, T* lg) {
  const int32_t p = cx.pos[b];
  const int64_t cend = std::min(nc, cd.Mc - c0);
  for (int64_t c = 0; c < cend; ++c)
    lg[c] = scale * s[c] - (with_logq ? cd.lq[c0 + c] : T(0)) - shift;
  for (int64_t c = std::max<int64_t>(cend, 0); c < nc; ++c) lg[c] = neg_inf<T>();
  if (cx.remove_hits)
    for (int64_t c = 0; c < cend; ++c)
      if (cd.idx[c0 + c] == p) lg[c] = neg_inf<T>();
  if (cx.neg_mode == kNegInBatch && b >= c0 && b < c0 + cend) lg[b - c0] = neg_inf<T>();
}

template <typename T, int NV>
void gemm_forward(Ctx<T>& cx, const at::Tensor& neg, T* loss, T* lse_out, T* raw, bool compute_raw) {
  const Tuning& tu = tuning();
  constexpr int W = Vec<T>::W;
  PhaseTimer pt;
  Cands<T> cd = prepare_cands(cx, neg);
  pt.mark("fwd candidates");
  const int64_t B = cx.B, Dp = cx.Dp;
  const int64_t RB = std::max<int64_t>(4, tu.row_block);
  const int64_t CB = round_up(std::max<int64_t>(2 * W, tu.col_block), 2 * W);
  const int64_t nblk = (B + RB - 1) / RB;
  // Scores straight into the kept [B][Mp] array, or into a per-thread tile.
  const bool keep = SavedCache::get().accepts(cx.key) &&
                    B * cd.Mp * int64_t(sizeof(T)) <= tu.saved_scores_bytes;
  Buf<T> kept = keep ? make_buf<T>(B * cd.Mp) : Buf<T>();
  at::parallel_for(0, nblk, grain(RB * cd.Mp * cx.D), [&](int64_t i0, int64_t i1) {
    Buf<T> tile = keep ? Buf<T>() : make_buf<T>(RB * CB);
    const int64_t lds = keep ? cd.Mp : CB;
    std::vector<T> lg(CB), m(RB), s(RB), rm(RB), rs(RB);
    for (int64_t blk = i0; blk < i1; ++blk) {
      const int64_t r0 = blk * RB, nr = std::min(RB, B - r0);
      std::fill(m.begin(), m.end(), neg_inf<T>());
      std::fill(s.begin(), s.end(), T(0));
      std::fill(rm.begin(), rm.end(), neg_inf<T>());
      std::fill(rs.begin(), rs.end(), T(0));
      for (int64_t c0 = 0; c0 < cd.Mp; c0 += CB) {
        const int64_t nc = std::min(CB, cd.Mp - c0);
        T* S = keep ? kept.get() + r0 * lds + c0 : tile.get();
        score_tile(cx.uhat + r0 * Dp, Dp, nr, cd.ct.get() + c0 * cx.D, nc, cx.D, S, lds);
        for (int64_t r = 0; r < nr; ++r) {
          const int64_t b = r0 + r;
          tile_logits(cx, cd, b, S + r * lds, c0, nc, cx.beta[b], true, T(0), lg.data());
          lse_update(lg.data(), nc, m[r], s[r]);
          if (compute_raw) {
            tile_logits(cx, cd, b, S + r * lds, c0, nc, T(1), true, T(0), lg.data());
            lse_update(lg.data(), nc, rm[r], rs[r]);
          }
        }
      }
      for (int64_t r = 0; r < nr; ++r) {
        const int64_t b = r0 + r;
        for (int pass = 0; pass < (compute_raw ? 2 : 1); ++pass) {
          T mm = pass == 0 ? m[r] : rm[r];
          T ss = pass == 0 ? s[r] : rs[r];
          const T pl_logit = (pass == 0 ? cx.alpha[b] : T(1)) * cx.spos[b];
          if (cx.include_pos) {
            if (pl_logit > mm) {
              ss = (mm == neg_inf<T>() ? T(0) : ss * std::exp(mm - pl_logit)) + T(1);
              mm = pl_logit;
            } else {
              ss += std::exp(pl_logit - mm);
            }
          }
          const T l = lse_finish(mm, ss);
          const T out = (l == neg_inf<T>()) ? T(0) : l - pl_logit;
          if (pass == 0) {
            lse_out[b] = l;
            loss[b] = out;
          } else {
            raw[b] = out;
          }
        }
      }
    }
  });
  pt.mark("fwd tiles");
  if (keep) {
    auto saved = std::make_shared<SavedTiles<T>>();
    saved->cd = std::move(cd);
    saved->S = std::move(kept);
    saved->rows = cx.rows;
    SavedCache::get().put(cx.key, saved);
  }
}

template <typename T, int NV>
void gemm_backward(Ctx<T>& cx, std::shared_ptr<SavedTiles<T>> saved, const at::Tensor& neg,
                   const T* grad_loss, const T* lse, T* grad_user, T* grad_items, T* grad_alpha,
                   T* grad_beta, bool need_scale) {
  using V = Vec<T>;
  constexpr int W = V::W;
  const Tuning& tu = tuning();
  PhaseTimer pt;
  // the forward's candidates and scores when it kept them, else computed here
  Cands<T> cd = saved != nullptr ? std::move(saved->cd) : prepare_cands(cx, neg);
  const T* kept = saved != nullptr ? saved->S.get() : nullptr;
  RowGrad<T> rg = row_grad(cx, grad_loss, lse);
  pt.mark(saved != nullptr ? "bwd candidates (saved)" : "bwd candidates");
  const int64_t B = cx.B, D = cx.D, Dp = cx.Dp, N = cx.N, Mc = cd.Mc;
  const int64_t RB = std::max<int64_t>(4, tu.row_block);
  const int64_t CB = round_up(std::max<int64_t>(2 * W, tu.col_block), 2 * W);
  const int64_t nblk = (B + RB - 1) / RB;
  const int64_t per = Mc * Dp * int64_t(sizeof(T));
  int64_t G = std::min<int64_t>({tu.max_groups, nblk, std::max<int64_t>(1, tu.partial_bytes / per)});
  G = std::max<int64_t>(G, 1);
  Buf<T> gc_parts = make_buf<T>(G * Mc * Dp);
  Buf<T> gu = make_zero_buf<T>(B * Dp);
  std::vector<T> q(B, T(0));

  at::parallel_for(0, G, grain(3 * B * cd.Mp * Dp / G), [&](int64_t g0, int64_t g1) {
    Buf<T> tile = kept != nullptr ? Buf<T>() : make_buf<T>(RB * CB);
    const int64_t lds = kept != nullptr ? cd.Mp : CB;
    Buf<T> dS = make_buf<T>(RB * CB);
    for (int64_t g = g0; g < g1; ++g) {
      T* gc = gc_parts.get() + g * Mc * Dp;
      std::memset(gc, 0, sizeof(T) * Mc * Dp);
      for (int64_t blk = nblk * g / G; blk < nblk * (g + 1) / G; ++blk) {
        const int64_t r0 = blk * RB, nr = std::min(RB, B - r0);
        for (int64_t c0 = 0; c0 < cd.Mp; c0 += CB) {
          const int64_t nc = std::min(CB, cd.Mp - c0);
          const int64_t ncv = std::min(nc, Mc - c0);  // valid columns
          const T* S = kept != nullptr ? kept + r0 * lds + c0 : tile.get();
          if (kept == nullptr) score_tile(cx.uhat + r0 * Dp, Dp, nr, cd.ct.get() + c0 * cx.D, nc, D, tile.get(), CB);
          for (int64_t r = 0; r < nr; ++r) {
            const int64_t b = r0 + r;
            T* d = dS.get() + r * CB;
            if (rg.g[b] == T(0)) {
              std::fill(d, d + nc, T(0));
              continue;
            }
            const T* s = S + r * lds;
            tile_logits(cx, cd, b, s, c0, nc, cx.beta[b], true, lse[b], d);
            const typename V::R vg = V::set1(rg.g[b] * cx.beta[b]);
            T qs = T(0);
            for (int64_t c = 0; c < nc; c += W) {
              const typename V::R pk = V::exp(V::load(d + c));
              if (need_scale) {
                alignas(64) T tmp[W];
                V::store(tmp, pk);
                for (int i = 0; i < W; ++i) qs += tmp[i] * s[c + i];
              }
              V::store(d + c, V::mul(vg, pk));
            }
            q[b] += qs;
          }
          // dU[rows] += dS·C[cols];  dC[cols] += dSᵀ·Û[rows]
          tile_gemm(gu.get() + r0 * Dp, Dp, dS.get(), CB, 1, cd.chat.get() + c0 * Dp, Dp, nr, ncv, Dp, true);
          tile_gemm(gc + c0 * Dp, Dp, dS.get(), 1, CB, cx.uhat + r0 * Dp, Dp, ncv, nr, Dp, true);
        }
      }
    }
  });

  pt.mark("bwd tiles");
  // Candidate gradients: merge the group partials (group order), scatter to items in
  // candidate order, add the positives' terms in row order, then the normalization.
  at::parallel_for(0, Mc, grain(G * Dp), [&](int64_t m0, int64_t m1) {
    for (int64_t m = m0; m < m1; ++m) {
      T* dst = gc_parts.get() + m * Dp;
      for (int64_t g = 1; g < G; ++g) {
        const T* src = gc_parts.get() + (g * Mc + m) * Dp;
        for (int64_t i = 0; i < Dp; ++i) dst[i] += src[i];
      }
    }
  });
  pt.mark("bwd merge");
  at::parallel_for(0, N, grain(D), [&](int64_t n0, int64_t n1) {
    std::memset(grad_items + n0 * D, 0, sizeof(T) * (n1 - n0) * D);
  });
  pt.mark("bwd zero items");
  std::vector<int32_t> touched;
  touched.reserve(Mc + B);
  std::vector<uint8_t> seen(N, 0);
  for (int64_t m = 0; m < Mc; ++m) {
    const int32_t it = cd.idx[m];
    T* out = grad_items + int64_t(it) * D;
    const T* src = gc_parts.get() + m * Dp;
    for (int64_t i = 0; i < D; ++i) out[i] += src[i];
    if (!seen[it]) { seen[it] = 1; touched.push_back(it); }
  }
  for (int64_t b = 0; b < B; ++b) {
    const int32_t it = cx.pos[b];
    const T dp = rg.dpos[b];
    T* out = grad_items + int64_t(it) * D;
    const T* u = cx.uhat + b * Dp;
    for (int64_t i = 0; i < D; ++i) out[i] += dp * u[i];
    if (!seen[it]) { seen[it] = 1; touched.push_back(it); }
  }
  pt.mark("bwd scatter");
  if (cx.normalize) {
    // (rows scattered over the table: each costs memory latency more than arithmetic)
    at::parallel_for(0, static_cast<int64_t>(touched.size()), grain(64 * D), [&](int64_t t0, int64_t t1) {
      std::vector<T> xh(Dp), gg(Dp, T(0));
      for (int64_t t = t0; t < t1; ++t) {
        const int64_t it = touched[t];
        const T nrm = load_row(xh.data(), cx.items + it * D, D, Dp, true);
        T* out = grad_items + it * D;
        std::copy(out, out + D, gg.begin());
        normalize_backward(out, gg.data(), xh.data(), nrm, D, true);
      }
    });
  }
  pt.mark("bwd normalize");
  finish_rows(cx, rg, 0, B, gu.get(), 1, q.data(), grad_user, grad_alpha, grad_beta, need_scale);
  pt.mark("bwd rows");
}

// ================================================================= dispatch and glue
template <typename T>
int64_t choose_nv(int64_t D) {
  constexpr int W = Vec<T>::W;
  const int64_t need = (D + W - 1) / W;
  if (W == 1) return 0;
  for (int64_t nv : {1, 2, 4, 8, 16})
    if (need <= nv) return nv;
  return 0;
}

template <typename T>
int64_t padded_dim(int64_t D) {
  constexpr int W = Vec<T>::W;
  const int64_t nv = choose_nv<T>(D);
  return nv > 0 ? nv * W : round_up(D, W);
}

template <typename T, typename F>
void with_nv(int64_t D, F&& f) {
  switch (choose_nv<T>(D)) {
    case 1: f(std::integral_constant<int, 1>()); break;
    case 2: f(std::integral_constant<int, 2>()); break;
    case 4: f(std::integral_constant<int, 4>()); break;
    case 8: f(std::integral_constant<int, 8>()); break;
    case 16: f(std::integral_constant<int, 16>()); break;
    default: f(std::integral_constant<int, 0>()); break;
  }
}

struct Inputs {
  at::Tensor user, items, pos, neg, alpha, beta, logq;
  at::ScalarType in_dtype, acc_dtype;
  int64_t B, N, D, M;
};

// Raises the ValueError of Python's finiteness check (adaptau/loss/ops.py, which leaves
// the scales and neg_logq to this backend) when t (contiguous, float or double) has a NaN
// or an infinity, or (scales: limit = kMaxInverseTemperature) a value beyond +-limit. The
// scan has no early exit (it vectorizes); the message names the first offender.
template <typename T>
void check_finite_values(const at::Tensor& t, const char* name, double limit) {
  const T* p = t.data_ptr<T>();
  const int64_t n = t.numel();
  const T bound = limit < double(std::numeric_limits<T>::max()) ? T(limit) : std::numeric_limits<T>::max();
  int bad = 0;
  for (int64_t i = 0; i < n; ++i) bad |= !(std::abs(p[i]) <= bound);
  if (!bad) return;
  for (int64_t i = 0; i < n; ++i) {
    if (std::abs(p[i]) <= bound) continue;
    if (!std::isfinite(p[i])) {
      const char* v = std::isnan(p[i]) ? "nan" : (p[i] > 0 ? "inf" : "-inf");
      TORCH_CHECK_VALUE(false, name, " must be finite; ", name, "[", i, "] = ", v);
    }
    TORCH_CHECK_VALUE(false, name, " must be an inverse temperature with |value| <= ", limit, "; ", name,
                      "[", i, "] = ", double(p[i]));
  }
}

void check_finite(const at::Tensor& t, const char* name, double limit = std::numeric_limits<double>::max()) {
  if (t.scalar_type() == at::kDouble)
    check_finite_values<double>(t, name, limit);
  else
    check_finite_values<float>(t, name, limit);
}

Inputs check_inputs(const at::Tensor& user, const at::Tensor& items, const at::Tensor& pos,
                    const at::Tensor& neg, const at::Tensor& pos_scale, const at::Tensor& neg_scale,
                    const std::optional<at::Tensor>& neg_logq, int64_t neg_mode) {
  TORCH_CHECK(user.device().is_cpu() && items.device().is_cpu() && pos.device().is_cpu() &&
                  neg.device().is_cpu() && pos_scale.device().is_cpu() && neg_scale.device().is_cpu(),
              "adaptau cpu: every tensor must be on the CPU");
  TORCH_CHECK(user.dim() == 2 && items.dim() == 2, "adaptau cpu: user and items must be 2-D, got ",
              user.sizes(), " and ", items.sizes());
  TORCH_CHECK(user.scalar_type() == items.scalar_type(), "adaptau cpu: user is ", user.scalar_type(),
              " but items is ", items.scalar_type());
  const auto dt = user.scalar_type();
  TORCH_CHECK(dt == at::kFloat || dt == at::kDouble || dt == at::kHalf || dt == at::kBFloat16,
              "adaptau cpu: user/items must be float16, bfloat16, float32 or float64, got ", dt);
  Inputs in;
  in.in_dtype = dt;
  in.acc_dtype = dt == at::kDouble ? at::kDouble : at::kFloat;
  in.B = user.size(0);
  in.D = user.size(1);
  in.N = items.size(0);
  TORCH_CHECK(in.B >= 1 && in.D >= 1 && in.N >= 1 && items.size(1) == in.D,
              "adaptau cpu: need user [B>=1, D>=1] and items [N>=1, D], got ", user.sizes(), " and ",
              items.sizes());
  TORCH_CHECK(in.N < (int64_t(1) << 31) - 1, "adaptau cpu: the item table has too many rows for int32 indexing");
  TORCH_CHECK(pos.dim() == 1 && pos.size(0) == in.B, "adaptau cpu: pos must be [B=", in.B, "], got ", pos.sizes());
  TORCH_CHECK(pos.scalar_type() == at::kLong || pos.scalar_type() == at::kInt,
              "adaptau cpu: pos must be int32 or int64, got ", pos.scalar_type());
  TORCH_CHECK(neg.scalar_type() == at::kLong || neg.scalar_type() == at::kInt,
              "adaptau cpu: neg must be int32 or int64, got ", neg.scalar_type());
  if (neg_mode == kNegPerRow) {
    TORCH_CHECK(neg.dim() == 2 && neg.size(0) == in.B && neg.size(1) >= 1,
                "adaptau cpu: per-row neg must be [B=", in.B, ", M>=1], got ", neg.sizes());
    in.M = neg.size(1);
    TORCH_CHECK(in.B * in.M < (int64_t(1) << 31) - 1,
                "adaptau cpu: B*M = ", in.B * in.M, " pairs is too many for one call; split the batch");
  } else if (neg_mode == kNegShared) {
    TORCH_CHECK(neg.dim() == 1 && neg.size(0) >= 1, "adaptau cpu: shared neg must be [M>=1], got ", neg.sizes());
    in.M = neg.size(0);
  } else if (neg_mode == kNegInBatch) {
    TORCH_CHECK(in.B >= 2, "adaptau cpu: in-batch negatives need B >= 2");
    in.M = in.B - 1;
  } else {
    TORCH_CHECK(false, "adaptau cpu: unknown neg_mode ", neg_mode);
  }
  TORCH_CHECK(pos_scale.dim() == 1 && pos_scale.size(0) == in.B && neg_scale.dim() == 1 &&
                  neg_scale.size(0) == in.B,
              "adaptau cpu: pos_scale and neg_scale must be [B=", in.B, "], got ", pos_scale.sizes(),
              " and ", neg_scale.sizes());
  TORCH_CHECK(pos_scale.is_floating_point() && neg_scale.is_floating_point(),
              "adaptau cpu: scales must be floating tensors");
  in.user = user.to(in.acc_dtype).contiguous();
  in.items = items.to(in.acc_dtype).contiguous();
  in.pos = pos.contiguous();
  in.neg = neg.contiguous();
  in.alpha = pos_scale.to(in.acc_dtype).contiguous();
  in.beta = neg_scale.to(in.acc_dtype).contiguous();
  check_finite(in.alpha, "pos_scale", kMaxInverseTemperature);
  check_finite(in.beta, "neg_scale", kMaxInverseTemperature);
  if (neg_logq.has_value() && neg_logq->defined()) {
    const at::Tensor& lq = *neg_logq;
    TORCH_CHECK(lq.device().is_cpu() && lq.dim() == 1 && lq.size(0) == in.N && lq.is_floating_point(),
                "adaptau cpu: neg_logq must be a floating [N=", in.N, "] CPU tensor, got ", lq.sizes());
    in.logq = lq.to(in.acc_dtype).contiguous();
    check_finite(in.logq, "neg_logq");
  }
  return in;
}

// The key of a call: its input tensors as the op received them (data pointer and version
// counter; inference tensors have no version counter, so their calls are not cached) and
// the options.
SavedKey call_key(std::initializer_list<const at::Tensor*> tensors, std::vector<int64_t> opts) {
  SavedKey k;
  for (const at::Tensor* t : tensors) {
    if (t == nullptr || !t->defined()) {
      k.ids.emplace_back(nullptr, -1);
      continue;
    }
    if (t->is_inference()) k.valid = false;
    k.ids.emplace_back(t->data_ptr(), k.valid ? int64_t(t->_version()) : int64_t(-1));
    for (int64_t d = 0; d < t->dim(); ++d) opts.push_back(t->size(d));
    opts.push_back(static_cast<int64_t>(t->scalar_type()));
  }
  k.opts = std::move(opts);
  return k;
}

// The key of a fused_forward / fused_backward call on these inputs and options (the same
// for a forward and the backward of the same call).
SavedKey op_key(const at::Tensor& user, const at::Tensor& items, const at::Tensor& pos,
                const at::Tensor& neg, const at::Tensor& pos_scale, const at::Tensor& neg_scale,
                const std::optional<at::Tensor>& neg_logq, int64_t neg_mode, bool include_pos,
                bool normalize, bool remove_hits) {
  return call_key({&user, &items, &pos, &neg, &pos_scale, &neg_scale, neg_logq ? &*neg_logq : nullptr},
                  {neg_mode, include_pos, normalize, remove_hits});
}

template <typename T>
Ctx<T> make_ctx(const Inputs& in, int64_t neg_mode, bool include_pos, bool normalize, bool remove_hits,
                std::shared_ptr<const PreparedRows<T>> kept = nullptr) {
  Ctx<T> cx;
  cx.B = in.B;
  cx.N = in.N;
  cx.D = in.D;
  cx.M = in.M;
  cx.Dp = padded_dim<T>(in.D);
  cx.neg_mode = neg_mode;
  cx.include_pos = include_pos;
  cx.normalize = normalize;
  cx.remove_hits = remove_hits;
  cx.user = in.user.data_ptr<T>();
  cx.items = in.items.data_ptr<T>();
  cx.alpha = in.alpha.data_ptr<T>();
  cx.beta = in.beta.data_ptr<T>();
  cx.logq = in.logq.defined() ? in.logq.data_ptr<T>() : nullptr;
  cx.neg = in.neg.data_ptr();
  cx.neg_is_int64 = in.neg.scalar_type() == at::kLong;
  prepare_rows(cx, in.pos, std::move(kept));
  return cx;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> fused_forward_cpu(
    const at::Tensor& user, const at::Tensor& items, const at::Tensor& pos, const at::Tensor& neg,
    const at::Tensor& pos_scale, const at::Tensor& neg_scale, const std::optional<at::Tensor>& neg_logq,
    int64_t neg_mode, bool include_pos, bool normalize, bool remove_hits, bool compute_raw) {
  Inputs in = check_inputs(user, items, pos, neg, pos_scale, neg_scale, neg_logq, neg_mode);
  auto opts = in.user.options();
  at::Tensor loss = at::empty({in.B}, opts);
  at::Tensor lse = at::empty({in.B}, opts);
  at::Tensor raw = at::empty({compute_raw ? in.B : 0}, opts);
  AT_DISPATCH_FLOATING_TYPES(in.user.scalar_type(), "adaptau_fused_forward_cpu", [&] {
    using T = scalar_t;
    PhaseTimer pt;
    Ctx<T> cx = make_ctx<T>(in, neg_mode, include_pos, normalize, remove_hits);
    cx.key = op_key(user, items, pos, neg, pos_scale, neg_scale, neg_logq, neg_mode, include_pos,
                    normalize, remove_hits);
    pt.mark("prepare rows");
    T* rawp = compute_raw ? raw.data_ptr<T>() : nullptr;
    with_nv<T>(in.D, [&](auto nvc) {
      constexpr int NV = decltype(nvc)::value;
      if (neg_mode == kNegPerRow)
        per_row_forward<T, NV>(cx, loss.data_ptr<T>(), lse.data_ptr<T>(), rawp, compute_raw);
      else
        gemm_forward<T, NV>(cx, in.neg, loss.data_ptr<T>(), lse.data_ptr<T>(), rawp, compute_raw);
    });
  });
  return {loss, lse, raw};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> fused_backward_cpu(
    const at::Tensor& grad_loss, const at::Tensor& user, const at::Tensor& items, const at::Tensor& pos,
    const at::Tensor& neg, const at::Tensor& pos_scale, const at::Tensor& neg_scale,
    const std::optional<at::Tensor>& neg_logq, const at::Tensor& lse, int64_t neg_mode, bool include_pos,
    bool normalize, bool remove_hits, bool need_scale_grads) {
  Inputs in = check_inputs(user, items, pos, neg, pos_scale, neg_scale, neg_logq, neg_mode);
  TORCH_CHECK(grad_loss.dim() == 1 && grad_loss.size(0) == in.B && lse.dim() == 1 && lse.size(0) == in.B,
              "adaptau cpu: grad_loss and lse must be [B=", in.B, "], got ", grad_loss.sizes(), " and ",
              lse.sizes());
  at::Tensor gl = grad_loss.to(in.acc_dtype).contiguous();
  at::Tensor ls = lse.to(in.acc_dtype).contiguous();
  auto opts = in.user.options();
  at::Tensor grad_user = at::empty({in.B, in.D}, opts);
  at::Tensor grad_items = pooled_empty(in.N, in.D, opts);
  at::Tensor grad_alpha = at::empty({in.B}, opts);
  at::Tensor grad_beta = at::empty({in.B}, opts);
  AT_DISPATCH_FLOATING_TYPES(in.user.scalar_type(), "adaptau_fused_backward_cpu", [&] {
    using T = scalar_t;
    PhaseTimer pt;
    // What the forward of the same call kept (the key holds neg_mode, so the type is known):
    // per-row mode its plan, state and prepared rows; GEMM modes their candidates, scores
    // and prepared rows.
    const SavedKey key = op_key(user, items, pos, neg, pos_scale, neg_scale, neg_logq, neg_mode,
                                include_pos, normalize, remove_hits);
    std::shared_ptr<void> found = SavedCache::get().take(key);
    std::shared_ptr<Saved<T>> saved;
    std::shared_ptr<SavedTiles<T>> tiles;
    std::shared_ptr<const PreparedRows<T>> rows;
    if (found != nullptr && neg_mode == kNegPerRow) {
      saved = std::static_pointer_cast<Saved<T>>(found);
      rows = saved->rows;
    } else if (found != nullptr) {
      tiles = std::static_pointer_cast<SavedTiles<T>>(found);
      rows = tiles->rows;
    }
    Ctx<T> cx = make_ctx<T>(in, neg_mode, include_pos, normalize, remove_hits, rows);
    pt.mark(rows != nullptr ? "prepare rows (saved)" : "prepare rows");
    with_nv<T>(in.D, [&](auto nvc) {
      constexpr int NV = decltype(nvc)::value;
      if (neg_mode == kNegPerRow)
        per_row_backward<T, NV>(cx, saved, gl.data_ptr<T>(), ls.data_ptr<T>(), grad_user.data_ptr<T>(),
                                grad_items.data_ptr<T>(), grad_alpha.data_ptr<T>(), grad_beta.data_ptr<T>(),
                                need_scale_grads);
      else
        gemm_backward<T, NV>(cx, tiles, in.neg, gl.data_ptr<T>(), ls.data_ptr<T>(), grad_user.data_ptr<T>(),
                             grad_items.data_ptr<T>(), grad_alpha.data_ptr<T>(), grad_beta.data_ptr<T>(),
                             need_scale_grads);
    });
  });
  if (in.in_dtype != in.acc_dtype) {
    grad_user = grad_user.to(in.in_dtype);
    grad_items = grad_items.to(in.in_dtype);
  }
  return {grad_user, grad_items, grad_alpha, grad_beta};
}

}  // namespace
}  // namespace cpu
}  // namespace adaptau

TORCH_LIBRARY_IMPL(adaptau, CPU, m) {
  m.impl("fused_forward", &adaptau::cpu::fused_forward_cpu);
  m.impl("fused_backward", &adaptau::cpu::fused_backward_cpu);
}
