// The interface of compact_indices' per-capability kernel (csrc/cpu/compact_kernel_impl.h).
#pragma once

#include <ATen/ATen.h>

#include <cstdint>
#include <tuple>

#include "capability.h"

namespace adaptau {
namespace cpu {

// (unique_ids, pos_local, neg_local) of the checked, contiguous int32/int64 pos and neg (see
// csrc/compact_cpu.cpp); unique_ids is empty and nothing is written when an index lies
// outside [0, num_items).
ADAPTAU_CPU_DECLARE(std::tuple<at::Tensor, at::Tensor, at::Tensor> compact_indices(const at::Tensor& pos,
                                                                                   const at::Tensor& neg,
                                                                                   int64_t num_items))

}  // namespace cpu
}  // namespace adaptau
