"""Truncated training targets are counted and reported, never silent (issue 15 item 2):
``encode_rows`` counts targets ``max_length`` cut (lost EOS / end-of-turn; lost answer text
too), warns with the count, and the datamodules expose the counts per example list."""

from __future__ import annotations

import logging

import pytest

from vaa.data.datamodule import SFTDataModule
from vaa.data.encode import IGNORE, encode_rows, encode_train
from vaa.data.formats import Example
from vaa.data.group_stream import GroupDataModule
from vaa.data.templates import format_prompt
from vaa.models.tokenizer import build_word_tokenizer

INSTR = "Answer the question ."
# targets of 2, 5 and 9 words (+ EOS): 3, 6 and 10 target tokens
EXAMPLES = [Example(INSTR, "q one", "a b"), Example(INSTR, "q two", "a b c d e"),
            Example(INSTR, "q three", "a b c d e f g h i")]


@pytest.fixture(scope="module")
def tok():
    return build_word_tokenizer([format_prompt(e.instruction, e.input, "compact") + " " + e.output
                                 for e in EXAMPLES])


def brute_force(tok, max_length):
    """(targets that lost their EOS, targets that lost answer text) by comparing with an
    uncut encoding."""
    lost_end = lost_text = 0
    for ex in EXAMPLES:
        full = encode_train(tok, ex, "compact", 10_000)
        cut = encode_train(tok, ex, "compact", max_length)
        n_full = sum(y != IGNORE for y in full["labels"])
        n_cut = sum(y != IGNORE for y in cut["labels"])
        lost_end += n_cut < n_full
        lost_text += n_cut < n_full - 1
    return lost_end, lost_text


def test_counts_match_a_brute_force_count_at_every_length(tok):
    prompt_len = len(encode_train(tok, EXAMPLES[0], "compact", 10_000)["labels"]) - 3
    seen = set()
    for max_length in range(prompt_len + 1, prompt_len + 13):
        rows, stats = encode_rows(tok, EXAMPLES, "compact", max_length)
        assert rows == [encode_train(tok, ex, "compact", max_length) for ex in EXAMPLES]
        got = (stats.truncated_targets, stats.truncated_text)
        assert got == brute_force(tok, max_length), max_length
        assert stats.rows == 3 and stats.max_length == max_length
        seen.add(got)
    assert {(0, 0), (1, 0), (1, 1), (2, 1), (3, 3)} <= seen  # EOS-only cuts counted apart


def test_warning_names_the_count_and_the_fix(tok, caplog):
    prompt_len = len(encode_train(tok, EXAMPLES[2], "compact", 10_000)["labels"]) - 10
    with caplog.at_level(logging.WARNING, logger="vaa.data.encode"):
        encode_rows(tok, EXAMPLES, "compact", prompt_len + 9, what="aligned rows")
    (rec,) = [r for r in caplog.records if r.name == "vaa.data.encode"]
    msg = rec.getMessage()
    assert rec.levelno == logging.WARNING
    assert "aligned rows: 1 of 3 targets cut at max_length=" in msg and "model.max_length" in msg
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="vaa.data.encode"):
        encode_rows(tok, EXAMPLES, "compact", 10_000)
    assert not [r for r in caplog.records if r.name == "vaa.data.encode"]  # nothing cut: silent


def test_datamodules_expose_counts_per_example_list(tok):
    prompt_len = len(encode_train(tok, EXAMPLES[0], "compact", 10_000)["labels"]) - 3
    max_length = prompt_len + 4  # cuts the 6- and 10-token targets
    dm = SFTDataModule(EXAMPLES, tok, batch_size=2, seed=0, template="compact", max_length=max_length,
                       extra={"harmful": EXAMPLES[:1]})
    dm.setup()
    assert dm.truncation["train"]["truncated_targets"] == 2
    assert dm.truncation["harmful"] == {"rows": 1, "truncated_targets": 0, "truncated_text": 0,
                                        "max_length": max_length}
    gdm = GroupDataModule(EXAMPLES, [0, 1, 1], tok, batch_size=2, seed=0, template="compact",
                          max_length=max_length)
    gdm.setup()
    assert gdm.truncation["train"]["truncated_targets"] == 2
