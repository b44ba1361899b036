"""Lightning's per-step overhead on the SFT training step, against a bare PyTorch loop.

Both sides do the same work per step on the same model (same initial weights) and the same
pre-collated batches, fed cyclically in the same order through the same ``DataLoader``:
``response_loss`` forward, backward, ``clip_grad_norm_`` at 1.0, AdamW step,
``zero_grad(set_to_none=True)``, a constant ``LambdaLR`` step. The Lightning side is
``AlignModule`` + ``SFT`` (manual optimisation) under a ``Trainer`` with no logger, no
progress bar and no checkpointing, on the CPU.

Timed: the steps after ``--warmup`` (the Trainer's set-up, AdamW's state allocation and
the first allocations excluded). Two interleavings, ``--reps`` times each, in turn:

* runs: a bare run, then a Lightning run, then a bare run, ... Per run the mean step, across
  runs the median: ``ratio_runs``, ``lightning_ms_runs``, ``bare_ms_runs``.
* steps: one Trainer run whose callback takes a bare step (own model copy, same batch) right
  before each Lightning step, timing the two apart; Lightning's step is everything from the
  end of that bare step to the start of the next one (its hooks, logging, optimizer wrapper,
  data fetching included). The median over all pairs of Lightning step / bare step:
  ``ratio``, with ``lightning_ms``, ``bare_ms`` and ``overhead_ms`` (median difference).
  Both models start from the same weights and see the same batches, so at the end they
  must agree: ``max_weight_diff`` (0 when both sides did exactly the same work).

``ratio`` comes from the step-level pairs because each pair sees the same machine load:
on a shared 2-core machine whole runs drift by +-10 % from one another, far more than the
overhead being measured, while pairs resolve a fraction of a millisecond. Goal: ratio <=
1.05.

``--explain`` also pairs variants of the Lightning side that remove one cost each
(``no_log_dict``, ``raw_optimizer``, ``plain_backward``, all three: ``lean``), the
proposed fix (``log_every_n``: ``log_dict`` only every ``log_every_n_steps``), and the
set-up the pipeline's ``fit()`` uses on a CPU (progress bar + CSV logger: ``fit_like``),
reported under ``variants``.

    python -m benchmarks.loop_overhead            # hidden 256, 4 layers, batch 16 (+ tiny)
    python -m benchmarks.loop_overhead --explain  # + where the overhead goes
    python -m benchmarks.loop_overhead --quick    # smoke run, seconds
"""

from __future__ import annotations

import contextlib
import copy
import random
import sys
import tempfile
import time
from pathlib import Path

import torch
from torch.utils.data import DataLoader

from benchmarks.common import (base_parser, emit, interleaved, make_world, median, run_main,
                               size_options, tiny_model, world_tokenizer)
from vaa.config.schema import AlignConfig
from vaa.data.encode import TrainCollator, encode_train
from vaa.methods.sft import SFT
from vaa.training.module import AlignModule, response_loss
from vaa.training.optim import build_optimizer

NAME = "loop_overhead"


def _identity(x):
    return x


def make_batches(source, tokenizer, batch_size: int, seed: int, template: str = "compact",
                 max_length: int = 256) -> list[dict[str, torch.Tensor]]:
    """Full batches of the alignment set (seeded shuffle), collated once."""
    rows = [encode_train(tokenizer, ex, template, max_length)
            for ex in source.examples("beavertails", "align")]
    random.Random(seed).shuffle(rows)
    collate = TrainCollator(tokenizer.pad_token_id)
    n = max(1, len(rows) // batch_size)
    return [collate(rows[i * batch_size:(i + 1) * batch_size]) for i in range(n)]


def loader(data: list) -> DataLoader:
    """The same pre-collated batches, in order, through a (non-collating) DataLoader."""
    return DataLoader(data, batch_size=None, shuffle=False, collate_fn=_identity)


def recipe() -> AlignConfig:
    return AlignConfig(lr=1e-3, batch_size=16, weight_decay=0.1, grad_clip=1.0,
                       schedule="constant", warmup_ratio=0.0)


# --------------------------------------------------------------------------------------------
# the bare loop
# --------------------------------------------------------------------------------------------
class BareStepper:
    """The SFT step in plain PyTorch, on its own copy of the model: what ``SFT.training_step``
    + ``TrainingMethod.apply_gradients`` do, without Lightning."""

    def __init__(self, model0):
        r = self.recipe = recipe()
        self.model = copy.deepcopy(model0)
        self.model.train()
        params = [p for p in self.model.parameters() if p.requires_grad]
        self.opt = build_optimizer(params, r)  # the pipeline's optimizer (fused AdamW where it can)
        self.sched = torch.optim.lr_scheduler.LambdaLR(self.opt, lambda step: 1.0)

    def step(self, batch) -> dict[str, torch.Tensor]:
        loss = response_loss(self.model, batch)
        loss.backward()
        grads = [p for p in self.model.parameters() if p.grad is not None]
        norm = torch.nn.utils.clip_grad_norm_(grads, self.recipe.grad_clip)
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        self.sched.step()
        return {"loss": loss.detach(), "grad_norm": norm}  # what SFT.training_step returns


def run_bare(model0, data: list, warmup: int, steps: int) -> list[float]:
    """Seconds of each timed step of the plain PyTorch loop."""
    bare = BareStepper(model0)
    stamps = []
    for i, batch in enumerate(loader(data)):
        if i >= warmup + steps:
            break
        if i >= warmup:
            stamps.append(time.perf_counter())
        bare.step(batch)
    stamps.append(time.perf_counter())
    return _durations(stamps)


def _durations(stamps: list[float]) -> list[float]:
    return [b - a for a, b in zip(stamps, stamps[1:])]


# --------------------------------------------------------------------------------------------
# the Lightning side (and variants that each remove one cost, for --explain)
# --------------------------------------------------------------------------------------------
class NoLogModule(AlignModule):
    """Without ``self.log_dict(..., prog_bar=True, on_step=True)`` every step."""

    def training_step(self, batch, batch_idx):
        self.method.training_step(self, batch)


class LogEveryNModule(AlignModule):
    """The proposed fix: ``log_dict`` only on the steps the loggers write
    (``trainer.log_every_n_steps``), not every step."""

    def training_step(self, batch, batch_idx):
        logs = self.method.training_step(self, batch)
        if self.global_step % self.trainer.log_every_n_steps == 0:
            self.log_dict({f"{self.log_prefix}/{k}": v for k, v in logs.items()},
                          prog_bar=True, on_step=True, batch_size=batch["input_ids"].shape[0])


class RawOptimizerModule(AlignModule):
    """The optimizer without the ``LightningOptimizer`` wrapper (hooks, profiler, step
    counting; note: ``trainer.global_step`` then stays 0, so the run is bounded by the
    data, one epoch)."""

    def optimizers(self, use_pl_optimizer: bool = True):
        return super().optimizers(use_pl_optimizer=False)


class PlainBackwardModule(AlignModule):
    """``loss.backward()`` instead of ``manual_backward`` (strategy/precision hooks)."""

    def manual_backward(self, loss, *args, **kwargs):
        loss.backward(*args, **kwargs)


class LeanModule(NoLogModule, RawOptimizerModule, PlainBackwardModule):
    """All three removed: what is left is the Trainer's loop itself."""


VARIANT_MODULES = {"lightning": AlignModule, "no_log_dict": NoLogModule,
                   "log_every_n": LogEveryNModule,
                   "raw_optimizer": RawOptimizerModule, "plain_backward": PlainBackwardModule,
                   "lean": LeanModule}


def _clock(warmup: int, steps: int, bare: BareStepper | None):
    """A callback that stamps the time at the start of each timed step and at the end of the
    last one. With ``bare``, it also takes one bare step on the same batch right before each
    Lightning step (step-level interleaving: each pair sees the same machine load), and
    times the two apart."""
    from lightning.pytorch.callbacks import Callback

    class Clock(Callback):
        def __init__(self):
            self.stamps: list[float] = []
            self.lightning: list[float] = []
            self.bare: list[float] = []
            self.t_end = 0.0

        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            now = time.perf_counter()
            if bare is None:
                if warmup <= batch_idx < warmup + steps:
                    self.stamps.append(now)
                return
            if warmup < batch_idx <= warmup + steps:
                self.lightning.append(now - self.t_end)  # Lightning's step batch_idx - 1
            bare.step(batch)
            self.t_end = time.perf_counter()
            if warmup <= batch_idx < warmup + steps:
                self.bare.append(self.t_end - now)

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            if bare is None and batch_idx == warmup + steps - 1:
                self.stamps.append(time.perf_counter())

    return Clock()


def run_lightning(model0, data: list, warmup: int, steps: int, root: Path,
                  module_cls=AlignModule, fit_like: bool = False, paired: bool = False):
    """Seconds of each timed step under a Lightning Trainer. ``fit_like``: the progress bar
    and a CSVLogger (log_every_n_steps=10), as ``vaa.training.fit`` sets up a CPU stage.
    ``paired``: returns (Lightning steps, bare steps, the largest difference between the two
    models' weights at the end: 0 when both did the same work)."""
    import lightning as L
    from lightning.pytorch.loggers import CSVLogger

    total = warmup + steps + (1 if paired else 0)
    model = copy.deepcopy(model0)
    model.train()
    module = module_cls(model, SFT(), recipe(), total)
    bare = BareStepper(model0) if paired else None
    clock = _clock(warmup, steps, bare)
    logger = CSVLogger(save_dir=str(root / "logs"), name="bench", version="") if fit_like else False
    trainer = L.Trainer(accelerator="cpu", devices=1, max_steps=total, max_epochs=1,
                        logger=logger, callbacks=[clock], enable_checkpointing=False,
                        enable_model_summary=False, enable_progress_bar=fit_like,
                        log_every_n_steps=10, num_sanity_val_steps=0,
                        default_root_dir=str(root))
    # the progress bar writes to stdout; keep stdout for the report line
    with contextlib.redirect_stdout(sys.stderr):
        trainer.fit(module, train_dataloaders=loader(data[:total]))
    if paired:
        if len(clock.lightning) != steps or len(clock.bare) != steps:
            raise RuntimeError("the Lightning run stopped early")
        with torch.no_grad():
            diff = max((a - b).abs().max().item()
                       for a, b in zip(model.parameters(), bare.model.parameters()))
        return clock.lightning, clock.bare, diff
    if len(clock.stamps) != steps + 1:
        raise RuntimeError(f"the Lightning run stopped early (ran {trainer.global_step} steps)")
    return _durations(clock.stamps)


def compare(tokenizer, batches, *, hidden: int, layers: int, warmup: int, steps: int, reps: int,
            seed: int, root: Path, explain: bool = False) -> dict:
    """Run-level interleaving (bare run, Lightning run, ...) and step-level interleaving
    (one Trainer run alternating a bare step and a Lightning step), ``reps`` times each."""
    model0 = tiny_model(tokenizer, hidden, layers, seed=seed)
    data = [batches[i % len(batches)] for i in range(warmup + steps + 1)]  # cyclic, shared
    arms = {"bare": lambda: run_bare(model0, data, warmup, steps),
            "lightning": lambda: run_lightning(model0, data, warmup, steps, root)}
    paired = {"lightning": {}}
    if explain:
        paired = {name: {"module_cls": cls} for name, cls in VARIANT_MODULES.items()}
        paired["fit_like"] = {"fit_like": True}
    for name, kw in paired.items():
        arms[f"paired:{name}"] = (lambda kw=kw: run_lightning(model0, data, warmup, steps, root,
                                                              paired=True, **kw))
    res = interleaved(arms, reps)
    # run level: per rep the mean step; across reps the median
    mean = {k: [sum(r) / len(r) for r in res[k]] for k in ("bare", "lightning")}
    out = {"ratio": median(mean["lightning"]) / median(mean["bare"]),
           "lightning_ms": 1e3 * median(mean["lightning"]), "bare_ms": 1e3 * median(mean["bare"]),
           "run_ratios": [a / b for a, b in zip(mean["lightning"], mean["bare"])]}
    # step level: every (bare step, Lightning step) pair of every rep; medians
    out["paired"] = {}
    for name in paired:
        runs = res[f"paired:{name}"]
        pairs = [(lt, bt) for light, bare, _ in runs for lt, bt in zip(light, bare)]
        out["paired"][name] = {
            "max_weight_diff": max(d for _, _, d in runs),
            "ratio": median([lt / bt for lt, bt in pairs]),
            "overhead_ms": 1e3 * median([lt - bt for lt, bt in pairs]),
            "lightning_ms": 1e3 * median([lt for lt, _ in pairs]),
            "bare_ms": 1e3 * median([bt for _, bt in pairs])}
    return out


def main(argv: list[str] | None = None) -> dict:
    p = base_parser(__doc__.splitlines()[0])
    p.add_argument("--no-tiny", action="store_true",
                   help="skip the default tiny model's ratio (hidden 128, 2 layers)")
    p.add_argument("--explain", action="store_true",
                   help="also time Lightning variants that each remove one cost")
    size_options(p, hidden=(32, 256), layers=(1, 4), batch_size=(4, 16), steps=(3, 20),
                 warmup=(1, 3), reps=(1, 5))
    return run_main(p, run, argv)


def run(a) -> dict:
    hidden, layers, batch_size = a.hidden, a.layers, a.batch_size
    steps, warmup, reps = a.steps, a.warmup, a.reps
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="vaa-bench-") as tmp:
        root = Path(tmp)
        source = make_world(root / "world")
        tokenizer = world_tokenizer(source)
        batches = make_batches(source, tokenizer, batch_size, a.seed)
        kw = dict(warmup=warmup, steps=steps, reps=reps, seed=a.seed, root=root)
        res = compare(tokenizer, batches, hidden=hidden, layers=layers, explain=a.explain, **kw)
        pl = res["paired"]["lightning"]
        figures = {
            "ratio": pl["ratio"], "lightning_ms": pl["lightning_ms"], "bare_ms": pl["bare_ms"],
            "overhead_ms": pl["overhead_ms"], "max_weight_diff": pl["max_weight_diff"],
            "ratio_runs": res["ratio"], "lightning_ms_runs": res["lightning_ms"],
            "bare_ms_runs": res["bare_ms"], "run_ratios": res["run_ratios"],
            "steps": steps, "warmup": warmup, "reps": reps, "batch_size": batch_size,
            "seq_len": median([b["input_ids"].shape[1] for b in batches]),
            "hidden_size": hidden, "layers": layers,
        }
        if a.explain:
            figures["variants"] = res["paired"]
        if not (a.quick or a.no_tiny or (hidden, layers) == (128, 2)):
            tiny = compare(tokenizer, batches, hidden=128, layers=2, **kw)
            tl = tiny["paired"]["lightning"]
            figures.update(ratio_tiny=tl["ratio"], lightning_ms_tiny=tl["lightning_ms"],
                           bare_ms_tiny=tl["bare_ms"], overhead_ms_tiny=tl["overhead_ms"],
                           ratio_runs_tiny=tiny["ratio"])
    figures["wall_s"] = time.perf_counter() - t0
    return emit(NAME, **figures)


if __name__ == "__main__":
    main()
