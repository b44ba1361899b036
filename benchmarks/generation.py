"""Greedy generation throughput: batched (``generate(batch_size=64)``) vs one prompt at a time.

Both sides call ``vaa.eval.generate.generate`` on the same model and the same prompts (the
world's held-out harmful prompts, ``beavertails/test``, templated with ``compact`` by
``prompt_ids``), with the same ``max_new_tokens``; only ``batch_size`` differs (64 vs 1).
Repetitions are interleaved (batched, single, batched, ...); medians are reported.

``speedup`` = generated tokens per second batched / one at a time. Greedy decoding should
give the same text either way; ``identical_fraction`` is the share of prompts whose two
outputs are equal (left padding changes the floating-point sums a little, so on an
untrained model, whose logits nearly tie, a rare flip is possible).

    python -m benchmarks.generation           # 200 prompts, 32 new tokens, tiny model
    python -m benchmarks.generation --quick   # smoke run, seconds
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path

from benchmarks.common import (base_parser, emit, interleaved, make_world, median, run_main,
                               size_options, tiny_model, world_tokenizer)
from vaa.data.encode import prompt_ids
from vaa.eval.generate import generate

NAME = "generation"


def main(argv: list[str] | None = None) -> dict:
    p = base_parser(__doc__.splitlines()[0])
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--template", default="compact")
    size_options(p, n_prompts=(12, 200), max_new_tokens=(4, 32), hidden=(32, 128), layers=(1, 2),
                 reps=(1, 3))
    return run_main(p, run, argv)


def run(a) -> dict:
    n, new_tokens, hidden, layers, reps = a.n_prompts, a.max_new_tokens, a.hidden, a.layers, a.reps
    with tempfile.TemporaryDirectory(prefix="vaa-bench-") as tmp:
        source = make_world(Path(tmp) / "world", hs_test=max(n, 20))
        tokenizer = world_tokenizer(source)
        examples = source.examples("beavertails", "test", 0, n)
    prompts = [prompt_ids(tokenizer, ex, a.template, 512) for ex in examples]
    model = tiny_model(tokenizer, hidden, layers, seed=a.seed)
    model.eval()

    outputs: dict[str, list[str]] = {}

    def timed(name: str, batch_size: int):
        def run() -> float:
            t0 = time.perf_counter()
            outputs[name] = generate(model, tokenizer, prompts, max_new_tokens=new_tokens,
                                     batch_size=batch_size, progress=False)
            return time.perf_counter() - t0
        return run

    t0 = time.perf_counter()
    # warm-up (first-call allocations and lazy imports), untimed
    generate(model, tokenizer, prompts[:2], max_new_tokens=2, batch_size=2, progress=False)
    secs = interleaved({"batched": timed("batched", a.batch_size), "single": timed("single", 1)},
                       reps)
    wall = time.perf_counter() - t0

    def n_tokens(texts: list[str]) -> int:
        # the word tokenizer round-trips the world's text: one id per generated word/mark
        return sum(len(tokenizer(t, add_special_tokens=False)["input_ids"]) for t in texts)

    tok_b, tok_s = n_tokens(outputs["batched"]), n_tokens(outputs["single"])
    sec_b, sec_s = median(secs["batched"]), median(secs["single"])
    same = sum(x == y for x, y in zip(outputs["batched"], outputs["single"]))
    return emit(NAME, speedup=(tok_b / sec_b) / (tok_s / sec_s),
                batched_prompts_per_s=n / sec_b, single_prompts_per_s=n / sec_s,
                batched_tokens_per_s=tok_b / sec_b, single_tokens_per_s=tok_s / sec_s,
                batched_s=sec_b, single_s=sec_s,
                identical_fraction=same / n, n_prompts=n, max_new_tokens=new_tokens,
                batch_size=a.batch_size, mean_prompt_tokens=sum(map(len, prompts)) / n,
                hidden_size=hidden, layers=layers, reps=reps, wall_s=wall)


if __name__ == "__main__":
    main()
