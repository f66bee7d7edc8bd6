"""Resident memory of a fine-tuning run with and without handing freed heap memory back (``release_memory``).

Each setting trains the same variant of ``finetuned_model`` from scratch for ``--steps`` optimizer
steps (validation at the end of each epoch, as in real runs) in its own process, so one setting's
heap cannot shape the other's. The process's resident set size is read after loading the data, after
every step and after every validation (``mmrec.memory.resident_bytes``); the table gives it after
loading, its peak, at the end, and the seconds per optimizer step (validation excluded), so the cost
of ``malloc_trim`` shows next to what it saves. The models' metrics are not the point and are not
printed; nothing reads the test split.

    .venv/bin/python benchmarks/bench_memory.py --config configs/amazon.yaml --domain amazon_instrument --steps 300

Needs ``validated_catalog`` and ``item_features`` of the domain (`make bench-memory` builds them:
``mmrec raw_catalog``, ``validated_catalog``, ``item_features --config ...``). Prints a table; writes ``docs/results/bench/bench_memory-<domain>.json`` (``--records``),
which ``python -m experiments --report-only`` puts into docs/RESULTS.md (`make bench-memory`).
"""

from __future__ import annotations

import argparse
import dataclasses as dc
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import bench  # noqa: E402  (the record helpers)

SETTINGS = {"off": False, "on": True}
"""Table row -> ``TrainConfig.release_memory``."""
MIB = 1 << 20


def measure(config: str, domain: str, model: str, steps: int, release: bool, threads: int) -> dict:
    """One setting, in this process: resident memory along a fine-tuning run of ``steps`` steps."""
    import torch

    from mmrec import stages
    from mmrec.config import load_config
    from mmrec.experiment import fit
    from mmrec.memory import resident_bytes
    from mmrec.models.recommender import Recommender

    torch.set_num_threads(threads)
    cfg = load_config(config)
    variants = stages._variants(cfg)  # noqa: SLF001 (the stage's own recipes)
    if model not in variants:
        raise SystemExit(f"--model {model}: not among this config's variants {sorted(variants)}")
    mcfg, _part, overrides = variants[model]
    content, data = stages._domain_data(cfg, cfg.domain(domain).name)  # noqa: SLF001
    tc = dc.replace(cfg.train("finetune"), **overrides, epochs=10**6, max_steps=steps, patience=None,
                    progress=False, release_memory=release)
    torch.manual_seed(tc.seed)
    model_ = Recommender(mcfg, n_items=content.n_items)
    model_.attach(content, data.train_examples(mcfg.max_len), tc.seed)
    loaded = resident_bytes()
    samples: list[tuple[int, str, int]] = []  # (RSS, event, step)
    step_seconds: list[float] = []
    clock = {"t": time.perf_counter()}

    def hook(event: str, step: int) -> None:
        now = time.perf_counter()
        if event == "step":
            step_seconds.append(now - clock["t"])
        samples.append((resident_bytes(), event, step))
        clock["t"] = time.perf_counter()  # a validation or checkpoint between two steps is not counted

    ec = cfg.evaluation()
    with tempfile.TemporaryDirectory() as tmp:
        clock["t"] = time.perf_counter()
        fit(model_, data, tc, Path(tmp), ks=ec.ks, batch_size=ec.batch_size, history=ec.history, hook=hook)
    peak = max(samples)
    return {"release_memory": release, "steps": len(step_seconds), "users": data.n_users, "items": data.n_items,
            "rss_loaded_mib": loaded / MIB, "rss_mean_mib": sum(r for r, _, _ in samples) / len(samples) / MIB,
            "rss_peak_mib": peak[0] / MIB, "peak_after": f"{peak[1]} at step {peak[2]}", "rss_end_mib": samples[-1][0] / MIB,
            "seconds_per_step": sum(step_seconds) / max(len(step_seconds), 1)}


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--config", default="configs/amazon.yaml")
    p.add_argument("--domain", required=True)
    p.add_argument("--model", default="model", help="finetuned_model's variant (model = the content model; "
                   "scratch, sasrec, id_tower)")
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--settings", default="off,on", help="which rows: off (no release), on (release_memory)")
    p.add_argument("--records", help="folder for the run's record, for docs/RESULTS.md (default docs/results/bench; "
                   "'' for none)")
    p.add_argument("--child", choices=sorted(SETTINGS), help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.steps < 1:
        p.error(f"--steps must be >= 1, got {args.steps}")
    if args.child:  # one setting in this process; the parent reads the JSON line
        print(json.dumps(measure(args.config, args.domain, args.model, args.steps, SETTINGS[args.child], args.threads)))
        return 0
    settings = [s.strip() for s in args.settings.split(",") if s.strip()]
    if not settings or set(settings) - set(SETTINGS):
        p.error(f"--settings {args.settings}: choose from {','.join(SETTINGS)}")
    folder = bench.records_folder(args.records, quick=False)
    record = bench.new_record("benchmarks/bench_memory.py", argv)
    rows = []
    for s in settings:
        cmd = [sys.executable, str(Path(__file__).resolve()), "--config", args.config, "--domain", args.domain,
               "--model", args.model, "--steps", str(args.steps), "--threads", str(args.threads), "--child", s]
        proc = subprocess.run(cmd, capture_output=True, text=True, cwd=os.getcwd())
        if proc.returncode != 0:
            raise SystemExit(f"setting {s!r} failed (exit {proc.returncode}): {' '.join(cmd)}\n{proc.stderr[-3000:]}")
        rows.append(json.loads(proc.stdout.strip().splitlines()[-1]))
        print(f"release_memory {s}: peak {rows[-1]['rss_peak_mib']:.0f} MiB", file=sys.stderr, flush=True)
    first = rows[0]
    title = (f"resident memory of fine-tuning `{args.model}` on {args.domain} ({args.config}): {first['users']} users, "
             f"{first['items']} items, {args.steps} steps, {args.threads} thread(s), each setting in its own process")
    cells = [[("on" if r["release_memory"] else "off"), r["steps"], f"{r['seconds_per_step']:.3f}",
              f"{r['rss_loaded_mib']:.0f}", f"{r['rss_mean_mib']:.0f}", f"{r['rss_peak_mib']:.0f}", r["peak_after"],
              f"{r['rss_end_mib']:.0f}"] for r in rows]
    columns = ["release_memory", "steps", "s/step (validation excluded)", "RSS after loading (MiB)", "mean RSS (MiB)",
               "peak RSS (MiB)", "peak after", "RSS at the end (MiB)"]
    notes = ["RSS read after every step and every validation; memory-mapped features count while their pages are resident"]
    print(f"**{title}**\n")
    print("| " + " | ".join(columns) + " |")
    print("|" + "---|" * len(columns))
    for c in cells:
        print("| " + " | ".join(map(str, c)) + " |")
    if folder is not None:
        path = bench.write_record(folder, f"bench_memory-{args.domain}.json", record,
                                  [bench.table(title, columns, cells, notes)], threads=args.threads, gpu=None, rows=rows)
        print(f"(record: {bench.shown(path)})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
