"""method=none (issue 11 item 3): the alignment stage is the identity. The aligned artifact is
the base artifact (same cache key, same directory), nothing trains or is written a second
time, and the attack starts from the given model."""

from __future__ import annotations

import json

import pytest
import torch

from vaa.pipeline import stages as S
from vaa.pipeline.keys import plan_keys
from vaa.pipeline.run import run_pipeline

SMOKE = ["experiment=smoke", "trainer.progress_bar=false", "model.pretrain.max_steps=5"]


def test_keys_of_none_are_the_base_keys(compose):
    none, sft = plan_keys(compose(["method=none"])), plan_keys(compose(["method=sft"]))
    assert none["aligned"] == none["base"] == sft["base"]
    assert none["eval_aligned"] == none["eval_base"]
    assert sft["aligned"] != sft["base"]
    assert none["finetuned"] != sft["finetuned"]  # the attack starts from another model
    assert "sft_aligned" not in none and "estimate" not in none


def test_none_trains_nothing_and_attacks_the_base(compose, tmp_path, monkeypatch):
    torch.set_num_threads(1)
    cfg = compose([*SMOKE, "method=none"])
    cfg.paths.cache_dir = str(tmp_path / "cache")

    def no_alignment(*args, **kwargs):
        raise AssertionError("build_aligned called for method=none")

    monkeypatch.setattr(S, "build_aligned", no_alignment)
    started = []
    orig_finetuned = S.build_finetuned

    def finetuned(ctx, out):
        started.append(ctx.dirs["aligned"])
        return orig_finetuned(ctx, out)

    monkeypatch.setattr(S, "build_finetuned", finetuned)
    metrics = run_pipeline(cfg, tmp_path / "run")
    keys = metrics["cache_keys"]
    assert keys["aligned"] == keys["base"]
    assert started and started[0].name == keys["base"]  # the attack read the base artifact
    st = metrics["stages"]
    assert st["aligned"]["harmful_score"] == st["base"]["harmful_score"]
    assert st["aligned"]["finetune_accuracy"] == st["base"]["finetune_accuracy"]
    assert metrics["cached"]["aligned"] is True  # served by the base's artifact, not built
    cache = tmp_path / "cache"
    assert not [p for p in cache.iterdir() if p.name.startswith("aligned-")]
    assert not (tmp_path / "run" / "logs" / "aligned").exists()  # no training log of alignment
    assert json.loads((tmp_path / "run" / "metrics.json").read_text())["method"] == "none"


def test_none_refuses_to_train():
    from vaa.methods.none import NoAlignment

    with pytest.raises(RuntimeError, match="trains nothing"):
        NoAlignment().training_step(None, {})
