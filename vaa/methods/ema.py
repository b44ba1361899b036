"""EMA-momentum in parameter space (Kim et al., *Rethinking Safety in LLM Fine-tuning: An
Optimization Perspective*, arXiv 2508.12531), a fine-tuning-stage defense
(``ft_defense=ema``). Spec: baselines.md §6.

The paper publishes neither the exact form nor β (no official code): the form and the
default are the spec's recommendation, exposed as options.
- ``variant: shadow`` (default): θ_ema ← θ_0 (the aligned model); after every optimizer step
  θ_ema ← β·θ_ema + (1 − β)·θ_t; the fine-tuned artifact (what is evaluated and released) is
  θ_ema, written into the model when training ends.
- ``variant: write_back``: also θ_t ← θ_ema after each step (for Adam-type optimisers exactly
  a step of size (1 − β)·lr; a sanity variant).
β: ``beta`` (default 0.995, unconfirmed), or ``anchor_weight_at_end`` = w, the weight left on
θ_0 after the run's T steps: β = w^(1/T). The buffer is float32 whatever the model's dtype
(small updates vanish in bf16). With LoRA the EMA is of the adapter factors A and B (not of
ΔW = BA): the trainable parameters. One pass per step plus one lerp.
"""

from __future__ import annotations

from typing import Any

import torch

from vaa.methods.base import TrainingMethod
from vaa.methods.grads import trainable_params

VARIANTS = ("shadow", "write_back")


class EMA(TrainingMethod):
    name = "ema"

    def __init__(self, beta: float = 0.995, variant: str = "shadow",
                 anchor_weight_at_end: float | None = None, **hparams):
        super().__init__(**hparams)
        if variant not in VARIANTS:
            raise ValueError(f"ft_defense.variant must be one of {VARIANTS}, got {variant!r}")
        if not 0.0 <= beta < 1.0:
            raise ValueError(f"ft_defense.beta must be in [0, 1), got {beta}")
        if anchor_weight_at_end is not None and not 0.0 < anchor_weight_at_end < 1.0:
            raise ValueError(f"ft_defense.anchor_weight_at_end must be in (0, 1), got {anchor_weight_at_end}")
        self.beta, self.variant, self.anchor_weight_at_end = float(beta), variant, anchor_weight_at_end
        self.shadow: list[torch.Tensor] = []

    def setup(self, module, datamodule) -> None:
        self.params = trainable_params(module.model)
        if self.anchor_weight_at_end is not None:
            self.beta = self.anchor_weight_at_end ** (1.0 / module.total_steps)
        if not self.shadow:
            self.shadow = [p.detach().float().clone() for p in self.params]

    def training_step(self, module, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        loss = module.lm_loss(batch)
        module.manual_backward(loss)
        grad_norm = self.apply_gradients(module)
        with torch.no_grad():
            for s, p in zip(self.shadow, self.params):
                s.lerp_(p.detach().float(), 1.0 - self.beta)  # s ← β·s + (1−β)·θ
                if self.variant == "write_back":
                    p.copy_(s)
        return {"loss": loss.detach(), "grad_norm": grad_norm, "ema/beta": torch.tensor(self.beta)}

    @torch.no_grad()
    def on_train_end(self, module) -> None:
        for s, p in zip(self.shadow, self.params):
            p.copy_(s)

    def state_dict(self) -> dict[str, Any]:
        return {"shadow": [s.cpu() for s in self.shadow], "beta": self.beta}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if not state:
            return
        self.beta = state["beta"]
        if self.shadow:  # setup ran (it runs before a checkpoint is restored): keep devices
            for s, t in zip(self.shadow, state["shadow"]):
                s.copy_(t)
        else:
            self.shadow = list(state["shadow"])


# --- typed hyperparameters (conf/ft_defense/ema.yaml): /_schema_ft_defense_ema --------------------
from dataclasses import dataclass  # noqa: E402
from typing import Optional  # noqa: E402

from vaa.config.methods import DefenseConfig, defense_schema  # noqa: E402


@defense_schema
@dataclass
class EMAConfig(DefenseConfig):
    _target_: str = "vaa.methods.ema.EMA"
    name: str = "ema"
    beta: float = 0.995  # unconfirmed (no official code)
    variant: str = "shadow"  # shadow | write_back
    anchor_weight_at_end: Optional[float] = None  # w: β = w^(1/T)

    @staticmethod
    def check(c) -> None:
        c.between("beta", 0.0, 1.0, hi_open=True, meaning="the EMA decay")
        c.one_of("variant", VARIANTS)
        c.between("anchor_weight_at_end", 0.0, 1.0, lo_open=True, hi_open=True, optional=True)
