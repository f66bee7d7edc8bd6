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
``new_items`` optional list of ``{"item_id", "text", "image_base64"}`` dicts: items that are not
              in the catalog (cold-start items added after training). Their vectors come from
              the model's own item tower run over their raw content (``mmrec.serving.encode_items``:
              the text tokenized by the model's tokenizer, the image *bytes* (base64) decoded
              within ``mmrec.serving.Limits`` and preprocessed by the image encoder's
              ``transform()``), exactly as catalog items are encoded; they may appear in the
              row's ``history`` and they are candidates for that row, next to the catalog. A new
              item needs text or an image (the model's tower must use that modality); its id
              must not be a catalog id. Nothing in a request names a file on the server. An
              ID-based model cannot encode new items and raises.

Output: a DataFrame with ``item_ids`` (list of str) and ``scores`` (list of float) per row, best
first, items of the history excluded: the same as ``ExportedModel.recommend``.

REST (``mlflow models serve --env-manager local``): ``{"dataframe_records": [{"history": [...],
"new_items": [...]}, {"history": [...]}], "params": {"k": 5}}``; fields may be left out per record. ``k`` must be an integer in 1..200
(``Limits.max_k``): 0 and negative values are errors. Torch uses at most ``$MMREC_SERVE_THREADS``
(default 4) threads. The service in ``deploy/`` (``python -m deploy.serve``) serves the same
folder with the same library code, plus a live catalog; this wrapper exists for MLflow's own
tools (``mlflow.pyfunc.load_model``, ``mlflow models serve``).
"""

from __future__ import annotations

import math
import os
from typing import Any

import mlflow
import pandas as pd
from mlflow.pyfunc import PythonModel

DEFAULT_K = 10


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
    from mmrec.serving import Limits, check_k

    if hasattr(v, "item"):  # numpy scalars from a DataFrame column
        v = v.item()
    if isinstance(v, float) and v.is_integer():
        v = int(v)
    return check_k(v, Limits())


def _new_item(it: Any):
    import base64
    import binascii

    from mmrec.serving import NewItem

    if not isinstance(it, dict) or not it.get("item_id"):
        raise ValueError(f"each new item must be a dict with an item_id, got {it!r}")
    if it.get("image_path"):
        raise ValueError(f"new item {it['item_id']!r}: image_path is not accepted (nothing in a request may name a "
                         "server file); send the image's bytes as image_base64")
    image = None
    if it.get("image_base64"):
        try:
            image = base64.b64decode(it["image_base64"], validate=True)
        except (binascii.Error, ValueError, TypeError):
            raise ValueError(f"new item {it['item_id']!r}: image_base64 is not valid base64") from None
    return NewItem(str(it["item_id"]), it.get("text"), image)


def encode_new_items(model, items: list[dict[str, Any]]):
    """Item vectors ``(m, d)`` of ``{"item_id", "text", "image_base64"}`` dicts through ``model``'s
    item tower (``mmrec.serving.encode_items``)."""
    from mmrec.serving import encode_items

    return encode_items(model, [_new_item(it) for it in items])


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
            iid = _new_item(it).item_id
            if iid in ids or iid in exp._index:
                raise ValueError(f"new item id {iid!r} is already in the catalog or given twice")
            ids.append(iid)
        vecs = encode_new_items(exp.model, new_items)
        return ExportedModel(exp.model, exp.item_ids + ids, torch.cat([exp.item_vectors, vecs]), exp.meta, exp.popularity)

    def predict(self, context, model_input: pd.DataFrame, params: dict[str, Any] | None = None) -> pd.DataFrame:
        df = model_input if isinstance(model_input, pd.DataFrame) else pd.DataFrame(model_input)
        if "history" not in df.columns:
            raise ValueError(f"input needs a 'history' column (list of item ids); got columns {list(df.columns)}")
        k_param = (params or {}).get("k")
        default_k = DEFAULT_K if _is_missing(k_param) else _as_k(k_param)
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
