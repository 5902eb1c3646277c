"""The real `llama-server` (llama.cpp), built from source on the CPU, serving a tiny GGUF.

The product never serves inference on the CPU (HME-013). These tests use a CPU-only build
through the test-only switch LLAMA_ORCH_TEST_ALLOW_CPU_INFERENCE=1, which logs loudly; they
are skipped, with the reason, when no such build is cached (build one with
`python -m plugins.provision_llamacpp --cpu`, about 7 minutes on 2 cores).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from plugins import engine_llamacpp, interfaces, llamacpp_builds
from tests import tiny_gguf
from tests.conftest import Workspace, config, task, wait_for, wait_terminal

BINARY = llamacpp_builds.cached_binary(cpu=True)
pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(
        not BINARY.is_file(),
        reason=f"no CPU llama-server build at {BINARY} "
        "(python -m plugins.provision_llamacpp --cpu)",
    ),
]


def _spec(tmp_path: Path, model: Path) -> interfaces.ReplicaSpec:
    return interfaces.ReplicaSpec(
        replica_id="real-0",
        pool_id="real",
        engine="llamacpp",
        model_id="tiny",
        model_ref=f"file:{model}",
        model_path=model,
        model_size_mib=1,
        model_digest=None,
        devices=(0,),
        ctx=512,
        slots=2,
        spec_hash="x",
        state_dir=tmp_path,
        options={"binary": str(BINARY)},
    )


async def test_the_gpu_only_rule_refuses_a_cpu_build(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv(engine_llamacpp.ALLOW_CPU_ENV, raising=False)
    model = tiny_gguf.write(tmp_path / "tiny.gguf")
    with pytest.raises(interfaces.EnvironmentMissing) as refused:
        await engine_llamacpp.LlamaCppEngine().start(_spec(tmp_path, model))
    assert "no CUDA device" in refused.value.what and "GGML_CUDA" in refused.value.fix


async def test_the_real_server_streams_deterministic_text_for_a_seed(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(engine_llamacpp.ALLOW_CPU_ENV, "1")
    model = tiny_gguf.write(tmp_path / "tiny.gguf")
    engine = engine_llamacpp.LlamaCppEngine()
    handle = await engine.start(_spec(tmp_path, model))
    try:
        await engine.wait_ready(handle, timeout_s=60)
        info = await engine.describe(handle)
        assert info.engine_version and info.slots_total == 2

        async def text(seed: int) -> tuple[str, interfaces.Done]:
            out, done = [], None
            request = interfaces.GenerateRequest("t", "hello world", 12, seed, temperature=1.0)
            async for item in engine.generate(handle, request):
                if isinstance(item, interfaces.Token):
                    out.append(item.text)
                else:
                    done = item
            assert done is not None
            return "".join(out), done

        first, done = await text(42)
        again, _ = await text(42)
        other, _ = await text(7)
        assert first == again and first != other
        assert done.tokens_out == 12 and done.finish_reason == "length"
    finally:
        ended = await engine.stop(handle, grace_s=5)
    assert ended.signal in (None, 15) or ended.code == 0
    assert engine.poll_exit(handle) is not None


def _tiny_model_on_cpu(workspace: Workspace, monkeypatch: pytest.MonkeyPatch) -> dict[str, Any]:
    """A config with the tiny random-weight model on the CPU build (the test-only switch
    set); the caller adds its pools."""
    monkeypatch.setenv(engine_llamacpp.ALLOW_CPU_ENV, "1")
    tiny_gguf.write(workspace.root / "tiny.gguf")
    cfg = config()
    cfg["models"]["tiny"] = {"ref": "file:tiny.gguf"}
    cfg["engines"] = {"llamacpp": {"binary": str(BINARY)}}
    cfg["timeouts"]["ready_s"] = 60
    return cfg


async def test_the_daemon_serves_a_task_through_the_real_server(
    workspace: Workspace, serve: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    cfg = _tiny_model_on_cpu(workspace, monkeypatch)
    cfg["pools"] = [{"id": "real", "engine": "llamacpp", "model": "tiny", "ctx": 512, "slots": 2}]
    workspace.write_config(cfg)
    await serve(ready=False)
    await wait_for(lambda: workspace.status()["pools"][0]["state"] == "Ready", 60, "Ready")
    workspace.submit("r.task.yaml", task("r", model="tiny", max_tokens=10, seed=3))
    result = await wait_terminal(workspace, "r", 60)
    assert result["status"] == "succeeded", result
    assert result["tokens_out"] == 10 and result["engine"] == "llamacpp"
    assert result["engine_version"] and result["engine_version"].startswith("b")


async def test_the_openai_client_chats_with_the_real_server_through_the_daemon(
    workspace: Workspace, serve: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    import openai

    cfg = _tiny_model_on_cpu(workspace, monkeypatch)
    cfg["pools"] = [{"id": "real", "engine": "llamacpp", "model": "tiny", "ctx": 512, "slots": 2}]
    workspace.write_config(cfg)
    running = await serve(ready=False)
    await wait_for(lambda: workspace.status()["pools"][0]["state"] == "Ready", 60, "Ready")
    server = running.daemon.server
    assert server is not None
    hi = [{"role": "user", "content": "hi"}]
    async with openai.AsyncOpenAI(base_url=server.url + "/v1", api_key="x", max_retries=0) as oa:
        whole = await oa.chat.completions.create(model="tiny", messages=hi, max_tokens=6, seed=3)
        stream = await oa.chat.completions.create(
            model="tiny",
            messages=hi,
            max_tokens=6,
            seed=3,
            stream=True,
            stream_options={"include_usage": True},
        )
        chunks = [chunk async for chunk in stream]
        text = await oa.completions.create(model="tiny", prompt="hello", max_tokens=4, seed=3)
    streamed = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert whole.choices[0].message.content and streamed == whole.choices[0].message.content
    assert whole.choices[0].finish_reason == "length" and whole.usage is not None
    assert whole.usage.completion_tokens == 6
    # the chat template wrapped the two bytes of "hi" in its role markers
    assert whole.usage.prompt_tokens > 10
    assert (
        chunks[-1].usage is not None and chunks[-1].usage.prompt_tokens == whole.usage.prompt_tokens
    )
    result = workspace.result(whole.id)
    assert result is not None and result["engine"] == "llamacpp"
    assert result["prompt_tokens"] == whole.usage.prompt_tokens
    assert text.choices[0].finish_reason == "length" and text.usage is not None
    assert text.usage.completion_tokens == 4


async def test_orchctl_determinism_on_two_real_servers_is_byte_identical_per_replica(
    workspace: Workspace, serve: Any, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """The determinism suite on two real llama-servers, one per (simulated) GPU, each with one
    slot and no continuous batching (OC-TEST-7002): the same replica gives byte-identical
    streams across runs, and both builds give the same stream per seed."""
    import asyncio
    import json

    from reconciler import cli

    cfg = _tiny_model_on_cpu(workspace, monkeypatch)
    cfg["pools"] = [
        {"id": pid, "engine": "llamacpp", "model": "tiny", "devices": [gpu], "ctx": 256,
         "slots": 1, "flags": ["--no-cont-batching"]}
        for pid, gpu in (("real-a", 0), ("real-b", 1))
    ]  # fmt: skip
    workspace.write_config(cfg)
    running = await serve(ready=False)
    await wait_for(
        lambda: all(p["state"] == "Ready" for p in workspace.status()["pools"]), 90, "Ready"
    )
    server = running.daemon.server
    assert server is not None
    out = tmp_path / "determinism"
    argv = ["determinism", "--url", server.url, "--seeds", "8", "--max-tokens", "16"]
    code = await asyncio.to_thread(cli.main, [*argv, "--out", str(out)])
    data = json.loads((out / "determinism.json").read_text())
    assert code == 0, data["problems"]
    assert [(p["a"], p["matched"]) for p in data["same_replica"]] == [
        ("real-a-0", 8),
        ("real-b-0", 8),
    ]
    assert data["cross_replica"][0]["mismatched"] == 0
    assert str(data["engine_version"]).startswith("b")
    assert data["distinct_streams_across_seeds"]["real-a"] > 1  # the seed picks the tokens
    for row in data["latency"]:
        assert row["n"] == 16 and row["tokens_per_s"]["p50"] > 0
    print((out / "determinism.md").read_text())
