"""`vaa-cache` (vaa/cache_cli.py) and the cache's records (issue 14, item 4): every entry says
which config built it (provenance.json), temp and work folders say who builds them
(builder.json), and gc removes exactly the folders whose builder is gone — after a SIGKILL in
the middle of saving an artifact too — never a complete entry, never one whose lock is held."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from filelock import FileLock

from conftest import REPO_ROOT
from vaa.cache_cli import duration, main
from vaa.pipeline.builders import RECORD, builder_gone, pid_alive, write_record
from vaa.pipeline.cache import MARKER, PROVENANCE, ArtifactCache, stage_key
from vaa.pipeline.run import run_overrides

ENV = {**os.environ, "PYTHONPATH": str(REPO_ROOT), "OMP_NUM_THREADS": "1"}


def dead_pid() -> int:
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    return p.pid


def entry(cache: ArtifactCache, stage: str, cfg: dict, upstream=(), overrides=None, nbytes=10) -> str:
    key = stage_key(stage, cfg, list(upstream))
    cache.get_or_create(key, lambda d: (d / "w.bin").write_bytes(b"x" * nbytes) and None,
                        description=stage, provenance={"overrides": overrides})
    return key


def orphan(cache: ArtifactCache, key: str, pid: int, host: str | None = None, age_s: float = 0) -> Path:
    """A .tmp- folder as a builder leaves it, with a record of ``pid`` on ``host``."""
    d = cache.root / f".tmp-{key}-{'ab' * 16}"
    (d / "artifact").mkdir(parents=True)
    (d / "artifact" / "half.bin").write_bytes(b"y" * 100)
    rec = write_record(d, key=key)
    (d / RECORD).write_text(json.dumps({**rec, "pid": pid, "host": host or rec["host"]}))
    if age_s:
        old = time.time() - age_s
        for p in [d, d / RECORD, d / "artifact", d / "artifact" / "half.bin"]:
            os.utime(p, (old, old))
    return d


def cli(capsys, root: Path, *args: str) -> tuple[int, str]:
    rc = main(["--cache-dir", str(root), *args])
    out = capsys.readouterr()
    return rc, out.out + out.err


def test_entry_records_its_config_upstream_overrides_and_builder(tmp_path):
    cache = ArtifactCache(tmp_path)
    world = entry(cache, "world", {"n": 1})
    seen = []
    key = stage_key("base", {"lr": 0.1}, {"world": world})
    path, _ = cache.get_or_create(key, lambda d: seen.append(sorted(os.listdir(d))),
                                  description="base", provenance={"overrides": ["seed=3"]})
    assert seen == [[]]  # the builder still gets an empty folder
    prov = json.loads((path / PROVENANCE).read_text())
    assert prov["overrides"] == ["seed=3"] and prov["upstream"] == {"world": world}
    assert prov["config"] == {"lr": 0.1} and prov["description"] == "base"
    assert prov["builder"]["pid"] == os.getpid() and prov["builder"]["host"] == socket.gethostname()
    assert not list(tmp_path.glob(".tmp-*")) and (path / MARKER).is_file()


def test_run_overrides_from_the_run_folder(tmp_path):
    assert run_overrides(tmp_path) is None
    (tmp_path / ".hydra").mkdir()
    (tmp_path / ".hydra" / "overrides.yaml").write_text("- method=sft\n- seed=1\n")
    assert run_overrides(tmp_path) == ["method=sft", "seed=1"]


def test_ls_and_du(tmp_path, capsys):
    cache = ArtifactCache(tmp_path)
    w = entry(cache, "world", {"n": 1}, overrides=[], nbytes=1000)
    b = entry(cache, "base", {"m": 1}, [w], overrides=["method=sft", "seed=1"], nbytes=5000)
    entry(cache, "base", {"m": 2}, [w], overrides=["seed=2"], nbytes=3000)
    orphan(cache, "aligned-00000000000000aa", dead_pid())
    rc, out = cli(capsys, tmp_path, "ls")
    assert rc == 0 and w in out and b in out
    assert "built by: vaa method=sft seed=1" in out and f"upstream: {w}" in out
    assert "orphan (pid" in out and "4 folders" in out
    rc, out = cli(capsys, tmp_path, "ls", "--json", "--stage", "base")
    rows = [json.loads(line) for line in out.splitlines()]
    assert [r["overrides"] for r in rows] == [["method=sft", "seed=1"], ["seed=2"]]
    assert all(r["kind"] == "complete" and r["size_bytes"] > 3000 for r in rows)
    rc, out = cli(capsys, tmp_path, "du")
    lines = {line.split()[0]: line.split() for line in out.splitlines()}
    assert lines["base"][1] == "2" and lines["world"][1] == "1" and lines["(tmp)"][1] == "1"
    assert lines["total"][1] == "4"


def test_cache_dir_like_vaa(tmp_path, monkeypatch, capsys):
    entry(ArtifactCache(tmp_path / "a"), "world", {"n": 1})
    monkeypatch.setenv("VAA_CACHE_DIR", str(tmp_path / "a"))
    assert main(["ls"]) == 0 and "1 folders" in capsys.readouterr().out
    (tmp_path / "b").mkdir()
    assert main(["ls", f"paths.cache_dir={tmp_path / 'b'}"]) == 0
    assert "0 folders" in capsys.readouterr().out


@pytest.mark.parametrize("cmd", [["ls"], ["du"], ["gc"], ["rm", "base-"], ["prune", "--older-than", "7d"]])
def test_a_missing_cache_folder_is_an_error_naming_it(tmp_path, monkeypatch, capsys, cmd):
    """A mistyped root used to list "0 folders" (or "no cache entry matches") and exit 0."""
    missing = tmp_path / "no" / "such"
    rc = main(["--cache-dir", str(missing), *cmd])
    out = capsys.readouterr()
    lines = out.err.strip().splitlines()
    assert rc == 2 and out.out == "" and len(lines) == 1, out
    assert str(missing) in lines[0] and "does not exist" in lines[0] and "(--cache-dir)" in lines[0]
    assert all(s in lines[0] for s in ("--cache-dir DIR", "VAA_CACHE_DIR=DIR", "paths.cache_dir=DIR"))
    monkeypatch.setenv("VAA_CACHE_DIR", str(missing))
    assert main(cmd) == 2 and "($VAA_CACHE_DIR)" in capsys.readouterr().err
    (tmp_path / "file").write_text("x")
    assert main([*cmd, f"paths.cache_dir={tmp_path / 'file'}"]) == 2
    assert "(paths.cache_dir) is not a folder" in capsys.readouterr().err


_KILLED_MID_SAVE = r"""
import sys, time
from vaa.pipeline.cache import ArtifactCache
def build(d):
    with open(d / "model.safetensors", "wb") as f:   # a big artifact being written
        for i in range(10_000):
            f.write(b"\0" * (1 << 20))
            f.flush()
            if i == 2:
                print("SAVING", flush=True)
            time.sleep(0.05)
ArtifactCache(sys.argv[1]).get_or_create(sys.argv[2], build, description="aligned")
"""


def test_gc_after_sigkill_mid_save(tmp_path, capsys):
    cache = ArtifactCache(tmp_path)
    done = entry(cache, "world", {"n": 1})
    key = stage_key("aligned", {"seed": 0})
    child = subprocess.Popen([sys.executable, "-c", _KILLED_MID_SAVE, str(tmp_path), key],
                             env=ENV, stdout=subprocess.PIPE, text=True)
    assert child.stdout.readline().strip() == "SAVING"
    child.send_signal(signal.SIGKILL)
    child.wait()
    (tmp,) = tmp_path.glob(f".tmp-{key}-*")
    assert (tmp / "artifact" / "model.safetensors").stat().st_size >= 3 << 20
    assert json.loads((tmp / RECORD).read_text())["pid"] == child.pid
    alive = orphan(cache, "base-00000000000000bb", os.getpid())  # this process: alive
    rc, out = cli(capsys, tmp_path, "gc", "--dry-run")
    assert rc == 0 and tmp.exists() and "would remove" in out
    rc, out = cli(capsys, tmp_path, "gc")
    assert rc == 0 and not tmp.exists(), out
    assert f"pid {child.pid} dead on this host" in out
    assert alive.exists() and cache.has(done)  # a live builder's folder and complete entries stay
    assert not cache.has(key)


def test_gc_never_touches_a_folder_whose_lock_is_held(tmp_path, capsys):
    cache = ArtifactCache(tmp_path)
    key = "aligned-00000000000000cc"
    tmp = orphan(cache, key, dead_pid())
    holder = subprocess.Popen([sys.executable, "-c", "import sys, time; from filelock import FileLock; "
                               "l = FileLock(sys.argv[1]); l.acquire(); print('HELD', flush=True); time.sleep(60)",
                               str(cache.lock_path(key))], env=ENV, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "HELD"
        rc, out = cli(capsys, tmp_path, "gc")
        assert tmp.exists() and "lock is held by a live process" in out
    finally:
        holder.kill()
        holder.wait()
    cli(capsys, tmp_path, "gc")
    assert not tmp.exists()


def test_gc_other_hosts_and_work_folders(tmp_path, capsys):
    cache = ArtifactCache(tmp_path)
    old = orphan(cache, "base-00000000000000d1", 1, host="node-a", age_s=3 * 86400)
    recent = orphan(cache, "base-00000000000000d2", 1, host="node-a", age_s=60)
    done = entry(cache, "finetuned", {"x": 1})
    work_done = cache.work_dir(done)  # leftover checkpoints of a finished stage
    work_live = cache.work_dir("finetuned-00000000000000e1")  # this process trains it
    work_dead = cache.work_dir("finetuned-00000000000000e2")
    rec = json.loads((work_dead / RECORD).read_text())
    (work_dead / RECORD).write_text(json.dumps({**rec, "pid": dead_pid()}))
    rc, out = cli(capsys, tmp_path, "gc", "--older-than", "1d")
    assert not old.exists() and recent.exists()
    assert not work_done.exists() and work_live.exists() and not work_dead.exists()
    assert cache.has(done)
    cli(capsys, tmp_path, "gc", "--older-than", "30s")
    assert not recent.exists()


def test_pipeline_collects_only_its_own_dead_orphans(tmp_path):
    """get_or_create removes the key's .tmp- folders of dead builders before building; it
    keeps a live builder's and the key's .work- folder (the build resumes from it)."""
    cache = ArtifactCache(tmp_path)
    key = stage_key("aligned", {"seed": 1})
    dead = orphan(cache, key, dead_pid())
    other_key = orphan(cache, "aligned-00000000000000ff", dead_pid())
    work = cache.work_dir(key)
    (work / "last.ckpt").write_bytes(b"c")
    seen = []
    cache.get_or_create(key, lambda d: seen.append(dead.exists()))
    assert seen == [False] and other_key.exists() and (work / "last.ckpt").exists()


def test_rm_by_prefix_and_prune(tmp_path, capsys):
    cache = ArtifactCache(tmp_path)
    keys = [entry(cache, "finetuned", {"i": i}) for i in range(3)] + [entry(cache, "base", {"i": 0})]
    rc, out = cli(capsys, tmp_path, "rm", "finetuned-")
    assert rc == 2 and "matches 3 entries" in out and all(cache.has(k) for k in keys)
    rc, out = cli(capsys, tmp_path, "rm", keys[0][:14], "nothing-here")
    assert rc == 2 and "nothing-here" in out and cache.has(keys[0])
    rc, out = cli(capsys, tmp_path, "rm", keys[0][:16])
    assert rc == 0 and not cache.has(keys[0]) and cache.has(keys[1])
    meta = json.loads((cache.path(keys[1]) / MARKER).read_text())  # built 10 days ago
    (cache.path(keys[1]) / MARKER).write_text(json.dumps({**meta, "created": time.time() - 10 * 86400}))
    rc, out = cli(capsys, tmp_path, "prune", "--older-than", "7d")
    assert not cache.has(keys[1]) and cache.has(keys[2]) and cache.has(keys[3])
    rc, out = cli(capsys, tmp_path, "prune", "--stage", "finetuned")
    assert not cache.has(keys[2]) and cache.has(keys[3])
    assert cli(capsys, tmp_path, "prune")[0] == 2


def test_rm_refuses_a_key_being_built(tmp_path, capsys):
    cache = ArtifactCache(tmp_path)
    key = entry(cache, "base", {"i": 1})
    with FileLock(str(cache.lock_path(key))):  # a different open file: flock sees it as held
        rc, out = cli(capsys, tmp_path, "rm", key)
    assert rc == 1 and cache.has(key) and "held by a live process" in out


def test_builder_liveness_and_durations(tmp_path):
    assert pid_alive(os.getpid()) and not pid_alive(dead_pid())
    assert pid_alive(os.getpid(), started=time.time())
    # the record was written long before this process began: the pid was reused, its builder is gone
    assert not pid_alive(os.getpid(), started=time.time() - 365 * 86400)
    rec_dir = tmp_path / "x"
    rec_dir.mkdir()
    write_record(rec_dir)
    assert builder_gone(rec_dir, 0)[0] is False
    assert [duration(s) for s in ("90s", "30m", "12h", "7d", "2w", "5")] == [90, 1800, 43200, 604800, 1209600, 5]
    with pytest.raises(Exception, match="not a duration"):
        duration("a week")
