"""Weight-space perturbation with exact restore: the SAM step shared by VAA, Booster and Panacea.

Sharpness-aware minimisation (P. Foret, A. Kleiner, H. Mobahi, B. Neyshabur, *Sharpness-Aware
Minimization for Efficiently Improving Generalization*, ICLR 2021), first-order form, as VAA's
stage 2 uses it (``specs/vaa.md`` §3.3): with g = ∇θ L0, the clean gradient of the batch over
every trainable parameter,

    ε = ρ · g / (‖g‖₂ + 1e-7)        ‖g‖ = global L2 norm over every tensor that has a gradient

then 1. save θ, 2. θ ← θ + ε, 3. forward/backward at θ + ε, 4. restore θ exactly, 5. let the
optimizer apply ∇ℓ(θ + ε) at θ. The perturbation lives in **weight space**; it is not Vaccine's
hidden-state perturbation (that is a forward-hook context, not this module).

Usage (one object per run, so the restore buffers are allocated once and reused every step;
``trainable_params``, ``stash_grads`` and ``mix_grads`` are in :mod:`vaa.methods.grads`)::

    sam = SAMPerturber(trainable_params(model), rho=0.4)          # restore="copy"
    loss0.backward()                                              # .grad = G0
    g0 = stash_grads(sam.params)                                  # weighted mixing only
    with sam.perturbed() as info:                                 # θ ← θ + ρ·G0/(‖G0‖+1e-7)
        model.zero_grad(set_to_none=False)
        loss1 = loss_fn(model, batch); loss1.backward()           # .grad = G1 = ∇ℓ(θ+ε)
    # here θ is bit-identical to before the ``with``; .grad still holds G1
    mix_grads(sam.params, g0, lam)                                # G = (1−λ)G0 + λG1
    log(info.eps_norm, info.grad_norm)                            # or sam.last_eps_norm

ε is computed from the gradients present **when the context is entered**; the body may zero or
overwrite them. Parameters whose direction is ``None`` (no ``.grad``) are neither perturbed nor
copied. The restore runs in ``__exit__``, so it also happens when the body raises.

Restore modes (``dro.sam.restore``, vaa.md §3.7):

- ``copy`` (default, exact): θ is copied into a preallocated buffer before the perturbation and
  copied back afterwards, bit-identical in any dtype. Needed because in bf16 (and in general in
  floating point) θ + ε − ε ≠ θ. Memory: one copy of the perturbed (= trainable, with a gradient)
  parameters; with LoRA only the adapters are copied, never the frozen base model. A 7B bf16
  full fine-tune pays ~14 GB (vaa.md §5: "one parameter copy for the SAM restore").
- ``subtract`` (reference-code arithmetic, **inexact**): θ ← (θ + ε) − ε. Not bit-identical in
  low precision (bf16 almost never is; fp32 is close but not always exact). It saves memory only
  when the caller passes explicit ``direction`` tensors that stay unchanged during the body (ε is
  then recomputed from them on exit, no buffer at all). With ``direction=None`` the gradients are
  usually overwritten inside the body, so ε itself must be kept: one buffer per parameter, the
  same memory as ``copy``.

Distributed training: under DDP the gradients are all-reduced when ``backward`` returns, so
every rank computes the same ‖g‖ and ε, and ``grad_norm`` (:mod:`vaa.methods.grads`) needs no
communication. Under FSDP (sharded parameters and gradients) each rank sees only its shard: the
caller must all-reduce the squared shard norms (``grad_norm(...)**2`` summed over ranks) and
pass the global norm via ``grad_norm_value`` — not needed in this project yet. Gradient
accumulation must be 1 (ε would otherwise be computed per micro-batch).
"""

from __future__ import annotations

import math
from typing import Iterable, Optional, Sequence

import torch
from torch import Tensor

from vaa.methods.grads import global_norm, stash_grads
from vaa.methods.precision import realised_step

RESTORE_MODES = ("copy", "subtract")


def _dedupe(params: Iterable[Tensor]) -> list[Tensor]:
    seen: set[int] = set()
    out = []
    for p in params:
        if id(p) not in seen:
            seen.add(id(p))
            out.append(p)
    return out


class WeightPerturbation:
    """Context manager: θ ← θ + ρ·d/(‖d‖ + eps) on entry, θ restored on exit (even on error).

    ``params``: the tensors to perturb (normally ``trainable_params(model)``).
    ``direction``: one tensor (or ``None``) per parameter; default ``None`` = each parameter's
    current ``.grad``, read on entry. A parameter whose direction is ``None`` is untouched.
    ``buffers``: optional list (len(params), entries may be ``None``) of restore buffers; it is
    filled in place on first use and reused afterwards, so a caller that keeps the list (as
    :class:`SAMPerturber` does) allocates once per run.
    ``grad_norm_value``: the norm of the direction if the caller already has it (e.g. the
    all-reduced norm under FSDP); default: computed here (float32 accumulation).

    After entry (``with ... as info``): ``info.grad_norm`` = ‖d‖, ``info.eps_norm`` = ‖ε‖ =
    ρ‖d‖/(‖d‖+eps) (= ρ up to the eps term), ``info.scale`` = ρ/(‖d‖+eps),
    ``info.num_perturbed`` tensors, ``info.copied_numel`` elements held in restore buffers.
    ``measure``: a ``trainer.precision`` string; if given (``copy`` restore only), on entry
    ``info.realised_norm`` = ‖cast(θ+ε) − cast(θ)‖ in that precision's compute dtype and
    ``info.realised_cos`` = its cosine to ε (:func:`vaa.methods.precision.realised_step`):
    what the forward actually sees, e.g. ≈ 0.6 ρ for VAA in bf16 at 7B. One extra read of the
    perturbed parameters; callers measure on logging steps only.
    """

    def __init__(self, params: Iterable[Tensor], direction: Optional[Sequence[Optional[Tensor]]] = None,
                 rho: float = 0.05, restore: str = "copy", eps: float = 1e-7,
                 buffers: Optional[list[Optional[Tensor]]] = None,
                 grad_norm_value: Optional[float | Tensor] = None, measure: Optional[str] = None):
        if restore not in RESTORE_MODES:
            raise ValueError(f"restore must be one of {RESTORE_MODES}, got {restore!r}")
        if rho < 0 or not math.isfinite(rho):
            raise ValueError(f"rho must be finite and >= 0, got {rho}")
        self.params = list(params)
        if direction is not None and len(direction) != len(self.params):
            raise ValueError(f"direction has {len(direction)} entries for {len(self.params)} params")
        if buffers is not None and len(buffers) != len(self.params):
            raise ValueError(f"buffers has {len(buffers)} entries for {len(self.params)} params")
        self.direction = direction
        self.rho, self.restore, self.eps = float(rho), restore, float(eps)
        self.buffers = buffers if buffers is not None else [None] * len(self.params)
        self._norm_given = grad_norm_value
        self.measure = measure
        self.realised_norm = float("nan")  # ‖Δθ‖ as the forward sees it (``measure``)
        self.realised_cos = float("nan")
        self.grad_norm = float("nan")
        self.eps_norm = float("nan")
        self.scale = float("nan")
        self.num_perturbed = 0
        self.copied_numel = 0
        self._active: list[int] = []
        self._dirs: list[Optional[Tensor]] = []
        self._entered = False

    def _buffer(self, i: int, like: Tensor) -> Tensor:
        buf = self.buffers[i]
        if buf is None or buf.shape != like.shape or buf.dtype != like.dtype or buf.device != like.device:
            buf = torch.empty_like(like, memory_format=torch.preserve_format)
            self.buffers[i] = buf
        return buf

    @torch.no_grad()
    def __enter__(self) -> "WeightPerturbation":
        if self._entered:
            raise RuntimeError("WeightPerturbation is not re-entrant; create a new one per step")
        self._entered = True
        dirs = [p.grad for p in self.params] if self.direction is None else list(self.direction)
        active = [i for i, d in enumerate(dirs) if d is not None]
        for i in active:
            if dirs[i].shape != self.params[i].shape:
                raise ValueError(f"direction {i} has shape {tuple(dirs[i].shape)}, "
                                 f"param has {tuple(self.params[i].shape)}")
        norm = self._norm_given if self._norm_given is not None else global_norm(dirs)
        self.grad_norm = float(norm)  # one host sync per step, needed for the scalar alpha
        self.scale = self.rho / (self.grad_norm + self.eps)
        self.eps_norm = self.scale * self.grad_norm
        self.num_perturbed = len(active)
        self._active = active
        # Subtract mode may keep the direction tensors only if the body cannot overwrite them:
        # explicit directions (caller's contract); .grad is typically zeroed in the body.
        keep_eps = self.restore == "subtract" and self.direction is None
        done: list[int] = []
        try:
            if self.restore == "copy":
                for i in active:
                    self._buffer(i, self.params[i]).copy_(self.params[i])
                self.copied_numel = sum(self.params[i].numel() for i in active)
            elif keep_eps:
                for i in active:
                    # ε in the parameter's dtype, added and later subtracted as is.
                    torch.mul(dirs[i], self.scale, out=self._buffer(i, self.params[i]))
                self.copied_numel = sum(self.params[i].numel() for i in active)
            for i in active:
                p = self.params[i]
                if keep_eps:
                    p.add_(self.buffers[i])
                else:
                    p.add_(dirs[i], alpha=self.scale)
                done.append(i)
        except BaseException:
            self._undo(done, dirs)
            self._entered = False
            raise
        self._dirs = dirs if (self.restore == "subtract" and not keep_eps) else []
        if self.measure is not None and self.restore == "copy":
            self.realised_norm, self.realised_cos = realised_step(
                [self.buffers[i] for i in active], [self.params[i] for i in active],
                [dirs[i] for i in active], self.measure)
        return self

    @torch.no_grad()
    def _undo(self, indices: Sequence[int], dirs: Sequence[Optional[Tensor]]) -> None:
        for i in indices:
            p = self.params[i]
            if self.restore == "copy":
                p.copy_(self.buffers[i])
            elif self.direction is None:
                p.sub_(self.buffers[i])
            else:
                p.sub_(dirs[i], alpha=self.scale)

    def __exit__(self, exc_type, exc, tb) -> bool:
        try:
            self._undo(self._active, self._dirs)
        finally:
            self._dirs = []
            self._entered = False
        return False  # never swallow the body's exception


def perturb_weights(params: Iterable[Tensor], direction: Optional[Sequence[Optional[Tensor]]] = None,
                    rho: float = 0.05, restore: str = "copy", eps: float = 1e-7,
                    buffers: Optional[list[Optional[Tensor]]] = None,
                    grad_norm_value: Optional[float | Tensor] = None,
                    measure: Optional[str] = None) -> WeightPerturbation:
    """``with perturb_weights(params, direction_or_None, rho) as info:`` — see
    :class:`WeightPerturbation`. Allocates fresh restore buffers unless ``buffers`` is given;
    use :class:`SAMPerturber` in a training loop."""
    return WeightPerturbation(params, direction, rho=rho, restore=restore, eps=eps, buffers=buffers,
                              grad_norm_value=grad_norm_value, measure=measure)


class _SAMStep(WeightPerturbation):
    """One step of a :class:`SAMPerturber`: its buffers, and its ``last_*`` stats on entry."""

    def __init__(self, owner: "SAMPerturber", direction, grad_norm_value, measure):
        super().__init__(owner.params, direction, rho=owner.rho, restore=owner.restore, eps=owner.eps,
                         buffers=owner.buffers, grad_norm_value=grad_norm_value, measure=measure)
        self.owner = owner

    def __enter__(self) -> "WeightPerturbation":
        out = super().__enter__()
        o = self.owner
        o.last_eps_norm, o.last_grad_norm, o.copied_numel = self.eps_norm, self.grad_norm, self.copied_numel
        o.last_realised_norm, o.last_realised_cos = self.realised_norm, self.realised_cos
        return out


class SAMPerturber:
    """Per-run SAM state: the parameter list, ρ, the restore mode and persistent buffers.

    ``perturbed()`` returns a :class:`WeightPerturbation` that reuses this object's restore
    buffers (allocated on the first step, one copy of the perturbed parameters, never of frozen
    ones), so steady-state steps allocate nothing. After each step ``last_eps_norm`` (‖ε‖),
    ``last_grad_norm`` (‖g‖) and ``copied_numel`` are available for logging.
    """

    def __init__(self, params: Iterable[Tensor], rho: float, restore: str = "copy", eps: float = 1e-7):
        if restore not in RESTORE_MODES:
            raise ValueError(f"restore must be one of {RESTORE_MODES}, got {restore!r}")
        self.params = _dedupe(params)
        self.rho, self.restore, self.eps = float(rho), restore, float(eps)
        self.buffers: list[Optional[Tensor]] = [None] * len(self.params)
        self.grad_buffers: list[Optional[Tensor]] = [None] * len(self.params)
        self.last_eps_norm = float("nan")
        self.last_grad_norm = float("nan")
        self.last_realised_norm = float("nan")
        self.last_realised_cos = float("nan")
        self.copied_numel = 0

    def perturbed(self, direction: Optional[Sequence[Optional[Tensor]]] = None,
                  grad_norm_value: Optional[float | Tensor] = None,
                  measure: Optional[str] = None) -> WeightPerturbation:
        """Context manager: θ ← θ + ρ·g/(‖g‖+eps) with g = current ``.grad`` (or ``direction``),
        θ restored on exit. ``measure``: see :class:`WeightPerturbation`."""
        return _SAMStep(self, direction, grad_norm_value, measure)

    def stash_grads(self) -> list[Optional[Tensor]]:
        """``stash_grads(self.params, out=self.grad_buffers)``: G0 in this object's buffers."""
        return stash_grads(self.params, out=self.grad_buffers)

    @property
    def buffer_numel(self) -> int:
        """Elements currently allocated for restore buffers (memory accounting)."""
        return sum(b.numel() for b in self.buffers if b is not None)
