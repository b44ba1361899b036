"""VAA under ``trainer=ddp``: 2 CPU processes (ddp_spawn, gloo).

Acceptance: every rank draws the same group each step, and the sampler sees the
all-reduced loss. The training runs in ``tests/ddp_vaa_worker.py`` (a subprocess: spawned
children must be able to re-import their main module), which writes one trace per rank.
About 20 s on a loaded 2-core machine.
"""

from __future__ import annotations

import importlib.util
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch.distributed as dist

from vaa.methods.dro.sampler import EXP3Sampler

WORKER = Path(__file__).with_name("ddp_vaa_worker.py")
REPO_ROOT = Path(__file__).resolve().parents[1]
TIMEOUT_S = 240

pytestmark = pytest.mark.skipif(
    not (dist.is_available() and dist.is_gloo_available()),
    reason="torch.distributed with the gloo backend is not available in this torch build; "
           "the DDP test needs 2 CPU processes on gloo")


def worker_steps() -> int:
    spec = importlib.util.spec_from_file_location("ddp_vaa_worker", WORKER)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod.STEPS


@pytest.fixture(scope="module")
def ranks(tmp_path_factory):
    out = tmp_path_factory.mktemp("ddp_vaa")
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", PYTHONHASHSEED="0")
    env.pop("MASTER_PORT", None)  # Lightning picks a free port for ddp_spawn
    env.pop("MASTER_ADDR", None)
    env["PYTHONPATH"] = os.pathsep.join([str(REPO_ROOT), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    try:
        proc = subprocess.run([sys.executable, str(WORKER), str(out)], cwd=REPO_ROOT, env=env,
                              capture_output=True, text=True, timeout=TIMEOUT_S)
    except subprocess.TimeoutExpired as e:
        pytest.fail(f"the DDP worker did not finish in {TIMEOUT_S} s:\n{(e.stderr or '')[-4000:]}")
    tail = f"stdout:\n{proc.stdout[-3000:]}\nstderr:\n{proc.stderr[-6000:]}"
    assert proc.returncode == 0, f"the DDP worker failed (rc {proc.returncode})\n{tail}"
    files = [out / f"rank{r}.json" for r in (0, 1)]
    missing = [f.name for f in files if not f.is_file()]
    assert not missing, f"no trace from {missing}\n{tail}"
    return [json.loads(f.read_text()) for f in files]


def test_both_ranks_ran_under_gloo_ddp(ranks):
    r0, r1 = ranks
    assert [r0["rank"], r1["rank"]] == [0, 1]
    assert r0["world_size"] == r1["world_size"] == 2
    assert r0["backend"] == r1["backend"] == "gloo"
    assert "DDP" in r0["strategy"]
    # The group stream is seeded by rank: the ranks read different batches of a group.
    assert [r0["stream_rank"], r1["stream_rank"]] == [0, 1]
    assert len(r0["steps"]) == len(r1["steps"]) == worker_steps()
    assert [s["global_step"] for s in r0["steps"]] == list(range(worker_steps()))


def test_every_rank_draws_the_same_group_each_step(ranks):
    r0, r1 = ranks
    g0, g1 = [s["group"] for s in r0["steps"]], [s["group"] for s in r1["steps"]]
    assert g0 == g1
    assert set(g0) == {0, 1}, f"only one group drawn ({g0}): the check would be vacuous"
    # The Bernoulli SAM coin is shared too (a rank doing an extra backward would deadlock).
    assert [s["perturbed_so_far"] for s in r0["steps"]] == [s["perturbed_so_far"] for s in r1["steps"]]
    assert r0["stats"] == r1["stats"]
    assert r0["stats"]["perturbed"] > 0


def test_p_trajectories_are_identical(ranks):
    r0, r1 = ranks
    assert r0["p0"] == r1["p0"]
    for a, b in zip(r0["steps"], r1["steps"]):
        assert a["p"] == pytest.approx(b["p"], abs=1e-12)
        assert a["probs"] == pytest.approx(b["probs"], abs=1e-12)
    ps = [s["p"] for s in r0["steps"]]
    assert max(abs(p - r0["p0"]) for p in ps) > 1e-3, f"p hardly moved: {ps}"


def test_the_sampler_sees_the_all_reduced_loss(ranks):
    r0, r1 = ranks
    for a, b in zip(r0["steps"], r1["steps"]):
        assert a["n_reduce_calls"] == b["n_reduce_calls"] == 1
        mean = (a["local_loss"] + b["local_loss"]) / 2
        assert a["reduced_loss"] == pytest.approx(mean, abs=1e-6)
        assert b["reduced_loss"] == pytest.approx(mean, abs=1e-6)
        for r in (a, b):
            assert r["update_group"] == r["group"]
            assert r["update_loss"] == r["reduced_loss"]  # exactly what all_reduce_mean returned
            assert r["local_after_call"] == r["local_loss"]  # the reduce left its input alone
    # Ranks see different data, so their local losses differ (else the check above is vacuous).
    assert any(abs(a["local_loss"] - b["local_loss"]) > 1e-6 for a, b in zip(r0["steps"], r1["steps"]))


def test_p_replays_from_the_reduced_losses(ranks):
    r0, _ = ranks
    cfg = r0["sampler"]
    replay = EXP3Sampler(num_groups=2, eta=cfg["eta"], clip=cfg["clip"], feedback=cfg["feedback"],
                         seed=cfg["seed"], group_sizes=cfg["group_sizes"])
    assert replay.p_vulnerable == r0["p0"]
    for s in r0["steps"]:
        assert replay.draw() == s["group"]  # the same seeded draws, with the same q
        replay.update(s["group"], s["reduced_loss"])
        assert replay.p_vulnerable == pytest.approx(s["p"], abs=1e-12)
    # The K = 2 closed form of the reference (vaa.md §3.1), as an independent check.
    p = r0["p0"]
    for s in r0["steps"]:
        x = cfg["eta"] * s["reduced_loss"]
        if s["group"] == 1:
            p = p * math.exp(x / p) / (p * math.exp(x / p) + 1 - p)
        else:
            p = p / (p + (1 - p) * math.exp(x / (1 - p)))
        assert p == pytest.approx(s["p"], abs=1e-12)
    # Replaying one rank's *local* losses gives another trajectory: the sampler did not see them.
    local = EXP3Sampler(num_groups=2, eta=cfg["eta"], clip=cfg["clip"], seed=cfg["seed"])
    for s in r0["steps"]:
        local.update(s["group"], s["local_loss"])
    assert abs(local.p_vulnerable - r0["steps"][-1]["p"]) > 1e-9


def test_gradients_are_averaged_weights_stay_in_sync(ranks):
    r0, r1 = ranks
    assert r0["param_sum"] == pytest.approx(r1["param_sum"], rel=1e-9, abs=1e-9)
    assert r0["param_absmax"] == pytest.approx(r1["param_absmax"], rel=1e-9, abs=1e-9)


def test_the_trajectory_comes_back_from_ddp_spawn(ranks):
    """Only the weights come back from spawned children by themselves: the sampler's
    trajectory and stats must too (dro_trajectory.json would be empty otherwise)."""
    main = json.loads((Path(ranks[0]["out_dir"]) / "main.json").read_text())
    assert len(main["trajectory"]) == worker_steps()
    assert main["stats"]["steps"] == worker_steps()
