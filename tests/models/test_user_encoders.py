"""Tests for mmrec/models/user_encoders.py: contracts over the registry, then invariants."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from mmrec.models.user_encoders import (
    USER_ENCODERS,
    Adapter,
    SASRec,
    TransRecEncoder,
    UserEncoderConfig,
    attention_mask,
    build_user_encoder,
    item_positions,
)

D = 16
MAX_LEN = 8


def make_cfg(name: str, **overrides) -> UserEncoderConfig:
    base = dict(name=name, dim=D, n_layers=2, n_heads=2, max_len=MAX_LEN, dropout=0.1)
    base.update(overrides)
    return UserEncoderConfig(**base)


def make_encoder(name: str, seed: int = 0, **overrides):
    torch.manual_seed(seed)
    return build_user_encoder(make_cfg(name, **overrides))


def item_bank(n_items: int = 30, seed: int = 1) -> torch.Tensor:
    """Row i = content vector of item i (row 0, padding, is never used)."""
    return torch.randn(n_items + 1, D, generator=torch.Generator().manual_seed(seed))


def pad(seqs: list[list[int]], length: int, side: str, bank: torch.Tensor):
    """Sequences of item ids -> item vectors ``(B, length, d)`` and mask; padding content is noise."""
    x = torch.randn(len(seqs), length, D, generator=torch.Generator().manual_seed(99)) * 5  # garbage
    mask = torch.zeros(len(seqs), length, dtype=torch.bool)
    for b, seq in enumerate(seqs):
        n = len(seq)
        cols = range(n) if side == "right" else range(length - n, length)
        for c, item in zip(cols, seq):
            x[b, c] = bank[item]
            mask[b, c] = True
    return x, mask


def real_rows(h: torch.Tensor, mask: torch.Tensor) -> list[torch.Tensor]:
    """Per sequence, the outputs at its real positions in order ``(n_b, d)``."""
    return [h[b][mask[b]] for b in range(h.shape[0])]


SEQS = [[1, 2, 3, 4, 5, 6], [7, 8, 9], [10], [11, 12, 13, 14], []]  # the last user is all padding
ENCODER_NAMES = sorted(USER_ENCODERS)


# ----------------------------------------------------------------------------- config + registry


def test_config_defaults_and_validation():
    cfg = make_cfg("sasrec")
    assert cfg.ffn_hidden == 4 * D
    assert make_cfg("transrec", ffn_dim=128).ffn_hidden == 128
    with pytest.raises(ValueError, match="divisible"):
        make_cfg("sasrec", n_heads=3)
    with pytest.raises(ValueError, match="dropout"):
        make_cfg("sasrec", dropout=1.0)
    with pytest.raises(ValueError, match="adapter_dim"):
        make_cfg("sasrec", adapter_dim=0)


def test_unknown_name_lists_valid_names():
    with pytest.raises(ValueError, match=r"valid names: \['sasrec', 'transrec'\]"):
        make_cfg("bert4rec")
    cfg = make_cfg("sasrec")
    object.__setattr__(cfg, "name", "gru4rec")  # a config that bypassed validation
    with pytest.raises(ValueError, match=r"unknown user encoder 'gru4rec'.*sasrec.*transrec"):
        build_user_encoder(cfg)


def test_registry_builds_the_named_class():
    assert isinstance(make_encoder("sasrec"), SASRec)
    assert isinstance(make_encoder("transrec"), TransRecEncoder)


def test_sequence_longer_than_max_len_is_refused():
    enc = make_encoder("sasrec")
    with pytest.raises(ValueError, match="max_len"):
        enc(torch.randn(2, MAX_LEN + 1, D), torch.ones(2, MAX_LEN + 1, dtype=torch.bool))


def test_attention_mask_never_leaves_a_row_empty_and_never_exposes_padding():
    mask = torch.tensor([[False, False, True, True], [True, True, False, False], [False] * 4])
    for causal in (False, True):
        allowed = attention_mask(mask, causal)
        assert allowed.shape == (3, 4, 4)
        assert allowed.any(dim=-1).all(), "a fully masked row gives NaN on some attention backends"
        real_query = mask[:, :, None].expand(-1, -1, 4)
        assert not (allowed & real_query & ~mask[:, None, :]).any(), "a real item attended to padding"
        if causal:
            assert not allowed.triu(diagonal=1).any()
    assert attention_mask(mask, causal=False)[0, 2].tolist() == [False, False, True, True]
    assert attention_mask(mask, causal=True)[0, 2].tolist() == [False, False, True, False]
    assert attention_mask(mask, causal=True)[2].tolist() == torch.eye(4, dtype=torch.bool).tolist()


def test_item_positions_ignore_padding():
    mask = torch.tensor([[False, False, True, True, True], [True, True, True, False, False]])
    assert item_positions(mask, 8, "start").tolist() == [[0, 0, 0, 1, 2], [0, 1, 2, 0, 0]]
    assert item_positions(mask, 8, "end").tolist() == [[0, 0, 5, 6, 7], [5, 6, 7, 0, 0]]
    with pytest.raises(ValueError, match="anchor"):
        item_positions(mask, 8, "middle")


# ----------------------------------------------------------------------------- contract


@pytest.mark.parametrize("adapter_dim", [None, 4])
@pytest.mark.parametrize("side", ["left", "right"])
@pytest.mark.parametrize("name", ENCODER_NAMES)
def test_contract_shape_finite_gradients(name, side, adapter_dim):
    enc = make_encoder(name, adapter_dim=adapter_dim)
    enc.train()
    x, mask = pad(SEQS, MAX_LEN, side, item_bank())
    x.requires_grad_(True)
    h = enc(x, mask)
    u = enc.user_vector(h, mask)
    assert h.shape == (len(SEQS), MAX_LEN, D)
    assert u.shape == (len(SEQS), D)
    assert torch.isfinite(h).all() and torch.isfinite(u).all()
    assert (h[~mask] == 0).all(), "outputs at padding must be zero"
    assert (u[-1] == 0).all(), "an all-padding user has the zero vector"

    weights = torch.randn_like(h)
    (h * weights).sum().add((u * weights[:, 0]).sum()).backward()
    for pname, p in enc.named_parameters():
        if not p.requires_grad:
            continue
        assert p.grad is not None, pname
        assert torch.isfinite(p.grad).all(), pname
        if ".down." in pname:  # zero-initialised Up blocks the gradient to Down at the very start
            continue
        assert p.grad.abs().sum() > 0, pname
    assert torch.isfinite(x.grad).all()
    assert (x.grad[~mask] == 0).all(), "padding content must not influence anything"


# ----------------------------------------------------------------------------- adapters


@pytest.mark.parametrize("name", ENCODER_NAMES)
def test_adapters_start_as_identity_in_a_trained_encoder(name):
    plain = make_encoder(name)
    with torch.no_grad():  # stand-in for training: move every weight away from its init
        for p in plain.parameters():
            p.add_(0.3 * torch.randn_like(p))
    adapted = build_user_encoder(dataclasses.replace(plain.cfg, adapter_dim=4))
    result = adapted.load_state_dict(plain.state_dict(), strict=False)
    assert result.unexpected_keys == []
    assert result.missing_keys and all("adapter" in k for k in result.missing_keys)

    plain.eval(), adapted.eval()
    x, mask = pad(SEQS, MAX_LEN, "left", item_bank())
    torch.testing.assert_close(adapted(x, mask), plain(x, mask), atol=1e-6, rtol=0)


@pytest.mark.parametrize("name", ENCODER_NAMES)
def test_freeze_for_adapters_trains_only_adapters_and_layer_norms(name):
    enc = make_encoder(name, adapter_dim=4)
    enc.freeze_for_adapters()
    expected = {
        f"{mod_name}.{p_name}"
        for mod_name, module in enc.named_modules()
        if isinstance(module, (Adapter, torch.nn.LayerNorm))
        for p_name, _ in module.named_parameters()
    }
    trainable = {n for n, p in enc.named_parameters() if p.requires_grad}
    assert trainable == expected
    assert any("adapter" in n for n in trainable)
    assert not any(n.startswith("position") or ".attn.qkv" in n or ".ffn." in n for n in trainable)

    enc.train()
    x, mask = pad(SEQS, MAX_LEN, "right", item_bank())
    target = torch.randn(len(SEQS), MAX_LEN, D)

    def step_grads():
        enc.zero_grad(set_to_none=True)
        ((enc(x, mask) - target) ** 2).sum().backward()
        return {n: p.grad for n, p in enc.named_parameters()}

    grads = step_grads()
    for n, p in enc.named_parameters():
        if n in trainable:
            assert grads[n] is not None and torch.isfinite(grads[n]).all(), n
        else:
            assert grads[n] is None, f"frozen {n} received a gradient"
    # At init the Up projections get a gradient; once they moved, Down does too.
    assert all(grads[n].abs().sum() > 0 for n in trainable if ".up." in n)
    with torch.no_grad():
        for n, p in enc.named_parameters():
            if p.requires_grad:
                p.sub_(0.1 * grads[n])
    grads = step_grads()
    for n in trainable:
        assert grads[n].abs().sum() > 0, n


def test_freeze_for_adapters_without_adapters_fails():
    with pytest.raises(RuntimeError, match="adapter_dim"):
        make_encoder("transrec").freeze_for_adapters()


# ----------------------------------------------------------------------------- invariants


@pytest.mark.parametrize("side", ["left", "right"])
def test_sasrec_is_causal(side):
    enc = make_encoder("sasrec").eval()
    bank = item_bank()
    x, mask = pad([[1, 2, 3, 4, 5, 6, 7, 8], [9, 10, 11, 12, 13]], MAX_LEN, side, bank)
    h = enc(x, mask)
    for t in range(MAX_LEN - 1):
        future = torch.zeros(MAX_LEN, dtype=torch.bool)
        future[t + 1:] = True
        x2 = x.clone()
        x2[:, future] = torch.randn_like(x2[:, future])
        h2 = enc(x2, mask)
        torch.testing.assert_close(h2[:, : t + 1], h[:, : t + 1], atol=1e-6, rtol=0)
        assert not torch.allclose(h2[0, t + 1:], h[0, t + 1:], atol=1e-4), "perturbation had no effect"


def test_sasrec_step_t_equals_prefix_of_length_t_plus_1():
    """Positions count from the oldest item, so every training step sees what inference sees."""
    enc = make_encoder("sasrec").eval()
    bank = item_bank()
    seq = [3, 1, 4, 1, 5, 9]
    full, mask = pad([seq], MAX_LEN, "right", bank)
    h = enc(full, mask)
    for t in range(len(seq)):
        x, m = pad([seq[: t + 1]], MAX_LEN, "left", bank)
        torch.testing.assert_close(enc.user_vector(enc(x, m), m)[0], h[0, t], atol=1e-5, rtol=0)


@pytest.mark.parametrize("name", ENCODER_NAMES)
def test_padding_invariance(name):
    enc = make_encoder(name).eval()
    bank = item_bank()
    seqs = SEQS[:-1]
    variants = [pad(seqs, 6, "right", bank), pad(seqs, 6, "left", bank), pad(seqs, MAX_LEN, "left", bank),
                pad(seqs, MAX_LEN, "right", bank)]
    outputs = [(real_rows(enc(x, m), m), enc.user_vector(enc(x, m), m)) for x, m in variants]
    ref_rows, ref_user = outputs[0]
    for rows, user in outputs[1:]:
        for a, b in zip(rows, ref_rows):
            torch.testing.assert_close(a, b, atol=1e-5, rtol=0)
        torch.testing.assert_close(user, ref_user, atol=1e-5, rtol=0)
    # the user vector is the output at the last real item
    h = enc(*variants[0])
    for b, seq in enumerate(seqs):
        torch.testing.assert_close(ref_user[b], h[b, len(seq) - 1])


@pytest.mark.parametrize("side", ["left", "right"])
def test_transrec_is_bidirectional(side):
    enc = make_encoder("transrec").eval()
    bank = item_bank()
    x, mask = pad([[1, 2, 3, 4, 5]], MAX_LEN, side, bank)
    cols = mask[0].nonzero().squeeze(1)
    first, last = cols[0].item(), cols[-1].item()
    h = enc(x, mask)

    x_early = x.clone()
    x_early[0, first] = bank[20]
    assert not torch.allclose(enc.user_vector(enc(x_early, mask), mask), enc.user_vector(h, mask), atol=1e-4)

    x_late = x.clone()
    x_late[0, last] = bank[21]
    h_late = enc(x_late, mask)
    assert not torch.allclose(h_late[0, first:last], h[0, first:last], atol=1e-4)


def test_sasrec_last_item_does_not_change_earlier_but_transrec_does():
    bank = item_bank()
    x, mask = pad([[1, 2, 3, 4]], MAX_LEN, "right", bank)
    x2 = x.clone()
    x2[0, 3] = bank[25]
    sas, trans = make_encoder("sasrec").eval(), make_encoder("transrec").eval()
    torch.testing.assert_close(sas(x2, mask)[0, :3], sas(x, mask)[0, :3], atol=1e-6, rtol=0)
    assert not torch.allclose(trans(x2, mask)[0, :3], trans(x, mask)[0, :3], atol=1e-4)


# ----------------------------------------------------------------------------- packed block


def test_packed_block_equals_the_padded_block_at_valid_positions():
    """``TransformerBlock(..., valid=)`` runs its per-token work on valid tokens only: the valid outputs
    and every parameter gradient equal the padded block's; invalid positions come back zero."""
    from mmrec.models.user_encoders import TransformerBlock

    torch.manual_seed(0)
    block = TransformerBlock(D, 2, 4 * D, dropout=0.1, activation="gelu", adapter_dim=4).eval()
    x = torch.randn(5, 7, D)
    valid = torch.arange(7)[None, :] < torch.tensor([7, 3, 1, 5, 2])[:, None]  # (5, 7) right-padded
    valid[3, 1] = False  # a hole in the middle (a missing modality's block)
    allowed = attention_mask(valid, causal=False)
    ref = block(x, allowed)
    ref_loss = (ref * valid[..., None]).pow(2).sum()
    ref_grads = torch.autograd.grad(ref_loss, list(block.parameters()))
    packed = block(x, allowed, valid=valid)
    assert torch.allclose(packed[valid], ref[valid], atol=1e-5)
    assert (packed[~valid] == 0).all()
    grads = torch.autograd.grad(packed.pow(2).sum(), list(block.parameters()))
    for g, r in zip(grads, ref_grads):
        assert torch.allclose(g, r, atol=1e-5)
