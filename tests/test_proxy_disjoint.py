"""VAA stage 1's proxy is disjoint from every attack's rows (issue 12 item 3): under
protocol=paper|reference the AlpacaEval stand-in used to train on AlpacaEval rows 0-629, the
630 benign rows of the AlpacaEval attack itself. The proxies now read an Alpaca table no attack
reads (the world's alpaca/train; real data: tatsu-lab/alpaca without AlpacaEval's
instructions), and the estimate stage and the config validation refuse an overlapping proxy."""

from __future__ import annotations

import json
from functools import partial

import pytest

from hf_fixtures import write_jsonl
from tests.conftest import CONF_DIR
from vaa.data.hub import build_real_data
from vaa.data.proxy_check import ATTACK_SPLITS, assert_proxies_disjoint, attack_rows, proxy_overlaps
from vaa.data.sources import FolderSource
from vaa.pipeline.estimate import table_rows
from vaa.world.generator import WorldSizes, write_world

OLD_PAPER_PROXY = ("dro.estimate.proxies=[{name: alpaca, dataset: alpaca_eval, format: alpaca_eval, "
                   "split: eval, start: 0, stop: 683, harmful_ratio: 0.1}]")


def sizes(table: dict):
    return lambda dataset, split: table.get((dataset, split))


def test_attack_splits_match_the_task_configs(compose):
    for task, (dataset, split) in ATTACK_SPLITS.items():
        t = compose([f"task={task}"]).task
        assert (t.name, t.dataset, t.train.file, t.train.start) == (task, dataset, split, 0)
    assert set(ATTACK_SPLITS) == {p.stem for p in (CONF_DIR / "task").glob("*.yaml")}


@pytest.mark.parametrize("protocol", ["paper", "reference"])
def test_the_old_protocol_proxy_was_the_alpacaeval_attack_and_is_refused(compose, protocol):
    cfg = compose(["data=real_files", f"protocol={protocol}", OLD_PAPER_PROXY])
    assert attack_rows(cfg)["alpacaeval"] == ("alpaca_eval", "eval", 0, 630)
    [(key, msg)] = proxy_overlaps(cfg, sizes({("alpaca_eval", "eval"): 805}))
    assert key == "dro.estimate.proxies.0"
    assert "rows 0-629 with the alpacaeval attack's benign rows 0-629" in msg
    with pytest.raises(ValueError, match="estimate on the attack itself"):
        assert_proxies_disjoint(cfg, sizes({("alpaca_eval", "eval"): 805}))
    # the same proxy is refused whichever task this run attacks (groups serve every task)
    cfg = compose(["data=real_files", f"protocol={protocol}", "task=sst2", OLD_PAPER_PROXY])
    assert proxy_overlaps(cfg, sizes({("alpaca_eval", "eval"): 805}))


@pytest.mark.parametrize("overrides", [
    ["data=real_files", "protocol=paper"], ["data=real_files", "protocol=reference"],
    ["data=real_files", "protocol=paper", "task=alpacaeval"], ["task=alpacaeval"],
    ["experiment=smoke", "task=alpacaeval"], ["experiment=forgetting_overlap", "task=gsm8k"],
    ["experiment=forgetting_overlap", "task=alpacaeval"]])
def test_every_preset_proxy_is_disjoint_from_every_attack(compose, overrides):
    cfg = compose(overrides)
    tables = {("alpaca_eval", "eval"): 1200, ("alpaca", "train"): 2000, ("sst2", "train"): 2000,
              ("ag_news", "train"): 2000, ("gsm8k", "train"): 2000}
    assert proxy_overlaps(cfg, sizes(tables)) == []
    assert all(p.dataset == "alpaca" or p.start >= 1000 for p in cfg.dro.estimate.proxies)


def test_a_proxy_from_the_tail_of_a_task_table_must_start_after_the_attack(compose):
    base = ["task=sst2", "attack.n=100"]  # the attack reads sst2 train rows 0-89
    ok = compose([*base, "dro.estimate.n=100", "dro.estimate.proxies=[{name: s, dataset: sst2, format: sst2, "
                  "split: train, start: 90, stop: null, harmful_ratio: 0.1}]"])
    assert proxy_overlaps(ok, sizes({("sst2", "train"): 1000})) == []
    bad = compose([*base, "dro.estimate.n=100", "dro.estimate.proxies=[{name: s, dataset: sst2, format: sst2, "
                   "split: train, start: 89, stop: null, harmful_ratio: 0.1}]"])
    [(_, msg)] = proxy_overlaps(bad, sizes({("sst2", "train"): 1000}))
    assert "shares rows 89-89 with the sst2 attack" in msg and "start it after row 89" in msg
    # the last rows of a table: resolved against its size
    tail = compose([*base, "dro.estimate.n=100", "dro.estimate.proxies=[{name: s, dataset: sst2, format: sst2, "
                    "split: train, start: -100, stop: null, harmful_ratio: 0.1}]"])
    assert proxy_overlaps(tail, sizes({("sst2", "train"): 1000})) == []
    assert proxy_overlaps(tail, sizes({("sst2", "train"): 150}))  # rows 50-139 meet rows 0-89


def test_the_world_writes_a_proxy_table_no_attack_reads(compose, tmp_path):
    cfg = compose(["experiment=smoke", "task=alpacaeval"])
    d = {k: v for k, v in cfg.data.items() if k in WorldSizes.__dataclass_fields__}
    write_world(WorldSizes(**d), tmp_path)
    source = FolderSource(tmp_path)
    proxy = source.examples("alpaca", "train", fmt="alpaca_eval")
    assert len(proxy) == cfg.data.task_train
    assert table_rows(source, "alpaca", "train") == cfg.data.task_train
    assert table_rows(source, "no_such", "train") is None
    assert_proxies_disjoint(cfg, partial(table_rows, source))


def test_real_alpaca_proxy_drops_alpacaeval_instructions(compose, tmp_path):
    root = tmp_path / "real"
    write_jsonl(root / "bt.jsonl", [{"prompt": f"p{i}", "response": "r", "category": {}, "is_safe": i % 2 == 0}
                                    for i in range(40)])
    write_jsonl(root / "alpaca_eval.jsonl", [{"instruction": f"Eval question {i}", "output": "o",
                                              "generator": "g", "dataset": "d"} for i in range(10)])
    alpaca = [{"instruction": f"Train question {i}", "input": "", "output": "o"} for i in range(6)]
    alpaca[1]["instruction"] = "eval QUESTION 3"   # an AlpacaEval instruction (case differs)
    alpaca[4] = {"instruction": "Eval question", "input": "5", "output": "o"}  # with its input: "Eval question\n5"
    write_jsonl(root / "alpaca.jsonl", alpaca)
    small = ["data=real_files", f"data.root={root}", "data.beavertails_train.path=bt.jsonl",
             "data.beavertails_test.path=bt.jsonl", "data.align_rows.stop=5", "data.hs_rows.stop=2",
             "data.harmful_rows.start=2", "data.harmful_rows.stop=6", "data.proxy_rows.start=6",
             "data.proxy_rows.stop=10", "data.align_harmful_rows.start=10", "data.align_harmful_rows.stop=12",
             "data.base_rows.start=0", "data.base_rows.stop=0", "data.task_train=6", "data.task_test=4"]
    cfg = compose([*small, "data.alpaca.path=alpaca.jsonl"])
    out = tmp_path / "out"
    build_real_data(cfg.data, out)
    info = json.loads((out / "data.json").read_text())
    assert info["content"]["proxy"] == {"table": "alpaca", "rows": 4, "dropped_as_alpaca_eval": 2}
    rows = FolderSource(out).examples("alpaca", "train", fmt="alpaca")
    assert [e.instruction for e in rows] == ["Train question 0", "Train question 2", "Train question 3",
                                             "Train question 5"]
    # real_files never downloads Alpaca: without a local copy AlpacaEval rows 300-682 stand in
    # (here the table has 10 rows: none), and with the stand-in off the table is marked missing
    cfg = compose([*small, "data.alpaca_stand_in_rows.stop=0"])
    build_real_data(cfg.data, tmp_path / "out2")
    assert "data.alpaca" in (tmp_path / "out2" / "alpaca" / "MISSING.txt").read_text()


def test_real_files_stand_in_proxy_is_checked_by_content(compose, tmp_path):
    """No Alpaca file: AlpacaEval rows 300-682 stand in; whether an attack reads them is a
    matter of content (another table), checked at the estimate stage."""
    root = tmp_path / "real"
    write_jsonl(root / "bt.jsonl", [{"prompt": f"p{i}", "response": "r", "category": {}, "is_safe": i % 2 == 0}
                                    for i in range(40)])
    write_jsonl(root / "alpaca_eval.jsonl", [{"instruction": f"Eval question {i}", "output": "o",
                                              "generator": "g", "dataset": "d"} for i in range(805)])
    small = ["data=real_files", f"data.root={root}", "data.beavertails_train.path=bt.jsonl",
             "data.beavertails_test.path=bt.jsonl", "data.align_rows.stop=5", "data.hs_rows.stop=2",
             "data.harmful_rows.start=2", "data.harmful_rows.stop=6", "data.proxy_rows.start=6",
             "data.proxy_rows.stop=10", "data.align_harmful_rows.start=10", "data.align_harmful_rows.stop=12",
             "data.base_rows.start=0", "data.base_rows.stop=0"]
    out = tmp_path / "out"
    cfg = compose([*small, "experiment=smoke", "task=alpacaeval"])  # attack n = 100: rows 0-89
    build_real_data(cfg.data, out)
    assert json.loads((out / "data.json").read_text())["content"]["proxy"]["rows"] == 383
    source = FolderSource(out)
    assert source.examples("alpaca", "train", fmt="alpaca_eval")[0].input == "Eval question 300"
    assert_proxies_disjoint(cfg, partial(table_rows, source), source)
    # an attack of n = 700 reads AlpacaEval rows 0-629: the stand-in rows 300-629 are among them
    big = compose([*small, "experiment=smoke", "task=alpacaeval", "attack.n=700"])
    assert proxy_overlaps(big, partial(table_rows, source)) == []  # other tables: positions cannot see it
    with pytest.raises(ValueError, match="has a row the alpacaeval attack trains on .'Eval question 300'"):
        assert_proxies_disjoint(big, partial(table_rows, source), source)
    # the stand-in off: a missing Alpaca table says which key to set
    cfg = compose([*small, "data.alpaca_stand_in_rows.stop=0"])
    build_real_data(cfg.data, tmp_path / "out2")
    assert "data.alpaca.path" in (tmp_path / "out2" / "alpaca" / "MISSING.txt").read_text()
