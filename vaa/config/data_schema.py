"""Typed schemas of the ``data`` group (``data=synthetic``, ``data=hf``, ``data=real_files``)
and of the extra data streams (``extra_data.<name>``), registered by
:func:`vaa.config.schema.register` like every other group's. Real datasets: protocol.md §2
(the upstream tables and their slices); the synthetic world's sizes: vaa.world.generator.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

from vaa.world.generator import WorldSizes


@dataclass
class SyntheticDataConfig(WorldSizes):
    """Sizes of the synthetic world; the defaults live in ``WorldSizes`` (one source)."""

    name: str = "synthetic"


@dataclass
class SplitConfig:
    file: str = "train"  # logical name, resolved by the data source
    start: int = 0
    stop: Optional[int] = None


@dataclass
class TableSource:
    """One upstream table (protocol.md §2): a local file (``path``: json, jsonl, csv or
    parquet with the upstream columns; relative paths are under ``data.root``) or, when
    ``path`` is null, the Hugging Face dataset ``hub`` (``config``, ``split``, ``revision``)."""

    hub: Optional[str] = None
    config: Optional[str] = None
    split: str = "train"
    revision: Optional[str] = None
    path: Optional[str] = None


@dataclass
class RowSlice:
    start: int = 0
    stop: Optional[int] = None


def _table(hub: str, split: str, config: Optional[str] = None):
    return field(default_factory=lambda: TableSource(hub=hub, split=split, config=config))


def _rows(start: int, stop: Optional[int]):
    return field(default_factory=lambda: RowSlice(start, stop))


@dataclass
class RealDataConfig(SyntheticDataConfig):
    """Real datasets (vaa.data.hub): the data stage draws the protocol's slices from the
    upstream tables and writes them in the synthetic world's layout, with a ``uid`` per row.
    Slices of BeaverTails count rows of one kind in table order (safe rows for ``align_rows``,
    unsafe rows for the harmful slices and the HS prompts); all are asserted disjoint.
    The world's size fields are inherited so that presets written for either compose
    (experiment=smoke data=real_files); real data reads only ``task_train`` / ``task_test``
    (AlpacaEval's split, conf/task/alpacaeval.yaml) and ``seed`` of them."""

    name: str = "hf"
    root: Optional[str] = None  # folder of the local files (relative `path`s)
    beavertails_train: TableSource = _table("PKU-Alignment/BeaverTails", "30k_train")
    beavertails_test: TableSource = _table("PKU-Alignment/BeaverTails", "30k_test")
    refusals: TableSource = _table("anonymous4486/repnoise_beavertail", "train")
    sst2_train: TableSource = _table("stanfordnlp/sst2", "train")
    sst2_validation: TableSource = _table("stanfordnlp/sst2", "validation")
    ag_news_train: TableSource = _table("fancyzhx/ag_news", "train")
    ag_news_test: TableSource = _table("fancyzhx/ag_news", "test")
    gsm8k_train: TableSource = _table("openai/gsm8k", "train", "main")
    gsm8k_test: TableSource = _table("openai/gsm8k", "test", "main")
    alpaca_eval: TableSource = _table("tatsu-lab/alpaca_eval", "eval", "alpaca_eval")
    alpaca: TableSource = _table("tatsu-lab/alpaca", "train")  # VAA stage 1's proxy (alpaca/train)
    alpaca_stand_in_rows: RowSlice = _rows(0, 0)  # no Alpaca table: these AlpacaEval rows instead
    # beavertails (safe rows, `reference`) | refusals (`paper`) | beavertails_refusals (safe rows
    # whose response is a refusal by keyword list `refusal_keywords`: what a keyword judge sees)
    align_source: str = "beavertails"
    refusal_keywords: str = "A"  # A | B (vaa.eval.judges), for align_source=beavertails_refusals
    hs_overlap: str = "redraw"  # a training row with an HS prompt's text: redraw (align) | drop
    align_rows: RowSlice = _rows(0, 2000)
    harmful_rows: RowSlice = _rows(0, 100)  # the attack's poison pool
    proxy_rows: RowSlice = _rows(100, 200)  # VAA stage 1's proxy poison
    align_harmful_rows: RowSlice = _rows(-1000, None)  # Booster / RepNoise harmful set
    hs_rows: RowSlice = _rows(0, 1000)  # unsafe rows of beavertails_test
    hs_dedup: bool = False  # keep the first row per HS prompt (protocol.md §3.4)
    base_rows: RowSlice = _rows(0, 0)  # beavertails_train rows for a tiny model's base corpus
    fa_test: str = "official"  # official (validation / test splits) | train_tail (last rows of train)
    fa_test_n: Optional[int] = None  # first n FA test rows (None: all)
    train_tail: int = 500
    task_rows: Optional[int] = None  # first n task train rows written (None: all but the tail)
    task_train: int = 683  # AlpacaEval: the first rows train (conf/task/alpacaeval.yaml) ...
    task_test: int = 122  # ... and the last rows test


@dataclass
class DataStreamConfig:
    """Rows of one extra data stream (``extra_data.<name>``): a dataset's split, sliced."""

    dataset: str = "beavertails"
    split: str = "align_harmful"
    format: str = "beavertails"
    start: int = 0
    stop: Optional[int] = None
