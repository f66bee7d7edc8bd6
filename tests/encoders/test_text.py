"""The text encoder: bottom/top split equals the full model, freezing, pooling, cache fingerprint."""

from __future__ import annotations

import pytest
import torch

from mmrec.encoders.text import (
    POOLINGS,
    TINY_BERT,
    TextEncoder,
    TextEncoderConfig,
    length_buckets,
    resolve_text_model,
)

TEXTS = ["a red electric guitar", "strings", "", "a very long title about a vintage acoustic bass guitar with case"]


def tiny(**kw) -> TextEncoder:
    torch.manual_seed(0)
    return TextEncoder(TextEncoderConfig.tiny(**kw))


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny models run fastest single-threaded; on a loaded 2-core box OpenMP waits dominate."""
    saved = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(saved)


@pytest.fixture(scope="module")
def enc1(one_thread) -> TextEncoder:
    return tiny(trainable_layers=1, pooling="attention", attention_dim=8, max_length=12).eval()


# --- config --------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "kw, msg",
    [
        (dict(pooling="max"), "valid poolings"),
        (dict(trainable_layers=-2), "trainable_layers"),
        (dict(max_length=1), "max_length"),
        (dict(attention_dim=0), "attention_dim"),
        (dict(name=""), "name"),
    ],
)
def test_config_rejects_bad_values(kw, msg):
    with pytest.raises(ValueError, match=msg):
        TextEncoderConfig(**kw)


def test_tiny_config_is_random_and_small():
    cfg = TextEncoderConfig.tiny(pooling="cls")
    assert cfg.random_init and cfg.overrides == TINY_BERT and cfg.pooling == "cls"


def test_alias_resolves_to_packaged_folder():
    path = resolve_text_model("all-minilm-l6-v2")
    assert path.endswith("model") and (__import__("pathlib").Path(path) / "config.json").is_file()
    assert resolve_text_model("some/hub-name") == "some/hub-name"


def test_unknown_model_is_a_clear_error(tmp_path):
    missing = str(tmp_path / "no_such_model")
    with pytest.raises(ValueError, match="cannot load text model .*no_such_model.*no internet"):
        TextEncoder(TextEncoderConfig(name=missing))


def test_too_many_trainable_layers():
    with pytest.raises(ValueError, match="only 2 layers"):
        tiny(trainable_layers=3)


# --- tokens --------------------------------------------------------------------------------------


def test_tokenize_pads_to_longest_and_truncates(enc1):
    batch = enc1.tokenize(TEXTS)
    assert set(batch) == {"input_ids", "attention_mask"}
    ids, mask = batch["input_ids"], batch["attention_mask"]
    assert ids.shape == mask.shape == (4, enc1.cfg.max_length)  # the long title is cut at max_length
    assert mask[3].all() and mask[2].sum() == 2  # empty text: [CLS] [SEP]
    short = enc1.tokenize(TEXTS[:2])["input_ids"]
    assert short.shape[1] == max(enc1.token_lengths(TEXTS[:2])) < enc1.cfg.max_length
    assert enc1.token_lengths(TEXTS) == mask.sum(1).tolist()


def test_encode_tokenizes_and_encodes(enc1):
    tokens, pooled, mask = enc1.encode(TEXTS[:2])
    assert tokens.shape == (2, mask.shape[1], enc1.hidden_size) and pooled.shape == (2, enc1.hidden_size)
    assert mask.sum(1).tolist() == enc1.token_lengths(TEXTS[:2])


def test_length_buckets_batch_only_equal_lengths():
    lengths = [5, 1, 9, 3, 5, 5, 1, 5]
    buckets = length_buckets(lengths, batch_size=3)
    assert buckets == [[1, 6], [3], [0, 4, 5], [7], [2]]  # shortest first, stable, never two lengths in a batch
    assert all(len({lengths[i] for i in b}) == 1 and len(b) <= 3 for b in buckets)
    assert sorted(i for b in buckets for i in b) == list(range(len(lengths)))
    assert length_buckets([], 4) == []
    with pytest.raises(ValueError, match="batch_size"):
        length_buckets(lengths, 0)


# --- split equals the full model ------------------------------------------------------------------


@pytest.mark.parametrize("k", [0, 1, 2, -1])
def test_bottom_then_top_equals_full_model(k):
    enc = tiny(trainable_layers=k).eval()
    batch = enc.tokenize(TEXTS)
    with torch.no_grad():
        full = enc.model(**batch).last_hidden_state  # (B, T, H)
        tokens, pooled = enc(**batch)
    torch.testing.assert_close(tokens, full, atol=1e-5, rtol=0)
    if k != -1:
        hidden = enc.bottom(**batch)
        torch.testing.assert_close(enc.top(hidden, batch["attention_mask"]), full, atol=1e-5, rtol=0)
    assert tokens.shape == (4, batch["input_ids"].shape[1], enc.hidden_size) and pooled.shape == (4, 32)


def test_bottom_is_the_final_state_when_nothing_is_trained():
    enc = tiny(trainable_layers=0).eval()
    batch = enc.tokenize(TEXTS)
    hidden = enc.bottom(**batch)
    assert torch.equal(enc.top(hidden, batch["attention_mask"]), hidden)
    torch.testing.assert_close(hidden, enc.model(**batch).last_hidden_state, atol=1e-5, rtol=0)


def test_all_trainable_has_no_bottom():
    enc = tiny(trainable_layers=-1)
    assert not enc.cacheable and enc.frozen_modules() == []
    with pytest.raises(ValueError, match="no frozen bottom"):
        enc.bottom(**enc.tokenize(TEXTS))
    _, pooled = enc(**enc.tokenize(TEXTS))
    pooled.sum().backward()
    assert enc.model.embeddings.word_embeddings.weight.grad is not None


# --- freezing and gradients -----------------------------------------------------------------------


@pytest.mark.parametrize("k, pooling", [(0, "attention"), (1, "attention"), (2, "mean"), (0, "nrms"), (1, "nrms")])
def test_only_top_layers_and_pooling_train(k, pooling):
    enc = tiny(trainable_layers=k, pooling=pooling, attention_dim=8).train()
    layers = enc.model.encoder.layer
    expected = {id(p) for layer in layers[len(layers) - k :] for p in layer.parameters()}
    expected |= {id(p) for p in enc.pooling.parameters()}
    trainable = {id(p) for p in enc.parameters() if p.requires_grad}
    assert trainable == expected and trainable  # k=0 + attention: only the pooling trains

    batch = enc.tokenize(TEXTS)
    tokens, pooled = enc(**batch)
    (pooled.square().sum() + tokens.sum()).backward()
    for name, p in enc.named_parameters():
        if p.requires_grad:
            assert p.grad is not None and p.grad.abs().sum() > 0, f"no gradient reached {name}"
        else:
            assert p.grad is None, f"frozen {name} got a gradient"


def test_bottom_stays_frozen_in_train_mode():
    enc = tiny(trainable_layers=1).train()
    batch = enc.tokenize(TEXTS)
    assert all(not m.training for m in enc.frozen_modules())
    assert all(layer.training for layer in enc.model.encoder.layer[1:])
    enc.model.train()  # even if the inner model is switched directly
    a, b = enc.bottom(**batch), enc.bottom(**batch)
    assert torch.equal(a, b)  # no dropout below the trained layers
    assert not a.requires_grad
    enc.eval()
    assert torch.equal(enc.bottom(**batch), a)


# --- pooling -------------------------------------------------------------------------------------


@pytest.mark.parametrize("pooling", POOLINGS)
def test_pooling_ignores_padding(pooling):
    enc = tiny(trainable_layers=1, pooling=pooling, attention_dim=8).eval()
    _, alone = enc(**enc.tokenize(TEXTS[:1]))
    _, padded = enc(**enc.tokenize(TEXTS))  # the first text is now padded
    torch.testing.assert_close(padded[:1], alone, atol=1e-5, rtol=0)


def test_pooling_formulas(enc1):
    tokens = torch.randn(2, 4, enc1.hidden_size)
    mask = torch.tensor([[1, 1, 0, 0], [1, 1, 1, 1]])
    assert torch.equal(POOLINGS["cls"](enc1.hidden_size, enc1.cfg)(tokens, mask), tokens[:, 0])
    torch.testing.assert_close(POOLINGS["mean"](enc1.hidden_size, enc1.cfg)(tokens, mask)[0], tokens[0, :2].mean(0))
    pooled = enc1.pool(tokens, mask)  # attention: a convex combination of the valid tokens only
    tokens2 = tokens.clone()
    tokens2[0, 2:] = 100.0
    assert torch.allclose(enc1.pool(tokens2, mask)[0], pooled[0])


def test_nrms_pooling_is_self_attention_then_additive_attention_over_valid_tokens():
    enc = tiny(trainable_layers=1, pooling="nrms", attention_dim=8, pooling_heads=4).eval()
    pool = enc.pooling
    assert isinstance(pool.self_attention, torch.nn.MultiheadAttention) and pool.self_attention.num_heads == 4
    tokens = torch.randn(3, 5, enc.hidden_size)
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1], [0, 0, 0, 0, 0]])
    with torch.no_grad():
        got = enc.pool(tokens, mask)
        for b, n in ((0, 3), (1, 5)):  # reference: the valid tokens alone, no mask anywhere
            x = tokens[b:b + 1, :n]
            mixed, _ = pool.self_attention(x, x, x)
            ref = pool.additive(mixed, torch.ones(1, n))
            torch.testing.assert_close(got[b:b + 1], ref, atol=1e-5, rtol=0)
    assert torch.isfinite(got).all()  # a text with no token (an image-only item) gives no NaN
    changed = tokens.clone()
    changed[0, 1] += 1.0  # a token changes the others' mixed states, so more than its own weight moves
    assert not torch.allclose(enc.pool(changed, mask)[0], got[0])
    with pytest.raises(ValueError, match="pooling_heads"):
        tiny(pooling="nrms", pooling_heads=3)  # does not divide the tiny model's width 32
    with pytest.raises(ValueError, match="pooling_heads"):
        TextEncoderConfig.tiny(pooling_heads=0)


# --- fingerprint ---------------------------------------------------------------------------------


def test_fingerprint_tracks_what_the_bottom_depends_on():
    torch.manual_seed(0)
    base = TextEncoder(TextEncoderConfig.tiny(trainable_layers=1))
    fp = base.fingerprint()
    assert fp == base.fingerprint() and len(fp) == 16

    # the same weights at another depth / max_length
    state = base.model.state_dict()
    for kw in (dict(trainable_layers=0), dict(trainable_layers=2), dict(max_length=16)):
        other = TextEncoder(TextEncoderConfig.tiny(**{"trainable_layers": 1, **kw}))
        other.model.load_state_dict(state)
        assert other.fingerprint() != fp, kw

    # things the bottom does not depend on: pooling, the trained layers' weights
    same = TextEncoder(TextEncoderConfig.tiny(trainable_layers=1, pooling="attention"))
    same.model.load_state_dict(state)
    assert same.fingerprint() == fp
    with torch.no_grad():
        same.model.encoder.layer[1].output.dense.weight.add_(1.0)
    assert same.fingerprint() == fp

    # frozen weights and the vocabulary
    with torch.no_grad():
        same.model.encoder.layer[0].output.dense.weight.add_(1e-3)
    assert same.fingerprint() != fp
    base.tokenizer.add_tokens(["zzznewtoken"])
    assert base.fingerprint() != fp


# --- real weights (slow) -------------------------------------------------------------------------

SENTENCES = [
    "A man is playing a guitar on stage.",
    "Someone performs a song with an electric guitar.",
    "The stock market fell sharply on Monday.",
]


@pytest.fixture(scope="module")
def minilm(one_thread) -> TextEncoder:
    return TextEncoder(TextEncoderConfig(pooling="mean", max_length=128, trainable_layers=2)).eval()


@pytest.mark.slow
def test_minilm_matches_sentence_transformers(minilm):
    from sentence_transformers import SentenceTransformer

    st = SentenceTransformer(resolve_text_model("all-minilm-l6-v2"), device="cpu")
    with torch.no_grad():
        _, pooled, _ = minilm.encode(SENTENCES)
        ref = st.encode(SENTENCES, convert_to_tensor=True)  # mean pooling + L2 normalisation
    ours = torch.nn.functional.normalize(pooled, dim=-1)
    torch.testing.assert_close(ours, ref.cpu(), atol=1e-5, rtol=0)
    sims = ours @ ours.T
    assert sims[0, 1] > sims[0, 2] + 0.3 and sims[0, 1] > sims[1, 2] + 0.3


@pytest.mark.slow
def test_minilm_split_equals_full_model(minilm):
    batch = minilm.tokenize(SENTENCES)
    with torch.no_grad():
        full = minilm.model(**batch).last_hidden_state
        split = minilm.top(minilm.bottom(**batch), batch["attention_mask"])
    torch.testing.assert_close(split, full, atol=1e-5, rtol=0)
    assert minilm.hidden_size == 384 and minilm.n_frozen == 4


@pytest.mark.slow
def test_minilm_cached_rows_do_not_depend_on_the_batch(one_thread, tmp_path):
    """all-MiniLM-L6-v2 gives a title other float rounding when it is padded to a longer title's length
    (measured: 76 of 100 Amazon titles differ in float16); the cache batches equal lengths only, so a
    title's cached states are the same bytes alone or among longer and shorter titles."""
    from mmrec.encoders.cache import text_features

    enc = TextEncoder(TextEncoderConfig(max_length=32, trainable_layers=0)).eval()
    titles = SENTENCES + ["Guitar strings", "Fender Stratocaster pickguard, 3 ply, aged pearl, HSS, 11 holes",
                          "Drum sticks 5A", "A tuner", "Vintage bass amp with a 15 inch speaker and a tube preamp"]
    keys = [f"t{i}" for i in range(len(titles))]
    mixed = text_features(enc, titles, keys, tmp_path / "mixed", batch_size=64, progress=False).tensors
    for i, (title, key) in enumerate(zip(titles, keys)):
        alone = text_features(enc, [title], [key], tmp_path / f"alone{i}", progress=False).tensors
        assert torch.equal(alone["hidden"][0], mixed["hidden"][i]), title
    padded = enc.tokenize(titles)  # what version 1 did: every title padded to the longest
    with torch.no_grad():
        states = enc.bottom(padded["input_ids"], padded["attention_mask"]).half()
    lengths = padded["attention_mask"].sum(1).tolist()
    moved = [i for i, t in enumerate(lengths) if not torch.equal(states[i, :t], mixed["hidden"][i, :t])]
    assert moved, "padding no longer changes MiniLM's rounding here: this test checks nothing"
