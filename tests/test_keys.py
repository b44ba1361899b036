"""Cache keys (pure, no training): a change to one stage's config subtree changes that
stage's key and every key downstream of it, and nothing upstream."""

from __future__ import annotations

import pytest

from vaa.pipeline.keys import plan_keys

STAGES = ("world", "base", "aligned", "finetuned", "eval_base", "eval_aligned", "eval_finetuned")
EVALS = {"eval_base", "eval_aligned", "eval_finetuned"}
ALL = set(STAGES)
FROM_BASE = ALL - {"world"}
FROM_ALIGNED = {"aligned", "finetuned", "eval_aligned", "eval_finetuned"}
FROM_FINETUNED = {"finetuned", "eval_finetuned"}

CASES = [
    # world: everything is downstream of the data
    (["data.align=300"], ALL),
    (["data.domain_frac=0.5"], ALL),
    # base model: its architecture and pretraining
    (["model.arch.hidden_size=64"], FROM_BASE),
    (["model.pretrain.max_steps=7"], FROM_BASE),
    (["model.pretrain.seed=3"], FROM_BASE),
    (["template.train=alpaca"], FROM_BASE),  # the base corpus is templated too
    # alignment
    (["align.lr=5e-4"], FROM_ALIGNED),
    (["align.epochs=3"], FROM_ALIGNED),
    (["align.n=10"], FROM_ALIGNED),
    # harmful fine-tuning
    (["attack.lr=1e-5"], FROM_FINETUNED),
    (["attack.harmful_ratio=0.2"], FROM_FINETUNED),
    (["attack.n=500"], FROM_FINETUNED),
    # the task trains the attack and is the FA test set of every evaluation
    (["task=agnews"], FROM_FINETUNED | EVALS),
    (["task=gsm8k"], FROM_FINETUNED | EVALS),
    (["task.train.stop=50"], FROM_FINETUNED),
    (["task.test.stop=50"], EVALS),
    (["task.max_new_tokens=9"], EVALS),
    # evaluation only
    (["judge=keyword"], EVALS),
    (["eval.batch_size=7"], EVALS),
    (["eval.hs_max_new_tokens=8"], EVALS),
    (["template.decode=alpaca"], EVALS),
    # the replicate seed: world and pretraining follow it by default
    (["seed=1"], ALL),
    (["seed=1", "data.seed=0", "model.pretrain.seed=0"], FROM_ALIGNED),
    # where things run and are logged changes no artifact
    (["trainer.progress_bar=false"], set()),
    (["trainer.log_every_n_steps=1"], set()),
    (["paths.cache_dir=/somewhere/else"], set()),
    (["logger=csv"], set()),
    # VAA's settings are no part of a method that does not use them
    (["method=sft", "dro=paper"], set()),
]


@pytest.fixture(scope="module")
def default_keys(compose):
    return plan_keys(compose(["method=sft"]))


def changed(a: dict, b: dict) -> set[str]:
    return {s for s in STAGES if a[s] != b[s]}


@pytest.mark.parametrize("overrides,expected", CASES, ids=[" ".join(o) for o, _ in CASES])
def test_change_invalidates_exactly_downstream(compose, default_keys, overrides, expected):
    keys = plan_keys(compose(["method=sft", *overrides]))
    assert changed(default_keys, keys) == expected


@pytest.mark.parametrize("base", [["method=sft"], ["experiment=smoke", "method=sft"],
                                  ["experiment=smoke", "task=alpacaeval", "method=sft"], []])
def test_keys_are_deterministic(compose, base):
    a, b = plan_keys(compose(base)), plan_keys(compose(base))
    assert a == b
    # the default (method=vaa) adds stage 1: the SFT model it starts from and the estimate
    assert set(a) == ALL | ({"sft_aligned", "estimate"} if not base else set())
    assert len(set(a.values())) == len(a)  # the three evaluations are distinct artifacts
    for stage, key in a.items():
        prefix = "eval-" if stage.startswith("eval_") else "aligned-" if stage == "sft_aligned" else f"{stage}-"
        assert key.startswith(prefix)


def test_pinned_seed_shares_world_and_base_across_replicates(compose):
    pin = ["data.seed=0", "model.pretrain.seed=0"]
    k0, k1 = plan_keys(compose(["seed=0", *pin])), plan_keys(compose(["seed=1", *pin]))
    assert changed(k0, k1) == FROM_ALIGNED
    assert k0 == plan_keys(compose([]))  # pinning to the default seed is the default run


def test_a_sweep_over_tasks_aligns_once(compose):
    keys = [plan_keys(compose([f"task={t}"])) for t in ("sst2", "agnews", "gsm8k", "alpacaeval")]
    assert len({k["aligned"] for k in keys}) == 1
    assert len({k["finetuned"] for k in keys}) == 4
    assert len({k["eval_aligned"] for k in keys}) == 4


def test_smoke_world_is_its_own(compose):
    assert changed(plan_keys(compose([])), plan_keys(compose(["experiment=smoke"]))) == ALL


def test_judge_settings_change_only_evaluations(compose):
    a = plan_keys(compose(["method=sft", "judge=keyword"]))
    b = plan_keys(compose(["method=sft", "judge=keyword", "judge.build.keywords=B"]))
    assert changed(a, b) == EVALS


# ---------------------------------------------------------------------------------------------
# VAA: stage 1 (an SFT alignment, then the forgetting estimate) feeds the aligned stage
# ---------------------------------------------------------------------------------------------
def diff(a: dict, b: dict) -> set[str]:
    return {s for s in set(a) | set(b) if a.get(s) != b.get(s)}


@pytest.fixture(scope="module")
def vaa_keys(compose):
    return plan_keys(compose(["method=vaa"]))


def test_vaa_reuses_the_sft_alignment(default_keys, vaa_keys):
    assert {"sft_aligned", "estimate"} <= set(vaa_keys)
    assert "estimate" not in default_keys and "sft_aligned" not in default_keys
    assert vaa_keys["sft_aligned"] == default_keys["aligned"]  # one SFT model serves both
    assert diff(default_keys, vaa_keys) == FROM_ALIGNED | {"sft_aligned", "estimate"}


@pytest.mark.parametrize("overrides,expected", [
    (["dro.sam.rho=0.1"], FROM_ALIGNED),                 # stage 2 only
    (["dro=paper"], FROM_ALIGNED),
    (["dro.estimate.lr=1e-4"], FROM_ALIGNED | {"estimate"}),  # stage 1: groups change
    (["dro.estimate.checkpoints=2"], FROM_ALIGNED | {"estimate"}),
    (["judge=keyword"], FROM_ALIGNED | EVALS | {"estimate"}),  # forgetting is judged
    (["attack.lr=1e-5"], FROM_FINETUNED),
])
def test_vaa_keys(compose, vaa_keys, overrides, expected):
    assert diff(vaa_keys, plan_keys(compose(["method=vaa", *overrides]))) == expected


def test_vaa_with_a_groups_file_skips_stage_1(compose, tmp_path, vaa_keys):
    f = tmp_path / "groups.json"
    f.write_text("[0, 1]")
    k1 = plan_keys(compose(["method=vaa", f"dro.groups_file={f}"]))
    assert "estimate" not in k1 and "sft_aligned" not in k1
    assert k1["base"] == vaa_keys["base"] and k1["aligned"] != vaa_keys["aligned"]
    f.write_text("[0, 2]")  # other groups, same path: another alignment
    k2 = plan_keys(compose(["method=vaa", f"dro.groups_file={f}"]))
    assert diff(k1, k2) == FROM_ALIGNED
    with pytest.raises(FileNotFoundError, match="dro.groups_file"):
        plan_keys(compose(["method=vaa", f"dro.groups_file={tmp_path / 'missing.jsonl'}"]))
