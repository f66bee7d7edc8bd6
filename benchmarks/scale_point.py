"""The measured point docs/SCALING.md extrapolates from: one pretraining step of a config's model on
its source domains' real features, with its FLOPs counted (``torch.utils.flop_counter``), its time
measured, and the bytes of one item's cached features.

    .venv/bin/python benchmarks/scale_point.py --config configs/experiments/scale-bench.yaml --threads 1

Needs the source domains' ``validated_catalog`` and ``item_features`` artifacts. Prints one JSON
object: GFLOP per step (forward + backward, counted), seconds per step (median of ``--steps`` after
``--warmup``), the achieved GFLOP/s, and feature bytes per item.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--config", required=True)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--steps", type=int, default=8)
    p.add_argument("--warmup", type=int, default=2)
    args = p.parse_args(argv)

    import torch
    from torch.utils.flop_counter import FlopCounterMode

    from mmrec.config import load_config
    from mmrec.data.sequences import TrainExamples, concat_sequences
    from mmrec.features import concat_contents
    from mmrec.models.recommender import Recommender
    from mmrec.stages import _domain_data
    from mmrec.training import build_optimizer, epoch_batches

    torch.set_num_threads(args.threads)
    cfg = load_config(args.config)
    parts = [_domain_data(cfg, d.name) for d in cfg.sources]
    content, offsets = concat_contents([c for c, _ in parts])
    data = concat_sequences([dd for _, dd in parts], offsets)
    mcfg, tc = cfg.model(), cfg.train("pretrain")
    torch.manual_seed(tc.seed)
    model = Recommender(mcfg, n_items=content.n_items).attach(content, data.train_examples(mcfg.max_len), tc.seed)
    model.train()
    ds = TrainExamples(data.train_examples(mcfg.train_window - 1))
    batches = epoch_batches(len(ds), tc.batch_size, tc.seed, 0, drop_last=True)
    opt = build_optimizer(model, tc)

    def step(i: int) -> None:
        batch = TrainExamples.collate([ds[j] for j in batches[i % len(batches)]])
        loss = model.training_loss(batch)["loss"]
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    with FlopCounterMode(display=False) as fc:
        step(0)
    flops = fc.get_total_flops()
    times = []
    for i in range(1, 1 + args.warmup + args.steps):
        t0 = time.perf_counter()
        step(i)
        if i > args.warmup:
            times.append(time.perf_counter() - t0)
    per_item = sum(v[1:].numel() * v.element_size() for m in ("text", "image") for v in (getattr(content, m) or {}).values())
    s = statistics.median(times)
    print(json.dumps({
        "config": args.config, "threads": args.threads, "batch_size": tc.batch_size, "items": content.n_items,
        "sequences": len(ds), "gflop_per_step": round(flops / 1e9, 2), "s_per_step": round(s, 3),
        "s_per_step_all": [round(t, 3) for t in times], "achieved_gflop_s": round(flops / 1e9 / s, 1),
        "feature_bytes_per_item": per_item // content.n_items if content.n_items else 0,
    }, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
