"""Great Expectations validation of a catalog, with a readable report and optional quarantine.

Checks (per domain thresholds from ``ValidationConfig``):

===============  ===============================================================================
items            schema; item ids present and unique; every item has text or an image;
                 image references stay inside the image folder, exist, decode and are within the
                 pixel limit (a failing image is reported by kind: ``images.FAILURES``);
                 share of items with non-empty text / with a readable image (modality completeness)
interactions     user, item and timestamp present; timestamps >= 0; every item exists
                 (referential integrity); timestamps non-decreasing in each user's stored order
users            sequence length at most ``max_user_interactions`` (when set)
===============  ===============================================================================

Too short users are not a failure here: ``preprocess.min_seq_len`` drops them, in both modes, and
the report counts them with the other preprocessing changes (``ValidationReport.preprocessing``).

Derived columns (has_text, image_status, item_known, ...) are computed with polars first, then
every expectation runs in Great Expectations on pandas frames (GX 1.x has no polars support).
GX takes seconds to import, so it is imported only inside ``run_expectations``.

In ``fail`` mode a failed validation raises ``ValidationError`` naming each failing expectation
with counts and sample rows (file and row). In ``quarantine`` mode the failing rows are moved to
side tables with a ``reason`` column, the rest is validated again and goes on; the counts per
reason are logged (a warning on stderr) and written to the report.
"""

from __future__ import annotations

import json
import logging
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import polars as pl
from tqdm.auto import tqdm

from mmrec.data.catalog import Catalog
from mmrec.data.images import FAILURES, ImageStore

IMAGE_OK = ("none", "ok")

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ValidationConfig:
    """Great Expectations checks run on a raw catalog before it is preprocessed.

    Short users are not a validation matter: ``preprocess.min_seq_len`` is the one rule, applied
    by preprocessing in both modes and counted in ``validation.md`` (a validation minimum of its
    own used to reject a whole domain for a user that preprocessing would have dropped anyway).
    """

    on_error: str = "fail"
    """``fail``: stop with a report naming each failing expectation; ``quarantine``: move bad rows
    to a side file, report the counts per reason and continue."""
    min_text_share: float = 0.0
    """Lowest share of items with non-empty text (modality completeness)."""
    min_image_share: float = 0.0
    """Lowest share of items with a readable image."""
    max_user_interactions: int | None = None
    """Longest acceptable raw sequence (``None``: no bound); a longer one is a failing row (a bot,
    a merged account). Too short ones are dropped by ``preprocess.min_seq_len``."""
    check_images: bool = True
    """Open and fully decode every referenced image (slow on large catalogs; disable to only
    check that the files exist, which also skips ``max_image_pixels``)."""
    max_image_pixels: int | None = 50_000_000
    """Largest image accepted, in pixels (width x height, read from the header before decoding);
    a larger one fails as ``too_many_pixels``. A decode costs about 3 bytes per pixel (150 MB at
    the default, 1 GB for a 169-megapixel scan) while the encoders look at 224 x 224; ``None``
    leaves only PIL's decompression-bomb guard (about 179 megapixels)."""
    sample_rows: int = 5
    """How many failing rows each report entry shows."""

    def __post_init__(self):
        if self.on_error not in ("fail", "quarantine"):
            raise ValueError(f"on_error must be 'fail' or 'quarantine', got {self.on_error!r}")
        for name in ("min_text_share", "min_image_share"):
            v = getattr(self, name)
            if not 0.0 <= v <= 1.0:
                raise ValueError(f"{name} must be in [0, 1], got {v}")
        if self.max_user_interactions is not None and self.max_user_interactions < 3:
            raise ValueError(f"max_user_interactions must be >= 3 (train, valid and test items), got {self.max_user_interactions}")
        if self.max_image_pixels is not None and (isinstance(self.max_image_pixels, bool) or self.max_image_pixels < 1):
            raise ValueError(f"max_image_pixels must be a positive integer or None, got {self.max_image_pixels!r}")
        if self.sample_rows < 1:
            raise ValueError("sample_rows must be >= 1")


@dataclass
class Outcome:
    """The result of one expectation."""

    table: str
    expectation: str
    column: str | None
    description: str
    success: bool
    element_count: int = 0
    unexpected_count: int = 0
    threshold: str = ""
    observed: Any = None
    row_ids: list[int] = field(default_factory=list)
    """Positions (``_rid``) of the failing rows in the validated table."""
    samples: list[dict[str, Any]] = field(default_factory=list)
    row_level: bool = True
    """Whether failing rows can be quarantined (False for shares and schema)."""


@dataclass
class ValidationReport:
    """All outcomes of a validation, the statistics of the data and what was quarantined."""

    domain: str
    mode: str
    passed: bool
    outcomes: list[Outcome]
    stats: dict[str, Any]
    files: dict[str, str]
    quarantined: dict[str, int] = field(default_factory=dict)
    quarantine_reasons: dict[str, int] = field(default_factory=dict)
    first_pass: list[Outcome] = field(default_factory=list)
    """In quarantine mode: the failures found before the bad rows were moved aside."""
    preprocessing: dict[str, Any] = field(default_factory=dict)
    """What preprocessing then removed (``Preprocessed.changes``: repeats, short users, the cut to
    the last L+3), filled in by the stage before the report is written."""

    @property
    def failures(self) -> list[Outcome]:
        return [o for o in self.outcomes if not o.success]

    def summary(self) -> str:
        lines = [f"validation of domain {self.domain!r}: {'passed' if self.passed else 'FAILED'}"]
        for o in self.failures:
            lines.append(_describe(o, self.files))
        if self.quarantined:
            lines.append(self.quarantine_summary())
        return "\n".join(lines)

    def quarantine_summary(self) -> str:
        """What quarantine moved aside: rows per table, then rows per reason."""
        tables = ", ".join(f"{n} {table} rows" for table, n in self.quarantined.items())
        reasons = "".join(f"\n  {n:>6}  {r}" for r, n in self.quarantine_reasons.items())
        return f"quarantined {tables} of domain {self.domain!r}; per reason:{reasons}"

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        for o in d["outcomes"] + d["first_pass"]:
            o.pop("row_ids")
        return d

    def to_markdown(self) -> str:
        s = self.stats
        out = [
            f"# Validation report: {self.domain}",
            "",
            f"- result: **{'passed' if self.passed else 'FAILED'}** (mode: {self.mode})",
            f"- items file: `{self.files.get('items', '?')}`",
            f"- interactions file: `{self.files.get('interactions', '?')}`",
            "",
            "## Statistics",
            "",
            "| users | items | interactions | text | image | text+image | text only | image only |",
            "| --- | --- | --- | --- | --- | --- | --- | --- |",
            f"| {s['users']} | {s['items']} | {s['interactions']} | {_pct(s['share_text'])} | {_pct(s['share_image'])} "
            f"| {_pct(s['share_both'])} | {s['text_only']} | {s['image_only']} |",
            "",
            "## Expectations",
            "",
            "| table | expectation | column | result | failing rows | threshold |",
            "| --- | --- | --- | --- | --- | --- |",
        ]
        for o in self.outcomes:
            res = "pass" if o.success else "**FAIL**"
            out.append(
                f"| {o.table} | {o.description} | {o.column or ''} | {res} | {o.unexpected_count} of {o.element_count} | {o.threshold} |"
            )
        failures = self.failures or [o for o in self.first_pass if not o.success]
        if failures:
            out += ["", "## Failing rows (samples)" if self.failures else "## Quarantined (samples from the first pass)", ""]
            for o in failures:
                out.append(f"### {o.table}: {o.description}")
                out.append("")
                out.append(_describe(o, self.files))
                out.append("")
                for smp in o.samples:
                    out.append(f"- {json.dumps(smp, default=str, ensure_ascii=False)}")
                out.append("")
        if self.quarantined:
            out += ["", "## Quarantine", ""]
            out += [f"- {table}: {n} rows" for table, n in self.quarantined.items()]
            out += [f"- reason `{r}`: {n}" for r, n in self.quarantine_reasons.items()]
        if s.get("image_failures"):
            out += ["", "## Images that cannot be used", ""]
            out += [f"- `{k}` ({FAILURES[k]}): {n}" for k, n in s["image_failures"].items()]
        if self.preprocessing:
            p = self.preprocessing
            out += [
                "", "## Preprocessing", "",
                f"- repeats (`preprocess.repeats: {p['repeats']}`): {p['repeats_dropped']} interactions dropped, "
                f"of {p['users_with_repeats_dropped']} users",
                f"- users with fewer than {p['min_seq_len']} interactions (`preprocess.min_seq_len`, after repeats): "
                f"{p['short_users_dropped']} dropped, with {p['short_user_interactions_dropped']} interactions",
                f"- older interactions beyond each user's last {p['keep_last']} (L+3): {p['older_interactions_cut']} cut",
            ]
            if "users_sampled_out" in p:
                out.append(f"- users outside the domain's `user_fraction` {p['user_fraction']} (a fixed-seed sample): "
                           f"{p['users_sampled_out']} left out")
        return "\n".join(out) + "\n"

    def write(self, md_path: str | os.PathLike) -> Path:
        """Write the Markdown report and a JSON twin next to it, atomically."""
        from mmrec.io import atomic_file, write_json

        md_path = Path(md_path)
        with atomic_file(md_path, "w", encoding="utf-8") as fh:
            fh.write(self.to_markdown())
        write_json(md_path.with_suffix(".json"), self.to_dict())
        return md_path


class ValidationError(Exception):
    """A catalog failed validation; ``report`` holds every outcome."""

    def __init__(self, report: ValidationReport, report_path: Path | None = None):
        msg = report.summary()
        if report_path is not None:
            msg += f"\nfull report: {report_path}"
        super().__init__(msg)
        self.report, self.report_path = report, report_path


def _pct(x: float) -> str:
    return f"{100 * x:.1f}%"


def _describe(o: Outcome, files: dict[str, str]) -> str:
    file = Path(files.get("interactions" if o.table in ("interactions", "users") else "items", o.table)).name
    if not o.row_level:
        return f"- {o.table}: {o.description}: observed {o.observed}, required {o.threshold}"
    rows = sorted({s.get("source_row") for s in o.samples if s.get("source_row") is not None})
    where = f" ({file} rows {', '.join(map(str, rows))}{', ...' if o.unexpected_count > len(o.samples) else ''})" if rows else ""
    vals = "; ".join(
        ", ".join(f"{k}={v!r}" for k, v in s.items() if k not in ("source_row", "_rid")) for s in o.samples[:3]
    )
    return f"- {o.table}: {o.description}: {o.unexpected_count} of {o.element_count} rows fail{where}: {vals}"


# ------------------------------------------------------------------------------------------
# Derived tables (pure polars, no GX)
def image_statuses(store: ImageStore | None, refs: list[str | None], decode: bool, progress: bool = False,
                   max_pixels: int | None = None) -> list[str]:
    """``none`` for no image, else ``ok`` or the failure kind (``images.FAILURES``) per reference.

    Raises ``ImageStoreError`` when the store itself is unusable (not an LMDB): one message, not
    the same failure for every item.
    """
    todo = [(i, r) for i, r in enumerate(refs) if r is not None]
    out = ["none"] * len(refs)
    if not todo:
        return out
    if store is None:
        for i, _ in todo:
            out[i] = "missing"
        return out
    store.verify()
    check = (lambda ref: store.check(ref, max_pixels)) if decode else store.exists
    # PIL releases the GIL while decoding: threads use both cores without process start-up.
    with ThreadPoolExecutor(max_workers=min(4, os.cpu_count() or 1)) as pool:
        results = pool.map(lambda r: check(r[1]), todo, chunksize=32)
        for (i, _), status in zip(todo, tqdm(results, total=len(todo), desc="images", disable=not progress, leave=False)):
            out[i] = status
    return out


def derive_tables(catalog: Catalog, cfg: ValidationConfig, progress: bool = False) -> dict[str, pl.DataFrame]:
    """The three validated tables with the derived columns the expectations read."""
    status = image_statuses(catalog.images, catalog.items["image"].to_list(), cfg.check_images, progress, cfg.max_image_pixels)
    items = catalog.items.with_row_index("_rid").with_columns(
        catalog.text().is_not_null().alias("has_text"),
        pl.Series("image_status", status, dtype=pl.String),
    ).with_columns(
        (pl.col("image_status") == "ok").alias("image_ok"),
        (pl.col("has_text") | pl.col("image").is_not_null()).alias("has_modality"),
    )
    known = catalog.items["item_id"].drop_nulls().unique().implode()
    inter = catalog.interactions.with_row_index("_rid").with_columns(
        pl.col("item_id").is_in(known).alias("item_known"),
        (pl.col("timestamp") >= pl.col("timestamp").shift(1).over("user_id")).fill_null(True).alias("ts_ordered"),
    )
    users = (
        catalog.interactions.group_by("user_id", maintain_order=True)
        .agg(pl.len().alias("n_interactions"), pl.col("source_row").first())
        .with_row_index("_rid")
    )
    return {"items": items, "interactions": inter, "users": users}


# ------------------------------------------------------------------------------------------
# Expectations (GX)
def _suites(catalog: Catalog, cfg: ValidationConfig) -> dict[str, list[tuple[Any, str, bool]]]:
    """Per table: (expectation, description, row_level)."""
    import great_expectations as gx

    E = gx.expectations
    items_cols = ["item_id", "image", "source_row", *catalog.text_fields]
    suites = {
        "items": [
            (E.ExpectTableColumnsToMatchSet(column_set=items_cols, exact_match=False), "schema: required columns", False),
            (E.ExpectColumnValuesToNotBeNull(column="item_id"), "item id present", True),
            (E.ExpectColumnValuesToBeUnique(column="item_id"), "item id unique", True),
            (E.ExpectColumnValuesToBeInSet(column="has_modality", value_set=[True]), "item has text or an image", True),
            (E.ExpectColumnValuesToBeInSet(column="image_status", value_set=list(IMAGE_OK)),
             "image inside the image folder, exists and decodes", True),  # image_status says which failure
        ],
        "interactions": [
            (E.ExpectTableColumnsToMatchSet(column_set=["user_id", "item_id", "timestamp", "source_row"], exact_match=False),
             "schema: required columns", False),
            (E.ExpectColumnValuesToNotBeNull(column="user_id"), "user id present", True),
            (E.ExpectColumnValuesToNotBeNull(column="item_id"), "item id present", True),
            (E.ExpectColumnValuesToNotBeNull(column="timestamp"), "timestamp present", True),
            (E.ExpectColumnValuesToBeBetween(column="timestamp", min_value=0), "timestamp >= 0", True),
            (E.ExpectColumnValuesToBeInSet(column="item_known", value_set=[True]), "item exists in the catalog", True),
            (E.ExpectColumnValuesToBeInSet(column="ts_ordered", value_set=[True]), "timestamps ordered per user", True),
        ],
    }
    if cfg.max_user_interactions is not None:
        suites["users"] = [(E.ExpectColumnValuesToBeBetween(column="n_interactions", max_value=cfg.max_user_interactions),
                            "sequence length at most max_user_interactions", True)]
    if cfg.min_text_share > 0:
        suites["items"].append((E.ExpectColumnValuesToBeInSet(column="has_text", value_set=[True], mostly=cfg.min_text_share),
                                "share of items with text", False))
    if cfg.min_image_share > 0:
        suites["items"].append((E.ExpectColumnValuesToBeInSet(column="image_ok", value_set=[True], mostly=cfg.min_image_share),
                                "share of items with a readable image", False))
    return suites


def run_expectations(catalog: Catalog, tables: dict[str, pl.DataFrame], cfg: ValidationConfig) -> list[Outcome]:
    """Run every expectation on the derived tables in an ephemeral GX context."""
    os.environ.setdefault("GX_ANALYTICS_ENABLED", "false")
    import great_expectations as gx
    from great_expectations.data_context.types.base import ProgressBarsConfig

    ctx = gx.get_context(mode="ephemeral")
    ctx.variables.progress_bars = ProgressBarsConfig(globally=False)
    source = ctx.data_sources.add_pandas(f"mmrec_{catalog.domain}")
    outcomes = []
    for table, exps in _suites(catalog, cfg).items():
        df = tables[table]
        batch_def = source.add_dataframe_asset(table).add_batch_definition_whole_dataframe("all")
        suite = ctx.suites.add(gx.ExpectationSuite(name=f"{catalog.domain}.{table}"))
        for exp, _, _ in exps:
            suite.add_expectation(exp)
        vd = ctx.validation_definitions.add(gx.ValidationDefinition(name=f"{catalog.domain}.{table}", data=batch_def, suite=suite))
        result = vd.run(
            batch_parameters={"dataframe": df.to_pandas()},
            result_format={"result_format": "COMPLETE", "unexpected_index_column_names": ["_rid"]},
        )
        by_id = {r.expectation_config.id: r for r in result.results}
        for exp, desc, row_level in exps:
            r = by_id[exp.id]
            if r.exception_info and r.exception_info.get("raised_exception"):
                raise RuntimeError(f"GX expectation {desc!r} on {table} raised: {r.exception_info.get('exception_message')}")
            res = r.result or {}
            col = getattr(exp, "column", None)
            rids = [int(u["_rid"]) for u in res.get("unexpected_index_list") or []]
            threshold = _threshold(exp)
            observed = res.get("observed_value")
            if not row_level and col is not None:
                n = res.get("element_count") or 1
                observed = f"{100 * (1 - res.get('unexpected_count', 0) / n):.1f}%"
            elif not row_level and not r.success:
                observed = f"missing {sorted(set(exp.column_set) - set(res.get('observed_value') or []))}"
            samples = df.filter(pl.col("_rid").is_in(rids[: cfg.sample_rows])).to_dicts() if rids else []
            outcomes.append(Outcome(
                table=table, expectation=type(exp).__name__, column=col, description=desc, success=bool(r.success),
                element_count=int(res.get("element_count") or df.height), unexpected_count=int(res.get("unexpected_count") or 0),
                threshold=threshold, observed=observed, row_ids=rids, samples=samples, row_level=row_level,
            ))
    return outcomes


def _threshold(exp) -> str:
    mostly = getattr(exp, "mostly", 1)
    if getattr(exp, "min_value", None) is not None or getattr(exp, "max_value", None) is not None:
        return f"[{exp.min_value}, {exp.max_value if exp.max_value is not None else 'inf'}]"
    if mostly != 1:
        return f">= {100 * mostly:.1f}%"
    return ""


# ------------------------------------------------------------------------------------------
def catalog_stats(catalog: Catalog, tables: dict[str, pl.DataFrame] | None = None) -> dict[str, Any]:
    """Users, items, interactions and modality coverage (text / readable image / both)."""
    items = catalog.items
    has_text = items.select(catalog.text().is_not_null()).to_series()
    if tables is not None:
        has_image = tables["items"]["image_ok"]
    else:
        has_image = items["image"].is_not_null()
    failures = {}
    if tables is not None:
        counts = dict(tables["items"].group_by("image_status").len().iter_rows())
        failures = {k: int(counts[k]) for k in FAILURES if counts.get(k)}
    n = max(items.height, 1)
    lens = catalog.interactions.group_by("user_id").len()["len"]
    both = (has_text & has_image).sum()
    return {
        "users": catalog.interactions["user_id"].n_unique(),
        "items": items.height,
        "interactions": catalog.interactions.height,
        "items_interacted": catalog.interactions["item_id"].n_unique(),
        "share_text": float(has_text.sum() / n),
        "share_image": float(has_image.sum() / n),
        "share_both": float(both / n),
        "text_only": int((has_text & ~has_image).sum()),
        "image_only": int((~has_text & has_image).sum()),
        "no_modality": int((~has_text & ~has_image).sum()),
        "seq_len_mean": float(lens.mean()) if lens.len() else 0.0,
        "seq_len_median": float(lens.median()) if lens.len() else 0.0,
        "seq_len_max": int(lens.max()) if lens.len() else 0,
        **({"image_failures": failures} if tables is not None else {}),
    }


def _reason_of(column: str, reasons: dict) -> pl.Expr:
    """``reasons[value]`` for each value of ``column`` (null when absent), always a String column.

    polars 2.1 cannot ``replace_strict`` with an empty mapping, and on an empty frame returns the
    input dtype whatever ``return_dtype`` says; both break concatenating the side tables.
    """
    if not reasons:
        return pl.lit(None, dtype=pl.String)
    return pl.col(column).replace_strict(reasons, default=None, return_dtype=pl.String)


def _quarantine(catalog: Catalog, tables: dict[str, pl.DataFrame], outcomes: list[Outcome], cfg: ValidationConfig):
    """Move the rows of failed row-level expectations aside. Returns (clean catalog, side tables)."""
    items, inter = tables["items"], tables["interactions"]
    item_reason: dict[int, str] = {}
    inter_reason: dict[int, str] = {}
    bad_users: dict[str, str] = {}
    drop_image: dict[int, str] = {}
    for o in outcomes:
        if o.success or not o.row_level:
            continue
        reason = f"{o.table}: {o.description}"
        if o.table == "items" and o.column == "item_id" and o.expectation == "ExpectColumnValuesToBeUnique":
            # keep the first occurrence of each duplicated id
            dups = items.filter(pl.col("_rid").is_in(o.row_ids))
            later = dups.filter(~pl.col("item_id").is_first_distinct())["_rid"].to_list()
            item_reason.update({r: reason for r in later if r not in item_reason})
        elif o.table == "items" and o.column == "image_status":
            status = items["image_status"]
            drop_image.update({r: f"items: image {status[r]}" for r in o.row_ids})
        elif o.table == "items":
            item_reason.update({r: reason for r in o.row_ids if r not in item_reason})
        elif o.table == "interactions":
            inter_reason.update({r: reason for r in o.row_ids if r not in inter_reason})
        elif o.table == "users":
            users = tables["users"].filter(pl.col("_rid").is_in(o.row_ids))["user_id"].to_list()
            bad_users.update({u: reason for u in users})
    # An item whose image is broken stays as a text item if it has text; otherwise it goes.
    for r, reason in drop_image.items():
        if not items["has_text"][r] and r not in item_reason:
            item_reason[r] = reason
    side_items = items.filter(pl.col("_rid").is_in(list(item_reason) + list(drop_image))).with_columns(
        _reason_of("_rid", {**drop_image, **item_reason}).alias("reason"),
        pl.col("_rid").is_in(list(item_reason)).alias("removed"),
    )
    keep_items = items.filter(~pl.col("_rid").is_in(list(item_reason))).with_columns(
        pl.when(pl.col("_rid").is_in(list(drop_image))).then(None).otherwise(pl.col("image")).alias("image")
    )
    # Cascade: interactions of removed items, then users left too short.
    kept_ids = keep_items["item_id"].drop_nulls().implode()
    inter = inter.with_columns(
        _reason_of("_rid", inter_reason).alias("reason")
    ).with_columns(
        pl.when(pl.col("reason").is_null() & ~pl.col("item_id").is_in(kept_ids))
        .then(pl.lit("interactions: item was quarantined")).otherwise(pl.col("reason")).alias("reason")
    ).with_columns(
        pl.when(pl.col("reason").is_null()).then(_reason_of("user_id", bad_users))
        .otherwise(pl.col("reason")).alias("reason")
    )
    # users left short are preprocessing's to drop (min_seq_len, the one length rule) and counted there
    clean = Catalog(
        catalog.domain,
        keep_items.select(catalog.items.columns),
        inter.filter(pl.col("reason").is_null()).select(catalog.interactions.columns),
        catalog.text_fields,
        catalog.images,
        catalog.source,
    )
    side = {
        "items": side_items.drop("_rid"),
        "interactions": inter.filter(pl.col("reason").is_not_null()).select(*catalog.interactions.columns, "reason"),
    }
    return clean, side


def validate(catalog: Catalog, cfg: ValidationConfig, progress: bool = False):
    """Validate ``catalog``. Returns ``(catalog to continue with, report, quarantine tables)``.

    Raises ``ValidationError`` when the catalog fails and cannot (or may not) be repaired by
    quarantining rows. The caller writes the report (it knows where the data lives).
    """
    tables = derive_tables(catalog, cfg, progress)
    outcomes = run_expectations(catalog, tables, cfg)
    files = {"items": catalog.items_file, "interactions": catalog.interactions_file}
    report = ValidationReport(catalog.domain, cfg.on_error, all(o.success for o in outcomes), outcomes,
                              catalog_stats(catalog, tables), files)
    if report.passed or cfg.on_error == "fail":
        return catalog, report, {}
    if any(not o.success and not o.row_level for o in outcomes):
        return catalog, report, {}  # a share or schema failure cannot be repaired row by row
    clean, side = _quarantine(catalog, tables, outcomes, cfg)
    tables2 = derive_tables(clean, cfg, progress=False)
    outcomes2 = run_expectations(clean, tables2, cfg)
    reasons = pl.concat([side["items"].select("reason"), side["interactions"].select("reason")]).group_by("reason").len()
    report2 = ValidationReport(
        catalog.domain, cfg.on_error, all(o.success for o in outcomes2), outcomes2, catalog_stats(clean, tables2), files,
        quarantined={k: v.height for k, v in side.items()},
        quarantine_reasons={r: n for r, n in reasons.sort(["len", "reason"], descending=[True, False]).iter_rows()},
        first_pass=outcomes,
    )
    log.warning(report2.quarantine_summary())
    return clean, report2, side
