"""The EXP3 group sampler and the loss-reweighting Group DRO of VAA (specs/vaa.md §3.2, §6,
§10 items 1, 2, 6)."""

from __future__ import annotations

import io
import json
import math
import random

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from vaa.methods.dro import EXP3Sampler, GroupLossReweighter, per_sample_token_mean_ce


def logit(p):
    return math.log(p / (1 - p))


def sampler_at(p: float, eta: float, clip=None, **kw) -> EXP3Sampler:
    return EXP3Sampler(num_groups=2, eta=eta, init=[1 - p, p], clip=clip, **kw)


# ----------------------------------------------------------------------------- maths (§10.1)
def test_closed_form_two_groups():
    rng = random.Random(0)
    for _ in range(200):
        p, L, eta = rng.uniform(0.01, 0.99), rng.uniform(0.0, 5.0), rng.uniform(0.0, 0.3)
        s = sampler_at(p, eta)
        s.update(1, L)  # sampled vulnerable
        e = p * math.exp(eta * L / p)
        assert s.p_vulnerable == pytest.approx(e / (e + (1 - p)), abs=1e-12, rel=0)
        assert sum(s.probs) == pytest.approx(1.0, abs=1e-15)
        s = sampler_at(p, eta)
        s.update(0, L)  # sampled invulnerable
        assert s.p_vulnerable == pytest.approx(p / (p + (1 - p) * math.exp(eta * L / (1 - p))), abs=1e-12, rel=0)


def test_closed_form_general_k():
    rng = random.Random(1)
    for _ in range(200):
        K = rng.randint(3, 6)
        w = [rng.uniform(0.05, 1.0) for _ in range(K)]
        q = [v / sum(w) for v in w]
        k, L, eta = rng.randrange(K), rng.uniform(0.0, 5.0), rng.uniform(0.0, 0.3)
        s = EXP3Sampler(num_groups=K, eta=eta, init=q, clip=None)
        assert s.probs == pytest.approx(q, abs=1e-15)
        s.update(k, L)
        unnorm = [qj * math.exp(eta * L / qj) if j == k else qj for j, qj in enumerate(q)]
        z = sum(unnorm)
        assert s.probs == pytest.approx([v / z for v in unnorm], abs=1e-12, rel=0)


def test_full_feedback_is_eq12():
    q, f, eta = [0.2, 0.3, 0.5], [1.0, 2.5, 0.3], 0.4
    s = EXP3Sampler(num_groups=3, eta=eta, init=q, clip=None, feedback="full")
    s.update_full(f)
    unnorm = [qi * math.exp(eta * fi) for qi, fi in zip(q, f)]
    assert s.probs == pytest.approx([v / sum(unnorm) for v in unnorm], abs=1e-12, rel=0)
    with pytest.raises(ValueError, match="update_full"):
        s.update(0, 1.0)
    with pytest.raises(ValueError, match="update\\(group, loss\\)"):
        EXP3Sampler(clip=None).update_full([1.0, 1.0])
    with pytest.raises(ValueError, match="losses"):
        s.update_full([1.0, 2.0])


# ----------------------------------------------------------------------------- clip
def test_clip_keeps_p_in_range_and_only_when_configured():
    rng = random.Random(2)
    clipped = EXP3Sampler(eta=0.3, clip=(0.1, 0.9), seed=3)
    free = EXP3Sampler(eta=0.3, clip=None, seed=3)
    left = False
    for _ in range(2000):
        g, L = rng.randrange(2), rng.uniform(0.0, 5.0) * (3.0 if rng.random() < 0.5 else 0.2)
        p = clipped.p_vulnerable
        clipped.update(g, L)
        e = math.exp(0.3 * L / (p if g == 1 else 1 - p))
        raw = p * e / (p * e + 1 - p) if g == 1 else p / (p + (1 - p) * e)
        assert clipped.p_vulnerable == pytest.approx(min(max(raw, 0.1), 0.9), abs=1e-12, rel=0)
        assert 0.1 <= clipped.p_vulnerable <= 0.9
        assert clipped.probs[0] == 1.0 - clipped.p_vulnerable  # the reference's q = [1 - p, p]
        free.update(free.draw(), L)  # (an undrawn group may have underflowed to q = 0)
        left |= not 0.1 <= free.p_vulnerable <= 0.9
    assert left  # without the clip p does leave [0.1, 0.9]


def test_clip_applies_to_the_initial_q():
    assert EXP3Sampler(init=[0.95, 0.05], clip=(0.1, 0.9)).p_vulnerable == 0.1
    assert EXP3Sampler(init=[0.95, 0.05], clip=None).p_vulnerable == pytest.approx(0.05)


def test_floor_for_more_than_two_groups():
    lo = 0.05
    s = EXP3Sampler(num_groups=4, eta=0.5, init=[0.5, 0.3, 0.17, 0.03], clip=(lo, 0.95))
    # group 3 floored to 0.05, the others share 0.95 in proportion
    assert s.probs == pytest.approx([0.5 * 0.95 / 0.97, 0.3 * 0.95 / 0.97, 0.17 * 0.95 / 0.97, lo], abs=1e-15)
    s = EXP3Sampler(num_groups=4, eta=0.5, init=[0.7, 0.1, 0.1, 0.1], clip=(lo, 0.95))
    s.update(0, 50.0)  # q0 -> ~1: everything else floored; the upper bound is not used for K > 2
    assert s.probs == pytest.approx([1 - 3 * lo, lo, lo, lo], abs=1e-12)
    rng = random.Random(4)
    for _ in range(1000):
        s.update(s.draw(), rng.uniform(0.0, 10.0))
        q = s.probs
        assert min(q) >= lo - 1e-15 and sum(q) == pytest.approx(1.0, abs=1e-12)
    free = EXP3Sampler(num_groups=4, eta=0.5, init=[0.7, 0.1, 0.1, 0.1], clip=None)
    free.update(0, 50.0)
    assert min(free.probs) < 1e-10


# ----------------------------------------------------------------------------- direction / drift (§10.2)
def _vectorised_runs(runs: int, steps: int, eta: float, l_vul: float, l_inv: float, rng=None, groups=None):
    """The bandit update on `runs` independent K = 2 samplers at once (no clip); the same
    log-space arithmetic as EXP3Sampler. `groups[t, r]` forces the draws (replay)."""
    q = np.full((runs, 2), 0.5)
    for t in range(steps):
        g = groups[t] if groups is not None else (rng.random(runs) < q[:, 1]).astype(np.int64)
        logw = np.log(q)
        idx = np.arange(runs)
        qk = q[idx, g]
        logw[idx, g] += eta * np.where(g == 1, l_vul, l_inv) / qk
        w = np.exp(logw - logw.max(axis=1, keepdims=True))
        q = w / w.sum(axis=1, keepdims=True)
    return q


def test_p_rises_under_a_persistent_loss_gap_with_the_class():
    runs, steps, eta = 40, 500, 0.007
    finals, seqs = [], []
    for r in range(runs):
        s = EXP3Sampler(eta=eta, clip=None, seed=100 + r)
        seq = []
        for _ in range(steps):
            g = s.draw()
            seq.append(g)
            s.update(g, 1.1 if g == 1 else 1.0)
        finals.append(s.p_vulnerable)
        seqs.append(seq)
    drift = np.mean([logit(p) for p in finals]) / steps
    assert drift > 0.5 * eta * 0.1  # expected η·0.1 = 7e-4 per step; p rises on average
    # the vectorised update used by the drift test below is the class's update
    replay = _vectorised_runs(4, steps, eta, 1.1, 1.0, groups=np.array(seqs[:4]).T)
    assert replay[:, 1] == pytest.approx(finals[:4], abs=1e-12, rel=0)


def test_drift_identity():
    eta, runs, steps = 0.007, 1000, 1000
    q = _vectorised_runs(runs, steps, eta, 1.1, 1.0, rng=np.random.default_rng(0))
    per_step = np.mean(np.log(q[:, 1] / q[:, 0])) / steps  # logit(p0) = 0
    assert per_step == pytest.approx(eta * 0.1, rel=0.10)


# ----------------------------------------------------------------------------- determinism / resume (§10.6)
def _drive(s: EXP3Sampler, n: int, rng: random.Random):
    out = []
    for _ in range(n):
        g = s.draw()
        s.update(g, rng.uniform(0.5, 2.0) + 0.1 * g)
        out.append((g, s.probs))
    return out


def test_same_seed_same_draws():
    a, b = EXP3Sampler(eta=0.05, seed=7), EXP3Sampler(eta=0.05, seed=7)
    assert _drive(a, 300, random.Random(1)) == _drive(b, 300, random.Random(1))
    draws = {seed: [g for g, _ in _drive(EXP3Sampler(eta=0.05, seed=seed), 300, random.Random(1))]
             for seed in (7, 8)}
    assert draws[7] != draws[8]


def test_draws_do_not_touch_global_rngs():
    random.seed(0)
    before = random.random()
    random.seed(0)
    EXP3Sampler(seed=5).draw()
    assert random.random() == before


@pytest.mark.parametrize("roundtrip", ["none", "json", "torch"])
def test_resume_continues_identically(roundtrip):
    orig = EXP3Sampler(eta=0.05, clip=(0.1, 0.9), seed=11)
    _drive(orig, 250, random.Random(2))
    state = orig.state_dict()
    if roundtrip == "json":
        state = json.loads(json.dumps(state))
    elif roundtrip == "torch":
        buf = io.BytesIO()
        torch.save(state, buf)
        buf.seek(0)
        state = torch.load(buf, weights_only=True)
    restored = EXP3Sampler(eta=0.05, clip=(0.1, 0.9), seed=999)  # the seed must not matter after loading
    restored.load_state_dict(state)
    assert restored.probs == orig.probs and restored.draw_counts == orig.draw_counts
    assert _drive(restored, 100, random.Random(3)) == _drive(orig, 100, random.Random(3))


def test_load_rejects_a_mismatched_state():
    with pytest.raises(ValueError, match="num_groups"):
        EXP3Sampler(num_groups=3, clip=None).load_state_dict(EXP3Sampler().state_dict())


# ----------------------------------------------------------------------------- overflow
@pytest.mark.parametrize("group", [0, 1])
@pytest.mark.parametrize("p,L,eta", [(0.01, 20.0, 0.3), (0.99, 20.0, 0.3), (1e-6, 1e3, 0.3)])
def test_no_overflow(group, p, L, eta):
    s = sampler_at(p, eta)
    for _ in range(3):
        s.update(group, L)
        assert all(math.isfinite(v) and 0.0 <= v <= 1.0 for v in s.probs)
        assert sum(s.probs) == pytest.approx(1.0, abs=1e-12)


def test_update_validates_its_input():
    s = EXP3Sampler()
    with pytest.raises(ValueError, match="group"):
        s.update(2, 1.0)
    with pytest.raises(ValueError, match="loss"):
        s.update(0, float("nan"))
    with pytest.raises(ValueError, match="loss"):
        s.update(0, "1.0")
    s.update(1, torch.tensor(0.5))  # a 0-d tensor is accepted


# ----------------------------------------------------------------------------- init / arguments
def test_init():
    assert EXP3Sampler().probs == [0.5, 0.5]
    assert EXP3Sampler(num_groups=4, clip=None).probs == [0.25] * 4
    emp = EXP3Sampler(init="empirical", group_sizes=[1258, 742])
    assert emp.p_vulnerable == pytest.approx(742 / 2000, abs=1e-15) and emp.p_vulnerable == pytest.approx(0.371)
    assert EXP3Sampler(init=[3, 1], clip=None).probs == [0.75, 0.25]


@pytest.mark.parametrize("kwargs,param", [
    ({"num_groups": 1}, "num_groups"),
    ({"num_groups": 2.0}, "num_groups"),
    ({"eta": -0.1}, "eta"),
    ({"eta": float("inf")}, "eta"),
    ({"init": "adversarial"}, "init"),
    ({"init": "empirical"}, "group_sizes"),
    ({"init": "empirical", "group_sizes": [10, 0]}, "group_sizes"),
    ({"init": [1.0]}, "init"),
    ({"init": [1.0, -1.0]}, "init"),
    ({"init": [1.0, float("nan")]}, "init"),
    ({"group_sizes": [1, 2, 3]}, "group_sizes"),
    ({"group_sizes": [1.5, 2]}, "group_sizes"),
    ({"clip": [0.9, 0.1]}, "clip"),
    ({"clip": [0.1]}, "clip"),
    ({"clip": "0.1,0.9"}, "clip"),
    ({"clip": [-0.1, 0.9]}, "clip"),
    ({"num_groups": 4, "clip": [0.3, 0.9]}, "clip"),
    ({"feedback": "semi"}, "feedback"),
    ({"seed": "42"}, "seed"),
])
def test_invalid_arguments_name_the_parameter(kwargs, param):
    with pytest.raises(ValueError, match=param):
        EXP3Sampler(**kwargs)


def test_draw_frequencies_follow_q():
    s = EXP3Sampler(num_groups=3, init=[0.2, 0.3, 0.5], clip=None, seed=0)
    counts = np.bincount([s.draw() for _ in range(20000)], minlength=3) / 20000
    assert counts == pytest.approx([0.2, 0.3, 0.5], abs=0.015)
    assert s.draw_counts == [int(c * 20000 + 0.5) for c in counts]
    s2 = EXP3Sampler(init=[0.7, 0.3], clip=None, seed=0)
    assert np.mean([s2.draw() for _ in range(20000)]) == pytest.approx(0.3, abs=0.015)


# ----------------------------------------------------------------------------- gdro_reweight (§6)
def test_group_losses_absent_group_is_zero():
    rw = GroupLossReweighter(num_groups=3)
    loss, present = rw.group_losses(torch.tensor([1.0, 2.0, 3.0, 4.0]), torch.tensor([0, 2, 0, 2]))
    assert loss.tolist() == [2.0, 0.0, 3.0]
    assert present.tolist() == [True, False, True]


def test_reweighter_update_loss_and_gradient():
    eta = 0.5
    rw = GroupLossReweighter(num_groups=3, eta=eta)
    per_sample = torch.tensor([1.0, 2.0, 3.0, 4.0, 0.5], requires_grad=True)
    groups = torch.tensor([0, 0, 2, 2, 2])
    ell = np.array([1.5, 0.0, 2.5])
    out = rw.step(per_sample, groups)
    q = np.full(3, 1 / 3) * np.exp(eta * ell)
    q /= q.sum()
    assert rw.probs == pytest.approx(q.tolist(), abs=1e-12)
    assert out.item() == pytest.approx(float(q @ ell), abs=1e-6)
    out.backward()
    n = {0: 2, 1: 0, 2: 3}
    assert per_sample.grad.tolist() == pytest.approx([q[g] / n[g] for g in groups.tolist()], abs=1e-7)
    # a second step compounds from the updated q; update=False (evaluation) leaves q alone
    before = rw.probs
    rw.step(per_sample.detach(), groups, update=False)
    assert rw.probs == before


def test_reweighter_ema_normalize_and_min_var_weight():
    rw = GroupLossReweighter(num_groups=2, eta=1.0, ema=0.1)
    rw.step(torch.tensor([2.0, 4.0]), torch.tensor([0, 0]))  # group 1 absent: its EMA stays unset
    assert rw.ema_loss.tolist() == [3.0, 0.0] and rw.ema_seen.tolist() == [True, False]
    q1 = np.array([0.5, 0.5]) * np.exp([3.0, 0.0])
    q1 /= q1.sum()
    assert rw.probs == pytest.approx(q1.tolist(), abs=1e-12)
    rw.step(torch.tensor([1.0, 5.0]), torch.tensor([0, 1]))
    ema = np.array([0.9 * 3.0 + 0.1 * 1.0, 5.0])
    assert rw.ema_loss.tolist() == pytest.approx(ema.tolist(), abs=1e-12)
    q2 = q1 * np.exp(ema)
    assert rw.probs == pytest.approx((q2 / q2.sum()).tolist(), abs=1e-12)

    rw = GroupLossReweighter(num_groups=2, eta=1.0, normalize_loss=True)
    rw.step(torch.tensor([1.0, 3.0]), torch.tensor([0, 1]))
    q = np.exp([0.25, 0.75])
    assert rw.probs == pytest.approx((q / q.sum()).tolist(), abs=1e-12)

    w, sizes = 0.2, [1258, 742]
    rw = GroupLossReweighter(num_groups=2, eta=1.0, min_var_weight=w, group_sizes=sizes)
    rw.step(torch.tensor([1.0, 3.0]), torch.tensor([0, 1]))
    q = np.exp([1.0, 3.0])
    frac = np.array(sizes) / sum(sizes)
    assert rw.probs == pytest.approx(((1 - w) * q / q.sum() + w * frac).tolist(), abs=1e-12)

    assert GroupLossReweighter(init="empirical", group_sizes=sizes).probs == pytest.approx(frac.tolist())


def test_reweighter_large_losses_stay_finite():
    rw = GroupLossReweighter(num_groups=2, eta=10.0)
    for _ in range(5):
        out = rw.step(torch.tensor([1e3, 0.0]), torch.tensor([0, 1]))
        assert math.isfinite(float(out)) and all(math.isfinite(v) for v in rw.probs)


def test_reweighter_state_round_trip():
    rw = GroupLossReweighter(num_groups=3, eta=0.3, ema=0.1)
    g = torch.Generator().manual_seed(0)
    for _ in range(5):
        rw.step(torch.rand(8, generator=g), torch.randint(0, 3, (8,), generator=g))
    state = json.loads(json.dumps(rw.state_dict()))
    other = GroupLossReweighter(num_groups=3, eta=0.3, ema=0.1)
    other.load_state_dict(state)
    x, y = torch.rand(8, generator=g), torch.randint(0, 3, (8,), generator=g)
    assert float(other.step(x, y)) == float(rw.step(x, y))
    assert other.probs == rw.probs and other.ema_loss.tolist() == rw.ema_loss.tolist()
    with pytest.raises(ValueError, match="num_groups"):
        GroupLossReweighter(num_groups=2).load_state_dict(state)


@pytest.mark.parametrize("kwargs,param", [
    ({"num_groups": 1}, "num_groups"),
    ({"eta": -1.0}, "eta"),
    ({"ema": 0.0}, "ema"),
    ({"ema": 1.5}, "ema"),
    ({"min_var_weight": 1.5}, "min_var_weight"),
    ({"min_var_weight": 0.1}, "group_sizes"),
    ({"init": "empirical"}, "group_sizes"),
    ({"init": "x"}, "init"),
    ({"group_sizes": [1, 2, 3]}, "group_sizes"),
    ({"normalize_loss": 1}, "normalize_loss"),
    ({"adj": [1.0, 2.0, 3.0], "group_sizes": [5, 5]}, "adj"),
])
def test_reweighter_invalid_arguments(kwargs, param):
    with pytest.raises(ValueError, match=param):
        GroupLossReweighter(**kwargs)


def test_reweighter_rejects_bad_batches():
    rw = GroupLossReweighter(num_groups=2)
    with pytest.raises(ValueError, match="groups"):
        rw.step(torch.ones(3), torch.tensor([0, 1, 2]))
    with pytest.raises(ValueError, match="1-D"):
        rw.step(torch.ones(3), torch.tensor([0, 1]))
    with pytest.raises(ValueError, match="integer"):
        rw.step(torch.ones(2), torch.tensor([0.0, 1.0]))


def test_per_sample_token_mean_ce_matches_manual():
    g = torch.Generator().manual_seed(0)
    B, T, V = 3, 6, 11
    logits = torch.randn(B, T, V, generator=g)
    labels = torch.randint(0, V, (B, T), generator=g)
    labels[0, :3] = -100  # prompt tokens of row 0
    labels[2, :] = -100  # a row with no labelled token
    got = per_sample_token_mean_ce(logits, labels)
    want = []
    for b in range(B):
        terms = [-F.log_softmax(logits[b, t], dim=-1)[labels[b, t + 1]]
                 for t in range(T - 1) if labels[b, t + 1] != -100]
        want.append(float(torch.stack(terms).mean()) if terms else 0.0)
    assert got.tolist() == pytest.approx(want, abs=1e-6)
    assert got[2].item() == 0.0
    logits.requires_grad_(True)
    per_sample_token_mean_ce(logits, labels).sum().backward()
    assert torch.isfinite(logits.grad).all()
    with pytest.raises(ValueError, match="logits"):
        per_sample_token_mean_ce(logits[0], labels)
