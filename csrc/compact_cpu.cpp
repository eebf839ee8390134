// adaptau::compact_indices(pos, neg, num_items) -> (unique_ids, pos_local, neg_local):
// the item rows a batch touches, for softmax_loss(item_grad="sparse") and adaptau.compact.
//
//   unique_ids [K] int64   the distinct values of pos and neg, ascending
//   pos_local, neg_local   pos and neg (their shapes and dtypes) as positions in unique_ids
//
// So items[unique_ids] is the batch's [K, D] compact table, and a [K, D] gradient with the
// indices unique_ids is a coalesced sparse COO gradient of items. When an index lies
// outside [0, num_items) nothing is written and unique_ids is empty: the caller names the
// offending value.
//
// Why not torch.unique: it sorts all B·(M+1) indices (40-130 ms at B = 2048, M = 1024 on
// 2 cores, several times the fused loss itself). Here a bitmap of num_items bits marks the
// touched rows; the set bits give unique_ids in order, and a rank table (popcounts of the
// words before) gives each index its position. Work: O(B·M + num_items / 64), memory
// num_items / 8 bytes. Python uses torch.unique instead when num_items / 64 would dominate
// (ops.py, _COMPACT_BITMAP_RATIO).
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <cstdint>
#include <tuple>
#include <vector>

#include "cpu_simd.h"

namespace adaptau {
namespace cpu {
namespace {
using namespace ADAPTAU_CPU_CAPABILITY;  // DEFAULT: this file is compiled once, with the baseline flags

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

std::tuple<at::Tensor, at::Tensor, at::Tensor> compact_indices_cpu(const at::Tensor& pos_in,
                                                                    const at::Tensor& neg_in,
                                                                    int64_t num_items) {
  TORCH_CHECK(pos_in.device().is_cpu() && neg_in.device().is_cpu(),
              "adaptau::compact_indices: expected CPU tensors");
  TORCH_CHECK(num_items >= 1 && num_items <= INT32_MAX,
              "adaptau::compact_indices: num_items must be in [1, 2^31 - 1], got ", num_items);
  for (const at::Tensor* t : {&pos_in, &neg_in})
    TORCH_CHECK(t->scalar_type() == at::kInt || t->scalar_type() == at::kLong,
                "adaptau::compact_indices: indices must be int32 or int64, got ", t->scalar_type());
  const at::Tensor pos = pos_in.contiguous(), neg = neg_in.contiguous();
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

}  // namespace
}  // namespace cpu
}  // namespace adaptau

TORCH_LIBRARY_IMPL(adaptau, CPU, m) { m.impl("compact_indices", &adaptau::cpu::compact_indices_cpu); }
