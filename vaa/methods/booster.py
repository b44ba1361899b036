"""Booster: attenuating the harmful perturbation (Huang et al., arXiv 2409.01586;
git-disl/Booster). Spec: baselines.md §4.

    min_θ f(θ) + λ·[h(θ) − h(θ − α·ĝ_h)],   ĝ_h = ∇h(θ)/‖∇h(θ)‖

with f the alignment loss and h the loss on a harmful batch (the ``harmful`` stream,
disjoint from the attack's rows and the test prompts). First-order gradient, three passes:

1. g_h = ∇h(θ; B_h);
2. θ ← θ − α·g_h/(‖g_h‖+1e-7) (a simulated harmful descent step); g_h′ = ∇h(θ; B_h);
   θ restored from an exact copy (upstream adds α·ĝ_h back, inexact in bf16);
3. g_a = ∇f(θ; B_a);  G = g_a + λ(g_h − g_h′); clip; step.

Options (``conf/method/booster*.yaml``):
- ``variant: upstream`` (default, git-disl/Booster and qchen007/Booster) or ``vaa_sign_bug``:
  the ``ChanLiang/VAA`` copy adds +α·ĝ_h in step 2 *and* again instead of restoring, so g_h′
  is taken at an ascent point and θ drifts by +2α·ĝ_h every step. Only for bug-for-bug parity.
- ``meta_term: false``: the newer upstream ablation G = g_a + λ·g_h (two passes).
- ``perturb_aware: true``: g_a is Vaccine's perturbed alignment gradient ("Vaccine +
  Booster", one more pass).
- ``harmful_batch_size``: upstream hard-codes 10; null = the alignment batch size.

α is an absolute L2 step over *all trainable parameters*: values do not transfer between
LoRA and full fine-tuning, nor between model sizes.
"""

from __future__ import annotations

import torch

from vaa.methods.base import TrainingMethod
from vaa.methods.grads import global_norm, trainable_params
from vaa.methods.hooks import ATTENTION, layer_modules
from vaa.methods.perturb import perturb_weights
from vaa.methods.precision import check_realised
from vaa.methods.vaccine import perturbed_backward

VARIANTS = ("upstream", "vaa_sign_bug")


class Booster(TrainingMethod):
    name = "booster"
    requires = ("harmful",)
    weight_step_keys = ("method.alpha",)  # absolute L2 step over all weights (vaa.config.precision_rules)

    def __init__(self, lam: float = 5.0, alpha: float = 0.1, harmful_batch_size: int | None = None,
                 variant: str = "upstream", meta_term: bool = True, perturb_aware: bool = False,
                 vaccine_rho: float = 2.0, attn_pattern: str = ATTENTION, **hparams):
        super().__init__(**hparams)
        if variant not in VARIANTS:
            raise ValueError(f"method.variant must be one of {VARIANTS}, got {variant!r}")
        self.lam, self.alpha, self.variant = float(lam), float(alpha), variant
        self.harmful_batch_size = harmful_batch_size
        self.meta_term, self.perturb_aware = bool(meta_term), bool(perturb_aware)
        self.vaccine_rho, self.attn_pattern = float(vaccine_rho), attn_pattern

    @property
    def passes_per_step(self) -> int:
        return 1 + int(self.meta_term) + 1 + int(self.perturb_aware)

    def stream_batch_size(self, name: str, default: int) -> int:
        return self.harmful_batch_size or default

    def setup(self, module, datamodule) -> None:
        self.harmful = datamodule.streams["harmful"]
        self.params = trainable_params(module.model)
        self.restore_buffers = [None] * len(self.params)  # θ's exact copy, reused every step
        self.layers = layer_modules(module.model, self.attn_pattern) if self.perturb_aware else None

    def take_grads(self) -> list[torch.Tensor]:
        """The current gradients, handed over (no copy): ``.grad`` is None afterwards, so the
        next backward writes fresh tensors, as after SFT's ``zero_grad(set_to_none=True)``."""
        out = []
        for p in self.params:
            out.append(p.grad if p.grad is not None else torch.zeros_like(p))
            p.grad = None
        return out

    def training_step(self, module, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        hb = {k: v.to(module.device) for k, v in self.harmful.next_batch(0).items()}
        logs: dict[str, torch.Tensor] = {}
        h = module.lm_loss(hb)  # pass 1: g_h at θ
        module.manual_backward(h)
        logs["harmful_loss"] = h.detach()
        g_h = self.take_grads()
        logs["harmful_grad_norm"] = norm = global_norm(g_h)
        with torch.no_grad():
            if self.meta_term:
                self.last_realised = None
                logs["harmful_loss_moved"] = self._moved_harmful_grad(module, hb, g_h, norm)
                if self.last_realised is not None:
                    logs["alpha_step_realised_norm"] = torch.tensor(self.last_realised[0])
                    logs["alpha_step_realised_cos"] = torch.tensor(self.last_realised[1])
                # g_h ← λ(g_h − g_h′) with g_h′ taken from .grad (upstream negated g_h in place)
                g_moved = self.take_grads()
                if self.variant == "upstream":  # g_h holds −g_h
                    torch._foreach_add_(g_h, g_moved)
                    torch._foreach_mul_(g_h, -self.lam)
                else:
                    torch._foreach_sub_(g_h, g_moved)
                    torch._foreach_mul_(g_h, self.lam)
                del g_moved
            else:
                torch._foreach_mul_(g_h, self.lam)
        if self.perturb_aware:  # passes 3-4: Vaccine's perturbed alignment gradient
            vac = perturbed_backward(module, batch, self.layers, self.vaccine_rho,
                                     self.measure_at(module), knob="method.vaccine_rho")
            loss = vac["loss"]
            logs["eps_norm"] = vac["eps_norm"]
        else:  # pass 3: g_a
            loss = module.lm_loss(batch)
            module.manual_backward(loss)
        with torch.no_grad():
            for g, p in zip(g_h, self.params):
                if p.grad is None:
                    p.grad = g
                else:
                    p.grad.add_(g)
        logs["loss"] = loss.detach()
        logs["grad_norm"] = self.apply_gradients(module)
        return logs

    def _moved_harmful_grad(self, module, hb, g_h, norm) -> torch.Tensor:
        """Pass 2: g_h′ into ``.grad`` at the moved point; θ back at θ (upstream) or left at
        θ + 2α·ĝ_h (``vaa_sign_bug``). Returns h at the moved point."""
        if self.variant == "upstream":
            torch._foreach_neg_(g_h)  # direction −g_h: θ − α·ĝ_h
            measure = self.measure_at(module)
            with perturb_weights(self.params, direction=g_h, rho=self.alpha, measure=measure,
                                 buffers=self.restore_buffers, grad_norm_value=norm) as step:
                with torch.enable_grad():
                    h1 = module.lm_loss(hb)
                    module.manual_backward(h1)
            if measure is not None:  # an α step that rounds away makes Booster plain SFT
                self.last_realised = (step.realised_norm, step.realised_cos)
                check_realised("method=booster", step.realised_norm, step.realised_cos, step.eps_norm, measure,
                               "method.alpha")
            return h1.detach()
        scale = self.alpha / (float(norm) + 1e-7)
        with torch.no_grad():
            for p, s in zip(self.params, g_h):
                if s is not None:
                    p.add_(s, alpha=scale)  # the reference's "+" in step 3
        with torch.enable_grad():
            h1 = module.lm_loss(hb)
            module.manual_backward(h1)
        with torch.no_grad():
            for p, s in zip(self.params, g_h):
                if s is not None:
                    p.add_(s, alpha=scale)  # ... and its "+" again where it should restore
        return h1.detach()


# --- typed hyperparameters (conf/method/booster*.yaml): /_schema_method_booster -------------------
from dataclasses import dataclass  # noqa: E402
from typing import Optional  # noqa: E402

from vaa.config.methods import MethodConfig, method_schema  # noqa: E402


@method_schema
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

    @staticmethod
    def check(c) -> None:
        c.nonneg("lam", "alpha", "vaccine_rho")
        c.count("harmful_batch_size", optional=True, meaning="null: the alignment batch size")
        c.one_of("variant", VARIANTS)
