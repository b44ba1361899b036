"""Pre-flight rules on precision, sharding and the optimizer (vaa.config.validate), the static
twins of the guards a training stage applies at setup / its first step
(vaa.methods.precision.check_strategy and check_realised): a run they refuse stops before
any stage is built, one line per problem.

1. ``trainer.precision=16-mixed`` (or ``16``) for every method: the GradScaler's scaled
   gradients would reach the manual-optimisation step's clip and the methods' own gradient
   arithmetic.
2. ``trainer.strategy=fsdp`` with a ``method`` / ``ft_defense`` / ``restore`` whose class is
   not ``fsdp_safe`` (class attribute, read with ``hydra.utils.get_class`` of ``_target_``),
   and with a bitsandbytes 8-bit optimizer (its state layout follows FSDP's flat shards:
   bitsandbytes issues #89 and #2080).
3. ``<recipe>.optimizer=adamw_8bit | paged_adamw_8bit`` without bitsandbytes installed.
4. A weight perturbation that must round away. A class lists its absolute L2 weight steps in
   ``weight_step_keys`` (Booster: ``method.alpha``; VAA: ``dro.sam.rho``). Spread over the P
   trainable weights of a full fine-tune, a step of norm s moves a weight by s/√P on average.
   A weight w in a format with m explicit mantissa bits has half an ULP of at least
   2^-(m+2)·|w| (bf16: m = 7, 2^-9·|w|; fp16: m = 10). With |w| ≈ 1e-2 (typical of 7B
   transformer weights, init std 0.02) the rule refuses when s/√P is below 1/100 of that
   floor, i.e. when only entries 100× larger than average could survive:
   - ``bf16-true`` / ``16-true`` (weights stored in the format): θ + ε rounds back to θ;
   - ``bf16-mixed``: the fp32 master holds ε, but the bf16 copy the forward computes with
     moves by whole ULPs on a few weights at random (unbiased, but the intended step is a
     cosine of about √(s/√P / ULP) < 0.1 of what the forward sees, where the stage's own
     check needs 0.5).
   Booster's α = 0.001 at 7B: 1.2e-8 per weight vs a floor of 2.0e-5, 1,600× below (135 M:
   230×); VAA's ρ = 0.4 at 7B: 4.9e-6, 4× below, which the static rule leaves to the stage's
   measured check. LoRA runs are not checked here (few, fp32 adapters; B starts at 0).
"""

from __future__ import annotations

import math
from importlib.util import find_spec

from omegaconf import DictConfig, OmegaConf

from vaa.config.checker import Checker, Problem
from vaa.methods.precision import strategy_problems

TYPICAL_WEIGHT = 1e-2  # |w| of a typical weight of a pretrained transformer (init std 0.02)
MARGIN = 100           # refuse only when the average step is this far under the half-ULP floor
MANTISSA = {"bf16": 7, "16": 10}  # explicit mantissa bits of the compute dtype by precision head
EIGHT_BIT = ("adamw_8bit", "paged_adamw_8bit")
RECIPES = ("align", "attack", "model.pretrain")


def check_precision_rules(cfg: DictConfig, classes: dict, problems: list[Problem]) -> None:
    """Rules 1-4 above; ``classes``: {group: class or None} for method, ft_defense, restore."""
    root = Checker(cfg, "", problems)
    precision = str(OmegaConf.select(cfg, "trainer.precision", default="32-true"))
    strategy = str(OmegaConf.select(cfg, "trainer.strategy", default="auto"))
    named = {g: (cfg[g].name, cls) for g, cls in classes.items() if cls is not None}
    for key, why in strategy_problems(precision, strategy, named):  # the stages' own rule
        root.fail(key, why, precision if key == "trainer.precision" else strategy)
    sharded = "fsdp" in strategy.lower()
    for recipe in RECIPES:
        opt = OmegaConf.select(cfg, f"{recipe}.optimizer")
        if opt not in EIGHT_BIT:
            continue
        if sharded:
            root.fail(f"{recipe}.optimizer", "bitsandbytes' 8-bit state follows FSDP's flat shards (bitsandbytes "
                                             "issues #89, #2080); under trainer=fsdp use adamw (its state is sharded)")
        if find_spec("bitsandbytes") is None:
            root.fail(f"{recipe}.optimizer", f"needs bitsandbytes: pip install -e \".[gpu]\", or use "
                                             f"{recipe}.optimizer=adamw")
    check_weight_steps(cfg, classes, precision, root)


def compute_mantissa(cfg: DictConfig, precision: str) -> int | None:
    """Explicit mantissa bits of the dtype the forward computes in (None: fp32, nothing rounds)."""
    head = precision.split("-")[0]
    if head in MANTISSA:
        return MANTISSA[head]
    dtype = OmegaConf.select(cfg, "model.dtype")
    return {"bfloat16": 7, "float16": 10}.get(str(dtype))


def trainable_count(cfg: DictConfig) -> int | None:
    """P of a full fine-tune from the model's shape (vaa.plan.shapes; no weights read), or None."""
    from vaa.plan.shapes import shape_for

    try:
        return shape_for(OmegaConf.to_container(cfg.model, resolve=True)).params()
    except Exception:  # noqa: BLE001 - an unknown model: the stage's own check measures it
        return None


def step_floor(step: float, P: int, mantissa: int) -> tuple[float, float]:
    """(average step per weight s/√P, half-ULP floor 2^-(m+2)·TYPICAL_WEIGHT)."""
    return step / math.sqrt(P), 2.0 ** -(mantissa + 2) * TYPICAL_WEIGHT


def check_weight_steps(cfg: DictConfig, classes: dict, precision: str, root: Checker) -> None:
    mantissa = compute_mantissa(cfg, precision)
    if mantissa is None or OmegaConf.select(cfg, "model.lora.enabled", default=False):
        return
    P = None
    for group, cls in classes.items():
        for key in getattr(cls, "weight_step_keys", ()) if cls is not None else ():
            step = OmegaConf.select(cfg, key)
            if not isinstance(step, (int, float)) or step <= 0:
                continue
            P = P or trainable_count(cfg)
            if not P:
                return
            avg, floor = step_floor(float(step), P, mantissa)
            if avg * MARGIN >= floor:
                continue
            fmt = "bf16" if mantissa == 7 else "fp16"
            how = ("rounds to nothing (the weights are stored in it)" if not precision.endswith("mixed") else
                   f"is drowned in the rounding of the {fmt} copy the forward computes with (cosine about "
                   f"{math.sqrt(avg / (2 * floor)):.2f} to the intended step)")
            root.fail(key, f"{group}={cfg[group].name} moves all {P / 1e9:.2f} B weights of a full fine-tune by "
                           f"{avg:.1e} each on average, under 1/{MARGIN} of half a {fmt} ULP of a typical weight "
                           f"({floor:.1e} at |w| = {TYPICAL_WEIGHT:g}): in trainer.precision={precision} the step {how}, "
                           f"and the method would train as if it were absent; use trainer.precision=32-true, LoRA "
                           f"(model.lora.enabled=true), or a larger {key}", step)
