"""Transfer: each part loads every expected key or fails listing missing/unexpected/mis-shaped ones."""

import pytest
import torch

from mmrec.models.recommender import ModelConfig, Recommender
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


def _user_model(adapter_dim, seed):
    torch.manual_seed(seed)
    cfg = ModelConfig.from_dict({
        "dim": 16, "max_len": 5, "item_tower": {"name": "id", "dropout": 0.0},
        "user_encoder": {"name": "transrec", "n_layers": 2, "n_heads": 2, "dropout": 0.0, "adapter_dim": adapter_dim},
        "objective": {"name": "bce", "nicl_enabled": False, "nid_weight": 0, "rcl_weight": 0},
    })
    return Recommender(cfg, n_items=N)


def test_adapters_added_on_the_target_start_as_identity():
    """TransRec pretrains without adapters and adds them for fine-tuning: exactly the adapter keys
    may be missing, and the loaded model then computes what the pretrained one did."""
    src, dst = _user_model(None, 0), _user_model(8, 1)
    with torch.no_grad():  # adapters that are not the identity before loading (e.g. trained elsewhere)
        for name, p in dst.named_parameters():
            if "adapter" in name:
                p.normal_()
    report = load_part(dst, src.state_dict(), "whole")
    assert report.fresh and all("adapter" in k for k in report.fresh)
    assert len(report.fresh) == 2 * 2 * 4  # 2 blocks x 2 adapters x (down, up) x (weight, bias)
    assert not set(report.fresh) & set(report.loaded)
    histories = torch.tensor([[0, 1, 2, 3, 4], [5, 6, 7, 8, 9]])
    src.eval(), dst.eval()
    torch.testing.assert_close(dst.user_encoder(dst.item_tower.embedding(histories), histories > 0),
                               src.user_encoder(src.item_tower.embedding(histories), histories > 0))
    load_part(_user_model(8, 2), src.state_dict(), "user")  # the user part alone, too


def test_only_adapter_keys_may_be_missing():
    src, dst = _user_model(None, 0), _user_model(8, 1)
    state = dict(src.state_dict())
    del state["user_encoder.blocks.0.attn_norm.weight"]  # something else missing as well: fails, listing it
    with pytest.raises(TransferError, match=r"missing \(\d+\): .*user_encoder.blocks.0.attn_norm.weight"):
        load_part(dst, state, "whole")
    partial = dict(_user_model(8, 3).state_dict())  # a checkpoint with adapters, one adapter key lost
    del partial["user_encoder.blocks.1.ffn_adapter.up.weight"]
    with pytest.raises(TransferError, match=r"missing \(1\): user_encoder.blocks.1.ffn_adapter.up.weight"):
        load_part(dst, partial, "whole")
    with pytest.raises(TransferError, match="unexpected"):  # adapters in the checkpoint, none in the model
        load_part(_user_model(None, 4), _user_model(8, 5).state_dict(), "whole")


def test_item_ids_are_catalog_bound_they_never_transfer_and_start_at_zero():
    torch.manual_seed(0)
    src = Recommender(config("fused", item_tower={"name": "fused", "dropout": 0.0, "item_ids": True}), n_items=N)
    with torch.no_grad():
        src.item_tower.item_ids.weight[1:].normal_()  # a trained source embedding
    for dst_items, state in ((N + 7, src.state_dict()), (N, src.state_dict()),
                             (N, {k: v for k, v in src.state_dict().items() if "item_ids" not in k})):
        dst = Recommender(config("fused", item_tower={"name": "fused", "dropout": 0.0, "item_ids": True}), n_items=dst_items)
        report = load_part(dst, state, "whole")
        assert report.fresh == ["item_tower.item_ids.weight"]
        assert dst.item_tower.item_ids.weight.abs().sum() == 0
        assert torch.equal(dst.item_tower.text.proj.weight, src.item_tower.text.proj.weight)
    plain = Recommender(config("fused"), n_items=N)  # a model without them skips the checkpoint's
    report = load_part(plain, src.state_dict(), "whole")
    assert "item_tower.item_ids.weight" in report.skipped and report.fresh == []
