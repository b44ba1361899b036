"""Maths of the post-fine-tuning repairs (vaa/restore/): inverse-HVP solvers against dense
solves, the trust-region / influence steps of CurvatureRestore itself against dense solves of
the same curvature, Gauss-Newton against its definition on a network where it differs from
the Hessian, K-FAC statistics, and each weight-space
repair (merge endpoints, SafeLoRA selection, Antidote's pruned fraction, fake quantisation)
on small models built here (no training, no files)."""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from vaa.restore import curvature_ops as C
from vaa.restore.antidote import Antidote, row_topk_mask
from vaa.restore.curvature import CurvatureRestore
from vaa.restore.merge import Merge
from vaa.restore.q_realign import fake_quant
from vaa.restore.safelora import SafeLoRA


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


def v_projs(model):
    """Every layer's value projection: the restore tests' parameter subspace."""
    return [l.self_attn.v_proj for l in model.model.layers]


def dense(matvec, dim: int) -> torch.Tensor:
    return torch.stack([matvec(e) for e in torch.eye(dim)], 1)


# --------------------------------------------------------------------------- quadratic problem
def regression(seed=0, n=40, d=6):
    """L_t(w) = mean ½(x·w − y)², minimised exactly at w*; L_h(w) = mean ½(x_h·w − y_h)²."""
    g = torch.Generator().manual_seed(seed)
    x, y = torch.randn(n, d, generator=g), torch.randn(n, generator=g)
    xh, yh = torch.randn(10, d, generator=g), torch.randn(10, generator=g) + 3
    w_star = torch.linalg.lstsq(x, y[:, None]).solution[:, 0]
    w = torch.nn.Parameter(w_star.clone())
    lt = [(lambda: 0.5 * ((x @ w - y) ** 2).mean(), 1.0)]
    lh = [(lambda: 0.5 * ((xh @ w - yh) ** 2).mean(), 1.0)]
    return w, lt, lh, x.T @ x / n, xh


@pytest.mark.parametrize("solver", ["cg", "lbfgs"])
def test_inverse_hvp_solvers_match_dense_solve(solver):
    w, lt, lh, h, _ = regression()
    lam = 1e-2
    g, _ = C.gradient(lh, [w])
    mv = lambda v: C.hvp_exact(lt, [w], v) + lam * v  # noqa: E731
    x, _ = (C.cg_solve(mv, g, 50, 1e-10) if solver == "cg" else C.lbfgs_solve(mv, g, 100))
    ref = torch.linalg.solve(h + lam * torch.eye(len(g)), g)
    assert torch.allclose(x, ref, rtol=1e-4, atol=1e-5)


def test_cg_stops_at_negative_curvature():
    a = torch.diag(torch.tensor([1.0, -2.0, 3.0]))
    b = torch.tensor([1.0, 1.0, 1.0])
    x, info = C.cg_solve(lambda v: a @ v, b, 10)
    assert info["negative_curvature"] and torch.isfinite(x).all()


# --------------------------------------------------------------------------- GGN, Fisher, K-FAC
def test_ggn_is_jt_h_out_j_and_not_the_hessian_on_a_nonlinear_network():
    """logits = tanh(x W1ᵀ) W2ᵀ: ggn_vp equals Jᵀ H_out J built from the full Jacobian, with
    H_out = (diag p − p pᵀ)/N per row; it is PSD and differs from the Hessian (the network's
    second derivative is not zero), which a linear model could not tell apart."""
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(12, 5, generator=g), torch.randint(0, 4, (12,), generator=g)
    w1 = torch.nn.Parameter(0.8 * torch.randn(3, 5, generator=g))
    w2 = torch.nn.Parameter(0.8 * torch.randn(4, 3, generator=g))
    net = lambda a, b: torch.tanh(x @ a.T) @ b.T  # noqa: E731
    loss = [(lambda: torch.nn.functional.cross_entropy(net(w1, w2), y), 1.0)]
    logits = [(lambda: (net(w1, w2), y), 1.0)]
    dim = w1.numel() + w2.numel()
    ggn = dense(lambda v: C.ggn_vp(logits, [w1, w2], v), dim)
    hess = dense(lambda v: C.hvp_exact(loss, [w1, w2], v), dim)
    ja, jb = torch.autograd.functional.jacobian(net, (w1.detach(), w2.detach()))
    jac = torch.cat([ja.reshape(12, 4, -1), jb.reshape(12, 4, -1)], -1)  # (N, V, P)
    p = torch.softmax(net(w1, w2).detach(), -1)
    h_out = (torch.diag_embed(p) - p[:, :, None] * p[:, None, :]) / 12
    ref = torch.einsum("nvp,nvw,nwq->pq", jac, h_out, jac)
    assert torch.allclose(ggn, ref, atol=1e-6)
    assert torch.linalg.eigvalsh((ggn + ggn.T) / 2).min() > -1e-6  # PSD
    assert float((hess - ggn).norm() / ggn.norm()) > 0.05  # not the Hessian here
    # and where the network is linear in the parameters, GGN = Hessian
    w = torch.nn.Parameter(0.3 * torch.randn(4, 5, generator=g))
    lin_loss = [(lambda: torch.nn.functional.cross_entropy(x @ w.T, y), 1.0)]
    lin_logits = [(lambda: (x @ w.T, y), 1.0)]
    assert torch.allclose(dense(lambda v: C.hvp_exact(lin_loss, [w], v), 20),
                          dense(lambda v: C.ggn_vp(lin_logits, [w], v), 20), atol=1e-6)


def test_diag_fisher_is_the_mean_squared_per_example_gradient():
    w, lt, _, _, _ = regression()
    x, y = torch.randn(3, 6), torch.randn(3)
    rows = [lambda i=i: 0.5 * (x[i] @ w - y[i]) ** 2 for i in range(3)]
    f = C.diag_fisher(rows, [w])
    ref = torch.stack([((x[i] @ w - y[i]) * x[i]) ** 2 for i in range(3)]).mean(0)
    assert torch.allclose(f, ref.detach(), atol=1e-6)


def test_kfac_statistics_and_kronecker_solve():
    torch.manual_seed(0)
    lin = torch.nn.Linear(5, 3, bias=False)
    a = torch.randn(2, 4, 5)
    mask = torch.ones(2, 4, dtype=torch.bool)
    kf = C.KFAC([lin])
    kf.accumulate(lambda: ((lin(a) ** 2).sum(), mask, 8))
    flat_a = a.reshape(-1, 5)
    assert torch.allclose(kf.A[0], flat_a.T @ flat_a, atol=1e-5)
    d = (2 * lin(a)).reshape(-1, 3).detach()  # ∂(Σ s²)/∂s
    assert torch.allclose(kf.S[0], d.T @ d, atol=1e-4)
    v = torch.randn(3, 5)
    x = kf.solve([v], damping=1e-2, relative=False)[0]
    A, S = kf.A[0] / 8, kf.S[0] / 8
    pi = math.sqrt(float(A.diagonal().mean() / S.diagonal().mean()))
    ad, sd = A + pi * 0.1 * torch.eye(5), S + 0.1 / pi * torch.eye(3)
    assert torch.allclose(sd @ x @ ad, v, atol=1e-4)  # (A_d ⊗ S_d) vec(x) = vec(v)


# --------------------------------------------------------------------------- weight-space repairs
def tiny_llama(seed: int, hidden=16) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=30, hidden_size=hidden, num_hidden_layers=2, num_attention_heads=2,
                      num_key_value_heads=2, intermediate_size=32, max_position_embeddings=32)
    return LlamaForCausalLM(cfg).eval()


def stub_inputs(**models):
    return SimpleNamespace(load=lambda which: models[which])


@pytest.mark.parametrize("alpha,endpoint", [(0.0, "aligned"), (1.0, "finetuned")])
def test_linear_merge_returns_the_endpoints_exactly(alpha, endpoint):
    aligned, ft = tiny_llama(0), tiny_llama(1)
    ref = {"aligned": {k: v.clone() for k, v in aligned.state_dict().items()},
           "finetuned": {k: v.clone() for k, v in ft.state_dict().items()}}[endpoint]
    out = Merge(alpha=alpha).restore(ft, stub_inputs(aligned=aligned))
    assert all(torch.equal(v, ref[k]) for k, v in out.state_dict().items())


@pytest.mark.parametrize("method", ["linear", "slerp", "dare", "ties"])
def test_merge_lies_between_the_endpoints(method):
    aligned, ft = tiny_llama(0), tiny_llama(1)
    a = aligned.model.layers[0].mlp.up_proj.weight.clone()
    f = ft.model.layers[0].mlp.up_proj.weight.clone()
    out = Merge(method=method, alpha=0.5).restore(ft, stub_inputs(aligned=aligned))
    m = out.model.layers[0].mlp.up_proj.weight
    assert not torch.equal(m, a) and not torch.equal(m, f)
    if method == "linear":
        assert torch.allclose(m, (a + f) / 2)


def test_safelora_projects_below_the_threshold_and_leaves_the_rest_unchanged():
    base, aligned = tiny_llama(0), tiny_llama(1)
    targets = ["q_proj", "k_proj", "v_proj", "o_proj"]
    probe = SafeLoRA(select="threshold", threshold=-1.0, targets=targets)  # cos ≥ 0: none selected
    ft = tiny_llama(2)
    before = {k: v.clone() for k, v in ft.named_parameters()}
    probe.restore(ft, stub_inputs(aligned=aligned, base=base))
    assert probe.info["projected"] == []
    assert all(torch.equal(p, before[n]) for n, p in ft.named_parameters())
    tau = sorted(probe.info["cosines"].values())[3]  # project the 4 lowest of 8 modules
    r = SafeLoRA(select="threshold", threshold=tau, targets=targets)
    out = r.restore(ft, stub_inputs(aligned=aligned, base=base))
    cos = r.info["cosines"]
    al, b = dict(aligned.named_parameters()), dict(base.named_parameters())
    for name, p in out.named_parameters():
        if cos.get(name, float("inf")) > tau:
            assert torch.equal(p, before[name]), name  # above the threshold or not a target
        else:
            v = al[name] - b[name]
            expect = al[name] + (v @ v.T / v.norm()) @ (before[name] - al[name])
            assert torch.allclose(p, expect, atol=1e-6), name
    assert len(r.info["projected"]) == 4


def test_safelora_number_selects_the_lowest_cosines():
    base, aligned, ft = tiny_llama(0), tiny_llama(1), tiny_llama(2)
    r = SafeLoRA(select="number", num_proj_layers=3)
    r.restore(ft, stub_inputs(aligned=aligned, base=base))
    lowest = sorted(r.info["cosines"], key=r.info["cosines"].get)[:3]
    assert sorted(r.info["projected"]) == sorted(lowest)


def test_safelora_skips_modules_alignment_left_unchanged_and_selects_among_the_rest():
    """V = 0 (alignment did not touch the module) gives C = 0/0 and a NaN cosine: such modules
    are skipped with a reason, never projected, and the k lowest are chosen among the rest."""
    base, aligned, ft = tiny_llama(0), tiny_llama(1), tiny_llama(2)
    frozen = []
    with torch.no_grad():
        for i, layer in enumerate(aligned.model.layers):
            for proj in ("q_proj", "k_proj"):
                getattr(layer.self_attn, proj).weight.copy_(getattr(base.model.layers[i].self_attn, proj).weight)
                frozen.append(f"model.layers.{i}.self_attn.{proj}.weight")
    before = {k: v.clone() for k, v in ft.named_parameters()}
    r = SafeLoRA(select="number", num_proj_layers=3)
    out = r.restore(ft, stub_inputs(aligned=aligned, base=base))
    assert sorted(r.info["skipped"]) == sorted(frozen)
    assert all("V = " in why for why in r.info["skipped"].values())
    assert not set(r.info["cosines"]) & set(frozen)
    assert all(math.isfinite(c) for c in r.info["cosines"].values()) and len(r.info["cosines"]) == 4
    lowest = sorted(r.info["cosines"], key=r.info["cosines"].get)[:3]
    assert sorted(r.info["projected"]) == sorted(lowest)
    params = dict(out.named_parameters())
    assert all(torch.isfinite(p).all() for p in params.values())
    assert all(torch.equal(params[n], before[n]) for n in frozen)


def test_safelora_default_num_proj_layers_is_the_specs():
    from vaa.restore.schema import SafeLoRARestoreConfig
    import yaml
    from pathlib import Path
    conf = yaml.safe_load((Path(__file__).parents[1] / "conf/restore/safelora.yaml").read_text())
    assert SafeLoRARestoreConfig().num_proj_layers == conf["num_proj_layers"] == 10


def test_row_topk_mask_selects_the_largest_scores_per_row():
    s = torch.tensor([[1.0, 5.0, 3.0, 2.0], [9.0, 0.0, 1.0, 8.0]])
    m = row_topk_mask(s, 0.5)
    assert m.tolist() == [[False, True, True, False], [True, False, False, True]]
    assert row_topk_mask(s, 0.25).tolist() == [[False, True, False, False], [True, False, False, False]]
    assert not row_topk_mask(s, 0.2).any()  # floor(0.2 · 4) = 0


@pytest.mark.parametrize("ratio", [0.05, 0.25])
def test_antidote_prunes_the_configured_fraction_of_each_row(ratio):
    model = tiny_llama(0)
    g = torch.Generator().manual_seed(0)
    batch = {"input_ids": torch.randint(0, 30, (4, 7), generator=g),
             "attention_mask": torch.ones(4, 7, dtype=torch.long)}
    inputs = SimpleNamespace(harmful=lambda hp: [None] * 4, batches=lambda ex, bs: [batch])
    before = {k: v.clone() for k, v in model.named_parameters()}
    out = Antidote(dense_ratio=ratio, targets=["q_proj", "v_proj"]).restore(model, inputs)
    k = int(ratio * 16)
    for name, p in out.named_parameters():
        if name.endswith(("q_proj.weight", "v_proj.weight")):
            zeroed = (p == 0) & (before[name] != 0)
            assert (zeroed.sum(1) == k).all(), name
            assert torch.equal(p[~zeroed], before[name][~zeroed])
        else:
            assert torch.equal(p, before[name]), name


def test_fake_quant_has_at_most_2_bits_levels_per_row_and_small_error():
    w = torch.randn(6, 50)
    big = torch.full((6, 1), 20.0)  # σ → 1: no clipping
    q = fake_quant(w, big, big, 4)
    assert all(len(torch.unique(row)) <= 16 for row in q)
    assert (q - w).abs().max() <= (w.amax(1) - w.amin(1)).max() / 15 + 1e-6
    q8 = fake_quant(w, big, big, 8)
    assert (q8 - w).abs().max() < (q - w).abs().max()


@pytest.mark.parametrize("solver", ["cg", "lbfgs"])
def test_iterative_inverse_ggn_vp_agrees_with_dense_solve_on_a_small_model(solver):
    """H_λ⁻¹g on a tiny Llama (one v_proj, 64 parameters, a causal-LM loss): CG / L-BFGS on
    Gauss-Newton products against the dense matrix built from the same products."""
    model = tiny_llama(0, hidden=8)
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, 30, (4, 7), generator=g)
    w = model.model.layers[0].self_attn.v_proj.weight
    for p in model.parameters():
        p.requires_grad_(p is w)
    with C.eager_attention(model):
        logits = [(lambda: (model(input_ids=ids).logits[:, :-1].reshape(-1, 30), None), 1.0)]
        loss = [(lambda: torch.nn.functional.cross_entropy(
            model(input_ids=ids).logits[:, :-1].reshape(-1, 30), ids[:, 1:].reshape(-1)), 1.0)]
        grad, _ = C.gradient(loss, [w])
        h = dense(lambda v: C.ggn_vp(logits, [w], v), w.numel())
        lam = 1e-2 * float(h.diagonal().mean())
        mv = lambda v: C.ggn_vp(logits, [w], v) + lam * v  # noqa: E731
        x, _ = C.cg_solve(mv, grad, 80, 1e-7) if solver == "cg" else C.lbfgs_solve(mv, grad, 120, tol=1e-8)
    ref = torch.linalg.solve(h.double() + lam * torch.eye(w.numel(), dtype=torch.double), grad.double())
    assert float((x.double() - ref).norm() / ref.norm()) < 1e-3
    assert model.config._attn_implementation != "eager"  # the model's kernel is set back


# --------------------------------------------------------------------------- curvature steps (the code, not a re-implementation)
def lm_batch(seed: int, rows: int = 4, width: int = 7) -> dict:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, 30, (rows, width), generator=g)
    labels = ids.clone()
    labels[:, :3] = -100  # a 3-token prompt, the rest is the response
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels}


def curvature_inputs(attack_n: int = 40):
    """What CurvatureRestore reads of RestoreInputs: one task batch (also the HVP and
    validation batch) and one harmful batch of 4 rows; the attack's n."""
    from omegaconf import OmegaConf
    task, harm = lm_batch(1), lm_batch(2)
    return SimpleNamespace(cfg=OmegaConf.create({"attack": {"n": attack_n}}),
                           task=lambda n, last=False: "task", harmful=lambda hp: "harm",
                           batches=lambda ex, bs: [{"task": task, "harm": harm}[ex]]), task, harm


def curvature(backend="cg", **step):
    return CurvatureRestore(modules=["v_proj"], geometry={"enabled": False},
                            step={"outer_steps": 1, **step},
                            curvature={"backend": backend, "hvp": "ggn", "iters": 100, "tol": 1e-9,
                                       "damping": 1e-1})


def dense_newton(model, restorer, task, harm):
    """(H_λ⁻¹g, g) with H the task GGN built densely from ggn_vp, λ the restorer's damping."""
    from vaa.restore.curvature_terms import logit_terms, loss_terms
    params = [l.self_attn.v_proj.weight for l in model.model.layers]
    for p in model.parameters():
        p.requires_grad_(any(p is q for q in params))
    with C.eager_attention(model):
        g, _ = C.gradient(loss_terms(model, [harm]), params)
        h = dense(lambda v: C.ggn_vp(logit_terms(model, [task]), params, v), g.numel())
    for p in model.parameters():
        p.requires_grad_(True)
    a = h.double() + restorer.info["damping"] * torch.eye(g.numel(), dtype=torch.double)
    return torch.linalg.solve(a, g.double()), g.double()


def v_weights(model) -> torch.Tensor:
    return torch.cat([l.self_attn.v_proj.weight.detach().reshape(-1) for l in model.model.layers])


def test_influence_step_is_plus_n_h_over_n_times_the_inverse_curvature_gradient(attack_n=40):
    """θ ← θ + (n_h/n)·H_λ⁻¹∇L_h (spec §1.2: removing the harmful points *raises* their loss),
    n = the attack's n (not a fixed 1000), checked against a dense solve of the same H."""
    model, inputs = tiny_llama(0, hidden=8), None
    inputs, task, harm = curvature_inputs(attack_n)
    r = curvature(variant="influence")
    before = v_weights(model)
    r.restore(model, inputs)
    assert r.info["influence_n"] == attack_n
    x, g = dense_newton(model_at(model, before), r, task, harm)
    step = (v_weights(model) - before).double()
    want = (4 / attack_n) * x  # n_h = 4 harmful rows
    assert float((step - want).norm() / want.norm()) < 2e-3
    assert float(step @ g) > 0  # the harmful loss rises to first order
    assert CurvatureRestore(step={"influence_n": 1000}).hp.step.influence_n == 1000  # explicit n wins


def model_at(model, flat_v: torch.Tensor):
    """A copy of ``model`` with its v_proj weights set back to ``flat_v``."""
    import copy
    m = copy.deepcopy(model)
    i = 0
    with torch.no_grad():
        for l in m.model.layers:
            w = l.self_attn.v_proj.weight
            w.copy_(flat_v[i:i + w.numel()].view_as(w))
            i += w.numel()
    return m


def test_trust_region_step_calls_the_code_and_is_the_damped_newton_step_spending_delta():
    """Newton trust region through CurvatureRestore: the accepted step is η·H_λ⁻¹g with
    η = sqrt(2δ / gᵀH_λ⁻¹g), so ½ΔᵀH_λΔ = δ (dense solve of the same H as the reference)."""
    delta = 0.05
    model = tiny_llama(0, hidden=8)
    inputs, task, harm = curvature_inputs()
    r = curvature(variant="newton_trust_region", trust_radius=delta, task_guard=1e9, harmful_clamp=1e9)
    before = v_weights(model)
    r.restore(model, inputs)
    x, g = dense_newton(model_at(model, before), r, task, harm)
    eta = math.sqrt(2 * delta / float(g @ x))
    step = (v_weights(model) - before).double()
    assert float((step - eta * x).norm() / (eta * x).norm()) < 2e-3
    assert r.info["steps"][0]["eta"] == pytest.approx(eta, rel=1e-3)
    assert 0.5 * eta * float(step @ g) == pytest.approx(delta, rel=2e-3)  # ½ΔᵀH_λΔ = δ
    assert float(step @ g) > 0


def test_rejected_trust_region_steps_leave_theta_bit_identical():
    """No trial accepted (the task guard can never hold): after max_backtracks + 1 trials θ is
    restored from a copy, bit for bit (add-then-subtract left fp32 residue)."""
    model = tiny_llama(0, hidden=16)
    inputs, _, _ = curvature_inputs()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    r = curvature("identity", variant="newton_trust_region", task_guard=-10.0, max_backtracks=8)
    r.restore(model, inputs)
    assert r.info["steps"][0]["eta"] == 0.0
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


# --------------------------------------------------------------------------- which entries, which sign, which scale
def test_dare_keeps_each_entry_or_rescales_it_by_one_over_one_minus_drop():
    """DARE: every entry is either the aligned value (dropped) or pre + α·τ/(1 − d) (kept),
    and about (1 − d) of them are kept."""
    aligned, ft = tiny_llama(0), tiny_llama(1)
    a = aligned.model.layers[0].mlp.up_proj.weight.clone()
    f = ft.model.layers[0].mlp.up_proj.weight.clone()
    out = Merge(method="dare", alpha=0.5, drop=0.75, seed=3).restore(ft, stub_inputs(aligned=aligned))
    m = out.model.layers[0].mlp.up_proj.weight
    kept_value = a + 0.5 * (f - a) / (1 - 0.75)
    dropped, kept = torch.isclose(m, a, atol=1e-7), torch.isclose(m, kept_value, atol=1e-6)
    assert bool((dropped | kept).all())
    assert 0.15 < float(kept.float().mean()) < 0.35


def test_antidote_zeroes_the_highest_wanda_scores_of_each_row():
    """The pruned entries of each row are its largest |W_ij|·‖X_j‖ (norms of the module's inputs
    over the calibration tokens, measured here with hooks on an unpruned copy)."""
    import copy
    model = tiny_llama(0)
    g = torch.Generator().manual_seed(0)
    batch = {"input_ids": torch.randint(0, 30, (4, 7), generator=g),
             "attention_mask": torch.ones(4, 7, dtype=torch.long)}
    ref = copy.deepcopy(model)
    sq = {}
    hooks = [layer.self_attn.q_proj.register_forward_pre_hook(
        lambda mod, args, i=i: sq.__setitem__(i, (args[0].detach() ** 2).sum((0, 1))))
        for i, layer in enumerate(ref.model.layers)]
    with torch.no_grad():
        ref(**batch)
    for h in hooks:
        h.remove()
    inputs = SimpleNamespace(harmful=lambda hp: [None] * 4, batches=lambda ex, bs: [batch])
    r = Antidote(dense_ratio=0.25, targets=["q_proj"], sequential=False)
    out = r.restore(model, inputs)
    assert sorted(r.info["pruned_fraction"]) == [f"model.layers.{i}.self_attn.q_proj" for i in range(2)]
    for i, layer in enumerate(out.model.layers):
        w0 = ref.model.layers[i].self_attn.q_proj.weight.detach()
        score = w0.abs() * sq[i].sqrt()
        zeroed = (layer.self_attn.q_proj.weight == 0) & (w0 != 0)
        for row in range(score.shape[0]):
            z, k = score[row][zeroed[row]], score[row][~zeroed[row]]
            assert len(z) == 4 and float(z.min()) > float(k.max())


def test_panacea_step_is_g_f_minus_lambda_times_the_harmful_gradient_change():
    """PanaceaStep with SGD(lr=1), no clipping, two steps: each time θ_before − θ_after =
    g_f − λ(g_h' − g_h), g_h' = ∇min(h(w + ε), clamp) at ε = ρ·g_h/(‖g_h‖ + 1e-7), each computed
    here on copies; the released ε is that step's ε. Step 2 restores w from step 1's
    buffers (not re-allocated)."""
    import copy
    from vaa.restore.panacea import PanaceaStep
    from vaa.training.module import response_loss
    model = tiny_llama(0)
    user, guide = lm_batch(5), lm_batch(6)
    lam, rho = 2.0, 0.5

    def grads(m, batch):
        ps = list(m.parameters())
        return [torch.zeros_like(p) if q is None else q
                for p, q in zip(ps, torch.autograd.grad(response_loss(m, batch), ps, allow_unused=True))]

    def expected(model):
        w = copy.deepcopy(model)
        g_f, g_h = grads(w, user), grads(w, guide)
        norm = torch.sqrt(sum((x ** 2).sum() for x in g_h))
        eps = [rho * x / (norm + 1e-7) for x in g_h]
        shifted = copy.deepcopy(model)
        with torch.no_grad():
            for p, e in zip(shifted.parameters(), eps):
                p.add_(e)
        g_h2 = grads(shifted, guide)
        return [a - lam * (c - b) for a, b, c in zip(g_f, g_h, g_h2)], eps

    opt = torch.optim.SGD(model.parameters(), lr=1.0)
    module = SimpleNamespace(model=model, lm_loss=lambda b, model=None: response_loss(model or module.model, b),
                             optimizers=lambda: opt, lr_schedulers=lambda: None,
                             recipe=SimpleNamespace(grad_clip=0.0), global_step=0,
                             device=torch.device("cpu"), manual_backward=lambda loss: loss.backward())
    step = PanaceaStep(lam=lam, rho=rho, clamp=100.0)
    step.setup(module, SimpleNamespace(streams={"harmful": SimpleNamespace(next_batch=lambda g: guide)}))
    storage = None
    for _ in range(2):
        want, eps = expected(model)
        before = [p.detach().clone() for p in model.parameters()]
        step.training_step(module, user)
        for b, p, g in zip(before, model.parameters(), want):
            torch.testing.assert_close(b - p.detach(), g, rtol=1e-4, atol=1e-6)
        for e, r in zip(step.eps, eps):
            torch.testing.assert_close(e, r, rtol=1e-4, atol=1e-7)
        now = [t.data_ptr() for t in step.restore_buffers]
        assert storage is None or now == storage  # allocated once, as Booster's and VAA's
        storage = now


def test_panacea_releases_the_model_training_returned_plus_eps_on_its_device():
    """With LoRA, ``train`` returns a PeftModel (the adapters are what trained and what ε
    lives on): Panacea must release that object + ε, not the model it passed in; ε is moved
    to the released parameters' device and dtype (Lightning moves the model back to the CPU
    at teardown while ε was computed on the GPU)."""
    import copy
    from vaa.methods.grads import trainable_params
    from vaa.restore.panacea import Panacea
    base = tiny_llama(0)
    trained = {}

    def train(module_cls, model, tok, rows, recipe, step, stage, seed, extra=None):
        assert extra == {"harmful": [1]}  # the guide rows reach the datamodule's stream
        other = copy.deepcopy(model).double()  # another object, another dtype
        step.eps = [torch.full_like(p, 0.5, dtype=torch.float32) for p in trainable_params(other)]
        trained["before"] = [p.detach().clone() for p in other.parameters()]
        trained["model"] = other
        return other

    attack = SimpleNamespace(batch_size=2, max_steps=1, epochs=1)
    inputs = SimpleNamespace(train=train, load=lambda which: copy.deepcopy(base), tokenizer=None,
                             batches=lambda rows, bs: [lm_batch(1)], harmful=lambda hp: [1],
                             hft=lambda: [1, 2], cfg=SimpleNamespace(attack=attack), seed=0)
    out = Panacea(lam=1.0, rho=0.1, clamp=20.0).restore(base, inputs)
    assert out is trained["model"]
    for b, p in zip(trained["before"], out.parameters()):
        assert p.dtype == torch.float64
        torch.testing.assert_close(p.detach(), b + 0.5)


def test_curvature_states_its_memory_before_it_starts_and_a_module_subset_shrinks_it():
    """A 7B model's default space (all seven linear layers) is ~6.5 B entries: the repair says
    what its vectors cost before it allocates them, and ``restore.modules`` shrinks it."""
    from omegaconf import OmegaConf
    from vaa.restore.curvature_terms import target_linears
    from vaa.restore.curvature_memory import memory_plan
    from vaa.restore.schema import CurvatureRestoreConfig
    model = tiny_llama(0)
    hp = OmegaConf.structured(CurvatureRestoreConfig)
    full = target_linears(model, hp.modules)
    plan = memory_plan([m.weight for m in full], full, hp)
    numel = sum(m.weight.numel() for m in full)
    assert plan["numel"] == numel and plan["gb"] == round(4 * numel * plan["vectors"] / 2**30, 3)
    sub = target_linears(model, ["q_proj", "v_proj"])
    assert memory_plan([m.weight for m in sub], sub, hp)["numel"] < numel
    hp.curvature.backend = "lbfgs_ihvp"
    assert memory_plan([m.weight for m in full], full, hp)["vectors"] == 4 + 2 * hp.curvature.history


# --------------------------------------------------------------------------- merge rules, Antidote's blocks (mutation-tested)
def test_slerp_matches_the_closed_form_and_its_limits():
    from vaa.restore.merge import slerp
    w = math.pi / 3  # ω = 60°, norms below 1
    a, b = torch.tensor([0.5, 0.0]), 0.25 * torch.tensor([math.cos(w), math.sin(w)])
    for w in (math.pi / 3, math.pi / 6):  # also below 1 rad, well above the lerp cut-off
        a, b = torch.tensor([0.5, 0.0]), 0.25 * torch.tensor([math.cos(w), math.sin(w)])
        for t in (1 / 3, 0.8):  # sin((1−t)ω)/sin ω · a + sin(tω)/sin ω · b
            want = (math.sin((1 - t) * w) * a + math.sin(t * w) * b) / math.sin(w)
            torch.testing.assert_close(slerp(a, b, t), want)
    c = torch.tensor([0.3, -0.7, 0.2])
    d = torch.tensor([-0.1, 0.4, 0.9])
    assert torch.equal(slerp(c, d, 0.0), c) and torch.equal(slerp(c, d, 1.0), d)  # the endpoints exactly
    torch.testing.assert_close(slerp(torch.zeros(2), b, 0.5), b / 2)  # a zero endpoint: lerp
    near = a * (1 + 1e-6)
    torch.testing.assert_close(slerp(a, near, 0.5), torch.lerp(a, near, 0.5))  # near-parallel: lerp
    v = torch.ones(3) / 3  # normalised dots with ±v round past ±1: clamped, no NaN
    assert torch.isfinite(slerp(v, -v, 0.5)).all() and torch.isfinite(slerp(v, v * 2, 0.5)).all()
    for x, y in ((a, b), (torch.zeros(2), b), (a, near)):  # every branch keeps the dtype
        assert slerp(x.bfloat16(), y.bfloat16(), 0.5).dtype == torch.bfloat16


def test_ties_keeps_the_density_largest_entries_of_the_task_vector():
    from vaa.restore.merge import MERGE_RULES
    pre = torch.tensor([1.0, 1.0, 1.0, 1.0, 1.0])
    post = pre + torch.tensor([1.0, -5.0, 3.0, -2.0, 4.0])
    hp = SimpleNamespace(density=0.4)  # k = 2: −5 and 4
    out = MERGE_RULES["ties"](pre, post, hp, 0.5, None)
    torch.testing.assert_close(out, pre + 0.5 * torch.tensor([0.0, -5.0, 0.0, 0.0, 4.0]))
    one = MERGE_RULES["ties"](pre, post, SimpleNamespace(density=0.01), 1.0, None)  # k ≥ 1
    torch.testing.assert_close(one, pre + torch.tensor([0.0, -5.0, 0.0, 0.0, 0.0]))


def test_dare_is_seeded_and_checks_its_drop_probability():
    aligned, ft = tiny_llama(0), tiny_llama(1)

    def up(**kw):
        m = Merge(method="dare", alpha=0.5, **kw).restore(tiny_llama(1), stub_inputs(aligned=aligned))
        return m.model.layers[0].mlp.up_proj.weight.detach()
    assert torch.equal(up(drop=0.5, seed=1), up(drop=0.5, seed=1))
    assert not torch.equal(up(drop=0.5, seed=1), up(drop=0.5, seed=2))
    a, f = aligned.model.layers[0].mlp.up_proj.weight, ft.model.layers[0].mlp.up_proj.weight
    torch.testing.assert_close(up(drop=0.0), a + 0.5 * (f - a))  # d = 0: the linear merge
    for bad in (1.0, -0.1):
        with pytest.raises(ValueError, match="restore.drop"):
            up(drop=bad)


def test_merge_rejects_an_unknown_rule_and_another_architecture():
    aligned = tiny_llama(0)
    with pytest.raises(ValueError, match="restore.method='mean'"):
        Merge(method="mean").restore(tiny_llama(1), stub_inputs(aligned=aligned))
    with pytest.raises(ValueError, match="merge: parameter"):
        Merge().restore(tiny_llama(1, hidden=8), stub_inputs(aligned=aligned))


def test_safelora_names_the_targets_that_match_nothing():
    with pytest.raises(ValueError, match=r"no Linear module named \['nope'\]"):
        SafeLoRA(targets=["nope"]).restore(tiny_llama(2), stub_inputs(aligned=tiny_llama(1), base=tiny_llama(0)))


def _input_norms(model, batch, proj="q_proj"):
    """Σ x² over the non-padding tokens at each layer's ``proj`` input, by hooks."""
    sq = {}
    hooks = [getattr(layer.self_attn, proj).register_forward_pre_hook(
        lambda mod, args, i=i: sq.__setitem__(i, (args[0].detach()[batch["attention_mask"].bool()] ** 2).sum(0)))
        for i, layer in enumerate(model.model.layers)]
    with torch.no_grad():
        model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
    for h in hooks:
        h.remove()
    return sq


def test_antidote_sequential_scores_each_block_after_pruning_the_ones_before():
    """Wanda's sequential mode: block 0 is scored on the unpruned model, block 1 on the model
    with block 0 already pruned; padding tokens never count; the pruned fraction is reported per
    module by its full name."""
    import copy
    model = tiny_llama(0)
    g = torch.Generator().manual_seed(0)
    batches = [{"input_ids": torch.randint(0, 30, (4, 7), generator=g),
                "attention_mask": torch.ones(4, 7, dtype=torch.long)} for _ in range(2)]
    batches[0]["attention_mask"][1, :3] = 0  # a left-padded row: the mask must reach the model
    inputs = SimpleNamespace(harmful=lambda hp: [None] * 4, batches=lambda ex, bs: batches)
    ref = copy.deepcopy(model)
    flat = Antidote(dense_ratio=0.5, targets=["q_proj", "v_proj"], sequential=False).restore(
        copy.deepcopy(model), inputs)
    r = Antidote(dense_ratio=0.5, targets=["q_proj", "v_proj"], sequential=True)
    out = r.restore(model, inputs)
    assert sorted(r.info["pruned_fraction"]) == sorted(
        f"model.layers.{i}.self_attn.{p}" for i in range(2) for p in ("q_proj", "v_proj"))
    assert all(f == 0.5 for f in r.info["pruned_fraction"].values())
    for i in range(2):
        sq = {}
        for b in batches:  # block i's inputs over both batches, blocks < i pruned as in `out`
            for k, v in _input_norms(ref, b).items():
                sq[k] = sq.get(k, 0) + v
        attn = ref.model.layers[i].self_attn
        want = {p: row_topk_mask(getattr(attn, p).weight.detach().abs() * sq[i].sqrt(), 0.5)
                for p in ("q_proj", "v_proj")}
        w_out = out.model.layers[i].self_attn.q_proj.weight
        assert torch.equal(w_out == 0, want["q_proj"]), i
        with torch.no_grad():
            for p in ("q_proj", "v_proj"):
                getattr(attn, p).weight.mul_(~want[p])
    # and the sequential order matters here: block 1 differs from the all-at-once scoring
    assert not torch.equal(out.model.layers[1].self_attn.q_proj.weight,
                           flat.model.layers[1].self_attn.q_proj.weight)
    with pytest.raises(ValueError, match="restore.targets"):
        Antidote(targets=["nope"]).restore(tiny_llama(0), inputs)


def test_antidote_input_norms_sum_x_squared_over_real_tokens_of_every_batch():
    from vaa.restore.antidote import input_sq_norms
    model = tiny_llama(0)
    g = torch.Generator().manual_seed(3)
    batches = [{"input_ids": torch.randint(0, 30, (3, 6), generator=g),
                "attention_mask": torch.ones(3, 6, dtype=torch.long)} for _ in range(2)]
    batches[1]["attention_mask"][0, :2] = 0  # left padding: the mask must reach the model
    mods = {f"l{i}": layer.mlp.down_proj for i, layer in enumerate(model.model.layers)}
    got = input_sq_norms(model, mods, batches)
    want = {k: torch.zeros(m.in_features) for k, m in mods.items()}
    for b in batches:
        seen = {}
        hooks = [m.register_forward_pre_hook(lambda mod, args, k=k: seen.__setitem__(k, args[0].detach()))
                 for k, m in mods.items()]
        with torch.no_grad():
            model(input_ids=b["input_ids"], attention_mask=b["attention_mask"])
        for h in hooks:
            h.remove()
        for k, x in seen.items():
            want[k] += (x[b["attention_mask"].bool()] ** 2).sum(0)
    for k in mods:
        torch.testing.assert_close(got[k], want[k], rtol=1e-6, atol=1e-7)


def test_curvature_plans_its_product_per_batch_and_refuses_what_does_not_fit(monkeypatch):
    """The Gauss-Newton product's memory grows with restore.batch_size (0.69 GB per 160-token
    row on SmolLM2-135M: 32 rows took 23 GB and were killed by the kernel); the plan states it
    and the repair refuses, with the batch size that fits, before it starts."""
    from omegaconf import OmegaConf
    from vaa.errors import ConfigError
    from vaa.restore import curvature as cv
    from vaa.restore import curvature_memory as cm
    from vaa.restore.schema import CurvatureRestoreConfig
    smol = SimpleNamespace(hidden_size=576, intermediate_size=1536, num_hidden_layers=30, vocab_size=49152)
    labels = torch.zeros(1, 160, dtype=torch.long)
    labels[:, :32] = -100  # 128 labelled next-token targets after the shift
    row = {"input_ids": torch.zeros(1, 160, dtype=torch.long), "labels": labels}
    per_row = cm.hvp_batch_bytes(smol, row) / 2**30
    # measured (1e9-byte GB): +2.261 at 2 rows, +3.650 at 4, so 0.695 GB = 0.647 GiB per row
    assert per_row == pytest.approx(0.647, rel=0.05)
    two = {k: v.repeat(2, 1) for k, v in row.items()}
    assert cm.hvp_batch_bytes(smol, two) == 2 * cm.hvp_batch_bytes(smol, row)
    model = tiny_llama(0)
    hp = OmegaConf.structured(CurvatureRestoreConfig)
    mods = cv.target_linears(model, hp.modules)
    plan = cm.memory_plan([m.weight for m in mods], mods, hp, smol, [row, two])
    assert plan["hvp_batch_gb"] == pytest.approx(2 * per_row, rel=1e-3)
    assert plan["total_gb"] == pytest.approx(plan["gb"] + plan["hvp_batch_gb"], abs=1e-3)
    monkeypatch.setattr(cm, "host_available_gb", lambda: plan["total_gb"] + 0.01)
    cm.check_fits(plan, torch.device("cpu"), 2)  # fits: nothing raised
    monkeypatch.setattr(cm, "host_available_gb", lambda: plan["gb"] + 1.5 * per_row)
    with pytest.raises(ConfigError, match=r"restore.batch_size=1 "):
        cm.check_fits(plan, torch.device("cpu"), 2)
    monkeypatch.setattr(cm, "host_available_gb", lambda: None)  # unknown: no refusal
    cm.check_fits(plan, torch.device("cpu"), 2)


def test_a_solve_worse_than_zero_is_logged_with_the_fix(monkeypatch, caplog):
    """On SmolLM2-135M with 8 curvature rows and 5 CG iterations at relative damping 1e-3
    (λ = 1.6e-9) the solve left a relative residual of 9.8: the step was not H_λ⁻¹g and only
    the trust region's scaling kept it small. That is logged, naming the knobs."""
    import logging
    r = curvature()
    r.lam, r.info = 1e-9, {}
    monkeypatch.setattr(C, "cg_solve", lambda mv, g, iters, tol: (g, {"iters": iters, "rel_residual": 9.8}))
    monkeypatch.setattr(r, "matvec", lambda model: None)
    with caplog.at_level(logging.WARNING, logger="vaa.restore.curvature"):
        r.solve(None, torch.ones(3))
    assert "relative residual of 9.8" in caplog.text and "restore.curvature.damping" in caplog.text
    caplog.clear()
    monkeypatch.setattr(C, "cg_solve", lambda mv, g, iters, tol: (g, {"iters": iters, "rel_residual": 0.5}))
    with caplog.at_level(logging.WARNING, logger="vaa.restore.curvature"):
        r.solve(None, torch.ones(3))
    assert caplog.text == ""
