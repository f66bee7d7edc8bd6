"""``python -m orchestration``: the whole asset graph, headless, through Dagster.

Runs the jobs of ``orchestration.definitions`` in order (``catalog_job`` for every domain,
``pretrain_job``, ``target_job`` for every target domain) in this process against the Dagster
instance in ``$DAGSTER_HOME`` (default ``<project>/.dagster_home``), so the runs, asset metadata
and check results show in the UI afterwards. Ends with the test metrics tables and where to look.
"""

import argparse
import os
import sys
import time

from orchestration.resources import DEFAULT_CONFIG, PROJECT_ROOT, config_path


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m orchestration", description=__doc__.split("\n\n")[0])
    p.add_argument("--config", help="pipeline YAML (default: $MMREC_CONFIG or configs/demo.yaml)")
    args = p.parse_args(argv)
    if not os.environ.get("DAGSTER_HOME"):
        os.environ["DAGSTER_HOME"] = str(PROJECT_ROOT / ".dagster_home")
    os.makedirs(os.environ["DAGSTER_HOME"], exist_ok=True)
    instance_yaml = os.path.join(os.environ["DAGSTER_HOME"], "dagster.yaml")
    if not os.path.exists(instance_yaml):  # a local instance: no telemetry, no first-visit dialog
        with open(instance_yaml, "w", encoding="utf-8") as fh:
            fh.write("telemetry:\n  enabled: false\nnux:\n  enabled: false\n")
    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")

    import dagster as dg

    from mmrec import stages
    from orchestration.definitions import JOB_ORDER, build_defs

    path = config_path(args.config)
    defs = build_defs(str(path))
    t_all = time.perf_counter()
    with dg.DagsterInstance.get() as instance:
        for name in JOB_ORDER:
            job = defs.resolve_job_def(name)
            for key in job.partitions_def.get_partition_keys() if job.partitions_def else [None]:
                t0 = time.perf_counter()
                res = job.execute_in_process(instance=instance, partition_key=key, raise_on_error=False)
                where = f"{name}" + (f" [{key}]" if key else "")
                print(f"{where}: {'ok' if res.success else 'FAILED'} in {time.perf_counter() - t0:.1f}s (run {res.run_id})",
                      file=sys.stderr)
                if not res.success:
                    print(f"stopped: {where} failed; see the run in the Dagster UI", file=sys.stderr)
                    return 1
    print(f"whole graph in {time.perf_counter() - t_all:.1f}s\n", file=sys.stderr)

    cfg = defs.resources["pipeline"].load()
    mlflow = defs.resources["mlflow"]
    for name in stages.stage_domains(cfg, "evaluation"):
        res = stages.read_metrics(cfg, name)
        gate = res["gate"]
        print(stages.metrics_table(res, cfg.evaluation().ks))
        print(f"quality gate ({gate['metric']} vs {gate['against']}, margin {gate['margin']}): "
              f"{'passed: registered and promoted' if gate['passed'] else 'FAILED: not promoted'} "
              f"as {mlflow.model_name(name)}\n")
    env = f"DAGSTER_HOME={os.environ['DAGSTER_HOME']}" + ("" if path == config_path(DEFAULT_CONFIG) else f" MMREC_CONFIG={path}")
    print(f"Dagster UI:  {env} .venv/bin/dagster dev -m orchestration.definitions\n"
          f"             then open http://127.0.0.1:3000/asset-groups\n"
          f"MLflow UI:   .venv/bin/mlflow ui --backend-store-uri {mlflow.uri(cfg)} --port 5000\n"
          f"             then open {mlflow.ui_url}")
    targets = stages.stage_domains(cfg, "evaluation")
    cfg_arg = "" if path == config_path(DEFAULT_CONFIG) else f" --config {path}"
    dom_arg = "" if len(targets) == 1 else f" --domain {targets[0]}"
    print(f"Serve:       .venv/bin/python -m deploy.serve{cfg_arg}{dom_arg}   (or make serve)\n"
          f"             then .venv/bin/python -m deploy.recommend --history <item ids>")
    return 0


if __name__ == "__main__":
    sys.exit(main())
