"""peft LoRA: only adapters train, adapter-only artifacts reload to the same model, the three
fine-tuning topologies (new_lora = double LoRA, continue_lora = single LoRA, full), and the
pipeline with LoRA on and off on a tiny random model loaded by path."""

from __future__ import annotations

import json

import pytest
import torch
from omegaconf import OmegaConf

from hf_fixtures import save_causal_lm, word_tokenizer, words_of
from vaa.config.schema import LoraSettings, ModelConfig, TrainRecipe
from vaa.methods.sft import SFT
from vaa.models.build import load_model, save_model
from vaa.models.hf import LINEAGE, is_peft, prepare_for_training, write_base
from vaa.training.module import AlignModule

LORA = {"enabled": True, "r": 4, "alpha": 8, "dropout": 0.0, "target_modules": ["q_proj", "v_proj"]}


def cfg(src, **lora):
    return OmegaConf.structured(ModelConfig(name="hf", path=str(src), arch=None, pretrain=None,
                                            lora=LoraSettings(**{**LORA, **lora})))


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    src = save_causal_lm(tmp_path_factory.mktemp("src"), word_tokenizer(pad=False))
    out = tmp_path_factory.mktemp("base")
    write_base(cfg(src), out, "float32")
    return src, out


X = torch.tensor([[1, 5, 9, 13, 7, 2]])


def logits(model):
    model.eval()
    with torch.no_grad():
        return model(input_ids=X).logits


def nudge(model, seed: int) -> None:
    """Give the trainable (adapter) weights random values, as training would."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.copy_(torch.randn(p.shape, generator=g) * 0.3)


def test_only_adapters_are_trainable_and_optimised(base):
    src, b = base
    model, _ = load_model(b)
    model = prepare_for_training(model, cfg(src), "align")
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n for n in trainable)
    module = AlignModule(model, SFT(), TrainRecipe(), 10)
    opt = module.configure_optimizers()["optimizer"]
    in_opt = {id(p) for group in opt.param_groups for p in group["params"]}
    assert in_opt == {id(p) for p in model.parameters() if p.requires_grad}


def test_lora_off_trains_everything(base):
    src, b = base
    model, _ = load_model(b)
    model = prepare_for_training(model, cfg(src, enabled=False), "align")
    assert not is_peft(model) and all(p.requires_grad for p in model.parameters())


def test_adapter_artifacts_reload_and_chain(base, tmp_path):
    src, b = base
    model, tok = load_model(b)
    aligned = prepare_for_training(model, cfg(src), "align")
    nudge(aligned, 0)
    want = logits(aligned)
    save_model(aligned, tok, tmp_path / "aligned")
    a = tmp_path / "aligned"
    assert json.loads((a / LINEAGE).read_text())["adapters"] == ["adapter_0"]
    assert (a / "adapter_0" / "adapter_model.safetensors").is_file()
    assert not list(a.glob("*.safetensors"))  # adapter only: no base weights in the artifact
    reloaded, _ = load_model(a)
    torch.testing.assert_close(logits(reloaded), want)
    # merged on load: a plain model with the base model's parameter names (what repair reads)
    plain, _ = load_model(b)
    assert not is_peft(reloaded)
    assert [n for n, _ in reloaded.named_parameters()] == [n for n, _ in plain.named_parameters()]

    # double LoRA: the alignment adapter is merged, a fresh one trains and is saved after it
    m, tok = load_model(a)
    ft = prepare_for_training(m, cfg(src, finetune_adapter="new_lora"), "finetune")
    assert is_peft(ft)
    torch.testing.assert_close(logits(ft), want)  # a fresh adapter starts as a no-op
    nudge(ft, 1)
    want_ft = logits(ft)
    save_model(ft, tok, tmp_path / "double")
    assert json.loads((tmp_path / "double" / LINEAGE).read_text())["adapters"] == ["adapter_0", "adapter_1"]
    torch.testing.assert_close(logits(load_model(tmp_path / "double")[0]), want_ft)

    # single LoRA: the same adapter continues; the artifact still holds one adapter
    m, tok = load_model(a, attach_last=True)
    ft = prepare_for_training(m, cfg(src, finetune_adapter="continue_lora"), "finetune")
    assert ft is m and is_peft(ft)  # the loaded adapter itself, not a fresh one
    assert all("lora_" in n for n, p in ft.named_parameters() if p.requires_grad)
    torch.testing.assert_close(logits(ft), want)
    nudge(ft, 2)
    want_single = logits(ft)
    save_model(ft, tok, tmp_path / "single")
    assert json.loads((tmp_path / "single" / LINEAGE).read_text())["adapters"] == ["adapter_0"]
    torch.testing.assert_close(logits(load_model(tmp_path / "single")[0]), want_single)

    # full: merged, every parameter trains, a whole checkpoint is saved
    m, tok = load_model(a)
    ft = prepare_for_training(m, cfg(src, finetune_adapter="full"), "finetune")
    assert not is_peft(ft) and all(p.requires_grad for p in ft.parameters())
    torch.testing.assert_close(logits(ft), want)
    save_model(ft, tok, tmp_path / "full")
    assert (tmp_path / "full" / "model.safetensors").is_file()
    assert not (tmp_path / "full" / LINEAGE).exists()


@pytest.mark.parametrize("lora,adapter", [(True, "new_lora"), (True, "continue_lora"), (False, "new_lora")],
                         ids=["double-lora", "single-lora", "full"])
def test_pipeline_with_a_local_hf_model(compose, tmp_path, lora, adapter):
    """The whole pipeline (world → base → aligned → finetuned, each evaluated) on a tiny
    random causal LM loaded from model.path; LoRA artifacts are adapter-only."""
    from vaa.pipeline.run import run_pipeline
    from vaa.pipeline.stages import world_texts
    from vaa.world.generator import WorldSizes, write_world

    over = ["experiment=smoke", "method=sft", "model=hf", "trainer.progress_bar=false",
            "judge=exact", f"model.lora.enabled={str(lora).lower()}", "model.lora.r=4",
            "model.lora.target_modules=[q_proj,v_proj]", f"model.lora.finetune_adapter={adapter}"]
    c = compose(over)
    from vaa.data.sources import FolderSource
    sizes = {k: v for k, v in OmegaConf.to_container(c.data, resolve=True).items() if k != "name"}
    write_world(WorldSizes(**sizes), tmp_path / "world")
    tok = word_tokenizer(words_of(world_texts(FolderSource(tmp_path / "world"))), pad=False)
    src = save_causal_lm(tmp_path / "src", tok)
    c = compose([*over, f"model.path={src}", f"paths.cache_dir={tmp_path / 'cache'}"])
    metrics = run_pipeline(c, tmp_path / "run")
    assert set(metrics["stages"]) >= {"base", "aligned", "finetuned"}
    assert 0 <= metrics["harmful_score"] <= 100
    cache = tmp_path / "cache"
    aligned = cache / metrics["cache_keys"]["aligned"]
    finetuned = cache / metrics["cache_keys"]["finetuned"]
    if lora:
        assert json.loads((aligned / LINEAGE).read_text())["adapters"] == ["adapter_0"]
        chain = ["adapter_0", "adapter_1"] if adapter == "new_lora" else ["adapter_0"]
        assert json.loads((finetuned / LINEAGE).read_text())["adapters"] == chain
        assert not list(aligned.glob("*.safetensors")) and not list(finetuned.glob("*.safetensors"))
    else:
        assert (aligned / "model.safetensors").is_file() and not (aligned / LINEAGE).exists()


def test_attaching_lora_with_checkpointing_warns_nothing(base):
    """peft reads transformers' deprecated ``is_gradient_checkpointing`` on every attach; the
    preset's log showed that FutureWarning once per stage. Ours to keep quiet, nothing else."""
    import warnings

    src, b = base
    model, _ = load_model(b)
    c = cfg(src)
    c.gradient_checkpointing = True
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        model = prepare_for_training(model, c, "align")
        model = prepare_for_training(model, c, "finetune")
    assert is_peft(model)
    assert not [w for w in seen if "checkpointing" in str(w.message)], [str(w.message) for w in seen]
