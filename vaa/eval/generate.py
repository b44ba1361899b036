"""Batched greedy generation with a KV cache and left padding (protocol.md §5).

Length bucketing: prompts are sorted by length before batching, so a batch holds prompts of
similar length and pads little; results come back in the input order. Each batch runs the lean
decoding loop of ``vaa.eval.greedy`` (a preallocated KV cache, finished rows leave the batch,
the loop ends when every row has stopped). Only the newly generated tokens are decoded, up to
the first stop token: EOS, and for ``template=chat`` the end-of-turn token
(``vaa.data.templates.stop_ids``).

Progress: a bar on a terminal; with ``vaa.training.progress`` (non-terminal runs) one line per
batch at that module's cadence.
"""

from __future__ import annotations

from typing import Sequence

import torch

from vaa.data.encode import left_pad
from vaa.eval.greedy import greedy_batch

try:  # the progress helper of training/progress.py (terminal bar or log lines)
    from vaa.training.progress import ProgressLine
except ImportError:  # pragma: no cover - progress lines not available
    ProgressLine = None


def length_buckets(prompts: Sequence[Sequence[int]], batch_size: int) -> list[list[int]]:
    """Indices of ``prompts`` in batches of at most ``batch_size``, sorted by length (stable:
    equal lengths keep their input order)."""
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
    return [order[s:s + batch_size] for s in range(0, len(order), max(1, batch_size))]


@torch.no_grad()
def generate(model, tokenizer, prompts: Sequence[Sequence[int]], *, max_new_tokens: int,
             batch_size: int = 64, description: str = "generating", progress: bool = True,
             stop_ids: Sequence[int] | None = None) -> list[str]:
    """Greedy continuations of tokenised ``prompts`` (lists of ids), decoded, in order.

    ``stop_ids``: tokens that end an answer (default: the tokenizer's EOS). Raises
    ValueError when the tokenizer has no PAD token (left padding needs one)."""
    if tokenizer.pad_token_id is None:
        raise ValueError("the tokenizer has no PAD token: set model.pad_token (add or eos)")
    stops = list(stop_ids) if stop_ids else [tokenizer.eos_token_id]
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    out: list[str] = [""] * len(prompts)
    with _progress(progress, description, len(prompts)) as advance:
        for idx in length_buckets(prompts, batch_size):
            batch = left_pad([prompts[i] for i in idx], tokenizer.pad_token_id)
            new = greedy_batch(model, batch["input_ids"].to(device),
                               batch["attention_mask"].to(device),
                               max_new_tokens=max_new_tokens, stop_ids=stops)
            for i, text in zip(idx, tokenizer.batch_decode(new, skip_special_tokens=True)):
                out[i] = text
            advance(len(idx))
    model.train(was_training)
    return out


class _progress:
    """``advance(n)`` after each batch: a ProgressLine when available, else a rich bar."""

    def __init__(self, enabled: bool, description: str, total: int):
        self.enabled, self.description, self.total = enabled, description, total

    def __enter__(self):
        if not self.enabled:
            self._ctx = None
            return lambda n: None
        if ProgressLine is not None:
            self._ctx = ProgressLine(self.description, total=self.total, unit="prompt")
            line = self._ctx.__enter__()
            return line.update
        from rich.progress import Progress
        self._ctx = Progress(transient=True)
        bar = self._ctx.__enter__()
        task = bar.add_task(self.description, total=self.total)
        return lambda n: bar.advance(task, n)

    def __exit__(self, *exc):
        if self._ctx is not None:
            return self._ctx.__exit__(*exc)
        return False
