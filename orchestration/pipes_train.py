"""One rank of a training stage that a Dagster asset launched as a distributed run.

``orchestration.distributed.launch_stage`` starts ``torchrun ... -m orchestration.pipes_train``
through ``dagster.PipesSubprocessClient``; every rank runs the library stage
(``mmrec.stages.pretrained_model`` or ``finetuned_model``, the same function as the CLI and
``dvc.yaml``), and rank 0 alone connects to Dagster Pipes: it streams a log line and reports the
stage's result as the asset's materialisation metadata. A failing rank fails the stage on every
rank (``mmrec.distributed``); rank 0's error reaches Dagster through the Pipes connection and the
non-zero exit of torchrun fails the step.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

TRAINING_STAGES = ("pretrained_model", "finetuned_model")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m orchestration.pipes_train", description=__doc__.split("\n\n")[0])
    p.add_argument("--stage", required=True, choices=TRAINING_STAGES)
    p.add_argument("--config", required=True, help="pipeline YAML")
    p.add_argument("--domain", help="target domain (finetuned_model)")
    p.add_argument("--device", help="torch device (default: the config's compute.device)")
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads per process")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    import torch

    from mmrec import distributed, stages
    from mmrec.config import load_config

    if (args.stage == "finetuned_model") != (args.domain is not None):
        raise SystemExit("--domain is required for finetuned_model and not allowed for pretrained_model")
    cfg = load_config(args.config)
    if args.device is not None:
        cfg = cfg.with_device(args.device)
    torch.set_num_threads(args.threads)
    distributed.init_from_env(cfg.device())
    fn = stages.STAGE_FUNCTIONS[args.stage]

    def run():
        return fn(cfg, progress=False) if args.domain is None else fn(cfg, args.domain, progress=False)

    try:
        rank, size = distributed.world()
        if rank != 0:
            run()
            return 0
        from dagster_pipes import open_dagster_pipes

        with open_dagster_pipes() as pipes:
            pipes.log.info(f"{args.stage}: {size} process(es) on {cfg.device()}")
            res = run()
            pipes.report_asset_materialization(metadata={
                "path": {"raw_value": str(res.path), "type": "path"},
                "world_size": size,
                "stage_result": {"raw_value": res.metadata, "type": "json"},
            })
    finally:
        distributed.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
