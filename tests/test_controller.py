"""The Adap-τ controller on a constructed dataset, computed independently with numpy/scipy."""

import math
import os
import tempfile

import numpy as np
import pytest
import scipy.special
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import adaptau
from adaptau import AdapTau, AdapTauLoss

NUM_USERS, NUM_ITEMS, DIM = 12, 20, 8  # users 10 and 11 have no interactions


def interactions():
    users, items = [], []
    for u in range(10):  # user u has u + 1 interactions
        for k in range(u + 1):
            users.append(u)
            items.append((3 * u + k) % NUM_ITEMS)
    return torch.tensor(users), torch.tensor(items)


def expected_c(users):
    counts = np.bincount(users.numpy(), minlength=NUM_USERS)
    theta = np.quantile(counts[counts > 0], 0.2)  # linear interpolation: 2.8
    active = counts > theta
    return 2 * (math.log(0.5) + math.log(active.sum() * NUM_ITEMS) - math.log(counts[active].sum())), active


def aligned_tables(users, items, gen):
    item_vectors = torch.randn(NUM_ITEMS, DIM, dtype=torch.float64, generator=gen)
    user_vectors = torch.randn(NUM_USERS, DIM, dtype=torch.float64, generator=gen) * 0.1
    user_vectors.index_add_(0, users, item_vectors[items])  # users point at their items
    return user_vectors, item_vectors


def expected_w0(users, items, user_vectors, item_vectors):
    c, active = expected_c(users)
    un = user_vectors.numpy() / np.linalg.norm(user_vectors.numpy(), axis=1, keepdims=True)
    vn = item_vectors.numpy() / np.linalg.norm(item_vectors.numpy(), axis=1, keepdims=True)
    keep = active[users.numpy()]
    p_bar = np.mean(np.sum(un[users.numpy()[keep]] * vn[items.numpy()[keep]], axis=1))
    a_bar = np.mean(un[active] @ vn.mean(0))
    return c / (2 * (p_bar - a_bar))


def make(mode="adaptive", **kw):
    users, items = interactions()
    kw.setdefault("warmup", 2)
    return AdapTau(users, items, num_users=NUM_USERS, num_items=NUM_ITEMS, mode=mode, **kw)


def feed(ctl, gen, seen_users=range(7)):
    rows_u, rows_raw = [], []
    for u in seen_users:
        for _ in range(u % 3 + 1):
            rows_u.append(u)
            rows_raw.append(float(torch.rand((), generator=gen)) * 3.0 + 0.1 * u)
    ctl.observe(torch.tensor(rows_u), torch.tensor(rows_raw, dtype=torch.float32))
    return np.array(rows_u), np.array(rows_raw, dtype=np.float32).astype(np.float64)


def expected_scales(w0, rows_u, rows_raw, base, t2):
    scale = np.full(NUM_USERS, w0)
    seen = np.unique(rows_u)
    mean = np.array([rows_raw[rows_u == u].mean() for u in seen])
    baseline = mean.mean() if base == "mean" else np.quantile(mean, base)
    z = np.clip((mean - baseline) / t2, -1 / math.e, 1000)
    with np.errstate(invalid="ignore"):
        w = np.where(z <= -1 / math.e, -1.0, scipy.special.lambertw(z).real)  # scipy: nan at -1/e
    scale[seen] = w0 * np.exp(-w)
    return scale


def test_warmup_w0_is_c_over_1_4():
    users, _ = interactions()
    ctl = make(warmup=3)
    for epoch in range(3):
        ctl.begin_epoch(epoch)
        assert ctl.w0 == pytest.approx(expected_c(users)[0] / 1.4, rel=1e-12)
    pos, neg = ctl.scales(torch.tensor([0, 5, 11]))
    assert pos == pytest.approx(ctl.w0) and torch.allclose(neg, torch.full((3,), ctl.w0))


def test_post_warmup_w0_from_embeddings(seed):
    gen = torch.Generator().manual_seed(seed)
    users, items = interactions()
    uv, iv = aligned_tables(users, items, gen)
    ctl = make(warmup=1)
    ctl.begin_epoch(0)
    ctl.begin_epoch(1, uv, iv)
    assert ctl.w0 == pytest.approx(expected_w0(users, items, uv, iv), rel=1e-10)


def test_post_warmup_keeps_w0_when_gap_not_positive(seed):
    gen = torch.Generator().manual_seed(seed)
    users, items = interactions()
    uv, iv = aligned_tables(users, items, gen)
    ctl = make(warmup=1)
    ctl.begin_epoch(0)
    before = ctl.w0
    ctl.begin_epoch(1, -uv, iv)  # users point away from their items: p̄ − ā < 0
    assert ctl.w0 == before


@pytest.mark.parametrize("base,t2", [("mean", 1.0), ("mean", 0.25), (0.75, 0.6), (0.9, 0.25)])
def test_per_user_scales_by_lambert_w(seed, base, t2):
    gen = torch.Generator().manual_seed(seed)
    users, items = interactions()
    uv, iv = aligned_tables(users, items, gen)
    ctl = make(base=base, smoothing=t2, warmup=1)
    ctl.begin_epoch(0)
    assert torch.allclose(ctl.user_scale.double(), torch.full((NUM_USERS,), ctl.w0, dtype=torch.float64))
    rows_u, rows_raw = feed(ctl, gen)
    ctl.begin_epoch(1, uv, iv)
    want = expected_scales(ctl.w0, rows_u, rows_raw, base, t2)
    np.testing.assert_allclose(ctl.user_scale.double().numpy(), want, rtol=1e-6)
    # unseen users (7..11) get exactly w0
    np.testing.assert_allclose(ctl.user_scale[7:].double().numpy(), ctl.w0, rtol=1e-7)
    pos, neg = ctl.scales(torch.tensor([3, 8]))
    assert pos == ctl.w0 and neg[0].item() == pytest.approx(want[3], rel=1e-6)
    # the statistics are consumed: an epoch with no observations resets to w0
    ctl.begin_epoch(2, uv, iv)
    np.testing.assert_allclose(ctl.user_scale.double().numpy(), ctl.w0, rtol=1e-7)


def test_mode_fixed():
    ctl = make(mode="fixed", tau=0.2)
    gen = torch.Generator().manual_seed(0)
    ctl.begin_epoch(0)
    feed(ctl, gen)
    ctl.begin_epoch(5, torch.randn(NUM_USERS, DIM), torch.randn(NUM_ITEMS, DIM))
    pos, neg = ctl.scales(torch.arange(NUM_USERS))
    assert pos == pytest.approx(5.0) and torch.allclose(neg, torch.full((NUM_USERS,), 5.0))


def test_mode_global(seed):
    gen = torch.Generator().manual_seed(seed)
    users, items = interactions()
    uv, iv = aligned_tables(users, items, gen)
    ctl = make(mode="global", warmup=1)
    ctl.begin_epoch(0)
    feed(ctl, gen)
    ctl.begin_epoch(1, uv, iv)
    assert ctl.w0 == pytest.approx(expected_w0(users, items, uv, iv), rel=1e-10)
    np.testing.assert_allclose(ctl.user_scale.double().numpy(), ctl.w0, rtol=1e-7)


@pytest.mark.parametrize("mode", ["adaptive", "global", "fixed"])
def test_needs_raw_loss_exactly_when_raw_losses_change_the_scales(mode, seed):
    # needs_raw_loss lets callers skip return_raw and observe(): it must be True whenever
    # the observed losses move the scales, and False only when they cannot.
    gen = torch.Generator().manual_seed(seed)
    users, items = interactions()
    uv, iv = aligned_tables(users, items, gen)
    scales = []
    for observed in (False, True):
        ctl = make(mode=mode, warmup=1, base=0.75, **({"tau": 0.2} if mode == "fixed" else {}))
        ctl.begin_epoch(0)
        if observed:
            feed(ctl, torch.Generator().manual_seed(seed + 1))
        ctl.begin_epoch(1, uv, iv)
        scales.append(ctl.scales(torch.arange(NUM_USERS))[1].clone())
    assert ctl.needs_raw_loss == (mode == "adaptive")
    assert torch.equal(scales[0], scales[1]) == (not ctl.needs_raw_loss)


def test_loss_module_skips_raw_losses_when_the_mode_does_not_use_them(seed):
    gen = torch.Generator().manual_seed(seed)
    users, items = interactions()
    uv, iv = aligned_tables(users, items, gen)
    rows = torch.arange(8)
    neg = torch.randint(0, NUM_ITEMS, (8, 5), generator=gen)
    losses = {}
    for mode in ("global", "adaptive"):
        crit = AdapTauLoss(
            users, items, num_users=NUM_USERS, num_items=NUM_ITEMS, warmup=1, mode=mode, backend="reference"
        )
        crit.begin_epoch(0)
        losses[mode] = crit(uv[users[rows]], iv, items[rows], neg, users[rows])
        assert losses[mode].dim() == 0 and torch.isfinite(losses[mode])
        observed = int(crit.controller._loss_count.sum())
        assert observed == (rows.numel() if mode == "adaptive" else 0)
    # before warm-up ends both modes train with β = w₀: the same loss
    torch.testing.assert_close(losses["global"], losses["adaptive"], rtol=0, atol=0)


def test_state_dict_round_trip(seed):
    gen = torch.Generator().manual_seed(seed)
    users, items = interactions()
    uv, iv = aligned_tables(users, items, gen)
    a = make(base=0.9, smoothing=0.25, warmup=1)
    a.begin_epoch(0)
    feed(a, gen)
    a.begin_epoch(1, uv, iv)
    feed(a, gen, seen_users=range(2, 9))  # pending statistics travel too
    b = make(base="mean", smoothing=1.0, warmup=5)
    b.load_state_dict(a.state_dict())
    assert (b.w0, b.epoch, b.base, b.smoothing, b.warmup) == (a.w0, a.epoch, 0.9, 0.25, 1)
    assert torch.equal(a.user_scale, b.user_scale)
    a.begin_epoch(2, uv, iv)
    b.begin_epoch(2, uv, iv)
    assert a.w0 == b.w0 and torch.equal(a.user_scale, b.user_scale)
    s = a.summary()
    assert set(s) == {"w0", "tau_min", "tau_median", "tau_max"}
    assert s["tau_min"] <= s["tau_median"] <= s["tau_max"]


def test_bad_arguments():
    users, items = interactions()
    with pytest.raises(ValueError, match="mode"):
        AdapTau(users, items, mode="warm")
    with pytest.raises(ValueError, match="base"):
        AdapTau(users, items, base=1.5)
    with pytest.raises(ValueError, match="smoothing"):
        AdapTau(users, items, smoothing=0.0)
    with pytest.raises(TypeError):
        AdapTau(users.float(), items)
    with pytest.raises(ValueError, match="same length"):
        AdapTau(users, items[:-1])
    ctl = make(warmup=0)
    with pytest.raises(ValueError, match="needs user_vectors"):
        ctl.begin_epoch(0)
    with pytest.raises(ValueError, match="user_vectors must be"):
        ctl.begin_epoch(0, torch.randn(3, DIM), torch.randn(NUM_ITEMS, DIM))


def test_adaptau_loss_module_drives_controller(seed):
    gen = torch.Generator().manual_seed(seed)
    users, items = interactions()
    crit = AdapTauLoss(users, items, num_users=NUM_USERS, num_items=NUM_ITEMS, warmup=1, backend="reference")
    uv, iv = aligned_tables(users, items, gen)
    uv.requires_grad_()
    iv.requires_grad_()
    crit.begin_epoch(0)
    rows = torch.arange(8)
    neg = torch.randint(0, NUM_ITEMS, (8, 5), generator=gen)
    loss = crit(uv[users[rows]], iv, items[rows], neg, users[rows])
    loss.backward()
    assert torch.isfinite(loss) and uv.grad is not None
    _, raw = adaptau.softmax_loss(
        uv[users[rows]].detach(),
        iv.detach(),
        items[rows],
        neg,
        1.0,
        1.0,
        reduction="none",
        return_raw=True,
        backend="reference",
    )
    sums = torch.zeros(NUM_USERS, dtype=torch.float64).index_add_(0, users[rows], raw.double())
    assert torch.allclose(crit.controller._loss_sum, sums)
    crit.eval()
    crit(uv[users[rows]], iv, items[rows], neg, users[rows])  # eval mode observes nothing
    assert torch.allclose(crit.controller._loss_sum, sums)
    state = crit.state_dict()
    clone = AdapTauLoss(users, items, num_users=NUM_USERS, num_items=NUM_ITEMS, warmup=1)
    clone.load_state_dict(state)
    assert torch.equal(clone.controller._loss_sum, crit.controller._loss_sum)


def _distributed_worker(rank, world, init_file, result_file, seed):
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    gen = torch.Generator().manual_seed(seed)
    users, items = interactions()
    uv, iv = aligned_tables(users, items, gen)
    ctl = make(warmup=1, base=0.75)
    ctl.begin_epoch(0)
    rows_u = torch.tensor([u for u in range(9) for _ in range(u % 3 + 1)])
    rows_raw = torch.linspace(0.1, 4.0, rows_u.numel())
    mine = torch.arange(rows_u.numel()) % world == rank  # each rank sees half the rows
    ctl.observe(rows_u[mine], rows_raw[mine])
    ctl.begin_epoch(1, uv, iv)
    gathered = [torch.zeros(NUM_USERS) for _ in range(world)]
    dist.all_gather(gathered, ctl.user_scale)
    if rank == 0:
        torch.save({"scales": torch.stack(gathered), "w0": ctl.w0}, result_file)
    dist.destroy_process_group()


def test_distributed_all_reduce_gives_identical_scales(seed):
    with tempfile.TemporaryDirectory() as tmp:
        init_file, result_file = os.path.join(tmp, "init"), os.path.join(tmp, "result.pt")
        mp.spawn(_distributed_worker, args=(2, init_file, result_file, seed), nprocs=2, join=True)
        result = torch.load(result_file)
    gen = torch.Generator().manual_seed(seed)
    users, items = interactions()
    uv, iv = aligned_tables(users, items, gen)
    single = make(warmup=1, base=0.75)
    single.begin_epoch(0)
    rows_u = torch.tensor([u for u in range(9) for _ in range(u % 3 + 1)])
    single.observe(rows_u, torch.linspace(0.1, 4.0, rows_u.numel()))
    single.begin_epoch(1, uv, iv)
    assert torch.equal(result["scales"][0], result["scales"][1])
    torch.testing.assert_close(result["scales"][0], single.user_scale, rtol=1e-6, atol=0)
