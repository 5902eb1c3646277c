"""The `llamacpp` engine: argv and environment, binary lookup, the GPU-only refusal and its
test-only switch, a model file that is not GGUF, layers left on the CPU, and a whole replica
life through a fake `llama-server` (which hands its arguments over to the sim server). The
VRAM estimate has its own tests (test_llamacpp_vram.py)."""

from __future__ import annotations

import dataclasses
import json
import logging
import sys
from pathlib import Path
from typing import Any

import pluggy
import pytest

from plugins import engine_llamacpp, hookspecs, interfaces
from tests import tiny_gguf

PROJECT = Path(__file__).resolve().parents[1]
CUDA_LISTING = """\
ggml_cuda_init: found 1 CUDA devices:
  Device 0: NVIDIA H200, compute capability 9.0, VMM: yes
Available devices:
  CUDA0: NVIDIA H200 (143155 MiB, 140401 MiB free)
"""
CPU_LISTING = "Available devices: (none)\n"


def make_spec(
    tmp_path: Path,
    *,
    ctx: int = 1024,
    slots: int = 2,
    devices: tuple[int, ...] = (0,),
    flags: tuple[str, ...] = (),
    env: dict[str, str] | None = None,
    model_path: Path | None = None,
    model_size_mib: int = 100,
    **options: Any,
) -> interfaces.ReplicaSpec:
    if model_path is None:
        model_path = tmp_path / "tiny.gguf"
        if not model_path.exists():
            tiny_gguf.write(model_path)
    return interfaces.ReplicaSpec(
        replica_id="chat-0",
        pool_id="chat",
        engine="llamacpp",
        model_id="tiny",
        model_ref="file:tiny.gguf",
        model_path=model_path,
        model_size_mib=model_size_mib,
        model_digest=None,
        devices=devices,
        ctx=ctx,
        slots=slots,
        spec_hash="h1",
        state_dir=tmp_path / "state",
        flags=flags,
        env=env or {},
        options=options,
    )


def executable(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    path.chmod(0o755)
    return path


def fake_llama_server(folder: Path, *, listing: str, log: str = "") -> Path:
    """A `llama-server` that lists `listing` for --list-devices and otherwise writes down its
    argv and environment, prints `log` (as llama.cpp logs loading), then becomes a sim server
    with the same slots and context."""
    return executable(
        folder / "llama-server",
        f"""#!{sys.executable}
import json, os, sys
args = sys.argv[1:]
if args == ["--list-devices"]:
    print({listing!r}, end="")
    sys.exit(0)
here = os.path.dirname(os.path.abspath(__file__))
with open(os.path.join(here, "seen.json"), "w") as f:
    json.dump({{"argv": args, "env": dict(os.environ)}}, f)
print({log!r}, end="", flush=True)
value = lambda flag: args[args.index(flag) + 1]
total, slots = int(value("-c")), int(value("-np"))
os.environ["PYTHONPATH"] = {str(PROJECT)!r}
os.execv(sys.executable, [sys.executable, "-S", "-m", "plugins.sim_server",
         "--port", value("--port"), "--replica-id", "fake", "--model", value("-m"),
         "--model-size-mib", "1", "--ctx", str(total // slots), "--slots", str(slots),
         "--state-dir", os.path.join(here, "state")])
""",
    )


@pytest.fixture
def no_binary_anywhere(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.setenv("PATH", str(tmp_path / "empty-bin"))


@pytest.fixture(autouse=True)
def without_the_test_switch(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(engine_llamacpp.ALLOW_CPU_ENV, raising=False)


def test_argv_gives_llama_server_the_context_of_all_slots_and_every_layer_on_the_gpu(
    tmp_path: Path,
) -> None:
    spec = make_spec(tmp_path, ctx=4096, slots=4, flags=("-fa", "on"))
    argv = engine_llamacpp.command(spec, binary=Path("/opt/llama-server"), port=5001)
    assert argv == [
        "/opt/llama-server",
        "-m",
        str(spec.model_path),
        "--host",
        "127.0.0.1",
        "--port",
        "5001",
        "-c",
        "16384",
        "-np",
        "4",
        "-ngl",
        "999",
        "--fit",
        "off",
        "--metrics",
        "-lv",
        "4",
        "-fa",
        "on",
    ]


def test_a_model_without_a_local_file_cannot_be_launched(tmp_path: Path) -> None:
    spec = dataclasses.replace(make_spec(tmp_path), model_path=None)
    with pytest.raises(interfaces.EngineStartError, match="no local file"):
        engine_llamacpp.command(spec, binary=Path("/opt/llama-server"), port=5001)


def test_the_child_environment_has_the_mask_in_pci_order_and_no_llama_arg_overrides(
    tmp_path: Path,
) -> None:
    spec = make_spec(
        tmp_path,
        devices=(1, 0),
        env={"LLAMA_ARG_CTX_SIZE": "8", "POOL_VAR": "p"},
        engine={"env": {"ENGINE_VAR": "e", "LLAMA_ARG_N_GPU_LAYERS": "0"}},
    )
    base = {"PATH": "/usr/bin", "LLAMA_ARG_THREADS": "4", "CUDA_VISIBLE_DEVICES": "3"}
    env = engine_llamacpp.child_env(spec, base)
    assert env == {
        "PATH": "/usr/bin",
        "ENGINE_VAR": "e",
        "POOL_VAR": "p",
        "CUDA_DEVICE_ORDER": "PCI_BUS_ID",
        "CUDA_VISIBLE_DEVICES": "1,0",
    }


def test_the_configured_binary_is_used_and_a_wrong_one_is_refused(tmp_path: Path) -> None:
    binary = executable(tmp_path / "bin" / "llama-server", "#!/bin/sh\n")
    assert engine_llamacpp.find_binary({"engine": {"binary": str(binary)}}) == binary
    with pytest.raises(interfaces.EnvironmentMissing) as caught:
        engine_llamacpp.find_binary({"engine": {"binary": str(tmp_path / "nope")}})
    assert "engines.llamacpp.binary" in caught.value.fix


def test_the_provisioned_build_is_found_by_version_then_newest_then_on_path(tmp_path: Path) -> None:
    home = tmp_path / "home"
    cache = home / ".cache/llama-orch/llama.cpp"
    old = executable(cache / "b100/bin/llama-server", "#!/bin/sh\n")
    new = executable(cache / "b200/bin/llama-server", "#!/bin/sh\n")
    on_path = executable(tmp_path / "path-bin" / "llama-server", "#!/bin/sh\n")
    find = engine_llamacpp.find_binary
    by_version = {"engine": {"provision": {"mode": "source", "ref": "b100"}}}
    assert find(by_version, home=home, search_path="") == old
    assert find({}, home=home, search_path="") == new
    assert find({}, home=tmp_path, search_path=str(on_path.parent)) == on_path


async def test_a_missing_binary_is_refused_with_a_fix(
    tmp_path: Path, no_binary_anywhere: None
) -> None:
    with pytest.raises(interfaces.EnvironmentMissing) as caught:
        await engine_llamacpp.LlamaCppEngine().start(make_spec(tmp_path))
    assert "llama-server not found" in caught.value.what
    assert "orchctl up" in caught.value.fix


async def test_a_cpu_only_build_is_refused_before_anything_starts(tmp_path: Path) -> None:
    binary = executable(
        tmp_path / "cpu" / "llama-server", "#!/bin/sh\necho 'Available devices: (none)'\n"
    )
    spec = make_spec(tmp_path, binary=str(binary))
    with pytest.raises(interfaces.EnvironmentMissing) as caught:
        await engine_llamacpp.LlamaCppEngine().start(spec)
    assert "lists no CUDA device" in caught.value.what
    assert "(none)" in caught.value.what
    assert "GGML_CUDA=ON" in caught.value.fix
    assert not (spec.state_dir / "engines").exists()  # no engine process was spawned


async def test_a_binary_that_prints_no_device_list_is_refused(tmp_path: Path) -> None:
    binary = executable(
        tmp_path / "old" / "llama-server",
        "#!/bin/sh\necho 'error: invalid argument: --list-devices' >&2\nexit 1\n",
    )
    with pytest.raises(interfaces.EnvironmentMissing, match="printed no device list"):
        await engine_llamacpp.LlamaCppEngine().start(make_spec(tmp_path, binary=str(binary)))


async def test_a_pools_env_cannot_turn_on_the_test_only_cpu_switch(tmp_path: Path) -> None:
    binary = fake_llama_server(tmp_path / "cpu", listing=CPU_LISTING)
    spec = make_spec(
        tmp_path,
        binary=str(binary),
        env={engine_llamacpp.ALLOW_CPU_ENV: "1"},
        engine={"env": {engine_llamacpp.ALLOW_CPU_ENV: "1"}},
    )
    with pytest.raises(interfaces.EnvironmentMissing):
        await engine_llamacpp.LlamaCppEngine().start(spec)


async def test_the_test_only_switch_lets_a_cpu_build_serve_with_a_loud_warning(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    monkeypatch.setenv(engine_llamacpp.ALLOW_CPU_ENV, "1")
    binary = fake_llama_server(tmp_path / "cpu", listing=CPU_LISTING)
    engine = engine_llamacpp.LlamaCppEngine()
    with caplog.at_level(logging.WARNING, logger=engine_llamacpp.__name__):
        handle = await engine.start(make_spec(tmp_path, binary=str(binary)))
    try:
        await engine.wait_ready(handle, timeout_s=10)
    finally:
        await engine.stop(handle, grace_s=2)
    assert any(
        "TEST-ONLY: CPU inference enabled" in r.getMessage() and r.levelname == "WARNING"
        for r in caplog.records
    )


async def test_an_engine_started_with_the_cpu_switch_is_not_adopted_without_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A daemon with the test-only switch started a CPU build; the daemon after it runs
    without the switch: adopting the engine would serve from the CPU, which no start of
    that daemon allows (HME-013). It is stopped instead, and the pool's start says why."""
    from plugins import liveness, processes

    monkeypatch.setenv(engine_llamacpp.ALLOW_CPU_ENV, "1")
    binary = fake_llama_server(tmp_path / "cpu", listing=CPU_LISTING)
    engine = engine_llamacpp.LlamaCppEngine()
    spec = make_spec(tmp_path, binary=str(binary))
    handle = await engine.start(spec)
    try:
        await engine.wait_ready(handle, timeout_s=10)
        record = processes.record(handle)
        monkeypatch.delenv(engine_llamacpp.ALLOW_CPU_ENV)
        adopted = await engine_llamacpp.LlamaCppEngine().adopt(record, spec)
        assert adopted is None
        assert not liveness.pid_alive(handle.pid, handle.started_at)
        with pytest.raises(interfaces.EnvironmentMissing):
            await engine_llamacpp.LlamaCppEngine().start(spec)
    finally:
        await engine.stop(handle, grace_s=2)


@pytest.mark.slow
async def test_a_replica_lives_through_a_fake_cuda_llama_server(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("LLAMA_ARG_CTX_SIZE", "64")  # would override -c if it reached the child
    binary = fake_llama_server(tmp_path / "cuda", listing=CUDA_LISTING)
    engine = engine_llamacpp.LlamaCppEngine()
    spec = make_spec(
        tmp_path, ctx=1024, slots=2, devices=(1,), flags=("-fa", "on"), binary=str(binary)
    )
    handle = await engine.start(spec)
    try:
        await engine.wait_ready(handle, timeout_s=10)
        info = await engine.describe(handle)
        request = interfaces.GenerateRequest(task_id="t", prompt="hi", max_tokens=5, seed=1)
        items = [item async for item in engine.generate(handle, request)]
    finally:
        ended = await engine.stop(handle, grace_s=2)
    assert (info.engine_version, info.slots_total, info.slots_busy) == ("sim-0.1.0", 2, 0)
    done = items[-1]
    assert isinstance(done, interfaces.Done)
    assert (done.tokens_out, done.finish_reason) == (5, "length")
    assert ended.code == 0
    seen = json.loads((binary.parent / "seen.json").read_text())
    assert seen["argv"][seen["argv"].index("-c") + 1] == "2048"
    assert seen["env"]["CUDA_VISIBLE_DEVICES"] == "1"
    assert seen["env"]["CUDA_DEVICE_ORDER"] == "PCI_BUS_ID"
    assert not [k for k in seen["env"] if k.startswith("LLAMA_ARG_")]
    assert handle.log_path.read_text().startswith("# llama-orch: " + str(binary))


async def test_a_model_file_that_is_not_gguf_is_refused_before_anything_starts(
    tmp_path: Path,
) -> None:
    binary = fake_llama_server(tmp_path / "cuda", listing=CUDA_LISTING)
    model = tmp_path / "model.gguf"
    model.write_bytes(tiny_gguf.write(tmp_path / "whole.gguf").read_bytes()[:3000])
    spec = make_spec(tmp_path, model_path=model, binary=str(binary))
    with pytest.raises(interfaces.EngineStartError) as caught:
        await engine_llamacpp.LlamaCppEngine().start(spec)
    assert "model file is not a usable GGUF" in caught.value.reason
    assert f"{model}: cut short in the metadata" in caught.value.reason
    assert "models.tiny.digest" in caught.value.reason
    assert not (spec.state_dir / "engines").exists()


LOADED_17_OF_17 = (
    "load_tensors: offloading 16 repeating layers to GPU\n"
    "load_tensors: offloading output layer to GPU\n"
    "load_tensors: offloaded 17/17 layers to GPU\n"
    "load_tensors:        CUDA0 model buffer size =  1857.27 MiB\n"
)


@pytest.mark.parametrize(
    ("log", "allowed", "refused"),
    [
        (LOADED_17_OF_17, False, False),
        (LOADED_17_OF_17.replace("17/17", "12/17"), False, True),
        (LOADED_17_OF_17.replace("17/17", "12/17"), True, False),  # the test-only switch
        ("", False, False),  # no line (verbosity lowered by the pool): a warning, not a refusal
    ],
)
async def test_a_load_that_leaves_layers_on_the_cpu_fails_the_start(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
    log: str,
    allowed: bool,
    refused: bool,
) -> None:
    if allowed:
        monkeypatch.setenv(engine_llamacpp.ALLOW_CPU_ENV, "1")
    binary = fake_llama_server(tmp_path / "cuda", listing=CUDA_LISTING, log=log)
    engine = engine_llamacpp.LlamaCppEngine()
    handle = await engine.start(make_spec(tmp_path, binary=str(binary)))
    try:
        if refused:
            with pytest.raises(interfaces.EngineStartError) as caught:
                await engine.wait_ready(handle, timeout_s=10)
            reason = caught.value.reason
            assert "left 5 of 17 layers on the CPU (offloaded 12/17 layers to GPU)" in reason
            assert "HME-013" in reason and "-ngl" in reason
        else:
            with caplog.at_level(logging.WARNING, logger=engine_llamacpp.__name__):
                await engine.wait_ready(handle, timeout_s=10)
            unconfirmed = "cannot confirm every layer is on the GPU"
            assert any(unconfirmed in r.getMessage() for r in caplog.records) == (not log)
    finally:
        await engine.stop(handle, grace_s=2)


def test_the_offload_count_is_the_last_one_llama_cpp_logged() -> None:
    assert engine_llamacpp.offloaded_layers(LOADED_17_OF_17) == (17, 17)
    twice = "load_tensors: offloaded 0/33 layers to GPU\n" + LOADED_17_OF_17
    assert engine_llamacpp.offloaded_layers(twice) == (17, 17)
    assert engine_llamacpp.offloaded_layers("llama_model_load: error loading model") is None


def test_list_devices_output_is_read_as_device_lines() -> None:
    parse = engine_llamacpp.parse_list_devices
    assert parse(CUDA_LISTING) == ["CUDA0: NVIDIA H200 (143155 MiB, 140401 MiB free)"]
    assert parse(CPU_LISTING) == []
    assert parse("usage: llama-server [options]") is None


def test_the_plugin_registers_the_llamacpp_engine() -> None:
    manager = pluggy.PluginManager(hookspecs.PROJECT)
    manager.add_hookspecs(hookspecs)
    manager.register(engine_llamacpp.plugin)
    registered: dict[str, Any] = {}
    manager.hook.orch_register_engines(register=registered.__setitem__)
    assert isinstance(registered["llamacpp"], engine_llamacpp.LlamaCppEngine)


async def test_a_cpu_only_build_fails_its_pool_with_the_fix_in_status(
    workspace: Any, serve: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A daemon serving a llamacpp pool whose binary sees no GPU: the pool is Failed, and
    its reason in status carries the fix, not only the log."""
    from tests import tiny_gguf
    from tests.conftest import config, wait_for

    monkeypatch.delenv("LLAMA_ORCH_TEST_ALLOW_CPU_INFERENCE", raising=False)
    binary = executable(
        tmp_path / "cpu" / "llama-server", "#!/bin/sh\necho 'Available devices: (none)'\n"
    )
    tiny_gguf.write(workspace.root / "m1.gguf")
    cfg = config(engines={"llamacpp": {"binary": str(binary)}})
    cfg["models"]["m1"] = {"ref": "file:m1.gguf"}
    cfg["pools"][0] = {"id": "p1", "engine": "llamacpp", "model": "m1", "ctx": 256}
    workspace.write_config(cfg)
    await serve(ready=False)

    def pool() -> dict[str, Any]:
        row: dict[str, Any] = workspace.status()["pools"][0]
        return row

    await wait_for(lambda: pool()["state"] == "Failed", 15, "the pool Failed")
    reason = pool()["reason"]
    assert (
        "lists no CUDA device" in reason
        and "Fix: llama-orch runs inference on NVIDIA GPUs" in reason
    )
