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


# ---------------------------------------------------------------------------------------------
# What changes an artifact besides its subtree (issue 12, item 1): the trainer settings a stage
# trains under and the code that builds it. Both directions: what must change a key does, and
# what must not (logging, checkpoint cadence, files no stage runs) does not.
# ---------------------------------------------------------------------------------------------
TRAINED = FROM_BASE  # the tiny base is pretrained: every trained model and its evaluation

RUNTIME_CASES = [
    (["trainer.precision=bf16-mixed"], TRAINED),
    (["trainer.precision=bf16-true"], TRAINED),
    (["trainer=ddp"], TRAINED),                       # two devices: twice the global batch
    (["trainer.devices=2", "trainer.strategy=ddp_spawn"], TRAINED),
    (["trainer.deterministic=true"], TRAINED),
    (["trainer.checkpoint_every_n_steps=5"], set()),   # resumption only
    (["trainer.progress_bar=false", "trainer.log_every_n_steps=1"], set()),
    (["trainer.host_heap=trim"], set()),                 # where freed host memory goes
    (["trainer.host_heap=keep"], set()),
]


@pytest.mark.parametrize("overrides,expected", RUNTIME_CASES, ids=[" ".join(o) for o, _ in RUNTIME_CASES])
def test_trainer_settings_that_change_an_artifact_enter_its_key(compose, default_keys, overrides, expected):
    assert changed(default_keys, plan_keys(compose(["method=sft", *overrides]))) == expected


def test_precision_variants_are_three_artifacts(compose):
    keys = [plan_keys(compose(["method=sft", f"trainer.precision={p}"]))
            for p in ("32-true", "bf16-mixed", "bf16-true")]
    for stage in TRAINED:
        assert len({k[stage] for k in keys}) == 3, stage


HF = ["method=sft", "model=hf", "model.hub_name=org/some-model"]  # pretrained: the base is not trained


@pytest.mark.parametrize("overrides,expected", [
    (["trainer.precision=bf16-mixed"], FROM_ALIGNED),                 # fp32 weights either way
    (["trainer.precision=bf16-true"], FROM_BASE),                      # the base is loaded in bf16
    (["trainer=ddp"], FROM_ALIGNED),                                   # nothing to train in base
    # on a GPU a bf16 trainer decodes in bf16: the base's evaluation changes, the base does not
    (["trainer=gpu"], FROM_ALIGNED | {"eval_base"}),
    (["trainer=gpu", "trainer.log_every_n_steps=3"], FROM_ALIGNED | {"eval_base"}),
    # a pretrained (or GGUF-converted) base reads no data: replicate seeds share it
    (["seed=1"], ALL - {"base"}),
    (["data.align=300"], ALL - {"base"}),
    (["template.train=alpaca"], FROM_ALIGNED),
])
def test_pretrained_base_keys_follow_its_dtype_and_evals_their_decoding_dtype(compose, overrides, expected):
    assert changed(plan_keys(compose(HF)), plan_keys(compose([*HF, *overrides]))) == expected


def test_device_counts():
    from vaa.pipeline.keys import n_devices
    assert [n_devices(d) for d in (1, 2, [0, 1], (3,), "2", "0,1", "auto", -1)] == \
        [1, 2, 2, 1, 2, 2, "auto", "auto"]


# --- code: an edited copy of the package ------------------------------------------------------
def _copy_package(dst, src=None):
    """A copy of the package (``src``, default the live one) under ``dst``. Tests compare copies
    of one frozen copy: other engineers edit the live files while tests run."""
    import shutil

    from vaa.pipeline.source_digest import PACKAGE_ROOT
    shutil.copytree(src or PACKAGE_ROOT, dst / "vaa", ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    return dst / "vaa"


def _edit(pkg, rel: str, function: str | None = None) -> None:
    """Append a statement to ``rel`` (a module), or insert one at the top of ``function``."""
    import ast
    f = pkg / rel
    text = f.read_text()
    if function is None:
        f.write_text(text + "\n_edited = 1\n")
        return
    node = next(n for n in ast.parse(text).body if getattr(n, "name", None) == function)
    lines = text.splitlines(keepends=True)
    first = node.body[0]
    indent = " " * first.col_offset
    lines.insert(first.lineno - 1, f"{indent}_edited = 1\n")
    f.write_text("".join(lines))


@pytest.fixture(scope="module")
def pristine(tmp_path_factory):
    return _copy_package(tmp_path_factory.mktemp("pristine"))


def keys_under(monkeypatch, pkg, cfg) -> dict:
    import vaa.pipeline.keys as K
    monkeypatch.setattr(K, "SOURCE_ROOT", pkg)
    return plan_keys(cfg)


def edited_keys(tmp_path, monkeypatch, cfg, rel, pristine, function=None) -> dict:
    pkg = _copy_package(tmp_path, pristine)
    _edit(pkg, rel, function)
    return keys_under(monkeypatch, pkg, cfg)


_COMPOSED: dict = {}


def composed(compose, overrides) -> object:
    """Compose once per override list (composing takes ~1 s; the configs are only read)."""
    key = tuple(overrides)
    if key not in _COMPOSED:
        _COMPOSED[key] = compose(list(overrides))
    return _COMPOSED[key]


RESTORE = {"restored", "eval_restored"}
CODE_CASES = [
    # (run, file edited[, function]) → keys that change
    (["method=vaccine"], "methods/vaccine.py", None, FROM_ALIGNED),
    (["method=sft"], "methods/vaccine.py", None, set()),                    # not run
    (["method=sft"], "methods/sft.py", None, TRAINED),  # pretraining and the attack use SFT too
    (["method=sft", "ft_defense=lisa"], "methods/lisa.py", None, FROM_FINETUNED),
    (["method=vaa"], "methods/dro/sampler.py", None, FROM_ALIGNED),         # imported by vaa.py
    (["method=sft"], "eval/judge_factory.py", None, EVALS),                 # judge=exact's module
    (["method=sft"], "eval/judges.py", None, EVALS),
    (["method=vaa"], "eval/judge_factory.py", None, EVALS | FROM_ALIGNED | {"estimate"}),  # judged forgetting
    (["method=sft"], "training/module.py", None, TRAINED),
    (["method=sft"], "data/encode.py", None, TRAINED | EVALS),
    (["method=sft"], "eval/generate.py", None, EVALS),
    (["method=sft", "restore=merge"], "restore/merge.py", None, RESTORE),
    (["method=sft", "restore=merge"], "restore/panacea.py", None, set()),
    (["method=sft"], "world/generator.py", None, ALL),
    (["method=sft"], "pipeline/stages.py", "build_eval", EVALS),
    (["method=sft"], "pipeline/stages.py", "build_finetuned", FROM_FINETUNED),
    (["method=sft"], "pipeline/stages.py", "train", TRAINED),
    # no artifact is built by these: settings reach keys as config values, reports read them
    (["method=sft"], "config/schema.py", None, set()),
    (["method=sft"], "report/table.py", None, set()),
    (["method=sft"], "pipeline/run.py", None, set()),
]


@pytest.mark.parametrize("run,rel,function,expected", CODE_CASES,
                         ids=[f"{' '.join(r)} {f}{':' + fn if fn else ''}" for r, f, fn, _ in CODE_CASES])
def test_edited_code_changes_exactly_the_keys_it_builds(compose, pristine, tmp_path, monkeypatch,
                                                        run, rel, function, expected):
    cfg = composed(compose, run)
    before = keys_under(monkeypatch, pristine, cfg)
    after = edited_keys(tmp_path, monkeypatch, cfg, rel, pristine, function)
    all_stages = set(before) | set(after)
    assert {s for s in all_stages if before.get(s) != after.get(s)} == expected


def test_code_digest_ignores_location_caches_and_other_files(compose, pristine, tmp_path, monkeypatch):
    cfg = compose(["method=vaa"])
    real = keys_under(monkeypatch, pristine, cfg)
    pkg = _copy_package(tmp_path, pristine)
    assert keys_under(monkeypatch, pkg, cfg) == real  # a copy elsewhere: same keys
    (pkg / "methods" / "__pycache__").mkdir(exist_ok=True)
    (pkg / "methods" / "__pycache__" / "vaa.cpython-312.pyc").write_bytes(b"\0junk")
    (pkg / "methods" / "notes.txt").write_text("not code")
    (pkg / "methods" / "vaa.py").touch()  # a newer mtime, same bytes
    assert keys_under(monkeypatch, pkg, cfg) == real


def test_code_digest_is_the_same_in_another_process(pristine):
    import subprocess
    import sys

    from vaa.pipeline.keys import EVAL_CODE, TRAIN_CODE
    from vaa.pipeline.source_digest import code_digest
    roots = tuple(sorted({*TRAIN_CODE, *EVAL_CODE, "vaa.methods.vaa"}))
    src = ("from vaa.pipeline.source_digest import code_digest; "
           f"print(code_digest({roots!r}, {str(pristine)!r}))")
    out = subprocess.run([sys.executable, "-c", src], capture_output=True, text=True, check=True,
                         env={"PYTHONHASHSEED": "123", "PATH": ""}).stdout.strip()
    assert out == code_digest(roots, str(pristine))


def test_a_missing_stage_function_is_named():
    from vaa.pipeline.source_digest import code_digest
    with pytest.raises(ValueError, match="vaa.pipeline.stages has no top-level build_nothing"):
        code_digest(("vaa.pipeline.stages:build_nothing",))


# --- the key table of issue 12's acceptance (print it: pytest -s -k key_table) ---------------
VAA_STAGES = ("world", "base", "sft_aligned", "estimate", "aligned", "finetuned",
              "eval_base", "eval_aligned", "eval_finetuned")
KEY_TABLE = [  # (change to the default run `vaa`, how it is made, keys expected to change)
    ("trainer.precision=32-true (the default)", ["trainer.precision=32-true"], None, set()),
    ("trainer.precision=bf16-mixed", ["trainer.precision=bf16-mixed"], None, set(VAA_STAGES) - {"world"}),
    ("trainer.precision=bf16-true", ["trainer.precision=bf16-true"], None, set(VAA_STAGES) - {"world"}),
    ("trainer=ddp", ["trainer=ddp"], None, set(VAA_STAGES) - {"world"}),
    ("progress_bar, log_every_n_steps, checkpoint_every_n_steps",
     ["trainer.progress_bar=false", "trainer.log_every_n_steps=1", "trainer.checkpoint_every_n_steps=9"],
     None, set()),
    ("edited method file vaa/methods/vaa.py", [], "methods/vaa.py", FROM_ALIGNED),
    ("edited judge file vaa/eval/judge_factory.py", [], "eval/judge_factory.py",
     FROM_ALIGNED | EVALS | {"estimate"}),
]


def test_key_table(compose, pristine, tmp_path, monkeypatch):
    default = keys_under(monkeypatch, pristine, composed(compose, []))
    assert set(default) == set(VAA_STAGES)
    lines = ["| change | " + " | ".join(VAA_STAGES) + " |", "|---" * (len(VAA_STAGES) + 1) + "|"]
    for i, (label, overrides, edit, expected) in enumerate(KEY_TABLE):
        cfg = composed(compose, overrides)
        if edit:
            keys = edited_keys(tmp_path / str(i), monkeypatch, cfg, edit, pristine)
        else:
            keys = keys_under(monkeypatch, pristine, cfg)
        got = {s for s in VAA_STAGES if keys[s] != default[s]}
        lines.append(f"| {label} | " + " | ".join("changes" if s in got else "-" for s in VAA_STAGES) + " |")
        assert got == expected, label
    print("\n" + "\n".join(lines))
