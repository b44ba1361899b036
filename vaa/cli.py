"""The `vaa` console script: a thin Hydra entry point around the pipeline.

A job first validates its whole config (vaa.config.validate: every problem at once, nothing
built), then runs the pipeline. How a job ends:

- a user error (vaa.errors.UserError: a bad config value, a missing data file or model) writes
  ``failed.json`` and prints its message once, without a traceback, exit code 1
  (``HYDRA_FULL_ERROR=1`` shows the traceback);
- any other exception is a bug: ``failed.json`` holds its traceback, Hydra prints it once;
- Ctrl-C writes ``interrupted.json`` (the stage that was running), prints one line and exits 130;
  SIGTERM (SLURM's time-out, ``kill``, a preemption) takes the same path (the stage's temp
  folder removed, ``interrupted.json`` with ``"signal": "SIGTERM"``) and exits 143. Without
  this a SIGTERM outside training killed the job with no record and its temp folder left, and
  one inside Lightning's fit ended it with exit code 0 (Lightning's SIGTERMException).

In a multirun, a failed job logs one line and the others go on; the sweep exits non-zero once
all jobs ran (Hydra re-raises the first failure); `vaa-report` shows the failed job's cells as
missing. ``vaa --help``: conf/hydra/help/vaa.yaml.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import sys
import threading
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
TERMINATED = 143  # 128 + SIGTERM


class Terminated(KeyboardInterrupt):
    """SIGTERM, raised in the main thread so that a job ends as it does for Ctrl-C (a
    KeyboardInterrupt: Lightning shuts the trainer down, the cache removes the stage's temp
    folder, :func:`run_job` writes ``interrupted.json``)."""


def raise_on_sigterm():
    """From now on SIGTERM raises :class:`Terminated` (once: a second SIGTERM during the
    clean-up is ignored; SIGKILL still ends the process). Returns the previous handler for
    :func:`restore_sigterm`; only the main thread can set a handler (elsewhere: nothing
    changes, returns None)."""
    if threading.current_thread() is not threading.main_thread():
        return None

    def handler(signum, frame):
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        raise Terminated(f"signal {signum}")

    return signal.signal(signal.SIGTERM, handler)


def restore_sigterm(previous) -> None:
    if previous is not None:
        signal.signal(signal.SIGTERM, previous)


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
    """Ctrl-C or SIGTERM: a KeyboardInterrupt (:class:`Terminated` too), Lightning's
    ``sys.exit(1)`` after catching one, or Lightning's own ``SIGTERMException`` (a SystemExit
    its fit loop raises after a SIGTERM no handler of ours turned into :class:`Terminated`)."""
    return isinstance(exc, KeyboardInterrupt) or is_sigterm(exc) or (
        isinstance(exc, SystemExit) and isinstance(exc.__context__, KeyboardInterrupt))


def is_sigterm(exc: BaseException) -> bool:
    return any(isinstance(e, Terminated) or type(e).__name__ == "SIGTERMException"
               for e in (exc, exc.__context__) if e is not None)


def interrupted(exc: BaseException, cfg: DictConfig, job: dict) -> SystemExit:
    stage = running_stage(exc)
    how = "SIGTERM" if is_sigterm(exc) else "Ctrl-C"
    path = write_record(Path(job["run_dir"]), "interrupted.json",
                        job_record("interrupted", cfg, job, stage=stage, signal=how))
    where = f"during stage {stage!r}" if stage else "before the first stage"
    sys.stderr.write(f"vaa: interrupted {where} ({how}); record: {path}. A rerun reuses every "
                     f"finished stage from the cache.\n")
    return SystemExit(TERMINATED if how == "SIGTERM" else INTERRUPTED)


def run_job(cfg: DictConfig, job: dict) -> dict:
    """One job: validation, then the tracker run (``logger=…`` with a ``_target_``) around the
    pipeline."""
    from vaa.config.validate import validate
    from vaa.tracking import build_tracker, set_active

    run_dir = Path(job["run_dir"])
    tracker = None
    previous_sigterm = raise_on_sigterm()  # restored in `finally`, after the record is written
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
        restore_sigterm(previous_sigterm)


@hydra.main(version_base="1.3", config_path=CONF_DIR, config_name="config")
def main(cfg: DictConfig) -> float:
    return run_job(cfg, job_info(HydraConfig.get()))["harmful_score"]


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    main()
