"""deploy.serve: finds the registered champion (or a folder), checks the port first, and starts the
service on it; deploy.recommend asks it over HTTP."""

import os
import socket
import subprocess
import sys
import time

import polars as pl
import pytest
import torch
import yaml

from deploy import recommend as client
from deploy import serve
from mmrec.export import export_model, load_model
from mmrec.models.recommender import Recommender
from orchestration import mlflow_support as ms
from tests.conftest import REPO
from tests.deploy.helpers import Server, free_port
from tests.models.test_recommender import SEQ, config
from tests.models.test_towers import N, raw_content

IDS = [f"it{i}" for i in range(1, N + 1)]
MODEL = "mmrec-shop"


@pytest.fixture(scope="module")
def registry(tmp_path_factory):
    """A pipeline config whose root holds an MLflow store with ``mmrec-shop@champion`` (tiny fused model)."""
    root = tmp_path_factory.mktemp("deploy")
    torch.manual_seed(0)
    model = Recommender(config("fused"), n_items=N).attach(raw_content(), SEQ).eval()
    item_map = pl.DataFrame({"item_idx": list(range(1, N + 1)), "item_id": IDS})
    model_dir = export_model(model, root / "export" / "model", item_map, "shop", {"stage": "test"})
    uri = ms.default_tracking_uri(root)
    with ms.mlflow_run(uri, "shop", "finetune", {"stage": "served_model"}) as tracker:
        version = ms.register_model(uri, model_dir, MODEL, tracker.run_id, {"gate": "passed"})
    ms.promote(uri, MODEL, version)
    cfg = root / "pipeline.yaml"
    cfg.write_text(yaml.safe_dump({
        "root": str(root), "artifacts": "artifacts",
        "domains": {"books": {"role": "source", "source": {"format": "tabular", "path": "raw/books"}},
                    "shop": {"role": "target", "source": {"format": "tabular", "path": "raw/shop"}}},
    }))
    return {"root": root, "uri": uri, "config": cfg, "version": version, "exported": load_model(model_dir)}


def test_check_finds_the_champion_from_the_pipeline_config(registry, capsys):
    assert serve.main(["--config", str(registry["config"]), "--check"]) == 0
    out = capsys.readouterr().out
    assert f"models:/{MODEL}@champion -> version {registry['version']}" in out
    assert registry["uri"] in out and "gate=passed" in out


def test_the_check_does_not_import_dagster_or_torch(registry):
    """The server's start-up path stays light: finding the model needs the config and MLflow only."""
    code = ("import sys; from deploy import serve; rc = serve.main(['--config', sys.argv[1], '--check']); "
            "print(rc, sorted(m for m in ('dagster', 'torch') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code, str(registry["config"])], cwd=REPO, capture_output=True,
                         text=True, check=True).stdout
    assert out.strip().splitlines()[-1] == "0 []"


@pytest.mark.parametrize("args, message", [
    (["--domain", "books"], "'books' is a source domain"),
    (["--domain", "nope"], "unknown domain 'nope'"),
    (["--domain", "shop", "--alias", "staging"], "versions 1 exist but none has the alias 'staging'"),
    (["--model", "mmrec-ghost"], "no such registered model"),
])
def test_what_cannot_be_served_is_a_clear_error(registry, capsys, args, message):
    assert serve.main(["--config", str(registry["config"]), "--check", *args]) == 2
    err = capsys.readouterr().err
    assert message in err


def test_a_target_must_be_chosen_when_there_are_several(tmp_path):
    cfg = tmp_path / "p.yaml"
    cfg.write_text(yaml.safe_dump({"root": str(tmp_path), "artifacts": "a", "domains": {
        "a": {"role": "target", "source": {"format": "tabular", "path": "a"}},
        "b": {"role": "target", "source": {"format": "tabular", "path": "b"}}}}))
    with pytest.raises(serve.ServeError, match=r"target domains \['a', 'b'\]: choose one with --domain"):
        serve.resolve_target(str(cfg), None, None, None)


def test_the_service_serves_the_champion_like_the_exported_model(registry, capsys):
    """The registered version's folder is downloaded into the state folder and served by uvicorn."""
    env = {k: v for k, v in os.environ.items() if k not in ("MLFLOW_TRACKING_URI", "MLFLOW_REGISTRY_URI")}
    env["PATH"] = "/usr/bin:/bin"  # the venv is not activated: nothing may rely on its scripts being on PATH
    server = Server(["--config", str(registry["config"])], registry["root"] / "server.log", env)
    try:
        server.wait_ready()
        histories = [["it1", "it2", "it3"], ["it7"]]
        got = client.recommend(server.url, histories, k=4)
        expected = registry["exported"].recommend(histories, k=4)
        assert [[i for i, _ in r] for r in got] == [[i for i, _ in r] for r in expected]
        assert [[s for _, s in r] for r in got] == [pytest.approx([s for _, s in r], abs=1e-5) for r in expected]
        status, version = server.call("GET", "/version")
        assert status == 200 and version["name"] == MODEL and version["version"] == registry["version"]
        assert version["alias"] == "champion" and version["run_id"] and "data_version" in version
        assert (registry["root"] / "serving" / MODEL / "models" / f"v{registry['version']}" / ".complete").exists()
        with pytest.raises(RuntimeError, match="answered 422: unknown_item: unknown item id 'ghost'"):
            client.recommend(server.url, [["ghost"]])
        assert client.main(["--url", server.url, "--history", "it1", "it2", "--k", "2"]) == 0
        out = capsys.readouterr().out
        assert "user 1: history it1 it2" in out and out.count("\n") == 3
    finally:
        server.stop()


def test_a_busy_port_fails_before_the_model_is_looked_up(registry, capsys):
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        t0 = time.monotonic()
        # the model does not even exist: the port is checked first, in well under a second
        rc = serve.main(["--model", "mmrec-ghost", "--tracking-uri", registry["uri"], "--port", str(port)])
        assert rc == 2 and time.monotonic() - t0 < 2
    err = capsys.readouterr().err
    assert f"cannot listen on 127.0.0.1:{port}: Address already in use" in err and "Traceback" not in err


def test_a_folder_that_is_not_a_model_is_refused(tmp_path, capsys):
    assert serve.main(["--model-dir", str(tmp_path), "--port", str(free_port())]) == 2
    assert "not an exported model folder (no model.json)" in capsys.readouterr().err


def test_deploy_serve_runs_without_orchestration(registry):
    """Starting the service imports the library and MLflow, never orchestration/ (nor Dagster)."""
    code = ("import sys; from deploy import serve, service; rc = serve.main(['--config', sys.argv[1], '--check']); "
            "print(rc, sorted(m for m in sys.modules if m.split('.')[0] in ('orchestration', 'dagster')))")
    out = subprocess.run([sys.executable, "-c", code, str(registry["config"])], cwd=REPO, capture_output=True,
                         text=True, check=True).stdout
    assert out.strip().splitlines()[-1] == "0 []"


def test_client_reports_a_server_that_is_not_there(capsys):
    assert client.main(["--url", f"http://127.0.0.1:{free_port()}", "--history", "x"]) == 2
    assert "Connection refused" in capsys.readouterr().err
