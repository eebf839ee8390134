// Plain launchers of adaptau's CUDA kernels (implemented in softmax_loss_kernels.cu).
//
// No torch here: raw pointers, sizes, flags and a cudaStream_t in, a cudaError_t out.
// The tensor glue (softmax_loss_cuda.cpp) allocates, checks and registers the ops.
// The contract (shapes, dtypes, meaning of outputs) is documented in adaptau/ops.py.
#pragma once

#include <cstddef>
#include <cstdint>

#include <cuda_runtime.h>

namespace adaptau_cuda {

// Element type of user/items (and of grad_user/grad_items).
enum DType : int { kFloat32 = 0, kFloat16 = 1, kBFloat16 = 2, kFloat64 = 3 };

// One call's inputs. "acc" below is double for kFloat64 and float otherwise.
struct Problem {
  int dtype;              // DType of user/items
  bool index64;           // pos/neg are int64 (else int32)
  const void* user;       // [B, D] dtype
  const void* items;      // [N, D] dtype
  const void* pos;        // [B] index
  const void* neg;        // [B, M] (neg_mode 0), [M] (1), unused (2: may be null)
  const void* pos_scale;  // [B] acc
  const void* neg_scale;  // [B] acc
  const void* neg_logq;   // [N] acc, or nullptr
  int64_t B, N, D;
  int64_t M;     // candidates per row: neg.size(1) / neg.size(0) / B (in-batch)
  int neg_mode;  // 0 per-row, 1 shared, 2 in-batch
  bool include_pos, normalize, remove_hits;
};

// loss, lse: [B] acc; raw: [B] acc (written only when compute_raw, may be null otherwise).
cudaError_t forward(const Problem& problem, bool compute_raw, void* loss, void* lse, void* raw,
                    cudaStream_t stream);

// grad_loss, lse: [B] acc. grad_user: [B, D] dtype. grad_items: [N, D] dtype.
// item_accum: [N, D] acc scratch, zeroed here; it may be the same buffer as grad_items
// when dtype is the accumulation dtype (float32/float64).
// grad_pos_scale, grad_neg_scale: [B] acc (always written).
cudaError_t backward(const Problem& problem, const void* grad_loss, const void* lse, void* grad_user,
                     void* grad_items, void* item_accum, void* grad_pos_scale, void* grad_neg_scale,
                     cudaStream_t stream);

// Bytes of item_accum that backward needs (N·D·sizeof(acc)).
size_t item_accum_bytes(const Problem& problem);

}  // namespace adaptau_cuda
