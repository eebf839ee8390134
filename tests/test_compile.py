"""torch.compile(fullgraph=True) traces softmax_loss without graph breaks, same results."""

import pytest
import torch

import adaptau

pytestmark = pytest.mark.filterwarnings("ignore:adaptau. no fused backend")

# Every CPU backend this build has (the fused C++ kernel only when it was compiled).
BACKENDS = [
    pytest.param("reference"),
    pytest.param(
        "cpu",
        marks=pytest.mark.skipif(
            "cpu" not in adaptau.available_backends("cpu"), reason="the C++ extension adaptau._C is not built"
        ),
    ),
]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("include_pos", [False, True])
@pytest.mark.parametrize("neg_mode", ["per_row", "shared", "in_batch"])
def test_compile_fullgraph_matches_eager(seed, neg_mode, include_pos, backend):
    torch._dynamo.reset()
    gen = torch.Generator().manual_seed(seed)
    B, N, D, M = 6, 11, 8, 5
    user = torch.randn(B, D, generator=gen)
    items = torch.randn(N, D, generator=gen)
    pos = torch.randint(0, N, (B,), generator=gen)
    neg = {
        "per_row": torch.randint(0, N, (B, M), generator=gen),
        "shared": torch.randint(0, N, (M,), generator=gen),
        "in_batch": None,
    }[neg_mode]
    alpha = torch.rand(B, generator=gen) * 5 + 1
    logq = torch.randn(N, generator=gen)

    def f(u, it, a):
        loss, raw = adaptau.softmax_loss(
            u, it, pos, neg, a, 4.0, neg_logq=logq, include_pos=include_pos, return_raw=True, backend=backend
        )
        return loss * 2.0, raw

    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
    results = []
    for fn in (f, compiled):
        leaves = [t.clone().requires_grad_() for t in (user, items, alpha)]
        loss, raw = fn(*leaves)
        grads = torch.autograd.grad(loss, leaves)
        results.append((loss.detach(), raw, grads))
    (l1, r1, g1), (l2, r2, g2) = results
    torch.testing.assert_close(l1, l2, rtol=0, atol=0)
    torch.testing.assert_close(r1, r2, rtol=0, atol=0)
    for a, b in zip(g1, g2):
        assert torch.isfinite(a).all()
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("backend", BACKENDS)
def test_compile_inductor_fullgraph(seed, backend):
    torch._dynamo.reset()
    gen = torch.Generator().manual_seed(seed)
    user, items = torch.randn(4, 8, generator=gen), torch.randn(9, 8, generator=gen)
    pos, neg = torch.randint(0, 9, (4,), generator=gen), torch.randint(0, 9, (4, 3), generator=gen)

    def f(u, it):
        return adaptau.softmax_loss(u, it, pos, neg, 5.0, 5.0, backend=backend)

    compiled = torch.compile(f, fullgraph=True)
    u1, i1 = user.clone().requires_grad_(), items.clone().requires_grad_()
    u2, i2 = user.clone().requires_grad_(), items.clone().requires_grad_()
    l1, l2 = f(u1, i1), compiled(u2, i2)
    l1.backward()
    l2.backward()
    torch.testing.assert_close(l1, l2)
    torch.testing.assert_close(u1.grad, u2.grad)
    torch.testing.assert_close(i1.grad, i2.grad)


@pytest.mark.parametrize("backend", BACKENDS)
def test_compile_dynamic_with_float_scale_arguments(seed, backend):
    """fullgraph=True, dynamic=True with the inverse temperatures passed as Python floats
    (symbolic under dynamic shapes): same loss and gradients as eager, bad values refused."""
    torch._dynamo.reset()
    gen = torch.Generator().manual_seed(seed)
    user = torch.randn(7, 8, generator=gen, requires_grad=True)
    items = torch.randn(30, 8, generator=gen, requires_grad=True)
    pos = torch.randint(0, 30, (7,), generator=gen)
    neg = torch.randint(0, 30, (7, 5), generator=gen)

    def fn(u, t, a, b):
        return adaptau.softmax_loss(u, t, pos, neg, a, b, backend=backend)

    compiled = torch.compile(fn, fullgraph=True, dynamic=True)
    for a, b in ((5.0, 6.0), (7.5, 2.0)):
        got = compiled(user, items, a, b)
        (gu, gi) = torch.autograd.grad(got, (user, items))
        want = fn(user, items, a, b)
        (wu, wi) = torch.autograd.grad(want, (user, items))
        for x, y in ((got, want), (gu, wu), (gi, wi)):
            torch.testing.assert_close(x, y, rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="pos_scale must be finite"):
        compiled(user, items, float("nan"), 1.0)
