"""Full-ranking evaluation: hand-computed ranks and metrics, masking, ties, batching, cold start."""

from __future__ import annotations

import math
import time

import pytest
import torch

from mmrec.evaluation import full_ranking, metrics_from_ranks, ranks

# Four users, six items (columns are items 0..6; item 0 is padding and has a huge score on purpose).
SCORES = torch.tensor(
    [
        [99.0, 0.9, 0.8, 0.7, 0.6, 0.5, 0.4],  # u0: target 3 (0.7); history {1}
        [99.0, 0.1, 0.5, 0.5, 0.2, 0.5, 0.3],  # u1: target 3 (0.5); history {2, 4}
        [99.0, 0.3, 0.2, 0.9, 0.1, 0.4, 0.8],  # u2: target 1 (0.3); history {6, 1}: target re-consumed
        [99.0, 1.0, 0.2, 0.3, 0.4, 0.5, 0.6],  # u3: target 1 (1.0); empty history
    ]
)
HISTORIES = [[1], [2, 4], [6, 1, 6], []]
TARGETS = torch.tensor([3, 3, 1, 1])
# By hand:
# u0: item 1 (0.9) is history -> removed; item 2 (0.8) is above 0.7 -> rank 2.
# u1: item 2 ties but is history -> removed; item 5 ties at 0.5 -> counted above (pessimistic) -> rank 2.
# u2: the target 1 is re-consumed: masked like every history item, so it cannot be hit and ranks
#     after every rankable item: 1 + (6 items - 2 history items {1, 6}) = 5.
# u3: nothing above 1.0 -> rank 1.
EXPECTED_RANKS = [2, 2, 5, 1]
# Without history masking: u0 items 1, 2 above -> 3; u1 items 2, 5 -> 3; u2 items 3, 5, 6 -> 4; u3 -> 1.
UNMASKED_RANKS = [3, 3, 4, 1]


def as_vectors(scores: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """User one-hots and item vectors whose dot products are exactly ``scores``."""
    return torch.eye(scores.shape[0]), scores.T.contiguous()


def test_ranks_hand_computed():
    u, v = as_vectors(SCORES)
    assert ranks(u, v, HISTORIES, TARGETS).tolist() == EXPECTED_RANKS


def test_history_masking_changes_ranks():
    u, v = as_vectors(SCORES)
    assert ranks(u, v, [[], [], [], []], TARGETS).tolist() == UNMASKED_RANKS


def test_keep_all_masks_nothing():
    u, v = as_vectors(SCORES)
    assert ranks(u, v, HISTORIES, TARGETS, history="keep_all").tolist() == UNMASKED_RANKS
    with pytest.raises(ValueError, match="history must be one of"):
        ranks(u, v, HISTORIES, TARGETS, history="all_but_target")


def test_reconsumed_target_is_never_rankable():
    """The leak of the old protocol: with the target left rankable among masked history items, a
    user vector equal to the last history item finds a re-consumed target at rank 1."""
    N, d = 50, 50
    v = torch.cat([torch.zeros(1, d), torch.eye(N)])  # item i = one-hot i-1
    histories = [[5, 7, 9], [3, 4]]
    targets = torch.tensor([9, 11])  # u0 re-consumes 9, u1 does not
    u = v[torch.tensor([9, 4])]  # each user vector = the last history item
    r = ranks(u, v, histories, targets)
    assert r[0] == 1 + N - 3  # a miss, after every rankable item
    assert ranks(u, v, histories, targets, history="keep_all")[0] == 1


def test_metrics_hand_computed():
    u, v = as_vectors(SCORES)
    res = full_ranking(u, v, HISTORIES, TARGETS, ks=(1, 2, 5))
    m = res["all"]
    inv_log3 = 1 / math.log2(3)  # NDCG of rank 2
    expected = {
        "HR@1": 1 / 4,  # only u3
        "HR@2": 3 / 4,
        "HR@5": 1.0,
        "NDCG@1": 1 / 4,
        "NDCG@2": (1 + 2 * inv_log3) / 4,
        "NDCG@5": (1 + 2 * inv_log3 + 1 / math.log2(6)) / 4,  # u2 at rank 5
        "MRR@1": 1 / 4,
        "MRR@2": (1 + 0.5 + 0.5) / 4,
        "MRR@5": (1 + 0.5 + 0.5 + 1 / 5) / 4,
        "MRR": (1 + 0.5 + 0.5 + 1 / 5) / 4,
    }
    assert m.keys() == expected.keys()
    for k, value in expected.items():
        assert m[k] == pytest.approx(value, abs=1e-12), k
    assert res["n_users"] == 4 and res["cold"] is None and res["n_cold_users"] is None


def test_ties_are_pessimistic():
    # Constant scores (a dead model): every rankable item ties with the target, so the target comes
    # last among them: rank = N - (history items other than the target).
    N = 6
    u = torch.ones(4, 2)
    v = torch.zeros(N + 1, 2)
    got = ranks(u, v, HISTORIES, TARGETS).tolist()
    # u0: history {1} -> 6 - 1 = 5; u1: {2, 4} -> 4; u2: {6} (1 is the target) -> 5; u3: {} -> 6.
    assert got == [5, 4, 5, 6]
    assert full_ranking(u, v, HISTORIES, TARGETS, ks=(1, 2))["all"]["HR@2"] == 0.0


def test_tensor_histories_equal_list_histories():
    u, v = as_vectors(SCORES)
    padded = torch.tensor([[1, 0, 0], [0, 2, 4], [6, 1, 6], [0, 0, 0]])
    assert ranks(u, v, padded, TARGETS).tolist() == EXPECTED_RANKS


def test_score_fn_variant():
    calls = []

    def score_fn(idx):
        calls.append(idx.tolist())
        return SCORES[idx]

    got = ranks(None, None, HISTORIES, TARGETS, score_fn=score_fn, batch_size=3)
    assert got.tolist() == EXPECTED_RANKS
    assert calls == [[0, 1, 2], [3]]
    with pytest.raises(ValueError, match="not both"):
        ranks(*as_vectors(SCORES), HISTORIES, TARGETS, score_fn=score_fn)


def _brute_force_ranks(scores, histories, targets):
    """Loops over users and items, written independently of the batched code."""
    out = []
    for u, target in enumerate(targets.tolist()):
        if target in histories[u]:  # masked: after every rankable item
            out.append(1 + scores.shape[1] - 1 - len(set(histories[u]) - {0}))
            continue
        removed = {0} | set(histories[u])
        t = scores[u, target].item()
        out.append(1 + sum(1 for j in range(scores.shape[1]) if j != target and j not in removed and scores[u, j].item() >= t))
    return out


@pytest.mark.parametrize("batch_size", [1, 4, 7, 1000])
def test_batching_matches_brute_force(batch_size):
    g = torch.Generator().manual_seed(0)
    U, N, d = 23, 30, 3
    # Integer-valued vectors: many exact ties between items.
    u = torch.randint(-2, 3, (U, d), generator=g).double()
    v = torch.randint(-2, 3, (N + 1, d), generator=g).double()
    targets = torch.randint(1, N + 1, (U,), generator=g)
    histories = [torch.randint(1, N + 1, (int(n),), generator=g).tolist() for n in torch.randint(0, 8, (U,), generator=g)]
    histories[0].append(int(targets[0]))  # a re-consumed target
    expected = _brute_force_ranks(u @ v.T, histories, targets)
    assert ranks(u, v, histories, targets, batch_size=batch_size).tolist() == expected


def test_cold_subset():
    u, v = as_vectors(SCORES)
    res = full_ranking(u, v, HISTORIES, TARGETS, ks=(1, 2), cold_items={3})
    # Cold users: u0 and u1 (target 3), both at rank 2.
    assert res["n_cold_users"] == 2
    assert res["cold"]["HR@1"] == 0.0 and res["cold"]["HR@2"] == 1.0
    assert res["cold"]["NDCG@2"] == pytest.approx(1 / math.log2(3))
    assert res["cold"]["MRR"] == pytest.approx(0.5)
    as_mask = torch.zeros(7, dtype=torch.bool)
    as_mask[3] = True
    assert full_ranking(u, v, HISTORIES, TARGETS, ks=(1, 2), cold_items=as_mask) == res
    assert res["all"] == full_ranking(u, v, HISTORIES, TARGETS, ks=(1, 2))["all"]


def test_no_cold_users_gives_none_not_nan():
    u, v = as_vectors(SCORES)
    res = full_ranking(u, v, HISTORIES, TARGETS, ks=(5,), cold_items={2, 5})
    assert res["n_cold_users"] == 0
    assert res["cold"] == {"HR@5": None, "NDCG@5": None, "MRR@5": None, "MRR": None}


def test_invalid_inputs_fail_loudly():
    u, v = as_vectors(SCORES)
    with pytest.raises(ValueError, match="targets"):
        ranks(u, v, HISTORIES, torch.tensor([3, 0, 1, 1]))
    nan_scores = SCORES.clone()
    nan_scores[1, 4] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        ranks(*as_vectors(nan_scores), HISTORIES, TARGETS)
    with pytest.raises(ValueError, match="histories"):
        ranks(u, v, HISTORIES[:3], TARGETS)
    with pytest.raises(ValueError, match="ks"):
        metrics_from_ranks(torch.tensor([1, 2]), ks=(0,))


def test_minus_inf_scores_are_allowed():
    # A score_fn may mask items itself with -inf: that is not a NaN and must rank normally.
    s = SCORES.clone()
    s[0, 2] = float("-inf")  # u0's only competitor is gone -> rank 1
    got = ranks(None, None, HISTORIES, TARGETS, score_fn=lambda idx: s[idx])
    assert got.tolist() == [1, 2, 5, 1]


def test_scores_never_exceed_batch_rows(monkeypatch):
    """The U x N score matrix is never built: each matmul produces at most batch_size rows."""
    shapes = []
    real = torch.matmul

    def counting(a, b, *args, **kw):
        res = real(a, b, *args, **kw)
        shapes.append(tuple(res.shape))
        return res

    monkeypatch.setattr(torch, "matmul", counting)
    g = torch.Generator().manual_seed(1)
    U, N = 50, 400
    u, v = torch.randn(U, 8, generator=g), torch.randn(N + 1, 8, generator=g)
    targets = torch.randint(1, N + 1, (U,), generator=g)
    ranks(u, v, [[] for _ in range(U)], targets, batch_size=8)
    assert len(shapes) == math.ceil(U / 8)
    assert max(s[0] for s in shapes) == 8 and all(s[1] == N + 1 for s in shapes)


def test_scale_bounded_and_fast():
    """U = 10K users x N = 100K items, d = 32, in batches of 256: about 3 s on 2 CPU cores.

    The figure is printed (``-s``), not asserted: timings belong to benchmarks, not to tests.
    """
    g = torch.Generator().manual_seed(0)
    U, N, d = 10_000, 100_000, 32
    u = torch.randn(U, d, generator=g)
    v = torch.randn(N + 1, d, generator=g)
    targets = torch.randint(1, N + 1, (U,), generator=g)
    histories = torch.randint(0, N + 1, (U, 20), generator=g)
    start = time.perf_counter()
    r = ranks(u, v, histories, targets, batch_size=256)
    seconds = time.perf_counter() - start
    print(f"full ranking {U} users x {N} items: {seconds:.2f} s, {U / seconds:.0f} users/s")
    assert r.shape == (U,) and r.min() >= 1 and r.max() <= N
    # Spot-check some users against a direct computation
    for i in [1, 3, 999, 4001, U - 1]:
        s = u[i] @ v.T
        assert int(targets[i]) not in histories[i].tolist()
        removed = {0} | set(histories[i].tolist())
        keep = torch.ones(N + 1, dtype=torch.bool)
        keep[list(removed)] = False
        keep[targets[i]] = False
        assert r[i] == 1 + int((s[keep] >= s[targets[i]]).sum())


def test_config_accepts_exactly_the_history_modes_evaluation_implements():
    # one definition (mmrec.config, which must not import torch), and ranks() implements each mode
    from mmrec import config, evaluation

    assert evaluation.HISTORY_MODES is config.HISTORY_MODES
    for mode in config.HISTORY_MODES:
        assert config.EvaluationConfig(history=mode).history == mode
        ranks(torch.eye(3)[1:], torch.eye(3), [[1], [2]], torch.tensor([2, 1]), history=mode)
    with pytest.raises(ValueError, match="history must be one of"):
        config.EvaluationConfig(history="all_but_target")
