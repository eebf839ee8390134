"""MF and LightGCN: propagation against a dense computation, the bincount L2 term."""

import numpy as np
import pytest
import scipy.sparse as sp
import torch

from adaptau.train import models
from adaptau.train.models import MF, LightGCN, build_model, normalized_adjacency, sampled_l2


def random_graph(nu=7, ni=9, density=0.3, seed=0):
    rng = np.random.RandomState(seed)
    dense = (rng.rand(nu, ni) < density).astype(np.float64)
    dense[0, :] = 0  # an isolated user
    return sp.csr_matrix(dense), dense


def test_normalized_adjacency_dense():
    m, r = random_graph()
    nu, ni = r.shape
    a = np.zeros((nu + ni, nu + ni))
    a[:nu, nu:] = r
    a[nu:, :nu] = r.T
    deg = a.sum(1)
    inv = np.zeros_like(deg)
    inv[deg > 0] = deg[deg > 0] ** -0.5
    expected = inv[:, None] * a * inv[None, :]
    got = normalized_adjacency(m, nu, ni).to_dense().double().numpy()
    assert np.allclose(got, expected, atol=1e-6)
    assert np.allclose(got, got.T, atol=1e-7)


@pytest.mark.parametrize("layers", [0, 1, 3])
def test_lightgcn_propagation_matches_dense(layers):
    m, r = random_graph(seed=layers)
    nu, ni = r.shape
    torch.manual_seed(0)
    model = LightGCN(nu, ni, m, dim=5, layers=layers)
    users, items = model.tables()
    a = torch.as_tensor(normalized_adjacency(m, nu, ni).to_dense(), dtype=torch.float64)
    e = torch.cat([model.user.weight, model.item.weight]).detach().double()
    acc, cur = e.clone(), e
    for _ in range(layers):
        cur = a @ cur
        acc = acc + cur
    final = acc / (layers + 1)
    assert torch.allclose(users.double(), final[:nu], atol=1e-5)
    assert torch.allclose(items.double(), final[nu:], atol=1e-5)
    # isolated user 0: only its own embedding, averaged with zeros
    assert torch.allclose(users[0].double(), e[0] / (layers + 1), atol=1e-6)


def test_lightgcn_gradients_flow():
    m, _ = random_graph()
    model = LightGCN(7, 9, m, dim=4, layers=2)
    users, items = model.tables()
    (users.pow(2).sum() + items.sum()).backward()
    assert model.user.weight.grad is not None and model.item.weight.grad.abs().sum() > 0


def naive_l2(user_w, item_w, users, pos, neg):
    b = users.shape[0]
    total = user_w[users].pow(2).sum() + item_w[pos].pow(2).sum()
    if neg is not None:
        rows = item_w[neg] if neg.dim() == 2 else item_w[neg].unsqueeze(0).expand(b, -1, -1)
        total = total + rows.pow(2).sum()
    return 0.5 * total / b


@pytest.mark.parametrize("kind", ["per-row", "shared", "in-batch"])
def test_sampled_l2_matches_gather(kind):
    torch.manual_seed(1)
    user_w = torch.randn(6, 4, dtype=torch.float64, requires_grad=True)
    item_w = torch.randn(11, 4, dtype=torch.float64, requires_grad=True)
    users = torch.tensor([0, 3, 3, 5])
    pos = torch.tensor([1, 1, 4, 10])
    neg = {"per-row": torch.randint(11, (4, 7)), "shared": torch.randint(11, (5,)), "in-batch": None}[kind]
    got = sampled_l2(user_w, item_w, users, pos, neg)
    want = naive_l2(user_w, item_w, users, pos, neg)
    assert torch.allclose(got, want)
    gu, gi = torch.autograd.grad(got, (user_w, item_w))
    wu, wi = torch.autograd.grad(want, (user_w, item_w))
    assert torch.allclose(gu, wu) and torch.allclose(gi, wi)


def test_mf_dropout_only_in_training():
    torch.manual_seed(0)
    model = MF(5, 6, dim=32, dropout=0.5)
    table, _ = model.tables()
    users = torch.tensor([0, 1, 2])
    model.train()
    dropped = model.batch_users(table, users)
    assert (dropped == 0).any()
    model.eval()
    assert torch.equal(model.batch_users(table, users), table[users])


def test_build_model():
    m, _ = random_graph()
    assert isinstance(build_model("mf", 7, 9, m, dim=3), MF)
    assert isinstance(build_model("lightgcn", 7, 9, m, dim=3), LightGCN)
    with pytest.raises(ValueError):
        build_model("gru", 7, 9, m)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_add_row_l2_grad_fused_matches_torch(dtype):
    """add_row_l2_grad_ (the fused CPU op) against the same formula in torch: gradient and
    value; zero counts leave rows untouched; D not a multiple of the vector width."""
    from adaptau.train.models import add_row_l2_grad_

    g = torch.Generator().manual_seed(3)
    N, D = 2500, 67
    w = torch.randn(N, D, generator=g, dtype=dtype)
    counts = torch.randint(0, 5, (N,), generator=g)
    counts[:100] = 0
    grad0 = torch.randn(N, D, generator=g, dtype=dtype)
    grad = grad0.clone()
    value = add_row_l2_grad_(grad, w, counts, 0.3)
    wd, cd = w.double(), counts.double()
    want_grad = grad0.double() + 0.3 * cd[:, None] * wd
    want_value = float((wd.pow(2).sum(1) * cd).sum())
    tol = dict(rtol=1e-6, atol=1e-6) if dtype == torch.float32 else dict(rtol=1e-13, atol=1e-13)
    torch.testing.assert_close(grad.double(), want_grad, **tol)
    assert value == pytest.approx(want_value, rel=tol["rtol"])
    assert torch.equal(grad[:100], grad0[:100])
    # the torch fallback (a non-contiguous grad) gives the same
    grad_t = grad0.t().contiguous().t()
    value_t = add_row_l2_grad_(grad_t, w, counts, 0.3)
    torch.testing.assert_close(grad_t.double(), want_grad, **tol)
    assert value_t == pytest.approx(want_value, rel=tol["rtol"])
    with pytest.raises(RuntimeError, match="counts must be int64"):
        torch.ops.adaptau.add_l2_rows_(grad, w, counts[:-1], 0.3)
    with pytest.raises(RuntimeError, match="same"):
        torch.ops.adaptau.add_l2_rows_(grad[:-1], w, counts, 0.3)


@pytest.mark.parametrize("share", [1.0, 0.0], ids=["batch-rows", "whole-tables"])
@pytest.mark.parametrize("layers, seed", [(0, 11), (1, 12), (2, 13), (3, 14)])
def test_lightgcn_rows_equal_the_tables_rows_with_their_gradients(layers, seed, share, monkeypatch):
    """``rows`` against ``tables()`` indexed, in float64: values and both tables' gradients
    to 1e-12, with repeated users and items and an isolated user (0) among them; the last
    layer for the batch's rows only (share 1.0) and through the whole tables (share 0.0)."""
    monkeypatch.setattr(models, "ROW_BLOCK_MAX_SHARE", share)
    m, _ = random_graph(nu=23, ni=31, density=0.15, seed=seed)
    torch.manual_seed(seed)
    model = LightGCN(23, 31, m, dim=6, layers=layers).double()
    model.adj = model.adj.to(torch.float64)
    users = torch.cat([torch.tensor([0, 0]), torch.randint(0, 23, (17,))])
    items = torch.cat([torch.tensor([5, 5]), torch.randint(0, 31, (29,))])
    w_u = torch.randn(users.numel(), 6, dtype=torch.float64)
    w_i = torch.randn(items.numel(), 6, dtype=torch.float64)

    user_table, item_table = model.tables()
    ((user_table[users] * w_u).sum() + (item_table[items] * w_i).sum()).backward()
    expected = [p.grad.clone() for p in (model.user.weight, model.item.weight)]
    model.zero_grad(set_to_none=True)
    user_rows, item_rows = model.rows(users, items)
    ((user_rows * w_u).sum() + (item_rows * w_i).sum()).backward()

    assert torch.allclose(user_rows, user_table[users], rtol=0, atol=1e-12)
    assert torch.allclose(item_rows, item_table[items], rtol=0, atol=1e-12)
    for got, want in zip((model.user.weight.grad, model.item.weight.grad), expected):
        assert torch.isfinite(got).all()
        assert torch.allclose(got, want, rtol=0, atol=1e-12)


@pytest.mark.parametrize("index", [torch.int32, torch.int64])
def test_propagated_rows_gradcheck(index):
    """The row-block propagation's backward against finite differences, with the
    adjacency's indices in int32 (graphs under 2³¹ non-zeros) and in int64."""
    from adaptau.train.models import _csr, _PropagatedRows

    m, _ = random_graph(nu=9, ni=11, density=0.3, seed=3)
    adj = normalized_adjacency(m, 9, 11, dtype=torch.float64)
    assert adj.crow_indices().dtype == torch.int32
    adj = _csr(adj.crow_indices().to(index), adj.col_indices().to(index), adj.values(), adj.shape)
    rows = torch.tensor([0, 2, 9, 14, 19])
    ego = torch.randn(20, 3, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda e: _PropagatedRows.apply(adj, rows, e, 3), (ego,))


def test_the_product_ignores_what_its_output_held():
    """The CPU product writes into an uninitialized output with ``addmm(beta=0)``: that
    must not carry a NaN or anything else from the output into the result."""
    from adaptau.train.models import _spmm

    m, _ = random_graph(nu=13, ni=17, density=0.3, seed=4)
    adj = normalized_adjacency(m, 13, 17)
    x = torch.randn(30, 8)
    held = torch.full((30, 8), float("nan"))
    got = torch.addmm(held, adj, x, beta=0, out=held)
    want = adj.to_dense() @ x
    assert torch.isfinite(got).all() and torch.allclose(got, want, atol=1e-6)
    assert torch.allclose(_spmm(adj, x), want, atol=1e-6)
