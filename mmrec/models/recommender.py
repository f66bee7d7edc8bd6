"""The sequential recommender: item tower -> user encoder -> objectives.

Reference
    PMMRec (item tower ``fused``, SASRec, in-batch debiased softmax + NICL + NID + RCL) and TransRec
    (item tower ``mom``, bidirectional user encoder, BCE with sampled negatives), both ID-free; the
    ``id`` tower gives the ID-SASRec baseline. Presets in ``configs/presets/`` name the parts.

A training batch is ``{"seq": (B, L+1)}``: each user's last L+1 training items, left-padded with
0. Every item of the batch grid is encoded once (``torch.unique``), the user encoder reads items
``0..L-1`` and ``h[:, t]`` predicts item ``t+1``. Scoring is a dot product between user vectors and
item vectors, so evaluation and serving precompute every item vector once.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from mmrec.config import from_dict
from mmrec.encoders.image import ImageEncoderConfig
from mmrec.encoders.text import TextEncoderConfig
from mmrec.models.fusion import FusionConfig
from mmrec.models.towers import ItemContent, ItemTowerConfig, build_item_tower
from mmrec.models.user_encoders import UserEncoderConfig, build_user_encoder
from mmrec.objectives import (
    NIDHead,
    ObjectiveConfig,
    bce_sampled,
    corrupt_sequences,
    item_log_popularity,
    next_item_softmax,
    nicl,
    nid_loss,
    rcl_loss,
    sample_negatives,
    total_loss,
)


def _section(cls, data: Any, where: str, **shared):
    """An optional config section: None stays None, a built config passes through."""
    if data is None or isinstance(data, cls):
        return data
    return from_dict(cls, data, where, **shared)


@dataclass(frozen=True)
class ModelConfig:
    """The whole model (section ``model``). ``dim`` and ``max_len`` are set once here and passed
    to the parts that need them."""

    dim: int = 64
    """Width d of item vectors, user encoder and fusion (PMMRec 768, TransRec 256)."""
    max_len: int = 20
    """L: the longest history the user encoder reads (the papers' 20 / 25)."""
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
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - names)
        if unknown:
            raise ValueError(f"{where}: unknown key(s) {unknown}; valid keys: {sorted(names)}")
        dim, max_len = data.get("dim", 64), data.get("max_len", 20)
        tower = _section(ItemTowerConfig, data.get("item_tower") or {}, f"{where}.item_tower")
        text = _section(TextEncoderConfig, data.get("text_encoder"), f"{where}.text_encoder")
        image = _section(ImageEncoderConfig, data.get("image_encoder"), f"{where}.image_encoder")
        fusion = _section(FusionConfig, data.get("fusion"), f"{where}.fusion", dim=dim)
        user = _section(UserEncoderConfig, data.get("user_encoder") or {}, f"{where}.user_encoder", dim=dim, max_len=max_len)
        objective = _section(ObjectiveConfig, data.get("objective") or {}, f"{where}.objective")
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

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


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
        0 = padding) for the debiased softmax."""
        self.content = content
        if train_seqs is not None:
            self.log_pop = item_log_popularity(train_seqs, content.n_items).to(self.log_pop.device)
        else:
            self.log_pop = torch.zeros(content.n_items + 1)
        self.generator = torch.Generator().manual_seed(seed)
        return self

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
        out = [self.item_tower(self.content, torch.arange(s, min(s + batch_size, n + 1))) for s in range(0, n + 1, batch_size)]
        vecs = torch.cat(out)
        vecs[0] = 0
        return vecs

    def user_vectors(self, histories: torch.Tensor, item_vecs: torch.Tensor | None = None) -> torch.Tensor:
        """``histories (U, L)`` left- or right-padded item indices -> user vectors ``(U, d)``."""
        mask = histories > 0
        x = item_vecs[histories] if item_vecs is not None else self.item_vectors(histories)  # (U, L, d)
        h = self.user_encoder(x, mask)  # (U, L, d)
        return self.user_encoder.user_vector(h, mask)  # (U, d)

    # -- training -----------------------------------------------------------------------------
    def training_loss(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        seq = batch["seq"]  # (B, L+1)
        obj, content = self.cfg.objective, self._content()
        B, L1 = seq.shape
        # every item the losses need (grid, negatives, corrupted histories) goes through the tower once
        groups = {"seq": seq}
        if obj.name == "bce":
            groups["neg"] = sample_negatives(content.n_items, (B, L1 - 1, obj.bce_negatives), generator=self.generator, exclude=seq)
        if obj.uses_corruption:
            # corrupt the history the user encoder reads (the last item is kept by design)
            groups["noisy"], noise = corrupt_sequences(seq[:, :-1], obj.corruption, content.n_items, generator=self.generator)
        flat = torch.cat([g.reshape(-1) for g in groups.values()])
        uniq, inv = torch.unique(flat, return_inverse=True)
        out = self.item_tower(content, uniq, with_modalities=obj.nicl_enabled)
        vec, modalities = out if obj.nicl_enabled else (out, None)  # (u, d)
        vec = vec * (uniq > 0).unsqueeze(-1)
        parts_inv = dict(zip(groups, inv.split([g.numel() for g in groups.values()])))

        def lookup(name: str, table: torch.Tensor = vec) -> torch.Tensor:
            return table[parts_inv[name]].reshape(*groups[name].shape, table.shape[-1])

        e = lookup("seq")  # (B, L+1, d)
        mask = seq[:, :-1] > 0  # (B, L)
        h = self.user_encoder(e[:, :-1], mask)  # (B, L, d)
        parts: dict[str, torch.Tensor] = {}
        if obj.name == "softmax":
            parts["main"] = next_item_softmax(h, e, seq, self.log_pop, obj.softmax_temperature)
        else:
            parts["main"] = bce_sampled(h, e[:, 1:], lookup("neg"), (seq[:, :-1] > 0) & (seq[:, 1:] > 0))  # neg (B, L, K, d)
        if obj.nicl_enabled:
            tp, vp, has_t, has_v = modalities
            if self.nicl_head is not None:
                tp, vp = self.nicl_head(tp), self.nicl_head(vp)
            tv, iv = lookup("seq", tp), lookup("seq", vp)  # (B, L+1, d)
            both = (has_t & has_v)[parts_inv["seq"]].reshape(B, L1)
            parts["nicl"] = nicl(tv, iv, seq * both, obj.nicl)
        if obj.uses_corruption:
            noisy = groups["noisy"]
            h_noisy = self.user_encoder(lookup("noisy"), noisy > 0)  # (B, L, d)
            if obj.nid_weight > 0:
                parts["nid"] = nid_loss(self.nid_head(h_noisy), noise, noisy > 0)
            if obj.rcl_weight > 0:
                u_clean = self.user_encoder.user_vector(h, mask)
                u_noisy = self.user_encoder.user_vector(h_noisy, noisy > 0)
                parts["rcl"] = rcl_loss(u_clean, u_noisy, obj.rcl_temperature, valid=mask.sum(1) >= 2)
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
