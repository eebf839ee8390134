// The interface of all_finite's per-capability scan (csrc/cpu/finite_kernel_impl.h).
#pragma once

#include <cstdint>

#include "capability.h"

namespace adaptau {
namespace cpu {

// Whether the n values at p are all finite (parallel, no early exit).
ADAPTAU_CPU_DECLARE(bool all_finite(const float* p, int64_t n); bool all_finite(const double* p, int64_t n))

}  // namespace cpu
}  // namespace adaptau
