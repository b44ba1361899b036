"""How many compute threads a job uses, so that jobs side by side on one machine share it.

Without this, every `vaa` process starts as many intra-op threads as the machine has cores;
two of them on 2 cores spin against each other and each runs several times slower
(ENVIRONMENT.md: a cold default run took 21 min instead of ~80 s beside another job).

Rule (``trainer.threads``):

* an integer ≥ 1: exactly that many;
* ``null`` (auto): ``OMP_NUM_THREADS`` if the user set it; else
  ``max(1, cores // live_jobs)`` — ``cores`` the CPUs this process may run on, ``live_jobs``
  the `vaa` jobs alive on this host, this one included, counted from a registry of one file
  per job in ``$VAA_JOBS_DIR`` (default ``<tmp>/vaa-jobs``; a job registers for the length of
  ``run_pipeline`` and its file names its host and pid; files of dead processes are
  removed by whoever reads them).

The pipeline applies the rule when a job starts and again at the start of every stage, so a
job that started alone gives up threads when a sibling arrives and takes them back when it
leaves. Interop threads are set once (torch allows it only before any parallel work).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import socket
import tempfile
import time
from pathlib import Path

import torch

log = logging.getLogger(__name__)
_interop_set = False


def jobs_dir() -> Path:
    return Path(os.environ.get("VAA_JOBS_DIR") or Path(tempfile.gettempdir()) / "vaa-jobs")


def _start_ticks(pid: int) -> str | None:
    """The process's start time in clock ticks since boot (/proc/<pid>/stat field 22): with
    the pid, it tells a live job from a new process that reuses a dead job's pid. None off
    Linux."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return stat[stat.rindex(")") + 2:].split()[19]


def _alive(pid: int, ticks: str | None) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's live process
        pass
    now = _start_ticks(pid)
    return ticks is None or now is None or now == ticks


class JobRegistry:
    """This job's file in the registry while inside ``with``; ``live()`` counts the live
    jobs of this host (this one included)."""

    def __init__(self, root: Path | None = None):
        self.root = root or jobs_dir()
        self.host = socket.gethostname()
        self.path = self.root / f"{self.host}-{os.getpid()}.json"

    def __enter__(self) -> "JobRegistry":
        try:
            self.root.mkdir(parents=True, exist_ok=True)
            try:
                self.root.chmod(0o1777)  # shared by the users of this host, like /tmp
            except OSError:
                pass
            self.path.write_text(json.dumps({"host": self.host, "pid": os.getpid(),
                                             "ticks": _start_ticks(os.getpid()),
                                             "started": time.time()}))
        except OSError as e:  # a read-only tmp: count nobody, never fail the job
            log.debug("job registry unavailable (%s)", e)
        return self

    def __exit__(self, *exc) -> None:
        self.path.unlink(missing_ok=True)

    def live(self) -> int:
        """Live jobs on this host, at least 1 (this one); removes dead jobs' files."""
        n = 0
        for f in self.root.glob(f"{self.host}-*.json"):
            try:
                rec = json.loads(f.read_text())
            except (OSError, ValueError):
                continue
            pid = int(rec.get("pid", -1))
            if pid == os.getpid():
                continue
            if _alive(pid, rec.get("ticks")):
                n += 1
            else:
                f.unlink(missing_ok=True)
        return n + 1


def cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def choose_threads(setting, registry: JobRegistry | None) -> tuple[int, str]:
    """(threads, why) under the rule of the module docstring."""
    if setting is not None:
        n = int(setting) if isinstance(setting, int) or str(setting).isdigit() else 0
        if n < 1:
            from vaa.errors import ConfigError
            raise ConfigError([("trainer.threads", f"trainer.threads={setting!r}: use an integer "
                                                   "≥ 1, or null for automatic")])
        return n, "trainer.threads"
    omp = os.environ.get("OMP_NUM_THREADS", "").strip()
    if omp.isdigit() and int(omp) >= 1:
        return int(omp), "OMP_NUM_THREADS"
    jobs = registry.live() if registry is not None else 1
    return max(1, cores() // jobs), f"{cores()} cores / {jobs} vaa job(s) on this host"


def apply_threads(trainer_cfg, registry: JobRegistry | None) -> int:
    """Set torch's intra-op threads (and, the first time, interop threads) by the rule;
    logs a line when the number changes. Returns it."""
    global _interop_set
    n, why = choose_threads(trainer_cfg.get("threads") if hasattr(trainer_cfg, "get") else None,
                            registry)
    if n != torch.get_num_threads():
        log.info("compute threads: %d (%s)", n, why)
        torch.set_num_threads(n)
    if not _interop_set:
        _interop_set = True
        try:
            torch.set_num_interop_threads(n)
        except RuntimeError:  # parallel work already ran in this process (tests, notebooks)
            pass
    return n


@contextlib.contextmanager
def job_threads(trainer_cfg):
    """For the length of one job: registered in the registry, threads set by the rule; yields
    ``recheck()`` (call it at each stage start). torch's thread count is restored on exit,
    so a job run inside another process (tests, a notebook) leaves it as it was."""
    before = torch.get_num_threads()
    with JobRegistry() as registry:
        apply_threads(trainer_cfg, registry)
        try:
            yield lambda: apply_threads(trainer_cfg, registry)
        finally:
            torch.set_num_threads(before)
