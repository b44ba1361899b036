"""Typed schemas of the ``restore`` group (post-fine-tuning repair, specs/restoration.md).

Every ``conf/restore/<name>.yaml`` lists ``/_schema_restore_<name>@_here_`` first in its defaults, so a
misspelled or wrongly typed key fails when the config is composed (``restore.alhpa=1`` →
"Key 'alhpa' not in 'MergeRestoreConfig'"). Kept free of torch so composing stays fast.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

from hydra.core.config_store import ConfigStore


@dataclass
class RestoreConfig:
    """``restore=none``: no ``_target_``, so the pipeline adds no stage."""

    _target_: Optional[str] = None
    name: str = "none"


@dataclass
class RestoreDataConfig(RestoreConfig):
    """The repair data (rows from the world's files; the HFT poison pool is never used).

    harmful: harmful prompt → harmful answer (``beavertails/align_harmful``, disjoint from the
    HFT rows and the harmful-score test prompts); task: the first ``n_task`` rows of the
    task's train split (the benign fine-tuning data)."""

    harmful_dataset: str = "beavertails"
    harmful_split: str = "align_harmful"
    n_harmful: Optional[int] = 256  # None: every row of the split
    n_task: int = 256
    batch_size: int = 32  # sequences per forward pass (no effect on the maths)
    seed: int = 0


@dataclass
class StepConfig:
    variant: str = "newton_trust_region"  # newton_trust_region | influence | penalised
    objective: str = "harmful_ascent"  # harmful_ascent (raise L_h) | refusal (lower refusal NLL)
    refusal_split: str = "align"  # beavertails/<split>: harmful prompt → refusal (objective=refusal)
    outer_steps: int = 2  # K (spec: 3; the third step was always rejected on the default world)
    trust_radius: float = 0.05  # δ, nats of task loss (½ΔᵀH_λΔ ≤ δ)
    task_guard: float = 0.02  # ε_task: max relative increase of the validation task loss
    harmful_clamp: float = 5.0  # τ, nats
    max_backtracks: int = 8
    n_val: int = 64  # validation task rows (the last rows of the train split)
    influence_n: Optional[int] = None  # n of the influence step (HFT set size); null: attack.n
    alpha: float = 1.0  # penalised: weight of −min(L_h, τ)
    mu: float = 1e-2  # penalised: proximal weight (μ/2)‖θ − θ_ft‖²
    lbfgs_lr: float = 1.0
    lbfgs_max_iter: int = 50


@dataclass
class CurvatureOptions:
    backend: str = "cg"  # identity | diag_fisher | kfac | cg | lbfgs_ihvp
    hvp: str = "ggn"  # exact (double backward) | ggn (Gauss-Newton, PSD)
    damping: float = 1e-3  # λ; relative to mean(diag Fisher) when damping_relative
    damping_relative: bool = True
    iters: int = 10  # T: CG / L-BFGS iterations (spec: 30; 10 repairs as well at a third of the cost)
    history: int = 20  # L-BFGS memory m
    tol: float = 1e-6  # relative residual of CG
    n_hvp: int = 64  # task rows of the curvature estimate (fixed, so H is one matrix)


@dataclass
class GeometryConfig:
    enabled: bool = True
    top_k: int = 4  # eigenpairs of the harmful-loss GGN at θ_0 and θ_ft
    power_iters: int = 8
    n_rows: int = 32


@dataclass
class CurvatureRestoreConfig(RestoreDataConfig):
    _target_: Optional[str] = "vaa.restore.curvature.CurvatureRestore"
    name: str = "curvature"
    modules: list[str] = field(default_factory=lambda: [
        "q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"])
    step: StepConfig = field(default_factory=StepConfig)
    curvature: CurvatureOptions = field(default_factory=CurvatureOptions)
    geometry: GeometryConfig = field(default_factory=GeometryConfig)


@dataclass
class PanaceaRestoreConfig(RestoreDataConfig):
    _target_: Optional[str] = "vaa.restore.panacea.Panacea"
    name: str = "panacea"
    n_harmful: Optional[int] = None  # the guide set: all of align_harmful
    lam: float = 1e-3  # λ
    rho: float = 1.0  # ρ, global L2 norm of ε
    clamp: float = 5.0  # h(w + ε) clamp


@dataclass
class MergeRestoreConfig(RestoreConfig):
    _target_: Optional[str] = "vaa.restore.merge.Merge"
    name: str = "merge"
    method: str = "linear"  # linear | slerp | dare | ties
    alpha: float = 0.5  # λ: 0 = aligned (pre-HFT), 1 = fine-tuned (post-HFT)
    drop: float = 0.9  # dare: drop probability d
    density: float = 0.3  # ties: kept fraction of τ by magnitude
    seed: int = 0


@dataclass
class AntidoteRestoreConfig(RestoreDataConfig):
    _target_: Optional[str] = "vaa.restore.antidote.Antidote"
    name: str = "antidote"
    n_harmful: Optional[int] = None
    dense_ratio: float = 0.1  # fraction of each output row's weights zeroed
    targets: list[str] = field(default_factory=lambda: ["q_proj", "k_proj", "v_proj"])
    score: str = "weight"  # weight (Wanda |W|·‖X‖, upstream) | delta (|W_ft − W_al|·‖X‖, reset to aligned)
    sequential: bool = True  # block l's inputs come from the already-pruned blocks < l (Wanda)


@dataclass
class SafeLoRARestoreConfig(RestoreConfig):
    _target_: Optional[str] = "vaa.restore.safelora.SafeLoRA"
    name: str = "safelora"
    targets: list[str] = field(default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj"])
    select: str = "number"  # number (the num_proj_layers lowest cosines) | threshold (cos ≤ threshold)
    num_proj_layers: int = 10
    threshold: float = 0.5


@dataclass
class QRealignRestoreConfig(RestoreDataConfig):
    _target_: Optional[str] = "vaa.restore.q_realign.QRealign"
    name: str = "q_realign"
    n_harmful: Optional[int] = 150  # malicious calibration prompts (75 % of 200)
    n_task: int = 50  # benign calibration prompts
    bits: int = 8
    epochs: int = 10
    lr: float = 1e-2
    probe_l1: float = 1e-3
    probe_steps: int = 300
    targets: list[str] = field(default_factory=lambda: [
        "q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"])


SCHEMAS = {"none": RestoreConfig, "curvature": CurvatureRestoreConfig, "panacea": PanaceaRestoreConfig,
           "merge": MergeRestoreConfig, "antidote": AntidoteRestoreConfig,
           "safelora": SafeLoRARestoreConfig, "q_realign": QRealignRestoreConfig}


def register() -> None:
    cs = ConfigStore.instance()
    for name, node in SCHEMAS.items():  # no group: never listed as an option of `restore`
        cs.store(name=f"_schema_restore_{name}", node=node)
