"""Find the jobs of one or more sweeps under a directory and read what each produced.

A job is a directory with ``metrics.json`` (finished), ``failed.json`` (the job raised; see
``vaa.cli``), ``interrupted.json`` (Ctrl-C or SIGTERM, e.g. a SLURM time-out, naming the stage)
or only Hydra's ``.hydra/config.yaml`` (killed by SIGKILL, or still running).
Labels (method, task, seed, settings) come from ``metrics.json`` when it exists and from
the saved config otherwise, so a failed job still has a place in the table: an empty one.
Nothing here raises on a broken job; it becomes a job with ``status != "ok"`` and an error.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path

from omegaconf import OmegaConf

log = logging.getLogger(__name__)

# Label keys of a row or column; every other override that varies across jobs is a setting.
IDENTITY_KEYS = ("method", "ft_defense", "restore", "task", "seed")
# Overrides that say where or how a job ran, never what it computed (the trainer keys of
# vaa.pipeline.keys.NOT_ARTIFACT_TRAINER). Everything else that varies labels rows: a preset
# (`experiment`), the model, the data, the trainer's precision and devices (issue 12, item 7).
# (Kept equal to NOT_ARTIFACT_TRAINER by tests/test_report.py; not imported: that pulls in torch.)
RUN_ONLY_TRAINER = ("progress_bar", "progress_every_s", "progress_every_n_steps", "log_every_n_steps",
                    "checkpoint_every_n_steps", "threads", "host_heap")
IGNORED_PREFIXES = ("hydra", "paths", "logger", *(f"trainer.{k}" for k in RUN_ONLY_TRAINER))


@dataclass
class Job:
    dir: Path
    status: str  # ok | failed | interrupted | incomplete
    method: str | None = None
    ft_defense: str = "none"
    restore: str = "none"
    task: str | None = None
    seed: int | None = None
    overrides: dict[str, str] = field(default_factory=dict)
    metrics: dict | None = None
    error: str | None = None
    cfg: object = None  # the saved (unresolved) config, to read settings not overridden

    @property
    def ok(self) -> bool:
        return self.status == "ok"

    def setting(self, key: str) -> str | None:
        """A config value as a string: the job's override if it has one, else the config's."""
        if key in self.overrides:
            return self.overrides[key]
        if key in ("method", "ft_defense", "restore", "task", "seed"):
            v = getattr(self, key)
            return None if v is None else str(v)
        if self.cfg is None:
            return None
        try:
            v = OmegaConf.select(self.cfg, key, default=None)
        except Exception:  # an interpolation that cannot resolve outside its run
            return None
        if v is None and "." not in key and "/" not in key:
            return "none"  # a config group the job did not choose (experiment, protocol)
        if OmegaConf.is_config(v):  # a config group: its option's name
            return str(v.get("name", "(default)")) if OmegaConf.is_dict(v) else str(v)
        return None if v is None else str(v)


def job_dirs(root: Path) -> list[Path]:
    dirs = {p.parent for name in ("metrics.json", "failed.json", "interrupted.json") for p in root.rglob(name)}
    dirs |= {p.parent.parent for p in root.rglob(".hydra/config.yaml")}
    # predictions/ or logs/ never hold these names; a wandb/ tree never either
    return sorted(dirs, key=lambda p: (len(p.parts), str(p)))


def _read_json(path: Path) -> tuple[dict | None, str | None]:
    try:
        return json.loads(path.read_text()), None
    except (OSError, ValueError) as e:
        return None, f"unreadable {path.name}: {e}"


def _parse_overrides(lines) -> dict[str, str]:
    out = {}
    for o in lines or []:
        key, sep, value = str(o).lstrip("+~").partition("=")
        if sep:
            out[key.strip()] = value.strip()
    return out


def read_job(d: Path) -> Job:
    cfg, overrides = None, {}
    if (d / ".hydra" / "config.yaml").is_file():
        try:
            cfg = OmegaConf.load(d / ".hydra" / "config.yaml")
        except Exception as e:  # noqa: BLE001 - a broken file is a broken job, not a crash
            log.warning("%s: unreadable .hydra/config.yaml (%s)", d, e)
    if (d / ".hydra" / "overrides.yaml").is_file():
        try:
            overrides = _parse_overrides(OmegaConf.to_container(OmegaConf.load(d / ".hydra" / "overrides.yaml")))
        except Exception as e:  # noqa: BLE001
            log.warning("%s: unreadable .hydra/overrides.yaml (%s)", d, e)
    job = Job(dir=d, status="incomplete", overrides=overrides, cfg=cfg,
              error="no metrics.json (killed, timed out, or still running)")

    def from_cfg(key: str, default=None):
        if cfg is None:
            return default
        try:
            v = OmegaConf.select(cfg, key, default=default)
        except Exception:  # noqa: BLE001
            return default
        return default if v is None else v

    job.method, job.task, job.seed = from_cfg("method.name"), from_cfg("task.name"), from_cfg("seed")
    job.ft_defense = from_cfg("ft_defense.name", "none")
    job.restore = from_cfg("restore.name", "none")
    if (d / "metrics.json").is_file():
        metrics, err = _read_json(d / "metrics.json")
        if isinstance(metrics, dict) and isinstance(metrics.get("harmful_score"), (int, float)):
            job.status, job.metrics, job.error = "ok", metrics, None
            job.method = metrics.get("method", job.method)
            job.task = metrics.get("task", job.task)
            job.seed = metrics.get("seed", job.seed)
            job.ft_defense = metrics.get("ft_defense") or job.ft_defense
            job.restore = metrics.get("restore") or job.restore
            return job
        job.status, job.error = "failed", err or "metrics.json has no numeric harmful_score"
    if (d / "failed.json").is_file():
        rec, err = _read_json(d / "failed.json")
        job.status = "failed"
        job.error = (rec or {}).get("error") or err
        _labels_from_record(job, rec)
    elif (d / "interrupted.json").is_file():  # vaa.cli: Ctrl-C or SIGTERM, with the stage it stopped in
        rec, err = _read_json(d / "interrupted.json")
        stage = (rec or {}).get("stage")
        job.status = "interrupted"
        job.error = err or (f"interrupted ({(rec or {}).get('signal') or 'Ctrl-C'}) "
                            + (f"during stage {stage!r}" if stage else "before the first stage"))
        _labels_from_record(job, rec)
    return job


def _labels_from_record(job: Job, rec: dict | None) -> None:
    for key in ("method", "task", "seed", "ft_defense"):
        if getattr(job, key) in (None, "none") and (rec or {}).get(key) is not None:
            setattr(job, key, rec[key])


def collect(root: str | Path) -> list[Job]:
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"vaa-report: {root} is not a directory (give a sweep directory, "
                                "e.g. outputs/multirun/<date>/<time>)")
    return [read_job(d) for d in job_dirs(root)]


def ignored(key: str) -> bool:
    return any(key == p or key.startswith((p + ".", p + "/")) for p in IGNORED_PREFIXES)


def varying_settings(jobs: list[Job]) -> list[str]:
    """Override keys (other than the row / column labels) whose value differs across ``jobs``
    (the table passes its finished jobs only: a failed or interrupted job's override labels
    nothing): they must label rows or columns, or the table would average different settings."""
    keys = sorted({k for j in jobs for k in j.overrides})
    keys = [k for k in keys if k not in IDENTITY_KEYS and not ignored(k)]
    return [k for k in keys if len({j.setting(k) for j in jobs}) > 1]
