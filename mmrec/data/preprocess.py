"""The papers' preprocessing: repeats, length filter, last L+3 items, re-indexing, leave-one-out split.

Protocol (PMMRec / NineRec, ``../shared/reference/papers.md``): apply the repeats policy
(``preprocess.repeats``, default ``drop_all``: each user-item pair once, as in the papers' data;
``PreprocessConfig`` says why); drop users with fewer than ``min_seq_len`` interactions; keep each
user's last ``L + 3`` interactions; re-index items 1..N (0 is padding) and users 0..U-1, saving
both maps; split leave-one-out: train on ``seq[:-2]``, validate on ``seq[-2]``, test on
``seq[-1]``. Deterministic: ids are sorted before indexing, so the same catalog always gives the
same indices. Every step's removals are counted (``Preprocessed.changes``) for the report.

For data-size studies a domain may keep a share of its users (``user_fraction``, the domain's
``user_fraction`` in the config): a fixed-seed sample of the users the length filter kept, nested
(a smaller share is a subset of a larger one).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import math

import numpy as np
import polars as pl

from mmrec.data.catalog import Catalog

PAD = 0

REPEATS = ("keep", "drop_consecutive", "drop_all")

USER_SAMPLE_SEED = 0
"""Seed of the permutation ``sample_users`` draws (fixed: every run of a data-size study sees the
same users, whatever its training seed)."""


@dataclass(frozen=True)
class PreprocessConfig:
    """The papers' preprocessing (PMMRec / NineRec protocol).

    Order: repeats (``repeats``), then the length filter (``min_seq_len``, counted after repeats),
    then the last L+3, then the leave-one-out split. What each step removed is counted in
    ``validation.md`` and ``stats.json``.

    Why ``repeats: drop_all`` by default: the papers (and RecBole) rank the full catalog with every
    item of the user's history masked. A target already in the history is then masked out and can
    never be hit, so it only lowers every model's score by the same unreachable share (5% of the
    test targets of a real Amazon domain). NineRec/PMMRec ship data in which each user-item pair
    occurs once after their preprocessing; ``drop_all`` (keep the first time a user met an item)
    gives exactly that, and every target is reachable. ``drop_consecutive`` removes only A A -> A,
    so A B A still leaves an unreachable target; ``keep`` suits only repeat-aware evaluation
    (``evaluation.history: keep_all``).
    """

    min_seq_len: int = 5
    """Drop users with fewer interactions, after repeats are handled (PMMRec uses 3, NineRec 5).
    The one length rule: validation has no minimum of its own."""
    max_seq_len: int = 20
    """L, the longest training history; each user keeps the last L+3 interactions. A user's
    training sequence (up to L+1 items) must fit in one training row of the model, so L <=
    ``model.max_len`` for a causal user encoder and L <= ``model.max_len + bce_positives - 1`` for
    a bidirectional one (``ModelConfig.check_history_length``, checked when ``model`` is read)."""
    repeats: str = "drop_all"
    """What to do when a user interacts with the same item again: ``drop_all`` (keep each
    user-item pair's first interaction), ``drop_consecutive`` (only collapse immediate repeats,
    A A -> A) or ``keep``. See the class docstring for why ``drop_all`` is the default."""

    def __post_init__(self):
        if self.min_seq_len < 3:
            raise ValueError(f"min_seq_len must be >= 3 for a leave-one-out split, got {self.min_seq_len}")
        if self.max_seq_len < 1:
            raise ValueError(f"max_seq_len must be >= 1, got {self.max_seq_len}")
        if self.repeats not in REPEATS:
            raise ValueError(f"repeats must be one of {list(REPEATS)}, got {self.repeats!r}")

    @property
    def keep_last(self) -> int:
        """How many of each user's most recent interactions are kept (L + 3)."""
        return self.max_seq_len + 3


@dataclass
class Preprocessed:
    """A preprocessed domain: the kept catalog plus maps and splits."""

    catalog: Catalog
    """Kept items (with ``item_idx``) and interactions (with ``user_idx``, ``item_idx``)."""
    item_map: pl.DataFrame
    """item_idx (1..N) -> item_id."""
    user_map: pl.DataFrame
    """user_idx (0..U-1) -> user_id."""
    splits: pl.DataFrame
    """user_idx, train (list of item_idx, oldest first), valid, test."""
    dropped_users: int
    """Users with fewer than ``min_seq_len`` interactions (after repeats), dropped."""
    changes: dict[str, int | str] = field(default_factory=dict)
    """What each step removed, for ``validation.md`` and ``stats.json`` (see ``preprocess``)."""


def drop_repeats(interactions: pl.DataFrame, policy: str) -> pl.DataFrame:
    """``interactions`` (sorted by user, then time) without the repeats ``policy`` removes.

    ``drop_all`` keeps the first interaction of each user-item pair; ``drop_consecutive`` drops an
    interaction with the same item as the user's previous one; ``keep`` keeps everything.
    """
    if policy == "keep":
        return interactions
    if policy == "drop_all":
        first = pl.col("item_id").is_first_distinct().over("user_id")
        return interactions.filter(first)
    if policy == "drop_consecutive":
        same = (pl.col("item_id") == pl.col("item_id").shift(1)).over("user_id").fill_null(False)
        return interactions.filter(~same)
    raise ValueError(f"unknown repeats policy {policy!r}")


def sample_users(user_ids: pl.Series, fraction: float) -> pl.Series:
    """The first ``ceil(fraction * U)`` of ``user_ids`` in a permutation of their sorted order drawn
    with ``USER_SAMPLE_SEED``: deterministic, at least one user, and nested (for the same users a
    smaller ``fraction`` keeps a subset of what a larger one keeps)."""
    if isinstance(fraction, bool) or not isinstance(fraction, (int, float)) or not 0.0 < fraction <= 1.0:
        raise ValueError(f"user_fraction must be in (0, 1], got {fraction!r}")
    ids = user_ids.sort()
    if fraction == 1.0:
        return ids
    order = np.random.default_rng(USER_SAMPLE_SEED).permutation(ids.len())
    return ids.gather(np.sort(order[: math.ceil(fraction * ids.len())]))


def preprocess(catalog: Catalog, cfg: PreprocessConfig, user_fraction: float = 1.0) -> Preprocessed:
    """``catalog`` preprocessed by ``cfg``; with ``user_fraction < 1`` only a fixed-seed share of the
    users long enough is kept (``sample_users``; counted in ``changes`` as ``users_sampled_out``)."""
    # most recent last: sort here rather than trust the caller (ties keep their source order)
    raw = catalog.interactions.sort(["user_id", "timestamp"], maintain_order=True)
    inter = drop_repeats(raw, cfg.repeats)
    repeated_users = raw.group_by("user_id").len().join(
        inter.group_by("user_id").len(), on="user_id", how="left", suffix="_kept").filter(pl.col("len") != pl.col("len_kept").fill_null(0))
    lengths = inter.group_by("user_id").len()
    keep_users = lengths.filter(pl.col("len") >= cfg.min_seq_len)["user_id"]
    if keep_users.len() == 0:
        after = f" (after preprocess.repeats = {cfg.repeats!r} dropped {raw.height - inter.height})" if raw.height > inter.height else ""
        raise ValueError(
            f"domain {catalog.domain!r}: no user has >= {cfg.min_seq_len} interactions "
            f"(preprocess.min_seq_len); longest has {lengths['len'].max()}{after}"
        )
    n_long_enough = keep_users.len()
    keep_users = sample_users(keep_users, user_fraction)
    long_enough = inter.filter(pl.col("user_id").is_in(keep_users.implode()))
    # stored order is (user, timestamp) with stable ties, so tail() keeps the most recent ones
    inter = long_enough.group_by("user_id", maintain_order=True).tail(cfg.keep_last)
    changes = {
        "repeats": cfg.repeats,
        "repeats_dropped": raw.height - lengths["len"].sum(),
        "users_with_repeats_dropped": repeated_users.height,
        "min_seq_len": cfg.min_seq_len,
        "short_users_dropped": lengths.height - n_long_enough,
        "short_user_interactions_dropped": lengths.filter(pl.col("len") < cfg.min_seq_len)["len"].sum(),
        "keep_last": cfg.keep_last,
        "older_interactions_cut": long_enough.height - inter.height,
    }
    if user_fraction < 1.0:  # absent otherwise: a full domain's report and stats stay as they were
        changes |= {"user_fraction": str(user_fraction), "users_sampled_out": n_long_enough - keep_users.len()}

    item_map = inter.select(pl.col("item_id").unique().sort()).with_row_index("item_idx", offset=1)
    user_map = inter.select(pl.col("user_id").unique().sort()).with_row_index("user_idx")
    item_map = item_map.with_columns(pl.col("item_idx").cast(pl.Int64))
    user_map = user_map.with_columns(pl.col("user_idx").cast(pl.Int64))
    inter = inter.join(user_map, on="user_id", how="left", maintain_order="left").join(
        item_map, on="item_id", how="left", maintain_order="left"
    )
    inter = inter.sort(["user_idx", "timestamp"], maintain_order=True)

    seqs = inter.group_by("user_idx", maintain_order=True).agg(pl.col("item_idx").alias("seq"))
    splits = seqs.select(
        "user_idx",
        pl.col("seq").list.slice(0, pl.col("seq").list.len() - 2).alias("train"),
        pl.col("seq").list.get(-2).alias("valid"),
        pl.col("seq").list.get(-1).alias("test"),
    ).sort("user_idx")

    items = catalog.items.join(item_map, on="item_id", how="inner").sort("item_idx")
    kept = Catalog(catalog.domain, items, inter, catalog.text_fields, catalog.images, catalog.source)
    return Preprocessed(kept, item_map, user_map, splits, dropped_users=lengths.height - n_long_enough,
                        changes={k: v if isinstance(v, str) else int(v) for k, v in changes.items()})
