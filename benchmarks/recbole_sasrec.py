"""RecBole's stock SASRec on exactly mmrec's split, run inside RecBole's own virtual environment.

Not imported by mmrec: `mmrec compare` (mmrec/recbole.py) writes the split as RecBole atomic files
and runs this script with `.venv-recbole/bin/python` (RecBole 1.2.1 needs torch 2.13, numpy < 2).

The `.inter` file holds each user's kept interactions (mmrec's preprocessing: the last L+3) in
order, with the position as timestamp, so RecBole's leave-one-out split (`LS: valid_and_test`,
`order: TO`) gives mmrec's train / valid / test items exactly; `MAX_ITEM_LIST_LENGTH` is mmrec's L.
RecBole trains and early-stops with its own defaults (CE over all items, 2 blocks, d 64, dropout 0.5,
batch 2048, Adam lr 1e-3, stopping_step 10, validation on NDCG@10 under RecBole's protocol: for
sequential models RecBole 1.2.1 masks no history item). Its own test metrics are recorded, and
the best checkpoint's user vectors (valid and test histories) and item vectors are written in
mmrec's item order, so mmrec ranks them with its own protocol and compares per user.

Usage: python recbole_sasrec.py --data DIR --dataset NAME --out DIR --seed N --max-len L --threads T
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", required=True, help="folder holding <dataset>/<dataset>.inter")
    p.add_argument("--dataset", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--max-len", type=int, default=20)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--epochs", type=int, default=300)
    p.add_argument("--stopping-step", type=int, default=10)
    args = p.parse_args()

    import numpy as np
    import torch

    torch.set_num_threads(args.threads)
    from recbole.config import Config
    from recbole.data import create_dataset, data_preparation
    from recbole.model.sequential_recommender import SASRec
    from recbole.trainer import Trainer
    from recbole.utils import init_seed

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    config = Config(model="SASRec", dataset=args.dataset, config_dict={
        "data_path": args.data, "checkpoint_dir": str(out / "checkpoints"), "seed": args.seed, "reproducibility": True,
        "use_gpu": False, "device": "cpu", "show_progress": False, "worker": 0,
        "USER_ID_FIELD": "user_id", "ITEM_ID_FIELD": "item_id", "TIME_FIELD": "timestamp",
        "load_col": {"inter": ["user_id", "item_id", "timestamp"]},
        "user_inter_num_interval": "[0,inf)", "item_inter_num_interval": "[0,inf)",
        "MAX_ITEM_LIST_LENGTH": args.max_len, "train_neg_sample_args": None, "loss_type": "CE",
        "eval_args": {"split": {"LS": "valid_and_test"}, "order": "TO", "group_by": "user", "mode": "full"},
        "metrics": ["Hit", "NDCG", "MRR"], "topk": [10], "valid_metric": "NDCG@10",
        "epochs": args.epochs, "stopping_step": args.stopping_step,
    })
    init_seed(config["seed"], config["reproducibility"])
    dataset = create_dataset(config)
    train_data, valid_data, test_data = data_preparation(config, dataset)
    init_seed(config["seed"] + config["local_rank"], config["reproducibility"])
    model = SASRec(config, train_data._dataset).to(config["device"])
    trainer = Trainer(config, model)
    epoch_seconds: list[float] = []
    train_epoch = trainer._train_epoch

    def timed_epoch(*a, **kw):  # seconds per training epoch, evaluation excluded
        t0 = time.perf_counter()
        r = train_epoch(*a, **kw)
        epoch_seconds.append(time.perf_counter() - t0)
        return r

    trainer._train_epoch = timed_epoch
    t0 = time.perf_counter()
    best_valid, best_valid_result = trainer.fit(train_data, valid_data, saved=True, show_progress=False)
    fit_seconds = time.perf_counter() - t0
    # RecBole's checkpoints hold numpy state: torch >= 2.6 needs weights_only=False to read its own file
    ckpt = torch.load(trainer.saved_model_file, map_location="cpu", weights_only=False)
    model.load_state_dict(ckpt["state_dict"])
    model.load_other_parameter(ckpt.get("other_parameter"))
    test_result = trainer.evaluate(test_data, load_best_model=False, show_progress=False)
    model.eval()

    # vectors in mmrec's order: item token = mmrec item_idx, user token = mmrec user_idx
    item_tokens = dataset.field2id_token["item_id"]  # internal id -> token ('[PAD]' at 0)
    user_tokens = dataset.field2id_token["user_id"]
    emb = model.item_embedding.weight.detach()
    n_items = max(int(t) for t in item_tokens[1:])
    item_vecs = torch.zeros(n_items + 1, emb.shape[1])
    item_vecs[torch.tensor([int(t) for t in item_tokens[1:]])] = emb[1:]
    vectors = {}
    with torch.no_grad():
        for split, data in (("valid", valid_data), ("test", test_data)):
            users, vecs = [], []
            for batch in data:
                inter = batch[0]
                vecs.append(model.forward(inter["item_id_list"], inter["item_length"]))
                users.extend(int(user_tokens[u]) for u in inter["user_id"].tolist())
            order = np.argsort(users)
            if sorted(users) != list(range(len(users))):
                raise SystemExit(f"{split}: RecBole's users are not mmrec's 0..U-1")
            vectors[split] = torch.cat(vecs)[torch.as_tensor(order)].numpy()
    np.save(out / "item_vecs.npy", item_vecs.numpy())
    np.save(out / "user_vecs_valid.npy", vectors["valid"])
    np.save(out / "user_vecs_test.npy", vectors["test"])
    record = {
        "model": "RecBole SASRec", "recbole": __import__("recbole").__version__, "torch": torch.__version__,
        "seed": args.seed, "threads": args.threads, "max_len": args.max_len,
        "epochs_trained": len(epoch_seconds), "seconds_per_epoch": sum(epoch_seconds) / max(1, len(epoch_seconds)),
        "fit_seconds": fit_seconds, "best_valid_ndcg10_recbole_protocol": float(best_valid),
        "valid_recbole_protocol": {k: float(v) for k, v in best_valid_result.items()},
        "test_recbole_protocol": {k: float(v) for k, v in test_result.items()},
        "n_users": int(len(user_tokens) - 1), "n_items": int(len(item_tokens) - 1),
        "params": {k: config[k] for k in ("hidden_size", "n_layers", "n_heads", "inner_size", "hidden_dropout_prob",
                                          "attn_dropout_prob", "learning_rate", "train_batch_size", "weight_decay")},
    }
    tmp = out / ".recbole.json.tmp"
    tmp.write_text(json.dumps(record, indent=2))
    os.replace(tmp, out / "recbole.json")
    print(json.dumps({k: record[k] for k in ("epochs_trained", "seconds_per_epoch", "test_recbole_protocol")}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
