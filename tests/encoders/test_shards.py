"""Sharded cache builds: two workers' shards merged give the features of one unsharded build; a
worker killed mid-shard resumes from its finished chunks; the merge waits for every worker."""

from __future__ import annotations

import pytest
import torch

from mmrec.encoders import shards
from mmrec.encoders.cache import text_features
from mmrec.encoders.shards import build_shard, merge_shards, shard_bounds
from tests.encoders.test_cache import KEYS, TEXTS, text_encoder


@pytest.fixture(scope="module")
def enc():
    return text_encoder()


def test_shard_bounds_split_every_item_once():
    got = [shard_bounds(20, w, 3) for w in range(3)]
    assert got == [(0, 7), (7, 14), (14, 20)]
    with pytest.raises(ValueError, match="worker must be in 0..2"):
        shard_bounds(20, 3, 3)
    with pytest.raises(ValueError, match="n_workers"):
        shard_bounds(20, 0, 0)


def test_two_workers_then_merge_equal_one_build(enc, tmp_path):
    reports = [build_shard("text", enc, TEXTS, KEYS, tmp_path, w, 2, chunk_size=4) for w in range(2)]
    assert [r["chunks"] for r in reports] == [3, 3] and sum(r["computed"] for r in reports) == 17  # 20 - 3 blank
    merged = merge_shards("text", enc, tmp_path, 2)
    assert merged == {"added": 17, "rows": 17}
    assert not (tmp_path / shards.SHARDS / f"text-v2-{enc.fingerprint()}").exists()
    served = text_features(enc, TEXTS, KEYS, tmp_path, progress=False)
    assert served.stats.computed == 0 and served.stats.hits == 17  # everything from the merged cache
    direct = text_features(enc, TEXTS, KEYS, None, progress=False)
    for name, t in direct.tensors.items():
        assert torch.equal(served.tensors[name], t), name
    # a second sharded build finds everything in the shared cache: nothing to encode, nothing added
    again = build_shard("text", enc, TEXTS, KEYS, tmp_path, 0, 1)
    assert again["items"] == 3 and again["computed"] == 0  # only the 3 blank texts are left to look at
    assert merge_shards("text", enc, tmp_path, 1)["added"] == 0


def test_a_killed_worker_resumes_from_its_finished_chunks(enc, tmp_path, monkeypatch):
    real, calls = shards.text_features, []

    def dying(*a, **k):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt("killed")  # the second chunk never finishes
        return real(*a, **k)

    monkeypatch.setattr(shards, "text_features", dying)
    with pytest.raises(KeyboardInterrupt):
        build_shard("text", enc, TEXTS, KEYS, tmp_path, 0, 2, chunk_size=4)
    monkeypatch.setattr(shards, "text_features", real)
    with pytest.raises(RuntimeError, match=r"worker\(s\) \[0, 1\] of 2 have not finished"):
        merge_shards("text", enc, tmp_path, 2)
    resumed = build_shard("text", enc, TEXTS, KEYS, tmp_path, 0, 2, chunk_size=4)
    assert resumed["chunks"] == 3 and resumed["hits"] == 4 and resumed["computed"] == 4  # chunk 0 kept (items 4 and 9 have no text)
    build_shard("text", enc, TEXTS, KEYS, tmp_path, 1, 2, chunk_size=4)
    assert merge_shards("text", enc, tmp_path, 2)["added"] == 17


def test_bad_arguments_are_errors(enc, tmp_path):
    with pytest.raises(ValueError, match="modality"):
        build_shard("audio", enc, TEXTS, KEYS, tmp_path, 0, 1)
    with pytest.raises(ValueError, match="chunk_size"):
        build_shard("text", enc, TEXTS, KEYS, tmp_path, 0, 1, chunk_size=0)
    with pytest.raises(ValueError, match="20 values but 19 keys"):
        build_shard("text", enc, TEXTS, KEYS[:-1], tmp_path, 0, 1)
