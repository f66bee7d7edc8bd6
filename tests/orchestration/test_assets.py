"""The asset graph materialised in-process on tiny demo data: every artifact, its metadata, MLflow
runs with their tags, the registered pyfunc model; the blocking checks (a bad catalog, a failed
quality gate) stop everything downstream."""

import contextlib
import io
import os
import shutil
from pathlib import Path

import dagster as dg
import pytest
import yaml

from mmrec import stages
from orchestration import checks
from orchestration.definitions import CATALOG_JOB, PRETRAIN_JOB, TARGET_JOB, build_defs
from tests.conftest import REPO, edit_csv, write_tabular

MODEL_NAME = "mmrec-films"


def write_tiny_project(root: Path, **overrides) -> Path:
    """A three-domain demo project (books, music: source; films: target) with tiny data and models:
    the tiny preset, 2 epochs, one baseline. Returns the pipeline YAML."""
    spec = {
        "preset": str(REPO / "configs" / "presets" / "tiny.yaml"),
        "root": str(root),
        "artifacts": "artifacts",
        "demo": {"path": "data/demo", "seed": 0, "domains": ["books", "music", "films"], "n_users": 40,
                 "n_items": 24, "n_categories": 4, "image_size": 32},
        "validation": {"on_error": "fail", "min_text_share": 0.5, "min_image_share": 0.5},
        "preprocess": {"min_seq_len": 5, "max_seq_len": 20},
        "domains": {name: {"role": "target" if name == "films" else "source", "source": {
            "format": "tabular", "path": f"data/demo/{name}",
            "options": {"text": ["title", "description"], "image": "image", "image_root": "."}}}
            for name in ("books", "music", "films")},
        "pretrain": {"epochs": 2, "patience": 2, "progress": False},
        "finetune": {"epochs": 2, "patience": 2, "progress": False},
        # a negative margin: the gate passes whatever 2 epochs give (test_failed_gate_* raises it)
        "evaluation": {"ks": [5, 10], "baselines": ["scratch"], "gate_against": ["scratch"], "gate_margin": -1.0},
        **overrides,
    }
    path = root / "pipeline.yaml"
    path.write_text(yaml.safe_dump(spec, sort_keys=False))
    return path


@pytest.fixture(scope="session")
def mlflow_store_template(tmp_path_factory) -> Path:
    """A migrated, empty MLflow sqlite store (creating one costs ~8 s: copy it instead)."""
    from mlflow import MlflowClient

    from orchestration import mlflow_support as ms

    root = tmp_path_factory.mktemp("mlflow_template")
    MlflowClient(ms.default_tracking_uri(root)).search_experiments()
    return root / "mlflow" / "mlflow.db"


def _uri(template: Path, root: Path) -> str:
    from orchestration import mlflow_support as ms

    (root / "mlflow").mkdir(parents=True, exist_ok=True)
    shutil.copyfile(template, root / "mlflow" / "mlflow.db")
    return ms.default_tracking_uri(root)


@pytest.fixture(scope="module")
def graph(tmp_path_factory, mlflow_store_template):
    """The README's headless command, ``python -m orchestration``: every job of the code location
    in order, against a Dagster instance in ``$DAGSTER_HOME`` and the default MLflow store."""
    from mmrec.config import load_config
    from mmrec.data.synthetic import generate_demo
    from orchestration.__main__ import main

    root = tmp_path_factory.mktemp("tiny")
    path = write_tiny_project(root)
    cfg = load_config(path)
    generate_demo(cfg.demo, cfg.demo_path, progress=False)
    uri = _uri(mlflow_store_template, root)  # where MlflowResource's default URI points
    saved = os.environ.get("DAGSTER_HOME")
    os.environ["DAGSTER_HOME"] = str(root / "dagster_home")
    try:
        out = io.StringIO()
        with contextlib.redirect_stdout(out):
            assert main(["--config", str(path)]) == 0
        with dg.DagsterInstance.get() as instance:
            yield {"root": root, "path": path, "cfg": cfg, "uri": uri, "instance": instance, "stdout": out.getvalue()}
    finally:
        if saved is None:
            os.environ.pop("DAGSTER_HOME", None)
        else:
            os.environ["DAGSTER_HOME"] = saved


def run_id(instance, job: str, partition: str | None) -> str:
    tags = {"dagster/partition": partition} if partition else {}
    (run,) = instance.get_runs(dg.RunsFilter(job_name=job, tags=tags))
    return run.run_id


def check_history(instance, asset: str, check: str, partition: str | None = None) -> list:
    """The check's evaluations, newest first (what the asset's Checks tab lists)."""
    key = dg.AssetCheckKey(dg.AssetKey(asset), check)
    records = instance.event_log_storage.get_asset_check_execution_history(key, limit=20)
    evs = [r.event.dagster_event.event_specific_data for r in records if r.event and r.event.dagster_event]
    return [e for e in evs if partition is None or e.partition == partition]


def materializations(instance, asset: str, partition: str | None = None) -> list:
    flt = dg.AssetRecordsFilter(asset_key=dg.AssetKey(asset), asset_partitions=[partition] if partition else None)
    return [r.asset_materialization for r in instance.fetch_materializations(flt, limit=100).records]


def check_evaluations(result: dg.ExecuteInProcessResult) -> list:
    return [e.event_specific_data for e in result.all_events if e.event_type_value == "ASSET_CHECK_EVALUATION"]


def test_every_asset_partition_is_materialised_with_its_artifact(graph):
    inst, cfg = graph["instance"], graph["cfg"]
    expected = {"raw_catalog": ["books", "music", "films"], "validated_catalog": ["books", "music", "films"],
                "item_features": ["books", "music", "films"], "pretrained_model": [None],
                "finetuned_model": ["films"], "evaluation": ["films"], "served_model": ["films"]}
    for asset, parts in expected.items():
        for part in parts:
            (mat,) = materializations(inst, asset, part)
            if asset != "served_model":
                assert mat.metadata["path"].value == str(cfg.artifact_path(asset, part)), (asset, part)
                assert Path(mat.metadata["path"].value).is_dir()


def test_catalog_metadata_row_counts_and_modality_coverage(graph):
    inst, cfg = graph["instance"], graph["cfg"]
    raw = materializations(inst, "raw_catalog", "films")[0].metadata
    val = materializations(inst, "validated_catalog", "films")[0].metadata
    stats = stages.read_stats(cfg, "films")
    assert raw["users"].value == stats["users"] == 40 and raw["items"].value == 24
    assert val["kept_interactions"].value == stats["after_preprocess"]["interactions"] == val["dagster/row_count"].value
    assert val["share_text"].value == pytest.approx(stats["share_text"])
    assert "| text | image |" in val["modality coverage"].value
    assert Path(val["report"].value).name == "validation.md"
    feats = materializations(inst, "item_features", "films")[0].metadata
    assert feats["items"].value == stats["after_preprocess"]["items"]


def test_the_headless_run_ends_with_the_metrics_table_and_where_to_look(graph):
    out = graph["stdout"]
    assert stages.metrics_table(stages.read_metrics(graph["cfg"], "films"), (5, 10)) in out
    assert f"quality gate (NDCG@10 vs ['scratch'], margin -1.0): passed: registered and promoted as {MODEL_NAME}" in out
    assert "dagster dev -m orchestration.definitions" in out and f"mlflow ui --backend-store-uri {graph['uri']}" in out
    assert f"python -m deploy.serve --config {graph['path']}" in out  # a non-default config is named


def test_validation_and_gate_checks_passed(graph):
    inst = graph["instance"]
    for domain in ("books", "music", "films"):
        (ev,) = check_history(inst, "validated_catalog", checks.VALIDATION_CHECK, domain)
        assert ev.passed
        assert ev.metadata["failed_expectations"].value == 0 and ev.metadata["expectations"].value > 5
    (gate,) = check_history(inst, "evaluation", checks.GATE_CHECK, "films")
    assert gate.passed
    assert gate.metadata["metric"].value == "NDCG@10" and gate.metadata["margin"].value == -1.0


def test_model_assets_link_their_mlflow_runs_with_provenance_tags(graph):
    from mlflow import MlflowClient

    inst, client = graph["instance"], MlflowClient(graph["uri"])
    for asset, part, job in (("pretrained_model", None, PRETRAIN_JOB), ("finetuned_model", "films", TARGET_JOB),
                             ("evaluation", "films", TARGET_JOB), ("served_model", "films", TARGET_JOB)):
        md = materializations(inst, asset, part)[0].metadata
        run = client.get_run(md["mlflow_run_id"].value)
        assert md["mlflow_run"].value == (f"http://127.0.0.1:5000/#/experiments/{run.info.experiment_id}"
                                          f"/runs/{run.info.run_id}")
        tags = run.data.tags
        assert tags["stage"] == asset and tags["domain"] == (part or "books+music")
        assert tags["dagster_run_id"] == run_id(inst, job, part)
        assert {"git_commit", "dvc_data_md5"} <= set(tags)
        assert run.info.status == "FINISHED"
        if asset in ("pretrained_model", "finetuned_model"):  # the code that trained the run, from its first step
            from mmrec.tracking import code_version

            head = code_version()["commit"] or "not a git checkout"
            assert md["trained by"].value.startswith(head[:10]) and " from step 0" in md["trained by"].value
    ft = client.get_run(materializations(inst, "finetuned_model", "films")[0].metadata["mlflow_run_id"].value)
    # each variant's curves stay apart, and its learning curves are PNG artifacts
    assert {"model/val/NDCG_at_10", "scratch/val/NDCG_at_10"} <= set(ft.data.metrics)
    plots = {f.path for f in client.list_artifacts(ft.info.run_id, "plots/model")}
    assert "plots/model/validation.png" in plots
    ev = client.get_run(materializations(inst, "evaluation", "films")[0].metadata["mlflow_run_id"].value)
    assert {"metrics.png", "metrics.json"} <= {f.path for f in client.list_artifacts(ev.info.run_id)}
    assert "finetuned/NDCG_at_10" in ev.data.metrics


def test_evaluation_metadata_shows_the_metrics_table(graph):
    md = materializations(graph["instance"], "evaluation", "films")[0].metadata
    result = stages.read_metrics(graph["cfg"], "films")
    assert md["metrics"].value == stages.metrics_table(result, (5, 10))
    assert md["finetuned NDCG@10"].value == pytest.approx(result["models"]["finetuned"]["NDCG@10"])
    assert md["gate_passed"].value is True


def test_served_model_is_registered_with_tags_promoted_and_predicts(graph):
    import pandas as pd
    from mlflow import MlflowClient

    from orchestration import mlflow_support as ms

    md = materializations(graph["instance"], "served_model", "films")[0].metadata
    assert md["model_name"].value == MODEL_NAME and md["alias"].value == "champion"
    client = MlflowClient(graph["uri"], registry_uri=graph["uri"])
    mv = client.get_model_version_by_alias(MODEL_NAME, "champion")
    assert str(mv.version) == md["version"].value == "1"
    dagster_run = run_id(graph["instance"], TARGET_JOB, "films")
    assert mv.tags["stage"] == "served_model" and mv.tags["domain"] == "films" and mv.tags["gate"] == "passed"
    assert mv.tags["dagster_run_id"] == dagster_run
    assert {"git_commit", "dvc_data_md5", "finetuned_run_id"} <= set(mv.tags)
    trained_in = materializations(graph["instance"], "finetuned_model", "films")[0].metadata["mlflow_run_id"].value
    assert mv.tags["finetuned_run_id"] == trained_in

    from mmrec.export import load_model

    exported = load_model(graph["cfg"].artifact_path("finetuned_model", "films") / "model")
    history = exported.item_ids[:3]
    model = ms.load_registered(graph["uri"], MODEL_NAME, "champion")
    pred = model.predict(pd.DataFrame({"history": [history]}), params={"k": 5})
    expected = exported.recommend([history], k=5)[0]
    assert list(pred["item_ids"][0]) == [i for i, _ in expected]
    assert list(pred["scores"][0]) == pytest.approx([s for _, s in expected], abs=1e-5)


def test_failed_gate_blocks_registration(graph, tmp_path):
    """The same project with a margin no model can reach: the gate fails with ERROR severity and
    served_model does not run (no new materialisation, no new model version)."""
    from mlflow import MlflowClient

    strict = tmp_path / "strict.yaml"
    strict.write_text(yaml.safe_dump({"preset": str(graph["path"]), "evaluation": {"gate_margin": 1.0}}))
    defs = build_defs(str(strict))  # the default MLflow store under the root: the graph's
    inst = graph["instance"]
    before = len(materializations(inst, "served_model", "films"))
    res = defs.resolve_job_def(TARGET_JOB).execute_in_process(
        instance=inst, partition_key="films", raise_on_error=False,
        asset_selection=[dg.AssetKey("evaluation"), dg.AssetKey("served_model")])
    assert not res.success
    (gate,) = check_evaluations(res)
    assert not gate.passed and gate.severity == dg.AssetCheckSeverity.ERROR and gate.metadata["margin"].value == 1.0
    mats = {e.asset_key.to_user_string() for e in res.get_asset_materialization_events()}
    assert mats == {"evaluation"}
    assert len(materializations(inst, "served_model", "films")) == before
    client = MlflowClient(graph["uri"], registry_uri=graph["uri"])
    assert [str(v.version) for v in client.search_model_versions(f"name='{MODEL_NAME}'")] == ["1"]
    # the next test must see the project's own metrics again
    stages.evaluation(graph["cfg"], "films", progress=False)


def test_retraining_promotes_only_a_model_that_beats_the_champion_on_the_same_validation_data(graph, tmp_path):
    """served_model registers every run as the challenger and compares it with the champion on the
    same validation split: it replaces a champion that ranks nothing (all-zero item vectors,
    validation NDCG 0), keeps the champion it only ties, and the rollback restores the one before."""
    import shutil

    from mlflow import MlflowClient
    from safetensors.torch import load_file, save_file

    from deploy import rollback
    from orchestration import mlflow_support as ms

    cfg, uri = graph["cfg"], graph["uri"]
    client = MlflowClient(uri, registry_uri=uri)
    aliases = lambda: {k: str(v) for k, v in client.get_registered_model(MODEL_NAME).aliases.items()}  # noqa: E731
    bad = tmp_path / "bad"
    shutil.copytree(cfg.artifact_path("finetuned_model", "films") / "model", bad)
    zeros = load_file(bad / "item_vectors.safetensors")["item_vectors"] * 0
    save_file({"item_vectors": zeros.contiguous()}, bad / "item_vectors.safetensors")
    with ms.mlflow_run(uri, "films", "bad", {"stage": "served_model"}) as tracker:
        bad_version = ms.register_model(uri, bad, MODEL_NAME, tracker.run_id, {"gate": "passed"})
    client.set_registered_model_alias(MODEL_NAME, "champion", bad_version)
    defs, inst = build_defs(str(graph["path"])), graph["instance"]

    def serve() -> dict:
        res = defs.resolve_job_def(TARGET_JOB).execute_in_process(
            instance=inst, partition_key="films", asset_selection=[dg.AssetKey("served_model")])
        assert res.success
        return {k: v.value for k, v in materializations(inst, "served_model", "films")[0].metadata.items()}

    md = serve()
    won = md["version"]
    assert md["alias"] == "champion" and md["champion_version"] == won and md["valid champion"] == 0.0
    assert md["valid challenger"] > 0
    assert aliases() == {"champion": won, "challenger": won, "previous_champion": bad_version}
    tags = client.get_model_version(MODEL_NAME, won).tags
    assert tags["promotion.decision"] == "promoted" and tags["promotion.champion_version"] == bad_version
    assert float(tags["promotion.champion_value"]) == 0.0 and tags["previous_champion"] == bad_version
    assert tags["promotion.metric"] == "NDCG@10" and tags["promotion.split"] == "valid"
    assert float(tags["promotion.challenger_value"]) == pytest.approx(md["valid challenger"], abs=1e-6)

    md = serve()  # the same model again: a tie keeps the champion
    held = md["version"]
    assert md["alias"] == f"challenger (not promoted: does not beat v{won})" and md["champion_version"] == won
    assert md["valid challenger"] == md["valid champion"]
    assert aliases() == {"champion": won, "challenger": held, "previous_champion": bad_version}
    assert client.get_model_version(MODEL_NAME, held).tags["promotion.decision"] == "held"

    # the bad champion was set by hand, so nothing before it is recorded: the chain ends there
    assert rollback.main(["--config", str(graph["path"])]) == 0
    assert aliases() == {"champion": bad_version, "challenger": held}
    assert client.get_model_version(MODEL_NAME, won).tags["rolled_back_to"] == bad_version


# --------------------------------------------------------------------------------------------
# A bad catalog

def _one_domain_project(root: Path) -> Path:
    write_tabular(root / "raw" / "shop")
    spec = {"root": str(root), "artifacts": "art", "validation": {"min_text_share": 0.5},
            "preprocess": {"min_seq_len": 5, "max_seq_len": 2},
            "domains": {"shop": {"role": "target", "source": {
                "format": "tabular", "path": "raw/shop", "options": {"text": ["title", "description"]}}}}}
    path = root / "pipeline.yaml"
    path.write_text(yaml.safe_dump(spec))
    return path


def test_bad_catalog_fails_the_blocking_check_and_nothing_downstream_materialises(tmp_path):
    path = _one_domain_project(tmp_path)
    defs = build_defs(str(path))
    job = defs.resolve_job_def(CATALOG_JOB)
    with dg.instance_for_test() as inst:
        # item_features of the good catalog is not needed to show the blocking: run the first two
        good = job.execute_in_process(instance=inst, partition_key="shop",
                                      asset_selection=[dg.AssetKey("raw_catalog"), dg.AssetKey("validated_catalog")])
        assert good.success
        catalog = tmp_path / "art" / "validated_catalog" / "shop"
        before = {p.name: p.stat().st_mtime_ns for p in catalog.rglob("*")}

        def ghost(rows):  # an interaction with an item the catalog does not have
            rows[4][1] = "ghost"
            return rows

        edit_csv(tmp_path / "raw" / "shop" / "interactions.csv", ghost)
        bad = job.execute_in_process(instance=inst, partition_key="shop", raise_on_error=False)
        assert not bad.success
        (ev,) = check_evaluations(bad)
        assert ev.check_name == checks.VALIDATION_CHECK and not ev.passed
        assert ev.severity == dg.AssetCheckSeverity.ERROR
        assert ev.metadata["failed_expectations"].value >= 1 and ev.metadata["failing_rows"].value >= 1
        assert "ghost" in ev.metadata["sample rows"].value
        assert "| interactions |" in ev.metadata["failing expectations"].value
        report = Path(ev.metadata["report"].value)
        assert report == tmp_path / "art" / "validated_catalog" / "shop.validation-failed.md" and report.is_file()
        # the new raw catalog was imported; nothing after the failed validation materialised
        assert {e.asset_key.to_user_string() for e in bad.get_asset_materialization_events()} == {"raw_catalog"}
        assert len(materializations(inst, "validated_catalog", "shop")) == 1  # the good one only
        assert materializations(inst, "item_features", "shop") == []
        assert bad.get_step_failure_events()[0].step_key == "validated_catalog"
        # what the UI shows on the asset's Checks tab: the failed execution, for this partition
        key = dg.AssetCheckKey(dg.AssetKey("validated_catalog"), checks.VALIDATION_CHECK)
        latest = inst.event_log_storage.get_asset_check_execution_history(key, limit=1)[0]
        assert latest.status.value == "FAILED"
        assert latest.event.dagster_event.event_specific_data.partition == "shop"
        # the last good catalog is left as it was
        assert {p.name: p.stat().st_mtime_ns for p in catalog.rglob("*")} == before
