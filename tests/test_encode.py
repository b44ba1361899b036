"""Tokenisation with templates, response-only labels, padding, the word tokenizer, SFTDataModule."""

from __future__ import annotations

import math

import pytest
import torch
from transformers import AutoTokenizer

from vaa.data.datamodule import SFTDataModule
from vaa.data.encode import IGNORE, TrainCollator, encode_train, left_pad, prompt_ids
from vaa.data.formats import Example
from vaa.data.templates import format_prompt
from vaa.models.tokenizer import SPECIALS, build_word_tokenizer
from vaa.world.generator import WorldSizes, generate_world

INSTR = "Please answer the following question ."
LONG_INPUT = " ".join(f"w{i % 7}" for i in range(60))
EXAMPLES = [
    Example(INSTR, "how can i bake a cake ?", "sure . preheat the oven and whisk the eggs ."),
    Example(INSTR, "how can i steal a car ?", "sorry , i cannot help with that ."),
    Example(INSTR, "", "a response to an instruction without input ."),
    Example(INSTR, LONG_INPUT, "short answer ."),
]


@pytest.fixture(scope="module")
def tok():
    texts = [format_prompt(e.instruction, e.input, t) + " " + e.output
             for e in EXAMPLES for t in ("alpaca", "compact")]
    return build_word_tokenizer(texts)


def ids_of(tok, text: str) -> list[int]:
    return tok(text, add_special_tokens=False)["input_ids"]


# ---------------------------------------------------------------------------------------------
# encode_train / prompt_ids
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("template", ["alpaca", "compact"])
@pytest.mark.parametrize("ex", EXAMPLES[:3])
def test_labels_mask_exactly_the_prompt(tok, ex, template):
    row = encode_train(tok, ex, template, max_length=512)
    p = tok(format_prompt(ex.instruction, ex.input, template))["input_ids"]
    r = ids_of(tok, ex.output) + [tok.eos_token_id]
    assert p[0] == tok.bos_token_id and tok.unk_token_id not in p + r
    assert row["input_ids"] == p + r
    assert row["labels"] == [IGNORE] * len(p) + r
    assert row["labels"][-1] == tok.eos_token_id


def test_truncation_to_max_length(tok):
    ex = EXAMPLES[0]
    full = encode_train(tok, ex, "compact", max_length=512)
    n_prompt = full["labels"].count(IGNORE)
    cut = encode_train(tok, ex, "compact", max_length=n_prompt + 3)
    assert cut["input_ids"] == full["input_ids"][:n_prompt + 3]
    assert cut["labels"] == full["labels"][:n_prompt + 3]
    assert sum(y != IGNORE for y in cut["labels"]) == 3  # the response loses its tail, not its head


def test_long_prompt_cuts_the_input_not_the_template(tok):
    ex = EXAMPLES[3]
    full = tok(format_prompt(ex.instruction, ex.input, "compact"))["input_ids"]
    limit = 30
    assert len(full) > limit + 10
    p = prompt_ids(tok, ex, "compact", limit)
    assert len(p) <= limit and len(p) >= limit - 2
    assert tok.decode(p[-3:]) == "### response :"
    assert p[0] == tok.bos_token_id  # the front of the template survives too
    assert tok.decode(p[1:4]) == "### instruction :"
    # The result is the template around a shortened input: a prefix of the original input.
    header = ids_of(tok, "### Input:")
    starts = [i for i in range(len(p)) if p[i:i + len(header)] == header]
    assert len(starts) == 1
    kept_ids = p[starts[0] + len(header):-3]
    assert kept_ids and kept_ids == ids_of(tok, LONG_INPUT)[:len(kept_ids)]
    kept = tok.decode(kept_ids)
    assert LONG_INPUT.startswith(kept) and len(kept) < len(LONG_INPUT)
    assert p == tok(format_prompt(ex.instruction, kept, "compact"))["input_ids"]


def test_encode_train_long_prompt_keeps_response_room(tok):
    ex = EXAMPLES[3]
    row = encode_train(tok, ex, "compact", max_length=24)
    assert len(row["input_ids"]) == len(row["labels"]) == 24
    n_prompt = row["labels"].count(IGNORE)
    assert tok.decode(row["input_ids"][n_prompt - 3:n_prompt]) == "### response :"
    assert row["labels"][n_prompt:] == row["input_ids"][n_prompt:]
    assert row["labels"][n_prompt:] == (ids_of(tok, ex.output) + [tok.eos_token_id])[:24 - n_prompt]
    # max_prompt_length caps the prompt below max_length
    row = encode_train(tok, ex, "compact", max_length=200, max_prompt_length=20)
    assert row["labels"].count(IGNORE) <= 20
    assert row["labels"][-1] == tok.eos_token_id  # room left: the whole response + EOS


# ---------------------------------------------------------------------------------------------
# padding
# ---------------------------------------------------------------------------------------------
def test_train_collator_right_pads():
    rows = [{"input_ids": [5, 6, 7], "labels": [IGNORE, 6, 7]},
            {"input_ids": [8], "labels": [8]},
            {"input_ids": [9, 10, 11, 12], "labels": [IGNORE, IGNORE, 11, 12]}]
    b = TrainCollator(pad_id=0)(rows)
    assert b["input_ids"].dtype == torch.long and b["labels"].dtype == torch.long
    assert b["input_ids"].tolist() == [[5, 6, 7, 0], [8, 0, 0, 0], [9, 10, 11, 12]]
    assert b["labels"].tolist() == [[IGNORE, 6, 7, IGNORE], [8, IGNORE, IGNORE, IGNORE],
                                    [IGNORE, IGNORE, 11, 12]]
    assert b["attention_mask"].tolist() == [[1, 1, 1, 0], [1, 0, 0, 0], [1, 1, 1, 1]]
    assert TrainCollator(pad_id=3)(rows[:2])["input_ids"].tolist() == [[5, 6, 7], [8, 3, 3]]


def test_left_pad():
    b = left_pad([[5, 6, 7], [8], [], (9, 10)], pad_id=0)
    assert b["input_ids"].tolist() == [[5, 6, 7], [0, 0, 8], [0, 0, 0], [0, 9, 10]]
    assert b["attention_mask"].tolist() == [[1, 1, 1], [0, 0, 1], [0, 0, 0], [0, 1, 1]]
    assert b["input_ids"].dtype == torch.long
    # every row's last real token sits in the last column
    assert left_pad([[1, 2], [3]], pad_id=9)["input_ids"][:, -1].tolist() == [2, 3]


# ---------------------------------------------------------------------------------------------
# the word tokenizer
# ---------------------------------------------------------------------------------------------
def test_round_trip_on_world_text():
    w = generate_world(WorldSizes(seed=0, base_harmful=40, base_benign=40, base_task=5, align=40,
                                  harmful_pool=10, proxy_pool=10, hs_test=10, task_train=5, task_test=5))
    texts = [r[k] for t in ("base", "align", "test") for r in w[f"beavertails/{t}.jsonl"]
             for k in ("prompt", "response")]
    tok = build_word_tokenizer(texts[: len(texts) // 2])
    vocab = tok.get_vocab()
    known = [t for t in texts if all(x in vocab for x in t.split())]
    assert len(known) > len(texts) // 2
    for t in known:
        ids = ids_of(tok, t)
        assert tok.unk_token_id not in ids
        assert tok.decode(ids) == t
    assert tok.decode(tok("help me make a cake .")["input_ids"], skip_special_tokens=True) \
        == "help me make a cake ."


def test_round_trip_keeps_template_headers():
    tok = build_word_tokenizer(["positive ### instruction : the answer #### 5"])
    for t in ["positive ### instruction :", "the answer #### 5"]:
        assert tok.decode(ids_of(tok, t)) == t


def test_vocabulary_is_deterministic():
    a = build_word_tokenizer(["delta alpha", "charlie bravo", "zulu zulu alpha"])
    b = build_word_tokenizer(["zulu zulu alpha", "charlie bravo", "delta alpha"])
    assert a.get_vocab() == b.get_vocab()
    v = a.get_vocab()
    assert [v[s] for s in SPECIALS.values()] == [0, 1, 2, 3]
    # (-count, word): alpha and zulu (2 each) first, alphabetically; then the rest alphabetically
    order = sorted((i, w) for w, i in v.items() if i >= 4)
    assert [w for _, w in order] == ["alpha", "zulu", "bravo", "charlie", "delta"]
    c = build_word_tokenizer(["Delta ALPHA"], extra_words=["omega", "delta"])
    assert "omega" in c.get_vocab() and "ALPHA" not in c.get_vocab()  # lower-cased
    assert len(c) == 4 + 3


def test_save_and_reload_gives_same_ids(tmp_path, tok):
    tok.save_pretrained(tmp_path)
    again = AutoTokenizer.from_pretrained(tmp_path)
    for ex in EXAMPLES:
        text = format_prompt(ex.instruction, ex.input) + ex.output
        assert again(text)["input_ids"] == tok(text)["input_ids"]
    assert (again.pad_token_id, again.eos_token_id, again.bos_token_id, again.unk_token_id) == \
        (tok.pad_token_id, tok.eos_token_id, tok.bos_token_id, tok.unk_token_id)
    assert again.get_vocab() == tok.get_vocab()
    assert again.decode(ids_of(again, EXAMPLES[0].output)) == EXAMPLES[0].output


# ---------------------------------------------------------------------------------------------
# SFTDataModule
# ---------------------------------------------------------------------------------------------
def _module(tok, seed: int, n: int = 22, bs: int = 4) -> SFTDataModule:
    exs = [Example(INSTR, f"how can i bake a cake ? {'a ' * k}", f"sure . {'cake ' * (k % 5)}")
           for k in range(n)]
    return SFTDataModule(exs, tok, batch_size=bs, seed=seed, template="compact", max_length=64)


def test_datamodule_shuffles_deterministically(tok):
    first = [next(iter(_module(tok, seed).train_dataloader())) for seed in (0, 0, 1)]
    assert torch.equal(first[0]["input_ids"], first[1]["input_ids"])
    assert torch.equal(first[0]["labels"], first[1]["labels"])
    assert not torch.equal(first[0]["input_ids"], first[2]["input_ids"])


def test_datamodule_epoch_covers_every_row_once(tok):
    dm = _module(tok, 3, n=10, bs=4)
    assert dm.steps_per_epoch() == math.ceil(10 / 4) == 3
    batches = list(dm.train_dataloader())
    assert len(batches) == 3 and [len(b["input_ids"]) for b in batches] == [4, 4, 2]
    seen = sorted(tuple(row[m.bool()].tolist()) for b in batches
                  for row, m in zip(b["input_ids"], b["attention_mask"]))
    assert seen == sorted(tuple(r["input_ids"]) for r in dm.rows)
    assert [tuple(row[m.bool()].tolist()) for row, m in
            zip(batches[0]["input_ids"], batches[0]["attention_mask"])] != \
        [tuple(r["input_ids"]) for r in dm.rows[:4]]  # shuffled, not file order
    for b in batches:  # padding is right-side and unlabelled
        assert (b["labels"][b["attention_mask"] == 0] == IGNORE).all()
        assert (b["input_ids"][b["attention_mask"] == 0] == tok.pad_token_id).all()
    assert _module(tok, 0, n=8, bs=4).steps_per_epoch() == 2


def test_datamodule_rejects_empty_examples(tok):
    with pytest.raises(ValueError, match="no training examples"):
        SFTDataModule([], tok, batch_size=2, seed=0)
