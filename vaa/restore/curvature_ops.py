"""Curvature operators for restoration: HVPs, inverse-HVP solvers, diagonal Fisher, K-FAC.

Everything works on a list of parameter tensors ``params`` and flat float32 vectors over them.
A loss is given as a list of ``(closure, weight)`` pairs (one per batch, weights summing to 1),
so a dataset larger than one batch is one fixed objective and H is one matrix.

Library choice: ``curvlinops-for-pytorch`` offers HVP/GGN/K-FAC linear operators and CG
inverses, but pulls in backpack, linear_operator, scipy, einconv and opt-einsum, and its
operators expect (X, y) data with a loss on the model output, while ours is a response-masked
causal-LM loss on dict batches. The products here are a few lines of ``torch.autograd`` each
(HVP: double backward; GGN: the double-vjp trick, reverse mode only), tested against dense solves.
"""

from __future__ import annotations

import contextlib
import math
from typing import Callable, Sequence

import torch
from torch import Tensor

LossTerms = Sequence[tuple[Callable[[], Tensor], float]]
LogitTerms = Sequence[tuple[Callable[[], Tensor], float]]  # closures returning (logits, targets)


@contextlib.contextmanager
def eager_attention(model: torch.nn.Module):
    """Within: eager attention, because fused SDPA kernels (the CPU flash kernel among them)
    have no double backward, which exact HVPs and the double-vjp GGN product need (spec §1.6).
    The model's own kernel is set back on exit, so the saved model keeps it."""
    before = getattr(getattr(model, "config", None), "_attn_implementation", None)
    if before and hasattr(model, "set_attn_implementation"):
        model.set_attn_implementation("eager")
    try:
        yield model
    finally:
        if before and hasattr(model, "set_attn_implementation"):
            model.set_attn_implementation(before)


def flat(tensors: Sequence[Tensor | None], params: Sequence[Tensor]) -> Tensor:
    return torch.cat([(t if t is not None else torch.zeros_like(p)).reshape(-1).float()
                      for t, p in zip(tensors, params)])


def unflat(vec: Tensor, params: Sequence[Tensor]) -> list[Tensor]:
    out, i = [], 0
    for p in params:
        out.append(vec[i:i + p.numel()].view_as(p).to(p.dtype))
        i += p.numel()
    return out


@torch.no_grad()
def add_(params: Sequence[Tensor], vec: Tensor, alpha: float = 1.0) -> None:
    for p, d in zip(params, unflat(vec, params)):
        p.add_(d, alpha=alpha)


def gradient(terms: LossTerms, params: Sequence[Tensor]) -> tuple[Tensor, float]:
    """(∇L flat, L) of the weighted loss."""
    g = torch.zeros(sum(p.numel() for p in params), device=params[0].device)  # fp32, on the model
    total = 0.0
    for fn, w in terms:
        loss = fn() * w
        g += flat(torch.autograd.grad(loss, params, allow_unused=True), params)
        total += float(loss.detach())
    return g, total


def hvp_exact(terms: LossTerms, params: Sequence[Tensor], v: Tensor) -> Tensor:
    """Hv by double backward: ∇(∇L · v)."""
    out = torch.zeros_like(v)
    vs = unflat(v, params)
    for fn, w in terms:
        grads = torch.autograd.grad(fn() * w, params, create_graph=True, allow_unused=True)
        dot = sum((g * u).sum() for g, u in zip(grads, vs) if g is not None)
        out += flat(torch.autograd.grad(dot, params, allow_unused=True), params)
    return out


def ggn_vp(terms: LogitTerms, params: Sequence[Tensor], v: Tensor) -> Tensor:
    """Gauss-Newton product Jᵀ H_out J v of a mean cross-entropy (PSD; no second derivative of
    the network). Jv by the double-vjp trick (reverse mode twice), so no forward-mode AD."""
    out = torch.zeros_like(v)
    vs = unflat(v, params)
    for fn, w in terms:
        logits, _ = fn()  # (N, V) at the positions that carry a label
        u = torch.zeros_like(logits, requires_grad=True)
        jt_u = torch.autograd.grad(logits, params, grad_outputs=u, create_graph=True, allow_unused=True)
        pairs = [(g, x) for g, x in zip(jt_u, vs) if g is not None]
        jv = torch.autograd.grad([g for g, _ in pairs], u, grad_outputs=[x for _, x in pairs])[0]
        p = torch.softmax(logits.detach().float(), -1)
        h_jv = (p * jv - p * (p * jv).sum(-1, keepdim=True)) * (w / logits.shape[0])
        out += flat(torch.autograd.grad(logits, params, grad_outputs=h_jv.to(logits.dtype),
                                        allow_unused=True), params)
    return out


def cg_solve(matvec: Callable[[Tensor], Tensor], b: Tensor, iters: int, tol: float = 1e-6
             ) -> tuple[Tensor, dict]:
    """Conjugate gradient on A x = b (A symmetric; SPD for a guaranteed solution). Stops at
    ‖r‖ ≤ tol‖b‖ or at negative curvature (truncated Newton: the current iterate, or b itself
    if that happens on the first iteration)."""
    x = torch.zeros_like(b)
    r, p = b.clone(), b.clone()
    rs = float(r @ r)
    bnorm = math.sqrt(rs)
    info = {"iters": 0, "negative_curvature": False}
    for i in range(iters):
        ap = matvec(p)
        pap = float(p @ ap)
        if pap <= 0:
            info["negative_curvature"] = True
            if i == 0:
                x = b.clone()
            break
        alpha = rs / pap
        x += alpha * p
        r -= alpha * ap
        rs_new = float(r @ r)
        info["iters"] = i + 1
        if math.sqrt(rs_new) <= tol * bnorm:
            break
        p = r + (rs_new / rs) * p
        rs = rs_new
    info["rel_residual"] = float((b - matvec(x)).norm() / max(bnorm, 1e-30)) if info["iters"] else 1.0
    return x, info


def lbfgs_solve(matvec: Callable[[Tensor], Tensor], b: Tensor, iters: int, history: int = 20,
                tol: float = 1e-6) -> tuple[Tensor, dict]:
    """Inverse-HVP by L-BFGS: minimise ½xᵀAx − bᵀx, whose gradient is Ax − b (one matvec per
    iteration). Unit steps, no line search: the objective is a convex quadratic, and near the
    solution its float32 values are too coarse for a line search's sufficient-decrease test
    (it stalls at ~1e-4 relative residual)."""
    x = torch.zeros_like(b, requires_grad=True)
    opt = torch.optim.LBFGS([x], lr=1.0, max_iter=iters, max_eval=iters, history_size=history,
                            tolerance_grad=tol * float(b.abs().max()), tolerance_change=0.0,
                            line_search_fn=None)
    calls = {"n": 0}

    def closure():
        calls["n"] += 1
        ax = matvec(x.detach()).detach()  # the matvec's own autograd (HVPs) runs with grad on
        x.grad = ax - b
        return 0.5 * (x.detach() @ ax) - b @ x.detach()
    opt.step(closure)
    xs = x.detach()
    return xs, {"matvecs": calls["n"], "rel_residual": float((b - matvec(xs)).norm() / b.norm().clamp_min(1e-30))}


def diag_fisher(per_example: Sequence[Callable[[], Tensor]], params: Sequence[Tensor]) -> Tensor:
    """Empirical diagonal Fisher: mean over examples of the squared per-example gradient."""
    f = torch.zeros(sum(p.numel() for p in params), device=params[0].device)
    for fn in per_example:
        f += flat(torch.autograd.grad(fn(), params, allow_unused=True), params) ** 2
    return f / max(1, len(per_example))


class KFAC:
    """K-FAC factors of linear layers: A = E[a aᵀ] over input tokens, S = E[δ δᵀ] over output
    gradients (δ of the summed token loss, so S is per-token), and the damped Kronecker inverse
    x = (S + √λ/π I)⁻¹ V (A + π√λ I)⁻¹ with π balancing the two factors' traces."""

    def __init__(self, modules: Sequence[torch.nn.Linear]):
        self.modules = list(modules)
        self.A = [torch.zeros(m.in_features, m.in_features, device=m.weight.device)
                  for m in self.modules]
        self.S = [torch.zeros(m.out_features, m.out_features, device=m.weight.device)
                  for m in self.modules]
        self.n_a = self.n_s = 0

    def accumulate(self, loss_and_mask: Callable[[], tuple[Tensor, Tensor, int]]) -> None:
        """``loss_and_mask()`` → (summed token loss, (B, T) bool mask of real tokens, n tokens
        with a label); one forward + backward with hooks on every module."""
        acts, outs, handles = {}, {}, []

        def hook(i):
            def fn(mod, args, out):
                acts[i] = args[0].detach()
                out.register_hook(lambda g: outs.__setitem__(i, g.detach()))
            return fn
        handles = [m.register_forward_hook(hook(i)) for i, m in enumerate(self.modules)]
        try:
            loss, mask, n_lab = loss_and_mask()
            torch.autograd.grad(loss, [m.weight for m in self.modules])
        finally:
            for h in handles:
                h.remove()
        for i in range(len(self.modules)):
            a, d = acts[i][mask].float(), outs[i][mask].float()
            self.A[i] += a.T @ a
            self.S[i] += d.T @ d
        self.n_a += int(mask.sum())
        self.n_s += n_lab

    def solve(self, grads: Sequence[Tensor], damping: float, relative: bool) -> list[Tensor]:
        out = []
        for A, S, g in zip(self.A, self.S, grads):
            A, S = A / max(1, self.n_a), S / max(1, self.n_s)
            ma, ms = A.diagonal().mean().clamp_min(1e-30), S.diagonal().mean().clamp_min(1e-30)
            lam = damping * float(ma * ms) if relative else damping
            pi = math.sqrt(float(ma / ms))
            ad = A + pi * math.sqrt(lam) * torch.eye(A.shape[0], device=A.device)
            sd = S + math.sqrt(lam) / pi * torch.eye(S.shape[0], device=S.device)
            out.append(torch.linalg.solve(sd, torch.linalg.solve(ad, g.float().T).T))
        return out


def top_eigs(matvec: Callable[[Tensor], Tensor], dim: int, k: int, iters: int, seed: int = 0,
             device: torch.device | str = "cpu") -> tuple[Tensor, Tensor]:
    """Top-k eigenpairs of a PSD operator by subspace iteration with Rayleigh-Ritz; the
    subspace lives on ``device`` (the model's)."""
    gen = torch.Generator().manual_seed(seed)
    q, _ = torch.linalg.qr(torch.randn(dim, k, generator=gen, device="cpu").to(device))
    for _ in range(iters):
        z = torch.stack([matvec(q[:, j]) for j in range(k)], 1)
        q, _ = torch.linalg.qr(z)
    z = torch.stack([matvec(q[:, j]) for j in range(k)], 1)
    evals, evecs = torch.linalg.eigh(q.T @ z)
    order = evals.argsort(descending=True)
    return evals[order], q @ evecs[:, order]
