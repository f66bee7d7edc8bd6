"""A self-describing model folder that loads with one call and needs no other file.

Layout::

    model.json               format, version, resolved model config, domain, metrics, provenance
    model.safetensors        every weight (encoders included: the frozen parts are the pretrained ones)
    item_map.parquet         item_idx (1..N) -> item_id [, train_count: interactions in training]
    item_vectors.safetensors ``item_vectors (N+1, d)``: the catalog's item vectors (row 0 = padding)
    text_encoder/            the text model's transformers config + tokenizer (when the model has text)

``load_model(path)`` rebuilds the architecture from ``model.json`` (the text encoder from the
folder's own config and tokenizer, the image backbone from timm's code), loads the weights
strictly, and recommends for histories of item ids using the stored item vectors. A user with an
empty history (nobody to encode) gets the catalog's most popular training items when the folder
holds ``train_count``, scored by that count; ``ExportedModel.rank`` says so in each answer's
``source`` ("model" or "popularity"). Everything a request needs besides the scores (id map,
masks, popularity row) is built once when the folder is loaded; ``mmrec.serving`` adds limits,
items given by content, a live catalog and faiss retrieval on top.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import polars as pl
import torch
from safetensors.torch import load_file, save_file

from mmrec.io import atomic_dir

MODEL_FORMAT = "mmrec-model"
MODEL_VERSION = 1


def export_model(model, out: str | Path, item_map: pl.DataFrame, domain: str, info: dict[str, Any] | None = None,
                 popularity: torch.Tensor | None = None) -> Path:
    """Write ``model`` (a ``Recommender`` with content attached) as a model folder, atomically.

    ``popularity`` (N+1,) counts each item's training interactions (row 0 = padding): stored as
    ``train_count`` and used for users with an empty history.
    """
    out = Path(out)
    model.eval()
    vectors = model.all_item_vectors()
    cfg = model.cfg
    with atomic_dir(out) as tmp:
        text = getattr(model.item_tower, "text", None)
        if text is not None:
            text.encoder.model.config.save_pretrained(tmp / "text_encoder")
            text.encoder.tokenizer.save_pretrained(tmp / "text_encoder")
        state = {k: v.contiguous() for k, v in model.state_dict().items()}
        save_file(state, tmp / "model.safetensors")
        save_file({"item_vectors": vectors.contiguous()}, tmp / "item_vectors.safetensors")
        items = item_map.select("item_idx", "item_id").sort("item_idx")
        if popularity is not None:
            if tuple(popularity.shape) != (vectors.shape[0],):
                raise ValueError(f"popularity has shape {tuple(popularity.shape)}, expected ({vectors.shape[0]},) (items + padding)")
            counts = popularity.to(torch.int64)[items["item_idx"].to_torch()]
            items = items.with_columns(train_count=pl.Series(counts.numpy(), dtype=pl.Int64))
        items.write_parquet(tmp / "item_map.parquet")
        meta = {
            "format": MODEL_FORMAT,
            "version": MODEL_VERSION,
            "domain": domain,
            "n_items": int(vectors.shape[0] - 1),
            "model": cfg.to_dict(),
            **(info or {}),
        }
        (tmp / "model.json").write_text(json.dumps(meta, indent=2, sort_keys=True, default=str) + "\n", encoding="utf-8")
    return out


@dataclass
class Ranking:
    """One user's top-k: item ids and scores, best first. ``source`` says what the scores are:
    ``"model"`` (user vector . item vector) or ``"popularity"`` (training interactions, for an
    empty history)."""

    item_ids: list[str]
    scores: list[float]
    source: str

    def pairs(self) -> list[tuple[str, float]]:
        return list(zip(self.item_ids, self.scores))


@dataclass
class ExportedModel:
    """A loaded model folder: the network, the catalog's item ids and vectors.

    Everything ``recommend`` needs per request is built once here: the id -> row map, the mask
    of rows that are never recommended (padding, ``blocked``) and the popularity scores.
    """

    model: Any
    item_ids: list[str]
    item_vectors: torch.Tensor
    meta: dict[str, Any]
    popularity: torch.Tensor | None = None
    """(N+1,) training interactions per item (row 0 = padding), or None; ranks empty histories.
    Shorter than ``item_vectors`` when items were added later: those count 0."""
    blocked: torch.Tensor | None = None
    """(N+1,) bool: rows that are never recommended (removed or superseded items); None = none."""

    def __post_init__(self):
        n = len(self.item_ids)
        if self.item_vectors.shape[0] != n + 1:
            raise ValueError(f"item_vectors has {self.item_vectors.shape[0]} rows, expected {n + 1} (items + padding)")
        index = {iid: i + 1 for i, iid in enumerate(self.item_ids)}
        if len(index) != n:
            raise ValueError(f"item ids are not unique ({n - len(index)} repeated)")
        self._finish(index)

    def _finish(self, index: dict[str, int]) -> None:
        n = len(self.item_ids)
        self._index = index
        blocked = torch.zeros(n + 1, dtype=torch.bool) if self.blocked is None else self.blocked.clone()
        blocked[0] = True
        self._blocked = blocked
        self._mask = torch.zeros(n + 1).masked_fill(blocked, -torch.inf)  # (N+1,) added to every score row
        self._pop = None
        if self.popularity is not None:
            pop = torch.zeros(n + 1)
            m = min(n + 1, self.popularity.shape[0])
            pop[:m] = self.popularity[:m].to(pop.dtype)
            self._pop = pop + self._mask

    def extended(self, added: list[str], vectors: torch.Tensor, blocked: torch.Tensor | None = None,
                 cls: type | None = None) -> ExportedModel:
        """A view of the same model with the items ``added`` appended (rows N+1..), every row's
        vector from ``vectors`` and ``blocked`` rows: the id map is copied, not rebuilt (a live
        catalog derives one per change)."""
        cls = cls or type(self)
        ids = self.item_ids + list(added) if added else self.item_ids
        if vectors.shape[0] != len(ids) + 1:
            raise ValueError(f"vectors has {vectors.shape[0]} rows, expected {len(ids) + 1} (items + padding)")
        index = dict(self._index) if added else self._index
        for row, iid in enumerate(added, len(self.item_ids) + 1):
            if iid in index:
                raise ValueError(f"item id {iid!r} is already in the catalog")
            index[iid] = row
        view = cls.__new__(cls)
        view.model, view.item_ids, view.item_vectors, view.meta = self.model, ids, vectors, self.meta
        view.popularity, view.blocked = self.popularity, blocked
        view._finish(index)
        return view

    @property
    def n_items(self) -> int:
        return len(self.item_ids)

    def item_index(self, item_id: str) -> int:
        try:
            return self._index[item_id]
        except KeyError:
            raise KeyError(f"unknown item id {item_id!r} (not in this model's catalog of {len(self.item_ids)} items)") from None

    def rows(self, items) -> list[int]:
        """Catalog rows of item ids (a KeyError names the first unknown one)."""
        index = self._index
        try:
            return [index[i] for i in items]
        except (KeyError, TypeError):
            for i in items:
                self.item_index(i)
            raise

    def user_vectors(self, histories: list[list]) -> torch.Tensor:
        """``(U, d)`` user vectors of histories (oldest first) of catalog rows (int) and/or item
        vectors ``(d,)`` of items given by content; the last ``max_len`` entries count."""
        L = self.model.cfg.max_len
        hist = torch.zeros(len(histories), L, dtype=torch.long)  # (U, L) left-padded rows
        extra: list[tuple[int, int, torch.Tensor]] = []
        for r, h in enumerate(histories):
            h = h[-L:]
            if not h:
                continue
            if all(isinstance(i, int) for i in h):
                hist[r, L - len(h):] = torch.tensor(h)
            else:
                for c, i in enumerate(h, start=L - len(h)):
                    if isinstance(i, int):
                        hist[r, c] = i
                    else:
                        extra.append((r, c, i))
        if not extra:
            return self.model.user_vectors(hist, self.item_vectors)  # (U, d)
        x = self.item_vectors[hist]  # (U, L, d)
        mask = hist > 0  # (U, L)
        for r, c, v in extra:
            x[r, c] = v
            mask[r, c] = True
        enc = self.model.user_encoder
        return enc.user_vector(enc(x, mask), mask)  # (U, d)

    def search(self, users: torch.Tensor, k: int, seen: list[list[int]]) -> tuple[list[list[float]], list[list[int]]]:
        """Exact top-``k`` rows over the whole catalog for user vectors ``(U, d)``, never a blocked
        row nor a row of ``seen[u]``. Returns (scores, rows) per user; fewer than ``k`` when the
        catalog runs out."""
        scores = torch.mm(users, self.item_vectors.T)  # (U, N+1)
        scores += self._mask
        r = [u for u, s in enumerate(seen) for _ in s]
        if r:
            scores[r, [i for s in seen for i in s]] = -torch.inf
        return _top(scores, k)

    def _search_in(self, user: torch.Tensor, k: int, seen: list[int], allowed: list[int]) -> tuple[list[float], list[int]]:
        """Exact top-``k`` of one user vector ``(d,)`` among the rows ``allowed`` only."""
        rows = torch.tensor(sorted(set(allowed)), dtype=torch.long)
        scores = self.item_vectors[rows] @ user + self._mask[rows]  # (m,)
        if seen:
            scores[torch.isin(rows, torch.tensor(seen, dtype=torch.long))] = -torch.inf
        vals, pos = _top(scores[None], k)
        return vals[0], rows[pos[0]].tolist()

    @torch.no_grad()
    def rank(self, histories: list[list], k: int = 10, exclude_history: bool = True,
             allowed: list[list[str] | None] | None = None) -> list[Ranking]:
        """Top-``k`` per history, best first (see ``Ranking``).

        ``histories``: per user, item ids and/or ``(d,)`` vectors of items given by content, oldest
        first. ``exclude_history`` leaves the history's catalog items out of the answer;
        ``allowed[u]`` (optional) restricts user ``u``'s answer to those item ids. An empty
        history gets the most popular training items scored by their training count when the
        model has ``popularity`` (``source="popularity"``), else the user encoder's output for an
        all-padding sequence.
        """
        if isinstance(k, bool) or not isinstance(k, int) or k < 1:
            raise ValueError(f"k must be a positive integer, got {k!r}")
        allowed = allowed if allowed is not None else [None] * len(histories)
        if len(allowed) != len(histories):
            raise ValueError(f"allowed has {len(allowed)} entries for {len(histories)} histories")
        rows = [[self.item_index(i) if isinstance(i, str) else i for i in h] if h else [] for h in histories]
        seen = [[i for i in h if isinstance(i, int)] if exclude_history else [] for h in rows]
        allowed_rows = [None if a is None else self.rows(a) for a in allowed]
        k = min(k, self.n_items)
        out: list[Ranking | None] = [None] * len(rows)
        cold = [u for u, h in enumerate(rows) if not h] if self._pop is not None else []
        for u in cold:
            if allowed_rows[u] is None:
                vals, idx = _top(self._pop[None], k)
                vals, idx = vals[0], idx[0]
            else:
                sub = torch.tensor(sorted(set(allowed_rows[u])), dtype=torch.long)
                vals, pos = _top(self._pop[sub][None], k)
                vals, idx = vals[0], sub[pos[0]].tolist()
            out[u] = self._ranking(vals, idx, "popularity")
        warm = [u for u in range(len(rows)) if out[u] is None]
        if warm:
            users = self.user_vectors([rows[u] for u in warm])  # (W, d)
            free = [j for j, u in enumerate(warm) if allowed_rows[u] is None]
            if free:
                vals, idx = self.search(users[free], k, [seen[warm[j]] for j in free])
                for j, v, i in zip(free, vals, idx):
                    out[warm[j]] = self._ranking(v, i, "model")
            for j, u in enumerate(warm):
                if allowed_rows[u] is not None:
                    out[u] = self._ranking(*self._search_in(users[j], k, seen[u], allowed_rows[u]), "model")
        return out

    def _ranking(self, scores: list[float], rows: list[int], source: str) -> Ranking:
        ids = self.item_ids
        keep = [n for n, s in enumerate(scores) if s != -math.inf]
        if len(keep) == len(scores):
            return Ranking([ids[i - 1] for i in rows], scores, source)
        return Ranking([ids[rows[n] - 1] for n in keep], [scores[n] for n in keep], source)

    def recommend(self, histories: list[list[str]], k: int = 10, exclude_history: bool = True) -> list[list[tuple[str, float]]]:
        """Top-``k`` ``(item_id, score)`` per history of item ids (oldest first); see ``rank``."""
        return [r.pairs() for r in self.rank(histories, k, exclude_history)]


def _top(scores: torch.Tensor, k: int) -> tuple[list[list[float]], list[list[int]]]:
    """Top-``k`` of each row of ``scores (U, M)`` as Python lists (values, column indices)."""
    top = scores.topk(min(k, scores.shape[1]), dim=1)
    return top.values.tolist(), top.indices.tolist()


def load_model(path: str | Path) -> ExportedModel:
    """Load a folder written by ``export_model``: no other file is needed."""
    from mmrec.models.recommender import ModelConfig, Recommender

    path = Path(path)
    meta_path = path / "model.json"
    if not meta_path.is_file():
        raise FileNotFoundError(f"{path}: not a model folder (no model.json)")
    meta = json.loads(meta_path.read_text(encoding="utf-8"))
    if meta.get("format") != MODEL_FORMAT or meta.get("version") != MODEL_VERSION:
        raise ValueError(f"{meta_path}: expected {MODEL_FORMAT} v{MODEL_VERSION}, got {meta.get('format')} v{meta.get('version')}")
    spec = dict(meta["model"])
    # weights come from model.safetensors: build every encoder with random init, from local files only
    if spec.get("text_encoder"):
        spec["text_encoder"] = {**spec["text_encoder"], "name": str(path / "text_encoder"), "random_init": True, "overrides": {}}
    if spec.get("image_encoder"):
        spec["image_encoder"] = {**spec["image_encoder"], "random_init": True, "pretrained": False, "weights": None}
    cfg = ModelConfig.from_dict(spec)
    model = Recommender(cfg, n_items=meta["n_items"])
    state = load_file(path / "model.safetensors")
    own = model.state_dict()
    missing, unexpected = sorted(set(own) - set(state)), sorted(set(state) - set(own))
    if missing or unexpected:
        raise ValueError(f"{path}/model.safetensors does not match model.json: missing {missing[:10]}, unexpected {unexpected[:10]}")
    model.load_state_dict(state, strict=True)
    model.eval()
    item_map = pl.read_parquet(path / "item_map.parquet").sort("item_idx")
    vectors = load_file(path / "item_vectors.safetensors")["item_vectors"]
    if item_map["item_idx"].to_list() != list(range(1, vectors.shape[0])):
        raise ValueError(f"{path}: item_map.parquet does not match item_vectors ({item_map.height} vs {vectors.shape[0] - 1} items)")
    popularity = None
    if "train_count" in item_map.columns:
        popularity = torch.cat([torch.zeros(1, dtype=torch.int64), item_map["train_count"].cast(pl.Int64).to_torch()])
    return ExportedModel(model, item_map["item_id"].to_list(), vectors, meta, popularity)

