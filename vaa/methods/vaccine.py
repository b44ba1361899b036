"""Vaccine: perturbation-aware alignment (Huang et al., arXiv 2402.01109; git-disl/Vaccine).
Spec: baselines.md §2.

    min_θ max_{‖ε‖≤ρ} f(θ; e_1 + ε_1, …, e_L + ε_L)

with e_l the output hidden state of layer l's attention block. One step:

1. pass 1: forward f on the batch while capturing every e_l; ε_l = ρ·g_l/(‖g‖ + 1e-7) with
   g_l = ∂f/∂e_l and ‖g‖ global over layers, tokens and batch items;
2. pass 2: forward f on the *same* batch with ε_l added to each e_l, backward, clip, step.

Pass 1 takes ``torch.autograd.grad`` w.r.t. the captured hidden states only, so no parameter
gradient is computed and nothing needs discarding (the reference runs a full backward and
zeroes the parameter gradients; the ε it gets is the same). The attention blocks are found
by a name pattern checked against ``config.num_hidden_layers`` (``attn_pattern``; the
reference's class list finds nothing on Qwen2), see :mod:`vaa.methods.hooks`.
"""

from __future__ import annotations

import torch

from vaa.methods.base import TrainingMethod
from vaa.methods.grads import global_norm
from vaa.methods.hooks import ATTENTION, AddToOutputs, CaptureOutputs, layer_modules
from vaa.methods.precision import check_realised


def hidden_perturbation(module, batch, layers, rho: float):
    """Pass 1 of Vaccine: the clean loss and ε_l = ρ·g_l/(‖g‖+1e-7) per layer (``None``
    where the loss does not depend on a layer's output), and ‖g‖."""
    with CaptureOutputs(layers) as cap:
        loss = module.lm_loss(batch)
    hidden = [h for h in cap.outputs if h is not None]
    if len(hidden) != len(layers):
        raise RuntimeError(f"captured {len(hidden)} of {len(layers)} attention outputs: the "
                           "forward did not run through every matched module")
    grads = torch.autograd.grad(loss, hidden, allow_unused=True)
    norm = global_norm(grads)
    scale = rho / (float(norm) + 1e-7)
    eps = [None if g is None else g.detach() * scale for g in grads]
    return loss.detach(), eps, norm


def perturbed_backward(module, batch, layers, rho: float, measure: str | None = None,
                       knob: str = "method.rho") -> dict[str, torch.Tensor]:
    """Both passes of Vaccine; leaves ∇_θ f(θ; e + ε) accumulated in ``.grad``. ``measure``
    (a precision string, :meth:`TrainingMethod.measure_at`): also log what ε became after
    rounding into the hidden states' dtype, and refuse a run where it vanishes."""
    clean, eps, norm = hidden_perturbation(module, batch, layers, rho)
    with AddToOutputs(layers, eps, measure=measure is not None) as add:
        # kept through backward: a gradient-checkpoint recompute adds the same ε again
        loss = module.lm_loss(batch)
        module.manual_backward(loss)
    eps_norm = global_norm(eps)
    out = {"loss": loss.detach(), "loss_clean": clean, "hidden_grad_norm": norm, "eps_norm": eps_norm}
    if measure is not None:
        out["eps_realised_norm"] = torch.tensor(add.realised_norm)
        out["eps_realised_cos"] = torch.tensor(add.realised_cos)
        check_realised("method=vaccine", add.realised_norm, add.realised_cos, float(eps_norm),
                       measure, knob)
    return out


class Vaccine(TrainingMethod):
    name = "vaccine"
    passes_per_step = 2

    def __init__(self, rho: float = 2.0, attn_pattern: str = ATTENTION, **hparams):
        super().__init__(**hparams)
        if rho < 0:
            raise ValueError(f"method.rho must be >= 0, got {rho}")
        self.rho, self.attn_pattern = float(rho), attn_pattern
        self.layers: list | None = None

    def setup(self, module, datamodule) -> None:
        self.layers = layer_modules(module.model, self.attn_pattern)

    def training_step(self, module, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        logs = perturbed_backward(module, batch, self.layers, self.rho, self.measure_at(module))
        logs["grad_norm"] = self.apply_gradients(module)
        return logs


# --- typed hyperparameters (conf/method/vaccine.yaml): /_schema_method_vaccine --------------------
from dataclasses import dataclass  # noqa: E402

from vaa.config.methods import MethodConfig, method_schema  # noqa: E402


@method_schema
@dataclass
class VaccineMethodConfig(MethodConfig):
    """Vaccine (baselines.md §2): hidden-state perturbation of radius rho."""

    _target_: str = "vaa.methods.vaccine.Vaccine"
    name: str = "vaccine"
    rho: float = 2.0
    attn_pattern: str = ATTENTION

    @staticmethod
    def check(c) -> None:
        c.nonneg("rho")
