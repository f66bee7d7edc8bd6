"""Experiment tracking behind a small interface.

The library logs parameters, metrics, tags and artifacts through ``Tracker``; it never imports a
tracking service. The orchestration layer passes an MLflow-backed tracker; the library ships a
do-nothing tracker, a local JSON-lines tracker (every run keeps its config and metrics on disk even
with no tracking server, MoRec issue #6) and a fan-out to several trackers.

``JsonlTracker`` folder layout::

    params.json      flat {name: value}, merged over calls (a later value for a name replaces the earlier)
    tags.json        {name: str}, merged over calls
    metrics.jsonl    one line per ``log_metrics`` call: {"step": int|null, "time": unix s, "metrics": {...}}
    artifacts/       copies of the logged files and folders
"""

from __future__ import annotations

import dataclasses
import json
import numbers
import shutil
import subprocess
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

from mmrec.io import atomic_dir, atomic_file, write_json


@runtime_checkable
class Tracker(Protocol):
    """Where a run's parameters, metrics, tags and artifacts go."""

    def log_params(self, params: dict[str, Any]) -> None:
        """Record flat ``{name: value}`` parameters (see ``flatten``)."""

    def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None:
        """Record numeric metrics, optionally at a training step."""

    def log_artifact(self, path: Path, name: str | None = None) -> None:
        """Record a file or folder under ``name`` (default: its own name)."""

    def set_tags(self, tags: dict[str, str]) -> None:
        """Attach string tags to the run."""


class NullTracker:
    """A tracker that records nothing."""

    def log_params(self, params: dict[str, Any]) -> None:
        pass

    def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None:
        pass

    def log_artifact(self, path: Path, name: str | None = None) -> None:
        pass

    def set_tags(self, tags: dict[str, str]) -> None:
        pass


def _check_metrics(metrics: Mapping[str, Any]) -> dict[str, float]:
    out = {}
    for k, v in metrics.items():
        if isinstance(v, bool) or not isinstance(v, (int, float)) and not hasattr(v, "__float__"):
            raise TypeError(f"metric {k!r} must be a number, got {type(v).__name__} {v!r}")
        out[str(k)] = float(v)
    return out


def _artifact_name(path: Path, name: str | None) -> str:
    name = name or path.name
    if not name or Path(name).is_absolute() or ".." in Path(name).parts:
        raise ValueError(f"artifact name must be a relative path inside the run folder, got {name!r}")
    return name


class JsonlTracker:
    """Writes a run to a local folder (layout in the module docstring); safe to reopen and append."""

    def __init__(self, folder: str | Path):
        self.folder = Path(folder)
        self.folder.mkdir(parents=True, exist_ok=True)

    def _merge(self, file: str, new: Mapping[str, Any]) -> None:
        path = self.folder / file
        old = json.loads(path.read_text(encoding="utf-8")) if path.exists() else {}
        write_json(path, {**old, **new})

    def log_params(self, params: dict[str, Any]) -> None:
        self._merge("params.json", {str(k): v for k, v in params.items()})

    def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None:
        record = {"step": None if step is None else int(step), "time": time.time(), "metrics": _check_metrics(metrics)}
        # one complete line per write; a crash can at worst leave a truncated last line, which
        # `read_jsonl_run` skips
        line = json.dumps(record, sort_keys=True) + "\n"
        with open(self.folder / "metrics.jsonl", "a", encoding="utf-8") as fh:
            fh.write(line)
            fh.flush()

    def log_artifact(self, path: Path, name: str | None = None) -> None:
        path = Path(path)
        dest = self.folder / "artifacts" / _artifact_name(path, name)
        if path.is_dir():
            with atomic_dir(dest) as tmp:
                shutil.copytree(path, tmp, dirs_exist_ok=True)
        elif path.is_file():
            with atomic_file(dest, "wb") as out, open(path, "rb") as src:
                shutil.copyfileobj(src, out)
        else:
            raise FileNotFoundError(f"artifact not found: {path}")

    def set_tags(self, tags: dict[str, str]) -> None:
        self._merge("tags.json", {str(k): str(v) for k, v in tags.items()})


class MultiTracker:
    """Sends every call to each of ``trackers`` in order."""

    def __init__(self, *trackers: Tracker):
        self.trackers = tuple(trackers)

    def log_params(self, params: dict[str, Any]) -> None:
        for t in self.trackers:
            t.log_params(params)

    def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None:
        for t in self.trackers:
            t.log_metrics(metrics, step)

    def log_artifact(self, path: Path, name: str | None = None) -> None:
        for t in self.trackers:
            t.log_artifact(path, name)

    def set_tags(self, tags: dict[str, str]) -> None:
        for t in self.trackers:
            t.set_tags(tags)


@dataclass
class JsonlRun:
    """What a ``JsonlTracker`` folder holds, read back."""

    params: dict[str, Any] = field(default_factory=dict)
    tags: dict[str, str] = field(default_factory=dict)
    metrics: list[dict] = field(default_factory=list)
    """One ``{"step", "time", "metrics"}`` record per ``log_metrics`` call, in call order."""
    artifacts: list[str] = field(default_factory=list)
    """Relative paths of the files under ``artifacts/``, sorted."""

    def series(self, name: str) -> list[tuple[int | None, float]]:
        """``(step, value)`` for every record holding metric ``name``, in logging order."""
        return [(r["step"], r["metrics"][name]) for r in self.metrics if name in r["metrics"]]


def read_jsonl_run(folder: str | Path) -> JsonlRun:
    """Read a ``JsonlTracker`` folder; a truncated last metrics line (crash mid-write) is skipped."""
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"no tracking folder at {folder}")

    def load(name: str) -> dict:
        p = folder / name
        return json.loads(p.read_text(encoding="utf-8")) if p.exists() else {}

    records = []
    p = folder / "metrics.jsonl"
    if p.exists():
        lines = p.read_text(encoding="utf-8").splitlines()
        for i, line in enumerate(lines):
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError:
                if i != len(lines) - 1:
                    raise ValueError(f"{p}: line {i + 1} is not valid JSON") from None
    art = folder / "artifacts"
    files = sorted(str(f.relative_to(art)) for f in art.rglob("*") if f.is_file()) if art.is_dir() else []
    return JsonlRun(params=load("params.json"), tags=load("tags.json"), metrics=records, artifacts=files)


CHECKOUT = Path(__file__).resolve().parents[1]
"""The folder holding the ``mmrec`` package: a git checkout for a clone, site-packages otherwise."""


def code_version(paths: tuple[str, ...] = ("mmrec",), checkout: str | Path = CHECKOUT) -> dict[str, Any]:
    """``{"commit": HEAD, "dirty": whether files under paths differ from it}`` of the git checkout
    the code runs from; both None where it is not one (an installed package) or git is missing.
    Finished training runs are reused by the key of their configuration and inputs, not of the
    code: this is how a result names the code that trained it (``mmrec.training.LOADED_CODE``, taken
    when the process imported it)."""
    checkout = Path(checkout)
    if not (checkout / ".git").exists():
        return {"commit": None, "dirty": None}
    try:
        head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=checkout, capture_output=True, text=True, check=True)
        dirty = subprocess.run(["git", "status", "--porcelain", "--", *paths], cwd=checkout, capture_output=True,
                               text=True, check=True)
    except (OSError, subprocess.CalledProcessError):
        return {"commit": None, "dirty": None}
    return {"commit": head.stdout.strip(), "dirty": bool(dirty.stdout.strip())}


def flatten(d: Any, prefix: str = "", sep: str = ".") -> dict[str, Any]:
    """Nested mappings and dataclasses as one flat dict: ``{"train": {"lr": 1e-4}} -> {"train.lr": 1e-4}``.

    Dataclass instances are walked field by field (not through ``dataclasses.asdict``, so leaves
    keep their type); any other value, including lists and ``None``, is a leaf. An empty mapping
    is kept as a leaf so that its key is not lost.
    """
    if dataclasses.is_dataclass(d) and not isinstance(d, type):
        items = [(f.name, getattr(d, f.name)) for f in dataclasses.fields(d)]
    elif isinstance(d, Mapping):
        items = list(d.items())
    else:
        if not prefix:
            raise TypeError(f"flatten needs a mapping or a dataclass instance, got {type(d).__name__}")
        return {prefix: d}
    if not items and prefix:
        return {prefix: {}}
    out: dict[str, Any] = {}
    for k, v in items:
        key = f"{prefix}{sep}{k}" if prefix else str(k)
        if (dataclasses.is_dataclass(v) and not isinstance(v, type)) or isinstance(v, Mapping):
            out.update(flatten(v, key, sep))
        else:
            out[key] = v
    return out


def numeric_metrics(metrics: Mapping[str, Any], prefix: str = "") -> dict[str, float]:
    """The numeric entries of ``metrics`` as floats, keys prefixed; ``None`` (a metric with no users,
    e.g. an empty cold-start subset) and non-numbers are dropped, NaN is kept so that it shows."""
    return {
        f"{prefix}{k}": float(v)
        for k, v in metrics.items()
        if isinstance(v, numbers.Real) and not isinstance(v, bool)
    }
