"""Data-parallel training across processes: ``torchrun`` + DistributedDataParallel.

One global batch, split across ranks
------------------------------------
``train`` draws each epoch's global batches exactly as a single process does (``epoch_batches``);
rank ``r`` of ``W`` takes the ``r``-th contiguous chunk of every global batch (``shard``), so the
ranks' rows, concatenated in rank order, are the single process's batch. The expensive part of a
step (item tower, user encoder) runs on the local rows only.

Losses that compare users with each other (the in-batch softmax over the ``B x (L+1)`` grid, NICL's
and RCL's negatives) need the whole batch: the recommender gathers the per-row tensors they read
(``gather_rows``, an all-gather that keeps gradients) and every rank computes the loss of the
global batch, the same number a single process computes. Random draws on ids (corruption for
NID/RCL, sampled negatives) are made for the global batch from a generator that every rank holds
in the same state, and each rank keeps its rows: the corruption is the single process's.

Gradients: every rank computes the same global loss ``L``, so the gradient arriving at the gathered
tensor is the same on every rank; the all-gather's backward sums it over ranks (``W`` times the
gradient of ``L`` with respect to the local rows) and DistributedDataParallel's average over ranks
divides by ``W`` again. Parameters used after the gather (a full-catalog candidate table) get the
full gradient on every rank, and the average leaves it unchanged. The result is the gradient of
the single-process loss, up to floating-point summation order (tests/test_distributed.py).

Who does what
-------------
- Rank 0 evaluates, writes ``best/`` and ``checkpoint/``, logs to the tracker and exports; the
  metrics (or the evaluation's error) are broadcast, so every rank updates the same counters and
  stops at the same step (early stopping is decided once).
- A checkpoint of a ``W``-rank run also holds each rank's global RNG states (dropout differs per
  rank; rank 0's stream is the single process's), and resumes only with ``W`` ranks.
- With ``WORLD_SIZE`` unset or 1 nothing here initialises anything: ``world()`` is ``(0, 1)`` and
  ``gather_rows`` is the identity.

Failure: a rank that dies makes the others fail in their next collective (gloo reports the
closed connection; ``torchrun`` then stops the whole group and exits non-zero). Rerunning the same
command resumes from the last checkpoint.
"""

from __future__ import annotations

import datetime
import os
from collections.abc import Sequence
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from mmrec.launch import launch, torchrun_command  # noqa: F401 (re-exported; the CLI imports mmrec.launch, without torch)

ENV_WORLD = "WORLD_SIZE"
ENV_RANK = "RANK"
ENV_LOCAL_RANK = "LOCAL_RANK"
TIMEOUT_S = int(os.environ.get("MMREC_DIST_TIMEOUT_S", "1800"))
"""How long a collective waits for a silent (not dead) peer before failing: rank 0's evaluation of
a large catalog runs while the others wait in a broadcast."""


_GATHER_GROUP = None


def _gather_group():
    """A process group of its own for the loss's gathers: their all-reduce runs inside backward,
    while DistributedDataParallel's bucket all-reduces are in flight on the default group."""
    global _GATHER_GROUP
    if _GATHER_GROUP is None:
        _GATHER_GROUP = dist.new_group()
    return _GATHER_GROUP


def world() -> tuple[int, int]:
    """``(rank, world size)`` of the initialised process group, ``(0, 1)`` without one."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def is_distributed() -> bool:
    return world()[1] > 1


def env_world_size() -> int:
    """``WORLD_SIZE`` as ``torchrun`` sets it (1 when unset); bad values are errors."""
    raw = os.environ.get(ENV_WORLD, "1")
    try:
        n = int(raw)
    except ValueError:
        raise ValueError(f"{ENV_WORLD}={raw!r} is not an integer") from None
    if n < 1:
        raise ValueError(f"{ENV_WORLD} must be >= 1, got {n}")
    return n


def init_from_env(device: torch.device | str = "cpu") -> bool:
    """Join the process group ``torchrun`` describes in the environment (gloo on CPU, nccl on
    CUDA; on CUDA each process takes GPU ``LOCAL_RANK``). Returns whether a group is now up; with
    ``WORLD_SIZE`` unset or 1 it does nothing and returns False."""
    if env_world_size() == 1:
        return False
    if dist.is_initialized():
        return True
    for name in (ENV_RANK, "MASTER_ADDR", "MASTER_PORT"):
        if name not in os.environ:
            raise ValueError(f"{ENV_WORLD}={os.environ[ENV_WORLD]} but {name} is not set: launch with torchrun "
                             "(mmrec <stage> --nproc N does)")
    device = torch.device(device)
    if device.type == "cuda":
        torch.cuda.set_device(int(os.environ.get(ENV_LOCAL_RANK, "0")))
        backend = "nccl"
    else:
        backend = "gloo"
    dist.init_process_group(backend, timeout=datetime.timedelta(seconds=TIMEOUT_S))
    return True


def shutdown() -> None:
    """Leave the process group (no-op without one)."""
    global _GATHER_GROUP
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
    _GATHER_GROUP = None


# -- the batch, split and gathered --------------------------------------------------------------
def shard_bounds(n: int, rank: int, size: int) -> tuple[int, int]:
    """``[start, stop)`` of rank ``rank``'s contiguous chunk of ``n`` rows (the first ``n % size``
    ranks get one row more)."""
    base, extra = divmod(n, size)
    start = rank * base + min(rank, extra)
    return start, start + base + (rank < extra)


def shard(batch: Sequence[int], rank: int, size: int) -> list[int]:
    """This rank's rows of one global batch."""
    start, stop = shard_bounds(len(batch), rank, size)
    return list(batch[start:stop])


def row_counts(n_local: int, device: torch.device) -> list[int]:
    """Every rank's number of rows (one small all-gather); ``[n_local]`` without a group."""
    rank, size = world()
    if size == 1:
        return [n_local]
    t = torch.tensor([n_local], dtype=torch.long, device=device)
    out = [torch.zeros_like(t) for _ in range(size)]
    dist.all_gather(out, t, group=_gather_group())
    return [int(x) for x in out]


def _all_gather_padded(x: torch.Tensor, counts: list[int]) -> torch.Tensor:
    """Concatenation over ranks of tensors whose first dimension is ``counts[rank]``."""
    m = max(counts)
    pad = x.new_zeros((m - x.shape[0], *x.shape[1:]))
    full = torch.cat([x, pad]).contiguous()
    parts = [torch.empty_like(full) for _ in counts]
    dist.all_gather(parts, full, group=_gather_group())
    return torch.cat([p[:c] for p, c in zip(parts, counts)])


class _GatherRows(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, counts: list[int]) -> torch.Tensor:
        rank, _ = world()
        ctx.bounds = (sum(counts[:rank]), sum(counts[: rank + 1]))
        return _all_gather_padded(x.detach(), counts)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        grad = grad.contiguous().clone()
        dist.all_reduce(grad, group=_gather_group())  # every rank's loss reads every rank's rows: sum their gradients
        start, stop = ctx.bounds
        return grad[start:stop], None


def gather_rows(x: torch.Tensor, counts: list[int]) -> torch.Tensor:
    """Every rank's ``x`` (first dimension ``counts[rank]``) concatenated in rank order; gradients
    flow back to each rank's own rows (summed over the ranks' losses). Identity without a group."""
    if len(counts) == 1:
        return x
    if x.shape[0] != counts[world()[0]]:
        raise ValueError(f"gather_rows: {x.shape[0]} local rows, the counts say {counts[world()[0]]}")
    if x.requires_grad:
        return _GatherRows.apply(x, counts)
    return _all_gather_padded(x, counts)


def local_rows(counts: list[int]) -> slice:
    """This rank's rows within a gathered tensor."""
    rank = world()[0] if len(counts) > 1 else 0
    return slice(sum(counts[:rank]), sum(counts[: rank + 1]))


# -- decisions and small objects ---------------------------------------------------------------
def broadcast_object(obj: Any, src: int = 0) -> Any:
    """``obj`` of rank ``src`` on every rank (pickled); returns it unchanged without a group."""
    if not is_distributed():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def gather_objects(obj: Any) -> list[Any]:
    """Every rank's ``obj``, in rank order, on every rank; ``[obj]`` without a group."""
    if not is_distributed():
        return [obj]
    out: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def barrier() -> None:
    if is_distributed():
        dist.barrier()


class LossForward(nn.Module):
    """``forward(batch) = model.training_loss(batch)``: what DistributedDataParallel wraps, so the
    gradient all-reduce is set up by a forward call as DDP expects."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, batch):
        return self.model.training_loss(batch)


def wrap(model: nn.Module) -> nn.Module:
    """DistributedDataParallel over ``LossForward(model)``. Buffers are not re-broadcast at every
    step (``log_pop`` holds one float per catalog item and never changes while training). Every
    trainable parameter takes part in every step's loss (the recommender's contract tests check
    it), so DDP does not search the graph for unused ones; one left out fails loudly on the next step."""
    device = next((p.device for p in model.parameters()), torch.device("cpu"))
    ids = [device.index] if device.type == "cuda" else None
    return nn.parallel.DistributedDataParallel(LossForward(model), device_ids=ids, forward_sync_buffers=False,
                                               find_unused_parameters=False)

