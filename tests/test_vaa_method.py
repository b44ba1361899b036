"""VAA stage 2 inside the Lightning loop: one step, passes per step, the λ curriculum, and
resume (stop after k steps, resume) equal to an uninterrupted run."""

from __future__ import annotations

import copy
import random

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from omegaconf import OmegaConf

from vaa.config.schema import AlignConfig, ArchConfig, DROConfig
from vaa.data.formats import to_examples
from vaa.methods.vaa import VAA, lambda_at
from vaa.models.build import build_tiny_llama
from vaa.models.tokenizer import build_word_tokenizer
from vaa.training.module import AlignModule
from vaa.world.generator import WorldSizes, generate_world

BATCH = 4


@pytest.fixture(scope="module")
def setup():
    torch.set_num_threads(1)
    world = generate_world(WorldSizes(base_harmful=20, base_benign=20, base_task=10, align=32,
                                      harmful_pool=10, proxy_pool=10, hs_test=10, task_train=20,
                                      task_test=10))
    examples = to_examples(world["beavertails/align.jsonl"], "beavertails", "align")
    tok = build_word_tokenizer([t for e in examples for t in (e.instruction, e.input, e.output)]
                               + ["### instruction : input : response :"])
    model = build_tiny_llama(ArchConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                                        num_key_value_heads=2, intermediate_size=64), tok, seed=0)
    groups = [1 if random.Random(i).random() < 0.4 else 0 for i in range(len(examples))]
    return examples, tok, model, groups


def make(setup, steps, **dro_overrides):
    examples, tok, model, groups = setup
    dro = OmegaConf.merge(OmegaConf.structured(DROConfig), {"sampler": {"eta": 0.3, "clip": None}},
                          dro_overrides)
    method = VAA(dro=dro, seed=0)
    dm = method.make_datamodule(examples, tok, groups=groups, batch_size=BATCH, seed=0,
                                template="compact", max_length=128)
    recipe = OmegaConf.structured(AlignConfig(lr=1e-3, batch_size=BATCH))
    module = AlignModule(copy.deepcopy(model), method, recipe, total_steps=steps)
    return module, dm


def trainer(steps, **kw):
    return L.Trainer(accelerator="cpu", devices=1, max_steps=steps, max_epochs=-1, logger=False,
                     enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
                     **{"enable_checkpointing": False, **kw})


def count_forwards(module) -> list[int]:
    calls = [0]
    module.model.get_decoder().register_forward_hook(lambda *a: calls.__setitem__(0, calls[0] + 1))
    return calls


def test_one_step_changes_weights_and_loss_is_finite(setup):
    module, dm = make(setup, steps=1)
    before = [p.detach().clone() for p in module.model.parameters()]
    trainer(1).fit(module, datamodule=dm)
    after = list(module.model.parameters())
    assert any(not torch.equal(a, b) for a, b in zip(before, after))
    assert all(torch.isfinite(p).all() for p in after)
    assert module.method.stats["steps"] == 1


@pytest.mark.parametrize("lambda_max,schedule,passes_per_step", [
    (0.0, "linear", 1),      # sampler only: one pass every step
    (1.0, "constant", 2),    # λ = 1 always: every step perturbed, two passes
])
def test_passes_per_step_are_counted(setup, lambda_max, schedule, passes_per_step):
    steps = 6
    module, dm = make(setup, steps, lambda_max=lambda_max, lambda_schedule=schedule)
    calls = count_forwards(module)
    trainer(steps).fit(module, datamodule=dm)
    assert calls[0] == steps * passes_per_step
    assert module.method.stats["passes"] == steps * passes_per_step
    assert module.method.passes_per_step == passes_per_step


def test_weighted_mixing_always_takes_two_passes_once_lambda_is_positive(setup):
    steps = 5
    module, dm = make(setup, steps, lambda_mixing="weighted")
    calls = count_forwards(module)
    trainer(steps).fit(module, datamodule=dm)
    assert calls[0] == 1 + 2 * (steps - 1)  # λ_0 = 0 on the first (linear) step


def test_linear_curriculum_and_bernoulli_fraction():
    assert lambda_at(0, 100, 1.0, "linear") == 0.0
    assert lambda_at(50, 100, 0.8, "linear") == pytest.approx(0.4)
    assert lambda_at(7, 100, 0.3, "constant") == 0.3
    with pytest.raises(ValueError, match="linear or constant"):
        lambda_at(1, 10, 1.0, "cosine")
    # bernoulli + linear over 1,250 steps: the realised perturbed fraction is 0.5 ± 0.05
    method = VAA(dro=OmegaConf.structured(DROConfig), seed=3)
    hits = sum(method.coin.random() > 1 - lambda_at(t, 1250, 1.0, "linear") for t in range(1250))
    assert abs(hits / 1250 - 0.5) < 0.05


def test_resume_equals_uninterrupted(setup, tmp_path):
    steps, stop = 8, 4
    full, dm = make(setup, steps)
    trainer(steps).fit(full, datamodule=dm)

    first, dm1 = make(setup, steps)
    ckpt = ModelCheckpoint(dirpath=tmp_path, save_last=True, save_top_k=0, every_n_train_steps=stop)
    trainer(stop, enable_checkpointing=True, callbacks=[ckpt]).fit(first, datamodule=dm1)
    resumed, dm2 = make(setup, steps)
    trainer(steps).fit(resumed, datamodule=dm2, ckpt_path=str(tmp_path / "last.ckpt"))

    assert resumed.method.sampler.probs == full.method.sampler.probs
    assert resumed.method.stats == full.method.stats
    assert resumed.method.trajectory == full.method.trajectory  # the plotted history survives too
    for a, b in zip(full.model.parameters(), resumed.model.parameters()):
        assert torch.equal(a, b)
    # and the interrupted run did stop early: its weights differ from the final ones
    assert any(not torch.equal(a, b) for a, b in zip(first.model.parameters(), full.model.parameters()))


def test_missing_groups_is_a_clear_error(setup):
    examples, tok, _model, _groups = setup
    with pytest.raises(ValueError, match="dro.groups_file"):
        VAA(dro=OmegaConf.structured(DROConfig)).make_datamodule(examples, tok, groups=None,
                                                                  batch_size=2, seed=0)


def test_loss_reweighting_gdro_step(setup):
    from vaa.methods.gdro import GroupDRO

    examples, tok, model, groups = setup
    dro = OmegaConf.merge(OmegaConf.structured(DROConfig), {"sampler": {"eta": 0.5}})
    method = GroupDRO(dro=dro, seed=0)
    dm = method.make_datamodule(examples, tok, groups=groups, batch_size=8, seed=0,
                                template="compact", max_length=128)
    module = AlignModule(copy.deepcopy(model), method, OmegaConf.structured(AlignConfig(lr=1e-3, batch_size=8)), 3)
    before = [p.detach().clone() for p in module.model.parameters()]
    trainer(3).fit(module, datamodule=dm)
    assert any(not torch.equal(a, p) for a, p in zip(before, module.model.parameters()))
    q = method.reweighter.probs
    assert q != [0.5, 0.5] and abs(sum(q) - 1) < 1e-9  # q moved, stays on the simplex
    assert method.state_dict()["reweighter"]["num_updates"] == 3


def test_trajectory_artifacts(setup, tmp_path):
    import json

    steps = 5
    module, dm = make(setup, steps)
    trainer(steps).fit(module, datamodule=dm)
    module.method.write_artifacts(tmp_path)
    data = json.loads((tmp_path / "dro_trajectory.json").read_text())
    assert len(data["steps"]) == steps and data["stats"]["steps"] == steps
    assert [r["p_vulnerable"] for r in data["steps"]][-1] == module.method.sampler.probs[1]
    assert sum(r["loss_perturbed"] is not None for r in data["steps"]) == data["stats"]["perturbed"]
    assert (tmp_path / "dro_trajectory.png").stat().st_size > 0


def test_full_information_feedback_updates_from_both_groups(setup):
    steps = 3
    module, dm = make(setup, steps, lambda_max=0.0, sampler={"feedback": "full"})
    calls = count_forwards(module)
    trainer(steps).fit(module, datamodule=dm)
    assert calls[0] == 2 * steps  # the sampled group's pass + the other group's forward
    assert module.method.sampler.num_updates == steps and module.method.sampler.probs[1] != 0.5
