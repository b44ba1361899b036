"""Validate, don't build (issue 14, item 1): a bad value fails before any stage, naming its key.

Every case composes the config as ``vaa <overrides>`` would and runs vaa.config.validate on
it; each must fail in well under 15 s, with its key named in one line, and nothing may be
written to the (empty) artifact cache. The CLI cases run the real ``vaa`` and check the exit
code, the single clean message (no traceback) and that the cache stays empty.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from vaa.config.validate import find_problems, validate
from vaa.errors import ConfigError, UserError

REAL = Path(__file__).resolve().parents[2] / "shared" / "data" / "real"
REAL = REAL if REAL.is_dir() else Path("/work/shared/data/real")
RF = ["data=real_files", f"data.root={REAL}", "judge=keyword"]

# (group, overrides, the key the error must name)
BAD = [
    ("attack", ["attack.harmful_ratio=1.5"], "attack.harmful_ratio"),
    ("attack", ["attack.batch_size=0"], "attack.batch_size"),
    ("attack", ["attack.n=0"], "attack.n"),
    ("attack", ["attack.lr=-1e-5"], "attack.lr"),
    ("attack", ["attack.n=5000"], "attack.n"),  # more task rows than the world's train split
    ("attack", ["attack.harmful_ratio=1.0", "attack.n=900"], "attack.harmful_ratio"),  # pool of 200
    ("align", ["align.lr=nan"], "align.lr"),
    ("align", ["align.epochs=0"], "align.epochs"),
    ("align", ["align.weight_decay=-0.1"], "align.weight_decay"),
    ("align", ["align.n=0"], "align.n"),
    ("eval", ["eval.hs_max_new_tokens=0"], "eval.hs_max_new_tokens"),
    ("eval", ["eval.batch_size=0"], "eval.batch_size"),
    ("task", ["task.test.stop=-5"], "task.test.stop"),
    ("task", ["task.train.start=5", "task.train.stop=3"], "task.train.stop"),
    ("task", ["task.max_new_tokens=0"], "task.max_new_tokens"),
    ("task", ["task.scorer=nope"], "task.scorer"),
    ("task", ["task.train.start=5000"], "task.train.start"),
    ("model", ["model.max_length=0"], "model.max_length"),
    ("model", ["model.arch.num_attention_heads=3"], "model.arch.hidden_size"),
    ("model", ["model.pretrain.lr=0"], "model.pretrain.lr"),
    ("model", ["model.path=/nonexistent/model"], "model.path"),
    ("data", ["data.harmful_pool=0"], "attack.harmful_ratio"),
    ("data", ["data.domain_frac=2"], "data.domain_frac"),
    ("data", ["data.task_test=0"], "data.task_test"),
    ("data", ["data=real_files", "data.root=/nonexistent/real", "judge=keyword"], "data.root"),
    ("data", ["data=real_files", "judge=keyword"], "data.root"),
    ("data", [*RF, "data.hs_rows.stop=-1"], "data.hs_rows.stop"),
    ("data", [*RF, "task=alpacaeval"], "attack.n"),  # 683 AlpacaEval train rows < 900
    ("data", [*RF, "attack.harmful_ratio=0.5"], "attack.harmful_ratio"),  # data.harmful_rows: 100
    ("dro", ["dro.sampler.eta=-1"], "dro.sampler.eta"),
    ("dro", ["dro.lambda_max=1.5"], "dro.lambda_max"),
    ("dro", ["dro.sampler.clip=[0.9,0.1]"], "dro.sampler.clip"),
    ("dro", ["dro.groups_file=/nonexistent/groups.jsonl"], "dro.groups_file"),
    ("dro", ["dro.estimate.n=5000"], "dro.estimate.n"),
    ("dro", ["dro.estimate.checkpoints=0"], "dro.estimate.checkpoints"),
    ("method", ["method=vaccine", "method.rho=-1"], "method.rho"),
    ("method", ["method=booster", "method.harmful_batch_size=0"], "method.harmful_batch_size"),
    ("method", ["method=booster", "method.variant=typo"], "method.variant"),
    ("method", ["method=repnoise", "extra_data.harmful.start=500"], "extra_data.harmful.start"),
    ("ft_defense", ["ft_defense=ema", "ft_defense.beta=1.0"], "ft_defense.beta"),
    ("ft_defense", ["ft_defense=lisa", "ft_defense.align_steps=0", "ft_defense.finetune_steps=0"],
     "ft_defense.align_steps"),
    ("ft_defense", ["ft_defense=lookahead", "ft_defense.mode=imaginary"], "ft_defense.mode"),
    ("restore", ["restore=merge", "restore.alpha=1.5"], "restore.alpha"),
    ("restore", ["restore=curvature", "restore.curvature.backend=magic"], "restore.curvature.backend"),
    ("trainer", ["trainer.precision=17-odd"], "trainer.precision"),
    ("trainer", ["trainer.devices=0"], "trainer.devices"),
    ("trainer", ["trainer.host_heap=sometimes"], "trainer.host_heap"),
    ("judge", [*RF[:2], "judge=exact"], "judge.build._target_"),
    ("judge", ["judge=beaver_dam", "judge.build.path=/nonexistent/judge"], "judge.build.path"),
    ("logger", ["logger=wandb", "logger.mode=loud"], "logger.mode"),
    ("template", ["template.train=fancy"], "template.train"),
    ("seed", ["seed=-1"], "seed"),
    ("experiment", ["experiment=smoke", "attack.n=1000"], "attack.n"),
    ("protocol", ["protocol=paper", "data=real_files", "data.root=/nonexistent/real", "judge=keyword"],
     "data.root"),
]


@pytest.fixture(scope="module")
def composed(compose):
    cfg = compose([])
    assert find_problems(cfg) == []  # the default config is valid
    return compose


@pytest.mark.parametrize("group,overrides,key", BAD, ids=[" ".join(o) for _, o, _ in BAD])
def test_bad_value_names_its_key(composed, group, overrides, key, tmp_path):
    cache = Path(os.environ["VAA_CACHE_DIR"])
    t0 = time.perf_counter()
    cfg = composed(overrides)
    with pytest.raises(ConfigError) as e:
        validate(cfg)
    elapsed = time.perf_counter() - t0
    keys = [k for k, _ in e.value.problems]
    assert key in keys, f"{overrides}: {e.value}"
    line = next(m for k, m in e.value.problems if k == key)
    assert line.startswith(key + "=") or key in line, line
    assert "\n" not in line  # one line per problem
    assert elapsed < 15, f"{overrides}: {elapsed:.1f}s"
    assert not cache.exists() or not any(cache.iterdir())  # nothing was built
    assert isinstance(e.value, UserError) and isinstance(e.value, ValueError)


def test_every_group_has_a_bad_value():
    from conftest import CONF_DIR

    groups = {p.name for p in CONF_DIR.iterdir() if p.is_dir() and any(p.glob("*.yaml"))}
    assert groups - {"hydra", "paths"} <= {g for g, _, _ in BAD}
    assert len(BAD) >= 25


def test_all_problems_are_reported_together(compose):
    cfg = compose(["attack.harmful_ratio=1.5", "attack.batch_size=0", "align.lr=nan",
                   "eval.hs_max_new_tokens=0", "align.epochs=0", "task.test.stop=-5"])
    keys = [k for k, _ in find_problems(cfg)]
    assert keys == sorted(keys, key=keys.index)  # stable order
    assert {"attack.harmful_ratio", "attack.batch_size", "align.lr", "eval.hs_max_new_tokens",
            "align.epochs", "task.test.stop"} <= set(keys)


@pytest.mark.parametrize("overrides", [[], ["experiment=smoke"], ["method=sft"],
                                       ["task=alpacaeval"], ["dro.groups_file=null", "method=gdro"],
                                       ["align.epochs=0", "align.max_steps=5"],
                                       ["trainer.host_heap=keep"], ["trainer.host_heap=null"]])
def test_valid_configs_pass(compose, overrides):
    assert find_problems(compose(overrides)) == []


@pytest.mark.skipif(not REAL.is_dir(), reason="needs shared/data/real")
def test_real_files_pass(compose):
    assert find_problems(compose(RF)) == []


def test_missing_data_root_is_named_once(compose):
    problems = find_problems(compose(["data=real_files", "data.root=/nonexistent/real", "judge=keyword"]))
    assert [k for k, _ in problems] == ["data.root"], problems
    assert "data.root=/nonexistent/real: does not exist" in problems[0][1]


# ---------------------------------------------------------------------------------------------
# the CLI: one clean message, exit 1, nothing built
# ---------------------------------------------------------------------------------------------
def vaa_cli(tmp_path: Path, *args: str, **env) -> subprocess.CompletedProcess:
    e = {**os.environ, "VAA_CACHE_DIR": str(tmp_path / "cache"), "OMP_NUM_THREADS": "1", **env}
    e.pop("HYDRA_FULL_ERROR", None) if "HYDRA_FULL_ERROR" not in env else None
    return subprocess.run([sys.executable, "-m", "vaa", *args], cwd=tmp_path, env=e,
                          capture_output=True, text=True, timeout=300)


def test_cli_reports_every_bad_value_at_once_and_builds_nothing(tmp_path):
    bad = ["attack.harmful_ratio=1.5", "attack.batch_size=0", "align.lr=nan",
           "eval.hs_max_new_tokens=0", "align.epochs=0", "task.test.stop=-5"]
    r = vaa_cli(tmp_path, "experiment=smoke", *bad)
    assert r.returncode == 1, r.stderr
    for o in bad:
        assert o.split("=")[0] in r.stderr, r.stderr
    assert "invalid config: 6 problems" in r.stderr, r.stderr
    assert "Traceback" not in r.stderr and "HYDRA_FULL_ERROR" not in r.stderr, r.stderr
    assert r.stderr.count("attack.harmful_ratio=1.5") == 1, r.stderr  # printed once
    assert not (tmp_path / "cache").exists() or not any((tmp_path / "cache").iterdir())


def test_cli_full_error_shows_the_traceback(tmp_path):
    r = vaa_cli(tmp_path, "attack.batch_size=0", HYDRA_FULL_ERROR="1")
    assert r.returncode == 1
    assert "Traceback" in r.stderr and "ConfigError" in r.stderr and "attack.batch_size=0" in r.stderr


def test_cli_missing_data_root_is_one_line(tmp_path):
    r = vaa_cli(tmp_path, "data=real_files", "data.root=/nonexistent/real", "judge=keyword")
    assert r.returncode == 1
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert lines == ["invalid config: 1 problem (nothing was built):",
                     "  data.root=/nonexistent/real: does not exist; point data.root at the folder of "
                     "the data files (e.g. shared/data/real)"], r.stderr
    assert "sweep" not in r.stderr and "Traceback" not in r.stderr
    failed = list((tmp_path / "outputs").rglob("failed.json"))
    assert len(failed) == 1
    rec = json.loads(failed[0].read_text())
    assert rec["user_error"] and "data.root=/nonexistent/real: does not exist" in rec["error"]


def test_sweep_records_the_message_in_each_failed_json_and_goes_on(tmp_path):
    r = vaa_cli(tmp_path, "-m", "experiment=smoke", "attack.harmful_ratio=1.5,2.0")
    assert r.returncode == 1
    records = sorted((tmp_path / "outputs").rglob("failed.json"))
    assert len(records) == 2  # the second job ran after the first failed
    for rec, ratio in zip((json.loads(p.read_text()) for p in records), ("1.5", "2.0")):
        assert rec["error"].splitlines()[1].strip().startswith(f"attack.harmful_ratio={ratio}: must be in [0, 1]")
    assert "Traceback" not in r.stderr


def test_unexpected_error_keeps_its_traceback_printed_once(tmp_path):
    r = vaa_cli(tmp_path, "experiment=smoke", "paths.cache_dir=/proc/vaa-cache")  # mkdir fails: not a UserError
    assert r.returncode == 1
    assert r.stderr.count("in run_job") == 1, r.stderr  # the stack is printed once
    rec = json.loads(next((tmp_path / "outputs").rglob("failed.json")).read_text())
    assert rec["user_error"] is False and "Traceback" in rec["traceback"]


# slow: in one fresh-clone CI run on a loaded machine the interrupted process exited 0 with an
# empty stderr (it passes standalone, ~11 s); kept out of the default run until that is explained
@pytest.mark.slow
def test_ctrl_c_exits_130_names_the_stage_and_leaves_a_record(tmp_path):
    cache = tmp_path / "cache"
    env = {**os.environ, "VAA_CACHE_DIR": str(cache), "OMP_NUM_THREADS": "1"}
    p = subprocess.Popen([sys.executable, "-m", "vaa", "experiment=smoke"], cwd=tmp_path, env=env,
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    deadline = time.time() + 600
    while time.time() < deadline and p.poll() is None:  # wait until a stage is being built
        if cache.is_dir() and any(c.name.startswith((".tmp-", ".work-")) for c in cache.iterdir()):
            break
        time.sleep(0.2)
    assert p.poll() is None, p.communicate()
    time.sleep(1.0)
    os.killpg(p.pid, signal.SIGINT)  # what Ctrl-C in a terminal does
    out, err = p.communicate(timeout=300)
    assert p.returncode == 130, err
    assert "vaa: interrupted during stage" in err, err
    rec = json.loads(next((tmp_path / "outputs").rglob("interrupted.json")).read_text())
    assert rec["status"] == "interrupted" and rec["stage"] in ("world", "base", "aligned", "finetuned",
                                                                 "sft_aligned", "estimate"), rec
    assert f"stage {rec['stage']!r}" in err


# ---------------------------------------------------------------------------------------------
# precision, sharding and optimizer guards, before any stage (issue 13; vaa/config/precision_rules.py)
# ---------------------------------------------------------------------------------------------
def keys_of(cfg) -> list[str]:
    return [k for k, _ in find_problems(cfg)]


@pytest.mark.parametrize("method", ["sft", "vaa", "booster", "vaccine", "repnoise", "gdro", "none"])
@pytest.mark.parametrize("precision", ["16-mixed", "16"])
def test_fp16_mixed_is_refused_for_every_method(compose, method, precision):
    problems = dict(find_problems(compose([f"method={method}", f"trainer.precision={precision}"])))
    assert "trainer.precision" in problems
    assert "bf16-mixed" in problems["trainer.precision"] and "\n" not in problems["trainer.precision"]


def test_bf16_and_fp32_precisions_pass(compose):
    for p in ("bf16-mixed", "bf16-true", "32-true"):
        assert keys_of(compose(["method=sft", f"trainer.precision={p}"])) == []


FSDP_CASES = [["method=booster"], ["method=vaccine"], ["method=repnoise"], ["method=gdro"],
              ["method=vaa", "ft_defense=ema"], ["method=vaa", "ft_defense=lisa"],
              ["method=sft", "restore=panacea"]]


@pytest.mark.parametrize("overrides", FSDP_CASES, ids=[" ".join(o) for o in FSDP_CASES])
def test_fsdp_is_refused_for_a_class_that_is_not_fsdp_safe(compose, overrides):
    from hydra.utils import get_class

    cfg = compose(["trainer=fsdp", *overrides])
    group, name = overrides[-1].split("=")
    assert not getattr(get_class(cfg[group]._target_), "fsdp_safe", False)
    lines = [m for k, m in find_problems(cfg) if k == "trainer.strategy"]
    assert len(lines) == 1 and f"{group}={name} (" in lines[0] and "trainer=ddp" in lines[0], lines


# repairs that train nothing run in the main process on the whole model: FSDP changes nothing
@pytest.mark.parametrize("overrides", [["method=sft"], ["method=vaa"], ["method=vaa", "ft_defense=lookahead"],
                                       ["method=sft", "restore=curvature"], ["method=sft", "restore=merge"]])
def test_fsdp_passes_for_fsdp_safe_classes(compose, overrides):
    assert "trainer.strategy" not in keys_of(compose(["trainer=fsdp", *overrides]))


def test_8bit_optimizers_need_bitsandbytes_and_no_fsdp(compose, monkeypatch):
    import vaa.config.precision_rules as rules

    assert rules.EIGHT_BIT == tuple(o for o in __import__("vaa.config.rules", fromlist=["x"]).OPTIMIZERS if o != "adamw")
    monkeypatch.setattr(rules, "find_spec", lambda name: None)  # bitsandbytes not installed
    problems = dict(find_problems(compose(["align.optimizer=paged_adamw_8bit", "attack.optimizer=adamw_8bit"])))
    assert 'pip install -e ".[gpu]"' in problems["align.optimizer"] and "attack.optimizer" in problems
    monkeypatch.setattr(rules, "find_spec", lambda name: object())  # installed
    assert keys_of(compose(["align.optimizer=paged_adamw_8bit"])) == []
    problems = dict(find_problems(compose(["trainer=fsdp", "method=sft", "align.optimizer=adamw_8bit"])))
    assert "FSDP" in problems["align.optimizer"]
    assert "attack.optimizer" in keys_of(compose(["attack.optimizer=sgd"]))


# Booster's α (and any class's weight_step_keys) against the resolution of the training precision
STEP_CASES = [  # overrides, refused key or None
    (["model=llama2_7b", "trainer=gpu", "method=booster_vaa", "trainer.precision=bf16-true"], "method.alpha"),
    (["model=llama2_7b", "trainer=gpu", "method=booster_vaa", "trainer.precision=bf16-mixed"], "method.alpha"),
    (["model=qwen2_5_0_5b", "trainer=gpu", "method=booster_vaa", "trainer.precision=bf16-true"], "method.alpha"),
    (["model=llama2_7b", "trainer=gpu", "method=booster_vaa", "trainer.precision=16-true"], "method.alpha"),
    (["model=llama2_7b", "trainer=gpu", "method=booster_vaa", "model.dtype=bfloat16", "trainer.precision=32-true"],
     "method.alpha"),  # bf16 weights under a 32-true trainer round the same way
    (["model=llama2_7b", "trainer=gpu", "method=vaa", "trainer.precision=bf16-true", "dro.sam.rho=0.001"], "dro.sam.rho"),
    (["model=llama2_7b", "trainer=gpu", "method=booster_vaa", "trainer.precision=32-true"], None),
    (["model=llama2_7b", "trainer=gpu", "method=booster_vaa", "trainer.precision=bf16-true", "model.lora.enabled=true"], None),
    (["model=llama2_7b", "trainer=gpu", "method=vaa", "trainer.precision=bf16-true"], None),  # 4x under: not "must"
    (["method=booster", "trainer.precision=bf16-true"], None),  # the tiny model: α 0.1 over ~1e5 weights
]


@pytest.mark.parametrize("overrides,key", STEP_CASES, ids=[" ".join(o) for o, _ in STEP_CASES])
def test_a_weight_step_that_must_round_away_is_refused(compose, overrides, key):
    problems = [(k, m) for k, m in find_problems(compose(overrides)) if k in ("method.alpha", "dro.sam.rho")]
    if key is None:
        assert problems == []
        return
    assert [k for k, _ in problems] == [key], problems
    msg = problems[0][1]
    assert "trainer.precision=32-true" in msg and "model.lora.enabled=true" in msg and "ULP" in msg
    assert ("rounds to nothing" in msg) != ("mixed" in msg.split("trainer.precision=")[1].split(" ")[0])


def test_the_bound_is_where_rounding_has_already_removed_the_step():
    """At the rule's boundary (average step = half-ULP floor / MARGIN) on weights ~ N(0, 0.02):
    in bf16-true under 5 % of the step survives along ε, and in bf16-mixed the forward's copy
    moves at cosine < 0.15 to it; so everything the rule refuses (smaller steps) is gone too.
    Booster at 7B sits 16x further below the boundary."""
    import math

    import torch

    from vaa.config.precision_rules import MARGIN, step_floor
    from vaa.methods.precision import realised_step

    avg, floor = step_floor(1e-3, 6_738_423_808, 7)
    assert avg == pytest.approx(1.218e-8, rel=1e-3) and floor == pytest.approx(2 ** -9 * 1e-2)
    assert floor / (avg * MARGIN) > 16
    torch.manual_seed(0)
    w = torch.randn(1_000_000) * 0.02
    eps = torch.randn(1_000_000)
    eps *= floor / MARGIN / eps.square().mean().sqrt()
    wb = w.bfloat16()
    norm, cos = realised_step([wb], [(wb.float() + eps).bfloat16()], [eps], "bf16-true")
    assert norm * max(cos, 0) < 0.05 * float(eps.norm())
    _, cos_mixed = realised_step([w], [w + eps], [eps], "bf16-mixed")
    assert cos_mixed < 0.15
    # and the rule's own estimate of that cosine is of the same size
    assert math.sqrt((floor / MARGIN) / (2 * floor)) == pytest.approx(cos_mixed, rel=1.0)


def test_cli_refuses_booster_in_bf16_on_7b_before_building(tmp_path):
    r = vaa_cli(tmp_path, "model=llama2_7b", "trainer=gpu", "trainer.precision=bf16-true", "method=booster_vaa")
    assert r.returncode == 1, r.stderr
    assert "method.alpha=0.001" in r.stderr and "rounds to nothing" in r.stderr and "Traceback" not in r.stderr
    assert not (tmp_path / "cache").exists() or not any((tmp_path / "cache").iterdir())


# Mistakes a new user made that failed only inside a stage (a fresh review of this round).
def test_chat_template_with_the_tiny_word_tokenizer_is_refused_before_building(compose):
    assert "template.train" in keys_of(compose(["template.train=chat"]))
    assert "template.decode" in keys_of(compose(["template.decode=chat"]))


def test_a_gpu_trainer_without_cuda_is_refused_before_building(compose):
    import torch

    if torch.cuda.is_available():
        pytest.skip("a CUDA device is visible")
    assert "trainer.accelerator" in keys_of(compose(["trainer=gpu"]))
    assert "trainer.accelerator" not in keys_of(compose(["trainer=cpu"]))


def test_curvature_modules_that_name_no_linear_layer_are_refused(compose):
    assert "restore.modules" in keys_of(compose(["restore=curvature", "restore.modules=[nope]"]))
    assert "restore.modules" not in keys_of(compose(["restore=curvature", "restore.modules=[q_proj,v_proj]"]))
