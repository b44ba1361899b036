"""SIGTERM (SLURM's time-out, `kill`, a preemption) ends a job as Ctrl-C does (issue 14
follow-up): exit 143, ``interrupted.json`` naming the stage and the signal, the stage's
``.tmp-`` folder removed, the previous handler back. Before, a SIGTERM outside training killed
the process with no record (its temp folder left for gc), and one inside Lightning's fit was
turned by Lightning into a ``SIGTERMException``, a SystemExit with no code: exit status 0.

In-process: a stand-in stage (or a thread watching the cache) sends the signal to this very
process. A guard handler stands in for the default one (which would kill pytest): if SIGTERM
reaches it, the job did not install its own."""

from __future__ import annotations

import json
import os
import signal
import threading
import time
from pathlib import Path

import pytest

from vaa.cli import run_job

TERMINATED = 143  # 128 + SIGTERM, as a shell reports it
from vaa.plan.cli import compose_config


class ReachedTheDefaultHandler(RuntimeError):
    pass


@pytest.fixture
def guard():
    """SIGTERM/SIGINT handlers as they were after the test; SIGTERM meanwhile raises
    ReachedTheDefaultHandler unless the job replaced the handler."""
    def guard_handler(signum, frame):
        raise ReachedTheDefaultHandler("SIGTERM reached the process's own handler")

    saved = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGINT)}
    signal.signal(signal.SIGTERM, guard_handler)
    yield guard_handler
    for s, h in saved.items():
        signal.signal(s, h)


def job_for(tmp_path: Path) -> tuple[object, dict]:
    cfg = compose_config(["experiment=smoke", f"paths.cache_dir={tmp_path / 'cache'}"])
    job = {"run_dir": str(tmp_path / "run"), "name": "default", "group": None,
           "overrides": ["experiment=smoke"], "num": None}
    return cfg, job


def record_of(tmp_path: Path) -> dict:
    return json.loads((tmp_path / "run" / "interrupted.json").read_text())


def test_sigterm_inside_a_stage_is_recorded_like_ctrl_c(tmp_path, monkeypatch, capsys, guard):
    seen = []

    def world_killed_mid_build(ctx, out: Path) -> None:
        (out / "half.bin").write_bytes(b"x" * 1000)
        seen.append(sorted(p.name for p in (tmp_path / "cache").iterdir()))
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(30)  # the handler raises first
        raise AssertionError("SIGTERM did not interrupt the stage")

    monkeypatch.setattr("vaa.pipeline.stages.build_world", world_killed_mid_build)
    cfg, job = job_for(tmp_path)
    with pytest.raises(SystemExit) as e:
        run_job(cfg, job)
    assert e.value.code == TERMINATED
    assert any(n.startswith(".tmp-world-") for n in seen[0])  # the build's temp folder existed
    left = [p.name for p in (tmp_path / "cache").iterdir() if p.is_dir()]
    assert left == [], left  # the temp folder removed as for Ctrl-C, no entry
    rec = record_of(tmp_path)
    assert rec["status"] == "interrupted" and rec["stage"] == "world" and rec["signal"] == "SIGTERM"
    assert not (tmp_path / "run" / "failed.json").exists()
    err = capsys.readouterr().err
    assert "vaa: interrupted during stage 'world' (SIGTERM); record:" in err
    assert signal.getsignal(signal.SIGTERM) is guard  # the job put the previous handler back


def test_sigterm_during_lightning_training_is_recorded(tmp_path, capsys, guard):
    """The base model's pre-training (Lightning fit, with Lightning's own SIGTERM handler
    composed with the job's) is terminated from another thread once its .work- folder exists."""
    cfg, job = job_for(tmp_path)
    cache = tmp_path / "cache"

    def kill_when_training() -> None:
        deadline = time.time() + 300
        while time.time() < deadline:
            if cache.is_dir() and any(p.name.startswith(".work-base-") and (p / "builder.json").exists()
                                      for p in cache.iterdir()):
                time.sleep(0.5)
                os.kill(os.getpid(), signal.SIGTERM)
                return
            time.sleep(0.05)

    killer = threading.Thread(target=kill_when_training, daemon=True)
    killer.start()
    with pytest.raises(SystemExit) as e:
        run_job(cfg, job)
    killer.join(timeout=5)
    assert e.value.code == TERMINATED, e.value.code
    rec = record_of(tmp_path)
    assert rec["stage"] == "base" and rec["signal"] == "SIGTERM"
    assert not list(cache.glob(".tmp-base-*")) and not [p for p in cache.glob("base-*") if p.is_dir()]
    assert "interrupted during stage 'base' (SIGTERM)" in capsys.readouterr().err
    assert signal.getsignal(signal.SIGTERM) is guard


def test_lightnings_own_sigterm_exception_is_an_interrupt_too(tmp_path, monkeypatch, capsys):
    """Where the job cannot install its handler (not the main thread), Lightning's fit loop
    turns a SIGTERM into SIGTERMException (a SystemExit without a code: exit status 0, no
    record, measured on the old code); it is recorded as a SIGTERM interrupt, exit 143."""
    from lightning.pytorch.utilities.exceptions import SIGTERMException

    def terminated_in_training(cfg, run_dir):
        e = SIGTERMException()
        e.vaa_stage = "aligned"
        raise e

    monkeypatch.setattr("vaa.pipeline.run.run_pipeline", terminated_in_training)
    cfg, job = job_for(tmp_path)
    with pytest.raises(SystemExit) as e:
        run_job(cfg, job)
    assert e.value.code == TERMINATED
    assert record_of(tmp_path)["stage"] == "aligned" and record_of(tmp_path)["signal"] == "SIGTERM"
