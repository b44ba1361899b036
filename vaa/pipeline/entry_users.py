"""Which jobs use a cache entry: ``<root>/.users/<key>/<host>-<pid>.json`` (pid, host, start,
run folder), one per job and entry.

A complete entry is read without its lock (the fast path of ``ArtifactCache.get_or_create``),
and a job reads an entry long after it got its path (the fine-tuning stage loads the aligned
model; the evaluations load each model). The pipeline's ``stage()`` records the key before it
asks the cache for it and the records go when the job ends (:class:`EntryUsers`), so
``vaa-cache rm``/``prune`` can refuse to delete an entry a running job still needs (deleting it
used to make that job fail later with a misleading model or judge error). A user is live as a
builder is (vaa/pipeline/builders.py): this host by pid (a dead or reused pid: its record is
removed by whoever reads it); another host cannot be asked, so its record counts until nothing
touched it for ``gc --older-than`` (a job touches its records at every stage's start).
"""

from __future__ import annotations

import json
import logging
import os
import socket
import time
from pathlib import Path

from vaa.pipeline.builders import pid_alive
from vaa.pipeline.cache import ArtifactCache

USERS = ".users"
log = logging.getLogger(__name__)


def _user_record(cache: ArtifactCache, key: str) -> Path:
    return cache.root / USERS / key / f"{socket.gethostname()}-{os.getpid()}.json"


def users(cache: ArtifactCache, key: str, foreign_after_s: float = float("inf")) -> list[dict]:
    """The live users of ``key``: this host's records whose pid is alive (records of dead
    processes are removed here), another host's unless unchanged for ``foreign_after_s``."""
    live = []
    for path in sorted((cache.root / USERS / key).glob("*.json")):
        try:
            rec = json.loads(path.read_text())
            pid, host = int(rec["pid"]), str(rec["host"])
        except (OSError, ValueError, KeyError, TypeError):
            continue  # being written, or not ours
        if host == socket.gethostname():
            alive = pid_alive(pid, rec.get("started"))
        else:
            try:
                alive = time.time() - path.stat().st_mtime <= foreign_after_s
            except OSError:  # released meanwhile
                continue
        if alive:
            live.append(rec)
        else:
            path.unlink(missing_ok=True)
    return live


def in_use(cache: ArtifactCache, key: str) -> str:
    """``pid N on host H (job <run folder>)`` for the first live user of ``key``, else ''."""
    found = users(cache, key)
    if not found:
        return ""
    r = found[0]
    other = "" if r["host"] == socket.gethostname() else " (another host: not checked; gc drops its record when stale)"
    more = f" and {len(found) - 1} more" if len(found) > 1 else ""
    job = f" (job {r['run_dir']})" if r.get("run_dir") else ""
    return f"pid {r['pid']} on host {r['host']}{job}{other}{more}"


def collect_users(cache: ArtifactCache, foreign_after_s: float) -> None:
    """Drop the ``.users`` records of dead jobs (another host's: unchanged for ``foreign_after_s``)."""
    base = cache.root / USERS
    for d in (base.iterdir() if base.is_dir() else []):
        users(cache, d.name, foreign_after_s)
        try:
            d.rmdir()  # only when empty
        except OSError:
            pass


class EntryUsers:
    """The entries one job uses, recorded as it reaches each and released when it ends::

        with EntryUsers(run_dir=...) as using:
            using.add(cache, key)  # before cache.get_or_create(key, ...)
    """

    def __init__(self, **extra):
        self.extra = extra
        self.paths: list[Path] = []

    def add(self, cache: ArtifactCache, key: str) -> None:
        path = _user_record(cache, key)
        if path not in self.paths:
            part = path.with_name(path.name + ".part")  # never read half-written: renamed when whole
            rec = {"pid": os.getpid(), "host": socket.gethostname(), "started": time.time(), "key": key,
                   **self.extra}
            for attempt in range(3):  # another job's release or a gc may remove the empty folder meanwhile
                try:
                    path.parent.mkdir(parents=True, exist_ok=True)
                    part.write_text(json.dumps(rec))
                    os.replace(part, path)
                    break
                except FileNotFoundError:
                    continue
                except OSError as e:  # a read-only shared cache still serves its entries
                    log.warning("cannot record that this job uses %s (%s): `vaa-cache rm` will not see it", key, e)
                    return
            self.paths.append(path)
        for p in self.paths:  # another host's gc sees the job's records change while it runs
            try:
                os.utime(p)
            except OSError:
                pass

    def release(self) -> None:
        for p in self.paths:
            p.unlink(missing_ok=True)
            for folder in (p.parent, p.parent.parent):  # .users/<key>, .users: only when empty
                try:
                    folder.rmdir()
                except OSError:
                    break
        self.paths = []

    def __enter__(self) -> "EntryUsers":
        return self

    def __exit__(self, *exc) -> None:
        self.release()
