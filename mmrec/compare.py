"""Paired comparisons of two models over the same users: per-user metrics from ranks, and a
bootstrap interval of the mean gap.

Why paired over users: two models evaluated on the same test users share most of their variance
(easy users are easy for both). Resampling *users* with the two models' values kept together gives
the interval of the gap itself, far tighter than the two rows' own spreads. With several seeds, a
user's value is first averaged over the seeds (the seeds' noise is then inside each user's value),
and users are resampled. A model is "ahead" only where the 95 % interval excludes zero.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

PER_USER_METRICS = ("HR", "NDCG", "MRR")


def per_user(ranks: np.ndarray, metric: str) -> np.ndarray:
    """``metric`` (``HR@k``, ``NDCG@k``, ``MRR@k``) of each user from 1-based ranks, as floats."""
    name, _, k = metric.partition("@")
    if name not in PER_USER_METRICS or not k.isdigit() or int(k) < 1:
        raise ValueError(f"metric must be one of {PER_USER_METRICS} @ k (e.g. NDCG@10), got {metric!r}")
    r = np.asarray(ranks, dtype=np.float64)
    if r.size and r.min() < 1:
        raise ValueError("ranks are 1-based")
    hit = r <= int(k)
    if name == "HR":
        return hit.astype(np.float64)
    if name == "NDCG":
        return np.where(hit, 1.0 / np.log2(r + 1.0), 0.0)
    return np.where(hit, 1.0 / r, 0.0)


@dataclass(frozen=True)
class PairedGap:
    """``a - b`` of a per-user metric, with its bootstrap interval over users."""

    metric: str
    a: str
    b: str
    mean_a: float
    mean_b: float
    gap: float
    low: float
    high: float
    n_users: int
    n_seeds: int
    confidence: float

    @property
    def verdict(self) -> str:
        """``ahead`` / ``behind`` when the interval excludes zero, else ``no measurable difference``."""
        if self.low > 0:
            return "ahead"
        if self.high < 0:
            return "behind"
        return "no measurable difference"

    @property
    def relative(self) -> float | None:
        """The gap as a share of ``b``'s mean (None when ``b`` is 0)."""
        return None if self.mean_b == 0 else self.gap / self.mean_b

    def line(self) -> str:
        rel = "" if self.relative is None else f" ({100 * self.relative:+.1f} %)"
        return (f"{self.a} - {self.b}: {self.metric} {100 * self.mean_a:.2f} vs {100 * self.mean_b:.2f}, gap "
                f"{100 * self.gap:+.2f}{rel}, {int(100 * self.confidence)} % interval [{100 * self.low:+.2f}, "
                f"{100 * self.high:+.2f}] over {self.n_users} users x {self.n_seeds} seeds: {self.verdict}")


def paired_bootstrap(a: np.ndarray, b: np.ndarray, n_boot: int = 10_000, confidence: float = 0.95,
                     seed: int = 0) -> tuple[float, float, float]:
    """Mean of ``a - b`` and its percentile bootstrap interval, resampling the paired rows.

    ``a`` and ``b`` are ``(U,)`` per-user values of two models on the same users (already averaged
    over seeds if there were several).
    """
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    if a.shape != b.shape or a.ndim != 1:
        raise ValueError(f"a and b must be (U,) arrays of the same users, got {a.shape} and {b.shape}")
    if a.size == 0:
        raise ValueError("no users to compare")
    if not 0 < confidence < 1 or n_boot < 1:
        raise ValueError("confidence must be in (0, 1) and n_boot >= 1")
    diff = a - b
    rng = np.random.default_rng(seed)
    means = np.empty(n_boot)
    chunk = max(1, 2_000_000 // diff.size)  # bounded memory: (chunk, U) indices at a time
    for lo in range(0, n_boot, chunk):
        idx = rng.integers(0, diff.size, size=(min(chunk, n_boot - lo), diff.size))
        means[lo:lo + idx.shape[0]] = diff[idx].mean(axis=1)
    alpha = (1 - confidence) / 2
    low, high = np.quantile(means, [alpha, 1 - alpha])
    return float(diff.mean()), float(low), float(high)


def compare_ranks(ranks_a: list[np.ndarray], ranks_b: list[np.ndarray], metric: str = "NDCG@10", a: str = "a",
                  b: str = "b", n_boot: int = 10_000, confidence: float = 0.95, seed: int = 0) -> PairedGap:
    """Paired gap of ``a`` over ``b``: one ``(U,)`` rank array per seed for each model, same users
    in the same order; per-user metric averaged over seeds, then bootstrapped over users."""
    if len(ranks_a) != len(ranks_b) or not ranks_a:
        raise ValueError(f"need the same number (>= 1) of seeds for both models, got {len(ranks_a)} and {len(ranks_b)}")
    va = np.mean([per_user(r, metric) for r in ranks_a], axis=0)
    vb = np.mean([per_user(r, metric) for r in ranks_b], axis=0)
    gap, low, high = paired_bootstrap(va, vb, n_boot, confidence, seed)
    return PairedGap(metric, a, b, float(va.mean()), float(vb.mean()), gap, low, high, int(va.size), len(ranks_a),
                     confidence)


def paired_gaps(ranks: dict[str, list[np.ndarray]], reference: str = "finetuned", metric: str = "NDCG@10",
                n_boot: int = 10_000, confidence: float = 0.95, seed: int = 0) -> list[PairedGap]:
    """``reference`` against every other model of ``ranks`` (model -> one rank array per seed)."""
    if reference not in ranks:
        raise ValueError(f"no ranks of {reference!r}; models: {sorted(ranks)}")
    return [compare_ranks(ranks[reference], r, metric, reference, name, n_boot, confidence, seed)
            for name, r in ranks.items() if name != reference]
