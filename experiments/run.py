"""Run experiment cells through the library stages and write one JSON record per cell.

Layout (``--out``, default ``artifacts/experiments``; git-ignored)::

    <out>/<name>/cells/<cell>/seed<N>/config.yaml   the cell's resolved pipeline config
    <out>/<name>/cells/<cell>/seed<N>/artifacts/    its artifacts (<stage>/<domain>, as `mmrec run` writes)
    <out>/<name>/shared/<stage>/<domain>-<key>/     raw_catalog, validated_catalog, item_features, keyed by
                                                    what they depend on and linked into each cell
    <out>/<name>/runs/                              training runs of every cell (the stages key them by config
                                                    and input hashes, so an identical run is trained once)
    <out>/raw/<hash>/                               generated demo data
    <out>/feature_cache/                            the feature cache of these runs (never the project's)

The ``transfer`` cell (outside ``--quick``) is the exception: it is the base config as it is, so it
runs in the folder of ``mmrec run --config <base> --seed N`` (``<artifacts>`` or ``<artifacts>-seedN``,
the project's feature cache) and a seed ``mmrec run`` has trained is evaluated, not trained again
(``Runner.adopts``).

Records (``--records``, default ``docs/results/<name>/records``): ``<cell>-seed<N>.json``, the
test ranks ``<cell>-seed<N>.ranks.parquet`` beside it, the validation ranks of every trained model
``<cell>-seed<N>.valid_ranks.parquet`` and of the pretrained model on the sources' validation split
``<cell>-seed<N>.pretrained.valid_ranks.parquet`` (what a choice is made on: ``benchmarks/valid_gap.py``
and RESULTS.md's probe section read them, never the test ranks), plus ``plan.json`` (cells and
seeds asked for, cells this config cannot have). ``<name>`` is the base config's file name
(``-quick`` added with ``--quick``). A target's files get ``-<domain>`` before the suffix when a
config has several targets.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
import traceback
from pathlib import Path
from typing import Any

import yaml

from experiments import cells as C
from mmrec import stages
from mmrec.config import PipelineConfig, load_config
from mmrec.io import write_json

REPO = C.REPO
DATA_STAGES = ("raw_catalog", "validated_catalog", "item_features")
DONE_FILE = {"raw_catalog": "catalog.json", "validated_catalog": "splits.parquet", "item_features": "features.safetensors"}
KS_REPORTED = ("HR@10", "NDCG@10")
FREQUENCY_BUCKETS = ((0, 0), (1, 2), (3, 5), (6, 10), (11, None))
"""How often a user's test target occurs in the target's training sequences (0 = cold start)."""


def bucket_name(low: int, high: int | None) -> str:
    return f"{low}+" if high is None else str(low) if low == high else f"{low}-{high}"


def git_commit() -> dict[str, Any]:
    """HEAD and whether the code the cells run (library, experiments, configs) differs from it."""
    from mmrec.tracking import code_version

    return code_version(("mmrec", "experiments", "configs"), REPO)


# -- per-user validation ranks: what a choice between two records is made on ----------------------

VALID_RANKS = ".valid_ranks.parquet"
PRETRAINED = "pretrained"
"""The column of the pretrained model's ranks on the sources' validation split."""


def validation_ranks(cfg: PipelineConfig, domain: str | None = None) -> dict[str, tuple[dict[str, Any], Any]]:
    """Each validation user's rank of their validation target under ``cfg``'s protocol, from the
    finished models in ``cfg.artifacts``: on target ``domain`` the fine-tuned model (``finetuned``) and
    every trained baseline beside it; with ``domain`` None the pretrained model (``pretrained``) on the
    sources' validation split together, what ``pretrained_model`` early-stops on. Model name ->
    (metrics, ``(U,)`` ranks). Reads the validation split only."""
    import numpy as np

    from mmrec.config import TRAINED_BASELINES
    from mmrec.experiment import evaluate_vectors
    from mmrec.export import load_model

    ec = cfg.evaluation()
    if domain is None:
        from mmrec.data.sequences import concat_sequences
        from mmrec.features import concat_contents

        parts = [stages._domain_data(cfg, s.name) for s in cfg.sources]  # noqa: SLF001 (the stages' own data)
        data = concat_sequences([d for _, d in parts], concat_contents([c for c, _ in parts])[1])
        folders = {PRETRAINED: cfg.artifact_path("pretrained_model")}
    else:
        _, data = stages._domain_data(cfg, domain)  # noqa: SLF001
        ft = cfg.artifact_path("finetuned_model", cfg.domain(domain).name)
        folders = {"finetuned": ft / "model",
                   **{n: ft / "baselines" / n for n in TRAINED_BASELINES if (ft / "baselines" / n).is_dir()}}
    out: dict[str, tuple[dict[str, Any], Any]] = {}
    for name, folder in folders.items():
        m = load_model(folder)
        got: dict[str, Any] = {}
        metrics = evaluate_vectors(lambda h, m=m: m.model.user_vectors(h, m.item_vectors), m.item_vectors, data, "valid",
                                   m.model.cfg.max_len, ec.ks, ec.batch_size, ec.history, got)
        out[name] = (metrics, np.asarray(got["ranks"]))
    return out


def add_valid_ranks(record: dict[str, Any], cfg: PipelineConfig, stem: Path, metric: str = "NDCG@10") -> list[str]:
    """Rank every validation user with the record's finished models (``validation_ranks``), check each
    model's ``metric`` against the validation value the record holds (the early-stopping best), write
    the ranks beside the record (``<stem>[-<domain>].valid_ranks.parquet``, and
    ``<stem>.pretrained.valid_ranks.parquet`` for a pretrained model) and name them in ``record``
    (``targets[d]["valid_ranks"]``, ``pretrained["valid_ranks"]``). A model whose ranks do not
    reproduce the record's value (its folder holds another run now) is left out and named in the
    returned list; nothing is written for a target or pretraining whose models all disagree."""
    problems: list[str] = []

    def write(path: Path, got: dict[str, tuple[dict[str, Any], Any]], stored: dict[str, float | None]) -> dict | None:
        import polars as pl

        kept = {}
        for name, (metrics, ranks) in got.items():
            want = stored.get(name)
            if want is None or abs(want - metrics[metric]) > 1e-6:
                problems.append(f"{path.name}: {name}: valid {metric} {metrics[metric]:.6f}, the record's "
                                f"{'none' if want is None else f'{want:.6f}'}")
                continue
            kept[name] = ranks
        if not kept:
            return None
        n = len(next(iter(kept.values())))
        tmp = path.with_name("." + path.name + ".tmp")
        pl.DataFrame({"user_idx": list(range(n)), **{k: v.tolist() for k, v in kept.items()}}).write_parquet(tmp)
        tmp.replace(path)
        return {"path": _rel(path), "sha256": _sha256(path), "models": sorted(kept), "metric_checked": metric}

    several = len(record["targets"]) > 1
    for domain, t in record["targets"].items():
        got = validation_ranks(cfg, domain)
        stored = {n: (m.get("valid") or {}).get(metric) for n, m in t["models"].items()}
        entry = write(stem.with_name(stem.name + (f"-{domain}" if several else "") + VALID_RANKS), got, stored)
        if entry is not None:
            t["valid_ranks"] = entry
    if record.get("pretrained"):
        got = validation_ranks(cfg, None)
        entry = write(stem.with_name(stem.name + "." + PRETRAINED + VALID_RANKS), got,
                      {PRETRAINED: record["pretrained"]["valid_metrics"].get(metric)})
        if entry is not None:
            record["pretrained"]["valid_ranks"] = entry
    return problems


def backfill_valid_ranks(records: Path, log=print) -> list[Path]:
    """``add_valid_ranks`` for every record in ``records`` that has none yet (made before records held
    validation ranks), from the artifacts folder its evaluation names, while that still holds the
    record's models; a record whose models are gone or replaced is left as it is and logged.
    Returns the records updated (each rewritten whole: temp file + rename)."""
    import dataclasses as dc

    done = []
    for path in sorted(records.glob("*-seed*.json")):
        rec = json.loads(path.read_text())
        need_pre = bool(rec.get("pretrained")) and "valid_ranks" not in rec["pretrained"]
        if not need_pre and all("valid_ranks" in t for t in rec["targets"].values()):
            continue
        metrics = Path(next(iter(rec["targets"].values()))["metrics_json"])
        root = (metrics if metrics.is_absolute() else REPO / metrics).parent.parent.parent
        cfg_path = Path(rec["config"]["path"])
        cfg_path = cfg_path if cfg_path.is_absolute() else REPO / cfg_path
        if not cfg_path.is_file() or not root.is_dir():
            log(f"[experiments] {path.name}: its config {cfg_path} or artifacts {root} are gone: no validation ranks")
            continue
        try:
            problems = add_valid_ranks(rec, dc.replace(load_config(cfg_path), artifacts=root),
                                       path.with_name(path.name[:-len(".json")]))
        except FileNotFoundError as exc:
            log(f"[experiments] {path.name}: {exc}: no validation ranks")
            continue
        for p in problems:
            log(f"[experiments] {p}: left out (the folder holds another run now)")
        write_json(path, rec)
        log(f"[experiments] {path.name}: validation ranks added from {_rel(root)}")
        done.append(path)
    return done


def recbole_available() -> bool:
    from mmrec.recbole import DEFAULT_PYTHON

    return Path(DEFAULT_PYTHON).is_file()


# -- training cost, from the stages' own tracker calls ------------------------------------------

class CostTracker:
    """A ``mmrec.tracking.Tracker`` that times training: with ``log_every: 1`` every optimizer step
    logs its loss, so the time between two consecutive step logs with no evaluation in between is
    one step (its batch loading included). Validation and checkpoints are excluded from the step
    time and included in the wall time per epoch. A run resumed from a finished checkpoint (trained
    by another cell, or by ``mmrec run``) logs no step: ``cost`` then reads its own log instead
    (``log_cost``) and marks it ``trained_here: false``."""

    def __init__(self):
        self.runs: dict[str, dict[str, Any]] = {}
        self.current: dict[str, Any] | None = None

    def set_tags(self, tags: dict[str, str]) -> None:
        if "variant" in tags or tags.get("stage") == "pretrained_model":
            name = tags.get("variant", "pretrained")
            self.current = self.runs[name] = {"events": [], "resumed_from_step": None}
        elif "resumed_from_step" in tags and self.current is not None:
            self.current["resumed_from_step"] = int(tags["resumed_from_step"])

    def log_params(self, params: dict[str, Any]) -> None:
        if self.current is not None:
            self.current["params"] = {k: params.get(f"train.{k}") for k in ("batch_size", "drop_last", "seed")}
            self.current["events"].append(("start", self.current["resumed_from_step"] or 0, time.perf_counter()))

    def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None:
        if self.current is None:
            return
        kind = "step" if any(k.startswith("train/") for k in metrics) else "eval" if any(
            k.startswith("val/") for k in metrics) else "end"
        self.current["events"].append((kind, step, time.perf_counter()))

    def log_artifact(self, path: Path, name: str | None = None) -> None:
        pass

    def summary(self, name: str, n_rows: int) -> dict[str, Any]:
        """Seconds per epoch and sequences per second of run ``name`` (``n_rows`` training rows)."""
        run = self.runs.get(name)
        steps = [e for e in (run or {}).get("events", []) if e[0] == "step"]
        if not steps:
            return {"trained_here": False}
        per_epoch, rows = _batches(n_rows, run["params"]["batch_size"], run["params"]["drop_last"])
        events = run["events"]
        seconds = sequences = 0.0
        for prev, cur in zip(events, events[1:]):
            if cur[0] == "step" and prev[0] in ("step", "start") and cur[1] == prev[1] + 1:
                seconds += cur[2] - prev[2]
                sequences += rows(cur[1])
        first = next(e for e in events if e[0] == "start")
        evals = [e for e in events if e[0] == "eval"]
        trained_steps = steps[-1][1] - first[1]
        epochs = trained_steps / per_epoch
        out: dict[str, Any] = {"trained_here": True, "steps": trained_steps, "epochs": round(epochs, 3),
                               "rows_per_epoch": n_rows, "steps_timed": sum(1 for p, c in zip(events, events[1:])
                                                                            if c[0] == "step" and p[0] in ("step", "start")
                                                                            and c[1] == p[1] + 1)}
        if seconds > 0:
            out["sequences_per_second"] = sequences / seconds
            out["train_seconds_per_epoch"] = n_rows / out["sequences_per_second"]
        if evals and epochs > 0:
            out["wall_seconds_per_epoch"] = (evals[-1][2] - first[2]) / epochs
        return out

    def cost(self, name: str, n_rows: int, run_dir: Path) -> dict[str, Any]:
        """``summary`` when this process trained run ``name``; otherwise the cost read back from the
        run's own log (``log_cost``: resumed from a finished checkpoint, trained by another cell or
        by ``mmrec run``), ``trained_here`` false."""
        s = self.summary(name, n_rows)
        if s["trained_here"]:
            return s
        return {**log_cost(run_dir, n_rows), "trained_here": False}


def _batches(n_rows: int, batch_size: int, drop_last: bool):
    """Steps per epoch, and the number of rows of the 1-based step ``s`` (full batches, except the
    last of an epoch when it is kept)."""
    per_epoch = -(-n_rows // batch_size) if not drop_last else n_rows // batch_size

    def rows(step: int) -> int:
        last = (step - 1) % per_epoch == per_epoch - 1
        return n_rows - batch_size * (per_epoch - 1) if last and not drop_last else batch_size

    return per_epoch, rows


def log_cost(run_dir: Path, n_rows: int) -> dict[str, Any]:
    """Training cost of a finished run read back from its own log (``<run_dir>/log``: every
    ``log_every``-th step and every validation is logged with its wall-clock time). Time per row is
    the median over the intervals between consecutive step logs with no validation between them, the
    wall time per epoch the median between consecutive validations (medians: a run stopped and resumed
    has one interval that is not training). Empty when the run has no log or too few lines."""
    from mmrec.tracking import read_jsonl_run

    try:
        log = read_jsonl_run(Path(run_dir) / "log")
        bs, drop_last = int(log.params["train.batch_size"]), bool(log.params["train.drop_last"])
    except (FileNotFoundError, KeyError, TypeError, ValueError):
        return {"source": "run log", "available": False}
    per_epoch, rows = _batches(n_rows, bs, drop_last)
    events = []
    for r in log.metrics:
        names = r.get("metrics", {})
        kind = "step" if any(k.startswith("train/") for k in names) else "eval" if any(
            k.startswith("val/") for k in names) else "end"
        if r.get("step") is not None and r.get("time") is not None:
            events.append((kind, int(r["step"]), float(r["time"])))
    per_row = [(c[2] - p[2]) / sum(rows(s) for s in range(p[1] + 1, c[1] + 1))
               for p, c in zip(events, events[1:]) if p[0] == c[0] == "step" and c[1] > p[1] and c[2] > p[2]]
    evals = [e for e in events if e[0] == "eval"]
    per_epoch_wall = [(b[2] - a[2]) * per_epoch / (b[1] - a[1]) for a, b in zip(evals, evals[1:])
                      if b[1] > a[1] and b[2] > a[2]]
    out: dict[str, Any] = {"source": "run log", "available": bool(per_row), "rows_per_epoch": n_rows,
                           "intervals_timed": len(per_row)}
    steps = max((e[1] for e in events), default=0)
    out["steps"], out["epochs"] = steps, round(steps / per_epoch, 3)
    if per_row:
        out["sequences_per_second"] = 1.0 / statistics.median(per_row)
        out["train_seconds_per_epoch"] = n_rows / out["sequences_per_second"]
    if per_epoch_wall:
        out["wall_seconds_per_epoch"] = statistics.median(per_epoch_wall)
    return out


# -- cells ---------------------------------------------------------------------------------------

class Runner:
    """Runs the cells of one base config into ``out`` and writes their records into ``records``."""

    def __init__(self, base: Path, out: Path, records: Path, quick: bool = False, threads: int = 1,
                 recbole: str = "auto", log=print):
        self.base_path = Path(base).resolve()
        self.cfg = load_config(self.base_path)
        if quick and self.cfg.demo is None:
            raise ValueError(f"{base}: --quick runs on the built-in demo data; this config has no demo section")
        self.quick = quick
        self.name = self.base_path.stem + ("-quick" if quick else "")
        self.out = Path(out).resolve()
        self.work = self.out / self.name
        self.records = Path(records).resolve()
        self.threads = threads
        self.recbole = recbole == "on" or (recbole == "auto" and not quick and recbole_available())
        self.log = log
        self.code = git_commit()  # the code this process runs: a commit made while it runs is not it
        self.inapplicable: dict[str, str] = {}  # cell -> why, found by this process from the data
        self.checked: set[str] = set()  # cells whose applicability this process has read from the data

    # paths
    def cell_dir(self, cell: C.Cell, seed: int) -> Path:
        return self.work / "cells" / cell.name / f"seed{seed}"

    def record_path(self, cell: C.Cell | str, seed: int) -> Path:
        return self.records / f"{getattr(cell, 'name', cell)}-seed{seed}.json"

    def plan(self, seeds: list[int], only: list[str] | None = None) -> tuple[list[C.Cell], list[C.Skipped]]:
        cells, skipped = C.plan(self.cfg, self.recbole)
        if only:
            unknown = sorted(set(only) - {c.name for c in cells} - {c.group for c in cells} - set(C.GROUPS)
                             - {s.name for s in skipped})
            if unknown:
                raise ValueError(f"unknown cell(s) or group(s) {unknown}; cells: {[c.name for c in cells]}, "
                                 f"groups: {list(C.GROUPS)}")
            cells = [c for c in cells if c.name in only or c.group in only]
        return cells, skipped

    def write_plan(self, seeds: list[int], cells: list[C.Cell], skipped: list[C.Skipped], command: str | None = None) -> None:
        path = self.records / "plan.json"
        old = json.loads(path.read_text()) if path.is_file() else {}
        current = {c.name for c in C.plan(self.cfg, self.recbole)[0]}  # a cell the base config no longer has is dropped
        # cells found not applicable when they ran (the data has no item they can read): this run's
        # findings, and an earlier run's for the cells this run did not look at
        at_run = {s["name"]: s for s in old.get("skipped", []) if s.get("at_run") and s["name"] in current
                  and s["name"] not in self.checked}
        at_run.update({c.name: {"name": c.name, "group": c.group, "reason": self.inapplicable[c.name], "at_run": True}
                       for c in C.plan(self.cfg, self.recbole)[0] if c.name in self.inapplicable})
        planned = {c["name"]: c for c in old.get("cells", []) if c["name"] in current and c["name"] not in at_run}
        cells = [c for c in cells if c.name not in at_run]
        for c in cells:  # a run of some cells keeps the others of an earlier plan
            planned[c.name] = {"name": c.name, "group": c.group, "label": c.label, "value": c.value,
                               "seeds": sorted(set(planned.get(c.name, {}).get("seeds", [])) | set(seeds))}
        write_json(path, {
            "config": os.path.relpath(self.base_path, REPO), "name": self.name, "quick": self.quick,
            "command": command or old.get("command"),
            "targets": [d.name for d in self.cfg.targets], "sources": [d.name for d in self.cfg.sources],
            "recbole": self.recbole, "cells": sorted(planned.values(), key=lambda c: (C.GROUPS.index(c["group"]), c["name"])),
            "skipped": [{"name": s.name, "group": s.group, "reason": s.reason} for s in skipped] + list(at_run.values()),
            "stale": self.stale_records(),
        })

    def stale_records(self) -> list[dict[str, Any]]:
        """Every record of this folder that the current base config would not make (the report
        leaves them out of its tables and lists them): e.g. after a recipe change in the base
        config, the cells derived from it."""
        out = []
        for cell in C.plan(self.cfg, self.recbole)[0]:
            for path in sorted(self.records.glob(f"{cell.name}-seed*.json")):
                seed = path.name[len(cell.name) + len("-seed"):-len(".json")]
                if seed.isdigit():
                    why = self.stale(cell, int(seed))
                    if why is not None:
                        out.append({"cell": cell.name, "seed": int(seed), "reason": why})
        return out

    def run(self, seeds: list[int], only: list[str] | None = None, command: str | None = None) -> list[Path]:
        """Run every planned cell x seed that has no record yet; returns the records written."""
        cells, skipped = self.plan(seeds, only)
        self.write_plan(seeds, cells, skipped, command)
        written, failed = [], []
        for seed in seeds:
            for cell in cells:
                if self.record_path(cell, seed).is_file():
                    why = self.stale(cell, seed)
                    if why is None:
                        self.log(f"[experiments] {cell.name} seed {seed}: record exists, skipped")
                        continue
                    self.log(f"[experiments] {cell.name} seed {seed}: record {why}: run again")
                t0 = time.perf_counter()
                try:
                    why = self.not_applicable(cell, seed)
                    if why is not None:
                        self.log(f"[experiments] {cell.name}: not applicable: {why}")
                        continue
                    written.append(self.run_cell(cell, seed))
                except Exception:  # noqa: BLE001 - one failed cell must not lose the others; reported at the end
                    failed.append((cell.name, seed))
                    self.log(f"[experiments] {cell.name} seed {seed}: FAILED\n{traceback.format_exc()}")
                    continue
                self.log(f"[experiments] {cell.name} seed {seed}: done in {time.perf_counter() - t0:.0f}s")
        self.write_plan(seeds, cells, skipped, command)  # the stale list, after the reruns
        if failed:
            raise RuntimeError(f"cells failed (see the log above): {failed}")
        return written

    def not_applicable(self, cell: C.Cell, seed: int) -> str | None:
        """Why ``cell`` cannot be measured on this config's data (``cells.not_applicable``: its item
        tower reads a modality no target item has), or None. Reads the targets' validated catalogs
        (their data stages run here if they have not yet) and remembers the answer for the plan."""
        if not cell.needs:
            return None
        cfg, _, _ = self.cell_config(cell, seed)
        self._data_stages(cfg, until="validated_catalog")
        stats = {d.name: json.loads((cfg.artifact_path("validated_catalog", d.name) / "stats.json").read_text())
                 for d in cfg.targets}
        why = C.not_applicable(cell, stats)
        self.checked.add(cell.name)
        if why is None:
            self.inapplicable.pop(cell.name, None)
        else:
            self.inapplicable[cell.name] = why
        return why

    def adopts(self, cell: C.Cell) -> bool:
        """Whether ``cell`` is the base config as it is (``transfer``, outside ``--quick``). It then runs
        in the artifacts folder of ``mmrec run --config <base> --seed N`` with that config, not in a
        derived copy: a seed already run by ``mmrec run`` (and ``mmrec compare``) is read back from its
        finished checkpoints, evaluated and recorded, not trained twice, and what ``mmrec run`` and
        ``mmrec metrics`` print is what the record holds."""
        return (not self.quick and not cell.overrides and cell.demo is None and cell.source_fraction == 1.0
                and cell.target_fraction == 1.0 and self.cfg.evaluation().history == "masked")

    def derived(self, cell: C.Cell, seed: int) -> tuple[dict[str, Any], Path | None]:
        """The cell's derived config (``cells.derive``) and its demo-data folder; nothing written.
        For the adopted ``transfer`` cell this is the config it would have if it were not adopted
        (the same sections, domains and seed): its recipe."""
        demo = C.demo_spec(self.cfg, cell, self.quick)
        demo_dir = None if demo is None else self.out / "raw" / C.digest(demo)
        return C.derive(self.cfg, cell, seed, self.cell_dir(cell, seed), self.out / "feature_cache", self.quick,
                        demo_dir), demo_dir

    def stale(self, cell: C.Cell, seed: int) -> str | None:
        """Why the existing record of ``cell`` x ``seed`` is not what the current base config makes
        (None: it is, or there is no record). Records carry their ``recipe``; older ones are
        checked by the sha256 of the config file they were run with."""
        path = self.record_path(cell, seed)
        if not path.is_file():
            return None
        rec = json.loads(path.read_text())
        spec, _ = self.derived(cell, seed)
        if "recipe" in rec["config"]:
            same = rec["config"]["recipe"] == C.recipe(spec)
        elif self.adopts(cell):
            same = rec["config"]["sha256"] == _sha256(self.base_path)
        else:
            import hashlib

            same = rec["config"]["sha256"] == hashlib.sha256(yaml.safe_dump(spec, sort_keys=True).encode()).hexdigest()
        return None if same else f"made under another config than {_rel(self.base_path)}'s current one"

    def cell_config(self, cell: C.Cell, seed: int) -> tuple[PipelineConfig, Path, dict[str, Any]]:
        if self.adopts(cell):
            cfg = self.cfg.with_seed(seed)
            return cfg, self.base_path, {"seed": seed, "artifacts": _rel(cfg.artifacts),
                                         "as": f"mmrec run --config {_rel(self.base_path)} --seed {seed}"}
        cdir = self.cell_dir(cell, seed)
        cdir.mkdir(parents=True, exist_ok=True)
        demo = C.demo_spec(self.cfg, cell, self.quick)
        spec, demo_dir = self.derived(cell, seed)
        if demo_dir is not None and not (demo_dir / ".complete").is_file():
            from mmrec.data.synthetic import DemoConfig, generate_demo

            # deterministic: the same spec writes the same files
            generate_demo(DemoConfig.from_dict(demo), demo_dir, progress=False)
            (demo_dir / ".complete").write_text(json.dumps(demo, sort_keys=True))
        text = yaml.safe_dump(spec, sort_keys=True)
        path = cdir / "config.yaml"
        if not path.is_file() or path.read_text() != text:
            path.write_text(text)
        return load_config(path), path, {"demo": demo}

    def _data_stages(self, cfg: PipelineConfig, until: str = DATA_STAGES[-1]) -> None:
        """raw_catalog, validated_catalog and item_features (up to ``until``) of every domain, run
        once per key in ``shared/`` and linked into the cell's artifacts (the stages read them through
        the link)."""
        import dataclasses as dc

        model = cfg.model()
        for d in cfg.domains:
            key = {"source": C.plain(d.source), "name": d.name}
            upstream: Path | None = None
            for stage in DATA_STAGES[:DATA_STAGES.index(until) + 1]:
                if stage == "validated_catalog":
                    key = {**key, "validation": C.plain(d.validation), "preprocess": C.plain(cfg.preprocess),
                           "user_fraction": d.user_fraction}
                elif stage == "item_features":
                    key = {**key, "text": C.plain(model.text_encoder), "image": C.plain(model.image_encoder),
                           "modalities": list(model.item_tower.modalities), "features": C.plain(cfg.features())}
                root = self.work / "shared" / stage / f"{d.name}-{C.digest(key)}"
                if upstream is not None:
                    _link(root / upstream.parent.name / d.name, upstream)
                done = root / stage / d.name
                if not (done / DONE_FILE[stage]).is_file():
                    self.log(f"[experiments] {stage} {d.name} -> {root.relative_to(self.work)}")
                    stages.STAGE_FUNCTIONS[stage](dc.replace(cfg, artifacts=root), d.name, progress=False)
                _link(cfg.artifact_path(stage, d.name), done)
                upstream = done

    def run_cell(self, cell: C.Cell, seed: int) -> Path:
        import torch

        torch.set_num_threads(self.threads)
        started = time.time()
        cfg, cfg_path, extra = self.cell_config(cell, seed)
        adopted = self.adopts(cell)
        if adopted:
            self.log(f"[experiments] {cell.name} seed {seed}: {extra['as']} (artifacts {extra['artifacts']})")
            for d in cfg.domains:  # what `mmrec run` would do, minus the data stages already done
                for stage in DATA_STAGES:
                    if not (cfg.artifact_path(stage, d.name) / DONE_FILE[stage]).is_file():
                        stages.STAGE_FUNCTIONS[stage](cfg, d.name, progress=False)
        else:
            (self.work / "runs").mkdir(parents=True, exist_ok=True)
            _link(cfg.artifacts / "runs", self.work / "runs")
            self.log(f"[experiments] {cell.name} seed {seed}: {cfg_path.relative_to(self.out.parent) if self.out.parent in cfg_path.parents else cfg_path}")
            self._data_stages(cfg)
        cost = CostTracker()
        pre = None
        if stages.stage_domains(cfg, "pretrained_model"):
            pre = stages.pretrained_model(cfg, progress=False, tracker=cost)
        targets: dict[str, Any] = {}
        for domain in stages.stage_domains(cfg, "finetuned_model"):
            ft = stages.finetuned_model(cfg, domain, progress=False, tracker=cost)
            ev = stages.evaluation(cfg, domain, progress=False)
            targets[domain] = self._target_record(cfg, cell, seed, domain, ft.metadata, ev.metadata, cost)
        record = {
            "cell": cell.name, "group": cell.group, "label": cell.label, "value": cell.value, "seed": seed,
            "base_config": os.path.relpath(self.base_path, REPO), "quick": self.quick,
            "config": {"path": _rel(cfg_path), "sha256": _sha256(cfg_path), "recipe": C.recipe(self.derived(cell, seed)[0]),
                       "overrides": cell.overrides,
                       "source_fraction": cell.source_fraction, "target_fraction": cell.target_fraction, **extra},
            **self.code,
            "threads": self.threads,
            "adopted": adopted,
            "targets": targets,
            "pretrained": None if pre is None else {
                "valid_metrics": pre.metadata["valid_metrics"], "best_step": pre.metadata["best_step"],
                "steps": pre.metadata["steps"],
                "cost": cost.cost("pretrained", _source_rows(cfg), Path(pre.metadata["run_dir"])),
                "run_dir": _rel(Path(pre.metadata["run_dir"])), "trained_by": pre.metadata.get("code", [])},
            "started": started, "seconds": time.time() - started,
        }
        path = self.record_path(cell, seed)
        for problem in add_valid_ranks(record, cfg, path.with_name(path.name[:-len(".json")])):
            self.log(f"[experiments] {cell.name} seed {seed}: validation ranks: {problem}")
        write_json(path, record)  # temp file + rename: a record is whole or absent
        return path

    def _target_record(self, cfg: PipelineConfig, cell: C.Cell, seed: int, domain: str, ft: dict, ev: dict,
                       cost: CostTracker) -> dict[str, Any]:
        import numpy as np
        import polars as pl

        from mmrec.compare import per_user
        from mmrec.data.sequences import SequenceData

        splits = pl.read_parquet(cfg.artifact_path("validated_catalog", domain) / "splits.parquet")
        n_items = pl.read_parquet(cfg.artifact_path("validated_catalog", domain) / "item_map.parquet").height
        data = SequenceData.from_splits(splits, n_items)
        flat = np.asarray([i for seq in data.train for i in seq], dtype=np.int64)
        target_count = np.bincount(flat, minlength=n_items + 1)[data.test.numpy()]  # (U,) test target's training occurrences
        cold = target_count == 0  # (U,) the test target never occurs in training (SequenceData.cold_items)
        ranks = stages.read_ranks(cfg, domain)
        recbole = None
        if cell.recbole and self.recbole:
            from mmrec import recbole as rb

            self.log(f"[experiments] {cell.name} seed {seed}: RecBole SASRec on {domain}")
            r = rb.run(cfg, domain, threads=self.threads, quiet=True)
            ranks[rb.NAME] = rb.read_ranks(cfg, domain)[rb.NAME]
            recbole = r
        ranks_path = self.records / f"{cell.name}-seed{seed}{'' if len(cfg.targets) == 1 else '-' + domain}.ranks.parquet"
        frame = pl.DataFrame({"user_idx": list(range(data.n_users)), "cold": cold.tolist(),
                              "target_train_count": target_count.tolist(),
                              **{n: r.tolist() for n, r in ranks.items()}})
        tmp = ranks_path.with_name("." + ranks_path.name + ".tmp")
        frame.write_parquet(tmp)
        tmp.replace(ranks_path)
        n_rows = sum(1 for s in data.train if len(s) >= 2)
        variant_of = {"finetuned": "model", "scratch": "scratch", "sasrec": "sasrec", "id_tower": "id_tower"}
        models: dict[str, Any] = {}
        for name, r in ranks.items():
            is_recbole = recbole is not None and name == recbole["model"]
            m: dict[str, Any] = {"test": recbole["test"] if is_recbole else ev["models"].get(name)}
            for subset, mask in (("warm", ~cold), ("cold", cold)):
                m[subset] = {"n_users": int(mask.sum()),
                             **{k: (float(per_user(r[mask], k).mean()) if mask.any() else None) for k in KS_REPORTED}}
            m["by_target_frequency"] = {}
            for low, high in FREQUENCY_BUCKETS:
                mask = (target_count >= low) & (target_count <= (np.inf if high is None else high))
                m["by_target_frequency"][bucket_name(low, high)] = {
                    "n_users": int(mask.sum()),
                    **{k: (float(per_user(r[mask], k).mean()) if mask.any() else None) for k in KS_REPORTED}}
            if name in variant_of:
                info = ft["variants"][variant_of[name]]
                m["valid"] = info["valid_metrics"]
                m["best_step"], m["steps"], m["stopped_early"] = info["best_step"], info["steps"], info["stopped_early"]
                m["cost"] = cost.cost(variant_of[name], n_rows, Path(info["run_dir"]))
                m["run_dir"] = _rel(Path(info["run_dir"]))
                m["trained_by"] = info.get("code", [])  # [] = trained before the code was recorded
            elif is_recbole:
                rb_rec = recbole["recbole"]
                m["valid"] = recbole["valid"]
                m["cost"] = {"trained_here": True, "train_seconds_per_epoch": rb_rec.get("seconds_per_epoch"),
                             "epochs": rb_rec.get("epochs_trained"), "note": "RecBole's own timing (training only; "
                             "its epoch is every prefix of every training sequence)"}
            models[name] = m
        return {
            "n_users": data.n_users, "n_cold_users": int(cold.sum()), "n_items": n_items, "train_rows": n_rows,
            "models": models, "gate": ev["gate"],
            "ranks": {"path": _rel(ranks_path), "sha256": _sha256(ranks_path),
                      "source": _rel(cfg.artifact_path("evaluation", domain) / stages.RANKS)},
            "metrics_json": _rel(cfg.artifact_path("evaluation", domain) / stages.METRICS),
        }


def _source_rows(cfg: PipelineConfig) -> int:
    import polars as pl

    n = 0
    for d in cfg.sources:
        train = pl.read_parquet(cfg.artifact_path("validated_catalog", d.name) / "splits.parquet")["train"]
        n += int((train.list.len() >= 2).sum())
    return n


def _link(link: Path, target: Path) -> None:
    """``link`` -> ``target`` as a relative symlink (replacing a stale one)."""
    link.parent.mkdir(parents=True, exist_ok=True)
    rel = os.path.relpath(target, link.parent.resolve())
    if link.is_symlink():
        if os.readlink(link) == rel:
            return
        link.unlink()
    elif link.exists():
        raise FileExistsError(f"{link} exists and is not a link to {target}")
    link.symlink_to(rel, target_is_directory=True)


def _rel(path: Path) -> str:
    path = Path(path).resolve()
    return os.path.relpath(path, REPO) if REPO in path.parents else str(path)


def _sha256(path: Path) -> str:
    import hashlib

    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


# -- command line --------------------------------------------------------------------------------

def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m experiments", description=(
        "Run the experiment cells of a base config for the given seeds (resumable: a cell whose record exists is "
        "skipped) and regenerate docs/RESULTS.md and the figures from every record."))
    p.add_argument("--config", default="configs/demo.yaml", help="base pipeline config (default configs/demo.yaml)")
    p.add_argument("--seed", dest="seeds", type=int, action="append", help="seed (repeatable; default: the config's "
                   "fine-tuning seed)")
    p.add_argument("--quick", action="store_true", help="every cell at toy size on the built-in demo data (tests the "
                   "script, not the numbers)")
    p.add_argument("--cells", nargs="+", action="extend", help=f"only these cells or groups (repeatable) ({', '.join(C.GROUPS)})")
    p.add_argument("--out", default="artifacts/experiments", help="work folder (artifacts, shared data, runs)")
    p.add_argument("--records", help="record folder (default docs/results/<config name>/records)")
    p.add_argument("--docs", default="docs", help="where RESULTS.md and results/*.png go (default docs)")
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads (default 1)")
    p.add_argument("--recbole", choices=("auto", "on", "off"), default="auto", help="RecBole's SASRec in the transfer "
                   "and target-fraction cells: auto = when .venv-recbole exists (never with --quick)")
    p.add_argument("--plan-only", action="store_true", help="write the plan (and the report) without running a cell")
    p.add_argument("--report-only", action="store_true", help="only regenerate the report from the records")
    p.add_argument("--valid-ranks-only", action="store_true", help="add the per-user validation ranks to the records "
                   "in --records that have none (made before records held them), from the artifacts each names while "
                   "those still hold its models; then regenerate the report")
    return p


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    command = "python -m experiments " + " ".join(argv)
    from experiments import report

    os.environ.setdefault("TQDM_DISABLE", "1")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    name = Path(args.config).stem + ("-quick" if args.quick else "")
    docs = Path(args.docs)
    records = Path(args.records) if args.records else docs / "results" / name / "records"
    status = 0
    if args.valid_ranks_only:
        backfill_valid_ranks(records, log=lambda m: print(m, file=sys.stderr, flush=True))
    elif not args.report_only:
        runner = Runner(Path(args.config), Path(args.out), records, quick=args.quick, threads=args.threads,
                        recbole=args.recbole, log=lambda m: print(m, file=sys.stderr, flush=True))
        seeds = args.seeds or [runner.cfg.train("finetune").seed]
        if args.plan_only:
            runner.write_plan(seeds, *runner.plan(seeds, args.cells), command=command)
        else:
            try:
                runner.run(seeds, args.cells, command)
            except RuntimeError as exc:
                print(f"experiments: {exc}", file=sys.stderr)
                status = 1
    dirs = sorted(p.parent for p in (docs / "results").glob("*/records/plan.json"))
    if records.resolve() not in [d.resolve() for d in dirs] and (records / "plan.json").is_file():
        dirs.append(records)
    written = report.write_report(docs, dirs)
    print(f"wrote {written}", file=sys.stderr)
    return status
