"""The reconcile loop against real sim engine processes: convergence, edits, faults."""

from __future__ import annotations

import asyncio
import copy
import time
from typing import Any

import pytest

from plugins import engine_sim
from reconciler import cli_status, clocks, probing
from reconciler import daemon as daemons
from tests.conftest import Workspace, config, task, wait_for, wait_terminal

pytestmark = pytest.mark.slow


def _pool(ws: Workspace, pool_id: str) -> dict[str, Any]:
    return next(p for p in ws.status()["pools"] if p["id"] == pool_id)


def _pids(ws: Workspace) -> dict[str, int]:
    return {r["id"]: r["pid"] for p in ws.status()["pools"] for r in p["replicas"]}


def _ready(ws: Workspace, pool_id: str, replicas: int | None = None) -> bool:
    try:
        pool = _pool(ws, pool_id)
    except (StopIteration, OSError, ValueError):
        return False
    ok = pool["state"] == "Ready" and not pool["reason"]
    return ok and (replicas is None or len(pool["replicas"]) == replicas)


def _two_pools() -> dict[str, Any]:
    cfg = config()
    cfg["models"]["big"] = {"ref": "file:big.gguf", "size_mib": 15000}
    cfg["pools"] = [
        {"id": "small", "engine": "sim", "model": "m1", "ctx": 1024, "slots": 1},
        {"id": "large", "engine": "sim", "model": "big", "ctx": 1024, "slots": 1},
    ]
    return cfg


async def test_two_pools_on_a_24_and_12_gb_pair_are_placed_by_free_vram(
    workspace: Workspace, serve: Any
) -> None:
    workspace.write_config(_two_pools())
    await serve()
    gpus = {p["id"]: p["replicas"][0]["gpu"] for p in workspace.status()["pools"]}
    assert gpus == {"large": [0], "small": [1]}  # the big model only fits on the 24 GB card
    measured = {
        r["id"]: r["vram_measured_mib"] for p in workspace.status()["pools"] for r in p["replicas"]
    }
    assert all(m and m > 0 for m in measured.values())


async def test_scaling_up_and_down_leaves_existing_replicas_running(
    workspace: Workspace, serve: Any
) -> None:
    await serve()
    first = _pids(workspace)["p1-0"]
    cfg = config()
    cfg["pools"][0]["replicas"] = 3
    workspace.write_config(cfg)
    await wait_for(lambda: _ready(workspace, "p1", 3), 15, "three replicas")
    assert _pids(workspace)["p1-0"] == first
    cfg["pools"][0]["replicas"] = 1
    workspace.write_config(cfg)
    await wait_for(lambda: _ready(workspace, "p1", 1), 15, "one replica")
    assert _pids(workspace) == {"p1-0": first}


async def test_a_model_swap_replaces_only_the_changed_pool(
    workspace: Workspace, serve: Any
) -> None:
    cfg = _two_pools()
    cfg["models"]["m2"] = {"ref": "file:m2.gguf", "size_mib": 800}
    workspace.write_config(cfg)
    await serve()
    before = _pids(workspace)
    swapped = copy.deepcopy(cfg)
    swapped["pools"][0]["model"] = "m2"
    workspace.write_config(swapped)

    def swapped_ready() -> bool:
        pids = [r["pid"] for r in _pool(workspace, "small")["replicas"]]
        return _ready(workspace, "small", 1) and before["small-0"] not in pids

    await wait_for(swapped_ready, 15, "the swapped pool Ready")
    after = _pids(workspace)
    assert after["large-0"] == before["large-0"]
    assert len(after) == 2
    workspace.submit("s.task.yaml", task("s", model="m2"))
    assert (await wait_terminal(workspace, "s"))["status"] == "succeeded"


async def test_an_invalid_edit_changes_nothing_that_runs(workspace: Workspace, serve: Any) -> None:
    await serve()
    before = _pids(workspace)
    workspace.config_path.write_text(
        workspace.config_path.read_text().replace("replicas: 1", "replcas: 3")
    )
    await wait_for(lambda: workspace.status()["config"]["errors"], 10, "the error shown")
    errors = workspace.status()["config"]["errors"]
    assert errors[0]["field"].endswith("replcas") and errors[0]["line"]
    assert "did you mean 'replicas'" in errors[0]["text"]
    assert _pids(workspace) == before
    workspace.submit("still.task.yaml", task("still"))
    assert (await wait_terminal(workspace, "still"))["status"] == "succeeded"


async def test_a_pool_that_fits_no_gpu_is_unschedulable_with_the_numbers(
    workspace: Workspace, serve: Any
) -> None:
    cfg = config()
    cfg["models"]["huge"] = {"ref": "file:huge.gguf", "size_mib": 40000}
    cfg["pools"].append({"id": "huge", "engine": "sim", "model": "huge"})
    workspace.write_config(cfg)
    await serve(ready=False)
    await wait_for(lambda: _pool(workspace, "huge")["state"] == "Unschedulable", 10)
    reason = _pool(workspace, "huge")["reason"]
    assert "MiB" in reason and "needs" in reason
    workspace.submit("h.task.yaml", task("h", model="huge"))
    result = await wait_terminal(workspace, "h")
    assert result["error"]["code"] == "POOL_UNAVAILABLE" and "needs" in result["error"]["message"]


async def test_a_replica_that_hangs_before_ready_is_timed_out_and_restarted(
    workspace: Workspace, serve: Any
) -> None:
    cfg = config(timeouts={"ready_s": 0.5, "drain_s": 1, "stop_grace_s": 1})
    cfg["pools"][0]["sim"] = {"faults": {"hang_before_ready": True}}
    workspace.write_config(cfg)
    await serve(ready=False)
    await wait_for(
        lambda: (
            _pool(workspace, "p1")["replicas"]
            and _pool(workspace, "p1")["replicas"][0]["restarts"] >= 1
        ),
        15,
        "a restart",
    )
    replica = _pool(workspace, "p1")["replicas"][0]
    assert "not ready after 0.5 s" in replica["last_error"]


async def test_crashes_back_off_then_open_the_breaker_on_a_fake_clock(workspace: Workspace) -> None:
    cfg = config()
    cfg["pools"][0]["sim"] = {"faults": {"crash_at_start": True}}
    workspace.write_config(cfg)
    clock = clocks.FakeClock()
    d = daemons.build(daemons.Options(config_path=workspace.config_path, watch=False), clock=clock)
    delays = []
    try:
        for _ in range(40):
            await d.pass_once()
            await d.pools.idle()
            replica = d.pools.replicas.get("p1-0")
            if replica is not None and replica.state == "Failed":
                break
            if replica is not None and replica.state == "BackingOff":
                wait = replica.life.retry_in_s(clock.monotonic()) or 0.0
                delays.append(wait)
                clock.advance(wait)
        else:
            pytest.fail("the breaker never opened")
        pool = next(p.model_dump() for p in d.pools.status_rows() if p.id == "p1")
        assert pool["state"] == "Failed"
        assert len(pool["replicas"][0]["recent_errors"]) == 5
        assert "exit code" in pool["replicas"][0]["last_error"]
        assert len(delays) == 4
        assert all(0.9 * 2**i <= x <= 1.1 * 2**i for i, x in enumerate(delays))
        # the reason says why nothing restarts it and how to start it again
        assert "circuit breaker open" in pool["reason"], pool["reason"]
        assert "POST /v1/pools/p1/reload" in pool["reason"]
        d.pools.retry_pool("p1", "a reload of its pool was requested")  # what a reload does
        await d.pass_once()
        await d.pools.idle()
        replica = d.pools.replicas.get("p1-0")
        assert replica is not None and replica.state in ("Starting", "BackingOff"), replica
        assert replica.life.streak <= 1  # a fresh streak: the breaker is closed again
    finally:
        await d.pools.shutdown()


async def test_a_model_file_that_does_not_match_its_digest_is_never_started(
    workspace: Workspace, serve: Any
) -> None:
    (workspace.root / "m1.gguf").write_bytes(b"GGUF not the file you pinned")
    cfg = config()
    cfg["models"]["m1"]["digest"] = "sha256:" + "0" * 64
    workspace.write_config(cfg)
    await serve(ready=False)
    await wait_for(lambda: _pool(workspace, "p1")["state"] == "Failed", 10)
    reason = _pool(workspace, "p1")["reason"]
    assert "UNTRUSTED_ARTIFACT" in reason and "m1.gguf" in reason
    assert _pool(workspace, "p1")["replicas"][0]["pid"] is None


async def test_a_ref_scheme_without_a_resolver_fails_its_pool_with_the_reason(
    workspace: Workspace, serve: Any
) -> None:
    cfg = config()
    cfg["models"]["m1"]["ref"] = "s3://bucket/file.gguf"
    workspace.write_config(cfg)
    await serve(ready=False)
    await wait_for(lambda: _pool(workspace, "p1")["state"] == "Failed", 10)
    assert "no model resolver for s3: refs" in _pool(workspace, "p1")["reason"]


async def test_a_graceful_stop_leaves_no_engine_process(workspace: Workspace, serve: Any) -> None:
    import os

    running = await serve()
    pids = list(_pids(workspace).values())
    assert pids and all(os.path.exists(f"/proc/{p}") for p in pids)
    assert await running.stop() == 0
    await wait_for(lambda: not any(os.path.exists(f"/proc/{p}") for p in pids), 5)
    assert workspace.status()["daemon"]["state"] == "stopped"


async def test_the_config_revision_is_the_git_commit_with_a_dirty_flag(
    workspace: Workspace, serve: Any
) -> None:
    import subprocess

    def git(*args: str) -> None:
        subprocess.run(["git", "-C", str(workspace.root), *args], check=True, capture_output=True)

    git("init", "-q")
    git("-c", "user.email=t@t", "-c", "user.name=t", "add", "orch.yaml")
    git("-c", "user.email=t@t", "-c", "user.name=t", "commit", "-qm", "desired state")
    await serve()
    revision = workspace.status()["config"]["revision"]
    assert revision.startswith("git:") and not revision.endswith("+dirty")
    cfg = config()
    cfg["pools"][0]["replicas"] = 2
    workspace.write_config(cfg)
    await wait_for(lambda: workspace.status()["config"]["revision"].endswith("+dirty"), 10)


async def test_a_pool_with_some_replicas_placed_is_ready_and_degraded_with_the_fix(
    workspace: Workspace, serve: Any
) -> None:
    cfg = config()
    cfg["models"]["big"] = {"ref": "file:big.gguf", "size_mib": 14000}
    cfg["pools"].append({"id": "big", "engine": "sim", "model": "big", "replicas": 2})
    workspace.write_config(cfg)
    await serve(ready=False)
    await wait_for(lambda: (_pool(workspace, "big")["reason"] or "").startswith("degraded"), 10)
    pool = _pool(workspace, "big")
    assert pool["state"] == "Ready"
    assert "degraded: 1 of 2 replicas Ready" in pool["reason"]
    assert "1 of 2 replicas not placed (the other takes GPU 0)" in pool["reason"]
    assert "To fit: lower ctx (4096) or slots (1)" in pool["reason"]
    workspace.submit("b.task.yaml", task("b", model="big"))
    assert (await wait_terminal(workspace, "b"))["status"] == "succeeded"


async def test_a_pool_whose_model_file_is_missing_fails_without_starting(
    workspace: Workspace, serve: Any
) -> None:
    cfg = config()
    cfg["models"]["real"] = {"ref": "file:models/absent.gguf"}
    cfg["pools"].append({"id": "real", "engine": "llamacpp", "model": "real"})
    workspace.write_config(cfg)
    await serve(ready=False)
    await wait_for(lambda: _pool(workspace, "real")["state"] == "Failed", 10)
    pool = _pool(workspace, "real")
    assert f"file {workspace.root / 'models' / 'absent.gguf'} does not exist" in pool["reason"]
    assert pool["replicas"] == []


async def test_an_idle_daemon_does_not_wake_itself_by_reading_its_own_files(
    workspace: Workspace, serve: Any
) -> None:
    running = await serve(resync_s=1.0)
    d = running.daemon
    passes = 0
    real = d.pass_once

    async def counted() -> None:
        nonlocal passes
        passes += 1
        await real()

    d.pass_once = counted  # type: ignore[method-assign]
    await asyncio.sleep(2.0)
    # the resync wakes it about twice; reading orch.yaml (an inotify open/close) must not
    assert passes <= 4, f"{passes} passes in 2 s while idle"


async def test_the_warm_up_request_absorbs_the_engines_slow_first_request(
    workspace: Workspace, serve: Any
) -> None:
    cfg = config()
    cfg["pools"][0]["sim"] = {
        "tokens_per_s": 400,
        "first_token_ms": 5,
        "first_request_extra_ms": 800,
    }
    workspace.write_config(cfg)
    await serve()
    first_token_ms = []
    for n in range(3):
        workspace.submit(f"w{n}.task.yaml", task(f"w{n}", max_tokens=2))
        result = await wait_terminal(workspace, f"w{n}")
        assert result["status"] == "succeeded"
        first_token_ms.append(result["timings"]["first_token_ms"])
    # without the warm-up the first task would wait 800 ms more than the others
    assert first_token_ms[0] < 400
    assert first_token_ms[0] <= max(first_token_ms[1:]) + 100


async def test_a_replica_measured_far_from_its_estimate_is_warned_about_once(
    workspace: Workspace, serve: Any, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level("INFO", logger="llama_orch")
    cfg = config()
    cfg["pools"][0]["sim"] = {"faults": {"extra_vram_mib": 1200}}  # books 1200 MiB too many
    cfg["pools"].append({"id": "p2", "engine": "sim", "model": "m1", "ctx": 512, "slots": 1})
    workspace.write_config(cfg)
    await serve(resync_s=0.05)

    def warnings() -> list[Any]:
        return [
            r for r in caplog.records if getattr(r, "orch_event", "") == "replica.vram_mismatch"
        ]

    await wait_for(lambda: warnings(), 10, "the VRAM warning")
    await asyncio.sleep(0.5)  # several more passes: still one warning
    [warning] = warnings()
    assert warning.levelname == "WARNING"
    assert warning.orch_fields["replica_id"] == "p1-0"  # type: ignore[attr-defined]
    row = _pool(workspace, "p1")["replicas"][0]
    assert row["vram_measured_mib"] == row["vram_estimated_mib"] + 1200
    assert warning.getMessage() == (
        f"Replica p1-0 uses {row['vram_measured_mib']} MiB of VRAM, +61% against its estimate "
        f"of {row['vram_estimated_mib']} MiB; placement plans with the estimate, so GPUs may be "
        "overcommitted."
    )
    other = _pool(workspace, "p2")["replicas"][0]
    assert other["vram_measured_mib"] == other["vram_estimated_mib"]  # the sim's own footprint
    table = cli_status.table(probing.probe(workspace.root / ".orch"), now=time.time())
    shown = f"vram {row['vram_estimated_mib']} est/{row['vram_measured_mib']} used MiB"
    assert shown in next(line for line in table.splitlines() if "p1-0" in line)


async def test_an_engine_that_dies_on_its_warm_up_request_never_becomes_ready(
    workspace: Workspace, serve: Any
) -> None:
    cfg = config()
    cfg["pools"][0]["sim"] = {"faults": {"die_after_tokens": 0}}
    workspace.write_config(cfg)
    await serve(ready=False)
    await wait_for(lambda: _pool(workspace, "p1")["replicas"][0]["last_error"], 10, "a failure")
    replica = _pool(workspace, "p1")["replicas"][0]
    assert replica["state"] != "Ready"
    assert replica["last_error"].startswith("warm-up request failed: exit code 134: sim: fault")


async def test_a_restarted_replica_is_booked_at_the_estimate_of_what_it_loads_now(
    workspace: Workspace, serve: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The model file at a ref can change between two starts of one replica (replaced by a
    bigger one, a broken one repaired): the restart loads the new file, so placement must
    book what the engine estimates for it now, not the estimate of the first start."""
    cfg = config()
    cfg["pools"][0]["sim"] = {"tokens_per_s": 200, "faults": {"die_after_tokens": 3}}
    workspace.write_config(cfg)
    grown = {"by": 0}
    estimate = engine_sim.SimEngine.estimate_vram_mib
    monkeypatch.setattr(
        engine_sim.SimEngine,
        "estimate_vram_mib",
        lambda self, spec: estimate(self, spec) + grown["by"],
    )
    await serve()
    first = _pool(workspace, "p1")["replicas"][0]["vram_estimated_mib"]
    grown["by"] = 300  # the file at the model's ref is now a bigger one
    workspace.submit("doomed.task.yaml", task("doomed", max_tokens=10))  # its engine dies
    await wait_terminal(workspace, "doomed")

    def restarted() -> bool:
        replica = _pool(workspace, "p1")["replicas"][0]
        return bool(replica["restarts"] >= 1 and replica["state"] == "Ready")

    await wait_for(restarted, 10, "the replica restarted")
    assert _pool(workspace, "p1")["replicas"][0]["vram_estimated_mib"] == first + 300
