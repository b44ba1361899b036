"""Mutation-found edges of the fine-tuning-stage defenses vaa/methods/ema.py, lisa.py and
lookahead.py (specs/baselines.md §5-7). The mutmut recipe and scores: tests/test_methods_mutants.py."""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch

from tests.methods_toys import FixedStream, ToyModule, grad_at, net_at, ToyStack, toy_model, xy_batch, WordTok


@pytest.mark.parametrize("variant", ["shadow", "write_back"])
def test_ema_shadow_is_beta_lerp_of_the_stepped_weights(variant):
    """baselines.md §6: θ_ema ← β·θ_ema + (1−β)·θ_t after each step (θ_ema starts at θ_0);
    write_back also sets θ_t ← θ_ema; on_train_end writes θ_ema into the model."""
    from vaa.methods.ema import EMA

    model, batch = toy_model(), xy_batch()
    module = ToyModule(model)
    m = EMA(beta=0.8, variant=variant)
    m.setup(module, None)
    theta0 = [p.detach().clone() for p in model.parameters()]
    _l, g = grad_at(net_at(model, theta0), batch)
    logs = m.training_step(module, batch)
    stepped = [t - x for t, x in zip(theta0, g)]
    want = [0.8 * t + 0.2 * s for t, s in zip(theta0, stepped)]
    for s, w in zip(m.shadow, want):
        assert s.dtype == torch.float32 and torch.allclose(s, w, atol=1e-6)
    for p, s, w in zip(model.parameters(), stepped, want):
        assert torch.allclose(p, w if variant == "write_back" else s, atol=1e-6)
    assert float(logs["ema/beta"]) == pytest.approx(0.8)
    m.on_train_end(module)
    for p, w in zip(model.parameters(), want):
        assert torch.allclose(p, w, atol=1e-6)


def test_ema_anchor_weight_sets_beta_and_the_state_round_trips():
    from vaa.methods.ema import EMA

    module = ToyModule(toy_model(), total_steps=4)
    m = EMA(anchor_weight_at_end=0.0625)
    m.setup(module, None)
    assert m.beta == pytest.approx(0.5) and EMA().beta == 0.995 and EMA().variant == "shadow"
    m.training_step(module, xy_batch())
    state = m.state_dict()
    assert state["beta"] == m.beta and all(s.device.type == "cpu" for s in state["shadow"])
    fresh = EMA(beta=0.3)
    fresh.load_state_dict({})
    assert fresh.beta == 0.3 and fresh.shadow == []
    fresh.load_state_dict(state)  # before setup: taken as is
    assert fresh.beta == m.beta and all(torch.equal(a, b) for a, b in zip(fresh.shadow, m.shadow))
    other = EMA(beta=0.3)
    other.setup(ToyModule(toy_model()), None)
    keep = list(other.shadow)
    other.load_state_dict(state)  # after setup: copied into the existing buffers
    assert all(a is b for a, b in zip(other.shadow, keep))
    assert all(torch.equal(a, b) for a, b in zip(other.shadow, m.shadow))
    other.setup(ToyModule(toy_model()), None)  # a second setup keeps the restored shadow
    assert all(torch.equal(a, b) for a, b in zip(other.shadow, m.shadow))


@pytest.mark.parametrize("kw,msg", [
    ({"variant": "x"}, r"ft_defense.variant must be one of \('shadow', 'write_back'\), got 'x'"),
    ({"beta": 1.0}, r"ft_defense.beta must be in \[0, 1\), got 1.0"),
    ({"beta": -0.1}, r"ft_defense.beta must be in \[0, 1\), got -0.1"),
    ({"anchor_weight_at_end": 1.0}, r"ft_defense.anchor_weight_at_end must be in \(0, 1\), got 1.0"),
    ({"anchor_weight_at_end": 0.0}, r"ft_defense.anchor_weight_at_end must be in \(0, 1\), got 0.0"),
])
def test_ema_rejects_out_of_range_knobs(kw, msg):
    from vaa.methods.ema import EMA

    with pytest.raises(ValueError, match=msg):
        EMA(**kw)
    EMA(beta=0.0)  # the closed end is allowed


@pytest.mark.parametrize("args,want", [
    ((100, 900, 126, 6), (2, 19)),   # the docstring's example
    ((100, 900, 6000, 6), (100, 900)),  # 6 cycles fit: kept
    ((100, 900, 1000, 0), (100, 900)),  # min_cycles 0: off
    ((0, 5, 10, 6), (0, 5)),
    ((5, 0, 10, 6), (5, 0)),
    ((1, 1, 3, 2), (1, 1)),          # cycle·min_cycles = 4 > 3: new = max(2, 1) = 2
    ((9, 1, 20, 5), (3, 1)),         # new = 4, round(3.6) = 4 capped at new − 1
    ((1, 99, 50, 5), (1, 9)),        # round(0.1) = 0 floored at 1
    ((3, 3, 12, 2), (3, 3)),         # exactly fits (6·2 = 12): kept
])
def test_lisa_cycle_lengths(args, want):
    from vaa.methods.lisa import cycle_lengths

    assert cycle_lengths(*args) == want


@pytest.mark.parametrize("a,f", [(-1, 5), (5, -1), (0, 0)])
def test_lisa_cycle_lengths_rejects_negative_or_empty_cycles(a, f):
    from vaa.methods.lisa import cycle_lengths

    with pytest.raises(ValueError, match=rf"must be >= 0 and not both 0, got {a}/{f}"):
        cycle_lengths(a, f, 100, 0)


def test_lisa_proximal_step_alternates_states_and_anchors():
    """baselines.md §5: in state s the gradient is ∇loss + ρ(θ − θ̃_other); θ̃_s is the
    parameters at the end of state s; the alignment state trains on the alignment stream."""
    from vaa.methods.lisa import ALIGN, FINETUNE, Lisa

    model, user, align = toy_model(), xy_batch(5), xy_batch(6)
    module = ToyModule(model, total_steps=10)
    stream = FixedStream([align])
    m = Lisa(align_steps=1, finetune_steps=2, rho=0.5, warmup_fraction=0.0, min_cycles=0)
    m.setup(module, SimpleNamespace(streams={"alignment": stream}))
    assert m.k == {ALIGN: 1, FINETUNE: 2} and m.state == ALIGN
    th = [[p.detach().clone() for p in model.parameters()]]

    def step(batch_used, anchor):
        theta = [p.detach().clone() for p in model.parameters()]
        _l, g = grad_at(net_at(model, theta), batch_used)
        logs = m.training_step(module, user)
        module.global_step += 1
        for p, t, x, a in zip(model.parameters(), theta, g, anchor):
            assert torch.allclose(p, t - (x + 0.5 * (t - a)), atol=1e-6)
        return logs, theta

    module.global_step = 0  # 0 > 0·10 is false: no proximal term on the very first step
    theta = [p.detach().clone() for p in model.parameters()]
    _l, g = grad_at(net_at(model, theta), align)
    logs = m.training_step(module, user)
    module.global_step += 1
    assert "lisa/proximal" not in logs and float(logs["lisa/state"]) == 1.0 and stream.calls[0] == 1
    for p, t, x in zip(model.parameters(), theta, g):
        assert torch.allclose(p, t - x, atol=1e-6)
    theta1 = [p.detach().clone() for p in model.parameters()]
    assert m.state == FINETUNE and all(torch.equal(a, t) for a, t in zip(m.anchors[ALIGN], theta1))
    logs, _ = step(user, theta1)          # finetune 1: anchor θ̃_A = θ1 (zero drift)
    assert float(logs["lisa/state"]) == 0.0 and float(logs["lisa/drift"]) == pytest.approx(0.0, abs=1e-7)
    logs, theta2 = step(user, theta1)     # finetune 2: drift θ2 − θ1
    d2 = sum(float((a - b).square().sum()) for a, b in zip(theta2, theta1))
    assert float(logs["lisa/proximal"]) == pytest.approx(0.25 * d2, rel=1e-5)
    assert float(logs["lisa/drift"]) == pytest.approx(math.sqrt(d2), rel=1e-5)
    theta3 = [p.detach().clone() for p in model.parameters()]
    assert m.state == ALIGN and m.in_state == 0
    assert all(torch.equal(a, t) for a, t in zip(m.anchors[FINETUNE], theta3))
    step(align, theta3)                   # back in the alignment state, on the alignment stream
    assert m.history == [ALIGN, FINETUNE, FINETUNE, ALIGN] and stream.calls[0] == 2
    state = m.state_dict()
    other = Lisa(align_steps=1, finetune_steps=2, min_cycles=0)
    other.load_state_dict({})
    assert other.anchors == {} and other.state == ALIGN
    other.load_state_dict(state)
    assert other.state == m.state and other.in_state == m.in_state and other.history == m.history
    assert all(torch.equal(a, b) for a, b in zip(other.anchors[ALIGN], m.anchors[ALIGN]))
    other.setup(ToyModule(toy_model(), total_steps=10), SimpleNamespace(streams={"alignment": stream}))
    assert all(torch.equal(a, b) for a, b in zip(other.anchors[FINETUNE], m.anchors[FINETUNE]))  # kept


def test_lisa_warmup_and_rho_zero_skip_the_proximal_term_and_finetune_only_never_switches():
    from vaa.methods.lisa import FINETUNE, Lisa

    for kw, gs in [({"rho": 1.0, "warmup_fraction": 0.5}, 5), ({"rho": 0.0, "warmup_fraction": 0.0}, 3)]:
        module = ToyModule(toy_model(), total_steps=10)
        module.global_step = gs
        m = Lisa(align_steps=1, finetune_steps=1, min_cycles=0, **kw)
        m.setup(module, SimpleNamespace(streams={"alignment": FixedStream([xy_batch(6)])}))
        assert "lisa/proximal" not in m.training_step(module, xy_batch(5))
    module = ToyModule(toy_model(), total_steps=10)
    m = Lisa(align_steps=0, finetune_steps=2, min_cycles=0, anchor_device="cpu")
    m.setup(module, SimpleNamespace(streams={"alignment": FixedStream([xy_batch(6)])}))
    assert m.state == FINETUNE
    for _ in range(5):
        m.training_step(module, xy_batch(5))
    assert m.history == [FINETUNE] * 5
    assert (m.align_steps, m.finetune_steps, m.rho, m.warmup_fraction, m.min_cycles) == (0, 2, 1.0, 0.1, 0)
    d = Lisa()
    assert (d.align_steps, d.finetune_steps, d.rho, d.warmup_fraction, d.min_cycles) == (100, 900, 1.0, 0.1, 6)


def test_lookahead_rows_real_and_virtual_with_and_without_input():
    """baselines.md §7: real: the first preview_tokens of the answer are appended (after the
    connector) to the input, or to the instruction when there is no input; virtual: a fixed
    prefix is both previewed and prepended to the answer."""
    from vaa.data.formats import Example
    from vaa.methods.lookahead import CONNECTOR, lookahead_row

    tok = WordTok()
    ex = Example("Do it", "", "one two three four")
    row = lookahead_row(ex, tok, "real", preview_tokens=2)
    assert row.instruction == "Do it" + CONNECTOR + "one two" and row.input == "" and row.output == ex.output
    assert tok.calls == [False, ("clean", False)]  # no special tokens, spaces kept as decoded
    with_input = lookahead_row(Example("Do it", "ctx", "a b c"), tok, preview_tokens=6)
    assert with_input.input == "ctx" + CONNECTOR + "a b c" and with_input.instruction == "Do it"
    v = lookahead_row(ex, tok, "virtual", virtual_prefix="P. ", connector=" | ")
    assert v.instruction == "Do it | P. " and v.output == "P. one two three four"
    zero = lookahead_row(ex, tok, "real", preview_tokens=0)
    assert zero.instruction == "Do it" + CONNECTOR
    with pytest.raises(ValueError, match=r"ft_defense.mode must be one of \('real', 'virtual'\), got 'x'"):
        lookahead_row(ex, tok, "x")


def test_lookahead_method_transforms_the_rows_it_trains_on(monkeypatch):
    from vaa.data.formats import Example
    from vaa.methods import sft
    from vaa.methods.lookahead import LookAhead

    seen = {}
    monkeypatch.setattr(sft.SFT, "make_datamodule", lambda self, rows, tok, **kw: seen.update(rows=rows, kw=kw) or "dm")
    m = LookAhead(mode="virtual", virtual_prefix="V ", connector=" # ", preview_tokens=3)
    assert (m.mode, m.preview_tokens, m.virtual_prefix, m.connector) == ("virtual", 3, "V ", " # ")
    assert m.make_datamodule([Example("i", "", "o")], WordTok(), batch_size=2) == "dm"
    assert seen["rows"] == [Example("i # V ", "", "V o")] and seen["kw"] == {"batch_size": 2}
    real = LookAhead(preview_tokens=1)
    real.make_datamodule([Example("i", "x", "o p")], WordTok())
    assert seen["rows"] == [Example("i", "x" + real.connector + "o", "o p")]
    d = LookAhead()
    assert (d.mode, d.preview_tokens, d.virtual_prefix) == ("real", 6, "Let's solve this problem. ")
    with pytest.raises(ValueError, match=r"ft_defense.mode must be one of \('real', 'virtual'\), got 'y'"):
        LookAhead(mode="y")
    with pytest.raises(ValueError, match="ft_defense.preview_tokens must be >= 0, got -1"):
        LookAhead(preview_tokens=-1)
    LookAhead(preview_tokens=0)


def test_lisa_second_round_edges():
    from vaa.methods.lisa import ALIGN, FINETUNE, Lisa, cycle_lengths

    assert cycle_lengths(100, 900, 500, 1) == (50, 450)  # one cycle must fit as well
    assert Lisa().in_state == 0 and Lisa().state == ALIGN
    model = toy_model()
    spare = torch.nn.Parameter(torch.ones(2))  # trainable, outside the loss: its gradient is ρ·drift only
    model.register_parameter("spare", spare)
    module = ToyModule(model, total_steps=126)
    m = Lisa(align_steps=100, finetune_steps=900, min_cycles=6, rho=0.5, warmup_fraction=0.0)
    m.setup(module, SimpleNamespace(streams={"alignment": FixedStream([xy_batch(6)])}))
    assert m.k == {ALIGN: 2, FINETUNE: 19}
    i = next(j for j, p in enumerate(m.params) if p is spare)
    m.anchors[FINETUNE][i] = torch.zeros(2)  # pretend θ̃_F had spare = 0
    module.global_step = 1
    logs = m.training_step(module, xy_batch(5))
    assert "loss" in logs and "grad_norm" in logs
    assert torch.allclose(spare.detach(), torch.full((2,), 0.5))  # 1 − lr·ρ·(1 − 0)


def test_small_second_round_edges():
    from vaa.data.formats import Example
    from vaa.methods.ema import EMA
    from vaa.methods.hooks import layer_modules
    from vaa.methods.lookahead import lookahead_row

    v = lookahead_row(Example("i", "", "o"), WordTok(), "virtual")
    assert v.output == "Let's solve this problem. o"
    module = ToyModule(toy_model())
    e = EMA(beta=0.5)
    e.setup(module, None)
    assert "grad_norm" in e.training_step(module, xy_batch()) and "loss" in e.training_step(module, xy_batch())
    with pytest.raises(ValueError, match=r"per-layer attention / MLP block of this architecture$"):
        layer_modules(ToyStack(), "nothing")
