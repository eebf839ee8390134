"""torch.compile(fullgraph=True) traces softmax_loss without graph breaks, same results."""
import pytest
import torch

import adaptau

pytestmark = pytest.mark.filterwarnings("ignore:adaptau. no fused backend")

# Every CPU backend this build has (the fused C++ kernel only when it was compiled).
BACKENDS = [pytest.param("reference"),
            pytest.param("cpu", marks=pytest.mark.skipif(
                "cpu" not in adaptau.available_backends("cpu"),
                reason="the C++ extension adaptau._C is not built"))]


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
    neg = {"per_row": torch.randint(0, N, (B, M), generator=gen),
           "shared": torch.randint(0, N, (M,), generator=gen), "in_batch": None}[neg_mode]
    alpha = torch.rand(B, generator=gen) * 5 + 1
    logq = torch.randn(N, generator=gen)

    def f(u, it, a):
        loss, raw = adaptau.softmax_loss(u, it, pos, neg, a, 4.0, neg_logq=logq,
                                         include_pos=include_pos, return_raw=True,
                                         backend=backend)
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
