"""Shared fixtures: Hydra's compose API over conf/, and a private artifact cache per test."""

from __future__ import annotations

from pathlib import Path

import pytest
from hydra import compose as hydra_compose
from hydra import initialize_config_dir
from hydra.core.global_hydra import GlobalHydra

from vaa.config.schema import register

REPO_ROOT = Path(__file__).resolve().parents[1]
CONF_DIR = REPO_ROOT / "conf"


def compose_config(overrides: list[str] | tuple[str, ...] = ()):
    """The run config `vaa <overrides>` would see (without the `hydra` node)."""
    register()
    GlobalHydra.instance().clear()
    try:
        with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
            return hydra_compose("config", overrides=list(overrides), return_hydra_config=False)
    finally:
        GlobalHydra.instance().clear()


@pytest.fixture(scope="session")
def compose():
    """``compose(overrides=[...])`` → DictConfig; raises what Hydra raises on bad input."""
    return compose_config


@pytest.fixture(autouse=True)
def _private_cache(tmp_path_factory, monkeypatch):
    """No test reads or writes ~/.cache/vaa: ``paths.cache_dir=null`` falls back to this."""
    monkeypatch.setenv("VAA_CACHE_DIR", str(tmp_path_factory.mktemp("vaa_cache")))


@pytest.fixture(scope="module")
def one_thread():
    """One intra-op thread for a module of tiny-model tests (``pytestmark =
    pytest.mark.usefixtures("one_thread")``): their matrices are small, so more threads only
    add synchronisation, and on a busy machine they make each step several times slower."""
    import torch

    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
