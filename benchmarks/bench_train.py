"""Training throughput: seconds per epoch of the real trainer, fused loss vs eager PyTorch.

Shape: the paper's Gowalla MF runs (``--preset gowalla-mf-paper``): paper protocol
(train ∪ valid = 810,128 pairs → 396 steps per epoch), B = 2048 rows, M = 1024 uniform
per-row negatives (with replacement), D = 64, Adam, L2, 10% user dropout, Adap-τ.

What is measured, side by side in one process:

* ``fused (trainer epoch)`` — full epochs of :meth:`adaptau.train.Trainer._train_epoch`
  (the real training loop, ``--backend auto``), the median of ``--epochs`` (3) in wall
  seconds; then one full-ranking
  evaluation (``Trainer.evaluate``, test split) in seconds.
* the training *step* (sampling, dropout, scales, loss, L2, backward, Adam, controller),
  timed per step with three interchangeable loss functions:
  - ``fused``   — ``adaptau.softmax_loss`` (backend auto → cpu on this machine);
  - ``eager``   — the same loss in plain PyTorch: gather ``[B, M+1, D]``, normalize, bmm,
    logsumexp (and the raw α = β = 1 loss the controller reads);
  - ``compile`` — ``torch.compile`` of that eager function (compile time reported apart).
  Medians after warm-up; the epoch figure is ``median step × steps per epoch``. Variants
  are interleaved round-robin so a change in machine load hits all of them alike.
* peak memory: growth of the process's peak RSS (VmHWM, reset through
  ``/proc/self/clear_refs``, after ``malloc_trim``) over one training step.
* a long-negative run (``--long-negatives``, default M = 16384): fused only; the eager
  formulation's peak is estimated from its measured peak at M = 1024 scaled by (M+1)/1025
  and is not run when that exceeds the machine's available memory.

Writes ``<out>.csv`` and ``<out>.md`` (default ``benchmarks/results/<machine>/train_gowalla_mf``).
Each invocation is one run: its rows are appended to the CSV with the next ``run`` number
(``--fresh`` starts the CSV over), and the table gives, per variant, the median and range
over all runs in the CSV, then the latest run's rows in full.

    python benchmarks/bench_train.py                         # full table (~10–20 min on 2 cores)
    python benchmarks/bench_train.py --variants fused --no-epoch --steps 10   # quick
"""

from __future__ import annotations

import argparse
import datetime
import csv
import os
import platform
import statistics
import sys
import time
from typing import Dict, List, Optional

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import adaptau  # noqa: E402
from host_memory import available_bytes, peak_rss_growth  # noqa: E402
from adaptau.train.models import add_sampled_l2_grad_, add_sparse_sampled_l2_grad_, sampled_l2  # noqa: E402
from adaptau.train import PRESETS, Trainer, TrainConfig  # noqa: E402

import _common  # noqa: E402


# ------------------------------------------------------------------------------ losses
def eager_loss(user, items, pos, neg, pos_scale, neg_scale):
    """The paper's loss in plain PyTorch (include_pos=False, cosine scores, per-row β).

    Returns (mean loss, raw[B]) like ``softmax_loss(..., return_raw=True)``.
    """
    u = F.normalize(user, dim=-1)
    idx = torch.cat([pos[:, None], neg], 1)  # [B, M+1]
    cand = F.normalize(items[idx], dim=-1)  # [B, M+1, D]
    s = torch.bmm(cand, u[:, :, None]).squeeze(-1)  # [B, M+1]
    pos_s, neg_s = s[:, 0], s[:, 1:]
    loss = torch.logsumexp(neg_scale[:, None] * neg_s, 1) - pos_scale * pos_s
    raw = (torch.logsumexp(neg_s, 1) - pos_s).detach()
    return loss.mean(), raw


def fused_loss(user, items, pos, neg, pos_scale, neg_scale):
    return adaptau.softmax_loss(user, items, pos, neg, pos_scale, neg_scale, return_raw=True)


# ------------------------------------------------------------------------------ memory
# ------------------------------------------------------------------------------ stepping
class Stepper:
    """One training step of the trainer, with the loss function swapped in.

    Mirrors ``Trainer.train_step``; phases are timed separately
    (``sample``, ``forward`` = tables + dropout + scales + loss + L2, ``backward``,
    ``optimizer``, ``controller``).
    """

    def __init__(self, trainer: Trainer, loss_fn, negatives: int) -> None:
        self.t, self.loss_fn = trainer, loss_fn
        self.direct_l2 = trainer.direct_l2
        self.sampler = adaptau.train.sampling.NegativeSampler(
            "uniform", trainer.num_items, negatives, device=trainer.device
        )
        self.gen = torch.Generator().manual_seed(1)
        perm = torch.randperm(trainer.train_users.numel(), generator=self.gen)
        self.perm = perm
        self.cursor = 0

    def batch(self):
        B = self.t.cfg.batch_size
        if self.cursor + B > self.perm.numel():
            self.cursor = 0
        idx = self.perm[self.cursor : self.cursor + B]
        self.cursor += B
        return self.t.train_users[idx], self.t.train_items[idx]

    def __call__(self, phases: Optional[Dict[str, List[float]]] = None) -> None:
        t, cfg, model = self.t, self.t.cfg, self.t.model
        marks = [time.perf_counter()]
        users, pos = self.batch()
        neg, _ = self.sampler.sample(users, pos, self.gen)
        marks.append(time.perf_counter())
        user_table, item_table = model.tables()
        u = model.batch_users(user_table, users)
        pos_scale, neg_scale = t.controller.scales(users)
        loss, raw = self.loss_fn(u, item_table, pos, neg, pos_scale, neg_scale)
        ego_u, ego_i = model.ego()
        if cfg.l2 > 0 and not self.direct_l2:  # the L2 term through autograd (before the fix)
            loss = loss + cfg.l2 * sampled_l2(ego_u, ego_i, users, pos, neg)
        float(loss.detach())
        marks.append(time.perf_counter())
        t.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if cfg.l2 > 0 and self.direct_l2:  # as the trainer does: L2 gradient added directly
            add = add_sparse_sampled_l2_grad_ if t.sparse else add_sampled_l2_grad_
            add(cfg.l2, users, pos, neg, ego_u, ego_i)
        marks.append(time.perf_counter())
        t.optimizer.step()
        marks.append(time.perf_counter())
        t.controller.observe(users, raw)
        marks.append(time.perf_counter())
        if phases is not None:
            for name, a, b in zip(
                ("sample", "forward", "backward", "optimizer", "controller"), marks[:-1], marks[1:]
            ):
                phases.setdefault(name, []).append(b - a)


# ------------------------------------------------------------------------------ report
def machine_info() -> List[str]:
    return [
        _common.machine_line(),
        f"memory available at start: {available_bytes() / 2**30:.1f} GiB",
        f"torch {torch.__version__}, Python {platform.python_version()}, adaptau {adaptau.__version__}, "
        f"commit {_common.commit()}",
        f"backends usable here: {adaptau.available_backends('cpu')}",
    ]


def loadavg() -> str:
    try:
        return " ".join(open("/proc/loadavg").read().split()[:3])
    except OSError:
        return "?"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", default="gowalla")
    ap.add_argument("--preset", default="gowalla-mf-paper")
    ap.add_argument("--variants", default="fused,eager,compile")
    ap.add_argument("--steps", type=int, default=20, help="timed fused steps (default 20)")
    ap.add_argument("--slow-steps", type=int, default=4, help="timed eager / compile steps (default 4)")
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--no-epoch", action="store_true", help="skip the full trainer epochs and evaluation")
    ap.add_argument(
        "--epochs",
        type=int,
        default=3,
        help="full trainer epochs timed; the table reports their median (default 3)",
    )
    ap.add_argument("--long-negatives", type=int, default=16384, help="0 to skip")
    ap.add_argument("--long-steps", type=int, default=3)
    ap.add_argument("--threads", type=int, default=0, help="torch threads (default: torch's choice)")
    ap.add_argument(
        "--out",
        default=None,
        help="path without extension (default benchmarks/results/<machine>/train_gowalla_mf)",
    )
    ap.add_argument(
        "--fresh", action="store_true", help="start the CSV over instead of appending this run to it"
    )
    _common.add_pause_argument(ap)
    args = ap.parse_args()
    with _common.paused(args.pause) as pids:
        return run(args, ap, pids)


def run(args, ap, paused_pids: List[int]) -> int:
    """The measurements and the report of one invocation (background jobs paused)."""
    if args.out is None:
        args.out = os.path.join(_common.results_dir(), "train_gowalla_mf")
    for name in ("steps", "slow_steps", "long_steps", "epochs"):
        if getattr(args, name) < 1:
            ap.error(
                f"--{name.replace('_', '-')} must be at least 1 (skip the long run with --long-negatives 0)"
            )
    if args.threads:
        torch.set_num_threads(args.threads)
    variants = [v for v in args.variants.split(",") if v]
    info = machine_info() + [_common.paused_line(args.pause, paused_pids)]
    load_start = loadavg()
    print("\n".join(info), flush=True)

    cfg = TrainConfig().update(PRESETS[args.preset])
    cfg.update(
        dict(data=args.data, out=os.path.join("/tmp", f"bench_train_{os.getpid()}"), progress="off", epochs=1)
    )
    t0 = time.time()
    trainer = Trainer(cfg, log=lambda *a, **k: None)
    print(
        f"setup {time.time() - t0:.1f}s: {trainer.train_users.numel()} train pairs, "
        f"{len(trainer.batches)} steps/epoch, backend {adaptau.loss.ops.resolve_backend('auto', 'cpu')}",
        flush=True,
    )
    steps_per_epoch = len(trainer.batches)
    trainer.controller.begin_epoch(0)
    rows: List[Dict] = []
    notes: List[str] = []

    # -- 1. the real trainer epochs + evaluation (fused) -----------------------------------
    epoch_s = eval_s = None
    if not args.no_epoch:
        epochs_s = []
        for epoch in range(args.epochs):
            t0 = time.time()
            rec = trainer._train_epoch(epoch)
            epochs_s.append(time.time() - t0)
            print(f"trainer epoch {epoch}: {epochs_s[-1]:.1f}s", flush=True)
        epoch_s = statistics.median(epochs_s)
        t0 = time.time()
        metrics = trainer.evaluate("select")
        eval_s = time.time() - t0
        print(
            f"trainer epoch: {epoch_s:.1f}s (loss {rec['loss']:.4f}); evaluation {eval_s:.1f}s "
            f"(recall@20 {metrics['recall@20']:.4f})",
            flush=True,
        )

    # -- 2. step timings, round-robin ---------------------------------------------------
    fns = {"fused": fused_loss, "eager": eager_loss}
    compile_s = None
    if "compile" in variants:
        fns["compile"] = torch.compile(eager_loss, dynamic=False)
    steppers = {v: Stepper(trainer, fns[v], cfg.negatives) for v in variants}
    # sanity: the eager function is the same loss
    with torch.no_grad():
        st = steppers[variants[0]]
        users, pos = st.batch()
        neg = torch.randint(trainer.num_items, (users.numel(), cfg.negatives))
        ut, it = trainer.model.tables()
        ps, ns = trainer.controller.scales(users)
        a, ra = fused_loss(ut[users], it, pos, neg, ps, ns)
        b, rb = eager_loss(ut[users], it, pos, neg, ps, ns)
        assert torch.allclose(a, b, rtol=1e-4, atol=1e-4), (float(a), float(b))
        assert torch.allclose(ra, rb, rtol=1e-4, atol=1e-4)
    times: Dict[str, List[float]] = {v: [] for v in variants}
    phases: Dict[str, Dict[str, List[float]]] = {v: {} for v in variants}
    peak: Dict[str, Optional[float]] = {}
    for v in variants:  # warm-up (and compilation)
        t0 = time.time()
        for _ in range(args.warmup):
            steppers[v]()
        if v == "compile":
            compile_s = time.time() - t0
            print(f"compile warm-up ({args.warmup} steps incl. compilation): {compile_s:.1f}s", flush=True)
        peak[v] = peak_rss_growth(steppers[v])
        print(f"{v}: peak RSS growth over one step {peak[v] / 2**20:.0f} MiB", flush=True)
    max_steps = max(args.steps if v == "fused" else args.slow_steps for v in variants)
    for i in range(max_steps):
        for v in variants:
            if len(times[v]) >= (args.steps if v == "fused" else args.slow_steps):
                continue
            t0 = time.perf_counter()
            steppers[v](phases[v])
            times[v].append(time.perf_counter() - t0)
        print(
            f"round {i + 1}/{max_steps}: "
            + ", ".join(f"{v} {times[v][-1] * 1000:.0f} ms" for v in variants if times[v]),
            flush=True,
        )
    med = {v: statistics.median(times[v]) for v in variants}
    for v in variants:
        ph = {k: statistics.median(x) * 1000 for k, x in phases[v].items()}
        rows.append(
            dict(
                variant=f"{v} (step × {steps_per_epoch})",
                M=cfg.negatives,
                steps_timed=len(times[v]),
                ms_per_step=med[v] * 1000,
                train_s_per_epoch=med[v] * steps_per_epoch,
                eval_s=None,
                vs_fused=med[v] / med["fused"] if "fused" in med else None,
                peak_mib=(peak[v] or 0) / 2**20,
                phases=" / ".join(
                    f"{k} {ph[k]:.1f}" for k in ("sample", "forward", "backward", "optimizer", "controller")
                ),
            )
        )
    if epoch_s is not None:
        rows.insert(
            0,
            dict(
                variant="fused (trainer epoch)",
                M=cfg.negatives,
                steps_timed=steps_per_epoch,
                ms_per_step=epoch_s / steps_per_epoch * 1000,
                train_s_per_epoch=epoch_s,
                eval_s=eval_s,
                vs_fused=None,
                peak_mib=None,
                phases="epochs " + ", ".join(f"{x:.1f}" for x in epochs_s) + " s",
            ),
        )

    # -- 3. long negatives -------------------------------------------------------------
    if args.long_negatives:
        M = args.long_negatives
        st = Stepper(trainer, fused_loss, M)
        st()
        pk = peak_rss_growth(st)
        ts, ph = [], {}
        for _ in range(args.long_steps):
            t0 = time.perf_counter()
            st(ph)
            ts.append(time.perf_counter() - t0)
        m = statistics.median(ts)
        phs = {k: statistics.median(x) * 1000 for k, x in ph.items()}
        rows.append(
            dict(
                variant=f"fused, M={M} (step × {steps_per_epoch})",
                M=M,
                steps_timed=len(ts),
                ms_per_step=m * 1000,
                train_s_per_epoch=m * steps_per_epoch,
                eval_s=None,
                vs_fused=None,
                peak_mib=pk / 2**20 if pk else None,
                phases=" / ".join(
                    f"{k} {phs[k]:.1f}" for k in ("sample", "forward", "backward", "optimizer", "controller")
                ),
            )
        )
        print(f"fused M={M}: {m * 1000:.0f} ms/step, peak {pk / 2**20:.0f} MiB", flush=True)
        if "eager" in peak and peak["eager"]:
            est = peak["eager"] * (M + 1) / (cfg.negatives + 1)
            gathered = cfg.batch_size * (M + 1) * cfg.dim * 4
            avail = available_bytes()
            rows.append(
                dict(
                    variant=f"eager, M={M} (estimated, not run)",
                    M=M,
                    steps_timed=0,
                    ms_per_step=med["eager"] * 1000 * (M + 1) / (cfg.negatives + 1),
                    train_s_per_epoch=med["eager"] * steps_per_epoch * (M + 1) / (cfg.negatives + 1),
                    eval_s=None,
                    vs_fused=None,
                    peak_mib=est / 2**20,
                    phases=f"needs ~{est / 2**30:.0f} GiB > {avail / 2**30:.0f} GiB available"
                    if est > avail
                    else f"~{est / 2**30:.0f} GiB",
                )
            )
            notes.append(
                f"Eager at M={M}: one gathered [B, M+1, D] fp32 block is {gathered / 2**30:.1f} GiB; "
                f"the measured eager peak at M={cfg.negatives} ({peak['eager'] / 2**20:.0f} MiB, "
                f"≈{peak['eager'] / (cfg.batch_size * (cfg.negatives + 1) * cfg.dim * 4):.1f} such blocks) "
                f"scaled by (M+1)/{cfg.negatives + 1} gives ≈{est / 2**30:.0f} GiB, more than the "
                f"{avail / 2**30:.0f} GiB available, so it was not run. Time is extrapolated linearly."
            )

    load_end = loadavg()
    write(
        args.out,
        rows,
        info,
        notes,
        dict(
            steps_per_epoch=steps_per_epoch,
            compile_s=compile_s,
            load=f"{load_start} at start, {load_end} at end",
            argv=" ".join(sys.argv[1:]),
            commit=_common.commit(),
            date=datetime.date.today().isoformat(),
        ),
        fresh=args.fresh,
    )
    return 0


def _fmt(v, digits=2):
    if v is None or v == "":
        return "—"
    if isinstance(v, float):
        return f"{v:.{digits}f}"
    return str(v)


KEYS = [
    "run",
    "commit",
    "date",
    "variant",
    "M",
    "steps_timed",
    "ms_per_step",
    "train_s_per_epoch",
    "eval_s",
    "vs_fused",
    "peak_mib",
    "phases",
]
NUMERIC = ("ms_per_step", "train_s_per_epoch", "eval_s", "vs_fused", "peak_mib")


def read_runs(path: str) -> List[Dict]:
    """The rows of an existing results CSV (numbers as floats, empty cells as None); [] when
    there is none, or when its columns are not this script's (then the CSV is started over)."""
    if not os.path.isfile(path):
        return []
    with open(path, newline="") as f:
        reader = csv.DictReader(f)
        if reader.fieldnames != KEYS:
            print(f"{path} has other columns than {KEYS}; starting it over", flush=True)
            return []
        rows = list(reader)
    for r in rows:
        r["run"], r["M"], r["steps_timed"] = int(r["run"]), int(r["M"]), int(r["steps_timed"])
        for k in NUMERIC:
            r[k] = float(r[k]) if r[k] not in ("", None) else None
    return rows


def _spread(values: List[float], digits: int) -> str:
    """``median (min–max)`` of the values, or the one value; ``—`` when there are none."""
    values = [v for v in values if v is not None]
    if not values:
        return "—"
    med = f"{statistics.median(values):.{digits}f}"
    return med if len(values) == 1 else f"{med} ({min(values):.{digits}f}–{max(values):.{digits}f})"


def write(
    out: str, rows: List[Dict], info: List[str], notes: List[str], meta: Dict, fresh: bool = False
) -> None:
    """Append this run's rows to ``<out>.csv`` (or start it over with ``fresh``) and render
    ``<out>.md`` from every run in it."""
    os.makedirs(os.path.dirname(out) or ".", exist_ok=True)
    previous = [] if fresh else read_runs(out + ".csv")
    run = max((r["run"] for r in previous), default=0) + 1
    new = [dict(r, run=run, commit=meta["commit"], date=meta["date"]) for r in rows]
    allrows = previous + new
    with open(out + ".csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=KEYS)
        w.writeheader()
        for r in allrows:
            w.writerow({k: r.get(k) for k in KEYS})
    runs = sorted({r["run"] for r in allrows})
    lines = [
        "# Training throughput: Gowalla MF at the paper's shape",
        "",
        *[f"- {x}" for x in info],
        f"- Commit {meta['commit']}, {meta['date']} (run {run})",
        f"- Command: `python benchmarks/bench_train.py {meta['argv']}`",
        f"- Load average (1/5/15 min): {meta['load']}; the CPU is shared, so absolute times "
        "are inflated by other jobs; ratios are measured side by side",
        "",
        f"Paper protocol (train ∪ valid = 810,128 pairs, {meta['steps_per_epoch']} steps/epoch), "
        "B = 2048, M = 1024 uniform per-row negatives, D = 64, Adam (fused), L2 1e-9, "
        "10% user dropout, Adap-τ controller. One step = sampling + loss + L2 + backward + Adam "
        "+ controller. Step rows: median step × steps/epoch, variants interleaved in one process. "
        "Trainer epoch: the median of the timed epochs of the real training loop. "
        "Peak = growth of peak RSS over one step (fused: includes its scratch).",
        "",
    ]
    lines += [
        f"## All runs: median (min–max) over {len(runs)} run{'s' if len(runs) > 1 else ''}",
        "",
        "| variant | M | runs | train s/epoch | ms/step | × fused step | peak MiB |",
        "|---|---|---|---|---|---|---|",
    ]
    for variant in dict.fromkeys(r["variant"] for r in allrows):
        rs = [r for r in allrows if r["variant"] == variant]
        lines.append(
            "| "
            + " | ".join(
                [
                    variant,
                    str(rs[-1]["M"]),
                    str(len({r["run"] for r in rs})),
                    _spread([r["train_s_per_epoch"] for r in rs], 1),
                    _spread([r["ms_per_step"] for r in rs], 1),
                    _spread([r["vs_fused"] for r in rs], 1),
                    _spread([r["peak_mib"] for r in rs], 0),
                ]
            )
            + " |"
        )
    lines += ["", "| run | commit | date |", "|---|---|---|"]
    for n in runs:
        r = next(r for r in allrows if r["run"] == n)
        lines.append(f"| {n} | {r['commit']} | {r['date']} |")
    lines += ["", f"## Run {run}", ""]
    if meta.get("compile_s") is not None:
        lines += [f"torch.compile warm-up incl. compilation: {meta['compile_s']:.0f} s.", ""]
    lines += [
        "| variant | M | steps timed | ms/step | train s/epoch | eval s | × fused step | peak MiB | "
        "phases, ms (sample / fwd / bwd / Adam / controller) |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in new:
        lines.append(
            "| "
            + " | ".join(
                [
                    r["variant"],
                    str(r["M"]),
                    str(r["steps_timed"]),
                    _fmt(r["ms_per_step"], 1),
                    _fmt(r["train_s_per_epoch"], 1),
                    _fmt(r["eval_s"], 1),
                    _fmt(r["vs_fused"], 1),
                    _fmt(r["peak_mib"], 0),
                    r["phases"] or "",
                ]
            )
            + " |"
        )
    lines.append("")
    lines += notes
    with open(out + ".md", "w") as f:
        f.write("\n".join(lines) + "\n")
    print("\n".join(lines))
    print(f"wrote {out}.md and {out}.csv (run {run})")


if __name__ == "__main__":
    sys.exit(main())
