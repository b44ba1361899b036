"""Run the whole pipeline for one config: cached stages, metrics.json, a summary table."""

from __future__ import annotations

import gc
import json
import logging
import shutil
import time
from functools import partial
from pathlib import Path

from omegaconf import DictConfig, OmegaConf
from rich.console import Console
from rich.table import Table

from vaa.pipeline import stages as S
from vaa.pipeline.cache import ArtifactCache, resolve_cache_dir
from vaa.pipeline.entry_users import EntryUsers
from vaa.pipeline.estimate import build_estimate
from vaa.pipeline.keys import SFT_METHOD, plan_keys
from vaa.pipeline.memory import PeakMemory
from vaa.pipeline.threads import job_threads
from vaa.training import host_memory, progress
from vaa.utils import quiet_libraries

log = logging.getLogger(__name__)


def run_pipeline(cfg: DictConfig, run_dir: str | Path) -> dict:
    """One job. Its compute threads follow pipeline/threads.py (re-checked at each stage's
    start); progress lines/bars follow the trainer config (training/progress.py); each
    stage's peak memory goes into metrics.json's ``timing`` (pipeline/memory.py). Every cache
    entry the job reaches is recorded as in use until it ends (pipeline/entry_users.py:
    `vaa-cache rm` keeps it)."""
    quiet_libraries()
    progress.configure(cfg.trainer)
    host_memory.configure(cfg.trainer)
    with job_threads(cfg.trainer) as recheck_threads, \
            EntryUsers(run_dir=str(Path(run_dir).resolve())) as using:
        return _run(cfg, run_dir, recheck_threads, using)


def _run(cfg: DictConfig, run_dir: str | Path, recheck_threads, using: EntryUsers) -> dict:
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    cache = ArtifactCache(resolve_cache_dir(cfg.paths.cache_dir))
    ctx = S.Context(cfg=cfg, cache=cache, keys=plan_keys(cfg), run_dir=run_dir)
    timing: dict[str, float] = {}
    cached: dict[str, bool] = {}
    peaks: dict[str, dict[str, float]] = {"peak_rss_mb": {}, "peak_gpu_mb": {}}
    provenance = {"overrides": run_overrides(run_dir), "run_dir": str(run_dir.resolve())}  # vaa-cache ls

    def stage(name: str, build) -> None:
        recheck_threads()
        release_memory()
        t0 = time.perf_counter()
        mem = PeakMemory().start()
        try:
            using.add(cache, ctx.keys[name])  # before the lookup: `vaa-cache rm` sees it from now on
            path, built = cache.get_or_create(ctx.keys[name], build, description=name,
                                              provenance=provenance)
        except BaseException as e:  # the CLI's failed.json / interrupted.json name the stage
            if getattr(e, "vaa_stage", None) is None:
                e.vaa_stage = name
            raise
        ctx.dirs[name] = path
        mem.stop()
        for k, v in (("peak_rss_mb", mem.rss_mb), ("peak_gpu_mb", mem.gpu_mb)):
            if v is not None:
                peaks[k][name] = v
        timing[name] = round(time.perf_counter() - t0, 3)
        cached[name] = not built
        log.info("%s: %s (%s, %.1fs)", name, path, "built" if built else "cached", timing[name])

    t_start = time.perf_counter()
    # (stage, builder, evaluated?) in order; VAA's stage 1 runs when the method needs groups.
    plan = [("world", partial(S.build_world, ctx), False), ("base", partial(S.build_base, ctx), True)]
    if "estimate" in ctx.keys:
        plan += [("sft_aligned", partial(S.build_aligned, ctx, method_cfg=SFT_METHOD), False),
                 ("estimate", partial(build_estimate, ctx), False)]
    plan += [("aligned", partial(S.build_aligned, ctx), True),
             ("finetuned", partial(S.build_finetuned, ctx), True)]
    if "restored" in ctx.keys:  # restore != none: repair the fine-tuned model (vaa/restore/)
        plan.append(("restored", partial(S.build_restored, ctx), True))
    results: dict[str, dict] = {}
    for name, build, evaluated in plan:
        stage(name, build)
        if evaluated:
            results[name] = evaluate_stage(ctx, name, stage, cached[name])
    # stage 1's outputs and the method's own (VAA's sampler trajectory), beside metrics.json
    for stage_name, f in [("estimate", "groups.jsonl"), ("estimate", "forgetting.png"),
                          ("aligned", "dro_trajectory.json"), ("aligned", "dro_trajectory.png"),
                          ("restored", "restore.json"), ("restored", "geometry.json")]:
        if stage_name in ctx.dirs and (ctx.dirs[stage_name] / f).is_file():
            shutil.copy(ctx.dirs[stage_name] / f, run_dir / f)
    timing["total"] = round(time.perf_counter() - t_start, 3)
    if "restored" in results:  # the repair's cost and diagnostics (restore.json)
        results["restored"]["restore"] = json.loads((ctx.dirs["restored"] / "restore.json").read_text())
    final = results.get("restored") or results["finetuned"]  # the final model: repaired if any
    groups = None
    if "estimate" in ctx.dirs:  # the forgetting analysis of VAA's stage 1
        groups = json.loads((ctx.dirs["estimate"] / "forgetting.json").read_text())
    metrics = {
        "method": cfg.method.name, "task": cfg.task.name, "model": cfg.model.name, "seed": cfg.seed,
        "restore": cfg.restore.name if cfg.get("restore") is not None else "none",
        "ft_defense": cfg.ft_defense.name,  # vaa-report labels rows method+ft_defense+restore
        "stages": {**results, "restored": results.get("restored")},
        "harmful_score": final["harmful_score"], "finetune_accuracy": final["finetune_accuracy"],
        "timing": {**timing, **{k: v for k, v in peaks.items() if v}}, "cache_keys": ctx.keys, "groups": groups,
        "cached": cached,  # per stage: served by the cache (True) or built by this job
    }
    (run_dir / "metrics.json").write_text(json.dumps(metrics, indent=1))
    print_summary(metrics)
    return metrics


def run_overrides(run_dir: Path) -> list[str] | None:
    """The command-line overrides of this job (Hydra's), recorded in each entry it builds."""
    from hydra.core.hydra_config import HydraConfig

    if HydraConfig.initialized():
        return list(HydraConfig.get().overrides.task)
    saved = run_dir / ".hydra" / "overrides.yaml"
    return list(OmegaConf.load(saved)) if saved.is_file() else None


def release_memory() -> None:
    """Free what earlier stages left before the next one starts (issue 11 item 7). Lightning's
    trainer and module reference each other, so a trained model (and, with full fine-tuning,
    its AdamW state) stays alive after its stage until Python's cyclic collector happens to
    run: on SmolLM2-135M one more 0.54 GB copy of the weights per finished stage. Collect them,
    then hand freed heap pages back to the OS (glibc ``malloc_trim``; elsewhere a no-op)."""
    gc.collect()
    host_memory.trim_now()


def evaluate_stage(ctx, name: str, stage, cached: bool) -> dict:
    """Evaluate the model of stage ``name`` (cached like any stage) and copy its predictions
    into the run directory."""
    ev = f"eval_{name}"
    stage(ev, partial(S.build_eval, ctx, name))
    result = json.loads((ctx.dirs[ev] / "metrics.json").read_text())
    result.update(cache_key=ctx.keys[name], cached=cached)
    (ctx.run_dir / "predictions").mkdir(exist_ok=True)
    for f in ctx.dirs[ev].glob("predictions_*.jsonl"):
        shutil.copy(f, ctx.run_dir / "predictions" / f"{name}_{f.name.removeprefix('predictions_')}")
    return result


def print_summary(metrics: dict) -> None:
    table = Table(title=f"vaa: method={metrics['method']} task={metrics['task']} "
                        f"model={metrics['model']} seed={metrics['seed']}")
    for col in ("stage", "harmful score %", "fine-tune acc. %", "time s", "cache"):
        table.add_column(col, justify="right" if col != "stage" else "left")
    for name, m in metrics["stages"].items():
        if m is None:
            continue
        t = metrics["timing"].get(name, 0) + metrics["timing"].get(f"eval_{name}", 0)
        table.add_row(name, f"{m['harmful_score']:.1f}", f"{m['finetune_accuracy']:.1f}",
                      f"{t:.1f}", "hit" if m["cached"] else "built")
    Console().print(table)
    other = {k: v for k, v in metrics["timing"].items()
             if k in ("world", "sft_aligned", "estimate")}
    extra = f" (of which {', '.join(f'{k} {v:.1f}s' for k, v in other.items())})" if other else ""
    if metrics.get("groups"):
        extra += f"; vulnerable share {metrics['groups']['vulnerable_share']:.1f}%"
    print(f"total {metrics['timing']['total']:.1f}s{extra}")
