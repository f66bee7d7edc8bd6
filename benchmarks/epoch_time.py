"""Seconds per training epoch: mmrec's models against RecBole 1.2.1's SASRec on the same split, machine and threads.

An epoch is one pass over the training split in both: every training interaction after a user's
first is a next-item target once (RecBole trains on each prefix of a sequence; mmrec's causal user
encoders score every position of one row per user; with mmrec's preprocessing a training sequence
has at most L + 1 items, so the two see the same targets). Only the optimizer steps are timed:
mmrec's from the trainer's per-step hook (validation excluded), RecBole's from its `_train_epoch`
(evaluation excluded, benchmarks/recbole_sasrec.py). Each model trains ``--epochs`` epochs from
scratch with the fine-tuning section's batch size (RecBole: its default 2048); the first epoch is
kept (a warm-up is part of real runs too). Nothing here reads the test split for a choice: the
models' metrics are not the point and are not printed.

    .venv/bin/python benchmarks/epoch_time.py --config configs/amazon.yaml --domain amazon_instrument \\
        --threads 1 --epochs 2

Needs ``validated_catalog`` and ``item_features`` of the domain and, for the RecBole row,
``.venv-recbole`` (`make compare` builds it). Prints a table; writes
``<artifacts>/bench/epoch_time-<domain>-t<threads>.json`` and the same file into
``docs/results/<config name>/bench/`` (``--records``), from which ``python -m experiments
--report-only`` puts it into docs/RESULTS.md. Commit that record only from a run on an otherwise
idle machine.
"""

from __future__ import annotations

import argparse
import dataclasses as dc
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def time_ours(cfg, name: str, variant, content, data, epochs: int) -> dict:
    """Train one of ``finetuned_model``'s variants from scratch for ``epochs`` epochs; seconds spent in
    optimizer steps only."""
    import torch

    from mmrec.experiment import fit
    from mmrec.models.recommender import Recommender

    mcfg, _part, overrides = variant
    tc = dc.replace(cfg.train("finetune"), **overrides, epochs=epochs, patience=epochs + 1, progress=False)
    torch.manual_seed(tc.seed)
    model = Recommender(mcfg, n_items=content.n_items)
    model.attach(content, data.train_examples(mcfg.max_len), tc.seed)
    steps: list[float] = []
    clock = {"t": time.perf_counter()}

    def hook(event: str, step: int) -> None:
        now = time.perf_counter()
        if event == "step":
            steps.append(now - clock["t"])
        clock["t"] = now  # a validation or checkpoint between two steps is not counted

    ec = cfg.evaluation()
    with tempfile.TemporaryDirectory() as tmp:
        clock["t"] = time.perf_counter()
        res = fit(model, data, tc, Path(tmp), ks=ec.ks, batch_size=ec.batch_size, history=ec.history, hook=hook)
    per_epoch = len(steps) / max(res.epochs_run, 1e-9)
    return {"model": name, "batch_size": tc.batch_size, "epochs": res.epochs_run, "steps": len(steps),
            "steps_per_epoch": per_epoch, "train_seconds": sum(steps),
            "seconds_per_epoch": sum(steps) / max(res.epochs_run, 1e-9),
            "parameters_trained": sum(p.numel() for p in model.parameters() if p.requires_grad)}


def time_recbole(cfg, domain: str, python: Path, threads: int, epochs: int) -> dict:
    """RecBole's stock SASRec for ``epochs`` epochs (no early stop) on the same split."""
    import polars as pl

    from mmrec.recbole import RUNNER, write_atomic_files

    splits = pl.read_parquet(cfg.artifact_path("validated_catalog", domain) / "splits.parquet")
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        write_atomic_files(splits, work / "data", domain)
        cmd = [str(python), str(RUNNER), "--data", str(work / "data"), "--dataset", domain, "--out", str(work / "run"),
               "--seed", str(cfg.train("finetune").seed), "--max-len", str(cfg.model().max_len),
               "--threads", str(threads), "--epochs", str(epochs), "--stopping-step", str(epochs + 1)]
        proc = subprocess.run(cmd, capture_output=True, text=True, cwd=work)
        if proc.returncode != 0:
            raise SystemExit(f"RecBole failed (exit {proc.returncode}): {' '.join(cmd)}\n{proc.stderr[-2000:]}")
        rec = json.loads((work / "run" / "recbole.json").read_text())
    return {"model": "recbole_sasrec", "batch_size": 2048, "epochs": rec["epochs_trained"],
            "seconds_per_epoch": rec["seconds_per_epoch"], "train_seconds": rec["seconds_per_epoch"] * rec["epochs_trained"]}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config", default="configs/amazon.yaml")
    p.add_argument("--domain", required=True)
    p.add_argument("--models", nargs="+", default=["model", "sasrec"],
                   help="finetuned_model's variants to time (model = the content model; scratch, sasrec, id_tower)")
    p.add_argument("--epochs", type=int, default=2)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--records", help="folder that also gets the record, for docs/RESULTS.md (default "
                   "docs/results/<config name>/bench; '' for none)")
    p.add_argument("--recbole-python", default=str(REPO / ".venv-recbole" / "bin" / "python"),
                   help="RecBole's environment (`make compare` builds it); the RecBole row is skipped when missing")
    args = p.parse_args(argv)

    import torch

    from mmrec import stages
    from mmrec.config import load_config
    from mmrec.io import write_json

    torch.set_num_threads(args.threads)
    cfg = load_config(args.config)
    name = cfg.domain(args.domain).name
    variants = stages._variants(cfg)  # noqa: SLF001 (the stage's own recipes)
    unknown = [m for m in args.models if m not in variants]
    if unknown:
        raise SystemExit(f"--models {unknown}: not among this config's variants {sorted(variants)}")
    content, data = stages._domain_data(cfg, name)  # noqa: SLF001
    targets = sum(max(len(s) - 1, 0) for s in data.train)
    rows = []
    for m in args.models:
        rows.append(time_ours(cfg, m, variants[m], content, data, args.epochs))
        print(f"{m}: {rows[-1]['seconds_per_epoch']:.2f} s/epoch", file=sys.stderr, flush=True)
    python = Path(args.recbole_python)
    if python.is_file():
        rows.append(time_recbole(cfg, name, python, args.threads, args.epochs))
        print(f"recbole_sasrec: {rows[-1]['seconds_per_epoch']:.2f} s/epoch", file=sys.stderr, flush=True)
    else:
        print(f"{python}: no RecBole environment (`make compare` builds it): RecBole row skipped", file=sys.stderr)
    ref = next((r["seconds_per_epoch"] for r in rows if r["model"] == "recbole_sasrec"), None)
    for r in rows:
        r["targets_per_second"] = targets / r["seconds_per_epoch"]
        r["share_of_recbole_epoch"] = r["seconds_per_epoch"] / ref if ref else None
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=REPO).stdout.strip()
    record = {"config": args.config, "domain": name, "threads": args.threads, "epochs": args.epochs,
              "users": data.n_users, "items": data.n_items, "train_targets_per_epoch": targets, "commit": commit,
              "load_average": os.getloadavg(), "rows": rows}
    out = cfg.artifacts / "bench" / f"epoch_time-{name}-t{args.threads}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    write_json(out, record)
    records = Path(REPO / "docs" / "results" / Path(args.config).stem / "bench") if args.records is None else (
        Path(args.records) if args.records else None)
    if records is not None:  # `make experiments` / `python -m experiments --report-only` put it in RESULTS.md
        records.mkdir(parents=True, exist_ok=True)
        write_json(records / out.name, record)
    print(f"## {name}: {data.n_users} users, {data.n_items} items, {targets} training targets an epoch; "
          f"{args.threads} thread(s), {args.epochs} epochs each, load average {record['load_average'][0]:.1f}")
    print("| model | batch | s/epoch (steps only) | targets/s | share of RecBole's epoch |")
    print("|---|---|---|---|---|")
    for r in rows:
        share = f"{r['share_of_recbole_epoch']:.2f}" if r["share_of_recbole_epoch"] is not None else "-"
        print(f"| {r['model']} | {r['batch_size']} | {r['seconds_per_epoch']:.2f} | {r['targets_per_second']:.0f} | {share} |")
    print(f"(record: {out})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
