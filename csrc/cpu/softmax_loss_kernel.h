// The interface between the softmax-loss glue (csrc/softmax_loss_cpu.cpp: checks, keys,
// outputs, dispatch) and its kernels, compiled once per CPU capability
// (csrc/cpu/softmax_loss_kernel_<capability>.cpp, from softmax_loss_kernel_impl.h).
#pragma once

#include <ATen/ATen.h>

#include <cstdint>

#include "capability.h"
#include "runtime.h"

namespace adaptau {
namespace cpu {

// A call's inputs after the checks: user, items, scales and neg_logq converted to the
// accumulation dtype (float32, or float64 for float64 input) and contiguous; pos and neg
// contiguous (their ranges are checked by the kernels, before any use).
struct Inputs {
  at::Tensor user, items, pos, neg, alpha, beta, logq;
  at::ScalarType in_dtype, acc_dtype;
  int64_t B, N, D, M;
};

struct LossOptions {
  int64_t neg_mode;  // kNegPerRow, kNegShared or kNegInBatch
  bool include_pos, normalize, remove_hits;
};

// Forward: fills loss, lse ([B], accumulation dtype) and, when compute_raw, raw [B]; keeps
// its state for the backward under `key` (SavedCache).
// Backward: fills grad_user [B, D], grad_items [N, D], grad_alpha and grad_beta [B] (all
// in the accumulation dtype) from grad_loss and lse ([B], accumulation dtype, contiguous),
// with the state the forward kept under `key` when it is there.
ADAPTAU_CPU_DECLARE(void softmax_loss_forward(const Inputs& inputs, const LossOptions& options,
                                              const SavedKey& key, bool compute_raw, at::Tensor& loss,
                                              at::Tensor& lse, at::Tensor& raw);
                    void softmax_loss_backward(const Inputs& inputs, const LossOptions& options,
                                               const SavedKey& key, const at::Tensor& grad_loss,
                                               const at::Tensor& lse, bool need_scale_grads,
                                               at::Tensor& grad_user, at::Tensor& grad_items,
                                               at::Tensor& grad_alpha, at::Tensor& grad_beta))

}  // namespace cpu
}  // namespace adaptau
