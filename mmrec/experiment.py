"""Glue between the model, the data and the trainer: fit on a domain's training sequences with
early stopping on validation NDCG, and full-ranking evaluation on a split (history masked)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from mmrec.data.sequences import SequenceData, TrainExamples
from mmrec.evaluation import full_ranking


def flat_metrics(res: dict[str, Any]) -> dict[str, float | None]:
    """``{"HR@10": .., "cold/HR@10": .., "n_users": .., "n_cold_users": ..}`` from ``full_ranking``."""
    out: dict[str, float | None] = dict(res["all"])
    for k, v in (res.get("cold") or {}).items():
        out[f"cold/{k}"] = v
    out["n_users"] = res["n_users"]
    out["n_cold_users"] = res.get("n_cold_users")
    return out


@torch.no_grad()
def evaluate_vectors(user_vectors_fn: Callable[[torch.Tensor], torch.Tensor], item_vecs: torch.Tensor, data: SequenceData,
                     split: str, max_len: int, ks=(5, 10, 20), batch_size: int = 1024, history: str = "masked",
                     ranks_out: dict | None = None) -> dict[str, float | None]:
    """Full ranking of ``split``'s targets over every item; ``history`` as in ``mmrec.evaluation``
    (default: each user's whole history masked). ``ranks_out["ranks"]`` receives the per-user ranks."""
    hist, targets = data.histories(split, max_len)
    users = torch.cat([user_vectors_fn(hist[s:s + batch_size]) for s in range(0, hist.shape[0], batch_size)])
    res = full_ranking(users, item_vecs, data.full_histories(split), targets, ks=tuple(ks), batch_size=batch_size,
                       cold_items=data.cold_items(), history=history, return_ranks=True)
    if ranks_out is not None:
        ranks_out["ranks"] = res["ranks"]
    return flat_metrics(res)


def evaluate_model(model, data: SequenceData, split: str, ks=(5, 10, 20), batch_size: int = 1024, history: str = "masked",
                   ranks_out: dict | None = None) -> dict[str, float | None]:
    """Metrics of a ``Recommender`` (content attached) on ``split``."""
    was_training = model.training
    model.eval()
    items = model.all_item_vectors()
    out = evaluate_vectors(lambda h: model.user_vectors(h, items), items, data, split, model.cfg.max_len, ks, batch_size,
                           history, ranks_out)
    model.train(was_training)
    return out


def fit(model, data: SequenceData, train_cfg, out_dir: Path, tracker=None, ks=(5, 10, 20), batch_size: int = 1024,
        history: str = "masked", **kw):
    """Train ``model`` on ``data``'s training sequences; early stopping on validation (never test)."""
    from mmrec.training import train

    dataset = TrainExamples(data.train_examples(model.cfg.train_window - 1))  # rows of train_window items
    if len(dataset) == 0:
        raise ValueError("no user has a training sequence of 2 or more items")

    def evaluate(m):
        return {k: v for k, v in evaluate_model(m, data, "valid", ks, batch_size, history).items() if v is not None}

    return train(model, dataset, TrainExamples.collate, evaluate, train_cfg, out_dir, tracker=tracker, **kw)
