"""Geometry diagnostic of curvature-aware restoration (specs/restoration.md §1.5).

Does the fine-tuned model keep the aligned model's harmful-loss landscape? Two measures:

1. loss correlation: per-example NLL under θ_0 (aligned, pre-HFT) and θ_ft, on harmful rows
   D_h and task rows D_t; Pearson and Spearman. The paper predicts high on D_h, lower on D_t;
2. curvature: the top-k eigenpairs of the Gauss-Newton matrix of L_h (over the restored
   parameters) at θ_0 and at θ_ft, by subspace iteration; eigenvalue ratios ft/0 and the
   subspace overlap ‖U_0ᵀU_ft‖²_F / k (1 = same top directions, ≈ k/dim for random ones).
"""

from __future__ import annotations

import time

import torch

from vaa.restore import curvature_ops as C
from vaa.restore.base import per_example_losses


def pearson(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double() - a.double().mean(), b.double() - b.double().mean()
    return float((a @ b) / (a.norm() * b.norm()).clamp_min(1e-30))


def spearman(a: torch.Tensor, b: torch.Tensor) -> float:
    return pearson(a.argsort().argsort().double(), b.argsort().argsort().double())


def harmful_ggn_eigs(model, batches, linears, k: int, iters: int, seed: int):
    # local import: curvature.py imports this module
    from vaa.restore.curvature_terms import logit_terms

    params = [m.weight for m in linears(model)]
    flags = [p.requires_grad for p in model.parameters()]
    for p in model.parameters():
        p.requires_grad_(False)
    for p in params:
        p.requires_grad_(True)
    try:
        with C.eager_attention(model):
            terms = logit_terms(model, batches)
            dim = sum(p.numel() for p in params)
            return C.top_eigs(lambda v: C.ggn_vp(terms, params, v), dim, k, iters, seed,
                              device=params[0].device)
    finally:
        for p, f in zip(model.parameters(), flags):
            p.requires_grad_(f)


def geometry_report(aligned, finetuned, inputs, hp, linears) -> dict:
    g = hp.geometry
    t0 = time.perf_counter()
    harm = inputs.batches(inputs.harmful(hp)[:g.n_rows], hp.batch_size)
    task = inputs.batches(inputs.task(g.n_rows), hp.batch_size)
    out = {}
    for name, b in (("harmful", harm), ("task", task)):
        l0, lft = per_example_losses(aligned, b), per_example_losses(finetuned, b)
        out[f"loss_pearson_{name}"] = pearson(l0, lft)
        out[f"loss_spearman_{name}"] = spearman(l0, lft)
        out[f"mean_loss_{name}_aligned"] = float(l0.mean())
        out[f"mean_loss_{name}_finetuned"] = float(lft.mean())
    if g.top_k > 0:
        e0, u0 = harmful_ggn_eigs(aligned, harm, linears, g.top_k, g.power_iters, hp.seed)
        e1, u1 = harmful_ggn_eigs(finetuned, harm, linears, g.top_k, g.power_iters, hp.seed)
        out["eigs_aligned"] = e0.tolist()
        out["eigs_finetuned"] = e1.tolist()
        out["eig_ratio_ft_over_aligned"] = (e1 / e0.clamp_min(1e-30)).tolist()
        out["subspace_overlap"] = float((u0.T @ u1).pow(2).sum() / g.top_k)
    out["wall_s"] = round(time.perf_counter() - t0, 3)
    return out
