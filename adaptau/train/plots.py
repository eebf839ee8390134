"""PNG plots of a run (matplotlib, Agg backend): curves, τ histograms, τ vs activity."""

from __future__ import annotations

from pathlib import Path
from typing import Dict, List, Optional

import numpy as np


def _plt():
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt


def training_curves(history: List[Dict], metric: str, path: Path) -> None:
    """Loss, w₀ / τ range and the selection metric against the epoch."""
    plt = _plt()
    epochs = [h["epoch"] for h in history]
    fig, axes = plt.subplots(1, 3, figsize=(14, 3.8))
    axes[0].plot(epochs, [h["loss"] for h in history], marker=".")
    axes[0].set_title("train loss")
    axes[0].set_xlabel("epoch")
    tmed = [h.get("tau_median") for h in history]
    axes[1].plot(epochs, tmed, label="median τ")
    axes[1].fill_between(
        epochs,
        [h.get("tau_min") for h in history],
        [h.get("tau_max") for h in history],
        alpha=0.25,
        label="τ range",
    )
    axes[1].plot(epochs, [1.0 / h["w0"] if h.get("w0") else np.nan for h in history], "--", label="1/w₀")
    axes[1].set_title("temperature")
    axes[1].set_xlabel("epoch")
    axes[1].legend(fontsize=8)
    ev = [h for h in history if h.get("metrics")]
    if ev:
        keys = [k for k in ev[0]["metrics"] if k.split("@")[0] in ("recall", "ndcg")]
        for k in keys:
            axes[2].plot([h["epoch"] for h in ev], [h["metrics"][k] for h in ev], marker=".", label=k)
        axes[2].legend(fontsize=8)
    axes[2].set_title(f"selection split (early stop on {metric})")
    axes[2].set_xlabel("epoch")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def rule_comparison(histories: Dict[str, List[Dict]], metrics: List[str], title: str, path: Path) -> None:
    """Runs side by side by epoch: the training loss, τ (median line, min–max band) and each
    evaluated metric in ``metrics`` (e.g. recall@20), one panel each and one line per run.
    ``histories`` maps a label (``Adap-τ``) to a run's epoch records (``metrics.jsonl``)."""
    plt = _plt()
    panels = ["loss", "tau"] + list(metrics)
    fig, axes = plt.subplots(1, len(panels), figsize=(4.5 * len(panels), 3.8), squeeze=False)
    for ax, panel in zip(axes[0], panels):
        for k, (label, history) in enumerate(histories.items()):
            color = f"C{k}"
            if panel == "loss":
                ev = [h for h in history if "loss" in h]
                ax.plot([h["epoch"] for h in ev], [h["loss"] for h in ev], color=color, label=label)
            elif panel == "tau":
                ev = [h for h in history if "tau_median" in h]
                epochs = [h["epoch"] for h in ev]
                ax.plot(epochs, [h["tau_median"] for h in ev], color=color, label=f"{label} (median)")
                ax.fill_between(
                    epochs, [h["tau_min"] for h in ev], [h["tau_max"] for h in ev], color=color, alpha=0.2
                )
            else:
                ev = [h for h in history if panel in (h.get("metrics") or {})]
                ax.plot(
                    [h["epoch"] for h in ev],
                    [h["metrics"][panel] for h in ev],
                    marker=".",
                    color=color,
                    label=label,
                )
        ax.set_title(
            {"loss": f"{title}: training loss", "tau": f"{title}: τ (min–max band)"}.get(
                panel, f"{title}: {panel}"
            ),
            fontsize=9,
        )
        ax.set_xlabel("epoch")
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def tau_histograms(snapshots: Dict[int, np.ndarray], path: Path, max_panels: int = 4) -> None:
    """Histogram of the per-user τ = 1/β at a few epochs."""
    plt = _plt()
    epochs = sorted(snapshots)
    if len(epochs) > max_panels:
        pick = np.unique(np.linspace(0, len(epochs) - 1, max_panels).round().astype(int))
        epochs = [epochs[i] for i in pick]
    taus = {e: 1.0 / np.asarray(snapshots[e], dtype=np.float64) for e in epochs}
    lo = min(float(t.min()) for t in taus.values())
    hi = max(float(t.max()) for t in taus.values())
    if not hi > lo:
        lo, hi = lo * 0.95, hi * 1.05 + 1e-12
    bins = np.linspace(lo, hi, 61)
    fig, ax = plt.subplots(figsize=(6, 4))
    for e in epochs:
        tau = taus[e]
        if float(tau.max() - tau.min()) <= 1e-9 * max(abs(float(tau.max())), 1.0):
            ax.axvline(
                float(tau[0]),
                linestyle="--",
                color=f"C{epochs.index(e)}",
                label=f"epoch {e} (every user τ={float(tau[0]):.3g})",
            )
        else:
            ax.hist(tau, bins=bins, histtype="step", color=f"C{epochs.index(e)}", label=f"epoch {e}")
    ax.set_xlabel("per-user temperature τ")
    ax.set_ylabel("users")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def tau_vs_activity(
    user_scale: np.ndarray, activity: np.ndarray, path: Path, epoch: Optional[int] = None
) -> None:
    """Scatter of each user's τ against their number of train interactions."""
    plt = _plt()
    tau = 1.0 / np.asarray(user_scale, dtype=np.float64)
    act = np.asarray(activity, dtype=np.float64)
    keep = act > 0
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.scatter(act[keep], tau[keep], s=3, alpha=0.3)
    ax.set_xscale("log")
    ax.set_xlabel("train interactions of the user")
    ax.set_ylabel("τ")
    ax.set_title("τ against user activity" + (f" (epoch {epoch})" if epoch is not None else ""))
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def run_plots(history, metric: str, tau_snapshots, user_scale, activity, out) -> None:
    """A run folder's plots: ``curves.png`` (from the epoch records), ``tau_hist.png`` (the
    per-user temperatures at the snapshot epochs and at the end) and ``tau_activity.png``."""
    from pathlib import Path

    out = Path(out)
    if history:
        training_curves(history, metric, out / "curves.png")
    snaps = dict(tau_snapshots)
    snaps[history[-1]["epoch"] if history else 0] = user_scale
    tau_histograms({k: v.numpy() for k, v in snaps.items()}, out / "tau_hist.png")
    tau_vs_activity(
        user_scale.numpy(), activity, out / "tau_activity.png", history[-1]["epoch"] if history else None
    )
