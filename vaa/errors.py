"""Errors the project raises on purpose: a bad config value, missing data, an impossible
setting. The CLI prints a ``UserError`` as one line (no traceback) and exits non-zero;
anything else is a bug and keeps its traceback."""

from __future__ import annotations


class UserError(Exception):
    """A mistake the user can fix: the message names the key / file / row, the value and the
    fix, on one line."""
