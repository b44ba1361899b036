"""Gradient helpers of the SAM step (:mod:`vaa.methods.perturb`): the trainable parameters,
the global gradient norm, and stashing / mixing gradients for VAA's weighted mixing.

specs/vaa.md §3.3-3.4: ``grad_norm`` is ‖g‖ of ε = ρ·g/(‖g‖₂ + 1e-7), the global L2 norm over
every tensor that has a gradient (accumulated in float32); ``stash_grads`` keeps the clean
gradient G0 before the perturbed backward overwrites ``.grad`` with G1, and ``mix_grads`` forms
G = (1−λ)·G0 + λ·G1 in place (``weighted`` mixing, one gradient-sized buffer, vaa.md §5).
Distributed training: see :func:`grad_norm` (DDP needs no communication; FSDP shards need the
caller's all-reduce).
"""

from __future__ import annotations

from typing import Iterable, Optional, Sequence

import torch
from torch import Tensor, nn
from torch.utils.weak import WeakTensorKeyDictionary


def trainable_params(model: nn.Module) -> list[nn.Parameter]:
    """Parameters with ``requires_grad``, each once (tied weights are shared, not repeated).

    Full fine-tuning: every parameter. LoRA (peft): only the adapter parameters, because peft
    freezes the base model.
    """
    return [p for p in model.parameters() if p.requires_grad]


@torch.no_grad()
def grad_norm(params: Iterable[Tensor]) -> Tensor:
    """Global L2 norm of the ``.grad`` of ``params`` (those with a gradient), as a float32
    0-dim tensor. Every per-tensor norm is accumulated in float32, also for bf16 gradients.

    DDP: call after ``backward`` returns (gradients already all-reduced), every rank gets the
    same value. FSDP / sharded gradients: this is the local shard's norm; the caller must sum
    the squares across ranks (``dist.all_reduce(n**2)`` then ``sqrt``).
    """
    return global_norm([p.grad for p in params])


def global_norm(tensors: Sequence[Optional[Tensor]]) -> Tensor:
    """Global L2 norm of ``tensors`` (``None`` entries skipped) as a float32 0-dim tensor,
    every per-tensor norm accumulated in float32; 0 if there is none."""
    norms = [torch.linalg.vector_norm(t, 2, dtype=torch.float32) for t in tensors if t is not None]
    if not norms:
        return torch.zeros((), dtype=torch.float32)
    if len({n.device for n in norms}) > 1:
        norms = [n.cpu() for n in norms]
    return torch.linalg.vector_norm(torch.stack(norms), 2)


_STASH = WeakTensorKeyDictionary()  # param -> reusable gradient buffer (default of stash_grads)


@torch.no_grad()
def stash_grads(params: Iterable[Tensor],
                out: Optional[list[Optional[Tensor]]] = None) -> list[Optional[Tensor]]:
    """Copies of the current ``.grad`` of ``params`` (``None`` where a param has no gradient).

    The copies live in reusable buffers: ``out`` (a list filled in place, reused when shapes and
    dtypes match) or, by default, one buffer per parameter kept for the parameter's lifetime.
    So the returned tensors are overwritten by the next ``stash_grads`` on the same params (and
    scaled in place by :func:`mix_grads`); ``.clone()`` them to keep them longer. Memory: one
    gradient-sized buffer (vaa.md §5, weighted mixing).
    """
    params = list(params)
    if out is not None and len(out) != len(params):
        raise ValueError(f"out has {len(out)} entries for {len(params)} params")
    result: list[Optional[Tensor]] = []
    for i, p in enumerate(params):
        g = p.grad
        if g is None:
            result.append(None)
            continue
        buf = out[i] if out is not None else _STASH.get(p)
        if buf is None or buf.shape != g.shape or buf.dtype != g.dtype or buf.device != g.device:
            buf = torch.empty_like(g, memory_format=torch.preserve_format)
            if out is not None:
                out[i] = buf
            else:
                _STASH[p] = buf
        buf.copy_(g)
        result.append(buf)
    return result


@torch.no_grad()
def mix_grads(params: Iterable[Tensor], stashed: Sequence[Optional[Tensor]], lam: float) -> None:
    """``p.grad ← (1 − λ)·stashed + λ·p.grad`` for every param (vaa.md §3.4 ``weighted``).

    Computed as ``round((1−λ)·G0) + round(λ·G1)`` in the gradient's dtype, i.e. exactly what
    ``(1 - lam) * g0 + lam * g1`` gives, without a new allocation: ``stashed`` is scaled in place
    (its contents are consumed). A missing gradient counts as zero on that side.
    """
    params = list(params)
    if len(stashed) != len(params):
        raise ValueError(f"stashed has {len(stashed)} entries for {len(params)} params")
    lam = float(lam)
    for p, g0 in zip(params, stashed):
        if p.grad is None:
            if g0 is not None:
                p.grad = g0.mul(1 - lam)
            continue
        p.grad.mul_(lam)
        if g0 is not None:
            p.grad.add_(g0.mul_(1 - lam))


def is_sharded(module) -> bool:
    """Whether the module trains under a strategy that shards parameters and gradients (FSDP,
    Lightning's ModelParallelStrategy): each rank's ``.grad`` then holds only its shard."""
    trainer = getattr(module, "_trainer", None)
    if trainer is None:
        return False
    name = type(trainer.strategy).__name__
    return "FSDP" in name or "ModelParallel" in name


@torch.no_grad()
def sharded_norm(tensors: Sequence[Optional[Tensor]], sharded: bool) -> Tensor:
    """Global L2 norm of ``tensors``; with ``sharded`` each rank holds a disjoint shard, so the
    squared local norms are summed over ranks (``all_reduce``) before the square root — the
    per-shard norm that ``clip_grad_norm_`` gives on local FSDP shards is wrong."""
    local = global_norm(tensors)
    if not sharded or not torch.distributed.is_available() or not torch.distributed.is_initialized():
        return local
    sq = local.square().to(next((t.device for t in tensors if t is not None), local.device))
    torch.distributed.all_reduce(sq, op=torch.distributed.ReduceOp.SUM)
    return sq.sqrt().cpu()


@torch.no_grad()
def clip_global_(params: Sequence[Tensor], max_norm: float, sharded: bool = False) -> Tensor:
    """Scale the ``.grad`` of ``params`` in place so that their global L2 norm is at most
    ``max_norm`` (``torch.nn.utils.clip_grad_norm_`` semantics, coefficient
    ``max_norm / (norm + 1e-6)`` capped at 1); with ``sharded`` the norm is the all-reduced
    one (:func:`sharded_norm`). Returns the pre-clip norm (float32 0-dim)."""
    if not sharded:
        return torch.nn.utils.clip_grad_norm_(params, max_norm)
    grads = [p.grad for p in params if p.grad is not None]
    norm = sharded_norm(grads, True)
    coef = float(max_norm) / (float(norm) + 1e-6)
    if coef < 1.0:
        torch._foreach_mul_(grads, coef)
    return norm
