// Tensor glue of the CUDA backend: TORCH_LIBRARY_IMPL(adaptau, CUDA, ...) for
// adaptau::fused_forward / fused_backward (schemas in csrc/registration.cpp, contract in
// adaptau/ops.py). Allocates outputs, takes the current stream, calls the plain launchers
// of softmax_loss_kernels.cu and turns a cudaError_t into a Python exception.
// Compiled only when torch has CUDA (setup.py adds csrc/cuda/*.cpp then).
#include <ATen/ATen.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <optional>
#include <tuple>

#include "../contract.h"
#include "softmax_loss_cuda.h"

namespace {

int dtype_code(at::ScalarType type) {
  switch (type) {
    case at::kFloat:
      return adaptau_cuda::kFloat32;
    case at::kHalf:
      return adaptau_cuda::kFloat16;
    case at::kBFloat16:
      return adaptau_cuda::kBFloat16;
    case at::kDouble:
      return adaptau_cuda::kFloat64;
    default:
      TORCH_CHECK(false, "adaptau CUDA backend: unsupported dtype ", type,
                  " (float16, bfloat16, float32 or float64)");
  }
  return -1;
}

at::ScalarType acc_type(at::ScalarType type) { return type == at::kDouble ? at::kDouble : at::kFloat; }

void check_cuda(cudaError_t err, const char* what) {
  TORCH_CHECK(err == cudaSuccess, "adaptau CUDA backend: ", what, " failed: ", cudaGetErrorString(err));
}

void check_on_device(const at::Tensor& t, const at::Tensor& like, const char* name) {
  TORCH_CHECK(t.is_cuda(), "adaptau CUDA backend: ", name, " must be a CUDA tensor");
  TORCH_CHECK(t.device() == like.device(), "adaptau CUDA backend: ", name, " is on ", t.device(),
              " but user is on ", like.device());
}

// Inputs normalised for the launchers (contiguous, matching index dtypes, acc-typed scales);
// keeps the tensors alive while the pointers are used.
struct Prepared {
  at::Tensor user, items, pos, neg, pos_scale, neg_scale, neg_logq;
  adaptau_cuda::Problem problem;
};

Prepared prepare(const at::Tensor& user, const at::Tensor& items, const at::Tensor& pos,
                 const at::Tensor& neg, const at::Tensor& pos_scale, const at::Tensor& neg_scale,
                 const std::optional<at::Tensor>& neg_logq, int64_t neg_mode, bool include_pos,
                 bool normalize, bool remove_hits) {
  TORCH_CHECK(user.dim() == 2 && items.dim() == 2 && user.size(1) == items.size(1),
              "adaptau CUDA backend: user [B, D] and items [N, D] expected");
  TORCH_CHECK(user.scalar_type() == items.scalar_type(),
              "adaptau CUDA backend: user and items dtypes differ");
  TORCH_CHECK(neg_mode >= 0 && neg_mode <= 2, "adaptau CUDA backend: bad neg_mode ", neg_mode);
  check_on_device(user, user, "user");
  check_on_device(items, user, "items");
  check_on_device(pos, user, "pos");
  check_on_device(pos_scale, user, "pos_scale");
  check_on_device(neg_scale, user, "neg_scale");
  if (neg_mode != 2) check_on_device(neg, user, "neg");

  Prepared prepared;
  const auto acc = acc_type(user.scalar_type());
  prepared.user = user.contiguous();
  prepared.items = items.contiguous();
  prepared.pos = pos.contiguous();
  prepared.neg = neg.contiguous();
  if (neg_mode != 2 && prepared.pos.scalar_type() != prepared.neg.scalar_type()) {
    prepared.pos = prepared.pos.to(at::kLong);
    prepared.neg = prepared.neg.to(at::kLong);
  }
  const auto index_type = prepared.pos.scalar_type();
  TORCH_CHECK(index_type == at::kLong || index_type == at::kInt,
              "adaptau CUDA backend: indices must be int32 or int64");
  prepared.pos_scale = pos_scale.to(acc).contiguous();
  prepared.neg_scale = neg_scale.to(acc).contiguous();
  if (neg_logq.has_value() && neg_logq->defined()) {
    check_on_device(*neg_logq, user, "neg_logq");
    prepared.neg_logq = neg_logq->to(acc).contiguous();
  }

  const int64_t batch = prepared.user.size(0);
  int64_t m = batch;
  if (neg_mode == adaptau::kNegPerRow) {
    TORCH_CHECK(prepared.neg.dim() == 2 && prepared.neg.size(0) == batch,
                "adaptau CUDA backend: per-row neg must be [B, M]");
    m = prepared.neg.size(1);
  } else if (neg_mode == adaptau::kNegShared) {
    TORCH_CHECK(prepared.neg.dim() == 1, "adaptau CUDA backend: shared neg must be [M]");
    m = prepared.neg.size(0);
  } else {
    TORCH_CHECK(batch >= 2, "adaptau CUDA backend: in-batch negatives need B >= 2");
  }
  TORCH_CHECK(prepared.pos.dim() == 1 && prepared.pos.size(0) == batch,
              "adaptau CUDA backend: pos must be [B]");
  TORCH_CHECK(prepared.pos_scale.numel() == batch && prepared.neg_scale.numel() == batch,
              "adaptau CUDA backend: pos_scale / neg_scale must be [B]");
  TORCH_CHECK(batch >= 1 && prepared.items.size(0) >= 1 && prepared.user.size(1) >= 1 && m >= 1,
              "adaptau CUDA backend: empty input");

  adaptau_cuda::Problem& problem = prepared.problem;
  problem.dtype = dtype_code(prepared.user.scalar_type());
  problem.index64 = index_type == at::kLong;
  problem.user = prepared.user.data_ptr();
  problem.items = prepared.items.data_ptr();
  problem.pos = prepared.pos.data_ptr();
  problem.neg = neg_mode == adaptau::kNegInBatch ? nullptr : prepared.neg.data_ptr();
  problem.pos_scale = prepared.pos_scale.data_ptr();
  problem.neg_scale = prepared.neg_scale.data_ptr();
  problem.neg_logq = prepared.neg_logq.defined() ? prepared.neg_logq.data_ptr() : nullptr;
  problem.B = batch;
  problem.N = prepared.items.size(0);
  problem.D = prepared.user.size(1);
  problem.M = m;
  problem.neg_mode = static_cast<int>(neg_mode);
  problem.include_pos = include_pos;
  problem.normalize = normalize;
  problem.remove_hits = remove_hits;
  return prepared;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> fused_forward_cuda(
    const at::Tensor& user, const at::Tensor& items, const at::Tensor& pos, const at::Tensor& neg,
    const at::Tensor& pos_scale, const at::Tensor& neg_scale, const std::optional<at::Tensor>& neg_logq,
    int64_t neg_mode, bool include_pos, bool normalize, bool remove_hits, bool compute_raw) {
  const c10::cuda::CUDAGuard guard(user.device());
  Prepared prepared = prepare(user, items, pos, neg, pos_scale, neg_scale, neg_logq, neg_mode, include_pos,
                              normalize, remove_hits);
  const auto opts = prepared.user.options().dtype(acc_type(prepared.user.scalar_type()));
  const int64_t batch = prepared.problem.B;
  at::Tensor loss = at::empty({batch}, opts);
  at::Tensor lse = at::empty({batch}, opts);
  at::Tensor raw = at::empty({compute_raw ? batch : 0}, opts);
  cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  check_cuda(adaptau_cuda::forward(prepared.problem, compute_raw, loss.data_ptr(), lse.data_ptr(),
                                   compute_raw ? raw.data_ptr() : nullptr, stream),
             "fused_forward");
  return std::make_tuple(loss, lse, raw);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> fused_backward_cuda(
    const at::Tensor& grad_loss, const at::Tensor& user, const at::Tensor& items, const at::Tensor& pos,
    const at::Tensor& neg, const at::Tensor& pos_scale, const at::Tensor& neg_scale,
    const std::optional<at::Tensor>& neg_logq, const at::Tensor& lse, int64_t neg_mode, bool include_pos,
    bool normalize, bool remove_hits, bool need_scale_grads) {
  const c10::cuda::CUDAGuard guard(user.device());
  Prepared prepared = prepare(user, items, pos, neg, pos_scale, neg_scale, neg_logq, neg_mode, include_pos,
                              normalize, remove_hits);
  const auto acc = acc_type(prepared.user.scalar_type());
  const int64_t batch = prepared.problem.B;
  check_on_device(grad_loss, user, "grad_loss");
  check_on_device(lse, user, "lse");
  at::Tensor grad_loss_c = grad_loss.to(acc).contiguous();
  at::Tensor lse_c = lse.to(acc).contiguous();
  TORCH_CHECK(grad_loss_c.numel() == batch && lse_c.numel() == batch,
              "adaptau CUDA backend: grad_loss and lse must be [B]");

  at::Tensor grad_user = at::empty_like(prepared.user);
  at::Tensor grad_items = at::empty_like(prepared.items);
  // When the input dtype is the accumulation dtype the item accumulator is the output.
  at::Tensor accum = prepared.items.scalar_type() == acc
                         ? grad_items
                         : at::empty(prepared.items.sizes(), prepared.items.options().dtype(acc));
  const auto opts = prepared.user.options().dtype(acc);
  at::Tensor grad_pos_scale = at::empty({batch}, opts);
  at::Tensor grad_neg_scale = at::empty({batch}, opts);
  cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  check_cuda(adaptau_cuda::backward(prepared.problem, grad_loss_c.data_ptr(), lse_c.data_ptr(),
                                    grad_user.data_ptr(), grad_items.data_ptr(), accum.data_ptr(),
                                    grad_pos_scale.data_ptr(), grad_neg_scale.data_ptr(), stream),
             "fused_backward");
  (void)need_scale_grads;  // scale gradients cost nothing extra: always computed
  return std::make_tuple(grad_user, grad_items, grad_pos_scale, grad_neg_scale);
}

}  // namespace

TORCH_LIBRARY_IMPL(adaptau, CUDA, m) {
  m.impl("fused_forward", &fused_forward_cuda);
  m.impl("fused_backward", &fused_backward_cuda);
}
