"""Benchmark: feature-cache build, training and evaluation throughput of the model (prints figures; not a test).

Sections (``--only text,image,train,eval``; all by default):

text
    The packaged all-MiniLM-L6-v2 (the cpu preset's ``text_encoder``: k=0 trained layers, 32 tokens)
    over the first ``--texts`` non-empty titles of the Amazon-Instrument domain, through
    ``mmrec.encoders.cache.text_features`` into an empty temporary cache (**cold**: tokenize,
    encode, write the safetensors file) and again (**warm**: every item a hit: hash, look up,
    read). Items/s is ``CacheStats.items_per_s`` (the whole call, fingerprint hashing included).
    Side by side, in the same process and on the same texts: ``sentence_transformers``'
    ``SentenceTransformer(<same model folder>).encode(texts, batch_size=64)``, at its own
    ``max_seq_length`` (256) and at ours (32). It returns one normalised vector per text; the
    cache stores every token state (float16), so it is a reference for the encoder's own speed,
    not the same output.
image
    The packaged EfficientNet-Lite0 (the preset's ``image_encoder``: k=0, 224 px, 2x2 tokens)
    over the first ``--posters`` MovieLens-100K posters through ``image_features``: cold (read,
    hash, decode, resize, encode, write) and warm (read and hash every file, no decode), for each
    ``--image-workers`` value (DataLoader processes decoding images). The **forward only** row
    times the frozen network alone on pixels decoded beforehand (batches of 32), for reference.
train
    Optimizer steps of the cpu preset model (``configs/presets/cpu.yaml`` ``model``: fused tower,
    d=64, merge-attention fusion, 2-block SASRec, softmax + NICL + NID + RCL objectives) on the
    MovieLens-100K items and training sequences (imported, ``preprocess`` with
    ``PreprocessConfig()``; users of ``SequenceData.train_examples``; fixed random batches of
    ``--batch`` users, the same batches for every variant). A step is ``training_loss`` +
    backward + gradient clipping (1.0) + AdamW (``build_optimizer``, the preset's finetune lr and
    weight decay); ``--warmup`` steps are run first and not timed, then ``--steps`` are timed.
    Sequences/s = users per batch x timed steps / time. Variants:

    - **cached k=0**: both encoders frozen; ``ItemContent`` = the feature cache's outputs (text
      token states + mask, image tokens + pooled) from ``build_item_features``. What the cpu
      preset trains.
    - **end-to-end top-2**: text ``trainable_layers=2``, image ``trainable_blocks=2``; the
      ``ItemContent`` holds raw inputs (text ``input_ids``/``attention_mask`` of every item,
      image ``pixels`` uint8 (N+1, 3, 224, 224), decoded and resized once before timing), so each
      step also runs the frozen bottoms (4 MiniLM layers + embeddings, Lite0 stem + first 5
      stages) of every item it touches, then the trained top layers forward and backward.
    - **cached top-2**: the same model, with the cache holding the hidden states entering the
      trained layers (``build_item_features`` with k=2 encoders: text ``hidden`` + ``mask``,
      image ``hidden``): the frozen bottoms are skipped, the top-2 layers still run and train.

    Building the two caches (and decoding the posters for the raw variant) is timed separately
    and shown under the table; ``--cache-dir`` keeps those caches between runs.
eval
    ``mmrec.evaluation.full_ranking`` with random user vectors (d=64) for ``--users`` users over
    ``--items`` items and over the MovieLens item count, ``batch_size`` 1024, 20 random history
    items per user masked (users/s over the full catalog, ranking only). Then
    ``mmrec.experiment.evaluate_vectors`` end to end on the MovieLens test split with the
    cached-k=0 model (item vectors from ``all_item_vectors`` timed separately; the rest includes
    the user encoder, masking of each user's whole history, metrics and the cold subset).

Numbers depend on the machine and on what else runs on it: the header prints the load average.

    .venv/bin/python benchmarks/bench_model.py [--only text,image,train,eval] [--threads 2]
        [--texts 2000] [--posters 300] [--image-workers 0[,2]] [--batch 32] [--warmup 2] [--steps 10]
        [--users 10000] [--items 100000] [--ml-items 0] [--cache-dir DIR] [--json FILE]

``--ml-items N`` keeps only the first N MovieLens item ids (and their interactions) for train and
eval, so a quick check does not encode all 1,682 posters twice; it changes the figures (fewer
distinct items per batch), so full runs leave it at 0.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import datetime
import json
import os
import platform
import sys
import tempfile
import time
from functools import cached_property
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import torch  # noqa: E402
import yaml  # noqa: E402

AMAZON = Path("/work/shared/datasets/amazon-instrument")
MOVIELENS = Path("/work/shared/datasets/movielens-100k")
PRESET = REPO / "configs" / "presets" / "cpu.yaml"
SECTIONS = ("text", "image", "train", "eval")


# --- output --------------------------------------------------------------------------------------


def table(title: str, head: tuple[str, ...], rows: list[tuple], notes: list[str] = ()) -> None:
    lines = [head] + [tuple(str(c) for c in r) for r in rows]
    widths = [max(len(x[i]) for x in lines) for i in range(len(head))]
    print(f"\n## {title}")
    for x in lines:
        print("  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(x, widths))))
    for n in notes:
        print(f"  {n}")
    sys.stdout.flush()


def records(keys: tuple[str, ...], rows: list[tuple]) -> list[dict]:
    """Table rows as dicts for ``--json``, with the printed numbers ("1,234", "0.27 M") as floats."""
    def num(v):
        try:
            return float(str(v).replace(",", "").removesuffix(" M")) * (1e6 if str(v).endswith(" M") else 1)
        except ValueError:
            return v if v != "" else None
    return [{k: num(v) for k, v in zip(keys, r)} for r in rows]


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "?"


def header(args) -> None:
    usable = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    load = " ".join(f"{x:.2f}" for x in os.getloadavg()) if hasattr(os, "getloadavg") else "?"
    print(f"# mmrec model benchmark: {platform.node()}, {cpu_model()}, {os.cpu_count()} cores ({usable} usable), "
          f"load average {load}")
    print(f"# torch {torch.__version__} ({torch.get_num_threads()} threads), Python {platform.python_version()}, "
          f"{datetime.datetime.now().astimezone().isoformat(timespec='seconds')}")
    print(f"# sections: {','.join(args.only)}")
    sys.stdout.flush()


def timed(fn):
    t0 = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - t0


# --- shared MovieLens data -----------------------------------------------------------------------


def preset() -> dict:
    return yaml.safe_load(PRESET.read_text())


def model_config(k: int):
    """The cpu preset's model with the top ``k`` text layers and image blocks trained."""
    from mmrec.models.recommender import ModelConfig

    data = copy.deepcopy(preset()["model"])
    data["text_encoder"]["trainable_layers"] = k
    data["image_encoder"]["trainable_blocks"] = k
    return ModelConfig.from_dict(data)


class MovieLens:
    """MovieLens-100K imported and preprocessed once; item contents built on first use."""

    def __init__(self, cache_dir: Path, max_items: int = 0):
        self.cache_dir, self.max_items = cache_dir, max_items
        self.build_s: dict[str, float] = {}
        self._cached: dict = {}

    @cached_property
    def catalog(self):
        from mmrec.data.importers import import_domain

        catalog = import_domain("movielens", MOVIELENS, "movielens")
        if self.max_items:  # quick checks: the first ids only (fewer posters to encode and decode)
            import polars as pl

            keep = catalog.items["item_id"].cast(pl.Int64).sort().head(self.max_items).cast(pl.String).implode()
            catalog = dataclasses.replace(catalog, items=catalog.items.filter(pl.col("item_id").is_in(keep)),
                                          interactions=catalog.interactions.filter(pl.col("item_id").is_in(keep)))
        return catalog

    @cached_property
    def pre(self):
        from mmrec.config import PreprocessConfig
        from mmrec.data.preprocess import preprocess

        return preprocess(self.catalog, PreprocessConfig())

    @cached_property
    def data(self):
        from mmrec.data.sequences import SequenceData

        return SequenceData.from_splits(self.pre.splits, self.pre.item_map.height)

    @property
    def n_items(self) -> int:
        return self.data.n_items

    def cached_content(self, k: int):
        """``ItemContent`` from the feature cache for the k-trained-layers encoders."""
        return self._cached[k] if k in self._cached else self._build(k)

    def _build(self, k: int):
        from mmrec.features import build_item_features

        (content, _), s = timed(lambda: build_item_features(self.pre.catalog, model_config(k), self.cache_dir, progress=False))
        self.build_s[f"cache k={k}"] = s
        self._cached[k] = content
        return content

    def raw_content(self, text_encoder, image_encoder):
        """``ItemContent`` with raw inputs: token ids + masks and uint8 pixels of every item."""
        from torchvision import transforms as T

        from mmrec.models.towers import ItemContent

        t0 = time.perf_counter()
        items = self.pre.catalog.items.sort("item_idx")
        texts = items.select(self.pre.catalog.text().alias("t"))["t"].to_list()
        refs = items["image"].to_list()
        n = items.height
        has_text = torch.tensor([False] + [bool(t and t.strip()) for t in texts])
        has_image = torch.tensor([False] + [bool(r) for r in refs])
        tok = text_encoder.tokenize([t or "" for t in texts])
        text = {k: torch.cat([torch.zeros_like(v[:1]), v]) for k, v in tok.items()}  # row 0 = padding
        # the encoder's own transform up to the crop, kept as uint8 (the tower normalises)
        to_uint8 = T.Compose([*image_encoder.transform().transforms[:-2], T.PILToTensor()])
        size = image_encoder.cfg.image_size
        pixels = torch.zeros(n + 1, 3, size, size, dtype=torch.uint8)
        for i, ref in enumerate(refs, start=1):
            if ref:
                pixels[i] = to_uint8(self.pre.catalog.images.read(ref))
        self.build_s["raw inputs (tokenize + decode)"] = time.perf_counter() - t0
        return ItemContent(n, has_text, has_image, text=text, image={"pixels": pixels})


# --- sections ------------------------------------------------------------------------------------


def bench_text(args, results: dict) -> None:
    from sentence_transformers import SentenceTransformer

    from mmrec.data.importers import import_domain
    from mmrec.encoders.cache import text_features
    from mmrec.encoders.text import TextEncoder, resolve_text_model

    catalog = import_domain("ninerec", AMAZON, "amazon")
    df = catalog.items.select("item_id", catalog.text().alias("t")).filter(pl_nonempty("t")).head(args.texts)
    keys, texts = df["item_id"].to_list(), df["t"].to_list()
    cfg = model_config(0).text_encoder
    enc, load_s = timed(lambda: TextEncoder(cfg))
    with torch.no_grad():
        enc.eval().encode(texts[:8])  # first-call kernel set-up, outside the timings
    rows = []
    with tempfile.TemporaryDirectory(prefix="bench-text-") as tmp:
        for phase in ("cold", "warm"):
            f = text_features(enc, texts, keys, Path(tmp), batch_size=64, progress=False)
            s = f.stats
            rows.append((f"mmrec text_features, {phase}", len(texts), s.hits, s.computed, f"{s.seconds:.2f}", f"{s.items_per_s:,.0f}"))
        cache_mb = sum(p.stat().st_size for p in Path(tmp).iterdir()) / 2**20
    st = SentenceTransformer(resolve_text_model(cfg.name), device="cpu")
    default_len = st.max_seq_length
    for max_len in (default_len, cfg.max_length):
        st.max_seq_length = max_len
        st.encode(texts[:8], batch_size=64)
        _, s = timed(lambda: st.encode(texts, batch_size=64, show_progress_bar=False))
        rows.append((f"sentence-transformers encode, max_seq_length {max_len}", len(texts), "", len(texts), f"{s:.2f}", f"{len(texts) / s:,.0f}"))
    table(f"text features: {cfg.name}, k=0, max_length {cfg.max_length}, batch 64, {len(texts)} Amazon-Instrument titles",
          ("run", "items", "hits", "encoded", "seconds", "items/s"), rows,
          [f"model load {load_s:.1f} s; cache file {cache_mb:.1f} MiB (float16 token states + masks)"])
    results["text"] = records(("run", "items", "hits", "encoded", "seconds", "items_per_s"), rows)


def pl_nonempty(col: str):
    import polars as pl

    return pl.col(col).is_not_null() & (pl.col(col).str.strip_chars().str.len_chars() > 0)


def bench_image(args, results: dict) -> None:
    from mmrec.data.importers import import_domain
    from mmrec.encoders.cache import image_features
    from mmrec.encoders.image import ImageEncoder

    catalog = import_domain("movielens", MOVIELENS, "movielens")
    df = catalog.items.select("item_id", "image").filter(pl_nonempty("image")).head(args.posters)
    keys, refs = df["item_id"].to_list(), df["image"].to_list()
    cfg = model_config(0).image_encoder
    enc, load_s = timed(lambda: ImageEncoder(cfg))
    enc.eval()
    rows = []
    for workers in args.image_workers:
        with tempfile.TemporaryDirectory(prefix="bench-image-") as tmp:
            for phase in ("cold", "warm"):
                f = image_features(enc, refs, keys, catalog.images, Path(tmp), batch_size=32, num_workers=workers, progress=False)
                s = f.stats
                rows.append((f"mmrec image_features, {phase}, {workers} workers", len(refs), s.hits, s.computed,
                             f"{s.seconds:.2f}", f"{s.items_per_s:,.1f}"))
    pixels, decode_s = timed(lambda: enc.preprocess([catalog.images.read(r) for r in refs]))  # (M, 3, S, S)
    with torch.no_grad():
        enc.bottom(pixels[:2])
        _, s = timed(lambda: [enc.top(enc.bottom(pixels[i:i + 32])) for i in range(0, len(refs), 32)])
    rows.append(("forward only (pixels decoded beforehand)", len(refs), "", len(refs), f"{s:.2f}", f"{len(refs) / s:,.1f}"))
    table(f"image features: {cfg.name}, k=0, {cfg.image_size} px, batch 32, {len(refs)} MovieLens posters",
          ("run", "items", "hits", "encoded", "seconds", "items/s"), rows,
          [f"model load {load_s:.1f} s; decoding + preprocessing the {len(refs)} posters alone: {decode_s:.2f} s "
           f"({len(refs) / decode_s:,.0f} images/s, 1 process)"])
    results["image"] = records(("run", "items", "hits", "encoded", "seconds", "items_per_s"), rows)


def _batches(ml: MovieLens, args) -> list[torch.Tensor]:
    from mmrec.data.sequences import TrainExamples

    cfg = model_config(0)
    examples = TrainExamples(ml.data.train_examples(cfg.max_len)).examples  # (U', L+1)
    g = torch.Generator().manual_seed(0)
    n = args.warmup + args.steps
    order = torch.cat([torch.randperm(len(examples), generator=g) for _ in range(-(-n * args.batch // len(examples)))])
    return [examples[order[i * args.batch:(i + 1) * args.batch]] for i in range(n)]


def _train_steps(model, batches: list[torch.Tensor], warmup: int) -> tuple[float, float]:
    from mmrec.training import TrainConfig, build_optimizer

    ft = preset()["finetune"]
    opt = build_optimizer(model, TrainConfig(lr=ft["lr"], weight_decay=ft["weight_decay"]))
    params = [p for g in opt.param_groups for p in g["params"]]
    model.train()
    t0 = None
    for i, seq in enumerate(batches):
        if i == warmup:
            t0 = time.perf_counter()
        loss = model.training_loss({"seq": seq})["loss"]
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
    return time.perf_counter() - t0, loss.item()


def bench_train(args, ml: MovieLens, results: dict, models: dict) -> None:
    from mmrec.models.recommender import Recommender

    batches = _batches(ml, args)
    uniq = sum(int(torch.unique(b[b > 0]).numel()) for b in batches) / len(batches)
    train_seqs = ml.data.train_examples(model_config(0).max_len)
    rows = []
    for label, k, source in (("cached k=0 (cpu preset)", 0, "cache"), ("end-to-end top-2 (raw inputs)", 2, "raw"),
                             ("cached top-2 (hidden states)", 2, "cache")):
        torch.manual_seed(0)
        model = Recommender(model_config(k), ml.n_items)
        if source == "cache":
            content = ml.cached_content(k)
        else:
            content = ml.raw_content(model.item_tower.text.encoder, model.item_tower.image.encoder)
        model.attach(content, train_seqs)
        s, loss = _train_steps(model, batches, args.warmup)
        n_train = sum(p.numel() for p in model.parameters() if p.requires_grad)
        rows.append((label, f"{n_train / 1e6:.2f} M", args.steps, f"{s / args.steps:.2f}", f"{args.steps * args.batch / s:,.1f}", f"{loss:.3f}"))
        if k == 0:
            models["cached k=0"] = model
        del content
    notes = [f"{ml.n_items} items, {ml.data.n_users} users; batch {args.batch} users x (L+1={model_config(0).max_len + 1}) items, "
             f"{uniq:.0f} distinct items per batch on average; {args.warmup} warm-up step(s) not timed"]
    notes += [f"built before timing: {k} {v:.1f} s" for k, v in ml.build_s.items()]
    table("training: cpu preset model (fused, d=64, SASRec, softmax+NICL+NID+RCL) on MovieLens-100K, AdamW step",
          ("variant", "trained params", "steps", "s/step", "sequences/s", "last loss"), rows, notes)
    results["train"] = records(("variant", "trained_params", "steps", "s_per_step", "sequences_per_s", "last_loss"), rows)
    results["build_s"] = dict(ml.build_s)


def bench_eval(args, ml: MovieLens, results: dict, models: dict) -> None:
    from mmrec.evaluation import full_ranking
    from mmrec.experiment import evaluate_vectors
    from mmrec.models.recommender import Recommender

    rows = []
    g = torch.Generator().manual_seed(0)
    U, d, H = args.users, 64, 20
    for N in dict.fromkeys((args.items, ml.n_items)):
        users = torch.randn(U, d, generator=g)
        items = torch.randn(N + 1, d, generator=g)
        items[0] = 0
        hist = torch.randint(1, N + 1, (U, H), generator=g)
        targets = torch.randint(1, N + 1, (U,), generator=g)
        full_ranking(users[:1024], items, hist[:1024], targets[:1024])  # first-call set-up
        _, s = timed(lambda: full_ranking(users, items, hist, targets, batch_size=1024))
        rows.append((f"full_ranking, random vectors, {H} history items", U, N, f"{s:.2f}", f"{U / s:,.0f}"))

    model = models.get("cached k=0")
    if model is None:
        torch.manual_seed(0)
        model = Recommender(model_config(0), ml.n_items).attach(ml.cached_content(0), ml.data.train_examples(model_config(0).max_len))
    model.eval()
    item_vecs, s_items = timed(lambda: model.all_item_vectors())
    max_len = model.cfg.max_len
    evaluate_vectors(lambda h: model.user_vectors(h, item_vecs), item_vecs, ml.data, "test", max_len)  # set-up
    metrics, s = timed(lambda: evaluate_vectors(lambda h: model.user_vectors(h, item_vecs), item_vecs, ml.data, "test", max_len))
    Um = ml.data.n_users
    rows.append(("all_item_vectors (cached k=0 model)", "", ml.n_items, f"{s_items:.2f}", ""))
    rows.append(("evaluate_vectors, MovieLens test split", Um, ml.n_items, f"{s:.2f}", f"{Um / s:,.0f}"))
    rows.append(("  incl. all_item_vectors", Um, ml.n_items, f"{s + s_items:.2f}", f"{Um / (s + s_items):,.0f}"))
    table("evaluation: full ranking over every item, batch_size 1024", ("run", "users", "items", "seconds", "users/s"), rows,
          [f"evaluate_vectors = user encoder (L={max_len}) + full ranking with each user's whole history masked + metrics "
           f"+ cold subset; untrained-model NDCG@10 {metrics['NDCG@10']:.4f} (a sanity value, not a result)"])
    results["eval"] = records(("run", "users", "items", "seconds", "users_per_s"), rows)


# --- main ----------------------------------------------------------------------------------------


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--only", default=",".join(SECTIONS), help=f"comma-separated sections out of {','.join(SECTIONS)}")
    ap.add_argument("--threads", type=int, default=2, help="torch.set_num_threads")
    ap.add_argument("--texts", type=int, default=2000, help="Amazon-Instrument titles to encode (text)")
    ap.add_argument("--posters", type=int, default=300, help="MovieLens posters to encode (image)")
    ap.add_argument("--image-workers", default="0", help="comma-separated DataLoader worker counts (image), e.g. 0,2")
    ap.add_argument("--batch", type=int, default=32, help="users per training step (train)")
    ap.add_argument("--warmup", type=int, default=2, help="untimed training steps first (train)")
    ap.add_argument("--steps", type=int, default=10, help="timed training steps (train)")
    ap.add_argument("--users", type=int, default=10000, help="users ranked with random vectors (eval)")
    ap.add_argument("--items", type=int, default=100000, help="catalog size for the random-vector ranking (eval)")
    ap.add_argument("--ml-items", type=int, default=0,
                    help="keep only the first N MovieLens item ids (train, eval; quick checks); 0: all")
    ap.add_argument("--cache-dir", help="feature cache for the MovieLens contents (train, eval); default: a temporary folder")
    ap.add_argument("--json", help="also write the results here")
    args = ap.parse_args()
    args.only = [s.strip() for s in args.only.split(",") if s.strip()]
    unknown = sorted(set(args.only) - set(SECTIONS))
    if unknown:
        ap.error(f"unknown section(s) {unknown}; valid: {list(SECTIONS)}")
    args.image_workers = [int(w) for w in args.image_workers.split(",")]
    if min(args.texts, args.posters, args.batch, args.steps, args.users, args.items) < 1 or args.warmup < 0:
        ap.error("sizes must be >= 1 (--warmup >= 0)")

    torch.set_num_threads(args.threads)
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # "Loading weights" bars would interleave with the tables
    header(args)
    results: dict = {"threads": args.threads, "torch": torch.__version__}
    models: dict = {}
    with tempfile.TemporaryDirectory(prefix="bench-model-cache-") as tmp:
        ml = MovieLens(Path(args.cache_dir) if args.cache_dir else Path(tmp), args.ml_items)
        t0 = time.perf_counter()
        if "text" in args.only:
            bench_text(args, results)
        if "image" in args.only:
            bench_image(args, results)
        if "train" in args.only:
            bench_train(args, ml, results, models)
        if "eval" in args.only:
            bench_eval(args, ml, results, models)
    print(f"\ntotal wall {time.perf_counter() - t0:.1f} s")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2, default=str))


if __name__ == "__main__":
    main()
