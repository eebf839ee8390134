"""The end of a run and what it reports: :func:`finish_run` (the best epoch evaluated on
test, ``summary.json``, the plots, the closing log lines), :func:`finished_run` (a resumed
run with nothing left to train), the content of ``summary.json`` (:func:`run_summary`) and
the log line of each epoch (:func:`epoch_line`)."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

from .evaluate import format_metrics

__all__ = ["finish_run", "finished_run", "evaluate_best", "run_summary", "closing_lines", "epoch_line"]


def epoch_line(rec: Dict[str, Any], best: Optional[Dict[str, Any]]) -> str:
    """The log line of one epoch's record (``*`` marks the best evaluation)."""
    parts = [
        f"epoch {rec['epoch']:4d}",
        f"loss {rec['loss']:.4f}",
        f"w0 {rec['w0']:.3g}",
        f"tau {rec['tau_min']:.3g}..{rec['tau_max']:.3g} (med {rec['tau_median']:.3g})",
    ]
    if "metrics" in rec:
        m = rec["metrics"]
        shown = [k for k in m if k.split("@")[0] in ("recall", "ndcg")]
        parts.append(
            " ".join(f"{k} {m[k]:.4f}" for k in shown)
            + (" *" if best and best["epoch"] == rec["epoch"] else "")
        )
    parts.append(f"{rec['seconds']:.1f}s")
    return " | ".join(parts)


def run_summary(
    *,
    status: str,
    message: Optional[str],
    cfg,
    split,
    metric: str,
    best_epoch: Optional[int],
    valid: Optional[Dict[str, float]],
    test: Optional[Dict[str, float]],
    epochs_run: int,
    train_seconds: float,
    world_size: int,
    device: str,
    backend: str,
    dataset: Dict[str, Any],
    controller,
) -> Dict[str, Any]:
    """The content of ``summary.json``.

    Args:
        status: ``"completed"``, ``"early-stopped"`` or ``"diverged"``.
        message: why the run stopped when it diverged, else None.
        cfg: the run's :class:`~adaptau.train.config.TrainConfig`.
        split: the :class:`~adaptau.train.data.Split` trained on.
        metric: the selection metric (``"recall@20"``, …).
        best_epoch, valid, test: the best evaluation's epoch, its metrics on the selection
            split and on test (None when nothing was evaluated).
        epochs_run, train_seconds: epochs trained (resumed runs: in all) and their seconds.
        world_size, device, backend: where the run trained.
        dataset: the dataset's statistics (``Dataset.stats()``).
        controller: the :class:`~adaptau.AdapTau` at the end of the run.
    """
    return {
        "status": status,
        "epoch_numbering": "epochs count from 0: best_epoch 0 is the first epoch",
        "message": message,
        "protocol": cfg.protocol,
        "protocol_note": split.note,
        "selection_split": split.select_name,
        "selection_metric": metric,
        "best_epoch": best_epoch,
        "valid": valid,
        "test": test,
        "epochs_run": epochs_run,
        "seconds_per_epoch": train_seconds / max(1, epochs_run),
        "train_seconds": train_seconds,
        "world_size": world_size,
        "global_batch": cfg.batch_size,
        "rows_per_rank": -(-cfg.batch_size // world_size),
        "device": device,
        "backend": backend,
        "dataset": dataset,
        "final_w0": float(controller.w0),
        "final_tau": controller.summary(),
    }


def closing_lines(summary: Dict[str, Any], topk, out: Path) -> List[str]:
    """The log lines that end a run: the best epoch and its metrics table (when one was
    evaluated), a note under the paper protocol, and the run folder."""
    lines = []
    if summary["test"] is not None:
        select = summary["selection_split"]
        rows = {select: summary["valid"]}
        if select != "test":
            rows["test"] = summary["test"]
        lines.append(
            f"best epoch {summary['best_epoch']} (selected on {select} by "
            f"{summary['selection_metric']}); {summary['seconds_per_epoch']:.2f} s/epoch, "
            f"backend {summary['backend']}"
        )
        lines.append(format_metrics(rows, topk))
        if summary["protocol"] == "paper":
            lines.append("NOTE: paper protocol — the epoch was selected on the test split.")
    lines.append(f"run folder: {out}")
    return lines


def evaluate_best(trainer) -> Tuple[Dict[str, float], Dict[str, float]]:
    """``best.pt``'s selection metrics and its test metrics (the selection metrics again
    when the selection split is test); the model's current weights are put back."""
    model = trainer.model
    ckpt = trainer.checkpoints.load_best(model)
    current = {k: v.clone() for k, v in model.state_dict().items()}
    model.load_state_dict(ckpt["model"])
    valid = ckpt["metrics"]
    test = trainer.evaluate("test") if trainer.split.select_name != "test" else dict(valid)
    model.load_state_dict(current)
    return valid, test


def finish_run(trainer, ds_stats: Dict[str, Any], stopped: Optional[str]) -> Dict[str, Any]:
    """The end of a :class:`~adaptau.train.Trainer`'s run, on rank 0: the best epoch
    evaluated on test (:func:`evaluate_best`), ``summary.json``, the plots and the closing
    log lines. Returns the summary (``{}`` on other ranks). ``ds_stats``: the dataset's
    statistics; ``stopped``: why the run diverged, else None."""
    if not trainer.is_main:
        return {}
    best_epoch = valid = test = None
    if trainer.stopping.best is not None:
        best_epoch = trainer.stopping.best["epoch"]
        valid, test = evaluate_best(trainer)
    summary = run_summary(
        status=trainer.status,
        message=stopped,
        cfg=trainer.cfg,
        split=trainer.split,
        metric=trainer.metric,
        best_epoch=best_epoch,
        valid=valid,
        test=test,
        epochs_run=len(trainer.history),
        train_seconds=trainer.train_seconds,
        world_size=trainer.world_size,
        device=str(trainer.device),
        backend=trainer.backend_used,
        dataset=ds_stats,
        controller=trainer.controller,
    )
    trainer.run.write_summary(summary)
    trainer.run.write_plots(
        trainer.history,
        trainer.metric,
        trainer.tau_snapshots,
        trainer.controller.user_scale.cpu(),
        trainer.activity,
    )
    for line in closing_lines(summary, trainer.cfg.topk, trainer.out):
        trainer.log(line)
    return summary


def finished_run(trainer, ds_stats: Dict[str, Any]) -> Dict[str, Any]:
    """A resumed run whose budget is spent (or that stopped early): nothing is trained, and
    its ``summary.json`` is kept as it is (written anew by :func:`finish_run` only when it
    is missing). Returns the summary (``{}`` on ranks other than 0)."""
    trainer.status = "completed" if trainer.start_epoch >= trainer.cfg.epochs else "early-stopped"
    summary = trainer.run.read_summary()
    if summary is None:
        return finish_run(trainer, ds_stats, None)
    trainer.log(
        f"{trainer.out} has finished ({summary.get('status', trainer.status)} after "
        f"{trainer.start_epoch} epochs): nothing to train; raise --epochs (or --patience) "
        "to continue it"
    )
    return summary if trainer.is_main else {}


def opening_lines(trainer) -> List[str]:
    """The log lines that open a new run: the data, the protocol and the settings."""
    cfg = trainer.cfg
    lines = []
    lines.append(f"adaptau train: {trainer.dataset!r}")
    for note in trainer.dataset.notes:
        lines.append(f"  note: {note}")
    lines.append(f"  {trainer.split.note}")
    lines.append(
        f"  model {cfg.model} dim {cfg.dim}, tau {cfg.tau}, sampler {cfg.sampler}"
        f" ({cfg.negatives if cfg.sampler != 'in-batch' else cfg.batch_size - 1} neg),"
        f" batch {cfg.batch_size}, lr {cfg.lr}, l2 {cfg.l2}, {len(trainer.batches)} steps/epoch,"
        f" device {trainer.device}, world size {trainer.world_size} -> {trainer.out}"
    )
    if trainer.heap_kept:
        lines.append(
            "  host memory: freed heap blocks are kept for reuse (keep_freed_heap;"
            " ADAPTAU_KEEP_FREED_HEAP=0 turns it off)"
        )
    if not cfg.normalize and cfg.tau != "fixed":
        lines.append(
            "  note: --no-normalize with --tau adaptive/global multiplies raw dot products "
            "by w0; the usual inner-product baseline is --tau fixed --tau-value 1"
        )
    return lines
