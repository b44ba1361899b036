"""Mutation-found edges of vaa/methods/perturb.py and grads.py: the SAM weight step
ε = ρ·g/(‖g‖+eps) with exact restore, global norms, stashing and mixing gradients, the sharded
clip (specs/vaa.md §3.3-3.4). The mutmut recipe and scores: tests/test_methods_mutants.py."""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch

from tests.methods_toys import params_with_grads, module_with_strategy
from vaa.methods.grads import (clip_global_, global_norm, grad_norm, is_sharded, mix_grads,
                               sharded_norm, stash_grads, trainable_params)
from vaa.methods.perturb import SAMPerturber, WeightPerturbation, perturb_weights


def test_sam_perturber_dedupes_tied_parameters_once_each():
    """specs/vaa.md §3.3: ε over every trainable tensor once; a tied weight listed twice would
    be moved twice (the ``_dedupe`` mutants)."""
    a, b = params_with_grads()
    sam = SAMPerturber([a, b, a, b, a], rho=0.4)
    assert len(sam.params) == 2 and sam.params[0] is a and sam.params[1] is b


def test_sam_perturber_starts_with_nan_stats_and_empty_buffers():
    a, b = params_with_grads()
    sam = SAMPerturber([a, b], rho=0.4)
    for v in (sam.last_eps_norm, sam.last_grad_norm, sam.last_realised_norm, sam.last_realised_cos):
        assert isinstance(v, float) and math.isnan(v)
    assert sam.buffers == [None, None] and sam.grad_buffers == [None, None]
    assert sam.copied_numel == 0 and sam.buffer_numel == 0


def test_sam_perturber_stashes_g0_in_its_own_buffers():
    """SAMPerturber.stash_grads: ``stash_grads(self.params, out=self.grad_buffers)``."""
    a, b = params_with_grads()
    sam = SAMPerturber([a, b], rho=0.4)
    g0 = sam.stash_grads()
    assert g0[0] is sam.grad_buffers[0] and g0[1] is sam.grad_buffers[1]
    assert torch.equal(g0[0], a.grad) and g0[0] is not a.grad


def test_sam_perturber_passes_eps_restore_direction_and_norm_to_each_step():
    """perturbed(direction, grad_norm_value) and the owner's eps / restore reach the step:
    θ ← θ + ρ·d/(‖d‖_given + eps)."""
    a, b = params_with_grads()
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
    a, b = params_with_grads()
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
    a, b = params_with_grads()
    before = [a.detach().clone(), b.detach().clone()]
    bufs = [torch.zeros(3, 4, dtype=torch.bfloat16), torch.zeros(2)]
    with perturb_weights([a, b], rho=0.4, buffers=bufs):
        assert bufs[0].dtype == torch.float32 and bufs[1].shape == (5,)
    assert torch.equal(a, before[0]) and torch.equal(b, before[1])


def test_a_perturbation_can_be_entered_again_after_exit_but_not_nested():
    a, b = params_with_grads()
    before = a.detach().clone()
    wp = perturb_weights([a, b], rho=0.4)
    with wp:
        with pytest.raises(RuntimeError, match="not re-entrant"):
            wp.__enter__()
    with wp:
        assert not torch.equal(a, before)
    assert torch.equal(a, before)


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
    a, b = params_with_grads()
    assert float(grad_norm([a, b])) == pytest.approx(math.sqrt(float(a.grad.square().sum() + b.grad.square().sum())))


def test_stash_grads_copies_into_reusable_buffers_and_checks_out():
    a, b = params_with_grads()
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


def test_is_sharded_only_for_fsdp_and_model_parallel_strategies():
    assert not is_sharded(SimpleNamespace())
    assert not is_sharded(SimpleNamespace(_trainer=None))
    assert is_sharded(module_with_strategy("FSDPStrategy"))
    assert is_sharded(module_with_strategy("ModelParallelStrategy"))
    assert not is_sharded(module_with_strategy("DDPStrategy"))


@pytest.mark.parametrize("max_norm", [0.5, 100.0])
def test_clip_global_sharded_path_matches_clip_grad_norm_in_one_process(max_norm):
    """Without an initialised process group the sharded path is the plain clip:
    coefficient max_norm/(norm+1e-6), applied only when < 1 (clip_grad_norm_ semantics)."""
    a, b = params_with_grads()
    a2, b2 = (torch.nn.Parameter(p.detach().clone()) for p in (a, b))
    a2.grad, b2.grad = a.grad.clone(), b.grad.clone()
    ref = torch.nn.utils.clip_grad_norm_([a2, b2], max_norm)
    n = clip_global_([a, b], max_norm, sharded=True)
    assert float(n) == pytest.approx(float(ref))
    assert torch.allclose(a.grad, a2.grad) and torch.allclose(b.grad, b2.grad)
    assert float(sharded_norm([a.grad, None, b.grad], True)) == pytest.approx(min(max_norm, float(ref)), rel=1e-5)


def test_weight_perturbation_defaults_and_argument_errors():
    a, b = params_with_grads()
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


def test_weight_perturbation_stats_are_nan_until_entered_and_realised_only_when_measured():
    a, b = params_with_grads()
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
