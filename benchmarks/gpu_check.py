"""GPU check of the 7B paths (issue 13): SFT and VAA steps on a 7B-shaped and a
Qwen2.5-0.5B-shaped model (random init, no download), in ``bf16-mixed`` and ``bf16-true``,
full fine-tuning and LoRA, with the project's own method classes. Prints one JSON line per
run (tokens/s, peak GPU memory, the realised SAM perturbation of VAA in that precision,
whether the method refused it) and one summary line last, ``{"benchmark": "gpu_check", …}``.

    python -m benchmarks.gpu_check                       # one GPU, under ten minutes
    python -m benchmarks.gpu_check --shapes tiny --device cpu --steps 1   # the CPU smoke run
    python -m benchmarks.gpu_check --shapes 7b --modes full --precisions 32-true --methods vaa \
        --optimizer paged_adamw_8bit --batch 8 --seq 512 --grad-ckpt   # paper_llama2's [aligned] stage

Precision follows Lightning's plugins: ``bf16-mixed`` keeps fp32 weights and runs the forward
under ``torch.autocast(bfloat16)``; ``bf16-true`` holds the weights (and AdamW's state) in
bf16. A run that does not fit reports ``"status": "oom"`` beside ``vaa-plan``'s arithmetic
(e.g. full fine-tuning of 7B in bf16-mixed: fp32 weights, gradients and AdamW ≈ 112 GB before
VAA's parameter copy and activations). Steps run outside Lightning (a thin harness gives the
methods what they read of their LightningModule), so the figures are the step itself.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import time
from types import SimpleNamespace

import torch
from omegaconf import OmegaConf

from vaa.config.schema import DROConfig
from vaa.methods.precision import PerturbationRoundedAway
from vaa.methods.sft import SFT
from vaa.methods.vaa import VAA
from vaa.models.hf import enable_checkpointing
from vaa.training.module import response_loss
from vaa.training.optim import build_optimizer

# Architecture shapes (config.json of the public checkpoints); random init.
SHAPES = {
    "7b": dict(arch="llama", hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
               num_attention_heads=32, num_key_value_heads=32, vocab_size=32000,
               tie_word_embeddings=False),
    "qwen7b": dict(arch="qwen2", hidden_size=3584, intermediate_size=18944, num_hidden_layers=28,
                   num_attention_heads=28, num_key_value_heads=4, vocab_size=152064,
                   tie_word_embeddings=False),
    "0.5b": dict(arch="qwen2", hidden_size=896, intermediate_size=4864, num_hidden_layers=24,
                 num_attention_heads=14, num_key_value_heads=2, vocab_size=151936,
                 tie_word_embeddings=True),
    "135m": dict(arch="llama", hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                 num_attention_heads=9, num_key_value_heads=3, vocab_size=49152,
                 tie_word_embeddings=True),  # SmolLM2-135M (the CPU preset's model)
    "tiny": dict(arch="llama", hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                 num_attention_heads=4, num_key_value_heads=4, vocab_size=512,
                 tie_word_embeddings=True),
}
LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def build(shape: str, dtype: torch.dtype, device: str):
    from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

    spec = dict(SHAPES[shape])
    cls, cfg_cls = {"llama": (LlamaForCausalLM, LlamaConfig),
                    "qwen2": (Qwen2ForCausalLM, Qwen2Config)}[spec.pop("arch")]
    cfg = cfg_cls(**spec, max_position_embeddings=4096, attn_implementation="sdpa")
    with torch.device(device):
        torch.manual_seed(0)
        model = cls(cfg).to(dtype)
    return model


class Harness:
    """What a method reads of its LightningModule: model, device, step counters, the recipe,
    ``lm_loss`` (under autocast for bf16-mixed), ``manual_backward``, the optimizer and the
    trainer's precision (for the realised-perturbation measurement)."""

    def __init__(self, model, method, precision: str, steps: int, device: str, optimizer: str = "adamw"):
        self.model, self.method, self.device = model, method, torch.device(device)
        self.global_step, self.total_steps = 0, steps
        self.recipe = SimpleNamespace(grad_clip=1.0, batch_size=0)
        self._trainer = SimpleNamespace(precision=precision, log_every_n_steps=1, strategy=object())
        params = [p for p in model.parameters() if p.requires_grad]
        recipe = SimpleNamespace(optimizer=optimizer, lr=1e-5, weight_decay=0.0, betas=(0.9, 0.999))
        self.opt = build_optimizer(params, recipe, "--optimizer")  # adamw | adamw_8bit | paged_adamw_8bit
        self.autocast = precision == "bf16-mixed"

    def lm_loss(self, batch, model=None):
        ctx = (torch.autocast(self.device.type, dtype=torch.bfloat16) if self.autocast
               else contextlib.nullcontext())
        with ctx:
            return response_loss(model or self.model, batch)

    def manual_backward(self, loss):
        loss.backward()

    def optimizers(self):
        return self.opt

    def lr_schedulers(self):
        return None

    def all_reduce_mean(self, value):
        return value.detach()


class RandomStream:
    """VAA's group stream, with random token batches (the step's cost is what is measured)."""

    def __init__(self, batch: int, seq: int, vocab: int, device: str):
        self.shape, self.vocab, self.device = (batch, seq), vocab, device
        self.rank = 0

    def next_batch(self, group: int) -> dict:
        ids = torch.randint(0, self.vocab, self.shape, device=self.device)
        labels = ids.clone()
        labels[:, : self.shape[1] // 2] = -100  # loss on the second half: a response
        return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels}


def make_method(name: str, stream: RandomStream, lambda_mixing: str = "bernoulli"):
    if name == "sft":
        return SFT()
    dro = OmegaConf.merge(OmegaConf.structured(DROConfig),
                          {"lambda_max": 1.0, "lambda_schedule": "constant",
                           "lambda_mixing": lambda_mixing})
    method = VAA(dro=dro, seed=0)
    dm = SimpleNamespace(stream=stream, group_sizes=lambda: [50, 50])
    return method, dm


def run_one(shape, precision, mode, method_name, args) -> dict:
    rec = {"shape": shape, "precision": precision, "mode": mode, "method": method_name, "optimizer": args.optimizer,
           "batch": args.batch, "seq": args.seq, "grad_ckpt": args.grad_ckpt,
           "matmul_precision": args.matmul_precision, "lambda_mixing": args.lambda_mixing}
    dtype = torch.bfloat16 if precision == "bf16-true" else torch.float32
    cuda = args.device.startswith("cuda")
    model = h = None
    from vaa.pipeline.memory import PeakMemory

    host = PeakMemory().start()  # the process's peak RSS inside this run (CPU runs: the figure)
    try:
        if cuda:
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
        model = build(shape, dtype, args.device)
        if args.grad_ckpt:  # as the 7B presets (model.gradient_checkpointing: true)
            enable_checkpointing(model)
            if mode == "lora":
                model.enable_input_require_grads()
        if mode == "lora":
            from peft import LoraConfig, get_peft_model

            model = get_peft_model(model, LoraConfig(r=8, lora_alpha=4, target_modules=LORA_TARGETS,
                                                     task_type="CAUSAL_LM"))
        stream = RandomStream(args.batch, args.seq, SHAPES[shape]["vocab_size"], args.device)
        made = make_method(method_name, stream, args.lambda_mixing)
        method, dm = made if isinstance(made, tuple) else (made, None)
        h = Harness(model, method, precision, args.steps, args.device, args.optimizer)
        method.setup(h, dm)
        rec["trainable_params"] = sum(p.numel() for p in model.parameters() if p.requires_grad)
        times, logs = [], {}
        for step in range(args.steps + 1):  # the first step warms up (allocations, kernels)
            if cuda:
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            logs = method.training_step(h, stream.next_batch(0))
            if cuda:
                torch.cuda.synchronize()
            h.global_step += 1
            if step:
                times.append(time.perf_counter() - t0)
        tokens = args.batch * args.seq
        rec.update(status="ok", step_s=round(sorted(times)[len(times) // 2], 4),
                   tokens_per_s=round(tokens / sorted(times)[len(times) // 2], 1),
                   loss=round(float(logs["loss"]), 4))
        for k in ("eps_norm", "eps_realised_norm", "eps_realised_cos"):
            if k in logs:
                rec[k] = round(float(logs[k]), 6)
    except PerturbationRoundedAway as e:
        rec.update(status="refused", error=str(e))
    except torch.cuda.OutOfMemoryError:
        rec.update(status="oom")
    finally:
        host.stop()
        if host.rss_mb is not None:
            rec["peak_rss_gb"] = round(host.rss_mb / 1024, 3)
        if cuda:
            rec["peak_gb"] = round(torch.cuda.max_memory_allocated() / 2**30, 2)
        del model, h
        gc.collect()
        if cuda:
            torch.cuda.empty_cache()
    return rec


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--shapes", default="0.5b,7b", help="comma list of " + ", ".join(SHAPES))
    p.add_argument("--precisions", default="bf16-mixed,bf16-true")
    p.add_argument("--modes", default="lora,full")
    p.add_argument("--methods", default="sft,vaa")
    p.add_argument("--steps", type=int, default=3, help="timed steps per run (after one warm-up)")
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--seq", type=int, default=512)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--optimizer", default="adamw", help="adamw | adamw_8bit | paged_adamw_8bit (bitsandbytes: the "
                                                       "paper presets' alignment, e.g. --precisions 32-true)")
    p.add_argument("--grad-ckpt", action="store_true",
                   help="gradient checkpointing, as the 7B presets (compare with vaa-plan's stage)")
    p.add_argument("--matmul-precision", default="highest", choices=("highest", "high", "medium"),
                   help="torch.set_float32_matmul_precision for fp32 matrix products (high: TF32 on CUDA)")
    p.add_argument("--lambda-mixing", default="bernoulli", choices=("bernoulli", "weighted"),
                   help="VAA's dro.lambda_mixing (weighted: protocol=paper, keeps a stash of G0)")
    args = p.parse_args(argv)
    previous = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision(args.matmul_precision)
    try:
        return _grid(args)
    finally:
        torch.set_float32_matmul_precision(previous)


def _grid(args) -> dict:
    runs = []
    for shape in args.shapes.split(","):
        for precision in args.precisions.split(","):
            for mode in args.modes.split(","):
                for method in args.methods.split(","):
                    rec = run_one(shape, precision, mode, method, args)
                    print(json.dumps(rec), flush=True)
                    runs.append(rec)
    device = torch.cuda.get_device_name() if args.device.startswith("cuda") else args.device
    summary = {"benchmark": "gpu_check", "device": device, "batch": args.batch, "seq": args.seq,
               "runs": runs}
    print(json.dumps(summary), flush=True)
    return summary


if __name__ == "__main__":
    main()
