"""Transfer: load a pretrained model, or one part of it, into a new model with strict key checks.

Parts (PMMRec's transfer granularity; TransRec transfers the whole model):

    whole   item tower + user encoder
    item    item tower (encoders + projections + fusion); the user encoder starts fresh
    user    user encoder only; the item tower starts fresh
    text    the text path of the item tower (text encoder + projection)
    image   the image path of the item tower (image encoder + projection)
    none    nothing: training from scratch

Training-only heads (NICL projection, NID classifier) never transfer. Every key the chosen part
expects must be loaded with the right shape, and the checkpoint must provide nothing under the
part's prefixes that the model does not expect: otherwise ``TransferError`` lists the missing,
unexpected and mis-shaped keys. (The official PMMRec code loaded with ``strict=False`` under a
mismatched prefix and silently loaded nothing.)

One exception, TransRec's parameter-efficient transfer: pretraining has no adapters and the target
model adds them. A checkpoint that holds *no* adapter key loads into a model with adapters when the
adapters' keys are exactly what is missing; the adapters are then (re)initialised as the identity, so
the loaded model computes what the pretrained one did. Any other missing key, or a checkpoint with
some adapter keys but not all, still fails.

Catalog-bound keys (``CATALOG_BOUND``: the transductive item ID embedding ``item_tower.item_ids``)
belong to one catalog's item indices and never transfer: whatever the checkpoint holds under them
is skipped and the model keeps its own (zero) initialisation, listed as ``fresh``.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from mmrec.models.user_encoders import Adapter

PARTS: dict[str, tuple[str, ...]] = {
    "whole": ("item_tower.", "user_encoder."),
    "item": ("item_tower.",),
    "user": ("user_encoder.",),
    "text": ("item_tower.text.",),
    "image": ("item_tower.image.",),
    "none": (),
}


CATALOG_BOUND: tuple[str, ...] = ("item_tower.item_ids.",)
"""Key prefixes tied to one catalog's item indices: never loaded by a transfer."""


class TransferError(ValueError):
    """A part could not be loaded completely."""


@dataclass(frozen=True)
class TransferConfig:
    """What the target model takes from the pretrained one (section ``transfer``)."""

    part: str = "whole"
    """A key of ``PARTS``: whole, item, user, text, image or none (from scratch)."""
    freeze_user_encoder_except_adapters: bool = False
    """Parameter-efficient transfer (TransRec adapters): train only the user encoder's adapters
    (and LayerNorms), plus the item tower. Needs ``model.user_encoder.adapter_dim``."""

    def __post_init__(self):
        if self.part not in PARTS:
            raise ValueError(f"unknown transfer part {self.part!r}; valid parts: {sorted(PARTS)}")


@dataclass
class TransferReport:
    part: str
    loaded: list[str]
    skipped: list[str]
    """Checkpoint keys outside the part (not loaded by design)."""
    fresh: list[str] = field(default_factory=list)
    """Keys kept at the model's initialisation: adapter keys the checkpoint did not have (the
    identity) and catalog-bound keys (``CATALOG_BOUND``, zero)."""


def adapter_modules(model: nn.Module, prefixes: tuple[str, ...]) -> dict[str, Adapter]:
    """The model's adapters under ``prefixes``, by module name."""
    return {name: m for name, m in model.named_modules() if isinstance(m, Adapter) and f"{name}.".startswith(prefixes)}


def load_part(model: nn.Module, state: dict[str, torch.Tensor], part: str) -> TransferReport:
    """Copy the keys of ``part`` from ``state`` into ``model``; raise listing every problem."""
    if part not in PARTS:
        raise TransferError(f"unknown transfer part {part!r}; valid parts: {sorted(PARTS)}")
    prefixes = PARTS[part]
    own = model.state_dict()
    bound = sorted(k for k in own if prefixes and k.startswith(prefixes) and k.startswith(CATALOG_BOUND))
    expected = {k for k in own if k.startswith(prefixes) and not k.startswith(CATALOG_BOUND)} if prefixes else set()
    provided = {k for k in state if k.startswith(prefixes) and not k.startswith(CATALOG_BOUND)} if prefixes else set()
    missing = sorted(expected - provided)
    unexpected = sorted(provided - expected)
    adapters = adapter_modules(model, prefixes) if prefixes else {}
    adapter_keys = {k for k in expected if k.startswith(tuple(f"{name}." for name in adapters))}
    fresh: list[str] = []
    if adapter_keys and not (adapter_keys & provided) and set(missing) == adapter_keys:
        fresh, missing = missing, []  # adapters added on the target (TransRec): identity below
    mis_shaped = sorted(
        f"{k}: checkpoint {tuple(state[k].shape)} vs model {tuple(own[k].shape)}"
        for k in expected & provided
        if state[k].shape != own[k].shape
    )
    if prefixes and not expected:
        raise TransferError(f"part {part!r}: the model has no parameters under {prefixes}")
    if missing or unexpected or mis_shaped:
        lines = [f"cannot load part {part!r} ({len(expected)} expected keys):"]
        for title, keys in (("missing", missing), ("unexpected", unexpected), ("shape mismatch", mis_shaped)):
            if keys:
                shown = keys[:20] + ([f"... and {len(keys) - 20} more"] if len(keys) > 20 else [])
                lines.append(f"  {title} ({len(keys)}): " + ", ".join(shown))
        raise TransferError("\n".join(lines))
    with torch.no_grad():
        for k in sorted(expected - set(fresh)):
            own[k].copy_(state[k])
    if fresh:
        for adapter in adapters.values():
            adapter.reset_parameters()
    return TransferReport(part, sorted(expected - set(fresh)), sorted(set(state) - expected), sorted(fresh + bound))
