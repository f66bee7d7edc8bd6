"""Choose the in-tree ID SASRec's lr and dropout (``evaluation.sasrec``) on the validation split.

Trains the ``sasrec`` baseline exactly as ``finetuned_model`` does (``mmrec.stages._variants``: ID
embeddings, full-catalog cross-entropy, the fine-tuning section's epochs, batch size, patience and
seed) for each point of a grid, on one target domain, and prints each point's best validation
metrics, steps and seconds. It reads the validation split only (early stopping and the choice);
the test split is read once, by the ``evaluation`` stage of the run that uses the chosen values.

    .venv/bin/python benchmarks/select_sasrec.py --config configs/real.yaml --domain movielens_100k \\
        --lr 0.001 0.003 --dropout 0.2 0.5 --seed 0 --threads 2

Needs ``validated_catalog`` and ``item_features`` of the domain. Writes one JSON record per point
under ``<artifacts>/select_sasrec/<domain>/`` (resumable: a finished point is read back).
"""

from __future__ import annotations

import argparse
import dataclasses as dc
import itertools
import json
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def timed_fit(model, data, cfg, tc) -> dict:
    """``fit`` as ``finetuned_model`` runs it (validation only), in a throw-away run folder; the
    record fields both selection scripts keep."""
    from mmrec.experiment import fit

    ec = cfg.evaluation()
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        res = fit(model, data, tc, Path(tmp), ks=ec.ks, batch_size=ec.batch_size, history=ec.history)
    secs = time.perf_counter() - t0
    return {"seed": tc.seed, "history": ec.history, "valid": res.best_metrics, "best_step": res.best_step,
            "steps": res.steps, "epochs_run": res.epochs_run, "stopped_early": res.stopped_early, "fit_seconds": secs,
            "seconds_per_epoch_incl_validation": secs / max(res.epochs_run, 1e-9)}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config", default="configs/real.yaml")
    p.add_argument("--domain", required=True)
    p.add_argument("--lr", type=float, nargs="+", default=[1e-3])
    p.add_argument("--dropout", type=float, nargs="+", default=[0.5])
    p.add_argument("--weight-decay", type=float, nargs="+", default=[0.0])
    p.add_argument("--seed", type=int, nargs="+", default=[0])
    p.add_argument("--epochs", type=int, nargs="+", default=[None],
                   help="epoch budget(s) (default: the fine-tuning section's); patience still stops early")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--metric", default="NDCG@10")
    args = p.parse_args(argv)

    import torch

    from mmrec import stages
    from mmrec.config import load_config
    from mmrec.io import write_json
    from mmrec.models.recommender import Recommender

    torch.set_num_threads(args.threads)
    base = load_config(args.config)
    name = base.domain(args.domain).name
    rows = []
    for lr, dropout, wd, epochs, seed in itertools.product(args.lr, args.dropout, args.weight_decay, args.epochs,
                                                           args.seed):
        cfg = base.with_seed(seed)
        if epochs is not None:
            cfg = dc.replace(cfg, sections={**cfg.sections, "finetune": {**cfg.sections.get("finetune", {}), "epochs": epochs}})
        epochs = cfg.train("finetune").epochs
        ev = dict(cfg.sections.get("evaluation") or {})
        ev["sasrec"] = {"lr": lr, "dropout": dropout, "weight_decay": wd}
        cfg = dc.replace(cfg, sections={**cfg.sections, "evaluation": ev})
        record_path = base.artifacts / "select_sasrec" / name / f"lr{lr:g}-do{dropout:g}-wd{wd:g}-ep{epochs}-seed{seed}.json"
        if record_path.is_file():
            rec = json.loads(record_path.read_text())
        else:
            mcfg, part, overrides = stages._variants(cfg)["sasrec"]  # noqa: SLF001 (the stage's own recipe)
            content, data = stages._domain_data(base, name)  # noqa: SLF001 (splits are seed-independent)
            tc = dc.replace(cfg.train("finetune"), progress=False, **overrides)
            torch.manual_seed(tc.seed)
            model = Recommender(mcfg, n_items=content.n_items)
            model.attach(content, data.train_examples(mcfg.max_len), tc.seed)
            rec = {"lr": lr, "dropout": dropout, "weight_decay": wd, "epochs": epochs, **timed_fit(model, data, cfg, tc),
                   "train": {k: v for k, v in dc.asdict(tc).items() if k != "progress"}}
            record_path.parent.mkdir(parents=True, exist_ok=True)
            write_json(record_path, rec)
        rows.append(rec)
        print(f"lr {lr:g} dropout {dropout:g} wd {wd:g} epochs {epochs} seed {seed}: valid {args.metric} "
              f"{100 * rec['valid'][args.metric]:.2f} HR@10 {100 * rec['valid']['HR@10']:.2f} "
              f"(best step {rec['best_step']} of {rec['steps']}, {rec['epochs_run']:.0f} epochs, "
              f"{rec['seconds_per_epoch_incl_validation']:.2f} s/epoch incl. validation)", flush=True)
    # mean over seeds per grid point; the best by validation
    points: dict[tuple, list] = {}
    for r in rows:
        points.setdefault((r["lr"], r["dropout"], r["weight_decay"], r["epochs"]), []).append(r["valid"][args.metric])
    print(f"\n| lr | dropout | weight decay | epochs | valid {args.metric} (mean over {len(args.seed)} seed(s)) |")
    print("|---|---|---|---|---|")
    for (lr, do, wd, ep), v in sorted(points.items(), key=lambda kv: -sum(kv[1]) / len(kv[1])):
        print(f"| {lr:g} | {do:g} | {wd:g} | {ep} | {100 * sum(v) / len(v):.2f} |")
    best = max(points, key=lambda k: sum(points[k]) / len(points[k]))
    print(f"\nchosen on validation: evaluation.sasrec = {{lr: {best[0]:g}, dropout: {best[1]:g}, weight_decay: {best[2]:g}}}, "
          f"epochs {best[3]}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
