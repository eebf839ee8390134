// adaptau fused sampled-softmax loss: the CPU backend (forward and backward).
//
// Implements torch.ops.adaptau.fused_forward / fused_backward for CPU tensors with the
// contract written in adaptau/ops.py. Nothing of size [B, M, D] is ever built.
//
// Per-row negatives (neg_mode 0). The B×M (row, item) pairs are counting-sorted by
// (item chunk, row, m); a chunk is a power-of-two range of item rows whose normalized
// copy (backward: and its gradient accumulator) fits in L2 (ADAPTAU_CPU_CHUNK_BYTES,
// 128 KiB). Gathering a 256-byte row from L2 costs ~4.5 ns against 15-19 ns from L3 on
// the Zen 3 machine this was tuned on, and the sort lets one thread own each chunk.
//   forward : sort; chunk pass (parallel over chunks): normalize each referenced table
//             row once, dot product of every pair with the user vector held in
//             registers across the row's run, written to the pair's slot; row pass
//             (parallel over rows): logits and log-sum-exp over the row's slots.
//   backward: the forward's sort is reused (same neg tensor and version; see PlanCache);
//             chunk pass over G groups of chunks: recompute the scores, P = exp(logit -
//             lse), d = g·β·P, accumulate d·û into the chunk's item-gradient rows (owned
//             by the thread: no atomics, no per-thread [N, D] copies) and d·î into the
//             group's user-gradient partial; apply the normalization's Jacobian to the
//             chunk's rows; then merge the G user partials per row in group order.
// Shared (neg_mode 1) and in-batch (neg_mode 2) negatives: every row sees the same
// candidates, so scores are blocked matrix products (register-tiled micro-kernel over
// packed candidate panels) with a running max; the backward recomputes each tile and
// accumulates candidate gradients per group of row blocks, merged in group order.
//
// Numerics: accumulation in float32 for float16/bfloat16/float32 inputs (the first two
// are upcast on entry and their gradients cast back) and float64 for float64; running-max
// log-sum-exp. Determinism: G and every other partition depend on the problem only, never
// on the thread count, and every sum has a fixed order, so results are bitwise identical
// run to run and across thread counts (tests/test_cpu_backend.py checks 1, 2, 3 threads).
// The backward's grouped passes use at most G = ADAPTAU_CPU_GROUPS (8) threads.
// ADAPTAU_CPU_PROFILE=1 prints per-phase times to stderr.
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

#include "cpu_simd.h"

#include <chrono>
#include <cstdio>
#include <ctime>

namespace adaptau {
namespace cpu {
namespace {

constexpr int64_t kNegPerRow = 0, kNegShared = 1, kNegInBatch = 2;

// ------------------------------------------------------------------------------ tuning
int64_t env_int(const char* name, int64_t fallback) {
  const char* s = std::getenv(name);
  if (s == nullptr || *s == '\0') return fallback;
  char* end = nullptr;
  long long v = std::strtoll(s, &end, 10);
  return (end != s && v > 0) ? static_cast<int64_t>(v) : fallback;
}

struct Tuning {
  int64_t chunk_bytes;      // normalized item rows per chunk (backward: + an accumulator as big)
  int64_t max_groups;       // upper bound on G (partial buffers merged in a fixed order)
  int64_t partial_bytes;    // memory cap for the G partial buffers
  int64_t row_block;        // GEMM modes: rows per block
  int64_t col_block;        // GEMM modes: candidates per block
  int64_t max_pairs;        // per-row backward: (row, negative) pairs per row block
};

const Tuning& tuning() {
  static const Tuning t{
      env_int("ADAPTAU_CPU_CHUNK_BYTES", 128 << 10),
      env_int("ADAPTAU_CPU_GROUPS", 8),
      env_int("ADAPTAU_CPU_PARTIAL_BYTES", 32 << 20),
      env_int("ADAPTAU_CPU_ROW_BLOCK", 64),
      env_int("ADAPTAU_CPU_COL_BLOCK", 256),
      env_int("ADAPTAU_CPU_MAX_PAIRS", int64_t(1) << 21),
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
    if (enabled_ && bytes >= kMinPooled) {
      std::lock_guard<std::mutex> lock(mu_);
      auto it = free_.lower_bound(bytes);
      if (it != free_.end() && it->first <= 2 * bytes) {
        got = it->first;
        void* p = it->second;
        idle_ -= got;
        free_.erase(it);
        return p;
      }
    }
    got = bytes;
    void* p = std::aligned_alloc(64, round_up64(bytes));
    TORCH_CHECK(p != nullptr, "adaptau cpu: out of memory allocating ", bytes, " bytes of scratch");
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
  return T(1e-12);
}

// --------------------------------------------------------------------- small vector ops
// <a, b> over n unpadded elements, fixed association order.
template <typename T>
inline T dot_plain(const T* a, const T* b, int64_t n) {
  using V = Vec<T>;
  constexpr int W = V::W;
  typename V::R acc = V::zero();
  int64_t i = 0;
  for (; i + W <= n; i += W) acc = V::fma(V::load(a + i), V::load(b + i), acc);
  T s = V::hsum(acc);
  for (; i < n; ++i) s += a[i] * b[i];
  return s;
}

// out[0:D] = x[0:D] * scale, out[D:Dp] = 0. Returns nothing.
template <typename T>
inline void scale_pad(T* out, const T* x, T scale, int64_t D, int64_t Dp) {
  for (int64_t i = 0; i < D; ++i) out[i] = x[i] * scale;
  for (int64_t i = D; i < Dp; ++i) out[i] = T(0);
}

// Writes the normalized (or copied) row into out (padded) and returns the raw norm.
template <typename T>
inline T load_row(T* out, const T* x, int64_t D, int64_t Dp, bool normalize) {
  if (!normalize) {
    scale_pad(out, x, T(1), D, Dp);
    return T(1);
  }
  const T norm = std::sqrt(dot_plain(x, x, D));
  scale_pad(out, x, T(1) / std::max(norm, norm_eps<T>()), D, Dp);
  return norm;
}

// Gradient through x -> x / max(||x||, eps): out = (g - xh <xh, g>) / max(norm, eps)
// (norm > eps) or g / eps. xh and g are padded (zeros past D); out has D elements.
template <typename T>
inline void normalize_backward(T* out, const T* g, const T* xh, T norm, int64_t D, bool normalize) {
  if (!normalize) {
    for (int64_t i = 0; i < D; ++i) out[i] = g[i];
    return;
  }
  if (norm > norm_eps<T>()) {
    const T proj = dot_plain(xh, g, D);
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

  // out[k] = <u, rows + idx[k]*Dp>, k < n.
  static inline void dots(const T* __restrict__ u, const T* __restrict__ rows,
                          const int32_t* __restrict__ idx, int64_t base, int64_t n,
                          int64_t Dp, T* __restrict__ out) {
    if constexpr (NV > 0) {
      R uu[NV];
      for (int v = 0; v < NV; ++v) uu[v] = V::load(u + v * W);
      int64_t k = 0;
      for (; k + 4 <= n; k += 4) {
        const T* r0 = rows + (int64_t(idx[k]) - base) * Dp;
        const T* r1 = rows + (int64_t(idx[k + 1]) - base) * Dp;
        const T* r2 = rows + (int64_t(idx[k + 2]) - base) * Dp;
        const T* r3 = rows + (int64_t(idx[k + 3]) - base) * Dp;
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
        const T* r0 = rows + (int64_t(idx[k]) - base) * Dp;
        R a0 = V::mul(uu[0], V::load(r0));
        for (int v = 1; v < NV; ++v) a0 = V::fma(uu[v], V::load(r0 + v * W), a0);
        out[k] = V::hsum(a0);
      }
    } else {
      const int64_t nv = Dp / W;
      for (int64_t k = 0; k < n; ++k) {
        const T* r0 = rows + (int64_t(idx[k]) - base) * Dp;
        R a0 = V::mul(V::load(u), V::load(r0));
        for (int64_t v = 1; v < nv; ++v) a0 = V::fma(V::load(u + v * W), V::load(r0 + v * W), a0);
        out[k] = V::hsum(a0);
      }
    }
  }

  // gu += sum_k d[k] * rows[idx[k]];  acc[idx[k]] += d[k] * u.  (Two loops: each keeps its
  // running vector in registers.)
  static inline void grads(const T* __restrict__ u, const T* __restrict__ rows,
                           T* __restrict__ acc, const int32_t* __restrict__ idx, int64_t base,
                           const T* __restrict__ d, int64_t n, int64_t Dp, T* __restrict__ gu) {
    if constexpr (NV > 0 && NV <= 8) {
      R g[NV];
      for (int v = 0; v < NV; ++v) g[v] = V::load(gu + v * W);
      for (int64_t k = 0; k < n; ++k) {
        const R dk = V::set1(d[k]);
        const T* r = rows + (int64_t(idx[k]) - base) * Dp;
        for (int v = 0; v < NV; ++v) g[v] = V::fma(dk, V::load(r + v * W), g[v]);
      }
      for (int v = 0; v < NV; ++v) V::store(gu + v * W, g[v]);
      R uu[NV];
      for (int v = 0; v < NV; ++v) uu[v] = V::load(u + v * W);
      for (int64_t k = 0; k < n; ++k) {
        const R dk = V::set1(d[k]);
        T* a = acc + (int64_t(idx[k]) - base) * Dp;
        for (int v = 0; v < NV; ++v) V::store(a + v * W, V::fma(dk, uu[v], V::load(a + v * W)));
      }
    } else {
      const int64_t nv = Dp / W;
      for (int64_t k = 0; k < n; ++k) {
        const R dk = V::set1(d[k]);
        const T* r = rows + (int64_t(idx[k]) - base) * Dp;
        T* a = acc + (int64_t(idx[k]) - base) * Dp;
        for (int64_t v = 0; v < nv; ++v) {
          V::store(gu + v * W, V::fma(dk, V::load(r + v * W), V::load(gu + v * W)));
          V::store(a + v * W, V::fma(dk, V::load(u + v * W), V::load(a + v * W)));
        }
      }
    }
  }

  // out += sum_k coef[k] * rows[k*stride]  (k < n), out padded to Dp.
  static inline void axpy_rows(T* __restrict__ out, const T* __restrict__ coef,
                               const T* __restrict__ rows, int64_t stride, int64_t n, int64_t Dp) {
    if constexpr (NV > 0 && NV <= 8) {
      R g[NV];
      for (int v = 0; v < NV; ++v) g[v] = V::load(out + v * W);
      for (int64_t k = 0; k < n; ++k) {
        const R c = V::set1(coef[k]);
        const T* r = rows + k * stride;
        for (int v = 0; v < NV; ++v) g[v] = V::fma(c, V::load(r + v * W), g[v]);
      }
      for (int v = 0; v < NV; ++v) V::store(out + v * W, g[v]);
    } else {
      const int64_t nv = Dp / W;
      for (int64_t v0 = 0; v0 < nv; v0 += 8) {  // segments of up to 8 vectors in registers
        const int64_t nseg = std::min<int64_t>(8, nv - v0);
        R g[8];
        for (int64_t v = 0; v < nseg; ++v) g[v] = V::load(out + (v0 + v) * W);
        for (int64_t k = 0; k < n; ++k) {
          const R c = V::set1(coef[k]);
          const T* r = rows + k * stride + v0 * W;
          for (int64_t v = 0; v < nseg; ++v) g[v] = V::fma(c, V::load(r + v * W), g[v]);
        }
        for (int64_t v = 0; v < nseg; ++v) V::store(out + (v0 + v) * W, g[v]);
      }
    }
  }
};

// -------------------------------------------------------------------- GEMM micro-kernel
// S[r*lds + c] = sum_d U[r*ldu + d] * C[c][d] for r < nr, c < nc (nc multiple of 2W), with
// the candidates packed in panels of 2W columns: C[c][d] = CT[(c/2W)*D*2W + d*2W + c%2W]
// (contiguous per panel: no cache-set aliasing however many candidates there are).
template <typename T>
void score_tile(const T* __restrict__ U, int64_t ldu, int64_t nr, const T* __restrict__ CT,
                int64_t nc, int64_t D, T* __restrict__ S, int64_t lds) {
  using V = Vec<T>;
  using R = typename V::R;
  constexpr int W = V::W;
  for (int64_t c = 0; c < nc; c += 2 * W) {
    for (int64_t r = 0; r < nr; r += 4) {
      const T* u0 = U + std::min(r, nr - 1) * ldu;
      const T* u1 = U + std::min(r + 1, nr - 1) * ldu;
      const T* u2 = U + std::min(r + 2, nr - 1) * ldu;
      const T* u3 = U + std::min(r + 3, nr - 1) * ldu;
      R a00 = V::zero(), a01 = V::zero(), a10 = V::zero(), a11 = V::zero();
      R a20 = V::zero(), a21 = V::zero(), a30 = V::zero(), a31 = V::zero();
      const T* ct = CT + (c / (2 * W)) * D * 2 * W;
      for (int64_t d = 0; d < D; ++d, ct += 2 * W) {
        const R b0 = V::load(ct), b1 = V::load(ct + W);
        R x = V::set1(u0[d]);
        a00 = V::fma(x, b0, a00); a01 = V::fma(x, b1, a01);
        x = V::set1(u1[d]);
        a10 = V::fma(x, b0, a10); a11 = V::fma(x, b1, a11);
        x = V::set1(u2[d]);
        a20 = V::fma(x, b0, a20); a21 = V::fma(x, b1, a21);
        x = V::set1(u3[d]);
        a30 = V::fma(x, b0, a30); a31 = V::fma(x, b1, a31);
      }
      T* s = S + r * lds + c;
      V::store(s, a00); V::store(s + W, a01);
      if (r + 1 < nr) { V::store(s + lds, a10); V::store(s + lds + W, a11); }
      if (r + 2 < nr) { V::store(s + 2 * lds, a20); V::store(s + 2 * lds + W, a21); }
      if (r + 3 < nr) { V::store(s + 3 * lds, a30); V::store(s + 3 * lds + W, a31); }
    }
  }
}

// ------------------------------------------------------------------------- context
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
  int64_t neg_version = -1;
  // derived
  std::vector<int32_t> pos;  // [B]
  Buf<T> uhat;               // [B][Dp] normalized user rows, zero padded
  std::vector<T> unorm;      // [B]
  std::vector<T> spos;       // [B] positive scores ŝ(b, pos[b])
};

template <typename I>
bool copy_indices(const I* src, int64_t n, int64_t N, int32_t* dst) {
  bool ok = true;
  for (int64_t i = 0; i < n; ++i) {
    const I v = src[i];
    ok &= (v >= 0) & (v < N);
    dst[i] = static_cast<int32_t>(v);
  }
  return ok;
}

std::vector<int32_t> indices_to_i32(const at::Tensor& t, int64_t N, const char* name) {
  std::vector<int32_t> out(t.numel());
  bool ok = t.scalar_type() == at::kLong
                ? copy_indices(t.data_ptr<int64_t>(), t.numel(), N, out.data())
                : copy_indices(t.data_ptr<int32_t>(), t.numel(), N, out.data());
  TORCH_CHECK(ok, "adaptau cpu: an index in ", name, " is outside [0, ", N, ")");
  return out;
}

// Normalized user rows and positive scores (both modes).
template <typename T>
void prepare_rows(Ctx<T>& cx) {
  const int64_t B = cx.B, D = cx.D, Dp = cx.Dp;
  cx.uhat = make_buf<T>(B * Dp);
  cx.unorm.assign(B, T(0));
  cx.spos.assign(B, T(0));
  at::parallel_for(0, B, grain(4 * cx.D), [&](int64_t b0, int64_t b1) {
    for (int64_t b = b0; b < b1; ++b) {
      T* uh = cx.uhat.get() + b * Dp;
      cx.unorm[b] = load_row(uh, cx.user + b * D, D, Dp, cx.normalize);
      const T* xp = cx.items + int64_t(cx.pos[b]) * D;
      T s = dot_plain(uh, xp, D);
      if (cx.normalize) s *= T(1) / std::max(std::sqrt(dot_plain(xp, xp, D)), norm_eps<T>());
      cx.spos[b] = s;
    }
  });
}

// ======================================================================= per-row mode
// The B×M (row, item) pairs are counting-sorted by (item chunk, row): a chunk is a
// power-of-two range of item rows whose normalized copy (and, in backward, gradient
// accumulator) fits in L2. Gathering 256-byte rows from L2 is ~4x cheaper than from L3
// on the machines measured, and it lets one thread own each chunk's item gradients.

// li[k] = neg[off + k] (k < n) as int32; false if one is outside [0, N) (replaced by 0).
inline bool load_idx(const void* neg, bool is64, int64_t off, int64_t n, int64_t N, int32_t* li) {
  bool ok = true;
  if (is64) {
    const int64_t* p = static_cast<const int64_t*>(neg) + off;
    for (int64_t k = 0; k < n; ++k) {
      const int64_t v = p[k];
      const bool in = (v >= 0) & (v < N);
      ok &= in;
      li[k] = in ? static_cast<int32_t>(v) : 0;
    }
  } else {
    const int32_t* p = static_cast<const int32_t*>(neg) + off;
    for (int64_t k = 0; k < n; ++k) {
      const int32_t v = p[k];
      const bool in = (v >= 0) & (v < N);
      ok &= in;
      li[k] = in ? v : 0;
    }
  }
  return ok;
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

// The sort of the pairs of rows [r0, r0+nb): slots of (chunk c, row b) are
// sorted[startT[c][b] : startT[c][b+1]] (items in m order) and, row-major,
// sorted[start[b][c] : start[b][c] + cnt[b][c]]. Rows with skip[b] get no pairs.
struct Plan {
  int shift = 4;
  int64_t CI = 16, C = 1, r0 = 0, nb = 0;
  std::vector<int32_t> cnt, start, startT;
  Buf<int32_t> sorted;
  int64_t capacity = 0;
};

int chunk_shift(int64_t row_bytes, int64_t chunk_bytes, int64_t N, int64_t nb, int64_t max_entries) {
  int shift = 4;
  while (shift < 30 && (int64_t(2) << shift) * row_bytes <= chunk_bytes) ++shift;
  while (shift < 31 && (((N - 1) >> shift) + 1) * (nb + 1) > max_entries) ++shift;
  return shift;
}

template <typename T>
void build_plan(const Ctx<T>& cx, Plan& pl, int64_t r0, int64_t nb, const std::vector<T>* row_g) {
  const int64_t M = cx.M, N = cx.N, C = pl.C;
  const int shift = pl.shift;
  pl.r0 = r0;
  pl.nb = nb;
  pl.cnt.resize(nb * C);
  pl.start.resize(nb * C);
  pl.startT.resize(C * (nb + 1));
  if (pl.capacity < nb * M) {
    pl.sorted = make_buf<int32_t>(nb * M);
    pl.capacity = nb * M;
  }
  PhaseTimer pt;
  std::atomic<bool> bad{false};
  at::parallel_for(0, nb, grain(2 * M), [&](int64_t b0, int64_t b1) {
    alignas(64) int32_t li[kBlock];
    bool ok = true;
    for (int64_t bl = b0; bl < b1; ++bl) {
      int32_t* cr = pl.cnt.data() + bl * C;
      std::fill(cr, cr + C, 0);
      if (row_g && (*row_g)[r0 + bl] == T(0)) continue;
      for (int64_t m0 = 0; m0 < M; m0 += kBlock) {
        const int64_t n = std::min(kBlock, M - m0);
        ok &= load_idx(cx.neg, cx.neg_is_int64, (r0 + bl) * M + m0, n, N, li);
        for (int64_t k = 0; k < n; ++k) cr[li[k] >> shift]++;
      }
    }
    if (!ok) bad.store(true);
  });
  TORCH_CHECK(!bad.load(), "adaptau cpu: an index in neg is outside [0, ", N, ")");
  pt.mark(" plan count");
  std::vector<int64_t> run(C, 0), cstart(C + 1, 0);
  for (int64_t bl = 0; bl < nb; ++bl)
    for (int64_t c = 0; c < C; ++c) run[c] += pl.cnt[bl * C + c];
  for (int64_t c = 0; c < C; ++c) {
    cstart[c + 1] = cstart[c] + run[c];
    run[c] = cstart[c];
  }
  for (int64_t bl = 0; bl < nb; ++bl)
    for (int64_t c = 0; c < C; ++c) {
      pl.start[bl * C + c] = static_cast<int32_t>(run[c]);
      run[c] += pl.cnt[bl * C + c];
    }
  constexpr int64_t TB = 16;  // blocked transpose into chunk-major order
  for (int64_t bb = 0; bb < nb; bb += TB)
    for (int64_t cc = 0; cc < C; cc += TB)
      for (int64_t c = cc; c < std::min(C, cc + TB); ++c)
        for (int64_t bl = bb; bl < std::min(nb, bb + TB); ++bl)
          pl.startT[c * (nb + 1) + bl] = pl.start[bl * C + c];
  for (int64_t c = 0; c < C; ++c) pl.startT[c * (nb + 1) + nb] = static_cast<int32_t>(cstart[c + 1]);
  pt.mark(" plan prefix");
  at::parallel_for(0, nb, grain(3 * M), [&](int64_t b0, int64_t b1) {
    alignas(64) int32_t li[kBlock];
    std::vector<int32_t> cur(C);
    for (int64_t bl = b0; bl < b1; ++bl) {
      if (row_g && (*row_g)[r0 + bl] == T(0)) continue;
      std::copy(pl.start.begin() + bl * C, pl.start.begin() + (bl + 1) * C, cur.begin());
      for (int64_t m0 = 0; m0 < M; m0 += kBlock) {
        const int64_t n = std::min(kBlock, M - m0);
        load_idx(cx.neg, cx.neg_is_int64, (r0 + bl) * M + m0, n, N, li);
        for (int64_t k = 0; k < n; ++k) pl.sorted[cur[li[k] >> shift]++] = li[k];
      }
    }
  });
  pt.mark(" plan scatter");
}

// The forward's sort of the pairs, kept for the backward of the same call: keyed by the
// neg tensor (data pointer, version counter, shape, dtype) and the plan's parameters. At
// most two plans are kept (4 bytes per pair each); ADAPTAU_CPU_PLAN_CACHE=0 disables it.
struct PlanKey {
  const void* data = nullptr;
  int64_t version = -1, B = 0, M = 0, N = 0, shift = 0, dtype = 0;
  bool operator==(const PlanKey& o) const {
    return data == o.data && version == o.version && B == o.B && M == o.M && N == o.N &&
           shift == o.shift && dtype == o.dtype;
  }
};

class PlanCache {
 public:
  static PlanCache& get() {
    static PlanCache* cache = new PlanCache();
    return *cache;
  }
  void put(const PlanKey& key, std::shared_ptr<Plan> plan) {
    if (!enabled_) return;
    std::lock_guard<std::mutex> lock(mu_);
    for (auto& e : entries_)
      if (e.first == key) {
        e.second = std::move(plan);
        return;
      }
    entries_.emplace_back(key, std::move(plan));
    while (entries_.size() > 2) entries_.erase(entries_.begin());
  }
  std::shared_ptr<Plan> take(const PlanKey& key) {
    if (!enabled_) return nullptr;
    std::lock_guard<std::mutex> lock(mu_);
    for (auto it = entries_.begin(); it != entries_.end(); ++it)
      if (it->first == key) {
        std::shared_ptr<Plan> p = std::move(it->second);
        entries_.erase(it);
        return p;
      }
    return nullptr;
  }

 private:
  PlanCache() : enabled_(env_int("ADAPTAU_CPU_PLAN_CACHE", 1) != 0 &&
                         !(std::getenv("ADAPTAU_CPU_PLAN_CACHE") &&
                           std::string(std::getenv("ADAPTAU_CPU_PLAN_CACHE")) == "0")) {}
  bool enabled_;
  std::mutex mu_;
  std::vector<std::pair<PlanKey, std::shared_ptr<Plan>>> entries_;
};

template <typename T>
PlanKey plan_key(const Ctx<T>& cx, int shift) {
  PlanKey k;
  k.data = cx.neg;
  k.version = cx.neg_version;
  k.B = cx.B;
  k.M = cx.M;
  k.N = cx.N;
  k.shift = shift;
  k.dtype = (cx.neg_is_int64 ? 1 : 0) + 2 * int64_t(cx.Dp) + 4096 * int64_t(sizeof(T));
  return k;
}

// Normalizes (or copies) the rows of chunk [base, base+nloc) referenced by its pairs into
// buf (padded rows; norms in nrm when given): all rows sequentially when the chunk is
// dense, else only the referenced ones. Returns true when every row was loaded.
template <typename T>
bool load_chunk(const Ctx<T>& cx, const Plan& pl, int64_t c, int64_t base, int64_t nloc, T* buf,
                T* nrm, std::vector<int64_t>& stamp, int64_t stamp_id) {
  const int64_t D = cx.D, Dp = cx.Dp;
  const int32_t* st = pl.startT.data() + c * (pl.nb + 1);
  const int64_t k0 = st[0], k1 = st[pl.nb];
  if (k1 - k0 >= nloc / 2) {
    for (int64_t r = 0; r < nloc; ++r) {
      const T n = load_row(buf + r * Dp, cx.items + (base + r) * D, D, Dp, cx.normalize);
      if (nrm) nrm[r] = n;
    }
    return true;
  }
  for (int64_t k = k0; k < k1; ++k) {
    const int64_t r = pl.sorted[k] - base;
    if (stamp[r] != stamp_id) {
      stamp[r] = stamp_id;
      const T n = load_row(buf + r * Dp, cx.items + (base + r) * D, D, Dp, cx.normalize);
      if (nrm) nrm[r] = n;
    }
  }
  return false;
}

// Forward: (1) sort; (2) chunk pass: scores of every pair into its slot; (3) row pass:
// logits and log-sum-exp of each row over its slots.
template <typename T, int NV>
void per_row_forward(Ctx<T>& cx, T* loss, T* lse_out, T* raw, bool compute_raw) {
  using Ops = RunOps<T, NV>;
  constexpr int W = Vec<T>::W;
  const Tuning& tu = tuning();
  const int64_t B = cx.B, M = cx.M, D = cx.D, Dp = cx.Dp, N = cx.N;
  PhaseTimer pt;
  const int64_t Bb = std::max<int64_t>(1, std::min<int64_t>(B, tu.max_pairs / M));
  auto plp = std::make_shared<Plan>();
  Plan& pl = *plp;
  pl.shift = chunk_shift(Dp * int64_t(sizeof(T)), tu.chunk_bytes, N, Bb, tu.max_pairs);
  pl.CI = int64_t(1) << pl.shift;
  pl.C = ((N - 1) >> pl.shift) + 1;
  Buf<T> score = make_buf<T>(Bb * M);
  for (int64_t r0 = 0; r0 < B; r0 += Bb) {
    const int64_t nb = std::min(Bb, B - r0);
    build_plan(cx, pl, r0, nb, static_cast<const std::vector<T>*>(nullptr));
    pt.mark("fwd plan");
    at::parallel_for(0, pl.C, grain(nb * M * Dp / pl.C), [&](int64_t c0, int64_t c1) {
      Buf<T> buf = make_buf<T>(pl.CI * Dp);
      std::vector<int64_t> stamp(pl.CI, -1);
      for (int64_t c = c0; c < c1; ++c) {
        const int64_t base = c << pl.shift;
        const int64_t nloc = std::min(pl.CI, N - base);
        const int32_t* st = pl.startT.data() + c * (nb + 1);
        if (st[0] == st[nb]) continue;
        load_chunk(cx, pl, c, base, nloc, buf.get(), static_cast<T*>(nullptr), stamp, c + r0 * pl.C);
        for (int64_t bl = 0; bl < nb; ++bl) {
          const int64_t k0 = st[bl], k1 = st[bl + 1];
          if (k0 == k1) continue;
          Ops::dots(cx.uhat.get() + (r0 + bl) * Dp, buf.get(), pl.sorted.get() + k0, base, k1 - k0,
                    Dp, score.get() + k0);
        }
      }
    });
    pt.mark("fwd chunks");
    at::parallel_for(0, nb, grain(8 * M), [&](int64_t b0, int64_t b1) {
      std::vector<T> lg(M + W), lr(M + W);
      for (int64_t bl = b0; bl < b1; ++bl) {
        const int64_t b = r0 + bl;
        const T beta = cx.beta[b];
        const int32_t p = cx.pos[b];
        int64_t n = 0;
        for (int64_t c = 0; c < pl.C; ++c) {
          const int64_t k0 = pl.start[bl * pl.C + c], len = pl.cnt[bl * pl.C + c];
          for (int64_t k = k0; k < k0 + len; ++k, ++n) {
            const int32_t item = pl.sorted[k];
            const T sv = score[k];
            const T q = cx.logq ? cx.logq[item] : T(0);
            const bool drop = cx.remove_hits && item == p;
            lg[n] = drop ? neg_inf<T>() : beta * sv - q;
            lr[n] = drop ? neg_inf<T>() : sv - q;
          }
        }
        const int64_t npad = round_up(M, W);
        for (int64_t k = M; k < npad; ++k) lg[k] = lr[k] = neg_inf<T>();
        T m = neg_inf<T>(), s = T(0);
        lse_update(lg.data(), npad, m, s);
        finish_row(cx.include_pos, m, s, cx.alpha[b] * cx.spos[b], lse_out[b], loss[b]);
        if (compute_raw) {
          T rm = neg_inf<T>(), rs = T(0), unused;
          lse_update(lr.data(), npad, rm, rs);
          finish_row(cx.include_pos, rm, rs, cx.spos[b], unused, raw[b]);
        }
      }
    });
    pt.mark("fwd rows");
  }
  if (Bb >= B) PlanCache::get().put(plan_key(cx, pl.shift), plp);
  (void)D;
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
// partials [nparts][nb][Dp] in order, plus the positive's term), and the scale gradients.
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
      normalize_backward(grad_user + b * D, gu.data(), cx.uhat.get() + b * Dp, cx.unorm[b], D,
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

// Backward, per block of rows (all rows at the paper's sizes): sort (rows with no
// gradient left out), then a chunk pass: the thread owning a chunk recomputes each pair's
// score from the chunk's normalized rows, P = exp(logit - lse), d = g·β·P, and adds
// d·û_b to the chunk's item-gradient rows and d·î to the user-gradient partial of its
// group (G groups of chunks, G from the problem size only, merged in group order), then
// applies the normalization's Jacobian to the chunk's item rows.
template <typename T, int NV>
void per_row_backward(Ctx<T>& cx, const T* grad_loss, const T* lse, T* grad_user, T* grad_items,
                      T* grad_alpha, T* grad_beta, bool need_scale) {
  using Ops = RunOps<T, NV>;
  using V = Vec<T>;
  constexpr int W = V::W;
  const Tuning& tu = tuning();
  const int64_t B = cx.B, M = cx.M, D = cx.D, Dp = cx.Dp, N = cx.N;
  PhaseTimer pt;
  RowGrad<T> rg = row_grad(cx, grad_loss, lse);
  const int64_t Gmax = std::max<int64_t>(1, tu.max_groups);
  int64_t Bb = std::max<int64_t>(1, std::min<int64_t>(B, tu.max_pairs / M));
  Bb = std::max<int64_t>(1, std::min<int64_t>(Bb, tu.partial_bytes / (Gmax * Dp * int64_t(sizeof(T)))));
  const bool single = Bb >= B;
  const int shift0 = chunk_shift(Dp * int64_t(sizeof(T)), tu.chunk_bytes, N, Bb, tu.max_pairs);
  std::shared_ptr<Plan> cached = single ? PlanCache::get().take(plan_key(cx, shift0)) : nullptr;
  std::shared_ptr<Plan> plp = cached ? cached : std::make_shared<Plan>();
  Plan& pl = *plp;
  if (!cached) {
    pl.shift = shift0;
    pl.CI = int64_t(1) << pl.shift;
    pl.C = ((N - 1) >> pl.shift) + 1;
  }
  const int64_t C = pl.C, CI = pl.CI;
  const int64_t G = std::min(Gmax, C);
  const int shift = pl.shift;

  // Positives by chunk (stable in b).
  std::vector<int32_t> pstart(C + 1, 0), prow(B);
  for (int64_t b = 0; b < B; ++b) pstart[(cx.pos[b] >> shift) + 1]++;
  for (int64_t c = 0; c < C; ++c) pstart[c + 1] += pstart[c];
  {
    std::vector<int32_t> pcur(pstart.begin(), pstart.end() - 1);
    for (int64_t b = 0; b < B; ++b) prow[pcur[cx.pos[b] >> shift]++] = static_cast<int32_t>(b);
  }
  Buf<T> gu_parts = make_buf<T>(G * Bb * Dp);
  std::vector<T> q_parts(G * Bb);
  pt.mark("bwd setup");

  for (int64_t r0 = 0; r0 < B; r0 += Bb) {
    const int64_t nb = std::min(Bb, B - r0);
    const bool first = r0 == 0, last = r0 + nb == B;
    if (!cached) build_plan(cx, pl, r0, nb, &rg.g);
    // Groups: contiguous chunk ranges with about the same number of pairs.
    std::vector<int64_t> gchunk(G + 1, C);
    gchunk[0] = 0;
    {
      const int64_t P = pl.startT[(C - 1) * (nb + 1) + nb];
      int64_t c = 0;
      for (int64_t g = 1; g < G; ++g) {
        const int64_t target = P * g / G;
        while (c < C && pl.startT[c * (nb + 1)] < target) ++c;
        gchunk[g] = std::max(c, gchunk[g - 1]);
      }
    }
    pt.mark("bwd plan");

    at::parallel_for(0, G, grain(3 * nb * M * Dp / G), [&](int64_t g0, int64_t g1) {
      Buf<T> buf = make_buf<T>(CI * Dp);
      Buf<T> acc = make_buf<T>(CI * Dp);
      std::vector<T> nrm(CI);
      std::vector<int64_t> stamp(CI, -1);
      alignas(64) T sc[kBlock];
      alignas(64) T lg[kBlock + W];
      alignas(64) T dd[kBlock + W];
      for (int64_t g = g0; g < g1; ++g) {
        T* gup = gu_parts.get() + g * nb * Dp;
        std::memset(gup, 0, sizeof(T) * nb * Dp);
        T* gq = q_parts.data() + g * nb;
        std::fill(gq, gq + nb, T(0));
        for (int64_t c = gchunk[g]; c < gchunk[g + 1]; ++c) {
          const int64_t base = c << shift;
          const int64_t nloc = std::min(CI, N - base);
          const int32_t* st = pl.startT.data() + c * (nb + 1);
          const bool dense = load_chunk(cx, pl, c, base, nloc, buf.get(), nrm.data(), stamp,
                                        (c + r0 * C));
          std::memset(acc.get(), 0, sizeof(T) * nloc * Dp);
          for (int64_t bl = 0; bl < nb; ++bl) {
            int64_t k0 = st[bl];
            const int64_t k1 = st[bl + 1];
            const int64_t b = r0 + bl;
            if (k0 == k1 || rg.g[b] == T(0)) continue;
            const T* u = cx.uhat.get() + b * Dp;
            const T beta = cx.beta[b];
            const T l_b = lse[b];
            const int32_t p = cx.pos[b];
            const typename V::R vg = V::set1(rg.g[b] * beta);
            T qsum = T(0);
            for (; k0 < k1; k0 += kBlock) {
              const int64_t n = std::min(kBlock, k1 - k0);
              const int32_t* idx = pl.sorted.get() + k0;
              Ops::dots(u, buf.get(), idx, base, n, Dp, sc);
              const int64_t npad = round_up(n, W);
              for (int64_t k = 0; k < n; ++k) {
                const int32_t item = idx[k];
                const T q = cx.logq ? cx.logq[item] : T(0);
                const bool drop = cx.remove_hits && item == p;
                lg[k] = drop ? neg_inf<T>() : beta * sc[k] - q - l_b;
              }
              for (int64_t k = n; k < npad; ++k) lg[k] = neg_inf<T>();
              for (int64_t k = 0; k < npad; k += W) {
                const typename V::R pk = V::exp(V::load(lg + k));
                V::store(lg + k, pk);
                V::store(dd + k, V::mul(vg, pk));
              }
              if (need_scale)
                for (int64_t k = 0; k < n; ++k) qsum += lg[k] * sc[k];
              Ops::grads(u, buf.get(), acc.get(), idx, base, dd, n, Dp, gup + bl * Dp);
            }
            gq[bl] += qsum;
          }
          // Positives of this chunk (rows of this block).
          bool any_pos = false;
          for (int64_t j = pstart[c]; j < pstart[c + 1]; ++j) {
            const int64_t b = prow[j];
            const T dp = rg.dpos[b];
            if (b < r0 || b >= r0 + nb || dp == T(0)) continue;
            const int64_t r = cx.pos[b] - base;
            if (!dense && stamp[r] != (c + r0 * C)) {
              stamp[r] = (c + r0 * C);
              nrm[r] = load_row(buf.get() + r * Dp, cx.items + (base + r) * D, D, Dp, cx.normalize);
            }
            any_pos = true;
            T* a = acc.get() + r * Dp;
            const T* u = cx.uhat.get() + b * Dp;
            for (int64_t i = 0; i < Dp; ++i) a[i] += dp * u[i];
          }
          (void)any_pos;
          // Item-gradient rows of the chunk.
          for (int64_t r = 0; r < nloc; ++r) {
            T* out = grad_items + (base + r) * D;
            const T* a = acc.get() + r * Dp;
            const bool loaded = dense || stamp[r] == (c + r0 * C);
            if (single) {
              if (loaded)
                normalize_backward(out, a, buf.get() + r * Dp, nrm[r], D, cx.normalize);
              else
                std::memset(out, 0, sizeof(T) * D);
              continue;
            }
            if (first)
              std::memcpy(out, a, sizeof(T) * D);
            else
              for (int64_t i = 0; i < D; ++i) out[i] += a[i];
            if (last && cx.normalize) {
              const T* x = cx.items + (base + r) * D;
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
    pt.mark("bwd chunks");
    finish_rows(cx, rg, r0, nb, gu_parts.get(), G, q_parts.data(), grad_user, grad_alpha, grad_beta,
                need_scale);
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
  cd.idx = cx.neg_mode == kNegShared ? indices_to_i32(neg, cx.N, "neg") : cx.pos;
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
  Cands<T> cd = prepare_cands(cx, neg);
  const int64_t B = cx.B, Dp = cx.Dp;
  const int64_t RB = std::max<int64_t>(4, tu.row_block);
  const int64_t CB = round_up(std::max<int64_t>(2 * W, tu.col_block), 2 * W);
  const int64_t nblk = (B + RB - 1) / RB;
  at::parallel_for(0, nblk, grain(RB * cd.Mp * cx.D), [&](int64_t i0, int64_t i1) {
    Buf<T> S = make_buf<T>(RB * CB);
    std::vector<T> lg(CB), m(RB), s(RB), rm(RB), rs(RB);
    for (int64_t blk = i0; blk < i1; ++blk) {
      const int64_t r0 = blk * RB, nr = std::min(RB, B - r0);
      std::fill(m.begin(), m.end(), neg_inf<T>());
      std::fill(s.begin(), s.end(), T(0));
      std::fill(rm.begin(), rm.end(), neg_inf<T>());
      std::fill(rs.begin(), rs.end(), T(0));
      for (int64_t c0 = 0; c0 < cd.Mp; c0 += CB) {
        const int64_t nc = std::min(CB, cd.Mp - c0);
        score_tile(cx.uhat.get() + r0 * Dp, Dp, nr, cd.ct.get() + c0 * cx.D, nc, cx.D, S.get(), CB);
        for (int64_t r = 0; r < nr; ++r) {
          const int64_t b = r0 + r;
          tile_logits(cx, cd, b, S.get() + r * CB, c0, nc, cx.beta[b], true, T(0), lg.data());
          lse_update(lg.data(), nc, m[r], s[r]);
          if (compute_raw) {
            tile_logits(cx, cd, b, S.get() + r * CB, c0, nc, T(1), true, T(0), lg.data());
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
}

template <typename T, int NV>
void gemm_backward(Ctx<T>& cx, const at::Tensor& neg, const T* grad_loss, const T* lse,
                   T* grad_user, T* grad_items, T* grad_alpha, T* grad_beta, bool need_scale) {
  using Ops = RunOps<T, NV>;
  using V = Vec<T>;
  constexpr int W = V::W;
  const Tuning& tu = tuning();
  Cands<T> cd = prepare_cands(cx, neg);
  RowGrad<T> rg = row_grad(cx, grad_loss, lse);
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
    Buf<T> S = make_buf<T>(RB * CB);
    Buf<T> dS = make_buf<T>(RB * CB);
    Buf<T> dST = make_buf<T>(CB * RB);
    for (int64_t g = g0; g < g1; ++g) {
      T* gc = gc_parts.get() + g * Mc * Dp;
      std::memset(gc, 0, sizeof(T) * Mc * Dp);
      for (int64_t blk = nblk * g / G; blk < nblk * (g + 1) / G; ++blk) {
        const int64_t r0 = blk * RB, nr = std::min(RB, B - r0);
        for (int64_t c0 = 0; c0 < cd.Mp; c0 += CB) {
          const int64_t nc = std::min(CB, cd.Mp - c0);
          const int64_t ncv = std::min(nc, Mc - c0);  // valid columns
          score_tile(cx.uhat.get() + r0 * Dp, Dp, nr, cd.ct.get() + c0 * cx.D, nc, D, S.get(), CB);
          for (int64_t r = 0; r < nr; ++r) {
            const int64_t b = r0 + r;
            T* d = dS.get() + r * CB;
            if (rg.g[b] == T(0)) {
              std::fill(d, d + nc, T(0));
              continue;
            }
            const T* s = S.get() + r * CB;
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
            Ops::axpy_rows(gu.get() + b * Dp, d, cd.chat.get() + c0 * Dp, Dp, ncv, Dp);
          }
          for (int64_t r = 0; r < nr; ++r)
            for (int64_t c = 0; c < ncv; ++c) dST[c * RB + r] = dS[r * CB + c];
          for (int64_t c = 0; c < ncv; ++c)
            Ops::axpy_rows(gc + (c0 + c) * Dp, dST.get() + c * RB, cx.uhat.get() + r0 * Dp, Dp, nr, Dp);
        }
      }
    }
  });

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
  std::memset(grad_items, 0, sizeof(T) * N * D);
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
    const T* u = cx.uhat.get() + b * Dp;
    for (int64_t i = 0; i < D; ++i) out[i] += dp * u[i];
    if (!seen[it]) { seen[it] = 1; touched.push_back(it); }
  }
  if (cx.normalize) {
    at::parallel_for(0, static_cast<int64_t>(touched.size()), grain(4 * D), [&](int64_t t0, int64_t t1) {
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
  finish_rows(cx, rg, 0, B, gu.get(), 1, q.data(), grad_user, grad_alpha, grad_beta, need_scale);
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
  if (neg_logq.has_value() && neg_logq->defined()) {
    const at::Tensor& lq = *neg_logq;
    TORCH_CHECK(lq.device().is_cpu() && lq.dim() == 1 && lq.size(0) == in.N && lq.is_floating_point(),
                "adaptau cpu: neg_logq must be a floating [N=", in.N, "] CPU tensor, got ", lq.sizes());
    in.logq = lq.to(in.acc_dtype).contiguous();
  }
  return in;
}

template <typename T>
Ctx<T> make_ctx(const Inputs& in, int64_t neg_mode, bool include_pos, bool normalize, bool remove_hits) {
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
  cx.neg_version = in.neg._version();
  cx.pos = indices_to_i32(in.pos, in.N, "pos");
  prepare_rows(cx);
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
  at::Tensor grad_items = at::empty({in.N, in.D}, opts);
  at::Tensor grad_alpha = at::empty({in.B}, opts);
  at::Tensor grad_beta = at::empty({in.B}, opts);
  AT_DISPATCH_FLOATING_TYPES(in.user.scalar_type(), "adaptau_fused_backward_cpu", [&] {
    using T = scalar_t;
    PhaseTimer pt;
    Ctx<T> cx = make_ctx<T>(in, neg_mode, include_pos, normalize, remove_hits);
    pt.mark("prepare rows");
    with_nv<T>(in.D, [&](auto nvc) {
      constexpr int NV = decltype(nvc)::value;
      if (neg_mode == kNegPerRow)
        per_row_backward<T, NV>(cx, gl.data_ptr<T>(), ls.data_ptr<T>(), grad_user.data_ptr<T>(),
                                grad_items.data_ptr<T>(), grad_alpha.data_ptr<T>(), grad_beta.data_ptr<T>(),
                                need_scale_grads);
      else
        gemm_backward<T, NV>(cx, in.neg, gl.data_ptr<T>(), ls.data_ptr<T>(), grad_user.data_ptr<T>(),
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
