"""Mutation-found edges of vaa/methods/vaa.py (VAA's step: SAM at θ + ε, bernoulli / weighted
λ mixing, the EXP3 sampler's feedback, state) and gdro.py (specs/vaa.md §3, §6), on a toy MLP
with fixed group batches. The mutmut recipe and scores: tests/test_methods_mutants.py."""

from __future__ import annotations

import copy
from types import SimpleNamespace

import pytest
import torch
from omegaconf import OmegaConf

from tests.methods_toys import ToyModule, toy_vaa, grad_at, sam_eps, expected_sampler, net_at, ToyLM, toy_gdro
from vaa.methods import precision as prec


def test_vaa_bernoulli_perturbed_step_applies_the_gradient_at_theta_plus_eps():
    """vaa.md §3.5 (bernoulli, λ = 1): G = ∇L(θ + ρ·G0/(‖G0‖+1e-7)) on the sampled group's
    batch, applied at θ; the sampler sees L1; the logs carry both losses and ‖ε‖ = ρ."""
    method, module, stream, batches = toy_vaa(lambda_max=1.0, lambda_schedule="constant")
    theta = [p.detach().clone() for p in module.model.parameters()]
    logs = method.training_step(module, None)
    k = int(logs["dro/group"])
    assert stream.calls[k] == 1 and stream.calls[1 - k] == 0 and module.forwards == 2
    l0, g0 = grad_at(net_at(module.model, theta), batches[k])
    l1, g1 = grad_at(net_at(module.model, theta), batches[k], sam_eps(g0, 0.3))
    for p, t, g in zip(module.model.parameters(), theta, g1):
        assert torch.allclose(p, t - g, atol=1e-6)
    assert float(logs["loss"]) == pytest.approx(l0, rel=1e-6)
    assert float(logs[f"loss_clean/g{k}"]) == pytest.approx(l0, rel=1e-6)
    assert float(logs[f"loss_perturbed/g{k}"]) == pytest.approx(l1, rel=1e-6)
    assert float(logs["eps_norm"]) == pytest.approx(0.3, rel=1e-5)
    assert float(logs["eps_realised_norm"]) == pytest.approx(0.3, rel=1e-4)
    assert float(logs["eps_realised_cos"]) == pytest.approx(1.0, abs=1e-5)
    assert method.sampler.probs == pytest.approx(expected_sampler(method, k, l1))
    assert float(logs["dro/lambda"]) == 1.0 and float(logs["dro/p_vulnerable"]) == pytest.approx(method.sampler.probs[1])
    assert float(logs["dro/perturbed_fraction"]) == 1.0 and float(logs["dro/passes"]) == 2.0
    assert method.stats == {"steps": 1, "perturbed": 1, "passes": 2}
    assert method.trajectory == [(k, method.sampler.probs[1], pytest.approx(l0, rel=1e-6),
                                  pytest.approx(l1, rel=1e-6))]


@pytest.mark.parametrize("lam", [0.25, 0.7])
def test_vaa_weighted_step_mixes_gradients_and_losses_with_lambda(lam):
    """vaa.md §3.4 ``weighted``: G = (1−λ)G0 + λG1 and L = (1−λ)L0 + λL1 (what the sampler sees)."""
    method, module, stream, batches = toy_vaa(lambda_max=lam, lambda_schedule="constant",
                                               lambda_mixing="weighted")
    theta = [p.detach().clone() for p in module.model.parameters()]
    logs = method.training_step(module, None)
    k = int(logs["dro/group"])
    l0, g0 = grad_at(net_at(module.model, theta), batches[k])
    l1, g1 = grad_at(net_at(module.model, theta), batches[k], sam_eps(g0, 0.3))
    for p, t, a, b in zip(module.model.parameters(), theta, g0, g1):
        assert torch.allclose(p, t - ((1 - lam) * a + lam * b), atol=1e-6)
    assert method.sampler.probs == pytest.approx(expected_sampler(method, k, (1 - lam) * l0 + lam * l1))
    assert float(logs["loss"]) == pytest.approx(l0, rel=1e-6)
    assert method.stats == {"steps": 1, "perturbed": 1, "passes": 2}


def test_vaa_clean_step_at_lambda_zero_and_the_bernoulli_coin():
    """λ_0 = 0 (linear): a clean step G = G0, one pass, no coin drawn; then with λ ∈ (0, 1) the
    step is perturbed iff coin.random() > 1 − λ (the reference's rule)."""
    import random

    method, module, stream, batches = toy_vaa(lambda_max=0.6, lambda_schedule="linear", total_steps=2)
    theta = [p.detach().clone() for p in module.model.parameters()]
    logs = method.training_step(module, None)
    k = int(logs["dro/group"])
    _l0, g0 = grad_at(net_at(module.model, theta), batches[k])
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
    method, module, stream, _ = toy_vaa(lambda_max=0.0, sampler={"update_q": False})
    for _ in range(3):
        method.training_step(module, None)
    assert method.sampler.probs == [0.5, 0.5] and method.sampler.num_updates == 0
    method, module, stream, _ = toy_vaa(sizes=(0, 7), lambda_max=0.0)
    assert method.only_group == 1
    for _ in range(3):
        assert int(method.training_step(module, None)["dro/group"]) == 1
    assert stream.calls == [0, 3] and method.sampler.num_updates == 0
    method, module, stream, _ = toy_vaa(sizes=(5, 0), lambda_max=0.0)
    assert method.only_group == 0 and method.sampler.group_sizes == [5, 0]


def test_vaa_full_feedback_feeds_both_groups_clean_losses():
    from vaa.methods.dro.sampler import EXP3Sampler

    method, module, stream, batches = toy_vaa(lambda_max=0.0, sampler={"feedback": "full"})
    theta = [p.detach().clone() for p in module.model.parameters()]
    logs = method.training_step(module, None)
    k = int(logs["dro/group"])
    assert stream.calls[k] == 1 and stream.calls[1 - k] == 1
    losses = [grad_at(net_at(module.model, theta), b)[0] for b in batches]
    s = EXP3Sampler(num_groups=2, eta=0.5, clip=None, feedback="full", seed=0)
    s.update_full(losses)
    assert method.sampler.probs == pytest.approx(s.probs)


def test_vaa_sampler_takes_the_configured_knobs():
    method, *_ = toy_vaa(sizes=(6, 2), sampler={"init": "empirical", "clip": [0.2, 0.7], "eta": 0.25})
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
    method, *_ = toy_vaa(**dro)
    assert method.passes_per_step == pytest.approx(expected)


def test_vaa_rejects_an_unknown_mixing_and_schedule():
    from vaa.methods.vaa import lambda_at

    with pytest.raises(ValueError, match="dro.lambda_mixing must be bernoulli or weighted, got 'mean'"):
        toy_vaa(lambda_mixing="mean")
    assert lambda_at(20, 10, 0.5, "linear") == 0.5  # capped at λ_max
    assert lambda_at(3, 0, 0.5, "linear") == 0.5  # total 0: no division by zero
    with pytest.raises(ValueError, match="got 'cosine'"):
        lambda_at(1, 10, 1.0, "cosine")


def test_vaa_state_round_trips_and_an_empty_state_is_ignored():
    method, module, *_ = toy_vaa(lambda_max=0.5, lambda_schedule="constant")
    for _ in range(3):
        method.training_step(module, None)
    state = copy.deepcopy(method.state_dict())
    assert state["stats"] == method.stats and state["trajectory"] == method.trajectory
    other, *_ = toy_vaa(lambda_max=0.5, lambda_schedule="constant")
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


def test_gdro_datamodule_counts_groups_and_passes_the_extra_streams(monkeypatch):
    import vaa.data.datamodule as dmod

    seen = {}
    monkeypatch.setattr(dmod, "SFTDataModule", lambda *a, **kw: seen.update(kw) or "dm")
    m = toy_gdro()
    with pytest.raises(ValueError, match=r"^method=gdro needs vulnerability groups: set dro.groups_file or "
                                         r"let the estimate stage run \(dro.groups_file=null\)$"):
        m.make_datamodule([], None, groups=None)
    assert m.make_datamodule([], None, groups=[0, 1, 1, 0, 1], extra={"harmful": 1}, batch_size=2) == "dm"
    assert m.group_sizes == [2, 3] and seen["extra"] == {"harmful": 1} and seen["groups"] == [0, 1, 1, 0, 1]
    assert seen["batch_size"] == 2


def test_gdro_step_reweights_group_losses_and_keeps_q_over_a_new_setup():
    """vaa.md §6: loss = Σ_g q_g ℓ_g with q updated first (update_q); setup again keeps q."""
    from vaa.methods.dro.reweight import GroupLossReweighter, per_sample_token_mean_ce

    m = toy_gdro(init="empirical")
    m.group_sizes = [1, 3]
    module = ToyModule(ToyLM())
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
    frozen = toy_gdro(update_q=False)
    frozen.group_sizes = [1, 1]
    frozen.setup(ToyModule(ToyLM()), None)
    frozen.training_step(ToyModule(ToyLM()), batch)
    assert frozen.reweighter.probs == [0.5, 0.5]


def test_gdro_state_round_trip_and_empty_states():
    m = toy_gdro()
    assert m.state_dict() == {}
    m.load_state_dict({"reweighter": None})  # no reweighter yet: ignored
    m.group_sizes = [2, 2]
    m.setup(ToyModule(ToyLM()), None)
    m.load_state_dict({})
    state = m.state_dict()
    state["reweighter"]["q"] = [0.3, 0.7]
    m.load_state_dict(state)
    assert m.reweighter.probs == pytest.approx([0.3, 0.7])


def test_vaa_datamodule_needs_groups_and_artifacts_get_trajectory_and_stats(monkeypatch, tmp_path):
    import vaa.data.group_stream as gs
    import vaa.methods.vaa as vaa_mod

    method, *_ = toy_vaa()
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


def test_vaa_warns_when_a_group_is_empty_and_seeds_its_sampler(caplog):
    import logging

    with caplog.at_level(logging.WARNING, logger="vaa.methods.vaa"):
        toy_vaa(sizes=(0, 7))
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
    method, module, _stream, batches = toy_vaa(lambda_max=1.0, lambda_schedule="constant")
    module._trainer = SimpleNamespace(strategy=type("FSDPStrategy", (), {})(), log_every_n_steps=1,
                                      precision="32-true")
    theta = [p.detach().clone() for p in module.model.parameters()]
    logs = method.training_step(module, None)
    k = int(logs["dro/group"])
    _l0, g0 = grad_at(net_at(module.model, theta), batches[k])
    _l1, g1 = grad_at(net_at(module.model, theta), batches[k], sam_eps(g0, 0.3))
    for p, t, g in zip(module.model.parameters(), theta, g1):
        assert torch.allclose(p, t - g, atol=1e-6)


def test_vaa_refuses_a_sam_step_that_rounds_away_in_bf16():
    method, module, _stream, _ = toy_vaa(lambda_max=1.0, lambda_schedule="constant", sam={"rho": 1e-6})
    module.model.to(torch.bfloat16)
    module._trainer = SimpleNamespace(strategy=None, log_every_n_steps=1, precision="bf16-true")
    model = module.model
    module.lm_loss = lambda b: torch.nn.functional.mse_loss(model(b["x"].bfloat16()).float(), b["y"])
    with pytest.raises(prec.PerturbationRoundedAway, match=r"^method=vaa: in trainer.precision=bf16-true .* larger dro.sam.rho$"):
        method.training_step(module, None)
