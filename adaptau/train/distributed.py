"""Data-parallel training on ``torch.distributed``: process group, DDP, launcher.

How a run with N processes (ranks) works (``adaptau train --nproc N`` or ``torchrun``):

* **Launch** — :func:`launch` hands the command line to ``torch.distributed.run`` (the
  elastic launcher behind ``torchrun``) with ``--standalone --nproc-per-node N``; each
  worker runs ``python -m adaptau train …`` and joins the group from the environment
  (``RANK``, ``WORLD_SIZE``, ``MASTER_ADDR`` …) in :func:`init_from_env`: gloo on CPU,
  NCCL on CUDA (rank r uses ``cuda:LOCAL_RANK``). Several machines: run ``torchrun`` with
  its own flags (``--nnodes``, ``--node-rank``, ``--rdzv-endpoint`` …) ``-m adaptau train``.
* **Data** — every rank draws the same permutation of the train pairs from the shared seed
  and cuts the same *global* batches of ``--batch-size`` rows; rank r keeps rows
  ``r, r+N, r+2N, …`` of each (so ``--batch-size`` is the global batch and each rank
  computes ≈ batch/N rows; steps per epoch do not change with N). Negatives are drawn for the
  whole global batch from one shared stream and sliced the same way, and in-batch negatives
  are the positives of the *global* batch (:func:`global_in_batch_negatives`), so an N-rank
  run sees exactly the batches and negatives of a 1-rank run.
* **Model** — replicated and wrapped in ``DistributedDataParallel`` through
  :class:`StepModule`, whose ``forward(users)`` returns what one step needs (batch user
  rows, the item table, the layer-0 tables for L2). Gradients are dense and averaged by
  DDP; the per-rank loss is the mean over the rank's rows, so the averaged gradient is the
  global-batch gradient. LightGCN: each rank runs the full-graph propagation (the adjacency
  is replicated and excluded from DDP's buffer sync); only the layer-0 embedding gradients
  are all-reduced.
* **Adap-τ** — :meth:`adaptau.AdapTau.begin_epoch` all-reduces the per-user loss sums and
  counts, so every rank computes the same per-user scales.
* **Evaluation, files** — rank 0 evaluates, keeps the best checkpoint, writes logs, plots,
  ``last.pt`` and ``summary.json`` (with ``world_size``); the early-stop decision is broadcast.
"""

from __future__ import annotations

import os
import sys
from typing import Any, List, Optional, Sequence, Tuple

import torch
from torch import Tensor, nn

__all__ = [
    "is_initialized",
    "rank_and_world",
    "init_from_env",
    "StepModule",
    "wrap_model",
    "broadcast_object",
    "all_reduce_sum",
    "global_in_batch_negatives",
    "launch",
    "shutdown",
]


def is_initialized() -> bool:
    return torch.distributed.is_available() and torch.distributed.is_initialized()


def rank_and_world() -> Tuple[int, int]:
    if is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1


def env_world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def init_from_env(device: torch.device) -> torch.device:
    """Join the process group described by torchrun's environment (WORLD_SIZE > 1).

    Returns the device this rank should use: ``cuda:LOCAL_RANK`` for a CUDA run whose
    ``device`` has no index, else ``device``. A no-op for a single process.
    """
    if env_world_size() <= 1:
        return device
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if not is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        kwargs = {"device_id": device} if device.type == "cuda" else {}
        try:
            torch.distributed.init_process_group(backend, **kwargs)
        except TypeError:  # older torch without device_id
            torch.distributed.init_process_group(backend)
    return device


def shutdown() -> None:
    """Leave the process group (after a barrier, so no rank exits while others still talk)."""
    if is_initialized():
        try:
            torch.distributed.barrier()
        finally:
            torch.distributed.destroy_process_group()


class StepModule(nn.Module):
    """The backbone's part of one training step as a ``forward`` DDP can hook.

    ``forward(users)`` → ``(user_rows [B, D], item_table [N, D], ego_users, ego_items)``:
    the (dropout-applied) final vectors of the batch users, the final item table the loss
    gathers from, and the layer-0 tables the L2 term reads. ``forward(users, items)`` with
    the batch's distinct items ``[K]`` (a model with ``rows``, LightGCN) gives their final
    vectors ``[K, D]`` in place of the table, computed for those rows alone.
    """

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, users: Tensor, items: Optional[Tensor] = None):
        ego_u, ego_i = self.model.ego()
        if items is not None:
            user_rows, item_rows = self.model.rows(users, items)
            return user_rows, item_rows, ego_u, ego_i
        user_table, item_table = self.model.tables()
        rows = self.model.batch_users(user_table, users)
        return rows, item_table, ego_u, ego_i


def wrap_model(step: StepModule, device: torch.device) -> nn.Module:
    """``DistributedDataParallel(step)`` when a group is up, else ``step`` itself.

    Parameters are broadcast from rank 0 at construction. Sparse buffers (LightGCN's
    adjacency, identical on every rank by construction) are left out of that sync.
    """
    if not is_initialized() or torch.distributed.get_world_size() == 1:
        return step
    from torch.nn.parallel import DistributedDataParallel as DDP

    skip = [name for name, b in step.named_buffers() if b.layout != torch.strided]
    if skip:
        DDP._set_params_and_buffers_to_ignore_for_model(step, skip)
    import inspect

    ids = [device.index] if device.type == "cuda" else None
    params = inspect.signature(DDP.__init__).parameters
    sync = (
        {"forward_sync_buffers": False} if "forward_sync_buffers" in params else {"broadcast_buffers": False}
    )
    return DDP(step, device_ids=ids, gradient_as_bucket_view=True, **sync)


def broadcast_object(obj: Any, src: int = 0) -> Any:
    """``obj`` of rank ``src`` on every rank (identity without a group)."""
    if not is_initialized():
        return obj
    box = [obj]
    torch.distributed.broadcast_object_list(box, src=src)
    return box[0]


def all_gather_object(obj: Any) -> List[Any]:
    if not is_initialized():
        return [obj]
    out: List[Any] = [None] * torch.distributed.get_world_size()
    torch.distributed.all_gather_object(out, obj)
    return out


def all_reduce_sum(t: Tensor) -> Tensor:
    """A summed copy of ``t`` over ranks (``t`` itself is left alone)."""
    out = t.clone()
    if is_initialized():
        torch.distributed.all_reduce(out)
    return out


def global_in_batch_negatives(pos_global: Tensor, rows: Tensor) -> Tensor:
    """Per-row negatives ``[len(rows), B−1]`` that reproduce in-batch mode over the global batch.

    Row g of the global batch (``rows`` holds this rank's global row indices) gets the
    positives of every other global row, ``pos_global[j]`` for ``j ≠ g`` — exactly what
    ``softmax_loss(..., neg=None)`` does on the whole batch in one process.
    """
    b = pos_global.numel()
    j = torch.arange(b - 1, device=pos_global.device).expand(rows.numel(), b - 1)
    j = j + (j >= rows.to(j.device)[:, None]).to(j.dtype)
    return pos_global[j]


def launch(train_argv: Sequence[str], nproc: int, *, module: str = "adaptau") -> int:
    """Run ``python -m adaptau train <train_argv>`` in ``nproc`` local workers through
    ``torch.distributed.run`` (standalone rendezvous on a free port). Returns the exit code."""
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import get_args_parser, run

    if nproc < 1:
        raise ValueError(f"--nproc must be >= 1, got {nproc}")
    args = get_args_parser().parse_args(
        ["--standalone", f"--nproc-per-node={nproc}", "--module", module, "train", *train_argv]
    )
    if "OMP_NUM_THREADS" not in os.environ:  # share the cores instead of oversubscribing them
        os.environ["OMP_NUM_THREADS"] = str(max(1, (os.cpu_count() or 1) // nproc))
    try:
        run(args)
    except ChildFailedError as exc:
        print(f"adaptau train: a worker failed:\n{exc.format_msg()}", file=sys.stderr)
        codes = [f.exitcode for f in exc.failures.values()]
        return next((c for c in codes if c not in (0, None)), 1) if codes else 1
    return 0
