"""trainer.host_heap (vaa/training/host_memory.py): ``trim`` follows every manual_backward of a
training stage on a CPU trainer with glibc's malloc_trim(0); ``keep`` sets glibc's mmap
threshold to 1 GiB and its trim threshold to "never" once; ``system``, a GPU, or no glibc
call nothing. The memory and time they trade are measured, not asserted (README, benchmarks)."""

from __future__ import annotations

import subprocess
import sys
from types import SimpleNamespace

import pytest
import torch

from vaa.training import host_memory


class FakeLibc:
    def __init__(self, refuse=()):
        self.calls, self.refuse = [], refuse

    def malloc_trim(self, pad):
        self.calls.append(("malloc_trim", pad))

    def mallopt(self, param, value):
        self.calls.append(("mallopt", param, value.value))
        return 0 if (param, value.value) in self.refuse else 1


@pytest.fixture
def libc(monkeypatch):
    fake = FakeLibc()
    monkeypatch.setattr(host_memory, "_libc", lambda: fake)
    monkeypatch.setitem(host_memory._STATE, "kept", False)
    yield fake
    host_memory._STATE["kept"] = False
    host_memory.configure({})  # off again for the other tests


KEEP = [("mallopt", -3, 1 << 30), ("mallopt", -1, -1)]


@pytest.mark.parametrize("cfg, policy, calls", [
    ({"host_heap": "trim", "accelerator": "cpu"}, "trim", [("malloc_trim", 0)]),
    ({"host_heap": "trim"}, "trim", [("malloc_trim", 0)]),            # accelerator missing: a CPU run
    ({"host_heap": "keep", "accelerator": "cpu"}, "keep", KEEP),    # set once, nothing per backward
    ({"host_heap": "system", "accelerator": "cpu"}, "system", []),
    ({"host_heap": "trim", "accelerator": "gpu"}, "system", []),   # activations are not on the heap
    ({"host_heap": "keep", "accelerator": "gpu"}, "system", []),
    ({"host_heap": "trim", "accelerator": "auto"}, "trim", [("malloc_trim", 0)]),  # no CUDA here
    ({"host_heap": None}, "system", []),
    ({}, "system", []),
])
def test_configure_applies_the_policy_only_for_a_cpu_trainer(libc, cfg, policy, calls):
    assert host_memory.configure(cfg) == policy
    host_memory.after_backward()
    assert libc.calls == calls


def test_keep_falls_back_to_a_32_mib_threshold_where_glibc_refuses_1_gib(monkeypatch):
    fake = FakeLibc(refuse={(-3, 1 << 30)})
    monkeypatch.setattr(host_memory, "_libc", lambda: fake)
    monkeypatch.setitem(host_memory._STATE, "kept", False)
    assert host_memory.configure({"host_heap": "keep"}) == "keep"
    assert fake.calls == [("mallopt", -3, 1 << 30), ("mallopt", -3, 32 << 20), ("mallopt", -1, -1)]


def test_keep_refused_by_glibc_is_system_with_a_warning(monkeypatch, caplog):
    fake = FakeLibc(refuse={(-1, -1)})
    monkeypatch.setattr(host_memory, "_libc", lambda: fake)
    monkeypatch.setitem(host_memory._STATE, "kept", False)
    assert host_memory.configure({"host_heap": "keep"}) == "system"
    assert "glibc refused mallopt" in caplog.text


def test_after_keep_a_later_job_of_the_process_runs_under_keep(libc, caplog):
    """A local multirun: glibc's fixed thresholds cannot be undone, so a later system job is
    told (and reported) as keep; a later trim job still trims, nothing is set twice."""
    assert host_memory.configure({"host_heap": "keep"}) == "keep"
    assert host_memory.configure({"host_heap": "system"}) == "keep"
    assert "cannot undo; this job runs under keep" in caplog.text
    assert host_memory.configure({"host_heap": "trim"}) == "trim"
    host_memory.after_backward()
    assert libc.calls == KEEP + [("malloc_trim", 0)]


def test_an_attribute_config_is_read_too(libc):
    assert host_memory.configure(SimpleNamespace(host_heap="trim", accelerator="CPU")) == "trim"


def test_an_unknown_policy_is_refused(libc):
    with pytest.raises(ValueError, match=r"trainer.host_heap must be one of \('system', 'trim', 'keep'\), got 'fast'"):
        host_memory.configure({"host_heap": "fast"})
    assert libc.calls == []


def test_without_glibc_it_is_system(monkeypatch):
    monkeypatch.setattr(host_memory, "_libc", lambda: None)
    assert host_memory.configure({"host_heap": "trim"}) == "system"
    assert host_memory.configure({"host_heap": "keep"}) == "system"
    host_memory.after_backward()  # nothing to call, no error


def test_every_manual_backward_of_a_training_module_trims(libc, monkeypatch):
    import lightning as L

    from vaa.config.schema import TrainRecipe
    from vaa.methods.sft import SFT
    from vaa.training.module import AlignModule

    # Lightning's own manual_backward needs a trainer's strategy; the order is what is tested
    order = []
    monkeypatch.setattr(L.LightningModule, "manual_backward",
                        lambda self, loss, *a, **k: (loss.backward(), order.append("backward")))
    monkeypatch.setattr(host_memory, "after_backward", lambda: order.append("trim"))
    lin = torch.nn.Linear(3, 1)
    module = AlignModule(lin, SFT(), TrainRecipe(), 1)
    module.manual_backward(lin(torch.ones(2, 3)).sum())
    assert order == ["backward", "trim"] and lin.weight.grad is not None


@pytest.mark.parametrize("policy", ["trim", "keep"])
def test_the_real_libc_calls_run(policy):
    """In a child process: ``keep`` cannot be undone, and this process's heap is not ours."""
    if host_memory._libc() is None:
        pytest.skip("no glibc here")
    code = ("import torch; from vaa.training import host_memory as h; "
            f"assert h.configure({{'host_heap': '{policy}'}}) == '{policy}'; "
            "x = torch.ones(1 << 26); del x; h.after_backward(); print('ok')")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr[-2000:]


def test_a_spawned_rank_inherits_the_parents_policy(libc, monkeypatch):
    """ddp_spawn ranks import host_memory afresh: the parent's policy reaches them through the
    environment, and a configured process is left as it is."""
    assert host_memory.configure({"host_heap": "trim"}) == "trim"
    assert host_memory.inherit() == "trim" and libc.calls == []  # configured: nothing again
    monkeypatch.setitem(host_memory._STATE, "configured", False)  # a fresh rank
    monkeypatch.setitem(host_memory._STATE, "trim", None)
    assert host_memory.inherit() == "trim"
    host_memory.after_backward()
    assert libc.calls == [("malloc_trim", 0)]


def test_the_setup_of_a_training_module_inherits(monkeypatch):
    seen = []
    monkeypatch.setattr(host_memory, "inherit", lambda: seen.append("inherit"))
    from vaa.config.schema import TrainRecipe
    from vaa.methods.sft import SFT
    from vaa.training.module import AlignModule

    module = AlignModule(torch.nn.Linear(3, 1), SFT(), TrainRecipe(), 1)
    trainer = SimpleNamespace(precision="32-true", strategy=None, datamodule=None)
    monkeypatch.setattr(type(module), "trainer", property(lambda self: trainer))
    module.setup("fit")
    assert seen == ["inherit"]


def test_trim_now_trims_whatever_the_policy_and_release_memory_uses_it(libc, monkeypatch):
    host_memory.configure({"host_heap": "system"})
    host_memory.trim_now()
    assert libc.calls == [("malloc_trim", 0)]
    from vaa.pipeline import run

    run.release_memory()
    assert libc.calls == [("malloc_trim", 0)] * 2
