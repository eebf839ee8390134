// adaptau fused sampled-softmax loss: the CPU backend (forward and backward).
//
// The kernels behind torch.ops.adaptau.fused_forward / fused_backward for CPU tensors (the
// contract is written in adaptau/loss/ops.py; csrc/softmax_loss_cpu.cpp checks the inputs
// and dispatches here). This header is compiled once per CPU capability, by
// softmax_loss_kernel_<capability>.cpp, into the namespace adaptau::cpu::<capability>;
// Vec<T> (cpu_simd.h) is that capability's vector. Nothing of size [B, M, D] is ever built.
// Parts: vector_ops.h (row helpers and micro-kernels), loss_context.h (LossContext),
// per_row.h (neg_mode 0), gemm_modes.h (neg_modes 1 and 2); runtime.h (pool, tuning,
// SavedCache) is shared by every capability.
//
// Per-row negatives (neg_mode 0); details above per_row_forward.
//   sort     each block of 64 rows' pairs is counting-sorted by (item chunk, row); a chunk
//            is a power-of-two range of table rows whose normalized copy fits in L2
//            (ADAPTAU_CPU_CHUNK_BYTES, 256 KiB), so gathers hit L2 and one thread owns a
//            chunk.
//   forward  G groups of chunks in parallel: normalize each referenced table row once;
//            for every row's run in the chunk, ŝ = <û, r̂> with the user vector in
//            registers, and a flash-style running state per (group, row): max m, Σe^{l-m},
//            Σe^{l-m}·ŝ and Σe^{l-m}·r̂. Rows merge their G states in group order → lse.
//   backward the state gives the user gradient and dβ directly; one more pass over the
//            pairs, from the scores the forward stored, adds d·û to the chunk's item-
//            gradient accumulator (owned by its thread: no atomics, no [N, D] copies).
//            The forward's sort, scores and states are kept for the backward of the same
//            call (SavedCache, keyed on every input's data pointer and version counter);
//            without them the backward recomputes them.
// Shared (neg_mode 1) and in-batch (neg_mode 2) negatives: every row sees the same
// candidates, so scores are blocked matrix products (register-tiled micro-kernel over
// packed candidate panels) with a running max. The forward keeps the [B, M] scores for the
// backward of the same call when they fit ADAPTAU_CPU_SAVED_SCORES_BYTES (32 MiB; else the
// backward recomputes each tile); the backward accumulates candidate gradients per group
// of row blocks, merged in group order.
//
// Numerics: accumulation in float32 for float16/bfloat16/float32 inputs (the first two
// are upcast on entry and their gradients cast back) and float64 for float64; running-max
// log-sum-exp. Determinism: G and every other partition depend on the problem only, never
// on the thread count, and every sum has a fixed order, so results are bitwise identical
// run to run and across thread counts on one capability (tests/test_cpu_backend.py checks
// 1, 2, 3 threads; tests/test_cpu_capability.py each capability). Capabilities differ in
// vector width, so their sums associate differently: results agree within rounding, not
// bitwise.
// The grouped passes use at most G = ADAPTAU_CPU_GROUPS (8) threads. Scratch comes from a
// process-wide pool; blocks of 512 KiB and more are transparent huge pages.
// ADAPTAU_CPU_PROFILE=1 prints per-phase times to stderr.
//
// Hot loops: the per-run micro-kernels are forced inline, the inner loops keep the row
// stride a compile-time constant and the sort stores each pair's row offset in the chunk
// buffer (an addressing mode of the loads, no index arithmetic), lanes are broadcast by
// immediate (no control registers to spill), the scatter's loads stay in their own
// register, the sort runs on unsigned indices unrolled by 4 with a vectorized range check
// (which raises Python's IndexError; ops.py leaves the indices to this backend), and in the
// common case (normalized, no logq, no hit removal, |β| small enough for the fixed
// reference) a run's exps and sums are one loop with masked tails and no running max, and
// the backward reuses the forward's exps. What they cost: docs/performance.md.
#include <ATen/ATen.h>
#pragma once

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>

#include <memory>
#include <type_traits>

#include "gemm_modes.h"
#include "per_row.h"
#include "softmax_loss_kernel.h"

namespace adaptau {
namespace cpu {
namespace ADAPTAU_CPU_CAPABILITY {
namespace {

// ==================================================================== entry points
template <typename T>
int64_t choose_nv(int64_t D) {
  constexpr int W = Vec<T>::W;
  const int64_t need = (D + W - 1) / W;
  if (W == 1) return 0;
  for (int64_t nv : {1, 2, 4, 8, 16})
    if (need <= nv) return nv;
  return 0;
}

template <typename T>
int64_t padded_dim(int64_t D) {
  constexpr int W = Vec<T>::W;
  const int64_t nv = choose_nv<T>(D);
  return nv > 0 ? nv * W : round_up(D, W);
}

template <typename T, typename F>
void with_nv(int64_t D, F&& f) {
  switch (choose_nv<T>(D)) {
    case 1:
      f(std::integral_constant<int, 1>());
      break;
    case 2:
      f(std::integral_constant<int, 2>());
      break;
    case 4:
      f(std::integral_constant<int, 4>());
      break;
    case 8:
      f(std::integral_constant<int, 8>());
      break;
    case 16:
      f(std::integral_constant<int, 16>());
      break;
    default:
      f(std::integral_constant<int, 0>());
      break;
  }
}

template <typename T>
LossContext<T> make_context(const Inputs& inputs, const LossOptions& options,
                            std::shared_ptr<const PreparedRows<T>> kept = nullptr) {
  LossContext<T> context;
  context.B = inputs.B;
  context.N = inputs.N;
  context.D = inputs.D;
  context.M = inputs.M;
  context.Dp = padded_dim<T>(inputs.D);
  context.neg_mode = options.neg_mode;
  context.include_pos = options.include_pos;
  context.normalize = options.normalize;
  context.remove_hits = options.remove_hits;
  context.user = inputs.user.data_ptr<T>();
  context.items = inputs.items.data_ptr<T>();
  context.alpha = inputs.alpha.data_ptr<T>();
  context.beta = inputs.beta.data_ptr<T>();
  context.logq = inputs.logq.defined() ? inputs.logq.data_ptr<T>() : nullptr;
  context.neg = inputs.neg.data_ptr();
  context.neg_is_int64 = inputs.neg.scalar_type() == at::kLong;
  prepare_rows(context, inputs.pos, std::move(kept));
  return context;
}

// The entry points (declared in softmax_loss_kernel.h), outside the anonymous namespace.
}  // namespace

void softmax_loss_forward(const Inputs& inputs, const LossOptions& options, const SavedKey& key,
                          bool compute_raw, at::Tensor& loss, at::Tensor& lse, at::Tensor& raw) {
  AT_DISPATCH_FLOATING_TYPES(inputs.user.scalar_type(), "adaptau_fused_forward_cpu", [&] {
    using T = scalar_t;
    PhaseTimer timer;
    LossContext<T> context = make_context<T>(inputs, options);
    context.key = key;
    timer.mark("prepare rows");
    T* rawp = compute_raw ? raw.data_ptr<T>() : nullptr;
    with_nv<T>(inputs.D, [&](auto nvc) {
      constexpr int NV = decltype(nvc)::value;
      if (options.neg_mode == kNegPerRow)
        per_row_forward<T, NV>(context, loss.data_ptr<T>(), lse.data_ptr<T>(), rawp, compute_raw);
      else
        gemm_forward<T, NV>(context, inputs.neg, loss.data_ptr<T>(), lse.data_ptr<T>(), rawp, compute_raw);
    });
  });
}

void softmax_loss_backward(const Inputs& inputs, const LossOptions& options, const SavedKey& key,
                           const at::Tensor& grad_loss, const at::Tensor& lse, bool need_scale_grads,
                           at::Tensor& grad_user, at::Tensor& grad_items, at::Tensor& grad_alpha,
                           at::Tensor& grad_beta) {
  AT_DISPATCH_FLOATING_TYPES(inputs.user.scalar_type(), "adaptau_fused_backward_cpu", [&] {
    using T = scalar_t;
    PhaseTimer timer;
    // What the forward of the same call kept (the key holds neg_mode and the capability,
    // so the type is known): per-row mode its plan, state and prepared rows; GEMM modes
    // their candidates, scores and prepared rows.
    std::shared_ptr<void> found = SavedCache::get().take(key);
    std::shared_ptr<Saved<T>> saved;
    std::shared_ptr<SavedTiles<T>> tiles;
    std::shared_ptr<const PreparedRows<T>> rows;
    if (found != nullptr && options.neg_mode == kNegPerRow) {
      saved = std::static_pointer_cast<Saved<T>>(found);
      rows = saved->rows;
    } else if (found != nullptr) {
      tiles = std::static_pointer_cast<SavedTiles<T>>(found);
      rows = tiles->rows;
    }
    LossContext<T> context = make_context<T>(inputs, options, rows);
    timer.mark(rows != nullptr ? "prepare rows (saved)" : "prepare rows");
    with_nv<T>(inputs.D, [&](auto nvc) {
      constexpr int NV = decltype(nvc)::value;
      if (options.neg_mode == kNegPerRow)
        per_row_backward<T, NV>(context, saved, grad_loss.data_ptr<T>(), lse.data_ptr<T>(),
                                grad_user.data_ptr<T>(), grad_items.data_ptr<T>(), grad_alpha.data_ptr<T>(),
                                grad_beta.data_ptr<T>(), need_scale_grads);
      else
        gemm_backward<T, NV>(context, tiles, inputs.neg, grad_loss.data_ptr<T>(), lse.data_ptr<T>(),
                             grad_user.data_ptr<T>(), grad_items.data_ptr<T>(), grad_alpha.data_ptr<T>(),
                             grad_beta.data_ptr<T>(), need_scale_grads);
    });
  });
}

}  // namespace ADAPTAU_CPU_CAPABILITY
}  // namespace cpu
}  // namespace adaptau
