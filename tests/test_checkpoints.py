"""Checkpoints hold tensors and plain values only, and never hold NaN weights.

* A crafted pickle in a run folder is refused (``weights_only=True``), in one line.
* A corrupt or truncated checkpoint is a one-line error naming the file.
* ``--lr inf`` stops the run with exit status 3 on every CPU backend, and ``last.pt`` /
  ``best.pt`` keep finite weights.
* Resuming after a stop reproduces the uninterrupted run (the numpy RNG state survives the
  plain-value format).
"""

import json
import pickle

import pytest
import torch

import adaptau
from adaptau.train import cli
from adaptau.train.checkpoints import CheckpointError, load_checkpoint

TINY = "synthetic:num_users=240,num_items=160"
BASE = [
    "--data",
    TINY,
    "--dim",
    "16",
    "--batch-size",
    "256",
    "--negatives",
    "16",
    "--warmup",
    "1",
    "--progress",
    "off",
]
CPU_BACKENDS = [b for b in adaptau.available_backends("cpu") if b != "triton"]


class _Payload:
    def __reduce__(self):
        return (exec, ("import pathlib; pathlib.Path('PWNED').write_text('x')",))


def test_a_crafted_pickle_is_refused(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    run = tmp_path / "run"
    assert cli.main(["train", *BASE, "--epochs", "1", "--out", str(run)]) == 0
    with open(run / "best.pt", "wb") as f:
        pickle.dump({"model": _Payload()}, f)
    with pytest.raises(CheckpointError, match="best.pt"):
        load_checkpoint(run / "best.pt")
    capsys.readouterr()
    assert cli.main(["eval", "--run", str(run)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "best.pt" in err[0] and "cannot be read" in err[0]
    assert not (tmp_path / "PWNED").exists()


@pytest.mark.parametrize("content", [b"", b"not a checkpoint at all", None])
def test_corrupt_checkpoints_are_one_line_errors(tmp_path, content):
    path = tmp_path / "last.pt"
    if content is None:  # a real checkpoint, truncated
        torch.save({"model": {"w": torch.randn(100, 100)}}, path)
        path.write_bytes(path.read_bytes()[:3000])
    else:
        path.write_bytes(content)
    with pytest.raises(CheckpointError) as info:
        load_checkpoint(path)
    assert str(path) in str(info.value) and "\n" not in str(info.value)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_infinite_lr_stops_with_status_3_and_finite_checkpoints(tmp_path, backend, capsys):
    run = tmp_path / "run"
    assert (
        cli.main(["train", *BASE, "--epochs", "3", "--lr", "inf", "--backend", backend, "--out", str(run)])
        == 3
    )
    assert "non-finite" in capsys.readouterr().err
    for name in ("last.pt", "best.pt"):
        if (run / name).exists():
            ckpt = load_checkpoint(run / name)
            for key, value in ckpt["model"].items():
                assert torch.isfinite(value).all(), (name, key)
    assert json.loads((run / "summary.json").read_text())["status"] == "diverged"


def test_resume_equals_an_uninterrupted_run(tmp_path):
    whole, part = tmp_path / "whole", tmp_path / "part"
    assert cli.main(["train", *BASE, "--epochs", "3", "--out", str(whole)]) == 0
    assert cli.main(["train", *BASE, "--epochs", "2", "--out", str(part)]) == 0
    assert cli.main(["train", "--resume", str(part), "--epochs", "3"]) == 0
    a = load_checkpoint(whole / "last.pt")["model"]
    b = load_checkpoint(part / "last.pt")["model"]
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_a_used_folder_is_refused_unless_resumed_or_overwritten(tmp_path, capsys):
    run = tmp_path / "run"
    assert cli.main(["train", *BASE, "--epochs", "2", "--out", str(run)]) == 0
    capsys.readouterr()
    assert cli.main(["train", *BASE, "--epochs", "1", "--out", str(run)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "already holds a run" in err[0] and "--resume" in err[0]
    epochs = [json.loads(line)["epoch"] for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert epochs == [0, 1]  # untouched
    (run / ".last.pt.tmp-99999").write_bytes(b"partial")  # as a run killed mid-write leaves
    assert cli.main(["train", *BASE, "--epochs", "1", "--out", str(run), "--overwrite"]) == 0
    epochs = [json.loads(line)["epoch"] for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert epochs == [0] and not (run / ".last.pt.tmp-99999").exists()


def test_a_running_folder_is_locked(tmp_path):
    from adaptau.train.run_folder import RunLock

    run = tmp_path / "run"
    run.mkdir()
    held = RunLock(run)
    try:
        with pytest.raises(ValueError, match="in use by another adaptau run"):
            RunLock(run)
        assert cli.main(["train", *BASE, "--epochs", "1", "--out", str(run)]) == 2
    finally:
        held.release()
    RunLock(run).release()  # free again once released


def _tiny_cfg(out, **kw):
    from adaptau.train import TrainConfig

    base = dict(
        data=TINY,
        out=str(out),
        epochs=2,
        dim=16,
        batch_size=256,
        negatives=16,
        warmup=1,
        lr=0.05,
        progress="off",
        backend=CPU_BACKENDS[0],
    )  # cpu when built
    base.update(kw)
    return TrainConfig(**base)


def test_sparse_adagrad_equals_dense_adagrad(tmp_path):
    """Adagrad leaves a row whose gradient is zero exactly as it is, so sparse gradients
    (--sparse-grad adagrad: touched rows only) and dense ones give the same run."""
    from adaptau.train import Trainer

    sparse = Trainer(_tiny_cfg(tmp_path / "sparse", sparse_grad="adagrad"), log=lambda m: None)
    s = sparse.fit()
    dense = Trainer(_tiny_cfg(tmp_path / "dense"), log=lambda m: None)
    dense.optimizer = torch.optim.Adagrad(dense.model.parameters(), lr=0.05)
    d = dense.fit()
    for (name, a), b in zip(sparse.model.state_dict().items(), dense.model.state_dict().values()):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5, msg=name)
    assert abs(s["test"]["recall@20"] - d["test"]["recall@20"]) <= 1e-3


def test_sparse_adam_run_resumes_exactly(tmp_path):
    flags = [*BASE, "--sparse-grad"]
    whole, part = tmp_path / "whole", tmp_path / "part"
    assert cli.main(["train", *flags, "--epochs", "3", "--out", str(whole)]) == 0
    assert cli.main(["train", *flags, "--epochs", "2", "--out", str(part)]) == 0
    assert cli.main(["train", "--resume", str(part), "--epochs", "3"]) == 0
    a = load_checkpoint(whole / "last.pt")
    b = load_checkpoint(part / "last.pt")
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])
    assert json.loads((whole / "config.json").read_text())["sparse_grad"] == "sparse-adam"


def test_sparse_grad_is_for_mf(tmp_path, capsys):
    assert (
        cli.main(["train", *BASE, "--model", "lightgcn", "--sparse-grad", "--out", str(tmp_path / "r")]) == 2
    )
    assert "--sparse-grad is for MF" in capsys.readouterr().err


def test_another_models_checkpoint_is_refused(tmp_path, capsys):
    mf, lgcn = tmp_path / "mf", tmp_path / "lgcn"
    assert cli.main(["train", *BASE, "--epochs", "1", "--out", str(mf)]) == 0
    assert cli.main(["train", *BASE, "--epochs", "1", "--model", "lightgcn", "--out", str(lgcn)]) == 0
    for name in ("best.pt", "last.pt"):
        (mf / name).write_bytes((lgcn / name).read_bytes())
    capsys.readouterr()
    assert cli.main(["eval", "--run", str(mf)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "written for another model" in err[0] and "model='lightgcn'" in err[0]
    assert cli.main(["train", "--resume", str(mf), "--epochs", "2"]) == 2
    assert "written for another model" in capsys.readouterr().err
