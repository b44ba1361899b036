"""The memory plan of a whole run: every training stage the pipeline would run for ``cfg``
(base pre-training of the tiny model, VAA's SFT pass of stage 1, alignment, fine-tuning),
each with its method, batch, LoRA setting and precision; the run's peak is the largest."""

from __future__ import annotations

from hydra.utils import get_class
from omegaconf import DictConfig, OmegaConf

from vaa.plan.footprints import footprint
from vaa.plan.memory import CPU_RUNTIME_GB, GB, GPU_RUNTIME_GB, Term, plan_stage
from vaa.plan.shapes import Shape, shape_for


DEFAULT_LORA = {"r": 8, "target_modules": None, "dropout": 0.1, "enabled": True}  # conf/model/hf.yaml


def _lora(model, stage: str, enabled: bool | None = None) -> dict | None:
    """LoRA settings of ``stage`` (None: full fine-tuning); ``enabled`` overrides the config's."""
    lora = model.get("lora") or (DEFAULT_LORA if enabled else None)
    if enabled is False or not lora or not (lora.get("enabled") or enabled):
        return None
    if stage == "finetuned" and lora.get("finetune_adapter") == "full":
        return None
    return {"r": lora["r"], "target_modules": list(lora.get("target_modules") or []) or None,
            "dropout": lora.get("dropout", 0.0)}


def stage_settings(cfg: DictConfig) -> list[dict]:
    """(stage, method class, method config, batch, optimizer) of each training stage of ``cfg``;
    each stage's optimizer is its recipe's (``align``, ``attack``, ``model.pretrain``)."""
    c = OmegaConf.to_container(cfg, resolve=True)
    out = []
    if c["model"].get("arch") and c["model"].get("pretrain"):
        out.append({"stage": "base", "target": "vaa.methods.sft.SFT", "hp": {},
                    "batch": c["model"]["pretrain"]["batch_size"],
                    "optimizer": c["model"]["pretrain"].get("optimizer")})
    method = c["method"]
    cls = get_class(method["_target_"])
    if getattr(cls, "requires_groups", False) and not (c.get("dro") or {}).get("groups_file"):
        out.append({"stage": "sft_aligned", "target": "vaa.methods.sft.SFT", "hp": {},
                    "batch": c["align"]["batch_size"], "optimizer": c["align"].get("optimizer")})
    batch = max(c["align"]["batch_size"], int(method.get("harmful_batch_size") or 0))
    out.append({"stage": "aligned", "target": method["_target_"], "hp": method, "batch": batch,
                "optimizer": c["align"].get("optimizer")})
    out.append({"stage": "finetuned", "target": c["ft_defense"]["_target_"], "hp": c["ft_defense"],
                "batch": c["attack"]["batch_size"], "optimizer": c["attack"].get("optimizer")})
    return out


def plan_restore(shape: Shape, restore: dict, length: int, runtime_gb: float | None,
                 accelerator: str) -> dict:
    """The repair stage's plan, from its class's ``plan_terms`` (the terms it allocates:
    model, vectors, one product), in ``plan_stage``'s format."""
    cls = get_class(restore["_target_"])
    hp = {k: v for k, v in restore.items() if k != "_target_"}
    terms = [Term(*t) for t in cls.plan_terms(shape, hp, length)]
    rt = runtime_gb if runtime_gb is not None else (CPU_RUNTIME_GB if accelerator == "cpu" else GPU_RUNTIME_GB)
    peak = sum(t.bytes for t in terms) / GB + rt
    return {"method": f"restore={restore.get('name', cls.__name__)}", "shape": shape.name,
            "P": shape.params(), "P_t": 0, "precision": "32-true", "batch": restore.get("batch_size"),
            "length": length, "lora": False, "gradient_checkpointing": False, "optimizer": "none",
            "pageable_gb": 0.0, "terms": terms, "terms_gb": {t.name: t.bytes / GB for t in terms} | {"runtime": rt},
            "peak_gb": peak, "static_gb": 0.0, "peak_formula": "sum of the terms",
            "note": "no training: model, vectors, one curvature product"}


def plan_run(cfg: DictConfig, shape: Shape | None = None, runtime_gb: float | None = None,
             only: tuple[str, ...] = (), lora: bool | None = None) -> dict:
    """``{"model", "P", "stages": {stage: plan_stage(...)}, "peak_gb", "peak_stage"}``; ``lora``
    forces LoRA on or off (else ``model.lora.enabled``)."""
    model, trainer = cfg.model, cfg.trainer
    shape = shape or shape_for(OmegaConf.to_container(model, resolve=True))
    stages = {}
    for s in stage_settings(cfg):
        if only and s["stage"] not in only:
            continue
        cls = get_class(s["target"])
        tuning = _lora(model, s["stage"], lora) if s["stage"] != "base" else None
        stages[s["stage"]] = plan_stage(
            shape, method=getattr(cls, "name", cls.__name__), footprint=footprint(cls, s["hp"]),
            batch=s["batch"], length=int(model.max_length), precision=str(trainer.precision), lora=tuning,
            gradient_checkpointing=bool(model.get("gradient_checkpointing") or False),
            optimizer=str(s.get("optimizer") or "adamw"),
            runtime_gb=runtime_gb, accelerator=str(trainer.accelerator),
            devices=int(trainer.devices) if str(trainer.devices).isdigit() else 1,
            sharded="fsdp" in str(trainer.strategy))
    restore = OmegaConf.to_container(cfg.restore, resolve=True) if cfg.get("restore") else {}
    if restore.get("_target_") and hasattr(get_class(restore["_target_"]), "plan_terms"):
        stages["restored"] = plan_restore(shape, restore, int(model.max_length), runtime_gb,
                                          str(trainer.accelerator))
    peak_stage = max(stages, key=lambda k: stages[k]["peak_gb"])
    return {"model": shape.name, "P": shape.params(), "stages": stages,
            "peak_gb": stages[peak_stage]["peak_gb"], "peak_stage": peak_stage}
