"""Tests for mmrec/models/fusion.py: contracts over the registry, then missing-modality rules."""

from __future__ import annotations

import pytest
import torch

from mmrec.models.fusion import FUSIONS, FusionConfig, MergeAttentionFusion, build_fusion

D, B, TT, TV = 16, 6, 5, 4
FUSION_NAMES = sorted(FUSIONS)


def make_fusion(name: str, seed: int = 0, **overrides):
    torch.manual_seed(seed)
    base = dict(name=name, dim=D, n_heads=2, dropout=0.1)
    base.update(overrides)
    return build_fusion(FusionConfig(**base))


def make_views(seed: int = 1, requires_grad: bool = False) -> dict[str, torch.Tensor]:
    """A batch of item views; text is right-padded to varying lengths, images have no padding."""
    g = torch.Generator().manual_seed(seed)
    text_len = torch.tensor([5, 3, 1, 4, 2, 5])
    views = {
        "text_tokens": torch.randn(B, TT, D, generator=g),
        "text_mask": torch.arange(TT)[None, :] < text_len[:, None],
        "text_pooled": torch.randn(B, D, generator=g),
        "image_tokens": torch.randn(B, TV, D, generator=g),
        "image_mask": torch.ones(B, TV, dtype=torch.bool),
        "image_pooled": torch.randn(B, D, generator=g),
    }
    if requires_grad:
        for k in ("text_tokens", "text_pooled", "image_tokens", "image_pooled"):
            views[k].requires_grad_(True)
    return views


# items: both, text-only, image-only, both, text-only, image-only
HAS_TEXT = torch.tensor([True, True, False, True, True, False])
HAS_IMAGE = torch.tensor([True, False, True, True, False, True])


def with_garbage_in_missing(views: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Put NaN/large values where a modality is missing: a fusion must never read them."""
    v = {k: t.detach().clone() for k, t in views.items()}
    v["text_tokens"][~HAS_TEXT] = float("nan")
    v["text_pooled"][~HAS_TEXT] = float("nan")
    v["image_tokens"][~HAS_IMAGE] = 1e6
    v["image_pooled"][~HAS_IMAGE] = float("nan")
    return v


# ----------------------------------------------------------------------------- config + registry


def test_config_validation_and_defaults():
    assert FusionConfig(name="sum", dim=D).ffn_hidden == 4 * D
    with pytest.raises(ValueError, match="divisible"):
        FusionConfig(name="merge_attention", dim=D, n_heads=3)
    with pytest.raises(ValueError, match="dropout"):
        FusionConfig(dim=D, dropout=-0.1)


def test_unknown_name_lists_valid_names():
    with pytest.raises(ValueError, match=r"valid names: \['concat', 'gated', 'merge_attention', 'sum'\]"):
        FusionConfig(name="film", dim=D)
    cfg = FusionConfig(name="sum", dim=D)
    object.__setattr__(cfg, "name", "co_att")  # a config that bypassed validation
    with pytest.raises(ValueError, match=r"unknown fusion 'co_att'.*merge_attention"):
        build_fusion(cfg)


def test_token_flag():
    assert {n for n, cls in FUSIONS.items() if cls.uses_tokens} == {"merge_attention"}


# ----------------------------------------------------------------------------- contract


@pytest.mark.parametrize("missing", [False, True])
@pytest.mark.parametrize("name", FUSION_NAMES)
def test_contract_shape_finite_gradients(name, missing):
    fusion = make_fusion(name).train()
    views = make_views(requires_grad=True)
    flags = dict(has_text=HAS_TEXT, has_image=HAS_IMAGE) if missing else {}
    out = fusion(**views, **flags)
    assert out.shape == (B, D)
    assert torch.isfinite(out).all()

    (out * torch.randn_like(out)).sum().backward()
    for pname, p in fusion.named_parameters():
        assert p.grad is not None, pname
        assert torch.isfinite(p.grad).all(), pname
        assert p.grad.abs().sum() > 0, pname
    used = ("text_tokens", "image_tokens") if fusion.uses_tokens else ("text_pooled", "image_pooled")
    for key in used:
        assert views[key].grad is not None and views[key].grad.abs().sum() > 0, key


@pytest.mark.parametrize("name", FUSION_NAMES)
def test_missing_modality_content_is_never_read(name):
    fusion = make_fusion(name).eval()
    flags = dict(has_text=HAS_TEXT, has_image=HAS_IMAGE)
    views = make_views()
    out = fusion(**views, **flags)
    out_garbage = fusion(**with_garbage_in_missing(views), **flags)
    assert torch.isfinite(out_garbage).all()
    torch.testing.assert_close(out_garbage, out)


@pytest.mark.parametrize("name", FUSION_NAMES)
def test_single_modality_item_depends_only_on_its_modality(name):
    fusion = make_fusion(name).eval()
    flags = dict(has_text=HAS_TEXT, has_image=HAS_IMAGE)
    views = make_views()
    out = fusion(**views, **flags)
    other = make_views(seed=7)
    # change the image of every item: text-only items (1, 4) must not move, the others must
    swapped = dict(views, image_tokens=other["image_tokens"], image_pooled=other["image_pooled"])
    out2 = fusion(**swapped, **flags)
    torch.testing.assert_close(out2[~HAS_IMAGE], out[~HAS_IMAGE])
    assert not torch.allclose(out2[HAS_IMAGE], out[HAS_IMAGE], atol=1e-4)


@pytest.mark.parametrize("name", FUSION_NAMES)
def test_item_without_any_modality_is_zero(name):
    fusion = make_fusion(name).train()
    views = make_views(requires_grad=True)
    none = torch.tensor([False, True, True, True, True, True])
    out = fusion(**views, has_text=none, has_image=none)
    assert torch.isfinite(out).all()
    assert (out[0] == 0).all()
    out.sum().backward()
    assert all(torch.isfinite(p.grad).all() for p in fusion.parameters())


@pytest.mark.parametrize("name", ["sum", "concat", "gated"])
def test_pooled_fusions_substitute_the_present_modality(name):
    fusion = make_fusion(name).eval()
    views = make_views()
    out = fusion(**views, has_text=HAS_TEXT, has_image=HAS_IMAGE)
    text_only = HAS_TEXT & ~HAS_IMAGE
    image_only = HAS_IMAGE & ~HAS_TEXT
    tp, vp = views["text_pooled"], views["image_pooled"]
    torch.testing.assert_close(out[text_only], fusion.combine(tp[text_only], tp[text_only]))
    torch.testing.assert_close(out[image_only], fusion.combine(vp[image_only], vp[image_only]))
    both = HAS_TEXT & HAS_IMAGE
    torch.testing.assert_close(out[both], fusion.combine(tp[both], vp[both]))


def test_sum_is_the_sum():
    views = make_views()
    torch.testing.assert_close(make_fusion("sum")(**views), views["text_pooled"] + views["image_pooled"])


def test_gated_is_symmetric_in_form():
    """Swapping the roles of the two modalities together with their weights leaves the output unchanged."""
    fusion = make_fusion("gated").eval()
    views = make_views()
    tp, vp = views["text_pooled"], views["image_pooled"]
    mirrored = make_fusion("gated").eval()
    mirrored.text_gate.load_state_dict(fusion.image_gate.state_dict())
    mirrored.image_gate.load_state_dict(fusion.text_gate.state_dict())
    mirrored.text_value.load_state_dict(fusion.image_value.state_dict())
    mirrored.image_value.load_state_dict(fusion.text_value.state_dict())
    torch.testing.assert_close(mirrored(text_pooled=vp, image_pooled=tp), fusion(text_pooled=tp, image_pooled=vp))


# ----------------------------------------------------------------------------- merge-attention


@pytest.mark.parametrize("row", [MergeAttentionFusion.TEXT, MergeAttentionFusion.IMAGE])
def test_merge_attention_uses_modality_type_embeddings(row):
    """PMMRec's official code computed type embeddings and never added them: here each one counts."""
    fusion = make_fusion("merge_attention").eval()
    views = make_views()
    out = fusion(**views)
    with torch.no_grad():
        fusion.modality_type.weight[row].add_(torch.randn(D))
    assert not torch.allclose(fusion(**views), out, atol=1e-4)


def test_merge_attention_missing_image_equals_no_image_tokens():
    fusion = make_fusion("merge_attention").eval()
    views = make_views()
    out = fusion(**views, has_image=torch.zeros(B, dtype=torch.bool))
    empty = dict(views, image_tokens=torch.zeros(B, 0, D), image_mask=torch.zeros(B, 0, dtype=torch.bool))
    torch.testing.assert_close(out, fusion(**empty), atol=1e-6, rtol=0)


def test_merge_attention_ignores_padding_tokens():
    fusion = make_fusion("merge_attention").eval()
    views = make_views()
    out = fusion(**views)
    extra = 3  # more right padding, with garbage in it
    longer = dict(
        views,
        text_tokens=torch.cat([views["text_tokens"], 1e3 * torch.randn(B, extra, D)], dim=1),
        text_mask=torch.cat([views["text_mask"], torch.zeros(B, extra, dtype=torch.bool)], dim=1),
    )
    torch.testing.assert_close(fusion(**longer), out, atol=1e-5, rtol=0)


def test_merge_attention_default_masks_mean_all_tokens_valid():
    fusion = make_fusion("merge_attention").eval()
    views = make_views()
    full = dict(views, text_mask=torch.ones(B, TT, dtype=torch.bool))
    no_masks = {k: v for k, v in views.items() if not k.endswith("_mask")}
    torch.testing.assert_close(fusion(**no_masks), fusion(**full))
    assert isinstance(fusion, MergeAttentionFusion)


def test_flags_with_wrong_shape_are_refused():
    with pytest.raises(ValueError, match="shape"):
        make_fusion("sum")(**make_views(), has_text=torch.ones(B + 1, dtype=torch.bool))


def padded_merge_attention(f: MergeAttentionFusion, views: dict[str, torch.Tensor], has_text, has_image) -> torch.Tensor:
    """The merge-attention layer on the full padded token grid (no packing, no dropped columns)."""
    from mmrec.models.user_encoders import attention_mask

    valid = torch.cat([views["text_mask"] & has_text[:, None], views["image_mask"] & has_image[:, None]], dim=1)
    tokens = torch.cat([views["text_tokens"] + f.modality_type.weight[f.TEXT],
                        views["image_tokens"] + f.modality_type.weight[f.IMAGE]], dim=1)
    tokens = tokens.masked_fill(~valid[..., None], 0.0)
    h = f.layer(tokens, attention_mask(valid, causal=False)).masked_fill(~valid[..., None], 0.0)
    return h.sum(dim=1) / valid.sum(dim=1, keepdim=True).clamp(min=1)


@pytest.mark.parametrize("images", ["mixed", "none"])
def test_merge_attention_packed_equals_the_padded_layer(images):
    """Packing (per-token work on valid tokens only) and dropping columns no item fills (a text-only
    batch's image block) change the cost, not the item vectors or the gradients."""
    f = make_fusion("merge_attention").eval()
    views = make_views()
    has_image = HAS_IMAGE if images == "mixed" else torch.zeros_like(HAS_IMAGE)
    has_text = HAS_TEXT if images == "mixed" else torch.ones_like(HAS_TEXT)
    ref = padded_merge_attention(f, views, has_text, has_image)
    ref_grads = torch.autograd.grad(ref.pow(2).sum(), list(f.parameters()), allow_unused=True)
    out = f(**views, has_text=has_text, has_image=has_image)
    assert torch.allclose(out, ref, atol=1e-5)
    grads = torch.autograd.grad(out.pow(2).sum(), list(f.parameters()), allow_unused=True)
    for g, r in zip(grads, ref_grads):
        assert (g is None and r is None) or (r is None and not g.any()) or torch.allclose(g, r, atol=1e-5)
