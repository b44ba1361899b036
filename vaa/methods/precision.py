"""What a method's perturbation becomes in the training precision, and the guards that refuse
a precision / strategy a method cannot run correctly in.

Why. A SAM-style weight step ε = ρ·g/‖g‖ (VAA ρ = 0.4, Booster's α = 0.001, Panacea) spreads a
fixed norm over every trainable weight: at 7B parameters the typical entry is ~ρ/√N ≈ 5e-6,
far below half a bf16 ULP of a weight of magnitude ~1e-2 (≈ 3e-5). In ``bf16-true`` the step
``θ ← θ + ε`` then leaves most weights unchanged (measured on a 7B-shaped model: realised
‖Δθ‖ ≈ 0.61 ρ, cosine 0.46 to ε); Booster's α = 0.001 leaves *all* of them unchanged, so its
regulariser is identically zero and Booster silently becomes SFT. Under ``bf16-mixed`` the
fp32 master weights hold ε exactly, but the bf16 autocast copy the forward uses rounds it too.

What this module gives:

- :func:`compute_dtype`: the dtype a forward computes in (bf16 for ``bf16-*``, fp16 for
  ``16-*``, else the parameter's own).
- :func:`realised_step`: ‖Δθ‖ and cos(Δθ, ε) of a weight step as the forward sees it,
  Δθ = cast(θ + ε) − cast(θ) in the compute dtype, accumulated in fp32.
- :func:`check_realised`: raise :class:`PerturbationRoundedAway` (one line naming the setting
  to change) when less than ``MIN_REALISED_FRACTION`` of the nominal norm is applied along ε
  (or the applied step's cosine to ε is below it).
- :func:`check_strategy`: refuse ``16-mixed`` (GradScaler-scaled gradients reach the clip and
  the methods' own gradient arithmetic unscaled) and ``trainer=fsdp`` for methods whose state
  is not shard-aware (class attribute ``fsdp_safe``).

Methods log the realised figures as ``<name>_realised`` / ``<name>_realised_cos`` beside the
nominal ``eps_norm``.
"""

from __future__ import annotations

import math
from typing import Optional, Sequence

import torch
from torch import Tensor

from vaa.errors import UserError

# Refuse a run whose perturbation keeps less than this share of its nominal norm.
MIN_REALISED_FRACTION = 0.5
_COMPUTE = {"bf16": torch.bfloat16, "16": torch.float16}


class PerturbationRoundedAway(UserError):
    """A method's perturbation cannot be represented in the chosen precision."""


def precision_of(module) -> str:
    trainer = getattr(module, "_trainer", None)
    if trainer is None:
        return "32-true"
    return str(trainer.precision)


def compute_dtype(precision: str, param_dtype: torch.dtype) -> torch.dtype:
    """The dtype the forward sees a parameter in: ``bf16-mixed`` / ``bf16-true`` → bfloat16,
    ``16-mixed`` / ``16-true`` → float16, otherwise the parameter's dtype."""
    head = str(precision).split("-")[0]
    return _COMPUTE.get(head, param_dtype)


@torch.no_grad()
def realised_step(before: Sequence[Optional[Tensor]], after: Sequence[Tensor],
                  direction: Sequence[Optional[Tensor]], precision: str) -> tuple[float, float]:
    """(‖Δ‖₂, cos(Δ, d)) with Δ = cast(after) − cast(before) over the tensors whose ``before``
    and ``direction`` are not None, cast to the compute dtype of ``precision`` (see
    :func:`compute_dtype`), accumulated in float32. ``d`` is the intended direction (ε up to
    a positive scale, so the cosine is that of ε). Shapes: per tensor, ``before[i]``,
    ``after[i]`` and ``direction[i]`` alike. Returns (0, nan) when nothing moved."""
    sq = dot = dsq = 0.0  # float32 sums per tensor, on the tensors' device; one sync at the end
    for b, a, d in zip(before, after, direction):
        if b is None or d is None:
            continue
        cd = compute_dtype(precision, a.dtype)
        delta = a.to(cd).float() - b.to(cd).float()
        df = d.float()
        sq = delta.square().sum() + sq
        dot = (delta * df).sum() + dot
        dsq = df.square().sum() + dsq
    norm = math.sqrt(float(sq))
    denom = norm * math.sqrt(float(dsq))
    return norm, (float(dot) / denom if denom > 0 else float("nan"))


def check_realised(method: str, realised: float, cos: float, nominal: float, precision: str,
                   knob: str) -> None:
    """Raise :class:`PerturbationRoundedAway` unless the applied step keeps at least
    ``MIN_REALISED_FRACTION`` of the nominal norm *along* ε (``realised · cos``) and points
    mostly along it (``cos ≥ MIN_REALISED_FRACTION``). Rounding to a coarse grid leaves most
    entries unchanged and flips a few by a whole ULP: the norm of what moved can even exceed
    ρ while its direction is mostly rounding noise, so the norm alone is not the test.
    ``knob`` names the method's own setting (e.g. ``dro.sam.rho``) for the message."""
    cos = 0.0 if cos != cos else cos  # NaN: nothing moved
    along = realised * max(cos, 0.0)
    if nominal <= 0 or (along >= MIN_REALISED_FRACTION * nominal and cos >= MIN_REALISED_FRACTION):
        return
    raise PerturbationRoundedAway(
        f"{method}: in trainer.precision={precision} the perturbation of nominal norm "
        f"{nominal:.3g} is applied as {realised:.3g} at cosine {cos:.2f} to the intended one "
        f"({100 * along / nominal:.0f}% along it; at least {100 * MIN_REALISED_FRACTION:.0f}% "
        f"and cosine {MIN_REALISED_FRACTION} needed), so the method would train as if it were "
        f"absent; use trainer.precision=32-true (or bf16-mixed where its realised share is "
        f"enough), LoRA (model.lora.enabled=true: fewer, larger entries), or a larger {knob}")


def strategy_problems(precision: str, strategy: str, classes: dict) -> list[tuple[str, str]]:
    """The precision / strategy combinations no method of this project runs correctly, as
    (config key, requirement) pairs: ``16-mixed`` (manual optimisation: the clip and the
    methods' gradient arithmetic would see GradScaler-scaled gradients) and FSDP for a class
    that is not ``fsdp_safe`` (its parameter snapshots / norms would be per shard).
    ``classes``: {group: (option name, class)}. One rule for the pre-flight validation
    (vaa.config.precision_rules) and the stage's own check (:func:`check_strategy`)."""
    out = []
    if str(precision) in ("16-mixed", "16"):
        out.append(("trainer.precision", "fp16 mixed precision scales the loss, and every method's "
                    "manual-optimisation step would clip and combine scaled gradients; use "
                    "trainer.precision=bf16-mixed (or 32-true)"))
    if "fsdp" in str(strategy).lower():
        for group, (name, cls) in classes.items():
            if cls is not None and not getattr(cls, "fsdp_safe", False):
                out.append(("trainer.strategy", f"{group}={name} ({cls.__name__}) is not FSDP-correct "
                            "(it keeps per-parameter snapshots or norms that would be per shard); use "
                            "trainer=ddp, or trainer=gpu (with LoRA for a 7B model)"))
    return out


def check_strategy(method, precision: str, strategy: str) -> None:
    """Raise :class:`UserError` for the first of :func:`strategy_problems` of ``method``."""
    name = getattr(method, "name", type(method).__name__)
    problems = strategy_problems(precision, strategy, {"method": (name, type(method))})
    if problems:
        key, why = problems[0]
        value = precision if key == "trainer.precision" else strategy
        raise UserError(f"{key}={value}: {why}")
