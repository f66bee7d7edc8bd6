"""Validation: each kind of bad input is named (file, row, problem) or quarantined with counts."""

from pathlib import Path

import polars as pl
import pytest

from mmrec.config import ValidationConfig
from mmrec.data.importers import import_domain
from mmrec.data.validation import derive_tables, validate
from tests.conftest import SHARED, edit_csv


def _catalog(d: Path):
    return import_domain("tabular", d, "shop", {"text": ["title", "description"]})


def _break_image(d: Path, name: str, data: bytes) -> None:
    (d / "images" / name).write_bytes(data)


def _set_item(row_index: int, column: int, value: str):
    def fn(rows):
        rows[row_index][column] = value
        return rows
    return fn


# Each case: how to break the tiny dataset, the failing expectation, the file and source row named.
CASES = {
    "duplicate-id": (lambda d: edit_csv(d / "items.csv", lambda r: r + [["i4", "again", "dup", ""]]),
                     "item id unique", "items.csv rows 6, 14"),
    "unknown-item": (lambda d: edit_csv(d / "interactions.csv", _set_item(3, 1, "ghost")),
                     "item exists in the catalog", "interactions.csv rows 4"),
    "corrupt-image": (lambda d: _break_image(d, "i1.png", b"\x89PNG\r\n\x1a\nthis is not a png"),
                      "image inside the image folder, exists and decodes", "items.csv rows 3"),
    "truncated-image": (lambda d: _break_image(d, "i2.png", (d / "images" / "i2.png").read_bytes()[:60]),
                        "image inside the image folder, exists and decodes", "items.csv rows 4"),
    "non-image-file": (lambda d: _break_image(d, "i4.png", b"hello, I am a text file"),
                       "image inside the image folder, exists and decodes", "items.csv rows 6"),
    "missing-image": (lambda d: (d / "images" / "i5.png").unlink(),
                      "image inside the image folder, exists and decodes", "items.csv rows 7"),
    "path-escape": (lambda d: edit_csv(d / "items.csv", _set_item(3, 3, "../../etc/passwd")),
                    "image inside the image folder, exists and decodes", "items.csv rows 4"),
    "no-text-no-image": (lambda d: edit_csv(d / "items.csv", lambda r: [r[0], ["i0", "  ", "", ""], *r[2:]]),
                         "item has text or an image", "items.csv rows 2"),
    "absent-timestamp": (lambda d: edit_csv(d / "interactions.csv", _set_item(5, 2, "")),
                         "timestamp present", "interactions.csv rows 6"),
    "negative-timestamp": (lambda d: edit_csv(d / "interactions.csv", _set_item(2, 2, "-5")),
                           "timestamp >= 0", "interactions.csv rows 3"),
}


@pytest.mark.parametrize("case", list(CASES))
def test_bad_input_fails_with_file_row_and_problem(tabular_dir, case):
    change, expectation, where = CASES[case]
    change(tabular_dir)
    _, report, _ = validate(_catalog(tabular_dir), ValidationConfig())
    assert not report.passed
    failed = {o.description for o in report.failures}
    assert expectation in failed
    assert where in report.summary()
    md = report.to_markdown()
    assert "**FAIL**" in md and expectation in md


def test_valid_data_passes_and_counts_modalities(tabular_dir):
    cat, report, side = validate(_catalog(tabular_dir), ValidationConfig(min_text_share=0.5, min_image_share=0.5))
    assert report.passed and side == {}
    s = report.stats
    assert (s["items"], s["users"], s["interactions"]) == (12, 5, 30)
    assert s["text_only"] == 4 and s["image_only"] == 2  # no image: 0,3,6,9; no text: 1,5
    assert s["share_image"] == pytest.approx(8 / 12)


def test_modality_share_threshold_is_per_domain(tabular_dir):
    _, report, _ = validate(_catalog(tabular_dir), ValidationConfig(min_image_share=0.9))
    assert not report.passed
    (fail,) = report.failures
    assert fail.description == "share of items with a readable image" and fail.observed == "66.7%"
    assert "required >= 90.0%" in report.summary()


def _add_lonely_user(d: Path) -> None:
    edit_csv(d / "interactions.csv", lambda r: r + [["lonely", "i1", "7"]])


def test_quarantine_moves_bad_rows_and_continues(tabular_dir, caplog):
    CASES["duplicate-id"][0](tabular_dir)
    CASES["truncated-image"][0](tabular_dir)
    CASES["unknown-item"][0](tabular_dir)
    CASES["non-image-file"][0](tabular_dir)  # i4: the duplicated id's first row, which stays
    raw = _catalog(tabular_dir)
    with caplog.at_level("WARNING", logger="mmrec.data.validation"):
        clean, report, side = validate(raw, ValidationConfig(on_error="quarantine"))
    assert report.passed
    assert {o.description for o in report.first_pass if not o.success} == {
        "item id unique", "image inside the image folder, exists and decodes", "item exists in the catalog",
    }
    # duplicate id: the later row goes, the first stays; a broken image is dropped, the item stays (it has text)
    assert clean.items.filter(pl.col("item_id") == "i4").height == 1
    assert clean.items.filter(pl.col("item_id") == "i2")["image"].item() is None
    assert side["items"].height == 3
    assert side["interactions"].height == 1  # the unknown item
    assert report.quarantined == {"items": 3, "interactions": 1}
    # regression: counts per reason, and the image reasons say which failure
    assert report.quarantine_reasons == {
        "interactions: item exists in the catalog": 1, "items: image not_an_image": 1,
        "items: image truncated": 1, "items: item id unique": 1,
    }
    assert clean.interactions.height == raw.interactions.height - 1
    # ... and quarantine says so on stderr (it used to print nothing)
    (record,) = [r for r in caplog.records if r.name == "mmrec.data.validation"]
    assert record.levelname == "WARNING"
    assert record.getMessage() == (
        "quarantined 3 items rows, 1 interactions rows of domain 'shop'; per reason:"
        "\n       1  interactions: item exists in the catalog\n       1  items: image not_an_image"
        "\n       1  items: image truncated\n       1  items: item id unique")
    assert "- reason `items: image truncated`: 1" in report.to_markdown()


def test_short_users_are_preprocessings_to_drop_in_both_modes(tabular_dir):
    # regression: in fail mode one user below validation's own minimum rejected the whole domain,
    # while preprocessing dropped users below min_seq_len quietly: now min_seq_len is the one rule
    _add_lonely_user(tabular_dir)
    for mode in ("fail", "quarantine"):
        clean, report, side = validate(_catalog(tabular_dir), ValidationConfig(on_error=mode))
        assert report.passed and side == {}
        assert "lonely" in clean.interactions["user_id"].to_list()  # preprocessing drops and counts it


def test_max_user_interactions_is_a_failing_row(tabular_dir):
    _, report, _ = validate(_catalog(tabular_dir), ValidationConfig(max_user_interactions=5))
    (fail,) = report.failures
    assert fail.description == "sequence length at most max_user_interactions" and fail.unexpected_count == 5


def test_quarantine_cannot_repair_a_share(tabular_dir):
    _, report, _ = validate(_catalog(tabular_dir), ValidationConfig(on_error="quarantine", min_text_share=1.0))
    assert not report.passed


def test_timestamps_out_of_order_in_a_catalog(tabular_dir):
    cat = _catalog(tabular_dir)
    cat.interactions = cat.interactions.reverse()  # a catalog written unsorted by another tool
    _, report, _ = validate(cat, ValidationConfig())
    assert "timestamps ordered per user" in {o.description for o in report.failures}


def test_derive_tables_image_status(tabular_dir):
    CASES["path-escape"][0](tabular_dir)
    CASES["missing-image"][0](tabular_dir)
    t = derive_tables(_catalog(tabular_dir), ValidationConfig())
    status = dict(zip(t["items"]["item_id"], t["items"]["image_status"]))
    assert status["i0"] == "none" and status["i1"] == "ok"
    assert status["i2"] == "escapes" and status["i5"] == "missing"


def test_image_failures_are_reported_by_kind(tabular_dir):
    # regression: every failure was 'corrupt'; now the report says which, so the source can be fixed
    CASES["truncated-image"][0](tabular_dir)  # i2
    CASES["non-image-file"][0](tabular_dir)  # i4
    _, report, _ = validate(_catalog(tabular_dir), ValidationConfig())
    assert report.stats["image_failures"] == {"not_an_image": 1, "truncated": 1}
    md = report.to_markdown()
    assert "- `truncated` (the image data ends early (a partial download or copy)): 1" in md
    assert "image_status='truncated'" in report.summary() and "image_status='not_an_image'" in report.summary()


def test_pixel_limit_is_configurable(tabular_dir):
    # the fixture's images are 8 x 8 = 64 pixels
    _, report, _ = validate(_catalog(tabular_dir), ValidationConfig(max_image_pixels=64))
    assert report.passed
    _, report, _ = validate(_catalog(tabular_dir), ValidationConfig(max_image_pixels=63))
    assert not report.passed and report.stats["image_failures"] == {"too_many_pixels": 8}


@pytest.mark.skipif(not (SHARED / "movielens-100k").is_dir(), reason="shared dataset not present")
def test_real_movielens_validates():
    cat = import_domain("movielens", SHARED / "movielens-100k", "ml")
    _, report, _ = validate(cat, ValidationConfig(min_text_share=0.99, min_image_share=0.9))
    assert report.passed
    assert report.stats["image_only"] == 0 and report.stats["text_only"] == 62
    assert report.stats["share_image"] == pytest.approx(1620 / 1682)


def test_validated_catalog_counts_repeats_and_short_users_in_report_and_stats(tmp_path):
    # regression: repeated interactions were kept without a word, short users dropped quietly
    import json

    import yaml

    from mmrec import stages
    from mmrec.config import load_config
    from tests.conftest import write_tabular

    d = write_tabular(tmp_path / "raw" / "shop")
    # u0 re-consumes its last item twice (its valid and test items were equal), u1 repeats an earlier one
    edit_csv(d / "interactions.csv", lambda r: r + [["u0", r[6][1], "99998"], ["u0", r[6][1], "99999"], ["u1", r[7][1], "99999"]])
    _add_lonely_user(d)
    spec = {"root": ".", "artifacts": "art", "preprocess": {"min_seq_len": 3, "max_seq_len": 2},
            "domains": {"shop": {"source": {"format": "tabular", "path": "raw/shop", "options": {"text": ["title"]}}}}}
    (tmp_path / "p.yaml").write_text(yaml.safe_dump(spec))
    cfg = load_config(tmp_path / "p.yaml")
    stages.raw_catalog(cfg, "shop", progress=False)
    res = stages.validated_catalog(cfg, "shop", progress=False)
    assert res.metadata["preprocessing"] == {
        "repeats": "drop_all", "repeats_dropped": 3, "users_with_repeats_dropped": 2,
        "min_seq_len": 3, "short_users_dropped": 1, "short_user_interactions_dropped": 1,
        "keep_last": 5, "older_interactions_cut": 5,
    }
    assert json.loads((res.path / "stats.json").read_text())["preprocessing"] == res.metadata["preprocessing"]
    md = (res.path / "validation.md").read_text()
    assert "- repeats (`preprocess.repeats: drop_all`): 3 interactions dropped, of 2 users" in md
    assert "- users with fewer than 3 interactions (`preprocess.min_seq_len`, after repeats): 1 dropped, with 1 interactions" in md
    assert json.loads((res.path / "validation.json").read_text())["preprocessing"]["repeats_dropped"] == 3
