"""Benchmark: end-to-end top-2 training throughput of the fused tower, CUDA vs CPU (prints figures; not a test).

The model is the cpu preset's (``configs/presets/cpu.yaml``: fused tower, merge-attention fusion,
2-block SASRec at d=64, softmax + NICL + NID + RCL) with the packaged encoders trained end to end
in their top layers: all-MiniLM-L6-v2 with ``trainable_layers: 2`` and EfficientNet-Lite0 with
``trainable_blocks: 2``; the frozen bottoms come from the feature cache (``item_features``), as in
training. Data: the built-in synthetic demo domain ``films`` (generated, imported, validated and
preprocessed into a temporary folder; nothing is downloaded). A step is one ``mmrec.training``
optimizer step (``_train_step``: batch to the device, forward, backward, clipping, AdamW), on the
same fixed batches of ``--batch`` training sequences for every device. Figures: training
sequences per second over ``--steps`` steps after ``--warmup`` steps, the device synchronised
before the clock starts and stops (the loss parts are read once, at the end).

    .venv/bin/python benchmarks/bench_device.py [--batch 64] [--steps 40] [--cpu-steps 5] [--devices cuda,cpu]

CUDA rows: bf16 autocast (the default on CUDA) and fp32. CPU rows: fp32 with ``--threads`` threads.
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def _prepare(root: Path):
    """Demo domain ``films`` through the data stages and ``item_features`` (on the CPU)."""
    import yaml

    from mmrec import stages
    from mmrec.config import load_config
    from mmrec.data.synthetic import generate_demo

    demo = yaml.safe_load((REPO / "configs" / "demo.yaml").read_text())
    source = {"format": "tabular", "path": "data/demo/films",
              "options": {"text": ["title", "description"], "image": "image", "image_root": "."}}
    spec = {
        "preset": str(REPO / "configs" / "presets" / "cpu.yaml"),
        "root": str(root), "artifacts": "artifacts", "compute": {"device": "cpu"},
        "demo": {**demo["demo"], "domains": ["films"]}, "validation": demo["validation"], "preprocess": demo["preprocess"],
        "domains": {"films": {"role": "target", "source": source}},
        "model": {"text_encoder": {"trainable_layers": 2}, "image_encoder": {"trainable_blocks": 2}},
        "transfer": {"part": "none"}, "evaluation": {"baselines": [], "gate_against": []},
    }
    path = root / "bench.yaml"
    path.write_text(yaml.safe_dump(spec))
    cfg = load_config(path)
    generate_demo(cfg.demo, cfg.demo_path, progress=False)
    for stage in ("raw_catalog", "validated_catalog", "item_features"):
        stages.STAGE_FUNCTIONS[stage](cfg, "films", progress=False)
    content, data = stages._domain_data(cfg, "films")  # noqa: SLF001
    return cfg, content, data


def _measure(cfg, content, data, device: str, bf16: bool, batch: int, steps: int, warmup: int, seed: int = 0) -> dict:
    import torch

    from mmrec.data.sequences import TrainExamples
    from mmrec.models.recommender import Recommender
    from mmrec.training import StepSums, TrainConfig, _train_step, build_optimizer, build_scheduler

    dev = torch.device(device)
    torch.manual_seed(seed)
    mcfg = cfg.model()
    model = Recommender(mcfg, n_items=content.n_items).to(dev)
    model.attach(content, data.train_examples(mcfg.max_len), seed)
    examples = TrainExamples(data.train_examples(mcfg.train_window - 1))
    g = torch.Generator().manual_seed(seed)
    order = torch.randint(0, len(examples), (warmup + steps, batch), generator=g)
    batches = [TrainExamples.collate([examples[int(i)] for i in row]) for row in order]
    if dev.type == "cuda":
        batches = [{k: v.pin_memory() for k, v in b.items()} for b in batches]
    tc = TrainConfig(batch_size=batch, lr=1e-3, bf16=bf16, progress=False)
    opt = build_optimizer(model, tc)
    sched = build_scheduler(opt, tc, warmup + steps)
    sums = StepSums(dev)
    trained = sum(p.numel() for p in model.parameters() if p.requires_grad)

    def sync():
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)

    for s in range(warmup):
        _train_step(model, batches[s], opt, sched, tc, dev, s, sums)
    sync()
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats(dev)
    t0 = time.perf_counter()
    for s in range(warmup, warmup + steps):
        _train_step(model, batches[s], opt, sched, tc, dev, s, sums)
    sync()
    seconds = time.perf_counter() - t0
    from mmrec.training import TrainState

    state = TrainState(n_examples=len(examples))
    sums.flush(state)  # raises on a non-finite loss
    return {
        "device": str(dev), "precision": "bf16 autocast" if bf16 else "fp32", "batch": batch, "steps": steps,
        "seq_per_s": steps * batch / seconds, "ms_per_step": 1000 * seconds / steps,
        "loss": state.log_sums["loss"] / state.log_count, "trained_params": trained,
        "peak_gib": torch.cuda.max_memory_allocated(dev) / 2**30 if dev.type == "cuda" else None,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--steps", type=int, default=40, help="timed steps on CUDA")
    ap.add_argument("--cpu-steps", type=int, default=5, help="timed steps on the CPU")
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--threads", type=int, default=os.cpu_count(), help="torch CPU threads")
    ap.add_argument("--devices", default="cuda,cpu", help="comma-separated, in order")
    args = ap.parse_args()

    import torch

    torch.set_num_threads(args.threads)
    print(f"# torch {torch.__version__}, {platform.processor() or platform.machine()}, {args.threads} CPU threads, "
          f"GPU: {torch.cuda.get_device_name() if torch.cuda.is_available() else 'none'}")
    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        cfg, content, data = _prepare(Path(tmp))
        print(f"# data + item features: {content.n_items} items, {len(data.train_examples(20))} users, "
              f"{time.perf_counter() - t0:.1f}s")
        rows = []
        for device in [d.strip() for d in args.devices.split(",") if d.strip()]:
            if device.startswith("cuda") and not torch.cuda.is_available():
                print(f"# {device}: skipped, torch sees no CUDA device")
                continue
            variants = [True, False] if device.startswith("cuda") else [False]
            steps = args.steps if device.startswith("cuda") else args.cpu_steps
            for bf16 in variants:
                rows.append(_measure(cfg, content, data, device, bf16, args.batch, steps, args.warmup))
                r = rows[-1]
                print(f"# {r['device']} {r['precision']}: {r['seq_per_s']:.1f} seq/s", flush=True)
    print("\n| device | precision | batch | timed steps | sequences/s | ms/step | mean loss | peak GPU memory |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        peak = "-" if r["peak_gib"] is None else f"{r['peak_gib']:.2f} GiB"
        print(f"| {r['device']} | {r['precision']} | {r['batch']} | {r['steps']} | {r['seq_per_s']:.1f} | "
              f"{r['ms_per_step']:.1f} | {r['loss']:.3f} | {peak} |")
    cpu = [r for r in rows if r["device"] == "cpu"]
    for r in rows:
        if r["device"] != "cpu" and cpu:
            print(f"{r['device']} {r['precision']} / cpu: {r['seq_per_s'] / cpu[0]['seq_per_s']:.1f}x")
    if rows:
        print(f"trained parameters: {rows[0]['trained_params']:,}")


if __name__ == "__main__":
    main()
