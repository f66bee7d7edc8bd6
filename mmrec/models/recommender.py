"""The sequential recommender: item tower -> user encoder -> objectives.

Reference
    PMMRec (item tower ``fused``, SASRec, in-batch debiased softmax + NICL + NID + RCL) and TransRec
    (item tower ``mom``, bidirectional user encoder, BCE with sampled negatives), both ID-free; the
    ``id`` tower gives the ID-SASRec baseline. Presets in ``configs/presets/`` name the parts.

A training batch is ``{"seq": (B, W)}``: each user's last W training items, left-padded with 0
(``ModelConfig.train_window`` items). Every item the losses need is encoded once (``torch.unique``).
Scoring is a dot product between user vectors and item vectors, so evaluation and serving
precompute every item vector once. Which user states the main loss scores depends on the encoder:

* **Causal** (``sasrec``), the per-position path: the encoder reads items ``0..L-1`` (W = L+1) and
  ``h[:, t]``, which sees items ``0..t`` only, predicts item ``t+1`` (and, for ``bce``, the next
  ``bce_positives`` items). Every loss that scores each position goes through
  ``per_position_states``, which refuses a non-causal encoder.
* **Bidirectional** (``transrec``), the last-position path: position t attends to t+1, its own
  target, so a loss at inner positions would teach the model to copy its input, which inference
  (last position only) can never use. Each row is split by ``last_position_split``: the last
  ``bce_positives`` real items are the positives (TransRec: the next 5 items), up to L items before
  them are the history, and the user vector (the history's last position, as at inference) is
  scored against the positives and ``bce_negatives`` sampled negatives with BCE (W = L + P).
NID (noise detection) stays per-position for both: its label is the input item itself, which every
position sees anyway, so it reveals no future item.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from mmrec.configbase import check_keys, optional_section
from mmrec.distributed import gather_rows, local_rows, row_counts
from mmrec.encoders.image import ImageEncoderConfig
from mmrec.encoders.text import TextEncoderConfig
from mmrec.models.fusion import FusionConfig
from mmrec.models.towers import ItemContent, ItemTowerConfig, build_item_tower
from mmrec.models.user_encoders import USER_ENCODERS, UserEncoderConfig, build_user_encoder
from mmrec.objectives import (
    NIDHead,
    ObjectiveConfig,
    bce_sampled,
    corrupt_sequences,
    full_softmax,
    item_log_popularity,
    next_item_softmax,
    nicl,
    nid_loss,
    rcl_loss,
    sample_negatives,
    total_loss,
)


LAST_POSITION_OBJECTIVES = ("bce",)
"""Main losses that can train a bidirectional user encoder (scored at the last position only)."""


def _contiguous_rows(seq: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(start (B,), count (B,))`` of each row's real items; padding must sit at the ends."""
    real = seq > 0  # (B, W)
    cols = torch.arange(seq.shape[1], device=seq.device)
    count = real.sum(1)  # (B,)
    start = torch.where(real, cols, seq.shape[1]).amin(1)  # (B,) W for an empty row
    end = torch.where(real, cols, -1).amax(1)  # (B,)
    if ((end - start + 1 != count) & (count > 0)).any():
        raise ValueError("padding must be at one end of each training row (real items contiguous)")
    return start, count


def next_items(seq: torch.Tensor, n: int) -> torch.Tensor:
    """Per-position targets ``(B, W-1, n)``: position ``t`` of a real item gets ``seq[t+1 .. t+n]``
    (0 past a row's end); padding positions get zeros."""
    padded = F.pad(seq, (0, n - 1))  # (B, W+n-1)
    out = padded[:, 1:].unfold(1, n, 1)  # (B, W-1, n)
    return out * (seq[:, :-1] > 0).unsqueeze(-1)  # (B, W-1, n)


def last_position_split(seq: torch.Tensor, max_len: int, n_positives: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Split each training row for the last-position path: ``(history (B, max_len), positives (B, P))``.

    Of a row's ``n`` real items (contiguous, either padding side) the last ``k = min(P, n - 1)`` are
    the positives (so a short row still keeps one history item) and up to ``max_len`` items before
    them the history, left-padded with 0. Positives are in chronological order, right-padded with 0.
    A row with fewer than 2 real items has neither (all zeros).
    """
    B, W = seq.shape
    start, n = _contiguous_rows(seq)  # (B,), (B,)
    k = (n - 1).clamp(min=0, max=n_positives)  # (B,) positives per row
    cut = start + n - k  # (B,) first positive's column
    h_len = torch.where(k > 0, (n - k).clamp(max=max_len), 0)  # (B,)
    j = torch.arange(max_len, device=seq.device)
    src = (cut[:, None] - max_len + j).clamp(0, W - 1)  # (B, max_len) column of history slot j
    history = torch.where(j >= max_len - h_len[:, None], seq.gather(1, src), 0)  # (B, max_len)
    i = torch.arange(n_positives, device=seq.device)
    psrc = (cut[:, None] + i).clamp(0, W - 1)  # (B, P)
    positives = torch.where(i < k[:, None], seq.gather(1, psrc), 0)  # (B, P)
    return history, positives


def per_position_states(encoder: nn.Module, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """States ``(B, L, d)`` for a loss that scores every position ``t`` against later items.

    The one way into a per-position loss: it refuses an encoder that is not causal, whose
    ``h[:, t]`` would see item ``t+1``, its own target.
    """
    if not getattr(encoder, "causal", False):
        raise RuntimeError(
            f"{type(encoder).__name__} is not causal: its state at position t sees item t+1, the target of a "
            f"per-position loss; train it at the last position only (objective.name in {list(LAST_POSITION_OBJECTIVES)})"
        )
    return encoder(x, mask)  # (B, L, d)


@dataclass(frozen=True)
class ModelConfig:
    """The whole model (section ``model``). ``dim`` and ``max_len`` are set once here and passed
    to the parts that need them."""

    dim: int = 64
    """Width d of item vectors, user encoder and fusion (PMMRec 768, TransRec 256)."""
    max_len: int = 20
    """L: the longest history the user encoder reads (the papers' 20 / 25). ``preprocess.max_seq_len``
    may not exceed ``train_window - 1`` (``check_history_length``): L for a causal encoder."""
    item_tower: ItemTowerConfig = field(default_factory=ItemTowerConfig)
    text_encoder: TextEncoderConfig | None = None
    image_encoder: ImageEncoderConfig | None = None
    fusion: FusionConfig | None = None
    user_encoder: UserEncoderConfig = field(default_factory=UserEncoderConfig)
    objective: ObjectiveConfig = field(default_factory=ObjectiveConfig)
    nicl_head: bool = True
    """Project item modality vectors through a shared MLP head before NICL (early official code)."""

    @classmethod
    def from_dict(cls, data: dict[str, Any] | None, where: str = "model") -> ModelConfig:
        data = dict(data or {})
        check_keys(cls, data, where)
        dim, max_len = data.get("dim", 64), data.get("max_len", 20)
        tower = optional_section(ItemTowerConfig, data.get("item_tower") or {}, f"{where}.item_tower")
        text = optional_section(TextEncoderConfig, data.get("text_encoder"), f"{where}.text_encoder")
        image = optional_section(ImageEncoderConfig, data.get("image_encoder"), f"{where}.image_encoder")
        fusion = optional_section(FusionConfig, data.get("fusion"), f"{where}.fusion", dim=dim)
        user = optional_section(UserEncoderConfig, data.get("user_encoder") or {}, f"{where}.user_encoder",
                                dim=dim, max_len=max_len)
        objective = optional_section(ObjectiveConfig, data.get("objective") or {}, f"{where}.objective")
        try:
            return cls(dim=dim, max_len=max_len, item_tower=tower, text_encoder=text, image_encoder=image, fusion=fusion,
                       user_encoder=user, objective=objective, nicl_head=data.get("nicl_head", True))
        except (TypeError, ValueError) as exc:
            raise ValueError(f"{where}: {exc}") from exc

    def __post_init__(self):
        if self.dim < 1 or self.max_len < 1:
            raise ValueError(f"dim and max_len must be >= 1, got {self.dim}, {self.max_len}")
        if self.user_encoder.dim != self.dim or self.user_encoder.max_len != self.max_len:
            raise ValueError("user_encoder.dim / max_len must equal model.dim / max_len")
        if self.fusion is not None and self.fusion.dim != self.dim:
            raise ValueError("fusion.dim must equal model.dim")
        for m in self.item_tower.modalities:
            if getattr(self, f"{m}_encoder") is None:
                raise ValueError(f"item tower {self.item_tower.name!r} needs model.{m}_encoder")
        if self.item_tower.name == "fused" and self.fusion is None:
            raise ValueError("item tower 'fused' needs model.fusion")
        if self.objective.nicl_enabled and len(self.item_tower.modalities) < 2:
            raise ValueError(
                f"objective.nicl_enabled needs a tower with text and image (mom, fused), not {self.item_tower.name!r}"
            )
        if not self.causal and self.objective.name not in LAST_POSITION_OBJECTIVES:
            raise ValueError(
                f"user encoder {self.user_encoder.name!r} is bidirectional, so it trains at the last position only; "
                f"objective {self.objective.name!r} takes a loss at every position (position t would see its target "
                f"t+1): use objective.name in {list(LAST_POSITION_OBJECTIVES)} (TransRec: bce)"
            )

    @property
    def causal(self) -> bool:
        """Whether the user encoder is causal (per-position training) or not (last position only)."""
        return USER_ENCODERS[self.user_encoder.name].causal

    @property
    def train_window(self) -> int:
        """W, the items of one training row: ``max_len + 1`` for a causal encoder (L inputs, each
        predicting the next), ``max_len + objective.bce_positives`` for a bidirectional one (up to L
        history items, then the positives)."""
        return self.max_len + (1 if self.causal else self.objective.bce_positives)

    def check_history_length(self, max_seq_len: int, where: str = "config") -> None:
        """How ``preprocess.max_seq_len`` relates to this model: a user's training sequence holds up
        to ``max_seq_len + 1`` items and must fit in one training row (``train_window``), else its
        oldest items would never be trained on while ``cold_items`` counts them as seen."""
        if max_seq_len + 1 > self.train_window:
            what = "model.max_len + 1" if self.causal else "model.max_len + objective.bce_positives"
            raise ValueError(
                f"{where}: preprocess.max_seq_len ({max_seq_len}) keeps up to {max_seq_len + 1} training items per "
                f"user, but a training row of this model holds {self.train_window} ({what}): the oldest would never "
                f"be trained on while cold-start evaluation counts them as seen; set preprocess.max_seq_len <= "
                f"{self.train_window - 1} or raise model.max_len"
            )

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self) | {"item_tower": self.item_tower.to_dict()}


class NICLHead(nn.Module):
    """Shared projection of text and image item vectors for NICL (LayerNorm instead of the early
    official code's BatchNorm: batches of a few users are common on a CPU)."""

    def __init__(self, dim: int):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(dim, dim), nn.LayerNorm(dim), nn.GELU(), nn.Linear(dim, dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class Recommender(nn.Module):
    """Item tower + user encoder + heads. ``attach(content, train_seqs)`` before training/scoring."""

    def __init__(self, cfg: ModelConfig, n_items: int = 0):
        super().__init__()
        self.cfg = cfg
        self.item_tower = build_item_tower(cfg.item_tower, cfg.dim, n_items, cfg.text_encoder, cfg.image_encoder, cfg.fusion)
        self.user_encoder = build_user_encoder(cfg.user_encoder)
        obj = cfg.objective
        self.nicl_head = NICLHead(cfg.dim) if obj.nicl_enabled and cfg.nicl_head else None
        self.nid_head = NIDHead(cfg.dim) if obj.nid_weight > 0 else None
        self.content: ItemContent | None = None
        self.register_buffer("log_pop", torch.zeros(1), persistent=False)
        self.generator = torch.Generator().manual_seed(0)

    # -- data ---------------------------------------------------------------------------------
    def attach(self, content: ItemContent, train_seqs: torch.Tensor | None = None, seed: int = 0) -> Recommender:
        """Use ``content`` for item vectors and the item popularity of ``train_seqs`` (any shape,
        0 = padding) for the debiased softmax. Content, popularity and the generator of negatives
        and corruption go to the model's device: move the model first (``model.to(device)``)."""
        self._check_features(content)
        device = self.log_pop.device
        self.content = content.to(device)
        if train_seqs is not None:
            self.log_pop = item_log_popularity(train_seqs, content.n_items).to(device)
        else:
            self.log_pop = torch.zeros(content.n_items + 1, device=device)
        self.generator = torch.Generator(device=device).manual_seed(seed)
        return self

    def _check_features(self, content: ItemContent) -> None:
        """Cached features must be the output of this model's frozen encoder bottoms: features of
        another model or frozen depth (a config whose ``trainable_layers`` changed after
        ``item_features`` ran) would go through the trained layers without any error."""
        for modality in ("text", "image"):
            built = content.fingerprints.get(modality)
            path = getattr(self.item_tower, modality, None)
            encoder = getattr(path, "encoder", None)
            if built is None or encoder is None or getattr(content, modality) is None:
                continue
            own = encoder.fingerprint()
            if own != built:
                raise ValueError(
                    f"the item content's {modality} features were built by an encoder with fingerprint {built}, "
                    f"but this model's {modality} encoder has {own} (another model, frozen depth or max_length): "
                    "build item_features with this model's config")

    def _content(self) -> ItemContent:
        if self.content is None:
            raise RuntimeError("no item content attached: call model.attach(content, train_seqs) first")
        return self.content

    # -- vectors ------------------------------------------------------------------------------
    def item_vectors(self, idx: torch.Tensor) -> torch.Tensor:
        """Vectors of items ``idx`` (any shape) -> ``(*idx.shape, d)``; padding (0) gives zeros."""
        flat = idx.reshape(-1)
        uniq, inv = torch.unique(flat, return_inverse=True)
        vec = self.item_tower(self._content(), uniq)  # (u, d)
        vec = vec * (uniq > 0).unsqueeze(-1)
        return vec[inv].reshape(*idx.shape, self.cfg.dim)

    @torch.no_grad()
    def all_item_vectors(self, batch_size: int = 256) -> torch.Tensor:
        """Every catalog item's vector, ``(N+1, d)`` with row 0 = padding (zeros)."""
        n = self._content().n_items
        dev = self.log_pop.device
        out = [self.item_tower(self.content, torch.arange(s, min(s + batch_size, n + 1), device=dev))
               for s in range(0, n + 1, batch_size)]
        vecs = torch.cat(out)
        vecs[0] = 0
        return vecs

    def user_vectors(self, histories: torch.Tensor, item_vecs: torch.Tensor | None = None) -> torch.Tensor:
        """``histories (U, L)`` left- or right-padded item indices -> user vectors ``(U, d)``."""
        histories = histories.to(self.log_pop.device)
        mask = histories > 0
        x = item_vecs[histories] if item_vecs is not None else self.item_vectors(histories)  # (U, L, d)
        h = self.user_encoder(x, mask)  # (U, L, d)
        return self.user_encoder.user_vector(h, mask)  # (U, d)

    # -- training -----------------------------------------------------------------------------
    def training_layout(self, seq: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Item ids of a training batch ``seq (B, W)`` split into what the user encoder reads and what
        each scored state must predict: ``(inputs (B, L), targets (B, T, P))``, 0 = none.

        Causal encoder: ``inputs = seq[:, :-1]``, T = L, ``targets[:, t]`` = the next P items after t.
        Bidirectional: ``last_position_split``, T = 1 (the user vector). P = ``bce_positives`` for
        ``bce``, else 1.
        """
        obj = self.cfg.objective
        n_pos = obj.bce_positives if obj.name == "bce" else 1
        if self.user_encoder.causal:
            return seq[:, :-1], next_items(seq, n_pos)  # (B, L), (B, L, P)
        history, positives = last_position_split(seq, self.cfg.max_len, n_pos)  # (B, L), (B, P)
        return history, positives.unsqueeze(1)  # (B, L), (B, 1, P)

    def training_states(self, x: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Encoder states ``h (B, L, d)`` of the inputs and the states the main loss scores
        ``(B, T, d)``: every position (causal, through ``per_position_states``) or the last one."""
        if self.user_encoder.causal:
            h = per_position_states(self.user_encoder, x, mask)  # (B, L, d)
            return h, h
        if self.cfg.objective.name not in LAST_POSITION_OBJECTIVES:
            raise RuntimeError(f"objective {self.cfg.objective.name!r} cannot train a bidirectional user encoder")
        h = self.user_encoder(x, mask)  # (B, L, d)
        return h, self.user_encoder.user_vector(h, mask).unsqueeze(1)  # (B, L, d), (B, 1, d)

    def training_loss(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """The loss of the batch. Under ``torchrun`` ``batch`` holds this process's rows of the global
        batch: the towers and the user encoder run on them, the losses on every rank's rows
        (``mmrec.distributed``: gathered with gradients; id draws made for the global batch), so
        every rank returns the loss one process would compute for the whole batch."""
        seq = batch["seq"]  # (b, W) this process's rows; b = B in one process
        obj, content = self.cfg.objective, self._content()
        counts = row_counts(seq.shape[0], seq.device)  # rows per rank ([B] in one process)
        mine = local_rows(counts)

        def everyone(t: torch.Tensor) -> torch.Tensor:  # (b, ...) -> (B, ...); the identity in one process
            return gather_rows(t, counts)

        seq_all = everyone(seq)  # (B, W)
        inputs_all, targets_all = self.training_layout(seq_all)  # (B, L), (B, T, P) item ids
        inputs, targets = inputs_all[mine], targets_all[mine]  # (b, L), (b, T, P)
        # every item the losses need (grid, negatives, corrupted histories) goes through the tower once
        groups = {"seq": seq}
        if obj.name == "full_softmax":  # every catalog item is a candidate: one tower pass over all of them
            groups["all"] = torch.arange(content.n_items + 1, device=seq.device)
        if obj.name == "bce":
            groups["pos"] = targets
            neg_all = sample_negatives(content.n_items, (*targets_all.shape[:2], obj.bce_negatives), generator=self.generator,
                                       exclude=seq_all)  # (B, T, K)
            groups["neg"] = neg_all[mine]
        if not self.user_encoder.causal:
            groups["inputs"] = inputs  # the split history (its ids are in the grid: no extra tower work)
        if obj.uses_corruption:
            # corrupt the history the user encoder reads (the last item is kept by design); the whole
            # row is excluded from the replacements, so a noise item is never one of the targets
            noisy_all, noise = corrupt_sequences(inputs_all, obj.corruption, content.n_items, generator=self.generator,
                                                 exclude=seq_all)  # (B, L) each
            groups["noisy"] = noisy_all[mine]
        flat = torch.cat([g.reshape(-1) for g in groups.values()])
        uniq, inv = torch.unique(flat, return_inverse=True)
        out = self.item_tower(content, uniq, with_modalities=obj.nicl_enabled)
        vec, modalities = out if obj.nicl_enabled else (out, None)  # (u, d)
        vec = vec * (uniq > 0).unsqueeze(-1)
        parts_inv = dict(zip(groups, inv.split([g.numel() for g in groups.values()])))

        def lookup(name: str, table: torch.Tensor = vec) -> torch.Tensor:
            return table[parts_inv[name]].reshape(*groups[name].shape, table.shape[-1])

        e = lookup("seq")  # (b, W, d)
        mask = inputs > 0  # (b, L)
        h, queries = self.training_states(e[:, :-1] if self.user_encoder.causal else lookup("inputs"), mask)  # (b, L, d), (b, T, d)
        parts: dict[str, torch.Tensor] = {}
        if obj.name == "softmax":
            parts["main"] = next_item_softmax(everyone(h), everyone(e), seq_all, self.log_pop, obj.softmax_temperature)
        elif obj.name == "full_softmax":
            parts["main"] = full_softmax(everyone(h), lookup("all"), seq_all, obj.softmax_temperature)  # all (N+1, d)
        else:
            # pos (B, T, P, d), neg (B, T, K, d)
            parts["main"] = bce_sampled(everyone(queries), everyone(lookup("pos")), everyone(lookup("neg")), targets_all > 0)
        if obj.nicl_enabled:
            tp, vp, has_t, has_v = modalities
            if self.nicl_head is not None:
                tp, vp = self.nicl_head(tp), self.nicl_head(vp)
            tv, iv = lookup("seq", tp), lookup("seq", vp)  # (b, L+1, d)
            both = (has_t & has_v)[parts_inv["seq"]].reshape(seq.shape)
            parts["nicl"] = nicl(everyone(tv), everyone(iv), everyone(seq * both), obj.nicl)
        if obj.uses_corruption:
            noisy = groups["noisy"]
            h_noisy = self.user_encoder(lookup("noisy"), noisy > 0)  # (b, L, d)
            if obj.nid_weight > 0:
                parts["nid"] = nid_loss(everyone(self.nid_head(h_noisy)), noise, noisy_all > 0)
            if obj.rcl_weight > 0:
                u_clean = self.user_encoder.user_vector(h, mask)
                u_noisy = self.user_encoder.user_vector(h_noisy, noisy > 0)
                parts["rcl"] = rcl_loss(everyone(u_clean), everyone(u_noisy), obj.rcl_temperature,
                                        valid=(inputs_all > 0).sum(1) >= 2)
        loss = total_loss(parts, obj)
        return {"loss": loss, **{k: v.detach() for k, v in parts.items()}}

    def param_groups(self) -> list[dict]:
        """Encoders without weight decay (PMMRec); the recommender group takes the trainer's."""
        enc, rec = [], []
        for name, p in self.named_parameters():
            if not p.requires_grad:
                continue
            (enc if ".encoder." in f".{name}" and name.startswith("item_tower.") else rec).append(p)
        groups = [{"name": "recommender", "params": rec}]
        if enc:
            groups.append({"name": "encoders", "params": enc, "weight_decay": 0.0})
        return groups

    # -- scoring ------------------------------------------------------------------------------
    @torch.no_grad()
    def score(self, histories: torch.Tensor, item_vecs: torch.Tensor | None = None) -> torch.Tensor:
        """Scores of every item for each history: ``(U, N+1)`` (column 0 = padding)."""
        item_vecs = self.all_item_vectors() if item_vecs is None else item_vecs
        return self.user_vectors(histories, item_vecs) @ item_vecs.T
