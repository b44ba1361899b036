"""Finding Hugging Face files without ever hanging: local first, the hub only when reachable.

Without offline flags, a hub name that is not cached makes `from_pretrained` wait ~48 s and
`load_dataset` ~23 s before failing (ENVIRONMENT.md). So before touching the hub we check,
once per process and within a few seconds, whether it answers at all; when it does not (or
``HF_HUB_OFFLINE`` / ``TRANSFORMERS_OFFLINE`` / ``HF_DATASETS_OFFLINE`` is set), only local
files are used and a missing one is one error naming what is missing and which config key
or path supplies it. With network, a hub name still downloads as usual.
"""

from __future__ import annotations

import os
import socket
import threading
from functools import lru_cache
from pathlib import Path
from urllib.parse import urlparse

from vaa.errors import MissingFile

_TRUE = {"1", "true", "yes", "on"}
PROBE_TIMEOUT_S = 3.0


class MissingResource(MissingFile):
    """A model, dataset or file that is not available locally (and cannot be downloaded)."""


def offline_flag() -> bool:
    return any(os.environ.get(v, "").strip().lower() in _TRUE
               for v in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_DATASETS_OFFLINE"))


@lru_cache(maxsize=1)
def _probe(host: str, port: int) -> bool:
    ok: list[bool] = []

    def connect() -> None:  # DNS ignores socket timeouts: bound the whole probe by a thread
        try:
            socket.create_connection((host, port), timeout=PROBE_TIMEOUT_S).close()
            ok.append(True)
        except OSError:
            pass

    t = threading.Thread(target=connect, daemon=True)
    t.start()
    t.join(PROBE_TIMEOUT_S + 0.5)
    return bool(ok)


def hub_reachable() -> bool:
    """Whether the hub answers (False at once when an offline flag is set)."""
    if offline_flag():
        return False
    url = urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co"))
    return _probe(url.hostname or "huggingface.co", url.port or (443 if url.scheme != "http" else 80))


MODEL_PATTERNS = ["*.json", "*.safetensors", "*.model", "*.txt", "*.tiktoken", "tokenizer*"]


def model_dir(*, path: str | None, hub_name: str | None, revision: str | None,
              key: str, what: str = "model") -> Path:
    """A local directory holding the model's config, weights and tokenizer.

    ``key`` is the config prefix the error messages name (``model``, ``judge.build``): its
    ``.path`` (local directory) or ``.hub_name`` supplies the model.
    """
    if path:
        p = Path(path).expanduser()
        if not (p / "config.json").is_file():
            raise MissingResource(
                f"{key}.path={path}: no {what} there (expected a directory with config.json and "
                f"the weights, as save_pretrained writes); set {key}.path to such a directory")
        return p
    if not hub_name:
        raise MissingResource(f"no {what} configured: set {key}.path=<local directory> or "
                              f"{key}.hub_name=<Hugging Face name>")
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError

    try:
        local = Path(snapshot_download(hub_name, revision=revision, local_files_only=True,
                                       allow_patterns=MODEL_PATTERNS))
        if (local / "config.json").is_file():
            return local
    except (LocalEntryNotFoundError, OSError, ValueError):
        pass
    if not hub_reachable():
        raise MissingResource(
            f"{what} {hub_name!r} is not available locally and the Hugging Face hub cannot be "
            f"reached (offline): copy it to this machine (e.g. `hf download "
            f"{hub_name} --local-dir DIR` where there is network) and set {key}.path=DIR, or "
            f"point HF_HOME at a cache that holds it")
    local = Path(snapshot_download(hub_name, revision=revision, allow_patterns=MODEL_PATTERNS))
    if not has_weights(local):  # an older repository with PyTorch .bin weights only
        local = Path(snapshot_download(hub_name, revision=revision,
                                       allow_patterns=[*MODEL_PATTERNS, "*.bin"]))
    return local


def has_weights(d: Path) -> bool:
    return any(d.glob("*.safetensors")) or any(d.glob("*.bin"))
