"""Smoke runs of the benchmarks (quick mode, in-process): each prints its figures as one JSON
line, last on stdout, under its own name. No speed is asserted here: targets live in the
benchmarks themselves (DESIGN.md, "Observable contracts")."""

from __future__ import annotations

import importlib
import json
import numbers
import sys
from pathlib import Path

import pytest

# `benchmarks/` is a top-level folder of the repository, not part of the installed package:
# make it importable however pytest was started (`pytest` does not put the cwd on sys.path).
ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))


def _last_json_line(capsys) -> dict:
    out = capsys.readouterr().out
    lines = [line for line in out.splitlines() if line.strip()]
    assert lines, "the benchmark printed nothing on stdout"
    return json.loads(lines[-1])


def _positive(record: dict, keys: list[str]) -> None:
    for k in keys:
        v = record.get(k)
        assert isinstance(v, numbers.Real) and not isinstance(v, bool), (k, v)
        assert v > 0, (k, v)


@pytest.mark.parametrize("name, keys", [
    ("loop_overhead", ["ratio", "lightning_ms", "bare_ms", "steps", "batch_size", "seq_len",
                       "hidden_size", "layers"]),
    ("generation", ["speedup", "batched_prompts_per_s", "single_prompts_per_s",
                    "identical_fraction", "n_prompts", "batched_peak_fraction", "peak_gflops",
                    "lean_vs_hf", "hf_tokens_per_s"]),
    ("step_cost", ["steps", "batch_size", "hidden_size", "layers", "peak_rss_mb"]),
    ("host_heap", ["steps", "batch_size", "seq_len", "trim_peak_ratio", "trim_time_ratio",
                     "keep_peak_ratio", "keep_time_ratio"]),
])
def test_benchmark_quick_run_reports_one_json_line(name, keys, capsys):
    import torch

    mod = importlib.import_module(f"benchmarks.{name}")
    threads = torch.get_num_threads()
    returned = mod.main(["--quick"])
    assert torch.get_num_threads() == threads  # the run's thread setting is undone
    record = _last_json_line(capsys)
    assert record["benchmark"] == name
    assert record == json.loads(json.dumps(returned))
    _positive(record, keys)
    assert record["machine"]["threads"] >= 1
    if name == "loop_overhead":  # both sides did the same work: the same weights at the end
        assert record["max_weight_diff"] <= 1e-6
    if name == "host_heap":  # every policy ran in its own process and trained
        assert set(record["settings"]) == {"system", "trim", "keep"}
        assert all(r["peak_rss_gb"] > 0 and r["tensors_alive_gb"] > 0 for r in record["settings"].values())
    if name == "generation":  # greedy: batching must not change the text
        assert record["identical_fraction"] == 1.0
        assert record["hf_identical_fraction"] == 1.0  # the lean loop decodes as model.generate
    if name == "step_cost":  # every method and ft defense (conf/method, conf/ft_defense), vs SFT
        from benchmarks.step_cost import trains  # method=none (the identity) is not timed
        methods = sorted(p.stem for p in (ROOT / "conf" / "method").glob("*.yaml") if trains(p))
        methods = sorted(methods + [p.stem for p in (ROOT / "conf" / "ft_defense").glob("*.yaml")
                                    if p.stem != "none"])
        for key in ("ratio_vs_sft", "passes", "realised_passes", "step_ms", "extra_state_mb",
                    "page_faults_per_step"):
            assert sorted(record[key]) == methods, key
        assert record["host_heap"] == "system" and all(v >= 0 for v in record["page_faults_per_step"].values())
        for key in ("ratio_vs_sft", "passes", "realised_passes", "step_ms"):
            _positive(record[key], methods)
        assert record["ratio_vs_sft"]["sft"] == 1.0
        assert record["passes"]["sft"] == 1 and record["extra_state_mb"]["sft"] == 0
        assert all(record["realised_passes"][m] >= 1 for m in methods)
        passes = {"vaccine": 2, "booster": 3, "repnoise": 2, "lisa": 1, "ema": 1, "lookahead": 1}
        for m, n in passes.items():  # counted decoder forwards per step = the declared passes
            assert record["realised_passes"][m] == record["passes"][m] == n, m
        assert set(record["within_target"]) == {"vaccine", "booster"}
        if "vaa" in methods:  # bernoulli mixing: one or two passes a step; SAM restore buffers
            assert 1 <= record["realised_passes"]["vaa"] <= 2
            if record["realised_passes"]["vaa"] > 1:  # a perturbed step allocated them
                assert record["extra_state_mb"]["vaa"] > 0
            assert isinstance(record["vaa_within_target"], bool)
            assert record["vaa_target"] == pytest.approx(1.05 * (1 + record["mean_lambda"]["vaa"]))


def test_step_cost_measures_the_gemm_peak_on_the_device_its_steps_ran_on(capsys, monkeypatch):
    """The peak fraction divides a step's FLOP rate by a GEMM rate: both on one device (an
    H200 run once divided CUDA steps by the CPU's GEMM and reported 550 % of 'peak')."""
    from benchmarks import step_cost

    seen = []
    monkeypatch.setattr(step_cost, "matmul_gflops",
                        lambda n, device="cpu": seen.append(str(device)) or 100.0)
    step_cost.main(["--quick", "--device", "cpu", "--methods", "sft"])
    assert seen and set(seen) == {"cpu"}


def test_matmul_gflops_runs_on_the_named_device():
    from benchmarks.real_model import matmul_gflops

    assert matmul_gflops(64, reps=2, device="cpu") > 0
