// The trainer's sampling helpers on the CPU.
//
// adaptau::uniform_negatives: [rows, cols] item indices drawn uniformly from [0, num_items),
// int32, generated in parallel on the CPU from a counter-based generator.
//
// torch.randint on the CPU runs one sequential mt19937 stream (about 3 ns per draw, 7 ms
// for the paper's 2048 × 1024 negatives per step, a sixth of a fused training step). Here
// draw k of a call is a pure function of (seed, k): the SplitMix64 output for counter k
// (Steele, Lea & Flood 2014), reduced to [0, num_items) with Lemire's multiply-shift on its
// high 32 bits (bias at most num_items / 2^32, 1e-5 for a 41k-item catalog). So the result
// depends on the seed only, never on the thread count, and a training run that draws the
// seed from its checkpointed torch.Generator stays reproducible across resumes.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <vector>

namespace adaptau {
namespace cpu {
namespace {

inline uint64_t splitmix64(uint64_t seed, uint64_t counter) {
  uint64_t z = seed + (counter + 1) * 0x9E3779B97F4A7C15ull;
  z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
  z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
  return z ^ (z >> 31);
}

at::Tensor uniform_negatives_cpu(int64_t rows, int64_t cols, int64_t num_items, int64_t seed) {
  TORCH_CHECK(rows >= 0 && cols >= 0, "adaptau uniform_negatives: rows and cols must be >= 0, got ",
              rows, " and ", cols);
  TORCH_CHECK(num_items >= 1 && num_items <= (int64_t(1) << 31) - 1,
              "adaptau uniform_negatives: num_items must be in [1, 2^31 - 1], got ", num_items);
  at::Tensor out = at::empty({rows, cols}, at::TensorOptions().dtype(at::kInt));
  int32_t* o = out.data_ptr<int32_t>();
  const uint64_t s = static_cast<uint64_t>(seed);
  const uint64_t n = static_cast<uint64_t>(num_items);
  at::parallel_for(0, rows * cols, 1 << 16, [&](int64_t k0, int64_t k1) {
    for (int64_t k = k0; k < k1; ++k) {
      const uint64_t hi = splitmix64(s, static_cast<uint64_t>(k)) >> 32;
      o[k] = static_cast<int32_t>((hi * n) >> 32);
    }
  });
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
  bool ok = true;
  for (int64_t k = k0; k < k1; ++k) {
    const uint64_t v = static_cast<uint64_t>(static_cast<int64_t>(x[k]));
    const bool in = v < n;
    ok &= in;
    ++h[in ? v : 0];
  }
  return ok;
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

}  // namespace
}  // namespace cpu
}  // namespace adaptau

// No tensor argument to dispatch on: one kernel for every backend (CPU output).
TORCH_LIBRARY_IMPL(adaptau, CompositeExplicitAutograd, m) {
  m.impl("uniform_negatives", &adaptau::cpu::uniform_negatives_cpu);
}

TORCH_LIBRARY_IMPL(adaptau, CPU, m) {
  m.impl("item_counts", &adaptau::cpu::item_counts_cpu);
}
