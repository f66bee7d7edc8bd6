"""Is an item's cached feature the same bytes whatever it was encoded with? Prints the count of items that differ.

Builds one domain's frozen features (the config's text and image encoders) twice into fresh caches: once in
one call, as a first ``item_features`` run does, and once in ``--chunks`` calls over a shuffled order, as a
cache filled bit by bit does (another catalog first, an edited item, a sharded build). Then compares every
item's rows byte for byte and prints, per modality, how many items differ and by how much. Reads the
domain's validated catalog (run ``validated_catalog`` for it first); writes only to a temporary folder::

    python benchmarks/cache_determinism.py --config configs/real.yaml --domain movielens_100k

Feature cache version 1 padded each text to the longest of its batch and ran images in batches of any
size, so the two builds differed (measured on all-MiniLM-L6-v2: 76 of 100 Amazon titles moved in float16
between a batch of their own length and one padded to a longer title; EfficientNet-Lite0: every poster
encoded alone differed from itself in a batch of 32), and a pretrained model made again from a cache
filled in another order was another model. Version 2 should print 0 differing items.
"""

from __future__ import annotations

import argparse
import random
import sys
import tempfile
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def _compare(name: str, one: dict[str, torch.Tensor], parts: dict[str, torch.Tensor], keys: list[str]) -> int:
    differ = [i for i in range(len(keys)) if not all(torch.equal(one[t][i], parts[t][i]) for t in one)]
    worst = max((float((one[t].float() - parts[t].float()).abs().max()) for t in one), default=0.0)
    print(f"{name}: {len(keys)} items, {len(differ)} differ between the two builds (max |diff| {worst:.3g})"
          + (f"; first: {[keys[i] for i in differ[:5]]}" if differ else ""))
    return len(differ)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config", default="configs/real.yaml")
    p.add_argument("--domain", required=True)
    p.add_argument("--chunks", type=int, default=7, help="calls of the piecewise build (default 7)")
    p.add_argument("--seed", type=int, default=0, help="shuffle of the piecewise build")
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args(argv)
    if args.chunks < 2:
        p.error("--chunks must be >= 2 (one call is the other build)")
    torch.set_num_threads(args.threads)

    from mmrec.config import load_config
    from mmrec.data.catalog import Catalog
    from mmrec.encoders.cache import CACHE_VERSION, image_features, text_features

    cfg = load_config(args.config)
    d = cfg.domain(args.domain)
    folder = cfg.artifact_path("validated_catalog", d.name) / "catalog"
    if not folder.is_dir():
        p.error(f"{folder} does not exist: run `python -m mmrec validated_catalog --config {args.config}` first")
    catalog = Catalog.read(folder)
    items = catalog.items.sort("item_idx")
    keys = items["item_id"].to_list()
    texts = items.select(catalog.text().alias("t"))["t"].to_list()
    refs = items["image"].to_list()
    order = list(range(len(keys)))
    random.Random(args.seed).shuffle(order)
    pieces = [order[c::args.chunks] for c in range(args.chunks)]
    model, fc = cfg.model(), cfg.features()
    print(f"feature cache version {CACHE_VERSION}; {args.config} {d.name}: {len(keys)} items; one call against "
          f"{args.chunks} calls over a shuffled order (seed {args.seed}); {args.threads} thread(s)")

    differ = 0
    with tempfile.TemporaryDirectory(prefix="mmrec-cache-det-") as tmp:
        for modality in model.item_tower.modalities:
            if modality == "text":
                from mmrec.encoders.text import TextEncoder

                enc = TextEncoder(model.text_encoder)

                def build(idx, where):
                    return text_features(enc, [texts[i] for i in idx], [keys[i] for i in idx], where,
                                         batch_size=fc.text_batch_size, progress=False)
            else:
                from mmrec.encoders.image import ImageEncoder

                enc = ImageEncoder(model.image_encoder)

                def build(idx, where):
                    return image_features(enc, [refs[i] for i in idx], [keys[i] for i in idx], catalog.images,
                                          where, batch_size=fc.image_batch_size, progress=False)
            start = time.perf_counter()
            whole = build(list(range(len(keys))), Path(tmp) / f"{modality}-one")
            for piece in pieces:
                build(piece, Path(tmp) / f"{modality}-pieces")
            again = build(list(range(len(keys))), Path(tmp) / f"{modality}-pieces")
            if again.stats.computed:
                raise RuntimeError(f"the piecewise {modality} cache missed {again.stats.computed} items")
            print(f"  ({modality}: both builds in {time.perf_counter() - start:.0f} s)")
            differ += _compare(modality, whole.tensors, again.tensors, keys)
    return 1 if differ else 0


if __name__ == "__main__":
    sys.exit(main())
