"""The `vaa` console script: a thin Hydra entry point around the pipeline.

A job that raises writes ``failed.json`` (error, traceback, overrides) into its run
directory and re-raises: in a multirun, Hydra's launchers record the failure and go on
with the other jobs, and the sweep exits non-zero only once all jobs ran; `vaa-report`
shows the failed job's cells as missing.
"""

from __future__ import annotations

import json
import logging
import os
import traceback
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf

from vaa.config.schema import register

register()
log = logging.getLogger("vaa")
# conf/ sits beside the package in the repository (installed editable: `pip install -e .`).
CONF_DIR = str(Path(__file__).resolve().parent.parent / "conf")


def job_info(hc) -> dict:
    """Where this job writes, what it is called (its overrides) and which sweep it is in."""
    multirun = hc.mode == RunMode.MULTIRUN
    return {"run_dir": hc.runtime.output_dir, "name": hc.job.override_dirname or "default",
            "group": str(hc.sweep.dir) if multirun else None,
            "overrides": list(hc.overrides.task), "num": hc.job.num if multirun else None}


def write_failure(run_dir: Path, exc: BaseException, cfg: DictConfig, job: dict) -> Path:
    """``failed.json`` beside where ``metrics.json`` would have been."""
    record = {"status": "failed", "error": f"{type(exc).__name__}: {exc}",
              "traceback": "".join(traceback.format_exception(exc)),
              "overrides": job["overrides"],
              "method": OmegaConf.select(cfg, "method.name", default=None),
              "ft_defense": OmegaConf.select(cfg, "ft_defense.name", default=None),
              "task": OmegaConf.select(cfg, "task.name", default=None),
              "seed": OmegaConf.select(cfg, "seed", default=None)}
    run_dir.mkdir(parents=True, exist_ok=True)
    path = run_dir / "failed.json"
    path.write_text(json.dumps(record, indent=1))
    return path


def run_job(cfg: DictConfig, job: dict) -> dict:
    """One job: the tracker run (``logger=…`` with a ``_target_``) around the pipeline."""
    from vaa.tracking import build_tracker, set_active

    run_dir = Path(job["run_dir"])
    tracker = None
    try:
        from vaa.pipeline.run import run_pipeline  # heavy imports after Hydra parsed the CLI

        tracker = build_tracker(cfg.logger)
        if tracker is not None:
            tracker.start(cfg, job)
            set_active(tracker)
        metrics = run_pipeline(cfg, run_dir)
        if tracker is not None:
            tracker.log_summary(metrics)
            tracker.finish(0)
        return metrics
    except Exception as e:
        path = write_failure(run_dir, e, cfg, job)
        log.exception("job %s failed (%s); the sweep goes on", job["name"], path)
        if tracker is not None:
            tracker.finish(1)
        raise
    finally:
        set_active(None)


@hydra.main(version_base="1.3", config_path=CONF_DIR, config_name="config")
def main(cfg: DictConfig) -> float:
    return run_job(cfg, job_info(HydraConfig.get()))["harmful_score"]


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    main()
