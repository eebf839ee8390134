// The trainer's sampling helpers on the CPU.
//
// adaptau::uniform_negatives: [rows, cols] item indices drawn uniformly from [0, num_items),
// int32, generated in parallel on the CPU from a counter-based generator.
// adaptau::dropout_mask: [rows, cols] float32 inverted-dropout mask (0, or 1/(1-p) with
// probability 1-p), from the same generator.
// adaptau::item_counts and adaptau::add_l2_rows_ (below): the sampled L2 term's counts,
// gradient and value.
//
// Draws are parallel (torch.randint on the CPU runs one sequential mt19937 stream, and
// torch's bernoulli_ behind F.dropout one draw per element; timings in
// docs/performance.md): draw k of a call is a pure function of (seed, k): 32 bits of
// the SplitMix64 output for counter k / 2 (Steele, Lea & Flood 2014), the high half for
// even k and the low half for odd k (each 64-bit output serves two draws). Indices are
// reduced to [0, num_items) with Lemire's multiply-shift (bias at most num_items / 2^32,
// 1e-5 for a 41k-item catalog); a mask element is dropped when its draw is below
// p·2^32. So the result depends on the seed only, never on the thread count, and a
// training run that draws the seed from its checkpointed torch generator stays
// reproducible across resumes.
#include <ATen/ATen.h>
#include <torch/library.h>

#include <cstdint>

#include "cpu/capability.h"
#include "cpu/sampling_kernel.h"

namespace adaptau {
namespace cpu {
namespace {

at::Tensor uniform_negatives_cpu(int64_t rows, int64_t cols, int64_t num_items, int64_t seed) {
  TORCH_CHECK(rows >= 0 && cols >= 0, "adaptau uniform_negatives: rows and cols must be >= 0, got ", rows,
              " and ", cols);
  TORCH_CHECK(num_items >= 1 && num_items <= (int64_t(1) << 31) - 1,
              "adaptau uniform_negatives: num_items must be in [1, 2^31 - 1], got ", num_items);
  at::Tensor out = at::empty({rows, cols}, at::TensorOptions().dtype(at::kInt));
  int32_t* o = out.data_ptr<int32_t>();
  ADAPTAU_CPU_DISPATCH(uniform_fill, o, rows * cols, num_items, seed);
  return out;
}

at::Tensor dropout_mask_cpu(int64_t rows, int64_t cols, double p, int64_t seed) {
  TORCH_CHECK(rows >= 0 && cols >= 0, "adaptau dropout_mask: rows and cols must be >= 0, got ", rows, " and ",
              cols);
  TORCH_CHECK(p >= 0.0 && p < 1.0, "adaptau dropout_mask: p must be in [0, 1), got ", p);
  at::Tensor out = at::empty({rows, cols}, at::TensorOptions().dtype(at::kFloat));
  float* o = out.data_ptr<float>();
  ADAPTAU_CPU_DISPATCH(dropout_fill, o, rows * cols, p, seed);
  return out;
}

// adaptau::item_counts: [num_items] int64, how often each item occurs in indices (any shape,
// int32 or int64) -- what the trainer's sampled L2 term needs each step. torch.bincount and
// numpy.bincount count on one thread; here each thread counts a contiguous slice into its
// own int32 histogram and the histograms are summed. Integer sums are exact, so the result
// does not depend on the split. Every index is checked: one outside [0, num_items) raises
// and nothing is written out of bounds.
at::Tensor item_counts_cpu(const at::Tensor& indices, int64_t num_items) {
  TORCH_CHECK(indices.device().is_cpu(), "adaptau item_counts: indices must be a CPU tensor");
  TORCH_CHECK(indices.scalar_type() == at::kInt || indices.scalar_type() == at::kLong,
              "adaptau item_counts: indices must be int32 or int64, got ", indices.scalar_type());
  TORCH_CHECK(num_items >= 1 && num_items <= (int64_t(1) << 31) - 1,
              "adaptau item_counts: num_items must be in [1, 2^31 - 1], got ", num_items);
  const at::Tensor idx = indices.contiguous();
  const int64_t n = idx.numel();
  TORCH_CHECK(n < (int64_t(1) << 31), "adaptau item_counts: at most 2^31 - 1 indices per call, got ", n);
  at::Tensor out = at::zeros({num_items}, at::TensorOptions().dtype(at::kLong));
  if (n == 0) return out;
  const bool ok = ADAPTAU_CPU_DISPATCH(count_items, idx.data_ptr(), idx.scalar_type() == at::kLong, n,
                                       num_items, out.data_ptr<int64_t>());
  TORCH_CHECK(ok, "adaptau item_counts: an index is outside [0, ", num_items, ")");
  return out;
}

// adaptau::add_l2_rows_: grad[i] += coef · counts[i] · weight[i] for every row i, and
// returns Σ_i counts[i] · ‖weight[i]‖² (float64) -- the item side of the trainer's sampled
// L2 term (gradient and value) in one parallel pass over the table, where addcmul_ plus
// linalg.vector_norm read it twice and round counts to the table's dtype. Partial sums are
// per fixed block of rows and added in block order: the value does not depend on the
// thread count.
double add_l2_rows_cpu(at::Tensor& grad, const at::Tensor& weight, const at::Tensor& counts, double coef) {
  TORCH_CHECK(grad.device().is_cpu() && weight.device().is_cpu() && counts.device().is_cpu(),
              "adaptau add_l2_rows_: CPU tensors only");
  TORCH_CHECK(weight.dim() == 2 && grad.sizes() == weight.sizes(),
              "adaptau add_l2_rows_: grad and weight must be the same [N, D] shape, got ", grad.sizes(),
              " and ", weight.sizes());
  TORCH_CHECK(grad.scalar_type() == weight.scalar_type() &&
                  (weight.scalar_type() == at::kFloat || weight.scalar_type() == at::kDouble),
              "adaptau add_l2_rows_: grad and weight must both be float32 or both float64");
  TORCH_CHECK(grad.is_contiguous(), "adaptau add_l2_rows_: grad must be contiguous");
  TORCH_CHECK(counts.scalar_type() == at::kLong && counts.dim() == 1 && counts.size(0) == weight.size(0),
              "adaptau add_l2_rows_: counts must be int64 [N=", weight.size(0), "]");
  const at::Tensor w = weight.contiguous(), c = counts.contiguous();
  if (weight.scalar_type() == at::kFloat)
    return ADAPTAU_CPU_DISPATCH(add_l2_rows, grad.data_ptr<float>(), w.data_ptr<float>(),
                                c.data_ptr<int64_t>(), w.size(0), w.size(1), coef);
  return ADAPTAU_CPU_DISPATCH(add_l2_rows, grad.data_ptr<double>(), w.data_ptr<double>(),
                              c.data_ptr<int64_t>(), w.size(0), w.size(1), coef);
}

}  // namespace
}  // namespace cpu
}  // namespace adaptau

// No tensor argument to dispatch on: one kernel for every backend (CPU output).
TORCH_LIBRARY_IMPL(adaptau, CompositeExplicitAutograd, m) {
  m.impl("uniform_negatives", &adaptau::cpu::uniform_negatives_cpu);
  m.impl("dropout_mask", &adaptau::cpu::dropout_mask_cpu);
}

TORCH_LIBRARY_IMPL(adaptau, CPU, m) {
  m.impl("item_counts", &adaptau::cpu::item_counts_cpu);
  m.impl("add_l2_rows_", &adaptau::cpu::add_l2_rows_cpu);
}
