"""benchmarks/bench_memory.py: each setting trains in its own process for the asked steps, and the
record holds the table as printed with resident memory that a run really holds."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

from experiments import report
from mmrec import cli
from tests.test_recbole import validated  # noqa: F401 (fixture)

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import bench_memory  # noqa: E402


def test_both_settings_train_the_asked_steps_and_the_record_holds_the_table(tmp_path, validated, capsys):  # noqa: F811
    cfg = validated
    assert cli.main(["item_features", "--config", str(cfg.config_path), "-q"]) == 0
    assert bench_memory.main(["--config", str(cfg.config_path), "--domain", "shop", "--steps", "5",
                              "--records", str(tmp_path / "rec")]) == 0
    out = capsys.readouterr().out
    record = json.loads((tmp_path / "rec" / "bench_memory-shop.json").read_text())
    assert record["script"] == "benchmarks/bench_memory.py" and record["threads"] == 1
    rows = record["rows"]
    assert [r["release_memory"] for r in rows] == [False, True]
    for r in rows:
        assert r["steps"] == 5 and r["seconds_per_step"] > 0
        assert 100 < r["rss_loaded_mib"] <= r["rss_peak_mib"] and r["rss_end_mib"] <= r["rss_peak_mib"]
        assert r["rss_mean_mib"] <= r["rss_peak_mib"] and r["peak_after"].split()[0] in ("step", "eval", "checkpoint")
    (table,) = record["tables"]
    assert table["rows"][1][:2] == ["on", "5"] and table["columns"][0] == "release_memory"
    assert "| on | 5 |" in out
    page = report.write_report(tmp_path / "docs", [], bench=tmp_path / "rec").read_text()
    part = page[page.index("### `bench_memory-shop.json`"):]
    assert "| release_memory | steps |" in part and f"| on | 5 | {table['rows'][1][2]} |" in part
    assert "No record of `benchmarks/bench_memory.py`" not in page


def test_bad_arguments_fail_with_the_reason(validated, capsys):  # noqa: F811
    with pytest.raises(SystemExit):
        bench_memory.main(["--config", str(validated.config_path), "--domain", "shop", "--settings", "maybe"])
    assert "choose from off,on" in capsys.readouterr().err
    with pytest.raises(SystemExit, match="item_features"):
        bench_memory.main(["--config", str(validated.config_path), "--domain", "shop", "--steps", "2", "--records", ""])
