// Shared (neg_mode 1) and in-batch (neg_mode 2) negatives: blocked matrix products (with
// the row helpers of per_row.h).
// Part of the softmax-loss kernels (softmax_loss_kernel_impl.h), compiled once per CPU
// capability inside adaptau::cpu::<capability>.
#pragma once

#include "per_row.h"

namespace adaptau {
namespace cpu {
namespace ADAPTAU_CPU_CAPABILITY {
namespace {

// ============================================================ shared / in-batch modes
template <typename T>
struct Candidates {
  int64_t Mc = 0, Mp = 0;
  std::vector<int32_t> idx;  // [Mc] item of each candidate
  Buf<T> chat;               // [Mc][Dp] normalized candidate rows
  Buf<T> panels;             // candidates in panels of 2W columns (see score_tile), zero padded
  std::vector<T> logq;       // [Mp] logq of each candidate (0 past Mc)
  std::vector<T> cnorm;      // [Mc]
};

template <typename T>
Candidates<T> prepare_candidates(const LossContext<T>& context, const at::Tensor& neg) {
  Candidates<T> candidates;
  constexpr int W = Vec<T>::W;
  candidates.idx = context.neg_mode == kNegShared
                       ? indices_to_i32(neg, context.N, "neg")
                       : std::vector<int32_t>(context.pos, context.pos + context.B);
  candidates.Mc = static_cast<int64_t>(candidates.idx.size());
  candidates.Mp = round_up(candidates.Mc, 2 * W);
  const int64_t Mc = candidates.Mc, Mp = candidates.Mp, D = context.D, Dp = context.Dp;
  candidates.chat = make_buf<T>(Mc * Dp);
  candidates.panels = make_zero_buf<T>(D * Mp);
  candidates.logq.assign(Mp, T(0));
  candidates.cnorm.resize(Mc);
  at::parallel_for(0, Mc, grain(4 * D), [&](int64_t m0, int64_t m1) {
    for (int64_t m = m0; m < m1; ++m) {
      T* row = candidates.chat.get() + m * Dp;
      candidates.cnorm[m] =
          load_row(row, context.items + int64_t(candidates.idx[m]) * D, D, Dp, context.normalize);
      T* panel = candidates.panels.get() + (m / (2 * W)) * D * 2 * W + (m % (2 * W));
      for (int64_t d = 0; d < D; ++d) panel[d * 2 * W] = row[d];
      if (context.logq) candidates.logq[m] = context.logq[candidates.idx[m]];
    }
  });
  return candidates;
}

// What a GEMM-mode forward keeps for the backward of the same call (SavedCache): the
// candidates, the prepared rows and every score ŝ [B][Mp] (when they fit
// ADAPTAU_CPU_SAVED_SCORES_BYTES), so the backward does one GEMM fewer per tile.
template <typename T>
struct SavedTiles {
  Candidates<T> candidates;
  Buf<T> scores;  // [B][Mp] ŝ of every (row, candidate)
  std::shared_ptr<const PreparedRows<T>> rows;
};

// Logits of one tile row: lg[c] for columns [c0, c0+nc) of row b (padded with -inf to ncp).
template <typename T>
inline void tile_logits(const LossContext<T>& context, const Candidates<T>& candidates, int64_t b, const T* s,
                        int64_t c0, int64_t nc, T scale, bool with_logq, T shift, T* lg) {
  const int32_t p = context.pos[b];
  const int64_t cend = std::min(nc, candidates.Mc - c0);
  for (int64_t c = 0; c < cend; ++c)
    lg[c] = scale * s[c] - (with_logq ? candidates.logq[c0 + c] : T(0)) - shift;
  for (int64_t c = std::max<int64_t>(cend, 0); c < nc; ++c) lg[c] = neg_inf<T>();
  if (context.remove_hits)
    for (int64_t c = 0; c < cend; ++c)
      if (candidates.idx[c0 + c] == p) lg[c] = neg_inf<T>();
  if (context.neg_mode == kNegInBatch && b >= c0 && b < c0 + cend) lg[b - c0] = neg_inf<T>();
}

template <typename T, int NV>
void gemm_forward(LossContext<T>& context, const at::Tensor& neg, T* loss, T* lse_out, T* raw,
                  bool compute_raw) {
  const Tuning& settings = tuning();
  constexpr int W = Vec<T>::W;
  PhaseTimer timer;
  Candidates<T> candidates = prepare_candidates(context, neg);
  timer.mark("fwd candidates");
  const int64_t B = context.B, Dp = context.Dp;
  const int64_t row_block = std::max<int64_t>(4, settings.row_block);
  const int64_t col_block = round_up(std::max<int64_t>(2 * W, settings.col_block), 2 * W);
  const int64_t nblk = (B + row_block - 1) / row_block;
  // Scores straight into the kept [B][Mp] array, or into a per-thread tile.
  const bool keep = SavedCache::get().accepts(context.key) &&
                    B * candidates.Mp * int64_t(sizeof(T)) <= settings.saved_scores_bytes;
  Buf<T> kept = keep ? make_buf<T>(B * candidates.Mp) : Buf<T>();
  at::parallel_for(0, nblk, grain(row_block * candidates.Mp * context.D), [&](int64_t i0, int64_t i1) {
    Buf<T> tile = keep ? Buf<T>() : make_buf<T>(row_block * col_block);
    const int64_t lds = keep ? candidates.Mp : col_block;
    std::vector<T> lg(col_block), m(row_block), s(row_block), rm(row_block), rs(row_block);
    for (int64_t blk = i0; blk < i1; ++blk) {
      const int64_t r0 = blk * row_block, nr = std::min(row_block, B - r0);
      std::fill(m.begin(), m.end(), neg_inf<T>());
      std::fill(s.begin(), s.end(), T(0));
      std::fill(rm.begin(), rm.end(), neg_inf<T>());
      std::fill(rs.begin(), rs.end(), T(0));
      for (int64_t c0 = 0; c0 < candidates.Mp; c0 += col_block) {
        const int64_t nc = std::min(col_block, candidates.Mp - c0);
        T* S = keep ? kept.get() + r0 * lds + c0 : tile.get();
        score_tile(context.uhat + r0 * Dp, Dp, nr, candidates.panels.get() + c0 * context.D, nc, context.D, S,
                   lds);
        for (int64_t r = 0; r < nr; ++r) {
          const int64_t b = r0 + r;
          tile_logits(context, candidates, b, S + r * lds, c0, nc, context.beta[b], true, T(0), lg.data());
          lse_update(lg.data(), nc, m[r], s[r]);
          if (compute_raw) {
            tile_logits(context, candidates, b, S + r * lds, c0, nc, T(1), true, T(0), lg.data());
            lse_update(lg.data(), nc, rm[r], rs[r]);
          }
        }
      }
      for (int64_t r = 0; r < nr; ++r) {
        const int64_t b = r0 + r;
        for (int pass = 0; pass < (compute_raw ? 2 : 1); ++pass) {
          T mm = pass == 0 ? m[r] : rm[r];
          T ss = pass == 0 ? s[r] : rs[r];
          const T pl_logit = (pass == 0 ? context.alpha[b] : T(1)) * context.spos[b];
          if (context.include_pos) {
            if (pl_logit > mm) {
              ss = (mm == neg_inf<T>() ? T(0) : ss * std::exp(mm - pl_logit)) + T(1);
              mm = pl_logit;
            } else {
              ss += std::exp(pl_logit - mm);
            }
          }
          const T l = lse_finish(mm, ss);
          const T out = (l == neg_inf<T>()) ? T(0) : l - pl_logit;
          if (pass == 0) {
            lse_out[b] = l;
            loss[b] = out;
          } else {
            raw[b] = out;
          }
        }
      }
    }
  });
  timer.mark("fwd tiles");
  if (keep) {
    auto saved = std::make_shared<SavedTiles<T>>();
    saved->candidates = std::move(candidates);
    saved->scores = std::move(kept);
    saved->rows = context.rows;
    SavedCache::get().put(context.key, saved);
  }
}

template <typename T, int NV>
void gemm_backward(LossContext<T>& context, std::shared_ptr<SavedTiles<T>> saved, const at::Tensor& neg,
                   const T* grad_loss, const T* lse, T* grad_user, T* grad_items, T* grad_alpha, T* grad_beta,
                   bool need_scale) {
  using V = Vec<T>;
  constexpr int W = V::W;
  const Tuning& settings = tuning();
  PhaseTimer timer;
  // the forward's candidates and scores when it kept them, else computed here
  Candidates<T> candidates =
      saved != nullptr ? std::move(saved->candidates) : prepare_candidates(context, neg);
  const T* kept = saved != nullptr ? saved->scores.get() : nullptr;
  RowGrad<T> row_grads = row_grad(context, grad_loss, lse);
  timer.mark(saved != nullptr ? "bwd candidates (saved)" : "bwd candidates");
  const int64_t B = context.B, D = context.D, Dp = context.Dp, N = context.N, Mc = candidates.Mc;
  const int64_t row_block = std::max<int64_t>(4, settings.row_block);
  const int64_t col_block = round_up(std::max<int64_t>(2 * W, settings.col_block), 2 * W);
  const int64_t nblk = (B + row_block - 1) / row_block;
  const int64_t per = Mc * Dp * int64_t(sizeof(T));
  int64_t G =
      std::min<int64_t>({settings.max_groups, nblk, std::max<int64_t>(1, settings.partial_bytes / per)});
  G = std::max<int64_t>(G, 1);
  Buf<T> gc_parts = make_buf<T>(G * Mc * Dp);
  Buf<T> gu = make_zero_buf<T>(B * Dp);
  std::vector<T> q(B, T(0));

  at::parallel_for(0, G, grain(3 * B * candidates.Mp * Dp / G), [&](int64_t g0, int64_t g1) {
    Buf<T> tile = kept != nullptr ? Buf<T>() : make_buf<T>(row_block * col_block);
    const int64_t lds = kept != nullptr ? candidates.Mp : col_block;
    Buf<T> dS = make_buf<T>(row_block * col_block);
    for (int64_t g = g0; g < g1; ++g) {
      T* gc = gc_parts.get() + g * Mc * Dp;
      std::memset(gc, 0, sizeof(T) * Mc * Dp);
      for (int64_t blk = nblk * g / G; blk < nblk * (g + 1) / G; ++blk) {
        const int64_t r0 = blk * row_block, nr = std::min(row_block, B - r0);
        for (int64_t c0 = 0; c0 < candidates.Mp; c0 += col_block) {
          const int64_t nc = std::min(col_block, candidates.Mp - c0);
          const int64_t ncv = std::min(nc, Mc - c0);  // valid columns
          const T* S = kept != nullptr ? kept + r0 * lds + c0 : tile.get();
          if (kept == nullptr)
            score_tile(context.uhat + r0 * Dp, Dp, nr, candidates.panels.get() + c0 * context.D, nc, D,
                       tile.get(), col_block);
          for (int64_t r = 0; r < nr; ++r) {
            const int64_t b = r0 + r;
            T* d = dS.get() + r * col_block;
            if (row_grads.g[b] == T(0)) {
              std::fill(d, d + nc, T(0));
              continue;
            }
            const T* s = S + r * lds;
            tile_logits(context, candidates, b, s, c0, nc, context.beta[b], true, lse[b], d);
            const typename V::R vg = V::set1(row_grads.g[b] * context.beta[b]);
            T qs = T(0);
            for (int64_t c = 0; c < nc; c += W) {
              const typename V::R pk = V::exp(V::load(d + c));
              if (need_scale) {
                alignas(64) T tmp[W];
                V::store(tmp, pk);
                for (int i = 0; i < W; ++i) qs += tmp[i] * s[c + i];
              }
              V::store(d + c, V::mul(vg, pk));
            }
            q[b] += qs;
          }
          // dU[rows] += dS·C[cols];  dC[cols] += dSᵀ·Û[rows]
          tile_gemm(gu.get() + r0 * Dp, Dp, dS.get(), col_block, 1, candidates.chat.get() + c0 * Dp, Dp, nr,
                    ncv, Dp, true);
          tile_gemm(gc + c0 * Dp, Dp, dS.get(), 1, col_block, context.uhat + r0 * Dp, Dp, ncv, nr, Dp, true);
        }
      }
    }
  });

  timer.mark("bwd tiles");
  // Candidate gradients: merge the group partials (group order), scatter to items in
  // candidate order, add the positives' terms in row order, then the normalization.
  at::parallel_for(0, Mc, grain(G * Dp), [&](int64_t m0, int64_t m1) {
    for (int64_t m = m0; m < m1; ++m) {
      T* dst = gc_parts.get() + m * Dp;
      for (int64_t g = 1; g < G; ++g) {
        const T* src = gc_parts.get() + (g * Mc + m) * Dp;
        for (int64_t i = 0; i < Dp; ++i) dst[i] += src[i];
      }
    }
  });
  timer.mark("bwd merge");
  at::parallel_for(0, N, grain(D), [&](int64_t n0, int64_t n1) {
    std::memset(grad_items + n0 * D, 0, sizeof(T) * (n1 - n0) * D);
  });
  timer.mark("bwd zero items");
  std::vector<int32_t> touched;
  touched.reserve(Mc + B);
  std::vector<uint8_t> seen(N, 0);
  for (int64_t m = 0; m < Mc; ++m) {
    const int32_t it = candidates.idx[m];
    T* out = grad_items + int64_t(it) * D;
    const T* src = gc_parts.get() + m * Dp;
    for (int64_t i = 0; i < D; ++i) out[i] += src[i];
    if (!seen[it]) {
      seen[it] = 1;
      touched.push_back(it);
    }
  }
  for (int64_t b = 0; b < B; ++b) {
    const int32_t it = context.pos[b];
    const T dp = row_grads.dpos[b];
    T* out = grad_items + int64_t(it) * D;
    const T* u = context.uhat + b * Dp;
    for (int64_t i = 0; i < D; ++i) out[i] += dp * u[i];
    if (!seen[it]) {
      seen[it] = 1;
      touched.push_back(it);
    }
  }
  timer.mark("bwd scatter");
  if (context.normalize) {
    // (rows scattered over the table: each costs memory latency more than arithmetic)
    at::parallel_for(0, static_cast<int64_t>(touched.size()), grain(64 * D), [&](int64_t t0, int64_t t1) {
      std::vector<T> xh(Dp), gg(Dp, T(0));
      for (int64_t t = t0; t < t1; ++t) {
        const int64_t it = touched[t];
        const T nrm = load_row(xh.data(), context.items + it * D, D, Dp, true);
        T* out = grad_items + it * D;
        std::copy(out, out + D, gg.begin());
        normalize_backward(out, gg.data(), xh.data(), nrm, D, true);
      }
    });
  }
  timer.mark("bwd normalize");
  finish_rows(context, row_grads, 0, B, gu.get(), 1, q.data(), grad_user, grad_alpha, grad_beta, need_scale);
  timer.mark("bwd rows");
}

}  // namespace
}  // namespace ADAPTAU_CPU_CAPABILITY
}  // namespace cpu
}  // namespace adaptau
