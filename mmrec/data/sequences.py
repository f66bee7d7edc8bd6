"""Tensors for training and evaluation from a preprocessed domain's ``splits``.

Leave-one-out (papers.md): a user's training input is ``train = seq[:-2]``; every position of it is
a next-item target. Validation ranks ``seq[-2]`` given ``train``; test ranks ``seq[-1]`` given
``train + [valid]``. Histories keep the most recent ``max_len`` items and are left-padded with 0.
"""

from __future__ import annotations

from dataclasses import dataclass

import polars as pl
import torch


def left_pad(seqs: list[list[int]], length: int) -> torch.Tensor:
    """Last ``length`` items of each sequence, left-padded with 0: ``(len(seqs), length)``."""
    out = torch.zeros(len(seqs), length, dtype=torch.long)
    for i, s in enumerate(seqs):
        s = s[-length:]
        if s:
            out[i, length - len(s):] = torch.tensor(s, dtype=torch.long)
    return out


@dataclass
class SequenceData:
    """One domain's users as tensors (row ``u`` = user_idx ``u``)."""

    n_items: int
    train: list[list[int]]
    valid: torch.Tensor
    test: torch.Tensor

    @classmethod
    def from_splits(cls, splits: pl.DataFrame, n_items: int) -> SequenceData:
        splits = splits.sort("user_idx")
        if splits["user_idx"].to_list() != list(range(splits.height)):
            raise ValueError("splits.user_idx must be 0..U-1")
        return cls(
            n_items=n_items,
            train=[list(map(int, s)) for s in splits["train"].to_list()],
            valid=torch.tensor(splits["valid"].to_list(), dtype=torch.long),
            test=torch.tensor(splits["test"].to_list(), dtype=torch.long),
        )

    @property
    def n_users(self) -> int:
        return len(self.train)

    def train_examples(self, max_len: int) -> torch.Tensor:
        """``(U, max_len + 1)``: each user's last ``max_len + 1`` training items (inputs + targets)."""
        return left_pad(self.train, max_len + 1)

    def histories(self, split: str, max_len: int) -> tuple[torch.Tensor, torch.Tensor]:
        """``(histories (U, max_len), targets (U,))`` for ``split`` = valid | test."""
        if split == "valid":
            return left_pad(self.train, max_len), self.valid
        if split == "test":
            return left_pad([t + [int(v)] for t, v in zip(self.train, self.valid)], max_len), self.test
        raise ValueError(f"split must be 'valid' or 'test', got {split!r}")

    def full_histories(self, split: str) -> list[list[int]]:
        """Everything the user saw before the target (masked in full ranking)."""
        if split == "valid":
            return [list(t) for t in self.train]
        return [t + [int(v)] for t, v in zip(self.train, self.valid)]

    def cold_items(self) -> torch.Tensor:
        """``(N+1,)`` bool: items that never occur in any training sequence."""
        seen = torch.zeros(self.n_items + 1, dtype=torch.bool)
        flat = [i for s in self.train for i in s]
        if flat:
            seen[torch.tensor(flat)] = True
        cold = ~seen
        cold[0] = False
        return cold


class TrainExamples(torch.utils.data.Dataset):
    """Rows of ``SequenceData.train_examples``; ``collate`` makes ``{"seq": (B, L+1)}``."""

    def __init__(self, examples: torch.Tensor):
        keep = (examples > 0).sum(1) >= 2  # at least one (input, target) pair
        self.examples = examples[keep]

    def __len__(self) -> int:
        return self.examples.shape[0]

    def __getitem__(self, i: int) -> torch.Tensor:
        return self.examples[i]

    @staticmethod
    def collate(rows: list[torch.Tensor]) -> dict[str, torch.Tensor]:
        return {"seq": torch.stack(rows)}


def concat_sequences(datas: list[SequenceData], offsets: list[int]) -> SequenceData:
    """Several domains' users in one item space (domain ``j``'s item ``i`` -> ``offsets[j] + i``)."""
    n_items = offsets[-1] + datas[-1].n_items
    train = [[i + off for i in s] for d, off in zip(datas, offsets) for s in d.train]
    valid = torch.cat([d.valid + off for d, off in zip(datas, offsets)])
    test = torch.cat([d.test + off for d, off in zip(datas, offsets)])
    return SequenceData(n_items, train, valid, test)
