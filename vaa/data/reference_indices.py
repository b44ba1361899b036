"""The reference implementation's grouping (``grouping/vulnerable.json``, specs/vaa.md §2.4):
a JSON list of integer indices into its ordered alignment set; listed = group 1, others 0.

The indices are positional, so they mean something only on the alignment set the reference
built (the first 2,000 ``is_safe`` rows of BeaverTails 30k_train, in table order). Before
mapping them, :func:`verify_reference_alignment` checks that this run's alignment set is
that set (issue 12 item 5), and refuses otherwise, naming the index file, the rows and the
override:

- **order**: where the data stage recorded each row's table position (its uid
  ``<table>#<row>``), the rows must be in table order (a reversed or shuffled set fails,
  naming the first two rows out of order);
- **nothing removed**: the data stage dropped or re-drew no alignment row (``data.json``
  ``content.dropped.align``: a row repeating an HS prompt), or every later index would
  point one row off;
- **checksum**: when the expected ``align_checksum`` is known (``dro.reference_align_checksum``:
  sha256 of the JSON list of the alignment examples' uids, in order; the ``meta`` of every
  imported row records this run's value), it must match.

``dro.reference_check=false`` imports without these checks (knowingly: the indices may then
select other examples than the reference's).
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any, Sequence

from vaa.data.groups_file import GroupRow, PathLike, _is_int, _uids


def _sha256_json(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, separators=(",", ":")).encode("utf-8")).hexdigest()

OVERRIDE = ("rebuild the alignment set as the reference did (data.align_source=beavertails, "
            "data.align_rows.start=0, table order, no row removed), or import anyway, knowingly, "
            "with dro.reference_check=false")


def align_checksum(examples: Sequence[tuple[str, str]]) -> str:
    """sha256 of the JSON list of the examples' uids, in order: identifies an alignment set."""
    return _sha256_json(_uids(examples))


def verify_reference_alignment(where: str, examples: Sequence[tuple[str, str]], *,
                               positions: Sequence[int | None] | None = None, dropped: int = 0,
                               expected_checksum: str | None = None) -> None:
    """Raise ValueError (naming ``where``, the rows and the override) when ``examples`` cannot
    be the alignment set the index list refers to; see the module docstring."""
    problems = []
    if positions is not None:
        known = [(i, p) for i, p in enumerate(positions) if p is not None]
        for (i0, p0), (i1, p1) in zip(known, known[1:]):
            if p1 <= p0:
                problems.append(f"alignment rows {i0} and {i1} are table rows {p0} and {p1}: the set "
                                f"is not in table order (reordered), so index {i0} no longer names "
                                f"the reference's example {i0}")
                break
    if dropped:
        problems.append(f"the data stage removed {dropped} alignment row(s) that repeat an HS prompt "
                        f"(data.json content.dropped.align), so later indices point at other rows")
    if expected_checksum:
        got = align_checksum(examples)
        if got != expected_checksum:
            problems.append(f"its align_checksum is {got[:16]}… but dro.reference_align_checksum is "
                            f"{expected_checksum[:16]}… (a different or reordered alignment set of "
                            f"{len(examples)} examples)")
    if problems:
        raise ValueError(f"{where}: the reference's indices are positions in its alignment set, but "
                         f"{'; and '.join(problems)}; {OVERRIDE}")


def import_reference_indices(path_or_list: PathLike | Sequence[int],
                             examples: Sequence[tuple[str, str]], *,
                             positions: Sequence[int | None] | None = None, dropped: int = 0,
                             expected_checksum: str | None = None, check: bool = True) -> list[dict]:
    """Rows from the reference's index list (module docstring) for ``examples``, the alignment
    set rebuilt exactly as the reference did: verified first (``check``; ``positions``,
    ``dropped`` and ``expected_checksum`` as in :func:`verify_reference_alignment`). The returned
    rows carry uids computed from ``examples``; from then on they join by content. ``meta``:
    ``source``, ``checksum`` (sha256 of the canonical sorted index list, JSON without
    spaces), ``uids_checksum`` (sha256 of the JSON list of the vulnerable uids in index
    order), ``align_checksum`` (sha256 of the JSON list of all uids in order: identifies
    the alignment set the indices were mapped onto), ``n`` and ``path`` when read from a file.
    """
    where = "reference index list"
    meta: dict[str, Any] = {"source": "reference_indices"}
    if isinstance(path_or_list, (str, os.PathLike)):
        p = Path(path_or_list)
        where, meta["path"] = str(p), str(p)
        if not p.is_file():
            raise FileNotFoundError(f"reference index file {p} does not exist")
        try:
            data = json.loads(p.read_text(encoding="utf-8"))
        except json.JSONDecodeError as e:
            raise ValueError(f"{p}: not valid JSON ({e.msg}, line {e.lineno} column {e.colno}); "
                             "expected a JSON list of integer indices") from None
    else:
        data = path_or_list
    if not isinstance(data, (list, tuple)):
        raise ValueError(f"{where}: expected a JSON list of integer indices, got {type(data).__name__}")
    n = len(examples)
    seen: set[int] = set()
    for pos, v in enumerate(data):
        if not _is_int(v):
            raise ValueError(f"{where}: entry {pos} is {v!r} ({type(v).__name__}); every entry must "
                             "be an integer index into the alignment set")
        if not 0 <= v < n:
            raise ValueError(f"{where}: index {v} (entry {pos}) is out of range [0, {n}) for an "
                             f"alignment set of {n} examples")
        if v in seen:
            raise ValueError(f"{where}: index {v} appears more than once (entry {pos})")
        seen.add(v)
    if check:
        verify_reference_alignment(where, examples, positions=positions, dropped=dropped,
                                   expected_checksum=expected_checksum)
    uids = _uids(examples)
    indices = sorted(seen)
    meta.update(checksum=_sha256_json(indices), uids_checksum=_sha256_json([uids[i] for i in indices]),
                align_checksum=_sha256_json(uids), n=n)
    return [GroupRow(uid=uids[i], index=i, group=int(i in seen), forgot_num=None, flags=[],
                     meta=dict(meta)).to_dict() for i in range(n)]


def _position(uid: Any) -> int | None:
    _, sep, row = str(uid or "").rpartition("#")
    return int(row) if sep and row.isdigit() else None


def alignment_provenance(data_dir: PathLike, n: int) -> dict[str, Any]:
    """What the data stage recorded about the first ``n`` alignment rows under ``data_dir``:
    ``positions`` (each row's table row, from its uid ``<table>#<row>``; None without uids, as
    in the synthetic world) and ``dropped`` (``data.json`` ``content.dropped.align``)."""
    from vaa.data.io import read_rows
    from vaa.data.sources import FolderSource

    root = Path(data_dir)
    rows = read_rows(FolderSource(root).path("beavertails", "align"), 0, n)
    positions = [_position(r.get("uid")) for r in rows]
    info = root / "data.json"
    dropped = json.loads(info.read_text()).get("content", {}).get("dropped", {}).get("align", 0) \
        if info.is_file() else 0
    return {"positions": positions, "dropped": int(dropped)}
