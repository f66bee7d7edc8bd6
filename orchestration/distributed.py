"""Launch a training stage as a distributed run from an asset: ``torchrun`` in a subprocess,
through Dagster Pipes (``dagster.PipesSubprocessClient``), the child being
``orchestration.pipes_train``. The asset gets back what rank 0 reported (the stage's result) and
replays the run's training log into its MLflow run, so a distributed materialisation shows the
same metadata, curves and plots as a single-process one.

The same child runs on a cluster with another Pipes client (docs/SCALING.md): ``dagster-k8s``'s
``PipesK8sClient`` with a pod per node running ``torchrun --nnodes N --rdzv-endpoint ...``, or a
Ray job (``dagster-ray``); only the launch changes, never the stage.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import dagster as dg

from orchestration.paths import PROJECT_ROOT

CHILD = "orchestration.pipes_train"


def stage_command(stage: str, config_path: str | Path, nproc: int, domain: str | None = None,
                  device: str | None = None, threads: int = 1) -> list[str]:
    """``python -m torch.distributed.run --standalone --nproc-per-node N -m orchestration.pipes_train ...``."""
    from mmrec.distributed import torchrun_command

    args = [CHILD, "--stage", stage, "--config", str(config_path), "--threads", str(threads)]
    if domain is not None:
        args += ["--domain", domain]
    if device is not None:
        args += ["--device", device]
    return torchrun_command(nproc, args)


def launch_stage(context: dg.AssetExecutionContext, stage: str, config_path: str | Path, nproc: int,
                 domain: str | None = None, device: str | None = None, threads: int = 1,
                 client: dg.PipesSubprocessClient | None = None) -> tuple[Path, dict[str, Any]]:
    """Run ``stage`` on ``nproc`` local processes and return ``(artifact path, stage metadata)`` as
    rank 0 reported them. A failed run raises (``DagsterPipesExecutionError``: torchrun's exit code)."""
    client = client or dg.PipesSubprocessClient(cwd=str(PROJECT_ROOT))
    env = {"OMP_NUM_THREADS": str(threads),
           "PYTHONPATH": os.pathsep.join(p for p in (str(PROJECT_ROOT), os.environ.get("PYTHONPATH")) if p)}
    command = stage_command(stage, config_path, nproc, domain, device, threads)
    context.log.info(f"launching {stage} on {nproc} processes: {' '.join(command)}")
    result = client.run(context=context, command=command, env=env).get_materialize_result()
    meta = {k: getattr(v, "value", v) for k, v in (result.metadata or {}).items()}
    if "stage_result" not in meta:
        raise dg.Failure(f"{stage}: the distributed run reported no result (metadata keys: {sorted(meta)})")
    return Path(meta["path"]), dict(meta["stage_result"])


def replay_log(tracker, run_dir: str | Path, prefix: str = "") -> None:
    """Send a finished run's ``JsonlTracker`` log (``<run_dir>/log``: params, tags, every logged
    metric by step) to ``tracker``, as the stage would have sent it in-process."""
    from mmrec.tracking import read_jsonl_run

    run = read_jsonl_run(Path(run_dir) / "log")
    if run.params:
        tracker.log_params({f"{prefix}{k}": v for k, v in run.params.items()})
    if run.tags:
        tracker.set_tags({f"{prefix}{k}": str(v) for k, v in run.tags.items()})
    for rec in run.metrics:
        tracker.log_metrics({f"{prefix}{k}": v for k, v in rec["metrics"].items()}, step=rec.get("step"))
