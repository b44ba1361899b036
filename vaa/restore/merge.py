"""Pre/post-tuning model merging (Farn et al., arXiv 2412.19512, Findings of EMNLP 2025).

θ = merge(θ_pre, θ_post; λ) tensor by tensor, with θ_pre the *aligned* model before HFT and
θ_post the fine-tuned one (specs/restoration.md §3). No data, no passes: one sweep over the
weights. No public code; the list of merging methods is not confirmed by the paper, so the
standard family is implemented:

- ``linear``: (1 − λ)·θ_pre + λ·θ_post (λ = 0 and λ = 1 return the endpoints bit-exactly);
- ``slerp``: spherical interpolation per tensor (linear where the tensors are near-parallel);
- ``dare``: drop each entry of τ = θ_post − θ_pre with probability d, rescale by 1/(1 − d);
- ``ties``: keep the top-``density`` of τ by magnitude, then θ_pre + λ·τ̂ (with two models the
  sign election of TIES is the sign of τ itself, so it reduces to trimming).

The coefficient sweep is a Hydra sweep (``vaa -m restore=merge restore.alpha=0,0.25,0.5``):
every job reuses the cached aligned and fine-tuned models and merges in a fraction of a second.
"""

from __future__ import annotations

import torch

from vaa.restore.base import Restorer
from vaa.restore.schema import MergeRestoreConfig


def slerp(a: torch.Tensor, b: torch.Tensor, t: float, eps: float = 1e-7) -> torch.Tensor:
    if t == 0.0:
        return a.clone()
    if t == 1.0:
        return b.clone()
    a32, b32 = a.float().flatten(), b.float().flatten()
    na, nb = a32.norm(), b32.norm()
    if na < eps or nb < eps:
        return torch.lerp(a.float(), b.float(), t).to(a.dtype)
    cos = torch.clamp(torch.dot(a32 / na, b32 / nb), -1.0, 1.0)
    omega = torch.arccos(cos)
    if omega.abs() < 1e-4:  # near-parallel: slerp → lerp
        return torch.lerp(a.float(), b.float(), t).to(a.dtype)
    s = torch.sin(omega)
    out = (torch.sin((1 - t) * omega) / s) * a32 + (torch.sin(t * omega) / s) * b32
    return out.view_as(a).to(a.dtype)


def _linear(pre, post, hp, lam, gen):
    return (1 - lam) * pre + lam * post


def _slerp(pre, post, hp, lam, gen):
    return slerp(pre, post, lam)


def _dare(pre, post, hp, lam, gen):
    """Task vector with a random ``drop`` fraction dropped and the rest rescaled."""
    if not 0.0 <= hp.drop < 1.0:
        raise ValueError(f"restore.drop must be in [0, 1), got {hp.drop}")
    tau = post - pre
    # drawn on the host from the seeded CPU generator (the same mask on any device), then moved
    keep = (torch.rand(tau.shape, generator=gen, device="cpu") >= hp.drop).to(tau.device)
    return pre + lam * tau * keep / (1 - hp.drop)


def _ties(pre, post, hp, lam, gen):
    """Task vector trimmed to its ``density`` fraction of largest magnitudes."""
    tau = post - pre
    k = max(1, int(round(hp.density * tau.numel())))
    thresh = tau.abs().flatten().kthvalue(tau.numel() - k + 1).values
    return pre + lam * tau * (tau.abs() >= thresh)


# restore.method → rule(pre, post, hp, α, generator): the merged tensor
MERGE_RULES = {"linear": _linear, "slerp": _slerp, "dare": _dare, "ties": _ties}


class Merge(Restorer):
    schema = MergeRestoreConfig
    reads = ("aligned",)

    def merge_tensor(self, pre: torch.Tensor, post: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
        rule = MERGE_RULES.get(self.hp.method)
        if rule is None:
            raise ValueError(f"restore.method={self.hp.method!r}; use one of {sorted(MERGE_RULES)}")
        return rule(pre, post, self.hp, float(self.hp.alpha), gen)

    @torch.no_grad()
    def restore(self, model, inputs):
        pre = dict(inputs.load("aligned").named_parameters())
        gen = torch.Generator().manual_seed(self.hp.seed)
        for name, p in model.named_parameters():
            if name not in pre or pre[name].shape != p.shape:
                raise ValueError(f"merge: parameter {name} missing or shaped differently in the aligned "
                                 f"model; both endpoints must share one architecture and vocabulary")
            p.copy_(self.merge_tensor(pre[name], p.detach().clone(), gen))
        self.info = {"merge": self.hp.method, "alpha": self.hp.alpha}
        return model
