// The interface between the sampling helpers' glue (csrc/sampling_cpu.cpp: checks,
// outputs, registration) and their kernels, compiled once per CPU capability
// (csrc/cpu/sampling_kernel_<capability>.cpp, from sampling_kernel_impl.h).
#pragma once

#include <cstdint>

#include "capability.h"

namespace adaptau {
namespace cpu {

// uniform_fill: out[k] = draw k of `seed` reduced to [0, num_items), k < total.
// dropout_fill: out[k] = 0 when draw k is below p·2^32, else 1/(1-p)   (0 <= p < 1).
// count_items: out[i] += how often i occurs among the n indices (int64 when is64, else
//   int32); false, with out unspecified, when one lies outside [0, num_items).
// add_l2_rows: grad[i] += coef·cnt[i]·w[i] for the N rows of D elements; returns
//   Σ_i cnt[i]·‖w[i]‖² in float64, summed in a fixed block order.
ADAPTAU_CPU_DECLARE(
    void uniform_fill(int32_t* out, int64_t total, int64_t num_items, int64_t seed);
    void dropout_fill(float* out, int64_t total, double p, int64_t seed);
    bool count_items(const void* indices, bool is64, int64_t n, int64_t num_items, int64_t* out);
    double add_l2_rows(float* grad, const float* w, const int64_t* cnt, int64_t N, int64_t D, double coef);
    double add_l2_rows(double* grad, const double* w, const int64_t* cnt, int64_t N, int64_t D, double coef))

}  // namespace cpu
}  // namespace adaptau
