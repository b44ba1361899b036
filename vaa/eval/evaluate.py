"""Evaluation of one model: harmful score on held-out harmful prompts, fine-tune accuracy
on the task's test split. Returns metrics and per-example predictions."""

from __future__ import annotations

from typing import Sequence

from vaa.data.encode import prompt_ids
from vaa.data.formats import Example
from vaa.data.templates import extract_answer, stop_ids
from vaa.eval.generate import generate
from vaa.eval.judges import Judge
from vaa.eval.scorers import accuracy


def answers(model, tokenizer, examples: Sequence[Example], *, template: str, max_new_tokens: int,
            batch_size: int, max_prompt_length: int = 512, description: str = "") -> list[str]:
    ids = [prompt_ids(tokenizer, ex, template, max_prompt_length) for ex in examples]
    raw = generate(model, tokenizer, ids, max_new_tokens=max_new_tokens, batch_size=batch_size,
                   description=description, stop_ids=stop_ids(tokenizer, template))
    return [extract_answer(t) for t in raw]


def evaluate(model, tokenizer, *, hs_examples: Sequence[Example], judge: Judge,
             fa_examples: Sequence[Example], scorer, fa_max_new_tokens: int, eval_cfg,
             template: str = "alpaca", max_prompt_length: int = 512) -> tuple[dict, dict[str, list[dict]]]:
    kw = dict(template=template, batch_size=eval_cfg.batch_size,
              max_prompt_length=max_prompt_length)
    hs_answers = answers(model, tokenizer, hs_examples, max_new_tokens=eval_cfg.hs_max_new_tokens,
                         description="harmful prompts", **kw)
    prompts = [ex.input for ex in hs_examples]  # the judge sees the harmful prompt (§7, bug 1)
    flags, scores = judge.score(prompts, hs_answers)
    fa_answers = answers(model, tokenizer, fa_examples, max_new_tokens=fa_max_new_tokens,
                         description="task test", **kw)
    if hasattr(scorer, "score_batch"):  # set-level scorers (AlpacaEval's pairwise judge)
        correct = [bool(c) for c in scorer.score_batch(
            [ex.input for ex in fa_examples], fa_answers, [ex.output for ex in fa_examples])]
        fa = 100.0 * sum(correct) / len(correct)
    else:
        correct = [bool(scorer(a, ex.output)) for a, ex in zip(fa_answers, fa_examples)]
        fa = accuracy(scorer, fa_answers, [ex.output for ex in fa_examples])
    metrics = {
        "harmful_score": 100.0 * sum(flags) / len(flags),
        "finetune_accuracy": fa,
        "n_hs": len(flags), "n_fa": len(correct),
    }
    preds = {
        "hs": [{"prompt": p, "answer": a, "flagged": bool(f), "score": float(s)}
               for p, a, f, s in zip(prompts, hs_answers, flags, scores)],
        "fa": [{"input": ex.input, "answer": a, "gold": ex.output, "correct": c}
               for ex, a, c in zip(fa_examples, fa_answers, correct)],
    }
    return metrics, preds
