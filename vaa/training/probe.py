"""A callback that decodes a fixed prompt set at chosen training steps and judges the
answers: VAA's stage 1 watches which alignment examples turn harmful during a proxy
harmful fine-tuning run."""

from __future__ import annotations

from typing import Callable, Sequence

import lightning as L

from vaa.data.formats import Example
from vaa.eval.evaluate import answers


class JudgeProbe(L.Callback):
    """Records ``flags[t]`` (one bool per example) at step 0 (before training) and after
    each step in ``at_steps``; ``judge_fn(prompts, answers) -> flags``."""

    def __init__(self, examples: Sequence[Example], tokenizer, judge_fn: Callable, at_steps: Sequence[int],
                 *, template: str, max_new_tokens: int, batch_size: int, max_prompt_length: int = 512):
        self.examples, self.tokenizer, self.judge_fn = list(examples), tokenizer, judge_fn
        self.at_steps = sorted(set(at_steps))
        self.kw = dict(template=template, max_new_tokens=max_new_tokens, batch_size=batch_size,
                       max_prompt_length=max_prompt_length)
        self.flags: list[list[bool]] = []
        self.steps: list[int] = []

    def _probe(self, pl_module, step: int) -> None:
        outs = answers(pl_module.model, self.tokenizer, self.examples, description=f"probe @{step}",
                       **self.kw)
        self.flags.append([bool(f) for f in self.judge_fn([e.input for e in self.examples], outs)])
        self.steps.append(step)

    def on_train_start(self, trainer, pl_module) -> None:
        if not self.steps:
            self._probe(pl_module, 0)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if trainer.global_step in self.at_steps and trainer.global_step not in self.steps:
            self._probe(pl_module, trainer.global_step)
