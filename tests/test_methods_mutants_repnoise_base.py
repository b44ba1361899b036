"""Mutation-found edges of vaa/methods/repnoise.py (specs/baselines.md §3: ascent term, MMD,
masked CE, masks, the step) and of base.py, sft.py, none.py. The mutmut recipe and scores:
tests/test_methods_mutants.py."""

from __future__ import annotations

import copy
import math
from types import SimpleNamespace

import pytest
import torch

from tests.methods_toys import FixedStream, ToyModule, grad_at, net_at, CountingSched, toy_model, xy_batch


def test_repnoise_align_to_pads_with_pad_zero_and_minus_100_or_truncates():
    """align_to (baselines.md §3, diff_tokens mask): pad on the right with (pad_id, attention
    0, label −100) to ``width``, or truncate; 1-D entries are dropped."""
    from vaa.methods.repnoise import align_to

    b = {"input_ids": torch.tensor([[5, 6, 7]]), "attention_mask": torch.tensor([[1, 1, 1]]),
         "labels": torch.tensor([[-100, 6, 7]]), "uid": torch.tensor([3])}
    out = align_to(b, 5, pad_id=9)
    assert sorted(out) == ["attention_mask", "input_ids", "labels"]
    assert out["input_ids"].tolist() == [[5, 6, 7, 9, 9]]
    assert out["attention_mask"].tolist() == [[1, 1, 1, 0, 0]]
    assert out["labels"].tolist() == [[-100, 6, 7, -100, -100]]
    cut = align_to(dict(b, extra=torch.tensor([[1, 2, 3]])), 2, pad_id=9)
    assert cut["input_ids"].tolist() == [[5, 6]] and cut["extra"].tolist() == [[1, 2]] and "uid" not in cut
    same = align_to(dict(b, extra=torch.tensor([[1, 2, 3]])), 3, pad_id=9)
    assert same["extra"].tolist() == [[1, 2, 3]] and same["labels"].tolist() == [[-100, 6, 7]]


def test_none_refuses_to_train_with_its_reason():
    from vaa.methods.none import NoAlignment

    with pytest.raises(RuntimeError, match=r"^method=none trains nothing: its aligned artifact is the base model "
                                           r"\(plan_keys gives it the base's key\); this step is never reached$"):
        NoAlignment().training_step(None, None)
    assert NoAlignment.identity is True and NoAlignment.name == "none"


@pytest.mark.parametrize("clip", [0.0, 0.05, 1e6])
def test_apply_gradients_clips_steps_schedules_and_zeroes(clip):
    """TrainingMethod.apply_gradients: global-L2 clip at recipe.grad_clip (0 = off), optimizer
    step, schedule step, gradients set to None; returns the pre-clip norm."""
    from vaa.methods.base import TrainingMethod

    torch.manual_seed(0)
    model = torch.nn.Linear(3, 2)
    frozen = torch.nn.Parameter(torch.ones(1))  # a parameter without gradient is skipped
    model.register_parameter("frozen", frozen)
    module = ToyModule(model)
    sched = CountingSched()
    module.lr_schedulers = lambda: sched
    module.recipe.grad_clip = clip
    loss = model(torch.randn(4, 3)).square().sum()
    loss.backward()
    g = [p.grad.clone() for p in (model.weight, model.bias)]
    n = math.sqrt(sum(float(x.square().sum()) for x in g))
    theta = [model.weight.detach().clone(), model.bias.detach().clone()]
    out = TrainingMethod().apply_gradients(module)
    assert float(out) == pytest.approx(n, rel=1e-5)
    coef = min(1.0, clip / (n + 1e-6)) if clip > 0 else 1.0
    for p, t, x in zip((model.weight, model.bias), theta, g):
        assert torch.allclose(p, t - coef * x, atol=1e-6)
    assert model.weight.grad is None and frozen.grad is None and sched.steps == 1


def test_measure_at_first_step_then_every_log_interval():
    from vaa.methods.base import TrainingMethod

    m = TrainingMethod()
    trainer = SimpleNamespace(log_every_n_steps=5, precision="bf16-mixed")
    mod = SimpleNamespace(_trainer=trainer, global_step=3)
    assert m.measure_at(mod) == "bf16-mixed"  # the first call always measures
    assert m.measure_at(mod) is None
    mod.global_step = 10
    assert m.measure_at(mod) == "bf16-mixed"
    mod.global_step = 11
    assert m.measure_at(mod) is None
    trainer.log_every_n_steps = 0  # treated as every step
    assert m.measure_at(mod) == "bf16-mixed"
    bare = TrainingMethod()
    assert bare.measure_at(SimpleNamespace(global_step=7)) == "32-true"
    assert bare.measure_at(SimpleNamespace(global_step=7)) == "32-true"  # no trainer: every step


def test_base_defaults():
    from vaa.methods.base import TrainingMethod

    m = TrainingMethod(a=1)
    assert m.hparams == {"a": 1} and m.stream_batch_size("harmful", 6) == 6
    assert m.state_dict() == {} and m.load_state_dict({"x": 1}) is None
    assert TrainingMethod.passes_per_step == 1 and TrainingMethod.fsdp_safe is False
    assert TrainingMethod.requires_groups is False and TrainingMethod.requires == ()
    with pytest.raises(NotImplementedError):
        m.training_step(None, None)


def test_repnoise_ascent_term_and_mmd_match_their_formulas():
    """baselines.md §3: ascent = log(Σ/(N_L+2) + 1) (mean) or log(Σ/(N_L+1) + 1) (upstream);
    MMD² with Σ_{i=0..4} exp(−d²/(b·2^{i−2})), b = mean pairwise squared distance."""
    from vaa.methods.repnoise import ascent_term, mmd

    ce, lens = torch.tensor(2.0), [torch.tensor(1.0), torch.tensor(3.0), torch.tensor(0.5)]
    assert float(ascent_term(ce, lens)) == pytest.approx(math.log(6.5 / 4 + 1))
    assert float(ascent_term(ce, lens, "upstream")) == pytest.approx(math.log(6.5 / 3 + 1))
    with pytest.raises(ValueError, match=r"method.layer_average must be one of \('mean', 'upstream'\), got 'x'"):
        ascent_term(ce, lens, "x")
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(3, 4, generator=g), torch.randn(2, 4, generator=g) + 1.0
    z = torch.cat([x, y]).double()
    d2 = torch.cdist(z, z).pow(2)
    b = d2.sum() / (5 * 5 - 5)
    k = sum(torch.exp(-d2 / (b * 2.0 ** (i - 2))) for i in range(5))
    want = k[:3, :3].mean() + k[3:, 3:].mean() - 2 * k[:3, 3:].mean()
    assert float(mmd(x, y)) == pytest.approx(float(want), rel=1e-4)
    k3 = sum(torch.exp(-d2 / (b * 3.0 ** (i - 1))) for i in range(3))
    want3 = k3[:3, :3].mean() + k3[3:, 3:].mean() - 2 * k3[:3, 3:].mean()
    assert float(mmd(x, y, kernels=3, mul=3.0)) == pytest.approx(float(want3), rel=1e-4)
    assert float(mmd(x, x.clone())) == pytest.approx(0.0, abs=1e-6)


def test_repnoise_masked_ce_is_the_shifted_ce_at_kept_positions_and_zero_without_any():
    from vaa.methods.repnoise import masked_ce

    g = torch.Generator().manual_seed(1)
    hidden = torch.randn(2, 4, 3, generator=g, requires_grad=True)
    ids = torch.tensor([[0, 1, 2, 1], [2, 2, 0, 1]])
    keep = torch.tensor([[False, True, True], [True, False, False]])
    head = torch.nn.Linear(3, 3)
    got = masked_ce(head, hidden, ids, keep)
    logits = head(hidden[:, :-1])
    want = torch.nn.functional.cross_entropy(logits[keep], ids[:, 1:][keep])
    assert float(got.detach()) == pytest.approx(float(want.detach()))
    none = masked_ce(head, hidden, ids, torch.zeros_like(keep))
    assert float(none.detach()) == 0.0 and none.requires_grad


def test_repnoise_masks_response_and_diff_tokens():
    from vaa.methods.repnoise import RepNoise

    harm = {"input_ids": torch.tensor([[1, 5, 6, 0], [1, 7, 8, 9]]), "attention_mask": torch.ones(2, 4, dtype=torch.long),
            "labels": torch.tensor([[-100, -100, 6, 0], [-100, 7, 8, -100]])}
    safe = {"input_ids": torch.tensor([[1, 5, 3], [1, 2, 8], [1, 1, 1]]), "attention_mask": torch.ones(3, 3, dtype=torch.long),
            "labels": torch.tensor([[-100, 5, 3], [-100, 2, 8], [-100, 1, 1]])}
    r = RepNoise()
    used, m_harm, m_safe = r.masks(harm, safe)
    assert used is safe and m_safe is None
    assert m_harm.tolist() == [[False, True, True], [True, True, False]]
    d = RepNoise(mask="diff_tokens")
    used, m_harm, m_safe = d.masks(harm, safe)
    assert used["input_ids"].tolist() == [[1, 5, 3, 0], [1, 2, 8, 0]]  # 2 rows, padded with id 0
    assert m_harm.tolist() == [[False, True, False], [True, False, True]]  # differs, harmful id != 0
    assert m_safe.tolist() == [[False, True, False], [True, False, False]]  # differs, harmless id != 0


def test_repnoise_knobs_setup_errors_and_noise_state():
    from vaa.methods.repnoise import LAYER, RepNoise

    r = RepNoise(noise_weight=2, ascent_weight=3, seed=5)
    assert (r.beta, r.alpha, r.mask, r.layer_average) == (2.0, 3.0, "response", "mean")
    assert r.layer_pattern == LAYER and r.final_norm == "norm" and RepNoise.passes_per_step == 2
    d = RepNoise()
    assert (d.beta, d.alpha) == (0.001, 1.0)
    with pytest.raises(ValueError, match=r"method.mask must be one of \('response', 'diff_tokens'\), got 'x'"):
        RepNoise(mask="x")
    with pytest.raises(ValueError, match=r"method.layer_average must be one of \('mean', 'upstream'\), got 'y'"):
        RepNoise(layer_average="y")
    a = torch.randn(3, generator=r.noise)
    state = r.state_dict()
    b = torch.randn(3, generator=r.noise)
    r2 = RepNoise(seed=5)
    assert torch.equal(torch.randn(3, generator=r2.noise), a)  # the seed seeds the noise
    r2.load_state_dict({})
    r2.load_state_dict(state)
    assert torch.equal(torch.randn(3, generator=r2.noise), b)


def test_sft_step_and_base_datamodule(monkeypatch):
    import vaa.data.datamodule as dmod
    from vaa.methods.base import TrainingMethod
    from vaa.methods.sft import SFT

    model, batch = toy_model(), xy_batch()
    module = ToyModule(model)
    theta = [p.detach().clone() for p in model.parameters()]
    l0, g = grad_at(net_at(model, theta), batch)
    logs = SFT().training_step(module, batch)
    for p, t, x in zip(model.parameters(), theta, g):
        assert torch.allclose(p, t - x, atol=1e-6)
    assert float(logs["loss"]) == pytest.approx(l0) and float(logs["grad_norm"]) > 0
    seen = []
    monkeypatch.setattr(dmod, "SFTDataModule", lambda *a, **kw: seen.append((a, kw)) or "dm")
    m = TrainingMethod()
    assert m.make_datamodule(["e"], "tok", extra={"h": 1}, batch_size=2) == "dm"
    (args, kw), = seen
    assert args == (["e"], "tok") and kw["extra"] == {"h": 1} and kw["batch_size"] == 2
    assert kw["extra_batch_size"] == m.stream_batch_size


def test_repnoise_setup_names_the_decoder_without_a_final_norm():
    from vaa.methods.repnoise import RepNoise

    class _Blk(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.mlp = torch.nn.Linear(2, 2)

    class _Dec(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.layers = torch.nn.ModuleList([_Blk(), _Blk()])
            self.config = SimpleNamespace(num_hidden_layers=2)

        def get_decoder(self):
            return self

    dm = SimpleNamespace(streams={"harmful": None}, tokenizer=SimpleNamespace(pad_token_id=0))
    with pytest.raises(ValueError, match=r"^_Dec has no final norm 'norm'; set method.final_norm"):
        RepNoise().setup(SimpleNamespace(model=_Dec()), dm)
    r = RepNoise(final_norm="layers")
    r.setup(SimpleNamespace(model=_Dec()), dm)
    assert len(r.mlps) == 2 and len(r.layers) == 2 and r.pad_id == 0


def test_repnoise_response_mask_uses_every_harmful_row_and_logs_the_grad_norm():
    """``mask: response``: the harmful batch is used whole (only ``diff_tokens`` pairs rows with
    the harmless batch); the step logs its pre-clip gradient norm."""
    from vaa.config.schema import ArchConfig
    from vaa.methods.repnoise import RepNoise
    from vaa.models.build import build_tiny_llama
    from vaa.models.tokenizer import build_word_tokenizer
    from vaa.training.module import response_loss

    torch.set_num_threads(1)
    tok = build_word_tokenizer(["a b c d e f g h i j k l m n o p"])
    model = build_tiny_llama(ArchConfig(hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
                                        num_key_value_heads=2, intermediate_size=32), tok, seed=0)
    g = torch.Generator().manual_seed(0)

    def rows(n):
        ids = torch.randint(5, len(tok), (n, 6), generator=g)
        labels = ids.clone()
        labels[:, :3] = -100
        return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels}

    hb, small, big = rows(4), rows(1), rows(4)
    harmful = []
    for batch in (small, big):
        module = ToyModule(copy.deepcopy(model))
        module.lm_loss = lambda b, m=module: response_loss(m.model, b)
        r = RepNoise(noise_weight=0.1, ascent_weight=0.5)
        r.setup(module, SimpleNamespace(streams={"harmful": FixedStream([hb])}, tokenizer=tok))
        logs = r.training_step(module, batch)
        harmful.append(float(logs["harmful_loss"]))
        assert float(logs["grad_norm"]) > 0
    assert harmful[0] == pytest.approx(harmful[1], rel=1e-6)
    # diff_tokens: the harmless forward gets its own (padded) attention mask
    module = ToyModule(copy.deepcopy(model))
    seen = []
    module.model.get_decoder().register_forward_pre_hook(
        lambda _m, _a, kw: seen.append(kw.get("attention_mask")), with_kwargs=True)
    r = RepNoise(mask="diff_tokens")
    r.setup(module, SimpleNamespace(streams={"harmful": FixedStream([hb])}, tokenizer=tok))
    short = {k: v[:, :4] for k, v in rows(2).items()}
    r.training_step(module, short)
    assert len(seen) == 2 and seen[1] is not None
    assert seen[1].tolist() == [[1, 1, 1, 1, 0, 0]] * 2  # padded to the harmful width with attention 0


def test_apply_gradients_clips_with_the_sharded_norm_under_fsdp(monkeypatch):
    """base.apply_gradients: under a sharding strategy the clip's norm is all-reduced
    (``clip_global_(…, sharded=True)``); otherwise the local clip."""
    import vaa.methods.base as base

    calls = []
    monkeypatch.setattr(base, "clip_global_", lambda params, max_norm, sharded=False: calls.append(sharded) or torch.tensor(1.0))
    for strategy, want in [("FSDPStrategy", True), ("DDPStrategy", False)]:
        module = ToyModule(toy_model())
        module._trainer = SimpleNamespace(strategy=type(strategy, (), {})())
        base.TrainingMethod().apply_gradients(module)
        assert calls[-1] is want
