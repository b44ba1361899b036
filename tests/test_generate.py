"""Greedy generation (vaa.eval.generate / vaa.eval.greedy): the lean loop gives the tokens of
``model.generate``, batching and length bucketing never change a prompt's output, finished rows
leave the batch, and decoding stops at every stop id (EOS and a chat end-of-turn token)."""

from __future__ import annotations

import pytest
import torch
from transformers import LlamaConfig

from vaa.config.schema import ArchConfig
from vaa.data.encode import left_pad
from vaa.eval.generate import generate, length_buckets
from vaa.eval.greedy import greedy_batch
from vaa.models.build import build_tiny_llama
from vaa.models.tokenizer import build_word_tokenizer

WORDS = [f"w{i}" for i in range(60)]


def _tok():
    return build_word_tokenizer([" ".join(WORDS)])


def _model(tok, seed=0, std=0.3):
    arch = ArchConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                      intermediate_size=128, initializer_range=std)
    return build_tiny_llama(arch, tok, seed=seed).eval()


def _prompts(tok, n=24, seed=0):
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        k = int(torch.randint(2, 14, (1,), generator=g))
        words = [WORDS[int(i)] for i in torch.randint(0, len(WORDS), (k,), generator=g)]
        out.append(tok(" ".join(words))["input_ids"])
    return out


def test_lean_loop_matches_hf_generate_token_for_token():
    tok = _tok()
    model = _model(tok)
    prompts = _prompts(tok, 12)
    batch = left_pad(prompts, tok.pad_token_id)
    ours = greedy_batch(model, batch["input_ids"], batch["attention_mask"], max_new_tokens=10,
                        stop_ids=[tok.eos_token_id])
    ref = model.generate(**batch, max_new_tokens=10, do_sample=False, pad_token_id=tok.pad_token_id,
                         eos_token_id=tok.eos_token_id)[:, batch["input_ids"].shape[1]:].tolist()
    for mine, theirs in zip(ours, ref):
        cut = theirs.index(tok.eos_token_id) if tok.eos_token_id in theirs else len(theirs)
        assert mine == theirs[:cut]


def test_batched_equals_one_at_a_time_greedy_tiny_model():
    tok = _tok()
    model = _model(tok, seed=1)
    prompts = _prompts(tok, 30, seed=1)
    single = generate(model, tok, prompts, max_new_tokens=12, batch_size=1, progress=False)
    for bs in (7, 64):
        assert generate(model, tok, prompts, max_new_tokens=12, batch_size=bs, progress=False) == single
    assert len(set(single)) > 5  # the outputs differ between prompts (not a degenerate model)


def test_length_buckets_sort_by_length_and_keep_every_index():
    prompts = [[1] * n for n in (5, 2, 9, 2, 7, 1)]
    buckets = length_buckets(prompts, 4)
    assert buckets == [[5, 1, 3, 0], [4, 2]]
    assert sorted(i for b in buckets for i in b) == list(range(6))


class Scripted(torch.nn.Module):
    """A causal LM whose greedy next token is ``script[last token]`` (no attention)."""

    def __init__(self, vocab: int, script: dict[int, int]):
        super().__init__()
        self.config = LlamaConfig(vocab_size=vocab, hidden_size=8, num_hidden_layers=1,
                                  num_attention_heads=1, num_key_value_heads=1)
        self.dummy = torch.nn.Parameter(torch.zeros(1))
        table = torch.full((vocab, vocab), -1.0)
        for a, b in script.items():
            table[a, b] = 1.0
        self.register_buffer("table", table)
        self.calls: list[int] = []  # batch size of each forward

    def forward(self, input_ids, attention_mask=None, position_ids=None, cache=None,
                use_cache=None, logits_to_keep=0, **kw):
        self.calls.append(input_ids.shape[0])
        logits = self.table[input_ids]
        return type("Out", (), {"logits": logits[:, -1:] if logits_to_keep else logits})()


def test_stops_at_every_stop_id_and_evicts_finished_rows():
    # chain 3 -> 4 -> 5 -> 6 -> 7 -> 8 ...; stop ids 5 and 8: a row starting at 4 stops after
    # one token, one starting at 3 after two, one at 6 after two (7, then 8)
    script = {i: i + 1 for i in range(3, 19)}
    model = Scripted(20, script)
    prompts = [[3], [4], [6], [10]]
    batch = left_pad(prompts, 0)
    out = greedy_batch(model, batch["input_ids"], batch["attention_mask"], max_new_tokens=6,
                       stop_ids=[5, 8], evict_fraction=0.25)
    assert out == [[4], [], [7], [11, 12, 13, 14, 15, 16]]
    assert model.calls[0] == 4 and model.calls[-1] == 1  # finished rows left the batch
    assert len(model.calls) == 6  # prefill + 5 steps for 6 tokens, no step after the last


def test_loop_ends_when_every_row_stopped():
    model = Scripted(20, {i: i + 1 for i in range(3, 19)})
    batch = left_pad([[3], [3]], 0)
    out = greedy_batch(model, batch["input_ids"], batch["attention_mask"], max_new_tokens=50,
                       stop_ids=[5])
    assert out == [[4], [4]] and len(model.calls) == 2


def test_peft_model_decodes_through_the_lean_loop_with_its_adapters():
    peft = pytest.importorskip("peft")
    tok = _tok()
    base = _model(tok, seed=2)
    prompts = _prompts(tok, 6, seed=2)
    before = generate(base, tok, prompts, max_new_tokens=6, batch_size=4, progress=False)
    model = peft.get_peft_model(base, peft.LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    model.generate = None  # the fallback would fail: the lean loop must drive the peft model
    assert generate(model, tok, prompts, max_new_tokens=6, batch_size=4, progress=False) == before
    with torch.no_grad():  # a non-zero adapter changes the answers: it is applied
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 1.0)
    assert generate(model, tok, prompts, max_new_tokens=6, batch_size=4, progress=False) != before


def test_rows_that_stop_early_leave_the_batch_and_the_cache_consistently(monkeypatch):
    """Stop ids chosen among tokens the model emits early, so rows stop at different steps and
    the finished ones are evicted (cache included) while the others go on: every prompt's
    output equals its one-at-a-time output."""
    from vaa.eval import greedy

    tok = _tok()
    model = _model(tok, seed=3)
    prompts = _prompts(tok, 24, seed=3)
    free = [greedy.greedy_batch(model, torch.tensor([p]), torch.ones(1, len(p), dtype=torch.long),
                                max_new_tokens=12, stop_ids=[tok.eos_token_id])[0] for p in prompts]
    stops = sorted({ids[k] for ids, k in zip(free[:8], (1, 2, 3, 4) * 2) if len(ids) > k})
    evictions = []
    orig = greedy.BufferLayer.batch_select_indices
    monkeypatch.setattr(greedy.BufferLayer, "batch_select_indices",
                        lambda self, idx: (evictions.append(len(idx)), orig(self, idx))[1])
    single = generate(model, tok, prompts, max_new_tokens=12, batch_size=1, progress=False, stop_ids=stops)
    assert not evictions  # a batch of one ends when its row stops
    batched = generate(model, tok, prompts, max_new_tokens=12, batch_size=24, progress=False, stop_ids=stops)
    assert batched == single
    assert evictions  # rows left the batch mid-generation
    lengths = {len(s.split()) for s in single}
    assert len(lengths) > 2  # rows stopped at different steps
