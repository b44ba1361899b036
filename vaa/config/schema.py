"""Typed schemas for the hyperparameter groups.

Each group's YAML files list ``<group>_schema`` first in their defaults, so Hydra validates
them against these dataclasses at composition: a misspelled key or a wrongly typed value
fails before anything trains (``attack.lrr=1`` → "Key 'lrr' not in 'AttackConfig'").
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional

from hydra.core.config_store import ConfigStore

from vaa.world.generator import WorldSizes


@dataclass
class TrainRecipe:
    """Optimisation settings shared by every training stage (AdamW; lr in absolute units)."""

    lr: float = 1e-3
    epochs: int = 1
    max_steps: int = -1  # > 0 overrides epochs
    batch_size: int = 8
    weight_decay: float = 0.1
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    grad_clip: float = 1.0  # global L2 norm; 0 disables
    schedule: str = "constant"  # constant | cosine
    warmup_ratio: float = 0.0


@dataclass
class AlignConfig(TrainRecipe):
    n: Optional[int] = None  # alignment rows used (None: all)


@dataclass
class AttackConfig(TrainRecipe):
    """Harmful fine-tuning: n rows, of which floor(p*n) harmful (protocol.md §3.3)."""

    n: int = 1000
    harmful_ratio: float = 0.1


@dataclass
class ArchConfig:
    hidden_size: int = 128
    num_hidden_layers: int = 2
    num_attention_heads: int = 4
    num_key_value_heads: int = 4
    intermediate_size: int = 256
    max_position_embeddings: int = 512
    tie_word_embeddings: bool = True
    rms_norm_eps: float = 1e-6
    initializer_range: float = 0.02


@dataclass
class PretrainConfig(TrainRecipe):
    seed: int = 0


@dataclass
class ModelConfig:
    name: str = "tiny"
    path: Optional[str] = None  # local weights (real models); None: build from `arch`
    arch: Optional[ArchConfig] = field(default_factory=ArchConfig)
    pretrain: Optional[PretrainConfig] = field(default_factory=PretrainConfig)
    max_length: int = 256  # prompt + response tokens in training
    max_prompt_length: int = 512


@dataclass
class SyntheticDataConfig(WorldSizes):
    """Sizes of the synthetic world; the defaults live in ``WorldSizes`` (one source)."""

    name: str = "synthetic"


@dataclass
class SplitConfig:
    file: str = "train"  # logical name, resolved by the data source
    start: int = 0
    stop: Optional[int] = None


@dataclass
class TaskConfig:
    name: str = "sst2"
    dataset: str = "sst2"  # dataset name in the data source
    format: str = "sst2"  # row format (vaa.data.formats)
    train: SplitConfig = field(default_factory=SplitConfig)
    test: SplitConfig = field(default_factory=SplitConfig)
    scorer: str = "sst2"
    scorer_args: dict[str, Any] = field(default_factory=dict)
    max_new_tokens: int = 4


@dataclass
class MethodConfig:
    """Base schema of an alignment method. Methods with knobs add them in their YAML under
    typed groups (VAA: ``dro``) or subclass this schema."""

    _target_: str = "vaa.methods.sft.SFT"
    name: str = "sft"


@dataclass
class VAAMethodConfig(MethodConfig):
    _target_: str = "vaa.methods.vaa.VAA"
    name: str = "vaa"
    dro: Any = None  # the `dro` group, interpolated: ${dro}
    seed: int = 0


@dataclass
class ProxyRun:
    """One stage-1 proxy HFT run: a task's rows mixed with the proxy harmful pool."""

    name: str = "alpaca"
    dataset: str = "alpaca_eval"
    format: str = "alpaca_eval"
    split: str = "eval"
    start: int = 0
    stop: Optional[int] = 1000
    harmful_ratio: float = 0.1


@dataclass
class EstimateConfig:
    """VAA stage 1 (vaa.md §2): proxy runs, checkpoints, ForgotNum definition, aggregation."""

    proxies: list[ProxyRun] = field(default_factory=lambda: [ProxyRun()])
    n: int = 1000
    lr: float = 3e-5
    epochs: int = 2
    batch_size: int = 16
    weight_decay: float = 0.1
    checkpoints: int = 4  # T, evenly spaced over the run; t = 0 is always probed
    definition: str = "first_vs_t0"  # first_vs_t0 | transitions
    aggregate: str = "union"  # union | intersection


@dataclass
class SamplerConfig:
    eta: float = 0.007
    init: str = "uniform"  # uniform | empirical
    clip: Optional[list[float]] = field(default_factory=lambda: [0.1, 0.9])  # reference code only
    feedback: str = "bandit"  # bandit | full
    update_q: bool = True


@dataclass
class SAMConfig:
    rho: float = 0.4
    restore: str = "copy"  # copy (exact) | subtract


@dataclass
class DROConfig:
    """VAA stage 2 (vaa.md §3-4). Defaults: the reference Llama script."""

    name: str = "default"
    groups_file: Optional[str] = None  # groups.jsonl or the reference's index list; None: estimate
    sampler: SamplerConfig = field(default_factory=SamplerConfig)
    sam: SAMConfig = field(default_factory=SAMConfig)
    lambda_max: float = 1.0
    lambda_schedule: str = "linear"  # linear | constant
    lambda_mixing: str = "bernoulli"  # bernoulli (code) | weighted (paper)
    estimate: EstimateConfig = field(default_factory=EstimateConfig)


@dataclass
class EvalConfig:
    hs_max_new_tokens: int = 48
    batch_size: int = 64
    n_hs_prompts: Optional[int] = None  # None: every held-out harmful prompt


def register() -> None:
    cs = ConfigStore.instance()
    cs.store(group="attack", name="attack_schema", node=AttackConfig)
    cs.store(group="model", name="model_schema", node=ModelConfig)
    cs.store(group="data", name="synthetic_schema", node=SyntheticDataConfig)
    cs.store(group="task", name="task_schema", node=TaskConfig)
    cs.store(group="method", name="method_schema", node=MethodConfig)
    cs.store(group="method", name="vaa_schema", node=VAAMethodConfig)
    cs.store(group="dro", name="dro_schema", node=DROConfig)
    cs.store(name="align_schema", node=AlignConfig, package="align")
    cs.store(name="eval_schema", node=EvalConfig, package="eval")
