"""NaN and infinity in the vectors propagate as in the reference, on every CPU backend.

A NaN or infinite entry in ``user`` or ``items`` must never become a finite loss: the
``cpu`` backend hands such calls to the reference backend (its running-max log-sum-exp
is written for finite scores), so loss and gradients equal the reference's, NaN for
NaN (``torch.testing.assert_close(equal_nan=True)``: NaN where the reference has NaN,
the same infinities, the finite values to rounding, float64 ``rtol = atol = 1e-12``).
"""

import pytest
import torch

import adaptau

CPU_BACKENDS = [b for b in adaptau.available_backends("cpu") if b != "triton"]
MODES = ("per_row", "shared", "in_batch")


def _case(gen, mode, where):
    B, N, D, M = 6, 40, 8, 11
    user = torch.randn(B, D, generator=gen, dtype=torch.float64)
    items = torch.randn(N, D, generator=gen, dtype=torch.float64)
    pos = torch.randperm(N, generator=gen)[:B]
    neg = {
        "per_row": torch.randint(0, N, (B, M), generator=gen),
        "shared": torch.randint(0, N, (M,), generator=gen),
        "in_batch": None,
    }[mode]
    if where == "item_nan":
        items[pos[2]] = float("nan")
    elif where == "item_inf":
        items[pos[3], 1] = float("inf")
    elif where == "user_nan":
        user[1, 0] = float("nan")
    elif where == "all_nan":
        items[:] = float("nan")
        user[:] = float("nan")
    return user, items, pos, neg


def _loss_and_grads(user, items, pos, neg, backend, normalize):
    u = user.clone().requires_grad_(True)
    t = items.clone().requires_grad_(True)
    loss = adaptau.softmax_loss(
        u, t, pos, neg, 4.0, 6.0, normalize=normalize, reduction="none", backend=backend
    )
    loss.sum().backward()
    return loss.detach(), u.grad, t.grad


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("where", ["item_nan", "item_inf", "user_nan", "all_nan"])
@pytest.mark.parametrize("normalize", [True, False])
def test_nonfinite_inputs_propagate_as_in_the_reference(seed, backend, mode, where, normalize):
    gen = torch.Generator().manual_seed(seed)
    user, items, pos, neg = _case(gen, mode, where)
    want = _loss_and_grads(user, items, pos, neg, "reference", normalize)
    got = _loss_and_grads(user, items, pos, neg, backend, normalize)
    assert not torch.isfinite(want[0]).all()  # the case is a real one
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=1e-12, atol=1e-12, equal_nan=True)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_a_nan_table_never_gives_a_finite_mean_loss(backend):
    """The trainer's case (a step with --lr inf leaves every weight NaN)."""
    user = torch.full((8, 16), float("nan"))
    items = torch.full((100, 16), float("nan"))
    pos = torch.arange(8)
    for neg in (torch.randint(0, 100, (8, 30)), torch.randint(0, 100, (30,)), None):
        loss = adaptau.softmax_loss(user, items, pos, neg, 10.0, 10.0, backend=backend)
        assert torch.isnan(loss)
        for dtype in (torch.float32, torch.bfloat16):
            loss = adaptau.softmax_loss(
                user.to(dtype), items.to(dtype), pos, neg, 10.0, 10.0, backend=backend
            )
            assert torch.isnan(loss)
