"""Reproduce the Adap-τ paper's comparison and write its report.

The report goes to ``--out`` (default ``benchmarks/results/<machine>/reproduction_<datasets>.md``,
with ``_<model>`` appended when the selected cells use one model, e.g. ``reproduction_gowalla_mf.md``),
with its ``.csv`` beside it and, under ``--report-only``, one training-curve plot per cell
(``<report name>_<cell>.png``).

Grid (every cell is one ``adaptau train`` run):

* datasets  — gowalla, ml-1m, lastfm (``--datasets``)
* models    — mf (preset ``gowalla-mf-paper``), lightgcn (preset ``gowalla-lightgcn-paper``)
* protocols — paper (train ∪ valid, epoch selected on test, as the paper's code) and clean
  (train, select on valid, test reported once)
* rules     — ``ip``: inner-product baseline (no normalization, τ = 1, ranked by dot product);
  ``fixed0.05 / fixed0.1 / fixed0.2 / fixed0.5``: cosine with a fixed τ;
  ``global``: Adap-τ-0; ``adaptive``: Adap-τ

Every run uses the paper's hyper-parameters for its model (dim 64, batch 2048; MF: 1024
uniform negatives, lr 1e-4, l2 1e-9, dropout 0.1, q = 0.9, t₂ = 0.25; LightGCN: 3 layers,
in-batch negatives, lr 1e-3, l2 1e-5, mean base, t₂ = 0.6) on every dataset, with the
budget given here: ``--epochs`` per configuration (the paper ran 142–366 epochs with
early stopping), ``--warmup`` (paper: 100; default here min(100, epochs // 4) so a short
budget still leaves the warm-up), ``--eval-every``, ``--patience``; ``--set key=value``
overrides any other setting for every run (recorded in the report); ``--variant NAME`` marks
runs whose overrides test something beside the presets (e.g. another sampler): ``--collect``
lists them apart from the cells they vary.

Run folders live under ``--runs`` (default ``runs/reproduce/<dataset>-<model>-<protocol>-<rule>``).
A finished folder whose budget is met is reused as is; an unfinished one (or one with a
smaller budget) is continued from its ``last.pt`` (``--resume``, the default; ``--fresh``
starts over). A folder that is not continued (``--fresh``, or settings other than the
saved ones) is renamed ``<name>.set-aside-<UTC time>``, never deleted. So a long
reproduction can be stopped and restarted at will, and a short run can later be extended
by raising ``--epochs``.

    # a few minutes: lastfm, both models, paper protocol, three rules, 10 epochs
    python benchmarks/reproduce.py --datasets lastfm --protocols paper --rules ip,global,adaptive --epochs 10
    # the full comparison (days on a CPU, hours on a GPU):
    python benchmarks/reproduce.py --epochs 1000 --warmup 100 --eval-every 5 --patience 10
    # select cells with glob patterns on the run names instead:
    python benchmarks/reproduce.py --only 'gowalla-mf-paper-*,ml-1m-*-clean-adaptive' --epochs 400
"""

from __future__ import annotations

import argparse
import csv
import datetime
import fnmatch
import json
import os
import re
import sys
import time
from pathlib import Path
from typing import Any, Dict, List, Optional

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
sys.path.insert(0, str(HERE))

import torch  # noqa: E402

from adaptau.train import PRESETS, TrainConfig, Trainer  # noqa: E402
from adaptau.train.run_folder import RunLock  # noqa: E402
import _common  # noqa: E402

DATASETS = ("gowalla", "ml-1m", "lastfm")
MODELS = ("mf", "lightgcn")
PROTOCOLS = ("paper", "clean")
RULES = ("ip", "fixed0.05", "fixed0.1", "fixed0.2", "fixed0.5", "global", "adaptive")
RULE_LABEL = {
    "ip": "inner product (no norm., τ=1)",
    "global": "Adap-τ-0 (global)",
    "adaptive": "Adap-τ (adaptive)",
    **{f"fixed{t}": f"fixed τ={t}" for t in ("0.05", "0.1", "0.2", "0.5")},
}
#: The paper's public training logs, Gowalla, test split, K = 20 (docs/reproduction.md).
PAPER = {
    ("mf", "global"): (0.1754, 0.1386, 309),
    ("mf", "adaptive"): (0.1839, 0.1507, 366),
    ("lightgcn", "global"): (0.1841, 0.1526, 152),
    ("lightgcn", "adaptive"): (0.1901, 0.1590, 142),
}
#: Gowalla, paper protocol: the project's targets (MF: the preset's full-budget run;
#: LightGCN: 98% of the paper's figures).
TARGET = {("mf", "adaptive"): (0.1802, 0.1477), ("lightgcn", "adaptive"): (0.1863, 0.1558)}


def default_out(cells, variant: str = "") -> str:
    """``<results_dir()>/reproduction_<datasets>[_<model>][_<variant>].md`` for the selected
    cells: the datasets in grid order, the model when every cell uses the same one, and the
    variant's name when there is one."""
    datasets = [d for d in DATASETS if any(c[0] == d for c in cells)] or sorted({c[0] for c in cells})
    models = sorted({c[1] for c in cells})
    name = "reproduction_" + "_".join(datasets) + (f"_{models[0]}" if len(models) == 1 else "")
    name += f"_{variant}" if variant else ""
    return str(Path(_common.results_dir()) / f"{name}.md")


def rule_settings(rule: str) -> Dict[str, Any]:
    if rule == "ip":
        return dict(normalize=False, tau="fixed", tau_value=1.0, rank="dot")
    if rule.startswith("fixed"):
        return dict(tau="fixed", tau_value=float(rule[len("fixed") :]))
    if rule in ("global", "adaptive"):
        return dict(tau=rule)
    raise ValueError(f"unknown rule {rule!r}; known: {RULES}")


def parse_value(text: str) -> Any:
    for cast in (int, float):
        try:
            return cast(text)
        except ValueError:
            pass
    return {"true": True, "false": False}.get(text.lower(), text)


def epochs_for(dataset: str, args) -> int:
    return args.epochs_for.get(dataset, args.epochs)


def warmup_for(dataset: str, args) -> int:
    return args.warmup if args.warmup is not None else min(100, max(1, epochs_for(dataset, args) // 4))


def cell_config(dataset: str, model: str, protocol: str, rule: str, args) -> TrainConfig:
    cfg = TrainConfig().update(PRESETS[f"gowalla-{model}-paper"])
    warmup = warmup_for(dataset, args)
    cfg.update(
        dict(
            data=dataset,
            protocol=protocol,
            epochs=epochs_for(dataset, args),
            warmup=warmup,
            eval_every=args.eval_every,
            patience=args.patience,
            progress="off",
            seed=args.seed,
        )
    )
    cfg.update(rule_settings(rule))
    cfg.update({k: v for k, v in args.overrides.items() if "." not in k})
    cfg.update({k.split(".", 1)[1]: v for k, v in args.overrides.items() if k.startswith(model + ".")})
    return cfg


#: Settings a cell may change between invocations and still continue its run (the budget).
BUDGET_SETTINGS = ("epochs", "patience", "progress", "out", "eval_every")


def settings_differ(saved: Dict[str, Any], cfg: TrainConfig) -> List[str]:
    """The settings of ``cfg`` that differ from a run folder's saved ``config.json``, the
    budget excepted. A setting the saved file lacks (it predates that setting) counts as
    its default, which is what the trainer reads it as."""

    def as_json(c: TrainConfig) -> Dict[str, Any]:
        return json.loads(
            json.dumps({k: getattr(c, k) for k in TrainConfig.fields() if k not in BUDGET_SETTINGS})
        )

    default = as_json(TrainConfig())
    return [k for k, v in as_json(cfg).items() if saved.get(k, default[k]) != v]


def set_aside(folder: Path) -> Path:
    """Rename a run folder that is not continued to ``<name>.set-aside-<UTC time>`` (a
    number appended if taken): nothing trained is deleted."""
    RunLock(folder).release()  # ValueError while another run holds the folder
    stamp = datetime.datetime.now(datetime.timezone.utc).strftime("%Y%m%d-%H%M%S")
    target, n = folder.with_name(f"{folder.name}.set-aside-{stamp}"), 1
    while target.exists():
        n += 1
        target = folder.with_name(f"{folder.name}.set-aside-{stamp}-{n}")
    folder.rename(target)
    return target


def run_cell(name: str, cfg: TrainConfig, folder: Path, args, log) -> Dict[str, Any]:
    """Train (or continue, or reuse) one cell; return its summary. A folder that is not
    continued (other settings, or ``--fresh``) is set aside, never deleted."""
    cfg.out = str(folder)
    summary_path = folder / "summary.json"
    resume = None
    if not args.fresh and (folder / "last.pt").is_file():
        saved = json.loads((folder / "config.json").read_text()) if (folder / "config.json").is_file() else {}
        differ = settings_differ(saved, cfg)
        if differ:
            log(f"[{name}] the settings {differ} differ from the saved run in {folder}; starting over")
        else:
            if summary_path.is_file():
                s = json.loads(summary_path.read_text())
                done = s.get("epochs_run", 0) >= cfg.epochs or s.get("status") in (
                    "early-stopped",
                    "diverged",
                )
                if done:
                    log(f"[{name}] reusing {folder} ({s.get('epochs_run')} epochs, {s.get('status')})")
                    return s
            resume = str(folder)
            log(f"[{name}] continuing {folder} up to {cfg.epochs} epochs")
    if resume is None:
        if folder.exists() and any(folder.iterdir()):
            log(f"[{name}] the previous run is kept in {set_aside(folder)}")
        log(f"[{name}] training {cfg.epochs} epochs -> {folder}")
    t0 = time.time()
    quiet = (lambda msg: None) if not args.verbose else (lambda msg: log(f"  {msg}"))
    trainer = Trainer(cfg, resume=resume, log=quiet, overwrite=resume is None)
    if resume:  # raise the budget of the resumed run (Trainer keeps the saved config otherwise)
        trainer.cfg.epochs, trainer.cfg.patience = cfg.epochs, cfg.patience
    summary = trainer.fit()
    summary["_wall_seconds_this_call"] = time.time() - t0
    t = summary.get("test") or {}
    log(
        f"[{name}] {summary['status']}, {summary['epochs_run']} epochs, best {summary['best_epoch']}: "
        f"test recall@20 {t.get('recall@20', float('nan')):.4f} ndcg@20 {t.get('ndcg@20', float('nan')):.4f}, "
        f"{summary['seconds_per_epoch']:.1f} s/epoch, {time.time() - t0:.0f} s"
    )
    return summary


def run_history(folder: Path) -> List[Dict[str, Any]]:
    """The epoch records of a run folder's ``metrics.jsonl``, one per epoch (a resumed run
    may repeat an epoch: the last record counts), in epoch order."""
    path = folder / "metrics.jsonl"
    if not path.is_file():
        return []
    by_epoch = {}
    for line in path.read_text().splitlines():
        if line.strip():
            rec = json.loads(line)
            by_epoch[rec["epoch"]] = rec
    return [by_epoch[e] for e in sorted(by_epoch)]


def partial_summary(history: List[Dict[str, Any]], protocol: str, metric: str) -> Optional[Dict[str, Any]]:
    """The summary of an unfinished run from its epoch records (:func:`run_history`): the best
    evaluation so far (by ``metric`` on the selection split), the epochs run and their median
    training time; None when there is no epoch yet. Under the clean protocol the evaluations
    are on valid, so the test figures stay empty until the run finishes."""
    if not history:
        return None
    evals = [r for r in history if r.get("metrics")]
    best = max(evals, key=lambda r: (r["metrics"].get(metric, float("-inf")), -r["epoch"])) if evals else None
    sel = dict(best["metrics"]) if best else None
    seconds = sorted(r["seconds"] for r in history if r.get("seconds") is not None)
    return {
        "status": "in progress",
        "epochs_run": history[-1]["epoch"] + 1,
        "best_epoch": best["epoch"] if best else None,
        "valid": sel,
        "test": sel if protocol == "paper" else None,
        "seconds_per_epoch": seconds[len(seconds) // 2] if seconds else None,
    }


def machine() -> str:
    dev = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU"
    return (
        f"{_common.cpu_model()}, {os.cpu_count()} cores, {dev}; torch {torch.__version__}, "
        f"{torch.get_num_threads()} threads"
    )


def fmt(x: Optional[float], d: int = 4) -> str:
    return "—" if x is None else f"{x:.{d}f}"


def comparison_lines(ds: str, proto: str, rows: List[Dict[str, Any]]) -> List[str]:
    """Per model of one dataset and protocol: Adap-τ against Adap-τ-0 on both metrics, and
    (Gowalla, paper protocol) Adap-τ against its target; provisional while a run is in progress."""
    lines = []
    for model in MODELS:
        by = {r["rule"]: r for r in rows if r["model"] == model}
        a, g = by.get("adaptive"), by.get("global")
        if a and g and a["recall@20"] is not None and g["recall@20"] is not None:
            ok = a["recall@20"] >= g["recall@20"] and a["ndcg@20"] >= g["ndcg@20"]
            running = [n for n, r in (("Adap-τ", a), ("Adap-τ-0", g)) if r["status"] == "in progress"]
            lines.append(
                f"- {model}: Adap-τ {'≥' if ok else 'is NOT ≥'} Adap-τ-0 on both metrics "
                f"(Δ Recall@20 {a['recall@20'] - g['recall@20']:+.4f}, Δ NDCG@20 "
                f"{a['ndcg@20'] - g['ndcg@20']:+.4f})"
                + (f"; provisional: {' and '.join(running)} not converged" if running else "")
            )
        if ds == "gowalla" and proto == "paper" and (model, "adaptive") in TARGET and a:
            tr, tn = TARGET[(model, "adaptive")]
            met = a["recall@20"] is not None and a["recall@20"] >= tr and a["ndcg@20"] >= tn
            lines.append(
                f"- {model} Adap-τ against its target (≥ {tr} Recall@20, ≥ {tn} NDCG@20): "
                f"{'met' if met else 'not met'}"
                + (" so far (not converged)" if a["status"] == "in progress" else "")
            )
    return lines


def write_report(
    results: List[Dict[str, Any]], args, wall: float, command: List[str], out: Path, show: bool = False
) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    keys = [
        "dataset",
        "model",
        "protocol",
        "rule",
        "recall@20",
        "ndcg@20",
        "select_recall@20",
        "best_epoch",
        "epochs_run",
        "status",
        "s_per_epoch",
        "lr",
        "warmup",
        "folder",
        "variant",
    ]
    with open(out.with_suffix(".csv"), "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=keys)
        w.writeheader()
        for r in results:
            w.writerow({**{k: r.get(k) for k in keys}, "variant": getattr(args, "variant", "")})
    load = " ".join(open("/proc/loadavg").read().split()[:3]) if os.path.exists("/proc/loadavg") else "?"
    per = sorted({r["dataset"] for r in results})
    budget = (
        "**Budget: "
        + ", ".join(f"{d} {epochs_for(d, args)} epochs (warm-up {warmup_for(d, args)})" for d in per)
        + " per configuration**"
        f" (evaluation every {args.eval_every}, patience {args.patience})"
    )
    if args.overrides:
        budget += ", overrides: " + ", ".join(
            (
                f"{k.split('.', 1)[1]}={v} for {k.split('.', 1)[0]} runs"
                if "." in k
                else f"{k}={v} for every run"
            )
            for k, v in args.overrides.items()
        )
    lines = [
        "# Adap-τ reproduction",
        "",
        budget
        + ". The paper ran 142–366 epochs per configuration with a 100-epoch warm-up"
        + (
            "; figures from a short budget are **not** converged and only show the trend."
            if min(epochs_for(d, args) for d in per) < 142
            else "."
        ),
        "",
        f"Command: `python benchmarks/reproduce.py {' '.join(command)}`  ",
        (
            "Report only: nothing was trained by this invocation; training time of "
            if getattr(args, "report_only", False)
            else f"Wall time: {wall / 60:.1f} min (this invocation; reused runs cost nothing); training time of "
        )
        + "the cells shown, summed over all invocations: "
        f"{sum((r['s_per_epoch'] or 0) * (r['epochs_run'] or 0) for r in results) / 60:.1f} min "
        "(evaluation not included).  ",
        f"Machine: {machine()}; load average at the end {load} (shared CPU).  ",
        f"Commit {_common.commit()}, {datetime.date.today().isoformat()}.  ",
        "Training command: `python benchmarks/reproduce.py "
        + " ".join(a for a in command if a != "--report-only")
        + "` (resumable: rerun the same command after an interruption).",
        "",
        "Hyper-parameters: the paper's for each model (`--preset gowalla-mf-paper` / "
        "`gowalla-lightgcn-paper`: dim 64, batch 2048; MF 1024 uniform negatives, lr 1e-4, l2 1e-9, "
        "dropout 0.1, q=0.9, t₂=0.25; LightGCN 3 layers, in-batch negatives, lr 1e-3, l2 1e-5, mean base, "
        "t₂=0.6), on every dataset. Rules: `ip` = inner-product baseline (no normalization, τ = 1, "
        "ranked by dot product); fixed τ (cosine); Adap-τ-0 (global); Adap-τ (adaptive). "
        "Paper protocol = train on train ∪ valid and select the epoch on **test** (as the paper's code; "
        "optimistic); clean = train on train, select on valid, report test once. "
        "Metrics: Recall@20 / NDCG@20 on test, full ranking with train (and valid) items masked.",
        "",
    ]
    lines += [f"Note: {n}" for n in args.note] + ([""] if args.note else [])
    if getattr(args, "variant", ""):
        lines += [
            f"Variant **{args.variant}**: these runs change the presets as the overrides above say; "
            "the collected report lists them apart from the cells they vary.",
            "",
        ]
    groups: Dict[tuple, List[Dict[str, Any]]] = {}
    for r in results:
        groups.setdefault((r["dataset"], r["protocol"]), []).append(r)
    for (ds, proto), rows in groups.items():
        lines += [f"## {ds}, {proto} protocol", ""]
        paper_cols = ds == "gowalla" and proto == "paper"
        head = "| model | rule | Recall@20 | NDCG@20 | best epoch | epochs run | s/epoch |"
        sep = "|---|---|---|---|---|---|---|"
        if paper_cols:
            head += " paper Recall@20 | paper NDCG@20 | paper epochs |"
            sep += "---|---|---|"
        lines += [head, sep]
        for r in rows:
            line = (
                f"| {r['model']} | {RULE_LABEL[r['rule']]} | {fmt(r['recall@20'])} | {fmt(r['ndcg@20'])} | "
                f"{'—' if r['best_epoch'] is None else r['best_epoch']} | {r['epochs_run']} ({r['status']}) | "
                f"{fmt(r['s_per_epoch'], 1)} |"
            )
            if paper_cols:
                p = PAPER.get((r["model"], r["rule"]))
                line += f" {p[0]:.4f} | {p[1]:.4f} | {p[2]} |" if p else " — | — | — |"
            lines.append(line)
        lines.append("")
        lines += comparison_lines(ds, proto, rows)
        lines.append("")
    for name, png in getattr(args, "curves", []):
        lines += [f"Training curves of {name} (loss, τ, selection metric by epoch): [{png}]({png})", ""]
    lines += [
        "Run folders (config.json, metrics.jsonl, summary.json, curves.png, tau_hist.png) are under "
        f"`{args.runs}` (not committed)."
    ]
    out.write_text("\n".join(lines) + "\n")
    if show:
        print("\n".join(lines))


def compare_rules(cells, args) -> None:
    """For every (dataset, model, protocol) whose Adap-τ and Adap-τ-0 runs both have
    evaluations: their loss, τ and test curves in one plot, ``<report stem>_<dataset>-<model>-<protocol>_rules.png``
    (listed in the report)."""
    from adaptau.train.plots import rule_comparison

    for d, m, p in dict.fromkeys((c[0], c[1], c[2]) for c in cells):
        histories = {
            RULE_LABEL[r]: run_history(Path(args.runs) / f"{d}-{m}-{p}-{r}") for r in ("adaptive", "global")
        }
        if all(any(h.get("metrics") for h in hist) for hist in histories.values()):
            png = Path(args.out).with_name(f"{Path(args.out).stem}_{d}-{m}-{p}_rules.png")
            rule_comparison(histories, ["recall@20", "ndcg@20"], f"{d} {m} ({p} protocol)", png)
            args.curves.append((f"{d}-{m}-{p}: Adap-τ against Adap-τ-0", png.name))


#: Cell status, from most to least final.
_STATUS_RANK = {"early-stopped": 0, "completed": 0, "diverged": 1, "in progress": 2}


def _state(status: str) -> str:
    """A cell's state in the collected report."""
    if status in ("early-stopped", "completed"):
        return "converged"
    return "**not converged**" if status == "in progress" else status


def collect(results_root: Path, out: Path) -> List[str]:
    """One report from every machine's ``reproduction_*.csv`` under ``results_root``: per
    cell the most final row (converged before in progress, then the most epochs), one table
    per dataset and protocol with the paper's figure beside each cell, whether each cell
    converged or not, Adap-τ against Adap-τ-0, and links to the curves.
    Writes ``out`` and returns its lines."""
    cells: Dict[tuple, Dict[str, Any]] = {}
    for path in sorted(results_root.glob("*/reproduction_*.csv")):
        with open(path, newline="") as f:
            for row in csv.DictReader(f):
                for k in ("recall@20", "ndcg@20", "s_per_epoch"):
                    row[k] = float(row[k]) if row.get(k) not in (None, "", "None") else None
                for k in ("best_epoch", "epochs_run"):
                    row[k] = int(float(row[k])) if row.get(k) not in (None, "", "None") else None
                row["machine"], row["source"] = path.parent.name, path
                row["variant"] = row.get("variant") or ""
                key = (row["dataset"], row["model"], row["protocol"], row["rule"], row["variant"])
                rank = (_STATUS_RANK.get(row["status"], 3), -(row["epochs_run"] or 0))
                if key not in cells or rank < cells[key]["_rank"]:
                    cells[key] = dict(row, _rank=rank)
    lines = [
        "# Adap-τ reproduction: every cell run so far",
        "",
        "Collected by `python benchmarks/reproduce.py --collect` from the per-machine reports "
        "`benchmarks/results/<machine>/reproduction_*.md` (their headers give the command, budget and "
        "machine of each run). Per cell the most final run is shown: converged (early-stopped) before "
        "not converged, then the most epochs. **A cell marked *not converged* is not a final figure**: "
        "it is still running, or stopped and continues with the training command of its report.",
        "",
        "Paper protocol = train on train ∪ valid and select the epoch on test, as the paper's code "
        "(optimistic); clean = train on train, select on valid, report test once. The paper's figures "
        "(its public Gowalla logs) are given for Gowalla, paper protocol; it reports no others in a "
        "form given here. A *variant* changes some settings of the presets to test something; "
        "its cells are listed below the cells they vary, never in their place.",
        "",
    ]
    groups: Dict[tuple, List[Dict[str, Any]]] = {}
    variants: Dict[tuple, List[Dict[str, Any]]] = {}
    for key in sorted(
        cells,
        key=lambda k: (
            DATASETS.index(k[0]) if k[0] in DATASETS else 9,
            k[2] != "paper",
            MODELS.index(k[1]) if k[1] in MODELS else 9,
            RULES.index(k[3]) if k[3] in RULES else 99,
            k[4],
        ),
    ):
        groups.setdefault(key[:1] + key[2:3], [])
        (variants if key[4] else groups).setdefault(key[:1] + key[2:3], []).append(cells[key])
    for (ds, proto), rows in groups.items():
        lines += [f"## {ds}, {proto} protocol", ""]
        table = []
        for r in rows if rows else []:
            p = PAPER.get((r["model"], r["rule"])) if (ds == "gowalla" and proto == "paper") else None
            state = _state(r["status"])
            table.append(
                (
                    r["model"],
                    RULE_LABEL.get(r["rule"], r["rule"]),
                    fmt(r["recall@20"]),
                    f"{p[0]:.4f}" if p else "—",
                    fmt(r["ndcg@20"]),
                    f"{p[1]:.4f}" if p else "—",
                    "—" if r["best_epoch"] is None else r["best_epoch"],
                    r["epochs_run"],
                    state,
                    f"[{r['machine']}]({r['machine']}/{r['source'].name[:-4]}.md)",
                )
            )
        if table:
            lines += _common.markdown_table(
                [
                    "model",
                    "rule",
                    "Recall@20",
                    "paper",
                    "NDCG@20",
                    "paper",
                    "best epoch",
                    "epochs reached",
                    "state",
                    "report",
                ],
                table,
                align="llrrrrrrll",
            )
            lines.append("")
            lines += comparison_lines(ds, proto, rows)
        for png in sorted(results_root.glob(f"*/reproduction_*_{ds}-*-{proto}_rules.png")):
            lines.append(
                f"- Curves, Adap-τ against Adap-τ-0: [{png.parent.name}/{png.name}]"
                f"({png.parent.name}/{png.name})"
            )
        lines.append("")
        if variants.get((ds, proto)):
            lines += [
                f"Variants ({ds}, {proto} protocol): settings changed from the presets, see each report",
                "",
            ]
            lines += _common.markdown_table(
                [
                    "variant",
                    "model",
                    "rule",
                    "Recall@20",
                    "NDCG@20",
                    "best epoch",
                    "epochs reached",
                    "state",
                    "report",
                ],
                [
                    (
                        r["variant"],
                        r["model"],
                        RULE_LABEL.get(r["rule"], r["rule"]),
                        fmt(r["recall@20"]),
                        fmt(r["ndcg@20"]),
                        "—" if r["best_epoch"] is None else r["best_epoch"],
                        r["epochs_run"],
                        _state(r["status"]),
                        f"[{r['machine']}]({r['machine']}/{r['source'].name[:-4]}.md)",
                    )
                    for r in variants[(ds, proto)]
                ],
                align="lllrrrrll",
            )
            lines.append("")
    out.write_text("\n".join(lines) + "\n")
    return lines


def main(argv: Optional[List[str]] = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--datasets", default=",".join(DATASETS))
    ap.add_argument("--models", default=",".join(MODELS))
    ap.add_argument("--protocols", default=",".join(PROTOCOLS))
    ap.add_argument("--rules", default=",".join(RULES))
    ap.add_argument(
        "--only",
        default="",
        help="comma list of glob patterns on cell names "
        "<dataset>-<model>-<protocol>-<rule> (applied after the lists above)",
    )
    ap.add_argument("--epochs", type=int, default=1000, help="epoch budget per configuration")
    ap.add_argument(
        "--epochs-for",
        action="append",
        default=[],
        metavar="DATASET=E",
        help="a different epoch budget for one dataset; repeatable",
    )
    ap.add_argument("--warmup", type=int, default=None, help="Adap-τ warm-up (default min(100, epochs // 4))")
    ap.add_argument("--eval-every", type=int, default=5)
    ap.add_argument("--patience", type=int, default=10)
    ap.add_argument("--seed", type=int, default=2023)
    ap.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a setting in every run (e.g. --set lr=1e-3), or in one model's runs "
        "(--set mf.lr=1e-2); repeatable",
    )
    ap.add_argument(
        "--runs",
        default=None,
        help="folder of the run folders (default runs/reproduce, or runs/reproduce-<variant>)",
    )
    ap.add_argument("--fresh", action="store_true", help="start every selected cell over")
    ap.add_argument(
        "--resume", dest="fresh", action="store_false", help="continue/reuse run folders (default)"
    )
    ap.add_argument("--threads", type=int, default=0)
    ap.add_argument("--verbose", action="store_true", help="print every epoch line")
    ap.add_argument(
        "--out",
        default=None,
        help="the report (.md; the .csv and plots go beside it); default "
        "benchmarks/results/<machine>/reproduction_<datasets>[_<model>].md",
    )
    ap.add_argument("--note", action="append", default=[], help="a line of context for the report")
    ap.add_argument(
        "--variant",
        default="",
        help="a name for runs whose --set changes test something beside the presets (e.g. "
        "exclude-sampler; letters, digits, '.', '_' and '-'): their run folders and report get "
        "the name, and --collect lists them apart from the cells they vary",
    )
    ap.add_argument("--dry-run", action="store_true", help="list the selected cells and exit")
    ap.add_argument(
        "--collect",
        action="store_true",
        help="train nothing: gather every benchmarks/results/<machine>/reproduction_*.csv into "
        "benchmarks/results/reproduction.md, the one report",
    )
    ap.add_argument(
        "--report-only",
        action="store_true",
        help="train nothing: write the report from the run folders as they are (unfinished "
        "runs show their best evaluation so far, marked 'in progress')",
    )
    args = ap.parse_args(argv)
    if args.collect:
        out = Path(_common.RESULTS) / "reproduction.md"
        print("\n".join(collect(Path(_common.RESULTS), out)))
        print(f"wrote {out}")
        return 0
    if args.variant and not re.fullmatch(r"[A-Za-z0-9._-]+", args.variant):
        ap.error(f"--variant must be letters, digits, '.', '_' and '-', got {args.variant!r}")
    if args.runs is None:
        args.runs = "runs/reproduce" + (f"-{args.variant}" if args.variant else "")
    args.curves = []
    args.epochs_for = {k: int(v) for k, _, v in (x.partition("=") for x in args.epochs_for)}
    args.overrides = {}
    for kv in args.set:
        k, _, v = kv.partition("=")
        args.overrides[k.replace("-", "_")] = parse_value(v)
    if args.threads:
        torch.set_num_threads(args.threads)
    command, skip = [], False  # the command line for the report, without the --note texts
    for a in sys.argv[1:] if argv is None else argv:
        if skip:
            skip = False
        elif a == "--note":
            skip = True
        elif not a.startswith("--note="):
            command.append(f"'{a}'" if any(ch in a for ch in "*, ") else a)
    cells = [
        (d, m, p, r)
        for d in args.datasets.split(",")
        for m in args.models.split(",")
        for p in args.protocols.split(",")
        for r in args.rules.split(",")
    ]
    if args.only:
        pats = [p for p in args.only.split(",") if p]
        cells = [c for c in cells if any(fnmatch.fnmatch("-".join(c), p) for p in pats)]
    for c in cells:
        rule_settings(c[3])
    if args.out is None:
        args.out = default_out(cells, args.variant)
    if args.dry_run:
        print("\n".join(str(Path(args.runs) / "-".join(c)) for c in cells))
        print(f"report: {args.out}")
        return 0

    def log(msg: str) -> None:
        print(time.strftime("%H:%M:%S ") + msg, flush=True)

    t0 = time.time()
    results = []
    for d, m, p, r in cells:
        name = f"{d}-{m}-{p}-{r}"
        cfg = cell_config(d, m, p, r, args)
        folder = Path(args.runs) / name
        if args.report_only:
            history = run_history(folder)
            s = partial_summary(history, p, cfg.selection_metric)
            if (folder / "summary.json").is_file():
                done = json.loads((folder / "summary.json").read_text())
                if s is None or done.get("epochs_run", 0) >= s["epochs_run"]:
                    s = done
            if s is None:
                log(f"[{name}] no epoch in {folder} yet; left out of the report")
                continue
            from adaptau.train.plots import training_curves

            png = Path(args.out).with_name(f"{Path(args.out).stem}_{name}.png")
            training_curves(history, cfg.selection_metric, png)
            args.curves.append((name, png.name))
        else:
            s = run_cell(name, cfg, folder, args, log)
        t = s.get("test") or {}
        v = s.get("valid") or {}
        results.append(
            dict(
                dataset=d,
                model=m,
                protocol=p,
                rule=r,
                **{
                    "recall@20": t.get("recall@20"),
                    "ndcg@20": t.get("ndcg@20"),
                    "select_recall@20": v.get("recall@20"),
                    "best_epoch": s.get("best_epoch"),
                    "epochs_run": s.get("epochs_run"),
                    "status": s.get("status"),
                    "s_per_epoch": s.get("seconds_per_epoch"),
                    "lr": cfg.lr,
                    "warmup": cfg.warmup,
                    "folder": str(Path(args.runs) / name),
                },
            )
        )
        write_report(results, args, time.time() - t0, command, Path(args.out))  # after every cell
    if args.report_only:
        compare_rules(cells, args)
    if results:
        write_report(results, args, time.time() - t0, command, Path(args.out), show=True)
        print(f"wrote {args.out} and {Path(args.out).with_suffix('.csv')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
