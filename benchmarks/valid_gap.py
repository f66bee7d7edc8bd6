"""Paired validation gap between two experiment cells' fine-tuned models, over seeds.

A recipe choice that changes pretraining too (an objective, a tower) cannot be probed by
``select_finetune.py`` (which fine-tunes from one pretrained model); its evidence is the finished
runs of two ``python -m experiments`` cells. This reads each cell's record per seed, loads its
fine-tuned model's per-user *validation* ranks (``<record>.valid_ranks.parquet``, which
``python -m experiments`` writes beside each record; for an older record without them it loads the
fine-tuned model, the early-stopping best, from the artifacts and ranks every validation user under the
config's protocol) and prints the per-seed valid metric, the means and the paired gap of each cell
to the first one with a 95 % bootstrap interval over users (seeds averaged per user). It never
reads the test split, so it may select::

    python benchmarks/valid_gap.py --records docs/results/real/records --domain movielens_100k \\
        --cell transfer --cell objective-next-item --seed 0 --seed 1 --seed 2

``--pretraining`` (in place of ``--domain``) compares the cells' pretrained models instead, on the
sources' validation split (what ``pretrained_model`` early-stops on); the record's pretraining valid
metric is reproduced the same way.

A cell may name another record folder as ``CELL@FOLDER``: a probe config's runs (``configs/probes/``,
run by ``python -m experiments --config configs/probes/X.yaml --records docs/results/probes/X/records``)
against the base config's cell of the same seeds::

    python benchmarks/valid_gap.py --domain movielens_100k --cell transfer \\
        --cell transfer@docs/results/probes/real-moe/records --seed 0 --seed 1 --seed 2
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # experiments/, when run as a script


def valid_ranks(record: dict, domain: str | None, threads: int = 1):
    """Each validation user's rank of their validation target under the record's config, from the models
    still in the artifacts folder its evaluation names (``experiments.run.validation_ranks``): the
    fine-tuned model on target ``domain``, or (``domain`` None) the pretrained model on the sources."""
    import dataclasses as dc

    import torch

    from experiments.run import PRETRAINED, validation_ranks
    from mmrec.config import load_config

    torch.set_num_threads(threads)
    path = Path(record["config"]["path"])
    metrics = Path(next(iter(record["targets"].values()))["metrics_json"])
    root = (metrics if metrics.is_absolute() else REPO / metrics).parent.parent.parent
    cfg = dc.replace(load_config(path if path.is_absolute() else REPO / path), artifacts=root)
    return validation_ranks(cfg, domain)[PRETRAINED if domain is None else "finetuned"]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--records", type=Path, default=REPO / "docs" / "results" / "real" / "records")
    p.add_argument("--domain", help="target domain: its fine-tuned models on its validation split")
    p.add_argument("--pretraining", action="store_true", help="instead: the pretrained models on the sources' "
                   "validation split (what pretrained_model early-stops on)")
    p.add_argument("--cell", dest="cells", action="append", required=True,
                   help="cell name, or CELL@RECORDS_FOLDER for another folder's record (repeatable; the first is the reference)")
    p.add_argument("--seed", dest="seeds", type=int, action="append", required=True)
    p.add_argument("--metric", default="NDCG@10")
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args(argv)

    import numpy as np

    from experiments.report import recorded_valid_ranks
    from mmrec.compare import compare_ranks, per_user

    if args.pretraining == bool(args.domain):
        raise SystemExit("give --domain (fine-tuned models) or --pretraining (pretrained models), one of them")
    if len(args.cells) < 2 or len(set(args.cells)) != len(args.cells):
        raise SystemExit(f"--cell: two or more distinct cells, got {args.cells}")
    ranks: dict[str, list] = {}
    values: dict[str, list[float]] = {}
    for cell in args.cells:
        name, at, folder = cell.partition("@")
        records = Path(folder) if at else args.records
        if at and not records.is_dir():
            raise SystemExit(f"--cell {cell}: no record folder {records}")
        for seed in args.seeds:
            path = records / f"{name}-seed{seed}.json"
            if not path.is_file():
                raise SystemExit(f"{path}: no record (python -m experiments --cells {name} --seed {seed})")
            record = json.loads(path.read_text())
            domain = None if args.pretraining else args.domain
            if args.pretraining:
                if not record.get("pretrained"):
                    raise SystemExit(f"{path}: no pretrained model (a cell without a source)")
                stored = record["pretrained"].get("valid_metrics", {}).get(args.metric)
            else:
                if args.domain not in record["targets"]:
                    raise SystemExit(f"{path}: no target {args.domain!r}; targets {sorted(record['targets'])}")
                stored = record["targets"][args.domain]["models"]["finetuned"].get("valid", {}).get(args.metric)
            r = recorded_valid_ranks(record, domain, "pretrained" if args.pretraining else "finetuned")
            if r is None:  # a record without validation ranks: rank with its models, if the folder still has them
                metrics, r = valid_ranks(record, domain, args.threads)
            else:
                metrics = {args.metric: float(np.mean(per_user(np.asarray(r), args.metric)))}
            if stored is not None and abs(stored - metrics[args.metric]) > 1e-6:
                raise SystemExit(f"{path}: the model's valid {args.metric} {metrics[args.metric]:.6f} is not the "
                                 f"record's {stored:.6f}: the folder holds another run now")
            ranks.setdefault(cell, []).append(np.asarray(r))
            values.setdefault(cell, []).append(100 * metrics[args.metric])
            print(f"{cell} seed {seed}: valid {args.metric} {100 * metrics[args.metric]:.2f}", flush=True)
    ref = args.cells[0]
    where = "pretrained models on the sources" if args.pretraining else f"fine-tuned models on {args.domain}"
    print(f"\n{where}: valid {args.metric} (%), seeds {args.seeds}; gap: paired over validation users (seeds averaged per "
          f"user), 95 % bootstrap interval, against {ref!r}")
    print("| cell | " + " | ".join(f"seed {s}" for s in args.seeds) + " | mean | gap to " + ref + " |")
    print("|---|" + "---|" * len(args.seeds) + "---|---|")
    for cell in args.cells:
        gap = "-"
        if cell != ref:
            g = compare_ranks(ranks[cell], ranks[ref], args.metric, cell, ref)
            gap = f"{100 * g.gap:+.2f} [{100 * g.low:+.2f}, {100 * g.high:+.2f}]"
        print(f"| {cell} | " + " | ".join(f"{v:.2f}" for v in values[cell]) + f" | {np.mean(values[cell]):.2f} | {gap} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
