"""The training assets launched as a distributed run: ``ComputeResource(nproc=2)`` makes
``pretrained_model`` start torchrun through Dagster Pipes (orchestration.distributed); rank 0's
report becomes the materialisation's metadata and the run's log is replayed into MLflow."""

import json

import dagster as dg
import pytest

from mmrec import stages
from orchestration.definitions import PRETRAIN_JOB, build_defs
from orchestration.distributed import stage_command
from orchestration.resources import ComputeResource, MlflowResource
from tests.orchestration.test_assets import _uri, mlflow_store_template, write_tiny_project  # noqa: F401 (fixture)


def test_stage_command_is_torchrun_of_the_pipes_child():
    cmd = stage_command("finetuned_model", "p.yaml", 2, domain="films", threads=1)
    assert cmd[1:5] == ["-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2"]
    assert cmd[5:] == ["-m", "orchestration.pipes_train", "--stage", "finetuned_model", "--config", "p.yaml",
                       "--threads", "1", "--domain", "films"]


def test_pretrained_model_asset_runs_on_two_processes_through_pipes(tmp_path, mlflow_store_template):
    from mlflow import MlflowClient

    from mmrec.config import load_config
    from mmrec.data.synthetic import generate_demo

    path = write_tiny_project(tmp_path, pretrain={"epochs": 1, "patience": 2, "progress": False})
    cfg = load_config(path)
    generate_demo(cfg.demo, cfg.demo_path, progress=False)
    for d in cfg.sources:
        for stage in ("raw_catalog", "validated_catalog", "item_features"):
            stages.STAGE_FUNCTIONS[stage](cfg, d.name, progress=False)
    uri = _uri(mlflow_store_template, tmp_path)
    defs = build_defs(str(path), resources={"compute": ComputeResource(nproc=2), "mlflow": MlflowResource(tracking_uri=uri)})
    result = defs.resolve_job_def(PRETRAIN_JOB).execute_in_process(instance=dg.DagsterInstance.ephemeral())
    assert result.success
    (mat,) = result.asset_materializations_for_node("pretrained_model")
    meta = {k: getattr(v, "value", v) for k, v in mat.metadata.items()}
    assert meta["processes"] == 2
    exported = json.loads((cfg.artifact_path("pretrained_model") / "model.json").read_text())
    assert exported["world_size"] == 2 and exported["steps"] == meta["steps"] > 0
    # the run's training log, replayed into the asset's MLflow run: the best validation value is there
    history = MlflowClient(uri).get_metric_history(meta["mlflow_run_id"], "val/NDCG_at_10")
    assert len(history) == 1  # one evaluation per epoch
    assert max(m.value for m in history) == pytest.approx(meta["valid NDCG@10"])
