"""Typed schemas of the training methods (``method=``) and fine-tuning-stage defenses
(``ft_defense=``), one dataclass each; registered by :func:`vaa.config.schema.register`."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional

from vaa.methods.hooks import ATTENTION, MLP


@dataclass
class MethodConfig:
    """Base schema of an alignment method. Methods with knobs add them in their YAML under
    typed groups (VAA: ``dro``) or subclass this schema."""

    _target_: str = "vaa.methods.sft.SFT"
    name: str = "sft"


@dataclass
class VAAMethodConfig(MethodConfig):
    _target_: str = "vaa.methods.vaa.VAA"
    name: str = "vaa"
    dro: Any = None  # the `dro` group, interpolated: ${dro}
    seed: int = 0


@dataclass
class VaccineMethodConfig(MethodConfig):
    """Vaccine (baselines.md §2): hidden-state perturbation of radius rho."""

    _target_: str = "vaa.methods.vaccine.Vaccine"
    name: str = "vaccine"
    rho: float = 2.0
    attn_pattern: str = ATTENTION


@dataclass
class RepNoiseMethodConfig(MethodConfig):
    """RepNoise (baselines.md §3): noise_weight = β, ascent_weight = α."""

    _target_: str = "vaa.methods.repnoise.RepNoise"
    name: str = "repnoise"
    noise_weight: float = 0.001
    ascent_weight: float = 1.0
    mask: str = "response"  # response | diff_tokens (reference)
    layer_average: str = "mean"  # mean (harmful CE + N_L+1 lens CEs over N_L+2) | upstream (over N_L+1)
    mlp_pattern: str = MLP
    layer_pattern: str = r"(^|\.)layers\.\d+$"
    final_norm: str = "norm"
    seed: int = 0


@dataclass
class BoosterMethodConfig(MethodConfig):
    """Booster (baselines.md §4): λ = lam, α = alpha (absolute L2 step)."""

    _target_: str = "vaa.methods.booster.Booster"
    name: str = "booster"
    lam: float = 5.0
    alpha: float = 0.1
    harmful_batch_size: Optional[int] = 10  # upstream hard-codes 10; null: the align batch size
    variant: str = "upstream"  # upstream | vaa_sign_bug (bug-for-bug parity only)
    meta_term: bool = True
    perturb_aware: bool = False
    vaccine_rho: float = 2.0
    attn_pattern: str = ATTENTION


@dataclass
class DefenseConfig:
    """A fine-tuning-stage defense (``ft_defense``): the attack's training step."""

    _target_: str = "vaa.methods.sft.SFT"
    name: str = "none"


@dataclass
class LisaConfig(DefenseConfig):
    _target_: str = "vaa.methods.lisa.Lisa"
    name: str = "lisa"
    align_steps: int = 100
    finetune_steps: int = 900
    rho: float = 1.0
    warmup_fraction: float = 0.1
    min_cycles: int = 6  # ours: shrink K_A + K_F so a short run holds this many cycles; 0: off
    anchor_device: Optional[str] = None  # e.g. cpu, when accelerator memory is short


@dataclass
class EMAConfig(DefenseConfig):
    _target_: str = "vaa.methods.ema.EMA"
    name: str = "ema"
    beta: float = 0.995  # unconfirmed (no official code)
    variant: str = "shadow"  # shadow | write_back
    anchor_weight_at_end: Optional[float] = None  # w: β = w^(1/T)


@dataclass
class LookAheadConfig(DefenseConfig):
    _target_: str = "vaa.methods.lookahead.LookAhead"
    name: str = "lookahead"
    mode: str = "real"  # real | virtual
    preview_tokens: int = 6
    virtual_prefix: str = "Let's solve this problem. "
    connector: str = " The answer begins with: "
