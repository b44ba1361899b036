"""Edges of the alignment methods (the files directly in vaa/methods/) that mutation testing
found unchecked (issue 15; specs/vaa.md §3, specs/baselines.md). Each test asserts what the
spec or the docstring says. This file: the methods' schema range checks and precision.py; the
others: _sam (perturb.py, grads.py), _vaa (vaa.py, gdro.py), _booster_vaccine (booster.py,
vaccine.py, hooks.py), _defenses (ema.py, lisa.py, lookahead.py), _repnoise_base (repnoise.py,
base.py, sft.py, none.py); shared toys in tests/methods_toys.py.

Measuring (mutmut 3.8, one child): in a copy of the checkout (without .venv, outputs, .git)
append to pyproject.toml

    [tool.mutmut]
    source_paths = ["vaa"]
    only_mutate = ["vaa/methods/vaa.py", "vaa/methods/booster.py", "vaa/methods/vaccine.py",
                   "vaa/methods/repnoise.py", "vaa/methods/lisa.py", "vaa/methods/ema.py",
                   "vaa/methods/lookahead.py", "vaa/methods/gdro.py", "vaa/methods/perturb.py",
                   "vaa/methods/grads.py", "vaa/methods/precision.py", "vaa/methods/hooks.py",
                   "vaa/methods/base.py", "vaa/methods/sft.py", "vaa/methods/none.py"]
    pytest_add_cli_args_test_selection = ["tests/test_baselines.py", "tests/test_vaa_method.py",
        "tests/test_precision.py", "tests/test_method_devices.py", "tests/test_perturb.py",
        "tests/test_method_none.py",   # before: the six older files; after: plus these
        "tests/test_methods_mutants.py", "tests/test_methods_mutants_sam.py",
        "tests/test_methods_mutants_vaa.py", "tests/test_methods_mutants_booster_vaccine.py",
        "tests/test_methods_mutants_defenses.py", "tests/test_methods_mutants_repnoise_base.py"]
    also_copy = ["conf", "benchmarks"]

then ``OMP_NUM_THREADS=1 mutmut run --max-children 1 "vaa.methods.perturb.*" …`` and
``mutmut results --all true`` / ``mutmut show <name>``. A full run is ~2,100 mutants, ~2-20 s
each on this shared machine, so "before" (the six older files, without this one) was measured
on grads, perturb, precision, gdro, none and sft in full and on a fixed sample of the rest
(every 3rd mutant of vaa, vaccine, booster, hooks; every 4th of repnoise, lisa, ema, lookahead;
every 2nd of base; plus the schema checks): 624/1093 killed (57.1 %) before, 1055/1093
(96.5 %) after, 38 of them equivalent, so 1055/1055 non-equivalent. The "after" run used
a copy whose selection was only the new tests: after = killed before or killed by them. Per file before → after
(killed / checked): vaa 81→109/116, perturb 115→159/175, grads 20→36/43, precision 63→113/115,
booster 57→97/99, vaccine 32→41/41, repnoise 77→135/136, lisa 33→89/90, ema 26→74/74,
lookahead 13→33/33, gdro 49→82/84, hooks 32→38/38, base 17→35/35, sft 7→9/9, none 2→5/5.
mutmut 3.8 does not mutate functions under a decorator (``@torch.no_grad()``, ``@property``):
WeightPerturbation.__enter__/_undo, stash_grads, mix_grads, sharded_norm, clip_global_,
realised_step, EMA.on_train_end; their key lines were broken by hand instead (see
``test_hand_made_mutants_in_no_grad_functions`` and the tests named in the commit message).
"""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch
from omegaconf import OmegaConf

from tests.methods_toys import params_with_grads
from vaa.config.checker import Checker
from vaa.methods import precision as prec
from vaa.methods.grads import stash_grads


def _problems(cls, **values):
    node = OmegaConf.merge(OmegaConf.structured(cls), values)
    out: list = []
    cls.check(Checker(node, "m.", out))
    return [k for k, _ in out]


def _cfg(module: str, name: str):
    import importlib

    return getattr(importlib.import_module(f"vaa.methods.{module}"), name)


# (module, class, overrides, the keys that must be reported; [] = accepted)
CHECKS = [
    ("booster", "BoosterMethodConfig", {}, []),
    ("booster", "BoosterMethodConfig", {"lam": -0.1}, ["m.lam"]),
    ("booster", "BoosterMethodConfig", {"alpha": -0.1}, ["m.alpha"]),
    ("booster", "BoosterMethodConfig", {"vaccine_rho": -0.1}, ["m.vaccine_rho"]),
    ("booster", "BoosterMethodConfig", {"lam": 0.0, "alpha": 0.0, "vaccine_rho": 0.0}, []),
    ("booster", "BoosterMethodConfig", {"harmful_batch_size": 0}, ["m.harmful_batch_size"]),
    ("booster", "BoosterMethodConfig", {"harmful_batch_size": 1}, []),
    ("booster", "BoosterMethodConfig", {"harmful_batch_size": None}, []),
    ("booster", "BoosterMethodConfig", {"variant": "vaa_sign_bug"}, []),
    ("booster", "BoosterMethodConfig", {"variant": "typo"}, ["m.variant"]),
    ("vaccine", "VaccineMethodConfig", {"rho": -1.0}, ["m.rho"]),
    ("vaccine", "VaccineMethodConfig", {"rho": 0.0}, []),
    ("ema", "EMAConfig", {}, []),
    ("ema", "EMAConfig", {"beta": 1.0}, ["m.beta"]),
    ("ema", "EMAConfig", {"beta": 0.0}, []),
    ("ema", "EMAConfig", {"beta": -0.01}, ["m.beta"]),
    ("ema", "EMAConfig", {"variant": "write_back"}, []),
    ("ema", "EMAConfig", {"variant": "typo"}, ["m.variant"]),
    ("ema", "EMAConfig", {"anchor_weight_at_end": 0.0}, ["m.anchor_weight_at_end"]),
    ("ema", "EMAConfig", {"anchor_weight_at_end": 1.0}, ["m.anchor_weight_at_end"]),
    ("ema", "EMAConfig", {"anchor_weight_at_end": 0.5}, []),
    ("lisa", "LisaConfig", {}, []),
    ("lisa", "LisaConfig", {"align_steps": 0}, []),
    ("lisa", "LisaConfig", {"finetune_steps": 0}, []),
    ("lisa", "LisaConfig", {"min_cycles": 0}, []),
    ("lisa", "LisaConfig", {"align_steps": -1}, ["m.align_steps"]),
    ("lisa", "LisaConfig", {"finetune_steps": -1}, ["m.finetune_steps"]),
    ("lisa", "LisaConfig", {"min_cycles": -1}, ["m.min_cycles"]),
    ("lisa", "LisaConfig", {"align_steps": 0, "finetune_steps": 0}, ["m.align_steps"]),
    ("lisa", "LisaConfig", {"rho": -0.5}, ["m.rho"]),
    ("lisa", "LisaConfig", {"rho": 0.0, "warmup_fraction": 0.0}, []),
    ("lisa", "LisaConfig", {"warmup_fraction": 1.0}, []),
    ("lisa", "LisaConfig", {"warmup_fraction": 1.5}, ["m.warmup_fraction"]),
    ("lisa", "LisaConfig", {"warmup_fraction": -0.1}, ["m.warmup_fraction"]),
    ("lookahead", "LookAheadConfig", {}, []),
    ("lookahead", "LookAheadConfig", {"mode": "virtual"}, []),
    ("lookahead", "LookAheadConfig", {"mode": "imaginary"}, ["m.mode"]),
    ("lookahead", "LookAheadConfig", {"preview_tokens": 0}, []),
    ("lookahead", "LookAheadConfig", {"preview_tokens": -1}, ["m.preview_tokens"]),
    ("repnoise", "RepNoiseMethodConfig", {}, []),
    ("repnoise", "RepNoiseMethodConfig", {"noise_weight": -1.0}, ["m.noise_weight"]),
    ("repnoise", "RepNoiseMethodConfig", {"ascent_weight": -1.0}, ["m.ascent_weight"]),
    ("repnoise", "RepNoiseMethodConfig", {"noise_weight": 0.0, "ascent_weight": 0.0}, []),
    ("repnoise", "RepNoiseMethodConfig", {"mask": "diff_tokens", "layer_average": "upstream"}, []),
    ("repnoise", "RepNoiseMethodConfig", {"mask": "typo"}, ["m.mask"]),
    ("repnoise", "RepNoiseMethodConfig", {"layer_average": "typo"}, ["m.layer_average"]),
]


@pytest.mark.parametrize("module,name,values,keys", CHECKS,
                         ids=[f"{c[1]}-{'-'.join(f'{k}={v}' for k, v in c[2].items()) or 'defaults'}"
                              for c in CHECKS])
def test_schema_checks_report_exactly_the_bad_keys(module, name, values, keys):
    """The range rules of each method's schema (kills the ``…Configǁcheck`` mutants: key names,
    bounds, open/closed ends)."""
    assert _problems(_cfg(module, name), **values) == keys


def test_precision_of_reads_the_trainer_and_defaults_to_32_true():
    """precision_of: no trainer → ``32-true``; else ``str(trainer.precision)``."""
    assert prec.precision_of(SimpleNamespace()) == "32-true"
    assert prec.precision_of(SimpleNamespace(_trainer=None)) == "32-true"
    assert prec.precision_of(SimpleNamespace(_trainer=SimpleNamespace(precision="bf16-mixed"))) == "bf16-mixed"


def test_check_realised_treats_a_nan_cosine_as_nothing_moved():
    """cos = NaN means nothing moved (realised_step's contract): refused, and the message shows
    cosine 0.00 (mutants setting NaN → 1.0 or leaving NaN)."""
    with pytest.raises(prec.PerturbationRoundedAway, match=r"cosine 0\.00"):
        prec.check_realised("method=x", 1.0, float("nan"), 1.0, "bf16-true", "k.rho")
    prec.check_realised("method=x", 0.0, float("nan"), 0.0, "bf16-true", "k.rho")  # nominal 0: nothing to apply


@pytest.mark.parametrize("realised,cos,nominal,ok", [
    (1.0, 0.5, 1.0, True),     # exactly at both limits: accepted (>=, not >)
    (2.0, 0.5, 3.0, False),    # along = 1.0 < 1.5: refused (realised·cos, not realised/cos)
    (1.0, 0.6, 1.5, False),    # along = 0.6 < 0.75 (cos enters the product, not max(cos, 1))
    (10.0, 0.1, 1.0, False),   # long but off-direction: cos < 0.5 refuses on its own
    (0.0, 0.0, 0.0, True),     # nominal 0: nothing to check
    (0.3, 0.9, 0.0, True),
])
def test_check_realised_needs_along_and_cosine_both_at_half(realised, cos, nominal, ok):
    """check_realised: accept iff nominal <= 0 or (realised·max(cos,0) >= 0.5·nominal and
    cos >= 0.5) (precision.py docstring)."""
    if ok:
        prec.check_realised("method=x", realised, cos, nominal, "bf16-true", "k.rho")
    else:
        with pytest.raises(prec.PerturbationRoundedAway):
            prec.check_realised("method=x", realised, cos, nominal, "bf16-true", "k.rho")


def test_check_realised_message_names_the_share_along_epsilon_and_the_knob():
    with pytest.raises(prec.PerturbationRoundedAway) as e:
        prec.check_realised("method=booster", 10.0, 0.4, 1.0, "bf16-true", "method.alpha")
    msg = str(e.value)
    assert "(400% along it; at least 50% and cosine 0.5 needed)" in msg
    assert msg.startswith("method=booster: in trainer.precision=bf16-true the perturbation of nominal norm 1 ")
    assert "applied as 10 at cosine 0.40" in msg and msg.endswith("or a larger method.alpha")
    with pytest.raises(prec.PerturbationRoundedAway, match=r"\(20% along it"):
        prec.check_realised("method=x", 0.4, 1.0, 2.0, "bf16-true", "k")


def test_compute_dtype_by_precision_prefix():
    assert prec.compute_dtype("bf16-mixed", torch.float32) == torch.bfloat16
    assert prec.compute_dtype("bf16-true", torch.float32) == torch.bfloat16
    assert prec.compute_dtype("16-mixed", torch.float32) == torch.float16
    assert prec.compute_dtype("16-true", torch.bfloat16) == torch.float16
    assert prec.compute_dtype("32-true", torch.bfloat16) == torch.bfloat16
    assert prec.compute_dtype("64-true", torch.float64) == torch.float64


class _Safe:
    fsdp_safe = True


class _Unsafe:
    pass


def test_strategy_problems_fp16_mixed_and_fsdp_for_unsafe_classes():
    classes = {"method": ("m1", _Unsafe), "ft_defense": ("d1", _Safe), "other": ("none", None)}
    fp16 = prec.strategy_problems("16-mixed", "ddp", classes)
    assert [k for k, _ in fp16] == ["trainer.precision"]
    assert fp16[0][1].startswith("fp16 mixed precision scales the loss, and every method's manual-optimisation")
    assert fp16[0][1].endswith("use trainer.precision=bf16-mixed (or 32-true)")
    assert [k for k, _ in prec.strategy_problems("16", "auto", {})] == ["trainer.precision"]
    assert prec.strategy_problems("16-true", "auto", classes) == []
    assert prec.strategy_problems("bf16-mixed", "ddp", classes) == []
    fsdp = prec.strategy_problems("bf16-mixed", "MyFSDPStrategy", classes)
    assert len(fsdp) == 1 and fsdp[0][0] == "trainer.strategy"
    assert fsdp[0][1].startswith("method=m1 (_Unsafe) is not FSDP-correct (it keeps per-parameter")
    assert fsdp[0][1].endswith("use trainer=ddp, or trainer=gpu (with LoRA for a 7B model)")
    assert prec.strategy_problems("32-true", "fsdp", {"method": ("s", _Safe)}) == []
    both = prec.strategy_problems("16-mixed", "fsdp", classes)
    assert [k for k, _ in both] == ["trainer.precision", "trainer.strategy"]


def test_check_strategy_raises_the_first_problem_with_its_value():
    from vaa.errors import UserError

    prec.check_strategy(_Safe(), "bf16-mixed", "fsdp")
    with pytest.raises(UserError, match=r"^trainer\.precision=16-mixed: fp16 mixed"):
        prec.check_strategy(_Unsafe(), "16-mixed", "fsdp")
    with pytest.raises(UserError, match=r"^trainer\.strategy=fsdp: method=_Unsafe \(_Unsafe\) is not"):
        prec.check_strategy(_Unsafe(), "32-true", "fsdp")
    named = _Unsafe()
    named.name = "booster"
    with pytest.raises(UserError, match=r"^trainer\.strategy=fsdp: method=booster \(_Unsafe\)"):
        prec.check_strategy(named, "32-true", "fsdp")


def test_schema_check_messages_say_what_the_value_means():
    def messages(module, name, **values):
        node = OmegaConf.merge(OmegaConf.structured(_cfg(module, name)), values)
        out: list = []
        _cfg(module, name).check(Checker(node, "m.", out))
        return [msg for _, msg in out]

    assert messages("booster", "BoosterMethodConfig", harmful_batch_size=0) == [
        "m.harmful_batch_size=0: must be an integer >= 1 or null (null: the alignment batch size)"]
    assert messages("ema", "EMAConfig", beta=1.0) == ["m.beta=1.0: must be in [0, 1) (the EMA decay)"]
    assert messages("lisa", "LisaConfig", align_steps=0, finetune_steps=0) == [
        "m.align_steps=0: align_steps and finetune_steps cannot both be 0"]


def test_hand_made_mutants_in_no_grad_functions():
    """mutmut 3.8 does not mutate functions under a decorator (@torch.no_grad, @property);
    these were broken by hand: a stash buffer of another shape or dtype is replaced, and a step
    that moved nothing has cosine NaN (realised_step's contract)."""
    a, b = params_with_grads()
    out = [torch.zeros(2), torch.zeros(5, dtype=torch.float64)]  # wrong shape / wrong dtype
    s = stash_grads([a, b], out=out)
    assert s[0].shape == a.grad.shape and torch.equal(s[0], a.grad)
    assert s[1].dtype == torch.float32 and torch.equal(s[1], b.grad)
    t = torch.ones(3)
    norm, cos = prec.realised_step([t], [t.clone()], [torch.ones(3)], "32-true")
    assert norm == 0.0 and math.isnan(cos)
