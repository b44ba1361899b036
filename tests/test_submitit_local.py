"""hydra/launcher=submitit_local (issue 14, item 5): a sweep launched through submitit — the
code path of hydra/launcher=slurm, with submitit's local executor — runs every job to its
metrics.json, and vaa-report builds the table from them."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
import time

import pytest

from conftest import REPO_ROOT

pytestmark = [
    pytest.mark.skipif(importlib.util.find_spec("hydra_plugins.hydra_submitit_launcher") is None,
                       reason="hydra-submitit-launcher not installed (pip install -e '.[launchers]')"),
    # the preset spells out the plugin's config of the same name (vaa/config/__init__.py filters
    # this for the CLI; pytest resets warning filters per test)
    pytest.mark.filterwarnings("ignore:(?s).*is validated against ConfigStore schema:UserWarning"),
]

TINY = ["experiment=smoke", "method=sft", "model.pretrain.max_steps=5", "trainer.progress_bar=false",
        "eval.hs_max_new_tokens=8"]


def test_preset_is_the_local_executor_with_the_slurm_presets_limits(tmp_path):
    from test_launchers import compose_with_hydra

    cfg = compose_with_hydra(["hydra/launcher=submitit_local"])
    slurm = compose_with_hydra(["hydra/launcher=slurm"]).hydra.launcher
    launcher = cfg.hydra.launcher
    assert launcher._target_.endswith("submitit_launcher.LocalLauncher")
    assert launcher.submitit_folder == f"{cfg.hydra.sweep.dir}/.submitit/%j"
    for key in ("timeout_min", "tasks_per_node", "nodes"):
        assert launcher[key] == slurm[key], key
    assert launcher.gpus_per_node == 0  # a CPU machine; hydra.launcher.gpus_per_node=1 on a GPU box


@pytest.mark.slow  # ~75 s on 2 busy cores: three processes each import torch, two train
def test_two_job_sweep_through_submitit(tmp_path):
    """Two jobs (harmful ratio 0.1 and 0.2) sharing one cache: world, base and alignment are
    built once; each job writes metrics.json via submitit; vaa-report finds both."""
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT), "OMP_NUM_THREADS": "1",
           "VAA_CACHE_DIR": str(tmp_path / "cache")}
    t0 = time.time()
    proc = subprocess.run([sys.executable, "-m", "vaa", "-m", "hydra/launcher=submitit_local",
                           *TINY, "attack.harmful_ratio=0.1,0.2"],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    (sweep,) = (tmp_path / "outputs" / "multirun").glob("*/*")
    metrics = sorted(sweep.glob("*/metrics.json"))
    assert [m.parent.name for m in metrics] == ["0", "1"]
    second = ["attack.harmful_ratio=0.2" in (m.parent / ".hydra" / "overrides.yaml").read_text() for m in metrics]
    assert second == [False, True]
    jobs = [p for p in (sweep / ".submitit").iterdir() if p.is_dir() and p.name != "%j"]
    assert len(jobs) == 2 and all(any(j.glob("*_result.pkl")) for j in jobs)  # submitit ran them
    from vaa.report.cli import main as report

    assert report([str(sweep), "--no-figures"]) == 0
    md = (sweep / "report.md").read_text()
    assert "0.1" in md and "0.2" in md and "2 found, 2 finished" in md
    print(f"submitit_local 2-job sweep: {time.time() - t0:.1f}s")
