"""The vulnerability groups of the alignment set: example uids, ForgotNum and grouping.

specs/vaa.md §2.2–2.5. Group ids follow the reference code: 0 = invulnerable
("Unforget"), 1 = vulnerable ("Forget").

**Example uid.** Every example is keyed by its content, never by its position:
``uid = sha1(json.dumps([prompt, response], ensure_ascii=False,
separators=(",", ":")).encode("utf-8")).hexdigest()`` (40 lower-case hex digits). The JSON
list makes the pair unambiguous (no separator can collide with the text), and the recipe
does not depend on Python's salted ``hash()``. ``prompt`` is the example's user text
(``Example.input``; the instruction and template are not part of it) and ``response`` its
target (``Example.output``).

Writing, reading and joining the groups file (``groups.jsonl``, keyed by this uid) is in
:mod:`vaa.data.groups_file`.
"""

from __future__ import annotations

import hashlib
import json
from collections import Counter
from typing import Sequence

INVULNERABLE, VULNERABLE = 0, 1
DEFINITIONS = ("first_vs_t0", "transitions")
AGGREGATES = ("union", "intersection")


def example_uid(prompt: str, response: str) -> str:
    """SHA-1 hex of the (prompt, response) pair; recipe in the module docstring."""
    if not isinstance(prompt, str) or not isinstance(response, str):
        raise TypeError(f"example_uid needs two strings, got {type(prompt).__name__} and "
                        f"{type(response).__name__}")
    text = json.dumps([prompt, response], ensure_ascii=False, separators=(",", ":"))
    return hashlib.sha1(text.encode("utf-8")).hexdigest()


# ---------------------------------------------------------------------------- counting


def _check_flags(flags: Sequence[int | bool]) -> list[int]:
    if len(flags) == 0:
        raise ValueError("forgot_num needs the flags HS^0..HS^T (at least HS^0), got an empty list")
    out = []
    for t, f in enumerate(flags):
        if isinstance(f, float) or f not in (0, 1):  # bools and ints 0/1 (also numpy ints)
            raise ValueError(f"flag at checkpoint t={t} must be 0/1 (or a bool), got {f!r}")
        out.append(int(f))
    return out


def forgot_num(flags: Sequence[int | bool], definition: str) -> int:
    """ForgotNum of one example from its harmfulness flags HS^0..HS^T (§2.2).

    - ``first_vs_t0``: Σ_{t≥1} 1[HS^t > HS^0] — checkpoints at which an answer that was
      safe at t = 0 is harmful (an example harmful at t = 0 is never counted);
    - ``transitions``: Σ_{t≥1} 1[HS^{t−1} = 0 ∧ HS^t = 1] — safe → harmful flips between
      consecutive checkpoints.

    With T = 1 the two coincide.
    """
    hs = _check_flags(flags)
    if definition == "first_vs_t0":
        return sum(1 for h in hs[1:] if h > hs[0])
    if definition == "transitions":
        return sum(1 for a, b in zip(hs, hs[1:]) if a == 0 and b == 1)
    raise ValueError(f"unknown forgetting definition {definition!r}; use one of {list(DEFINITIONS)}")


def assign_groups(flags_per_run: Sequence[Sequence[Sequence[int]]], definition: str,
                  aggregate: str = "union") -> tuple[list[int], list[list[int]]]:
    """Groups from the flags of one or more proxy runs (runs × examples × checkpoints t=0..T).

    An example is vulnerable (1) iff ForgotNum > 0 in any run (``union``) / in every run
    (``intersection``); otherwise invulnerable (0). Returns ``(groups, forgot_nums)`` with
    ``forgot_nums[r][i]`` the ForgotNum of example i in run r.
    """
    if aggregate not in AGGREGATES:
        raise ValueError(f"unknown aggregate {aggregate!r}; use one of {list(AGGREGATES)}")
    if definition not in DEFINITIONS:
        raise ValueError(f"unknown forgetting definition {definition!r}; use one of {list(DEFINITIONS)}")
    if len(flags_per_run) == 0:
        raise ValueError("assign_groups needs the flags of at least one proxy run")
    n = len(flags_per_run[0])
    for r, run in enumerate(flags_per_run):
        if len(run) != n:
            raise ValueError(f"proxy run {r} has flags for {len(run)} examples, run 0 for {n}: "
                             "every run must judge the whole alignment set")
    forgot: list[list[int]] = []
    for r, run in enumerate(flags_per_run):
        counts = []
        for i, flags in enumerate(run):
            try:
                counts.append(forgot_num(flags, definition))
            except ValueError as e:
                raise ValueError(f"proxy run {r}, example {i}: {e}") from None
        forgot.append(counts)
    combine = any if aggregate == "union" else all
    groups = [int(combine(f[i] > 0 for f in forgot)) for i in range(n)]
    return groups, forgot


def group_counts(groups: Sequence[int]) -> dict[int, int]:
    """``{0: #invulnerable, 1: #vulnerable}`` (plus any other id present)."""
    c = Counter(int(g) for g in groups)
    return {g: c.get(g, 0) for g in sorted(set(c) | {INVULNERABLE, VULNERABLE})}
