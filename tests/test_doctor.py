"""`orchctl doctor` on faked machines: fake NVML, a PATH of fake tools, caches under tmp.

What a user reads is asserted: one line per check, the pacman and apt fix under each failed
one, the verdict, and exit 0 (serving possible) or 3 (not).
"""

from __future__ import annotations

import json
import shutil
import socket
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from plugins import engine_llamacpp, gpu_nvml, llamacpp_builds, provision_llamacpp, resolvers
from reconciler import cli_doctor, diagnosing
from tests import fake_tools, model_hub
from tests.fake_pynvml import FakeNvml
from tests.orchctl_support import orchctl

MIB = 1024 * 1024


def workstation(cc0: tuple[int, int] = (8, 6), cc1: tuple[int, int] = (8, 9)) -> FakeNvml:
    nvml = FakeNvml()
    nvml.gpus[0].update(
        name="NVIDIA GeForce RTX 3090",
        cc=list(cc0),
        mem_total=24576 * MIB,
        mem_used=1024 * MIB,
        mem_free=23552 * MIB,
    )
    nvml.add_gpu(
        name="NVIDIA GeForce RTX 4060 Ti",
        cc=list(cc1),
        mem_total=16384 * MIB,
        mem_used=0,
        mem_free=16384 * MIB,
    )
    return nvml


@pytest.fixture
def machine(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """HOME, PATH and the model cache under tmp; the 3090 + 4060 through fake NVML."""
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.setenv(resolvers.MODELS_ENV, str(tmp_path / "models"))
    monkeypatch.setenv("PATH", str(fake_tools.toolbox(tmp_path / "tools")))
    monkeypatch.setattr(provision_llamacpp, "NVCC_PLACES", ())
    use_nvml(monkeypatch, workstation())
    (tmp_path / "orch.yaml").write_text(f"server: {{bind: '127.0.0.1:{free_port()}'}}\n")
    monkeypatch.chdir(tmp_path)
    yield tmp_path


OPEN_NVML = gpu_nvml.open_nvml


def use_nvml(monkeypatch: pytest.MonkeyPatch, nvml: FakeNvml) -> None:
    monkeypatch.setattr(gpu_nvml, "open_nvml", lambda module=None: OPEN_NVML(nvml))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def cached_build(home: Path, archs: list[str]) -> Path:
    cache = home / ".cache/llama-orch/llama.cpp"
    binary = cache / f"0.3.36-cuda-sm{'.'.join(archs)}" / "bin" / "llama-server"
    binary.parent.mkdir(parents=True)
    binary.write_text("#!/bin/sh\n")
    binary.chmod(0o755)
    record = llamacpp_builds.EngineBuild(
        key=binary.parent.parent.name,
        version="0.3.36",
        source="pypi:0.3.36",
        backend="cuda",
        cuda_archs=archs,
        path=str(binary),
        built_at="2026-01-02T03:04:05+00:00",
    )
    (binary.parent / "engine.json").write_text(record.model_dump_json())
    return binary


def line(out: str, name: str) -> str:
    return next(ln for ln in out.splitlines() if ln[6:].startswith(name + " "))


def test_a_workstation_with_a_driver_and_the_tools_can_serve(machine: Path) -> None:
    ran = orchctl("doctor")
    assert ran.code == 0, ran.out
    assert line(ran.out, "driver").endswith("NVIDIA driver 580.159.04, runs CUDA up to 13.0")
    assert line(ran.out, "GPU 0").endswith(
        "NVIDIA GeForce RTX 3090, 23,552 MiB free of 24,576 MiB, compute capability 8.6"
    )
    assert line(ran.out, "GPU 1").endswith("compute capability 8.9")
    assert "CUDA toolkit 13.0" in line(ran.out, "CUDA toolkit")
    assert "the driver runs up to 13.0" in line(ran.out, "CUDA toolkit")
    assert line(ran.out, "cmake").endswith("cmake 3.31.6")
    assert line(ran.out, "engine").endswith("yet: `orchctl up` builds one")
    assert line(ran.out, "port").endswith("is free")
    assert all(ln.startswith(("ok  ", "")) for ln in ran.out_lines)
    assert ran.out_lines[-1] == "serving is possible here: next, `orchctl up`"


def test_without_a_driver_doctor_exits_3_with_the_fix_for_arch_and_debian(
    machine: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    use_nvml(monkeypatch, FakeNvml().library_missing())
    ran = orchctl("doctor")
    assert ran.code == 3
    assert line(ran.out, "driver").startswith("FAIL  driver")
    assert "sudo pacman -S nvidia-open nvidia-utils" in ran.out
    assert "sudo ubuntu-drivers install" in ran.out
    assert ran.out_lines[-1].startswith("serving is not possible here: 1 check failed (driver)")


def test_missing_build_tools_fail_until_a_build_is_cached_then_only_warn(
    machine: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    bare = fake_tools.toolbox(machine / "bare", cmake=False, nvcc=None, ninja=False)
    monkeypatch.setenv("PATH", str(bare))
    ran = orchctl("doctor")
    assert ran.code == 3
    assert line(ran.out, "cmake").startswith("FAIL") and "sudo pacman -S cmake" in ran.out
    assert "sudo apt install cmake" in ran.out
    assert line(ran.out, "CUDA toolkit").startswith("FAIL") and "pacman -S cuda" in ran.out
    assert line(ran.out, "ninja").startswith("warn") and "apt install ninja-build" in ran.out
    assert line(ran.out, "engine").startswith("FAIL")

    cached_build(machine / "home", ["86", "89"])
    ran = orchctl("doctor")
    assert ran.code == 0, ran.out
    assert line(ran.out, "cmake").endswith("cmake not found (only needed to build llama.cpp again)")
    assert "0.3.36 cuda sm86,89, built 2026-01-02T03:04:05+00:00" in line(ran.out, "engine")
    assert ran.out_lines[-1] == "serving is possible here (3 warnings): next, `orchctl up`"


def test_a_toolkit_newer_than_the_drivers_cuda_fails_with_the_driver_update(
    machine: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    nvml = workstation()
    nvml.cuda = 12040  # the driver runs CUDA 12.4; the toolkit is 13.0
    use_nvml(monkeypatch, nvml)
    ran = orchctl("doctor")
    assert ran.code == 3
    assert "is newer than the driver, which runs CUDA up to 12.4" in line(ran.out, "CUDA toolkit")
    assert "sudo pacman -Syu nvidia-utils" in ran.out


def test_cuda_13_cannot_build_for_a_pascal_card(
    machine: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    use_nvml(monkeypatch, workstation(cc1=(6, 1)))
    ran = orchctl("doctor")
    assert ran.code == 3
    assert line(ran.out, "CUDA toolkit").endswith("cannot build for GPU 1 (6.1)")
    assert "cuda-toolkit-12-9" in ran.out


def test_a_build_without_code_for_a_gpu_is_a_warning(machine: Path) -> None:
    cached_build(machine / "home", ["89"])
    ran = orchctl("doctor")
    assert ran.code == 0
    warned = [ln for ln in ran.out_lines if ln.startswith("warn  engine")]
    assert warned == [
        "warn  engine        the newest build has no code for GPU 0 (NVIDIA GeForce RTX 3090)"
    ]


def test_a_port_held_by_another_program_or_folder_fails_and_one_held_by_this_folder_does_not(
    machine: Path,
) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        (machine / "orch.yaml").write_text(f"server: {{bind: '127.0.0.1:{port}'}}\n")
        ran = orchctl("doctor")
    assert ran.code == 3
    assert line(ran.out, "port").endswith(f"127.0.0.1:{port} is used by another program")
    assert f"ss -ltnp 'sport = :{port}'" in ran.out

    with model_hub.serving() as daemon:
        daemon.files["/v1/status"] = json.dumps({"daemon": {"pid": 4242}}).encode()
        (machine / "orch.yaml").write_text(f"server: {{bind: '{daemon.url[7:]}'}}\n")
        ran = orchctl("doctor")  # a daemon, but not this folder's: `up` would fail to bind
        assert ran.code == 3
        assert line(ran.out, "port").endswith(
            "is served by the llama-orch daemon of another folder (pid 4242), not this one's"
        ), ran.out
        assert "`kill 4242`" in ran.out
        daemon_bind = daemon.url[7:]
        (machine / "orch.yaml").unlink()  # no orch.yaml: not this folder's daemon either
        found = cli_doctor.run(config=machine / "orch.yaml", simulate=None, bind=daemon_bind)
        port = next(c for c in found.checks if c.name == "port")
        assert port.status == "fail", port  # a daemon here would lock .orch/ and not bind
        assert "of another folder (pid 4242), not this one's" in port.detail
        (machine / "orch.yaml").write_text("models: [not, a, mapping]\n")  # unreadable
        default_lock = machine.resolve() / ".orch/daemon.lock"
        assert diagnosing.state_lock_of(machine / "orch.yaml") == default_lock
        # invalid elsewhere, its server.bind is still the port its daemon would take
        (machine / "orch.yaml").write_text(
            f"server: {{bind: '{daemon_bind}'}}\nmodels: [not, a, mapping]\n"
        )
        assert diagnosing.bind_of(machine / "orch.yaml") == daemon_bind
        (machine / "orch.yaml").write_text(f"server: {{bind: '{daemon_bind}'}}\n")
        (machine / ".orch").mkdir()
        (machine / ".orch/daemon.lock").write_text('{"pid": 4242, "started_at": "x"}')
        ran = orchctl("doctor")
    assert ran.code == 0
    assert line(ran.out, "port").endswith("is served by this folder's llama-orch daemon (pid 4242)")
    # up would only meet that daemon: the next step is to use it
    assert ran.out_lines[-1] == (
        "serving is possible here, and this folder's daemon (pid 4242) serves it now: next, "
        "`orchctl submit TASK_FILE` or `orchctl status`"
    ), ran.out


def test_too_little_disk_under_the_cache_fails(
    machine: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(
        "shutil.disk_usage", lambda path: SimpleNamespace(total=1 << 40, used=0, free=1 << 30)
    )
    ran = orchctl("doctor")
    assert ran.code == 3
    assert line(ran.out, "disk").startswith("FAIL  disk          1.0 GiB free under ")
    assert "sudo apt clean" in ran.out


def test_the_model_cache_is_summed_and_unfinished_downloads_counted(machine: Path) -> None:
    models = machine / "models/hf/acme/x/main"
    models.mkdir(parents=True)
    (models / "a.gguf").write_bytes(b"\0" * (1 << 20))
    (models / "b.gguf.part").write_bytes(b"\0" * 10)
    ran = orchctl("doctor")
    assert "1 model file, 0.0 GiB; 1 unfinished download (resumed when needed)" in line(
        ran.out, "models"
    )


def test_json_lists_every_check_with_its_fix(
    machine: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    use_nvml(monkeypatch, FakeNvml().library_missing())
    ran = orchctl("doctor", "--json")
    data = json.loads(ran.out)
    assert ran.code == 3 and data["can_serve"] is False
    driver = next(c for c in data["checks"] if c["name"] == "driver")
    assert (
        driver["status"] == "fail" and "pacman" in driver["fix"] and "apt" not in driver["detail"]
    )


def test_the_simulated_workstation_needs_no_driver_and_no_tools(
    machine: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    use_nvml(monkeypatch, FakeNvml().library_missing())
    monkeypatch.setenv("PATH", str(machine / "nothing"))
    inventory = Path(__file__).parents[1] / "examples/01-simulated-workstation/inventory.yaml"
    ran = orchctl("doctor", "--simulate", inventory)
    assert ran.code == 0, ran.out
    assert "SIMULATED NVIDIA GeForce RTX 3090" in line(ran.out, "GPU 0")
    assert ran.out_lines[-1] == "serving is possible here: next, `orchctl up --simulate`"


def test_simulate_without_a_file_takes_the_inventory_orch_yaml_names(
    machine: Path, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """As quickstart says: `--simulate` added to `orchctl doctor`, in the folder `orchctl
    init --simulate` wrote (its orch.yaml names the inventory)."""
    use_nvml(monkeypatch, FakeNvml().library_missing())
    example = Path(__file__).parents[1] / "examples/01-simulated-workstation"
    folder = tmp_path / "home"
    folder.mkdir()
    for name in ("orch.yaml", "inventory.yaml"):
        shutil.copy(example / name, folder / name)
    ran = orchctl("doctor", "--simulate", "--config", folder / "orch.yaml")
    assert ran.code == 0, ran.out
    assert "SIMULATED NVIDIA GeForce RTX 3090" in line(ran.out, "GPU 0")


def test_simulate_without_an_inventory_fails_with_the_command_that_writes_one(
    machine: Path, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """Quickstart's no-GPU path in a fresh folder: no inventory yet. The failed check says
    how to get one (it said only that the file could not be read, and doctor run again, as
    told, never passed); a broken one is named with the fix of each line."""
    use_nvml(monkeypatch, FakeNvml().library_missing())
    folder = tmp_path / "fresh"
    folder.mkdir()
    ran = orchctl("doctor", "--simulate", "--config", folder / "orch.yaml")
    assert ran.code == 3
    assert line(ran.out, "GPUs").endswith(f"no simulated GPU inventory at {folder}/inventory.yaml")
    assert "orchctl init --simulate" in ran.out and "orchctl up --simulate" in ran.out
    (folder / "inventory.yaml").write_text("gpus: 3\n")
    ran = orchctl("doctor", "--simulate", "--config", folder / "orch.yaml")
    assert ran.code == 3
    assert ran.out.count("cannot be used") == 1, ran.out
    assert f"orchctl validate {folder}/inventory.yaml" in ran.out, ran.out


def test_a_configured_engine_binary_needs_no_build_tools(
    machine: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("PATH", str(fake_tools.toolbox(machine / "bare", cmake=False, nvcc=None)))
    binary = fake_tools.write_tool(machine, "my-llama-server", "#!/bin/sh\n")
    config = machine / "orch.yaml"
    config.write_text(config.read_text() + f"engines: {{llamacpp: {{binary: '{binary}'}}}}\n")
    ran = orchctl("doctor")
    assert ran.code == 0, ran.out
    assert line(ran.out, "engine").endswith(f"engines.llamacpp.binary: {binary}")
    binary.unlink()
    ran = orchctl("doctor")
    assert ran.code == 3 and line(ran.out, "engine").startswith("FAIL  engine")


def test_a_configured_cpu_only_engine_binary_fails_the_engine_check(machine: Path) -> None:
    """Every llamacpp pool refuses a CPU-only build: doctor must not call it ok (and say
    serving is possible) when orch.yaml names one."""
    binary = machine / "llama.cpp" / "0.3.36-cpu" / "bin" / "llama-server"
    binary.parent.mkdir(parents=True)
    binary.write_text("#!/bin/sh\n")
    binary.chmod(0o755)
    config = machine / "orch.yaml"
    config.write_text(config.read_text() + f"engines: {{llamacpp: {{binary: '{binary}'}}}}\n")
    ran = orchctl("doctor")
    assert ran.code == 3, ran.out
    engine = line(ran.out, "engine")
    assert engine.startswith("FAIL  engine") and "CPU-only build" in engine, ran.out


@pytest.mark.parametrize("simulate", [False, True])
def test_a_cpu_only_build_is_judged_as_serve_judges_it_with_or_without_simulate(
    machine: Path, monkeypatch: pytest.MonkeyPatch, tmp_path: Path, simulate: bool
) -> None:
    """doctor said a simulated workstation serves with "the sim engine" while orch.yaml's
    llamacpp pools failed on its CPU-only build, and failed that build where the test-only
    switch has the daemon serve it: it now judges the pools' engine as `serve` does."""
    binary = machine / "llama.cpp" / "0.3.36-cpu" / "bin" / "llama-server"
    binary.parent.mkdir(parents=True)
    binary.write_text("#!/bin/sh\n")
    binary.chmod(0o755)
    args = ["doctor"]
    config = machine / "orch.yaml"
    if simulate:
        use_nvml(monkeypatch, FakeNvml().library_missing())
        example = Path(__file__).parents[1] / "examples/01-simulated-workstation"
        config = tmp_path / "sim" / "orch.yaml"
        config.parent.mkdir()
        shutil.copy(example / "inventory.yaml", config.parent / "inventory.yaml")
        config.write_text(
            "version: 1\ngpus: {observer: simulated, inventory: inventory.yaml}\n"
            "models: {m: {ref: 'file:m.gguf'}}\n"
            "pools: [{id: p, engine: llamacpp, model: m, devices: [0]}]\n"
        )
        args += ["--simulate", "--config", str(config)]
    config.write_text(config.read_text() + f"engines: {{llamacpp: {{binary: '{binary}'}}}}\n")
    ran = orchctl(*args)
    assert ran.code == 3, ran.out
    engine = line(ran.out, "engine")
    assert engine.startswith("FAIL  engine") and "CPU-only build" in engine, ran.out
    monkeypatch.setenv(engine_llamacpp.ALLOW_CPU_ENV, "1")
    ran = orchctl(*args)
    assert ran.code == 0, ran.out
    engine = line(ran.out, "engine")
    assert engine.startswith("warn  engine") and "test-only" in engine, ran.out


def test_caches_this_user_cannot_read_are_failed_checks_with_the_fix_not_a_crash(
    machine: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # as another user with HOME still pointing at root's caches (tests run as root, so the
    # refusal is made here rather than by chmod)
    cached_build(machine / "home", ["86"])
    (machine / "models").mkdir()
    real_glob, real_rglob = Path.glob, Path.rglob

    def refuse(real: Any) -> Any:
        def listing(self: Path, pattern: str) -> Any:
            if self.name in ("llama.cpp", "models"):
                raise PermissionError(13, "Permission denied", str(self))
            return real(self, pattern)

        return listing

    monkeypatch.setattr(Path, "glob", refuse(real_glob))
    monkeypatch.setattr(Path, "rglob", refuse(real_rglob))
    ran = orchctl("doctor")
    assert ran.code == 3, ran.err
    assert "cannot be read: Permission denied" in line(ran.out, "engine")
    assert "cannot be read: Permission denied" in line(ran.out, "models")
    assert "sudo chown -R $USER" in ran.out and "this is a bug" not in ran.err


def test_an_output_path_the_system_refuses_is_a_usage_error_naming_it(tmp_path: Path) -> None:
    (tmp_path / "afile").write_text("x")
    ran = orchctl("schemas", "--out", tmp_path / "afile", cwd=tmp_path)
    assert ran.code == 2 and "afile: File exists" in ran.err, ran.err
    assert "hint: a file is in the way where a folder is needed" in ran.err
    ran = orchctl("schemas", "--out", tmp_path / "afile" / "sub", cwd=tmp_path)
    assert ran.code == 2 and "Not a directory" in ran.err and "this is a bug" not in ran.err


@pytest.mark.parametrize("state", ["link", "gone", "folder"])
def test_an_orch_yaml_gone_or_a_link_is_read_from_the_last_good_copy_beside_it(
    machine: Path, monkeypatch: pytest.MonkeyPatch, tmp_path: Path, state: str
) -> None:
    """As every verb reads it: orch.yaml gone, a folder or a symbolic link (which it may not
    be), the last config a daemon applied in its folder is checked, said in a warning: its
    port (not the default 8080's) and its inventory, beside orch.yaml, not the link's target."""
    use_nvml(monkeypatch, FakeNvml().library_missing())
    example = Path(__file__).parents[1] / "examples/01-simulated-workstation"
    folder = tmp_path / "home"
    (folder / ".orch").mkdir(parents=True)
    shutil.copy(example / "inventory.yaml", folder / "inventory.yaml")
    port = free_port()
    text = (example / "orch.yaml").read_text()
    text = text.replace("127.0.0.1:8080", f"127.0.0.1:{port}")
    (folder / ".orch" / "last-good.yaml").write_text(text)
    elsewhere = tmp_path / "elsewhere" / "orch.yaml"
    elsewhere.parent.mkdir()
    elsewhere.write_text(text)
    orch = folder / "orch.yaml"
    if state == "link":
        orch.symlink_to(elsewhere)
    elif state == "folder":
        orch.mkdir()
    ran = orchctl("doctor", "--simulate", "--config", orch)
    assert ran.code == 0, ran.out + ran.err
    assert f"127.0.0.1:{port}" in line(ran.out, "port"), ran.out
    assert "SIMULATED NVIDIA GeForce RTX 3090" in line(ran.out, "GPU 0")
    assert "checking the last config a daemon applied here" in ran.err, ran.err
