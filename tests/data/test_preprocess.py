"""Preprocessing by the papers' protocol, on a catalog small enough to work out by hand.

With ``min_seq_len=3`` and ``max_seq_len=2`` (each user keeps the last L+3 = 5 interactions):

    user  raw sequence (timestamp)                                 kept
    u2    old@10 a@20 c2@30 d@40 a@50 e@60 b@70                     c2 d a e b   (7 > 5: oldest 2 cut)
    u10   d@5 c10@5 b@9                                             d c10 b      (tie at 5: source order)
    u0    e@2 d@2 c10@3 a@4 b@5 c2@6                                d c10 a b c2 (tie at the cut: e goes)
    u3    only3@1 a@2                                               dropped      (2 < min_seq_len)

Kept items a, b, c10, c2, d, e -> item_idx 1..6 in sorted (string) order; ``old`` (cut), ``only3``
(dropped user) and ``unused`` (never seen) leave the catalog. Kept users u0, u10, u2 -> 0, 1, 2.
"""

from __future__ import annotations

import random
from pathlib import Path

import polars as pl
import pytest

from mmrec.config import PreprocessConfig
from mmrec.data.catalog import INTERACTION_COLUMNS, ITEM_COLUMNS, Catalog, sort_interactions
from mmrec.data.images import ImageStore
from mmrec.data.preprocess import PAD, preprocess

CFG = PreprocessConfig(min_seq_len=3, max_seq_len=2, repeats="keep")  # the hand-worked example keeps u2's repeated a

ITEM_IDS = ["unused", "e", "c2", "b", "only3", "a", "old", "d", "c10"]  # deliberately not sorted

# (user_id, item_id, timestamp), in source order
ROWS = [
    ("u2", "old", 10), ("u2", "a", 20), ("u2", "c2", 30), ("u2", "d", 40),
    ("u2", "a", 50), ("u2", "e", 60), ("u2", "b", 70),
    ("u10", "d", 5), ("u10", "c10", 5), ("u10", "b", 9),
    ("u0", "e", 2), ("u0", "d", 2), ("u0", "c10", 3), ("u0", "a", 4), ("u0", "b", 5), ("u0", "c2", 6),
    ("u3", "only3", 1), ("u3", "a", 2),
]

ITEM_IDX = {"a": 1, "b": 2, "c10": 3, "c2": 4, "d": 5, "e": 6}
USER_IDX = {"u0": 0, "u10": 1, "u2": 2}
KEPT = {  # user -> kept item ids, oldest first
    "u0": ["d", "c10", "a", "b", "c2"],
    "u10": ["d", "c10", "b"],
    "u2": ["c2", "d", "a", "e", "b"],
}


def _items(ids: list[str]) -> pl.DataFrame:
    return pl.DataFrame(
        {
            "item_id": ids,
            "title": [f"title of {i}" for i in ids],
            "image": [None if i == "e" else f"{i}.png" for i in ids],
            "source_row": list(range(2, len(ids) + 2)),
        },
        schema={**ITEM_COLUMNS, "title": pl.String},
    )


def _interactions(rows: list[tuple[str, str, int]], source_rows: list[int] | None = None) -> pl.DataFrame:
    users, items, times = zip(*rows)
    return pl.DataFrame(
        {"user_id": users, "item_id": items, "timestamp": times,
         "source_row": source_rows or list(range(2, len(rows) + 2))},
        schema=INTERACTION_COLUMNS,
    )


def _catalog(rows=ROWS, item_ids=ITEM_IDS, source_rows=None) -> Catalog:
    # importers store interactions sorted by user, then timestamp (stable): the catalog contract
    return Catalog(
        "shop", _items(item_ids), sort_interactions(_interactions(rows, source_rows)), ["title"],
        ImageStore("files", Path("/nonexistent/images")), {"importer": "test"},
    )


@pytest.fixture(scope="module")
def pre():
    return preprocess(_catalog(), CFG)


def test_short_users_are_dropped_and_counted(pre):
    assert pre.dropped_users == 1
    assert "u3" not in pre.user_map["user_id"].to_list()
    assert "u3" not in pre.catalog.interactions["user_id"].to_list()


def test_user_map_indexes_sorted_user_ids_from_zero(pre):
    assert pre.user_map.schema == pl.Schema({"user_idx": pl.Int64, "user_id": pl.String})
    assert pre.user_map.rows() == [(0, "u0"), (1, "u10"), (2, "u2")]


def test_item_map_indexes_sorted_item_ids_from_one(pre):
    assert PAD == 0
    assert pre.item_map.schema == pl.Schema({"item_idx": pl.Int64, "item_id": pl.String})
    assert pre.item_map.rows() == [(1, "a"), (2, "b"), (3, "c10"), (4, "c2"), (5, "d"), (6, "e")]


def test_only_the_last_l_plus_3_interactions_are_kept(pre):
    inter = pre.catalog.interactions
    got = {u: g.sort("timestamp", maintain_order=True)["item_id"].to_list()
           for (u,), g in inter.group_by("user_id", maintain_order=True)}
    assert got == KEPT
    assert inter.height == 13
    # the cut takes the most recent by timestamp: u2 keeps 30..70, u0 keeps all but the first tie at 2
    assert inter.filter(pl.col("user_id") == "u2")["timestamp"].to_list() == [30, 40, 50, 60, 70]
    assert inter.filter(pl.col("user_id") == "u0")["source_row"].to_list() == [13, 14, 15, 16, 17]


def test_kept_interactions_carry_both_indices_sorted_by_user_then_time(pre):
    inter = pre.catalog.interactions
    assert inter["user_idx"].to_list() == [0] * 5 + [1] * 3 + [2] * 5
    expected = [ITEM_IDX[i] for u in ("u0", "u10", "u2") for i in KEPT[u]]
    assert inter["item_idx"].to_list() == expected
    assert inter["item_idx"].min() >= 1  # 0 is padding, never an item
    for row in inter.iter_rows(named=True):
        assert USER_IDX[row["user_id"]] == row["user_idx"]
        assert ITEM_IDX[row["item_id"]] == row["item_idx"]


def test_splits_are_leave_one_out(pre):
    # u0: d c10 a b c2 = 5 3 1 2 4; u10: d c10 b = 5 3 2; u2: c2 d a e b = 4 5 1 6 2
    assert pre.splits.columns == ["user_idx", "train", "valid", "test"]
    assert pre.splits.rows() == [
        (0, [5, 3, 1], 2, 4),
        (1, [5], 3, 2),
        (2, [4, 5, 1], 6, 2),
    ]


def test_ties_keep_source_order(pre):
    # u10's d and c10 share timestamp 5: d came first in the source, so it is first in train
    assert pre.splits.filter(pl.col("user_idx") == 1)["train"].to_list() == [[ITEM_IDX["d"]]]


def test_kept_catalog_has_only_items_of_kept_interactions(pre):
    items = pre.catalog.items
    assert items["item_id"].to_list() == ["a", "b", "c10", "c2", "d", "e"]  # sorted by item_idx
    assert items["item_idx"].to_list() == [1, 2, 3, 4, 5, 6]
    # the other columns travel with their item
    assert items.filter(pl.col("item_id") == "c10")["title"].item() == "title of c10"
    assert items.filter(pl.col("item_id") == "e")["image"].item() is None
    assert items.filter(pl.col("item_id") == "d")["source_row"].item() == ITEM_IDS.index("d") + 2


def test_kept_catalog_keeps_domain_fields_and_store(pre):
    cat = pre.catalog
    assert cat.domain == "shop"
    assert cat.text_fields == ["title"]
    assert cat.images == ImageStore("files", Path("/nonexistent/images"))
    assert cat.source == {"importer": "test"}


def test_max_seq_len_large_keeps_everything_of_long_enough_users():
    pre = preprocess(_catalog(), PreprocessConfig(min_seq_len=3, max_seq_len=20, repeats="keep"))
    assert pre.catalog.interactions.height == 7 + 3 + 6  # u3 still dropped
    assert "old" in pre.item_map["item_id"].to_list()
    assert pre.splits.filter(pl.col("user_idx") == 2)["train"].item().len() == 5


def test_min_seq_len_counts_raw_interactions():
    # u10 has exactly 3, u0 6, u2 7: min 6 keeps only u0 and u2
    pre = preprocess(_catalog(), PreprocessConfig(min_seq_len=6, max_seq_len=2))
    assert pre.dropped_users == 2
    assert pre.user_map["user_id"].to_list() == ["u0", "u2"]
    assert pre.user_map["user_idx"].to_list() == [0, 1]


def test_no_user_long_enough_is_an_error():
    with pytest.raises(ValueError, match=r"domain 'shop': no user has >= 8 interactions \(preprocess.min_seq_len\); longest has 7"):
        preprocess(_catalog(), PreprocessConfig(min_seq_len=8, repeats="keep"))
    with pytest.raises(ValueError, match=r"longest has 6 \(after preprocess.repeats = 'drop_all' dropped 1\)"):
        preprocess(_catalog(), PreprocessConfig(min_seq_len=7))


def _outputs(p):
    return (p.item_map.rows(), p.user_map.rows(), p.splits.rows(), p.dropped_users,
            p.catalog.items.rows(), p.catalog.interactions.rows())


def test_same_catalog_gives_identical_outputs(pre):
    assert _outputs(preprocess(_catalog(), CFG)) == _outputs(pre)


# Without ties, any source order stores the same catalog once sorted by user and time: the two
# tied rows of ROWS move one tick later (timestamps doubled first, so no new tie appears).
ROWS_NO_TIES = [(u, i, 2 * t + ((u, i) in {("u10", "c10"), ("u0", "d")})) for u, i, t in ROWS]


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_shuffled_rows_give_identical_outputs(seed):
    rng = random.Random(seed)
    order = list(range(len(ROWS_NO_TIES)))
    rng.shuffle(order)
    rows = [ROWS_NO_TIES[k] for k in order]
    source_rows = [k + 2 for k in order]  # each row keeps the source row it came from
    ids = ITEM_IDS[:]
    rng.shuffle(ids)
    reference = preprocess(_catalog(ROWS_NO_TIES), CFG)
    shuffled = preprocess(_catalog(rows, ids, source_rows), CFG)
    assert shuffled.item_map.rows() == reference.item_map.rows()
    assert shuffled.user_map.rows() == reference.user_map.rows()
    assert shuffled.splits.rows() == reference.splits.rows()
    assert shuffled.catalog.interactions.rows() == reference.catalog.interactions.rows()
    assert shuffled.catalog.items.select("item_id", "item_idx").rows() == \
        reference.catalog.items.select("item_id", "item_idx").rows()


def test_unsorted_catalog_still_keeps_the_most_recent_interactions():
    rows = list(reversed(ROWS_NO_TIES))
    source_rows = list(reversed(range(2, len(rows) + 2)))
    unsorted = Catalog("shop", _items(ITEM_IDS), _interactions(rows, source_rows), ["title"])
    reference = preprocess(_catalog(ROWS_NO_TIES), CFG)
    assert preprocess(unsorted, CFG).splits.rows() == reference.splits.rows()


# -- repeats (issue 10): a re-consumed item used to stay without a word; with every history item
# masked in the ranking (the papers' protocol) such a target can never be hit
REPEATS_ROWS = [
    # u_stream: a b b c a d d: an immediate repeat (b b, d d) and a later one (a .. a)
    ("u_stream", "a", 1), ("u_stream", "b", 2), ("u_stream", "b", 3), ("u_stream", "c", 4),
    ("u_stream", "a", 5), ("u_stream", "d", 6), ("u_stream", "d", 7),
    # u_short: a a a b: three interactions with 2 distinct items, too short once repeats go
    ("u_short", "a", 1), ("u_short", "a", 2), ("u_short", "a", 3), ("u_short", "b", 4),
    ("u_plain", "a", 1), ("u_plain", "b", 2), ("u_plain", "c", 3), ("u_plain", "d", 4),
]


def _repeats_catalog() -> Catalog:
    return _catalog(REPEATS_ROWS, ["a", "b", "c", "d"])


def _sequences(pre) -> dict[str, list[str]]:
    ids = dict(pre.item_map.iter_rows())
    users = dict(pre.user_map.iter_rows())
    return {users[u]: [ids[i] for i in t] + [ids[v], ids[x]] for u, t, v, x in pre.splits.iter_rows()}


@pytest.mark.parametrize("policy, expected, dropped", [
    ("keep", {"u_stream": list("abbcadd"), "u_short": list("aaab"), "u_plain": list("abcd")}, 0),
    ("drop_consecutive", {"u_stream": list("abcad"), "u_plain": list("abcd")}, 2 + 2),
    ("drop_all", {"u_stream": list("abcd"), "u_plain": list("abcd")}, 3 + 2),
])
def test_repeats_policy(policy, expected, dropped):
    pre = preprocess(_repeats_catalog(), PreprocessConfig(min_seq_len=3, max_seq_len=20, repeats=policy))
    assert _sequences(pre) == expected
    assert pre.changes["repeats"] == policy and pre.changes["repeats_dropped"] == dropped


def test_default_policy_leaves_no_target_in_the_history():
    # regression: u_stream's valid and test items were both 'd', and the test target sat in its history
    cfg = PreprocessConfig(min_seq_len=3, max_seq_len=20)
    assert cfg.repeats == "drop_all"
    pre = preprocess(_repeats_catalog(), cfg)
    for user, t, v, x in pre.splits.iter_rows():
        assert v not in t and x not in t + [v], user


def test_what_each_step_removed_is_counted():
    pre = preprocess(_repeats_catalog(), PreprocessConfig(min_seq_len=3, max_seq_len=1))  # keeps the last 4
    assert pre.changes == {
        "repeats": "drop_all", "repeats_dropped": 5, "users_with_repeats_dropped": 2,
        "min_seq_len": 3, "short_users_dropped": 1, "short_user_interactions_dropped": 2,  # u_short: a b
        "keep_last": 4, "older_interactions_cut": 0,
    }
    assert pre.dropped_users == 1
    pre = preprocess(_repeats_catalog(), PreprocessConfig(min_seq_len=3, max_seq_len=1, repeats="keep"))
    assert pre.changes["older_interactions_cut"] == 3  # u_stream keeps b c a d d -> c a d d
    assert pre.changes["short_users_dropped"] == 0


def test_unknown_repeats_policy_lists_the_valid_ones():
    with pytest.raises(ValueError, match=r"repeats must be one of \['keep', 'drop_consecutive', 'drop_all'\], got 'dedup'"):
        PreprocessConfig(repeats="dedup")


# -- user_fraction: a fixed-seed, nested share of the users the length filter kept
def _many_users_catalog(n_users: int = 40) -> Catalog:
    rows = [(f"u{u:02d}", f"i{(u + t) % 9}", t) for u in range(n_users) for t in range(4)]
    rows += [("short", "i0", 0), ("short", "i1", 1)]  # dropped by the length filter, never sampled
    return _catalog(rows, [f"i{i}" for i in range(9)])


def test_user_fraction_keeps_a_nested_fixed_seed_share_of_long_enough_users():
    cfg = PreprocessConfig(min_seq_len=3, max_seq_len=20)
    full = preprocess(_many_users_catalog(), cfg)
    assert "users_sampled_out" not in full.changes and full.user_map.height == 40  # 1.0: as before
    kept = {}
    for f in (0.1, 0.25, 0.5):
        pre = preprocess(_many_users_catalog(), cfg, user_fraction=f)
        kept[f] = set(pre.user_map["user_id"].to_list())
        assert len(kept[f]) == {0.1: 4, 0.25: 10, 0.5: 20}[f]
        assert pre.changes["users_sampled_out"] == 40 - len(kept[f]) and pre.changes["user_fraction"] == str(f)
        assert pre.dropped_users == 1 and pre.changes["short_users_dropped"] == 1  # the short user, not the sampled-out
        assert pre.user_map["user_idx"].to_list() == list(range(len(kept[f])))  # re-indexed 0..U'-1
        assert set(pre.catalog.interactions["user_id"].unique().to_list()) == kept[f]
        assert _outputs(preprocess(_many_users_catalog(), cfg, user_fraction=f)) == _outputs(pre)  # deterministic
    assert kept[0.1] < kept[0.25] < kept[0.5]
    assert kept[0.5] != {f"u{u:02d}" for u in range(20)}  # a random sample, not the first ids


@pytest.mark.parametrize("bad", [0.0, -0.5, 1.5, True, "0.5"])
def test_user_fraction_out_of_range_is_an_error(bad):
    with pytest.raises(ValueError, match="user_fraction must be in"):
        preprocess(_many_users_catalog(), PreprocessConfig(min_seq_len=3), user_fraction=bad)
