"""The catalog contract: one on-disk format for a domain's items, interactions and images.

A catalog is a folder::

    catalog.json          manifest: domain, text fields, image store, where the data came from
    items.parquet         item_id (str), one str column per text field (null = no text),
                          image (str, null = no image), source_row (int)
    interactions.parquet  user_id (str), item_id (str), timestamp (int64), source_row (int)

An item may have text only, image only, or both: mixture-of-modality (MoM) feedback. ``image`` is
a reference into the image store named by the manifest: a path relative to an image folder, or
a key of an LMDB (see ``mmrec.data.images``). ``timestamp`` is a time or, for formats that only
give an order (NineRec), the position in the user's sequence. Interactions are stored sorted by
user, then timestamp (ties keep the source order).

``source_row`` is the 1-based line (text files; header included) or row (Parquet) of the source
file the row came from, so that every later error can name the file and the row.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import polars as pl

from mmrec.data.images import ImageStore
from mmrec.io import atomic_dir

CATALOG_FORMAT = "mmrec-catalog"
CATALOG_VERSION = 1
MANIFEST = "catalog.json"
ITEMS = "items.parquet"
INTERACTIONS = "interactions.parquet"

ITEM_COLUMNS = {"item_id": pl.String, "image": pl.String, "source_row": pl.Int64}
INTERACTION_COLUMNS = {"user_id": pl.String, "item_id": pl.String, "timestamp": pl.Int64, "source_row": pl.Int64}


class CatalogError(ValueError):
    """Bad input: names the file, the row (when there is one) and the problem."""

    def __init__(self, file: str | os.PathLike, problem: str, row: int | None = None):
        where = f"{file}" if row is None else f"{file}, row {row}"
        super().__init__(f"{where}: {problem}")
        self.file, self.row, self.problem = str(file), row, problem


@dataclass
class Catalog:
    """One domain's items, interactions and image store, in the contract's schema."""

    domain: str
    items: pl.DataFrame
    interactions: pl.DataFrame
    text_fields: list[str]
    images: ImageStore | None = None
    source: dict[str, Any] = field(default_factory=dict)
    """Provenance: importer name, source folder, file names (used in error messages)."""

    def __post_init__(self):
        check_schema(self.items, {**ITEM_COLUMNS, **{f: pl.String for f in self.text_fields}}, "items")
        check_schema(self.interactions, INTERACTION_COLUMNS, "interactions")
        clash = set(self.text_fields) & set(ITEM_COLUMNS)
        if clash:
            raise ValueError(f"text field names clash with reserved item columns: {sorted(clash)}")

    @property
    def items_file(self) -> str:
        return self.source.get("items_file", "items")

    @property
    def interactions_file(self) -> str:
        return self.source.get("interactions_file", "interactions")

    def text(self) -> pl.Expr:
        """An expression joining the non-empty text fields of an item with ' | ' (null if none)."""
        parts = [pl.col(f).str.strip_chars() for f in self.text_fields]
        if not parts:
            return pl.lit(None, dtype=pl.String)
        joined = pl.concat_str([p.fill_null("") for p in parts], separator=" | ")
        has_any = pl.any_horizontal([p.fill_null("").str.len_chars() > 0 for p in parts])
        return pl.when(has_any).then(joined.str.strip_chars(" |")).otherwise(None)

    def write(self, path: str | os.PathLike) -> Path:
        """Write the catalog folder atomically; an existing one is replaced only on success."""
        path = Path(path)
        manifest = {
            "format": CATALOG_FORMAT,
            "version": CATALOG_VERSION,
            "domain": self.domain,
            "text_fields": list(self.text_fields),
            # relative to the catalog folder, so catalog and data can move together
            "images": None if self.images is None
            else {"kind": self.images.kind, "root": os.path.relpath(self.images.root, path.resolve())},
            "source": {k: _relative(v, path) if k in SOURCE_PATHS else v for k, v in self.source.items()},
            "counts": {"items": self.items.height, "interactions": self.interactions.height},
        }
        with atomic_dir(path) as tmp:
            self.items.write_parquet(tmp / ITEMS)
            self.interactions.write_parquet(tmp / INTERACTIONS)
            (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n", encoding="utf-8")
        return path

    @classmethod
    def read(cls, path: str | os.PathLike) -> Catalog:
        """Read a catalog folder written by ``write``."""
        path = Path(path)
        manifest_path = path / MANIFEST
        if not manifest_path.is_file():
            raise CatalogError(path, f"not a catalog folder (no {MANIFEST})")
        try:
            manifest = json.loads(manifest_path.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise CatalogError(manifest_path, f"invalid JSON: {exc}") from exc
        if manifest.get("format") != CATALOG_FORMAT or manifest.get("version") != CATALOG_VERSION:
            raise CatalogError(
                manifest_path,
                f"expected format {CATALOG_FORMAT!r} version {CATALOG_VERSION}, "
                f"got {manifest.get('format')!r} version {manifest.get('version')!r}",
            )
        images = manifest.get("images")
        store = None
        if images:
            root = Path(images["root"])
            store = ImageStore(images["kind"], root if root.is_absolute() else (path / root).resolve())
        return cls(
            domain=manifest["domain"],
            items=pl.read_parquet(path / ITEMS),
            interactions=pl.read_parquet(path / INTERACTIONS),
            text_fields=list(manifest["text_fields"]),
            images=store,
            source={k: _absolute(v, path) if k in SOURCE_PATHS else v for k, v in (manifest.get("source") or {}).items()},
        )


SOURCE_PATHS = ("path", "items_file", "interactions_file")
"""Provenance entries that are paths: stored relative to the catalog folder so that the written
catalog does not depend on where the project is checked out (DVC hashes stay the same)."""


def _relative(value: Any, folder: Path) -> Any:
    if isinstance(value, str) and os.path.isabs(value):
        return os.path.relpath(value, folder.resolve())
    return value


def _absolute(value: Any, folder: Path) -> Any:
    if isinstance(value, str) and not os.path.isabs(value):
        return os.path.normpath(folder.resolve() / value)
    return value


def check_schema(df: pl.DataFrame, expected: dict[str, pl.DataType], what: str) -> None:
    """Raise if ``df`` lacks a column of ``expected`` or has it with another dtype."""
    missing = [c for c in expected if c not in df.columns]
    if missing:
        raise ValueError(f"{what}: missing column(s) {missing}; present: {df.columns}")
    wrong = {c: str(df.schema[c]) for c, t in expected.items() if df.schema[c] != t}
    if wrong:
        raise ValueError(f"{what}: wrong dtype(s) {wrong}; expected {({c: str(expected[c]) for c in wrong})}")


def sort_interactions(interactions: pl.DataFrame) -> pl.DataFrame:
    """Sort by user, then timestamp; ties keep their source order (stable)."""
    return interactions.sort(["user_id", "timestamp"], maintain_order=True, nulls_last=True)
