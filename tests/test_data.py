"""Reading data files, converting real column formats, folder sources and the HFT mix."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest

from vaa.data import templates as T
from vaa.data.datamodule import hft_mix
from vaa.data.formats import Example, to_examples
from vaa.data.io import read_rows
from vaa.data.sources import FolderSource
from vaa.world.lexicon import BEAVERTAILS_CATEGORIES


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def write_csv(path: Path, rows: list[dict]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", encoding="utf-8", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    return path


ROWS = [{"sentence": f"s{i} , with a comma ", "label": i % 2} for i in range(5)]


# ---------------------------------------------------------------------------------------------
# read_rows
# ---------------------------------------------------------------------------------------------
def test_read_jsonl_json_csv(tmp_path):
    assert read_rows(write_jsonl(tmp_path / "a.jsonl", ROWS)) == ROWS
    (tmp_path / "a.json").write_text(json.dumps(ROWS), encoding="utf-8")
    assert read_rows(tmp_path / "a.json") == ROWS
    got = read_rows(write_csv(tmp_path / "a.csv", ROWS))
    assert got == [{"sentence": r["sentence"], "label": str(r["label"])} for r in ROWS]


def test_read_jsonl_skips_blank_lines_and_slices(tmp_path):
    p = tmp_path / "a.jsonl"
    p.write_text(json.dumps(ROWS[0]) + "\n\n  \n" + "".join(json.dumps(r) + "\n" for r in ROWS[1:]))
    assert read_rows(p) == ROWS
    assert read_rows(p, 1, 3) == ROWS[1:3]
    assert read_rows(p, -2) == ROWS[-2:]  # the last two rows
    assert read_rows(p, 0, -1) == ROWS[:-1]
    assert read_rows(p, 10) == []


def test_missing_file_names_the_path(tmp_path):
    p = tmp_path / "nope" / "train.jsonl"
    with pytest.raises(FileNotFoundError, match="nope") as e:
        read_rows(p)
    assert str(p) in str(e.value)


@pytest.mark.parametrize("name", ["e.jsonl", "e.json", "e.csv"])
def test_empty_file(tmp_path, name):
    p = tmp_path / name
    p.write_text("")
    with pytest.raises(ValueError, match="empty") as e:
        read_rows(p)
    assert str(p) in str(e.value)


def test_invalid_json_line_names_line_number(tmp_path):
    p = tmp_path / "bad.jsonl"
    p.write_text(json.dumps(ROWS[0]) + "\n" + json.dumps(ROWS[1]) + "\n{not json\n")
    with pytest.raises(ValueError, match=r"line 3\b") as e:
        read_rows(p)
    assert str(p) in str(e.value)


def test_json_must_be_list_of_objects(tmp_path):
    p = tmp_path / "obj.json"
    p.write_text(json.dumps({"sentence": "x", "label": 1}))
    with pytest.raises(ValueError, match="list"):
        read_rows(p)
    p = tmp_path / "scalars.jsonl"
    p.write_text('{"a": 1}\n3\n')
    with pytest.raises(ValueError, match="row 1"):
        read_rows(p)


def test_unsupported_extension(tmp_path):
    p = tmp_path / "data.tsv"
    p.write_text("sentence\tlabel\nx\t1\n")
    with pytest.raises(ValueError, match=r"\.tsv"):
        read_rows(p)


# ---------------------------------------------------------------------------------------------
# to_examples, rows in the real column formats
# ---------------------------------------------------------------------------------------------
def test_beavertails_rows():
    cat = {c: c == "animal_abuse" for c in BEAVERTAILS_CATEGORIES}
    rows = [{"prompt": "How do I hurt a cat?", "response": "You should not.", "category": cat,
             "is_safe": True},
            {"prompt": "Why?", "response": "Because.", "category": cat, "is_safe": False}]
    ex = to_examples(rows, "beavertails", "bt.jsonl")
    assert ex[0] == Example(T.BEAVERTAILS_INSTRUCTION, "How do I hurt a cat?", "You should not.")
    assert ex[0].meta == {"is_safe": True} and ex[1].meta == {"is_safe": False}


def test_sst2_rows():
    rows = [{"idx": 0, "sentence": "hide new secretions from the parental units ", "label": 0},
            {"idx": 1, "sentence": "a charming and often affecting journey . ", "label": 1}]
    ex = to_examples(rows, "sst2", "sst2.jsonl")
    assert ex == [Example(T.SST2_INSTRUCTION, rows[0]["sentence"], "negative"),
                  Example(T.SST2_INSTRUCTION, rows[1]["sentence"], "positive")]


def test_agnews_rows():
    rows = [{"text": f"Headline {i} Some text.", "label": i} for i in range(4)]
    ex = to_examples(rows, "ag_news", "ag.jsonl")
    assert [e.output for e in ex] == ["World", "Sports", "Business", "Sci/Tech"]
    assert all(e.instruction == T.AGNEWS_INSTRUCTION for e in ex)
    assert [e.input for e in ex] == [r["text"] for r in rows]


def test_gsm8k_rows():
    row = {"question": "Natalia sold 48 clips in April and half as many in May. How many?",
           "answer": "Natalia sold 48/2 = <<48/2=24>>24 clips in May.\n48+24 = <<48+24=72>>72\n#### 72"}
    (ex,) = to_examples([row], "gsm8k", "gsm.jsonl")
    assert ex.instruction == T.GSM8K_INSTRUCTION
    assert ex.input == row["question"] + T.GSM8K_INPUT_SUFFIX
    assert ex.input.endswith("\nFirst think step by step and then answer the final number.\n")
    assert "####" not in ex.output
    assert ex.output == ("Natalia sold 48/2 = <<48/2=24>>24 clips in May.\n48+24 = <<48+24=72>>72\n"
                         "The final answer is: 72")


def test_alpaca_eval_rows():
    row = {"instruction": "How did US states get their names?", "output": "From many sources.",
           "generator": "text_davinci_003", "dataset": "helpful_base"}
    (ex,) = to_examples([row], "alpaca_eval", "ae.jsonl")
    assert ex == Example(T.BEAVERTAILS_INSTRUCTION, row["instruction"], row["output"])


def test_missing_column_names_file_row_and_column():
    rows = [{"sentence": "fine ", "label": 1}, {"idx": 1, "text": "oops", "label": 0}]
    with pytest.raises(ValueError) as e:
        to_examples(rows, "sst2", "data/sst2/train.jsonl")
    msg = str(e.value)
    assert "data/sst2/train.jsonl" in msg and "row 1" in msg and "'sentence'" in msg
    assert "'label'" not in msg.split("missing")[1].split(";")[0]  # only the missing one is named


@pytest.mark.parametrize("fmt,bad", [("sst2", 7), ("sst2", -1), ("sst2", True), ("sst2", 0.5),
                                     ("sst2", "positive"), ("ag_news", 4), ("ag_news", "9")])
def test_bad_label_names_the_row(fmt, bad):
    col = "sentence" if fmt == "sst2" else "text"
    rows = [{col: "ok", "label": 1}, {col: "ok", "label": 0}, {col: "bad", "label": bad}]
    with pytest.raises(ValueError, match=r"row 2\b") as e:
        to_examples(rows, fmt, "f.jsonl")
    assert "f.jsonl" in str(e.value) and "label" in str(e.value)


def test_csv_labels_as_digit_strings(tmp_path):
    sst = write_csv(tmp_path / "sst2.csv", [{"idx": 0, "sentence": "dull ", "label": 0},
                                             {"idx": 1, "sentence": "fresh ", "label": 1}])
    assert [e.output for e in to_examples(read_rows(sst), "sst2", str(sst))] == ["negative", "positive"]
    ag = write_csv(tmp_path / "ag.csv", [{"text": "t", "label": y} for y in (3, 0)])
    assert [e.output for e in to_examples(read_rows(ag), "ag_news", str(ag))] == ["Sci/Tech", "World"]
    assert to_examples([{"sentence": "x", "label": " 1 "}], "sst2", "f.csv")[0].output == "positive"


def test_unknown_format_and_no_rows():
    with pytest.raises(ValueError, match="unknown data format"):
        to_examples([{"a": 1}], "imdb", "f.jsonl")
    with pytest.raises(ValueError, match="f.jsonl"):
        to_examples([], "sst2", "f.jsonl")


# ---------------------------------------------------------------------------------------------
# FolderSource
# ---------------------------------------------------------------------------------------------
def test_folder_source_resolves_extensions(tmp_path):
    write_csv(tmp_path / "sst2" / "train.csv", [{"idx": 0, "sentence": "a", "label": 1}])
    write_jsonl(tmp_path / "gsm8k" / "test.jsonl", [{"question": "q", "answer": "a\n#### 1"}])
    (tmp_path / "alpaca_eval").mkdir()
    (tmp_path / "alpaca_eval" / "eval.json").write_text(json.dumps(
        [{"instruction": f"i{k}", "output": f"o{k}", "generator": "g", "dataset": "d"} for k in range(5)]))
    src = FolderSource(tmp_path)
    assert src.path("sst2", "train") == tmp_path / "sst2" / "train.csv"
    assert src.path("gsm8k", "test") == tmp_path / "gsm8k" / "test.jsonl"
    assert src.examples("sst2", "train")[0].output == "positive"
    assert [e.input for e in src.examples("alpaca_eval", "eval", -2)] == ["i3", "i4"]
    assert [e.input for e in src.examples("alpaca_eval", "eval", 1, 3)] == ["i1", "i2"]
    # .jsonl wins over .csv when both exist
    write_jsonl(tmp_path / "sst2" / "train.jsonl", [{"idx": 0, "sentence": "b", "label": 0}])
    assert src.path("sst2", "train").suffix == ".jsonl"
    assert src.examples("sst2", "train")[0].input == "b"
    # an explicit format overrides the folder's
    assert src.examples("alpaca_eval", "eval", fmt="alpaca_eval")[0].output == "o0"


def test_folder_source_missing_split_lists_expected_path(tmp_path):
    src = FolderSource(tmp_path)
    with pytest.raises(FileNotFoundError) as e:
        src.path("sst2", "validation")
    msg = str(e.value)
    assert str(tmp_path / "sst2" / "validation") in msg and ".jsonl" in msg and ".csv" in msg


def test_folder_source_empty_slice(tmp_path):
    write_jsonl(tmp_path / "sst2" / "train.jsonl", [{"sentence": "a", "label": 1}])
    with pytest.raises(ValueError, match="selects no rows"):
        FolderSource(tmp_path).examples("sst2", "train", 5)


def test_base_corpus_collects_every_base_file(tmp_path):
    cat = {c: False for c in BEAVERTAILS_CATEGORIES}
    write_jsonl(tmp_path / "beavertails" / "base.jsonl",
                [{"prompt": f"p{i}", "response": "r", "category": cat, "is_safe": True} for i in range(3)])
    write_csv(tmp_path / "sst2" / "base.csv", [{"idx": i, "sentence": f"s{i}", "label": 1} for i in range(2)])
    (tmp_path / "gsm8k").mkdir()
    (tmp_path / "gsm8k" / "base.json").write_text(json.dumps([{"question": "q", "answer": "1\n#### 1"}]))
    write_jsonl(tmp_path / "sst2" / "train.jsonl", [{"sentence": "not base", "label": 0}] * 4)
    write_jsonl(tmp_path / "unknown" / "base.jsonl", [{"x": 1}])  # not a known dataset: ignored
    corpus = FolderSource(tmp_path).base_corpus()
    assert len(corpus) == 6
    inputs = {e.input for e in corpus}
    assert {"p0", "p1", "p2", "s0", "s1", "q" + T.GSM8K_INPUT_SUFFIX} == inputs
    with pytest.raises(FileNotFoundError, match="base"):
        FolderSource(tmp_path / "empty").base_corpus()


# ---------------------------------------------------------------------------------------------
# hft_mix (protocol.md §3.3)
# ---------------------------------------------------------------------------------------------
def _ex(kind: str, n: int) -> list[Example]:
    return [Example("i", f"{kind}{k}", "o") for k in range(n)]


TASK, HARM = _ex("t", 1200), _ex("h", 300)


@pytest.mark.parametrize("n,p,n_task,n_harm", [(1000, 0.1, 900, 100), (1000, 0.0, 1000, 0),
                                               (1000, 0.05, 950, 50), (1000, 0.2, 800, 200),
                                               (700, 0.1, 630, 70), (1000, 0.3, 700, 300),
                                               (100, 1.0, 0, 100)])
def test_hft_mix_sizes_and_order(n, p, n_task, n_harm):
    mix = hft_mix(TASK, HARM, n, p)
    assert mix == TASK[:n_task] + HARM[:n_harm]  # task rows first, each part in file order


def test_hft_mix_too_few_rows():
    with pytest.raises(ValueError, match=r"attack\.n"):
        hft_mix(TASK[:899], HARM, 1000, 0.1)
    with pytest.raises(ValueError, match="harmful_ratio"):
        hft_mix(TASK, HARM[:99], 1000, 0.1)
    assert len(hft_mix(TASK[:900], HARM[:100], 1000, 0.1)) == 1000  # exactly enough is fine


@pytest.mark.parametrize("p", [-0.1, 1.5])
def test_hft_mix_ratio_out_of_range(p):
    with pytest.raises(ValueError, match="harmful_ratio"):
        hft_mix(TASK, HARM, 100, p)
