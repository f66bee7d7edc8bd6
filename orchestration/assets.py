"""One asset per artifact, each a thin call of its ``mmrec.stages`` function.

    raw_catalog -> validated_catalog -> item_features -> pretrained_model -> finetuned_model
                -> evaluation -> served_model

An asset resolves the pipeline config (``PipelineResource``), calls its stage with
``progress=False`` (and, for the model stages, an MLflow tracker from ``MlflowResource``) and
returns the artifact's path and statistics as metadata (``MaterializeResult``): models and tensors
stay in the files the stage wrote, nothing goes through the pickling IO manager.

Partitions are the config's domains: every domain for the catalog and feature assets, none for
``pretrained_model`` (it reads the source domains' features), the target domains for the
fine-tuning, evaluation and serving assets. Built by ``build_assets`` for one config, because the
partition keys come from it.

No ``from __future__ import annotations`` here: Dagster resolves ``config: ServeConfig`` at runtime.
"""

import json
import tempfile
from pathlib import Path
from typing import Any, Optional

import dagster as dg

from mmrec import stages
from orchestration import checks
from orchestration.distributed import launch_stage, replay_log
from orchestration.resources import ComputeResource, MlflowResource, PipelineResource, VariantTracker

GROUP = "mmrec"


class ServeConfig(dg.Config):
    """Where ``served_model`` registers: names only, no hyper-parameters."""

    model_name: Optional[str] = None
    """Registered model name (default ``<MlflowResource.model_prefix>-<domain>``)."""
    alias: str = "champion"
    """Alias the new version gets when the quality gate passed and it beats the version the alias
    points at on the same validation data (``mmrec.promotion``); every new version gets ``challenger``."""


# --------------------------------------------------------------------------------------------
# Metadata shown in the UI

def _pct(x: float) -> str:
    return f"{100 * x:.1f}%"


def catalog_metadata(stats: dict[str, Any]) -> dict[str, Any]:
    """Row counts and modality coverage of a catalog (``catalog_stats``)."""
    coverage = ("| text | image | text+image | text only | image only | neither |\n| --- | --- | --- | --- | --- | --- |\n"
                f"| {_pct(stats['share_text'])} | {_pct(stats['share_image'])} | {_pct(stats['share_both'])} "
                f"| {stats['text_only']} | {stats['image_only']} | {stats.get('no_modality', 0)} |")
    return {
        "dagster/row_count": dg.MetadataValue.int(int(stats["interactions"])),
        "users": int(stats["users"]),
        "items": int(stats["items"]),
        "interactions": int(stats["interactions"]),
        "share_text": float(stats["share_text"]),
        "share_image": float(stats["share_image"]),
        "share_text_and_image": float(stats["share_both"]),
        "modality coverage": dg.MetadataValue.md(coverage),
    }


def _metrics_md(rows: dict[str, dict[str, Any]], cols=("HR@10", "NDCG@10", "MRR@10")) -> str:
    fmt = lambda v: "-" if not isinstance(v, (int, float)) else f"{100 * v:.2f}"  # noqa: E731
    lines = ["| model | " + " | ".join(cols) + " |", "|---|" + "---|" * len(cols)]
    lines += [f"| {name} | " + " | ".join(fmt(m.get(c)) for c in cols) + " |" for name, m in rows.items()]
    return "\n".join(lines) + "\n\nvalues in %"


def _floats(metrics: dict[str, Any], prefix: str = "", keys=("HR@10", "NDCG@10", "MRR@10")) -> dict[str, float]:
    return {f"{prefix}{k}": float(metrics[k]) for k in keys if isinstance(metrics.get(k), (int, float))}


def _trained_by(info: dict[str, Any]) -> str:
    """The commits that took a training run's steps (a finished run is reused across commits)."""
    code = info.get("code") or []
    return ", ".join(f"{(e['commit'] or 'not a git checkout')[:10]}{'+dirty' if e['dirty'] else ''} from step "
                     f"{e['from_step']}" for e in code) or "not recorded (trained before runs recorded their code)"


def _run_metadata(run) -> dict[str, Any]:
    return {"mlflow_run": dg.MetadataValue.url(run.url), "mlflow_run_id": run.run_id,
            "mlflow_experiment_id": run.experiment_id}


def _latest_metadata(context: dg.AssetExecutionContext, asset: str, partition: str) -> dict[str, Any]:
    """The metadata of the latest materialisation of ``asset[partition]`` (empty if none)."""
    flt = dg.AssetRecordsFilter(asset_key=dg.AssetKey(asset), asset_partitions=[partition])
    records = context.instance.fetch_materializations(flt, limit=1).records
    if not records or records[0].asset_materialization is None:
        return {}
    return {k: getattr(v, "value", v) for k, v in records[0].asset_materialization.metadata.items()}


# --------------------------------------------------------------------------------------------
# Assets

def build_assets(domains: dg.StaticPartitionsDefinition, targets: dg.StaticPartitionsDefinition,
                 sources: list[str]) -> list[dg.AssetsDefinition]:
    """The seven assets for a config whose domains are ``domains`` (all), ``targets`` and ``sources``."""

    @dg.asset(partitions_def=domains, group_name=GROUP, kinds={"polars"}, description=stages.raw_catalog.__doc__)
    def raw_catalog(context: dg.AssetExecutionContext, pipeline: PipelineResource) -> dg.MaterializeResult:
        res = stages.raw_catalog(pipeline.load(), context.partition_key, progress=False)
        return dg.MaterializeResult(metadata={"path": dg.MetadataValue.path(str(res.path)), **catalog_metadata(res.metadata)})

    @dg.asset(partitions_def=domains, group_name=GROUP, kinds={"polars"}, deps=[raw_catalog],
              check_specs=[checks.validation_spec(domains)], description=stages.validated_catalog.__doc__)
    def validated_catalog(context: dg.AssetExecutionContext, pipeline: PipelineResource):
        from mmrec.data.validation import ValidationError

        cfg = pipeline.load()
        try:
            res = stages.validated_catalog(cfg, context.partition_key, progress=False)
        except ValidationError as exc:
            report_json = exc.report_path.with_suffix(".json")
            yield checks.validation_result(json.loads(report_json.read_text(encoding="utf-8")), exc.report_path)
            # no materialisation: the last one stays the last catalog that passed (the stage left it as it was)
            raise dg.Failure(description=str(exc), metadata={"report": dg.MetadataValue.path(str(exc.report_path))},
                             allow_retries=False) from None
        stats = res.metadata
        kept = stats["after_preprocess"]
        yield dg.MaterializeResult(metadata={
            "path": dg.MetadataValue.path(str(res.path)),
            **catalog_metadata(stats),
            "dagster/row_count": dg.MetadataValue.int(int(kept["interactions"])),
            "kept_users": int(kept["users"]),
            "kept_items": int(kept["items"]),
            "kept_interactions": int(kept["interactions"]),
            "dropped_users": int(kept["dropped_users"]),
            "quarantined": dg.MetadataValue.json(stats.get("quarantined") or {}),
            "report": dg.MetadataValue.path(str(res.path / stages.VALIDATION_REPORT)),
        })
        report = res.path / stages.VALIDATION_REPORT
        yield checks.validation_result(json.loads(report.with_suffix(".json").read_text(encoding="utf-8")), report)

    @dg.asset(partitions_def=domains, group_name=GROUP, kinds={"pytorch"}, deps=[validated_catalog],
              description=stages.item_features.__doc__)
    def item_features(context: dg.AssetExecutionContext, pipeline: PipelineResource,
                      compute: ComputeResource) -> dg.MaterializeResult:
        res = stages.item_features(compute.apply(pipeline.load()), context.partition_key, progress=False)
        meta = res.metadata
        rows = ["| modality | encoded | from cache | absent |", "| --- | --- | --- | --- |"]
        rows += [f"| {m} | {s['computed']} | {s['hits']} | {s['absent']} |" for m, s in meta["modalities"].items()]
        return dg.MaterializeResult(metadata={
            "path": dg.MetadataValue.path(str(res.path)),
            "items": int(meta["n_items"]),
            "items_with_text": int(meta["items_with_text"]),
            "items_with_image": int(meta["items_with_image"]),
            "encoders": dg.MetadataValue.md("\n".join(rows)),
        })

    source_features = dg.AssetDep(item_features, partition_mapping=dg.SpecificPartitionsPartitionMapping(sources))

    @dg.asset(group_name=GROUP, kinds={"pytorch", "mlflow"}, deps=[source_features],
              description=stages.pretrained_model.__doc__)
    def pretrained_model(context: dg.AssetExecutionContext, pipeline: PipelineResource, compute: ComputeResource,
                         mlflow: MlflowResource) -> dg.MaterializeResult:
        from orchestration import mlflow_support as ms

        cfg = compute.apply(pipeline.load())
        with mlflow.run(cfg, context, "pretrained_model", "+".join(sources)) as run:
            if compute.nproc > 1:  # torchrun through Dagster Pipes; the run's log replayed into MLflow
                path, info = launch_stage(context, "pretrained_model", cfg.config_path, compute.nproc,
                                          device=compute.device, threads=compute.threads)
                replay_log(run.tracker, Path(info["run_dir"]))
            else:
                res = stages.pretrained_model(cfg, progress=False, tracker=run.tracker)
                path, info = res.path, res.metadata
            ms.log_training_plots(run.tracker, Path(info["run_dir"]))
        return dg.MaterializeResult(metadata={
            "path": dg.MetadataValue.path(str(path)),
            "processes": int(info.get("world_size", 1)),
            "sources": ", ".join(info["sources"]),
            **_floats(info["valid_metrics"], "valid "),
            "best_step": int(info["best_step"]),
            "steps": int(info["steps"]),
            "trained by": _trained_by(info),
            **_run_metadata(run),
        })

    target_features = dg.AssetDep(item_features, partition_mapping=dg.StaticPartitionMapping(
        {t: t for t in targets.get_partition_keys()}))

    @dg.asset(partitions_def=targets, group_name=GROUP, kinds={"pytorch", "mlflow"},
              deps=[pretrained_model, target_features], description=stages.finetuned_model.__doc__)
    def finetuned_model(context: dg.AssetExecutionContext, pipeline: PipelineResource, compute: ComputeResource,
                        mlflow: MlflowResource) -> dg.MaterializeResult:
        from orchestration import mlflow_support as ms

        cfg = compute.apply(pipeline.load())
        domain = context.partition_key
        with mlflow.run(cfg, context, "finetuned_model", domain) as run:
            if compute.nproc > 1:  # torchrun through Dagster Pipes; each variant's log replayed into MLflow
                path, summary = launch_stage(context, "finetuned_model", cfg.config_path, compute.nproc, domain=domain,
                                             device=compute.device, threads=compute.threads)
                for name, info in summary["variants"].items():
                    replay_log(run.tracker, Path(info["run_dir"]), prefix=f"{name}/")  # as VariantTracker names them
            else:
                res = stages.finetuned_model(cfg, domain, progress=False, tracker=VariantTracker(run.tracker))
                path, summary = res.path, res.metadata
            for name, info in summary["variants"].items():
                ms.log_training_plots(run.tracker, Path(info["run_dir"]), prefix=f"plots/{name}")
        variants = summary["variants"]
        return dg.MaterializeResult(metadata={
            "path": dg.MetadataValue.path(str(path)),
            "model": dg.MetadataValue.path(str(path / "model")),
            "processes": int(variants["model"].get("world_size", 1)),
            "transfer": summary["transfer"]["part"],
            "trained by": _trained_by(variants["model"]),
            **_floats(variants["model"]["valid_metrics"], "valid "),
            "validation metrics": dg.MetadataValue.md(_metrics_md({n: v["valid_metrics"] for n, v in variants.items()})),
            **_run_metadata(run),
        })

    @dg.asset(partitions_def=targets, group_name=GROUP, kinds={"pytorch", "mlflow"},
              deps=[finetuned_model, pretrained_model], description=stages.evaluation.__doc__)
    def evaluation(context: dg.AssetExecutionContext, pipeline: PipelineResource, compute: ComputeResource,
                   mlflow: MlflowResource) -> dg.MaterializeResult:
        from orchestration import mlflow_support as ms

        cfg = compute.apply(pipeline.load())
        with mlflow.run(cfg, context, "evaluation", context.partition_key) as run:
            res = stages.evaluation(cfg, context.partition_key, progress=False, tracker=run.tracker)
            run.tracker.log_artifact(res.path / stages.METRICS)
            with tempfile.TemporaryDirectory() as tmp:
                ms.log_metrics_table_png(run.tracker, res.metadata, Path(tmp) / "metrics.png")
        result, gate = res.metadata, res.metadata["gate"]
        return dg.MaterializeResult(metadata={
            "path": dg.MetadataValue.path(str(res.path)),
            "metrics": dg.MetadataValue.md(stages.metrics_table(result, cfg.evaluation().ks)),
            **{f"{name} {gate['metric']}": float(m[gate["metric"]]) for name, m in result["models"].items()},
            **_floats(result["models"]["finetuned"], "test "),
            "gate_passed": bool(gate["passed"]),
            "test users": int(result["models"]["finetuned"]["n_users"]),
            **_run_metadata(run),
        })

    @dg.asset(partitions_def=targets, group_name=GROUP, kinds={"mlflow"}, deps=[evaluation, finetuned_model],
              description="Register the fine-tuned model folder as an MLflow pyfunc model version (alias challenger); "
                          "promote it to the alias (champion) when the evaluation's quality gate passed and it beats "
                          "the current champion on the same validation data (mmrec.promotion).")
    def served_model(context: dg.AssetExecutionContext, config: ServeConfig, pipeline: PipelineResource,
                     mlflow: MlflowResource) -> dg.MaterializeResult:
        from deploy.registry import MlflowRegistry, describe, fetch_model
        from mmrec import promotion
        from orchestration import mlflow_support as ms

        cfg, domain = pipeline.load(), context.partition_key
        gate = stages.read_metrics(cfg, domain)["gate"]
        name = config.model_name or mlflow.model_name(domain)
        model_dir = cfg.artifact_path("finetuned_model", domain) / "model"
        trained_in = _latest_metadata(context, "finetuned_model", domain).get("mlflow_run_id", "")
        with mlflow.run(cfg, context, "served_model", domain) as run:
            run.tracker.log_metrics({"gate/finetuned": gate["finetuned"], **(
                {"gate/best_baseline": gate["best_baseline"]} if gate["best_baseline"] is not None else {})})
            run.tracker.set_tags({"gate": "passed" if gate["passed"] else "failed", "finetuned_run_id": trained_in})
            registry = MlflowRegistry(run.uri)
            # the champion to beat, scored on this model's validation data before the new version exists
            comparison, error = None, None
            with tempfile.TemporaryDirectory() as tmp:
                champion = registry.alias_version(name, config.alias)
                try:
                    champion_dir = None
                    if champion is not None:
                        champion_dir = fetch_model(run.uri, describe(run.uri, name, config.alias, registry.client),
                                                   Path(tmp) / "champion")
                    comparison = promotion.compare(cfg, domain, model_dir, champion_dir, champion)
                except promotion.PromotionError as exc:
                    error = str(exc)
                    context.log.warning(f"not compared with {name}@{config.alias} (version {champion}): {exc}")
            if comparison is not None:
                run.tracker.log_metrics({"promotion/challenger": comparison.challenger_value, **(
                    {"promotion/champion": comparison.champion_value} if comparison.champion is not None else {})})
            version = ms.register_model(run.uri, model_dir, name, run.run_id, {
                **run.tags, "gate": "passed" if gate["passed"] else "failed", "gate_metric": gate["metric"],
                "gate_value": gate["finetuned"], "finetuned_run_id": trained_in, "model_dir": str(model_dir)})
        # the blocking quality_gate check keeps this asset from running on a failed gate in the same
        # run; materialised on its own, it registers the version (challenger) but does not promote it
        decision = promotion.record(registry, name, version, comparison, gate["passed"], config.alias, error)
        context.log.info(f"{name} version {version}: {'promoted' if decision.promoted else 'held'} ({decision.reason})")
        alias = config.alias if decision.promoted else None
        return dg.MaterializeResult(metadata={
            "model_name": name,
            "version": version,
            "alias": alias or f"{promotion.CHALLENGER} (not promoted: {decision.reason})",
            "champion_version": decision.champion or "(none)",
            "promotion": dg.MetadataValue.md(comparison.summary() if comparison is not None else f"not compared: {error}"),
            **({"valid challenger": comparison.challenger_value} if comparison is not None else {}),
            **({"valid champion": comparison.champion_value} if comparison is not None and comparison.champion else {}),
            "model_uri": f"models:/{name}@{alias}" if alias else f"models:/{name}/{version}",
            "model_version": dg.MetadataValue.url(mlflow.model_url(name, version)),
            "source": dg.MetadataValue.path(str(model_dir)),
            **_run_metadata(run),
        })

    return [raw_catalog, validated_catalog, item_features, pretrained_model, finetuned_model, evaluation, served_model]
