"""Progress (vaa/training/progress.py), per-stage peak memory (vaa/pipeline/memory.py) and the
compute-thread rule (vaa/pipeline/threads.py): issue 11 items 6–7, issue 14 items 6–7 and 10.

Log lines appear when stdout is not a terminal, at the configured cadence, with stage,
step / total, loss, s/step and ETA; a terminal gets a bar over the stage's steps; a training
stage shorter than ``log_every_n_steps`` still writes its metrics.csv; no warning from our
code on a VAA step.
"""

from __future__ import annotations

import logging
import os
import re
import subprocess
import sys
import warnings

import pytest
import torch
from omegaconf import OmegaConf

from vaa.pipeline.memory import PeakMemory
from vaa.pipeline.threads import JobRegistry, apply_threads, choose_threads
from vaa.training.progress import ProgressLine, configure, fmt_duration


class Clock:
    def __init__(self):
        self.t = 0.0

    def __call__(self) -> float:
        return self.t


def lines(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == "vaa.progress"]


def test_lines_every_30_s_with_loss_rate_and_eta(caplog):
    caplog.set_level(logging.INFO, logger="vaa.progress")
    clock = Clock()
    with ProgressLine("aligned", total=20, every_s=30, tty=False, clock=clock) as p:
        for step in range(1, 21):
            clock.t += 10.0  # 10 s per step
            p.update(1, loss=2.0 / step)
    out = lines(caplog)
    assert out[0] == "aligned: start, 20 steps"
    # a line at 30, 60, 90, ... s (every 3rd step), then the last step, then the end line
    steps = [int(m.group(1)) for m in (re.match(r"aligned: step (\d+)/20", s) for s in out) if m]
    assert steps == [3, 6, 9, 12, 15, 18, 20]
    assert out[1] == "aligned: step 3/20 (15%) loss 0.6667 | 10 s/step | ETA 2m50s"
    assert out[-2].startswith("aligned: step 20/20 (100%) loss 0.1000 | 10 s/step | ETA 0s")
    assert out[-1] == "aligned: done, 20 steps in 3m20s"


def test_lines_every_n_steps_whichever_first(caplog):
    caplog.set_level(logging.INFO, logger="vaa.progress")
    clock = Clock()
    p = ProgressLine("eval_base hs", total=10, unit="prompt", every_s=30, every_n=4, tty=False,
                     clock=clock)
    for _ in range(10):
        clock.t += 1.0  # fast: the step cadence comes first
        p.update()
    p.close()
    p.close()  # idempotent
    body = [s for s in lines(caplog) if "/10" in s]
    assert [s.split()[3] for s in body] == ["4/10", "8/10", "10/10"]
    assert body[0].startswith("eval_base hs: prompt 4/10 (40%) | 1 s/prompt | ETA 6s")
    assert sum("done" in s for s in lines(caplog)) == 1


def test_no_lines_when_disabled_and_settings_from_trainer_config(caplog):
    caplog.set_level(logging.INFO, logger="vaa.progress")
    s = configure(OmegaConf.create({"progress_bar": False, "progress_every_s": 0,
                                    "progress_every_n_steps": 0}))
    try:
        with ProgressLine("finetuned", total=5) as p:  # the job's settings: no bar, no lines
            assert p.bar is None
            p.update(5)
        assert lines(caplog) == []
    finally:
        configure(OmegaConf.create({"progress_bar": True, "progress_every_s": 30,
                                    "progress_every_n_steps": 0}))
    assert (s.every_s, s.every_n, s.bar) == (30.0, 0, True)


def test_terminal_bar_shows_stage_steps_of_the_stage_and_eta(capsys, caplog):
    caplog.set_level(logging.INFO, logger="vaa.progress")
    with ProgressLine("aligned", total=200, tty=True) as p:
        p.update_to(80, loss=1.25)
    out = capsys.readouterr().out
    assert "aligned" in out and "80/200" in out and "Epoch" not in out
    assert re.search(r"<\d\d:\d\d", out)  # tqdm's remaining time over the stage
    assert lines(caplog) == []  # a bar, not log lines


def test_fmt_duration():
    assert [fmt_duration(x) for x in (0, 42.4, 75.3, 3725)] == ["0s", "42s", "1m15s", "1h02m05s"]


# --------------------------------------------------------------------------------------------
# a real Lightning stage through vaa.training.fit
# --------------------------------------------------------------------------------------------
def tiny_stage(tmp_path, method, steps: int, log_every: int = 10, every_n: int = 2):
    from vaa.config.schema import ArchConfig, AttackConfig
    from vaa.data.formats import Example
    from vaa.models.build import build_tiny_llama
    from vaa.models.tokenizer import build_word_tokenizer
    from vaa.training.fit import fit
    from vaa.training.module import AlignModule

    rows = [Example(instruction="say", input=f"word{i % 5}", output=f"answer{i % 3} done")
            for i in range(24)]
    tok = build_word_tokenizer([w for e in rows for w in (e.instruction, e.input, e.output)]
                               + ["### instruction : input : response :"])
    model = build_tiny_llama(ArchConfig(hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                                        num_key_value_heads=2, intermediate_size=32), tok, seed=0)
    groups = [i % 2 for i in range(len(rows))] if method.requires_groups else None
    dm = method.make_datamodule(rows, tok, groups=groups, extra={}, batch_size=4, seed=0,
                                template="alpaca", max_length=64, max_prompt_length=64)
    recipe = OmegaConf.structured(AttackConfig(lr=1e-3, batch_size=4))
    trainer_cfg = OmegaConf.create({"accelerator": "cpu", "devices": 1, "strategy": "auto",
                                    "precision": "32-true", "progress_bar": True,
                                    "log_every_n_steps": log_every, "checkpoint_every_n_steps": 0,
                                    "deterministic": False})
    configure({"progress_bar": True, "progress_every_s": 30, "progress_every_n_steps": every_n})
    try:
        fit(AlignModule(model, method, recipe, steps), dm, max_steps=steps, trainer_cfg=trainer_cfg,
            log_dir=tmp_path / "logs", stage="aligned")
    finally:
        configure({"progress_bar": True, "progress_every_s": 30, "progress_every_n_steps": 0})


def test_stage_writes_lines_and_metrics_csv_although_shorter_than_log_interval(tmp_path, caplog):
    from vaa.methods.sft import SFT

    torch.set_num_threads(1)
    caplog.set_level(logging.INFO, logger="vaa.progress")
    tiny_stage(tmp_path, SFT(), steps=5, log_every=10, every_n=2)  # stdout is not a tty here
    out = lines(caplog)
    body = [s for s in out if re.match(r"aligned: step \d+/5", s)]
    assert [s.split()[2] for s in body] == ["2/5", "4/5", "5/5"]
    assert all(re.search(r"loss \d+\.\d{4} \| [\d.e+-]+ s/step \| ETA", s) for s in body)
    assert out[0] == "aligned: start, 5 steps" and out[-1].startswith("aligned: done, 5 steps")
    csv = (tmp_path / "logs" / "aligned" / "metrics.csv").read_text().splitlines()
    assert len(csv) >= 2 and "align/loss" in csv[0]


def test_stage_on_a_terminal_draws_one_bar_over_the_stage(tmp_path, capsys, caplog, monkeypatch):
    """Lightning's bar read "Epoch 0/-2" (max_epochs=-1); ours: stage, step/total, ETA."""
    from vaa.methods.sft import SFT

    torch.set_num_threads(1)
    caplog.set_level(logging.INFO, logger="vaa.progress")
    monkeypatch.setattr(sys.stdout, "isatty", lambda: True)
    tiny_stage(tmp_path, SFT(), steps=7)
    out = capsys.readouterr().out
    assert re.search(r"aligned: 100%.*7/7 \[", out) and "Epoch" not in out
    assert lines(caplog) == []


def test_vaa_step_raises_no_warning_from_our_code(tmp_path):
    """The "Consider using tensor.detach() first" warning of vaa/methods/vaa.py (issue 14 item 10)."""
    from hydra.utils import instantiate

    from tests.conftest import compose_config

    cfg = compose_config(["method=vaa"])
    method = instantiate(cfg.method)
    torch.set_num_threads(1)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        from vaa.utils import quiet_libraries
        quiet_libraries()  # the pipeline's filters (library noise), not ours
        tiny_stage(tmp_path, method, steps=6, log_every=1)
    ours = [w for w in caught if "/vaa/" in w.filename.replace(os.sep, "/")
            or "detach" in str(w.message) or "deprecated" in str(w.message)]
    assert not ours, [f"{w.filename}:{w.lineno}: {w.message}" for w in ours]


# --------------------------------------------------------------------------------------------
# memory
# --------------------------------------------------------------------------------------------
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="the exact path is Linux's")
def test_peak_rss_is_per_stage_not_process_lifetime():
    with PeakMemory() as big:
        block = bytearray(200 << 20)
        block[:: 4096] = b"x" * len(block[:: 4096])  # touch every page
        del block
    with PeakMemory() as small:
        pass
    assert big.rss_mb - small.rss_mb > 150  # the first stage's 200 MB did not leak into the second
    assert big.gpu_mb is None or big.gpu_mb >= 0


def test_peak_rss_sampling_fallback(monkeypatch):
    import vaa.pipeline.memory as M

    monkeypatch.setattr(M, "_reset_hwm", lambda: False)  # e.g. no writable clear_refs
    with PeakMemory(interval=0.01) as m:
        block = bytearray(100 << 20)
        block[:: 4096] = b"x" * len(block[:: 4096])
        import time
        time.sleep(0.1)
        del block
    assert m.rss_mb is not None and m.rss_mb >= 100


# --------------------------------------------------------------------------------------------
# threads
# --------------------------------------------------------------------------------------------
def test_threads_rule(tmp_path, monkeypatch):
    import vaa.pipeline.threads as T

    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.setattr(T, "cores", lambda: 8)
    reg = JobRegistry(tmp_path)
    with reg:
        assert choose_threads(None, reg)[0] == 8  # alone
        sib = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
        try:
            other = JobRegistry(tmp_path)
            other.path = tmp_path / f"{reg.host}-{sib.pid}.json"
            other.path.write_text('{"pid": %d, "ticks": %s}' % (
                sib.pid, '"%s"' % T._start_ticks(sib.pid) if T._start_ticks(sib.pid) else "null"))
            (tmp_path / f"{reg.host}-999999999.json").write_text('{"pid": 999999999}')  # dead
            assert choose_threads(None, reg) == (4, "8 cores / 2 vaa job(s) on this host")
            assert not (tmp_path / f"{reg.host}-999999999.json").exists()  # cleaned
        finally:
            sib.kill()
            sib.wait()
        assert choose_threads(None, reg)[0] == 8  # the sibling left: threads come back
        monkeypatch.setenv("OMP_NUM_THREADS", "3")
        assert choose_threads(None, reg) == (3, "OMP_NUM_THREADS")
        assert choose_threads(2, reg) == (2, "trainer.threads")
    assert not reg.path.exists()
    from vaa.errors import ConfigError
    with pytest.raises(ConfigError, match="trainer.threads"):
        choose_threads(0, None)


def test_apply_threads_sets_torch(monkeypatch):
    before = torch.get_num_threads()
    try:
        assert apply_threads(OmegaConf.create({"threads": 1}), None) == 1
        assert torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(before)


def test_pid_reuse_is_not_a_live_job(tmp_path):
    import vaa.pipeline.threads as T

    if T._start_ticks(os.getpid()) is None:
        pytest.skip("no /proc")
    # our parent is alive, but a record with another start time is a reused pid: dead
    assert T._alive(os.getppid(), T._start_ticks(os.getppid()))
    assert not T._alive(os.getppid(), "1")


def test_a_repair_writes_progress_lines_of_its_sequence_passes(caplog):
    """A repair's length is unknown in advance: its lines count sequence passes (no total,
    no '/0', no ETA) through ``Restorer.count``, and end with a 'done' line."""
    import logging

    from vaa.restore.base import Restorer
    from vaa.training.progress import ProgressLine
    r = Restorer.__new__(Restorer)
    r.passes, r.progress = 0, None
    batch = {"input_ids": torch.zeros(4, 3, dtype=torch.long)}
    ticks = iter(range(0, 1000, 40))
    with caplog.at_level(logging.INFO, logger="vaa.progress"):
        with ProgressLine("restored", total=None, unit="sequence", tty=False, every_s=30,
                          clock=lambda: next(ticks)) as r.progress:
            r.count([batch], 2)
            r.count([batch])
    lines = [m.getMessage() for m in caplog.records]
    assert r.passes == 12
    assert lines[1].startswith("restored: sequence 8 |") and "/0" not in lines[1] and "ETA" not in lines[1]
    assert lines[-1].startswith("restored: done, 12 sequences in")
