// Tiny SIMD layer for the adaptau CPU kernels.
//
// Vec<T> wraps one machine vector of T. Which one depends on the translation unit's CPU
// capability (ADAPTAU_CPU_CAPABILITY, set by the per-capability kernel files in csrc/cpu/
// before they include this header; unset means DEFAULT):
//   DEFAULT  one scalar lane (portable x86-64 or any other architecture)
//   AVX2     AVX2 + FMA: 8 floats / 4 doubles
//   AVX512   AVX-512 F/BW/DQ/VL: 16 floats / 8 doubles, masked tails
// Everything here lives in the namespace adaptau::cpu::<capability>, so the same names
// compiled with different instruction sets never meet at link time. Every reduction has a
// fixed association order per capability, so results depend on the inputs and the
// capability only (not on the thread count); across capabilities they differ in rounding.
#pragma once

#include <cmath>
#include <cstdint>
#include <limits>
#include <type_traits>
#include <utility>

// Hot per-run helpers are forced inline: called once per (row, chunk) run, their
// prologues, spills and constant set-up otherwise cost as much as a run's arithmetic.
#if defined(__GNUC__)
#define ADAPTAU_HOT_INLINE inline __attribute__((always_inline))
#define ADAPTAU_HOT_LAMBDA __attribute__((always_inline))
#else
#define ADAPTAU_HOT_INLINE inline
#define ADAPTAU_HOT_LAMBDA
#endif

#ifndef ADAPTAU_CPU_CAPABILITY
#define ADAPTAU_CPU_CAPABILITY DEFAULT
#define ADAPTAU_CPU_CAPABILITY_DEFAULT 1
#endif

#if defined(ADAPTAU_CPU_CAPABILITY_AVX512)
#if !(defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512DQ__) && defined(__AVX512VL__) && \
      defined(__AVX2__) && defined(__FMA__))
#error "the AVX512 kernels must be compiled with -mavx512f -mavx512bw -mavx512dq -mavx512vl -mavx2 -mfma"
#endif
#include <immintrin.h>
#define ADAPTAU_VEC_AVX512 1
#define ADAPTAU_VEC_AVX2 1
#elif defined(ADAPTAU_CPU_CAPABILITY_AVX2)
#if !(defined(__AVX2__) && defined(__FMA__))
#error "the AVX2 kernels must be compiled with -mavx2 -mfma"
#endif
#include <immintrin.h>
#define ADAPTAU_VEC_AVX2 1
#elif !defined(ADAPTAU_CPU_CAPABILITY_DEFAULT)
#error "ADAPTAU_CPU_CAPABILITY is set without ADAPTAU_CPU_CAPABILITY_<name>"
#endif

namespace adaptau {
namespace cpu {
namespace ADAPTAU_CPU_CAPABILITY {
// p, computed into a register of its own at this point: the accesses through it become
// base + displacement. (A pointer used for both a load and a store, GCC otherwise
// recomputes each access's address with an lea from the unscaled pieces.)
template <typename P>
ADAPTAU_HOT_INLINE P* pinned(P* p) {
#if defined(__GNUC__)
  asm("" : "+r"(p));
#endif
  return p;
}

// Index range checks without a branch per index: true when every p[k], k < n, lies in
// [0, N) (N <= 2^31 - 1). As uint32 a negative int32 is >= 2^31 > N, so an unsigned max
// decides; an int64 is in range when it has no bit from 31 up (an OR of the high parts:
// negatives set them) and its low 32 bits are below N. Both loops vectorize with AVX2,
// which has no 64-bit unsigned max. With `narrow`, the int64 version also stores each
// index's low 32 bits there (in the same loop), which are the indices as int32 when the
// check passes.
inline bool indices_below(const int32_t* p, int64_t n, uint32_t N) {
  uint32_t mx = 0;
  for (int64_t k = 0; k < n; ++k) mx = mx > static_cast<uint32_t>(p[k]) ? mx : static_cast<uint32_t>(p[k]);
  return n == 0 || mx < N;
}
inline bool indices_below(const int64_t* p, int64_t n, uint32_t N, int32_t* narrow = nullptr) {
  uint64_t hi = 0;
  uint32_t mx = 0;
  const auto visit = [&](int64_t k) {
    const uint64_t x = static_cast<uint64_t>(p[k]);
    const uint32_t lo = static_cast<uint32_t>(x);
    hi |= x >> 31;
    mx = mx > lo ? mx : lo;
    return lo;
  };
  if (narrow != nullptr) {
    for (int64_t k = 0; k < n; ++k) narrow[k] = static_cast<int32_t>(visit(k));
  } else {
    for (int64_t k = 0; k < n; ++k) visit(k);
  }
  return n == 0 || (hi == 0 && mx < N);
}

// f(std::integral_constant<int, i>{}) for i = 0 .. N-1, unrolled at compile time (for
// intrinsics that take i as an immediate).
template <typename F, int... I>
ADAPTAU_HOT_INLINE void static_for_impl(F& f, std::integer_sequence<int, I...>) {
  (f(std::integral_constant<int, I>{}), ...);
}
template <int N, typename F>
ADAPTAU_HOT_INLINE void static_for(F&& f) {
  static_for_impl(f, std::make_integer_sequence<int, N>{});
}

// Generic single-lane fallback (any T, any target).
template <typename T>
struct Vec {
  using R = T;
  static constexpr int W = 1;
  static inline R load(const T* p) { return *p; }
  static inline void store(T* p, R v) { *p = v; }
  static inline R zero() { return T(0); }
  static inline R set1(T x) { return x; }
  static inline R fma(R a, R b, R c) { return std::fma(a, b, c); }
  static inline R add(R a, R b) { return a + b; }
  static inline R sub(R a, R b) { return a - b; }
  static inline R mul(R a, R b) { return a * b; }
  static inline R max(R a, R b) { return a > b ? a : b; }
  static inline T hsum(R a) { return a; }
  static inline T hmax(R a) { return a; }
  static inline void hsum4(R a, R b, R c, R d, T* out) {
    out[0] = a;
    out[1] = b;
    out[2] = c;
    out[3] = d;
  }
  static inline R exp(R x) { return std::exp(x); }
  // v, kept in a register: an operand the compiler must not fold into the next instruction.
  static inline R in_register(R v) { return v; }
  // Broadcasting the lanes of a vector: h = parts(v), then lane<I>(h) is v with every
  // lane set to lane I (I < W).
  struct Parts {
    R p;
  };
  static inline Parts parts(R v) { return {v}; }
  template <int I>
  static inline R lane(const Parts& h) {
    return h.p;
  }
  // load(p) for data just written by hsum4 (see the AVX2 float version).
  static inline R load_after_hsum4(const T* p) { return *p; }
  // v with the lanes from count on set to 0 (count >= 1).
  static inline R keep_first(R v, int count) { return count > 0 ? v : T(0); }
  // Stores the first count lanes of v (the memory past them is not touched).
  static inline void store_first(T* p, R v, int count) {
    if (count > 0) *p = v;
  }
};

#if defined(ADAPTAU_VEC_AVX2) && !defined(ADAPTAU_VEC_AVX512)
template <>
struct Vec<float> {
  using R = __m256;
  static constexpr int W = 8;
  static inline R load(const float* p) { return _mm256_loadu_ps(p); }
  static inline void store(float* p, R v) { _mm256_storeu_ps(p, v); }
  static inline R zero() { return _mm256_setzero_ps(); }
  static inline R set1(float x) { return _mm256_set1_ps(x); }
  static inline R fma(R a, R b, R c) { return _mm256_fmadd_ps(a, b, c); }
  static inline R add(R a, R b) { return _mm256_add_ps(a, b); }
  static inline R sub(R a, R b) { return _mm256_sub_ps(a, b); }
  static inline R mul(R a, R b) { return _mm256_mul_ps(a, b); }
  static inline R max(R a, R b) { return _mm256_max_ps(a, b); }
  static inline R in_register(R v) {
    asm("" : "+x"(v));
    return v;
  }
  static inline float hsum(R a) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(a), _mm256_extractf128_ps(a, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
  }
  static inline float hmax(R a) {
    __m128 s = _mm_max_ps(_mm256_castps256_ps128(a), _mm256_extractf128_ps(a, 1));
    s = _mm_max_ps(s, _mm_movehl_ps(s, s));
    s = _mm_max_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
  }
  // out[0..3] = horizontal sums of a, b, c, d.
  static inline void hsum4(R a, R b, R c, R d, float* out) {
    __m256 t0 = _mm256_hadd_ps(a, b);
    __m256 t1 = _mm256_hadd_ps(c, d);
    __m256 t2 = _mm256_hadd_ps(t0, t1);
    _mm_storeu_ps(out, _mm_add_ps(_mm256_castps256_ps128(t2), _mm256_extractf128_ps(t2, 1)));
  }
  // load(p) of 8 floats written by two hsum4 calls: two 16-byte loads, each forwarded from
  // one 16-byte store (a 32-byte load spanning two stores cannot be forwarded and stalls).
  static inline R load_after_hsum4(const float* p) {
    return _mm256_insertf128_ps(_mm256_castps128_ps256(_mm_loadu_ps(p)), _mm_loadu_ps(p + 4), 1);
  }
  // Lane broadcasts from registers (loading one float of a vector just stored stalls on
  // store-to-load forwarding): each 128-bit half duplicated once, then one in-lane
  // vpermilps with an immediate per lane. A vpermps per lane would need a control register
  // per lane, and with eight of them next to the FMA accumulators the run loops spill.
  struct Parts {
    R lo, hi;
  };
  static inline Parts parts(R v) {
    return {_mm256_permute2f128_ps(v, v, 0x00), _mm256_permute2f128_ps(v, v, 0x11)};
  }
  template <int I>
  static inline R lane(const Parts& h) {
    return _mm256_permute_ps(I < 4 ? h.lo : h.hi, (I & 3) * 0x55);
  }
  static inline R keep_first(R v, int count) {
    const __m256i iota = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
    return _mm256_and_ps(v, _mm256_castsi256_ps(_mm256_cmpgt_epi32(_mm256_set1_epi32(count), iota)));
  }
  static inline void store_first(float* p, R v, int count) {
    const __m256i iota = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
    _mm256_maskstore_ps(p, _mm256_cmpgt_epi32(_mm256_set1_epi32(count), iota), v);
  }
  // exp with ~1-2 ulp error (Cephes polynomial); exactly 0 below -87 (and for -inf).
  static inline R exp(R x_in) {
    const R lo = _mm256_set1_ps(-87.0f);
    R x = _mm256_min_ps(_mm256_max_ps(x_in, lo), _mm256_set1_ps(88.3762626647949f));
    R n = _mm256_round_ps(_mm256_mul_ps(x, _mm256_set1_ps(1.44269504088896341f)),
                          _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    x = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693359375f), x);
    x = _mm256_fnmadd_ps(n, _mm256_set1_ps(-2.12194440e-4f), x);
    R y = _mm256_set1_ps(1.9875691500E-4f);
    y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(1.3981999507E-3f));
    y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(8.3334519073E-3f));
    y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(4.1665795894E-2f));
    y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(1.6666665459E-1f));
    y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(5.0000001201E-1f));
    R x2 = _mm256_mul_ps(x, x);
    y = _mm256_fmadd_ps(y, x2, _mm256_add_ps(x, _mm256_set1_ps(1.0f)));
    __m256i e = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
    y = _mm256_mul_ps(y, _mm256_castsi256_ps(e));
    return _mm256_and_ps(y, _mm256_cmp_ps(x_in, lo, _CMP_GE_OQ));
  }
};

template <>
struct Vec<double> {
  using R = __m256d;
  static constexpr int W = 4;
  static inline R load(const double* p) { return _mm256_loadu_pd(p); }
  static inline void store(double* p, R v) { _mm256_storeu_pd(p, v); }
  static inline R zero() { return _mm256_setzero_pd(); }
  static inline R set1(double x) { return _mm256_set1_pd(x); }
  static inline R fma(R a, R b, R c) { return _mm256_fmadd_pd(a, b, c); }
  static inline R add(R a, R b) { return _mm256_add_pd(a, b); }
  static inline R sub(R a, R b) { return _mm256_sub_pd(a, b); }
  static inline R mul(R a, R b) { return _mm256_mul_pd(a, b); }
  static inline R max(R a, R b) { return _mm256_max_pd(a, b); }
  static inline R in_register(R v) {
    asm("" : "+x"(v));
    return v;
  }
  static inline double hsum(R a) {
    __m128d s = _mm_add_pd(_mm256_castpd256_pd128(a), _mm256_extractf128_pd(a, 1));
    return _mm_cvtsd_f64(_mm_add_sd(s, _mm_unpackhi_pd(s, s)));
  }
  static inline double hmax(R a) {
    __m128d s = _mm_max_pd(_mm256_castpd256_pd128(a), _mm256_extractf128_pd(a, 1));
    return _mm_cvtsd_f64(_mm_max_sd(s, _mm_unpackhi_pd(s, s)));
  }
  static inline void hsum4(R a, R b, R c, R d, double* out) {
    __m256d t0 = _mm256_hadd_pd(a, b);  // a01 b01 a23 b23
    __m256d t1 = _mm256_hadd_pd(c, d);  // c01 d01 c23 d23
    __m256d lo = _mm256_permute2f128_pd(t0, t1, 0x20);
    __m256d hi = _mm256_permute2f128_pd(t0, t1, 0x31);
    _mm256_storeu_pd(out, _mm256_add_pd(lo, hi));
  }
  static inline R load_after_hsum4(const double* p) { return _mm256_loadu_pd(p); }
  static inline R keep_first(R v, int count) {
    const __m256i iota = _mm256_setr_epi64x(0, 1, 2, 3);
    return _mm256_and_pd(v, _mm256_castsi256_pd(_mm256_cmpgt_epi64(_mm256_set1_epi64x(count), iota)));
  }
  static inline void store_first(double* p, R v, int count) {
    const __m256i iota = _mm256_setr_epi64x(0, 1, 2, 3);
    _mm256_maskstore_pd(p, _mm256_cmpgt_epi64(_mm256_set1_epi64x(count), iota), v);
  }
  struct Parts {  // (the lane-crossing vpermpd takes an immediate: no parts needed)
    R v;
  };
  static inline Parts parts(R v) { return {v}; }
  template <int I>
  static inline R lane(const Parts& h) {
    return _mm256_permute4x64_pd(h.v, I * 0x55);
  }
  // Float64 needs full accuracy: libm per lane.
  static inline R exp(R x) {
    alignas(32) double t[4];
    _mm256_store_pd(t, x);
    for (int i = 0; i < 4; ++i) t[i] = std::exp(t[i]);
    return _mm256_load_pd(t);
  }
};
#endif  // AVX2

#ifdef ADAPTAU_VEC_AVX512
// 256-bit helpers of the 512-bit reductions: a 512-bit vector is folded once (low half +
// high half) and finished as the AVX2 reductions finish.
ADAPTAU_HOT_INLINE __m256 fold_256(__m512 a) {
  return _mm256_add_ps(_mm512_castps512_ps256(a), _mm512_extractf32x8_ps(a, 1));
}
ADAPTAU_HOT_INLINE __m256d fold_256(__m512d a) {
  return _mm256_add_pd(_mm512_castpd512_pd256(a), _mm512_extractf64x4_pd(a, 1));
}

template <>
struct Vec<float> {
  using R = __m512;
  static constexpr int W = 16;
  using Mask = __mmask16;
  static inline Mask first(int count) {
    return count >= W ? Mask(0xFFFF) : Mask((1u << (count > 0 ? count : 0)) - 1u);
  }
  static inline R load(const float* p) { return _mm512_loadu_ps(p); }
  static inline void store(float* p, R v) { _mm512_storeu_ps(p, v); }
  static inline R zero() { return _mm512_setzero_ps(); }
  static inline R set1(float x) { return _mm512_set1_ps(x); }
  static inline R fma(R a, R b, R c) { return _mm512_fmadd_ps(a, b, c); }
  static inline R add(R a, R b) { return _mm512_add_ps(a, b); }
  static inline R sub(R a, R b) { return _mm512_sub_ps(a, b); }
  static inline R mul(R a, R b) { return _mm512_mul_ps(a, b); }
  static inline R max(R a, R b) { return _mm512_max_ps(a, b); }
  static inline R in_register(R v) {
    asm("" : "+v"(v));
    return v;
  }
  static inline float hsum(R a) {
    const __m256 h = fold_256(a);
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(h), _mm256_extractf128_ps(h, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
  }
  static inline float hmax(R a) {
    const __m256 h = _mm256_max_ps(_mm512_castps512_ps256(a), _mm512_extractf32x8_ps(a, 1));
    __m128 s = _mm_max_ps(_mm256_castps256_ps128(h), _mm256_extractf128_ps(h, 1));
    s = _mm_max_ps(s, _mm_movehl_ps(s, s));
    s = _mm_max_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
  }
  // out[0..3] = horizontal sums of a, b, c, d (each folded to 256 bits, then as AVX2).
  static inline void hsum4(R a, R b, R c, R d, float* out) {
    const __m256 t0 = _mm256_hadd_ps(fold_256(a), fold_256(b));
    const __m256 t1 = _mm256_hadd_ps(fold_256(c), fold_256(d));
    const __m256 t2 = _mm256_hadd_ps(t0, t1);
    _mm_storeu_ps(out, _mm_add_ps(_mm256_castps256_ps128(t2), _mm256_extractf128_ps(t2, 1)));
  }
  // load(p) of 16 floats written by four hsum4 calls: four 16-byte loads, each forwarded
  // from one 16-byte store.
  static inline R load_after_hsum4(const float* p) {
    const __m256 lo = _mm256_insertf128_ps(_mm256_castps128_ps256(_mm_loadu_ps(p)), _mm_loadu_ps(p + 4), 1);
    const __m256 hi =
        _mm256_insertf128_ps(_mm256_castps128_ps256(_mm_loadu_ps(p + 8)), _mm_loadu_ps(p + 12), 1);
    return _mm512_insertf32x8(_mm512_castps256_ps512(lo), hi, 1);
  }
  // Lane broadcasts from registers: each 128-bit quarter broadcast once (vshuff32x4 with an
  // immediate), then one in-lane vpermilps with an immediate per lane.
  struct Parts {
    R q[4];
  };
  static inline Parts parts(R v) {
    return {{_mm512_shuffle_f32x4(v, v, 0x00), _mm512_shuffle_f32x4(v, v, 0x55),
             _mm512_shuffle_f32x4(v, v, 0xAA), _mm512_shuffle_f32x4(v, v, 0xFF)}};
  }
  template <int I>
  static inline R lane(const Parts& h) {
    return _mm512_permute_ps(h.q[I / 4], (I & 3) * 0x55);
  }
  static inline R keep_first(R v, int count) { return _mm512_maskz_mov_ps(first(count), v); }
  static inline void store_first(float* p, R v, int count) { _mm512_mask_storeu_ps(p, first(count), v); }
  // exp with ~1-2 ulp error (the AVX2 version's Cephes polynomial; the power of two is
  // applied by vscalefps); exactly 0 below -87 (and for -inf).
  static inline R exp(R x_in) {
    const R lo = _mm512_set1_ps(-87.0f);
    R x = _mm512_min_ps(_mm512_max_ps(x_in, lo), _mm512_set1_ps(88.3762626647949f));
    const R n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504088896341f)),
                                     _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    x = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693359375f), x);
    x = _mm512_fnmadd_ps(n, _mm512_set1_ps(-2.12194440e-4f), x);
    R y = _mm512_set1_ps(1.9875691500E-4f);
    y = _mm512_fmadd_ps(y, x, _mm512_set1_ps(1.3981999507E-3f));
    y = _mm512_fmadd_ps(y, x, _mm512_set1_ps(8.3334519073E-3f));
    y = _mm512_fmadd_ps(y, x, _mm512_set1_ps(4.1665795894E-2f));
    y = _mm512_fmadd_ps(y, x, _mm512_set1_ps(1.6666665459E-1f));
    y = _mm512_fmadd_ps(y, x, _mm512_set1_ps(5.0000001201E-1f));
    const R x2 = _mm512_mul_ps(x, x);
    y = _mm512_fmadd_ps(y, x2, _mm512_add_ps(x, _mm512_set1_ps(1.0f)));
    y = _mm512_scalef_ps(y, n);
    return _mm512_maskz_mov_ps(_mm512_cmp_ps_mask(x_in, lo, _CMP_GE_OQ), y);
  }
};

template <>
struct Vec<double> {
  using R = __m512d;
  static constexpr int W = 8;
  using Mask = __mmask8;
  static inline Mask first(int count) {
    return count >= W ? Mask(0xFF) : Mask((1u << (count > 0 ? count : 0)) - 1u);
  }
  static inline R load(const double* p) { return _mm512_loadu_pd(p); }
  static inline void store(double* p, R v) { _mm512_storeu_pd(p, v); }
  static inline R zero() { return _mm512_setzero_pd(); }
  static inline R set1(double x) { return _mm512_set1_pd(x); }
  static inline R fma(R a, R b, R c) { return _mm512_fmadd_pd(a, b, c); }
  static inline R add(R a, R b) { return _mm512_add_pd(a, b); }
  static inline R sub(R a, R b) { return _mm512_sub_pd(a, b); }
  static inline R mul(R a, R b) { return _mm512_mul_pd(a, b); }
  static inline R max(R a, R b) { return _mm512_max_pd(a, b); }
  static inline R in_register(R v) {
    asm("" : "+v"(v));
    return v;
  }
  static inline double hsum(R a) {
    const __m256d h = fold_256(a);
    const __m128d s = _mm_add_pd(_mm256_castpd256_pd128(h), _mm256_extractf128_pd(h, 1));
    return _mm_cvtsd_f64(_mm_add_sd(s, _mm_unpackhi_pd(s, s)));
  }
  static inline double hmax(R a) {
    const __m256d h = _mm256_max_pd(_mm512_castpd512_pd256(a), _mm512_extractf64x4_pd(a, 1));
    const __m128d s = _mm_max_pd(_mm256_castpd256_pd128(h), _mm256_extractf128_pd(h, 1));
    return _mm_cvtsd_f64(_mm_max_sd(s, _mm_unpackhi_pd(s, s)));
  }
  static inline void hsum4(R a, R b, R c, R d, double* out) {
    const __m256d t0 = _mm256_hadd_pd(fold_256(a), fold_256(b));
    const __m256d t1 = _mm256_hadd_pd(fold_256(c), fold_256(d));
    const __m256d lo = _mm256_permute2f128_pd(t0, t1, 0x20);
    const __m256d hi = _mm256_permute2f128_pd(t0, t1, 0x31);
    _mm256_storeu_pd(out, _mm256_add_pd(lo, hi));
  }
  // 8 doubles written by two hsum4 calls: two 32-byte loads, each forwarded from one store.
  static inline R load_after_hsum4(const double* p) {
    return _mm512_insertf64x4(_mm512_castpd256_pd512(_mm256_loadu_pd(p)), _mm256_loadu_pd(p + 4), 1);
  }
  struct Parts {  // each 128-bit quarter (two doubles) broadcast once
    R q[4];
  };
  static inline Parts parts(R v) {
    return {{_mm512_shuffle_f64x2(v, v, 0x00), _mm512_shuffle_f64x2(v, v, 0x55),
             _mm512_shuffle_f64x2(v, v, 0xAA), _mm512_shuffle_f64x2(v, v, 0xFF)}};
  }
  template <int I>
  static inline R lane(const Parts& h) {
    return _mm512_permute_pd(h.q[I / 2], (I & 1) ? 0xFF : 0x00);
  }
  static inline R keep_first(R v, int count) { return _mm512_maskz_mov_pd(first(count), v); }
  static inline void store_first(double* p, R v, int count) { _mm512_mask_storeu_pd(p, first(count), v); }
  // Float64 needs full accuracy: libm per lane.
  static inline R exp(R x) {
    alignas(64) double t[8];
    _mm512_store_pd(t, x);
    for (int i = 0; i < 8; ++i) t[i] = std::exp(t[i]);
    return _mm512_load_pd(t);
  }
};
#endif  // AVX512

}  // namespace ADAPTAU_CPU_CAPABILITY
}  // namespace cpu
}  // namespace adaptau
