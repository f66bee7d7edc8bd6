"""mmrec.promotion: challenger and champion scored on the same validation data with the evaluation
stage's code; the registry moves (challenger always, champion only when better, previous champion
recorded) and the rollback chain, against an in-memory registry."""

from pathlib import Path

import polars as pl
import pytest
import torch
import yaml

from mmrec import promotion, stages
from mmrec.config import load_config
from mmrec.export import export_model, load_model
from mmrec.features import load_content
from mmrec.models.recommender import Recommender
from mmrec.promotion import CHALLENGER, CHAMPION, Comparison, PromotionError
from tests.conftest import REPO, write_tabular

# --------------------------------------------------------------------------------------------
# Scoring


@pytest.fixture(scope="module")
def project(tmp_path_factory):
    """A one-domain project (tiny preset, 12 items, 20 users) with validated catalog and item
    features; two random-init models exported on it (seeds 0 and 1)."""
    root = tmp_path_factory.mktemp("promotion")
    write_tabular(root / "raw" / "shop", n_users=20)
    path = root / "pipeline.yaml"
    path.write_text(yaml.safe_dump({
        "preset": str(REPO / "configs" / "presets" / "tiny.yaml"), "root": str(root), "artifacts": "art",
        "validation": {"min_text_share": 0.5}, "preprocess": {"min_seq_len": 5, "max_seq_len": 4},
        "evaluation": {"ks": [5, 10], "baselines": ["scratch"], "gate_against": ["scratch"]},
        "domains": {"shop": {"role": "target", "source": {"format": "tabular", "path": "raw/shop", "options": {
            "text": ["title", "description"], "image": "image", "image_root": "."}}}}}))
    cfg = load_config(path)
    for stage in ("raw_catalog", "validated_catalog", "item_features"):
        stages.STAGE_FUNCTIONS[stage](cfg, "shop", progress=False)
    content = load_content(cfg.artifact_path("item_features", "shop"))
    item_map = pl.read_parquet(cfg.artifact_path("validated_catalog", "shop") / "item_map.parquet").sort("item_idx")
    models = {}
    for seed in (0, 1):
        torch.manual_seed(seed)
        model = Recommender(cfg.model(), n_items=content.n_items).attach(content).eval()
        models[seed] = export_model(model, root / f"model{seed}", item_map, "shop", {"stage": "test"})
    return {"cfg": cfg, "root": root, "models": models, "item_map": item_map, "content": content}


def _reexport(project, name: str, keep: list[int]) -> Path:
    """Model 1's folder with a catalog of only the rows ``keep`` (item_idx), in that order."""
    import shutil

    from safetensors.torch import save_file

    m = load_model(project["models"][1])
    out = project["root"] / name
    shutil.copytree(project["models"][1], out)
    ids = [m.item_ids[i - 1] for i in keep]
    pl.DataFrame({"item_idx": list(range(1, len(keep) + 1)), "item_id": ids}).write_parquet(out / "item_map.parquet")
    vectors = torch.cat([m.item_vectors[:1], m.item_vectors[torch.tensor(keep)]])
    save_file({"item_vectors": vectors.contiguous()}, out / "item_vectors.safetensors")
    return out


def test_the_challenger_is_scored_like_the_evaluation_stage_on_the_validation_split(project):
    from mmrec.data.sequences import SequenceData
    from mmrec.experiment import evaluate_vectors

    cfg, ec = project["cfg"], project["cfg"].evaluation()
    res = promotion.compare(cfg, "shop", project["models"][0])
    folder = cfg.artifact_path("validated_catalog", "shop")
    data = SequenceData.from_splits(pl.read_parquet(folder / "splits.parquet"), project["content"].n_items)
    m = load_model(project["models"][0])
    expected = evaluate_vectors(lambda h: m.model.user_vectors(h, m.item_vectors), m.item_vectors, data, "valid",
                                m.model.cfg.max_len, ec.ks, ec.batch_size, ec.history)
    assert res.challenger == expected and res.champion is None and res.champion_version is None
    assert res.metric == "NDCG@10" and res.history == "masked" and res.n_users == 20 and res.n_items == 12
    assert res.better and "no champion" in res.summary()


def test_a_champion_equal_to_the_challenger_ties_and_does_not_win(project):
    res = promotion.compare(project["cfg"], "shop", project["models"][0], project["models"][0], "3")
    assert res.champion == res.challenger and not res.better
    assert res.tags()["promotion.champion_version"] == "3"
    assert res.tags()["promotion.champion_value"] == res.tags()["promotion.challenger_value"]


def test_the_champion_is_aligned_by_item_id_not_by_row(project):
    """A champion whose catalog lists the same items in another order scores exactly the same."""
    cfg = project["cfg"]
    straight = promotion.compare(cfg, "shop", project["models"][0], project["models"][1], "1")
    reversed_dir = _reexport(project, "reversed", list(range(12, 0, -1)))
    swapped = promotion.compare(cfg, "shop", project["models"][0], reversed_dir, "1")
    assert swapped.champion == straight.champion and swapped.encoded == 0
    assert straight.champion != straight.challenger  # two different models: the test can tell them apart


def test_items_the_champion_never_saw_are_encoded_by_its_tower_from_raw_content(project):
    full = load_model(project["models"][1])
    subset_dir = _reexport(project, "subset", [1, 2, 3, 4, 5, 6, 7, 8])  # items 9..12 unknown to it
    subset = load_model(subset_dir)
    raw = promotion.raw_items(project["cfg"].artifact_path("validated_catalog", "shop") / "catalog")
    vectors, encoded = promotion.catalog_vectors(subset, project["item_map"]["item_id"].to_list(), raw)
    assert encoded == 4
    assert torch.equal(vectors[:9], full.item_vectors[:9])
    # the features are stored as float16: raw content through the same tower agrees to that precision
    torch.testing.assert_close(vectors[9:], full.item_vectors[9:], atol=2e-2, rtol=2e-2)
    res = promotion.compare(project["cfg"], "shop", project["models"][0], subset_dir, "1")
    assert res.encoded == 4 and "4 items encoded by the champion" in res.summary()
    with pytest.raises(PromotionError, match="lacks 4 of the 12 catalog items"):
        promotion.catalog_vectors(subset, project["item_map"]["item_id"].to_list())


def test_a_challenger_of_another_catalog_is_refused(project):
    other = _reexport(project, "other", [1, 2, 3])
    with pytest.raises(PromotionError, match="was not trained on the current 'shop' catalog"):
        promotion.compare(project["cfg"], "shop", other)


# --------------------------------------------------------------------------------------------
# The registry moves


class MemoryRegistry:
    def __init__(self):
        self.aliases: dict[tuple[str, str], str] = {}
        self.tags: dict[tuple[str, str], dict[str, str]] = {}
        self.descriptions: dict[tuple[str, str], str] = {}

    def alias_version(self, name, alias):
        return self.aliases.get((name, alias))

    def set_alias(self, name, alias, version):
        self.aliases[(name, alias)] = str(version)

    def delete_alias(self, name, alias):
        self.aliases.pop((name, alias), None)

    def version_tags(self, name, version):
        return dict(self.tags.get((name, str(version)), {}))

    def set_version_tags(self, name, version, tags):
        self.tags.setdefault((name, str(version)), {}).update(tags)

    def set_description(self, name, version, text):
        self.descriptions[(name, str(version))] = text

    def of(self, name):
        return {a: v for (n, a), v in self.aliases.items() if n == name}


def _cmp(challenger: float, champion: float | None, champion_version: str | None) -> Comparison:
    return Comparison("NDCG@10", {"NDCG@10": challenger}, None if champion is None else {"NDCG@10": champion},
                      champion_version, "masked", 20, 12)


def test_promotion_only_when_better_and_the_previous_champion_is_recorded():
    reg = MemoryRegistry()
    first = promotion.record(reg, "m", "1", _cmp(0.2, None, None))
    assert first.promoted and first.reason == "first champion" and reg.of("m") == {CHALLENGER: "1", CHAMPION: "1"}
    better = promotion.record(reg, "m", "2", _cmp(0.3, 0.2, "1"))
    assert better.promoted and better.previous == "1"
    assert reg.of("m") == {CHALLENGER: "2", CHAMPION: "2", "previous_champion": "1"}
    assert reg.tags[("m", "2")]["previous_champion"] == "1"
    worse = promotion.record(reg, "m", "3", _cmp(0.25, 0.3, "2"))
    assert not worse.promoted and worse.champion == "2" and worse.reason == "does not beat v2"
    assert reg.of("m") == {CHALLENGER: "3", CHAMPION: "2", "previous_champion": "1"}
    t = reg.tags[("m", "3")]
    assert (t["promotion.decision"], t["promotion.challenger_value"], t["promotion.champion_value"],
            t["promotion.champion_version"], t["promotion.split"]) == ("held", "0.250000", "0.300000", "2", "valid")
    assert "previous_champion" not in t
    assert reg.descriptions[("m", "3")].startswith("held (does not beat v2); valid NDCG@10")
    assert "challenger 0.2500 vs champion v2 0.3000" in reg.descriptions[("m", "3")]


@pytest.mark.parametrize("comparison, gate, reason", [
    (_cmp(0.3, 0.3, "1"), True, "does not beat v1"),  # a tie keeps the champion
    (_cmp(0.9, 0.3, "1"), False, "quality gate failed"),
    (None, True, "not compared: the champion lacks items"),
])
def test_held_versions_are_challengers_only(comparison, gate, reason):
    reg = MemoryRegistry()
    reg.set_alias("m", CHAMPION, "1")
    d = promotion.record(reg, "m", "2", comparison, gate_passed=gate, error="the champion lacks items")
    assert not d.promoted and d.reason == reason and reg.of("m") == {CHAMPION: "1", CHALLENGER: "2"}
    assert reg.tags[("m", "2")]["promotion.decision"] == "held"


def test_a_comparison_with_a_champion_that_moved_since_is_refused():
    reg = MemoryRegistry()
    reg.set_alias("m", CHAMPION, "4")
    with pytest.raises(PromotionError, match="m@champion is version 4 now, not 3"):
        promotion.record(reg, "m", "5", _cmp(0.5, 0.1, "3"))
    assert reg.of("m") == {CHAMPION: "4"} and reg.tags == {}


def test_rollback_walks_back_the_champion_chain():
    reg = MemoryRegistry()
    for v, (mine, theirs, champ) in enumerate([(0.1, None, None), (0.2, 0.1, "1"), (0.3, 0.2, "2")], 1):
        promotion.record(reg, "m", str(v), _cmp(mine, theirs, champ))
    assert reg.of("m")[CHAMPION] == "3" and reg.of("m")["previous_champion"] == "2"
    back = promotion.rollback(reg, "m", now=lambda: 0)
    assert (back.from_version, back.to_version, back.previous) == ("3", "2", "1")
    assert reg.of("m") == {CHAMPION: "2", "previous_champion": "1", CHALLENGER: "3"}
    assert reg.tags[("m", "3")]["rolled_back_to"] == "2" and reg.tags[("m", "3")]["rolled_back"] == "1970-01-01T00:00:00Z"
    back = promotion.rollback(reg, "m")
    assert (back.from_version, back.to_version, back.previous) == ("2", "1", None)
    assert reg.of("m") == {CHAMPION: "1", CHALLENGER: "3"}
    with pytest.raises(PromotionError, match=r"m@champion is version 1 and no earlier champion is recorded"):
        promotion.rollback(reg, "m")
    # a new winner after a rollback replaces the restored champion, which becomes the one to go back to
    promotion.record(reg, "m", "4", _cmp(0.4, 0.1, "1"))
    assert promotion.rollback(reg, "m").to_version == "1"


def test_rollback_without_a_champion_is_an_error():
    with pytest.raises(PromotionError, match="m has no 'champion' alias"):
        promotion.rollback(MemoryRegistry(), "m")
