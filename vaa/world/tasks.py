"""Fine-tuning tasks of the synthetic world, in the real column formats.

Each builder returns ``{relative path: rows}``: a ``<dataset>/base.jsonl`` with core cues only
(what the base model learns) and the task's own train / test splits, where a share
``domain_frac`` of rows uses domain cues never seen in the base corpus (see generator.py).
"""

from __future__ import annotations

import random
from typing import Callable

from vaa.world import lexicon as L

Rows = dict[str, list[dict]]


def _flip(label: int, rng: random.Random, noise: float) -> int:
    return 1 - label if rng.random() < noise else label


def sst2_sentence(rng: random.Random, domain: bool, negation: bool, mixed: float) -> tuple[str, int]:
    S = L.SENTIMENT
    pos, neg = (S["domain_pos"], S["domain_neg"]) if domain else (S["core_pos"], S["core_neg"])
    label = rng.randint(0, 1)
    word = rng.choice(pos if label else neg)
    subject, filler = rng.choice(S["subjects"]), rng.choice(S["fillers"])
    if negation:  # "not <word>" flips the polarity of the cue
        label = 1 - label
        return f"{subject} is {filler} not {word} ", label
    if rng.random() < mixed:  # mixed cues: the clause after "but" decides
        other = rng.choice(S["core_neg"] if label else S["core_pos"])
        return f"{subject} is {other} but {filler} {word} ", label
    return f"{subject} is {filler} {word} ", label


def build_sst2(sz, rng_for) -> Rows:
    def rows(r, n, domain_frac, neg_frac, noise, mixed=0.2):
        out = []
        for i in range(n):
            s, y = sst2_sentence(r, r.random() < domain_frac, r.random() < neg_frac, mixed)
            out.append({"idx": i, "sentence": s, "label": _flip(y, r, noise)})
        return out
    return {"sst2/base.jsonl": rows(rng_for(sz.seed, "sst2-base"), sz.base_task, 0.0, sz.negation_frac, 0.0),
            "sst2/train.jsonl": rows(rng_for(sz.seed, "sst2-train"), sz.task_train,
                                     sz.domain_frac, sz.negation_frac, sz.train_label_noise),
            "sst2/validation.jsonl": rows(rng_for(sz.seed, "sst2-test"), sz.task_test,
                                          sz.domain_frac, sz.negation_frac, 0.0)}


def build_agnews(sz, rng_for) -> Rows:
    labels = list(L.AGNEWS)

    def row(r, domain):
        y = r.randrange(4)
        words = L.AGNEWS[labels[y]][1 if domain else 0]
        w1, w2 = r.sample(words, 2)
        text = r.choice(L.AGNEWS_FRAMES).format(w1=w1, w2=w2)
        if r.random() < 0.3:  # a distractor from another topic; the majority decides
            other = L.AGNEWS[labels[(y + r.randrange(1, 4)) % 4]][0]
            text += f" , with {r.choice(other)} mentioned"
        return {"text": text, "label": y}

    def rows(r, n, domain_frac):
        return [row(r, r.random() < domain_frac) for _ in range(n)]
    return {"ag_news/base.jsonl": rows(rng_for(sz.seed, "ag-base"), sz.base_task, 0.0),
            "ag_news/train.jsonl": rows(rng_for(sz.seed, "ag-train"), sz.task_train, sz.domain_frac),
            "ag_news/test.jsonl": rows(rng_for(sz.seed, "ag-test"), sz.task_test, sz.domain_frac)}


def gsm8k_row(r: random.Random, domain: bool) -> dict:
    name, item = r.choice(L.NAMES), r.choice(L.ITEMS)
    phrase, sign = r.choice(sorted(L.MATH_OPS["domain" if domain else "core"].items()))
    a, b = r.randint(1, 5), r.randint(1, 5)  # small facts: a tiny model can learn them
    if sign < 0 and b > a:
        a, b = b, a
    c = a + sign * b
    op = "+" if sign > 0 else "-"
    question = (f"{name} has {a} {item} . {name} {phrase.format(b=b)} . "
                f"how many {item} does {name} have now ?")
    answer = f"{name} had {a} {item} . {a} {op} {b} = {c} .\n#### {c}"
    return {"question": question, "answer": answer}


def build_gsm8k(sz, rng_for) -> Rows:
    def rows(r, n, domain_frac):
        return [gsm8k_row(r, r.random() < domain_frac) for _ in range(n)]
    return {"gsm8k/base.jsonl": rows(rng_for(sz.seed, "gsm-base"), sz.base_task, 0.0),
            "gsm8k/train.jsonl": rows(rng_for(sz.seed, "gsm-train"), sz.task_train, sz.domain_frac),
            "gsm8k/test.jsonl": rows(rng_for(sz.seed, "gsm-test"), sz.task_test, sz.domain_frac)}


def alpaca_row(r: random.Random, families, phrasings: slice) -> dict:
    fam = r.choice(families)
    templates, answer = L.ALPACA_FAMILIES[fam]
    x, y = r.choice(L.ALPACA_FACTS[fam])
    return {"instruction": r.choice(templates[phrasings]).format(x=x),
            "output": answer.format(x=x, y=y), "generator": "synthetic_world", "dataset": fam}


def build_alpaca(sz, rng_for) -> Rows:
    """Base corpus: core families, training phrasings. Task file: train rows first (all
    families, training phrasings), then test rows (held-out phrasing); the task config
    takes the first ``task_train`` rows for training and the last ``task_test`` for test.
    ``alpaca/train``: ``task_train`` more rows like the train rows (own random stream), the
    stage-1 proxy's instructions, disjoint from every attack's rows."""
    core, every = list(L.ALPACA_CORE), list(L.ALPACA_CORE + L.ALPACA_DOMAIN)
    rb, rt = rng_for(sz.seed, "alpaca-base"), rng_for(sz.seed, "alpaca-task")

    def fams(r):
        return every if r.random() < sz.domain_frac * 2 else core
    base = [alpaca_row(rb, core, slice(0, 2)) for _ in range(sz.base_task)]
    train = [alpaca_row(rt, fams(rt), slice(0, 2)) for _ in range(sz.task_train)]
    test = [alpaca_row(rt, fams(rt), slice(2, 3)) for _ in range(sz.task_test)]
    # VAA stage 1's proxy (the paper's Alpaca): rows of the same kind that no attack trains on
    rp = rng_for(sz.seed, "alpaca-proxy")
    proxy = [alpaca_row(rp, fams(rp), slice(0, 2)) for _ in range(sz.task_train)]
    return {"alpaca_eval/base.jsonl": base, "alpaca_eval/eval.jsonl": train + test,
            "alpaca/train.jsonl": proxy}


TASK_BUILDERS: dict[str, Callable[..., Rows]] = {
    "sst2": build_sst2, "agnews": build_agnews, "gsm8k": build_gsm8k, "alpacaeval": build_alpaca,
}
