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
holds ``train_count``, scored by that count.
"""

from __future__ import annotations

import json
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
class ExportedModel:
    """A loaded model folder: the network, the catalog's item ids and vectors."""

    model: Any
    item_ids: list[str]
    item_vectors: torch.Tensor
    meta: dict[str, Any]
    popularity: torch.Tensor | None = None
    """(N+1,) training interactions per item (row 0 = padding), or None; ranks empty histories."""

    def __post_init__(self):
        self._index = {iid: i + 1 for i, iid in enumerate(self.item_ids)}

    def item_index(self, item_id: str) -> int:
        try:
            return self._index[item_id]
        except KeyError:
            raise KeyError(f"unknown item id {item_id!r} (not in this model's catalog of {len(self.item_ids)} items)") from None

    @torch.no_grad()
    def recommend(self, histories: list[list[str]], k: int = 10, exclude_history: bool = True) -> list[list[tuple[str, float]]]:
        """Top-``k`` ``(item_id, score)`` per history of item ids (oldest first).

        An empty history gets the most popular training items scored by their training count when
        the model has ``popularity`` (else the user encoder's output for an all-padding sequence).
        """
        L = self.model.cfg.max_len
        rows = [[self.item_index(i) for i in h][-L:] for h in histories]
        hist = torch.zeros(len(rows), L, dtype=torch.long)
        for r, h in enumerate(rows):
            if h:
                hist[r, L - len(h):] = torch.tensor(h)
        scores = self.model.user_vectors(hist, self.item_vectors) @ self.item_vectors.T  # (U, N+1)
        if self.popularity is not None:
            cold = [r for r, h in enumerate(rows) if not h]
            if cold:
                pop = torch.zeros(scores.shape[1])
                pop[: self.popularity.shape[0]] = self.popularity.to(pop.dtype)  # items added later count 0
                scores[cold] = pop
        scores[:, 0] = -torch.inf
        if exclude_history:
            for r, h in enumerate(histories):
                if h:
                    scores[r, [self._index[i] for i in h]] = -torch.inf
        k = min(k, len(self.item_ids))
        top = scores.topk(k, dim=1)
        return [
            [(self.item_ids[int(j) - 1], float(s)) for s, j in zip(srow, jrow) if torch.isfinite(s)]
            for srow, jrow in zip(top.values, top.indices)
        ]


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

