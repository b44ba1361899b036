"""Build a Lightning Trainer from the `trainer` config and run one training stage.

Long stages checkpoint into a work directory beside the cache; a crashed run resumes from
its last checkpoint on the next call, and the work directory is removed on success.
Progress: the stage's own bar on a terminal, plain lines in a log file (training/progress.py).
Metrics: ``<log_dir>/<stage>/metrics.csv`` every ``log_every_n_steps`` steps, at most the
stage's length apart, so that a stage shorter than the interval still writes its row.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import lightning as L
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.loggers import CSVLogger

from vaa.tracking import active_lightning_logger
from vaa.training.module import fit_and_recover
from vaa.training.progress import StageProgress


def fit(module, datamodule, *, max_steps: int, trainer_cfg, log_dir: Path, stage: str,
        work_dir: Path | None = None, extra_logger=None, callbacks: list | None = None) -> None:
    callbacks = list(callbacks or []) + [StageProgress(stage)]
    ckpt_path = None
    if work_dir is not None and trainer_cfg.checkpoint_every_n_steps > 0:
        callbacks.append(ModelCheckpoint(dirpath=work_dir, save_last=True, save_top_k=0,
                                         every_n_train_steps=trainer_cfg.checkpoint_every_n_steps))
        if (work_dir / "last.ckpt").is_file():
            ckpt_path = str(work_dir / "last.ckpt")
    loggers = [CSVLogger(save_dir=str(log_dir), name=stage, version="")]
    if extra_logger is None:  # the job's tracker run (logger=wandb), if one is active
        extra_logger = active_lightning_logger()
    if extra_logger is not None:
        loggers.append(extra_logger)
    trainer = L.Trainer(
        accelerator=trainer_cfg.accelerator, devices=trainer_cfg.devices,
        strategy=trainer_cfg.strategy, precision=trainer_cfg.precision,
        max_steps=max_steps, max_epochs=-1, logger=loggers, callbacks=callbacks,
        enable_checkpointing=any(isinstance(c, ModelCheckpoint) for c in callbacks), enable_model_summary=False,
        enable_progress_bar=False,  # StageProgress draws the stage's bar (or its log lines)
        log_every_n_steps=max(1, min(trainer_cfg.log_every_n_steps, max_steps)),
        num_sanity_val_steps=0, deterministic=trainer_cfg.deterministic,
    )
    fit_and_recover(trainer, module, datamodule, ckpt_path)  # + method state under ddp_spawn
    if work_dir is not None:
        shutil.rmtree(work_dir, ignore_errors=True)
