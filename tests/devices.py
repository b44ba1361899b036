"""A CPU-only stand-in for "the model sits on another device than the default" (issue 13).

On a GPU a tensor made without ``device=`` lands on the CPU, next to a model on ``cuda``, and
the op that meets the two raises. Here: run the code under test with ``torch.device("meta")``
as the default device while its model and batches stay on the CPU, inside :class:`OneDevice`,
which applies CUDA's rule to every op (PyTorch lets some ops mix meta and CPU operands
silently: ``cpu @ meta``, an embedding of meta ids).
"""

from __future__ import annotations

import contextlib

import torch
from torch.overrides import TorchFunctionMode
from torch.utils._pytree import tree_flatten


class OneDevice(TorchFunctionMode):
    """Raise when one op's tensor operands sit on two devices (CUDA's rule; see module doc)."""

    CROSSING = {"to", "copy_", "cpu", "cuda", "type", "__get__", "__set__", "set_", "new_tensor"}

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if getattr(func, "__name__", "") not in self.CROSSING:
            devices = {t.device.type for t in tree_flatten((args, kwargs))[0]
                       if isinstance(t, torch.Tensor) and not (t.dim() == 0 and t.device.type == "cpu")}
            if len(devices) > 1:
                raise RuntimeError(f"{getattr(func, '__name__', func)} mixes tensors on {sorted(devices)}: "
                                   "a tensor was made without the model's device")
        return func(*args, **kwargs)


@contextlib.contextmanager
def off_default_device():
    """Default device ``meta`` and :class:`OneDevice`, for the code under test only."""
    with torch.device("meta"), OneDevice():
        yield
