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

    .venv/bin/python benchmarks/bench.py [--quick] [--threads N] [--json FILE]     (make bench [QUICK=1] [THREADS=N])
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import bench_catalog
import bench_model

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


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="toy sizes: checks that every table runs")
    ap.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)),
                    help="torch threads for the model benchmark and its matmul peak (default: every usable core)")
    ap.add_argument("--json", help="also write every table's records here")
    args = ap.parse_args(argv)
    sizes = SIZES["quick" if args.quick else "default"]
    t0 = time.perf_counter()
    out = {"quick": args.quick, "catalog": bench_catalog.main(sizes["catalog"])}
    print()
    out["model"] = bench_model.main(["--only", MODEL_SECTIONS, "--threads", str(args.threads), *sizes["model"]])
    out["wall_s"] = time.perf_counter() - t0
    print(f"\nmake bench: {out['wall_s']:.0f} s in all, load average {bench_catalog.load_average()}")
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=2, default=str))
    return out


if __name__ == "__main__":
    main()
