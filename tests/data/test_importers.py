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


# -- messy real data (issue 10): each case once silently corrupted the catalog or crashed
def _ninerec(tmp_path: Path, items: str | bytes, users: str | bytes) -> Path:
    d = tmp_path / "nr"
    d.mkdir()
    for name, data in (("items.tsv", items), ("users.tsv", users)):
        (d / name).write_bytes(data if isinstance(data, bytes) else data.encode("utf-8"))
    return d


def test_utf8_byte_order_mark_is_dropped(tmp_path):
    bom = "\ufeff".encode("utf-8")
    d = _ninerec(tmp_path, bom + b"a\tRed guitar\nb\tBlue drum\n", bom + b"u1\ta b\n")
    cat = import_domain("ninerec", d, "nr")
    assert cat.items["item_id"].to_list() == ["a", "b"]
    assert cat.interactions["user_id"].to_list() == ["u1", "u1"]


def test_utf8_byte_order_mark_in_a_tabular_csv(tabular_dir):
    path = tabular_dir / "interactions.csv"
    path.write_bytes("\ufeff".encode("utf-8") + path.read_bytes())
    cat = import_domain("tabular", tabular_dir, "shop")
    assert cat.interactions.height == 30 and cat.interactions["user_id"].str.starts_with("u").all()


def test_ninerec_user_on_two_lines_is_rejected_with_both_lines(tmp_path):
    # regression: the two lines were interleaved into one sequence (both counted positions from 0)
    d = _ninerec(tmp_path, "a\tx\nb\ty\nc\tz\n", "u1\ta b\nu2\tc a\nu1\tc\n")
    with pytest.raises(CatalogError, match=r"users\.tsv, row 3: user 'u1' is also on line 1: one line per user \(lines 1 and 3"):
        import_domain("ninerec", d, "nr")


def test_ninerec_items_with_more_columns_are_rejected_unless_named(tmp_path):
    # regression: the extra columns were glued into the title
    d = _ninerec(tmp_path, "a\tRed guitar\tsix strings\nb\tBlue drum\tloud\n", "u1\ta b\n")
    with pytest.raises(CatalogError, match=r"items\.tsv, row 1: 3 tab-separated columns, expected 2 \('item_id<TAB>title'\)"):
        import_domain("ninerec", d, "nr")
    cat = import_domain("ninerec", d, "nr", {"text": ["title", "description"]})
    assert cat.text_fields == ["title", "description"]
    assert cat.items.select("title", "description").rows() == [("Red guitar", "six strings"), ("Blue drum", "loud")]
    (d / "items.tsv").write_text("a\tRed guitar\tsix strings\nb\tBlue drum\n", encoding="utf-8")
    with pytest.raises(CatalogError, match=r"items\.tsv, row 2: 2 tab-separated columns, expected 3"):
        import_domain("ninerec", d, "nr", {"text": ["title", "description"]})


def test_ragged_csv_row_is_named_by_its_line(tabular_dir):
    # regression: "found more fields than defined in 'Schema'", naming no row
    edit_csv(tabular_dir / "interactions.csv", lambda r: r[:4] + [r[4] + ["extra"]] + r[5:])
    with pytest.raises(CatalogError, match=r"interactions\.csv, row 5: 4 fields, the header has 3"):
        import_domain("tabular", tabular_dir, "shop")
    edit_csv(tabular_dir / "interactions.csv", lambda r: r[:4] + [r[4][:2]] + r[5:])  # too few is ragged too
    with pytest.raises(CatalogError, match=r"interactions\.csv, row 5: 2 fields, the header has 3"):
        import_domain("tabular", tabular_dir, "shop")


def test_multiline_records_are_numbered_by_file_line(tabular_dir):
    # regression: source_row counted records, while errors promise file lines
    edit_csv(tabular_dir / "items.csv", lambda r: [r[0], [r[1][0], "a title\non two lines", *r[1][2:]], *r[2:]])
    lines = (tabular_dir / "items.csv").read_text(encoding="utf-8").splitlines()
    cat = import_domain("tabular", tabular_dir, "shop")
    rows = dict(zip(cat.items["item_id"], cat.items["source_row"]))
    assert rows["i0"] == 2 and rows["i1"] == 4 and rows["i11"] == 14
    assert lines[rows["i11"] - 1].startswith("i11,")
    assert cat.items.filter(pl.col("item_id") == "i0")["title"].item() == "a title\non two lines"


def test_unbalanced_quote_names_the_line_it_opens_on(tabular_dir):
    path = tabular_dir / "interactions.csv"
    lines = path.read_text(encoding="utf-8").splitlines(keepends=True)
    lines[6] = lines[6].replace("u0,", 'u0,"', 1)
    path.write_text("".join(lines), encoding="utf-8")
    with pytest.raises(CatalogError, match=r"interactions\.csv, row 7: cannot parse as CSV: unexpected end of data"):
        import_domain("tabular", tabular_dir, "shop")


def _parquet_with_lists(tmp_path: Path) -> Path:
    d = tmp_path / "pq"
    d.mkdir()
    pl.DataFrame({"item_id": ["a", "b"], "title": ["x", "y"], "tags": [["red", "new"], []]}).write_parquet(d / "items.parquet")
    pl.DataFrame({"user_id": ["u"] * 3, "item_id": ["a", "b", "a"], "timestamp": [1, 2, 3]}).write_parquet(d / "inter.parquet")
    return d


def test_parquet_list_column_not_used_is_ignored_and_a_used_one_is_named(tmp_path):
    # regression: any list-typed column raised polars' InvalidOperationError
    d = _parquet_with_lists(tmp_path)
    opts = {"items": "items.parquet", "interactions": "inter.parquet", "image": None}
    cat = import_domain("tabular", d, "p", opts)
    assert cat.items["title"].to_list() == ["x", "y"] and "tags" not in cat.items.columns
    with pytest.raises(CatalogError, match=r"items\.parquet: column\(s\) \{'tags': 'List\(String\)'\} hold lists"):
        import_domain("tabular", d, "p", {**opts, "text": ["title", "tags"]})


def _cli_raw_catalog(tmp_path: Path, source: dict, capsys) -> tuple[int, str]:
    import yaml

    from mmrec import cli

    cfg = tmp_path / "pipeline.yaml"
    cfg.write_text(yaml.safe_dump({"root": ".", "artifacts": "art", "domains": {"d": {"source": source}}}))
    capsys.readouterr()
    code = cli.main(["raw_catalog", "--config", str(cfg), "-q"])
    return code, capsys.readouterr().err


def test_cli_exit_2_for_a_parquet_list_column(tmp_path, capsys):
    d = _parquet_with_lists(tmp_path)
    code, err = _cli_raw_catalog(tmp_path, {"format": "tabular", "path": str(d), "options": {
        "items": "items.parquet", "interactions": "inter.parquet", "image": None, "text": ["tags"]}}, capsys)
    assert code == 2
    assert err.strip().splitlines() == [err.strip()] and "items.parquet: column(s) {'tags'" in err


@pytest.mark.parametrize("make", ["file", "folder"])
def test_cli_exit_2_for_a_path_that_is_not_an_lmdb(tmp_path, capsys, make):
    # regression: lmdb.InvalidError / lmdb.Error traceback
    d = _ninerec(tmp_path, "a\tx\nb\ty\n", "u1\ta b\n")
    store = d / "images.lmdb"
    if make == "file":
        store.write_bytes(b"\x00not an lmdb" * 1000)
    else:
        store.mkdir()
        (store / "a.jpg").write_bytes(b"jpeg bytes")
    code, err = _cli_raw_catalog(tmp_path, {"format": "ninerec", "path": str(d), "options": {"images": "images.lmdb"}}, capsys)
    assert code == 2
    assert "Traceback" not in err and f"{store}: configured as an LMDB image store, but" in err
