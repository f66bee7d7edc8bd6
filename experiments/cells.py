"""The experiment cells and how each one's config derives from the base config.

Every cell runs under the masked evaluation protocol and keeps the base config's data, model and
training budget except for what its ``overrides`` say. Groups (``GROUPS``):

- ``transfer``: the base config as it is (fine-tuned, from scratch, in-tree SASRec, ``id_tower``,
  zero-shot: the rows of ``mmrec run`` + ``mmrec metrics``) and RecBole's SASRec on the same split
  when ``.venv-recbole`` exists (what ``mmrec compare`` runs).
- ``source_fraction``: pretraining on 25 % / 50 % of every source domain's users (0 % is the
  transfer cell's from-scratch row, 100 % its fine-tuned row).
- ``target_fraction``: fine-tuning (and every trained baseline) on 10 % / 25 % / 50 % of the
  target's users (100 % is the transfer cell); the test users are that share's.
- ``modality``: text-only, image-only and the fused tower with each fusion, NICL off in every row
  (a single-modality tower cannot have it), each pretrained + fine-tuned and from scratch.
- ``mom``: TransRec's mixture-of-modality routing (``mom`` tower) against the fused tower on a demo
  catalog in which every item has text *or* an image (demo configs only), NICL off in both.
- ``objective``: the next-item loss alone, + NICL, + NID, + RCL (each alone on top of the
  next-item loss); all four together is the transfer cell when the base config trains with all
  four, else a cell of its own (``objective-all``).

Cold-start vs warm targets and training cost are read from every cell's own run (the transfer
and target-fraction cells carry every model).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from mmrec.config import PipelineConfig

GROUPS = ("transfer", "source_fraction", "target_fraction", "modality", "mom", "objective")
SOURCE_FRACTIONS = (0.25, 0.5)
TARGET_FRACTIONS = (0.1, 0.25, 0.5)
FUSIONS = ("sum", "concat", "gated", "merge_attention")
MOM_DEMO = {"p_text_only": 0.5, "p_image_only": 0.5}
"""Every demo item text-only or image-only (TransRec's mixture-of-modality feedback)."""
MOM_VALIDATION = {"min_text_share": 0.35, "min_image_share": 0.35}
"""The demo config's shares (0.7 / 0.6) assume half the items carry both modalities."""
REPO = Path(__file__).resolve().parents[1]
TINY_PRESET = REPO / "configs" / "presets" / "tiny.yaml"

NO_NICL = {"model": {"objective": {"nicl_enabled": False}}}


@dataclass(frozen=True)
class Cell:
    """One experiment configuration (run once per seed)."""

    name: str
    """Unique, file-name safe: the record is ``<name>-seed<N>.json``."""
    group: str
    label: str
    """What the cell's main row is, in words (tables)."""
    overrides: dict[str, Any] = field(default_factory=dict)
    """Merged onto the base config's model-stage sections (``model``, ``pretrain``, ...)."""
    source_fraction: float = 1.0
    """``user_fraction`` of every source domain."""
    target_fraction: float = 1.0
    """``user_fraction`` of every target domain."""
    demo: dict[str, Any] | None = None
    """Demo-data overrides: the cell's domains read demo data generated with them."""
    recbole: bool = False
    """Also train RecBole's SASRec on the cell's target split (when its environment exists)."""
    value: float | None = None
    """The cell's position on its group's axis (a user fraction), for tables and plots."""
    needs: tuple[str, ...] = ()
    """The modalities the cell's item tower reads together (``text``, ``image``; ``text-or-image``:
    MoM routing, items of both routes): on target domains where no item has them the cell is not
    applicable, found when it runs (``not_applicable``; the plan has not read the data)."""


@dataclass(frozen=True)
class Skipped:
    """A cell of the plan that cannot run with this base config, and why."""

    name: str
    group: str
    reason: str


def _baselines(cfg: PipelineConfig, keep: tuple[str, ...]) -> dict[str, Any]:
    base = cfg.evaluation().baselines
    chosen = [b for b in base if b in keep]
    return {"evaluation": {"baselines": chosen, "gate_against": [g for g in cfg.evaluation().gate_against if g in chosen]}}


def plan(cfg: PipelineConfig, recbole: bool) -> tuple[list[Cell], list[Skipped]]:
    """Every cell for base config ``cfg``, and the cells it cannot have."""
    cells: list[Cell] = []
    skipped: list[Skipped] = []
    every = cfg.evaluation().baselines
    cells.append(Cell("transfer", "transfer", "pretrained on the sources, fine-tuned (the base config as it is)",
                      recbole=recbole, value=1.0))
    if not cfg.sources:
        skipped += [Skipped(f"source-{int(100 * f)}", "source_fraction", "no source domain") for f in SOURCE_FRACTIONS]
    for f in SOURCE_FRACTIONS:
        if cfg.sources:
            cells.append(Cell(f"source-{int(100 * f)}", "source_fraction", f"pretrained on {100 * f:g} % of the source users",
                              _baselines(cfg, ("zero_shot",)), source_fraction=f, value=f))
    for f in TARGET_FRACTIONS:
        cells.append(Cell(f"target-{int(100 * f)}", "target_fraction", f"fine-tuned on {100 * f:g} % of the target users",
                          _baselines(cfg, every), target_fraction=f, recbole=recbole, value=f))
    scratch = _baselines(cfg, ("scratch",)) if "scratch" in every else {"evaluation": {"baselines": ["scratch"], "gate_against": []}}
    for tower in ("text", "image"):
        cells.append(Cell(f"tower-{tower}", "modality", f"{tower}-only item tower",
                          _merge(_merge(NO_NICL, scratch), {"model": {"item_tower": {"name": tower}}}), needs=(tower,)))
    for fusion in FUSIONS:
        cells.append(Cell(f"fused-{fusion}", "modality", f"fused tower, {fusion} fusion",
                          _merge(_merge(NO_NICL, scratch), {"model": {"item_tower": {"name": "fused"},
                                                                      "fusion": {"name": fusion}}}),
                          needs=("text", "image")))
    for tower in ("mom", "fused"):
        name, label = f"mom-{tower}", ("MoM routing (each item through its own modality's encoder)" if tower == "mom"
                                       else "fused tower (merge_attention)")
        over = _merge(_merge(NO_NICL, scratch), {"model": {"item_tower": {"name": tower}}})
        if tower == "fused":
            over = _merge(over, {"model": {"fusion": {"name": "merge_attention"}}})
        if cfg.demo is not None:  # demo data regenerated with every item text-only or image-only
            cells.append(Cell(name, "mom", label + ", text-OR-image catalog", over, demo=dict(MOM_DEMO)))
        else:
            # the config's own data: an item with both modalities is routed to its image (TransRec's
            # items are text OR image; an image-less item goes through the text encoder), so the catalog
            # must hold items of both routes (MovieLens-100K: 62 posterless films), found when it runs
            if tower == "mom":
                over = _merge(over, {"model": {"item_tower": {"mom_both": "image"}}})
                label = "MoM routing (an item through its image encoder, its text encoder where it has no image)"
            cells.append(Cell(name, "mom", label, over, needs=("text-or-image",)))
    objectives = {
        "next-item": ("next-item loss alone", {"nicl_enabled": False, "nid_weight": 0.0, "rcl_weight": 0.0}),
        "nicl": ("next-item + NICL", {"nid_weight": 0.0, "rcl_weight": 0.0}),
        "nid": ("next-item + NID", {"nicl_enabled": False, "rcl_weight": 0.0}),
        "rcl": ("next-item + RCL", {"nicl_enabled": False, "nid_weight": 0.0}),
    }
    base_obj = cfg.model().objective
    defaults = {"nid_weight": base_obj.nid_weight or 0.1, "rcl_weight": base_obj.rcl_weight or 0.1, "nicl_enabled": True}
    if not (base_obj.nicl_enabled and base_obj.nid_weight > 0 and base_obj.rcl_weight > 0):
        # the base config trains without some auxiliary loss: all four together is a cell of its own
        objectives["all"] = ("next-item + NICL + NID + RCL", {})
    for key, (label, obj) in objectives.items():
        obj = {**{k: v for k, v in defaults.items() if k not in obj}, **obj}
        cells.append(Cell(f"objective-{key}", "objective", label,
                          {"model": {"objective": obj}, "evaluation": {"baselines": [], "gate_against": []}}))
    return cells, skipped


def not_applicable(cell: Cell, stats: dict[str, dict[str, Any]]) -> str | None:
    """Why ``cell`` cannot be measured on target domains with these validated-catalog ``stats``
    (``validated_catalog``'s ``stats.json`` by domain; ``share_text``, ``share_image``, ``share_both``),
    or None: some target has items with every modality the cell's item tower reads."""
    if not cell.needs:
        return None
    if cell.needs == ("text-or-image",):  # MoM routing needs items of both routes
        counts = {d: (int(s.get("text_only", 0)), round(float(s.get("share_image", 0.0)) * int(s.get("items", 0))))
                  for d, s in stats.items()}
        if any(t > 0 and i > 0 for t, i in counts.values()):
            return None
        shown = "; ".join(f"{d}: {t} text-only, {i} with an image" for d, (t, i) in sorted(counts.items()))
        return (f"routing by modality needs target items without an image and items with one ({shown} in the "
                f"validated catalog), so {cell.label} would be a single-modality tower")
    key = "share_both" if set(cell.needs) >= {"text", "image"} else f"share_{cell.needs[0]}"
    if any(float(s.get(key, 0.0)) > 0 for s in stats.values()):
        return None
    what = "text and an image" if key == "share_both" else ("an image" if key == "share_image" else "text")
    return (f"no item of the target domain(s) {', '.join(sorted(stats))} has {what} ({key} 0 in the validated "
            f"catalog), so the {cell.label} has nothing to read")


# -- deriving a cell's config -----------------------------------------------------------------

def _merge(base: dict, over: dict) -> dict:
    out = dict(base)
    for k, v in over.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def plain(obj: Any) -> Any:
    """``obj`` with dataclasses, tuples and paths turned into YAML/JSON-safe mappings, lists, strings."""
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return {f.name: plain(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, dict):
        return {str(k): plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [plain(v) for v in obj]
    if isinstance(obj, Path):
        return str(obj)
    return obj


def digest(obj: Any, n: int = 16) -> str:
    """A short sha256 of ``obj``'s canonical JSON."""
    return hashlib.sha256(json.dumps(plain(obj), sort_keys=True).encode()).hexdigest()[:n]


def recipe(spec: dict[str, Any]) -> str:
    """A digest of what a cell's runs depend on, from its derived config ``spec`` (``derive``'s
    output): every section and domain, not where the cell is written (``root``, ``artifacts``, the
    feature cache's folder). A record whose recipe is not the current one was made under another
    base config (or code of ``derive``) and is stale."""
    spec = {k: v for k, v in spec.items() if k not in ("root", "artifacts")}
    spec["features"] = {k: v for k, v in (spec.get("features") or {}).items() if k != "cache_dir"}
    return digest(spec)


def quick_overrides() -> dict[str, Any]:
    """``--quick``: the ``tiny`` preset's model (random-init 2-layer BERT, Lite0 at 32 px), two
    epochs, and a small demo dataset. A test of the script, not of the numbers."""
    tiny = yaml.safe_load(TINY_PRESET.read_text(encoding="utf-8"))
    train = {"epochs": 2, "batch_size": 32, "patience": None, "lr": 0.001, "weight_decay": 0.01}
    return {"model": tiny["model"], "pretrain": train, "finetune": train,
            "demo": {"n_users": 40, "n_items": 24, "min_seq_len": 6, "max_seq_len": 10}}


def demo_spec(cfg: PipelineConfig, cell: Cell, quick: bool) -> dict[str, Any] | None:
    """The demo-data parameters a cell's domains are generated with (None: the config's own data)."""
    if cfg.demo is None:
        return None
    spec = plain(cfg.demo)
    if quick:
        spec.update(quick_overrides()["demo"])
    if cell.demo:
        spec.update(cell.demo)
    return spec


def derive(cfg: PipelineConfig, cell: Cell, seed: int, cell_dir: Path, cache_dir: Path, quick: bool,
           demo_dir: Path | None) -> dict[str, Any]:
    """The cell's full pipeline config as a mapping (written as ``config.yaml`` in ``cell_dir``):
    every section resolved, paths relative to the base config's root, which is itself relative to
    ``cell_dir`` (so the file, and its hash, do not depend on the checkout's location)."""
    root = cfg.root

    def rel(p: Path | str) -> str:
        return os.path.relpath(Path(p).resolve(), root)

    sections = {k: v for k, v in plain(cfg.sections).items()}
    if quick:
        q = quick_overrides()
        sections["model"] = q["model"]
        for phase in ("pretrain", "finetune"):
            sections[phase] = _merge(sections.get(phase) or {}, q[phase])
    sections = _merge(sections, cell.overrides)
    for phase in ("pretrain", "finetune"):
        # log_every 1: every step's time reaches the cost tracker (logging only: same weights)
        sections[phase] = _merge(sections.get(phase) or {}, {"seed": seed, "log_every": 1, "progress": False})
    sections["evaluation"] = _merge(sections.get("evaluation") or {}, {"history": "masked"})
    sections["features"] = _merge(sections.get("features") or {}, {"cache_dir": rel(cache_dir)})
    domains = []
    for d in cfg.domains:
        path = Path(cfg.resolve(d.source.path))
        if demo_dir is not None and cfg.demo_path is not None and path.is_relative_to(cfg.demo_path):
            path = demo_dir / path.relative_to(cfg.demo_path)
        validation = plain(d.validation)
        if cell.demo:
            validation.update(MOM_VALIDATION)
        domains.append({
            "name": d.name, "role": d.role,
            "source": {"format": d.source.format, "path": rel(path), "options": plain(d.source.options)},
            "validation": validation,
            "user_fraction": cell.source_fraction if d.role == "source" else cell.target_fraction,
        })
    return {
        "root": os.path.relpath(root, cell_dir.resolve()),
        "artifacts": rel(cell_dir / "artifacts"),
        "preprocess": plain(cfg.preprocess),
        "compute": plain(cfg.compute),
        "domains": domains,
        **sections,
    }
