"""Tiny random Hugging Face models saved with ``save_pretrained``: stand-ins for the real
models (a causal LM, the 14-label beaver-dam classifier) that the real code paths load."""

from __future__ import annotations

import json
import re
from pathlib import Path

import torch
from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors
from transformers import LlamaConfig, LlamaForCausalLM, LlamaForSequenceClassification, PreTrainedTokenizerFast

WORDS = ("how do i make a bomb sorry cannot help with that here is the plan first step "
         "positive negative the movie was great bad answer is a b instruction input response "
         "### : . , ? ! 0 1 2 3 4 5 6 7 8 9 final").split()


def word_tokenizer(words=WORDS, pad: bool = False) -> PreTrainedTokenizerFast:
    """A word-level tokenizer; ``pad=False`` has no PAD token (like Llama's)."""
    specials = ["<unk>", "<s>", "</s>"] + (["<pad>"] if pad else [])
    vocab = {t: i for i, t in enumerate(specials)}
    for w in sorted({w.lower() for w in words}):
        vocab.setdefault(w, len(vocab))
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>",
                                   eos_token="</s>", **({"pad_token": "<pad>"} if pad else {}))


def words_of(texts) -> list[str]:
    return sorted({w for t in texts for w in re.findall(r"\w+|[^\w\s]+", t.lower())})


def _config(vocab: int, **kw) -> LlamaConfig:
    return LlamaConfig(vocab_size=vocab, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                       num_key_value_heads=2, intermediate_size=64, max_position_embeddings=512,
                       tie_word_embeddings=False, bos_token_id=1, eos_token_id=2, **kw)


def save_causal_lm(out: Path, tokenizer, extra_rows: int = 0, seed: int = 0) -> Path:
    """A random 1-layer Llama; ``extra_rows`` > 0 makes the embedding larger than the
    vocabulary (as Qwen's is)."""
    torch.manual_seed(seed)
    LlamaForCausalLM(_config(len(tokenizer) + extra_rows)).save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


def save_moderation_classifier(out: Path, tokenizer, num_labels: int = 14, seed: int = 0) -> Path:
    """A random 14-label sequence classifier standing in for beaver-dam-7b."""
    torch.manual_seed(seed)
    model = LlamaForSequenceClassification(_config(len(tokenizer), num_labels=num_labels,
                                                   pad_token_id=tokenizer.pad_token_id,
                                                   problem_type="multi_label_classification"))
    with torch.no_grad():  # 14 nearly equal rows: the max logit falls on both sides of 0
        shared = torch.randn(model.score.weight.shape[1]) * 0.3
        model.score.weight.copy_(shared + 0.02 * torch.randn_like(model.score.weight))
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


def write_jsonl(path: Path, rows) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path
