"""Placement: which replica a task runs on, and what the dispatcher is told when none fits."""

from __future__ import annotations

import dataclasses
import random

import pytest
from hypothesis import given
from hypothesis import strategies as st

from reconciler import placement
from state import ids, tasks
from state.errors import ErrorCode


def cand(
    replica: str,
    pool: str,
    model: str = "m",
    *,
    state: str = "Ready",
    total: int = 1,
    busy: int = 0,
    free: int = 1000,
) -> placement.Candidate:
    return placement.Candidate(
        replica_id=ids.ReplicaId(replica),
        pool_id=ids.PoolId(pool),
        model_id=ids.ModelId(model),
        state=state,
        slots_total=total,
        slots_busy=busy,
        gpu_free_mib=free,
        devices=(0,),
    )


def want(
    model: str | None = "m",
    *,
    pool: str | None = None,
    mode: placement.Mode = "auto",
    pin: str | None = None,
    prefer: tuple[str, ...] = (),
    avoid: tuple[str, ...] = (),
    fallback: bool = True,
    last: str | None = None,
) -> placement.Want:
    return placement.Want(
        task_id=ids.TaskId("t"),
        model_id=ids.ModelId(model) if model else None,
        pool_id=ids.PoolId(pool) if pool else None,
        mode=mode,
        pin_pool=ids.PoolId(pin) if pin else None,
        prefer_pools=tuple(ids.PoolId(p) for p in prefer),
        avoid_pools=tuple(ids.PoolId(p) for p in avoid),
        allow_fallback=fallback,
        last_replica_id=ids.ReplicaId(last) if last else None,
    )


def test_a_task_goes_to_the_ready_replica_of_its_model_that_has_a_free_slot() -> None:
    decision = placement.choose(
        want(),
        [
            cand("r-other", "p0", model="other"),
            cand("r-busy", "p1", busy=1),
            cand("r-starting", "p2", state="Starting"),
            cand("r-free", "p3"),
        ],
    )
    assert (decision.outcome, decision.replica_id, decision.pool_id) == ("assigned", "r-free", "p3")
    assert decision.code is None
    assert (decision.candidates_total, decision.candidates_feasible) == (4, 1)
    assert decision.tie_breakers == ()


def test_a_task_naming_a_pool_runs_on_that_pool_whatever_its_model() -> None:
    decision = placement.choose(
        want(None, pool="p1"), [cand("r0", "p0", "a"), cand("r1", "p1", "b", free=1)]
    )
    assert decision.replica_id == "r1"
    assert "serves_pool" in decision.filters_applied


def test_fewest_busy_slots_win_then_most_free_vram_then_the_smaller_replica_id() -> None:
    loaded = cand("a", "p0", total=4, busy=2, free=9000)
    light = cand("b", "p1", total=4, busy=1, free=100)
    assert placement.choose(want(), [loaded, light]).tie_breakers == ("fewest_busy_slots",)
    assert placement.choose(want(), [loaded, light]).replica_id == "b"

    roomy = cand("c", "p2", total=4, busy=1, free=200)
    decision = placement.choose(want(), [loaded, light, roomy])
    assert decision.replica_id == "c"
    assert decision.tie_breakers == ("fewest_busy_slots", "most_gpu_free_mib")

    twin = cand("a-twin", "p3", total=4, busy=1, free=200)
    decision = placement.choose(want(), [roomy, twin])
    assert decision.replica_id == "a-twin"
    assert decision.tie_breakers == placement.RANKING


def test_session_affinity_keeps_a_session_on_its_last_replica_while_it_has_a_free_slot() -> None:
    last = cand("r-last", "p0", total=2, busy=1, free=10)
    idle = cand("r-idle", "p1", total=2, busy=0, free=9000)

    decision = placement.choose(want(last="r-last"), [idle, last])

    assert (decision.replica_id, decision.kv_warmth) == ("r-last", True)
    assert decision.tie_breakers == ("session_affinity",)


def test_a_session_whose_last_replica_is_full_moves_on_without_kv_warmth() -> None:
    last = cand("r-last", "p0", busy=1)
    decision = placement.choose(want(last="r-last"), [last, cand("r-idle", "p1")])
    assert (decision.replica_id, decision.kv_warmth) == ("r-idle", False)


def test_a_pinned_task_waits_for_its_busy_pool_even_when_fallback_is_allowed() -> None:
    decision = placement.choose(
        want(mode="pin", pin="p0", fallback=True), [cand("r0", "p0", busy=1), cand("r1", "p1")]
    )
    assert (decision.outcome, decision.replica_id, decision.code) == ("wait", None, None)
    assert decision.pinned and not decision.fallback_used


def test_a_pinned_task_whose_pool_is_starting_is_told_the_pool_is_unready() -> None:
    decision = placement.choose(
        want(mode="pin", pin="p0"), [cand("r0", "p0", state="Starting"), cand("r1", "p1")]
    )
    assert decision.outcome == "unready"
    assert decision.code is ErrorCode.POOL_UNREADY


def test_a_task_pinned_to_a_pool_without_its_model_is_told_no_pool_serves_it() -> None:
    decision = placement.choose(
        want(mode="pin", pin="p0"), [cand("r0", "p0", "x"), cand("r1", "p1")]
    )
    assert decision.outcome == "none"
    assert decision.code is ErrorCode.POOL_UNAVAILABLE


def test_a_pin_overrides_the_avoid_and_prefer_lists() -> None:
    decision = placement.choose(
        want(mode="pin", pin="p0", avoid=("p0",), prefer=("p1",)),
        [cand("r0", "p0"), cand("r1", "p1")],
    )
    assert decision.replica_id == "r0"


def test_an_avoided_pool_is_not_used_while_another_pool_is_ready_even_if_busy() -> None:
    decision = placement.choose(want(avoid=("p0",)), [cand("r0", "p0"), cand("r1", "p1", busy=1)])
    assert decision.outcome == "wait"


def test_an_avoided_pool_is_the_last_resort_when_no_other_pool_is_ready() -> None:
    decision = placement.choose(
        want(avoid=("p0",)), [cand("r0", "p0"), cand("r1", "p1", state="Failed")]
    )
    assert (decision.replica_id, decision.fallback_used) == ("r0", True)

    alone = placement.choose(want(avoid=("p0",)), [cand("r0", "p0")])
    assert (alone.replica_id, alone.fallback_used) == ("r0", True)


def test_an_avoided_pool_is_never_used_without_fallback() -> None:
    only_avoided = [cand("r0", "p0")]
    assert placement.choose(want(avoid=("p0",), fallback=False), only_avoided).outcome == "none"

    other_down = [cand("r0", "p0"), cand("r1", "p1", state="Starting")]
    assert placement.choose(want(avoid=("p0",), fallback=False), other_down).outcome == "unready"


def test_a_preferred_pool_wins_over_a_less_loaded_one() -> None:
    decision = placement.choose(
        want(prefer=("p0",)), [cand("r0", "p0", total=4, busy=3), cand("r1", "p1", total=4)]
    )
    assert (decision.replica_id, decision.fallback_used) == ("r0", False)


def test_a_full_preferred_pool_falls_back_to_another_when_allowed() -> None:
    decision = placement.choose(want(prefer=("p0",)), [cand("r0", "p0", busy=1), cand("r1", "p1")])
    assert (decision.replica_id, decision.fallback_used) == ("r1", True)


def test_without_fallback_a_task_waits_for_its_preferred_pool() -> None:
    decision = placement.choose(
        want(mode="prefer", prefer=("p0",), fallback=False),
        [cand("r0", "p0", busy=1), cand("r1", "p1")],
    )
    assert (decision.outcome, decision.candidates_feasible) == ("wait", 0)


def test_a_preferred_pool_outranks_session_affinity_to_another_pool() -> None:
    decision = placement.choose(
        want(prefer=("p0",), last="r1"), [cand("r0", "p0"), cand("r1", "p1")]
    )
    assert (decision.replica_id, decision.kv_warmth) == ("r0", False)


def test_a_model_no_replica_serves_gets_pool_unavailable() -> None:
    decision = placement.choose(want("ghost"), [cand("r0", "p0")])
    assert (decision.outcome, decision.code) == ("none", ErrorCode.POOL_UNAVAILABLE)
    assert placement.choose(want(), []).outcome == "none"


def test_the_decision_log_line_names_the_choice_and_how_it_was_made() -> None:
    decision = placement.choose(
        want(avoid=("p9",), last="r0"), [cand("r0", "p0"), cand("r1", "p1")]
    )
    assert decision.log_fields() == {
        "outcome": "assigned",
        "selected_replica_id": "r0",
        "selected_pool_id": "p0",
        "kv_warmth": True,
        "candidates_total": 2,
        "candidates_feasible": 2,
        "filters_applied": ["serves_model", "avoid_pools", "ready", "free_slot"],
        "tie_breakers_applied": ["session_affinity"],
        "pinned": False,
        "fallback_used": False,
    }


def test_two_candidates_with_one_replica_id_are_a_caller_bug() -> None:
    with pytest.raises(ValueError, match="distinct"):
        placement.choose(want(), [cand("r0", "p0"), cand("r0", "p1")])


def test_a_want_built_from_a_task_file_carries_its_placement_overrides() -> None:
    task = tasks.TaskFile.model_validate(
        {
            "model": "m",
            "prompt": "hi",
            "max_tokens": 8,
            "placement": {"mode": "pin", "pin_pool": "p0", "allow_fallback": False},
        }
    )
    built = placement.Want.of(ids.TaskId("t"), task, last_replica_id=ids.ReplicaId("r0"))
    expected = want(mode="pin", pin="p0", fallback=False, last="r0")
    assert built == dataclasses.replace(expected, max_tokens=8)


def test_a_pin_without_a_pool_or_a_want_without_model_or_pool_cannot_be_made() -> None:
    with pytest.raises(ValueError, match="pin_pool"):
        want(mode="pin")
    with pytest.raises(ValueError, match="model or a pool"):
        want(None)


# Properties over arbitrary fleets and wants.

POOLS = ["p0", "p1", "p2"]
REPLICAS = [f"r{i}" for i in range(6)]


@st.composite
def candidates(draw: st.DrawFn) -> list[placement.Candidate]:
    replicas = draw(st.lists(st.sampled_from(REPLICAS), unique=True, max_size=6))
    fleet = []
    for replica in replicas:
        total = draw(st.integers(1, 2))
        fleet.append(
            cand(
                replica,
                draw(st.sampled_from(POOLS)),
                draw(st.sampled_from(["m", "n"])),
                state=draw(st.sampled_from(["Ready", "Ready", "Ready", "Starting", "Failed"])),
                total=total,
                busy=draw(st.integers(0, total)),
                free=draw(st.integers(0, 1)) * 1000,  # few values, so ties are common
            )
        )
    return fleet


@st.composite
def wants(draw: st.DrawFn) -> placement.Want:
    modes: list[placement.Mode] = ["auto", "pin", "prefer"]
    mode = draw(st.sampled_from(modes))
    pools = st.lists(st.sampled_from(POOLS), unique=True, max_size=2).map(tuple)
    return want(
        "m",
        mode=mode,
        pin=draw(st.sampled_from(POOLS)) if mode == "pin" else None,
        prefer=draw(pools),
        avoid=draw(pools),
        fallback=draw(st.booleans()),
        last=draw(st.none() | st.sampled_from(REPLICAS)),
    )


@given(wants(), candidates())
def test_a_pinned_task_is_never_placed_outside_its_pool(
    wanted: placement.Want, fleet: list[placement.Candidate]
) -> None:
    decision = placement.choose(wanted, fleet)
    if wanted.mode == "pin" and decision.replica_id is not None:
        assert decision.pool_id == wanted.pin_pool
        assert not decision.fallback_used


@given(wants(), candidates())
def test_the_winner_is_always_a_feasible_replica_of_the_task_model(
    wanted: placement.Want, fleet: list[placement.Candidate]
) -> None:
    decision = placement.choose(wanted, fleet)
    by_id = {c.replica_id: c for c in fleet}
    if decision.outcome == "assigned":
        assert decision.replica_id is not None
        winner = by_id[decision.replica_id]
        assert winner.feasible and winner.model_id == "m" and winner.pool_id == decision.pool_id
        assert decision.candidates_feasible >= 1
        if winner.pool_id in wanted.avoid_pools and wanted.mode != "pin":
            assert decision.fallback_used
    else:
        assert decision.replica_id is None and decision.pool_id is None
        assert decision.candidates_feasible == 0


@given(wants(), candidates(), st.randoms(use_true_random=False))
def test_the_decision_does_not_depend_on_the_order_of_the_candidates(
    wanted: placement.Want, fleet: list[placement.Candidate], rng: random.Random
) -> None:
    shuffled = list(fleet)
    rng.shuffle(shuffled)
    for task in (wanted, want()):
        decision = placement.choose(task, fleet)
        assert placement.choose(task, shuffled) == decision
        assert placement.choose(task, reversed(fleet)) == decision


@given(candidates(), st.sampled_from(REPLICAS))
def test_affinity_wins_whenever_the_last_replica_is_feasible(
    fleet: list[placement.Candidate], last: str
) -> None:
    decision = placement.choose(want(last=last), fleet)
    last_one = next((c for c in fleet if c.replica_id == last), None)
    if last_one is not None and last_one.feasible and last_one.model_id == "m":
        assert (decision.replica_id, decision.kv_warmth) == (last, True)
    else:
        assert not decision.kv_warmth


@given(candidates())
def test_a_plain_task_is_assigned_exactly_when_some_replica_of_its_model_is_feasible(
    fleet: list[placement.Candidate],
) -> None:
    serving = [c for c in fleet if c.model_id == "m"]
    expected = (
        "assigned"
        if any(c.feasible for c in serving)
        else "wait"
        if any(c.ready for c in serving)
        else "unready"
        if serving
        else "none"
    )
    assert placement.choose(want(), fleet).outcome == expected


def test_a_task_goes_only_to_a_pool_whose_max_tokens_limit_allows_it() -> None:
    """A pool's max_tokens is a filter like its context: the limited pool is never used for a
    task over its limit, however idle; a task within it may use either."""
    limited = placement.Candidate(
        replica_id=ids.ReplicaId("small-0"),
        pool_id=ids.PoolId("small"),
        model_id=ids.ModelId("m"),
        state="Ready",
        slots_total=4,
        slots_busy=0,
        gpu_free_mib=9000,
        max_tokens=50,
    )
    busy = cand("big-0", "big", total=1, busy=1)
    big_ask = dataclasses.replace(want(), max_tokens=100)
    decision = placement.choose(big_ask, [limited, busy])
    assert decision.outcome == "wait" and "max_tokens_allowed" in decision.filters_applied
    assert placement.allowed(big_ask, [limited, busy]) == [busy]
    small_ask = dataclasses.replace(want(), max_tokens=50)
    assert placement.choose(small_ask, [limited, busy]).replica_id == "small-0"


def test_a_ceiling_max_tokens_is_no_ask_a_limit_refuses() -> None:
    ceiling = tasks.TaskFile.model_validate(
        {"task_id": "t", "model": "m", "prompt": "p", "max_tokens": 4096,
         "labels": {tasks.UP_TO_CONTEXT[0]: tasks.UP_TO_CONTEXT[1]}}
    )  # fmt: skip
    assert placement.Want.of(ids.TaskId("t"), ceiling).max_tokens == 0
