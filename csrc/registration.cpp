// The one TORCH_LIBRARY block of adaptau: the schemas of the fused kernels.
// Implementations register per dispatch key elsewhere:
//   csrc/softmax_loss_cpu.cpp      TORCH_LIBRARY_IMPL(adaptau, CPU, ...)
//   csrc/cuda/softmax_loss_cuda.cpp TORCH_LIBRARY_IMPL(adaptau, CUDA, ...)  (CUDA builds only)
//   csrc/sampling_cpu.cpp          uniform_negatives (the trainer's parallel uniform sampler),
//                                  dropout_mask (its inverted-dropout mask, same generator)
//                                  item_counts (a parallel bincount) and add_l2_rows_ (the
//                                  sampled L2's item gradient and value in one pass)
//   csrc/finite_cpu.cpp            all_finite (whether a tensor holds no NaN and no infinity)
//   csrc/compact_cpu.cpp           compact_indices (the distinct rows a batch touches, and
//                                  its indices as positions among them)
//   csrc/cpu/capability.cpp        cpu_capability, cpu_capabilities, _set_cpu_capability (which
//                                  CPU kernels run: default, avx2 or avx512)
// Here, for every device: Meta kernels (output shapes and dtypes, for FakeTensor tracing and
// torch.compile) of fused_forward, fused_backward and item_counts, and an Autograd kernel
// for fused_forward / fused_backward that raises on a backward through them (their gradient
// is the public op's, adaptau::softmax_loss_forward in adaptau/loss/ops.py).
// The contract (shapes, dtypes, meaning of outputs) is documented in adaptau/ops.py.
#include <Python.h>
#include <ATen/ATen.h>
#include <torch/csrc/autograd/autograd_not_implemented_fallback.h>
#include <torch/library.h>

#include <optional>
#include <tuple>
#include <vector>

#include "contract.h"
#include "cpu/capability.h"

extern "C" {
// Makes `import adaptau._C` work; the ops register themselves when the library loads.
PyObject* PyInit__C(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
  return PyModule_Create(&module_def);
}
}

namespace {
// The contract's constants as C++ compiles them, for the test that holds them equal to
// adaptau/loss/_contract.py: neg modes (per-row, shared, in-batch), the norm epsilon and
// the largest accepted |inverse temperature|.
std::vector<double> contract_constants() {
  return {double(adaptau::kNegPerRow), double(adaptau::kNegShared), double(adaptau::kNegInBatch),
          adaptau::kNormEps, adaptau::kMaxInverseTemperature};
}

at::ScalarType accumulation_dtype(const at::Tensor& user) {
  return user.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
}

// loss, lse [B] and raw ([B], or [0] without compute_raw), in the accumulation dtype.
std::tuple<at::Tensor, at::Tensor, at::Tensor> fused_forward_meta(
    const at::Tensor& user, const at::Tensor& items, const at::Tensor& pos, const at::Tensor& neg,
    const at::Tensor& pos_scale, const at::Tensor& neg_scale, const std::optional<at::Tensor>& neg_logq,
    int64_t neg_mode, bool include_pos, bool normalize, bool remove_hits, bool compute_raw) {
  const auto options = user.options().dtype(accumulation_dtype(user));
  const c10::SymInt batch = user.sym_size(0);
  return {at::empty_symint({batch}, options), at::empty_symint({batch}, options),
          at::empty_symint({compute_raw ? batch : c10::SymInt(0)}, options)};
}

// grad_user [B, D] and grad_items [N, D] in the input dtype; the scales' gradients [B] in
// the accumulation dtype.
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> fused_backward_meta(
    const at::Tensor& grad_loss, const at::Tensor& user, const at::Tensor& items, const at::Tensor& pos,
    const at::Tensor& neg, const at::Tensor& pos_scale, const at::Tensor& neg_scale,
    const std::optional<at::Tensor>& neg_logq, const at::Tensor& lse, int64_t neg_mode, bool include_pos,
    bool normalize, bool remove_hits, bool need_scale_grads) {
  const auto scale_options = user.options().dtype(accumulation_dtype(user));
  const c10::SymInt batch = user.sym_size(0);
  return {at::empty_symint(user.sym_sizes(), user.options()),
          at::empty_symint(items.sym_sizes(), items.options()), at::empty_symint({batch}, scale_options),
          at::empty_symint({batch}, scale_options)};
}

// [num_items] int64 counts.
at::Tensor item_counts_meta(const at::Tensor& indices, int64_t num_items) {
  return at::empty({num_items}, indices.options().dtype(at::kLong));
}
}  // namespace

TORCH_LIBRARY(adaptau, m) {
  m.def(
      "fused_forward(Tensor user, Tensor items, Tensor pos, Tensor neg, Tensor pos_scale, "
      "Tensor neg_scale, Tensor? neg_logq, int neg_mode, bool include_pos, bool normalize, "
      "bool remove_hits, bool compute_raw) -> (Tensor, Tensor, Tensor)");
  m.def(
      "fused_backward(Tensor grad_loss, Tensor user, Tensor items, Tensor pos, Tensor neg, "
      "Tensor pos_scale, Tensor neg_scale, Tensor? neg_logq, Tensor lse, int neg_mode, "
      "bool include_pos, bool normalize, bool remove_hits, bool need_scale_grads) "
      "-> (Tensor, Tensor, Tensor, Tensor)");
  m.def("uniform_negatives(int rows, int cols, int num_items, int seed) -> Tensor");
  m.def("dropout_mask(int rows, int cols, float p, int seed) -> Tensor");
  m.def("item_counts(Tensor indices, int num_items) -> Tensor");
  m.def("add_l2_rows_(Tensor(a!) grad, Tensor weight, Tensor counts, float coef) -> float");
  m.def("all_finite(Tensor t) -> bool");
  m.def("contract_constants() -> float[]", &contract_constants);
  m.def("cpu_capability() -> str", &adaptau::cpu::cpu_capability_op);
  m.def("cpu_capabilities() -> str[]", &adaptau::cpu::cpu_capabilities_op);
  m.def("_set_cpu_capability(str name) -> str", &adaptau::cpu::set_cpu_capability_op);
  m.def("compact_indices(Tensor pos, Tensor neg, int num_items) -> (Tensor, Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(adaptau, Meta, m) {
  m.impl("fused_forward", &fused_forward_meta);
  m.impl("fused_backward", &fused_backward_meta);
  m.impl("item_counts", &item_counts_meta);
}

TORCH_LIBRARY_IMPL(adaptau, Autograd, m) {
  m.impl("fused_forward", torch::autograd::autogradNotImplementedFallback());
  m.impl("fused_backward", torch::autograd::autogradNotImplementedFallback());
}
