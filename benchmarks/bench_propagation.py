"""LightGCN's propagation against what the memory system allows.

Each LightGCN training step multiplies the normalized adjacency Â (``[U+I, U+I]`` CSR) by the
``[U+I, D]`` embeddings once per layer forward and once per layer backward (Â is symmetric,
so the backward is the same product). This script times, side by side in one process, on
one dataset (Gowalla by default):

* ``spmm``: ``torch.sparse.mm(Â, X)``, as the model calls it;
* ``gather``: ``X.index_select(0, Â.col_indices)``, the bare gather of the same rows into a
  ``[nnz, D]`` buffer (the rows an SpMM must read, with no arithmetic);
* ``gather+reduce``: that gather plus ``index_add_`` into the output rows, the SpMM done in
  two library passes;
* ``copy``: a ``[nnz, D]`` contiguous copy, the streaming bandwidth of the machine;

and reports each as milliseconds and GB/s of the bytes it must move, then a step's six
products (three layers, forward and backward) against an epoch's steps. Background
processes named on ``--pause`` (default: benchmarks/reproduce.py) are stopped (SIGSTOP)
while it times and resumed after; the table says so.

    python benchmarks/bench_propagation.py --data gowalla --threads 2
"""

from __future__ import annotations

import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import _common  # noqa: E402
from adaptau.train.data import load_dataset, prepare  # noqa: E402
from adaptau.train.models import normalized_adjacency  # noqa: E402


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", default="gowalla")
    ap.add_argument("--protocol", default="paper", help="paper: the graph of train ∪ valid")
    ap.add_argument("--dim", type=int, default=64)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=9)
    ap.add_argument("--batch-size", type=int, default=2048, help="for the steps per epoch")
    _common.add_pause_argument(ap)
    ap.add_argument("--out", default=None, help="default: <results_dir>/propagation.md")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)

    ds = load_dataset(args.data)
    split = prepare(ds, args.protocol)
    adj = normalized_adjacency(split.train, ds.num_users, ds.num_items)
    nodes, nnz, dim = adj.shape[0], adj._nnz(), args.dim
    x = torch.randn(nodes, dim)
    cols = adj.col_indices()
    rows = torch.repeat_interleave(torch.arange(nodes), adj.crow_indices().diff())
    buf = torch.empty(nnz, dim)
    src = torch.randn(nnz, dim)
    out = torch.zeros(nodes, dim)
    row_bytes = dim * 4

    def gather_reduce():
        torch.index_select(x, 0, cols, out=buf)
        out.zero_().index_add_(0, rows, buf)

    cases = [
        ("spmm", lambda: torch.sparse.mm(adj, x), nnz * (row_bytes + 12) + nodes * row_bytes),
        ("gather", lambda: torch.index_select(x, 0, cols, out=buf), nnz * (2 * row_bytes + 8)),
        ("gather+reduce", gather_reduce, nnz * (4 * row_bytes + 16) + nodes * row_bytes),
        ("copy", lambda: buf.copy_(src), nnz * 2 * row_bytes),
    ]
    with _common.paused(args.pause) as paused:
        results = [(name, _common.median_ms(fn, args.repeats), nbytes) for name, fn, nbytes in cases]

    load = os.getloadavg()[0]
    steps = -(-split.train.nnz // args.batch_size)
    spmm_ms = results[0][1]
    lines = _common.header(f"LightGCN propagation on {ds.name} against the memory system")
    lines += [
        f"- Graph: {nodes:,} nodes ({ds.num_users:,} users + {ds.num_items:,} items), "
        f"{nnz:,} non-zeros ({args.protocol} protocol), D = {dim}, float32",
        "- " + _common.paused_line(args.pause, paused),
        f"- Median of {args.repeats} calls after one warm-up; bytes are what each must move "
        "(rows read and written, indices), GB/s = bytes / time",
        f"- Load average (1 min) at the end: {load:.2f} on {os.cpu_count()} cores; compare "
        "the rows with each other, not with another machine's",
        "",
    ]
    lines += _common.markdown_table(
        ["operation", "ms", "GB/s", "vs spmm"],
        [
            (name, f"{ms:.1f}", f"{nbytes / ms / 1e6:.1f}", f"{ms / spmm_ms:.2f}×")
            for name, ms, nbytes in results
        ],
        align="lrrr",
    )
    lines += [
        "",
        f"A training step runs 6 products (3 layers, forward and backward): {6 * spmm_ms / 1e3:.3f} s; "
        f"an epoch of {steps} steps (batch {args.batch_size}) spends {6 * spmm_ms * steps / 1e3:.0f} s "
        "in propagation.",
        "",
        f"`spmm` moves its bytes at {results[0][2] / spmm_ms / 1e6:.1f} GB/s against "
        f"{results[3][2] / results[3][1] / 1e6:.1f} GB/s for a streaming copy and "
        f"{results[1][2] / results[1][1] / 1e6:.1f} GB/s for the bare gather of the same rows: "
        f"it takes {spmm_ms / results[1][1]:.2f}× the gather's time. An SpMM must at least read "
        "those rows, so no kernel can be more than "
        f"{spmm_ms / (results[0][2] / (results[3][2] / results[3][1])):.2f}× faster here "
        "(its bytes at the copy bandwidth).",
    ]
    path = args.out or os.path.join(_common.results_dir(), "propagation.md")
    with open(path, "w") as fh:
        fh.write("\n".join(lines) + "\n")
    print("\n".join(lines))
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
