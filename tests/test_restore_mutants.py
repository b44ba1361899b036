"""Edges of the repair maths that mutation testing found unchecked (issue 15; specs/restoration.md
§1.2-1.6, §2, §6.2): curvature_ops.py, curvature.py, geometry.py, q_realign.py, panacea.py.
Each test asserts what the spec or a docstring says; docstrings name what they pin down.

Measuring (mutmut 3.8, one child): in a copy of the checkout (without .venv, outputs, .git)
append to pyproject.toml

    [tool.mutmut]
    source_paths = ["vaa"]
    also_copy = ["conf", "benchmarks", "multirun.sh"]
    only_mutate = ["vaa/restore/curvature.py", "vaa/restore/curvature_ops.py",
                   "vaa/restore/geometry.py", "vaa/restore/q_realign.py", "vaa/restore/panacea.py"]
    pytest_add_cli_args_test_selection = ["tests/test_restore.py", "tests/test_restore_mutants.py",
        "tests/test_restore_pipeline.py::test_each_repair_runs_and_changes_what_it_should[q_realign-extra4]",
        "tests/test_restore_pipeline.py::test_each_repair_runs_and_changes_what_it_should[panacea-extra5]"]

then ``OMP_NUM_THREADS=1 mutmut run --max-children 1 && mutmut results --all true``.
"""

from __future__ import annotations

import copy
import math
from types import SimpleNamespace

import pytest
import torch

from tests.test_restore import curvature_inputs, dense, lm_batch, tiny_llama, v_weights
from vaa.restore import curvature_ops as C
from vaa.restore import geometry as G
from vaa.restore.base import dataset_loss, per_example_losses
from vaa.restore.curvature import CurvatureRestore, logit_terms, target_linears


@pytest.fixture(autouse=True)
def one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def v_projs(model):
    return [l.self_attn.v_proj for l in model.model.layers]


# ----------------------------------------------------------------------------- geometry (§1.5)
def test_pearson_and_spearman_are_the_textbook_correlations():
    a = torch.tensor([1.0, 2.0, 4.0, 3.0, 10.0])
    b = torch.tensor([2.0, 1.0, 5.0, 5.5, 7.0])
    ref = float(torch.corrcoef(torch.stack([a, b]).double())[0, 1])
    assert G.pearson(a, b) == pytest.approx(ref, abs=1e-12)
    assert G.pearson(a, 3 * a + 1) == pytest.approx(1.0, abs=1e-12)
    assert G.pearson(a, -a) == pytest.approx(-1.0, abs=1e-12)
    assert G.pearson(a, torch.ones(5)) == 0.0  # a constant: 0, not NaN
    # Spearman = 1 − 6Σd²/(n(n²−1)) without ties; a monotone map gives 1
    ra, rb = torch.tensor([0, 1, 3, 2, 4.0]), torch.tensor([1, 0, 2, 3, 4.0])
    assert G.spearman(a, b) == pytest.approx(1 - 6 * float(((ra - rb) ** 2).sum()) / (5 * 24), abs=1e-12)
    assert G.spearman(a, a.exp()) == pytest.approx(1.0, abs=1e-12)
    assert G.spearman(a, -a ** 3) == pytest.approx(-1.0, abs=1e-12)


def test_top_eigs_returns_the_top_k_eigenpairs_in_descending_order():
    g = torch.Generator().manual_seed(0)
    q, _ = torch.linalg.qr(torch.randn(8, 8, generator=g))
    lam = torch.tensor([9.0, 5.0, 3.0, 1.0, 0.5, 0.4, 0.2, 0.1])
    a = q @ torch.diag(lam) @ q.T
    evals, evecs = C.top_eigs(lambda v: a @ v, 8, 3, 60, seed=1)
    assert evals.shape == (3,) and evecs.shape == (8, 3)
    torch.testing.assert_close(evals, lam[:3], rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(a @ evecs, evecs * evals, rtol=1e-3, atol=1e-3)
    torch.testing.assert_close(evecs.T @ evecs, torch.eye(3), rtol=1e-4, atol=1e-4)
    # the same seed gives the same start; no iteration leaves a random Rayleigh-Ritz estimate
    again = C.top_eigs(lambda v: a @ v, 8, 3, 60, seed=1)
    assert torch.equal(again[0], evals) and torch.equal(again[1], evecs)
    rough, _ = C.top_eigs(lambda v: a @ v, 8, 3, 0, seed=1)
    assert float((rough - lam[:3]).abs().max()) > 0.1
    assert list(rough) == sorted(rough.tolist(), reverse=True)
    one, _ = C.top_eigs(lambda v: a @ v, 8, 3, 1, seed=1)
    assert not torch.equal(one, rough)


def test_harmful_ggn_eigs_are_the_top_eigenpairs_of_the_harmful_ggn_over_the_linears():
    """Over the weights ``linears`` returns (here layer 0's v_proj), subspace iteration with the
    given k, iters and seed on the harmful rows' Gauss-Newton matrix (built densely from
    ggn_vp of logit_terms); every parameter's requires_grad flag is given back, the model's
    attention kernel too."""
    model = tiny_llama(0, hidden=8)
    harm = [lm_batch(2), lm_batch(3, rows=3)]
    first = lambda m: [m.model.layers[0].self_attn.v_proj]  # noqa: E731
    model.model.embed_tokens.weight.requires_grad_(False)  # a flag pattern to give back
    flags = [p.requires_grad for p in model.parameters()]
    evals, evecs = G.harmful_ggn_eigs(model, harm, first, k=2, iters=6, seed=4)
    assert [p.requires_grad for p in model.parameters()] == flags
    assert model.config._attn_implementation != "eager"
    params = [m.weight for m in first(model)]
    for p in model.parameters():
        p.requires_grad_(any(p is q for q in params))
    with C.eager_attention(model):
        h = dense(lambda v: C.ggn_vp(logit_terms(model, harm), params, v), 64)
    ref_vals, ref_vecs = C.top_eigs(lambda v: h @ v, 64, 2, 6, seed=4)
    torch.testing.assert_close(evals, ref_vals, rtol=1e-4, atol=1e-8)
    torch.testing.assert_close(evecs.abs(), ref_vecs.abs(), rtol=1e-3, atol=1e-4)
    top = torch.linalg.eigvalsh(h.double()).max()
    assert float(evals[0]) == pytest.approx(float(top), rel=0.05)  # the top of the spectrum


class _GeometryInputs:
    """What geometry_report reads of RestoreInputs; records the row lists it was given."""

    def __init__(self):
        self.rows = {"harmful": [lm_batch(10 + i, rows=1) for i in range(6)],
                     "task": [lm_batch(20 + i, rows=1) for i in range(6)]}
        self.calls = []

    def harmful(self, hp):
        assert hp.geometry.n_rows == 4  # the restorer's hp (its harmful split and n)
        return list(self.rows["harmful"])

    def task(self, n, last=False):
        assert not last
        return self.rows["task"][:n]

    def batches(self, rows, bs):
        self.calls.append((len(rows), bs))
        out = []
        for i in range(0, len(rows), bs):
            chunk = rows[i:i + bs]
            out.append({k: torch.cat([r[k] for r in chunk]) for k in chunk[0]})
        return out


def _geo_hp(**geometry):
    return SimpleNamespace(batch_size=2, seed=3,
                           geometry=SimpleNamespace(**{"n_rows": 4, "top_k": 2, "power_iters": 4, **geometry}))


def test_geometry_report_correlates_per_row_losses_and_compares_eigenpairs():
    aligned, ft = tiny_llama(0, hidden=8), tiny_llama(1, hidden=8)
    inputs, hp = _GeometryInputs(), _geo_hp()
    out = G.geometry_report(aligned, ft, inputs, hp, v_projs)
    assert inputs.calls == [(4, 2), (4, 2)]  # n_rows harmful rows, n_rows task rows, batch_size
    for name in ("harmful", "task"):
        b = inputs.batches(inputs.rows[name][:4], 2)
        l0, l1 = per_example_losses(aligned, b), per_example_losses(ft, b)
        assert out[f"loss_pearson_{name}"] == pytest.approx(G.pearson(l0, l1), abs=1e-9)
        assert out[f"loss_spearman_{name}"] == pytest.approx(G.spearman(l0, l1), abs=1e-9)
        assert out[f"mean_loss_{name}_aligned"] == pytest.approx(float(l0.mean()), rel=1e-6)
        assert out[f"mean_loss_{name}_finetuned"] == pytest.approx(float(l1.mean()), rel=1e-6)
    harm = inputs.batches(inputs.rows["harmful"][:4], 2)
    e0, u0 = G.harmful_ggn_eigs(aligned, harm, v_projs, 2, 4, 3)
    e1, u1 = G.harmful_ggn_eigs(ft, harm, v_projs, 2, 4, 3)
    assert out["eigs_aligned"] == pytest.approx(e0.tolist(), rel=1e-5)
    assert out["eigs_finetuned"] == pytest.approx(e1.tolist(), rel=1e-5)
    assert out["eig_ratio_ft_over_aligned"] == pytest.approx((e1 / e0).tolist(), rel=1e-5)
    assert out["subspace_overlap"] == pytest.approx(float((u0.T @ u1).pow(2).sum() / 2), rel=1e-4)
    assert 0.0 <= out["subspace_overlap"] <= 1.0 + 1e-6
    assert isinstance(out["wall_s"], float) and out["wall_s"] >= 0


def test_geometry_of_a_model_against_itself_is_perfect_and_top_k_zero_skips_the_eigs():
    m = tiny_llama(0, hidden=8)
    out = G.geometry_report(m, copy.deepcopy(m), _GeometryInputs(), _geo_hp(power_iters=6), v_projs)
    for name in ("harmful", "task"):
        assert out[f"loss_pearson_{name}"] == pytest.approx(1.0, abs=1e-9)
        assert out[f"loss_spearman_{name}"] == pytest.approx(1.0, abs=1e-9)
    assert out["eig_ratio_ft_over_aligned"] == pytest.approx([1.0, 1.0], rel=1e-4)
    assert out["subspace_overlap"] == pytest.approx(1.0, rel=1e-4)
    out = G.geometry_report(m, m, _GeometryInputs(), _geo_hp(top_k=1), v_projs)
    assert len(out["eigs_aligned"]) == 1 and out["subspace_overlap"] == pytest.approx(1.0, rel=1e-4)
    out = G.geometry_report(m, m, _GeometryInputs(), _geo_hp(top_k=0), v_projs)
    assert not {"eigs_aligned", "eigs_finetuned", "eig_ratio_ft_over_aligned", "subspace_overlap"} & set(out)
    assert "loss_pearson_task" in out


def test_curvature_diagnose_runs_the_geometry_on_the_aligned_model_over_its_modules(monkeypatch):
    import vaa.restore.curvature as CR
    seen = {}

    def report(aligned, finetuned, inputs, hp, linears):
        seen.update(aligned=aligned, finetuned=finetuned, inputs=inputs, hp=hp,
                    linears=linears(finetuned))
        return {"ok": 1}
    monkeypatch.setattr(CR, "geometry_report", report)
    model, aligned = tiny_llama(1), tiny_llama(0)
    inputs = SimpleNamespace(load=lambda which: {"aligned": aligned}[which])
    r = CurvatureRestore(modules=["v_proj", "up_proj"])
    assert r.diagnose(model, inputs) == {"ok": 1}
    assert seen["aligned"] is aligned and seen["finetuned"] is model and seen["inputs"] is inputs
    assert seen["hp"] is r.hp
    assert seen["linears"] == target_linears(model, ["v_proj", "up_proj"]) and len(seen["linears"]) == 4
    seen.clear()
    assert CurvatureRestore(geometry={"enabled": False}).diagnose(model, inputs) == {} and not seen


# ----------------------------------------------------------------------------- penalised variant (§1.2)
def _penalised_reference(model, task, other, *, sign, alpha, mu, clamp, lr, max_iter, history):
    """L-BFGS (strong Wolfe) on L_t + sign·α·L_o + (μ/2)‖θ − θ_ft‖² over the v_proj weights, with
    L_o = min(L_h, τ) for the harmful ascent (sign −1), the refusal NLL for sign +1."""
    params = [m.weight for m in v_projs(model)]
    for p in model.parameters():
        p.requires_grad_(any(p is q for q in params))
    anchor = [p.detach().clone() for p in params]
    opt = torch.optim.LBFGS(params, lr=lr, max_iter=max_iter, history_size=history,
                            line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        lo = dataset_loss(model, [other])
        if sign < 0:
            lo = torch.clamp(lo, max=clamp)
        j = (dataset_loss(model, [task]) + sign * alpha * lo
             + 0.5 * mu * sum(((p - a) ** 2).sum() for p, a in zip(params, anchor)))
        j.backward()
        return j
    with C.eager_attention(model):
        opt.step(closure)
    return v_weights(model)


@pytest.mark.parametrize("kw", [dict(alpha=0.7, mu=0.3, harmful_clamp=1e9, lbfgs_lr=0.5, lbfgs_max_iter=8),
                                dict(alpha=2.0, mu=3.0, harmful_clamp=3.0, lbfgs_lr=1.0, lbfgs_max_iter=3)])
def test_penalised_step_is_lbfgs_on_task_minus_alpha_clamped_harmful_plus_proximal(kw):
    """Spec §1.2: L-BFGS on L_t − α·min(L_h, τ) + (μ/2)‖θ − θ_ft‖² (the clamp binds in the second
    case: the harmful loss of the tiny model is ~3.4 nats); history = curvature.history."""
    model = tiny_llama(0, hidden=8)
    inputs, task, harm = curvature_inputs()
    ref = _penalised_reference(copy.deepcopy(model), task, harm, sign=-1.0, alpha=kw["alpha"], mu=kw["mu"],
                               clamp=kw["harmful_clamp"], lr=kw["lbfgs_lr"], max_iter=kw["lbfgs_max_iter"],
                               history=3)
    r = CurvatureRestore(modules=["v_proj"], geometry={"enabled": False}, step={"variant": "penalised", **kw},
                         curvature={"history": 3})
    before = v_weights(model)
    r.restore(model, inputs)
    got = v_weights(model)
    assert float((got - before).norm()) > 1e-3
    torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-6)
    assert set(r.info) >= {"start", "steps"} and r.info["start"]["harmful"] == pytest.approx(
        float(dataset_loss(tiny_llama(0, hidden=8), [harm]).detach()), rel=1e-5)
    assert r.info["steps"][0]["harmful"] == pytest.approx(float(dataset_loss(model, [harm]).detach()), rel=1e-5)
    assert all(p.requires_grad for p in model.parameters())


def test_penalised_refusal_objective_descends_the_refusal_loss():
    """objective=refusal: L_t + α·L_r + (μ/2)‖θ − θ_ft‖², with L_r the refusal NLL (not clamped)."""
    model = tiny_llama(0, hidden=8)
    _, task, harm = curvature_inputs()
    refusal = lm_batch(7)
    inputs = SimpleNamespace(task=lambda n, last=False: "task", harmful=lambda hp: "harm",
                             refusals=lambda split, n: "refusal",
                             batches=lambda ex, bs: [{"task": task, "harm": harm, "refusal": refusal}[ex]])
    ref = _penalised_reference(copy.deepcopy(model), task, refusal, sign=1.0, alpha=1.5, mu=0.2, clamp=None,
                               lr=1.0, max_iter=3, history=20)
    r = CurvatureRestore(modules=["v_proj"], geometry={"enabled": False},
                         step={"variant": "penalised", "objective": "refusal", "alpha": 1.5, "mu": 0.2,
                               "harmful_clamp": 0.1, "lbfgs_max_iter": 3})
    r.restore(model, inputs)
    torch.testing.assert_close(v_weights(model), ref, rtol=1e-4, atol=1e-6)
    with torch.no_grad():
        assert float(dataset_loss(model, [refusal])) < float(dataset_loss(tiny_llama(0, hidden=8), [refusal]))


# ----------------------------------------------------------------------------- solvers and products
def test_hvp_exact_sums_weighted_terms_and_gives_zero_for_an_unused_parameter():
    """Hv of Σ_i w_i L_i (not the last term alone, not L_i / w_i); a parameter the loss does not
    use gets a zero block (flat's None → 0), not an autograd error."""
    w, lt, lh, h, xh = regression_terms()
    unused = torch.nn.Parameter(torch.randn(3))
    terms = [(lt[0][0], 0.25), (lh[0][0], 0.75)]
    v = torch.randn(9, generator=torch.Generator().manual_seed(1))
    hv = C.hvp_exact(terms, [w, unused], v)
    ref = (0.25 * h + 0.75 * xh.T @ xh / len(xh)) @ v[:6]
    torch.testing.assert_close(hv[:6], ref, rtol=1e-5, atol=1e-6)
    assert torch.equal(hv[6:], torch.zeros(3))


def regression_terms():
    from tests.test_restore import regression
    return regression()


def _spd(dim=12, seed=0, cond=50.0):
    g = torch.Generator().manual_seed(seed)
    q, _ = torch.linalg.qr(torch.randn(dim, dim, generator=g, dtype=torch.double))
    a = (q @ torch.diag(torch.logspace(0, math.log10(cond), dim, dtype=torch.double)) @ q.T).float()
    return a, torch.randn(dim, generator=g)


def test_lbfgs_solve_spends_one_matvec_per_iteration_and_reports_its_true_residual():
    """L-BFGS with max_iter = max_eval = iters: exactly ``iters`` matvecs when it does not
    converge first (``matvecs``), and ``rel_residual`` = ‖b − A x‖/‖b‖ at the returned x, also
    for a small b (no floor at 1); the default memory is 20 pairs."""
    a, b = _spd()
    seen = []
    x, info = C.lbfgs_solve(lambda v: seen.append(1) or a @ v, b * 1e-3, 5)
    assert info["matvecs"] == 5 and len(seen) == 6  # 5 iterations + the residual check
    res = float((b * 1e-3 - a @ x).norm() / (b * 1e-3).norm())
    assert info["rel_residual"] == pytest.approx(res, rel=1e-5) and 1e-3 < res < 1
    assert set(info) == {"matvecs", "rel_residual"}
    x30, _ = C.lbfgs_solve(lambda v: a @ v, b, 30)
    assert torch.equal(x30, C.lbfgs_solve(lambda v: a @ v, b, 30, history=20)[0])
    assert not torch.equal(x30, C.lbfgs_solve(lambda v: a @ v, b, 30, history=21)[0])


def test_lbfgs_solve_tolerance_is_relative_to_b():
    """The stopping test scales with max|b|: a 10³× larger b takes the same iterations (±1,
    float32 rounding) and gives a 10³× larger x."""
    a, b = _spd(cond=5.0)
    x1, i1 = C.lbfgs_solve(lambda v: a @ v, b, 200, tol=1e-4)
    x2, i2 = C.lbfgs_solve(lambda v: a @ v, b * 1e3, 200, tol=1e-4)
    assert abs(i1["matvecs"] - i2["matvecs"]) <= 1 and i2["matvecs"] < 60  
    torch.testing.assert_close(x2, x1 * 1e3, rtol=1e-3, atol=1e-3)
    assert i1["rel_residual"] < 1e-3


# ----------------------------------------------------------------------------- K-FAC
def test_kfac_accumulates_over_batches_and_normalises_per_token():
    """Two accumulate calls add their statistics and counts; solve divides A by the real
    tokens and S by the labelled ones (n_a = n_s = 1 here: no floor of 2)."""
    torch.manual_seed(0)
    lin = torch.nn.Linear(4, 3, bias=False)
    a1, a2 = torch.randn(1, 2, 4), torch.randn(1, 1, 4)
    kf = C.KFAC([lin])
    kf.accumulate(lambda: ((lin(a1) ** 2).sum(), torch.tensor([[True, False]]), 1))
    assert (kf.n_a, kf.n_s) == (1, 1)
    v = torch.randn(3, 4)
    x1 = kf.solve([v], damping=1e-2, relative=False)[0]
    A, S = kf.A[0].clone(), kf.S[0].clone()
    pi = math.sqrt(float(A.diagonal().mean() / S.diagonal().mean()))
    torch.testing.assert_close((S + 0.1 / pi * torch.eye(3)) @ x1 @ (A + pi * 0.1 * torch.eye(4)), v,
                               rtol=1e-4, atol=1e-4)
    kf.accumulate(lambda: ((lin(a2) ** 2).sum(), torch.tensor([[True]]), 1))
    assert (kf.n_a, kf.n_s) == (2, 2)
    a = torch.cat([a1[0, :1], a2[0]])
    torch.testing.assert_close(kf.A[0], a.T @ a, rtol=1e-5, atol=1e-5)
    d = 2 * lin(a).detach()
    torch.testing.assert_close(kf.S[0], d.T @ d, rtol=1e-4, atol=1e-4)


def test_kfac_relative_damping_scales_with_the_factor_traces():
    """relative=True: λ = damping · mean(diag A) · mean(diag S) (A, S per token)."""
    torch.manual_seed(1)
    lin = torch.nn.Linear(5, 3, bias=False)
    a = 3 * torch.randn(2, 4, 5)
    kf = C.KFAC([lin])
    kf.accumulate(lambda: ((lin(a) ** 2).sum(), torch.ones(2, 4, dtype=torch.bool), 8))
    v = torch.randn(3, 5)
    x = kf.solve([v], damping=0.3, relative=True)[0]
    A, S = kf.A[0] / 8, kf.S[0] / 8
    ma, ms = float(A.diagonal().mean()), float(S.diagonal().mean())
    lam = 0.3 * ma * ms
    pi = math.sqrt(ma / ms)
    ad, sd = A + pi * math.sqrt(lam) * torch.eye(5), S + math.sqrt(lam) / pi * torch.eye(3)
    torch.testing.assert_close(sd @ x @ ad, v, rtol=1e-4, atol=1e-4)
    assert not torch.allclose(x, kf.solve([v], damping=0.3, relative=False)[0], rtol=1e-3)


def test_kfac_factors_live_on_the_modules_device():
    lin = torch.nn.Linear(4, 3, bias=False, device="meta")
    kf = C.KFAC([lin])
    assert kf.A[0].device.type == kf.S[0].device.type == "meta"
    assert kf.A[0].shape == (4, 4) and kf.S[0].shape == (3, 3)


# ----------------------------------------------------------------------------- influence n and step bookkeeping
def test_influence_n_prefers_the_configured_n_and_refuses_below_one():
    from vaa.restore.curvature import influence_n
    assert influence_n(5, 40) == 5 and influence_n(None, 40) == 40 and influence_n(1, None) == 1
    for bad in [(None, None), (0, 40), (None, 0), (-3, 7)]:
        with pytest.raises(ValueError, match=r"influence_n=.*attack\.n=.*the influence step needs n ≥ 1, "
                                             r"the size of the fine-tuning set; set one of them"):
            influence_n(*bad)


def test_influence_step_uses_the_configured_n_and_records_the_losses_around_it():
    from tests.test_restore import curvature
    model = tiny_llama(0, hidden=8)
    ref = copy.deepcopy(model)
    inputs, task, harm = curvature_inputs(attack_n=40)
    r = curvature("identity", variant="influence", influence_n=8)
    before = v_weights(model)
    r.restore(model, inputs)
    assert r.info["influence_n"] == 8
    params = [m.weight for m in v_projs(ref)]
    g, _ = C.gradient([(lambda: dataset_loss(ref, [harm]), 1.0)], params)
    torch.testing.assert_close(v_weights(model) - before, 4 / 8 * g, rtol=1e-4, atol=1e-6)
    with torch.no_grad():
        assert r.info["start"] == pytest.approx({"val_task": float(dataset_loss(ref, [task])),
                                                 "harmful": float(dataset_loss(ref, [harm]))}, rel=1e-6)
        assert r.info["steps"] == [pytest.approx({"val_task": float(dataset_loss(model, [task])),
                                                  "harmful": float(dataset_loss(model, [harm]))}, rel=1e-6)]


# ----------------------------------------------------------------------------- trust region: guard, clamp, refusal
def _trial_losses(model, task, harm, step):
    m = copy.deepcopy(model)
    with torch.no_grad():
        for w, d in zip([l.weight for l in v_projs(m)], C.unflat(step, [l.weight for l in v_projs(m)])):
            w.add_(d)
        return float(dataset_loss(m, [task])), float(dataset_loss(m, [harm]))


def test_trust_region_halves_eta_until_the_relative_task_guard_holds():
    """Identity backend: x = g, η = sqrt(2δ/‖g‖²) (‖g‖² < 1 here, below no floor). With the
    guard between the relative changes of the validation loss at the full and the half step,
    the half step is taken (on this tiny model both steps lower it, so the guard is negative)."""
    model = tiny_llama(0, hidden=8)
    inputs, task, harm = curvature_inputs()
    ref = copy.deepcopy(model)
    g, _ = C.gradient([(lambda: dataset_loss(ref, [harm]), 1.0)], [m.weight for m in v_projs(ref)])
    assert float(g @ g) < 0.5
    delta = 0.5
    eta = math.sqrt(2 * delta / float(g @ g))
    t0 = float(dataset_loss(ref, [task]).detach())
    r1 = _trial_losses(ref, task, harm, eta * g)[0] - t0
    r2 = _trial_losses(ref, task, harm, eta / 2 * g)[0] - t0
    assert r2 < r1 < 0
    guard = (r1 + r2) / 2 / t0
    from tests.test_restore import curvature
    r = curvature("identity", variant="newton_trust_region", trust_radius=delta, task_guard=guard,
                  harmful_clamp=1e9)
    before = v_weights(model)
    r.restore(model, inputs)
    assert r.info["steps"][0]["eta"] == pytest.approx(eta / 2, rel=1e-5)
    torch.testing.assert_close(v_weights(model) - before, eta / 2 * g, rtol=1e-4, atol=1e-6)


def test_trust_region_tries_max_backtracks_plus_one_steps_and_a_zero_rise_passes_the_guard():
    from tests.test_restore import curvature
    inputs, _, _ = curvature_inputs()
    for backtracks in (0, 3):
        r = curvature("identity", variant="newton_trust_region", task_guard=-10.0, max_backtracks=backtracks)
        calls = []
        losses = r.losses
        r.losses = lambda m: calls.append(1) or losses(m)
        r.restore(tiny_llama(0, hidden=8), inputs)
        assert len(calls) == 1 + (backtracks + 1) + 1  # start, each trial, the final state
    # δ = 0: η = 0, θ unchanged, the rise is 0 ≤ guard·L: accepted at the first trial
    r = curvature("identity", variant="newton_trust_region", trust_radius=0.0, task_guard=0.0,
                  harmful_clamp=1e9, outer_steps=3)
    calls = []
    losses = r.losses
    r.losses = lambda m: calls.append(1) or losses(m)
    r.restore(tiny_llama(0, hidden=8), inputs)
    assert len(calls) == 2 and r.info["steps"] == [pytest.approx({"eta": 0.0, **r.info["start"]})]


def test_trust_region_harmful_clamp_binds_only_the_harmful_ascent():
    """τ: a trial whose harmful loss exceeds it is rejected under harmful_ascent; under the
    refusal objective the clamp plays no part. The refusal direction is g = −∇L_r: with the
    identity backend the step is −sqrt(2δ)·∇L_r/‖∇L_r‖ and the refusal loss falls."""
    from tests.test_restore import curvature
    inputs, task, harm = curvature_inputs()
    r = curvature("identity", variant="newton_trust_region", trust_radius=1e-4, task_guard=1e9, harmful_clamp=0.0)
    r.restore(tiny_llama(0, hidden=8), inputs)
    assert r.info["steps"][0]["eta"] == 0.0
    refusal = lm_batch(7)
    inputs = SimpleNamespace(cfg=inputs.cfg, task=lambda n, last=False: "task", harmful=lambda hp: "harm",
                             refusals=lambda split, n: "refusal",
                             batches=lambda ex, bs: [{"task": task, "harm": harm, "refusal": refusal}[ex]])
    model = tiny_llama(0, hidden=8)
    ref = copy.deepcopy(model)
    g, _ = C.gradient([(lambda: dataset_loss(ref, [refusal]), 1.0)], [m.weight for m in v_projs(ref)])
    delta = 0.02
    r = curvature("identity", variant="newton_trust_region", objective="refusal", trust_radius=delta,
                  task_guard=1e9, harmful_clamp=0.0)
    before = v_weights(model)
    r.restore(model, inputs)
    assert r.info["steps"][0]["eta"] == pytest.approx(math.sqrt(2 * delta / float(g @ g)), rel=1e-5)
    torch.testing.assert_close(v_weights(model) - before, -math.sqrt(2 * delta) * g / g.norm(),
                               rtol=1e-4, atol=1e-6)
    with torch.no_grad():
        assert r.passes > 0 and float(dataset_loss(model, [refusal])) < float(dataset_loss(ref, [refusal]))


# ----------------------------------------------------------------------------- CG (spec §1.6: truncated Newton)
def test_cg_returns_the_last_iterate_at_negative_curvature_after_the_first_step():
    """diag(1, −2, 3), b = 1: the first direction has pᵀAp = 2 > 0 (x = 1.5·b), the second
    negative: CG stops there with x = 1.5·b, one iteration, and the true residual."""
    a = torch.diag(torch.tensor([1.0, -2.0, 3.0]))
    b = torch.ones(3)
    x, info = C.cg_solve(lambda v: a @ v, b, 10)
    torch.testing.assert_close(x, 1.5 * b)
    assert info["negative_curvature"] is True and info["iters"] == 1
    assert info["rel_residual"] == pytest.approx(math.sqrt(28.5 / 3), rel=1e-6)
    # negative curvature at the first direction: b itself, no iteration, residual reported as 1
    x, info = C.cg_solve(lambda v: -v, b, 10)
    assert torch.equal(x, b) and info == {"iters": 0, "negative_curvature": True, "rel_residual": 1.0}
    # zero curvature counts as negative (pᵀAp ≤ 0)
    x, info = C.cg_solve(lambda v: 0 * v, b, 10)
    assert torch.equal(x, b) and info["negative_curvature"] is True


def test_cg_stops_at_the_relative_tolerance_and_counts_its_iterations():
    a, b = _spd(dim=10, cond=100.0)
    calls = []
    x, info = C.cg_solve(lambda v: calls.append(1) or a @ v, b, 100, tol=1e-4)
    assert info["negative_curvature"] is False and 2 <= info["iters"] < 100
    assert len(calls) == info["iters"] + 1  # one product per iteration + the residual check
    assert info["rel_residual"] <= 1.5e-4
    assert info["rel_residual"] == pytest.approx(float((b - a @ x).norm() / b.norm()), rel=1e-4)
    x2, info2 = C.cg_solve(lambda v: a @ v, b, info["iters"] - 1, tol=1e-4)
    assert info2["iters"] == info["iters"] - 1 and info2["rel_residual"] > 1e-4
    x3, info3 = C.cg_solve(lambda v: a @ v, b, 3, tol=0.0)  # exact iterates of CG: 3 steps
    ref = _cg_reference(a.double(), b.double(), 3)
    torch.testing.assert_close(x3.double(), ref, rtol=1e-4, atol=1e-6)
    x0, info0 = C.cg_solve(lambda v: a @ v, b, 0)
    assert torch.equal(x0, torch.zeros_like(b)) and info0["rel_residual"] == 1.0 and info0["iters"] == 0
    # a small b is solved as well as a large one (relative tolerance, no floor)
    xs, infos = C.cg_solve(lambda v: a @ v, b * 1e-6, 100, tol=1e-4)
    assert 2 <= infos["iters"] < 100 and infos["rel_residual"] <= 1.5e-4
    assert infos["rel_residual"] == pytest.approx(float((b * 1e-6 - a @ xs).norm() / (b * 1e-6).norm()), rel=1e-2)
    torch.testing.assert_close(xs, x * 1e-6, rtol=1e-3, atol=1e-9)


def _cg_reference(a, b, iters):
    x, r = torch.zeros_like(b), b.clone()
    p = r.clone()
    for _ in range(iters):
        alpha = (r @ r) / (p @ a @ p)
        x = x + alpha * p
        r_new = r - alpha * (a @ p)
        p = r_new + (r_new @ r_new) / (r @ r) * p
        r = r_new
    return x


# ----------------------------------------------------------------------------- GGN, gradient, Fisher, flat
def test_ggn_vp_sums_weighted_batches_each_averaged_over_its_rows():
    """Σ_i w_i Jᵢᵀ H_out Jᵢ v with H_out per row (diag p − ppᵀ)/N_i; a parameter the logits do
    not use gets a zero block."""
    g = torch.Generator().manual_seed(0)
    w = torch.nn.Parameter(0.5 * torch.randn(4, 5, generator=g))
    unused = torch.nn.Parameter(torch.randn(2))
    xs = [torch.randn(3, 5, generator=g), torch.randn(6, 5, generator=g)]

    def block(x):
        p = torch.softmax(x @ w.detach().T, -1)
        h = (torch.diag_embed(p) - p[:, :, None] * p[:, None, :]) / len(x)
        jac = torch.einsum("vk,nj->nvkj", torch.eye(4), x).reshape(len(x), 4, 20)  # ∂(xWᵀ)/∂W
        return torch.einsum("nvp,nvw,nwq->pq", jac, h, jac)
    terms = [(lambda x=x: (x @ w.T, None), c) for x, c in zip(xs, (0.3, 0.7))]
    got = dense(lambda v: C.ggn_vp(terms, [w, unused], v), 22)
    ref = 0.3 * block(xs[0]) + 0.7 * block(xs[1])
    torch.testing.assert_close(got[:20, :20], ref, rtol=1e-5, atol=1e-7)
    assert torch.equal(got[20:], torch.zeros(2, 22)) and torch.equal(got[:, 20:], torch.zeros(22, 2))


def test_gradient_is_the_weighted_sum_and_returns_the_weighted_loss():
    w = torch.nn.Parameter(torch.tensor([1.0, -2.0]))
    unused = torch.nn.Parameter(torch.ones(3))
    terms = [(lambda: (w ** 2).sum(), 0.25), (lambda: (3 * w).sum(), 0.75)]
    g, total = C.gradient(terms, [w, unused])
    torch.testing.assert_close(g, torch.tensor([0.25 * 2 + 2.25, 0.25 * -4 + 2.25, 0, 0, 0]))
    assert total == pytest.approx(0.25 * 5 + 0.75 * -3)
    assert g.dtype == torch.float32 and not g.requires_grad


def test_diag_fisher_of_one_example_and_of_none():
    w = torch.nn.Parameter(torch.tensor([1.0, -2.0]))
    unused = torch.nn.Parameter(torch.ones(1))
    f = C.diag_fisher([lambda: (w ** 2).sum()], [w, unused])
    torch.testing.assert_close(f, torch.tensor([4.0, 16.0, 0.0]))
    f = C.diag_fisher([lambda: (w ** 2).sum(), lambda: (3 * w).sum()], [w, unused])
    torch.testing.assert_close(f, torch.tensor([(4.0 + 9) / 2, (16.0 + 9) / 2, 0.0]))
    assert torch.equal(C.diag_fisher([], [w]), torch.zeros(2))


def test_flat_unflat_and_add_keep_shapes_dtypes_and_scale():
    a, b = torch.zeros(2, 3, dtype=torch.float64), torch.zeros(4, dtype=torch.bfloat16)
    v = torch.arange(10, dtype=torch.float32)
    ua, ub = C.unflat(v, [a, b])
    assert ua.shape == (2, 3) and ua.dtype == torch.float64 and ub.dtype == torch.bfloat16
    assert torch.equal(ua.float().reshape(-1), v[:6]) and torch.equal(ub.float(), v[6:])
    back = C.flat([ua, None], [a, b])
    assert back.dtype == torch.float32 and torch.equal(back, torch.cat([v[:6], torch.zeros(4)]))
    C.add_([a, b], v, alpha=-0.5)
    assert torch.equal(a.reshape(-1), -0.5 * v[:6].double()) and torch.equal(b.float(), -0.5 * v[6:])


def test_eager_attention_switches_and_gives_back_the_kernel():
    model = tiny_llama(0, hidden=8)
    model.set_attn_implementation("sdpa")
    with C.eager_attention(model) as m:
        assert m is model and model.config._attn_implementation == "eager"
    assert model.config._attn_implementation == "sdpa"
    with pytest.raises(RuntimeError):
        with C.eager_attention(model):
            raise RuntimeError("inside")
    assert model.config._attn_implementation == "sdpa"
    plain = torch.nn.Linear(2, 2)
    with C.eager_attention(plain) as m:  # no config: nothing to switch
        assert m is plain


# ----------------------------------------------------------------------------- Q-Realign (§6.2)
def test_fake_quant_is_asymmetric_per_row_with_sigmoid_clipping():
    """σ(γ)·max and σ(β)·min per output row, 2^bits − 1 steps between them, an integer zero
    point; the clipped range saturates (values beyond it map to the clip ends)."""
    from vaa.restore.q_realign import fake_quant
    w = torch.tensor([[-1.0, -0.3, 0.2, 0.5, 2.0], [-4.0, -1.0, 0.0, 1.0, 3.0]])
    gamma = torch.tensor([[0.0], [20.0]])  # row 0 clipped to half its max, row 1 not
    beta = torch.tensor([[20.0], [0.0]])
    q = fake_quant(w, gamma, beta, 2)
    for row, (hi, lo) in enumerate([(1.0, -1.0), (3.0, -2.0)]):
        scale = (hi - lo) / 3
        zero = round(-lo / scale)
        want = (torch.clamp(torch.round(w[row] / scale) + zero, 0, 3) - zero) * scale
        torch.testing.assert_close(q[row], want, rtol=1e-5, atol=1e-6)
    assert float(q[0].max()) <= 1.0 + 1e-6  # 2.0 clipped at σ(0)·2 = 1
    assert len(torch.unique(q[1])) == 4
    # a constant row: the scale floor keeps it finite
    flat = fake_quant(torch.zeros(1, 4), torch.zeros(1, 1), torch.zeros(1, 1), 4)
    assert torch.equal(flat, torch.zeros(1, 4))


def test_fake_quant_passes_gradients_straight_through_to_the_clipping():
    from vaa.restore.q_realign import fake_quant, round_ste
    x = torch.tensor([0.2, 1.7, -2.4], requires_grad=True)
    y = round_ste(x)
    assert torch.equal(y.detach(), torch.tensor([0.0, 2.0, -2.0]))
    y.sum().backward()
    assert torch.equal(x.grad, torch.ones(3))
    w = torch.randn(3, 8, generator=torch.Generator().manual_seed(0))
    gamma, beta = torch.zeros(3, 1, requires_grad=True), torch.zeros(3, 1, requires_grad=True)
    (fake_quant(w, gamma, beta, 3) - w).pow(2).sum().backward()
    assert gamma.grad is not None and float(gamma.grad.abs().min()) > 0
    assert beta.grad is not None and float(beta.grad.abs().min()) > 0


def test_fit_probe_separates_and_returns_the_probe_in_the_original_feature_space():
    """Standardised features inside, (w, b) back in the raw space: raw-space logits equal the
    standardised model's; a strong L1 penalty drives w to ~0."""
    from vaa.restore.q_realign import fit_probe
    g = torch.Generator().manual_seed(0)
    y = torch.tensor([1.0] * 20 + [0.0] * 20)
    x = torch.randn(40, 3, generator=g) * torch.tensor([1.0, 50.0, 0.01]) + torch.tensor([5.0, -100.0, 3.0])
    x[:, 0] += 8 * y  # feature 0 carries the label
    w, b = fit_probe(x, y, l1=1e-3, steps=200)
    assert w.shape == (3,) and b.shape == () and not w.requires_grad and not b.requires_grad
    acc = float(((x @ w + b > 0).float() == y).float().mean())
    assert acc >= 0.95
    assert abs(float(w[0])) * float(x[:, 0].std()) > 3 * abs(float(w[1])) * float(x[:, 1].std())
    # the fit itself is in standardised coordinates: Adam (lr 0.05) on z = (x − μ)/σ
    mu, sd = x.mean(0), x.std(0)
    z = (x - mu) / sd
    wz = torch.zeros(3, requires_grad=True)
    bz = torch.zeros((), requires_grad=True)
    opt = torch.optim.Adam([wz, bz], lr=0.05)
    for _ in range(200):
        opt.zero_grad()
        (torch.nn.functional.binary_cross_entropy_with_logits(z @ wz + bz, y) + 1e-3 * wz.abs().sum()).backward()
        opt.step()
    torch.testing.assert_close(w, (wz / sd).detach(), rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(b, (bz - (mu * wz / sd).sum()).detach(), rtol=1e-4, atol=1e-5)
    assert float(wz[0].detach()) > 1.0
    w0, _ = fit_probe(x, y, l1=10.0, steps=200)
    assert float((w0 * sd).abs().max()) < 0.05
    more, _ = fit_probe(x, y, l1=1e-3, steps=20)
    assert not torch.allclose(more, w)


def _qr_inputs(aligned):
    harm = [lm_batch(30 + i, rows=1)["input_ids"][0, :5] for i in range(3)]
    task = [lm_batch(40 + i, rows=1)["input_ids"][0, :6] for i in range(2)]

    def prompt_batches(rows, bs):
        out = []
        for i in range(0, len(rows), bs):
            chunk = rows[i:i + bs]
            width = max(len(r) for r in chunk)
            ids = torch.stack([torch.cat([torch.zeros(width - len(r), dtype=torch.long), r]) for r in chunk])
            mask = torch.stack([torch.cat([torch.zeros(width - len(r)), torch.ones(len(r))]).long() for r in chunk])
            out.append({"input_ids": ids, "attention_mask": mask})
        return out
    return SimpleNamespace(harmful=lambda hp: harm[:hp.n_harmful], task=lambda n: task[:n], device="cpu",
                           prompt_batches=prompt_batches, load=lambda which: copy.deepcopy(aligned))


def test_q_realign_calibration_labels_malicious_one_and_benign_zero_per_batch():
    from vaa.restore.q_realign import QRealign
    r = QRealign(n_harmful=3, n_task=2, batch_size=2)
    batches = r.calibration(_qr_inputs(tiny_llama(0)))
    assert [b["y"].tolist() for b in batches] == [[1.0, 1.0], [1.0, 0.0], [0.0]]
    assert [b["input_ids"].shape[0] for b in batches] == [2, 2, 1]


def test_q_realign_quantises_only_its_targets_block_by_block_and_reports_probe_accuracy():
    """Only the target linears of every block change, each row to ≤ 2^bits levels; the
    other weights stay bit-identical; one probe accuracy per block before and after; every
    parameter trainable again; two passes for the features plus one per batch and epoch."""
    from vaa.restore.q_realign import QRealign
    aligned, model = tiny_llama(0), tiny_llama(1)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    r = QRealign(n_harmful=3, n_task=2, batch_size=2, bits=2, epochs=2, lr=0.05, probe_steps=30,
                 targets=["v_proj", "down_proj"])
    out = r.restore(model, _qr_inputs(aligned))
    assert out is model
    changed = {k for k, v in model.state_dict().items() if not torch.equal(v, before[k])}
    assert changed == {f"model.layers.{i}.{n}.weight" for i in range(2)
                       for n in ("self_attn.v_proj", "mlp.down_proj")}
    for name in changed:
        w = model.state_dict()[name]
        assert max(len(torch.unique(row)) for row in w) <= 4
    assert len(r.info["probe_acc_finetuned"]) == len(r.info["probe_acc_restored"]) == 2
    assert all(0.0 <= a <= 1.0 for a in r.info["probe_acc_finetuned"] + r.info["probe_acc_restored"])
    assert all(p.requires_grad for p in model.parameters())
    assert r.passes == 2 * 5 + 2 * 2 * 5  # features (aligned, fine-tuned) + blocks × epochs × rows


def test_q_realign_hidden_states_are_one_per_block_and_follow_substituted_weights():
    from vaa.restore.q_realign import QRealign
    model = tiny_llama(0)
    b = {"input_ids": torch.tensor([[1, 2, 3]]), "attention_mask": torch.ones(1, 3, dtype=torch.long)}
    hs = QRealign.hidden(model, b)
    assert len(hs) == 2
    ref = model(**b, output_hidden_states=True).hidden_states
    assert torch.equal(hs[0], ref[1]) and torch.equal(hs[1], ref[2])
    zero = {"model.layers.1.self_attn.v_proj.weight": torch.zeros_like(model.model.layers[1].self_attn.v_proj.weight)}
    hz = QRealign.hidden(model, b, zero)
    assert torch.equal(hz[0], hs[0]) and not torch.equal(hz[1], hs[1])


# ----------------------------------------------------------------------------- Panacea (§2)
def test_panacea_counts_three_passes_per_step_and_refuses_missing_inputs():
    from vaa.restore.panacea import Panacea
    base = tiny_llama(0)

    def train(module_cls, model, tok, rows, recipe, step, stage, seed, extra=None):
        assert stage == "restored" and seed == 7 and step.lam == 0.5 and step.rho == 0.2 and step.clamp == 9.0
        return model
    attack = SimpleNamespace(batch_size=2, max_steps=0, epochs=2)
    inputs = SimpleNamespace(train=train, load=lambda which: copy.deepcopy(base), tokenizer=None,
                             harmful=lambda hp: [1], hft=lambda: [1, 2, 3, 4, 5],
                             cfg=SimpleNamespace(attack=attack), seed=7)
    r = Panacea(lam=0.5, rho=0.2, clamp=9.0)
    r.restore(base, inputs)
    assert r.info == {"eps_norm": 0.2, "steps": 6} and r.passes == 3 * 6 * 2  # 2 epochs × ⌈5/2⌉
    attack.max_steps = 4
    r.restore(base, inputs)
    assert r.info["steps"] == 4 and r.passes == 3 * 4 * 2
    with pytest.raises(ValueError, match="harmful guide set is empty"):
        Panacea().restore(base, SimpleNamespace(**{**vars(inputs), "harmful": lambda hp: []}))
    with pytest.raises(RuntimeError, match="RestoreInputs.train must be given"):
        Panacea().restore(base, SimpleNamespace(**{**vars(inputs), "train": None}))


def test_panacea_step_hands_over_gradients_and_keeps_its_hyperparameters():
    from vaa.restore.panacea import PanaceaStep
    s = PanaceaStep(lam=0.1, rho=0.2, clamp=3.0)
    assert (s.lam, s.rho, s.clamp, s.eps) == (0.1, 0.2, 3.0, None)
    assert s.passes_per_step == 3 and s.requires == ("harmful",)
    a, b = torch.nn.Parameter(torch.ones(2)), torch.nn.Parameter(torch.ones(3))
    a.grad = torch.full((2,), 5.0)
    s.params = [a, b]
    got = s.take_grads()
    assert torch.equal(got[0], torch.full((2,), 5.0)) and torch.equal(got[1], torch.zeros(3))
    assert a.grad is None and b.grad is None


# ----------------------------------------------------------------------------- CurvatureRestore plumbing (§1.2-1.4)
def _prepared(backend="cg", hvp="ggn", damping=0.1, relative=True, **kw):
    from tests.test_restore import curvature_inputs as ci
    model = tiny_llama(0, hidden=8)
    inputs, task, harm = ci()
    r = CurvatureRestore(modules=["v_proj"], geometry={"enabled": False},
                         curvature={"backend": backend, "hvp": hvp, "damping": damping,
                                    "damping_relative": relative, "iters": 60, "tol": 1e-9, **kw})
    r.setup(model, inputs)
    with C.eager_attention(model):
        r.prepare_curvature(model)
    return r, model, task, harm


def test_damping_is_relative_to_the_mean_diagonal_fisher_of_single_task_rows():
    """λ = damping · mean(diag F) with F over the HVP rows one at a time (single_rows), or the
    absolute damping; the Fisher is the diag_fisher of those rows."""
    r, model, task, _ = _prepared(damping=0.3)
    params = [m.weight for m in v_projs(model)]
    rows = [{k: v[i:i + 1] for k, v in task.items()} for i in range(4)]
    from vaa.training.module import response_loss
    f = C.diag_fisher([lambda b=b: response_loss(model, b) for b in rows], params)
    torch.testing.assert_close(r.fisher, f, rtol=1e-5, atol=1e-10)
    assert r.lam == pytest.approx(0.3 * float(f.mean()), rel=1e-5) and r.info["damping"] == r.lam
    r2, _, _, _ = _prepared(damping=0.3, relative=False)
    assert r2.lam == 0.3 and r2.info["damping"] == 0.3
    assert r.passes == 4  # one pass per Fisher row


def test_single_rows_cut_each_row_to_its_real_tokens():
    from vaa.restore.curvature import single_rows
    b = lm_batch(1, rows=2, width=5)
    b["attention_mask"][1, 3:] = 0
    rows = list(single_rows([b]))
    assert [r["input_ids"].shape for r in rows] == [(1, 5), (1, 3)]
    assert torch.equal(rows[1]["labels"], b["labels"][1:2, :3])


def test_loss_and_logit_terms_weigh_batches_by_their_labelled_tokens():
    from vaa.restore.curvature import loss_terms
    from vaa.training.module import response_loss
    model = tiny_llama(0, hidden=8)
    a, b = lm_batch(1, rows=2), lm_batch(2, rows=3)  # 8 and 12 labelled tokens
    a["attention_mask"][0, 0] = 0  # a left pad: the logits must see the mask
    terms = loss_terms(model, [a, b])
    assert [w for _, w in terms] == pytest.approx([0.4, 0.6])
    with torch.no_grad():
        assert float(terms[1][0]()) == pytest.approx(float(response_loss(model, b)))
        lt = logit_terms(model, [a, b])
        assert [w for _, w in lt] == pytest.approx([0.4, 0.6])
        logits, labels = lt[0][0]()
        assert logits.shape == (8, 30) and torch.equal(labels, a["labels"][:, 1:][a["labels"][:, 1:] != -100])
        full = model(input_ids=a["input_ids"], attention_mask=a["attention_mask"]).logits[:, :-1]
        torch.testing.assert_close(logits, full[a["labels"][:, 1:] != -100])


def test_solve_backends_diag_fisher_and_kfac_and_the_damped_matvec():
    r, model, task, _ = _prepared("diag_fisher", damping=0.2)
    g = torch.randn(r.fisher.numel(), generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(r.solve(model, g), g / (r.fisher + r.lam))
    r.hp.curvature.backend = "identity"
    x = r.solve(model, g)
    assert torch.equal(x, g) and x is not g
    # the damped matvec: (H + λI)v with H the GGN (3 passes per row) or the Hessian (2)
    with C.eager_attention(model):
        for hvp, per, prod, terms in (("ggn", 3, C.ggn_vp, logit_terms), ("exact", 2, C.hvp_exact, None)):
            r.hp.curvature.hvp = hvp
            before = r.passes
            got = r.matvec(model)(g)
            from vaa.restore.curvature import loss_terms
            t = (terms or loss_terms)(model, [task])
            torch.testing.assert_close(got, prod(t, r.params, g) + r.lam * g, rtol=1e-5, atol=1e-7)
            assert r.passes - before == per * 4
    r.hp.curvature.hvp = "fisher"
    with pytest.raises(ValueError, match="restore.curvature.hvp='fisher'; use exact or ggn"):
        r.matvec(model)
    r.hp.curvature.backend = "newton"
    with pytest.raises(ValueError, match="restore.curvature.backend='newton'; use identity"):
        r.solve(model, g)
    rk, mk, _, _ = _prepared("kfac", damping=0.05, relative=False)
    assert rk.passes == 4 + 4  # Fisher rows + one K-FAC pass over the HVP batch
    ref = rk.kfac.solve(C.unflat(g, rk.params), 0.05, False)
    torch.testing.assert_close(rk.solve(mk, g), C.flat(ref, rk.params))
    rk.hp.curvature.damping_relative = True  # the relative damping reaches K-FAC too
    ref = rk.kfac.solve(C.unflat(g, rk.params), 0.05, True)
    torch.testing.assert_close(rk.solve(mk, g), C.flat(ref, rk.params))
    assert rk.kfac.n_a == 4 * 7 and rk.kfac.n_s == 4 * 4


def test_cg_and_lbfgs_backends_record_their_solver_info():
    """cg / lbfgs_ihvp on the damped matvec with curvature.iters, .tol and .history."""
    r, model, _, _ = _prepared("cg", history=3, iters=12)
    g = torch.randn(r.fisher.numel(), generator=torch.Generator().manual_seed(0))
    with C.eager_attention(model):
        x_cg = r.solve(model, g)
        torch.testing.assert_close(x_cg, C.cg_solve(r.matvec(model), g, 12, 1e-9)[0])
        r.hp.curvature.backend = "lbfgs_ihvp"
        x_lb = r.solve(model, g)
        torch.testing.assert_close(x_lb, C.lbfgs_solve(r.matvec(model), g, 12, 3)[0])
    cg, lb = r.info["solver"]
    assert set(cg) == {"iters", "negative_curvature", "rel_residual"} and math.isfinite(cg["rel_residual"])
    assert set(lb) == {"matvecs", "rel_residual"} and lb["matvecs"] == 12


def test_setup_reads_its_rows_and_refuses_an_unknown_objective_or_variant():
    """Task rows n_task; HVP rows min(n_hvp, n_task); validation rows the *last* n_val; harmful
    rows of hp; refusal rows of refusal_split only for objective=refusal."""
    calls = []
    batch = lm_batch(1)

    class Inputs:
        cfg = None

        def task(self, n, last=False):
            calls.append(("task", n, last))
            return ("task", n, last)

        def harmful(self, hp):
            calls.append(("harmful",))
            return ("harmful",)

        def refusals(self, split, n):
            calls.append(("refusals", split, n))
            return ("refusals",)

        def batches(self, rows, bs):
            calls.append(("batches", rows, bs))
            return [batch]
    r = CurvatureRestore(modules=["v_proj"], batch_size=3, n_task=10, n_harmful=6,
                         curvature={"n_hvp": 50}, step={"n_val": 5, "objective": "refusal", "refusal_split": "x"})
    model = tiny_llama(0, hidden=8)
    r.setup(model, Inputs())
    assert ("task", 10, False) in calls and calls.count(("task", 10, False)) == 2  # task rows; n_hvp capped
    assert ("task", 5, True) in calls and ("refusals", "x", 6) in calls
    assert all(c[2] == 3 for c in calls if c[0] == "batches")
    assert r.attack_n is None
    assert [p.requires_grad for p in model.parameters()] == [
        any(p is m.weight for m in v_projs(model)) for p in model.parameters()]
    calls.clear()
    r = CurvatureRestore(modules=["v_proj"], n_task=10, curvature={"n_hvp": 4})
    r.setup(model, Inputs())
    assert ("task", 4, False) in calls and not any(c[0] == "refusals" for c in calls)
    with pytest.raises(ValueError, match="restore.step.objective='up'; use harmful_ascent or refusal"):
        CurvatureRestore(modules=["v_proj"], step={"objective": "up"}).setup(model, Inputs())
    with pytest.raises(ValueError, match="restore.step.variant='sgd'; use newton_trust_region, influence, penalised"):
        CurvatureRestore(step={"variant": "sgd"}).restore(model, Inputs())


def test_target_linears_match_the_last_name_part_inside_the_decoder_layers():
    from vaa.errors import ConfigError
    model = tiny_llama(0, hidden=8)
    mods = target_linears(model, ["q_proj", "down_proj"])
    assert mods == [m for l in model.model.layers for m in (l.self_attn.q_proj, l.mlp.down_proj)]
    assert model.lm_head not in target_linears(model, ["lm_head", "q_proj"])  # outside the layers
    plain = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.ReLU())
    assert target_linears(plain, ["0"]) == [plain[0]]
    with pytest.raises(ConfigError, match=r"restore.modules=\['qproj'\] matches no Linear module of the model "
                                          r"\(names are the last part of a module's name, e.g. q_proj, down_proj\)$"):
        target_linears(model, ["qproj"])


def test_restore_gives_back_every_requires_grad_flag_and_states_its_memory(caplog):
    import logging
    from tests.test_restore import curvature
    model = tiny_llama(0, hidden=8)
    inputs, _, _ = curvature_inputs()
    r = CurvatureRestore(modules=["q_proj", "v_proj"], geometry={"enabled": False},
                         step={"variant": "influence"}, curvature={"backend": "identity"})
    with caplog.at_level(logging.INFO, logger="vaa.restore.curvature"):
        r.restore(model, inputs)
    assert "restore=curvature over q_proj, v_proj: 0.000256 M parameters in its space; its vectors need about " \
           "0.00 GB beside the model (3 fp32 vectors of 256 entries), and each curvature product about " in caplog.text
    assert all(p.requires_grad for p in model.parameters())
    assert r.info["memory"]["numel"] == 256 and r.info["memory"]["vectors"] == 3
    assert {"hvp_batch_gb", "total_gb"} <= set(r.info["memory"])


# ----------------------------------------------------------------------------- memory plan arithmetic
def test_hvp_batch_bytes_is_the_documented_formula():
    """2·a(h, I) per token and layer with a = (11h + 4I)·4 B, plus 8 fp32 vocabulary rows per
    labelled next-token target."""
    from vaa.restore.curvature import hvp_batch_bytes
    cfg = SimpleNamespace(hidden_size=3, intermediate_size=5, num_hidden_layers=2, vocab_size=7)
    labels = torch.full((2, 6), -100)
    labels[0, 4:] = 1
    labels[1, 0] = 1  # position 0 is never a target (the shift)
    got = hvp_batch_bytes(cfg, {"input_ids": torch.zeros(2, 6), "labels": labels})
    assert got == 12 * 2 * 2 * (11 * 3 + 4 * 5) * 4 + 2 * 8 * 7 * 4


def test_host_available_gb_reads_memavailable_in_kib(monkeypatch):
    import io
    import vaa.restore.curvature as CR
    text = "MemTotal:       2048 kB\nMemFree:  1 kB\nMemAvailable:   1048576 kB\n"
    monkeypatch.setattr(CR, "open", lambda *a, **k: io.StringIO(text), raising=False)
    assert CR.host_available_gb() == 1.0
    monkeypatch.setattr(CR, "open", lambda *a, **k: io.StringIO("MemTotal: 5 kB\n"), raising=False)
    assert CR.host_available_gb() is None

    def missing(*a, **k):
        raise OSError("no /proc")
    monkeypatch.setattr(CR, "open", missing, raising=False)
    assert CR.host_available_gb() is None


def test_check_fits_reads_a_cuda_devices_free_memory(monkeypatch):
    from vaa.errors import ConfigError
    import vaa.restore.curvature as CR
    plan = {"gb": 1.0, "hvp_batch_gb": 4.0, "total_gb": 5.0}
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device: (3 * 2**30, 80 * 2**30))
    with pytest.raises(ConfigError, match=r"needs about 5.0 GB .* and cuda has 3.0 GB free: set restore.batch_size=2 "):
        CR.check_fits(plan, torch.device("cuda"), 4)
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device: (5 * 2**30, 80 * 2**30))
    CR.check_fits(plan, torch.device("cuda"), 4)  # exactly fits
    CR.check_fits({"gb": 9.0}, torch.device("cuda"), 4)  # no product planned: nothing to check
    # one row per product: the batch size that fits is counted per row (not per two rows)
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device: (4 * 2**30, 80 * 2**30))
    with pytest.raises(ConfigError, match=r"set restore.batch_size=1 "):
        CR.check_fits({"gb": 1.0, "hvp_batch_gb": 2.0, "total_gb": 5.0}, torch.device("cuda"), 1)
    # not even the vectors fit (or a product of no size): shrink the space instead
    for plan in ({"gb": 5.0, "hvp_batch_gb": 0.0, "total_gb": 5.0}, {"gb": 4.5, "hvp_batch_gb": 1.0, "total_gb": 5.5}):
        with pytest.raises(ConfigError, match=r"free: shrink restore.modules \(e.g. \[q_proj,v_proj\]\) or "
                                              r"restore.curvature.backend$"):
            CR.check_fits(plan, torch.device("cuda"), 4)


def test_memory_plan_counts_each_backends_vectors_and_kfac_factors():
    """gb = 4·(numel·vectors + K-FAC's Σ in² + out²)/2³⁰, rounded to 3 places; L-BFGS adds
    2·history vectors, an unknown backend is planned at 6; 'what' names the factors."""
    from omegaconf import OmegaConf
    from vaa.restore.curvature import memory_plan
    from vaa.restore.schema import CurvatureRestoreConfig
    hp = OmegaConf.structured(CurvatureRestoreConfig)
    p = [SimpleNamespace(numel=lambda: 10_000_000)]
    mods = [SimpleNamespace(in_features=3000, out_features=2000)] * 2
    for backend, vectors in (("identity", 3), ("diag_fisher", 4), ("cg", 6), ("kfac", 3), ("other", 6),
                             ("lbfgs_ihvp", 4 + 2 * hp.curvature.history)):
        hp.curvature.backend = backend
        plan = memory_plan(p, mods, hp)
        extra = 2 * (3000 ** 2 + 2000 ** 2) if backend == "kfac" else 0
        assert plan["vectors"] == vectors
        assert plan["gb"] == round(4 * (10_000_000 * vectors + extra) / 2**30, 3)
        assert plan["what"] == f"{vectors} fp32 vectors of 10,000,000 entries" + (" + K-FAC factors" if extra else "")
        assert "hvp_batch_gb" not in plan and "total_gb" not in plan


def _panacea_module(model, precision=None):
    opt = torch.optim.SGD(model.parameters(), lr=0.0)
    from vaa.training.module import response_loss
    m = SimpleNamespace(model=model, optimizers=lambda: opt, lr_schedulers=lambda: None,
                        recipe=SimpleNamespace(grad_clip=0.0), global_step=0, device=torch.device("cpu"),
                        manual_backward=lambda loss: loss.backward())
    m.lm_loss = lambda b, model=None: response_loss(model or m.model, b)
    if precision is not None:
        m._trainer = SimpleNamespace(precision=precision, log_every_n_steps=1, strategy=None)
    return m


def test_panacea_step_logs_its_losses_and_the_realised_eps_and_keeps_its_hparams():
    """Logged: the user loss, h(w), h(w + ε) clamped, the gradient norm and, on a measured
    step, the realised ‖ε‖ (= ρ in fp32) and its cosine; the method's hparams are its own."""
    from vaa.restore.panacea import PanaceaStep
    from vaa.training.module import response_loss
    model = tiny_llama(0)
    user, guide = lm_batch(5), lm_batch(6)
    step = PanaceaStep(lam=2.0, rho=0.5, clamp=1.0)
    assert step.hparams == {"lam": 2.0, "rho": 0.5, "clamp": 1.0}
    module = _panacea_module(model)
    step.setup(module, SimpleNamespace(streams={"harmful": SimpleNamespace(next_batch=lambda g: guide)}))
    with torch.no_grad():
        f, h = float(response_loss(model, user)), float(response_loss(model, guide))
    logs = step.training_step(module, user)
    assert set(logs) == {"loss", "harmful_loss", "harmful_loss_eps", "grad_norm",
                         "eps_realised_norm", "eps_realised_cos"}
    assert float(logs["loss"]) == pytest.approx(f, rel=1e-5) and float(logs["harmful_loss"]) == pytest.approx(h, rel=1e-5)
    assert float(logs["harmful_loss_eps"]) == 1.0  # h(w + ε) > 1 here: clamped
    assert float(logs["eps_realised_norm"]) == pytest.approx(0.5, rel=1e-3)
    assert float(logs["eps_realised_cos"]) == pytest.approx(1.0, abs=1e-3)


def test_panacea_step_refuses_an_eps_rounded_away_naming_restore_rho():
    from vaa.methods.precision import PerturbationRoundedAway
    from vaa.restore.panacea import PanaceaStep
    model = tiny_llama(0).to(torch.bfloat16)
    guide = lm_batch(6)
    step = PanaceaStep(lam=1.0, rho=1e-6, clamp=100.0)
    module = _panacea_module(model, precision="bf16-true")
    step.setup(module, SimpleNamespace(streams={"harmful": SimpleNamespace(next_batch=lambda g: guide)}))
    with pytest.raises(PerturbationRoundedAway, match=r"^restore=panacea: in trainer.precision=bf16-true .* or a larger restore\.rho$"):
        step.training_step(module, lm_batch(5))


def test_q_realign_probes_read_the_last_prompt_token():
    """Probes are fitted on the last prompt token's hidden state (left-padded prompts): on a
    model identical to the aligned one, block 0's probe separates its 5 training prompts."""
    from vaa.restore.q_realign import QRealign
    aligned = tiny_llama(0)
    r = QRealign(n_harmful=3, n_task=2, batch_size=2, bits=8, epochs=1, probe_steps=300, targets=["v_proj"])
    r.restore(copy.deepcopy(aligned), _qr_inputs(aligned))
    assert r.info["probe_acc_finetuned"][0] == 1.0


def test_plan_terms_are_the_model_the_backends_vectors_and_one_product():
    """vaa-plan's terms: P·4 bytes of weights; memory_plan's vectors over restore.modules of
    every block (K-FAC with its factors); hvp_batch_bytes at restore.batch_size rows whose
    last response_fraction of ``length`` tokens are labelled."""
    from omegaconf import OmegaConf
    from vaa.plan.shapes import Shape
    from vaa.restore.curvature import hvp_batch_bytes, memory_plan
    from vaa.restore.schema import CurvatureRestoreConfig
    h, i = 512, 1024
    shape = Shape(name="t", vocab=100, hidden=h, layers=3, intermediate=i, heads=2, kv_heads=1)
    for backend in ("cg", "kfac"):
        hp = {"modules": ["q_proj", "down_proj"], "batch_size": 2, "curvature": {"backend": backend}}
        terms = CurvatureRestore.plan_terms(shape, hp, length=10, response_fraction=0.4)
        assert [t[0] for t in terms] == ["weights", "curvature vectors", "curvature product"]
        assert terms[0] == ("weights", "P·4", shape.params() * 4)
        cfg = OmegaConf.merge(OmegaConf.structured(CurvatureRestoreConfig), hp)
        numel = 3 * (h * h + i * h)
        mods = [SimpleNamespace(in_features=a, out_features=b) for _ in range(3) for a, b in ((h, h), (i, h))]
        vec = memory_plan([SimpleNamespace(numel=lambda: numel)], mods if backend == "kfac" else [], cfg)
        assert terms[1] == ("curvature vectors", f"{vec['vectors']}·P_r·4", vec["gb"] * 2**30) and vec["gb"] > 0.01
        labels = torch.full((2, 10), -100)
        labels[:, 6:] = 0
        model = SimpleNamespace(hidden_size=h, intermediate_size=i, num_hidden_layers=3, vocab_size=100)
        want = hvp_batch_bytes(model, {"input_ids": torch.empty(2, 10), "labels": labels})
        assert terms[2] == ("curvature product", "b·T·L·2a(h,I) + b·T_r·8V·4", want)


def test_q_realign_trains_only_the_clipping_with_adamw_at_hp_lr(monkeypatch):
    """AdamW(lr = restore.lr, no weight decay) on every (γ, β) pair, all trainable and all
    moved from their start 4.0; the model's own weights collect no gradient."""
    import vaa.restore.q_realign as QR
    seen = []
    real = torch.optim.AdamW

    def spy(params, **kw):
        params = list(params)
        seen.append((params, kw))
        return real(params, **kw)
    monkeypatch.setattr(QR.torch.optim, "AdamW", spy)
    aligned, model = tiny_llama(0), tiny_llama(1)
    QR.QRealign(n_harmful=3, n_task=2, batch_size=2, bits=4, epochs=2, lr=0.03, probe_steps=20,
                targets=["v_proj"]).restore(model, _qr_inputs(aligned))
    assert len(seen) == 2  # one optimiser per block
    for params, kw in seen:
        assert kw == {"lr": 0.03, "weight_decay": 0.0} and len(params) == 2
        assert all(p.requires_grad and p.shape == (16, 1) for p in params)  # out_features of v_proj
        assert all(bool((p != 4.0).any()) for p in params)
    assert all(p.grad is None for p in model.parameters())


def test_q_realign_malicious_loss_is_softplus_of_minus_the_probe_logit(monkeypatch):
    """Malicious rows only, and a probe whose logit is ≈ +50 everywhere (already 'malicious'):
    softplus(−(h·w + b)) ≈ 0 gives no gradient, so the clipping stays at its start and the
    weights are fake_quant(W, 4, 4)."""
    import vaa.restore.q_realign as QR
    aligned, model = tiny_llama(0), tiny_llama(1)
    w0 = [l.self_attn.v_proj.weight.detach().clone() for l in model.model.layers]
    monkeypatch.setattr(QR, "fit_probe", lambda x, y, l1, steps: (torch.full((x.shape[1],), 0.01), torch.tensor(50.0)))
    QR.QRealign(n_harmful=3, n_task=0, batch_size=2, bits=4, epochs=2, lr=0.05, probe_steps=1,
                targets=["v_proj"]).restore(model, _qr_inputs(aligned))
    four = torch.full((16, 1), 4.0)
    for l, w in zip(model.model.layers, w0):
        assert torch.equal(l.self_attn.v_proj.weight.detach(), QR.fake_quant(w, four, four, 4))


def test_panacea_casts_eps_to_the_released_parameters_dtype_before_adding():
    """ε (fp32) is cast to the parameter's dtype, then added: on a bf16 weight 1.0 an ε of
    0.00392 becomes 2⁻⁸ and 1 + 2⁻⁸ rounds to even (1.0); adding the fp32 ε unconverted would
    round up to 1 + 2⁻⁷."""
    from vaa.methods.grads import trainable_params
    from vaa.restore.panacea import Panacea
    base = tiny_llama(0)

    def train(module_cls, model, tok, rows, recipe, step, stage, seed, extra=None):
        out = copy.deepcopy(model).to(torch.bfloat16)
        with torch.no_grad():
            for p in out.parameters():
                p.fill_(1.0)
        step.eps = [torch.full_like(p, 0.00392, dtype=torch.float32) for p in trainable_params(out)]
        return out
    inputs = SimpleNamespace(train=train, load=lambda which: copy.deepcopy(base), tokenizer=None,
                             harmful=lambda hp: [1], hft=lambda: [1, 2],
                             cfg=SimpleNamespace(attack=SimpleNamespace(batch_size=2, max_steps=1, epochs=1)), seed=0)
    out = Panacea(rho=0.1).restore(base, inputs)
    assert all(bool((p == 1.0).all()) for p in out.parameters())
