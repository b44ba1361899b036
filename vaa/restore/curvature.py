"""Curvature-aware safety restoration (Bach et al., arXiv 2511.18039, TMLR 2026).

The paper (abstract only; no public code) raises the loss on harmful inputs along directions
the task's curvature says are cheap, with influence functions and second-order optimisation.
Its objective, its H and its use of L-BFGS are unpublished: this is the spec's design
(specs/restoration.md §1.2-1.5, all "rec"), over the decoder's linear weights (``modules``;
full fine-tuning, so the spec's ``subset`` parameter space).

Variants (``step.variant``), with g = ∇L_h at θ (harmful NLL on ``beavertails/align_harmful``;
``step.objective=refusal``: g = −∇L_r, descending the refusal NLL instead) and
H_λ = H + λI, H the task loss's curvature on the first ``curvature.n_hvp`` task rows:

- ``newton_trust_region`` (default): Δ = η·H_λ⁻¹g, η = sqrt(2δ / gᵀH_λ⁻¹g), i.e. the largest
  rise of L_h with ½ΔᵀH_λΔ ≤ δ; halve η while the validation task loss rises by more than
  ``task_guard`` (relative) or L_h exceeds τ (each trial is θ + η·x from a copy of θ, so a
  step with no accepted trial leaves θ bit-identical); K outer steps.
- ``influence``: Δ = (|D_h|/n)·H_λ⁻¹∇L_h, removing the influence of the harmful points of an
  n-row fine-tuning set; n = ``step.influence_n`` or, when that is null (default), ``attack.n``.
- ``penalised``: L-BFGS on L_t − α·min(L_h, τ) + (μ/2)‖θ − θ_ft‖².

Backends (``curvature.backend``): ``identity`` (x = g: gradient ascent, the ablation),
``diag_fisher``, ``kfac``, ``cg`` and ``lbfgs_ihvp`` (iterative inverse-HVP with
``curvature.hvp`` = ``exact`` Hessian or ``ggn``). Damping λ is relative to mean(diag Fisher)
by default. The geometry diagnostic (§1.5) runs before the repair; see ``geometry.py``.
"""

from __future__ import annotations

import logging
import math

import torch
from omegaconf import OmegaConf

from vaa.restore import curvature_ops as C
from vaa.restore.curvature_memory import check_fits, hvp_batch_bytes, memory_plan
from vaa.restore.curvature_terms import logit_terms, loss_terms, single_rows, target_linears
from vaa.restore.base import Restorer, dataset_loss, n_tokens
from vaa.restore.geometry import geometry_report
from vaa.restore.schema import CurvatureRestoreConfig
from vaa.training.module import response_loss

log = logging.getLogger(__name__)


@torch.no_grad()
def restore_(params, saved) -> None:
    """Copy ``saved`` back into ``params`` (bit-exact undo of a rejected trial step)."""
    for p, s in zip(params, saved):
        p.copy_(s)


def influence_n(configured: int | None, attack_n: int | None) -> int:
    """n of the influence step (spec §1.2: the HFT set size): ``step.influence_n`` when set,
    else the attack's ``attack.n``."""
    n = configured if configured is not None else attack_n
    if n is None or n < 1:
        raise ValueError(f"restore.step.influence_n={configured!r} and attack.n={attack_n!r}: the "
                         "influence step needs n ≥ 1, the size of the fine-tuning set; set one of them")
    return int(n)


class CurvatureRestore(Restorer):
    schema = CurvatureRestoreConfig
    reads = ("aligned",)  # θ_0, for the geometry diagnostic only

    @classmethod
    def plan_terms(cls, shape, hp, length: int, response_fraction: float = 0.5) -> list[tuple]:
        """``vaa-plan``'s terms for this repair on a model of ``shape`` (vaa.plan.shapes),
        ``(name, formula, bytes)``: the model in fp32, the backend's vectors over
        ``restore.modules`` (:func:`memory_plan`) and one curvature product at
        ``restore.batch_size`` rows of ``length`` tokens (:func:`hvp_batch_bytes`)."""
        from types import SimpleNamespace
        cfg = OmegaConf.merge(OmegaConf.structured(cls.schema), hp)
        dims = shape.linear_dims()
        numel = shape.layers * sum(a * b for n, (a, b) in dims.items() if n in cfg.modules)
        fake = SimpleNamespace(numel=lambda n=numel: n)
        vec = memory_plan([fake], [], cfg)
        if cfg.curvature.backend == "kfac":
            vec = memory_plan([fake], [SimpleNamespace(in_features=a, out_features=b)
                                       for _ in range(shape.layers)
                                       for n, (a, b) in dims.items() if n in cfg.modules], cfg)
        rows = int(cfg.batch_size)
        labels = torch.full((rows, length), -100)
        labels[:, length - int(response_fraction * length):] = 0
        model = SimpleNamespace(hidden_size=shape.hidden, intermediate_size=shape.intermediate,
                                num_hidden_layers=shape.layers, vocab_size=shape.vocab)
        hvp = hvp_batch_bytes(model, {"input_ids": torch.empty(rows, length), "labels": labels})
        return [("weights", "P·4", shape.params() * 4),
                ("curvature vectors", f"{vec['vectors']}·P_r·4", vec["gb"] * 2**30),
                ("curvature product", "b·T·L·2a(h,I) + b·T_r·8V·4", hvp)]

    def setup(self, model, inputs):
        hp = self.hp
        self.modules = target_linears(model, hp.modules)
        self.params = [m.weight for m in self.modules]
        for p in model.parameters():
            p.requires_grad_(False)
        for p in self.params:
            p.requires_grad_(True)
        attack = getattr(getattr(inputs, "cfg", None), "attack", None)
        self.attack_n = int(attack.n) if attack is not None and attack.get("n") is not None else None
        b = hp.batch_size
        self.task_b = inputs.batches(inputs.task(hp.n_task), b)
        self.hvp_b = inputs.batches(inputs.task(min(hp.curvature.n_hvp, hp.n_task)), b)
        self.val_b = inputs.batches(inputs.task(hp.step.n_val, last=True), b)
        self.harm_b = inputs.batches(inputs.harmful(hp), b)
        if hp.step.objective == "refusal":
            self.ref_b = inputs.batches(inputs.refusals(hp.step.refusal_split, hp.n_harmful), b)
        elif hp.step.objective != "harmful_ascent":
            raise ValueError(f"restore.step.objective={hp.step.objective!r}; use harmful_ascent or refusal")

    # ---------------------------------------------------------------- curvature
    def prepare_curvature(self, model) -> None:
        """Statistics that do not change over the outer steps: diag Fisher (also the damping
        scale), K-FAC factors."""
        cv = self.hp.curvature
        rows = list(single_rows(self.hvp_b))
        self.fisher = C.diag_fisher([lambda r=r: response_loss(model, r) for r in rows], self.params)
        self.count(self.hvp_b)
        self.lam = cv.damping * float(self.fisher.mean()) if cv.damping_relative else cv.damping
        self.info["damping"] = self.lam
        if cv.backend == "kfac":
            self.kfac = C.KFAC(self.modules)
            for b in self.hvp_b:
                self.kfac.accumulate(lambda b=b: (response_loss(model, b) * n_tokens(b),
                                                  b["attention_mask"].bool(), n_tokens(b)))
            self.count(self.hvp_b)

    def matvec(self, model):
        cv = self.hp.curvature
        if cv.hvp == "exact":
            terms, prod, per = loss_terms(model, self.hvp_b), C.hvp_exact, 2
        elif cv.hvp == "ggn":
            terms, prod, per = logit_terms(model, self.hvp_b), C.ggn_vp, 3
        else:
            raise ValueError(f"restore.curvature.hvp={cv.hvp!r}; use exact or ggn")

        def mv(v):
            self.count(self.hvp_b, per)
            return prod(terms, self.params, v) + self.lam * v
        return mv

    def solve(self, model, g: torch.Tensor) -> torch.Tensor:
        """x ≈ H_λ⁻¹ g with the configured backend."""
        cv = self.hp.curvature
        if cv.backend == "identity":
            return g.clone()
        if cv.backend == "diag_fisher":
            return g / (self.fisher + self.lam)
        if cv.backend == "kfac":
            gs = C.unflat(g, self.params)
            return C.flat(self.kfac.solve(gs, cv.damping, cv.damping_relative), self.params)
        if cv.backend == "cg":
            x, info = C.cg_solve(self.matvec(model), g, cv.iters, cv.tol)
        elif cv.backend == "lbfgs_ihvp":
            x, info = C.lbfgs_solve(self.matvec(model), g, cv.iters, cv.history)
        else:
            raise ValueError(f"restore.curvature.backend={cv.backend!r}; use identity, diag_fisher, "
                             f"kfac, cg or lbfgs_ihvp")
        self.info.setdefault("solver", []).append(info)
        if info.get("rel_residual", 0.0) > 1.0:  # worse than x = 0: the step is not H_λ⁻¹g
            log.warning("restore=curvature: the %s solve left a relative residual of %.3g after %d "
                        "iterations at damping %.3g (x is not H_λ⁻¹g; the trust region only scales "
                        "it): raise restore.curvature.iters or restore.curvature.damping",
                        cv.backend, info["rel_residual"], info.get("iters", 0), self.lam)
        return x

    # ---------------------------------------------------------------- objective
    def direction_grad(self, model) -> torch.Tensor:
        """g: ascent direction of the harmful loss (or descent of the refusal loss)."""
        if self.hp.step.objective == "refusal":
            g, _ = C.gradient(loss_terms(model, self.ref_b), self.params)
            self.count(self.ref_b)
            return -g
        g, _ = C.gradient(loss_terms(model, self.harm_b), self.params)
        self.count(self.harm_b)
        return g

    @torch.no_grad()
    def losses(self, model) -> dict[str, float]:
        self.count(self.val_b + self.harm_b)
        return {"val_task": float(dataset_loss(model, self.val_b)),
                "harmful": float(dataset_loss(model, self.harm_b))}

    # ---------------------------------------------------------------- variants
    def newton_trust_region(self, model) -> None:
        st = self.hp.step
        start = self.losses(model)
        steps = []
        for _ in range(st.outer_steps):
            g = self.direction_grad(model)
            x = self.solve(model, g)
            eta = math.sqrt(2 * st.trust_radius / max(float(g @ x), 1e-12))
            theta = [p.detach().clone() for p in self.params]  # θ; each trial is θ + η·x
            for _ in range(st.max_backtracks + 1):
                C.add_(self.params, x, eta)
                now = self.losses(model)
                ok = (now["val_task"] - start["val_task"]) <= st.task_guard * start["val_task"]
                if st.objective == "harmful_ascent":
                    ok = ok and now["harmful"] <= st.harmful_clamp
                if ok:
                    break
                restore_(self.params, theta)  # a copy, not θ + ηx − ηx (inexact in floating point)
                eta /= 2
            else:
                eta, now = 0.0, self.losses(model)
            steps.append({"eta": eta, **now})
            if eta == 0.0:
                break
        self.info.update(start=start, steps=steps)

    def influence(self, model) -> None:
        g, _ = C.gradient(loss_terms(model, self.harm_b), self.params)
        self.count(self.harm_b)
        n_h = sum(int(b["input_ids"].shape[0]) for b in self.harm_b)
        n = influence_n(self.hp.step.influence_n, self.attack_n)
        start = self.losses(model)
        C.add_(self.params, self.solve(model, g), n_h / n)
        self.info.update(start=start, steps=[self.losses(model)], influence_n=n)

    def penalised(self, model) -> None:
        st = self.hp.step
        anchor = [p.detach().clone() for p in self.params]
        opt = torch.optim.LBFGS(self.params, lr=st.lbfgs_lr, max_iter=st.lbfgs_max_iter,
                                history_size=self.hp.curvature.history, line_search_fn="strong_wolfe")
        sign = 1.0 if st.objective == "refusal" else -1.0
        other = self.ref_b if st.objective == "refusal" else self.harm_b
        start = self.losses(model)

        def closure():
            opt.zero_grad()
            lt = dataset_loss(model, self.task_b)
            lo = dataset_loss(model, other)
            if st.objective == "harmful_ascent":
                lo = torch.clamp(lo, max=st.harmful_clamp)
            prox = sum(((p - a) ** 2).sum() for p, a in zip(self.params, anchor))
            j = lt + sign * st.alpha * lo + 0.5 * st.mu * prox
            j.backward()
            self.count(self.task_b + other)
            return j
        opt.step(closure)
        self.info.update(start=start, steps=[self.losses(model)])

    # ---------------------------------------------------------------- entry points
    def restore(self, model, inputs):
        hp = self.hp
        variants = {"newton_trust_region": self.newton_trust_region, "influence": self.influence,
                    "penalised": self.penalised}
        if hp.step.variant not in variants:
            raise ValueError(f"restore.step.variant={hp.step.variant!r}; use {', '.join(variants)}")
        self.setup(model, inputs)
        plan = self.info["memory"] = memory_plan(self.params, self.modules, hp,
                                                 getattr(model, "config", None), self.hvp_b)
        log.info("restore=curvature over %s: %.3g M parameters in its space; its vectors need "
                 "about %.2f GB beside the model (%s)%s", ", ".join(hp.modules), plan["numel"] / 1e6,
                 plan["gb"], plan["what"], f", and each curvature product about "
                 f"{plan['hvp_batch_gb']:.2f} GB at restore.batch_size={hp.batch_size}"
                 if "hvp_batch_gb" in plan else "")
        check_fits(plan, self.params[0].device, hp.batch_size)
        try:
            with C.eager_attention(model):
                if hp.step.variant != "penalised":
                    self.prepare_curvature(model)
                variants[hp.step.variant](model)
        finally:
            for p in model.parameters():
                p.requires_grad_(True)
        return model

    def diagnose(self, model, inputs) -> dict:
        g = self.hp.geometry
        if not g.enabled:
            return {}
        return geometry_report(inputs.load("aligned"), model, inputs, self.hp,
                               lambda m: target_linears(m, self.hp.modules))
