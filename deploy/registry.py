"""The MLflow model registry as serving sees it: find a version by alias, download its exported
folder once, move aliases and tag versions.

``MlflowRegistry`` implements ``mmrec.promotion.Registry`` (the library decides; this moves the
aliases), so the pipeline's registration (``orchestration``), ``python -m deploy.rollback`` and the
service's reload on alias change share one implementation. ``mlflow`` is imported lazily: finding
a model stays light (no torch).
"""

from __future__ import annotations

import contextlib
import fcntl
from pathlib import Path


class RegistryError(RuntimeError):
    """A registry lookup that failed: the message says what exists and what to do."""


def _client(tracking_uri: str):
    from mlflow import MlflowClient

    return MlflowClient(tracking_uri, registry_uri=tracking_uri)


class MlflowRegistry:
    """``mmrec.promotion.Registry`` over an MLflow tracking/registry URI."""

    def __init__(self, tracking_uri: str):
        self.uri = tracking_uri
        self.client = _client(tracking_uri)

    def alias_version(self, name: str, alias: str) -> str | None:
        from mlflow.exceptions import MlflowException

        try:
            return str(self.client.get_model_version_by_alias(name, alias).version)
        except MlflowException:
            return None

    def set_alias(self, name: str, alias: str, version: str) -> None:
        self.client.set_registered_model_alias(name, alias, str(version))

    def delete_alias(self, name: str, alias: str) -> None:
        from mlflow.exceptions import MlflowException

        with contextlib.suppress(MlflowException):
            self.client.delete_registered_model_alias(name, alias)

    def version_tags(self, name: str, version: str) -> dict[str, str]:
        return dict(self.client.get_model_version(name, str(version)).tags)

    def set_version_tags(self, name: str, version: str, tags: dict[str, str]) -> None:
        for k, v in tags.items():
            self.client.set_model_version_tag(name, str(version), k, str(v))

    def set_description(self, name: str, version: str, text: str) -> None:
        self.client.update_model_version(name, str(version), description=text)

    def describe(self, name: str, alias: str) -> dict:
        return describe(self.uri, name, alias, self.client)


def describe(tracking_uri: str, model: str, alias: str, client=None) -> dict:
    """The registered version behind ``model@alias``: version, run id, source, tags, data version."""
    from mlflow.exceptions import MlflowException

    client = client or _client(tracking_uri)
    try:
        mv = client.get_model_version_by_alias(model, alias)
    except MlflowException as exc:
        try:
            versions = [m.version for m in client.search_model_versions(f"name='{model}'")]
        except MlflowException:
            versions = []
        listed = ", ".join(str(v) for v in sorted(versions, key=int))
        what = f"versions {listed} exist but none has the alias {alias!r}" if versions else "no such registered model"
        raise RegistryError(
            f"cannot serve models:/{model}@{alias} from {tracking_uri}: {what} ({exc.error_code}). "
            "Run the pipeline first (`make demo`, or materialise served_model in the Dagster UI); the "
            "alias is set only when the quality gate passes."
        ) from exc
    run_tags = {}
    try:
        run_tags = client.get_run(mv.run_id).data.tags if mv.run_id else {}
    except MlflowException:
        pass
    return {"name": model, "alias": alias, "version": str(mv.version), "run_id": mv.run_id,
            "source": mv.source, "tags": dict(mv.tags), "git_commit": run_tags.get("git_commit"),
            "data_version": run_tags.get("dvc_data_md5")}


def fetch_model(tracking_uri: str, info: dict, dest: Path) -> Path:
    """The exported model folder of registered version ``info``, downloaded once into ``dest``
    (under a file lock: several workers reloading a new champion download it once)."""
    dest = Path(dest)
    done = dest / ".complete"
    if not done.exists():
        dest.parent.mkdir(parents=True, exist_ok=True)
        with open(dest.parent / f".{dest.name}.lock", "a+") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            if not done.exists():
                import mlflow

                uri = _client(tracking_uri).get_model_version_download_uri(info["name"], info["version"])
                dest.mkdir(parents=True, exist_ok=True)
                mlflow.artifacts.download_artifacts(artifact_uri=uri, dst_path=str(dest), tracking_uri=tracking_uri)
                done.touch()
    found = sorted(p.parent for p in dest.rglob("model.json"))
    if not found:
        raise RegistryError(f"models:/{info['name']}/{info['version']} holds no exported model folder (no model.json)")
    return found[0]
