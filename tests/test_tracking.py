"""Tracking interface: the local JSON-lines tracker round trip, fan-out, and config flattening."""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pytest

from mmrec.tracking import (
    JsonlTracker,
    MultiTracker,
    NullTracker,
    Tracker,
    flatten,
    numeric_metrics,
    read_jsonl_run,
)
from mmrec.training import TrainConfig


def test_every_tracker_satisfies_the_protocol(tmp_path):
    for t in (NullTracker(), JsonlTracker(tmp_path), MultiTracker()):
        assert isinstance(t, Tracker)
    NullTracker().log_metrics({"a": 1.0}, step=3)  # accepts anything
    assert list(tmp_path.iterdir()) == []  # JsonlTracker made its folder, wrote nothing yet


def test_jsonl_round_trip(tmp_path):
    t = JsonlTracker(tmp_path / "run")
    t.log_params({"train.lr": 1e-4, "train.max_steps": None, "model.layers": [2, 2]})
    t.log_params({"train.lr": 3e-4, "data.domain": "food"})  # merged; a later value replaces the earlier
    t.log_metrics({"train/loss": 2.5, "train/ce": np.float32(2.25)}, step=10)
    t.log_metrics({"val/NDCG@10": 0.125}, step=20)
    t.log_metrics({"final": math.nan})
    t.set_tags({"stage": "finetuned_model"})
    t.set_tags({"resumed_from_step": 12})
    (tmp_path / "report.json").write_text('{"ok": true}')
    (tmp_path / "model").mkdir()
    (tmp_path / "model" / "weights.bin").write_bytes(b"\x00\x01")
    t.log_artifact(tmp_path / "report.json")
    t.log_artifact(tmp_path / "model", "exported/model")

    run = read_jsonl_run(tmp_path / "run")
    assert run.params == {"train.lr": 3e-4, "train.max_steps": None, "model.layers": [2, 2], "data.domain": "food"}
    assert run.tags == {"stage": "finetuned_model", "resumed_from_step": "12"}
    assert [r["step"] for r in run.metrics] == [10, 20, None]
    assert run.metrics[0]["metrics"] == {"train/loss": 2.5, "train/ce": 2.25}
    assert all(isinstance(r["time"], float) for r in run.metrics)
    assert math.isnan(run.metrics[2]["metrics"]["final"])
    assert run.series("val/NDCG@10") == [(20, 0.125)]
    assert run.artifacts == ["exported/model/weights.bin", "report.json"]
    assert (tmp_path / "run" / "artifacts" / "exported" / "model" / "weights.bin").read_bytes() == b"\x00\x01"

    # reopening the folder appends
    JsonlTracker(tmp_path / "run").log_metrics({"val/NDCG@10": 0.25}, step=30)
    assert read_jsonl_run(tmp_path / "run").series("val/NDCG@10") == [(20, 0.125), (30, 0.25)]


def test_truncated_last_metrics_line_is_skipped_but_corruption_elsewhere_fails(tmp_path):
    t = JsonlTracker(tmp_path)
    t.log_metrics({"a": 1.0}, step=1)
    with open(tmp_path / "metrics.jsonl", "a") as fh:
        fh.write('{"step": 2, "metr')  # a crash in the middle of a write
    assert read_jsonl_run(tmp_path).series("a") == [(1, 1.0)]
    with open(tmp_path / "metrics.jsonl", "a") as fh:
        fh.write("\n" + json.dumps({"step": 3, "time": 0.0, "metrics": {"a": 3.0}}) + "\n")
    with pytest.raises(ValueError, match="line 2"):
        read_jsonl_run(tmp_path)


def test_jsonl_rejects_bad_input(tmp_path):
    t = JsonlTracker(tmp_path)
    with pytest.raises(TypeError, match="'acc'"):
        t.log_metrics({"acc": "high"})
    with pytest.raises(TypeError):
        t.log_metrics({"acc": None})
    with pytest.raises(ValueError, match="relative"):
        t.log_artifact(tmp_path / "x", "../escape")
    with pytest.raises(FileNotFoundError):
        t.log_artifact(tmp_path / "missing.txt")
    assert not (tmp_path / "metrics.jsonl").exists()


def test_multi_tracker_fans_out(tmp_path):
    a, b = JsonlTracker(tmp_path / "a"), JsonlTracker(tmp_path / "b")
    m = MultiTracker(a, NullTracker(), b)
    m.log_params({"p": 1})
    m.log_metrics({"x": 0.5}, step=7)
    m.set_tags({"t": "v"})
    (tmp_path / "f.txt").write_text("hi")
    m.log_artifact(tmp_path / "f.txt", "g.txt")
    ra, rb = read_jsonl_run(tmp_path / "a"), read_jsonl_run(tmp_path / "b")
    for r in (ra, rb):
        assert (r.params, r.tags, r.series("x"), r.artifacts) == ({"p": 1}, {"t": "v"}, [(7, 0.5)], ["g.txt"])


@dataclass(frozen=True)
class _Inner:
    lr: float = 1e-4
    groups: dict = field(default_factory=lambda: {"encoders": {"weight_decay": 0.0}})


@dataclass(frozen=True)
class _Outer:
    name: str = "pmmrec"
    train: _Inner = field(default_factory=_Inner)
    layers: tuple = (2, 2)
    options: dict = field(default_factory=dict)
    adapter: _Inner | None = None


def test_flatten_nested_dataclasses_and_mappings():
    assert flatten(_Outer()) == {
        "name": "pmmrec",
        "train.lr": 1e-4,
        "train.groups.encoders.weight_decay": 0.0,
        "layers": (2, 2),  # sequences are leaves
        "options": {},  # an empty mapping keeps its key
        "adapter": None,
    }
    assert flatten({"model": _Inner(lr=0.5), "seed": 3}, prefix="cfg") == {
        "cfg.model.lr": 0.5,
        "cfg.model.groups.encoders.weight_decay": 0.0,
        "cfg.seed": 3,
    }
    assert flatten({"a": {"b": 1}}, sep="/") == {"a/b": 1}
    flat = flatten(TrainConfig(), "train")
    assert flat["train.lr"] == 1e-4 and flat["train.patience"] == 3 and len(flat) == len(TrainConfig.__dataclass_fields__)
    with pytest.raises(TypeError):
        flatten(3)
    with pytest.raises(TypeError):
        flatten(_Outer)  # the class, not an instance


def test_numeric_metrics_drops_none_and_non_numbers():
    metrics = {"HR@10": 0.5, "cold/HR@10": None, "n_users": 12, "ok": True, "name": "x", "bad": math.nan, "f32": np.float32(0.25)}
    got = numeric_metrics(metrics, "val/")
    assert set(got) == {"val/HR@10", "val/n_users", "val/bad", "val/f32"}
    assert got["val/n_users"] == 12.0 and got["val/f32"] == 0.25 and math.isnan(got["val/bad"])


def test_code_version_names_head_and_whether_the_given_paths_differ(tmp_path):
    import subprocess

    from mmrec.tracking import code_version

    assert code_version(checkout=tmp_path) == {"commit": None, "dirty": None}  # not a checkout (an installed package)
    git = lambda *a: subprocess.run(["git", *a], cwd=tmp_path, check=True, capture_output=True, text=True)  # noqa: E731
    git("init", "-q")
    (tmp_path / "mmrec").mkdir()
    (tmp_path / "mmrec" / "m.py").write_text("x = 1\n")
    (tmp_path / "notes.txt").write_text("n\n")
    git("add", "-A")
    git("-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "c")
    head = git("rev-parse", "HEAD").stdout.strip()
    assert code_version(checkout=tmp_path) == {"commit": head, "dirty": False}
    (tmp_path / "notes.txt").write_text("changed\n")  # outside the paths
    assert code_version(checkout=tmp_path)["dirty"] is False
    (tmp_path / "mmrec" / "m.py").write_text("x = 2\n")
    assert code_version(checkout=tmp_path) == {"commit": head, "dirty": True}
    assert code_version(("notes.txt",), tmp_path)["dirty"] is True
