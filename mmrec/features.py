"""The ``item_features`` artifact: every catalog item's frozen encoder outputs as one file.

``build_item_features`` runs the encoders the model's item tower needs over a preprocessed
catalog (item_idx order) through the feature cache (``mmrec.encoders.cache``), and returns an
``ItemContent`` whose row ``i`` is item_idx ``i`` (row 0 = padding). ``save_content`` /
``load_content`` store it as ``features.safetensors`` + ``features.json``; ``concat_contents``
stacks several domains' contents (pretraining on more than one source domain).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import polars as pl
import torch

from mmrec.data.catalog import Catalog
from mmrec.io import atomic_dir
from mmrec.models.towers import ItemContent

FEATURES_FILE = "features.safetensors"
META_FILE = "features.json"


def _pad_row(t: torch.Tensor) -> torch.Tensor:
    return torch.cat([torch.zeros((1, *t.shape[1:]), dtype=t.dtype), t])


def build_item_features(catalog: Catalog, model_cfg, cache_dir: Path | None, text_batch_size: int = 64,
                        image_batch_size: int = 32, num_workers: int = 0, progress: bool = True,
                        device: torch.device | str = "cpu") -> tuple[ItemContent, dict[str, Any]]:
    """Frozen features of ``catalog.items`` (which carry ``item_idx`` 1..N) for ``model_cfg``'s item tower.

    The encoders run on ``device`` (decoded images reach it from pinned memory); the features come
    back on the CPU as float16, as the cache and the artifact store them."""
    from mmrec.encoders.cache import image_features, text_features

    items = catalog.items.sort("item_idx")
    n = items.height
    if items["item_idx"].to_list() != list(range(1, n + 1)):
        raise ValueError(f"domain {catalog.domain!r}: items must carry item_idx 1..{n} (a validated catalog)")
    keys = items["item_id"].to_list()
    texts = items.select(catalog.text().alias("t"))["t"].to_list()
    refs = items["image"].to_list()
    has_text = torch.tensor([False] + [bool(t and t.strip()) for t in texts])
    has_image = torch.tensor([False] + [r is not None and r != "" for r in refs])
    content = ItemContent(n, has_text, has_image)
    meta: dict[str, Any] = {"domain": catalog.domain, "n_items": n, "modalities": {}}
    modalities = model_cfg.item_tower.modalities
    if "text" in modalities:
        from mmrec.encoders.text import TextEncoder

        enc = TextEncoder(model_cfg.text_encoder).to(device)
        f = text_features(enc, texts, keys, cache_dir, batch_size=text_batch_size, progress=progress)
        content.text = {k: _pad_row(v) for k, v in f.tensors.items()}
        content.fingerprints["text"] = f.fingerprint
        meta["modalities"]["text"] = {"fingerprint": f.fingerprint, **_stats(f.stats)}
    if "image" in modalities:
        from mmrec.encoders.image import ImageEncoder

        enc = ImageEncoder(model_cfg.image_encoder).to(device)
        f = image_features(enc, refs, keys, catalog.images, cache_dir, batch_size=image_batch_size,
                           num_workers=num_workers, progress=progress)
        content.image = {k: _pad_row(v) for k, v in f.tensors.items()}
        content.fingerprints["image"] = f.fingerprint
        meta["modalities"]["image"] = {"fingerprint": f.fingerprint, **_stats(f.stats)}
    meta["items_with_text"] = int(has_text.sum())
    meta["items_with_image"] = int(has_image.sum())
    return content, meta


def build_item_features_sharded(catalog: Catalog, model_cfg, cache_dir: Path, worker: int, n_workers: int,
                                text_batch_size: int = 64, image_batch_size: int = 32, num_workers: int = 0,
                                device: torch.device | str = "cpu", chunk_size: int = 10_000) -> dict[str, Any]:
    """Worker ``worker`` of ``n_workers``: encode its slice of ``catalog``'s items into its own shard
    of the feature cache (``mmrec.encoders.shards``; resumable by chunk). After every worker,
    ``merge_item_feature_shards`` once, then ``build_item_features`` finds every item cached."""
    from mmrec.encoders.shards import build_shard

    items = catalog.items.sort("item_idx")
    keys = items["item_id"].to_list()
    report: dict[str, Any] = {}
    modalities = model_cfg.item_tower.modalities
    if "text" in modalities:
        from mmrec.encoders.text import TextEncoder

        texts = items.select(catalog.text().alias("t"))["t"].to_list()
        enc = TextEncoder(model_cfg.text_encoder).to(device)
        report["text"] = build_shard("text", enc, texts, keys, cache_dir, worker, n_workers, chunk_size,
                                     batch_size=text_batch_size)
    if "image" in modalities:
        from mmrec.encoders.image import ImageEncoder

        enc = ImageEncoder(model_cfg.image_encoder).to(device)
        report["image"] = build_shard("image", enc, items["image"].to_list(), keys, cache_dir, worker, n_workers,
                                      chunk_size, store=catalog.images, batch_size=image_batch_size,
                                      num_workers=num_workers)
    return report


def merge_item_feature_shards(model_cfg, cache_dir: Path, n_workers: int) -> dict[str, Any]:
    """Merge the shards of ``build_item_features_sharded`` into the shared cache, per modality."""
    from mmrec.encoders.shards import merge_shards

    out: dict[str, Any] = {}
    modalities = model_cfg.item_tower.modalities
    if "text" in modalities:
        from mmrec.encoders.text import TextEncoder

        out["text"] = merge_shards("text", TextEncoder(model_cfg.text_encoder), cache_dir, n_workers)
    if "image" in modalities:
        from mmrec.encoders.image import ImageEncoder

        out["image"] = merge_shards("image", ImageEncoder(model_cfg.image_encoder), cache_dir, n_workers)
    return out


def _stats(s) -> dict[str, Any]:
    return {"hits": s.hits, "computed": s.computed, "absent": s.absent, "seconds": round(s.seconds, 3),
            "items_per_s": round(s.items_per_s, 1) if s.seconds > 0 else None}


def save_content(content: ItemContent, out: Path, meta: dict[str, Any]) -> Path:
    """Write ``features.safetensors`` + ``features.json`` into ``out`` atomically."""
    from safetensors.torch import save_file

    tensors = {"has_text": content.has_text, "has_image": content.has_image}
    for modality in ("text", "image"):
        for k, v in (getattr(content, modality) or {}).items():
            tensors[f"{modality}.{k}"] = v.contiguous()
    # only what determines the tensors: cache hits and timings differ run to run, and a changing
    # file would make DVC (and run keys) see a new artifact where the features are the same
    stable = {k: v for k, v in meta.items() if k != "modalities"}
    stable["modalities"] = {m: {"fingerprint": st["fingerprint"]} for m, st in meta.get("modalities", {}).items()}
    with atomic_dir(out) as tmp:
        save_file(tensors, tmp / FEATURES_FILE)
        (tmp / META_FILE).write_text(json.dumps({**stable, "fingerprints": content.fingerprints}, indent=2, sort_keys=True) + "\n")
    return out


def load_content(path: Path, device: torch.device | str = "cpu") -> ItemContent:
    """Read an ``item_features`` artifact back into an ``ItemContent`` whose tensors are on
    ``device`` (read straight there, without a CPU copy of the whole catalog)."""
    from safetensors.torch import load_file

    path = Path(path)
    if not (path / FEATURES_FILE).is_file():
        raise FileNotFoundError(f"{path}: no {FEATURES_FILE}; run the item_features stage first")
    tensors = load_file(path / FEATURES_FILE, device=str(device))
    meta = json.loads((path / META_FILE).read_text())
    groups: dict[str, dict[str, torch.Tensor]] = {}
    for k, v in tensors.items():
        if "." in k:
            modality, name = k.split(".", 1)
            groups.setdefault(modality, {})[name] = v
    return ItemContent(meta["n_items"], tensors["has_text"], tensors["has_image"], groups.get("text"), groups.get("image"),
                       dict(meta.get("fingerprints", {})))


def concat_contents(contents: list[ItemContent]) -> tuple[ItemContent, list[int]]:
    """One content for several domains: domain ``j``'s item ``i`` becomes ``offsets[j] + i``."""
    offsets, total = [], 0
    for c in contents:
        offsets.append(total)
        total += c.n_items
    for modality in ("text", "image"):
        present = [getattr(c, modality) is not None for c in contents]
        if any(present) and not all(present):
            raise ValueError(f"cannot pretrain on domains with and without {modality} features together")
        fps = {c.fingerprints.get(modality) for c in contents}
        if len(fps) > 1:
            raise ValueError(f"{modality} features of the source domains come from different encoders: {sorted(map(str, fps))}")

    def cat(name: str):
        return torch.cat([torch.zeros(1, dtype=torch.bool)] + [getattr(c, name)[1:] for c in contents])

    def cat_group(modality: str):
        if getattr(contents[0], modality) is None:
            return None
        keys = getattr(contents[0], modality).keys()
        return {k: torch.cat([getattr(contents[0], modality)[k][:1]] + [getattr(c, modality)[k][1:] for c in contents]) for k in keys}

    merged = ItemContent(total, cat("has_text"), cat("has_image"), cat_group("text"), cat_group("image"), dict(contents[0].fingerprints))
    return merged, offsets


def prefixed_item_map(item_maps: list[tuple[str, pl.DataFrame]], offsets: list[int]) -> pl.DataFrame:
    """The item map of concatenated domains: ``item_id`` becomes ``<domain>/<item_id>``."""
    return pl.concat([
        m.select((pl.col("item_idx") + off).alias("item_idx"), (pl.lit(f"{d}/") + pl.col("item_id")).alias("item_id"))
        for (d, m), off in zip(item_maps, offsets)
    ])
