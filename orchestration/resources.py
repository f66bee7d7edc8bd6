"""Dagster resources: the pipeline config (and with it the storage root), MLflow tracking, compute.

The resources hold where things are and how to run, never hyper-parameters: those stay in the YAML
file that ``PipelineResource.config_path`` names, the same file the CLI and ``dvc.yaml`` read.
"""

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Optional

import dagster as dg

from mmrec.config import PipelineConfig, load_config
from orchestration.paths import CONFIG_ENV, DEFAULT_CONFIG, PROJECT_ROOT, config_path  # noqa: F401 (re-exported)


class PipelineResource(dg.ConfigurableResource):
    """The pipeline YAML every asset reads; its ``artifacts`` folder is the storage root."""

    config_path: str
    """Path of the pipeline YAML (``configs/demo.yaml``, a preset-based file, ...)."""

    def load(self) -> PipelineConfig:
        return load_config(config_path(self.config_path))

    @property
    def storage_root(self) -> Path:
        """Where the stages write their artifacts (``<root>/<artifacts>``)."""
        return self.load().artifacts


class MlflowResource(dg.ConfigurableResource):
    """MLflow tracking and registry. One MLflow run per model-stage materialisation."""

    tracking_uri: Optional[str] = None
    """Any MLflow tracking URI; default: a sqlite store under the config's root
    (``<root>/mlflow/mlflow.db``, artifacts in ``<root>/mlflow/artifacts``)."""
    experiment: str = "mmrec"
    ui_url: str = "http://127.0.0.1:5000"
    """Where ``mlflow ui`` serves this store: the run links in the asset metadata point there."""
    model_prefix: str = "mmrec"
    """Registered model name: ``<model_prefix>-<domain>``."""

    def uri(self, cfg: PipelineConfig) -> str:
        from orchestration import mlflow_support as ms

        return self.tracking_uri or ms.default_tracking_uri(cfg.root)

    def model_name(self, domain: str) -> str:
        return f"{self.model_prefix}-{domain}"

    def run_url(self, experiment_id: str, run_id: str) -> str:
        return f"{self.ui_url.rstrip('/')}/#/experiments/{experiment_id}/runs/{run_id}"

    def model_url(self, name: str, version: str) -> str:
        return f"{self.ui_url.rstrip('/')}/#/models/{name}/versions/{version}"

    @contextmanager
    def run(self, cfg: PipelineConfig, context: dg.AssetExecutionContext, stage: str, domain: str) -> Iterator["TrackedRun"]:
        """An MLflow run for one asset materialisation, tagged with the stage, the domain, the git
        commit and DVC data version (``provenance_tags``) and the Dagster run id."""
        from orchestration import mlflow_support as ms

        uri = self.uri(cfg)
        exp_id = ms.ensure_experiment(uri, self.experiment)
        tags = {**ms.provenance_tags(cfg.root), "stage": stage, "domain": domain, "dagster_run_id": context.run_id,
                "dagster_partition": context.partition_key if context.has_partition_key else "",
                "config": str(cfg.config_path)}
        with ms.mlflow_run(uri, self.experiment, f"{stage}:{domain}", tags) as tracker:
            yield TrackedRun(tracker, uri, exp_id, self.run_url(exp_id, tracker.run_id), tags)


class TrackedRun:
    """An open MLflow run: the tracker the library logs through, and where to find the run."""

    def __init__(self, tracker, uri: str, experiment_id: str, url: str, tags: dict[str, str]):
        self.tracker, self.uri, self.experiment_id, self.url, self.tags = tracker, uri, experiment_id, url, tags

    @property
    def run_id(self) -> str:
        return self.tracker.run_id


class ComputeResource(dg.ConfigurableResource):
    """Where and with how many threads torch runs inside a step."""

    device: Optional[str] = None
    """Torch device for the stages: ``auto``, ``cpu``, ``cuda`` or ``cuda:N``; ``None``: the pipeline
    config's ``compute.device`` (the same setting as ``mmrec --device``)."""
    threads: int = 1
    """``torch.set_num_threads``: small models lose from threading on a small machine."""
    nproc: int = 1
    """Processes for the training assets (``pretrained_model``, ``finetuned_model``): above 1 the
    stage runs as a distributed run (``torchrun`` through Dagster Pipes, ``orchestration.distributed``;
    ``threads`` per process); 1 runs it in the step's own process."""

    def apply(self, cfg: PipelineConfig) -> PipelineConfig:
        """Apply the thread count to this process and return ``cfg`` with this resource's device
        (call before a stage that runs torch). A device name that is invalid, or a GPU this machine
        does not have, fails the step with the reason."""
        from mmrec.config import ConfigError

        if self.threads < 1:
            raise dg.Failure(f"ComputeResource.threads must be >= 1, got {self.threads}")
        if self.nproc < 1:
            raise dg.Failure(f"ComputeResource.nproc must be >= 1, got {self.nproc}")
        try:
            if self.device is not None:
                cfg = cfg.with_device(self.device)
            cfg.device()
        except ConfigError as exc:
            raise dg.Failure(f"ComputeResource.device {self.device!r}: {exc}") from None
        import torch

        torch.set_num_threads(self.threads)
        return cfg


class VariantTracker:
    """Keeps the runs of several variants trained in one stage apart inside one MLflow run.

    ``finetuned_model`` trains the fine-tuned model and its baselines one after the other through
    the same tracker, announcing each with a ``variant`` tag; their per-epoch metrics have the same
    names and steps. From that tag on, this tracker prefixes metric, parameter, tag and artifact
    names with ``<variant>/`` (``scratch/val/NDCG@10``), so the curves stay separate.
    """

    def __init__(self, tracker):
        self.tracker, self.prefix = tracker, ""

    @property
    def run_id(self) -> str:
        return self.tracker.run_id

    def _p(self, name: str) -> str:
        return f"{self.prefix}{name}"

    def log_params(self, params):
        self.tracker.log_params({self._p(k): v for k, v in params.items()})

    def log_metrics(self, metrics, step=None):
        self.tracker.log_metrics({self._p(k): v for k, v in metrics.items()}, step)

    def log_artifact(self, path, name=None):
        self.tracker.log_artifact(path, self._p(name or Path(path).name))

    def set_tags(self, tags):
        if "variant" in tags:
            self.prefix = f"{tags['variant']}/"
        self.tracker.set_tags({self._p(k): v for k, v in tags.items()})
