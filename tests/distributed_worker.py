"""A tiny PMMRec fit (fused text+image tower, NICL + NID + RCL) through ``mmrec.experiment.fit``,
run by tests/test_distributed.py in-process (one process) or under torchrun (several).

``python -m torch.distributed.run --standalone --nproc-per-node=2 tests/distributed_worker.py OUT``
writes ``OUT/result.json`` from rank 0: the loss of every step, the evaluation history, the best
metrics and a digest of the final weights. ``--die-at S`` kills rank ``--die-rank`` with SIGKILL
right after step ``S`` (a crashed worker).
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # torchrun puts the script's folder first, not the project root
    sys.path.insert(0, str(REPO))

import torch  # noqa: E402

from mmrec import distributed  # noqa: E402
from mmrec.data.sequences import SequenceData  # noqa: E402
from mmrec.experiment import fit  # noqa: E402
from mmrec.io import tensor_digest, write_json  # noqa: E402
from mmrec.models.recommender import ModelConfig, Recommender  # noqa: E402
from mmrec.training import TrainConfig  # noqa: E402
from mmrec.encoders.image import ImageEncoderConfig  # noqa: E402
from mmrec.encoders.text import TINY_BERT, TextEncoderConfig  # noqa: E402
from tests.models.test_towers import raw_content  # noqa: E402

N_ITEMS, N_USERS, L = 12, 20, 4
# no dropout anywhere: each rank draws dropout from its own stream, so with dropout the 1- and the
# 2-process runs would differ by construction (the same distribution, other draws)
TEXT = TextEncoderConfig(random_init=True, trainable_layers=1, max_length=8, pooling="attention",
                         overrides={**TINY_BERT, "hidden_dropout_prob": 0.0, "attention_probs_dropout_prob": 0.0})
IMAGE = ImageEncoderConfig.tiny(trainable_blocks=0, image_size=32)
TRAIN = dict(epochs=3, batch_size=7, lr=3e-3, patience=None, checkpoint_every=2, log_every=1, progress=False)
"""3 batches per epoch (7, 7, 6 users): every batch splits unevenly across 2 ranks (4 + 3, 3 + 3)."""


class ListTracker:
    """Keeps what ``train`` logs (the tracker interface of mmrec.tracking)."""

    def __init__(self):
        self.losses: dict[int, float] = {}
        self.tags: dict[str, str] = {}

    def log_params(self, params):
        pass

    def log_metrics(self, metrics, step=None):
        if "train/loss" in metrics:
            self.losses[int(step)] = float(metrics["train/loss"])

    def log_artifact(self, path, name=None):
        pass

    def set_tags(self, tags):
        self.tags.update(tags)


def tiny_data() -> SequenceData:
    g = torch.Generator().manual_seed(7)
    train = [torch.randint(1, N_ITEMS + 1, (int(torch.randint(3, 8, (1,), generator=g)),), generator=g).tolist()
             for _ in range(N_USERS)]
    valid = torch.randint(1, N_ITEMS + 1, (N_USERS,), generator=g)
    test = torch.randint(1, N_ITEMS + 1, (N_USERS,), generator=g)
    return SequenceData(N_ITEMS, train, valid, test)


def tiny_model(data: SequenceData) -> Recommender:
    cfg = ModelConfig.from_dict({
        "dim": 16, "max_len": L,
        "item_tower": {"name": "fused", "dropout": 0.0},
        "text_encoder": TEXT.__dict__, "image_encoder": IMAGE.__dict__, "fusion": {"name": "merge_attention", "dropout": 0.0},
        "user_encoder": {"name": "sasrec", "n_layers": 1, "n_heads": 2, "dropout": 0.0},
        "objective": {"name": "softmax", "nicl_enabled": True, "nid_weight": 0.1, "rcl_weight": 0.1},
    })
    torch.manual_seed(0)
    return Recommender(cfg, n_items=N_ITEMS).attach(raw_content(N_ITEMS), data.train_examples(L), seed=0)


def run(out: Path, die_at: int | None = None, die_rank: int = 1) -> dict:
    """Fit the tiny model into ``out/run``; returns (and on rank 0 writes) ``out/result.json``."""
    data = tiny_data()
    model = tiny_model(data)
    rank, size = distributed.world()
    tracker = ListTracker()

    def hook(event: str, step: int) -> None:
        if die_at is not None and rank == die_rank and event == "step" and step == die_at:
            os.kill(os.getpid(), signal.SIGKILL)

    res = fit(model, data, TrainConfig(**TRAIN), out / "run", tracker=tracker, ks=(5, 10), hook=hook)
    result = {
        "world_size": size,
        "losses": {str(k): v for k, v in sorted(tracker.losses.items())},
        "history": [{"step": h["step"], "metrics": h["metrics"], "train": h["train"]} for h in res.history],
        "best_metrics": res.best_metrics,
        "best_step": res.best_step,
        "steps": res.steps,
        "tags": tracker.tags,
        "weights": tensor_digest(sorted(model.state_dict().items())),
    }
    if rank == 0:
        write_json(out / "result.json", result)
    return result


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("out", type=Path)
    p.add_argument("--die-at", type=int)
    p.add_argument("--die-rank", type=int, default=1)
    args = p.parse_args()
    torch.set_num_threads(1)
    distributed.init_from_env()
    try:
        run(args.out, args.die_at, args.die_rank)
    finally:
        distributed.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
