"""Step cost of every registered alignment method relative to SFT, on the same model and batch
size, plus its memory.

Registered methods: every YAML in ``conf/method/`` and every fine-tuning defense in
``conf/ft_defense/`` but ``none`` (``--methods`` narrows the list; SFT, the reference, always
runs). Each is built exactly as the pipeline builds it: the Hydra config composed with
``method=<name>`` (or ``ft_defense=<name>``), ``instantiate(...)``,
``method.make_datamodule(...)`` (groups, a fixed random ~37 % vulnerable split, for methods
with ``requires_groups``; the extra streams of ``requires`` from the world as
``extra_data`` says), ``AlignModule(model, method, recipe, total_steps)`` under a Lightning
Trainer (no logger, no progress bar, no checkpointing). Every run starts from the same initial
weights (one model, deep-copied per run) and gets a fresh method object.

One run is ``--warmup`` untimed steps, then ``--steps`` timed ones, ``total_steps`` = their
sum, so VAA's linear λ goes from 0 to 1 over the run (mean over the timed steps ≈ 0.5). A
callback stamps ``perf_counter`` at the start of every timed step and at the end of the last
one (CUDA: synchronised first): a step is everything from one step's start to the next, so
data fetching and collation count alike whether the loader (SFT) or the method (VAA draws its
group batch inside the step) does it. Per run the mean step (VAA's steps are bimodal, one or
two passes: a median step would pick one mode), across the ``--reps`` interleaved repetitions
the median: ``step_ms``. ``run_ratios``: per repetition, the method's mean step ÷ SFT's in
the same repetition; ``ratio_vs_sft`` their median (below).

Passes: ``passes`` is the method's declared ``passes_per_step`` (expected forward/backward
passes per step; VAA: 1 + mean λ under bernoulli mixing); ``realised_passes`` is
``method.stats["passes"] / method.stats["steps"]`` over the timed steps where the method keeps
stats, else the counted decoder forwards per step (``forwards_per_step``, a hook on the
decoder, reported for every method). ``perturbed_fraction`` and ``mean_lambda`` (the λ_t the
step used, averaged over the timed steps) for methods that have them. Target for VAA:
``vaa_target`` = 1.05 × (1 + mean λ), ``vaa_within_target`` = ratio_vs_sft["vaa"] ≤ it.

Memory: ``extra_state_mb`` = bytes of the tensors a method keeps between steps (e.g. VAA's SAM
restore buffers, ``perturber.buffer_numel`` × element size; 0 for SFT), excluding the model's
own parameters and the data. On CUDA also ``peak_mem_mb`` = ``torch.cuda.max_memory_allocated``
per run (reset before each; median over reps). On a CPU ``peak_rss_mb`` is the process's peak
resident set (``getrusage``), a coarse figure for the whole benchmark.

Repetitions: in each one every method runs once, in an order rotated by one per repetition
(no method always runs first or last), and right after SFT's run a 2048² fp32 GEMM measures
the machine's matmul rate under the same load (``matmul_gflops``: [median, min, max] over the repetitions). ``ratio_vs_sft`` is the
median over repetitions of the method's mean step ÷ SFT's in the same repetition (paired, so a
drift of the machine's speed between repetitions cancels), ``ratio_range`` their [min, max].

Host heap (CPU): ``--host-heap`` sets ``trainer.host_heap`` for the whole process
(vaa/training/host_memory.py), reported as ``host_heap``; ``page_faults_per_step`` (median
over repetitions) counts the pages the OS mapped in per timed step. Under glibc's own policy
(``system``) Booster at 135 M faulted 473 k pages (≈ 2 s) per step that SFT did not; under
``keep`` 4.5 k.

A real model (``--model smollm2_135m``, a ``save_pretrained`` folder or a ``.gguf`` file;
benchmarks/real_model.py): full fine-tuning of every parameter in fp32, rows of exactly
``--seq-len`` tokens (world rows whose output is extended by the next rows' outputs, the
``alpaca`` template), so a step is ``batch × seq_len`` tokens. Then also
``sft_peak_fraction``: SFT's FLOP per second ÷ the GEMM rate of the same repetition, as
[median, min, max], with FLOP = 6 × parameters × tokens (``flop_6pt``), and
``sft_peak_fraction_matmul`` with the matrix work the step really does (``flop_matmul``:
the output head only on response tokens, plus attention).

    python -m benchmarks.step_cost --threads 1   # hidden 256, 4 layers, batch 8, 40 steps, 3 reps
    python -m benchmarks.step_cost --model smollm2_135m --methods vaa,booster,vaccine \
        --steps 4 --warmup 1 --reps 3              # the real model: batch 8 x 128 tokens
    python -m benchmarks.step_cost --model smollm2_135m --host-heap keep ...   # few page faults
    python -m benchmarks.step_cost --quick       # smoke run, seconds
"""

from __future__ import annotations

import contextlib
import copy
import gc
import random
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from benchmarks.common import (base_parser, emit, make_world, median, run_main, size_options,
                               tiny_model, world_tokenizer)
from benchmarks.method_memory import peak_rss_mb, persistent_state_bytes
from benchmarks.real_model import (load_real_model, long_examples, matmul_gflops, median_range,
                                   step_flop)
from vaa.training import host_memory
from vaa.training.host_memory import POLICIES

NAME = "step_cost"
ROOT = Path(__file__).resolve().parents[1]
CONF_DIR = ROOT / "conf"
VULNERABLE_FRACTION = 0.37
TARGET_SLACK = 1.05  # VAA: step time within 5 % of (1 + mean λ) × SFT's
TARGETS = {"vaccine": 2.1, "booster": 3.15}  # step time ≤ target × SFT's


def defenses(conf_dir: Path = CONF_DIR) -> list[str]:
    """Fine-tuning-stage defenses (``conf/ft_defense/*.yaml`` but ``none``)."""
    return sorted(p.stem for p in (conf_dir / "ft_defense").glob("*.yaml") if p.stem != "none")


def trains(method_yaml: Path) -> bool:
    """False for a method whose class is the identity (``method=none``: nothing to time)."""
    from hydra.utils import get_class
    from omegaconf import OmegaConf

    target = OmegaConf.load(method_yaml).get("_target_")
    return not (target and getattr(get_class(target), "identity", False))


def registered_methods(conf_dir: Path = CONF_DIR) -> list[str]:
    """Every method config (``conf/method/*.yaml``) that trains, SFT first, then the defenses."""
    names = sorted(p.stem for p in (conf_dir / "method").glob("*.yaml") if trains(p))
    return sorted(names, key=lambda n: n != "sft") + defenses(conf_dir)


def override(name: str) -> str:
    return f"ft_defense={name}" if name in defenses() else f"method={name}"


def compose_method_configs(names: list[str]) -> dict[str, Any]:
    """The run config ``vaa method=<name>`` (or ``ft_defense=<name>``) would see, one per
    method (as the pipeline)."""
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    from vaa.config.schema import register

    register()
    GlobalHydra.instance().clear()
    try:
        with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
            return {n: compose("config", overrides=[override(n)]) for n in names}
    finally:
        GlobalHydra.instance().clear()


def fixed_groups(n: int, seed: int) -> list[int]:
    """A fixed random vulnerable (1) / invulnerable (0) split, ~37 % vulnerable."""
    rng = random.Random(f"step-cost-groups-{seed}")
    return [int(rng.random() < VULNERABLE_FRACTION) for _ in range(n)]


# --------------------------------------------------------------------------------------------
# one run
# --------------------------------------------------------------------------------------------
def _stats(method) -> dict:
    stats = getattr(method, "stats", None)
    return dict(stats) if isinstance(stats, dict) else {}


def _lambda_of(method, module) -> float | None:
    """λ_t the method's step uses now (VAA's curriculum), None for a method without one."""
    dro = getattr(method, "dro", None)
    if dro is None or "perturbed" not in _stats(method):
        return None
    from vaa.methods.vaa import lambda_at
    return lambda_at(module.global_step, module.total_steps, dro.lambda_max, dro.lambda_schedule)


def _clock(warmup: int, steps: int, cuda: bool):
    from lightning.pytorch.callbacks import Callback

    def now() -> float:
        if cuda:
            torch.cuda.synchronize()
        return time.perf_counter()

    class Clock(Callback):
        """Stamps the start of each timed step and the end of the last; counts decoder
        forwards and their tokens, and snapshots the method's stats, over the timed steps."""

        def __init__(self):
            self.n = 0  # steps started (not global_step: robust to any optimizer use)
            self.stamps: list[float] = []
            self.faults: list[int] = []  # the process's minor page faults at each stamp
            self.lambdas: list[float] = []
            self.forwards = self.tokens = 0
            self.counts = {}
            self.stats0 = self.stats1 = {}

        def count(self, _module, args, kwargs):
            self.forwards += 1
            ids = kwargs.get("input_ids", args[0] if args else None)
            if isinstance(ids, torch.Tensor):
                self.tokens += ids.numel()

        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            i, self.n = self.n, self.n + 1
            if i == warmup:
                self.stats0 = _stats(pl_module.method)
                self.counts = {"forwards": self.forwards, "tokens": self.tokens}
            if warmup <= i < warmup + steps:
                lam = _lambda_of(pl_module.method, pl_module)
                if lam is not None:
                    self.lambdas.append(lam)
                self.stamps.append(now())
                self.faults.append(_minor_faults())

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            if self.n == warmup + steps:
                self.stamps.append(now())
                self.faults.append(_minor_faults())
                self.stats1 = _stats(pl_module.method)
                self.counts = {k: getattr(self, k) - v for k, v in self.counts.items()}

    return Clock()


def _minor_faults() -> int:
    """Minor page faults of this process so far (pages the OS had to map in; 0 where
    ``resource`` is missing)."""
    try:
        import resource
    except ImportError:
        return 0
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt


def run_method(name: str, cfg, model0, examples, tokenizer, *, batch_size: int, warmup: int,
               steps: int, seed: int, device: str, root: Path, source, template: str = "compact",
               max_length: int = 256, stretch=None) -> dict:
    """One training run of ``name`` from ``model0``'s weights; the timed steps' figures."""
    import lightning as L
    from hydra.utils import instantiate
    from omegaconf import OmegaConf

    from vaa.config.schema import AlignConfig
    from vaa.data.sources import extra_examples
    from vaa.training.module import AlignModule

    total = warmup + steps
    cuda = device == "cuda"
    node = cfg.ft_defense if name in defenses() else cfg.method
    if "harmful_batch_size" in node:  # the same batch size for every pass (Booster's upstream 10)
        node = OmegaConf.merge(node, {"harmful_batch_size": None})
    method = instantiate(node)
    groups = fixed_groups(len(examples), seed) if getattr(method, "requires_groups", False) else None
    extra = extra_examples(source, cfg.extra_data, method.requires)
    if stretch is not None:  # the real model: every stream's rows as long as the main rows
        extra = {k: stretch(v) for k, v in extra.items()}
    dm = method.make_datamodule(examples, tokenizer, groups=groups, extra=extra, batch_size=batch_size,
                                seed=seed, template=template, max_length=max_length,
                                max_prompt_length=512)
    recipe = OmegaConf.structured(AlignConfig(lr=1e-4, batch_size=batch_size))
    model = copy.deepcopy(model0)
    model.train()
    module = AlignModule(model, method, recipe, total)
    clock = _clock(warmup, steps, cuda)
    hook = model.get_decoder().register_forward_pre_hook(clock.count, with_kwargs=True)
    trainer = L.Trainer(accelerator=device, devices=1, max_steps=total, max_epochs=-1,
                        logger=False, callbacks=[clock], enable_checkpointing=False,
                        enable_model_summary=False, enable_progress_bar=False,
                        num_sanity_val_steps=0, default_root_dir=str(root))
    if cuda:
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    try:
        with contextlib.redirect_stdout(sys.stderr):  # keep stdout for the report line
            trainer.fit(module, datamodule=dm)
    finally:
        hook.remove()
    if len(clock.stamps) != steps + 1:
        raise RuntimeError(f"method={name}: the run stopped early "
                           f"({clock.n} of {total} steps started)")
    durations = [b - a for a, b in zip(clock.stamps, clock.stamps[1:])]
    out = {"step_s": sum(durations) / len(durations),
           "page_faults_per_step": (clock.faults[-1] - clock.faults[0]) / steps,
           "forwards_per_step": clock.counts["forwards"] / steps,
           "tokens_per_pass": clock.counts["tokens"] / max(1, clock.counts["forwards"]),
           "extra_state_bytes": persistent_state_bytes(method, model),
           "declared_passes": float(getattr(method, "passes_per_step", 1))}
    s0, s1 = clock.stats0, clock.stats1
    d_steps = s1.get("steps", 0) - s0.get("steps", 0)
    if d_steps > 0 and "passes" in s1:
        out["realised_passes"] = (s1["passes"] - s0.get("passes", 0)) / d_steps
    if d_steps > 0 and "perturbed" in s1:
        out["perturbed_fraction"] = (s1["perturbed"] - s0.get("perturbed", 0)) / d_steps
    if clock.lambdas:
        out["mean_lambda"] = sum(clock.lambdas) / len(clock.lambdas)
    if cuda:
        out["peak_mem_bytes"] = torch.cuda.max_memory_allocated()
    del trainer, module, model, method, dm
    return out


# --------------------------------------------------------------------------------------------
# the benchmark
# --------------------------------------------------------------------------------------------
def main(argv: list[str] | None = None) -> dict:
    p = base_parser(__doc__.splitlines()[0])
    p.add_argument("--methods", default=None,
                   help="comma-separated subset of conf/method (default: all; sft always runs)")
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto",
                   help="auto: cuda when available")
    p.add_argument("--model", default=None,
                   help="a real model instead of the tiny one: smollm2_135m, a save_pretrained "
                        "folder or a .gguf file (benchmarks/real_model.py); --hidden/--layers "
                        "are then ignored")
    p.add_argument("--seq-len", type=int, default=128,
                   help="with --model: tokens per row (every batch is batch x seq-len)")
    p.add_argument("--host-heap", choices=POLICIES, default="system",
                   help="trainer.host_heap for the whole run (vaa/training/host_memory.py; CPU "
                        "only): system = glibc as is, keep = no freed heap handed back")
    p.add_argument("--gemm", type=int, default=None,
                   help="side of the square fp32 GEMM that measures the matmul peak "
                        "(default 2048; 256 with --quick)")
    size_options(p, hidden=(32, 256), layers=(1, 4), batch_size=(4, 8), steps=(4, 40),
                 warmup=(1, 5), reps=(1, 3))
    return run_main(p, run, argv)


def run(a) -> dict:
    hidden, layers, batch_size = a.hidden, a.layers, a.batch_size
    steps, warmup, reps = a.steps, a.warmup, a.reps
    device = ("cuda" if torch.cuda.is_available() else "cpu") if a.device == "auto" else a.device
    methods = registered_methods()
    if a.methods:
        wanted = [m.strip() for m in a.methods.split(",") if m.strip()]
        unknown = sorted(set(wanted) - set(methods))
        if unknown:
            raise SystemExit(f"unknown method(s) {unknown}; registered: {methods}")
        methods = [m for m in methods if m == "sft" or m in wanted]
    if "sft" not in methods:
        raise SystemExit("conf/method/sft.yaml is missing: SFT is the reference of step_cost")

    t0 = time.perf_counter()
    heap = host_memory.configure({"host_heap": a.host_heap, "accelerator": device})
    cfgs = compose_method_configs(methods)
    with tempfile.TemporaryDirectory(prefix="vaa-bench-") as tmp:
        root = Path(tmp)
        source = make_world(root / "world")
        examples = source.examples("beavertails", "align")
        kw = dict(batch_size=batch_size, warmup=warmup, steps=steps, seed=a.seed, device=device,
                  root=root, source=source)
        if a.model:
            model0, tokenizer, what = load_real_model(a.model)
            hidden, layers = model0.config.hidden_size, model0.config.num_hidden_layers
            n_rows = max(64, 4 * batch_size)

            def stretch(rows):
                return long_examples(rows, tokenizer, a.seq_len, min(n_rows, max(len(rows), 1)))
            examples = stretch(examples)
            kw.update(template="alpaca", max_length=a.seq_len, stretch=stretch)
        else:
            tokenizer = world_tokenizer(source)
            model0, what = tiny_model(tokenizer, hidden, layers, seed=a.seed), "tiny"
        gemm_n = a.gemm or (256 if a.quick else 2048)
        res: dict[str, list[dict]] = {m: [] for m in methods}
        gemm: list[float] = []
        for rep in range(reps):  # methods in an order rotated per repetition
            k = rep % len(methods)
            for m in methods[k:] + methods[:k]:
                gc.collect()
                res[m].append(run_method(m, cfgs[m], model0, examples, tokenizer, **kw))
                print(f"step_cost: repetition {rep + 1}/{reps} {m}: "
                      f"{1e3 * res[m][-1]['step_s']:.0f} ms/step", file=sys.stderr, flush=True)
                if m == "sft":  # the GEMM right after SFT's run: the load it ran under
                    gemm.append(matmul_gflops(gemm_n, device=device))
                    print(f"step_cost: repetition {rep + 1}/{reps} GEMM {gemm[-1]:.1f} GFLOP/s",
                          file=sys.stderr, flush=True)
        response = _response_tokens(examples, tokenizer, kw, batch_size) if a.model else None

    step_s = {m: median([r["step_s"] for r in res[m]]) for m in methods}
    last = {m: res[m][-1] for m in methods}  # deterministic per run (seeded): any rep will do
    run_ratios = {m: [r["step_s"] / s["step_s"] for r, s in zip(res[m], res["sft"])]
                  for m in methods}
    figures: dict[str, Any] = {
        "ratio_vs_sft": {m: median(run_ratios[m]) for m in methods},
        "ratio_range": {m: [min(run_ratios[m]), max(run_ratios[m])] for m in methods},
        "passes": {m: last[m]["declared_passes"] for m in methods},
        "realised_passes": {m: last[m].get("realised_passes", last[m]["forwards_per_step"])
                            for m in methods},
        "step_ms": {m: 1e3 * step_s[m] for m in methods},
        "run_ratios": run_ratios,
        "forwards_per_step": {m: last[m]["forwards_per_step"] for m in methods},
        "tokens_per_pass": {m: last[m]["tokens_per_pass"] for m in methods},
        "perturbed_fraction": {m: last[m]["perturbed_fraction"] for m in methods
                               if "perturbed_fraction" in last[m]},
        "mean_lambda": {m: last[m]["mean_lambda"] for m in methods if "mean_lambda" in last[m]},
        "extra_state_mb": {m: last[m]["extra_state_bytes"] / (1 << 20) for m in methods},
        "page_faults_per_step": {m: median([r["page_faults_per_step"] for r in res[m]]) for m in methods},
    }
    if device == "cuda":
        figures["peak_mem_mb"] = {m: median([r["peak_mem_bytes"] for r in res[m]]) / (1 << 20)
                                  for m in methods}
    figures["peak_rss_mb"] = peak_rss_mb()
    if "vaa" in methods and "mean_lambda" in last["vaa"]:
        target = TARGET_SLACK * (1 + last["vaa"]["mean_lambda"])
        figures["vaa_target"] = target
        figures["vaa_within_target"] = bool(figures["ratio_vs_sft"]["vaa"] <= target)
        # the coin's draws over few steps differ from λ: the same slack on the passes it took
        figures["vaa_target_realised"] = TARGET_SLACK * figures["realised_passes"]["vaa"]
    figures["matmul_gflops"] = median_range(gemm)
    figures["gemm_n"] = gemm_n
    sft_tokens = last["sft"]["tokens_per_pass"] * last["sft"]["forwards_per_step"]
    flop = step_flop(model0, sft_tokens, response, a.seq_len if a.model else None)
    figures.update(params=flop["params"], sft_tokens_per_step=sft_tokens,
                   sft_gflop_per_step_6pt=flop["flop_6pt"] / 1e9)
    for key, f in (("sft_peak_fraction", "flop_6pt"), ("sft_peak_fraction_matmul", "flop_matmul")):
        if f in flop:  # per repetition: SFT's FLOP/s over the GEMM's of the same repetition
            figures[key] = median_range([flop[f] / r["step_s"] / 1e9 / g
                                         for r, g in zip(res["sft"], gemm)])
    figures["targets"] = {m: t for m, t in TARGETS.items() if m in methods}
    figures["within_target"] = {m: bool(figures["ratio_vs_sft"][m] <= t)
                                for m, t in figures["targets"].items()}
    figures.update(methods=methods, device=device, host_heap=heap, steps=steps, warmup=warmup, reps=reps,
                   batch_size=batch_size, hidden_size=hidden, layers=layers, model=what,
                   seq_len=a.seq_len if a.model else None,
                   wall_s=time.perf_counter() - t0)
    return emit(NAME, **figures)


def _response_tokens(examples, tokenizer, kw: dict, batch_size: int) -> float:
    """Mean response (loss) tokens per SFT batch of the real-model rows."""
    from vaa.data.encode import encode_train

    rows = [encode_train(tokenizer, e, kw["template"], kw["max_length"], 512) for e in examples]
    return batch_size * sum(sum(x != -100 for x in r["labels"]) for r in rows) / len(rows)


if __name__ == "__main__":
    main()
