"""Batched greedy generation with a KV cache and left padding (protocol.md §5).

Prompts are sorted by length before batching so that a batch pads little; results come
back in the input order. Only the newly generated tokens are decoded.
"""

from __future__ import annotations

from typing import Sequence

import torch
from rich.progress import Progress

from vaa.data.encode import left_pad


@torch.no_grad()
def generate(model, tokenizer, prompts: Sequence[Sequence[int]], *, max_new_tokens: int,
             batch_size: int = 64, description: str = "generating", progress: bool = True) -> list[str]:
    """Greedy continuations of tokenised ``prompts`` (lists of ids), decoded, in order."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
    out: list[str] = [""] * len(prompts)
    with Progress(disable=not progress, transient=True) as bar:
        task = bar.add_task(description, total=len(prompts))
        for start in range(0, len(order), batch_size):
            idx = order[start:start + batch_size]
            batch = left_pad([prompts[i] for i in idx], tokenizer.pad_token_id)
            batch = {k: v.to(device) for k, v in batch.items()}
            gen = model.generate(**batch, max_new_tokens=max_new_tokens, do_sample=False,
                                 use_cache=True, pad_token_id=tokenizer.pad_token_id,
                                 eos_token_id=tokenizer.eos_token_id)
            new = gen[:, batch["input_ids"].shape[1]:]
            for i, text in zip(idx, tokenizer.batch_decode(new, skip_special_tokens=True)):
                out[i] = text
            bar.advance(task, len(idx))
    model.train(was_training)
    return out
