"""Promotion of a retrained model (challenger against champion) and rollback.

Scheduled retraining registers every new model as the *challenger*; it becomes the *champion*
(the alias the service serves) only when its quality gate passed **and** it beats the current
champion on the new model's validation split under the same protocol:

- the same users, histories and targets (``validated_catalog/<domain>/splits.parquet`` of the
  current data), ranked against the same full catalog (every item of the current data);
- the same evaluation code as the quality gate and the evaluation stage
  (``mmrec.experiment.evaluate_vectors``: full ranking, ``evaluation.history`` masking,
  ``evaluation.ks``), each model reading at most its own ``max_len`` history items;
- the gate's metric (``evaluation.gate_metric``), strictly greater (a tie keeps the champion).

Both models are scored here, from their exported folders, rather than reusing the challenger's
early-stopping record, so the two numbers come from one computation. The champion ranks the
current catalog as it would serve it: items it exported keep their exported vectors, items it
never saw are encoded by its own item tower from the catalog's raw content (text, image), as the
service encodes items added at run time. A champion without a content tower (ID embeddings)
cannot score new items: the comparison then fails with a message, and nothing is promoted.

Registry side (``Registry``: aliases and version tags; ``deploy.registry.MlflowRegistry``
implements it for MLflow): ``record`` tags the new version with both numbers and the verdict
(``promotion.*``, and a one-line description), points ``challenger`` at it, and, when it wins,
points ``previous_champion`` at the champion it replaces (also kept as the version tag
``previous_champion``, so the chain survives several promotions) and ``champion`` at it.
``rollback`` moves ``champion`` back to ``previous_champion`` and steps that alias one further
back along the chain. No registry library is imported here.
"""

from __future__ import annotations

import io
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Protocol

CHAMPION = "champion"
CHALLENGER = "challenger"
PREVIOUS_TAG = "previous_champion"
"""Version tag: the champion a version replaced when it was promoted."""


def previous_alias(alias: str = CHAMPION) -> str:
    """The alias that keeps the version ``alias`` pointed at before the last promotion."""
    return f"previous_{alias}"


class PromotionError(RuntimeError):
    """A comparison or a registry move that cannot be done; the message says why."""


# ------------------------------------------------------------------------------------------------
# Scoring on the same validation data

@dataclass(frozen=True)
class Comparison:
    """Challenger and champion scored on the challenger's validation split (same protocol)."""

    metric: str
    """The gate metric (``evaluation.gate_metric``) the decision reads."""
    challenger: dict[str, Any]
    """The challenger's validation metrics (``evaluate_vectors``)."""
    champion: dict[str, Any] | None
    """The champion's validation metrics on the same users and catalog; None when there is no champion."""
    champion_version: str | None
    """The registry version of the champion compared with (None: none yet)."""
    history: str
    """The history masking protocol (``evaluation.history``)."""
    n_users: int
    n_items: int
    encoded: int = 0
    """Catalog items the champion had not exported and encoded from raw content."""

    @property
    def challenger_value(self) -> float:
        return float(self.challenger[self.metric])

    @property
    def champion_value(self) -> float | None:
        return None if self.champion is None else float(self.champion[self.metric])

    @property
    def better(self) -> bool:
        """The challenger beats the champion (strictly), or there is no champion."""
        return self.champion is None or self.challenger_value > self.champion_value

    def summary(self) -> str:
        head = f"valid {self.metric} ({self.n_users} users, {self.n_items} items, history {self.history}): "
        if self.champion is None:
            return head + f"challenger {self.challenger_value:.4f}; no champion to compare with"
        return (head + f"challenger {self.challenger_value:.4f} vs champion v{self.champion_version} "
                       f"{self.champion_value:.4f}" + (f" ({self.encoded} items encoded by the champion)" if self.encoded else ""))

    def tags(self) -> dict[str, str]:
        out = {"promotion.metric": self.metric, "promotion.split": "valid", "promotion.history": self.history,
               "promotion.users": str(self.n_users), "promotion.items": str(self.n_items),
               "promotion.challenger_value": f"{self.challenger_value:.6f}"}
        if self.champion is not None:
            out.update({"promotion.champion_version": str(self.champion_version),
                        "promotion.champion_value": f"{self.champion_value:.6f}",
                        "promotion.champion_encoded_items": str(self.encoded)})
        return out


RawItems = Callable[[list[str]], list]
"""``ids -> [mmrec.serving.NewItem]``: the raw content of catalog items (for a model that lacks them)."""


def catalog_vectors(exported, item_ids: list[str], raw: RawItems | None = None):
    """``(vectors (N+1, d), n_encoded)``: row ``i`` is item ``item_ids[i-1]`` as ``exported``
    serves it: its exported vector, or, for an item it never exported, its tower's encoding of
    the item's raw content (``raw``)."""
    import torch

    index = exported._index
    rows = torch.tensor([index.get(i, 0) for i in item_ids], dtype=torch.long)
    vectors = torch.zeros(len(item_ids) + 1, exported.item_vectors.shape[1], dtype=exported.item_vectors.dtype)
    vectors[1:] = exported.item_vectors[rows]
    missing = [n for n, r in enumerate(rows.tolist()) if r == 0]
    if missing:
        from mmrec.serving import ContentError, Limits, encode_items

        name = exported.meta.get("domain")
        if raw is None:
            raise PromotionError(f"the model of {name!r} lacks {len(missing)} of the {len(item_ids)} catalog items "
                                 f"(e.g. {item_ids[missing[0]]!r}) and no raw content was given to encode them")
        ids = [item_ids[n] for n in missing]
        big = 1 << 40
        limits = Limits(max_items=len(ids), max_text_chars=big, max_image_bytes=big, max_image_pixels=big)
        try:
            encoded = encode_items(exported.model, raw(ids), limits)
        except ContentError as exc:
            raise PromotionError(f"the model cannot score the {len(ids)} catalog items it never saw "
                                 f"(e.g. {ids[0]!r}): {exc}") from None
        vectors[torch.tensor(missing) + 1] = encoded.to(vectors.dtype)
    return vectors, len(missing)


def validation_metrics(exported, item_ids: list[str], data, ks, batch_size: int, history: str,
                       raw: RawItems | None = None) -> tuple[dict[str, Any], int]:
    """``exported``'s metrics on ``data``'s validation split over the catalog ``item_ids`` (item
    index ``i`` = ``item_ids[i-1]``), with the evaluation stage's code; and how many items it encoded."""
    from mmrec.experiment import evaluate_vectors

    vectors, encoded = catalog_vectors(exported, item_ids, raw)
    model = exported.model
    metrics = evaluate_vectors(lambda h: model.user_vectors(h, vectors), vectors, data, "valid", model.cfg.max_len,
                               ks, batch_size, history)
    return metrics, encoded


def raw_items(catalog_dir: Path) -> RawItems:
    """Raw content of a validated catalog's items (text as the features join it, image as PNG bytes)."""
    from mmrec.data.catalog import Catalog
    from mmrec.serving import NewItem

    catalog = Catalog.read(catalog_dir)
    rows = {r["item_id"]: r for r in catalog.items.select("item_id", "image", catalog.text().alias("text")).iter_rows(named=True)}

    def image(ref):
        if not ref or catalog.images is None:
            return None
        buf = io.BytesIO()
        catalog.images.read(ref).save(buf, format="PNG")  # files and LMDB arrays alike
        return buf.getvalue()

    return lambda ids: [NewItem(i, rows[i]["text"], image(rows[i]["image"])) for i in ids]


def compare(cfg, domain: str, challenger_dir: str | Path, champion_dir: str | Path | None = None,
            champion_version: str | None = None) -> Comparison:
    """Score the challenger folder and the champion folder (if any) on ``domain``'s current
    validation split with the configured protocol (``cfg.evaluation()``)."""
    import polars as pl

    from mmrec.data.sequences import SequenceData
    from mmrec.export import load_model

    d = cfg.domain(domain)
    ec = cfg.evaluation()
    folder = cfg.artifact_path("validated_catalog", d.name)
    splits_path = folder / "splits.parquet"
    if not splits_path.is_file():
        raise FileNotFoundError(f"{splits_path}: run validated_catalog for domain {d.name!r} first")
    item_ids = pl.read_parquet(folder / "item_map.parquet").sort("item_idx")["item_id"].to_list()
    data = SequenceData.from_splits(pl.read_parquet(splits_path), len(item_ids))
    if ec.gate_metric.split("@")[0] not in ("HR", "NDCG", "MRR"):
        raise PromotionError(f"gate_metric {ec.gate_metric!r} is not a validation metric")
    challenger = load_model(challenger_dir)
    if len(challenger.item_ids) != len(item_ids) or challenger.item_ids != item_ids:
        raise PromotionError(f"{challenger_dir} was not trained on the current {d.name!r} catalog "
                             f"({len(challenger.item_ids)} items vs {len(item_ids)}): fine-tune it first")
    mine, _ = validation_metrics(challenger, item_ids, data, ec.ks, ec.batch_size, ec.history)
    theirs, encoded = None, 0
    if champion_dir is not None:
        champion = load_model(champion_dir)
        theirs, encoded = validation_metrics(champion, item_ids, data, ec.ks, ec.batch_size, ec.history,
                                             raw=raw_items(folder / "catalog"))
    for name, m in (("challenger", mine), ("champion", theirs)):
        if m is not None and not isinstance(m.get(ec.gate_metric), (int, float)):
            raise PromotionError(f"the {name} has no {ec.gate_metric} on the validation split (metrics: {sorted(m)})")
    return Comparison(ec.gate_metric, mine, theirs, None if champion_dir is None else str(champion_version), ec.history,
                      int(mine["n_users"]), len(item_ids), encoded)


# ------------------------------------------------------------------------------------------------
# The registry side

class Registry(Protocol):
    """Aliases and version tags of one model registry (versions are strings)."""

    def alias_version(self, name: str, alias: str) -> str | None: ...
    def set_alias(self, name: str, alias: str, version: str) -> None: ...
    def delete_alias(self, name: str, alias: str) -> None: ...
    def version_tags(self, name: str, version: str) -> dict[str, str]: ...
    def set_version_tags(self, name: str, version: str, tags: dict[str, str]) -> None: ...
    def set_description(self, name: str, version: str, text: str) -> None: ...


@dataclass(frozen=True)
class Decision:
    """What ``record`` did with a new version."""

    version: str
    promoted: bool
    champion: str | None
    """The champion's version afterwards."""
    previous: str | None
    """The champion it replaced (when promoted), else None."""
    reason: str
    tags: dict[str, str] = field(default_factory=dict)


def record(registry: Registry, name: str, version: str, comparison: Comparison | None, gate_passed: bool = True,
           alias: str = CHAMPION, error: str | None = None) -> Decision:
    """Tag ``name`` version ``version`` with the comparison and the verdict, point ``challenger``
    at it and promote it to ``alias`` when its gate passed and it beats the champion.

    ``comparison`` None (with ``error`` saying why) records a version that could not be compared:
    it is not promoted. The champion must still be the one compared with, else ``PromotionError``
    (it moved meanwhile, e.g. a rollback: compare again)."""
    version = str(version)
    current = registry.alias_version(name, alias)
    if comparison is not None and current != comparison.champion_version:
        raise PromotionError(f"{name}@{alias} is version {current} now, not {comparison.champion_version} as when "
                             "the models were compared: compare again")
    tags = dict(comparison.tags()) if comparison is not None else {}
    if comparison is None:
        promote, reason = False, f"not compared: {error or 'no comparison'}"
    elif not gate_passed:
        promote, reason = False, "quality gate failed"
    elif comparison.champion is None:
        promote, reason = True, "first champion"
    elif comparison.better:
        promote, reason = True, f"beats v{current}"
    else:
        promote, reason = False, f"does not beat v{current}"
    tags.update({"promotion.gate": "passed" if gate_passed else "failed",
                 "promotion.decision": "promoted" if promote else "held", "promotion.reason": reason})
    previous = current if promote and current not in (None, version) else None
    if previous is not None:
        tags[PREVIOUS_TAG] = previous
    registry.set_version_tags(name, version, tags)
    registry.set_description(name, version, f"{'promoted' if promote else 'held'} ({reason}); "
                                            + (comparison.summary() if comparison is not None else ""))
    registry.set_alias(name, CHALLENGER, version)
    if promote:
        if previous is not None:
            registry.set_alias(name, previous_alias(alias), previous)
        registry.set_alias(name, alias, version)
    return Decision(version, promote, version if promote else current, previous, reason, tags)


@dataclass(frozen=True)
class Rollback:
    name: str
    from_version: str
    to_version: str
    previous: str | None
    """What ``previous_champion`` points at afterwards (None: nothing further back)."""


def rollback(registry: Registry, name: str, alias: str = CHAMPION, now: Callable[[], float] = time.time) -> Rollback:
    """Move ``name@alias`` back to ``name@previous_<alias>``; that alias steps one further back
    (the ``previous_champion`` tag the restored version got when it was promoted) or is removed."""
    prev_alias = previous_alias(alias)
    current = registry.alias_version(name, alias)
    if current is None:
        raise PromotionError(f"{name} has no {alias!r} alias: nothing to roll back")
    target = registry.alias_version(name, prev_alias)
    if target is None or target == current:
        raise PromotionError(f"{name}@{alias} is version {current} and no earlier {alias} is recorded "
                             f"(no {prev_alias!r} alias): nothing to roll back to")
    earlier = registry.version_tags(name, target).get(PREVIOUS_TAG)
    registry.set_alias(name, alias, target)
    if earlier and earlier not in (target, current):
        registry.set_alias(name, prev_alias, earlier)
    else:
        registry.delete_alias(name, prev_alias)
        earlier = None
    stamp = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(now()))
    registry.set_version_tags(name, current, {"rolled_back": stamp, "rolled_back_to": target})
    return Rollback(name, current, target, earlier)
