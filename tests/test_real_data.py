"""Real datasets: every upstream column format through every file loader, the data stage's
slices under protocol=reference and protocol=paper (sizes, order, disjointness), and the
errors for a missing or offline table. Fixtures are written here (no real data, no network)."""

from __future__ import annotations

import csv
import json

import pytest

from hf_fixtures import write_jsonl
from vaa.data.formats import to_examples
from vaa.data.hub import build_real_data, read_table
from vaa.data.sources import FolderSource
from vaa.models.hub import MissingResource

CATS = {"animal_abuse": False, "violence,aiding_and_abetting,incitement": False}


def bt(i: int, safe: bool) -> dict:
    return {"prompt": f"prompt {i}", "response": f"response {i}",
            "category": {**CATS, "animal_abuse": not safe}, "is_safe": safe}


SAMPLES = {  # one upstream row per format, in its exact columns
    "beavertails": [bt(0, True), bt(1, False)],
    "sst2": [{"idx": 0, "sentence": "a charming journey ", "label": 1},
             {"idx": 1, "sentence": "bleak ", "label": 0}],
    "ag_news": [{"text": "Stocks rise", "label": 2}, {"text": "Team wins", "label": 1}],
    "gsm8k": [{"question": "1+1?", "answer": "1+1=<<1+1=2>>2\n#### 2"},
              {"question": "2+2?", "answer": "#### 4"}],
    "alpaca_eval": [{"instruction": "Name a color.", "output": "Blue.", "generator": "text_davinci_003",
                     "dataset": "helpful_base"}, {"instruction": "Say hi.", "output": "Hi.",
                                                  "generator": "text_davinci_003", "dataset": "oasst"}],
}
TABLE = {"beavertails": "beavertails_train", "sst2": "sst2_train", "ag_news": "ag_news_train",
         "gsm8k": "gsm8k_train", "alpaca_eval": "alpaca_eval"}


def write_rows(path, rows, ext):
    path.parent.mkdir(parents=True, exist_ok=True)
    if ext == "jsonl":
        write_jsonl(path, rows)
    elif ext == "json":
        path.write_text(json.dumps(rows))
    elif ext == "csv":  # nested values as JSON text, booleans and ints as CSV strings
        with path.open("w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=list(rows[0]))
            w.writeheader()
            w.writerows([{k: json.dumps(v) if isinstance(v, dict) else v for k, v in r.items()}
                         for r in rows])
    else:
        pd = pytest.importorskip("pandas")
        pytest.importorskip("pyarrow")
        pd.DataFrame(rows).to_parquet(path)


@pytest.mark.parametrize("ext", ["jsonl", "json", "csv", "parquet"])
@pytest.mark.parametrize("fmt", sorted(SAMPLES))
def test_every_format_through_every_loader(compose, tmp_path, fmt, ext):
    write_rows(tmp_path / f"t.{ext}", SAMPLES[fmt], ext)
    d = compose(["data=real_files", f"data.root={tmp_path}", f"data.{TABLE[fmt]}.path=t.{ext}"]).data
    rows, src = read_table(d, TABLE[fmt])
    assert src == f"t.{ext}" and len(rows) == 2
    ex = to_examples(rows, fmt, src)
    expected = {"beavertails": ("prompt 0", "response 0"), "sst2": ("a charming journey ", "positive"),
                "ag_news": ("Stocks rise", "Business"),
                "gsm8k": ("1+1?\nFirst think step by step and then answer the final number.\n",
                          "1+1=<<1+1=2>>2\nThe final answer is: 2"),
                "alpaca_eval": ("Name a color.", "Blue.")}[fmt]
    assert (ex[0].input, ex[0].output) == expected


def write_folder(root):
    """A folder laid out like shared/data/real, plus a 30k_train (2,152 safe / 1,348 unsafe
    rows, mixed) and a refusal file: large enough for both presets' slices."""
    train = [bt(i, safe=i % 13 >= 5) for i in range(3500)]
    write_jsonl(root / "beavertails_30k_train.jsonl", train)
    test = [bt(10_000 + i, safe=i % 11 == 0) for i in range(1210)]  # 1,100 unsafe
    write_jsonl(root / "beavertails_30k_test.jsonl", test)
    write_jsonl(root / "refusals.jsonl", [{"prompt": f"p{i}", "response": "harm",
                                           "refusal": f"Question: p{i}\nAnswer: I cannot help {i}."}
                                          for i in range(2100)])
    for name, n, make in [("sst2_train", 1500, lambda i: {"idx": i, "sentence": f"s{i}", "label": i % 2}),
                          ("sst2_validation", 872, lambda i: {"idx": i, "sentence": f"v{i}", "label": i % 2}),
                          ("ag_news_train", 1500, lambda i: {"text": f"a{i}", "label": i % 4}),
                          ("ag_news_test", 1100, lambda i: {"text": f"t{i}", "label": i % 4}),
                          ("gsm8k_train", 1500, lambda i: {"question": f"q{i}", "answer": f"#### {i}"}),
                          ("gsm8k_test", 1100, lambda i: {"question": f"k{i}", "answer": f"#### {i}"}),
                          ("alpaca_eval", 805, lambda i: {"instruction": f"i{i}", "output": f"o{i}",
                                                          "generator": "g", "dataset": "d"})]:
        write_jsonl(root / f"{name}.jsonl", [make(i) for i in range(n)])
    return train, test


def preset(compose, root, protocol, *extra):
    return compose(["data=real_files", f"data.root={root}", f"protocol={protocol}",
                    "data.beavertails_train.path=beavertails_30k_train.jsonl",
                    "data.refusals.path=refusals.jsonl", "data.base_rows.stop=0", *extra])


def read(out, rel):
    return [json.loads(line) for line in (out / rel).read_text().splitlines()]


def all_uids_disjoint(out):
    seen = {}
    for split in ("align", "harmful", "proxy_harmful", "align_harmful", "test", "base"):
        p = out / "beavertails" / f"{split}.jsonl"
        for r in read(out, p.relative_to(out)) if p.is_file() else []:
            assert r["uid"] not in seen, (r["uid"], seen.get(r["uid"]), split)
            seen[r["uid"]] = split
    return seen


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    root = tmp_path_factory.mktemp("real")
    train, test = write_folder(root)
    return root, train, test


def test_reference_preset(compose, folder, tmp_path):
    root, train, test = folder
    cfg = preset(compose, root, "reference")
    build_real_data(cfg.data, tmp_path)
    safe = [r for r in train if r["is_safe"]]
    unsafe = [r for r in train if not r["is_safe"]]
    align, harm = read(tmp_path, "beavertails/align.jsonl"), read(tmp_path, "beavertails/harmful.jsonl")
    assert [r["prompt"] for r in align] == [r["prompt"] for r in safe[:2000]]  # first 2,000 safe, in order
    assert [r["prompt"] for r in harm] == [r["prompt"] for r in unsafe[:100]]
    assert len(read(tmp_path, "beavertails/proxy_harmful.jsonl")) == 100
    assert [r["prompt"] for r in read(tmp_path, "beavertails/align_harmful.jsonl")] == \
        [r["prompt"] for r in unsafe[-1000:]]
    hs = read(tmp_path, "beavertails/test.jsonl")
    assert len(hs) == 500 and not any(r["is_safe"] for r in hs)
    assert [r["prompt"] for r in hs] == [r["prompt"] for r in test if not r["is_safe"]][:500]
    all_uids_disjoint(tmp_path)
    sst2_train, sst2_test = read(tmp_path, "sst2/train.jsonl"), read(tmp_path, "sst2/validation.jsonl")
    assert [r["idx"] for r in sst2_test] == list(range(1000, 1500))  # the last 500 train rows
    assert len(sst2_train) == 1000 and not {r["uid"] for r in sst2_train} & {r["uid"] for r in sst2_test}
    # the composed run: reference templates, match rule, sizes; AlpacaEval 705 train / last 100 test
    assert (cfg.template.train, cfg.template.decode) == ("vaa_train", "vaa_decode")
    assert cfg.task.scorer_args.match == "gold_substring" and cfg.eval.n_hs_prompts == 500
    alp = preset(compose, root, "reference", "task=alpacaeval")
    assert (alp.task.train.stop, alp.task.test.start, alp.attack.n, alp.task.max_new_tokens) == (705, -100, 700, 150)
    src = FolderSource(tmp_path)
    tr = src.examples("alpaca_eval", "eval", alp.task.train.start, alp.task.train.stop, "alpaca_eval")
    te = src.examples("alpaca_eval", "eval", alp.task.test.start, alp.task.test.stop, "alpaca_eval")
    assert len(tr) == 705 and len(te) == 100 and not {e.input for e in tr} & {e.input for e in te}


def test_paper_preset(compose, folder, tmp_path):
    root, _, test = folder
    cfg = preset(compose, root, "paper")
    build_real_data(cfg.data, tmp_path)
    align = read(tmp_path, "beavertails/align.jsonl")
    assert len(align) == 2000 and align[0]["response"] == "I cannot help 0."  # the refusal's answer
    assert len(read(tmp_path, "beavertails/test.jsonl")) == 1000
    assert len(read(tmp_path, "sst2/validation.jsonl")) == 872  # the official validation split
    assert [r["text"] for r in read(tmp_path, "ag_news/test.jsonl")] == [f"t{i}" for i in range(1000)]
    assert len(read(tmp_path, "gsm8k/train.jsonl")) == 1500
    all_uids_disjoint(tmp_path)
    assert (cfg.template.train, cfg.model.max_length, cfg.seed) == ("alpaca", 512, 42)
    assert cfg.task.scorer_args.match == "first_label" and cfg.dro.lambda_mixing == "weighted"
    alp = preset(compose, root, "paper", "task=alpacaeval")
    assert (alp.task.scorer, alp.attack.n, alp.task.max_new_tokens, alp.task.test.start) == \
        ("local_pairwise", 700, 512, -122)
    gsm = preset(compose, root, "paper", "task=gsm8k")
    assert (gsm.attack.n, gsm.task.max_new_tokens, dict(gsm.task.scorer_args)) == (1000, 150, {})


def test_overlapping_slices_are_refused(compose, folder, tmp_path):
    root, _, _ = folder
    cfg = preset(compose, root, "reference", "data.harmful_rows.stop=150")  # into the proxy slice
    with pytest.raises(ValueError, match="both harmful and proxy_harmful"):
        build_real_data(cfg.data, tmp_path)


def test_hs_dedup_keeps_the_first_row_per_prompt(compose, tmp_path):
    write_folder(tmp_path)
    rows = [json.loads(x) for x in (tmp_path / "beavertails_30k_test.jsonl").read_text().splitlines()]
    rows.insert(2, {**rows[1], "response": "another answer"})  # a repeated unsafe prompt
    write_jsonl(tmp_path / "beavertails_30k_test.jsonl", rows)
    out = tmp_path / "out"
    cfg = preset(compose, tmp_path, "reference", "data.hs_dedup=true")
    build_real_data(cfg.data, out)
    prompts = [r["prompt"] for r in read(out, "beavertails/test.jsonl")]
    assert len(prompts) == len(set(prompts)) == 500


def test_missing_file_names_the_key(compose, tmp_path):
    cfg = compose(["data=real_files", f"data.root={tmp_path}"])
    with pytest.raises(MissingResource, match=r"data\.beavertails_train\.path=beavertails_30k_test\.jsonl"):
        build_real_data(cfg.data, tmp_path / "out")


def test_offline_hub_dataset_fails_naming_the_key(compose, monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    cfg = compose(["data=hf"])
    with pytest.raises(MissingResource) as e:
        build_real_data(cfg.data, tmp_path)
    assert "PKU-Alignment/BeaverTails" in str(e.value) and "data.beavertails_train.path" in str(e.value)


def test_a_missing_task_table_fails_when_the_task_is_used(compose, folder, tmp_path):
    root, _, _ = folder
    cfg = preset(compose, root, "reference", "data.gsm8k_train.path=absent.jsonl")
    build_real_data(cfg.data, tmp_path)  # the other tasks still build
    assert (tmp_path / "sst2" / "train.jsonl").is_file()
    with pytest.raises(MissingResource, match=r"data\.gsm8k_train\.path=absent\.jsonl"):
        FolderSource(tmp_path).examples("gsm8k", "train")
