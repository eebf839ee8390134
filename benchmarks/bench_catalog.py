"""Training-step cost against catalog size: dense item gradients + Adam against sparse item
gradients + SparseAdam.

One MF training step at the paper's batch (B = 2048 rows, M = 1024 uniform per-row
negatives, D = 64, 30k users): draw the batch and its negatives, look up the user rows,
``adaptau.softmax_loss`` on the item table, backward, optimizer step. For every catalog
size N the two routes run side by side in one process, in interleaved rounds (medians):

* ``dense``: ``item_grad="dense"`` and ``torch.optim.Adam`` (foreach) over both tables;
  the step zeroes, fills and steps the whole ``[N, D]`` table.
* ``sparse``: ``item_grad="sparse"`` (the touched rows only, a coalesced COO gradient),
  sparse user lookups (``F.embedding(sparse=True)``) and ``torch.optim.SparseAdam``.

Reported per route and N: ms per step, peak extra resident memory of one steady-state
step (peak RSS growth), the rows a step touches (N for dense; K distinct batch items for
sparse) and a byte model of the table-sized traffic: 11 passes over the touched rows
(dense: zero-fill, kernel read, gradient read+write, Adam's reads of weight, gradient and
two moments and its three writes; sparse: gather read+write, kernel read, gradient write,
SparseAdam's reads and writes of weight and moments, its gradient read).

    python benchmarks/bench_catalog.py                       # N = 41k, 1M, 4M, 10M
    python benchmarks/bench_catalog.py --sizes 40981,1000000 --rounds 3

Writes ``benchmarks/results/<machine>/catalog.md``, ``.csv`` and ``.png`` (step time
against N, log-log).
"""
from __future__ import annotations

import argparse
import csv
import os
import statistics
import sys
import time
from typing import Callable, Dict, List

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import adaptau  # noqa: E402
from _common import header, results_dir  # noqa: E402
from host_memory import peak_rss_growth  # noqa: E402

B, M, D, USERS = 2048, 1024, 64, 29858
ROUTES = ("dense", "sparse")
TABLE_PASSES = 11


class Step:
    """One training step of one route over shared tables (each route has its optimizer)."""

    def __init__(self, route: str, users: torch.nn.Parameter, items: torch.nn.Parameter,
                 seed: int):
        self.route, self.users, self.items = route, users, items
        self.gen = torch.Generator().manual_seed(seed)
        self.sparse = route == "sparse"
        self.opt = (torch.optim.SparseAdam([users, items], lr=1e-3) if self.sparse
                    else torch.optim.Adam([users, items], lr=1e-3, foreach=True))
        self.touched = 0

    def __call__(self) -> None:
        N = self.items.shape[0]
        self.opt.zero_grad(set_to_none=True)
        rows = torch.randint(0, USERS, (B,), generator=self.gen)
        pos = torch.randint(0, N, (B,), generator=self.gen)
        seed = int(torch.randint(0, 2**31 - 1, (1,), generator=self.gen))
        neg = torch.ops.adaptau.uniform_negatives(B, M, N, seed)
        user = F.embedding(rows, self.users, sparse=self.sparse)
        loss = adaptau.softmax_loss(user, self.items, pos.to(neg.dtype), neg, 10.0, 10.0,
                                    item_grad=self.route)
        loss.backward()
        self.touched = (self.items.grad._values().shape[0] if self.sparse else N)
        self.opt.step()


def measure(N: int, rounds: int, warmup: int) -> List[Dict]:
    gen = torch.Generator().manual_seed(N)
    users = torch.nn.Parameter(torch.randn(USERS, D, generator=gen) * 0.1)
    items = torch.nn.Parameter(torch.empty(N, D).normal_(0, 0.1, generator=gen))
    steps = {route: Step(route, users, items, seed=k) for k, route in enumerate(ROUTES)}
    for step in steps.values():
        for _ in range(warmup):  # also creates the optimizer state
            step()
    times: Dict[str, List[float]] = {r: [] for r in ROUTES}
    for _ in range(rounds):
        for route, step in steps.items():
            t0 = time.perf_counter()
            step()
            times[route].append(time.perf_counter() - t0)
    rows = []
    for route, step in steps.items():
        peak = peak_rss_growth(step)
        rows.append({
            "N": N, "route": route, "ms_per_step": 1e3 * statistics.median(times[route]),
            "ms_min": 1e3 * min(times[route]), "ms_max": 1e3 * max(times[route]),
            "peak_extra_MiB": None if peak is None else peak / 2**20,
            "rows_touched": step.touched,
            "table_bytes_MB": TABLE_PASSES * step.touched * D * 4 / 1e6,
        })
        print(f"N={N:>10,d} {route:6s} {rows[-1]['ms_per_step']:9.1f} ms/step "
              f"(range {rows[-1]['ms_min']:.1f}-{rows[-1]['ms_max']:.1f}), "
              f"rows {step.touched:,d}, peak +{rows[-1]['peak_extra_MiB'] or 0:.0f} MiB",
              flush=True)
    del steps, users, items
    return rows


def write(rows: List[Dict], args) -> str:
    out = results_dir()
    with open(os.path.join(out, "catalog.csv"), "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    by = {(r["N"], r["route"]): r for r in rows}
    sizes = sorted({r["N"] for r in rows})
    base = sizes[0]
    lines = header("Training step against catalog size: dense vs sparse item gradients")
    lines += [
        f"MF step, B = {B}, M = {M} uniform per-row negatives, D = {D}, {USERS:,d} users, fp32, "
        f"{args.rounds} interleaved rounds after {args.warmup} warm-up steps (median, range); "
        "peak extra memory = peak RSS growth of one steady-state step; table bytes = "
        f"{TABLE_PASSES} passes over the touched rows (see the script's docstring).",
        "",
        "| N | route | ms / step (range) | × step at smallest N | peak extra MiB | rows touched | table bytes / step |",
        "|---:|---|---:|---:|---:|---:|---:|",
    ]
    for n in sizes:
        for route in ROUTES:
            r = by.get((n, route))
            if r is None:
                continue
            ratio = r["ms_per_step"] / by[(base, route)]["ms_per_step"]
            peak = "" if r["peak_extra_MiB"] is None else f"{r['peak_extra_MiB']:.0f}"
            lines.append(f"| {n:,d} | {route} | {r['ms_per_step']:.1f} ({r['ms_min']:.1f}–"
                         f"{r['ms_max']:.1f}) | {ratio:.2f} | {peak} | {r['rows_touched']:,d} | "
                         f"{r['table_bytes_MB']:.0f} MB |")
    lines.append("")
    with open(os.path.join(out, "catalog.md"), "w") as f:
        f.write("\n".join(lines))
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(6, 4))
        for route in ROUTES:
            xs = [n for n in sizes if (n, route) in by]
            ax.plot(xs, [by[(n, route)]["ms_per_step"] for n in xs], marker="o", label=route)
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("items in the catalog (N)")
        ax.set_ylabel("ms per training step")
        ax.set_title(f"MF step, B={B}, M={M}, D={D}")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend()
        fig.tight_layout()
        fig.savefig(os.path.join(out, "catalog.png"), dpi=120)
    except ImportError:
        pass
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--sizes", default="40981,1000000,4000000,10000000")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    rows: List[Dict] = []
    for n in (int(x) for x in args.sizes.split(",")):
        rows += measure(n, args.rounds, args.warmup)
    print("wrote", write(rows, args))
    return 0


if __name__ == "__main__":
    sys.exit(main())
