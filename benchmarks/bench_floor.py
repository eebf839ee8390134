"""Where the CPU kernel's time goes, against what this machine can do at all.

The per-row kernel (csrc/cpu/per_row.h) spends its time in three phases per
(row, negative) pair: the sort by item chunk, the score pass (ŝ = <û, r̂> against a
normalized row of an L2-resident chunk, then the row's Σe·r̂) and the item pass (the pair's
d·û added to its item's accumulator row). This script times the bare memory-and-FMA
pattern of each pass, with nothing else in the loop, in a small C++ extension built here
(torch.utils.cpp_extension.load_inline, AVX2 + FMA), single-threaded, D = 64, float32:

* ``read``: per run of 25 pairs, four dot products at a time (8 FMAs per pair from the
  row) then Σ c·row (8 more FMAs, the rows again) — the score pass without exp or state;
* ``rmw``: acc[row] += c·u for one random 256-byte row per pair — the item pass;

each over a 256 KiB buffer (one chunk, the kernel's working set: in L2) and over the whole
40,981-row table (10 MiB: what the chunking avoids), next to the kernel's own per-phase
times at one thread (ADAPTAU_CPU_PROFILE=1), all per pair, timed side by side round by round
in one process (each round: every pattern, then one kernel forward + backward), medians
over --repeats rounds after a warm-up round. A phase close to its pattern has nothing left to remove
but the pattern itself.

    python benchmarks/bench_floor.py                  # writes results/<machine>/kernel_floor.md
    python benchmarks/bench_floor.py --repeats 9 --out /tmp/floor.md
"""

from __future__ import annotations

import argparse
import datetime
import os
import re
import statistics
import sys
import tempfile
from typing import Dict, List

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, ".."))
sys.path.insert(0, HERE)
from bench_kernels import machine_info  # noqa: E402
import _common  # noqa: E402

D = 64
CHUNK_ROWS = (256 << 10) // (D * 4)  # the kernel's default chunk: 256 KiB of rows
TABLE_ROWS = 40981  # Gowalla's item table
B, M = 2048, 1024  # the paper's MF shape: 2,097,152 pairs
RUN = 25  # pairs per (row, chunk) run at that shape: 1024 / 41

_SOURCE = r"""
#include <torch/extension.h>
#include <immintrin.h>
#include <chrono>

// acc[idx[k] : idx[k] + 64] += c * u  for every k; returns ns per pair.
double rmw_ns(torch::Tensor buf, torch::Tensor idx, torch::Tensor u) {
  TORCH_CHECK(buf.dtype() == torch::kFloat && buf.is_contiguous() && buf.size(1) == 64, "buf: [R, 64] float32");
  TORCH_CHECK(idx.dtype() == torch::kInt && idx.is_contiguous(), "idx: int32");
  TORCH_CHECK(idx.numel() == 0 || (idx.min().item<int>() >= 0 &&
              idx.max().item<int64_t>() <= (buf.size(0) - 1) * 64), "idx out of range");
  float* a0 = buf.data_ptr<float>();
  const int* ix = idx.data_ptr<int>();
  const int64_t n = idx.numel();
  __m256 uu[8];
  #pragma GCC unroll 8
  for (int v = 0; v < 8; ++v) uu[v] = _mm256_loadu_ps(u.data_ptr<float>() + v * 8);
  const __m256 c = _mm256_set1_ps(1e-7f);
  auto t0 = std::chrono::steady_clock::now();
  for (int64_t k = 0; k < n; ++k) {
    float* a = a0 + ix[k];
    #pragma GCC unroll 8
    for (int v = 0; v < 8; ++v)
      _mm256_storeu_ps(a + v * 8, _mm256_fmadd_ps(c, uu[v], _mm256_loadu_ps(a + v * 8)));
  }
  auto t1 = std::chrono::steady_clock::now();
  return std::chrono::duration<double, std::nano>(t1 - t0).count() / double(n);
}

// Per run of `run` pairs: s_k = <u, row_k> four at a time, then v += Σ_k s_k·row_k.
// Returns ns per pair; the sums go to out[0:64] (so nothing is optimized away).
double read_ns(torch::Tensor buf, torch::Tensor idx, torch::Tensor u, int64_t run, torch::Tensor out) {
  TORCH_CHECK(buf.dtype() == torch::kFloat && buf.is_contiguous() && buf.size(1) == 64, "buf: [R, 64] float32");
  TORCH_CHECK(idx.dtype() == torch::kInt && idx.is_contiguous(), "idx: int32");
  TORCH_CHECK(run >= 1 && run <= 256, "run in [1, 256]");
  TORCH_CHECK(idx.numel() == 0 || (idx.min().item<int>() >= 0 &&
              idx.max().item<int64_t>() <= (buf.size(0) - 1) * 64), "idx out of range");
  const float* A = buf.data_ptr<float>();
  const int* ix = idx.data_ptr<int>();
  const int64_t n = idx.numel();
  __m256 uu[8], acc[8];
  #pragma GCC unroll 8
  for (int v = 0; v < 8; ++v) {
    uu[v] = _mm256_loadu_ps(u.data_ptr<float>() + v * 8);
    acc[v] = _mm256_setzero_ps();
  }
  alignas(32) float e[260];
  auto t0 = std::chrono::steady_clock::now();
  for (int64_t k0 = 0; k0 < n; k0 += run) {
    const int64_t m = std::min<int64_t>(run, n - k0);
    const int* ir = ix + k0;
    int64_t k = 0;
    for (; k + 4 <= m; k += 4) {
      const float *r0 = A + ir[k], *r1 = A + ir[k + 1], *r2 = A + ir[k + 2], *r3 = A + ir[k + 3];
      __m256 a0 = _mm256_mul_ps(uu[0], _mm256_loadu_ps(r0)), a1 = _mm256_mul_ps(uu[0], _mm256_loadu_ps(r1));
      __m256 a2 = _mm256_mul_ps(uu[0], _mm256_loadu_ps(r2)), a3 = _mm256_mul_ps(uu[0], _mm256_loadu_ps(r3));
      #pragma GCC unroll 8
      for (int v = 1; v < 8; ++v) {
        a0 = _mm256_fmadd_ps(uu[v], _mm256_loadu_ps(r0 + v * 8), a0);
        a1 = _mm256_fmadd_ps(uu[v], _mm256_loadu_ps(r1 + v * 8), a1);
        a2 = _mm256_fmadd_ps(uu[v], _mm256_loadu_ps(r2 + v * 8), a2);
        a3 = _mm256_fmadd_ps(uu[v], _mm256_loadu_ps(r3 + v * 8), a3);
      }
      const __m256 h = _mm256_hadd_ps(_mm256_hadd_ps(a0, a1), _mm256_hadd_ps(a2, a3));
      _mm_store_ps(e + k, _mm_mul_ps(_mm_add_ps(_mm256_castps256_ps128(h), _mm256_extractf128_ps(h, 1)),
                                     _mm_set1_ps(1e-3f)));
    }
    for (; k < m; ++k) {
      const float* r = A + ir[k];
      __m256 s = _mm256_mul_ps(uu[0], _mm256_loadu_ps(r));
      #pragma GCC unroll 8
      for (int v = 1; v < 8; ++v) s = _mm256_fmadd_ps(uu[v], _mm256_loadu_ps(r + v * 8), s);
      __m128 h = _mm_add_ps(_mm256_castps256_ps128(s), _mm256_extractf128_ps(s, 1));
      h = _mm_hadd_ps(h, h);
      h = _mm_hadd_ps(h, h);
      e[k] = _mm_cvtss_f32(h) * 1e-3f;
    }
    for (k = 0; k < m; ++k) {
      const float* r = A + ir[k];
      const __m256 c = _mm256_set1_ps(e[k]);
      #pragma GCC unroll 8
      for (int v = 0; v < 8; ++v) acc[v] = _mm256_fmadd_ps(c, _mm256_loadu_ps(r + v * 8), acc[v]);
    }
  }
  auto t1 = std::chrono::steady_clock::now();
  #pragma GCC unroll 8
  for (int v = 0; v < 8; ++v) _mm256_storeu_ps(out.data_ptr<float>() + v * 8, acc[v]);
  return std::chrono::duration<double, std::nano>(t1 - t0).count() / double(n);
}
"""


def build():
    from torch.utils.cpp_extension import load_inline

    # (the v-loops unrolled and u kept in registers, as in the kernel: left to -O2 alone GCC
    # kept u on the stack and looped, which doubled both patterns' times)
    return load_inline(
        "adaptau_floor_patterns",
        cpp_sources=_SOURCE,
        functions=["rmw_ns", "read_ns"],
        extra_cflags=["-O3", "-mavx2", "-mfma"],
        verbose=False,
    )


class Patterns:
    """The bare patterns over a [rows, 64] buffer with 2,097,152 random row offsets."""

    def __init__(self, ext, rows: int, seed: int = 0) -> None:
        g = torch.Generator().manual_seed(seed)
        self.ext = ext
        self.buf = torch.rand(rows, D, generator=g)
        self.idx = (torch.randint(0, rows, (B * M,), generator=g) * D).to(torch.int32)
        self.u = torch.rand(D, generator=g)
        self.out = torch.zeros(D)

    def read(self) -> float:
        return self.ext.read_ns(self.buf, self.idx, self.u, RUN, self.out)

    def rmw(self) -> float:
        return self.ext.rmw_ns(self.buf, self.idx, self.u)


class KernelPhases:
    """One forward + backward of the cpu backend at the paper's shape; its per-phase wall
    times (ADAPTAU_CPU_PROFILE=1 prints them to the C-level stderr, read back from a file)."""

    def __init__(self, seed: int = 0) -> None:
        g = torch.Generator().manual_seed(seed)
        self.items = torch.randn(TABLE_ROWS, D, generator=g, requires_grad=True)
        self.user = torch.randn(B, D, generator=g, requires_grad=True)
        self.pos = torch.randint(0, TABLE_ROWS, (B,), generator=g)
        self.neg = torch.randint(0, TABLE_ROWS, (B, M), generator=g)

    def __call__(self) -> Dict[str, float]:
        import adaptau

        self.user.grad = self.items.grad = None
        old_env = os.environ.get("ADAPTAU_CPU_PROFILE")
        os.environ["ADAPTAU_CPU_PROFILE"] = "1"
        sys.stderr.flush()
        saved = os.dup(2)
        with tempfile.TemporaryFile(mode="w+") as tmp:
            os.dup2(tmp.fileno(), 2)
            try:
                adaptau.softmax_loss(
                    self.user, self.items, self.pos, self.neg, 5.0, 5.0, backend="cpu"
                ).backward()
            finally:
                os.dup2(saved, 2)
                os.close(saved)
                if old_env is None:
                    del os.environ["ADAPTAU_CPU_PROFILE"]
                else:
                    os.environ["ADAPTAU_CPU_PROFILE"] = old_env
            tmp.seek(0)
            text = tmp.read()
        times: Dict[str, float] = {}
        for line in text.splitlines():
            m = re.match(r"\[adaptau cpu\] (.+?)\s+wall\s+([\d.]+) ms", line)
            if m:
                times[m.group(1).strip()] = times.get(m.group(1).strip(), 0.0) + float(m.group(2))
        if not times:
            raise RuntimeError("no phase times: does this build support ADAPTAU_CPU_PROFILE?")
        return times


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--out", default=None, help="default benchmarks/results/<machine>/kernel_floor.md")
    args = ap.parse_args(argv)
    if args.out is None:
        args.out = os.path.join(_common.results_dir(), "kernel_floor.md")
    if "cpu" not in __import__("adaptau").available_backends("cpu"):
        sys.exit("the adaptau cpu backend is not built")
    flags = open("/proc/cpuinfo").read() if os.path.exists("/proc/cpuinfo") else ""
    if " avx2" not in flags or " fma" not in flags:
        sys.exit("these patterns are written for AVX2 + FMA; this CPU lacks them")
    torch.set_num_threads(1)
    pairs = B * M
    print("building the pattern extension (first time: about a minute) ...", flush=True)
    ext = build()
    chunk, table, kernel = Patterns(ext, CHUNK_ROWS), Patterns(ext, TABLE_ROWS), KernelPhases()
    rounds: List[Dict[str, float]] = []
    for r in range(args.repeats + 1):  # side by side, round by round; round 0 warms up
        row = {
            "chunk read": chunk.read(),
            "chunk rmw": chunk.rmw(),
            "table read": table.read(),
            "table rmw": table.rmw(),
        }
        row.update({k: v * 1e6 / pairs for k, v in kernel().items()})  # ms -> ns per pair
        if r:
            rounds.append(row)
        print(f"round {r}: " + ", ".join(f"{k} {v:.2f}" for k, v in row.items()), flush=True)
    assert torch.isfinite(chunk.out).all() and torch.isfinite(table.out).all()
    med = {k: statistics.median(x[k] for x in rounds) for k in rounds[0]}
    score_ratio = statistics.median(x["fwd scores"] / x["chunk read"] for x in rounds)
    item_ratio = statistics.median(x["bwd items"] / x["chunk rmw"] for x in rounds)
    phases = [k for k in rounds[0] if not k.startswith(("chunk ", "table "))]
    score, items, sort = med["fwd scores"], med["bwd items"], med["fwd sort"]
    total = sum(med[k] for k in phases)
    lines = ["# Where the CPU kernel's time goes: phases against the machine's floor", ""]
    lines += [f"- {x}" for x in machine_info("cpu")]
    lines += [
        f"- Shape: B = {B}, M = {M} per-row negatives ({pairs:,} pairs), D = {D}, N = {TABLE_ROWS:,}, "
        f"float32, **one thread**; {args.repeats} rounds after a warm-up round, each timing every "
        "pattern and one kernel forward + backward side by side; medians over the rounds.",
        f"- Command: `python benchmarks/bench_floor.py --repeats {args.repeats}`",
        f"- Commit {_common.commit()}, {datetime.date.today().isoformat()}",
        "",
        "| | ns per pair | what it is |",
        "|---|---|---|",
        f"| pattern `read`, one 256 KiB chunk | {med['chunk read']:.2f} | dots 4 at a time + Σ c·row, runs of {RUN}, rows in L2 |",
        f"| pattern `rmw`, one 256 KiB chunk | {med['chunk rmw']:.2f} | acc[row] += c·u, rows in L2 |",
        f"| pattern `read`, whole table (10 MiB) | {med['table read']:.2f} | the same with no chunking (rows in L3) |",
        f"| pattern `rmw`, whole table (10 MiB) | {med['table rmw']:.2f} | the same with no chunking |",
        f"| kernel: sort | {sort:.2f} | counting sort by item chunk (what lets both passes work one chunk at a time) |",
        f"| kernel: score pass | {score:.2f} | `read` + exp, running state, chunk normalization |",
        f"| kernel: item pass | {items:.2f} | `rmw` + coefficients, Jacobian rows |",
        f"| kernel: all phases | {total:.2f} | forward + backward inside the library |",
        "",
        f"Score pass / `read` pattern: **{score_ratio:.2f}×**; item pass / `rmw` pattern: "
        f"**{item_ratio:.2f}×** (medians of the per-round ratios). Without the chunking the two patterns alone would cost "
        f"{med['table read'] + med['table rmw']:.1f} ns per pair, against {med['chunk read'] + med['chunk rmw'] + sort:.1f} "
        "for the chunked patterns plus the sort.",
        "",
    ]
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as fh:
        fh.write("\n".join(lines))
    print("\n".join(lines))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
