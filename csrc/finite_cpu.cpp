// adaptau::all_finite(t) -> bool: whether a floating tensor on the CPU holds no NaN and no
// infinity. ops.py asks it before the fused cpu kernel runs: the kernel's running-max
// log-sum-exp is written for finite scores, so a call with a non-finite input goes to the
// reference backend instead, which propagates NaN and infinities as PyTorch does.
//
// One pass, no temporaries (at::isfinite(t).all() writes a bool tensor as large as t):
// x·0 is ±0 for a finite x and NaN for ±inf or NaN, so the sum of x·0 over the tensor is
// zero exactly when every element is finite. Parallel over blocks; no early exit (it
// vectorizes). The scan is compiled per CPU capability (csrc/cpu/finite_kernel_impl.h).
#include <ATen/ATen.h>
#include <torch/library.h>

#include <cstdint>

#include "cpu/capability.h"
#include "cpu/finite_kernel.h"

namespace adaptau {
namespace cpu {
namespace {

bool all_finite_cpu(const at::Tensor& t) {
  TORCH_CHECK(t.device().is_cpu(), "adaptau::all_finite: expected a CPU tensor");
  TORCH_CHECK(t.is_floating_point(), "adaptau::all_finite: expected a floating tensor, got ",
              t.scalar_type());
  if (t.scalar_type() != at::kFloat && t.scalar_type() != at::kDouble)
    return at::isfinite(t).all().item<bool>();
  const at::Tensor c = t.contiguous();
  if (c.scalar_type() == at::kFloat) return ADAPTAU_CPU_DISPATCH(all_finite, c.data_ptr<float>(), c.numel());
  return ADAPTAU_CPU_DISPATCH(all_finite, c.data_ptr<double>(), c.numel());
}

}  // namespace
}  // namespace cpu
}  // namespace adaptau

TORCH_LIBRARY_IMPL(adaptau, CPU, m) { m.impl("all_finite", &adaptau::cpu::all_finite_cpu); }
