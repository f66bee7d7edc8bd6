"""Validation: each kind of bad input is named (file, row, problem) or quarantined with counts."""

from pathlib import Path

import polars as pl
import pytest

from mmrec.config import ValidationConfig
from mmrec.data.importers import import_domain
from mmrec.data.validation import ValidationError, derive_tables, validate
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
    "user-with-one-interaction": (lambda d: edit_csv(d / "interactions.csv", lambda r: r + [["lonely", "i1", "7"]]),
                                  "sequence length within bounds", "interactions.csv rows 32"),
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


def test_quarantine_moves_bad_rows_and_continues(tabular_dir):
    CASES["duplicate-id"][0](tabular_dir)
    CASES["truncated-image"][0](tabular_dir)
    CASES["unknown-item"][0](tabular_dir)
    CASES["user-with-one-interaction"][0](tabular_dir)
    raw = _catalog(tabular_dir)
    clean, report, side = validate(raw, ValidationConfig(on_error="quarantine"))
    assert report.passed
    assert {o.description for o in report.first_pass if not o.success} == {
        "item id unique", "image inside the image folder, exists and decodes",
        "item exists in the catalog", "sequence length within bounds",
    }
    # duplicate id: the later row goes, the first stays; the broken image is dropped, the item stays (it has text)
    assert clean.items.filter(pl.col("item_id") == "i4").height == 1
    assert clean.items.filter(pl.col("item_id") == "i2")["image"].item() is None
    assert side["items"].height == 2
    assert side["interactions"].height == 2  # the unknown item and the lonely user
    assert report.quarantined == {"items": 2, "interactions": 2}
    assert sum(report.quarantine_reasons.values()) == 4
    assert clean.interactions.height == raw.interactions.height - 2


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


@pytest.mark.skipif(not (SHARED / "movielens-100k").is_dir(), reason="shared dataset not present")
def test_real_movielens_validates():
    cat = import_domain("movielens", SHARED / "movielens-100k", "ml")
    _, report, _ = validate(cat, ValidationConfig(min_text_share=0.99, min_image_share=0.9))
    assert report.passed
    assert report.stats["image_only"] == 0 and report.stats["text_only"] == 62
    assert report.stats["share_image"] == pytest.approx(1620 / 1682)
