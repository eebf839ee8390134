// adaptau::compact_indices(pos, neg, num_items) -> (unique_ids, pos_local, neg_local):
// the item rows a batch touches, for softmax_loss(item_grad="sparse") and adaptau.compact.
//
//   unique_ids [K] int64   the distinct values of pos and neg, ascending
//   pos_local, neg_local   pos and neg (their shapes and dtypes) as positions in unique_ids
//
// So items[unique_ids] is the batch's [K, D] compact table, and a [K, D] gradient with the
// indices unique_ids is a coalesced sparse COO gradient of items. When an index lies
// outside [0, num_items) nothing is written and unique_ids is empty: the caller names the
// offending value.
//
// A bitmap of num_items bits marks the touched rows (no sort of the B·(M+1) indices, as
// torch.unique does); the set bits give unique_ids in order, and a rank table (popcounts of
// the words before) gives each index its position. Work: O(B·M + num_items / 64), memory
// num_items / 8 bytes. Python uses torch.unique instead when num_items / 64 would dominate
// (ops.py, _COMPACT_BITMAP_RATIO). Timings against torch.unique: docs/performance.md.
#include <ATen/ATen.h>
#include <torch/library.h>

#include <cstdint>
#include <tuple>

#include "cpu/capability.h"
#include "cpu/compact_kernel.h"

namespace adaptau {
namespace cpu {
namespace {

std::tuple<at::Tensor, at::Tensor, at::Tensor> compact_indices_cpu(const at::Tensor& pos_in,
                                                                   const at::Tensor& neg_in,
                                                                   int64_t num_items) {
  TORCH_CHECK(pos_in.device().is_cpu() && neg_in.device().is_cpu(),
              "adaptau::compact_indices: expected CPU tensors");
  TORCH_CHECK(num_items >= 1 && num_items <= INT32_MAX,
              "adaptau::compact_indices: num_items must be in [1, 2^31 - 1], got ", num_items);
  for (const at::Tensor* t : {&pos_in, &neg_in})
    TORCH_CHECK(t->scalar_type() == at::kInt || t->scalar_type() == at::kLong,
                "adaptau::compact_indices: indices must be int32 or int64, got ", t->scalar_type());
  const at::Tensor pos = pos_in.contiguous(), neg = neg_in.contiguous();
  return ADAPTAU_CPU_DISPATCH(compact_indices, pos, neg, num_items);
}

}  // namespace
}  // namespace cpu
}  // namespace adaptau

TORCH_LIBRARY_IMPL(adaptau, CPU, m) { m.impl("compact_indices", &adaptau::cpu::compact_indices_cpu); }
