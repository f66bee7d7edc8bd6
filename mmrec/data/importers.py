"""Importers: real on-disk formats -> the catalog contract (``mmrec.data.catalog``).

Registered formats (``IMPORTERS``):

- ``ninerec``: the NineRec / PMMRec / IISAN layout. ``items.tsv`` = ``item_id<TAB>title`` (more
  text columns when the ``text`` option names them) and ``users.tsv`` = ``user_id<TAB>item item ...``
  (chronological, oldest first, one line per user), no headers; images optionally in a folder
  (``<item_id><ext>``) or an LMDB keyed by item id.
- ``movielens``: GroupLens MovieLens-100K (``u.data``, ``u.item`` in latin-1, ``u.genre``) plus a
  ``posters/<item_id>.jpg`` folder. Items without a poster are text-only items, not errors.
- ``tabular``: a generic CSV/TSV/Parquet layout with a column mapping, for users' own data.
- ``catalog``: a folder already in the catalog contract (read as it is).

Importers fail on structure (missing or empty files, missing columns, undecodable text, malformed
or ragged lines, a user on two lines, a column that holds lists) with a ``CatalogError`` that names
the file and the row: the line of a text file (the first line of a record that spans several),
the row of a Parquet file. A UTF-8 byte-order mark is dropped. Problems of values (duplicate ids,
unknown items, negative timestamps, broken images) are left to validation, which can report or
quarantine them.
"""

from __future__ import annotations

import codecs
import csv
import dataclasses
import io
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import polars as pl

from mmrec.data.catalog import Catalog, CatalogError, sort_interactions
from mmrec.data.images import ImageStore


def _options(cls, options: dict[str, Any] | None, fmt: str):
    options = dict(options or {})
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(options) - names)
    if unknown:
        raise ValueError(f"importer {fmt!r}: unknown option(s) {unknown}; valid options: {sorted(names)}")
    return cls(**options)


def read_text(path: Path, encoding: str = "utf-8") -> str:
    """The whole text of ``path``; a clear error for a missing, empty or wrongly encoded file."""
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise CatalogError(path, "file not found") from None
    except IsADirectoryError:
        raise CatalogError(path, "is a folder, expected a file") from None
    if not data.strip():
        raise CatalogError(path, "file is empty")
    bom = 0
    if codecs.lookup(encoding).name == "utf-8" and data.startswith(codecs.BOM_UTF8):
        bom = len(codecs.BOM_UTF8)  # written by Excel and Notepad: not part of the first id
    try:
        return data[bom:].decode(encoding)
    except UnicodeDecodeError as exc:
        at = bom + exc.start
        line = data[:at].count(b"\n") + 1
        raise CatalogError(
            path, f"text is not valid {encoding} (byte {data[at:at + 1]!r} at offset {at})", line
        ) from None


def _lines(path: Path, encoding: str = "utf-8") -> list[tuple[int, str]]:
    """Non-blank lines of ``path`` with their 1-based line numbers."""
    text = read_text(path, encoding)
    return [(i, line) for i, line in enumerate(text.splitlines(), start=1) if line.strip()]


def _image_store(base: Path, ref: str | None) -> ImageStore | None:
    """A files or LMDB store for ``ref`` (relative to ``base``), or None when not configured."""
    if not ref:
        return None
    root = (base / ref).resolve()
    if not root.exists():
        raise CatalogError(root, "image folder or LMDB not found")
    is_lmdb = (root / "data.mdb").is_file() or root.suffix == ".lmdb" or root.is_file()
    return ImageStore("lmdb" if is_lmdb else "files", root)


def _present_refs(store: ImageStore | None, item_ids: list[str], ext: str) -> list[str | None]:
    """The image reference of each item whose image exists in ``store`` (None otherwise)."""
    if store is None:
        return [None] * len(item_ids)
    if store.kind == "files":
        present = {p.name for p in store.root.iterdir()}
        return [f"{i}{ext}" if f"{i}{ext}" in present else None for i in item_ids]
    store.verify()  # a file or folder that is not an LMDB: one clear error, not a traceback
    return [i if store.exists(i) == "ok" else None for i in item_ids]


# --------------------------------------------------------------------------------------------
# NineRec / PMMRec / IISAN
@dataclass(frozen=True)
class NineRecOptions:
    items_file: str = "items.tsv"
    users_file: str = "users.tsv"
    text: list[str] = field(default_factory=lambda: ["title"])
    """Names of the tab-separated text columns after the item id (each becomes a text field); a
    line with another number of columns is an error, never glued into the title."""
    images: str | None = None
    """Image folder or LMDB, relative to the dataset folder; None for a text-only domain."""
    image_ext: str = ".jpg"
    """File name suffix of images in a folder (``<item_id><image_ext>``); unused for LMDB."""

    def __post_init__(self):
        text = [self.text] if isinstance(self.text, str) else list(self.text)
        if not text or len(set(text)) != len(text):
            raise ValueError(f"importer 'ninerec': text must name one or more distinct columns, got {self.text!r}")
        object.__setattr__(self, "text", text)


def import_ninerec(path: Path, domain: str, options: dict[str, Any] | None = None) -> Catalog:
    opts = _options(NineRecOptions, options, "ninerec")
    items_path, users_path = path / opts.items_file, path / opts.users_file
    n_fields = 1 + len(opts.text)
    layout = "<TAB>".join(["item_id", *opts.text])
    ids, texts, rows = [], {t: [] for t in opts.text}, []
    for n, line in _lines(items_path):
        fields = line.split("\t")
        item_id = fields[0].strip()
        if len(fields) == 1 or not item_id:
            raise CatalogError(items_path, f"expected '{layout}'", n)
        if len(fields) != n_fields:
            raise CatalogError(
                items_path, f"{len(fields)} tab-separated columns, expected {n_fields} ('{layout}'); "
                f"name every text column with the ninerec option text, e.g. text: [title, description]", n)
        ids.append(item_id)
        for t, value in zip(opts.text, fields[1:]):
            texts[t].append(value.strip() or None)
        rows.append(n)
    store = _image_store(path, opts.images)
    items = pl.DataFrame(
        {"item_id": ids, **texts, "image": _present_refs(store, ids, opts.image_ext), "source_row": rows},
        schema={"item_id": pl.String, **{t: pl.String for t in opts.text}, "image": pl.String, "source_row": pl.Int64},
    )
    users, seq_items, positions, urows = [], [], [], []
    first_line: dict[str, int] = {}
    for n, line in _lines(users_path):
        user_id, sep, seq = line.partition("\t")
        user_id = user_id.strip()
        seq = seq.split()
        if not sep or not user_id or not seq:
            raise CatalogError(users_path, "expected 'user_id<TAB>item item ...'", n)
        if user_id in first_line:
            # two lines would be interleaved into one sequence (both count positions from 0)
            raise CatalogError(
                users_path, f"user {user_id!r} is also on line {first_line[user_id]}: one line per user "
                f"(lines {first_line[user_id]} and {n}; join them in time order)", n)
        first_line[user_id] = n
        users.extend([user_id] * len(seq))
        seq_items.extend(seq)
        positions.extend(range(len(seq)))
        urows.extend([n] * len(seq))
    interactions = pl.DataFrame(
        {"user_id": users, "item_id": seq_items, "timestamp": positions, "source_row": urows},
        schema={"user_id": pl.String, "item_id": pl.String, "timestamp": pl.Int64, "source_row": pl.Int64},
    )
    return Catalog(
        domain, items, sort_interactions(interactions), list(opts.text), store,
        {"importer": "ninerec", "path": str(path), "items_file": str(items_path), "interactions_file": str(users_path)},
    )


# --------------------------------------------------------------------------------------------
# MovieLens-100K
@dataclass(frozen=True)
class MovieLensOptions:
    ratings_file: str = "u.data"
    items_file: str = "u.item"
    genres_file: str = "u.genre"
    posters: str | None = "posters"
    """Poster folder relative to the dataset folder (``<item_id><poster_ext>``); None: text only."""
    poster_ext: str = ".jpg"
    min_rating: int | None = None
    """Keep only ratings >= this (None keeps all: every rating is an implicit interaction)."""


def import_movielens(path: Path, domain: str, options: dict[str, Any] | None = None) -> Catalog:
    opts = _options(MovieLensOptions, options, "movielens")
    genre_path, item_path, data_path = path / opts.genres_file, path / opts.items_file, path / opts.ratings_file
    genres: dict[int, str] = {}
    for n, line in _lines(genre_path, "latin-1"):
        name, sep, idx = line.partition("|")
        if not sep or not idx.strip().isdigit():
            raise CatalogError(genre_path, "expected 'genre|index'", n)
        genres[int(idx)] = name
    ids, titles, genre_text, rows = [], [], [], []
    for n, line in _lines(item_path, "latin-1"):
        f = line.split("|")
        if len(f) != 5 + len(genres) or not f[0].strip().isdigit():
            raise CatalogError(
                item_path, f"expected 'id|title|release|video_release|url' and {len(genres)} genre flags, got {len(f)} fields", n
            )
        flags = f[5:]
        ids.append(str(int(f[0])))
        titles.append(f[1].strip() or None)
        genre_text.append(", ".join(genres[i] for i, v in enumerate(flags) if v.strip() == "1" and genres[i] != "unknown") or None)
        rows.append(n)
    store = _image_store(path, opts.posters)
    items = pl.DataFrame(
        {"item_id": ids, "title": titles, "genres": genre_text, "image": _present_refs(store, ids, opts.poster_ext), "source_row": rows},
        schema={"item_id": pl.String, "title": pl.String, "genres": pl.String, "image": pl.String, "source_row": pl.Int64},
    )
    ratings = []
    for n, line in _lines(data_path):
        f = line.split("\t")
        if len(f) != 4:
            raise CatalogError(data_path, f"expected 'user<TAB>item<TAB>rating<TAB>timestamp', got {len(f)} fields", n)
        try:
            ratings.append((int(f[0]), int(f[1]), int(f[2]), int(f[3]), n))
        except ValueError:
            raise CatalogError(data_path, f"non-integer field in {line!r}", n) from None
    df = pl.DataFrame(ratings, schema=["user", "item", "rating", "timestamp", "source_row"], orient="row")
    if opts.min_rating is not None:
        df = df.filter(pl.col("rating") >= opts.min_rating)
    # MovieLens order: by timestamp, ties broken by (numeric) item id.
    df = df.sort(["user", "timestamp", "item"])
    interactions = df.select(
        pl.col("user").cast(pl.String).alias("user_id"),
        pl.col("item").cast(pl.String).alias("item_id"),
        pl.col("timestamp").cast(pl.Int64),
        pl.col("source_row").cast(pl.Int64),
    )
    return Catalog(
        domain, items, interactions, ["title", "genres"], store,
        {"importer": "movielens", "path": str(path), "items_file": str(item_path), "interactions_file": str(data_path)},
    )


# --------------------------------------------------------------------------------------------
# Generic CSV / TSV / Parquet
@dataclass(frozen=True)
class TabularOptions:
    items: str = "items.csv"
    interactions: str = "interactions.csv"
    item_id: str = "item_id"
    """Items column holding the item id."""
    text: list[str] = field(default_factory=lambda: ["title"])
    """Items columns holding text (any number; each becomes a text field)."""
    image: str | None = "image"
    """Items column holding the image path (relative to ``image_root``) or LMDB key; None: no images."""
    image_root: str = "."
    """Image folder or LMDB, relative to the dataset folder."""
    user_id: str = "user_id"
    interaction_item_id: str = "item_id"
    timestamp: str | None = "timestamp"
    """Interactions column with an integer time; None: the file order is the sequence order."""

    def __post_init__(self):
        if isinstance(self.text, str):
            object.__setattr__(self, "text", [self.text])


def _read_table(path: Path) -> pl.DataFrame:
    """A table of strings with ``source_row`` (the row as a person counts it in the file).

    Parquet columns of nested or binary types are kept as they are (a used one is rejected by
    ``_require``, an unused one is ignored).
    """
    suffix = path.suffix.lower()
    if suffix == ".parquet":
        if not path.is_file():
            raise CatalogError(path, "file not found")
        try:
            df = pl.read_parquet(path)
        except Exception as exc:  # polars raises several error types for a broken file
            raise CatalogError(path, f"cannot read Parquet: {exc}") from exc
        first = 1
        df = df.with_columns(pl.col(c).cast(pl.String) for c, t in df.schema.items() if _scalar(t))
        if df.height == 0:
            raise CatalogError(path, "no data rows")
        return df.with_row_index("source_row", offset=first).with_columns(pl.col("source_row").cast(pl.Int64))
    if suffix in (".csv", ".tsv"):
        return _read_delimited(path, "\t" if suffix == ".tsv" else ",")
    raise CatalogError(path, f"unsupported table format {suffix!r}; use .csv, .tsv or .parquet")


def _scalar(dtype: pl.DataType) -> bool:
    return not (dtype.is_nested() or dtype in (pl.Binary, pl.Object))


def _read_delimited(path: Path, sep: str) -> pl.DataFrame:
    """A CSV/TSV with a header, parsed with the standard ``csv`` module so that each row knows the
    file line it starts on (a quoted field may span lines). A row with another number of fields
    than the header, or a quote that never closes, is an error naming that line. Empty fields
    are null."""
    text = read_text(path)  # checks existence, emptiness and encoding (naming the line); drops a BOM
    kind = "TSV" if sep == "\t" else "CSV"
    reader = csv.reader(io.StringIO(text, newline=""), delimiter=sep, strict=True)
    header: list[str] | None = None
    records, lines = [], []
    end = 0
    try:
        for record in reader:
            start, end = end + 1, reader.line_num
            if not record or (len(record) == 1 and not record[0].strip() and header is not None and len(header) > 1):
                continue  # a blank line
            if header is None:
                header = [c.strip() for c in record]
                dup = sorted({c for c in header if header.count(c) > 1})
                if dup or not all(header):
                    raise CatalogError(path, f"header has {'duplicate' if dup else 'empty'} column name(s) {dup or header}", start)
                continue
            if len(record) != len(header):
                span = f" (a quoted field spans lines {start}-{end}: is a quote unbalanced?)" if end > start else ""
                raise CatalogError(path, f"{len(record)} fields, the header has {len(header)}{span}", start)
            records.append(record)
            lines.append(start)
    except csv.Error as exc:
        raise CatalogError(path, f"cannot parse as {kind}: {exc} (the record starting on this line)", end + 1) from None
    if header is None or not records:
        raise CatalogError(path, "no data rows")
    columns = {c: [r[j] if r[j] != "" else None for r in records] for j, c in enumerate(header)}
    return pl.DataFrame(
        {**columns, "source_row": lines}, schema={**{c: pl.String for c in header}, "source_row": pl.Int64}
    )


def _require(df: pl.DataFrame, path: Path, columns: list[str]) -> None:
    missing = [c for c in columns if c not in df.columns]
    if missing:
        raise CatalogError(path, f"missing column(s) {missing}; found {[c for c in df.columns if c != 'source_row']}")
    nested = {c: str(df.schema[c]) for c in columns if df.schema[c] != pl.String}
    if nested:
        raise CatalogError(path, f"column(s) {nested} hold lists or binary values; mmrec reads text or numbers from them")


def import_tabular(path: Path, domain: str, options: dict[str, Any] | None = None) -> Catalog:
    opts = _options(TabularOptions, options, "tabular")
    items_path, inter_path = path / opts.items, path / opts.interactions
    raw_items = _read_table(items_path)
    _require(raw_items, items_path, [opts.item_id, *opts.text, *([opts.image] if opts.image else [])])
    text_names = [t for t in opts.text]
    items = raw_items.select(
        pl.col(opts.item_id).str.strip_chars().alias("item_id"),
        *[pl.col(t).alias(t) for t in text_names],
        (pl.col(opts.image).str.strip_chars() if opts.image else pl.lit(None, dtype=pl.String)).alias("image"),
        "source_row",
    ).with_columns(
        pl.when(pl.col(c).str.strip_chars().str.len_chars() > 0).then(pl.col(c)).otherwise(None).alias(c)
        for c in ["item_id", "image", *text_names]
    )
    raw_inter = _read_table(inter_path)
    _require(raw_inter, inter_path, [opts.user_id, opts.interaction_item_id, *([opts.timestamp] if opts.timestamp else [])])
    if opts.timestamp:
        ts_raw = pl.col(opts.timestamp).str.strip_chars()
        inter = raw_inter.with_columns(ts_raw.alias("_ts_raw"), ts_raw.cast(pl.Int64, strict=False).alias("timestamp"))
        bad = inter.filter(pl.col("_ts_raw").str.len_chars().fill_null(0).gt(0) & pl.col("timestamp").is_null())
        if bad.height:
            row = bad.row(0, named=True)
            raise CatalogError(
                inter_path, f"timestamp {row['_ts_raw']!r} is not an integer ({bad.height} such rows)", row["source_row"]
            )
    else:
        inter = raw_inter.with_columns(pl.int_range(pl.len()).over(opts.user_id).cast(pl.Int64).alias("timestamp"))
    interactions = inter.select(
        pl.col(opts.user_id).str.strip_chars().alias("user_id"),
        pl.col(opts.interaction_item_id).str.strip_chars().alias("item_id"),
        "timestamp",
        "source_row",
    )
    store = ImageStore("files", (path / opts.image_root).resolve()) if opts.image else None
    if store is not None and ((store.root / "data.mdb").is_file() or store.root.suffix == ".lmdb"):
        store = ImageStore("lmdb", store.root)
    return Catalog(
        domain, items, sort_interactions(interactions), text_names, store,
        {"importer": "tabular", "path": str(path), "items_file": str(items_path), "interactions_file": str(inter_path)},
    )


def import_catalog(path: Path, domain: str, options: dict[str, Any] | None = None) -> Catalog:
    if options:
        raise ValueError(f"importer 'catalog' takes no options, got {sorted(options)}")
    cat = Catalog.read(path)
    cat.domain = domain
    return cat


Importer = Callable[[Path, str, "dict[str, Any] | None"], Catalog]
IMPORTERS: dict[str, Importer] = {
    "ninerec": import_ninerec,
    "movielens": import_movielens,
    "tabular": import_tabular,
    "catalog": import_catalog,
}


def import_domain(fmt: str, path: str | Path, domain: str, options: dict[str, Any] | None = None) -> Catalog:
    """Import the raw data at ``path`` with the importer registered as ``fmt``."""
    try:
        importer = IMPORTERS[fmt]
    except KeyError:
        raise ValueError(f"unknown import format {fmt!r}; valid formats: {sorted(IMPORTERS)}") from None
    path = Path(path)
    if not path.is_dir():
        raise CatalogError(path, "dataset folder not found")
    return importer(path, domain, options)
