"""Scale presets compose: hydra/launcher=local (joblib) and hydra/launcher=slurm (submitit),
trainer=fsdp and trainer=ddp; every experiment preset composes for each job of its sweep."""

from __future__ import annotations

import importlib.util
import itertools

import pytest
import yaml
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra

from conftest import CONF_DIR
from vaa.config.schema import register


def compose_with_hydra(overrides: list[str]):
    """The config with its `hydra` node (launcher, sweeper), as `vaa -m` composes it."""
    register()
    GlobalHydra.instance().clear()
    try:
        with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
            return compose("config", overrides=overrides, return_hydra_config=True)
    finally:
        GlobalHydra.instance().clear()


def needs(module: str):
    return pytest.mark.skipif(importlib.util.find_spec(module) is None,
                              reason=f"{module} not installed (pip install -e '.[launchers]')")


@needs("hydra_plugins.hydra_joblib_launcher")
def test_local_launcher_composes():
    launcher = compose_with_hydra(["hydra/launcher=local", "hydra.launcher.n_jobs=3"]).hydra.launcher
    assert launcher._target_.endswith("JoblibLauncher")
    assert launcher.n_jobs == 3 and launcher.prefer == "processes"


@needs("hydra_plugins.hydra_submitit_launcher")
def test_slurm_launcher_composes():
    cfg = compose_with_hydra(["hydra/launcher=slurm", "hydra.launcher.partition=gpu", "trainer=fsdp"])
    launcher = cfg.hydra.launcher
    assert launcher._target_.endswith("SlurmLauncher")
    assert launcher.partition == "gpu" and launcher.gpus_per_node == 1 and launcher.timeout_min == 1440
    assert launcher.submitit_folder.startswith("outputs/multirun/")  # beside the sweep
    assert cfg.trainer.strategy == "fsdp" and cfg.trainer.precision == "bf16-mixed"


@pytest.mark.parametrize("name, strategy", [("fsdp", "fsdp"), ("ddp", "ddp_spawn"), ("cpu", "auto")])
def test_trainer_presets_have_every_key_fit_reads(compose, name, strategy):
    t = compose([f"trainer={name}"]).trainer
    assert t.strategy == strategy
    for key in ("accelerator", "devices", "precision", "progress_bar", "log_every_n_steps",
                "checkpoint_every_n_steps", "deterministic", "host_heap"):
        assert key in t, f"conf/trainer/{name}.yaml lacks {key} (vaa/training/fit.py reads it)"


PRESETS = sorted(p.stem for p in (CONF_DIR / "experiment").glob("*.yaml"))


def sweep_params(name: str) -> dict[str, list[str]]:
    raw = yaml.safe_load((CONF_DIR / "experiment" / f"{name}.yaml").read_text()) or {}
    params = (raw.get("hydra") or {}).get("sweeper", {}).get("params", {}) or {}
    return {k: str(v).split(",") for k, v in params.items()}


@pytest.mark.parametrize("name", PRESETS)
def test_experiment_presets_compose_for_every_job(compose, name):
    """Each preset composes, and so does every combination of its sweep's group choices
    (methods, tasks, defenses); its header says the command that runs it."""
    header = (CONF_DIR / "experiment" / f"{name}.yaml").read_text().split("\n")
    assert any(("multirun.sh" in line or "vaa " in line) and name in line for line in header if line.startswith("#"))
    params = sweep_params(name)
    groups = {k: v for k, v in params.items() if (CONF_DIR / k).is_dir()}
    for k, values in groups.items():
        for v in values:
            assert (CONF_DIR / k / f"{v}.yaml").is_file(), f"{name}: {k}={v} has no conf/{k}/{v}.yaml"
    combos = list(itertools.product(*[[f"{k}={v}" for v in vs] for k, vs in groups.items()]))
    for combo in [combos[i] for i in sorted({0, len(combos) // 2, len(combos) - 1})]:  # first, middle, last job
        cfg = compose([f"experiment={name}", *combo])
        for o in combo:
            k, v = o.split("=")
            assert cfg[k].name == v


def test_synthetic_table_is_every_alignment_method_on_four_tasks():
    params = sweep_params("paper_synthetic")
    assert params["method"] == ["sft", "vaa", "vaccine", "repnoise", "booster"]
    assert params["task"] == ["sst2", "agnews", "gsm8k", "alpacaeval"]
    assert sweep_params("sweep_harmful_ratio")["attack.harmful_ratio"] == ["0", "0.05", "0.1", "0.2"]
