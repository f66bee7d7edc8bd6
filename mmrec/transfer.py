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
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

PARTS: dict[str, tuple[str, ...]] = {
    "whole": ("item_tower.", "user_encoder."),
    "item": ("item_tower.",),
    "user": ("user_encoder.",),
    "text": ("item_tower.text.",),
    "image": ("item_tower.image.",),
    "none": (),
}


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


def load_part(model: nn.Module, state: dict[str, torch.Tensor], part: str) -> TransferReport:
    """Copy the keys of ``part`` from ``state`` into ``model``; raise listing every problem."""
    if part not in PARTS:
        raise TransferError(f"unknown transfer part {part!r}; valid parts: {sorted(PARTS)}")
    prefixes = PARTS[part]
    own = model.state_dict()
    expected = {k for k in own if k.startswith(prefixes)} if prefixes else set()
    provided = {k for k in state if k.startswith(prefixes)} if prefixes else set()
    missing = sorted(expected - provided)
    unexpected = sorted(provided - expected)
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
        for k in sorted(expected):
            own[k].copy_(state[k])
    return TransferReport(part, sorted(expected), sorted(set(state) - expected))
