"""One function per artifact. The CLI, ``dvc.yaml`` and the Dagster assets call these.

The data flows one way and each artifact has one name everywhere::

    raw_catalog -> validated_catalog -> item_features -> pretrained_model -> finetuned_model
                -> evaluation (-> served_model: registration, in the orchestration layer)

Each stage reads the exact upstream artifact folder of its domain
(``<artifacts>/<stage>/<domain>``) and writes its own atomically. ``pretrained_model`` is the one
cross-domain artifact (``<artifacts>/pretrained_model``): it reads every source domain's features.
Per-domain stages run for every domain; the model stages after ``item_features`` only for the
domains of their role (``CROSS_DOMAIN``, ``TARGET_ONLY``). Training checkpoints live in
``<artifacts>/runs/<stage>/<domain>/<run key>/``, keyed by a hash of the config and the inputs, so a
killed run resumes and a changed run starts afresh.
"""

from __future__ import annotations

import dataclasses
import json
import os
import statistics
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mmrec.config import TRAINED_BASELINES, PipelineConfig
from mmrec.data.catalog import Catalog
from mmrec.data.importers import import_domain
from mmrec.data.preprocess import preprocess
from mmrec.io import atomic_dir, write_json

STAGES = ("raw_catalog", "validated_catalog", "item_features", "pretrained_model", "finetuned_model", "evaluation")
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
    pre = preprocess(clean, cfg.preprocess, d.user_fraction)
    report.preprocessing = pre.changes  # repeats, short users, the L+3 cut: counted in validation.md
    stats = {
        **report.stats,
        "after_preprocess": {
            "users": pre.user_map.height,
            "items": pre.item_map.height,
            "interactions": pre.catalog.interactions.height,
            "dropped_users": pre.dropped_users,
        },
        "preprocessing": pre.changes,
        "quarantined": report.quarantined,
        "quarantine_reasons": report.quarantine_reasons,
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


def _read_record(cfg: PipelineConfig, stage: str, domain: str, name: str) -> dict[str, Any]:
    path = cfg.artifact_path(stage, domain) / name
    if not path.is_file():
        raise FileNotFoundError(f"{path}: run the {stage} stage for domain {domain!r} first")
    return json.loads(path.read_text(encoding="utf-8"))


def read_stats(cfg: PipelineConfig, domain: str) -> dict[str, Any]:
    """The statistics a finished ``validated_catalog`` stage recorded."""
    return _read_record(cfg, "validated_catalog", domain, STATS)


# --------------------------------------------------------------------------------------------
# Model stages

CROSS_DOMAIN = ("pretrained_model",)
"""Stages with one artifact for all source domains (no domain argument)."""
TARGET_ONLY = ("finetuned_model", "evaluation")
"""Stages that run for target domains only."""
METRICS = "metrics.json"
RANKS = "ranks.parquet"
"""Each test user's rank per model (columns: user_idx and one per model), for paired comparisons."""


def stage_domains(cfg: PipelineConfig, stage: str, names: list[str] | None = None) -> list[str | None]:
    """The domains ``stage`` runs for (``[None]`` for cross-domain stages)."""
    if stage in CROSS_DOMAIN:
        return [None] if cfg.sources else []  # no source domain: nothing to pretrain (transfer.part none)
    pool = [d for d in cfg.domains if d.role == "target"] if stage in TARGET_ONLY else list(cfg.domains)
    chosen = [cfg.domain(n) for n in names] if names else pool
    return [d.name for d in chosen if d in pool]


def _run_dir(cfg: PipelineConfig, stage: str, domain: str | None, key_parts: dict[str, Any], inputs: list[Path]) -> Path:
    import hashlib

    h = hashlib.sha256(json.dumps(key_parts, sort_keys=True, default=str).encode())
    for p in inputs:  # the data itself (features.json carries timings, which change every run)
        with open(p, "rb") as fh:
            for chunk in iter(lambda: fh.read(1 << 24), b""):
                h.update(chunk)
    return cfg.artifacts / "runs" / stage / (domain or "all") / h.hexdigest()[:16]


def _train_key(tc) -> dict[str, Any]:
    """The run-key part of a ``TrainConfig``: every field that can change the weights. ``progress``
    stays as ``None`` (as in every key since run keys exist); ``release_memory`` (added later, it
    changes resident memory only) is left out, so existing runs keep their keys and resume."""
    key = dataclasses.asdict(tc) | {"progress": None}
    key.pop("release_memory")
    return key


def _domain_data(cfg: PipelineConfig, domain: str):
    import polars as pl

    from mmrec.data.sequences import SequenceData
    from mmrec.features import load_content

    content = load_content(cfg.artifact_path("item_features", domain))
    splits_path = cfg.artifact_path("validated_catalog", domain) / "splits.parquet"
    if not splits_path.is_file():
        raise FileNotFoundError(f"{splits_path}: run validated_catalog for domain {domain!r} first")
    data = SequenceData.from_splits(pl.read_parquet(splits_path), content.n_items)
    return content, data


def _device_key(device) -> dict[str, Any]:
    """The run-key part of the device and of the process count: a checkpoint resumes only on its
    device type and with its number of processes (a single CPU process keys as before)."""
    from mmrec.distributed import world

    key: dict[str, Any] = {} if device.type == "cpu" else {"device": device.type}
    if world()[1] > 1:
        key["world_size"] = world()[1]
    return key


def _writer() -> bool:
    """Whether this process writes the stage's artifact: always, except on the ranks > 0 of a
    torchrun launch (they train with rank 0, which exports)."""
    from mmrec.distributed import world

    return world()[0] == 0


def _tracker(out_dir: Path, tracker):
    from mmrec.tracking import JsonlTracker, MultiTracker, NullTracker

    if not _writer():
        return NullTracker()
    local = JsonlTracker(out_dir / "log")
    return MultiTracker(local, tracker) if tracker is not None else local


def item_features(cfg: PipelineConfig, domain: str, progress: bool = True) -> StageResult:
    """Run the item tower's frozen encoders over one validated catalog (through the feature cache)."""
    from mmrec.features import build_item_features, save_content

    from mmrec.distributed import barrier, world

    d = cfg.domain(domain)
    catalog = Catalog.read(cfg.artifact_path("validated_catalog", d.name) / "catalog")
    fc = cfg.features()
    cache_dir, out = cfg.resolve(fc.cache_dir), cfg.artifact_path("item_features", d.name)
    rank, size = world()
    if size > 1:  # under torchrun (--nproc): every rank encodes its shard of the items, rank 0 merges
        from mmrec.features import build_item_features_sharded, merge_item_feature_shards

        build_item_features_sharded(catalog, cfg.model(), cache_dir, rank, size, fc.text_batch_size, fc.image_batch_size,
                                    fc.num_workers, device=cfg.device())
        barrier()
        if rank != 0:
            return StageResult("item_features", d.name, out, {"world_size": size})
        merge_item_feature_shards(cfg.model(), cache_dir, size)
    content, meta = build_item_features(catalog, cfg.model(), cache_dir, fc.text_batch_size,
                                        fc.image_batch_size, fc.num_workers, progress, device=cfg.device())
    out = save_content(content, out, meta)
    return StageResult("item_features", d.name, out, meta)


def pretrained_model(cfg: PipelineConfig, domain: str | None = None, progress: bool = True, tracker=None) -> StageResult:
    """Pretrain the model on every source domain together (one item space, domain-prefixed ids)."""
    import dataclasses as dc

    import polars as pl
    import torch

    from mmrec.data.sequences import concat_sequences
    from mmrec.experiment import fit
    from mmrec.export import export_model
    from mmrec.features import concat_contents, prefixed_item_map
    from mmrec.models.recommender import Recommender

    sources = [d.name for d in cfg.sources]
    if not sources:
        raise ValueError(f"{cfg.config_path}: no domain has role 'source': nothing to pretrain on")
    parts = [_domain_data(cfg, s) for s in sources]
    content, offsets = concat_contents([c for c, _ in parts])
    data = concat_sequences([dd for _, dd in parts], offsets)
    model_cfg, tc, ec = cfg.model(), dc.replace(cfg.train("pretrain"), progress=progress), cfg.evaluation()
    inputs = [cfg.artifact_path("item_features", s) / "features.safetensors" for s in sources] + [
        cfg.artifact_path("validated_catalog", s) / "splits.parquet" for s in sources]
    device = cfg.device()
    run = _run_dir(cfg, "pretrained_model", None, {"model": model_cfg.to_dict(), "train": _train_key(tc),
                                                   **_device_key(device)}, inputs)
    torch.manual_seed(tc.seed)
    model = Recommender(model_cfg, n_items=content.n_items).to(device)
    model.attach(content, data.train_examples(model_cfg.max_len), tc.seed)
    tr = _tracker(run, tracker)
    tr.set_tags({"stage": "pretrained_model", "domains": "+".join(sources)})
    result = fit(model, data, tc, run, tracker=tr, ks=ec.ks, batch_size=ec.batch_size, history=ec.history)
    item_maps = [(s, pl.read_parquet(cfg.artifact_path("validated_catalog", s) / "item_map.parquet")) for s in sources]
    info = {"stage": "pretrained_model", "sources": sources, "valid_metrics": result.best_metrics,
            "best_step": result.best_step, "steps": result.steps, "run_dir": str(run), "code": result.code,
            **_world_info()}
    out = cfg.artifact_path("pretrained_model")
    if _writer():
        out = export_model(model, out, prefixed_item_map(item_maps, offsets), "+".join(sources), info)
    return StageResult("pretrained_model", "+".join(sources), out, info)


def _world_info() -> dict[str, int]:
    """``{"world_size": W}`` for a model trained by ``W > 1`` processes (nothing for one)."""
    from mmrec.distributed import world

    return {"world_size": world()[1]} if world()[1] > 1 else {}


def _variants(cfg: PipelineConfig):
    """The models ``finetuned_model`` trains: ``name -> (model config, transfer part, train overrides)``
    for the fine-tuned one and the configured trained baselines."""
    from mmrec.models.recommender import ModelConfig
    from mmrec.models.towers import ADAPTOR_FIELDS

    model_cfg, transfer, ec = cfg.model("finetune"), cfg.transfer(), cfg.evaluation()
    out = {"model": (model_cfg, transfer.part, {})}
    if "scratch" in ec.baselines:
        out["scratch"] = (model_cfg, "none", {})
    spec = model_cfg.to_dict()
    # ID towers: IDs already, and no encoder for a content adaptor to map (so their run keys do not change with it)
    id_item = {k: v for k, v in spec["item_tower"].items()
               if k != "item_ids" and k not in ADAPTOR_FIELDS}
    id_spec = dict(spec, text_encoder=None, image_encoder=None, fusion=None)
    if "sasrec" in ec.baselines:
        # the standard ID SASRec: ID embeddings, full-catalog cross-entropy, its own dropout and lr
        sc = ec.sasrec
        sasrec = dict(id_spec, item_tower={**id_item, "name": "id", "dropout": 0.0},
                      user_encoder={**spec["user_encoder"], "name": "sasrec", "dropout": sc.dropout, "adapter_dim": None},
                      objective={"name": "full_softmax", "nicl_enabled": False, "nid_weight": 0.0, "rcl_weight": 0.0})
        out["sasrec"] = (ModelConfig.from_dict(sasrec, "sasrec baseline"), "none",
                         {"lr": sc.lr, "weight_decay": sc.weight_decay})
    if "id_tower" in ec.baselines:
        # our model with an ID tower instead of content, trained with our objectives
        id_tower = dict(id_spec, item_tower={**id_item, "name": "id"},
                        objective={**spec["objective"], "nicl_enabled": False})
        out["id_tower"] = (ModelConfig.from_dict(id_tower, "id_tower baseline"), "none", {})
    return out


def finetuned_model(cfg: PipelineConfig, domain: str, progress: bool = True, tracker=None) -> StageResult:
    """Fine-tune the pretrained model (``transfer.part``) on one target domain; train the
    configured baselines (from scratch, ID-SASRec) on it with the same budget."""
    import dataclasses as dc

    import polars as pl
    import torch
    from safetensors.torch import load_file

    from mmrec.experiment import fit
    from mmrec.export import export_model
    from mmrec.models.recommender import Recommender
    from mmrec.transfer import load_part

    d = cfg.domain(domain)
    content, data = _domain_data(cfg, d.name)
    tc, ec, transfer = dc.replace(cfg.train("finetune"), progress=progress), cfg.evaluation(), cfg.transfer()
    item_map = pl.read_parquet(cfg.artifact_path("validated_catalog", d.name) / "item_map.parquet")
    pretrained = cfg.artifact_path("pretrained_model") / "model.safetensors"
    inputs = [cfg.artifact_path("item_features", d.name) / "features.safetensors",
              cfg.artifact_path("validated_catalog", d.name) / "splits.parquet"]
    summary: dict[str, Any] = {"domain": d.name, "transfer": dc.asdict(transfer), "variants": {}}
    train_items = pl.read_parquet(inputs[1])["train"].explode().drop_nulls().to_torch()
    popularity = torch.bincount(train_items, minlength=content.n_items + 1)  # serves users with no history
    out = cfg.artifact_path("finetuned_model", d.name)
    device = cfg.device()
    import contextlib

    writer = _writer()
    with atomic_dir(out) if writer else contextlib.nullcontext() as tmp:
        for name, (mcfg, part, overrides) in _variants(cfg).items():
            vtc = dc.replace(tc, **overrides)
            key = {"model": mcfg.to_dict(), "train": _train_key(vtc), "part": part,
                   "adapters": transfer.freeze_user_encoder_except_adapters, **_device_key(device)}
            run = _run_dir(cfg, "finetuned_model", d.name, key, inputs + ([pretrained] if part != "none" else []))
            torch.manual_seed(tc.seed)
            model = Recommender(mcfg, n_items=content.n_items)
            if part != "none":
                if not pretrained.is_file():
                    raise FileNotFoundError(f"{pretrained}: run pretrained_model first (transfer.part = {part!r})")
                load_part(model, load_file(pretrained), part)
                if transfer.freeze_user_encoder_except_adapters:
                    model.user_encoder.freeze_for_adapters()
            model.to(device).attach(content, data.train_examples(mcfg.max_len), tc.seed)
            tr = _tracker(run, tracker)
            tr.set_tags({"stage": "finetuned_model", "domain": d.name, "variant": name, "transfer": part})
            result = fit(model, data, vtc, run, tracker=tr, ks=ec.ks, batch_size=ec.batch_size, history=ec.history)
            info = {"variant": name, "transfer": part, "valid_metrics": result.best_metrics, "best_step": result.best_step,
                    "steps": result.steps, "stopped_early": result.stopped_early, "run_dir": str(run), "code": result.code,
                    **_world_info()}
            if writer:
                export_model(model, tmp / ("model" if name == "model" else f"baselines/{name}"), item_map, d.name, info,
                             popularity)
            summary["variants"][name] = info
        if writer:
            write_json(tmp / "summary.json", summary)
    return StageResult("finetuned_model", d.name, out, summary)


def evaluation(cfg: PipelineConfig, domain: str, progress: bool = True, tracker=None) -> StageResult:
    """Test metrics (full ranking, ``evaluation.history`` protocol, cold-start subset) of the
    fine-tuned model, its baselines and the zero-shot pretrained model, each user's test rank per
    model (``ranks.parquet``, for paired intervals), and the quality gate the registration checks.

    The test split is read here once per finished run and by nothing that selects: the gate
    compares the models' *validation* metric (the early-stopping best of each run)."""
    import polars as pl
    from safetensors.torch import load_file

    from mmrec.experiment import evaluate_model, evaluate_vectors
    from mmrec.export import load_model
    from mmrec.models.recommender import ModelConfig, Recommender
    from mmrec.transfer import load_part

    d = cfg.domain(domain)
    ec = cfg.evaluation()
    content, data = _domain_data(cfg, d.name)
    ft = cfg.artifact_path("finetuned_model", d.name)
    trained = [n for n in TRAINED_BASELINES if n in ec.baselines]
    folders = {"finetuned": ft / "model", **{n: ft / "baselines" / n for n in trained}}
    models: dict[str, dict[str, Any]] = {}
    user_ranks: dict[str, Any] = {}
    for name, folder in folders.items():
        m = load_model(folder)
        out: dict[str, Any] = {}
        models[name] = evaluate_vectors(lambda h, m=m: m.model.user_vectors(h, m.item_vectors), m.item_vectors, data, "test",
                                        m.model.cfg.max_len, ec.ks, ec.batch_size, ec.history, out)
        user_ranks[name] = out["ranks"]
    if "zero_shot" in ec.baselines:
        pre = cfg.artifact_path("pretrained_model")
        meta = json.loads((pre / "model.json").read_text())
        zs = Recommender(ModelConfig.from_dict(meta["model"]), n_items=content.n_items)
        load_part(zs, load_file(pre / "model.safetensors"), "whole")
        zs.attach(content)
        out = {}
        models["zero_shot"] = evaluate_model(zs, data, "test", ec.ks, ec.batch_size, ec.history, out)
        user_ranks["zero_shot"] = out["ranks"]
    summary = json.loads((ft / "summary.json").read_text())
    valid = {("finetuned" if n == "model" else n): v["valid_metrics"] for n, v in summary["variants"].items()}
    metric = ec.gate_metric
    against = {n: valid[n].get(metric) for n in ec.gate_against}
    best_baseline = max(against.values()) if against else None
    gate = {
        "metric": metric,
        "split": "valid",
        "margin": ec.gate_margin,
        "finetuned": valid["finetuned"].get(metric),
        "against": list(ec.gate_against),
        "best_baseline": best_baseline,
        "passed": best_baseline is None or valid["finetuned"][metric] > best_baseline + ec.gate_margin,
    }
    result = {"domain": d.name, "split": "test", "history": ec.history, "models": models, "valid": valid, "gate": gate}
    out_dir = cfg.artifact_path("evaluation", d.name)
    with atomic_dir(out_dir) as tmp:
        write_json(tmp / METRICS, result)
        (tmp / "metrics.md").write_text(metrics_table(result) + "\n", encoding="utf-8")
        pl.DataFrame({"user_idx": list(range(data.n_users)), **{n: r.tolist() for n, r in user_ranks.items()}}).write_parquet(
            tmp / RANKS)
    if tracker is not None:
        tracker.log_metrics({f"{n}/{k}": v for n, m in models.items() for k, v in m.items() if isinstance(v, (int, float))})
    return StageResult("evaluation", d.name, out_dir, result)


def read_metrics(cfg: PipelineConfig, domain: str) -> dict[str, Any]:
    """The result a finished ``evaluation`` stage recorded."""
    return _read_record(cfg, "evaluation", domain, METRICS)


def read_ranks(cfg: PipelineConfig, domain: str) -> dict[str, Any]:
    """Each test user's rank per model recorded by ``evaluation``: ``model -> (U,) int array``."""
    import polars as pl

    path = cfg.artifact_path("evaluation", cfg.domain(domain).name) / RANKS
    if not path.is_file():
        raise FileNotFoundError(f"{path}: run the evaluation stage first")
    df = pl.read_parquet(path).sort("user_idx")
    return {c: df[c].to_numpy() for c in df.columns if c != "user_idx"}


def paired_gap_lines(runs: dict[int, dict[str, Any]], metric: str = "NDCG@10", reference: str = "finetuned") -> list[str]:
    """The paired interval over users of ``reference`` minus every other model (``runs``: seed ->
    ``read_ranks`` result); per-user values averaged over the seeds first (``mmrec.compare``)."""
    from mmrec.compare import paired_gaps

    names = [n for n in next(iter(runs.values())) if all(n in r for r in runs.values())]
    ranks = {n: [runs[s][n] for s in sorted(runs)] for n in names}
    return [g.line() for g in paired_gaps(ranks, reference, metric)]


def _metric_columns(ks: tuple[int, ...]) -> tuple[list[str], list[str]]:
    """The metric keys of a metrics table (HR/NDCG/MRR at ``ks``, then their ``cold/`` versions) and
    its Markdown header (the first two lines)."""
    cols = [f"{m}@{k}" for k in ks for m in ("HR", "NDCG", "MRR")]
    head = ["model", *cols, *[f"cold {c}" for c in cols]]
    return [*cols, *[f"cold/{c}" for c in cols]], ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]


def metrics_table(result: dict[str, Any], ks: tuple[int, ...] = (10,)) -> str:
    """A Markdown table of an evaluation result: HR/NDCG/MRR at ``ks``, all users and cold-start."""
    keys, lines = _metric_columns(ks)
    fmt = lambda v: "-" if v is None else f"{100 * v:.2f}"  # noqa: E731
    for name, m in result["models"].items():
        lines.append("| " + " | ".join([name, *[fmt(m.get(c)) for c in keys]]) + " |")
    any_m = next(iter(result["models"].values()))
    lines.append(f"\n{result['domain']}, {result['split']} split: {any_m['n_users']} users, "
                 f"{any_m['n_cold_users']} with a cold-start target; values in %.")
    return "\n".join(lines)


def metrics_summary_table(runs: dict[int, dict[str, Any]], ks: tuple[int, ...] = (10,)) -> str:
    """A Markdown table of several evaluation results of one domain (one per seed): mean and sample
    standard deviation of HR/NDCG/MRR at ``ks``, all users and cold-start, for the models every run has."""
    if len(runs) < 2:
        raise ValueError(f"a summary needs the results of at least two runs, got {len(runs)}")
    results = list(runs.values())
    domains = {r["domain"] for r in results}
    if len(domains) != 1:
        raise ValueError(f"the runs evaluated different domains: {sorted(domains)}")
    users = {next(iter(r["models"].values()))["n_users"] for r in results}
    if len(users) != 1:
        raise ValueError(f"the runs evaluated different test sets: {sorted(users)} users")
    names = [n for n in results[0]["models"] if all(n in r["models"] for r in results)]
    keys, lines = _metric_columns(ks)
    for name in names:
        cells = [name]
        for c in keys:
            vals = [r["models"][name].get(c) for r in results]
            if any(v is None for v in vals):
                cells.append("-")
                continue
            v = [100 * float(x) for x in vals]
            cells.append(f"{statistics.mean(v):.2f} ± {statistics.stdev(v):.2f}")
        lines.append("| " + " | ".join(cells) + " |")
    passed = sum(bool(r["gate"]["passed"]) for r in results)
    lines.append(f"\n{domains.pop()}, {results[0]['split']} split, {users.pop()} users: mean ± sample standard "
                 f"deviation over seeds {sorted(runs)} (n={len(runs)}); values in %. Quality gate passed in "
                 f"{passed} of {len(runs)} runs.")
    metric = results[0]["gate"]["metric"]
    if "finetuned" in names and all(metric in r["models"][n] for r in results for n in names):
        # paired by seed: the spread of the gap, not of the two rows, says whether a gain is noise
        gaps = []
        for name in names:
            if name == "finetuned":
                continue
            g = [100 * (r["models"]["finetuned"][metric] - r["models"][name][metric]) for r in results]
            gaps.append(f"{name} {statistics.mean(g):+.2f} ± {statistics.stdev(g):.2f} ({sum(x > 0 for x in g)} of {len(g)} positive)")
        if gaps:
            lines.append(f"{metric} of the fine-tuned model minus each other model, paired by seed: " + "; ".join(gaps) + ".")
    return "\n".join(lines)


STAGE_FUNCTIONS = {
    "raw_catalog": raw_catalog,
    "validated_catalog": validated_catalog,
    "item_features": item_features,
    "pretrained_model": pretrained_model,
    "finetuned_model": finetuned_model,
    "evaluation": evaluation,
}
assert tuple(STAGE_FUNCTIONS) == STAGES
