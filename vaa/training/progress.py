"""Progress of a training stage or an evaluation loop, for a terminal and for a log file.

On a terminal: one progress bar per stage, ``aligned:  40%|████  | 80/200 [00:41<01:02, loss=1.23]``
— the stage's name, step / total steps *of the stage* and the stage's ETA (Lightning's own bar
counts epochs: with ``max_epochs=-1`` it read "Epoch 0/-2"). When stdout is not a terminal
(SLURM, ``nohup``, a sweep's job log): plain lines through the ``vaa.progress`` logger (Hydra
writes them to stdout and to the job's ``.log``), at a steady cadence — every
``every_s`` seconds (default 30) or every ``every_n`` steps (default 0: off), whichever
comes first — plus one line at the start and one at the end::

    aligned: step 80/200 (40%) loss 1.2345 | 0.512 s/step | ETA 1m01s

Two entry points:

* ``ProgressLine`` — any loop of known length (evaluation, generation)::

      with ProgressLine("eval_aligned hs", total=len(prompts), unit="prompt") as p:
          for batch in batches:
              ...
              p.update(len(batch))            # advance by n items
              # or p.update_to(done, loss=x)  # set the count; extra fields go on the line

* ``StageProgress`` — the Lightning callback ``vaa.training.fit.fit`` adds to every stage.

Cadence and switches come from the ``trainer`` config (``progress_bar``, ``progress_every_s``,
``progress_every_n_steps``) through ``configure(trainer_cfg)``, which the pipeline calls once
per job; a ``ProgressLine`` built without arguments uses those settings.
"""

from __future__ import annotations

import logging
import sys
import time
from dataclasses import dataclass
from typing import Callable

from lightning.pytorch.callbacks import Callback

log = logging.getLogger("vaa.progress")


@dataclass
class Settings:
    bar: bool = True          # a tqdm bar when stdout is a terminal
    every_s: float = 30.0     # non-terminal: a line at least this often (<= 0: no lines)
    every_n: int = 0          # ... and every this many steps (0: time only)


SETTINGS = Settings()


def configure(trainer_cfg) -> Settings:
    """Take ``progress_bar``, ``progress_every_s`` and ``progress_every_n_steps`` from a
    ``trainer`` config (missing keys keep their defaults) as the job's progress settings."""
    get = trainer_cfg.get if hasattr(trainer_cfg, "get") else (lambda k, d: getattr(trainer_cfg, k, d))
    SETTINGS.bar = bool(get("progress_bar", SETTINGS.bar))
    SETTINGS.every_s = float(get("progress_every_s", SETTINGS.every_s))
    SETTINGS.every_n = int(get("progress_every_n_steps", SETTINGS.every_n) or 0)
    return SETTINGS


def fmt_duration(seconds: float) -> str:
    """``75.3`` → ``1m15s``; ``3725`` → ``1h02m05s``; under a minute ``42s``."""
    s = int(round(max(0.0, seconds)))
    h, rem = divmod(s, 3600)
    m, s = divmod(rem, 60)
    return f"{h}h{m:02d}m{s:02d}s" if h else f"{m}m{s:02d}s" if m else f"{s}s"


def _fmt_value(v) -> str:
    v = float(v)
    return f"{v:.4f}" if abs(v) < 1e4 else f"{v:.4g}"


class ProgressLine:
    """Progress of one loop of ``total`` items (steps, prompts, batches).

    Args:
        stage: the name every line and the bar start with (``"aligned"``, ``"eval_base hs"``).
        total: items in the loop (> 0; 0 or None: lines without % and ETA).
        unit: what an item is, for the lines and the bar (``"step"``, ``"prompt"``).
        initial: items already done (a resumed stage).
        every_s / every_n: cadence of the plain lines; None: the job's settings.
        tty: draw a bar (True) or write lines (False); None: a bar iff stdout is a terminal
            and ``trainer.progress_bar`` is on.
        clock: seconds, monotonic (tests pass a fake one).

    Lines go to the ``vaa.progress`` logger at INFO. Not thread-safe; one loop at a time.
    """

    def __init__(self, stage: str, total: int | None, *, unit: str = "step", initial: int = 0,
                 every_s: float | None = None, every_n: int | None = None, tty: bool | None = None,
                 clock: Callable[[], float] = time.monotonic):
        self.stage, self.total, self.unit = stage, int(total or 0), unit
        self.every_s = SETTINGS.every_s if every_s is None else float(every_s)
        self.every_n = SETTINGS.every_n if every_n is None else int(every_n)
        self.tty = (SETTINGS.bar and sys.stdout.isatty()) if tty is None else bool(tty)
        self.clock = clock
        self.lines = not self.tty and (self.every_s > 0 or self.every_n > 0)
        self.n = self.start_n = self.last_n = int(initial)
        self.t0 = self.last_t = clock()
        self.fields: dict = {}
        self._fields_t = float("-inf")
        self.bar = None
        self.closed = False
        if self.tty:
            from tqdm.auto import tqdm
            self.bar = tqdm(total=self.total or None, initial=self.n, desc=stage, unit=unit,
                            dynamic_ncols=True, leave=True, file=sys.stdout)
        elif self.lines:
            log.info("%s: start, %s %s%s", stage, self.total or "?", unit,
                     "s" if self.total != 1 else "", extra={"progress": True})

    # the loop's side ----------------------------------------------------------------------
    def update(self, n: int = 1, **fields) -> None:
        """Advance by ``n`` items; ``fields`` (e.g. ``loss=``) go on the next line/bar."""
        self.update_to(self.n + n, **fields)

    def update_to(self, n: int, **fields) -> None:
        """Set the count of items done to ``n``; writes a line when the cadence says so."""
        self.fields.update(fields)
        if self.bar is not None:
            self.bar.update(n - self.bar.n)
            if fields:
                self.bar.set_postfix({k: _fmt_value(v) for k, v in fields.items()}, refresh=False)
            self.n = n
            return
        self.n = n
        if not self.lines:
            return
        now = self.clock()
        due_time = self.every_s > 0 and now - self.last_t >= self.every_s
        due_steps = self.every_n > 0 and n - self.last_n >= self.every_n
        if due_time or due_steps or (self.total and n >= self.total and self.last_n < self.total):
            self.emit(now)

    def wants_fields(self, n: int | None = None) -> bool:
        """Whether an update to ``n`` items (default: one more) would show its fields: a
        caller computing a costly field (a loss that syncs a device) may skip it otherwise."""
        n = self.n + 1 if n is None else n
        now = self.clock()
        if self.bar is not None:  # the bar redraws ~10 times a second; its loss once a second
            if now - self._fields_t >= 1.0:
                self._fields_t = now
                return True
            return False
        return self.lines and ((self.every_s > 0 and now - self.last_t >= self.every_s)
                or (self.every_n > 0 and n - self.last_n >= self.every_n)
                or bool(self.total and n >= self.total))

    # output -------------------------------------------------------------------------------
    def seconds_per_item(self, now: float | None = None) -> float | None:
        done = self.n - self.start_n
        return ((now if now is not None else self.clock()) - self.t0) / done if done > 0 else None

    def line(self, now: float | None = None) -> str:
        """``stage: step n/total (p%) loss x | s/step | ETA`` (the fields in insertion order)."""
        now = self.clock() if now is None else now
        parts = [f"{self.stage}: {self.unit} {self.n}"
                 + (f"/{self.total} ({100 * self.n / self.total:.0f}%)" if self.total else "")]
        parts[0] += "".join(f" {k} {_fmt_value(v)}" for k, v in self.fields.items())
        spi = self.seconds_per_item(now)
        if spi is not None:
            parts.append(f"{spi:.3g} s/{self.unit}")
            if self.total:
                parts.append(f"ETA {fmt_duration(spi * max(0, self.total - self.n))}")
        return " | ".join(parts)

    def emit(self, now: float | None = None) -> None:
        now = self.clock() if now is None else now
        log.info(self.line(now), extra={"progress": True})
        self.last_t, self.last_n = now, self.n

    def close(self) -> None:
        """The bar's last draw, or a last line ``stage: done, n steps in T`` (idempotent)."""
        if self.closed:
            return
        self.closed = True
        if self.bar is not None:
            self.bar.close()
            return
        if self.lines:
            if self.last_n != self.n:
                self.emit()
            log.info("%s: done, %d %s%s in %s", self.stage, self.n - self.start_n, self.unit,
                     "s" if self.n - self.start_n != 1 else "", fmt_duration(self.clock() - self.t0),
                     extra={"progress": True})

    def __enter__(self) -> "ProgressLine":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class StageProgress(Callback):
    """Lightning callback: a ``ProgressLine`` over the stage's optimizer steps (total =
    ``trainer.max_steps``, starting from a resumed run's ``global_step``) with the loss of the
    latest step (``module.last_logs["loss"]``, read only when a line or the bar will show it).
    Rank zero only."""

    def __init__(self, stage: str, **kw):
        self.stage, self.kw = stage, kw
        self.p: ProgressLine | None = None

    def on_train_start(self, trainer, pl_module) -> None:
        if trainer.is_global_zero:
            self.p = ProgressLine(self.stage, trainer.max_steps, unit="step",
                                  initial=trainer.global_step, **self.kw)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if self.p is None:
            return
        fields = {}
        loss = (getattr(pl_module, "last_logs", None) or {}).get("loss")
        if loss is not None and self.p.wants_fields(trainer.global_step):
            fields["loss"] = float(loss)
        self.p.update_to(trainer.global_step, **fields)

    def on_train_end(self, trainer, pl_module) -> None:
        if self.p is not None:
            self.p.close()
            self.p = None

    def on_exception(self, trainer, pl_module, exception) -> None:
        if self.p is not None and self.p.bar is not None:
            self.p.bar.close()
        self.p = None
