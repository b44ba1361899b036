"""GGUF sources of a real model (vaa/models/gguf.py): where the file is found, the errors that
name the key and the install command, and the source hash in the base stage's key (hashed once
per path, size and mtime). The conversion itself runs on the real SmolLM2 file in
tests/test_real_model.py."""

from __future__ import annotations

import os

import pytest

from vaa.errors import UserError
from vaa.models.gguf import INSTALL_HINT, MissingPackage, file_sha256, gguf_path
from vaa.models.hf import hashed_model_config, is_hf_model
from vaa.models.hub import MissingResource


def test_missing_package_names_the_install_command():
    with pytest.raises(MissingPackage) as e:
        gguf_path({"gguf_file": "m.gguf", "gguf_package": "no_such_package_vaa_xyz"})
    assert isinstance(e.value, UserError)
    assert "model.gguf_package=no_such_package_vaa_xyz" in str(e.value)
    assert INSTALL_HINT in str(e.value) and ".[smollm]" in INSTALL_HINT


def test_file_found_in_path_folder_or_as_a_path(tmp_path, monkeypatch):
    f = tmp_path / "m.gguf"
    f.write_bytes(b"GGUF")
    assert gguf_path({"gguf_file": "m.gguf", "path": str(tmp_path)}) == f
    assert gguf_path({"gguf_file": "m.gguf", "path": str(f)}) == f
    monkeypatch.chdir(tmp_path)
    assert gguf_path({"gguf_file": "m.gguf"}).resolve() == f
    assert gguf_path({"gguf_file": None, "path": str(tmp_path)}) is None
    with pytest.raises(MissingResource, match="model.gguf_file=other.gguf"):
        gguf_path({"gguf_file": "other.gguf", "path": str(tmp_path)})
    assert is_hf_model({"gguf_file": "m.gguf", "arch": {"hidden_size": 8}})


def test_digest_is_remembered_by_path_size_and_mtime(tmp_path):
    f = tmp_path / "m.gguf"
    f.write_bytes(b"A" * 1000)
    first = file_sha256(f)
    st = f.stat()
    f.write_bytes(b"B" * 1000)  # same size; put the old mtime back: the memo answers
    os.utime(f, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert file_sha256(f) == first
    os.utime(f, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))  # touched: hashed again
    assert file_sha256(f) != first


def test_base_key_holds_the_file_content(tmp_path):
    f = tmp_path / "m.gguf"
    f.write_bytes(b"one")
    model = {"name": "x", "arch": None, "gguf_file": "m.gguf", "gguf_package": None,
             "path": str(tmp_path), "lora": {"enabled": False}}
    a = hashed_model_config(model)
    assert len(a["gguf_sha256"]) == 64
    st = f.stat()
    f.write_bytes(b"two")
    os.utime(f, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    assert hashed_model_config(model)["gguf_sha256"] != a["gguf_sha256"]
    tiny = {"name": "tiny", "arch": {"hidden_size": 8}, "gguf_file": None, "gguf_package": None}
    assert "gguf_file" not in hashed_model_config(tiny)  # tiny-model keys are unchanged
    assert "gguf_sha256" not in hashed_model_config(tiny)
