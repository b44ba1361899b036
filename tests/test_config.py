"""Config composition: every option of every group, typed schemas, bad input at the CLI.

"Validate, don't build": nothing here trains or imports the pipeline; each compose is ~50 ms.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from hydra.errors import ConfigCompositionException, MissingConfigException
from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException

from conftest import CONF_DIR

# Every group directory under conf/ (new groups are picked up); these must exist.
REQUIRED_GROUPS = {"model", "data", "task", "method", "attack", "ft_defense", "judge", "trainer",
                   "logger", "paths", "experiment"}
GROUPS = sorted(p.name for p in CONF_DIR.iterdir() if p.is_dir() and any(p.glob("*.yaml")))


def options(group: str) -> list[str]:
    return sorted(p.stem for p in (CONF_DIR / group).glob("*.yaml"))


ALL_OPTIONS = [(g, o) for g in GROUPS for o in options(g)]
NON_EXPERIMENT = [(g, o) for g, o in ALL_OPTIONS if g != "experiment"]


def is_global(group: str, option: str) -> bool:
    return "@package _global_" in (CONF_DIR / group / f"{option}.yaml").read_text()


def leaves(node, prefix: str = ""):
    """(dotted key, value) of every scalar a YAML file sets, interpolations and lists skipped."""
    for k, v in node.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            yield from leaves(v, key + ".")
        elif (isinstance(v, str) and "${" in v) or isinstance(v, list):
            continue
        else:
            yield key, v


def assert_reflects(cfg, group: str, option: str) -> None:
    """Every value the option's YAML sets is what the composed config holds."""
    raw = OmegaConf.to_container(OmegaConf.load(CONF_DIR / group / f"{option}.yaml"))
    raw.pop("defaults", None)
    assert raw, f"{group}/{option}.yaml sets nothing"
    raw.pop("hydra", None)  # a sweep preset's hydra.sweeper.params: not in the job's config
    root = "" if is_global(group, option) else f"{group}."
    for key, value in leaves(raw):
        got = OmegaConf.select(cfg, root + key, throw_on_missing=True)
        assert got == value, f"{group}={option}: {root}{key} is {got!r}, the YAML sets {value!r}"


def error_text(exc: BaseException) -> str:
    """The exception's message and those of its causes (Hydra wraps OmegaConf's errors)."""
    parts, seen = [], set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        parts.append(str(exc))
        exc = exc.__cause__ or exc.__context__
    return "\n".join(parts)


def test_every_group_has_options():
    assert REQUIRED_GROUPS <= set(GROUPS)
    assert {"sst2", "agnews", "gsm8k", "alpacaeval"} <= set(options("task"))


@pytest.mark.parametrize("group,option", ALL_OPTIONS, ids=[f"{g}={o}" for g, o in ALL_OPTIONS])
def test_every_option_composes(compose, group, option):
    cfg = compose([f"{group}={option}"])
    assert_reflects(cfg, group, option)
    for g in ("task", "judge", "method", "model", "data", "dro"):
        if g == group:  # the name a group's option carries is the one chosen
            assert cfg[g].name == option
    # the config the pipeline needs is complete: every value resolves, none is missing
    OmegaConf.to_container(cfg, resolve=True, throw_on_missing=True)


def test_option_is_the_recorded_choice():
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    from vaa.config.schema import register

    register()
    GlobalHydra.instance().clear()
    try:
        with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
            for group, option in ALL_OPTIONS:
                cfg = compose("config", overrides=[f"{group}={option}"], return_hydra_config=True)
                assert cfg.hydra.runtime.choices[group] == option
    finally:
        GlobalHydra.instance().clear()


@pytest.mark.parametrize("experiment", options("experiment"))
def test_experiment_composes_with_every_option(compose, experiment):
    # groups the preset pins (`override /data: hf` in a real-protocol preset) are its premise:
    # protocol=paper's data keys exist only for real data, so data=synthetic is no variation of it
    raw = OmegaConf.to_container(OmegaConf.load(CONF_DIR / "experiment" / f"{experiment}.yaml")).get("defaults") or []
    pinned = {k.removeprefix("override /") for d in raw if isinstance(d, dict) for k in d}
    for group, option in NON_EXPERIMENT:
        if group in pinned:
            continue
        cfg = compose([f"experiment={experiment}", f"{group}={option}"])
        assert cfg[group] is not None
        if "name" in cfg[group]:
            assert cfg[group].name == option, (experiment, group, option)
        assert_reflects(cfg, "experiment", experiment)  # the preset still applies on top
        OmegaConf.to_container(cfg, resolve=True, throw_on_missing=True)


def test_experiment_with_plus_prefix_is_rejected_clearly(compose):
    # config.yaml lists `experiment: null`, so the group is already in the defaults:
    # `experiment=smoke` is the spelling; `+experiment=smoke` is a duplicate.
    with pytest.raises(ConfigCompositionException, match="experiment"):
        compose(["+experiment=smoke"])


def test_smoke_experiment_is_small(compose):
    full, smoke = compose([]), compose(["experiment=smoke"])
    for key in ("data.align", "data.task_train", "data.hs_test", "model.arch.hidden_size",
                "model.pretrain.max_steps", "attack.n", "align.epochs"):
        assert OmegaConf.select(smoke, key) < OmegaConf.select(full, key), key


# ---------------------------------------------------------------------------------------------
# typed schemas: misspelled or mistyped hyperparameters fail at composition
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("override,words", [
    ("attack.lrr=1", ["lrr", "AttackConfig"]),
    ("align.lrr=1", ["lrr", "AlignConfig"]),
    ("model.arch.hidden_sizee=3", ["hidden_sizee", "ArchConfig"]),
    ("model.pretrain.stepz=3", ["stepz"]),
    ("data.sedd=1", ["sedd"]),
    ("task.scorerr=x", ["scorerr"]),
    ("eval.batch_sizee=7", ["batch_sizee"]),
])
def test_misspelled_key_fails(compose, override, words):
    with pytest.raises((ConfigCompositionException, OmegaConfBaseException)) as e:
        compose([override])
    text = error_text(e.value)
    for w in words:
        assert w in text, text


@pytest.mark.parametrize("override,value,typ", [
    ("attack.lr=abc", "abc", "Float"),
    ("attack.n=many", "many", "Integer"),
    ("align.epochs=x", "x", "Integer"),
    ("model.arch.hidden_size=big", "big", "Integer"),
    ("data.align=lots", "lots", "Integer"),
])
def test_mistyped_value_fails(compose, override, value, typ):
    with pytest.raises((ConfigCompositionException, OmegaConfBaseException)) as e:
        compose([override])
    text = error_text(e.value)
    assert f"'{value}'" in text and typ in text, text
    assert override.split("=")[0] in text, text  # names the full key


def test_misspelled_key_also_fails_under_experiment(compose):
    with pytest.raises(ConfigCompositionException) as e:
        compose(["experiment=smoke", "attack.lrr=1"])
    assert "lrr" in error_text(e.value)


def test_unknown_option_lists_the_available_ones(compose):
    with pytest.raises(MissingConfigException) as e:
        compose(["task=sst3"])
    text = error_text(e.value)
    assert "sst3" in text
    for t in options("task"):
        assert t in text, text


# ---------------------------------------------------------------------------------------------
# the `vaa` CLI on bad input: fails in Hydra, before any heavy import or output directory
# ---------------------------------------------------------------------------------------------
def run_cli(tmp_path: Path, *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "VAA_CACHE_DIR": str(tmp_path / "cache")}
    env.pop("HYDRA_FULL_ERROR", None)
    return subprocess.run([sys.executable, "-m", "vaa", *args], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=120)


@pytest.mark.parametrize("args,words", [
    (["task=sst3"], ["sst3", "sst2", "agnews", "gsm8k", "alpacaeval"]),
    (["attack.lrr=1"], ["lrr"]),
    (["attack.lr=abc"], ["abc", "attack.lr"]),
])
def test_cli_rejects_bad_input(tmp_path, args, words):
    r = run_cli(tmp_path, *args)
    assert r.returncode != 0
    for w in words:
        assert w in r.stderr, r.stderr
    assert "Traceback" not in r.stderr  # a message, not a stack trace
    assert not (tmp_path / "outputs").exists() and not (tmp_path / "cache").exists()


# ---------------------------------------------------------------------------------------------
# seed interpolation
# ---------------------------------------------------------------------------------------------
def test_seed_drives_world_and_pretraining(compose):
    cfg = compose(["seed=5"])
    assert cfg.seed == 5 and cfg.data.seed == 5 and cfg.model.pretrain.seed == 5
    pinned = compose(["seed=5", "data.seed=0", "model.pretrain.seed=1"])
    assert (pinned.seed, pinned.data.seed, pinned.model.pretrain.seed) == (5, 0, 1)


def test_defaults(compose):
    cfg = compose([])
    assert (cfg.task.name, cfg.judge.name, cfg.data.name, cfg.model.name) == (
        "sst2", "exact", "synthetic", "tiny")
    assert cfg.paths.cache_dir is None  # → $VAA_CACHE_DIR, set per test by conftest


# ---------------------------------------------------------------------------------------------
# schemas are never options (issue 14, item 3)
# ---------------------------------------------------------------------------------------------
def test_schemas_are_not_options(compose):
    from hydra.core.config_store import ConfigStore

    for group, repo in ConfigStore.instance().repo.items():
        if isinstance(repo, dict) and group in GROUPS:  # a schema stored inside a user group
            assert not [n for n in repo if "schema" in n], (group, list(repo))
    with pytest.raises(MissingConfigException) as e:
        compose(["method=foo"])
    listed = error_text(e.value).split("Available options in 'method':")[1].split("Config search")[0].split()
    assert sorted(listed) == options("method"), listed  # methods only, no *_schema
    for bad in ("vaa_schema", "method_schema", "_schema_method_vaa"):
        with pytest.raises(MissingConfigException):
            compose([f"method={bad}"])


def test_help_is_the_projects_own(tmp_path):
    r = run_cli(tmp_path, "--help")
    assert r.returncode == 0, r.stderr
    out = r.stdout
    assert "vaa: align a language model" in out and "Common overrides" in out and "Outputs:" in out
    for group in REQUIRED_GROUPS - {"paths"}:
        assert f"{group}: " in out, group
    assert "method: " + ", ".join(options("method")) in out
    assert "schema" not in out and "Powered by Hydra" not in out
    assert not (tmp_path / "outputs").exists()


# ---------------------------------------------------------------------------------------------
# a method with a hyperparameter is one module + one YAML (issue 14, item 9)
# ---------------------------------------------------------------------------------------------
PLUGIN = '''
from dataclasses import dataclass

from vaa.config.methods import MethodConfig, method_schema
from vaa.methods.base import TrainingMethod


class ScaledSFT(TrainingMethod):
    name = "scaled_sft_t"

    def __init__(self, scale: float = 0.5, **hparams):
        super().__init__(**hparams)
        self.scale = scale

    def training_step(self, module, batch):
        loss = self.scale * module.lm_loss(batch)
        module.manual_backward(loss)
        return {"loss": loss.detach(), "grad_norm": self.apply_gradients(module)}


@method_schema
@dataclass
class ScaledSFTConfig(MethodConfig):
    _target_: str = "vaa.methods.scaled_sft_t.ScaledSFT"
    name: str = "scaled_sft_t"
    scale: float = 0.5

    @staticmethod
    def check(c):
        c.positive("scale")
'''
PLUGIN_YAML = """defaults:
  - /_schema_method_scaled_sft_t@_here_
  - _self_
scale: 0.5
"""


@pytest.fixture
def plugin_method(tmp_path, monkeypatch):
    """A new method file in a folder of the ``vaa.methods`` package (as a user adds one), and
    its YAML in a config folder of its own (hydra.searchpath)."""
    import vaa.methods

    (tmp_path / "pkg").mkdir()
    (tmp_path / "pkg" / "scaled_sft_t.py").write_text(PLUGIN)
    (tmp_path / "conf" / "method").mkdir(parents=True)
    (tmp_path / "conf" / "method" / "scaled_sft_t.yaml").write_text(PLUGIN_YAML)
    monkeypatch.setattr(vaa.methods, "__path__", [*vaa.methods.__path__, str(tmp_path / "pkg")])
    monkeypatch.delitem(sys.modules, "vaa.methods.scaled_sft_t", raising=False)
    yield f"hydra.searchpath=[file://{tmp_path / 'conf'}]"
    sys.modules.pop("vaa.methods.scaled_sft_t", None)


def test_a_method_with_a_hyperparameter_is_one_file_and_one_yaml(compose, plugin_method):
    from hydra.utils import instantiate

    from vaa.config.validate import find_problems, validate
    from vaa.errors import ConfigError

    cfg = compose(["experiment=smoke", plugin_method, "method=scaled_sft_t", "method.scale=0.25"])
    assert cfg.method.scale == 0.25 and find_problems(cfg) == []
    method = instantiate(cfg.method)
    assert type(method).__name__ == "ScaledSFT" and method.scale == 0.25
    with pytest.raises((ConfigCompositionException, OmegaConfBaseException)) as e:  # typed
        compose([plugin_method, "method=scaled_sft_t", "method.scale=abc"])
    assert "method.scale" in error_text(e.value)
    with pytest.raises(ConfigError, match="method.scale=-1"):  # its own range rule
        validate(compose([plugin_method, "method=scaled_sft_t", "method.scale=-1"]))


@pytest.mark.slow
def test_a_new_method_runs_the_smoke_pipeline(compose, plugin_method, tmp_path):
    from vaa.pipeline.run import run_pipeline

    cfg = compose(["experiment=smoke", plugin_method, "method=scaled_sft_t", "method.scale=0.25"])
    metrics = run_pipeline(cfg, tmp_path / "run")
    assert metrics["method"] == "scaled_sft_t" and (tmp_path / "run" / "metrics.json").is_file()
