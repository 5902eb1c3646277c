"""The `sim` engine with real child processes: readiness, deterministic text, slots, cancel,
every injected fault, VRAM bookings, stopping and adoption after a daemon restart."""

from __future__ import annotations

import asyncio
import json
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import pluggy
import pytest

from plugins import (
    engine_sim,
    hookspecs,
    interfaces,
    llama_server,
    processes,
    sim_bookings,
    sim_protocol,
)

pytestmark = pytest.mark.slow


def make_spec(
    state_dir: Path,
    *,
    replica_id: str = "chat-0",
    devices: tuple[int, ...] = (0,),
    ctx: int = 512,
    slots: int = 1,
    model_size_mib: int = 100,
    **options: Any,
) -> interfaces.ReplicaSpec:
    return interfaces.ReplicaSpec(
        replica_id=replica_id,
        pool_id="chat",
        engine="sim",
        model_id="tiny",
        model_ref="file:tiny.gguf",
        model_path=None,
        model_size_mib=model_size_mib,
        model_digest="sha256:" + "0" * 64,
        devices=devices,
        ctx=ctx,
        slots=slots,
        spec_hash="h1",
        state_dir=state_dir,
        options=options,
    )


def request(
    prompt: str = "write a haiku about rivers", *, seed: int = 7, max_tokens: int = 12
) -> interfaces.GenerateRequest:
    return interfaces.GenerateRequest(task_id="t", prompt=prompt, max_tokens=max_tokens, seed=seed)


class Replicas:
    """Starts sim replicas for one test and stops every one of them afterwards."""

    def __init__(self, state_dir: Path) -> None:
        self.engine = engine_sim.SimEngine()
        self.state_dir = state_dir
        self.handles: list[interfaces.ReplicaHandle] = []

    def spec(self, **kw: Any) -> interfaces.ReplicaSpec:
        return make_spec(self.state_dir, **kw)

    async def start(self, **kw: Any) -> interfaces.ReplicaHandle:
        handle = await self.engine.start(self.spec(**kw))
        self.handles.append(handle)
        return handle

    async def ready(self, **kw: Any) -> interfaces.ReplicaHandle:
        handle = await self.start(**kw)
        await self.engine.wait_ready(handle, timeout_s=10)
        return handle

    async def text(
        self, handle: interfaces.ReplicaHandle, req: interfaces.GenerateRequest
    ) -> tuple[str, interfaces.Done]:
        items = [item async for item in self.engine.generate(handle, req)]
        done = items.pop()
        assert isinstance(done, interfaces.Done)
        return "".join(t.text for t in items if isinstance(t, interfaces.Token)), done

    async def exited(self, handle: interfaces.ReplicaHandle) -> interfaces.ExitInfo:
        for _ in range(200):
            ended = self.engine.poll_exit(handle)
            if ended is not None:
                return ended
            await asyncio.sleep(0.02)
        raise AssertionError("the engine process did not exit")

    async def stop_all(self) -> None:
        await asyncio.gather(*(self.engine.stop(h, grace_s=0.5) for h in self.handles))


@pytest.fixture
async def sims(tmp_path: Path) -> AsyncIterator[Replicas]:
    replicas = Replicas(tmp_path)
    try:
        yield replicas
    finally:
        await replicas.stop_all()


def bookings(state_dir: Path) -> dict[str, Any]:
    return {
        str(p.relative_to(state_dir / "simgpu")): json.loads(p.read_text())
        for p in sorted((state_dir / "simgpu").glob("*/*.json"))
    }


async def test_a_replica_becomes_ready_and_streams_deterministic_text(sims: Replicas) -> None:
    handle = await sims.ready()
    text, done = await sims.text(handle, request(seed=7))
    again, _ = await sims.text(handle, request(seed=7))
    other, _ = await sims.text(handle, request(seed=8))
    assert len(text.split()) == 12
    assert again == text
    assert other != text
    assert (done.tokens_out, done.finish_reason) == (12, "length")
    assert done.timings["predicted_n"] == 12


async def test_the_same_seed_and_prompt_give_the_same_text_on_another_replica(
    sims: Replicas,
) -> None:
    one, two = await asyncio.gather(sims.ready(replica_id="a"), sims.ready(replica_id="b"))
    text_one, _ = await sims.text(one, request(seed=3))
    text_two, _ = await sims.text(two, request(seed=3))
    other_prompt, _ = await sims.text(two, request("another prompt", seed=3))
    assert text_one == text_two
    assert other_prompt != text_one


async def test_a_non_streamed_completion_gives_the_streamed_text(sims: Replicas) -> None:
    handle = await sims.ready()
    streamed, _ = await sims.text(handle, request(seed=11))
    completion = await llama_server.Client(handle.base_url).complete(request(seed=11))
    assert completion.text == streamed
    assert completion.done.tokens_out == 12


async def test_describe_reports_the_sim_build_slots_and_booked_vram(sims: Replicas) -> None:
    handle = await sims.ready(slots=3)
    info = await sims.engine.describe(handle)
    assert info.engine_version == sim_protocol.BUILD_INFO
    assert (info.slots_total, info.slots_busy) == (3, 0)
    assert info.model_digest == handle.spec.model_digest
    assert info.vram_measured_mib == sims.engine.estimate_vram_mib(handle.spec)


async def test_a_loading_replica_answers_loading_until_load_s_has_passed(sims: Replicas) -> None:
    began = time.monotonic()
    handle = await sims.start(load_s=0.6)
    seen: list[llama_server.Health] = []
    client = llama_server.Client(handle.base_url)
    while not seen or seen[-1].status is None:
        seen.append(await client.health())
        await asyncio.sleep(0.02)
    await sims.engine.wait_ready(handle, timeout_s=5)
    assert seen[-1] == llama_server.Health(False, 503, "Loading model")
    assert time.monotonic() - began >= 0.6


async def test_requests_beyond_the_slots_wait_for_a_free_slot(sims: Replicas) -> None:
    handle = await sims.ready(slots=1, tokens_per_s=100)
    events: list[tuple[str, str]] = []

    async def run(name: str) -> None:
        async for item in sims.engine.generate(handle, request(max_tokens=8)):
            events.append((name, "token" if isinstance(item, interfaces.Token) else "done"))

    await asyncio.gather(run("first"), run("second"))
    first_done = events.index(("first", "done"))
    second_start = events.index(("second", "token"))
    assert first_done < second_start


async def test_closing_a_stream_stops_its_tokens_and_frees_the_slot(sims: Replicas) -> None:
    handle = await sims.ready(slots=1, tokens_per_s=20)
    stream = sims.engine.generate(handle, request(max_tokens=400))
    await anext(stream)
    await anext(stream)
    info = await sims.engine.describe(handle)
    assert info.slots_busy == 1
    await stream.aclose()  # type: ignore[attr-defined]
    for _ in range(50):
        if (await sims.engine.describe(handle)).slots_busy == 0:
            break
        await asyncio.sleep(0.02)
    assert (await sims.engine.describe(handle)).slots_busy == 0
    # the only slot is free: a new request runs now instead of waiting 20 s for the first
    _, done = await asyncio.wait_for(sims.text(handle, request(max_tokens=3)), 2.0)
    assert done.tokens_out == 3


async def test_crash_at_start_fails_the_start_with_the_exit_reason(sims: Replicas) -> None:
    handle = await sims.start(faults={"crash_at_start": True})
    with pytest.raises(interfaces.EngineStartError) as caught:
        await sims.engine.wait_ready(handle, timeout_s=10)
    assert caught.value.exit is not None
    assert caught.value.exit.code == 1
    assert caught.value.exit.reason.startswith("exit code 1")
    assert "crash_at_start" in caught.value.reason


async def test_hang_before_ready_times_out_and_stop_ends_it(sims: Replicas) -> None:
    handle = await sims.start(faults={"hang_before_ready": True})
    with pytest.raises(interfaces.EngineStartError, match=r"not ready after 0\.5 s") as caught:
        await sims.engine.wait_ready(handle, timeout_s=0.5)
    assert "Loading model" in caught.value.reason
    assert caught.value.exit is None
    ended = await sims.engine.stop(handle, grace_s=2)
    assert ended.code == 0
    assert bookings(sims.state_dir) == {}


async def test_die_after_tokens_breaks_the_stream_after_exactly_that_many_tokens(
    sims: Replicas,
) -> None:
    handle = await sims.ready(faults={"die_after_tokens": 3})
    got: list[interfaces.Token | interfaces.Done] = []
    with pytest.raises(interfaces.EngineStreamError):
        async for item in sims.engine.generate(handle, request(max_tokens=10)):
            got.append(item)
    assert [type(item) for item in got] == [interfaces.Token] * 3
    ended = await sims.exited(handle)
    assert ended.code == 134
    assert "die_after_tokens" in ended.reason
    assert bookings(sims.state_dir) == {}  # the observer must not count a dead engine


async def test_oom_at_load_fails_the_start_with_an_out_of_memory_reason(sims: Replicas) -> None:
    handle = await sims.start(faults={"oom_at_load": True})
    with pytest.raises(interfaces.EngineStartError) as caught:
        await sims.engine.wait_ready(handle, timeout_s=10)
    assert caught.value.exit is not None
    assert caught.value.exit.oom
    assert "out of memory" in caught.value.reason
    assert caught.value.exit.code == 1


async def test_a_replica_that_does_not_fit_beside_the_booked_ones_fails_with_oom(
    sims: Replicas,
) -> None:
    footprint = sims.engine.estimate_vram_mib(sims.spec())
    room = {"vram_total_mib": {"0": footprint + footprint // 2}}
    first = await sims.ready(replica_id="a", **room)
    second = await sims.start(replica_id="b", **room)
    with pytest.raises(interfaces.EngineStartError) as caught:
        await sims.engine.wait_ready(second, timeout_s=10)
    assert caught.value.exit is not None and caught.value.exit.oom
    await sims.engine.stop(first, grace_s=2)
    third = await sims.ready(replica_id="c", **room)  # the first one's VRAM is free again
    assert list(bookings(sims.state_dir)) == [f"0/{third.pid}.json"]


async def test_a_booking_left_by_a_dead_or_zombie_process_takes_no_room_from_a_replica(
    sims: Replicas, zombie_pid: int
) -> None:
    footprint = sims.engine.estimate_vram_mib(sims.spec())
    finished = subprocess.Popen([sys.executable, "-S", "-c", ""])
    finished.wait()
    for pid in (zombie_pid, finished.pid):  # each alone would leave too little room
        sim_bookings.write(sims.state_dir, 0, pid=pid, used_mib=footprint, replica_id="old")
    handle = await sims.ready(vram_total_mib={"0": footprint + footprint // 2})
    assert bookings(sims.state_dir)[f"0/{handle.pid}.json"]["used_mib"] == footprint


async def test_a_booking_appears_once_ready_split_over_the_mask_and_vanishes_after_stop(
    sims: Replicas,
) -> None:
    handle = await sims.ready(devices=(0, 1), ctx=512, slots=2, model_size_mib=100)
    footprint = 100 + 512 * 2 // 16 + sim_bookings.OVERHEAD_MIB
    assert sims.engine.estimate_vram_mib(handle.spec) == footprint
    half = {"pid": handle.pid, "used_mib": footprint // 2, "replica_id": "chat-0"}
    assert bookings(sims.state_dir) == {f"0/{handle.pid}.json": half, f"1/{handle.pid}.json": half}
    ended = await sims.engine.stop(handle, grace_s=2)
    assert (ended.code, ended.signal) == (0, None)
    assert bookings(sims.state_dir) == {}
    assert not processes.pid_alive(handle.pid, handle.started_at)


async def test_a_replica_ignoring_sigterm_is_killed_after_the_grace_period(sims: Replicas) -> None:
    handle = await sims.ready(faults={"ignore_sigterm": True})
    began = time.monotonic()
    ended = await sims.engine.stop(handle, grace_s=0.3)
    elapsed = time.monotonic() - began
    assert ended.signal == signal.SIGKILL
    assert ended.reason == "killed by SIGKILL"
    assert 0.3 <= elapsed < 2.0
    assert not processes.pid_alive(handle.pid, handle.started_at)
    assert bookings(sims.state_dir) == {}


async def test_stopping_twice_reports_the_same_exit(sims: Replicas) -> None:
    handle = await sims.ready()
    assert await sims.engine.stop(handle, grace_s=1) == await sims.engine.stop(handle, grace_s=1)


async def test_adopting_a_live_healthy_replica_gives_a_working_handle(sims: Replicas) -> None:
    original = await sims.ready()
    record = json.loads(json.dumps(processes.record(original)))  # as the daemon stores it
    adopted = await sims.engine.adopt(record, original.spec)
    assert adopted is not None
    assert (adopted.pid, adopted.port, adopted.process) == (original.pid, original.port, None)
    assert sims.engine.poll_exit(adopted) is None
    text, _ = await sims.text(adopted, request(seed=5))
    assert text == (await sims.text(original, request(seed=5)))[0]
    ended = await sims.engine.stop(adopted, grace_s=2)
    assert "adopted" in ended.reason
    assert not processes.pid_alive(original.pid, original.started_at)


async def test_adopting_a_record_with_another_start_time_leaves_that_process_alone(
    sims: Replicas,
) -> None:
    handle = await sims.ready()
    record = processes.record(handle) | {"started_at": handle.started_at + 100}
    assert await sims.engine.adopt(record, handle.spec) is None
    assert processes.pid_alive(handle.pid, handle.started_at)
    assert (await llama_server.Client(handle.base_url).health()).ok


async def test_adopting_a_dead_or_unreadable_record_returns_none(sims: Replicas) -> None:
    handle = await sims.start(faults={"crash_at_start": True})
    await sims.exited(handle)
    assert await sims.engine.adopt(processes.record(handle), handle.spec) is None
    assert await sims.engine.adopt({"pid": "x"}, handle.spec) is None
    assert await sims.engine.adopt({}, handle.spec) is None


async def test_adopting_a_replica_that_is_not_healthy_stops_it(sims: Replicas) -> None:
    handle = await sims.start(faults={"hang_before_ready": True})
    client = llama_server.Client(handle.base_url)
    while (await client.health()).status is None:  # listening, never ready
        await asyncio.sleep(0.02)
    assert await sims.engine.adopt(processes.record(handle), handle.spec) is None
    assert (await sims.exited(handle)).code == 0


async def test_eight_replicas_start_together_and_are_ready_within_seconds(sims: Replicas) -> None:
    began = time.monotonic()
    handles = await asyncio.gather(*(sims.ready(replica_id=f"r{i}") for i in range(8)))
    assert time.monotonic() - began < 8.0
    assert len({h.port for h in handles}) == 8


async def test_a_spec_with_invalid_sim_options_is_refused_before_spawning(sims: Replicas) -> None:
    with pytest.raises(interfaces.EngineStartError, match="tokens_per_s"):
        await sims.start(tokens_per_s=-1)
    assert sims.handles == []


def test_the_child_program_imports_neither_aiohttp_nor_pydantic() -> None:
    code = (
        "import sys, plugins.sim_server; "
        "print(sorted(m for m in sys.modules if m.split('.')[0] in "
        "('aiohttp', 'pydantic', 'yaml', 'state')))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        check=True,
        cwd=Path(__file__).resolve().parents[1],
    )
    assert out.stdout.strip() == "[]"


def test_the_plugin_registers_the_sim_engine() -> None:
    manager = pluggy.PluginManager(hookspecs.PROJECT)
    manager.add_hookspecs(hookspecs)
    manager.register(engine_sim.plugin)
    registered: dict[str, Any] = {}
    manager.hook.orch_register_engines(register=registered.__setitem__)
    assert isinstance(registered["sim"], engine_sim.SimEngine)
    assert registered["sim"].name == "sim"


def test_the_estimate_is_weights_plus_kv_for_every_slot_plus_overhead(tmp_path: Path) -> None:
    engine = engine_sim.SimEngine()
    spec = make_spec(tmp_path, ctx=4096, slots=4, model_size_mib=400)
    assert engine.estimate_vram_mib(spec) == 400 + 4096 * 4 // 16 + 700
    assert engine.estimate_vram_mib(replace(spec, slots=8)) > engine.estimate_vram_mib(spec)


async def test_the_first_request_pays_first_request_extra_ms_once(sims: Replicas) -> None:
    handle = await sims.ready(first_request_extra_ms=400, first_token_ms=5)

    async def first_token_s() -> float:
        began = time.monotonic()
        stream = sims.engine.generate(handle, request(max_tokens=2))
        await anext(stream)
        taken = time.monotonic() - began
        async for _ in stream:
            pass
        return taken

    assert await first_token_s() >= 0.4  # the cold start the daemon's warm-up absorbs
    assert await first_token_s() < 0.2


async def test_kept_connections_serve_stream_after_stream_and_a_cut_stream_still_stops(
    sims: Replicas, monkeypatch: pytest.MonkeyPatch
) -> None:
    """While a daemon keeps connections (`keep_connections`), streams that end cleanly reuse
    one connection; a stream closed early still drops its own, so the engine stops it and
    frees the slot; `close` leaves nothing open."""
    import aiohttp

    connects: list[str] = []
    real_connect = aiohttp.TCPConnector._create_connection

    async def counted(self: Any, req: Any, *args: Any) -> Any:
        connects.append(req.url.path)
        return await real_connect(self, req, *args)

    monkeypatch.setattr(aiohttp.TCPConnector, "_create_connection", counted)
    handle = await sims.ready(slots=1, tokens_per_s=400)
    sims.engine.keep_connections()
    try:
        texts = [(await sims.text(handle, request(seed=s, max_tokens=4)))[0] for s in range(5)]
        assert len(set(texts)) == 5
        assert connects.count("/completion") == 1
        stream = sims.engine.generate(handle, request(max_tokens=4000))
        await anext(stream)
        await stream.aclose()  # type: ignore[attr-defined]
        # the only slot is free again at once, and the next stream needs a new connection
        _, done = await asyncio.wait_for(sims.text(handle, request(max_tokens=3)), 2.0)
        assert done.tokens_out == 3 and connects.count("/completion") == 2
    finally:
        await sims.engine.close()
    assert sims.engine.pool is None
