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

at::ScalarType acc_type(at::ScalarType type) {
  return type == at::kDouble ? at::kDouble : at::kFloat;
}

void check_cuda(cudaError_t err, const char* what) {
  TORCH_CHECK(err == cudaSuccess, "adaptau CUDA backend: ", what, " failed: ",
              cudaGetErrorString(err));
}

void check_on_device(const at::Tensor& t, const at::Tensor& like, const char* name) {
  TORCH_CHECK(t.is_cuda(), "adaptau CUDA backend: ", name, " must be a CUDA tensor");
  TORCH_CHECK(t.device() == like.device(), "adaptau CUDA backend: ", name, " is on ",
              t.device(), " but user is on ", like.device());
}

// Inputs normalised for the launchers (contiguous, matching index dtypes, acc-typed scales);
// keeps the tensors alive while the pointers are used.
struct Prepared {
  at::Tensor user, items, pos, neg, pos_scale, neg_scale, neg_logq;
  adaptau_cuda::Problem problem;
};

Prepared prepare(const at::Tensor& user, const at::Tensor& items, const at::Tensor& pos,
                 const at::Tensor& neg, const at::Tensor& pos_scale,
                 const at::Tensor& neg_scale, const std::optional<at::Tensor>& neg_logq,
                 int64_t neg_mode, bool include_pos, bool normalize, bool remove_hits) {
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

  Prepared p;
  const auto acc = acc_type(user.scalar_type());
  p.user = user.contiguous();
  p.items = items.contiguous();
  p.pos = pos.contiguous();
  p.neg = neg.contiguous();
  if (neg_mode != 2 && p.pos.scalar_type() != p.neg.scalar_type()) {
    p.pos = p.pos.to(at::kLong);
    p.neg = p.neg.to(at::kLong);
  }
  const auto index_type = p.pos.scalar_type();
  TORCH_CHECK(index_type == at::kLong || index_type == at::kInt,
              "adaptau CUDA backend: indices must be int32 or int64");
  p.pos_scale = pos_scale.to(acc).contiguous();
  p.neg_scale = neg_scale.to(acc).contiguous();
  if (neg_logq.has_value() && neg_logq->defined()) {
    check_on_device(*neg_logq, user, "neg_logq");
    p.neg_logq = neg_logq->to(acc).contiguous();
  }

  const int64_t batch = p.user.size(0);
  int64_t m = batch;
  if (neg_mode == adaptau::kNegPerRow) {
    TORCH_CHECK(p.neg.dim() == 2 && p.neg.size(0) == batch,
                "adaptau CUDA backend: per-row neg must be [B, M]");
    m = p.neg.size(1);
  } else if (neg_mode == adaptau::kNegShared) {
    TORCH_CHECK(p.neg.dim() == 1, "adaptau CUDA backend: shared neg must be [M]");
    m = p.neg.size(0);
  } else {
    TORCH_CHECK(batch >= 2, "adaptau CUDA backend: in-batch negatives need B >= 2");
  }
  TORCH_CHECK(p.pos.dim() == 1 && p.pos.size(0) == batch,
              "adaptau CUDA backend: pos must be [B]");
  TORCH_CHECK(p.pos_scale.numel() == batch && p.neg_scale.numel() == batch,
              "adaptau CUDA backend: pos_scale / neg_scale must be [B]");
  TORCH_CHECK(batch >= 1 && p.items.size(0) >= 1 && p.user.size(1) >= 1 && m >= 1,
              "adaptau CUDA backend: empty input");

  adaptau_cuda::Problem& pr = p.problem;
  pr.dtype = dtype_code(p.user.scalar_type());
  pr.index64 = index_type == at::kLong;
  pr.user = p.user.data_ptr();
  pr.items = p.items.data_ptr();
  pr.pos = p.pos.data_ptr();
  pr.neg = neg_mode == adaptau::kNegInBatch ? nullptr : p.neg.data_ptr();
  pr.pos_scale = p.pos_scale.data_ptr();
  pr.neg_scale = p.neg_scale.data_ptr();
  pr.neg_logq = p.neg_logq.defined() ? p.neg_logq.data_ptr() : nullptr;
  pr.B = batch;
  pr.N = p.items.size(0);
  pr.D = p.user.size(1);
  pr.M = m;
  pr.neg_mode = static_cast<int>(neg_mode);
  pr.include_pos = include_pos;
  pr.normalize = normalize;
  pr.remove_hits = remove_hits;
  return p;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> fused_forward_cuda(
    const at::Tensor& user, const at::Tensor& items, const at::Tensor& pos,
    const at::Tensor& neg, const at::Tensor& pos_scale, const at::Tensor& neg_scale,
    const std::optional<at::Tensor>& neg_logq, int64_t neg_mode, bool include_pos,
    bool normalize, bool remove_hits, bool compute_raw) {
  const c10::cuda::CUDAGuard guard(user.device());
  Prepared p = prepare(user, items, pos, neg, pos_scale, neg_scale, neg_logq, neg_mode,
                       include_pos, normalize, remove_hits);
  const auto opts = p.user.options().dtype(acc_type(p.user.scalar_type()));
  const int64_t batch = p.problem.B;
  at::Tensor loss = at::empty({batch}, opts);
  at::Tensor lse = at::empty({batch}, opts);
  at::Tensor raw = at::empty({compute_raw ? batch : 0}, opts);
  cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  check_cuda(adaptau_cuda::forward(p.problem, compute_raw, loss.data_ptr(), lse.data_ptr(),
                                   compute_raw ? raw.data_ptr() : nullptr, stream),
             "fused_forward");
  return std::make_tuple(loss, lse, raw);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> fused_backward_cuda(
    const at::Tensor& grad_loss, const at::Tensor& user, const at::Tensor& items,
    const at::Tensor& pos, const at::Tensor& neg, const at::Tensor& pos_scale,
    const at::Tensor& neg_scale, const std::optional<at::Tensor>& neg_logq,
    const at::Tensor& lse, int64_t neg_mode, bool include_pos, bool normalize,
    bool remove_hits, bool need_scale_grads) {
  const c10::cuda::CUDAGuard guard(user.device());
  Prepared p = prepare(user, items, pos, neg, pos_scale, neg_scale, neg_logq, neg_mode,
                       include_pos, normalize, remove_hits);
  const auto acc = acc_type(p.user.scalar_type());
  const int64_t batch = p.problem.B;
  check_on_device(grad_loss, user, "grad_loss");
  check_on_device(lse, user, "lse");
  at::Tensor grad_loss_c = grad_loss.to(acc).contiguous();
  at::Tensor lse_c = lse.to(acc).contiguous();
  TORCH_CHECK(grad_loss_c.numel() == batch && lse_c.numel() == batch,
              "adaptau CUDA backend: grad_loss and lse must be [B]");

  at::Tensor grad_user = at::empty_like(p.user);
  at::Tensor grad_items = at::empty_like(p.items);
  // When the input dtype is the accumulation dtype the item accumulator is the output.
  at::Tensor accum = p.items.scalar_type() == acc
                         ? grad_items
                         : at::empty(p.items.sizes(), p.items.options().dtype(acc));
  const auto opts = p.user.options().dtype(acc);
  at::Tensor grad_pos_scale = at::empty({batch}, opts);
  at::Tensor grad_neg_scale = at::empty({batch}, opts);
  cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  check_cuda(adaptau_cuda::backward(p.problem, grad_loss_c.data_ptr(), lse_c.data_ptr(),
                                    grad_user.data_ptr(), grad_items.data_ptr(),
                                    accum.data_ptr(), grad_pos_scale.data_ptr(),
                                    grad_neg_scale.data_ptr(), stream),
             "fused_backward");
  (void)need_scale_grads;  // scale gradients cost nothing extra: always computed
  return std::make_tuple(grad_user, grad_items, grad_pos_scale, grad_neg_scale);
}

}  // namespace

TORCH_LIBRARY_IMPL(adaptau, CUDA, m) {
  m.impl("fused_forward", &fused_forward_cuda);
  m.impl("fused_backward", &fused_backward_cuda);
}
