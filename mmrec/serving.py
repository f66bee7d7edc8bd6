"""Serving core: request limits, items given by raw content, a live catalog and approximate retrieval.

No web framework here (``deploy/service.py`` puts HTTP around it); everything is plain tensors
and files, so the same code serves the MLflow pyfunc, the service and the tests.

- ``Limits`` bounds everything a request can make the server do; ``decode_image`` reads image
  *bytes* (never a path) within a byte and a pixel limit, checking the pixel count from the
  header before decoding.
- ``encode_items`` runs items given by text and/or image through the model's own item tower,
  exactly as catalog items are encoded.
- ``LiveCatalog``: the exported catalog plus items added, updated or removed at run time. The
  changes are kept in one file, ``<state>/catalog.safetensors`` (vectors, the raw content they came
  from, removed ids, a version number), replaced atomically under a file lock; every process that
  serves the catalog compares the file's stat stamp before each request and reloads it when it
  changed, so several workers see each other's changes on their next request. A different model
  re-encodes the stored raw content instead of trusting vectors of another tower.
- ``FaissModel``: an ``ExportedModel`` whose unrestricted searches go through a faiss IVF index
  of the exported catalog (built once per process) when the catalog has at least
  ``faiss_min_items`` items; items added at run time are scored exactly and merged.
"""

from __future__ import annotations

import contextlib
import fcntl
import io
import json
import logging
import math
import os
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from PIL import Image, UnidentifiedImageError

from mmrec.export import ExportedModel
from mmrec.io import atomic_file, tensor_digest

log = logging.getLogger(__name__)

IMAGE_FORMATS = ("PNG", "JPEG", "WEBP", "GIF", "BMP")
CATALOG_FILE = "catalog.safetensors"


class LimitError(ValueError):
    """A request asks for more than ``Limits`` allows (``what`` names the limit)."""

    def __init__(self, what: str, message: str, too_large: bool = False):
        super().__init__(message)
        self.what, self.too_large = what, too_large


class ContentError(ValueError):
    """An item's raw content cannot be used (not an image, no content the tower reads, ...)."""


@dataclass(frozen=True)
class Limits:
    """What one request may ask for. Every field is a hard bound checked before any work."""

    max_body_bytes: int = 8 << 20
    """Bytes of one HTTP request body (base64 images included)."""
    max_users: int = 256
    """Users in one recommend request."""
    max_history: int = 1000
    """Entries in one user's history (the model reads the last ``max_len``; all are excluded)."""
    max_k: int = 200
    """Recommendations per user."""
    max_allowed: int = 10000
    """Item ids in one user's ``restrict_to`` set."""
    max_items: int = 64
    """Items given by content in one request (catalog upserts, or raw history entries)."""
    max_text_chars: int = 5000
    """Characters of one item's text."""
    max_image_bytes: int = 4 << 20
    """Bytes of one encoded image."""
    max_image_pixels: int = 16_000_000
    """Width x height of one image (read from the header, checked before decoding)."""
    max_id_chars: int = 256
    """Characters of one item id."""

    def __post_init__(self):
        for name, value in self.__dict__.items():
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"Limits.{name} must be a positive integer, got {value!r}")

    def check(self, what: str, n: int, limit_name: str, too_large: bool = False) -> None:
        limit = getattr(self, limit_name)
        if n > limit:
            raise LimitError(limit_name, f"{what}: {n} exceeds the limit of {limit} ({limit_name})", too_large)


def check_k(k: Any, limits: Limits) -> int:
    """``k`` as an int in 1..max_k, or a clear ValueError (0, -1, 2.5, "3" and True are refused)."""
    if isinstance(k, bool) or not isinstance(k, int):
        raise ValueError(f"k must be an integer, got {k!r}")
    if k < 1:
        raise ValueError(f"k must be at least 1, got {k}")
    if k > limits.max_k:
        raise LimitError("max_k", f"k={k} exceeds the limit of {limits.max_k} (max_k)")
    return k


def decode_image(data: bytes, limits: Limits, where: str = "image") -> Image.Image:
    """An RGB image from encoded bytes, within ``limits`` (bytes, then pixels from the header)."""
    limits.check(f"{where} has {len(data)} bytes", len(data), "max_image_bytes", too_large=True)
    try:
        img = Image.open(io.BytesIO(data))  # reads the header only
        if img.format not in IMAGE_FORMATS:
            raise ContentError(f"{where}: format {img.format} is not accepted (accepted: {', '.join(IMAGE_FORMATS)})")
        w, h = img.size
        limits.check(f"{where} is {w}x{h} pixels", w * h, "max_image_pixels", too_large=True)
        img.load()
    except (UnidentifiedImageError, Image.DecompressionBombError):
        raise ContentError(f"{where}: not a readable image (accepted: {', '.join(IMAGE_FORMATS)})") from None
    except (OSError, SyntaxError, ValueError) as exc:
        if isinstance(exc, (ContentError, LimitError)):
            raise
        raise ContentError(f"{where}: the image cannot be decoded ({type(exc).__name__})") from None
    return img.convert("RGB")


@dataclass
class NewItem:
    """An item given by raw content: text and/or an encoded image (its bytes)."""

    item_id: str | None = None
    text: str | None = None
    image: bytes | None = None


def encode_items(model, items: list[NewItem], limits: Limits | None = None) -> torch.Tensor:
    """Item vectors ``(m, d)`` of items given by raw content, through ``model``'s item tower (a
    ``Recommender``): the text tokenized by the model's tokenizer, the image decoded (within
    ``limits``) and preprocessed by the image encoder's ``transform()``, as catalog items are."""
    from mmrec.models.towers import ItemContent

    limits = limits or Limits()
    modalities = model.cfg.item_tower.modalities
    if not modalities:
        raise ContentError(f"the {model.cfg.item_tower.name!r} item tower has no content encoder: it cannot encode items "
                           "given by content")
    m = len(items)
    limits.check(f"{m} items given by content", m, "max_items")
    names = [repr(it.item_id) if it.item_id else f"item {n}" for n, it in enumerate(items, 1)]
    texts = [it.text or "" for it in items]
    for name, t in zip(names, texts):
        limits.check(f"text of {name} has {len(t)} characters", len(t), "max_text_chars")
    has_text = torch.tensor([False] + [bool(t.strip()) and "text" in modalities for t in texts])
    has_image = torch.tensor([False] + [bool(it.image) and "image" in modalities for it in items])
    for name, t, v in zip(names, has_text[1:], has_image[1:]):
        if not (t or v):
            raise ContentError(f"{name} has no content this model reads (modalities: {list(modalities)})")
    images = {i: decode_image(items[i - 1].image, limits, f"image of {names[i - 1]}") for i in range(1, m + 1) if has_image[i]}
    content = ItemContent(m, has_text, has_image)
    tower = model.item_tower
    with torch.no_grad():
        if "text" in modalities:
            tok = tower.text.encoder.tokenize(["", *texts])  # row 0 = padding
            tok["input_ids"][~has_text] = 0
            tok["attention_mask"][~has_text] = 0
            content.text = dict(tok)  # raw mode: the tower runs the frozen bottom itself
        if "image" in modalities:
            enc = tower.image.encoder
            tf = enc.transform()
            S = enc.cfg.image_size
            pixels = torch.zeros(m + 1, 3, S, S)  # (m+1, 3, S, S), normalised
            for i, img in images.items():
                pixels[i] = tf(img)
            # transform() output is normalised float, as in the feature pipeline: feed it as
            # "hidden" (the bottom's output, or the pixels themselves when no part is frozen)
            content.image = {"hidden": enc.bottom(pixels) if enc.cacheable else pixels}
        was_training = model.training
        model.eval()
        try:
            vecs = tower(content, torch.arange(1, m + 1), content_only=True)  # (m, d): rows of `content`, not the catalog
        finally:
            model.train(was_training)
    return vecs


# ------------------------------------------------------------------------------------------------
# Retrieval

class FaissModel(ExportedModel):
    """``ExportedModel`` whose unrestricted searches use a faiss IVF (inner product) index over the
    exported catalog rows ``1..indexed``. Rows the index does not know (items added at run time)
    or knows with an old vector (``stale``: items updated at run time) are scored exactly and
    merged. Blocked and seen rows are filtered from an over-fetched candidate list; a user for
    whom too few candidates survive is searched exactly."""

    index: Any = None
    indexed: int = 0
    stale: torch.Tensor | None = None

    def search(self, users, k, seen):
        import numpy as np

        n_base, n_rows = self.indexed, self.item_vectors.shape[0]
        stale = self.stale if self.stale is not None else torch.zeros(0, dtype=torch.long)
        mask = self._mask.clone()
        mask[stale] = -torch.inf  # the index's copy of an updated row is out of date
        skip = int(torch.isinf(mask[1:n_base + 1]).sum())
        fetch = min(n_base, k + max((len(s) for s in seen), default=0) + skip)
        dist, ids = self.index.search(np.ascontiguousarray(users.numpy(), dtype=np.float32), fetch)
        dist, rows = torch.from_numpy(dist), torch.from_numpy(ids).long() + 1  # faiss ids 0.. = rows 1..
        exact = torch.cat([stale, torch.arange(n_base + 1, n_rows)])
        if exact.numel():
            dist = torch.cat([dist + mask[rows.clamp(min=0)], torch.mm(users, self.item_vectors[exact].T) + self._mask[exact]], 1)
            rows = torch.cat([rows, exact.expand(len(users), -1)], 1)
        else:
            dist = dist + mask[rows.clamp(min=0)]
        dist[rows <= 0] = -torch.inf  # faiss pads with id -1 when its lists run short
        for u, s in enumerate(seen):
            if s:
                dist[u, torch.isin(rows[u], torch.tensor(s, dtype=torch.long))] = -torch.inf
        top = dist.topk(min(k, dist.shape[1]), dim=1)
        vals, rws = top.values.tolist(), rows.gather(1, top.indices).tolist()
        n_open = int((~self._blocked).sum())
        short = [u for u, v in enumerate(vals) if sum(x != -math.inf for x in v) < min(k, n_open - len(set(seen[u])))]
        if short:  # the approximate candidates ran out: exact for those users
            ev, er = ExportedModel.search(self, users[short], k, [seen[u] for u in short])
            for j, u in enumerate(short):
                vals[u], rws[u] = ev[j], er[j]
        return vals, rws


def build_faiss_index(vectors: torch.Tensor, nlist: int | None = None, nprobe: int = 64, seed: int = 0):
    """A faiss ``IndexIVFFlat`` (inner product) over ``vectors (n, d)``, ids 0..n-1; ``nlist``
    defaults to ``4 * sqrt(n)`` lists (at most one per 39 vectors, what k-means needs), trained on at
    most 64 points per list."""
    import faiss
    import numpy as np

    x = np.ascontiguousarray(vectors.numpy(), dtype=np.float32)
    n, d = x.shape
    nlist = nlist or max(1, min(int(4 * n ** 0.5), n // 39))
    quantizer = faiss.IndexFlatIP(d)
    index = faiss.IndexIVFFlat(quantizer, d, nlist, faiss.METRIC_INNER_PRODUCT)
    rng = np.random.default_rng(seed)
    sample = x[rng.choice(n, size=min(n, 64 * nlist), replace=False)]
    index.train(sample)
    index.add(x)
    index.nprobe = min(nprobe, nlist)
    return index


# ------------------------------------------------------------------------------------------------
# The live catalog

@dataclass
class Overlay:
    """Catalog changes since the export: items added or updated (their vectors and the raw content
    they were encoded from) and ids removed; ``version`` counts the changes."""

    version: int = 0
    model_key: str = ""
    items: dict[str, NewItem] = field(default_factory=dict)
    vectors: dict[str, torch.Tensor] = field(default_factory=dict)
    removed: set[str] = field(default_factory=set)


class CatalogStore:
    """``<folder>/catalog.safetensors``: an ``Overlay``, replaced atomically, written under an
    exclusive ``flock`` on ``<folder>/catalog.lock`` (read-modify-write across processes)."""

    def __init__(self, folder: str | os.PathLike):
        self.folder = Path(folder)
        self.folder.mkdir(parents=True, exist_ok=True)
        self.path = self.folder / CATALOG_FILE
        self.lock_path = self.folder / "catalog.lock"

    def stamp(self) -> tuple | None:
        """Changes whenever the file is replaced (new inode, mtime and size), None when absent."""
        try:
            st = os.stat(self.path)
        except FileNotFoundError:
            return None
        return (st.st_ino, st.st_mtime_ns, st.st_size)

    def read(self) -> Overlay:
        from safetensors import safe_open

        if not self.path.exists():
            return Overlay()
        with safe_open(str(self.path), framework="pt") as f:
            meta = json.loads(f.metadata()["overlay"])
            tensors = {k: f.get_tensor(k) for k in f.keys()}
        ov = Overlay(version=int(meta["version"]), model_key=meta["model_key"], removed=set(meta["removed"]))
        for n, it in enumerate(meta["items"]):
            img = tensors.get(f"image.{n}")
            ov.items[it["item_id"]] = NewItem(it["item_id"], it.get("text"), bytes(img.numpy().tobytes()) if img is not None else None)
            ov.vectors[it["item_id"]] = tensors[f"vector.{n}"]
        return ov

    def write(self, ov: Overlay) -> None:
        from safetensors.torch import save

        tensors, items = {}, []
        for n, (iid, it) in enumerate(ov.items.items()):
            items.append({"item_id": iid, "text": it.text})
            tensors[f"vector.{n}"] = ov.vectors[iid].contiguous()
            if it.image:
                tensors[f"image.{n}"] = torch.frombuffer(bytearray(it.image), dtype=torch.uint8)
        meta = {"version": ov.version, "model_key": ov.model_key, "items": items, "removed": sorted(ov.removed)}
        data = save(tensors, metadata={"overlay": json.dumps(meta)})
        with atomic_file(self.path, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())

    @contextlib.contextmanager
    def locked(self):
        with open(self.lock_path, "a+") as fh:
            fcntl.flock(fh, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(fh, fcntl.LOCK_UN)


def model_key(exported: ExportedModel) -> str:
    """Identifies the model whose tower encoded the overlay's vectors (its item vectors' digest)."""
    return tensor_digest([("item_vectors", exported.item_vectors)])[:16]


class LiveCatalog:
    """The exported catalog plus the changes in ``store`` (see the module docstring).

    ``current()`` returns an immutable ``ExportedModel`` view (reloaded first when the store's
    stamp changed); ``upsert`` and ``remove`` change the store and return the new version. Items
    removed stay resolvable in histories (their last vector) but are never recommended.
    """

    def __init__(self, exported: ExportedModel, store: CatalogStore | None = None, limits: Limits | None = None,
                 faiss_min_items: int = 200_000, nprobe: int = 64):
        self.base, self.store, self.limits = exported, store, limits or Limits()
        self.key = model_key(exported)
        self.index = None
        if exported.n_items >= faiss_min_items:
            self.index = build_faiss_index(exported.item_vectors[1:], nprobe=nprobe)
        self._lock = threading.Lock()
        self._stamp: tuple | None = None
        self._overlay = Overlay(model_key=self.key)
        self._view: ExportedModel = self._build(self._overlay)
        if store is not None:
            self._stamp = ("unread",)
            self.refresh()

    @property
    def version(self) -> int:
        return self._overlay.version

    def refresh(self) -> None:
        """Reload the store when its stamp changed since the last load (cheap otherwise: one stat)."""
        if self.store is None:
            return
        stamp = self.store.stamp()
        if stamp == self._stamp:
            return
        with self._lock:
            stamp = self.store.stamp()
            if stamp == self._stamp:
                return
            ov = self.store.read()
            self._fit(ov)
            self._view, self._overlay, self._stamp = self._build(ov), ov, stamp
            log.info("catalog version %d loaded (%d items changed, %d removed)", ov.version, len(ov.items), len(ov.removed))

    def current(self) -> ExportedModel:
        self.refresh()
        return self._view

    def _fit(self, ov: Overlay) -> None:
        """Vectors made by another model are re-encoded from the stored raw content."""
        if ov.model_key != self.key and ov.items:
            log.warning("catalog overlay was encoded by another model (%s): re-encoding %d items", ov.model_key, len(ov.items))
            ids = list(ov.items)
            vecs = encode_items(self.base.model, [ov.items[i] for i in ids], Limits(max_items=max(1, len(ids))))
            ov.vectors = dict(zip(ids, vecs))
        ov.model_key = self.key

    def _build(self, ov: Overlay) -> ExportedModel:
        base = self.base
        added = [i for i in ov.items if i not in base._index]
        vectors = base.item_vectors
        if ov.items:
            vectors = torch.cat([vectors, torch.stack([ov.vectors[i] for i in added])]) if added else vectors.clone()
            for iid in ov.items:
                if iid in base._index:  # an update: the row keeps its place, the vector is new
                    vectors[base._index[iid]] = ov.vectors[iid]
        blocked = torch.zeros(vectors.shape[0], dtype=torch.bool)
        new_rows = {iid: row for row, iid in enumerate(added, base.n_items + 1)}
        for iid in ov.removed:
            blocked[base._index.get(iid) or new_rows[iid]] = True
        if self.index is None:
            return base.extended(added, vectors, blocked)
        view = base.extended(added, vectors, blocked, cls=FaissModel)
        view.index, view.indexed = self.index, base.n_items
        view.stale = torch.tensor(sorted(base._index[i] for i in ov.items if i in base._index), dtype=torch.long)
        return view

    def _change(self, apply) -> int:
        if self.store is None:
            with self._lock:
                ov = self._overlay
                apply(ov)
                ov.version += 1
                self._view = self._build(ov)
                return ov.version
        with self.store.locked():
            ov = self.store.read()
            self._fit(ov)
            apply(ov)
            ov.version += 1
            self.store.write(ov)
        self.refresh()
        return ov.version

    def upsert(self, items: list[NewItem]) -> tuple[int, list[str]]:
        """Add or update items given by raw content (encoded by the model's tower, outside the
        lock); returns (new version, the ids that were new to the catalog)."""
        for it in items:
            if not it.item_id or not isinstance(it.item_id, str):
                raise ContentError(f"each item needs a non-empty string item_id, got {it.item_id!r}")
            self.limits.check(f"item id {it.item_id[:40]!r} has {len(it.item_id)} characters", len(it.item_id), "max_id_chars")
        ids = [it.item_id for it in items]
        if len(set(ids)) != len(ids):
            raise ContentError(f"item ids given twice: {sorted({i for i in ids if ids.count(i) > 1})}")
        vecs = encode_items(self.base.model, items, self.limits)
        created: list[str] = []

        def apply(ov: Overlay) -> None:
            base = self.base._index
            created.extend(i for i in ids if (i not in base and i not in ov.items) or i in ov.removed)
            for it, v in zip(items, vecs):
                ov.items[it.item_id] = NewItem(it.item_id, it.text, it.image)
                ov.vectors[it.item_id] = v.clone()
                ov.removed.discard(it.item_id)

        return self._change(apply), created

    def remove(self, item_ids: list[str]) -> int:
        """Stop recommending ``item_ids``; a KeyError names an id the catalog does not hold."""

        def apply(ov: Overlay) -> None:
            for iid in item_ids:
                if (iid not in self.base._index and iid not in ov.items) or iid in ov.removed:
                    raise KeyError(f"unknown item id {iid!r} (not in the catalog, or already removed)")
            ov.removed.update(item_ids)

        return self._change(apply)

    def state(self, item_id: str) -> str | None:
        """``"exported"``, ``"added"``, ``"updated"``, ``"removed"`` or None (unknown)."""
        ov = self._overlay
        if item_id in ov.removed:
            return "removed"
        if item_id in ov.items:
            return "updated" if item_id in self.base._index else "added"
        return "exported" if item_id in self.base._index else None


__all__ = ["CatalogStore", "ContentError", "FaissModel", "LimitError", "Limits", "LiveCatalog", "NewItem", "Overlay",
           "build_faiss_index", "check_k", "decode_image", "encode_items", "model_key"]
