"""The optimizer of a training stage: ``<recipe>.optimizer`` (``align.optimizer``,
``attack.optimizer``, ``model.pretrain.optimizer``).

- ``adamw``: ``torch.optim.AdamW``; its state m, v has the parameters' dtype (8 bytes per
  fp32 parameter: the largest term of a 7B full fine-tune, vaa/plan/memory.py);
- ``adamw_8bit``: bitsandbytes' ``AdamW8bit`` (T. Dettmers et al., *8-bit Optimizers via
  Block-wise Quantization*, ICLR 2022): m, v stored as block-wise quantised 8-bit values,
  2 bytes per parameter (tensors under 4,096 entries keep 32-bit state);
- ``paged_adamw_8bit``: bitsandbytes' ``PagedAdamW8bit``: the same, its state in CUDA unified
  memory, paged out to host memory when the GPU runs short instead of failing (on a CPU it
  falls back to the unpaged one).

Same hyperparameters (lr, betas, weight decay) for all three. bitsandbytes is the optional
extra ``gpu`` (``pip install -e ".[gpu]"``); without it the 8-bit choices raise one
:class:`vaa.errors.UserError` naming the key and the install.
"""

from __future__ import annotations

from typing import Iterable

import torch

from vaa.errors import UserError

BNB = {"adamw_8bit": "AdamW8bit", "paged_adamw_8bit": "PagedAdamW8bit"}
OPTIMIZERS = ("adamw", *BNB)


def fused(params: list) -> dict:
    """``{"fused": True}`` when every parameter is a plain floating tensor on a CPU or a CUDA
    device (torch's one-kernel AdamW; on 1 CPU thread of a busy machine its step over
    SmolLM2-135M's 134.5 M parameters took 0.36 s vs 2.5 s for the per-tensor default, which
    was about a fifth of a full fine-tuning step), else ``{}`` (torch's default: e.g. sharded DTensor parameters).
    Same update up to float rounding."""
    ok = bool(params) and all(type(p.data) is torch.Tensor and p.is_floating_point()
                              and p.device.type in ("cpu", "cuda") for p in params)
    return {"fused": True} if ok else {}


def build_optimizer(params: Iterable[torch.nn.Parameter], recipe, key: str = "align") -> torch.optim.Optimizer:
    """The optimizer ``recipe.optimizer`` (default ``adamw``) over ``params``; ``key`` names the
    recipe's config node in errors (``align``, ``attack``, ``model.pretrain``)."""
    name = str(getattr(recipe, "optimizer", None) or "adamw")
    kwargs = {"lr": recipe.lr, "weight_decay": recipe.weight_decay, "betas": tuple(recipe.betas)}
    if name == "adamw":
        params = list(params)
        return torch.optim.AdamW(params, **kwargs, **fused(params))
    if name not in BNB:
        raise UserError(f"{key}.optimizer={name}: unknown optimizer; use one of {', '.join(OPTIMIZERS)}")
    try:
        import bitsandbytes as bnb
    except ImportError as e:
        raise UserError(f"{key}.optimizer={name} needs bitsandbytes ({type(e).__name__}: {e}); install it with "
                        f"pip install -e \".[gpu]\" (or pip install bitsandbytes), or use {key}.optimizer=adamw") from e
    return getattr(bnb.optim, BNB[name])(params, **kwargs)
