"""Benchmark: serving latency and throughput (prints figures; not a test).

Sections (``--only recommend,faiss,http``; all by default):

recommend
    ``ExportedModel.recommend`` for one user (history of 20 ids, k=10) over ``--items`` catalog
    items (100K by default; random item vectors, d=64) with the cpu preset's user encoder
    (2-block SASRec, d=64, max_len 20), one torch thread: median and p99 of ``--reps`` calls;
    then batches of 64 users with k=100. **before** is the previous implementation (kept below
    as ``recommend_before``: per-element Python checks of every returned score, the popularity
    row and the exclusion lists rebuilt per call), **after** the library's current one;
    ``q @ E.T + topk`` alone is printed for reference.
faiss
    Recall@10 of ``mmrec.serving.FaissModel`` (IVF, ``4 sqrt(n)`` lists) against exact top-k for
    200 users over the same catalog, for several ``nprobe`` values, with its median latency per
    user; the item vectors are clustered (64 Gaussian clusters; users are means of 5 items plus
    noise), as trained item vectors are, and, for reference, i.i.d. Gaussian (the worst case).
http
    The real service (``python -m deploy.serve --model-dir``, ``--workers`` processes, one torch
    thread each) on loopback, for catalogs of 10K and 100K items: a model folder with a tiny text
    tower (random init; what adding an item costs depends on the tower: the demo's MiniLM is
    slower) and the cpu preset's user encoder, its item vectors replaced by clustered random ones.
    A closed-loop load generator (threads with keep-alive connections, one random 20-item history
    per request, k=10) runs ``--seconds`` per client count (1, 4, 16): p50 / p99 latency and
    requests/s. Then the latency of adding one item (``PUT /items``, text) and of the next
    recommend request that sees it. The load generator runs on the same machine as the server.

Every table also goes, as printed, into one JSON record per set of sections,
``docs/results/bench/bench_serving-<sections>.json`` by default (``--records DIR``; ``''`` for
none; a rerun of the same sections replaces it), with the command, the commit, the load averages
and the machine; ``python -m experiments --report-only`` puts it into docs/RESULTS.md.

    .venv/bin/python benchmarks/bench_serving.py [--only recommend,faiss,http] [--items 100000]
        [--reps 200] [--workers 2] [--seconds 10] [--clients 1,4,16] [--http-items 10000,100000]
        [--records DIR]
"""

from __future__ import annotations

import argparse
import http.client
import json
import math
import os
import random
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import bench  # noqa: E402  (benchmarks/ is the script's folder: the record helpers)
from mmrec.export import ExportedModel  # noqa: E402
from mmrec.models.recommender import ModelConfig, Recommender  # noqa: E402

D, L = 64, 20
SECTIONS = ("recommend", "faiss", "http")
USER_ENCODER = {"name": "sasrec", "n_layers": 2, "n_heads": 2, "dropout": 0.0}
OBJECTIVE = {"name": "softmax", "nicl_enabled": False, "nid_weight": 0, "rcl_weight": 0}


@torch.no_grad()
def recommend_before(exp: ExportedModel, histories, k=10, exclude_history=True):
    """The implementation before the serving work (commit 7a63c53), for the before/after figure."""
    L = exp.model.cfg.max_len
    rows = [[exp.item_index(i) for i in h][-L:] for h in histories]
    hist = torch.zeros(len(rows), L, dtype=torch.long)
    for r, h in enumerate(rows):
        if h:
            hist[r, L - len(h):] = torch.tensor(h)
    scores = exp.model.user_vectors(hist, exp.item_vectors) @ exp.item_vectors.T
    if exp.popularity is not None:
        cold = [r for r, h in enumerate(rows) if not h]
        if cold:
            pop = torch.zeros(scores.shape[1])
            pop[: exp.popularity.shape[0]] = exp.popularity.to(pop.dtype)
            scores[cold] = pop
    scores[:, 0] = -torch.inf
    if exclude_history:
        for r, h in enumerate(histories):
            if h:
                scores[r, [exp._index[i] for i in h]] = -torch.inf
    k = min(k, len(exp.item_ids))
    top = scores.topk(k, dim=1)
    return [[(exp.item_ids[int(j) - 1], float(s)) for s, j in zip(srow, jrow) if torch.isfinite(s)]
            for srow, jrow in zip(top.values, top.indices)]


def clustered(n: int, d: int = D, seed: int = 0, users: int = 200) -> tuple[torch.Tensor, torch.Tensor]:
    """``(n+1, d)`` item vectors (row 0 = padding) in 64 clusters, and ``(users, d)`` user vectors."""
    g = torch.Generator().manual_seed(seed)
    centers = torch.randn(64, d, generator=g)
    vecs = centers[torch.randint(0, 64, (n,), generator=g)] + 0.5 * torch.randn(n, d, generator=g)
    u = vecs[torch.randint(0, n, (users, 5), generator=g)].mean(1) + 0.1 * torch.randn(users, d, generator=g)
    return torch.cat([torch.zeros(1, d), vecs]), u


def stats(times: list[float]) -> tuple[float, float]:
    s = sorted(times)
    return statistics.median(s) * 1e3, s[min(len(s) - 1, math.ceil(0.99 * len(s)) - 1)] * 1e3


def bench_recommend(n: int, reps: int) -> dict:
    cfg = ModelConfig.from_dict({"dim": D, "max_len": L, "item_tower": {"name": "id", "dropout": 0.0},
                                 "user_encoder": USER_ENCODER, "objective": OBJECTIVE})
    torch.manual_seed(0)
    model = Recommender(cfg, n_items=1).eval()
    vecs, _ = clustered(n)
    exp = ExportedModel(model, [f"i{i}" for i in range(1, n + 1)], vecs, {}, torch.randint(0, 50, (n + 1,)))
    rng = random.Random(0)
    hists = [[f"i{rng.randrange(1, n + 1)}" for _ in range(L)] for _ in range(reps)]
    assert [i for i, _ in recommend_before(exp, hists[:1])[0]] == [i for i, _ in exp.recommend(hists[:1])[0]]
    q = torch.randn(1, D)
    batches = [hists[i:i + 64] for i in range(0, len(hists) - 63, 16)]
    cases = [("1 user, k=10", "before", lambda h: recommend_before(exp, [h]), hists),
             ("1 user, k=10", "after", lambda h: exp.recommend([h]), hists),
             ("1 user, k=10", "q @ E.T + topk only", lambda h: (q @ vecs.T).topk(10), hists),
             ("64 users, k=100", "before", lambda b: recommend_before(exp, b, k=100), batches),
             ("64 users, k=100", "after", lambda b: exp.recommend(b, k=100), batches)]
    title = f"ExportedModel.recommend, {n:,} items, d={D}, history {L}, 1 thread"
    print(f"\n## {title}")
    print(f"{'':<16} {'':<22} {'median ms':>10} {'p99 ms':>8} {'calls':>6}")
    rows = []
    for case, name, fn, inputs in cases:
        for h in inputs[:5]:
            fn(h)
        times = []
        for h in inputs:
            t = time.perf_counter()
            fn(h)
            times.append(time.perf_counter() - t)
        med, p99 = stats(times)
        print(f"{case:<16} {name:<22} {med:>10.2f} {p99:>8.2f} {len(times):>6}")
        rows.append((case, name, f"{med:.2f}", f"{p99:.2f}", len(times)))
    return bench.table(title, ("case", "implementation", "median ms", "p99 ms", "calls"), rows)


def bench_faiss(n: int) -> dict:
    from mmrec.serving import FaissModel, build_faiss_index

    cfg = ModelConfig.from_dict({"dim": D, "max_len": L, "item_tower": {"name": "id", "dropout": 0.0},
                                 "user_encoder": USER_ENCODER, "objective": OBJECTIVE})
    model = Recommender(cfg, n_items=1).eval()
    title = f"faiss IVF vs exact top-10, {n:,} items, d={D}, 200 users, 1 thread"
    print(f"\n## {title}")
    print(f"{'vectors':<10} {'nprobe':>6} {'recall@10':>10} {'median ms/user':>15}   (exact: median ms/user)")
    rows = []
    for kind in ("clustered", "gaussian"):
        vecs, users = clustered(n)
        if kind == "gaussian":
            g = torch.Generator().manual_seed(1)
            vecs = torch.cat([torch.zeros(1, D), torch.randn(n, D, generator=g)])
            users = torch.randn(200, D, generator=g)
        ids = [f"i{i}" for i in range(1, n + 1)]
        exact = ExportedModel(model, ids, vecs, {})
        t = time.perf_counter()
        index = build_faiss_index(vecs[1:])
        build_s = time.perf_counter() - t
        ex_t = []
        truth = []
        for u in users:
            t = time.perf_counter()
            truth.append(exact.search(u[None], 10, [[]])[1][0])
            ex_t.append(time.perf_counter() - t)
        for nprobe in (4, 16, 64):
            index.nprobe = nprobe
            view = FaissModel(model, ids, vecs, {})
            view.index, view.indexed = index, n
            hits, times = 0, []
            for u, tr in zip(users, truth):
                t = time.perf_counter()
                got = view.search(u[None], 10, [[]])[1][0]
                times.append(time.perf_counter() - t)
                hits += len(set(got) & set(tr))
            print(f"{kind:<10} {nprobe:>6} {hits / (10 * len(users)):>10.3f} {stats(times)[0]:>15.3f}   "
                  f"({stats(ex_t)[0]:.3f}; index built in {build_s:.1f} s, nlist {index.nlist})")
            rows.append((kind, nprobe, f"{hits / (10 * len(users)):.3f}", f"{stats(times)[0]:.3f}",
                         f"{stats(ex_t)[0]:.3f}", f"{build_s:.1f}", index.nlist))
    return bench.table(title, ("vectors", "nprobe", "recall@10", "median ms/user", "exact: median ms/user",
                               "index build s", "nlist"), rows)


def make_folder(out: Path, n: int) -> Path:
    """A model folder with a tiny text tower and the cpu preset's user encoder, ``n`` synthetic items."""
    import polars as pl
    from safetensors.torch import save_file

    from mmrec.encoders.text import TextEncoderConfig
    from mmrec.export import export_model
    from mmrec.models.towers import ItemContent

    text = TextEncoderConfig.tiny(trainable_layers=1, max_length=16, pooling="mean")
    cfg = ModelConfig.from_dict({"dim": D, "max_len": L, "item_tower": {"name": "text", "dropout": 0.0},
                                 "text_encoder": text.__dict__, "user_encoder": USER_ENCODER, "objective": OBJECTIVE})
    torch.manual_seed(0)
    model = Recommender(cfg, n_items=2).eval()
    enc = model.item_tower.text.encoder
    tok = enc.tokenize(["", "a", "b"])
    model.attach(ItemContent(2, torch.tensor([False, True, True]), torch.tensor([False, False, False]), text=dict(tok)))
    out = export_model(model, out, pl.DataFrame({"item_idx": [1, 2], "item_id": ["a", "b"]}), "bench")
    vecs, _ = clustered(n)
    save_file({"item_vectors": vecs.contiguous()}, out / "item_vectors.safetensors")
    pl.DataFrame({"item_idx": list(range(1, n + 1)), "item_id": [f"i{i}" for i in range(1, n + 1)],
                  "train_count": [0] * n}).write_parquet(out / "item_map.parquet")
    meta = json.loads((out / "model.json").read_text())
    meta["n_items"] = n
    (out / "model.json").write_text(json.dumps(meta))
    return out


def load(port: int, n: int, clients: int, seconds: float) -> tuple[float, float, float, int]:
    """Closed-loop load: ``clients`` threads, keep-alive connections; (p50 ms, p99 ms, req/s, errors)."""
    stop = time.monotonic() + seconds
    lat: list[float] = []
    errors = [0]
    lock = threading.Lock()

    def run(seed: int) -> None:
        rng = random.Random(seed)
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
        mine = []
        while time.monotonic() < stop:
            body = json.dumps({"users": [{"history": [f"i{rng.randrange(1, n + 1)}" for _ in range(L)]}], "k": 10})
            t = time.perf_counter()
            conn.request("POST", "/recommend", body, {"Content-Type": "application/json"})
            resp = conn.getresponse()
            resp.read()
            mine.append(time.perf_counter() - t)
            if resp.status != 200:
                errors[0] += 1
        conn.close()
        with lock:
            lat.extend(mine)

    threads = [threading.Thread(target=run, args=(s,)) for s in range(clients)]
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - t0
    p50, p99 = stats(lat)
    return p50, p99, len(lat) / wall, errors[0]


def call(port: int, method: str, path: str, body=None) -> tuple[int, dict]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
    conn.request(method, path, json.dumps(body) if body is not None else None, {"Content-Type": "application/json"})
    r = conn.getresponse()
    out = (r.status, json.loads(r.read() or b"null"))
    conn.close()
    return out


def bench_http(sizes: list[int], clients: list[int], seconds: float, workers: int) -> list[dict]:
    """The load test's table and the table of adding an item, per catalog size."""
    import socket

    title = (f"HTTP service on loopback: {workers} worker(s), 1 torch thread each, POST /recommend "
             f"(1 user, history {L}, k=10), {seconds:g} s per row; load generator on the same machine")
    print(f"\n## {title}")
    print(f"{'items':>8} {'clients':>7} {'p50 ms':>8} {'p99 ms':>8} {'req/s':>8} {'errors':>6}")
    load_rows, add_rows = [], []
    with tempfile.TemporaryDirectory() as tmp:
        for n in sizes:
            folder = make_folder(Path(tmp) / f"m{n}", n)
            with socket.socket() as s:
                s.bind(("127.0.0.1", 0))
                port = s.getsockname()[1]
            log = open(Path(tmp) / f"server{n}.log", "wb")
            t0 = time.perf_counter()
            proc = subprocess.Popen([sys.executable, "-m", "deploy.serve", "--model-dir", str(folder), "--port", str(port),
                                     "--workers", str(workers), "--state-dir", str(Path(tmp) / f"state{n}")],
                                    cwd=REPO, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
            try:
                ready = 0
                while True:
                    try:
                        if call(port, "GET", "/ready")[0] == 200:
                            ready += 1
                            if ready >= 2 * workers:  # a few answers: every worker has loaded
                                break
                    except OSError:
                        pass
                    if proc.poll() is not None:
                        raise RuntimeError(f"server exited: {(Path(tmp) / f'server{n}.log').read_text()[-2000:]}")
                    time.sleep(0.2)
                start_s = time.perf_counter() - t0
                load(port, n, 1, 1.0)  # warm-up
                for c in clients:
                    p50, p99, rps, err = load(port, n, c, seconds)
                    print(f"{n:>8,} {c:>7} {p50:>8.2f} {p99:>8.2f} {rps:>8.0f} {err:>6}")
                    load_rows.append((f"{n:,}", c, f"{p50:.2f}", f"{p99:.2f}", f"{rps:.0f}", err))
                adds = []
                for j in range(5):
                    t = time.perf_counter()
                    status, _ = call(port, "PUT", "/items", {"items": [{"item_id": f"new{j}", "text": f"a new item {j}"}]})
                    adds.append(time.perf_counter() - t)
                    assert status == 200
                t = time.perf_counter()
                status, body = call(port, "POST", "/recommend", {"users": [{"history": ["new0"]}], "k": 10})
                first = time.perf_counter() - t
                assert status == 200
                print(f"{'':>8} add one item (PUT /items, text): median {statistics.median(adds) * 1e3:.1f} ms over 5; "
                      f"next recommend that sees it: {first * 1e3:.1f} ms; start-up to ready: {start_s:.1f} s")
                add_rows.append((f"{n:,}", f"{statistics.median(adds) * 1e3:.1f}", f"{first * 1e3:.1f}", f"{start_s:.1f}"))
            finally:
                os.killpg(proc.pid, 15)
                proc.wait(timeout=30)
                log.close()
    return [bench.table(title, ("items", "clients", "p50 ms", "p99 ms", "req/s", "errors"), load_rows),
            bench.table(f"adding an item to the HTTP service ({workers} worker(s)): PUT /items with text, through "
                        "the tiny text tower", ("items", "add one item: median ms over 5",
                                                "next recommend that sees it ms", "start-up to ready s"), add_rows)]


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--only", default=",".join(SECTIONS))
    p.add_argument("--items", type=int, default=100_000)
    p.add_argument("--reps", type=int, default=200)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--seconds", type=float, default=10.0)
    p.add_argument("--clients", default="1,4,16")
    p.add_argument("--http-items", default="10000,100000")
    p.add_argument("--records", help="folder for the run's record, for docs/RESULTS.md (default docs/results/bench; "
                   "'' for none)")
    args = p.parse_args(argv)
    only = {s.strip() for s in args.only.split(",") if s.strip()}
    if not only or only - set(SECTIONS):
        p.error(f"--only {args.only}: sections are {','.join(SECTIONS)}")
    folder = bench.records_folder(args.records, quick=False)
    record = bench.new_record("benchmarks/bench_serving.py", argv)
    torch.set_num_threads(1)
    print(f"load average {os.getloadavg()[0]:.2f}, {os.cpu_count()} CPUs, torch {torch.__version__}")
    tables = []
    if "recommend" in only:
        tables.append(bench_recommend(args.items, args.reps))
    if "faiss" in only:
        tables.append(bench_faiss(args.items))
    if "http" in only:
        tables += bench_http([int(x) for x in args.http_items.split(",")], [int(x) for x in args.clients.split(",")],
                             args.seconds, args.workers)
    if folder is not None:
        path = write_record(folder, [s for s in SECTIONS if s in only], record, tables)
        print(f"(record: {bench.shown(path)})")
    return 0


def write_record(folder: Path, sections: list[str], record: dict, tables: list[dict]) -> Path:
    """``folder/bench_serving-<sections>.json`` (a rerun of the same sections replaces it). Every
    section runs on the CPU with one torch thread (the service: one per worker)."""
    return bench.write_record(folder, f"bench_serving-{'-'.join(sections)}.json", record, tables, threads=1, gpu=None,
                              sections=sections)


if __name__ == "__main__":
    raise SystemExit(main())
