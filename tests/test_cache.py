import dataclasses
import logging
import os
import re
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from filelock import FileLock
from omegaconf import OmegaConf

from vaa.pipeline.cache import MARKER, ArtifactCache, resolve_cache_dir, stage_key

REPO_ROOT = Path(__file__).resolve().parents[1]
CFG = {"lr": 1e-4, "layers": [64, 64], "name": "mlp"}
UP = {"world": "world-0123456789abcdef"}


# ----------------------------------------------------------------- stage_key
def test_key_format_and_determinism():
    k = stage_key("base", CFG, UP)
    assert re.fullmatch(r"base-[0-9a-f]{16}", k)
    assert k == stage_key("base", dict(CFG), dict(UP))


def test_key_regression_pin():
    # If this fails, hashing changed and every existing cache entry is orphaned:
    # bump CACHE_VERSION deliberately and update the literal.
    assert stage_key("base", CFG, UP) == "base-0ce1ff526a6c9814"


def test_key_ignores_dict_order():
    a = {"x": 1, "y": {"p": 1, "q": 2}}
    b = {"y": {"q": 2, "p": 1}, "x": 1}
    assert stage_key("s", a) == stage_key("s", b)
    assert stage_key("s", a, {"u1": "a-1", "u2": "b-2"}) == stage_key("s", a, {"u2": "b-2", "u1": "a-1"})


def test_key_changes_with_value_upstream_and_stage():
    base = stage_key("base", CFG, UP)
    assert stage_key("base", {**CFG, "lr": 2e-4}, UP) != base
    assert stage_key("base", {**CFG, "extra": None}, UP) != base
    assert stage_key("base", CFG, {"world": "world-fedcba9876543210"}) != base
    assert stage_key("base", CFG, {"other": "world-0123456789abcdef"}) != base
    assert stage_key("base", CFG) != base
    aligned = stage_key("aligned", CFG, UP)
    assert aligned.startswith("aligned-") and aligned[len("aligned-"):] != base[len("base-"):]


def test_key_sequence_upstream_is_order_insensitive():
    assert stage_key("s", {}, ["a-1", "b-2"]) == stage_key("s", {}, ("b-2", "a-1"))
    assert stage_key("s", {}, ["a-1"]) != stage_key("s", {}, ["a-2"])


def test_dictconfig_equals_plain_dict_and_resolves_interpolations():
    assert stage_key("base", OmegaConf.create(CFG), UP) == stage_key("base", CFG, UP)
    interp = OmegaConf.create({"a": 3, "b": "${a}"})
    assert stage_key("s", interp) == stage_key("s", {"a": 3, "b": 3})


@dataclasses.dataclass
class _Cfg:
    lr: float = 0.0001
    layers: tuple = (64, 64)
    out: Path = Path("/tmp/x")


def test_normalisation_of_dataclass_tuple_path_float():
    plain = {"lr": 1e-4, "layers": [64, 64], "out": "/tmp/x"}
    assert stage_key("s", _Cfg()) == stage_key("s", plain)
    assert stage_key("s", {"lr": 0.0001}) == stage_key("s", {"lr": 1e-4})
    assert stage_key("s", None) != stage_key("s", {})


def test_unhashable_values_are_rejected():
    with pytest.raises(TypeError):
        stage_key("s", {"fn": object()})
    with pytest.raises(ValueError):
        stage_key("bad/stage", {})


# ------------------------------------------------------------- ArtifactCache
def _writer(calls):
    def build(d: Path):
        calls.append(d)
        assert d.is_dir() and not any(d.iterdir())  # fresh, empty temp dir
        (d / "weights.txt").write_text("42")
        return {"n_params": 7}
    return build


def test_get_or_create_builds_once_then_reuses(tmp_path):
    cache = ArtifactCache(tmp_path / "nested" / "root")  # root created on demand
    key = stage_key("base", CFG, UP)
    calls = []
    assert not cache.has(key)
    p, built = cache.get_or_create(key, _writer(calls), description="base model")
    assert built and p == cache.path(key) == tmp_path / "nested" / "root" / key
    assert (p / "weights.txt").read_text() == "42" and cache.has(key)
    p2, built2 = cache.get_or_create(key, _writer(calls))
    assert p2 == p and built2 is False and len(calls) == 1
    # a fresh cache object on the same root (e.g. a new process) also reuses it
    assert ArtifactCache(tmp_path / "nested" / "root").get_or_create(key, _writer(calls))[1] is False
    meta = cache.meta(key)
    assert meta["key"] == key and meta["description"] == "base model"
    assert meta["extra"] == {"n_params": 7} and abs(meta["created"] - time.time()) < 60
    assert not list((tmp_path / "nested" / "root").glob(".tmp-*"))


def test_failed_build_leaves_nothing_trusted(tmp_path):
    cache = ArtifactCache(tmp_path)
    key = "base-0000000000000000"

    def boom(d: Path):
        (d / "partial.bin").write_text("half")
        raise RuntimeError("oom")

    with pytest.raises(RuntimeError, match="oom"):
        cache.get_or_create(key, boom)
    assert not cache.has(key) and not cache.path(key).exists()
    assert not list(tmp_path.glob(".tmp-*"))
    calls = []
    p, built = cache.get_or_create(key, _writer(calls))
    assert built and len(calls) == 1 and not (p / "partial.bin").exists()


def test_incomplete_final_dir_is_rebuilt(tmp_path):
    cache = ArtifactCache(tmp_path)
    key = "aligned-1111111111111111"
    stale = cache.path(key)
    stale.mkdir(parents=True)
    (stale / "junk.bin").write_text("crashed mid-write")
    assert not cache.has(key)
    calls = []
    p, built = cache.get_or_create(key, _writer(calls))
    assert built and len(calls) == 1
    assert not (p / "junk.bin").exists() and (p / MARKER).is_file()


def test_waiting_for_lock_is_logged(tmp_path, caplog):
    cache = ArtifactCache(tmp_path)
    key = "world-2222222222222222"
    holder = FileLock(str(tmp_path / f"{key}.lock"))
    holder.acquire()
    result = {}
    t = threading.Thread(target=lambda: result.update(r=cache.get_or_create(key, _writer([]))))
    with caplog.at_level(logging.INFO, logger="vaa.pipeline.cache"):
        t.start()
        time.sleep(1.3)
        assert "r" not in result  # blocked on the lock, not built behind our back
        holder.release()
        t.join(5)
    assert result["r"][1] is True
    assert any("waiting for lock" in r.getMessage() for r in caplog.records)


_CHILD = r"""
import sys, time
from pathlib import Path
from vaa.pipeline.cache import ArtifactCache
root, key, counter, start = sys.argv[1], sys.argv[2], Path(sys.argv[3]), float(sys.argv[4])
def build(d):
    with open(counter, "a") as f:
        f.write("x\n")
    time.sleep(0.5)
    (d / "out").write_text("ok")
while time.time() < start:  # barrier: both processes race for the lock together
    time.sleep(0.005)
p, built = ArtifactCache(root).get_or_create(key, build)
print("BUILT" if built else "REUSED", (p / "out").read_text())
"""


def test_two_processes_build_exactly_once(tmp_path):
    root, counter = tmp_path / "cache", tmp_path / "counter.txt"
    key = stage_key("finetuned", {"seed": 0})
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO_ROOT), os.environ.get("PYTHONPATH", "")])}
    start = time.time() + 1.5
    procs = [
        subprocess.Popen([sys.executable, "-c", _CHILD, str(root), key, str(counter), str(start)],
                         env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        for _ in range(2)
    ]
    outs = [p.communicate(timeout=30) for p in procs]
    for p, (out, err) in zip(procs, outs):
        assert p.returncode == 0, err
    assert counter.read_text().count("x") == 1
    assert sorted(o.split()[0] for o, _ in outs) == ["BUILT", "REUSED"]
    assert all(o.split()[1] == "ok" for o, _ in outs)
    assert ArtifactCache(root).has(key) and not list(root.glob(".tmp-*"))


# --------------------------------------------------------- resolve_cache_dir
def test_resolve_cache_dir_precedence(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.setenv("VAA_CACHE_DIR", str(tmp_path / "env"))
    assert resolve_cache_dir(str(tmp_path / "arg")) == tmp_path / "arg"
    assert resolve_cache_dir("~/c") == tmp_path / "home" / "c"
    assert resolve_cache_dir(None) == tmp_path / "env"
    assert resolve_cache_dir("") == tmp_path / "env"
    monkeypatch.setenv("VAA_CACHE_DIR", "~/envc")
    assert resolve_cache_dir(None) == tmp_path / "home" / "envc"
    monkeypatch.delenv("VAA_CACHE_DIR")
    assert resolve_cache_dir(None) == tmp_path / "home" / ".cache" / "vaa"
