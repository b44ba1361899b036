"""Mutation-found edges of vaa/methods/booster.py, vaccine.py and hooks.py (specs/baselines.md
§2, §4): Booster's G = g_a + λ(g_h − g_h′) in each variant, Vaccine's hidden-state ε on a toy
residual stack, the hooks. The mutmut recipe and scores: tests/test_methods_mutants.py."""

from __future__ import annotations

import copy
import math
from types import SimpleNamespace

import pytest
import torch

from tests.methods_toys import (FixedStream, ToyModule, grad_at, net_at, toy_booster, ToyAttn, ToyStack,
                                toy_batch, xy_batch, tiny_grad_toy, SkipToy, bf16_module)
from vaa.methods import precision as prec


@pytest.mark.parametrize("variant", ["upstream", "vaa_sign_bug"])
def test_booster_without_meta_term_steps_with_ga_plus_lambda_gh(variant):
    """baselines.md §4, ``meta_term: false``: G = g_a + λ·g_h (two passes; no α step)."""
    method, module, (hb, ab) = toy_booster(lam=2.5, alpha=0.3, meta_term=False, variant=variant)
    theta = [p.detach().clone() for p in module.model.parameters()]
    logs = method.training_step(module, ab)
    lh, gh = grad_at(net_at(module.model, theta), hb)
    la, ga = grad_at(net_at(module.model, theta), ab)
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
    method, module, (hb, ab) = toy_booster(lam=1.0, alpha=0.2)
    theta = [p.detach().clone() for p in module.model.parameters()]
    logs = method.training_step(module, ab)
    _lh, gh = grad_at(net_at(module.model, theta), hb)
    n = math.sqrt(sum(float(x.square().sum()) for x in gh))
    lh1, _ = grad_at(net_at(module.model, theta), hb, [-0.2 * x / (n + 1e-7) for x in gh])
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
    method, module, _ = toy_booster()
    ps = method.params
    ps[0].grad = torch.ones_like(ps[0])
    g = method.take_grads()
    assert g[0] is not None and torch.equal(g[0], torch.ones_like(ps[0]))
    assert torch.equal(g[1], torch.zeros_like(ps[1])) and all(p.grad is None for p in ps)
    assert method.restore_buffers == [None] * len(ps) and method.layers is None


def test_vaccine_both_passes_on_tuple_list_and_plain_outputs():
    """baselines.md §2: ε_l = ρ·g_l/(‖g‖+1e-7), g_l = ∂f/∂e_l over all layers; the parameter
    gradient is ∇θ f(θ; e + ε); logs: clean loss, ‖g‖, ‖ε‖ = ρ, and the realised ε."""
    from vaa.methods.hooks import layer_modules
    from vaa.methods.vaccine import perturbed_backward

    model, batch = ToyStack(), toy_batch()
    module = ToyModule(model)
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

    model = ToyStack()
    extra = ToyAttn()  # matched but never run
    with pytest.raises(RuntimeError, match="captured 3 of 4 attention outputs"):
        hidden_perturbation(ToyModule(model), toy_batch(), [l.self_attn for l in model.layers] + [extra], 1.0)
    with pytest.raises(ValueError, match="method.rho must be >= 0, got -1"):
        Vaccine(rho=-1)
    v = Vaccine(rho=0)
    assert v.rho == 0.0 and v.passes_per_step == 2 and Vaccine().rho == 2.0
    v = Vaccine(rho=1, attn_pattern=r"layers\.\d+\.self_attn$")
    v.setup(SimpleNamespace(model=model), None)
    assert v.layers == [l.self_attn for l in model.layers]


def test_vaccine_training_step_steps_with_the_perturbed_gradient():
    from vaa.methods.vaccine import Vaccine

    model, batch = ToyStack(), toy_batch()
    module = ToyModule(model)
    v = Vaccine(rho=0.5)
    v.setup(module, None)
    ref = copy.deepcopy(model)
    from vaa.methods.vaccine import perturbed_backward

    want = perturbed_backward(ToyModule(ref), batch, [l.self_attn for l in ref.layers], 0.5)
    theta = [p.detach().clone() for p in model.parameters()]
    logs = v.training_step(module, batch)
    for p, t, r in zip(model.parameters(), theta, ref.parameters()):
        assert torch.allclose(p, t - r.grad, atol=1e-6)
    assert float(logs["loss"]) == pytest.approx(float(want["loss"]))
    assert float(logs["grad_norm"]) > 0 and float(logs["eps_norm"]) == pytest.approx(0.5, rel=1e-5)


def test_layer_modules_errors_name_the_pattern_and_the_layer_count():
    from vaa.methods.hooks import layer_modules, num_layers

    model = ToyStack()
    assert num_layers(model) == 3 and num_layers(torch.nn.Linear(1, 1)) is None
    nested = SimpleNamespace(get_text_config=lambda: SimpleNamespace(num_hidden_layers=5))
    assert num_layers(SimpleNamespace(config=nested)) == 5
    with pytest.raises(ValueError, match=r"no module of ToyStack matches 'nothing'; set the method's layer pattern"):
        layer_modules(model, "nothing")
    with pytest.raises(ValueError, match=r"'layers\\\\.0\\\\.self_attn\$' matches 1 modules \(\['layers.0.self_attn'\] …\) but "
                                         r"the model has 3 layers"):
        layer_modules(model, r"layers\.0\.self_attn$")
    model.config = None  # no config: any count is accepted
    assert len(layer_modules(model, r"layers\.0\.self_attn$")) == 1


def test_add_to_outputs_skips_none_deltas_and_counts_modules():
    from vaa.methods.hooks import AddToOutputs, CaptureOutputs

    model, batch = ToyStack(), toy_batch()
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


def test_vaccine_eps_denominator_is_norm_plus_1e_7():
    from vaa.methods.vaccine import hidden_perturbation

    model, module, batch = tiny_grad_toy()
    _clean, eps, norm = hidden_perturbation(module, batch, [l.self_attn for l in model.layers], 2.0)
    n = float(norm)
    got = math.sqrt(sum(float(e.square().sum()) for e in eps))
    assert got == pytest.approx(2.0 * n / (n + 1e-7), rel=1e-5)


def test_vaccine_a_block_the_loss_ignores_gets_no_perturbation():
    from vaa.methods.vaccine import hidden_perturbation, perturbed_backward

    model = SkipToy()
    module = ToyModule(model)
    layers = [l.self_attn for l in model.layers]
    _clean, eps, _n = hidden_perturbation(module, toy_batch(), layers, 1.0)
    assert eps[1] is None and eps[0] is not None and eps[2] is not None
    logs = perturbed_backward(module, toy_batch(), layers, 1.0)
    assert float(logs["eps_norm"]) == pytest.approx(1.0, rel=1e-5)


def test_vaccine_and_booster_refuse_a_perturbation_that_rounds_away_naming_their_knob():
    """precision.py: measured on the first step in the trainer's precision; an ε / α step that
    vanishes in bf16 is refused with the method's own knob in the message."""
    from vaa.methods.booster import Booster
    from vaa.methods.vaccine import Vaccine

    model = ToyStack().to(torch.bfloat16)  # hidden states of magnitude ~1 in bf16: ρ = 1e-4 rounds away
    module = bf16_module(model)
    module.lm_loss = lambda b: torch.nn.functional.mse_loss(model(b["x"].bfloat16()).float(), b["y"])
    v = Vaccine(rho=1e-4)
    v.setup(module, None)
    with pytest.raises(prec.PerturbationRoundedAway, match=r"^method=vaccine: in trainer.precision=bf16-true .* larger method.rho$"):
        v.training_step(module, toy_batch())
    big = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Tanh(), torch.nn.Linear(4, 1))
    with torch.no_grad():
        for p in big.parameters():
            p.fill_(100.0)
    module = bf16_module(big)
    b = Booster(alpha=1e-4, lam=1.0)
    b.setup(module, SimpleNamespace(streams={"harmful": FixedStream([xy_batch(7)])}))
    with pytest.raises(prec.PerturbationRoundedAway, match=r"^method=booster: in trainer.precision=bf16-true .* larger method.alpha$"):
        b.training_step(module, xy_batch(8))


def test_vaccine_training_step_measures_on_the_first_step():
    from vaa.methods.vaccine import Vaccine

    model = ToyStack()
    module = ToyModule(model)
    module._trainer = SimpleNamespace(log_every_n_steps=50, precision="32-true", strategy=None)
    module.global_step = 3
    v = Vaccine(rho=0.5)
    v.setup(module, None)
    logs = v.training_step(module, toy_batch())
    assert float(logs["eps_realised_norm"]) == pytest.approx(0.5, rel=1e-4)
    assert "eps_realised_norm" not in v.training_step(module, toy_batch())


def test_booster_sign_bug_moves_by_plus_alpha_twice_with_the_1e_7_denominator():
    """``vaa_sign_bug``: g_h′ at θ + α·g_h/(‖g_h‖+1e-7) and θ left at θ + 2α·ĝ_h; G = g_a +
    λ(g_h − g_h′) taken at θ + 2α·ĝ_h (baselines.md §4). A tiny loss scale makes the +1e-7 show."""
    method, module, (hb, ab) = toy_booster(lam=0.5, alpha=0.3, variant="vaa_sign_bug")
    model = module.model
    module.lm_loss = lambda b: 1e-7 * torch.nn.functional.mse_loss(model(b["x"]), b["y"])
    theta = [p.detach().clone() for p in model.parameters()]

    def grad(at, batch):
        m = net_at(model, at)
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

    attn = ToyAttn("tuple")
    with pytest.raises(KeyError):
        with CaptureOutputs([attn]):
            raise KeyError("body")
    assert not attn._forward_hooks
    with AddToOutputs([attn], [torch.ones(4)]):
        out = attn(torch.zeros(1, 4))
    assert isinstance(out, tuple) and out[1] is None and out[0].shape == (1, 4)
    lst = ToyAttn("list")
    with AddToOutputs([lst], [torch.ones(4)]):
        out = lst(torch.zeros(1, 4))
    assert isinstance(out, list) and out[1] is None


def test_booster_perturb_aware_takes_vaccines_gradient_and_logs_its_eps():
    """``perturb_aware: true``: g_a is Vaccine's perturbed alignment gradient (baselines.md §4)."""
    from vaa.methods.booster import Booster
    from vaa.methods.vaccine import perturbed_backward

    model = ToyStack()
    module = ToyModule(model)
    hb, ab = toy_batch(), {k: v.flip(0) for k, v in toy_batch().items()}
    b = Booster(lam=0.0, alpha=0.1, perturb_aware=True, vaccine_rho=0.4)
    b.setup(module, SimpleNamespace(streams={"harmful": FixedStream([hb])}))
    assert b.layers == [l.self_attn for l in model.layers]
    ref = copy.deepcopy(model)
    want = perturbed_backward(ToyModule(ref), ab, [l.self_attn for l in ref.layers], 0.4)
    theta = [p.detach().clone() for p in model.parameters()]
    logs = b.training_step(module, ab)
    for p, t, r in zip(model.parameters(), theta, ref.parameters()):
        assert torch.allclose(p, t - r.grad, atol=1e-6)  # λ = 0: G = g_a(perturbed)
    assert float(logs["eps_norm"]) == pytest.approx(0.4, rel=1e-5)
    assert float(logs["loss"]) == pytest.approx(float(want["loss"]))
