"""Benchmark: feature-cache build, training and evaluation throughput of the model (prints figures; not a test).

Sections (``--only mfu,text,image,train,eval,top2``; all by default, in this order;
``benchmarks/bench.py``, i.e. ``make bench``, runs ``mfu,text,eval,top2`` after the catalog benchmark):

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
mfu
    Model FLOP utilisation of the cpu preset model (cached k=0, as in ``train``) in fp32 and under
    bf16 autocast, on the CPU and, when torch sees one, on the GPU. A step is the library's own
    ``mmrec.training._train_step`` (forward, backward, clipping, AdamW) on the same fixed batches.
    Model FLOPs: ``torch.utils.flop_counter.FlopCounterMode`` over the forward and backward of every
    timed batch, in an untimed pass before the first row (matmuls, convolutions and attention, as
    torch counts them; the CPU's fused attention kernel is added to its table; element-wise work
    and the optimizer are not counted, as usual for MFU); the count holds for every row, since
    autocast changes dtypes, not shapes. Peak: the best GFLOP/s of large square
    ``torch.mm`` / ``F.linear`` calls in the same dtype, on the same device and thread count, measured
    in the same run (``matmul_peak``). MFU = achieved / peak.
top2
    The text encoder's top 2 layers trained end to end, as PMMRec does (``trainable_layers: 2``):
    raw token ids of every item, so each step runs MiniLM's frozen embeddings and bottom 4 layers
    on the items it touches, then the top 2 forward and backward; the image side stays the cpu
    preset's frozen, cached EfficientNet-Lite0 tokens (the ``train`` section's end-to-end row
    also trains the image blocks). Same columns as ``mfu``: fp32 on the CPU; on a GPU (when
    ``torch.cuda.is_available()``) bf16 autocast and fp32; without one the table says so.

Numbers depend on the machine and on what else runs on it: the header and every table print the
load average.

    .venv/bin/python benchmarks/bench_model.py [--only mfu,text,image,train,eval,top2] [--threads 2]
        [--texts 2000] [--posters 300] [--image-workers 0[,2]] [--batch 32] [--warmup 2] [--steps 10]
        [--top2-batch 16] [--top2-warmup 1] [--top2-steps 3] [--peak-max-n 4096] [--peak-seconds 0.5]
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
from bench_catalog import load_average  # noqa: E402  (benchmarks/ is the script's folder)

AMAZON = Path("/work/shared/datasets/amazon-instrument")
MOVIELENS = Path("/work/shared/datasets/movielens-100k")
PRESET = REPO / "configs" / "presets" / "cpu.yaml"
SECTIONS = ("mfu", "text", "image", "train", "eval", "top2")


# --- output --------------------------------------------------------------------------------------


def table(title: str, head: tuple[str, ...], rows: list[tuple], notes: list[str] = ()) -> None:
    lines = [head] + [tuple(str(c) for c in r) for r in rows]
    widths = [max(len(x[i]) for x in lines) for i in range(len(head))]
    print(f"\n## {title}")
    for x in lines:
        print("  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(x, widths))))
    for n in notes:
        print(f"  {n}")
    print(f"  load average {load_average()} (1, 5, 15 min) when this table was printed")
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
    print(f"# mmrec model benchmark: {platform.node()}, {cpu_model()}, {os.cpu_count()} cores ({usable} usable), "
          f"load average {load_average()}")
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


def model_config(k: int, image_k: int | None = None):
    """The cpu preset's model with the top ``k`` text layers and ``image_k`` (default ``k``) image blocks trained."""
    from mmrec.models.recommender import ModelConfig

    data = copy.deepcopy(preset()["model"])
    data["text_encoder"]["trainable_layers"] = k
    data["image_encoder"]["trainable_blocks"] = k if image_k is None else image_k
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

    def raw_text(self, text_encoder) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """``has_text`` (N+1,) and the token ids + masks (N+1, T) of every item (row 0 = padding)."""
        items = self.pre.catalog.items.sort("item_idx")
        texts = items.select(self.pre.catalog.text().alias("t"))["t"].to_list()
        has_text = torch.tensor([False] + [bool(t and t.strip()) for t in texts])
        tok = text_encoder.tokenize([t or "" for t in texts])
        return has_text, {k: torch.cat([torch.zeros_like(v[:1]), v]) for k, v in tok.items()}

    def raw_content(self, text_encoder, image_encoder):
        """``ItemContent`` with raw inputs: token ids + masks and uint8 pixels of every item."""
        from torchvision import transforms as T

        from mmrec.models.towers import ItemContent

        t0 = time.perf_counter()
        items = self.pre.catalog.items.sort("item_idx")
        refs = items["image"].to_list()
        n = items.height
        has_text, text = self.raw_text(text_encoder)
        has_image = torch.tensor([False] + [bool(r) for r in refs])
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


def _batches(ml: MovieLens, batch: int, n: int) -> list[torch.Tensor]:
    """``n`` fixed random batches of ``batch`` training sequences (B, L+1), the same on every call."""
    from mmrec.data.sequences import TrainExamples

    cfg = model_config(0)
    examples = TrainExamples(ml.data.train_examples(cfg.max_len)).examples  # (U', L+1)
    g = torch.Generator().manual_seed(0)
    order = torch.cat([torch.randperm(len(examples), generator=g) for _ in range(-(-n * batch // len(examples)))])
    return [examples[order[i * batch:(i + 1) * batch]] for i in range(n)]


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _time_steps(model, batches: list[torch.Tensor], warmup: int, bf16: bool = False) -> tuple[float, float]:
    """Seconds of the optimizer steps after the first ``warmup`` ones and their mean loss. A step is
    the library's ``mmrec.training._train_step`` (batch to the model's device, forward under bf16
    autocast when asked, backward, clipping at 1.0, AdamW with the preset's finetune lr and weight
    decay); the device is synchronised before the clock starts and stops."""
    from mmrec.training import StepSums, TrainConfig, TrainState, _train_step, build_optimizer, build_scheduler

    device = next(model.parameters()).device
    ft = preset()["finetune"]
    cfg = TrainConfig(lr=ft["lr"], weight_decay=ft["weight_decay"], bf16=bf16, progress=False)
    opt = build_optimizer(model, cfg)
    sched = build_scheduler(opt, cfg, len(batches))
    sums, state = StepSums(device), TrainState(n_examples=1)
    t0 = time.perf_counter()
    for s, seq in enumerate(batches):
        if s == warmup:
            sums.flush(TrainState(n_examples=1))  # warm-up losses dropped (and checked)
            _sync(device)
            t0 = time.perf_counter()
        _train_step(model, {"seq": seq}, opt, sched, cfg, device, s, sums)
    _sync(device)
    seconds = time.perf_counter() - t0
    sums.flush(state)  # raises on a non-finite loss or gradient norm
    return seconds, state.log_sums["loss"] / state.log_count


def bench_train(args, ml: MovieLens, results: dict, models: dict) -> None:
    from mmrec.models.recommender import Recommender

    batches = _batches(ml, args.batch, args.warmup + args.steps)
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
        s, loss = _time_steps(model, batches, args.warmup)
        n_train = sum(p.numel() for p in model.parameters() if p.requires_grad)
        rows.append((label, f"{n_train / 1e6:.2f} M", args.steps, f"{s / args.steps:.2f}", f"{args.steps * args.batch / s:,.1f}", f"{loss:.3f}"))
        if k == 0:
            models["cached k=0"] = model
        del content
    notes = [f"{ml.n_items} items, {ml.data.n_users} users; batch {args.batch} users x (L+1={model_config(0).max_len + 1}) items, "
             f"{uniq:.0f} distinct items per batch on average; {args.warmup} warm-up step(s) not timed"]
    notes += [f"built before timing: {k} {v:.1f} s" for k, v in ml.build_s.items()]
    table("training: cpu preset model (fused, d=64, SASRec, softmax+NICL+NID+RCL) on MovieLens-100K, AdamW step",
          ("variant", "trained params", "steps", "s/step", "sequences/s", "mean loss"), rows, notes)
    results["train"] = records(("variant", "trained_params", "steps", "s_per_step", "sequences_per_s", "mean_loss"), rows)
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


# --- model FLOPs and the matmul peak -------------------------------------------------------------


def devices() -> list[torch.device]:
    """The CPU, and the current CUDA device when torch sees one."""
    return [torch.device("cpu")] + ([torch.device("cuda", torch.cuda.current_device())] if torch.cuda.is_available() else [])


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return f"{torch.cuda.get_device_name(device)} ({device})"
    return f"{cpu_model()}, {torch.get_num_threads()} threads, {torch.backends.cpu.get_cpu_capability()}"


def flop_counter():
    """``FlopCounterMode`` that also counts the CPU's fused attention kernel: torch's table has the
    CUDA attention kernels but not ``_scaled_dot_product_flash_attention_for_cpu``, which
    ``F.scaled_dot_product_attention`` runs on the CPU; its FLOPs are those of the CUDA flash kernel."""
    from torch.utils.flop_counter import FlopCounterMode, sdpa_backward_flop_count, sdpa_flop_count

    def forward(query, key, value, *args, out_shape=None, **kwargs) -> int:  # arguments as shapes
        return sdpa_flop_count(query, key, value)

    def backward(grad_out, query, key, value, *args, out_shape=None, **kwargs) -> int:
        return sdpa_backward_flop_count(grad_out, query, key, value)

    aten = torch.ops.aten
    return FlopCounterMode(display=False, custom_mapping={
        aten._scaled_dot_product_flash_attention_for_cpu: forward,
        aten._scaled_dot_product_flash_attention_for_cpu_backward: backward,
    })


def step_flops(model, seq: torch.Tensor, bf16: bool = False) -> int:
    """Model FLOPs of one training step on ``seq``: the forward (under bf16 autocast when asked, as
    ``_train_step`` runs it) and the backward; the gradients are dropped afterwards. Counted before
    any timed step of the model, in train mode (dropout as in training)."""
    device = next(model.parameters()).device
    model.train()
    state = model.generator.get_state()  # negatives and corruption: the timed steps draw as if uncounted
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []), flop_counter() as counter:
        with torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=bf16):
            loss = model.training_loss({"seq": seq.to(device)})["loss"].float()
        loss.backward()
    model.generator.set_state(state)
    model.zero_grad(set_to_none=True)
    return counter.get_total_flops()


def matmul_peak(device: torch.device, dtype: torch.dtype, max_n: int, seconds: float) -> dict:
    """The machine's matmul peak, measured here and now: the fastest single call of square
    ``torch.mm`` and ``F.linear`` (n = 256, 512, ... up to ``max_n``, growing while the next size's
    call would take under 4 x ``seconds``), each size called for about ``seconds`` after a warm call.
    The fastest call, not the mean: a peak is what the hardware does in its best moment, while the
    training steps are timed as they come (so background load lowers MFU, and the tables say how
    loaded the machine was)."""
    import torch.nn.functional as F

    best = {"gflops": 0.0, "kernel": ""}
    g = torch.Generator(device=device).manual_seed(0)
    for name, op in (("mm", torch.mm), ("linear", F.linear)):
        n = 256
        while True:
            a = torch.randn(n, n, generator=g, device=device).to(dtype)
            b = torch.randn(n, n, generator=g, device=device).to(dtype)
            op(a, b)
            _sync(device)
            calls, spent, fastest = 0, 0.0, float("inf")
            while calls < 2 or (spent < seconds and calls < 1000):
                t0 = time.perf_counter()
                op(a, b)
                _sync(device)
                took = time.perf_counter() - t0
                calls, spent, fastest = calls + 1, spent + took, min(fastest, took)
            gflops = 2 * n**3 / fastest / 1e9
            if gflops > best["gflops"]:
                best = {"gflops": gflops, "kernel": f"{name} {n}x{n}"}
            if n >= max_n or 8 * fastest > 4 * seconds:
                break
            n *= 2
    return best


class Peaks:
    """``matmul_peak`` per (device, dtype), measured once per run, on first use."""

    def __init__(self, max_n: int, seconds: float):
        self.max_n, self.seconds = max_n, seconds
        self.measured: dict[tuple[str, str], dict] = {}

    def __call__(self, device: torch.device, dtype: torch.dtype) -> dict:
        key = (str(device), str(dtype).removeprefix("torch."))
        if key not in self.measured:
            max_n = self.max_n if device.type == "cpu" else max(self.max_n, 8192)
            self.measured[key] = matmul_peak(device, dtype, max_n, self.seconds)
        return self.measured[key]


def measure_mfu(model, batches: list[torch.Tensor], warmup: int, bf16: bool, flops: int, peaks: Peaks) -> dict:
    """Time the steps after ``warmup`` and set their model FLOPs (``flops``: of those timed batches,
    from ``step_flops``) against the peak of the same device and dtype."""
    device = next(model.parameters()).device
    seconds, loss = _time_steps(model, batches, warmup, bf16)
    timed_batches = batches[warmup:]
    peak = peaks(device, torch.bfloat16 if bf16 else torch.float32)
    steps, batch = len(timed_batches), len(timed_batches[0])
    achieved = flops / seconds / 1e9
    return {
        "device": str(device), "precision": "bf16 autocast" if bf16 else "fp32", "batch": batch, "steps": steps,
        "s_per_step": seconds / steps, "sequences_per_s": steps * batch / seconds,
        "gflop_per_step": flops / steps / 1e9, "achieved_gflops": achieved, "peak_gflops": peak["gflops"],
        "peak_kernel": peak["kernel"], "mfu_pct": 100 * achieved / peak["gflops"], "mean_loss": loss,
    }


MFU_HEAD = ("device", "precision", "batch", "steps", "s/step", "sequences/s", "GFLOP/step", "achieved GFLOP/s",
            "peak GFLOP/s", "MFU %", "mean loss")


def mfu_row(r: dict) -> tuple:
    return (r["device"], r["precision"], r["batch"], r["steps"], f"{r['s_per_step']:.3f}", f"{r['sequences_per_s']:,.1f}",
            f"{r['gflop_per_step']:.2f}", f"{r['achieved_gflops']:,.2f}", f"{r['peak_gflops']:,.1f}",
            f"{r['mfu_pct']:.2f}", f"{r['mean_loss']:.3f}")


def peak_notes(peaks: Peaks) -> list[str]:
    return [f"peak {dev} {dtype}: {p['gflops']:,.1f} GFLOP/s (fastest call: {p['kernel']}; of torch.mm / F.linear sizes)"
            for (dev, dtype), p in peaks.measured.items()]


def bench_mfu(args, ml: MovieLens, results: dict, models: dict, peaks: Peaks) -> None:
    from mmrec.models.recommender import Recommender

    cfg = model_config(0)
    content, train_seqs = ml.cached_content(0), ml.data.train_examples(cfg.max_len)
    batches = _batches(ml, args.batch, args.warmup + args.steps)
    flops = None
    out = []
    for device in devices():
        for bf16 in (False, True):
            torch.manual_seed(0)
            model = Recommender(cfg, ml.n_items).to(device).attach(content, train_seqs)
            flops = flops or sum(step_flops(model, seq) for seq in batches[args.warmup:])
            out.append(measure_mfu(model, batches, args.warmup, bf16, flops, peaks))
            if device.type == "cpu" and not bf16:
                models["cached k=0"] = model
    notes = [f"{ml.n_items} items; the same {args.warmup} untimed + {args.steps} timed batches of {args.batch} users for "
             f"every row; FLOPs: FlopCounterMode over forward + backward of the timed batches, counted once (fp32, "
             f"untimed) for every row: autocast changes dtypes, not the matmul shapes",
             *[f"{d}: {device_name(d)}" for d in devices()], *peak_notes(peaks)]
    if not torch.cuda.is_available():
        notes.append("no GPU present (torch.cuda.is_available() is False): CPU rows only")
    table(f"model FLOP utilisation: cpu preset model (cached k=0) on MovieLens-100K, one AdamW step of the library's "
          f"_train_step, {torch.get_num_threads()} CPU threads", MFU_HEAD, [mfu_row(r) for r in out], notes)
    results["mfu"] = out
    results["peak"] = {f"{d} {t}": p for (d, t), p in peaks.measured.items()}


def bench_top2(args, ml: MovieLens, results: dict, peaks: Peaks) -> None:
    from mmrec.models.recommender import Recommender
    from mmrec.models.towers import ItemContent

    cfg = model_config(2, image_k=0)
    cached = ml.cached_content(0)  # the image side: frozen Lite0 tokens from the k=0 cache
    train_seqs = ml.data.train_examples(cfg.max_len)
    batches = _batches(ml, args.top2_batch, args.top2_warmup + args.top2_steps)
    out, tok_s, flops = [], None, None
    for device in devices():
        for bf16 in ((True, False) if device.type == "cuda" else (False,)):
            torch.manual_seed(0)
            model = Recommender(cfg, ml.n_items)
            (has_text, text), s = timed(lambda: ml.raw_text(model.item_tower.text.encoder))
            tok_s = tok_s or s
            content = ItemContent(ml.n_items, has_text, cached.has_image.clone(), text=text, image=cached.image)
            model.to(device).attach(content, train_seqs)
            flops = flops or sum(step_flops(model, seq) for seq in batches[args.top2_warmup:])
            out.append(measure_mfu(model, batches, args.top2_warmup, bf16, flops, peaks))
    n_train = sum(p.numel() for p in model.parameters() if p.requires_grad)
    uniq = sum(int(torch.unique(b[b > 0]).numel()) for b in batches) / len(batches)
    rows = [mfu_row(r) for r in out]
    notes = [f"text: {cfg.text_encoder.name}, trainable_layers 2 (embeddings + 4 frozen layers run every step on raw "
             f"token ids, max_length {cfg.text_encoder.max_length}, every title padded to the catalog's longest "
             f"({text['input_ids'].shape[1]} tokens; the padding is computed and counted)); image: cached k=0 tokens; "
             f"{n_train / 1e6:.2f} M trained "
             f"parameters; {uniq:.0f} distinct items per batch on average; tokenizing every item {tok_s:.1f} s (before timing)",
             *[f"{d}: {device_name(d)}" for d in devices()], *peak_notes(peaks)]
    if not torch.cuda.is_available():
        rows.append(("cuda", "no GPU present", "", "", "", "", "", "", "", "", ""))
        notes.append("cuda row not run: no GPU present (torch.cuda.is_available() is False); "
                     "on a GPU machine this table adds bf16 autocast and fp32 rows (see also benchmarks/gpu_check.sh)")
    table("end-to-end top-2 training: cpu preset model, MiniLM top 2 layers trained from raw text, MovieLens-100K",
          MFU_HEAD, rows, notes)
    results["top2"] = out
    results["gpu"] = torch.cuda.get_device_name() if torch.cuda.is_available() else None
    results["peak"] = {f"{d} {t}": p for (d, t), p in peaks.measured.items()}


# --- main ----------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--only", default=",".join(SECTIONS), help=f"comma-separated sections out of {','.join(SECTIONS)}")
    ap.add_argument("--threads", type=int, default=2, help="torch.set_num_threads")
    ap.add_argument("--texts", type=int, default=2000, help="Amazon-Instrument titles to encode (text)")
    ap.add_argument("--posters", type=int, default=300, help="MovieLens posters to encode (image)")
    ap.add_argument("--image-workers", default="0", help="comma-separated DataLoader worker counts (image), e.g. 0,2")
    ap.add_argument("--batch", type=int, default=32, help="users per training step (train, mfu)")
    ap.add_argument("--warmup", type=int, default=2, help="untimed training steps first (train, mfu)")
    ap.add_argument("--steps", type=int, default=10, help="timed training steps (train, mfu)")
    ap.add_argument("--top2-batch", type=int, default=16, help="users per training step (top2)")
    ap.add_argument("--top2-warmup", type=int, default=1, help="untimed training steps first (top2)")
    ap.add_argument("--top2-steps", type=int, default=3, help="timed training steps (top2)")
    ap.add_argument("--peak-max-n", type=int, default=4096, help="largest square matmul for the CPU peak (mfu, top2)")
    ap.add_argument("--peak-seconds", type=float, default=0.5, help="time per matmul size for the peak (mfu, top2)")
    ap.add_argument("--users", type=int, default=10000, help="users ranked with random vectors (eval)")
    ap.add_argument("--items", type=int, default=100000, help="catalog size for the random-vector ranking (eval)")
    ap.add_argument("--ml-items", type=int, default=0,
                    help="keep only the first N MovieLens item ids (train, eval; quick checks); 0: all")
    ap.add_argument("--cache-dir", help="feature cache for the MovieLens contents (train, eval); default: a temporary folder")
    ap.add_argument("--json", help="also write the results here")
    args = ap.parse_args(argv)
    args.only = [s.strip() for s in args.only.split(",") if s.strip()]
    unknown = sorted(set(args.only) - set(SECTIONS))
    if unknown:
        ap.error(f"unknown section(s) {unknown}; valid: {list(SECTIONS)}")
    args.image_workers = [int(w) for w in args.image_workers.split(",")]
    if min(args.texts, args.posters, args.batch, args.steps, args.users, args.items, args.top2_batch, args.top2_steps,
           args.peak_max_n) < 1 or min(args.warmup, args.top2_warmup) < 0 or not args.peak_seconds > 0:
        ap.error("sizes must be >= 1 (--warmup, --top2-warmup >= 0; --peak-seconds > 0)")

    torch.set_num_threads(args.threads)
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # "Loading weights" bars would interleave with the tables
    header(args)
    results: dict = {"threads": args.threads, "torch": torch.__version__}
    models: dict = {}
    peaks = Peaks(args.peak_max_n, args.peak_seconds)
    with tempfile.TemporaryDirectory(prefix="bench-model-cache-") as tmp:
        ml = MovieLens(Path(args.cache_dir) if args.cache_dir else Path(tmp), args.ml_items)
        t0 = time.perf_counter()
        if "mfu" in args.only:
            bench_mfu(args, ml, results, models, peaks)
        if "text" in args.only:
            bench_text(args, results)
        if "image" in args.only:
            bench_image(args, results)
        if "train" in args.only:
            bench_train(args, ml, results, models)
        if "eval" in args.only:
            bench_eval(args, ml, results, models)
        if "top2" in args.only:
            bench_top2(args, ml, results, peaks)
    results["wall_s"] = time.perf_counter() - t0
    results["load_average"] = list(os.getloadavg()) if hasattr(os, "getloadavg") else None
    print(f"\nmodel benchmark wall {results['wall_s']:.1f} s, load average {load_average()}")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2, default=str))
    return results


if __name__ == "__main__":
    main()
