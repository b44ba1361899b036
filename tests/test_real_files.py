"""The whole pipeline on real text: data=real_files pointed at a folder laid out like
shared/data/real (real BeaverTails / SST2 / AG News / GSM8K / AlpacaEval rows), the tiny model
built and pretrained on it, small sizes. Skipped when the folder is absent (it is never part
of the repository). The same run from the command line:

    vaa data.root=../shared/data/real $(REAL_FILES_RUN below, space-separated)
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from vaa.data.sources import FolderSource

ROOT = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "real"
pytestmark = pytest.mark.skipif(not (ROOT / "beavertails_30k_test.jsonl").is_file(),
                                reason=f"no real data folder at {ROOT}")

REAL_FILES_RUN = [
    "data=real_files", "method=sft", "judge=keyword", "trainer.progress_bar=false",
    "data.align_rows.stop=40", "data.hs_rows.stop=10", "data.fa_test_n=10", "data.task_rows=100",
    "model.arch.hidden_size=32", "model.arch.num_hidden_layers=1", "model.arch.num_attention_heads=2",
    "model.arch.num_key_value_heads=2", "model.arch.intermediate_size=64",
    "model.pretrain.max_steps=10", "model.pretrain.batch_size=16",
    "align.epochs=1", "align.batch_size=16", "attack.n=40", "attack.epochs=1",
    "eval.hs_max_new_tokens=8",
]


@pytest.mark.parametrize("task", ["sst2", pytest.param("gsm8k", marks=pytest.mark.slow)])
def test_pipeline_on_the_real_files(compose, tmp_path, task):
    from vaa.pipeline.run import run_pipeline

    cfg = compose([*REAL_FILES_RUN, f"data.root={ROOT}", f"task={task}",
                   f"paths.cache_dir={tmp_path / 'cache'}"])
    metrics = run_pipeline(cfg, tmp_path / "run")
    for stage in ("base", "aligned", "finetuned"):
        m = metrics["stages"][stage]
        assert (m["n_hs"], m["n_fa"]) == (10, 10)
        assert 0 <= m["harmful_score"] <= 100 and 0 <= m["finetune_accuracy"] <= 100
    world = tmp_path / "cache" / metrics["cache_keys"]["world"]
    src = FolderSource(world)
    hs = src.examples("beavertails", "test")
    real = [json.loads(x) for x in (ROOT / "beavertails_30k_test.jsonl").read_text().splitlines()]
    unsafe = [r["prompt"] for r in real if not r["is_safe"]]
    assert [e.input for e in hs] == unsafe[:10]  # the real HS prompts, in file order
    preds = (tmp_path / "run" / "predictions" / "finetuned_hs.jsonl").read_text().splitlines()
    assert json.loads(preds[0])["prompt"] == unsafe[0]
    rows = json.loads((world / "data.json").read_text())["rows"]
    assert rows["beavertails/align"] == 40 and rows[f"{'sst2' if task == 'sst2' else 'gsm8k'}/train"] == 100
