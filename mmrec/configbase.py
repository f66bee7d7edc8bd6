"""Generic config parsing: a YAML mapping -> a typed, frozen dataclass, strictly.

The leaf under every config section: it imports no mmrec module, so a component defines its own
section next to its code (``PreprocessConfig`` in ``mmrec.data.preprocess``, ``ModelConfig`` in
``mmrec.models.recommender``) and parses it with these helpers, while ``mmrec.config`` assembles
the sections into the pipeline config (a test keeps the arrows pointing this way).
"""

from __future__ import annotations

import dataclasses
from typing import Any


class ConfigError(ValueError):
    """A configuration file or section is invalid."""


def check_keys(cls, data: dict[str, Any], where: str) -> None:
    """Raise ``ConfigError`` naming the valid keys if ``data`` has a key that is no field of ``cls``
    (a typo must not silently fall back to a default)."""
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - names)
    if unknown:
        raise ConfigError(f"{where}: unknown key(s) {unknown}; valid keys: {sorted(names)}")


def from_dict(cls, data: dict[str, Any] | None, where: str, **shared: Any):
    """Build dataclass ``cls`` from ``data``, rejecting unknown keys with the list of valid ones.

    ``shared`` values (e.g. ``dim`` set once for the whole model) fill fields of ``cls`` with the
    same name; a section that sets one to a different value is an error.
    """
    if data is not None and not isinstance(data, dict):
        raise ConfigError(f"{where}: expected a mapping, got {type(data).__name__} {data!r}")
    data = dict(data or {})
    check_keys(cls, data, where)
    names = {f.name for f in dataclasses.fields(cls)}
    for key, value in shared.items():
        if key in names:
            if key in data and data[key] != value:
                raise ConfigError(f"{where}.{key} = {data[key]!r} disagrees with the shared value {value!r}")
            data[key] = value
    try:
        return cls(**data)
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"{where}: {exc}") from exc


def optional_section(cls, data: Any, where: str, **shared: Any):
    """An optional nested section: ``None`` stays ``None``, a built ``cls`` passes through, a
    mapping goes through ``from_dict``."""
    if data is None or isinstance(data, cls):
        return data
    return from_dict(cls, data, where, **shared)
