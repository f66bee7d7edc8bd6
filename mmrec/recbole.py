"""RecBole's SASRec on exactly mmrec's split, read back next to mmrec's models (``mmrec compare``).

RecBole 1.2.1 needs torch 2.13 and numpy < 2, so it lives in its own virtual environment
(``make compare`` builds ``.venv-recbole``) and runs ``benchmarks/recbole_sasrec.py`` there. This
module is the mmrec side: it writes a target domain's preprocessed sequences as RecBole atomic
files, runs that script, and ranks the vectors it returns with mmrec's own evaluation
(``evaluation.history`` protocol), so every row of the comparison is computed by the same code on
the same users. RecBole's own metrics (its protocol masks no history item for sequential models)
are kept beside them.

Artifacts: ``<artifacts>/compare/<domain>/recbole/`` (per seed through ``PipelineConfig.with_seed``):
``recbole.json`` (RecBole's record), ``metrics.json`` (mmrec's protocol), ``ranks.parquet``.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import polars as pl

from mmrec.config import PipelineConfig
from mmrec.io import atomic_dir, write_json

RUNNER = Path(__file__).resolve().parent.parent / "benchmarks" / "recbole_sasrec.py"
DEFAULT_PYTHON = Path(__file__).resolve().parent.parent / ".venv-recbole" / "bin" / "python"
NAME = "recbole_sasrec"


class RecBoleError(RuntimeError):
    """RecBole's run failed or returned something that does not fit the split."""


def inter_frame(splits: pl.DataFrame) -> pl.DataFrame:
    """Each user's kept sequence (train, valid, test) as rows ``user_id, item_id, timestamp`` with the
    position as timestamp: RecBole's time-ordered leave-one-out then yields mmrec's split exactly."""
    rows = splits.sort("user_idx").select(
        "user_idx", pl.concat_list(pl.col("train"), pl.col("valid"), pl.col("test")).alias("seq"))
    return (rows.explode("seq").with_columns(pl.int_range(pl.len()).over("user_idx").alias("timestamp"))
            .select(pl.col("user_idx").alias("user_id"), pl.col("seq").alias("item_id"), "timestamp"))


def write_atomic_files(splits: pl.DataFrame, folder: Path, dataset: str) -> Path:
    """``<folder>/<dataset>/<dataset>.inter`` (RecBole's atomic format, typed header)."""
    out = folder / dataset
    out.mkdir(parents=True, exist_ok=True)
    df = inter_frame(splits)
    lines = ["user_id:token\titem_id:token\ttimestamp:float"]
    lines += [f"{u}\t{i}\t{t}" for u, i, t in df.iter_rows()]
    path = out / f"{dataset}.inter"
    tmp = path.with_suffix(".inter.tmp")
    tmp.write_text("\n".join(lines) + "\n", encoding="utf-8")
    tmp.replace(path)
    return path


def _digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()[:16]


def run(cfg: PipelineConfig, domain: str, python: Path | str = DEFAULT_PYTHON, threads: int = 1,
        quiet: bool = True) -> dict[str, Any]:
    """RecBole SASRec on ``domain`` (seed ``cfg.train('finetune').seed``), ranked by mmrec's protocol.

    Resumable: a finished run for the same split and seed is read back, not repeated."""
    import numpy as np
    import torch

    from mmrec.data.sequences import SequenceData
    from mmrec.experiment import flat_metrics
    from mmrec.evaluation import full_ranking

    d = cfg.domain(domain)
    python = Path(python)
    if not python.is_file():
        raise FileNotFoundError(f"{python}: RecBole's environment is missing; build it with `make compare` "
                                "(torch==2.13.0 recbole 'numpy<2' 'pandas<2.3' 'scipy<1.14')")
    splits_path = cfg.artifact_path("validated_catalog", d.name) / "splits.parquet"
    if not splits_path.is_file():
        raise FileNotFoundError(f"{splits_path}: run validated_catalog for {d.name} first")
    splits = pl.read_parquet(splits_path)
    seed, max_len, ec = cfg.train("finetune").seed, cfg.model().max_len, cfg.evaluation()
    out = cfg.artifacts / "compare" / d.name / "recbole"
    key = {"splits": _digest(splits_path), "seed": seed, "max_len": max_len, "history": ec.history,
           "runner": _digest(RUNNER)}
    if (out / "metrics.json").is_file():
        done = json.loads((out / "metrics.json").read_text())
        if done.get("key") == key:
            return done
    n_items = pl.read_parquet(splits_path.with_name("item_map.parquet")).height
    work = (cfg.artifacts / "compare" / d.name / ".recbole-work").resolve()
    shutil.rmtree(work / "run", ignore_errors=True)  # a failed earlier try's checkpoints and vectors
    write_atomic_files(splits, work / "data", d.name)
    cmd = [str(python), str(RUNNER), "--data", str(work / "data"), "--dataset", d.name, "--out", str(work / "run"),
           "--seed", str(seed), "--max-len", str(max_len), "--threads", str(threads)]
    # RecBole writes log/ and log_tensorboard/ into its working directory: keep them in the work folder
    proc = subprocess.run(cmd, capture_output=quiet, text=True, cwd=work)
    if proc.returncode != 0:
        tail = (proc.stderr or "")[-2000:] if quiet else ""
        raise RecBoleError(f"RecBole run failed (exit {proc.returncode}): {' '.join(cmd)}\n{tail}")
    record = json.loads((work / "run" / "recbole.json").read_text())
    items = torch.from_numpy(np.load(work / "run" / "item_vecs.npy"))
    if items.shape[0] != n_items + 1:
        raise RecBoleError(f"RecBole returned {items.shape[0] - 1} item vectors for a catalog of {n_items} items")
    data = SequenceData.from_splits(splits, n_items)
    result: dict[str, Any] = {"model": NAME, "domain": d.name, "key": key, "recbole": record, "history": ec.history}
    ranks: dict[str, Any] = {}
    for split in ("valid", "test"):
        users = torch.from_numpy(np.load(work / "run" / f"user_vecs_{split}.npy"))
        _, targets = data.histories(split, max_len)
        res = full_ranking(users, items, data.full_histories(split), targets, ks=ec.ks, batch_size=ec.batch_size,
                           cold_items=data.cold_items(), history=ec.history, return_ranks=True)
        result[split] = flat_metrics(res)
        ranks[split] = res["ranks"]
    with atomic_dir(out) as tmp:
        write_json(tmp / "metrics.json", result)
        write_json(tmp / "recbole.json", record)
        pl.DataFrame({"user_idx": list(range(data.n_users)), NAME: ranks["test"].tolist()}).write_parquet(tmp / "ranks.parquet")
    return result


def read_ranks(cfg: PipelineConfig, domain: str) -> dict[str, Any]:
    """RecBole SASRec's per-user test ranks of a finished ``run``: ``{NAME: (U,) array}``."""
    path = cfg.artifacts / "compare" / cfg.domain(domain).name / "recbole" / "ranks.parquet"
    if not path.is_file():
        raise FileNotFoundError(f"{path}: run `mmrec compare` first")
    df = pl.read_parquet(path).sort("user_idx")
    return {NAME: df[NAME].to_numpy()}


if __name__ == "__main__":  # pragma: no cover
    sys.exit("use `mmrec compare`")
