"""A deterministic synthetic implicit-feedback dataset (the trainer's default data).

Users and items get latent factors; item popularity follows a power law; each user's
activity is heavy-tailed. User u picks n_u distinct items with probability proportional to
``pop_i^a · exp(sharpness · ⟨p_u, q_i⟩)`` (Gumbel top-k, no Python loop per user). The
pairs are split per user into train / valid / test (80/10/10). Everything derives from
``seed`` with numpy's legacy ``RandomState``, so the data are identical on every machine.

This module only generates the (user, item) pairs, as arrays; the split and the
:class:`~adaptau.train.data.Dataset` are made by :func:`adaptau.train.data.make_synthetic`
(also reachable here by its old name, ``adaptau.train.synthetic.make_synthetic``).
"""

from __future__ import annotations

from typing import Tuple

import numpy as np

__all__ = ["synthetic_interactions"]


def synthetic_interactions(
    num_users: int = 5000,
    num_items: int = 3000,
    *,
    factors: int = 8,
    mean_activity: int = 24,
    min_activity: int = 5,
    zipf: float = 1.0,
    popularity_weight: float = 0.5,
    sharpness: float = 8.0,
    seed: int = 2023,
) -> Tuple[np.ndarray, np.ndarray]:
    """Generate the interactions (about 5k users × 3k items, ~120k pairs by default):
    ``(users, items)``, two int64 arrays of equal length, grouped by user.

    Args:
        num_users, num_items: sizes.
        factors: latent dimension of the generating model.
        mean_activity: mean interactions per user (heavy-tailed, at least ``min_activity``).
        zipf: exponent of the item-popularity power law (rank^-zipf).
        popularity_weight: ``a``, how much popularity matters next to taste.
        sharpness: inverse temperature of the taste term.
        seed: everything derives from it.
    """
    rng = np.random.RandomState(seed)
    p = rng.normal(size=(num_users, factors)) / np.sqrt(factors)
    q = rng.normal(size=(num_items, factors)) / np.sqrt(factors)
    # normalize to unit length so "taste" is a cosine in [-1, 1]
    p /= np.linalg.norm(p, axis=1, keepdims=True)
    q /= np.linalg.norm(q, axis=1, keepdims=True)
    ranks = rng.permutation(num_items) + 1
    log_pop = -zipf * np.log(ranks)
    # heavy-tailed activity (log-normal), clipped to [min_activity, num_items // 4]
    sigma = 0.8
    mu = np.log(max(mean_activity - min_activity, 1)) - sigma**2 / 2
    activity = min_activity + np.floor(rng.lognormal(mu, sigma, size=num_users)).astype(np.int64)
    activity = np.minimum(activity, max(min_activity, num_items // 4))

    users, items = [], []
    chunk = 512
    for start in range(0, num_users, chunk):
        stop = min(start + chunk, num_users)
        logits = popularity_weight * log_pop[None, :] + sharpness * (p[start:stop] @ q.T)
        gumbel = -np.log(-np.log(rng.uniform(1e-12, 1.0, size=logits.shape)))
        order = np.argsort(-(logits + gumbel), axis=1)
        for row, u in enumerate(range(start, stop)):  # per-user slice of a sorted row (cheap)
            k = int(activity[u])
            users.append(np.full(k, u, dtype=np.int64))
            items.append(order[row, :k].astype(np.int64))
    return np.concatenate(users), np.concatenate(items)


def __getattr__(name: str):
    # make_synthetic builds a Dataset, so it lives in data.py (which imports this module,
    # not the other way round); the old name is looked up there on first use.
    if name == "make_synthetic":
        from .data import make_synthetic

        return make_synthetic
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
