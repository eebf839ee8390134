"""Backbones: matrix factorization (MF) and LightGCN.

Both expose :meth:`tables` — the final ``[num_users, D]`` and ``[num_items, D]`` vectors the
loss and :meth:`adaptau.AdapTau.begin_epoch` consume — and :meth:`l2` — the L2 penalty of
a batch on the layer-0 embeddings, computed without gathering ``[B, M, D]``::

    Σ_rows ‖I[n]‖² = Σ_items count(item)·‖I_item‖²      (count: a bincount of the batch)

scaled like the reference code: ``0.5·(Σ‖U[u]‖² + Σ‖I[pos]‖² + Σ‖I[neg]‖²) / B``.
"""

from __future__ import annotations

import warnings
from typing import Optional, Tuple

import numpy as np
import scipy.sparse as sp
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .. import _extension
from .sampling import dropout as inverted_dropout

# the extension registers torch.ops.adaptau.item_counts and add_l2_rows_
_HAS_ITEM_COUNTS = _extension.has_op("item_counts")
_HAS_ADD_L2_ROWS = _extension.has_op("add_l2_rows_")

__all__ = [
    "MF",
    "LightGCN",
    "build_model",
    "normalized_adjacency",
    "sampled_l2",
    "sampled_item_counts",
    "add_row_l2_grad_",
    "add_sampled_l2_grad_",
    "add_sparse_sampled_l2_grad_",
]


def sampled_item_counts(pos: Tensor, neg: Optional[Tensor], num_items: int, dtype: torch.dtype) -> Tensor:
    """``[num_items]`` how often each item is a positive or a negative of the batch.

    ``neg`` as in :func:`sampled_l2`: ``[B, M]``, ``[M]`` (every row's: counted B times) or
    None. On the CPU the counting is the parallel ``torch.ops.adaptau.item_counts`` (torch's
    and numpy's bincount run on one thread: ~5 ms for the paper's 2M negatives, an eighth
    of a training step).
    """
    batch = pos.shape[0]
    if pos.device.type == "cpu" and _HAS_ITEM_COUNTS:
        counts = torch.ops.adaptau.item_counts(pos, num_items)
        if neg is not None:
            neg_counts = torch.ops.adaptau.item_counts(neg, num_items)
            counts += neg_counts * batch if neg.dim() == 1 else neg_counts
        return counts.to(dtype)
    counts = torch.bincount(pos.long(), minlength=num_items).to(dtype)
    if neg is not None:
        neg_counts = torch.bincount(neg.reshape(-1).long(), minlength=num_items).to(dtype)
        counts += neg_counts * batch if neg.dim() == 1 else neg_counts
    return counts


@torch.no_grad()
def add_row_l2_grad_(grad: Tensor, weight: Tensor, counts: Tensor, coef: float) -> Tensor:
    """``grad += coef · counts[:, None] · weight`` in place, and returns
    ``Σ_i counts_i · ‖weight_i‖²`` as a 0-dim tensor on the table's device (no host read):
    the gradient and value of ``0.5 · Σ_i counts_i · ‖weight_i‖²`` (times ``coef``), the
    item side of :func:`sampled_l2`.

    ``grad`` and ``weight`` ``[N, D]``, ``counts`` ``[N]`` (as from
    :func:`sampled_item_counts`). On the CPU one parallel pass of
    ``torch.ops.adaptau.add_l2_rows_`` (``addcmul_`` plus ``vector_norm`` read the table twice:
    ~1.2 ms instead of ~0.5 ms per step at Gowalla's 41k × 64); elsewhere those torch ops.
    """
    if (
        grad.device.type == "cpu"
        and _HAS_ADD_L2_ROWS
        and grad.is_contiguous()
        and grad.dtype == weight.dtype
        and grad.dtype in (torch.float32, torch.float64)
    ):
        return torch.ops.adaptau.add_l2_rows_(grad, weight, counts.long(), float(coef))
    c = counts.to(weight.dtype)
    grad.addcmul_(weight, c.unsqueeze(1), value=coef)
    return torch.dot(torch.linalg.vector_norm(weight, dim=1).square_(), c)


def sampled_l2(
    user_emb: Tensor, item_emb: Tensor, users: Tensor, pos: Tensor, neg: Optional[Tensor]
) -> Tensor:
    """``0.5·(Σ_b‖U[users_b]‖² + Σ_b‖I[pos_b]‖² + Σ_{b,m}‖I[neg_bm]‖²) / B``.

    ``neg`` is ``[B, M]``, ``[M]`` (shared by every row: counted B times) or None
    (in-batch: the negatives are the positives, which are already counted).
    Only ``[B, D]`` rows and an ``[N]`` count vector are formed, never ``[B, M, D]``.
    """
    batch = users.shape[0]
    counts = sampled_item_counts(pos, neg, item_emb.shape[0], item_emb.dtype)
    user_term = user_emb[users.long()].pow(2).sum()
    item_term = (item_emb.pow(2).sum(1) * counts).sum()
    return 0.5 * (user_term + item_term) / batch


class MF(nn.Module):
    """Matrix factorization: one embedding table per side (normal init, std ``init_std``).

    ``dropout`` is the paper's optional dropout on the user rows of a training batch
    (:meth:`batch_users`); the tables themselves never see dropout.
    """

    def __init__(
        self, num_users: int, num_items: int, dim: int = 64, *, dropout: float = 0.0, init_std: float = 0.1
    ) -> None:
        super().__init__()
        self.num_users, self.num_items, self.dim = num_users, num_items, dim
        self.user = nn.Embedding(num_users, dim)
        self.item = nn.Embedding(num_items, dim)
        nn.init.normal_(self.user.weight, std=init_std)
        nn.init.normal_(self.item.weight, std=init_std)
        self.dropout = float(dropout)
        self.sparse = False  # the trainer's --sparse-grad: sparse user-row gradients

    def tables(self) -> Tuple[Tensor, Tensor]:
        return self.user.weight, self.item.weight

    def ego(self) -> Tuple[Tensor, Tensor]:
        """The layer-0 embeddings (what L2 regularizes)."""
        return self.user.weight, self.item.weight

    def batch_users(self, user_table: Tensor, users: Tensor) -> Tensor:
        # index_select, not table[users]: forward + backward 0.7 ms instead of 1.1 ms for
        # the paper's 2048 rows (advanced indexing's backward is a slower index_put)
        if self.sparse:  # --sparse-grad: a sparse gradient for the user table
            rows = F.embedding(users.long(), user_table, sparse=True)
        else:
            rows = user_table.index_select(0, users.long())
        if self.training and self.dropout > 0:
            rows = inverted_dropout(rows, self.dropout)  # F.dropout's semantics, faster on CPU
        return rows


def normalized_adjacency(
    train: sp.spmatrix, num_users: int, num_items: int, device="cpu", dtype=torch.float32
) -> Tensor:
    """``D^{-1/2} A D^{-1/2}`` of the user–item bipartite graph, as a sparse CSR tensor of
    size ``[U + I, U + I]`` (isolated nodes get zero rows)."""
    r = sp.csr_matrix(train, dtype=np.float64)
    r.data[:] = 1.0
    adj = sp.bmat([[None, r], [r.T, None]], format="csr")
    deg = np.asarray(adj.sum(axis=1)).ravel()
    inv = np.zeros_like(deg)
    inv[deg > 0] = deg[deg > 0] ** -0.5
    norm = sp.diags(inv) @ adj @ sp.diags(inv)
    norm = norm.tocsr()
    norm.sort_indices()
    # int32 indices where they fit: the CPU product converts int64 ones on every call
    index = torch.int32 if norm.nnz < 2**31 else torch.int64
    adj = _csr(
        torch.as_tensor(norm.indptr, dtype=index),
        torch.as_tensor(norm.indices, dtype=index),
        torch.as_tensor(norm.data, dtype=dtype),
        norm.shape,
    )
    return adj.to(device)


def _csr(crow: Tensor, col: Tensor, val: Tensor, shape: Tuple[int, int]) -> Tensor:
    with warnings.catch_warnings():  # "sparse CSR support is in beta"
        warnings.simplefilter("ignore", UserWarning)
        return torch.sparse_csr_tensor(crow, col, val, shape, check_invariants=False)


def _spmm(adj: Tensor, x: Tensor) -> Tensor:
    """``adj @ x`` for a sparse CSR ``adj [R, C]`` and a dense ``x [C, D]``: ``[R, D]``.

    On the CPU the product is written straight into a fresh output (``addmm`` with
    ``beta=0``, which ignores the output's contents): ``torch.sparse.mm`` zeroes an output,
    multiplies into a temporary and copies it over, twice the time of the product alone.
    """
    if adj.device.type != "cpu":
        return torch.sparse.mm(adj, x)
    out = torch.empty((adj.shape[0], x.shape[1]), dtype=x.dtype, device=x.device)
    return torch.addmm(out, adj, x.contiguous(), beta=0, out=out)


class _SymmetricSpMM(torch.autograd.Function):
    """``adj @ x`` for a *symmetric* sparse ``adj``: the backward is ``adj @ grad`` too.

    torch's own backward of ``torch.sparse.mm`` w.r.t. the dense side transposes the CSR
    matrix on every call, which made LightGCN's propagation backward 3–4× its forward
    (profiled on Gowalla / Last.fm, CPU); Â = D^{-1/2} A D^{-1/2} is symmetric, so reuse it.
    """

    @staticmethod
    def forward(ctx, adj: Tensor, x: Tensor) -> Tensor:
        ctx.adj = adj
        return _spmm(adj, x)

    @staticmethod
    def backward(ctx, grad: Tensor):
        return None, _spmm(ctx.adj, grad)


def _row_block(adj: Tensor, rows: Tensor) -> Tuple[Tensor, Tensor, Tensor]:
    """Rows ``rows`` ([R] int64) of the CSR matrix ``adj`` as ``(crow [R+1], col, val)``."""
    crow, col, val = adj.crow_indices(), adj.col_indices(), adj.values()
    start = crow.index_select(0, rows).long()
    counts = crow.index_select(0, rows + 1).long() - start
    sub_crow = torch.zeros(rows.numel() + 1, dtype=torch.int64, device=adj.device)
    torch.cumsum(counts, 0, out=sub_crow[1:])
    nnz = int(sub_crow[-1])
    at = torch.repeat_interleave(start - sub_crow[:-1], counts, output_size=nnz)
    at += torch.arange(nnz, device=adj.device)
    return sub_crow.to(col.dtype), col.index_select(0, at), val.index_select(0, at)


#: :meth:`LightGCN.rows` propagates the last layer to the batch's rows alone when their rows
#: of Â hold at most this share of its non-zeros, else through the whole tables (measured,
#: one thread: Gowalla's batches hold 14% and the step's propagation runs 1.7× faster;
#: ML-1M's and Last.fm's hold ~60% and it would run 1.6× slower).
ROW_BLOCK_MAX_SHARE = 0.25


class _PropagatedRows(torch.autograd.Function):
    """Final LightGCN vectors of the nodes ``rows`` only: ``(Σ_{k<K} E_k[rows] + Â[rows] E_{K-1}) / (K+1)``.

    The last layer is one product of the batch's rows of ``Â`` (a small share of its
    non-zeros), not of the whole graph: a training step runs 2K−2 full products instead of
    2K. Propagation is linear, so the backward needs no saved activations:
    ``g_{K-1} = scatter(G) + Â[rows]ᵀ G`` and ``g_{k-1} = scatter(G) + Â g_k`` (``Â`` is
    symmetric), with ``G = grad / (K+1)``.
    """

    @staticmethod
    def forward(ctx, adj: Tensor, rows: Tensor, ego: Tensor, layers: int) -> Tensor:
        sub_crow, sub_col, sub_val = _row_block(adj, rows)
        x, total = ego, ego.index_select(0, rows)
        for _ in range(layers - 1):
            x = _spmm(adj, x)
            total += x.index_select(0, rows)
        total += _spmm(_csr(sub_crow, sub_col, sub_val, (rows.numel(), adj.shape[1])), x)
        ctx.adj, ctx.layers = adj, layers
        ctx.save_for_backward(rows, sub_crow, sub_col, sub_val)
        return total / (layers + 1)

    @staticmethod
    def backward(ctx, grad: Tensor):
        rows, sub_crow, sub_col, sub_val = ctx.saved_tensors
        adj, layers = ctx.adj, ctx.layers
        g_rows = grad.contiguous() / (layers + 1)
        n = adj.shape[0]
        # Â[rows]ᵀ as CSR: the block's non-zeros ordered by column (stable: rows ascending within one)
        index = sub_col.dtype
        local = torch.repeat_interleave(
            torch.arange(rows.numel(), dtype=index, device=rows.device),
            sub_crow.diff(),
            output_size=sub_col.numel(),
        )
        order = torch.argsort(sub_col, stable=True)
        t_crow = torch.zeros(n + 1, dtype=index, device=rows.device)
        t_crow[1:] = torch.bincount(sub_col, minlength=n).cumsum(0)
        block_t = _csr(
            t_crow, local.index_select(0, order), sub_val.index_select(0, order), (n, rows.numel())
        )
        g = _spmm(block_t, g_rows)
        g.index_add_(0, rows, g_rows)
        for _ in range(layers - 1):
            g = _spmm(adj, g)
            g.index_add_(0, rows, g_rows)
        return None, None, g, None


class LightGCN(nn.Module):
    """LightGCN: ``E_{k+1} = Â E_k`` for K layers, final vectors = mean of ``E_0 … E_K``.

    ``Â`` is the symmetric-normalized adjacency (:func:`normalized_adjacency`), held as a
    non-persistent buffer and rebuilt from the train matrix on load.
    """

    def __init__(
        self,
        num_users: int,
        num_items: int,
        train: sp.spmatrix,
        dim: int = 64,
        *,
        layers: int = 3,
        init_std: float = 0.1,
    ) -> None:
        super().__init__()
        self.num_users, self.num_items, self.dim, self.layers = num_users, num_items, dim, int(layers)
        self.user = nn.Embedding(num_users, dim)
        self.item = nn.Embedding(num_items, dim)
        nn.init.normal_(self.user.weight, std=init_std)
        nn.init.normal_(self.item.weight, std=init_std)
        self.register_buffer("adj", normalized_adjacency(train, num_users, num_items), persistent=False)
        self.dropout = 0.0

    def tables(self) -> Tuple[Tensor, Tensor]:
        emb = torch.cat([self.user.weight, self.item.weight], 0)
        total = emb
        for _ in range(self.layers):
            emb = _SymmetricSpMM.apply(self.adj, emb)
            total = total + emb
        final = total / (self.layers + 1)
        return final[: self.num_users], final[self.num_users :]

    def rows(self, users: Tensor, items: Tensor) -> Tuple[Tensor, Tensor]:
        """The final vectors of ``users`` ``[B]`` and ``items`` ``[K]`` only: ``([B, D], [K, D])``,
        equal to ``tables()`` indexed by them. Where these rows of Â hold a small share of
        its non-zeros (:data:`ROW_BLOCK_MAX_SHARE`), the last layer is propagated to them
        alone (:class:`_PropagatedRows`), for a fraction of the whole tables' cost."""
        users, items = users.long(), items.long()
        if self.layers == 0:
            return self.user.weight.index_select(0, users), self.item.weight.index_select(0, items)
        nodes = torch.cat([users, items + self.num_users])
        distinct, inverse = torch.unique(nodes, return_inverse=True)
        crow = self.adj.crow_indices()
        block_nnz = int((crow.index_select(0, distinct + 1) - crow.index_select(0, distinct)).sum())
        if block_nnz > ROW_BLOCK_MAX_SHARE * self.adj._nnz():
            user_table, item_table = self.tables()
            return user_table.index_select(0, users), item_table.index_select(0, items)
        ego = torch.cat([self.user.weight, self.item.weight], 0)
        final = _PropagatedRows.apply(self.adj, distinct, ego, self.layers).index_select(0, inverse)
        return final[: users.numel()], final[users.numel() :]

    def ego(self) -> Tuple[Tensor, Tensor]:
        return self.user.weight, self.item.weight

    def batch_users(self, user_table: Tensor, users: Tensor) -> Tensor:
        return user_table.index_select(0, users.long())


def build_model(
    name: str,
    num_users: int,
    num_items: int,
    train: sp.spmatrix,
    *,
    dim: int = 64,
    dropout: float = 0.0,
    layers: int = 3,
    init_std: float = 0.1,
) -> nn.Module:
    if name == "mf":
        return MF(num_users, num_items, dim, dropout=dropout, init_std=init_std)
    if name == "lightgcn":
        return LightGCN(num_users, num_items, train, dim, layers=layers, init_std=init_std)
    raise ValueError(f"model must be 'mf' or 'lightgcn', got {name!r}")


@torch.no_grad()
def add_sampled_l2_grad_(
    l2: float, users: Tensor, pos: Tensor, neg: Optional[Tensor], user_w: Tensor, item_w: Tensor
) -> Tensor:
    """Add the gradient of ``l2 · sampled_l2(user_w, item_w, users, pos, neg)`` of a *global*
    batch to the tables' ``.grad`` (after backward, so after DDP's all-reduce: every rank adds
    the same) and return its value (0-dim, on the device): :func:`sampled_l2` without the
    autograd graph, ``0.5·(Σ‖U[u]‖² + Σ_items count·‖I‖²)/B`` with the item counts of
    :func:`sampled_item_counts`. ``user_w [U, D]``, ``item_w [N, D]``."""
    c = l2 / users.numel()
    counts = sampled_item_counts(pos, neg, item_w.shape[0], torch.int64)
    idx = users.long()
    u_rows = user_w.index_select(0, idx)
    for w in (user_w, item_w):
        if w.grad is None:
            w.grad = torch.zeros_like(w)
    user_w.grad.index_add_(0, idx, u_rows, alpha=c)
    item_value = add_row_l2_grad_(item_w.grad, item_w, counts, c)  # one pass over the table
    return 0.5 * c * (u_rows.pow(2).sum() + item_value)


@torch.no_grad()
def add_sparse_sampled_l2_grad_(
    l2: float, users: Tensor, pos: Tensor, neg: Optional[Tensor], user_w: Tensor, item_w: Tensor
) -> Tensor:
    """:func:`add_sampled_l2_grad_` for sparse gradients (``--sparse-grad``): the same value
    and gradient, added as sparse rows of the batch's users and touched items only."""
    from ..loss.ops import compact

    c = l2 / users.numel()
    ids, pos_local, neg_local = compact(pos, neg, num_items=item_w.shape[0])
    counts = sampled_item_counts(pos_local, neg_local, ids.numel(), item_w.dtype)
    idx = users.long()
    u_rows = user_w.index_select(0, idx)
    i_rows = item_w.index_select(0, ids)
    for w, index, values in ((user_w, idx, u_rows * c), (item_w, ids, i_rows * (c * counts[:, None]))):
        extra = torch.sparse_coo_tensor(index.unsqueeze(0), values, w.shape, check_invariants=False)
        w.grad = extra if w.grad is None else w.grad + extra
    return 0.5 * c * (u_rows.pow(2).sum() + (i_rows.pow(2).sum(1) * counts).sum())
