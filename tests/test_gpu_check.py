"""The GPU check script (benchmarks/gpu_check.py) on the CPU at a tiny shape: every run of the
grid reports, VAA's realised perturbation is logged beside the nominal ρ, and a perturbation
that rounds away in bf16-true is reported as refused, not as a number."""

from __future__ import annotations

import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))


def test_gpu_check_grid_on_cpu(capsys):
    from benchmarks import gpu_check

    out = gpu_check.main(["--shapes", "tiny", "--device", "cpu", "--steps", "1", "--seq", "16",
                          "--batch", "2", "--modes", "full", "--precisions", "bf16-true,bf16-mixed"])
    last = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert last["benchmark"] == "gpu_check" and last == json.loads(json.dumps(out))
    assert [(r["precision"], r["method"]) for r in last["runs"]] == [
        ("bf16-true", "sft"), ("bf16-true", "vaa"), ("bf16-mixed", "sft"), ("bf16-mixed", "vaa")]
    for r in last["runs"]:
        assert r["status"] == "ok" and r["tokens_per_s"] > 0
        if r["method"] == "vaa":
            assert r["eps_norm"] == 0.4 and 0.2 <= r["eps_realised_norm"] <= 0.6


def test_gpu_check_grad_ckpt_runs_the_presets_stage_shape(capsys):
    """--grad-ckpt (the 7B presets' setting) trains full and LoRA in 32-true, and the first
    step's loss is the one without checkpointing (same seed, same random batches)."""
    from benchmarks import gpu_check

    def runs(*extra):
        import torch
        torch.manual_seed(0)
        return gpu_check.main(["--shapes", "tiny", "--device", "cpu", "--steps", "1", "--seq", "16",
                               "--batch", "2", "--precisions", "32-true", "--methods", "vaa", *extra])["runs"]

    plain, ckpt = runs(), runs("--grad-ckpt")
    assert [r["status"] for r in ckpt] == ["ok", "ok"] and all(r["grad_ckpt"] for r in ckpt)
    for a, b in zip(plain, ckpt):
        assert abs(a["loss"] - b["loss"]) < 1e-4
