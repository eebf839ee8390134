"""The trainer and the CLI: run folder, resume equivalence, divergence, eval, bench, lastfm."""

import json
import os
import pathlib
import subprocess
import sys
import time
import warnings

import pytest
import torch

import adaptau
from adaptau.train import cli
from adaptau.train import PRESETS, Trainer, TrainConfig

REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]
TINY = "synthetic:num_users=240,num_items=160"


def shared_data_dir() -> pathlib.Path:
    env = os.environ.get("ADAPTAU_DATA")
    return pathlib.Path(env) if env else REPO_ROOT.parent / "shared" / "data"


def tiny_cfg(out, **kw):
    base = dict(
        data=TINY,
        out=str(out),
        epochs=2,
        dim=16,
        batch_size=256,
        negatives=16,
        warmup=1,
        lr=0.01,
        dropout=0.1,
        progress="off",
        backend="reference",
    )
    base.update(kw)
    return TrainConfig(**base)


def quiet(msg):
    pass


@pytest.fixture(autouse=True)
def _quiet_single_thread():
    """No fallback warnings; one thread (tiny shapes: thread start-up and barriers dominate,
    and a loaded 2-core CI box makes multi-threaded scatter ops 100x slower)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        yield
    torch.set_num_threads(threads)


def test_run_folder_contents(tmp_path):
    out = tmp_path / "run"
    summary = Trainer(tiny_cfg(out, sampler="exclude"), log=quiet).fit()
    for name in (
        "config.json",
        "metrics.jsonl",
        "last.pt",
        "best.pt",
        "summary.json",
        "train.log",
        "curves.png",
        "tau_hist.png",
        "tau_activity.png",
    ):
        assert (out / name).is_file(), name
    s = json.loads((out / "summary.json").read_text())
    assert s == json.loads(json.dumps(summary))
    for key in ("best_epoch", "valid", "test", "seconds_per_epoch", "world_size", "dataset", "backend"):
        assert key in s
    assert s["world_size"] == 1 and s["backend"] == "reference" and s["status"] == "completed"
    for key in ("recall@20", "ndcg@20", "precision@20", "hit@20", "arp@20", "coverage@20", "tail@20"):
        assert key in s["valid"] and key in s["test"]
    assert s["dataset"]["num_users"] == 240
    lines = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in lines] == [0, 1]
    assert {"loss", "w0", "tau_min", "tau_max", "seconds", "metrics"} <= set(lines[0])
    assert not list(out.glob(".*tmp*"))  # atomic writes leave no temp files


@pytest.mark.parametrize("model, sampler", [("mf", "uniform"), ("lightgcn", "in-batch")])
def test_resume_equals_straight_run(tmp_path, model, sampler):
    kw = dict(model=model, sampler=sampler, layers=2)
    straight = Trainer(tiny_cfg(tmp_path / "a", epochs=4, **kw), log=quiet)
    straight.fit()
    Trainer(tiny_cfg(tmp_path / "b", epochs=2, **kw), log=quiet).fit()
    resumed = Trainer(tiny_cfg(tmp_path / "b", epochs=4, **kw), resume=str(tmp_path / "b"), log=quiet)
    assert resumed.start_epoch == 2
    resumed.fit()

    def strip(history):
        return [{k: v for k, v in h.items() if k not in ("seconds", "eval_seconds")} for h in history]

    assert strip(resumed.history) == strip(straight.history)
    for (k, a), b in zip(straight.model.state_dict().items(), resumed.model.state_dict().values()):
        assert torch.equal(a, b), k
    sa = json.loads((tmp_path / "a" / "summary.json").read_text())
    sb = json.loads((tmp_path / "b" / "summary.json").read_text())
    assert sa["best_epoch"] == sb["best_epoch"] and sa["test"] == sb["test"]
    assert len((tmp_path / "b" / "metrics.jsonl").read_text().splitlines()) == 4


def test_non_finite_loss_stops_and_keeps_checkpoint(tmp_path, monkeypatch):
    real = adaptau.softmax_loss
    calls = {"n": 0}

    def flaky(*args, **kwargs):
        calls["n"] += 1
        loss, raw = real(*args, **kwargs)
        if calls["n"] > 2:  # tiny set: 1 step per epoch at batch 256 x ~2 steps
            loss = loss * float("nan")
        return loss, raw

    monkeypatch.setattr(adaptau, "softmax_loss", flaky)
    out = tmp_path / "nan"
    cfg = tiny_cfg(out, epochs=5, batch_size=4096)  # one step per epoch
    messages = []
    summary = Trainer(cfg, log=messages.append).fit()
    assert summary["status"] == "diverged"
    assert "non-finite training loss" in summary["message"]
    assert any("STOPPED" in m for m in messages)
    ckpt = torch.load(out / "last.pt", weights_only=False)
    assert ckpt["epoch"] == 2  # the two good epochs
    assert all(torch.isfinite(v).all() for v in ckpt["model"].values())


@pytest.mark.parametrize("tau, stop_epoch", [("global", 3), ("adaptive", 3), ("fixed", 1)])
def test_patience_does_not_count_warm_up_evaluations(tmp_path, monkeypatch, tau, stop_epoch):
    # A metric that only gets worse: the first evaluation stays the best. With patience 1
    # the run stops at the first evaluation that counts, i.e. right after the warm-up
    # (epochs 0-2) for the Adap-τ rules, and at epoch 1 for a fixed τ (no warm-up).
    scores = iter([0.5, 0.4, 0.3, 0.2, 0.1, 0.05, 0.02, 0.01])
    monkeypatch.setattr(
        Trainer, "evaluate", lambda self, split="select": {"recall@20": next(scores), "ndcg@20": 0.0}
    )
    cfg = tiny_cfg(tmp_path / tau, tau=tau, warmup=3, epochs=8, eval_every=1, patience=1, batch_size=4096)
    summary = Trainer(cfg, log=quiet).fit()
    assert summary["status"] == "early-stopped"
    history = [json.loads(line) for line in open(tmp_path / tau / "metrics.jsonl")]
    assert history[-1]["epoch"] == stop_epoch
    assert summary["best_epoch"] == 0


def test_paper_protocol_says_so(tmp_path):
    messages = []
    summary = Trainer(
        tiny_cfg(tmp_path / "p", protocol="paper", epochs=1, tau="global"), log=messages.append
    ).fit()
    assert summary["selection_split"] == "test" and summary["valid"] == summary["test"]
    assert any("selected on TEST" in m for m in messages)
    assert any("paper protocol" in m for m in messages)


# ------------------------------------------------------------------------------------ CLI
def test_cli_config_flags_eval_resume(tmp_path, capsys):
    conf = tmp_path / "c.yaml"
    conf.write_text("dim: 8\nepochs: 5\nnegatives: 8\ntau: fixed\ntau_value: 0.2\n")
    out = tmp_path / "run"
    rc = cli.main(
        [
            "train",
            "--data",
            TINY,
            "--config",
            str(conf),
            "--epochs",
            "1",
            "--out",
            str(out),
            "--backend",
            "reference",
            "--batch-size",
            "512",
            "--no-normalize",
            "--progress",
            "off",
            "--topk",
            "5,20",
        ]
    )
    assert rc == 0
    saved = json.loads((out / "config.json").read_text())
    assert saved["dim"] == 8 and saved["epochs"] == 1 and saved["tau"] == "fixed"
    assert saved["normalize"] is False and saved["topk"] == [5, 20]
    text = capsys.readouterr().out
    assert "recall@5" in text and "test" in text
    assert cli.main(["eval", "--run", str(out)]) == 0
    ev = json.loads((out / "eval.json").read_text())
    assert ev["metrics"]["test"]["recall@20"] == pytest.approx(
        json.loads((out / "summary.json").read_text())["test"]["recall@20"]
    )
    assert cli.main(["train", "--resume", str(out), "--epochs", "2"]) == 0
    assert len((out / "metrics.jsonl").read_text().splitlines()) == 2


def test_cli_json_config_and_preset():
    parser = cli.build_parser()
    ns = parser.parse_args(["train", "--preset", "gowalla-mf-paper", "--lr", "0.5"])
    cfg = cli.resolve_config(ns)
    assert cfg.lr == 0.5 and cfg.negatives == 1024 and cfg.protocol == "paper"
    assert cfg.base == 0.9 and cfg.smoothing == 0.25 and cfg.dropout == 0.1 and cfg.warmup == 100
    ns = parser.parse_args(["train", "--preset", "gowalla-lightgcn-paper"])
    cfg = cli.resolve_config(ns)
    assert cfg.model == "lightgcn" and cfg.sampler == "in-batch" and cfg.rank == "dot"
    assert set(PRESETS) == {"gowalla-mf-paper", "gowalla-lightgcn-paper"}


def test_cli_errors(tmp_path, capsys):
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "train.txt").write_text("0 1\n1 two\n")
    (bad / "test.txt").write_text("0 2\n")
    assert cli.main(["train", "--data", str(bad), "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert "train.txt:2" in err and "'two'" in err
    conf = tmp_path / "c.json"
    conf.write_text(json.dumps({"learning_rate": 1}))
    assert cli.main(["train", "--config", str(conf)]) == 2
    assert "unknown setting 'learning_rate'" in capsys.readouterr().err
    assert cli.main(["eval", "--run", str(tmp_path / "nothing")]) == 2


def test_cli_bench(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(cli, "find_bench_script", lambda: None)
    assert cli.main(["bench"]) == 2
    assert "bench_kernels.py not found" in capsys.readouterr().err
    script = tmp_path / "bench_kernels.py"
    script.write_text("import sys, pathlib\npathlib.Path(sys.argv[1]).write_text(' '.join(sys.argv[2:]))\n")
    monkeypatch.setattr(cli, "find_bench_script", lambda: script)
    assert cli.main(["bench", str(tmp_path / "o.txt"), "--quick"]) == 0
    assert (tmp_path / "o.txt").read_text() == "--quick"


def test_python_dash_m():
    r = subprocess.run(
        [sys.executable, "-m", "adaptau", "train", "--help"], capture_output=True, text=True, timeout=120
    )
    assert r.returncode == 0 and "--tau-value" in r.stdout and "--preset" in r.stdout


# --------------------------------------------------------------------------- real data
@pytest.mark.slow
def test_lastfm_beats_popularity(tmp_path):
    """MF + Adap-τ on Last.fm beats the popularity baseline's Recall@20 (0.1077) clearly."""
    folder = shared_data_dir() / "lastfm"
    if not (folder / "train.txt").is_file():
        pytest.skip(f"real data not found at {folder} (set ADAPTAU_DATA)")
    if "cpu" not in adaptau.available_backends("cpu"):
        pytest.skip("no fused CPU backend built: the reference backend needs several minutes here")
    torch.set_num_threads(max(1, os.cpu_count() or 1))
    t0 = time.time()
    cfg = TrainConfig(
        data=str(folder),
        out=str(tmp_path / "lastfm"),
        epochs=5,
        warmup=2,
        lr=0.01,
        negatives=128,
        batch_size=1024,
        progress="off",
        patience=0,
    )
    summary = Trainer(cfg, log=quiet).fit()
    assert summary["test"]["recall@20"] > 0.18, summary["test"]  # popularity: 0.1077
    assert time.time() - t0 < 240


@pytest.mark.parametrize("sampler", ["popularity", "shared"])
def test_csv_data_other_samplers_and_id_maps(tmp_path, sampler):
    rng = torch.Generator().manual_seed(0)
    lines = ["user_id,item_id"]
    for u in range(60):
        for i in torch.randperm(40, generator=rng)[:10].tolist():
            lines.append(f"u{u},i{i}")
    f = tmp_path / "inter.csv"
    f.write_text("\n".join(lines) + "\n")
    out = tmp_path / "run"
    summary = Trainer(tiny_cfg(out, data=str(f), sampler=sampler, epochs=1), log=quiet).fit()
    assert summary["status"] == "completed"
    assert (out / "users.tsv").read_text().splitlines()[:2] == ["index\tid", "0\tu0"]
    assert (out / "items.tsv").is_file()


@pytest.mark.parametrize("neg_kind", ["per_row", "per_row_int32", "shared", "in_batch"])
def test_direct_l2_gradient_matches_autograd(neg_kind):
    # The trainer adds the sampled L2 term's gradient to .grad directly (no graph); value and
    # gradient must equal l2 · sampled_l2 through autograd. float64: exact up to rounding.
    from adaptau.train.models import add_sampled_l2_grad_
    from adaptau.train.models import sampled_l2

    g = torch.Generator().manual_seed(5)
    n_users, n_items, d, b, m = 13, 29, 6, 7, 5
    user_w = torch.randn(n_users, d, generator=g, dtype=torch.float64)
    item_w = torch.randn(n_items, d, generator=g, dtype=torch.float64)
    users = torch.randint(0, n_users, (b,), generator=g)
    users[1] = users[0]  # duplicates
    pos = torch.randint(0, n_items, (b,), generator=g)
    neg = {
        "per_row": torch.randint(0, n_items, (b, m), generator=g),
        "per_row_int32": torch.randint(0, n_items, (b, m), generator=g, dtype=torch.int32),
        "shared": torch.randint(0, n_items, (m,), generator=g),
        "in_batch": None,
    }[neg_kind]
    l2 = 0.37
    Ua, Ia = user_w.clone().requires_grad_(), item_w.clone().requires_grad_()
    want = l2 * sampled_l2(Ua, Ia, users, pos, neg)
    want.backward()
    Ud, Id = user_w.clone().requires_grad_(), item_w.clone().requires_grad_()
    value = add_sampled_l2_grad_(l2, users, pos, neg, Ud, Id)
    assert value == pytest.approx(float(want.detach()), rel=1e-12)
    torch.testing.assert_close(Ud.grad, Ua.grad, rtol=1e-12, atol=1e-15)
    torch.testing.assert_close(Id.grad, Ia.grad, rtol=1e-12, atol=1e-15)


def _glibc() -> bool:
    import platform

    return sys.platform == "linux" and platform.libc_ver()[0] == "glibc"


_FAULTS_SCRIPT = """
import json, resource, torch
from adaptau.train import keep_freed_heap

def faults(cycles):
    f0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(cycles):
        block = torch.empty(8 << 20, dtype=torch.uint8)
        block.fill_(1)
        del block
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - f0

ok_default = keep_freed_heap(128 << 10, 128 << 10)  # glibc's static defaults
faults(1)
baseline = faults(8)
ok_kept = keep_freed_heap()
faults(1)  # maps the block once
kept = faults(8)
print(json.dumps(dict(ok=ok_default and ok_kept, baseline=baseline, kept=kept)))
"""


@pytest.mark.skipif(not _glibc(), reason="keep_freed_heap tunes glibc's malloc (mallopt)")
def test_keep_freed_heap_stops_refaulting_freed_blocks():
    """With glibc's default thresholds a freed 8 MiB block is unmapped and faulted in again
    on the next allocation (2048 pages); with keep_freed_heap it is reused. Counts minor page
    faults (getrusage), not time, in a fresh interpreter: malloc's state is process-wide, and
    a heap that other tests left large would serve the block without mmap at all."""
    out = subprocess.run(
        [sys.executable, "-c", _FAULTS_SCRIPT], capture_output=True, text=True, timeout=120, check=True
    )
    res = json.loads(out.stdout.strip().splitlines()[-1])
    assert res["ok"]
    # 8 cycles of 2048 pages each by default (fewer with transparent huge pages always on)
    assert res["baseline"] >= 8, res
    assert res["kept"] <= max(8, res["baseline"] // 8), res


def test_threads_flag_sets_torch_threads_and_summary_names_the_epoch_base(tmp_path):
    from adaptau.train import cli

    before = torch.get_num_threads()
    try:
        assert (
            cli.main(
                [
                    "train",
                    "--data",
                    "synthetic:num_users=240,num_items=160",
                    "--dim",
                    "8",
                    "--batch-size",
                    "256",
                    "--negatives",
                    "8",
                    "--epochs",
                    "1",
                    "--threads",
                    "1",
                    "--progress",
                    "off",
                    "--out",
                    str(tmp_path / "run"),
                ]
            )
            == 0
        )
        assert torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(before)
    assert json.loads((tmp_path / "run" / "config.json").read_text())["threads"] == 1
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["best_epoch"] == 0 and "count from 0" in summary["epoch_numbering"]


@pytest.mark.parametrize("sampler", ["in-batch", "uniform", "popularity"])
def test_lightgcn_steps_on_the_batch_rows_equal_steps_on_the_whole_tables(tmp_path, sampler, monkeypatch):
    """LightGCN's training step propagates the last layer to the batch's rows only (forced
    here: the tiny graph's batches hold most of its non-zeros); two epochs of it against the
    same run on the whole tables: the same losses and weights (float32 rounding: 1e-5)."""
    from adaptau.train import models

    monkeypatch.setattr(models, "ROW_BLOCK_MAX_SHARE", 1.0)
    calls = []
    real_apply = models._PropagatedRows.apply
    monkeypatch.setattr(models._PropagatedRows, "apply", lambda *a: calls.append(1) or real_apply(*a))
    kw = dict(model="lightgcn", sampler=sampler, layers=2, epochs=2)
    rows = Trainer(tiny_cfg(tmp_path / "rows", **kw), log=quiet)
    assert rows.item_rows_only
    whole = Trainer(tiny_cfg(tmp_path / "whole", **kw), log=quiet)
    whole.item_rows_only = False
    rows.fit()
    assert calls, "the steps did not run on the batch's rows"
    whole.fit()
    for a, b in zip(rows.history, whole.history):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-5)
    for (k, a), b in zip(rows.model.state_dict().items(), whole.model.state_dict().values()):
        assert torch.isfinite(a).all() and torch.allclose(a, b, rtol=1e-4, atol=1e-5), k
