"""Errors the user fixes (a config value, a data file, a missing model): printed as their
message, without a traceback.

``UserError`` derives from Hydra's ``CompactHydraException``, so when one escapes a job
Hydra prints ``str(error)`` and exits 1 instead of a stack trace and its
"Set the environment variable HYDRA_FULL_ERROR=1" hint; with ``HYDRA_FULL_ERROR=1`` the
whole traceback is shown as for any exception. Every other exception is a bug and keeps its
traceback. ``vaa.cli`` also writes the message into the job's ``failed.json``.
"""

from __future__ import annotations

from hydra.errors import CompactHydraException


class UserError(CompactHydraException):
    """A mistake in the input (config, data, environment): the message names what to change."""


class ConfigError(UserError, ValueError):
    """Invalid config values, all found at once (vaa.config.validate): one line per problem,
    each naming the dotted key, its value and the fix.

    ``problems``: ``[(key, message), …]``; ``str(error)`` lists them under a count."""

    def __init__(self, problems: list[tuple[str, str]] | str):
        if isinstance(problems, str):  # unpickling (a launcher's worker process) passes the text
            super().__init__(problems)
            self.problems = [("", line) for line in problems.splitlines()[1:]]
            return
        self.problems = list(problems)
        n = len(self.problems)
        head = f"invalid config: {n} problem{'s' if n != 1 else ''} (nothing was built):"
        super().__init__("\n".join([head, *(f"  {msg}" for _, msg in self.problems)]))

    def __reduce__(self):
        return (type(self), (str(self),))


class DataError(UserError, ValueError):
    """A data file or slice that cannot be used (missing, empty, wrong columns)."""


class MissingFile(UserError, FileNotFoundError):
    """A file or folder the input names that is not there (the message says which key sets it)."""


def is_user_error(exc: BaseException) -> bool:
    return isinstance(exc, UserError)
