"""Harmful-score judge throughput: batched (``judge.build.batch_size=16``) vs one pair per
call (the reference code's way), on the same tiny 14-label moderation classifier.

The classifier is a random Llama sequence classifier with beaver-dam's head (14 sigmoid
outputs), saved with ``save_pretrained`` and loaded through the real path
(``vaa.eval.judge_factory.beaver_dam(path=…)``); the pairs are the synthetic world's
held-out harmful prompts with its harmful responses. Both sides score the same pairs with the
same judge object; only the batch size differs. Repetitions are interleaved (batched, single,
batched, ...); medians are reported.

``speedup`` = pairs per second batched / one at a time. ``identical_flags`` is the share of
pairs whose flag agrees (right padding, each row read at its own last token: it should be
1.0) and ``max_score_diff`` the largest probability difference between the two.

    python -m benchmarks.judge_throughput           # 200 pairs, hidden 128, 2 layers
    python -m benchmarks.judge_throughput --quick   # smoke run, seconds
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path

import torch

from benchmarks.common import (base_parser, emit, interleaved, make_world, median, run_main,
                               size_options, world_tokenizer)
from vaa.eval.judge_factory import beaver_dam

NAME = "judge_throughput"


def main(argv: list[str] | None = None) -> dict:
    p = base_parser(__doc__.splitlines()[0])
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--max-length", type=int, default=256)
    size_options(p, n_pairs=(16, 200), hidden=(32, 128), layers=(1, 2), reps=(1, 3))
    return run_main(p, run, argv)


def save_classifier(out: Path, tokenizer, hidden: int, layers: int, seed: int) -> None:
    from transformers import LlamaConfig, LlamaForSequenceClassification

    heads = max(1, hidden // 32)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=hidden, num_hidden_layers=layers,
                         num_attention_heads=heads, num_key_value_heads=heads,
                         intermediate_size=2 * hidden, num_labels=14,
                         problem_type="multi_label_classification",
                         pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id)
    torch.manual_seed(seed)
    LlamaForSequenceClassification(config).save_pretrained(out)
    tokenizer.save_pretrained(out)


def run(a) -> dict:
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # stdout/stderr stay for the report
    with tempfile.TemporaryDirectory(prefix="vaa-bench-") as tmp:
        source = make_world(Path(tmp) / "world", hs_test=max(a.n_pairs, 20))
        tokenizer = world_tokenizer(source)
        examples = source.examples("beavertails", "test", 0, a.n_pairs)
        save_classifier(Path(tmp) / "dam", tokenizer, a.hidden, a.layers, a.seed)
        judge = beaver_dam(path=str(Path(tmp) / "dam"), hub_name=None, batch_size=a.batch_size,
                           max_length=a.max_length)
    prompts, answers = [e.input for e in examples], [e.output for e in examples]
    results: dict[str, tuple] = {}

    def timed(name: str, batch_size: int):
        def go() -> float:
            judge.batch_size = batch_size
            t0 = time.perf_counter()
            results[name] = judge.score(prompts, answers)
            return time.perf_counter() - t0
        return go

    t0 = time.perf_counter()
    judge.score(prompts[:2], answers[:2])  # warm-up, untimed
    secs = interleaved({"batched": timed("batched", a.batch_size), "single": timed("single", 1)}, a.reps)
    wall = time.perf_counter() - t0
    (fb, sb), (fs, ss) = results["batched"], results["single"]
    sec_b, sec_s = median(secs["batched"]), median(secs["single"])
    n = len(prompts)
    return emit(NAME, speedup=sec_s / sec_b, batched_pairs_per_s=n / sec_b,
                single_pairs_per_s=n / sec_s, batched_s=sec_b, single_s=sec_s,
                identical_flags=sum(x == y for x, y in zip(fb, fs)) / n,
                max_score_diff=max(abs(x - y) for x, y in zip(sb, ss)),
                flagged_fraction=sum(fb) / n, n_pairs=n, batch_size=a.batch_size,
                max_length=a.max_length, hidden_size=a.hidden, layers=a.layers, reps=a.reps,
                wall_s=wall)


if __name__ == "__main__":
    main()
