// The context of one call (LossContext): shapes, options, inputs, and the prepared user rows.
// Part of the softmax-loss kernels (softmax_loss_kernel_impl.h), compiled once per CPU
// capability inside adaptau::cpu::<capability>.
#pragma once

#include "vector_ops.h"

namespace adaptau {
namespace cpu {
namespace ADAPTAU_CPU_CAPABILITY {
namespace {

// ------------------------------------------------------------------------- context
template <typename T>
struct PreparedRows {
  std::vector<int32_t> pos;  // [B]
  Buf<T> uhat;               // [B][Dp]
  std::vector<T> unorm;      // [B]
  std::vector<T> spos;       // [B]
};

template <typename T>
struct LossContext {
  // shapes and options
  int64_t B = 0, N = 0, D = 0, Dp = 0, M = 0;
  int64_t neg_mode = 0;
  bool include_pos = false, normalize = true, remove_hits = false;
  // inputs (accumulation dtype, contiguous)
  const T* user = nullptr;
  const T* items = nullptr;
  const T* alpha = nullptr;
  const T* beta = nullptr;
  const T* logq = nullptr;  // may be null
  const void* neg = nullptr;
  bool neg_is_int64 = true;
  SavedKey key;  // identity of the call's inputs (the forward's saved state)
  // derived (prepare_rows), owned by `rows`
  std::shared_ptr<const PreparedRows<T>> rows;
  const int32_t* pos = nullptr;  // [B]
  const T* uhat = nullptr;       // [B][Dp] normalized user rows, zero padded
  const T* unorm = nullptr;      // [B]
  const T* spos = nullptr;       // [B] positive scores ŝ(b, pos[b])
};

// Raises the IndexError of Python's range check (adaptau/ops.py, which leaves the indices
// to this backend: the kernel checks them anyway, vectorized, before using any): the first
// index outside [0, N) in row-major order, named `name[i]` (cols == 0) or `name[b, m]`.
[[noreturn]] void throw_index_error(const char* name, const void* data, bool is64, int64_t count,
                                    int64_t cols, int64_t N) {
  for (int64_t k = 0; k < count; ++k) {
    const int64_t v = is64 ? static_cast<const int64_t*>(data)[k] : static_cast<const int32_t*>(data)[k];
    if (v >= 0 && v < N) continue;
    if (cols > 0)
      TORCH_CHECK_INDEX(false, name, "[", k / cols, ", ", k % cols, "] = ", v,
                        " is out of range for an item table with ", N, " rows");
    TORCH_CHECK_INDEX(false, name, "[", k, "] = ", v, " is out of range for an item table with ", N, " rows");
  }
  TORCH_CHECK_INDEX(false, name, ": an index is out of range for an item table with ", N, " rows");
}

std::vector<int32_t> indices_to_i32(const at::Tensor& t, int64_t N, const char* name) {
  const int64_t n = t.numel();
  const bool is64 = t.scalar_type() == at::kLong;
  std::vector<int32_t> out(n);
  bool ok;
  if (is64) {
    ok = indices_below(t.data_ptr<int64_t>(), n, static_cast<uint32_t>(N), out.data());
  } else {
    const int32_t* p = t.data_ptr<int32_t>();
    ok = indices_below(p, n, static_cast<uint32_t>(N));
    std::copy(p, p + n, out.begin());
  }
  if (!ok) throw_index_error(name, t.data_ptr(), is64, n, 0, N);
  return out;
}

// Normalized user rows and positive scores (both modes), or the ones a forward kept.
// (Each row gathers its positive's table row, a likely cache miss: hence the small grain.)
template <typename T>
void prepare_rows(LossContext<T>& context, const at::Tensor& pos,
                  std::shared_ptr<const PreparedRows<T>> kept) {
  if (kept == nullptr) {
    const int64_t B = context.B, D = context.D, Dp = context.Dp;
    auto prepared = std::make_shared<PreparedRows<T>>();
    prepared->pos = indices_to_i32(pos, context.N, "pos");
    prepared->uhat = make_buf<T>(B * Dp);
    prepared->unorm.assign(B, T(0));
    prepared->spos.assign(B, T(0));
    at::parallel_for(0, B, grain(16 * D), [&](int64_t b0, int64_t b1) {
      for (int64_t b = b0; b < b1; ++b) {
        T* uh = prepared->uhat.get() + b * Dp;
        prepared->unorm[b] = load_row(uh, context.user + b * D, D, Dp, context.normalize);
        const T* xp = context.items + int64_t(prepared->pos[b]) * D;
        T s = dot_plain(uh, xp, D);
        if (context.normalize) s *= T(1) / std::max(std::sqrt(dot_plain(xp, xp, D)), norm_eps<T>());
        prepared->spos[b] = s;
      }
    });
    kept = std::move(prepared);
  }
  context.rows = std::move(kept);
  context.pos = context.rows->pos.data();
  context.uhat = context.rows->uhat.get();
  context.unorm = context.rows->unorm.data();
  context.spos = context.rows->spos.data();
}

}  // namespace
}  // namespace ADAPTAU_CPU_CAPABILITY
}  // namespace cpu
}  // namespace adaptau
