"""One function per artifact. The CLI, ``dvc.yaml`` and the Dagster assets call these.

The data flows one way and each artifact has one name everywhere::

    raw_catalog -> validated_catalog -> (item_features -> pretrained_model -> finetuned_model
                -> evaluation -> served_model: later stages)

Each stage reads the exact upstream artifact folder of its domain
(``<artifacts>/<stage>/<domain>``) and writes its own atomically.
"""

from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mmrec.config import PipelineConfig
from mmrec.data.catalog import Catalog
from mmrec.data.importers import import_domain
from mmrec.data.preprocess import preprocess
from mmrec.io import atomic_dir, write_json

STAGES = ("raw_catalog", "validated_catalog")
"""Pipeline stages in order (the artifact names)."""

VALIDATION_REPORT = "validation.md"
STATS = "stats.json"


@dataclass
class StageResult:
    """What a stage produced: its folder and metadata for the orchestrator and the CLI."""

    stage: str
    domain: str
    path: Path
    metadata: dict[str, Any] = field(default_factory=dict)


def raw_catalog(cfg: PipelineConfig, domain: str, progress: bool = True) -> StageResult:
    """Import one domain's raw data into the catalog contract."""
    from mmrec.data.validation import catalog_stats

    d = cfg.domain(domain)
    catalog = import_domain(d.source.format, cfg.resolve(d.source.path), d.name, d.source.options)
    out = catalog.write(cfg.artifact_path("raw_catalog", d.name))
    return StageResult("raw_catalog", d.name, out, catalog_stats(catalog))


def _project_relative(catalog: Catalog, cfg: PipelineConfig) -> Catalog:
    """The catalog with its source file names relative to the project root, as reports show them:
    readable, and the same on every checkout (so DVC output hashes do not depend on the path)."""
    from mmrec.data.catalog import SOURCE_PATHS

    src = {k: os.path.relpath(v, cfg.root) if k in SOURCE_PATHS and os.path.isabs(v) else v for k, v in catalog.source.items()}
    return dataclasses.replace(catalog, source=src)


def failed_report_path(cfg: PipelineConfig, domain: str) -> Path:
    """Where a failed validation's report goes: beside the (untouched) validated catalog."""
    return cfg.artifact_path("validated_catalog", domain).with_name(f"{domain}.validation-failed.md")


def validated_catalog(cfg: PipelineConfig, domain: str, progress: bool = True) -> StageResult:
    """Validate one domain's raw catalog (Great Expectations) and preprocess it as in the papers.

    On failure the report is written next to where the catalog would go, any earlier validated
    catalog is left as it was, and ``ValidationError`` is raised.
    """
    from mmrec.data.validation import ValidationError, validate

    d = cfg.domain(domain)
    raw = Catalog.read(cfg.artifact_path("raw_catalog", d.name))
    clean, report, side = validate(_project_relative(raw, cfg), d.validation, progress=progress)
    clean = dataclasses.replace(clean, source=raw.source)  # absolute again; written relative to the folder
    failed_path = failed_report_path(cfg, d.name)
    if not report.passed:
        report.write(failed_path)
        raise ValidationError(report, failed_path)
    pre = preprocess(clean, cfg.preprocess)
    stats = {
        **report.stats,
        "after_preprocess": {
            "users": pre.user_map.height,
            "items": pre.item_map.height,
            "interactions": pre.catalog.interactions.height,
            "dropped_users": pre.dropped_users,
        },
        "quarantined": report.quarantined,
    }
    out = cfg.artifact_path("validated_catalog", d.name)
    with atomic_dir(out) as tmp:
        pre.catalog.write(tmp / "catalog")
        pre.item_map.write_parquet(tmp / "item_map.parquet")
        pre.user_map.write_parquet(tmp / "user_map.parquet")
        pre.splits.write_parquet(tmp / "splits.parquet")
        if side:
            (tmp / "quarantine").mkdir()
            for name, frame in side.items():
                frame.write_parquet(tmp / "quarantine" / f"{name}.parquet")
        report.write(tmp / VALIDATION_REPORT)
        write_json(tmp / STATS, stats)
    failed_path.unlink(missing_ok=True)
    failed_path.with_suffix(".json").unlink(missing_ok=True)
    return StageResult("validated_catalog", d.name, out, stats)


def read_stats(cfg: PipelineConfig, domain: str) -> dict[str, Any]:
    """The statistics a finished ``validated_catalog`` stage recorded."""
    path = cfg.artifact_path("validated_catalog", domain) / STATS
    if not path.is_file():
        raise FileNotFoundError(f"{path}: run the validated_catalog stage for domain {domain!r} first")
    return json.loads(path.read_text(encoding="utf-8"))


STAGE_FUNCTIONS = {"raw_catalog": raw_catalog, "validated_catalog": validated_catalog}
assert tuple(STAGE_FUNCTIONS) == STAGES
