"""SAM weight perturbation (vaa/methods/perturb.py) and its gradient helpers
(vaa/methods/grads.py): exact restore, ‖ε‖ = ρ, perturbed-point gradient, frozen /
gradient-less params, buffer reuse, weighted mixing, LoRA (vaa.md §3.3-3.4, §3.7, §10 item 3)."""

from __future__ import annotations

import copy

import pytest
import torch

from vaa.config.schema import ArchConfig
from vaa.methods.grads import grad_norm, mix_grads, stash_grads, trainable_params
from vaa.methods.perturb import SAMPerturber, WeightPerturbation, perturb_weights
from vaa.models.build import build_tiny_llama
from vaa.models.tokenizer import build_word_tokenizer

SENTENCES = ["the cat sat on the mat", "a dog ran in the park", "how do i bake bread at home",
             "never share a password with anyone"]
ARCH = ArchConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=2,
                  intermediate_size=64)


@pytest.fixture(scope="module")
def tok():
    return build_word_tokenizer(SENTENCES)


@pytest.fixture(scope="module")
def batch(tok):
    enc = tok(SENTENCES, padding=True, return_tensors="pt")
    labels = enc["input_ids"].masked_fill(enc["attention_mask"] == 0, -100)
    return {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"], "labels": labels}


def make_model(tok, dtype=torch.float32, seed=0):
    model = build_tiny_llama(ARCH, tok, seed=seed).to(dtype)
    model.train()
    return model


def loss_of(model, batch):
    return model(**batch).loss


def backward(model, batch):
    model.zero_grad(set_to_none=True)
    loss = loss_of(model, batch)
    loss.backward()
    return loss.detach()


def snapshot(params):
    return [p.detach().clone() for p in params]


def grads_of(params):
    return [None if p.grad is None else p.grad.detach().clone() for p in params]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_copy_restore_is_bit_identical_and_eps_has_norm_rho(tok, batch, dtype):
    model = make_model(tok, dtype)
    params = trainable_params(model)
    assert len(params) == len(list(model.parameters()))  # full FT; tied embeddings counted once
    backward(model, batch)
    before, g = snapshot(params), grads_of(params)
    gnorm = torch.sqrt(sum((x.float() ** 2).sum() for x in g))
    assert torch.allclose(grad_norm(params), gnorm, rtol=1e-5)
    assert grad_norm(params).dtype == torch.float32
    rho = 0.05
    with perturb_weights(params, None, rho) as info:
        assert info.eps_norm == pytest.approx(rho, rel=1e-3)
        assert info.grad_norm == pytest.approx(float(gnorm), rel=1e-5)
        assert info.num_perturbed == len(params)
        assert info.copied_numel == sum(p.numel() for p in params)
        eps = [(p.detach().double() - b.double()) for p, b in zip(params, before)]
        moved = [not torch.equal(p, b) for p, b in zip(params, before)]
        # bf16: a norm weight of 1.0 (ulp 2^-7) may not move under a tiny share of ε
        assert all(moved) if dtype == torch.float32 else sum(moved) > len(moved) // 2
        measured = torch.sqrt(sum((e ** 2).sum() for e in eps))
        if dtype == torch.float32:
            assert float(measured) == pytest.approx(rho, rel=1e-3)
            for e, gi in zip(eps, g):  # each param moved by exactly ε = ρ·g/(‖g‖+1e-7)
                expect = rho * gi.double() / (float(gnorm) + 1e-7)
                assert torch.allclose(e, expect, rtol=1e-4, atol=1e-6)
        else:  # bf16 rounding of θ+ε: the realised step is ε up to bf16 resolution
            assert float(measured) == pytest.approx(rho, rel=0.05)
            flat_e = torch.cat([e.flatten() for e in eps])
            flat_g = torch.cat([x.double().flatten() for x in g])
            assert torch.nn.functional.cosine_similarity(flat_e, flat_g, dim=0) > 0.99
    for p, b in zip(params, before):
        assert torch.equal(p, b) and p.dtype == dtype


def test_subtract_restore_fp32_close_bf16_not_exact(tok, batch):
    model = make_model(tok, torch.float32)
    params = trainable_params(model)
    backward(model, batch)
    before = snapshot(params)
    with perturb_weights(params, None, 0.4, restore="subtract") as info:
        model.zero_grad(set_to_none=False)  # the body overwrites .grad: ε must have been kept
        assert info.eps_norm == pytest.approx(0.4, rel=1e-3)
    for p, b in zip(params, before):
        assert torch.allclose(p, b, rtol=0, atol=1e-6)

    model = make_model(tok, torch.bfloat16)
    params = trainable_params(model)
    backward(model, batch)
    before = snapshot(params)
    with perturb_weights(params, None, 0.4, restore="subtract"):
        pass
    exact = [torch.equal(p, b) for p, b in zip(params, before)]
    assert not all(exact), "bf16: θ + ε − ε should differ from θ somewhere (vaa.md §3.7)"
    for p, b in zip(params, before):  # ... but only by bf16 rounding
        assert torch.allclose(p.float(), b.float(), rtol=2 ** -7, atol=2 ** -7 * 0.4)
    with perturb_weights(params, None, 0.4, restore="copy"):  # copy mode is exact in bf16
        pass
    after_sub = snapshot(params)
    with perturb_weights(params, None, 0.4):
        pass
    assert all(torch.equal(p, b) for p, b in zip(params, after_sub))


def test_subtract_with_explicit_direction_keeps_no_buffer(tok, batch):
    model = make_model(tok)
    params = trainable_params(model)
    backward(model, batch)
    direction = stash_grads(params, out=[None] * len(params))
    before = snapshot(params)
    with perturb_weights(params, direction, 0.1, restore="subtract") as info:
        model.zero_grad(set_to_none=True)
        assert info.copied_numel == 0
        assert not all(torch.equal(p, b) for p, b in zip(params, before))
    assert all(torch.allclose(p, b, atol=1e-6, rtol=0) for p, b in zip(params, before))


def test_restore_on_exception(tok, batch):
    model = make_model(tok, torch.bfloat16)
    params = trainable_params(model)
    backward(model, batch)
    before = snapshot(params)
    sam = SAMPerturber(params, rho=0.4)
    with pytest.raises(RuntimeError, match="boom"):
        with sam.perturbed():
            assert not torch.equal(params[0], before[0])
            raise RuntimeError("boom")
    assert all(torch.equal(p, b) for p, b in zip(params, before))


def test_sam_gradient_is_taken_at_perturbed_point_and_applied_at_theta(tok, batch):
    model = make_model(tok)
    params = trainable_params(model)
    loss0 = backward(model, batch)
    g0, theta = grads_of(params), snapshot(params)
    rho = 0.5

    # Reference: an independent copy moved to θ + ε by hand.
    ref = copy.deepcopy(model)
    ref_params = trainable_params(ref)
    gn = float(torch.sqrt(sum((g ** 2).sum() for g in g0)))
    with torch.no_grad():
        for p, g in zip(ref_params, g0):
            p.add_(g, alpha=rho / (gn + 1e-7))
    ref_loss = backward(ref, batch)

    sam = SAMPerturber(params, rho=rho)
    with sam.perturbed():
        model.zero_grad(set_to_none=False)
        loss1 = loss_of(model, batch)
        loss1.backward()
        inside = grads_of(params)
    assert sam.last_eps_norm == pytest.approx(rho, rel=1e-3)
    assert sam.last_grad_norm == pytest.approx(gn, rel=1e-5)
    loss1 = loss1.detach()
    assert float(loss1) != float(loss0) and float(loss1) == pytest.approx(float(ref_loss), rel=1e-5)
    assert all(torch.equal(p, t) for p, t in zip(params, theta))  # clean θ after exit
    assert all(torch.equal(p.grad, g) for p, g in zip(params, inside))  # .grad = ∇ℓ(θ+ε)
    assert any(not torch.allclose(p.grad, g, atol=1e-6) for p, g in zip(params, g0))
    for p, r in zip(params, ref_params):
        assert torch.allclose(p.grad, r.grad, rtol=1e-4, atol=1e-6)

    # The optimizer applies ∇ℓ(θ+ε) at θ: an SGD step from θ, not from θ+ε.
    opt = torch.optim.SGD(params, lr=0.1)
    opt.step()
    for p, t, g in zip(params, theta, inside):
        assert torch.allclose(p, t - 0.1 * g, rtol=0, atol=1e-7)


def test_params_without_grad_and_frozen_params_are_untouched(tok, batch):
    model = make_model(tok)
    named = list(model.named_parameters())
    frozen = {n for i, (n, _) in enumerate(named) if i % 2 == 0}
    for n, p in named:
        p.requires_grad_(n not in frozen)
    params = trainable_params(model)
    assert len(params) == len(named) - len(frozen) and all(p.requires_grad for p in params)
    backward(model, batch)
    params[0].grad = None  # trainable, but no gradient this step: not perturbed, not copied
    all_before = {n: p.detach().clone() for n, p in model.named_parameters()}
    sam = SAMPerturber(params, rho=0.2)
    with sam.perturbed() as info:
        assert info.num_perturbed == len(params) - 1
        assert info.copied_numel == sum(p.numel() for p in params[1:])
        for n, p in model.named_parameters():
            moved = not torch.equal(p, all_before[n])
            assert moved == (p.requires_grad and p is not params[0]), n
    for n, p in model.named_parameters():
        assert torch.equal(p, all_before[n])


def test_buffers_are_reused_across_steps(tok, batch):
    model = make_model(tok)
    params = trainable_params(model)
    sam = SAMPerturber(params, rho=0.1)
    backward(model, batch)
    with sam.perturbed():
        pass
    ptrs = [b.data_ptr() for b in sam.buffers]
    assert sam.buffer_numel == sum(p.numel() for p in params)
    gptrs = [g.data_ptr() for g in stash_grads(params)]
    sptrs = [g.data_ptr() for g in sam.stash_grads()]
    torch.optim.SGD(params, lr=0.01).step()
    backward(model, batch)
    before = snapshot(params)
    with sam.perturbed():
        pass
    assert [b.data_ptr() for b in sam.buffers] == ptrs
    assert [g.data_ptr() for g in stash_grads(params)] == gptrs
    assert [g.data_ptr() for g in sam.stash_grads()] == sptrs
    assert all(torch.equal(p, b) for p, b in zip(params, before))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_mix_grads_is_exact(tok, batch, dtype):
    model = make_model(tok, dtype)
    params = trainable_params(model)
    backward(model, batch)
    g0_ref = grads_of(params)
    g0 = stash_grads(params)
    assert all(torch.equal(a, b) for a, b in zip(g0, g0_ref))
    with SAMPerturber(params, rho=0.3).perturbed():
        model.zero_grad(set_to_none=False)
        loss_of(model, batch).backward()
    g1 = grads_of(params)
    lam = 0.37
    mix_grads(params, g0, lam)
    for p, a, b in zip(params, g0_ref, g1):
        assert torch.equal(p.grad, (1 - lam) * a + lam * b)


def test_bad_arguments(tok):
    model = make_model(tok)
    with pytest.raises(ValueError, match="restore"):
        SAMPerturber(trainable_params(model), rho=0.1, restore="add")
    with pytest.raises(ValueError, match="direction"):
        WeightPerturbation(trainable_params(model), [None], rho=0.1)


def test_lora_only_adapters_are_perturbed_and_copied(tok, batch):
    peft = pytest.importorskip("peft")
    model = peft.get_peft_model(make_model(tok),
                                peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]))
    params = trainable_params(model)
    assert params and all("lora_" in n for n, p in model.named_parameters() if p.requires_grad)
    n_trainable = sum(p.numel() for p in params)
    assert n_trainable < sum(p.numel() for p in model.parameters())
    backward(model, batch)
    assert all(p.grad is not None for p in params)
    base_before = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    lora_before = snapshot(params)
    sam = SAMPerturber(params, rho=0.1)
    with sam.perturbed() as info:
        assert info.copied_numel == n_trainable == sam.buffer_numel
        assert sam.last_eps_norm == pytest.approx(0.1, rel=1e-3)
        model.zero_grad(set_to_none=False)
        loss_of(model, batch).backward()
        for n, p in model.named_parameters():
            if not p.requires_grad:
                assert torch.equal(p, base_before[n]), n
        # lora_A has a zero gradient at init (lora_B = 0), so only lora_B must move
        assert any(not torch.equal(p, b) for p, b in zip(params, lora_before))
    for n, p in model.named_parameters():
        if not p.requires_grad:
            assert torch.equal(p, base_before[n]), n
    assert all(torch.equal(p, b) for p, b in zip(params, lora_before))
