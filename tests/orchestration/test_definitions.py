"""The Dagster code location: it loads fast, its graph is the artifact chain with the domains as
partitions, one job per partitions definition; the retraining schedule and the raw-data sensor."""

import datetime
import json
import os
import subprocess
import sys

import dagster as dg
import yaml

from mmrec import stages
from orchestration import checks
from orchestration.definitions import CATALOG_JOB, PRETRAIN_JOB, TARGET_JOB, build_defs, defs
from orchestration.resources import PipelineResource
from orchestration.schedules import DEFAULT_RETRAIN_CRON, RETRAIN_CRON_ENV
from tests.conftest import REPO
from tests.orchestration.test_assets import write_tiny_project

ASSETS = (*stages.STAGES, "served_model")


def _keys(d: dg.Definitions) -> set[str]:
    return {k.to_user_string() for k in d.get_repository_def().asset_graph.get_all_asset_keys()}


def test_definitions_load_with_the_artifact_chain_as_assets():
    dg.Definitions.validate_loadable(defs)
    assert _keys(defs) == set(ASSETS)
    graph = defs.get_repository_def().asset_graph
    parents = {k.to_user_string(): sorted(p.to_user_string() for p in graph.get(k).parent_keys)
               for k in graph.get_all_asset_keys()}
    assert parents == {
        "raw_catalog": [], "validated_catalog": ["raw_catalog"], "item_features": ["validated_catalog"],
        "pretrained_model": ["item_features"], "finetuned_model": ["item_features", "pretrained_model"],
        "evaluation": ["finetuned_model", "pretrained_model"], "served_model": ["evaluation", "finetuned_model"]}


def test_domains_are_partitions_and_each_job_has_one_partitions_definition():
    from mmrec.config import load_config

    cfg = load_config(REPO / "configs" / "demo.yaml")
    graph = defs.get_repository_def().asset_graph
    parts = {k.to_user_string(): graph.get(k).partitions_def for k in graph.get_all_asset_keys()}
    everyone, targets = [d.name for d in cfg.domains], [d.name for d in cfg.targets]
    for name in ("raw_catalog", "validated_catalog", "item_features"):
        assert parts[name].get_partition_keys() == everyone
    assert parts["pretrained_model"] is None
    for name in ("finetuned_model", "evaluation", "served_model"):
        assert parts[name].get_partition_keys() == targets
    jobs = {name: defs.resolve_job_def(name) for name in (CATALOG_JOB, PRETRAIN_JOB, TARGET_JOB)}
    assert jobs[CATALOG_JOB].partitions_def.get_partition_keys() == everyone
    assert jobs[PRETRAIN_JOB].partitions_def is None
    assert jobs[TARGET_JOB].partitions_def.get_partition_keys() == targets
    assert isinstance(defs.resolve_job_def(CATALOG_JOB).executor_def, type(dg.in_process_executor))
    assert defs.resolve_job_def(CATALOG_JOB).executor_def.name == "in_process"


def test_partition_mappings_select_sources_for_pretraining_and_the_same_domain_for_targets():
    graph = defs.get_repository_def().asset_graph
    feats = dg.AssetKey("item_features")
    ups = graph.get_parent_partition_keys_for_child(None, feats, dg.AssetKey("pretrained_model")).partitions_subset
    assert sorted(ups.get_partition_keys()) == ["books", "music"]  # the source domains
    ups = graph.get_parent_partition_keys_for_child("films", feats, dg.AssetKey("finetuned_model")).partitions_subset
    assert list(ups.get_partition_keys()) == ["films"]


def test_blocking_checks():
    repo = defs.get_repository_def()
    specs = {k.name: k for k in repo.asset_graph.asset_check_keys}
    assert specs[checks.VALIDATION_CHECK].asset_key == dg.AssetKey("validated_catalog")
    assert specs[checks.GATE_CHECK].asset_key == dg.AssetKey("evaluation")
    for key in specs.values():
        assert repo.asset_graph.get_check_spec(key).blocking, key


def test_code_location_loads_fast_without_heavy_imports():
    code = ("import sys, time; t = time.perf_counter(); import orchestration.definitions as d; "
            "d.defs.get_repository_def(); "
            "print(time.perf_counter() - t); print(sorted({m.split('.')[0] for m in sys.modules} & "
            "{'torch', 'mlflow', 'great_expectations', 'transformers', 'timm'}))")
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=True)
    seconds, heavy = out.stdout.strip().splitlines()
    assert heavy == "[]"
    print(f"code location loads in {float(seconds):.2f} s")
    assert float(seconds) < 15  # ~1.5 s here; the bound only guards against importing torch & co.


def test_mmrec_config_picks_the_pipeline_yaml(tmp_path, monkeypatch):
    spec = {"root": str(tmp_path), "domains": {
        "shop": {"role": "source", "source": {"format": "tabular", "path": "raw/shop"}},
        "cafe": {"role": "target", "source": {"format": "tabular", "path": "raw/cafe"}},
        "deli": {"role": "target", "source": {"format": "tabular", "path": "raw/deli"}}}}
    path = tmp_path / "mine.yaml"
    path.write_text(yaml.safe_dump(spec, sort_keys=False))
    monkeypatch.setenv("MMREC_CONFIG", str(path))
    d = build_defs()
    assert d.resolve_job_def(CATALOG_JOB).partitions_def.get_partition_keys() == ["shop", "cafe", "deli"]
    assert d.resolve_job_def(TARGET_JOB).partitions_def.get_partition_keys() == ["cafe", "deli"]
    assert d.resources["pipeline"].config_path == str(path)
    # the module-level code location (what `dagster dev -m orchestration.definitions` loads) too
    code = ("from orchestration.definitions import defs, TARGET_JOB; "
            "print(defs.resolve_job_def(TARGET_JOB).partitions_def.get_partition_keys())")
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=True,
                         env={**os.environ, "MMREC_CONFIG": str(path)})
    assert out.stdout.strip() == "['cafe', 'deli']"


# --------------------------------------------------------------------------------------------
# Schedule and sensor

def test_retraining_schedule_runs_every_target_weekly_by_default(monkeypatch):
    monkeypatch.delenv(RETRAIN_CRON_ENV, raising=False)
    d = build_defs(str(REPO / "configs" / "demo.yaml"))
    (schedule,) = d.schedules
    assert schedule.cron_schedule == DEFAULT_RETRAIN_CRON == "0 3 * * 1"
    assert schedule.job_name == TARGET_JOB
    when = datetime.datetime(2026, 11, 23, 3, 0, tzinfo=datetime.timezone.utc)
    with dg.build_schedule_context(scheduled_execution_time=when, repository_def=d.get_repository_def()) as ctx:
        reqs = schedule.evaluate_tick(ctx).run_requests
    assert [r.partition_key for r in reqs] == ["films"]
    assert reqs[0].run_key == f"films@{when.isoformat()}" and reqs[0].tags["mmrec/trigger"] == "schedule"


def test_retraining_cron_from_the_environment(monkeypatch):
    monkeypatch.setenv(RETRAIN_CRON_ENV, "30 1 * * *")
    (schedule,) = build_defs(str(REPO / "configs" / "demo.yaml")).schedules
    assert schedule.cron_schedule == "30 1 * * *"


def test_raw_data_sensor_starts_the_catalog_job_for_changed_domains(tmp_path):
    from mmrec.config import load_config
    from mmrec.data.synthetic import generate_demo

    path = write_tiny_project(tmp_path)
    cfg = load_config(path)
    generate_demo(cfg.demo, cfg.demo_path, progress=False)
    d = build_defs(str(path))
    (sensor,) = d.sensors
    assert sensor.job_name == CATALOG_JOB
    resources = {"pipeline": PipelineResource(config_path=str(path))}

    def tick(cursor):
        with dg.build_sensor_context(cursor=cursor, resources=resources, repository_def=d.get_repository_def()) as ctx:
            return sensor.evaluate_tick(ctx)

    first = tick(None)  # nothing seen yet: every domain's data is new
    assert sorted(r.partition_key for r in first.run_requests) == ["books", "films", "music"]
    assert set(json.loads(first.cursor)) == {"books", "films", "music"}
    again = tick(first.cursor)
    assert again.run_requests == [] and again.skip_message and again.cursor == first.cursor
    # new data lands in one domain's folder
    (cfg.resolve(cfg.domain("music").source.path) / "more_interactions.csv").write_text("user_id,item_id,timestamp\n")
    changed = tick(again.cursor)
    (req,) = changed.run_requests
    assert req.partition_key == "music" and req.tags["mmrec/trigger"] == "raw_data"
    assert req.run_key == f"music:{json.loads(changed.cursor)['music']}"
    assert tick(changed.cursor).run_requests == []
