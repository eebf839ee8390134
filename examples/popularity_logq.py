"""The fused loss with popularity-sampled negatives and the logQ correction.

Negatives drawn in proportion to popularity q(i) meet popular items far more often than a
full softmax would weigh them, so without a correction popular items are pushed down and
the tail up. Subtracting log q(i) from each negative logit (``neg_logq``) corrects the
sampled softmax towards the full one (Bengio & Senécal 2008; Yi et al. 2019), which gives
popular items back their due. This script trains matrix factorization twice on the same
synthetic data, with and without the correction, and prints how often each ranks a tail
item (the least popular 80%) in its top 20.

    python examples/popularity_logq.py --epochs 5
"""

import argparse

import torch
from torch import nn

import adaptau


def train(
    interactions: torch.Tensor,
    n_users: int,
    n_items: int,
    q: torch.Tensor,
    *,
    logq: bool,
    epochs: int,
    negatives: int = 256,
    dim: int = 32,
) -> torch.Tensor:
    """MF trained with popularity negatives; returns its top-20 item lists ``[n_users, 20]``."""
    g = torch.Generator().manual_seed(1)
    users_t, items_t = nn.Embedding(n_users, dim), nn.Embedding(n_items, dim)
    nn.init.normal_(users_t.weight, std=0.1, generator=g)
    nn.init.normal_(items_t.weight, std=0.1, generator=g)
    opt = torch.optim.Adam([users_t.weight, items_t.weight], lr=1e-2)
    neg_logq = q.log() if logq else None  # [N]: log of each item's sampling probability
    for _ in range(epochs):
        for batch in torch.randperm(interactions.shape[0], generator=g).split(512):
            u, pos = interactions[batch, 0], interactions[batch, 1]
            neg = torch.multinomial(q, negatives, replacement=True, generator=g)  # shared [M]
            loss = adaptau.softmax_loss(
                users_t(u),
                items_t.weight,
                pos,
                neg,
                10.0,
                10.0,
                neg_logq=neg_logq,
                remove_accidental_hits=True,
            )
            opt.zero_grad()
            loss.backward()
            opt.step()
    with torch.no_grad():
        u = nn.functional.normalize(users_t.weight, dim=1)
        i = nn.functional.normalize(items_t.weight, dim=1)
        return (u @ i.T).topk(20, dim=1).indices


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--epochs", type=int, default=5)
    args = ap.parse_args(argv)
    from adaptau.train.data import csr_pairs, make_synthetic

    ds = make_synthetic(num_users=1500, num_items=1000, seed=3)
    u, i = csr_pairs(ds.train)
    interactions = torch.stack([torch.as_tensor(u), torch.as_tensor(i)], 1)
    counts = torch.bincount(interactions[:, 1], minlength=ds.num_items).double() + 1.0
    q = (counts / counts.sum()).float()  # the popularity sampling distribution
    tail = torch.zeros(ds.num_items, dtype=torch.bool)
    tail[counts.argsort()[: int(0.8 * ds.num_items)]] = True
    share = {}
    for name, use in (("without logQ", False), ("with logQ", True)):
        top = train(interactions, ds.num_users, ds.num_items, q, logq=use, epochs=args.epochs)
        share[name] = tail[top].float().mean().item()
        print(f"{name:13s}: {share[name]:.1%} of top-20 slots hold tail items")
    return share


if __name__ == "__main__":
    main()
