"""No stage's model outlives its stage (issue 11 item 7): Lightning's trainer and module
reference each other, so without an explicit collection every trained model (and its
optimizer state) stayed in memory into the next stages — one more copy of the weights per
finished stage, 0.54 GB each on SmolLM2-135M. vaa.pipeline.run.release_memory runs before
each stage."""

from __future__ import annotations

import weakref

import torch

import vaa.pipeline.stages as S
from vaa.pipeline.run import run_pipeline


def test_trained_models_are_freed_before_the_next_stage(compose, tmp_path, monkeypatch):
    torch.set_num_threads(1)
    trained: list[tuple[str, weakref.ref]] = []
    alive_at_eval: dict[str, list[str]] = {}
    fit, build_eval = S.fit, S.build_eval

    def spy_fit(module, *args, **kwargs):
        trained.append((kwargs.get("stage"), weakref.ref(module.model)))
        return fit(module, *args, **kwargs)

    def spy_eval(ctx, stage, out):
        alive_at_eval[stage] = [s for s, ref in trained if ref() is not None]
        return build_eval(ctx, stage, out)

    monkeypatch.setattr(S, "fit", spy_fit)
    monkeypatch.setattr(S, "build_eval", spy_eval)
    cfg = compose(["experiment=smoke", "method=sft", "trainer.progress_bar=false",
                   "model.pretrain.max_steps=5", f"paths.cache_dir={tmp_path / 'cache'}"])
    run_pipeline(cfg, tmp_path / "run")
    assert [s for s, _ in trained] == ["base", "aligned", "finetuned"]
    assert alive_at_eval == {"base": [], "aligned": [], "finetuned": []}


def test_the_jobs_trainer_host_heap_is_in_force_in_its_training_stages(compose, tmp_path, monkeypatch):
    """run_pipeline applies trainer.host_heap before any stage: with ``trim`` every backward of
    every training stage (base pretraining, alignment, attack) hands freed heap back."""
    from vaa.training import host_memory

    torch.set_num_threads(1)
    calls = []
    fake = type("Libc", (), {"malloc_trim": staticmethod(lambda pad: calls.append(pad)),
                             "mallopt": staticmethod(lambda *a: 1)})()
    monkeypatch.setattr(host_memory, "_libc", lambda: fake)
    steps = {}
    fit = S.fit

    def spy_fit(module, *args, **kwargs):
        before = len(calls)
        out = fit(module, *args, **kwargs)
        steps[kwargs.get("stage")] = (len(calls) - before, module.global_step)
        return out

    monkeypatch.setattr(S, "fit", spy_fit)
    cfg = compose(["experiment=smoke", "method=sft", "trainer.progress_bar=false", "trainer.host_heap=trim",
                   "model.pretrain.max_steps=3", f"paths.cache_dir={tmp_path / 'cache'}"])
    try:
        run_pipeline(cfg, tmp_path / "run")
    finally:
        host_memory.configure({})
    assert set(steps) == {"base", "aligned", "finetuned"}
    assert all(n_trims == n_steps > 0 for n_trims, n_steps in steps.values()), steps  # SFT: one backward a step
