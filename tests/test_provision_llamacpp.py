"""The llama.cpp provisioner: command lines for the GPUs seen, cache keys, sources, records.

A fake `cmake` on a PATH of its own records its command lines and "builds" a script; no
compiler ever runs (tests/fake_tools.py).
"""

from __future__ import annotations

import json
import subprocess
import tarfile
from pathlib import Path

import pytest

from plugins import engine_llamacpp, llamacpp_builds, llamacpp_sources, provision_llamacpp
from tests import fake_tools
from tests.fake_pynvml import FakeNvml

MIB = 1024 * 1024


def rtx_3090_and_4060() -> FakeNvml:
    nvml = FakeNvml()
    nvml.gpus[0].update(name="NVIDIA GeForce RTX 3090", cc=[8, 6], mem_total=24576 * MIB)
    nvml.add_gpu(name="NVIDIA GeForce RTX 4060 Ti", cc=[8, 9], mem_total=16384 * MIB)
    return nvml


@pytest.fixture
def tools(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    folder = fake_tools.toolbox(tmp_path / "tools")
    monkeypatch.setenv("PATH", str(folder))
    monkeypatch.setattr(provision_llamacpp, "NVCC_PLACES", ())
    monkeypatch.delenv("FAKE_CMAKE_FAIL", raising=False)
    return folder


@pytest.fixture
def checkout(tmp_path: Path) -> Path:
    return fake_tools.llama_cpp_tree(tmp_path / "llama.cpp")


def test_a_cuda_build_targets_exactly_the_gpus_nvml_reports(
    tools: Path, checkout: Path, tmp_path: Path
) -> None:
    said: list[str] = []
    binary = provision_llamacpp.ensure(
        f"path:{checkout}", cache=tmp_path / "cache", nvml=rtx_3090_and_4060(), progress=said.append
    )
    configure, build = fake_tools.cmake_calls(tools)
    flags = fake_tools.flags_of(configure)
    assert configure[:2] == ["-S", str(checkout)] and configure[4:6] == ["-G", "Ninja"]
    assert flags["CMAKE_CUDA_ARCHITECTURES"] == "86;89"
    assert flags["GGML_CUDA"] == "ON" and flags["BUILD_SHARED_LIBS"] == "OFF"
    for off in ("LLAMA_OPENSSL", "LLAMA_CURL", "GGML_CUDA_NCCL"):
        assert flags[off] == "OFF"
    assert build[:2] == ["--build", configure[3]] and build[2:4] == ["--target", "llama-server"]
    assert any("CMAKE_CUDA_ARCHITECTURES=86;89" in line for line in said)
    assert [line for line in said if line.startswith("building llama-server: ")][-1].startswith(
        "building llama-server: 100%"
    )
    assert binary.name == "llama-server" and binary.parent.parent.name.startswith(
        "local-cuda-sm86.89"
    )


def test_the_engine_record_and_the_build_log_are_kept_beside_the_binary(
    tools: Path, checkout: Path, tmp_path: Path
) -> None:
    binary = provision_llamacpp.ensure(
        f"path:{checkout}", cache=tmp_path / "cache", archs=["86"], progress=lambda _: None
    )
    record = json.loads((binary.parent / "engine.json").read_text())
    assert record["version"] == "local" and record["source"] == f"path:{checkout}"
    assert record["path"] == str(binary) and record["backend"] == "cuda"
    assert record["cuda_archs"] == ["86"] and "-DLLAMA_CURL=OFF" in record["flags"]
    assert record["built_at"].endswith("+00:00")
    log = Path(record["build_log"]).read_text()
    assert "[20/20] Building CXX object" in log and "$ cmake -S" in log
    assert not (binary.parent.parent / "build").exists()  # the scratch tree is gone


def test_without_ninja_cmake_picks_its_default_generator(tmp_path: Path, checkout: Path) -> None:
    folder = fake_tools.toolbox(tmp_path / "tools", ninja=False)
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("PATH", str(folder))
        provision_llamacpp.ensure(
            f"path:{checkout}", cache=tmp_path / "c", archs=["89"], progress=lambda _: None
        )
    configure = fake_tools.cmake_calls(folder)[0]
    assert "-G" not in configure


def test_a_cached_build_is_reused_and_other_archs_or_backends_build_apart(
    tools: Path, checkout: Path, tmp_path: Path
) -> None:
    cache = tmp_path / "cache"

    def ensure(**kwargs: object) -> Path:
        return provision_llamacpp.ensure(
            f"path:{checkout}", cache=cache, progress=lambda _: None, **kwargs
        )

    first = ensure(archs=["86"])
    assert ensure(archs=["86"]) == first and len(fake_tools.cmake_calls(tools)) == 2
    other = ensure(archs=["86", "89"])
    cpu = ensure(cpu=True)
    assert len({first, other, cpu}) == 3 and len(fake_tools.cmake_calls(tools)) == 6
    assert "GGML_CUDA_NCCL" not in fake_tools.flags_of(fake_tools.cmake_calls(tools)[4])
    assert ensure(archs=["86"], rebuild=True) == first and len(fake_tools.cmake_calls(tools)) == 8


def test_cache_keys_name_version_backend_archs_and_source() -> None:
    key = llamacpp_builds.cache_key
    pypi = llamacpp_sources.parse("0.3.36")
    assert key(pypi, "cpu") == "0.3.36-cpu"  # the folder earlier releases built into
    assert key(pypi, "cuda", ("86", "89")) == "0.3.36-cuda-sm86.89"
    assert key(llamacpp_sources.parse("pypi:0.3.37"), "cuda", ("86",)) == "0.3.37-cuda-sm86"
    a = key(llamacpp_sources.parse("path:/src/a"), "cuda", ("86",))
    b = key(llamacpp_sources.parse("path:/src/b"), "cuda", ("86",))
    moved = key(llamacpp_sources.parse("path:/src/a"), "cuda", ("86",), commit="abc")
    assert len({a, b, moved}) == 3 and a.startswith("local-cuda-sm86-path.")
    git = key(llamacpp_sources.parse("git+https://example.org/llama.cpp@b6500"), "cuda", ("89",))
    assert git.startswith("b6500-cuda-sm89-git.")


@pytest.mark.parametrize(
    "text",
    ["", "git+https://example.org/llama.cpp", "git+ssh://git@example.org/r", "svn:x", "pypi:x y"],
)
def test_a_source_that_cannot_be_used_is_refused_with_the_forms_that_can(text: str) -> None:
    with pytest.raises(ValueError):
        llamacpp_sources.parse(text)


def test_a_git_source_is_built_at_its_pinned_ref_and_the_commit_recorded(
    tools: Path, tmp_path: Path
) -> None:
    repo = fake_tools.llama_cpp_tree(tmp_path / "upstream", marker="v1")

    def git(*args: str) -> str:
        return subprocess.run(
            ["git", "-C", str(repo), *args], check=True, capture_output=True, text=True
        ).stdout.strip()

    git("init", "-q")
    git("add", ".")
    git("-c", "user.name=t", "-c", "user.email=t@example.org", "commit", "-qm", "v1")
    git("tag", "b100")
    pinned = git("rev-parse", "HEAD")
    (repo / "CMakeLists.txt").write_text("project(llama.cpp) # v2\n")
    git("-c", "user.name=t", "-c", "user.email=t@example.org", "commit", "-qam", "v2")

    binary = provision_llamacpp.ensure(
        f"git+file://{repo}@b100", cache=tmp_path / "cache", archs=["86"], progress=lambda _: None
    )
    record = llamacpp_builds.read_record(binary)
    assert record is not None and record.commit == pinned and record.version == "b100"
    configure = fake_tools.cmake_calls(tools)[0]
    built_from = Path(configure[1])
    assert built_from != repo and not built_from.exists()  # a clone, removed after the build
    assert binary.parent.parent.name.startswith("b100-cuda-sm86-git.")


def test_the_pypi_sdist_is_unpacked_from_the_cache_without_downloading_again(
    tools: Path, tmp_path: Path
) -> None:
    cache = tmp_path / "cache"
    staged = fake_tools.llama_cpp_tree(tmp_path / "sdist/llama_cpp_python-9.9.9/vendor/llama.cpp")
    (cache / "sdists").mkdir(parents=True)
    with tarfile.open(cache / "sdists/llama_cpp_python-9.9.9.tar.gz", "w:gz") as tar:
        tar.add(staged.parents[1], arcname="llama_cpp_python-9.9.9")
    binary = provision_llamacpp.ensure("9.9.9", cpu=True, cache=cache, progress=lambda _: None)
    assert binary == llamacpp_builds.cached_binary("9.9.9", cpu=True, cache=cache)
    configure = fake_tools.cmake_calls(tools)[0]
    assert configure[1].endswith("llama_cpp_python-9.9.9/vendor/llama.cpp")
    assert fake_tools.flags_of(configure)["GGML_CUDA"] == "OFF"


def test_an_existing_binary_is_used_as_it_is_and_recorded(tools: Path, tmp_path: Path) -> None:
    existing = fake_tools.write_tool(tmp_path, "llama-server", "#!/bin/sh\necho 'version: 42'\n")
    binary = provision_llamacpp.ensure(f"binary:{existing}", cache=tmp_path / "c")
    assert binary.resolve() == existing and fake_tools.cmake_calls(tools) == []
    record = llamacpp_builds.read_record(binary)
    assert record is not None and record.backend == "binary" and record.version == "42"


def test_a_failed_build_names_its_log_installs_nothing_and_is_tried_again(
    tools: Path, checkout: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    cache = tmp_path / "cache"
    monkeypatch.setenv("FAKE_CMAKE_FAIL", "build")
    with pytest.raises(RuntimeError) as failed:
        provision_llamacpp.ensure(
            f"path:{checkout}", cache=cache, archs=["86"], progress=lambda _: None
        )
    message = str(failed.value)
    assert 'identifier "boom" is undefined' in message and "build.log" in message
    assert list(cache.glob("*/bin/llama-server")) == []
    monkeypatch.delenv("FAKE_CMAKE_FAIL")
    assert provision_llamacpp.ensure(
        f"path:{checkout}", cache=cache, archs=["86"], progress=lambda _: None
    ).is_file()


def test_a_folder_that_is_not_llama_cpp_is_refused(tools: Path, tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    with pytest.raises(provision_llamacpp.interfaces.EnvironmentMissing) as refused:
        provision_llamacpp.ensure(f"path:{tmp_path / 'empty'}", cache=tmp_path / "c", archs=[])
    assert "not a llama.cpp source tree" in refused.value.what


@pytest.mark.parametrize(
    ("missing", "named", "fix"),
    [
        ({"cmake": False}, "cmake", "pacman -S cmake"),
        ({"compiler": False}, "C++ compiler", "apt install build-essential"),
        ({"nvcc": None}, "CUDA toolkit", "pacman -S cuda"),
    ],
)
def test_a_missing_build_tool_is_named_with_the_fix_for_arch_and_debian(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    missing: dict[str, object],
    named: str,
    fix: str,
) -> None:
    folder = fake_tools.toolbox(tmp_path / "tools", **missing)  # type: ignore[arg-type]
    monkeypatch.setenv("PATH", str(folder))
    monkeypatch.setattr(provision_llamacpp, "NVCC_PLACES", ())
    checkout = fake_tools.llama_cpp_tree(tmp_path / "src")
    with pytest.raises(provision_llamacpp.interfaces.EnvironmentMissing) as refused:
        provision_llamacpp.ensure(f"path:{checkout}", cache=tmp_path / "c", archs=["86"])
    assert named in refused.value.what and fix in refused.value.fix
    assert "Debian / Ubuntu" in refused.value.fix


def test_the_engine_finds_the_newest_cuda_build_by_its_record_before_a_cpu_one(
    tools: Path, checkout: Path, tmp_path: Path
) -> None:
    home = tmp_path / "home"
    cache = home / ".cache/llama-orch/llama.cpp"
    cuda = provision_llamacpp.ensure(
        f"path:{checkout}", cache=cache, archs=["86"], progress=lambda _: None
    )
    provision_llamacpp.ensure(f"path:{checkout}", cache=cache, cpu=True, progress=lambda _: None)
    assert engine_llamacpp.find_binary({}, home=home, search_path="") == cuda
    by_source = {"engine": {"provision": {"mode": "source", "ref": f"path:{checkout}"}}}
    assert engine_llamacpp.find_binary(by_source, home=home, search_path="") == cuda


def test_a_cached_build_is_reused_without_building(tmp_path: Path) -> None:
    binary = llamacpp_builds.cached_binary("9.9.9", cpu=True, cache=tmp_path)
    binary.parent.mkdir(parents=True)
    binary.write_text("#!/bin/sh\n")
    binary.chmod(0o755)
    said: list[str] = []
    assert (
        provision_llamacpp.ensure("9.9.9", cpu=True, cache=tmp_path, progress=said.append) == binary
    )
    assert said == []
