"""``make experiments --quick``: every cell at toy size on the demo data into a temporary folder;
the records, their traceability, resumption, RESULTS.md and the figures."""

from __future__ import annotations

import hashlib
import json
import statistics

import numpy as np
import polars as pl
import pytest
from PIL import Image

from experiments import cells as C
from experiments.run import CostTracker, log_cost, main
from mmrec.compare import compare_ranks, per_user
from mmrec.config import load_config
from tests.conftest import REPO


def _abs(path: str):
    return path if path.startswith("/") else str(REPO / path)

TRANSFER_MODELS = {"finetuned", "scratch", "sasrec", "id_tower", "zero_shot"}
FIGURES = ("target_fraction.png", "source_fraction.png", "modality.png", "objective.png")


@pytest.fixture(scope="module")
def quick(tmp_path_factory):
    root = tmp_path_factory.mktemp("experiments")
    argv = ["--config", str(REPO / "configs" / "demo.yaml"), "--quick", "--seed", "0",
            "--out", str(root / "out"), "--docs", str(root / "docs")]
    assert main(argv) == 0
    return root, argv, root / "docs" / "results" / "demo-quick" / "records"


def _record(records, cell, seed=0):
    return json.loads((records / f"{cell}-seed{seed}.json").read_text())


def test_every_planned_cell_has_a_traceable_record(quick):
    root, _, records = quick
    plan = json.loads((records / "plan.json").read_text())
    names = {c["name"] for c in plan["cells"]}
    assert {c["group"] for c in plan["cells"]} == set(C.GROUPS)
    assert len(names) == 1 + len(C.SOURCE_FRACTIONS) + len(C.TARGET_FRACTIONS) + 2 + len(C.FUSIONS) + 2 + 4
    head = json.loads((records / "transfer-seed0.json").read_text())["commit"]
    assert len(head) == 40
    for name in names:
        rec = _record(records, name)
        assert rec["cell"] == name and rec["seed"] == 0 and rec["quick"] and rec["commit"] == head
        cfg_path = _abs(rec["config"]["path"])
        text = open(cfg_path, "rb").read()
        assert hashlib.sha256(text).hexdigest() == rec["config"]["sha256"]
        cfg = load_config(cfg_path)
        assert cfg.evaluation().history == "masked" and cfg.train("finetune").seed == 0
        t = rec["targets"]["films"]
        ranks = pl.read_parquet(_abs(t["ranks"]["path"]))
        assert hashlib.sha256(open(_abs(t["ranks"]["path"]), "rb").read()).hexdigest() == t["ranks"]["sha256"]
        assert ranks.height == t["n_users"] and "finetuned" in ranks.columns
        # the record's test metrics are the evaluation stage's, and its ranks reproduce them
        metrics = json.loads(open(_abs(t["metrics_json"])).read())
        for model, m in t["models"].items():
            assert m["test"] == metrics["models"][model]
            hits = (ranks[model].to_numpy() <= 10).mean()
            assert hits == pytest.approx(m["test"]["HR@10"])
        assert t["models"]["finetuned"]["valid"]["NDCG@10"] == metrics["valid"]["finetuned"]["NDCG@10"]
        # the validation ranks of every trained model (what a choice is made on) reproduce the record's
        # validation metrics: the fine-tuned model and baselines on the target, the pretrained one on the sources
        vr = t["valid_ranks"]
        assert hashlib.sha256(open(_abs(vr["path"]), "rb").read()).hexdigest() == vr["sha256"]
        valid = pl.read_parquet(_abs(vr["path"]))
        trained = {m for m, e in t["models"].items() if "run_dir" in e}
        assert set(vr["models"]) == trained and set(valid.columns) == trained | {"user_idx"}
        for model in trained:
            assert np.mean(per_user(valid[model].to_numpy(), "NDCG@10")) == pytest.approx(
                t["models"][model]["valid"]["NDCG@10"], abs=1e-9)
        pre = pl.read_parquet(_abs(rec["pretrained"]["valid_ranks"]["path"]))["pretrained"].to_numpy()
        assert np.mean(per_user(pre, "NDCG@10")) == pytest.approx(rec["pretrained"]["valid_metrics"]["NDCG@10"], abs=1e-9)
        assert pre.size == rec["pretrained"]["valid_metrics"]["n_users"] != t["n_users"]
        # which code trained each run (a reused run can be older than the record's commit)
        trained = [rec["pretrained"]["trained_by"]] + [m["trained_by"] for m in t["models"].values() if "run_dir" in m]
        assert all(tb and len(tb[0]["commit"]) == 40 and tb[0]["from_step"] == 0 for tb in trained), name


def test_cells_differ_as_planned(quick):
    _, _, records = quick
    transfer = _record(records, "transfer")
    assert set(transfer["targets"]["films"]["models"]) == TRANSFER_MODELS
    full_users = transfer["targets"]["films"]["n_users"]
    for f in C.TARGET_FRACTIONS:
        t = _record(records, f"target-{int(100 * f)}")["targets"]["films"]
        assert t["n_users"] == int(np.ceil(f * full_users)) and set(t["models"]) == TRANSFER_MODELS
    for f in C.SOURCE_FRACTIONS:
        rec = _record(records, f"source-{int(100 * f)}")
        assert rec["targets"]["films"]["n_users"] == full_users and set(rec["targets"]["films"]["models"]) == {"finetuned", "zero_shot"}
        cfg = load_config(_abs(rec["config"]["path"]))
        assert [d.user_fraction for d in cfg.sources] == [f, f] and cfg.targets[0].user_fraction == 1.0
    tower = load_config(_abs(_record(records, "tower-image")["config"]["path"])).model()
    assert tower.item_tower.name == "image" and not tower.objective.nicl_enabled
    assert load_config(_abs(_record(records, "fused-gated")["config"]["path"])).model().fusion.name == "gated"
    obj = load_config(_abs(_record(records, "objective-nid")["config"]["path"])).model().objective
    assert (obj.nicl_enabled, obj.nid_weight > 0, obj.rcl_weight) == (False, True, 0.0)
    # the MoM cells read a regenerated catalog in which no item has both modalities
    mom = _record(records, "mom-mom")
    assert mom["config"]["demo"]["p_text_only"] + mom["config"]["demo"]["p_image_only"] == 1.0
    assert load_config(_abs(mom["config"]["path"])).model().item_tower.name == "mom"


def test_cold_warm_and_cost_come_from_the_run(quick):
    _, _, records = quick
    t = _record(records, "target-10")["targets"]["films"]
    ranks = pl.read_parquet(_abs(t["ranks"]["path"]))
    cold = ranks["cold"].to_numpy()
    assert t["n_cold_users"] == int(cold.sum())
    for m in t["models"].values():
        assert m["warm"]["n_users"] + m["cold"]["n_users"] == t["n_users"]
        if t["n_cold_users"]:
            assert m["cold"]["HR@10"] == pytest.approx(m["test"]["cold/HR@10"])
        # frequency groups partition the users; group "0" is exactly the cold-start users
        freq = m["by_target_frequency"]
        assert sum(b["n_users"] for b in freq.values()) == t["n_users"] and freq["0"]["n_users"] == t["n_cold_users"]
    assert ((ranks["target_train_count"] == 0) == ranks["cold"]).all()
    transfer = _record(records, "transfer")
    cost = transfer["targets"]["films"]["models"]["finetuned"]["cost"]
    assert cost["trained_here"] and cost["sequences_per_second"] > 0 and cost["wall_seconds_per_epoch"] > 0
    assert cost["epochs"] == pytest.approx(2.0) and cost["steps_timed"] >= 1
    assert transfer["pretrained"]["cost"]["trained_here"]
    # target-10 pretrains exactly as the transfer cell: the shared run is reused, not retrained
    reused = _record(records, "target-10")["pretrained"]
    assert reused["run_dir"] == transfer["pretrained"]["run_dir"] and not reused["cost"]["trained_here"]


def test_results_page_and_figures(quick):
    root, _, _ = quick
    text = (root / "docs" / "RESULTS.md").read_text()
    for heading in ("### Transfer vs from scratch", "### Data size", "### Modality ablation", "### MoM routing",
                    "### Objective ablation", "### Cold-start vs warm", "### Training cost", "### Missing cells"):
        assert heading in text
    assert "transfer-seed0.json" in text and "18 of 18 planned cell runs" in text
    for name in FIGURES:
        path = root / "docs" / "results" / "demo-quick" / name
        assert f"results/demo-quick/{name}" in text
        with Image.open(path) as im:
            im.load()
            assert im.width >= 400 and im.height >= 300
            assert len(im.convert("RGB").getcolors(maxcolors=1 << 16) or range(1 << 16)) > 20  # not blank


def test_resume_skips_recorded_cells_and_reports_missing_seeds(quick):
    root, argv, records = quick
    before = {p.name: p.stat().st_mtime_ns for p in records.glob("*-seed0.json")}
    old = _record(records, "objective-rcl")
    (records / "objective-rcl-seed0.json").unlink()
    assert main(argv) == 0
    after = {p.name: p.stat().st_mtime_ns for p in records.glob("*-seed0.json")}
    assert {n for n in after if after[n] != before[n]} == {"objective-rcl-seed0.json"}
    new = _record(records, "objective-rcl")
    # its training runs were finished: resumed, not retrained, and the same model
    assert new["targets"]["films"]["models"]["finetuned"]["test"] == old["targets"]["films"]["models"]["finetuned"]["test"]
    assert not new["targets"]["films"]["models"]["finetuned"]["cost"]["trained_here"]
    assert main([*argv, "--seed", "1", "--plan-only"]) == 0
    text = (root / "docs" / "RESULTS.md").read_text()
    assert "`transfer` (transfer): seed(s) [1] not run yet" in text


def test_a_record_of_another_config_is_stale_left_out_and_run_again(quick):
    root, argv, records = quick
    path = records / "objective-nid-seed0.json"
    rec = json.loads(path.read_text())
    assert len(rec["config"]["recipe"]) == 16
    rec["config"]["recipe"] = "0" * 16  # as if the base config had another recipe when it ran
    path.write_text(json.dumps(rec))
    plan = json.loads((records / "plan.json").read_text())
    plan["cells"].append({"name": "objective-gone", "group": "objective", "label": "a cell of an older plan",
                          "value": None, "seeds": [0]})
    (records / "plan.json").write_text(json.dumps(plan))
    assert main([*argv, "--plan-only"]) == 0
    plan = json.loads((records / "plan.json").read_text())
    assert [(s["cell"], s["seed"]) for s in plan["stale"]] == [("objective-nid", 0)]
    assert "objective-gone" not in {c["name"] for c in plan["cells"]}  # the base config no longer plans it
    text = (root / "docs" / "RESULTS.md").read_text()
    assert "`objective-nid` seed 0: its record was made under another config" in text
    assert "objective-nid-seed0.json" not in text.split("### Missing cells")[0]  # out of the tables
    assert main([*argv, "--cells", "objective"]) == 0  # runs it again (its training runs are finished: resumed)
    new = json.loads(path.read_text())
    assert new["config"]["recipe"] != "0" * 16 and new["started"] > rec["started"]
    assert json.loads((records / "plan.json").read_text())["stale"] == []
    assert "objective-nid-seed0.json" in (root / "docs" / "RESULTS.md").read_text()


def test_recipe_follows_the_sections_not_the_location(tmp_path):
    import dataclasses

    base = load_config(REPO / "configs" / "demo.yaml")
    cell = next(c for c in C.plan(base, False)[0] if c.name == "objective-nid")

    def recipe(cfg, where):
        return C.recipe(C.derive(cfg, cell, 0, where / "cells" / "x", where / "cache", False, None))

    assert recipe(base, tmp_path / "a") == recipe(base, tmp_path / "b")
    other = dataclasses.replace(base, sections=C._merge(base.sections, {"finetune": {"lr": 0.123}}))
    assert recipe(other, tmp_path / "a") != recipe(base, tmp_path / "a")
    assert recipe(base, tmp_path / "a") != C.recipe(C.derive(base, cell, 1, tmp_path, tmp_path, False, None))  # seed


def test_valid_gap_reads_each_cells_best_model_on_validation(quick, capsys, monkeypatch, tmp_path):
    """benchmarks/valid_gap.py: the fine-tuned model of each record ranks the validation users again
    (the record's valid metric, reproduced) and the paired gap is printed; a missing record is named."""
    import sys

    _, _, records = quick
    monkeypatch.syspath_prepend(str(REPO / "benchmarks"))
    import valid_gap

    argv = ["--records", str(records), "--domain", "films", "--cell", "transfer", "--cell", "objective-nid", "--seed", "0"]
    assert valid_gap.main(argv) == 0
    out = capsys.readouterr().out
    for cell in ("transfer", "objective-nid"):
        stored = _record(records, cell)["targets"]["films"]["models"]["finetuned"]["valid"]["NDCG@10"]
        assert f"{cell} seed 0: valid NDCG@10 {100 * stored:.2f}" in out
    assert "| objective-nid | " in out and "[" in out.splitlines()[-1]
    with pytest.raises(SystemExit, match="transfer-seed7.json: no record"):
        valid_gap.main([*argv[:-1], "7"])
    # a cell of another record folder (a probe config's runs): CELL@FOLDER, read from there
    other = f"objective-nid@{records}"
    assert valid_gap.main(["--records", str(records / "nowhere"), "--domain", "films", "--cell", other,
                           "--cell", f"transfer@{records}", "--seed", "0"]) == 0
    out = capsys.readouterr().out
    assert f"{other} seed 0: valid NDCG@10" in out and f"gap to {other} |" in out
    with pytest.raises(SystemExit, match="no record folder"):
        valid_gap.main([*argv[:6], "--cell", f"transfer@{records / 'nowhere'}", "--seed", "0"])
    # the pretrained models on the sources' validation: the record's pretraining valid metric, reproduced
    assert valid_gap.main(["--records", str(records), "--pretraining", "--cell", "transfer", "--cell", "objective-nid",
                           "--seed", "0"]) == 0
    out = capsys.readouterr().out
    for cell in ("transfer", "objective-nid"):
        stored = _record(records, cell)["pretrained"]["valid_metrics"]["NDCG@10"]
        assert f"{cell} seed 0: valid NDCG@10 {100 * stored:.2f}" in out
    assert "pretrained models on the sources: valid NDCG@10" in out
    with pytest.raises(SystemExit, match="one of them"):
        valid_gap.main([*argv[:4], "--pretraining", *argv[4:]])
    # a record made before records held validation ranks: its models, still in the artifacts, rank again
    older = tmp_path / "older"
    older.mkdir()
    for cell in ("transfer", "objective-nid"):
        rec = _record(records, cell)
        rec["targets"]["films"].pop("valid_ranks")
        rec["pretrained"].pop("valid_ranks")
        (older / f"{cell}-seed0.json").write_text(json.dumps(rec))
    for mode in (["--domain", "films"], ["--pretraining"]):
        assert valid_gap.main(["--records", str(records), *mode, "--cell", "transfer", "--cell", "objective-nid",
                               "--seed", "0"]) == 0
        recorded = capsys.readouterr().out
        assert valid_gap.main(["--records", str(older), *mode, "--cell", "transfer", "--cell", "objective-nid",
                               "--seed", "0"]) == 0
        assert capsys.readouterr().out == recorded  # the same ranks, so the same table
    sys.modules.pop("valid_gap", None)


def test_valid_ranks_are_backfilled_from_the_artifacts_while_they_hold_the_records_models(quick, tmp_path, capsys):
    """``--valid-ranks-only``: a record made before records held validation ranks gets them from the
    artifacts its evaluation names; a model whose ranks do not reproduce the record's value is left out."""
    import shutil

    _, argv, records = quick
    old = tmp_path / "records"
    old.mkdir()
    shutil.copy(records / "plan.json", old)
    for cell in ("transfer", "objective-nid"):
        rec = _record(records, cell)
        rec["targets"]["films"].pop("valid_ranks")
        rec["pretrained"].pop("valid_ranks")
        if cell == "transfer":
            rec["targets"]["films"]["models"]["finetuned"]["valid"]["NDCG@10"] += 0.01  # as if another run's
        (old / f"{cell}-seed0.json").write_text(json.dumps(rec))
    docs = tmp_path / "docs"
    assert main([*argv[:-4], "--records", str(old), "--docs", str(docs), "--valid-ranks-only"]) == 0
    err = capsys.readouterr().err
    assert "transfer-seed0.valid_ranks.parquet: finetuned: valid NDCG@10" in err and "left out" in err
    new = json.loads((old / "objective-nid-seed0.json").read_text())
    want = _record(records, "objective-nid")
    for got, ref in ((new["targets"]["films"]["valid_ranks"], want["targets"]["films"]["valid_ranks"]),
                     (new["pretrained"]["valid_ranks"], want["pretrained"]["valid_ranks"])):
        assert got["path"].startswith(str(old)) and got["sha256"] == ref["sha256"]  # the same ranks
    transfer = json.loads((old / "transfer-seed0.json").read_text())
    assert set(transfer["targets"]["films"]["valid_ranks"]["models"]) == {"scratch", "sasrec", "id_tower"}
    assert "valid_ranks" in transfer["pretrained"]
    mtime = (old / "transfer-seed0.json").stat().st_mtime_ns
    assert main([*argv[:-4], "--records", str(old), "--docs", str(docs), "--valid-ranks-only"]) == 0
    assert (old / "transfer-seed0.json").stat().st_mtime_ns == mtime  # nothing left to add: untouched


def _probe_folder(records, root, name, cell):
    """A probe folder ``root/name/records`` holding ``cell``'s seed-0 record of the quick run as its
    transfer cell (its rank files stay where they are: the record names them by absolute path)."""
    folder = root / name / "records"
    folder.mkdir(parents=True)
    plan = json.loads((records / "plan.json").read_text())
    plan.update(name=name, config=f"configs/probes/{name}.yaml", stale=[],
                cells=[{"name": "transfer", "group": "transfer", "label": "x", "value": 1.0, "seeds": [0]}])
    (folder / "plan.json").write_text(json.dumps(plan))
    rec = _record(records, cell)
    rec["cell"] = "transfer"
    (folder / "transfer-seed0.json").write_text(json.dumps(rec))
    return rec


def test_results_page_shows_probes_against_their_base_on_validation_only(quick, tmp_path):
    from experiments.report import write_report

    _, _, records = quick
    probes = tmp_path / "probes"
    base = _probe_folder(records, probes, "toy-base", "transfer")
    probe = _probe_folder(records, probes, "toy-nid", "objective-nid")
    _probe_folder(records, probes, "lone-moe", "objective-nid")  # a family without a base
    text = write_report(tmp_path / "docs", [], probes=probes, selection=tmp_path / "none").read_text()
    part = text.split("## Probes (validation only)")[1].split("\n## ")[0]
    assert "### `toy-*` against `toy-base` (`configs/probes/toy-base.yaml`)" in part
    assert "Probes lone-moe: no `lone-base` folder" in part

    def valid(rec, domain):
        entry = rec["pretrained"] if domain is None else rec["targets"][domain]
        col = "pretrained" if domain is None else "finetuned"
        return [pl.read_parquet(_abs(entry["valid_ranks"]["path"]))[col].to_numpy()]

    for domain, stored in ((None, lambda r: r["pretrained"]["valid_metrics"]["NDCG@10"]),
                           ("films", lambda r: r["targets"]["films"]["models"]["finetuned"]["valid"]["NDCG@10"])):
        g = compare_ranks(valid(probe, domain), valid(base, domain))
        gap = f"{100 * g.gap:+.2f} [{100 * g.low:+.2f}, {100 * g.high:+.2f}]"
        row = next(line for line in part.splitlines() if line.startswith("| `toy-nid` |") and gap in line
                   and f"{100 * stored(probe):.2f}" in line)
        assert "(seeds 0)" in row
        assert any(line.startswith("| `toy-base` |") and f"{100 * stored(base):.2f}" in line and "reference" in line
                   for line in part.splitlines())
    assert "test" not in part.split("**Pretraining**")[1].replace("The test metrics these runs also recorded", "")
    assert "toy-nid" in part and "transfer-seed0.json" in part


def test_results_page_shows_recipe_selection_records(tmp_path):
    """``benchmarks/select_finetune.py``'s records (in git): each variant's validation per seed, its mean
    and the paired interval against ``base`` over the seeds both have."""
    from experiments.report import write_report

    rng = np.random.default_rng(0)
    folder = tmp_path / "selection" / "real" / "movielens_100k"
    folder.mkdir(parents=True)
    ranks = {}
    for variant, overrides, shift, seeds in (("base", [], 0, (0, 1, 2)), ("ids", ["finetune.item_tower.item_ids=true"], -3, (0, 1))):
        for seed in seeds:
            r = np.maximum(1, rng.integers(1, 60, size=200) + shift)
            ranks[variant, seed] = r
            (folder / f"{variant}-seed{seed}.json").write_text(json.dumps({
                "script": "benchmarks/select_finetune.py", "command": f"python benchmarks/select_finetune.py --seed {seed}",
                "commit": "a" * 40, "dirty": False, "config": {"path": "configs/real.yaml", "sha256": "0" * 64,
                                                              "pretrained": "artifacts/real/pretrained_model"},
                "domain": "movielens_100k", "variant": variant, "seed": seed, "overrides": overrides, "epochs_run": 12.0,
                "valid": {"NDCG@10": float(np.mean(per_user(r, "NDCG@10")))}, "valid_ranks": r.tolist()}))
    text = write_report(tmp_path / "docs", [], probes=tmp_path / "none", selection=tmp_path / "selection").read_text()
    part = text.split("## Fine-tuning recipe selection (validation only)")[1].split("\n## ")[0]
    assert "### `configs/real.yaml` on movielens_100k" in part
    g = compare_ranks([ranks["ids", 0], ranks["ids", 1]], [ranks["base", 0], ranks["base", 1]])
    row = next(line for line in part.splitlines() if line.startswith("| `ids` |"))
    assert f"{100 * g.gap:+.2f} [{100 * g.low:+.2f}, {100 * g.high:+.2f}]" in row and "(seeds 0, 1)" in row
    assert " / ".join(f"{100 * np.mean(per_user(ranks['ids', s], 'NDCG@10')):.2f}" for s in (0, 1)) in row
    base_row = next(line for line in part.splitlines() if line.startswith("| `base` |"))
    assert "0-2" in base_row and "reference" in base_row
    assert "commit(s) aaaaaaaaaa" in part and "5 in" in part


def test_results_page_pairs_selection_records_only_from_one_pretrained_model(tmp_path):
    """Records fine-tuned from another pretrained model of the same seed (pretraining made again) are
    not paired: a seed whose two variants name different ``pretrained_sha256`` is left out of the gap,
    and a second folder for the same config is its own table, headed by the folder."""
    from experiments.report import write_report

    rng = np.random.default_rng(1)
    ranks = {}
    for folder_name, digests in (("real", {("base", 0): "a", ("ids", 0): "a", ("base", 1): "a", ("ids", 1): "b"}),
                                 ("real-2", {("base", 0): "c", ("ids", 0): "c"})):
        folder = tmp_path / "selection" / folder_name / "movielens_100k"
        folder.mkdir(parents=True)
        for (variant, seed), digest in digests.items():
            r = np.maximum(1, rng.integers(1, 60, size=150) - (2 if variant == "ids" else 0))
            ranks[folder_name, variant, seed] = r
            (folder / f"{variant}-seed{seed}.json").write_text(json.dumps({
                "script": "benchmarks/select_finetune.py", "command": "python benchmarks/select_finetune.py",
                "commit": "a" * 40, "dirty": False,
                "config": {"path": "configs/real.yaml", "sha256": "0" * 64, "pretrained": "artifacts/real/pretrained_model",
                           "pretrained_sha256": digest * 64},
                "domain": "movielens_100k", "variant": variant, "seed": seed,
                "overrides": [] if variant == "base" else ["finetune.item_tower.item_ids=true"],
                "valid": {"NDCG@10": float(np.mean(per_user(r, "NDCG@10")))}, "valid_ranks": r.tolist()}))
    text = write_report(tmp_path / "docs", [], probes=tmp_path / "none", selection=tmp_path / "selection").read_text()
    part = text.split("## Fine-tuning recipe selection (validation only)")[1].split("\n## ")[0]
    first, second = part.split("### `configs/real.yaml` on movielens_100k")[1:]
    assert first.startswith("\n") and second.startswith(" (`real-2/`)")
    for table, folder_name in ((first, "real"), (second, "real-2")):
        g = compare_ranks([ranks[folder_name, "ids", 0]], [ranks[folder_name, "base", 0]])
        row = next(line for line in table.splitlines() if line.startswith("| `ids` |"))
        assert f"{100 * g.gap:+.2f} [{100 * g.low:+.2f}, {100 * g.high:+.2f}] (seeds 0)" in row


def test_plan_without_demo_data_routes_its_own_catalog_by_modality():
    """Without a demo section the MoM cells run on the config's own data: an item with an image through
    the image encoder, one without through the text encoder; applicable only where a target has items
    of both routes (MovieLens-100K: 62 posterless films; the text-only Amazon domain: none)."""
    cells, skipped = C.plan(load_config(REPO / "configs" / "amazon.yaml"), recbole=True)
    assert not skipped
    cells = {c.name: c for c in cells}
    assert cells["transfer"].recbole
    mom, fused = cells["mom-mom"], cells["mom-fused"]
    assert mom.demo is None and mom.overrides["model"]["item_tower"] == {"name": "mom", "mom_both": "image"}
    assert fused.overrides == cells["fused-merge_attention"].overrides  # one config: shared training runs
    movielens = {"items": 1682, "text_only": 62, "share_image": 0.963, "share_both": 0.963, "share_text": 1.0}
    amazon = {"items": 33921, "text_only": 33921, "share_image": 0.0, "share_both": 0.0, "share_text": 1.0}
    everything_both = {"items": 100, "text_only": 0, "share_image": 1.0, "share_both": 1.0, "share_text": 1.0}
    assert C.not_applicable(mom, {"movielens_100k": movielens}) is None
    assert C.not_applicable(fused, {"amazon_instrument": amazon, "movielens_100k": movielens}) is None
    why = C.not_applicable(mom, {"amazon_instrument": amazon})
    assert why and "amazon_instrument: 33921 text-only, 0 with an image" in why
    assert "0 text-only, 100 with an image" in C.not_applicable(fused, {"films": everything_both})
    assert C.not_applicable(cells["tower-image"], {"movielens_100k": movielens}) is None
    assert "share_image 0" in C.not_applicable(cells["tower-image"], {"amazon_instrument": amazon})
    assert "share_both 0" in C.not_applicable(cells["fused-gated"], {"amazon_instrument": amazon})
    assert C.not_applicable(cells["tower-text"], {"amazon_instrument": amazon}) is None


def test_objective_cells_add_all_four_when_the_base_config_lacks_one():
    import dataclasses

    base = load_config(REPO / "configs" / "demo.yaml")
    assert base.model().objective.nicl_enabled and "objective-all" not in {c.name for c in C.plan(base, False)[0]}
    sections = C._merge(base.sections, {"model": {"objective": {"nicl_enabled": False, "nid_weight": 0.0, "rcl_weight": 0.0}}})
    cells = {c.name: c for c in C.plan(dataclasses.replace(base, sections=sections), False)[0]}
    objective = {n for n, c in cells.items() if c.group == "objective"}
    assert objective == {"objective-next-item", "objective-nicl", "objective-nid", "objective-rcl", "objective-all"}
    assert cells["objective-all"].overrides["model"]["objective"] == {"nicl_enabled": True, "nid_weight": 0.1, "rcl_weight": 0.1}
    assert cells["objective-nid"].overrides["model"]["objective"] == {"nicl_enabled": False, "nid_weight": 0.1, "rcl_weight": 0.0}


def test_cells_and_seeds_repeat_without_dropping_earlier_ones():
    from experiments.run import build_parser

    args = build_parser().parse_args(["--config", "c.yaml", "--cells", "objective-nicl", "--cells", "objective-nid",
                                      "objective-rcl", "--seed", "1", "--seed", "2"])
    assert args.cells == ["objective-nicl", "objective-nid", "objective-rcl"] and args.seeds == [1, 2]


def test_cost_tracker_times_steps_but_not_validation():
    tr = CostTracker()
    tr.set_tags({"variant": "model"})
    tr.log_params({"train.batch_size": 4, "train.drop_last": False, "train.seed": 0})
    ev = tr.runs["model"]["events"]
    # 10 rows, batch 4: steps of 4, 4, 2 rows; an evaluation after step 3 (the epoch's end)
    ev[:] = [("start", 0, 0.0), ("step", 1, 1.0), ("step", 2, 2.0), ("step", 3, 2.5), ("eval", 3, 10.0),
             ("step", 4, 20.0), ("step", 5, 21.0), ("step", 6, 21.5), ("eval", 6, 30.0)]
    s = tr.summary("model", 10)
    # timed: steps 1-3 and 5-6 (step 4 follows an evaluation): 4+4+2+4+2 rows in 1+1+0.5+1+0.5 s
    assert s["steps_timed"] == 5 and s["sequences_per_second"] == pytest.approx(16 / 4.0)
    assert s["train_seconds_per_epoch"] == pytest.approx(2.5) and s["wall_seconds_per_epoch"] == pytest.approx(15.0)
    assert s["epochs"] == 2.0
    assert tr.summary("missing", 10) == {"trained_here": False}


def _write_log(folder, lines, batch_size=4, drop_last=False):
    (folder / "log").mkdir(parents=True)
    (folder / "log" / "params.json").write_text(json.dumps({"train.batch_size": batch_size, "train.drop_last": drop_last}))
    (folder / "log" / "metrics.jsonl").write_text("".join(
        json.dumps({"step": step, "time": t, "metrics": {key: 1.0}}) + "\n" for key, step, t in lines))


def test_log_cost_reads_a_run_that_another_process_trained(tmp_path):
    # 12 rows, batch 4: 3 steps an epoch, every step logged, a validation at each epoch's end; the
    # process was stopped after the first epoch and resumed 1000 s later (one interval is not training)
    _write_log(tmp_path, [("train/loss", 1, 10.0), ("train/loss", 2, 11.0), ("train/loss", 3, 12.0),
                          ("val/NDCG@10", 3, 20.0),
                          ("train/loss", 4, 1021.0), ("train/loss", 5, 1022.0), ("train/loss", 6, 1023.0),
                          ("val/NDCG@10", 6, 1031.0),
                          ("train/loss", 7, 1032.0), ("train/loss", 8, 1033.0), ("train/loss", 9, 1034.0),
                          ("val/NDCG@10", 9, 1042.0),
                          ("train/loss", 10, 1043.0), ("train/loss", 11, 1044.0), ("train/loss", 12, 1045.0),
                          ("val/NDCG@10", 12, 1053.0)])
    s = log_cost(tmp_path, 12)
    assert s["available"] and s["source"] == "run log" and s["intervals_timed"] == 8
    assert s["sequences_per_second"] == pytest.approx(4.0) and s["train_seconds_per_epoch"] == pytest.approx(3.0)
    assert s["wall_seconds_per_epoch"] == pytest.approx(11.0)  # median of 1011 s (resumed), 11 s, 11 s
    assert s["steps"] == 12 and s["epochs"] == pytest.approx(4.0)
    # every 2nd step logged (log_every 2): an interval spans two steps, the short last batch counted right
    other = tmp_path / "other"
    _write_log(other, [("train/loss", 2, 0.0), ("train/loss", 4, 2.0), ("train/loss", 6, 3.5)], batch_size=4)
    s = log_cost(other, 10)  # steps of 4, 4, 2 rows: step 3 has 2 rows
    assert s["intervals_timed"] == 2 and s["sequences_per_second"] == pytest.approx(1 / statistics.median([2.0 / 6, 1.5 / 6]))
    assert log_cost(tmp_path / "missing", 12) == {"source": "run log", "available": False}


def test_the_transfer_cell_adopts_what_mmrec_run_trained(tmp_path):
    """Outside --quick the transfer cell is `mmrec run --seed N`: a seed it already trained is evaluated
    from its finished checkpoints into the record (no new run), with the cost read from the runs' logs."""
    from mmrec.cli import main as mmrec_main
    from mmrec.data.synthetic import generate_demo
    from tests.orchestration.test_assets import write_tiny_project

    train = {"epochs": 2, "patience": 2, "progress": False, "log_every": 1, "batch_size": 8}
    path = write_tiny_project(tmp_path, pretrain=train, finetune=train)
    cfg = load_config(path)
    generate_demo(cfg.demo, cfg.demo_path, progress=False)
    assert mmrec_main(["run", "--config", str(path), "-q", "--seed", "1"]) == 0
    seeded = cfg.with_seed(1)
    assert seeded.artifacts.name == "artifacts-seed1"
    runs = sorted(p for p in (seeded.artifacts / "runs").rglob("*") if p.parent.parent.parent.name == "runs")
    evaluated = json.loads((seeded.artifact_path("evaluation", "films") / "metrics.json").read_text())
    argv = ["--config", str(path), "--seed", "1", "--cells", "transfer", "--recbole", "off",
            "--out", str(tmp_path / "out"), "--docs", str(tmp_path / "docs")]
    assert main(argv) == 0
    rec = json.loads((tmp_path / "docs" / "results" / "pipeline" / "records" / "transfer-seed1.json").read_text())
    assert rec["adopted"] and rec["config"]["as"].endswith("--seed 1") and rec["config"]["artifacts"].endswith("artifacts-seed1")
    assert hashlib.sha256(path.read_bytes()).hexdigest() == rec["config"]["sha256"]
    assert sorted(p for p in (seeded.artifacts / "runs").rglob("*") if p.parent.parent.parent.name == "runs") == runs
    assert not (tmp_path / "out" / "pipeline" / "cells").exists()  # nothing derived, nothing trained again
    t = rec["targets"]["films"]
    assert set(t["models"]) == set(evaluated["models"]) == {"finetuned", "scratch"}
    for model in t["models"]:
        assert t["models"][model]["test"] == evaluated["models"][model]
    for model in ("finetuned", "scratch"):
        cost = t["models"][model]["cost"]
        assert not cost["trained_here"] and cost["available"] and cost["sequences_per_second"] > 0
        assert cost["epochs"] == pytest.approx(2.0) and str(seeded.artifacts.name) in t["models"][model]["run_dir"]
    assert not rec["pretrained"]["cost"]["trained_here"] and rec["pretrained"]["cost"]["sequences_per_second"] > 0
    text = (tmp_path / "docs" / "RESULTS.md").read_text()
    assert "(read from the run's log)" in text and "transfer-seed1.json" in text
    # NDCG@10 by how often the test target occurs in training, per group, from the record's ranks
    ranks = pl.read_parquet(t["ranks"]["path"])
    counts, nd = ranks["target_train_count"].to_numpy(), ranks["finetuned"].to_numpy()
    freq = t["models"]["finetuned"]["by_target_frequency"]
    hi = counts >= 11
    assert freq["11+"]["n_users"] == int(hi.sum())
    if hi.any():
        assert freq["11+"]["NDCG@10"] == pytest.approx(float(np.where(nd[hi] <= 10, 1 / np.log2(nd[hi] + 1), 0).mean()))
    assert "### Where the gains are: test targets by how often they occur in training (films)" in text


def test_epoch_time_records_reach_the_results_page(tmp_path):
    """A benchmarks/epoch_time.py record beside a config's records becomes a table with its command."""
    records = tmp_path / "docs" / "results" / "demo" / "records"
    records.mkdir(parents=True)
    (records / "plan.json").write_text(json.dumps({"config": "configs/demo.yaml", "name": "demo", "quick": False,
                                                   "targets": ["films"], "sources": [], "recbole": True,
                                                   "cells": [], "skipped": []}))
    bench = records.parent / "bench"
    bench.mkdir()
    rec = {"config": "configs/demo.yaml", "domain": "films", "threads": 1, "epochs": 2, "commit": "abc1234",
           "load_average": [1.02, 1.5, 2.0], "rows": [
               {"model": "model", "batch_size": 64, "seconds_per_epoch": 6.0, "targets_per_second": 100.0,
                "share_of_recbole_epoch": 0.3},
               {"model": "recbole_sasrec", "batch_size": 2048, "seconds_per_epoch": 20.0, "targets_per_second": 30.0,
                "share_of_recbole_epoch": 1.0}]}
    (bench / "epoch_time-films-t1.json").write_text(json.dumps(rec))
    from experiments import report

    text = report.write_report(tmp_path / "docs", [records]).read_text()
    part = text[text.index("### Epoch time against RecBole's SASRec"):]
    assert "| films | content model (the fine-tuning recipe, from scratch) | 1 | 64 | 6.0 | 100 | 0.30 |" in part
    assert "| films | RecBole 1.2.1 SASRec | 1 | 2048 | 20.0 | 30 | 1.00 |" in part
    assert "commit abc1234, load average 1.0" in part and "--domain films --threads 1 --epochs 2`" in part


def test_a_single_share_or_row_draws_no_figure_and_removes_a_stale_one(tmp_path):
    from experiments import report

    line, bar = tmp_path / "line.png", tmp_path / "bar.png"
    line.write_bytes(b"stale")
    bar.write_bytes(b"stale")
    assert report._line_plot(line, "t", "x", {"finetuned": [(1.0, [0.1, 0.2])], "scratch": [(1.0, [0.1])]}) is None
    assert report._bar_plot(bar, "t", {"transfer": {"finetuned": [0.1]}}) is None
    assert not line.exists() and not bar.exists()
    assert report._line_plot(line, "t", "x", {"finetuned": [(0.5, [0.1]), (1.0, [0.2])]}) == line and line.is_file()
    assert report._bar_plot(bar, "t", {"a": {"finetuned": [0.1]}, "b": {"finetuned": [0.2]}}) == bar and bar.is_file()


def test_a_missing_bar_or_a_single_seed_draws_nothing_rather_than_zero():
    import math

    from experiments import report

    ys, err = report._bar_heights([[0.07, 0.09], [0.05], []])
    assert ys[:2] == pytest.approx([8.0, 5.0]) and err[0] == pytest.approx(100 * 0.01414213, rel=1e-5)
    assert math.isnan(ys[2]) and math.isnan(err[1]) and math.isnan(err[2])


def test_ablation_rows_show_the_pretraining_and_flag_one_that_learned_nothing(quick, tmp_path):
    """An image-only tower pretrained on a text-only source scores 0 on the sources' validation: the
    modality table shows each row's pretraining validation and says that row is in effect from scratch."""
    import shutil

    from experiments import report

    _, _, records = quick
    copy = tmp_path / "docs" / "results" / "demo-quick" / "records"
    shutil.copytree(records, copy)
    path = copy / "tower-image-seed0.json"
    rec = json.loads(path.read_text())
    assert rec["pretrained"]["valid_metrics"]["NDCG@10"] > 0  # the demo source has images
    text = report.write_report(tmp_path / "docs", [copy]).read_text()
    part = text[text.index("### Modality ablation"):text.index("### MoM routing")]
    assert "| pretraining: sources' valid NDCG@10 |" in part and "Pretraining learned nothing" not in part
    rec["pretrained"]["valid_metrics"]["NDCG@10"] = 0.0
    path.write_text(json.dumps(rec))
    text = report.write_report(tmp_path / "docs", [copy]).read_text()
    part = text[text.index("### Modality ablation"):text.index("### MoM routing")]
    row = next(line for line in part.splitlines() if line.startswith("| image-only item tower |"))
    assert row.split(" | ")[4] == "0.00"
    assert "Pretraining learned nothing for image-only item tower" in part


def test_a_modality_cell_is_not_applicable_where_no_target_item_has_it(tmp_path):
    """A text-only target (the demo's films, generated without images): the image-only and fused
    towers have nothing to read there; found from the validated catalog when they run, they are
    listed with the reason, not trained and not left "not run yet"; the text tower still runs."""
    import yaml

    spec = yaml.safe_load((REPO / "configs" / "demo.yaml").read_text())
    spec["root"] = str(REPO)
    spec["preset"] = str(REPO / "configs" / "presets" / "cpu.yaml")
    spec["demo"].update({"p_text_only": [0.3, 0.3, 1.0], "p_image_only": [0.2, 0.2, 0.0]})
    spec["validation"]["min_image_share"] = 0.0
    base = tmp_path / "textonly.yaml"
    base.write_text(yaml.safe_dump(spec))
    docs = tmp_path / "docs"
    argv = ["--config", str(base), "--quick", "--seed", "0", "--cells", "modality", "--out", str(tmp_path / "out"),
            "--docs", str(docs)]
    assert main(argv) == 0
    records = docs / "results" / "textonly-quick" / "records"
    assert sorted(p.name for p in records.glob("*-seed0.json")) == ["tower-text-seed0.json"]
    plan = json.loads((records / "plan.json").read_text())
    at_run = {s["name"]: s["reason"] for s in plan["skipped"] if s.get("at_run")}
    assert set(at_run) == {"tower-image", "fused-concat", "fused-gated", "fused-merge_attention", "fused-sum"}
    assert "share_image 0" in at_run["tower-image"] and "share_both 0" in at_run["fused-sum"]
    assert "films" in at_run["tower-image"]
    assert {c["name"] for c in plan["cells"] if c["group"] == "modality"} == {"tower-text"}
    text = (docs / "RESULTS.md").read_text()
    part = text[text.index("### Modality ablation"):text.index("### MoM routing")]
    assert "| text-only item tower |" in part and "- `tower-image`: not applicable: no item of the target" in part
    assert "not run yet" not in text.split("### Missing cells")[1].split("###")[0]
    # every cell of a group not applicable: each listed as its own item, not run together
    from experiments import report

    res = report.Results.load(records)
    res.plan["cells"] = [c for c in res.plan["cells"] if c["group"] != "modality"]
    out: list[str] = []
    report._ablation(res, "films", out, tmp_path / "figs", "Modality ablation", "modality", "fused-merge_attention")
    assert sum(line.startswith("- `") and "not applicable" in line for line in out) == 5
    assert main(argv) == 0  # a rerun reads the data again and finds the same; the record is kept
    assert json.loads((records / "plan.json").read_text())["skipped"] == plan["skipped"]


def test_committed_results_md_is_what_the_committed_records_make(tmp_path):
    """docs/RESULTS.md is generated, never edited: regenerated from the records in git (experiment cells,
    probes, recipe selection, benchmarks) it is the same text, so every figure in it traces to a record."""
    from experiments.report import write_report

    results = REPO / "docs" / "results"
    dirs = sorted(p.parent for p in results.glob("*/records/plan.json"))
    made = write_report(tmp_path / "docs", dirs, bench=results / "bench", probes=results / "probes",
                        selection=results / "selection")
    assert made.read_text() == (REPO / "docs" / "RESULTS.md").read_text(), (
        "docs/RESULTS.md is not what the committed records make: `python -m experiments --report-only`")


def test_readme_quotes_only_figures_of_results_md():
    """The README copies its measured figures from docs/RESULTS.md (issue: experiments): every decimal figure
    in its prose and tables occurs in RESULTS.md, commands' and config values' arguments aside (code blocks and
    inline code) and the few numbers that are not measurements (named below)."""
    import re

    not_measured = {"3.11": "the Python version", "2.13": "RecBole's torch version",
                    "96.3": "the share of MovieLens films with a poster (the data table, from validated_catalog)"}
    readme = (REPO / "README.md").read_text().split("\n")
    results = (REPO / "docs" / "RESULTS.md").read_text()
    prose, code = [], False
    for line in readme:
        if line.startswith("```"):
            code = not code
        elif not code:
            prose.append(line)
    text = re.sub(r"`[^`]*`", "", "\n".join(prose))  # commands and config keys quoted inline (may wrap)
    missing = [x for x in re.findall(r"(?<![\w.])[+-]?(\d+\.\d+)(?![\w.])", text)
               if x not in results and x not in not_measured]
    assert not missing, missing
