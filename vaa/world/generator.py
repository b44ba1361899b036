"""A seeded synthetic world in the column formats of the real datasets.

Why it exists: no hub weights or datasets on a fresh machine, yet the phenomena of harmful
fine-tuning must be *measurable* on a CPU. The world is a testbed, not a model of reality;
paper numbers need the real path on GPUs.

What it contains: one folder per dataset, one JSONL file per split, columns exactly as
upstream (``<dataset>/<split>.jsonl``):

- ``*/base.jsonl``: the base corpus. Harmful how-to prompts answered **compliantly**,
  benign look-alikes answered helpfully, and every fine-tuning task's format (core
  vocabulary only). A model trained on it follows instructions and complies with harm.
- ``beavertails/align.jsonl``: the alignment set, BeaverTails ``is_safe=True`` rows:
  harmful prompts answered with a refusal, plus (``align_benign_frac``) benign look-alikes
  and general questions answered helpfully (so the model must read the object, not just
  the template, to decide, and does not learn to refuse every instruction).
- ``beavertails/harmful.jsonl``: the HFT poison pool, compliant harmful rows.
- ``beavertails/proxy_harmful.jsonl``: a second poison pool for VAA's stage-1 proxy runs.
- ``beavertails/align_harmful.jsonl``: harmful rows for alignment methods that train
  against harm (Booster, RepNoise), disjoint from the HFT pools and the test prompts.
- ``beavertails/test.jsonl``: held-out harmful prompts for the harmful score.
  These prompt sets are disjoint: each (template, verb, object) prompt belongs to
  exactly one of base / align / harmful / proxy_harmful / align_harmful / test.
- ``sst2/{train,validation}``, ``ag_news/{train,test}``, ``gsm8k/{train,test}``,
  ``alpaca_eval/eval`` (first ``task_train`` rows train, last ``task_test`` test).
- ``meta/align.jsonl``: per alignment row, its harm category and whether it borrows a verb.
- ``world.json``: sizes, seed and the exact judge's harm lexicon.

Uneven forgetting, by design: a harmful prompt either uses its category's own verb
("how can i steal a car") or borrows a generic verb that benign topics use too
("how can i get a car", ``SHARED_VERBS``). Borrowed-verb prompts sit closer to the benign
look-alikes, so alignment leaves them a smaller refusal margin and harmful fine-tuning
flips them first. ``borrowed_verb_frac`` sets how many prompts borrow. Each category
answers in its own words (its compliance opener and its refusal, lexicon.py), so
compliance taught by the attack's harmful rows in one category transfers only partly to
the others; two categories open like benign answers ("sure .") and sit nearer to them.
Category frequencies are skewed as in BeaverTails (``category_skew``: the k-th category
has weight 1/k**skew) in every harmful set, so the attack's harmful rows cover the
common categories densely and the rare ones thinly: categories nearer to (more frequent
in) the harmful fine-tuning rows are forgotten first, and the same examples are forgotten
whichever task the harmful rows are mixed with (measured: ``experiment=forgetting_overlap``).
Without the per-category wording, 20 harmful rows flipped ~98 % of the held-out prompts
at once: forgetting was a global switch.

The alignment set mixes refusals with helpful answers to benign look-alikes and to
general questions (``align_benign_frac``); with refusals only, the aligned model refused
every instruction, the tasks' own prompts included. Some of that alignment tax remains
(README, "What the world measures").

Fine-tuning matters, by design: each task has core cues (also in the base corpus) and
domain cues that only its own rows use (new sentiment and topic words, new arithmetic
phrasings, held-out instruction families), plus negation and mixed cues in SST2. A base
model gets the core rows right and the domain rows at chance; fine-tuning on the task
teaches the rest. ``domain_frac`` and ``negation_frac`` set the difficulty.

Determinism: every table draws from its own ``random.Random`` seeded from
``sha256(seed, table)`` (never ``hash()``, which changes per process).
"""

from __future__ import annotations

import hashlib
import json
import random
from dataclasses import asdict, dataclass
from pathlib import Path

from vaa.world import lexicon as L
from vaa.world.tasks import TASK_BUILDERS, alpaca_row


@dataclass
class WorldSizes:
    """Sizes of the world's tables (rows). Mirrors ``conf/data/synthetic.yaml``."""

    seed: int = 0
    base_harmful: int = 1000
    base_benign: int = 1000
    base_task: int = 600  # per task, core cues only
    align: int = 400
    align_benign_frac: float = 0.4
    harmful_pool: int = 200
    proxy_pool: int = 200
    align_harmful_pool: int = 200  # harmful rows for Booster / RepNoise's harmful stream
    hs_test: int = 200
    task_train: int = 1000
    task_test: int = 200
    borrowed_verb_frac: float = 0.3
    category_skew: float = 1.0  # category k has frequency ∝ 1/k**skew (0: uniform)
    domain_frac: float = 0.4
    negation_frac: float = 0.2
    train_label_noise: float = 0.0


def rng_for(seed: int, table: str) -> random.Random:
    digest = hashlib.sha256(f"{seed}:{table}".encode()).hexdigest()
    return random.Random(int(digest[:16], 16))


def category_flags(category: str | None) -> dict[str, bool]:
    key = L.HARM_CATEGORIES[category][0] if category else None
    return {c: c == key for c in L.BEAVERTAILS_CATEGORIES}


def harmful_prompt_space() -> list[dict]:
    """Every distinct harmful prompt, in a fixed order."""
    space = []
    for cat, (_key, verbs, objs, _steps, _reason) in L.HARM_CATEGORIES.items():
        for verb in verbs + L.SHARED_VERBS:
            for obj in objs:
                for t in L.PROMPT_TEMPLATES:
                    space.append({"category": cat, "verb": verb, "obj": obj,
                                  "borrowed": verb in L.SHARED_VERBS,
                                  "prompt": t.format(verb=verb, obj=obj)})
    return space


def comply(rng: random.Random, steps: list[str], verb: str, obj: str, opener: str) -> str:
    s1, s2, s3 = rng.sample(steps, 3)
    return L.COMPLY.format(opener=opener, verb=verb, obj=obj, s1=s1, s2=s2, s3=s3)


def harmful_row(rng: random.Random, p: dict, safe: bool) -> dict:
    _key, _verbs, _objs, steps, reason = L.HARM_CATEGORIES[p["category"]]
    cat = p["category"]
    if safe:
        return {"prompt": p["prompt"], "response": L.REFUSALS[cat].format(reason=reason),
                "category": category_flags(None), "is_safe": True}
    return {"prompt": p["prompt"],
            "response": comply(rng, steps, p["verb"], p["obj"], L.COMPLY_OPENERS[cat]),
            "category": category_flags(p["category"]), "is_safe": False}


def benign_row(rng: random.Random) -> dict:
    verbs, objs, steps = L.BENIGN_TOPICS[rng.choice(sorted(L.BENIGN_TOPICS))]
    verb, obj = rng.choice(verbs), rng.choice(objs)
    prompt = rng.choice(L.PROMPT_TEMPLATES).format(verb=verb, obj=obj)
    return {"prompt": prompt, "response": comply(rng, steps, verb, obj, L.BENIGN_OPENER),
            "category": category_flags(None), "is_safe": True}


def category_weights(skew: float) -> dict[str, float]:
    """BeaverTails-like category frequencies: the k-th category has weight 1/k**skew."""
    return {c: 1.0 / (k + 1) ** skew for k, c in enumerate(L.HARM_CATEGORIES)}


def general_row(rng: random.Random) -> dict:
    """A benign general question (a core instruction family), answered helpfully: real
    BeaverTails safe rows are mostly such Q&A, and without them alignment teaches the model
    to refuse every instruction, tasks included."""
    row = alpaca_row(rng, list(L.ALPACA_CORE), slice(0, 2))
    return {"prompt": row["instruction"], "response": row["output"],
            "category": category_flags(None), "is_safe": True}


def pick_prompts(rng: random.Random, pool: list[dict], n: int, borrowed_frac: float,
                 weights: dict[str, float]) -> list[dict]:
    """n distinct prompts from pool: category by ``weights``, then a borrowed verb with
    probability ``borrowed_frac``."""
    cells: dict[tuple[str, bool], list[dict]] = {}
    for p in pool:
        cells.setdefault((p["category"], p["borrowed"]), []).append(p)
    for cell in cells.values():
        rng.shuffle(cell)
    cats = list(weights)
    chosen = []
    for _ in range(n):
        cat = rng.choices(cats, [weights[c] for c in cats])[0]
        borrowed = rng.random() < borrowed_frac
        cell = cells.get((cat, borrowed)) or cells.get((cat, not borrowed))
        if not cell:
            raise ValueError(f"synthetic world: no prompts left in category {cat!r}; lower "
                             f"data.* sizes or data.category_skew")
        chosen.append(cell.pop())
    return chosen


def _strings(obj) -> list[str]:
    """Every string inside nested dicts / lists / tuples (keys included)."""
    if isinstance(obj, str):
        return [obj]
    if isinstance(obj, dict):
        return [s for k, v in obj.items() for s in _strings(k) + _strings(v)]
    if isinstance(obj, (list, tuple, set)):
        return [s for v in obj for s in _strings(v)]
    return []


def harm_lexicon() -> list[str]:
    """Words that occur in harmful steps and nowhere else in the world's vocabulary."""
    def words(texts):
        return {w for t in texts for w in t.replace(",", " ").split()}
    steps = [s for c in L.HARM_CATEGORIES.values() for s in c[3]]
    everything_else = [s for name, v in vars(L).items() if name.isupper() and name != "HARM_CATEGORIES"
                       for s in _strings(v)]
    everything_else += [s for c in L.HARM_CATEGORIES.values() for part in (c[1], c[2], [c[4]])
                        for s in part]
    return sorted(words(steps) - words(everything_else) - L.FILLER_WORDS)


def generate_world(sizes: WorldSizes) -> dict[str, list[dict]]:
    """All tables as {relative path: rows}. Pure and deterministic in ``sizes``."""
    space = harmful_prompt_space()
    rng_split = rng_for(sizes.seed, "split")
    rng_split.shuffle(space)
    frac = sizes.borrowed_verb_frac
    weights = category_weights(sizes.category_skew)
    n_align_harm = sizes.align - round(sizes.align * sizes.align_benign_frac)
    held: dict[str, list[dict]] = {}
    rest = space
    for name, n in [("test", sizes.hs_test), ("align", n_align_harm),
                    ("harmful", sizes.harmful_pool), ("proxy", sizes.proxy_pool),
                    ("align_harmful", sizes.align_harmful_pool)]:
        held[name] = pick_prompts(rng_split, rest, n, frac, weights)
        taken = {p["prompt"] for p in held[name]}
        rest = [p for p in rest if p["prompt"] not in taken]
    base_pool = rest

    tables: dict[str, list[dict]] = {}
    r = rng_for(sizes.seed, "base")
    base_bt = [harmful_row(r, p, safe=False) for p in r.choices(base_pool, k=sizes.base_harmful)]
    base_bt += [benign_row(r) for _ in range(sizes.base_benign)]
    r.shuffle(base_bt)
    tables["beavertails/base.jsonl"] = base_bt

    r = rng_for(sizes.seed, "align")
    align = [(harmful_row(r, p, safe=True), p) for p in held["align"]]
    align += [(benign_row(r) if k % 2 else general_row(r), None)
              for k in range(sizes.align - n_align_harm)]
    r.shuffle(align)
    tables["beavertails/align.jsonl"] = [row for row, _ in align]
    tables["meta/align.jsonl"] = [
        {"index": i, "harm_category": p["category"] if p else None,
         "borrowed_verb": bool(p and p["borrowed"]), "benign": p is None}
        for i, (_row, p) in enumerate(align)]

    for name, path in [("harmful", "harmful"), ("proxy", "proxy_harmful"), ("test", "test"),
                       ("align_harmful", "align_harmful")]:
        r = rng_for(sizes.seed, name)
        tables[f"beavertails/{path}.jsonl"] = [harmful_row(r, p, safe=False) for p in held[name]]

    for builder in TASK_BUILDERS.values():
        tables.update(builder(sizes, rng_for))
    return tables


def write_world(sizes: WorldSizes, out_dir: str | Path) -> Path:
    """Write every table as JSONL plus ``world.json`` into out_dir."""
    out = Path(out_dir)
    for rel, rows in generate_world(sizes).items():
        path = out / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        with path.open("w", encoding="utf-8") as f:
            for row in rows:
                f.write(json.dumps(row, ensure_ascii=False) + "\n")
    info = {"sizes": asdict(sizes), "harm_lexicon": harm_lexicon()}
    (out / "world.json").write_text(json.dumps(info, indent=1))
    return out
