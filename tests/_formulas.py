"""An independent, loop-per-row float64 formulation of the operator, for tests.

Written from docs/design.md §2 without sharing code with adaptau.loss.reference: for each row it
lists the candidate logits explicitly and applies logsumexp. Differentiable by autograd.
"""

import torch


def naive_rows(
    user,
    items,
    pos,
    neg,
    alpha,
    beta,
    logq=None,
    *,
    include_pos=False,
    normalize=True,
    remove_hits=False,
    eps=1e-12,
):
    """Per-row losses ``[B]`` (float64) for neg ``[B, M]``, ``[M]`` or None (in-batch)."""
    B = user.shape[0]
    if normalize:
        user = user / user.norm(dim=1, keepdim=True).clamp_min(eps)
        items = items / items.norm(dim=1, keepdim=True).clamp_min(eps)
    alpha = alpha.expand(B) if alpha.dim() == 0 else alpha
    beta = beta.expand(B) if beta.dim() == 0 else beta
    rows = []
    for b in range(B):
        p = int(pos[b])
        if neg is None:
            cands = [int(pos[j]) for j in range(B) if j != b]
        elif neg.dim() == 1:
            cands = [int(n) for n in neg]
        else:
            cands = [int(n) for n in neg[b]]
        if remove_hits:
            cands = [n for n in cands if n != p]
        pos_logit = alpha[b] * torch.dot(user[b], items[p])
        terms = [
            beta[b] * torch.dot(user[b], items[n]) - (logq[n] if logq is not None else 0.0) for n in cands
        ]
        if include_pos:
            terms.append(pos_logit)
        if not terms:
            rows.append(user.new_zeros(()) * pos_logit)  # keeps the graph, value 0
            continue
        rows.append(torch.logsumexp(torch.stack(terms), 0) - pos_logit)
    return torch.stack(rows)
