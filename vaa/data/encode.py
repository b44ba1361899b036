"""Tokenisation with the prompt template, response-only labels, and padding.

Training rows are right-padded with labels -100 on the prompt and on padding, so the loss
covers response tokens (+ EOS) only. Generation prompts are left-padded so that every row's
next token sits in the last column.
"""

from __future__ import annotations

from typing import Sequence

import torch

from vaa.data.formats import Example
from vaa.data.templates import format_prompt

IGNORE = -100


def prompt_ids(tokenizer, ex: Example, template: str, max_prompt_length: int) -> list[int]:
    """Token ids of the templated prompt. An over-long prompt is shortened by cutting its
    *input* field, never the template (the reference cuts "### Response:" off instead)."""
    text_input = ex.input
    ids = tokenizer(format_prompt(ex.instruction, text_input, template))["input_ids"]
    while len(ids) > max_prompt_length and text_input:
        in_ids = tokenizer(text_input, add_special_tokens=False)["input_ids"]
        keep = max(0, len(in_ids) - (len(ids) - max_prompt_length))
        text_input = tokenizer.decode(in_ids[:keep]) if keep else ""
        ids = tokenizer(format_prompt(ex.instruction, text_input, template))["input_ids"]
    return ids[-max_prompt_length:]


def encode_train(tokenizer, ex: Example, template: str, max_length: int,
                 max_prompt_length: int = 512) -> dict[str, list[int]]:
    p = prompt_ids(tokenizer, ex, template, min(max_prompt_length, max_length - 1))
    r = tokenizer(ex.output, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    ids = (p + r)[:max_length]
    labels = ([IGNORE] * len(p) + r)[:max_length]
    return {"input_ids": ids, "labels": labels}


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
