from pathlib import Path

import polars as pl
import pytest

from mmrec.data.catalog import CatalogError
from mmrec.data.importers import IMPORTERS, import_domain
from tests.conftest import SHARED, edit_csv, write_tabular


def test_registry_rejects_unknown_format(tabular_dir):
    with pytest.raises(ValueError, match=r"unknown import format 'csvv'.*valid formats: \['catalog', 'movielens', 'ninerec', 'tabular'\]"):
        import_domain("csvv", tabular_dir, "shop")
    assert set(IMPORTERS) == {"catalog", "movielens", "ninerec", "tabular"}


def test_unknown_option_is_an_error(tabular_dir):
    with pytest.raises(ValueError, match=r"unknown option\(s\) \['itemz'\]"):
        import_domain("tabular", tabular_dir, "shop", {"itemz": "x.csv"})


def test_tabular_import(tabular_dir):
    cat = import_domain("tabular", tabular_dir, "shop", {"text": ["title", "description"]})
    assert cat.text_fields == ["title", "description"]
    assert cat.items.height == 12 and cat.interactions.height == 30
    assert cat.items.filter(pl.col("item_id") == "i0")["image"].item() is None  # text-only item
    assert cat.items.filter(pl.col("item_id") == "i1")["title"].item() is None  # empty text -> null
    assert cat.items["source_row"].to_list()[:2] == [2, 3]  # header is row 1
    ts = cat.interactions.filter(pl.col("user_id") == "u1")["timestamp"].to_list()
    assert ts == sorted(ts)
    assert cat.images.kind == "files" and cat.images.root == tabular_dir.resolve()


def test_tabular_column_mapping_and_file_order(tmp_path):
    d = tmp_path / "d"
    d.mkdir()
    (d / "products.tsv").write_text("sku\tname\nA\tred shoe\nB\tblue hat\n", encoding="utf-8")
    (d / "clicks.tsv").write_text("who\twhat\nx\tB\nx\tA\nx\tB\n", encoding="utf-8")
    cat = import_domain("tabular", d, "s", {
        "items": "products.tsv", "interactions": "clicks.tsv", "item_id": "sku", "text": "name", "image": None,
        "user_id": "who", "interaction_item_id": "what", "timestamp": None,
    })
    assert cat.interactions["item_id"].to_list() == ["B", "A", "B"]
    assert cat.interactions["timestamp"].to_list() == [0, 1, 2]
    assert cat.images is None


def test_tabular_parquet(tmp_path):
    d = tmp_path / "p"
    d.mkdir()
    pl.DataFrame({"item_id": ["a", "b"], "title": ["x", "y"]}).write_parquet(d / "items.parquet")
    pl.DataFrame({"user_id": ["u", "u", "u"], "item_id": ["a", "b", "a"], "timestamp": [3, 1, 2]}).write_parquet(d / "inter.parquet")
    cat = import_domain("tabular", d, "p", {"items": "items.parquet", "interactions": "inter.parquet", "image": None})
    assert cat.interactions["item_id"].to_list() == ["b", "a", "a"]  # sorted by time
    assert cat.items["source_row"].to_list() == [1, 2]


@pytest.mark.parametrize(
    "change, match",
    [
        (lambda d: edit_csv(d / "items.csv", lambda r: [[c for j, c in enumerate(row) if j != 1] for row in r]),
         r"items\.csv: missing column\(s\) \['title'\]"),
        (lambda d: (d / "items.csv").write_bytes(b""), r"items\.csv: file is empty"),
        (lambda d: (d / "interactions.csv").write_text("user_id,item_id,timestamp\n"), r"interactions\.csv: no data rows"),
        (lambda d: (d / "items.csv").write_bytes((d / "items.csv").read_bytes().replace(b"item 3 title", b"item 3 \xff\xfetitle")),
         r"items\.csv, row 5: text is not valid utf-8"),
        (lambda d: edit_csv(d / "interactions.csv", lambda r: r[:3] + [[r[3][0], r[3][1], "yesterday"]] + r[4:]),
         r"interactions\.csv, row 4: timestamp 'yesterday' is not an integer"),
        (lambda d: (d / "interactions.csv").unlink(), r"interactions\.csv: file not found"),
    ],
    ids=["missing-column", "empty-file", "header-only", "non-utf8", "bad-timestamp", "missing-file"],
)
def test_tabular_bad_input(tabular_dir, change, match):
    change(tabular_dir)
    with pytest.raises(CatalogError, match=match):
        import_domain("tabular", tabular_dir, "shop")


def test_missing_dataset_folder(tmp_path):
    with pytest.raises(CatalogError, match="dataset folder not found"):
        import_domain("ninerec", tmp_path / "nope", "x")


def test_ninerec_layout_with_lmdb(tmp_path):
    import numpy as np

    from mmrec.data.images import write_lmdb

    d = tmp_path / "nr"
    d.mkdir()
    (d / "items.tsv").write_text("a\t Red guitar\nb\tBlue drum\nc\t\n", encoding="utf-8")
    (d / "users.tsv").write_text("u1\ta b a\nu2\tc b\n", encoding="utf-8")
    write_lmdb(d / "images.lmdb", {"a": np.zeros((4, 4, 3), np.uint8), "c": np.full((4, 4, 3), 9, np.uint8)})
    cat = import_domain("ninerec", d, "nr", {"images": "images.lmdb"})
    assert cat.items["title"].to_list() == ["Red guitar", "Blue drum", None]  # leading space stripped
    assert cat.items["image"].to_list() == ["a", None, "c"]  # only keys present in the LMDB
    assert cat.images.kind == "lmdb"
    assert cat.interactions.filter(pl.col("user_id") == "u1")["item_id"].to_list() == ["a", "b", "a"]
    assert cat.interactions.filter(pl.col("user_id") == "u1")["timestamp"].to_list() == [0, 1, 2]
    assert cat.images.read("c").getpixel((0, 0)) == (9, 9, 9)


def test_ninerec_malformed_line(tmp_path):
    d = tmp_path / "nr"
    d.mkdir()
    (d / "items.tsv").write_text("a\tx\nno-tab-here\n", encoding="utf-8")
    (d / "users.tsv").write_text("u1\ta\n", encoding="utf-8")
    with pytest.raises(CatalogError, match=r"items\.tsv, row 2: expected 'item_id<TAB>title'"):
        import_domain("ninerec", d, "nr")


needs_shared = pytest.mark.skipif(not SHARED.is_dir(), reason="../shared/datasets not present")


@needs_shared
def test_real_amazon_instrument():
    cat = import_domain("ninerec", SHARED / "amazon-instrument", "amazon")
    assert cat.items.height == 33921
    assert cat.interactions.height == 83828
    assert cat.interactions["user_id"].n_unique() == 10000
    assert cat.items["image"].null_count() == cat.items.height  # text-only domain
    assert cat.items.filter(pl.col("item_id") == "B001EOHEBY")["title"].item().startswith("Appalachian")


@needs_shared
def test_real_movielens_100k():
    cat = import_domain("movielens", SHARED / "movielens-100k", "ml")
    assert cat.items.height == 1682 and cat.interactions.height == 100000
    assert cat.interactions["user_id"].n_unique() == 943
    assert cat.items["image"].is_not_null().sum() == 1620  # 62 items without a poster are text-only
    toy = cat.items.filter(pl.col("item_id") == "1").row(0, named=True)
    assert toy["title"] == "Toy Story (1995)" and toy["genres"] == "Animation, Children's, Comedy"
    u = cat.interactions.filter(pl.col("user_id") == "1")
    assert u.height == 272 and u["timestamp"].is_sorted()
    assert cat.images.read(toy["image"]).size == (185, 278)
