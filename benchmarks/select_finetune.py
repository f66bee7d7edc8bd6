"""Try recipe changes for the fine-tuned content model on the validation split (issue: close the gap).

Loads the pretrained model of ``--config`` (``pretrained_model`` must have run), applies each
``--variant`` (a name and ``section.key=value`` overrides of the model / finetune sections, YAML
values) and fine-tunes it on one target domain exactly as ``finetuned_model`` does (same transfer
part, data, seed and early stopping), then prints each variant's best validation metrics. Reads the
validation split only; a change that wins here goes into the config, and the test split is read once
by the ``evaluation`` of the run that uses it.

    .venv/bin/python benchmarks/select_finetune.py --config configs/real.yaml --domain movielens_100k \\
        --variant base --variant full_softmax model.objective.name=full_softmax --threads 1

Overrides that change parameter shapes (dim, layers) cannot load the pretrained weights and fail.
Records go to ``<artifacts>/select_finetune/<domain>/<variant>.json`` (a finished one is read back).
"""

from __future__ import annotations

import argparse
import copy
import dataclasses as dc
import json
import sys
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


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


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config", default="configs/real.yaml")
    p.add_argument("--domain", required=True)
    p.add_argument("--variant", nargs="+", action="append", required=True, metavar="NAME [KEY=VALUE ...]")
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args(argv)

    import torch
    from safetensors.torch import load_file

    from mmrec import stages
    from mmrec.config import load_config
    from select_sasrec import timed_fit  # this folder is on sys.path when run as a script
    from mmrec.io import write_json
    from mmrec.models.recommender import Recommender
    from mmrec.transfer import load_part

    torch.set_num_threads(args.threads)
    base = load_config(args.config)
    name = base.domain(args.domain).name
    pretrained = base.artifact_path("pretrained_model") / "model.safetensors"
    if not pretrained.is_file():
        raise SystemExit(f"{pretrained}: run pretrained_model first")
    content, data = stages._domain_data(base, name)  # noqa: SLF001
    rows = []
    for variant, *overrides in args.variant:
        record_path = base.artifacts / "select_finetune" / name / f"{variant}.json"
        if record_path.is_file():
            rec = json.loads(record_path.read_text())
            if rec["overrides"] != overrides:
                raise SystemExit(f"{record_path}: recorded with {rec['overrides']}, asked {overrides}: rename the variant")
        else:
            cfg = dc.replace(base, sections=_apply(base.sections, overrides))
            mcfg, part, _ = stages._variants(cfg)["model"]  # noqa: SLF001 (the stage's own recipe)
            tc = dc.replace(cfg.train("finetune"), progress=False)
            torch.manual_seed(tc.seed)
            model = Recommender(mcfg, n_items=content.n_items)
            load_part(model, load_file(pretrained), part)
            if cfg.transfer().freeze_user_encoder_except_adapters:
                model.user_encoder.freeze_for_adapters()
            model.attach(content, data.train_examples(mcfg.max_len), tc.seed)
            rec = {"variant": variant, "overrides": overrides, "transfer": part, **timed_fit(model, data, cfg, tc)}
            record_path.parent.mkdir(parents=True, exist_ok=True)
            write_json(record_path, rec)
        rows.append(rec)
        print(f"{variant} {' '.join(overrides)}: valid NDCG@10 {100 * rec['valid']['NDCG@10']:.2f} "
              f"HR@10 {100 * rec['valid']['HR@10']:.2f} (best step {rec['best_step']} of {rec['steps']}, "
              f"{rec['seconds_per_epoch_incl_validation']:.2f} s/epoch incl. validation)", flush=True)
    print("\n| variant | overrides | valid NDCG@10 | valid HR@10 | best step / steps |")
    print("|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['variant']} | {' '.join(r['overrides']) or '-'} | {100 * r['valid']['NDCG@10']:.2f} | "
              f"{100 * r['valid']['HR@10']:.2f} | {r['best_step']} / {r['steps']} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
