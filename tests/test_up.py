"""`orchctl up`: doctor → engine → model → orch.yaml → serve → smoke → report, end to end.

On the simulated workstation with the sim engine (nothing built or downloaded), and on a
faked GPU workstation: fake NVML (a 3090 and a 4060), a fake cmake whose "build" is a
llama-server that serves through the sim server, and a local hub for the model download.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml

from plugins import gpu_nvml, provision_llamacpp, resolvers
from reconciler import cli_init, cli_up
from state import desired
from tests import fake_tools, model_hub, tiny_gguf
from tests.fake_pynvml import FakeNvml
from tests.orchctl_support import ORCHCTL, fake_daemon_status, orchctl
from tests.test_doctor import OPEN_NVML, workstation

pytestmark = pytest.mark.slow


def test_up_simulate_serves_the_simulated_workstation_and_passes_the_smoke(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(resolvers.MODELS_ENV, str(tmp_path / "models"))
    config = tmp_path / "ws" / "orch.yaml"
    ran = orchctl(
        "up", "--simulate", "--config", config, "--bind", "127.0.0.1:0", "--stop-after-smoke"
    )
    assert ran.code == 0, ran.out + ran.err
    out = ran.out
    assert out.startswith("==> checking this machine (orchctl doctor)\n")
    assert "SIMULATED NVIDIA GeForce RTX 3090" in out
    assert f"==> wrote {config} (a commented starter: edit it while serving)" in out
    assert "    pool chat: Ready" in out
    assert "  smoke    3 of 3 checks passed" in out
    for check in ("a task streams", "a cancel stops tokens", "the same seed gives the same text"):
        assert f"    ok    {check}: " in out
    assert ran.out_lines[-1] == "==> stopped: engines stopped, nothing left running"
    # it stops after the smoke: the next step is to serve, not to submit to what stopped
    assert f"next: orchctl serve --config {config} (this run stops now), then " in out
    assert "from another terminal" not in out
    assert (config.parent / "inventory.yaml").is_file()
    assert (config.parent / "hello.task.yaml").is_file()
    assert orchctl("validate", config).code == 0
    status = json.loads((config.parent / ".orch/status.json").read_text())
    assert status["daemon"]["state"] == "stopped"
    assert list((config.parent / ".orch/engines").glob("*.json")) == []  # no engine left


def test_up_simulate_on_an_existing_simulated_config_serves_it_as_it_is(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(resolvers.MODELS_ENV, str(tmp_path / "models"))
    config = tmp_path / "orch.yaml"
    assert orchctl("init", "--simulate", "--config", config).code == 0
    text = config.read_text().replace("127.0.0.1:8080", "127.0.0.1:0")
    # a context smaller than the 2,000 tokens the cancel check asks of a roomy pool
    text = text.replace("ctx: 4096 ", "ctx: 512  ")
    config.write_text(text)
    ran = orchctl("up", "--simulate", "--config", config, "--stop-after-smoke")
    assert ran.code == 0, ran.out + ran.err
    assert "wrote" not in ran.out and config.read_text() == text
    assert "  smoke    3 of 3 checks passed" in ran.out
    assert " of 448 tokens, stopped " in ran.out  # fitted: 512 less room for the prompt
    assert "  engine   the sim engine (simulated GPUs)" in ran.out


def test_up_simulate_refuses_a_config_of_real_gpus(tmp_path: Path) -> None:
    config = tmp_path / "orch.yaml"
    config.write_text(
        "models: {m: {ref: 'file:m.gguf'}}\npools: [{id: p, engine: sim, model: m}]\n"
    )
    ran = orchctl("up", "--simulate", "--config", config)
    assert ran.code == 2
    assert ran.err_lines[0].endswith("--simulate needs a simulated one")


def test_up_on_a_folder_a_daemon_already_serves_says_so_and_starts_nothing(
    tmp_path: Path,
) -> None:
    config = tmp_path / "orch.yaml"
    assert orchctl("init", "--simulate", "--config", config).code == 0
    fake_daemon_status(tmp_path / ".orch")  # this process, as a live daemon
    ran = orchctl("up", "--simulate", "--config", config)
    assert ran.code == 2
    assert (
        ran.err_lines[0]
        == f"orchctl: a daemon (pid {os.getpid()}) already serves {config}: it is up"
    )
    assert "doctor" not in ran.out


def test_up_without_a_driver_stops_after_the_doctor_with_exit_3(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(
        gpu_nvml, "open_nvml", lambda module=None: OPEN_NVML(FakeNvml().library_missing())
    )
    ran = orchctl("up", "--config", tmp_path / "orch.yaml")
    assert ran.code == 3
    assert "FAIL  driver" in ran.out and "sudo pacman -S nvidia-open" in ran.out
    assert ran.out_lines[-1].startswith("serving is not possible here: 1 check failed")
    assert not (tmp_path / "orch.yaml").exists()


@pytest.fixture
def gpu_workstation(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[model_hub.Hub]:
    """A 3090 + 4060 with fake build tools and a hub holding a small GGUF-looking file."""
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.setenv(resolvers.MODELS_ENV, str(tmp_path / "models"))
    monkeypatch.setenv("PATH", str(fake_tools.toolbox(tmp_path / "tools")))
    monkeypatch.setattr(provision_llamacpp, "NVCC_PLACES", ())
    nvml = workstation()
    monkeypatch.setattr(gpu_nvml, "open_nvml", lambda module=None: OPEN_NVML(nvml))
    checkout = fake_tools.llama_cpp_tree(tmp_path / "llama.cpp")
    monkeypatch.setenv("UP_TEST_SOURCE", f"path:{checkout}")
    with model_hub.serving() as hub:
        monkeypatch.setenv("HF_ENDPOINT", hub.url)
        model = tiny_gguf.write(tmp_path / "tiny.gguf")  # the engine reads its header
        hub.hf("acme/tiny-GGUF", "tiny.gguf", model.read_bytes())
        yield hub


def test_up_on_gpus_builds_for_them_downloads_writes_a_pool_per_gpu_and_passes_the_smoke(
    gpu_workstation: model_hub.Hub, tmp_path: Path
) -> None:
    config = tmp_path / "ws" / "orch.yaml"
    args = ["--config", config, "--bind", "127.0.0.1:0", "--stop-after-smoke"]
    ran = orchctl(
        "up",
        "--model",
        "hf:acme/tiny-GGUF/tiny.gguf",
        "--source",
        os.environ["UP_TEST_SOURCE"],
        *args,
    )
    assert ran.code == 0, ran.out + ran.err
    out = ran.out
    assert "compute capability 8.6" in out and "compute capability 8.9" in out
    assert "    configuring llama.cpp (CUDA for sm 86, 89)" in out
    configure = next(c for c in fake_tools.cmake_calls(tmp_path / "tools") if c[0] == "-S")
    assert fake_tools.flags_of(configure)["CMAKE_CUDA_ARCHITECTURES"] == "86;89"
    assert "    building llama-server: 100% (20/20)" in out
    cached = tmp_path / "models/hf/acme/tiny-GGUF/main/tiny.gguf"
    assert cached.read_bytes() == (tmp_path / "tiny.gguf").read_bytes() and f"    {cached}" in out
    written = desired.load_desired(config).value
    assert written is not None
    assert [(p.id, p.devices) for p in written.pools] == [("chat-0", [0]), ("chat-1", [1])]
    assert written.models["starter"].ref == "hf:acme/tiny-GGUF/tiny.gguf"
    assert "# GPU 1: NVIDIA GeForce RTX 4060 Ti, 16384 MiB, compute capability 8.9" in (
        config.read_text()
    )
    assert "    pool chat-0: Ready" in out and "    pool chat-1: Ready" in out
    assert "  smoke    3 of 3 checks passed" in out

    again = orchctl("up", *args)  # the config exists now: nothing built, nothing downloaded
    assert again.code == 0, again.out + again.err
    builds = [c for c in fake_tools.cmake_calls(tmp_path / "tools") if c[0] == "--build"]
    assert len(builds) == 1
    assert "(cached)" in again.out and "downloading" not in again.out


def test_the_starter_config_of_up_places_a_pool_on_every_gpu_and_loads() -> None:
    facts = [
        gpu_nvml.GpuFacts(0, "NVIDIA GeForce RTX 3090", (8, 6), 24576, 24000),
        gpu_nvml.GpuFacts(1, "NVIDIA GeForce RTX 3060", (8, 6), 12288, 12000),
    ]
    text = cli_init.up_config(
        "# schema", "orch.yaml", facts, model_ref="hf:a/b/c.gguf", engine=Path("/x/llama-server")
    )
    data = yaml.safe_load(text)
    assert desired.DesiredState.model_validate(data).pools[1].devices == [1]
    assert "# built at /x/llama-server" in text and "orchctl up" in text.splitlines()[1]


def test_ctrl_c_while_serving_stops_the_daemon_and_its_engines(tmp_path: Path) -> None:
    env = {**os.environ, resolvers.MODELS_ENV: str(tmp_path / "models"), "PYTHONUNBUFFERED": "1"}
    config = tmp_path / "orch.yaml"
    proc = subprocess.Popen(
        [ORCHCTL, "up", "--simulate", "--config", config, "--bind", "127.0.0.1:0"],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env=env,
    )
    lines: list[str] = []
    try:
        assert proc.stdout is not None
        deadline = time.monotonic() + 60
        for line in proc.stdout:
            lines.append(line)
            if line.startswith("serving until Ctrl-C") or time.monotonic() > deadline:
                break
        assert lines[-1].startswith("serving until Ctrl-C"), "".join(lines)
        status = json.loads((tmp_path / ".orch/status.json").read_text())
        pids = [r["pid"] for p in status["pools"] for r in p["replicas"] if r["pid"]]
        assert pids
        proc.send_signal(signal.SIGINT)
        rest, _ = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 0, "".join(lines) + rest
    assert rest.splitlines()[-1] == "==> stopped: engines stopped, nothing left running"
    for pid in pids:
        assert not _alive(pid), f"engine pid {pid} is still running"
    assert "Traceback" not in rest


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    stat = Path(f"/proc/{pid}/stat")
    return stat.exists() and stat.read_text().rsplit(")", 1)[1].split()[0] != "Z"


@pytest.mark.parametrize("bind", ["garbage", "127.0.0.1:99999", ":80", ""])
def test_a_bad_bind_is_refused_before_up_writes_anything(tmp_path: Path, bind: str) -> None:
    """Written into the starter orch.yaml first, a bad --bind was then refused, and every
    later `up` served the file as written, a good --bind or not."""
    ran = orchctl("up", "--simulate", "--bind", bind, "--stop-after-smoke", cwd=tmp_path)
    assert ran.code == 2 and "argument --bind:" in ran.err, ran
    assert list(tmp_path.iterdir()) == []


def test_the_report_names_the_engines_of_an_existing_config_not_the_sim_for_simulate(
    tmp_path: Path,
) -> None:
    """`up --simulate` on an orch.yaml whose pools run llama-server simulates the GPUs only:
    the report says which engine serves."""

    def state(*engines: str) -> desired.DesiredState:
        pools = [
            {"id": f"p{i}", "engine": e, "model": "m", "devices": [0]}
            for i, e in enumerate(engines)
        ]
        data = {"version": 1, "models": {"m": {"ref": "file:m.gguf"}}, "pools": pools}
        return desired.DesiredState.model_validate(data)

    config = tmp_path / "orch.yaml"
    assert cli_up._engines_of(state("sim"), config) == "the sim engine (simulated GPUs)"
    said = cli_up._engines_of(state("llamacpp", "sim", "llamacpp"), config)
    assert said == "llamacpp, sim (the engines of the pools in orch.yaml; GPUs simulated)"
