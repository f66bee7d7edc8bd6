"""The recommender: every tower x objective trains (finite loss, every trainable parameter gets a
gradient), scores are dot products of user and item vectors, configs fail loudly."""

import pytest
import torch

from mmrec.models.recommender import ModelConfig, Recommender
from tests.models.test_towers import IMAGE, N, TEXT, raw_content

L = 5


def config(tower: str, objective: dict | None = None, **kw) -> ModelConfig:
    objective = objective or {"name": "softmax", "nicl_enabled": False, "nid_weight": 0, "rcl_weight": 0}
    return ModelConfig.from_dict({
        "dim": 16, "max_len": L,
        "item_tower": {"name": tower, "dropout": 0.0},
        "text_encoder": TEXT.__dict__ if tower != "id" else None,
        "image_encoder": IMAGE.__dict__ if tower != "id" else None,
        "fusion": {"name": "merge_attention"} if tower == "fused" else None,
        "user_encoder": {"name": "sasrec", "n_layers": 1, "n_heads": 2, "dropout": 0.0},
        "objective": objective, **kw,
    })


SEQ = torch.tensor([[0, 0, 1, 2, 3, 4], [5, 6, 7, 8, 9, 10], [0, 0, 0, 11, 12, 3]])
CASES = {
    "id-softmax": ("id", None),
    "id-full_softmax": ("id", {"name": "full_softmax", "nicl_enabled": False, "nid_weight": 0, "rcl_weight": 0}),
    "text-full_softmax": ("text", {"name": "full_softmax", "nicl_enabled": False, "nid_weight": 0, "rcl_weight": 0}),
    "text-softmax": ("text", None),
    "image-bce": ("image", {"name": "bce", "bce_negatives": 2, "nicl_enabled": False, "nid_weight": 0, "rcl_weight": 0}),
    "mom-bce": ("mom", {"name": "bce", "nicl_enabled": False, "nid_weight": 0, "rcl_weight": 0}),
    "fused-pmmrec": ("fused", {"name": "softmax", "nicl_enabled": True, "nid_weight": 0.1, "rcl_weight": 0.1}),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_training_loss_contract(case):
    tower, objective = CASES[case]
    torch.manual_seed(0)
    model = Recommender(config(tower, objective), n_items=N).attach(raw_content(), SEQ)
    out = model.training_loss({"seq": SEQ})
    assert torch.isfinite(out["loss"])
    expected = {"main"} | ({"nicl", "nid", "rcl"} if tower == "fused" else set())
    assert set(out) == {"loss"} | expected
    out["loss"].backward()
    dead = [n for n, p in model.named_parameters() if p.requires_grad and (p.grad is None or not p.grad.abs().sum() > 0)]
    # the image tower's attention-free text path etc. are absent; everything that exists must learn
    assert dead == []


def test_scores_are_user_times_item_vectors_and_padding_invariant():
    torch.manual_seed(0)
    model = Recommender(config("fused"), n_items=N).attach(raw_content(), SEQ).eval()
    items = model.all_item_vectors()
    assert items.shape == (N + 1, 16) and torch.equal(items[0], torch.zeros(16))
    left = torch.tensor([[0, 0, 3, 4, 5], [1, 2, 3, 4, 5]])
    right = torch.tensor([[3, 4, 5, 0, 0], [1, 2, 3, 4, 5]])
    s_left, s_right = model.score(left, items), model.score(right, items)
    assert s_left.shape == (2, N + 1)
    torch.testing.assert_close(s_left, s_right, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(s_left, model.user_vectors(left, items) @ items.T)


def test_param_groups_split_encoders_from_recommender():
    model = Recommender(config("fused"), n_items=N)
    groups = {g["name"]: g for g in model.param_groups()}
    assert groups["encoders"]["weight_decay"] == 0.0 and "weight_decay" not in groups["recommender"]
    n_trainable = sum(1 for p in model.parameters() if p.requires_grad)
    assert len(groups["encoders"]["params"]) + len(groups["recommender"]["params"]) == n_trainable
    enc_ids = {id(p) for p in model.item_tower.text.encoder.parameters() if p.requires_grad}
    assert enc_ids <= {id(p) for p in groups["encoders"]["params"]}


def test_config_errors_are_loud():
    with pytest.raises(ValueError, match="needs model.text_encoder"):
        ModelConfig.from_dict({"item_tower": {"name": "text"}})
    with pytest.raises(ValueError, match="nicl_enabled"):
        config("text", {"nicl_enabled": True})
    with pytest.raises(ValueError, match="unknown key"):
        ModelConfig.from_dict({"item_tower": {"name": "id"}, "objective": {"nicl_enabled": False}, "dims": 3})
    with pytest.raises(ValueError, match="disagrees"):
        ModelConfig.from_dict({"dim": 16, "item_tower": {"name": "id"}, "objective": {"nicl_enabled": False},
                               "user_encoder": {"dim": 32}})


def test_training_without_content_says_what_to_do():
    model = Recommender(config("id"), n_items=N)
    with pytest.raises(RuntimeError, match="attach"):
        model.training_loss({"seq": SEQ})


def test_attach_refuses_cached_features_of_another_frozen_depth():
    """Cached text features are the output of the frozen bottom: a model whose encoder freezes another
    depth (a config changed after item_features ran) must not run them through its trained layers."""
    import dataclasses

    from mmrec.encoders.text import TextEncoder
    from mmrec.models.towers import ItemContent

    frozen = dataclasses.replace(TEXT, trainable_layers=0)
    encoder = TextEncoder(frozen)
    tok = encoder.tokenize(["", *[f"a film about {w}" for w in ("cats", "dogs", "ships", "trains", "rain")]])
    content = ItemContent(5, torch.tensor([False] + [True] * 5), torch.zeros(6, dtype=torch.bool),
                          text={"hidden": encoder.bottom(tok["input_ids"], tok["attention_mask"]),
                                "mask": tok["attention_mask"].bool()},
                          fingerprints={"text": encoder.fingerprint()})
    cfg = ModelConfig.from_dict({**config("text").to_dict(), "text_encoder": frozen.__dict__, "image_encoder": None})
    Recommender(cfg, n_items=5).attach(content)  # its own features: fine
    top1 = ModelConfig.from_dict({**cfg.to_dict(), "text_encoder": TEXT.__dict__})  # the top layer trained
    with pytest.raises(ValueError, match="text features were built by an encoder with fingerprint .* build item_features"):
        Recommender(top1, n_items=5).attach(content)
