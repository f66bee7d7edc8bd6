"""Feature cache: the frozen bottom of each item encoder, computed once per item and kept on disk.

The bottom's output depends only on the item's content and on what the encoder's
``fingerprint()`` hashes (model name, frozen weights, frozen depth, preprocessing), so it is
stored under that fingerprint and reused by every later run; a new fingerprint is a new file.

What is stored, per modality (row r = the r-th requested item; float16 to halve disk and memory):

- text: ``hidden`` (n, T, H) = ``TextEncoder.bottom`` padded with zeros to T = ``max_length``,
  ``mask`` (n, T) bool. With ``trainable_layers=0`` these are the final token states.
- image, ``trainable_blocks > 0``: ``hidden`` (n, C', h', w') = ``ImageEncoder.bottom``.
- image, ``trainable_blocks = 0``: ``tokens`` (n, g*g, C) and ``pooled`` (n, C) =
  ``top(bottom(x))``; the top has no parameters then, and the tokens are much smaller than the map.

Layout, one pair of files per (modality, fingerprint) under ``cache_dir``::

    text-v2-<fingerprint>.safetensors   the tensors above, one row per cached content (v2: CACHE_VERSION),
                                     header metadata: format, modality, fingerprint, generation, rows
    text-v2-<fingerprint>.json          index: {"entries": {content key: row}, "generation": ..., ...}

A content key is ``<item key>:<sha256 of the content>`` (text: the string; image: the reference and
the stored bytes), so an edited item is recomputed and two catalogs sharing item ids do not clash.
Edited items leave their old row behind: delete the folder to reclaim the space.

Both files are replaced atomically (temporary sibling, then rename), data first, index second, and
both carry the same random ``generation``. A reader that finds the two out of step (a crash between
the renames, two writers at once), a truncated file or an unreadable index warns and rebuilds the
requested rows: a broken cache costs time, never wrong features.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import time
import uuid
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch.utils.data import DataLoader, Dataset
from tqdm import tqdm

from mmrec.data.images import ImageError, ImageStore
from mmrec.encoders.image import ImageEncoder
from mmrec.encoders.text import TextEncoder, length_buckets
from mmrec.io import atomic_file

CACHE_FORMAT = "mmrec-feature-cache"
CACHE_VERSION = 2
"""2: text encoded in batches of one token length, images in batches of exactly ``IMAGE_ROWS`` (version 1
padded texts to the longest of a batch and ran images in batches of any size, so a vector depended on what
it was encoded with). Part of the file names: a version-1 cache is never read (delete it to free the space)."""
IMAGE_ROWS = 16
"""The image encoder always runs on this many images (a short batch is padded with zero images): oneDNN's
convolutions give an image other float rounding at another batch size (EfficientNet-Lite0: every image
encoded alone differs from itself in a batch of 32), but the same rows whatever the other images are."""

_DTYPES = {torch.float16: "F16", torch.bool: "BOOL"}
"""Tensor dtypes the cache stores, with the names the safetensors header uses for them."""


class FeatureError(ValueError):
    """An item's content cannot be turned into features (unreadable image, float16 overflow)."""


@dataclass
class CacheStats:
    """What one ``text_features`` / ``image_features`` call did (for logs and benchmarks)."""

    hits: int = 0
    """Items served from the cache."""
    computed: int = 0
    """Items run through the encoder."""
    absent: int = 0
    """Items without this modality (zero rows, never encoded)."""
    seconds: float = 0.0
    """Wall time of the whole call: hashing, decoding, encoding, reading and writing the cache."""
    rebuilt: bool = False
    """The cache file was unreadable or inconsistent and was rebuilt."""

    @property
    def items_per_s(self) -> float:
        """Items with the modality served per second, from the cache or computed."""
        return (self.hits + self.computed) / self.seconds if self.seconds > 0 else float("inf")


@dataclass
class ModalityFeatures:
    """Cached bottom outputs of one modality for a list of items, in the requested order."""

    tensors: dict[str, torch.Tensor]
    """Name -> (n, ...) tensor (see the module docstring); zero rows where ``present`` is False."""
    present: torch.Tensor
    """(n,) bool: the item has this modality (non-empty text / an image reference)."""
    fingerprint: str
    """The encoder fingerprint the features belong to."""
    stats: CacheStats = field(default_factory=CacheStats)


# --- the on-disk cache ---------------------------------------------------------------------------


Spec = dict[str, tuple[torch.dtype, "tuple[int, ...] | None"]]
"""Tensor name -> (dtype, shape of one row); None where only the encoder knows the shape."""


def _digest(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()[:32]


class _Cache:
    """One (modality, fingerprint) pair of files; ``cache_dir=None`` gives a cache that stores nothing."""

    def __init__(self, cache_dir: Path | None, modality: str, fingerprint: str, spec: Spec):
        self.modality, self.fingerprint, self.spec = modality, fingerprint, spec
        self.data_path = self.index_path = None
        self.entries: dict[str, int] = {}
        self.rows = 0
        self.rebuilt = False
        self._tensors: dict[str, torch.Tensor] | None = None
        if cache_dir is None:
            return
        stem = f"{modality}-v{CACHE_VERSION}-{fingerprint}"
        self.data_path = Path(cache_dir) / f"{stem}.safetensors"
        self.index_path = Path(cache_dir) / f"{stem}.json"
        if not self.data_path.exists() and not self.index_path.exists():
            return
        try:
            self._load()
        except (OSError, ValueError, KeyError, TypeError) as exc:  # SafetensorError is re-raised as ValueError
            warnings.warn(
                f"feature cache {self.data_path} is unreadable or inconsistent ({exc}); rebuilding it",
                RuntimeWarning,
                stacklevel=3,
            )
            self.entries, self.rows, self.rebuilt = {}, 0, True

    def _load(self) -> None:
        from safetensors import SafetensorError, safe_open

        index = json.loads(self.index_path.read_text(encoding="utf-8"))
        expect = {"format": CACHE_FORMAT, "version": CACHE_VERSION, "modality": self.modality,
                  "fingerprint": self.fingerprint}
        for key, value in expect.items():
            if index.get(key) != value:
                raise ValueError(f"index has {key}={index.get(key)!r}, expected {value!r}")
        entries, rows = index["entries"], index["rows"]
        if not isinstance(entries, dict) or not isinstance(rows, int):
            raise ValueError("index entries/rows have the wrong type")
        if sorted(entries.values()) != list(range(rows)):
            raise ValueError(f"index rows are not 0..{rows - 1}, each once")
        try:
            with safe_open(str(self.data_path), framework="pt") as f:
                meta = f.metadata() or {}
                if meta.get("generation") != index["generation"]:
                    raise ValueError("data file and index were written by different runs")
                if set(f.keys()) != set(self.spec):
                    raise ValueError(f"tensors {sorted(f.keys())}, expected {sorted(self.spec)}")
                for name, (dtype, shape) in self.spec.items():
                    sl = f.get_slice(name)
                    got = tuple(sl.get_shape())
                    if sl.get_dtype() != _DTYPES[dtype] or got[0] != rows or (shape is not None and got[1:] != shape):
                        raise ValueError(
                            f"tensor {name!r} is {sl.get_dtype()} {got}, expected {_DTYPES[dtype]} ({rows}, *{shape})"
                        )
                    if shape is None:  # the image bottom's map: its shape comes from the file
                        self.spec[name] = (dtype, got[1:])
        except SafetensorError as exc:
            raise ValueError(str(exc)) from exc
        self.entries, self.rows = entries, rows

    def tensors(self) -> dict[str, torch.Tensor]:
        """All cached rows, read once (an empty dict when nothing is cached)."""
        if self._tensors is None:
            if self.rows == 0:
                return {}
            from safetensors import safe_open

            with safe_open(str(self.data_path), framework="pt") as f:
                self._tensors = {name: f.get_tensor(name) for name in self.spec}
        return self._tensors

    def append(self, keys: list[str], new: dict[str, torch.Tensor]) -> None:
        """Add rows for ``keys`` (new content keys, in row order) and rewrite both files atomically."""
        if self.data_path is None or not keys:
            return
        from safetensors.torch import save_file

        old = self.tensors()
        merged = {name: torch.cat([old[name], new[name]]) if old else new[name].contiguous() for name in self.spec}
        entries = {**self.entries, **{k: self.rows + i for i, k in enumerate(keys)}}
        rows = self.rows + len(keys)
        generation = uuid.uuid4().hex
        meta = {"format": CACHE_FORMAT, "version": str(CACHE_VERSION), "modality": self.modality,
                "fingerprint": self.fingerprint, "generation": generation, "rows": str(rows)}
        self.data_path.parent.mkdir(parents=True, exist_ok=True)
        with atomic_file(self.data_path, "wb") as fh:
            # safetensors writes by path (no copy of the whole file in memory); the handle stays empty
            save_file(merged, fh.name, metadata=meta)
        index = {"format": CACHE_FORMAT, "version": CACHE_VERSION, "modality": self.modality,
                 "fingerprint": self.fingerprint, "generation": generation, "rows": rows,
                 "tensors": {n: [_DTYPES[t.dtype], list(t.shape[1:])] for n, t in merged.items()},
                 "entries": entries}
        with atomic_file(self.index_path, "w", encoding="utf-8") as fh:
            json.dump(index, fh, separators=(",", ":"))
        self.entries, self.rows, self._tensors = entries, rows, merged


def _assemble(
    ckeys: list[str | None], cache: _Cache, new_keys: list[str], new: dict[str, torch.Tensor]
) -> dict[str, torch.Tensor]:
    """Rows in request order: cached rows, then newly computed ones; zeros where ``ckeys`` is None."""
    n = len(ckeys)
    new_row = {k: i for i, k in enumerate(new_keys)}
    out = {name: torch.zeros((n, *shape), dtype=dtype) for name, (dtype, shape) in cache.spec.items()}
    hit_pos = [i for i, k in enumerate(ckeys) if k is not None and k in cache.entries]
    new_pos = [i for i, k in enumerate(ckeys) if k is not None and k not in cache.entries]
    if hit_pos:
        rows = torch.tensor([cache.entries[ckeys[i]] for i in hit_pos])
        for name, t in cache.tensors().items():
            out[name][hit_pos] = t[rows]
    if new_pos:
        rows = torch.tensor([new_row[ckeys[i]] for i in new_pos])
        for name, t in new.items():
            out[name][new_pos] = t[rows]
    return out


# --- helpers -------------------------------------------------------------------------------------


def _check_inputs(values: list, keys: list[str], what: str) -> list[str]:
    if len(values) != len(keys):
        raise ValueError(f"got {len(values)} {what} but {len(keys)} keys")
    return [str(k) for k in keys]


def _check_cacheable(encoder) -> None:
    if not encoder.cacheable:
        raise ValueError(
            f"{type(encoder).__name__} trains every layer (trainable_layers/trainable_blocks = -1): nothing "
            "is frozen, so there are no features to cache; encode items end-to-end instead"
        )


@contextlib.contextmanager
def _inference(encoder: torch.nn.Module):
    """Eval mode and no gradients for the block; the encoder's own mode is restored afterwards."""
    was_training = encoder.training
    encoder.eval()
    try:
        with torch.no_grad():
            yield next(encoder.parameters()).device
    finally:
        encoder.train(was_training)


def _half(x: torch.Tensor, what: str) -> torch.Tensor:
    """float16 on the CPU; values beyond float16's range are an error, not silent infinities."""
    h = x.detach().to("cpu", torch.float16)
    if not torch.isfinite(h).all():
        raise FeatureError(f"{what}: values overflow float16 (max |x| = {x.abs().max().item():.3g})")
    return h


def _stats(start: float, cache: _Cache, hits: int, computed: int, absent: int) -> CacheStats:
    return CacheStats(hits=hits, computed=computed, absent=absent, seconds=time.perf_counter() - start,
                      rebuilt=cache.rebuilt)


# --- text ----------------------------------------------------------------------------------------


def _encode_texts(
    encoder: TextEncoder, texts: list[str], batch_size: int, progress: bool
) -> dict[str, torch.Tensor]:
    """Bottom states of ``texts`` (m, T, H) float16 and masks (m, T), batched by token length."""
    m, T, H = len(texts), encoder.cfg.max_length, encoder.hidden_size
    hidden = torch.zeros(m, T, H, dtype=torch.float16)
    mask = torch.zeros(m, T, dtype=torch.bool)
    if not texts:
        return {"hidden": hidden, "mask": mask}
    buckets = length_buckets(encoder.token_lengths(texts), batch_size)
    with _inference(encoder) as device, tqdm(total=m, desc="text features", unit="item", disable=not progress) as bar:
        for idx in buckets:
            batch = encoder.tokenize([texts[i] for i in idx])
            ids, am = batch["input_ids"].to(device), batch["attention_mask"].to(device)
            states = encoder.bottom(ids, am)  # (b, t, H)
            valid = am.bool()  # (b, t)
            states = states.masked_fill(~valid.unsqueeze(-1), 0.0)  # padding rows do not depend on the batch
            t = states.shape[1]
            hidden[idx, :t] = _half(states, f"text bottom of batch starting with {texts[idx[0]]!r}")
            mask[idx, :t] = valid.cpu()
            bar.update(len(idx))
    return {"hidden": hidden, "mask": mask}


def text_features(
    encoder: TextEncoder,
    texts: list[str | None],
    keys: list[str],
    cache_dir: Path | None,
    batch_size: int = 64,
    progress: bool = True,
) -> ModalityFeatures:
    """Frozen text features of ``texts`` (item ``keys``), from ``cache_dir`` where possible.

    Missing or changed items are encoded in length-sorted batches and appended to the cache;
    ``None`` or blank texts get zero rows and ``present=False``. ``cache_dir=None`` stores nothing.
    """
    start = time.perf_counter()
    keys = _check_inputs(texts, keys, "texts")
    _check_cacheable(encoder)
    fingerprint = encoder.fingerprint()
    T, H = encoder.cfg.max_length, encoder.hidden_size
    cache = _Cache(cache_dir, "text", fingerprint, {"hidden": (torch.float16, (T, H)), "mask": (torch.bool, (T,))})
    present = [bool(t and t.strip()) for t in texts]
    ckeys = [f"{k}:{_digest(t.encode('utf-8'))}" if p else None for k, t, p in zip(keys, texts, present)]
    todo: dict[str, str] = {}  # content key -> text, first occurrence of each content not cached
    for ck, t in zip(ckeys, texts):
        if ck is not None and ck not in cache.entries and ck not in todo:
            todo[ck] = t
    new = _encode_texts(encoder, list(todo.values()), batch_size, progress)
    tensors = _assemble(ckeys, cache, list(todo), new)
    cache.append(list(todo), new)
    n_present = sum(present)
    hits = sum(ck is not None and ck not in todo for ck in ckeys)
    return ModalityFeatures(
        tensors=tensors,
        present=torch.tensor(present, dtype=torch.bool),
        fingerprint=fingerprint,
        stats=_stats(start, cache, hits=hits, computed=n_present - hits, absent=len(texts) - n_present),
    )


# --- images --------------------------------------------------------------------------------------


class _ImageItems(Dataset):
    """Items with an image: hashes each one and decodes only those whose content is not cached.

    Holds the store's kind and root only (plain data), so it pickles into DataLoader workers and
    each worker opens files / the LMDB itself.
    """

    def __init__(self, refs: list[str], keys: list[str], store: ImageStore, transform, cached: frozenset[str]):
        self.refs, self.keys, self.store, self.transform, self.cached = refs, keys, store, transform, cached

    def __len__(self) -> int:
        return len(self.refs)

    def _fail(self, i: int, exc: ImageError) -> FeatureError:
        return FeatureError(
            f"item {self.keys[i]!r}: image {self.refs[i]!r} cannot be read ({exc.status}: {exc.detail}); "
            "catalog validation should have reported it"
        )

    def __getitem__(self, i: int) -> tuple[int, str, torch.Tensor | None]:
        ref = self.refs[i]
        try:
            data = self.store.read_bytes(ref)
        except ImageError as exc:
            raise self._fail(i, exc) from None
        ckey = f"{self.keys[i]}:{_digest(ref.encode('utf-8') + bytes(1) + data)}"  # the NUL ends the ref
        if ckey in self.cached:
            return i, ckey, None
        try:
            image = self.store.read(ref)
        except ImageError as exc:
            raise self._fail(i, exc) from None
        return i, ckey, self.transform(image)  # (3, S, S)


def _collate(batch):
    """(positions, content keys, positions to encode, their pixels (m, 3, S, S) or None)."""
    todo = [(i, x) for i, _, x in batch if x is not None]
    pixels = torch.stack([x for _, x in todo]) if todo else None
    return [i for i, _, _ in batch], [k for _, k, _ in batch], [i for i, _ in todo], pixels


def _image_rows(encoder: ImageEncoder, pixels: torch.Tensor) -> dict[str, torch.Tensor]:
    """The cached rows of ``pixels`` (b, 3, S, S), computed ``IMAGE_ROWS`` images at a time."""
    parts: dict[str, list[torch.Tensor]] = {}
    for s in range(0, pixels.shape[0], IMAGE_ROWS):
        chunk = pixels[s : s + IMAGE_ROWS]
        n = chunk.shape[0]
        if n < IMAGE_ROWS:  # zero images fill the batch; their rows are dropped
            chunk = torch.cat([chunk, chunk.new_zeros((IMAGE_ROWS - n, *chunk.shape[1:]))])
        fmap = encoder.bottom(chunk)  # (IMAGE_ROWS, C', h', w')
        if encoder.cfg.trainable_blocks == 0:
            tokens, pooled = encoder.top(fmap)  # (IMAGE_ROWS, g*g, C), (IMAGE_ROWS, C)
            rows = {"tokens": tokens[:n], "pooled": pooled[:n]}
        else:
            rows = {"hidden": fmap[:n]}
        for name, t in rows.items():
            parts.setdefault(name, []).append(t)
    return {name: torch.cat(ts) for name, ts in parts.items()}


def image_features(
    encoder: ImageEncoder,
    refs: list[str | None],
    keys: list[str],
    store: ImageStore | None,
    cache_dir: Path | None,
    batch_size: int = 32,
    num_workers: int = 0,
    progress: bool = True,
) -> ModalityFeatures:
    """Frozen image features of the images ``refs`` in ``store`` (item ``keys``), cached in ``cache_dir``.

    Every image's bytes are read and hashed (an edited file is recomputed even at the same path);
    only images not in the cache are decoded, in ``num_workers`` DataLoader processes (0 = here).
    ``None``/empty references get zero rows and ``present=False``. An unreadable image raises
    ``FeatureError`` naming the item and the reference.
    """
    start = time.perf_counter()
    keys = _check_inputs(refs, keys, "image references")
    _check_cacheable(encoder)
    fingerprint = encoder.fingerprint()
    if encoder.cfg.trainable_blocks == 0:
        spec: Spec = {"tokens": (torch.float16, (encoder.num_tokens, encoder.out_dim)),
                      "pooled": (torch.float16, (encoder.out_dim,))}
    else:
        spec = {"hidden": (torch.float16, None)}
    cache = _Cache(cache_dir, "image", fingerprint, spec)
    present = [bool(r) for r in refs]
    positions = [i for i, p in enumerate(present) if p]
    if positions and store is None:
        raise ValueError(f"{len(positions)} items have an image reference but no image store was given")

    ckeys: list[str | None] = [None] * len(refs)
    new_keys: list[str] = []
    new_parts: dict[str, list[torch.Tensor]] = {name: [] for name in spec}
    if positions:
        dataset = _ImageItems([refs[i] for i in positions], [keys[i] for i in positions], store,
                              encoder.transform(), frozenset(cache.entries))
        with _inference(encoder) as device:
            loader = DataLoader(dataset, batch_size=batch_size, num_workers=num_workers, collate_fn=_collate,
                                pin_memory=device.type == "cuda")
            seen: set[str] = set()
            for pos, ck, todo, pixels in tqdm(loader, desc="image features", unit="batch", disable=not progress):
                for j, k in zip(pos, ck):
                    ckeys[positions[j]] = k
                if pixels is None:
                    continue
                rows = _image_rows(encoder, pixels.to(device, non_blocking=True))
                where = f"image bottom of batch starting with item {keys[positions[todo[0]]]!r}"
                keep = []  # a content requested twice in one call is stored once
                for r, j in enumerate(todo):
                    k = ckeys[positions[j]]
                    if k not in seen:
                        seen.add(k)
                        keep.append(r)
                        new_keys.append(k)
                for name, t in rows.items():
                    new_parts[name].append(_half(t[keep], where))
    if spec.get("hidden", (None, ()))[1] is None:  # the map's shape is unknown until something ran
        if new_keys:
            spec["hidden"] = (torch.float16, tuple(new_parts["hidden"][0].shape[1:]))
        else:  # no row anywhere (no image at all): one blank probe gives the shape
            with _inference(encoder) as device:
                size = encoder.cfg.image_size
                probe = encoder.bottom(torch.zeros(1, 3, size, size, device=device))  # (1, C', h', w')
                spec["hidden"] = (torch.float16, tuple(probe.shape[1:]))
    new = {name: torch.cat(parts) if parts else torch.zeros((0, *spec[name][1]), dtype=torch.float16)
           for name, parts in new_parts.items()}
    tensors = _assemble(ckeys, cache, new_keys, new)
    hits = sum(ck is not None and ck in cache.entries for ck in ckeys)
    cache.append(new_keys, new)
    return ModalityFeatures(
        tensors=tensors,
        present=torch.tensor(present, dtype=torch.bool),
        fingerprint=fingerprint,
        stats=_stats(start, cache, hits=hits, computed=len(positions) - hits, absent=len(refs) - len(positions)),
    )
