"""Repairs under ``trainer=ddp`` (2 CPU processes, gloo, ddp_spawn), end to end through the
``vaa`` command on the smoke world: Panacea's fine-tuning loop runs in the spawned ranks
(every gradient through manual_backward, so DDP all-reduces it) and releases w + ε in the main
process; the curvature repair runs on the main process's model after DDP training. Slow
(spawned ranks per training stage): ``pytest -m slow tests/test_ddp_restore.py``."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch.distributed as dist

REPO_ROOT = Path(__file__).resolve().parents[1]

pytestmark = [pytest.mark.slow, pytest.mark.skipif(
    not (dist.is_available() and dist.is_gloo_available()), reason="needs torch.distributed/gloo")]


@pytest.mark.parametrize("restore", ["panacea", "curvature"])
def test_repair_under_ddp_spawn_end_to_end(tmp_path, restore):
    env = dict(os.environ, OMP_NUM_THREADS="1", VAA_CACHE_DIR=str(tmp_path / "cache"))
    cmd = [sys.executable, "-m", "vaa", "experiment=smoke", "method=sft", "trainer=ddp",
           f"restore={restore}", "trainer.progress_bar=false", "model.pretrain.max_steps=5",
           f"hydra.run.dir={tmp_path / 'run'}"]
    proc = subprocess.run(cmd, cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-4000:]
    m = json.loads((tmp_path / "run" / "metrics.json").read_text())
    restored = m["stages"]["restored"]
    assert restored is not None and restored["n_hs"] > 0
    info = json.loads((tmp_path / "run" / "restore.json").read_text())
    assert info["method"] == restore and info["passes"] > 0
