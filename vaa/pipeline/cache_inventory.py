"""What is in an artifact cache, and removing from it safely (the logic of ``vaa-cache``).

Everything under the root is one of: a complete entry ``<key>/`` (``_COMPLETE`` written last),
an incomplete ``<key>/`` (no marker: never trusted, rebuilt on demand), a build in progress or
abandoned ``.tmp-<key>-<32 hex>/``, or a training stage's checkpoints ``.work-<key>/``.
Removal always happens while holding ``<key>.lock`` (taken without waiting): a folder whose
lock a live process holds is never touched, and no builder can start on that key meanwhile.

A complete entry is read without its lock, so jobs also record the entries they use
(vaa/pipeline/entry_users.py): ``rm``/``prune`` refuse an entry with a live user, naming its pid
and host, unless ``force``. The entry is first renamed aside, then its users are read again (a
job that looked the entry up in between wrote its record first): a job that found the entry
never loses it.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import time
import uuid
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

from filelock import FileLock, Timeout

from vaa.pipeline.builders import builder_gone, idle_seconds, read_record
from vaa.pipeline.cache import MARKER, PROVENANCE, TMP_PREFIX, WORK_PREFIX, ArtifactCache
from vaa.pipeline.entry_users import collect_users, in_use

_TMP = re.compile(rf"^{re.escape(TMP_PREFIX)}(?P<key>.+)-[0-9a-f]{{32}}$")
_KEY = re.compile(r"^(?P<stage>[A-Za-z0-9_.\-]+)-[0-9a-f]{16}$")


@dataclass
class Item:
    """One folder of the cache. ``kind``: complete | incomplete | tmp | work."""
    kind: str
    key: str
    path: Path
    size: int
    age_s: float  # complete: since it was built; others: since anything in it changed
    provenance: dict = field(default_factory=dict)
    builder: dict | None = None

    @property
    def stage(self) -> str:
        m = _KEY.match(self.key)
        return m.group("stage") if m else "?"

    @property
    def description(self) -> str:  # the pipeline's stage name: eval_finetuned, sft_aligned, ...
        return self.provenance.get("description") or self.stage


def folder_size(path: Path) -> int:
    """Bytes of the files under ``path`` (links not followed)."""
    total = 0
    for dirpath, _dirs, files in os.walk(path):
        for name in files:
            try:
                total += os.lstat(os.path.join(dirpath, name)).st_size
            except OSError:
                pass
    return total


def _json(path: Path) -> dict:
    try:
        data = json.loads(path.read_text())
        return data if isinstance(data, dict) else {}
    except (OSError, ValueError):
        return {}


def scan(cache: ArtifactCache) -> list[Item]:
    """Every folder of the cache, oldest first. An absent root is an empty cache."""
    if not cache.root.is_dir():
        return []
    items = []
    for p in cache.root.iterdir():
        if not p.is_dir() or p.is_symlink():
            continue  # lock files, stray files
        size = folder_size(p)
        if (m := _TMP.match(p.name)) is not None:
            items.append(Item("tmp", m.group("key"), p, size, idle_seconds(p), {}, read_record(p)))
        elif p.name.startswith(WORK_PREFIX):
            items.append(Item("work", p.name[len(WORK_PREFIX):], p, size, idle_seconds(p),
                              {}, read_record(p)))
        elif (p / MARKER).is_file():
            meta = _json(p / MARKER)
            prov = _json(p / PROVENANCE) or {"description": meta.get("description")}
            age = time.time() - float(meta.get("created", p.stat().st_mtime))
            items.append(Item("complete", p.name, p, size, max(0.0, age), prov, prov.get("builder")))
        elif _KEY.match(p.name):
            items.append(Item("incomplete", p.name, p, size, idle_seconds(p)))
    return sorted(items, key=lambda i: -i.age_s)


@contextmanager
def key_lock(cache: ArtifactCache, key: str) -> Iterator[bool]:
    """Hold ``<key>.lock`` for the block if nobody does (yields True), else yield False."""
    lock = FileLock(str(cache.lock_path(key)))
    try:
        lock.acquire(timeout=0)
    except Timeout:
        yield False
        return
    try:
        yield True
    finally:
        lock.release()


def status(item: Item, foreign_after_s: float) -> str:
    """complete | incomplete | building (pid ... alive) | orphan (why) | checkpoints (...)."""
    if item.kind in ("complete", "incomplete"):
        return item.kind
    gone, why = builder_gone(item.path, foreign_after_s)
    if item.kind == "tmp":
        return f"orphan ({why})" if gone else f"building ({why})"
    return f"checkpoints, builder {'gone' if gone else 'active'} ({why})"


def collect(cache: ArtifactCache, foreign_after_s: float, dry_run: bool = False
            ) -> tuple[list[tuple[Item, str]], list[tuple[Item, str]]]:
    """``vaa-cache gc``: remove temp and work folders whose builder is gone, incomplete
    entries, and work folders of keys already complete; never a complete entry, never a
    folder whose key's lock a live process holds. Returns ``(removed, kept)`` with reasons."""
    collect_users(cache, foreign_after_s)
    complete = {i.key for i in scan(cache) if i.kind == "complete"}
    removed, kept = [], []
    for item in scan(cache):
        if item.kind == "complete":
            continue
        with key_lock(cache, item.key) as free:
            if not free:
                kept.append((item, "its lock is held by a live process"))
                continue
            if item.kind == "incomplete":
                why = "no _COMPLETE marker: never trusted"
            elif item.kind == "work" and item.key in complete:
                why = "its entry is complete"
            else:
                gone, why = builder_gone(item.path, foreign_after_s)
                if not gone:
                    kept.append((item, f"builder may be alive: {why}"))
                    continue
                why = f"builder gone: {why}"
            if not dry_run:
                shutil.rmtree(item.path, ignore_errors=True)
            removed.append((item, why))
    return removed, kept


def remove(cache: ArtifactCache, items: list[Item], dry_run: bool = False, force: bool = False
           ) -> tuple[list[Item], list[tuple[Item, str]]]:
    """Remove these entries (with their key's leftover work folder) under their locks; an
    entry a live job uses (its ``.users`` record) is kept unless ``force``. Returns
    ``(removed, [(kept, why)])``; ``why`` names the live pid and host."""
    done, refused = [], []
    for item in items:
        with key_lock(cache, item.key) as free:
            if not free:
                refused.append((item, f"its lock is held by {lock_holder(cache, item.key)} (building it); "
                                      "wait for it, or stop that job first"))
                continue
            if not force and (why := in_use(cache, item.key)):
                refused.append((item, f"{why} uses it; --force removes it anyway (that job then fails)"))
                continue
            if not dry_run:
                aside = cache.root / f"{TMP_PREFIX}{item.key}-{uuid.uuid4().hex}"
                os.replace(item.path, aside)  # a job looking it up now finds nothing and rebuilds
                if not force and (why := in_use(cache, item.key)):  # it found the entry just before
                    os.replace(aside, item.path)
                    refused.append((item, f"{why} uses it; --force removes it anyway (that job then fails)"))
                    continue
                shutil.rmtree(aside, ignore_errors=True)
                shutil.rmtree(cache.root / f"{WORK_PREFIX}{item.key}", ignore_errors=True)
            done.append(item)
    return done, refused


def lock_holder(cache: ArtifactCache, key: str) -> str:
    """``pid N on host H`` of the live builder of ``key`` (its temp or work folder's record),
    or ``a live process`` when no record names one."""
    for folder in [*cache.root.glob(f"{TMP_PREFIX}{key}-*"), cache.root / f"{WORK_PREFIX}{key}"]:
        rec = read_record(folder) if folder.is_dir() else None
        if rec is not None and not builder_gone(folder, float("inf"))[0]:
            return f"pid {rec['pid']} on host {rec['host']}"
    return "a live process"


def match_keys(items: list[Item], prefixes: list[str]) -> list[Item]:
    """Entries (complete or incomplete) named by full keys or unambiguous key prefixes.
    Raises ValueError naming a prefix that matches nothing or several keys."""
    entries = [i for i in items if i.kind in ("complete", "incomplete")]
    chosen: list[Item] = []
    for p in prefixes:
        hits = [i for i in entries if i.key == p] or [i for i in entries if i.key.startswith(p)]
        if not hits:
            raise ValueError(f"no cache entry matches {p!r} (see `vaa-cache ls`)")
        if len(hits) > 1:
            raise ValueError(f"{p!r} matches {len(hits)} entries ({', '.join(i.key for i in hits[:5])}"
                             f"{', ...' if len(hits) > 5 else ''}); give more of the key")
        chosen += [h for h in hits if h not in chosen]
    return chosen
