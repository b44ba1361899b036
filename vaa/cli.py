"""The `vaa` console script: a thin Hydra entry point around the pipeline.

A job first validates its whole config (vaa.config.validate: every problem at once, nothing
built), then runs the pipeline. How a job ends:

- a user error (vaa.errors.UserError: a bad config value, a missing data file or model) writes
  ``failed.json`` and prints its message once, without a traceback, exit code 1
  (``HYDRA_FULL_ERROR=1`` shows the traceback);
- any other exception is a bug: ``failed.json`` holds its traceback, Hydra prints it once;
- Ctrl-C writes ``interrupted.json`` (the stage that was running), prints one line and exits 130.

In a multirun, a failed job logs one line and the others go on; the sweep exits non-zero once
all jobs ran (Hydra re-raises the first failure); `vaa-report` shows the failed job's cells as
missing. ``vaa --help``: conf/hydra/help/vaa.yaml.
"""

from __future__ import annotations

import json
import logging
import os
import sys
import traceback
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf

from vaa.config.schema import register
from vaa.errors import UserError

register()
log = logging.getLogger("vaa")
# conf/ sits beside the package in the repository (installed editable: `pip install -e .`).
CONF_DIR = str(Path(__file__).resolve().parent.parent / "conf")
INTERRUPTED = 130  # 128 + SIGINT, what a shell reports for Ctrl-C


def job_info(hc) -> dict:
    """Where this job writes, what it is called (its overrides) and which sweep it is in."""
    multirun = hc.mode == RunMode.MULTIRUN
    return {"run_dir": hc.runtime.output_dir, "name": hc.job.override_dirname or "default",
            "group": str(hc.sweep.dir) if multirun else None,
            "overrides": list(hc.overrides.task), "num": hc.job.num if multirun else None}


def job_record(status: str, cfg: DictConfig, job: dict, **fields) -> dict:
    return {"status": status, **fields, "overrides": job["overrides"],
            "method": OmegaConf.select(cfg, "method.name", default=None),
            "ft_defense": OmegaConf.select(cfg, "ft_defense.name", default=None),
            "task": OmegaConf.select(cfg, "task.name", default=None),
            "seed": OmegaConf.select(cfg, "seed", default=None)}


def write_record(run_dir: Path, name: str, record: dict) -> Path:
    run_dir.mkdir(parents=True, exist_ok=True)
    path = run_dir / name
    path.write_text(json.dumps(record, indent=1))
    return path


def write_failure(run_dir: Path, exc: BaseException, cfg: DictConfig, job: dict) -> Path:
    """``failed.json`` beside where ``metrics.json`` would have been. A user error's ``error``
    is its message as printed; any other error's is ``Type: message`` with the traceback."""
    user = isinstance(exc, UserError)
    return write_record(run_dir, "failed.json", job_record(
        "failed", cfg, job, error=str(exc) if user else f"{type(exc).__name__}: {exc}",
        user_error=user, stage=running_stage(exc),
        traceback="".join(traceback.format_exception(exc))))


def running_stage(exc: BaseException) -> str | None:
    """The pipeline stage the exception went through (``vaa.pipeline.run`` tags it as
    ``vaa_stage``; Lightning's exit after a Ctrl-C carries the KeyboardInterrupt as context)."""
    for e in (exc, exc.__context__):
        if e is not None and getattr(e, "vaa_stage", None):
            return e.vaa_stage
    return None


def is_interrupt(exc: BaseException) -> bool:
    """Ctrl-C: a KeyboardInterrupt, or Lightning's ``sys.exit(1)`` after catching one."""
    return isinstance(exc, KeyboardInterrupt) or (
        isinstance(exc, SystemExit) and isinstance(exc.__context__, KeyboardInterrupt))


def interrupted(exc: BaseException, cfg: DictConfig, job: dict) -> SystemExit:
    stage = running_stage(exc)
    path = write_record(Path(job["run_dir"]), "interrupted.json",
                        job_record("interrupted", cfg, job, stage=stage))
    where = f"during stage {stage!r}" if stage else "before the first stage"
    sys.stderr.write(f"vaa: interrupted {where} (Ctrl-C); record: {path}. A rerun reuses every "
                     f"finished stage from the cache.\n")
    return SystemExit(INTERRUPTED)


def run_job(cfg: DictConfig, job: dict) -> dict:
    """One job: validation, then the tracker run (``logger=…`` with a ``_target_``) around the
    pipeline."""
    from vaa.config.validate import validate
    from vaa.tracking import build_tracker, set_active

    run_dir = Path(job["run_dir"])
    tracker = None
    try:
        validate(cfg)  # every config problem at once, before anything is built
        from vaa.pipeline.run import run_pipeline  # heavy imports after the config is known good

        tracker = build_tracker(cfg.logger)
        if tracker is not None:
            tracker.start(cfg, job)
            set_active(tracker)
        metrics = run_pipeline(cfg, run_dir)
        if tracker is not None:
            tracker.log_summary(metrics)
            tracker.finish(0)
        return metrics
    except BaseException as e:
        if tracker is not None:
            tracker.finish(1)
        if is_interrupt(e):
            raise interrupted(e, cfg, job) from None
        if not isinstance(e, Exception):
            raise
        path = write_failure(run_dir, e, cfg, job)
        if job["num"] is not None:  # a sweep: one line per failed job; Hydra reports the first
            text = str(e) if isinstance(e, UserError) else f"{type(e).__name__}: {e}"
            log.error("job %s failed (%s): %s; the sweep goes on", job["name"], path,
                      " ".join(line.strip() for line in text.splitlines()))
        elif isinstance(e, UserError) and not os.environ.get("HYDRA_FULL_ERROR"):
            sys.stderr.write(f"{e}\n")  # the message alone: no traceback, no Hydra hint
            raise SystemExit(1) from None
        raise
    finally:
        set_active(None)


@hydra.main(version_base="1.3", config_path=CONF_DIR, config_name="config")
def main(cfg: DictConfig) -> float:
    return run_job(cfg, job_info(HydraConfig.get()))["harmful_score"]


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    main()
