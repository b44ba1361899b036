"""Cost of each post-fine-tuning repair relative to one epoch of the harmful fine-tuning.

The pipeline builds (or takes from the cache) the world, base, SFT-aligned and fine-tuned
models for the composed config; then, in this process and interleaved per repetition
(HFT epoch, repair 1, repair 2, ..., HFT epoch, ...), it times one epoch of the attack's
fine-tuning from the aligned model (``attack.epochs=1``, the pipeline's ``train``) and each
repair on the fine-tuned model (the pipeline's restore stage, saving included, the geometry
diagnostic excluded: it is timed apart as ``diagnostic_s``). Medians over ``--reps``.

Figures: ``hft_epoch_s``; per repair ``seconds``, ``ratio_vs_hft_epoch`` (seconds ÷
hft_epoch_s) and ``passes`` (sequence passes the repair counted: forward, or forward +
backward; one HFT epoch is ``hft_epoch_passes`` = attack.n sequences, forward + backward).

    python -m benchmarks.restore_cost --threads 1            # default tiny model, task sst2
    python -m benchmarks.restore_cost --quick                # smoke world, seconds
    python -m benchmarks.restore_cost --override task=gsm8k  # any Hydra override
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path
from typing import Sequence

from benchmarks.common import base_parser, emit, interleaved, median, run_main

REPAIRS = ("curvature", "panacea", "merge", "antidote", "safelora", "q_realign")


def compose(overrides: list[str]):
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    from vaa.cli import CONF_DIR

    GlobalHydra.instance().clear()
    try:
        with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
            return hydra_compose("config", overrides=overrides)
    finally:
        GlobalHydra.instance().clear()


def run(a) -> dict:
    from hydra.utils import instantiate
    from omegaconf import open_dict

    from vaa.models.build import load_model
    from vaa.pipeline import stages as S
    from vaa.pipeline.cache import ArtifactCache, resolve_cache_dir
    from vaa.pipeline.keys import plan_keys
    from vaa.pipeline.run import run_pipeline
    from vaa.restore.base import restore_stage
    from vaa.training.module import FinetuneModule
    from vaa.data.datamodule import hft_mix

    base = ["method=sft", "trainer.progress_bar=false", f"seed={a.seed}", *a.override]
    if a.quick:
        base = ["experiment=smoke", *base]
    tmp = Path(tempfile.mkdtemp(prefix="restore_cost-"))
    cfg = compose(base)
    if a.cache_dir:
        with open_dict(cfg):
            cfg.paths.cache_dir = a.cache_dir
    run_pipeline(cfg, tmp / "prepare")  # world → finetuned, cached
    cache = ArtifactCache(resolve_cache_dir(cfg.paths.cache_dir))
    repairs = [r for r in (a.repairs.split(",") if a.repairs else REPAIRS)]

    def ctx_for(c, name):
        ctx = S.Context(cfg=c, cache=cache, keys=plan_keys(c), run_dir=tmp / name)
        ctx.dirs = {k: cache.path(v) for k, v in ctx.keys.items() if cache.has(v)}
        return ctx

    def hft_epoch() -> float:
        ctx = ctx_for(cfg, "hft")
        model, tok = load_model(ctx.dirs["aligned"])
        t = cfg.task
        rows = hft_mix(ctx.source.examples(t.dataset, t.train.file, t.train.start, t.train.stop, t.format),
                       ctx.source.examples("beavertails", "harmful"), cfg.attack.n, cfg.attack.harmful_ratio)
        recipe = cfg.attack.copy()
        with open_dict(recipe):
            recipe.epochs, recipe.max_steps = 1, -1
        t0 = time.perf_counter()
        S.train(ctx, FinetuneModule, model, tok, rows, recipe, instantiate(cfg.ft_defense), "bench_hft", cfg.seed)
        return time.perf_counter() - t0

    records: dict[str, list[dict]] = {r: [] for r in repairs}

    def repair(name):
        def fn() -> float:
            c = compose([*base, f"restore={name}"])
            ctx = ctx_for(c, name)
            out = tmp / f"out-{name}-{len(records[name])}"
            out.mkdir()
            t0 = time.perf_counter()
            rec = restore_stage(c, ctx.source, ctx.dirs, out, instantiate(c.restore, _convert_="all"),
                                train=lambda *x, **kw: S.train(ctx, *x, **kw))
            total = time.perf_counter() - t0
            diag = rec.get("geometry", {}).get("wall_s", 0.0)
            records[name].append({**rec, "diagnostic_s": diag})
            return total - diag
        return fn

    times = interleaved({"hft_epoch": hft_epoch, **{r: repair(r) for r in repairs}}, a.reps)
    hft = median(times["hft_epoch"])
    return emit("restore_cost", hft_epoch_s=round(hft, 3), hft_epoch_passes=int(cfg.attack.n),
                seconds={r: round(median(times[r]), 3) for r in repairs},
                ratio_vs_hft_epoch={r: round(median(times[r]) / hft, 3) for r in repairs},
                passes={r: records[r][-1]["passes"] for r in repairs},
                diagnostic_s={r: records[r][-1]["diagnostic_s"] for r in repairs if records[r][-1]["diagnostic_s"]},
                config=base, reps=a.reps)


def main(argv: Sequence[str] | None = None) -> dict:
    p = base_parser(__doc__.splitlines()[0])
    p.add_argument("--reps", type=int, default=1)
    p.add_argument("--repairs", default=None, help=f"comma list (default: {','.join(REPAIRS)})")
    p.add_argument("--override", action="append", default=[], help="a Hydra override (repeatable)")
    p.add_argument("--cache-dir", default=None, help="artifact cache (default: the pipeline's)")
    return run_main(p, run, argv)


if __name__ == "__main__":
    main()
