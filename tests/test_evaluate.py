"""full_ranking against a hand-computed case; masking, skipping, chunking."""

import math

import numpy as np
import pytest
import scipy.sparse as sp
import torch

from adaptau.train.evaluate import by_user_degree, format_metrics, full_ranking


def csr(rows, n_users=4, n_items=5):
    r, c = [], []
    for u, items in rows.items():
        r += [u] * len(items)
        c += items
    return sp.csr_matrix((np.ones(len(r)), (r, c)), shape=(n_users, n_items))


# Scores are the item index for every user (1-D embeddings): ranking is 4, 3, 2, 1, 0.
USERS = torch.ones(4, 1)
ITEMS = torch.arange(5, dtype=torch.float32).unsqueeze(1)


def test_hand_computed():
    test = csr({0: [4, 0], 1: [1], 2: [3, 2, 1]})  # user 3: no test items, skipped
    exclude = csr({0: [3], 1: [4, 3], 2: []})
    pop = np.array([5.0, 4.0, 3.0, 2.0, 1.0])
    out = full_ranking(USERS, ITEMS, test, exclude, ks=(2, 3), item_popularity=pop)
    # top lists: u0 [4,2,1] ; u1 [2,1,0] ; u2 [4,3,2]
    # K=2: u0 hits {4} of 2 -> recall 1/2, u1 [2,1] hits {1} -> 1, u2 [4,3] hits {3} -> 1/3
    d = [1 / math.log2(r + 2) for r in range(3)]
    assert out["recall@2"] == pytest.approx((1 / 2 + 1 + 1 / 3) / 3)
    assert out["precision@2"] == pytest.approx((1 + 1 + 1) / 2 / 3)
    assert out["hit@2"] == pytest.approx(1.0)
    ndcg0 = d[0] / (d[0] + d[1])  # |T|=2
    ndcg1 = d[1] / d[0]  # |T|=1: idcg over 1 position
    ndcg2 = d[1] / (d[0] + d[1])  # |T|=3 > K: idcg over K positions
    assert out["ndcg@2"] == pytest.approx((ndcg0 + ndcg1 + ndcg2) / 3)
    # K=3: u0 [4,2,1] -> 1/2 ; u1 [2,1,0] -> 1 ; u2 [4,3,2] -> 2/3
    assert out["recall@3"] == pytest.approx((1 / 2 + 1 + 2 / 3) / 3)
    assert out["precision@3"] == pytest.approx((1 + 1 + 2) / 3 / 3)
    ndcg2_3 = (d[1] + d[2]) / sum(d)
    ndcg1_3 = d[1] / d[0]
    ndcg0_3 = d[0] / (d[0] + d[1])
    assert out["ndcg@3"] == pytest.approx((ndcg0_3 + ndcg1_3 + ndcg2_3) / 3)
    # popularity figures
    assert out["coverage@2"] == pytest.approx(4 / 5)  # u0 [4,2], u1 [2,1], u2 [4,3]
    assert out["coverage@3"] == pytest.approx(5 / 5)
    arp2 = (np.mean(pop[[4, 2]]) + np.mean(pop[[2, 1]]) + np.mean(pop[[4, 3]])) / 3
    assert out["arp@2"] == pytest.approx(arp2)
    # tail = least popular 80% = items {4, 3, 2, 1}: K=2 slots 6, non-tail slots: none
    assert out["tail@2"] == pytest.approx(6 / 6)
    # K=3 slots: u1's item 0 is the only head item
    assert out["tail@3"] == pytest.approx(8 / 9)


def test_coverage_counts_distinct_items():
    test = csr({0: [4], 1: [1], 2: [2]})
    exclude = csr({0: [3], 1: [4, 3], 2: []})
    out = full_ranking(USERS, ITEMS, test, exclude, ks=2)
    # u0 [4,2], u1 [2,1], u2 [4,3] -> {1,2,3,4}
    assert out["coverage@2"] == pytest.approx(4 / 5)
    assert "arp@2" not in out and "tail@2" not in out


def test_no_exclude_and_k_larger_than_catalog():
    test = csr({0: [0, 1]})
    out = full_ranking(USERS, ITEMS, test, None, ks=(10,))
    assert out["recall@10"] == pytest.approx(1.0)
    assert out["precision@10"] == pytest.approx(2 / 10)
    exclude = csr({0: [0, 2, 3, 4]})
    out = full_ranking(USERS, ITEMS, test, exclude, ks=(3,))
    # only item 1 can be recommended; the excluded test item 0 is a miss
    assert out["recall@3"] == pytest.approx(0.5)


def test_empty_test():
    out = full_ranking(USERS, ITEMS, csr({}), None, ks=(5,))
    assert out["recall@5"] == 0.0 and out["coverage@5"] == 0.0


def test_chunking_matches_one_chunk():
    rng = np.random.RandomState(0)
    nu, ni = 50, 40
    test = sp.random(nu, ni, density=0.1, random_state=1, format="csr")
    exclude = sp.random(nu, ni, density=0.2, random_state=2, format="csr")
    u = torch.as_tensor(rng.randn(nu, 8), dtype=torch.float32)
    v = torch.as_tensor(rng.randn(ni, 8), dtype=torch.float32)
    pop = rng.randint(0, 20, size=ni)
    a = full_ranking(u, v, test, exclude, ks=(5, 10), item_popularity=pop, chunk_size=7)
    b = full_ranking(u, v, test, exclude, ks=(5, 10), item_popularity=pop, chunk_size=1000)
    assert a.keys() == b.keys()
    for k in a:
        assert a[k] == pytest.approx(b[k], rel=1e-9, abs=1e-12)


def test_bad_shapes():
    with pytest.raises(ValueError, match="shape"):
        full_ranking(USERS, ITEMS, csr({0: [1]}, n_items=6))
    with pytest.raises(TypeError):
        full_ranking(USERS, ITEMS, np.zeros((4, 5)))
    with pytest.raises(ValueError, match="ks"):
        full_ranking(USERS, ITEMS, csr({0: [1]}), ks=(0,))


def test_format_metrics():
    text = format_metrics({"valid": {"recall@20": 0.5, "ndcg@20": 0.25}}, ks=(20,))
    assert "recall@20" in text and "0.5000" in text


def _recbole_mrr_map(top_lists, test_sets, k):
    """RecBole's MRR@K and MAP@K (recbole/evaluator/metrics.py), written out per user:
    MRR = 1 / rank of the first hit (0 without one); MAP = Σ_r hit_r · precision@r / min(|T|, K)."""
    mrr, ap = [], []
    for top, truth in zip(top_lists, test_sets):
        hits = np.array([item in truth for item in top[:k]], dtype=float)
        first = np.flatnonzero(hits)
        mrr.append(1.0 / (first[0] + 1) if first.size else 0.0)
        precision = np.cumsum(hits) / np.arange(1, k + 1)
        ap.append(float((precision * hits).sum()) / min(len(truth), k))
    return float(np.mean(mrr)), float(np.mean(ap))


@pytest.mark.parametrize("k", [1, 3, 7])
def test_mrr_and_map_match_recbole(seed, k):
    rng = np.random.default_rng(seed)
    n_users, n_items, dim = 30, 25, 6
    users = torch.as_tensor(rng.normal(size=(n_users, dim)))
    items = torch.as_tensor(rng.normal(size=(n_items, dim)))
    test_sets = [
        set(rng.choice(n_items, size=rng.integers(1, 6), replace=False).tolist()) for _ in range(n_users)
    ]
    test = sp.csr_matrix(
        (
            np.ones(sum(map(len, test_sets))),
            ([u for u, t in enumerate(test_sets) for _ in t], [i for t in test_sets for i in sorted(t)]),
        ),
        shape=(n_users, n_items),
    )
    order = torch.argsort(users @ items.T, dim=1, descending=True).numpy()
    want_mrr, want_map = _recbole_mrr_map(order, test_sets, k)
    got = full_ranking(users, items, test, ks=[k])
    assert got[f"mrr@{k}"] == pytest.approx(want_mrr, abs=1e-12)
    assert got[f"map@{k}"] == pytest.approx(want_map, abs=1e-12)


@pytest.mark.parametrize("groups", [1, 3, 7])
def test_by_user_degree_partitions_the_evaluated_users(groups):
    """The groups cover every user with a test item exactly once, from the lightest to the
    heaviest, users of one degree share a group, and the user-weighted mean of a per-user
    metric over the groups is the overall figure."""
    rng = np.random.default_rng(5)
    nu, ni, d = 61, 40, 8
    users, items = torch.from_numpy(rng.normal(size=(nu, d))), torch.from_numpy(rng.normal(size=(ni, d)))
    train = sp.random(nu, ni, density=0.2, random_state=1, format="csr")
    test = sp.random(nu, ni, density=0.05, random_state=2, format="csr")
    test.data[:] = 1.0
    degree = np.diff(train.indptr)
    overall = full_ranking(users, items, test, train, ks=5)
    rows = by_user_degree(users, items, test, train, degree, groups, ks=5)
    sizes = [int(name.split("(")[1].split()[0]) for name in rows]
    assert sum(sizes) == int((np.diff(test.indptr) > 0).sum())
    assert len(rows) <= groups
    bounds = [tuple(int(x) for x in name.split()[1].split("-")) for name in rows]
    assert all(lo <= hi for lo, hi in bounds)
    assert all(prev[1] < nxt[0] for prev, nxt in zip(bounds, bounds[1:]))  # disjoint degrees
    for metric in ("recall@5", "ndcg@5", "hit@5"):
        mean = sum(n * r[metric] for n, r in zip(sizes, rows.values())) / sum(sizes)
        assert mean == pytest.approx(overall[metric], rel=1e-12, abs=1e-12)


def test_by_user_degree_rejects_bad_input():
    users, items = torch.zeros(3, 2), torch.zeros(4, 2)
    test = sp.csr_matrix(np.eye(3, 4))
    with pytest.raises(ValueError, match="groups"):
        by_user_degree(users, items, test, None, np.zeros(3), 0)
    with pytest.raises(ValueError, match="degree"):
        by_user_degree(users, items, test, None, np.zeros(4), 2)
