"""`vaa-cache rm` / `prune` keep an entry a running job uses (issue 14 follow-up). A complete
entry is read without its lock, so `rm` used to delete the base or aligned model under a job
that had already looked it up, and the job failed later with a misleading model error. Jobs
now record the entries they reach (vaa/pipeline/entry_users.py); rm refuses with one line
naming the live pid and host, `--force` removes anyway; dead jobs' records count for nothing."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys

import pytest

from test_cache_cli import ENV, cli, dead_pid, entry
from vaa.cache_cli import main
from vaa.pipeline import cache_inventory
from vaa.pipeline.cache import ArtifactCache
from vaa.pipeline.entry_users import USERS, EntryUsers, users

_USER = r"""
import sys, time
from vaa.pipeline.cache import ArtifactCache
from vaa.pipeline.entry_users import EntryUsers
with EntryUsers(run_dir="/runs/job-7") as using:
    using.add(ArtifactCache(sys.argv[1]), sys.argv[2])
    print("USING", flush=True)
    time.sleep(120)
"""


@pytest.fixture
def live_user(tmp_path):
    """A process that uses an entry (as a job's stage() records it) until the test ends."""
    procs = []

    def start(root, key):
        p = subprocess.Popen([sys.executable, "-c", _USER, str(root), key], env=ENV,
                             stdout=subprocess.PIPE, text=True)
        procs.append(p)
        assert p.stdout.readline().strip() == "USING"
        return p
    yield start
    for p in procs:
        p.kill()
        p.wait()


def test_rm_refuses_an_entry_a_live_job_uses_and_force_overrides(tmp_path, capsys, live_user):
    cache = ArtifactCache(tmp_path)
    key, other = entry(cache, "aligned", {"i": 1}), entry(cache, "aligned", {"i": 2})
    job = live_user(tmp_path, key)
    rc, out = cli(capsys, tmp_path, "rm", key, other)
    kept = [line for line in out.splitlines() if line.startswith("kept")]
    assert rc == 1 and cache.has(key) and not cache.has(other), out
    assert kept == [f"kept {key}: pid {job.pid} on host {socket.gethostname()} (job /runs/job-7) uses it; "
                    "--force removes it anyway (that job then fails)"]
    rc, out = cli(capsys, tmp_path, "ls")
    assert f"in use by pid {job.pid} on host {socket.gethostname()}" in out
    rc, out = cli(capsys, tmp_path, "prune", "--stage", "aligned")
    assert rc == 1 and cache.has(key)
    rc, out = cli(capsys, tmp_path, "rm", "--force", key)
    assert rc == 0 and not cache.has(key), out


def test_a_dead_jobs_record_does_not_block_and_is_collected(tmp_path, capsys):
    cache = ArtifactCache(tmp_path)
    key, kept_key = entry(cache, "base", {"i": 1}), entry(cache, "base", {"i": 2})
    for k in (key, kept_key):
        d = tmp_path / USERS / k
        d.mkdir(parents=True)
        (d / f"{socket.gethostname()}-1.json").write_text(json.dumps(
            {"pid": dead_pid(), "host": socket.gethostname(), "started": 0, "key": k}))
    rc, out = cli(capsys, tmp_path, "rm", key)
    assert rc == 0 and not cache.has(key), out
    assert cli(capsys, tmp_path, "gc")[0] == 0
    assert not (tmp_path / USERS / kept_key).exists() and cache.has(kept_key)


def test_a_job_that_looks_the_entry_up_during_rm_keeps_it(tmp_path, capsys, monkeypatch):
    """rm renames the entry aside and reads its users again: a job that found the entry
    between rm's first look and the rename wrote its record first, so the entry goes back."""
    cache = ArtifactCache(tmp_path)
    key = entry(cache, "finetuned", {"i": 1})
    answers = iter(["", "pid 4242 on host node-b"])
    monkeypatch.setattr(cache_inventory, "in_use", lambda c, k: next(answers))
    rc, out = cli(capsys, tmp_path, "rm", key)
    assert rc == 1 and cache.has(key) and "pid 4242 on host node-b uses it" in out
    assert not list(tmp_path.glob(".tmp-*"))


def test_the_pipeline_records_every_entry_its_job_reaches(tmp_path, monkeypatch, capsys):
    """A real job (experiment=smoke): while its base stage builds, the world entry it built
    is in use by this process and rm keeps it; after the job ends, nothing is in use."""
    from vaa.pipeline.run import run_pipeline
    from vaa.plan.cli import compose_config

    seen = {}

    class Stop(Exception):
        pass

    def base_that_tries_rm(ctx, out):
        world = ctx.keys["world"]
        seen["users"] = users(ctx.cache, world)
        seen["rm"] = cli(capsys, tmp_path / "cache", "rm", world)
        raise Stop

    monkeypatch.setattr("vaa.pipeline.stages.build_base", base_that_tries_rm)
    cfg = compose_config(["experiment=smoke", f"paths.cache_dir={tmp_path / 'cache'}"])
    with pytest.raises(Stop):
        run_pipeline(cfg, tmp_path / "run")
    assert [(u["pid"], u["run_dir"]) for u in seen["users"]] == [(os.getpid(), str((tmp_path / "run").resolve()))]
    rc, out = seen["rm"]
    assert rc == 1 and f"pid {os.getpid()} on host" in out
    assert not (tmp_path / "cache" / USERS).exists()  # released, folders too
    world = next(p.name for p in (tmp_path / "cache").iterdir() if p.is_dir() and p.name.startswith("world-"))
    assert cli(capsys, tmp_path / "cache", "rm", world)[0] == 0  # the job is over: removable


def test_entry_users_release_and_liveness(tmp_path):
    cache = ArtifactCache(tmp_path)
    with EntryUsers(run_dir="r") as using:
        using.add(cache, "base-0000000000000001")
        using.add(cache, "base-0000000000000001")  # once
        assert [u["pid"] for u in users(cache, "base-0000000000000001")] == [os.getpid()]
    assert users(cache, "base-0000000000000001") == [] and not (tmp_path / USERS).exists()


def test_a_key_being_built_names_its_builder(tmp_path, capsys):
    from filelock import FileLock

    cache = ArtifactCache(tmp_path)
    key = entry(cache, "finetuned", {"i": 3})
    cache.work_dir(key)  # a training stage's checkpoints, with this process's builder record
    with FileLock(str(cache.lock_path(key))):
        rc, out = cli(capsys, tmp_path, "rm", "--force", key)
    assert rc == 1 and cache.has(key)
    assert f"its lock is held by pid {os.getpid()} on host {socket.gethostname()} (building it)" in out
