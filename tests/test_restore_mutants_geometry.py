"""The geometry diagnostic (specs/restoration.md §1.5): correlations, Gauss-Newton eigenpairs,
the report and CurvatureRestore.diagnose.

Part of the mutation-testing tests of the repair maths: see tests/test_restore_mutants.py for
how they are measured and the scores."""

from __future__ import annotations

import copy
from types import SimpleNamespace

import pytest
import torch

from tests.test_restore import dense, lm_batch, tiny_llama, v_projs
from vaa.restore import curvature_ops as C
from vaa.restore import geometry as G
from vaa.restore.base import per_example_losses
from vaa.restore.curvature import CurvatureRestore
from vaa.restore.curvature_terms import logit_terms, target_linears


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


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
    assert isinstance(out["wall_s"], float) and 0 <= out["wall_s"] < 600 and round(out["wall_s"], 3) == out["wall_s"]


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
