// all_finite's scan (see csrc/finite_cpu.cpp), compiled once per CPU capability by
// finite_kernel_<capability>.cpp into adaptau::cpu::<capability>.
#pragma once

#include <ATen/Parallel.h>

#include <atomic>
#include <cstdint>

#include "../cpu_simd.h"
#include "finite_kernel.h"

namespace adaptau {
namespace cpu {
namespace ADAPTAU_CPU_CAPABILITY {
namespace {

template <typename T>
bool block_finite(const T* p, int64_t n) {
  using V = Vec<T>;
  constexpr int W = V::W;
  typename V::R acc = V::zero();
  const typename V::R zero = V::zero();
  int64_t i = 0;
  for (; i + W <= n; i += W) acc = V::fma(V::load(p + i), zero, acc);
  T s = V::hsum(acc);
  for (; i < n; ++i) s += p[i] * T(0);
  return s == T(0);
}

template <typename T>
bool all_finite_impl(const T* p, int64_t n) {
  std::atomic<bool> finite{true};
  at::parallel_for(0, n, 1 << 16, [&](int64_t begin, int64_t end) {
    if (!block_finite(p + begin, end - begin)) finite.store(false, std::memory_order_relaxed);
  });
  return finite.load();
}

}  // namespace

bool all_finite(const float* p, int64_t n) { return all_finite_impl(p, n); }
bool all_finite(const double* p, int64_t n) { return all_finite_impl(p, n); }

}  // namespace ADAPTAU_CPU_CAPABILITY
}  // namespace cpu
}  // namespace adaptau
