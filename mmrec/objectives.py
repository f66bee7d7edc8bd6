"""Training objectives of TransRec and PMMRec, as pure tensor functions.

Conventions shared by every function here: items are indexed ``1..N`` and ``0`` is padding. A batch
holds ``B`` users; ``seq`` is a ``(B, L+1)`` LongTensor of item ids, padded with 0 on the left or on
the right (everything is derived from ``seq > 0``). The user encoder output ``h`` is ``(B, L, d)``
and ``h[:, t]`` predicts ``seq[:, t+1]``; position ``t`` is *valid* when ``seq[:, t]`` and
``seq[:, t+1]`` are both non-zero. Item vectors of the batch grid are ``e`` ``(B, L+1, d)``.
The model (item towers, projection heads, user encoder) lives elsewhere; these functions only turn
vectors into losses, so every one of them is tested on hand-sized inputs.

Main losses (``OBJECTIVES``)
----------------------------
- ``softmax`` — PMMRec's next-item prediction (NIP): an in-batch softmax over every item of the
  ``B x (L+1)`` grid with the logQ popularity correction ``logit = h·e / temperature - log p_item``.
  For the prediction at ``(i, t)`` the target is grid cell ``(i, t+1)``; masked out are padding cells,
  every other cell holding an item of user ``i``'s own sequence (past *and* future, duplicates of the
  target included). The target id belongs to that sequence, so cells of other users holding the
  target id (false negatives) are masked by the same rule.
- ``bce`` — TransRec: binary cross-entropy of dot-product logits with positives and uniformly
  sampled negatives (``sample_negatives``). Per valid position the positive term (mean over the
  positives) and the negative term (mean over the negatives) are added, as in SASRec's loss, so the
  balance does not change with the number of negatives; the result is averaged over valid positions.

Auxiliary losses
----------------
- NICL (``nicl``) — next-item enhanced cross-modal contrastive learning, see ``NICLConfig``.
  Anchor: the text vector of each non-padding cell. Positives: the image vector of the same cell and,
  with ``next_item_positive``, the image vector of the next cell of the same user. Negatives: image
  cells of other users. Masked (neither positive nor negative): the user's own other cells and any
  cell holding the item id of a positive. Multi-positive InfoNCE: the loss of an anchor is the mean
  over its positives of ``-log(exp(s_p) / sum_{c in positives and negatives} exp(s_c))``. With
  ``symmetric`` the image->text direction is added (its extra positive is the text of the previous
  cell: the same pairs, read backwards) and the two directions are averaged; with ``intra_modal`` the
  denominator also holds same-modality negatives (text-text, image-image) of other users.

- NID (noised item detection) and RCL (robustness-aware contrastive learning). The PMMRec paper
  gives only their idea and no code exists; this is the design implemented here:

  * ``corrupt_sequences`` builds a corrupted copy of each sequence. Only *eligible* positions are
    touched: non-padding positions other than each user's last item. The last item is kept so the
    corrupted sequence still ends at the same "current" item (the user vector is read there and the
    final next-item target stays sensible); padding is never touched, so lengths do not change.
    Padding must sit at one end (the non-padding cells are contiguous); anything else is rejected.
    1. Shuffle: each user, with probability ``shuffle_prob``, gets a uniformly random permutation of
       one window of ``shuffle_window`` consecutive eligible positions (window start uniform; a user
       with fewer than 2 eligible positions is never shuffled).
    2. Replace: each eligible position, independently with probability ``replace_prob``, gets an item
       drawn uniformly from the items *not* in that user's sequence, so a noise item is never an item
       the user really interacted with (otherwise a "noise" label would be wrong). The recommender
       excludes the whole training row, targets included: a noise item is never the user's own
       next item either (it would put the target into the history the encoder reads).
    ``noise_mask`` marks the replaced positions. Shuffled items are still the user's own items, so by
    default they are not labelled noise (``label_shuffled_as_noise`` switches that on: positions whose
    item changed under the shuffle are then marked too). The random draws do not depend on the
    config values, so one generator state gives one corruption.
  * ``nid_loss``: binary cross-entropy with logits of a per-position "is this item noise"
    classifier (``NIDHead``, a ``Linear(d, 1)`` on the user encoder's hidden states of the corrupted
    sequence), averaged over the non-padding positions passed in ``valid_mask``. With a causal user
    encoder the state at ``t`` sees item ``t`` and its past, which is what a detector needs.
  * ``rcl_loss``: symmetric InfoNCE between the L2-normalised user vectors of the clean and the
    corrupted sequences (``u_clean[i]`` and ``u_corrupt[i]`` are the positive pair, the other users of
    the batch the negatives), cosine / temperature. Two users with identical sequences would be false
    negatives; with real data this is rare and is not masked.

Combining
---------
``total_loss`` weighs the parts as configured in ``ObjectiveConfig``: with NICL enabled the main loss
and NICL form the convex combination of the early official code (``(1 - w)·NIP + w·NICL``,
``w = 0.4``); NID and RCL are added with their own weights (0.1 each by default).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

NEG_INF = float("-inf")


# ---------------------------------------------------------------------------------------------
# Configuration
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class NICLConfig:
    """Next-item enhanced cross-modal contrastive learning (PMMRec)."""

    temperature: float = 0.1
    """Cosine similarities are divided by this (early official code: 0.1)."""
    symmetric: bool = False
    """``False``: text->image only (early official code); ``True``: also image->text, averaged."""
    intra_modal: bool = False
    """Also put same-modality vectors of other users (text-text, image-image) in the denominator,
    as the paper describes."""
    next_item_positive: bool = True
    """The image of the next item of the same user is a second positive of a text anchor."""
    weight: float = 0.4
    """Share of NICL in ``(1 - weight)·main + weight·NICL`` (early official code: 0.4)."""

    def __post_init__(self):
        if not self.temperature > 0:
            raise ValueError(f"nicl.temperature must be > 0, got {self.temperature}")
        if not 0.0 <= self.weight <= 1.0:
            raise ValueError(f"nicl.weight must be in [0, 1], got {self.weight}")


@dataclass(frozen=True)
class CorruptionConfig:
    """How ``corrupt_sequences`` builds the noisy view used by NID and RCL."""

    replace_prob: float = 0.15
    """Probability that an eligible position (non-padding, not the user's last item) is replaced by
    a random item from outside the user's sequence."""
    shuffle_prob: float = 0.1
    """Probability that a user gets one window of eligible positions randomly permuted."""
    shuffle_window: int = 3
    """Length of the shuffled window (shorter when the user has fewer eligible positions)."""
    label_shuffled_as_noise: bool = False
    """Also mark positions whose item changed under the shuffle as noise for NID."""

    def __post_init__(self):
        for name in ("replace_prob", "shuffle_prob"):
            v = getattr(self, name)
            if not 0.0 <= v <= 1.0:
                raise ValueError(f"corruption.{name} must be in [0, 1], got {v}")
        if self.shuffle_window < 2:
            raise ValueError(f"corruption.shuffle_window must be >= 2, got {self.shuffle_window}")


@dataclass(frozen=True)
class ObjectiveConfig:
    """Which losses train the model and how they are weighted (defaults: PMMRec pretraining)."""

    name: str = "softmax"
    """Main loss, one of ``OBJECTIVES``: ``softmax`` (PMMRec in-batch debiased softmax),
    ``full_softmax`` (cross-entropy over every catalog item, as SASRec in RecBole) or ``bce``
    (TransRec, sampled negatives)."""
    softmax_temperature: float = 1.0
    """Temperature of the ``softmax`` / ``full_softmax`` main loss (dot products are divided by it)."""
    bce_negatives: int = 5
    """Sampled negatives per scored user state for the ``bce`` main loss, drawn uniformly from the
    items outside the user's training row (TransRec: 5)."""
    bce_positives: int = 1
    """Positives per scored user state for the ``bce`` main loss: the next ``bce_positives`` items
    after it (TransRec: 5; 1 is SASRec's next item). A causal user encoder scores every position,
    a bidirectional one only the last position of the history (see ``mmrec.models.recommender``)."""
    nicl_enabled: bool = True
    """Add NICL (needs text and image vectors for every item; off for TransRec's MoM data)."""
    nicl: NICLConfig = field(default_factory=NICLConfig)
    """NICL settings; ``nicl.weight`` is its share of the convex combination with the main loss."""
    nid_weight: float = 0.1
    """Weight of noised-item detection; 0 disables it."""
    rcl_weight: float = 0.1
    """Weight of robustness-aware contrastive learning; 0 disables it."""
    rcl_temperature: float = 0.1
    """Temperature of the RCL InfoNCE."""
    corruption: CorruptionConfig = field(default_factory=CorruptionConfig)
    """How the corrupted view for NID and RCL is built."""

    def __post_init__(self):
        if isinstance(self.nicl, dict):  # built from YAML
            object.__setattr__(self, "nicl", NICLConfig(**self.nicl))
        if isinstance(self.corruption, dict):
            object.__setattr__(self, "corruption", CorruptionConfig(**self.corruption))
        get_objective(self.name)  # unknown names fail here, listing the valid ones
        if not self.softmax_temperature > 0:
            raise ValueError(f"softmax_temperature must be > 0, got {self.softmax_temperature}")
        if self.bce_negatives < 1:
            raise ValueError(f"bce_negatives must be >= 1, got {self.bce_negatives}")
        if self.bce_positives < 1:
            raise ValueError(f"bce_positives must be >= 1, got {self.bce_positives}")
        for name in ("nid_weight", "rcl_weight"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        if not self.rcl_temperature > 0:
            raise ValueError(f"rcl_temperature must be > 0, got {self.rcl_temperature}")

    @property
    def uses_corruption(self) -> bool:
        """Whether a corrupted view has to be encoded (NID or RCL is on)."""
        return self.nid_weight > 0 or self.rcl_weight > 0

    def weights(self) -> dict[str, float]:
        """The weight of each enabled part: ``main`` and any of ``nicl``, ``nid``, ``rcl``."""
        w = {"main": 1.0 - self.nicl.weight if self.nicl_enabled else 1.0}
        if self.nicl_enabled:
            w["nicl"] = self.nicl.weight
        if self.nid_weight > 0:
            w["nid"] = self.nid_weight
        if self.rcl_weight > 0:
            w["rcl"] = self.rcl_weight
        return w


def total_loss(parts: dict[str, Tensor], cfg: ObjectiveConfig) -> Tensor:
    """Weighted sum of the enabled parts; a missing enabled part or an unexpected one is an error."""
    weights = cfg.weights()
    missing = sorted(set(weights) - set(parts))
    extra = sorted(set(parts) - set(weights))
    if missing or extra:
        raise KeyError(f"loss parts {sorted(parts)} do not match the enabled ones {sorted(weights)}")
    return sum(weights[k] * parts[k] for k in weights)


# ---------------------------------------------------------------------------------------------
# Helpers
# ---------------------------------------------------------------------------------------------


def _zero_loss(*tensors: Tensor) -> Tensor:
    """A zero that is still connected to the graph (no NaN, ``backward()`` works)."""
    return sum(t.sum() for t in tensors) * 0.0


def valid_positions(seq: Tensor) -> Tensor:
    """``(B, L)`` bool: position ``t`` predicts a real item from a real item."""
    return (seq[:, :-1] > 0) & (seq[:, 1:] > 0)


def item_log_popularity(data: Tensor, n_items: int, eps: float = 1e-8, *, kind: str = "items") -> Tensor:
    """Log training popularity ``log p_j`` of items ``0..N`` as a ``(N+1,)`` float tensor.

    ``kind="items"``: ``data`` holds training item ids of any shape (0 = padding, ignored);
    ``kind="counts"``: ``data`` is a ``(N+1,)`` count vector (entry 0 ignored). ``p`` is clamped to
    ``eps`` before the log, so items never seen in training get ``log(eps)`` instead of ``-inf``
    (the official code took log(0)). Entry 0 (padding) is ``log(eps)`` too; it is always masked.
    """
    if kind == "items":
        ids = data.reshape(-1).long()
        if ids.numel() and (ids.min() < 0 or ids.max() > n_items):
            raise ValueError(f"item ids must be in 0..{n_items}")
        counts = torch.bincount(ids, minlength=n_items + 1).double()
    elif kind == "counts":
        if data.shape != (n_items + 1,):
            raise ValueError(f"counts must have shape ({n_items + 1},), got {tuple(data.shape)}")
        if (data < 0).any():
            raise ValueError("counts must be >= 0")
        counts = data.double().clone()
    else:
        raise ValueError(f"kind must be 'items' or 'counts', got {kind!r}")
    counts[0] = 0
    total = counts.sum()
    if total <= 0:
        raise ValueError("no training interactions to compute popularity from")
    return (counts / total).clamp_min(eps).log().float()


# ---------------------------------------------------------------------------------------------
# Main losses
# ---------------------------------------------------------------------------------------------


def next_item_softmax(h: Tensor, e: Tensor, seq: Tensor, log_pop: Tensor, temperature: float = 1.0) -> Tensor:
    """PMMRec's in-batch debiased softmax (next-item prediction); see the module docstring.

    ``h`` (B, L, d) predictions, ``e`` (B, L+1, d) grid item vectors, ``seq`` (B, L+1) ids,
    ``log_pop`` (N+1,) from ``item_log_popularity``. Mean cross-entropy over valid positions;
    a batch with no valid position gives a graph-connected 0.
    """
    B, L1 = seq.shape
    if h.shape[:2] != (B, L1 - 1) or e.shape[:2] != (B, L1):
        raise ValueError(f"shapes do not match: h {tuple(h.shape)}, e {tuple(e.shape)}, seq {tuple(seq.shape)}")
    valid = valid_positions(seq)  # (B, L)
    if not valid.any():
        return _zero_loss(h, e)
    ids = seq.reshape(-1)  # (C,) with C = B*(L+1)
    e_flat = e.reshape(B * L1, -1)  # (C, d)
    b_idx, t_idx = valid.nonzero(as_tuple=True)  # (P,), (P,)
    target_cell = b_idx * L1 + t_idx + 1  # (P,)

    logits = h[b_idx, t_idx] @ e_flat.T / temperature  # (P, C)
    logits = logits - log_pop.to(logits.dtype)[ids]  # logQ correction, (P, C)

    # Cells whose id is in user i's sequence. The target id is in that sequence, so this also masks
    # its duplicates in user i's row and the false negatives: other users' cells with the target id.
    in_history = (seq[:, :, None] == ids[None, None, :]).any(dim=1)  # (B, C)
    masked = in_history[b_idx] | (ids == 0)[None, :]  # (P, C)
    masked[torch.arange(len(b_idx), device=seq.device), target_cell] = False
    logits = logits.masked_fill(masked, NEG_INF)
    return F.cross_entropy(logits, target_cell)


def full_softmax(h: Tensor, all_e: Tensor, seq: Tensor, temperature: float = 1.0) -> Tensor:
    """Cross-entropy over the whole catalog (SASRec as RecBole and UniSRec train it).

    ``h`` (B, L, d) predictions, ``all_e`` (N+1, d) every item's vector (row 0 = padding, never a
    candidate), ``seq`` (B, L+1) ids; ``h[:, t]`` predicts ``seq[:, t+1]``. No popularity correction
    and no history masking: every item is a candidate at every position, the target's repeats
    included. Mean over valid positions; a batch with none gives a graph-connected 0.
    """
    B, L1 = seq.shape
    if h.shape[:2] != (B, L1 - 1) or all_e.dim() != 2:
        raise ValueError(f"shapes do not match: h {tuple(h.shape)}, all_e {tuple(all_e.shape)}, seq {tuple(seq.shape)}")
    valid = valid_positions(seq)  # (B, L)
    if not valid.any():
        return _zero_loss(h, all_e)
    b_idx, t_idx = valid.nonzero(as_tuple=True)  # (P,), (P,)
    logits = h[b_idx, t_idx] @ all_e.T / temperature  # (P, N+1)
    logits[:, 0] = NEG_INF  # padding
    return F.cross_entropy(logits, seq[b_idx, t_idx + 1])


def sample_negatives(
    n_items: int,
    shape: tuple[int, ...],
    generator: torch.Generator | None = None,
    exclude: Tensor | None = None,
    device: torch.device | str | None = None,
) -> Tensor:
    """Item ids drawn uniformly from ``1..n_items``, shape ``shape``.

    With ``exclude`` (a ``(B, M)`` LongTensor of ids per user, 0 ignored; ``shape[0] == B``), row
    ``b`` is drawn uniformly from the items *not* in ``exclude[b]``. This is exact, not rejection
    sampling: draw a rank ``r`` among the allowed items, then step over the sorted excluded ids
    (a loop over the ``M`` columns, never over users).
    """
    if n_items < 1:
        raise ValueError(f"n_items must be >= 1, got {n_items}")
    if generator is not None:
        device = generator.device
    if exclude is None:
        return torch.randint(1, n_items + 1, shape, generator=generator, device=device)
    if exclude.dim() != 2 or shape[0] != exclude.shape[0]:
        raise ValueError(f"exclude must be (B, M) with B = shape[0]; got {tuple(exclude.shape)} for {shape}")
    if exclude.numel() and (exclude.min() < 0 or exclude.max() > n_items):
        raise ValueError(f"excluded ids must be in 0..{n_items}")
    ex, _ = exclude.to(device).sort(dim=1)  # (B, M) ascending
    fresh = ex > 0
    fresh[:, 1:] &= ex[:, 1:] != ex[:, :-1]  # first occurrence of each non-padding id
    n_allowed = n_items - fresh.sum(dim=1)  # (B,)
    if (n_allowed < 1).any():
        raise ValueError("a user's exclusion list covers every item; nothing left to sample")
    B = shape[0]
    extra = (1,) * (len(shape) - 1)
    u = torch.rand(shape, generator=generator, device=device, dtype=torch.float64)
    allowed = n_allowed.view(B, *extra)
    x = (u * allowed).long().clamp_max(allowed - 1) + 1  # rank among the allowed items, 1-based
    for j in range(ex.shape[1]):  # ascending excluded ids: skip each one at or below x
        step = fresh[:, j].view(B, *extra) & (ex[:, j].view(B, *extra) <= x)
        x = x + step.long()
    return x


def bce_sampled(h: Tensor, pos_e: Tensor, neg_e: Tensor, mask: Tensor) -> Tensor:
    """TransRec's BCE with positives and sampled negatives (dot-product logits).

    ``h`` (B, L, d); ``pos_e`` (B, L, d) or (B, L, P, d); ``neg_e`` (B, L, d) or (B, L, K, d);
    ``mask`` (B, L) valid positions, or (B, L, P) valid positives (a position counts when any of
    its positives is valid, e.g. fewer than P next items remain). Per position
    ``mean_p softplus(-s_p) + mean_k softplus(s_k)``, averaged over counted positions.
    """
    if pos_e.dim() == 3:
        pos_e = pos_e.unsqueeze(2)  # (B, L, 1, d)
    if neg_e.dim() == 3:
        neg_e = neg_e.unsqueeze(2)  # (B, L, 1, d)
    pos_mask = mask.bool()
    if pos_mask.dim() == 2:
        pos_mask = pos_mask.unsqueeze(2).expand(pos_e.shape[:3])  # (B, L, P)
    if pos_mask.shape != pos_e.shape[:3]:
        raise ValueError(f"mask {tuple(mask.shape)} does not match positives {tuple(pos_e.shape)}")
    row = pos_mask.any(dim=2)  # (B, L)
    if not row.any():
        return _zero_loss(h, pos_e, neg_e)
    s_pos = (h.unsqueeze(2) * pos_e).sum(-1)  # (B, L, P)
    s_neg = (h.unsqueeze(2) * neg_e).sum(-1)  # (B, L, K)
    pos_term = (F.softplus(-s_pos) * pos_mask).sum(2) / pos_mask.sum(2).clamp_min(1)  # (B, L)
    neg_term = F.softplus(s_neg).mean(2)  # (B, L)
    return (pos_term + neg_term)[row].mean()


OBJECTIVES: dict[str, Callable[..., Tensor]] = {
    "softmax": next_item_softmax,
    "full_softmax": full_softmax,
    "bce": bce_sampled,
}


def get_objective(name: str) -> Callable[..., Tensor]:
    """The main-loss function registered as ``name``; unknown names raise listing the valid ones."""
    try:
        return OBJECTIVES[name]
    except KeyError:
        raise ValueError(f"unknown objective {name!r}; valid names: {sorted(OBJECTIVES)}") from None


# ---------------------------------------------------------------------------------------------
# NICL
# ---------------------------------------------------------------------------------------------


def _multi_positive_infonce(
    anchor: Tensor,
    cand: Tensor,
    same_modality: Tensor | None,
    ids: Tensor,
    user: Tensor,
    valid: Tensor,
    partner: Tensor,
    temperature: float,
) -> Tensor:
    """One direction of NICL over flattened cells.

    ``anchor``, ``cand`` (C, d) normalised; positives of anchor ``a`` are candidate ``a`` and
    candidate ``partner[a]`` (``-1``: none). ``same_modality`` (C, d) adds intra-modal negatives.
    """
    C = ids.numel()
    rows = valid.nonzero().squeeze(1)  # (A,)
    cols = torch.arange(C, device=ids.device)
    part = partner[rows]  # (A,)
    pos = (cols[None, :] == rows[:, None]) | (cols[None, :] == part[:, None])  # (A, C)
    part_id = torch.where(part >= 0, ids[part.clamp_min(0)], torch.full_like(part, -1))  # (A,)
    same_id = (ids[None, :] == ids[rows][:, None]) | (ids[None, :] == part_id[:, None])  # (A, C)
    neg = valid[None, :] & (user[None, :] != user[rows][:, None]) & ~same_id  # (A, C)

    q = anchor[rows]  # (A, d)
    logits = (q @ cand.T / temperature).masked_fill(~(pos | neg), NEG_INF)  # (A, C)
    every = logits
    if same_modality is not None:
        intra = (q @ same_modality.T / temperature).masked_fill(~neg, NEG_INF)  # (A, C)
        every = torch.cat([logits, intra], dim=1)  # (A, 2C)
    log_prob = logits - torch.logsumexp(every, dim=1, keepdim=True)  # (A, C)
    per_anchor = -log_prob.masked_fill(~pos, 0.0).sum(1) / pos.sum(1)  # (A,)
    return per_anchor.mean()


def nicl(text_vec: Tensor, image_vec: Tensor, seq: Tensor, cfg: NICLConfig) -> Tensor:
    """Next-item enhanced cross-modal contrastive loss (unweighted); see the module docstring.

    ``text_vec``, ``image_vec`` (B, L+1, d): projected per-cell vectors (L2-normalised here).
    """
    B, L1 = seq.shape
    if text_vec.shape[:2] != (B, L1) or image_vec.shape != text_vec.shape:
        raise ValueError(f"shapes do not match: text {tuple(text_vec.shape)}, image {tuple(image_vec.shape)}")
    valid = (seq > 0).reshape(-1)  # (C,)
    if not valid.any():
        return _zero_loss(text_vec, image_vec)
    ids = seq.reshape(-1)  # (C,)
    C = ids.numel()
    dev = seq.device
    user = torch.arange(B, device=dev).repeat_interleave(L1)  # (C,)
    t = torch.arange(L1, device=dev).repeat(B)  # (C,)
    cell = torch.arange(C, device=dev)
    none = torch.full_like(cell, -1)
    if cfg.next_item_positive:
        has_next = (t < L1 - 1) & valid[(cell + 1).clamp_max(C - 1)]
        nxt = torch.where(has_next, cell + 1, none)
        has_prev = (t > 0) & valid[(cell - 1).clamp_min(0)]
        prev = torch.where(has_prev, cell - 1, none)
    else:
        nxt = prev = none

    txt = F.normalize(text_vec.reshape(C, -1), dim=-1)  # (C, d)
    img = F.normalize(image_vec.reshape(C, -1), dim=-1)  # (C, d)
    intra = cfg.intra_modal
    loss = _multi_positive_infonce(txt, img, txt if intra else None, ids, user, valid, nxt, cfg.temperature)
    if cfg.symmetric:
        back = _multi_positive_infonce(img, txt, img if intra else None, ids, user, valid, prev, cfg.temperature)
        loss = (loss + back) / 2
    return loss


# ---------------------------------------------------------------------------------------------
# NID and RCL
# ---------------------------------------------------------------------------------------------


def corrupt_sequences(
    seq: Tensor, cfg: CorruptionConfig, n_items: int, generator: torch.Generator | None = None,
    exclude: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """Noisy copy of ``seq`` (B, L+1) and the ``(B, L+1)`` bool noise mask; see the module docstring.

    ``exclude`` (B, M): the items a replacement may never be, per user (0 ignored); default ``seq``.
    Pass the user's whole training row, targets included, when ``seq`` is only the history the
    encoder reads: a replacement equal to the user's next item would hand the target to the model.
    """
    B, L1 = seq.shape
    dev = seq.device
    valid = seq > 0  # (B, L+1)
    starts = valid.clone()
    starts[:, 1:] &= ~valid[:, :-1]
    if (starts.sum(1) > 1).any():
        raise ValueError("padding must be at one end of each sequence (non-padding cells contiguous)")
    pos = torch.arange(L1, device=dev).expand(B, L1)  # (B, L+1)
    last = torch.where(valid, pos, -1).max(dim=1).values  # (B,)
    eligible = valid & (pos != last[:, None])  # (B, L+1)

    # Every draw happens whatever the config, so a generator state fixes the corruption.
    r_user = torch.rand(B, generator=generator, device=dev)
    r_start = torch.rand(B, generator=generator, device=dev, dtype=torch.float64)
    r_keys = torch.rand(B, L1, generator=generator, device=dev, dtype=torch.float64)
    r_replace = torch.rand(B, L1, generator=generator, device=dev)
    exclude = seq if exclude is None else exclude
    replacement = sample_negatives(n_items, (B, L1), generator, exclude=exclude, device=dev)  # (B, L+1)

    # 1. shuffle one window of eligible positions: keys outside the window are their positions,
    #    keys inside are random in (start - 1, start + w), so argsort permutes only the window.
    n_elig = eligible.sum(1)  # (B,)
    first = torch.where(eligible, pos, L1).min(dim=1).values  # (B,)
    w = n_elig.clamp_max(cfg.shuffle_window)  # (B,)
    do_shuffle = (r_user < cfg.shuffle_prob) & (w >= 2)  # (B,)
    start = first + (r_start * (n_elig - w + 1)).long().clamp_max((n_elig - w).clamp_min(0))  # (B,)
    in_window = do_shuffle[:, None] & (pos >= start[:, None]) & (pos < (start + w)[:, None])  # (B, L+1)
    keys = torch.where(in_window, start[:, None] - 0.5 + r_keys * w[:, None], pos.double())  # (B, L+1)
    out = seq.gather(1, keys.argsort(dim=1))  # (B, L+1)
    moved = out != seq

    # 2. replace eligible positions by items from outside the user's sequence
    replace = eligible & (r_replace < cfg.replace_prob)  # (B, L+1)
    out = torch.where(replace, replacement, out)
    noise = replace | moved if cfg.label_shuffled_as_noise else replace
    return out, noise


class NIDHead(nn.Module):
    """Per-position noise classifier for NID: ``(..., d) -> (...)`` logits.

    Kept next to its loss because it is one ``Linear`` whose only use is this objective; the
    recommender owns an instance when ``nid_weight > 0``.
    """

    def __init__(self, dim: int):
        super().__init__()
        self.proj = nn.Linear(dim, 1)

    def forward(self, hidden: Tensor) -> Tensor:
        return self.proj(hidden).squeeze(-1)  # (..., d) -> (...)


def nid_loss(logits: Tensor, noise_mask: Tensor, valid_mask: Tensor) -> Tensor:
    """Binary cross-entropy of noise logits ``(B, L+1)`` against ``noise_mask``, mean over ``valid_mask``."""
    if logits.shape != noise_mask.shape or logits.shape != valid_mask.shape:
        raise ValueError("logits, noise_mask and valid_mask must have the same shape")
    valid = valid_mask.bool()
    if not valid.any():
        return _zero_loss(logits)
    return F.binary_cross_entropy_with_logits(logits[valid], noise_mask[valid].to(logits.dtype))


def rcl_loss(u_clean: Tensor, u_corrupt: Tensor, temperature: float = 0.1, valid: Tensor | None = None) -> Tensor:
    """Symmetric InfoNCE between clean and corrupted user vectors ``(B, d)``; other users are negatives.

    ``valid`` (B,) bool drops users (e.g. all-padding rows) from both sides.
    """
    if u_clean.shape != u_corrupt.shape or u_clean.dim() != 2:
        raise ValueError(f"u_clean {tuple(u_clean.shape)} and u_corrupt {tuple(u_corrupt.shape)} must be (B, d)")
    if valid is not None:
        if not valid.any():
            return _zero_loss(u_clean, u_corrupt)
        u_clean, u_corrupt = u_clean[valid], u_corrupt[valid]
    a = F.normalize(u_clean, dim=-1)  # (B, d)
    b = F.normalize(u_corrupt, dim=-1)  # (B, d)
    logits = a @ b.T / temperature  # (B, B)
    target = torch.arange(len(a), device=a.device)
    return (F.cross_entropy(logits, target) + F.cross_entropy(logits.T, target)) / 2
