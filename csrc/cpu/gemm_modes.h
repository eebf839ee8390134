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
struct Cands {
  int64_t Mc = 0, Mp = 0;
  std::vector<int32_t> idx;  // [Mc] item of each candidate
  Buf<T> chat;               // [Mc][Dp] normalized candidate rows
  Buf<T> ct;                 // candidates in panels of 2W columns (see score_tile), zero padded
  std::vector<T> lq;         // [Mp] logq of each candidate (0 past Mc)
  std::vector<T> cnorm;      // [Mc]
};

template <typename T>
Cands<T> prepare_cands(const Ctx<T>& cx, const at::Tensor& neg) {
  Cands<T> cd;
  constexpr int W = Vec<T>::W;
  cd.idx = cx.neg_mode == kNegShared ? indices_to_i32(neg, cx.N, "neg")
                                       : std::vector<int32_t>(cx.pos, cx.pos + cx.B);
  cd.Mc = static_cast<int64_t>(cd.idx.size());
  cd.Mp = round_up(cd.Mc, 2 * W);
  const int64_t Mc = cd.Mc, Mp = cd.Mp, D = cx.D, Dp = cx.Dp;
  cd.chat = make_buf<T>(Mc * Dp);
  cd.ct = make_zero_buf<T>(D * Mp);
  cd.lq.assign(Mp, T(0));
  cd.cnorm.resize(Mc);
  at::parallel_for(0, Mc, grain(4 * D), [&](int64_t m0, int64_t m1) {
    for (int64_t m = m0; m < m1; ++m) {
      T* row = cd.chat.get() + m * Dp;
      cd.cnorm[m] = load_row(row, cx.items + int64_t(cd.idx[m]) * D, D, Dp, cx.normalize);
      T* panel = cd.ct.get() + (m / (2 * W)) * D * 2 * W + (m % (2 * W));
      for (int64_t d = 0; d < D; ++d) panel[d * 2 * W] = row[d];
      if (cx.logq) cd.lq[m] = cx.logq[cd.idx[m]];
    }
  });
  return cd;
}

// What a GEMM-mode forward keeps for the backward of the same call (SavedCache): the
// candidates, the prepared rows and every score ŝ [B][Mp] (when they fit
// ADAPTAU_CPU_SAVED_SCORES_BYTES), so the backward does one GEMM fewer per tile.
template <typename T>
struct SavedTiles {
  Cands<T> cd;
  Buf<T> S;
  std::shared_ptr<const PreparedRows<T>> rows;
};

// Logits of one tile row: lg[c] for columns [c0, c0+nc) of row b (padded with -inf to ncp).
template <typename T>
inline void tile_logits(const Ctx<T>& cx, const Cands<T>& cd, int64_t b, const T* s, int64_t c0,
                        int64_t nc, T scale, bool with_logq, T shift, T* lg) {
  const int32_t p = cx.pos[b];
  const int64_t cend = std::min(nc, cd.Mc - c0);
  for (int64_t c = 0; c < cend; ++c)
    lg[c] = scale * s[c] - (with_logq ? cd.lq[c0 + c] : T(0)) - shift;
  for (int64_t c = std::max<int64_t>(cend, 0); c < nc; ++c) lg[c] = neg_inf<T>();
  if (cx.remove_hits)
    for (int64_t c = 0; c < cend; ++c)
      if (cd.idx[c0 + c] == p) lg[c] = neg_inf<T>();
  if (cx.neg_mode == kNegInBatch && b >= c0 && b < c0 + cend) lg[b - c0] = neg_inf<T>();
}

template <typename T, int NV>
void gemm_forward(Ctx<T>& cx, const at::Tensor& neg, T* loss, T* lse_out, T* raw, bool compute_raw) {
  const Tuning& tu = tuning();
  constexpr int W = Vec<T>::W;
  PhaseTimer pt;
  Cands<T> cd = prepare_cands(cx, neg);
  pt.mark("fwd candidates");
  const int64_t B = cx.B, Dp = cx.Dp;
  const int64_t RB = std::max<int64_t>(4, tu.row_block);
  const int64_t CB = round_up(std::max<int64_t>(2 * W, tu.col_block), 2 * W);
  const int64_t nblk = (B + RB - 1) / RB;
  // Scores straight into the kept [B][Mp] array, or into a per-thread tile.
  const bool keep = SavedCache::get().accepts(cx.key) &&
                    B * cd.Mp * int64_t(sizeof(T)) <= tu.saved_scores_bytes;
  Buf<T> kept = keep ? make_buf<T>(B * cd.Mp) : Buf<T>();
  at::parallel_for(0, nblk, grain(RB * cd.Mp * cx.D), [&](int64_t i0, int64_t i1) {
    Buf<T> tile = keep ? Buf<T>() : make_buf<T>(RB * CB);
    const int64_t lds = keep ? cd.Mp : CB;
    std::vector<T> lg(CB), m(RB), s(RB), rm(RB), rs(RB);
    for (int64_t blk = i0; blk < i1; ++blk) {
      const int64_t r0 = blk * RB, nr = std::min(RB, B - r0);
      std::fill(m.begin(), m.end(), neg_inf<T>());
      std::fill(s.begin(), s.end(), T(0));
      std::fill(rm.begin(), rm.end(), neg_inf<T>());
      std::fill(rs.begin(), rs.end(), T(0));
      for (int64_t c0 = 0; c0 < cd.Mp; c0 += CB) {
        const int64_t nc = std::min(CB, cd.Mp - c0);
        T* S = keep ? kept.get() + r0 * lds + c0 : tile.get();
        score_tile(cx.uhat + r0 * Dp, Dp, nr, cd.ct.get() + c0 * cx.D, nc, cx.D, S, lds);
        for (int64_t r = 0; r < nr; ++r) {
          const int64_t b = r0 + r;
          tile_logits(cx, cd, b, S + r * lds, c0, nc, cx.beta[b], true, T(0), lg.data());
          lse_update(lg.data(), nc, m[r], s[r]);
          if (compute_raw) {
            tile_logits(cx, cd, b, S + r * lds, c0, nc, T(1), true, T(0), lg.data());
            lse_update(lg.data(), nc, rm[r], rs[r]);
          }
        }
      }
      for (int64_t r = 0; r < nr; ++r) {
        const int64_t b = r0 + r;
        for (int pass = 0; pass < (compute_raw ? 2 : 1); ++pass) {
          T mm = pass == 0 ? m[r] : rm[r];
          T ss = pass == 0 ? s[r] : rs[r];
          const T pl_logit = (pass == 0 ? cx.alpha[b] : T(1)) * cx.spos[b];
          if (cx.include_pos) {
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
  pt.mark("fwd tiles");
  if (keep) {
    auto saved = std::make_shared<SavedTiles<T>>();
    saved->cd = std::move(cd);
    saved->S = std::move(kept);
    saved->rows = cx.rows;
    SavedCache::get().put(cx.key, saved);
  }
}

template <typename T, int NV>
void gemm_backward(Ctx<T>& cx, std::shared_ptr<SavedTiles<T>> saved, const at::Tensor& neg,
                   const T* grad_loss, const T* lse, T* grad_user, T* grad_items, T* grad_alpha,
                   T* grad_beta, bool need_scale) {
  using V = Vec<T>;
  constexpr int W = V::W;
  const Tuning& tu = tuning();
  PhaseTimer pt;
  // the forward's candidates and scores when it kept them, else computed here
  Cands<T> cd = saved != nullptr ? std::move(saved->cd) : prepare_cands(cx, neg);
  const T* kept = saved != nullptr ? saved->S.get() : nullptr;
  RowGrad<T> rg = row_grad(cx, grad_loss, lse);
  pt.mark(saved != nullptr ? "bwd candidates (saved)" : "bwd candidates");
  const int64_t B = cx.B, D = cx.D, Dp = cx.Dp, N = cx.N, Mc = cd.Mc;
  const int64_t RB = std::max<int64_t>(4, tu.row_block);
  const int64_t CB = round_up(std::max<int64_t>(2 * W, tu.col_block), 2 * W);
  const int64_t nblk = (B + RB - 1) / RB;
  const int64_t per = Mc * Dp * int64_t(sizeof(T));
  int64_t G = std::min<int64_t>({tu.max_groups, nblk, std::max<int64_t>(1, tu.partial_bytes / per)});
  G = std::max<int64_t>(G, 1);
  Buf<T> gc_parts = make_buf<T>(G * Mc * Dp);
  Buf<T> gu = make_zero_buf<T>(B * Dp);
  std::vector<T> q(B, T(0));

  at::parallel_for(0, G, grain(3 * B * cd.Mp * Dp / G), [&](int64_t g0, int64_t g1) {
    Buf<T> tile = kept != nullptr ? Buf<T>() : make_buf<T>(RB * CB);
    const int64_t lds = kept != nullptr ? cd.Mp : CB;
    Buf<T> dS = make_buf<T>(RB * CB);
    for (int64_t g = g0; g < g1; ++g) {
      T* gc = gc_parts.get() + g * Mc * Dp;
      std::memset(gc, 0, sizeof(T) * Mc * Dp);
      for (int64_t blk = nblk * g / G; blk < nblk * (g + 1) / G; ++blk) {
        const int64_t r0 = blk * RB, nr = std::min(RB, B - r0);
        for (int64_t c0 = 0; c0 < cd.Mp; c0 += CB) {
          const int64_t nc = std::min(CB, cd.Mp - c0);
          const int64_t ncv = std::min(nc, Mc - c0);  // valid columns
          const T* S = kept != nullptr ? kept + r0 * lds + c0 : tile.get();
          if (kept == nullptr) score_tile(cx.uhat + r0 * Dp, Dp, nr, cd.ct.get() + c0 * cx.D, nc, D, tile.get(), CB);
          for (int64_t r = 0; r < nr; ++r) {
            const int64_t b = r0 + r;
            T* d = dS.get() + r * CB;
            if (rg.g[b] == T(0)) {
              std::fill(d, d + nc, T(0));
              continue;
            }
            const T* s = S + r * lds;
            tile_logits(cx, cd, b, s, c0, nc, cx.beta[b], true, lse[b], d);
            const typename V::R vg = V::set1(rg.g[b] * cx.beta[b]);
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
          tile_gemm(gu.get() + r0 * Dp, Dp, dS.get(), CB, 1, cd.chat.get() + c0 * Dp, Dp, nr, ncv, Dp, true);
          tile_gemm(gc + c0 * Dp, Dp, dS.get(), 1, CB, cx.uhat + r0 * Dp, Dp, ncv, nr, Dp, true);
        }
      }
    }
  });

  pt.mark("bwd tiles");
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
  pt.mark("bwd merge");
  at::parallel_for(0, N, grain(D), [&](int64_t n0, int64_t n1) {
    std::memset(grad_items + n0 * D, 0, sizeof(T) * (n1 - n0) * D);
  });
  pt.mark("bwd zero items");
  std::vector<int32_t> touched;
  touched.reserve(Mc + B);
  std::vector<uint8_t> seen(N, 0);
  for (int64_t m = 0; m < Mc; ++m) {
    const int32_t it = cd.idx[m];
    T* out = grad_items + int64_t(it) * D;
    const T* src = gc_parts.get() + m * Dp;
    for (int64_t i = 0; i < D; ++i) out[i] += src[i];
    if (!seen[it]) { seen[it] = 1; touched.push_back(it); }
  }
  for (int64_t b = 0; b < B; ++b) {
    const int32_t it = cx.pos[b];
    const T dp = rg.dpos[b];
    T* out = grad_items + int64_t(it) * D;
    const T* u = cx.uhat + b * Dp;
    for (int64_t i = 0; i < D; ++i) out[i] += dp * u[i];
    if (!seen[it]) { seen[it] = 1; touched.push_back(it); }
  }
  pt.mark("bwd scatter");
  if (cx.normalize) {
    // (rows scattered over the table: each costs memory latency more than arithmetic)
    at::parallel_for(0, static_cast<int64_t>(touched.size()), grain(64 * D), [&](int64_t t0, int64_t t1) {
      std::vector<T> xh(Dp), gg(Dp, T(0));
      for (int64_t t = t0; t < t1; ++t) {
        const int64_t it = touched[t];
        const T nrm = load_row(xh.data(), cx.items + it * D, D, Dp, true);
        T* out = grad_items + it * D;
        std::copy(out, out + D, gg.begin());
        normalize_backward(out, gg.data(), xh.data(), nrm, D, true);
      }
    });
  }
  pt.mark("bwd normalize");
  finish_rows(cx, rg, 0, B, gu.get(), 1, q.data(), grad_user, grad_alpha, grad_beta, need_scale);
  pt.mark("bwd rows");
}

}  // namespace
}  // namespace ADAPTAU_CPU_CAPABILITY
}  // namespace cpu
}  // namespace adaptau
