// compact_indices' kernel (see csrc/compact_cpu.cpp, which checks the inputs), compiled once
// per CPU capability by compact_kernel_<capability>.cpp into adaptau::cpu::<capability>
// (the rank table and the positions are popcounts: one instruction from AVX2 on).
#pragma once

#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include <cstdint>
#include <tuple>
#include <vector>

#include "../cpu_simd.h"
#include "compact_kernel.h"

namespace adaptau {
namespace cpu {
namespace ADAPTAU_CPU_CAPABILITY {
namespace {

template <typename I>
bool in_range(const at::Tensor& t, int64_t N) {
  return indices_below(t.data_ptr<I>(), t.numel(), static_cast<uint32_t>(N));
}

template <typename I>
void mark(const at::Tensor& t, uint64_t* bits) {
  const I* p = t.data_ptr<I>();
  const int64_t n = t.numel();
  for (int64_t k = 0; k < n; ++k) {
    const uint64_t v = static_cast<uint64_t>(p[k]);
    bits[v >> 6] |= uint64_t(1) << (v & 63);
  }
}

template <typename I>
at::Tensor localize(const at::Tensor& t, const uint64_t* bits, const int32_t* rank) {
  at::Tensor out = at::empty_like(t);
  const I* p = t.data_ptr<I>();
  I* o = out.data_ptr<I>();
  at::parallel_for(0, t.numel(), 1 << 14, [&](int64_t k0, int64_t k1) {
    for (int64_t k = k0; k < k1; ++k) {
      const uint64_t v = static_cast<uint64_t>(p[k]);
      const uint64_t below = bits[v >> 6] & ((uint64_t(1) << (v & 63)) - 1);
      o[k] = static_cast<I>(rank[v >> 6] + __builtin_popcountll(below));
    }
  });
  return out;
}

}  // namespace

std::tuple<at::Tensor, at::Tensor, at::Tensor> compact_indices(const at::Tensor& pos, const at::Tensor& neg,
                                                               int64_t num_items) {
  const auto empty_result = [&] {
    return std::make_tuple(at::empty({0}, pos.options().dtype(at::kLong)), at::empty_like(pos),
                           at::empty_like(neg));
  };
  bool ok = true;
  for (const at::Tensor* t : {&pos, &neg})
    ok = ok && (t->scalar_type() == at::kLong ? in_range<int64_t>(*t, num_items)
                                              : in_range<int32_t>(*t, num_items));
  if (!ok) return empty_result();

  const int64_t words = (num_items + 63) / 64;
  std::vector<uint64_t> bits(words, 0);
  for (const at::Tensor* t : {&pos, &neg}) {
    if (t->scalar_type() == at::kLong)
      mark<int64_t>(*t, bits.data());
    else
      mark<int32_t>(*t, bits.data());
  }
  std::vector<int32_t> rank(words);
  int64_t count = 0;
  for (int64_t w = 0; w < words; ++w) {
    rank[w] = static_cast<int32_t>(count);
    count += __builtin_popcountll(bits[w]);
  }
  at::Tensor unique_ids = at::empty({count}, pos.options().dtype(at::kLong));
  int64_t* u = unique_ids.data_ptr<int64_t>();
  at::parallel_for(0, words, 1 << 12, [&](int64_t w0, int64_t w1) {
    for (int64_t w = w0; w < w1; ++w) {
      int64_t k = rank[w];
      for (uint64_t b = bits[w]; b != 0; b &= b - 1) u[k++] = w * 64 + __builtin_ctzll(b);
    }
  });
  const auto local = [&](const at::Tensor& t) {
    return t.scalar_type() == at::kLong ? localize<int64_t>(t, bits.data(), rank.data())
                                        : localize<int32_t>(t, bits.data(), rank.data());
  };
  return std::make_tuple(unique_ids, local(pos), local(neg));
}

}  // namespace ADAPTAU_CPU_CAPABILITY
}  // namespace cpu
}  // namespace adaptau
