"""MLflow for the orchestration layer: runs, a ``Tracker`` for the library, plots, registry.

The library (``mmrec``) never imports MLflow: its stages log through ``mmrec.tracking.Tracker``,
and this module provides ``MlflowTracker``, which writes to one existing run through an
``MlflowClient`` (no fluent, process-global "active run"). Facts this code works around:

- Only a database store is accepted (``./mlruns`` is refused): ``default_tracking_uri`` gives an
  absolute ``sqlite:////.../mlflow/mlflow.db``; artifacts go to ``.../mlflow/artifacts/<experiment>``
  (an experiment created without an artifact location would write to ``./mlruns`` of whatever
  the working directory happens to be).
- Metric, parameter and tag names may only hold letters, digits, ``_ - . : /`` and spaces:
  ``mlflow_key`` maps ``@`` to ``_at_`` (``val/NDCG@10`` -> ``val/NDCG_at_10``) and anything else
  to ``_``.
- A parameter may not be re-logged with another value (a resumed training run re-logs its
  config): the new value goes to a tag ``changed_param.<name>`` instead of failing the run.
- Values longer than MLflow's limits (params 6000, tags 8000 characters) are cut with a marker.
- Models are registered as "models from code" (``orchestration/mmrec_pyfunc.py`` + the exported
  model folder as an artifact): nothing is pickled. Promotion uses aliases, not stages.

MLflow is imported inside the functions, so importing this module (a Dagster code location does)
stays cheap. ``register_model`` and ``load_registered`` go through MLflow's fluent model API,
which reads the process-wide tracking URI: they set it for the duration of the call and restore
it afterwards (not thread-safe; the Dagster runs here execute their steps one at a time).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import shutil
import subprocess
import tempfile
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")

log = logging.getLogger(__name__)

PYFUNC_FILE = Path(__file__).with_name("mmrec_pyfunc.py")
"""The models-from-code file MLflow stores with every registered model."""

MAX_KEY = 250
MAX_PARAM_VALUE = 6000
MAX_TAG_VALUE = 8000
PARAMS_PER_BATCH = 100
METRICS_PER_BATCH = 1000
CHANGED_PARAM_PREFIX = "changed_param."

_BAD_KEY_CHARS = re.compile(r"[^\w\-. :/]")


# --------------------------------------------------------------------------------------------
# Names and values MLflow accepts

def mlflow_key(name: Any) -> str:
    """``name`` as a valid MLflow metric/param/tag key (see the module docstring); long names are
    cut and given a hash suffix so that two long names stay distinct."""
    raw = str(name)
    key = _BAD_KEY_CHARS.sub("_", raw.replace("@", "_at_"))
    # keys are also file names in some stores: no empty, "." or ".." path segments
    key = "/".join(p if p not in ("", ".", "..") else "_" for p in key.split("/"))
    if len(key) > MAX_KEY:
        key = key[: MAX_KEY - 9] + "~" + hashlib.sha1(raw.encode()).hexdigest()[:8]
    return key


def _cut(value: str, limit: int) -> str:
    marker = "...[truncated]"
    return value if len(value) <= limit else value[: limit - len(marker)] + marker


def _param_value(v: Any) -> str:
    if isinstance(v, (dict, list, tuple)):
        v = json.dumps(v, sort_keys=True, default=str)
    return _cut(str(v), MAX_PARAM_VALUE)


def _tag_value(v: Any) -> str:
    return _cut(str(v), MAX_TAG_VALUE)


def _chunks(items: list, size: int) -> Iterator[list]:
    for i in range(0, len(items), size):
        yield items[i : i + size]


# --------------------------------------------------------------------------------------------
# Store, experiments, runs

def default_tracking_uri(root: Path) -> str:
    """``sqlite:////<abs root>/mlflow/mlflow.db`` (the folder is created); the experiments that
    ``ensure_experiment`` creates for it keep their artifacts under ``<root>/mlflow/artifacts``."""
    folder = Path(root).absolute() / "mlflow"
    folder.mkdir(parents=True, exist_ok=True)
    return f"sqlite:///{folder / 'mlflow.db'}"


def default_artifact_root(tracking_uri: str) -> Path | None:
    """``<folder of the sqlite file>/artifacts`` for a sqlite URI, else None (the server decides)."""
    if not tracking_uri.startswith("sqlite:///"):
        return None
    db = tracking_uri[len("sqlite:///"):].split("?")[0]
    if not db or db == ":memory:":
        return None
    return Path(db).absolute().parent / "artifacts"


def ensure_experiment(tracking_uri: str, name: str, artifact_root: Path | None = None) -> str:
    """The id of experiment ``name``, created (artifacts in ``<artifact_root>/<name>``, default
    ``default_artifact_root``) or restored from deletion when needed."""
    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException

    client = MlflowClient(tracking_uri)
    exp = client.get_experiment_by_name(name)
    if exp is not None:
        if exp.lifecycle_stage == "deleted":
            client.restore_experiment(exp.experiment_id)
        return exp.experiment_id
    root = Path(artifact_root) if artifact_root is not None else default_artifact_root(tracking_uri)
    location = (root.absolute() / re.sub(r"[^\w.\-]", "_", name)).as_uri() if root is not None else None
    try:
        return client.create_experiment(name, artifact_location=location)
    except MlflowException as exc:  # created meanwhile by another process
        if exc.error_code != "RESOURCE_ALREADY_EXISTS":
            raise
        return client.get_experiment_by_name(name).experiment_id


class MlflowTracker:
    """``mmrec.tracking.Tracker`` writing to the MLflow run ``run_id`` (see the module docstring)."""

    def __init__(self, tracking_uri: str, run_id: str):
        from mlflow import MlflowClient

        self.tracking_uri = tracking_uri
        self.run_id = run_id
        self.client = MlflowClient(tracking_uri)

    def log_params(self, params: dict[str, Any]) -> None:
        from mlflow.entities import Param

        logged = self.client.get_run(self.run_id).data.params
        new: dict[str, str] = {}
        changed: dict[str, str] = {}
        for name, value in params.items():
            key, val = mlflow_key(name), _param_value(value)
            old = logged.get(key, new.get(key))
            if old is None:
                new[key] = val
            elif old != val:
                changed[key] = val
        for chunk in _chunks([Param(k, v) for k, v in new.items()], PARAMS_PER_BATCH):
            self.client.log_batch(self.run_id, params=chunk)
        if changed:
            log.warning("run %s: parameters %s were logged before with other values; the new values are "
                        "tags %s<name>", self.run_id, sorted(changed), CHANGED_PARAM_PREFIX)
            self.set_tags({CHANGED_PARAM_PREFIX + k: v for k, v in changed.items()})

    def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        batch = [Metric(mlflow_key(k), float(v), now, int(step or 0)) for k, v in metrics.items() if v is not None]
        for chunk in _chunks(batch, METRICS_PER_BATCH):
            self.client.log_batch(self.run_id, metrics=chunk)

    def log_artifact(self, path: Path, name: str | None = None) -> None:
        path = Path(path)
        name = (name or path.name).strip("/")
        if not name or ".." in Path(name).parts:
            raise ValueError(f"artifact name must be a relative path inside the run, got {name!r}")
        if path.is_dir():
            self.client.log_artifacts(self.run_id, str(path), artifact_path=name)
        elif path.is_file():
            parent, base = os.path.split(name)
            if base == path.name:
                self.client.log_artifact(self.run_id, str(path), artifact_path=parent or None)
            else:  # MLflow keeps a file's own name: copy it under the wanted one
                with tempfile.TemporaryDirectory() as tmp:
                    shutil.copyfile(path, Path(tmp) / base)
                    self.client.log_artifact(self.run_id, str(Path(tmp) / base), artifact_path=parent or None)
        else:
            raise FileNotFoundError(f"artifact not found: {path}")

    def set_tags(self, tags: dict[str, str]) -> None:
        from mlflow.entities import RunTag

        batch = [RunTag(mlflow_key(k), _tag_value(v)) for k, v in tags.items()]
        for chunk in _chunks(batch, PARAMS_PER_BATCH):
            self.client.log_batch(self.run_id, tags=chunk)


@contextmanager
def mlflow_run(tracking_uri: str, experiment: str, run_name: str, tags: dict[str, str]) -> Iterator[MlflowTracker]:
    """A new run in ``experiment`` (created if needed): FINISHED when the block ends, FAILED when
    it raises an exception, KILLED on an interrupt."""
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri)
    exp_id = ensure_experiment(tracking_uri, experiment)
    run = client.create_run(exp_id, run_name=run_name, tags={mlflow_key(k): _tag_value(v) for k, v in (tags or {}).items()})
    run_id = run.info.run_id
    try:
        yield MlflowTracker(tracking_uri, run_id)
    except Exception:
        client.set_terminated(run_id, "FAILED")
        raise
    except BaseException:
        client.set_terminated(run_id, "KILLED")
        raise
    client.set_terminated(run_id, "FINISHED")


# --------------------------------------------------------------------------------------------
# Provenance

def _git(root: Path, *args: str) -> str:
    return subprocess.run(["git", *args], cwd=root, capture_output=True, text=True, timeout=60, check=True).stdout.strip()


def provenance_tags(root: Path) -> dict[str, str]:
    """Where a run's code and data came from: ``git_commit`` (HEAD, or "unknown" outside a git
    checkout), ``git_dirty`` (tracked files modified: true/false/unknown), ``dvc_data_md5`` (the
    hash ``data.dvc`` records for the data folder, or "unknown") and ``mmrec_version``."""
    root = Path(root)
    tags = {"git_commit": "unknown", "git_dirty": "unknown", "dvc_data_md5": "unknown", "mmrec_version": "unknown"}
    try:
        commit = _git(root, "rev-parse", "HEAD")
        if re.fullmatch(r"[0-9a-f]{40}", commit):
            tags["git_commit"] = commit
            tags["git_dirty"] = str(bool(_git(root, "status", "--porcelain", "--untracked-files=no"))).lower()
    except (OSError, subprocess.SubprocessError):
        pass
    dvc_file = root / "data.dvc"
    if dvc_file.is_file():
        import yaml

        try:
            outs = (yaml.safe_load(dvc_file.read_text(encoding="utf-8")) or {}).get("outs") or []
            out = next((o for o in outs if o.get("path") == "data"), outs[0] if outs else {})
            if out.get("md5"):
                tags["dvc_data_md5"] = str(out["md5"])
        except (yaml.YAMLError, AttributeError):
            pass
    try:
        from importlib.metadata import PackageNotFoundError, version

        tags["mmrec_version"] = version("mmrec")
    except PackageNotFoundError:
        pass
    return tags


# --------------------------------------------------------------------------------------------
# Figures (matplotlib's object API with the Agg canvas: no pyplot, no global backend switch)

def _figure(width: float, height: float):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), dpi=100)
    FigureCanvasAgg(fig)
    return fig


def _base_metric(name: str) -> str:
    """``val/cold/NDCG@10`` -> ``NDCG``: the panel a validation metric goes to."""
    return name.rsplit("/", 1)[-1].split("@")[0]


def log_training_plots(tracker, run_dir: Path, out_dir: Path | None = None, prefix: str = "plots") -> list[Path]:
    """Learning curves of the training run in ``run_dir`` (read from the ``JsonlTracker`` folder
    ``<run_dir>/log`` the stage wrote) as PNG files in ``out_dir`` (default ``<run_dir>/plots``),
    logged to ``tracker`` (if not None) under ``<prefix>/``: ``loss.png`` (train/* losses),
    ``validation.png`` (val/* ranking metrics, one panel per metric) and ``learning_rate.png``."""
    from mmrec.tracking import read_jsonl_run

    run = read_jsonl_run(Path(run_dir) / "log")
    out_dir = Path(out_dir) if out_dir is not None else Path(run_dir) / "plots"
    names = sorted({k for r in run.metrics for k in r["metrics"]})
    lr = [n for n in names if n.startswith("train/lr/")]
    losses = [n for n in names if n.startswith("train/") and n not in lr]
    val = [n for n in names if n.startswith("val/") and "@" in n]

    def series(name):
        pts = [(i if s is None else s, v) for i, (s, v) in enumerate(run.series(name))]
        return [p[0] for p in pts], [p[1] for p in pts]

    figures: dict[str, Any] = {}
    if losses:
        fig = _figure(7, 4)
        ax = fig.add_subplot()
        for n in losses:
            ax.plot(*series(n), label=n.removeprefix("train/"))
        ax.set(xlabel="step", ylabel="loss", title="training loss")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
        figures["loss"] = fig
    if val:
        panels = sorted({_base_metric(n) for n in val})
        fig = _figure(4.5 * len(panels), 4)
        for i, panel in enumerate(panels):
            ax = fig.add_subplot(1, len(panels), i + 1)
            for n in (n for n in val if _base_metric(n) == panel):
                ax.plot(*series(n), marker="o", markersize=3, linestyle="--" if "/cold/" in n else "-",
                        label=n.removeprefix("val/"))
            ax.set(xlabel="step", title=f"validation {panel}")
            ax.grid(alpha=0.3)
            ax.legend(fontsize=7)
        figures["validation"] = fig
    if lr:
        fig = _figure(7, 3)
        ax = fig.add_subplot()
        for n in lr:
            ax.plot(*series(n), label=n.removeprefix("train/lr/"))
        ax.set(xlabel="step", ylabel="learning rate", title="learning rate")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
        figures["learning_rate"] = fig
    paths = []
    if figures:
        out_dir.mkdir(parents=True, exist_ok=True)
    for name, fig in figures.items():
        fig.tight_layout()
        path = out_dir / f"{name}.png"
        fig.savefig(path)
        paths.append(path)
        if tracker is not None:
            tracker.log_artifact(path, f"{prefix}/{path.name}" if prefix else path.name)
    return paths


def _metric_columns(models: Mapping[str, Mapping[str, Any]]) -> list[str]:
    keys = {k for m in models.values() for k, v in m.items() if "@" in k and isinstance(v, (int, float))}

    def order(k):
        base, _, at = k.rsplit("/", 1)[-1].partition("@")
        return (k.startswith("cold/"), int(at) if at.isdigit() else 0, ("HR", "NDCG", "MRR").index(base)
                if base in ("HR", "NDCG", "MRR") else 9, k)

    return sorted(keys, key=order)


def log_metrics_table_png(tracker, metrics: dict, path: Path) -> Path:
    """An evaluation result (``mmrec.stages.evaluation``: ``models`` and ``gate``) as a PNG table
    (values in %), written to ``path`` and logged to ``tracker`` (if not None) under its file name.
    A flat ``{metric: value}`` dict is drawn as a single row."""
    path = Path(path)
    models = metrics.get("models") if isinstance(metrics.get("models"), Mapping) else {"model": metrics}
    cols = _metric_columns(models)
    fmt = lambda v: "-" if not isinstance(v, (int, float)) else f"{100 * v:.2f}"  # noqa: E731
    cells = [[fmt(m.get(c)) for c in cols] for m in models.values()]
    fig = _figure(max(6.0, 1.1 * len(cols) + 1.5), 1.2 + 0.35 * (len(models) + 1))
    ax = fig.add_subplot()
    ax.axis("off")
    table = ax.table(cellText=cells or [["-"]], rowLabels=list(models), colLabels=cols or ["(no metrics)"], loc="center")
    table.auto_set_font_size(False)
    table.set_fontsize(8)
    table.scale(1, 1.3)
    title = f"{metrics.get('domain', '')} {metrics.get('split', '')} (%)".strip()
    gate = metrics.get("gate")
    if isinstance(gate, Mapping):
        verdict = "PASSED" if gate.get("passed") else "FAILED"
        title += (f"\ngate {verdict}: {gate.get('metric')} finetuned {fmt(gate.get('finetuned'))} vs best baseline "
                  f"{fmt(gate.get('best_baseline'))} + margin {fmt(gate.get('margin'))}")
        if "finetuned" in models:
            row = list(models).index("finetuned") + 1
            for c in range(-1, len(cols)):
                if (row, c) in table.get_celld():
                    table[row, c].set_facecolor("#d9f2d9" if gate.get("passed") else "#f8d7da")
    ax.set_title(title, fontsize=9)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    if tracker is not None:
        tracker.log_artifact(path, path.name)
    return path


# --------------------------------------------------------------------------------------------
# Registry

@contextmanager
def _process_uris(tracking_uri: str) -> Iterator[None]:
    """Point MLflow's process-wide tracking and registry URIs at ``tracking_uri`` for a block."""
    import mlflow
    from mlflow.tracking._model_registry import utils as registry_utils
    from mlflow.tracking._tracking_service import utils as tracking_utils

    saved_env = {k: os.environ.get(k) for k in ("MLFLOW_TRACKING_URI", "MLFLOW_REGISTRY_URI")}
    saved = (getattr(tracking_utils, "_tracking_uri", None), getattr(registry_utils, "_registry_uri", None))
    mlflow.set_tracking_uri(tracking_uri)
    mlflow.set_registry_uri(tracking_uri)
    try:
        yield
    finally:
        mlflow.set_tracking_uri(saved[0])
        registry_utils._registry_uri = saved[1]
        for k, v in saved_env.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def model_signature():
    """Input: ``history`` (list of item ids), optional ``k`` and ``new_items``; params ``k``;
    output: ``item_ids`` and ``scores`` lists (see ``orchestration/mmrec_pyfunc.py``).

    The optional columns are typed so that a REST request whose ``dataframe_records`` leave them
    out for some rows is accepted: MLflow turns a missing field into NaN before it checks types,
    and NaN fails a ``long`` or an ``Array(Object(...))`` column (and a ``double`` column refuses
    the ``int64`` a DataFrame holds). So both are ``Any``; ``mmrec_pyfunc`` checks them itself.
    """
    from mlflow.models import ModelSignature
    from mlflow.types.schema import AnyType, Array, ColSpec, DataType, ParamSchema, ParamSpec, Schema

    inputs = Schema([ColSpec(Array(DataType.string), "history"), ColSpec(AnyType(), "k", required=False),
                     ColSpec(AnyType(), "new_items", required=False)])
    outputs = Schema([ColSpec(Array(DataType.string), "item_ids"), ColSpec(Array(DataType.double), "scores")])
    return ModelSignature(inputs, outputs, ParamSchema([ParamSpec("k", DataType.long, 10)]))


def _requirements() -> list[str]:
    """Pinned versions of what loading the model imports (inferring them would load the model in
    a subprocess). ``mmrec`` itself must be installed where the model is served."""
    from importlib.metadata import PackageNotFoundError, version

    out = []
    for pkg in ("mlflow", "torch", "torchvision", "transformers", "timm", "safetensors", "polars", "pyarrow", "pandas",
                "numpy", "pillow", "pyyaml"):
        try:
            out.append(f"{pkg}=={version(pkg)}")
        except PackageNotFoundError:
            pass
    return out


def register_model(tracking_uri: str, model_dir: Path, name: str, run_id: str, tags: dict[str, str]) -> str:
    """Log the exported model folder ``model_dir`` to run ``run_id`` as a pyfunc model from code
    (``PYFUNC_FILE``, artifact ``model``) with signature and input example, register it as a new
    version of ``name`` and tag the version (``domain``, ``item_tower``, ``n_items`` from the
    folder's ``model.json``, then ``tags``). Returns the version."""
    import pandas as pd
    import polars as pl
    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException
    from mlflow.models import Model

    import mlflow.pyfunc

    model_dir = Path(model_dir).absolute()
    meta = json.loads((model_dir / "model.json").read_text(encoding="utf-8"))
    ids = pl.read_parquet(model_dir / "item_map.parquet").sort("item_idx")["item_id"].head(3).to_list()
    example = pd.DataFrame({"history": [[str(i) for i in ids[:2]]], "k": [min(5, max(1, int(meta["n_items"])))]})
    version_tags = {"domain": meta.get("domain"), "item_tower": meta.get("model", {}).get("item_tower", {}).get("name"),
                    "n_items": meta.get("n_items"), **(tags or {})}
    version_tags = {mlflow_key(k): _cut(str(v), 5000) for k, v in version_tags.items() if v is not None}
    client = MlflowClient(tracking_uri, registry_uri=tracking_uri)
    run = client.get_run(run_id)
    # created here, in the run's experiment: Model.log alone would put it in the process's current
    # experiment (the default one, with its artifacts in ./mlruns of the working directory)
    logged = client.create_logged_model(run.info.experiment_id, name="model", source_run_id=run_id,
                                        params={k: _cut(v, MAX_PARAM_VALUE) for k, v in run.data.params.items()},
                                        tags={"mmrec.domain": str(meta.get("domain"))})
    with _process_uris(tracking_uri):
        info = Model.log(
            artifact_path=None,
            name="model",
            flavor=mlflow.pyfunc,
            run_id=run_id,
            python_model=str(PYFUNC_FILE),
            artifacts={"model": str(model_dir)},
            signature=model_signature(),
            input_example=example,
            pip_requirements=_requirements(),
            metadata={"mmrec_format": f"{meta.get('format')} v{meta.get('version')}", "domain": meta.get("domain")},
            model_id=logged.model_id,
        )
        try:
            client.create_registered_model(name)
        except MlflowException as exc:
            if exc.error_code not in ("RESOURCE_ALREADY_EXISTS", "ALREADY_EXISTS"):
                raise
        # inside the block: the sqlite registry store looks the logged model up through a
        # default MlflowClient(), i.e. through the process-wide tracking URI
        mv = client.create_model_version(name, source=info.model_uri, run_id=run_id, tags=version_tags,
                                         model_id=info.model_id)
    return str(mv.version)


def promote(tracking_uri: str, name: str, version: str, alias: str = "champion") -> None:
    """Point ``name@alias`` at ``version`` (aliases replace the deprecated stages)."""
    from mlflow import MlflowClient

    MlflowClient(tracking_uri, registry_uri=tracking_uri).set_registered_model_alias(name, alias, str(version))


def load_registered(tracking_uri: str, name: str, alias: str = "champion"):
    """The pyfunc model ``models:/name@alias`` (``.predict(DataFrame(history=[[...]]))``)."""
    import mlflow.pyfunc

    with _process_uris(tracking_uri):
        return mlflow.pyfunc.load_model(f"models:/{name}@{alias}")
