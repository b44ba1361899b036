"""Edges of the alignment methods (the files directly in vaa/methods/) that mutation testing
found unchecked (issue 15; specs/vaa.md §3, specs/baselines.md). Each test asserts what the
spec or the docstring says (the mutants each one kills: the commit messages and the report).

Measuring (mutmut 3.8, one child): in a copy of the checkout (without .venv, outputs, .git)
append to pyproject.toml

    [tool.mutmut]
    source_paths = ["vaa"]
    only_mutate = ["vaa/methods/vaa.py", "vaa/methods/booster.py", "vaa/methods/vaccine.py",
                   "vaa/methods/repnoise.py", "vaa/methods/lisa.py", "vaa/methods/ema.py",
                   "vaa/methods/lookahead.py", "vaa/methods/gdro.py", "vaa/methods/perturb.py",
                   "vaa/methods/grads.py", "vaa/methods/precision.py", "vaa/methods/hooks.py",
                   "vaa/methods/base.py", "vaa/methods/sft.py", "vaa/methods/none.py"]
    pytest_add_cli_args_test_selection = ["tests/test_methods_mutants.py", "tests/test_baselines.py",
        "tests/test_vaa_method.py", "tests/test_precision.py", "tests/test_method_devices.py",
        "tests/test_perturb.py", "tests/test_method_none.py"]
    also_copy = ["conf", "benchmarks"]

then ``OMP_NUM_THREADS=1 mutmut run --max-children 1 "vaa.methods.perturb.*" …`` and
``mutmut results --all true`` / ``mutmut show <name>``. A full run is ~2,100 mutants, ~2-20 s
each on this shared machine, so "before" (the six older files, without this one) was measured
on grads, perturb, precision, gdro, none and sft in full and on a fixed sample of the rest
(every 3rd mutant of vaa, vaccine, booster, hooks; every 4th of repnoise, lisa, ema, lookahead;
every 2nd of base; plus the schema checks): 624/1093 killed (57.1 %) before, 1055/1093
(96.5 %) after, 38 of them equivalent, so 1055/1055 non-equivalent. Per file before → after
(killed / checked): vaa 81→109/116, perturb 115→159/175, grads 20→36/43, precision 63→113/115,
booster 57→97/99, vaccine 32→41/41, repnoise 77→135/136, lisa 33→89/90, ema 26→74/74,
lookahead 13→33/33, gdro 49→82/84, hooks 32→38/38, base 17→35/35, sft 7→9/9, none 2→5/5.
mutmut 3.8 does not mutate functions under a decorator (``@torch.no_grad()``, ``@property``):
WeightPerturbation.__enter__/_undo, stash_grads, mix_grads, sharded_norm, clip_global_,
realised_step, EMA.on_train_end; their key lines were broken by hand instead (see
``test_hand_made_mutants_in_no_grad_functions`` and the tests named in the commit message).
"""

from __future__ import annotations

import copy
import math
from types import SimpleNamespace

import pytest
import torch
from omegaconf import OmegaConf

from vaa.config.checker import Checker
from vaa.methods import precision as prec
from vaa.methods.grads import (clip_global_, global_norm, grad_norm, is_sharded, mix_grads,
                               sharded_norm, stash_grads, trainable_params)
from vaa.methods.perturb import SAMPerturber, WeightPerturbation, perturb_weights


# ------------------------------------------------------------------ config range checks --
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


# -------------------------------------------------------------------------- precision.py --
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


# ---------------------------------------------------------------------------- perturb.py --
def _params_with_grads(seed: int = 0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    ps = [torch.nn.Parameter(torch.randn(3, 4, generator=g).to(dtype)),
          torch.nn.Parameter(torch.randn(5, generator=g).to(dtype))]
    for p in ps:
        p.grad = torch.randn(p.shape, generator=g).to(dtype)
    return ps


def test_sam_perturber_dedupes_tied_parameters_once_each():
    """specs/vaa.md §3.3: ε over every trainable tensor once; a tied weight listed twice would
    be moved twice (the ``_dedupe`` mutants)."""
    a, b = _params_with_grads()
    sam = SAMPerturber([a, b, a, b, a], rho=0.4)
    assert len(sam.params) == 2 and sam.params[0] is a and sam.params[1] is b


def test_sam_perturber_starts_with_nan_stats_and_empty_buffers():
    a, b = _params_with_grads()
    sam = SAMPerturber([a, b], rho=0.4)
    for v in (sam.last_eps_norm, sam.last_grad_norm, sam.last_realised_norm, sam.last_realised_cos):
        assert isinstance(v, float) and math.isnan(v)
    assert sam.buffers == [None, None] and sam.grad_buffers == [None, None]
    assert sam.copied_numel == 0 and sam.buffer_numel == 0


def test_sam_perturber_stashes_g0_in_its_own_buffers():
    """SAMPerturber.stash_grads: ``stash_grads(self.params, out=self.grad_buffers)``."""
    a, b = _params_with_grads()
    sam = SAMPerturber([a, b], rho=0.4)
    g0 = sam.stash_grads()
    assert g0[0] is sam.grad_buffers[0] and g0[1] is sam.grad_buffers[1]
    assert torch.equal(g0[0], a.grad) and g0[0] is not a.grad


def test_sam_perturber_passes_eps_restore_direction_and_norm_to_each_step():
    """perturbed(direction, grad_norm_value) and the owner's eps / restore reach the step:
    θ ← θ + ρ·d/(‖d‖_given + eps)."""
    a, b = _params_with_grads()
    before = [a.detach().clone(), b.detach().clone()]
    d = [torch.ones_like(a), None]
    sam = SAMPerturber([a, b], rho=0.4, eps=0.5)
    with sam.perturbed(direction=d, grad_norm_value=3.0) as step:
        assert step.scale == pytest.approx(0.4 / 3.5)
        assert torch.allclose(a, before[0] + 0.4 / 3.5)
        assert torch.equal(b, before[1])  # no direction: untouched
    assert sam.last_grad_norm == 3.0 and sam.last_eps_norm == pytest.approx(0.4 * 3.0 / 3.5)
    assert torch.equal(a, before[0])
    # subtract restore: the buffers hold ε (not θ) while perturbed
    sam = SAMPerturber([a, b], rho=0.4, restore="subtract")
    with sam.perturbed():
        eps = [0.4 * p.grad / (float(global_norm([a.grad, b.grad])) + 1e-7) for p in (a, b)]
        assert torch.allclose(sam.buffers[0], eps[0]) and torch.allclose(sam.buffers[1], eps[1])


def test_perturb_weights_defaults_and_forwarded_arguments():
    """perturb_weights: ρ defaults to 0.05; ``buffers`` is filled in place; ``grad_norm_value``
    replaces the computed norm."""
    a, b = _params_with_grads()
    n = float(global_norm([a.grad, b.grad]))
    with perturb_weights([a, b]) as info:
        assert info.eps_norm == pytest.approx(0.05 * n / (n + 1e-7))
        assert info.rho == 0.05
    bufs = [None, None]
    with perturb_weights([a, b], rho=0.4, buffers=bufs, grad_norm_value=2 * n) as info:
        assert info.buffers is bufs and bufs[0] is not None and bufs[1] is not None
        assert info.grad_norm == pytest.approx(2 * n) and info.scale == pytest.approx(0.4 / (2 * n + 1e-7))
    with perturb_weights([a, b], rho=0.4, eps=1.0) as info:
        assert info.scale == pytest.approx(0.4 / (n + 1.0))


def test_restore_buffers_of_another_dtype_or_shape_are_replaced():
    """_buffer: a given buffer is reused only when shape, dtype and device all match; else a
    fresh one is allocated, so the restore stays bit-identical."""
    a, b = _params_with_grads()
    before = [a.detach().clone(), b.detach().clone()]
    bufs = [torch.zeros(3, 4, dtype=torch.bfloat16), torch.zeros(2)]
    with perturb_weights([a, b], rho=0.4, buffers=bufs):
        assert bufs[0].dtype == torch.float32 and bufs[1].shape == (5,)
    assert torch.equal(a, before[0]) and torch.equal(b, before[1])


def test_a_perturbation_can_be_entered_again_after_exit_but_not_nested():
    a, b = _params_with_grads()
    before = a.detach().clone()
    wp = perturb_weights([a, b], rho=0.4)
    with wp:
        with pytest.raises(RuntimeError, match="not re-entrant"):
            wp.__enter__()
    with wp:
        assert not torch.equal(a, before)
    assert torch.equal(a, before)


# ------------------------------------------------------------------------------ grads.py --
def test_trainable_params_skip_frozen_ones():
    m = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.Linear(2, 1))
    m[0].weight.requires_grad_(False)
    assert trainable_params(m) == [m[0].bias, m[1].weight, m[1].bias]


def test_global_norm_is_float32_over_present_tensors_and_zero_for_none():
    z = global_norm([None, None])
    assert z.dtype == torch.float32 and z.shape == () and float(z) == 0.0
    t = [torch.tensor([3.0], dtype=torch.bfloat16), None, torch.tensor([[4.0]], dtype=torch.bfloat16)]
    n = global_norm(t)
    assert n.dtype == torch.float32 and float(n) == 5.0
    a, b = _params_with_grads()
    assert float(grad_norm([a, b])) == pytest.approx(math.sqrt(float(a.grad.square().sum() + b.grad.square().sum())))


def test_stash_grads_copies_into_reusable_buffers_and_checks_out():
    a, b = _params_with_grads()
    c = torch.nn.Parameter(torch.zeros(2))  # no gradient
    out = [None, None, None]
    s = stash_grads([a, b, c], out=out)
    assert s[2] is None and out[2] is None and s[0] is out[0] and s[1] is out[1]
    assert torch.equal(s[0], a.grad) and s[0].data_ptr() != a.grad.data_ptr()
    first = out[0]
    a.grad = a.grad * 2
    s2 = stash_grads([a, b, c], out=out)
    assert s2[0] is first and torch.equal(first, a.grad)  # same buffer, new contents
    with pytest.raises(ValueError, match="out has 2 entries for 3 params"):
        stash_grads([a, b, c], out=[None, None])
    d1 = stash_grads([a])[0]  # the default: one buffer per parameter, kept
    assert stash_grads([a])[0] is d1 and torch.equal(d1, a.grad)


@pytest.mark.parametrize("lam", [0.0, 0.3, 1.0])
def test_mix_grads_handles_missing_gradients_on_either_side(lam):
    """G = (1−λ)G0 + λG1 with a missing gradient counting as zero (grads.py)."""
    p, q, r = (torch.nn.Parameter(torch.zeros(3)) for _ in range(3))
    g0p, g1p, g0q = torch.tensor([1.0, 2.0, 3.0]), torch.tensor([-1.0, 0.5, 4.0]), torch.tensor([2.0, 2.0, 2.0])
    p.grad, q.grad, r.grad = g1p.clone(), None, g1p.clone()
    mix_grads([p, q, r], [g0p.clone(), g0q.clone(), None], lam)
    assert torch.allclose(p.grad, (1 - lam) * g0p + lam * g1p)
    assert torch.allclose(q.grad, (1 - lam) * g0q)
    assert torch.allclose(r.grad, lam * g1p)
    with pytest.raises(ValueError, match="stashed has 1 entries for 2 params"):
        mix_grads([p, q], [None], lam)


def _module_with_strategy(name):
    return SimpleNamespace(_trainer=SimpleNamespace(strategy=type(name, (), {})()))


def test_is_sharded_only_for_fsdp_and_model_parallel_strategies():
    assert not is_sharded(SimpleNamespace())
    assert not is_sharded(SimpleNamespace(_trainer=None))
    assert is_sharded(_module_with_strategy("FSDPStrategy"))
    assert is_sharded(_module_with_strategy("ModelParallelStrategy"))
    assert not is_sharded(_module_with_strategy("DDPStrategy"))


@pytest.mark.parametrize("max_norm", [0.5, 100.0])
def test_clip_global_sharded_path_matches_clip_grad_norm_in_one_process(max_norm):
    """Without an initialised process group the sharded path is the plain clip:
    coefficient max_norm/(norm+1e-6), applied only when < 1 (clip_grad_norm_ semantics)."""
    a, b = _params_with_grads()
    a2, b2 = (torch.nn.Parameter(p.detach().clone()) for p in (a, b))
    a2.grad, b2.grad = a.grad.clone(), b.grad.clone()
    ref = torch.nn.utils.clip_grad_norm_([a2, b2], max_norm)
    n = clip_global_([a, b], max_norm, sharded=True)
    assert float(n) == pytest.approx(float(ref))
    assert torch.allclose(a.grad, a2.grad) and torch.allclose(b.grad, b2.grad)
    assert float(sharded_norm([a.grad, None, b.grad], True)) == pytest.approx(min(max_norm, float(ref)), rel=1e-5)


def test_weight_perturbation_defaults_and_argument_errors():
    a, b = _params_with_grads()
    wp = WeightPerturbation([a, b])
    assert wp.rho == 0.05 and wp.eps == 1e-7 and wp.restore == "copy"
    with WeightPerturbation([a, b], rho=0.0) as info:  # ρ = 0 is allowed: no move
        assert info.eps_norm == 0.0
    for bad in (-0.1, float("inf"), float("nan")):
        with pytest.raises(ValueError, match=r"rho must be finite and >= 0, got"):
            WeightPerturbation([a, b], rho=bad)
    with pytest.raises(ValueError, match=r"restore must be one of \('copy', 'subtract'\), got 'swap'"):
        WeightPerturbation([a, b], restore="swap")
    with pytest.raises(ValueError, match=r"restore must be one of \('copy', 'subtract'\), got 'swap'"):
        SAMPerturber([a, b], rho=0.1, restore="swap")
    with pytest.raises(ValueError, match="buffers has 1 entries for 2 params"):
        WeightPerturbation([a, b], buffers=[None])
    with pytest.raises(ValueError, match="direction has 1 entries for 2 params"):
        WeightPerturbation([a, b], direction=[None])


# -------------------------------------------------------------------------------- vaa.py --
class _Stream:
    """Fixed batch per group; counts the draws of each group."""

    def __init__(self, batches):
        self.batches, self.calls = batches, [0, 0]

    def next_batch(self, group):
        self.calls[group] += 1
        return dict(self.batches[group])


class _Module:
    """What VAA sees of AlignModule: SGD with lr 1, no clip, no trainer (fp32)."""

    def __init__(self, model, total_steps=10, clip=0.0):
        self.model, self.device = model, torch.device("cpu")
        self.global_step, self.total_steps = 0, total_steps
        self.recipe = SimpleNamespace(grad_clip=clip)
        self.opt = torch.optim.SGD(model.parameters(), lr=1.0)
        self.forwards = 0

    def lm_loss(self, batch):
        self.forwards += 1
        x, y = batch["x"], batch["y"]
        return torch.nn.functional.mse_loss(self.model(x), y)

    def manual_backward(self, loss):
        loss.backward()

    def all_reduce_mean(self, t):
        return t

    def optimizers(self):
        return self.opt

    def lr_schedulers(self):
        return None


def _toy_vaa(sizes=(6, 4), total_steps=10, **dro):
    from vaa.config.schema import DROConfig
    from vaa.methods.vaa import VAA

    cfg = OmegaConf.merge(OmegaConf.structured(DROConfig),
                          {"sampler": {"eta": 0.5, "clip": None}, "sam": {"rho": 0.3}}, dro)
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Tanh(), torch.nn.Linear(4, 1))
    g = torch.Generator().manual_seed(1)
    batches = [{"x": torch.randn(5, 3, generator=g), "y": torch.randn(5, 1, generator=g)} for _ in range(2)]
    method = VAA(dro=cfg, seed=0)
    module = _Module(model, total_steps)
    stream = _Stream(batches)
    method.setup(module, SimpleNamespace(stream=stream, group_sizes=lambda: list(sizes)))
    return method, module, stream, batches


def _grad_at(model, batch, shift=None):
    m = copy.deepcopy(model)
    if shift is not None:
        with torch.no_grad():
            for p, s in zip(m.parameters(), shift):
                p.add_(s)
    loss = torch.nn.functional.mse_loss(m(batch["x"]), batch["y"])
    return float(loss.detach()), torch.autograd.grad(loss, list(m.parameters()))


def _sam_eps(g, rho):
    n = math.sqrt(sum(float(t.square().sum()) for t in g))
    return [rho * t / (n + 1e-7) for t in g]


def _expected_sampler(method, group, loss):
    from vaa.methods.dro.sampler import EXP3Sampler

    s = EXP3Sampler(num_groups=2, eta=0.5, clip=None, seed=0)
    s.draw()
    s.update(group, loss)
    return s.probs


def test_vaa_bernoulli_perturbed_step_applies_the_gradient_at_theta_plus_eps():
    """vaa.md §3.5 (bernoulli, λ = 1): G = ∇L(θ + ρ·G0/(‖G0‖+1e-7)) on the sampled group's
    batch, applied at θ; the sampler sees L1; the logs carry both losses and ‖ε‖ = ρ."""
    method, module, stream, batches = _toy_vaa(lambda_max=1.0, lambda_schedule="constant")
    theta = [p.detach().clone() for p in module.model.parameters()]
    logs = method.training_step(module, None)
    k = int(logs["dro/group"])
    assert stream.calls[k] == 1 and stream.calls[1 - k] == 0 and module.forwards == 2
    l0, g0 = _grad_at(_net_at(module.model, theta), batches[k])
    l1, g1 = _grad_at(_net_at(module.model, theta), batches[k], _sam_eps(g0, 0.3))
    for p, t, g in zip(module.model.parameters(), theta, g1):
        assert torch.allclose(p, t - g, atol=1e-6)
    assert float(logs["loss"]) == pytest.approx(l0, rel=1e-6)
    assert float(logs[f"loss_clean/g{k}"]) == pytest.approx(l0, rel=1e-6)
    assert float(logs[f"loss_perturbed/g{k}"]) == pytest.approx(l1, rel=1e-6)
    assert float(logs["eps_norm"]) == pytest.approx(0.3, rel=1e-5)
    assert float(logs["eps_realised_norm"]) == pytest.approx(0.3, rel=1e-4)
    assert float(logs["eps_realised_cos"]) == pytest.approx(1.0, abs=1e-5)
    assert method.sampler.probs == pytest.approx(_expected_sampler(method, k, l1))
    assert float(logs["dro/lambda"]) == 1.0 and float(logs["dro/p_vulnerable"]) == pytest.approx(method.sampler.probs[1])
    assert float(logs["dro/perturbed_fraction"]) == 1.0 and float(logs["dro/passes"]) == 2.0
    assert method.stats == {"steps": 1, "perturbed": 1, "passes": 2}
    assert method.trajectory == [(k, method.sampler.probs[1], pytest.approx(l0, rel=1e-6),
                                  pytest.approx(l1, rel=1e-6))]


def _net_at(model, theta):
    m = copy.deepcopy(model)
    with torch.no_grad():
        for p, t in zip(m.parameters(), theta):
            p.copy_(t)
    return m


@pytest.mark.parametrize("lam", [0.25, 0.7])
def test_vaa_weighted_step_mixes_gradients_and_losses_with_lambda(lam):
    """vaa.md §3.4 ``weighted``: G = (1−λ)G0 + λG1 and L = (1−λ)L0 + λL1 (what the sampler sees)."""
    method, module, stream, batches = _toy_vaa(lambda_max=lam, lambda_schedule="constant",
                                               lambda_mixing="weighted")
    theta = [p.detach().clone() for p in module.model.parameters()]
    logs = method.training_step(module, None)
    k = int(logs["dro/group"])
    l0, g0 = _grad_at(_net_at(module.model, theta), batches[k])
    l1, g1 = _grad_at(_net_at(module.model, theta), batches[k], _sam_eps(g0, 0.3))
    for p, t, a, b in zip(module.model.parameters(), theta, g0, g1):
        assert torch.allclose(p, t - ((1 - lam) * a + lam * b), atol=1e-6)
    assert method.sampler.probs == pytest.approx(_expected_sampler(method, k, (1 - lam) * l0 + lam * l1))
    assert float(logs["loss"]) == pytest.approx(l0, rel=1e-6)
    assert method.stats == {"steps": 1, "perturbed": 1, "passes": 2}


def test_vaa_clean_step_at_lambda_zero_and_the_bernoulli_coin():
    """λ_0 = 0 (linear): a clean step G = G0, one pass, no coin drawn; then with λ ∈ (0, 1) the
    step is perturbed iff coin.random() > 1 − λ (the reference's rule)."""
    import random

    method, module, stream, batches = _toy_vaa(lambda_max=0.6, lambda_schedule="linear", total_steps=2)
    theta = [p.detach().clone() for p in module.model.parameters()]
    logs = method.training_step(module, None)
    k = int(logs["dro/group"])
    _l0, g0 = _grad_at(_net_at(module.model, theta), batches[k])
    for p, t, g in zip(module.model.parameters(), theta, g0):
        assert torch.allclose(p, t - g, atol=1e-6)
    assert module.forwards == 1 and "eps_norm" not in logs and f"loss_perturbed/g{k}" not in logs
    assert method.stats == {"steps": 1, "perturbed": 0, "passes": 1}
    assert method.trajectory[0][3] is None
    coin = random.Random("vaa-bernoulli-0")
    perturbed = 0
    for group in module.opt.param_groups:
        group["lr"] = 1e-3  # keep the weights small: ε must stay representable
    for step in range(1, 40):
        module.global_step = step
        lam = 0.6 * min(1.0, step / 2)
        expect = coin.random() > 1 - lam
        logs = method.training_step(module, None)
        perturbed += expect
        assert (f"loss_perturbed/g{int(logs['dro/group'])}" in logs) == expect
        assert float(logs["dro/lambda"]) == pytest.approx(lam)
    assert method.stats["perturbed"] == perturbed and 0 < perturbed < 39
    assert float(logs["dro/perturbed_fraction"]) == pytest.approx(perturbed / 40) and "grad_norm" in logs
    assert method.stats["passes"] == 40 + perturbed


def test_vaa_update_q_false_leaves_the_sampler_and_an_empty_group_trains_the_other():
    method, module, stream, _ = _toy_vaa(lambda_max=0.0, sampler={"update_q": False})
    for _ in range(3):
        method.training_step(module, None)
    assert method.sampler.probs == [0.5, 0.5] and method.sampler.num_updates == 0
    method, module, stream, _ = _toy_vaa(sizes=(0, 7), lambda_max=0.0)
    assert method.only_group == 1
    for _ in range(3):
        assert int(method.training_step(module, None)["dro/group"]) == 1
    assert stream.calls == [0, 3] and method.sampler.num_updates == 0
    method, module, stream, _ = _toy_vaa(sizes=(5, 0), lambda_max=0.0)
    assert method.only_group == 0 and method.sampler.group_sizes == [5, 0]


def test_vaa_full_feedback_feeds_both_groups_clean_losses():
    from vaa.methods.dro.sampler import EXP3Sampler

    method, module, stream, batches = _toy_vaa(lambda_max=0.0, sampler={"feedback": "full"})
    theta = [p.detach().clone() for p in module.model.parameters()]
    logs = method.training_step(module, None)
    k = int(logs["dro/group"])
    assert stream.calls[k] == 1 and stream.calls[1 - k] == 1
    losses = [_grad_at(_net_at(module.model, theta), b)[0] for b in batches]
    s = EXP3Sampler(num_groups=2, eta=0.5, clip=None, feedback="full", seed=0)
    s.update_full(losses)
    assert method.sampler.probs == pytest.approx(s.probs)


def test_vaa_sampler_takes_the_configured_knobs():
    method, *_ = _toy_vaa(sizes=(6, 2), sampler={"init": "empirical", "clip": [0.2, 0.7], "eta": 0.25})
    s = method.sampler
    assert s.eta == 0.25 and s.group_sizes == [6, 2] and s.probs == pytest.approx([0.75, 0.25])
    assert list(s.clip) == [0.2, 0.7] and s.feedback == "bandit" and s.seed == 0
    assert method.perturber is None and method.only_group is None


@pytest.mark.parametrize("dro,expected", [
    ({"lambda_max": 0.6, "lambda_schedule": "linear"}, 1.3),
    ({"lambda_max": 0.6, "lambda_schedule": "constant"}, 1.6),
    ({"lambda_max": 0.6, "lambda_mixing": "weighted"}, 2.0),
    ({"lambda_max": 0.0, "lambda_mixing": "weighted"}, 1.0),
])
def test_vaa_expected_passes_per_step(dro, expected):
    method, *_ = _toy_vaa(**dro)
    assert method.passes_per_step == pytest.approx(expected)


def test_vaa_rejects_an_unknown_mixing_and_schedule():
    from vaa.methods.vaa import lambda_at

    with pytest.raises(ValueError, match="dro.lambda_mixing must be bernoulli or weighted, got 'mean'"):
        _toy_vaa(lambda_mixing="mean")
    assert lambda_at(20, 10, 0.5, "linear") == 0.5  # capped at λ_max
    assert lambda_at(3, 0, 0.5, "linear") == 0.5  # total 0: no division by zero
    with pytest.raises(ValueError, match="got 'cosine'"):
        lambda_at(1, 10, 1.0, "cosine")


def test_vaa_state_round_trips_and_an_empty_state_is_ignored():
    method, module, *_ = _toy_vaa(lambda_max=0.5, lambda_schedule="constant")
    for _ in range(3):
        method.training_step(module, None)
    state = copy.deepcopy(method.state_dict())
    assert state["stats"] == method.stats and state["trajectory"] == method.trajectory
    other, *_ = _toy_vaa(lambda_max=0.5, lambda_schedule="constant")
    other.load_state_dict({})
    assert other.stats == {"steps": 0, "perturbed": 0, "passes": 0}
    other.load_state_dict(state)
    assert other.sampler.probs == method.sampler.probs and other.stats == method.stats
    assert other.trajectory == method.trajectory and other.coin.random() == method.coin.random()
    assert all(isinstance(t, tuple) for t in other.trajectory)
    # the main process after ddp_spawn: no sampler, only stats and trajectory
    from vaa.config.schema import DROConfig
    from vaa.methods.vaa import VAA

    bare = VAA(dro=OmegaConf.structured(DROConfig))
    bare.load_state_dict({k: v for k, v in state.items() if k != "trajectory"} | {"sampler": None})
    assert bare.stats == method.stats and bare.trajectory == []


def test_weight_perturbation_stats_are_nan_until_entered_and_realised_only_when_measured():
    a, b = _params_with_grads()
    wp = WeightPerturbation([a, b], rho=0.4)
    for v in (wp.realised_norm, wp.realised_cos, wp.grad_norm, wp.eps_norm, wp.scale):
        assert isinstance(v, float) and math.isnan(v)
    assert wp.num_perturbed == 0 and wp.copied_numel == 0
    with wp:
        assert wp.num_perturbed == 2 and wp.copied_numel == 17
        assert math.isnan(wp.realised_norm) and math.isnan(wp.realised_cos)  # measure=None
    with WeightPerturbation([a, b], rho=0.4, measure="32-true") as wp:
        assert wp.realised_norm == pytest.approx(0.4, rel=1e-5) and wp.realised_cos == pytest.approx(1.0, abs=1e-5)
    sam = SAMPerturber([a, b], rho=0.4)
    with sam.perturbed(measure="32-true"):
        pass
    assert sam.last_realised_norm == pytest.approx(0.4, rel=1e-5) and sam.copied_numel == 17
    assert sam.buffer_numel == 17


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


# --------------------------------------------------------------------------- repnoise.py --
def test_repnoise_align_to_pads_with_pad_zero_and_minus_100_or_truncates():
    """align_to (baselines.md §3, diff_tokens mask): pad on the right with (pad_id, attention
    0, label −100) to ``width``, or truncate; 1-D entries are dropped."""
    from vaa.methods.repnoise import align_to

    b = {"input_ids": torch.tensor([[5, 6, 7]]), "attention_mask": torch.tensor([[1, 1, 1]]),
         "labels": torch.tensor([[-100, 6, 7]]), "uid": torch.tensor([3])}
    out = align_to(b, 5, pad_id=9)
    assert sorted(out) == ["attention_mask", "input_ids", "labels"]
    assert out["input_ids"].tolist() == [[5, 6, 7, 9, 9]]
    assert out["attention_mask"].tolist() == [[1, 1, 1, 0, 0]]
    assert out["labels"].tolist() == [[-100, 6, 7, -100, -100]]
    cut = align_to(dict(b, extra=torch.tensor([[1, 2, 3]])), 2, pad_id=9)
    assert cut["input_ids"].tolist() == [[5, 6]] and cut["extra"].tolist() == [[1, 2]] and "uid" not in cut
    same = align_to(dict(b, extra=torch.tensor([[1, 2, 3]])), 3, pad_id=9)
    assert same["extra"].tolist() == [[1, 2, 3]] and same["labels"].tolist() == [[-100, 6, 7]]


# ---------------------------------------------------------------------------- booster.py --
def _toy_booster(**kw):
    from vaa.methods.booster import Booster

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Tanh(), torch.nn.Linear(4, 1))
    g = torch.Generator().manual_seed(2)
    batches = [{"x": torch.randn(5, 3, generator=g), "y": torch.randn(5, 1, generator=g)} for _ in range(2)]
    method = Booster(**kw)
    module = _Module(model)
    method.setup(module, SimpleNamespace(streams={"harmful": _Stream([batches[0]])}))
    return method, module, batches


@pytest.mark.parametrize("variant", ["upstream", "vaa_sign_bug"])
def test_booster_without_meta_term_steps_with_ga_plus_lambda_gh(variant):
    """baselines.md §4, ``meta_term: false``: G = g_a + λ·g_h (two passes; no α step)."""
    method, module, (hb, ab) = _toy_booster(lam=2.5, alpha=0.3, meta_term=False, variant=variant)
    theta = [p.detach().clone() for p in module.model.parameters()]
    logs = method.training_step(module, ab)
    lh, gh = _grad_at(_net_at(module.model, theta), hb)
    la, ga = _grad_at(_net_at(module.model, theta), ab)
    for p, t, a, h in zip(module.model.parameters(), theta, ga, gh):
        assert torch.allclose(p, t - (a + 2.5 * h), atol=1e-6)
    assert float(logs["harmful_loss"]) == pytest.approx(lh, rel=1e-6)
    assert float(logs["loss"]) == pytest.approx(la, rel=1e-6)
    gh_norm = math.sqrt(sum(float(x.square().sum()) for x in gh))
    assert float(logs["harmful_grad_norm"]) == pytest.approx(gh_norm, rel=1e-5)
    assert "harmful_loss_moved" not in logs and module.forwards == 2


def test_booster_meta_step_logs_the_moved_loss_and_its_realised_alpha_step():
    """Upstream pass 2 at θ − α·ĝ_h: the logged h is taken there, and in the measured step the
    realised α step is logged (fp32: ‖Δθ‖ = α along ε)."""
    method, module, (hb, ab) = _toy_booster(lam=1.0, alpha=0.2)
    theta = [p.detach().clone() for p in module.model.parameters()]
    logs = method.training_step(module, ab)
    _lh, gh = _grad_at(_net_at(module.model, theta), hb)
    n = math.sqrt(sum(float(x.square().sum()) for x in gh))
    lh1, _ = _grad_at(_net_at(module.model, theta), hb, [-0.2 * x / (n + 1e-7) for x in gh])
    assert float(logs["harmful_loss_moved"]) == pytest.approx(lh1, rel=1e-6)
    assert float(logs["alpha_step_realised_norm"]) == pytest.approx(0.2, rel=1e-4)
    assert float(logs["alpha_step_realised_cos"]) == pytest.approx(1.0, abs=1e-5)
    assert module.forwards == 3


def test_booster_knobs_passes_and_stream_batch_size():
    from vaa.methods.booster import Booster

    b = Booster(lam=2, alpha=1, vaccine_rho=3, harmful_batch_size=7, attn_pattern="x")
    assert (b.lam, b.alpha, b.vaccine_rho) == (2.0, 1.0, 3.0) and b.attn_pattern == "x"
    assert isinstance(b.lam, float) and isinstance(b.alpha, float) and isinstance(b.vaccine_rho, float)
    assert b.stream_batch_size("harmful", 4) == 7
    assert Booster().stream_batch_size("harmful", 4) == 4
    assert Booster().variant == "upstream" and Booster().lam == 5.0 and Booster().alpha == 0.1
    assert Booster().vaccine_rho == 2.0 and Booster().harmful_batch_size is None
    assert [Booster(meta_term=m, perturb_aware=a).passes_per_step
            for m, a in [(True, False), (False, False), (True, True), (False, True)]] == [3, 2, 4, 3]
    with pytest.raises(ValueError, match=r"method.variant must be one of \('upstream', 'vaa_sign_bug'\), got 'x'"):
        Booster(variant="x")


def test_booster_take_grads_hands_over_and_zero_fills():
    method, module, _ = _toy_booster()
    ps = method.params
    ps[0].grad = torch.ones_like(ps[0])
    g = method.take_grads()
    assert g[0] is not None and torch.equal(g[0], torch.ones_like(ps[0]))
    assert torch.equal(g[1], torch.zeros_like(ps[1])) and all(p.grad is None for p in ps)
    assert method.restore_buffers == [None] * len(ps) and method.layers is None


# ------------------------------------------------------------------- vaccine.py, hooks.py --
class _Attn(torch.nn.Module):
    def __init__(self, out="tuple"):
        super().__init__()
        self.lin, self.out = torch.nn.Linear(4, 4), out

    def forward(self, x):
        h = torch.tanh(self.lin(x))
        return (h, None) if self.out == "tuple" else [h, None] if self.out == "list" else h


class _Layer(torch.nn.Module):
    def __init__(self, out):
        super().__init__()
        self.self_attn = _Attn(out)


class _Toy(torch.nn.Module):
    """Residual stack whose blocks are found by the default ``layers.<i>.self_attn`` pattern."""

    def __init__(self, outs=("tuple", "list", "plain")):
        super().__init__()
        torch.manual_seed(0)
        self.layers = torch.nn.ModuleList(_Layer(o) for o in outs)
        self.head = torch.nn.Linear(4, 1)
        self.config = SimpleNamespace(num_hidden_layers=len(outs))

    def forward(self, x, eps=None):
        for i, layer in enumerate(self.layers):
            out = layer.self_attn(x)
            h = out if torch.is_tensor(out) else out[0]
            x = x + (h if eps is None or eps[i] is None else h + eps[i])
        return self.head(x)


def _toy_batch():
    g = torch.Generator().manual_seed(3)
    return {"x": torch.randn(2, 3, 4, generator=g), "y": torch.randn(2, 3, 1, generator=g)}


def test_vaccine_both_passes_on_tuple_list_and_plain_outputs():
    """baselines.md §2: ε_l = ρ·g_l/(‖g‖+1e-7), g_l = ∂f/∂e_l over all layers; the parameter
    gradient is ∇θ f(θ; e + ε); logs: clean loss, ‖g‖, ‖ε‖ = ρ, and the realised ε."""
    from vaa.methods.hooks import layer_modules
    from vaa.methods.vaccine import perturbed_backward

    model, batch = _Toy(), _toy_batch()
    module = _Module(model)
    layers = layer_modules(model, r"(^|\.)layers\.\d+\.self_attn$")
    # independent ε: gradients w.r.t. additive zeros on every block output
    z = [torch.zeros(2, 3, 4, requires_grad=True) for _ in layers]
    loss0 = torch.nn.functional.mse_loss(model(batch["x"], z), batch["y"])
    g = torch.autograd.grad(loss0, z)
    n = math.sqrt(sum(float(t.square().sum()) for t in g))
    eps = [0.7 * t / (n + 1e-7) for t in g]
    ref = copy.deepcopy(model)
    loss1 = torch.nn.functional.mse_loss(ref(batch["x"], eps), batch["y"])
    want = torch.autograd.grad(loss1, list(ref.parameters()))
    logs = perturbed_backward(module, batch, layers, 0.7, measure="32-true")
    for p, w in zip(model.parameters(), want):
        assert torch.allclose(p.grad, w, atol=1e-6)
    assert float(logs["loss"]) == pytest.approx(float(loss1.detach()), rel=1e-6)
    assert float(logs["loss_clean"]) == pytest.approx(float(loss0.detach()), rel=1e-6)
    assert float(logs["hidden_grad_norm"]) == pytest.approx(n, rel=1e-5)
    assert float(logs["eps_norm"]) == pytest.approx(0.7, rel=1e-5)
    assert float(logs["eps_realised_norm"]) == pytest.approx(0.7, rel=1e-4)
    assert float(logs["eps_realised_cos"]) == pytest.approx(1.0, abs=1e-5)
    model.zero_grad()
    logs = perturbed_backward(module, batch, layers, 0.7)
    assert "eps_realised_norm" not in logs and "eps_realised_cos" not in logs


def test_vaccine_refuses_a_forward_that_skips_a_matched_block_and_a_negative_rho():
    from vaa.methods.vaccine import Vaccine, hidden_perturbation

    model = _Toy()
    extra = _Attn()  # matched but never run
    with pytest.raises(RuntimeError, match="captured 3 of 4 attention outputs"):
        hidden_perturbation(_Module(model), _toy_batch(), [l.self_attn for l in model.layers] + [extra], 1.0)
    with pytest.raises(ValueError, match="method.rho must be >= 0, got -1"):
        Vaccine(rho=-1)
    v = Vaccine(rho=0)
    assert v.rho == 0.0 and v.passes_per_step == 2 and Vaccine().rho == 2.0
    v = Vaccine(rho=1, attn_pattern=r"layers\.\d+\.self_attn$")
    v.setup(SimpleNamespace(model=model), None)
    assert v.layers == [l.self_attn for l in model.layers]


def test_vaccine_training_step_steps_with_the_perturbed_gradient():
    from vaa.methods.vaccine import Vaccine

    model, batch = _Toy(), _toy_batch()
    module = _Module(model)
    v = Vaccine(rho=0.5)
    v.setup(module, None)
    ref = copy.deepcopy(model)
    from vaa.methods.vaccine import perturbed_backward

    want = perturbed_backward(_Module(ref), batch, [l.self_attn for l in ref.layers], 0.5)
    theta = [p.detach().clone() for p in model.parameters()]
    logs = v.training_step(module, batch)
    for p, t, r in zip(model.parameters(), theta, ref.parameters()):
        assert torch.allclose(p, t - r.grad, atol=1e-6)
    assert float(logs["loss"]) == pytest.approx(float(want["loss"]))
    assert float(logs["grad_norm"]) > 0 and float(logs["eps_norm"]) == pytest.approx(0.5, rel=1e-5)


def test_layer_modules_errors_name_the_pattern_and_the_layer_count():
    from vaa.methods.hooks import layer_modules, num_layers

    model = _Toy()
    assert num_layers(model) == 3 and num_layers(torch.nn.Linear(1, 1)) is None
    nested = SimpleNamespace(get_text_config=lambda: SimpleNamespace(num_hidden_layers=5))
    assert num_layers(SimpleNamespace(config=nested)) == 5
    with pytest.raises(ValueError, match=r"no module of _Toy matches 'nothing'; set the method's layer pattern"):
        layer_modules(model, "nothing")
    with pytest.raises(ValueError, match=r"'layers\\\\.0\\\\.self_attn\$' matches 1 modules \(\['layers.0.self_attn'\] …\) but "
                                         r"the model has 3 layers"):
        layer_modules(model, r"layers\.0\.self_attn$")
    model.config = None  # no config: any count is accepted
    assert len(layer_modules(model, r"layers\.0\.self_attn$")) == 1


def test_add_to_outputs_skips_none_deltas_and_counts_modules():
    from vaa.methods.hooks import AddToOutputs, CaptureOutputs

    model, batch = _Toy(), _toy_batch()
    attn = [l.self_attn for l in model.layers]
    d = [torch.full((4,), 0.5), None, torch.full((4,), -1.0)]
    with CaptureOutputs(attn) as clean:
        model(batch["x"])
    with AddToOutputs(attn, d, measure=True) as add, CaptureOutputs(attn) as cap:
        model(batch["x"])
    assert all(not m._forward_hooks for m in attn)  # hooks removed
    assert torch.allclose(cap.outputs[0], clean.outputs[0] + 0.5)
    assert isinstance(add.realised_norm, float) and sorted(add._sums) == [0, 2]
    want = math.sqrt(2 * 3 * 4 * (0.25 + 1.0))
    assert add.realised_norm == pytest.approx(want, rel=1e-5) and add.realised_cos == pytest.approx(1.0, abs=1e-5)
    with AddToOutputs(attn, [None, None, None], measure=True) as none:
        model(batch["x"])
    assert none.realised_norm == 0.0 and math.isnan(none.realised_cos)
    with pytest.raises(ValueError, match="2 deltas for 3 modules"):
        AddToOutputs(attn, d[:2])


# ------------------------------------------------------------------------------- gdro.py --
class _LM(torch.nn.Module):
    """A causal-LM stand-in: logits from embeddings, the attention mask zeroing padded rows."""

    def __init__(self, vocab=7):
        super().__init__()
        torch.manual_seed(0)
        self.emb = torch.nn.Embedding(vocab, vocab)
        self.seen_masks = []

    def forward(self, input_ids, attention_mask=None):
        self.seen_masks.append(attention_mask)
        logits = self.emb(input_ids)
        if attention_mask is not None:
            logits = logits * attention_mask.unsqueeze(-1)
        return SimpleNamespace(logits=logits)


def _gdro(**sampler):
    from vaa.config.schema import DROConfig
    from vaa.methods.gdro import GroupDRO

    dro = OmegaConf.merge(OmegaConf.structured(DROConfig), {"sampler": {"eta": 0.5, **sampler}})
    return GroupDRO(dro=dro)


def test_gdro_datamodule_counts_groups_and_passes_the_extra_streams(monkeypatch):
    import vaa.data.datamodule as dmod

    seen = {}
    monkeypatch.setattr(dmod, "SFTDataModule", lambda *a, **kw: seen.update(kw) or "dm")
    m = _gdro()
    with pytest.raises(ValueError, match=r"^method=gdro needs vulnerability groups: set dro.groups_file or "
                                         r"let the estimate stage run \(dro.groups_file=null\)$"):
        m.make_datamodule([], None, groups=None)
    assert m.make_datamodule([], None, groups=[0, 1, 1, 0, 1], extra={"harmful": 1}, batch_size=2) == "dm"
    assert m.group_sizes == [2, 3] and seen["extra"] == {"harmful": 1} and seen["groups"] == [0, 1, 1, 0, 1]
    assert seen["batch_size"] == 2


def test_gdro_step_reweights_group_losses_and_keeps_q_over_a_new_setup():
    """vaa.md §6: loss = Σ_g q_g ℓ_g with q updated first (update_q); setup again keeps q."""
    from vaa.methods.dro.reweight import GroupLossReweighter, per_sample_token_mean_ce

    m = _gdro(init="empirical")
    m.group_sizes = [1, 3]
    module = _Module(_LM())
    m.setup(module, None)
    assert m.reweighter.probs == pytest.approx([0.25, 0.75]) and m.reweighter.eta == 0.5
    assert m.state_dict()["reweighter"]["num_groups"] == 2
    batch = {"input_ids": torch.tensor([[1, 2, 3], [4, 5, 6]]), "attention_mask": torch.tensor([[1, 1, 1], [1, 1, 0]]),
             "labels": torch.tensor([[-100, 2, 3], [-100, 5, -100]]), "group": torch.tensor([0, 1])}
    ref = GroupLossReweighter(num_groups=2, eta=0.5, init="empirical", group_sizes=[1, 3])
    lm = copy.deepcopy(module.model)
    want = ref.step(per_sample_token_mean_ce(lm(batch["input_ids"], batch["attention_mask"]).logits,
                                             batch["labels"]), batch["group"])
    logs = m.training_step(module, batch)
    assert torch.equal(module.model.seen_masks[-1], batch["attention_mask"])
    assert float(logs["loss"]) == pytest.approx(float(want.detach())) and "grad_norm" in logs
    assert float(logs["dro/p_vulnerable"]) == pytest.approx(ref.probs[1])
    q = m.reweighter.probs
    m.setup(module, None)  # Lightning may call setup again (e.g. after restore): q kept
    assert m.reweighter.probs == q
    frozen = _gdro(update_q=False)
    frozen.group_sizes = [1, 1]
    frozen.setup(_Module(_LM()), None)
    frozen.training_step(_Module(_LM()), batch)
    assert frozen.reweighter.probs == [0.5, 0.5]


def test_gdro_state_round_trip_and_empty_states():
    m = _gdro()
    assert m.state_dict() == {}
    m.load_state_dict({"reweighter": None})  # no reweighter yet: ignored
    m.group_sizes = [2, 2]
    m.setup(_Module(_LM()), None)
    m.load_state_dict({})
    state = m.state_dict()
    state["reweighter"]["q"] = [0.3, 0.7]
    m.load_state_dict(state)
    assert m.reweighter.probs == pytest.approx([0.3, 0.7])


# ---------------------------------------------------------------- none.py, sft.py, base.py --
def test_none_refuses_to_train_with_its_reason():
    from vaa.methods.none import NoAlignment

    with pytest.raises(RuntimeError, match=r"^method=none trains nothing: its aligned artifact is the base model "
                                           r"\(plan_keys gives it the base's key\); this step is never reached$"):
        NoAlignment().training_step(None, None)
    assert NoAlignment.identity is True and NoAlignment.name == "none"


class _Sched:
    def __init__(self):
        self.steps = 0

    def step(self):
        self.steps += 1


@pytest.mark.parametrize("clip", [0.0, 0.05, 1e6])
def test_apply_gradients_clips_steps_schedules_and_zeroes(clip):
    """TrainingMethod.apply_gradients: global-L2 clip at recipe.grad_clip (0 = off), optimizer
    step, schedule step, gradients set to None; returns the pre-clip norm."""
    from vaa.methods.base import TrainingMethod

    torch.manual_seed(0)
    model = torch.nn.Linear(3, 2)
    frozen = torch.nn.Parameter(torch.ones(1))  # a parameter without gradient is skipped
    model.register_parameter("frozen", frozen)
    module = _Module(model)
    sched = _Sched()
    module.lr_schedulers = lambda: sched
    module.recipe.grad_clip = clip
    loss = model(torch.randn(4, 3)).square().sum()
    loss.backward()
    g = [p.grad.clone() for p in (model.weight, model.bias)]
    n = math.sqrt(sum(float(x.square().sum()) for x in g))
    theta = [model.weight.detach().clone(), model.bias.detach().clone()]
    out = TrainingMethod().apply_gradients(module)
    assert float(out) == pytest.approx(n, rel=1e-5)
    coef = min(1.0, clip / (n + 1e-6)) if clip > 0 else 1.0
    for p, t, x in zip((model.weight, model.bias), theta, g):
        assert torch.allclose(p, t - coef * x, atol=1e-6)
    assert model.weight.grad is None and frozen.grad is None and sched.steps == 1


def test_measure_at_first_step_then_every_log_interval():
    from vaa.methods.base import TrainingMethod

    m = TrainingMethod()
    trainer = SimpleNamespace(log_every_n_steps=5, precision="bf16-mixed")
    mod = SimpleNamespace(_trainer=trainer, global_step=3)
    assert m.measure_at(mod) == "bf16-mixed"  # the first call always measures
    assert m.measure_at(mod) is None
    mod.global_step = 10
    assert m.measure_at(mod) == "bf16-mixed"
    mod.global_step = 11
    assert m.measure_at(mod) is None
    trainer.log_every_n_steps = 0  # treated as every step
    assert m.measure_at(mod) == "bf16-mixed"
    bare = TrainingMethod()
    assert bare.measure_at(SimpleNamespace(global_step=7)) == "32-true"
    assert bare.measure_at(SimpleNamespace(global_step=7)) == "32-true"  # no trainer: every step


def test_base_defaults():
    from vaa.methods.base import TrainingMethod

    m = TrainingMethod(a=1)
    assert m.hparams == {"a": 1} and m.stream_batch_size("harmful", 6) == 6
    assert m.state_dict() == {} and m.load_state_dict({"x": 1}) is None
    assert TrainingMethod.passes_per_step == 1 and TrainingMethod.fsdp_safe is False
    assert TrainingMethod.requires_groups is False and TrainingMethod.requires == ()
    with pytest.raises(NotImplementedError):
        m.training_step(None, None)


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


# -------------------------------------------------------------------------------- ema.py --
def _toy_model():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Tanh(), torch.nn.Linear(4, 1))


def _xy(seed=4):
    g = torch.Generator().manual_seed(seed)
    return {"x": torch.randn(5, 3, generator=g), "y": torch.randn(5, 1, generator=g)}


@pytest.mark.parametrize("variant", ["shadow", "write_back"])
def test_ema_shadow_is_beta_lerp_of_the_stepped_weights(variant):
    """baselines.md §6: θ_ema ← β·θ_ema + (1−β)·θ_t after each step (θ_ema starts at θ_0);
    write_back also sets θ_t ← θ_ema; on_train_end writes θ_ema into the model."""
    from vaa.methods.ema import EMA

    model, batch = _toy_model(), _xy()
    module = _Module(model)
    m = EMA(beta=0.8, variant=variant)
    m.setup(module, None)
    theta0 = [p.detach().clone() for p in model.parameters()]
    _l, g = _grad_at(_net_at(model, theta0), batch)
    logs = m.training_step(module, batch)
    stepped = [t - x for t, x in zip(theta0, g)]
    want = [0.8 * t + 0.2 * s for t, s in zip(theta0, stepped)]
    for s, w in zip(m.shadow, want):
        assert s.dtype == torch.float32 and torch.allclose(s, w, atol=1e-6)
    for p, s, w in zip(model.parameters(), stepped, want):
        assert torch.allclose(p, w if variant == "write_back" else s, atol=1e-6)
    assert float(logs["ema/beta"]) == pytest.approx(0.8)
    m.on_train_end(module)
    for p, w in zip(model.parameters(), want):
        assert torch.allclose(p, w, atol=1e-6)


def test_ema_anchor_weight_sets_beta_and_the_state_round_trips():
    from vaa.methods.ema import EMA

    module = _Module(_toy_model(), total_steps=4)
    m = EMA(anchor_weight_at_end=0.0625)
    m.setup(module, None)
    assert m.beta == pytest.approx(0.5) and EMA().beta == 0.995 and EMA().variant == "shadow"
    m.training_step(module, _xy())
    state = m.state_dict()
    assert state["beta"] == m.beta and all(s.device.type == "cpu" for s in state["shadow"])
    fresh = EMA(beta=0.3)
    fresh.load_state_dict({})
    assert fresh.beta == 0.3 and fresh.shadow == []
    fresh.load_state_dict(state)  # before setup: taken as is
    assert fresh.beta == m.beta and all(torch.equal(a, b) for a, b in zip(fresh.shadow, m.shadow))
    other = EMA(beta=0.3)
    other.setup(_Module(_toy_model()), None)
    keep = list(other.shadow)
    other.load_state_dict(state)  # after setup: copied into the existing buffers
    assert all(a is b for a, b in zip(other.shadow, keep))
    assert all(torch.equal(a, b) for a, b in zip(other.shadow, m.shadow))
    other.setup(_Module(_toy_model()), None)  # a second setup keeps the restored shadow
    assert all(torch.equal(a, b) for a, b in zip(other.shadow, m.shadow))


@pytest.mark.parametrize("kw,msg", [
    ({"variant": "x"}, r"ft_defense.variant must be one of \('shadow', 'write_back'\), got 'x'"),
    ({"beta": 1.0}, r"ft_defense.beta must be in \[0, 1\), got 1.0"),
    ({"beta": -0.1}, r"ft_defense.beta must be in \[0, 1\), got -0.1"),
    ({"anchor_weight_at_end": 1.0}, r"ft_defense.anchor_weight_at_end must be in \(0, 1\), got 1.0"),
    ({"anchor_weight_at_end": 0.0}, r"ft_defense.anchor_weight_at_end must be in \(0, 1\), got 0.0"),
])
def test_ema_rejects_out_of_range_knobs(kw, msg):
    from vaa.methods.ema import EMA

    with pytest.raises(ValueError, match=msg):
        EMA(**kw)
    EMA(beta=0.0)  # the closed end is allowed


# ------------------------------------------------------------------------------- lisa.py --
@pytest.mark.parametrize("args,want", [
    ((100, 900, 126, 6), (2, 19)),   # the docstring's example
    ((100, 900, 6000, 6), (100, 900)),  # 6 cycles fit: kept
    ((100, 900, 1000, 0), (100, 900)),  # min_cycles 0: off
    ((0, 5, 10, 6), (0, 5)),
    ((5, 0, 10, 6), (5, 0)),
    ((1, 1, 3, 2), (1, 1)),          # cycle·min_cycles = 4 > 3: new = max(2, 1) = 2
    ((9, 1, 20, 5), (3, 1)),         # new = 4, round(3.6) = 4 capped at new − 1
    ((1, 99, 50, 5), (1, 9)),        # round(0.1) = 0 floored at 1
    ((3, 3, 12, 2), (3, 3)),         # exactly fits (6·2 = 12): kept
])
def test_lisa_cycle_lengths(args, want):
    from vaa.methods.lisa import cycle_lengths

    assert cycle_lengths(*args) == want


@pytest.mark.parametrize("a,f", [(-1, 5), (5, -1), (0, 0)])
def test_lisa_cycle_lengths_rejects_negative_or_empty_cycles(a, f):
    from vaa.methods.lisa import cycle_lengths

    with pytest.raises(ValueError, match=rf"must be >= 0 and not both 0, got {a}/{f}"):
        cycle_lengths(a, f, 100, 0)


def test_lisa_proximal_step_alternates_states_and_anchors():
    """baselines.md §5: in state s the gradient is ∇loss + ρ(θ − θ̃_other); θ̃_s is the
    parameters at the end of state s; the alignment state trains on the alignment stream."""
    from vaa.methods.lisa import ALIGN, FINETUNE, Lisa

    model, user, align = _toy_model(), _xy(5), _xy(6)
    module = _Module(model, total_steps=10)
    stream = _Stream([align])
    m = Lisa(align_steps=1, finetune_steps=2, rho=0.5, warmup_fraction=0.0, min_cycles=0)
    m.setup(module, SimpleNamespace(streams={"alignment": stream}))
    assert m.k == {ALIGN: 1, FINETUNE: 2} and m.state == ALIGN
    th = [[p.detach().clone() for p in model.parameters()]]

    def step(batch_used, anchor):
        theta = [p.detach().clone() for p in model.parameters()]
        _l, g = _grad_at(_net_at(model, theta), batch_used)
        logs = m.training_step(module, user)
        module.global_step += 1
        for p, t, x, a in zip(model.parameters(), theta, g, anchor):
            assert torch.allclose(p, t - (x + 0.5 * (t - a)), atol=1e-6)
        return logs, theta

    module.global_step = 0  # 0 > 0·10 is false: no proximal term on the very first step
    theta = [p.detach().clone() for p in model.parameters()]
    _l, g = _grad_at(_net_at(model, theta), align)
    logs = m.training_step(module, user)
    module.global_step += 1
    assert "lisa/proximal" not in logs and float(logs["lisa/state"]) == 1.0 and stream.calls[0] == 1
    for p, t, x in zip(model.parameters(), theta, g):
        assert torch.allclose(p, t - x, atol=1e-6)
    theta1 = [p.detach().clone() for p in model.parameters()]
    assert m.state == FINETUNE and all(torch.equal(a, t) for a, t in zip(m.anchors[ALIGN], theta1))
    logs, _ = step(user, theta1)          # finetune 1: anchor θ̃_A = θ1 (zero drift)
    assert float(logs["lisa/state"]) == 0.0 and float(logs["lisa/drift"]) == pytest.approx(0.0, abs=1e-7)
    logs, theta2 = step(user, theta1)     # finetune 2: drift θ2 − θ1
    d2 = sum(float((a - b).square().sum()) for a, b in zip(theta2, theta1))
    assert float(logs["lisa/proximal"]) == pytest.approx(0.25 * d2, rel=1e-5)
    assert float(logs["lisa/drift"]) == pytest.approx(math.sqrt(d2), rel=1e-5)
    theta3 = [p.detach().clone() for p in model.parameters()]
    assert m.state == ALIGN and m.in_state == 0
    assert all(torch.equal(a, t) for a, t in zip(m.anchors[FINETUNE], theta3))
    step(align, theta3)                   # back in the alignment state, on the alignment stream
    assert m.history == [ALIGN, FINETUNE, FINETUNE, ALIGN] and stream.calls[0] == 2
    state = m.state_dict()
    other = Lisa(align_steps=1, finetune_steps=2, min_cycles=0)
    other.load_state_dict({})
    assert other.anchors == {} and other.state == ALIGN
    other.load_state_dict(state)
    assert other.state == m.state and other.in_state == m.in_state and other.history == m.history
    assert all(torch.equal(a, b) for a, b in zip(other.anchors[ALIGN], m.anchors[ALIGN]))
    other.setup(_Module(_toy_model(), total_steps=10), SimpleNamespace(streams={"alignment": stream}))
    assert all(torch.equal(a, b) for a, b in zip(other.anchors[FINETUNE], m.anchors[FINETUNE]))  # kept


def test_lisa_warmup_and_rho_zero_skip_the_proximal_term_and_finetune_only_never_switches():
    from vaa.methods.lisa import FINETUNE, Lisa

    for kw, gs in [({"rho": 1.0, "warmup_fraction": 0.5}, 5), ({"rho": 0.0, "warmup_fraction": 0.0}, 3)]:
        module = _Module(_toy_model(), total_steps=10)
        module.global_step = gs
        m = Lisa(align_steps=1, finetune_steps=1, min_cycles=0, **kw)
        m.setup(module, SimpleNamespace(streams={"alignment": _Stream([_xy(6)])}))
        assert "lisa/proximal" not in m.training_step(module, _xy(5))
    module = _Module(_toy_model(), total_steps=10)
    m = Lisa(align_steps=0, finetune_steps=2, min_cycles=0, anchor_device="cpu")
    m.setup(module, SimpleNamespace(streams={"alignment": _Stream([_xy(6)])}))
    assert m.state == FINETUNE
    for _ in range(5):
        m.training_step(module, _xy(5))
    assert m.history == [FINETUNE] * 5
    assert (m.align_steps, m.finetune_steps, m.rho, m.warmup_fraction, m.min_cycles) == (0, 2, 1.0, 0.1, 0)
    d = Lisa()
    assert (d.align_steps, d.finetune_steps, d.rho, d.warmup_fraction, d.min_cycles) == (100, 900, 1.0, 0.1, 6)


# -------------------------------------------------------------------------- lookahead.py --
class _WordTok:
    """Whitespace 'tokenizer': one id per word; decode joins with spaces."""

    def __init__(self):
        self.vocab: list[str] = []
        self.calls = []

    def __call__(self, text, add_special_tokens=True):
        self.calls.append(add_special_tokens)
        ids = []
        for w in text.split():
            if w not in self.vocab:
                self.vocab.append(w)
            ids.append(self.vocab.index(w))
        return {"input_ids": ids}

    def decode(self, ids, clean_up_tokenization_spaces=True):
        self.calls.append(("clean", clean_up_tokenization_spaces))
        return " ".join(self.vocab[i] for i in ids)


def test_lookahead_rows_real_and_virtual_with_and_without_input():
    """baselines.md §7: real: the first preview_tokens of the answer are appended (after the
    connector) to the input, or to the instruction when there is no input; virtual: a fixed
    prefix is both previewed and prepended to the answer."""
    from vaa.data.formats import Example
    from vaa.methods.lookahead import CONNECTOR, lookahead_row

    tok = _WordTok()
    ex = Example("Do it", "", "one two three four")
    row = lookahead_row(ex, tok, "real", preview_tokens=2)
    assert row.instruction == "Do it" + CONNECTOR + "one two" and row.input == "" and row.output == ex.output
    assert tok.calls == [False, ("clean", False)]  # no special tokens, spaces kept as decoded
    with_input = lookahead_row(Example("Do it", "ctx", "a b c"), tok, preview_tokens=6)
    assert with_input.input == "ctx" + CONNECTOR + "a b c" and with_input.instruction == "Do it"
    v = lookahead_row(ex, tok, "virtual", virtual_prefix="P. ", connector=" | ")
    assert v.instruction == "Do it | P. " and v.output == "P. one two three four"
    zero = lookahead_row(ex, tok, "real", preview_tokens=0)
    assert zero.instruction == "Do it" + CONNECTOR
    with pytest.raises(ValueError, match=r"ft_defense.mode must be one of \('real', 'virtual'\), got 'x'"):
        lookahead_row(ex, tok, "x")


def test_lookahead_method_transforms_the_rows_it_trains_on(monkeypatch):
    from vaa.data.formats import Example
    from vaa.methods import sft
    from vaa.methods.lookahead import LookAhead

    seen = {}
    monkeypatch.setattr(sft.SFT, "make_datamodule", lambda self, rows, tok, **kw: seen.update(rows=rows, kw=kw) or "dm")
    m = LookAhead(mode="virtual", virtual_prefix="V ", connector=" # ", preview_tokens=3)
    assert (m.mode, m.preview_tokens, m.virtual_prefix, m.connector) == ("virtual", 3, "V ", " # ")
    assert m.make_datamodule([Example("i", "", "o")], _WordTok(), batch_size=2) == "dm"
    assert seen["rows"] == [Example("i # V ", "", "V o")] and seen["kw"] == {"batch_size": 2}
    real = LookAhead(preview_tokens=1)
    real.make_datamodule([Example("i", "x", "o p")], _WordTok())
    assert seen["rows"] == [Example("i", "x" + real.connector + "o", "o p")]
    d = LookAhead()
    assert (d.mode, d.preview_tokens, d.virtual_prefix) == ("real", 6, "Let's solve this problem. ")
    with pytest.raises(ValueError, match=r"ft_defense.mode must be one of \('real', 'virtual'\), got 'y'"):
        LookAhead(mode="y")
    with pytest.raises(ValueError, match="ft_defense.preview_tokens must be >= 0, got -1"):
        LookAhead(preview_tokens=-1)
    LookAhead(preview_tokens=0)


def test_repnoise_ascent_term_and_mmd_match_their_formulas():
    """baselines.md §3: ascent = log(Σ/(N_L+2) + 1) (mean) or log(Σ/(N_L+1) + 1) (upstream);
    MMD² with Σ_{i=0..4} exp(−d²/(b·2^{i−2})), b = mean pairwise squared distance."""
    from vaa.methods.repnoise import ascent_term, mmd

    ce, lens = torch.tensor(2.0), [torch.tensor(1.0), torch.tensor(3.0), torch.tensor(0.5)]
    assert float(ascent_term(ce, lens)) == pytest.approx(math.log(6.5 / 4 + 1))
    assert float(ascent_term(ce, lens, "upstream")) == pytest.approx(math.log(6.5 / 3 + 1))
    with pytest.raises(ValueError, match=r"method.layer_average must be one of \('mean', 'upstream'\), got 'x'"):
        ascent_term(ce, lens, "x")
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(3, 4, generator=g), torch.randn(2, 4, generator=g) + 1.0
    z = torch.cat([x, y]).double()
    d2 = torch.cdist(z, z).pow(2)
    b = d2.sum() / (5 * 5 - 5)
    k = sum(torch.exp(-d2 / (b * 2.0 ** (i - 2))) for i in range(5))
    want = k[:3, :3].mean() + k[3:, 3:].mean() - 2 * k[:3, 3:].mean()
    assert float(mmd(x, y)) == pytest.approx(float(want), rel=1e-4)
    k3 = sum(torch.exp(-d2 / (b * 3.0 ** (i - 1))) for i in range(3))
    want3 = k3[:3, :3].mean() + k3[3:, 3:].mean() - 2 * k3[:3, 3:].mean()
    assert float(mmd(x, y, kernels=3, mul=3.0)) == pytest.approx(float(want3), rel=1e-4)
    assert float(mmd(x, x.clone())) == pytest.approx(0.0, abs=1e-6)


def test_repnoise_masked_ce_is_the_shifted_ce_at_kept_positions_and_zero_without_any():
    from vaa.methods.repnoise import masked_ce

    g = torch.Generator().manual_seed(1)
    hidden = torch.randn(2, 4, 3, generator=g, requires_grad=True)
    ids = torch.tensor([[0, 1, 2, 1], [2, 2, 0, 1]])
    keep = torch.tensor([[False, True, True], [True, False, False]])
    head = torch.nn.Linear(3, 3)
    got = masked_ce(head, hidden, ids, keep)
    logits = head(hidden[:, :-1])
    want = torch.nn.functional.cross_entropy(logits[keep], ids[:, 1:][keep])
    assert float(got.detach()) == pytest.approx(float(want.detach()))
    none = masked_ce(head, hidden, ids, torch.zeros_like(keep))
    assert float(none.detach()) == 0.0 and none.requires_grad


def test_repnoise_masks_response_and_diff_tokens():
    from vaa.methods.repnoise import RepNoise

    harm = {"input_ids": torch.tensor([[1, 5, 6, 0], [1, 7, 8, 9]]), "attention_mask": torch.ones(2, 4, dtype=torch.long),
            "labels": torch.tensor([[-100, -100, 6, 0], [-100, 7, 8, -100]])}
    safe = {"input_ids": torch.tensor([[1, 5, 3], [1, 2, 8], [1, 1, 1]]), "attention_mask": torch.ones(3, 3, dtype=torch.long),
            "labels": torch.tensor([[-100, 5, 3], [-100, 2, 8], [-100, 1, 1]])}
    r = RepNoise()
    used, m_harm, m_safe = r.masks(harm, safe)
    assert used is safe and m_safe is None
    assert m_harm.tolist() == [[False, True, True], [True, True, False]]
    d = RepNoise(mask="diff_tokens")
    used, m_harm, m_safe = d.masks(harm, safe)
    assert used["input_ids"].tolist() == [[1, 5, 3, 0], [1, 2, 8, 0]]  # 2 rows, padded with id 0
    assert m_harm.tolist() == [[False, True, False], [True, False, True]]  # differs, harmful id != 0
    assert m_safe.tolist() == [[False, True, False], [True, False, False]]  # differs, harmless id != 0


def test_repnoise_knobs_setup_errors_and_noise_state():
    from vaa.methods.repnoise import LAYER, RepNoise

    r = RepNoise(noise_weight=2, ascent_weight=3, seed=5)
    assert (r.beta, r.alpha, r.mask, r.layer_average) == (2.0, 3.0, "response", "mean")
    assert r.layer_pattern == LAYER and r.final_norm == "norm" and RepNoise.passes_per_step == 2
    d = RepNoise()
    assert (d.beta, d.alpha) == (0.001, 1.0)
    with pytest.raises(ValueError, match=r"method.mask must be one of \('response', 'diff_tokens'\), got 'x'"):
        RepNoise(mask="x")
    with pytest.raises(ValueError, match=r"method.layer_average must be one of \('mean', 'upstream'\), got 'y'"):
        RepNoise(layer_average="y")
    a = torch.randn(3, generator=r.noise)
    state = r.state_dict()
    b = torch.randn(3, generator=r.noise)
    r2 = RepNoise(seed=5)
    assert torch.equal(torch.randn(3, generator=r2.noise), a)  # the seed seeds the noise
    r2.load_state_dict({})
    r2.load_state_dict(state)
    assert torch.equal(torch.randn(3, generator=r2.noise), b)


def test_vaa_datamodule_needs_groups_and_artifacts_get_trajectory_and_stats(monkeypatch, tmp_path):
    import vaa.data.group_stream as gs
    import vaa.methods.vaa as vaa_mod

    method, *_ = _toy_vaa()
    with pytest.raises(ValueError, match=r"^method=vaa needs vulnerability groups: set dro.groups_file or let "
                                         r"the estimate stage run \(dro.groups_file=null\)$"):
        method.make_datamodule([], None, groups=None)
    monkeypatch.setattr(gs, "GroupDataModule", lambda *a, **kw: (a, kw))
    assert method.make_datamodule(["e"], "tok", groups=[1], batch_size=3) == ((["e"], [1], "tok"), {"batch_size": 3})
    seen = []
    monkeypatch.setattr(vaa_mod, "write_trajectory", lambda *a: seen.append(a))
    method.trajectory, method.stats = [(1, 0.5, 1.0, None)], {"steps": 1}
    method.write_artifacts(tmp_path)
    assert seen == [(tmp_path, [(1, 0.5, 1.0, None)], {"steps": 1})]


# ------------------------------------------------------------- more edges (second round) --
def test_sft_step_and_base_datamodule(monkeypatch):
    import vaa.data.datamodule as dmod
    from vaa.methods.base import TrainingMethod
    from vaa.methods.sft import SFT

    model, batch = _toy_model(), _xy()
    module = _Module(model)
    theta = [p.detach().clone() for p in model.parameters()]
    l0, g = _grad_at(_net_at(model, theta), batch)
    logs = SFT().training_step(module, batch)
    for p, t, x in zip(model.parameters(), theta, g):
        assert torch.allclose(p, t - x, atol=1e-6)
    assert float(logs["loss"]) == pytest.approx(l0) and float(logs["grad_norm"]) > 0
    seen = []
    monkeypatch.setattr(dmod, "SFTDataModule", lambda *a, **kw: seen.append((a, kw)) or "dm")
    m = TrainingMethod()
    assert m.make_datamodule(["e"], "tok", extra={"h": 1}, batch_size=2) == "dm"
    (args, kw), = seen
    assert args == (["e"], "tok") and kw["extra"] == {"h": 1} and kw["batch_size"] == 2
    assert kw["extra_batch_size"] == m.stream_batch_size


def _tiny_grad_toy():
    """A stack whose loss is scaled so that ‖∂f/∂e‖ is ~1e-7: the +1e-7 of ε's denominator shows."""
    model, batch = _Toy(), _toy_batch()
    module = _Module(model)
    module.lm_loss = lambda b: 1e-7 * torch.nn.functional.mse_loss(model(b["x"]), b["y"])
    return model, module, batch


def test_vaccine_eps_denominator_is_norm_plus_1e_7():
    from vaa.methods.vaccine import hidden_perturbation

    model, module, batch = _tiny_grad_toy()
    _clean, eps, norm = hidden_perturbation(module, batch, [l.self_attn for l in model.layers], 2.0)
    n = float(norm)
    got = math.sqrt(sum(float(e.square().sum()) for e in eps))
    assert got == pytest.approx(2.0 * n / (n + 1e-7), rel=1e-5)


class _SkipToy(_Toy):
    """Block 1 runs but its output is not used: its ε is None (allow_unused)."""

    def forward(self, x, eps=None):
        x = x + self.layers[0].self_attn(x)[0]
        self.layers[1].self_attn(x)
        out = self.layers[2].self_attn(x)
        return self.head(x + out)


def test_vaccine_a_block_the_loss_ignores_gets_no_perturbation():
    from vaa.methods.vaccine import hidden_perturbation, perturbed_backward

    model = _SkipToy()
    module = _Module(model)
    layers = [l.self_attn for l in model.layers]
    _clean, eps, _n = hidden_perturbation(module, _toy_batch(), layers, 1.0)
    assert eps[1] is None and eps[0] is not None and eps[2] is not None
    logs = perturbed_backward(module, _toy_batch(), layers, 1.0)
    assert float(logs["eps_norm"]) == pytest.approx(1.0, rel=1e-5)


def _bf16_module(model):
    module = _Module(model)
    module._trainer = SimpleNamespace(log_every_n_steps=1, precision="bf16-true", strategy=None)
    return module


def test_vaccine_and_booster_refuse_a_perturbation_that_rounds_away_naming_their_knob():
    """precision.py: measured on the first step in the trainer's precision; an ε / α step that
    vanishes in bf16 is refused with the method's own knob in the message."""
    from vaa.methods.booster import Booster
    from vaa.methods.vaccine import Vaccine

    model = _Toy().to(torch.bfloat16)  # hidden states of magnitude ~1 in bf16: ρ = 1e-4 rounds away
    module = _bf16_module(model)
    module.lm_loss = lambda b: torch.nn.functional.mse_loss(model(b["x"].bfloat16()).float(), b["y"])
    v = Vaccine(rho=1e-4)
    v.setup(module, None)
    with pytest.raises(prec.PerturbationRoundedAway, match=r"^method=vaccine: in trainer.precision=bf16-true .* larger method.rho$"):
        v.training_step(module, _toy_batch())
    big = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Tanh(), torch.nn.Linear(4, 1))
    with torch.no_grad():
        for p in big.parameters():
            p.fill_(100.0)
    module = _bf16_module(big)
    b = Booster(alpha=1e-4, lam=1.0)
    b.setup(module, SimpleNamespace(streams={"harmful": _Stream([_xy(7)])}))
    with pytest.raises(prec.PerturbationRoundedAway, match=r"^method=booster: in trainer.precision=bf16-true .* larger method.alpha$"):
        b.training_step(module, _xy(8))


def test_vaccine_training_step_measures_on_the_first_step():
    from vaa.methods.vaccine import Vaccine

    model = _Toy()
    module = _Module(model)
    module._trainer = SimpleNamespace(log_every_n_steps=50, precision="32-true", strategy=None)
    module.global_step = 3
    v = Vaccine(rho=0.5)
    v.setup(module, None)
    logs = v.training_step(module, _toy_batch())
    assert float(logs["eps_realised_norm"]) == pytest.approx(0.5, rel=1e-4)
    assert "eps_realised_norm" not in v.training_step(module, _toy_batch())


def test_booster_sign_bug_moves_by_plus_alpha_twice_with_the_1e_7_denominator():
    """``vaa_sign_bug``: g_h′ at θ + α·g_h/(‖g_h‖+1e-7) and θ left at θ + 2α·ĝ_h; G = g_a +
    λ(g_h − g_h′) taken at θ + 2α·ĝ_h (baselines.md §4). A tiny loss scale makes the +1e-7 show."""
    method, module, (hb, ab) = _toy_booster(lam=0.5, alpha=0.3, variant="vaa_sign_bug")
    model = module.model
    module.lm_loss = lambda b: 1e-7 * torch.nn.functional.mse_loss(model(b["x"]), b["y"])
    theta = [p.detach().clone() for p in model.parameters()]

    def grad(at, batch):
        m = _net_at(model, at)
        loss = 1e-7 * torch.nn.functional.mse_loss(m(batch["x"]), batch["y"])
        return torch.autograd.grad(loss, list(m.parameters()))

    gh = grad(theta, hb)
    n = math.sqrt(sum(float(x.square().sum()) for x in gh))
    s = 0.3 / (n + 1e-7)
    moved = [t + s * x for t, x in zip(theta, gh)]
    gh1 = grad(moved, hb)
    at = [t + 2 * s * x for t, x in zip(theta, gh)]
    ga = grad(at, ab)
    method.training_step(module, ab)
    for p, a, x, h, h1 in zip(model.parameters(), at, ga, gh, gh1):
        assert torch.allclose(p, a - (x + 0.5 * (h - h1)), atol=1e-6, rtol=1e-5)


def test_hooks_propagate_exceptions_and_keep_tuple_outputs():
    from vaa.methods.hooks import AddToOutputs, CaptureOutputs

    attn = _Attn("tuple")
    with pytest.raises(KeyError):
        with CaptureOutputs([attn]):
            raise KeyError("body")
    assert not attn._forward_hooks
    with AddToOutputs([attn], [torch.ones(4)]):
        out = attn(torch.zeros(1, 4))
    assert isinstance(out, tuple) and out[1] is None and out[0].shape == (1, 4)
    lst = _Attn("list")
    with AddToOutputs([lst], [torch.ones(4)]):
        out = lst(torch.zeros(1, 4))
    assert isinstance(out, list) and out[1] is None


def test_lisa_second_round_edges():
    from vaa.methods.lisa import ALIGN, FINETUNE, Lisa, cycle_lengths

    assert cycle_lengths(100, 900, 500, 1) == (50, 450)  # one cycle must fit as well
    assert Lisa().in_state == 0 and Lisa().state == ALIGN
    model = _toy_model()
    spare = torch.nn.Parameter(torch.ones(2))  # trainable, outside the loss: its gradient is ρ·drift only
    model.register_parameter("spare", spare)
    module = _Module(model, total_steps=126)
    m = Lisa(align_steps=100, finetune_steps=900, min_cycles=6, rho=0.5, warmup_fraction=0.0)
    m.setup(module, SimpleNamespace(streams={"alignment": _Stream([_xy(6)])}))
    assert m.k == {ALIGN: 2, FINETUNE: 19}
    i = next(j for j, p in enumerate(m.params) if p is spare)
    m.anchors[FINETUNE][i] = torch.zeros(2)  # pretend θ̃_F had spare = 0
    module.global_step = 1
    logs = m.training_step(module, _xy(5))
    assert "loss" in logs and "grad_norm" in logs
    assert torch.allclose(spare.detach(), torch.full((2,), 0.5))  # 1 − lr·ρ·(1 − 0)


def test_small_second_round_edges():
    from vaa.data.formats import Example
    from vaa.methods.ema import EMA
    from vaa.methods.hooks import layer_modules
    from vaa.methods.lookahead import lookahead_row

    v = lookahead_row(Example("i", "", "o"), _WordTok(), "virtual")
    assert v.output == "Let's solve this problem. o"
    module = _Module(_toy_model())
    e = EMA(beta=0.5)
    e.setup(module, None)
    assert "grad_norm" in e.training_step(module, _xy()) and "loss" in e.training_step(module, _xy())
    with pytest.raises(ValueError, match=r"per-layer attention / MLP block of this architecture$"):
        layer_modules(_Toy(), "nothing")


def test_vaa_warns_when_a_group_is_empty_and_seeds_its_sampler(caplog):
    import logging

    with caplog.at_level(logging.WARNING, logger="vaa.methods.vaa"):
        _toy_vaa(sizes=(0, 7))
    assert caplog.messages == [
        "VAA: group sizes [0, 7]; training on group 1 only (the sampler is idle). The estimate found no "
        "vulnerable/invulnerable split: try more proxy runs or another dro.estimate.definition."]
    from vaa.config.schema import DROConfig
    from vaa.methods.vaa import VAA

    m = VAA(dro=OmegaConf.structured(DROConfig), seed=3)
    m.setup(None, SimpleNamespace(stream=None, group_sizes=lambda: [2, 2]))
    assert m.sampler.seed == 3 and m.sampler.num_groups == 2


def test_vaa_under_a_sharded_strategy_passes_the_all_reduced_norm():
    """FSDP / ModelParallel: ‖G0‖ comes from sharded_norm (one process here: the local norm)."""
    method, module, _stream, batches = _toy_vaa(lambda_max=1.0, lambda_schedule="constant")
    module._trainer = SimpleNamespace(strategy=type("FSDPStrategy", (), {})(), log_every_n_steps=1,
                                      precision="32-true")
    theta = [p.detach().clone() for p in module.model.parameters()]
    logs = method.training_step(module, None)
    k = int(logs["dro/group"])
    _l0, g0 = _grad_at(_net_at(module.model, theta), batches[k])
    _l1, g1 = _grad_at(_net_at(module.model, theta), batches[k], _sam_eps(g0, 0.3))
    for p, t, g in zip(module.model.parameters(), theta, g1):
        assert torch.allclose(p, t - g, atol=1e-6)


def test_vaa_refuses_a_sam_step_that_rounds_away_in_bf16():
    method, module, _stream, _ = _toy_vaa(lambda_max=1.0, lambda_schedule="constant", sam={"rho": 1e-6})
    module.model.to(torch.bfloat16)
    module._trainer = SimpleNamespace(strategy=None, log_every_n_steps=1, precision="bf16-true")
    model = module.model
    module.lm_loss = lambda b: torch.nn.functional.mse_loss(model(b["x"].bfloat16()).float(), b["y"])
    with pytest.raises(prec.PerturbationRoundedAway, match=r"^method=vaa: in trainer.precision=bf16-true .* larger dro.sam.rho$"):
        method.training_step(module, None)


def test_booster_perturb_aware_takes_vaccines_gradient_and_logs_its_eps():
    """``perturb_aware: true``: g_a is Vaccine's perturbed alignment gradient (baselines.md §4)."""
    from vaa.methods.booster import Booster
    from vaa.methods.vaccine import perturbed_backward

    model = _Toy()
    module = _Module(model)
    hb, ab = _toy_batch(), {k: v.flip(0) for k, v in _toy_batch().items()}
    b = Booster(lam=0.0, alpha=0.1, perturb_aware=True, vaccine_rho=0.4)
    b.setup(module, SimpleNamespace(streams={"harmful": _Stream([hb])}))
    assert b.layers == [l.self_attn for l in model.layers]
    ref = copy.deepcopy(model)
    want = perturbed_backward(_Module(ref), ab, [l.self_attn for l in ref.layers], 0.4)
    theta = [p.detach().clone() for p in model.parameters()]
    logs = b.training_step(module, ab)
    for p, t, r in zip(model.parameters(), theta, ref.parameters()):
        assert torch.allclose(p, t - r.grad, atol=1e-6)  # λ = 0: G = g_a(perturbed)
    assert float(logs["eps_norm"]) == pytest.approx(0.4, rel=1e-5)
    assert float(logs["loss"]) == pytest.approx(float(want["loss"]))


def test_repnoise_setup_names_the_decoder_without_a_final_norm():
    from vaa.methods.repnoise import RepNoise

    class _Blk(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.mlp = torch.nn.Linear(2, 2)

    class _Dec(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.layers = torch.nn.ModuleList([_Blk(), _Blk()])
            self.config = SimpleNamespace(num_hidden_layers=2)

        def get_decoder(self):
            return self

    dm = SimpleNamespace(streams={"harmful": None}, tokenizer=SimpleNamespace(pad_token_id=0))
    with pytest.raises(ValueError, match=r"^_Dec has no final norm 'norm'; set method.final_norm"):
        RepNoise().setup(SimpleNamespace(model=_Dec()), dm)
    r = RepNoise(final_norm="layers")
    r.setup(SimpleNamespace(model=_Dec()), dm)
    assert len(r.mlps) == 2 and len(r.layers) == 2 and r.pad_id == 0


def test_hand_made_mutants_in_no_grad_functions():
    """mutmut 3.8 does not mutate functions under a decorator (@torch.no_grad, @property);
    these were broken by hand: a stash buffer of another shape or dtype is replaced, and a step
    that moved nothing has cosine NaN (realised_step's contract)."""
    a, b = _params_with_grads()
    out = [torch.zeros(2), torch.zeros(5, dtype=torch.float64)]  # wrong shape / wrong dtype
    s = stash_grads([a, b], out=out)
    assert s[0].shape == a.grad.shape and torch.equal(s[0], a.grad)
    assert s[1].dtype == torch.float32 and torch.equal(s[1], b.grad)
    t = torch.ones(3)
    norm, cos = prec.realised_step([t], [t.clone()], [torch.ones(3)], "32-true")
    assert norm == 0.0 and math.isnan(cos)


def test_repnoise_response_mask_uses_every_harmful_row_and_logs_the_grad_norm():
    """``mask: response``: the harmful batch is used whole (only ``diff_tokens`` pairs rows with
    the harmless batch); the step logs its pre-clip gradient norm."""
    from vaa.config.schema import ArchConfig
    from vaa.methods.repnoise import RepNoise
    from vaa.models.build import build_tiny_llama
    from vaa.models.tokenizer import build_word_tokenizer
    from vaa.training.module import response_loss

    torch.set_num_threads(1)
    tok = build_word_tokenizer(["a b c d e f g h i j k l m n o p"])
    model = build_tiny_llama(ArchConfig(hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
                                        num_key_value_heads=2, intermediate_size=32), tok, seed=0)
    g = torch.Generator().manual_seed(0)

    def rows(n):
        ids = torch.randint(5, len(tok), (n, 6), generator=g)
        labels = ids.clone()
        labels[:, :3] = -100
        return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels}

    hb, small, big = rows(4), rows(1), rows(4)
    harmful = []
    for batch in (small, big):
        module = _Module(copy.deepcopy(model))
        module.lm_loss = lambda b, m=module: response_loss(m.model, b)
        r = RepNoise(noise_weight=0.1, ascent_weight=0.5)
        r.setup(module, SimpleNamespace(streams={"harmful": _Stream([hb])}, tokenizer=tok))
        logs = r.training_step(module, batch)
        harmful.append(float(logs["harmful_loss"]))
        assert float(logs["grad_norm"]) > 0
    assert harmful[0] == pytest.approx(harmful[1], rel=1e-6)
    # diff_tokens: the harmless forward gets its own (padded) attention mask
    module = _Module(copy.deepcopy(model))
    seen = []
    module.model.get_decoder().register_forward_pre_hook(
        lambda _m, _a, kw: seen.append(kw.get("attention_mask")), with_kwargs=True)
    r = RepNoise(mask="diff_tokens")
    r.setup(module, SimpleNamespace(streams={"harmful": _Stream([hb])}, tokenizer=tok))
    short = {k: v[:, :4] for k, v in rows(2).items()}
    r.training_step(module, short)
    assert len(seen) == 2 and seen[1] is not None
    assert seen[1].tolist() == [[1, 1, 1, 1, 0, 0]] * 2  # padded to the harmful width with attention 0


def test_apply_gradients_clips_with_the_sharded_norm_under_fsdp(monkeypatch):
    """base.apply_gradients: under a sharding strategy the clip's norm is all-reduced
    (``clip_global_(…, sharded=True)``); otherwise the local clip."""
    import vaa.methods.base as base

    calls = []
    monkeypatch.setattr(base, "clip_global_", lambda params, max_norm, sharded=False: calls.append(sharded) or torch.tensor(1.0))
    for strategy, want in [("FSDPStrategy", True), ("DDPStrategy", False)]:
        module = _Module(_toy_model())
        module._trainer = SimpleNamespace(strategy=type(strategy, (), {})())
        base.TrainingMethod().apply_gradients(module)
        assert calls[-1] is want
