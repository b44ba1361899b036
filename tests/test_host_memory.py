"""trainer.malloc_trim (vaa/training/host_memory.py): on a CPU trainer every manual_backward
of a training stage is followed by glibc's malloc_trim(0); off, on a GPU, or without glibc,
nothing is called. The memory it saves is measured, not asserted (README, the preset)."""

from __future__ import annotations

import pytest
import torch

from vaa.training import host_memory


@pytest.fixture
def calls(monkeypatch):
    seen = []
    monkeypatch.setattr(host_memory, "_libc_trim", lambda: seen.append)
    yield seen
    host_memory.configure({})  # off again for the other tests


@pytest.mark.parametrize("cfg, on", [
    ({"malloc_trim": True, "accelerator": "cpu"}, True),
    ({"malloc_trim": True}, True),                          # accelerator missing: a CPU run
    ({"malloc_trim": False, "accelerator": "cpu"}, False),
    ({"malloc_trim": True, "accelerator": "gpu"}, False),   # activations are not on the heap
    ({}, False),
])
def test_configure_turns_trimming_on_only_for_a_cpu_trainer_that_asks(calls, cfg, on):
    assert host_memory.configure(cfg) is on
    host_memory.after_backward()
    assert calls == ([0] if on else [])


def test_without_glibc_it_is_off(monkeypatch):
    monkeypatch.setattr(host_memory, "_libc_trim", lambda: None)
    assert host_memory.configure({"malloc_trim": True}) is False
    host_memory.after_backward()  # nothing to call, no error


def test_every_manual_backward_of_a_training_module_trims(calls, monkeypatch):
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


def test_the_real_libc_call_runs():
    if host_memory._libc_trim() is None:
        pytest.skip("no glibc here")
    assert host_memory.configure({"malloc_trim": True})
    host_memory.after_backward()
    host_memory.configure({})
