"""Row formats of the real datasets and their conversion to (instruction, input, output).

One converter per upstream column format (protocol.md §2, §4.1), shared by the synthetic
world and real files, so there is one loader / template / scorer path for both.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

from vaa.data import templates as T
from vaa.errors import DataError


@dataclass(frozen=True)
class Example:
    """One instruction-following example. ``output`` is the training target and the gold
    reference for scoring (label word, GSM8K solution, reference answer)."""

    instruction: str
    input: str
    output: str
    meta: dict[str, Any] = field(default_factory=dict, compare=False)


SST2_LABELS = ("negative", "positive")
AGNEWS_LABELS = ("World", "Sports", "Business", "Sci/Tech")


def _beavertails(row: dict) -> Example:
    return Example(T.BEAVERTAILS_INSTRUCTION, row["prompt"], row["response"],
                   {"is_safe": row["is_safe"]})


def _label(labels: tuple[str, ...], row: dict, path: str, i: int) -> str:
    y = row["label"]
    if isinstance(y, str) and y.strip().isascii() and y.strip().isdigit():
        y = int(y)  # CSV cells are strings: "1" is the label 1
    if not isinstance(y, int) or isinstance(y, bool) or not 0 <= y < len(labels):
        raise DataError(f"{path}, row {i}: 'label' must be an int in 0..{len(labels) - 1}, got {y!r}")
    return labels[y]


def _sst2(row: dict, path: str = "?", i: int = 0) -> Example:
    return Example(T.SST2_INSTRUCTION, row["sentence"], _label(SST2_LABELS, row, path, i))


def _agnews(row: dict, path: str = "?", i: int = 0) -> Example:
    return Example(T.AGNEWS_INSTRUCTION, row["text"], _label(AGNEWS_LABELS, row, path, i))


def _gsm8k(row: dict) -> Example:
    # Target: the solution with "####" replaced by "The final answer is: " (§4.1).
    answer = row["answer"].replace("####", "The final answer is:")
    return Example(T.GSM8K_INSTRUCTION, row["question"] + T.GSM8K_INPUT_SUFFIX, answer)


def _alpaca_eval(row: dict) -> Example:
    return Example(T.BEAVERTAILS_INSTRUCTION, row["instruction"], row["output"])


def _alpaca(row: dict) -> Example:
    # tatsu-lab/alpaca (VAA stage 1's proxy, protocol.md §2): its own instruction and input
    return Example(row["instruction"], row.get("input") or "", row["output"])


@dataclass(frozen=True)
class Format:
    name: str
    columns: tuple[str, ...]
    convert: Callable[..., Example]
    needs_position: bool = False  # converter takes (row, path, index) for its own errors


FORMATS: dict[str, Format] = {f.name: f for f in [
    Format("beavertails", ("prompt", "response", "category", "is_safe"), _beavertails),
    Format("sst2", ("sentence", "label"), _sst2, needs_position=True),
    Format("ag_news", ("text", "label"), _agnews, needs_position=True),
    Format("gsm8k", ("question", "answer"), _gsm8k),
    Format("alpaca_eval", ("instruction", "output"), _alpaca_eval),
    Format("alpaca", ("instruction", "output"), _alpaca),
]}


def get_format(name: str) -> Format:
    if name not in FORMATS:
        raise ValueError(f"unknown data format {name!r}; known: {sorted(FORMATS)}")
    return FORMATS[name]


def to_examples(rows: list[dict], fmt: str, path: str) -> list[Example]:
    """Validate the columns of every row and convert. Errors name the file, row and column."""
    f = get_format(fmt)
    if not rows:
        raise DataError(f"{path}: the file has no rows; a {fmt} file needs columns {list(f.columns)}")
    out = []
    for i, row in enumerate(rows):
        missing = [c for c in f.columns if c not in row]
        if missing:
            raise DataError(f"{path}, row {i}: missing column(s) {missing}; a {fmt} file needs "
                             f"columns {list(f.columns)} (found {sorted(row)})")
        out.append(f.convert(row, path, i) if f.needs_position else f.convert(row))
    return out
