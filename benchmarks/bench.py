"""`make bench`: every benchmark table of the project in one run (prints figures; not a test).

In this order, each table with the load average at the time it was printed:

1. catalog (``bench_catalog.py``): import, validation and preprocessing of the shared real datasets;
2. mfu (``bench_model.py``): training-step throughput of the cpu preset model and its model FLOP
   utilisation in fp32 and bf16, against the matmul peak measured in the same run on the same threads;
3. text: the feature-cache build against sentence-transformers' ``encode`` on the same titles;
4. eval: full-ranking evaluation throughput;
5. top2: end-to-end training of the text encoder's top 2 layers on the CPU, and on the GPU when
   torch sees one (the table says when there is none).

The default sizes took 6 min with ``--threads 1`` and 10.6 min with 2 threads on the 2-core machine
at load average 3 to 6 (two training jobs beside it); ``--quick`` is a toy size (34 s there), for checking that every
table runs, not for comparison: tiny batches, the first 48 MovieLens items, small peak matmuls.
Under background load, 2 threads can be far slower than 1 (the threads wait for each other while
the other jobs hold the cores): compare the two with ``--threads``.

Every table also goes, as printed, into one JSON record (``docs/results/bench/bench.json`` by
default; ``--records ''`` for none; a ``--quick`` run writes none unless ``--records`` names a
folder, and then as ``bench-quick.json``) with the command, the commit, the load averages and the
machine; ``python -m experiments --report-only`` puts it into docs/RESULTS.md. The helpers that
make such a record (``new_record``, ``write_record``) serve ``bench_serving.py`` too.

    .venv/bin/python benchmarks/bench.py [--quick] [--threads N] [--json FILE] [--records DIR]
        (make bench [QUICK=1] [THREADS=N])
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import os
import platform
import shlex
import sys
import time
from pathlib import Path

import bench_catalog
import bench_model

REPO = Path(__file__).resolve().parents[1]
RECORDS = REPO / "docs" / "results" / "bench"
MODEL_SECTIONS = "mfu,text,eval,top2"
SIZES = {
    "default": {"catalog": [], "model": ["--texts", "2000", "--batch", "32", "--warmup", "2", "--steps", "10",
                                          "--top2-batch", "16", "--top2-warmup", "1", "--top2-steps", "3",
                                          "--users", "10000", "--items", "100000"]},
    "quick": {"catalog": ["--domain", "amazon_instrument"],
              "model": ["--texts", "32", "--batch", "4", "--warmup", "1", "--steps", "2", "--top2-batch", "2",
                        "--top2-warmup", "1", "--top2-steps", "1", "--users", "500", "--items", "2000",
                        "--ml-items", "48", "--peak-max-n", "512", "--peak-seconds", "0.1"]},
}


# -- records: what a benchmark printed, with what it ran on, for docs/RESULTS.md ----------------------

def load_average() -> list[float] | None:
    return [round(x, 2) for x in os.getloadavg()] if hasattr(os, "getloadavg") else None


def git_state() -> dict:
    """HEAD and whether the code a benchmark runs (library, benchmarks, service, configs) differs from it."""
    from mmrec.tracking import code_version

    return code_version(("mmrec", "benchmarks", "deploy", "configs"), REPO)


def new_record(script: str, argv: list[str]) -> dict:
    """What is known when a benchmark starts: its command line, the commit, the UTC time, the load
    average and the machine (``write_record`` adds the tables and what is known at the end)."""
    python = Path(sys.executable)
    python = os.path.relpath(python, REPO) if REPO in python.parents else "python"
    usable = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return {"script": script, "argv": list(argv), "command": shlex.join([python, script, *argv]), **git_state(),
            "time_utc": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "load_average_start": load_average(), "python": platform.python_version(),
            "cpu": {"model": bench_model.cpu_model(), "cores": os.cpu_count(), "usable_cores": usable}}


def table(title: str, columns, rows, notes=(), load: list[float] | None = None) -> dict:
    """One printed table as a record holds it: the cells as printed (text), its notes and the load
    average when it was printed."""
    return {"title": title, "columns": [str(c) for c in columns], "rows": [[str(c) for c in r] for r in rows],
            "notes": [str(n) for n in notes], "load_average": load if load is not None else load_average()}


def write_record(folder: Path, name: str, record: dict, tables: list[dict], *, threads: int, gpu: str | None,
                 **extra) -> Path:
    """``folder/name``, atomically (a rerun replaces it): ``record`` (``new_record``) with ``tables``,
    the torch version and thread count, the GPU used (None: none) and the load average now."""
    import torch

    from mmrec.io import write_json

    path = Path(folder) / name
    path.parent.mkdir(parents=True, exist_ok=True)
    write_json(path, {**record, **extra, "torch": torch.__version__, "threads": threads, "gpu": gpu,
                      "load_average_end": load_average(), "tables": tables})
    return path


def shown(path: Path) -> str:
    """``path`` relative to the repository when inside it."""
    path = Path(path).resolve()
    return str(path.relative_to(REPO)) if REPO in path.parents else str(path)


def records_folder(value: str | None, quick: bool) -> Path | None:
    """``--records``: None (the option left out) means docs/results/bench, except for a toy-size run."""
    if value is None:
        return None if quick else RECORDS
    return Path(value) if value else None


@contextlib.contextmanager
def captured_tables():
    """Every table ``bench_model`` prints, as ``table`` records (it prints them through its own
    module-level ``table``, which this wraps for the duration)."""
    tables: list[dict] = []
    printed = bench_model.table

    def record(title, head, rows, notes=()):
        printed(title, head, rows, notes)
        tables.append(table(title, head, rows, notes))

    bench_model.table = record
    try:
        yield tables
    finally:
        bench_model.table = printed


def catalog_table(rows: list[dict], load: list[float] | None) -> dict:
    """``bench_catalog``'s table, its cells as it prints them."""
    head, cells, note = bench_catalog.table_cells(rows)
    return table("catalog import, validation and preprocessing of configs/real.yaml (each domain in its own process)",
                 head, cells, [note], load=load)


def main(argv: list[str] | None = None) -> dict:
    argv = list(sys.argv[1:] if argv is None else argv)
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="toy sizes: checks that every table runs")
    ap.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)),
                    help="torch threads for the model benchmark and its matmul peak (default: every usable core)")
    ap.add_argument("--json", help="also write every table's records here")
    ap.add_argument("--records", help="folder for the run's record, for docs/RESULTS.md (default docs/results/bench; "
                    "'' for none; --quick: none unless named)")
    args = ap.parse_args(argv)
    folder = records_folder(args.records, args.quick)
    record = new_record("benchmarks/bench.py", argv)
    sizes = SIZES["quick" if args.quick else "default"]
    t0 = time.perf_counter()
    out = {"quick": args.quick, "catalog": bench_catalog.main(sizes["catalog"])}
    tables = [catalog_table(out["catalog"], load_average())]
    print()
    with captured_tables() as model_tables:
        out["model"] = bench_model.main(["--only", MODEL_SECTIONS, "--threads", str(args.threads), *sizes["model"]])
    tables += model_tables
    out["wall_s"] = time.perf_counter() - t0
    print(f"\nmake bench: {out['wall_s']:.0f} s in all, load average {bench_catalog.load_average()}")
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=2, default=str))
    if folder is not None:
        import torch

        gpu = torch.cuda.get_device_name() if torch.cuda.is_available() else None
        path = write_record(folder, "bench-quick.json" if args.quick else "bench.json", record, tables,
                            threads=args.threads, gpu=gpu, quick=args.quick, wall_s=round(out["wall_s"], 1),
                            results=out)
        print(f"(record: {shown(path)})")
    return out


if __name__ == "__main__":
    main()
