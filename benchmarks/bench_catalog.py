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

* ``torchrec-2r``: the step of ``adaptau train --shard-tables row-wise`` on 2 ranks
  (``torch.distributed.run``, gloo, one thread each): each rank takes B/2 rows of the batch
  and their negatives, :func:`adaptau.compact`, looks the users and its K unique items up
  through TorchRec's row-wise sharded ``EmbeddingCollection`` (all-to-all), runs the loss
  on the compact table, and the backward all-to-all hands the row gradients to the fused
  EXACT_ADAGRAD of the owning shard (:class:`adaptau.train.sharded.ShardedTables`). Rank
  0's times are reported (the collectives keep the ranks in step), with a breakdown:
  compact, lookup (input and output all-to-all), loss forward, backward (loss backward,
  the gradient all-to-all and the fused update).

Reported per route and N: ms per step, peak extra resident memory of one steady-state
step (peak RSS growth; torchrec-2r: rank 0's), the table and optimizer-state bytes each
process holds (the replicated routes hold both whole tables; a torchrec-2r rank its row
block of each), the rows a step touches (N for dense; K distinct batch items for sparse;
a rank's K for torchrec-2r) and a byte model of the table-sized traffic: 11 passes over
the touched rows (dense: zero-fill, kernel read, gradient read+write, Adam's reads of
weight, gradient and two moments and its three writes; sparse: gather read+write, kernel
read, gradient write, SparseAdam's reads and writes of weight and moments, its gradient
read); for torchrec-2r the bytes a rank sends through the all-to-alls per step (ids out,
rows back, gradients out: ``(B/2 + K)·(8 + 2·4·D)`` times the share owned by the other rank).

    python benchmarks/bench_catalog.py                       # N = 41k, 1M, 4M, 10M; torchrec at 41k, 1M
    python benchmarks/bench_catalog.py --sizes 40981,1000000 --rounds 3
    python benchmarks/bench_catalog.py --routes torchrec-2r --merge   # add to the committed rows

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
from typing import Dict, List

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import adaptau  # noqa: E402
import _common  # noqa: E402
from _common import header, results_dir  # noqa: E402
from host_memory import peak_rss_growth  # noqa: E402

B, M, D, USERS = 2048, 1024, 64, 29858
#: dense / sparse item gradients with M per-row negatives ([B, M]: up to B·(M+1) rows touched),
#: and the same with M negatives shared by the batch ([M]: at most B + M rows touched).
REPLICATED = ("dense", "sparse", "dense-shared", "sparse-shared")
ROUTES = REPLICATED + ("torchrec-2r",)
TABLE_PASSES = 11
RANKS = 2


class Step:
    """One training step of one route over shared tables (each route has its optimizer)."""

    def __init__(self, route: str, users: torch.nn.Parameter, items: torch.nn.Parameter, seed: int):
        self.route, self.users, self.items = route, users, items
        self.gen = torch.Generator().manual_seed(seed)
        self.sparse = route.startswith("sparse")
        self.shared = route.endswith("-shared")
        self.opt = (
            torch.optim.SparseAdam([users, items], lr=1e-3)
            if self.sparse
            else torch.optim.Adam([users, items], lr=1e-3, foreach=True)
        )
        self.touched = 0

    def __call__(self) -> None:
        N = self.items.shape[0]
        self.opt.zero_grad(set_to_none=True)
        rows = torch.randint(0, USERS, (B,), generator=self.gen)
        pos = torch.randint(0, N, (B,), generator=self.gen)
        seed = int(torch.randint(0, 2**31 - 1, (1,), generator=self.gen))
        neg = torch.ops.adaptau.uniform_negatives(1 if self.shared else B, M, N, seed)
        neg = neg.view(M) if self.shared else neg
        user = F.embedding(rows, self.users, sparse=self.sparse)
        loss = adaptau.softmax_loss(
            user,
            self.items,
            pos.to(neg.dtype),
            neg,
            10.0,
            10.0,
            item_grad="sparse" if self.sparse else "dense",
        )
        loss.backward()
        self.touched = self.items.grad._values().shape[0] if self.sparse else N
        self.opt.step()


def measure(N: int, rounds: int, warmup: int, routes=REPLICATED) -> List[Dict]:
    gen = torch.Generator().manual_seed(N)
    users = torch.nn.Parameter(torch.randn(USERS, D, generator=gen) * 0.1)
    items = torch.nn.Parameter(torch.empty(N, D).normal_(0, 0.1, generator=gen))
    steps = {
        route: Step(route, users, items, seed=k) for k, route in enumerate(REPLICATED) if route in routes
    }
    for step in steps.values():
        for _ in range(warmup):  # also creates the optimizer state
            step()
    times: Dict[str, List[float]] = {r: [] for r in steps}
    for _ in range(rounds):
        for route, step in steps.items():
            t0 = time.perf_counter()
            step()
            times[route].append(time.perf_counter() - t0)
    rows = []
    for route, step in steps.items():
        peak = peak_rss_growth(step)
        rows.append(
            {
                "N": N,
                "route": route,
                "ms_per_step": 1e3 * statistics.median(times[route]),
                "ms_min": 1e3 * min(times[route]),
                "ms_max": 1e3 * max(times[route]),
                "peak_extra_MiB": None if peak is None else peak / 2**20,
                "rows_touched": step.touched,
                "table_bytes_MB": TABLE_PASSES * step.touched * D * 4 / 1e6,
                "tables_MiB_per_process": (USERS + N) * D * 4 / 2**20,
                "optimizer_MiB_per_process": 2 * (USERS + N) * D * 4 / 2**20,  # Adam's two moments
            }
        )
        print(
            f"N={N:>10,d} {route:6s} {rows[-1]['ms_per_step']:9.1f} ms/step "
            f"(range {rows[-1]['ms_min']:.1f}-{rows[-1]['ms_max']:.1f}), "
            f"rows {step.touched:,d}, peak +{rows[-1]['peak_extra_MiB'] or 0:.0f} MiB",
            flush=True,
        )
    del steps, users, items
    return rows


# ------------------------------------------------------------------ torchrec-2r route
def torchrec_worker(N: int, rounds: int, warmup: int, out_json: str) -> None:
    """One rank of the torchrec-2r measurement (run under torch.distributed.run)."""
    import json

    torch.distributed.init_process_group("gloo")
    from adaptau.train.sharded import ShardedTables

    rank, world = torch.distributed.get_rank(), torch.distributed.get_world_size()
    tables = ShardedTables(USERS, N, D, optimizer="adagrad", lr=1e-3, device=torch.device("cpu"))
    gen = torch.Generator().manual_seed(1000 * N + rank)
    rows_r = B // world
    parts: Dict[str, List[float]] = {k: [] for k in ("compact", "lookup", "loss", "backward", "step")}
    touched = []

    def step(record: bool) -> None:
        users = torch.randint(0, USERS, (rows_r,), generator=gen)
        pos = torch.randint(0, N, (rows_r,), generator=gen)
        seed = int(torch.randint(0, 2**31 - 1, (1,), generator=gen))
        neg = torch.ops.adaptau.uniform_negatives(rows_r, M, N, seed)
        t0 = time.perf_counter()
        ids, pos_l, neg_l = adaptau.compact(pos.to(neg.dtype), neg, num_items=N)
        t1 = time.perf_counter()
        u, it = tables.lookup(users, ids)
        t2 = time.perf_counter()
        loss = adaptau.softmax_loss(u, it, pos_l, neg_l, 10.0, 10.0, reduction="sum") / B
        t3 = time.perf_counter()
        loss.backward()
        t4 = time.perf_counter()
        if record:
            for k, v in zip(parts, (t1 - t0, t2 - t1, t3 - t2, t4 - t3, t4 - t0)):
                parts[k].append(v)
            touched.append(ids.numel())

    for _ in range(warmup):
        step(False)
    for _ in range(rounds):
        torch.distributed.barrier()
        step(True)
    torch.distributed.barrier()
    peak = peak_rss_growth(lambda: step(False))
    k = statistics.median(touched)
    remote = (world - 1) / world  # share of the ids another rank owns (uniform ids)
    result = {
        "N": N,
        "route": f"torchrec-{world}r",
        "ms_per_step": 1e3 * statistics.median(parts["step"]),
        "ms_min": 1e3 * min(parts["step"]),
        "ms_max": 1e3 * max(parts["step"]),
        "peak_extra_MiB": None if peak is None else peak / 2**20,
        "rows_touched": int(k),
        "table_bytes_MB": (rows_r + k) * (8 + 2 * 4 * D) * remote / 1e6,
        "tables_MiB_per_process": tables.table_bytes() / 2**20,
        "optimizer_MiB_per_process": tables.optimizer_bytes() / 2**20,
        **{f"ms_{p}": 1e3 * statistics.median(v) for p, v in parts.items() if p != "step"},
    }
    if rank == 0:
        with open(out_json, "w") as f:
            json.dump(result, f)
    torch.distributed.barrier()
    torch.distributed.destroy_process_group()


def measure_torchrec(N: int, rounds: int, warmup: int) -> List[Dict]:
    """Run :func:`torchrec_worker` on 2 ranks (one thread each) and return rank 0's row."""
    import json
    import subprocess
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "row.json")
        env = dict(os.environ, OMP_NUM_THREADS="1")
        env["PYTHONPATH"] = (
            os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
            + os.pathsep
            + env.get("PYTHONPATH", "")
        )
        proc = subprocess.run(
            [
                sys.executable,
                "-m",
                "torch.distributed.run",
                "--standalone",
                f"--nproc-per-node={RANKS}",
                os.path.abspath(__file__),
                "--torchrec-worker",
                str(N),
                "--rounds",
                str(rounds),
                "--warmup",
                str(warmup),
                "--json",
                out,
            ],
            env=env,
            capture_output=True,
            text=True,
        )
        if proc.returncode != 0:
            raise RuntimeError(f"torchrec worker failed (N={N}):\n{proc.stderr[-3000:]}")
        with open(out) as f:
            row = json.load(f)
    print(
        f"N={N:>10,d} {row['route']} {row['ms_per_step']:9.1f} ms/step "
        f"(range {row['ms_min']:.1f}-{row['ms_max']:.1f}), rows/rank {row['rows_touched']:,d}, "
        f"tables/rank {row['tables_MiB_per_process']:.0f} MiB, peak +{row['peak_extra_MiB'] or 0:.0f} MiB",
        flush=True,
    )
    return [row]


FIELDS = [
    "N",
    "route",
    "ms_per_step",
    "ms_min",
    "ms_max",
    "peak_extra_MiB",
    "rows_touched",
    "table_bytes_MB",
    "tables_MiB_per_process",
    "optimizer_MiB_per_process",
    "ms_compact",
    "ms_lookup",
    "ms_loss",
    "ms_backward",
]


def read_csv(path: str) -> List[Dict]:
    """Rows of a catalog.csv written by :func:`write` (numbers parsed; empty cells None)."""
    rows = []
    with open(path, newline="") as f:
        for r in csv.DictReader(f):
            row: Dict = {}
            for k, v in r.items():
                if k == "route":
                    row[k] = v
                elif v in ("", None):
                    row[k] = None
                else:
                    row[k] = int(v) if k in ("N", "rows_touched") else float(v)
            rows.append(row)
    return rows


def write(rows: List[Dict], args) -> str:
    out = results_dir()
    rows = sorted(rows, key=lambda r: (r["N"], ROUTES.index(r["route"]) if r["route"] in ROUTES else 9))
    with open(os.path.join(out, "catalog.csv"), "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=FIELDS)
        w.writeheader()
        w.writerows([{k: r.get(k) for k in FIELDS} for r in rows])
    by = {(r["N"], r["route"]): r for r in rows}
    sizes = sorted({r["N"] for r in rows})
    routes = [x for x in ROUTES if any(r["route"] == x for r in rows)]
    base = {x: min(n for n in sizes if (n, x) in by) for x in routes}
    lines = header("Training step against catalog size: dense vs sparse item gradients, and TorchRec")
    lines += [
        f"MF step, B = {B}, M = {M} uniform negatives, per row ([B, M]) or, in the -shared routes, "
        f"shared by the batch ([M]), D = {D}, {USERS:,d} users, fp32, "
        f"{args.rounds} interleaved rounds after {args.warmup} warm-up steps (median, range); "
        "peak extra memory = peak RSS growth of one steady-state step; table bytes = "
        f"{TABLE_PASSES} passes over the touched rows (see the script's docstring). "
        f"torchrec-2r: {RANKS} gloo ranks of one thread each (the other routes: one process, "
        f"{args.threads} threads), rank 0's figures; its rows touched are one rank's K and "
        "its bytes the rank's all-to-all traffic per step.",
    ]
    if args.note:
        lines += ["", args.note]
    lines += [
        "",
        "| N | route | ms / step (range) | × step at smallest N | peak extra MiB | tables MiB / process "
        "| optimizer state MiB / process | rows touched | table bytes / step |",
        "|---:|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for n in sizes:
        for route in routes:
            r = by.get((n, route))
            if r is None:
                continue
            ratio = r["ms_per_step"] / by[(base[route], route)]["ms_per_step"]
            peak = "" if r.get("peak_extra_MiB") is None else f"{r['peak_extra_MiB']:.0f}"
            tab = "" if r.get("tables_MiB_per_process") is None else f"{r['tables_MiB_per_process']:.0f}"
            opt = (
                "" if r.get("optimizer_MiB_per_process") is None else f"{r['optimizer_MiB_per_process']:.0f}"
            )
            traffic = "all-to-all " if route.startswith("torchrec") else ""
            lines.append(
                f"| {n:,d} | {route} | {r['ms_per_step']:.1f} ({r['ms_min']:.1f}–"
                f"{r['ms_max']:.1f}) | {ratio:.2f} | {peak} | {tab} | {opt} | "
                f"{r['rows_touched']:,d} | {traffic}{r['table_bytes_MB']:.0f} MB |"
            )
    tr = [r for r in rows if r["route"].startswith("torchrec") and r.get("ms_lookup") is not None]
    if tr:
        lines += [
            "",
            "Where a torchrec-2r step goes (rank 0, medians, ms):",
            "",
            "| N | compact | lookup (all-to-all in and out) | loss forward | backward (loss, "
            "all-to-all, fused Adagrad) | µs per touched row |",
            "|---:|---:|---:|---:|---:|---:|",
        ]
        for r in tr:
            lines.append(
                f"| {r['N']:,d} | {r['ms_compact']:.1f} | {r['ms_lookup']:.1f} | "
                f"{r['ms_loss']:.1f} | {r['ms_backward']:.1f} | "
                f"{1e3 * r['ms_per_step'] / (r['rows_touched'] + B // RANKS):.2f} |"
            )
    lines.append("")
    with open(os.path.join(out, "catalog.md"), "w") as f:
        f.write("\n".join(lines))
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(6, 4))
        for route in routes:
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
    p.add_argument(
        "--sizes", default="40981,1000000,4000000,10000000", help="N for the dense and sparse routes"
    )
    p.add_argument("--torchrec-sizes", default="40981,1000000", help="N for the torchrec-2r route")
    p.add_argument("--routes", default=",".join(ROUTES))
    p.add_argument(
        "--merge",
        action="store_true",
        help="keep the rows of the existing catalog.csv that this run does not measure",
    )
    p.add_argument("--note", default="", help="a line for the results file (e.g. what ran beside it)")
    _common.add_pause_argument(p)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--torchrec-worker", type=int, default=None, help=argparse.SUPPRESS)
    p.add_argument("--json", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.torchrec_worker is not None:
        torch.set_num_threads(1)
        torchrec_worker(args.torchrec_worker, args.rounds, args.warmup, args.json)
        return 0
    torch.set_num_threads(args.threads)
    routes = args.routes.split(",")
    unknown = sorted(set(routes) - set(ROUTES))
    if unknown:
        p.error(f"unknown routes {unknown}; known: {list(ROUTES)}")
    rows: List[Dict] = []
    replicated = [r for r in routes if not r.startswith("torchrec")]
    with _common.paused(args.pause) as pids:
        if replicated:
            for n in (int(x) for x in args.sizes.split(",")):
                rows += measure(n, args.rounds, args.warmup, replicated)
        if "torchrec-2r" in routes:
            for n in (int(x) for x in args.torchrec_sizes.split(",")):
                rows += measure_torchrec(n, args.rounds, args.warmup)
    args.note = "; ".join(x for x in (args.note, _common.paused_line(args.pause, pids)) if x)
    if args.merge:
        path = os.path.join(results_dir(), "catalog.csv")
        done = {(r["N"], r["route"]) for r in rows}
        for r in read_csv(path):
            if (r["N"], r["route"]) in done:
                continue
            if r["route"] in REPLICATED and r.get("tables_MiB_per_process") is None:
                r["tables_MiB_per_process"] = (USERS + r["N"]) * D * 4 / 2**20  # (not measured:
                r["optimizer_MiB_per_process"] = 2 * (USERS + r["N"]) * D * 4 / 2**20  # sizes)
            rows.append(r)
    print("wrote", write(rows, args))
    return 0


if __name__ == "__main__":
    sys.exit(main())
