"""Shared helpers of the benchmarks: a small synthetic world, its tokenizer, a tiny model,
side-by-side timing, and the one-JSON-line report.

Timing on a small, noisy machine: compare two variants in one process, interleave their
repetitions (A, B, A, B, ...) so that drifts in machine load hit both alike, and report
medians.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import logging
import os
import platform
import statistics
import sys
import time
import warnings
from pathlib import Path
from typing import Any, Callable, Sequence

import torch

from vaa.config.schema import ArchConfig
from vaa.data.sources import FolderSource
from vaa.models.build import build_tiny_llama
from vaa.models.tokenizer import build_word_tokenizer
from vaa.world.generator import WorldSizes, write_world

# A world small enough to write in well under a second, with every table present. The
# alignment set and the held-out harmful prompts are the ones the benchmarks read.
SMALL_WORLD = dict(base_harmful=120, base_benign=120, base_task=40, align=200, harmful_pool=20,
                   proxy_pool=20, hs_test=200, task_train=100, task_test=20)


def base_parser(description: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--quick", action="store_true",
                   help="tiny sizes and few repetitions: a seconds-long smoke run")
    p.add_argument("--threads", type=int, default=None,
                   help="torch intra-op threads (default: torch's own choice; 1 with --quick). "
                        "On a machine shared with other busy processes, 1 avoids the "
                        "thread oversubscription that makes every step erratic")
    p.add_argument("--seed", type=int, default=0)
    return p


def size_options(p: argparse.ArgumentParser, **sizes: tuple[int, int]) -> None:
    """``--name`` options whose default depends on ``--quick``: name=(quick, full)."""
    for name, (quick, full) in sizes.items():
        p.add_argument(f"--{name.replace('_', '-')}", type=int, default=None,
                       help=f"default {full} ({quick} with --quick)")
    p.set_defaults(_sizes=sizes)


def run_main(p: argparse.ArgumentParser, run: Callable[[argparse.Namespace], dict],
             argv: Sequence[str] | None) -> dict:
    """Parse, fill the sizes left unset for the mode, and run under ``runtime``."""
    a = p.parse_args(argv)
    for name, (quick, full) in getattr(a, "_sizes", {}).items():
        if getattr(a, name) is None:
            setattr(a, name, quick if a.quick else full)
    with runtime(a.threads or (1 if a.quick else None)):
        return run(a)


@contextlib.contextmanager
def runtime(threads: int | None):
    """Within: ``threads`` torch intra-op threads (None: unchanged) and quiet libraries (the
    report must be the last stdout line). Everything is restored on exit, so that a
    benchmark's ``main`` can run inside another process (the smoke tests)."""
    prev_threads = torch.get_num_threads()
    names = ("lightning", "lightning.pytorch", "lightning.fabric", "transformers")
    prev_levels = {n: logging.getLogger(n).level for n in names}
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", module=r"lightning(\..*)?")
        warnings.filterwarnings("ignore", message=r".*does not have many workers.*")
        for n in names:
            logging.getLogger(n).setLevel(logging.ERROR)
        if threads:
            torch.set_num_threads(threads)
        try:
            yield
        finally:
            torch.set_num_threads(prev_threads)
            for n, level in prev_levels.items():
                logging.getLogger(n).setLevel(level)


def make_world(out_dir: str | Path, **sizes) -> FolderSource:
    """Write a small synthetic world into ``out_dir`` (SMALL_WORLD, overridable)."""
    write_world(WorldSizes(**{**SMALL_WORLD, **sizes}), out_dir)
    return FolderSource(out_dir)


def world_tokenizer(source: FolderSource):
    """The pipeline's word tokenizer over every text of the world (as ``build_base``)."""
    from vaa.pipeline.stages import world_texts  # heavy import (Hydra, Lightning)
    return build_word_tokenizer(world_texts(source), [str(i) for i in range(100)])


def arch(hidden_size: int = 128, layers: int = 2) -> ArchConfig:
    """An ArchConfig scaled from the default tiny model (hidden 128, 2 layers, 4 heads,
    MLP 2x): heads of width 32, MLP twice the hidden size."""
    heads = max(1, hidden_size // 32)
    return ArchConfig(hidden_size=hidden_size, num_hidden_layers=layers,
                      num_attention_heads=heads, num_key_value_heads=heads,
                      intermediate_size=2 * hidden_size)


def tiny_model(tokenizer, hidden_size: int = 128, layers: int = 2, seed: int = 0):
    return build_tiny_llama(arch(hidden_size, layers), tokenizer, seed=seed)


def interleaved(variants: dict[str, Callable[[], Any]], reps: int) -> dict[str, list[Any]]:
    """Run each variant once per repetition, in turn (A, B, A, B, ...); each call returns
    its own measurement (e.g. seconds per step). Returns the measurements per variant."""
    out: dict[str, list[Any]] = {k: [] for k in variants}
    for _ in range(reps):
        for name, fn in variants.items():
            gc.collect()
            out[name].append(fn())
    return out


def median(xs: Sequence[float]) -> float:
    return statistics.median(xs)


def machine_info() -> dict:
    return {"torch": torch.__version__, "threads": torch.get_num_threads(),
            "cpus": os.cpu_count(), "python": platform.python_version(),
            "machine": platform.machine()}


def emit(name: str, **figures) -> dict:
    """Print the report as ONE JSON line, the last line of stdout."""
    record = {"benchmark": name, **figures, "machine": machine_info()}
    sys.stderr.flush()
    sys.stdout.write(json.dumps(record) + "\n")
    sys.stdout.flush()
    return record


class Stopwatch:
    def __enter__(self):
        self.t0 = time.perf_counter()
        return self

    def __exit__(self, *exc):
        self.seconds = time.perf_counter() - self.t0
