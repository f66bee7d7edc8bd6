"""benchmarks/epoch_time.py: only optimizer steps are timed, every epoch's steps are counted, and the
RecBole row comes from its runner on the same split with the asked epochs (a stand-in RecBole here)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import polars as pl

from mmrec import cli
from tests.test_recbole import _fake_python, validated  # noqa: F401 (fixture)

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import epoch_time  # noqa: E402


def test_epoch_time_counts_steps_per_epoch_and_compares_with_recbole(tmp_path, validated, capsys):  # noqa: F811
    cfg = validated
    assert cli.main(["item_features", "--config", str(cfg.config_path), "-q"]) == 0
    py = _fake_python(tmp_path)
    assert epoch_time.main(["--config", str(cfg.config_path), "--domain", "shop", "--models", "model", "scratch",
                            "--epochs", "2", "--recbole-python", str(py), "--records", str(tmp_path / "rec")]) == 0
    out = capsys.readouterr().out
    record = json.loads((cfg.artifacts / "bench" / "epoch_time-shop-t1.json").read_text())
    assert json.loads((tmp_path / "rec" / "epoch_time-shop-t1.json").read_text()) == record
    splits = pl.read_parquet(cfg.artifact_path("validated_catalog", "shop") / "splits.parquet")
    assert record["train_targets_per_epoch"] == sum(len(t) - 1 for t in splits["train"].to_list())
    rows = {r["model"]: r for r in record["rows"]}
    assert set(rows) == {"model", "scratch", "recbole_sasrec"}
    for name in ("model", "scratch"):
        r = rows[name]
        assert r["epochs"] == 2 and r["steps"] == 2 * r["steps_per_epoch"] and r["steps"] >= 2
        assert 0 < r["train_seconds"] and r["seconds_per_epoch"] == r["train_seconds"] / 2
        assert r["share_of_recbole_epoch"] == r["seconds_per_epoch"] / 0.5
    assert rows["recbole_sasrec"]["epochs"] == 2 and rows["recbole_sasrec"]["share_of_recbole_epoch"] == 1.0
    assert "| recbole_sasrec | 2048 | 0.50 |" in out


def test_unknown_model_or_missing_recbole(tmp_path, validated, capsys):  # noqa: F811
    cfg = validated
    try:
        epoch_time.main(["--config", str(cfg.config_path), "--domain", "shop", "--models", "sasrec"])
    except SystemExit as exc:
        assert "not among this config's variants" in str(exc)
    else:
        raise AssertionError("an unknown variant must fail")
    assert cli.main(["item_features", "--config", str(cfg.config_path), "-q"]) == 0
    assert epoch_time.main(["--config", str(cfg.config_path), "--domain", "shop", "--models", "model", "--epochs", "1",
                            "--recbole-python", str(tmp_path / "nope"), "--records", ""]) == 0
    assert "RecBole row skipped" in capsys.readouterr().err
    rows = json.loads((cfg.artifacts / "bench" / "epoch_time-shop-t1.json").read_text())["rows"]
    assert [r["model"] for r in rows] == ["model"] and rows[0]["share_of_recbole_epoch"] is None
