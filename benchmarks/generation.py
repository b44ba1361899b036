"""Greedy generation throughput: batched vs one prompt at a time, and the lean decoding loop
vs ``model.generate``, each as a fraction of this machine's fp32 matmul peak.

Every side calls ``vaa.eval.generate.generate`` (length buckets, the lean loop of
``vaa.eval.greedy``) on the same model and prompts — the world's held-out harmful prompts,
``beavertails/test``, templated by ``prompt_ids`` (``compact`` for the tiny model, ``chat`` for
a real model with a chat template) — with the same ``max_new_tokens``:

* ``batched``: ``batch_size`` prompts per batch (default 64);
* ``single``: one prompt at a time, on the first ``--single-prompts`` prompts (a real model at
  batch 1 is slow; tokens/s is a rate, so the subset measures it);
* ``hf``: batched through ``model.generate`` (the loop before this one; ``--no-hf`` skips it).

Repetitions are interleaved (batched, single, hf, batched, ...); medians are reported, with
[median, min, max] beside them. Tokens are the generated ones up to the stop token.

``speedup`` = tokens/s batched / tokens/s one at a time; ``lean_vs_hf`` = tokens/s batched /
tokens/s ``model.generate``. ``peak_gflops``: a 2048² fp32 GEMM at the current threads,
measured in the same run (best of 5, before and after; the larger). ``*_peak_fraction`` =
tokens/s × 2 × parameters / peak (decoding costs ≈ 2 × parameters FLOP per token; prefill and
attention are not counted, so this is the share of the compute limit on generated tokens);
``batched_model_flop_fraction`` counts the prompt tokens too (2 × parameters × (prompt +
generated tokens)), the share of the machine the batched run actually used. On a shared machine
wall time mixes in other jobs: ``*_cpu`` figures use this process's CPU time instead (GEMM and
generation alike), which is what one thread does when it runs.
Greedy decoding must give the same text batched or not: ``identical_fraction`` over the
single-prompt subset.

    python -m benchmarks.generation                                  # tiny model, 200 prompts
    python -m benchmarks.generation --quick                          # smoke run, seconds
    python -m benchmarks.generation --model smollm2_135m --threads 2 # the real model
"""

from __future__ import annotations

import tempfile
import time

import torch
from pathlib import Path

from benchmarks.common import (base_parser, emit, interleaved, make_world, median, run_main,
                               size_options, tiny_model, world_tokenizer)
from benchmarks.real_model import load_real_model, matmul_gflops, median_range
from vaa.data.encode import left_pad, prompt_ids
from vaa.data.templates import stop_ids
from vaa.eval.generate import generate, length_buckets

NAME = "generation"


def main(argv: list[str] | None = None) -> dict:
    p = base_parser(__doc__.splitlines()[0])
    p.add_argument("--model", default="tiny",
                   help="tiny (default), smollm2_135m, a save_pretrained folder or a .gguf file")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--template", default=None, help="default: chat for a model with a chat "
                   "template, else compact")
    p.add_argument("--no-hf", action="store_true", help="skip the model.generate side")
    p.add_argument("--single-prompts", type=int, default=None,
                   help="prompts decoded one at a time (default: all for the tiny model, 16 for a real one)")
    size_options(p, n_prompts=(12, 200), max_new_tokens=(4, 32), hidden=(32, 128), layers=(1, 2),
                 reps=(1, 3))
    return run_main(p, run, argv)


def hf_generate(model, tokenizer, prompts, *, max_new_tokens: int, batch_size: int,
                stops: list[int]) -> list[str]:
    """The same buckets through ``model.generate`` (the decoding loop before the lean one)."""
    out = [""] * len(prompts)
    for idx in length_buckets(prompts, batch_size):
        batch = left_pad([prompts[i] for i in idx], tokenizer.pad_token_id)
        gen = model.generate(**batch, max_new_tokens=max_new_tokens, do_sample=False, use_cache=True,
                             pad_token_id=tokenizer.pad_token_id, eos_token_id=stops)
        new = gen[:, batch["input_ids"].shape[1]:].tolist()
        cut = [r[:next((j for j, t in enumerate(r) if t in stops), len(r))] for r in new]
        for i, text in zip(idx, tokenizer.batch_decode(cut, skip_special_tokens=True)):
            out[i] = text
    return out


def run(a) -> dict:
    n, new_tokens, reps = a.n_prompts, a.max_new_tokens, a.reps
    with tempfile.TemporaryDirectory(prefix="vaa-bench-") as tmp:
        source = make_world(Path(tmp) / "world", hs_test=max(n, 20))
        examples = source.examples("beavertails", "test", 0, n)
        if a.model == "tiny":
            tokenizer = world_tokenizer(source)
            model, what = tiny_model(tokenizer, a.hidden, a.layers, seed=a.seed), "tiny"
        else:
            model, tokenizer, what = load_real_model(a.model)
    template = a.template or ("chat" if getattr(tokenizer, "chat_template", None) else "compact")
    prompts = [prompt_ids(tokenizer, ex, template, 512) for ex in examples]
    single_n = min(a.single_prompts or (n if a.model == "tiny" else 16), n)
    stops = stop_ids(tokenizer, template)
    model.eval()
    params = sum(p.numel() for p in model.parameters())
    outputs: dict[str, list[str]] = {}

    cpu_secs: dict[str, list[float]] = {}

    def timed(name: str, fn, ps):
        def call() -> float:
            t0, c0 = time.perf_counter(), time.process_time()
            outputs[name] = fn(ps)
            cpu_secs.setdefault(name, []).append(time.process_time() - c0)
            return time.perf_counter() - t0
        return call

    def lean(batch_size):
        return lambda ps: generate(model, tokenizer, ps, max_new_tokens=new_tokens,
                                   batch_size=batch_size, progress=False, stop_ids=stops)

    variants = {"batched": timed("batched", lean(a.batch_size), prompts),
                "single": timed("single", lean(1), prompts[:single_n])}
    if not a.no_hf:
        variants["hf"] = timed("hf", lambda ps: hf_generate(
            model, tokenizer, ps, max_new_tokens=new_tokens, batch_size=a.batch_size, stops=stops),
            prompts)
    t0 = time.perf_counter()
    peak, peak_cpu = matmul_gflops(), gemm_cpu_gflops()
    lean(2)(prompts[:2])  # warm-up (first-call allocations and lazy imports), untimed
    secs = interleaved(variants, reps)
    peak, peak_cpu = max(peak, matmul_gflops()), max(peak_cpu, gemm_cpu_gflops())
    wall = time.perf_counter() - t0

    def n_tokens(texts: list[str]) -> int:
        return sum(len(tokenizer(t, add_special_tokens=False)["input_ids"]) for t in texts)

    tokens = {k: n_tokens(outputs[k]) for k in variants}
    rate = {k: [tokens[k] / s for s in secs[k]] for k in variants}
    tps = {k: tokens[k] / median(secs[k]) for k in variants}
    frac = {k: v * 2 * params / (peak * 1e9) for k, v in tps.items()}
    tps_cpu = {k: tokens[k] / median(cpu_secs[k]) for k in variants}
    frac_cpu = {k: v * 2 * params / (peak_cpu * 1e9) for k, v in tps_cpu.items()}
    all_tokens = sum(map(len, prompts)) + tokens["batched"]
    same = sum(x == y for x, y in zip(outputs["batched"][:single_n], outputs["single"]))
    figures = dict(
        speedup=tps["batched"] / tps["single"],
        batched_tokens_per_s=tps["batched"], single_tokens_per_s=tps["single"],
        batched_prompts_per_s=n / median(secs["batched"]),
        single_prompts_per_s=single_n / median(secs["single"]),
        batched_peak_fraction=frac["batched"], single_peak_fraction=frac["single"],
        batched_model_flop_fraction=all_tokens * 2 * params / median(secs["batched"]) / (peak * 1e9),
        batched_tokens_per_cpu_s=tps_cpu["batched"], single_tokens_per_cpu_s=tps_cpu["single"],
        batched_peak_fraction_cpu=frac_cpu["batched"], single_peak_fraction_cpu=frac_cpu["single"],
        batched_model_flop_fraction_cpu=all_tokens * 2 * params / median(cpu_secs["batched"]) / (peak_cpu * 1e9),
        peak_gflops_cpu=peak_cpu,
        tokens_per_s_range={k: median_range(v) for k, v in rate.items()},
        batched_s=median(secs["batched"]), single_s=median(secs["single"]),
        peak_gflops=peak, compute_limit_tokens_per_s=peak * 1e9 / (2 * params),
        identical_fraction=same / single_n, n_prompts=n, single_prompts=single_n,
        generated_tokens=tokens, max_new_tokens=new_tokens, batch_size=a.batch_size,
        mean_prompt_tokens=sum(map(len, prompts)) / n, template=template, model=what,
        params=params, reps=reps, wall_s=wall)
    if "hf" in variants:
        figures.update(hf_tokens_per_s=tps["hf"], hf_peak_fraction=frac["hf"],
                       hf_peak_fraction_cpu=frac_cpu["hf"], lean_vs_hf_cpu=tps_cpu["batched"] / tps_cpu["hf"],
                       lean_vs_hf=tps["batched"] / tps["hf"],
                       hf_identical_fraction=sum(x == y for x, y in zip(outputs["batched"], outputs["hf"])) / n)
    if a.model == "tiny":
        figures.update(hidden_size=a.hidden, layers=a.layers)
    return emit(NAME, **figures)


def gemm_cpu_gflops(n: int = 2048, reps: int = 5) -> float:
    """As ``matmul_gflops``, per second of this process's CPU time (best of ``reps``)."""
    a, b = torch.randn(n, n), torch.randn(n, n)
    torch.mm(a, b)
    best = float("inf")
    for _ in range(reps):
        c0 = time.process_time()
        torch.mm(a, b)
        best = min(best, time.process_time() - c0)
    return 2 * n ** 3 / best / 1e9


if __name__ == "__main__":
    main()
