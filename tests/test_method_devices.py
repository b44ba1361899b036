"""Every alignment method and fine-tuning defense keeps its tensors on the model's device
(issue 13): one training step runs with ``meta`` as the default device while the model and
the batch stay on the CPU (tests/devices.py), so a perturbation, mask or accumulator made
without ``device=`` raises here as it would next to a model on a GPU."""

from __future__ import annotations

import copy

import pytest
import torch

from tests.devices import off_default_device
from tests.test_baselines import METHODS, Harness, datamodule, world  # noqa: F401 (fixture)
from vaa.methods.gdro import GroupDRO
from vaa.methods.sft import SFT
from vaa.methods.vaa import VAA
from vaa.config.schema import DROConfig
from omegaconf import OmegaConf

ALL = {**METHODS, "sft": SFT, "vaa": lambda: VAA(dro=OmegaConf.structured(DROConfig)),
       "gdro": lambda: GroupDRO(dro=OmegaConf.structured(DROConfig))}


class OneProcess(Harness):
    def all_reduce_mean(self, value):  # CausalLMModule's, with one process
        return value


def harness(world, method):
    model = copy.deepcopy(world.model)
    if method.requires_groups:
        groups = [i % 2 for i in range(len(world.align))]
        dm = method.make_datamodule(world.align, world.tok, groups=groups, batch_size=4, seed=0,
                                    template="compact", max_length=96)
        dm.setup()
    else:
        dm = datamodule(world, method)
    h = OneProcess(model, method, lr=1e-2)
    method.setup(h, dm)
    return h, next(iter(dm.train_dataloader()))


@pytest.fixture
def streams_on_host(monkeypatch):
    """A stream's draw and collation are data loading, on the host (the step moves the batch)."""
    from vaa.data.group_stream import GroupStream
    real = GroupStream.next_batch

    def next_batch(self, group):
        with torch.device("cpu"):
            return real(self, group)
    monkeypatch.setattr(GroupStream, "next_batch", next_batch)


@pytest.mark.parametrize("name", sorted(ALL))
def test_a_training_step_makes_its_tensors_on_the_model_device(world, streams_on_host, name):
    h, batch = harness(world, ALL[name]())
    before = [p.detach().clone() for p in h.model.parameters()]
    for _ in range(2):  # the second step meets state the first one made (EMA, Booster, VAA)
        with off_default_device():
            logs = h.step(batch)
    assert torch.isfinite(logs["loss"]).all(), logs
    assert all(p.device.type == "cpu" for p in h.model.parameters())
    assert any(not torch.equal(a, b) for a, b in zip(before, h.model.parameters()))
