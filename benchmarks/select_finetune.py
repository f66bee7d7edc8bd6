"""Try recipe changes for the fine-tuned content model on the validation split (issue: close the gap).

Loads the pretrained model of ``--config`` for each ``--seed`` (``pretrained_model`` must have run
for it: the configured seed's artifacts, or ``<artifacts>-seed<N>`` as ``mmrec run --seed N`` writes
them), applies each ``--variant`` (a name and ``section.key=value`` overrides of the model /
finetune sections, YAML values) and fine-tunes it on one target domain exactly as
``finetuned_model`` does (same transfer part, data, seed and early stopping). Prints each variant's
best validation metrics per seed, their mean, and the paired gap to the first variant with a 95 %
bootstrap interval over validation users (per-user NDCG@10 averaged over the seeds). Reads the
validation split only; a change that wins here over several seeds goes into the config, and the test
split is read once by the ``evaluation`` of the run that uses it.

    .venv/bin/python benchmarks/select_finetune.py --config configs/real.yaml --domain movielens_100k \\
        --seed 0 --seed 1 --seed 2 --variant base --variant full_softmax model.objective.name=full_softmax

A variant whose encoders differ from the base config's (``model.text_encoder.trainable_layers=1``: the
top MiniLM layer trained in fine-tuning, from the states below it) gets the target's item features built
again for its config through the feature cache; the pretrained weights load unchanged (the exported
model holds every encoder weight). One seed's validation gain is not evidence: on MovieLens-100K a +0.9 NDCG@10 win of seed 0 did not
hold on seed 3 (configs/real.yaml). Overrides that change parameter shapes (dim, layers) cannot load
the pretrained weights and fail. Records go to ``<records>/<domain>/<variant>-seed<N>.json`` (default
``--records docs/results/selection/<config name>``, kept in git: ``docs/RESULTS.md`` renders them
under "Fine-tuning recipe selection") with the command, commit, config digest and the per-user
validation ranks; a finished one is read back, never refitted. A record also names the digest of the
pretrained model it was fine-tuned from: pretraining made again (another feature cache, another machine:
float rounding alone moves a run) gives another model, and a record of the old one is refused rather
than paired with variants fitted from the new one (give another ``--records`` folder for the new set), and
the digest of the recipe it resolved to (model and fine-tuning sections after presets and overrides): a record
fitted before the base config or a preset it reads changed is refused too.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses as dc
import hashlib
import json
import os
import sys
import time
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def _shown(path: Path) -> str:
    """``path`` relative to the repository when it is inside it (records name no machine's folders)."""
    path = Path(path).resolve()
    return os.path.relpath(path, REPO) if REPO in path.parents else str(path)


def _feature_key(model_cfg) -> tuple:
    """What a model's cached item features depend on: its encoders and the modalities its tower reads."""
    return (model_cfg.text_encoder, model_cfg.image_encoder, tuple(model_cfg.item_tower.modalities))


def _pretrained_digest(folder: Path) -> str:
    """sha256 of a pretrained model's weights and config (what a fine-tuned variant starts from)."""
    h = hashlib.sha256()
    for part in ("model.json", "model.safetensors"):
        h.update((Path(folder) / part).read_bytes())
    return h.hexdigest()


def _recipe_digest(cfg, overrides: list[str]) -> str:
    """sha256 of everything a variant's fine-tuning resolves to (the model and training sections after
    presets and overrides, the transfer part, the ranking protocol): a record is read back only under the
    recipe it was fitted with, so a changed base config or preset (``preset: ../real.yaml``) is noticed."""
    from mmrec import stages

    cfg = dc.replace(cfg, sections=_apply(cfg.sections, overrides))
    mcfg, part, _ = stages._variants(cfg)["model"]  # noqa: SLF001
    train = {k: v for k, v in dc.asdict(cfg.train("finetune")).items() if k != "progress"}
    spec = {"model": mcfg.to_dict(), "part": part, "train": train, "transfer": dc.asdict(cfg.transfer()),
            "history": cfg.evaluation().history}
    return hashlib.sha256(json.dumps(spec, sort_keys=True, default=str).encode()).hexdigest()


def _apply(sections: dict, overrides: list[str]) -> dict:
    out = copy.deepcopy(sections)
    for o in overrides:
        key, _, value = o.partition("=")
        if not _:
            raise SystemExit(f"override {o!r}: expected section.key=value")
        *path, leaf = key.split(".")
        node = out
        for part in path:
            node = node.setdefault(part, {})
        node[leaf] = yaml.safe_load(value)
    return out


def _fit_variant(cfg, name: str, pretrained: Path, overrides: list[str]) -> dict:
    """Fine-tune one variant as ``finetuned_model`` does; its best validation metrics and per-user ranks."""
    import torch
    from safetensors.torch import load_file

    from mmrec import stages
    from mmrec.experiment import evaluate_model
    from mmrec.models.recommender import Recommender
    from mmrec.transfer import load_part
    from select_sasrec import timed_fit  # this folder is on sys.path when run as a script

    content, data = stages._domain_data(cfg, name)  # noqa: SLF001
    built_with = cfg.model()  # the model config the item_features artifact was built with
    cfg = dc.replace(cfg, sections=_apply(cfg.sections, overrides))
    mcfg, part, _ = stages._variants(cfg)["model"]  # noqa: SLF001 (the stage's own recipe)
    if _feature_key(mcfg) != _feature_key(built_with):
        # the variant's encoders read other frozen features (a trainable top text layer reads the states
        # below it): the target's features again for its config, through the feature cache
        from mmrec.data.catalog import Catalog
        from mmrec.features import build_item_features

        fc = cfg.features()
        catalog = Catalog.read(cfg.artifact_path("validated_catalog", name) / "catalog")
        content, _ = build_item_features(catalog, mcfg, cfg.resolve(fc.cache_dir), fc.text_batch_size,
                                         fc.image_batch_size, fc.num_workers, progress=False)
    tc = dc.replace(cfg.train("finetune"), progress=False)
    torch.manual_seed(tc.seed)
    model = Recommender(mcfg, n_items=content.n_items)
    load_part(model, load_file(pretrained), part)
    if cfg.transfer().freeze_user_encoder_except_adapters:
        model.user_encoder.freeze_for_adapters()
    model.attach(content, data.train_examples(mcfg.max_len), tc.seed)
    rec = {"overrides": overrides, "transfer": part, **timed_fit(model, data, cfg, tc)}
    ec = cfg.evaluation()
    got: dict = {}
    evaluate_model(model, data, "valid", ec.ks, ec.batch_size, ec.history, ranks_out=got)  # the best weights
    rec["valid_ranks"] = got["ranks"].tolist()
    return rec


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config", default="configs/real.yaml")
    p.add_argument("--domain", required=True)
    p.add_argument("--variant", nargs="+", action="append", required=True, metavar="NAME [KEY=VALUE ...]")
    p.add_argument("--seed", dest="seeds", type=int, action="append",
                   help="fine-tuning seed (repeatable; default: the config's); each reads its own pretrained model")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--metric", default="NDCG@10")
    p.add_argument("--records", type=Path, help="record folder (default docs/results/selection/<config name>)")
    args = p.parse_args(argv)
    argv = list(sys.argv[1:] if argv is None else argv)

    import numpy as np
    import torch

    from mmrec.compare import compare_ranks
    from mmrec.config import load_config
    from mmrec.io import write_json
    from mmrec.tracking import code_version

    torch.set_num_threads(args.threads)
    base = load_config(args.config)
    records = args.records or REPO / "docs" / "results" / "selection" / Path(args.config).stem
    code = code_version(("mmrec", "benchmarks", "configs"), REPO)  # the code this process runs: taken at its start
    name = base.domain(args.domain).name
    seeds = args.seeds or [base.train("finetune").seed]
    if len(set(seeds)) != len(seeds):
        raise SystemExit(f"--seed given twice: {seeds}")
    names = [v[0] for v in args.variant]
    if len(set(names)) != len(names):
        raise SystemExit(f"variant names must be unique, got {names}")
    cfgs = {s: base if s == base.train("finetune").seed else base.with_seed(s) for s in seeds}
    for s, cfg in cfgs.items():
        if not (cfg.artifact_path("pretrained_model") / "model.safetensors").is_file():
            raise SystemExit(f"seed {s}: {cfg.artifact_path('pretrained_model')}: run `mmrec run --config "
                             f"{args.config} --seed {s}` (or its pretrained_model stage) first")
    digests = {s: _pretrained_digest(cfg.artifact_path("pretrained_model")) for s, cfg in cfgs.items()}
    recs: dict[str, dict[int, dict]] = {}
    for variant, *overrides in args.variant:
        for seed, cfg in cfgs.items():
            record_path = records / name / f"{variant}-seed{seed}.json"
            rec = json.loads(record_path.read_text()) if record_path.is_file() else None
            if rec is not None and rec["config"].get("pretrained_sha256") != digests[seed]:
                was = rec["config"].get("pretrained_sha256")
                raise SystemExit(
                    f"{record_path}: fine-tuned from another pretrained model (recorded "
                    f"{was[:12] if was else 'no digest'}, {_shown(cfg.artifact_path('pretrained_model'))} is now "
                    f"{digests[seed][:12]}): its validation ranks do not pair with a variant fitted now; give another "
                    "--records folder for this set of pretrained models")
            recipe = _recipe_digest(cfg, overrides)
            if rec is not None and rec["overrides"] == overrides and rec["config"].get("recipe_sha256") != recipe:
                raise SystemExit(
                    f"{record_path}: fitted under another fine-tuning recipe (the config or a preset it reads changed "
                    f"since{'' if rec['config'].get('recipe_sha256') else ', or the record predates recipe digests'}): "
                    "its validation ranks do not pair with a variant fitted now; give another --records folder")
            if rec is not None and rec["overrides"] != overrides:
                raise SystemExit(f"{record_path}: recorded with {rec['overrides']}, asked {overrides}: rename the variant")
            if rec is not None and rec["config"]["path"] != _shown(Path(args.config)):
                raise SystemExit(f"{record_path}: recorded from {rec['config']['path']}, asked {args.config}: "
                                 "give another --records")
            if rec is None:
                started = time.time()
                fit = _fit_variant(cfg, name, cfg.artifact_path("pretrained_model") / "model.safetensors", overrides)
                rec = {"script": "benchmarks/select_finetune.py",
                       "command": "python benchmarks/select_finetune.py " + " ".join(argv),
                       **code,
                       "time_utc": time.strftime("%Y-%m-%d %H:%M", time.gmtime(started)),
                       "config": {"path": _shown(Path(args.config)),
                                  "sha256": hashlib.sha256(Path(args.config).read_bytes()).hexdigest(),
                                  "pretrained": _shown(cfg.artifact_path("pretrained_model")),
                                  "pretrained_sha256": digests[seed],
                                  "recipe_sha256": recipe},
                       "domain": name, "variant": variant, "seed": seed, "metric_split": "valid", **fit}
                write_json(record_path, rec)  # temp file + rename
            recs.setdefault(variant, {})[seed] = rec
            print(f"{variant} seed {seed} {' '.join(overrides)}: valid {args.metric} "
                  f"{100 * rec['valid'][args.metric]:.2f} (best step {rec['best_step']} of {rec['steps']}, "
                  f"{rec['seconds_per_epoch_incl_validation']:.2f} s/epoch incl. validation)", flush=True)

    ref = names[0]
    print(f"\nvalid {args.metric} (%), seeds {seeds}; gap: paired over validation users (seeds averaged per "
          f"user), 95 % bootstrap interval, against {ref!r}")
    print("| variant | overrides | " + " | ".join(f"seed {s}" for s in seeds) + " | mean | gap to " + ref + " |")
    print("|---|---|" + "---|" * len(seeds) + "---|---|")
    for variant, *overrides in args.variant:
        by_seed = recs[variant]
        vals = [100 * by_seed[s]["valid"][args.metric] for s in seeds]
        gap = "-"
        if variant != ref:
            g = compare_ranks([np.asarray(by_seed[s]["valid_ranks"]) for s in seeds],
                              [np.asarray(recs[ref][s]["valid_ranks"]) for s in seeds], args.metric, variant, ref)
            gap = f"{100 * g.gap:+.2f} [{100 * g.low:+.2f}, {100 * g.high:+.2f}]"
        print(f"| {variant} | {' '.join(overrides) or '-'} | " + " | ".join(f"{v:.2f}" for v in vals) +
              f" | {np.mean(vals):.2f} | {gap} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
