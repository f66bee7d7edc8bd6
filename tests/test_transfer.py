"""Transfer: each part loads every expected key or fails listing missing/unexpected/mis-shaped ones."""

import pytest
import torch

from mmrec.models.recommender import Recommender
from mmrec.transfer import PARTS, TransferConfig, TransferError, load_part
from tests.models.test_recommender import config
from tests.models.test_towers import N


def _pair(tower="mom"):
    torch.manual_seed(0)
    src = Recommender(config(tower), n_items=N)
    torch.manual_seed(1)
    dst = Recommender(config(tower), n_items=N + 7)  # another catalog: content towers do not care
    return src, dst


@pytest.mark.parametrize("part", ["whole", "item", "user", "text", "image"])
def test_each_part_copies_exactly_its_keys(part):
    src, dst = _pair()
    before = {k: v.clone() for k, v in dst.state_dict().items()}
    report = load_part(dst, src.state_dict(), part)
    after = dst.state_dict()
    assert report.loaded
    for k in after:
        inside = k.startswith(PARTS[part])
        if inside:
            assert torch.equal(after[k], src.state_dict()[k]), k
        else:
            assert torch.equal(after[k], before[k]), k
    # something outside the part differs between the two random inits, so the check above bites
    if part != "whole":
        assert any(not torch.equal(before[k], src.state_dict()[k]) for k in after if not k.startswith(PARTS[part]))


def test_none_loads_nothing():
    src, dst = _pair()
    before = {k: v.clone() for k, v in dst.state_dict().items()}
    load_part(dst, src.state_dict(), "none")
    assert all(torch.equal(before[k], v) for k, v in dst.state_dict().items())


def test_prefix_mismatch_fails_loudly_instead_of_loading_nothing():
    src, dst = _pair()
    renamed = {f"module.{k}": v for k, v in src.state_dict().items()}  # the official PMMRec pitfall
    with pytest.raises(TransferError, match=r"missing \(\d+\)"):
        load_part(dst, renamed, "whole")


def test_unexpected_and_mis_shaped_keys_are_listed():
    src, dst = _pair()
    state = dict(src.state_dict())
    state["user_encoder.extra.weight"] = torch.zeros(3)
    with pytest.raises(TransferError, match="unexpected .*user_encoder.extra.weight"):
        load_part(dst, state, "user")
    id_src = Recommender(config("id"), n_items=N)
    id_dst = Recommender(config("id"), n_items=N + 7)
    with pytest.raises(TransferError, match="shape mismatch .*item_tower.embedding.weight"):
        load_part(id_dst, id_src.state_dict(), "item")


def test_part_missing_from_the_model_and_unknown_parts():
    src = Recommender(config("text"), n_items=N)
    with pytest.raises(TransferError, match="no parameters"):
        load_part(src, src.state_dict(), "image")
    with pytest.raises(ValueError, match="valid parts"):
        TransferConfig(part="everything")
