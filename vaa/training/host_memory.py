"""What a CPU job's heap does with the memory a backward pass frees (``trainer.host_heap``).

On a CPU every activation and gradient lives on glibc's heap, and glibc's own policy (``system``)
suits neither a memory-tight nor a time-tight job: it returns large freed blocks to the OS (a
block over its dynamic mmap threshold, at most 32 MiB, is unmapped on ``free``; the top of the
heap is trimmed past 2× that), so the next pass faults the same pages in again, yet it keeps
freed memory in the middle of the heap that the next pass does not always reuse. Two policies:

- ``trim``: ``malloc_trim(0)`` after every ``manual_backward`` of a training stage, handing all
  freed heap back. Measured with ``python -m benchmarks.host_heap --model smollm2_135m
  --threads 2`` (the ``smollm2_cpu`` preset's VAA step: LoRA r = 8, activation checkpointing,
  batch 8 × 160 tokens, clean then SAM-perturbed pass; 0.56 GB of tensors alive between
  passes): peak RSS 3.81 GB with ``system``, 3.17 GB with ``trim`` at 3 % more time. In the
  preset's job the VAA alignment stage peaked at 4,048 MiB, with trimming 2,808 MiB.
- ``keep``: set once per process (``mallopt``) that blocks up to 1 GiB come from the heap and
  that the heap is never trimmed on ``free``, so after the first step no pass faults pages in.
  Measured with ``python -m benchmarks.step_cost --model smollm2_135m --host-heap {system,keep}``
  (full fine-tuning, batch 8 × 128, no checkpointing, 2 idle cores): Booster faulted 473 k pages
  per step under ``system`` (SFT: 0), 16.9 s per step, 3.23× SFT; under ``keep`` 4.5 k, 14.9 s,
  3.05×; the benchmark's peak RSS 6,162 → 6,535 MiB. VAA's LoRA step of the preset
  (``benchmarks.host_heap``): ~7 % faster, ~9 % more memory. Memory is still handed back
  between stages (``vaa.pipeline.run.release_memory`` trims explicitly).

Both apply on a CPU accelerator only (a GPU's tensors are not on the host heap) and where
glibc is present (not macOS or musl: there nothing is called). They change no number a run
computes, so they are in no cache key (``vaa.pipeline.keys``). ``keep`` cannot be undone in
the process (glibc's dynamic threshold, once fixed, stays fixed).
"""

from __future__ import annotations

import ctypes
import logging
import os

log = logging.getLogger(__name__)

POLICIES = ("system", "trim", "keep")
M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3  # glibc's mallopt parameters (malloc.h)
KEEP_MMAP_THRESHOLD = 1 << 30  # blocks above 1 GiB are still mapped on their own

ENV = "VAA_HOST_HEAP"  # the policy in force, for processes this one spawns (DDP ranks)
_STATE = {"trim": None, "configured": False, "kept": False}  # trim: None or libc's malloc_trim


def configure(trainer_cfg) -> str:
    """Apply ``host_heap`` (default and ``null``: ``system``) of a ``trainer`` config on a CPU
    accelerator (missing: a CPU; ``auto``: a CPU unless CUDA is visible, as Lightning picks).
    Returns the policy in force: ``system`` on a GPU or without glibc; ``keep`` once a job of
    this process has set it (a Hydra multirun's later jobs; glibc's thresholds stay fixed), with
    ``trim`` still trimming on top. Raises ValueError for a value not in :data:`POLICIES`
    (validation catches it first)."""
    get = trainer_cfg.get if hasattr(trainer_cfg, "get") else (lambda k, d=None: getattr(trainer_cfg, k, d))
    policy = get("host_heap", "system") or "system"
    if policy not in POLICIES:
        raise ValueError(f"trainer.host_heap must be one of {POLICIES}, got {policy!r}")
    if not _on_cpu(get("accelerator", "cpu")):
        policy = "system"
    libc = _libc() if policy != "system" or _STATE["kept"] else None
    _STATE["trim"] = libc.malloc_trim if libc is not None and policy == "trim" else None
    _STATE["configured"] = True
    if libc is None:
        policy = "system"
    elif policy == "keep" and not _STATE["kept"]:
        _STATE["kept"] = _keep(libc)
        policy = "keep" if _STATE["kept"] else "system"
    elif policy == "system" and _STATE["kept"]:
        log.warning("trainer.host_heap=system: an earlier job of this process set keep, which "
                    "glibc cannot undo; this job runs under keep (run it in its own process)")
        policy = "keep"
    os.environ[ENV] = policy
    return policy


def _on_cpu(accelerator) -> bool:
    acc = str(accelerator).lower()
    if acc == "auto":
        import torch

        return not torch.cuda.is_available()
    return acc == "cpu"


def _keep(libc) -> bool:
    """Fix glibc's mmap threshold at 1 GiB (32 MiB where glibc refuses more) and turn off
    trimming on free. Returns whether the thresholds took."""
    ok = libc.mallopt(M_MMAP_THRESHOLD, ctypes.c_int(KEEP_MMAP_THRESHOLD)) == 1 or \
        libc.mallopt(M_MMAP_THRESHOLD, ctypes.c_int(32 << 20)) == 1
    if ok and libc.mallopt(M_TRIM_THRESHOLD, ctypes.c_int(-1)) == 1:  # size_t(-1): never
        return True
    log.warning("trainer.host_heap=keep: glibc refused mallopt (mmap threshold set: %s); the "
                "heap is left as glibc runs it", ok)
    return False


def inherit() -> str:
    """In a process nobody configured (a ``ddp_spawn`` rank imports this module afresh), apply
    the policy its parent put in ``VAA_HOST_HEAP``; in a configured one, nothing. Returns the
    policy in force."""
    if _STATE["configured"]:
        return os.environ.get(ENV, "system")
    return configure({"host_heap": os.environ.get(ENV, "system"), "accelerator": "cpu"})


def after_backward() -> None:
    """Trim the heap if this job's policy is ``trim`` (:func:`configure`); otherwise nothing."""
    trim = _STATE["trim"]
    if trim is not None:
        trim(0)


def trim_now() -> None:
    """Hand all freed heap back to the OS now, whatever the policy (between stages:
    ``vaa.pipeline.run.release_memory``); without glibc, nothing."""
    libc = _libc()
    if libc is not None:
        libc.malloc_trim(0)


def _libc():
    try:
        libc = ctypes.CDLL("libc.so.6")
        libc.malloc_trim, libc.mallopt  # noqa: B018 (both must exist: glibc)
        return libc
    except (OSError, AttributeError):
        return None
