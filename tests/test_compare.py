"""Paired comparisons over users: per-user metrics from ranks, bootstrap intervals, verdicts."""

from __future__ import annotations

import math

import numpy as np
import pytest

from mmrec.compare import compare_ranks, paired_bootstrap, paired_gaps, per_user


def test_per_user_metrics_hand_computed():
    r = np.array([1, 2, 10, 11])
    assert per_user(r, "HR@10").tolist() == [1, 1, 1, 0]
    assert per_user(r, "NDCG@10") == pytest.approx([1, 1 / math.log2(3), 1 / math.log2(11), 0])
    assert per_user(r, "MRR@10") == pytest.approx([1, 0.5, 0.1, 0])
    with pytest.raises(ValueError, match="metric must be"):
        per_user(r, "recall@10")
    with pytest.raises(ValueError, match="1-based"):
        per_user(np.array([0, 1]), "HR@10")


def test_identical_models_have_a_zero_gap_and_no_verdict():
    r = np.random.default_rng(0).integers(1, 50, 300)
    g = compare_ranks([r], [r], "NDCG@10", "a", "b")
    assert g.gap == 0 and g.low == 0 and g.high == 0
    assert g.verdict == "no measurable difference"


def test_a_clear_gain_is_ahead_and_a_noisy_one_is_not():
    rng = np.random.default_rng(1)
    U = 2000
    b = rng.integers(1, 100, U)
    better = np.maximum(1, b - 30)  # every user ranked better
    g = compare_ranks([better], [b], "HR@10", "new", "old")
    assert g.verdict == "ahead" and g.low > 0 and g.relative > 0
    # a few users swapped at random: the interval must straddle zero
    noisy = b.copy()
    swap = rng.choice(U, 20, replace=False)
    noisy[swap] = rng.integers(1, 100, 20)
    g = compare_ranks([noisy], [b], "HR@10", "noisy", "old")
    assert g.low < 0 < g.high or g.gap == 0
    assert compare_ranks([b], [better], "HR@10").verdict == "behind"


def test_interval_matches_the_normal_approximation():
    rng = np.random.default_rng(2)
    a, b = rng.normal(0.1, 1, 5000), rng.normal(0, 1, 5000)
    mean, low, high = paired_bootstrap(a, b, n_boot=4000, seed=3)
    se = (a - b).std(ddof=1) / math.sqrt(a.size)
    assert mean == pytest.approx((a - b).mean())
    assert low == pytest.approx(mean - 1.96 * se, abs=0.2 * se)
    assert high == pytest.approx(mean + 1.96 * se, abs=0.2 * se)


def test_seeds_are_averaged_per_user_before_resampling():
    # model a hits every user in seed 0 and none in seed 1: per user 0.5; b always 0.25 of users
    U = 400
    a = [np.ones(U, dtype=int), np.full(U, 100)]
    b_r = np.where(np.arange(U) % 4 == 0, 1, 100)
    g = compare_ranks(a, [b_r, b_r], "HR@10", "a", "b")
    assert g.mean_a == pytest.approx(0.5) and g.mean_b == pytest.approx(0.25) and g.n_seeds == 2
    with pytest.raises(ValueError, match="same number"):
        compare_ranks(a, [b_r], "HR@10")


def test_paired_gaps_against_every_other_model():
    r = np.arange(1, 101)
    gaps = paired_gaps({"finetuned": [r], "sasrec": [r + 1], "scratch": [r]}, n_boot=200)
    assert [(g.a, g.b) for g in gaps] == [("finetuned", "sasrec"), ("finetuned", "scratch")]
    assert "finetuned - sasrec: NDCG@10" in gaps[0].line()
    with pytest.raises(ValueError, match="no ranks of"):
        paired_gaps({"sasrec": [r]})
