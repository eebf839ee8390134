"""The trainer's parts on their own: Checkpointer, RunFolder, the summary, train_step.

* ``last.pt`` and ``best.pt`` round-trip through :class:`Checkpointer` (keys in their
  documented order, tensors, RNG streams, progress), and its stop sentence names the file.
* :class:`RunFolder` locks its folder, writes its files only on rank 0, and keeps a
  plotting failure out of the run.
* :func:`run_summary` / :func:`closing_lines` give summary.json's keys and the last lines.
* One :meth:`Trainer.train_step` changes the weights and returns the step's loss and rows;
  the sharded trainer keeps the epoch loop and replaces only the step.
"""

import json
import random

import numpy as np
import pytest
import torch

from adaptau.train import TrainConfig, Trainer
from adaptau.train.checkpoints import Checkpointer, CheckpointError
from adaptau.train.run_folder import RUN_FILES, RunFolder
from adaptau.train.summary import closing_lines, epoch_line, run_summary

TINY = "synthetic:num_users=240,num_items=160"
LAST_KEYS = [
    "epoch",
    "model",
    "optimizer",
    "controller",
    "rng",
    "world_size",
    "history",
    "best",
    "bad_evals",
    "train_seconds",
    "tau_snapshots",
    "config",
]


def _cfg(out, **kw):
    base = dict(
        data=TINY,
        out=str(out),
        epochs=2,
        dim=16,
        batch_size=256,
        negatives=16,
        warmup=1,
        progress="off",
        backend="reference",
    )
    base.update(kw)
    return TrainConfig(**base)


# ------------------------------------------------------------------------- Checkpointer
def test_checkpointer_round_trip(tmp_path):
    cfg = _cfg(tmp_path)
    model = torch.nn.Linear(4, 3)
    opt = torch.optim.Adam(model.parameters(), lr=0.1)
    model(torch.randn(2, 4)).sum().backward()
    opt.step()
    ckpt = Checkpointer(tmp_path, cfg)
    assert ckpt.last_good(0).startswith("No checkpoint was written")
    gens = (torch.Generator().manual_seed(1), torch.Generator().manual_seed(2))
    history = [{"epoch": 0, "loss": 1.5}, {"epoch": 1, "loss": 1.25}]
    best = {"epoch": 1, "value": 0.5, "metrics": {"recall@20": 0.5}}
    snaps = {0: torch.ones(3), 1: torch.full((3,), 2.0)}
    ckpt.save_last(
        2,
        model=model.state_dict(),
        optimizer=opt.state_dict(),
        controller={"w0": 2.0},
        generators=gens,
        world_size=1,
        history=history,
        best=best,
        bad_evals=1,
        train_seconds=3.5,
        tau_snapshots=snaps,
    )
    expected = [torch.rand(3, generator=g) for g in gens]  # the draws after the save
    np_draw, py_draw = np.random.rand(), random.random()
    ckpt.save_best(1, model=model.state_dict(), controller={"w0": 2.0}, metrics={"recall@20": 0.5})
    assert sorted(p.name for p in tmp_path.iterdir()) == ["best.pt", "last.pt"]  # no temp files

    other = torch.nn.Linear(4, 3)
    last = Checkpointer(tmp_path, cfg).load_last(other)
    assert list(last) == LAST_KEYS and last["config"]["dim"] == 16
    other.load_state_dict(last["model"])
    for a, b in zip(model.parameters(), other.parameters()):
        assert torch.equal(a, b)
    fresh = (torch.Generator().manual_seed(9), torch.Generator().manual_seed(9))
    epochs, hist, best2, bad, seconds, snaps2 = Checkpointer.restore_progress(last, *fresh)
    assert (epochs, hist, best2, bad, seconds) == (2, history, best, 1, 3.5)
    assert set(snaps2) == {0, 1} and torch.equal(snaps2[1], snaps[1])
    for g, want in zip(fresh, expected):
        assert torch.equal(torch.rand(3, generator=g), want)
    assert np.random.rand() == np_draw and random.random() == py_draw
    assert ckpt.last_good(2) == f"The last good checkpoint is {tmp_path / 'last.pt'} (after epoch 1)."

    best_pt = ckpt.load_best(other)
    assert list(best_pt) == ["epoch", "model", "controller", "metrics", "config"]
    assert best_pt["epoch"] == 1 and best_pt["metrics"] == {"recall@20": 0.5}
    with pytest.raises(CheckpointError, match="another model"):
        ckpt.load_best(torch.nn.Linear(5, 3))


def test_snapshot_epochs_are_zero_and_the_powers_of_two():
    assert [e for e in range(20) if Checkpointer.is_snapshot_epoch(e)] == [0, 1, 2, 4, 8, 16]


# ---------------------------------------------------------------------------- RunFolder
def test_run_folder_files_lock_and_ranks(tmp_path):
    cfg = _cfg(tmp_path / "run")
    echoed = []
    run = RunFolder.open(cfg, "tiny", echo=echoed.append)
    try:
        with pytest.raises(ValueError, match="in use by another adaptau run"):
            RunFolder.open(cfg, "tiny", overwrite=True)
        run.log("hello")
        recs = [{"epoch": 0, "loss": np.float32(1.5)}, {"epoch": 1, "loss": 1.0}]
        for rec in recs:
            run.append_metrics(rec)
        run.append_metrics({"epoch": 2, "loss": 0.5})
        run.rewrite_metrics(recs)
        assert run.read_summary() is None
        (run.path / "summary.json").write_text("[1, 2]")
        assert run.read_summary() is None
        run.write_summary({"status": "completed", "best_epoch": np.int64(1)})
        run.write_plots([], "recall@20", {}, None, None)  # nothing to plot: a warning, not an error
    finally:
        run.release()
    assert echoed[0] == "hello" and echoed[1].startswith("warning: plotting failed")
    assert (run.path / "train.log").read_text().splitlines() == echoed
    assert [json.loads(x) for x in (run.path / "metrics.jsonl").read_text().splitlines()] == [
        {"epoch": 0, "loss": 1.5},
        {"epoch": 1, "loss": 1.0},
    ]
    assert run.read_summary() == {"status": "completed", "best_epoch": 1}
    assert (run.path / "summary.json").read_text() == '{\n  "status": "completed",\n  "best_epoch": 1\n}'

    with pytest.raises(ValueError, match="already holds a run"):
        RunFolder.open(cfg, "tiny")
    again = RunFolder.open(cfg, "tiny", overwrite=True)  # the run's files are removed
    again.release()
    assert not [f for f in RUN_FILES if (run.path / f).exists()]

    worker = RunFolder(tmp_path / "worker", is_main=False, echo=echoed.append)
    worker.log("not shown")
    worker.write_summary({"status": "completed"})
    assert echoed[-1] != "not shown" and not (tmp_path / "worker").exists()


# ------------------------------------------------------------------------------ summary
class _Split:
    note, select_name = "clean protocol", "valid"


class _Controller:
    w0 = 2.0

    def summary(self):
        return {"w0": 2.0}


def test_summary_keys_and_closing_lines(tmp_path):
    cfg = _cfg(tmp_path, batch_size=100)
    metrics = {"recall@20": 0.25, "ndcg@20": 0.125}
    s = run_summary(
        status="completed",
        message=None,
        cfg=cfg,
        split=_Split(),
        metric="recall@20",
        best_epoch=1,
        valid=metrics,
        test=metrics,
        epochs_run=2,
        train_seconds=3.0,
        world_size=3,
        device="cpu",
        backend="cpu",
        dataset={"num_users": 240},
        controller=_Controller(),
    )
    assert list(s) == [
        "status",
        "epoch_numbering",
        "message",
        "protocol",
        "protocol_note",
        "selection_split",
        "selection_metric",
        "best_epoch",
        "valid",
        "test",
        "epochs_run",
        "seconds_per_epoch",
        "train_seconds",
        "world_size",
        "global_batch",
        "rows_per_rank",
        "device",
        "backend",
        "dataset",
        "final_w0",
        "final_tau",
    ]
    assert s["seconds_per_epoch"] == 1.5 and s["rows_per_rank"] == 34
    lines = closing_lines(s, (20,), tmp_path)
    assert lines[0] == "best epoch 1 (selected on valid by recall@20); 1.50 s/epoch, backend cpu"
    assert lines[1].splitlines()[0].split()[:3] == ["split", "recall@20", "ndcg@20"]
    assert lines[-1] == f"run folder: {tmp_path}" and len(lines) == 3
    assert closing_lines({**s, "test": None}, (20,), tmp_path) == [f"run folder: {tmp_path}"]
    rec = {
        "epoch": 3,
        "loss": 1.0,
        "w0": 2.0,
        "tau_min": 0.5,
        "tau_max": 0.5,
        "tau_median": 0.5,
        "seconds": 0.25,
        "metrics": metrics,
    }
    assert epoch_line(rec, {"epoch": 3}) == (
        "epoch    3 | loss 1.0000 | w0 2 | tau 0.5..0.5 (med 0.5) | recall@20 0.2500 ndcg@20 0.1250 * | 0.2s"
    )


# ---------------------------------------------------------------------------- the step
def test_one_train_step(tmp_path):
    trainer = Trainer(_cfg(tmp_path / "run"), log=lambda m: None)
    try:
        trainer._begin_epoch(0)
        before = [p.detach().clone() for p in trainer.model.parameters()]
        users, pos = trainer.train_users[:64], trainer.train_items[:64]
        loss, rows = trainer.train_step(users, pos)
        assert rows == 64 and loss.dtype == torch.float64 and loss.dim() == 0
        assert bool(torch.isfinite(loss)) and float(loss) > 0
        assert any(not torch.equal(a, b) for a, b in zip(before, trainer.model.parameters()))
    finally:
        trainer.run.release()


def test_the_sharded_trainer_replaces_the_step_not_the_loop():
    from adaptau.train.epoch import EpochLoop
    from adaptau.train.sharded import ShardedTrainer

    assert issubclass(ShardedTrainer, EpochLoop)
    assert "train_step" in vars(ShardedTrainer) and "_train_epoch" not in vars(ShardedTrainer)
