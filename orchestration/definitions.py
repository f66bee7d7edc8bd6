"""The Dagster code location: ``dagster dev -m orchestration.definitions`` (or ``dg dev``).

The domains (the partition keys) come from the pipeline YAML named by ``$MMREC_CONFIG`` (default
``configs/demo.yaml``), read when the code location loads; the same file is the
``PipelineResource`` config every asset reads, so the hyper-parameters have one home.

Jobs, one per partitions definition (Dagster cannot mix them in one job); together, in this
order, they run the whole graph (``python -m orchestration`` does):

- ``catalog_job`` (partition: any domain): raw_catalog -> validated_catalog -> item_features
- ``pretrain_job`` (unpartitioned): pretrained_model, on the source domains' features
- ``target_job`` (partition: a target domain): finetuned_model -> evaluation -> served_model

Selections are built from asset objects, never from selection strings (the ANTLR runtime DVC
pins breaks Dagster's string selections).
"""

from typing import Optional

import dagster as dg

from mmrec.config import load_config
from orchestration import checks
from orchestration.assets import build_assets
from orchestration.resources import ComputeResource, MlflowResource, PipelineResource, config_path
from orchestration.schedules import build_retraining_schedule
from orchestration.sensors import build_raw_data_sensor

CATALOG_JOB, PRETRAIN_JOB, TARGET_JOB = "catalog_job", "pretrain_job", "target_job"
JOB_ORDER = (CATALOG_JOB, PRETRAIN_JOB, TARGET_JOB)


def build_defs(config: Optional[str] = None, resources: Optional[dict] = None, retrain_cron: Optional[str] = None) -> dg.Definitions:
    """Definitions for the pipeline YAML ``config`` (default: ``$MMREC_CONFIG`` or configs/demo.yaml);
    ``resources`` replace the default ones by key."""
    path = config_path(config)
    cfg = load_config(path)
    domains = dg.StaticPartitionsDefinition([d.name for d in cfg.domains])
    targets = dg.StaticPartitionsDefinition([d.name for d in cfg.targets])
    raw, validated, features, pretrained, finetuned, evaluation, served = build_assets(
        domains, targets, [d.name for d in cfg.sources])
    gate = checks.build_gate_check(evaluation, targets)

    catalog_job = dg.define_asset_job(CATALOG_JOB, selection=dg.AssetSelection.assets(raw, validated, features),
                                      partitions_def=domains, description="Import, validate and encode one domain.")
    pretrain_job = dg.define_asset_job(PRETRAIN_JOB, selection=dg.AssetSelection.assets(pretrained),
                                       description="Pretrain on every source domain.")
    target_job = dg.define_asset_job(TARGET_JOB, selection=dg.AssetSelection.assets(finetuned, evaluation, served),
                                     partitions_def=targets,
                                     description="Fine-tune, evaluate, gate and register one target domain.")
    return dg.Definitions(
        assets=[raw, validated, features, pretrained, finetuned, evaluation, served],
        asset_checks=[gate],
        jobs=[catalog_job, pretrain_job, target_job],
        schedules=[build_retraining_schedule(target_job, retrain_cron)],
        sensors=[build_raw_data_sensor(catalog_job)],
        resources={
            "pipeline": PipelineResource(config_path=str(path)),
            "mlflow": MlflowResource(),
            "compute": ComputeResource(),
            **(resources or {}),
        },
        executor=dg.in_process_executor,
    )


defs = build_defs()
