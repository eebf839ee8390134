"""Kernel microbenchmarks: adaptau.softmax_loss backends vs eager PyTorch and torch.compile.

For every negative mode (per-row [B, M], shared [M], in-batch, and mixed: in-batch + shared +
per-row in one softmax, each source with its logQ) and a few shapes, times the
eager PyTorch formulation (gather + normalize + bmm/matmul + logsumexp + .backward()), the
same function under torch.compile, and every adaptau backend usable on the device
('reference' only at small shapes, 'triton' never on CPU): forward, backward and
forward+backward, medians of --repeats runs (--slow-repeats for eager / compile /
reference at large shapes) after warm-up, all side by side in one process: the methods
take turns in interleaved rounds (each round runs every method; the fast ones several
times), so a shared machine that drifts during the suite affects every method alike.
Also the peak extra memory of one forward+backward step.

Memory, CPU: peak resident-set growth of the process during one step, measured as VmHWM
(peak RSS, reset through /proc/self/clear_refs) minus the RSS at the start of the step,
after glibc's malloc_trim so freed heap memory is returned first. For adaptau the scratch
it keeps between calls (its buffer pool and the forward's pair sort kept for the backward)
would be resident before the step, so the fused backends are measured in a fresh process
instead: peak RSS growth over three forward+backward steps (outputs, scratch, pool and
cached sort included).
Memory, CUDA: torch.cuda.max_memory_allocated() growth over the step.

Shapes eager cannot run (estimated peak > 60% of available memory) are reported as
'OOM/skipped (needs ~X GiB)' without running them.

Writes kernels.md, .csv and .png (time against M, log scale) into this machine's results folder
(benchmarks/results/<machine>/; kernels_paper.* for --shapes paper_mf; --name, --out-dir).
--append adds the run to the CSV (a run column) and the table shows the median and range of
fwd+bwd over all runs.

    python benchmarks/bench_kernels.py                 # full CPU suite
    python benchmarks/bench_kernels.py --quick         # paper shape + small shape only
    python benchmarks/bench_kernels.py --device cuda   # triton / cuda backends
    python benchmarks/bench_kernels.py --shapes paper_mf,d128 --repeats 5
    python benchmarks/bench_kernels.py --shapes paper_mf,d128 --modes per_row \
        --capabilities default,avx2,avx512 --name kernels_by_capability

In the mixed mode, ``<backend>×3 single`` times the three single-source calls the one mixed
call replaces, and the header gives the ratio.

--capabilities times the "cpu" backend once per CPU capability (methods cpu[default],
cpu[avx2], cpu[avx512]), side by side in the same interleaved rounds, switching the level
before each call; levels this CPU lacks are reported as skipped.
"""

from __future__ import annotations

import argparse
import csv
import os
import platform
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # also under runpy (adaptau bench)
import adaptau  # noqa: E402
from adaptau.loss.ops import _cpu_capabilities, _set_cpu_capability  # noqa: E402
import _common  # noqa: E402
from host_memory import available_bytes, peak_rss_growth, trim  # noqa: E402

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")


@dataclass
class Shape:
    name: str
    mode: str  # per_row | shared | in_batch | mixed
    B: int
    M: int  # negatives per row (in-batch: B - 1; mixed: the shared pool)
    D: int
    N: int = 40981
    M_row: int = 0  # mixed: per-row negatives beside the in-batch and shared ones


def all_shapes() -> List[Shape]:
    shapes = []
    for mode in ("per_row", "shared"):
        shapes += [
            Shape("small", mode, 256, 128, 32, 5000),
            Shape("paper_mf", mode, 2048, 1024, 64),
            Shape("d128", mode, 2048, 1024, 128),
            Shape("m4096", mode, 2048, 4096, 64),
            Shape("b8192", mode, 8192, 1024, 64),
        ]
    shapes += [
        Shape("m128", "per_row", 2048, 128, 64),
        Shape("m512", "per_row", 2048, 512, 64),
        Shape("m16384", "per_row", 2048, 16384, 64),
    ]
    shapes += [
        Shape("small", "in_batch", 256, 255, 32, 5000),
        Shape("inbatch_2048", "in_batch", 2048, 2047, 64),
        Shape("inbatch_4096", "in_batch", 4096, 4095, 64),
    ]
    shapes += [Shape("mixed_paper", "mixed", 2048, 1024, 64, M_row=64)]
    return shapes


# ------------------------------------------------------------------------ the baseline
def eager_loss(user, items, pos, neg, alpha: float, beta: float, mode: str):
    """Plain PyTorch: gather the candidates, normalize, score, logsumexp (include_pos=False)."""
    u = F.normalize(user, dim=-1)
    if mode == "per_row":
        idx = torch.cat([pos[:, None], neg], 1)  # [B, M+1]
        it = F.normalize(items[idx], dim=-1)  # [B, M+1, D]
        s = torch.bmm(it, u[:, :, None]).squeeze(-1)  # [B, M+1]
        pos_s, neg_s = s[:, 0], s[:, 1:]
    else:
        ip = F.normalize(items[pos], dim=-1)
        pos_s = (u * ip).sum(-1)
        if mode == "shared":
            neg_s = u @ F.normalize(items[neg], dim=-1).T  # [B, M]
        else:
            neg_s = (u @ ip.T).masked_fill(
                torch.eye(u.shape[0], dtype=torch.bool, device=u.device), float("-inf")
            )
    lse = torch.logsumexp(beta * neg_s, dim=1)
    return (lse - alpha * pos_s).mean()


def eager_mixed_loss(user, items, pos, neg: "adaptau.Negatives", alpha: float, beta: float):
    """Plain PyTorch for the mixed mode: the union of the in-batch, shared and per-row
    candidates scored and gathered into one ``[B, (B-1) + M + M_row]`` logit block, each
    source's logQ subtracted, one logsumexp (include_pos=False)."""
    u = F.normalize(user, dim=-1)
    ip = F.normalize(items[pos], dim=-1)
    pos_s = (u * ip).sum(-1)
    in_batch = (beta * (u @ ip.T) - neg.in_batch_logq[pos][None, :]).masked_fill(
        torch.eye(u.shape[0], dtype=torch.bool, device=u.device), float("-inf")
    )
    shared = beta * (u @ F.normalize(items[neg.shared], dim=-1).T) - neg.shared_logq[neg.shared][None, :]
    per_row = beta * torch.bmm(F.normalize(items[neg.per_row], dim=-1), u[:, :, None]).squeeze(-1)
    lse = torch.logsumexp(torch.cat([in_batch, shared, per_row], 1), dim=1)
    return (lse - alpha * pos_s).mean()


def single_source_calls(user, items, pos, neg: "adaptau.Negatives", alpha: float, beta: float, backend: str):
    """The three single-source adaptau calls a mixed call replaces, their losses summed (what
    a user without mixed negatives runs; not the same loss)."""
    return (
        adaptau.softmax_loss(user, items, pos, None, alpha, beta, neg_logq=neg.in_batch_logq, backend=backend)
        + adaptau.softmax_loss(
            user, items, pos, neg.shared, alpha, beta, neg_logq=neg.shared_logq, backend=backend
        )
        + adaptau.softmax_loss(user, items, pos, neg.per_row, alpha, beta, backend=backend)
    )


def eager_bytes(s: Shape) -> float:
    """Rough peak of the eager formulation: ~6 live copies of the gathered block."""
    if s.mode == "per_row":
        return 6.0 * s.B * (s.M + 1) * s.D * 4
    if s.mode == "mixed":
        return 6.0 * s.B * (s.B + s.M + s.M_row) * 4 + 6.0 * s.B * s.M_row * s.D * 4
    return 6.0 * s.B * (s.M + 1) * 4 + 3.0 * (s.M + s.B) * s.D * 4


def compile_bytes(s: Shape) -> float:
    return 1.2 * s.B * (s.M + 1) * s.D * 4 if s.mode == "per_row" else eager_bytes(s)


# ---------------------------------------------------------------------------- memory
def measure_peak(step: Callable[[], None], device: str) -> Optional[float]:
    """Extra bytes at the peak of one call of step()."""
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        step()
        torch.cuda.synchronize()
        return float(torch.cuda.max_memory_allocated() - base)
    return peak_rss_growth(step)


def probe_fused_memory(s: Shape, backend: str, threads: int) -> Optional[float]:
    """Peak RSS growth of 3 fused forward+backward steps in a fresh process.

    Includes everything adaptau allocates: outputs, per-call scratch, the scratch pool it
    keeps between calls and the forward's pair sort kept for the backward (a warm
    in-process measurement would miss whatever earlier shapes left in the pool).
    """
    cmd = [
        sys.executable,
        os.path.abspath(__file__),
        "--probe-memory",
        f"{s.mode},{s.B},{s.M},{s.D},{s.N},{backend},{threads},{s.M_row}",
    ]
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
        return float(out.stdout.strip().splitlines()[-1])
    except (subprocess.SubprocessError, ValueError, IndexError):
        return None


def _probe_memory_main(spec: str) -> None:
    mode, B, M, D, N, backend, threads, M_row = spec.split(",")
    torch.set_num_threads(int(threads))
    if backend.startswith("cpu["):  # cpu[<capability>]
        _set_cpu_capability(backend[4:-1])
        backend = "cpu"
    s = Shape("probe", mode, int(B), int(M), int(D), int(N), M_row=int(M_row))
    # one tiny call first: one-time costs (imports, op registration) are not the kernel's
    tiny = Shape("tiny", mode, 4, 3, int(D), 50, M_row=min(int(M_row), 2))
    tu, ti, tp, tn = make_inputs(tiny, "cpu")
    adaptau.softmax_loss(tu, ti, tp, tn, 5.0, 5.0, backend=backend).backward()
    user, items, pos, neg = make_inputs(s, "cpu")

    def three_steps():
        for _ in range(3):
            user.grad = items.grad = None
            adaptau.softmax_loss(user, items, pos, neg, 5.0, 5.0, backend=backend).backward()

    peak = peak_rss_growth(three_steps)
    print("nan" if peak is None else peak)


# ---------------------------------------------------------------------------- timing
def _sync(device):
    if device == "cuda":
        torch.cuda.synchronize()


def _time_once(fwd: Callable, params, device: str):
    """(forward, backward, forward+backward) seconds of one step, gradients reset first."""
    for p in params:
        p.grad = None
    _sync(device)
    t0 = time.perf_counter()
    loss = fwd()
    _sync(device)
    t1 = time.perf_counter()
    loss.backward()
    _sync(device)
    t2 = time.perf_counter()
    return t1 - t0, t2 - t1, t2 - t0


def time_methods(
    methods: Dict[str, Callable],
    params,
    device: str,
    warmup: Dict[str, int],
    per_round: Dict[str, int],
    rounds: int,
):
    """Medians (seconds) of forward, backward and forward+backward for every method.

    After each method's warm-up, the methods are timed in ``rounds`` interleaved rounds, each
    running every method ``per_round[name]`` times, so a shared machine that speeds up or
    slows down while the suite runs (other tenants, clock changes) weighs on every method
    alike and the ratios compare like with like."""
    samples = {name: ([], [], []) for name in methods}
    for name, fwd in methods.items():
        for _ in range(warmup[name]):
            _time_once(fwd, params, device)
    for _ in range(rounds):
        for name, fwd in methods.items():
            for _ in range(per_round[name]):
                for acc, value in zip(samples[name], _time_once(fwd, params, device)):
                    acc.append(value)
    return {name: tuple(statistics.median(x) for x in acc) for name, acc in samples.items()}


def make_inputs(s: Shape, device: str, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    user = torch.randn(s.B, s.D, generator=gen).to(device).requires_grad_()
    items = torch.randn(s.N, s.D, generator=gen).to(device).requires_grad_()
    pos = torch.randint(0, s.N, (s.B,), generator=gen).to(device)
    if s.mode == "per_row":
        neg = torch.randint(0, s.N, (s.B, s.M), generator=gen).to(device)
    elif s.mode == "shared":
        neg = torch.randint(0, s.N, (s.M,), generator=gen).to(device)
    elif s.mode == "mixed":  # in-batch and shared with popularity logQ, per-row uniform
        popularity = (1.0 - torch.rand(s.N, generator=gen, dtype=torch.float64)) ** (-1 / 1.2)  # Pareto
        logq = (popularity / popularity.sum()).log().float().to(device)
        neg = adaptau.Negatives(
            in_batch=True,
            in_batch_logq=logq + torch.log(torch.tensor(s.B - 1.0)),
            shared=torch.randint(0, s.N, (s.M,), generator=gen).to(device),
            shared_logq=logq + torch.log(torch.tensor(float(s.M))),
            per_row=torch.randint(0, s.N, (s.B, s.M_row), generator=gen).to(device),
        )
    else:
        neg = None
    return user, items, pos, neg


def run_shape(s: Shape, args, rows: List[Dict]):
    device = args.device
    user, items, pos, neg = make_inputs(s, device)
    alpha, beta = 5.0, 5.0
    params = (user, items)
    methods: Dict[str, Callable] = {}
    notes: Dict[str, str] = {}
    avail = available_bytes() if device == "cpu" else float(torch.cuda.mem_get_info()[0])

    if eager_bytes(s) > 0.6 * avail:
        notes["eager"] = f"OOM/skipped (needs ~{eager_bytes(s) / 2**30:.1f} GiB)"
    else:
        methods["eager"] = (
            (lambda: eager_mixed_loss(user, items, pos, neg, alpha, beta))
            if s.mode == "mixed"
            else (lambda: eager_loss(user, items, pos, neg, alpha, beta, s.mode))
        )
    if args.no_compile:
        notes["compile"] = "skipped (--no-compile)"
    elif compile_bytes(s) > 0.6 * avail:
        notes["compile"] = f"OOM/skipped (needs ~{compile_bytes(s) / 2**30:.1f} GiB)"
    else:
        torch._dynamo.reset()
        if s.mode == "mixed":
            compiled_mixed = torch.compile(eager_mixed_loss)
            methods["compile"] = lambda: compiled_mixed(user, items, pos, neg, alpha, beta)
        else:
            compiled = torch.compile(eager_loss)
            methods["compile"] = lambda: compiled(user, items, pos, neg, alpha, beta, s.mode)
    small = s.B * (s.M + 1) * s.D <= 2**22
    for backend in adaptau.available_backends(device):
        if backend == "reference" and not small:
            continue
        if backend == "triton" and device == "cpu":
            continue
        if backend == "cpu" and args.capabilities:
            for cap in args.capabilities:
                if cap not in _cpu_capabilities():
                    notes[f"cpu[{cap}]"] = f"skipped (this CPU supports {', '.join(_cpu_capabilities())})"
                    continue

                def with_capability(cap=cap):
                    _set_cpu_capability(cap)
                    return adaptau.softmax_loss(user, items, pos, neg, alpha, beta, backend="cpu")

                methods[f"cpu[{cap}]"] = with_capability
            continue
        methods[backend] = lambda b=backend: adaptau.softmax_loss(
            user, items, pos, neg, alpha, beta, backend=b
        )
        if s.mode == "mixed":
            methods[f"{backend}×3 single"] = lambda b=backend: single_source_calls(
                user, items, pos, neg, alpha, beta, b
            )

    threads = torch.get_num_threads()
    # Slow methods (eager, compile, reference at large shapes) run --slow-repeats times, once
    # per round; the others --repeats times spread over the same rounds.
    slow = {name for name in methods if name in ("eager", "compile", "reference") and s.B * s.M * s.D > 2**26}
    rounds = max(2, min(args.repeats, args.slow_repeats)) if slow else args.repeats
    per_round = {name: 1 if name in slow else max(1, -(-args.repeats // rounds)) for name in methods}
    warmup = {
        name: (2 if name == "compile" else 1)
        if name in slow
        else args.warmup + (1 if name == "compile" else 0)
        for name in methods
    }
    medians = time_methods(methods, params, device, warmup, per_round, rounds)
    for name, fwd in methods.items():
        tf, tb, tt = medians[name]

        def step():
            for p in params:
                p.grad = None
            fwd().backward()

        if device == "cpu" and name not in ("eager", "compile", "reference") and "×" not in name:
            peak = probe_fused_memory(s, name, torch.get_num_threads())
        else:
            peak = measure_peak(step, device)
        rows.append(
            dict(
                mode=s.mode,
                shape=s.name,
                B=s.B,
                M=s.M,
                D=s.D,
                N=s.N,
                method=name,
                threads=threads if device == "cpu" else "",
                fwd_ms=tf * 1e3,
                bwd_ms=tb * 1e3,
                total_ms=tt * 1e3,
                peak_mib=None if peak is None else peak / 2**20,
                note="",
            )
        )
        print(
            f"  {s.mode:8s} {s.name:13s} {name:9s} fwd {tf * 1e3:9.2f} ms  bwd {tb * 1e3:9.2f} ms  "
            f"total {tt * 1e3:9.2f} ms  peak +{(peak or 0) / 2**20:8.1f} MiB",
            flush=True,
        )
    for name, note in notes.items():
        rows.append(
            dict(
                mode=s.mode,
                shape=s.name,
                B=s.B,
                M=s.M,
                D=s.D,
                N=s.N,
                method=name,
                threads=threads if device == "cpu" else "",
                fwd_ms=None,
                bwd_ms=None,
                total_ms=None,
                peak_mib=None,
                note=note,
            )
        )
        print(f"  {s.mode:8s} {s.name:13s} {name:9s} {note}", flush=True)
    user = items = pos = neg = methods = None  # (free this shape's tensors before the next)
    trim()


# ------------------------------------------------------------------------- reporting
def machine_info(device: str) -> List[str]:
    lines = [_common.machine_line()]
    try:
        load = os.getloadavg()
        lines.append(
            f"Load average at start: {load[0]:.2f} {load[1]:.2f} {load[2]:.2f} "
            "(other processes share these cores; ratios are measured side by side)"
        )
    except OSError:
        pass
    if device == "cuda":
        lines.append(f"GPU: {torch.cuda.get_device_name()}; CUDA {torch.version.cuda}")
    lines.append(
        f"torch {torch.__version__}, adaptau {adaptau.__version__}, python "
        f"{platform.python_version()}, backends here: {adaptau.available_backends(device)}"
    )
    lines.append(
        f"adaptau cpu kernels: {adaptau.cpu_capability() or 'not built'} (this CPU supports: "
        f"{', '.join(_cpu_capabilities()) or '-'})"
    )
    return lines


def fmt(v, digits=2):
    return "" if v is None else f"{v:.{digits}f}"


_CSV_KEYS = [
    "run",
    "mode",
    "shape",
    "B",
    "M",
    "D",
    "N",
    "method",
    "threads",
    "fwd_ms",
    "bwd_ms",
    "total_ms",
    "peak_mib",
    "note",
]


def _earlier_runs(path: str) -> List[Dict]:
    """The rows of an existing results CSV (``--append``), numbers parsed."""
    if not os.path.exists(path):
        return []
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f))
    for r in rows:
        for k in ("run", "B", "M", "D", "N"):
            r[k] = int(r[k]) if r.get(k) not in (None, "") else 1
        for k in ("fwd_ms", "bwd_ms", "total_ms", "peak_mib"):
            r[k] = float(r[k]) if r.get(k) not in (None, "") else None
        r["threads"] = int(r["threads"]) if r.get("threads") not in (None, "") else ""
    return rows


def _over_runs(rows: List[Dict]) -> List[Dict]:
    """One row per measurement (mode, shape, method, threads): the latest run's figures,
    with the fwd+bwd median and range over every run (``total_med``, ``total_min``,
    ``total_max``, ``runs``)."""
    groups: Dict[tuple, List[Dict]] = {}
    for r in rows:
        groups.setdefault(
            (r["mode"], r["shape"], r["B"], r["M"], r["D"], r["method"], r["threads"]), []
        ).append(r)
    out = []
    for group in groups.values():
        latest = dict(max(group, key=lambda r: r["run"]))
        totals = [r["total_ms"] for r in group if r["total_ms"] is not None]
        latest.update(
            runs=len(totals),
            total_med=statistics.median(totals) if totals else None,
            total_min=min(totals) if totals else None,
            total_max=max(totals) if totals else None,
        )
        out.append(latest)
    return out


def _default_out_dir(device: str) -> str:
    """This machine's results folder: ``_common.results_dir()`` for the CPU, ``gpu-<model>``
    for a GPU."""
    if device == "cpu":
        return _common.results_dir()
    name = "-".join(w for w in torch.cuda.get_device_name().lower().replace("nvidia", "").split() if w)
    return os.path.join(RESULTS, f"gpu-{name}")


def write_results(rows: List[Dict], info: List[str], args, extra: List[str]):
    args.out_dir = args.out_dir or _default_out_dir(args.device)
    os.makedirs(args.out_dir, exist_ok=True)
    prefix = os.path.join(
        args.out_dir, args.name or ("kernels_paper" if args.shapes == "paper_mf" else "kernels")
    )
    earlier = _earlier_runs(prefix + ".csv") if args.append else []
    run = 1 + max((r["run"] for r in earlier), default=0)
    rows = earlier + [dict(r, run=run) for r in rows]
    with open(prefix + ".csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=_CSV_KEYS)
        w.writeheader()
        for r in rows:
            w.writerow({k: (fmt(r[k], 3) if isinstance(r[k], float) else r[k]) for k in _CSV_KEYS})
    rows = _over_runs(rows)
    with open(prefix + ".md", "w") as f:
        f.write(f"# Kernel microbenchmarks ({args.device})\n\n")
        for line in info + extra + ([args.note] if args.note else []):
            f.write(f"- {line}\n")
        f.write(f"- Command: `{' '.join(sys.argv)}`\n")
        f.write(
            f"- Medians of {args.repeats} runs after {args.warmup} warm-up runs "
            f"(eager/compile/reference at big shapes: {args.slow_repeats} after 1, compile 2), the "
            "methods taking turns in interleaved rounds; loss = mean, "
            "include_pos=False, normalize=True, alpha = beta = 5.\n\n"
        )
        if run > 1:
            f.write(
                f"{run} runs in `{os.path.basename(prefix)}.csv` (`--append`): fwd+bwd is the "
                "median over the runs with its range; the other columns are the latest run's.\n\n"
            )
        f.write(
            "| mode | shape | B | M | D | method | fwd ms | bwd ms | fwd+bwd ms | "
            "vs eager | vs compile | peak extra MiB |\n"
        )
        f.write("|---|---|---|---|---|---|---|---|---|---|---|---|\n")
        for r in rows:
            base = {
                m: x
                for x in rows
                if x["mode"] == r["mode"] and x["shape"] == r["shape"] and x["threads"] == r["threads"]
                for m in [x["method"]]
            }
            ratio = {}
            for ref in ("eager", "compile"):
                b = base.get(ref)
                ratio[ref] = (
                    ""
                    if (r["total_med"] is None or b is None or b["total_med"] is None or r["method"] == ref)
                    else f"{b['total_med'] / r['total_med']:.1f}x"
                )
            if r["note"]:
                f.write(
                    f"| {r['mode']} | {r['shape']} | {r['B']} | {r['M']} | {r['D']} | "
                    f"{r['method']} | {r['note']} | | | | | |\n"
                )
                continue
            name = r["method"] + (f" ({r['threads']}T)" if r["threads"] != "" else "")
            f.write(
                f"| {r['mode']} | {r['shape']} | {r['B']} | {r['M']} | {r['D']} | {name} | "
                f"{fmt(r['fwd_ms'])} | {fmt(r['bwd_ms'])} | {fmt(r['total_med'])}"
                + (f" ({fmt(r['total_min'])}–{fmt(r['total_max'])})" if r["runs"] > 1 else "")
                + " | "
                f"{ratio['eager']} | {ratio['compile']} | {fmt(r['peak_mib'], 1)} |\n"
            )
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(7, 4.5))
        sel = [
            r
            for r in rows
            if r["mode"] == "per_row" and r["B"] == 2048 and r["D"] == 64 and r["total_ms"] is not None
        ]
        for method in sorted({r["method"] for r in sel}):
            pts = sorted(
                (r["M"], r["total_ms"])
                for r in sel
                if r["method"] == method and (r["threads"] in ("", torch.get_num_threads()))
            )
            if pts:
                ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=method)
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("negatives per row M (per-row mode, B=2048, D=64)")
        ax.set_ylabel("forward+backward time (ms)")
        ax.set_title(f"adaptau softmax_loss vs PyTorch ({args.device})")
        ax.grid(True, which="both", alpha=0.3)
        if ax.get_lines():
            ax.legend()
        fig.tight_layout()
        fig.savefig(prefix + ".png", dpi=120)
    except Exception as exc:  # plotting is optional
        print(f"plot skipped: {exc}")
    print(f"wrote {prefix}.md, .csv, .png")


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument("--quick", action="store_true", help="paper shape and the small shape only")
    ap.add_argument("--shapes", default="", help="comma list of shape names (see all_shapes)")
    ap.add_argument("--modes", default="per_row,shared,in_batch,mixed")
    ap.add_argument("--repeats", type=int, default=10)
    ap.add_argument(
        "--slow-repeats", type=int, default=3, help="repeats for eager/compile/reference at large shapes"
    )
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--threads", default="", help="CPU thread counts, e.g. '2,1' (default: torch's)")
    ap.add_argument(
        "--scaling-shape",
        default="paper_mf",
        help="shape at which every --threads value is timed (others: first value)",
    )
    ap.add_argument("--no-compile", action="store_true")
    ap.add_argument(
        "--out-dir",
        default=None,
        help="default: benchmarks/results/<machine> (cpu) or benchmarks/results/gpu-<name>",
    )
    ap.add_argument(
        "--capabilities",
        default="",
        help="time the cpu backend at each of these CPU capabilities, e.g. default,avx2,avx512",
    )
    ap.add_argument(
        "--name",
        default="",
        help="results file name without extension (default: kernels, kernels_paper for --shapes paper_mf)",
    )
    ap.add_argument("--note", default="", help="a line added to the results header")
    ap.add_argument(
        "--append",
        action="store_true",
        help="add this run to the results CSV (a run column) and show the median and range over all runs",
    )
    _common.add_pause_argument(ap)
    ap.add_argument("--probe-memory", default="", help=argparse.SUPPRESS)
    args = ap.parse_args()
    args.capabilities = [c for c in args.capabilities.split(",") if c]
    if args.probe_memory:
        _probe_memory_main(args.probe_memory)
        return
    if args.device == "cuda" and not torch.cuda.is_available():
        sys.exit("--device cuda: no CUDA device")
    modes = args.modes.split(",")
    shapes = [s for s in all_shapes() if s.mode in modes]
    if args.quick:
        shapes = [s for s in shapes if s.name in ("paper_mf", "small", "inbatch_2048", "mixed_paper")]
    if args.shapes:
        wanted = args.shapes.split(",")
        shapes = [s for s in shapes if s.name in wanted]
    threads = [int(t) for t in args.threads.split(",")] if args.threads else [torch.get_num_threads()]
    torch._dynamo.config.cache_size_limit = 64
    info = machine_info(args.device)
    print("\n".join(info), flush=True)
    rows: List[Dict] = []
    t_start = time.time()
    with _common.paused(args.pause) as paused:
        for s in shapes:
            for i, nt in enumerate(threads):
                if i > 0 and s.name != args.scaling_shape:
                    continue
                if args.device == "cpu":
                    torch.set_num_threads(nt)
                run_shape(s, args, rows)
    torch.set_num_threads(threads[0])
    extra = [f"Suite wall time {time.time() - t_start:.0f} s", _common.paused_line(args.pause, paused)]
    try:
        load = os.getloadavg()
        extra.append(f"Load average at end: {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}")
    except OSError:
        pass
    for r in rows:  # the mixed call against the single-source calls it replaces
        single = next(
            (
                x
                for x in rows
                if x["mode"] == r["mode"] == "mixed"
                and x["shape"] == r["shape"]
                and x["threads"] == r["threads"]
                and x["method"] == f"{r['method']}×3 single"
                and x["total_ms"]
                and r["total_ms"]
            ),
            None,
        )
        if single:
            extra.append(
                f"mixed {r['shape']} ({r['threads']}T): one {r['method']} call over the three sources "
                f"takes {r['total_ms'] / single['total_ms']:.2f}× the three single-source calls"
            )
    if args.capabilities and _cpu_capabilities():
        _set_cpu_capability(_cpu_capabilities()[-1])
    write_results(rows, info, args, extra)


if __name__ == "__main__":
    main()
