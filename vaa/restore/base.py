"""The ``restore`` stage: repair the fine-tuned (attacked) model, one method per class.

A restorer reads the fine-tuned model and, as it declares, the aligned (pre-HFT) and base
(unaligned) models and the repair data; it returns the repaired model. The pipeline saves it
and evaluates it like every other stage (``stages.restored`` in ``metrics.json``).

    class MyRepair(Restorer):
        schema = MyRepairConfig             # typed hyperparameters (vaa/restore/schema.py)
        reads = ("aligned",)                # models beyond the fine-tuned one (cache-key inputs)
        def restore(self, model, inputs):   # -> the repaired model (may be ``model``, edited)
            ...

``reads`` is part of the stage's cache key (keys.py), so a method that uses the aligned
model is recomputed when the aligned model changes. Cost accounting: ``self.passes`` counts
sequence-level forward(+backward) passes; the stage writes it with the wall time to
``restore.json`` beside the model.
"""

from __future__ import annotations

import json
import time
from functools import cached_property
from pathlib import Path
from typing import Callable, Sequence

import torch
from omegaconf import OmegaConf

from vaa.data.datamodule import hft_mix
from vaa.data.encode import TrainCollator, encode_rows, left_pad, prompt_ids
from vaa.data.formats import Example
from vaa.models.build import load_model, save_model
from vaa.restore.schema import RestoreConfig
from vaa.training.module import response_loss
from vaa.training.progress import ProgressLine


class RestoreInputs:
    """What a restorer may read: models (loaded on first use), repair data, encoding settings.

    ``train(module_cls, model, tokenizer, examples, recipe, method, stage, seed)`` is the
    pipeline's one training routine, for methods that own a fine-tuning loop (Panacea).
    ``device``: where the repair runs (the model's device, :func:`restore_device`); models
    loaded here and batches built here are put there."""

    def __init__(self, *, cfg, source, model_dirs: dict[str, Path], tokenizer,
                 train: Callable | None = None, device: torch.device | str = "cpu"):
        self.cfg, self.source, self.model_dirs, self.tokenizer = cfg, source, model_dirs, tokenizer
        self.train = train
        self.device = torch.device(device)
        self.template = cfg.template.train
        self.max_length, self.max_prompt_length = cfg.model.max_length, cfg.model.max_prompt_length
        self.seed = int(cfg.seed)

    def load(self, which: str) -> torch.nn.Module:
        """A fresh copy of the ``aligned`` or ``base`` model (declared in ``Restorer.reads``)."""
        if which not in self.model_dirs:
            raise KeyError(f"restore: model {which!r} not available; the restorer must list it in "
                           f"`reads` (available: {sorted(self.model_dirs)})")
        model, _ = load_model(self.model_dirs[which])
        return model.to(self.device).eval()

    def harmful(self, hp) -> list[Example]:
        """Harmful prompt → harmful answer rows (``hp.harmful_split``; never the HFT pool)."""
        if hp.harmful_split == "harmful":
            raise ValueError("restore.harmful_split=harmful is the attack's poison pool; use "
                             "align_harmful (disjoint from the HFT rows and the test prompts)")
        return self.source.examples(hp.harmful_dataset, hp.harmful_split, 0, hp.n_harmful)

    def refusals(self, split: str, n: int | None) -> list[Example]:
        return self.source.examples("beavertails", split, 0, n)

    def task(self, n: int, last: bool = False) -> list[Example]:
        """The first (or, for validation, the last) ``n`` rows of the task's train split."""
        rows = self.task_rows
        return list(rows[-n:] if last else rows[:n])

    @cached_property
    def task_rows(self) -> list[Example]:
        t = self.cfg.task
        return self.source.examples(t.dataset, t.train.file, t.train.start, t.train.stop, t.format)

    def hft(self) -> list[Example]:
        """The attack's rows (the user's data), for methods that replay the fine-tuning run."""
        a = self.cfg.attack
        return hft_mix(self.task_rows, self.source.examples("beavertails", "harmful"), a.n, a.harmful_ratio)

    def batches(self, examples: Sequence[Example], batch_size: int) -> list[dict[str, torch.Tensor]]:
        """Fixed (unshuffled) training batches: templated, response-only labels, padded."""
        rows, _ = encode_rows(self.tokenizer, examples, self.template, self.max_length,
                              self.max_prompt_length, what="restore rows")  # warns on cut targets
        collate = TrainCollator(self.tokenizer.pad_token_id)
        return [{k: v.to(self.device) for k, v in collate(rows[i:i + batch_size]).items()}
                for i in range(0, len(rows), batch_size)]


    def prompt_batches(self, examples: Sequence[Example], batch_size: int) -> list[dict[str, torch.Tensor]]:
        """Prompt-only batches, left-padded (each row's last position is its prompt's last
        token, as in decoding), built on the host and put on ``device``."""
        ids = [prompt_ids(self.tokenizer, ex, self.template, self.max_prompt_length) for ex in examples]
        pad = self.tokenizer.pad_token_id
        return [{k: v.to(self.device) for k, v in left_pad(ids[i:i + batch_size], pad).items()}
                for i in range(0, len(ids), batch_size)]


def n_tokens(batch: dict[str, torch.Tensor]) -> int:
    return int((batch["labels"][:, 1:] != -100).sum())


def dataset_loss(model: torch.nn.Module, batches: Sequence[dict]) -> torch.Tensor:
    """Response-token NLL over all ``batches`` (token-weighted mean, as one big batch)."""
    total = sum(n_tokens(b) for b in batches)
    return sum(response_loss(model, b) * (n_tokens(b) / total) for b in batches)


def per_example_losses(model: torch.nn.Module, batches: Sequence[dict]) -> torch.Tensor:
    """One response NLL per row (for the geometry diagnostic's correlations)."""
    out = []
    with torch.no_grad():
        for b in batches:
            for i in range(b["input_ids"].shape[0]):
                n = int(b["attention_mask"][i].sum())
                out.append(response_loss(model, {k: v[i:i + 1, :n] for k, v in b.items()}))
    return torch.stack(out)


class Restorer:
    """Base class: typed hyperparameters in ``self.hp``, pass counting, ``restore``."""

    schema = RestoreConfig
    reads: tuple[str, ...] = ()  # "aligned" and/or "base"
    # A repair runs in the main process on the whole model, outside the sharded training loop,
    # so trainer=fsdp does not change what it computes; one that trains (Panacea) says False.
    fsdp_safe = True

    def __init__(self, **hparams):
        self.hp = OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(self.schema), hparams))
        self.passes = 0  # sequence passes (forward, or forward + backward), for the cost column
        self.progress = None  # a ProgressLine while the stage runs (restore_stage): lines in a log
        self.info: dict = {}  # method-specific diagnostics, written to restore.json

    def restore(self, model: torch.nn.Module, inputs: RestoreInputs) -> torch.nn.Module:
        raise NotImplementedError

    def diagnose(self, model: torch.nn.Module, inputs: RestoreInputs) -> dict:
        """Optional diagnostics of the fine-tuned model, timed apart from the repair."""
        return {}

    def count(self, batches: Sequence[dict], times: int = 1) -> None:
        n = times * sum(int(b["input_ids"].shape[0]) for b in batches)
        self.passes += n
        if self.progress is not None:
            self.progress.update(n)


def restore_device(trainer_cfg) -> torch.device:
    """The repair runs where training runs: the GPU when the trainer uses one, else the CPU
    (a 7B repair on the CPU would hold its curvature vectors in host memory)."""
    if torch.cuda.is_available() and str(trainer_cfg.accelerator) in ("gpu", "cuda", "auto"):
        return torch.device("cuda")
    return torch.device("cpu")


def restore_stage(cfg, source, dirs: dict[str, Path], out: Path, restorer: Restorer,
                  train: Callable | None = None) -> dict:
    """Build the ``restored`` artifact: load the fine-tuned model, repair, save model and
    ``restore.json`` (method, wall seconds, passes, diagnostics)."""
    model, tokenizer = load_model(dirs["finetuned"])
    device = restore_device(cfg.trainer)
    model.to(device).eval()  # no dropout: deterministic losses and HVPs
    inputs = RestoreInputs(cfg=cfg, source=source, tokenizer=tokenizer, train=train, device=device,
                           model_dirs={k: dirs[k] for k in restorer.reads})
    diagnostic = restorer.diagnose(model, inputs)
    t0 = time.perf_counter()
    # a repair's length is not known in advance (trust-region backtracks, CG's early stop):
    # lines count its sequence passes (``count``) and their rate, as training lines count steps
    with ProgressLine("restored", total=None, unit="sequence") as restorer.progress:
        model = restorer.restore(model, inputs)
    restorer.progress = None
    record = {"method": restorer.hp.name, "wall_s": round(time.perf_counter() - t0, 3),
              "passes": restorer.passes, **restorer.info}
    if diagnostic:
        record["geometry"] = diagnostic
        (out / "geometry.json").write_text(json.dumps(diagnostic, indent=1))
    save_model(model, tokenizer, out)
    (out / "restore.json").write_text(json.dumps(record, indent=1))
    return record
