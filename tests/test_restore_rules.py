"""The repair's memory is checked before any stage runs (vaa/config/restore_rules.py): the
curvature repair at its defaults on Llama-2-7B plans 565 GB (6 fp32 vectors over all seven
linear layers, 32 rows of 512 tokens per Gauss-Newton product), which no single GPU holds."""

from __future__ import annotations

import pytest

from vaa.config import restore_rules
from vaa.config.validate import find_problems
from vaa.restore import curvature_memory as cv

LLAMA = ["experiment=paper_llama2", "method=sft", "restore=curvature", "trainer=cpu"]


@pytest.fixture
def host_gb(monkeypatch):
    def set_(gb):
        monkeypatch.setattr(cv, "host_available_gb", lambda: gb * 1e9 / 2**30)
    return set_


def restore_problems(cfg):
    return [m for k, m in find_problems(cfg) if k.startswith("restore.")]


def test_the_default_repair_on_a_7b_model_is_refused_with_the_batch_that_fits(compose, host_gb):
    host_gb(150)
    (msg,) = restore_problems(compose(LLAMA))  # CPU trainer: 0.39 GB runtime, not the GPU's 1.0
    assert "plans 564.8 GB on Llama-2-7B" in msg and "curvature vectors 155.4" in msg
    assert "150.0 GB" in msg and "restore.modules" in msg  # weights + vectors alone: 182.8 GB
    host_gb(300)
    (msg,) = restore_problems(compose(LLAMA))
    # 300 − (564.8 − 382.1) = 117.2 GB for products of 11.94 GB per row: 9 rows
    assert "set restore.batch_size=9 " in msg


def test_a_repair_that_fits_passes_and_a_smaller_space_fits(compose, host_gb):
    host_gb(200)
    cfg = compose([*LLAMA, "restore.modules=[q_proj,v_proj]", "restore.batch_size=4"])
    assert restore_problems(cfg) == []  # 101.5 GB planned


def test_unknown_device_memory_skips_the_check(compose, monkeypatch):
    monkeypatch.setattr(restore_rules, "device_capacity_gb", lambda cfg: None)
    assert restore_problems(compose(LLAMA)) == []


def test_repairs_without_a_plan_are_not_checked(compose, host_gb):
    host_gb(0.001)
    assert restore_problems(compose(["experiment=paper_llama2", "method=sft", "restore=merge",
                                     "trainer=cpu"])) == []
