"""Asset checks: the Great Expectations validation of each catalog and the quality gate before
registration. Both are blocking: a failure with ERROR severity stops everything downstream.

- ``great_expectations`` on ``validated_catalog`` is declared by the asset itself
  (``check_specs``) and reported from the same step, because the stage *is* the validation: it
  runs the expectations and, on failure, writes ``<domain>.validation-failed.{md,json}`` and leaves
  the earlier catalog untouched. The asset then records the failed check (failing expectations,
  counts, sample rows) and fails its step without recording a materialisation, so the last
  materialisation stays the last catalog that passed and no downstream step starts. A standalone
  ``@asset_check`` could only run after a recorded materialisation of a catalog that was not written.
- ``quality_gate`` on ``evaluation`` is a separate blocking ``@asset_check``: the evaluation did
  produce its metrics; the gate (``evaluation.gate_*`` in the YAML) decides whether
  ``served_model`` may register and promote the fine-tuned model.
"""

import json
import warnings
from pathlib import Path
from typing import Any

import dagster as dg

from mmrec import stages

VALIDATION_CHECK = "great_expectations"
GATE_CHECK = "quality_gate"


def validation_spec(domains: dg.PartitionsDefinition) -> dg.AssetCheckSpec:
    """The check ``validated_catalog`` reports from its own step, one result per domain (a
    partitioned check is a preview feature in Dagster 1.13: its warning is muted)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", dg.PreviewWarning)
        return dg.AssetCheckSpec(
            VALIDATION_CHECK, asset="validated_catalog", blocking=True, partitions_def=domains,
            description="Great Expectations suite of the catalog contract (ids, sequences, timestamps, text and "
                        "image completeness per domain thresholds); a failure stops everything downstream.")


def _md_cell(v: Any) -> str:
    return str(v).replace("|", "\\|").replace("\n", " ")


def validation_result(report: dict[str, Any], report_path: Path) -> dg.AssetCheckResult:
    """The check result for a validation report (``ValidationReport.to_dict``, read back from the
    JSON twin the stage writes): every expectation's outcome, the failing ones with sample rows."""
    outcomes = report["outcomes"]
    failures = [o for o in outcomes if not o["success"]]
    rows = ["| table | expectation | column | failing rows | threshold | observed |", "| --- | --- | --- | --- | --- | --- |"]
    for o in failures or outcomes:
        rows.append("| " + " | ".join(_md_cell(x) for x in (
            o["table"], o["description"], o["column"] or "", f"{o['unexpected_count']} of {o['element_count']}",
            o["threshold"], "" if o["observed"] is None else o["observed"])) + " |")
    samples = [f"**{o['table']}: {o['description']}** ({o['unexpected_count']} rows)\n\n"
               + "\n".join(f"- `{json.dumps({k: v for k, v in s.items() if k != '_rid'}, default=str, ensure_ascii=False)}`"
                         for s in o["samples"])
               for o in failures if o["samples"]]
    metadata: dict[str, Any] = {
        "expectations": len(outcomes),
        "failed_expectations": len(failures),
        "failing_rows": sum(o["unexpected_count"] for o in failures),
        "mode": report["mode"],
        "report": dg.MetadataValue.path(str(report_path)),
        "failing expectations" if failures else "expectations table": dg.MetadataValue.md("\n".join(rows)),
    }
    if samples:
        metadata["sample rows"] = dg.MetadataValue.md("\n\n".join(samples))
    if report.get("quarantined"):
        metadata["quarantined"] = dg.MetadataValue.json(report["quarantined"])
        metadata["quarantine reasons"] = dg.MetadataValue.json(report.get("quarantine_reasons") or {})
    return dg.AssetCheckResult(
        asset_key="validated_catalog", check_name=VALIDATION_CHECK, passed=bool(report["passed"]),
        severity=dg.AssetCheckSeverity.ERROR, metadata=metadata,
        description=None if report["passed"] else f"{len(failures)} expectation(s) failed for domain {report['domain']!r}")


def gate_result(gate: dict[str, Any], models: dict[str, dict[str, Any]]) -> dg.AssetCheckResult:
    """The quality gate recorded by the evaluation stage (``metrics.json``: ``gate``)."""
    metric = gate["metric"]
    best = gate["best_baseline"]
    metadata: dict[str, Any] = {
        "metric": metric,
        "margin": float(gate["margin"]),
        "finetuned": float(gate["finetuned"]),
        "against": ", ".join(gate["against"]) or "(none)",
        **{f"{name} {metric}": float(m[metric]) for name, m in models.items() if m.get(metric) is not None},
    }
    if best is not None:
        metadata["best_baseline"] = float(best)
        metadata["lead"] = float(gate["finetuned"] - best)
    verdict = (f"fine-tuned {metric} {gate['finetuned']:.4f} vs best of {gate['against']} "
               f"{'-' if best is None else f'{best:.4f}'} + margin {gate['margin']}")
    return dg.AssetCheckResult(passed=bool(gate["passed"]), severity=dg.AssetCheckSeverity.ERROR,
                               metadata=metadata, description=verdict)


def build_gate_check(evaluation: dg.AssetsDefinition, targets: dg.PartitionsDefinition) -> dg.AssetChecksDefinition:
    """The blocking gate check, partitioned like ``evaluation`` so that the UI shows its result per
    target domain (a partitioned check is a preview feature in Dagster 1.13: its warning is muted)."""
    from orchestration.resources import PipelineResource

    def quality_gate(context: dg.AssetCheckExecutionContext, pipeline: PipelineResource) -> dg.AssetCheckResult:
        result = stages.read_metrics(pipeline.load(), context.partition_key)
        return gate_result(result["gate"], result["models"])

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", dg.PreviewWarning)
        return dg.asset_check(
            asset=evaluation, name=GATE_CHECK, blocking=True, partitions_def=targets,
            description="The fine-tuned model beats the gate_against baselines on gate_metric by gate_margin "
                        "(evaluation section of the pipeline YAML); served_model runs only when it passes.",
        )(quality_gate)
