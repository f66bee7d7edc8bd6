"""Sharded feature-cache builds: ``W`` workers encode disjoint parts of a catalog in parallel, each
into files of its own, and one merge appends everything to the shared cache (``mmrec.encoders.cache``).

Worker ``w`` of ``W`` takes the ``w``-th contiguous slice of the items (``shard_bounds``) and
encodes it in chunks of ``chunk_size`` items, each chunk into a cache pair of its own::

    <cache_dir>/shards/<modality>-v<version>-<fingerprint>/<w>-of-<W>/chunk-<c>/<modality>-v<version>-<fingerprint>.{safetensors,json}
    <cache_dir>/shards/<modality>-v<version>-<fingerprint>/<w>-of-<W>/done.json      written when all its chunks are

A chunk's files are written atomically once the chunk is encoded (the cache's own ``append``), so a
worker killed mid-run loses at most the chunk it was on: rerun, it finds its finished chunks whole
(every item a cache hit, nothing encoded) and goes on. ``merge_shards`` refuses to run before every
worker's ``done.json`` exists, then appends the rows the shared cache lacks in one atomic write and
removes the shard folder; the shared cache keeps its single-writer rule (one merge at a time).

Text items already in the shared cache are skipped before encoding (their content key is the
text's hash); image items are hashed while read, so a worker re-encodes images the shared cache
already holds only when its own chunk files are gone.
"""

from __future__ import annotations

import contextlib
import json
import shutil
from pathlib import Path
from typing import Any

import torch

from mmrec.encoders.cache import CACHE_VERSION, _Cache, _digest, image_features, text_features
from mmrec.io import write_json

SHARDS = "shards"
DONE = "done.json"


def shard_bounds(n: int, worker: int, n_workers: int) -> tuple[int, int]:
    """``[start, stop)`` of worker ``worker``'s contiguous slice of ``n`` items."""
    if isinstance(n_workers, bool) or not isinstance(n_workers, int) or n_workers < 1:
        raise ValueError(f"n_workers must be a positive integer, got {n_workers!r}")
    if not 0 <= worker < n_workers:
        raise ValueError(f"worker must be in 0..{n_workers - 1}, got {worker!r}")
    base, extra = divmod(n, n_workers)
    start = worker * base + min(worker, extra)
    return start, start + base + (worker < extra)


def _root(cache_dir: Path, modality: str, fingerprint: str) -> Path:
    return Path(cache_dir) / SHARDS / f"{modality}-v{CACHE_VERSION}-{fingerprint}"


def _spec(modality: str, encoder) -> dict:
    if modality == "text":
        T, H = encoder.cfg.max_length, encoder.hidden_size
        return {"hidden": (torch.float16, (T, H)), "mask": (torch.bool, (T,))}
    if encoder.cfg.trainable_blocks == 0:
        return {"tokens": (torch.float16, (encoder.num_tokens, encoder.out_dim)), "pooled": (torch.float16, (encoder.out_dim,))}
    return {"hidden": (torch.float16, None)}


def build_shard(modality: str, encoder, values: list, keys: list[str], cache_dir: Path, worker: int, n_workers: int,
                chunk_size: int = 10_000, store=None, batch_size: int = 64, num_workers: int = 0) -> dict[str, Any]:
    """Encode worker ``worker``'s slice of ``values`` (texts, or image references in ``store``) with
    ``encoder`` into its shard folder; returns ``{"items", "chunks", "computed", "hits"}`` of this call."""
    if modality not in ("text", "image"):
        raise ValueError(f"modality must be 'text' or 'image', got {modality!r}")
    if len(values) != len(keys):
        raise ValueError(f"got {len(values)} values but {len(keys)} keys")
    if isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1:
        raise ValueError(f"chunk_size must be a positive integer, got {chunk_size!r}")
    fingerprint = encoder.fingerprint()
    folder = _root(cache_dir, modality, fingerprint) / f"{worker}-of-{n_workers}"
    start, stop = shard_bounds(len(values), worker, n_workers)
    idx = list(range(start, stop))
    if modality == "text":  # skip what the shared cache already holds
        shared = _Cache(Path(cache_dir), "text", fingerprint, _spec("text", encoder)).entries
        idx = [i for i in idx if not (values[i] and values[i].strip()) or f"{str(keys[i])}:{_digest(values[i].encode('utf-8'))}" not in shared]
    report = {"items": len(idx), "chunks": 0, "computed": 0, "hits": 0}
    for c, s in enumerate(range(0, len(idx), chunk_size)):
        part = idx[s:s + chunk_size]
        vals, ks = [values[i] for i in part], [str(keys[i]) for i in part]
        where = folder / f"chunk-{c:06d}"
        if modality == "text":
            f = text_features(encoder, vals, ks, where, batch_size=batch_size, progress=False)
        else:
            f = image_features(encoder, vals, ks, store, where, batch_size=batch_size, num_workers=num_workers,
                               progress=False)
        report["chunks"] += 1
        report["computed"] += f.stats.computed
        report["hits"] += f.stats.hits
    write_json(folder / DONE, {"worker": worker, "n_workers": n_workers, "chunks": report["chunks"],
                               "items": report["items"]})
    return report


def merge_shards(modality: str, encoder, cache_dir: Path, n_workers: int) -> dict[str, Any]:
    """Append every worker's rows that the shared cache lacks to it (one atomic write) and remove the
    shard folder; returns ``{"added", "rows"}``. Fails, listing them, while a worker is unfinished."""
    fingerprint = encoder.fingerprint()
    root = _root(cache_dir, modality, fingerprint)
    folders = [root / f"{w}-of-{n_workers}" for w in range(n_workers)]
    missing = [w for w, f in enumerate(folders) if not (f / DONE).is_file()]
    if missing:
        raise RuntimeError(f"cannot merge {root}: worker(s) {missing} of {n_workers} have not finished "
                           "(rerun them: finished chunks are kept)")
    shared = _Cache(Path(cache_dir), modality, fingerprint, _spec(modality, encoder))
    keys: list[str] = []
    parts: dict[str, list[torch.Tensor]] = {}
    seen = set(shared.entries)
    for folder in folders:
        n_chunks = json.loads((folder / DONE).read_text(encoding="utf-8"))["chunks"]
        for c in range(n_chunks):
            chunk = _Cache(folder / f"chunk-{c:06d}", modality, fingerprint, dict(shared.spec))
            if chunk.rebuilt or (chunk.rows == 0 and chunk.data_path.exists()):
                raise RuntimeError(f"{folder / f'chunk-{c:06d}'} is unreadable: delete it and rerun worker {folder.name}")
            if chunk.rows == 0:
                continue  # a chunk of items without this modality
            new = [(k, r) for k, r in chunk.entries.items() if k not in seen]
            if not new:
                continue
            seen.update(k for k, _ in new)
            rows = torch.tensor([r for _, r in new])
            for name, t in chunk.tensors().items():
                parts.setdefault(name, []).append(t[rows])
            if shared.spec.get("hidden", (None, ()))[1] is None:
                shared.spec["hidden"] = chunk.spec["hidden"]
            keys += [k for k, _ in new]
    if keys:
        shared.append(keys, {name: torch.cat(ts) for name, ts in parts.items()})
    shutil.rmtree(root, ignore_errors=True)
    with contextlib.suppress(OSError):  # the shards folder too, once no other build has one there
        root.parent.rmdir()
    return {"added": len(keys), "rows": shared.rows}
