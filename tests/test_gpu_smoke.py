"""The GPU smoke's parts that run without a GPU: the wrapper's early refusals, argument
checks, unpacking the source tarball, the model shapes and the JSON report."""

from __future__ import annotations

import json
import os
import subprocess
import tarfile
from pathlib import Path
from typing import Any

import pytest

from benchmarks import gguf_models, gpu_smoke
from tests import fake_tools

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "scripts" / "gpu-smoke.sh"


def script(
    tmp_path: Path, *args: str, nvidia_smi: bool = False
) -> subprocess.CompletedProcess[str]:
    """The wrapper on a PATH of its own: bash and coreutils, and a fake nvidia-smi if asked."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    for tool in ("bash", "dirname", "env"):
        link = bin_dir / tool
        if not link.exists():
            link.symlink_to(
                Path("/usr/bin", tool) if Path("/usr/bin", tool).exists() else Path("/bin", tool)
            )
    if nvidia_smi:
        fake_tools.write_tool(bin_dir, "nvidia-smi", "#!/bin/sh\necho 'GPU 0: fake'\n")
    env = {"PATH": str(bin_dir), "HOME": str(tmp_path), "PYTHON": "/nonexistent/python"}
    return subprocess.run(
        ["/bin/bash", str(SCRIPT), *args], capture_output=True, text=True, env=env, check=False
    )


def tarball(tmp_path: Path, top: str = "llama.cpp-b6500") -> Path:
    tree = fake_tools.llama_cpp_tree(tmp_path / "stage" / top)
    (tree / "LICENSE").write_text("MIT\n")
    out = tmp_path / "llama.cpp-src.tar.xz"
    with tarfile.open(out, "w:xz") as tar:
        tar.add(tree, arcname=top)
    return out


def test_without_nvidia_smi_the_wrapper_stops_at_once_with_what_to_do(tmp_path: Path) -> None:
    ran = script(tmp_path, str(tarball(tmp_path)))
    assert ran.returncode == 3
    assert ran.stderr.startswith("gpu-smoke: nvidia-smi not found: the GPU smoke needs a machine")
    assert "orchctl up --simulate" in ran.stderr


def test_the_wrapper_explains_its_usage_and_a_missing_tarball(tmp_path: Path) -> None:
    assert script(tmp_path).returncode == 2
    assert script(tmp_path).stderr.startswith("usage: scripts/gpu-smoke.sh LLAMA_CPP_SOURCE")
    missing = script(tmp_path, str(tmp_path / "nope.tar.xz"), nvidia_smi=True)
    assert missing.returncode == 2 and "nope.tar.xz: no such file" in missing.stderr


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["missing.tar.xz"], "missing.tar.xz: no such file"),
        (["notes.txt"], "not a tarball"),
        (["src.tar.xz", "--jobs", "0"], "--jobs must be 1 or more"),
        (["src.tar.xz", "--model-gib", "100"], "--model-gib must be between"),
    ],
)
def test_arguments_that_cannot_work_are_refused_before_anything_starts(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, args: list[str], message: str
) -> None:
    monkeypatch.chdir(tmp_path)
    (tmp_path / "notes.txt").write_text("x")
    (tmp_path / "src.tar.xz").write_bytes(tarball(tmp_path).read_bytes())
    with pytest.raises(gpu_smoke.Refused) as refused:
        gpu_smoke.check_args(gpu_smoke.parse_args(args))
    assert refused.value.code == 2 and message in str(refused.value)


def test_main_exits_3_without_nvidia_smi_and_starts_nothing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("PATH", str(tmp_path))
    work = tmp_path / "work"
    assert gpu_smoke.main([str(tarball(tmp_path)), "--work", str(work)]) == 3
    assert "nvidia-smi not found" in capsys.readouterr().err
    assert not work.exists()


def test_the_tree_is_found_under_the_tarballs_top_folder_and_unpacked_once(
    tmp_path: Path,
) -> None:
    source = tarball(tmp_path)
    tree = gpu_smoke.unpack(source, tmp_path / "src")
    assert tree == tmp_path / "src" / "llama.cpp-b6500" and (tree / "LICENSE").is_file()
    (tree / "built-here").write_text("")
    assert gpu_smoke.unpack(source, tmp_path / "src") == tree
    assert (tree / "built-here").exists()  # not unpacked again: an incremental rebuild stays


def test_a_failed_run_still_writes_its_report_with_the_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    fake_tools.write_tool(tmp_path, "nvidia-smi", "#!/bin/sh\n")
    monkeypatch.setenv("PATH", f"{tmp_path}:{os.environ['PATH']}")

    async def broken(args: Any, report: gpu_smoke.Report, phase: Any) -> None:
        with phase(report, "build"):
            report.build = {"binary": None}
        raise RuntimeError("pool big is Failed: CUDA error: out of memory")

    from benchmarks import gpu_smoke_run

    monkeypatch.setattr(gpu_smoke_run, "run", broken)
    report = tmp_path / "out" / "report.json"
    code = gpu_smoke.main([str(tarball(tmp_path)), "--report", str(report)])
    data = json.loads(report.read_text())
    assert code == 1 and data["ok"] is False
    assert data["error"] == "RuntimeError: pool big is Failed: CUDA error: out of memory"
    assert set(data["phases_s"]) == {"build"}
    assert [p.name for p in report.parent.iterdir()] == ["report.json"]


def test_the_report_compares_estimated_and_measured_vram_per_replica() -> None:
    status = {
        "pools": [
            {
                "id": "big",
                "replicas": [
                    {
                        "id": "big-0",
                        "gpu": [0],
                        "vram_estimated_mib": 2100,
                        "vram_measured_mib": 2000,
                    }
                ],
            },
            {
                "id": "small",
                "replicas": [
                    {
                        "id": "small-0",
                        "gpu": [1],
                        "vram_estimated_mib": 900,
                        "vram_measured_mib": None,
                    }
                ],
            },
        ]
    }
    rows = gpu_smoke.vram_rows(status)
    assert rows[0] == {
        "pool": "big",
        "replica": "big-0",
        "gpu": [0],
        "estimated_mib": 2100,
        "measured_mib": 2000,
        "error_pct": 5.0,
        "within_tolerance": True,
    }
    assert rows[1]["error_pct"] is None and rows[1]["within_tolerance"] is False
    report = gpu_smoke.Report(vram=rows)
    report.smoke = [
        {"pool": "big", "checks": [{"name": "a task streams", "ok": True, "detail": ""}]}
    ]
    assert report.as_json()["ok"] is True
    report.smoke[0]["checks"].append({"name": "a cancel stops tokens", "ok": False, "detail": ""})
    assert report.as_json()["ok"] is False


def test_the_big_model_is_about_a_gib_and_a_small_one_is_a_loadable_gguf(tmp_path: Path) -> None:
    big = gguf_models.Shape.gib(1.0)
    assert abs(big.weight_bytes() / (1 << 30) - 1.0) < 0.05 and big.f16
    import gguf

    shape = gguf_models.Shape(f16=True)
    path = gguf_models.write(tmp_path / "small.gguf", shape, seed=3)
    reader = gguf.GGUFReader(str(path))
    assert len(reader.tensors) == 3 + 9 * shape.n_layer
    assert abs(path.stat().st_size - shape.weight_bytes()) < 64 * 1024  # plus header and vocab
    mtime = path.stat().st_mtime_ns
    assert gguf_models.write(path, shape, seed=3).stat().st_mtime_ns == mtime  # kept
