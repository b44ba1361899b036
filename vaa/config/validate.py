"""Validate, don't build: every value a stage will read is checked right after the config is
composed, before any stage runs (vaa.cli calls :func:`validate` first).

Checks, all collected before one :class:`vaa.errors.ConfigError` lists them (one line each,
naming the dotted key, its value and the fix):

1. required values (``???``) and interpolations that do not resolve;
2. ranges per group (vaa/config/rules.py) and per method / fine-tuning defense (the ``check``
   of its schema, in the method's own module);
3. cross-field rules: the task's splits select rows and hold enough for ``attack.n`` (and VAA
   stage 1's proxy runs), a method's required data streams exist (its class's ``requires``,
   ``requires_groups``), ``dro.groups_file`` is readable, judge=exact only on the synthetic world;
4. files that must exist: ``data.root`` and the data files under it, ``model.path``,
   ``judge.build.path``;
5. precision, sharding and optimizer (vaa/config/precision_rules.py): 16-mixed, FSDP for a
   class that is not ``fsdp_safe``, 8-bit optimizers without bitsandbytes or under FSDP, a
   weight perturbation that must round away in the training precision.

Nothing is imported beyond the config's own classes (no torch model, no data is read), so a
bad value fails in seconds. The checks inside the stages stay as a second line of defence.
"""

from __future__ import annotations

import os
from pathlib import Path

from hydra.utils import get_class
from omegaconf import DictConfig, OmegaConf

from vaa.config.checker import Checker, Problem
from vaa.config.data_rules import DataRules
from vaa.config.precision_rules import check_precision_rules
from vaa.config.restore_rules import check_restore_memory
from vaa.config.rules import GROUP_RULES, estimate, restore
from vaa.errors import ConfigError


def find_problems(cfg: DictConfig) -> list[Problem]:
    """Every problem of ``cfg`` as ``(dotted key, one-line message)``; empty when it is valid."""
    problems: list[Problem] = []
    if "hydra" in cfg:  # a config composed with its hydra node: validate the job's part
        cfg = OmegaConf.masked_copy(cfg, [k for k in cfg if k != "hydra"])
    for key in sorted(OmegaConf.missing_keys(cfg)):
        problems.append((key, f"{key}=???: a value is required; set {key}=…"))
    if problems:
        return problems
    try:
        OmegaConf.to_container(cfg, resolve=True)
    except Exception as e:  # noqa: BLE001 - an interpolation that does not resolve
        key = getattr(e, "full_key", "") or ""
        return [(key, f"{key or 'config'}: cannot resolve ({type(e).__name__}: {str(e).splitlines()[0]})")]

    root = Checker(cfg, "", problems)
    for group, rule in GROUP_RULES.items():
        if cfg.get(group) is not None:
            rule(Checker(cfg[group], f"{group}.", problems, cfg))
    root.count("seed", minimum=0)
    check_templates(root)
    check_accelerator(root)
    method_classes = {g: check_method(cfg, g, problems) for g in ("method", "ft_defense")}
    trained = dict(method_classes)
    if cfg.get("restore") is not None and cfg.restore.get("_target_"):
        restore(Checker(cfg.restore, "restore.", problems, cfg))
        check_restore_modules(Checker(cfg.restore, "restore.", problems, cfg), cfg)
        trained["restore"] = target_class(cfg.restore)
        if not any(k.startswith("restore.") for k, _ in problems):
            check_restore_memory(Checker(cfg.restore, "restore.", problems, cfg), cfg, trained["restore"])
    check_precision_rules(cfg, trained, problems)
    check_task_format(cfg, problems)
    data = DataRules(cfg, problems)
    data.check_world()
    data.check_task()
    check_method_data(cfg, method_classes, data, problems)
    check_files(cfg, problems)
    return problems


def validate(cfg: DictConfig) -> None:
    """Raise :class:`ConfigError` listing every problem of ``cfg``; return quietly when valid."""
    problems = find_problems(cfg)
    if problems:
        raise ConfigError(problems)


def check_templates(root: Checker) -> None:
    from vaa.data.templates import TEMPLATES
    from vaa.models.hf import is_hf_model

    for k in ("template.train", "template.decode"):
        if root.has(k):
            root.one_of(k, sorted(TEMPLATES))
            model = root.get("model")
            if root.get(k) == "chat" and model is not None and not is_hf_model(model):
                root.fail(k, f"needs a tokenizer with a chat template; model={model.get('name')} "
                             "builds a word tokenizer without one: use alpaca or compact, or an "
                             "instruct/chat model (e.g. model=smollm2_135m)")


# The linear layers of the Llama-family models the presets name (Llama, Qwen2, SmolLM2, tiny).
LLAMA_LINEARS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
LLAMA_FAMILY = ("tiny", "smollm2_135m", "llama2_7b", "qwen2_5_0_5b", "qwen2_5_7b")


def check_restore_modules(c: Checker, cfg: DictConfig) -> None:
    """``restore.modules`` names linear layers; on the presets' Llama-family models a name
    that is none of theirs would fail only after every stage before the repair was built."""
    mods = c.get("modules")
    if mods is None or OmegaConf.select(cfg, "model.name") not in LLAMA_FAMILY:
        return
    bad = [m for m in mods if m not in LLAMA_LINEARS]
    if bad or not len(mods):
        c.fail("modules", f"names no linear layer of this model ({bad or 'empty'}); use some of "
                          f"{', '.join(LLAMA_LINEARS)}")


def check_accelerator(root: Checker) -> None:
    """A GPU accelerator on a machine without CUDA fails in Lightning inside the first stage;
    say so before anything is built. ``trainer.host_heap`` names one of the heap policies."""
    from vaa.training.host_memory import POLICIES

    heap = root.get("trainer.host_heap", "system")
    if heap is not None and heap not in POLICIES:  # null: system
        root.fail("trainer.host_heap", f"is {heap!r}; use one of {', '.join(POLICIES)} "
                  "(vaa/training/host_memory.py)")
    acc = str(root.get("trainer.accelerator", "cpu")).lower()
    if acc in ("gpu", "cuda"):
        import torch

        if not torch.cuda.is_available():
            root.fail("trainer.accelerator", "no CUDA device is visible on this machine; use "
                      "trainer=cpu (or trainer=ddp for 2 CPU processes)")


def check_method(cfg: DictConfig, group: str, problems: list[Problem]):
    """The schema's own ``check`` and the class ``_target_`` names (imported, not built)."""
    node = cfg.get(group)
    if node is None:
        return None
    c = Checker(node, f"{group}.", problems, cfg)
    check = getattr(OmegaConf.get_type(node), "check", None)
    if callable(check):
        check(c)
    try:
        return get_class(node._target_)
    except Exception as e:  # noqa: BLE001 - a target that does not import
        c.fail("_target_", f"cannot import the class ({str(e).splitlines()[0]})")
        return None


def check_task_format(cfg: DictConfig, problems: list[Problem]) -> None:
    from vaa.data.formats import FORMATS
    from vaa.data.sources import DATASET_FORMATS
    from vaa.eval.scorers import SCORERS

    t = Checker(cfg.task, "task.", problems, cfg)
    t.one_of("dataset", sorted(DATASET_FORMATS))
    t.one_of("format", sorted(FORMATS))
    t.one_of("scorer", [*sorted(SCORERS), "local_pairwise"])
    t.count("max_new_tokens", meaning="tokens generated per test prompt")


def check_method_data(cfg: DictConfig, classes: dict, data: DataRules, problems: list[Problem]) -> None:
    """What the chosen method and defense train on: groups (VAA) and extra data streams."""
    root = Checker(cfg, "", problems)
    for group, cls in classes.items():
        if cls is None:
            continue
        for name in getattr(cls, "requires", ()):
            if cfg.get("extra_data") is None or name not in cfg.extra_data:
                root.fail(f"extra_data.{name}", f"{group}={cfg[group].name} trains on the data stream "
                                                f"{name!r}; add extra_data.{name} (see conf/config.yaml)", None)
            else:
                data.check_stream(f"extra_data.{name}", cfg.extra_data[name])
        if group == "method" and getattr(cls, "requires_groups", False):
            if cfg.get("dro") is None:
                root.fail("dro", f"method={cfg.method.name} needs the dro group (dro=default)", None)
            elif not cfg.dro.groups_file:  # stage 1 estimates the groups
                est = Checker(cfg.dro.estimate, "dro.estimate.", problems, cfg)
                estimate(est)
                data.check_estimate(cfg.dro.estimate)
    if data.rows("beavertails", "align", 0, cfg.align.get("n")) == 0:
        root.fail("align.n", "selects no alignment rows")


def target_class(node):
    """The class ``node._target_`` names, or None when it does not import."""
    try:
        return get_class(node._target_)
    except Exception:  # noqa: BLE001 - reported by the stage that builds it
        return None


def readable(path: str) -> bool:
    p = Path(path).expanduser()
    return p.is_file() and os.access(p, os.R_OK)


def check_files(cfg: DictConfig, problems: list[Problem]) -> None:
    root = Checker(cfg, "", problems)
    gf = OmegaConf.select(cfg, "dro.groups_file")
    if gf and not readable(str(gf)):
        root.fail("dro.groups_file", "no readable file there; give a groups.jsonl written by the "
                                     "estimate stage (or the reference's index list), or null to estimate")
    mp = OmegaConf.select(cfg, "model.path")
    if mp and not Path(str(mp)).expanduser().exists():
        root.fail("model.path", "does not exist; set model.path to the folder of the model's weights "
                                "(e.g. from `hf download NAME --local-dir DIR`)")
    jp = OmegaConf.select(cfg, "judge.build.path")
    if jp and not Path(str(jp)).expanduser().exists():
        root.fail("judge.build.path", "does not exist; set it to the judge model's folder")
    cd = OmegaConf.select(cfg, "paths.cache_dir")
    if cd and Path(str(cd)).expanduser().exists() and not Path(str(cd)).expanduser().is_dir():
        root.fail("paths.cache_dir", "is a file; give a folder for the artifact cache")
    target = str(OmegaConf.select(cfg, "judge.build._target_", default=""))
    if target.endswith(".exact") and "beavertails_train" in cfg.data:
        root.fail("judge.build._target_", "judge=exact reads the synthetic world's lexicon; with real "
                                          "data use judge=keyword (or beaver_dam / guard)", "exact")
    if cfg.get("logger") is not None and "mode" in cfg.logger:
        Checker(cfg.logger, "logger.", problems, cfg).one_of("mode", ("online", "offline", "disabled"),
                                                              optional=True)
