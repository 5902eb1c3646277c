"""The llama.cpp provisioner reuses its cache and explains what is missing."""

from __future__ import annotations

from pathlib import Path

import pytest

from plugins import provision_llamacpp


def test_a_cached_build_is_reused_without_building(tmp_path: Path) -> None:
    binary = provision_llamacpp.cached_binary("9.9.9", cpu=True, cache=tmp_path)
    binary.parent.mkdir(parents=True)
    binary.write_text("#!/bin/sh\n")
    binary.chmod(0o755)
    said: list[str] = []
    assert (
        provision_llamacpp.ensure("9.9.9", cpu=True, cache=tmp_path, progress=said.append) == binary
    )
    assert said == []


def test_cpu_and_cuda_builds_are_cached_apart(tmp_path: Path) -> None:
    cpu = provision_llamacpp.cached_binary("1.0", cpu=True, cache=tmp_path)
    gpu = provision_llamacpp.cached_binary("1.0", cpu=False, cache=tmp_path)
    assert cpu != gpu and cpu.parent.parent.name == "1.0-cpu"


def test_a_missing_cmake_is_named_with_the_fix(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(provision_llamacpp.shutil, "which", lambda name: None)
    with pytest.raises(RuntimeError, match="cmake is needed"):
        provision_llamacpp.ensure("9.9.9", cache=tmp_path, progress=lambda _: None)
