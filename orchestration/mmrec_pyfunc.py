"""The served model as an MLflow pyfunc "model from code" (no pickle: MLflow stores this file).

``orchestration.mlflow_support.register_model`` logs this file with ``artifacts={"model": <an
exported model folder>}``; MLflow copies both into the model and runs this file again at load
time. The file only imports ``mmrec``, ``torch`` and ``pandas``: the serving environment needs the
``mmrec`` package installed (it loads the folder with ``mmrec.export.load_model``, nothing else).

Input: a DataFrame, one row per request.

``history``   list of item ids, oldest first (required; may be empty: a new user gets the most
              popular training items, scored by their training count). Every id must be in the
              model's catalog or among the row's ``new_items``; an unknown id is an error.
``k``         number of recommendations (optional column, per row; else ``params={"k": ...}``;
              else 10).
``new_items`` optional list of ``{"item_id", "text", "image_path"}`` dicts: items that are not in
              the catalog (cold-start items added after training). Their vectors come from the
              model's own item tower run over their raw content (the text tokenized by the model's
              tokenizer, the image read from ``image_path`` and preprocessed by the image
              encoder's ``transform()``), exactly as catalog items are encoded; they may appear in
              the row's ``history`` and they are candidates for that row, next to the catalog.
              A new item needs text or an image (the model's tower must use that modality); its id
              must not be a catalog id. ``image_path`` is read from the serving machine: relative
              to ``$MMREC_IMAGE_ROOT`` when that is set (paths escaping it are refused), else as
              given. An ID-based model cannot encode new items and raises.

Output: a DataFrame with ``item_ids`` (list of str) and ``scores`` (list of float) per row, best
first, items of the history excluded: the same as ``ExportedModel.recommend``.

REST (``mlflow models serve --env-manager local``): ``{"dataframe_records": [{"history": [...],
"new_items": [...]}, {"history": [...]}], "params": {"k": 5}}``; fields may be left out per record.
Torch uses at most ``$MMREC_SERVE_THREADS`` (default 4) threads.
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Any

import mlflow
import pandas as pd
from mlflow.pyfunc import PythonModel

DEFAULT_K = 10
IMAGE_ROOT_ENV = "MMREC_IMAGE_ROOT"


def _is_missing(v: Any) -> bool:
    return v is None or (isinstance(v, float) and math.isnan(v))


def _as_list(v: Any) -> list:
    """A cell holding a list (MLflow's schema enforcement may hand over numpy arrays)."""
    if _is_missing(v):
        return []
    if isinstance(v, (str, bytes, dict)):
        raise ValueError(f"expected a list, got {type(v).__name__} {v!r}")
    return list(v)


def _as_k(v: Any) -> int:
    k = int(v)
    if k != v or k < 1:
        raise ValueError(f"k must be a positive integer, got {v!r}")
    return k


def _read_image(ref: str):
    from mmrec.data.images import ImageStore

    root = os.environ.get(IMAGE_ROOT_ENV)
    if root:
        return ImageStore("files", Path(root)).read(ref)  # refuses paths that escape the root
    p = Path(ref).absolute()
    return ImageStore("files", p.parent).read(p.name)


def encode_new_items(model, items: list[dict[str, Any]]):
    """Item vectors ``(m, d)`` of items given by raw content, through ``model``'s item tower
    (a ``Recommender`` in eval mode). ``items``: dicts with ``item_id``, ``text``, ``image_path``."""
    import torch

    from mmrec.models.towers import ItemContent

    modalities = model.cfg.item_tower.modalities
    if not modalities:
        raise ValueError(f"the {model.cfg.item_tower.name!r} item tower has no content encoder: it cannot score new items")
    m = len(items)
    texts = [str(it.get("text") or "") for it in items]
    paths = [str(it.get("image_path") or "") for it in items]
    has_text = torch.tensor([False] + [bool(t.strip()) and "text" in modalities for t in texts])
    has_image = torch.tensor([False] + [bool(p) and "image" in modalities for p in paths])
    for it, t, v in zip(items, has_text[1:], has_image[1:]):
        if not (t or v):
            raise ValueError(f"new item {it.get('item_id')!r} has no content this model reads (modalities: {list(modalities)})")
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
            for i, p in enumerate(paths, start=1):
                if has_image[i]:
                    pixels[i] = tf(_read_image(p))
            # transform() output is normalised float, as in the feature pipeline: feed it as
            # "hidden" (the bottom's output, or the pixels themselves when no part is frozen)
            content.image = {"hidden": enc.bottom(pixels) if enc.cacheable else pixels}
        was_training = model.training
        model.eval()
        try:
            vecs = tower(content, torch.arange(1, m + 1))  # (m, d)
        finally:
            model.train(was_training)
    return vecs


def _in_catalog(exported, item_id: str) -> bool:
    try:
        exported.item_index(item_id)
    except KeyError:
        return False
    return True


class MMRecModel(PythonModel):
    """Top-k recommendations of an exported mmrec model (see the module docstring)."""

    def load_context(self, context):
        import torch

        from mmrec.export import load_model

        torch.set_num_threads(max(1, min(torch.get_num_threads(), int(os.environ.get("MMREC_SERVE_THREADS", "4")))))
        self.exported = load_model(context.artifacts["model"])

    def _with_new_items(self, new_items: list[dict[str, Any]]):
        import torch

        from mmrec.export import ExportedModel

        exp = self.exported
        ids = []
        for it in new_items:
            if not isinstance(it, dict) or not it.get("item_id"):
                raise ValueError(f"each new item must be a dict with an item_id, got {it!r}")
            iid = str(it["item_id"])
            if iid in ids or _in_catalog(exp, iid):
                raise ValueError(f"new item id {iid!r} is already in the catalog or given twice")
            ids.append(iid)
        vecs = encode_new_items(exp.model, new_items)
        return ExportedModel(exp.model, exp.item_ids + ids, torch.cat([exp.item_vectors, vecs]), exp.meta, exp.popularity)

    def predict(self, context, model_input: pd.DataFrame, params: dict[str, Any] | None = None) -> pd.DataFrame:
        df = model_input if isinstance(model_input, pd.DataFrame) else pd.DataFrame(model_input)
        if "history" not in df.columns:
            raise ValueError(f"input needs a 'history' column (list of item ids); got columns {list(df.columns)}")
        default_k = int((params or {}).get("k") or DEFAULT_K)
        n = len(df)
        histories = [[str(i) for i in _as_list(h)] for h in df["history"]]
        ks = [default_k if _is_missing(v) else _as_k(v) for v in (df["k"] if "k" in df.columns else [None] * n)]
        news = [_as_list(v) for v in df["new_items"]] if "new_items" in df.columns else [[] for _ in range(n)]
        out: list[list[tuple[str, float]] | None] = [None] * n
        # rows without new items: one batched call per k
        for k in sorted({k for k, new in zip(ks, news) if not new}):
            rows = [r for r in range(n) if ks[r] == k and not news[r]]
            for r, recs in zip(rows, self.exported.recommend([histories[r] for r in rows], k=k)):
                out[r] = recs
        for r in range(n):
            if news[r]:
                out[r] = self._with_new_items([dict(it) for it in news[r]]).recommend([histories[r]], k=ks[r])[0]
        return pd.DataFrame({"item_ids": [[i for i, _ in recs] for recs in out],
                             "scores": [[s for _, s in recs] for recs in out]})


mlflow.models.set_model(MMRecModel())
