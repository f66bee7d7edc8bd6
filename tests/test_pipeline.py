"""The whole pipeline on the built-in demo data with tiny models: every stage's artifact, the
export, and the point of the project: pretraining on the source domains, then fine-tuning, beats
the same model trained from scratch on the target under the same budget (fixed seed, margin)."""

import hashlib
import json

import pytest
import yaml

from mmrec import stages
from mmrec.config import load_config
from mmrec.export import load_model
from tests.conftest import REPO

MARGIN = 0.01  # NDCG@10, absolute; measured 2026-12-02: 0.1285 vs 0.0873 (README, transfer results)


@pytest.fixture(scope="module")
def pipeline(tmp_path_factory):
    import torch

    root = tmp_path_factory.mktemp("demo")
    spec = {
        "preset": str(REPO / "configs" / "demo.yaml"),
        "root": str(root),
        "artifacts": "artifacts",
        "model": {"dim": 32, "text_encoder": {"random_init": True, "max_length": 24, "overrides": {
            "hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 2, "intermediate_size": 64}},
            "image_encoder": {"random_init": True, "image_size": 32}},
        "pretrain": {"epochs": 20, "patience": 5, "lr": 0.001, "weight_decay": 0.01, "batch_size": 64, "progress": False},
        "finetune": {"epochs": 20, "patience": 5, "lr": 0.001, "weight_decay": 0.01, "batch_size": 64, "progress": False},
        "evaluation": {"baselines": ["scratch", "zero_shot"]},
    }
    path = root / "pipeline.yaml"
    path.write_text(yaml.safe_dump(spec))
    cfg = load_config(path)
    from mmrec.data.synthetic import generate_demo

    generate_demo(cfg.demo, root / "data" / "demo", progress=False)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    results = {}
    try:
        for stage in stages.STAGES:
            for d in stages.stage_domains(cfg, stage):
                fn = stages.STAGE_FUNCTIONS[stage]
                results[(stage, d)] = fn(cfg, progress=False) if d is None else fn(cfg, d, progress=False)
    finally:
        torch.set_num_threads(threads)
    return cfg, results


def test_every_stage_writes_its_artifact(pipeline):
    cfg, results = pipeline
    for (stage, d), res in results.items():
        assert res.path == cfg.artifact_path(stage, d) and res.path.is_dir(), (stage, d)
    assert {d for s, d in results if s == "finetuned_model"} == {"films"}
    assert (cfg.artifact_path("item_features", "books") / "features.safetensors").is_file()
    assert (cfg.artifact_path("evaluation", "films") / "metrics.md").read_text().startswith("| model |")


def test_pretraining_then_finetuning_beats_scratch_at_equal_budget(pipeline):
    cfg, results = pipeline
    ev = json.loads((cfg.artifact_path("evaluation", "films") / "metrics.json").read_text())
    ft, scratch = ev["models"]["finetuned"]["NDCG@10"], ev["models"]["scratch"]["NDCG@10"]
    print(f"films test NDCG@10: fine-tuned {ft:.4f}, scratch {scratch:.4f}, zero-shot {ev['models']['zero_shot']['NDCG@10']:.4f}")
    assert ft > scratch + MARGIN
    assert ev["gate"]["passed"] and ev["gate"]["against"] == ["scratch"]
    summary = results[("finetuned_model", "films")].metadata["variants"]
    assert summary["model"]["transfer"] == "whole" and summary["scratch"]["transfer"] == "none"


def test_exported_finetuned_model_reproduces_the_offline_metrics(pipeline):
    cfg, _ = pipeline
    from mmrec.experiment import evaluate_vectors
    from mmrec.stages import _domain_data

    m = load_model(cfg.artifact_path("finetuned_model", "films") / "model")
    _, data = _domain_data(cfg, "films")
    got = evaluate_vectors(lambda h: m.model.user_vectors(h, m.item_vectors), m.item_vectors, data, "test", m.model.cfg.max_len)
    ev = json.loads((cfg.artifact_path("evaluation", "films") / "metrics.json").read_text())
    assert got["NDCG@10"] == pytest.approx(ev["models"]["finetuned"]["NDCG@10"])
    recs = m.recommend([m.item_ids[:3]], k=5)[0]
    assert len(recs) == 5 and not set(i for i, _ in recs) & set(m.item_ids[:3])


def test_second_item_features_run_reads_the_cache(pipeline):
    cfg, _ = pipeline
    res = stages.item_features(cfg, "films", progress=False)
    for mod, st in res.metadata["modalities"].items():
        assert st["computed"] == 0 and st["hits"] > 0, mod


def test_item_features_artifact_is_identical_across_runs(pipeline):
    """DVC hashes the artifact: a re-run from the cache must write the same bytes."""
    cfg, _ = pipeline
    out = cfg.artifact_path("item_features", "books")
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    stages.item_features(cfg, "books", progress=False)
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before


def test_select_finetune_compares_variants_on_validation_over_seeds(pipeline, capsys, monkeypatch, tmp_path):
    """benchmarks/select_finetune.py: each variant fine-tuned from the pretrained model as the stage
    does, its validation ranks kept in a record naming its command, commit and config, a paired gap to
    the first variant; finished records are read back."""
    import sys

    import numpy as np

    from mmrec.compare import per_user

    sys.path.insert(0, str(REPO / "benchmarks"))
    import select_finetune

    cfg, _ = pipeline
    seed = cfg.train("finetune").seed
    records = tmp_path / "selection"
    args = ["--config", str(cfg.config_path), "--domain", "films", "--records", str(records), "--variant", "base",
            "finetune.epochs=3", "--variant", "ids", "finetune.item_tower.item_ids=true", "finetune.epochs=3"]
    assert select_finetune.main(args) == 0
    out = capsys.readouterr().out
    n_valid = json.loads((cfg.artifact_path("evaluation", "films") / "metrics.json").read_text())["models"]["finetuned"]["n_users"]
    for name in ("base", "ids"):
        rec = json.loads((records / "films" / f"{name}-seed{seed}.json").read_text())
        assert len(rec["valid_ranks"]) == n_valid and rec["transfer"] == "whole"
        assert np.mean(per_user(np.asarray(rec["valid_ranks"]), "NDCG@10")) == pytest.approx(rec["valid"]["NDCG@10"])
        assert rec["variant"] == name and rec["seed"] == seed and rec["domain"] == "films"
        assert rec["command"].startswith("python benchmarks/select_finetune.py --config") and "commit" in rec
        assert rec["config"]["sha256"] == hashlib.sha256(cfg.config_path.read_bytes()).hexdigest()
        pretrained = cfg.artifact_path("pretrained_model")
        assert rec["config"]["pretrained_sha256"] == hashlib.sha256(
            (pretrained / "model.json").read_bytes() + (pretrained / "model.safetensors").read_bytes()).hexdigest()
    assert json.loads((records / "films" / f"ids-seed{seed}.json").read_text())["epochs_run"] <= 3
    table = [line for line in out.splitlines() if line.startswith("| ids |")]
    assert len(table) == 1 and "[" in table[0].split("|")[-2]  # a gap with its interval
    # read back, never refitted; a changed override under the same name is refused
    monkeypatch.setattr(select_finetune, "_fit_variant", lambda *a, **k: pytest.fail("refitted a finished variant"))
    assert select_finetune.main(args) == 0
    with pytest.raises(SystemExit, match="recorded with"):
        select_finetune.main(args[:-1] + ["finetune.epochs=4"])
    with pytest.raises(SystemExit, match="--seed 5"):  # no pretrained model for that seed
        select_finetune.main(args + ["--seed", "5"])
    # a changed base recipe (the config or a preset it reads) is another recipe: its records are refused
    rec_path = records / "films" / f"base-seed{seed}.json"
    rec = json.loads(rec_path.read_text())
    import dataclasses as dc

    assert rec["config"]["recipe_sha256"] == select_finetune._recipe_digest(cfg, ["finetune.epochs=3"])
    changed = dc.replace(cfg, sections={**cfg.sections, "finetune": {**(cfg.sections.get("finetune") or {}), "lr": 0.0123}})
    assert select_finetune._recipe_digest(changed, ["finetune.epochs=3"]) != rec["config"]["recipe_sha256"]
    assert select_finetune._recipe_digest(cfg, ["finetune.epochs=3", "finetune.user_encoder.dropout=0.5"]) \
        != rec["config"]["recipe_sha256"]
    monkeypatch.setattr(select_finetune, "_recipe_digest", lambda cfg, overrides: "e" * 64)
    with pytest.raises(SystemExit, match="another fine-tuning recipe"):
        select_finetune.main(args)
    monkeypatch.undo()
    monkeypatch.setattr(select_finetune, "_fit_variant", lambda *a, **k: pytest.fail("refitted a finished variant"))
    assert select_finetune.main(args) == 0  # the real digest still matches
    # pretraining made again gives another model: its old records are refused, not paired with new fits
    monkeypatch.setattr(select_finetune, "_pretrained_digest", lambda folder: "f" * 64)
    with pytest.raises(SystemExit, match="another pretrained model.*ffffffffffff"):
        select_finetune.main(args)


def test_cache_determinism_benchmark_finds_no_item_that_depends_on_its_batch(pipeline, capsys, monkeypatch):
    """benchmarks/cache_determinism.py: a domain's features built in one call and in shuffled pieces are
    the same bytes (exit 0); with version 1's image batching (a batch of any size) it finds the items
    that moved and exits 1."""
    import sys

    import mmrec.encoders.cache as cache

    sys.path.insert(0, str(REPO / "benchmarks"))
    import cache_determinism

    cfg, _ = pipeline
    args = ["--config", str(cfg.config_path), "--domain", "films", "--chunks", "3"]
    assert cache_determinism.main(args) == 0
    out = capsys.readouterr().out
    n = json.loads((cfg.artifact_path("item_features", "films") / "features.json").read_text())["n_items"]
    assert f"text: {n} items, 0 differ" in out and f"image: {n} items, 0 differ" in out

    def any_batch(encoder, pixels):  # version 1: the encoder ran on whatever the batch held
        tokens, pooled = encoder.top(encoder.bottom(pixels))
        return {"tokens": tokens, "pooled": pooled}

    monkeypatch.setattr(cache, "_image_rows", any_batch)
    assert cache_determinism.main(args) == 1
    out = capsys.readouterr().out
    moved = int(out.split(f"image: {n} items, ")[1].split(" differ")[0])
    assert moved > 0 and f"text: {n} items, 0 differ" in out


def test_select_finetune_rebuilds_item_features_for_a_variant_with_other_encoders(pipeline, monkeypatch, tmp_path):
    """A variant that trains the top text layer in fine-tuning reads the states below it: the target's
    features are built again for its config (not the artifact's final states), and the pretrained
    weights load unchanged."""
    import sys

    import mmrec.features

    sys.path.insert(0, str(REPO / "benchmarks"))
    import select_finetune

    cfg, _ = pipeline
    built = []
    real = mmrec.features.build_item_features
    monkeypatch.setattr(mmrec.features, "build_item_features",
                        lambda catalog, model_cfg, *a, **k: built.append(model_cfg) or real(catalog, model_cfg, *a, **k))
    records = tmp_path / "selection"
    args = ["--config", str(cfg.config_path), "--domain", "films", "--records", str(records),
            "--variant", "base", "finetune.epochs=2", "--variant", "top1", "model.text_encoder.trainable_layers=1",
            "finetune.epochs=2"]
    assert select_finetune.main(args) == 0
    assert [m.text_encoder.trainable_layers for m in built] == [1]  # the base variant reads the artifact
    rec = json.loads((records / "films" / f"top1-seed{cfg.train('finetune').seed}.json").read_text())
    assert rec["overrides"] == ["model.text_encoder.trainable_layers=1", "finetune.epochs=2"] and rec["steps"] > 0
    assert 0 < rec["valid"]["NDCG@10"] <= 1
