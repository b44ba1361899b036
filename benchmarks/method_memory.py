"""What a training method keeps in memory between steps, and the process's peak RSS
(step_cost's memory figures)."""

from __future__ import annotations

import resource
import sys

import torch


def _skip(obj) -> bool:
    """Objects that are not a method's own state: the model, the data, configs, RNGs."""
    import lightning as L
    from torch.utils.data import DataLoader

    from vaa.data.group_stream import GroupStream

    return isinstance(obj, (torch.nn.Module, L.LightningDataModule, L.LightningModule, DataLoader,
                            GroupStream, str, bytes, int, float, bool, type(None)))


def persistent_state_bytes(method, model: torch.nn.Module) -> int:
    """Bytes of the tensors reachable from ``method`` (through lists, dicts and the project's
    own objects, e.g. VAA's ``perturber.buffers``), each storage once, not counting the
    model's parameters or gradients, nor the training data."""
    exclude = {p.data_ptr() for p in model.parameters()}
    exclude |= {p.grad.data_ptr() for p in model.parameters() if p.grad is not None}
    seen_ptrs: set[int] = set()
    seen_ids: set[int] = set()
    total = 0

    def walk(obj, depth: int) -> None:
        nonlocal total
        if depth > 5 or id(obj) in seen_ids or _skip(obj):
            return
        seen_ids.add(id(obj))
        if isinstance(obj, torch.Tensor):
            ptr = obj.data_ptr()
            if ptr and ptr not in exclude and ptr not in seen_ptrs:
                seen_ptrs.add(ptr)
                total += obj.numel() * obj.element_size()
            return
        if isinstance(obj, dict):
            items = list(obj.values())
        elif isinstance(obj, (list, tuple, set)):
            items = list(obj)
        elif type(obj).__module__.startswith(("vaa.", "benchmarks.")) and hasattr(obj, "__dict__"):
            items = list(vars(obj).values())
        else:
            return
        for x in items:
            walk(x, depth + 1)

    walk(method, 0)
    return total


def peak_rss_mb() -> float:
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss / (1 << 20) if sys.platform == "darwin" else rss / 1024  # bytes / KiB
