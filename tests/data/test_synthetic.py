"""The synthetic demo data: layout, determinism, MoM shares and the shared latent structure."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from mmrec.data import synthetic
from mmrec.data.importers import import_domain
from mmrec.data.synthetic import (
    LOOKS,
    DemoConfig,
    allocate_modalities,
    category_transitions,
    category_words,
    generate_demo,
    item_text,
    render_item_image,
    sample_sequences,
)

# Small, but with enough users for transition statistics (~2,800 transitions per domain).
SMALL = DemoConfig(seed=3, domains=("books", "music", "films"), n_users=300, n_items=40, image_size=16)


def read_csv(path: Path) -> list[dict[str, str]]:
    with open(path, newline="", encoding="utf-8") as fh:
        return list(csv.DictReader(fh))


def all_bytes(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo") / "demo"
    return out, generate_demo(SMALL, out, progress=False)


def empirical_transitions(out: Path, dom, k: int) -> np.ndarray:
    """Row-normalised counts of consecutive (category, next category) pairs in a domain's file."""
    counts = np.zeros((k, k))
    prev = None
    for row in read_csv(out / dom.name / "interactions.csv"):
        c = dom.item_category[row["item_id"]]
        if prev is not None and prev[0] == row["user_id"]:
            counts[prev[1], c] += 1
        prev = (row["user_id"], c)
    return counts / counts.sum(axis=1, keepdims=True)


# --------------------------------------------------------------------------------------------
# Layout and contents


def test_layout_and_counts(demo):
    out, result = demo
    assert sorted(p.name for p in out.iterdir()) == ["books", "demo.json", "films", "music"]
    summary = json.loads((out / "demo.json").read_text(encoding="utf-8"))
    assert DemoConfig.from_dict(summary["config"]) == SMALL
    for name, dom in result.items():
        items = read_csv(out / name / "items.csv")
        inter = read_csv(out / name / "interactions.csv")
        assert list(items[0]) == ["item_id", "title", "description", "image"]  # no latent column
        assert list(inter[0]) == ["user_id", "item_id", "timestamp"]
        assert dom.n_items == len(items) == 40 and dom.n_users == len({r["user_id"] for r in inter}) == 300
        assert dom.n_interactions == len(inter)
        assert set(dom.item_category) == {r["item_id"] for r in items}
        assert set(dom.item_category.values()) == set(range(SMALL.n_categories))  # every category everywhere
        assert summary["domains"][name] == {
            "users": 300, "items": 40, "interactions": len(inter), "text_only": dom.modality_counts["text"],
            "image_only": dom.modality_counts["image"], "both": dom.modality_counts["both"],
        }


def test_no_shared_users_or_items_across_domains(demo):
    out, result = demo
    seen_users: set[str] = set()
    seen_items: set[str] = set()
    for name in result:
        inter = read_csv(out / name / "interactions.csv")
        users, items = {r["user_id"] for r in inter}, {r["item_id"] for r in read_csv(out / name / "items.csv")}
        assert all(u.startswith(f"{name}_u") for u in users) and all(i.startswith(f"{name}_i") for i in items)
        assert {r["item_id"] for r in inter} <= items  # referential integrity
        assert not users & seen_users and not items & seen_items
        seen_users |= users
        seen_items |= items


def test_modalities_match_probabilities_and_files(demo):
    out, result = demo
    for name, dom in result.items():
        items = read_csv(out / name / "items.csv")
        kinds = {"text": 0, "image": 0, "both": 0}
        for r in items:
            has_text, has_image = bool(r["title"]), bool(r["image"])
            assert has_text == bool(r["description"])  # title and description come together
            assert has_text or has_image
            kinds["both" if has_text and has_image else "text" if has_text else "image"] += 1
            if has_image:
                assert r["image"] == f"images/{r['item_id']}.png"
                with Image.open(out / name / r["image"]) as img:
                    img.load()
                    assert img.size == (16, 16) and img.mode == "RGB"
        assert kinds == dom.modality_counts
        for kind, p in zip(("text", "image", "both"), (0.3, 0.2, 0.5)):
            assert abs(kinds[kind] / len(items) - p) <= 1 / len(items)
        # Text-only items have no PNG: the image folder holds exactly the referenced files.
        assert sorted(p.name for p in (out / name / "images").iterdir()) == sorted(
            Path(r["image"]).name for r in items if r["image"]
        )


def test_sequences_lengths_order_and_timestamps(demo):
    out, result = demo
    for name in result:
        inter = read_csv(out / name / "interactions.csv")
        keys = [(r["user_id"], int(r["timestamp"])) for r in inter]
        assert keys == sorted(keys)
        by_user: dict[str, list[int]] = {}
        for r in inter:
            by_user.setdefault(r["user_id"], []).append(int(r["timestamp"]))
        for ts in by_user.values():
            assert SMALL.min_seq_len <= len(ts) <= SMALL.max_seq_len
            assert all(b > a for a, b in zip(ts, ts[1:]))
        starts = [ts[0] for ts in by_user.values()]
        assert len(set(starts)) == len(starts)
        lengths = [len(ts) for ts in by_user.values()]
        assert min(lengths) == SMALL.min_seq_len and max(lengths) == SMALL.max_seq_len  # uniform over the range


def test_imports_with_the_tabular_importer(demo):
    out, result = demo
    dom = result["films"]
    cat = import_domain("tabular", out / "films", "films", {"text": ["title", "description"]})
    assert cat.items.height == dom.n_items and cat.interactions.height == dom.n_interactions
    assert cat.items["image"].null_count() == dom.modality_counts["text"]
    assert cat.items["title"].null_count() == dom.modality_counts["image"]


# --------------------------------------------------------------------------------------------
# The shared latent structure


def test_transition_structure_is_shared_across_domains(demo):
    out, result = demo
    k = SMALL.n_categories
    emp = {name: empirical_transitions(out, dom, k) for name, dom in result.items()}
    shared = category_transitions(SMALL)
    other = category_transitions(DemoConfig(seed=4, n_categories=k))
    uniform = np.full((k, k), 1 / k)
    l1 = lambda a, b: np.abs(a - b).sum(axis=1).mean()  # noqa: E731  mean row L1 distance
    for a in emp:
        assert l1(emp[a], uniform) > 0.8  # strongly structured
        # The generating chain shows in the data (taste jumps, 20%, pull it a little towards the
        # user's favourite categories, hence not closer).
        assert l1(emp[a], shared) < 0.35
        assert l1(emp[a], other) > 0.6  # and it is this seed's chain, not any chain
        for b in emp:
            if a < b:
                assert l1(emp[a], emp[b]) < 0.25  # the same structure in every domain
    # Each category's most likely next category other than itself is the same in all domains.
    argmax = [np.argmax(m - np.diag(np.diag(m)), axis=1) for m in emp.values()]
    assert all((x == argmax[0]).all() for x in argmax)


def test_users_have_sparse_tastes(demo):
    out, result = demo
    dom = result["books"]
    inter = read_csv(out / "books" / "interactions.csv")
    cats = np.array([dom.item_category[r["item_id"]] for r in inter])
    users = np.array([r["user_id"] for r in inter])
    distinct = np.mean([len(set(cats[users == u])) for u in np.unique(users)])
    shuffled = np.random.default_rng(0).permutation(cats)
    distinct_shuffled = np.mean([len(set(shuffled[users == u])) for u in np.unique(users)])
    assert distinct < distinct_shuffled - 0.3


def test_taste_jumps_follow_the_user_taste():
    k = 8
    transition = np.full((k, k), 1 / k)  # no structure: only tastes concentrate the sequences
    item_category = np.repeat(np.arange(k), 20)
    seqs = sample_sequences(np.random.default_rng(1), 200, transition, item_category, np.ones(len(item_category)),
                            10, 10, 0.2, 0.8)
    top = [np.mean(c == np.argmax(t)) for c, t in zip(seqs.categories, seqs.tastes)]
    assert np.mean(top) > 0.5  # about 0.8 * (share of the top category) + 0.2 / 8; 1/8 without tastes


def test_images_carry_the_category(demo):
    out, result = demo
    feats, labels = {}, {}
    for name, dom in result.items():
        rows = [r for r in read_csv(out / name / "items.csv") if r["image"]]
        x = np.stack([np.asarray(Image.open(out / name / r["image"]), dtype=float).ravel() for r in rows])
        feats[name], labels[name] = x, np.array([dom.item_category[r["item_id"]] for r in rows])
        d = np.sqrt(((x[:, None] - x[None]) ** 2).mean(-1))
        same = labels[name][:, None] == labels[name][None]
        off = ~np.eye(len(x), dtype=bool)
        assert d[same & off].mean() < 0.85 * d[~same].mean()
        assert d[same & off].min() > 0  # jitter: no two items are pixel-identical
    # The visual signature transfers: centroids of one domain classify another (background
    # removed by centring each domain) far above chance (1/8).
    src, tgt = (feats[n] - feats[n].mean(0) for n in ("books", "films"))
    cent = np.stack([src[labels["books"] == c].mean(0) for c in range(SMALL.n_categories)])
    pred = np.argmin(((tgt[:, None] - cent[None]) ** 2).sum(-1), axis=1)
    assert (pred == labels["films"]).mean() > 0.4


def test_text_carries_the_category_and_the_domain(demo):
    out, result = demo
    nouns = {i: {w.lower() for w in look.nouns} for i, look in enumerate(LOOKS)}
    for look, (name, dom) in enumerate(result.items()):  # books, music, films are looks 0, 1, 2
        for r in read_csv(out / name / "items.csv"):
            if not r["title"]:
                continue
            vocab = set(category_words(dom.item_category[r["item_id"]]))
            title = {w.strip(":,.").lower() for w in r["title"].split()}
            desc = {w.strip(":,.").lower() for w in r["description"].split()}
            assert title & vocab and len(desc & vocab) >= 2
            text = f" {r['title']} {r['description']} ".lower()
            assert any(f" {n} " in text or f" {n}:" in text or f" {n}," in text or f" {n}." in text for n in nouns[look])


# --------------------------------------------------------------------------------------------
# Determinism and atomic writes


def test_deterministic_by_seed(tmp_path):
    cfg = DemoConfig(seed=11, domains=("a", "b"), n_users=20, n_items=16, image_size=12)
    generate_demo(cfg, tmp_path / "one", progress=False)
    generate_demo(cfg, tmp_path / "two", progress=False)
    one, two = all_bytes(tmp_path / "one"), all_bytes(tmp_path / "two")
    assert len(one) > 5 and one == two
    generate_demo(DemoConfig.from_dict({**cfg.to_dict(), "seed": 12}), tmp_path / "three", progress=False)
    three = all_bytes(tmp_path / "three")
    for f in ("a/items.csv", "a/interactions.csv", "b/interactions.csv"):
        assert three[f] != one[f]


def test_crash_leaves_previous_output_untouched(tmp_path, monkeypatch):
    out = tmp_path / "demo"
    out.mkdir()
    (out / "keep.txt").write_text("old", encoding="utf-8")
    calls = []
    real = synthetic.render_item_image

    def flaky(*args, **kwargs):
        calls.append(1)
        if len(calls) == 25:  # in the second domain
            raise RuntimeError("boom")
        return real(*args, **kwargs)

    monkeypatch.setattr(synthetic, "render_item_image", flaky)
    with pytest.raises(RuntimeError, match="boom"):
        generate_demo(DemoConfig(domains=("a", "b"), n_users=5, n_items=16, image_size=8), out, progress=False)
    assert [p.name for p in tmp_path.iterdir()] == ["demo"]  # no temporary folder left behind
    assert [p.name for p in out.iterdir()] == ["keep.txt"]
    monkeypatch.undo()
    generate_demo(DemoConfig(domains=("a",), n_users=5, n_items=16, image_size=8), out, progress=False)
    assert sorted(p.name for p in out.iterdir()) == ["a", "demo.json"]  # replaced as a whole


def test_per_domain_sizes_and_probabilities(tmp_path):
    cfg = DemoConfig.from_dict({
        "domains": ["src", "tgt"], "n_users": [12, 4], "n_items": [20, 10], "image_size": 8,
        "p_text_only": [1.0, 0.0], "p_image_only": [0.0, 0.5],
    })
    assert cfg.domains == ("src", "tgt") and cfg.n_users == (12, 4)
    res = generate_demo(cfg, tmp_path / "d", progress=False)
    assert (res["src"].n_users, res["src"].n_items, res["tgt"].n_users, res["tgt"].n_items) == (12, 20, 4, 10)
    assert res["src"].modality_counts == {"text": 20, "image": 0, "both": 0}
    assert res["tgt"].modality_counts == {"text": 0, "image": 5, "both": 5}
    assert not list((tmp_path / "d" / "src" / "images").iterdir())


# --------------------------------------------------------------------------------------------
# Pure helpers


def test_render_item_image_is_pure_and_shows_the_domain():
    img = render_item_image(2, 1, 0, np.random.default_rng(5), 24)
    assert img.size == (24, 24) and img.mode == "RGB"
    assert img.tobytes() == render_item_image(2, 1, 0, np.random.default_rng(5), 24).tobytes()
    assert img.tobytes() != render_item_image(2, 1, 0, np.random.default_rng(6), 24).tobytes()
    # Domain looks differ in the background (corners), categories in the colour of the centre.
    corner = lambda im: np.asarray(im, dtype=float)[:3, :3].mean((0, 1))  # noqa: E731
    paper, dark = (render_item_image(0, 0, look, np.random.default_rng(1), 32) for look in (0, 1))
    assert np.abs(corner(paper) - corner(dark)).sum() > 150
    centre = lambda c: np.asarray(render_item_image(c, 0, 0, np.random.default_rng(1), 32), dtype=float)[14:18, 14:18].mean((0, 1))  # noqa: E731
    assert centre(0)[0] > centre(0)[2] + 80 and centre(1)[2] > centre(1)[0] + 80  # red vs blue


def test_item_text_is_pure():
    look = LOOKS[1]
    a = item_text(0, 2, 1, np.random.default_rng(3), 8, 0.0)
    assert a == item_text(0, 2, 1, np.random.default_rng(3), 8, 0.0)
    title, desc = a
    assert title and desc.endswith(".")
    words = set(desc.lower().replace(",", " ").replace(".", " ").replace(":", " ").split())
    assert len(words & set(category_words(0))) == 3  # no noise: three distinct category words
    assert words & set(synthetic.STYLES[2][1]) and words & {n.lower() for n in look.nouns}


def test_sample_sequences_follows_a_deterministic_chain():
    k = 5
    successor = np.array([2, 3, 4, 0, 1])
    transition = np.eye(k)[successor]  # always move to the successor
    item_category = np.repeat(np.arange(k), 4)
    popularity = np.ones(len(item_category))
    seqs = sample_sequences(np.random.default_rng(0), 50, transition, item_category, popularity, 4, 9, 0.3, 0.0)
    assert len(seqs.categories) == len(seqs.items) == 50 and seqs.tastes.shape == (50, k)
    for cats, items in zip(seqs.categories, seqs.items):
        assert 4 <= len(cats) <= 9
        assert (cats[1:] == successor[cats[:-1]]).all()
        assert (item_category[items] == cats).all()
        assert len(set(items.tolist())) == len(items)  # no repeats while the category has fresh items


def test_sample_sequences_follows_popularity():
    item_category = np.zeros(6, dtype=int)
    popularity = np.array([1.0, 0, 0, 0, 0, 0.0])
    seqs = sample_sequences(np.random.default_rng(0), 30, np.ones((1, 1)), item_category, popularity, 2, 2, 1.0, 0.0)
    # Item 0 is the only popular one; once taken, the exhausted category falls back to repeats.
    assert all(items.tolist() == [0, 0] for items in seqs.items)


def test_allocate_modalities_counts():
    m = allocate_modalities(np.random.default_rng(0), 10, (0.3, 0.2, 0.5))
    assert np.bincount(m, minlength=3).tolist() == [3, 2, 5]
    m = allocate_modalities(np.random.default_rng(0), 7, (1 / 3, 1 / 3, 1 / 3))
    assert sorted(np.bincount(m, minlength=3).tolist()) == [2, 2, 3]


# --------------------------------------------------------------------------------------------
# Config validation


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"p_text_only": 1.5}, r"p_text_only must be a probability in \[0, 1\].*1\.5"),
        ({"p_text_only": 0.7, "p_image_only": 0.5}, r"p_text_only \+ p_image_only must be <= 1"),
        ({"p_image_only": (0.1, 0.2)}, r"p_image_only must be .*one per domain.*\(0\.1, 0\.2\)"),
        ({"min_seq_len": 9, "max_seq_len": 5}, r"min_seq_len \(9\) must be <= max_seq_len \(5\)"),
        ({"min_seq_len": 1}, r"min_seq_len must be an integer >= 2, got 1"),
        ({"n_items": 5}, r"n_items must be an integer >= n_categories \(8\), got 5"),
        ({"n_users": 0}, r"n_users must be an integer >= 1"),
        ({"n_categories": 1}, r"n_categories must be an integer in \[2, 64\], got 1"),
        ({"n_styles": 9}, r"n_styles must be an integer in \[1, 6\], got 9"),
        ({"image_size": 4}, r"image_size must be an integer in \[8, 512\], got 4"),
        ({"seed": -1}, r"seed must be an integer >= 0, got -1"),
        ({"seed": True}, r"seed must be an integer"),
        ({"domains": ("a", "a")}, r"domains must be distinct names"),
        ({"domains": ("a/b",)}, r"domains must be names of letters"),
        ({"domains": ()}, r"domains must be a non-empty tuple"),
        ({"p_stay": 0.5, "p_next": 0.6}, r"p_stay \+ p_next \+ p_partner \+ p_taste must be <= 1"),
        ({"p_taste": 1.0, "p_stay": 0, "p_next": 0, "p_partner": 0}, r"p_taste must be < 1"),
        ({"taste_alpha": 0}, r"taste_alpha must be a number > 0"),
        ({"zipf_a": -1.0}, r"zipf_a must be a number >= 0"),
        ({"text_noise": float("nan")}, r"text_noise must be a probability"),
    ],
)
def test_config_validation(kwargs, match):
    with pytest.raises(ValueError, match=match):
        DemoConfig(**kwargs)


def test_from_dict():
    with pytest.raises(ValueError, match=r"unknown key\(s\) \['n_user'\]; valid keys: \[.*'n_users'.*\]"):
        DemoConfig.from_dict({"n_user": 3})
    cfg = DemoConfig.from_dict({"domains": ["x", "y"], "seed": 7})
    assert cfg.domains == ("x", "y") and cfg.seed == 7
    assert DemoConfig.from_dict(json.loads(json.dumps(cfg.to_dict()))) == cfg
    assert DemoConfig() == DemoConfig.from_dict({})
