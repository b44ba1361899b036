"""Weights & Biases tracking (``logger=wandb``): one W&B run per Hydra job.

- Mode: ``mode`` from the config, else ``$WANDB_MODE``, else online when ``$WANDB_API_KEY``
  is set and **offline** otherwise (the run is written under ``<run dir>/wandb/`` and can be
  uploaded later with ``wandb sync``). The key is read by wandb from the environment only;
  it is never put into the config, the run, or a log line.
- Grouping: a sweep's jobs share one group (the sweep directory); each run is named from
  its job's overrides (``method=sft,task=gsm8k``); the resolved config is the run's config.
- Per-step metrics of every training stage (``base/…``, ``align/…`` incl. VAA's
  ``align/dro/p_vulnerable``, ``finetune/…``) come through Lightning's ``WandbLogger``
  bound to this run, against ``trainer/global_step``; the final summary table (HS and FA
  per evaluated stage) is logged as a W&B table and into the run summary at the end.
- ``finish`` is called at the end of every job (also a failed one, with exit code 1), so
  the next job of a multirun never logs into this job's run.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

log = logging.getLogger(__name__)
MODES = ("online", "offline", "disabled")


def import_wandb():
    try:
        import wandb
    except ImportError as e:  # optional extra
        raise ImportError("logger=wandb needs the wandb package: pip install -e '.[wandb]' "
                          "(or run with logger=csv)") from e
    return wandb


def resolve_mode(mode: str | None, environ=os.environ) -> str:
    """The W&B mode: explicit > $WANDB_MODE > online iff $WANDB_API_KEY is set, else offline.
    Online without a key in the environment is forced offline (never prompts for a login)."""
    mode = mode or environ.get("WANDB_MODE") or ("online" if environ.get("WANDB_API_KEY") else "offline")
    mode = {"dryrun": "offline", "run": "online"}.get(mode, mode)
    if mode not in MODES:
        raise ValueError(f"logger.mode={mode!r} (or $WANDB_MODE): expected one of {MODES}")
    if mode == "online" and not environ.get("WANDB_API_KEY"):
        log.warning("W&B: no WANDB_API_KEY in the environment; logging offline (wandb sync later)")
        mode = "offline"
    return mode


class WandbTracker:
    def __init__(self, project: str = "vaa", entity: str | None = None, mode: str | None = None,
                 tags: list[str] | None = None, job_type: str | None = None, name: str = "wandb"):
        self.project, self.entity, self.mode = project, entity, mode
        self.tags = list(tags or [])
        self.job_type = job_type
        self.run = None
        self._logger = None

    def start(self, cfg: DictConfig, job: dict[str, Any]) -> None:
        """``job``: ``run_dir``, ``name`` (from the overrides), ``group`` (the sweep; None
        for a single run)."""
        wandb = import_wandb()
        mode = resolve_mode(self.mode)
        os.environ["WANDB_MODE"] = mode  # also for Lightning's WandbLogger and spawned ranks
        run_dir = Path(job["run_dir"])
        run_dir.mkdir(parents=True, exist_ok=True)
        self.run = wandb.init(
            project=self.project, entity=self.entity, group=job.get("group"), name=job["name"],
            job_type=self.job_type or ("sweep" if job.get("group") else "run"), tags=self.tags,
            config=OmegaConf.to_container(cfg, resolve=True), dir=str(run_dir), mode=mode,
            reinit="finish_previous", settings=wandb.Settings(console="off", quiet=True))
        # every stage's step counter starts at 0: plot each metric against its own stage step
        self.run.define_metric("trainer/global_step")
        self.run.define_metric("*", step_metric="trainer/global_step", step_sync=True)
        log.info("W&B run %s (%s) in %s", job["name"], mode, run_dir / "wandb")

    def lightning_logger(self):
        if self.run is None:
            return None
        if self._logger is None:
            from lightning.pytorch.loggers import WandbLogger

            self._logger = WandbLogger(experiment=self.run)
        return self._logger

    def log_summary(self, metrics: dict) -> None:
        """The job's result: the summary table (one row per evaluated stage) and the final
        HS / FA in the run summary."""
        wandb = import_wandb()
        rows = [[name, m["harmful_score"], m["finetune_accuracy"], bool(m.get("cached"))]
                for name, m in metrics["stages"].items() if m is not None]
        table = wandb.Table(columns=["stage", "harmful_score", "finetune_accuracy", "cached"], data=rows)
        summary = {"harmful_score": metrics["harmful_score"],
                   "finetune_accuracy": metrics["finetune_accuracy"],
                   "time_total_s": metrics["timing"].get("total")}
        for name, hs, fa, _ in rows:
            summary[f"{name}/harmful_score"] = hs
            summary[f"{name}/finetune_accuracy"] = fa
        self.run.log({"summary_table": table})
        self.run.summary.update(summary)

    def finish(self, exit_code: int = 0) -> None:
        if self.run is not None:
            self.run.finish(exit_code=exit_code)
        self.run, self._logger = None, None


def log_report(table, paths: list, root: Path, project: str = "vaa", entity: str | None = None,
               mode: str | None = None) -> str:
    """The sweep's paper table (``vaa-report --wandb``) as one W&B run of job type "report"
    in the sweep's group: the table, its figures, and each cell's mean in the run summary."""
    from vaa.report.render import flat_rows

    wandb = import_wandb()
    mode = resolve_mode(mode)
    group = sweep_group(root)
    header, rows = flat_rows(table, missing=None)
    run = wandb.init(project=project, entity=entity, group=group, name="report", job_type="report",
                     dir=str(root), mode=mode, reinit="finish_previous",
                     settings=wandb.Settings(console="off", quiet=True))
    logged = {"report": wandb.Table(columns=header, data=rows)}
    logged.update({Path(p).stem: wandb.Image(str(p)) for p in paths if str(p).endswith(".png")})
    run.log(logged)
    run.summary.update({f"{r[0]}/{h}": v for r in rows for h, v in zip(header[4:], r[4:])
                        if v is not None and h.endswith("_mean")})
    run.finish()
    return group


def sweep_group(root: Path) -> str:
    """The group the sweep's jobs logged under (their hydra.sweep.dir, as vaa.cli names it)."""
    try:
        saved = OmegaConf.load(Path(root) / "multirun.yaml")
        return str(OmegaConf.select(saved, "hydra.sweep.dir", default=None) or root)
    except Exception:  # noqa: BLE001 - not a sweep root: the directory names the group
        return str(root)
