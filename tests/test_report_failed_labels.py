"""vaa-report (issue 14 follow-up): a failed or interrupted job's overrides label no row (the
row-label keys used to be computed over every job, so one failed `attack.lr=0.001` job added
`attack.lr=None` to every finished row); interrupted.json jobs are counted and listed like
failed ones, with the stage they stopped in."""

from __future__ import annotations

import json

from test_report import make_job
from vaa.report import build_table, collect, write_report


def interrupted_job(root, num, stage="aligned", **kw):
    d = make_job(root, num, status="incomplete", **kw)
    (d / "interrupted.json").write_text(json.dumps(
        {"status": "interrupted", "stage": stage, "signal": "SIGTERM", "overrides": [],
         "method": kw.get("method", "sft"), "task": kw.get("task", "sst2"), "seed": kw.get("seed", 0)}))
    return d


def test_failed_and_interrupted_jobs_add_no_row_label(tmp_path):
    make_job(tmp_path, 0, seed=0, hs=10.0)
    make_job(tmp_path, 1, seed=1, hs=20.0)
    make_job(tmp_path, 2, seed=2, status="failed", extra={"attack.lr": 0.001})
    interrupted_job(tmp_path, 3, seed=3, extra={"align.lr": 1.0})
    t = build_table(collect(tmp_path))
    assert t.row_keys == [] and t.rows == ["sft"] and t.columns == ["sst2"]
    assert t.hs["sft", "sst2"].n == 2 and t.hs["sft", "sst2"].mean == 15.0


def test_a_finished_setting_still_labels_rows_beside_a_failed_job(tmp_path):
    make_job(tmp_path, 0, hs=10.0, extra={"attack.lr": 0.01})
    make_job(tmp_path, 1, hs=30.0, extra={"attack.lr": 0.02})
    make_job(tmp_path, 2, status="failed", extra={"align.lr": 5.0})
    t = build_table(collect(tmp_path), columns="task")
    assert t.row_keys == ["attack.lr"]  # not align.lr: only the failed job set it
    assert t.hs["sft lr=0.01", "sst2"].mean == 10.0 and t.hs["sft lr=0.02", "sst2"].mean == 30.0
    assert t.rows == ["sft lr=0.01", "sft lr=0.02", "sft lr=None"]  # the failed job's empty row
    assert t.hs["sft lr=None", "sst2"] is None


def test_interrupted_jobs_are_counted_and_listed_like_failed_ones(tmp_path):
    make_job(tmp_path, 0, hs=10.0)
    make_job(tmp_path, 1, seed=1, status="failed")
    d = interrupted_job(tmp_path, 2, seed=2, stage="finetuned")
    (tmp_path / "3" / ".hydra").mkdir(parents=True)  # killed before it wrote anything else
    (tmp_path / "3" / ".hydra" / "config.yaml").write_text("seed: 3\n")
    jobs = {j.dir.name: j for j in collect(tmp_path)}
    assert jobs["2"].status == "interrupted" and jobs["2"].error == "interrupted (SIGTERM) during stage 'finetuned'"
    md = write_report(tmp_path, figures=False)["markdown"]
    assert "Jobs: 4 found, 1 finished, 3 failed or unfinished (1 failed, 1 interrupted, 1 unfinished;" in md
    assert f"- `{d}` (interrupted): method=sft task=sst2 seed=2: interrupted (SIGTERM) during stage 'finetuned'" in md
