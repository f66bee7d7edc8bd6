"""Shared fixtures: a tiny, valid tabular dataset written to a temporary folder."""

from __future__ import annotations

import csv
import os
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("MMREC_SHARED_DATASETS", REPO.parent / "shared" / "datasets"))
"""The real shared datasets (read in place); tests using them skip when absent."""


def write_tabular(root: Path, n_items: int = 12, n_users: int = 5, seq_len: int = 6, images: bool = True) -> Path:
    """Write a small valid dataset in the generic tabular layout; returns its folder."""
    root.mkdir(parents=True, exist_ok=True)
    (root / "images").mkdir(exist_ok=True)
    rng = np.random.default_rng(0)
    with open(root / "items.csv", "w", newline="", encoding="utf-8") as fh:
        w = csv.writer(fh)
        w.writerow(["item_id", "title", "description", "image"])
        for i in range(n_items):
            img = ""
            if images and i % 3 != 0:  # every third item is text-only
                img = f"images/i{i}.png"
                arr = rng.integers(0, 255, size=(8, 8, 3), dtype=np.uint8)
                Image.fromarray(arr).save(root / img)
            image_only = i % 4 == 1 and img  # items 1 and 5
            title = "" if image_only else f"item {i} title"
            w.writerow([f"i{i}", title, "" if image_only else f"description of item {i}", img])
    with open(root / "interactions.csv", "w", newline="", encoding="utf-8") as fh:
        w = csv.writer(fh)
        w.writerow(["user_id", "item_id", "timestamp"])
        for u in range(n_users):
            for t in range(seq_len):
                w.writerow([f"u{u}", f"i{(u + 2 * t) % n_items}", 1000 * u + 10 * t])
    return root


@pytest.fixture
def tabular_dir(tmp_path: Path) -> Path:
    return write_tabular(tmp_path / "raw" / "shop")


def edit_csv(path: Path, fn) -> None:
    """Rewrite a CSV: ``fn(rows)`` gets and returns the list of rows (header first)."""
    with open(path, newline="", encoding="utf-8") as fh:
        rows = list(csv.reader(fh))
    rows = fn(rows)
    with open(path, "w", newline="", encoding="utf-8") as fh:
        csv.writer(fh).writerows(rows)


@pytest.fixture(autouse=True, scope="session")
def _one_torch_thread():
    """Tiny test tensors only lose from threading on a 2-core machine (16 ms vs 24 us for a small
    Linear under load, measured here)."""
    import torch

    torch.set_num_threads(1)
    yield
