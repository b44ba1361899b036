"""vaa-report: the paper's table from the jobs of a sweep; failed jobs are missing cells;
multirun.sh and `vaa -m` go on past a failed job. Fabricated job directories check the
arithmetic (mean ± std over seeds, the average column); one real 2 × 2 multirun on a very
small world checks the whole path (CLI → jobs → report)."""

from __future__ import annotations

import csv
import json
import statistics
import sys
from pathlib import Path

import pytest
import yaml
from hydra.core.global_hydra import GlobalHydra

from vaa.report import ReportError, build_table, collect, write_report
from vaa.report.cli import main as report_main


def make_job(root: Path, num: int, *, method="sft", task="sst2", seed=0, hs=10.0, fa=80.0,
             hs_aligned=1.0, ft_defense="none", restore="none", extra: dict | None = None,
             status="ok", cached=None, override_only: dict | None = None,
             config_only: dict | None = None) -> Path:
    """A job directory as `vaa -m` leaves it: .hydra/{config,overrides}.yaml and, when it
    finished, metrics.json (when it raised, failed.json). ``extra``: overrides that set config
    values; ``override_only``: overrides with no node of their own (a preset: experiment=...);
    ``config_only``: config values no override set (a preset's values, an edited default)."""
    d = root / str(num)
    (d / ".hydra").mkdir(parents=True)
    overrides = {"method": method, "task": task, "seed": seed, **(extra or {}), **(override_only or {})}
    if ft_defense != "none":
        overrides["ft_defense"] = ft_defense
    cfg = {"seed": seed, "method": {"name": method}, "task": {"name": task},
           "ft_defense": {"name": ft_defense}, "restore": {"name": restore},
           "attack": {"harmful_ratio": 0.1, "epochs": 2}}
    for k, v in {**(extra or {}), **(config_only or {})}.items():
        node = cfg
        *path, last = k.split(".")
        for p in path:
            node = node.setdefault(p, {})
        node[last] = v
    (d / ".hydra" / "config.yaml").write_text(yaml.safe_dump(cfg))
    (d / ".hydra" / "overrides.yaml").write_text(yaml.safe_dump([f"{k}={v}" for k, v in overrides.items()]))
    if status == "ok":
        stage = lambda h, f, c=False: {"harmful_score": h, "finetune_accuracy": f,  # noqa: E731
                                       "cache_key": f"aligned-{method}-{seed}", "cached": c}
        metrics = {"method": method, "task": task, "seed": seed, "model": "tiny",
                   "ft_defense": ft_defense, "restore": restore,
                   "stages": {"base": stage(100.0, 50.0), "aligned": stage(hs_aligned, 20.0, bool(cached)),
                              "finetuned": stage(hs, fa), "restored": None},
                   "harmful_score": hs, "finetune_accuracy": fa, "timing": {"total": 1.0}}
        (d / "metrics.json").write_text(json.dumps(metrics))
    elif status == "failed":
        (d / "failed.json").write_text(json.dumps({"status": "failed", "error": "RuntimeError: boom"}))
    return d


def read_csv(path: Path) -> dict[str, dict[str, str]]:
    with path.open() as f:
        return {row["row"]: row for row in csv.DictReader(f)}


@pytest.fixture
def sweep(tmp_path) -> tuple[Path, dict]:
    """2 methods × 2 tasks × 3 seeds; (vaa, agnews, seed 2) failed, (vaa, agnews, seed 1)
    never finished: that cell has one seed left."""
    values, num = {}, 0
    for method in ("sft", "vaa"):
        for task in ("sst2", "agnews"):
            for seed in (0, 1, 2):
                hs = 10.0 * seed + (30 if method == "sft" else 5) + (7 if task == "agnews" else 0)
                fa = 60.0 + seed + (5 if task == "sst2" else 0)
                status = "ok"
                if (method, task, seed) == ("vaa", "agnews", 2):
                    status = "failed"
                elif (method, task, seed) == ("vaa", "agnews", 1):
                    status = "incomplete"
                make_job(tmp_path, num, method=method, task=task, seed=seed, hs=hs, fa=fa,
                         hs_aligned=float(seed), status=status, cached=num % 3 != 0)
                if status == "ok":
                    values[method, task, seed] = (hs, fa)
                num += 1
    return tmp_path, values


def test_table_means_std_and_missing(sweep):
    root, values = sweep
    result = write_report(root, figures=False)
    rows = read_csv(root / "report.csv")
    assert list(rows) == ["sft", "vaa"]  # rows: methods in the paper's order
    t = result["table"]
    assert t.columns == ["sst2", "agnews"] and t.column_key == "task"
    for method in ("sft", "vaa"):
        for task in ("sst2", "agnews"):
            got = [values[method, task, s] for s in (0, 1, 2) if (method, task, s) in values]
            hs = [h for h, _ in got]
            assert float(rows[method][f"{task}_hs_mean"]) == pytest.approx(statistics.fmean(hs))
            assert float(rows[method][f"{task}_fa_mean"]) == pytest.approx(statistics.fmean(f for _, f in got))
            assert int(rows[method][f"{task}_n"]) == len(got)
            if len(got) > 1:
                assert float(rows[method][f"{task}_hs_std"]) == pytest.approx(statistics.stdev(hs))
            else:
                assert rows[method][f"{task}_hs_std"] == ""
    # average column: per seed over both tasks, then over seeds; vaa has only seed 0 complete
    sft_avg = [statistics.fmean([values["sft", "sst2", s][0], values["sft", "agnews", s][0]]) for s in (0, 1, 2)]
    assert float(rows["sft"]["avg_hs_mean"]) == pytest.approx(statistics.fmean(sft_avg))
    assert float(rows["sft"]["avg_hs_std"]) == pytest.approx(statistics.stdev(sft_avg))
    assert int(rows["vaa"]["avg_n"]) == 1
    md = (root / "report.md").read_text()
    assert "(n=1)" in md  # the cell with fewer seeds is marked
    assert "2 failed or unfinished" in md and "RuntimeError: boom" in md
    assert (root / "report.tex").read_text().count("\\\\") == 2 + 2  # two header lines + 2 rows
    # before/after the attack: aligned HS = the seed, so mean over seeds 0..2 = 1
    assert t.before_after["sft"]["aligned"].mean == pytest.approx(1.0)


def test_failed_job_is_missing_never_a_crash(tmp_path):
    make_job(tmp_path, 0, method="sft", task="sst2", hs=40.0)
    make_job(tmp_path, 1, method="sft", task="gsm8k", status="failed")
    make_job(tmp_path, 2, method="vaa", task="sst2", hs=20.0)
    make_job(tmp_path, 3, method="vaa", task="gsm8k", status="incomplete")
    (tmp_path / "4").mkdir()
    (tmp_path / "4" / "metrics.json").write_text("{not json")  # a half-written file
    make_job(tmp_path, 5, method="gdro", task="sst2", hs=7.0, fa=None)  # a task without FA
    assert report_main([str(tmp_path)]) == 0
    rows = read_csv(tmp_path / "report.csv")
    for png in ("report.png", "report_hs_before_after.png"):  # missing cells: empty bars
        assert (tmp_path / png).stat().st_size > 1000
    assert rows["sft"]["gsm8k_hs_mean"] == "" and rows["sft"]["gsm8k_n"] == "0"
    assert rows["vaa"]["gsm8k_hs_mean"] == "" and rows["vaa"]["avg_hs_mean"] == ""
    assert float(rows["sft"]["sst2_hs_mean"]) == 40.0
    assert float(rows["gdro"]["sst2_hs_mean"]) == 7.0 and rows["gdro"]["sst2_fa_mean"] == ""
    md = (tmp_path / "report.md").read_text()
    assert "| SFT | 40.0 |" in md and "—" in md and "unreadable metrics.json" in md


def test_rows_name_defense_and_repair_columns_follow_a_swept_setting(tmp_path):
    for i, (p, defense) in enumerate([(0.05, "none"), (0.1, "none"), (0.05, "lisa"), (0.1, "lisa")]):
        make_job(tmp_path, i, ft_defense=defense, extra={"attack.harmful_ratio": p}, hs=100 * p + i)
    make_job(tmp_path, 9, restore="antidote", extra={"attack.harmful_ratio": 0.1}, hs=3.0)
    t = build_table(collect(tmp_path))
    assert t.column_key == "attack.harmful_ratio"  # one task, one swept setting → columns
    assert t.columns == ["harmful_ratio=0.05", "harmful_ratio=0.1"]
    assert t.rows == ["sft", "sft+antidote", "sft+lisa"]
    assert t.hs["sft+lisa", "harmful_ratio=0.1"].mean == pytest.approx(13.0)
    assert t.hs["sft+antidote", "harmful_ratio=0.05"] is None
    # asked for tasks as columns, the swept setting goes into the row labels instead
    t = build_table(collect(tmp_path), columns="task")
    assert "sft harmful_ratio=0.05" in t.rows and t.columns == ["sst2"]


# --- no job is dropped or merged silently (issue 12, item 7) --------------------------------
SMOKE_WORLD = {"data.align": 24, "model.arch.hidden_size": 32}  # what experiment=smoke sets


def two_sweeps(root: Path) -> dict:
    """The issue's folder: an `experiment=smoke` sweep and a default-world sweep of the same
    methods, tasks and seed side by side, 8 finished jobs with 8 different results."""
    values = {}
    for s, (sweep, smoke) in enumerate([("smoke_sweep", True), ("default_sweep", False)]):
        for i, (method, task) in enumerate([("sft", "sst2"), ("sft", "agnews"), ("vaa", "sst2"), ("vaa", "agnews")]):
            hs = 10.0 * i + (50.0 if smoke else 0.0)
            make_job(root / sweep, i, method=method, task=task, hs=hs, fa=70.0 + i + s,
                     override_only={"experiment": "smoke"} if smoke else None,
                     config_only=SMOKE_WORLD if smoke else None)
            values["smoke" if smoke else "none", method, task] = hs
    return values


def test_a_smoke_sweep_and_a_default_sweep_are_separate_rows(tmp_path):
    values = two_sweeps(tmp_path)
    result = write_report(tmp_path, figures=False)
    t = result["table"]
    assert t.row_keys == ["experiment"]
    assert set(t.rows) == {f"{m} experiment={e}" for m in ("sft", "vaa") for e in ("smoke", "none")}
    for (e, m, task), hs in values.items():  # every one of the 8 jobs is a cell of its own
        assert t.hs[f"{m} experiment={e}", task].mean == hs and t.hs[f"{m} experiment={e}", task].n == 1
    assert "8 found, 8 finished" in result["markdown"] and "8 finished jobs in the table" in result["markdown"]
    assert "label the rows: `experiment`" in result["markdown"]


def test_trainer_settings_that_change_a_model_label_rows_logging_does_not(tmp_path):
    for i, (precision, bar) in enumerate([("32-true", "true"), ("bf16-true", "false"),
                                          ("32-true", "false"), ("bf16-true", "true")]):
        make_job(tmp_path, i, seed=i // 2, hs=float(i),
                 extra={"trainer.precision": precision, "trainer.progress_bar": bar})
    assert build_table(collect(tmp_path)).column_key == "trainer.precision"  # one task: the columns
    t = build_table(collect(tmp_path), columns="task")
    assert t.row_keys == ["trainer.precision"]
    assert t.rows == ["sft precision=32-true", "sft precision=bf16-true"]
    assert t.hs["sft precision=32-true", "sst2"].n == 2  # seeds 0 and 1, whatever the progress bar


def test_a_duplicate_with_another_result_makes_the_report_refuse(tmp_path, capsys):
    a = make_job(tmp_path / "monday", 0, hs=12.0)
    b = make_job(tmp_path / "tuesday", 0, hs=14.0)  # same cell, same seed, another result
    make_job(tmp_path / "tuesday", 1, task="agnews", hs=1.0)
    with pytest.raises(ReportError) as e:
        build_table(collect(tmp_path))
    msg = str(e.value)
    assert "row 'sft', column 'sst2', seed 0" in msg and str(a) in msg and str(b) in msg
    assert "HS 12.0" in msg and "HS 14.0" in msg and "Fix:" in msg
    assert report_main([str(tmp_path), "--no-figures"]) == 2  # the CLI says so, writes nothing
    assert "refusing to build the table" in capsys.readouterr().err
    assert not (tmp_path / "report.md").exists()


def test_an_identical_rerun_is_counted_once_and_named(tmp_path):
    a = make_job(tmp_path / "first", 0, hs=12.0, seed=0)
    b = make_job(tmp_path / "again", 0, hs=12.0, seed=0)  # a cached rerun: the same numbers
    make_job(tmp_path / "first", 1, hs=20.0, seed=1)
    result = write_report(tmp_path, figures=False)
    t = result["table"]
    assert t.hs["sft", "sst2"].n == 2 and t.hs["sft", "sst2"].mean == pytest.approx(16.0)
    md = result["markdown"]
    assert "2 finished jobs in the table, 1 counted once as reruns" in md
    assert "counted once" in md and str(a) in md and str(b) in md


def test_a_setting_no_override_names_refuses_or_labels_rows(tmp_path, capsys):
    """Two sweeps of the same overrides, run before and after `align.lr` was edited in the
    config: their seeds cannot be one mean; --label align.lr makes them two rows."""
    make_job(tmp_path / "before", 0, seed=0, hs=10.0, config_only={"align.lr": 0.001})
    make_job(tmp_path / "after", 0, seed=1, hs=30.0, config_only={"align.lr": 0.0005})
    with pytest.raises(ReportError, match=r"row 'sft', column 'sst2': .* differ in align\.lr: (0\.0005 vs 0\.001|0\.001 vs 0\.0005)"):
        build_table(collect(tmp_path))
    t = build_table(collect(tmp_path), labels=("align.lr",))
    assert t.rows == ["sft lr=0.0005", "sft lr=0.001"]
    assert report_main([str(tmp_path), "--no-figures", "--label", "align.lr"]) == 0
    assert "| SFT lr=0.0005 | 30.0 |" in capsys.readouterr().out


def test_replicates_may_differ_in_seed_and_where_they_ran(tmp_path):
    for seed in (0, 1, 2):
        make_job(tmp_path, seed, seed=seed, hs=float(seed),
                 config_only={"paths.cache_dir": f"/cache/{seed}", "logger.name": f"l{seed}",
                              "trainer.log_every_n_steps": seed + 1})
    t = build_table(collect(tmp_path))
    assert t.rows == ["sft"] and t.hs["sft", "sst2"].n == 3 and not t.duplicates


def test_an_option_added_between_two_runs_is_no_disagreement(tmp_path):
    """A cached rerun after a new config option landed: the older job's config lacks the key
    (nothing is known of its value), so the two still are one cell, counted once."""
    make_job(tmp_path / "old", 0, hs=12.0)
    make_job(tmp_path / "new", 0, hs=12.0, config_only={"dro.reference_check": True})
    t = build_table(collect(tmp_path))
    assert t.hs["sft", "sst2"].n == 1 and len(t.duplicates) == 1


def test_the_report_ignores_exactly_the_trainer_keys_that_change_no_artifact():
    from vaa.pipeline.keys import NOT_ARTIFACT_TRAINER
    from vaa.report.collect import RUN_ONLY_TRAINER
    assert set(RUN_ONLY_TRAINER) == set(NOT_ARTIFACT_TRAINER)


def test_report_of_nothing_is_a_clear_error(tmp_path, capsys):
    assert report_main([str(tmp_path)]) == 2
    assert "no jobs under" in capsys.readouterr().err


def run_vaa(monkeypatch, *args: str) -> int:
    """`vaa <args>` in this process (Hydra's basic launcher runs the jobs here)."""
    from vaa.cli import main

    GlobalHydra.instance().clear()
    monkeypatch.setattr(sys, "argv", ["vaa", *args])
    try:
        main()
    except SystemExit as e:
        return int(e.code or 0)
    finally:
        GlobalHydra.instance().clear()
    return 0


TINY = ["experiment=smoke", "trainer.progress_bar=false", "model.pretrain.max_steps=5",
        "data.align=24", "data.task_train=40", "attack.n=40", "dro.estimate.n=40"]


def test_multirun_2x2_report_and_a_failed_job(tmp_path, monkeypatch):
    """`vaa -m method=sft,gdro task=sst2,agnews` where (gdro, agnews) raises: the other jobs
    still run, the failed one writes failed.json, the sweep exits non-zero at the end, and
    the report has the sweep's rows and columns with the failed cell missing."""
    from vaa.pipeline import stages as S

    orig = S.build_finetuned

    def flaky(ctx, out):
        if ctx.cfg.method.name == "gdro" and ctx.cfg.task.name == "agnews":
            raise RuntimeError("injected failure")
        return orig(ctx, out)
    monkeypatch.setattr(S, "build_finetuned", flaky)
    sweep_dir = tmp_path / "sweep"
    code = run_vaa(monkeypatch, "-m", *TINY, "method=sft,gdro", "task=sst2,agnews",
                   f"hydra.sweep.dir={sweep_dir}")
    assert code == 1  # Hydra re-raises the job's failure once the whole sweep ran
    failed = json.loads((sweep_dir / "3" / "failed.json").read_text())
    assert "injected failure" in failed["error"] and "task=agnews" in failed["overrides"]
    assert all((sweep_dir / str(i) / "metrics.json").is_file() for i in range(3))

    result = write_report(sweep_dir, figures=False)
    t = result["table"]
    assert t.rows == ["sft", "gdro"] and t.columns == ["sst2", "agnews"]
    assert t.hs["gdro", "agnews"] is None and t.hs["gdro", "avg"] is None
    for i, (method, task) in enumerate([("sft", "sst2"), ("sft", "agnews"), ("gdro", "sst2")]):
        m = json.loads((sweep_dir / str(i) / "metrics.json").read_text())
        assert (m["method"], m["task"]) == (method, task)
        assert t.hs[method, task].mean == m["harmful_score"]
        assert t.fa[method, task].mean == m["finetune_accuracy"]
    sft = [json.loads((sweep_dir / str(i) / "metrics.json").read_text()) for i in (0, 1)]
    assert t.hs["sft", "avg"].mean == pytest.approx(statistics.fmean(m["harmful_score"] for m in sft))
    # each alignment config trained once: sft (job 0; gdro's stage-1 SFT reuses it) and gdro
    assert "alignment trained 2× for 2 distinct alignment configs" in result["markdown"]


@pytest.mark.slow
def test_multirun_sh_reports_despite_a_failed_job(tmp_path):
    """`bash multirun.sh <preset> ...` in a fresh process: gdro's jobs fail at run time (no
    groups file), SFT's finish; the report is still written and the script exits non-zero."""
    import os
    import subprocess

    repo = Path(__file__).resolve().parents[1]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "VAA_CACHE_DIR": str(tmp_path / "cache")}
    proc = subprocess.run(
        ["bash", str(repo / "multirun.sh"), "paper_synthetic", "experiment=[paper_synthetic,smoke]",
         *TINY[1:], "method=sft,gdro", "task=sst2", f"dro.groups_file={tmp_path}/missing.jsonl"],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 1, proc.stdout[-2000:] + proc.stderr[-2000:]
    (report,) = (tmp_path / "outputs" / "multirun").glob("*/*_paper_synthetic/report.md")
    md = report.read_text()
    assert "| SFT |" in md and "| GDRO | — | — |" in md
    assert "alignment trained 1×" in md  # only SFT aligned; gdro failed before training
    assert (report.parent / "report.png").is_file()


def test_row_labels_keep_keys_with_one_last_name_apart():
    from vaa.report.table import short_names
    assert short_names(["align.lr", "attack.lr", "trainer.precision"]) == {
        "align.lr": "align.lr", "attack.lr": "attack.lr", "trainer.precision": "precision"}
    assert short_names(["attack.epochs"]) == {"attack.epochs": "epochs"}
