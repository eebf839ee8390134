// adaptau fused sampled-softmax loss on the CPU: the glue, compiled once with the baseline
// flags. Checks the inputs of torch.ops.adaptau.fused_forward / fused_backward (raising
// Python's exceptions before any kernel runs), allocates the outputs, and calls the
// kernels of the active CPU capability (csrc/cpu/capability.h): csrc/cpu/
// softmax_loss_kernel_impl.h, compiled once per capability. The range of the indices is
// checked by the kernels, vectorized, before any index is used.
#include <ATen/ATen.h>
#include <torch/library.h>

#include <cmath>
#include <cstdint>
#include <initializer_list>
#include <limits>
#include <optional>
#include <tuple>
#include <vector>

#include "contract.h"
#include "cpu/capability.h"
#include "cpu/runtime.h"
#include "cpu/softmax_loss_kernel.h"

namespace adaptau {
namespace cpu {
namespace {

// Raises the ValueError of Python's finiteness check (adaptau/loss/ops.py, which leaves
// the scales and neg_logq to this backend) when t (contiguous, float or double) has a NaN
// or an infinity, or (scales: limit = kMaxInverseTemperature) a value beyond +-limit. The
// scan has no early exit (it vectorizes); the message names the first offender.
template <typename T>
void check_finite_values(const at::Tensor& t, const char* name, double limit) {
  const T* p = t.data_ptr<T>();
  const int64_t n = t.numel();
  const T bound = limit < double(std::numeric_limits<T>::max()) ? T(limit) : std::numeric_limits<T>::max();
  int bad = 0;
  for (int64_t i = 0; i < n; ++i) bad |= !(std::abs(p[i]) <= bound);
  if (!bad) return;
  for (int64_t i = 0; i < n; ++i) {
    if (std::abs(p[i]) <= bound) continue;
    if (!std::isfinite(p[i])) {
      const char* v = std::isnan(p[i]) ? "nan" : (p[i] > 0 ? "inf" : "-inf");
      TORCH_CHECK_VALUE(false, name, " must be finite; ", name, "[", i, "] = ", v);
    }
    TORCH_CHECK_VALUE(false, name, " must be an inverse temperature with |value| <= ", limit, "; ", name, "[",
                      i, "] = ", double(p[i]));
  }
}

void check_finite(const at::Tensor& t, const char* name, double limit = std::numeric_limits<double>::max()) {
  if (t.scalar_type() == at::kDouble)
    check_finite_values<double>(t, name, limit);
  else
    check_finite_values<float>(t, name, limit);
}

Inputs check_inputs(const at::Tensor& user, const at::Tensor& items, const at::Tensor& pos,
                    const at::Tensor& neg, const at::Tensor& pos_scale, const at::Tensor& neg_scale,
                    const std::optional<at::Tensor>& neg_logq, int64_t neg_mode) {
  TORCH_CHECK(user.device().is_cpu() && items.device().is_cpu() && pos.device().is_cpu() &&
                  neg.device().is_cpu() && pos_scale.device().is_cpu() && neg_scale.device().is_cpu(),
              "adaptau cpu: every tensor must be on the CPU");
  TORCH_CHECK(user.dim() == 2 && items.dim() == 2, "adaptau cpu: user and items must be 2-D, got ",
              user.sizes(), " and ", items.sizes());
  TORCH_CHECK(user.scalar_type() == items.scalar_type(), "adaptau cpu: user is ", user.scalar_type(),
              " but items is ", items.scalar_type());
  const auto dt = user.scalar_type();
  TORCH_CHECK(dt == at::kFloat || dt == at::kDouble || dt == at::kHalf || dt == at::kBFloat16,
              "adaptau cpu: user/items must be float16, bfloat16, float32 or float64, got ", dt);
  Inputs inputs;
  inputs.in_dtype = dt;
  inputs.acc_dtype = dt == at::kDouble ? at::kDouble : at::kFloat;
  inputs.B = user.size(0);
  inputs.D = user.size(1);
  inputs.N = items.size(0);
  TORCH_CHECK(inputs.B >= 1 && inputs.D >= 1 && inputs.N >= 1 && items.size(1) == inputs.D,
              "adaptau cpu: need user [B>=1, D>=1] and items [N>=1, D], got ", user.sizes(), " and ",
              items.sizes());
  TORCH_CHECK(inputs.N < (int64_t(1) << 31) - 1,
              "adaptau cpu: the item table has too many rows for int32 indexing");
  TORCH_CHECK(pos.dim() == 1 && pos.size(0) == inputs.B, "adaptau cpu: pos must be [B=", inputs.B, "], got ",
              pos.sizes());
  TORCH_CHECK(pos.scalar_type() == at::kLong || pos.scalar_type() == at::kInt,
              "adaptau cpu: pos must be int32 or int64, got ", pos.scalar_type());
  TORCH_CHECK(neg.scalar_type() == at::kLong || neg.scalar_type() == at::kInt,
              "adaptau cpu: neg must be int32 or int64, got ", neg.scalar_type());
  if (neg_mode == kNegPerRow) {
    TORCH_CHECK(neg.dim() == 2 && neg.size(0) == inputs.B && neg.size(1) >= 1,
                "adaptau cpu: per-row neg must be [B=", inputs.B, ", M>=1], got ", neg.sizes());
    inputs.M = neg.size(1);
    TORCH_CHECK(inputs.B * inputs.M < (int64_t(1) << 31) - 1, "adaptau cpu: B*M = ", inputs.B * inputs.M,
                " pairs is too many for one call; split the batch");
  } else if (neg_mode == kNegShared) {
    TORCH_CHECK(neg.dim() == 1 && neg.size(0) >= 1, "adaptau cpu: shared neg must be [M>=1], got ",
                neg.sizes());
    inputs.M = neg.size(0);
  } else if (neg_mode == kNegInBatch) {
    TORCH_CHECK(inputs.B >= 2, "adaptau cpu: in-batch negatives need B >= 2");
    inputs.M = inputs.B - 1;
  } else {
    TORCH_CHECK(false, "adaptau cpu: unknown neg_mode ", neg_mode);
  }
  TORCH_CHECK(pos_scale.dim() == 1 && pos_scale.size(0) == inputs.B && neg_scale.dim() == 1 &&
                  neg_scale.size(0) == inputs.B,
              "adaptau cpu: pos_scale and neg_scale must be [B=", inputs.B, "], got ", pos_scale.sizes(),
              " and ", neg_scale.sizes());
  TORCH_CHECK(pos_scale.is_floating_point() && neg_scale.is_floating_point(),
              "adaptau cpu: scales must be floating tensors");
  inputs.user = user.to(inputs.acc_dtype).contiguous();
  inputs.items = items.to(inputs.acc_dtype).contiguous();
  inputs.pos = pos.contiguous();
  inputs.neg = neg.contiguous();
  inputs.alpha = pos_scale.to(inputs.acc_dtype).contiguous();
  inputs.beta = neg_scale.to(inputs.acc_dtype).contiguous();
  check_finite(inputs.alpha, "pos_scale", kMaxInverseTemperature);
  check_finite(inputs.beta, "neg_scale", kMaxInverseTemperature);
  if (neg_logq.has_value() && neg_logq->defined()) {
    const at::Tensor& lq = *neg_logq;
    TORCH_CHECK(lq.device().is_cpu() && lq.dim() == 1 && lq.size(0) == inputs.N && lq.is_floating_point(),
                "adaptau cpu: neg_logq must be a floating [N=", inputs.N, "] CPU tensor, got ", lq.sizes());
    inputs.logq = lq.to(inputs.acc_dtype).contiguous();
    check_finite(inputs.logq, "neg_logq");
  }
  return inputs;
}

// The key of a call: its input tensors as the op received them (data pointer and version
// counter; inference tensors have no version counter, so their calls are not cached) and
// the options, with the CPU capability that runs it.
SavedKey call_key(std::initializer_list<const at::Tensor*> tensors, std::vector<int64_t> opts) {
  SavedKey k;
  for (const at::Tensor* t : tensors) {
    if (t == nullptr || !t->defined()) {
      k.ids.emplace_back(nullptr, -1);
      continue;
    }
    if (t->is_inference()) k.valid = false;
    k.ids.emplace_back(t->data_ptr(), k.valid ? int64_t(t->_version()) : int64_t(-1));
    for (int64_t d = 0; d < t->dim(); ++d) opts.push_back(t->size(d));
    opts.push_back(static_cast<int64_t>(t->scalar_type()));
  }
  k.opts = std::move(opts);
  return k;
}

// The key of a fused_forward / fused_backward call on these inputs and options (the same
// for a forward and the backward of the same call).
SavedKey op_key(const at::Tensor& user, const at::Tensor& items, const at::Tensor& pos, const at::Tensor& neg,
                const at::Tensor& pos_scale, const at::Tensor& neg_scale,
                const std::optional<at::Tensor>& neg_logq, const LossOptions& options) {
  return call_key({&user, &items, &pos, &neg, &pos_scale, &neg_scale, neg_logq ? &*neg_logq : nullptr},
                  {options.neg_mode, options.include_pos, options.normalize, options.remove_hits,
                   static_cast<int64_t>(active_capability())});
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> fused_forward_cpu(
    const at::Tensor& user, const at::Tensor& items, const at::Tensor& pos, const at::Tensor& neg,
    const at::Tensor& pos_scale, const at::Tensor& neg_scale, const std::optional<at::Tensor>& neg_logq,
    int64_t neg_mode, bool include_pos, bool normalize, bool remove_hits, bool compute_raw) {
  Inputs inputs = check_inputs(user, items, pos, neg, pos_scale, neg_scale, neg_logq, neg_mode);
  const LossOptions options{neg_mode, include_pos, normalize, remove_hits};
  auto opts = inputs.user.options();
  at::Tensor loss = at::empty({inputs.B}, opts);
  at::Tensor lse = at::empty({inputs.B}, opts);
  at::Tensor raw = at::empty({compute_raw ? inputs.B : 0}, opts);
  const SavedKey key = op_key(user, items, pos, neg, pos_scale, neg_scale, neg_logq, options);
  ADAPTAU_CPU_DISPATCH(softmax_loss_forward, inputs, options, key, compute_raw, loss, lse, raw);
  return {loss, lse, raw};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> fused_backward_cpu(
    const at::Tensor& grad_loss, const at::Tensor& user, const at::Tensor& items, const at::Tensor& pos,
    const at::Tensor& neg, const at::Tensor& pos_scale, const at::Tensor& neg_scale,
    const std::optional<at::Tensor>& neg_logq, const at::Tensor& lse, int64_t neg_mode, bool include_pos,
    bool normalize, bool remove_hits, bool need_scale_grads) {
  Inputs inputs = check_inputs(user, items, pos, neg, pos_scale, neg_scale, neg_logq, neg_mode);
  TORCH_CHECK(
      grad_loss.dim() == 1 && grad_loss.size(0) == inputs.B && lse.dim() == 1 && lse.size(0) == inputs.B,
      "adaptau cpu: grad_loss and lse must be [B=", inputs.B, "], got ", grad_loss.sizes(), " and ",
      lse.sizes());
  const LossOptions options{neg_mode, include_pos, normalize, remove_hits};
  at::Tensor grad_loss_acc = grad_loss.to(inputs.acc_dtype).contiguous();
  at::Tensor lse_acc = lse.to(inputs.acc_dtype).contiguous();
  auto opts = inputs.user.options();
  at::Tensor grad_user = at::empty({inputs.B, inputs.D}, opts);
  at::Tensor grad_items = pooled_empty(inputs.N, inputs.D, opts);
  at::Tensor grad_alpha = at::empty({inputs.B}, opts);
  at::Tensor grad_beta = at::empty({inputs.B}, opts);
  const SavedKey key = op_key(user, items, pos, neg, pos_scale, neg_scale, neg_logq, options);
  ADAPTAU_CPU_DISPATCH(softmax_loss_backward, inputs, options, key, grad_loss_acc, lse_acc, need_scale_grads,
                       grad_user, grad_items, grad_alpha, grad_beta);
  if (inputs.in_dtype != inputs.acc_dtype) {
    grad_user = grad_user.to(inputs.in_dtype);
    grad_items = grad_items.to(inputs.in_dtype);
  }
  return {grad_user, grad_items, grad_alpha, grad_beta};
}

}  // namespace
}  // namespace cpu
}  // namespace adaptau

TORCH_LIBRARY_IMPL(adaptau, CPU, m) {
  m.impl("fused_forward", &adaptau::cpu::fused_forward_cpu);
  m.impl("fused_backward", &adaptau::cpu::fused_backward_cpu);
}
