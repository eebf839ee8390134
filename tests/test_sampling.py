"""Negative samplers: shapes, distributions, exclusion, determinism; the batch iterator."""

import numpy as np
import pytest
import scipy.sparse as sp
import torch

from adaptau.train.sampling import BatchIterator, NegativeSampler


def train_matrix():
    # 4 users, 10 items; item popularity 0..3 (items 0,1,2 popular)
    rows = [0, 0, 0, 1, 1, 2, 2, 2, 3, 3]
    cols = [0, 1, 2, 0, 1, 0, 2, 5, 0, 9]
    return sp.csr_matrix((np.ones(len(rows)), (rows, cols)), shape=(4, 10))


def gen(seed=0):
    return torch.Generator().manual_seed(seed)


def test_uniform_shape_range_and_distribution():
    s = NegativeSampler("uniform", 10, 64)
    users = torch.arange(4).repeat(500)
    neg, logq = s.sample(users, users, gen())
    assert neg.shape == (2000, 64) and logq is None
    counts = torch.bincount(neg.flatten(), minlength=10).double()
    expected = neg.numel() / 10
    chi2 = float(((counts - expected) ** 2 / expected).sum())
    assert chi2 < 40  # 9 dof; p ~ 1e-5
    # with replacement: some rows repeat an item
    assert any(len(set(r.tolist())) < 64 for r in neg[:10])


def test_exclude_never_returns_train_items():
    m = train_matrix()
    s = NegativeSampler("exclude", 10, 50, train=m)
    users = torch.tensor([0, 1, 2, 3] * 50)
    neg, _ = s.sample(users, users, gen(1))
    dense = torch.as_tensor(m.toarray(), dtype=torch.bool)
    assert not dense[users.unsqueeze(1).expand_as(neg), neg].any()
    # user 0 excludes {0,1,2}: the other 7 items are uniform
    c = torch.bincount(neg[users == 0].flatten(), minlength=10)
    assert (c[:3] == 0).all()
    frac = c[3:].double() / c.sum()
    assert torch.allclose(frac, torch.full_like(frac, 1 / 7), atol=0.03)


def test_exclude_user_with_every_item():
    m = sp.csr_matrix(np.ones((2, 3)))
    s = NegativeSampler("exclude", 3, 4, train=m)
    with pytest.raises(ValueError, match="every item"):
        s.sample(torch.tensor([0]), torch.tensor([0]), gen())


@pytest.mark.parametrize("gamma", [1.0, 0.5])
def test_popularity_distribution_and_logq(gamma):
    m = train_matrix()
    s = NegativeSampler("popularity", 10, 1000, train=m, gamma=gamma)
    neg, logq = s.sample(torch.zeros(200, dtype=torch.long), torch.zeros(200, dtype=torch.long), gen(2))
    counts = np.asarray(m.sum(0)).ravel()
    w = counts**gamma
    w[counts == 0] = w[counts > 0].min()  # unseen items get the smallest weight
    q = w / w.sum()
    freq = torch.bincount(neg.flatten(), minlength=10).double().numpy() / neg.numel()
    assert np.allclose(freq, q, atol=0.004)
    assert logq.shape == (10,)
    assert np.allclose(logq.numpy(), np.log(10 * q), atol=1e-5)


def test_uniform_popularity_logq_is_zero():
    m = sp.csr_matrix(np.ones((3, 5)))
    s = NegativeSampler("popularity", 5, 3, train=m)
    _, logq = s.sample(torch.tensor([0, 1]), torch.tensor([0, 1]), gen())
    assert torch.allclose(logq, torch.zeros(5), atol=1e-6)


def test_shared_and_in_batch():
    s = NegativeSampler("shared", 10, 7)
    neg, logq = s.sample(torch.arange(4), torch.arange(4), gen())
    assert neg.shape == (7,) and logq is None
    s = NegativeSampler("in-batch", 10, 0)
    assert s.sample(torch.arange(4), torch.arange(4), gen()) == (None, None)


def test_generator_determinism():
    s = NegativeSampler("uniform", 100, 16)
    g = gen(5)
    state = g.get_state()
    a, _ = s.sample(torch.arange(8), torch.arange(8), g)
    g.set_state(state)
    b, _ = s.sample(torch.arange(8), torch.arange(8), g)
    assert torch.equal(a, b)


def test_bad_arguments():
    with pytest.raises(ValueError, match="sampler must be one of"):
        NegativeSampler("nope", 10, 4)
    with pytest.raises(ValueError, match="--negatives"):
        NegativeSampler("uniform", 10, 0)
    with pytest.raises(ValueError, match="needs the train matrix"):
        NegativeSampler("popularity", 10, 4)


def test_batch_iterator_covers_each_pair_once():
    users = torch.arange(103)
    items = users * 2
    it = BatchIterator(users, items, 10)
    assert len(it) == 11
    seen = []
    for u, i in it.epoch(gen(3)):
        assert torch.equal(i, u * 2)
        seen += u.tolist()
    assert sorted(seen) == list(range(103))
    it = BatchIterator(users, items, 10, drop_last=True)
    assert len(it) == 10 and sum(u.numel() for u, _ in it.epoch(gen())) == 100
    # sharded: two ranks split every batch
    parts = [BatchIterator(users, items, 10, rank=r, world_size=2) for r in (0, 1)]
    got = [sorted(sum((u.tolist() for u, _ in p.epoch(gen(4))), [])) for p in parts]
    assert sorted(got[0] + got[1]) == list(range(103)) and not set(got[0]) & set(got[1])


def test_parallel_uniform_negatives_op():
    """torch.ops.adaptau.uniform_negatives: int32 in range, uniform (chi-square over a
    non-power-of-two catalog), a pure function of the seed (thread count does not matter),
    different seeds give different draws, clear errors on bad sizes."""
    import subprocess
    import sys
    import textwrap
    from scipy import stats

    op = torch.ops.adaptau.uniform_negatives
    out = op(300, 257, 1009, 42)
    assert out.dtype == torch.int32 and out.shape == (300, 257)
    assert int(out.min()) >= 0 and int(out.max()) < 1009
    counts = torch.bincount(out.flatten().long(), minlength=1009).double().numpy()
    assert stats.chisquare(counts).pvalue > 1e-4
    assert torch.equal(out, op(300, 257, 1009, 42))
    assert not torch.equal(out, op(300, 257, 1009, 43))
    one = op(1, 5, 1, -7)
    assert torch.equal(one, torch.zeros(1, 5, dtype=torch.int32))
    script = textwrap.dedent("""
        import torch, adaptau.train.sampling
        torch.set_num_threads(1)
        print(int(torch.ops.adaptau.uniform_negatives(300, 257, 1009, 42).long().sum()))
    """)
    res = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr[-2000:]
    assert int(res.stdout.strip()) == int(out.long().sum())
    with pytest.raises(RuntimeError, match="num_items"):
        op(2, 2, 0, 1)
    with pytest.raises(RuntimeError, match="rows and cols"):
        op(-1, 2, 5, 1)


def test_uniform_sampler_is_reproducible_from_the_generator_state():
    s = NegativeSampler("uniform", 1000, 16)
    users = torch.arange(8)
    g = gen(3)
    state = g.get_state()
    a, _ = s.sample(users, users, g)
    b, _ = s.sample(users, users, g)
    g.set_state(state)
    a2, _ = s.sample(users, users, g)
    assert torch.equal(a, a2) and not torch.equal(a, b)
    shared, _ = NegativeSampler("shared", 1000, 16).sample(users, users, gen(3))
    assert shared.shape == (16,) and int(shared.max()) < 1000


@pytest.mark.parametrize("dtype", [torch.int32, torch.int64])
@pytest.mark.parametrize("shape", [(0,), (1,), (7, 3), (300, 1000)])
def test_item_counts_op_matches_bincount(dtype, shape):
    # exact integer counts, independent of the thread count (each thread counts a slice)
    from adaptau.train.models import sampled_item_counts

    g = torch.Generator().manual_seed(11 + len(shape))
    n_items = 1237
    idx = torch.randint(0, n_items, shape, generator=g, dtype=dtype)
    want = torch.bincount(idx.reshape(-1).long(), minlength=n_items)
    for threads in (1, 2, 3):
        prev = torch.get_num_threads()
        torch.set_num_threads(threads)
        try:
            got = torch.ops.adaptau.item_counts(idx, n_items)
        finally:
            torch.set_num_threads(prev)
        assert got.dtype == torch.int64 and got.shape == (n_items,)
        assert torch.equal(got, want)
    # non-contiguous input; and the trainer's helper (positives + per-row / shared negatives)
    if len(shape) == 2:
        assert torch.equal(torch.ops.adaptau.item_counts(idx.t(), n_items), want)
        pos = idx[:, 0]
        both = sampled_item_counts(pos, idx, n_items, torch.float64)
        assert torch.equal(both, (want + torch.bincount(pos.long(), minlength=n_items)).double())
        shared = sampled_item_counts(pos, idx[0], n_items, torch.float32)
        ref = torch.bincount(pos.long(), minlength=n_items) + shape[0] * torch.bincount(
            idx[0].long(), minlength=n_items
        )
        assert torch.equal(shared, ref.float())


def test_item_counts_op_rejects_bad_input():
    with pytest.raises(RuntimeError, match="outside"):
        torch.ops.adaptau.item_counts(torch.tensor([0, 5, 3]), 5)
    with pytest.raises(RuntimeError, match="outside"):
        torch.ops.adaptau.item_counts(torch.full((200000,), -1, dtype=torch.int32), 5)
    with pytest.raises(RuntimeError, match="int32 or int64"):
        torch.ops.adaptau.item_counts(torch.zeros(3), 5)
    with pytest.raises(RuntimeError, match="num_items"):
        torch.ops.adaptau.item_counts(torch.zeros(3, dtype=torch.long), 0)


def test_dropout_mask_op_and_dropout():
    """torch.ops.adaptau.dropout_mask: values {0, 1/(1-p)}, drop rate p (binomial test), a
    pure function of the seed (thread count does not matter), clear errors; and
    adaptau.train.sampling.dropout: F.dropout's semantics (mean preserved, gradient is the mask),
    reproducible from torch's generator state, identity for p = 0."""
    import subprocess
    import sys
    import textwrap
    from scipy import stats

    from adaptau.train.sampling import dropout

    op = torch.ops.adaptau.dropout_mask
    for p, shape in ((0.1, (301, 67)), (0.5, (1, 1001)), (0.9, (64, 33))):
        m = op(*shape, p, 11)
        assert m.dtype == torch.float32 and m.shape == shape
        keep = torch.tensor(1.0 / (1.0 - p), dtype=torch.float32)
        assert bool(((m == 0) | (m == keep)).all())
        dropped = int((m == 0).sum())
        assert stats.binomtest(dropped, m.numel(), p).pvalue > 1e-4
        assert torch.equal(m, op(*shape, p, 11)) and not torch.equal(m, op(*shape, p, 12))
    assert bool((op(5, 7, 0.0, 3) == 1).all())
    script = textwrap.dedent("""
        import torch, adaptau.train.sampling
        torch.set_num_threads(1)
        print(int((torch.ops.adaptau.dropout_mask(301, 67, 0.3, 42) == 0).sum()))
    """)
    res = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr[-2000:]
    assert int(res.stdout.strip()) == int((op(301, 67, 0.3, 42) == 0).sum())
    with pytest.raises(RuntimeError, match="p must be in"):
        op(2, 2, 1.0, 1)
    with pytest.raises(RuntimeError, match="rows and cols"):
        op(-1, 2, 0.5, 1)

    x = torch.randn(400, 64, requires_grad=True)
    torch.manual_seed(5)
    y = dropout(x, 0.25)
    torch.manual_seed(5)
    assert torch.equal(y, dropout(x, 0.25))
    mask = (y.detach() / x.detach()).nan_to_num()
    assert bool(((y == 0) | torch.isclose(y, x / 0.75)).all())
    assert abs(float((y == 0).float().mean()) - 0.25) < 0.02
    y.sum().backward()
    torch.testing.assert_close(x.grad, mask, rtol=1e-6, atol=1e-6)
    assert dropout(x, 0.0) is x
    assert bool((dropout(x, 1.0) == 0).all())


@pytest.mark.parametrize("pool", ["uniform", "popularity"])
def test_mixed_sampler_logq_is_each_sources_expected_count(pool):
    """--sampler mixed: in-batch negatives with logQ log((B-1)·p(i)), p the items' share of the
    interactions, and a shared pool of M with logQ log(M·q(i)) (q uniform: log(M/N))."""
    import numpy as np
    import scipy.sparse as sp

    import adaptau
    from adaptau.train.sampling import NegativeSampler

    rows = np.array([0, 0, 1, 2, 2, 2, 3])
    cols = np.array([0, 1, 1, 1, 2, 4, 4])
    train = sp.csr_matrix((np.ones(7), (rows, cols)), shape=(4, 6))
    s = NegativeSampler("mixed", 6, 5, train=train, gamma=1.0, pool=pool)
    users, pos = torch.tensor([0, 1, 2]), torch.tensor([1, 1, 4])
    neg, logq = s.sample(users, pos, torch.Generator().manual_seed(0))
    assert isinstance(neg, adaptau.Negatives) and logq is None and neg.in_batch
    counts = torch.tensor([1.0, 3.0, 1.0, 0.5, 2.0, 0.5])  # (unseen items: half a count)
    share = counts / 7.0
    torch.testing.assert_close(neg.in_batch_logq, torch.log(2 * share).float())
    assert neg.shared.shape == (5,)
    if pool == "uniform":
        torch.testing.assert_close(neg.shared_logq, torch.full((6,), float(np.log(5 / 6))))
    else:
        q = torch.tensor([1.0, 3.0, 1.0, 1.0, 2.0, 1.0])  # unseen: the least seen weight
        torch.testing.assert_close(neg.shared_logq, torch.log(5 * q / q.sum()).float())
        assert set(neg.shared.tolist()) <= set(range(6))


def test_mixed_sampler_trains(tmp_path):
    from adaptau.train import cli

    assert (
        cli.main(
            [
                "train",
                "--data",
                "synthetic:num_users=300,num_items=200",
                "--dim",
                "8",
                "--batch-size",
                "64",
                "--negatives",
                "32",
                "--sampler",
                "mixed",
                "--epochs",
                "2",
                "--progress",
                "off",
                "--out",
                str(tmp_path / "run"),
            ]
        )
        == 0
    )
    import json

    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["status"] == "completed" and summary["valid"]["recall@20"] > 0


def test_hard_negatives_are_the_best_scoring_candidates_but_the_positive():
    from adaptau.train.sampling import hard_negatives

    gen = torch.Generator().manual_seed(3)
    angle = torch.linspace(0, 1.5, 60)  # item i at angle i: a user along x prefers low ids
    items = torch.stack([angle.cos(), angle.sin(), torch.zeros(60), torch.zeros(60)], 1)
    u = torch.tensor([[1.0, 0, 0, 0], [2.0, 0, 0, 0]])
    pos = torch.tensor([5, 0])
    state = gen.get_state()
    hard = hard_negatives(u, items, pos, 3, gen)
    gen.set_state(state)
    cand = torch.randint(0, 60, (2, 24), generator=gen)  # the same 8·count candidates
    assert hard.shape == (2, 3)
    for row in range(2):
        others = cand[row][cand[row] != pos[row]]
        assert sorted(hard[row].tolist()) == sorted(others.tolist())[:3]
        assert int(pos[row]) not in hard[row].tolist()


@pytest.mark.parametrize("membership", ["bitmap", "sorted keys"])
def test_exclude_draws_what_redrawing_every_rejected_slot_draws(membership, monkeypatch):
    """The exclude sampler checks only the slots it redraws; its draws equal those of the
    plain rule (redraw every rejected slot, in row-major order, re-check everything), with
    either membership test (a bit per pair, or a binary search in the sorted pairs)."""
    import adaptau.train.sampling as sampling

    if membership == "sorted keys":
        monkeypatch.setattr(sampling, "_SEEN_BITMAP_BYTES", 0)
    rng = np.random.default_rng(4)
    m = sp.random(30, 40, density=0.6, random_state=5, format="csr")  # heavy users: many rounds
    s = NegativeSampler("exclude", 40, 33, train=m)
    assert (s._seen_bits is None) == (membership == "sorted keys")
    users = torch.as_tensor(rng.integers(0, 30, 64))
    neg, _ = s.sample(users, users, gen(7))

    g = gen(7)
    want = s._uniform((64, 33), g)
    seen = torch.as_tensor(m.toarray() != 0)
    rows = users.unsqueeze(1).expand_as(want)
    bad = seen[rows, want]
    while bad.any():
        want[bad] = s._uniform((int(bad.sum()),), g)
        bad = seen[rows, want]
    assert torch.equal(neg, want)
    assert not seen[rows, neg].any()
