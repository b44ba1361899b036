"""Group-aware batches for VAA (specs/vaa.md §3.6, §3.7).

Every optimizer step trains on a batch of one group only. ``GroupStream`` keeps one
endless iterator per group: each pass over a group is a fresh random permutation drawn
from that group's own ``torch.Generator``, the last partial batch of a pass is kept, and
the iterator restarts with a new permutation when the pass is exhausted. Its state (each
group's generator state, permutation and position) is checkpointed, so a resumed run draws
exactly the batches an uninterrupted one would.
"""

from __future__ import annotations

import hashlib
import math
from typing import Any, Callable, Iterator, Mapping, Sequence

import lightning as L
import torch
from torch.utils.data import DataLoader, IterableDataset

from vaa.data.encode import TrainCollator, encode_rows
from vaa.data.formats import Example

GROUP_NAMES = {0: "invulnerable", 1: "vulnerable"}


def group_seed(seed: int, group: int, rank: int) -> int:
    """A 63-bit generator seed from (seed, group, rank): stable across processes and
    Python versions (no ``hash()``)."""
    digest = hashlib.sha256(f"vaa-group-stream/{seed}/{group}/{rank}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


class GroupStream:
    """Endless, seeded, single-group batches.

    ``rows_by_group`` maps a group id to its encoded rows (dicts from ``encode_train``).
    Group ids must lie in ``0..num_groups-1``. An empty group is allowed (a grouping may
    find nothing vulnerable) as long as some group has rows; asking an empty group for a
    batch raises ``ValueError`` naming the group and suggesting a different grouping, so
    the training method must not sample it.
    Each group's generator is seeded from (``seed``, group, ``rank``), so data-parallel
    ranks draw different (independent) orders of the same group.
    """

    def __init__(self, rows_by_group: Mapping[int, Sequence[dict]], batch_size: int,
                 collate: Callable[[Sequence[dict]], dict[str, torch.Tensor]], seed: int,
                 rank: int = 0, num_groups: int = 2):
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        unknown = sorted(set(rows_by_group) - set(range(num_groups)))
        if unknown:
            raise ValueError(f"group id(s) {unknown} outside 0..{num_groups - 1}")
        sizes = {g: len(rows_by_group.get(g, ())) for g in range(num_groups)}
        if not any(sizes.values()):
            raise ValueError("no examples in any group")
        # An empty group is allowed here (a grouping may find nothing vulnerable); asking it
        # for a batch raises, so the training method must not sample it (VAA does not).
        self.rows = {g: list(rows_by_group.get(g, ())) for g in range(num_groups)}
        self.batch_size, self.collate = batch_size, collate
        self.seed, self.rank, self.num_groups = seed, rank, num_groups
        self.generators = {g: torch.Generator().manual_seed(group_seed(seed, g, rank))
                           for g in range(num_groups)}
        self.perms: dict[int, list[int] | None] = {g: None for g in range(num_groups)}
        self.pos = {g: 0 for g in range(num_groups)}
        self.passes = {g: 0 for g in range(num_groups)}  # passes started per group

    @classmethod
    def from_groups(cls, rows: Sequence[dict], groups: Sequence[int], batch_size: int,
                    collate: Callable, seed: int, rank: int = 0, num_groups: int = 2) -> "GroupStream":
        if len(rows) != len(groups):
            raise ValueError(f"{len(groups)} group ids for {len(rows)} rows")
        by: dict[int, list[dict]] = {}
        for r, g in zip(rows, groups):
            by.setdefault(int(g), []).append(r)
        return cls(by, batch_size, collate, seed, rank, num_groups)

    def sizes(self) -> list[int]:
        return [len(self.rows[g]) for g in range(self.num_groups)]

    def next_indices(self, group: int) -> list[int]:
        """Positions (within the group) of the next batch of ``group``."""
        if group not in self.rows:
            raise ValueError(f"no group {group!r}; groups are 0..{self.num_groups - 1}")
        n = len(self.rows[group])
        if n == 0:
            name = GROUP_NAMES.get(group, f"group {group}") if self.num_groups == 2 else f"group {group}"
            raise ValueError(f"group {group} ({name}) has no examples (sizes {self.sizes()}): use a "
                             "different grouping (dro.estimate.definition / aggregate, more proxy "
                             "runs, or another dro.groups_file)")
        if self.perms[group] is None or self.pos[group] >= n:
            self.perms[group] = torch.randperm(n, generator=self.generators[group]).tolist()
            self.pos[group] = 0
            self.passes[group] += 1
        start = self.pos[group]
        idx = self.perms[group][start:start + self.batch_size]  # the last batch may be partial
        self.pos[group] = start + len(idx)
        return idx

    def next_batch(self, group: int) -> dict[str, torch.Tensor]:
        """A collated batch of ``group``'s rows only."""
        idx = self.next_indices(group)
        return self.collate([self.rows[group][i] for i in idx])

    def iterator(self, group: int) -> Iterator[dict[str, torch.Tensor]]:
        while True:
            yield self.next_batch(group)

    def state_dict(self) -> dict[str, Any]:
        """Plain tensors / ints / lists only (loads under ``torch.load(weights_only=True)``)."""
        return {"version": 1, "seed": self.seed, "rank": self.rank, "batch_size": self.batch_size,
                "sizes": self.sizes(),
                "groups": {g: {"generator": self.generators[g].get_state(),
                               "perm": None if self.perms[g] is None
                               else torch.tensor(self.perms[g], dtype=torch.long),
                               "pos": self.pos[g], "passes": self.passes[g]}
                           for g in range(self.num_groups)}}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        if state.get("version") != 1:
            raise ValueError(f"unknown GroupStream state version {state.get('version')!r}")
        if list(state["sizes"]) != self.sizes():
            raise ValueError(f"the checkpoint's group stream has group sizes {list(state['sizes'])} "
                             f"but the data has {self.sizes()}: it was saved with other groups or "
                             "another alignment set")
        if state["batch_size"] != self.batch_size:
            raise ValueError(f"the checkpoint's group stream has batch size {state['batch_size']}, "
                             f"this run {self.batch_size}")
        for g in range(self.num_groups):
            s = state["groups"][g]
            self.generators[g].set_state(s["generator"].clone())
            self.perms[g] = None if s["perm"] is None else [int(i) for i in s["perm"]]
            self.pos[g], self.passes[g] = int(s["pos"]), int(s["passes"])


class _StepPlaceholders(IterableDataset):
    """``steps`` step indices. An IterableDataset, so Lightning never swaps in a
    DistributedSampler: every rank runs the same number of steps."""

    def __init__(self, steps: int):
        self.steps = steps

    def __iter__(self):
        return iter(range(self.steps))

    def __len__(self) -> int:
        return self.steps


class GroupDataModule(L.LightningDataModule):
    """The alignment set split into groups, for group-aware training (VAA).

    ``setup()`` tokenises every example once and builds ``self.stream`` (a ``GroupStream``).
    An epoch is ceil(N / batch_size) steps over *all* N examples (§3.6), and
    ``train_dataloader()`` yields only step placeholders (the step index, an int): the
    training method picks the group with its sampler and draws the batch itself, with
    ``datamodule.stream.next_batch(group)``.

    Why not let the data loader choose the batch: Lightning prefetches the next batch
    before the current step runs, so a batch chosen by the loader would be picked with
    the sampler's probabilities from one step earlier (before the current step's q update).
    Drawing inside the step keeps the group choice and the q update in order, and keeps
    resume exact: the stream's state in a checkpoint is exactly the state after the last
    completed step, with no prefetched batch lost in between.

    ``rank``: seeds the stream's per-group generators; ``None`` (default) takes the
    trainer's global rank when attached to one, else 0. The stream state is saved and
    restored with Lightning checkpoints through ``state_dict`` / ``load_state_dict``.
    """

    def __init__(self, examples: Sequence[Example], groups: Sequence[int], tokenizer, *,
                 batch_size: int, seed: int, template: str = "alpaca", max_length: int = 256,
                 max_prompt_length: int = 512, rank: int | None = None, num_groups: int = 2):
        super().__init__()
        if not examples:
            raise ValueError("no training examples: check the data and task configs")
        if len(groups) != len(examples):
            raise ValueError(f"{len(groups)} group ids for {len(examples)} alignment examples")
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.examples, self.groups = list(examples), [int(g) for g in groups]
        self.tokenizer = tokenizer
        self.batch_size, self.seed, self.template = batch_size, seed, template
        self.max_length, self.max_prompt_length = max_length, max_prompt_length
        self.rank, self.num_groups = rank, num_groups
        self.rows: list[dict] | None = None
        self.truncation: dict[str, dict[str, int]] = {}  # as SFTDataModule.truncation
        self.stream: GroupStream | None = None
        self._pending_state: dict | None = None

    def _rank(self) -> int:
        if self.rank is not None:
            return self.rank
        trainer = getattr(self, "trainer", None)
        return int(trainer.global_rank) if trainer is not None else 0

    def setup(self, stage: str | None = None) -> None:
        if self.rows is None:
            self.rows, stats = encode_rows(self.tokenizer, self.examples, self.template,
                                           self.max_length, self.max_prompt_length, what="train rows")
            self.truncation["train"] = stats.as_dict()
        if self.stream is None:
            self.stream = GroupStream.from_groups(
                self.rows, self.groups, self.batch_size, TrainCollator(self.tokenizer.pad_token_id),
                self.seed, self._rank(), self.num_groups)
            if self._pending_state is not None:
                self.stream.load_state_dict(self._pending_state)
                self._pending_state = None

    def group_sizes(self) -> list[int]:
        counts = [0] * self.num_groups
        for g in self.groups:
            if not 0 <= g < self.num_groups:
                raise ValueError(f"group id {g} outside 0..{self.num_groups - 1}")
            counts[g] += 1
        return counts

    def steps_per_epoch(self) -> int:
        return math.ceil(len(self.examples) / self.batch_size)

    def train_dataloader(self) -> DataLoader:
        self.setup()
        return DataLoader(_StepPlaceholders(self.steps_per_epoch()), batch_size=None)

    def state_dict(self) -> dict[str, Any]:
        if self.stream is None:
            return {"stream": self._pending_state} if self._pending_state is not None else {}
        return {"stream": self.stream.state_dict()}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if not state_dict or state_dict.get("stream") is None:
            return
        if self.stream is None:  # restored before setup(): applied when the stream is built
            self._pending_state = state_dict["stream"]
        else:
            self.stream.load_state_dict(state_dict["stream"])
