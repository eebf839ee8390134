// adaptau::all_finite(t) -> bool: whether a floating tensor on the CPU holds no NaN and no
// infinity. ops.py asks it before the fused cpu kernel runs: the kernel's running-max
// log-sum-exp is written for finite scores, so a call with a non-finite input goes to the
// reference backend instead, which propagates NaN and infinities as PyTorch does.
//
// One pass, no temporaries (at::isfinite(t).all() writes a bool tensor as large as t):
// x·0 is ±0 for a finite x and NaN for ±inf or NaN, so the sum of x·0 over the tensor is
// zero exactly when every element is finite. Parallel over blocks; no early exit (it
// vectorizes).
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <atomic>
#include <cstdint>

#include "cpu_simd.h"

namespace adaptau {
namespace cpu {
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

bool all_finite_cpu(const at::Tensor& t) {
  TORCH_CHECK(t.device().is_cpu(), "adaptau::all_finite: expected a CPU tensor");
  TORCH_CHECK(t.is_floating_point(), "adaptau::all_finite: expected a floating tensor, got ",
              t.scalar_type());
  if (t.scalar_type() != at::kFloat && t.scalar_type() != at::kDouble)
    return at::isfinite(t).all().item<bool>();
  const at::Tensor c = t.contiguous();
  std::atomic<bool> finite{true};
  AT_DISPATCH_FLOATING_TYPES(c.scalar_type(), "adaptau_all_finite", [&] {
    const scalar_t* p = c.data_ptr<scalar_t>();
    at::parallel_for(0, c.numel(), 1 << 16, [&](int64_t begin, int64_t end) {
      if (!block_finite(p + begin, end - begin)) finite.store(false, std::memory_order_relaxed);
    });
  });
  return finite.load();
}

}  // namespace
}  // namespace cpu
}  // namespace adaptau

TORCH_LIBRARY_IMPL(adaptau, CPU, m) { m.impl("all_finite", &adaptau::cpu::all_finite_cpu); }
