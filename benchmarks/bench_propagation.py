"""LightGCN's propagation: the product it runs, and a training step's propagation.

Each LightGCN training step multiplies the normalized adjacency Â (``[U+I, U+I]`` CSR) by the
``[U+I, D]`` embeddings once per layer forward and once per layer backward (Â is symmetric,
so the backward is the same product). This script times, side by side in one process, on
one dataset (Gowalla by default):

* ``torch.sparse.mm``: ``torch.sparse.mm(Â, X)``;
* ``addmm into a fresh output``: the product as the model runs it on the CPU
  (``adaptau.train.models._spmm``: ``addmm`` with ``beta=0`` into an uninitialized output);
* ``gather``: ``X.index_select(0, Â.col_indices)``, the bare gather of the same rows into a
  ``[nnz, D]`` buffer (the rows an SpMM must read, with no arithmetic);
* ``gather+reduce``: that gather plus ``index_add_`` into the output rows, the SpMM done in
  two library passes;
* ``copy``: a ``[nnz, D]`` contiguous copy, the streaming bandwidth of the machine;

then one training step's propagation, forward and backward, for a batch of ``--batch-size``
training pairs: through the whole tables (``LightGCN.tables``: 2K products of the whole
graph), once with ``torch.sparse.mm`` as the product and once with the model's, and through
the batch's rows (``LightGCN.rows``, what training runs: the last layer for those rows
only, 2K − 2 whole products), with the epoch's steps. Background processes named on ``--pause``
(default: benchmarks/reproduce.py) are stopped (SIGSTOP) while it times and resumed after;
the table says so.

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
from adaptau.train import models  # noqa: E402
from adaptau.train.models import LightGCN, _spmm  # noqa: E402


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", default="gowalla")
    ap.add_argument("--protocol", default="paper", help="paper: the graph of train ∪ valid")
    ap.add_argument("--dim", type=int, default=64)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=9)
    ap.add_argument("--batch-size", type=int, default=2048, help="training pairs per step")
    ap.add_argument("--layers", type=int, default=3)
    _common.add_pause_argument(ap)
    ap.add_argument("--out", default=None, help="default: <results_dir>/propagation.md")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)

    ds = load_dataset(args.data)
    split = prepare(ds, args.protocol)
    model = LightGCN(ds.num_users, ds.num_items, split.train, args.dim, layers=args.layers)
    adj = model.adj
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

    spmm_bytes = nnz * (row_bytes + 8) + nodes * row_bytes
    cases = [
        ("torch.sparse.mm", lambda: torch.sparse.mm(adj, x), spmm_bytes),
        ("addmm into a fresh output", lambda: _spmm(adj, x), spmm_bytes),
        ("gather", lambda: torch.index_select(x, 0, cols, out=buf), nnz * (2 * row_bytes + 8)),
        ("gather+reduce", gather_reduce, nnz * (4 * row_bytes + 16) + nodes * row_bytes),
        ("copy", lambda: buf.copy_(src), nnz * 2 * row_bytes),
    ]
    pairs = torch.as_tensor(split.train.nonzero()[0]), torch.as_tensor(split.train.nonzero()[1])
    batch = torch.randperm(pairs[0].numel(), generator=torch.Generator().manual_seed(0))[: args.batch_size]
    users, items = pairs[0][batch].long(), pairs[1][batch].long()

    def step(final):
        model.zero_grad(set_to_none=True)
        user_rows, item_rows = final()
        (user_rows.sum() + item_rows.square().sum()).backward()

    def whole_tables():
        user_table, item_table = model.tables()
        return user_table.index_select(0, users), item_table.index_select(0, items)

    def with_torch_sparse_mm(fn):
        saved = models._spmm
        models._spmm = lambda a, x: torch.sparse.mm(a, x.contiguous())
        try:
            fn()
        finally:
            models._spmm = saved

    steps_cases = [
        ("whole tables, torch.sparse.mm products", lambda: with_torch_sparse_mm(lambda: step(whole_tables))),
        ("through the whole tables", lambda: step(whole_tables)),
        ("`LightGCN.rows`, as training runs it", lambda: step(lambda: model.rows(users, items))),
    ]
    with _common.paused(args.pause) as paused:
        results = [(name, _common.median_ms(fn, args.repeats), nbytes) for name, fn, nbytes in cases]
        step_results = [(name, _common.median_ms(fn, args.repeats)) for name, fn in steps_cases]

    load = os.getloadavg()[0]
    steps = -(-split.train.nnz // args.batch_size)
    spmm_ms = results[0][1]
    lines = _common.header(f"LightGCN propagation on {ds.name}")
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
        ["operation", "ms", "GB/s", "speed vs torch.sparse.mm"],
        [
            (name, f"{ms:.1f}", f"{nbytes / ms / 1e6:.1f}", f"{spmm_ms / ms:.2f}×")
            for name, ms, nbytes in results
        ],
        align="lrrr",
    )
    whole_ms = step_results[0][1]
    nodes_used = torch.unique(torch.cat([users, items + ds.num_users]))
    crow = adj.crow_indices()
    share = float((crow[nodes_used + 1] - crow[nodes_used]).sum()) / nnz
    chosen = (
        "the last layer for the batch's rows only"
        if share <= models.ROW_BLOCK_MAX_SHARE
        else "the whole tables (the rows' share is above it)"
    )
    lines += [
        "",
        "GB/s counts every gathered row as read from memory once per non-zero; rows the "
        "caches hold are read again for free, so a product can pass the streaming copy.",
        "",
        f"One training step's propagation, forward and backward ({args.layers} layers, "
        f"{args.batch_size} training pairs, {steps} steps per epoch). The batch's "
        f"{nodes_used.numel():,} distinct users and items hold {share:.0%} of Â's non-zeros; "
        f"at most {models.ROW_BLOCK_MAX_SHARE:.0%}, `LightGCN.rows` propagates the last layer "
        f"to those rows alone, so here it runs {chosen}:",
        "",
    ]
    lines += _common.markdown_table(
        ["propagation", "ms per step", "s per epoch", "speed"],
        [
            (name, f"{ms:.1f}", f"{ms * steps / 1e3:.0f}", f"{whole_ms / ms:.2f}×")
            for name, ms in step_results
        ],
        align="lrrr",
    )
    path = args.out or os.path.join(_common.results_dir(), "propagation.md")
    with open(path, "w") as fh:
        fh.write("\n".join(lines) + "\n")
    print("\n".join(lines))
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
