"""Argument checks of the Group DRO components (:mod:`vaa.methods.dro.sampler`,
:mod:`vaa.methods.dro.reweight`): type tests that reject ``bool``, group-size counts, the
sampler's ``clip`` pair, group ids and losses.

The ``check_*`` functions raise ``ValueError`` naming the offending argument, so a bad config value fails
at construction (or at the first ``update``) with a message that says what to fix.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Sequence
from typing import Any


def is_int(x: Any) -> bool:
    return isinstance(x, numbers.Integral) and not isinstance(x, bool)


def is_real(x: Any) -> bool:
    return isinstance(x, numbers.Real) and not isinstance(x, bool)


def as_counts(values: Any) -> list[int] | None:
    """Non-negative whole numbers (ints, numpy / 0-d torch integers, integral floats) as a
    list of ints, or None if ``values`` is not such a sequence."""
    if isinstance(values, (str, bytes)):
        return None
    try:
        out = []
        for v in values:
            if isinstance(v, (bool, str, bytes)):
                return None
            n = int(v)
            if n != v or n < 0:
                return None
            out.append(n)
        return out
    except (TypeError, ValueError, OverflowError):
        return None


def check_clip(clip: Sequence[float] | None, K: int) -> tuple[float, float] | None:
    """``clip`` as ``(lo, hi)`` with 0 <= lo <= hi <= 1 (and lo·K <= 1 for K > 2), or None."""
    if clip is None:
        return None
    try:
        if isinstance(clip, (str, bytes)):
            raise TypeError
        c = list(clip)
    except TypeError:
        raise ValueError(f"clip must be null or a pair [lo, hi], got {clip!r}") from None
    if len(c) != 2 or not all(is_real(v) and math.isfinite(v) for v in c):
        raise ValueError(f"clip must be null or a pair of finite numbers [lo, hi], got {clip!r}")
    lo, hi = float(c[0]), float(c[1])
    if not 0.0 <= lo <= hi <= 1.0:
        raise ValueError(f"clip must satisfy 0 <= lo <= hi <= 1, got {clip!r}")
    if K > 2 and lo * K > 1.0 + 1e-12:
        raise ValueError(f"clip: the floor lo={lo} times num_groups={K} exceeds 1")
    return lo, hi


def check_group(group: Any, num_groups: int) -> int:
    """``group`` as an int in [0, num_groups)."""
    if not is_int(group) or not 0 <= group < num_groups:
        raise ValueError(f"group must be an integer in [0, {num_groups}), got {group!r}")
    return int(group)


def check_loss(loss: Any, name: str = "loss") -> float:
    """``loss`` (a number, numpy scalar or 0-d tensor) as a finite float."""
    if isinstance(loss, (str, bytes)):
        raise ValueError(f"{name} must be a finite number, got {loss!r}")
    try:
        v = float(loss)
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be a finite number, got {loss!r}") from None
    if not math.isfinite(v):
        raise ValueError(f"{name} must be finite, got {v}")
    return v
