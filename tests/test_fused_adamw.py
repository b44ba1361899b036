"""The stages' AdamW is torch's fused kernel where every parameter allows it
(vaa.training.optim.fused): same update as the per-tensor default up to float rounding."""

from __future__ import annotations

import torch
from omegaconf import OmegaConf

from vaa.training.optim import build_optimizer, fused


def test_fused_adamw_on_cpu_steps_like_the_default():
    r = OmegaConf.create({"lr": 1e-2, "weight_decay": 0.1, "betas": [0.9, 0.95]})
    torch.manual_seed(0)
    w0, grads = torch.randn(64, 32), [torch.randn(64, 32) for _ in range(5)]
    out = {}
    for name, make in (("fused", lambda ps: build_optimizer(ps, r)),
                       ("default", lambda ps: torch.optim.AdamW(ps, lr=1e-2, weight_decay=0.1,
                                                                betas=(0.9, 0.95)))):
        p = torch.nn.Parameter(w0.clone())
        opt = make([p])
        for g in grads:
            p.grad = g.clone()
            opt.step()
        out[name] = (p.detach().clone(), opt)
    assert out["fused"][1].param_groups[0]["fused"] is True
    assert torch.allclose(out["fused"][0], out["default"][0], atol=1e-6, rtol=0)
    assert not torch.equal(out["fused"][0], w0)


def test_not_fused_for_integer_or_empty_parameter_lists():
    assert fused([]) == {}
    assert fused([torch.nn.Parameter(torch.zeros(2, dtype=torch.long), requires_grad=False)]) == {}
    assert fused([torch.nn.Parameter(torch.zeros(2))]) == {"fused": True}
