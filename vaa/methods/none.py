"""No alignment (``method=none``): start from a model that is already aligned.

Instruct and chat models (SmolLM2-Instruct, Llama-2-chat, Qwen-Instruct) come aligned by
their authors; the setting of the curvature-aware restoration paper, SafeLoRA and Antidote
fine-tunes such a model and then repairs it. With this method the alignment stage is the
identity: the aligned artifact *is* the base artifact (its cache key equals the base's,
vaa.pipeline.keys.plan_keys reads ``identity``), so nothing is trained or written a second
time, and the attack, VAA's stage-1 estimate, the fine-tuning defenses and every repair
start from the given model.
"""

from __future__ import annotations

from vaa.config.methods import MethodConfig, method_schema
from vaa.methods.base import TrainingMethod


@method_schema
class NoAlignmentConfig(MethodConfig):
    _target_: str = "vaa.methods.none.NoAlignment"
    name: str = "none"


class NoAlignment(TrainingMethod):
    name = "none"
    identity = True  # the aligned model is the base model (no stage runs)

    def training_step(self, module, batch):
        raise RuntimeError("method=none trains nothing: its aligned artifact is the base model "
                           "(plan_keys gives it the base's key); this step is never reached")
