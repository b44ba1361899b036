"""One batch of greedy decoding: a lean loop over a Hugging Face causal LM (issue 11 item 8).

Same tokens as ``model.generate(do_sample=False)`` — prefill with left padding and position ids
``cumsum(mask) - 1``, then one token per step through a KV cache — with less work per step:

* the KV cache is a preallocated buffer per layer (:class:`BufferLayer`): a step writes one
  column instead of concatenating the whole cache (``DynamicLayer`` copies every layer's keys
  and values at every step, memory traffic that grows with the batch and the length);
* rows that have stopped leave the batch: when at least ``evict_fraction`` of the rows still
  running have emitted a stop token, the finished ones are dropped from the inputs and from the
  cache, so the remaining steps compute only rows that still generate;
* the loop ends as soon as every row has stopped; its only host synchronisation per step is
  the count of rows that stopped at that step (needed to decide both);
* the prefill computes logits for the last position only (``logits_to_keep=1``); attention is
  the model's own (SDPA unless configured otherwise).

A row's result depends only on its own prompt: eviction removes whole rows, and masking makes
left padding invisible up to floating-point summation order (tests compare batched with
one-prompt-at-a-time greedy outputs).

Models this loop cannot drive (no ``config``, e.g. a stub in a test) fall back to
``model.generate``.
"""

from __future__ import annotations

import inspect
from typing import Sequence

import torch

try:  # transformers >= 4.56: per-layer cache objects
    from transformers.cache_utils import DynamicCache, DynamicLayer
except ImportError:  # pragma: no cover - older transformers
    from transformers.cache_utils import DynamicCache
    DynamicLayer = None


if DynamicLayer is not None:
    class BufferLayer(DynamicLayer):
        """A full-attention layer cache in a buffer of ``capacity`` positions: ``update``
        writes the new columns and returns views of the filled part (no copy)."""

        def __init__(self, capacity: int):
            super().__init__()
            self.capacity, self.length = capacity, 0

        def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
            b, h, _, d = key_states.shape
            self.device = key_states.device
            self.kbuf = key_states.new_empty(b, h, self.capacity, d)
            self.vbuf = value_states.new_empty(b, value_states.shape[1], self.capacity, value_states.shape[-1])
            self.is_initialized = True

        def update(self, key_states, value_states, *args, **kwargs):
            if not self.is_initialized:
                self.lazy_initialization(key_states, value_states)
            n = key_states.shape[-2]
            if self.length + n > self.capacity:
                raise RuntimeError(f"KV buffer of {self.capacity} positions overflows at {self.length + n}")
            self.kbuf[:, :, self.length:self.length + n] = key_states
            self.vbuf[:, :, self.length:self.length + n] = value_states
            self.length += n
            self.keys = self.kbuf[:, :, :self.length]
            self.values = self.vbuf[:, :, :self.length]
            return self.keys, self.values

        def get_seq_length(self) -> int:
            return self.length

        def batch_select_indices(self, indices: torch.Tensor) -> None:
            if self.is_initialized:
                self.kbuf, self.vbuf = self.kbuf[indices], self.vbuf[indices]
                self.keys = self.kbuf[:, :, :self.length]
                self.values = self.vbuf[:, :, :self.length]


def _cache(model, capacity: int):
    """A DynamicCache whose plain full-attention layers are :class:`BufferLayer` s."""
    try:
        cache = DynamicCache(config=model.config)
    except TypeError:  # pragma: no cover - older signature
        return DynamicCache()
    layers = getattr(cache, "layers", None)
    if DynamicLayer is not None and layers:
        cache.layers = [BufferLayer(capacity) if type(layer) is DynamicLayer else layer
                        for layer in layers]
    return cache


def _forward_kwargs(model) -> tuple[str, bool]:
    params = inspect.signature(model.forward).parameters
    cache_kw = "cache" if "cache" in params else "past_key_values"
    return cache_kw, "logits_to_keep" in params


def lean_supported(model) -> bool:
    return hasattr(model, "config") and hasattr(model, "forward") and \
        "position_ids" in inspect.signature(model.forward).parameters


@torch.no_grad()
def greedy_batch(model, input_ids: torch.Tensor, attention_mask: torch.Tensor, *,
                 max_new_tokens: int, stop_ids: Sequence[int], evict_fraction: float = 0.125
                 ) -> list[list[int]]:
    """Greedy continuations of one left-padded batch.

    ``input_ids``, ``attention_mask``: (B, L) long, on the model's device, left-padded.
    Returns B lists of new token ids, each ending before its first stop token (the stop token
    itself is not returned) or after ``max_new_tokens`` tokens.
    """
    b = input_ids.shape[0]
    if max_new_tokens <= 0 or b == 0:
        return [[] for _ in range(b)]
    if callable(getattr(model, "get_base_model", None)):  # peft: its adapters live in the base model
        model = model.get_base_model()
    if not lean_supported(model):
        return _hf_generate(model, input_ids, attention_mask, max_new_tokens, stop_ids)
    device = input_ids.device
    cache_kw, keep_kw = _forward_kwargs(model)
    cache = _cache(model, input_ids.shape[1] + max_new_tokens)
    stops = torch.tensor(sorted(set(stop_ids)), device=device, dtype=torch.long)
    mask = attention_mask.long()
    pos = (mask.cumsum(-1) - 1).masked_fill(mask == 0, 0)
    extra = {"logits_to_keep": 1} if keep_kw else {}
    out = model(input_ids=input_ids, attention_mask=mask, position_ids=pos, use_cache=True,
                **{cache_kw: cache}, **extra)
    tokens = torch.full((b, max_new_tokens), -1, dtype=torch.long, device=device)
    rows = torch.arange(b, device=device)       # batch row -> original row
    next_pos = pos[:, -1] + 1
    stopped = torch.zeros(b, dtype=torch.bool, device=device)
    n_stopped = 0                               # rows of the current batch that have stopped
    for t in range(max_new_tokens):
        nxt = out.logits[:, -1].argmax(-1)
        tokens[rows, t] = torch.where(stopped, -1, nxt)
        stopped |= torch.isin(nxt, stops)
        if t == max_new_tokens - 1:
            break
        n_stopped = int(stopped.sum())          # the step's one host sync
        if n_stopped == rows.shape[0]:
            break
        if n_stopped and n_stopped >= evict_fraction * rows.shape[0]:
            keep = (~stopped).nonzero().squeeze(1)
            rows, nxt, mask, next_pos = rows[keep], nxt[keep], mask[keep], next_pos[keep]
            cache.batch_select_indices(keep)
            stopped = stopped[keep]
        mask = torch.cat([mask, mask.new_ones(mask.shape[0], 1)], dim=1)
        out = model(input_ids=nxt[:, None], attention_mask=mask, position_ids=next_pos[:, None],
                    use_cache=True, **{cache_kw: cache})  # the cache is updated in place
        next_pos = next_pos + 1
    return _until_stop(tokens.tolist(), set(stop_ids))


def _until_stop(rows: list[list[int]], stops: set[int]) -> list[list[int]]:
    out = []
    for r in rows:
        cut = []
        for tok in r:
            if tok < 0 or tok in stops:
                break
            cut.append(tok)
        out.append(cut)
    return out


def _hf_generate(model, input_ids, attention_mask, max_new_tokens, stop_ids) -> list[list[int]]:
    pad = getattr(getattr(model, "config", None), "pad_token_id", None)
    gen = model.generate(input_ids=input_ids, attention_mask=attention_mask,
                         max_new_tokens=max_new_tokens, do_sample=False, use_cache=True,
                         pad_token_id=pad if pad is not None else stop_ids[0],
                         eos_token_id=list(stop_ids))
    return _until_stop(gen[:, input_ids.shape[1]:].tolist(), set(stop_ids))
