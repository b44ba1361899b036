"""Loss-reweighting Group DRO (Sagawa et al., 2020), the VAA paper's `gdro_reweight`
ablation (specs/vaa.md §6; reference code ``DROTrainer`` + ``loss.py``).

Mixed, shuffled batches; each sequence's loss is its token-mean cross-entropy; group
losses are the means over the batch's members of each group (an absent group counts 0, as
in the reference); q ← q·exp(η ℓ_g) normalised; the step minimises Σ_g q_g ℓ_g. No
perturbation. η and p₀ come from ``dro.sampler``. Under DDP each rank keeps its own q
(the reference does not all-reduce group losses either); use one device for parity.
"""

from __future__ import annotations

from typing import Any

import torch

from vaa.methods.base import TrainingMethod
from vaa.methods.dro.reweight import GroupLossReweighter, per_sample_token_mean_ce


class GroupDRO(TrainingMethod):
    name = "gdro"
    requires_groups = True

    def __init__(self, dro: Any, seed: int = 0, **hparams: Any):
        super().__init__(**hparams)
        self.dro = dro
        self.reweighter: GroupLossReweighter | None = None

    def make_datamodule(self, examples, tokenizer, *, groups=None, extra=None, **kw):
        if groups is None:
            raise ValueError("method=gdro needs vulnerability groups: set dro.groups_file or let "
                             "the estimate stage run (dro.groups_file=null)")
        from vaa.data.datamodule import SFTDataModule

        self.group_sizes = [sum(1 for g in groups if g == k) for k in (0, 1)]
        return SFTDataModule(examples, tokenizer, groups=groups, extra=extra, **kw)

    def setup(self, module, datamodule) -> None:
        s = self.dro.sampler
        state = self.reweighter.state_dict() if self.reweighter else None
        self.reweighter = GroupLossReweighter(num_groups=2, eta=s.eta, init=s.init,
                                              group_sizes=self.group_sizes)
        if state:
            self.reweighter.load_state_dict(state)

    def training_step(self, module, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        out = module.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
        per_sample = per_sample_token_mean_ce(out.logits, batch["labels"])
        loss = self.reweighter.step(per_sample, batch["group"], update=self.dro.sampler.update_q)
        module.manual_backward(loss)
        grad_norm = self.apply_gradients(module)
        return {"loss": loss.detach(), "grad_norm": grad_norm,
                "dro/p_vulnerable": torch.tensor(self.reweighter.probs[1])}

    def state_dict(self) -> dict[str, Any]:
        return {"reweighter": self.reweighter.state_dict()} if self.reweighter else {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state and self.reweighter is not None:
            self.reweighter.load_state_dict(state["reweighter"])
