"""Q-Realign (specs/restoration.md §6.2) and Panacea (§2).

Part of the mutation-testing tests of the repair maths: see tests/test_restore_mutants.py for
how they are measured and the scores."""

from __future__ import annotations

import copy
from types import SimpleNamespace

import pytest
import torch

from tests.test_restore import lm_batch, tiny_llama


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


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


def test_q_realign_probes_read_the_last_prompt_token():
    """Probes are fitted on the last prompt token's hidden state (left-padded prompts): on a
    model identical to the aligned one, block 0's probe separates its 5 training prompts."""
    from vaa.restore.q_realign import QRealign
    aligned = tiny_llama(0)
    r = QRealign(n_harmful=3, n_task=2, batch_size=2, bits=8, epochs=1, probe_steps=300, targets=["v_proj"])
    r.restore(copy.deepcopy(aligned), _qr_inputs(aligned))
    assert r.info["probe_acc_finetuned"][0] == 1.0


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
