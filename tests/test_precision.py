"""Perturbations in low precision (issue 13.1) and the precision / strategy guards (13.2, 13.3).

In bf16 a weight step that is small against a weight's ULP rounds away: each method that
perturbs either trains with a realised perturbation of at least half the nominal one (and
logs it as ``*_realised``) or stops with :class:`PerturbationRoundedAway` naming the knob.
"""

from __future__ import annotations

import copy
from types import SimpleNamespace

import pytest
import torch
from omegaconf import OmegaConf

from tests.test_baselines import METHODS, Harness, datamodule, world  # noqa: F401 (fixture)
from vaa.config.schema import AlignConfig, DROConfig
from vaa.errors import UserError
from vaa.methods.booster import Booster
from vaa.methods.precision import (MIN_REALISED_FRACTION, PerturbationRoundedAway, check_strategy,
                                   compute_dtype, realised_step)
from vaa.methods.perturb import perturb_weights
from vaa.methods.sft import SFT
from vaa.methods.vaa import VAA
from vaa.methods.vaccine import Vaccine


def test_compute_dtype_follows_the_precision():
    assert compute_dtype("bf16-mixed", torch.float32) is torch.bfloat16
    assert compute_dtype("bf16-true", torch.bfloat16) is torch.bfloat16
    assert compute_dtype("16-mixed", torch.float32) is torch.float16
    assert compute_dtype("32-true", torch.float32) is torch.float32


def test_realised_step_is_the_rounded_step_in_the_compute_dtype():
    torch.manual_seed(0)
    w = torch.randn(4096) * 0.02
    d = torch.randn(4096)
    eps = 1e-6 * d / d.norm()  # far below half a bf16 ULP of |w| ~ 0.02 (≈ 6e-5)
    after = w + eps
    n32, c32 = realised_step([w], [after], [d], "32-true")
    assert n32 == pytest.approx(float(eps.norm()), rel=1e-2) and c32 == pytest.approx(1, abs=1e-3)
    # fp32 master, bf16 forward copy: most entries unchanged, a few flipped by a whole ULP, so
    # what moved is mostly rounding noise (its norm may even exceed ε's): the cosine says so
    nbf, cbf = realised_step([w], [after], [d], "bf16-mixed")
    assert cbf < 0.2, (nbf, cbf)
    big = 0.5 * d / d.norm() * 64  # per entry ~ 0.5, far above the ULP: survives
    nb, cb = realised_step([w], [w + big], [d], "bf16-mixed")
    assert nb == pytest.approx(float(big.norm()), rel=1e-2) and cb > 0.99


def test_weight_perturbation_measures_in_bf16_and_restores_exactly():
    torch.manual_seed(0)
    p = (torch.randn(2048) * 0.02).to(torch.bfloat16)
    d = torch.randn(2048, dtype=torch.bfloat16)
    before = p.clone()
    with perturb_weights([p], direction=[d], rho=1e-4, measure="bf16-true") as info:
        assert info.realised_norm * info.realised_cos < MIN_REALISED_FRACTION * info.eps_norm
    assert torch.equal(p, before)
    with perturb_weights([p], direction=[d], rho=10.0, measure="bf16-true") as info:
        assert info.realised_norm == pytest.approx(10.0, rel=0.05) and info.realised_cos > 0.99
    assert torch.equal(p, before)


def bf16_harness(world, method, precision="bf16-true"):
    model = copy.deepcopy(world.model).to(torch.bfloat16)
    dm = datamodule(world, method)
    h = Harness(model, method, lr=1e-2)
    h._trainer = SimpleNamespace(precision=precision, log_every_n_steps=1, strategy=object())
    method.setup(h, dm)
    return h, next(iter(dm.train_dataloader()))


@pytest.mark.parametrize("name", sorted(METHODS))
def test_every_method_in_bf16_true_trains_with_half_its_perturbation_or_refuses(world, name):
    method = METHODS[name]()
    h, batch = bf16_harness(world, method)
    try:
        logs = h.step(batch)
    except PerturbationRoundedAway as e:
        assert "trainer.precision=bf16-true" in str(e)
        return
    assert torch.isfinite(logs["loss"])
    for key, nominal in (("eps_realised_norm", "eps_norm"), ("alpha_step_realised_norm", None)):
        key_cos = key.replace("_norm", "_cos")
        assert (key in logs) == (key_cos in logs)
        if key in logs:
            ref = float(logs[nominal]) if nominal else method.alpha
            assert float(logs[key]) * float(logs[key_cos]) \
                >= MIN_REALISED_FRACTION * ref, (key, logs)


def test_booster_vaa_setting_in_bf16_true_refuses_and_trains_in_fp32(world):
    # α = 0.001 spread over every weight of the model: below bf16's resolution
    h, batch = bf16_harness(world, Booster(lam=1.0, alpha=1e-4))
    with pytest.raises(PerturbationRoundedAway, match="method.alpha"):
        h.step(batch)
    fp32 = Harness(copy.deepcopy(world.model), m := Booster(lam=1.0, alpha=1e-4), lr=1e-2)
    fp32._trainer = SimpleNamespace(precision="32-true", log_every_n_steps=1, strategy=object())
    dm = datamodule(world, m)
    m.setup(fp32, dm)
    logs = fp32.step(next(iter(dm.train_dataloader())))
    assert float(logs["alpha_step_realised_norm"]) == pytest.approx(1e-4, rel=0.05)


def test_vaccine_hidden_perturbation_is_measured_and_refused_when_it_rounds_away(world):
    h, batch = bf16_harness(world, Vaccine(rho=1e-5))
    with pytest.raises(PerturbationRoundedAway, match="method.rho"):
        h.step(batch)
    h, batch = bf16_harness(world, Vaccine(rho=50.0))
    logs = h.step(batch)
    assert float(logs["eps_realised_norm"]) * float(logs["eps_realised_cos"]) \
        >= MIN_REALISED_FRACTION * float(logs["eps_norm"])


def vaa_module(world, rho, precision):
    import lightning as L

    from vaa.training.module import AlignModule

    dro = OmegaConf.merge(OmegaConf.structured(DROConfig),
                          {"lambda_max": 1.0, "lambda_schedule": "constant", "sam": {"rho": rho}})
    method = VAA(dro=dro, seed=0)
    groups = [i % 2 for i in range(len(world.align))]
    dm = method.make_datamodule(world.align, world.tok, groups=groups, batch_size=4, seed=0,
                                template="compact", max_length=96)
    module = AlignModule(copy.deepcopy(world.model), method,
                         OmegaConf.structured(AlignConfig(lr=1e-3, batch_size=4)), total_steps=1)
    trainer = L.Trainer(accelerator="cpu", devices=1, max_steps=1, max_epochs=-1, logger=False,
                        precision=precision, enable_progress_bar=False, enable_model_summary=False,
                        enable_checkpointing=False, num_sanity_val_steps=0, log_every_n_steps=1)
    return trainer, module, dm


def test_vaa_in_bf16_true_logs_the_realised_eps_or_refuses(world):
    trainer, module, dm = vaa_module(world, rho=0.4, precision="bf16-true")
    trainer.fit(module, datamodule=dm)
    m = trainer.callback_metrics
    assert float(m["align/eps_realised_norm"]) >= MIN_REALISED_FRACTION * 0.4
    assert 0.5 < float(m["align/eps_realised_cos"]) <= 1.0 + 1e-4
    trainer, module, dm = vaa_module(world, rho=1e-5, precision="bf16-true")
    with pytest.raises(PerturbationRoundedAway, match="dro.sam.rho"):
        trainer.fit(module, datamodule=dm)


def test_fp16_mixed_and_fsdp_are_refused_for_methods_that_would_compute_wrong():
    with pytest.raises(UserError, match="bf16-mixed"):
        check_strategy(SFT(), "16-mixed", "SingleDeviceStrategy")
    with pytest.raises(UserError, match="trainer=ddp"):
        check_strategy(Booster(), "bf16-mixed", "FSDPStrategy")
    check_strategy(SFT(), "bf16-mixed", "FSDPStrategy")  # global norms: allowed
    check_strategy(Booster(), "bf16-true", "DDPStrategy")
