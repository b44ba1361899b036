"""The restore stage in the pipeline, on a very small world: restore=none adds no stage and
leaves every key unchanged; each repair builds, is evaluated (stages.restored, restore.json)
and changes what it should; the stage's key follows its subtree and its inputs."""

from __future__ import annotations

import json

import pytest
import torch

from vaa.models.build import load_model
from vaa.pipeline.keys import plan_keys
from vaa.pipeline.run import run_pipeline

SMOKE = ["experiment=smoke", "method=sft", "trainer.progress_bar=false", "model.pretrain.max_steps=5"]
RESTORED = {"restored", "eval_restored"}


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


# --------------------------------------------------------------------------- keys (no training)
def test_restore_none_adds_no_stage_and_changes_no_key(compose):
    plain, none = plan_keys(compose(["method=sft"])), plan_keys(compose(["method=sft", "restore=none"]))
    assert plain == none and not RESTORED & set(none)


@pytest.mark.parametrize("restore", ["curvature", "panacea", "merge", "antidote", "safelora", "q_realign"])
def test_restore_adds_its_stage_after_the_unchanged_ones(compose, restore):
    plain = plan_keys(compose(["method=sft"]))
    keys = plan_keys(compose(["method=sft", f"restore={restore}"]))
    assert set(keys) == set(plain) | RESTORED
    assert all(keys[k] == v for k, v in plain.items())


@pytest.mark.parametrize("overrides,changed", [
    (["restore.alpha=0.25"], RESTORED),
    (["attack.lr=1e-5"], {"finetuned", "eval_finetuned"} | RESTORED),
    (["align.lr=5e-4"], {"aligned", "finetuned", "eval_aligned", "eval_finetuned"} | RESTORED),
    (["judge=keyword"], {"eval_base", "eval_aligned", "eval_finetuned", "eval_restored"}),
])
def test_restored_key_follows_its_inputs(compose, overrides, changed):
    a = plan_keys(compose(["method=sft", "restore=merge"]))
    b = plan_keys(compose(["method=sft", "restore=merge", *overrides]))
    assert {k for k in a if a[k] != b[k]} == changed


# --------------------------------------------------------------------------- pipeline
@pytest.fixture(scope="module")
def run(compose, tmp_path_factory):
    cache = tmp_path_factory.mktemp("restore_cache")

    def go(*overrides: str) -> tuple[dict, dict]:
        cfg = compose([*SMOKE, *overrides])
        cfg.paths.cache_dir = str(cache)
        run_dir = tmp_path_factory.mktemp("run")
        metrics = run_pipeline(cfg, run_dir)
        return metrics, {k: cache / v for k, v in metrics["cache_keys"].items()}
    return go


def params(path) -> dict[str, torch.Tensor]:
    return dict(load_model(path)[0].named_parameters())


def test_none_reports_the_finetuned_model(run):
    m, _ = run()
    assert m["restore"] == "none" and m["stages"]["restored"] is None
    assert m["harmful_score"] == m["stages"]["finetuned"]["harmful_score"]


@pytest.mark.parametrize("restore,extra", [
    ("merge", ["restore.alpha=0.3"]),
    ("antidote", ["restore.dense_ratio=0.25"]),
    ("safelora", ["restore.num_proj_layers=2"]),
    ("curvature", ["restore.step.outer_steps=1", "restore.step.harmful_clamp=100",
                   "restore.step.task_guard=10", "restore.geometry.top_k=2",
                   "restore.geometry.power_iters=3", "restore.curvature.iters=5"]),
    ("q_realign", ["restore.epochs=1", "restore.probe_steps=50"]),
    ("panacea", []),
])
def test_each_repair_runs_and_changes_what_it_should(run, tmp_path, restore, extra):
    m, dirs = run(f"restore={restore}", *extra)
    r = m["stages"]["restored"]
    assert m["restore"] == restore and r is not None and r["restore"]["method"] == restore
    assert m["harmful_score"] == r["harmful_score"] and m["finetune_accuracy"] == r["finetune_accuracy"]
    assert 0 <= r["harmful_score"] <= 100 and r["restore"]["wall_s"] >= 0
    ft, out, al = params(dirs["finetuned"]), params(dirs["restored"]), params(dirs["aligned"])
    changed = {n for n in out if not torch.equal(out[n], ft[n])}
    assert changed, f"{restore} left the fine-tuned model unchanged"
    if restore == "merge":
        assert all(torch.allclose(out[n], 0.7 * al[n] + 0.3 * ft[n], atol=1e-6) for n in out)
    elif restore == "antidote":
        assert changed == {n for n in out if n.endswith(("q_proj.weight", "k_proj.weight", "v_proj.weight"))}
        for n in changed:
            k = int(0.25 * out[n].shape[1])
            assert ((out[n] == 0) & (ft[n] != 0)).sum(1).eq(k).all()
    elif restore == "safelora":
        assert len(r["restore"]["projected"]) == 2 and changed == set(r["restore"]["projected"])
    elif restore == "curvature":
        assert changed <= {n for n in out if "layers" in n and n.endswith("proj.weight")}
        start, step = r["restore"]["start"], r["restore"]["steps"][0]
        assert step["eta"] > 0 and step["harmful"] > start["harmful"]  # the harmful loss rose
        geo = json.loads((dirs["restored"] / "geometry.json").read_text())
        assert -1 <= geo["loss_pearson_harmful"] <= 1 and 0 <= geo["subspace_overlap"] <= 1 + 1e-6
    elif restore == "q_realign":
        for n in changed:  # 8-bit weights: at most 256 levels per output row
            assert max(len(torch.unique(row)) for row in out[n]) <= 256
    elif restore == "panacea":
        assert r["restore"]["passes"] > 0 and changed == set(out)  # a new run from the aligned model


def test_restore_cost_benchmark_reports_ratios(capsys):
    import sys
    from pathlib import Path

    root = str(Path(__file__).resolve().parents[1])
    if root not in sys.path:  # benchmarks/ is a top-level folder, not part of the package
        sys.path.insert(0, root)
    from benchmarks import restore_cost

    restore_cost.main(["--quick", "--repairs", "merge,antidote", "--override", "model.pretrain.max_steps=5"])
    line = [x for x in capsys.readouterr().out.splitlines() if x.strip()][-1]
    rec = json.loads(line)
    assert rec["benchmark"] == "restore_cost" and rec["hft_epoch_s"] > 0
    assert set(rec["ratio_vs_hft_epoch"]) == {"merge", "antidote"}
    assert rec["passes"]["merge"] == 0 and rec["passes"]["antidote"] > 0


FAST_CURVATURE = ["restore=curvature", "restore.geometry.enabled=false", "restore.curvature.iters=3",
                  "restore.step.outer_steps=1", "restore.step.harmful_clamp=100", "restore.step.task_guard=10",
                  "restore.n_harmful=16", "restore.n_task=16", "restore.curvature.n_hvp=8", "restore.step.n_val=8"]


@pytest.mark.parametrize("extra", [
    ["restore.curvature.backend=identity"], ["restore.curvature.backend=diag_fisher"],
    ["restore.curvature.backend=kfac", "restore.curvature.damping=0.1"],
    ["restore.curvature.backend=lbfgs_ihvp"], ["restore.curvature.hvp=exact"],
    ["restore.step.objective=refusal"], ["restore.step.variant=influence"],
    ["restore.step.variant=penalised", "restore.step.lbfgs_max_iter=2"],
], ids=lambda e: " ".join(x.removeprefix("restore.") for x in e))
def test_curvature_variants_and_backends_run(run, extra):
    m, dirs = run(*FAST_CURVATURE, *extra)
    info = m["stages"]["restored"]["restore"]
    ft, out = params(dirs["finetuned"]), params(dirs["restored"])
    changed = {n for n in out if not torch.equal(out[n], ft[n])}
    assert changed and all(n.endswith("proj.weight") for n in changed)
    start, end = info["start"], info["steps"][-1]
    if "restore.step.objective=refusal" not in extra and "penalised" not in extra[0]:
        assert end["harmful"] > start["harmful"]  # the harmful loss rose
