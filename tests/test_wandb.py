"""logger=wandb: offline without a key, one run per job (finished at its end), grouped by
sweep, named from the overrides, with the resolved config, per-step metrics and the final
table; the key never reaches the run's files."""

from __future__ import annotations

import json
import struct
import time
from pathlib import Path

import pytest

pytest.importorskip("wandb")
from wandb.proto import wandb_internal_pb2 as pb  # noqa: E402

from test_report import TINY, run_vaa  # noqa: E402
from vaa.tracking import build_tracker  # noqa: E402
from vaa.tracking.wandb import resolve_mode  # noqa: E402

BLOCK = 32768  # the .wandb file: LevelDB-log framing of protobuf Records


def wandb_records(path: Path):
    data, pos, buf = path.read_bytes(), 7, b""  # 7: ":W&B" + magic + version
    assert data[:4] == b":W&B"
    while pos + 7 <= len(data):
        if BLOCK - pos % BLOCK < 7:
            pos += BLOCK - pos % BLOCK
            continue
        _, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        chunk, pos = data[pos + 7:pos + 7 + length], pos + 7 + length
        if kind == 0:
            break
        buf = chunk if kind in (1, 2) else buf + chunk
        if kind in (1, 4):
            r = pb.Record()
            r.ParseFromString(buf)
            yield r


def read_run(run_dir: Path, wait_s: float = 30.0) -> dict:
    """The offline run's records. wandb's service process writes the file asynchronously and
    may still be flushing when ``finish`` has returned: wait for the exit record."""
    deadline = time.monotonic() + wait_s
    while True:
        out = _read_run(run_dir)
        if out["exit"] is not None or time.monotonic() > deadline:
            return out
        time.sleep(0.2)


def _read_run(run_dir: Path) -> dict:
    files = list((run_dir / "wandb").glob("offline-run-*/run-*.wandb"))
    assert len(files) == 1, f"expected one offline W&B run in {run_dir}, found {files}"
    out = {"history": [], "summary": {}, "config": {}, "exit": None, "name": None, "group": None}
    for r in wandb_records(files[0]):
        kind = r.WhichOneof("record_type")
        if kind == "run":
            out.update(name=r.run.display_name, group=r.run.run_group,
                       config={i.key: i.value_json for i in r.run.config.update})
        elif kind == "history":
            out["history"].append({i.key or "/".join(i.nested_key): i.value_json for i in r.history.item})
        elif kind == "summary":
            out["summary"].update({i.key: i.value_json for i in r.summary.update if i.key})
        elif kind == "exit":
            out["exit"] = r.exit.exit_code
    return out


@pytest.fixture
def no_key(monkeypatch):
    for var in ("WANDB_API_KEY", "WANDB_MODE"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("WANDB_SILENT", "true")


def test_mode_offline_without_a_key(monkeypatch):
    assert resolve_mode(None, {}) == "offline"
    assert resolve_mode("online", {}) == "offline"  # never prompts for a login
    assert resolve_mode(None, {"WANDB_API_KEY": "k"}) == "online"
    assert resolve_mode(None, {"WANDB_API_KEY": "k", "WANDB_MODE": "disabled"}) == "disabled"
    with pytest.raises(ValueError, match="expected one of"):
        resolve_mode("sometimes", {})


def test_logger_group_builds_the_tracker(compose):
    assert build_tracker(compose(["logger=csv"]).logger) is None
    tracker = build_tracker(compose(["logger=wandb", "logger.project=p"]).logger)
    assert type(tracker).__name__ == "WandbTracker" and tracker.project == "p"


def test_missing_wandb_is_a_clear_error(monkeypatch):
    from vaa.tracking.wandb import import_wandb

    monkeypatch.setitem(__import__("sys").modules, "wandb", None)
    with pytest.raises(ImportError, match=r"pip install -e '\.\[wandb\]'"):
        import_wandb()


def test_offline_runs_one_per_job(tmp_path, monkeypatch, no_key):
    """A 2-job sweep with logger=wandb: each job dir holds its own finished offline run with
    the resolved config, per-step losses of every trained stage and the final scores."""
    monkeypatch.setenv("WANDB_API_KEY", "")  # empty: treated as absent
    sweep = tmp_path / "sweep"
    code = run_vaa(monkeypatch, "-m", *TINY, "logger=wandb", "method=sft", "task=sst2,agnews",
                   "trainer.log_every_n_steps=1", f"hydra.sweep.dir={sweep}")
    assert code == 0
    runs = [read_run(sweep / str(i)) for i in (0, 1)]
    assert any(k.startswith("align/loss") for h in runs[0]["history"] for k in h)
    assert [r["name"] for r in runs][0] != runs[1]["name"]
    assert "task=sst2" in runs[0]["name"] and "task=agnews" in runs[1]["name"]
    assert runs[0]["group"] == runs[1]["group"] == str(sweep)
    for r, task in zip(runs, ("sst2", "agnews")):
        assert r["exit"] == 0  # finished at the end of its job
        config = {k: json.loads(v) for k, v in r["config"].items()}  # the resolved config
        assert config["task"]["name"] == task and config["method"]["name"] == "sft"
        assert config["attack"]["n"] == 40 and config["logger"]["project"] == "vaa"
        logged = {k for h in r["history"] for k in h}
        assert "finetune/loss" in logged and "trainer/global_step" in logged
        assert "summary_table" in str(logged)
        assert {"harmful_score", "finetune_accuracy", "aligned/harmful_score"} <= set(r["summary"])
    # job 1 reused job 0's world, base and aligned model: only its own fine-tuning is logged
    assert not any(k.startswith(("align/", "base/")) for h in runs[1]["history"] for k in h)


def test_vaa_sampler_logged_and_key_never_written(tmp_path, monkeypatch, no_key):
    """A single VAA run with a key in the environment (forced offline): the sampler's
    probabilities are logged per step, and the key appears in no file of the run."""
    secret = "0123456789abcdef-test-key"
    monkeypatch.setenv("WANDB_API_KEY", secret)
    run_dir = tmp_path / "run"
    code = run_vaa(monkeypatch, *TINY, "logger=wandb", "logger.mode=offline", "method=vaa",
                   "trainer.log_every_n_steps=1", f"hydra.run.dir={run_dir}")
    assert code == 0
    run = read_run(run_dir)
    assert run["exit"] == 0 and run["group"] == "" and run["name"].startswith("attack.n=40")
    p_vul = [float(h["align/dro/p_vulnerable"]) for h in run["history"] if "align/dro/p_vulnerable" in h]
    assert p_vul and all(0.0 <= p <= 1.0 for p in p_vul)
    for f in run_dir.rglob("*"):
        if f.is_file():
            assert secret.encode() not in f.read_bytes(), f"the W&B key leaked into {f}"


def test_report_logged_to_the_sweeps_group(tmp_path, no_key):
    """`vaa-report DIR --wandb`: the paper table and its figures as one "report" run in the
    group the sweep's jobs used (their hydra.sweep.dir, read from multirun.yaml)."""
    from test_report import make_job

    from vaa.report.cli import main as report_main

    for i, (method, hs) in enumerate([("sft", 40.0), ("vaa", 20.0)]):
        make_job(tmp_path, i, method=method, hs=hs)
    (tmp_path / "multirun.yaml").write_text("hydra:\n  sweep:\n    dir: outputs/multirun/x/y\n")
    assert report_main([str(tmp_path), "--wandb"]) == 0
    run = read_run(tmp_path)
    assert run["name"] == "report" and run["group"] == "outputs/multirun/x/y" and run["exit"] == 0
    logged = {k.split("/")[0] for h in run["history"] for k in h}
    assert {"report", "report", "report_hs_before_after"} <= logged
    assert json.loads(run["summary"]["sft/sst2_hs_mean"]) == 40.0
    assert json.loads(run["summary"]["vaa/avg_hs_mean"]) == 20.0
