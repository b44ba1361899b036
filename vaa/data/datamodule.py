"""LightningDataModules: templated, response-masked, padded batches; the HFT mix.

Exact resume: the order of a stage's batches is a pure function of (seed, epoch, position):
epoch e's order is a permutation drawn from a generator seeded by (seed, e), position p is its
p-th batch, and the datamodule counts the batches that reached a training step. A checkpoint
stores that count, so a resumed run (mid-epoch or at an epoch boundary) continues with exactly
the batch an uninterrupted run would train on next. (A shuffled ``DataLoader`` cannot: its
generator is re-seeded when the loader is rebuilt, and Lightning does not fast-forward a
plain loader mid-epoch.)
"""

from __future__ import annotations

import hashlib
import math
from typing import Any, Callable, Mapping, Sequence

import lightning as L
import torch
from torch.utils.data import DataLoader, IterableDataset

from vaa.data.encode import TrainCollator, encode_rows
from vaa.data.formats import Example
from vaa.data.group_stream import GroupStream


def stream_seed(seed: int, name: str) -> int:
    """A 63-bit seed per (run seed, stream name), stable across processes."""
    digest = hashlib.sha256(f"vaa-extra-stream/{seed}/{name}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


def epoch_seed(seed: int, epoch: int) -> int:
    """A 63-bit seed per (run seed, epoch), stable across processes (no ``hash()``)."""
    digest = hashlib.sha256(f"vaa-epoch-order/{seed}/{epoch}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


class EpochOrder:
    """Which rows form batch ``position`` of epoch ``epoch``: a pure function of
    (seed, epoch, position, rank). Epoch e permutes the ``n`` rows with a generator seeded by
    ``epoch_seed(seed, e)``; with ``world_size`` > 1 the permutation is padded by wrapping to a
    multiple of ``world_size`` and rank r takes every world_size-th row from r (as
    ``DistributedSampler``); consecutive ``batch_size`` chunks are the batches, the last may
    be partial."""

    def __init__(self, n: int, batch_size: int, seed: int, rank: int = 0, world_size: int = 1):
        if n < 1 or batch_size < 1:
            raise ValueError(f"EpochOrder needs n >= 1 and batch_size >= 1, got {n}, {batch_size}")
        self.n, self.batch_size, self.seed = n, batch_size, seed
        self.rank, self.world_size = rank, max(1, world_size)
        self.per_rank = math.ceil(n / self.world_size)
        self._cache: tuple[int, list[int]] | None = None

    def steps_per_epoch(self) -> int:
        return math.ceil(self.per_rank / self.batch_size)

    def rows(self, epoch: int) -> list[int]:
        """This rank's row order in ``epoch``."""
        if self._cache is None or self._cache[0] != epoch:
            gen = torch.Generator().manual_seed(epoch_seed(self.seed, epoch))
            perm = torch.randperm(self.n, generator=gen).tolist()
            total = self.per_rank * self.world_size
            perm = (perm * math.ceil(total / self.n))[:total]
            self._cache = (epoch, perm[self.rank::self.world_size])
        return self._cache[1]

    def batch(self, epoch: int, position: int) -> list[int]:
        return self.rows(epoch)[position * self.batch_size:(position + 1) * self.batch_size]


class _EpochBatches(IterableDataset):
    """One epoch of collated batches, from the datamodule's trained-batch count onwards."""

    def __init__(self, dm: "SFTDataModule", order: EpochOrder):
        self.dm, self.order = dm, order

    def __len__(self) -> int:
        return self.order.steps_per_epoch()

    def __iter__(self):
        spe = self.order.steps_per_epoch()
        epoch, start = divmod(self.dm.trained, spe)
        collate = TrainCollator(self.dm.tokenizer.pad_token_id)
        for position in range(start, spe):
            yield collate([self.dm.rows[i] for i in self.order.batch(epoch, position)])


class SFTDataModule(L.LightningDataModule):
    """Shuffled (seeded) batches of one example list. Rows are tokenised once, in setup.

    ``extra``: named example lists a method draws from inside its step (Booster's and
    RepNoise's harmful batches, Lisa's alignment batches): ``self.streams[name]`` is an
    endless stream (a one-group :class:`GroupStream`: a fresh seeded permutation per pass,
    ``next_batch(0)``), of batch size ``extra_batch_size(name, batch_size)``; their state is
    checkpointed with the datamodule, so a resumed run draws the same batches.

    The main batches follow ``EpochOrder`` (seed, epoch, position); ``trained`` counts the
    batches handed to a training step (``on_before_batch_transfer``, which Lightning calls
    right before the step, after any prefetch) and is checkpointed, so an epoch's iterator
    starts at ``divmod(trained, steps_per_epoch)``. Iterated outside a trainer (``trained`` = 0)
    the loader yields epoch 0 from its first batch.

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
        self.trained = 0  # batches handed to a training step so far (all epochs)
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
        state: dict[str, Any] = {"trained": self.trained}
        if self.streams:
            state["streams"] = {k: s.state_dict() for k, s in self.streams.items()}
        return state

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        state_dict = state_dict or {}
        self.trained = int(state_dict.get("trained", 0))
        self._pending_streams.update(state_dict.get("streams", {}))
        if self.streams:
            self.setup()

    def on_before_batch_transfer(self, batch: Any, dataloader_idx: int) -> Any:
        """Lightning calls this for the batch about to be trained (after prefetching): count it."""
        self.trained += 1
        return batch

    def steps_per_epoch(self) -> int:
        return math.ceil(len(self.examples) / self.batch_size)

    def train_dataloader(self) -> DataLoader:
        """Batches in ``EpochOrder``; an IterableDataset, so Lightning never swaps in its own
        sampler: each data-parallel rank takes its share of every epoch's permutation."""
        self.setup()
        trainer = getattr(self, "trainer", None)
        rank, world = (int(trainer.global_rank), int(trainer.world_size)) if trainer is not None else (0, 1)
        order = EpochOrder(len(self.rows), self.batch_size, self.seed, rank, world)
        return DataLoader(_EpochBatches(self, order), batch_size=None)


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
