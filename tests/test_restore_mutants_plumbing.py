"""CurvatureRestore plumbing (specs/restoration.md §1.2-1.4, §1.6): damping, backends, setup,
the memory plan and vaa-plan's terms.

Part of the mutation-testing tests of the repair maths: see tests/test_restore_mutants.py for
how they are measured and the scores."""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch

from tests.test_restore import curvature_inputs, lm_batch, tiny_llama, v_projs
from vaa.restore import curvature_ops as C
from vaa.restore.curvature import CurvatureRestore
from vaa.restore.curvature_terms import logit_terms, target_linears


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


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
    from vaa.restore.curvature_terms import single_rows
    b = lm_batch(1, rows=2, width=5)
    b["attention_mask"][1, 3:] = 0
    rows = list(single_rows([b]))
    assert [r["input_ids"].shape for r in rows] == [(1, 5), (1, 3)]
    assert torch.equal(rows[1]["labels"], b["labels"][1:2, :3])


def test_loss_and_logit_terms_weigh_batches_by_their_labelled_tokens():
    from vaa.restore.curvature_terms import loss_terms
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
            from vaa.restore.curvature_terms import loss_terms
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
    from vaa.restore.curvature_memory import hvp_batch_bytes
    cfg = SimpleNamespace(hidden_size=3, intermediate_size=5, num_hidden_layers=2, vocab_size=7)
    labels = torch.full((2, 6), -100)
    labels[0, 4:] = 1
    labels[1, 0] = 1  # position 0 is never a target (the shift)
    got = hvp_batch_bytes(cfg, {"input_ids": torch.zeros(2, 6), "labels": labels})
    assert got == 12 * 2 * 2 * (11 * 3 + 4 * 5) * 4 + 2 * 8 * 7 * 4


def test_host_available_gb_reads_memavailable_in_kib(monkeypatch):
    import io
    import vaa.restore.curvature_memory as CR
    text = "MemTotal:       2048 kB\nMemFree:  1 kB\nMemAvailable:   1048576 kB\n"
    paths = []
    monkeypatch.setattr(CR, "open", lambda path, *a, **k: paths.append(path) or io.StringIO(text), raising=False)
    assert CR.host_available_gb() == 1.0 and paths == ["/proc/meminfo"]
    monkeypatch.setattr(CR, "open", lambda *a, **k: io.StringIO("MemTotal: 5 kB\n"), raising=False)
    assert CR.host_available_gb() is None

    def missing(*a, **k):
        raise OSError("no /proc")
    monkeypatch.setattr(CR, "open", missing, raising=False)
    assert CR.host_available_gb() is None


def test_check_fits_reads_a_cuda_devices_free_memory(monkeypatch):
    from vaa.errors import ConfigError
    import vaa.restore.curvature_memory as CR
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
    from vaa.restore.curvature_memory import memory_plan
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


def test_plan_terms_are_the_model_the_backends_vectors_and_one_product():
    """vaa-plan's terms: P·4 bytes of weights; memory_plan's vectors over restore.modules of
    every block (K-FAC with its factors); hvp_batch_bytes at restore.batch_size rows whose
    last response_fraction of ``length`` tokens are labelled."""
    from omegaconf import OmegaConf
    from vaa.plan.shapes import Shape
    from vaa.restore.curvature_memory import hvp_batch_bytes, memory_plan
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
    # defaults: the schema's (all seven linears, batch_size) and half of each row labelled
    cfg = OmegaConf.structured(CurvatureRestoreConfig)
    terms = CurvatureRestore.plan_terms(shape, {}, length=10)
    labels = torch.full((cfg.batch_size, 10), -100)
    labels[:, 5:] = 0
    model = SimpleNamespace(hidden_size=h, intermediate_size=i, num_hidden_layers=3, vocab_size=100)
    assert terms[2][2] == hvp_batch_bytes(model, {"input_ids": torch.empty(cfg.batch_size, 10), "labels": labels})
    numel = 3 * sum(a * b for a, b in shape.linear_dims().values())
    assert terms[1][2] == memory_plan([SimpleNamespace(numel=lambda: numel)], [], cfg)["gb"] * 2**30
