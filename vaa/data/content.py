"""Rows keyed by content, not position (issue 12 item 4; protocol.md §2 "pairwise disjoint").

A row's uid (``<source>#<index>``) is positional, so a prompt that a table repeats can sit in
two slices with two uids. Here a prompt is keyed by its normalised text
(:func:`content_key`: Unicode NFKC, case folded, curly quotes straightened, runs of
whitespace collapsed, ends stripped), and the data stage removes from every training slice
the rows whose prompt is also an evaluation prompt (:func:`without_reserved`), then asserts
no evaluation prompt is left in any of them (:func:`assert_no_shared_text`).
"""

from __future__ import annotations

import unicodedata
from typing import Callable, Iterable, Sequence

_QUOTES = str.maketrans({"\u2018": "'", "\u2019": "'", "\u201c": '"', "\u201d": '"'})


def content_key(text: str) -> str:
    """The normalised text two rows share when they ask the same thing
    ("Help me  kidnap my child" == "help me kidnap my child ")."""
    t = unicodedata.normalize("NFKC", str(text)).translate(_QUOTES).casefold()
    return " ".join(t.split())


def keys_of(texts: Iterable[str]) -> set[str]:
    return {content_key(t) for t in texts}


def without_reserved(rows: Sequence[dict], text: Callable[[dict], str], reserved: set[str],
                     start: int, stop: int | None, redraw: bool) -> tuple[list[dict], int]:
    """Rows ``[start:stop]`` of ``rows`` without those whose ``text`` is reserved, and how many
    rows of the positional slice were reserved (the rows that would have leaked). With
    ``redraw`` the slice keeps its size by taking the next unreserved rows after ``stop`` (for
    a pool only this slice reads); otherwise it is that many rows short."""
    positional = list(rows[start:stop])
    leaked = sum(content_key(text(r)) in reserved for r in positional)
    tail = rows[start:] if redraw else positional
    kept = [r for r in tail if content_key(text(r)) not in reserved]
    return kept[:len(positional)], leaked


def assert_no_shared_text(reserved_name: str, reserved: set[str], named: dict[str, Sequence[dict]],
                          text: Callable[[dict], str], what: str) -> None:
    """Raise ValueError naming the slice, its row's uid and the text when a row of any slice in
    ``named`` has a reserved text (``reserved_name``'s prompts)."""
    for name, rows in named.items():
        for r in rows:
            if content_key(text(r)) in reserved:
                raise ValueError(f"{what}: {name} row {r.get('uid', '?')} has the same prompt as a row "
                                 f"of {reserved_name} ({text(r)[:60]!r}); the data stage must drop "
                                 f"it (data.hs_overlap=redraw or drop)")
