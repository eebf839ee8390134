// Row helpers, the per-row run micro-kernels (RunOps) and the GEMM micro-kernel.
// Part of the softmax-loss kernels (softmax_loss_kernel_impl.h), compiled once per CPU
// capability inside adaptau::cpu::<capability>.
#pragma once

#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <memory>
#include <utility>
#include <vector>

#include "../cpu_simd.h"
#include "runtime.h"

namespace adaptau {
namespace cpu {
namespace ADAPTAU_CPU_CAPABILITY {
namespace {

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
                                      const int32_t* __restrict__ idx, int64_t n, int64_t Dp,
                                      T* __restrict__ out) {
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
  static ADAPTAU_HOT_INLINE void gather_axpy(T* __restrict__ v, bool fresh, T keep,
                                             const T* __restrict__ coef, const T* __restrict__ rows,
                                             const int32_t* __restrict__ idx, int64_t n, int64_t Dp) {
    if constexpr (NV > 0 && NV <= 8) {
      R g[NV];
#pragma GCC unroll 16
      for (int j = 0; j < NV; ++j) g[j] = V::zero();
      int64_t k = 0;
      for (; k + W <= n; k += W) {
        const typename V::Parts cw = V::parts(V::load(coef + k));
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
      for (int64_t i = 0; i < nv; ++i)
        V::store(v + i * W, fresh ? V::zero() : V::mul(kv, V::load(v + i * W)));
      for (int64_t k = 0; k < n; ++k) {
        const R c = V::set1(coef[k]);
        const T* r = row(rows, idx[k]);
        for (int64_t i = 0; i < nv; ++i)
          V::store(v + i * W, V::fma(c, V::load(r + i * W), V::load(v + i * W)));
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
        const typename V::Parts cw = V::parts(V::load(coef + k));
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
               const T* __restrict__ X, int64_t ldx, int64_t ni, int64_t nj, int64_t Dp, bool accumulate) {
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
void score_tile(const T* __restrict__ U, int64_t ldu, int64_t nr, const T* __restrict__ CT, int64_t nc,
                int64_t D, T* __restrict__ S, int64_t lds) {
  constexpr int W = Vec<T>::W;
  for (int64_t c = 0; c < nc; c += 2 * W)
    tile_gemm(S + c, lds, U, ldu, 1, CT + (c / (2 * W)) * D * 2 * W, 2 * W, nr, D, 2 * W, false);
}

}  // namespace
}  // namespace ADAPTAU_CPU_CAPABILITY
}  // namespace cpu
}  // namespace adaptau
