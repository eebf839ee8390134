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

#include <cstdint>

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

}  // namespace
}  // namespace cpu
}  // namespace adaptau

// No tensor argument to dispatch on: one kernel for every backend (CPU output).
TORCH_LIBRARY_IMPL(adaptau, CompositeExplicitAutograd, m) {
  m.impl("uniform_negatives", &adaptau::cpu::uniform_negatives_cpu);
}
