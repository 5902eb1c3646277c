"""Planning: starts and drains that bring the replicas to the desired pools (pure)."""

from __future__ import annotations

import dataclasses
import os
import random
from collections.abc import Sequence

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from reconciler import planning, specs
from reconciler.planning import Drain, GpuRoom, Plan, PoolWant, Reclaim, ReplicaSeen, Start
from state import desired, ids

RESERVE = 512
PAIR = (GpuRoom(0, 24576, 24576), GpuRoom(1, 12288, 12288))  # the reference workstation


def pool(
    pool_id: str,
    replicas: int = 1,
    vram: int = 4000,
    devices: tuple[int, ...] | None = None,
    spec: str = "h1",
) -> PoolWant:
    return PoolWant(ids.PoolId(pool_id), replicas, devices, vram, spec)


def seen(
    replica_id: str,
    state: planning.ReplicaState = "Ready",
    devices: tuple[int, ...] = (0,),
    vram: int = 4000,
    spec: str = "h1",
) -> ReplicaSeen:
    pool_id = replica_id.rsplit("-", 1)[0]
    return ReplicaSeen(ids.ReplicaId(replica_id), ids.PoolId(pool_id), spec, devices, state, vram)


def start(replica_id: str, devices: tuple[int, ...], vram: int = 4000, spec: str = "h1") -> Start:
    pool_id = replica_id.rsplit("-", 1)[0]
    return Start(ids.ReplicaId(replica_id), ids.PoolId(pool_id), devices, spec, vram)


def drain(replica_id: str, reason: str) -> Drain:
    pool_id = replica_id.rsplit("-", 1)[0]
    return Drain(ids.ReplicaId(replica_id), ids.PoolId(pool_id), reason)


def run(
    pools: Sequence[PoolWant],
    replicas: Sequence[ReplicaSeen] = (),
    gpus: Sequence[GpuRoom] = PAIR,
    reserve: int = RESERVE,
) -> Plan:
    return planning.plan(pools, replicas, gpus, reserve_mib=reserve)


def apply(
    result: Plan, replicas: Sequence[ReplicaSeen], gpus: Sequence[GpuRoom]
) -> tuple[list[ReplicaSeen], list[GpuRoom]]:
    """What the daemon does with a plan: a Start becomes a Starting replica whose memory is
    booked; a Drain makes its replica Draining, still holding its memory."""
    drained = {d.replica_id for d in result.drains}
    after = [
        dataclasses.replace(r, state="Draining") if r.replica_id in drained else r for r in replicas
    ]
    free = {g.index: g.free_mib for g in gpus}
    for s in result.starts:
        after.append(
            ReplicaSeen(s.replica_id, s.pool_id, s.spec_hash, s.devices, "Starting", s.vram_mib)
        )
        for index in s.devices:
            free[index] -= planning.share_mib(s.vram_mib, len(s.devices))
    return after, [dataclasses.replace(g, free_mib=free[g.index]) for g in gpus]


# -- convergence and scaling ------------------------------------------------------------------


def test_from_nothing_every_pool_gets_its_replicas_and_a_second_pass_does_nothing() -> None:
    pools = [pool("chat", replicas=2, vram=6000), pool("embed", vram=1000)]

    first = run(pools)

    assert first.actions == (
        start("chat-0", (0,), 6000),
        start("chat-1", (0,), 6000),
        start("embed-0", (0,), 1000),
    )
    assert first.unschedulable == () and first.waiting == ()
    replicas, gpus = apply(first, [], PAIR)
    assert run(pools, replicas, gpus) == Plan((), (), ())


def test_scaling_up_adds_replicas_with_the_smallest_free_numbers() -> None:
    replicas = [seen("chat-0"), seen("chat-2")]

    result = run([pool("chat", replicas=4)], replicas)

    assert [a.replica_id for a in result.actions] == ["chat-1", "chat-3"]


def test_scaling_down_drains_replicas_that_serve_nothing_first_then_the_highest_number() -> None:
    replicas = [
        seen("chat-0"),
        seen("chat-1", "Starting"),
        seen("chat-2"),
        seen("chat-3"),
        seen("chat-4", "BackingOff"),
        seen("chat-5", "Failed"),
    ]

    result = run([pool("chat", replicas=2)], replicas)

    assert set(result.actions) == {
        drain("chat-5", "scaled down"),
        drain("chat-4", "scaled down"),
        drain("chat-1", "scaled down"),
        drain("chat-3", "scaled down"),
    }
    assert [a.replica_id for a in result.actions] == ["chat-1", "chat-3", "chat-4", "chat-5"]


def test_scaling_down_drains_the_idle_replicas_before_a_busy_one() -> None:
    """chat-2 runs a task, chat-0 and chat-1 are idle: going from 3 to 2 replicas drains an
    idle one, not the highest number, whose task the drain would cut short."""
    replicas = [
        seen("chat-0"),
        dataclasses.replace(seen("chat-1"), busy_slots=1),
        dataclasses.replace(seen("chat-2"), busy_slots=2),
    ]

    assert run([pool("chat", replicas=2)], replicas).actions == (drain("chat-0", "scaled down"),)
    assert run([pool("chat", replicas=1)], replicas).actions == (
        drain("chat-0", "scaled down"),
        drain("chat-1", "scaled down"),
    )


def test_scaling_to_zero_drains_every_replica() -> None:
    result = run([pool("chat", replicas=0)], [seen("chat-0"), seen("chat-1")])

    assert result.actions == (drain("chat-0", "scaled down"), drain("chat-1", "scaled down"))


def test_a_removed_pool_is_drained_and_the_others_are_left_alone() -> None:
    result = run([pool("chat")], [seen("chat-0"), seen("old-0"), seen("old-1", "Failed")])

    assert result.actions == (drain("old-0", "pool removed"), drain("old-1", "pool removed"))


def test_failed_and_backing_off_replicas_count_as_existing() -> None:
    replicas = [seen("chat-0", "Failed"), seen("chat-1", "BackingOff")]

    assert run([pool("chat", replicas=2)], replicas).actions == ()


def test_a_draining_replica_is_neither_drained_again_nor_counted_and_keeps_its_number() -> None:
    result = run([pool("chat")], [seen("chat-0", "Draining")])

    assert result.actions == (start("chat-1", (0,)),)
    assert run([], [seen("chat-0", "Draining")]).actions == ()


def _reclaimable(replica_id: str, spec: str = "h1", vram: int = 4000) -> ReplicaSeen:
    return dataclasses.replace(seen(replica_id, "Draining", vram=vram, spec=spec), reclaimable=True)


def test_a_draining_replica_whose_spec_is_wanted_again_serves_again_instead_of_a_start() -> None:
    """An edit undone (a failed reload put back, a file saved in steps) while the old
    replica still drains: it is reclaimed, and nothing new is started or waited for."""
    result = run([pool("chat", spec="old")], [_reclaimable("chat-0", spec="old")])

    assert result.actions == (Reclaim(ids.ReplicaId("chat-0"), ids.PoolId("chat")),)
    assert result.waiting == () and result.unschedulable == ()


def test_a_draining_replica_is_not_reclaimed_for_another_spec_or_when_not_reclaimable() -> None:
    other = run([pool("chat", spec="new")], [_reclaimable("chat-0", spec="old")])
    assert other.reclaims == () and [a.replica_id for a in other.starts] == ["chat-1"]

    stopping = run([pool("chat")], [seen("chat-0", "Draining")])
    assert stopping.reclaims == () and [a.replica_id for a in stopping.starts] == ["chat-1"]

    removed = run([], [_reclaimable("chat-0")])
    assert removed.actions == ()


def test_only_as_many_draining_replicas_are_reclaimed_as_the_pool_lacks() -> None:
    replicas = [seen("chat-0"), _reclaimable("chat-1"), _reclaimable("chat-2")]

    result = run([pool("chat", replicas=2)], replicas)

    assert result.actions == (Reclaim(ids.ReplicaId("chat-1"), ids.PoolId("chat")),)
    assert run([pool("chat", replicas=1)], replicas).actions == ()


def test_a_reclaimed_replica_takes_the_place_of_a_crashed_one_which_is_drained() -> None:
    replicas = [seen("chat-0", "BackingOff"), _reclaimable("chat-1")]

    result = run([pool("chat")], replicas)

    assert result.actions == (
        drain("chat-0", "scaled down"),
        Reclaim(ids.ReplicaId("chat-1"), ids.PoolId("chat")),
    )


def test_memory_a_reclaimed_replica_keeps_is_not_promised_to_a_waiting_start() -> None:
    """chat-0 (20 GB on GPU 0) is reclaimed; big (another pool, 20 GB) would have waited
    for that memory: now it cannot ever fit there."""
    gpus = (GpuRoom(0, 24576, 4576),)
    replicas = [_reclaimable("chat-0", vram=20000)]
    wants = [pool("chat", vram=20000), pool("big", vram=20000)]
    assert run(wants[1:], replicas, gpus).waiting == ("big",)  # chat-0 drained for good

    result = run(wants, replicas, gpus)

    assert result.reclaims == (Reclaim(ids.ReplicaId("chat-0"), ids.PoolId("chat")),)
    assert result.waiting == () and [u.pool_id for u in result.unschedulable] == ["big"]


# -- changed specs ------------------------------------------------------------------------------


def test_a_changed_spec_drains_and_replaces_only_that_pool() -> None:
    replicas = [seen("chat-0", spec="old"), seen("chat-1", spec="old"), seen("embed-0")]

    result = run([pool("chat", replicas=2, spec="new"), pool("embed")], replicas)

    assert result.actions == (
        drain("chat-0", "spec changed"),
        drain("chat-1", "spec changed"),
        start("chat-2", (0,), spec="new"),
        start("chat-3", (0,), spec="new"),
    )


def test_a_replacement_that_fits_only_after_the_drain_waits_instead_of_failing() -> None:
    gpus = [GpuRoom(0, 24576, 24576 - 20000)]
    old = seen("big-0", vram=20000, spec="old")
    pools = [pool("big", vram=20000, spec="new")]

    first = run(pools, [old], gpus)

    assert first.actions == (drain("big-0", "spec changed"),)
    assert first.waiting == ("big",) and first.unschedulable == ()
    replicas, gpus = apply(first, [old], gpus)
    second = run(pools, replicas, gpus)
    assert second == Plan((), (), (ids.PoolId("big"),))  # still waiting, nothing new to do
    after_exit = run(pools, [], [GpuRoom(0, 24576, 24576)])  # the old process has ended
    assert after_exit.actions == (start("big-0", (0,), 20000, spec="new"),)


def test_memory_a_failed_replica_does_not_hold_is_not_waited_for() -> None:
    gpus = [GpuRoom(0, 24576, 4000)]  # something else uses the GPU
    result = run(
        [pool("big", vram=20000, spec="new")],
        [seen("big-0", "Failed", vram=20000, spec="old")],
        gpus,
    )

    assert result.actions == (drain("big-0", "spec changed"),)
    assert result.waiting == () and [u.pool_id for u in result.unschedulable] == ["big"]


# -- placement ----------------------------------------------------------------------------------


def test_the_bigger_model_goes_where_it_fits_on_a_24_and_12_gb_pair() -> None:
    pools = [pool("small", vram=8192), pool("big", vram=20480)]  # small listed first

    result = run(pools)

    assert set(result.actions) == {start("big-0", (0,), 20480), start("small-0", (1,), 8192)}
    assert result.unschedulable == ()


def test_auto_placement_picks_the_gpu_with_most_free_memory_after_earlier_starts() -> None:
    result = run([pool("chat", replicas=3, vram=8000)])

    assert [a.devices for a in result.starts] == [(0,), (0,), (1,)]


def test_auto_placement_breaks_ties_by_the_lower_index() -> None:
    gpus = [GpuRoom(1, 12288, 12288), GpuRoom(0, 12288, 12288)]

    assert run([pool("chat")], gpus=gpus).starts[0].devices == (0,)


def test_the_reserve_is_kept_free_on_every_gpu() -> None:
    gpus = [GpuRoom(0, 8192, 8192)]

    assert run([pool("chat", vram=8192 - 512)], gpus=gpus).starts
    fails = run([pool("chat", vram=8192 - 511)], gpus=gpus)
    assert fails.starts == () and fails.unschedulable[0].best_free_mib == 7680


def test_a_model_that_fits_nowhere_is_unschedulable_with_the_numbers() -> None:
    gpus = [GpuRoom(0, 24576, 4096), GpuRoom(1, 12288, 12288)]

    result = run([pool("big", replicas=2, vram=20480)], gpus=gpus)

    assert result.actions == () and result.waiting == ()
    (u,) = result.unschedulable
    assert (u.pool_id, u.needed_mib, u.best_free_mib, u.best_gpu, u.missing) == (
        "big",
        20480,
        11776,
        1,
        2,
    )
    assert u.message.startswith(
        "needs 20480 MiB; the GPU with the most room, GPU 1, has 11776 MiB free after the "
        "512 MiB reserve (other GPUs: GPU 0 3584 MiB)"
    )
    assert u.message.endswith("; 2 of 2 replicas not placed")


def test_a_pool_that_places_some_replicas_reports_only_the_rest() -> None:
    result = run([pool("chat", replicas=3, vram=16000)])

    assert [s.devices for s in result.starts] == [(0,)]
    (u,) = result.unschedulable
    assert u.missing == 2 and u.best_gpu == 1
    assert u.message.endswith("; 2 of 3 replicas not placed (the other takes GPU 0)")


def test_without_any_gpu_a_pool_is_unschedulable() -> None:
    (u,) = run([pool("chat")], gpus=[]).unschedulable

    assert u.best_gpu is None and u.message == "needs 4000 MiB, but no GPU is visible"


def test_an_explicit_device_list_is_honoured_with_the_footprint_split() -> None:
    result = run([pool("wide", vram=16001, devices=(1, 0))])

    assert result.actions == (start("wide-0", (1, 0), 16001),)
    _, gpus = apply(result, [], PAIR)
    assert [g.free_mib for g in gpus] == [24576 - 8001, 12288 - 8001]


def test_an_explicit_device_list_without_room_on_one_gpu_is_unschedulable() -> None:
    result = run(
        [pool("wide", vram=24000, devices=(0, 1))],
        gpus=[GpuRoom(0, 24576, 24576), GpuRoom(1, 12288, 9000)],
    )

    (u,) = result.unschedulable
    assert (u.needed_mib, u.best_gpu, u.best_free_mib) == (12000, 1, 8488)
    assert u.message == (
        "needs 12000 MiB on each of GPUs 0, 1; GPU 1 has 8488 MiB free after the 512 MiB reserve"
    )


def test_a_single_pinned_gpu_without_room_says_so() -> None:
    (u,) = run([pool("chat", vram=20000, devices=(1,))]).unschedulable

    assert (
        u.message == "needs 20000 MiB on GPU 1, which has 11776 MiB free after the 512 MiB reserve"
    )
    assert u.fits_on == (0,)  # the 24 GB card would hold it: the reason says so


def test_a_pin_whose_fix_is_another_gpu_says_so_before_the_knobs() -> None:
    (u,) = run([pool("chat", vram=15200, devices=(1,))]).unschedulable
    spec = desired.PoolSpec.model_validate(
        {"id": "chat", "engine": "sim", "model": "m", "devices": [1], "ctx": 4096, "slots": 2}
    )
    hint = specs.fit_hint(spec, u)
    assert hint.startswith(
        "GPU 0 has room for a replica: set devices: auto (or [0]), or, to fit where it is "
        "pinned: lower ctx (4096) or slots (2)"
    ), hint
    (nowhere,) = run([pool("chat", vram=30000, devices=(1,))]).unschedulable
    assert nowhere.fits_on == () and specs.fit_hint(spec, nowhere).startswith("To fit: lower")
    # the KV cache's type is a llama-server flag: offered for a llamacpp pool only
    assert "-ctk" not in hint
    llama = spec.model_copy(update={"engine": "llamacpp"})
    assert "quantize the KV cache (flags: [-ctk, q8_0, -ctv, q8_0])" in specs.fit_hint(llama, u)


def test_a_listed_gpu_that_does_not_exist_is_unschedulable() -> None:
    (u,) = run([pool("chat", devices=(0, 3))]).unschedulable

    assert u.best_gpu == 3
    assert u.message == "devices lists GPU 3, which does not exist (GPUs present: 0, 1)"


def test_pinned_pools_are_placed_before_auto_ones() -> None:
    pools = [pool("auto", vram=12000), pool("pinned", vram=12000, devices=(0,))]

    result = run(pools)

    assert set(result.starts) == {start("pinned-0", (0,), 12000), start("auto-0", (0,), 12000)}
    assert result.starts[0].pool_id == "pinned"


def test_bad_input_is_refused() -> None:
    with pytest.raises(ValueError, match="pool id given more than once: chat"):
        run([pool("chat"), pool("chat")])
    with pytest.raises(ValueError, match="unknown state"):
        seen("chat-0", "Stopped")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="devices"):
        pool("chat", devices=())


# -- properties ---------------------------------------------------------------------------------

STATES: tuple[planning.ReplicaState, ...] = planning.REPLICA_STATES
POOL_IDS = ("p0", "p1", "p2", "p3")
EXAMPLES = int(os.environ.get("PLANNING_EXAMPLES", "100"))


@st.composite
def worlds(draw: st.DrawFn) -> tuple[list[PoolWant], list[ReplicaSeen], list[GpuRoom], int]:
    n_gpus = draw(st.integers(0, 3))
    gpus = []
    for i in range(n_gpus):
        total = draw(st.sampled_from([8192, 12288, 24576]))
        gpus.append(GpuRoom(i, total, draw(st.integers(0, total))))
    desired = draw(st.lists(st.sampled_from(POOL_IDS[:3]), unique=True, max_size=3))
    pools = []
    for pool_id in desired:
        devices = draw(
            st.none() | st.lists(st.integers(0, 3), min_size=1, max_size=3, unique=True).map(tuple)
        )
        pools.append(
            PoolWant(
                ids.PoolId(pool_id),
                draw(st.integers(0, 4)),
                devices,
                draw(st.integers(0, 26000)),
                draw(st.sampled_from(["a", "b"])),
            )
        )
    keys = draw(
        st.lists(st.tuples(st.sampled_from(POOL_IDS), st.integers(0, 5)), unique=True, max_size=8)
    )
    replicas = []
    for pool_id, n in keys:
        devices = tuple(
            draw(st.lists(st.integers(0, max(n_gpus - 1, 0)), min_size=1, max_size=2, unique=True))
        )
        replicas.append(
            ReplicaSeen(
                ids.ReplicaId(f"{pool_id}-{n}"),
                ids.PoolId(pool_id),
                draw(st.sampled_from(["a", "b"])),
                devices,
                draw(st.sampled_from(STATES)),
                draw(st.integers(0, 12000)),
            )
        )
    return pools, replicas, gpus, draw(st.sampled_from([0, 512, 2048]))


World = tuple[list[PoolWant], list[ReplicaSeen], list[GpuRoom], int]


@settings(max_examples=EXAMPLES, deadline=None)
@given(worlds())
def test_no_gpu_is_promised_more_than_it_has_free_beyond_the_reserve(world: World) -> None:
    pools, replicas, gpus, reserve = world
    result = run(pools, replicas, gpus, reserve)

    for gpu in gpus:
        promised = sum(
            planning.share_mib(s.vram_mib, len(s.devices))
            for s in result.starts
            if gpu.index in s.devices
        )
        assert promised == 0 or promised <= gpu.free_mib - reserve


@settings(max_examples=EXAMPLES, deadline=None)
@given(worlds())
def test_starts_go_exactly_where_a_pool_pins_them_and_auto_ones_on_one_real_gpu(
    world: World,
) -> None:
    pools, replicas, gpus, reserve = world
    wants = {p.pool_id: p for p in pools}
    result = run(pools, replicas, gpus, reserve)

    for s in result.starts:
        want = wants[s.pool_id]
        assert s.spec_hash == want.spec_hash and s.vram_mib == want.vram_mib
        if want.devices is not None:
            assert s.devices == want.devices
        else:
            assert len(s.devices) == 1 and s.devices[0] in {g.index for g in gpus}


@settings(max_examples=EXAMPLES, deadline=None)
@given(worlds())
def test_replicas_that_match_their_pool_are_untouched_unless_surplus(world: World) -> None:
    pools, replicas, gpus, reserve = world
    wants = {p.pool_id: p for p in pools}
    result = run(pools, replicas, gpus, reserve)
    named = {a.replica_id for a in result.actions}

    assert not named & {r.replica_id for r in replicas if r.state == "Draining"}
    for want in pools:
        matching = [
            r
            for r in replicas
            if r.pool_id == want.pool_id and r.spec_hash == want.spec_hash and r.state != "Draining"
        ]
        drained = [r for r in matching if r.replica_id in named]
        assert len(drained) == max(0, len(matching) - want.replicas)
        assert all(
            d.reason == "scaled down"
            for d in result.drains
            if d.replica_id in {r.replica_id for r in drained}
        )
    hashes = {r.replica_id: r.spec_hash for r in replicas}
    for d in result.drains:
        pool_wanted = wants.get(d.pool_id)
        if pool_wanted is None:
            assert d.reason == "pool removed"
        elif hashes[d.replica_id] != pool_wanted.spec_hash:
            assert d.reason == "spec changed"
        else:
            assert d.reason == "scaled down"


@settings(max_examples=EXAMPLES, deadline=None)
@given(worlds())
def test_planning_again_after_applying_a_plan_does_nothing(world: World) -> None:
    pools, replicas, gpus, reserve = world
    first = run(pools, replicas, gpus, reserve)
    after, rooms = apply(first, replicas, gpus)

    second = run(pools, after, rooms, reserve)

    assert second.actions == ()
    for want in pools:
        serving = [
            r
            for r in after
            if r.pool_id == want.pool_id and r.spec_hash == want.spec_hash and r.state != "Draining"
        ]
        blocked = want.pool_id in second.waiting or any(
            u.pool_id == want.pool_id for u in second.unschedulable
        )
        assert len(serving) == want.replicas or (blocked and len(serving) < want.replicas)


@settings(max_examples=EXAMPLES, deadline=None)
@given(worlds(), st.randoms(use_true_random=False))
def test_the_plan_does_not_depend_on_input_order(world: World, rnd: random.Random) -> None:
    pools, replicas, gpus, reserve = world
    pools2, replicas2, gpus2 = list(pools), list(replicas), list(gpus)
    rnd.shuffle(pools2)
    rnd.shuffle(replicas2)
    rnd.shuffle(gpus2)

    assert run(pools2, replicas2, gpus2, reserve) == run(pools, replicas, gpus, reserve)


def test_a_replica_moved_where_it_cannot_go_keeps_serving_where_it_is() -> None:
    """orch.yaml pins a pool to a GPU too small for it: the working replica is not drained
    for a placement that cannot be met; the pool is Unschedulable, naming the kept one."""
    big = dataclasses.replace(pool("a", vram=15000, devices=(1,), spec="h2"), service_key="k")
    there = dataclasses.replace(seen("a-0", vram=15000, spec="h1"), service_key="k")
    gpus = (GpuRoom(0, 24576, 24576 - 15000), GpuRoom(1, 12288, 12288))
    result = run([big], [there], gpus)
    assert result.actions == ()
    [stuck] = result.unschedulable
    assert stuck.pool_id == "a" and stuck.kept == ("a-0",)
    # it fits there: moved as before (drained, replaced)
    fits = dataclasses.replace(big, vram_mib=8000)
    moved = run([fits], [dataclasses.replace(there, vram_mib=8000)], PAIR)
    assert moved.actions == (
        drain("a-0", planning.SPEC_CHANGED),
        start("a-1", (1,), vram=8000, spec="h2"),
    )
    # what it serves changed too (another ctx, model …): never kept
    other = dataclasses.replace(big, service_key="k2")
    changed = run([other], [there], gpus)
    assert changed.actions == (drain("a-0", planning.SPEC_CHANGED),)
    assert changed.unschedulable[0].kept == ()
    # neither is a replica that serves nothing
    failed = run([big], [dataclasses.replace(there, state="Failed")], gpus)
    assert failed.actions == (drain("a-0", planning.SPEC_CHANGED),)
