"""OmegaConf resolvers the configs use, registered when ``vaa.config`` is imported.

``${vaa.run_id:}`` — a suffix that makes a run (or sweep) directory unique: Hydra's default
``${now:%H-%M-%S}`` has one-second resolution, so two ``vaa`` started in the same second (a
common pattern in scripts) wrote into one folder and mixed their ``.hydra/overrides.yaml`` and
``metrics.json`` (issue 12, item 6). The suffix is ``<microseconds>-<pid>-<2 random bytes>``:
microseconds and the pid separate processes on one host, the random part processes on other
hosts writing to a shared file system. Registered with ``use_cache=True`` like Hydra's ``now``:
one config resolves it once, and Hydra copies the cache into every job's config of a sweep
(so the jobs of one sweep share one sweep directory, also across launcher processes).
"""

from __future__ import annotations

import os
import secrets
from datetime import datetime

from omegaconf import OmegaConf

RUN_ID = "vaa.run_id"


def run_id() -> str:
    """A new suffix on every call, e.g. ``'482913-12345-9f3a'`` (microseconds-pid-hex)."""
    return f"{datetime.now():%f}-{os.getpid()}-{secrets.token_hex(2)}"


def register_resolvers() -> None:
    """Idempotent: a second import (or a test) re-registers the same function."""
    OmegaConf.register_new_resolver(RUN_ID, run_id, use_cache=True, replace=True)


register_resolvers()
