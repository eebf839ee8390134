"""The reference backend and the custom op against an independent float64 formula."""

import itertools

import pytest
import torch

import adaptau
from _formulas import naive_rows

pytestmark = pytest.mark.filterwarnings("ignore:adaptau. no fused backend")

# Both sides are float64 sums of the same terms in different orders.
RTOL, ATOL = 1e-9, 1e-10


def make_inputs(B, N, D, M, neg_mode, gen, dtype=torch.float64, with_duplicates=True):
    user = torch.randn(B, D, dtype=dtype, generator=gen)
    items = torch.randn(N, D, dtype=dtype, generator=gen)
    pos = torch.randint(0, N, (B,), generator=gen)
    if neg_mode == "per_row":
        neg = torch.randint(0, N, (B, M), generator=gen)
    elif neg_mode == "shared":
        neg = torch.randint(0, N, (M,), generator=gen)
    else:
        neg = None
    if with_duplicates and N > 2:
        pos[0] = pos[-1]  # a repeated positive (in-batch: an accidental hit)
        if neg is not None:
            neg.view(-1)[0] = pos[0]  # a negative equal to the positive
    alpha = torch.rand(B, dtype=dtype, generator=gen) * 9 + 1
    beta = torch.rand(B, dtype=dtype, generator=gen) * 9 + 1
    logq = torch.randn(N, dtype=dtype, generator=gen)
    return user, items, pos, neg, alpha, beta, logq


OPTIONS = list(
    itertools.product(
        ["per_row", "shared", "in_batch"], [False, True], [False, True], [False, True], [False, True]
    )
)


@pytest.mark.parametrize("neg_mode,include_pos,normalize,use_logq,remove_hits", OPTIONS)
def test_reference_matches_independent_formula(seed, neg_mode, include_pos, normalize, use_logq, remove_hits):
    gen = torch.Generator().manual_seed(seed)
    user, items, pos, neg, alpha, beta, logq = make_inputs(5, 7, 6, 4, neg_mode, gen)
    logq = logq if use_logq else None
    leaves = [t.clone().requires_grad_() for t in (user, items, alpha, beta)]
    loss, raw = adaptau.softmax_loss(
        *leaves[:2],
        pos,
        neg,
        leaves[2],
        leaves[3],
        include_pos=include_pos,
        normalize=normalize,
        neg_logq=logq,
        remove_accidental_hits=remove_hits,
        reduction="none",
        return_raw=True,
        backend="reference",
    )
    grads = torch.autograd.grad(loss.sum(), leaves)

    ref_leaves = [t.clone().requires_grad_() for t in (user, items, alpha, beta)]
    opts = dict(include_pos=include_pos, normalize=normalize, remove_hits=remove_hits)
    ref = naive_rows(*ref_leaves[:2], pos, neg, ref_leaves[2], ref_leaves[3], logq, **opts)
    ref_grads = torch.autograd.grad(ref.sum(), ref_leaves, allow_unused=True)
    ones = torch.ones(5, dtype=torch.float64)
    ref_raw = naive_rows(user, items, pos, neg, ones, ones, logq, **opts)

    assert torch.isfinite(loss).all() and torch.isfinite(raw).all()
    torch.testing.assert_close(loss, ref.detach(), rtol=RTOL, atol=ATOL)
    torch.testing.assert_close(raw, ref_raw, rtol=RTOL, atol=ATOL)
    for name, g, r in zip(("user", "items", "pos_scale", "neg_scale"), grads, ref_grads):
        r = torch.zeros_like(g) if r is None else r
        assert torch.isfinite(g).all(), name
        torch.testing.assert_close(g, r, rtol=RTOL, atol=ATOL, msg=lambda m: f"{name}: {m}")


@pytest.mark.parametrize("neg_mode", ["per_row", "shared", "in_batch"])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_reductions(seed, neg_mode, reduction):
    gen = torch.Generator().manual_seed(seed)
    user, items, pos, neg, alpha, beta, _ = make_inputs(6, 9, 5, 3, neg_mode, gen)
    rows = naive_rows(user, items, pos, neg, alpha, beta)
    out = adaptau.softmax_loss(user, items, pos, neg, alpha, beta, reduction=reduction, backend="reference")
    expected = {"mean": rows.mean(), "sum": rows.sum(), "none": rows}[reduction]
    torch.testing.assert_close(out, expected, rtol=RTOL, atol=ATOL)


@pytest.mark.parametrize(
    "neg_mode,include_pos,normalize,use_logq,remove_hits", [o for o in OPTIONS if o[3] == o[4]]
)
def test_gradcheck(seed, neg_mode, include_pos, normalize, use_logq, remove_hits):
    gen = torch.Generator().manual_seed(seed)
    user, items, pos, neg, alpha, beta, logq = make_inputs(4, 6, 3, 3, neg_mode, gen)
    logq = logq if use_logq else None

    def f(u, it, a, b):
        return adaptau.softmax_loss(
            u,
            it,
            pos,
            neg,
            a,
            b,
            include_pos=include_pos,
            normalize=normalize,
            neg_logq=logq,
            remove_accidental_hits=remove_hits,
            reduction="none",
            backend="reference",
        )

    inputs = tuple(t.clone().requires_grad_() for t in (user, items, alpha * 0.3, beta * 0.3))
    assert torch.autograd.gradcheck(f, inputs)


def test_scalar_and_float_scales(seed):
    gen = torch.Generator().manual_seed(seed)
    user, items, pos, neg, _, _, _ = make_inputs(4, 8, 5, 3, "per_row", gen)
    a = torch.tensor(3.0, dtype=torch.float64, requires_grad=True)
    loss = adaptau.softmax_loss(user, items, pos, neg, a, 2.5, backend="reference")
    expected = naive_rows(
        user,
        items,
        pos,
        neg,
        torch.full((4,), 3.0, dtype=torch.float64),
        torch.full((4,), 2.5, dtype=torch.float64),
    ).mean()
    torch.testing.assert_close(loss, expected, rtol=RTOL, atol=ATOL)
    (g,) = torch.autograd.grad(loss, a)
    a_ref = torch.tensor(3.0, dtype=torch.float64, requires_grad=True)
    (g_ref,) = torch.autograd.grad(
        naive_rows(user, items, pos, neg, a_ref, torch.tensor(2.5, dtype=torch.float64)).mean(), a_ref
    )
    torch.testing.assert_close(g, g_ref, rtol=RTOL, atol=ATOL)


def test_empty_denominator_row_contributes_nothing():
    items = torch.randn(4, 3, dtype=torch.float64, requires_grad=True)
    user = torch.randn(2, 3, dtype=torch.float64, requires_grad=True)
    pos = torch.tensor([1, 2])
    neg = torch.tensor([[1, 1], [0, 3]])  # row 0's negatives are all its positive
    loss = adaptau.softmax_loss(
        user, items, pos, neg, 5.0, 5.0, remove_accidental_hits=True, reduction="none", backend="reference"
    )
    assert loss[0].item() == 0.0 and loss[1].item() != 0.0
    gu, gi = torch.autograd.grad(loss.sum(), (user, items))
    assert torch.isfinite(gu).all() and torch.isfinite(gi).all()
    assert gu[0].abs().max().item() == 0.0
    assert gi[1].abs().max().item() == 0.0  # item 1 only appears in the empty row


def test_zero_vectors_and_large_scales(seed):
    gen = torch.Generator().manual_seed(seed)
    user, items, pos, neg, _, _, _ = make_inputs(5, 9, 4, 6, "per_row", gen)
    user[1] = 0.0
    items[neg[2, 1]] = 0.0
    for normalize in (True, False):
        u, it = user.clone().requires_grad_(), items.clone().requires_grad_()
        loss = adaptau.softmax_loss(
            u, it, pos, neg, 1e4, 1e4, normalize=normalize, reduction="none", backend="reference"
        )
        gu, gi = torch.autograd.grad(loss.sum(), (u, it))
        assert torch.isfinite(loss).all() and torch.isfinite(gu).all() and torch.isfinite(gi).all()
        ref = naive_rows(
            user,
            items,
            pos,
            neg,
            torch.full((5,), 1e4, dtype=torch.float64),
            torch.full((5,), 1e4, dtype=torch.float64),
            normalize=normalize,
        )
        torch.testing.assert_close(loss, ref, rtol=1e-9, atol=1e-6)


def test_paper_loss_reproduced(seed):
    """The paper's code: −log(exp(w₀·s_pos) / Σ_m exp(β_u·s_neg_m)), positive outside."""
    gen = torch.Generator().manual_seed(seed)
    B, N, D, M = 8, 30, 16, 10
    user = torch.randn(B, D, dtype=torch.float64, generator=gen)
    items = torch.randn(N, D, dtype=torch.float64, generator=gen)
    pos = torch.randint(0, N, (B,), generator=gen)
    neg = torch.randint(0, N, (B, M), generator=gen)
    w0, beta = 7.3, torch.rand(B, dtype=torch.float64, generator=gen) * 10 + 1
    un = torch.nn.functional.normalize(user, dim=-1)
    itn = torch.nn.functional.normalize(items, dim=-1)
    s_pos = (un * itn[pos]).sum(-1)
    s_neg = (un.unsqueeze(1) * itn[neg]).sum(-1)
    paper = -torch.log(torch.exp(w0 * s_pos) / torch.exp(beta[:, None] * s_neg).sum(1))
    paper_raw = -torch.log(torch.exp(s_pos) / torch.exp(s_neg).sum(1))
    loss, raw = adaptau.softmax_loss(
        user, items, pos, neg, w0, beta, reduction="none", return_raw=True, backend="reference"
    )
    torch.testing.assert_close(loss, paper, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(raw, paper_raw, rtol=1e-12, atol=1e-12)


def test_float32_inputs_give_float32_loss(seed):
    gen = torch.Generator().manual_seed(seed)
    user, items, pos, neg, alpha, beta, _ = make_inputs(4, 8, 5, 3, "shared", gen, dtype=torch.float32)
    loss = adaptau.softmax_loss(user, items, pos, neg, alpha, beta, backend="reference")
    assert loss.dtype == torch.float32
    ref = naive_rows(user.double(), items.double(), pos, neg, alpha.double(), beta.double()).mean()
    torch.testing.assert_close(loss.double(), ref, rtol=1e-5, atol=1e-5)


def test_int32_indices(seed):
    gen = torch.Generator().manual_seed(seed)
    user, items, pos, neg, alpha, beta, _ = make_inputs(4, 8, 5, 3, "per_row", gen)
    a = adaptau.softmax_loss(user, items, pos, neg, alpha, beta, backend="reference")
    b = adaptau.softmax_loss(user, items, pos.int(), neg.int(), alpha, beta, backend="reference")
    c = adaptau.softmax_loss(user, items, pos.int(), neg, alpha, beta, backend="reference")
    assert a.item() == b.item() == c.item()


def test_available_backends_lists_reference():
    assert adaptau.available_backends("cpu")[-1] == "reference"
    assert set(adaptau.available_backends("cpu")) <= set(adaptau.BACKENDS)
