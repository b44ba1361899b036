"""Build a tiny Llama-architecture model from a config; save and load model + tokenizer.

Checkpoints are written as safetensors and loaded without remote code, so an artifact
cannot execute anything when a later stage reloads it.
"""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM


def build_tiny_llama(arch, tokenizer, seed: int = 0) -> LlamaForCausalLM:
    """Random-init Llama from ``arch`` (a ModelConfig.arch node) sized to ``tokenizer``."""
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=arch.hidden_size,
        num_hidden_layers=arch.num_hidden_layers,
        num_attention_heads=arch.num_attention_heads,
        num_key_value_heads=arch.num_key_value_heads,
        intermediate_size=arch.intermediate_size,
        max_position_embeddings=arch.max_position_embeddings,
        tie_word_embeddings=arch.tie_word_embeddings,
        rms_norm_eps=arch.rms_norm_eps,
        initializer_range=arch.initializer_range,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    torch.manual_seed(seed)
    return LlamaForCausalLM(config)


def save_model(model, tokenizer, path: str | Path) -> None:
    """A whole model (safetensors), or with LoRA only its adapters (vaa.models.hf)."""
    from vaa.models.hf import is_peft, save_adapter_artifact

    if is_peft(model):
        save_adapter_artifact(model, tokenizer, Path(path))
        return
    model.save_pretrained(path, safe_serialization=True)
    tokenizer.save_pretrained(path)


def load_model(path: str | Path, dtype: torch.dtype | str | None = None, trust_remote_code: bool = False,
               attach_last: bool = False):
    """(model, tokenizer) from a local directory written by ``save_model`` or by the base stage
    of a real model (``lineage.json``: base weights + adapters, see vaa.models.hf). ``dtype``:
    None keeps each artifact's own (fp32 for whole checkpoints). Adapters are merged unless
    ``attach_last`` (single-LoRA fine-tuning continues the last one)."""
    from vaa.models.hf import LINEAGE, load_lineage, mark_full

    p = Path(path)
    if (p / LINEAGE).is_file():
        return load_lineage(p, dtype if isinstance(dtype, str) or dtype is None
                            else str(dtype).removeprefix("torch."), attach_last=attach_last)
    if not (p / "config.json").is_file():
        raise FileNotFoundError(f"no model at {p} (expected config.json); set model.path to a "
                                f"local model directory")
    dtype = getattr(torch, dtype) if isinstance(dtype, str) else (dtype or torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(p, trust_remote_code=trust_remote_code)
    model = AutoModelForCausalLM.from_pretrained(p, dtype=dtype, trust_remote_code=trust_remote_code,
                                                 use_safetensors=True)
    mark_full(model, p, str(dtype).removeprefix("torch."))
    return model, tokenizer
