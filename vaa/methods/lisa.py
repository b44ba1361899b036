"""Lisa: lazy safety alignment (Huang et al., arXiv 2405.18641, NeurIPS 2024; git-disl/Lisa),
a fine-tuning-stage defense (``ft_defense=lisa``). Spec: baselines.md §5.

Two states alternate: the alignment state (K_A steps) minimises f(θ) + (ρ/2)‖θ − θ̃_F‖² on
the ``alignment`` stream, the fine-tuning state (K_F steps) minimises u(θ) + (ρ/2)‖θ − θ̃_A‖²
on the user's batches; θ̃_A / θ̃_F are the parameters at the end of the most recent
alignment / fine-tuning state (both start at θ_0). In the alignment state the user loader's
batch is discarded. The proximal term starts once global_step > ``warmup_fraction`` × total
steps (upstream skips the first 10 %, which hurt GSM8K convergence); its gradient ρ(θ − θ̃)
is added to the loss gradient before clipping. One pass per step; two anchor copies of the
trainable parameters (``anchor_device: cpu`` moves them off the accelerator).

Cycle lengths: upstream K_A/K_F = 100/900. A short run would get at most one alignment block
at its start (625 HFT steps: one), so with ``min_cycles`` > 0 (ours; default 6, the VAA
protocol's 10/90 over 625 steps) the cycle is shrunk to total/min_cycles steps when it is
longer, keeping the K_A:K_F ratio and K_A ≥ 1: 126 synthetic HFT steps → K_A/K_F = 2/19.
``min_cycles: 0`` keeps K_A/K_F as given. The state, its clock and both anchors are saved in
checkpoints.
"""

from __future__ import annotations

from typing import Any

import torch

from vaa.methods.base import TrainingMethod
from vaa.methods.grads import global_norm, trainable_params

ALIGN, FINETUNE = "align", "finetune"


def cycle_lengths(align_steps: int, finetune_steps: int, total: int, min_cycles: int) -> tuple[int, int]:
    """(K_A, K_F), shrunk so that ``total`` steps hold ``min_cycles`` cycles (ratio kept)."""
    if align_steps < 0 or finetune_steps < 0 or align_steps + finetune_steps == 0:
        raise ValueError(f"ft_defense.align_steps/finetune_steps must be >= 0 and not both 0, got "
                         f"{align_steps}/{finetune_steps}")
    cycle = align_steps + finetune_steps
    if min_cycles <= 0 or cycle * min_cycles <= total or align_steps == 0 or finetune_steps == 0:
        return align_steps, finetune_steps
    new = max(2, total // min_cycles)
    k_a = min(new - 1, max(1, round(new * align_steps / cycle)))
    return k_a, new - k_a


class Lisa(TrainingMethod):
    name = "lisa"
    requires = ("alignment",)

    def __init__(self, align_steps: int = 100, finetune_steps: int = 900, rho: float = 1.0,
                 warmup_fraction: float = 0.1, min_cycles: int = 6, anchor_device: str | None = None,
                 **hparams):
        super().__init__(**hparams)
        self.align_steps, self.finetune_steps = int(align_steps), int(finetune_steps)
        self.rho, self.warmup_fraction, self.min_cycles = float(rho), float(warmup_fraction), int(min_cycles)
        self.anchor_device = anchor_device
        self.state, self.in_state = ALIGN, 0
        self.anchors: dict[str, list[torch.Tensor]] = {}
        self.history: list[str] = []  # the state of every step (tests, logs)

    def setup(self, module, datamodule) -> None:
        self.stream = datamodule.streams["alignment"]
        self.params = trainable_params(module.model)
        self.k = dict(zip((ALIGN, FINETUNE), cycle_lengths(
            self.align_steps, self.finetune_steps, module.total_steps, self.min_cycles)))
        self.state = ALIGN if self.k[ALIGN] > 0 else FINETUNE
        if not self.anchors:  # not restored from a checkpoint
            self.anchors = {s: self._copy() for s in (ALIGN, FINETUNE)}

    def _copy(self) -> list[torch.Tensor]:
        return [p.detach().to(self.anchor_device or p.device, copy=True) for p in self.params]

    def training_step(self, module, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        if self.state == ALIGN:
            batch = {k: v.to(module.device) for k, v in self.stream.next_batch(0).items()}
        loss = module.lm_loss(batch)
        module.manual_backward(loss)
        other = FINETUNE if self.state == ALIGN else ALIGN
        logs = {"loss": loss.detach(), "lisa/state": torch.tensor(float(self.state == ALIGN))}
        if module.global_step > self.warmup_fraction * module.total_steps and self.rho > 0:
            with torch.no_grad():
                anchor = [a.to(p.device, non_blocking=True) for p, a in zip(self.params, self.anchors[other])]
                diff = torch._foreach_sub([p.detach() for p in self.params], anchor)
                sq = global_norm(diff).pow(2)  # one reduction, no per-tensor host sync
                for p, d in zip(self.params, diff):
                    if p.grad is None:
                        p.grad = d.mul_(self.rho)
                    else:
                        p.grad.add_(d, alpha=self.rho)
            logs["lisa/proximal"] = 0.5 * self.rho * sq
            logs["lisa/drift"] = sq.sqrt()
        logs["grad_norm"] = self.apply_gradients(module)
        self.history.append(self.state)
        self.in_state += 1
        if self.in_state >= self.k[self.state] and self.k[other] > 0:
            self.anchors[self.state] = self._copy()
            self.state, self.in_state = other, 0
        return logs

    def state_dict(self) -> dict[str, Any]:
        return {"state": self.state, "in_state": self.in_state, "history": list(self.history),
                "anchors": {s: [a.cpu() for a in v] for s, v in self.anchors.items()}}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if not state:
            return
        self.state, self.in_state = state["state"], state["in_state"]
        self.history = list(state["history"])
        self.anchors = {s: list(v) for s, v in state["anchors"].items()}


# --- typed hyperparameters (conf/ft_defense/lisa.yaml): /_schema_ft_defense_lisa ------------------
from dataclasses import dataclass  # noqa: E402
from typing import Optional  # noqa: E402

from vaa.config.methods import DefenseConfig, defense_schema  # noqa: E402


@defense_schema
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

    @staticmethod
    def check(c) -> None:
        c.count("align_steps", "finetune_steps", "min_cycles", minimum=0)
        if c.get("align_steps") == 0 and c.get("finetune_steps") == 0:
            c.fail("align_steps", "align_steps and finetune_steps cannot both be 0")
        c.nonneg("rho")
        c.unit("warmup_fraction")
