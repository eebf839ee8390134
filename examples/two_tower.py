"""The fused loss in a two-tower model whose towers are MLPs over features.

Users and items are described by feature vectors, not ids, so there is no item table to hand
the loss. Each step encodes the items the batch needs once: ``adaptau.compact`` gives the
distinct ids of the positives and the shared negatives and the indices into them; the item
tower encodes those rows into a ``[K, D]`` table, and ``softmax_loss`` gathers from it.

    python examples/two_tower.py --steps 200
"""

import argparse

import torch
from torch import nn

import adaptau


def tower(n_in: int, dim: int) -> nn.Module:
    return nn.Sequential(nn.Linear(n_in, 128), nn.ReLU(), nn.Linear(128, dim))


def main(argv=None) -> list:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--negatives", type=int, default=512, help="shared negatives per step")
    args = ap.parse_args(argv)
    g = torch.Generator().manual_seed(0)
    n_users, n_items, n_feat, dim = 2000, 5000, 32, 64
    user_feat = torch.randn(n_users, n_feat, generator=g)
    item_feat = torch.randn(n_items, n_feat, generator=g)
    taste = torch.randn(n_feat, n_feat, generator=g) / n_feat**0.5  # who likes what

    user_tower, item_tower = tower(n_feat, dim), tower(n_feat, dim)
    opt = torch.optim.Adam([*user_tower.parameters(), *item_tower.parameters()], lr=1e-3)
    losses = []
    for step in range(args.steps):
        users = torch.randint(0, n_users, (args.batch,), generator=g)
        # each user's positive: the best of 20 random items under the hidden taste
        cand = torch.randint(0, n_items, (args.batch, 20), generator=g)
        affinity = torch.einsum("bf,fg,bcg->bc", user_feat[users], taste, item_feat[cand])
        pos = cand.gather(1, affinity.argmax(1, keepdim=True)).squeeze(1)
        neg = torch.randint(0, n_items, (args.negatives,), generator=g)  # shared by the batch

        ids, pos_local, neg_local = adaptau.compact(pos, neg)  # ids: the [K] items needed
        item_vecs = item_tower(item_feat[ids])  # [K, D], encoded once each
        user_vecs = user_tower(user_feat[users])  # [B, D]
        loss = adaptau.softmax_loss(
            user_vecs, item_vecs, pos_local, neg_local, 10.0, 10.0, remove_accidental_hits=True
        )
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
        if step % 50 == 0 or step == args.steps - 1:
            print(f"step {step:4d}  loss {loss.item():.4f}")
    return losses


if __name__ == "__main__":
    main()
