"""User encoders: a sequence of item vectors -> user states.

References
    * SASRec as used by PMMRec (Li et al., "Multi-Modality is All You Need for Transferable
      Recommender Systems", ICDE 2024): ``LayerNorm(item + position)``, dropout, 2 causal blocks,
      ReLU FFN of 4d; ``h[:, t]`` predicts the item at step ``t + 1``.
    * TransRec (Wang et al., "TransRec: Learning Transferable Recommendation from
      Mixture-of-Modality Feedback"): 4 bidirectional BERT layers, d=256, FFN 128, learned
      positions; the user vector is the output at the last valid position. Transfer by fine-tuning
      everything or by training bottleneck adapters only (Houlsby et al., ICML 2019).

Conventions
    ``x (B, L, d)`` item vectors and ``mask (B, L)`` booleans (True = real item). Sequences may be
    left- or right-padded (real items must be contiguous and in chronological order).

Design choices
    * Blocks are **post-LN**, ``LayerNorm(x + Dropout(Sublayer(x)))``, as in both official code
      bases (PMMRec's SASRec blocks and TransRec's BERT layers).
    * **Positions never depend on the amount of padding.** They are computed from the mask:
      SASRec counts from the oldest real item (0, 1, 2, ...), so ``h[:, t]`` of a long sequence
      equals the last output for its prefix of ``t + 1`` items: every training step sees what
      inference sees. TransRec counts back from the most recent item, which always gets position
      ``max_len - 1``, as in the official code, where full-length left-padded sequences put it there.
    * A position may always attend to itself. For real positions this changes nothing (they
      attend to themselves anyway); padding positions whose every key is masked (left padding
      under the causal mask, or all-padding rows) would otherwise be a fully masked softmax row,
      which is NaN on some attention backends. Real positions never attend to padding, and
      outputs at padding positions are set to zero.
    * Adapters (``adapter_dim``): ``z + Up(ReLU(Down(z)))`` on each sublayer's output, before the
      block's residual + LayerNorm, after attention and after the FFN. ``Up`` starts at zero so an
      adapter starts as the identity and inserting adapters into a trained encoder changes
      nothing. TransRec's official adapter had its own LayerNorm inside; that one is dropped
      because it would break the identity at insertion: the block's LayerNorm that follows plays
      its role ("residual then LayerNorm").
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import nn


@dataclass(frozen=True)
class UserEncoderConfig:
    """Hyper-parameters of a user encoder (section ``user_encoder`` of a config file)."""

    name: str = "sasrec"
    """Architecture: a key of ``USER_ENCODERS`` (``sasrec``: PMMRec, causal; ``transrec``:
    TransRec, bidirectional)."""
    dim: int = 64
    """Width d of item vectors and user states (PMMRec 768, TransRec 256)."""
    n_layers: int = 2
    """Number of Transformer blocks (PMMRec 2, TransRec 4)."""
    n_heads: int = 2
    """Attention heads per block; must divide ``dim`` (PMMRec 2, TransRec 4)."""
    ffn_dim: int | None = None
    """Hidden width of the feed-forward sublayer; ``None`` means ``4 * dim`` (PMMRec).
    TransRec used 128."""
    max_len: int = 20
    """Longest history in items: the size of the position table (PMMRec 20, TransRec 25)."""
    dropout: float = 0.1
    """Dropout on the embeddings, the attention weights and each sublayer's output."""
    adapter_dim: int | None = None
    """Bottleneck width of the adapters inserted after attention and after the FFN of each block;
    ``None``: no adapters. TransRec used ``dim // 2``."""
    layer_norm_eps: float = 1e-6
    """Epsilon of every LayerNorm (1e-6 in PMMRec's SASRec)."""

    def __post_init__(self):
        if self.name not in USER_ENCODERS:
            raise ValueError(f"unknown user encoder {self.name!r}; valid names: {sorted(USER_ENCODERS)}")
        for field in ("dim", "n_layers", "n_heads", "max_len"):
            if getattr(self, field) < 1:
                raise ValueError(f"user_encoder.{field} must be >= 1, got {getattr(self, field)}")
        if self.dim % self.n_heads:
            raise ValueError(f"user_encoder.dim ({self.dim}) must be divisible by n_heads ({self.n_heads})")
        if self.ffn_dim is not None and self.ffn_dim < 1:
            raise ValueError(f"user_encoder.ffn_dim must be >= 1 or null, got {self.ffn_dim}")
        if self.adapter_dim is not None and self.adapter_dim < 1:
            raise ValueError(f"user_encoder.adapter_dim must be >= 1 or null, got {self.adapter_dim}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"user_encoder.dropout must be in [0, 1), got {self.dropout}")
        if self.layer_norm_eps <= 0:
            raise ValueError(f"user_encoder.layer_norm_eps must be > 0, got {self.layer_norm_eps}")

    @property
    def ffn_hidden(self) -> int:
        """The resolved FFN width (``ffn_dim`` or ``4 * dim``)."""
        return self.ffn_dim if self.ffn_dim is not None else 4 * self.dim


# ---------------------------------------------------------------------------------------------
# Building blocks (also used by ``mmrec.models.fusion``)
# ---------------------------------------------------------------------------------------------


def attention_mask(mask: torch.Tensor, causal: bool) -> torch.Tensor:
    """Which keys each query may attend to: ``(B, L)`` validity -> ``(B, L, L)``, True = allowed.

    Real keys only (and, if ``causal``, no later keys), plus the query itself, so that no row is
    fully masked (a fully masked softmax row is NaN on some backends).
    """
    length = mask.shape[1]
    allowed = mask[:, None, :].expand(-1, length, -1)  # (B, L, L) [query, key]
    if causal:
        allowed = allowed & torch.ones(length, length, dtype=torch.bool, device=mask.device).tril()
    return allowed | torch.eye(length, dtype=torch.bool, device=mask.device)  # (B, L, L)


def item_positions(mask: torch.Tensor, max_len: int, anchor: str) -> torch.Tensor:
    """Position of each real item, independent of where and how much padding there is.

    ``anchor="start"``: the oldest real item is 0. ``anchor="end"``: the most recent real item is
    ``max_len - 1``. Padding positions get 0 (their value is irrelevant: they are masked).
    """
    rank = mask.long().cumsum(dim=1) - 1  # (B, L) 0-based index among real items
    if anchor == "end":
        rank = rank + (max_len - mask.sum(dim=1, keepdim=True))  # (B, L)
    elif anchor != "start":
        raise ValueError(f"unknown position anchor {anchor!r}; valid anchors: ['end', 'start']")
    return torch.where(mask, rank, 0)  # (B, L)


def last_valid(h: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Output at each row's last real position: ``(B, L, d)``, ``(B, L)`` -> ``(B, d)``.

    Works for left and right padding. An all-padding row returns ``h[:, 0]`` (zero for encoder
    outputs, which are zeroed at padding).
    """
    steps = torch.arange(mask.shape[1], device=mask.device)  # (L,)
    index = torch.where(mask, steps, -1).amax(dim=1).clamp(min=0)  # (B,)
    return h[torch.arange(h.shape[0], device=h.device), index]  # (B, d)


class MultiHeadSelfAttention(nn.Module):
    """Multi-head self-attention over a boolean ``allowed`` matrix (True = may attend)."""

    def __init__(self, dim: int, n_heads: int, dropout: float):
        super().__init__()
        self.n_heads = n_heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.out = nn.Linear(dim, dim)
        self.dropout = dropout

    def forward(self, x: torch.Tensor, allowed: torch.Tensor) -> torch.Tensor:
        return self.out(self.attend(self.qkv(x), allowed))  # (B, L, d)

    def attend(self, qkv: torch.Tensor, allowed: torch.Tensor) -> torch.Tensor:
        """Attention over already projected ``qkv (B, L, 3d)``; ``(B, L, d)`` before the output projection."""
        b, length, dim = qkv.shape[0], qkv.shape[1], qkv.shape[2] // 3
        q, k, v = qkv.split(dim, dim=-1)  # 3 x (B, L, d)
        heads = (b, length, self.n_heads, dim // self.n_heads)
        q, k, v = (t.view(heads).transpose(1, 2) for t in (q, k, v))  # (B, H, L, d/H)
        y = F.scaled_dot_product_attention(
            q, k, v, attn_mask=allowed[:, None], dropout_p=self.dropout if self.training else 0.0
        )  # (B, H, L, d/H)
        return y.transpose(1, 2).reshape(b, length, dim)  # (B, L, d)


class Adapter(nn.Module):
    """Bottleneck adapter ``z + Up(ReLU(Down(z)))``; ``Up`` is zero-initialised (identity at start)."""

    def __init__(self, dim: int, bottleneck: int):
        super().__init__()
        self.down = nn.Linear(dim, bottleneck)
        self.up = nn.Linear(bottleneck, dim)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        nn.init.normal_(self.down.weight, std=0.02)
        nn.init.zeros_(self.down.bias)
        nn.init.zeros_(self.up.weight)
        nn.init.zeros_(self.up.bias)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return z + self.up(F.relu(self.down(z)))  # (B, L, d)


ACTIVATIONS = {"relu": nn.ReLU, "gelu": nn.GELU}


class TransformerBlock(nn.Module):
    """Post-LN encoder block with optional adapters after attention and after the FFN."""

    def __init__(
        self,
        dim: int,
        n_heads: int,
        ffn_dim: int,
        dropout: float,
        activation: str = "relu",
        layer_norm_eps: float = 1e-6,
        adapter_dim: int | None = None,
    ):
        super().__init__()
        if activation not in ACTIVATIONS:
            raise ValueError(f"unknown activation {activation!r}; valid activations: {sorted(ACTIVATIONS)}")
        self.attn = MultiHeadSelfAttention(dim, n_heads, dropout)
        self.attn_adapter = Adapter(dim, adapter_dim) if adapter_dim else nn.Identity()
        self.attn_norm = nn.LayerNorm(dim, eps=layer_norm_eps)
        self.ffn = nn.Sequential(nn.Linear(dim, ffn_dim), ACTIVATIONS[activation](), nn.Linear(ffn_dim, dim))
        self.ffn_adapter = Adapter(dim, adapter_dim) if adapter_dim else nn.Identity()
        self.ffn_norm = nn.LayerNorm(dim, eps=layer_norm_eps)
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor, allowed: torch.Tensor, valid: torch.Tensor | None = None) -> torch.Tensor:
        """``x (B, L, d)`` -> ``(B, L, d)``. With ``valid (B, L)`` the per-token sublayers (attention
        projections, FFN, norms, dropout) run on the valid tokens only and the attention on the padded
        grid: the valid outputs equal the unpacked block's as long as ``allowed`` lets no valid query
        attend an invalid key (``attention_mask`` guarantees it); invalid positions come back zero.
        Worth it where much of the grid is padding (the fusion's token grid)."""
        if valid is None:
            x = self.attn_norm(x + self.attn_adapter(self.dropout(self.attn(x, allowed))))  # (B, L, d)
            return self.ffn_norm(x + self.ffn_adapter(self.dropout(self.ffn(x))))  # (B, L, d)
        b, length, dim = x.shape
        rows = valid.reshape(-1).nonzero(as_tuple=True)[0]  # (N,) flat indices of the valid tokens
        xv = x.reshape(-1, dim).index_select(0, rows)  # (N, d)
        qkv = self.attn.qkv(xv)  # (N, 3d)
        grid = qkv.new_zeros(b * length, qkv.shape[1]).index_copy(0, rows, qkv).view(b, length, -1)  # (B, L, 3d)
        y = self.attn.attend(grid, allowed).reshape(-1, dim).index_select(0, rows)  # (N, d)
        xv = self.attn_norm(xv + self.attn_adapter(self.dropout(self.attn.out(y))))  # (N, d)
        xv = self.ffn_norm(xv + self.ffn_adapter(self.dropout(self.ffn(xv))))  # (N, d)
        return xv.new_zeros(b * length, dim).index_copy(0, rows, xv).view(b, length, dim)  # (B, L, d)


def init_weights(module: nn.Module) -> None:
    """BERT-style initialisation (``module.apply(init_weights)``); adapters keep their identity init."""
    if isinstance(module, nn.Linear):
        nn.init.normal_(module.weight, std=0.02)
        if module.bias is not None:
            nn.init.zeros_(module.bias)
    elif isinstance(module, nn.Embedding):
        nn.init.normal_(module.weight, std=0.02)
    elif isinstance(module, nn.LayerNorm):
        nn.init.ones_(module.weight)
        nn.init.zeros_(module.bias)
    elif isinstance(module, Adapter):  # visited after its Linear children by nn.Module.apply
        module.reset_parameters()


# ---------------------------------------------------------------------------------------------
# User encoders
# ---------------------------------------------------------------------------------------------


class TransformerUserEncoder(nn.Module):
    """Shared body: ``LayerNorm(item + position)``, dropout, ``n_layers`` blocks.

    Subclasses fix the attention pattern (``causal``), the position scheme (``position_anchor``)
    and the FFN activation.
    """

    causal: ClassVar[bool]
    """Whether ``h[:, t]`` depends on items ``0..t`` only. Every encoder declares it: a causal one is
    trained at every position, any other at its last position only (``mmrec.models.recommender``);
    the tests check each declaration against the encoder's gradients."""
    position_anchor: ClassVar[str]
    activation: ClassVar[str]

    def __init__(self, cfg: UserEncoderConfig):
        super().__init__()
        self.cfg = cfg
        self.position = nn.Embedding(cfg.max_len, cfg.dim)
        self.input_norm = nn.LayerNorm(cfg.dim, eps=cfg.layer_norm_eps)
        self.dropout = nn.Dropout(cfg.dropout)
        self.blocks = nn.ModuleList(
            TransformerBlock(
                cfg.dim, cfg.n_heads, cfg.ffn_hidden, cfg.dropout, self.activation, cfg.layer_norm_eps, cfg.adapter_dim
            )
            for _ in range(cfg.n_layers)
        )
        self.apply(init_weights)

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Item vectors ``x (B, L, d)``, ``mask (B, L)`` -> states ``h (B, L, d)``, zero at padding."""
        if x.shape[1] > self.cfg.max_len:
            raise ValueError(f"sequence length {x.shape[1]} exceeds max_len {self.cfg.max_len}")
        mask = mask.bool()
        x = x.masked_fill(~mask[..., None], 0.0)  # (B, L, d) padding content cannot leak or be NaN
        pos = item_positions(mask, self.cfg.max_len, self.position_anchor)  # (B, L)
        h = self.dropout(self.input_norm(x + self.position(pos)))  # (B, L, d)
        allowed = attention_mask(mask, self.causal)  # (B, L, L)
        for block in self.blocks:
            h = block(h, allowed)  # (B, L, d)
        return h.masked_fill(~mask[..., None], 0.0)  # (B, L, d)

    def user_vector(self, h: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """The user state after the whole history: ``h`` at the last real position, ``(B, d)``."""
        return last_valid(h, mask.bool())  # (B, d)

    def freeze_for_adapters(self) -> None:
        """Parameter-efficient transfer: only adapters and LayerNorms stay trainable."""
        if self.cfg.adapter_dim is None:
            raise RuntimeError("freeze_for_adapters() needs adapters: set user_encoder.adapter_dim")
        for p in self.parameters():
            p.requires_grad_(False)
        for module in self.modules():
            if isinstance(module, (Adapter, nn.LayerNorm)):
                for p in module.parameters():
                    p.requires_grad_(True)


class SASRec(TransformerUserEncoder):
    """PMMRec's user encoder: causal, positions from the oldest item, ReLU FFN.

    ``h[:, t]`` is the user state after items ``0..t``: the prediction for step ``t + 1``.
    """

    causal = True
    position_anchor = "start"
    activation = "relu"


class TransRecEncoder(TransformerUserEncoder):
    """TransRec's user encoder: bidirectional, positions back from the most recent item, GELU FFN
    (BERT layers in the official code). Read the user vector with ``user_vector``."""

    causal = False
    position_anchor = "end"
    activation = "gelu"


USER_ENCODERS: dict[str, type[TransformerUserEncoder]] = {"sasrec": SASRec, "transrec": TransRecEncoder}


def build_user_encoder(cfg: UserEncoderConfig) -> TransformerUserEncoder:
    """Instantiate the encoder named by ``cfg.name``; unknown names raise listing the valid ones."""
    try:
        cls = USER_ENCODERS[cfg.name]
    except KeyError:
        raise ValueError(f"unknown user encoder {cfg.name!r}; valid names: {sorted(USER_ENCODERS)}") from None
    return cls(cfg)
