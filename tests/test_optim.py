"""<recipe>.optimizer (vaa/training/optim.py): torch's AdamW by default, bitsandbytes' 8-bit AdamW
(paged or not) when asked, one UserError naming the key and the install when bitsandbytes is
missing; each module names its own recipe key; the 8-bit state is 2 bytes per weight, as
vaa-plan counts it."""

from __future__ import annotations

import importlib.util
import sys

import pytest
import torch
from omegaconf import OmegaConf

from vaa.errors import UserError
from vaa.training.module import AlignModule, FinetuneModule, PretrainModule
from vaa.training.optim import OPTIMIZERS, build_optimizer

HAS_BNB = importlib.util.find_spec("bitsandbytes") is not None


def recipe(optimizer: str | None = "adamw"):
    r = {"lr": 1e-3, "weight_decay": 0.1, "betas": [0.9, 0.95]}
    return OmegaConf.create(r | ({"optimizer": optimizer} if optimizer else {}))


def test_adamw_by_default_with_the_recipe_values():
    p = [torch.nn.Parameter(torch.zeros(3))]
    for r in (recipe(None), recipe("adamw")):
        opt = build_optimizer(p, r)
        assert type(opt) is torch.optim.AdamW
        g = opt.param_groups[0]
        assert (g["lr"], g["weight_decay"], g["betas"]) == (1e-3, 0.1, (0.9, 0.95))


def test_the_config_rules_list_the_same_optimizers():
    from vaa.config.rules import OPTIMIZERS as RULES

    assert tuple(RULES) == OPTIMIZERS


def test_missing_bitsandbytes_is_one_user_error_naming_the_key(monkeypatch):
    monkeypatch.setitem(sys.modules, "bitsandbytes", None)  # import fails
    with pytest.raises(UserError) as e:
        build_optimizer([torch.nn.Parameter(torch.zeros(3))], recipe("paged_adamw_8bit"), "attack")
    msg = str(e.value)
    assert msg.startswith("attack.optimizer=paged_adamw_8bit needs bitsandbytes") and '".[gpu]"' in msg
    assert "attack.optimizer=adamw" in msg and "\n" not in msg
    with pytest.raises(UserError, match="unknown optimizer"):
        build_optimizer([torch.nn.Parameter(torch.zeros(3))], recipe("sgd"))


def test_modules_name_their_recipe_key():
    assert (AlignModule.recipe_key, FinetuneModule.recipe_key, PretrainModule.recipe_key) == \
        ("align", "attack", "model.pretrain")


@pytest.mark.skipif(not HAS_BNB, reason="needs bitsandbytes (pip install -e '.[gpu]')")
@pytest.mark.parametrize("name, cls", [("adamw_8bit", "AdamW8bit"), ("paged_adamw_8bit", "PagedAdamW8bit")])
def test_8bit_adamw_steps_like_adamw_with_2_bytes_of_state(name, cls):
    """One step on a (256, 256) weight: the 8-bit state is uint8 m and v (2 bytes per weight,
    vaa.plan.memory's 2·P_t·1) and the update matches torch's AdamW to within its quantisation."""
    import bitsandbytes as bnb

    torch.manual_seed(0)
    w0 = torch.randn(256, 256) * 0.02
    g = torch.randn(256, 256)
    steps = {}
    for opt_name in ("adamw", name):
        p = torch.nn.Parameter(w0.clone())
        opt = build_optimizer([p], recipe(opt_name))
        for _ in range(3):
            p.grad = g.clone()
            opt.step()
        steps[opt_name] = (p.detach() - w0, opt)
    opt = steps[name][1]
    assert type(opt) is getattr(bnb.optim, cls)
    state = next(iter(opt.state.values()))
    assert state["state1"].dtype == torch.uint8 and state["state2"].dtype == torch.uint8
    assert state["state1"].numel() + state["state2"].numel() == 2 * w0.numel()
    ref, got = steps["adamw"][0], steps[name][0]
    assert torch.nn.functional.cosine_similarity(ref.flatten(), got.flatten(), dim=0) > 0.99
    assert (got - ref).norm() < 0.05 * ref.norm()


@pytest.mark.skipif(not HAS_BNB, reason="needs bitsandbytes (pip install -e '.[gpu]')")
def test_gpu_check_runs_the_presets_setting_on_cpu(capsys):
    """benchmarks.gpu_check --optimizer: the paper presets' VAA setting (32-true, paged 8-bit
    AdamW, full fine-tuning) on the tiny shape, on the CPU; a GPU runs it on 7B."""
    from benchmarks.gpu_check import main

    out = main(["--shapes", "tiny", "--device", "cpu", "--steps", "1", "--precisions", "32-true",
                "--modes", "full", "--methods", "vaa", "--optimizer", "paged_adamw_8bit"])
    (run,) = out["runs"]
    assert run["status"] == "ok" and run["optimizer"] == "paged_adamw_8bit", run
    assert run["eps_realised_cos"] == pytest.approx(1.0, abs=1e-3)  # fp32 represents ε
