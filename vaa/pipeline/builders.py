"""Who is building a cache entry: a small record (pid, host, start time) in every temp and
work directory, and whether that builder is still alive.

A ``.tmp-*`` or ``.work-*`` folder whose builder died (SIGKILL, OOM, a lost node) is never
reused by anyone; on a 7B model it holds 14–28 GB. ``vaa-cache gc`` and the pipeline (for the
entry it is about to build) remove such folders, and only those: the record tells them whose
it is. On this host a builder is gone when its pid is dead or belongs to a newer process
(pid reuse); a builder on another host cannot be asked, so its folder counts as abandoned only
after a quiet period (no file in it changed for longer than a threshold).
"""

from __future__ import annotations

import json
import os
import socket
import time
from pathlib import Path

RECORD = "builder.json"


def write_record(folder: Path, **extra) -> dict:
    """Write ``folder/builder.json`` = ``{"pid", "host", "started": unix s, **extra}``."""
    rec = {"pid": os.getpid(), "host": socket.gethostname(), "started": time.time(), **extra}
    (folder / RECORD).write_text(json.dumps(rec, sort_keys=True))
    return rec


def read_record(folder: Path) -> dict | None:
    """The record, or None when absent or unreadable (a builder killed before writing it, or
    a folder made by code older than the records)."""
    try:
        rec = json.loads((folder / RECORD).read_text())
        return rec if isinstance(rec, dict) and "pid" in rec and "host" in rec else None
    except (OSError, ValueError):
        return None


def _process_start(pid: int) -> float | None:
    """Unix start time of ``pid`` from /proc (Linux), None elsewhere."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        boot = next(float(line.split()[1]) for line in Path("/proc/stat").read_text().splitlines()
                    if line.startswith("btime "))
        return boot + int(fields[19]) / os.sysconf("SC_CLK_TCK")  # field 22: starttime in ticks
    except (OSError, ValueError, IndexError, StopIteration):
        return None


def pid_alive(pid: int, started: float | None = None) -> bool:
    """Whether process ``pid`` of this host exists and is the one that started at ``started``
    (a process that started later than the record reuses a dead builder's pid)."""
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, another user's
        pass
    if started is not None:
        begun = _process_start(pid)
        if begun is not None and begun > started + 2.0:  # 2 s: tick rounding and clock slack
            return False
    try:  # a zombie (killed, not yet reaped by its parent) is gone for our purposes
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return True


def idle_seconds(folder: Path) -> float:
    """Seconds since anything in ``folder`` (itself included) was last modified."""
    newest = 0.0
    for dirpath, _dirs, files in os.walk(folder):
        for name in [".", *files]:
            try:
                newest = max(newest, os.lstat(os.path.join(dirpath, name)).st_mtime)
            except OSError:
                pass
    return max(0.0, time.time() - newest) if newest else float("inf")


def builder_gone(folder: Path, foreign_after_s: float) -> tuple[bool, str]:
    """``(gone, why)`` for the builder of a temp or work folder. This host: by pid. Another
    host, or no record: when nothing in the folder changed for ``foreign_after_s`` seconds."""
    rec = read_record(folder)
    if rec is not None and rec["host"] == socket.gethostname():
        alive = pid_alive(int(rec["pid"]), rec.get("started"))
        return (not alive, f"pid {rec['pid']} {'alive' if alive else 'dead'} on this host")
    idle = idle_seconds(folder)
    who = f"host {rec['host']} pid {rec['pid']}" if rec else "no builder record"
    return (idle > foreign_after_s, f"{who}, idle {idle / 3600:.1f} h")
