"""SFT / ERM: plain supervised fine-tuning on the response tokens (baselines.md §1).

One pass per step. Also the step of the base stage (pretraining on the base corpus) and of
the harmful fine-tuning attack when no fine-tuning defense is configured.
"""

from __future__ import annotations

import torch

from vaa.methods.base import TrainingMethod


class SFT(TrainingMethod):
    name = "sft"
    fsdp_safe = True  # no state; the clip's norm is all-reduced over shards (apply_gradients)

    def training_step(self, module, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        loss = module.lm_loss(batch)
        module.manual_backward(loss)
        grad_norm = self.apply_gradients(module)
        return {"loss": loss.detach(), "grad_norm": grad_norm}
