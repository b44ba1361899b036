"""Every repair keeps its tensors on the model's device (issue 13).

On a GPU the model sits on ``cuda`` while a tensor made without ``device=`` lands on the
default device, the CPU: a missing ``.to()`` crashes there and nowhere on a CPU-only machine.
This test recreates that split without a GPU: the restorer's ``restore`` runs with the default
device set to ``meta``, while the model, the models it loads and the batches
``RestoreInputs.batches`` builds stay on the CPU (loading and collating are the host side, as
on a GPU). Any tensor the repair makes without naming the model's device is a meta tensor.
PyTorch itself lets some ops mix meta and CPU operands silently (``cpu @ meta``, an embedding
of meta ids), so :class:`OneDevice` checks every op as CUDA does: operands on two devices
raise, except a 0-dim CPU scalar and the copies between devices (``.to``, ``copy_``). Each
repair also has to return its model on the CPU with finite weights.
"""

from __future__ import annotations

import functools
import importlib

import pytest
import torch

from tests.devices import off_default_device
from vaa.models.build import load_model
from vaa.pipeline.run import run_pipeline
from vaa.restore.base import Restorer, RestoreInputs

SMOKE = ["experiment=smoke", "method=sft", "trainer.progress_bar=false", "model.pretrain.max_steps=5"]
REPAIRS = [
    ("merge", ["restore.alpha=0.3"]),
    ("merge", ["restore.method=dare", "restore.drop=0.5"]),
    ("merge", ["restore.method=ties"]),
    ("merge", ["restore.method=slerp"]),
    ("antidote", ["restore.dense_ratio=0.25"]),
    ("safelora", ["restore.num_proj_layers=2"]),
    ("curvature", ["restore.step.outer_steps=1", "restore.geometry.top_k=2",
                   "restore.geometry.power_iters=2", "restore.curvature.iters=3"]),
    ("q_realign", ["restore.epochs=1", "restore.probe_steps=20"]),
    ("panacea", []),
]
IDS = [r if r != "merge" else f"merge_{(x[0].split('=')[1] if 'method' in x[0] else 'linear')}"
       for r, x in REPAIRS]
for _name, _ in REPAIRS:  # every repair class exists before the fixture patches them
    importlib.import_module(f"vaa.restore.{_name}")


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


def on_host(fn):
    """``fn`` runs with the CPU as default device (the host side: loading, collating, Lightning)."""
    @functools.wraps(fn)
    def wrapper(*a, **kw):
        with torch.device("cpu"):
            return fn(*a, **kw)
    return wrapper


@pytest.fixture
def meta_default(monkeypatch):
    """Run every Restorer subclass's ``restore`` with ``meta`` as the default device."""
    for name in ("load", "batches", "prompt_batches"):
        monkeypatch.setattr(RestoreInputs, name, on_host(getattr(RestoreInputs, name)))
    real_init = RestoreInputs.__init__

    def init(self, *a, train=None, **kw):
        real_init(self, *a, train=on_host(train) if train is not None else None, **kw)
    monkeypatch.setattr(RestoreInputs, "__init__", init)

    def subclasses(cls):
        for sub in cls.__subclasses__():
            yield sub
            yield from subclasses(sub)
    for cls in set(subclasses(Restorer)):
        if "restore" in vars(cls):
            def restore(self, model, inputs, _orig=vars(cls)["restore"]):
                with off_default_device():
                    return _orig(self, model, inputs)
            monkeypatch.setattr(cls, "restore", restore)


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return tmp_path_factory.mktemp("devices_cache")


@pytest.mark.parametrize("restore,extra", REPAIRS, ids=IDS)
def test_each_repair_makes_its_tensors_on_the_model_device(compose, cache, tmp_path, meta_default,
                                                           restore, extra):
    cfg = compose([*SMOKE, f"restore={restore}", *extra])
    cfg.paths.cache_dir = str(cache)
    m = run_pipeline(cfg, tmp_path)
    assert m["stages"]["restored"] is not None and not m["stages"]["restored"]["cached"]
    model, _ = load_model(cache / m["cache_keys"]["restored"])
    for name, p in model.named_parameters():
        assert p.device.type == "cpu" and torch.isfinite(p).all(), name


def test_the_harness_catches_a_tensor_made_off_device(meta_default):
    """The check itself: a repair that builds a mask without ``device=`` fails under it."""
    class Careless(Restorer):
        def restore(self, model, inputs):
            w = model.weight
            with torch.no_grad():
                w.mul_(torch.ones(w.shape))  # no device=: the default device's tensor
            return model
    model = torch.nn.Linear(2, 2)  # on the CPU, as the repaired model is here
    with off_default_device(), pytest.raises(RuntimeError, match="mixes tensors"):
        Careless.restore(Careless.__new__(Careless), model, None)
