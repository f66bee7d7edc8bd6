"""The feature cache: equals the live bottom, in order; computes each content once; rebuilds when broken."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from mmrec.data.images import ImageStore
from mmrec.encoders.cache import IMAGE_ROWS, FeatureError, image_features, text_features
from mmrec.encoders.image import ImageEncoder, ImageEncoderConfig
from mmrec.encoders.text import TextEncoder, TextEncoderConfig

WORDS = "red electric guitar strings vintage acoustic bass case pedal drum stick amp cable tuner".split()
TEXTS = [
    None if i in (4, 13) else "" if i == 9 else " ".join(WORDS[j % len(WORDS)] for j in range(i, i + 1 + (7 * i) % 11))
    for i in range(20)
]
"""20 titles of 1 to 11 words in no length order (so buckets reorder them); 3 without text."""
KEYS = [f"i{i}" for i in range(20)]
NO_IMAGE = (3, 11)


def text_encoder(perturb: bool = False, **kw) -> TextEncoder:
    """The tiny random BERT (the same weights every time); ``perturb`` shifts its frozen embeddings."""
    enc = TextEncoder(TextEncoderConfig.tiny(**{"max_length": 12, "trainable_layers": 0, **kw}))
    if perturb:
        with torch.no_grad():
            enc.model.embeddings.position_embeddings.weight.add_(0.01)
    return enc


def image_encoder(perturb: bool = False, **kw) -> ImageEncoder:
    """The tiny random Lite0 (the same weights every time); ``perturb`` shifts its frozen stem."""
    enc = ImageEncoder(ImageEncoderConfig.tiny(**{"trainable_blocks": 0, **kw}))
    if perturb:
        with torch.no_grad():
            enc.model.bn1.bias.add_(0.01)
    return enc


@pytest.fixture(scope="module")
def text0() -> TextEncoder:
    return text_encoder()


@pytest.fixture(scope="module")
def text1() -> TextEncoder:
    return text_encoder(trainable_layers=1)


@pytest.fixture(scope="module")
def image0() -> ImageEncoder:
    return image_encoder()


@pytest.fixture(scope="module")
def image1() -> ImageEncoder:
    return image_encoder(trainable_blocks=1)


def write_png(path: Path, seed: int, size: tuple[int, int]) -> None:
    rng = np.random.default_rng(seed)
    Image.fromarray(rng.integers(0, 255, size=(size[1], size[0], 3), dtype=np.uint8)).save(path)


@pytest.fixture
def images(tmp_path: Path) -> tuple[ImageStore, list[str | None]]:
    """20 small PNGs of various sizes; items 3 and 11 have none."""
    root = tmp_path / "images"
    root.mkdir()
    refs: list[str | None] = []
    for i in range(20):
        if i in NO_IMAGE:
            refs.append(None)
            continue
        write_png(root / f"{i}.png", i, (12 + i, 10 + 2 * i))
        refs.append(f"{i}.png")
    return ImageStore("files", root), refs


def count_rows(monkeypatch, encoder) -> list[int]:
    """Patch ``encoder.bottom`` to record the batch size of every call."""
    seen: list[int] = []
    live = encoder.bottom

    def counted(x, *args, **kw):
        seen.append(int(x.shape[0]))
        return live(x, *args, **kw)

    monkeypatch.setattr(encoder, "bottom", counted)
    return seen


def cache_files(cache_dir: Path) -> list[str]:
    return sorted(p.name for p in cache_dir.iterdir())


def close(got: torch.Tensor, ref: torch.Tensor) -> None:
    """Equal up to float16 rounding (of values computed in another batch)."""
    tol = 2e-3 * max(1.0, ref.abs().max().item())
    torch.testing.assert_close(got.float(), ref.float(), rtol=2e-3, atol=tol)


# --- text ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("k", [0, 1])
def test_text_features_equal_the_bottom_per_item_in_order(k, text0, text1, tmp_path):
    enc = text0 if k == 0 else text1
    first = text_features(enc, TEXTS, KEYS, tmp_path, batch_size=4, progress=False)
    again = text_features(enc, TEXTS, KEYS, tmp_path, batch_size=4, progress=False)
    hidden, mask = first.tensors["hidden"], first.tensors["mask"]
    assert hidden.shape == (20, 12, 32) and hidden.dtype == torch.float16 and mask.dtype == torch.bool
    assert first.fingerprint == enc.fingerprint()
    for i, text in enumerate(TEXTS):
        if not text:
            continue
        batch = enc.tokenize([text])
        ref = enc.bottom(batch["input_ids"], batch["attention_mask"])[0]  # (t, H)
        t = ref.shape[0]
        close(hidden[i, :t], ref)
        assert mask[i, :t].all() and not mask[i, t:].any()
        assert (hidden[i, t:] == 0).all()
    assert torch.equal(again.tensors["hidden"], hidden) and torch.equal(again.tensors["mask"], mask)
    assert (again.stats.hits, again.stats.computed) == (17, 0)


def test_a_cached_text_row_is_the_same_whatever_it_is_encoded_with(text0, tmp_path):
    """The cache's rows must not depend on which other texts were encoded with an item, in which order
    or batch size (version 1 padded a batch to its longest text, which moved the states by ~1e-6 and
    float16 rounding with them): a cache filled in another order must hold the same bytes."""
    texts = [t for t in TEXTS if t]
    keys = [k for k, t in zip(KEYS, TEXTS) if t]
    together = text_features(text0, texts, keys, tmp_path / "together", batch_size=8, progress=False).tensors
    reverse = text_features(text0, texts[::-1], keys[::-1], tmp_path / "reverse", batch_size=3, progress=False).tensors
    for i, (text, key) in enumerate(zip(texts, keys)):
        alone = text_features(text0, [text], [key], tmp_path / f"alone{i}", batch_size=8, progress=False).tensors
        for name in ("hidden", "mask"):
            assert torch.equal(alone[name][0], together[name][i]), (text, name)
            assert torch.equal(reverse[name][len(texts) - 1 - i], together[name][i]), (text, name)


def test_text_computes_only_new_or_edited_items(text0, tmp_path, monkeypatch):
    seen = count_rows(monkeypatch, text0)
    first = text_features(text0, TEXTS, KEYS, tmp_path, batch_size=4, progress=False)
    assert sum(seen) == 17 and (first.stats.hits, first.stats.computed, first.stats.absent) == (0, 17, 3)

    seen.clear()
    again = text_features(text0, TEXTS, KEYS, tmp_path, batch_size=4, progress=False)
    assert seen == [] and (again.stats.hits, again.stats.computed) == (17, 0)

    seen.clear()
    grown = text_features(text0, [*TEXTS, "a brand new item"], [*KEYS, "i20"], tmp_path, progress=False)
    assert seen == [1] and (grown.stats.hits, grown.stats.computed) == (17, 1)
    assert torch.equal(grown.tensors["hidden"][:20], first.tensors["hidden"])

    seen.clear()
    edited = list(TEXTS)
    edited[5] = "an edited title"
    out = text_features(text0, edited, KEYS, tmp_path, progress=False)
    assert seen == [1] and (out.stats.hits, out.stats.computed) == (16, 1)
    ref = text_features(text0, ["an edited title"], ["i5"], None, progress=False)
    assert torch.equal(out.tensors["hidden"][5], ref.tensors["hidden"][0])
    assert torch.equal(out.tensors["hidden"][6:], first.tensors["hidden"][6:])
    assert cache_files(tmp_path) == [f"text-v2-{text0.fingerprint()}.json", f"text-v2-{text0.fingerprint()}.safetensors"]


@pytest.mark.parametrize(
    "other",
    [dict(trainable_layers=1), dict(max_length=10), dict(perturb=True)],
    ids=["frozen-depth", "max-length", "weights"],
)
def test_text_other_fingerprint_is_another_cache(other, text0, tmp_path):
    text_features(text0, TEXTS, KEYS, tmp_path, progress=False)
    enc = text_encoder(**other)
    assert enc.fingerprint() != text0.fingerprint()
    out = text_features(enc, TEXTS, KEYS, tmp_path, progress=False)
    assert (out.stats.hits, out.stats.computed) == (0, 17)
    assert out.tensors["hidden"].shape == (20, enc.cfg.max_length, 32)
    assert len(cache_files(tmp_path)) == 4


def test_text_weights_loaded_later_change_the_fingerprint(tmp_path):
    enc = text_encoder()
    before = text_features(enc, TEXTS, KEYS, tmp_path, progress=False)
    enc.load_state_dict(text_encoder(perturb=True).state_dict())
    after = text_features(enc, TEXTS, KEYS, tmp_path, progress=False)
    assert after.fingerprint != before.fingerprint and after.stats.computed == 17
    assert not torch.equal(after.tensors["hidden"], before.tensors["hidden"])


def test_items_without_text_are_zero_and_never_encoded(text0, monkeypatch):
    seen = count_rows(monkeypatch, text0)
    out = text_features(text0, TEXTS, KEYS, None, progress=False)
    absent = [i for i, t in enumerate(TEXTS) if not t]
    assert sum(seen) == 17
    assert out.present.tolist() == [bool(t) for t in TEXTS]
    assert (out.tensors["hidden"][absent] == 0).all() and not out.tensors["mask"][absent].any()
    assert out.tensors["mask"][out.present].any(dim=1).all()


def test_no_cache_dir_stores_nothing(text0, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    seen = count_rows(monkeypatch, text0)
    text_features(text0, TEXTS, KEYS, None, progress=False)
    text_features(text0, TEXTS, KEYS, None, progress=False)
    assert sum(seen) == 34 and list(tmp_path.iterdir()) == []


def test_a_fully_trained_encoder_cannot_be_cached(tmp_path):
    with pytest.raises(ValueError, match="nothing is frozen"):
        text_features(text_encoder(trainable_layers=-1), TEXTS, KEYS, tmp_path, progress=False)


def test_mismatched_lengths_are_rejected(text0):
    with pytest.raises(ValueError, match="20 texts but 19 keys"):
        text_features(text0, TEXTS, KEYS[:-1], None, progress=False)


def _truncate(data: Path, index: Path) -> None:
    with open(data, "r+b") as fh:
        fh.truncate(data.stat().st_size // 2)


def _garbage_index(data: Path, index: Path) -> None:
    index.write_text("{not json", encoding="utf-8")


def _stale_index(data: Path, index: Path) -> None:  # a crash between the data and the index rename
    index.write_text(index.read_text(encoding="utf-8").replace('"generation":"', '"generation":"0'), encoding="utf-8")


def _no_index(data: Path, index: Path) -> None:
    index.unlink()


@pytest.mark.parametrize("damage", [_truncate, _garbage_index, _stale_index, _no_index])
def test_a_broken_cache_is_rebuilt_with_a_warning(damage, text0, tmp_path):
    good = text_features(text0, TEXTS, KEYS, tmp_path, progress=False)
    stem = tmp_path / f"text-v2-{text0.fingerprint()}"
    damage(stem.with_suffix(".safetensors"), stem.with_suffix(".json"))
    with pytest.warns(RuntimeWarning, match="rebuilding"):
        out = text_features(text0, TEXTS, KEYS, tmp_path, progress=False)
    assert out.stats.rebuilt and out.stats.computed == 17
    close(out.tensors["hidden"], good.tensors["hidden"])
    assert cache_files(tmp_path) == [stem.name + ".json", stem.name + ".safetensors"]  # no temporary files
    healed = text_features(text0, TEXTS, KEYS, tmp_path, progress=False)
    assert not healed.stats.rebuilt and healed.stats.hits == 17


def test_a_failed_write_keeps_the_previous_cache(text0, tmp_path, monkeypatch):
    import safetensors.torch

    text_features(text0, TEXTS[:10], KEYS[:10], tmp_path, progress=False)
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir()}

    def full_disk(*args, **kw):
        raise OSError("no space left on device")

    monkeypatch.setattr(safetensors.torch, "save_file", full_disk)
    with pytest.raises(OSError, match="no space"):
        text_features(text0, TEXTS, KEYS, tmp_path, progress=False)
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir()} == before


# --- images --------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def vit1() -> ImageEncoder:
    return image_encoder(name="vit_tiny_patch16_224", trainable_blocks=1, overrides={"img_size": 64, "depth": 2})


@pytest.mark.parametrize("k, vit", [(0, False), (1, False), (1, True)])
def test_image_features_equal_the_bottom_per_item_in_order(k, vit, image0, image1, vit1, images, tmp_path):
    enc = vit1 if vit else image0 if k == 0 else image1
    store, refs = images
    out = image_features(enc, refs, KEYS, store, tmp_path / "cache", batch_size=6, progress=False)
    names = ["pooled", "tokens"] if k == 0 else ["hidden"]
    assert sorted(out.tensors) == names and all(t.dtype == torch.float16 for t in out.tensors.values())
    assert out.present.tolist() == [i not in NO_IMAGE for i in range(20)]
    for i, ref in enumerate(refs):
        if ref is None:
            assert all((t[i] == 0).all() for t in out.tensors.values())
            continue
        fmap = enc.bottom(enc.preprocess([store.read(ref)]))
        if k == 0:
            tokens, pooled = enc.top(fmap)
            close(out.tensors["tokens"][i], tokens[0])
            close(out.tensors["pooled"][i], pooled[0])
        else:
            close(out.tensors["hidden"][i], fmap[0])
    if k == 0:
        assert out.tensors["tokens"].shape == (20, enc.num_tokens, enc.out_dim)
    again = image_features(enc, refs, KEYS, store, tmp_path / "cache", batch_size=6, progress=False)
    assert (again.stats.hits, again.stats.computed, again.stats.absent) == (18, 0, 2)
    assert all(torch.equal(again.tensors[n], out.tensors[n]) for n in names)


def test_a_cached_image_row_is_the_same_whatever_it_is_encoded_with(image0, images, tmp_path):
    """As for text: an image's cached rows are the same bytes alone, in a batch of any size or order
    (the encoder always runs on IMAGE_ROWS images; oneDNN rounds differently at another batch size)."""
    store, refs = images
    pos = [i for i, r in enumerate(refs) if r is not None]
    together = image_features(image0, [refs[i] for i in pos], [KEYS[i] for i in pos], store, tmp_path / "together",
                              batch_size=20, progress=False).tensors
    for n, i in enumerate(pos[:6]):
        alone = image_features(image0, [refs[i]], [KEYS[i]], store, tmp_path / f"alone{n}", batch_size=1,
                               progress=False).tensors
        assert all(torch.equal(alone[name][0], together[name][n]) for name in ("tokens", "pooled")), KEYS[i]


def test_image_computes_only_new_or_edited_items(image0, images, tmp_path, monkeypatch):
    store, refs = images
    seen = count_rows(monkeypatch, image0)
    first = image_features(image0, refs, KEYS, store, tmp_path / "cache", progress=False)
    assert seen == [IMAGE_ROWS, IMAGE_ROWS]  # 18 images, the encoder always runs on IMAGE_ROWS (16)

    seen.clear()
    again = image_features(image0, refs, KEYS, store, tmp_path / "cache", progress=False)
    assert seen == [] and again.stats.hits == 18

    seen.clear()
    write_png(store.root / "3.png", 99, (30, 30))  # item 3 gains an image
    write_png(store.root / "7.png", 98, (19, 24))  # item 7's image is replaced at the same path
    changed = list(refs)
    changed[3] = "3.png"
    out = image_features(image0, changed, KEYS, store, tmp_path / "cache", progress=False)
    assert seen == [IMAGE_ROWS] and (out.stats.hits, out.stats.computed) == (17, 2)
    ref = image_features(image0, ["7.png"], ["i7"], store, None, progress=False)
    assert torch.equal(out.tensors["pooled"][7], ref.tensors["pooled"][0])  # computed with item 3, here alone
    same = [i for i in range(20) if i not in (3, 7)]
    assert torch.equal(out.tensors["pooled"][same], first.tensors["pooled"][same])


@pytest.mark.parametrize(
    "other",
    [dict(image_size=48), dict(trainable_blocks=1), dict(perturb=True)],
    ids=["image-size", "frozen-depth", "weights"],
)
def test_image_other_fingerprint_is_another_cache(other, image0, images, tmp_path):
    store, refs = images
    image_features(image0, refs, KEYS, store, tmp_path / "cache", progress=False)
    enc = image_encoder(**other)
    out = image_features(enc, refs, KEYS, store, tmp_path / "cache", progress=False)
    assert out.fingerprint != image0.fingerprint() and (out.stats.hits, out.stats.computed) == (0, 18)
    assert len(cache_files(tmp_path / "cache")) == 4


def test_image_workers_give_the_same_features(image1, images, tmp_path):
    store, refs = images
    here = image_features(image1, refs, KEYS, store, None, batch_size=4, num_workers=0, progress=False)
    workers = image_features(image1, refs, KEYS, store, tmp_path, batch_size=4, num_workers=2, progress=False)
    assert torch.equal(workers.tensors["hidden"], here.tensors["hidden"])
    assert torch.equal(workers.present, here.present)


def test_lmdb_images_in_workers(image0, tmp_path):
    """The parent's open LMDB environment does not cross into the forked workers."""
    from mmrec.data.images import write_lmdb

    rng = np.random.default_rng(0)
    write_lmdb(tmp_path / "db", {f"i{i}": rng.integers(0, 255, size=(10 + i, 12, 3), dtype=np.uint8) for i in range(6)})
    store, refs = ImageStore("lmdb", tmp_path / "db"), [f"i{i}" for i in range(6)]
    here = image_features(image0, refs, refs, store, None, batch_size=2, num_workers=0, progress=False)
    workers = image_features(image0, refs, refs, store, tmp_path / "cache", batch_size=2, num_workers=2, progress=False)
    assert torch.equal(workers.tensors["tokens"], here.tensors["tokens"]) and workers.stats.computed == 6


def test_no_image_at_all_still_has_the_right_shapes(image0, image1):
    refs = [None] * 3
    out0 = image_features(image0, refs, KEYS[:3], None, None, progress=False)
    out1 = image_features(image1, refs, KEYS[:3], None, None, progress=False)
    assert out0.tensors["pooled"].shape == (3, image0.out_dim) and not out0.present.any()
    assert out1.tensors["hidden"].shape[0] == 3 and out1.tensors["hidden"].dim() == 4
    assert not out1.tensors["hidden"].any()


def test_references_without_a_store_are_rejected(image0):
    with pytest.raises(ValueError, match="no image store"):
        image_features(image0, ["a.png"], ["i0"], None, None, progress=False)


@pytest.mark.parametrize("broken", ["not_an_image", "missing"])
def test_an_unreadable_image_names_the_item(broken, image0, images, tmp_path):
    store, refs = images
    if broken == "not_an_image":
        (store.root / "5.png").write_bytes(b"not a png at all")
    else:
        (store.root / "5.png").unlink()
    with pytest.raises(FeatureError, match=rf"item 'i5': image '5.png' cannot be read \({broken}"):
        image_features(image0, refs, KEYS, store, tmp_path / "cache", progress=False)
    assert not (tmp_path / "cache").exists() or cache_files(tmp_path / "cache") == []
