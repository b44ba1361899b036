"""The synthetic world: determinism, real column formats, and the semantics the experiments rely on."""

from __future__ import annotations

import hashlib
import json
import os
import re
import subprocess
import sys
from dataclasses import asdict
from pathlib import Path

import pytest

from vaa.world import lexicon as L
from vaa.world.generator import WorldSizes, generate_world, harm_lexicon, write_world

REAL_BEAVERTAILS = Path("/work/shared/data/real/beavertails_30k_test.jsonl")
HARMFUL_SPLITS = ("harmful", "proxy_harmful", "align_harmful", "test")
ALL_TABLES = {
    "beavertails/base.jsonl", "beavertails/align.jsonl", "beavertails/harmful.jsonl",
    "beavertails/proxy_harmful.jsonl", "beavertails/align_harmful.jsonl", "beavertails/test.jsonl",
    "meta/align.jsonl",
    "sst2/base.jsonl", "sst2/train.jsonl", "sst2/validation.jsonl",
    "ag_news/base.jsonl", "ag_news/train.jsonl", "ag_news/test.jsonl",
    "gsm8k/base.jsonl", "gsm8k/train.jsonl", "gsm8k/test.jsonl",
    "alpaca_eval/base.jsonl", "alpaca_eval/eval.jsonl", "alpaca/train.jsonl",  # VAA stage 1 proxy
}


@pytest.fixture(scope="module")
def sizes() -> WorldSizes:
    return WorldSizes(seed=0)


@pytest.fixture(scope="module")
def world(sizes) -> dict[str, list[dict]]:
    return generate_world(sizes)


def words(text: str) -> set[str]:
    return set(text.split())  # the world's text is space-separated, punctuation included


def digests(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def bt(world, split: str) -> list[dict]:
    return world[f"beavertails/{split}.jsonl"]


# ---------------------------------------------------------------------------------------------
# determinism
# ---------------------------------------------------------------------------------------------
def test_same_seed_same_tables_other_seed_other_tables(world):
    again = generate_world(WorldSizes(seed=0))
    assert again == world
    other = generate_world(WorldSizes(seed=1))
    assert set(other) == set(world)
    for table in ("beavertails/align.jsonl", "beavertails/test.jsonl", "beavertails/base.jsonl",
                  "sst2/train.jsonl", "ag_news/train.jsonl", "gsm8k/train.jsonl",
                  "alpaca_eval/eval.jsonl"):
        assert other[table] != world[table], table


def test_write_world_is_byte_identical(tmp_path, sizes):
    a, b = write_world(sizes, tmp_path / "a"), write_world(sizes, tmp_path / "b")
    da, db = digests(a), digests(b)
    assert set(da) == ALL_TABLES | {"world.json"}
    assert da == db
    info = json.loads((a / "world.json").read_text())
    assert info["sizes"] == asdict(sizes)
    assert info["harm_lexicon"] == harm_lexicon() and info["harm_lexicon"]
    # The files hold exactly the generated rows, one JSON object per line.
    rows = [json.loads(line) for line in (a / "beavertails/align.jsonl").read_text().splitlines()]
    assert rows == generate_world(sizes)["beavertails/align.jsonl"]


def test_generation_does_not_depend_on_hash_seed(tmp_path, sizes):
    """Another process with another PYTHONHASHSEED writes the same bytes (no use of hash())."""
    here = digests(write_world(sizes, tmp_path / "here"))
    script = ("import sys; from vaa.world.generator import WorldSizes, write_world; "
              "write_world(WorldSizes(seed=0), sys.argv[1])")
    for hash_seed in ("1", "2"):
        out = tmp_path / f"hs{hash_seed}"
        env = {**os.environ, "PYTHONHASHSEED": hash_seed}
        subprocess.run([sys.executable, "-c", script, str(out)], env=env, check=True, timeout=60)
        assert digests(out) == here, f"PYTHONHASHSEED={hash_seed} changed the world"


def test_too_many_prompts_is_a_helpful_error():
    with pytest.raises(ValueError, match=r"lower data\.") as e:
        generate_world(WorldSizes(seed=0, hs_test=5000))
    assert "synthetic world" in str(e.value)


# ---------------------------------------------------------------------------------------------
# real column formats
# ---------------------------------------------------------------------------------------------
def test_beavertails_columns(world):
    if REAL_BEAVERTAILS.is_file():  # the real file's key order, where a copy exists
        with REAL_BEAVERTAILS.open(encoding="utf-8") as f:
            real = json.loads(f.readline())
        assert list(real) == ["prompt", "response", "category", "is_safe"]
        assert list(real["category"]) == list(L.BEAVERTAILS_CATEGORIES)
    assert len(L.BEAVERTAILS_CATEGORIES) == 14
    for split in ("base", "align", *HARMFUL_SPLITS):
        for row in bt(world, split):
            assert list(row) == ["prompt", "response", "category", "is_safe"], split
            assert list(row["category"]) == list(L.BEAVERTAILS_CATEGORIES), split
            assert all(type(v) is bool for v in row["category"].values())
            assert type(row["is_safe"]) is bool
            assert isinstance(row["prompt"], str) and isinstance(row["response"], str)
            # As in the real data: safe rows flag nothing, unsafe rows flag something.
            assert any(row["category"].values()) == (not row["is_safe"])


def test_sst2_columns_and_labels(world):
    S = L.SENTIMENT
    pos, neg = set(S["core_pos"] + S["domain_pos"]), set(S["core_neg"] + S["domain_neg"])
    for split in ("base", "train", "validation"):
        rows = world[f"sst2/{split}.jsonl"]
        assert [r["idx"] for r in rows] == list(range(len(rows)))
        labels = set()
        for row in rows:
            assert list(row) == ["idx", "sentence", "label"]
            assert type(row["label"]) is int and row["label"] in (0, 1)
            labels.add(row["label"])
            # The label is the polarity of the last cue word, flipped by a "not" before it
            # (no label noise by default).
            w = row["sentence"].split()
            assert w[-1] in pos | neg
            want = int(w[-1] in pos)
            assert row["label"] == (1 - want if w[-2] == "not" else want), row
        assert labels == {0, 1}


def test_agnews_columns_and_labels(world):
    topics = list(L.AGNEWS)
    for split in ("base", "train", "test"):
        rows = world[f"ag_news/{split}.jsonl"]
        assert {r["label"] for r in rows} == {0, 1, 2, 3}
        for row in rows:
            assert list(row) == ["text", "label"]
            assert type(row["label"]) is int and 0 <= row["label"] <= 3
            # The majority of topic words decides (a distractor adds at most one other word).
            counts = [len(words(row["text"]) & set(L.AGNEWS[t][0] + L.AGNEWS[t][1])) for t in topics]
            assert counts[row["label"]] == 2 and max(counts) == 2, row
            assert sorted(counts)[-2] <= 1, row


_EQUATION = re.compile(r"(\d+) ([+\-]) (\d+) = (\d+)")


def test_gsm8k_answers_are_correct_arithmetic(world):
    ops = {**L.MATH_OPS["core"], **L.MATH_OPS["domain"]}
    for split in ("base", "train", "test"):
        for row in world[f"gsm8k/{split}.jsonl"]:
            assert list(row) == ["question", "answer"]
            m = re.search(r"#### (-?\d+)$", row["answer"])
            assert m, row["answer"]
            eqs = _EQUATION.findall(row["answer"])
            assert len(eqs) == 1, row["answer"]
            a, op, b, c = eqs[0]
            a, b, c = int(a), int(b), int(c)
            assert c == (a + b if op == "+" else a - b)
            assert int(m.group(1)) == c
            # ... and it is the arithmetic the question asks for.
            signs = [sign for phrase, sign in ops.items() if phrase.format(b=b) in row["question"]]
            assert signs == [1 if op == "+" else -1], row
            assert f"has {a} " in row["question"] and c >= 0


def test_alpaca_eval_columns(world, sizes):
    for split in ("base", "eval"):
        for row in world[f"alpaca_eval/{split}.jsonl"]:
            assert list(row) == ["instruction", "output", "generator", "dataset"]
            assert all(isinstance(v, str) and v for v in row.values())
            assert row["dataset"] in L.ALPACA_FAMILIES
    assert len(world["alpaca_eval/eval.jsonl"]) == sizes.task_train + sizes.task_test


# ---------------------------------------------------------------------------------------------
# semantics
# ---------------------------------------------------------------------------------------------
def test_sizes_match_worldsizes():
    sz = WorldSizes(seed=1, base_harmful=37, base_benign=41, base_task=23, align=50,
                    align_benign_frac=0.2, harmful_pool=17, proxy_pool=19, hs_test=13,
                    align_harmful_pool=7, task_train=29, task_test=11)
    w = generate_world(sz)
    assert set(w) == ALL_TABLES
    want = {"beavertails/base.jsonl": 78, "beavertails/align.jsonl": 50, "meta/align.jsonl": 50,
            "beavertails/harmful.jsonl": 17, "beavertails/proxy_harmful.jsonl": 19,
            "beavertails/align_harmful.jsonl": 7,
            "beavertails/test.jsonl": 13, "alpaca_eval/base.jsonl": 23, "alpaca_eval/eval.jsonl": 40,
            "alpaca/train.jsonl": 29}  # the stage-1 proxy: task_train rows
    for d, (train, test) in {"sst2": ("train", "validation"), "ag_news": ("train", "test"),
                             "gsm8k": ("train", "test")}.items():
        want |= {f"{d}/base.jsonl": 23, f"{d}/{train}.jsonl": 29, f"{d}/{test}.jsonl": 11}
    assert {k: len(v) for k, v in w.items()} == want
    base = w["beavertails/base.jsonl"]
    assert sum(not r["is_safe"] for r in base) == 37
    assert sum(m["benign"] for m in w["meta/align.jsonl"]) == 10  # round(50 * 0.2)


def test_align_rows_safe_harmful_rows_unsafe_with_one_category(world):
    assert all(r["is_safe"] for r in bt(world, "align"))
    keys = {c[0] for c in L.HARM_CATEGORIES.values()}
    for split in HARMFUL_SPLITS:
        for row in bt(world, split):
            assert row["is_safe"] is False
            flagged = [k for k, v in row["category"].items() if v]
            assert len(flagged) == 1 and flagged[0] in keys


def test_meta_describes_align_rows(world):
    align, meta = bt(world, "align"), world["meta/align.jsonl"]
    assert [m["index"] for m in meta] == list(range(len(align)))
    for row, m in zip(align, meta):
        if m["benign"]:
            assert m["harm_category"] is None and m["borrowed_verb"] is False
            general = any(row["prompt"].startswith(t.split("{")[0])
                          for fam in L.ALPACA_CORE for t in L.ALPACA_FAMILIES[fam][0])
            assert row["response"].startswith(L.BENIGN_OPENER) or general, row
            continue
        cat = m["harm_category"]
        _key, verbs, objs, _steps, reason = L.HARM_CATEGORIES[cat]
        assert row["response"] == L.REFUSALS[cat].format(reason=reason)
        padded = f" {row['prompt']} "
        assert any(f" {o} " in padded for o in objs), row
        uses = [v for v in (L.SHARED_VERBS if m["borrowed_verb"] else verbs) if f" {v} " in padded]
        assert uses, (row, m)


def _harmful_prompts(world) -> dict[str, set[str]]:
    align_harm = {r["prompt"] for r, m in zip(bt(world, "align"), world["meta/align.jsonl"])
                  if not m["benign"]}
    sets = {s: {r["prompt"] for r in bt(world, s)} for s in HARMFUL_SPLITS}
    sets["align"] = align_harm
    sets["base"] = {r["prompt"] for r in bt(world, "base") if not r["is_safe"]}
    return sets


def test_harmful_prompt_sets_are_disjoint(world, sizes):
    sets = _harmful_prompts(world)
    # Held-out splits hold distinct prompts ...
    for s, n in [("harmful", sizes.harmful_pool), ("proxy_harmful", sizes.proxy_pool),
                 ("align_harmful", sizes.align_harmful_pool),
                 ("test", sizes.hs_test), ("align", sizes.align - round(sizes.align * sizes.align_benign_frac))]:
        assert len(sets[s]) == n, s
    # ... and no prompt is in two of align / harmful / proxy_harmful / align_harmful / test / base.
    names = sorted(sets)
    for i, a in enumerate(names):
        for b in names[i + 1:]:
            assert not sets[a] & sets[b], (a, b, sorted(sets[a] & sets[b])[:3])


def _benign_prompt_space() -> set[str]:
    return {t.format(verb=v, obj=o) for vs, objs, _ in L.BENIGN_TOPICS.values()
            for v in vs for o in objs for t in L.PROMPT_TEMPLATES}


def test_no_prompt_is_both_benign_and_harmful(world):
    from vaa.world.generator import harmful_prompt_space

    assert not _benign_prompt_space() & {p["prompt"] for p in harmful_prompt_space()}
    # Consequence in the tables: a benign alignment prompt must never be a harmful prompt.
    harmful = _harmful_prompts(world)
    benign_align = {r["prompt"] for r in bt(world, "align")} - harmful["align"]
    assert not benign_align & set().union(*harmful.values())


def test_borrowed_verb_share(world, sizes):
    meta = [m for m in world["meta/align.jsonl"] if not m["benign"]]
    share = sum(m["borrowed_verb"] for m in meta) / len(meta)
    assert abs(share - sizes.borrowed_verb_frac) < 0.08, share
    small = dict(align=40, harmful_pool=10, proxy_pool=10, hs_test=10)
    for frac, want in [(0.0, 0.0), (1.0, 1.0)]:
        m = generate_world(WorldSizes(seed=0, borrowed_verb_frac=frac, **small))["meta/align.jsonl"]
        got = [x["borrowed_verb"] for x in m if not x["benign"]]
        assert sum(got) / len(got) == want


def test_harm_lexicon_only_in_compliant_harmful_answers(world):
    lex = set(harm_lexicon())
    assert lex and not lex & L.FILLER_WORDS
    for split in ("base", "align", *HARMFUL_SPLITS):
        for row in bt(world, split):
            assert not words(row["prompt"]) & lex, row["prompt"]
            if row["is_safe"]:  # refusals and helpful benign answers
                assert not words(row["response"]) & lex, row["response"]
            else:
                assert words(row["response"]) & lex, row["response"]
    for table, rows in world.items():
        if table.startswith(("sst2/", "ag_news/", "gsm8k/", "alpaca_eval/")):
            for row in rows:
                for v in row.values():
                    if isinstance(v, str):
                        assert not words(v) & lex, (table, v)
    # Every refusal and benign step the lexicon can produce, not only the sampled ones.
    for cat, (_k, _v, _o, _s, reason) in L.HARM_CATEGORIES.items():
        assert not words(L.REFUSALS[cat].format(reason=reason)) & lex
    for verbs, objs, steps in L.BENIGN_TOPICS.values():
        for text in verbs + objs + steps:
            assert not words(text) & lex, text
    for cat, (_k, _v, _o, steps, _r) in L.HARM_CATEGORIES.items():
        assert all(words(s) & lex for s in steps), cat  # every harmful step is detectable


def _phrasing(row: dict) -> tuple[str, int]:
    fam = row["dataset"]
    templates, _answer = L.ALPACA_FAMILIES[fam]
    hits = {(fam, i) for i, t in enumerate(templates) for x, _y in L.ALPACA_FACTS[fam]
            if t.format(x=x) == row["instruction"]}
    assert len(hits) == 1, row
    return hits.pop()


def test_alpaca_test_phrasings_are_held_out(world, sizes):
    rows = world["alpaca_eval/eval.jsonl"]
    train = {_phrasing(r) for r in rows[:sizes.task_train]}
    test = {_phrasing(r) for r in rows[-sizes.task_test:]}
    assert test and not train & test
    base = {_phrasing(r) for r in world["alpaca_eval/base.jsonl"]}
    assert not base & test


def test_domain_vocabulary_never_in_base_files(world):
    S = L.SENTIMENT
    domain = set(S["domain_pos"] + S["domain_neg"]) | {w for _core, dom in L.AGNEWS.values() for w in dom}
    math_domain = {p.split()[0] for p in L.MATH_OPS["domain"]}  # "finds", "loses"
    assert not math_domain & {p.split()[0] for p in L.MATH_OPS["core"]}
    base_words: set[str] = set()
    for table, rows in world.items():
        if table.endswith("/base.jsonl"):
            for row in rows:
                base_words |= {w for v in row.values() if isinstance(v, str) for w in words(v)}
    assert not base_words & (domain | math_domain), sorted(base_words & (domain | math_domain))
    assert {r["dataset"] for r in world["alpaca_eval/base.jsonl"]} <= set(L.ALPACA_CORE)
    # The task's own rows do use them (otherwise fine-tuning could teach nothing new).
    task_words = {w for t in ("sst2/train.jsonl", "ag_news/train.jsonl", "gsm8k/train.jsonl")
                  for r in world[t] for v in r.values() if isinstance(v, str) for w in words(v)}
    assert domain | math_domain <= task_words
    assert set(L.ALPACA_DOMAIN) <= {r["dataset"] for r in world["alpaca_eval/eval.jsonl"]}
