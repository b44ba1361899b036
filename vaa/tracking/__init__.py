"""Experiment tracking beside the CSV logs: one tracker run per Hydra job.

The tracker is built from the `logger` config group (``conf/logger/<name>.yaml``): a group
file with a ``_target_`` names its tracker class (``logger=wandb`` →
:class:`vaa.tracking.wandb.WandbTracker`); one without (``logger=csv``) adds nothing to the
per-stage CSV logs. A tracker run is process-wide (as ``wandb.run`` is): ``vaa.cli`` starts
it before the pipeline and finishes it after, and every training stage of the job logs its
per-step metrics into it through :func:`active_lightning_logger`.
"""

from __future__ import annotations

from typing import Any, Protocol

from hydra.utils import instantiate
from omegaconf import DictConfig


class Tracker(Protocol):
    def start(self, cfg: DictConfig, job: dict[str, Any]) -> None: ...
    def lightning_logger(self): ...  # a Lightning logger writing into the run, or None
    def log_summary(self, metrics: dict) -> None: ...
    def finish(self, exit_code: int = 0) -> None: ...


_active: Tracker | None = None


def build_tracker(logger_cfg: DictConfig) -> Tracker | None:
    """The tracker of ``cfg.logger``, or None when the group file has no ``_target_``."""
    if logger_cfg is None or "_target_" not in logger_cfg:
        return None
    return instantiate(logger_cfg, _convert_="all")


def set_active(tracker: Tracker | None) -> None:
    global _active
    _active = tracker


def active_lightning_logger():
    """The Lightning logger of this job's tracker run (None when no tracker is active), so
    every training stage's per-step metrics (losses, VAA's sampler probabilities) land in
    the job's one run."""
    return _active.lightning_logger() if _active is not None else None
