"""Mixed negatives: in-batch, shared and per-row sources in one softmax, each with its own
logQ, on every CPU backend, against the one-formula specification
(:func:`adaptau.loss.mixed.mixed_reference_loss`, autograd, float64).

Tolerances (float64 throughout): loss and every gradient ``rtol = atol = 1e-9`` relative to
the largest reference magnitude (the backends accumulate in another order than the
specification's single log-sum-exp).

The Triton backend runs in Triton's interpreter (``TRITON_INTERPRET=1``, set in a subprocess
before Triton is imported) in float32, against the float64 specification on the same
float32-rounded inputs: ``rtol = 1e-4``, ``atol = 1e-4`` relative to the largest reference
magnitude (float32 rounding of sums over at most ~40 terms at inverse temperatures ≤ 5).
"""

import importlib.util
import itertools
import json
import os
import random
import subprocess
import sys

import pytest
import torch

import adaptau
from adaptau.loss.mixed import mixed_reference_loss

CPU_BACKENDS = [b for b in adaptau.available_backends("cpu") if b != "triton"]
HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
SOURCE_SETS = [s for r in (1, 2, 3) for s in itertools.combinations(("in_batch", "shared", "per_row"), r)]


def _case(rng: random.Random, sources, *, logq: bool, hits: bool):
    B, N, D = rng.randint(2, 9), rng.randint(3, 25), rng.choice([1, 3, 8, 17])
    g = torch.Generator().manual_seed(rng.randrange(2**31))
    user = torch.randn(B, D, generator=g, dtype=torch.float64)
    items = torch.randn(N, D, generator=g, dtype=torch.float64)
    pos = torch.randint(0, N, (B,), generator=g)
    if hits:  # duplicates, accidental hits, and a row whose every negative is its positive
        pos[1] = pos[0]
    fields = {}
    if "in_batch" in sources:
        fields["in_batch"] = True
        if logq:
            fields["in_batch_logq"] = torch.randn(
                N if rng.random() < 0.5 else B, generator=g, dtype=torch.float64
            )
    if "shared" in sources:
        fields["shared"] = torch.randint(0, N, (rng.randint(1, 7),), generator=g)
        if hits:
            fields["shared"][0] = pos[-1]
        if logq:
            fields["shared_logq"] = torch.randn(N, generator=g, dtype=torch.float64)
    if "per_row" in sources:
        per_row = torch.randint(0, N, (B, rng.randint(1, 6)), generator=g)
        if hits:
            per_row[0] = pos[0]  # row 0: every per-row negative is a hit
            per_row[1, 0] = pos[1]
        fields["per_row"] = per_row
        if logq:
            fields["per_row_logq"] = torch.randn(N, generator=g, dtype=torch.float64)
    alpha = 4 * torch.rand(B, generator=g, dtype=torch.float64) + 1
    beta = 4 * torch.rand(B, generator=g, dtype=torch.float64) + 1
    return user, items, pos, fields, alpha, beta


def _fused_and_specification(backend, user, items, pos, neg, alpha, beta, opts):
    """(loss, grads) of the fused mixed call on ``backend`` and of the specification."""
    got = _grads(
        lambda u, i, a, b: adaptau.softmax_loss(
            u, i, pos, neg, a, b, reduction="none", backend=backend, **opts
        ),
        user,
        items,
        alpha,
        beta,
    )
    want = _grads(
        lambda u, i, a, b: mixed_reference_loss(u, i, pos, neg, a, b, **opts), user, items, alpha, beta
    )
    return got, want


def _grads(fn, user, items, alpha, beta):
    leaves = [t.clone().requires_grad_(True) for t in (user, items, alpha, beta)]
    loss = fn(*leaves)
    loss.backward(torch.linspace(0.5, 1.5, loss.shape[0], dtype=loss.dtype))
    return [loss.detach()] + [t.grad for t in leaves]


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("sources", SOURCE_SETS, ids=lambda s: "+".join(s))
def test_mixed_matches_the_specification(seed, backend, sources):
    rng = random.Random(seed)
    for _ in range(6):
        logq, hits = rng.random() < 0.6, rng.random() < 0.5
        user, items, pos, fields, alpha, beta = _case(rng, sources, logq=logq, hits=hits)
        opts = dict(
            include_pos=rng.random() < 0.5,
            normalize=rng.random() < 0.8,
            remove_accidental_hits=hits or rng.random() < 0.3,
        )
        neg = adaptau.Negatives(**fields) if rng.random() < 0.5 else dict(fields)
        got, want = _fused_and_specification(backend, user, items, pos, neg, alpha, beta, opts)
        for name, g, w in zip(("loss", "user", "items", "pos_scale", "neg_scale"), got, want):
            assert not torch.isnan(g).any(), name
            torch.testing.assert_close(
                g,
                w,
                rtol=1e-9,
                atol=1e-9 * max(1.0, float(w.abs().max())),
                msg=lambda m: f"{name} ({opts}, logq {logq}): {m}",
            )


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_one_source_equals_the_single_source_call(seed, backend):
    rng = random.Random(seed)
    user, items, pos, fields, alpha, beta = _case(rng, ("shared", "per_row"), logq=True, hits=False)
    for name in ("shared", "per_row"):
        plain = adaptau.softmax_loss(
            user,
            items,
            pos,
            fields[name],
            alpha,
            beta,
            neg_logq=fields[name + "_logq"],
            reduction="none",
            backend=backend,
        )
        mixed = adaptau.softmax_loss(
            user,
            items,
            pos,
            {name: fields[name], name + "_logq": fields[name + "_logq"]},
            alpha,
            beta,
            reduction="none",
            backend=backend,
        )
        assert torch.equal(plain, mixed)


def test_reductions_and_raw(seed):
    rng = random.Random(seed)
    user, items, pos, fields, alpha, beta = _case(rng, ("in_batch", "shared"), logq=False, hits=False)
    neg = adaptau.Negatives(**fields)
    rows, raw = adaptau.softmax_loss(user, items, pos, neg, alpha, beta, reduction="none", return_raw=True)
    ones = torch.ones_like(alpha)
    assert torch.allclose(
        raw, mixed_reference_loss(user, items, pos, neg, ones, ones), rtol=1e-12, atol=1e-12
    )
    assert torch.allclose(adaptau.softmax_loss(user, items, pos, neg, alpha, beta), rows.mean())
    assert torch.allclose(
        adaptau.softmax_loss(user, items, pos, neg, alpha, beta, reduction="sum"), rows.sum()
    )


@pytest.mark.parametrize(
    "neg,exc,fragment",
    [
        (adaptau.Negatives(), ValueError, "no negative source"),
        ({"shared": torch.zeros(2, dtype=torch.long), "hard": 1}, TypeError, "unknown negative source"),
        ({"shared_logq": torch.zeros(10)}, ValueError, "without neg.shared"),
        ({"in_batch": True, "in_batch_logq": torch.zeros(7)}, ValueError, "in_batch_logq must be"),
        ({"per_row": torch.zeros(4, dtype=torch.long)}, ValueError, "neg.per_row must be"),
        ({"shared": torch.tensor([0, 10])}, IndexError, "neg[1] = 10"),
    ],
)
def test_bad_sources_raise(neg, exc, fragment):
    """Each bad source is named; a single-source neg_logq beside Negatives is refused too."""
    with pytest.raises(ValueError, match="each source's own"):
        adaptau.softmax_loss(
            torch.randn(4, 3),
            torch.randn(10, 3),
            torch.tensor([0, 1, 2, 3]),
            {"in_batch": True},
            2.0,
            2.0,
            neg_logq=torch.zeros(10),
        )
    with pytest.raises(exc, match=fragment.replace("[", r"\[").replace("]", r"\]")):
        adaptau.softmax_loss(torch.randn(4, 3), torch.randn(10, 3), torch.tensor([0, 1, 2, 3]), neg, 2.0, 2.0)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_empty_sources_are_left_out(backend):
    """B = 1 has no in-batch part, and a source of 0 negatives is allowed beside another."""
    g = torch.Generator().manual_seed(0)
    user, items = (
        torch.randn(1, 5, generator=g, dtype=torch.float64),
        torch.randn(9, 5, generator=g, dtype=torch.float64),
    )
    pos, shared = torch.tensor([3]), torch.tensor([1, 2, 7])
    one = adaptau.softmax_loss(
        user,
        items,
        pos,
        {"in_batch": True, "shared": shared, "per_row": torch.zeros(1, 0, dtype=torch.long)},
        2.0,
        3.0,
        reduction="none",
        backend=backend,
    )
    torch.testing.assert_close(
        one, adaptau.softmax_loss(user, items, pos, shared, 2.0, 3.0, reduction="none", backend=backend)
    )
    torch.testing.assert_close(
        one, mixed_reference_loss(user, items, pos, {"in_batch": True, "shared": shared}, 2.0, 3.0)
    )
    with pytest.raises(ValueError, match="every source is empty"):
        adaptau.softmax_loss(
            user,
            items,
            pos,
            {"in_batch": True, "shared": torch.zeros(0, dtype=torch.long)},
            2.0,
            3.0,
            backend=backend,
        )


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_gradcheck(backend):
    g = torch.Generator().manual_seed(1)
    user = torch.randn(4, 6, generator=g, dtype=torch.float64, requires_grad=True)
    items = torch.randn(11, 6, generator=g, dtype=torch.float64, requires_grad=True)
    alpha = torch.full((4,), 3.0, dtype=torch.float64, requires_grad=True)
    pos = torch.tensor([0, 3, 3, 7])
    neg = {
        "in_batch": True,
        "shared": torch.tensor([1, 3, 9]),
        "per_row": torch.randint(0, 11, (4, 2), generator=g),
        "shared_logq": torch.randn(11, generator=g, dtype=torch.float64),
    }

    def fn(u, i, a):
        return adaptau.softmax_loss(
            u,
            i,
            pos,
            neg,
            a,
            2.0,
            include_pos=True,
            remove_accidental_hits=True,
            reduction="none",
            backend=backend,
        )

    assert torch.autograd.gradcheck(fn, (user, items, alpha), eps=1e-6, atol=1e-6)


def _triton_worker(out_path: str, seed: int) -> None:
    """Runs in a subprocess with TRITON_INTERPRET=1: every source set through the Triton
    backend in float32 against the float64 specification; writes the problems found."""
    rng = random.Random(seed)
    problems = []
    for sources in SOURCE_SETS:
        for _ in range(2):
            logq, hits = rng.random() < 0.6, rng.random() < 0.5
            user, items, pos, fields, alpha, beta = _case(rng, sources, logq=logq, hits=hits)
            opts = dict(
                include_pos=rng.random() < 0.5,
                normalize=rng.random() < 0.8,
                remove_accidental_hits=hits or rng.random() < 0.3,
            )
            rounded = [t.float().double() for t in (user, items, alpha, beta)]
            fields32 = {
                k: (v.float() if torch.is_tensor(v) and v.is_floating_point() else v)
                for k, v in fields.items()
            }
            fields64 = {
                k: (v.double() if torch.is_tensor(v) and v.is_floating_point() else v)
                for k, v in fields32.items()
            }
            got = _grads(
                lambda u, i, a, b: adaptau.softmax_loss(
                    u, i, pos, fields32, a, b, reduction="none", backend="triton", **opts
                ),
                *[t.float() for t in rounded],
            )
            want = _grads(
                lambda u, i, a, b: mixed_reference_loss(u, i, pos, fields64, a, b, **opts), *rounded
            )
            for name, g, w in zip(("loss", "user", "items", "pos_scale", "neg_scale"), got, want):
                tol = 1e-4 * max(1.0, float(w.abs().max()))
                if (
                    g.dtype != torch.float32
                    or torch.isnan(g).any()
                    or not torch.allclose(g.double(), w, rtol=1e-4, atol=tol)
                ):
                    problems.append(
                        f"{'+'.join(sources)} {name} ({opts}, logq {logq}, hits {hits}): "
                        f"max |diff| {float((g.double() - w).abs().max()):.3g}, dtype {g.dtype}"
                    )
    with open(out_path, "w") as fh:
        json.dump(problems, fh)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("per_source", ["sparse", "dense"])
def test_a_large_catalog_gets_one_dense_item_gradient(backend, per_source, monkeypatch):
    """With dense item gradients and a catalog much larger than the batch's indices, the
    sources run with sparse gradients made dense once (``per_source="sparse"``; "dense"
    forces one dense gradient per source): the same loss and gradients as the
    specification, and ``items.grad`` a dense ``[N, D]`` tensor. float64, bound 1e-9."""
    import adaptau.loss.mixed as mixed

    monkeypatch.setattr(mixed, "_SPARSE_SOURCES_RATIO", 4 if per_source == "sparse" else 10**9)
    calls = []
    original = mixed._DenseItemGrad.apply
    monkeypatch.setattr(mixed._DenseItemGrad, "apply", lambda t: calls.append(1) or original(t))
    g = torch.Generator().manual_seed(11)
    B, N, D = 5, 400, 7
    user = torch.randn(B, D, generator=g, dtype=torch.float64)
    items = torch.randn(N, D, generator=g, dtype=torch.float64)
    pos = torch.randint(0, N, (B,), generator=g)
    neg = adaptau.Negatives(
        in_batch=True,
        shared=torch.cat([pos[:2], torch.randint(0, N, (6,), generator=g)]),  # hits, duplicates
        per_row=torch.randint(0, N, (B, 4), generator=g),
        shared_logq=torch.randn(N, generator=g, dtype=torch.float64),
    )
    alpha = 4 * torch.rand(B, generator=g, dtype=torch.float64) + 1
    opts = dict(include_pos=True, remove_accidental_hits=True)
    got, want = _fused_and_specification(backend, user, items, pos, neg, alpha, alpha.clone(), opts)
    assert len(calls) == (1 if per_source == "sparse" else 0)
    assert got[2].layout == torch.strided and got[2].shape == (N, D)
    for name, a, w in zip(("loss", "user", "items", "pos_scale", "neg_scale"), got, want):
        torch.testing.assert_close(a, w, rtol=1e-9, atol=1e-9 * max(1.0, float(w.abs().max())), msg=name)


@pytest.mark.skipif(
    importlib.util.find_spec("triton") is None,
    reason="triton is not installed: its interpreter cannot run here",
)
def test_triton_interpreter_mixed(seed, tmp_path):
    """Every source set on the Triton backend (interpreter, float32) against the specification."""
    out = tmp_path / "problems.json"
    env = dict(
        os.environ, TRITON_INTERPRET="1", PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", "")
    )
    proc = subprocess.run(
        [sys.executable, os.path.abspath(__file__), "--triton-worker", str(out), str(seed)],
        env=env,
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0 and out.exists(), (
        f"worker failed (rc {proc.returncode}):\n{proc.stderr[-4000:]}"
    )
    problems = json.loads(out.read_text())
    assert not problems, "\n".join(problems)


if __name__ == "__main__" and len(sys.argv) == 4 and sys.argv[1] == "--triton-worker":
    torch.set_num_threads(1)
    _triton_worker(sys.argv[2], int(sys.argv[3]))
