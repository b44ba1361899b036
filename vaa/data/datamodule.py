"""LightningDataModules: templated, response-masked, padded batches; the HFT mix."""

from __future__ import annotations

import math
from typing import Sequence

import lightning as L
import torch
from torch.utils.data import DataLoader

from vaa.data.encode import TrainCollator, encode_train
from vaa.data.formats import Example


class SFTDataModule(L.LightningDataModule):
    """Shuffled (seeded) batches of one example list. Rows are tokenised once, in setup."""

    def __init__(self, examples: Sequence[Example], tokenizer, *, batch_size: int, seed: int,
                 template: str = "alpaca", max_length: int = 256, max_prompt_length: int = 512,
                 groups: Sequence[int] | None = None):
        super().__init__()
        if not examples:
            raise ValueError("no training examples: check the data and task configs")
        self.examples, self.tokenizer = list(examples), tokenizer
        self.batch_size, self.seed, self.template = batch_size, seed, template
        self.max_length, self.max_prompt_length = max_length, max_prompt_length
        if groups is not None and len(groups) != len(self.examples):
            raise ValueError(f"{len(groups)} group ids for {len(self.examples)} examples")
        self.groups = groups  # optional group id per example, passed through as batch["group"]
        self.rows: list[dict] | None = None

    def setup(self, stage: str | None = None) -> None:
        if self.rows is None:
            self.rows = [encode_train(self.tokenizer, ex, self.template, self.max_length,
                                      self.max_prompt_length) for ex in self.examples]
            for row, g in zip(self.rows, self.groups or ()):
                row["group"] = int(g)

    def steps_per_epoch(self) -> int:
        return math.ceil(len(self.examples) / self.batch_size)

    def train_dataloader(self) -> DataLoader:
        self.setup()
        g = torch.Generator().manual_seed(self.seed)
        return DataLoader(self.rows, batch_size=self.batch_size, shuffle=True, generator=g,
                          collate_fn=TrainCollator(self.tokenizer.pad_token_id))


def hft_mix(task: Sequence[Example], harmful: Sequence[Example], n: int, p: float,
            keys: str = "attack") -> list[Example]:
    """The attack's training rows (protocol.md §3.3): the first floor((1-p)n) task rows and
    the first floor(pn) harmful rows, concatenated (the data loader shuffles them, seeded)."""
    if not 0.0 <= p <= 1.0:
        raise ValueError(f"{keys}.harmful_ratio must be in [0, 1], got {p}")
    n_benign, n_harm = math.floor((1 - p) * n + 1e-9), math.floor(p * n + 1e-9)
    if n_benign > len(task):
        raise ValueError(f"{keys}.n={n} needs {n_benign} task rows but the task's train split has "
                         f"{len(task)}; lower {keys}.n or enlarge the split")
    if n_harm > len(harmful):
        raise ValueError(f"{keys}.n={n}, harmful_ratio={p} needs {n_harm} harmful rows but the pool "
                         f"has {len(harmful)}; lower {keys}.harmful_ratio or {keys}.n")
    return list(task[:n_benign]) + list(harmful[:n_harm])
