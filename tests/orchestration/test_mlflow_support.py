"""The MLflow layer: the tracker writes what the library logs, runs end with the right status,
the registered pyfunc model recommends exactly like the exported folder, and raw new items work.

One sqlite store is created per session (its migrations cost ~8 s) and copied for each test.
"""

import base64
import json
import os
import re
import shutil
import subprocess
import sys
from importlib.metadata import version
from pathlib import Path

import pandas as pd
import polars as pl
import pytest
import torch
import yaml
from PIL import Image

from mmrec.export import export_model, load_model
from mmrec.models.recommender import Recommender
from mmrec.tracking import JsonlTracker
from orchestration import mlflow_support as ms
from orchestration.mmrec_pyfunc import encode_new_items
from tests.conftest import REPO
from tests.models.test_recommender import SEQ, config
from tests.models.test_towers import N, raw_content

IDS = [f"it{i}" for i in range(1, N + 1)]
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="session")
def store_template(tmp_path_factory) -> Path:
    """A migrated, empty sqlite store file."""
    from mlflow import MlflowClient

    root = tmp_path_factory.mktemp("store_template")
    MlflowClient(ms.default_tracking_uri(root)).search_experiments()  # creates the tables
    return root / "mlflow" / "mlflow.db"


def fresh_store(template: Path, root: Path) -> str:
    (root / "mlflow").mkdir(parents=True, exist_ok=True)
    shutil.copyfile(template, root / "mlflow" / "mlflow.db")
    return ms.default_tracking_uri(root)


@pytest.fixture
def uri(store_template, tmp_path) -> str:
    return fresh_store(store_template, tmp_path)


@pytest.fixture
def client(uri):
    from mlflow import MlflowClient

    return MlflowClient(uri)


@pytest.fixture(scope="session")
def exported_dir(tmp_path_factory) -> Path:
    """A tiny fused text+image model, exported (no pipeline run)."""
    torch.manual_seed(0)
    model = Recommender(config("fused"), n_items=N).attach(raw_content(), SEQ).eval()
    item_map = pl.DataFrame({"item_idx": list(range(1, N + 1)), "item_id": IDS})
    return export_model(model, tmp_path_factory.mktemp("export") / "model", item_map, "shop", {"stage": "test"})


@pytest.fixture(scope="session")
def exported(exported_dir):
    return load_model(exported_dir)


@pytest.fixture(scope="session")
def registered(store_template, exported_dir, tmp_path_factory):
    """The exported model registered as version 1 of ``mmrec-shop`` and promoted to champion."""
    import mlflow

    root = tmp_path_factory.mktemp("registry")
    uri = fresh_store(store_template, root)
    before = (mlflow.get_tracking_uri(), os.environ.get("MLFLOW_TRACKING_URI"), os.environ.get("MLFLOW_REGISTRY_URI"))
    with ms.mlflow_run(uri, "shop", "finetune", {"stage": "served_model"}) as tracker:
        version_ = ms.register_model(uri, exported_dir, "mmrec-shop", tracker.run_id, {"gate": "passed"})
    ms.promote(uri, "mmrec-shop", version_)
    model = ms.load_registered(uri, "mmrec-shop", "champion")
    after = (mlflow.get_tracking_uri(), os.environ.get("MLFLOW_TRACKING_URI"), os.environ.get("MLFLOW_REGISTRY_URI"))
    return {"uri": uri, "root": root, "version": version_, "run_id": tracker.run_id, "model": model,
            "process_uris": (before, after)}


def artifact_paths(client, run_id: str, path: str | None = None) -> set[str]:
    out = set()
    for f in client.list_artifacts(run_id, path):
        out |= artifact_paths(client, run_id, f.path) if f.is_dir else {f.path}
    return out


# --------------------------------------------------------------------------------------------
# Store, runs, tracker

def test_default_uri_and_experiment_artifacts_stay_under_root(uri, client, tmp_path):
    assert uri == f"sqlite:///{tmp_path.absolute()}/mlflow/mlflow.db" and uri.startswith("sqlite:////")
    exp_id = ms.ensure_experiment(uri, "shop/finetune")
    assert ms.ensure_experiment(uri, "shop/finetune") == exp_id  # idempotent
    location = client.get_experiment(exp_id).artifact_location
    assert location == (tmp_path / "mlflow" / "artifacts" / "shop_finetune").as_uri()
    client.delete_experiment(exp_id)
    assert ms.ensure_experiment(uri, "shop/finetune") == exp_id  # restored, not duplicated
    assert client.get_experiment(exp_id).lifecycle_stage == "active"


def test_tracker_logs_params_metrics_tags_and_artifacts(uri, client, tmp_path):
    (tmp_path / "report.md").write_text("# report\n")
    folder = tmp_path / "best"
    folder.mkdir()
    (folder / "metrics.json").write_text('{"NDCG@10": 0.5}')
    with ms.mlflow_run(uri, "shop", "finetune", {"stage": "finetuned_model"}) as tracker:
        tracker.log_params({"train.lr": 1e-3, "train.ks": [5, 10], "model(dim)": 16, "long": "x" * 7000})
        for epoch, (loss, ndcg) in enumerate([(2.0, 0.1), (1.5, 0.2), (1.2, 0.25)], start=1):
            tracker.log_metrics({"train/loss": loss, "val/NDCG@10": ndcg, "val/cold/HR@10": ndcg / 2}, step=epoch)
        tracker.set_tags({"variant": "model", "resumed_from_step": 3})
        tracker.log_artifact(tmp_path / "report.md", "reports/validation.md")
        tracker.log_artifact(folder)
        tracker.log_artifact(folder / "metrics.json", "best_metrics.json")
        run_id = tracker.run_id
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED" and run.info.run_name == "finetune"
    p = run.data.params
    assert p["train.lr"] == "0.001" and json.loads(p["train.ks"]) == [5, 10] and p["model_dim_"] == "16"
    assert len(p["long"]) == ms.MAX_PARAM_VALUE and p["long"].endswith("[truncated]")
    history = client.get_metric_history(run_id, "val/NDCG_at_10")
    assert [(m.step, m.value) for m in sorted(history, key=lambda m: m.step)] == [(1, 0.1), (2, 0.2), (3, 0.25)]
    assert [m.step for m in client.get_metric_history(run_id, "train/loss")] == [1, 2, 3]
    assert run.data.metrics["val/cold/HR_at_10"] == 0.125
    assert run.data.tags["stage"] == "finetuned_model" and run.data.tags["variant"] == "model"
    assert run.data.tags["resumed_from_step"] == "3"
    assert artifact_paths(client, run_id) == {"reports/validation.md", "best/metrics.json", "best_metrics.json"}
    artifact_dir = tmp_path / "mlflow" / "artifacts" / "shop" / run_id / "artifacts"
    assert (artifact_dir / "reports" / "validation.md").read_text() == "# report\n"


def test_mlflow_key_only_produces_valid_names():
    assert ms.mlflow_key("val/NDCG@10") == "val/NDCG_at_10"
    assert ms.mlflow_key("a,b(c)") == "a_b_c_"
    assert ms.mlflow_key("/a/../b//c") == "_/a/_/b/_/c"
    long = ms.mlflow_key("k" * 300)
    assert len(long) == ms.MAX_KEY and long != ms.mlflow_key("k" * 301)


def test_relogging_a_param_with_another_value_does_not_crash(uri, client):
    with ms.mlflow_run(uri, "shop", "resumed", {}) as tracker:
        tracker.log_params({"train.lr": 0.001, "train.epochs": 3})
        tracker.log_params({"train.lr": 0.001, "train.epochs": 3})  # a resumed run logs the same again
        tracker.log_params({"train.lr": 0.0005, "train.seed": 1})  # and a changed value
        run_id = tracker.run_id
    run = client.get_run(run_id)
    assert run.data.params == {"train.lr": "0.001", "train.epochs": "3", "train.seed": "1"}
    assert run.data.tags["changed_param.train.lr"] == "0.0005"
    assert run.info.status == "FINISHED"


def test_a_failing_block_marks_the_run_failed(uri, client):
    with pytest.raises(RuntimeError, match="boom"):
        with ms.mlflow_run(uri, "shop", "broken", {"stage": "finetuned_model"}) as tracker:
            tracker.log_metrics({"train/loss": 1.0}, step=1)
            raise RuntimeError("boom")
    run = client.get_run(tracker.run_id)
    assert run.info.status == "FAILED" and run.data.metrics["train/loss"] == 1.0


def test_importing_the_module_does_not_import_mlflow():
    code = "import sys, orchestration.mlflow_support; print('mlflow' in sys.modules, 'matplotlib' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["False", "False"]


# --------------------------------------------------------------------------------------------
# Provenance

def test_provenance_tags_name_commit_data_and_version(tmp_path):
    tags = ms.provenance_tags(REPO)
    assert set(tags) == {"git_commit", "git_dirty", "dvc_data_md5", "mmrec_version"}
    if (REPO / ".git").exists() and shutil.which("git"):
        assert re.fullmatch(r"[0-9a-f]{40}", tags["git_commit"]) and tags["git_dirty"] in ("true", "false")
    outs = yaml.safe_load((REPO / "data.dvc").read_text())["outs"]
    assert tags["dvc_data_md5"] == next(o["md5"] for o in outs if o["path"] == "data")
    assert tags["mmrec_version"] == version("mmrec")
    elsewhere = ms.provenance_tags(tmp_path)  # not a checkout, no data.dvc
    assert elsewhere["git_commit"] == "unknown" and elsewhere["dvc_data_md5"] == "unknown"


# --------------------------------------------------------------------------------------------
# Figures

def test_training_plots_and_metrics_table_are_png_artifacts(uri, client, tmp_path):
    run_dir = tmp_path / "run"
    local = JsonlTracker(run_dir / "log")  # what a stage writes
    for step in range(1, 7):
        local.log_metrics({"train/loss": 3 / step, "train/main": 2 / step, "train/lr/encoders": 1e-4,
                           "train/lr/recommender": 1e-3 / step}, step=step)
        if step % 2 == 0:
            local.log_metrics({"val/NDCG@10": 0.1 * step, "val/HR@10": 0.2 * step, "val/cold/NDCG@10": 0.05 * step,
                               "val/n_users": 5}, step=step)
    result = {"domain": "shop", "split": "test",
              "models": {n: {"HR@10": v, "NDCG@10": v / 2, "MRR@10": v / 3, "cold/NDCG@10": v / 4, "n_users": 5}
                         for n, v in (("finetuned", 0.4), ("scratch", 0.3), ("id", 0.2))},
              "gate": {"metric": "NDCG@10", "margin": 0.0, "finetuned": 0.2, "best_baseline": 0.15, "passed": True}}
    with ms.mlflow_run(uri, "shop", "plots", {}) as tracker:
        plots = ms.log_training_plots(tracker, run_dir)
        table = ms.log_metrics_table_png(tracker, result, tmp_path / "eval" / "metrics_table.png")
        run_id = tracker.run_id
    assert [p.name for p in plots] == ["loss.png", "validation.png", "learning_rate.png"]
    for p in [*plots, table]:
        assert p.read_bytes()[:8] == PNG_MAGIC and p.stat().st_size > 1000
    assert artifact_paths(client, run_id) == {"plots/loss.png", "plots/validation.png", "plots/learning_rate.png",
                                              "metrics_table.png"}


def test_plots_of_an_empty_log_are_none(tmp_path):
    JsonlTracker(tmp_path / "run" / "log")
    assert ms.log_training_plots(None, tmp_path / "run") == []


# --------------------------------------------------------------------------------------------
# Registry and the served model

def test_register_promote_tags_signature(registered):
    from mlflow import MlflowClient

    client = MlflowClient(registered["uri"])
    assert registered["version"] == "1"
    mv = client.get_model_version("mmrec-shop", "1")
    assert mv.run_id == registered["run_id"]
    assert mv.tags == {"domain": "shop", "item_tower": "fused", "n_items": str(N), "gate": "passed"}
    aliases = client.get_registered_model("mmrec-shop").aliases  # the sqlite store gives ints
    assert {k: str(v) for k, v in aliases.items()} == {"champion": "1"}
    assert str(client.get_model_version_by_alias("mmrec-shop", "champion").version) == "1"
    model = registered["model"]
    assert [c.name for c in model.metadata.get_input_schema().inputs] == ["history", "k", "new_items"]
    assert model.metadata.get_params_schema() is not None
    # the model, its code and the exported folder all live under the store's root, not ./mlruns
    logged = client.get_logged_model(model.metadata.model_id)
    assert logged.source_run_id == registered["run_id"]
    assert logged.artifact_location.startswith((registered["root"] / "mlflow" / "artifacts").as_uri())
    assert client.get_run(registered["run_id"]).info.status == "FINISHED"
    before, after = registered["process_uris"]
    assert before == after  # the process-wide tracking URI is restored after registering and loading


def test_rest_payload_is_served_like_a_dataframe(registered, exported):
    # what `mlflow models serve` does with a request body: parse it against the signature, predict;
    # records may leave the optional fields out (MLflow makes them NaN before checking types)
    from mlflow.pyfunc.scoring_server import _parse_json_data

    model = registered["model"]
    payload = {"dataframe_records": [{"history": ["it1", "it2"]},
                                     {"history": ["it1", "fresh"], "new_items": [{"item_id": "fresh", "text": "hello"}]},
                                     {"history": ["it5"], "k": 2}],
               "params": {"k": 3}}
    parsed = _parse_json_data(json.dumps(payload), model.metadata, model.metadata.get_input_schema())
    pred = model.predict(parsed.data, params=parsed.params)
    assert_same_recommendations(pred.iloc[:1], exported.recommend([["it1", "it2"]], k=3))
    assert len(pred["item_ids"][1]) == 3 and "fresh" not in pred["item_ids"][1]
    assert_same_recommendations(pred.iloc[2:], exported.recommend([["it5"]], k=2))


def assert_same_recommendations(pred: pd.DataFrame, expected: list[list[tuple[str, float]]]):
    assert list(pred.columns) == ["item_ids", "scores"] and len(pred) == len(expected)
    for ids, scores, exp in zip(pred["item_ids"], pred["scores"], expected):
        assert list(ids) == [i for i, _ in exp]
        assert list(scores) == pytest.approx([s for _, s in exp], abs=1e-5)


def test_served_model_recommends_exactly_like_the_exported_folder(registered, exported):
    model = registered["model"]
    histories = [["it1", "it2", "it3"], ["it7"], [], IDS[:8]]
    assert_same_recommendations(model.predict(pd.DataFrame({"history": histories})), exported.recommend(histories, k=10))
    assert_same_recommendations(model.predict(pd.DataFrame({"history": histories}), params={"k": 3}),
                                exported.recommend(histories, k=3))
    per_row = model.predict(pd.DataFrame({"history": histories[:2], "k": [2, 5]}))
    assert [len(r) for r in per_row["item_ids"]] == [2, 5]
    assert_same_recommendations(per_row.iloc[1:], exported.recommend(histories[1:2], k=5))
    with pytest.raises(Exception, match="ghost"):
        model.predict(pd.DataFrame({"history": [["ghost"]]}))


def test_new_item_vector_from_raw_text_equals_the_catalog_vector(exported):
    # item 1 of raw_content is text-only: the same text through the raw path gives the same vector
    text = "item number 1 with words x "
    vec = encode_new_items(exported.model, [{"item_id": "copy-of-it1", "text": text}])
    torch.testing.assert_close(vec[0], exported.item_vectors[1], atol=1e-5, rtol=1e-5)


def test_new_items_are_candidates_and_history(registered, exported, tmp_path):
    model = registered["model"]
    img = tmp_path / "new.png"
    Image.fromarray(torch.randint(0, 256, (40, 40, 3), generator=torch.Generator().manual_seed(1),
                                  dtype=torch.uint8).numpy()).save(img)
    b64 = base64.b64encode(img.read_bytes()).decode()
    new = [{"item_id": "new-text", "text": "item number 1 with words x "},  # same content as it1
           {"item_id": "new-image", "image_base64": b64},
           {"item_id": "new-both", "text": "a brand new product", "image_base64": b64}]
    df = pd.DataFrame({"history": [["it2", "it3"], ["it2", "new-both"], ["it4"]], "k": [N + 3, N + 3, 10],
                       "new_items": [new, new, None]})
    pred = model.predict(df)
    # every new item not in the history is a candidate, ranked among the catalog
    assert set(pred["item_ids"][0]) == set(IDS) - {"it2", "it3"} | {"new-text", "new-image", "new-both"}
    assert "new-both" not in pred["item_ids"][1] and len(pred["item_ids"][1]) == N + 3 - 2
    # a new item in the history changes the user vector; a row without new items is untouched
    assert pred["scores"][1] != pred["scores"][0]
    assert_same_recommendations(pred.iloc[2:], exported.recommend([["it4"]], k=10))
    # a new item with the content of it1 scores like it1 does
    row = dict(zip(pred["item_ids"][0], pred["scores"][0]))
    assert row["new-text"] == pytest.approx(row["it1"], abs=1e-4)
    with pytest.raises(Exception, match="already in the catalog"):
        model.predict(pd.DataFrame({"history": [["it1"]], "new_items": [[{"item_id": "it2", "text": "dup"}]]}))
    with pytest.raises(Exception, match="no content"):
        model.predict(pd.DataFrame({"history": [["it1"]], "new_items": [[{"item_id": "empty", "text": " "}]]}))


def test_requests_never_name_server_files(registered, tmp_path):
    """Images come as bytes within a pixel limit; a path on the server is refused, not opened."""
    model = registered["model"]
    Image.new("RGB", (20, 20), (200, 10, 10)).save(tmp_path / "red.png")
    with pytest.raises(Exception, match="image_path is not accepted"):
        model.predict(pd.DataFrame({"history": [["it1"]],
                                    "new_items": [[{"item_id": "x", "image_path": str(tmp_path / "red.png")}]]}))
    huge = tmp_path / "huge.png"
    Image.new("1", (5000, 5000)).save(huge)  # a few KB of PNG, 25 M pixels
    with pytest.raises(Exception, match="5000x5000 pixels: 25000000 exceeds the limit"):
        model.predict(pd.DataFrame({"history": [["it1"]], "new_items": [[{
            "item_id": "x", "image_base64": base64.b64encode(huge.read_bytes()).decode()}]]}))
    with pytest.raises(Exception, match="k must be at least 1, got 0"):
        model.predict(pd.DataFrame({"history": [["it1"]]}), params={"k": 0})