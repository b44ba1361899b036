"""Edges of the repair maths that mutation testing found unchecked (issue 15; specs/restoration.md
§1.2-1.6, §2, §6.2): curvature_ops.py, curvature.py, geometry.py, q_realign.py, panacea.py.
Each test asserts what the spec or a docstring says; docstrings name what they pin down.
This file: the curvature operators (HVP, GGN, CG, L-BFGS, diagonal Fisher, K-FAC, top
eigenpairs); the rest in tests/test_restore_mutants_{steps,plumbing,geometry,qrealign_panacea}.py.

Measuring (mutmut 3.8, one child): in a copy of the checkout (without .venv, outputs, .git)
append to pyproject.toml

    [tool.mutmut]
    source_paths = ["vaa"]
    also_copy = ["conf", "benchmarks", "multirun.sh"]
    only_mutate = ["vaa/restore/curvature.py", "vaa/restore/curvature_ops.py",
                   "vaa/restore/geometry.py", "vaa/restore/q_realign.py", "vaa/restore/panacea.py"]
    pytest_add_cli_args_test_selection = ["tests/test_restore.py", "tests/test_restore_mutants.py",
        "tests/test_restore_mutants_steps.py", "tests/test_restore_mutants_plumbing.py",
        "tests/test_restore_mutants_geometry.py", "tests/test_restore_mutants_qrealign_panacea.py",
        "tests/test_restore_pipeline.py::test_each_repair_runs_and_changes_what_it_should[q_realign-extra4]",
        "tests/test_restore_pipeline.py::test_each_repair_runs_and_changes_what_it_should[panacea-extra5]"]

then ``OMP_NUM_THREADS=1 mutmut run --max-children 1 && mutmut results --all true`` (about 2 s a
mutant here: a full run of all 2064 mutants takes over an hour, so the numbers below are a
uniform sample, every mutant whose number is a multiple of 4: 500 of 2064; the pipeline tests
of the curvature repair are left out, 9 s each). Killed (incl. timeouts) / sampled, before ->
after these tests: curvature.py 112/228 -> 226/228, curvature_ops.py 73/115 -> 106/115,
geometry.py 0/37 -> 37/37, q_realign.py 59/78 -> 74/78, panacea.py 29/42 -> 42/42; all
273/500 (54.6 %) -> 485/500 (97.0 %). Of the 15 survivors, 14 are equivalent (4 L-BFGS options
that do not change its iterates, a log-text rounding, a split index, 8 device= arguments that
matter only on a CUDA device); one is a log text on a model without a config. Over every
mutant measured before (the sample plus the 836 mutmut ran first, fastest tests first: 1132):
524/1132 (46.3 %) -> 1101/1132 (97.3 %), 1101 of the 1102 not equivalent.
"""

from __future__ import annotations

import math

import pytest
import torch

from tests.test_restore import dense, tiny_llama
from vaa.restore import curvature_ops as C


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


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


# ----------------------------------------------------------------------------- subspace iteration (§1.5)
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
    assert torch.equal(C.top_eigs(lambda v: a @ v, 8, 3, 1)[1], C.top_eigs(lambda v: a @ v, 8, 3, 1, seed=0)[1])
    assert not torch.equal(one, rough)
