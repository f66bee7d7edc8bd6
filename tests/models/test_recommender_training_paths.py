"""The recommender's two training paths (mmrec/models/recommender.py): a causal user encoder is
trained at every position, a bidirectional one (TransRec) at the last position only, and no user
state that a loss scores may depend on the items it is asked to predict."""

import pytest
import torch

from mmrec.models.recommender import (
    ModelConfig,
    Recommender,
    last_position_split,
    next_items,
    per_position_states,
)
from mmrec.models.towers import ItemContent
from mmrec.models.user_encoders import USER_ENCODERS

ENCODERS = sorted(USER_ENCODERS)


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny models run fastest single-threaded; on a loaded 2-core box OpenMP waits dominate."""
    saved = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(saved)


def id_model(encoder: str, n_items: int, max_len: int, dim: int = 16, n_layers: int = 1, **objective) -> Recommender:
    cfg = ModelConfig.from_dict({
        "dim": dim, "max_len": max_len,
        "item_tower": {"name": "id", "dropout": 0.0},
        "user_encoder": {"name": encoder, "n_layers": n_layers, "n_heads": 2, "dropout": 0.0},
        "objective": {"name": "bce", "nicl_enabled": False, "nid_weight": 0, "rcl_weight": 0, **objective},
    })
    content = ItemContent(n_items, torch.zeros(n_items + 1, dtype=torch.bool), torch.zeros(n_items + 1, dtype=torch.bool))
    return Recommender(cfg, n_items=n_items).attach(content)


# ----------------------------------------------------------------------------- layout, by hand


def test_next_items_by_hand():
    seq = torch.tensor([[0, 0, 1, 2, 3], [4, 5, 6, 7, 8]])
    assert next_items(seq, 1).squeeze(-1).tolist() == [[0, 0, 2, 3], [5, 6, 7, 8]]
    assert next_items(seq, 2).tolist() == [[[0, 0], [0, 0], [2, 3], [3, 0]], [[5, 6], [6, 7], [7, 8], [8, 0]]]


def test_last_position_split_by_hand():
    seq = torch.tensor([
        [1, 2, 3, 4, 5, 6, 7, 8],  # long: positives 6 7 8, history the 3 items before them
        [0, 0, 0, 0, 1, 2, 3, 4],  # left padding
        [1, 2, 3, 4, 0, 0, 0, 0],  # right padding gives the same split
        [0, 0, 0, 0, 0, 0, 9, 10],  # short: one history item, the rest positives
        [0, 0, 0, 0, 0, 0, 0, 11],  # one item: nothing to predict
    ])
    history, positives = last_position_split(seq, max_len=3, n_positives=3)
    assert history.tolist() == [[3, 4, 5], [0, 0, 1], [0, 0, 1], [0, 0, 9], [0, 0, 0]]
    assert positives.tolist() == [[6, 7, 8], [2, 3, 4], [2, 3, 4], [10, 0, 0], [0, 0, 0]]
    with pytest.raises(ValueError, match="contiguous"):
        last_position_split(torch.tensor([[1, 0, 2]]), 2, 1)


# ----------------------------------------------------------------------------- causality


def dependence_on_later_inputs(encoder, L: int = 6, d: int = 16) -> list[float]:
    """For each position t, the largest gradient of the state at t w.r.t. any input after t."""
    torch.manual_seed(0)
    x = torch.randn(2, L, d, requires_grad=True)
    mask = torch.ones(2, L, dtype=torch.bool)
    mask[1, :2] = False  # one left-padded row
    h = encoder(x, mask)
    out = []
    for t in range(L - 1):
        (grad,) = torch.autograd.grad(h[:, t].sum(), x, retain_graph=True)
        out.append(grad[:, t + 1:].abs().max().item())
    return out


@pytest.mark.parametrize("name", ENCODERS)
def test_every_user_encoder_declares_its_causality_truthfully(name):
    cls = USER_ENCODERS[name]
    assert isinstance(getattr(cls, "causal", None), bool), f"{name} must declare causal: bool"
    model = id_model(name, n_items=20, max_len=6).eval()
    later = dependence_on_later_inputs(model.user_encoder)
    assert (max(later) == 0.0) == cls.causal, f"{name}: causal={cls.causal} but dependence on later inputs {later}"


@pytest.mark.parametrize("name", ENCODERS)
def test_per_position_path_state_at_t_ignores_every_later_input(name):
    """The gradient test over the registry: on the per-position path the state used for position t
    has zero gradient w.r.t. every input after t; an encoder that cannot give that is refused."""
    model = id_model(name, n_items=20, max_len=6).eval()
    if not model.user_encoder.causal:
        with pytest.raises(RuntimeError, match="not causal"):
            per_position_states(model.user_encoder, torch.randn(2, 6, 16), torch.ones(2, 6, dtype=torch.bool))
        with pytest.raises(ValueError, match="bidirectional"):
            id_model(name, n_items=20, max_len=6, name="softmax")
        return
    later = dependence_on_later_inputs(lambda x, m: model.training_states(x, m)[1])
    assert later == [0.0] * len(later)
    earlier = torch.autograd.functional.jacobian(
        lambda x: model.training_states(x, torch.ones(1, 6, dtype=torch.bool))[1][0, 3], torch.randn(1, 6, 16))
    assert earlier[:, 0, :4].abs().sum() > 0  # the check above is not vacuous: t does see 0..t


@pytest.mark.parametrize("name", ENCODERS)
def test_scored_states_never_read_their_targets(name):
    """Through the real training layout: every item a scored state reads comes before every item
    it is scored against (ids increase with time in this batch)."""
    model = id_model(name, n_items=40, max_len=5, bce_positives=2)
    seq = torch.tensor([[0, 0, 0, 1, 2, 3], [4, 5, 6, 7, 8, 9], [0, 0, 0, 0, 10, 11]])
    seq = torch.cat([seq, torch.tensor([[12], [13], [14]])], 1) if not model.user_encoder.causal else seq
    inputs, targets = model.training_layout(seq)
    T = targets.shape[1]
    assert T == (inputs.shape[1] if model.user_encoder.causal else 1)
    for b in range(seq.shape[0]):
        for t in range(T):
            seen = inputs[b, : t + 1] if model.user_encoder.causal else inputs[b]
            seen, tgt = seen[seen > 0], targets[b, t][targets[b, t] > 0]
            if tgt.numel():
                assert seen.numel() and seen.max() < tgt.min(), (b, t, seen.tolist(), tgt.tolist())


def test_transrec_trains_on_the_next_n_positives_with_sampled_negatives():
    model = id_model("transrec", n_items=30, max_len=4, bce_positives=3, bce_negatives=5)
    assert model.cfg.train_window == 4 + 3
    seq = torch.tensor([[1, 2, 3, 4, 5, 6, 7], [0, 0, 0, 8, 9, 10, 11]])
    inputs, targets = model.training_layout(seq)
    assert inputs.tolist() == [[1, 2, 3, 4], [0, 0, 0, 8]] and targets.tolist() == [[[5, 6, 7]], [[9, 10, 11]]]
    out = model.training_loss({"seq": seq})
    out["loss"].backward()
    assert torch.isfinite(out["loss"]) and model.item_tower.embedding.weight.grad[5:8].abs().sum() > 0
    dead = [n for n, p in model.named_parameters() if p.requires_grad and (p.grad is None or not p.grad.abs().sum() > 0)]
    assert dead == []


# ----------------------------------------------------------------------------- random sequences


@torch.no_grad()
def hr_at_10_per_position(model: Recommender, seq: torch.Tensor) -> torch.Tensor:
    """HR@10 of each trained position, scored exactly as training scores it (full ranking)."""
    model.eval()
    items = model.all_item_vectors()  # (N+1, d)
    inputs, targets = model.training_layout(seq)  # (B, L), (B, T, P)
    _, states = model.training_states(items[inputs], inputs > 0)  # (B, T, d)
    scores = states @ items.T  # (B, T, N+1)
    scores[..., 0] = float("-inf")
    target_scores = scores.gather(2, targets)  # (B, T, P)
    rank = (scores.unsqueeze(2) > target_scores.unsqueeze(3)).sum(-1)  # (B, T, P)
    hit, real = (rank < 10) & (targets > 0), targets > 0
    keep = real.sum((0, 2)) > 0
    return (hit.sum((0, 2)) / real.sum((0, 2)).clamp(min=1))[keep]  # (trained positions,)


@pytest.mark.parametrize("name", ENCODERS)
def test_signal_free_sequences_stay_at_chance_at_every_trained_position(name):
    """Uniformly random sequences carry no signal: any HR@10 above chance on held-out sequences
    means the scored state saw its target. (Trained per position, the bidirectional encoder
    reaches about 0.99 at inner positions here.)"""
    torch.manual_seed(0)
    n_items, L = 100, 8
    model = id_model(name, n_items, L, dim=32, n_layers=2, bce_positives=1 if name == "sasrec" else 3)
    g = torch.Generator().manual_seed(0)
    width = model.cfg.train_window
    opt = torch.optim.Adam(model.parameters(), lr=0.01)
    model.train()
    for _ in range(150):
        batch = torch.randint(1, n_items + 1, (64, width), generator=g)
        loss = model.training_loss({"seq": batch})["loss"]
        opt.zero_grad()
        loss.backward()
        opt.step()
    held_out = torch.randint(1, n_items + 1, (400, width), generator=g)
    hr = hr_at_10_per_position(model, held_out)
    chance = 10 / n_items
    assert (hr < chance + 0.06).all(), f"{name}: HR@10 per trained position {hr.tolist()} vs chance {chance}"
    assert hr.numel() == (L if model.user_encoder.causal else 1)


@pytest.mark.parametrize("name", ENCODERS)
def test_corruption_for_nid_and_rcl_never_inserts_the_users_targets(name, monkeypatch):
    import mmrec.models.recommender as rec

    seen = []

    def spy(*args, **kw):
        out = corrupt(*args, **kw)
        seen.append(out[0])
        return out

    corrupt = rec.corrupt_sequences
    monkeypatch.setattr(rec, "corrupt_sequences", spy)
    model = id_model(name, n_items=7, max_len=4, bce_positives=2, nid_weight=0.1, rcl_weight=0.1,
                     corruption={"replace_prob": 1.0, "shuffle_prob": 0.0})
    row = torch.arange(1, model.cfg.train_window + 1)  # the encoder reads the first items, the rest are targets
    seq = row.repeat(100, 1)
    read = model.training_layout(seq)[0][0]
    out = model.training_loss({"seq": seq})
    assert {"nid", "rcl"} <= set(out)
    noisy = seen[-1]
    replaced = (noisy > 0) & ~torch.isin(noisy, read)
    assert replaced.any() and not torch.isin(noisy[replaced], row).any(), noisy[replaced].unique().tolist()


# ----------------------------------------------------------------------------- history length


def test_preprocess_history_must_fit_a_training_row(tmp_path):
    """preprocess.max_seq_len larger than a training row used to drop the oldest training items
    silently while cold_items counted them as seen; now the config says how the two relate."""
    from mmrec.config import ConfigError, load_config
    from mmrec.data.sequences import SequenceData

    sasrec, transrec = id_model("sasrec", 30, max_len=4).cfg, id_model("transrec", 30, max_len=4, bce_positives=3).cfg
    assert (sasrec.train_window, transrec.train_window) == (5, 7)
    sasrec.check_history_length(4)
    transrec.check_history_length(6)
    with pytest.raises(ValueError, match=r"max_seq_len \(5\) keeps up to 6 .* holds 5 .* <= 4"):
        sasrec.check_history_length(5)
    with pytest.raises(ValueError, match=r"holds 7 \(model.max_len \+ objective.bce_positives\)"):
        transrec.check_history_length(7)
    # what went wrong before: a training sequence of max_seq_len + 1 = 6 items, rows of 5
    data = SequenceData(30, [[1, 2, 3, 4, 5, 6]], torch.tensor([7]), torch.tensor([8]))
    assert 1 not in data.train_examples(sasrec.train_window - 1) and not data.cold_items()[1]
    # and the pipeline config refuses it when the model section is read
    path = tmp_path / "cfg.yaml"
    path.write_text("preprocess: {max_seq_len: 5}\ndomains: [{name: d, source: {format: t, path: p}}]\n"
                    "model: {dim: 16, max_len: 4, item_tower: {name: id}, objective: {nicl_enabled: false}}\n")
    with pytest.raises(ConfigError, match=r"cfg.yaml: preprocess.max_seq_len \(5\)"):
        load_config(path).model()
    path.write_text(path.read_text().replace("max_seq_len: 5", "max_seq_len: 4"))
    assert load_config(path).model().max_len == 4


@pytest.mark.parametrize("name", ENCODERS)
def test_fit_feeds_rows_of_train_window_items(name, tmp_path):
    """A bidirectional model's rows hold max_len history items plus the positives, so training
    histories are as long as the ones it reads at inference."""
    from mmrec.data.sequences import SequenceData
    from mmrec.experiment import fit
    from mmrec.training import TrainConfig

    model = id_model(name, n_items=30, max_len=4, bce_positives=2)
    g = torch.Generator().manual_seed(0)
    train = [torch.randint(1, 31, (n,), generator=g).tolist() for n in (9, 3, 6, 2)]
    data = SequenceData(30, train, torch.tensor([1, 2, 3, 4]), torch.tensor([5, 6, 7, 8]))
    widths, longest_history = [], []
    loss_fn = model.training_loss

    def spy(batch):
        widths.append(batch["seq"].shape[1])
        longest_history.append(int((model.training_layout(batch["seq"])[0] > 0).sum(1).max()))
        return loss_fn(batch)

    model.training_loss = spy
    fit(model, data, TrainConfig(epochs=1, batch_size=4, lr=0.01, patience=None, seed=0), tmp_path / "run")
    assert set(widths) == {model.cfg.train_window} and max(longest_history) == 4
