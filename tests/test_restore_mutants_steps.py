"""The curvature repair's steps (specs/restoration.md §1.2-1.3): trust region (guard, clamp,
backtracks, refusal direction), influence n, penalised L-BFGS.

Part of the mutation-testing tests of the repair maths: see tests/test_restore_mutants.py for
how they are measured and the scores."""

from __future__ import annotations

import copy
import math
from types import SimpleNamespace

import pytest
import torch

from tests.test_restore import curvature_inputs, lm_batch, tiny_llama, v_weights, v_projs
from vaa.restore import curvature_ops as C
from vaa.restore.base import dataset_loss
from vaa.restore.curvature import CurvatureRestore


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


# ----------------------------------------------------------------------------- trust region: guard, clamp, refusal
def _trial_losses(model, task, harm, step):
    m = copy.deepcopy(model)
    with torch.no_grad():
        for w, d in zip([l.weight for l in v_projs(m)], C.unflat(step, [l.weight for l in v_projs(m)])):
            w.add_(d)
        return float(dataset_loss(m, [task])), float(dataset_loss(m, [harm]))


def test_trust_region_halves_eta_until_the_relative_task_guard_holds():
    """Identity backend: x = g, η = sqrt(2δ/‖g‖²) (‖g‖² < 1 here, below no floor). With the
    guard between the relative changes of the validation loss at the full and the half step,
    the half step is taken (on this tiny model both steps lower it, so the guard is negative)."""
    model = tiny_llama(0, hidden=8)
    inputs, task, harm = curvature_inputs()
    ref = copy.deepcopy(model)
    g, _ = C.gradient([(lambda: dataset_loss(ref, [harm]), 1.0)], [m.weight for m in v_projs(ref)])
    assert float(g @ g) < 0.5
    delta = 0.5
    eta = math.sqrt(2 * delta / float(g @ g))
    t0 = float(dataset_loss(ref, [task]).detach())
    r1 = _trial_losses(ref, task, harm, eta * g)[0] - t0
    r2 = _trial_losses(ref, task, harm, eta / 2 * g)[0] - t0
    assert r2 < r1 < 0
    guard = (r1 + r2) / 2 / t0
    from tests.test_restore import curvature
    r = curvature("identity", variant="newton_trust_region", trust_radius=delta, task_guard=guard,
                  harmful_clamp=1e9)
    before = v_weights(model)
    r.restore(model, inputs)
    assert r.info["steps"][0]["eta"] == pytest.approx(eta / 2, rel=1e-5)
    torch.testing.assert_close(v_weights(model) - before, eta / 2 * g, rtol=1e-4, atol=1e-6)


def test_trust_region_tries_max_backtracks_plus_one_steps_and_a_zero_rise_passes_the_guard():
    from tests.test_restore import curvature
    inputs, _, _ = curvature_inputs()
    for backtracks in (0, 3):
        r = curvature("identity", variant="newton_trust_region", task_guard=-10.0, max_backtracks=backtracks)
        calls = []
        losses = r.losses
        r.losses = lambda m: calls.append(1) or losses(m)
        r.restore(tiny_llama(0, hidden=8), inputs)
        assert len(calls) == 1 + (backtracks + 1) + 1  # start, each trial, the final state
    # δ = 0: η = 0, θ unchanged, the rise is 0 ≤ guard·L: accepted at the first trial
    r = curvature("identity", variant="newton_trust_region", trust_radius=0.0, task_guard=0.0,
                  harmful_clamp=1e9, outer_steps=3)
    calls = []
    losses = r.losses
    r.losses = lambda m: calls.append(1) or losses(m)
    r.restore(tiny_llama(0, hidden=8), inputs)
    assert len(calls) == 2 and r.info["steps"] == [pytest.approx({"eta": 0.0, **r.info["start"]})]


def test_trust_region_harmful_clamp_binds_only_the_harmful_ascent():
    """τ: a trial whose harmful loss exceeds it is rejected under harmful_ascent; under the
    refusal objective the clamp plays no part. The refusal direction is g = −∇L_r: with the
    identity backend the step is −sqrt(2δ)·∇L_r/‖∇L_r‖ and the refusal loss falls."""
    from tests.test_restore import curvature
    inputs, task, harm = curvature_inputs()
    r = curvature("identity", variant="newton_trust_region", trust_radius=1e-4, task_guard=1e9, harmful_clamp=0.0)
    r.restore(tiny_llama(0, hidden=8), inputs)
    assert r.info["steps"][0]["eta"] == 0.0
    refusal = lm_batch(7)
    inputs = SimpleNamespace(cfg=inputs.cfg, task=lambda n, last=False: "task", harmful=lambda hp: "harm",
                             refusals=lambda split, n: "refusal",
                             batches=lambda ex, bs: [{"task": task, "harm": harm, "refusal": refusal}[ex]])
    model = tiny_llama(0, hidden=8)
    ref = copy.deepcopy(model)
    g, _ = C.gradient([(lambda: dataset_loss(ref, [refusal]), 1.0)], [m.weight for m in v_projs(ref)])
    delta = 0.02
    r = curvature("identity", variant="newton_trust_region", objective="refusal", trust_radius=delta,
                  task_guard=1e9, harmful_clamp=0.0)
    before = v_weights(model)
    r.restore(model, inputs)
    assert r.info["steps"][0]["eta"] == pytest.approx(math.sqrt(2 * delta / float(g @ g)), rel=1e-5)
    torch.testing.assert_close(v_weights(model) - before, -math.sqrt(2 * delta) * g / g.norm(),
                               rtol=1e-4, atol=1e-6)
    with torch.no_grad():
        assert r.passes > 0 and float(dataset_loss(model, [refusal])) < float(dataset_loss(ref, [refusal]))


# ----------------------------------------------------------------------------- influence n and step bookkeeping
def test_influence_n_prefers_the_configured_n_and_refuses_below_one():
    from vaa.restore.curvature import influence_n
    assert influence_n(5, 40) == 5 and influence_n(None, 40) == 40 and influence_n(1, None) == 1
    for bad in [(None, None), (0, 40), (None, 0), (-3, 7)]:
        with pytest.raises(ValueError, match=r"influence_n=.*attack\.n=.*the influence step needs n ≥ 1, "
                                             r"the size of the fine-tuning set; set one of them"):
            influence_n(*bad)


def test_influence_step_uses_the_configured_n_and_records_the_losses_around_it():
    from tests.test_restore import curvature
    model = tiny_llama(0, hidden=8)
    ref = copy.deepcopy(model)
    inputs, task, harm = curvature_inputs(attack_n=40)
    r = curvature("identity", variant="influence", influence_n=8)
    before = v_weights(model)
    r.restore(model, inputs)
    assert r.info["influence_n"] == 8
    params = [m.weight for m in v_projs(ref)]
    g, _ = C.gradient([(lambda: dataset_loss(ref, [harm]), 1.0)], params)
    torch.testing.assert_close(v_weights(model) - before, 4 / 8 * g, rtol=1e-4, atol=1e-6)
    with torch.no_grad():
        assert r.info["start"] == pytest.approx({"val_task": float(dataset_loss(ref, [task])),
                                                 "harmful": float(dataset_loss(ref, [harm]))}, rel=1e-6)
        assert r.info["steps"] == [pytest.approx({"val_task": float(dataset_loss(model, [task])),
                                                  "harmful": float(dataset_loss(model, [harm]))}, rel=1e-6)]


# ----------------------------------------------------------------------------- penalised variant (§1.2)
def _penalised_reference(model, task, other, *, sign, alpha, mu, clamp, lr, max_iter, history):
    """L-BFGS (strong Wolfe) on L_t + sign·α·L_o + (μ/2)‖θ − θ_ft‖² over the v_proj weights, with
    L_o = min(L_h, τ) for the harmful ascent (sign −1), the refusal NLL for sign +1."""
    params = [m.weight for m in v_projs(model)]
    for p in model.parameters():
        p.requires_grad_(any(p is q for q in params))
    anchor = [p.detach().clone() for p in params]
    opt = torch.optim.LBFGS(params, lr=lr, max_iter=max_iter, history_size=history,
                            line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        lo = dataset_loss(model, [other])
        if sign < 0:
            lo = torch.clamp(lo, max=clamp)
        j = (dataset_loss(model, [task]) + sign * alpha * lo
             + 0.5 * mu * sum(((p - a) ** 2).sum() for p, a in zip(params, anchor)))
        j.backward()
        return j
    with C.eager_attention(model):
        opt.step(closure)
    return v_weights(model)


@pytest.mark.parametrize("kw", [dict(alpha=0.7, mu=0.3, harmful_clamp=1e9, lbfgs_lr=0.5, lbfgs_max_iter=8),
                                dict(alpha=2.0, mu=3.0, harmful_clamp=3.0, lbfgs_lr=1.0, lbfgs_max_iter=3)])
def test_penalised_step_is_lbfgs_on_task_minus_alpha_clamped_harmful_plus_proximal(kw):
    """Spec §1.2: L-BFGS on L_t − α·min(L_h, τ) + (μ/2)‖θ − θ_ft‖² (the clamp binds in the second
    case: the harmful loss of the tiny model is ~3.4 nats); history = curvature.history."""
    model = tiny_llama(0, hidden=8)
    inputs, task, harm = curvature_inputs()
    ref = _penalised_reference(copy.deepcopy(model), task, harm, sign=-1.0, alpha=kw["alpha"], mu=kw["mu"],
                               clamp=kw["harmful_clamp"], lr=kw["lbfgs_lr"], max_iter=kw["lbfgs_max_iter"],
                               history=3)
    r = CurvatureRestore(modules=["v_proj"], geometry={"enabled": False}, step={"variant": "penalised", **kw},
                         curvature={"history": 3})
    before = v_weights(model)
    r.restore(model, inputs)
    got = v_weights(model)
    assert float((got - before).norm()) > 1e-3
    torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-6)
    assert set(r.info) >= {"start", "steps"} and r.info["start"]["harmful"] == pytest.approx(
        float(dataset_loss(tiny_llama(0, hidden=8), [harm]).detach()), rel=1e-5)
    assert r.info["steps"][0]["harmful"] == pytest.approx(float(dataset_loss(model, [harm]).detach()), rel=1e-5)
    assert all(p.requires_grad for p in model.parameters())


def test_penalised_refusal_objective_descends_the_refusal_loss():
    """objective=refusal: L_t + α·L_r + (μ/2)‖θ − θ_ft‖², with L_r the refusal NLL (not clamped)."""
    model = tiny_llama(0, hidden=8)
    _, task, harm = curvature_inputs()
    refusal = lm_batch(7)
    inputs = SimpleNamespace(task=lambda n, last=False: "task", harmful=lambda hp: "harm",
                             refusals=lambda split, n: "refusal",
                             batches=lambda ex, bs: [{"task": task, "harm": harm, "refusal": refusal}[ex]])
    ref = _penalised_reference(copy.deepcopy(model), task, refusal, sign=1.0, alpha=1.5, mu=0.2, clamp=None,
                               lr=1.0, max_iter=3, history=20)
    r = CurvatureRestore(modules=["v_proj"], geometry={"enabled": False},
                         step={"variant": "penalised", "objective": "refusal", "alpha": 1.5, "mu": 0.2,
                               "harmful_clamp": 0.1, "lbfgs_max_iter": 3})
    r.restore(model, inputs)
    torch.testing.assert_close(v_weights(model), ref, rtol=1e-4, atol=1e-6)
    with torch.no_grad():
        assert float(dataset_loss(model, [refusal])) < float(dataset_loss(tiny_llama(0, hidden=8), [refusal]))


def test_trust_region_accepts_a_harmful_loss_equal_to_the_clamp():
    """τ is an upper bound the step may reach (L_h ≤ τ): with δ = 0 the trial is θ itself, its
    harmful loss equals τ set to that value, and the first trial is accepted."""
    from tests.test_restore import curvature
    inputs, _, harm = curvature_inputs()
    model = tiny_llama(0, hidden=8)
    with torch.no_grad():
        tau = float(dataset_loss(model, [harm]))
    r = curvature("identity", variant="newton_trust_region", trust_radius=0.0, task_guard=0.0, harmful_clamp=tau)
    calls = []
    losses = r.losses
    r.losses = lambda m: calls.append(1) or losses(m)
    r.restore(model, inputs)
    assert r.info["start"]["harmful"] == tau and len(calls) == 2
