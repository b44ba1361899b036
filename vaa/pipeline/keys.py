"""Which config subtree each stage depends on, and the resulting cache keys.

Pure functions of the config: ``plan_keys`` is what the tests check (changing one stage's
subtree changes that stage's key and those downstream, nothing upstream) and what the
pipeline uses, so the two cannot disagree. Beside its subtree, a key holds what else
changes the artifact: the trainer settings the stage trains (or decodes) under and a digest of
the code that builds it (vaa/pipeline/source_digest.py), so neither a precision or device
change nor an edited method, training loop, judge or repair is ever served a stale artifact.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

from hydra.utils import get_class
from omegaconf import DictConfig, OmegaConf

from vaa.data.hub import is_real_data, real_data_fingerprint
from vaa.models.hf import hashed_model_config, is_hf_model, resolve_dtype
from vaa.pipeline.cache import stage_key
from vaa.pipeline.source_digest import PACKAGE_ROOT, code_digest, target_module


def _sub(cfg: DictConfig, *keys: str) -> dict:
    return {k: OmegaConf.to_container(cfg[k], resolve=True) if OmegaConf.is_config(cfg[k]) else cfg[k]
            for k in keys}


# ---------------------------------------------------------------------------------------------
# What besides its config subtree changes an artifact: the trainer settings a stage trains
# under, and the code that builds it (vaa/pipeline/source_digest.py).
# ---------------------------------------------------------------------------------------------
# Trainer keys that change no artifact: how progress is shown and logged and how often a stage
# checkpoints for resumption. Every other trainer key (precision, devices, strategy,
# accelerator, deterministic, and any added later, e.g. gradient accumulation) enters the key
# of every stage that trains, so a bf16-true run never reuses a model trained in bf16-mixed or
# on two devices (issue 12, item 1).
NOT_ARTIFACT_TRAINER = ("progress_bar", "progress_every_s", "progress_every_n_steps",
                        "log_every_n_steps", "checkpoint_every_n_steps", "threads", "host_heap")
# The estimate stage's proxy runs train on one device whatever the alignment uses
# (vaa/pipeline/estimate.py merges these into the trainer config).
ESTIMATE_TRAINER = {"devices": 1, "strategy": "auto"}


def n_devices(devices) -> int | str:
    """Lightning's ``devices`` as a count (the global batch is ``batch_size`` x count): an int
    as is, a list of ids by its length, a digit string as an int; ``auto``/-1 stay ``"auto"``
    (the machine decides)."""
    if isinstance(devices, (list, tuple)):
        return len(devices)
    if isinstance(devices, str) and devices.strip().lstrip("-").isdigit():
        devices = int(devices)
    if isinstance(devices, str) and "," in devices:  # "0,1": device ids
        return len([d for d in devices.split(",") if d.strip()])
    return "auto" if devices in (-1, "auto", "-1") else devices


def training_runtime(trainer: DictConfig, **overrides) -> dict:
    """The trainer settings a training stage's artifact depends on (``NOT_ARTIFACT_TRAINER``
    left out, ``devices`` as a count); ``overrides`` as the stage applies them."""
    t = {**OmegaConf.to_container(trainer, resolve=True), **overrides}
    out = {k: v for k, v in t.items() if k not in NOT_ARTIFACT_TRAINER}
    out["devices"] = n_devices(out.get("devices", 1))
    return out


def eval_runtime(trainer: DictConfig) -> dict:
    """What of the trainer changes an evaluation's outputs: the dtype the model is decoded in.
    Mirrors ``vaa.models.hf.to_eval_device`` (bf16 on a GPU when the trainer trains in bf16;
    otherwise the model's own dtype), as on a machine with a GPU."""
    gpu = str(trainer.accelerator) in ("gpu", "cuda", "auto")
    return {"eval_dtype": "bfloat16" if gpu and "bf16" in str(trainer.precision) else "model"}


# The code each stage runs, as roots of source_digest.code_digest: modules (followed through
# their vaa imports) or named functions of the stage module.
TRAIN_CODE = ("vaa.training.fit", "vaa.training.module", "vaa.data.datamodule", "vaa.data.encode",
              "vaa.data.templates", "vaa.data.sources", "vaa.models.build", "vaa.models.hf",
              "vaa.pipeline.stages:train")
EVAL_CODE = ("vaa.pipeline.stages:build_eval", "vaa.eval.evaluate", "vaa.eval.scorers",
             "vaa.eval.pairwise", "vaa.eval.generate", "vaa.models.build", "vaa.models.hf",
             "vaa.data.sources", "vaa.data.templates")
GROUPS_CODE = ("vaa.pipeline.stages:group_file,load_groups", "vaa.data.groups_file")


SOURCE_ROOT = PACKAGE_ROOT  # the vaa package whose code is hashed (tests: an edited copy)


def code(*roots: str) -> str:
    return code_digest(tuple(sorted(set(roots))), str(SOURCE_ROOT))


def world_code(cfg: DictConfig) -> str:
    """The world is defined by code as much as by config: the synthetic generator, or the
    real-data slicer (vaa/data/hub.py and what it imports)."""
    builder = "vaa.data.hub" if is_real_data(cfg.data) else "vaa.world.generator"
    return code(builder, "vaa.pipeline.stages:build_world")


def judge_module(cfg: DictConfig) -> str:
    return target_module(cfg.judge.build._target_)


def task_train_subtree(cfg: DictConfig) -> dict:
    t = cfg.task
    return {"dataset": t.dataset, "format": t.format,
            "train": OmegaConf.to_container(t.train, resolve=True)}


def task_eval_subtree(cfg: DictConfig) -> dict:
    t = cfg.task
    return {"dataset": t.dataset, "format": t.format, "test": OmegaConf.to_container(t.test, resolve=True),
            "scorer": t.scorer, "scorer_args": OmegaConf.to_container(t.scorer_args, resolve=True),
            "max_new_tokens": t.max_new_tokens}


SFT_METHOD = {"_target_": "vaa.methods.sft.SFT", "name": "sft"}  # = conf/method/sft.yaml


def needs_groups(cfg: DictConfig) -> bool:
    """Whether the alignment method trains on vulnerable / invulnerable groups (VAA): its
    class says so (``requires_groups``), no method name is special-cased."""
    return bool(getattr(get_class(cfg.method._target_), "requires_groups", False))


def file_digest(path: str) -> str:
    p = Path(path).expanduser()
    if not p.is_file():
        raise FileNotFoundError(f"dro.groups_file: no file at {p}; give a groups.jsonl written by "
                                f"the estimate stage, the reference's JSON index list, or null")
    return hashlib.sha256(p.read_bytes()).hexdigest()[:16]


def required_data(cfg: DictConfig, target: str) -> dict:
    """The ``extra_data`` entries the method class ``target`` requires (``requires``), for its
    stage's key; empty for methods that need none (so their keys are unchanged)."""
    names = getattr(get_class(target), "requires", ())
    return {n: OmegaConf.to_container(cfg.extra_data[n], resolve=True) for n in names
            if n in cfg.get("extra_data", {})}


def _aligned_key(cfg: DictConfig, method, upstream: list[str]) -> str:
    extra = required_data(cfg, method["_target_"])
    groups = GROUPS_CODE if getattr(get_class(method["_target_"]), "requires_groups", False) else ()
    return stage_key("aligned", {
        "method": method, **_sub(cfg, "align", "seed"), "template": cfg.template.train,
        "max_length": cfg.model.max_length, **({"extra_data": extra} if extra else {}),
        "runtime": training_runtime(cfg.trainer),
        "code": code(*TRAIN_CODE, *groups, "vaa.pipeline.stages:build_aligned",
                     target_module(method["_target_"]))}, upstream)


def _base_key(cfg: DictConfig, world: str) -> str:
    """The tiny model is pretrained here on the world's base corpus (trainer settings, training
    code and the world enter its key); a pretrained model is only pointed at (or a GGUF file
    converted), in the dtype the trainer's precision implies, and reads no data: its key has
    no world upstream, so the replicate seeds of a sweep share one converted model."""
    model = hashed_model_config(OmegaConf.to_container(cfg.model, resolve=True))
    if is_hf_model(cfg.model):
        how = {"weights_dtype": resolve_dtype(cfg.model, cfg.trainer.precision),
               "code": code("vaa.pipeline.stages:build_base", "vaa.models.hf")}
        return stage_key("base", {"model": model, **how}, [])
    how = {"runtime": training_runtime(cfg.trainer),
           "code": code(*TRAIN_CODE, "vaa.pipeline.stages:build_base,world_texts",
                        "vaa.models.tokenizer", "vaa.methods.sft")}
    return stage_key("base", {"model": model, "template": cfg.template.train, **how}, [world])


def plan_keys(cfg: DictConfig) -> dict[str, str]:
    """Cache keys of every stage of this run: world, base, [sft_aligned, estimate,]
    aligned, finetuned and one evaluation per trained model (``eval_<stage>``). Each holds
    the stage's config subtree, the trainer settings it trains under (``training_runtime``;
    evaluations: ``eval_runtime``), a digest of the code that builds it and its upstream keys."""
    k: dict[str, str] = {}
    k["world"] = stage_key("world", {"data": cfg.data, "code": world_code(cfg),
                                     **real_data_fingerprint(cfg.data)})
    k["base"] = _base_key(cfg, k["world"])
    upstream = [k["base"], k["world"]]
    if needs_groups(cfg):
        if cfg.dro.groups_file:
            upstream.append(f"groups-{file_digest(cfg.dro.groups_file)}")
        else:
            k["sft_aligned"] = _aligned_key(cfg, SFT_METHOD, [k["base"], k["world"]])
            k["estimate"] = stage_key("estimate", {
                "estimate": OmegaConf.to_container(cfg.dro.estimate, resolve=True),
                **_sub(cfg, "judge", "seed"), "template": cfg.template.decode,
                "hs_max_new_tokens": cfg.eval.hs_max_new_tokens,
                "probe_batch_size": cfg.eval.batch_size,
                "max_prompt_length": cfg.model.max_prompt_length,
                "max_length": cfg.model.max_length,
                "runtime": training_runtime(cfg.trainer, **ESTIMATE_TRAINER),
                "code": code(*TRAIN_CODE, "vaa.pipeline.estimate", "vaa.training.probe",
                             "vaa.methods.sft", judge_module(cfg))}, [k["sft_aligned"], k["world"]])
            upstream.append(k["estimate"])
    k["aligned"] = _aligned_key(cfg, OmegaConf.to_container(cfg.method, resolve=True), upstream)
    if getattr(get_class(cfg.method._target_), "identity", False):  # method=none: the aligned
        k["aligned"] = k["base"]  # model IS the base model (vaa/methods/none.py); nothing trains
    extra = required_data(cfg, cfg.ft_defense._target_)
    k["finetuned"] = stage_key("finetuned", {
        **_sub(cfg, "attack", "ft_defense", "seed"), "task": task_train_subtree(cfg),
        "template": cfg.template.train, "max_length": cfg.model.max_length,
        **({"extra_data": extra} if extra else {}), "runtime": training_runtime(cfg.trainer),
        "code": code(*TRAIN_CODE, "vaa.pipeline.stages:build_finetuned",
                     target_module(cfg.ft_defense._target_))}, [k["aligned"], k["world"]])
    ev = {**_sub(cfg, "judge", "eval"), "task": task_eval_subtree(cfg), "template": cfg.template.decode,
          "runtime": eval_runtime(cfg.trainer), "code": code(*EVAL_CODE, judge_module(cfg))}
    for stage in ("base", "aligned", "finetuned"):
        k[f"eval_{stage}"] = stage_key("eval", ev, [k[stage], k["world"]])
    if restores(cfg):  # the repair stage: its subtree, the fine-tuned model and the models it reads
        reads = getattr(get_class(cfg.restore._target_), "reads", ())
        k["restored"] = stage_key("restored", {
            "restore": OmegaConf.to_container(cfg.restore, resolve=True),
            "max_prompt_length": cfg.model.max_prompt_length,
            # a repair may train (Panacea): the trainer and training code, as for any training
            "runtime": training_runtime(cfg.trainer),
            "code": code(*TRAIN_CODE, "vaa.pipeline.stages:build_restored", "vaa.restore.base",
                         target_module(cfg.restore._target_))},
            [k["finetuned"], k["world"], *(k[s] for s in reads)])
        k["eval_restored"] = stage_key("eval", ev, [k["restored"], k["world"]])
    return k


def restores(cfg: DictConfig) -> bool:
    """Whether the run repairs the fine-tuned model: ``restore=none`` has no ``_target_``."""
    return bool(cfg.get("restore") is not None and cfg.restore.get("_target_"))
