"""mmrec/serving.py: image bytes within limits, the live catalog (shared by processes, persisted,
re-encoded for another model) and faiss retrieval against exact top-k."""

import io

import pytest
import torch
from PIL import Image

from mmrec.export import ExportedModel, load_model
from mmrec.serving import (CatalogStore, ContentError, FaissModel, LimitError, Limits, LiveCatalog, NewItem,
                           build_faiss_index, decode_image, encode_items)
from tests.deploy.helpers import IDS, IT1_TEXT, tiny_export


def png(w, h, mode="RGB") -> bytes:
    buf = io.BytesIO()
    Image.new(mode, (w, h)).save(buf, format="PNG")
    return buf.getvalue()


@pytest.mark.filterwarnings("ignore::PIL.Image.DecompressionBombWarning")
def test_decode_image_checks_bytes_then_pixels_before_decoding(monkeypatch):
    limits = Limits(max_image_bytes=10_000, max_image_pixels=100 * 100)
    assert decode_image(png(100, 100), limits).size == (100, 100)
    bomb, loads = png(13000, 13000, "1"), []  # ~20 KB of PNG
    monkeypatch.setattr(Image.Image, "load", lambda self: loads.append(1))
    with pytest.raises(LimitError, match=r"image is 13000x13000 pixels: 169000000 exceeds the limit of 10000") as info:
        decode_image(bomb, Limits(max_image_bytes=10_000_000, max_image_pixels=10_000))
    assert info.value.too_large and loads == []  # refused from the header, never decoded
    monkeypatch.undo()
    with pytest.raises(LimitError, match="has 20000 bytes: 20000 exceeds the limit of 10000"):
        decode_image(b"\0" * 20000, limits)
    with pytest.raises(ContentError, match="not a readable image"):
        decode_image(b"hello", limits)
    buf = io.BytesIO()
    Image.new("RGB", (8, 8)).save(buf, format="TIFF")
    with pytest.raises(ContentError, match="format TIFF is not accepted"):
        decode_image(buf.getvalue(), limits)


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    return load_model(tiny_export(tmp_path_factory.mktemp("serving") / "model"))


def test_two_catalogs_on_one_store_see_each_others_changes(exported, tmp_path):
    """Two workers = two LiveCatalogs on one folder: a change by one is in the other's next view."""
    a, b = LiveCatalog(exported, CatalogStore(tmp_path)), LiveCatalog(exported, CatalogStore(tmp_path))
    version, created = a.upsert([NewItem("copy", IT1_TEXT)])
    assert (version, created) == (1, ["copy"])
    view = b.current()
    assert view.n_items == len(IDS) + 1 and b.version == 1
    torch.testing.assert_close(view.item_vectors[view.item_index("copy")], exported.item_vectors[1], atol=1e-5, rtol=1e-5)
    assert b.remove(["it3"]) == 2
    assert "it3" not in [i for i, _ in a.current().recommend([["it1"]], k=20)[0]]
    # removed items still resolve in a history; unknown or twice-removed ids are errors
    assert a.current().recommend([["it3"]], k=2)
    with pytest.raises(KeyError, match="'it3' .*already removed"):
        a.remove(["it3"])
    # an update keeps the id, replaces the vector and brings a removed item back
    a.upsert([NewItem("it3", IT1_TEXT)])
    recs = dict(b.current().recommend([["it2"]], k=20)[0])
    assert recs["it3"] == pytest.approx(recs["it1"], abs=1e-4) == pytest.approx(recs["copy"], abs=1e-4)
    # a restart (a new catalog on the same folder) keeps everything
    c = LiveCatalog(exported, CatalogStore(tmp_path))
    assert c.version == 3 and c.state("copy") == "added" and c.state("it3") == "updated" and c.state("it4") == "exported"


def test_another_model_re_encodes_the_stored_content(exported, tmp_path):
    LiveCatalog(exported, CatalogStore(tmp_path)).upsert([NewItem("copy", IT1_TEXT)])
    other = load_model(tiny_export(tmp_path / "other"))
    with torch.no_grad():
        for p in other.model.item_tower.parameters():
            p.mul_(1.5)
    other.item_vectors = other.model.attach(*_content()).all_item_vectors()
    view = LiveCatalog(other, CatalogStore(tmp_path)).current()
    expected = encode_items(other.model, [NewItem(None, IT1_TEXT)])[0]
    torch.testing.assert_close(view.item_vectors[view.item_index("copy")], expected)
    assert not torch.allclose(expected, exported.item_vectors[1], atol=1e-3)


def _content():
    from tests.models.test_recommender import SEQ
    from tests.models.test_towers import raw_content

    return raw_content(), SEQ


def test_upsert_refuses_bad_items(exported, tmp_path):
    cat = LiveCatalog(exported, CatalogStore(tmp_path), Limits(max_items=2, max_id_chars=5))
    with pytest.raises(ContentError, match=r"given twice: \['a'\]"):
        cat.upsert([NewItem("a", "x"), NewItem("a", "y")])
    with pytest.raises(LimitError, match="3 items given by content: 3 exceeds the limit of 2"):
        cat.upsert([NewItem(f"a{i}", "x") for i in range(3)])
    with pytest.raises(LimitError, match="max_id_chars"):
        cat.upsert([NewItem("toolong", "x")])
    with pytest.raises(ContentError, match="non-empty string item_id"):
        cat.upsert([NewItem("", "x")])
    assert cat.version == 0 and not (tmp_path / "catalog.safetensors").exists()


def _clustered(n: int, d: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    centers = torch.randn(64, d, generator=g)
    vecs = centers[torch.randint(0, 64, (n,), generator=g)] + 0.5 * torch.randn(n, d, generator=g)
    users = vecs[torch.randint(0, n, (50, 5), generator=g)].mean(1) + 0.1 * torch.randn(50, d, generator=g)
    return torch.cat([torch.zeros(1, d), vecs]), users


def _faiss_view(exported, vecs, nprobe, blocked=None) -> FaissModel:
    n = vecs.shape[0] - 1
    view = FaissModel(exported.model, [f"v{i}" for i in range(1, n + 1)], vecs, {}, None, blocked)
    view.index, view.indexed = build_faiss_index(vecs[1:], nprobe=nprobe), n
    return view


def test_faiss_with_every_list_probed_equals_exact_top_k(exported):
    vecs, users = _clustered(4000, 16)
    blocked = torch.zeros(4001, dtype=torch.bool)
    blocked[torch.arange(1, 4001, 7)] = True  # removed items are filtered from faiss' candidates
    view = _faiss_view(exported, vecs, nprobe=10_000, blocked=blocked)
    exact = ExportedModel(exported.model, view.item_ids, vecs, {}, None, blocked)
    seen = [[int(i) for i in torch.randint(1, 4001, (30,), generator=torch.Generator().manual_seed(u))] for u in range(50)]
    fv, fr = view.search(users, 10, seen)
    ev, er = exact.search(users, 10, seen)
    assert fr == er
    assert all(a == pytest.approx(b, abs=1e-4) for a, b in zip(fv, ev))
    assert not any(blocked[r].any() for r in torch.tensor(fr))


def test_faiss_recall_at_10_and_items_added_later(exported):
    vecs, users = _clustered(4000, 16, seed=1)
    view = _faiss_view(exported, vecs, nprobe=16)
    exact = ExportedModel(exported.model, view.item_ids, vecs, {}, None)
    fr = view.search(users, 10, [[] for _ in users])[1]
    er = exact.search(users, 10, [[] for _ in users])[1]
    recall = sum(len(set(a) & set(b)) for a, b in zip(fr, er)) / (10 * len(users))
    assert recall >= 0.9
    # rows after the indexed ones (added at run time) are scored exactly: a copy of a user's best item wins
    best = er[0][0]
    grown = FaissModel(exported.model, view.item_ids + ["new"], torch.cat([vecs, 2 * vecs[best][None]]), {}, None)
    grown.index, grown.indexed = view.index, view.indexed
    assert grown.search(users[:1], 3, [[]])[1][0][0] == 4001


def test_a_faiss_catalog_answers_like_the_exact_one_after_changes(exported, tmp_path):
    """Added, updated and removed items through the faiss path (one list: exhaustive) equal exact."""
    fast = LiveCatalog(exported, CatalogStore(tmp_path), faiss_min_items=1)
    exact = LiveCatalog(exported, CatalogStore(tmp_path), faiss_min_items=10**9)
    assert fast.index is not None and exact.index is None
    fast.upsert([NewItem("copy", IT1_TEXT), NewItem("it5", "item number 9 with words x x ")])
    exact.remove(["it2"])
    histories = [["it1", "it3"], ["copy"], ["it7", "it8", "it9"]]
    view = fast.current()
    assert isinstance(view, FaissModel) and view.stale.tolist() == [5]
    got, want = view.recommend(histories, k=8), exact.current().recommend(histories, k=8)
    for g, w in zip(got, want):  # near-ties may swap between the two summation orders
        assert [s for _, s in g] == pytest.approx([s for _, s in w], abs=1e-4)
        assert dict(g) == pytest.approx(dict(w), abs=1e-4)
    assert all("it2" not in [i for i, _ in r] for r in got)


def test_items_given_by_content_get_no_catalog_id_vector(tmp_path):
    """A transductive model (``item_tower.item_ids``): catalog rows carry content + ID vectors, an
    item given by content is new to the catalog and gets its content vector alone."""
    import polars as pl

    from mmrec.export import export_model
    from mmrec.models.recommender import Recommender
    from tests.deploy.helpers import IDS
    from tests.models.test_recommender import SEQ, config
    from tests.models.test_towers import N, raw_content

    torch.manual_seed(0)
    model = Recommender(config("fused", item_tower={"name": "fused", "dropout": 0.0, "item_ids": True}), n_items=N)
    with torch.no_grad():
        model.item_tower.item_ids.weight[1:].normal_()
    model.attach(raw_content(), SEQ).eval()
    item_map = pl.DataFrame({"item_idx": list(range(1, N + 1)), "item_id": IDS})
    loaded = load_model(export_model(model, tmp_path / "model", item_map, "shop", {"stage": "test"}))
    assert torch.equal(loaded.model.item_tower.item_ids.weight, model.item_tower.item_ids.weight)
    content_only = loaded.item_vectors[1] - loaded.model.item_tower.item_ids.weight[1]
    new = encode_items(loaded.model, [NewItem(None, IT1_TEXT)])[0]  # item 1's text (a text-only item)
    torch.testing.assert_close(new, content_only, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(new, loaded.item_vectors[1], atol=1e-3)
