"""Benchmark: the README's two set-up claims from a fresh clone (prints figures; not a test).

Clones the committed HEAD of this repository into a scratch folder and runs what a new user runs:
``make install`` (a ``.venv`` with the pinned stack, plain pip) and ``make demo`` (the whole Dagster
asset graph on the built-in demo data, ending with a registered model), timing each, then measures
the venv (size on disk, ``pip check``) and reads the registered model's alias from the clone's
MLflow registry. Every row goes into a JSON record (``docs/results/bench/fresh_clone.json`` by
default, ``--records ''`` for none) that ``python -m experiments --report-only`` puts into
docs/RESULTS.md, so the README's set-up times are copied from a record. Uncommitted changes are not
in the clone (the record says whether there were any).

    .venv/bin/python benchmarks/fresh_clone.py [--workdir DIR] [--keep] [--records DIR]    (make bench-setup)

Needs the package registries (pip) and about 7 GB of disk for the clone's venv; takes about as long
as ``make install`` + ``make demo`` (minutes on 2 cores). Run it on an otherwise idle machine: the
record holds the load averages.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import bench  # this folder is on sys.path when run as a script

REPO = Path(__file__).resolve().parents[1]


def _du_bytes(path: Path) -> int:
    return sum(p.lstat().st_size for p in path.rglob("*") if p.is_file() or p.is_symlink())


def _timed(cmd: list[str], cwd: Path, log: Path, env: dict) -> tuple[float, int]:
    """Run ``cmd`` in ``cwd`` with its output into ``log``; (wall seconds, exit status)."""
    t0 = time.perf_counter()
    with log.open("w") as fh:
        rc = subprocess.run(cmd, cwd=cwd, stdout=fh, stderr=subprocess.STDOUT, env=env).returncode
    return time.perf_counter() - t0, rc


def _tail(log: Path, n: int = 2000) -> str:
    return log.read_text(errors="replace")[-n:]


def main(argv: list[str] | None = None) -> dict:
    argv = list(sys.argv[1:] if argv is None else argv)
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repo", default=str(REPO), help="what to clone (default: this repository)")
    ap.add_argument("--workdir", help="where the clone goes (default: a new temporary folder)")
    ap.add_argument("--keep", action="store_true", help="keep the clone (default: removed at the end)")
    ap.add_argument("--records", help="record folder (default docs/results/bench; '' for none)")
    ap.add_argument("--targets", nargs="+", default=["install", "demo"], choices=["install", "demo"],
                    help="make targets to time, in order (default: install demo)")
    args = ap.parse_args(argv)

    record = bench.new_record("benchmarks/fresh_clone.py", argv)
    work = Path(args.workdir) if args.workdir else Path(tempfile.mkdtemp(prefix="mmrec-fresh-clone-"))
    clone = work / "mmrec"
    if clone.exists():
        raise SystemExit(f"{clone} exists: give another --workdir")
    work.mkdir(parents=True, exist_ok=True)
    subprocess.run(["git", "clone", "--quiet", args.repo, str(clone)], check=True)
    record["cloned"] = {"repo": args.repo, "commit": subprocess.run(["git", "rev-parse", "HEAD"], cwd=clone, check=True,
                                                                    capture_output=True, text=True).stdout.strip()}
    env = {k: v for k, v in os.environ.items() if k not in ("VIRTUAL_ENV", "CI", "PYTHONPATH")}
    print(f"# fresh clone of {record['cloned']['commit']}{' (uncommitted changes are not in it)' if record['dirty'] else ''} "
          f"in {clone}; load average {bench.load_average()}", flush=True)
    rows, results = [], {}
    try:
        for target in args.targets:
            log = work / f"make-{target}.log"
            load = bench.load_average()
            wall, rc = _timed(["make", target], clone, log, env)
            results[target] = {"wall_s": wall, "rc": rc, "load_average_before": load}
            result = "ok" if rc == 0 else f"FAILED (exit {rc})"
            rows.append((f"make {target}", f"{wall // 60:.0f} min {wall % 60:04.1f} s", result))
            print(f"make {target}: {rows[-1][1]}, {result} (log {log})", flush=True)
            if rc != 0:
                print(_tail(log), file=sys.stderr)
                break
        venv = clone / ".venv"
        if venv.is_dir():
            size = _du_bytes(venv)
            check = subprocess.run([str(venv / "bin" / "python"), "-m", "pip", "check"], capture_output=True, text=True)
            said = (check.stdout + check.stderr).strip()
            results["venv"] = {"bytes": size, "pip_check_rc": check.returncode, "pip_check": said[-500:]}
            rows.append(("venv size, `pip check`", f"{size / 1e9:.2f} GB",
                         "clean" if check.returncode == 0 else f"FAILED: {(said.splitlines() or ['?'])[-1]}"))
            print(f"venv: {size / 1e9:.1f} GB, pip check: {rows[-1][2]}", flush=True)
    finally:
        if not args.keep:
            shutil.rmtree(work if not args.workdir else clone, ignore_errors=True)
    tables = [bench.table("from a fresh clone (commands run in the clone, one after the other)",
                          ("step", "wall", "result"), rows)]
    folder = bench.records_folder(args.records, quick=False)
    if folder is not None:
        path = bench.write_record(folder, "fresh_clone.json", record, tables, threads=None, gpu=None,
                                  results=results, targets=args.targets)
        print(f"(record: {bench.shown(path)})")
    return results


if __name__ == "__main__":
    main()
