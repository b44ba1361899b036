"""Run directories never collide (issue 12, item 6): `vaa` processes started in the same second
get one folder each, holding their own overrides and metrics (conf/config.yaml's hydra.run.dir
and vaa/config/resolvers.py)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import yaml

from conftest import REPO_ROOT

# The real entry point (vaa.cli.main, conf/config.yaml) with two stand-ins: Hydra's `now` is
# frozen (every process sees the same second, as scripts that start jobs together do) and the
# pipeline is a stub that writes metrics.json with the job's seed (no training: seconds).
FROZEN_CLOCK_VAA = textwrap.dedent("""
    import datetime, json, sys
    from pathlib import Path
    from omegaconf import OmegaConf
    import hydra._internal.hydra as H
    import vaa.cli as cli

    _setup = H.setup_globals
    def frozen():
        _setup()
        OmegaConf.register_new_resolver(
            "now", lambda p: datetime.datetime(2026, 1, 1, 12, 0, 0).strftime(p), use_cache=True, replace=True)
    H.setup_globals = frozen

    def stub(cfg, job):
        Path(job["run_dir"], "metrics.json").write_text(json.dumps({"seed": cfg.seed, "harmful_score": 0.0}))
        return {"harmful_score": 0.0}
    cli.run_job = stub
    sys.argv = ["vaa", *sys.argv[1:]]
    cli.main()
""")


def start(args: list[str], cwd: Path, code: str | None = None) -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO_ROOT)}
    cmd = [sys.executable, "-c", code, *args] if code else [sys.executable, "-m", "vaa", *args]
    return subprocess.Popen(cmd, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def run_dirs(root: Path) -> list[Path]:
    return sorted(p.parent for p in root.glob("outputs/*/*/metrics.json"))


def assert_one_folder_per_job(root: Path, seeds: list[int]) -> None:
    dirs = run_dirs(root)
    assert len(dirs) == len(seeds), f"{len(seeds)} runs wrote {len(dirs)} folders: {dirs}"
    found = []
    for d in dirs:
        overrides = yaml.safe_load((d / ".hydra" / "overrides.yaml").read_text())
        seed = json.loads((d / "metrics.json").read_text())["seed"]
        assert overrides[-1] == f"seed={seed}", f"{d}: overrides {overrides} but metrics seed {seed}"
        found.append(seed)
    assert sorted(found) == seeds


def test_runs_in_the_same_second_get_their_own_folders(tmp_path):
    seeds = [0, 1, 2]
    procs = [start([f"seed={s}"], tmp_path, FROZEN_CLOCK_VAA) for s in seeds]
    for p in procs:
        out, _ = p.communicate(timeout=300)
        assert p.returncode == 0, out
    assert_one_folder_per_job(tmp_path, seeds)
    # all three share the frozen second: only the suffix tells them apart
    assert {d.name[:8] for d in run_dirs(tmp_path)} == {"12-00-00"}


def test_run_id_resolves_once_per_config_and_differs_between_configs():
    from omegaconf import OmegaConf
    import vaa.config  # noqa: F401  registers ${vaa.run_id:}

    a = OmegaConf.create({"run": "x-${vaa.run_id:}", "sweep": "y-${vaa.run_id:}"})
    b = OmegaConf.create({"run": "x-${vaa.run_id:}"})
    assert a.run == a.run and a.run[2:] == a.sweep[2:]  # one value per config (cached, like `now`)
    assert a.run != b.run


@pytest.mark.slow
def test_three_real_smoke_runs_started_together(tmp_path):
    """The real thing: three `vaa experiment=smoke` started at once, sharing one cache."""
    seeds = [0, 1, 2]
    common = ["experiment=smoke", "method=sft", "trainer.progress_bar=false", "model.pretrain.max_steps=5",
              f"paths.cache_dir={tmp_path / 'cache'}"]
    t0 = time.time()
    procs = [start([*common, f"seed={s}"], tmp_path) for s in seeds]
    for p in procs:
        out, _ = p.communicate(timeout=1200)
        assert p.returncode == 0, out[-3000:]
    assert_one_folder_per_job(tmp_path, seeds)
    print(f"3 concurrent smoke runs: {time.time() - t0:.1f}s, folders "
          f"{[d.name for d in run_dirs(tmp_path)]}")
