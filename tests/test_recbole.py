"""mmrec.recbole: the split RecBole sees is mmrec's, its vectors are ranked by mmrec's protocol, runs
resume, failures are loud. A fake RecBole environment (a script standing in for its python) checks the
plumbing on every run; the real RecBole runs in a slow test when `make compare` built its venv."""

from __future__ import annotations

import json
import os
import stat
import sys
import textwrap

import numpy as np
import polars as pl
import pytest
import yaml

from mmrec import cli, recbole, stages
from mmrec.config import load_config
from tests.test_stages import _config


def _loo(inter: pl.DataFrame) -> pl.DataFrame:
    """RecBole's leave-one-out with order TO, group_by user: per user, sorted by time, the last
    interaction is test, the one before valid, the rest train."""
    g = inter.sort(["user_id", "timestamp"]).group_by("user_id", maintain_order=True).agg(pl.col("item_id"))
    return g.select(pl.col("user_id").alias("user_idx"),
                    pl.col("item_id").list.slice(0, pl.col("item_id").list.len() - 2).alias("train"),
                    pl.col("item_id").list.get(-2).alias("valid"), pl.col("item_id").list.get(-1).alias("test"))


def test_inter_frame_gives_back_mmrecs_split_under_leave_one_out():
    splits = pl.DataFrame({"user_idx": [1, 0, 2], "train": [[5, 3, 5], [1, 2], [4, 4, 1, 2]],
                           "valid": [3, 9, 7], "test": [2, 3, 4]})
    inter = recbole.inter_frame(splits)
    assert inter.columns == ["user_id", "item_id", "timestamp"]
    assert inter.height == 3 + 2 + 4 + 6
    # positions as time: strictly increasing within a user, so ties (repeated items) keep their order
    assert inter.filter(pl.col("user_id") == 2)["timestamp"].to_list() == [0, 1, 2, 3, 4, 5]
    assert _loo(inter).sort("user_idx").to_dicts() == splits.sort("user_idx").to_dicts()


def test_atomic_file_has_recboles_typed_header(tmp_path):
    splits = pl.DataFrame({"user_idx": [0, 1], "train": [[1], [2, 3]], "valid": [2, 1], "test": [3, 2]})
    path = recbole.write_atomic_files(splits, tmp_path, "shop")
    assert path == tmp_path / "shop" / "shop.inter"
    lines = path.read_text().splitlines()
    assert lines[0] == "user_id:token\titem_id:token\ttimestamp:float"
    assert lines[1:4] == ["0\t1\t0", "0\t2\t1", "0\t3\t2"] and len(lines) == 1 + 3 + 4
    assert not list((tmp_path / "shop").glob("*.tmp"))


FAKE = """\
#!{python}
# stands in for RecBole's python: one-hot item vectors, each user's vector the one-hot of a chosen item
import argparse, json, sys
from pathlib import Path
import numpy as np
import polars as pl
p = argparse.ArgumentParser()
p.add_argument("runner"); p.add_argument("--data"); p.add_argument("--dataset"); p.add_argument("--out")
p.add_argument("--seed", type=int); p.add_argument("--max-len", type=int); p.add_argument("--threads", type=int)
p.add_argument("--epochs", type=int, default=300); p.add_argument("--stopping-step", type=int, default=10)
a = p.parse_args()
calls = Path({calls!r}); calls.write_text(calls.read_text() + "x" if calls.exists() else "x")
if {fail!r}:
    print("boom", file=sys.stderr); sys.exit(3)
rows = [l.split("\\t") for l in (Path(a.data) / a.dataset / (a.dataset + ".inter")).read_text().splitlines()[1:]]
seqs = {{}}
for u, i, t in rows:
    seqs.setdefault(int(u), []).append(int(i))
n = max(int(i) for _, i, _ in rows)
out = Path(a.out); out.mkdir(parents=True, exist_ok=True)
np.save(out / "item_vecs.npy", np.eye(n + 1, dtype=np.float32))
users = sorted(seqs)
np.save(out / "user_vecs_valid.npy", np.eye(n + 1, dtype=np.float32)[[seqs[u][-2] for u in users]])
# test: even users aim at the target; odd ones at their first history item, with half of that at the target
eye = np.eye(n + 1, dtype=np.float32)
np.save(out / "user_vecs_test.npy", np.stack([eye[seqs[u][-1]] if u % 2 == 0 else eye[seqs[u][0]] + 0.5 * eye[seqs[u][-1]]
                                              for u in users]))
(out / "recbole.json").write_text(json.dumps({{"epochs_trained": min(2, a.epochs), "seconds_per_epoch": 0.5, "seed": a.seed,
    "max_len": a.max_len, "test_recbole_protocol": {{"ndcg@10": 0.25}}}}))
"""


def _fake_python(tmp_path, fail=False):
    path = tmp_path / ("fail-python" if fail else "fake-python")
    path.write_text(FAKE.format(python=sys.executable, calls=str(tmp_path / "calls.txt"), fail=fail))
    path.chmod(path.stat().st_mode | stat.S_IEXEC)
    return path


@pytest.fixture
def validated(tmp_path):
    path = _config(tmp_path)
    raw = yaml.safe_load(path.read_text())
    path.write_text(yaml.safe_dump({**raw, "model": {"max_len": 4, "item_tower": {"name": "id"}, "objective": {"nicl_enabled": False}}}))
    cfg = load_config(path)
    assert cli.main(["raw_catalog", "--config", str(cfg.config_path), "-q"]) == 0
    assert cli.main(["validated_catalog", "--config", str(cfg.config_path), "-q"]) == 0
    return cfg


def test_run_ranks_the_returned_vectors_with_mmrecs_protocol_and_resumes(tmp_path, validated):
    cfg = validated
    py = _fake_python(tmp_path)
    res = recbole.run(cfg, "shop", python=py)
    assert res["model"] == recbole.NAME and res["recbole"]["epochs_trained"] == 2
    assert res["history"] == cfg.evaluation().history == "masked"
    assert res["valid"]["HR@10"] == 1.0  # every valid vector points at its target
    ranks = recbole.read_ranks(cfg, "shop")[recbole.NAME]
    n_users = pl.read_parquet(cfg.artifact_path("validated_catalog", "shop") / "splits.parquet").height
    assert len(ranks) == n_users
    # masked protocol: the history item the odd users' vectors prefer is out of the ranking
    assert ranks.tolist() == [1] * n_users
    stored = json.loads((cfg.artifacts / "compare" / "shop" / "recbole" / "metrics.json").read_text())
    assert stored["test"] == res["test"] and stored["key"]["seed"] == cfg.train("finetune").seed
    # the same split and seed: read back, the runner is not called again
    assert recbole.run(cfg, "shop", python=py)["test"] == res["test"]
    assert (tmp_path / "calls.txt").read_text() == "x"
    # another seed is another run in its own artifacts folder (the pipeline's per-seed layout)
    with pytest.raises(FileNotFoundError, match="art-seed7.*run validated_catalog"):
        recbole.run(cfg.with_seed(7), "shop", python=py)
    for stage in ("raw_catalog", "validated_catalog"):
        assert cli.main([stage, "--config", str(cfg.config_path), "-q", "--seed", "7"]) == 0
    recbole.run(cfg.with_seed(7), "shop", python=py)
    assert (tmp_path / "calls.txt").read_text() == "xx"
    # keep_all (nothing masked) is another protocol: a new run, and the odd users' history item wins
    path = cfg.config_path
    raw = yaml.safe_load(path.read_text())
    path.write_text(yaml.safe_dump({**raw, "evaluation": {"history": "keep_all"}}))
    recbole.run(load_config(path), "shop", python=py)
    assert (tmp_path / "calls.txt").read_text() == "xxx"
    kept = recbole.read_ranks(cfg, "shop")[recbole.NAME].tolist()
    assert kept[0::2] == [1] * len(kept[0::2]) and kept[1::2] == [2] * len(kept[1::2])


def test_compare_command_prints_recbole_next_to_mmrecs_models(tmp_path, validated, capsys):
    cfg = validated
    py = _fake_python(tmp_path)
    n_users = pl.read_parquet(cfg.artifact_path("validated_catalog", "shop") / "splits.parquet").height
    out = cfg.artifact_path("evaluation", "shop")
    out.mkdir(parents=True)
    pl.DataFrame({"user_idx": list(range(n_users)), "finetuned": [1] * n_users,
                  "sasrec": [50] * n_users}).write_parquet(out / stages.RANKS)
    assert cli.main(["compare", "--config", str(cfg.config_path), "--recbole-python", str(py)]) == 0
    text = capsys.readouterr().out
    assert "RecBole 1.2.1 SASRec on mmrec's split" in text and "| 0 | 2 | 0.50 |" in text
    assert f"Paired over {n_users} test users (masked history)" in text
    assert "- finetuned - recbole_sasrec: NDCG@10" in text and "- sasrec - recbole_sasrec: NDCG@10" in text


def test_missing_environment_or_failed_run_is_a_clear_error(tmp_path, validated, capsys):
    cfg = validated
    with pytest.raises(FileNotFoundError, match="make compare"):
        recbole.run(cfg, "shop", python=tmp_path / "nope" / "python")
    with pytest.raises(recbole.RecBoleError, match=r"RecBole run failed \(exit 3\)[\s\S]*boom"):
        recbole.run(cfg, "shop", python=_fake_python(tmp_path, fail=True))
    assert not (cfg.artifacts / "compare" / "shop" / "recbole").exists()  # nothing half-written
    assert cli.main(["compare", "--config", str(cfg.config_path), "--recbole-python", str(tmp_path / "nope")]) == 2
    assert "make compare" in capsys.readouterr().err


@pytest.mark.slow
def test_real_recbole_trains_on_the_split(tmp_path, validated):
    if not recbole.DEFAULT_PYTHON.is_file():
        # MMREC_REQUIRE_RECBOLE=1 (after `make compare`): a missing environment fails instead
        if os.environ.get("MMREC_REQUIRE_RECBOLE") == "1":
            pytest.fail(f"{recbole.DEFAULT_PYTHON} missing and MMREC_REQUIRE_RECBOLE=1")
        pytest.skip("RecBole's environment is not built (`make compare`)")
    res = recbole.run(validated, "shop")
    rb = res["recbole"]
    assert rb["recbole"] == "1.2.1" and rb["epochs_trained"] >= 1 and rb["seconds_per_epoch"] > 0
    n_users = pl.read_parquet(validated.artifact_path("validated_catalog", "shop") / "splits.parquet").height
    assert rb["n_users"] == n_users
    assert 0.0 <= res["test"]["NDCG@10"] <= 1.0 and len(recbole.read_ranks(validated, "shop")[recbole.NAME]) == n_users
