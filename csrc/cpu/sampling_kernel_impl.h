// The sampling helpers' kernels (csrc/sampling_cpu.cpp holds their checks and the op
// registrations; the algorithms are described there), compiled once per CPU capability by
// sampling_kernel_<capability>.cpp into adaptau::cpu::<capability>.
#pragma once

#include <ATen/Parallel.h>

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <vector>

#include "../cpu_simd.h"
#include "sampling_kernel.h"

namespace adaptau {
namespace cpu {
namespace ADAPTAU_CPU_CAPABILITY {
namespace {

inline uint64_t splitmix64(uint64_t seed, uint64_t counter) {
  uint64_t z = seed + (counter + 1) * 0x9E3779B97F4A7C15ull;
  z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
  z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
  return z ^ (z >> 31);
}

// f(k, draw k) for every draw k of [0, total), in parallel over whole SplitMix64 outputs.
template <typename F>
void for_each_draw(uint64_t seed, int64_t total, F f) {
  const int64_t pairs = total / 2;
  at::parallel_for(0, pairs, 1 << 15, [&](int64_t j0, int64_t j1) {
    for (int64_t j = j0; j < j1; ++j) {
      const uint64_t z = splitmix64(seed, static_cast<uint64_t>(j));
      f(2 * j, static_cast<uint32_t>(z >> 32));
      f(2 * j + 1, static_cast<uint32_t>(z));
    }
  });
  if (total % 2) f(total - 1, static_cast<uint32_t>(splitmix64(seed, static_cast<uint64_t>(pairs)) >> 32));
}

template <typename I>
bool count_slice(const I* x, int64_t k0, int64_t k1, uint64_t n, int32_t* h) {
  // Blocks small enough to stay in L1 between the (vectorized) range check and the
  // counting, which then needs no per-index test; unrolled by 4.
  constexpr int64_t kCheck = 4096;
  for (int64_t b0 = k0; b0 < k1; b0 += kCheck) {
    const int64_t b1 = std::min(k1, b0 + kCheck);
    if (!indices_below(x + b0, b1 - b0, static_cast<uint32_t>(n))) return false;
    int64_t k = b0;
    for (; k + 4 <= b1; k += 4) {
      const uint32_t v0 = static_cast<uint32_t>(x[k]), v1 = static_cast<uint32_t>(x[k + 1]);
      const uint32_t v2 = static_cast<uint32_t>(x[k + 2]), v3 = static_cast<uint32_t>(x[k + 3]);
      ++h[v0];
      ++h[v1];
      ++h[v2];
      ++h[v3];
    }
    for (; k < b1; ++k) ++h[static_cast<uint32_t>(x[k])];
  }
  return true;
}

// Σ_i counts[i]·‖w[i]‖², and grad[i] += coef·counts[i]·w[i] (see add_l2_rows_).
template <typename T>
double add_l2_rows_impl(T* grad, const T* w, const int64_t* cnt, int64_t N, int64_t D, double coef) {
  constexpr int64_t kRows = 1024;
  const int64_t nblk = (N + kRows - 1) / kRows;
  std::vector<double> part(static_cast<size_t>(nblk), 0.0);
  at::parallel_for(0, nblk, 1, [&](int64_t j0, int64_t j1) {
    for (int64_t j = j0; j < j1; ++j) {
      double acc = 0.0;
      for (int64_t i = j * kRows; i < std::min(N, (j + 1) * kRows); ++i) {
        if (cnt[i] == 0) continue;
        const T* wi = w + i * D;
        T* gi = grad + i * D;
        const T a = static_cast<T>(coef * static_cast<double>(cnt[i]));
        using V = Vec<T>;
        const typename V::R va = V::set1(a);
        typename V::R vsq = V::zero();
        int64_t d = 0;
        for (; d + V::W <= D; d += V::W) {
          const typename V::R x = V::load(wi + d);
          vsq = V::fma(x, x, vsq);
          V::store(gi + d, V::fma(va, x, V::load(gi + d)));
        }
        T sq = V::hsum(vsq);
        for (; d < D; ++d) {
          sq += wi[d] * wi[d];
          gi[d] += a * wi[d];
        }
        acc += static_cast<double>(cnt[i]) * static_cast<double>(sq);
      }
      part[j] = acc;
    }
  });
  double total = 0.0;
  for (double x : part) total += x;
  return total;
}

}  // namespace

void uniform_fill(int32_t* out, int64_t total, int64_t num_items, int64_t seed) {
  const uint64_t n = static_cast<uint64_t>(num_items);
  for_each_draw(static_cast<uint64_t>(seed), total,
                [&](int64_t k, uint32_t x) { out[k] = static_cast<int32_t>((uint64_t(x) * n) >> 32); });
}

void dropout_fill(float* out, int64_t total, double p, int64_t seed) {
  const uint32_t threshold = static_cast<uint32_t>(p * 4294967296.0);  // p < 1: fits
  const float keep = static_cast<float>(1.0 / (1.0 - p));
  for_each_draw(static_cast<uint64_t>(seed), total,
                [&](int64_t k, uint32_t x) { out[k] = x < threshold ? 0.0f : keep; });
}

bool count_items(const void* indices, bool is64, int64_t n, int64_t num_items, int64_t* out) {
  const int64_t parts = std::max<int64_t>(1, std::min<int64_t>(at::get_num_threads(), n >> 16));
  std::vector<int32_t> hist(static_cast<size_t>(parts * num_items), 0);
  std::atomic<bool> bad{false};
  at::parallel_for(0, parts, 1, [&](int64_t p0, int64_t p1) {
    for (int64_t p = p0; p < p1; ++p) {
      const int64_t k0 = n * p / parts, k1 = n * (p + 1) / parts;
      int32_t* h = hist.data() + p * num_items;
      const bool ok = is64
                          ? count_slice(static_cast<const int64_t*>(indices), k0, k1, uint64_t(num_items), h)
                          : count_slice(static_cast<const int32_t*>(indices), k0, k1, uint64_t(num_items), h);
      if (!ok) bad.store(true);
    }
  });
  if (bad.load()) return false;
  at::parallel_for(0, num_items, 1 << 14, [&](int64_t i0, int64_t i1) {
    for (int64_t p = 0; p < parts; ++p) {
      const int32_t* h = hist.data() + p * num_items;
      for (int64_t i = i0; i < i1; ++i) out[i] += h[i];
    }
  });
  return true;
}

double add_l2_rows(float* grad, const float* w, const int64_t* cnt, int64_t N, int64_t D, double coef) {
  return add_l2_rows_impl(grad, w, cnt, N, D, coef);
}

double add_l2_rows(double* grad, const double* w, const int64_t* cnt, int64_t N, int64_t D, double coef) {
  return add_l2_rows_impl(grad, w, cnt, N, D, coef);
}

}  // namespace ADAPTAU_CPU_CAPABILITY
}  // namespace cpu
}  // namespace adaptau
