"""python -m deploy.rollback and deploy.registry.MlflowRegistry on a real MLflow sqlite store
(versions created without artifacts: only aliases and tags move)."""

import pytest
import yaml

from deploy import rollback
from deploy.registry import MlflowRegistry
from mmrec import promotion

NAME = "mmrec-shop"


@pytest.fixture(scope="module")
def empty_store(tmp_path_factory):
    """A migrated, empty sqlite store (creating one costs seconds: each test copies it)."""
    from mlflow import MlflowClient

    path = tmp_path_factory.mktemp("template") / "mlflow.db"
    MlflowClient(f"sqlite:///{path}").search_experiments()
    return path


@pytest.fixture
def store(tmp_path, empty_store):
    """A pipeline config (target ``shop``) whose MLflow store holds ``mmrec-shop`` versions 1..3,
    each promoted over the previous one by ``mmrec.promotion.record``."""
    import shutil

    from mlflow import MlflowClient

    (tmp_path / "mlflow").mkdir()
    shutil.copyfile(empty_store, tmp_path / "mlflow" / "mlflow.db")
    uri = f"sqlite:///{tmp_path / 'mlflow' / 'mlflow.db'}"
    client = MlflowClient(uri, registry_uri=uri)
    client.create_registered_model(NAME)
    registry = MlflowRegistry(uri)
    champion = None
    for n in range(1, 4):
        v = str(client.create_model_version(NAME, source=str(tmp_path / f"v{n}")).version)
        promotion.record(registry, NAME, v, promotion.Comparison(
            "NDCG@10", {"NDCG@10": n / 10}, None if champion is None else {"NDCG@10": (n - 1) / 10}, champion, "masked", 5, 9))
        champion = v
    cfg = tmp_path / "pipeline.yaml"
    cfg.write_text(yaml.safe_dump({"root": str(tmp_path), "artifacts": "artifacts", "domains": {
        "books": {"role": "source", "source": {"format": "tabular", "path": "raw/books"}},
        "shop": {"role": "target", "source": {"format": "tabular", "path": "raw/shop"}}}}))
    return {"uri": uri, "config": cfg, "client": client, "registry": registry}


def aliases(client) -> dict[str, str]:
    return {k: str(v) for k, v in client.get_registered_model(NAME).aliases.items()}


def test_the_registry_records_the_promotions(store):
    client, reg = store["client"], store["registry"]
    assert aliases(client) == {"champion": "3", "challenger": "3", "previous_champion": "2"}
    mv = client.get_model_version(NAME, "3")
    assert mv.tags["promotion.decision"] == "promoted" and mv.tags["previous_champion"] == "2"
    assert mv.tags["promotion.champion_value"] == "0.200000" and mv.tags["promotion.challenger_value"] == "0.300000"
    assert mv.description.startswith("promoted (beats v2); valid NDCG@10")
    assert reg.alias_version(NAME, "nope") is None and reg.alias_version("ghost", "champion") is None
    reg.delete_alias(NAME, "nope")  # deleting an absent alias is not an error


def test_one_command_rolls_back_to_the_previous_champion(store, capsys):
    client = store["client"]
    assert rollback.main(["--config", str(store["config"]), "--dry-run"]) == 0
    assert "version 3 would go back to 2" in capsys.readouterr().out
    assert aliases(client)["champion"] == "3"

    assert rollback.main(["--config", str(store["config"])]) == 0
    out = capsys.readouterr().out
    assert "models:/mmrec-shop@champion: version 3 -> 2 (previous_champion -> version 1)" in out
    assert aliases(client) == {"champion": "2", "challenger": "3", "previous_champion": "1"}
    assert client.get_model_version(NAME, "3").tags["rolled_back_to"] == "2"

    assert rollback.main(["--tracking-uri", store["uri"], "--model", NAME]) == 0
    assert "version 2 -> 1 (no earlier champion recorded)" in capsys.readouterr().out
    assert aliases(client) == {"champion": "1", "challenger": "3"}

    assert rollback.main(["--config", str(store["config"])]) == 2
    assert "error: mmrec-shop@champion is version 1 and no earlier champion is recorded" in capsys.readouterr().err
    assert aliases(client)["champion"] == "1"


@pytest.mark.parametrize("args, message", [
    (["--domain", "books"], "'books' is a source domain"),
    (["--model", "mmrec-ghost"], "mmrec-ghost has no 'champion' alias"),
    (["--alias", "staging"], "mmrec-shop has no 'staging' alias"),
])
def test_what_cannot_be_rolled_back_is_a_clear_error(store, capsys, args, message):
    assert rollback.main(["--config", str(store["config"]), *args]) == 2
    assert message in capsys.readouterr().err
    assert aliases(store["client"])["champion"] == "3"
