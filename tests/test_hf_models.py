"""Hugging Face models through the real code paths, on tiny random models saved with
save_pretrained: base pointer, PAD handling, dtype, gradient checkpointing, and the offline
errors (no network: HF_HUB_OFFLINE makes every hub look-up local-only)."""

from __future__ import annotations

import pytest
import torch
from omegaconf import OmegaConf
from transformers import LlamaForCausalLM

from hf_fixtures import save_causal_lm, word_tokenizer
from vaa.config.schema import LoraSettings, ModelConfig
from vaa.models.build import load_model
from vaa.models.hf import LINEAGE, hashed_model_config, prepare_for_training, resolve_dtype, write_base
from vaa.models.hub import MissingResource, model_dir


def model_cfg(path, **kw):
    lora = LoraSettings(**kw.pop("lora", {}))
    return OmegaConf.structured(ModelConfig(name="hf", path=str(path), arch=None, pretrain=None,
                                            lora=lora, **kw))


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory):
    return save_causal_lm(tmp_path_factory.mktemp("llama"), word_tokenizer(pad=False))


def base_artifact(tmp_path, src, **kw):
    out = tmp_path / "base"
    out.mkdir()
    write_base(model_cfg(src, **kw), out, "float32")
    return out


def test_base_stage_is_a_pointer_and_adds_a_mean_initialised_pad(llama_dir, tmp_path):
    base = base_artifact(tmp_path, llama_dir)
    assert (base / LINEAGE).is_file() and not list(base.glob("*.safetensors"))  # no weight copy
    model, tok = load_model(base)
    raw = LlamaForCausalLM.from_pretrained(llama_dir)
    rows = raw.get_input_embeddings().weight.shape[0]
    assert tok.pad_token == "<pad>" and tok.pad_token_id == rows == len(tok) - 1
    assert model.get_input_embeddings().weight.shape[0] == rows + 1
    torch.testing.assert_close(model.get_input_embeddings().weight[rows],
                               raw.get_input_embeddings().weight.mean(0))
    torch.testing.assert_close(model.get_output_embeddings().weight[rows],  # untied head too
                               raw.get_output_embeddings().weight.mean(0))
    torch.testing.assert_close(model.get_input_embeddings().weight[:rows],
                               raw.get_input_embeddings().weight)
    assert model.config.pad_token_id == tok.pad_token_id


def test_pad_can_reuse_eos(llama_dir, tmp_path):
    model, tok = load_model(base_artifact(tmp_path, llama_dir, pad_token="eos"))
    assert tok.pad_token_id == tok.eos_token_id
    assert model.get_input_embeddings().weight.shape[0] == len(tok)


def test_embedding_larger_than_vocab_never_shrinks(tmp_path):
    tok = word_tokenizer(pad=True)  # like Qwen: PAD exists, the matrix has spare rows
    src = save_causal_lm(tmp_path / "qwenlike", tok, extra_rows=8)
    model, tok2 = load_model(base_artifact(tmp_path, src))
    assert len(tok2) == len(tok)
    assert model.get_input_embeddings().weight.shape[0] == len(tok) + 8


def test_dtype_follows_trainer_precision():
    cfg = OmegaConf.structured(ModelConfig())
    assert resolve_dtype(cfg, "bf16-true") == "bfloat16"  # pure bf16 (reference)
    assert resolve_dtype(cfg, "bf16-mixed") == "float32"  # fp32 master weights (paper)
    assert resolve_dtype(cfg, "32-true") == "float32"
    cfg.dtype = "bfloat16"
    assert resolve_dtype(cfg, "32-true") == "bfloat16"
    cfg.dtype = "float8"
    with pytest.raises(ValueError, match="model.dtype"):
        resolve_dtype(cfg, "32-true")


def test_base_dtype_and_sdpa_reach_the_model(llama_dir, tmp_path):
    out = tmp_path / "b16"
    out.mkdir()
    write_base(model_cfg(llama_dir), out, "bfloat16")
    model, _ = load_model(out)
    assert next(model.parameters()).dtype == torch.bfloat16
    assert model.config._attn_implementation == "sdpa"


def test_gradient_checkpointing_trains(llama_dir, tmp_path):
    model, tok = load_model(base_artifact(tmp_path, llama_dir))
    model = prepare_for_training(model, model_cfg(llama_dir, gradient_checkpointing=True), "align")
    assert getattr(model, "is_activation_checkpointing", None) or model.is_gradient_checkpointing
    model.train()
    x = torch.tensor([tok("how do i make a bomb")["input_ids"]])
    model(input_ids=x, labels=x).loss.backward()
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad
               and p.dim() > 1 and p.shape[0] != len(tok))


def test_tiny_model_keys_ignore_the_real_model_keys(compose):
    tiny = OmegaConf.to_container(compose([]).model, resolve=True)
    assert set(hashed_model_config(tiny)) == {"name", "path", "arch", "pretrain", "max_length",
                                              "max_prompt_length"}
    lora = OmegaConf.to_container(compose(["model.lora.enabled=true"]).model, resolve=True)
    assert hashed_model_config(lora)["lora"]["enabled"] is True


# --- offline: fail at once, naming what is missing and the key that supplies it -------------
def test_offline_hub_model_fails_naming_it_and_the_key(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(MissingResource) as e:
        model_dir(path=None, hub_name="nobody/no-such-model", revision=None, key="model")
    assert "nobody/no-such-model" in str(e.value) and "model.path" in str(e.value)


def test_missing_local_model_dir_names_model_path(tmp_path):
    with pytest.raises(MissingResource, match=r"model\.path=.*nowhere"):
        model_dir(path=str(tmp_path / "nowhere"), hub_name=None, revision=None, key="model")


def test_offline_judge_names_judge_build_path(monkeypatch):
    from vaa.eval.judge_factory import beaver_dam

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(MissingResource, match=r"judge\.build\.path"):
        beaver_dam(hub_name="nobody/no-such-judge")


def test_offline_pipeline_with_a_hub_model_fails_in_the_base_stage(compose, monkeypatch, tmp_path):
    from vaa.pipeline.run import run_pipeline

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    cfg = compose(["experiment=smoke", "method=sft", "model=llama2_7b", "trainer.progress_bar=false"])
    cfg.model.hub_name = "nobody/not-cached-7b"
    with pytest.raises(MissingResource, match=r"nobody/not-cached-7b.*model\.path"):
        run_pipeline(cfg, tmp_path / "run")
