// The trainer's sampling helpers on the CPU.
//
// adaptau::uniform_negatives: [rows, cols] item indices drawn uniformly from [0, num_items),
// int32, generated in parallel on the CPU from a counter-based generator.
// adaptau::dropout_mask: [rows, cols] float32 inverted-dropout mask (0, or 1/(1-p) with
// probability 1-p), from the same generator.
// adaptau::item_counts and adaptau::add_l2_rows_ (below): the sampled L2 term's counts,
// gradient and value.
//
// torch.randint on the CPU runs one sequential mt19937 stream (about 3 ns per draw, 7 ms
// for the paper's 2048 × 1024 negatives per step, a sixth of a fused training step), and
// torch's bernoulli_ (F.dropout) about 10 ns per element (1.5-2 ms for the paper's
// 2048 × 64 batch rows). Here draw k of a call is a pure function of (seed, k): 32 bits of
// the SplitMix64 output for counter k / 2 (Steele, Lea & Flood 2014), the high half for
// even k and the low half for odd k (each 64-bit output serves two draws). Indices are
// reduced to [0, num_items) with Lemire's multiply-shift (bias at most num_items / 2^32,
// 1e-5 for a 41k-item catalog); a mask element is dropped when its draw is below
// p·2^32. So the result depends on the seed only, never on the thread count, and a
// training run that draws the seed from its checkpointed torch generator stays
// reproducible across resumes.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <vector>

#include "cpu_simd.h"

namespace adaptau {
namespace cpu {
namespace {

inline uint64_t splitmix64(uint64_t seed, uint64_t counter) {
  uint64_t z = seed + (counter + 1) * 0x9E3779B97F4A7C15ull;
  z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
  z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
  return z ^ (z >> 31);
}

// f(k, draw k) for every draw k of [0, total), in parallel over whole SplitMix64 outputs.
template <typename F>
void for_each_draw(uint64_t seed, int64_t total, F f) {
  const int64_t pairs = total / 2;
  at::parallel_for(0, pairs, 1 << 15, [&](int64_t j0, int64_t j1) {
    for (int64_t j = j0; j < j1; ++j) {
      const uint64_t z = splitmix64(seed, static_cast<uint64_t>(j));
      f(2 * j, static_cast<uint32_t>(z >> 32));
      f(2 * j + 1, static_cast<uint32_t>(z));
    }
  });
  if (total % 2) f(total - 1, static_cast<uint32_t>(splitmix64(seed, static_cast<uint64_t>(pairs)) >> 32));
}

at::Tensor uniform_negatives_cpu(int64_t rows, int64_t cols, int64_t num_items, int64_t seed) {
  TORCH_CHECK(rows >= 0 && cols >= 0, "adaptau uniform_negatives: rows and cols must be >= 0, got ",
              rows, " and ", cols);
  TORCH_CHECK(num_items >= 1 && num_items <= (int64_t(1) << 31) - 1,
              "adaptau uniform_negatives: num_items must be in [1, 2^31 - 1], got ", num_items);
  at::Tensor out = at::empty({rows, cols}, at::TensorOptions().dtype(at::kInt));
  int32_t* o = out.data_ptr<int32_t>();
  const uint64_t n = static_cast<uint64_t>(num_items);
  for_each_draw(static_cast<uint64_t>(seed), rows * cols,
                [&](int64_t k, uint32_t x) { o[k] = static_cast<int32_t>((uint64_t(x) * n) >> 32); });
  return out;
}

at::Tensor dropout_mask_cpu(int64_t rows, int64_t cols, double p, int64_t seed) {
  TORCH_CHECK(rows >= 0 && cols >= 0, "adaptau dropout_mask: rows and cols must be >= 0, got ",
              rows, " and ", cols);
  TORCH_CHECK(p >= 0.0 && p < 1.0, "adaptau dropout_mask: p must be in [0, 1), got ", p);
  at::Tensor out = at::empty({rows, cols}, at::TensorOptions().dtype(at::kFloat));
  float* o = out.data_ptr<float>();
  const uint32_t threshold = static_cast<uint32_t>(p * 4294967296.0);  // p < 1: fits
  const float keep = static_cast<float>(1.0 / (1.0 - p));
  for_each_draw(static_cast<uint64_t>(seed), rows * cols,
                [&](int64_t k, uint32_t x) { o[k] = x < threshold ? 0.0f : keep; });
  return out;
}

// adaptau::item_counts: [num_items] int64, how often each item occurs in indices (any shape,
// int32 or int64) -- what the trainer's sampled L2 term needs each step. torch.bincount and
// numpy.bincount count on one thread (about 4-5 ms for the paper's 2M negatives per step);
// here each thread counts a contiguous slice into its own int32 histogram and the
// histograms are summed. Integer sums are exact, so the result does not depend on the
// split. Every index is checked: one outside [0, num_items) raises and nothing is written
// out of bounds.
template <typename I>
bool count_slice(const I* x, int64_t k0, int64_t k1, uint64_t n, int32_t* h) {
  // Blocks small enough to stay in L1 between the (vectorized) range check and the
  // counting, which then needs no per-index test; unrolled by 4.
  constexpr int64_t kCheck = 4096;
  for (int64_t b0 = k0; b0 < k1; b0 += kCheck) {
    const int64_t b1 = std::min(k1, b0 + kCheck);
    if (!indices_below(x + b0, b1 - b0, static_cast<uint32_t>(n))) return false;
    int64_t k = b0;
    for (; k + 4 <= b1; k += 4) {
      const uint32_t v0 = static_cast<uint32_t>(x[k]), v1 = static_cast<uint32_t>(x[k + 1]);
      const uint32_t v2 = static_cast<uint32_t>(x[k + 2]), v3 = static_cast<uint32_t>(x[k + 3]);
      ++h[v0];
      ++h[v1];
      ++h[v2];
      ++h[v3];
    }
    for (; k < b1; ++k) ++h[static_cast<uint32_t>(x[k])];
  }
  return true;
}

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
  const int64_t parts = std::max<int64_t>(1, std::min<int64_t>(at::get_num_threads(), n >> 16));
  std::vector<int32_t> hist(static_cast<size_t>(parts * num_items), 0);
  std::atomic<bool> bad{false};
  at::parallel_for(0, parts, 1, [&](int64_t p0, int64_t p1) {
    for (int64_t p = p0; p < p1; ++p) {
      const int64_t k0 = n * p / parts, k1 = n * (p + 1) / parts;
      int32_t* h = hist.data() + p * num_items;
      const bool ok = idx.scalar_type() == at::kInt
                          ? count_slice(idx.data_ptr<int32_t>(), k0, k1, uint64_t(num_items), h)
                          : count_slice(idx.data_ptr<int64_t>(), k0, k1, uint64_t(num_items), h);
      if (!ok) bad.store(true);
    }
  });
  TORCH_CHECK(!bad.load(), "adaptau item_counts: an index is outside [0, ", num_items, ")");
  int64_t* o = out.data_ptr<int64_t>();
  at::parallel_for(0, num_items, 1 << 14, [&](int64_t i0, int64_t i1) {
    for (int64_t p = 0; p < parts; ++p) {
      const int32_t* h = hist.data() + p * num_items;
      for (int64_t i = i0; i < i1; ++i) o[i] += h[i];
    }
  });
  return out;
}

// adaptau::add_l2_rows_: grad[i] += coef · counts[i] · weight[i] for every row i, and
// returns Σ_i counts[i] · ‖weight[i]‖² (float64) -- the item side of the trainer's sampled
// L2 term (gradient and value) in one parallel pass over the table, where addcmul_ plus
// linalg.vector_norm read it twice and round counts to the table's dtype. Partial sums are
// per fixed block of rows and added in block order: the value does not depend on the
// thread count.
template <typename T>
double add_l2_rows(T* grad, const T* w, const int64_t* cnt, int64_t N, int64_t D, double coef) {
  constexpr int64_t kRows = 1024;
  const int64_t nblk = (N + kRows - 1) / kRows;
  std::vector<double> part(static_cast<size_t>(nblk), 0.0);
  at::parallel_for(0, nblk, 1, [&](int64_t j0, int64_t j1) {
    for (int64_t j = j0; j < j1; ++j) {
      double acc = 0.0;
      for (int64_t i = j * kRows; i < std::min(N, (j + 1) * kRows); ++i) {
        if (cnt[i] == 0) continue;
        const T* wi = w + i * D;
        T* gi = grad + i * D;
        const T a = static_cast<T>(coef * static_cast<double>(cnt[i]));
        using V = Vec<T>;
        const typename V::R va = V::set1(a);
        typename V::R vsq = V::zero();
        int64_t d = 0;
        for (; d + V::W <= D; d += V::W) {
          const typename V::R x = V::load(wi + d);
          vsq = V::fma(x, x, vsq);
          V::store(gi + d, V::fma(va, x, V::load(gi + d)));
        }
        T sq = V::hsum(vsq);
        for (; d < D; ++d) {
          sq += wi[d] * wi[d];
          gi[d] += a * wi[d];
        }
        acc += static_cast<double>(cnt[i]) * static_cast<double>(sq);
      }
      part[j] = acc;
    }
  });
  double total = 0.0;
  for (double x : part) total += x;
  return total;
}

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
    return add_l2_rows(grad.data_ptr<float>(), w.data_ptr<float>(), c.data_ptr<int64_t>(), w.size(0),
                       w.size(1), coef);
  return add_l2_rows(grad.data_ptr<double>(), w.data_ptr<double>(), c.data_ptr<int64_t>(), w.size(0),
                     w.size(1), coef);
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
