"""The hostile probe: what a user who means harm, or who is merely careless, can hand adaptau.

Four parts, each a table or a loop of cases:

* **Operator fuzz.** Valid calls of ``softmax_loss`` mutated at random: indices out of range
  (``N``, ``-1``, ``2**31``, ``2**40``), index tensors of the wrong dtype, NaN and infinity in
  vectors, scales and logQ, scales from 0 to 1e38, zero vectors, duplicates, accidental hits,
  non-contiguous views, odd sizes, every negative mode and option. On every CPU backend a
  case must either raise the same ``ValueError`` / ``TypeError`` / ``IndexError`` as the
  float64 reference (before any kernel runs), or give the reference's loss and gradients:
  NaN where it has NaN, the same infinities, finite values within ``rtol = 1e-7`` and
  ``atol = 1e-7 * max(1, max|reference|) + 64 ε c`` for the loss and ``+ 64 ε c s ‖x‖`` for
  the gradients, where ε is float64's epsilon, s the largest scale and c the largest logit
  magnitude: a logit's rounding (ε c) moves a softmax probability by as much, and a
  gradient by that times s and a row norm, which matters only at inverse temperatures
  near 1e8. Float64 throughout; the gradient rows of zero vectors, which divide by the norm
  epsilon, are compared before that division.
* **Data and config cases.** Each bad file, setting or flag makes ``adaptau train`` /
  ``adaptau eval`` exit with status 2 and exactly one line on stderr that names the key,
  flag or file (and line), never a traceback; the values a user means are taken as meant.
* **Kill and resume.** A run killed with SIGKILL a few times at random moments (``os.fsync``
  slowed so that kills land inside checkpoint writes) and resumed each time ends with the
  same weights, bit for bit, as an uninterrupted run, and leaves no temp file.
* **Full disk.** On a 1 MiB tmpfs a run stops with one line naming the file, leaves no temp
  file and an intact previous checkpoint; with room made, ``--resume`` finishes it with the
  uninterrupted run's weights. Skipped, saying why, where tmpfs cannot be mounted.
"""

import json
import random
import re
import signal
import subprocess
import sys
import time

import pytest
import torch

import adaptau
from adaptau.loss._contract import NORM_EPS
from adaptau.train import cli
from adaptau.train.checkpoints import load_checkpoint

CPU_BACKENDS = [b for b in adaptau.available_backends("cpu") if b != "triton"]
FUZZ_CASES = 150
ACCEPTED_ERRORS = (ValueError, TypeError, IndexError)


# ------------------------------------------------------------------------- operator fuzz
def _valid_call(rng: random.Random):
    B, N, D, M = rng.randint(2, 9), rng.randint(1, 30), rng.choice([1, 2, 3, 8, 17]), rng.randint(1, 7)
    mode = rng.choice(["per_row", "shared", "in_batch"])
    g = torch.Generator().manual_seed(rng.randrange(2**31))
    user = torch.randn(B, D, generator=g, dtype=torch.float64)
    items = torch.randn(N, D, generator=g, dtype=torch.float64)
    pos = torch.randint(0, N, (B,), generator=g)
    neg = {
        "per_row": torch.randint(0, N, (B, M), generator=g),
        "shared": torch.randint(0, N, (M,), generator=g),
        "in_batch": None,
    }[mode]
    scale = rng.choice([0.5, 5.0, 20.0])
    opts = dict(
        include_pos=rng.random() < 0.5,
        normalize=rng.random() < 0.8,
        remove_accidental_hits=rng.random() < 0.3,
        reduction=rng.choice(["none", "mean", "sum"]),
    )
    if rng.random() < 0.3:
        opts["neg_logq"] = torch.randn(N if mode != "in_batch" else B, generator=g, dtype=torch.float64)
    return dict(user=user, items=items, pos=pos, neg=neg, pos_scale=scale, neg_scale=scale, opts=opts)


def _mutate(call, rng: random.Random) -> str:
    """Apply one hostile change to ``call`` in place; returns its name."""
    B, N = call["user"].shape[0], call["items"].shape[0]
    kind = rng.choice(
        ["index", "index_dtype", "nonfinite", "scale", "zero", "duplicates", "hits", "strided", "none"]
    )
    if kind == "index":
        target = rng.choice(["pos", "neg"]) if call["neg"] is not None else "pos"
        bad = rng.choice([N, N + 1, -1, 2**31 - 1, 2**31, -(2**31), 2**40, -(2**40)])
        flat = call[target].clone().view(-1)
        flat[rng.randrange(flat.numel())] = bad
        call[target] = flat.view(call[target].shape)
        if rng.random() < 0.3 and -(2**31) <= bad < 2**31:
            call[target] = call[target].to(torch.int32)
    elif kind == "index_dtype":
        target = rng.choice(["pos", "neg"]) if call["neg"] is not None else "pos"
        call[target] = call[target].to(rng.choice([torch.int16, torch.uint8, torch.float32, torch.bool]))
    elif kind == "nonfinite":
        value = rng.choice([float("nan"), float("inf"), -float("inf")])
        where = rng.choice(["user", "items", "scale", "logq"])
        if where in ("user", "items"):
            t = call[where].clone()
            t[rng.randrange(t.shape[0]), rng.randrange(t.shape[1])] = value
            call[where] = t
        elif where == "scale":
            call[rng.choice(["pos_scale", "neg_scale"])] = value
        else:
            size = N if call["neg"] is not None else B
            logq = torch.zeros(size, dtype=torch.float64)
            logq[rng.randrange(size)] = value
            call["opts"]["neg_logq"] = logq
    elif kind == "scale":
        value = rng.choice([0.0, -1.0, 1e-30, 1e4, 1e8, 1e8 * (1 + 1e-6), 1e10, 1e38])
        if rng.random() < 0.5:
            call[rng.choice(["pos_scale", "neg_scale"])] = value
        else:
            t = torch.full((B,), 2.0, dtype=torch.float64)
            t[rng.randrange(B)] = value
            call["neg_scale"] = t
    elif kind == "zero":
        where = rng.choice(["user", "items"])
        t = call[where].clone()
        t[rng.randrange(t.shape[0])] = 0.0
        call[where] = t
    elif kind == "duplicates":
        call["pos"] = torch.full_like(call["pos"], int(call["pos"][0]))
        if call["neg"] is not None:
            call["neg"] = torch.full_like(call["neg"], int(call["pos"][0]))
    elif kind == "hits":
        if call["neg"] is not None and call["neg"].dim() == 2:
            call["neg"] = call["neg"].clone()
            call["neg"][:, 0] = call["pos"]
        call["opts"]["remove_accidental_hits"] = True
    elif kind == "strided":
        call["user"] = torch.cat([call["user"], call["user"]], 1)[:, ::2]
        call["items"] = call["items"].t().contiguous().t()
    return kind


def _run(call, backend):
    u = call["user"].clone().requires_grad_(True)
    t = call["items"].clone().requires_grad_(True)
    try:
        loss = adaptau.softmax_loss(
            u,
            t,
            call["pos"],
            call["neg"],
            call["pos_scale"],
            call["neg_scale"],
            backend=backend,
            **call["opts"],
        )
        loss.sum().backward()
    except ACCEPTED_ERRORS as exc:
        return type(exc)
    grads = [g if g is not None else torch.zeros_like(x) for g, x in ((u.grad, u), (t.grad, t))]
    return loss.detach(), *grads


def _finite_max(t) -> float:
    finite = t[torch.isfinite(t)]
    return float(finite.max()) if finite.numel() else 0.0


def _close(got, ref, call):
    """The loss and both gradients agree. A zero-vector row's gradient is ``g_hat / NORM_EPS``
    (the derivative of ``x / max(||x||, eps)`` at 0), which amplifies the rounding of ``g_hat``
    by 1e12: such rows are compared as ``g_hat``, i.e. multiplied by NORM_EPS."""
    got, ref = list(got), list(ref)
    norms = []
    for k, x in ((1, call["user"]), (2, call["items"])):
        n = x.norm(dim=1)
        norms.append(1.0 if call["opts"]["normalize"] else _finite_max(n))
        if call["opts"]["normalize"]:
            zero = (n <= NORM_EPS).unsqueeze(1)
            got[k], ref[k] = (torch.where(zero, t * NORM_EPS, t) for t in (got[k], ref[k]))
    scales = [torch.as_tensor(call[k], dtype=torch.float64).abs() for k in ("pos_scale", "neg_scale")]
    s_max = max(_finite_max(t) for t in scales)
    c = s_max * norms[0] * norms[1]  # the largest logit magnitude
    conditioning = [c, c * s_max * max(1.0, *norms), c * s_max * max(1.0, *norms)]
    for a, b, cond in zip(got, ref, conditioning):
        atol = 1e-7 * max(1.0, _finite_max(b.abs())) + 64 * torch.finfo(torch.float64).eps * cond
        torch.testing.assert_close(a, b, rtol=1e-7, atol=atol, equal_nan=True)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_operator_fuzz_raises_or_matches_the_reference(seed, backend):
    rng = random.Random(seed)
    kinds = {}
    for case in range(FUZZ_CASES):
        call = _valid_call(rng)
        kind = _mutate(call, rng)
        ref = _run(call, "reference")
        got = _run(call, backend)
        where = f"case {case} ({kind}; opts {call['opts'].keys()})"
        if isinstance(ref, type):
            assert got is ref, f"{where}: the reference raises {ref.__name__}, {backend} gives {got}"
            kinds[kind + " raised"] = kinds.get(kind + " raised", 0) + 1
        else:
            assert not isinstance(got, type), (
                f"{where}: {backend} raises {got.__name__}, the reference does not"
            )
            try:
                _close(got, ref, call)
            except AssertionError as exc:
                raise AssertionError(f"{where}: {backend} differs from the reference: {exc}") from None
            kinds[kind] = kinds.get(kind, 0) + 1
    assert sum(kinds.values()) == FUZZ_CASES and len(kinds) >= 8, kinds  # the mutations were exercised


# ---------------------------------------------------------------- data and config cases
TINY = "synthetic:num_users=240,num_items=160"
FAST = ["--dim", "16", "--batch-size", "256", "--negatives", "16", "--warmup", "1", "--progress", "off"]


def _lightgcn(folder, train, test):
    folder.mkdir()
    (folder / "train.txt").write_bytes(train)
    (folder / "test.txt").write_bytes(test)
    return str(folder)


def _files(tmp, case):
    """The files a case needs, written under ``tmp``; returns its CLI arguments."""
    run = str(tmp / "run")
    if case.startswith("bytes:"):
        (tmp / "c.yaml").write_bytes(case[6:].encode("latin-1"))
        return ["train", "--data", TINY, "--config", str(tmp / "c.yaml"), "--out", run]
    if case.startswith("yaml:"):
        (tmp / "c.yaml").write_text(case[5:].replace("; ", "\n") + "\n")
        return ["train", "--data", TINY, "--config", str(tmp / "c.yaml"), "--out", run]
    if case.startswith("flag:"):
        return ["train", "--data", TINY, *FAST, "--epochs", "1", *case[5:].split(), "--out", run]
    data = {
        "huge item id": (b"0 1 2\n1 0 2000000000\n2 1\n", b"0 1\n1 2\n2 0\n"),
        "non-UTF-8 data": (b"0 1 2\n1 0\n2 \xff\xfe 1\n", b"0 1\n"),
        "id 1_0": (b"0 1_0 2\n1 0\n", b"0 1\n"),
        "id +7": (b"0 +7 2\n1 0\n", b"0 1\n"),
        "non-ASCII digit id": ("0 \u0663 2\n1 0\n".encode(), b"0 1\n"),
    }
    if case in data:
        return ["train", "--data", _lightgcn(tmp / "d", *data[case]), *FAST, "--out", run]
    # run-folder cases: a finished run, then damage
    assert cli.main(["train", "--data", TINY, *FAST, "--epochs", "1", "--out", run]) == 0
    target = {
        "corrupt config.json": "config.json",
        "empty checkpoint": "best.pt",
        "corrupt checkpoint": "best.pt",
        "config.json a list": "config.json",
    }[case]
    content = {
        "corrupt config.json": b'{"epochs": 1, "dim": ',
        "empty checkpoint": b"",
        "corrupt checkpoint": b"PK\x03\x04 not really a zip",
        "config.json a list": b"[1, 2]",
    }[case]
    (tmp / "run" / target).write_bytes(content)
    return ["eval", "--run", run] if target.endswith(".pt") else ["train", "--resume", run]


BAD = [
    # (case, fragment of the one line)
    ("yaml:epochs: true", "epochs: expected an integer, got True"),
    ("yaml:normalize: maybe", "normalize: expected true or false"),
    ("yaml:dim: abc", "dim: expected an integer"),
    ("yaml:topk: [10, x]", "topk: expected a list of integers"),
    ("yaml:lr: [1, 2]", "lr: expected a number"),
    ("yaml:learning_rate: 0.1", "unknown setting 'learning_rate'"),
    ("bytes:a: b: c\n", "c.yaml:1: not valid YAML: mapping values are not allowed here"),
    ("bytes:lr: \xff\xfe\n", "c.yaml: not UTF-8 text"),
    ("bytes:- 1\n- 2\n", "c.yaml: expected a mapping of settings, got list"),
    ("flag:--metric recall@50", "--metric 'recall@50'"),
    ("flag:--metric auc@20", "--metric 'auc@20'"),
    ("flag:--device foo", "--device 'foo'"),
    ("flag:--init-std -1", "--init-std must be a finite number in (0, inf)"),
    ("flag:--pop-gamma nan --sampler popularity", "--pop-gamma must be a finite number"),
    ("flag:--l2 nan", "--l2 must be a finite number in [0, inf)"),
    ("flag:--valid-fraction 1.5", "--valid-fraction must be a finite number in (0, 1)"),
    ("flag:--seed 1180591620717411303424", "--seed must be an integer in [0, 2**62]"),
    ("flag:--seed -1", "--seed must be an integer"),
    ("flag:--dropout 1", "--dropout must be a finite number in [0, 1)"),
    ("flag:--patience -1", "--patience must be >= 0"),
    ("huge item id", "train.txt:2: item id 2000000000 would make a table of 2,000,000,001 rows"),
    ("non-UTF-8 data", "train.txt:3: not UTF-8 text"),
    ("id 1_0", "train.txt:1: item id '1_0'"),
    ("id +7", "train.txt:1: item id '+7'"),
    ("non-ASCII digit id", "train.txt:1: item id"),
    ("corrupt config.json", "config.json: not a readable run config"),
    ("config.json a list", "config.json: not a run config"),
    ("empty checkpoint", "best.pt: cannot be read"),
    ("corrupt checkpoint", "best.pt: cannot be read"),
]


@pytest.mark.parametrize("case,fragment", BAD, ids=[c[0] for c in BAD])
def test_bad_data_and_settings_are_one_line_errors(tmp_path, monkeypatch, capsys, case, fragment):
    monkeypatch.chdir(tmp_path)
    argv = _files(tmp_path, case)
    capsys.readouterr()
    assert cli.main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and fragment in err[0], err


def test_settings_are_taken_as_meant(tmp_path, monkeypatch):
    """YAML reads ``1e-3`` (no dot) as a string and ``"no"`` stays a string: both are meant."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "c.yaml").write_text('lr: 1e-3\nnormalize: "no"\nepochs: "1"\ntopk: 10,20\n')
    assert cli.main(["train", "--data", TINY, "--config", "c.yaml", *FAST, "--out", "run"]) == 0
    saved = json.loads((tmp_path / "run" / "config.json").read_text())
    assert (saved["lr"], saved["normalize"], saved["epochs"], saved["topk"]) == (1e-3, False, 1, [10, 20])


def test_a_csv_header_of_other_names_is_not_an_interaction(tmp_path):
    from adaptau.train.data import load_dataset

    (tmp_path / "train.csv").write_text("customer,song\nalice,s1\nbob,s2\nalice,s2\ncarol,s1\n")
    (tmp_path / "test.csv").write_text("Customer_ID,Songs\nalice,s3\nbob,s1\n")
    ds = load_dataset(str(tmp_path))
    assert list(ds.user_ids) == ["alice", "bob", "carol"] and list(ds.item_ids) == ["s1", "s2", "s3"]


def test_a_finished_run_resumed_keeps_its_summary(tmp_path, capsys):
    run = tmp_path / "run"
    assert cli.main(["train", "--data", TINY, *FAST, "--epochs", "2", "--out", str(run)]) == 0
    before = (run / "summary.json").read_bytes()
    capsys.readouterr()
    assert cli.main(["train", "--resume", str(run)]) == 0
    assert "nothing to train" in capsys.readouterr().out
    assert (run / "summary.json").read_bytes() == before
    assert json.loads(before)["backend"] in adaptau.available_backends("cpu")


def test_the_stop_message_names_the_step_and_an_existing_checkpoint(tmp_path, capsys):
    run = tmp_path / "run"
    assert cli.main(["train", "--data", TINY, *FAST, "--epochs", "2", "--lr", "inf", "--out", str(run)]) == 3
    line = capsys.readouterr().err.strip().splitlines()[-1]
    assert re.search(r"at epoch 0, step [1-9]\d* of [1-9]\d*:", line), line
    assert "No checkpoint was written" in line and not (run / "last.pt").exists()


# ---------------------------------------------------------------------- kill and resume
SLOW_FSYNC = (
    "import os, sys, time\n"
    "real = os.fsync\n"
    "os.fsync = lambda fd: (time.sleep(0.05), real(fd))[1]\n"
    "from adaptau.train.cli import main\n"
    "sys.exit(main(sys.argv[1:]))\n"
)
KILL_ARGS = [
    "train",
    "--data",
    "synthetic:num_users=400,num_items=300",
    "--dim",
    "16",
    "--batch-size",
    "128",
    "--negatives",
    "16",
    "--warmup",
    "1",
    "--epochs",
    "6",
    "--progress",
    "off",
    "--backend",
    CPU_BACKENDS[0],
]


def _cli(args, **kw):
    return subprocess.Popen(
        [sys.executable, "-c", SLOW_FSYNC, *args], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, **kw
    )


def _epochs_logged(run) -> int:
    try:
        return len((run / "metrics.jsonl").read_text().splitlines())
    except FileNotFoundError:
        return 0


def test_killed_runs_resume_to_the_uninterrupted_weights(tmp_path, seed):
    whole, killed = tmp_path / "whole", tmp_path / "killed"
    assert cli.main([*KILL_ARGS, "--out", str(whole)]) == 0
    rng = random.Random(seed)
    kills = 0
    for attempt in range(8):
        if (killed / "last.pt").exists():
            args = ["train", "--resume", str(killed)]
        else:
            args = [*KILL_ARGS, "--out", str(killed), "--overwrite"]
        done = _epochs_logged(killed)
        proc = _cli(args)
        if kills < 3:  # once the run has logged an epoch more, kill it at a random moment
            deadline = time.time() + 120
            while proc.poll() is None and _epochs_logged(killed) <= done and time.time() < deadline:
                time.sleep(0.01)
            time.sleep(rng.uniform(0.0, 0.25))
            if proc.poll() is None:
                proc.send_signal(signal.SIGKILL)
                kills += 1
        _, err = proc.communicate(timeout=300)
        if proc.returncode == 0:
            break
        assert proc.returncode == -signal.SIGKILL, err.decode()
    assert proc.returncode == 0 and kills >= 1, (kills, proc.returncode)
    a = load_checkpoint(whole / "last.pt")["model"]
    b = load_checkpoint(killed / "last.pt")["model"]
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert not list(killed.glob(".*.tmp-*"))
    epochs = [json.loads(x)["epoch"] for x in (killed / "metrics.jsonl").read_text().splitlines()]
    assert epochs == list(range(6))


# --------------------------------------------------------------------------- full disk
@pytest.fixture
def small_tmpfs(tmp_path):
    """A 1 MiB tmpfs at ``tmp_path/disk`` (needs root and a kernel that lets it mount)."""
    disk = tmp_path / "disk"
    disk.mkdir()
    got = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(disk)], capture_output=True, text=True
    )
    if got.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here (needs root): {got.stderr.strip()}")
    yield disk
    subprocess.run(["umount", str(disk)], check=False)


def test_a_full_disk_stops_in_one_line_and_the_run_resumes(tmp_path, small_tmpfs, capsys):
    args = [
        "train",
        "--data",
        "synthetic:num_users=1200,num_items=400",
        "--dim",
        "24",
        "--batch-size",
        "256",
        "--negatives",
        "16",
        "--warmup",
        "1",
        "--epochs",
        "2",
        "--progress",
        "off",
    ]
    run = small_tmpfs / "run"
    assert cli.main([*args, "--out", str(tmp_path / "whole")]) == 0
    capsys.readouterr()
    assert cli.main([*args, "--out", str(run)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "No space left on device" in err[0] and str(run) in err[0], err
    assert not list(run.glob(".*.tmp-*"))
    for name in ("last.pt", "best.pt"):
        if (run / name).exists():
            load_checkpoint(run / name)  # intact
    subprocess.run(["mount", "-o", "remount,size=64m", str(small_tmpfs)], check=True)
    assert (run / "last.pt").exists()  # (the 1 MiB holds one last.pt, not the two of a replace)
    assert cli.main(["train", "--resume", str(run)]) == 0
    a = load_checkpoint(tmp_path / "whole" / "last.pt")["model"]
    b = load_checkpoint(run / "last.pt")["model"]
    assert all(torch.equal(a[k], b[k]) for k in a)
