"""Vulnerability-Aware Alignment (VAA), stage 2: Group DRO over vulnerable / invulnerable
alignment examples with an adversarial EXP3 sampler and group-dependent SAM perturbation.

L. Chen, X. Han, L. Shen, J. Bai, K.-F. Wong, *Vulnerability-Aware Alignment: Mitigating
Uneven Forgetting in Harmful Fine-Tuning*, ICML 2025 (arXiv 2506.03850); reference code
``ChanLiang/VAA`` (``DROSamplingTrainer``). Spec: ``specs/vaa.md`` §3.

One step (vaa.md §3.5): λ_t from the curriculum; the sampler draws a group k; a batch of
that group; clean loss L0 and its gradient G0 (pass 1); then

- ``lambda_mixing=bernoulli`` (reference code, default): with probability 1 − λ_t the step
  is clean (L = L0, G = G0); otherwise ε = ρ·G0/(‖G0‖+1e-7), L and G come from θ + ε
  (pass 2) and θ is restored exactly before the optimizer step;
- ``lambda_mixing=weighted`` (the paper's Eq. 5): whenever λ_t > 0 both passes run and
  L = (1−λ_t)L0 + λ_t L1, G = (1−λ_t)G0 + λ_t G1.

Then the sampler sees L (all-reduced under DDP) and the optimizer steps with G. The
group-dependent perturbation is ε computed from the sampled group's own batch; ρ is shared.

Where this departs from the reference code (each a config option, reference default):
the p clip [0.1, 0.9] exists only in the code (``dro.sampler.clip``; the paper preset
``dro=paper`` has none); the curriculum uses s = step / total steps instead of the code's
fractional epoch; the sampler, group iterators and Bernoulli RNG are checkpointed, so a
resumed run equals an uninterrupted one (the reference does not checkpoint them).
Gradient accumulation must be 1: ε would otherwise be computed per micro-batch.
"""

from __future__ import annotations

import logging
import random
from typing import Any

import torch

from vaa.analysis.trajectory import write_trajectory
from vaa.methods.base import TrainingMethod
from vaa.methods.dro.sampler import EXP3Sampler
from vaa.methods.grads import is_sharded, mix_grads, sharded_norm, trainable_params
from vaa.methods.perturb import SAMPerturber
from vaa.methods.precision import check_realised

VUL, INV = 1, 0
log = logging.getLogger(__name__)


def lambda_at(step: int, total: int, lambda_max: float, schedule: str) -> float:
    """λ_t of the curriculum; s = step / total in [0, 1]."""
    if schedule == "linear":
        return lambda_max * min(1.0, step / max(1, total))
    if schedule == "constant":
        return lambda_max
    raise ValueError(f"dro.lambda_schedule must be linear or constant, got {schedule!r}")


class VAA(TrainingMethod):
    name = "vaa"
    requires_groups = True
    fsdp_safe = True  # ‖G0‖ all-reduced over shards; parameters taken at the first step
    weight_step_keys = ("dro.sam.rho",)  # absolute L2 step over all weights (vaa.config.precision_rules)

    def __init__(self, dro: Any, seed: int = 0, **hparams: Any):
        super().__init__(**hparams)
        self.dro, self.seed = dro, seed
        if dro.lambda_mixing not in ("bernoulli", "weighted"):
            raise ValueError(f"dro.lambda_mixing must be bernoulli or weighted, got {dro.lambda_mixing!r}")
        self.coin = random.Random(f"vaa-bernoulli-{seed}")
        self.sampler: EXP3Sampler | None = None
        self.stats = {"steps": 0, "perturbed": 0, "passes": 0}
        self.trajectory: list[tuple] = []  # (group, p, clean loss, perturbed loss or None)

    @property
    def passes_per_step(self) -> float:  # expected, for benchmarks.step_cost (vaa.md §5)
        d = self.dro
        mean_lambda = d.lambda_max / 2 if d.lambda_schedule == "linear" else d.lambda_max
        if d.lambda_mixing == "weighted":
            return 2.0 if d.lambda_max > 0 else 1.0
        return 1.0 + mean_lambda

    def make_datamodule(self, examples, tokenizer, *, groups=None, extra=None, **kw):
        if groups is None:
            raise ValueError("method=vaa needs vulnerability groups: set dro.groups_file or let "
                             "the estimate stage run (dro.groups_file=null)")
        from vaa.data.group_stream import GroupDataModule  # Lightning: imported when training

        return GroupDataModule(examples, groups, tokenizer, **kw)

    def setup(self, module, datamodule) -> None:
        s = self.dro.sampler
        self.stream = datamodule.stream
        sizes = datamodule.group_sizes()
        self.only_group = None
        if min(sizes) == 0:  # nothing (or everything) vulnerable: no groups to balance
            self.only_group = sizes.index(max(sizes))
            log.warning("VAA: group sizes %s; training on group %d only (the sampler is idle). "
                        "The estimate found no vulnerable/invulnerable split: try more proxy "
                        "runs or another dro.estimate.definition.", sizes, self.only_group)
        self.sampler = EXP3Sampler(num_groups=2, eta=s.eta, init=s.init, group_sizes=sizes,
                                   clip=list(s.clip) if s.clip is not None else None,
                                   feedback=s.feedback, seed=self.seed)
        self.perturber: SAMPerturber | None = None  # built at the first step: after sharding

    def _perturber(self, module) -> SAMPerturber:
        if self.perturber is None:
            self.perturber = SAMPerturber(trainable_params(module.model), self.dro.sam.rho,
                                          restore=self.dro.sam.restore)
        return self.perturber

    def training_step(self, module, _step) -> dict[str, torch.Tensor]:
        d = self.dro
        lam = lambda_at(module.global_step, module.total_steps, d.lambda_max, d.lambda_schedule)
        group = self.sampler.draw() if self.only_group is None else self.only_group
        batch = {k: v.to(module.device) for k, v in self.stream.next_batch(group).items()}
        loss0 = module.lm_loss(batch)
        module.manual_backward(loss0)
        logs = {"loss": loss0.detach(), f"loss_clean/g{group}": loss0.detach()}
        perturb = lam > 0 and (d.lambda_mixing == "weighted" or self.coin.random() > 1 - lam)
        loss = loss0.detach()
        if perturb:
            sam = self._perturber(module)
            g0 = sam.stash_grads() if d.lambda_mixing == "weighted" else None
            measure = self.measure_at(module)
            norm = (sharded_norm([p.grad for p in sam.params], True) if is_sharded(module)
                    else None)
            with sam.perturbed(grad_norm_value=norm, measure=measure):
                module.model.zero_grad(set_to_none=False)
                loss1 = module.lm_loss(batch)
                module.manual_backward(loss1)
            logs[f"loss_perturbed/g{group}"] = loss1.detach()
            logs["eps_norm"] = torch.tensor(sam.last_eps_norm)  # nominal: ρ
            if measure is not None:  # what the forward saw after rounding (precision.py)
                logs["eps_realised_norm"] = torch.tensor(sam.last_realised_norm)
                logs["eps_realised_cos"] = torch.tensor(sam.last_realised_cos)
                check_realised("method=vaa", sam.last_realised_norm, sam.last_realised_cos,
                               sam.last_eps_norm, measure,
                               "dro.sam.rho")
            if g0 is not None:
                mix_grads(sam.params, g0, lam)
                loss = (1 - lam) * loss0.detach() + lam * loss1.detach()
            else:
                loss = loss1.detach()
        if d.sampler.update_q and self.only_group is None:
            self.update_sampler(module, group, loss)
        logs["grad_norm"] = self.apply_gradients(module)
        l1 = logs.get(f"loss_perturbed/g{group}")
        self.trajectory.append((group, self.sampler.probs[VUL], float(loss0.detach()),
                                None if l1 is None else float(l1)))
        self.stats["steps"] += 1
        self.stats["perturbed"] += int(perturb)
        self.stats["passes"] += 1 + int(perturb)
        logs.update({"dro/p_vulnerable": torch.tensor(self.sampler.probs[VUL]),
                     "dro/lambda": torch.tensor(lam), "dro/group": torch.tensor(float(group)),
                     "dro/perturbed_fraction": torch.tensor(self.stats["perturbed"] / self.stats["steps"]),
                     "dro/passes": torch.tensor(float(self.stats["passes"]))})
        return logs

    def update_sampler(self, module, group: int, loss: torch.Tensor) -> None:
        """EXP3 with bandit feedback (Eq. 13, the reference), or with full information
        (``dro.sampler.feedback=full``, Eq. 12, the spec's ``vaa_full_info`` ablation): the
        other group's clean loss on its next batch, one extra forward without backward."""
        if self.dro.sampler.feedback != "full":
            self.sampler.update(group, float(module.all_reduce_mean(loss)))
            return
        losses = [0.0, 0.0]
        losses[group] = float(module.all_reduce_mean(loss))
        other = 1 - group
        with torch.no_grad():
            batch = {k: v.to(module.device) for k, v in self.stream.next_batch(other).items()}
            losses[other] = float(module.all_reduce_mean(module.lm_loss(batch)))
        self.sampler.update_full(losses)

    def state_dict(self) -> dict[str, Any]:
        # The group iterators' state is the datamodule's (GroupDataModule.state_dict), which
        # Lightning checkpoints itself; here only what this method owns.
        return {"sampler": self.sampler.state_dict() if self.sampler else None,
                "coin": self.coin.getstate(),
                "stats": dict(self.stats), "trajectory": list(self.trajectory)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if not state:
            return
        # The main process after ddp_spawn has no sampler (setup ran in the children): it
        # needs only the trajectory and the stats, for write_artifacts.
        if state.get("sampler") is not None and self.sampler is not None:
            self.sampler.load_state_dict(state["sampler"])
        self.coin.setstate(state["coin"])
        self.stats = dict(state["stats"])
        self.trajectory = [tuple(t) for t in state.get("trajectory", [])]

    def write_artifacts(self, out_dir) -> None:
        """``dro_trajectory.json`` (per step: group, p after the update, clean and perturbed
        loss) and ``dro_trajectory.png`` (p over training; clean loss per group)."""
        write_trajectory(out_dir, self.trajectory, self.stats)


# --- typed hyperparameters (conf/method/vaa.yaml, gdro.yaml): /_schema_method_vaa ------------------
from dataclasses import dataclass  # noqa: E402

from vaa.config.methods import MethodConfig, method_schema  # noqa: E402


@method_schema
@dataclass
class VAAMethodConfig(MethodConfig):
    """VAA's knobs live in the ``dro`` group (its ranges: vaa.config.rules); here its handle."""

    _target_: str = "vaa.methods.vaa.VAA"
    name: str = "vaa"
    dro: Any = None  # the `dro` group, interpolated: ${dro}
    seed: int = 0
