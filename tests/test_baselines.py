"""The baselines (baselines.md): Vaccine, RepNoise, Booster (alignment stage); Lisa, EMA,
LookAhead (fine-tuning stage). Each: one step on a tiny model changes the trainable weights
with a finite loss; the passes per step are counted; the method's maths holds.

Most tests drive a method through ``Harness`` (the module interface a method uses: lm_loss,
manual_backward, optimizers, the step clock) with plain SGD and no clipping, so that the
update θ_before − θ_after equals lr × the gradient the method formed.
"""

from __future__ import annotations

import copy
from types import SimpleNamespace

import lightning as L
import pytest
import torch
from omegaconf import OmegaConf
from transformers import Qwen2Config, Qwen2ForCausalLM

from vaa.config.schema import ArchConfig, AttackConfig
from vaa.data.datamodule import SFTDataModule
from vaa.data.formats import Example, to_examples
from vaa.methods.booster import Booster
from vaa.methods.ema import EMA
from vaa.methods.hooks import ATTENTION, MLP, layer_modules
from vaa.methods.lisa import ALIGN, FINETUNE, Lisa, cycle_lengths
from vaa.methods.lookahead import CONNECTOR, LookAhead, lookahead_row
from vaa.methods.repnoise import RepNoise, mmd
from vaa.methods.vaccine import Vaccine, hidden_perturbation
from vaa.models.build import build_tiny_llama
from vaa.models.tokenizer import build_word_tokenizer
from vaa.training.module import FinetuneModule, response_loss
from vaa.world.generator import WorldSizes, generate_world

BATCH = 4


@pytest.fixture(scope="module")
def world():
    torch.set_num_threads(1)
    w = generate_world(WorldSizes(base_harmful=20, base_benign=20, base_task=10, align=24,
                                  harmful_pool=8, proxy_pool=8, hs_test=8, align_harmful_pool=12,
                                  task_train=16, task_test=8))
    align = to_examples(w["beavertails/align.jsonl"], "beavertails", "align")
    harmful = to_examples(w["beavertails/align_harmful.jsonl"], "beavertails", "align_harmful")
    tok = build_word_tokenizer([t for e in align + harmful for t in (e.instruction, e.input, e.output)]
                               + ["### instruction : input : response : the answer begins with",
                                  "positive and warm a fine film mix flour"])
    model = build_tiny_llama(ArchConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                        num_key_value_heads=2, intermediate_size=64), tok, seed=0)
    return SimpleNamespace(align=align, harmful=harmful, tok=tok, model=model)


class Harness:
    """What a method sees of its LightningModule, with SGD (lr) and optional clipping."""

    def __init__(self, model, method, lr: float = 1.0, total_steps: int = 10, clip: float = 0.0):
        self.model, self.method = model, method
        self.device = torch.device("cpu")
        self.global_step, self.total_steps = 0, total_steps
        self.recipe = SimpleNamespace(grad_clip=clip, batch_size=BATCH)
        self.opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=lr)
        self.backwards = 0
        self.forwards = 0
        model.get_decoder().register_forward_hook(lambda *a: setattr(self, "forwards", self.forwards + 1))

    def lm_loss(self, batch, model=None):
        return response_loss(model or self.model, batch)

    def manual_backward(self, loss):
        self.backwards += 1
        loss.backward()

    def optimizers(self):
        return self.opt

    def lr_schedulers(self):
        return None

    def step(self, batch):
        logs = self.method.training_step(self, batch)
        self.global_step += 1
        return logs


def datamodule(world, method, rows=None, extra=None):
    if extra is None:
        extra = {"harmful": world.harmful, "alignment": world.align}
        extra = {k: v for k, v in extra.items() if k in method.requires}
    dm = method.make_datamodule(rows or world.align, world.tok, extra=extra, batch_size=BATCH,
                                seed=0, template="compact", max_length=96)
    dm.setup()
    return dm


def make(world, method, model=None, **kw):
    model = copy.deepcopy(model or world.model)
    dm = datamodule(world, method)
    h = Harness(model, method, **kw)
    method.setup(h, dm)
    return h, dm, next(iter(dm.train_dataloader()))


def params(model):
    return [p.detach().clone() for p in model.parameters()]


def grad_of(model, batch):
    """∇ of the response loss of ``model`` on ``batch``, on a copy (``model`` untouched)."""
    m = copy.deepcopy(model)
    return flat_grad(m, response_loss(m, batch))


def flat_grad(model, loss):
    ps = list(model.parameters())
    gs = torch.autograd.grad(loss, ps, allow_unused=True)
    return [torch.zeros_like(p) if g is None else g for p, g in zip(ps, gs)]


METHODS = {
    "vaccine": lambda: Vaccine(rho=2.0),
    "repnoise": lambda: RepNoise(noise_weight=0.1, ascent_weight=0.5),
    "repnoise_diff_tokens": lambda: RepNoise(noise_weight=0.1, ascent_weight=0.5, mask="diff_tokens"),
    "booster": lambda: Booster(lam=5.0, alpha=0.1),
    "lisa": lambda: Lisa(align_steps=1, finetune_steps=1, min_cycles=0),
    "ema": lambda: EMA(beta=0.9),
    "lookahead": lambda: LookAhead(),
}
# (decoder forwards, backward calls) per step, baselines.md's summary table
PASSES = {"vaccine": (2, 1), "repnoise": (2, 1), "repnoise_diff_tokens": (2, 1), "booster": (3, 3),
          "lisa": (1, 1), "ema": (1, 1), "lookahead": (1, 1)}


@pytest.mark.parametrize("name", sorted(METHODS))
def test_one_step_finite_loss_changes_weights_and_counts_passes(world, name):
    method = METHODS[name]()
    h, _dm, batch = make(world, method, lr=1e-2)
    before = params(h.model)
    logs = h.step(batch)
    assert torch.isfinite(logs["loss"]), logs
    assert any(not torch.equal(a, b) for a, b in zip(before, h.model.parameters()))
    assert (h.forwards, h.backwards) == PASSES[name]
    assert method.passes_per_step == PASSES[name][0]


# ---------------------------------------------------------------------------------------------
# hooks: found through the config, for Llama and Qwen2
# ---------------------------------------------------------------------------------------------
def tiny_qwen2(vocab: int):
    return Qwen2ForCausalLM(Qwen2Config(vocab_size=vocab, hidden_size=32, num_hidden_layers=3,
                                        num_attention_heads=2, num_key_value_heads=1,
                                        intermediate_size=64))


def test_layer_modules_match_each_layer_of_llama_and_qwen2(world):
    assert len(layer_modules(world.model, ATTENTION)) == 2
    assert len(layer_modules(world.model, MLP)) == 2
    qwen = tiny_qwen2(len(world.tok))
    assert len(layer_modules(qwen, ATTENTION)) == 3
    with pytest.raises(ValueError, match="no module .* matches"):
        layer_modules(qwen, r"\.attention$")
    with pytest.raises(ValueError, match="3 layers"):
        layer_modules(qwen, r"layers\.0\.self_attn$")


def test_vaccine_runs_on_qwen2(world):
    h, _dm, batch = make(world, Vaccine(rho=1.0), model=tiny_qwen2(len(world.tok)), lr=1e-2)
    logs = h.step(batch)
    assert torch.isfinite(logs["loss"]) and abs(float(logs["eps_norm"]) - 1.0) < 1e-4


# ---------------------------------------------------------------------------------------------
# Vaccine
# ---------------------------------------------------------------------------------------------
def test_vaccine_perturbation_has_norm_rho_along_the_hidden_gradient(world):
    method = Vaccine(rho=3.0)
    h, _dm, batch = make(world, method)
    clean, eps, norm = hidden_perturbation(h, batch, method.layers, 3.0)
    total = torch.sqrt(sum(e.pow(2).sum() for e in eps))
    assert abs(float(total) - 3.0) < 1e-4
    # independent: the gradient w.r.t. each attention output, via retain_grad
    outs = []

    def keep(_m, _a, o):
        o[0].retain_grad()
        outs.append(o[0])
    handles = [m.register_forward_hook(keep) for m in method.layers]
    h.lm_loss(batch).backward()
    for x in handles:
        x.remove()
    h.model.zero_grad()
    g = [o.grad for o in outs]
    gnorm = torch.sqrt(sum(x.pow(2).sum() for x in g))
    assert abs(float(gnorm) - float(norm)) < 1e-4 * float(gnorm)
    for e, gi in zip(eps, g):
        torch.testing.assert_close(e, 3.0 * gi / gnorm, rtol=1e-4, atol=1e-7)
    logs = h.step(batch)
    assert logs["loss"] > logs["loss_clean"]  # ε ascends f to first order


# ---------------------------------------------------------------------------------------------
# Booster
# ---------------------------------------------------------------------------------------------
def booster_expected(model, h_batch, a_batch, lam, alpha, sign):
    """G = g_a + λ(g_h − g_h′), g_h′ at θ + sign·α·ĝ_h (upstream: sign = −1)."""
    m = copy.deepcopy(model)
    g_h = flat_grad(m, response_loss(m, h_batch))
    norm = torch.sqrt(sum(g.pow(2).sum() for g in g_h))
    moved = copy.deepcopy(m)
    with torch.no_grad():
        for p, g in zip(moved.parameters(), g_h):
            p.add_(g, alpha=sign * alpha / (float(norm) + 1e-7))
    g_h2 = flat_grad(moved, response_loss(moved, h_batch))
    at = moved if sign > 0 else m  # the sign bug takes g_a at θ + 2α·ĝ_h
    if sign > 0:
        with torch.no_grad():
            for p, g in zip(at.parameters(), g_h):
                p.add_(g, alpha=alpha / (float(norm) + 1e-7))
    g_a = flat_grad(at, response_loss(at, a_batch))
    return [a + lam * (x - y) for a, x, y in zip(g_a, g_h, g_h2)], g_h, norm


@pytest.mark.parametrize("variant,sign", [("upstream", -1.0), ("vaa_sign_bug", 1.0)])
def test_booster_update_is_ga_plus_lambda_gh_minus_gh_moved(world, variant, sign):
    lam, alpha = 5.0, 0.1
    method = Booster(lam=lam, alpha=alpha, variant=variant)
    h, dm, batch = make(world, method, lr=1.0)
    hb = dm.streams["harmful"].next_batch(0)
    dm.streams["harmful"].load_state_dict(_fresh_stream_state(world, method))  # replay the batch
    before = params(h.model)
    want, g_h, norm = booster_expected(h.model, hb, batch, lam, alpha, sign)
    h.step(batch)
    drift = 2 * alpha / (float(norm) + 1e-7) if sign > 0 else 0.0
    for b, a, g, gh in zip(before, h.model.parameters(), want, g_h):
        # θ_after = θ_before (+ 2α·ĝ_h for the bug) − lr·G
        torch.testing.assert_close(b + drift * gh - a.detach(), g, rtol=2e-3, atol=2e-6)


def _fresh_stream_state(world, method):
    return datamodule(world, method).streams["harmful"].state_dict()


def test_booster_restores_weights_exactly_and_the_bug_drifts(world):
    for variant, moves in [("upstream", False), ("vaa_sign_bug", True)]:
        h, _dm, batch = make(world, Booster(lam=1.0, alpha=0.5, variant=variant), lr=0.0)
        before = params(h.model)
        h.step(batch)
        same = all(torch.equal(a, b) for a, b in zip(before, h.model.parameters()))
        assert same is not moves, variant


def test_booster_without_meta_term_takes_two_passes(world):
    h, _dm, batch = make(world, Booster(meta_term=False))
    h.step(batch)
    assert (h.forwards, h.backwards) == (2, 2)
    h, _dm, batch = make(world, Booster(perturb_aware=True))
    h.step(batch)
    assert h.forwards == 4 and h.method.passes_per_step == 4


# ---------------------------------------------------------------------------------------------
# RepNoise
# ---------------------------------------------------------------------------------------------
def test_mmd_is_zero_for_equal_samples_and_positive_otherwise():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(6, 20, generator=g)
    assert abs(float(mmd(x, x))) < 1e-6
    assert float(mmd(x, torch.randn(6, 20, generator=g) * 3 + 2)) > 0.1


@pytest.mark.parametrize("mask", ["response", "diff_tokens"])
def test_repnoise_loss_is_harmless_plus_beta_noise_minus_alpha_ascent(world, mask):
    beta, alpha = 0.3, 0.7
    h, _dm, batch = make(world, RepNoise(noise_weight=beta, ascent_weight=alpha, mask=mask), lr=0.0)
    logs = h.step(batch)
    want = logs["harmless_loss"] + beta * logs["noise_mmd"] - alpha * logs["ascent_log"]
    torch.testing.assert_close(logs["loss"], want)
    assert logs["noise_mmd"] > 0 and logs["ascent_log"] > 0


def test_repnoise_ascent_raises_the_harmful_loss_and_beta_alpha_zero_is_sft(world):
    def harmful_loss_after(alpha):
        method = RepNoise(noise_weight=0.0, ascent_weight=alpha)
        h, dm, batch = make(world, method, lr=0.05)
        hb = datamodule(world, method).streams["harmful"].next_batch(0)
        h.step(batch)
        return float(response_loss(h.model, hb)), h, batch

    plain, _, _ = harmful_loss_after(0.0)
    ascended, _, _ = harmful_loss_after(50.0)
    assert ascended > plain
    # β = α = 0: the update is plain SFT's on the harmless batch
    method = RepNoise(noise_weight=0.0, ascent_weight=0.0)
    h, _dm, batch = make(world, method, lr=1.0)
    before = params(h.model)
    want = grad_of(h.model, batch)
    h.step(batch)
    for b, a, g in zip(before, h.model.parameters(), want):
        torch.testing.assert_close(b - a.detach(), g, rtol=1e-4, atol=1e-7)


# ---------------------------------------------------------------------------------------------
# Lisa
# ---------------------------------------------------------------------------------------------
def test_lisa_cycle_rescaling():
    assert cycle_lengths(100, 900, 126, 6) == (2, 19)
    assert cycle_lengths(100, 900, 10_000, 6) == (100, 900)
    assert cycle_lengths(100, 900, 126, 0) == (100, 900)
    assert cycle_lengths(10, 90, 625, 6) == (10, 90)


def test_lisa_switches_phases_on_schedule_and_draws_alignment_batches(world):
    method = Lisa(align_steps=2, finetune_steps=3, rho=0.5, warmup_fraction=0.0, min_cycles=0)
    task = [Example("classify", f"row {i}", "positive") for i in range(16)]
    dm = datamodule(world, method, rows=task)
    h = Harness(copy.deepcopy(world.model), method, lr=1e-2, total_steps=10)
    method.setup(h, dm)
    seen = []
    stream = dm.streams["alignment"]
    for batch in [next(iter(dm.train_dataloader())) for _ in range(10)]:
        pos = stream.state_dict()["groups"][0]["pos"]
        h.step(batch)
        seen.append(stream.state_dict()["groups"][0]["pos"] != pos)
    A, F = ALIGN, FINETUNE
    assert method.history == [A, A, F, F, F, A, A, F, F, F]
    assert seen == [s == A for s in method.history]  # alignment batches only in the A state


def test_lisa_proximal_gradient_pulls_toward_the_other_anchor(world):
    rho = 0.5
    method = Lisa(align_steps=1, finetune_steps=1, rho=rho, warmup_fraction=0.0, min_cycles=0)
    h, dm, batch = make(world, method, lr=1.0)
    anchor = [a.clone() for a in method.anchors[FINETUNE]]
    with torch.no_grad():  # move θ away from the anchors
        for p in h.model.parameters():
            p.add_(0.01)
    before = params(h.model)
    ab = dm.streams["alignment"].next_batch(0)
    dm.streams["alignment"].load_state_dict(datamodule(world, method).streams["alignment"].state_dict())
    want = grad_of(h.model, ab)
    h.global_step = 1  # the term starts once global_step > warmup_fraction × total
    h.step(batch)  # alignment state: f + (ρ/2)‖θ − θ̃_F‖²
    for b, a, g, anc in zip(before, h.model.parameters(), want, anchor):
        torch.testing.assert_close(b - a.detach(), g + rho * (b - anc), rtol=1e-4, atol=1e-6)
    assert method.state == FINETUNE
    torch.testing.assert_close(method.anchors[ALIGN][0], next(h.model.parameters()).detach())


# ---------------------------------------------------------------------------------------------
# EMA
# ---------------------------------------------------------------------------------------------
def test_ema_shadow_follows_the_update_and_is_the_final_model(world):
    beta = 0.8
    method = EMA(beta=beta)
    h, dm, _ = make(world, method, lr=1e-2)
    shadow = [p.detach().float().clone() for p in h.model.parameters()]
    for batch in list(dm.train_dataloader())[:3]:
        h.step(batch)
        shadow = [beta * s + (1 - beta) * p.detach() for s, p in zip(shadow, h.model.parameters())]
    for s, m in zip(shadow, method.shadow):
        torch.testing.assert_close(m, s)
    assert not torch.equal(method.shadow[0], next(h.model.parameters()))
    method.on_train_end(h)
    for s, p in zip(shadow, h.model.parameters()):
        torch.testing.assert_close(p.detach(), s)


def test_ema_write_back_and_anchor_weight(world):
    method = EMA(variant="write_back", beta=0.5)
    h, _dm, batch = make(world, method, lr=1e-2)
    h.step(batch)
    for s, p in zip(method.shadow, h.model.parameters()):
        torch.testing.assert_close(p.detach(), s)
    method = EMA(anchor_weight_at_end=0.5)
    make(world, method, total_steps=100)
    assert abs(method.beta ** 100 - 0.5) < 1e-9


# ---------------------------------------------------------------------------------------------
# LookAhead
# ---------------------------------------------------------------------------------------------
def test_lookahead_transforms_rows_exactly(world):
    ex = Example("Classify the sentiment.", "a fine film", "positive and warm")
    real = lookahead_row(ex, world.tok, "real", preview_tokens=2)
    assert real.input == "a fine film" + CONNECTOR + "positive and"
    assert real.output == ex.output and real.instruction == ex.instruction
    virt = lookahead_row(ex, world.tok, "virtual", virtual_prefix="Let's solve this problem. ")
    assert virt.input == "a fine film The answer begins with: Let's solve this problem. "
    assert virt.output == "Let's solve this problem. positive and warm"
    no_input = lookahead_row(Example("How do I bake bread?", "", "Mix flour"), world.tok, "real", 6)
    assert no_input.instruction == "How do I bake bread? The answer begins with: mix flour"
    assert no_input.input == ""
    assert ex.input == "a fine film"  # the original row is untouched


def test_repnoise_ascent_averages_its_n_l_plus_2_terms():
    """The issue's numbers: on a 2-layer model the harmful CE and the 3 lens CEs sum to
    21.7842; upstream divides by N_L + 1 = 3 (7.2614), the mean by 4 (5.4460)."""
    from vaa.methods.repnoise import ascent_term
    ce, lens = torch.tensor(6.0), [torch.tensor(v) for v in (5.5, 5.2842, 5.0)]
    torch.testing.assert_close(ascent_term(ce, lens), torch.log(torch.tensor(5.44605 + 1)))
    torch.testing.assert_close(ascent_term(ce, lens, "upstream"), torch.log(torch.tensor(7.2614 + 1)))
    with pytest.raises(ValueError, match="layer_average"):
        RepNoise(layer_average="sum")


@pytest.mark.parametrize("how,count", [("mean", 4), ("upstream", 3)])
def test_repnoise_step_ascent_is_the_average_of_harmful_ce_and_every_lens(world, how, count):
    """One step with β = 0, α = 1 on the 2-layer model: the logged ascent term equals
    log(sum / count + 1) of the four CEs computed here independently (embeddings and both
    layers through the final norm and the head, plus the model's own harmful CE)."""
    method = RepNoise(noise_weight=0.0, ascent_weight=1.0, layer_average=how)
    h, dm, batch = make(world, method, lr=0.0)
    hb = datamodule(world, RepNoise()).streams["harmful"].next_batch(0)  # the step's first harmful batch
    m = h.model
    with torch.no_grad():
        states = []
        hooks = [m.model.embed_tokens.register_forward_hook(lambda mod, a, out: states.append(out))]
        hooks += [layer.register_forward_hook(lambda mod, a, out: states.append(out[0] if isinstance(out, tuple) else out))
                  for layer in m.model.layers]
        logits = m(input_ids=hb["input_ids"], attention_mask=hb["attention_mask"]).logits
        for k in hooks:
            k.remove()
        keep = hb["labels"][:, 1:] != -100
        target = hb["input_ids"][:, 1:][keep]
        ces = [torch.nn.functional.cross_entropy(logits[:, :-1][keep], target)]
        ces += [torch.nn.functional.cross_entropy(m.lm_head(m.model.norm(s))[:, :-1][keep], target)
                for s in states]
    assert len(ces) == 4  # N_L + 2 with N_L = 2
    logs = h.step(batch)
    want = torch.log(torch.stack(ces).sum() / count + 1)
    torch.testing.assert_close(logs["ascent_log"], want, rtol=1e-5, atol=1e-5)


def test_lookahead_trains_on_transformed_rows_only(world):
    method = LookAhead(mode="virtual")
    rows = [Example("Classify the sentiment.", "a fine film", "positive")] * 4
    dm = datamodule(world, method, rows=rows)
    assert all(CONNECTOR in e.input for e in dm.examples)
    assert all(CONNECTOR not in e.input for e in rows)


# ---------------------------------------------------------------------------------------------
# extra streams: checkpointed with the datamodule; inside the Lightning loop
# ---------------------------------------------------------------------------------------------
def test_extra_stream_state_round_trips(world):
    dm = SFTDataModule(world.align, world.tok, batch_size=BATCH, seed=0, template="compact",
                       extra={"harmful": world.harmful})
    dm.setup()
    for _ in range(5):
        dm.streams["harmful"].next_batch(0)
    state = dm.state_dict()
    want = [dm.streams["harmful"].next_batch(0)["input_ids"] for _ in range(4)]
    dm2 = SFTDataModule(world.align, world.tok, batch_size=BATCH, seed=0, template="compact",
                        extra={"harmful": world.harmful})
    dm2.load_state_dict(state)  # before setup, as Lightning restores
    dm2.setup()
    got = [dm2.streams["harmful"].next_batch(0)["input_ids"] for _ in range(4)]
    assert all(torch.equal(a, b) for a, b in zip(want, got))
    with pytest.raises(ValueError, match="extra_data.harmful"):
        SFTDataModule(world.align, world.tok, batch_size=BATCH, seed=0, extra={"harmful": []})


def test_lisa_in_the_lightning_loop(world):
    method = Lisa(align_steps=1, finetune_steps=2, min_cycles=0)
    task = [Example("classify", f"row {i}", "positive") for i in range(16)]
    dm = datamodule(world, method, rows=task)
    recipe = OmegaConf.structured(AttackConfig(lr=1e-3, batch_size=BATCH))
    module = FinetuneModule(copy.deepcopy(world.model), method, recipe, total_steps=6)
    L.Trainer(accelerator="cpu", devices=1, max_steps=6, max_epochs=-1, logger=False,
              enable_progress_bar=False, enable_model_summary=False, enable_checkpointing=False
              ).fit(module, datamodule=dm)
    assert method.history == [ALIGN, FINETUNE, FINETUNE] * 2


# ---------------------------------------------------------------------------------------------
# configs: every preset composes; the extra data enters only the keys of methods that read it
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("override", ["method=vaccine", "method=repnoise", "method=repnoise_vaa",
                                      "method=booster", "method=booster_vaa", "ft_defense=lisa",
                                      "ft_defense=ema", "ft_defense=lookahead"])
def test_presets_compose_and_instantiate(compose, override):
    from hydra.utils import instantiate
    cfg = compose([override])
    group = override.split("=")[0]
    method = instantiate(cfg[group])
    assert method.name == cfg[group]._target_.rsplit(".", 1)[1].lower()
    with pytest.raises(Exception, match="no_such_knob"):  # typed schema: unknown keys fail
        compose([override, f"{group}.no_such_knob=1"])


def test_extra_data_enters_only_the_keys_of_methods_that_require_it(compose):
    from vaa.pipeline.keys import plan_keys

    def keys(*o):
        return plan_keys(compose(["method=sft", *o]))

    base, moved = keys(), keys("extra_data.harmful.stop=50")
    assert base == moved  # SFT + no defense read no extra data
    b0, b1 = keys("method=booster"), keys("method=booster", "extra_data.harmful.stop=50")
    assert b0["aligned"] != b1["aligned"] and b0["base"] == b1["base"]
    l0, l1 = keys("ft_defense=lisa"), keys("ft_defense=lisa", "extra_data.alignment.stop=50")
    assert l0["aligned"] == l1["aligned"] and l0["finetuned"] != l1["finetuned"]


def test_vaccine_gradient_is_the_same_under_gradient_checkpointing(world):
    def grads(checkpointing: bool):
        method = Vaccine(rho=2.0)
        model = copy.deepcopy(world.model)
        model.train()
        if checkpointing:
            from vaa.models.hf import enable_checkpointing

            enable_checkpointing(model)
        h, _dm, batch = make(world, method, model=model)
        from vaa.methods.vaccine import perturbed_backward
        perturbed_backward(h, batch, method.layers, 2.0)
        return [p.grad.clone() for p in h.model.parameters()]

    for a, b in zip(grads(False), grads(True)):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("make_method", [
    lambda: Lisa(align_steps=2, finetune_steps=3, rho=0.5, warmup_fraction=0.0, min_cycles=0),
    lambda: EMA(beta=0.7), lambda: RepNoise(noise_weight=0.1, ascent_weight=0.1)])
def test_method_state_round_trips_through_a_checkpoint(world, make_method):
    """What a Lightning checkpoint saves (state, clock, anchors, EMA shadow, noise RNG) lets a
    fresh method continue exactly like the original."""
    import io
    a = make_method()
    h, dm, _ = make(world, a, lr=1e-2)
    batches = list(dm.train_dataloader())
    for b in batches[:3]:
        h.step(b)
    buf = io.BytesIO()
    torch.save({"method": a.state_dict(), "model": h.model.state_dict(), "data": dm.state_dict()}, buf)
    buf.seek(0)
    ckpt = torch.load(buf, weights_only=True)  # loads without unpickling code
    b_method = make_method()
    h2, dm2, _ = make(world, b_method, lr=1e-2)
    h2.model.load_state_dict(ckpt["model"])
    dm2.load_state_dict(ckpt["data"])
    dm2.setup()
    b_method.load_state_dict(ckpt["method"])
    h2.global_step = h.global_step
    for b in batches[3:5]:
        h.step(b)
        h2.step(b)
    for p, q in zip(h.model.parameters(), h2.model.parameters()):
        torch.testing.assert_close(p, q)
    assert getattr(a, "history", None) == getattr(b_method, "history", None)
    for s, t in zip(getattr(a, "shadow", []), getattr(b_method, "shadow", [])):
        torch.testing.assert_close(s, t)


# ---------------------------------------------------------------------------------------------
# exact resume for every stage: stop after k steps, resume from the checkpoint, compare bitwise
# ---------------------------------------------------------------------------------------------
def _resume_case(name):
    from vaa.config.schema import AlignConfig
    from vaa.methods.sft import SFT
    from vaa.training.module import AlignModule
    align = {"sft": SFT, "vaccine": lambda: Vaccine(rho=2.0), "booster": lambda: Booster(lam=5.0, alpha=0.1),
             "repnoise": lambda: RepNoise(noise_weight=0.1, ascent_weight=0.1)}
    defense = {"lisa": lambda: Lisa(align_steps=2, finetune_steps=3, min_cycles=0),
               "ema": lambda: EMA(beta=0.7), "lookahead": LookAhead, "none": SFT}
    if name in align:
        return align[name], AlignModule, AlignConfig, None
    task = [Example("classify the sentiment .", f"a fine film {'warm ' * (i % 5)}", "positive")
            for i in range(18)]
    return defense[name], FinetuneModule, AttackConfig, task


def _trainer(steps, **kw):
    return L.Trainer(accelerator="cpu", devices=1, max_steps=steps, max_epochs=-1, logger=False,
                     enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
                     **{"enable_checkpointing": False, **kw})


@pytest.mark.parametrize("name,stop", [("sft", 5), ("sft", 6), ("vaccine", 5), ("repnoise", 5),
                                       ("booster", 5), ("none", 3), ("lisa", 3), ("ema", 3),
                                       ("lookahead", 3)])
def test_resume_equals_uninterrupted(world, tmp_path, name, stop):
    """Every alignment method and fine-tuning defense: train 9 steps, or stop after ``stop``
    steps (mid-epoch, or at the epoch boundary for sft/6) and resume from the checkpoint: every
    parameter is bitwise equal. 9 steps cross into the second epoch, whose order
    must not repeat the first's."""
    from lightning.pytorch.callbacks import ModelCheckpoint
    make_method, module_cls, recipe_cls, rows = _resume_case(name)
    steps = 9
    recipe = OmegaConf.structured(recipe_cls(lr=1e-3, batch_size=BATCH))

    def run(steps_now, ckpt=None, callbacks=()):
        method = make_method()
        dm = datamodule(world, method, rows=rows)
        module = module_cls(copy.deepcopy(world.model), method, recipe, total_steps=steps)
        kw = {"enable_checkpointing": True, "callbacks": list(callbacks)} if callbacks else {}
        _trainer(steps_now, **kw).fit(module, datamodule=dm, ckpt_path=ckpt)
        return module

    full = run(steps)
    cb = ModelCheckpoint(dirpath=tmp_path, save_last=True, save_top_k=0, every_n_train_steps=stop)
    first = run(stop, callbacks=[cb])
    resumed = run(steps, ckpt=str(tmp_path / "last.ckpt"))
    assert any(not torch.equal(a, b) for a, b in zip(first.model.parameters(), full.model.parameters()))
    for (n, a), b in zip(full.model.named_parameters(), resumed.model.parameters()):
        assert torch.equal(a, b), n
    assert getattr(full.method, "history", None) == getattr(resumed.method, "history", None)


def test_epoch_order_is_a_function_of_seed_epoch_and_position():
    from vaa.data.datamodule import EpochOrder
    a, b = EpochOrder(10, 4, seed=3), EpochOrder(10, 4, seed=3)
    assert [a.batch(1, p) for p in range(3)] == [b.batch(1, p) for p in range(3)]
    assert sorted(i for p in range(3) for i in a.batch(0, p)) == list(range(10))
    assert a.rows(0) != a.rows(1) and a.rows(0) != EpochOrder(10, 4, seed=4).rows(0)
    ranks = [EpochOrder(10, 4, seed=3, rank=r, world_size=2) for r in range(2)]
    assert sorted(ranks[0].rows(2) + ranks[1].rows(2)) == list(range(10))
    assert ranks[0].steps_per_epoch() == 2
