"""Typed schemas for the hyperparameter groups.

Each group's YAML files list ``/_schema_<group>…@_here_`` first in their defaults, so Hydra
validates them against these dataclasses at composition: a misspelled key or a wrongly typed
value fails before anything trains (``attack.lrr=1`` → "Key 'lrr' not in 'AttackConfig'").
Schemas are stored without a config group, so Hydra never lists them as options
(``vaa method=foo`` lists methods only). Methods' schemas live in their own modules
(vaa/config/methods.py), the data groups' in vaa/config/data_schema.py; value ranges and
cross-field rules: vaa/config/validate.py.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional

from hydra.core.config_store import ConfigStore

from vaa.config.data_schema import DataStreamConfig, RealDataConfig, SplitConfig, SyntheticDataConfig
from vaa.config.methods import import_method_modules


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
    # adamw (torch) | adamw_8bit | paged_adamw_8bit (bitsandbytes, `pip install -e ".[gpu]"`:
    # 2 bytes of state per parameter instead of 8; paged: the state can spill to host memory)
    optimizer: str = "adamw"


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
class LoraSettings:
    """peft LoRA (``model.lora``); ``enabled: false`` trains every parameter (full FT).
    ``finetune_adapter``: how the attack (and VAA's proxy runs) train an aligned LoRA model
    (baselines.md §1): ``new_lora`` merges the alignment adapter and attaches a fresh one
    ("double LoRA"), ``continue_lora`` keeps training it ("single LoRA"), ``full`` merges it
    and trains every parameter."""

    enabled: bool = False
    r: int = 8
    alpha: int = 4
    dropout: float = 0.1
    target_modules: list[str] = field(default_factory=lambda: [
        "q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"])
    finetune_adapter: str = "new_lora"  # new_lora | continue_lora | full


@dataclass
class ModelConfig:
    name: str = "tiny"
    path: Optional[str] = None  # local weights (real models); None: build from `arch`
    arch: Optional[ArchConfig] = field(default_factory=ArchConfig)
    pretrain: Optional[PretrainConfig] = field(default_factory=PretrainConfig)
    max_length: int = 256  # prompt + response tokens in training
    max_prompt_length: int = 512
    # Real (Hugging Face) models: a hub name or `path` makes the base stage load pretrained
    # weights instead of building `arch`. These keys enter cache keys only when they differ
    # from their defaults (vaa.models.hf.hashed_model_config), so tiny-model keys are unchanged.
    hub_name: Optional[str] = None
    revision: Optional[str] = None
    dtype: Optional[str] = None  # float32 | bfloat16 | float16; None: from trainer.precision
    attn_implementation: str = "sdpa"
    gradient_checkpointing: bool = False
    pad_token: str = "add"  # a tokenizer without PAD: add <pad> (mean-initialised row) | eos
    # A GGUF file (vaa.models.gguf): de-quantised once by the base stage; found in `path` (a
    # folder), else in the folder of the installed package `gguf_package`, else as a path.
    gguf_file: Optional[str] = None
    gguf_package: Optional[str] = None
    lora: LoraSettings = field(default_factory=LoraSettings)


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
    # a reference index list (.json) is verified to index the reference's alignment set (order,
    # nothing removed, and this sha256 of its uids when set): vaa.data.reference_indices
    reference_align_checksum: Optional[str] = None
    reference_check: bool = True  # false: import without those checks (knowingly)
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


# Schemas of the groups whose options share one schema, stored at the root of the ConfigStore
# (no group: never an option) under these names; their YAMLs pull them in with @_here_.
GROUP_SCHEMAS = {"_schema_attack": AttackConfig, "_schema_model": ModelConfig,
                 "_schema_data_synthetic": SyntheticDataConfig, "_schema_data_real": RealDataConfig,
                 "_schema_task": TaskConfig, "_schema_dro": DROConfig}


def register() -> None:
    """Store every schema in Hydra's ConfigStore (idempotent; call before composing)."""
    from vaa.restore.schema import register as register_restore  # the `restore` group

    register_restore()
    import_method_modules()  # each method module registers its own schema (@method_schema)
    cs = ConfigStore.instance()
    for name, node in GROUP_SCHEMAS.items():
        cs.store(name=name, node=node)
    cs.store(name="align_schema", node=AlignConfig, package="align")
    cs.store(name="eval_schema", node=EvalConfig, package="eval")
    cs.store(name="extra_data_schema", node={"harmful": DataStreamConfig, "alignment": DataStreamConfig},
             package="extra_data")
