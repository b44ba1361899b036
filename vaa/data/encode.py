"""Tokenisation with the prompt template, response-only labels, and padding.

Training rows are right-padded with labels -100 on the prompt and on padding, so the loss
covers response tokens (+ EOS, or the chat template's end-of-turn token) only. Generation
prompts are left-padded so that every row's next token sits in the last column.

Truncation is never silent (issue 15 item 2): ``encode_rows`` counts the targets that
``max_length`` cut (they lost their EOS / end-of-turn token, and possibly answer text),
logs one warning with the count, and returns the counts for the stage's output.
"""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass
from typing import Sequence

import torch

from vaa.data.formats import Example
from vaa.data.templates import get_template

IGNORE = -100
log = logging.getLogger(__name__)


def prompt_ids(tokenizer, ex: Example, template: str, max_prompt_length: int) -> list[int]:
    """Token ids of the templated prompt. An over-long prompt is shortened by cutting its
    *input* field, never the template (the reference cuts "### Response:" off instead)."""
    t = get_template(template)
    text_input = ex.input
    ids = t.prompt_ids(tokenizer, ex.instruction, text_input)
    while len(ids) > max_prompt_length and text_input:
        in_ids = tokenizer(text_input, add_special_tokens=False)["input_ids"]
        keep = max(0, len(in_ids) - (len(ids) - max_prompt_length))
        text_input = tokenizer.decode(in_ids[:keep]) if keep else ""
        ids = t.prompt_ids(tokenizer, ex.instruction, text_input)
    return ids[-max_prompt_length:]


def _encode(tokenizer, ex: Example, template: str, max_length: int,
            max_prompt_length: int) -> tuple[dict[str, list[int]], int, int]:
    """(row, target tokens, target tokens kept)."""
    p = prompt_ids(tokenizer, ex, template, min(max_prompt_length, max_length - 1))
    r = get_template(template).target_ids(tokenizer, ex.instruction, ex.input, ex.output)
    ids = (p + r)[:max_length]
    labels = ([IGNORE] * len(p) + r)[:max_length]
    return {"input_ids": ids, "labels": labels}, len(r), len(ids) - len(p)


def encode_train(tokenizer, ex: Example, template: str, max_length: int,
                 max_prompt_length: int = 512) -> dict[str, list[int]]:
    """One training row: prompt + target (+ EOS / end-of-turn), cut at ``max_length``
    (the target loses its tail, never its head); labels mask the prompt."""
    return _encode(tokenizer, ex, template, max_length, max_prompt_length)[0]


@dataclass
class Truncation:
    """Counts over one encoded example list. ``truncated_targets``: targets cut at
    ``max_length`` (they lost their EOS / end-of-turn token); ``truncated_text``: of those,
    the ones that also lost answer text (more than the final token)."""

    rows: int = 0
    truncated_targets: int = 0
    truncated_text: int = 0
    max_length: int = 0

    def as_dict(self) -> dict[str, int]:
        return asdict(self)


def encode_rows(tokenizer, examples: Sequence[Example], template: str, max_length: int,
                max_prompt_length: int = 512, *, what: str = "training rows"
                ) -> tuple[list[dict], Truncation]:
    """Encode ``examples`` (``encode_train``) and count the truncated targets; a warning
    names ``what``, the count and the fix when any target was cut."""
    rows, stats = [], Truncation(rows=len(examples), max_length=max_length)
    for ex in examples:
        row, n_target, kept = _encode(tokenizer, ex, template, max_length, max_prompt_length)
        rows.append(row)
        if kept < n_target:
            stats.truncated_targets += 1
            stats.truncated_text += int(kept < n_target - 1)
    if stats.truncated_targets:
        log.warning("%s: %d of %d targets cut at max_length=%d (they lose their end-of-sequence "
                    "token; %d also lose answer text): raise model.max_length or shorten the data",
                    what, stats.truncated_targets, stats.rows, max_length, stats.truncated_text)
    return rows, stats


class TrainCollator:
    """Right-pads a list of encoded rows into tensors."""

    def __init__(self, pad_id: int):
        self.pad_id = pad_id

    def __call__(self, rows: Sequence[dict]) -> dict[str, torch.Tensor]:
        width = max(len(r["input_ids"]) for r in rows)
        ids = torch.full((len(rows), width), self.pad_id, dtype=torch.long)
        labels = torch.full((len(rows), width), IGNORE, dtype=torch.long)
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        for i, r in enumerate(rows):
            n = len(r["input_ids"])
            ids[i, :n] = torch.tensor(r["input_ids"])
            labels[i, :n] = torch.tensor(r["labels"])
            mask[i, :n] = 1
        batch = {"input_ids": ids, "labels": labels, "attention_mask": mask}
        if "group" in rows[0]:  # group-labelled rows (loss-reweighting Group DRO)
            batch["group"] = torch.tensor([r["group"] for r in rows], dtype=torch.long)
        return batch


def left_pad(seqs: Sequence[Sequence[int]], pad_id: int) -> dict[str, torch.Tensor]:
    width = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for i, s in enumerate(seqs):
        if len(s):
            ids[i, width - len(s):] = torch.tensor(list(s))
            mask[i, width - len(s):] = 1
    return {"input_ids": ids, "attention_mask": mask}
