// Per-row negatives (neg_mode 0): the plan (sort by item chunk), the score pass, forward
// and backward.
// Part of the softmax-loss kernels (softmax_loss_kernel_impl.h), compiled once per CPU
// capability inside adaptau::cpu::<capability>.
#pragma once

#include "loss_context.h"

namespace adaptau {
namespace cpu {
namespace ADAPTAU_CPU_CAPABILITY {
namespace {

// ======================================================================= per-row mode
// Rows are processed in blocks of at most ADAPTAU_CPU_MAX_PAIRS pairs (all rows at the
// paper's sizes). Per block:
//   sort      each row's M items are counting-sorted by item chunk (a power-of-two range
//             of table rows whose normalized copy fits in L2), inside the row's own slots:
//             the row's pairs of chunk c are sorted[bl*M + off[bl][c] .. off[bl][c+1]).
//   score     G groups of contiguous chunks (about equal pair counts; G from the problem
//             only) run in parallel; the thread owning a chunk normalizes its referenced
//             table rows once into an L2 buffer, then for every row's run in the chunk:
//             ŝ = <û, r̂> (user vector in registers), logits l = β·ŝ - logq, and a
//             flash-style running state per (group, row): max m, Σe^{l-m}, Σe^{l-m}·ŝ and
//             the vector Σe^{l-m}·r̂. The states are merged per row in group order.
//   forward   lse from the merged state and the positive.
//   backward  g·β·e^{m-lse}·Σe^{l-m}r̂ is the user gradient of the negatives and
//             g·e^{m-lse}·Σe^{l-m}ŝ the gradient of β, so only the item gradients need a
//             second pass over the pairs: d = g·β·e^{ŝβ - logq - lse} from the stored ŝ,
//             acc[item] += d·û in the chunk's accumulator, owned by its thread (no atomics,
//             no per-thread [N, D] copies), then the normalization's Jacobian per chunk row.
// The forward keeps its sort, scores and states for the backward of the same call
// (SavedCache); on a miss the backward recomputes them.

// The n indices neg[off, off + n) as int32: neg itself when it is int32, else converted
// into li. ok = every one is inside [0, N); when it is not, nothing may use them. The checks
// are max-reductions (vectorized), not a branch per index.
inline const int32_t* block_items(const void* neg, bool is64, int64_t off, int64_t n, int64_t N, int32_t* li,
                                  bool& ok) {
  if (!is64) {
    const int32_t* p = static_cast<const int32_t*>(neg) + off;
    ok = indices_below(p, n, static_cast<uint32_t>(N));
    return p;
  }
  ok = indices_below(static_cast<const int64_t*>(neg) + off, n, static_cast<uint32_t>(N), li);
  return li;
}

constexpr int64_t kBlock = 256;  // pairs processed at a time

// lse and loss of a row from its negatives' (m, s) and the positive logit.
template <typename T>
inline void finish_row(bool include_pos, T m, T s, T pos_logit, T& lse, T& loss) {
  if (include_pos) {
    if (pos_logit > m) {
      s = (m == neg_inf<T>() ? T(0) : s * std::exp(m - pos_logit)) + T(1);
      m = pos_logit;
    } else {
      s += std::exp(pos_logit - m);
    }
  }
  lse = lse_finish(m, s);
  loss = (lse == neg_inf<T>()) ? T(0) : lse - pos_logit;
}

struct Plan {
  int shift = 4;            // chunk c holds table rows [c << shift, (c + 1) << shift)
  int64_t chunk_rows = 16;  // rows of a chunk buffer: 2^shift, or N when one chunk is the table
  int64_t C = 1, r0 = 0, nb = 0, M = 0;
  int64_t block_rows = 64;   // rows per sort block
  std::vector<int32_t> off;  // [nblocks][C*block_rows + 1] run starts inside each block's slots
  // [nb*M] the pairs' items, per block of block_rows rows ordered by (chunk, row, m), each as the
  // element offset of its row in the chunk's buffer, (item - base)·Dp (< 2^31): the gathers
  // address a row straight from it; local_row() gives back item - base.
  Buf<int32_t> sorted;
  int64_t Dp = 0;      // row stride of the chunk buffers
  int row_shift = -1;  // log2(Dp) when Dp is a power of two
  int64_t local_row(int32_t off) const {
    return row_shift >= 0 ? int64_t(uint32_t(off) >> row_shift) : int64_t(uint32_t(off)) / Dp;
  }
  std::vector<int64_t> chunk_pairs;   // [C] pairs per chunk
  std::vector<int64_t> group_chunks;  // [G+1] chunk ranges of the groups
  int64_t capacity = 0;
  // f(bl, k0, k1) for every row bl (in order) with a non-empty run [k0, k1) in chunk c.
  template <typename F>
  void for_runs(int64_t c, F&& f) const {
    const int64_t E = C * block_rows + 1;
    for (int64_t j = 0, r0b = 0; r0b < nb; ++j, r0b += block_rows) {
      const int32_t* o = off.data() + j * E + c * block_rows;
      const int64_t sb = r0b * M, rows = std::min(block_rows, nb - r0b);
      for (int64_t r = 0; r < rows; ++r)
        if (o[r] != o[r + 1]) f(r0b + r, sb + o[r], sb + o[r + 1]);
    }
  }
};

// log2 of the rows per chunk: the chunk's rows fit chunk_bytes, unless the run starts
// (about nb per chunk) would outnumber max_entries; never more than one chunk for the
// whole table (with very few negatives per row, nb·(C + 2) <= max_entries cannot hold),
// and never a chunk of 2^31 elements or more (the pairs carry element offsets in int32).
int chunk_shift(int64_t row_bytes, int64_t row_elems, int64_t chunk_bytes, int64_t N, int64_t nb,
                int64_t max_entries) {
  int shift = 4;
  const auto fits = [&](int s) { return (int64_t(1) << s) * row_elems <= (int64_t(1) << 31); };
  while (shift < 30 && (int64_t(2) << shift) * row_bytes <= chunk_bytes && fits(shift + 1)) ++shift;
  while (shift < 31 && ((N - 1) >> shift) > 0 && (((N - 1) >> shift) + 2) * nb > max_entries &&
         fits(shift + 1))
    ++shift;
  return shift;
}

template <typename T>
void build_plan(const LossContext<T>& context, Plan& plan, int64_t r0, int64_t nb) {
  const int64_t M = context.M, N = context.N, C = plan.C, block_rows = plan.block_rows,
                E = C * block_rows + 1;
  const int shift = plan.shift;
  const int64_t nblk = (nb + block_rows - 1) / block_rows;
  plan.r0 = r0;
  plan.nb = nb;
  plan.M = M;
  plan.Dp = context.Dp;
  plan.row_shift = (context.Dp & (context.Dp - 1)) == 0
                       ? __builtin_ctzll(static_cast<unsigned long long>(context.Dp))
                       : -1;
  plan.off.resize(nblk * E);
  if (plan.capacity < nb * M) {
    plan.sorted = make_buf<int32_t>(nb * M);
    plan.capacity = nb * M;
  }
  std::atomic<bool> bad{false};
  at::parallel_for(0, nblk, grain(4 * block_rows * M + E), [&](int64_t j0, int64_t j1) {
    // li: the block's items as int32 (int64 input); tmp: the block sorted (both stay in L2
    // from block to block), then copied out sequentially: scattering straight into the big
    // sorted array would miss the cache on nearly every store. cnt[r * C + c]: the count,
    // then the write cursor, of row r's run in chunk c (row-major, so the inner loops index
    // it by the chunk alone).
    // Unsigned counters and indices (all checked to lie in [0, N) first): 32-bit values
    // extend to addresses for free, where signed ones would need a sign extension each. The
    // counting loops are unrolled by hand: `#pragma GCC unroll 4` on the plain loops (tried)
    // adds the row's counter offset per index, +1 instruction per pair in each loop.
    std::vector<int32_t> li(context.neg_is_int64 ? block_rows * M : 0), tmp(block_rows * M);
    std::vector<uint32_t> cnt(block_rows * C);
    const int sh = shift;  // a local: the captured one is re-read after every counter store
    // what a pair stores: its row's element offset in the chunk buffer
    const uint32_t low = static_cast<uint32_t>((int64_t(1) << shift) - 1),
                   dp32 = static_cast<uint32_t>(context.Dp);
    bool ok = true;
    for (int64_t j = j0; j < j1; ++j) {
      const int64_t rows = std::min(block_rows, nb - j * block_rows);
      bool in_range = true;
      const int32_t* __restrict__ l = block_items(
          context.neg, context.neg_is_int64, (r0 + j * block_rows) * M, rows * M, N, li.data(), in_range);
      if (!in_range) {
        ok = false;
        continue;
      }
      std::fill(cnt.begin(), cnt.end(), 0u);
      for (int64_t r = 0; r < rows; ++r) {
        const uint32_t* __restrict__ lr = reinterpret_cast<const uint32_t*>(l + r * M);
        uint32_t* __restrict__ h = cnt.data() + r * C;
        int64_t k = 0;
        for (; k + 4 <= M; k += 4) {
          const uint32_t c0 = lr[k] >> sh, c1 = lr[k + 1] >> sh, c2 = lr[k + 2] >> sh, c3 = lr[k + 3] >> sh;
          h[c0]++;
          h[c1]++;
          h[c2]++;
          h[c3]++;
        }
        for (; k < M; ++k) h[lr[k] >> sh]++;
      }
      // Run starts in (chunk, row) order; rows past the block's end get empty runs.
      int32_t* __restrict__ o = plan.off.data() + j * E;
      int32_t start = 0;
      for (int64_t c = 0; c < C; ++c)
        for (int64_t r = 0; r < block_rows; ++r) {
          o[c * block_rows + r] = start;
          if (r < rows) {
            uint32_t& h = cnt[r * C + c];
            const int32_t n = static_cast<int32_t>(h);
            h = static_cast<uint32_t>(start);
            start += n;
          }
        }
      o[C * block_rows] = start;
      int32_t* __restrict__ dst = tmp.data();
      for (int64_t r = 0; r < rows; ++r) {
        const uint32_t* __restrict__ lr = reinterpret_cast<const uint32_t*>(l + r * M);
        uint32_t* __restrict__ cur = cnt.data() + r * C;
        uint32_t* __restrict__ out = reinterpret_cast<uint32_t*>(dst);
        int64_t k = 0;
        for (; k + 4 <= M; k += 4) {
          for (int i = 0; i < 4; ++i) {
            const uint32_t v = lr[k + i];
            out[cur[v >> sh]++] = (v & low) * dp32;
          }
        }
        for (; k < M; ++k) {
          const uint32_t v = lr[k];
          out[cur[v >> sh]++] = (v & low) * dp32;
        }
      }
      std::memcpy(plan.sorted.get() + j * block_rows * M, dst, sizeof(int32_t) * rows * M);
    }
    if (!ok) bad.store(true);
  });
  if (bad.load()) throw_index_error("neg", context.neg, context.neg_is_int64, context.B * M, M, N);
  plan.chunk_pairs.assign(C, 0);
  for (int64_t j = 0; j < nblk; ++j) {
    const int32_t* o = plan.off.data() + j * E;
    for (int64_t c = 0; c < C; ++c) plan.chunk_pairs[c] += o[(c + 1) * block_rows] - o[c * block_rows];
  }
  // Groups: contiguous chunk ranges with about the same number of pairs.
  const int64_t G = std::max<int64_t>(1, std::min<int64_t>(tuning().max_groups, C));
  plan.group_chunks.assign(G + 1, C);
  plan.group_chunks[0] = 0;
  const int64_t P = nb * M;
  int64_t c = 0, acc = 0;
  for (int64_t g = 1; g < G; ++g) {
    const int64_t target = P * g / G;
    while (c < C && acc < target) acc += plan.chunk_pairs[c++];
    plan.group_chunks[g] = std::max(c, plan.group_chunks[g - 1]);
  }
}

// What the score pass leaves for the rest (one block of rows): the scores of the pairs in
// the plan's order and the merged running state of each row's negatives.
template <typename T>
struct PairState {
  Buf<T> score;             // [nb*M] ŝ of each pair, or e = exp(β·ŝ - |β|) when exp_scores
  bool exp_scores = false;  // the score pass used the fixed reference (see fixed_reference)
  std::vector<T> m, s, w;   // [nb] max logit, Σe^{l-m}, Σe^{l-m}·ŝ
  Buf<T> v;                 // [nb][Dp] Σe^{l-m}·r̂
  std::vector<T> rm, rs;    // [nb] max and Σe^{l'-m'} of the raw logits l' = ŝ - logq (compute_raw)
};

template <typename T>
struct Saved {
  Plan plan;
  PairState<T> state;
  std::shared_ptr<const PreparedRows<T>> rows;
};

// no padding (D equals it), so the row helpers' loops unroll (row_len); else kD = 0.
template <typename T, int NV, typename F>
ADAPTAU_HOT_INLINE void with_row_len(int64_t D, F&& f) {
  constexpr int64_t kDp = RunOps<T, NV>::kDp;
  if (NV > 0 && D == kDp)
    f(std::integral_constant<int64_t, kDp>{});
  else
    f(std::integral_constant<int64_t, 0>{});
}

// Normalizes (or copies) the rows of chunk c that its pairs reference into buf (padded):
// all rows when the chunk is dense, else only the referenced ones (stamped with id).
// (Kept out of line: inlined, it changes the register allocation of the score pass's
// run loops for the worse.)
template <typename T, int NV>
__attribute__((noinline)) void load_chunk(const LossContext<T>& context, const Plan& plan, int64_t c,
                                          int64_t base, int64_t nloc, T* buf, std::vector<int64_t>& stamp,
                                          int64_t id) {
  const int64_t D = context.D, Dp = context.Dp;
  if (plan.chunk_pairs[c] >= nloc / 2) {
    with_row_len<T, NV>(D, [&](auto kd) {
      constexpr int64_t kD = decltype(kd)::value;
      for (int64_t r = 0; r < nloc; ++r)
        load_row<kD>(buf + r * Dp, context.items + (base + r) * D, D, Dp, context.normalize);
    });
    return;
  }
  plan.for_runs(c, [&](int64_t, int64_t k0, int64_t k1) {
    for (int64_t k = k0; k < k1; ++k) {
      const int64_t r = plan.local_row(plan.sorted[k]);
      if (stamp[r] != id) {
        stamp[r] = id;
        load_row(buf + r * Dp, context.items + (base + r) * D, D, Dp, context.normalize);
      }
    }
  });
}

// Logits of a run of chunk rows [base, ...): lg[k] = scale·sc[k] - logq[item k] - shift
// (-inf for an accidental hit when remove_hits; item k = base + plan.local_row(off[k])),
// padded with -inf to a multiple of W. Returns their max.
template <typename T>
inline T run_logits(const LossContext<T>& context, const Plan& plan, int64_t base,
                    const int32_t* __restrict__ idx, const T* __restrict__ sc, int64_t n, T scale, T shift,
                    int32_t p, T* __restrict__ lg) {
  using V = Vec<T>;
  constexpr int W = V::W;
  const int64_t npad = round_up(n, W);
  T mx = neg_inf<T>();
  if (context.logq == nullptr && !context.remove_hits) {
    const typename V::R vs = V::set1(scale), vsh = V::set1(shift);
    typename V::R vm = V::set1(neg_inf<T>());
    int64_t k = 0;
    for (; k + W <= n; k += W) {
      const typename V::R l = V::sub(V::mul(vs, V::load(sc + k)), vsh);
      V::store(lg + k, l);
      vm = V::max(vm, l);
    }
    mx = V::hmax(vm);
    for (; k < n; ++k) {
      lg[k] = scale * sc[k] - shift;
      mx = std::max(mx, lg[k]);
    }
  } else {
    for (int64_t k = 0; k < n; ++k) {
      const int64_t item = base + plan.local_row(idx[k]);
      const bool drop = context.remove_hits && item == p;
      const T l = drop ? neg_inf<T>() : scale * sc[k] - (context.logq ? context.logq[item] : T(0)) - shift;
      lg[k] = l;
      mx = std::max(mx, l);
    }
  }
  for (int64_t k = n; k < npad; ++k) lg[k] = neg_inf<T>();
  return mx;
}

// out[k] = f(x[k]) for the n values of a run, W at a time; the last vector is read from a
// zero-padded copy (never past the run's slots) and written whole (out has room, npad).
template <typename T, typename F>
ADAPTAU_HOT_INLINE void map_run(const T* __restrict__ x, int64_t n, T* __restrict__ out, F f) {
  using V = Vec<T>;
  constexpr int W = V::W;
  int64_t k = 0;
  for (; k + W <= n; k += W) V::store(out + k, f(V::load(x + k)));
  if (k < n) {
    alignas(64) T t[W] = {};
    std::copy(x + k, x + n, t);
    V::store(out + k, f(V::load(t)));
  }
}

// Fixed reference: with normalized vectors and no logq, a row's logits β·ŝ lie in
// [-|β|, |β|], so exp(β·ŝ - |β|) ∈ [e^{-2|β|}, 1] neither overflows nor, for |β| up to this
// bound, underflows (V::exp is exact down to -87 in float32). Rows then need no running max:
// no max pass, no rescaling between runs, and the exps can be kept for the backward.
template <typename T>
constexpr T fixed_reference_max_beta() {
  return sizeof(T) == 4 ? T(40) : T(300);
}

// The raw loss's terms (normalized, no logq): exp(ŝ - 1) of a vector of scores, lanes from
// `left` on zeroed. Cosines are at most 1, so the raw log-sum-exp needs no running max
// (reference 1 for every row); add_raw folds a run's sum into its (group, row) state.
template <typename T>
ADAPTAU_HOT_INLINE typename Vec<T>::R raw_exp(typename Vec<T>::R sv, int left) {
  using V = Vec<T>;
  const typename V::R r = V::exp(V::sub(sv, V::set1(T(1))));
  return left < V::W ? V::keep_first(r, left) : r;
}

template <typename T>
ADAPTAU_HOT_INLINE void add_raw(T& rm, T& rs, typename Vec<T>::R racc) {
  rm = T(1);
  rs += Vec<T>::hsum(racc);
}

// What every run of a score pass's thread shares in the fixed-reference case: the chunk
// buffer, a scratch for the scores and the (group, row) states (indexed by gb = g·nb + row).
template <typename T>
struct FixedRunArgs {
  const T* buf;
  int64_t Dp;
  T* sc;             // [kBlock + W] scores scratch
  T *m, *s, *w, *v;  // states: max (|β|), Σe, Σe·ŝ, Σe·row ([Dp] each)
  bool compute_raw;
  T *rm, *rs;  // raw loss states (compute_raw)
};

// One block (at most kBlock pairs) of a run in the fixed-reference case: the scores
// ŝ = <u, row>, e = exp(β·ŝ - |β|) stored in the pairs' slots dst, and state gb: m = |β|,
// s += Σe, w += Σe·ŝ, v (+)= Σe·row (fresh: the row's first block in this group), and with
// compute_raw the raw loss's Σexp(ŝ - 1) into rs (rm = 1). Out of line, with few
// arguments: inlined into the loop over runs, GCC spilled more than the call costs.
template <typename T, int NV>
__attribute__((noinline)) void fixed_run(const FixedRunArgs<T>& args, int64_t gb, const T* __restrict__ u,
                                         T beta, const int32_t* __restrict__ idx, int64_t n,
                                         T* __restrict__ dst) {
  using Ops = RunOps<T, NV>;
  using V = Vec<T>;
  constexpr int W = V::W;
  T* __restrict__ sc = args.sc;
  Ops::dots(u, args.buf, idx, n, args.Dp, sc);
  const typename V::R vb = V::set1(beta), vnref = V::set1(-std::abs(beta));
  typename V::R es = V::zero(), ews = V::zero(), racc = V::zero();
  const bool compute_raw = args.compute_raw;
  for (int64_t k = 0; k < n; k += W) {
    const typename V::R sv = V::load_after_hsum4(sc + k);
    typename V::R e = V::exp(V::fma(vb, sv, vnref));
    const int left = static_cast<int>(std::min<int64_t>(W, n - k));
    if (left < W) {
      e = V::keep_first(e, left);
      V::store_first(dst + k, e, left);
    } else {
      V::store(dst + k, e);
    }
    es = V::add(es, e);
    ews = V::fma(e, sv, ews);
    if (compute_raw) racc = V::add(racc, raw_exp<T>(sv, left));
  }
  if (compute_raw) add_raw(args.rm[gb], args.rs[gb], racc);
  const bool fresh = args.m[gb] == neg_inf<T>();
  args.m[gb] = std::abs(beta);
  args.s[gb] += V::hsum(es);
  args.w[gb] += V::hsum(ews);
  Ops::gather_axpy(args.v + gb * args.Dp, fresh, T(1), dst, args.buf, idx, n, args.Dp);
}

// Score pass over one block of rows (see the section comment): fills state.
template <typename T, int NV>
void score_pass(const LossContext<T>& context, const Plan& plan, PairState<T>& state, bool compute_raw) {
  using Ops = RunOps<T, NV>;
  using V = Vec<T>;
  constexpr int W = V::W;
  const int64_t nb = plan.nb, M = plan.M, Dp = context.Dp, N = context.N, chunk_rows = plan.chunk_rows,
                r0 = plan.r0;
  const int shift = plan.shift;
  const int64_t G = static_cast<int64_t>(plan.group_chunks.size()) - 1;
  if (state.score.get() == nullptr) state.score = make_buf<T>(nb * M);
  std::vector<T> gm(G * nb, neg_inf<T>()), gs(G * nb, T(0)), gw(G * nb, T(0));
  std::vector<T> grm(compute_raw ? G * nb : 0, neg_inf<T>()), grs(compute_raw ? G * nb : 0, T(0));
  Buf<T> gv = make_buf<T>(G * nb * Dp);
  // Raw logits ŝ - logq: with normalized vectors and no logq they lie in [-1, 1].
  const bool raw_fixed_ref = context.normalize && context.logq == nullptr;
  // The common case (normalized, no logq, no hit removal): logits β·ŝ straight from the
  // scores, both exps in one loop, no per-run logits buffer or scalar tails.
  const bool plain = raw_fixed_ref && !context.remove_hits;
  bool fixed = plain;
  for (int64_t b = r0; b < r0 + nb && fixed; ++b)
    fixed = std::abs(context.beta[b]) <= fixed_reference_max_beta<T>();
  state.exp_scores = fixed;
  at::parallel_for(0, G, grain(3 * nb * M * Dp / G), [&](int64_t g0, int64_t g1) {
    Buf<T> buf = make_buf<T>(chunk_rows * Dp);
    std::vector<int64_t> stamp(chunk_rows, -1);
    alignas(64) T lg[kBlock + W];
    alignas(64) T ex[kBlock + W];
    alignas(64) T sc[kBlock + W];
    std::fill(sc, sc + kBlock + W, T(0));  // lanes past a run's end stay finite
    for (int64_t g = g0; g < g1; ++g) {
      for (int64_t c = plan.group_chunks[g]; c < plan.group_chunks[g + 1]; ++c) {
        if (plan.chunk_pairs[c] == 0) continue;
        const int64_t base = c << shift;
        const int64_t nloc = std::min(chunk_rows, N - base);
        load_chunk<T, NV>(context, plan, c, base, nloc, buf.get(), stamp, c + r0 * plan.C);
        if (fixed) {
          const FixedRunArgs<T> run_args{buf.get(), Dp,       sc,          gm.data(),  gs.data(),
                                         gw.data(), gv.get(), compute_raw, grm.data(), grs.data()};
          // (pointers captured by value, not through the enclosing lambda's references: they
          // stay in registers across the calls instead of being reloaded after each)
          const int64_t gnb = g * nb, stride = Dp;
          T* const score = state.score.get();
          const int32_t* const sorted = plan.sorted.get();
          const T* const betas = context.beta + r0;
          const T* const users = context.uhat + r0 * Dp;
          plan.for_runs(
              c, [&run_args, gnb, stride, score, sorted, betas, users](int64_t bl, int64_t k0, int64_t k1) {
                for (int64_t kk = k0; kk < k1; kk += kBlock)
                  fixed_run<T, NV>(run_args, gnb + bl, users + bl * stride, betas[bl], sorted + kk,
                                   std::min(kBlock, k1 - kk), score + kk);
              });
          continue;
        }
        plan.for_runs(c, [&](int64_t bl, int64_t k0, int64_t k1) {
          const int64_t b = r0 + bl, gb = g * nb + bl;
          const T* u = context.uhat + b * Dp;
          const T beta = context.beta[b];
          const int32_t p = context.pos[b];
          for (int64_t kk = k0; kk < k1; kk += kBlock) {
            const int64_t n = std::min(kBlock, k1 - kk);
            const int64_t npad = round_up(n, W);
            const int32_t* idx = plan.sorted.get() + kk;
            Ops::dots(u, buf.get(), idx, n, Dp, sc);
            const typename V::R vb = V::set1(beta);
            T mx;
            if (plain) {
              // Logits β·ŝ straight from the scores. Pad lanes repeat sc[0], so the max needs
              // no mask; the sums below mask them instead.
              for (int64_t k = n; k < npad; ++k) sc[k] = sc[0];
              T* dst = state.score.get() + kk;
              int64_t k = 0;
              for (; k + W <= n; k += W) {
                const typename V::R v = V::load_after_hsum4(sc + k);
                V::store(sc + k, v);
                V::store(dst + k, v);
              }
              if (k < n) {
                V::store(sc + k, V::load_after_hsum4(sc + k));
                for (; k < n; ++k) dst[k] = sc[k];
              }
              typename V::R vmx = V::set1(neg_inf<T>());
              for (k = 0; k < npad; k += W) vmx = V::max(vmx, V::mul(vb, V::load(sc + k)));
              mx = V::hmax(vmx);
            } else {
              for (int64_t k = n; k < npad; ++k) sc[k] = T(0);
              for (int64_t k = 0; k < npad; k += W) V::store(sc + k, V::load_after_hsum4(sc + k));
              std::memcpy(state.score.get() + kk, sc, sizeof(T) * n);
              if (compute_raw && raw_fixed_ref) {
                // as raw_exp, through the logits (hit removal drops the positive's slots)
                run_logits(context, plan, base, idx, sc, n, T(1), T(1), p, lg);
                typename V::R acc = V::zero();
                for (int64_t k = 0; k < npad; k += W) acc = V::add(acc, V::exp(V::load(lg + k)));
                add_raw(grm[gb], grs[gb], acc);
              } else if (compute_raw) {
                run_logits(context, plan, base, idx, sc, n, T(1), T(0), p, lg);
                lse_update(lg, npad, grm[gb], grs[gb]);
              }
              mx = run_logits(context, plan, base, idx, sc, n, beta, T(0), p, lg);  // lg padded with -inf
            }
            if (mx == neg_inf<T>()) continue;
            T& m = gm[gb];
            const bool fresh = m == neg_inf<T>();
            const T mn = fresh ? mx : std::max(m, mx);
            const T keep = fresh ? T(0) : (mn == m ? T(1) : std::exp(m - mn));
            const typename V::R vmn = V::set1(mn), vnmn = V::set1(-mn);
            typename V::R es = V::zero(), ews = V::zero(), racc = V::zero();
            const int tail = static_cast<int>(n - (npad - W));
            for (int64_t k = 0; k < npad; k += W) {
              const typename V::R sv = V::load(sc + k);
              // (plain: β·ŝ - m in one rounding)
              typename V::R e = V::exp(plain ? V::fma(vb, sv, vnmn) : V::sub(V::load(lg + k), vmn));
              if (k + W > n) e = V::keep_first(e, tail);
              V::store(ex + k, e);
              es = V::add(es, e);
              ews = V::fma(e, sv, ews);
              if (plain && compute_raw) racc = V::add(racc, raw_exp<T>(sv, k + W > n ? tail : W));
            }
            if (plain && compute_raw) add_raw(grm[gb], grs[gb], racc);
            gs[gb] = gs[gb] * keep + V::hsum(es);
            gw[gb] = gw[gb] * keep + V::hsum(ews);
            m = mn;
            Ops::gather_axpy(gv.get() + gb * Dp, fresh, keep, ex, buf.get(), idx, n, Dp);
          }
        });
      }
    }
  });
  // Merge the groups of each row, in group order.
  state.m.assign(nb, neg_inf<T>());
  state.s.assign(nb, T(0));
  state.w.assign(nb, T(0));
  if (state.v.get() == nullptr) state.v = make_buf<T>(nb * Dp);
  if (compute_raw) {
    state.rm.assign(nb, neg_inf<T>());
    state.rs.assign(nb, T(0));
  }
  at::parallel_for(0, nb, grain(4 * G * Dp), [&](int64_t b0, int64_t b1) {
    for (int64_t bl = b0; bl < b1; ++bl) {
      T m = neg_inf<T>();
      for (int64_t g = 0; g < G; ++g) m = std::max(m, gm[g * nb + bl]);
      T s = T(0), w = T(0);
      T* v = state.v.get() + bl * Dp;
      std::fill(v, v + Dp, T(0));
      if (m != neg_inf<T>()) {
        for (int64_t g = 0; g < G; ++g) {
          const int64_t gb = g * nb + bl;
          if (gm[gb] == neg_inf<T>()) continue;
          const T f = std::exp(gm[gb] - m);
          s += f * gs[gb];
          w += f * gw[gb];
          const T* gvr = gv.get() + gb * Dp;
          for (int64_t i = 0; i < Dp; ++i) v[i] += f * gvr[i];
        }
      }
      state.m[bl] = m;
      state.s[bl] = s;
      state.w[bl] = w;
      if (compute_raw) {
        T rm = neg_inf<T>(), rs = T(0);
        for (int64_t g = 0; g < G; ++g) rm = std::max(rm, grm[g * nb + bl]);
        if (rm != neg_inf<T>())
          for (int64_t g = 0; g < G; ++g)
            if (grm[g * nb + bl] != neg_inf<T>()) rs += std::exp(grm[g * nb + bl] - rm) * grs[g * nb + bl];
        state.rm[bl] = rm;
        state.rs[bl] = rs;
      }
    }
  });
}

template <typename T>
std::pair<int64_t, int> per_row_blocking(const LossContext<T>& context) {
  const Tuning& settings = tuning();
  const int64_t Bb = std::max<int64_t>(1, std::min<int64_t>(context.B, settings.max_pairs / context.M));
  const int shift = chunk_shift(context.Dp * int64_t(sizeof(T)), context.Dp, settings.chunk_bytes, context.N,
                                Bb, settings.max_pairs);
  return {Bb, shift};
}

template <typename T>
void init_plan(const LossContext<T>& context, Plan& plan, int shift) {
  plan.shift = shift;
  plan.chunk_rows = std::min(int64_t(1) << shift, context.N);  // (C > 1 implies 2^shift < N)
  // The pairs carry their rows' offsets in a chunk buffer as int32 (Plan::sorted):
  // chunk_shift keeps chunks below 2^31 elements unless a single row of 16-row chunks
  // is already too long, which only an absurd embedding size can make.
  TORCH_CHECK(plan.chunk_rows * context.Dp <= (int64_t(1) << 31), "adaptau cpu backend: embedding dimension ",
              context.D,
              " is too large for the per-row "
              "kernel (a chunk of ",
              plan.chunk_rows, " rows would exceed 2^31 elements)");
  plan.C = ((context.N - 1) >> shift) + 1;
  plan.block_rows = std::max<int64_t>(1, std::min(tuning().sort_rows, (int64_t(1) << 18) / context.M));
}

template <typename T, int NV>
void per_row_forward(LossContext<T>& context, T* loss, T* lse_out, T* raw, bool compute_raw) {
  const int64_t B = context.B;
  PhaseTimer timer;
  const auto [Bb, shift] = per_row_blocking(context);
  auto saved = std::make_shared<Saved<T>>();
  Plan& plan = saved->plan;
  PairState<T>& state = saved->state;
  init_plan(context, plan, shift);
  for (int64_t r0 = 0; r0 < B; r0 += Bb) {
    const int64_t nb = std::min(Bb, B - r0);
    build_plan(context, plan, r0, nb);
    timer.mark("fwd sort");
    score_pass<T, NV>(context, plan, state, compute_raw);
    timer.mark("fwd scores");
    for (int64_t bl = 0; bl < nb; ++bl) {
      const int64_t b = r0 + bl;
      finish_row(context.include_pos, state.m[bl], state.s[bl], context.alpha[b] * context.spos[b],
                 lse_out[b], loss[b]);
      if (compute_raw) {
        T unused;
        finish_row(context.include_pos, state.rm[bl], state.rs[bl], context.spos[b], unused, raw[b]);
      }
    }
    timer.mark("fwd rows");
  }
  if (Bb >= B) {
    saved->rows = context.rows;
    SavedCache::get().put(context.key, saved);
  }
}

// Per-row quantities of the backward: g (0 for an empty row), d(loss)/d(pos score).
template <typename T>
struct RowGrad {
  std::vector<T> g, dpos, p_pos;
};

template <typename T>
RowGrad<T> row_grad(const LossContext<T>& context, const T* grad_loss, const T* lse) {
  RowGrad<T> row_grads;
  row_grads.g.resize(context.B);
  row_grads.dpos.resize(context.B);
  row_grads.p_pos.resize(context.B);
  for (int64_t b = 0; b < context.B; ++b) {
    const bool empty = !(lse[b] > neg_inf<T>());
    const T g = empty ? T(0) : grad_loss[b];
    const T pp =
        (context.include_pos && !empty) ? std::exp(context.alpha[b] * context.spos[b] - lse[b]) : T(0);
    row_grads.g[b] = g;
    row_grads.p_pos[b] = pp;
    row_grads.dpos[b] = g * context.alpha[b] * (pp - T(1));
  }
  return row_grads;
}

// grad_user rows [r0, r0+nb) from the normalized-space gradient (the sum of nparts
// partials [nparts][nb][Dp] in order, plus the positive's term), and the scale gradients
// (q: Σ_k P_k ŝ_k per row, in nparts partials).
template <typename T>
void finish_rows(const LossContext<T>& context, const RowGrad<T>& row_grads, int64_t r0, int64_t nb,
                 const T* gu_parts, int64_t nparts, const T* q_parts, T* grad_user, T* grad_alpha,
                 T* grad_beta, bool need_scale) {
  const int64_t D = context.D, Dp = context.Dp;
  at::parallel_for(0, nb, grain(4 * (nparts + 2) * Dp), [&](int64_t b0, int64_t b1) {
    std::vector<T> gu(Dp), ph(Dp);
    for (int64_t bl = b0; bl < b1; ++bl) {
      const int64_t b = r0 + bl;
      std::copy(gu_parts + bl * Dp, gu_parts + (bl + 1) * Dp, gu.begin());
      for (int64_t g = 1; g < nparts; ++g) {
        const T* part = gu_parts + (g * nb + bl) * Dp;
        for (int64_t i = 0; i < Dp; ++i) gu[i] += part[i];
      }
      const T dp = row_grads.dpos[b];
      if (dp != T(0)) {
        load_row(ph.data(), context.items + int64_t(context.pos[b]) * D, D, Dp, context.normalize);
        for (int64_t i = 0; i < D; ++i) gu[i] += dp * ph[i];
      }
      normalize_backward(grad_user + b * D, gu.data(), context.uhat + b * Dp, context.unorm[b], D,
                         context.normalize);
      if (need_scale) {
        T q = T(0);
        for (int64_t g = 0; g < nparts; ++g) q += q_parts[g * nb + bl];
        grad_beta[b] = row_grads.g[b] * q;
        grad_alpha[b] = row_grads.g[b] * context.spos[b] * (row_grads.p_pos[b] - T(1));
      } else {
        grad_beta[b] = T(0);
        grad_alpha[b] = T(0);
      }
    }
  });
}

// Item-gradient pass over one block of rows: per chunk (G groups in parallel), d = g·β·P
// of every pair from its stored score, acc[item] += d·û (and the positives' d·û), then
// the chunk's rows of grad_items: written (single block), or summed over the blocks with
// the normalization's Jacobian applied after the last one.
template <typename T, int NV>
void item_grad_pass(const LossContext<T>& context, const Plan& plan, const PairState<T>& state,
                    const RowGrad<T>& row_grads, const T* lse, const std::vector<int32_t>& pstart,
                    const std::vector<int32_t>& prow, T* grad_items, bool first, bool last, bool single) {
  using Ops = RunOps<T, NV>;
  using V = Vec<T>;
  constexpr int W = V::W;
  const int64_t nb = plan.nb, Dp = context.Dp, D = context.D, N = context.N, chunk_rows = plan.chunk_rows,
                r0 = plan.r0;
  const int shift = plan.shift;
  const int64_t G = static_cast<int64_t>(plan.group_chunks.size()) - 1;
  const bool plain = context.logq == nullptr && !context.remove_hits;  // logits are β·ŝ
  // exp_scores: the row factor g·β·exp(m - lse) of the stored e = exp(β·ŝ - m), m the row's
  // fixed reference kept in the state (0 for a skipped row)
  std::vector<T> efac(state.exp_scores ? nb : 0);
  for (int64_t bl = 0; bl < static_cast<int64_t>(efac.size()); ++bl) {
    const int64_t b = r0 + bl;
    efac[bl] =
        row_grads.g[b] == T(0) ? T(0) : row_grads.g[b] * context.beta[b] * std::exp(state.m[bl] - lse[b]);
  }
  at::parallel_for(0, G, grain(2 * nb * plan.M * Dp / G), [&](int64_t g0, int64_t g1) {
    Buf<T> acc = make_zero_buf<T>(chunk_rows * Dp);  // zero between chunks: rows are cleared as written
    std::vector<T> xh(Dp);
    alignas(64) T lg[kBlock + W];
    for (int64_t g = g0; g < g1; ++g) {
      for (int64_t c = plan.group_chunks[g]; c < plan.group_chunks[g + 1]; ++c) {
        const int64_t base = c << shift;
        const int64_t nloc = std::min(chunk_rows, N - base);
        if (plan.chunk_pairs[c] > 0) {
          plan.for_runs(c, [&](int64_t bl, int64_t k0, int64_t k1) {
            const int64_t b = r0 + bl;
            if (row_grads.g[b] == T(0)) return;
            const T* u = context.uhat + b * Dp;
            const T beta = context.beta[b];
            const T l_b = lse[b];
            const int32_t p = context.pos[b];
            const typename V::R vg = V::set1(row_grads.g[b] * beta);
            for (int64_t kk = k0; kk < k1; kk += kBlock) {
              const int64_t n = std::min(kBlock, k1 - kk);
              const int64_t npad = round_up(n, W);
              const int32_t* idx = plan.sorted.get() + kk;
              const T* sc = state.score.get() + kk;
              if (state.exp_scores) {
                // d = g·β·exp(m - lse)·e with e = exp(β·ŝ - m) stored (m = |β|): the row factor
                // scales û once per run and the stored e are the coefficients as they are
                Ops::scatter_axpy(acc.get(), idx, sc, u, efac[bl], n, Dp);
                continue;
              }
              if (plain) {  // d = g·β·exp(β·ŝ - lse) straight from the scores
                const typename V::R vb = V::set1(beta), vl = V::set1(l_b);
                map_run(sc, n, lg,
                        [&](typename V::R x) { return V::mul(vg, V::exp(V::sub(V::mul(vb, x), vl))); });
              } else {
                run_logits(context, plan, base, idx, sc, n, beta, l_b, p, lg);
                for (int64_t k = 0; k < npad; k += W) V::store(lg + k, V::mul(vg, V::exp(V::load(lg + k))));
              }
              Ops::scatter_axpy(acc.get(), idx, lg, u, T(1), n, Dp);
            }
          });
        }
        // Positives of this chunk (rows of this block).
        for (int64_t j = pstart[c]; j < pstart[c + 1]; ++j) {
          const int64_t b = prow[j];
          const T dp = row_grads.dpos[b];
          if (b < r0 || b >= r0 + nb || dp == T(0)) continue;
          T* a = acc.get() + (context.pos[b] - base) * Dp;
          const T* u = context.uhat + b * Dp;
          for (int64_t i = 0; i < Dp; ++i) a[i] += dp * u[i];
        }
        // Item-gradient rows of the chunk.
        for (int64_t r = 0; r < nloc; ++r) {
          T* out = grad_items + (base + r) * D;
          T* a = acc.get() + r * Dp;
          const T* x = context.items + (base + r) * D;
          if (single) {
            with_row_len<T, NV>(D, [&](auto kd) {
              constexpr int64_t kD = decltype(kd)::value;
              const T nrm = load_row<kD>(xh.data(), x, D, Dp, context.normalize);
              normalize_backward<kD>(out, a, xh.data(), nrm, D, context.normalize);
              std::memset(a, 0, sizeof(T) * row_len<kD>(Dp));
            });
            continue;
          }
          if (first)
            std::memcpy(out, a, sizeof(T) * D);
          else
            for (int64_t i = 0; i < D; ++i) out[i] += a[i];
          std::memset(a, 0, sizeof(T) * Dp);
          if (last && context.normalize) {
            const T n = std::sqrt(dot_plain(x, x, D));
            if (n > norm_eps<T>()) {
              const T inv = T(1) / n;
              const T proj = inv * inv * dot_plain(x, out, D);
              for (int64_t i = 0; i < D; ++i) out[i] = (out[i] - x[i] * proj) * inv;
            } else {
              for (int64_t i = 0; i < D; ++i) out[i] *= T(1) / norm_eps<T>();
            }
          }
        }
      }
    }
  });
}

// Backward, per block of rows: the forward's plan and state when the cache has them (one
// block), else the sort and score pass again; then the item-gradient pass and the rows.
template <typename T, int NV>
void per_row_backward(LossContext<T>& context, std::shared_ptr<Saved<T>> saved, const T* grad_loss,
                      const T* lse, T* grad_user, T* grad_items, T* grad_alpha, T* grad_beta,
                      bool need_scale) {
  const int64_t B = context.B, Dp = context.Dp;
  PhaseTimer timer;
  RowGrad<T> row_grads = row_grad(context, grad_loss, lse);
  const auto [Bb, shift] = per_row_blocking(context);
  const bool single = Bb >= B;
  const bool cached = saved != nullptr && single;  // (the forward keeps single blocks only)
  if (!cached) {
    saved = std::make_shared<Saved<T>>();
    init_plan(context, saved->plan, shift);
  }
  Plan& plan = saved->plan;
  PairState<T>& state = saved->state;
  const int64_t C = plan.C;
  // Positives by chunk (stable in b).
  std::vector<int32_t> pstart(C + 1, 0), prow(B);
  for (int64_t b = 0; b < B; ++b) pstart[(context.pos[b] >> plan.shift) + 1]++;
  for (int64_t c = 0; c < C; ++c) pstart[c + 1] += pstart[c];
  {
    std::vector<int32_t> pcur(pstart.begin(), pstart.end() - 1);
    for (int64_t b = 0; b < B; ++b) prow[pcur[context.pos[b] >> plan.shift]++] = static_cast<int32_t>(b);
  }
  timer.mark(cached ? "bwd setup (saved)" : "bwd setup");
  Buf<T> gu = make_buf<T>(Bb * Dp);
  std::vector<T> q(Bb);
  for (int64_t r0 = 0; r0 < B; r0 += Bb) {
    const int64_t nb = std::min(Bb, B - r0);
    if (!cached) {
      build_plan(context, plan, r0, nb);
      score_pass<T, NV>(context, plan, state, false);
      timer.mark("bwd recompute");
    }
    item_grad_pass<T, NV>(context, plan, state, row_grads, lse, pstart, prow, grad_items, r0 == 0,
                          r0 + nb == B, single);
    timer.mark("bwd items");
    // Negatives' user gradient (normalized space) and Σ_k P_k ŝ_k from the state.
    at::parallel_for(0, nb, grain(2 * Dp), [&](int64_t b0, int64_t b1) {
      for (int64_t bl = b0; bl < b1; ++bl) {
        const int64_t b = r0 + bl;
        const T f =
            (row_grads.g[b] == T(0) || state.m[bl] == neg_inf<T>()) ? T(0) : std::exp(state.m[bl] - lse[b]);
        const T cu = row_grads.g[b] * context.beta[b] * f;
        const T* v = state.v.get() + bl * Dp;
        T* o = gu.get() + bl * Dp;
        for (int64_t i = 0; i < Dp; ++i) o[i] = cu * v[i];
        q[bl] = f * state.w[bl];
      }
    });
    finish_rows(context, row_grads, r0, nb, gu.get(), 1, q.data(), grad_user, grad_alpha, grad_beta,
                need_scale);
    timer.mark("bwd rows");
  }
}

}  // namespace
}  // namespace ADAPTAU_CPU_CAPABILITY
}  // namespace cpu
}  // namespace adaptau
