"""Records -> ``docs/RESULTS.md`` and PNG figures (``docs/results/<name>/*.png``).

Everything here is read from the records ``experiments.run`` wrote (``<records>/plan.json``,
``<cell>-seed<N>.json``, ``<cell>-seed<N>.ranks.parquet``, the validation ranks
``<cell>-seed<N>[.pretrained].valid_ranks.parquet``), from ``benchmarks/select_finetune.py``'s
records and from the benchmark records; every table names the record files it comes from and their
commits. Paired intervals are ``mmrec.compare``'s: per-user metrics from the
ranks, averaged over the seeds both rows have, bootstrapped over users. Two rows are compared only
when they rank the same test users (same target data).
"""

from __future__ import annotations

import json
import os
import statistics
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from experiments.cells import GROUPS, REPO

GAP_LABEL = {"scratch": "scratch", "sasrec": "in-tree SASRec", "recbole_sasrec": "RecBole SASRec"}
"""Short names of the rows a gap column subtracts."""
MODEL_ORDER = ("finetuned", "scratch", "sasrec", "recbole_sasrec", "id_tower", "zero_shot")
MODEL_LABEL = {
    "finetuned": "pretrained, fine-tuned", "scratch": "same model from scratch", "sasrec": "in-tree ID SASRec",
    "recbole_sasrec": "RecBole 1.2.1 SASRec", "id_tower": "our model with an ID tower", "zero_shot": "zero-shot",
}
METRIC = "NDCG@10"


def recorded_valid_ranks(record: dict[str, Any], domain: str | None, model: str) -> np.ndarray | None:
    """``model``'s per-user *validation* ranks written beside ``record`` (``experiments.run.add_valid_ranks``):
    on target ``domain``, or with ``domain`` None the pretrained model on the sources' validation split;
    None where the record has none (made before records held them) or the file is gone."""
    import polars as pl

    entry = (record.get("pretrained") or {}) if domain is None else record["targets"].get(domain, {})
    if "valid_ranks" not in entry:
        return None
    path = Path(entry["valid_ranks"]["path"])
    path = path if path.is_absolute() else REPO / path
    if not path.is_file():
        return None
    df = pl.read_parquet(path)
    return df[model].to_numpy() if model in df.columns else None


@dataclass
class Results:
    """One base config's plan and records."""

    folder: Path
    plan: dict[str, Any]
    records: dict[tuple[str, int], dict[str, Any]] = field(default_factory=dict)
    used: set[Path] = field(default_factory=set)

    @classmethod
    def load(cls, folder: Path) -> Results:
        plan = json.loads((folder / "plan.json").read_text())
        out = cls(folder, plan)
        stale = {(s["cell"], int(s["seed"])) for s in plan.get("stale", [])}
        for path in sorted(folder.glob("*-seed*.json")):
            rec = json.loads(path.read_text())
            rec["_path"] = path
            key = (rec["cell"], int(rec["seed"]))
            if key not in stale:  # a record the current base config would not make is listed, not tabled
                out.records[key] = rec
        return out

    @property
    def name(self) -> str:
        return self.plan["name"]

    def seeds(self, cell: str) -> list[int]:
        return sorted(s for c, s in self.records if c == cell)

    def get(self, cell: str, seed: int) -> dict[str, Any]:
        rec = self.records[(cell, seed)]
        self.used.add(rec["_path"])
        return rec

    def model(self, cell: str, domain: str, model: str) -> dict[int, dict[str, Any]]:
        """seed -> the model's entry in the cell's record (seeds where the cell has the model)."""
        out = {}
        for s in self.seeds(cell):
            m = self.get(cell, s)["targets"].get(domain, {}).get("models", {}).get(model)
            if m is not None:
                out[s] = m
        return out

    def pretrained(self, cell: str) -> dict[int, dict[str, Any]]:
        """seed -> the pretraining entry of the cell's record (seeds whose record has one)."""
        return {s: p for s in self.seeds(cell) if (p := self.get(cell, s).get("pretrained"))}

    def ranks(self, cell: str, seed: int, domain: str, model: str) -> np.ndarray | None:
        import polars as pl

        t = self.get(cell, seed)["targets"][domain]
        path = REPO / t["ranks"]["path"] if not os.path.isabs(t["ranks"]["path"]) else Path(t["ranks"]["path"])
        if not path.is_file():
            return None
        df = pl.read_parquet(path)
        return df[model].to_numpy() if model in df.columns else None

    def valid_ranks(self, cell: str, seed: int, domain: str | None, model: str) -> np.ndarray | None:
        """The model's per-user *validation* ranks recorded beside the record (``recorded_valid_ranks``)."""
        return recorded_valid_ranks(self.get(cell, seed), domain, model)

    def gap(self, a: tuple[str, str], b: tuple[str, str], domain: str, metric: str = METRIC):
        """Paired gap of (cell, model) ``a`` minus ``b`` over the seeds both have, or None."""
        from mmrec.compare import compare_ranks

        seeds = sorted(set(self.model(a[0], domain, a[1])) & set(self.model(b[0], domain, b[1])))
        ra = [self.ranks(a[0], s, domain, a[1]) for s in seeds]
        rb = [self.ranks(b[0], s, domain, b[1]) for s in seeds]
        if not seeds or any(r is None for r in ra + rb) or any(x.shape != y.shape for x, y in zip(ra, rb)):
            return None
        return compare_ranks(ra, rb, metric, a[1], b[1])


# -- formatting ------------------------------------------------------------------------------------

def _values(entries: dict[int, dict[str, Any]], path: tuple[str, ...]) -> list[float]:
    out = []
    for m in entries.values():
        v: Any = m
        for k in path:
            v = v.get(k) if isinstance(v, dict) else None
        if isinstance(v, (int, float)):
            out.append(float(v))
    return out


def fmt(vals: list[float], scale: float = 100.0, digits: int = 2) -> str:
    """``mean ± sd`` over seeds (just the value for one seed; ``-`` for none)."""
    if not vals:
        return "-"
    v = [scale * x for x in vals]
    if len(v) == 1:
        return f"{v[0]:.{digits}f}"
    return f"{statistics.mean(v):.{digits}f} ± {statistics.stdev(v):.{digits}f}"


def gap_text(g) -> str:
    if g is None:
        return "-"
    return f"{100 * g.gap:+.2f} [{100 * g.low:+.2f}, {100 * g.high:+.2f}]{' *' if g.low > 0 or g.high < 0 else ''}"


def rel_text(g) -> str:
    """The gap and its interval as a share of the subtracted row's mean (the project's targets are relative)."""
    if g is None or not g.mean_b:
        return "-"
    return f"{100 * g.relative:+.1f} % [{100 * g.low / g.mean_b:+.1f}, {100 * g.high / g.mean_b:+.1f}]"


def _table(head: list[str], rows: list[list[str]]) -> list[str]:
    return ["| " + " | ".join(head) + " |", "|" + "---|" * len(head), *("| " + " | ".join(r) + " |" for r in rows)]


def _pct(x: float | None) -> str:
    return f"{100 * x:g} %" if x is not None else "-"


# -- figures -----------------------------------------------------------------------------------------

def _line_plot(path: Path, title: str, xlabel: str, series: dict[str, list[tuple[float, list[float]]]]) -> Path | None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    series = {k: sorted(v) for k, v in series.items() if v}
    if len({x for pts in series.values() for x, _ in pts}) < 2:  # one share alone is not a line
        path.unlink(missing_ok=True)  # nor is a figure left from an earlier report
        return None
    fig, ax = plt.subplots(figsize=(6.4, 4.2), dpi=110)
    for name, pts in series.items():
        xs = [100 * x for x, _ in pts]
        ys = [100 * statistics.mean(v) for _, v in pts]
        err = [100 * statistics.stdev(v) if len(v) > 1 else 0.0 for _, v in pts]
        ax.errorbar(xs, ys, yerr=err, marker="o", capsize=3, label=MODEL_LABEL.get(name, name))
    ax.set_xlabel(xlabel)
    ax.set_ylabel(f"test {METRIC} (%)")
    ax.set_title(title, fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return _save(fig, path)


def _save(fig, path: Path) -> Path:
    """Lay out, write ``path`` (folders made) and free the figure."""
    import matplotlib.pyplot as plt

    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
    return path


def _bar_heights(vals: list[list[float]]) -> tuple[list[float], list[float]]:
    """Bar heights and error bars in %, per row: the mean over seeds and the sample sd. A row without the
    series is NaN (no bar: 0 would read as a measured score of zero), one seed has no error bar (NaN, not 0)."""
    nan = float("nan")
    ys = [100 * statistics.mean(v) if v else nan for v in vals]
    err = [100 * statistics.stdev(v) if len(v) > 1 else nan for v in vals]
    return ys, err


def _bar_plot(path: Path, title: str, bars: dict[str, dict[str, list[float]]]) -> Path | None:
    """``bars``: row label -> {series: per-seed values}."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    bars = {k: v for k, v in bars.items() if any(v.values())}
    if len(bars) < 2:  # one row alone compares nothing
        path.unlink(missing_ok=True)
        return None
    series = sorted({s for v in bars.values() for s in v}, key=lambda s: MODEL_ORDER.index(s) if s in MODEL_ORDER else 99)
    fig, ax = plt.subplots(figsize=(max(6.4, 1.1 * len(bars)), 4.2), dpi=110)
    width = 0.8 / len(series)
    for j, s in enumerate(series):
        xs = [i + (j - (len(series) - 1) / 2) * width for i in range(len(bars))]
        ys, err = _bar_heights([bars[r].get(s) or [] for r in bars])
        ax.bar(xs, ys, width, yerr=err, capsize=2, label=MODEL_LABEL.get(s, s))
    ax.set_ylim(0, ax.get_ylim()[1] * 1.18)  # head room: the legend sits above the bars, not on one
    ax.set_xticks(range(len(bars)), list(bars), rotation=20, ha="right", fontsize=8)
    ax.set_ylabel(f"test {METRIC} (%)")
    ax.set_title(title, fontsize=10)
    ax.grid(axis="y", alpha=0.3)
    ax.legend(fontsize=8, loc="upper left", ncols=len(series))
    return _save(fig, path)


# -- sections --------------------------------------------------------------------------------------

def _short(cell: str) -> str:
    """A bar label: the cell name without its group prefix."""
    if cell == "transfer":
        return "all four (transfer)"
    for prefix in ("objective-", "tower-", "mom-"):
        if cell.startswith(prefix):
            return cell[len(prefix):]
    return cell.replace("-", " ")


def _cells(res: Results, group: str) -> list[dict[str, Any]]:
    return [c for c in res.plan["cells"] if c["group"] == group]


def _trace(res: Results, cells: list[str]) -> str:
    paths = sorted(res.records[(c, s)]["_path"] for c in cells for s in res.seeds(c))
    if not paths:
        return ""
    commits = sorted({(res.records[(c, s)].get("commit") or "?")[:10] + ("+dirty" if res.records[(c, s)].get("dirty") else "")
                      for c in cells for s in res.seeds(c)})
    shown = ", ".join(f"`{p.name}`" for p in paths[:8])  # the section names their folder
    more = f" and {len(paths) - 8} more" if len(paths) > 8 else ""
    return f"Records: {shown}{more}; commit(s) {', '.join(commits)}{_trained_by(res, cells)}."


def _trained_by(res: Results, cells: list[str]) -> str:
    """Which commits trained the records' runs: a finished run is reused by the key of its config and
    inputs, so it may be older than the commit that wrote the record."""
    trained, unknown = set(), 0
    for c in cells:
        for s in res.seeds(c):
            rec = res.records[(c, s)]
            runs = [rec.get("pretrained") or {}] + [m for t in rec.get("targets", {}).values() for m in t["models"].values()]
            for run in runs:
                if "run_dir" not in run:  # RecBole's and zero-shot rows: no training run of ours
                    continue
                if not run.get("trained_by"):
                    unknown += 1
                for e in run.get("trained_by") or []:
                    trained.add((e.get("commit") or "?")[:10] + ("+dirty" if e.get("dirty") else ""))
    parts = []
    if trained:
        parts.append(f"training runs by commit(s) {', '.join(sorted(trained))}")
    if unknown:
        parts.append(f"{unknown} training run(s) from before the training commit was recorded")
    return "; " + "; ".join(parts) if parts else ""


def _seeds_note(res: Results, cells: list[str]) -> str:
    seeds = sorted({s for c in cells for s in res.seeds(c)})
    return f"seeds {seeds}" if seeds else "no seed yet"


def section_transfer(res: Results, domain: str, out: list[str]) -> None:
    cell = "transfer"
    out += [f"### Transfer vs from scratch vs SASRec vs zero-shot ({domain})", ""]
    if not res.seeds(cell):
        out += ["Not run yet (see Missing).", ""]
        return
    models = [m for m in MODEL_ORDER if res.model(cell, domain, m)]
    rows = []
    for m in models:
        e = res.model(cell, domain, m)
        gap = None if m == "finetuned" else res.gap((cell, "finetuned"), (cell, m), domain)
        rows.append([MODEL_LABEL[m], fmt(_values(e, ("test", "HR@10"))), fmt(_values(e, ("test", METRIC))),
                     fmt(_values(e, ("valid", METRIC))), fmt(_values(e, ("cold", "HR@10"))),
                     "" if m == "finetuned" else gap_text(gap), "" if m == "finetuned" else rel_text(gap)])
    rec = res.get(cell, res.seeds(cell)[0])["targets"][domain]
    out += _table(["model", "HR@10", "NDCG@10", "valid NDCG@10", "cold HR@10", "fine-tuned minus row, NDCG@10 [95 %]",
                   "same, % of the row's NDCG@10"], rows)
    out += ["", f"Test split, {rec['n_users']} users ({rec['n_cold_users']} with a cold-start target) on {rec['n_items']} "
            "items, masked protocol, "
            f"values in % ({_seeds_note(res, [cell])}; mean ± sample sd over seeds when more than one). Intervals: paired "
            "bootstrap over users, seeds averaged per user; `*` where the interval excludes zero. "
            + ("" if "recbole_sasrec" in models else "RecBole's SASRec: not run (no `.venv-recbole`, or `--recbole off`). ")
            + _trace(res, [cell]), ""]


def section_fractions(res: Results, domain: str, out: list[str], figs: Path) -> list[Path]:
    made = []
    out += [f"### Data size, as in TransRec ({domain})", ""]
    # target fraction
    cells = [("transfer", 1.0)] + [(c["name"], c["value"]) for c in _cells(res, "target_fraction")]
    cells = sorted(cells, key=lambda c: c[1])
    models = [m for m in MODEL_ORDER if any(res.model(c, domain, m) for c, _ in cells)]
    against = [m for m in ("scratch", "sasrec", "recbole_sasrec") if m in models]  # TransRec's few-user claim
    rows, series = [], {m: [] for m in models}
    for c, f in cells:
        if not res.seeds(c):
            rows.append([_pct(f), "-", *["not run"] * len(models), *["-"] * len(against)])
            continue
        t = res.get(c, res.seeds(c)[0])["targets"][domain]
        cols = []
        for m in models:
            v = _values(res.model(c, domain, m), ("test", METRIC))
            cols.append(fmt(v))
            if v:
                series[m].append((f, v))
        rows.append([_pct(f), str(t["n_users"]), *cols,
                     *[f"{gap_text(g)} ({rel_text(g)})" if (g := res.gap((c, "finetuned"), (c, m), domain)) else "-"
                       for m in against]])
    out += [f"**Target users for fine-tuning** (test {METRIC}, %; every model trained on the same share; the test "
            "users are that share's users, so rows of different shares rank different users; gaps paired over "
            "users, seeds averaged per user, in points and in % of the row they subtract):", ""]
    out += _table(["target users", "test users", *[MODEL_LABEL[m] for m in models],
                   *[f"fine-tuned minus {GAP_LABEL.get(m, MODEL_LABEL[m])} [95 %]" for m in against]], rows)
    fig = _line_plot(figs / "target_fraction.png", f"{res.plan['config']}: {domain}, {METRIC} vs share of target users",
                     "target users used for fine-tuning (%)", series)
    if fig:
        made.append(fig)
        out += ["", f"![test {METRIC} against the share of target users]({os.path.relpath(fig, figs.parent.parent)})"]
    out += ["", _trace(res, [c for c, _ in cells]), ""]
    # source fraction
    cells = [(c["name"], c["value"]) for c in _cells(res, "source_fraction")]
    if not cells and not res.plan.get("sources"):
        return made
    rows = []
    series = {"finetuned": [], "zero_shot": []}
    s0 = _values(res.model("transfer", domain, "scratch"), ("test", METRIC))
    if s0:
        series["finetuned"].append((0.0, s0))
    rows.append(["0 % (no pretraining: the transfer cell's from-scratch row)", fmt(s0), "-", "-"])
    for c, f in sorted(cells + [("transfer", 1.0)], key=lambda c: c[1]):
        if not res.seeds(c):
            rows.append([_pct(f), "not run", "-", "-"])
            continue
        ft = _values(res.model(c, domain, "finetuned"), ("test", METRIC))
        zs = _values(res.model(c, domain, "zero_shot"), ("test", METRIC))
        series["finetuned"].append((f, ft))
        if zs:
            series["zero_shot"].append((f, zs))
        rows.append([_pct(f), fmt(ft), fmt(zs), gap_text(res.gap((c, "finetuned"), ("transfer", "scratch"), domain))])
    out += ["", f"**Source users for pretraining** (test {METRIC} on the whole target, %):", ""]
    out += _table(["source users", "fine-tuned", "zero-shot", "fine-tuned minus from scratch [95 %]"], rows)
    fig = _line_plot(figs / "source_fraction.png", f"{res.plan['config']}: {domain}, {METRIC} vs share of source users",
                     "source users used for pretraining (%)", series)
    if fig:
        made.append(fig)
        out += ["", f"![test {METRIC} against the share of source users]({os.path.relpath(fig, figs.parent.parent)})"]
    out += ["", _trace(res, [c for c, _ in cells] + ["transfer"]), ""]
    return made


def _ablation(res: Results, domain: str, out: list[str], figs: Path, title: str, group: str, reference: str | None,
              extra: list[tuple[str, str]] = (), note: str = "", fig_name: str | None = None) -> list[Path]:
    cells = [(c["name"], c["label"]) for c in _cells(res, group)] + list(extra)
    out += [f"### {title} ({domain})", ""]
    # cells found not applicable when they ran (their item tower reads a modality no target item has)
    at_run = [f"- `{s['name']}`: not applicable: {s['reason']}." for s in sorted(res.plan.get("skipped", []), key=lambda s: s["name"])
              if s["group"] == group and s.get("at_run")]
    if reference not in dict(cells):  # e.g. found not applicable: no gap column
        reference = None
    if not cells:
        out += ([f"Not applicable: {s['reason']}." for s in res.plan.get("skipped", []) if s["group"] == group
                 and not s.get("at_run")][:1] + at_run + [""])
        return []
    has_scratch = any(res.model(c, domain, "scratch") for c, _ in cells)
    has_pre = any(res.pretrained(c) for c, _ in cells)
    rows, bars, learned_nothing = [], {}, []
    for c, label in cells:
        if not res.seeds(c):
            rows.append([label, "not run", "-", "-"] + (["-"] if has_scratch else []) + (["-"] if has_pre else [])
                        + (["-"] if reference is not None else []))
            continue
        ft = res.model(c, domain, "finetuned")
        sc = _values(res.model(c, domain, "scratch"), ("test", METRIC))
        pre = _values(res.pretrained(c), ("valid_metrics", METRIC))
        if pre and max(pre) == 0.0:
            learned_nothing.append(label)
        g = None if reference is None or c == reference else res.gap((c, "finetuned"), (reference, "finetuned"), domain)
        row = [label, fmt(_values(ft, ("test", "HR@10"))), fmt(_values(ft, ("test", METRIC))),
               fmt(_values(ft, ("valid", METRIC)))]
        if has_pre:
            row.append(fmt(pre))
        if has_scratch:
            row.append(fmt(sc))
        if reference is not None:
            row.append("reference" if c == reference else gap_text(g))
        rows.append(row)
        bars[_short(c)] = {"finetuned": _values(ft, ("test", METRIC)), **({"scratch": sc} if sc else {})}
    ref_label = dict(cells).get(reference, reference)
    head = (["cell", "HR@10", "NDCG@10", "valid NDCG@10"] + ([f"pretraining: sources' valid {METRIC}"] if has_pre else [])
            + (["from scratch NDCG@10"] if has_scratch else []) + ([f"minus {ref_label} [95 %]"] if reference else []))
    out += _table(head, rows)
    made = []
    if fig_name:
        fig = _bar_plot(figs / fig_name, f"{res.plan['config']}: {domain}, {title.lower()}", bars)
        if fig:
            made.append(fig)
            out += ["", f"![{title}]({os.path.relpath(fig, figs.parent.parent)})"]
    if learned_nothing:
        note = (note + " " if note else "") + (
            f"Pretraining learned nothing for {', '.join(learned_nothing)} (its best validation {METRIC} on the sources "
            "is 0: e.g. an image-only tower pretrained on a text-only source sees no input), so the fine-tuned row is "
            "in effect trained from scratch.")
    out += ["", (note + " " if note else "") + f"Pretrained + fine-tuned rows unless named otherwise; test split, values "
            f"in % ({_seeds_note(res, [c for c, _ in cells])}). " + _trace(res, [c for c, _ in cells]), ""]
    if at_run:
        out += [*at_run, ""]
    return made


def section_cold(res: Results, domain: str, out: list[str]) -> None:
    out += [f"### Cold-start vs warm targets ({domain})", ""]
    cells = ["transfer"] + [c["name"] for c in _cells(res, "target_fraction")]
    rows = []
    for c in cells:
        if not res.seeds(c):
            continue
        for m in MODEL_ORDER:
            e = res.model(c, domain, m)
            if not e:
                continue
            n_w = _values(e, ("warm", "n_users"))
            n_c = _values(e, ("cold", "n_users"))
            rows.append([c, MODEL_LABEL[m], f"{statistics.mean(n_w):g}" if n_w else "-",
                         fmt(_values(e, ("warm", "HR@10"))), fmt(_values(e, ("warm", METRIC))),
                         f"{statistics.mean(n_c):g}" if n_c else "-",
                         fmt(_values(e, ("cold", "HR@10"))) if n_c and max(n_c) > 0 else "no cold user",
                         fmt(_values(e, ("cold", METRIC))) if n_c and max(n_c) > 0 else "-"])
    if not rows:
        out += ["Not run yet.", ""]
        return
    out += _table(["cell", "model", "warm users", "warm HR@10", "warm NDCG@10", "cold users", "cold HR@10", "cold NDCG@10"], rows)
    out += ["", "A cold-start target is an item that occurs in no training sequence of the target (the evaluation "
            "stage's `cold/` metrics; warm = every other test user), computed from each record's per-user ranks. "
            "Smaller target shares leave more items unseen. " + _trace(res, cells), ""]


def section_frequency(res: Results, domain: str, out: list[str]) -> None:
    """The transfer cell's test NDCG@10 by how often the user's test target occurs in the target's
    training sequences (records made before the split was recorded have none and are left out)."""
    cell = "transfer"
    seeds = [s for s in res.seeds(cell)
             if res.get(cell, s)["targets"][domain]["models"].get("finetuned", {}).get("by_target_frequency")]
    if not seeds:
        return
    first = res.get(cell, seeds[0])["targets"][domain]["models"]["finetuned"]["by_target_frequency"]
    buckets = sorted(first, key=lambda b: int(b.rstrip("+").split("-")[0]))  # the record's JSON keys are sorted as text
    rows = []
    for m in MODEL_ORDER:
        per_seed = [res.get(cell, s)["targets"][domain]["models"].get(m, {}).get("by_target_frequency") for s in seeds]
        if not all(per_seed):
            continue
        rows.append([MODEL_LABEL[m]] + [fmt([p[b][METRIC] for p in per_seed if p[b][METRIC] is not None]) for b in buckets])
    head = ["model"] + [f"{b} ({first[b]['n_users']} users)" for b in buckets]
    out += [f"### Where the gains are: test targets by how often they occur in training ({domain})", ""]
    out += _table(head, rows)
    out += ["", f"Test {METRIC} (%) of the transfer cell's models, users grouped by how many times their test item "
            "occurs in the target's training sequences (0 = a cold-start target; the groups are the same for every "
            f"model and seed). Seeds {seeds}; mean ± sample sd over seeds. " + _trace(res, [cell]), ""]


def section_cost(res: Results, domain: str, out: list[str]) -> None:
    out += [f"### Training cost ({domain})", ""]
    rows = []
    cells = ["transfer"]
    for c in cells:
        if not res.seeds(c):
            continue
        pre = {s: res.get(c, s).get("pretrained") for s in res.seeds(c)}
        pre = {s: {"cost": p["cost"]} for s, p in pre.items() if p}
        entries = [("pretraining on the sources", pre)] + [
            (MODEL_LABEL[m], res.model(c, domain, m)) for m in MODEL_ORDER if m != "zero_shot" and res.model(c, domain, m)]
        for label, e in entries:
            trained = [m["cost"] for m in e.values() if m.get("cost", {}).get("trained_here")
                       or m.get("cost", {}).get("sequences_per_second") or m.get("cost", {}).get("wall_seconds_per_epoch")]
            if not trained:
                rows.append([label, "trained by another cell (run reused; no log)", "-", "-", "-"])
                continue
            if not all(t.get("trained_here") for t in trained):
                label += " (read from the run's log)"
            get = lambda k: [float(t[k]) for t in trained if isinstance(t.get(k), (int, float))]  # noqa: E731
            rows.append([label, fmt(get("train_seconds_per_epoch"), 1), fmt(get("sequences_per_second"), 1, 0),
                         fmt(get("wall_seconds_per_epoch"), 1), fmt(get("epochs"), 1, 1)])
    if not rows:
        out += ["Not run yet.", ""]
        return
    threads = sorted({res.records[(c, s)].get("threads") for c in cells for s in res.seeds(c)})
    out += _table(["model (transfer cell)", "train s/epoch", "sequences/s", "wall s/epoch incl. validation",
                   "epochs trained"], rows)
    out += ["", f"Measured in the same run as the metrics above, {threads} torch thread(s), on a shared machine (other "
            "jobs running: compare rows with each other, not with other machines). Train s/epoch and sequences/s: "
            "optimizer steps only (each step's time between consecutive step logs, batch loading included); wall "
            "s/epoch adds validation and checkpoints. Rows marked \"read from the run's log\" were trained by an earlier "
            "process (`mmrec run`, another cell, or a run stopped and resumed): their step time is the median over the "
            "run log's intervals between consecutive logged steps, its wall time the median between validations, "
            "under whatever load that process had (a run with fewer steps an epoch than its `log_every` has no step "
            "interval to time: only its wall time). An epoch is one row of the last L+1 items per user (every "
            "position a target). RecBole's row is its own timing: its epoch is every prefix of every training "
            "sequence, so compare seconds per epoch, not sequences/s. " + _trace(res, cells), ""]


def section_missing(res: Results, out: list[str]) -> None:
    out += ["### Missing cells", ""]
    lines = []
    for c in res.plan["cells"]:
        stale = {int(x["seed"]) for x in res.plan.get("stale", []) if x["cell"] == c["name"]}
        missing = [s for s in c["seeds"] if (c["name"], s) not in res.records and s not in stale]
        if missing:
            lines.append(f"- `{c['name']}` ({c['group']}): seed(s) {missing} not run yet")
    for s in res.plan.get("stale", []):
        lines.append(f"- `{s['cell']}` seed {s['seed']}: its record was {s['reason']} (left out of the tables; "
                     f"`python -m experiments --config {res.plan['config']} --seed {s['seed']} --cells {s['cell']}` runs it again)")
    for s in res.plan.get("skipped", []):
        lines.append(f"- `{s['name']}` ({s['group']}): not applicable: {s['reason']}")
    if not res.plan.get("recbole"):
        lines.append("- RecBole's SASRec rows: not run (`.venv-recbole` absent, `--recbole off` or `--quick`)")
    out += (lines or ["None: every planned cell has a record for every planned seed."]) + [""]


def section_epoch_time(res: Results, out: list[str]) -> None:
    """``benchmarks/epoch_time.py``'s records of this config (``<records>/../bench/``): seconds per
    epoch of mmrec's models against RecBole's SASRec on the same split, machine and threads."""
    paths = sorted((res.folder.parent / "bench").glob("epoch_time-*.json"))
    if not paths:
        return
    out += ["### Epoch time against RecBole's SASRec", ""]
    rows = []
    records = {path: json.loads(path.read_text()) for path in paths}
    for rec in records.values():
        for r in rec["rows"]:
            share = r.get("share_of_recbole_epoch")
            label = "content model (the fine-tuning recipe, from scratch)" if r["model"] == "model" else MODEL_LABEL.get(
                r["model"], r["model"])
            rows.append([rec["domain"], label,
                         str(rec["threads"]), str(r.get("batch_size", "-")), f"{r['seconds_per_epoch']:.1f}",
                         f"{r['targets_per_second']:.0f}", "-" if share is None else f"{share:.2f}"])
    out += _table(["domain", "model", "threads", "batch", "s/epoch (optimizer steps only)", "targets/s",
                   "share of RecBole's epoch"], rows)
    lines = []
    for path, rec in records.items():
        load = rec.get("load_average") or ["?"]
        lines.append(f"`{os.path.relpath(path, REPO) if REPO in path.resolve().parents else path.name}` (commit "
                     f"{rec.get('commit') or '?'}, load average {load[0]:.1f} at the end, "
                     f"`python benchmarks/epoch_time.py --config {rec['config']} --domain {rec['domain']} --threads "
                     f"{rec['threads']} --epochs {rec['epochs']}`)")
    out += ["", "An epoch is every training interaction as a next-item target once, in both codes (RecBole trains "
            "each prefix of a sequence as a row, mmrec one row of the last L+1 items per user); each model trains "
            "from scratch with its own batch size, first epoch kept. Each record's load average says how idle the "
            "machine was (about 1.0: nothing but the benchmark); under load RecBole slows most, so compare rows of "
            "one record only. Records: "
            + "; ".join(lines) + ".", ""]


# -- probes and recipe selection: validation only -------------------------------------------------

def _valid_gap(ra: list[np.ndarray | None], rb: list[np.ndarray | None], seeds: list[int], metric: str = METRIC):
    """Paired validation gap over the given seeds, or None where a seed lacks ranks or the users differ."""
    from mmrec.compare import compare_ranks

    if not seeds or any(r is None for r in ra + rb) or any(x.shape != y.shape for x, y in zip(ra, rb)):
        return None
    return compare_ranks(ra, rb, metric)


def _seed_list(seeds: list[int]) -> str:
    if seeds and seeds == list(range(seeds[0], seeds[-1] + 1)) and len(seeds) > 2:
        return f"{seeds[0]}-{seeds[-1]}"
    return ", ".join(map(str, seeds)) or "none"


def _per_seed(vals: list[float]) -> str:
    return " / ".join(f"{100 * v:.2f}" for v in vals) if vals else "-"


def _mean(vals: list[float]) -> str:
    return f"{100 * statistics.mean(vals):.2f}" if vals else "-"


def _range(vals: list[float], digits: int = 0) -> str:
    if not vals:
        return "-"
    lo, hi = min(vals), max(vals)
    return f"{lo:.{digits}f}" if f"{lo:.{digits}f}" == f"{hi:.{digits}f}" else f"{lo:.{digits}f}-{hi:.{digits}f}"


def section_probes(root: Path, out: list[str], cell: str = "transfer") -> None:
    """Every probe folder ``<root>/<family>-<probe>/records`` (``configs/probes/``) against its family's
    ``<family>-base`` folder: the pretrained models on the sources' validation split and the fine-tuned
    models on each target's, per seed, the mean and the paired interval over validation users
    (seeds averaged per user, over the seeds both folders have). Reads validation ranks only."""
    folders = sorted(p.parent for p in Path(root).glob("*/records/plan.json"))
    if not folders:
        return
    loaded = {f.parent.name: Results.load(f) for f in folders}
    families: dict[str, list[str]] = {}
    for name in loaded:
        families.setdefault(name.split("-")[0], []).append(name)
    out += ["## Probes (validation only)", "",
            "A probe is a config in `configs/probes/` that changes one part of its base config, pretraining included, "
            "run as the `transfer` cell (`python -m experiments --config configs/probes/<probe>.yaml --seed N --cells "
            f"transfer --recbole off --records {_shown(Path(root))}/<probe>/records`). Each is compared with its "
            "family's `<family>-base` probe: the base config as it is, trained with the probes' code, so a gap is not "
            "a code difference. Everything in this section is read from the validation split: the per-user "
            "validation ranks beside each record (`*.valid_ranks.parquet`, `*.pretrained.valid_ranks.parquet`); "
            "values are NDCG@10 in %, gaps paired over validation users with seeds averaged per user (95 % "
            "bootstrap, `*` where the interval excludes zero), over the seeds both rows have. A probe is adopted "
            "into its base config only where the fine-tuned interval excludes zero in its favour. The test "
            "metrics these runs also recorded are not shown and select nothing.", ""]
    for family, names in sorted(families.items()):
        ref_name = f"{family}-base"
        if ref_name not in loaded:
            out += [f"Probes {', '.join(names)}: no `{ref_name}` folder to compare with.", ""]
            continue
        ref = loaded[ref_name]
        order = [ref_name] + sorted(n for n in names if n != ref_name)
        out += [f"### `{family}-*` against `{ref_name}` (`{ref.plan['config']}`)", ""]
        rows = []
        for name in order:
            res = loaded[name]
            pre = res.pretrained(cell)
            seeds = sorted(pre)
            vals = [pre[s]["valid_metrics"][METRIC] for s in seeds]
            epochs = [float(pre[s]["cost"]["epochs"]) for s in seeds if (pre[s].get("cost") or {}).get("epochs")]
            gap = "reference"
            if name != ref_name:
                common = sorted(set(seeds) & set(ref.pretrained(cell)))
                g = _valid_gap([res.valid_ranks(cell, s, None, "pretrained") for s in common],
                               [ref.valid_ranks(cell, s, None, "pretrained") for s in common], common)
                gap = f"{gap_text(g)} (seeds {_seed_list(common)})" if g is not None else "- (no validation ranks)"
            rows.append([f"`{name}`", f"`{res.plan['config']}`", _seed_list(seeds), _range(epochs), _per_seed(vals),
                         _mean(vals), gap])
        out += [f"**Pretraining** on {', '.join(ref.plan['sources'])}: the best validation NDCG@10 of the pretrained "
                "model on the sources' validation users (what pretraining early-stops on).", ""]
        out += _table(["probe", "config", "seeds", "epochs trained", "per seed", "mean", f"minus `{ref_name}` [95 %]"], rows)
        out += [""]
        for domain in ref.plan["targets"]:
            rows = []
            for name in order:
                res = loaded[name]
                ft = res.model(cell, domain, "finetuned")
                seeds = sorted(ft)
                vals = [ft[s]["valid"][METRIC] for s in seeds]
                minutes = [res.get(cell, s)["seconds"] / 60 for s in seeds if res.get(cell, s).get("seconds")]
                gap = "reference"
                if name != ref_name:
                    common = sorted(set(seeds) & set(ref.model(cell, domain, "finetuned")))
                    g = _valid_gap([res.valid_ranks(cell, s, domain, "finetuned") for s in common],
                                   [ref.valid_ranks(cell, s, domain, "finetuned") for s in common], common)
                    gap = f"{gap_text(g)} (seeds {_seed_list(common)})" if g is not None else "- (no validation ranks)"
                rows.append([f"`{name}`", _seed_list(seeds), _per_seed(vals), _mean(vals), gap, _range(minutes)])
            out += [f"**Fine-tuned on {domain}**: the validation NDCG@10 of the early-stopping best.", ""]
            out += _table(["probe", "seeds", "per seed", "mean", f"minus `{ref_name}` [95 %]",
                           "minutes per run"], rows)
            out += ["", "Minutes per run: the record's wall time (pretraining, fine-tuning and evaluation) on the machine "
                    "and load it ran under (several runs often shared the 2 cores), so only the epoch counts compare "
                    "exactly. " + " ".join(f"`{n}`: {_trace(loaded[n], [cell])}" for n in order), ""]


def section_selection(root: Path, out: list[str]) -> None:
    """Every ``benchmarks/select_finetune.py`` record under ``<root>/<config>/<domain>/``: per variant its
    validation NDCG@10 per seed, the mean and the paired interval over validation users against the
    variant named ``base`` (else the first by name) over the seeds both have."""
    import numpy as np

    groups: dict[tuple[str, str, str], dict[str, dict[int, dict[str, Any]]]] = {}
    paths: dict[tuple[str, str, str], list[Path]] = {}
    for path in sorted(Path(root).glob("*/*/*-seed*.json")):
        rec = json.loads(path.read_text())
        key = (rec["config"]["path"], rec["domain"], path.parent.parent.name)  # a folder: one set of pretrained models
        groups.setdefault(key, {}).setdefault(rec["variant"], {})[int(rec["seed"])] = rec
        paths.setdefault(key, []).append(path)
    if not groups:
        return
    out += ["## Fine-tuning recipe selection (validation only)", "",
            "`benchmarks/select_finetune.py` fine-tunes each variant (a name and overrides of the model / finetune "
            "sections) from the same pretrained model per seed, exactly as the `finetuned_model` stage does, and "
            f"records its best validation metrics and per-user validation ranks (`{_shown(Path(root))}/<config>/"
            "<domain>/<variant>-seed<N>.json`). Values: validation NDCG@10 in %; gap: paired over validation users, "
            "seeds averaged per user, 95 % bootstrap, `*` where it excludes zero, over the seeds both variants have "
            "fine-tuned from the same pretrained model (the records' `pretrained_sha256`; pretraining made again "
            "gives another model, whose variants go to another folder and table). The test split is never read.", ""]
    for (config, domain, folder), variants in sorted(groups.items()):
        ref_name = "base" if "base" in variants else sorted(variants)[0]
        ref = variants[ref_name]
        rows = []
        for name in [ref_name] + sorted(v for v in variants if v != ref_name):
            by_seed = variants[name]
            seeds = sorted(by_seed)
            vals = [by_seed[s]["valid"][METRIC] for s in seeds]
            gap = "reference"
            if name != ref_name:
                common = sorted(s for s in set(seeds) & set(ref) if by_seed[s]["config"].get("pretrained_sha256")
                                == ref[s]["config"].get("pretrained_sha256"))
                g = _valid_gap([np.asarray(by_seed[s]["valid_ranks"]) for s in common],
                               [np.asarray(ref[s]["valid_ranks"]) for s in common], common)
                gap = f"{gap_text(g)} (seeds {_seed_list(common)})" if g is not None else "-"
            overrides = " ".join(next(iter(by_seed.values()))["overrides"]) or "-"
            epochs = [float(by_seed[s]["epochs_run"]) for s in seeds if by_seed[s].get("epochs_run") is not None]
            spe = [float(by_seed[s]["seconds_per_epoch_incl_validation"]) for s in seeds
                   if by_seed[s].get("seconds_per_epoch_incl_validation") is not None]
            rows.append([f"`{name}`", f"`{_cell(overrides)}`" if overrides != "-" else "-", _seed_list(seeds),
                         _range(epochs), _range(spe), _per_seed(vals), _mean(vals), gap])
        recs = [r for v in variants.values() for r in v.values()]
        commits = sorted({(r.get("commit") or "?")[:10] + ("+dirty" if r.get("dirty") else "") for r in recs})
        commands = sorted({r.get("command", "?") for r in recs})
        out += [f"### `{config}` on {domain}" + (f" (`{folder}/`)" if folder != Path(config).stem else ""), ""]
        out += _table(["variant", "overrides", "seeds", "epochs run", "s/epoch incl. validation (shared machine)",
                       "per seed", "mean", f"minus `{ref_name}` [95 %]"], rows)
        out += ["", f"Pretrained models: `{ref[min(ref)]['config'].get('pretrained', '?')}` (and its `-seed<N>` "
                f"folders). Records: {len(recs)} in `{_shown(paths[(config, domain, folder)][0].parent)}/`; commit(s) "
                f"{', '.join(commits)}; command(s): " + "; ".join(f"`{c}`" for c in commands) + ".", ""]


BENCH_SCRIPTS = {  # script -> the make target that runs it and the record it writes by default
    "benchmarks/bench.py": ("make bench", "bench.json"),
    "benchmarks/bench_serving.py": ("make bench-serve", "bench_serving-<sections>.json"),
    "benchmarks/fresh_clone.py": ("make bench-setup", "fresh_clone.json"),
    "benchmarks/bench_memory.py": ("make bench-memory", "bench_memory-<domain>.json"),
}


def _cell(value: Any) -> str:
    return str(value).replace("|", "\\|")


def _load(load: list[float] | None) -> str:
    return " ".join(f"{x:.2f}" for x in load) if load else "?"


def section_benchmarks(folder: Path, out: list[str]) -> None:
    """Every record of the ``BENCH_SCRIPTS`` in ``folder``
    (``docs/results/bench``): each table as the script printed it, under a sentence with the
    command, commit, date and load averages of its run. Machine-level: once, not per config."""
    out += ["## Benchmarks", "",
            "Timings of the library and the service on the machine named under each record (not of a config's "
            f"experiments), copied from the JSON records in `{_shown(folder)}/`, one per run (a rerun replaces "
            "it): each table as the script printed it. They depend on the machine and on what else ran on it, so "
            "each record gives the load average (1, 5, 15 min) at its start and end, and each table the one when it "
            "was printed; compare rows of one record only.", ""]
    paths = sorted(Path(folder).glob("*.json"))
    records = {path: json.loads(path.read_text()) for path in paths}
    for script, (target, name) in BENCH_SCRIPTS.items():
        if not any(r.get("script") == script for r in records.values()):
            out += [f"No record of `{script}` yet: `{target}` (`.venv/bin/python {script}`) writes "
                    f"`{_shown(folder)}/{name}`.", ""]
    for path, rec in records.items():
        commit = (rec.get("commit") or "?")[:10] + (" with uncommitted changes" if rec.get("dirty") else "")
        cpu = rec.get("cpu") or {}
        quick = " (`--quick`: toy size, tests the script, not the numbers)" if rec.get("quick") else ""
        out += [f"### `{path.name}`{quick}", "",
                f"`{rec.get('command', '?')}` at commit {commit}, {rec.get('time_utc', '?')} (UTC); load average "
                f"{_load(rec.get('load_average_start'))} at the start, {_load(rec.get('load_average_end'))} at the end; "
                f"torch {rec.get('torch', '?')}, " + (f"{rec['threads']} torch thread(s), " if rec.get("threads") else "")
                + f"{cpu.get('model', '?')} "
                f"({cpu.get('usable_cores', '?')} of {cpu.get('cores', '?')} cores usable), "
                f"{'GPU ' + rec['gpu'] if rec.get('gpu') else 'no GPU'}. Record: `{_shown(path)}`.", ""]
        for t in rec.get("tables", []):
            out += [f"**{t['title']}**", ""]
            out += _table([_cell(c) for c in t["columns"]], [[_cell(c) for c in r] for r in t["rows"]])
            notes = [*t.get("notes", []), f"load average {_load(t.get('load_average'))} when printed"]
            out += ["", "; ".join(notes) + ".", ""]


def _shown(path: Path) -> str:
    return os.path.relpath(path, REPO) if REPO in Path(path).resolve().parents else str(path)


def config_section(res: Results, docs: Path) -> tuple[list[str], list[Path]]:
    figs = docs / "results" / res.name
    out = [f"## `{res.plan['config']}`" + (" (`--quick`: toy size, tests the script, not the numbers)" if res.plan.get("quick") else ""), ""]
    n = len(res.records)
    planned = sum(len(c["seeds"]) for c in res.plan["cells"])
    out += [f"{n} of {planned} planned cell runs have a record (`{os.path.relpath(res.folder, REPO) if REPO in res.folder.resolve().parents else res.folder}`). "
            f"Targets: {', '.join(res.plan['targets'])}; sources: {', '.join(res.plan['sources']) or 'none'}.", ""]
    seeds = sorted({x for c in res.plan["cells"] for x in c["seeds"]})
    out += [f"Run (resumes; cells with a record are skipped): `make experiments CONFIG={res.plan['config']} "
            f"SEEDS=\"{' '.join(map(str, seeds))}\"{' QUICK=1' if res.plan.get('quick') else ''}`.", ""]
    made: list[Path] = []
    if not res.records:
        out += ["No cell of this config has run yet (a seed of the full-size shared domains takes hours on this "
                "2-core machine), so it has no table.", ""]
        section_epoch_time(res, out)
        section_missing(res, out)
        return out, made
    for domain in res.plan["targets"]:
        section_transfer(res, domain, out)
        made += section_fractions(res, domain, out, figs)
        made += _ablation(res, domain, out, figs, "Modality ablation", "modality", "fused-merge_attention",
                          note="NICL is off in every row of this table (a single-modality tower cannot have it), "
                          "so the fused merge_attention row differs from the transfer cell's fine-tuned model. "
                          "A single-modality tower maps its encoder's pooled vector to d (with frozen encoders only the "
                          "adaptor is trained: a Linear map by default), while a fused tower combines the tokens "
                          "(merge_attention: a trained Transformer layer over them): with frozen encoders a fused tower "
                          "has more trained layers, also on items with one modality.",
                          fig_name="modality.png")
        if any("text-OR-image catalog" in c["label"] for c in _cells(res, "mom")):
            made += _ablation(res, domain, out, figs, "MoM routing vs fused on a text-OR-image catalog", "mom", "mom-fused",
                              note="Every item of every domain is text-only or image-only (demo data regenerated with "
                              "p_text_only = p_image_only = 0.5); NICL off in both rows.")
        else:
            made += _ablation(res, domain, out, figs, "MoM routing vs fused on the config's own catalog", "mom",
                              "mom-fused", note="MoM routes an item with an image through the image encoder and an "
                              "item without one through the text encoder (`mom_both: image`); the fused row reads both "
                              "and is the same config as the modality table's fused merge_attention cell (its training "
                              "runs are shared). NICL off in both rows.")
        all_four = any(c["name"] == "objective-all" for c in _cells(res, "objective"))
        made += _ablation(res, domain, out, figs, "Objective ablation", "objective", "objective-next-item",
                          extra=[] if all_four else [("transfer", "next-item + NICL + NID + RCL (the transfer cell)")],
                          note="Each auxiliary loss is added alone to the next-item loss, in pretraining and fine-tuning.",
                          fig_name="objective.png")
        section_cold(res, domain, out)
        section_frequency(res, domain, out)
        section_cost(res, domain, out)
    section_epoch_time(res, out)
    section_missing(res, out)
    return out, made


def write_report(docs: Path, record_dirs: list[Path], bench: Path | None = None, probes: Path | None = None,
                 selection: Path | None = None) -> Path:
    """Write ``docs/RESULTS.md`` (and the figures) from every record folder in ``record_dirs``, the
    probe records in ``probes`` (default ``docs/results/probes``), the recipe-selection records in
    ``selection`` (default ``docs/results/selection``) and the benchmark records in ``bench``
    (default ``docs/results/bench``)."""
    docs = Path(docs)
    results = [Results.load(d) for d in record_dirs if (d / "plan.json").is_file()]
    results.sort(key=lambda r: (r.plan.get("quick", False), not r.records, r.name))
    lines = [
        "# Results", "",
        "Generated by `make experiments` (`python -m experiments`, `experiments/report.py`) from the per-cell records; "
        "do not edit by hand. Each cell is a config derived from a base config (`experiments/cells.py`), run for a "
        "seed through the library stages (`mmrec/stages.py`) in its own artifacts folder; the `transfer` cell is the "
        "base config as it is and runs in the artifacts folder of `mmrec run --config <base> --seed N` (a seed "
        "`mmrec run` already trained is evaluated from its finished checkpoints, not trained again). A record holds the test "
        "and validation metrics, the per-user test ranks and every trained model's per-user validation ranks (parquet "
        "files beside it), the training cost, the commit "
        "and the config's sha256. All metrics: full ranking over every item, the masked protocol (every history "
        "item out of the ranking), leave-one-out test split; the test split selects nothing (early stopping and "
        f"the gate read validation). Groups: {', '.join(GROUPS)}.", "",
    ]
    made: list[Path] = []
    for res in results:
        part, figs = config_section(res, docs)
        lines += part
        made += figs
    if not results:
        lines += ["No record yet: run `make experiments`.", ""]
    section_probes(docs / "results" / "probes" if probes is None else Path(probes), lines)
    section_selection(docs / "results" / "selection" if selection is None else Path(selection), lines)
    section_benchmarks(docs / "results" / "bench" if bench is None else Path(bench), lines)
    path = docs / "RESULTS.md"
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(".RESULTS.md.tmp")
    tmp.write_text("\n".join(lines).rstrip() + "\n", encoding="utf-8")
    tmp.replace(path)
    return path
