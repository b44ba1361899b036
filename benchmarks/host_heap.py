"""Host memory of VAA's two-pass step under each ``trainer.host_heap`` policy (issue 11 item 7).

One process per setting, because glibc's heap state is per process: ``system`` (glibc as is),
``trim`` (``malloc_trim(0)`` after every backward), ``keep`` (never hand freed heap back; all in
vaa/training/host_memory.py), and any ``MALLOC_*``
environment you pass with ``--env``. Each child builds the model (``--model``: ``tiny`` or a
real model as in benchmarks/real_model.py), attaches LoRA r = 8 on the seven linears with
activation checkpointing (the ``smollm2_cpu`` preset), and runs ``--steps`` VAA steps on one
fixed random batch: the clean pass, then the SAM-perturbed pass (``SAMPerturber``, ρ 0.4) with
the pipeline's response-only loss. Reported per setting: peak RSS (GB, ``VmHWM``), the seconds
of the steps, and the largest size of the tensors alive between passes (GB).

    python -m benchmarks.host_heap --quick                          # tiny model, seconds
    python -m benchmarks.host_heap --model smollm2_135m --threads 2 # the preset's step
    python -m benchmarks.host_heap --model smollm2_135m --env MALLOC_MMAP_THRESHOLD_=131072
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

from benchmarks.common import base_parser, emit, run_main, size_options

NAME = "host_heap"


def main(argv: list[str] | None = None) -> dict:
    p = base_parser(__doc__.splitlines()[0])
    p.add_argument("--model", default="tiny", help="tiny, smollm2_135m or a model folder")
    p.add_argument("--env", action="append", default=[], help="NAME=VALUE: one more setting, run "
                   "with this environment variable (e.g. MALLOC_MMAP_THRESHOLD_=131072)")
    p.add_argument("--child", default=None, help=argparse_hidden())
    size_options(p, steps=(2, 4), batch_size=(2, 8), seq_len=(32, 160))
    return run_main(p, run, argv)


def argparse_hidden():
    import argparse

    return argparse.SUPPRESS


def run(a) -> dict:
    if a.child:
        return child(a)
    settings = [(p, {}, p) for p in ("system", "trim", "keep")]
    settings += [(e, dict([e.split("=", 1)]), "system") for e in a.env]
    results = {}
    for name, env, policy in settings:
        cmd = [sys.executable, "-m", "benchmarks.host_heap", "--child", policy,
               "--model", a.model, "--steps", str(a.steps), "--batch-size", str(a.batch_size),
               "--seq-len", str(a.seq_len)] + (["--threads", str(a.threads)] if a.threads else [])
        out = subprocess.run(cmd, env={**os.environ, **env}, capture_output=True, text=True, check=True)
        results[name] = json.loads(out.stdout.strip().splitlines()[-1])["child"]
        print(f"{NAME}: {name}: {results[name]}", file=sys.stderr, flush=True)
    base = results["system"]
    ratios = {f"{p}_{what}_ratio": round(results[p][key] / base[key], 3)
              for p in ("trim", "keep") for what, key in (("peak", "peak_rss_gb"), ("time", "seconds"))}
    return emit(NAME, model=a.model, steps=a.steps, batch_size=a.batch_size, seq_len=a.seq_len,
                settings=results, **ratios)


def child(a) -> dict:
    import gc
    import time

    import torch
    from omegaconf import OmegaConf

    from vaa.methods.perturb import SAMPerturber
    from vaa.models.hf import prepare_for_training
    from vaa.pipeline.memory import _reset_hwm, _status_kb
    from vaa.training import host_memory
    from vaa.training.module import response_loss

    if a.model == "tiny":
        from transformers import LlamaConfig, LlamaForCausalLM

        torch.manual_seed(0)
        model = LlamaForCausalLM(LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                             num_attention_heads=4, num_key_value_heads=4, vocab_size=512))
    else:
        from benchmarks.real_model import load_real_model

        model = load_real_model(a.model)[0]
    lora = {"enabled": True, "r": 8, "alpha": 16, "dropout": 0.05, "finetune_adapter": "new_lora",
            "target_modules": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]}
    model = prepare_for_training(model, OmegaConf.create({"lora": lora, "gradient_checkpointing": True}), "align")
    model.train()
    host_memory.configure({"host_heap": a.child})
    vocab = model.config.vocab_size
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, vocab, (a.batch_size, a.seq_len), generator=g)
    labels = ids.clone()
    labels[:, : a.seq_len // 5] = -100  # the preset's worst case: 4/5 of each row is answer
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels}
    sam = SAMPerturber([p for p in model.parameters() if p.requires_grad], 0.4)

    def alive_gb() -> float:
        return sum(o.numel() * o.element_size() for o in gc.get_objects() if isinstance(o, torch.Tensor)) / 1e9

    def backward(loss):
        loss.backward()
        host_memory.after_backward()

    _reset_hwm()
    alive, t0 = 0.0, time.perf_counter()
    for _ in range(a.steps):
        backward(response_loss(model, batch))
        alive = max(alive, alive_gb())
        with sam.perturbed():
            model.zero_grad(set_to_none=False)
            backward(response_loss(model, batch))
        model.zero_grad(set_to_none=True)
    seconds = time.perf_counter() - t0
    peak = _status_kb("VmHWM")
    rec = {"peak_rss_gb": round(peak * 1024 / 1e9, 3) if peak else None, "seconds": round(seconds, 2),
           "tensors_alive_gb": round(alive, 3)}
    print(json.dumps({"child": rec}), flush=True)
    return rec


if __name__ == "__main__":
    main()
