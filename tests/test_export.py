"""Export: a model folder loads with one call, with no other file, and scores like the original."""

import shutil

import polars as pl
import pytest
import torch

from mmrec.export import ExportedModel, export_model, load_model
from mmrec.models.recommender import Recommender
from tests.models.test_recommender import SEQ, config
from tests.models.test_towers import N, raw_content


@pytest.mark.parametrize("tower", ["fused", "id"])
def test_exported_model_loads_alone_and_scores_the_same(tmp_path, tower):
    torch.manual_seed(0)
    model = Recommender(config(tower), n_items=N).attach(raw_content(), SEQ).eval()
    item_map = pl.DataFrame({"item_idx": list(range(1, N + 1)), "item_id": [f"it{i}" for i in range(1, N + 1)]})
    out = export_model(model, tmp_path / "export", item_map, "shop", {"metrics": {"NDCG@10": 0.5}})
    moved = tmp_path / "elsewhere"
    shutil.move(out, moved)  # nothing outside the folder is needed
    loaded = load_model(moved)
    assert loaded.meta["domain"] == "shop" and loaded.meta["metrics"]["NDCG@10"] == 0.5
    for k, v in model.state_dict().items():
        assert torch.equal(loaded.model.state_dict()[k], v), k
    torch.testing.assert_close(loaded.item_vectors, model.all_item_vectors())

    hist = [["it1", "it2", "it3"], ["it7"]]
    recs = loaded.recommend(hist, k=4)
    idx = torch.tensor([[0, 0, 1, 2, 3], [0, 0, 0, 0, 7]])
    scores = model.score(idx)
    scores[:, 0] = -torch.inf
    scores[0, [1, 2, 3]] = -torch.inf
    scores[1, 7] = -torch.inf
    expect = scores.topk(4, dim=1).indices
    assert [[i for i, _ in r] for r in recs] == [[f"it{int(j)}" for j in row] for row in expect]
    assert all("it1" != i for i, _ in recs[0])


def test_unknown_item_and_bad_folder(tmp_path):
    model = Recommender(config("id"), n_items=N).attach(raw_content(), SEQ)
    item_map = pl.DataFrame({"item_idx": list(range(1, N + 1)), "item_id": [f"it{i}" for i in range(1, N + 1)]})
    loaded = load_model(export_model(model, tmp_path / "m", item_map, "shop"))
    with pytest.raises(KeyError, match="ghost"):
        loaded.recommend([["ghost"]])
    with pytest.raises(FileNotFoundError, match="model.json"):
        load_model(tmp_path)


def test_empty_history_gets_the_most_popular_training_items(tmp_path):
    torch.manual_seed(0)
    model = Recommender(config("fused"), n_items=N).attach(raw_content(), SEQ).eval()
    item_map = pl.DataFrame({"item_idx": list(range(1, N + 1)), "item_id": [f"it{i}" for i in range(1, N + 1)]})
    counts = torch.zeros(N + 1, dtype=torch.int64)
    counts[[5, 9, 2]] = torch.tensor([7, 4, 1])  # it5 > it9 > it2 > the rest (0)
    loaded = load_model(export_model(model, tmp_path / "m", item_map, "shop", popularity=counts))
    assert pl.read_parquet(tmp_path / "m" / "item_map.parquet")["train_count"].to_list()[4] == 7
    cold, warm = loaded.recommend([[], ["it1"]], k=3)
    assert cold == [("it5", 7.0), ("it9", 4.0), ("it2", 1.0)]
    plain = load_model(export_model(model, tmp_path / "n", item_map, "shop")).recommend([["it1"]], k=3)[0]
    assert [i for i, _ in warm] == [i for i, _ in plain]  # a history is unaffected by the counts
    assert [s for _, s in warm] == pytest.approx([s for _, s in plain], abs=1e-5)
    with pytest.raises(ValueError, match=r"popularity has shape \(3,\), expected \(13,\)"):
        export_model(model, tmp_path / "bad", item_map, "shop", popularity=torch.ones(3))
    assert not (tmp_path / "bad").exists()


def test_rank_checks_k_filters_and_marks_popularity(tmp_path):
    torch.manual_seed(0)
    model = Recommender(config("fused"), n_items=N).attach(raw_content(), SEQ).eval()
    ids = [f"it{i}" for i in range(1, N + 1)]
    item_map = pl.DataFrame({"item_idx": list(range(1, N + 1)), "item_id": ids})
    counts = torch.zeros(N + 1, dtype=torch.int64)
    counts[[5, 9]] = torch.tensor([3, 2])
    loaded = load_model(export_model(model, tmp_path / "m", item_map, "shop", popularity=counts))
    for bad in (0, -1, 2.5, True):
        with pytest.raises(ValueError, match=f"k must be a positive integer, got {bad!r}"):
            loaded.rank([["it1"]], k=bad)
    # a history longer than max_len (5): the model reads the last 5, every item of it is excluded
    long = ids[:8]
    full = loaded.recommend([long], k=N)[0]
    assert {i for i, _ in full} == set(ids[8:])
    tail = loaded.rank([ids[3:8]], k=N, exclude_history=False)[0]
    assert [i for i, _ in full] == [i for i in tail.item_ids if i not in long]
    # restrict_to: only those items, in the order of the full ranking
    some = loaded.rank([["it1"], []], k=3, allowed=[["it2", "it3", "it1", "it9"], ["it2", "it9", "it10"]])
    order = [i for i in loaded.rank([["it1"]], k=N)[0].item_ids if i in {"it2", "it3", "it9"}]
    assert some[0].item_ids == order and some[0].source == "model"
    assert some[1].pairs()[0] == ("it9", 2.0) and set(some[1].pairs()[1:]) == {("it2", 0.0), ("it10", 0.0)}
    assert some[1].source == "popularity"
    # blocked rows are never recommended, also to a new user
    blocked = torch.zeros(N + 1, dtype=torch.bool)
    blocked[5] = True
    view = ExportedModel(loaded.model, loaded.item_ids, loaded.item_vectors, loaded.meta, loaded.popularity, blocked)
    assert view.recommend([[]], k=1)[0] == [("it9", 2.0)]
    assert "it5" not in [i for i, _ in view.recommend([["it1"]], k=N)[0]]
