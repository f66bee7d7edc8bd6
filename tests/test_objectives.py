"""Objectives: hand-computed losses on tiny inputs, masks, gradients, corruption statistics."""

from __future__ import annotations

import math

import pytest
import torch

from mmrec.objectives import (
    OBJECTIVES,
    CorruptionConfig,
    NICLConfig,
    NIDHead,
    ObjectiveConfig,
    bce_sampled,
    corrupt_sequences,
    get_objective,
    item_log_popularity,
    next_item_softmax,
    nicl,
    nid_loss,
    rcl_loss,
    sample_negatives,
    total_loss,
)


def ce(target: float, *others: float) -> float:
    """Cross-entropy of one logit against a candidate set, by hand."""
    return -(target - math.log(math.exp(target) + sum(math.exp(o) for o in others)))


def softplus(x: float) -> float:
    return math.log1p(math.exp(x))


def t(x, **kw) -> torch.Tensor:
    return torch.tensor(x, dtype=torch.float64, **kw)


# ---------------------------------------------------------------------------------------------
# next_item_softmax
# ---------------------------------------------------------------------------------------------

# Two users, L+1 = 3. User 1 is left-padded. Cells (flattened): c0=1 c1=2 c2=3 | c3=pad c4=4 c5=2.
SEQ = torch.tensor([[1, 2, 3], [0, 4, 2]])
P = {1: 0.1, 2: 0.4, 3: 0.2, 4: 0.3}  # training popularity of items 1..4
LOG_POP = t([math.log(1e-8)] + [math.log(P[i]) for i in (1, 2, 3, 4)])


def softmax_inputs():
    e = t(
        [
            [[1, 0], [0, 1], [1, 1]],
            [[5, 5], [-1, 0], [0, 2]],  # the padding cell has a large vector: a mask bug would show
        ],
        requires_grad=True,
    )
    h = t([[[1, 2], [2, -1]], [[9, 9], [1, 1]]], requires_grad=True)  # h[1, 0] is not a valid position
    return h, e


def expected_softmax(tau: float) -> float:
    lp = {i: math.log(p) for i, p in P.items()}
    # (0,0): h=[1,2], target c1 (id 2). Masked: c0, c2 (own history), c3 (pad), c5 (id 2 of user 1:
    # false negative, dot 4 would dominate). Candidates: c1 (dot 2), c4 (dot -1, id 4).
    l00 = ce(2 / tau - lp[2], -1 / tau - lp[4])
    # (0,1): h=[2,-1], target c2 (id 3). Masked: c0, c1 (own), c3 (pad), c5 (id 2 is in user 0's
    # sequence). Candidates: c2 (dot 1), c4 (dot -2).
    l01 = ce(1 / tau - lp[3], -2 / tau - lp[4])
    # (1,1): h=[1,1], target c5 (id 2). Masked: c4 (own), c3 (pad), c1 (id 2 = target).
    # Candidates: c5 (dot 2), c0 (dot 1, id 1), c2 (dot 2, id 3).
    l11 = ce(2 / tau - lp[2], 1 / tau - lp[1], 2 / tau - lp[3])
    return (l00 + l01 + l11) / 3


@pytest.mark.parametrize("tau", [1.0, 0.5])
def test_softmax_hand_computed(tau):
    h, e = softmax_inputs()
    loss = next_item_softmax(h, e, SEQ, LOG_POP, temperature=tau)
    assert loss.item() == pytest.approx(expected_softmax(tau), rel=1e-9)


def test_softmax_temperature_changes_loss():
    h, e = softmax_inputs()
    a = next_item_softmax(h, e, SEQ, LOG_POP, temperature=1.0)
    b = next_item_softmax(h, e, SEQ, LOG_POP, temperature=0.5)
    assert abs(a.item() - b.item()) > 1e-3


def test_softmax_gradients_only_where_valid():
    h, e = softmax_inputs()
    next_item_softmax(h, e, SEQ, LOG_POP).backward()
    assert torch.isfinite(h.grad).all() and torch.isfinite(e.grad).all()
    assert h.grad[0].abs().sum() > 0 and h.grad[1, 1].abs().sum() > 0
    assert torch.equal(h.grad[1, 0], torch.zeros(2, dtype=torch.float64))  # invalid position
    assert torch.equal(e.grad[1, 0], torch.zeros(2, dtype=torch.float64))  # padding cell


def test_softmax_duplicate_target_in_own_history_is_masked():
    # User 0 is [2, 5, 2]: at t=1 the target is cell 2 (id 2); cell 0 also holds id 2 and must be masked.
    seq = torch.tensor([[2, 5, 2], [3, 1, 0]])
    log_pop = torch.zeros(6, dtype=torch.float64)
    h = t([[[0, 0], [1, 0]], [[0, 1], [0, 0]]])
    e = t([[[3, 0], [0, 0], [1, 0]], [[0, 0], [0, 2], [0, 0]]])
    # (0,0): h=0, target c1 (id 5); candidates c1, c3 (id 3), c4 (id 1): all logits 0 -> log 3.
    # (0,1): h=[1,0], target c2 (dot 1); c0 (dot 3) masked as a duplicate; candidates c3, c4 (dot 0).
    # (1,0): h=[0,1], target c4 (dot 2); own c3 masked, c5 pad; candidates c0 (0), c1 (0), c2 (0).
    expected = (math.log(3) + ce(1, 0, 0) + ce(2, 0, 0, 0)) / 3
    assert next_item_softmax(h, e, seq, log_pop).item() == pytest.approx(expected, rel=1e-9)
    e2 = e.clone()
    # Cell 0 is masked for user 0's predictions; user 1's query [0, 1] does not see the change.
    e2[0, 0] = t([-7, 0])
    assert next_item_softmax(h, e2, seq, log_pop).item() == pytest.approx(expected, rel=1e-9)


def _reference_softmax(h, e, seq, log_pop, tau):
    """Plain loops over users and positions, written independently of the vectorised code."""
    B, L1 = seq.shape
    cells = [(j, s) for j in range(B) for s in range(L1)]
    losses = []
    for i in range(B):
        own = {int(x) for x in seq[i] if x > 0}
        for p in range(L1 - 1):
            if seq[i, p] == 0 or seq[i, p + 1] == 0:
                continue
            tgt_id = int(seq[i, p + 1])
            logits, tgt_logit = [], None
            for j, s in cells:
                item = int(seq[j, s])
                value = float(h[i, p] @ e[j, s]) / tau - float(log_pop[item])
                if (j, s) == (i, p + 1):
                    tgt_logit = value
                elif item == 0 or item in own or item == tgt_id:
                    continue
                logits.append(value)
            m = max(logits)
            losses.append(-(tgt_logit - m - math.log(sum(math.exp(v - m) for v in logits))))
    return sum(losses) / len(losses)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_softmax_matches_loop_reference(seed):
    g = torch.Generator().manual_seed(seed)
    B, L1, d, N = 5, 6, 4, 7  # few items: many duplicates within and across users
    seq = torch.randint(1, N + 1, (B, L1), generator=g)
    seq[0, :2] = 0  # left padding
    seq[1, 4:] = 0  # right padding
    seq[2] = 0  # an all-padding user
    h = torch.randn(B, L1 - 1, d, generator=g, dtype=torch.float64)
    e = torch.randn(B, L1, d, generator=g, dtype=torch.float64)
    log_pop = item_log_popularity(seq, N).double()
    got = next_item_softmax(h, e, seq, log_pop, temperature=0.7).item()
    assert got == pytest.approx(_reference_softmax(h, e, seq, log_pop, 0.7), rel=1e-9)


def test_softmax_all_padding_batch_is_zero_with_graph():
    h = torch.randn(2, 2, 3, requires_grad=True)
    e = torch.randn(2, 3, 3, requires_grad=True)
    seq = torch.tensor([[0, 0, 0], [0, 0, 5]])  # no valid position at all
    loss = next_item_softmax(h, e, seq, torch.zeros(6))
    loss.backward()
    assert loss.item() == 0.0 and torch.equal(h.grad, torch.zeros_like(h))


def test_softmax_no_nan_with_an_all_padding_user():
    h, e = softmax_inputs()
    seq = SEQ.clone()
    seq[1] = 0
    loss = next_item_softmax(h, e, seq, LOG_POP)
    assert torch.isfinite(loss)


def test_item_log_popularity_items_and_counts():
    items = torch.tensor([[0, 1, 1, 2], [1, 0, 0, 0]])  # item 1: 3 times, item 2: once, item 3: never
    lp = item_log_popularity(items, 3, eps=1e-6)
    assert lp.tolist() == pytest.approx([math.log(1e-6), math.log(0.75), math.log(0.25), math.log(1e-6)], rel=1e-6)
    from_counts = item_log_popularity(torch.tensor([9, 3, 1, 0]), 3, eps=1e-6, kind="counts")
    assert torch.allclose(lp, from_counts)
    assert torch.isfinite(lp).all()
    with pytest.raises(ValueError, match="kind"):
        item_log_popularity(items, 3, kind="freq")
    with pytest.raises(ValueError, match="0..3"):
        item_log_popularity(torch.tensor([4]), 3)


# ---------------------------------------------------------------------------------------------
# bce_sampled, sample_negatives
# ---------------------------------------------------------------------------------------------


def test_bce_single_positive_hand_computed():
    h = t([[[1, 0], [0, 1]]], requires_grad=True)
    pos = t([[[2, 0], [0, -1]]])
    neg = t([[[-1, 0], [0, 3]]])
    mask = torch.tensor([[True, False]])
    # position 0: s_pos = 2, s_neg = -1; position 1 is masked.
    loss = bce_sampled(h, pos, neg, mask)
    assert loss.item() == pytest.approx(softplus(-2) + softplus(-1), rel=1e-12)
    loss.backward()
    assert h.grad[0, 0].abs().sum() > 0 and torch.equal(h.grad[0, 1], torch.zeros(2, dtype=torch.float64))


def test_bce_multi_positive_with_positive_mask():
    h = t([[[1, 1]]])
    pos = t([[[[1, 0], [9, 9]]]])  # (1, 1, P=2, 2); the second positive is invalid
    neg = t([[[[0, -1], [2, 1]]]])  # (1, 1, K=2, 2): dots -1 and 3
    mask = torch.tensor([[[True, False]]])
    expected = softplus(-1) + (softplus(-1) + softplus(3)) / 2
    assert bce_sampled(h, pos, neg, mask).item() == pytest.approx(expected, rel=1e-12)


def test_bce_all_masked_is_zero():
    h = torch.randn(2, 3, 4, requires_grad=True)
    loss = bce_sampled(h, torch.randn(2, 3, 4), torch.randn(2, 3, 5, 4), torch.zeros(2, 3, dtype=torch.bool))
    loss.backward()
    assert loss.item() == 0.0


def test_sample_negatives_range_and_determinism():
    a = sample_negatives(7, (50, 4), torch.Generator().manual_seed(3))
    b = sample_negatives(7, (50, 4), torch.Generator().manual_seed(3))
    assert torch.equal(a, b) and a.min() >= 1 and a.max() <= 7
    assert set(a.unique().tolist()) == set(range(1, 8))


def test_sample_negatives_exclusion_is_exact_and_uniform():
    exclude = torch.tensor([[2, 3, 0, 3], [0, 0, 0, 0], [5, 1, 4, 2]])  # row 1 excludes nothing
    s = sample_negatives(5, (3, 30000), torch.Generator().manual_seed(0), exclude=exclude)
    assert set(s[0].unique().tolist()) == {1, 4, 5}
    assert set(s[1].unique().tolist()) == {1, 2, 3, 4, 5}
    assert set(s[2].unique().tolist()) == {3}
    freq = torch.bincount(s[0], minlength=6)[[1, 4, 5]].double() / 30000
    # 3-sigma band of a binomial share of 1/3 over 30000 draws is +-0.0082
    assert (freq - 1 / 3).abs().max() < 0.0082
    with pytest.raises(ValueError, match="covers every item"):
        sample_negatives(3, (1, 2), exclude=torch.tensor([[1, 2, 3]]))


# ---------------------------------------------------------------------------------------------
# NICL
# ---------------------------------------------------------------------------------------------

# Cells: c0 = item 1 (user 0), c1 = item 2 (user 0), c2 = item 3 (user 1), c3 = padding.
NICL_SEQ = torch.tensor([[1, 2], [3, 0]])
R = 1 / math.sqrt(2)


def nicl_inputs():
    # Not unit length on purpose: nicl normalises. Normalised text: [1,0], [0,1], [R,R];
    # normalised image: [1,0], [.6,.8], [-1,0]. Padding cells are large.
    text = t([[[2, 0], [0, 0.5]], [[3, 3], [7, 7]]], requires_grad=True)
    image = t([[[2, 0], [0.6, 0.8]], [[-1, 0], [5, -5]]], requires_grad=True)
    return text, image


TAU = 0.5


def test_nicl_text_to_image_with_next_item_positive():
    text, image = nicl_inputs()
    cfg = NICLConfig(temperature=TAU)
    # anchor c0: images c0 (dot 1), c1 (dot .6) are positives, c2 (dot -1) the negative
    a0 = (ce(1 / TAU, 0.6 / TAU, -1 / TAU) + ce(0.6 / TAU, 1 / TAU, -1 / TAU)) / 2
    a1 = ce(0.8 / TAU, 0.0)  # anchor c1: no next cell; own c0 masked; negative c2 (dot 0)
    a2 = ce(-R / TAU, R / TAU, 1.4 * R / TAU)  # anchor c2: next is padding; negatives c0, c1
    loss = nicl(text, image, NICL_SEQ, cfg)
    assert loss.item() == pytest.approx((a0 + a1 + a2) / 3, rel=1e-9)
    loss.backward()
    assert text.grad[:, :1].abs().sum() > 0 and image.grad[0].abs().sum() > 0
    assert torch.equal(text.grad[1, 1], torch.zeros(2, dtype=torch.float64))  # padding cell


def test_nicl_without_next_item_positive_masks_own_next_cell():
    text, image = nicl_inputs()
    cfg = NICLConfig(temperature=TAU, next_item_positive=False)
    a0 = ce(1 / TAU, -1 / TAU)  # c1 is the user's own cell: neither positive nor negative
    a1 = ce(0.8 / TAU, 0.0)
    a2 = ce(-R / TAU, R / TAU, 1.4 * R / TAU)
    got = nicl(text, image, NICL_SEQ, cfg).item()
    assert got == pytest.approx((a0 + a1 + a2) / 3, rel=1e-9)
    # The extra positive (image c1 is close to text c0) changes the loss
    with_next = nicl(text, image, NICL_SEQ, NICLConfig(temperature=TAU)).item()
    assert abs(with_next - got) > 1e-3


def test_nicl_symmetric_adds_image_to_text():
    text, image = nicl_inputs()
    t2i = nicl(text, image, NICL_SEQ, NICLConfig(temperature=TAU)).item()
    # image anchors: c0 positives text c0 (t=0, no previous); negative text c2.
    b0 = ce(1 / TAU, R / TAU)
    # c1: positives text c1 and text c0 (previous cell); negative text c2.
    b1 = (ce(0.8 / TAU, 0.6 / TAU, 1.4 * R / TAU) + ce(0.6 / TAU, 0.8 / TAU, 1.4 * R / TAU)) / 2
    # c2: positive text c2; negatives text c0, c1.
    b2 = ce(-R / TAU, -1 / TAU, 0.0)
    i2t = (b0 + b1 + b2) / 3
    got = nicl(text, image, NICL_SEQ, NICLConfig(temperature=TAU, symmetric=True)).item()
    assert got == pytest.approx((t2i + i2t) / 2, rel=1e-9)
    assert abs(got - t2i) > 1e-3


def test_nicl_intra_modal_negatives():
    text, image = nicl_inputs()
    # text-text dots: c0.c2 = R, c1.c2 = R (other users only)
    a0 = (ce(1 / TAU, 0.6 / TAU, -1 / TAU, R / TAU) + ce(0.6 / TAU, 1 / TAU, -1 / TAU, R / TAU)) / 2
    a1 = ce(0.8 / TAU, 0.0, R / TAU)
    a2 = ce(-R / TAU, R / TAU, 1.4 * R / TAU, R / TAU, R / TAU)
    got = nicl(text, image, NICL_SEQ, NICLConfig(temperature=TAU, intra_modal=True)).item()
    assert got == pytest.approx((a0 + a1 + a2) / 3, rel=1e-9)


def test_nicl_masks_other_users_cells_with_a_positive_item():
    text, image = nicl_inputs()
    seq = torch.tensor([[1, 2], [2, 0]])  # user 1 holds item 2, the next-item positive of c0
    # anchor c0: positives image c0, c1; image c2 (item 2) masked -> no negative left
    a0 = (ce(1 / TAU, 0.6 / TAU) + ce(0.6 / TAU, 1 / TAU)) / 2
    a1 = ce(0.8 / TAU)  # anchor c1 (item 2): image c2 holds item 2 too -> masked, only the positive
    a2 = ce(-R / TAU, R / TAU)  # anchor c2 (item 2): image c1 (item 2) masked; negative c0
    got = nicl(text, image, seq, NICLConfig(temperature=TAU)).item()
    assert got == pytest.approx((a0 + a1 + a2) / 3, rel=1e-9)


def test_nicl_temperature_and_padding():
    text, image = nicl_inputs()
    a = nicl(text, image, NICL_SEQ, NICLConfig(temperature=0.1)).item()
    b = nicl(text, image, NICL_SEQ, NICLConfig(temperature=1.0)).item()
    assert abs(a - b) > 1e-3
    empty = nicl(text, image, torch.zeros(2, 2, dtype=torch.long), NICLConfig())
    empty.backward()
    assert empty.item() == 0.0


def test_nicl_config_validation():
    with pytest.raises(ValueError, match="temperature"):
        NICLConfig(temperature=0)
    with pytest.raises(ValueError, match="weight"):
        NICLConfig(weight=1.5)


# ---------------------------------------------------------------------------------------------
# Corruption, NID, RCL
# ---------------------------------------------------------------------------------------------


def many_users(B=4000, L1=8, N=200, seed=0):
    """Distinct items per user, mixed left/right padding and lengths 1..L1."""
    g = torch.Generator().manual_seed(seed)
    items = torch.stack([torch.randperm(N, generator=g)[:L1] + 1 for _ in range(B)])  # (B, L1)
    lengths = torch.randint(1, L1 + 1, (B,), generator=g)
    pos = torch.arange(L1)
    left = torch.arange(B) % 2 == 0
    keep = torch.where(left[:, None], pos[None, :] >= L1 - lengths[:, None], pos[None, :] < lengths[:, None])
    return torch.where(keep, items, 0)


def eligible_mask(seq):
    valid = seq > 0
    pos = torch.arange(seq.shape[1]).expand_as(seq)
    last = torch.where(valid, pos, -1).max(1).values
    return valid & (pos != last[:, None])


def test_corruption_replace_fraction_and_scope():
    seq = many_users()
    cfg = CorruptionConfig(replace_prob=0.15, shuffle_prob=0.0)
    out, noise = corrupt_sequences(seq, cfg, 200, torch.Generator().manual_seed(1))
    elig = eligible_mask(seq)
    n = int(elig.sum())
    share = noise[elig].double().mean().item()
    assert abs(share - 0.15) < 3 * math.sqrt(0.15 * 0.85 / n)  # binomial 3-sigma band
    assert not noise[~elig].any()  # never padding, never the last item
    assert torch.equal(out[~noise], seq[~noise])
    for b in range(len(seq)):  # a noise item is never one of the user's own items
        own = set(seq[b].tolist())
        assert not own & set(out[b][noise[b]].tolist())


def test_corruption_never_touches_padding_or_last_item():
    seq = many_users(B=500)
    cfg = CorruptionConfig(replace_prob=1.0, shuffle_prob=1.0)
    out, noise = corrupt_sequences(seq, cfg, 200, torch.Generator().manual_seed(2))
    elig = eligible_mask(seq)
    assert torch.equal(out == 0, seq == 0)
    assert torch.equal(out[(seq > 0) & ~elig], seq[(seq > 0) & ~elig])  # last items
    assert torch.equal(noise, elig)  # replace_prob 1: every eligible position is noise


def test_corruption_shuffle_fraction_and_window():
    seq = many_users(B=4000, L1=8)
    elig = eligible_mask(seq)
    cfg = CorruptionConfig(replace_prob=0.0, shuffle_prob=0.3, shuffle_window=3)
    out, noise = corrupt_sequences(seq, cfg, 200, torch.Generator().manual_seed(3))
    assert not noise.any()  # shuffled items are the user's own: not noise by default
    changed = (out != seq).any(1)
    assert torch.equal(out.sort(1).values, seq.sort(1).values)  # a permutation of each row
    moved = out != seq
    assert not moved[~elig].any()
    for b in changed.nonzero().squeeze(1).tolist():
        cols = moved[b].nonzero().squeeze(1)
        assert cols.max() - cols.min() < 3  # confined to one window of 3
    # Users with >= 3 eligible items (distinct): shuffled with p = 0.3, and a random permutation of
    # 3 distinct items differs from the identity with p = 5/6.
    big = elig.sum(1) >= 3
    share = changed[big].double().mean().item()
    expected = 0.3 * 5 / 6
    assert abs(share - expected) < 3 * math.sqrt(expected * (1 - expected) / int(big.sum()))
    # Label switch: positions whose item changed become noise
    cfg2 = CorruptionConfig(replace_prob=0.0, shuffle_prob=0.3, label_shuffled_as_noise=True)
    out2, noise2 = corrupt_sequences(seq, cfg2, 200, torch.Generator().manual_seed(3))
    assert torch.equal(noise2, out2 != seq) and noise2.any()


def test_corruption_exclude_keeps_the_targets_out():
    """The history passed to corrupt_sequences lacks the user's next item; ``exclude`` (the whole
    training row) keeps it out of the replacements."""
    history = torch.tensor([[1, 2, 3, 4]] * 200)  # the user's next item is 5; items 5 and 6 are not in history
    row = torch.cat([history, torch.full((200, 1), 5)], 1)
    cfg = CorruptionConfig(replace_prob=1.0, shuffle_prob=0.0)
    out, _ = corrupt_sequences(history, cfg, 6, torch.Generator().manual_seed(0))
    assert (out == 5).any()  # without exclude the target is a possible replacement...
    out, noise = corrupt_sequences(history, cfg, 6, torch.Generator().manual_seed(0), exclude=row)
    assert not (out == 5).any() and (out[noise] == 6).all()  # ...with it, never


def test_corruption_deterministic_with_generator():
    seq = many_users(B=50)
    cfg = CorruptionConfig(replace_prob=0.3, shuffle_prob=0.5)
    a = corrupt_sequences(seq, cfg, 200, torch.Generator().manual_seed(7))
    b = corrupt_sequences(seq, cfg, 200, torch.Generator().manual_seed(7))
    c = corrupt_sequences(seq, cfg, 200, torch.Generator().manual_seed(8))
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    assert not torch.equal(a[0], c[0])


def test_corruption_rejects_padding_in_the_middle():
    with pytest.raises(ValueError, match="one end"):
        corrupt_sequences(torch.tensor([[1, 0, 2]]), CorruptionConfig(), 5)


def test_corruption_config_validation():
    with pytest.raises(ValueError, match="replace_prob"):
        CorruptionConfig(replace_prob=1.2)
    with pytest.raises(ValueError, match="shuffle_window"):
        CorruptionConfig(shuffle_window=1)


def test_nid_loss_hand_computed():
    logits = t([[2.0, -1.0, 0.0]], requires_grad=True)
    noise = torch.tensor([[True, False, False]])
    valid = torch.tensor([[True, True, False]])
    loss = nid_loss(logits, noise, valid)
    # noise at 2.0 -> -log sigmoid(2) = softplus(-2); clean at -1 -> -log(1 - sigmoid(-1)) = softplus(-1)
    assert loss.item() == pytest.approx((softplus(-2) + softplus(-1)) / 2, rel=1e-12)
    loss.backward()
    assert logits.grad[0, 2] == 0 and logits.grad[0, 0] != 0
    assert nid_loss(logits, noise, torch.zeros_like(valid)).item() == 0.0


def test_nid_head_shape_and_gradient():
    head = NIDHead(8)
    hidden = torch.randn(3, 5, 8)
    logits = head(hidden)
    assert logits.shape == (3, 5)
    nid_loss(logits, torch.rand(3, 5) < 0.2, torch.ones(3, 5, dtype=torch.bool)).backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in head.parameters())


def test_rcl_hand_computed():
    a = t([[2, 0], [0, 0.5]])  # normalised: [1, 0], [0, 1]
    b = t([[3, 0], [2, 2]])  # normalised: [1, 0], [R, R]
    # logits = a.b^T = [[1, R], [0, R]]; rows: targets on the diagonal; columns likewise
    rows = (ce(1, R) + ce(R, 0)) / 2
    cols = (ce(1, 0) + ce(R, R)) / 2
    assert rcl_loss(a, b, temperature=1.0).item() == pytest.approx((rows + cols) / 2, rel=1e-12)


def test_rcl_aligned_is_zero_and_mismatched_is_large():
    u = torch.eye(3, dtype=torch.float64)
    aligned = rcl_loss(u, 3 * u, temperature=0.01).item()
    assert aligned == pytest.approx(math.log1p(2 * math.exp(-100)), abs=1e-12) and aligned < 1e-6
    shifted = rcl_loss(u, u.roll(1, dims=0), temperature=0.01).item()
    # each positive has cosine 0, one negative has cosine 1: loss = ce(0, 100, 0) ~ 100
    assert shifted == pytest.approx(ce(0, 100, 0), rel=1e-9)


def test_rcl_valid_mask_and_gradient():
    u = torch.randn(4, 3, requires_grad=True)
    v = torch.randn(4, 3, requires_grad=True)
    valid = torch.tensor([True, False, True, True])
    loss = rcl_loss(u, v, valid=valid)
    assert loss.item() == pytest.approx(rcl_loss(u[valid], v[valid]).item(), rel=1e-6)
    loss.backward()
    assert u.grad[1].abs().sum() == 0 and u.grad[0].abs().sum() > 0
    assert rcl_loss(u, v, valid=torch.zeros(4, dtype=torch.bool)).item() == 0.0


# ---------------------------------------------------------------------------------------------
# Config, registry, total
# ---------------------------------------------------------------------------------------------


def test_registry_fails_loudly():
    assert set(OBJECTIVES) == {"softmax", "full_softmax", "bce"}
    assert get_objective("bce") is bce_sampled
    with pytest.raises(ValueError, match=r"'softmx'.*\['bce', 'full_softmax', 'softmax'\]"):
        get_objective("softmx")
    with pytest.raises(ValueError, match="valid names"):
        ObjectiveConfig(name="bpr")


def test_objective_config_weights_and_total():
    cfg = ObjectiveConfig()
    assert cfg.weights() == pytest.approx({"main": 0.6, "nicl": 0.4, "nid": 0.1, "rcl": 0.1})
    assert cfg.uses_corruption
    parts = {"main": torch.tensor(2.0), "nicl": torch.tensor(1.0), "nid": torch.tensor(3.0), "rcl": torch.tensor(5.0)}
    assert total_loss(parts, cfg).item() == pytest.approx(0.6 * 2 + 0.4 * 1 + 0.1 * 3 + 0.1 * 5)
    with pytest.raises(KeyError, match="enabled"):
        total_loss({"main": torch.tensor(1.0)}, cfg)
    transrec = ObjectiveConfig(name="bce", nicl_enabled=False, nid_weight=0, rcl_weight=0)
    assert transrec.weights() == {"main": 1.0} and not transrec.uses_corruption
    with pytest.raises(KeyError):
        total_loss(parts, transrec)


def test_objective_config_from_nested_dicts_and_validation():
    cfg = ObjectiveConfig(nicl={"temperature": 0.2, "symmetric": True}, corruption={"replace_prob": 0.2})
    assert cfg.nicl == NICLConfig(temperature=0.2, symmetric=True)
    assert cfg.corruption.replace_prob == 0.2
    with pytest.raises(ValueError, match="nid_weight"):
        ObjectiveConfig(nid_weight=-1)
    with pytest.raises(ValueError, match="bce_negatives"):
        ObjectiveConfig(bce_negatives=0)
    with pytest.raises(ValueError, match="bce_positives must be >= 1, got 0"):
        ObjectiveConfig(bce_positives=0)
    assert ObjectiveConfig().bce_positives == 1  # SASRec's next item unless a preset says otherwise


def test_full_softmax_is_cross_entropy_over_every_item():
    from mmrec.objectives import full_softmax

    g = torch.Generator().manual_seed(0)
    B, L, N, d = 3, 4, 9, 5
    seq = torch.tensor([[0, 0, 3, 5, 3], [1, 2, 3, 4, 9], [0, 0, 0, 7, 8]])  # (B, L+1)
    h = torch.randn(B, L, d, generator=g, requires_grad=True)
    all_e = torch.randn(N + 1, d, generator=g, requires_grad=True)
    got = full_softmax(h, all_e, seq, temperature=0.5)
    # by hand: every valid (input, target) pair, candidates 1..N (padding never), repeats not masked
    terms = []
    for b in range(B):
        for t in range(L):
            if seq[b, t] > 0 and seq[b, t + 1] > 0:
                logits = (all_e[1:] @ h[b, t]) / 0.5
                terms.append(-torch.log_softmax(logits, 0)[seq[b, t + 1] - 1])
    assert got.item() == pytest.approx(torch.stack(terms).mean().item(), rel=1e-5)
    got.backward()
    assert all_e.grad[0].abs().sum() == 0 and (all_e.grad[1:].abs().sum(1) > 0).all()  # every real item is a candidate
    empty = torch.zeros(1, L + 1, dtype=torch.long)
    assert full_softmax(torch.randn(1, L, d), all_e, empty).item() == 0.0
