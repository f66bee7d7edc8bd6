"""Item towers: item content -> item vector ``(M, d)``. A registry, picked by name in config.

Reference
    TransRec (mixture-of-modality feedback: each item is routed to the encoder of its modality and
    the results are scattered back into order) and PMMRec (text and image token states, projected
    to d and fused). MoRec/NineRec's ID-based SASRec is the ``id`` baseline.

Towers never see raw files. They read an ``ItemContent``: for every catalog row (item_idx 0..N,
row 0 = padding) either the *cached* output of each encoder's frozen bottom
(``mmrec.encoders.cache``) or the *raw* encoder inputs (token ids, uint8 pixels), in which case
the tower runs the frozen bottom itself (end-to-end). Both give the same vectors; the cache only
saves the frozen compute. The trained top layers, pooling, projections and fusion always run here.

Registry ``ITEM_TOWERS``:
    ``id``     ID embedding (baseline; not transferable: no content)
    ``text``   text encoder -> pooling -> Linear(H, d)
    ``image``  image encoder -> pooled -> Linear(C, d)
    ``mom``    TransRec: each item through the encoder of its modality; items with both use
               ``mom_both`` (text | image | mean)
    ``fused``  PMMRec: text tokens and image tokens projected to d, then a fusion module
               (``mmrec.models.fusion.FUSIONS``); missing modalities are masked by the fusion
Items lacking the tower's single modality (``text`` tower, image-only item) get the projection of
a zero vector: one shared "no content" vector, which is all a content model can know about them.

``item_tower.item_ids`` (content towers, usually set for fine-tuning only through
``finetune.item_tower``): UniSRec's *transductive* setting, a per-item ID embedding of the target
catalog added to the content vector. It starts at zero (the model computes what the content alone
does), never transfers (``mmrec.transfer``: catalog-bound) and ties the model to its catalog: an item
added later (index beyond the embedding) gets its content vector alone.

Registry ``ADAPTORS`` (``item_tower.adaptor``: how an encoder's width H reaches d, per token and pooled):
    ``linear`` ``Linear(H, d)`` (PMMRec's and TransRec's projection)
    ``moe``    UniSRec's mixture of parametric-whitening experts for frozen features:
               ``sum_k g_k(x) (x - b_k) W_k``, gates ``g = softmax(x G + noise)`` with the noise
               ``N(0, 1) * softplus(x N)`` only in training, dropout on ``x``
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

import torch
from torch import nn

from mmrec.encoders.image import ImageEncoder, ImageEncoderConfig
from mmrec.encoders.text import TextEncoder, TextEncoderConfig
from mmrec.models.fusion import FusionConfig, build_fusion

MOM_BOTH = ("text", "image", "mean")


class MoEAdaptor(nn.Module):
    """UniSRec's MoE adaptor ``(..., H) -> (..., d)``: ``experts`` parametric-whitening maps
    ``(x - b_k) W_k`` mixed by a noisy softmax gate of ``x`` (noise only in training)."""

    def __init__(self, in_dim: int, dim: int, experts: int = 8, dropout: float = 0.2):
        super().__init__()
        self.bias = nn.Parameter(torch.zeros(experts, in_dim))  # b_k
        self.weight = nn.Parameter(torch.empty(experts, in_dim, dim))  # W_k
        nn.init.normal_(self.weight, std=in_dim ** -0.5)
        self.gate = nn.Linear(in_dim, experts, bias=False)
        self.noise = nn.Linear(in_dim, experts, bias=False)
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.dropout(x)  # (..., H)
        logits = self.gate(x)  # (..., K)
        if self.training:
            logits = logits + torch.randn_like(logits) * nn.functional.softplus(self.noise(x))
        g = torch.softmax(logits, dim=-1)  # (..., K)
        # (x - b_k) W_k = x W_k - b_k W_k: x is never copied K times
        experts = torch.einsum("...h,khd->...kd", x, self.weight) - torch.einsum("kh,khd->kd", self.bias, self.weight)
        return (g.unsqueeze(-1) * experts).sum(-2)  # (..., d)


def build_adaptor(cfg: ItemTowerConfig, in_dim: int, dim: int) -> nn.Module:
    """``cfg.adaptor``'s map from an encoder's width to d (``ADAPTORS``)."""
    if cfg.adaptor == "moe":
        return MoEAdaptor(in_dim, dim, cfg.adaptor_experts, cfg.adaptor_dropout)
    return nn.Linear(in_dim, dim)


def no_content(proj: nn.Module) -> torch.Tensor:
    """What ``proj`` maps a zero vector to ``(d,)``: the vector of an item without the modality."""
    if isinstance(proj, nn.Linear):
        return proj.bias
    return proj(proj.bias.new_zeros(1, proj.bias.shape[1]))[0]  # MoEAdaptor


ADAPTOR_FIELDS = ("adaptor", "adaptor_experts", "adaptor_dropout")
"""The ``ItemTowerConfig`` fields that configure the content adaptor (left out of ``to_dict`` with the
``linear`` one, and of the ID baselines' item towers, which map no encoder)."""


@dataclass(frozen=True)
class ItemTowerConfig:
    """Which item tower and how it combines modalities (section ``model.item_tower``)."""

    name: str = "fused"
    """A key of ``ITEM_TOWERS``: id, text, image, mom, fused."""
    mom_both: str = "text"
    """``mom`` tower: the encoder for items that have text and image (text | image | mean)."""
    dropout: float = 0.1
    """Dropout on the item vector."""
    adaptor: str = "linear"
    """A key of ``ADAPTORS`` (its settings: ``ADAPTOR_FIELDS``): how each encoder's features (tokens and pooled) reach width d."""
    adaptor_experts: int = 8
    """``moe`` adaptor: number of whitening experts (UniSRec: 8)."""
    adaptor_dropout: float = 0.2
    """``moe`` adaptor: dropout on the frozen features before the experts."""
    item_ids: bool = False
    """Transductive: add a learned ID embedding per catalog item (zero at start) to the content vector."""

    def __post_init__(self):
        if self.name not in ITEM_TOWERS:
            raise ValueError(f"unknown item tower {self.name!r}; valid names: {sorted(ITEM_TOWERS)}")
        if self.mom_both not in MOM_BOTH:
            raise ValueError(f"item_tower.mom_both must be one of {MOM_BOTH}, got {self.mom_both!r}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"item_tower.dropout must be in [0, 1), got {self.dropout}")
        if self.adaptor not in ADAPTORS:
            raise ValueError(f"unknown item_tower.adaptor {self.adaptor!r}; valid names: {list(ADAPTORS)}")
        if self.adaptor_experts < 1 or not 0.0 <= self.adaptor_dropout < 1.0:
            raise ValueError(f"item_tower.adaptor_experts must be >= 1 and adaptor_dropout in [0, 1), got "
                             f"{self.adaptor_experts} and {self.adaptor_dropout}")
        if self.item_ids and self.name == "id":
            raise ValueError("item_tower.item_ids adds ID embeddings to a content tower; the 'id' tower is one already")

    @property
    def modalities(self) -> tuple[str, ...]:
        return TOWER_MODALITIES[self.name]

    def to_dict(self) -> dict:
        """The fields as a mapping; with the ``linear`` adaptor the adaptor fields are left out (they
        have no effect) and ``item_ids`` when off, so every run key and ``model.json`` written before
        these fields existed still matches."""
        out = dataclasses.asdict(self)
        if self.adaptor == "linear":
            for k in ADAPTOR_FIELDS:
                out.pop(k)
        if not self.item_ids:
            out.pop("item_ids")
        return out


@dataclass
class ItemContent:
    """Per-item encoder inputs for a whole catalog (row ``i`` = item_idx ``i``; row 0 = padding).

    ``text`` holds either ``hidden (N+1, T, H)`` + ``mask (N+1, T)`` (cached bottom output) or
    ``input_ids`` + ``attention_mask`` (raw). ``image`` holds ``hidden (N+1, C, h, w)`` (cached,
    top blocks trained), ``tokens (N+1, g*g, C)`` + ``pooled (N+1, C)`` (cached, everything
    frozen) or ``pixels (N+1, 3, S, S)`` uint8 (raw). Absent modalities are ``None``.
    """

    n_items: int
    has_text: torch.Tensor
    has_image: torch.Tensor
    text: dict[str, torch.Tensor] | None = None
    image: dict[str, torch.Tensor] | None = None
    fingerprints: dict[str, str] = field(default_factory=dict)

    def __post_init__(self):
        for name in ("has_text", "has_image"):
            t = getattr(self, name)
            if t.shape != (self.n_items + 1,):
                raise ValueError(f"ItemContent.{name} must have shape ({self.n_items + 1},), got {tuple(t.shape)}")
            t[0] = False  # padding has no content

    @property
    def device(self) -> torch.device:
        return self.has_text.device

    def to(self, device: torch.device | str) -> ItemContent:
        """This content with every tensor on ``device`` (itself when already there). The whole
        catalog moves once, so a training step only gathers rows where the model runs."""
        device = torch.device(device)
        if self.device == device:
            return self
        moved = lambda group: None if group is None else {k: v.to(device) for k, v in group.items()}  # noqa: E731
        return ItemContent(self.n_items, self.has_text.to(device), self.has_image.to(device), moved(self.text),
                           moved(self.image), dict(self.fingerprints))

    def rows(self, modality: str, idx: torch.Tensor) -> dict[str, torch.Tensor]:
        src = getattr(self, modality)
        if src is None:
            raise ValueError(f"the item tower needs {modality} content, but none was provided")
        return {k: v[idx] for k, v in src.items()}


# --------------------------------------------------------------------------------------------
# Modality paths: content rows -> tokens (M, T, d) + mask + pooled (M, d)

class TextPath(nn.Module):
    """Text encoder top layers + pooling + projection to d."""

    def __init__(self, cfg: TextEncoderConfig, dim: int, tower: ItemTowerConfig | None = None):
        super().__init__()
        self.encoder = TextEncoder(cfg)
        self.proj = build_adaptor(tower or ItemTowerConfig(), self.encoder.hidden_size, dim)

    def forward(self, rows: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        if "hidden" in rows:
            hidden, mask = rows["hidden"].float(), rows["mask"].long()  # (M, T, H)
        else:
            mask = rows["attention_mask"].long()
            hidden = self.encoder.bottom(rows["input_ids"], mask)  # (M, T, H)
        tokens = self.encoder.top(hidden, mask)  # (M, T, H)
        pooled = self.encoder.pool(tokens, mask)  # (M, H)
        return _project_valid(self.proj, tokens, mask.bool()), mask.bool(), self.proj(pooled)  # (M, T, d), (M, T), (M, d)


class ImagePath(nn.Module):
    """Image encoder top blocks + spatial tokens + projection to d."""

    def __init__(self, cfg: ImageEncoderConfig, dim: int, tower: ItemTowerConfig | None = None):
        super().__init__()
        self.encoder = ImageEncoder(cfg)
        self.proj = build_adaptor(tower or ItemTowerConfig(), self.encoder.out_dim, dim)
        mean, std = self.encoder.normalization
        self.register_buffer("mean", torch.tensor(mean).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std).view(1, 3, 1, 1), persistent=False)

    def forward(self, rows: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        if "tokens" in rows:
            tokens, pooled = rows["tokens"].float(), rows["pooled"].float()  # (M, g*g, C), (M, C)
        else:
            if "pixels" in rows:
                pixels = (rows["pixels"].float() / 255.0 - self.mean) / self.std  # (M, 3, S, S)
                hidden = self.encoder.bottom(pixels)
            else:
                hidden = rows["hidden"].float()  # (M, C', h, w)
            tokens, pooled = self.encoder.top(hidden)  # (M, g*g, C), (M, C)
        mask = torch.ones(tokens.shape[:2], dtype=torch.bool, device=tokens.device)
        return self.proj(tokens), mask, self.proj(pooled)


def _project_valid(proj: nn.Module, tokens: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """``proj`` of the valid tokens ``(M, T, H) -> (M, T, d)``; padding positions are zero (every
    consumer of token sequences masks them), so titles shorter than T cost only their length."""
    m, length, hidden = tokens.shape
    rows = mask.reshape(-1).nonzero(as_tuple=True)[0]  # (N,)
    out = proj(tokens.reshape(-1, hidden).index_select(0, rows))  # (N, d)
    return out.new_zeros(m * length, out.shape[1]).index_copy(0, rows, out).view(m, length, -1)  # (M, T, d)


# --------------------------------------------------------------------------------------------
# Towers

class ItemTower(nn.Module):
    """Base: ``forward(content, idx (M,)) -> (M, d)``; with ``with_modalities`` also the per-modality
    pooled vectors ``(text (M, d), image (M, d), has_text (M,), has_image (M,))`` from the same pass
    (for NICL; None for single-modality towers)."""

    def __init__(self, cfg: ItemTowerConfig, dim: int):
        super().__init__()
        self.cfg, self.dim = cfg, dim
        self.dropout = nn.Dropout(cfg.dropout)
        self.item_ids: nn.Embedding | None = None
        """``cfg.item_ids``: ``(N+1, d)``, zero at start (set by ``build_item_tower``, which knows N)."""

    def forward(self, content: ItemContent, idx: torch.Tensor, with_modalities: bool = False, content_only: bool = False):
        """``content_only``: leave the ``item_ids`` embedding out (``idx`` are not rows of the
        training catalog: items given by content at serving time)."""
        vec, modalities = self.encode(content, idx, with_modalities)
        if self.item_ids is not None and not content_only:
            known = idx < self.item_ids.num_embeddings  # items added after training: content alone
            vec = vec + self.item_ids(torch.where(known, idx, 0))  # row 0 (padding) stays zero
        vec = self.dropout(vec)
        return (vec, modalities) if with_modalities else vec

    def encode(self, content: ItemContent, idx: torch.Tensor, with_modalities: bool = False):
        """``(vectors (M, d), modality vectors or None)``."""
        raise NotImplementedError


class IDTower(ItemTower):
    def __init__(self, cfg: ItemTowerConfig, dim: int, n_items: int, **_):
        super().__init__(cfg, dim)
        self.embedding = nn.Embedding(n_items + 1, dim, padding_idx=0)
        nn.init.normal_(self.embedding.weight, std=0.02)
        with torch.no_grad():
            self.embedding.weight[0].zero_()

    def encode(self, content: ItemContent, idx: torch.Tensor, with_modalities: bool = False):
        if content.n_items + 1 != self.embedding.num_embeddings:
            raise ValueError(
                f"ID tower was built for {self.embedding.num_embeddings - 1} items, the catalog has {content.n_items}: "
                "ID embeddings do not transfer across catalogs"
            )
        return self.embedding(idx), None  # (M, d)


class TextTower(ItemTower):
    def __init__(self, cfg: ItemTowerConfig, dim: int, text_encoder: TextEncoderConfig, **_):
        super().__init__(cfg, dim)
        self.text = TextPath(text_encoder, dim, cfg)

    def encode(self, content, idx, with_modalities=False):
        _, _, pooled = _run_path(self.text, content, "text", idx)
        return torch.where(content.has_text[idx].unsqueeze(-1), pooled, no_content(self.text.proj)), None


class ImageTower(ItemTower):
    def __init__(self, cfg: ItemTowerConfig, dim: int, image_encoder: ImageEncoderConfig, **_):
        super().__init__(cfg, dim)
        self.image = ImagePath(image_encoder, dim, cfg)

    def encode(self, content, idx, with_modalities=False):
        _, _, pooled = _run_path(self.image, content, "image", idx)
        return torch.where(content.has_image[idx].unsqueeze(-1), pooled, no_content(self.image.proj)), None


class MoMTower(ItemTower):
    """TransRec: route each item to its modality's encoder; only the items of a modality run it."""

    def __init__(self, cfg: ItemTowerConfig, dim: int, text_encoder: TextEncoderConfig, image_encoder: ImageEncoderConfig, **_):
        super().__init__(cfg, dim)
        self.text = TextPath(text_encoder, dim, cfg)
        self.image = ImagePath(image_encoder, dim, cfg)

    def encode(self, content, idx, with_modalities=False):
        has_t, has_v = content.has_text[idx], content.has_image[idx]
        both = has_t & has_v
        use_t = (has_t & ~(both & (self.cfg.mom_both == "image"))).unsqueeze(-1)  # (M, 1)
        use_v = (has_v & ~(both & (self.cfg.mom_both == "text"))).unsqueeze(-1)
        weight = torch.where(both & (self.cfg.mom_both == "mean"), 0.5, 1.0).unsqueeze(-1)
        if with_modalities:  # NICL needs both views of every item: run both paths on all of them
            _, _, tp = _run_path(self.text, content, "text", idx)
            _, _, vp = _run_path(self.image, content, "image", idx)
        else:  # each item only through the encoder of the modality it is routed to
            _, _, tp = _run_path(self.text, content, "text", idx, only=use_t.squeeze(-1))
            _, _, vp = _run_path(self.image, content, "image", idx, only=use_v.squeeze(-1))
        out = torch.where(use_t, tp * weight, 0.0) + torch.where(use_v, vp * weight, 0.0)  # (M, d)
        return out, ((tp, vp, has_t, has_v) if with_modalities else None)


class FusedTower(ItemTower):
    """PMMRec: projected text and image tokens combined by a fusion module."""

    def __init__(self, cfg: ItemTowerConfig, dim: int, text_encoder: TextEncoderConfig, image_encoder: ImageEncoderConfig,
                 fusion: FusionConfig, **_):
        super().__init__(cfg, dim)
        self.text = TextPath(text_encoder, dim, cfg)
        self.image = ImagePath(image_encoder, dim, cfg)
        self.fusion = build_fusion(fusion)

    def encode(self, content, idx, with_modalities=False):
        has_t, has_v = content.has_text[idx], content.has_image[idx]
        tt, tm, tp = _run_path(self.text, content, "text", idx)
        vt, vm, vp = _run_path(self.image, content, "image", idx)
        vec = self.fusion(text_tokens=tt, text_mask=tm, text_pooled=tp, image_tokens=vt, image_mask=vm, image_pooled=vp,
                          has_text=has_t, has_image=has_v)
        return vec, ((tp, vp, has_t, has_v) if with_modalities else None)


def _run_path(path: nn.Module, content: ItemContent, modality: str, idx: torch.Tensor, only: torch.Tensor | None = None):
    """Run ``path`` on the items of ``idx`` that have ``modality`` (and are selected by ``only``):
    an item without text has no tokens to attend to or pool. Other rows get zero tokens, an
    all-False mask and zero pooled."""
    has = getattr(content, f"has_{modality}")[idx]  # (M,)
    if only is not None:
        has = has & only
    if bool(has.all()):
        return path(content.rows(modality, idx))
    sel = has.nonzero(as_tuple=True)[0]
    tokens, mask, pooled = path(content.rows(modality, idx[sel] if sel.numel() else idx[:1]))
    if not sel.numel():  # nothing present: shapes from one (ignored) row
        sel, tokens, mask, pooled = sel, tokens[:0], mask[:0], pooled[:0]
    M = idx.shape[0]
    out_t = tokens.new_zeros((M, *tokens.shape[1:])).index_copy(0, sel, tokens)  # (M, T, d)
    out_m = mask.new_zeros((M, mask.shape[1])).index_copy(0, sel, mask)  # (M, T)
    out_p = pooled.new_zeros((M, pooled.shape[1])).index_copy(0, sel, pooled)  # (M, d)
    return out_t, out_m, out_p


ADAPTORS = ("linear", "moe")
ITEM_TOWERS = {"id": IDTower, "text": TextTower, "image": ImageTower, "mom": MoMTower, "fused": FusedTower}
TOWER_MODALITIES = {"id": (), "text": ("text",), "image": ("image",), "mom": ("text", "image"), "fused": ("text", "image")}


def build_item_tower(cfg: ItemTowerConfig, dim: int, n_items: int, text_encoder: TextEncoderConfig | None,
                     image_encoder: ImageEncoderConfig | None, fusion: FusionConfig | None) -> ItemTower:
    if cfg.name not in ITEM_TOWERS:
        raise ValueError(f"unknown item tower {cfg.name!r}; valid names: {sorted(ITEM_TOWERS)}")
    need = {"text": text_encoder, "image": image_encoder}
    for m in cfg.modalities:
        if need[m] is None:
            raise ValueError(f"item tower {cfg.name!r} needs a {m}_encoder section")
    if cfg.name == "fused" and fusion is None:
        raise ValueError("item tower 'fused' needs a fusion section")
    tower = ITEM_TOWERS[cfg.name](cfg, dim, n_items=n_items, text_encoder=text_encoder, image_encoder=image_encoder,
                                  fusion=fusion)
    if cfg.item_ids:
        tower.item_ids = nn.Embedding(n_items + 1, dim, padding_idx=0)
        nn.init.zeros_(tower.item_ids.weight)
    return tower
