"""LightningDataModules: templated, response-masked, padded batches; the HFT mix."""

from __future__ import annotations

import hashlib
import math
from typing import Any, Callable, Mapping, Sequence

import lightning as L
import torch
from torch.utils.data import DataLoader

from vaa.data.encode import TrainCollator, encode_rows
from vaa.data.formats import Example
from vaa.data.group_stream import GroupStream


def stream_seed(seed: int, name: str) -> int:
    """A 63-bit seed per (run seed, stream name), stable across processes."""
    digest = hashlib.sha256(f"vaa-extra-stream/{seed}/{name}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


class SFTDataModule(L.LightningDataModule):
    """Shuffled (seeded) batches of one example list. Rows are tokenised once, in setup.

    ``extra``: named example lists a method draws from inside its step (Booster's and
    RepNoise's harmful batches, Lisa's alignment batches): ``self.streams[name]`` is an
    endless stream (a one-group :class:`GroupStream`: a fresh seeded permutation per pass,
    ``next_batch(0)``), of batch size ``extra_batch_size(name, batch_size)``; their state is
    checkpointed with the datamodule, so a resumed run draws the same batches.

    ``truncation``: per example list ("train" and each extra stream's name), the counts of
    targets ``max_length`` cut (``vaa.data.encode.Truncation.as_dict``), filled in ``setup``.
    """

    def __init__(self, examples: Sequence[Example], tokenizer, *, batch_size: int, seed: int,
                 template: str = "alpaca", max_length: int = 256, max_prompt_length: int = 512,
                 groups: Sequence[int] | None = None,
                 extra: Mapping[str, Sequence[Example]] | None = None,
                 extra_batch_size: Callable[[str, int], int] | None = None):
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
        self.extra = {k: list(v) for k, v in (extra or {}).items()}
        for name, rows in self.extra.items():
            if not rows:
                raise ValueError(f"extra data stream {name!r} is empty: check extra_data.{name} "
                                 "in the config and the file it names")
        self.extra_batch_size = extra_batch_size or (lambda name, default: default)
        self.streams: dict[str, GroupStream] = {}
        self._pending_streams: dict[str, Any] = {}
        self.truncation: dict[str, dict[str, int]] = {}

    def encode(self, examples: Sequence[Example], what: str = "train") -> list[dict]:
        rows, stats = encode_rows(self.tokenizer, examples, self.template, self.max_length,
                                  self.max_prompt_length, what=f"{what} rows")
        self.truncation[what] = stats.as_dict()
        return rows

    def setup(self, stage: str | None = None) -> None:
        if self.rows is None:
            self.rows = self.encode(self.examples)
            for row, g in zip(self.rows, self.groups or ()):
                row["group"] = int(g)
        collate = TrainCollator(self.tokenizer.pad_token_id)
        for name, examples in self.extra.items():
            if name not in self.streams:
                bs = self.extra_batch_size(name, self.batch_size)
                trainer = getattr(self, "trainer", None)  # data-parallel ranks draw different orders
                rank = int(trainer.global_rank) if trainer is not None else 0
                self.streams[name] = GroupStream({0: self.encode(examples, name)}, bs, collate,
                                                 stream_seed(self.seed, name), rank=rank, num_groups=1)
            if name in self._pending_streams:
                self.streams[name].load_state_dict(self._pending_streams.pop(name))

    def state_dict(self) -> dict[str, Any]:
        return {"streams": {k: s.state_dict() for k, s in self.streams.items()}} if self.streams else {}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._pending_streams.update((state_dict or {}).get("streams", {}))
        if self.streams:
            self.setup()

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
