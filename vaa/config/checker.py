"""Range rules over one config node, each failure one line: ``key=value: requirement; fix``.

A :class:`Checker` is bound to a node and its dotted prefix (``attack.``); its rules read the
node's values and append ``(dotted key, message)`` to a shared list, so every failure of a
config is collected before anything is reported (vaa.config.validate). A schema's
``check(c)`` (vaa/config/methods.py) receives a Checker for its own node.
"""

from __future__ import annotations

import math
from typing import Any, Iterable, Optional

from omegaconf import OmegaConf

Problem = tuple[str, str]  # (dotted key, one-line message)


def is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


class Checker:
    def __init__(self, node, prefix: str, problems: list[Problem], root=None):
        self.node, self.prefix, self.problems = node, prefix, problems
        self.root = root if root is not None else node  # the whole config (cross-field rules)

    def at(self, key: str) -> "Checker":
        """A checker for the sub-node ``key`` (``c.at("sampler").unit("eta")``)."""
        return Checker(OmegaConf.select(self.node, key), f"{self.prefix}{key}.", self.problems, self.root)

    def get(self, key: str, default: Any = None) -> Any:
        return OmegaConf.select(self.node, key, default=default)

    def has(self, key: str) -> bool:
        return OmegaConf.select(self.node, key, default="__absent__") != "__absent__"

    def fail(self, key: str, requirement: str, value: Any = "__get__") -> None:
        """Record ``<prefix><key>=<value>: <requirement>``."""
        v = self.get(key) if value == "__get__" else value
        shown = "null" if v is None else v
        self.problems.append((self.prefix + key, f"{self.prefix}{key}={shown}: {requirement}"))

    # ----------------------------------------------------------------------------- numbers --
    def _number(self, key: str, optional: bool, what: str) -> Optional[float]:
        v = self.get(key)
        if v is None and optional:
            return None
        if not is_number(v) or not math.isfinite(v):
            self.fail(key, f"must be a finite number {what}")
            return None
        return v

    def positive(self, *keys: str, optional: bool = False) -> None:
        """Finite and > 0 (learning rates, radii, temperatures)."""
        for k in keys:
            v = self._number(k, optional, "> 0")
            if v is not None and v <= 0:
                self.fail(k, "must be > 0")

    def nonneg(self, *keys: str, optional: bool = False) -> None:
        """Finite and >= 0 (weights of a loss term, weight decay, clip norms; 0 switches off)."""
        for k in keys:
            v = self._number(k, optional, ">= 0")
            if v is not None and v < 0:
                self.fail(k, "must be >= 0")

    def between(self, key: str, lo: float, hi: float, *, optional: bool = False,
                lo_open: bool = False, hi_open: bool = False, meaning: str = "") -> None:
        """``lo <= v <= hi`` (open ends as asked); ``meaning`` says what the value is."""
        v = self._number(key, optional, f"in {'(' if lo_open else '['}{lo}, {hi}{')' if hi_open else ']'}")
        if v is None:
            return
        bad = v < lo or v > hi or (lo_open and v == lo) or (hi_open and v == hi)
        if bad:
            interval = f"{'(' if lo_open else '['}{lo:g}, {hi:g}{')' if hi_open else ']'}"
            self.fail(key, f"must be in {interval}" + (f" ({meaning})" if meaning else ""))

    def unit(self, *keys: str, optional: bool = False, meaning: str = "") -> None:
        """A ratio / probability in [0, 1]."""
        for k in keys:
            self.between(k, 0.0, 1.0, optional=optional, meaning=meaning)

    def count(self, *keys: str, minimum: int = 1, optional: bool = False, meaning: str = "") -> None:
        """An integer >= ``minimum`` (batch sizes, token counts, rows); ``optional``: null allowed."""
        for k in keys:
            v = self.get(k)
            if v is None and optional:
                continue
            if not isinstance(v, int) or isinstance(v, bool) or v < minimum:
                tail = " or null" if optional else ""
                self.fail(k, f"must be an integer >= {minimum}{tail}" + (f" ({meaning})" if meaning else ""))

    def one_of(self, key: str, choices: Iterable[Any], optional: bool = False) -> None:
        v, choices = self.get(key), list(choices)
        if v is None and optional:
            return
        if v not in choices:
            self.fail(key, f"must be one of {', '.join(map(str, choices))}")

    def require(self, ok: bool, key: str, requirement: str) -> None:
        if not ok:
            self.fail(key, requirement)
