"""Content-addressed artifact cache for pipeline stages.

A stage's key hashes exactly its own config subtree plus the keys of its upstream
artifacts, so changing one stage invalidates it and everything downstream of it,
but nothing upstream. Artifacts are built in a private temp dir and renamed into
place only after a ``_COMPLETE`` marker has been written, so a crash or exception
can never leave a half-written directory that later looks valid.

Layout of the root: ``<key>/`` complete entries (``_COMPLETE`` + ``provenance.json``: the stage,
the hashed config subtree, the upstream keys, the run's overrides, the builder);
``.tmp-<key>-<uuid>/`` a build in progress (``builder.json`` + ``artifact/``, renamed to
``<key>/`` when done); ``.work-<key>/`` a training stage's resumable checkpoints (with its
``builder.json``); ``<key>.lock``. ``vaa-cache`` (vaa/cache_cli.py) lists, sizes and prunes it.
"""
from __future__ import annotations

import dataclasses, enum, hashlib, json, logging, os, re, shutil, socket, time, uuid
from pathlib import Path, PurePath
from typing import Any, Callable, Mapping, Optional, Sequence, Tuple, Union

from filelock import FileLock, Timeout
from omegaconf import DictConfig, ListConfig, OmegaConf

from vaa.pipeline.builders import builder_gone, write_record

log = logging.getLogger(__name__)

# Bump when the hashing scheme or on-disk layout changes: every old key becomes unreachable.
CACHE_VERSION = 1
MARKER = "_COMPLETE"
PROVENANCE = "provenance.json"  # who built an entry, from which config (vaa-cache ls)
TMP_PREFIX, WORK_PREFIX, ARTIFACT = ".tmp-", ".work-", "artifact"
ORPHAN_AFTER_S = 24 * 3600  # a temp dir of another host (or without a record) idle this long is abandoned
_PAYLOADS: dict[str, dict] = {}  # key -> the config and upstream it hashes (this process), for provenance
_SAFE_NAME = re.compile(r"^[A-Za-z0-9_.\-]+$")  # keys become directory names


def _plain(obj: Any) -> Any:
    """Normalise to plain JSON types so equal content always serialises identically."""
    if isinstance(obj, (DictConfig, ListConfig)):
        return _plain(OmegaConf.to_container(obj, resolve=True))
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return _plain({f.name: getattr(obj, f.name) for f in dataclasses.fields(obj)})
    if isinstance(obj, enum.Enum):
        return _plain(obj.value)
    if obj is None or isinstance(obj, (bool, int, float, str)):
        return obj
    if isinstance(obj, PurePath):
        return obj.as_posix()  # same string on every OS
    if isinstance(obj, Mapping):
        # JSON keys must be strings; sort_keys later makes insertion order irrelevant.
        return {str(k): _plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_plain(v) for v in obj]
    if isinstance(obj, (set, frozenset)):
        return sorted((_plain(v) for v in obj), key=_canonical)
    if hasattr(obj, "tolist"):  # numpy / torch scalars and arrays
        return _plain(obj.tolist())
    # Refuse rather than str(): a repr may embed memory addresses -> unstable keys.
    raise TypeError(f"cannot hash config value of type {type(obj).__name__}: {obj!r}")


def _canonical(obj: Any) -> str:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=True)


def stage_key(
    stage: str,
    config: Union[Mapping, DictConfig, None],
    upstream: Union[Mapping[str, str], Sequence[str]] = (),
) -> str:
    """Deterministic key ``"<stage>-<16 hex>"`` (sha256, never Python's salted hash())."""
    if not _SAFE_NAME.match(stage):
        raise ValueError(f"stage name must match {_SAFE_NAME.pattern}: {stage!r}")
    if isinstance(upstream, str):
        upstream = [upstream]
    if isinstance(upstream, Mapping):
        up: Any = _plain(upstream)
    else:  # a bare list of keys carries no role information, so order is irrelevant
        up = sorted(str(u) for u in upstream)
    payload = {"version": CACHE_VERSION, "stage": stage, "config": _plain(config), "upstream": up}
    key = f"{stage}-{hashlib.sha256(_canonical(payload).encode('ascii')).hexdigest()[:16]}"
    if len(_PAYLOADS) > 4096:  # a long sweep in one process: forget the oldest
        _PAYLOADS.pop(next(iter(_PAYLOADS)))
    _PAYLOADS[key] = {"config": payload["config"], "upstream": up}
    return key


class ArtifactCache:
    def __init__(self, root: Union[str, Path], lock_timeout: Optional[float] = None):
        self.root = Path(root).expanduser()
        self.lock_timeout = lock_timeout  # None = wait forever for another builder

    def path(self, key: str) -> Path:
        if not _SAFE_NAME.match(key) or key.startswith("."):
            raise ValueError(f"invalid cache key: {key!r}")
        return self.root / key

    def has(self, key: str) -> bool:
        # The marker is written last (inside the temp dir, before the rename), so
        # its presence is the only proof that a build finished.
        return (self.path(key) / MARKER).is_file()

    def meta(self, key: str) -> dict:
        return json.loads((self.path(key) / MARKER).read_text())

    def lock_path(self, key: str) -> Path:
        return self.root / f"{key}.lock"

    def work_dir(self, key: str) -> Path:
        """``.work-<key>/`` for a training stage's resumable checkpoints, created with this
        process's builder record (a resumed stage adopts the folder: the record is rewritten)."""
        d = self.root / f"{WORK_PREFIX}{self.path(key).name}"
        d.mkdir(parents=True, exist_ok=True)
        write_record(d, key=key)
        return d

    def collect_orphans(self, key: str) -> list[Path]:
        """Remove the ``.tmp-<key>-*`` folders whose builder is gone (dead pid on this host;
        another host or no record: idle for ``ORPHAN_AFTER_S``). Call only while holding the
        key's lock. ``.work-<key>`` stays: the build about to start resumes from it."""
        removed = []
        for tmp in self.root.glob(f"{TMP_PREFIX}{key}-*"):
            gone, why = builder_gone(tmp, ORPHAN_AFTER_S)
            if gone and tmp.is_dir():
                shutil.rmtree(tmp, ignore_errors=True)
                log.info("removed %s: its builder is gone (%s)", tmp, why)
                removed.append(tmp)
        return removed

    def get_or_create(
        self,
        key: str,
        build: Callable[[Path], Optional[Mapping]],
        *,
        description: str = "",
        extra: Optional[Mapping] = None,
        provenance: Optional[Mapping] = None,
    ) -> Tuple[Path, bool]:
        """Return ``(path, built_now)``. ``build(tmp_dir)`` gets an empty folder and may return
        a dict stored in meta. ``provenance`` (e.g. the run's overrides) goes into the entry's
        ``provenance.json`` beside the config and upstream keys ``stage_key`` hashed."""
        final = self.path(key)
        if self.has(key):  # fast path, no lock
            return final, False
        self.root.mkdir(parents=True, exist_ok=True)
        lock = FileLock(str(self.lock_path(key)))
        try:
            lock.acquire(timeout=1)
        except Timeout:
            log.info("waiting for lock %s (another process is building %s)", lock.lock_file, key)
            lock.acquire(timeout=-1 if self.lock_timeout is None else self.lock_timeout)
        try:
            if self.has(key):  # someone else built it while we waited
                return final, False
            self.collect_orphans(key)  # the safe part of `vaa-cache gc`, for this entry
            tmp = self.root / f"{TMP_PREFIX}{key}-{uuid.uuid4().hex}"
            tmp.mkdir()
            try:
                builder = write_record(tmp, key=key)
                out = tmp / ARTIFACT
                out.mkdir()
                info = build(out)
                prov = {"key": key, "description": description, **_PAYLOADS.get(key, {}),
                        **_plain(dict(provenance or {})), "builder": builder,
                        "build_seconds": round(time.time() - builder["started"], 3)}
                (out / PROVENANCE).write_text(json.dumps(prov, indent=1, sort_keys=True))
                meta = {"key": key, "description": description, "created": time.time(),
                        "host": socket.gethostname(), "cache_version": CACHE_VERSION,
                        "extra": _plain({**(extra or {}), **(info or {})})}
                (out / MARKER).write_text(json.dumps(meta, indent=2, sort_keys=True))
                if final.is_dir() and not final.is_symlink():  # stale, incomplete: never trusted
                    shutil.rmtree(final)
                elif final.exists() or final.is_symlink():
                    final.unlink()
                os.replace(out, final)
            except BaseException:
                shutil.rmtree(tmp, ignore_errors=True)
                raise
            shutil.rmtree(tmp, ignore_errors=True)
            return final, True
        finally:
            lock.release()


def resolve_cache_dir(configured: Union[str, os.PathLike, None]) -> Path:
    """Explicit setting, then $VAA_CACHE_DIR, then ~/.cache/vaa."""
    if configured is not None and str(configured).strip():
        return Path(configured).expanduser()
    env = os.environ.get("VAA_CACHE_DIR", "").strip()
    if env:
        return Path(env).expanduser()
    return Path("~/.cache/vaa").expanduser()
