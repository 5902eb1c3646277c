"""The daemon downloads a pool's hf: model in the background and shows it in status.

A `simfile` engine (the sim engine, but one that needs its model file like llama.cpp) serves
the pools; a local HTTP server stands in for the hub (HF_ENDPOINT).
"""

from __future__ import annotations

import asyncio
import hashlib
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from plugins import engine_sim, hookspecs, registry, resolvers
from reconciler import daemon as daemons
from tests import model_hub
from tests.conftest import Workspace, config, task, wait_for, wait_terminal

DATA = bytes(range(256)) * 4096 * 4  # 4 MiB
DIGEST = "sha256:" + hashlib.sha256(DATA).hexdigest()
FILE_PATH = "/acme/tiny-GGUF/resolve/main/tiny.gguf"


class FileSimEngine(engine_sim.SimEngine):
    name = "simfile"
    needs_model_file = True


class _Plugin:
    @hookspecs.hookimpl
    def orch_register_engines(self, register: Callable[[str, Any], None]) -> None:
        register("simfile", FileSimEngine())


@pytest.fixture
def hub(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[model_hub.Hub]:
    monkeypatch.setenv(resolvers.MODELS_ENV, str(tmp_path / "models"))
    with model_hub.serving() as served:
        monkeypatch.setenv("HF_ENDPOINT", served.url)
        served.hf("acme/tiny-GGUF", "tiny.gguf", DATA)
        yield served


def hub_config(
    digest: str | None = DIGEST, ref: str = "hf:acme/tiny-GGUF/tiny.gguf"
) -> dict[str, Any]:
    cfg = config()
    cfg["models"]["m1"] = {"ref": ref, "size_mib": 100, **({"digest": digest} if digest else {})}
    pool = cfg["pools"][0]
    pool["engine"] = "simfile"
    del pool["sim"]
    return cfg


async def start(ws: Workspace) -> tuple[daemons.Daemon, asyncio.Task[int]]:
    plugins = registry.load(extra=[_Plugin()], entry_points=False)
    d = daemons.build(daemons.Options(config_path=ws.config_path, resync_s=0.2), plugins=plugins)
    return d, asyncio.get_running_loop().create_task(d.run())


async def stop(d: daemons.Daemon, job: asyncio.Task[int]) -> None:
    d.stop()
    await asyncio.wait_for(job, 20)


def pool(ws: Workspace) -> dict[str, Any]:
    found: dict[str, Any] = ws.status()["pools"][0]
    return found


async def test_a_pool_shows_its_download_progressing_then_serves_from_the_cache(
    workspace: Workspace, hub: model_hub.Hub, tmp_path: Path
) -> None:
    hub.delay_s = 0.02  # 64 chunks: about a second and a half
    workspace.write_config(hub_config())
    d, job = await start(workspace)
    try:
        seen: list[str] = []

        def progressing() -> bool:
            p = pool(workspace)
            if p["state"] == "Progressing" and "%" in (p["reason"] or ""):
                seen.append(p["reason"])
            return len(seen) >= 2 and seen[-1] != seen[0]

        await wait_for(progressing, 10, "download progress in status")
        assert seen[0].startswith("downloading model 'm1' (hf:acme/tiny-GGUF/tiny.gguf): ")
        assert seen[-1].endswith("of 4.0 MiB")
        await wait_for(lambda: pool(workspace)["state"] == "Ready", 15, "the pool Ready")
        cached = tmp_path / "models/hf/acme/tiny-GGUF/main/tiny.gguf"
        assert cached.read_bytes() == DATA
        workspace.submit("t1.task.yaml", task("t1"))
        assert (await wait_terminal(workspace, "t1"))["status"] == "succeeded"
    finally:
        await stop(d, job)


async def test_a_download_cut_by_a_daemon_restart_resumes_in_the_next_daemon(
    workspace: Workspace, hub: model_hub.Hub, tmp_path: Path
) -> None:
    hub.delay_s = 0.05
    workspace.write_config(hub_config())
    target = tmp_path / "models/hf/acme/tiny-GGUF/main/tiny.gguf"
    d, job = await start(workspace)
    await wait_for(lambda: resolvers.downloads.partial_bytes(target) > 0, 10, "a part file")
    await stop(d, job)
    left = resolvers.downloads.partial_bytes(target)
    assert 0 < left < len(DATA) and not target.exists()

    hub.delay_s = 0.0
    d, job = await start(workspace)
    try:
        await wait_for(lambda: pool(workspace)["state"] == "Ready", 15, "the pool Ready")
        assert target.read_bytes() == DATA
        ranges = [r for path, r in hub.requests if path == FILE_PATH]
        assert ranges[0] is None and ranges[-1] is not None and ranges[-1].startswith("bytes=")
        assert int(ranges[-1][6:-1]) >= left  # only the rest was fetched again
    finally:
        await stop(d, job)


async def test_a_download_whose_digest_differs_fails_the_pool_as_untrusted(
    workspace: Workspace, hub: model_hub.Hub, tmp_path: Path
) -> None:
    workspace.write_config(hub_config(digest="sha256:" + "ab" * 32))
    d, job = await start(workspace)
    try:
        await wait_for(lambda: pool(workspace)["state"] == "Failed", 10, "the pool Failed")
        reason = pool(workspace)["reason"]
        assert reason.startswith("UNTRUSTED_ARTIFACT: tiny.gguf downloaded from ")
        assert DIGEST in reason and pool(workspace)["replicas"] == []
        assert not list((tmp_path / "models").rglob("tiny.gguf*"))
    finally:
        await stop(d, job)


async def test_a_model_missing_from_the_hub_fails_the_pool_with_the_ref_to_check(
    workspace: Workspace, hub: model_hub.Hub
) -> None:
    workspace.write_config(hub_config(digest=None, ref="hf:acme/tiny-GGUF/nope.gguf"))
    d, job = await start(workspace)
    try:
        await wait_for(lambda: pool(workspace)["state"] == "Failed", 10, "the pool Failed")
        reason = pool(workspace)["reason"]
        assert reason.startswith("model 'm1' cannot be downloaded: ") and "HTTP 404" in reason
        assert "check models.m1.ref" in reason
    finally:
        await stop(d, job)


async def test_a_sim_pool_never_downloads_the_model_it_only_simulates(
    workspace: Workspace, hub: model_hub.Hub, serve: Any
) -> None:
    cfg = config()
    cfg["models"]["m1"]["ref"] = "hf:acme/tiny-GGUF/tiny.gguf"
    workspace.write_config(cfg)
    await serve()
    assert hub.requests == []
