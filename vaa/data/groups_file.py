"""The groups file ``groups.jsonl``: writing, reading, joining on example uids, and importing
the reference implementation's index list.

specs/vaa.md §2.2–2.5. Every row is keyed by the uid of its alignment example
(:func:`vaa.data.groups.example_uid`: SHA-1 of the (prompt, response) pair), never by its
position; group ids are those of :mod:`vaa.data.groups` (0 = invulnerable, 1 = vulnerable).

**File format** (``groups.jsonl``): one JSON object per line, one line per alignment
example, in alignment-set order::

    {"uid": "<sha1>", "index": 17, "group": 1, "forgot_num": 2,
     "flags": [0, 0, 1, 1, 0, 0], "meta": {...}}

- ``index``: the example's position in the alignment set when the file was written
  (provenance only: loading joins on ``uid``, see ``groups_for``);
- ``flags``: HS_i^t for t = 0..T of the one proxy run; with several proxy runs a list per
  run (``[[...], [...]]``), ``forgot_num`` is then the maximum over runs and
  ``forgot_num_per_run`` holds each run's count;
- ``meta``: the provenance of the estimate (proxy task(s), p, n, lr, epochs, judge,
  definition, aggregate, model, ...), the same dict on every row;
- an imported reference index list (``import_reference_indices``) has ``forgot_num: null``
  and ``flags: []``.

Required on reading: ``uid``, ``index``, ``group``; ``forgot_num``, ``flags`` and ``meta``
default to ``null``, ``[]`` and ``{}``.
"""

from __future__ import annotations

import json
import os
from collections import Counter, defaultdict
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Sequence, Union

from vaa.data.groups import INVULNERABLE, VULNERABLE, example_uid

REQUIRED_FIELDS = ("uid", "index", "group")

PathLike = Union[str, "os.PathLike[str]"]


def _uids(examples: Sequence[tuple[str, str]]) -> list[str]:
    out = []
    for i, ex in enumerate(examples):
        if len(ex) != 2:
            raise ValueError(f"alignment example {i}: expected a (prompt, response) pair, got {ex!r:.80}")
        out.append(example_uid(ex[0], ex[1]))
    return out


# ---------------------------------------------------------------------------- the file


@dataclass
class GroupRow:
    """One line of ``groups.jsonl`` (see the module docstring)."""

    uid: str
    index: int
    group: int
    forgot_num: int | None = None
    flags: list = field(default_factory=list)
    meta: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _nested(x: Sequence) -> bool:
    """Whether ``x`` is a list of per-run lists (runs × examples [× checkpoints])."""
    return len(x) > 0 and isinstance(x[0], (list, tuple)) and len(x[0]) > 0 \
        and isinstance(x[0][0], (list, tuple))


def write_groups(path: PathLike, examples: Sequence[tuple[str, str]], groups: Sequence[int],
                 forgot_nums: Sequence | None = None, flags: Sequence | None = None,
                 meta: dict[str, Any] | None = None) -> list[dict]:
    """Write ``groups.jsonl`` for ``examples`` (ordered (prompt, response) pairs).

    ``forgot_nums``: per example, or per run (runs × examples, as ``assign_groups`` returns);
    ``flags``: per example (examples × checkpoints) or per run (runs × examples ×
    checkpoints). Several runs are stored as described in the module docstring. The file is
    written to a temporary name and renamed, so a crash never leaves half a file. Returns
    the rows written.
    """
    n = len(examples)
    if len(groups) != n:
        raise ValueError(f"{len(groups)} groups for {n} alignment examples")
    bad = [g for g in groups if g not in (INVULNERABLE, VULNERABLE)]
    if bad:
        raise ValueError(f"group ids must be 0 (invulnerable) or 1 (vulnerable), got {bad[0]!r}")
    runs_forgot: list[list[int]] | None = None
    if forgot_nums is not None:
        runs_forgot = [list(r) for r in forgot_nums] if forgot_nums and isinstance(
            forgot_nums[0], (list, tuple)) else [list(forgot_nums)]
        for r in runs_forgot:
            if len(r) != n:
                raise ValueError(f"forgot_nums has {len(r)} entries for {n} alignment examples")
    runs_flags: list | None = None
    if flags is not None:
        runs_flags = [list(r) for r in flags] if _nested(flags) else [list(flags)]
        for r in runs_flags:
            if len(r) != n:
                raise ValueError(f"flags has {len(r)} rows for {n} alignment examples")
    uids = _uids(examples)
    rows = []
    for i in range(n):
        row = GroupRow(uid=uids[i], index=i, group=int(groups[i]), meta=dict(meta or {})).to_dict()
        if runs_forgot is not None:
            per_run = [int(r[i]) for r in runs_forgot]
            row["forgot_num"] = max(per_run)
            if len(per_run) > 1:
                row["forgot_num_per_run"] = per_run
        if runs_flags is not None:
            per_run_flags = [[int(f) for f in r[i]] for r in runs_flags]
            row["flags"] = per_run_flags[0] if len(per_run_flags) == 1 else per_run_flags
        rows.append(row)
    write_rows(path, rows)
    return rows


def write_rows(path: PathLike, rows: Sequence[dict]) -> None:
    """Write group rows (dicts or ``GroupRow``) as JSONL, atomically (temp file + rename)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        for r in rows:
            f.write(json.dumps(r.to_dict() if isinstance(r, GroupRow) else r, ensure_ascii=False) + "\n")
    os.replace(tmp, path)


def read_groups(path: PathLike) -> list[dict]:
    """Rows of a ``groups.jsonl``. Errors name the file and the (1-based) line."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"groups file {path} does not exist")
    rows = []
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            where = f"{path}, line {lineno}"
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{where}: not valid JSON ({e.msg} at column {e.colno}); a groups "
                                 "file has one JSON object per line") from None
            if not isinstance(row, dict):
                raise ValueError(f"{where}: expected a JSON object, got {type(row).__name__}")
            missing = [k for k in REQUIRED_FIELDS if k not in row]
            if missing:
                raise ValueError(f"{where}: missing field(s) {missing}; every row needs "
                                 f"{list(REQUIRED_FIELDS)} (found {sorted(row)})")
            if not isinstance(row["uid"], str) or not row["uid"]:
                raise ValueError(f"{where}: 'uid' must be a non-empty string, got {row['uid']!r}")
            if not _is_int(row["index"]) or row["index"] < 0:
                raise ValueError(f"{where}: 'index' must be an int >= 0, got {row['index']!r}")
            if not _is_int(row["group"]) or row["group"] not in (INVULNERABLE, VULNERABLE):
                raise ValueError(f"{where}: 'group' must be 0 (invulnerable) or 1 (vulnerable), "
                                 f"got {row['group']!r}")
            row.setdefault("forgot_num", None)
            row.setdefault("flags", [])
            row.setdefault("meta", {})
            rows.append(row)
    if not rows:
        raise ValueError(f"groups file {path} has no rows")
    return rows


def _is_int(x: Any) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


# ---------------------------------------------------------------------------- joining


def groups_for(examples: Sequence[tuple[str, str]], rows: Sequence[dict], *,
               source: str = "the groups file", strict_order: bool = False) -> list[int]:
    """The group of every alignment example, joined on ``uid`` (content), never on position.

    Fails loudly: an example with no row, or a row that matches no example, means the file
    was estimated on a different alignment set. Rows in another order than the examples
    still join correctly (groups follow the content); ``strict_order=True`` makes a
    reordering an error too (specs/vaa.md §10 item 5). Identical (prompt, response) pairs
    share a uid; their rows are matched to them in ``index`` order.
    """
    uids = _uids(examples)
    by_uid: dict[str, list[dict]] = defaultdict(list)
    for r in sorted(rows, key=lambda r: r["index"]):
        by_uid[r["uid"]].append(r)
    hint = ("the groups file was estimated on a different alignment set (or an older version "
            "of it); re-run the estimation (dro.groups_file=null) or pass the groups file of "
            "this alignment set")
    taken: Counter[str] = Counter()
    out = []
    for i, u in enumerate(uids):
        k = taken[u]
        if k >= len(by_uid.get(u, ())):
            extra = "" if k == 0 else f" ({k} row(s) with this uid were already used by earlier duplicates)"
            raise ValueError(f"alignment example {i} (uid {u}) has no row in {source}{extra}: {hint}")
        row = by_uid[u][k]
        taken[u] += 1
        if strict_order and row["index"] != i:
            raise ValueError(f"alignment example {i} (uid {u}) is at index {row['index']} in {source}: "
                             "the alignment set was reordered since the groups were estimated")
        out.append(int(row["group"]))
    unused = [r for u, rs in by_uid.items() for r in rs[taken[u]:]]
    if unused:
        first = min(unused, key=lambda r: r["index"])
        raise ValueError(f"{len(unused)} row(s) of {source} match no alignment example (first: index "
                         f"{first['index']}, uid {first['uid']}); {source} has {len(rows)} rows for "
                         f"{len(examples)} examples: wrong file — {hint}")
    return out


# ---------------------------------------------------------------------------- reference file


def import_reference_indices(path_or_list, examples, **checks) -> list[dict]:
    """The reference's index list as group rows, after its order and checksum checks: see
    vaa.data.reference_indices (kept here, where callers have always found it)."""
    from vaa.data.reference_indices import import_reference_indices as import_indices

    return import_indices(path_or_list, examples, **checks)
