"""Steps about the workstation: its GPUs, orch.yaml, the daemon, pools and `orchctl status`."""

from __future__ import annotations

import re
import time
from typing import Any

import yaml
from behave import given, step, then, when
from orch_support import (
    INVENTORY,
    config_path,
    describe_command,
    load_config,
    orchctl,
    pool_ready,
    pool_status,
    replica_pids,
    save_config,
    start_daemon,
    status,
    wait_for,
    write_atomically,
)

# -- the workstation and its desired state ---------------------------------------------------


@given("a workstation with a simulated 24 GB and a 12 GB GPU")
def given_workstation(context: Any) -> None:
    (context.root / "inventory.yaml").write_text(yaml.safe_dump(INVENTORY, sort_keys=False))


@given("this orch.yaml")
def given_orch_yaml(context: Any) -> None:
    data = yaml.safe_load(context.text)
    assert isinstance(data, dict), "the orch.yaml of the scenario must be a mapping"
    text = context.text.rstrip() + "\n"
    if "server" not in data:  # any free port: scenarios must not depend on 8080 being free
        text += 'server: {bind: "127.0.0.1:0"}\n'
    write_atomically(config_path(context), text)


@given("the daemon is serving orch.yaml")
def given_daemon_serving(context: Any) -> None:
    start_daemon(context)

    def running() -> bool:
        data = status(context)
        return bool(data and data["daemon"]["state"] == "running")

    wait_for(context, running, "the daemon to write .orch/status.json")


@step('pool "{pool_id:Id}" is Ready')
@step('pool "{pool_id:Id}" becomes Ready')
def pool_is_ready(context: Any, pool_id: str) -> None:
    wait_for(
        context,
        lambda: pool_ready(pool_status(context, pool_id)),
        lambda: (
            f"pool {pool_id!r} to be Ready with all its replicas "
            f"(last seen: {pool_status(context, pool_id)})"
        ),
    )


@step("I note the replica pids")
def note_pids(context: Any) -> None:
    data = status(context)
    assert data is not None, "no .orch/status.json"
    context.noted_pids = {p["id"]: replica_pids(p) for p in data["pools"]}
    for pool_id, pids in context.noted_pids.items():
        assert pids, f"pool {pool_id!r} has no running replica to note"


# -- editing orch.yaml ------------------------------------------------------------------------


@when('I change pool "{pool_id:Id}" to serve model "{model_id:Id}"')
def change_pool_model(context: Any, pool_id: str, model_id: str) -> None:
    data = load_config(context)
    pool = next(p for p in data["pools"] if p["id"] == pool_id)
    pool["model"] = model_id
    save_config(context, data)


@when("I add this pool to orch.yaml")
def add_pool(context: Any) -> None:
    pool = yaml.safe_load(context.text)
    assert isinstance(pool, dict), "a pool is a mapping"
    data = load_config(context)
    data["pools"].append(pool)
    save_config(context, data)


@when("I add these models to orch.yaml")
def add_models(context: Any) -> None:
    models = yaml.safe_load(context.text)
    assert isinstance(models, dict), "models are a mapping of id to model"
    data = load_config(context)
    data["models"].update(models)
    save_config(context, data)


@step('I edit orch.yaml, replacing "{old}" with "{new}"')
def edit_text(context: Any, old: str, new: str) -> None:
    path = config_path(context)
    text = path.read_text()
    assert text.count(old) == 1, f"{old!r} should occur once in orch.yaml:\n{text}"
    write_atomically(path, text.replace(old, new))


# -- what status shows ----------------------------------------------------------------------


@then('pool "{pool_id:Id}" has replaced its replica')
def pool_replaced(context: Any, pool_id: str) -> None:
    old = context.noted_pids[pool_id]

    def replaced() -> bool:
        pool = pool_status(context, pool_id)
        if pool is None or not pool_ready(pool):
            return False
        pids = replica_pids(pool)
        return bool(pids) and not pids & old

    wait_for(
        context,
        replaced,
        lambda: (
            f"pool {pool_id!r} to be Ready on a new replica (old pids {sorted(old)}; "
            f"last seen: {pool_status(context, pool_id)})"
        ),
    )


@then('pool "{pool_id:Id}" serves model "{model_id:Id}"')
def pool_serves(context: Any, pool_id: str, model_id: str) -> None:
    pool = pool_status(context, pool_id)
    assert pool is not None and pool["model"] == model_id, pool


@then('pool "{pool_id:Id}" keeps its replica')
def pool_kept(context: Any, pool_id: str) -> None:
    pool = pool_status(context, pool_id)
    assert pool is not None
    assert replica_pids(pool) == context.noted_pids[pool_id], (
        f"pool {pool_id!r} replica pids changed from {sorted(context.noted_pids[pool_id])} "
        f"to {sorted(replica_pids(pool))}"
    )
    assert pool_ready(pool), pool


@then("every replica keeps its pid")
def all_kept(context: Any) -> None:
    for pool_id in context.noted_pids:
        pool_kept(context, pool_id)


def _line_of(context: Any, text: str) -> str:
    lines = config_path(context).read_text().splitlines()
    numbers = [i for i, line in enumerate(lines, 1) if text in line]
    assert len(numbers) == 1, f"{text!r} should be on exactly one line of orch.yaml"
    return f"orch.yaml:{numbers[0]}:"


@then('the status shows the config error at the line with "{text}"')
def status_json_error(context: Any, text: str) -> None:
    where = _line_of(context, text)

    def reported() -> list[str]:
        data = status(context)
        return [e["text"] for e in data["config"]["errors"]] if data else []

    found = wait_for(context, reported, "status.json to show the config error")
    assert any(where in line for line in found), f"no error names {where}: {found}"


@then('"orchctl status" reports the config error at the line with "{text}"')
def status_reports_error(context: Any, text: str) -> None:
    where = _line_of(context, text)
    status_json_error(context, text)  # the daemon has seen the edit
    done = orchctl(context, "status")
    assert done.returncode == 0, describe_command(context)
    errors = [line for line in done.stdout.splitlines() if line.strip().startswith("ERROR")]
    assert any(where in line for line in errors), (
        f"no ERROR line names {where}\n{describe_command(context)}"
    )
    assert "p1" in done.stdout, f"the pools are not shown\n{describe_command(context)}"


@then('pool "{pool_id:Id}" becomes Unschedulable')
def pool_unschedulable(context: Any, pool_id: str) -> None:
    def unschedulable() -> dict[str, Any] | None:
        pool = pool_status(context, pool_id)
        return pool if pool and pool["state"] == "Unschedulable" else None

    context.pool = wait_for(
        context,
        unschedulable,
        lambda: (
            f"pool {pool_id!r} to be Unschedulable (last seen: {pool_status(context, pool_id)})"
        ),
    )


@then("its reason gives the MiB it needs and the most any GPU has free")
def reason_has_numbers(context: Any) -> None:
    reason = context.pool["reason"] or ""
    match = re.search(r"needs (\d+) MiB.*?has (\d+) MiB free", reason)
    assert match, f"reason without the numbers: {reason!r}"
    needed, free = int(match.group(1)), int(match.group(2))
    assert needed > free, reason
    data = status(context)
    assert data is not None
    largest = max(g["vram_total_mib"] for g in data["gpus"])
    assert needed > largest, f"{needed} MiB would fit a {largest} MiB GPU: {reason!r}"


@then('"orchctl status" shows pool "{pool_id:Id}" as {state}')
def status_table_shows(context: Any, pool_id: str, state: str) -> None:
    done = orchctl(context, "status")
    assert done.returncode == 0, describe_command(context)
    rows = [line.split() for line in done.stdout.splitlines()]
    row = next((r for r in rows if r and r[0] == pool_id), None)
    assert row is not None, f"no row for pool {pool_id!r}\n{describe_command(context)}"
    assert state in row, f"pool {pool_id!r} is not {state}\n{describe_command(context)}"


@then("the queue holds {depth:d} of {capacity:d} tasks")
def queue_holds(context: Any, depth: int, capacity: int) -> None:
    def queue() -> dict[str, Any]:
        data = status(context)
        return data["queue"] if data else {}

    def holds() -> bool:
        q = queue()
        return q.get("depth") == depth and q.get("capacity") == capacity

    wait_for(
        context,
        holds,
        lambda: f"a queue of {depth}/{capacity} (last seen: {queue()})",
    )


@when("more time than the session TTL passes")
def ttl_passes(context: Any) -> None:
    # an action, not an assertion: the clock must move past ttl_s for the limit to apply
    ttl = float(load_config(context)["sessions"]["ttl_s"])
    time.sleep(ttl + 0.5)
