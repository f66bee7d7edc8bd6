"""Item towers: contract over every registry entry; MoM routing; cached == end-to-end."""

import pytest
import torch

from mmrec.encoders.image import ImageEncoderConfig
from mmrec.encoders.text import TextEncoder, TextEncoderConfig
from mmrec.models.fusion import FusionConfig
from mmrec.models.towers import ITEM_TOWERS, ItemContent, ItemTowerConfig, build_item_tower

N, D = 12, 16
TEXT = TextEncoderConfig.tiny(trainable_layers=1, max_length=8, pooling="attention")
IMAGE = ImageEncoderConfig.tiny(trainable_blocks=1, image_size=32)


def raw_content(n: int = N, seed: int = 0) -> ItemContent:
    """Items 1..n: 1, 5, 9 text-only; 2, 6, 10 image-only; the rest both."""
    g = torch.Generator().manual_seed(seed)
    has_text = torch.tensor([False] + [i % 4 != 2 for i in range(1, n + 1)])
    has_image = torch.tensor([False] + [i % 4 != 1 for i in range(1, n + 1)])
    tok = TextEncoder(TEXT).tokenize(["", *[f"item number {i} with words {'x ' * (i % 5)}" for i in range(1, n + 1)]])
    tok["input_ids"][~has_text] = 0
    tok["attention_mask"][~has_text] = 0
    pixels = torch.randint(0, 256, (n + 1, 3, 32, 32), generator=g, dtype=torch.uint8)
    return ItemContent(n, has_text, has_image, text=dict(tok), image={"pixels": pixels})


def tower(name: str, **kw):
    torch.manual_seed(0)
    return build_item_tower(ItemTowerConfig(name=name, dropout=0.0, **kw), D, N, TEXT, IMAGE, FusionConfig(name="merge_attention", dim=D))


@pytest.mark.parametrize("name", sorted(ITEM_TOWERS))
def test_contract_shape_finite_and_every_trainable_parameter_gets_a_gradient(name):
    t = tower(name)
    content = raw_content()
    idx = torch.arange(1, N + 1)
    out, mv = t(content, idx, with_modalities=True)
    assert out.shape == (N, D) and torch.isfinite(out).all()
    loss = out.pow(2).sum()
    if mv is not None:  # what NICL trains (pooled text / image vectors)
        loss = loss + mv[0].pow(2).sum() + mv[1].pow(2).sum()
    loss.backward()
    missing = [n for n, p in t.named_parameters() if p.requires_grad and (p.grad is None or not p.grad.abs().sum() > 0)]
    assert missing == []
    frozen = [n for n, p in t.named_parameters() if not p.requires_grad]
    if name != "id":
        assert frozen, "the encoders' bottom layers must be frozen"


def test_unknown_tower_fails_listing_names():
    with pytest.raises(ValueError, match="valid names"):
        ItemTowerConfig(name="nope")


@pytest.mark.parametrize("both,expect", [("text", "text"), ("image", "image")])
def test_mom_routes_each_item_to_its_modality(both, expect):
    t = tower("mom", mom_both=both).eval()
    content = raw_content()
    idx = torch.arange(1, N + 1)
    out = t(content, idx)
    text_only = torch.tensor([1, 5, 9])
    image_only = torch.tensor([2, 6, 10])
    both_items = torch.tensor([3, 4, 7, 8, 11, 12])
    from mmrec.models.towers import _run_path
    _, _, tp = _run_path(t.text, content, "text", idx)
    _, _, vp = _run_path(t.image, content, "image", idx)
    torch.testing.assert_close(out[text_only - 1], tp[text_only - 1])
    torch.testing.assert_close(out[image_only - 1], vp[image_only - 1])
    torch.testing.assert_close(out[both_items - 1], (tp if expect == "text" else vp)[both_items - 1])


def test_text_tower_gives_one_no_content_vector_to_image_only_items():
    t = tower("text")
    out = t(raw_content(), torch.tensor([2, 6, 10, 3]))
    torch.testing.assert_close(out[0], out[1])
    torch.testing.assert_close(out[0], t.text.proj.bias)
    assert not torch.allclose(out[0], out[3])


def test_cached_bottom_outputs_give_the_same_vectors_as_end_to_end():
    content = raw_content()
    t = tower("fused").eval()
    with torch.no_grad():
        text_hidden = t.text.encoder.bottom(content.text["input_ids"], content.text["attention_mask"])
        pix = (content.image["pixels"].float() / 255 - t.image.mean) / t.image.std
        image_hidden = t.image.encoder.bottom(pix)
    cached = ItemContent(N, content.has_text, content.has_image,
                         text={"hidden": text_hidden, "mask": content.text["attention_mask"].bool()},
                         image={"hidden": image_hidden})
    idx = torch.arange(1, N + 1)
    with torch.no_grad():
        torch.testing.assert_close(t(cached, idx), t(content, idx), atol=1e-5, rtol=1e-5)


def test_id_tower_refuses_another_catalog_size():
    t = tower("id")
    with pytest.raises(ValueError, match="do not transfer"):
        t(raw_content(n=N + 1), torch.tensor([1]))


def test_text_path_projects_valid_tokens_only():
    """Padding token positions come back zero (every consumer masks them); valid ones are proj(hidden)."""
    from mmrec.models.towers import _project_valid

    torch.manual_seed(0)
    proj = torch.nn.Linear(12, 5)
    tokens = torch.randn(4, 6, 12)
    mask = torch.arange(6)[None, :] < torch.tensor([6, 2, 1, 4])[:, None]
    tokens[~mask] = float("nan")  # padding content is never read
    out = _project_valid(proj, tokens, mask)
    assert out.shape == (4, 6, 5)
    assert torch.allclose(out[mask], proj(tokens[mask]))
    assert (out[~mask] == 0).all()


@pytest.mark.parametrize("name", ["text", "image", "mom", "fused"])
def test_moe_adaptor_towers_train_every_expert_and_keep_one_no_content_vector(name):
    t = tower(name, adaptor="moe", adaptor_experts=3, adaptor_dropout=0.0)
    content = raw_content()
    out = t(content, torch.arange(1, N + 1))
    assert out.shape == (N, D) and torch.isfinite(out).all()
    out.pow(2).sum().backward()
    for path in (p for p in (getattr(t, "text", None), getattr(t, "image", None)) if p is not None):
        assert path.proj.weight.shape[0] == 3
        assert path.proj.weight.grad.abs().sum(dim=(1, 2)).gt(0).all(), "every expert learns"
        assert path.proj.gate.weight.grad.abs().sum() > 0
    if name == "text":  # image-only items: the adaptor's image of a zero vector, the same for all of them
        t.eval()
        with torch.no_grad():
            v = t(content, torch.tensor([2, 6, 3]))
        from mmrec.models.towers import no_content
        torch.testing.assert_close(v[0], v[1])
        torch.testing.assert_close(v[0], no_content(t.text.proj))
        assert not torch.allclose(v[0], v[2])


def test_moe_adaptor_is_a_gated_mixture_of_whitening_maps():
    """Eval mode: sum_k softmax(x G)_k (x - b_k) W_k, checked against a loop over experts."""
    from mmrec.models.towers import MoEAdaptor

    torch.manual_seed(0)
    a = MoEAdaptor(6, 4, experts=3, dropout=0.5).eval()
    with torch.no_grad():
        a.bias.normal_()
    x = torch.randn(5, 2, 6)
    g = torch.softmax(x @ a.gate.weight.T, dim=-1)
    want = sum(g[..., k:k + 1] * ((x - a.bias[k]) @ a.weight[k]) for k in range(3))
    torch.testing.assert_close(a(x), want)
    a.train()
    assert not torch.allclose(a(x), a(x)), "training adds gate noise and dropout"


def test_unknown_adaptor_fails_listing_the_valid_ones():
    with pytest.raises(ValueError, match="linear"):
        ItemTowerConfig(adaptor="mlp")


def test_linear_adaptor_leaves_the_model_dict_as_before_adaptors_existed():
    """Run keys and model.json hash ModelConfig.to_dict(): the default adaptor must not change them."""
    from mmrec.models.recommender import ModelConfig

    linear = ModelConfig.from_dict({"item_tower": {"name": "fused"}, "text_encoder": {}, "image_encoder": {}, "fusion": {}})
    assert set(linear.to_dict()["item_tower"]) == {"name", "mom_both", "dropout"}
    moe = ModelConfig.from_dict({"item_tower": {"name": "fused", "adaptor": "moe", "adaptor_experts": 4},
                                 "text_encoder": {}, "image_encoder": {}, "fusion": {}})
    assert moe.to_dict()["item_tower"]["adaptor_experts"] == 4
    for cfg in (linear, moe):
        assert ModelConfig.from_dict(cfg.to_dict()) == cfg


@pytest.mark.parametrize("name", ["text", "fused"])
def test_item_ids_start_at_the_content_vector_train_per_item_and_leave_new_items_to_content(name):
    content = raw_content()
    idx = torch.arange(1, N + 1)
    plain, with_ids = tower(name).eval(), tower(name, item_ids=True).eval()
    assert with_ids.item_ids.weight.shape == (N + 1, D)
    assert torch.equal(plain(content, idx), with_ids(content, idx)), "zero at start: the content vector alone"
    with_ids.train()
    with_ids(content, idx[:3]).pow(2).sum().backward()
    grad = with_ids.item_ids.weight.grad
    assert grad[1:4].abs().sum(1).gt(0).all() and grad[4:].abs().sum() == 0 and grad[0].abs().sum() == 0
    with torch.no_grad():
        with_ids.item_ids.weight[1:].normal_()
    with_ids.eval()  # (the training forward moved batch-norm statistics: give plain the same state)
    plain.load_state_dict({k: v for k, v in with_ids.state_dict().items() if not k.startswith("item_ids.")})
    bigger = raw_content(N + 2)  # two items added after training: beyond the embedding
    new = torch.tensor([N + 1, N + 2])
    assert torch.equal(with_ids(bigger, new), plain(bigger, new))
    assert not torch.allclose(with_ids(content, idx), plain(content, idx))


def test_item_ids_are_refused_on_the_id_tower_and_left_out_of_the_model_dict_when_off():
    from mmrec.models.recommender import ModelConfig

    with pytest.raises(ValueError, match="item_ids"):
        ItemTowerConfig(name="id", item_ids=True)
    spec = {"item_tower": {"name": "fused"}, "text_encoder": {}, "image_encoder": {}, "fusion": {}}
    assert "item_ids" not in ModelConfig.from_dict(spec).to_dict()["item_tower"]  # run keys unchanged
    on = ModelConfig.from_dict({**spec, "item_tower": {"name": "fused", "item_ids": True}})
    assert on.to_dict()["item_tower"]["item_ids"] is True and ModelConfig.from_dict(on.to_dict()) == on
