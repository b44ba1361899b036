"""Hidden-state hooks, architecture-agnostic (baselines.md §9): the modules to perturb or
read are found by a name pattern over ``named_modules()`` and checked against the model's
config (one per decoder layer, ``config.num_hidden_layers``), never by class name.

The reference selects attention modules by class (``LlamaAttention``) and on Qwen2 silently
finds none, then crashes in the norm (baselines.md §2). The default patterns
(``layers.<i>.self_attn`` and ``layers.<i>.mlp``) match Llama, Qwen2, Mistral and Gemma
style models, also inside a peft wrapper (``base_model.model.model.layers.0.self_attn``).

- :func:`layer_modules`: the matching modules, in layer order, or a clear error.
- :class:`CaptureOutputs`: keeps each module's output hidden state (the first element of an
  output tuple) from the next forward; ``.outputs`` in layer order.
- :class:`AddToOutputs`: adds a fixed tensor to each module's output hidden state.

Both are context managers that always remove their hooks. A forward hook that fires again
during gradient-checkpoint recomputation overwrites the same slot (capture) or adds the same
ε (add), so both are idempotent per forward.
"""

from __future__ import annotations

import re
from typing import Sequence

import torch
from torch import nn

ATTENTION = r"(^|\.)layers\.\d+\.self_attn$"
MLP = r"(^|\.)layers\.\d+\.mlp$"


def num_layers(model: nn.Module) -> int | None:
    cfg = getattr(model, "config", None)
    cfg = getattr(cfg, "get_text_config", lambda: cfg)() if cfg is not None else None
    return getattr(cfg, "num_hidden_layers", None)


def layer_modules(model: nn.Module, pattern: str) -> list[nn.Module]:
    """Modules whose qualified name matches ``pattern``, one per decoder layer, in layer order.

    Raises ``ValueError`` when nothing matches or when the count differs from the config's
    ``num_hidden_layers`` (a pattern that silently matched a subset would perturb only part
    of the model)."""
    rx = re.compile(pattern)
    found = [(name, m) for name, m in model.named_modules() if rx.search(name)]
    expected = num_layers(model)
    if not found:
        raise ValueError(f"no module of {type(model).__name__} matches {pattern!r}; set the "
                         "method's layer pattern (e.g. method.attn_pattern) to the name of the "
                         "per-layer attention / MLP block of this architecture")
    if expected is not None and len(found) != expected:
        names = [n for n, _ in found][:4]
        raise ValueError(f"{pattern!r} matches {len(found)} modules ({names} …) but the model has "
                         f"{expected} layers (config.num_hidden_layers); narrow the pattern")
    return [m for _, m in found]


def _hidden(output):
    return output[0] if isinstance(output, (tuple, list)) else output


def _replace_hidden(output, hidden):
    if isinstance(output, tuple):
        return (hidden,) + tuple(output[1:])
    if isinstance(output, list):
        return [hidden] + list(output[1:])
    return hidden


class _Hooks:
    """Forward hooks registered on entry (``_handles``), always removed on exit."""

    _handles: list

    def __exit__(self, *exc) -> bool:
        for h in self._handles:
            h.remove()
        self._handles.clear()
        return False


class CaptureOutputs(_Hooks):
    """``with CaptureOutputs(modules) as cap: loss = f(...)`` → ``cap.outputs[l]`` is module
    l's output hidden state (part of the autograd graph: take ``torch.autograd.grad`` of the
    loss w.r.t. it, or read it as an activation)."""

    def __init__(self, modules: Sequence[nn.Module]):
        self.modules = list(modules)
        self.outputs: list[torch.Tensor | None] = [None] * len(self.modules)
        self._handles: list = []

    def __enter__(self) -> "CaptureOutputs":
        for i, m in enumerate(self.modules):
            def hook(_mod, _args, output, i=i):
                self.outputs[i] = _hidden(output)
            self._handles.append(m.register_forward_hook(hook))
        return self


class AddToOutputs(_Hooks):
    """``with AddToOutputs(modules, deltas): ...`` → each module's output hidden state h
    becomes h + deltas[l] (deltas broadcast to h's shape; ``None`` leaves a module alone).

    ``measure=True``: on each module's first forward, the realised delta (h + d) − h in h's
    dtype is compared with d: ``realised_norm`` (global L2 over modules) and ``realised_cos``
    after the forward — in bf16 a small ε rounds away (vaa.methods.precision)."""

    def __init__(self, modules: Sequence[nn.Module], deltas: Sequence[torch.Tensor | None],
                 measure: bool = False):
        if len(deltas) != len(modules):
            raise ValueError(f"{len(deltas)} deltas for {len(modules)} modules")
        self.modules, self.deltas = list(modules), list(deltas)
        self.measure = measure
        self._sums: dict[int, tuple[float, float, float]] = {}  # module → (‖r‖², r·d, ‖d‖²)
        self._handles: list = []

    @property
    def realised_norm(self) -> float:
        return sum(v[0] for v in self._sums.values()) ** 0.5

    @property
    def realised_cos(self) -> float:
        dot = sum(v[1] for v in self._sums.values())
        denom = self.realised_norm * sum(v[2] for v in self._sums.values()) ** 0.5
        return dot / denom if denom > 0 else float("nan")

    def _record(self, i: int, h: torch.Tensor, out: torch.Tensor, d: torch.Tensor) -> None:
        with torch.no_grad():
            r = out.detach().float() - h.detach().float()
            df = d.detach().float().expand_as(r)
            self._sums[i] = (float(r.square().sum()), float((r * df).sum()), float(df.square().sum()))

    def __enter__(self) -> "AddToOutputs":
        for i, (m, d) in enumerate(zip(self.modules, self.deltas)):
            if d is None:
                continue

            def hook(_mod, _args, output, d=d, i=i):
                h = _hidden(output)
                out = h + d.to(h.dtype)
                if self.measure and i not in self._sums:
                    self._record(i, h, out, d)
                return _replace_hidden(output, out)
            self._handles.append(m.register_forward_hook(hook))
        return self
