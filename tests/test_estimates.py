"""Estimates: smoothed service rates, predicted starts, on-time probabilities, calibration."""

from __future__ import annotations

import math
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from reconciler import estimates, rates
from state import desired
from tests.conftest import config

RATE = estimates.ServiceRate(tokens_per_s=50.0, first_token_ms=200.0, samples=3)


def test_a_replica_without_samples_uses_the_documented_default_prior() -> None:
    assert estimates.prior() == estimates.ServiceRate(
        tokens_per_s=20.0, first_token_ms=500.0, samples=0
    )
    assert estimates.prior(200.0, 5.0).tokens_per_s == 200.0


def test_the_first_sample_replaces_the_prior() -> None:
    rate = estimates.observe(None, tokens=100, decode_ms=2000.0, first_token_ms=150.0)
    assert rate == estimates.ServiceRate(
        tokens_per_s=50.0, first_token_ms=150.0, samples=1, tokens_per_s_var=0.0
    )


def test_later_samples_move_the_rate_by_alpha_of_the_difference() -> None:
    rate = estimates.observe(RATE, tokens=100, decode_ms=1000.0, first_token_ms=300.0)
    assert rate.tokens_per_s == pytest.approx(50.0 + 0.3 * (100.0 - 50.0))
    assert rate.first_token_ms == pytest.approx(200.0 + 0.3 * 100.0)
    assert rate.tokens_per_s_var == pytest.approx(0.7 * 0.3 * 50.0**2)
    assert rate.samples == 4


def test_a_sample_without_tokens_keeps_the_speed_and_a_sample_of_nothing_changes_nothing() -> None:
    canceled_early = estimates.observe(RATE, tokens=0, decode_ms=0.0, first_token_ms=400.0)
    assert (canceled_early.tokens_per_s, canceled_early.samples) == (50.0, 3)
    assert canceled_early.first_token_ms == pytest.approx(260.0)
    assert estimates.observe(RATE, tokens=0, decode_ms=0.0, first_token_ms=None) == RATE
    assert estimates.observe(RATE, tokens=1, decode_ms=0.5, first_token_ms=None) == RATE


def test_a_first_speed_sample_replaces_the_prior_even_after_other_measurements() -> None:
    rate = estimates.observe(None, tokens=0, decode_ms=0.0, first_token_ms=100.0, max_tokens=8)
    assert (rate.samples, rate.tokens_per_s, rate.first_token_ms) == (0, 20.0, 100.0)
    rate = estimates.observe(rate, tokens=10, decode_ms=100.0, first_token_ms=None)
    assert (rate.samples, rate.tokens_per_s) == (1, 100.0)


def test_the_fill_ratio_learns_that_tasks_stop_before_max_tokens() -> None:
    rate = estimates.observe(None, tokens=25, decode_ms=500.0, first_token_ms=0.0, max_tokens=100)
    assert rate.fill_ratio == pytest.approx(0.25)
    assert estimates.service_ms(100, rate) == pytest.approx(2000.0)
    assert estimates.expected_service_ms(100, rate) == pytest.approx(500.0)


def test_service_time_is_first_token_plus_max_tokens_at_the_measured_speed() -> None:
    assert estimates.service_ms(100, RATE) == pytest.approx(200.0 + 2000.0)
    assert estimates.expected_service_ms(100, RATE) == estimates.service_ms(100, RATE)


def test_a_rate_that_cannot_be_divided_by_is_refused() -> None:
    with pytest.raises(ValueError, match="tokens_per_s"):
        estimates.ServiceRate(tokens_per_s=0.0, first_token_ms=0.0)
    with pytest.raises(ValueError, match="alpha"):
        estimates.observe(RATE, tokens=1, decode_ms=1.0, first_token_ms=None, alpha=0.0)


def test_a_task_with_an_idle_slot_starts_now() -> None:
    assert estimates.predicted_start_ms([0.0], []) == 0.0
    assert estimates.predicted_start_ms([700.0, 0.0], []) == 0.0


def test_two_slots_and_three_tasks_of_a_second_ahead_start_the_task_after_one_second() -> None:
    assert estimates.predicted_start_ms([0.0, 0.0], [1000.0, 1000.0, 1000.0]) == 1000.0


def test_tasks_ahead_take_the_slot_that_frees_first() -> None:
    # Slot A frees at 300, slot B at 500: the task ahead (400) runs 300..700 on A,
    # so this task starts when B frees.
    assert estimates.predicted_start_ms([300.0, 500.0], [400.0]) == 500.0
    # A running task past its estimate counts as a slot freeing now.
    assert estimates.predicted_start_ms([-50.0], [100.0]) == 100.0


def test_without_any_slot_there_is_no_prediction() -> None:
    assert estimates.predicted_start_ms([], [1000.0]) is None
    assert estimates.on_time_probability(None, 1000.0, 5000.0) is None


def test_a_deadline_at_the_predicted_finish_is_met_half_the_time() -> None:
    assert estimates.on_time_probability(1000.0, 2000.0, 3000.0) == pytest.approx(0.5)


def test_the_probability_follows_the_documented_normal_model() -> None:
    # mean 1000, sigma 0.25 × 1000 + 50 = 300: a deadline one sigma out is met 84% of the time.
    assert estimates.on_time_probability(0.0, 1000.0, 1300.0) == pytest.approx(0.8413, abs=1e-4)
    assert estimates.on_time_probability(0.0, 1000.0, 400.0) == pytest.approx(0.0228, abs=1e-4)


def test_a_task_without_a_deadline_has_no_probability_rather_than_a_made_up_one() -> None:
    assert estimates.on_time_probability(0.0, 1000.0, None) is None


def test_a_deadline_already_past_cannot_be_met() -> None:
    assert estimates.on_time_probability(0.0, 1.0, 0.0) == 0.0
    assert estimates.on_time_probability(0.0, 1.0, -10.0) == 0.0


def test_calibration_reports_start_error_and_brier_score_over_what_could_be_scored() -> None:
    calibration = estimates.Calibration.of(
        [
            estimates.Prediction(100.0, 150.0, 0.9, True),
            estimates.Prediction(300.0, 200.0, 0.2, True),
            estimates.Prediction(None, 500.0),  # no slot at admission: not scored
            estimates.Prediction(0.0, 0.0),  # no deadline: start only
        ]
    )
    assert calibration.start_samples == 3
    assert calibration.start_mae_ms == pytest.approx((50.0 + 100.0 + 0.0) / 3)
    assert calibration.brier_samples == 2
    assert calibration.brier == pytest.approx((0.1**2 + 0.8**2) / 2)

    assert estimates.Calibration.of([]) == estimates.Calibration(0, None, 0, None)


def test_the_score_primitives_refuse_unpaired_or_empty_input() -> None:
    with pytest.raises(ValueError):
        estimates.mean_absolute_error([1.0], [])
    with pytest.raises(ValueError):
        estimates.brier_score([], [])
    assert estimates.brier_score([0.5, 0.5], [True, False]) == 0.25


times = st.floats(0, 1e7, allow_nan=False)


@given(times, times, times, times)
def test_the_probability_never_falls_as_the_deadline_moves_out(
    start: float, service: float, d1: float, d2: float
) -> None:
    early, late = sorted((d1, d2))
    p_early = estimates.on_time_probability(start, service, early)
    p_late = estimates.on_time_probability(start, service, late)
    assert p_early is not None and p_late is not None
    assert 0.0 <= p_early <= p_late <= 1.0


@given(st.lists(times, min_size=1, max_size=6), st.lists(times, max_size=10), times)
def test_one_more_task_ahead_never_brings_the_start_forward(
    slots: list[float], ahead: list[float], extra: float
) -> None:
    before = estimates.predicted_start_ms(slots, ahead)
    after = estimates.predicted_start_ms(slots, [*ahead, extra])
    assert before is not None and after is not None
    assert min(slots) <= before <= after
    # List scheduling never waits longer than everything ahead run back to back.
    assert before <= min(slots) + sum(ahead) + 1e-6 * (1 + sum(ahead))


@given(
    st.lists(
        st.tuples(st.integers(0, 4096), st.floats(0, 1e6), st.none() | st.floats(0, 1e4)),
        max_size=20,
    )
)
def test_a_smoothed_rate_stays_within_the_range_of_its_samples(
    samples: list[tuple[int, float, float | None]],
) -> None:
    rate: estimates.ServiceRate | None = None
    speeds = []
    for tokens, decode_ms, first in samples:
        rate = estimates.observe(
            rate, tokens=tokens, decode_ms=decode_ms, first_token_ms=first, max_tokens=4096
        )
        if tokens > 0 and decode_ms >= estimates.MIN_DECODE_MS:
            speeds.append(tokens / decode_ms * 1000)
    if speeds:
        assert rate is not None
        assert min(speeds) * (1 - 1e-9) <= rate.tokens_per_s <= max(speeds) * (1 + 1e-9)
        assert rate.tokens_per_s_var >= 0
        assert math.isfinite(estimates.service_ms(4096, rate))


entries = st.lists(
    st.tuples(
        st.sampled_from(["ma", "mb"]),
        st.sampled_from([None, "pa", "pb"]),
        st.sampled_from(["interactive", "batch"]),
        st.integers(1, 512),
        st.none() | st.floats(-1000, 10_000),
    ),
    min_size=1,
    max_size=12,
)


@given(entries, st.lists(st.floats(0, 5000), max_size=4), st.booleans())
def test_estimating_the_whole_queue_at_once_gives_what_each_estimate_alone_gives(
    specs: list[tuple[str, str | None, str, int, float | None]],
    busy_ms: list[float],
    pb_ready: bool,
) -> None:
    from reconciler import placement, queues, rates
    from state import ids

    q = queues.TaskQueue(64)
    for n, (model, pool, priority, max_tokens, deadline) in enumerate(specs):
        q.push(
            queues.Entry(
                task_id=ids.TaskId(f"t{n}"),
                priority=priority,  # type: ignore[arg-type]
                model_id=ids.ModelId(model),
                pool_id=None if pool is None else ids.PoolId(pool),
                enqueued_at=0.0,
                max_tokens=max_tokens,
                deadline_at=deadline,
            )
        )
    cands = [
        placement.Candidate(ids.ReplicaId(f"{p}-0"), ids.PoolId(p), ids.ModelId(m), s, 2, 0, 10_000)
        for p, m, s in (("pa", "ma", "Ready"), ("pb", "ma", "Ready" if pb_ready else "Starting"))
    ]
    busy = [("pa-0", ms, ms / 3) for ms in busy_ms]
    r = rates.Rates()
    order = q.in_dispatch_order()

    def deadline(e: queues.Entry) -> float | None:
        return e.deadline_at

    every = r.predict_queued(order, order, candidates=cands, busy=busy, deadline_in_ms=deadline)
    for index, e in enumerate(order):
        alone = r.predict(e, order[:index], candidates=cands, busy=busy, deadline_in_ms=deadline(e))
        assert (every[e.task_id].start_ms, every[e.task_id].on_time_probability) == alone
        assert 0 <= every[e.task_id].position <= index  # only those taking its replicas count


def _queue(*specs: tuple[str, str | None, int]) -> list[Any]:
    from reconciler import queues
    from state import ids

    q = queues.TaskQueue(64)
    for task_id, pool, max_tokens in specs:
        q.push(
            queues.Entry(
                task_id=ids.TaskId(task_id),
                priority="batch",
                model_id=ids.ModelId("m"),
                pool_id=None if pool is None else ids.PoolId(pool),
                enqueued_at=0.0,
                max_tokens=max_tokens,
                deadline_at=None,
            )
        )
    return q.in_dispatch_order()


def _candidate(pool: str, state: str = "Ready", starting_ms: float = 0.0) -> Any:
    from reconciler import placement
    from state import ids

    return placement.Candidate(
        ids.ReplicaId(f"{pool}-0"),
        ids.PoolId(pool),
        ids.ModelId("m"),
        state,
        1,
        1 if state == "Ready" else 0,
        10_000,
        starting_ms=starting_ms,
    )


def test_queue_position_counts_only_the_tasks_ahead_for_the_same_replicas() -> None:
    """A task pinned to a slow busy pool is queued before one pinned to a fast pool: the
    fast one starts first, and nobody waits ahead of it (its position was 1)."""
    order = _queue(("t3", "slow", 50), ("t4", "fast", 20), ("t5", "fast", 20))
    cands = [_candidate("slow"), _candidate("fast")]
    busy = [("slow-0", 10_000.0, 0.0), ("fast-0", 1_000.0, 0.0)]
    got = rates.Rates().predict_queued(
        order, order, candidates=cands, busy=busy, deadline_in_ms=lambda _: None
    )
    assert [got[t].position for t in ("t3", "t4", "t5")] == [0, 0, 1]


def test_a_loading_replica_is_counted_from_what_is_left_of_its_load() -> None:
    """Counted from each request, the whole start-up made a replica 6 s into a 7 s load
    look 7 s away, and refused deadlines it met. A load never measured on this pool is a
    guess: the on-time probability is unknown, which is not late."""
    order = _queue(("t1", "cold", 20))
    r = rates.Rates()
    cold = [_candidate("cold", "Starting", starting_ms=6_000.0)]
    r.started("cold", 7_000.0)  # measured before: a restart
    [(start, probability)] = [
        (e.start_ms, e.on_time_probability)
        for e in r.predict_queued(
            order, order, candidates=cold, busy=[], deadline_in_ms=lambda _: 3_000.0
        ).values()
    ]
    assert start == pytest.approx(1_000.0) and probability is not None and probability > 0.5
    fresh = rates.Rates()  # never started: the prior's guess
    [estimate] = fresh.predict_queued(
        order, order, candidates=cold, busy=[], deadline_in_ms=lambda _: 3_000.0
    ).values()
    assert estimate.start_ms is not None and estimate.on_time_probability is None


async def test_a_learned_speed_counts_the_tokens_its_decode_time_spans(
    workspace: Any, serve: Any
) -> None:
    """The decode time runs from the first token to the end: a 2-token task at 20 tokens/s
    decodes for 50 ms, which is 20 tokens/s, not 40. A task queued behind a 40-token one
    is told it starts in about 2 s, not 1."""
    from tests.conftest import config, task, wait_for, wait_terminal

    cfg = config()
    cfg["pools"][0] |= {"slots": 1, "sim": {"tokens_per_s": 20, "load_s": 0.0}}
    workspace.write_config(cfg)
    await serve()
    workspace.submit("short.task.yaml", task("short", max_tokens=2))
    assert (await wait_terminal(workspace, "short", 10))["status"] == "succeeded"
    workspace.submit("long.task.yaml", task("long", max_tokens=40))
    await wait_for(
        lambda: (workspace.result("long") or {}).get("status") == "running", 10, "long running"
    )
    workspace.submit("next.task.yaml", task("next", max_tokens=2))
    await wait_for(lambda: workspace.result("next"), 10, "next queued")
    predicted = workspace.result("next")["predicted_start_ms"]
    assert 1500 <= predicted <= 2600, predicted


@pytest.mark.parametrize(
    "route",
    [
        {"mode": "pin", "pin_pool": "slow"},
        {"mode": "prefer", "prefer_pools": ["slow"], "allow_fallback": False},
        {"mode": "auto", "avoid_pools": ["idle"], "allow_fallback": False},
    ],
)
async def test_a_start_is_estimated_over_the_replicas_the_placement_allows(
    workspace: Any, serve: Any, route: dict[str, Any]
) -> None:
    """Pool `idle` serves the same model and is free, but the task's placement keeps it on
    the busy pool `slow`: its start is estimated there, so a deadline it cannot meet is
    refused at admission rather than missed in the queue."""
    from tests.conftest import config, task, wait_for, wait_terminal

    cfg = config()
    slow = cfg["pools"][0] | {"id": "slow", "slots": 1, "sim": {"tokens_per_s": 20, "load_s": 0}}
    cfg["pools"] = [slow, slow | {"id": "idle", "sim": {"tokens_per_s": 400, "load_s": 0}}]
    workspace.write_config(cfg)
    await serve()
    busy = task("busy", max_tokens=40, placement={"mode": "pin", "pin_pool": "slow"})
    workspace.submit("busy.task.yaml", busy)
    await wait_for(
        lambda: (workspace.result("busy") or {}).get("status") == "running", 10, "busy running"
    )
    workspace.submit("late.task.yaml", task("late", max_tokens=2, deadline_ms=800, placement=route))
    late = await wait_terminal(workspace, "late", 10)
    assert late["status"] == "rejected" and late["error"]["code"] == "DEADLINE_UNMET", late


@pytest.mark.parametrize("route", [{"mode": "pin", "pin_pool": "idle"}, None])
async def test_tasks_pinned_to_another_pool_do_not_delay_an_idle_one(
    workspace: Any, serve: Any, route: dict[str, Any] | None
) -> None:
    """Pool `slow` is busy with tasks queued for it alone; pool `idle` serves the same
    model and is free: a task for `idle`, or for any pool of the model, is told it starts
    at once (the pinned tasks ahead never take `idle`'s slot, in the estimate either)."""
    from tests.conftest import config, task, wait_for, wait_terminal

    cfg = config()
    slow = cfg["pools"][0] | {"id": "slow", "slots": 1, "sim": {"tokens_per_s": 20, "load_s": 0}}
    cfg["pools"] = [slow, slow | {"id": "idle", "sim": dict(slow["sim"])}]  # as slow
    workspace.write_config(cfg)
    await serve()
    pin = {"mode": "pin", "pin_pool": "slow"}
    for name in ("s1", "s2", "s3"):
        workspace.submit(f"{name}.task.yaml", task(name, max_tokens=40, placement=pin))
    await wait_for(lambda: (workspace.result("s3") or {}).get("status") == "queued", 10, "s3")
    placed = {"placement": route} if route else {}
    workspace.submit("now.task.yaml", task("now", max_tokens=2, deadline_ms=1500, **placed))
    now = await wait_terminal(workspace, "now", 10)
    assert now["status"] == "succeeded", now
    first = workspace.frames("now")[0]
    assert first.event == "queued" and first.data["predicted_start_ms"] < 500, first.data


@pytest.mark.parametrize("probability", [0.0484, 0.0499, 0.01, 0.0])
def test_a_refused_deadline_never_shows_its_probability_rounded_up_to_the_floor(
    probability: float,
) -> None:
    from reconciler import admission
    from state import tasks

    task = tasks.TaskFile.model_validate(
        {"task_id": "t", "model": "m", "prompt": "p", "max_tokens": 4, "deadline_ms": 1500}
    )
    refused = admission.deadline_error(task, predicted_start_ms=2107, probability=probability)
    assert refused is not None
    shown = refused.message.split("on-time probability ")[1].split(",")[0]
    assert float(shown) < admission.DEADLINE_FLOOR, refused.message


async def test_a_task_is_estimated_over_the_replicas_whose_context_holds_it(
    workspace: Any, serve: Any
) -> None:
    """Pool `small` (ctx 512) is idle, pool `big` busy: a task too long for `small` waits
    for `big`, and its estimate says so rather than "now"."""
    from tests.conftest import config, task, wait_for

    cfg = config()
    big = cfg["pools"][0] | {
        "id": "big", "ctx": 4096, "slots": 1, "sim": {"tokens_per_s": 20, "load_s": 0}
    }  # fmt: skip
    cfg["pools"] = [big, big | {"id": "small", "ctx": 512, "sim": dict(big["sim"])}]
    workspace.write_config(cfg)
    await serve()
    busy = task("busy", max_tokens=40, placement={"mode": "pin", "pin_pool": "big"})
    workspace.submit("busy.task.yaml", busy)
    await wait_for(
        lambda: (workspace.result("busy") or {}).get("status") == "running", 10, "busy running"
    )
    workspace.submit("long.task.yaml", task("long", prompt="word " * 800, max_tokens=100))
    await wait_for(lambda: workspace.result("long"), 10, "long queued")
    first = workspace.frames("long")[0]
    assert first.event == "queued" and first.data["predicted_start_ms"] > 1000, first.data


def test_a_pool_whose_replicas_change_kind_forgets_the_speed_it_learned() -> None:
    """Speeds are learned per pool: a pool now running another engine, model or setting
    (made slower, say) starts again from its prior, while more replicas of the same kind
    keep what was learned."""

    def state(tokens_per_s: float, replicas: int = 1) -> desired.DesiredState:
        cfg = config()
        cfg["pools"][0] |= {"replicas": replicas, "sim": {"tokens_per_s": tokens_per_s}}
        return desired.DesiredState.model_validate(cfg)

    r = rates.Rates()
    r.configure(state(200))
    pool = state(200).pools[0].id
    r.observe(pool, tokens=101, decode_ms=1000.0, first_token_ms=5.0)  # 100 tokens/s seen
    learned = r.rate(pool)
    r.started(pool, 1234.0)
    r.configure(state(200, replicas=2))
    assert r.rate(pool) == learned and r.startup_ms(pool) == 1234.0
    began = r.generation(pool)  # a task that starts on the old kind of replica
    r.configure(state(20, replicas=2))
    fresh = rates.Rates()
    fresh.configure(state(20, replicas=2))
    assert r.rate(pool) == fresh.rate(pool) != learned  # the new prior, nothing of before
    assert r.startup_ms(pool) == fresh.startup_ms(pool) != 1234.0
    # it ends after the change: its speed is the old kind's, and must not come back
    r.observe(pool, tokens=101, decode_ms=1000.0, first_token_ms=5.0, generation=began)
    assert r.rate(pool) == fresh.rate(pool)
    r.observe(pool, tokens=11, decode_ms=2000.0, first_token_ms=5.0, generation=r.generation(pool))
    assert r.rate(pool) != fresh.rate(pool)  # one of the new kind counts
