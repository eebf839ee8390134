"""Data-parallel training: 2 gloo processes on the CPU against a 1-process run.

Tolerance: the 2-rank run sees exactly the 1-rank run's global batches and negatives
(shared seed and negative stream, rows sliced per rank, DDP averages the gradients), so it
differs only by floating-point summation order, which Adam's per-coordinate normalization
amplifies for near-zero gradients: after 2 epochs the parameters agree to 2e-3 and the
ranking metrics (Recall@20, NDCG@20) to 1e-3, absolute. The ranks among themselves must agree
exactly (bit for bit): same all-reduced gradients, same Adam, same all-reduced Adap-τ stats.
"""

import json
import os
import pathlib
import subprocess
import sys

import pytest
import torch

import adaptau
from conftest import metrics_close, train_in_one_process
from adaptau.train import distributed as dist

REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]
TINY = "synthetic:num_users=200,num_items=150"
BACKEND = adaptau.available_backends("cpu")[0]

pytestmark = pytest.mark.skipif(
    not (torch.distributed.is_available() and torch.distributed.is_gloo_available()),
    reason="torch.distributed with gloo is not available",
)

WORKER = r"""
import json, sys
import torch
from adaptau.train import distributed as dist
from adaptau.train import Trainer, TrainConfig

torch.set_num_threads(1)
cfg = TrainConfig(**json.loads(sys.argv[1]))
trainer = Trainer(cfg, log=lambda msg: None)
summary = trainer.fit()
rank, world = dist.rank_and_world()
torch.save({"params": {k: v.detach().cpu().clone() for k, v in trainer.model.state_dict().items()},
            "scale": trainer.controller.user_scale.cpu().clone(), "w0": trainer.controller.w0,
            "world": world, "summary": summary}, f"{cfg.out}/rank{rank}.pt")
dist.shutdown()
"""


def _env():
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")
    env["PYTHONPATH"] = str(REPO_ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(k, None)
    return env


def _settings(out, **kw):
    s = dict(
        data=TINY,
        out=str(out),
        epochs=2,
        dim=16,
        batch_size=128,
        negatives=16,
        warmup=1,
        lr=0.01,
        dropout=0.0,
        progress="off",
        backend=BACKEND,
        patience=0,
    )
    s.update(kw)
    return s


def test_two_ranks_identical_and_match_one_process(tmp_path):
    """torchrun with 2 gloo workers: identical ranks; metrics as the 1-process run."""
    settings = _settings(tmp_path / "ddp")
    worker = tmp_path / "worker.py"
    worker.write_text(WORKER)
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            "--nproc-per-node=2",
            str(worker),
            json.dumps(settings),
        ],
        cwd=tmp_path,
        env=_env(),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    r0 = torch.load(tmp_path / "ddp" / "rank0.pt", weights_only=False)
    r1 = torch.load(tmp_path / "ddp" / "rank1.pt", weights_only=False)
    assert r0["world"] == r1["world"] == 2
    for name, p in r0["params"].items():  # bit-identical replicas
        assert torch.equal(p, r1["params"][name]), name
    assert torch.equal(r0["scale"], r1["scale"]) and r0["w0"] == r1["w0"]
    assert r0["scale"].std() > 0  # the adaptive scales really are per-user after 2 epochs

    summary = json.loads((tmp_path / "ddp" / "summary.json").read_text())
    assert summary["world_size"] == 2 and summary["global_batch"] == 128
    assert r1["summary"] == {}  # only rank 0 reports
    assert not any(p.name.startswith("rank1") and p.suffix != ".pt" for p in (tmp_path / "ddp").iterdir())

    single, single_summary = train_in_one_process(_settings(tmp_path / "single"))
    assert single_summary["world_size"] == 1
    for name, p in single.model.state_dict().items():
        diff = float((p - r0["params"][name]).abs().max())
        assert diff <= 2e-3, (name, diff)
    assert torch.allclose(single.controller.user_scale, r0["scale"], rtol=1e-3)
    assert metrics_close(single_summary["valid"], summary["valid"], 1e-3), (
        single_summary["valid"],
        summary["valid"],
    )
    assert metrics_close(single_summary["test"], summary["test"], 1e-3)


def test_cli_nproc_lightgcn_in_batch(tmp_path):
    """`adaptau train --nproc 2` (torch.distributed.run): LightGCN with global in-batch
    negatives trains like the 1-process run."""
    out = tmp_path / "cli"
    args = [
        "--data",
        TINY,
        "--model",
        "lightgcn",
        "--layers",
        "2",
        "--sampler",
        "in-batch",
        "--epochs",
        "1",
        "--dim",
        "16",
        "--batch-size",
        "128",
        "--warmup",
        "1",
        "--lr",
        "0.01",
        "--progress",
        "off",
        "--backend",
        BACKEND,
        "--out",
        str(out),
    ]
    proc = subprocess.run(
        [sys.executable, "-m", "adaptau", "train", "--nproc", "2", *args],
        cwd=tmp_path,
        env=_env(),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "world size 2" in proc.stdout
    summary = json.loads((out / "summary.json").read_text())
    assert summary["world_size"] == 2 and summary["rows_per_rank"] == 64
    _, single = train_in_one_process(
        _settings(tmp_path / "single", model="lightgcn", layers=2, sampler="in-batch", epochs=1, dropout=0.0)
    )
    assert metrics_close(single["valid"], summary["valid"], 1e-3), (single["valid"], summary["valid"])


def test_global_in_batch_negatives_reproduce_in_batch_loss():
    """Per-rank explicit negatives (other rows of the global batch) give the in-batch loss."""
    g = torch.Generator().manual_seed(0)
    b, n, d, world = 10, 7, 5, 3
    user = torch.randn(b, d, generator=g, dtype=torch.float64)
    items = torch.randn(n, d, generator=g, dtype=torch.float64)
    pos = torch.randint(n, (b,), generator=g)  # duplicates included on purpose
    scale = torch.rand(b, generator=g, dtype=torch.float64) + 1
    whole = adaptau.softmax_loss(user, items, pos, None, 2.0, scale, reduction="none", backend="reference")
    for rank in range(world):
        rows = torch.arange(rank, b, world)
        neg = dist.global_in_batch_negatives(pos, rows)
        assert neg.shape == (rows.numel(), b - 1)
        part = adaptau.softmax_loss(
            user[rows], items, pos[rows], neg, 2.0, scale[rows], reduction="none", backend="reference"
        )
        torch.testing.assert_close(part, whole[rows])


def test_launch_rejects_bad_nproc():
    with pytest.raises(ValueError):
        dist.launch([], 0)
    assert dist.rank_and_world() == (0, 1)
    assert dist.broadcast_object("x") == "x"
