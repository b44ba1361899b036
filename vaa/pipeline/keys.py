"""Which config subtree each stage depends on, and the resulting cache keys.

Pure functions of the config: ``plan_keys`` is what the tests check (changing one stage's
subtree changes that stage's key and those downstream, nothing upstream) and what the
pipeline uses, so the two cannot disagree.
"""

from __future__ import annotations

import hashlib
from functools import lru_cache
from pathlib import Path

from hydra.utils import get_class
from omegaconf import DictConfig, OmegaConf

from vaa.data.hub import real_data_fingerprint
from vaa.models.hf import hashed_model_config
from vaa.pipeline.cache import stage_key


def _sub(cfg: DictConfig, *keys: str) -> dict:
    return {k: OmegaConf.to_container(cfg[k], resolve=True) if OmegaConf.is_config(cfg[k]) else cfg[k]
            for k in keys}


@lru_cache(maxsize=1)
def world_code_digest() -> str:
    """Hash of the synthetic world's generator source: the world is defined by code as much
    as by config, so editing the generator must not reuse a stale cached world."""
    world_pkg = Path(__file__).resolve().parent.parent / "world"
    h = hashlib.sha256()
    for f in sorted(world_pkg.glob("*.py")):
        h.update(f.name.encode() + b"\0" + f.read_bytes())
    return h.hexdigest()[:16]


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
    return stage_key("aligned", {
        "method": method, **_sub(cfg, "align", "seed"), "template": cfg.template.train,
        "max_length": cfg.model.max_length, **({"extra_data": extra} if extra else {})}, upstream)


def plan_keys(cfg: DictConfig) -> dict[str, str]:
    """Cache keys of every stage of this run: world, base, [sft_aligned, estimate,]
    aligned, finetuned and one evaluation per trained model (``eval_<stage>``)."""
    k: dict[str, str] = {}
    k["world"] = stage_key("world", {"data": cfg.data, "code": world_code_digest(),
                                     **real_data_fingerprint(cfg.data)})
    model = hashed_model_config(OmegaConf.to_container(cfg.model, resolve=True))
    k["base"] = stage_key("base", {"model": model, "template": cfg.template.train}, [k["world"]])
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
                "max_length": cfg.model.max_length}, [k["sft_aligned"], k["world"]])
            upstream.append(k["estimate"])
    k["aligned"] = _aligned_key(cfg, OmegaConf.to_container(cfg.method, resolve=True), upstream)
    extra = required_data(cfg, cfg.ft_defense._target_)
    k["finetuned"] = stage_key("finetuned", {
        **_sub(cfg, "attack", "ft_defense", "seed"), "task": task_train_subtree(cfg),
        "template": cfg.template.train, "max_length": cfg.model.max_length,
        **({"extra_data": extra} if extra else {})}, [k["aligned"], k["world"]])
    ev = {**_sub(cfg, "judge", "eval"), "task": task_eval_subtree(cfg), "template": cfg.template.decode}
    for stage in ("base", "aligned", "finetuned"):
        k[f"eval_{stage}"] = stage_key("eval", ev, [k[stage], k["world"]])
    if restores(cfg):  # the repair stage: its subtree, the fine-tuned model and the models it reads
        reads = getattr(get_class(cfg.restore._target_), "reads", ())
        k["restored"] = stage_key("restored", {
            "restore": OmegaConf.to_container(cfg.restore, resolve=True),
            "max_prompt_length": cfg.model.max_prompt_length},
            [k["finetuned"], k["world"], *(k[s] for s in reads)])
        k["eval_restored"] = stage_key("eval", ev, [k["restored"], k["world"]])
    return k


def restores(cfg: DictConfig) -> bool:
    """Whether the run repairs the fine-tuned model: ``restore=none`` has no ``_target_``."""
    return bool(cfg.get("restore") is not None and cfg.restore.get("_target_"))
