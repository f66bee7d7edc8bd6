"""Full-ranking evaluation: ranks, HR@k, NDCG@k, MRR@k, MRR, and the cold-start subset.

Protocol (PMMRec, NineRec, MoRec): every user is scored against *all* items ``1..N`` (never sampled
negatives); item 0 is padding and never ranked. Choices made here, and why:

- **History masking** (``history``). ``"masked"`` (the default, the papers' protocol): every item of
  the user's history is removed from the ranking, the target included when the user re-consumes
  it; such a target cannot be hit and ranks after every rankable item (a miss). This is what PMMRec,
  NineRec and MoRec report. ``"keep_all"``: nothing is removed (repeat-aware evaluation: a model may
  recommend what the user already has). There is deliberately no "all but the target" mode: it
  leaves the target as the only history item in the ranking, so a model whose user vector resembles
  the history finds re-consumed targets almost for free (on a real Amazon domain 5 % of test targets
  were repeats and carried half of a model's NDCG@10). The preprocessing's ``repeats`` policy
  decides whether such targets exist at all.
- **Ties are pessimistic.** ``rank = 1 + #{rankable items j != target : score_j >= score_target}``.
  An item with the same score as the target is ranked above it. A model with a constant score (a
  common bug: dead encoder, all-zero vectors) then gets the worst rank instead of rank 1, so the bug
  shows up as HR = 0 rather than as a perfect score. Counting ties as half would hide it partly.
- **NaN scores raise** (a NaN compares false with everything and would silently give rank 1).
- **Bounded memory.** Users are scored ``batch_size`` at a time: a ``(batch_size, N+1)`` score
  buffer and one comparison buffer of the same size exist, reused across batches; the ``U x N``
  matrix is never built.
- **Cold start.** ``cold_items`` are items never seen in training; the cold subset is the users whose
  target is cold. Its metrics are reported separately; when there is no such user its metric values
  are ``None`` (not NaN), and when ``cold_items`` is not given ``cold`` itself is ``None``.

Metric definitions: ``HR@k = [rank <= k]``, ``NDCG@k = [rank <= k] / log2(rank + 1)`` (one relevant
item, so the ideal DCG is 1), ``MRR@k = [rank <= k] / rank`` and ``MRR = 1 / rank``, each averaged
over users.
"""

from __future__ import annotations

from typing import Callable, Iterable, Sequence

import torch
from torch import Tensor

# How the user's history is treated in the ranking (see the module docstring): one definition, in
# mmrec.config, which validates the same modes ranks() implements.
from mmrec.config import HISTORY_MODES

ScoreFn = Callable[[Tensor], Tensor]
"""``score_fn(user_idx (b,)) -> (b, N+1)`` scores; column 0 (padding) is ignored."""


def _pad_histories(histories: Sequence[Sequence[int]] | Tensor, n_users: int) -> Tensor:
    """Histories as a ``(U, M)`` LongTensor padded with 0 (``M >= 1``)."""
    if isinstance(histories, Tensor):
        hist = histories.long()
        if hist.dim() != 2:
            raise ValueError(f"histories tensor must be (U, M), got {tuple(hist.shape)}")
        if hist.shape[1] == 0:
            hist = torch.zeros(hist.shape[0], 1, dtype=torch.long)
    else:
        width = max((len(h) for h in histories), default=0) or 1
        hist = torch.zeros(len(histories), width, dtype=torch.long)
        for u, h in enumerate(histories):
            if len(h):
                hist[u, : len(h)] = torch.as_tensor(list(h), dtype=torch.long)
    if hist.shape[0] != n_users:
        raise ValueError(f"{hist.shape[0]} histories for {n_users} targets")
    return hist


def _dot_scorer(user_vecs: Tensor, item_vecs: Tensor, batch_size: int) -> ScoreFn:
    """Dot-product scores written into one reused ``(batch_size, N+1)`` buffer.

    Reusing the buffer avoids allocating (and page-faulting) a fresh score matrix per batch, which
    on CPU costs as much as the matmul itself. The returned tensor is valid until the next call.
    """
    items_t = item_vecs.T  # (d, N+1)
    buf = torch.empty(
        min(batch_size, user_vecs.shape[0]), item_vecs.shape[0], dtype=torch.result_type(user_vecs, item_vecs),
        device=user_vecs.device,
    )

    def score(idx: Tensor) -> Tensor:
        out = buf[: len(idx)]  # (b, N+1)
        return torch.matmul(user_vecs[idx], items_t, out=out)  # (b, d) x (d, N+1) -> (b, N+1)

    return score


def ranks(
    user_vecs: Tensor | None,
    item_vecs: Tensor | None,
    histories: Sequence[Sequence[int]] | Tensor,
    targets: Tensor | Sequence[int],
    *,
    batch_size: int = 1024,
    score_fn: ScoreFn | None = None,
    history: str = "masked",
) -> Tensor:
    """Full-ranking rank (1 = best) of each user's target, a ``(U,)`` LongTensor.

    Scores are ``user_vecs (U, d) @ item_vecs (N+1, d)^T`` (row 0 of ``item_vecs`` is padding), or
    ``score_fn`` for models with another scoring rule (then pass ``None`` for both vectors).
    Padding is excluded, and with ``history="masked"`` every history item (a target in the history
    then ranks after every rankable item); ties are pessimistic.
    """
    if history not in HISTORY_MODES:
        raise ValueError(f"history must be one of {HISTORY_MODES}, got {history!r}")
    if score_fn is None:
        if user_vecs is None or item_vecs is None:
            raise ValueError("give user_vecs and item_vecs, or score_fn")
        score_fn = _dot_scorer(user_vecs, item_vecs, batch_size)
        device = user_vecs.device
    elif user_vecs is not None or item_vecs is not None:
        raise ValueError("give either user_vecs and item_vecs, or score_fn, not both")
    else:
        device = None
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    targets = torch.as_tensor(targets, dtype=torch.long)
    if targets.dim() != 1:
        raise ValueError(f"targets must be (U,), got {tuple(targets.shape)}")
    U = targets.numel()
    hist = _pad_histories(histories, U)
    if hist.numel() and hist.min() < 0:
        raise ValueError("history item ids must be >= 0")
    # Each history item once, without padding: the items removed from the ranking besides padding
    # item 0. A target among them is not rankable: ``repeat`` marks those users.
    if history == "keep_all":
        hist = torch.zeros(U, 1, dtype=torch.long)
    hist, _ = hist.sort(dim=1)  # (U, M)
    dup = torch.zeros_like(hist, dtype=torch.bool)
    dup[:, 1:] = hist[:, 1:] == hist[:, :-1]
    hist = hist.masked_fill(dup, 0)  # (U, M)
    repeat = (hist == targets[:, None]).any(dim=1)  # (U,)
    n_masked = (hist > 0).sum(dim=1)  # (U,)
    hist = hist.masked_fill(hist == targets[:, None], 0)  # counted separately below
    out = torch.empty(U, dtype=torch.long)
    ge_buf: Tensor | None = None
    for lo in range(0, U, batch_size):
        idx = torch.arange(lo, min(lo + batch_size, U))
        scores = score_fn(idx if device is None else idx.to(device))  # (b, N+1)
        if scores.dim() != 2 or scores.shape[0] != len(idx):
            raise ValueError(f"scores must be ({len(idx)}, N+1), got {tuple(scores.shape)}")
        dev = scores.device
        n_plus_1 = scores.shape[1]
        tgt = targets[idx].to(dev)  # (b,)
        if (tgt < 1).any() or (tgt >= n_plus_1).any():
            raise ValueError(f"targets must be item ids in 1..{n_plus_1 - 1}")
        h = hist[idx].to(dev)  # (b, M)
        if (h >= n_plus_1).any():
            raise ValueError(f"history item ids must be in 0..{n_plus_1 - 1}")
        # One cheap reduction first; the exact NaN scan only when something is not finite.
        if not torch.isfinite(scores.sum()) and torch.isnan(scores).any():
            raise ValueError("NaN in scores")
        rows = torch.arange(len(idx), device=dev)
        t_score = scores[rows, tgt][:, None]  # (b, 1)
        # A single pass over the (b, N+1) scores counts every item at or above the target (ties
        # pessimistic, the target itself included); excluded items are then subtracted using their
        # few gathered scores, so no (b, N+1) mask is built. The comparison goes into a reused
        # float buffer and is summed as floats: several times faster on CPU than a bool sum, and
        # exact (float32 holds integers up to 2**24; float64 beyond).
        acc = torch.float32 if n_plus_1 < 2**24 else torch.float64
        if ge_buf is None or ge_buf.shape[1] != n_plus_1 or ge_buf.shape[0] < len(idx) or ge_buf.device != dev:
            ge_buf = torch.empty(len(idx), n_plus_1, dtype=acc, device=dev)
        ge = torch.ge(scores, t_score, out=ge_buf[: len(idx)])  # (b, N+1) of 0./1.
        n_at_or_above = ge.sum(dim=1).round().long()  # (b,)
        n_hist = ((scores.gather(1, h) >= t_score) & (h > 0)).sum(dim=1)  # (b,)
        n_pad = (scores[:, 0:1] >= t_score).sum(dim=1)  # (b,)
        # rank = 1 + items above, where "items above" excludes the target, history and padding
        out[idx] = (n_at_or_above - n_hist - n_pad).cpu()
    # a masked target ranks after every rankable item: 1 + (N - masked history items)
    if repeat.any():
        out[repeat] = n_plus_1 - n_masked[repeat]
    return out


def metrics_from_ranks(rank: Tensor, ks: Iterable[int] = (5, 10, 20)) -> dict[str, float | None]:
    """``HR@k``, ``NDCG@k``, ``MRR@k`` for each ``k`` and plain ``MRR``, averaged over users.

    With no users every value is ``None``.
    """
    ks = tuple(ks)
    if any(int(k) != k or k < 1 for k in ks):
        raise ValueError(f"ks must be positive integers, got {ks}")
    names = [f"{m}@{k}" for k in ks for m in ("HR", "NDCG", "MRR")] + ["MRR"]
    if rank.numel() == 0:
        return {n: None for n in names}
    r = rank.double()
    res: dict[str, float | None] = {}
    for k in ks:
        hit = r <= k
        res[f"HR@{k}"] = hit.double().mean().item()
        res[f"NDCG@{k}"] = torch.where(hit, 1.0 / torch.log2(r + 1), 0.0).mean().item()
        res[f"MRR@{k}"] = torch.where(hit, 1.0 / r, 0.0).mean().item()
    res["MRR"] = (1.0 / r).mean().item()
    return res


def _cold_mask(cold_items: set[int] | Iterable[int] | Tensor, targets: Tensor) -> Tensor:
    """``(U,)`` bool: the target of user ``u`` is a cold item."""
    if isinstance(cold_items, Tensor) and cold_items.dtype == torch.bool:
        if cold_items.dim() != 1 or (targets.numel() and cold_items.numel() <= int(targets.max())):
            raise ValueError("a bool cold_items tensor must be (N+1,)")
        return cold_items.cpu()[targets]
    cold = torch.as_tensor(sorted(int(i) for i in cold_items), dtype=torch.long)
    return torch.isin(targets, cold)


def full_ranking(
    user_vecs: Tensor | None,
    item_vecs: Tensor | None,
    histories: Sequence[Sequence[int]] | Tensor,
    targets: Tensor | Sequence[int],
    ks: Iterable[int] = (5, 10, 20),
    batch_size: int = 1024,
    cold_items: set[int] | Tensor | None = None,
    *,
    score_fn: ScoreFn | None = None,
    history: str = "masked",
    return_ranks: bool = False,
) -> dict:
    """Full-ranking metrics over all users and over the cold-target subset.

    Returns ``{"all": {metric: value}, "cold": {metric: value or None} or None, "n_users": U,
    "n_cold_users": int or None}``; see ``ranks`` for the arguments and the module docstring for
    the protocol. With ``return_ranks`` the ``(U,)`` ranks are added under ``"ranks"`` (for paired
    comparisons over users).
    """
    ks = tuple(ks)
    targets = torch.as_tensor(targets, dtype=torch.long)
    r = ranks(user_vecs, item_vecs, histories, targets, batch_size=batch_size, score_fn=score_fn, history=history)
    result = {"all": metrics_from_ranks(r, ks), "cold": None, "n_users": int(r.numel()), "n_cold_users": None}
    if cold_items is not None:
        cold = _cold_mask(cold_items, targets)
        result["cold"] = metrics_from_ranks(r[cold], ks)
        result["n_cold_users"] = int(cold.sum())
    if return_ranks:
        result["ranks"] = r
    return result
