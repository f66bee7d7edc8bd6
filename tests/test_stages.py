"""Stages: each writes its artifact atomically under <artifacts>/<stage>/<domain>; a failing
validation leaves earlier output intact and writes a report beside it."""

from pathlib import Path

import polars as pl
import pytest
import yaml

from mmrec import stages
from mmrec.config import load_config
from mmrec.data.validation import ValidationError
from tests.conftest import edit_csv, write_tabular


def _config(tmp_path: Path, validation: dict | None = None) -> Path:
    write_tabular(tmp_path / "raw" / "shop")
    cfg = {
        "root": ".",
        "artifacts": "art",
        "validation": {"min_text_share": 0.5, **(validation or {})},
        "preprocess": {"min_seq_len": 5, "max_seq_len": 2},
        "domains": {"shop": {"role": "target", "source": {
            "format": "tabular", "path": "raw/shop", "options": {"text": ["title", "description"]}}}},
    }
    path = tmp_path / "pipeline.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def _leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.rglob("*") if ".tmp" in p.name or p.name.startswith("."))


def test_stage_names_are_the_artifact_chain():
    assert stages.STAGES[:2] == ("raw_catalog", "validated_catalog")
    assert tuple(stages.STAGE_FUNCTIONS) == stages.STAGES


def test_raw_then_validated_catalog(tmp_path):
    cfg = load_config(_config(tmp_path))
    raw = stages.raw_catalog(cfg, "shop", progress=False)
    assert raw.path == tmp_path / "art" / "raw_catalog" / "shop"
    assert raw.metadata["users"] == 5 and raw.metadata["items"] == 12 and raw.metadata["interactions"] == 30

    res = stages.validated_catalog(cfg, "shop", progress=False)
    out = tmp_path / "art" / "validated_catalog" / "shop"
    assert res.path == out
    assert {p.name for p in out.iterdir()} >= {
        "catalog", "item_map.parquet", "user_map.parquet", "splits.parquet", "validation.md", "stats.json"}
    splits = pl.read_parquet(out / "splits.parquet")
    # L=2: each user keeps the last L+3 = 5 interactions -> 3 training items, 1 valid, 1 test
    assert splits.height == 5
    assert splits["train"].list.len().to_list() == [3] * 5
    assert res.metadata["after_preprocess"]["interactions"] == 25
    assert stages.read_stats(cfg, "shop")["after_preprocess"] == res.metadata["after_preprocess"]
    assert "passed" in (out / "validation.md").read_text().lower()
    assert _leftovers(tmp_path / "art") == []


def test_failed_validation_keeps_earlier_output(tmp_path):
    cfg_path = _config(tmp_path)
    cfg = load_config(cfg_path)
    stages.raw_catalog(cfg, "shop", progress=False)
    good = stages.validated_catalog(cfg, "shop", progress=False).path
    before = {p.relative_to(good): p.read_bytes() for p in good.rglob("*") if p.is_file()}

    # new raw data with an interaction pointing at an unknown item
    edit_csv(tmp_path / "raw" / "shop" / "interactions.csv", lambda rows: rows + [["u0", "ghost", "99999"]])
    stages.raw_catalog(cfg, "shop", progress=False)
    with pytest.raises(ValidationError) as err:
        stages.validated_catalog(cfg, "shop", progress=False)
    assert "interactions.csv" in str(err.value)

    after = {p.relative_to(good): p.read_bytes() for p in good.rglob("*") if p.is_file()}
    assert after == before  # the earlier validated catalog is untouched
    report = stages.failed_report_path(cfg, "shop")
    assert report.is_file() and "ghost" in report.read_text()
    assert _leftovers(tmp_path / "art") == []

    # fixing the data clears the failure report
    edit_csv(tmp_path / "raw" / "shop" / "interactions.csv", lambda rows: rows[:-1])
    stages.raw_catalog(cfg, "shop", progress=False)
    stages.validated_catalog(cfg, "shop", progress=False)
    assert not report.exists()


def test_quarantine_mode_continues_with_counts(tmp_path):
    cfg = load_config(_config(tmp_path, {"on_error": "quarantine"}))
    edit_csv(tmp_path / "raw" / "shop" / "interactions.csv", lambda rows: rows + [["u0", "ghost", "99999"]])
    stages.raw_catalog(cfg, "shop", progress=False)
    res = stages.validated_catalog(cfg, "shop", progress=False)
    assert res.metadata["quarantined"]  # counts reported
    side = res.path / "quarantine"
    assert side.is_dir()
    inter = pl.read_parquet(side / "interactions.parquet")
    assert inter.filter(pl.col("item_id") == "ghost").height == 1
    assert res.metadata["after_preprocess"]["interactions"] == 25  # the bad row is gone, the rest kept



def test_validated_catalog_keeps_the_domains_user_fraction(tmp_path):
    path = _config(tmp_path)
    spec = yaml.safe_load(path.read_text())
    spec["domains"]["shop"]["user_fraction"] = 0.4
    path.write_text(yaml.safe_dump(spec))
    cfg = load_config(path)
    stages.raw_catalog(cfg, "shop", progress=False)
    res = stages.validated_catalog(cfg, "shop", progress=False)
    assert res.metadata["after_preprocess"]["users"] == 2  # ceil(0.4 * 5)
    assert res.metadata["preprocessing"]["users_sampled_out"] == 3
    assert "`user_fraction` 0.4 (a fixed-seed sample): 3 left out" in (res.path / "validation.md").read_text()

def test_validated_catalog_needs_raw_catalog(tmp_path):
    cfg = load_config(_config(tmp_path))
    with pytest.raises(Exception, match="raw_catalog"):
        stages.validated_catalog(cfg, "shop", progress=False)


def _result(hr, ndcg, passed=True, domain="films", users=100, cold=True):
    m = {"HR@10": hr, "NDCG@10": ndcg, "MRR@10": ndcg / 2, "n_users": users, "n_cold_users": 3}
    if cold:
        m["cold/HR@10"] = hr / 2
    gate = {"metric": "NDCG@10", "margin": 0.0, "against": ["id"], "passed": passed}
    return {"domain": domain, "split": "test", "gate": gate,
            "models": {"finetuned": m, "id": {**m, "HR@10": hr - 0.1}}}


def test_metrics_summary_table_gives_mean_and_sample_std_per_model():
    table = stages.metrics_summary_table({0: _result(0.10, 0.05), 1: _result(0.12, 0.07, passed=False),
                                          2: _result(0.14, 0.06)})
    lines = table.splitlines()
    assert lines[0] == ("| model | HR@10 | NDCG@10 | MRR@10 | cold HR@10 | cold NDCG@10 | cold MRR@10 |")
    # HR 10, 12, 14 %: mean 12, sample std 2; NDCG 5, 7, 6: mean 6, std 1; MRR half of it; cold HR half of HR
    assert lines[2] == "| finetuned | 12.00 ± 2.00 | 6.00 ± 1.00 | 3.00 ± 0.50 | 6.00 ± 1.00 | - | - |"
    assert lines[3].startswith("| id | 2.00 ± 2.00 | 6.00 ± 1.00 |")
    assert "seeds [0, 1, 2] (n=3)" in table and "passed in 2 of 3 runs" in table and "100 users" in table
    # the fine-tuned model's NDCG equals the id model's in every run: a gap of 0 +- 0, never positive
    assert lines[-1] == "NDCG@10 of the fine-tuned model minus each other model, paired by seed: id +0.00 ± 0.00 (0 of 3 positive)."


def test_metrics_summary_table_pairs_the_gaps_by_seed():
    runs = {s: _result(0.1, 0.05) for s in range(3)}
    for r, gap in zip(runs.values(), (0.01, -0.02, 0.01)):
        r["models"]["id"] = {**r["models"]["id"], "NDCG@10": 0.05 - gap}
        r["models"]["scratch"] = {**r["models"]["id"], "NDCG@10": 0.03}
    last = stages.metrics_summary_table(runs).splitlines()[-1]
    # gaps +1, -2, +1 points: mean 0, sample std sqrt(3); scratch always 2 points below
    assert last.endswith("id +0.00 ± 1.73 (2 of 3 positive); scratch +2.00 ± 0.00 (3 of 3 positive).")


def test_metrics_summary_table_has_no_gap_line_without_the_finetuned_model():
    runs = {0: _result(0.1, 0.05), 1: _result(0.12, 0.05)}
    for r in runs.values():
        r["models"]["other"] = r["models"].pop("finetuned")
    assert "paired by seed" not in stages.metrics_summary_table(runs)


@pytest.mark.parametrize("runs, match", [
    ({0: _result(0.1, 0.05)}, "at least two runs"),
    ({0: _result(0.1, 0.05), 1: _result(0.1, 0.05, domain="books")}, "different domains"),
    ({0: _result(0.1, 0.05), 1: _result(0.1, 0.05, users=99)}, "different test sets"),
])
def test_metrics_summary_table_refuses_runs_that_do_not_compare(runs, match):
    with pytest.raises(ValueError, match=match):
        stages.metrics_summary_table(runs)


def test_run_keys_leave_out_what_changes_display_or_memory_only():
    from mmrec.training import TrainConfig

    a = stages._train_key(TrainConfig(progress=True, release_memory=True))
    b = stages._train_key(TrainConfig(progress=False, release_memory=False))
    assert a == b  # a run resumes and is found again whatever these two say
    assert a["progress"] is None and "release_memory" not in a  # keys made before release_memory existed still match
    assert stages._train_key(TrainConfig(lr=0.01)) != a
