"""TorchRec row-wise sharded tables (``adaptau train --shard-tables row-wise``).

Reference run: the 1-process, unsharded MF with ``--sparse-grad adagrad`` (torch.optim.Adagrad
on sparse gradients). The sharded runs use TorchRec's fused EXACT_ADAGRAD, the same update
(eps 1e-10, no initial accumulator) applied to the same touched rows, on the same global
batches and negatives, from the same initial tables; so a 2-rank sharded run differs from it
only by floating-point summation order (rows split over ranks, gradients summed across the
all-to-all), and its Recall@20 / NDCG@20 agree to 1e-3. TorchRec's CPU kernels have no fused
Adam, so the comparison is not made against the default dense Adam.

The tests that run TorchRec are skipped, saying why, only where torchrec or fbgemm's
kernels cannot be imported.
"""

import json
import os
import pathlib
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

import adaptau
from conftest import metrics_close, train_in_one_process
from adaptau.train import TrainConfig, Trainer

REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]
BACKEND = adaptau.available_backends("cpu")[0]
TINY = "synthetic:num_users=120,num_items=90"


def _torchrec_error():
    try:
        from adaptau.train.sharded import require_torchrec

        require_torchrec()
    except ImportError as exc:
        return str(exc)
    return None


_MISSING = _torchrec_error()
needs_torchrec = pytest.mark.skipif(_MISSING is not None, reason=f"torchrec not importable: {_MISSING}")


def _env():
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")
    env["PYTHONPATH"] = str(REPO_ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(k, None)
    return env


def _torchrun(tmp_path, script: str, *args: str, timeout=150):
    path = tmp_path / "worker.py"
    path.write_text(script)
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            "--nproc-per-node=2",
            str(path),
            *args,
        ],
        cwd=tmp_path,
        env=_env(),
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]


# ------------------------------------------------------------------ 2 ranks, Last.fm
TRAIN_WORKER = r"""
import json, sys
import torch
from adaptau.train import distributed as dist
from adaptau.train import Trainer, TrainConfig

torch.set_num_threads(1)
cfg = TrainConfig(**json.loads(sys.argv[1]))
trainer = Trainer(cfg, log=lambda msg: None)
tables = trainer.tables
info = {"class": type(trainer).__name__, "blocks": tables.blocks,
        "local": {t: list(tables.local_rows(t).shape) for t in ("user", "item")},
        "plan": {t: tables.shard_rows(t) for t in ("user", "item")},
        "world": dist.rank_and_world()[1]}
summary = trainer.fit()
info["w0"] = trainer.controller.w0
info["scale"] = trainer.controller.user_scale.tolist()
with open(f"{cfg.out}/rank{dist.rank_and_world()[0]}.json", "w") as fh:
    json.dump(info, fh)
dist.shutdown()
"""


@pytest.mark.slow
@needs_torchrec
def test_two_ranks_row_wise_lastfm_match_one_process(tmp_path):
    """torchrun, 2 gloo ranks, row-wise: each rank holds half of each table, and 2 epochs on
    Last.fm end within 1e-3 Recall@20 / NDCG@20 of the 1-process unsharded run."""
    data = pathlib.Path(os.environ.get("ADAPTAU_DATA") or REPO_ROOT.parent / "shared" / "data") / "lastfm"
    if not (data / "train.txt").is_file():
        pytest.skip(f"Last.fm not found under {data.parent} (set ADAPTAU_DATA)")
    settings = dict(
        data=str(data),
        epochs=2,
        warmup=1,
        dim=32,
        batch_size=2048,
        negatives=64,
        lr=0.05,
        progress="off",
        backend=BACKEND,
        patience=0,
        sparse_grad="adagrad",
    )
    out = tmp_path / "sharded"
    _torchrun(tmp_path, TRAIN_WORKER, json.dumps({**settings, "out": str(out), "shard_tables": "row-wise"}))
    ranks = [json.loads((out / f"rank{r}.json").read_text()) for r in (0, 1)]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["world_size"] == 2 and summary["global_batch"] == 2048
    for r, info in enumerate(ranks):
        assert info["class"] == "ShardedTrainer" and info["world"] == 2
        for t, n in (("user", summary["dataset"]["num_users"]), ("item", summary["dataset"]["num_items"])):
            half = -(-n // 2)  # rows ⌈n/2⌉ on rank 0, the rest on rank 1
            want = [0, half] if r == 0 else [half, n - half]
            assert info["blocks"][t] == want, (t, info["blocks"][t], want)
            assert info["local"][t] == [want[1], 32]
            assert info["plan"][t] == [[0, half], [half, n - half]]
    assert ranks[0]["w0"] == ranks[1]["w0"] and ranks[0]["scale"] == ranks[1]["scale"]

    single, single_summary = train_in_one_process({**settings, "out": str(tmp_path / "single")})
    assert type(single) is Trainer and single_summary["world_size"] == 1
    assert metrics_close(single_summary["valid"], summary["valid"], 1e-3), (
        single_summary["valid"],
        summary["valid"],
    )
    assert metrics_close(single_summary["test"], summary["test"], 1e-3), (
        single_summary["test"],
        summary["test"],
    )
    assert abs(single.controller.w0 - ranks[0]["w0"]) <= 1e-3 * single.controller.w0
    # the checkpoints are a plain MF's: the unsharded evaluation reads the sharded run's best.pt
    best = adaptau.train.evaluate_run(str(out), log=lambda msg: None)
    assert metrics_close(best["valid"], summary["valid"], 1e-9)


# -------------------------------------------------------------- CLI, resume, refusals
@needs_torchrec
def test_cli_nproc_sharded_and_resume(tmp_path):
    """`adaptau train --nproc 2 --shard-tables row-wise` runs; its last.pt resumes in one
    process (the tables and the fused optimizer state are gathered whole), and a 1-process
    sharded run resumed after 1 epoch ends bit-identical to one run straight through."""
    common = [
        "--data",
        TINY,
        "--dim",
        "8",
        "--batch-size",
        "64",
        "--negatives",
        "8",
        "--warmup",
        "1",
        "--lr",
        "0.05",
        "--progress",
        "off",
        "--backend",
        BACKEND,
        "--shard-tables",
        "row-wise",
        "--sparse-grad",
        "adagrad",
        "--patience",
        "0",
    ]
    out = tmp_path / "cli"
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "adaptau",
            "train",
            "--nproc",
            "2",
            *common,
            "--epochs",
            "1",
            "--out",
            str(out),
        ],
        cwd=tmp_path,
        env=_env(),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "world size 2" in proc.stdout and "TorchRec row-wise over 2 rank(s)" in proc.stdout
    ckpt = torch.load(out / "last.pt", weights_only=True)
    fused = ckpt["optimizer"]["torchrec_fused"]
    assert fused["emb_optim"] == "EXACT_ADAGRAD"
    assert fused["state"]["item.momentum1"].shape == ckpt["model"]["item.weight"].shape
    assert float(fused["state"]["item.momentum1"].abs().sum()) > 0

    base = dict(
        data=TINY,
        dim=8,
        batch_size=64,
        negatives=8,
        warmup=1,
        lr=0.05,
        progress="off",
        backend=BACKEND,
        shard_tables="row-wise",
        sparse_grad="adagrad",
        patience=0,
    )

    def run(folder, epochs, resume=None):  # in this process: a 1-rank group
        cfg = TrainConfig(**base, epochs=epochs, out=str(folder))
        assert type(Trainer(cfg, resume=resume, log=lambda m: None).fit()) is dict
        assert not torch.distributed.is_initialized()  # the trainer's own group is gone

    run(out, 2, resume=str(out))  # the 2-rank checkpoint continues in one process
    assert json.loads((out / "summary.json").read_text())["epochs_run"] == 2
    run(tmp_path / "straight", 2)
    run(tmp_path / "split", 1)
    run(tmp_path / "split", 2, resume=str(tmp_path / "split"))
    a = torch.load(tmp_path / "straight" / "last.pt", weights_only=True)
    b = torch.load(tmp_path / "split" / "last.pt", weights_only=True)
    for name in a["model"]:
        assert torch.equal(a["model"][name], b["model"][name]), name
    for name, value in a["optimizer"]["torchrec_fused"]["state"].items():
        assert torch.equal(value, b["optimizer"]["torchrec_fused"]["state"][name]), name
    assert a["history"][-1]["loss"] == b["history"][-1]["loss"]


@needs_torchrec
def test_checkpoints_of_the_other_kind_are_refused(tmp_path):
    """A sharded last.pt does not resume without --shard-tables, nor an unsharded one with it."""
    from adaptau.train.checkpoints import CheckpointError

    base = dict(
        data=TINY, dim=8, batch_size=64, negatives=8, progress="off", backend=BACKEND, sparse_grad="adagrad"
    )
    for first, second in (("row-wise", "off"), ("off", "row-wise")):
        out = tmp_path / first
        Trainer(TrainConfig(**base, shard_tables=first, epochs=1, out=str(out)), log=lambda m: None).fit()
        with pytest.raises(CheckpointError, match="--shard-tables"):
            Trainer(
                TrainConfig(**base, shard_tables=second, epochs=2, out=str(out)),
                resume=str(out),
                log=lambda m: None,
            )
        assert not torch.distributed.is_initialized()


def _cli_error(tmp_path, *args):
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "adaptau",
            "train",
            "--data",
            TINY,
            "--epochs",
            "1",
            "--progress",
            "off",
            "--out",
            str(tmp_path / "x"),
            *args,
        ],
        cwd=tmp_path,
        env=_env(),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 2, proc.stdout + proc.stderr
    lines = [ln for ln in proc.stderr.splitlines() if ln.startswith("adaptau train: error:")]
    assert len(lines) == 1, proc.stderr
    return lines[0]


def test_shard_tables_refusals(tmp_path):
    """One clear line each: LightGCN, no fused optimizer named, an unknown sharding."""
    line = _cli_error(
        tmp_path, "--model", "lightgcn", "--shard-tables", "row-wise", "--sparse-grad", "adagrad"
    )
    assert "--shard-tables is for MF" in line
    line = _cli_error(tmp_path, "--shard-tables", "row-wise")
    assert "--sparse-grad adagrad" in line
    with pytest.raises(ValueError, match="--shard-tables must be one of"):
        TrainConfig(shard_tables="column-wise").validate()


@needs_torchrec
def test_fused_adam_refused_on_cpu(tmp_path):
    line = _cli_error(
        tmp_path, "--shard-tables", "row-wise", "--sparse-grad", "sparse-adam", "--device", "cpu"
    )
    assert "no fused Adam" in line and "--sparse-grad adagrad" in line


def test_missing_torchrec_says_how_to_install(monkeypatch):
    from adaptau.train import sharded

    monkeypatch.setitem(sys.modules, "torchrec", None)  # import torchrec -> ImportError
    with pytest.raises(sharded.TorchRecMissing, match=r"pip install .*\[torchrec\].*--no-deps torchrec"):
        sharded.require_torchrec()
    with pytest.raises(ValueError, match="needs TorchRec"):  # the CLI prints it as one line
        sharded.require_torchrec()


def test_import_adaptau_does_not_import_torchrec():
    code = (
        "import sys, adaptau, adaptau.train, adaptau.train.cli; "
        "assert 'torchrec' not in sys.modules and 'fbgemm_gpu' not in sys.modules"
    )
    subprocess.run([sys.executable, "-c", code], env=_env(), check=True, timeout=60)


# ------------------------------------------------------ whole-table Adap-τ quantities
GAP_WORKER = r"""
import sys
import torch
import torch.distributed as td
from adaptau import AdapTau
from adaptau.loss.temperature import mean_normalized_rows

td.init_process_group("gloo")
rank = td.get_rank()
ref = torch.load(sys.argv[1])
users, items = ref["users"], ref["items"]
ustart, istart = (0, 0) if rank == 0 else (ref["usplit"], ref["isplit"])
uend, iend = (ref["usplit"], ref["isplit"]) if rank == 0 else (users.shape[0], items.shape[0])
ctl = AdapTau(ref["pair_users"], ref["pair_items"], num_users=users.shape[0], num_items=items.shape[0])
e_bar = mean_normalized_rows(items[istart:iend])
gap = ctl.sharded_alignment_gap(users[ustart:uend], ustart, items[istart:iend], istart)
torch.save({"e_bar": e_bar, "gap": gap}, f"{sys.argv[2]}/rank{rank}.pt")
td.destroy_process_group()
"""


def test_sharded_mean_item_vector_and_gap_equal_unsharded(tmp_path):
    """Per-shard sums, all-reduced over 2 gloo ranks with uneven blocks, give the unsharded
    mean normalized item vector ē and alignment gap p̄ − ā (to float64 rounding)."""
    g = torch.Generator().manual_seed(3)
    num_users, num_items = 23, 17
    users = torch.randn(num_users, 6, generator=g)
    items = torch.randn(num_items, 6, generator=g) * torch.rand(num_items, 1, generator=g) * 5
    pair_users = torch.randint(num_users, (200,), generator=g)
    pair_items = torch.randint(num_items, (200,), generator=g)
    torch.save(
        {
            "users": users,
            "items": items,
            "pair_users": pair_users,
            "pair_items": pair_items,
            "usplit": 9,
            "isplit": 11,
        },
        tmp_path / "ref.pt",
    )
    _torchrun(tmp_path, GAP_WORKER, str(tmp_path / "ref.pt"), str(tmp_path), timeout=90)
    ctl = adaptau.AdapTau(pair_users, pair_items, num_users=num_users, num_items=num_items)
    want_e = F.normalize(items.double(), dim=-1).mean(0)
    want_gap = ctl._alignment_gap(users, items)
    for r in (0, 1):
        got = torch.load(tmp_path / f"rank{r}.pt")
        torch.testing.assert_close(got["e_bar"], want_e, rtol=0, atol=1e-12)
        assert abs(got["gap"] - want_gap) <= 1e-12, (got["gap"], want_gap)
    # and without a process group the blocks are the whole tables
    assert abs(ctl.sharded_alignment_gap(users, 0, items, 0) - want_gap) <= 1e-12
