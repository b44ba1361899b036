"""The base class of every training method (alignment methods and fine-tuning defenses).

A method owns the loss and the step; the LightningModule owns the model, the optimizer
and logging. The module runs with manual optimisation, so a method may take one, two or
three forward/backward passes per step (SAM, Vaccine, Booster) and then call
``apply_gradients`` once. A method overrides ``training_step`` and nothing else in the
common case (TRL's "one small class overriding one hook").
"""

from __future__ import annotations

from typing import Any

import torch

from vaa.methods.grads import clip_global_, is_sharded
from vaa.methods.precision import precision_of


class TrainingMethod:
    name = "base"
    passes_per_step = 1  # forward+backward passes per optimizer step (benchmarks.step_cost)
    # True: correct under FSDP (norms all-reduced over shards, no parameter snapshot taken
    # before sharding). Others are refused under trainer=fsdp (vaa.methods.precision).
    fsdp_safe = False

    def __init__(self, **hparams: Any):
        self.hparams = hparams

    requires_groups = False  # True: trains on the vulnerable / invulnerable groups of VAA
    # Extra data streams this method trains on besides the stage's own rows, by name:
    # "harmful" (harmful prompt → harmful answer rows, disjoint from the attack's and the
    # test's) and "alignment" (the alignment set, for fine-tuning-stage defenses). The
    # stage reads each from ``extra_data.<name>`` of the config and the datamodule serves
    # them as endless, seeded, checkpointed streams: ``datamodule.streams[name]``.
    requires: tuple[str, ...] = ()

    def make_datamodule(self, examples, tokenizer, *, groups=None, extra=None, **kw):
        """The data this method trains on; the default is shuffled mixed batches (plus the
        extra streams of ``requires``)."""
        from vaa.data.datamodule import SFTDataModule

        return SFTDataModule(examples, tokenizer, extra=extra, extra_batch_size=self.stream_batch_size,
                             **kw)

    def stream_batch_size(self, name: str, default: int) -> int:
        """Batch size of the extra stream ``name``; default: the stage's batch size."""
        return default

    def setup(self, module, datamodule) -> None:
        """Called once before training (e.g. to pick up extra data streams)."""

    def on_train_end(self, module) -> None:
        """Called once after the last step, before the model is saved (e.g. to write EMA
        weights into it)."""

    def training_step(self, module, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    def apply_gradients(self, module) -> torch.Tensor:
        """Clip the accumulated gradients (global L2), step the optimizer and the schedule,
        zero the gradients. Returns the pre-clip gradient norm. Under a sharded strategy the
        norm is all-reduced over the shards (:func:`vaa.methods.grads.clip_global_`), not
        each rank's local one."""
        opt = module.optimizers()
        clip = module.recipe.grad_clip
        params = [p for p in module.model.parameters() if p.grad is not None]
        norm = clip_global_(params, clip if clip > 0 else float("inf"), sharded=is_sharded(module))
        opt.step()
        opt.zero_grad(set_to_none=True)
        sched = module.lr_schedulers()
        if sched is not None:
            sched.step()
        return norm

    def measure_at(self, module) -> str | None:
        """The training precision (``trainer.precision``) on the steps where a method measures
        what its perturbation became after rounding (the first step, then every
        ``log_every_n_steps``), else None: the measurement costs one read of the perturbed
        tensors, so it is not taken on every step."""
        trainer = getattr(module, "_trainer", None)
        every = max(1, trainer.log_every_n_steps) if trainer is not None else 1
        first = not getattr(self, "_measured_once", False)
        if first or module.global_step % every == 0:
            self._measured_once = True
            return precision_of(module)
        return None

    def write_artifacts(self, out_dir) -> None:
        """Method-specific outputs saved beside the trained model (e.g. VAA's sampler
        trajectory and its plot). Nothing by default."""

    # Per-method state saved with Lightning checkpoints (sampler, anchors, EMA weights, …).
    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        pass
