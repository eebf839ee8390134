// CUDA kernels of adaptau's fused sampled-softmax loss (contract: adaptau/ops.py).
//
// Only CUDA's own headers. Design (a second, simpler GPU implementation next to Triton):
//  * one thread block per row b; the row's raw user vector lives in shared memory (acc type);
//  * each warp takes candidates m = warp, warp + nwarps, ...; its 32 lanes stride over D,
//    compute <u, i> and ||i||² together and reduce them with xor-shuffles, so a gathered
//    item row is read once, coalesced, and no [B, M, D] tensor exists;
//  * forward: per-warp running (max, sum) log-sum-exp, merged across warps at the end;
//  * backward: recomputes scores from the forward's lse, accumulates the user gradient in
//    per-warp shared-memory rows, and adds item gradients with atomicAdd into an acc-typed
//    [N, D] buffer; a finalize kernel (one warp per item row) applies the normalization
//    Jacobian and casts to the input dtype.
// Accumulation in float for float/half/bfloat16 inputs, double for double inputs.
#include <cuda_runtime.h>
#include <cuda_fp16.h>
#include <cuda_bf16.h>

#include <cstddef>
#include <cstdint>

#include "../contract.h"
#include "softmax_loss_cuda.h"

// Hooks for a host-side emulation harness (tests); the defaults are plain CUDA.
#ifndef ADAPTAU_DYNAMIC_SMEM
#define ADAPTAU_DYNAMIC_SMEM(name) extern __shared__ __align__(16) unsigned char name[]
#endif
#ifndef ADAPTAU_LAUNCH
#define ADAPTAU_LAUNCH(kernel, grid, block, smem, stream) kernel<<<grid, block, smem, stream>>>
#endif

namespace adaptau_cuda {
namespace {

constexpr int kWarp = 32;
constexpr unsigned kFullMask = 0xffffffffu;
#ifndef ADAPTAU_CUDA_THREADS
#define ADAPTAU_CUDA_THREADS 256  // 8 warps per block
#endif
constexpr int kThreads = ADAPTAU_CUDA_THREADS;
constexpr size_t kDefaultSmem = 48 * 1024;

// `#pragma unroll n` for nvcc; nothing for a host compiler (the tests' host emulation).
#ifdef __CUDACC__
#define ADAPTAU_PRAGMA(x) _Pragma(#x)
#define ADAPTAU_UNROLL(n) ADAPTAU_PRAGMA(unroll n)
#else
#define ADAPTAU_UNROLL(n)
#endif

template <typename T>
struct AccOf {
  using type = float;
};
template <>
struct AccOf<double> {
  using type = double;
};

__device__ __forceinline__ float to_acc(float x) { return x; }
__device__ __forceinline__ double to_acc(double x) { return x; }
__device__ __forceinline__ float to_acc(__half x) { return __half2float(x); }
__device__ __forceinline__ float to_acc(__nv_bfloat16 x) { return __bfloat162float(x); }

template <typename T>
__device__ __forceinline__ T from_acc(typename AccOf<T>::type x);
template <>
__device__ __forceinline__ float from_acc<float>(float x) {
  return x;
}
template <>
__device__ __forceinline__ double from_acc<double>(double x) {
  return x;
}
template <>
__device__ __forceinline__ __half from_acc<__half>(float x) {
  return __float2half_rn(x);
}
template <>
__device__ __forceinline__ __nv_bfloat16 from_acc<__nv_bfloat16>(float x) {
  return __float2bfloat16_rn(x);
}

__device__ __forceinline__ float exp_(float x) { return expf(x); }
__device__ __forceinline__ double exp_(double x) { return exp(x); }
__device__ __forceinline__ float log_(float x) { return logf(x); }
__device__ __forceinline__ double log_(double x) { return log(x); }
__device__ __forceinline__ float sqrt_(float x) { return sqrtf(x); }
__device__ __forceinline__ double sqrt_(double x) { return sqrt(x); }

template <typename A>
__device__ __forceinline__ A neg_inf();
template <>
__device__ __forceinline__ float neg_inf<float>() {
  return __int_as_float(0xff800000);
}
template <>
__device__ __forceinline__ double neg_inf<double>() {
  return __longlong_as_double(0xfff0000000000000ULL);
}

// 1 / max(||x||, kNormEps), as F.normalize's clamp.
template <typename A>
__device__ __forceinline__ A inv_norm(A sumsq) {
  A n = sqrt_(sumsq);
  return A(1) / (n > A(adaptau::kNormEps) ? n : A(adaptau::kNormEps));
}
// ||x|| > eps, i.e. the normalization is x/||x|| (else x/eps, a linear map).
template <typename A>
__device__ __forceinline__ bool norm_above_eps(A sumsq) {
  return sumsq > A(adaptau::kNormEps * adaptau::kNormEps);
}

template <typename A>
__device__ __forceinline__ A warp_sum(A v) {
  for (int o = kWarp / 2; o > 0; o >>= 1) v += __shfl_xor_sync(kFullMask, v, o);
  return v;
}

// Sum over the block; every thread gets it. `buf` holds >= 32 values. Contains barriers:
// every thread of the block must call it.
template <typename A>
__device__ A block_sum(A v, A* buf) {
  v = warp_sum(v);
  const int lane = threadIdx.x % kWarp, warp = threadIdx.x / kWarp;
  const int nwarps = (blockDim.x + kWarp - 1) / kWarp;
  __syncthreads();  // buf may still be read from a previous call
  if (lane == 0) buf[warp] = v;
  __syncthreads();
  A total = 0;
  for (int w = 0; w < nwarps; ++w) total += buf[w];
  return total;
}

template <typename A>
__device__ __forceinline__ void lse_push(A& m, A& s, A x) {
  if (x == neg_inf<A>()) return;
  if (x > m) {
    s = s * exp_(m - x) + A(1);
    m = x;
  } else {
    s += exp_(x - m);
  }
}

template <typename A>
__device__ __forceinline__ void lse_merge(A& m, A& s, A m2, A s2) {
  if (m2 == neg_inf<A>()) return;
  if (m == neg_inf<A>()) {
    m = m2;
    s = s2;
    return;
  }
  const A top = m > m2 ? m : m2;
  s = s * exp_(m - top) + s2 * exp_(m2 - top);
  m = top;
}

template <typename A>
__device__ __forceinline__ A lse_value(A m, A s) {
  return m == neg_inf<A>() ? m : m + log_(s);
}

// log(exp(a) + exp(b)) with a possibly -inf and b finite.
template <typename A>
__device__ __forceinline__ A log_add_exp(A a, A b) {
  const A top = a > b ? a : b;
  return top + log_(exp_(a - top) + exp_(b - top));
}

template <typename A>
__device__ __forceinline__ void atomic_add(A* address, A value) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ < 600
  if constexpr (sizeof(A) == 8) {  // no native double atomicAdd before sm_60
    unsigned long long* as_ull = reinterpret_cast<unsigned long long*>(address);
    unsigned long long old = *as_ull, assumed;
    do {
      assumed = old;
      old = atomicCAS(as_ull, assumed, __double_as_longlong(value + __longlong_as_double(assumed)));
    } while (assumed != old);
    return;
  }
#endif
  atomicAdd(address, value);
}

template <typename T, typename I>
struct Params {
  using A = typename AccOf<T>::type;
  const T* user;
  const T* items;
  const I* pos;
  const I* neg;
  const A* alpha;
  const A* beta;
  const A* logq;
  int64_t B, N, D, M;
  int neg_mode;
  bool include_pos, normalize, remove_hits;
};

template <typename T, typename I>
__device__ __forceinline__ int64_t candidate(const Params<T, I>& params, int64_t b, int64_t m) {
  if (params.neg_mode == adaptau::kNegPerRow) return static_cast<int64_t>(params.neg[b * params.M + m]);
  if (params.neg_mode == adaptau::kNegShared) return static_cast<int64_t>(params.neg[m]);
  return static_cast<int64_t>(params.pos[m]);
}

// <u, row> and ||row||² for one item row; lanes stride over D; every lane gets both.
template <typename T, typename A>
__device__ __forceinline__ void warp_dot(const A* u_s, const T* row, int64_t D, int lane, A& dot, A& sumsq) {
  A d = 0, q = 0;
  for (int64_t k = lane; k < D; k += kWarp) {
    const A x = to_acc(row[k]);
    d += u_s[k] * x;
    q += x * x;
  }
  for (int o = kWarp / 2; o > 0; o >>= 1) {
    d += __shfl_xor_sync(kFullMask, d, o);
    q += __shfl_xor_sync(kFullMask, q, o);
  }
  dot = d;
  sumsq = q;
}

// Copies user row b into shared u_s (accumulation dtype) and returns its squared norm.
// Ends with block_sum's barriers: u_s (and whatever the block wrote to shared memory
// before the call) is visible to every thread afterwards.
template <typename T, typename I, typename A>
__device__ A stage_user_row(const Params<T, I>& params, int64_t b, A* u_s, A* red) {
  A part = 0;
  for (int64_t k = threadIdx.x; k < params.D; k += blockDim.x) {
    const A x = to_acc(params.user[b * params.D + k]);
    u_s[k] = x;
    part += x * x;
  }
  return block_sum(part, red);
}

// ------------------------------------------------------------------------------ forward
template <typename T, typename I>
__global__ void __launch_bounds__(kThreads)
    fwd_kernel(Params<T, I> params, bool compute_raw, typename AccOf<T>::type* __restrict__ loss_out,
               typename AccOf<T>::type* __restrict__ lse_out, typename AccOf<T>::type* __restrict__ raw_out) {
  using A = typename AccOf<T>::type;
  ADAPTAU_DYNAMIC_SMEM(smem_raw);
  A* u_s = reinterpret_cast<A*>(smem_raw);  // [D]
  __shared__ A red[kWarp];
  __shared__ A red_m[kWarp], red_s[kWarp], red_m2[kWarp], red_s2[kWarp];

  const int64_t b = blockIdx.x;
  const int lane = threadIdx.x % kWarp, warp = threadIdx.x / kWarp;
  const int nwarps = blockDim.x / kWarp;
  const int64_t D = params.D;

  const A usq = stage_user_row(params, b, u_s, red);  // u_s is ready after this
  const A ru = params.normalize ? inv_norm(usq) : A(1);

  const int64_t pidx = static_cast<int64_t>(params.pos[b]);
  const A alpha = params.alpha[b], beta = params.beta[b];
  A dot, sq;
  warp_dot(u_s, params.items + pidx * D, D, lane, dot, sq);
  const A s_pos = params.normalize ? dot * ru * inv_norm(sq) : dot;

  A m1 = neg_inf<A>(), s1 = 0, m2 = neg_inf<A>(), s2 = 0;
  for (int64_t c = warp; c < params.M; c += nwarps) {
    if (params.neg_mode == adaptau::kNegInBatch && c == b) continue;  // warp-uniform
    const int64_t idx = candidate(params, b, c);
    if (params.remove_hits && idx == pidx) continue;
    warp_dot(u_s, params.items + idx * D, D, lane, dot, sq);
    const A s = params.normalize ? dot * ru * inv_norm(sq) : dot;
    const A lq = params.logq != nullptr ? params.logq[idx] : A(0);
    lse_push(m1, s1, beta * s - lq);
    if (compute_raw) lse_push(m2, s2, s - lq);
  }
  if (lane == 0) {
    red_m[warp] = m1;
    red_s[warp] = s1;
    red_m2[warp] = m2;
    red_s2[warp] = s2;
  }
  __syncthreads();
  if (threadIdx.x == 0) {
    for (int w = 1; w < nwarps; ++w) {
      lse_merge(m1, s1, red_m[w], red_s[w]);
      lse_merge(m2, s2, red_m2[w], red_s2[w]);
    }
    A lse = lse_value(m1, s1);
    const A pos_logit = alpha * s_pos;
    if (params.include_pos) lse = log_add_exp(lse, pos_logit);
    lse_out[b] = lse;
    loss_out[b] = lse == neg_inf<A>() ? A(0) : lse - pos_logit;
    if (compute_raw) {
      A lse_r = lse_value(m2, s2);
      if (params.include_pos) lse_r = log_add_exp(lse_r, s_pos);
      raw_out[b] = lse_r == neg_inf<A>() ? A(0) : lse_r - s_pos;
    }
  }
}

// ----------------------------------------------------------------------------- backward
template <typename T, typename I>
__global__ void __launch_bounds__(kThreads)
    bwd_kernel(Params<T, I> params, const typename AccOf<T>::type* __restrict__ grad_loss,
               const typename AccOf<T>::type* __restrict__ lse_in, T* __restrict__ grad_user,
               typename AccOf<T>::type* item_accum, typename AccOf<T>::type* __restrict__ galpha,
               typename AccOf<T>::type* __restrict__ gbeta) {
  using A = typename AccOf<T>::type;
  ADAPTAU_DYNAMIC_SMEM(smem_raw);
  const int64_t D = params.D;
  const int lane = threadIdx.x % kWarp, warp = threadIdx.x / kWarp;
  const int nwarps = blockDim.x / kWarp;
  A* u_s = reinterpret_cast<A*>(smem_raw);  // [D] raw user vector
  A* gu_s = u_s + D;                        // [nwarps, D] per-warp user-gradient rows
  __shared__ A red[kWarp];

  const int64_t b = blockIdx.x;
  for (int64_t k = threadIdx.x; k < nwarps * D; k += blockDim.x) gu_s[k] = A(0);
  const A usq = stage_user_row(params, b, u_s, red);  // u_s and gu_s are ready after this
  const A ru = params.normalize ? inv_norm(usq) : A(1);

  A lse = lse_in[b];
  const bool empty = lse == neg_inf<A>();
  const A g = empty ? A(0) : grad_loss[b];
  if (empty) lse = A(0);
  const int64_t pidx = static_cast<int64_t>(params.pos[b]);
  const A alpha = params.alpha[b], beta = params.beta[b];
  A dot, sq;
  warp_dot(u_s, params.items + pidx * D, D, lane, dot, sq);
  const A rp = params.normalize ? inv_norm(sq) : A(1);
  const A s_pos = dot * ru * rp;

  A mass = 0, gb = 0;  // lane-uniform within a warp
  if (g != A(0)) {
    A* acc = gu_s + warp * D;
    for (int64_t c = warp; c < params.M; c += nwarps) {
      if (params.neg_mode == adaptau::kNegInBatch && c == b) continue;  // warp-uniform
      const int64_t idx = candidate(params, b, c);
      if (params.remove_hits && idx == pidx) continue;
      const T* row = params.items + idx * D;
      warp_dot(u_s, row, D, lane, dot, sq);
      const A rc = params.normalize ? inv_norm(sq) : A(1);
      const A s = dot * ru * rc;
      const A lq = params.logq != nullptr ? params.logq[idx] : A(0);
      const A prob = exp_(beta * s - lq - lse);
      mass += prob;
      const A dl = g * prob;  // d loss / d logit
      gb += dl * s;
      const A w = dl * beta;  // d loss / d score
      if (w == A(0)) continue;
      const A wc = w * rc, wu = w * ru;
      A* dst = item_accum + idx * D;
      // Not unrolled: each column ends in a global atomic, and unrolled, ptxas spills 4 bytes
      // for 16-bit rows with int64 indices.
      ADAPTAU_UNROLL(1)
      for (int64_t k = lane; k < D; k += kWarp) {
        acc[k] += wc * to_acc(row[k]);
        atomic_add(dst + k, wu * u_s[k]);
      }
    }
  }
  // Lane-uniform per warp: count each warp once.
  const A mass_total = block_sum(lane == 0 ? mass : A(0), red);
  const A gb_total = block_sum(lane == 0 ? gb : A(0), red);
  // d loss / d pos_logit = g·(P_pos − 1) = −g·Σ_m P_m with include_pos (no cancellation)
  const A d_pos_logit = params.include_pos ? -g * mass_total : -g;
  const A w_pos = d_pos_logit * alpha;

  const T* prow = params.items + pidx * D;
  A dpart = 0;
  for (int64_t k = threadIdx.x; k < D; k += blockDim.x) {
    A t = w_pos * rp * to_acc(prow[k]);
    for (int w = 0; w < nwarps; ++w) t += gu_s[w * D + k];
    gu_s[k] = t;  // row 0 now holds the full gradient w.r.t. û (only this thread touches k)
    dpart += u_s[k] * ru * t;
    if (w_pos != A(0)) atomic_add(item_accum + pidx * D + k, w_pos * ru * u_s[k]);
  }
  const A uh_dot_g = block_sum(dpart, red);
  const bool project = params.normalize && norm_above_eps(usq);
  for (int64_t k = threadIdx.x; k < D; k += blockDim.x) {
    A t = gu_s[k];
    if (project) t -= u_s[k] * ru * uh_dot_g;
    if (params.normalize) t *= ru;
    grad_user[b * D + k] = from_acc<T>(t);
  }
  if (threadIdx.x == 0) {
    galpha[b] = d_pos_logit * s_pos;
    gbeta[b] = gb_total;
  }
}

// One warp per item row: grad_items = J(items) · item_accum, cast to T. May run in place
// (item_accum == grad_items when T is the accumulation type).
template <typename T>
__global__ void __launch_bounds__(kThreads)
    item_finalize_kernel(const typename AccOf<T>::type* item_accum, const T* __restrict__ items,
                         T* grad_items, int64_t N, int64_t D, bool normalize) {
  using A = typename AccOf<T>::type;
  const int lane = threadIdx.x % kWarp;
  const int64_t row = static_cast<int64_t>(blockIdx.x) * (blockDim.x / kWarp) + threadIdx.x / kWarp;
  if (row >= N) return;  // warp-uniform; no block barriers below
  const A* gh = item_accum + row * D;
  const T* x = items + row * D;
  T* out = grad_items + row * D;
  if (!normalize) {
    for (int64_t k = lane; k < D; k += kWarp) out[k] = from_acc<T>(gh[k]);
    return;
  }
  A q = 0, d = 0;
  for (int64_t k = lane; k < D; k += kWarp) {
    const A xv = to_acc(x[k]);
    q += xv * xv;
    d += xv * gh[k];
  }
  q = warp_sum(q);
  d = warp_sum(d);
  const A r = inv_norm(q);
  const bool project = norm_above_eps(q);
  const A xh_dot_g = d * r;  // <x̂, g>
  for (int64_t k = lane; k < D; k += kWarp) {
    A t = gh[k];
    if (project) t -= to_acc(x[k]) * r * xh_dot_g;
    out[k] = from_acc<T>(t * r);
  }
}

// ------------------------------------------------------------------------------ launchers
template <typename T, typename I>
Params<T, I> make_params(const Problem& problem) {
  using A = typename AccOf<T>::type;
  Params<T, I> params;
  params.user = static_cast<const T*>(problem.user);
  params.items = static_cast<const T*>(problem.items);
  params.pos = static_cast<const I*>(problem.pos);
  params.neg = static_cast<const I*>(problem.neg);
  params.alpha = static_cast<const A*>(problem.pos_scale);
  params.beta = static_cast<const A*>(problem.neg_scale);
  params.logq = static_cast<const A*>(problem.neg_logq);
  params.B = problem.B;
  params.N = problem.N;
  params.D = problem.D;
  params.M = problem.M;
  params.neg_mode = problem.neg_mode;
  params.include_pos = problem.include_pos;
  params.normalize = problem.normalize;
  params.remove_hits = problem.remove_hits;
  return params;
}

template <typename Kernel>
cudaError_t allow_smem(Kernel kernel, size_t bytes) {
  if (bytes <= kDefaultSmem) return cudaSuccess;
  return cudaFuncSetAttribute(reinterpret_cast<const void*>(kernel),
                              cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(bytes));
}

cudaError_t check_problem(const Problem& problem) {
  if (problem.B < 1 || problem.N < 1 || problem.D < 1 || problem.M < 1) return cudaErrorInvalidValue;
  if (problem.neg_mode < 0 || problem.neg_mode > 2) return cudaErrorInvalidValue;
  if (problem.neg_mode != 2 && problem.neg == nullptr) return cudaErrorInvalidValue;
  if (problem.B > 0x7fffffffLL) return cudaErrorInvalidValue;  // one block per row
  return cudaSuccess;
}

template <typename T, typename I>
cudaError_t forward_impl(const Problem& problem, bool compute_raw, void* loss, void* lse, void* raw,
                         cudaStream_t stream) {
  using A = typename AccOf<T>::type;
  const Params<T, I> params = make_params<T, I>(problem);
  const size_t smem = static_cast<size_t>(problem.D) * sizeof(A);
  auto kernel = fwd_kernel<T, I>;
  cudaError_t err = allow_smem(kernel, smem);
  if (err != cudaSuccess) return err;
  ADAPTAU_LAUNCH(kernel, dim3(static_cast<unsigned>(problem.B)), dim3(kThreads), smem, stream)(
      params, compute_raw, static_cast<A*>(loss), static_cast<A*>(lse), static_cast<A*>(raw));
  return cudaGetLastError();
}

template <typename T, typename I>
cudaError_t backward_impl(const Problem& problem, const void* grad_loss, const void* lse, void* grad_user,
                          void* grad_items, void* item_accum, void* grad_pos_scale, void* grad_neg_scale,
                          cudaStream_t stream) {
  using A = typename AccOf<T>::type;
  const Params<T, I> params = make_params<T, I>(problem);
  const size_t accum_bytes = static_cast<size_t>(problem.N) * problem.D * sizeof(A);
  cudaError_t err = cudaMemsetAsync(item_accum, 0, accum_bytes, stream);
  if (err != cudaSuccess) return err;
  // Fewer warps for very wide rows so the per-warp gradient rows fit in shared memory.
  int warps = kThreads / kWarp;
  auto smem_for = [&](int w) { return static_cast<size_t>(problem.D) * (1 + w) * sizeof(A); };
  while (warps > 1 && smem_for(warps) > kDefaultSmem) warps /= 2;
  const size_t smem = smem_for(warps);
  auto kernel = bwd_kernel<T, I>;
  err = allow_smem(kernel, smem);
  if (err != cudaSuccess) return err;
  ADAPTAU_LAUNCH(kernel, dim3(static_cast<unsigned>(problem.B)), dim3(warps * kWarp), smem, stream)(
      params, static_cast<const A*>(grad_loss), static_cast<const A*>(lse), static_cast<T*>(grad_user),
      static_cast<A*>(item_accum), static_cast<A*>(grad_pos_scale), static_cast<A*>(grad_neg_scale));
  err = cudaGetLastError();
  if (err != cudaSuccess) return err;
  const bool in_place = item_accum == grad_items;
  if (in_place && !problem.normalize) return cudaSuccess;  // the accumulator is the answer
  const int rows_per_block = kThreads / kWarp;
  const int64_t blocks = (problem.N + rows_per_block - 1) / rows_per_block;
  if (blocks > 0x7fffffffLL) return cudaErrorInvalidValue;
  ADAPTAU_LAUNCH(item_finalize_kernel<T>, dim3(static_cast<unsigned>(blocks)), dim3(kThreads), 0, stream)(
      static_cast<const A*>(item_accum), static_cast<const T*>(problem.items), static_cast<T*>(grad_items),
      problem.N, problem.D, problem.normalize);
  return cudaGetLastError();
}

template <template <typename, typename> class Fn, typename... Args>
cudaError_t dispatch(const Problem& problem, Args... args) {
  switch (problem.dtype) {
    case kFloat32:
      return problem.index64 ? Fn<float, int64_t>::run(problem, args...)
                             : Fn<float, int32_t>::run(problem, args...);
    case kFloat16:
      return problem.index64 ? Fn<__half, int64_t>::run(problem, args...)
                             : Fn<__half, int32_t>::run(problem, args...);
    case kBFloat16:
      return problem.index64 ? Fn<__nv_bfloat16, int64_t>::run(problem, args...)
                             : Fn<__nv_bfloat16, int32_t>::run(problem, args...);
    case kFloat64:
      return problem.index64 ? Fn<double, int64_t>::run(problem, args...)
                             : Fn<double, int32_t>::run(problem, args...);
    default:
      return cudaErrorInvalidValue;
  }
}

template <typename T, typename I>
struct ForwardFn {
  static cudaError_t run(const Problem& problem, bool compute_raw, void* loss, void* lse, void* raw,
                         cudaStream_t stream) {
    return forward_impl<T, I>(problem, compute_raw, loss, lse, raw, stream);
  }
};

template <typename T, typename I>
struct BackwardFn {
  static cudaError_t run(const Problem& problem, const void* grad_loss, const void* lse, void* grad_user,
                         void* grad_items, void* item_accum, void* grad_pos_scale, void* grad_neg_scale,
                         cudaStream_t stream) {
    return backward_impl<T, I>(problem, grad_loss, lse, grad_user, grad_items, item_accum, grad_pos_scale,
                               grad_neg_scale, stream);
  }
};

}  // namespace

cudaError_t forward(const Problem& problem, bool compute_raw, void* loss, void* lse, void* raw,
                    cudaStream_t stream) {
  cudaError_t err = check_problem(problem);
  if (err != cudaSuccess) return err;
  if (compute_raw && raw == nullptr) return cudaErrorInvalidValue;
  return dispatch<ForwardFn>(problem, compute_raw, loss, lse, raw, stream);
}

cudaError_t backward(const Problem& problem, const void* grad_loss, const void* lse, void* grad_user,
                     void* grad_items, void* item_accum, void* grad_pos_scale, void* grad_neg_scale,
                     cudaStream_t stream) {
  cudaError_t err = check_problem(problem);
  if (err != cudaSuccess) return err;
  return dispatch<BackwardFn>(problem, grad_loss, lse, grad_user, grad_items, item_accum, grad_pos_scale,
                              grad_neg_scale, stream);
}

size_t item_accum_bytes(const Problem& problem) {
  const size_t acc = problem.dtype == kFloat64 ? sizeof(double) : sizeof(float);
  return static_cast<size_t>(problem.N) * static_cast<size_t>(problem.D) * acc;
}

}  // namespace adaptau_cuda
