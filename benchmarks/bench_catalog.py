"""Benchmark: import + validation of the shared real datasets (prints figures; not a test).

Each domain runs in its own child process so peak memory (max RSS) is per dataset. Phases:
import (raw files -> catalog contract), validation (Great Expectations, including its import and
the decode of every image) and preprocessing (the papers' protocol).

    .venv/bin/python benchmarks/bench_catalog.py [--config configs/real.yaml] [--domain NAME] [--repeat N]
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import platform
import resource
import statistics
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def _run_domain(config: str, domain: str, queue) -> None:
    t0 = time.perf_counter()
    from mmrec.config import load_config
    from mmrec.data.importers import import_domain
    from mmrec.data.preprocess import preprocess

    cfg = load_config(config)
    d = cfg.domain(domain)
    t_import0 = time.perf_counter()
    catalog = import_domain(d.source.format, cfg.resolve(d.source.path), d.name, d.source.options)
    t_import = time.perf_counter() - t_import0

    t_val0 = time.perf_counter()
    import great_expectations  # noqa: F401  (part of validation's cost, shown separately too)

    t_gx = time.perf_counter() - t_val0
    from mmrec.data.validation import validate

    clean, report, _ = validate(catalog, d.validation, progress=False)
    t_val = time.perf_counter() - t_val0
    if not report.passed:
        raise SystemExit(f"{domain}: validation failed")
    t_pre0 = time.perf_counter()
    pre = preprocess(clean, cfg.preprocess)
    t_pre = time.perf_counter() - t_pre0
    queue.put({
        "domain": domain,
        "items": catalog.items.height,
        "interactions": catalog.interactions.height,
        "images": int(catalog.items["image"].is_not_null().sum()),
        "kept_interactions": pre.catalog.interactions.height,
        "import_s": t_import,
        "validation_s": t_val,
        "gx_import_s": t_gx,
        "preprocess_s": t_pre,
        "total_s": time.perf_counter() - t0,
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
    })


def main(argv: list[str] | None = None) -> list[dict]:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", default=str(REPO / "configs" / "real.yaml"))
    ap.add_argument("--domain", action="append")
    ap.add_argument("--repeat", type=int, default=1, help="runs per domain (median reported)")
    ap.add_argument("--json", help="also write the results here")
    args = ap.parse_args(argv)

    from mmrec.config import load_config

    cfg = load_config(args.config)
    domains = args.domain or [d.name for d in cfg.domains]
    ctx = mp.get_context("spawn")
    print(f"# mmrec catalog benchmark: {platform.node()} {os.cpu_count()} cores, Python {platform.python_version()}")
    print(f"# config {args.config}, {args.repeat} run(s) per domain, median shown, load average {load_average()}")
    rows = []
    for domain in domains:
        runs = []
        for _ in range(args.repeat):
            q = ctx.Queue()
            p = ctx.Process(target=_run_domain, args=(args.config, domain, q))
            t0 = time.perf_counter()
            p.start()
            res = q.get()
            p.join()
            res["wall_s"] = time.perf_counter() - t0  # includes interpreter start-up
            runs.append(res)
        med = {k: statistics.median(r[k] for r in runs) if isinstance(runs[0][k], float) else runs[0][k] for k in runs[0]}
        rows.append(med)

    head, cells, note = table_cells(rows)
    lines = [head, *cells]
    widths = [max(len(x[i]) for x in lines) for i in range(len(head))]
    for x in lines:
        print("  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(x, widths))))
    print(f"{note}; load average {load_average()} (1, 5, 15 min)")
    sys.stdout.flush()
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2))
    return rows


HEAD = ("domain", "items", "images", "interactions", "import s", "validate s", "(GX import s)", "preproc s", "wall s",
        "validation share", "peak RSS MB")


def table_cells(rows: list[dict]) -> tuple[tuple[str, ...], list[tuple[str, ...]], str]:
    """The table as printed: its head, one row of formatted cells per domain, and the all-domains line
    (``benchmarks/bench.py`` records the same cells)."""
    cells = []
    for r in rows:
        work = r["import_s"] + r["validation_s"] + r["preprocess_s"]
        cells.append((r["domain"], str(r["items"]), str(r["images"]), str(r["interactions"]), f"{r['import_s']:.2f}",
                      f"{r['validation_s']:.2f}", f"{r['gx_import_s']:.2f}", f"{r['preprocess_s']:.2f}", f"{r['wall_s']:.2f}",
                      f"{100 * r['validation_s'] / work:.0f}%", f"{r['peak_rss_mb']:.0f}"))
    total_work = sum(r["import_s"] + r["validation_s"] + r["preprocess_s"] for r in rows)
    total_val = sum(r["validation_s"] for r in rows)
    note = (f"all domains: wall {sum(r['wall_s'] for r in rows):.2f} s, validation {100 * total_val / total_work:.0f}% of "
            f"import+validation+preprocess time, max peak RSS {max(r['peak_rss_mb'] for r in rows):.0f} MB")
    return HEAD, cells, note


def load_average() -> str:
    return " ".join(f"{x:.2f}" for x in os.getloadavg()) if hasattr(os, "getloadavg") else "?"


if __name__ == "__main__":
    main()
