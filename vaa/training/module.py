"""LightningModules: the model, the optimizer and logging; the step belongs to a method.

``AlignModule`` trains with an alignment method (``method=``), ``FinetuneModule`` with the
harmful fine-tuning attack's step (``ft_defense=``; plain SFT when none). Both run with
manual optimisation so that a method can take several forward/backward passes per step.
"""

from __future__ import annotations

import math

import lightning as L
import torch

from vaa.methods.base import TrainingMethod
from vaa.methods.precision import check_strategy
from vaa.training import host_memory
from vaa.training.optim import build_optimizer


def response_loss(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Cross-entropy of the next-token prediction at response positions only.

    Identical in value to ``model(..., labels=labels).loss``, but the output projection runs
    only where a label exists: the prompt (most of each row) never pays for its logits,
    which saves time on small models and a (tokens × vocab) tensor on large ones. Models
    without the usual decoder / output-embedding split fall back to the library's loss.
    """
    labels = batch["labels"][:, 1:]
    decoder, head = model.get_decoder(), model.get_output_embeddings()
    if decoder is None or head is None:
        return model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                     labels=batch["labels"]).loss
    hidden = decoder(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])[0]
    keep = labels != -100
    logits = head(hidden[:, :-1][keep]).float()
    return torch.nn.functional.cross_entropy(logits, labels[keep])


class CausalLMModule(L.LightningModule):
    log_prefix = "train"
    recipe_key = "align"  # the recipe's config node, named in errors (optimizer)

    def __init__(self, model: torch.nn.Module, method: TrainingMethod, recipe, total_steps: int):
        super().__init__()
        self.model, self.method, self.recipe = model, method, recipe
        self.total_steps = max(1, total_steps)
        self.automatic_optimization = False

    def lm_loss(self, batch: dict[str, torch.Tensor], model: torch.nn.Module | None = None) -> torch.Tensor:
        """Mean token cross-entropy over the response tokens of the whole batch (labels -100
        elsewhere), the reduction of the reference code. See ``response_loss``."""
        return response_loss(model or self.model, batch)
    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> None:
        logs = self.method.training_step(self, batch)
        self.last_logs = logs  # the progress line/bar reads the latest loss (training/progress.py)
        # Lightning writes step metrics every log_every_n_steps anyway; calling log_dict only
        # then halves the loop overhead (benchmarks.loop_overhead --explain: 2.0 → 1.0 ms/step).
        every = max(1, self.trainer.log_every_n_steps) if self._trainer is not None else 1
        if self.global_step % every == 0:  # after this step's optimizer step, as Lightning counts
            self.log_dict({f"{self.log_prefix}/{k}": v for k, v in logs.items()},
                          prog_bar=True, on_step=True, batch_size=self.recipe.batch_size)

    def setup(self, stage: str) -> None:
        # Refuse fp16 mixed precision and FSDP for methods that would compute wrong there,
        # before any step (vaa.methods.precision).
        check_strategy(self.method, self.trainer.precision, type(self.trainer.strategy).__name__)
        # The datamodule is set up first; a checkpoint is restored after this hook.
        self.method.setup(self, self.trainer.datamodule)
        host_memory.inherit()  # a spawned DDP rank: the job's trainer.host_heap, from its parent

    def on_train_end(self) -> None:
        self.method.on_train_end(self)
        handoff = getattr(self, "state_handoff", None)
        if handoff is not None and self.global_rank == 0 and spawned(self.trainer):
            torch.save(self.method.state_dict(), handoff)  # read back by fit_and_recover

    def manual_backward(self, loss: torch.Tensor, *args, **kwargs) -> None:
        """Lightning's backward (precision plugin, DDP's all-reduce); then, with
        ``trainer.host_heap=trim`` on a CPU, the heap it freed goes back to the OS
        (training/host_memory.py; VAA's step on SmolLM2: 3.81 → 3.17 GB peak)."""
        super().manual_backward(loss, *args, **kwargs)
        host_memory.after_backward()

    def all_reduce_mean(self, value: torch.Tensor) -> torch.Tensor:
        """Mean over data-parallel ranks (identity on one device): every rank's sampler
        must see the same loss. ``value`` is left unchanged (the DDP all-reduce works in place,
        and callers log the tensor they pass)."""
        return self.trainer.strategy.reduce(value.detach().clone(), reduce_op="mean")

    def configure_optimizers(self):
        r = self.recipe
        params = [p for p in self.model.parameters() if p.requires_grad]
        opt = build_optimizer(params, r, self.recipe_key)  # <recipe>.optimizer (vaa/training/optim.py)
        warmup = int(r.warmup_ratio * self.total_steps)

        def factor(step: int) -> float:
            if step < warmup:
                return (step + 1) / warmup
            if r.schedule == "cosine":
                progress = (step - warmup) / max(1, self.total_steps - warmup)
                return 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))
            if r.schedule == "constant":
                return 1.0
            raise ValueError(f"unknown schedule {r.schedule!r}; use constant or cosine")
        sched = torch.optim.lr_scheduler.LambdaLR(opt, factor)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        checkpoint["method_state"] = self.method.state_dict()

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        self.method.load_state_dict(checkpoint.get("method_state", {}))


class AlignModule(CausalLMModule):
    log_prefix = "align"


class FinetuneModule(CausalLMModule):
    log_prefix = "finetune"
    recipe_key = "attack"


class PretrainModule(CausalLMModule):
    log_prefix = "base"
    recipe_key = "model.pretrain"


def spawned(trainer) -> bool:
    """Whether training runs in child processes (``ddp_spawn``, ``ddp_fork``): only the
    weights come back to the main process by themselves."""
    from lightning.pytorch.strategies.launchers import _MultiProcessingLauncher

    return isinstance(getattr(trainer.strategy, "launcher", None), _MultiProcessingLauncher)


def fit_and_recover(trainer, module: CausalLMModule, datamodule, ckpt_path=None) -> None:
    """``trainer.fit`` and, under a spawning strategy, the method's state back from rank 0
    (VAA's sampler trajectory and stats, EMA's counters, …): Lightning returns only the
    weights from the children, so without this ``dro_trajectory.json`` would be empty."""
    import tempfile
    from pathlib import Path

    with tempfile.TemporaryDirectory(prefix="vaa-handoff-") as tmp:
        module.state_handoff = Path(tmp) / "method_state.pt"
        try:
            trainer.fit(module, datamodule=datamodule, ckpt_path=ckpt_path)
            if spawned(trainer) and module.state_handoff.is_file():
                module.method.load_state_dict(torch.load(module.state_handoff, weights_only=True))
        finally:
            module.state_handoff = None
