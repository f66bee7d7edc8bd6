"""The image encoder: bottom/top split equals timm's forward_features, freezing, weights, preprocessing."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from mmrec.encoders.image import (
    IMAGE_ENCODER_ALIASES,
    ImageEncoder,
    ImageEncoderConfig,
    map_by_order,
    to_rgb,
)

SIZE = 64


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Small models run fastest single-threaded; on a loaded 2-core box OpenMP waits dominate."""
    saved = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(saved)


def tiny(**kw) -> ImageEncoder:
    torch.manual_seed(0)
    return ImageEncoder(ImageEncoderConfig.tiny(**kw))


@pytest.fixture(scope="module")
def pixels() -> torch.Tensor:
    return torch.randn(2, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(0))


# --- config --------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "kw, msg",
    [
        (dict(trainable_blocks=-2), "trainable_blocks"),
        (dict(token_grid=0), "token_grid"),
        (dict(token_grid="every"), "token_grid"),
        (dict(token_grid=True), "token_grid"),
        (dict(image_size=8), "image_size"),
        (dict(random_init=True, weights="w.pth"), "random_init"),
        (dict(name="resnet18", pretrained=True, weights="w.pth"), "not both"),
        (dict(pretrained=True), "offline alias"),
        (dict(name=""), "name"),
    ],
)
def test_config_rejects_bad_values(kw, msg):
    with pytest.raises(ValueError, match=msg):
        ImageEncoderConfig(**kw)


def test_unknown_model_is_a_clear_error():
    with pytest.raises(ValueError, match="cannot create image model 'no_such_net'"):
        ImageEncoder(ImageEncoderConfig(name="no_such_net", random_init=True))


def test_unsupported_family_lists_the_supported_ones():
    with pytest.raises(ValueError, match="supported timm families: .*EfficientNet.*ResNet"):
        ImageEncoder(ImageEncoderConfig(name="mobilenetv3_small_050", random_init=True, image_size=SIZE))


def test_too_many_trainable_blocks():
    with pytest.raises(ValueError, match="only 4 stages"):
        ImageEncoder(ImageEncoderConfig(name="resnet18", random_init=True, trainable_blocks=5))


# --- split equals forward_features ---------------------------------------------------------------


@pytest.mark.parametrize("name, k", [("efficientnet_lite0", 0), ("efficientnet_lite0", 1), ("efficientnet_lite0", 2),
                                     ("efficientnet_lite0", -1), ("resnet18", 2)])
def test_bottom_then_top_equals_forward_features(name, k, pixels):
    enc = tiny(name=name, trainable_blocks=k).eval()
    with torch.no_grad():
        ref = enc.model.forward_features(pixels)  # (B, C, h, w)
        tokens, pooled = enc(pixels)
        if k != -1:
            torch.testing.assert_close(enc.top_map(enc.bottom(pixels)), ref, atol=1e-5, rtol=0)
            t2, p2 = enc.top(enc.bottom(pixels))
            assert torch.equal(t2, tokens) and torch.equal(p2, pooled)
        logits = enc.classify(pixels)
        torch.testing.assert_close(logits, enc.model(pixels), atol=1e-5, rtol=0)
    assert tokens.shape == (2, 4, enc.out_dim) and pooled.shape == (2, enc.out_dim)
    torch.testing.assert_close(pooled, enc.model.forward_head(ref, pre_logits=True), atol=1e-5, rtol=0)
    torch.testing.assert_close(tokens.mean(1), pooled, atol=1e-5, rtol=0)  # 2x2 grid of a 2x2 map


VIT = "vit_tiny_patch16_224"
VIT_TINY = {"img_size": SIZE, "depth": 3}
"""A 3-block ViT at 64 px: 16 patches of 16 px plus the class token."""


@pytest.mark.parametrize("k", [0, 1, 3, -1])
def test_vit_split_equals_forward_features(k, pixels):
    """PMMRec's image encoder is a CLIP ViT: the same split as a CNN, over Transformer blocks."""
    enc = tiny(name=VIT, trainable_blocks=k, overrides=VIT_TINY).eval()
    C = enc.out_dim
    with torch.no_grad():
        ref = enc.model.forward_features(pixels)  # (B, 1 + 16, C)
        tokens, pooled = enc(pixels)
        if k != -1:
            assert enc.bottom(pixels).shape == (2, 17, C)
            torch.testing.assert_close(enc.top_map(enc.bottom(pixels)), ref, atol=1e-5, rtol=0)
        torch.testing.assert_close(enc.classify(pixels), enc.model(pixels), atol=1e-5, rtol=0)
    assert len(enc.split.stages) == 3 and enc.split.head == [enc.model.norm]
    assert tokens.shape == (2, 4, C) and pooled.shape == (2, C)
    torch.testing.assert_close(pooled, ref[:, 0], atol=1e-5, rtol=0)  # the class token after the final norm
    grid = ref[:, 1:].reshape(2, 4, 4, C)  # patches in row-major order
    torch.testing.assert_close(tokens[:, 0], grid[:, :2, :2].mean((1, 2)), atol=1e-5, rtol=0)  # top-left
    torch.testing.assert_close(tokens[:, 3], grid[:, 2:, 2:].mean((1, 2)), atol=1e-5, rtol=0)  # bottom-right


@pytest.mark.parametrize("k", [0, 1])
def test_all_tokens_are_the_class_token_and_every_patch(k, pixels):
    """PMMRec feeds every token state of the ViT (class token + patches) to merge-attention."""
    enc = tiny(name=VIT, trainable_blocks=k, overrides=VIT_TINY, token_grid="all").eval()
    with torch.no_grad():
        ref = enc.model.forward_features(pixels)  # (B, 1 + 16, C)
        tokens, pooled = enc(pixels)
        t2, p2 = enc.top(enc.bottom(pixels))
    assert enc.num_tokens == 17 and tokens.shape == (2, 17, enc.out_dim)
    torch.testing.assert_close(tokens, ref, atol=1e-5, rtol=0)
    torch.testing.assert_close(pooled, ref[:, 0], atol=1e-5, rtol=0)
    assert torch.equal(t2, tokens) and torch.equal(p2, pooled)


@pytest.mark.parametrize("name", ["efficientnet_lite0", "resnet18"])
def test_all_tokens_of_a_cnn_are_every_cell_of_the_final_map(name, pixels):
    enc = tiny(name=name, trainable_blocks=0, token_grid="all").eval()
    with torch.no_grad():
        ref = enc.model.forward_features(pixels)  # (B, C, 2, 2) at 64 px
        tokens, pooled = enc(pixels)
    assert enc.num_tokens == ref.shape[2] * ref.shape[3] == tokens.shape[1]
    torch.testing.assert_close(tokens, ref.flatten(2).transpose(1, 2), atol=1e-5, rtol=0)
    assert enc.training is False and all(not m.training for m in enc.frozen_modules())
    # with nothing trained the cache holds the tokens: 'all' and the grid with as many rows differ
    grid = tiny(name=name, trainable_blocks=0, token_grid=2)
    assert grid.num_tokens == enc.num_tokens and grid.fingerprint() != enc.fingerprint()


def test_vit_frozen_stem_holds_the_embeddings():
    enc = tiny(name=VIT, trainable_blocks=1, overrides=VIT_TINY)
    frozen = {id(p) for m in enc.frozen_modules() for p in m.parameters()}
    for p in (enc.model.cls_token, enc.model.pos_embed, enc.model.patch_embed.proj.weight):
        assert id(p) in frozen and not p.requires_grad
    everything = tiny(name=VIT, trainable_blocks=-1, overrides=VIT_TINY)
    assert everything.model.pos_embed.requires_grad and everything.model.cls_token.requires_grad


def test_vit_needs_the_image_size_it_was_built_for():
    with pytest.raises(ValueError, match=r"built for \(224, 224\) inputs but image_size is 64.*img_size: 64"):
        tiny(name=VIT, overrides={"depth": 1})


def test_bottom_with_nothing_trained_is_the_final_map(pixels):
    enc = tiny(trainable_blocks=0, token_grid=1).eval()
    fmap = enc.bottom(pixels)
    assert fmap.shape == (2, enc.out_dim, SIZE // 32, SIZE // 32)
    tokens, pooled = enc.top(fmap)
    assert torch.equal(tokens[:, 0], pooled)
    assert not any(p.requires_grad for p in enc.parameters())


def test_all_trainable_has_no_bottom(pixels):
    enc = tiny(trainable_blocks=-1)
    assert not enc.cacheable and enc.frozen_modules() == []
    with pytest.raises(ValueError, match="no frozen bottom"):
        enc.bottom(pixels)


# --- freezing and gradients -----------------------------------------------------------------------


@pytest.mark.parametrize("name, k", [("efficientnet_lite0", 1), ("efficientnet_lite0", 2), ("resnet18", 2), (VIT, 2)])
def test_only_top_blocks_train_and_get_gradients(name, k, pixels):
    # timm zero-inits each ResNet block's last BN gamma, which would block the gradient into the block
    overrides = {"resnet18": dict(zero_init_last=False), VIT: VIT_TINY}.get(name, {})
    enc = tiny(name=name, trainable_blocks=k, overrides=overrides).train()
    split = enc.split
    expected = {id(p) for m in [*split.stages[-k:], *split.head] for p in m.parameters()}
    trainable = {id(p) for p in enc.parameters() if p.requires_grad}
    assert trainable == expected
    assert not any(p.requires_grad for p in enc.model.get_classifier().parameters())

    tokens, pooled = enc(pixels)
    (tokens.square().sum() + pooled.sum()).backward()
    for pname, p in enc.named_parameters():
        if p.requires_grad:
            assert p.grad is not None and p.grad.abs().sum() > 0, f"no gradient reached {pname}"
        else:
            assert p.grad is None, f"frozen {pname} got a gradient"


def test_frozen_batchnorm_statistics_do_not_move(pixels):
    enc = tiny(trainable_blocks=1).train()
    frozen_bn = enc.split.stem[1]
    top_bn = enc.split.head[1]
    before_frozen, before_top = frozen_bn.running_mean.clone(), top_bn.running_mean.clone()
    enc.model.train()  # even if the inner model is switched directly
    enc(pixels)
    assert torch.equal(frozen_bn.running_mean, before_frozen)
    assert not torch.equal(top_bn.running_mean, before_top)  # the trained top is a normal train-mode CNN
    assert not enc.bottom(pixels).requires_grad


# --- fingerprint ---------------------------------------------------------------------------------


def test_fingerprint_tracks_what_the_bottom_depends_on():
    base = tiny(trainable_blocks=1)
    fp = base.fingerprint()
    assert fp == base.fingerprint() and len(fp) == 16
    state = base.model.state_dict()
    for kw in (dict(trainable_blocks=2), dict(trainable_blocks=0), dict(image_size=96)):
        other = tiny(**{"trainable_blocks": 1, **kw})
        other.model.load_state_dict(state)
        assert other.fingerprint() != fp, kw

    same = tiny(trainable_blocks=1, token_grid=3)  # token grid is applied after the bottom
    same.model.load_state_dict(state)
    assert same.fingerprint() == fp
    with torch.no_grad():
        same.split.stages[-1][0].conv_pwl.weight.add_(1.0)  # a trained block
    assert same.fingerprint() == fp
    with torch.no_grad():
        same.split.stem[1].running_var.mul_(1.01)  # frozen BatchNorm statistics count as weights
    assert same.fingerprint() != fp


# --- weights -------------------------------------------------------------------------------------


def test_map_by_order_renames_and_checks_shapes():
    src = {"_a.weight": torch.zeros(2, 3), "_a.bias": torch.ones(2)}
    tgt = {"a.w": torch.empty(2, 3), "a.b": torch.empty(2)}
    out = map_by_order(src, tgt)
    assert list(out) == ["a.w", "a.b"] and torch.equal(out["a.b"], torch.ones(2))
    with pytest.raises(ValueError, match=r"tensor #1 is '_a.bias' \(2,\) in the file but 'a.b' \(3,\)"):
        map_by_order(src, {"a.w": torch.empty(2, 3), "a.b": torch.empty(3)})
    with pytest.raises(ValueError, match="2 tensors in the file, 1 in the model"):
        map_by_order(src, {"a.w": torch.empty(2, 3)})


@pytest.mark.parametrize("suffix", [".pth", ".safetensors"])
def test_local_weights_load_strictly(tmp_path, suffix, pixels):
    src = tiny(name="resnet18").eval()
    path = tmp_path / f"w{suffix}"
    state = {k: v.contiguous() for k, v in src.model.state_dict().items()}
    if suffix == ".safetensors":
        from safetensors.torch import save_file

        save_file(state, str(path))
    else:
        torch.save({"state_dict": state}, path)
    enc = ImageEncoder(ImageEncoderConfig(name="resnet18", weights=str(path), image_size=SIZE)).eval()
    assert enc.fingerprint() == src.fingerprint()
    with torch.no_grad():
        torch.testing.assert_close(enc(pixels)[1], src(pixels)[1])

    del state["fc.bias"]
    state["extra"] = torch.zeros(1)
    torch.save(state, tmp_path / "bad.pth")
    with pytest.raises(ValueError, match=r"1 missing \(first: \['fc.bias'\]\), 1 unexpected"):
        ImageEncoder(ImageEncoderConfig(name="resnet18", weights=str(tmp_path / "bad.pth")))
    with pytest.raises(ValueError, match="not found"):
        ImageEncoder(ImageEncoderConfig(name="resnet18", weights=str(tmp_path / "none.pth")))


def test_alias_points_at_packaged_weights():
    alias = IMAGE_ENCODER_ALIASES["efficientnet_lite0"]
    assert alias.arch == "tf_efficientnet_lite0" and alias.by_order
    assert alias.weights().endswith(".pth")


# --- preprocessing -------------------------------------------------------------------------------


def test_transform_uses_the_model_normalisation_and_crop():
    enc = tiny(image_size=SIZE)
    assert enc.normalization == ((0.5, 0.5, 0.5), (0.5, 0.5, 0.5))  # tf_efficientnet_lite0 (TF: (x-127)/128)
    names = [type(t).__name__ for t in enc.transform().transforms]
    assert names == ["ToRGB", "Resize", "CenterCrop", "ToTensor", "Normalize"]
    assert enc.transform().transforms[1].size == 73  # floor(64 / 0.875); 224 -> 256
    white = Image.new("RGB", (100, 80), (255, 255, 255))
    out = enc.preprocess([white, white])
    assert out.shape == (2, 3, SIZE, SIZE) and torch.allclose(out, torch.ones_like(out))


@pytest.mark.parametrize("mode", ["L", "RGBA", "P", "LA", "I;16", "CMYK", "1"])
def test_to_rgb_handles_every_mode(mode):
    rgb = Image.fromarray(np.random.default_rng(0).integers(0, 255, (10, 12, 3), dtype=np.uint8))
    img = rgb.convert(mode) if mode != "I;16" else Image.fromarray(np.arange(120, dtype=np.uint16).reshape(10, 12) * 500)
    out = to_rgb(img)
    assert out.mode == "RGB" and out.size == (12, 10)


def test_to_rgb_puts_transparency_on_white():
    clear = Image.new("RGBA", (4, 4), (0, 0, 0, 0))
    assert np.asarray(to_rgb(clear)).min() == 255
    pal = Image.new("P", (4, 4), 0)
    pal.info["transparency"] = 0
    assert np.asarray(to_rgb(pal)).min() == 255
    assert np.asarray(to_rgb(Image.fromarray(np.full((2, 2), 7, np.uint16)))).max() == 0  # constant 16-bit


# --- real weights (slow) -------------------------------------------------------------------------

# ImageNet classes of scikit-image's sample photos: the acceptable labels, and the top-1 seen.
PHOTOS = {
    "chelsea": ({281, 282, 283, 284, 285}, 282),  # a tabby cat: tabby/tiger cat/Persian/Siamese/Egyptian cat
    "coffee": ({967, 968}, 967),  # espresso / cup
    "camera": ({872}, 872),  # the cameraman, grayscale: tripod
    "motorcycle": ({665, 670}, 665),  # moped / motor scooter
}


def photo(name: str) -> Image.Image:
    import skimage.data

    if name == "motorcycle":
        return Image.fromarray(skimage.data.stereo_motorcycle()[0])
    return Image.fromarray(getattr(skimage.data, name)())  # camera stays 2-D: grayscale 'L' goes through to_rgb


@pytest.mark.slow
def test_packaged_lite0_classifies_sample_photos():
    """Top-1 / top-5 with the packaged weights in timm's ``tf_efficientnet_lite0`` (TF 'same' padding).

    Measured (softmax, 224 px, mean=std=0.5):
      tf_efficientnet_lite0  chelsea 282 .39, 285 .36, 281 .17 | coffee 967 .95 | camera 872 .94 | motorcycle 665 .54, 670 .12
      efficientnet_lite0     chelsea 282 .40, 281 .26, 285 .25 | coffee 967 .91 | camera 872 .92 | motorcycle 665 .33, 670 .17
    (symmetric padding, same weights mapped by order). Both get every top-1 right, the TF variant
    with more mass on the right classes, as expected for weights converted from TensorFlow.
    """
    enc = ImageEncoder(ImageEncoderConfig()).eval()
    assert enc.normalization == ((0.5, 0.5, 0.5), (0.5, 0.5, 0.5))
    pixels = enc.preprocess([photo(n) for n in PHOTOS])  # (4, 3, 224, 224)
    with torch.no_grad():
        probs = enc.classify(pixels).softmax(-1)  # (4, 1000)
        tokens, pooled = enc(pixels)
    assert tokens.shape == (4, 4, 1280) and pooled.shape == (4, 1280)
    for (name, (labels, top1)), p in zip(PHOTOS.items(), probs):
        top5 = p.topk(5).indices.tolist()
        assert top5[0] == top1, (name, top5)
        assert set(top5[: min(3, len(labels))]) <= labels, (name, top5)  # e.g. the top 3 of the cat are cats
        assert float(p[list(labels)].sum()) > 0.6, name


@pytest.mark.slow
def test_tf_padding_fits_the_packaged_weights_better_than_symmetric():
    import timm

    from mmrec.encoders.image import read_state_dict

    enc = ImageEncoder(ImageEncoderConfig()).eval()
    sym = timm.create_model("efficientnet_lite0", pretrained=False).eval()
    sym.load_state_dict(map_by_order(read_state_dict(IMAGE_ENCODER_ALIASES["efficientnet_lite0"].weights()), sym.state_dict()))
    pixels = enc.preprocess([photo(n) for n in PHOTOS])
    with torch.no_grad():
        p_tf, p_sym = enc.classify(pixels).softmax(-1), sym(pixels).softmax(-1)

    def right(p: torch.Tensor) -> list[float]:  # probability mass on the acceptable labels, per photo
        return [float(p[i, list(labels)].sum()) for i, (labels, _) in enumerate(PHOTOS.values())]

    assert [int(i) for i in p_sym.argmax(-1)] == [top1 for _, top1 in PHOTOS.values()]  # symmetric: also right
    assert np.mean(right(p_tf)) > np.mean(right(p_sym)) + 0.03  # measured 0.87 vs 0.81
