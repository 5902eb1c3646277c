"""Hostile and careless edits of orch.yaml while the daemon runs, and restarts with a broken
file: each is refused or survived the way a user expects, and the last good state serves."""

from __future__ import annotations

import asyncio
import copy
import logging
import os
import shutil
import subprocess
from typing import Any

import pytest
import yaml

from reconciler import configuring
from state import results
from tests import faults
from tests.conftest import Workspace, config, task, wait_for, wait_terminal

pytestmark = pytest.mark.slow


def _errors(ws: Workspace) -> list[dict[str, Any]]:
    errors: list[dict[str, Any]] = ws.status()["config"]["errors"]
    return errors


def _pool(ws: Workspace, pool_id: str) -> dict[str, Any]:
    return next(p for p in ws.status()["pools"] if p["id"] == pool_id)


async def test_a_device_index_this_machine_lacks_is_a_config_error_and_the_pool_keeps_serving(
    workspace: Workspace, serve: Any
) -> None:
    await serve()
    before = _pool(workspace, "p1")["replicas"][0]["pid"]
    cfg = config()
    cfg["pools"][0]["devices"] = [7]
    workspace.write_config(cfg)
    errors = await wait_for(lambda: _errors(workspace), 10, "the error shown")
    assert errors[0]["field"] == "pools[0].devices[0]" and errors[0]["line"]
    assert "GPU 7 does not exist on this machine (GPUs: 0, 1)" in errors[0]["text"]
    assert _pool(workspace, "p1")["replicas"][0]["pid"] == before
    workspace.submit("still.task.yaml", task("still"))
    assert (await wait_terminal(workspace, "still"))["status"] == "succeeded"
    # with a schema error too: both are shown at once, as `orchctl validate` shows them
    cfg["queue"]["bogus"] = 1
    workspace.write_config(cfg)
    await wait_for(lambda: len(_errors(workspace)) == 2, 10, "both errors shown")
    fields = [e["field"] for e in _errors(workspace)]
    assert fields == ["queue.bogus", "pools[0].devices[0]"], _errors(workspace)


async def test_a_half_written_config_is_not_applied(workspace: Workspace, serve: Any) -> None:
    cfg = config()
    cfg["pools"].append(copy.deepcopy(cfg["pools"][0]) | {"id": "p2"})
    workspace.write_config(cfg)
    await serve()
    p2_pid = _pool(workspace, "p2")["replicas"][0]["pid"]
    text = yaml.safe_dump(cfg, sort_keys=False)
    prefix = text[: text.index("- id: p2")]  # valid YAML that ends before the second pool
    with open(workspace.config_path, "w") as f:  # an editor saving in two writes
        f.write(prefix)
        f.flush()
        os.fsync(f.fileno())
        await asyncio.sleep(0.15)  # the daemon sees the prefix for a while
        f.write(text[len(prefix) :])
    await wait_for(lambda: workspace.status()["config"]["revision"], 5)
    for _ in range(10):  # over a second of passes: p2 never goes away
        assert [p["id"] for p in workspace.status()["pools"]] == ["p1", "p2"]
        assert [r["pid"] for r in _pool(workspace, "p2")["replicas"]] == [p2_pid]
        await asyncio.sleep(0.1)


async def test_a_config_saved_in_steps_further_apart_does_not_fail_the_tasks_it_waits_on(
    workspace: Workspace, serve: Any
) -> None:
    """The first part of a file saved in two steps 0.6 s apart (past the 0.3 s an edit must
    settle) is a valid orch.yaml without its pools: applied, it failed every queued task
    with POOL_UNAVAILABLE. An edit that removes a pool or a model waits longer to settle,
    and the whole file arrives meanwhile."""
    cfg = config()
    cfg["pools"][0].update(slots=1, sim={"tokens_per_s": 20, "load_s": 0.0})
    workspace.write_config(cfg)
    await serve()
    for name in ("busy", "waits"):
        workspace.submit(f"{name}.task.yaml", task(name, max_tokens=20))
    await wait_for(lambda: (workspace.result("waits") or {}).get("status") == "queued", 10)
    text = yaml.safe_dump(cfg, sort_keys=False)
    prefix = text[: text.index("pools:")]  # a whole valid file: models, no pools
    with open(workspace.config_path, "w") as f:
        f.write(prefix)
        f.flush()
        await asyncio.sleep(0.6)  # past the 0.3 s an edit in place used to settle
        f.write(text[len(prefix) :])
    for name in ("busy", "waits"):
        assert (await wait_terminal(workspace, name, 15))["status"] == "succeeded"
    assert [p["id"] for p in workspace.status()["pools"]] == ["p1"]


async def test_a_number_cut_short_by_a_save_in_steps_fails_no_task(
    workspace: Workspace, serve: Any
) -> None:
    """A save in two steps a second apart whose first part ends in `ctx: 204` (of 2048): a
    whole valid file, which applied failed every queued task over the smaller context."""
    cfg = config()
    cfg["pools"][0].update(slots=1, ctx=2048, sim={"tokens_per_s": 20, "load_s": 0.0})
    workspace.write_config(cfg)
    await serve()
    for name in ("busy", "waits"):
        workspace.submit(f"{name}.task.yaml", task(name, max_tokens=20 if name == "busy" else 500))
    await wait_for(lambda: (workspace.result("waits") or {}).get("status") == "queued", 10)
    text = yaml.safe_dump(cfg, sort_keys=False)
    cut = text.index("ctx: 2048") + len("ctx: 204")
    with open(workspace.config_path, "w") as f:
        f.write(text[:cut])
        f.flush()
        await asyncio.sleep(1.0)
        f.write(text[cut:])
    busy = await wait_terminal(workspace, "busy", 15)
    assert busy["status"] == "succeeded", busy
    assert (workspace.result("waits") or {}).get("status") in ("queued", "running", "succeeded")


async def test_a_deleted_then_restored_config_clears_its_error(
    workspace: Workspace, serve: Any
) -> None:
    await serve()
    good = workspace.config_path.read_bytes()
    workspace.config_path.unlink()
    await wait_for(lambda: "cannot be read" in str(_errors(workspace)), 10, "the read error")
    workspace.config_path.mkdir()  # replaced by a directory
    await wait_for(lambda: "not a regular file" in str(_errors(workspace)), 10, "dir error")
    workspace.config_path.rmdir()
    workspace.config_path.write_bytes(good)  # the very same bytes
    await wait_for(lambda: _errors(workspace) == [], 10, "the error cleared")
    (workspace.root / "real.yaml").write_bytes(good)
    workspace.config_path.unlink()
    workspace.config_path.symlink_to(workspace.root / "real.yaml")
    await wait_for(lambda: "is a symlink" in str(_errors(workspace)), 10, "the symlink error")


async def test_a_deleted_config_is_reported_with_how_to_restore_it_and_orchctl_still_works(
    workspace: Workspace, serve: Any
) -> None:
    from tests.orchctl_support import orchctl

    await serve()
    workspace.config_path.unlink()
    await wait_for(lambda: "cannot be read" in str(_errors(workspace)), 10, "the read error")
    hint = _errors(workspace)[0]["hint"]
    assert "git checkout orch.yaml" in hint and ".orch/last-good.yaml" in hint
    # the daemon keeps serving its last good config: orchctl reads its folders from that one
    ran = orchctl("status", "--config", workspace.config_path)
    assert ran.code == 0, ran.err_lines
    assert "orch.yaml not found; using the last config a daemon applied here" in ran.err_lines[0]
    assert any("cannot be read" in line for line in ran.out_lines)
    workspace.submit("after.task.yaml", task("after"))
    assert (await wait_terminal(workspace, "after"))["status"] == "succeeded"
    ran = orchctl("tasks", "--config", workspace.config_path)
    assert ran.code == 0 and any("after" in line for line in ran.out_lines), ran.out_lines
    # put back as a link (into a dotfiles repo, say): refused by the daemon, which keeps its
    # last good config; so do orchctl's verbs, saying why and how to fix it
    (workspace.root / "repo").mkdir()
    (workspace.root / "repo" / "orch.yaml").write_bytes(
        (workspace.root / ".orch" / "last-good.yaml").read_bytes()
    )
    workspace.config_path.symlink_to(workspace.root / "repo" / "orch.yaml")
    await wait_for(lambda: "symlink" in str(_errors(workspace)), 10, "the link refused")
    for verb in ("status", "tasks"):
        ran = orchctl(verb, "--config", workspace.config_path)
        assert ran.code == 0, ran.err_lines
        assert "is a symbolic link" in ran.err_lines[0], ran.err_lines
        assert "using the last config a daemon applied here" in ran.err_lines[0]
        assert "copy the file itself into place" in ran.err_lines[0]
    assert any("after" in line for line in ran.out_lines), ran.out_lines


async def test_a_pool_scaled_to_zero_is_stopped_and_refuses_its_tasks_with_a_hint(
    workspace: Workspace, serve: Any
) -> None:
    cfg = config()
    cfg["pools"][0]["replicas"] = 0
    workspace.write_config(cfg)
    await serve(ready=False)
    await wait_for(lambda: _pool(workspace, "p1")["state"] == "Stopped", 10, "Stopped")
    assert "replicas: 0" in _pool(workspace, "p1")["reason"]
    workspace.submit("z.task.yaml", task("z"))
    result = await wait_terminal(workspace, "z")
    assert result["status"] == "rejected" and result["error"]["code"] == "POOL_UNAVAILABLE"
    assert "replicas: 0" in result["error"]["message"]


async def test_a_restart_with_a_broken_config_serves_the_last_good_one_loudly(
    workspace: Workspace, serve: Any
) -> None:
    first = await serve()
    good_revision = workspace.status()["config"]["revision"]
    await first.stop()
    workspace.config_path.write_text(workspace.config_path.read_text() + "\nbogus: [\n")
    shutil.rmtree(workspace.root / ".orch" / "engines", ignore_errors=True)
    await serve()
    status = workspace.status()
    assert status["config"]["revision"] == good_revision
    assert status["config"]["errors"] and status["config"]["errors"][0]["line"]
    workspace.submit("ok.task.yaml", task("ok"))
    assert (await wait_terminal(workspace, "ok"))["status"] == "succeeded"


async def test_a_last_good_copy_that_cannot_be_kept_is_warned_of_and_not_misdescribed(
    workspace: Workspace, serve: Any, caplog: pytest.LogCaptureFixture
) -> None:
    first = await serve()
    await first.stop()
    orch = workspace.root / ".orch"
    (orch / "last-good.yaml").unlink()
    (orch / "last-good.yaml").mkdir()  # in the way
    caplog.set_level("INFO", logger="llama_orch")
    await serve()
    said = [
        r for r in caplog.records if getattr(r, "orch_event", "") == "config.last_good_unwritable"
    ]
    assert said and said[0].levelname == "WARNING", said
    assert "remove what is in the way" in said[0].getMessage()
    assert not (orch / "last-good.yaml.json").exists()  # no record of a copy not there


@pytest.mark.slow
def test_orchctl_serve_starts_on_a_broken_config_when_a_last_good_one_is_kept(
    workspace: Workspace,
) -> None:
    """The CLI checked orch.yaml itself and exited 2 before the daemon could fall back on
    .orch/last-good.yaml, so an edit broken while the daemon was down kept it down."""
    log = workspace.root / "daemon.log"
    assert faults.serve(workspace, log, "--duration", "1").wait(timeout=60) == 0
    workspace.config_path.write_text("pools: [ {id: p1, engine: nope\n")  # saved half-way
    workspace.submit("ok.task.yaml", task("ok"))
    daemon = faults.serve(workspace, log, "--exit-when-idle")
    assert daemon.wait(timeout=60) == 0
    assert (workspace.result("ok") or {}).get("status") == "succeeded"
    # placed where the unclosed bracket opens, not on a line past the file's last
    assert workspace.status()["config"]["errors"][0]["line"] == 1
    assert "orch.yaml:1:10: is not valid YAML/JSON: the file ends before the { mapping" in (
        log.with_suffix(".stderr").read_text()
    )


async def test_a_config_renamed_into_place_is_applied_without_the_settle_wait(
    workspace: Workspace, serve: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An atomic save (a temporary file renamed onto orch.yaml) is whole the moment it
    appears, so it is applied at once; a file written in place still waits to settle."""
    monkeypatch.setattr(configuring, "SETTLE_S", 30.0)  # far longer than the test waits
    await serve()
    cfg = config()
    cfg["pools"].append(copy.deepcopy(cfg["pools"][0]) | {"id": "p2"})
    staged = workspace.config_path.with_name(".orch.yaml.new")
    staged.write_text(yaml.safe_dump(cfg, sort_keys=False))
    os.replace(staged, workspace.config_path)
    await wait_for(
        lambda: [p["id"] for p in workspace.status()["pools"]] == ["p1", "p2"], 5, "p2 applied"
    )
    cfg["pools"] = cfg["pools"][:1]
    workspace.config_path.write_text(yaml.safe_dump(cfg, sort_keys=False))  # in place
    await asyncio.sleep(1.0)
    assert [p["id"] for p in workspace.status()["pools"]] == ["p1", "p2"]


@pytest.mark.parametrize(
    ("where", "value"),
    [
        (("paths", "spool"), "spool-new"),
        (("server", "bind"), "127.0.0.1:1"),
        (("gpus", "inventory"), "one-gpu.yaml"),
        (("gpus", "observer"), "nvml"),
        (("auth", "optional_on_loopback"), False),
        (("server", "public_url"), "https://llm.example.net"),
    ],
)
async def test_an_edit_of_what_is_read_at_start_waits_for_a_restart_and_says_so(
    workspace: Workspace, serve: Any, where: tuple[str, str], value: object
) -> None:
    await serve()
    applied = workspace.status()["config"]["revision"]
    cfg = config()
    before = cfg.get(where[0], {}).get(where[1])
    cfg.setdefault(where[0], {})[where[1]] = value
    cfg["queue"]["capacity"] = 7  # another change in the same edit: it waits too
    workspace.write_config(cfg)
    await wait_for(lambda: _errors(workspace), 10, "the edit's error")
    [error] = _errors(workspace)
    assert error["field"] == ".".join(where) and error["line"]
    assert "read only when the daemon starts" in error["text"] and "restart" in error["text"]
    # in orch.yaml's own spelling (true, "text"), not Python's (True, 'text')
    assert "True" not in error["text"] and "False" not in error["text"], error["text"]
    if value is False:
        assert "to false while" in error["text"], error["text"]
    assert workspace.status()["config"]["revision"] == applied
    workspace.submit("old-spool.task.yaml", task("old-spool"))  # the folders in use still work
    assert (await wait_terminal(workspace, "old-spool"))["status"] == "succeeded"
    if before is None:  # the value put back: the rest is applied
        del cfg[where[0]][where[1]]
    else:
        cfg[where[0]][where[1]] = before
    workspace.write_config(cfg)
    await wait_for(lambda: _errors(workspace) == [], 10, "the error cleared")
    assert workspace.status()["config"]["revision"] != applied


def _status_of(ws: Workspace, task_id: str) -> str | None:
    return (ws.result(task_id) or {}).get("status")


async def test_queued_tasks_an_edit_leaves_unservable_fail_saying_what_changed(
    workspace: Workspace, serve: Any
) -> None:
    """Tasks wait for a pool still loading; then orch.yaml lowers its ctx, caps its max_tokens
    and renames it. Each queued task that no longer fits fails at once, saying which limit
    and that orch.yaml changed; the others keep waiting."""
    cfg = config()
    cfg["pools"][0]["sim"] = {"tokens_per_s": 400, "load_s": 60.0}  # never Ready here
    workspace.write_config(cfg)
    await serve(ready=False)
    workspace.submit("big.task.yaml", task("big", max_tokens=1500))
    workspace.submit("small.task.yaml", task("small", max_tokens=4))
    workspace.submit("pinned.task.yaml", task("pinned", model=None, pool="p1", max_tokens=2))
    for task_id in ("big", "small", "pinned"):
        await wait_for(lambda t=task_id: _status_of(workspace, t) == "queued", 10, task_id)

    cfg["pools"][0]["ctx"] = 1024
    workspace.write_config(cfg)
    big = await wait_terminal(workspace, "big", 10)
    assert big["status"] == "failed" and big["error"]["code"] == "INVALID_PARAMS"
    assert "exceed the context of 1024 tokens" in big["error"]["message"]
    assert big["error"]["message"].endswith("(orch.yaml changed while the task waited)")

    cfg["pools"][0]["max_tokens"] = 3
    workspace.write_config(cfg)
    small = await wait_terminal(workspace, "small", 10)
    assert small["error"]["code"] == "INVALID_PARAMS"
    assert "max_tokens: 4 is over the pool limit 3" in small["error"]["message"]

    assert _status_of(workspace, "pinned") == "queued"  # it still fits
    cfg["pools"][0]["id"] = "p2"
    workspace.write_config(cfg)
    pinned = await wait_terminal(workspace, "pinned", 10)
    assert pinned["status"] == "failed" and pinned["error"]["code"] == "INVALID_PARAMS"
    assert "pool: 'p1' is not in orch.yaml any more" in pinned["error"]["message"]
    assert pinned["error"]["hint"] == "submit it again naming one of: p2"


def _burst(ws: Workspace, prefix: str, n: int, max_tokens: int) -> None:
    """`n` task files written into spool/tmp, then renamed into incoming/ in one tight loop:
    they land at once, and one claim takes them all."""
    sp = ws.spool
    staged = []
    for i in range(n):
        part = sp.tmp / f"{prefix}{i}.part"
        part.write_text(yaml.safe_dump(task(f"{prefix}{i}", max_tokens=max_tokens)))
        staged.append((part, sp.incoming / f"{prefix}{i}.task.yaml"))
    for part, target in staged:
        os.rename(part, target)


async def test_a_burst_larger_than_the_queue_runs_whole_on_idle_slots(
    workspace: Workspace, serve: Any
) -> None:
    """Three tasks land at once on an idle replica with three slots and a queue of two: none
    of them would wait, so none is refused as if the queue were full."""
    cfg = config(queue={"capacity": 2, "full_policy": "reject"})
    cfg["pools"][0]["slots"] = 3
    workspace.write_config(cfg)
    await serve()
    _burst(workspace, "b", 3, max_tokens=4)
    for i in range(3):
        result = await wait_terminal(workspace, f"b{i}", 10)
        assert result["status"] == "succeeded", result


async def test_a_burst_fills_the_idle_slots_and_then_the_queue_before_any_is_refused(
    workspace: Workspace, serve: Any
) -> None:
    """Five tasks land at once on two idle slots and a queue of two: two start, two wait,
    one is refused; the tasks that start at once never held a place in the queue."""
    cfg = config(queue={"capacity": 2, "full_policy": "reject"})
    cfg["pools"][0] |= {"slots": 2, "sim": {"tokens_per_s": 40, "load_s": 0.0}}
    workspace.write_config(cfg)
    await serve()
    _burst(workspace, "c", 5, max_tokens=20)
    results = [await wait_terminal(workspace, f"c{i}", 20) for i in range(5)]
    statuses = sorted(r["status"] for r in results)
    assert statuses == ["rejected", "succeeded", "succeeded", "succeeded", "succeeded"], results


async def test_drop_lru_in_a_burst_evicts_a_task_that_would_wait_not_one_that_starts(
    workspace: Workspace, serve: Any
) -> None:
    """Eight tasks land at once on four idle slots and a drop-lru queue of two: the four
    first start, and the evicted ones are tasks that would have waited, never those."""
    cfg = config(queue={"capacity": 2, "full_policy": "drop-lru"})
    cfg["pools"][0] |= {"slots": 4, "sim": {"tokens_per_s": 40, "load_s": 0.0}}
    workspace.write_config(cfg)
    await serve()
    _burst(workspace, "d", 8, max_tokens=20)
    results = {f"d{i}": await wait_terminal(workspace, f"d{i}", 20) for i in range(8)}
    for i in range(4):
        assert results[f"d{i}"]["status"] == "succeeded", results[f"d{i}"]
    evicted = [t for t, r in results.items() if r["status"] == "failed"]
    assert len(evicted) == 2 and all(
        results[t]["error"]["code"] == "QUEUE_FULL_DROP_LRU" for t in evicted
    )


async def test_a_task_whose_pool_went_while_the_daemon_was_down_fails_not_rejected(
    workspace: Workspace, serve: Any
) -> None:
    """It was accepted before the restart: it ends `failed`, as it would have with the
    daemon running, not `rejected` as a task refused at its admission."""
    cfg = config()
    cfg["pools"][0]["sim"] = {"tokens_per_s": 400, "load_s": 60.0}
    workspace.write_config(cfg)
    running = await serve(ready=False)
    workspace.submit("w.task.yaml", task("w", model=None, pool="p1"))
    await wait_for(lambda: _status_of(workspace, "w") == "queued", 10, "queued")
    await running.stop()
    cfg["pools"][0]["id"] = "p2"
    workspace.write_config(cfg)
    await serve(ready=False)
    result = await wait_terminal(workspace, "w", 10)
    assert result["status"] == "failed" and result["error"]["code"] == "INVALID_PARAMS"
    assert "pool: 'p1' is not in orch.yaml" in result["error"]["message"]


async def test_the_daemon_hints_a_broken_edit_as_validate_does(
    workspace: Workspace, serve: Any
) -> None:
    await serve()
    for change, hint in [
        (
            lambda c: c["pools"][0].update(model="bigg"),
            "add it under models:, or name one of those",
        ),
        (lambda c: c["pools"].append(copy.deepcopy(c["pools"][0])), "give every pool its own id"),
        (lambda c: c["pools"][0].update(devices=[1, 1]), "list each GPU index once"),
    ]:
        cfg = config()
        change(cfg)
        workspace.write_config(cfg)
        await wait_for(lambda h=hint: [e["hint"] for e in _errors(workspace)] == [h], 10, hint)


@pytest.mark.parametrize(
    ("edit", "field", "words"),
    [
        ({"sessions": {"ttl_s": "600"}}, "sessions.ttl_s", "valid number"),
        ({"sessions": {"ttl_s": 1e300}}, "sessions.ttl_s", "less than or equal to 31536000"),
        ({"queue": {"capacity": True}}, "queue.capacity", "valid integer"),
        ({"timeouts": {"drain_s": 1e9}}, "timeouts.drain_s", "less than or equal to 86400"),
    ],
)
def test_config_values_are_taken_as_written_and_within_sane_bounds(
    tmp_path: Any, edit: dict[str, Any], field: str, words: str
) -> None:
    """A quoted number or a boolean is not converted, and a value no one means (a session
    living 1e300 s) is refused: its numbers would reach results and answers."""
    from state import desired

    path = tmp_path / "orch.yaml"
    path.write_text(yaml.safe_dump(config(**edit)))
    (tmp_path / "inventory.yaml").write_text("gpus: []\n")
    loaded = desired.load_desired(path)
    assert loaded.value is None
    assert [(e.field, words in e.message) for e in loaded.errors] == [(field, True)], loaded.errors


async def test_a_max_tokens_edit_keeps_the_replicas_and_their_running_tasks(
    workspace: Workspace, serve: Any
) -> None:
    """max_tokens is an admission limit no engine is started with: raising it while a task
    runs neither restarts the replica nor ends the task, and the new limit admits at once."""
    cfg = config()
    cfg["pools"][0]["max_tokens"] = 100
    cfg["pools"][0]["sim"] = {"tokens_per_s": 40, "load_s": 0.0}
    workspace.write_config(cfg)
    await serve()
    pid = _pool(workspace, "p1")["replicas"][0]["pid"]
    workspace.submit("long.task.yaml", task("long", max_tokens=90))
    await wait_for(lambda: _status_of(workspace, "long") == "running", 10, "long running")
    revision = workspace.status()["config"]["revision"]
    cfg["pools"][0]["max_tokens"] = 150
    workspace.write_config(cfg)
    await wait_for(
        lambda: workspace.status()["config"]["revision"] != revision, 10, "the edit applied"
    )
    workspace.submit("bigger.task.yaml", task("bigger", max_tokens=120))
    long, bigger = (
        await wait_terminal(workspace, "long", 20),
        await wait_terminal(workspace, "bigger", 20),
    )
    assert long["status"] == "succeeded" and long["tokens_out"] == 90, long
    assert bigger["status"] == "succeeded", bigger
    assert [r["pid"] for r in _pool(workspace, "p1")["replicas"]] == [pid]


async def test_retiring_a_model_unloads_its_pools_and_fails_its_queued_tasks(
    workspace: Workspace, serve: Any
) -> None:
    import aiohttp

    cfg = config()
    cfg["pools"][0] |= {"slots": 1, "sim": {"tokens_per_s": 20, "load_s": 0.0}}
    workspace.write_config(cfg)
    running = await serve()
    workspace.submit("busy.task.yaml", task("busy", max_tokens=40))
    await wait_for(lambda: _status_of(workspace, "busy") == "running", 10, "busy running")
    workspace.submit("waits.task.yaml", task("waits", max_tokens=2))
    await wait_for(lambda: _status_of(workspace, "waits") == "queued", 10, "waits queued")
    cfg["models"]["m1"]["state"] = "Retired"
    workspace.write_config(cfg)
    waits = await wait_terminal(workspace, "waits", 10)
    assert waits["status"] == "failed" and waits["error"]["code"] == "MODEL_RETIRED"
    assert waits["error"]["message"].endswith("(orch.yaml changed while the task waited)")
    busy = await wait_terminal(workspace, "busy", 10)  # the running task finishes its drain
    assert busy["status"] == "succeeded", busy
    await wait_for(lambda: _pool(workspace, "p1")["replicas"] == [], 10, "the pool unloaded")
    pool = _pool(workspace, "p1")
    assert pool["state"] == "Stopped" and "model m1 is Retired" in pool["reason"]
    async with (
        aiohttp.ClientSession() as session,
        session.get(f"{running.daemon.server.url}/v1/models/m1") as r,
    ):
        model = await r.json()
    assert (model["state"], model["ready"]) == ("Retired", False)


async def test_a_removed_pools_draining_replicas_stay_in_status_until_gone(
    workspace: Workspace, serve: Any
) -> None:
    """Renaming a pool drains the old one's replicas: status keeps showing them (what holds
    the GPU, which slots are busy) until they are gone."""
    cfg = config()
    cfg["pools"][0] |= {"slots": 1, "sim": {"tokens_per_s": 20, "load_s": 0.0}}
    workspace.write_config(cfg)
    await serve()
    workspace.submit("long.task.yaml", task("long", max_tokens=40))
    await wait_for(lambda: _status_of(workspace, "long") == "running", 10, "long running")
    cfg["pools"][0]["id"] = "renamed"
    workspace.write_config(cfg)
    await wait_for(
        lambda: "renamed" in [p["id"] for p in workspace.status()["pools"]], 10, "the edit"
    )
    old = _pool(workspace, "p1")
    assert old["state"] == "Stopped" and "not in orch.yaml any more" in old["reason"]
    [replica] = old["replicas"]
    assert replica["slots_busy"] == 1 and replica["state"] in ("Ready", "Draining"), replica
    assert (await wait_terminal(workspace, "long", 15))["status"] == "succeeded"
    await wait_for(
        lambda: [p["id"] for p in workspace.status()["pools"]] == ["renamed"], 15, "p1 gone"
    )


async def test_a_pool_moved_to_a_gpu_it_cannot_fit_keeps_serving_where_it_was(
    workspace: Workspace, serve: Any
) -> None:
    """Moving a pool (devices) to a GPU too small for it must not take its working replica
    down for a placement that cannot be met: it serves on as before, and says why."""
    cfg = config()
    cfg["models"]["m1"]["size_mib"] = 14000  # fits the 24 GB GPU 0, not the 12 GB GPU 1
    workspace.write_config(cfg)
    await serve()
    before = _pool(workspace, "p1")["replicas"]
    assert [r["gpu"] for r in before] == [[0]], before
    cfg["pools"][0]["devices"] = [1]
    workspace.write_config(cfg)
    await wait_for(lambda: "serving as before" in (_pool(workspace, "p1")["reason"] or ""), 10)
    pool = _pool(workspace, "p1")
    assert pool["state"] == "Ready", pool
    assert "the new placement cannot be met: needs" in pool["reason"] and "GPU 1" in pool["reason"]
    assert [(r["id"], r["pid"]) for r in pool["replicas"]] == [(r["id"], r["pid"]) for r in before]
    workspace.submit("still.task.yaml", task("still"))
    assert (await wait_terminal(workspace, "still"))["status"] == "succeeded"


@pytest.mark.parametrize("edit", ["removed", "scaled to zero"])
async def test_a_queued_task_whose_pool_an_edit_takes_away_fails_saying_orch_yaml_changed(
    workspace: Workspace, serve: Any, edit: str
) -> None:
    cfg = config()
    cfg["pools"][0] |= {"slots": 1, "sim": {"tokens_per_s": 20, "load_s": 0.0}}
    workspace.write_config(cfg)
    await serve()
    workspace.submit("busy.task.yaml", task("busy", max_tokens=40))
    await wait_for(lambda: _status_of(workspace, "busy") == "running", 10, "busy running")
    pinned = task("pinned", max_tokens=2)
    del pinned["model"]
    pinned["pool"] = "p1"
    workspace.submit("pinned.task.yaml", pinned)
    workspace.submit("by-model.task.yaml", task("by-model", max_tokens=2))
    for name in ("pinned", "by-model"):
        await wait_for(lambda n=name: _status_of(workspace, n) == "queued", 10, f"{name} queued")
    if edit == "removed":
        cfg["pools"] = []
    else:
        cfg["pools"][0]["replicas"] = 0
    workspace.write_config(cfg)
    for name in ("pinned", "by-model"):
        result = await wait_terminal(workspace, name, 10)
        assert result["status"] == "failed", result
        assert result["error"]["message"].endswith("(orch.yaml changed while the task waited)")


async def test_tasks_left_in_the_old_spool_after_paths_spool_changed_are_said_so(
    workspace: Workspace, serve: Any, caplog: pytest.LogCaptureFixture
) -> None:
    """paths.spool is read at the start only: changed while the daemon was stopped, the
    tasks still waiting in the old spool were stranded without a word."""
    cfg = config()
    workspace.write_config(cfg)
    running = await serve()
    await running.stop()
    for name in ("left1", "left2", "was-running"):
        workspace.submit(f"{name}.task.yaml", task(name))  # into the old spool, no daemon
    old = workspace.spool
    # one running when its daemon died: in active/, its result saying running
    (old.incoming / "was-running.task.yaml").rename(old.active / "was-running.task.yaml")
    running_result = results.Result(
        task_id="was-running", status="running", source_file="spool/active/was-running.task.yaml"
    )
    (workspace.root / "results").mkdir(exist_ok=True)
    (workspace.root / "results" / "was-running.json").write_text(running_result.model_dump_json())
    cfg["paths"] = {"spool": "spool2"}
    workspace.write_config(cfg)
    with caplog.at_level(logging.WARNING):
        await serve()
    said = [r.getMessage() for r in caplog.records if "wait in" in r.getMessage()]
    assert said and said[0].startswith(f"3 task file(s) wait in {old.root}"), said
    # the command it gives hands every one of them over as it is
    command = said[0].split("To run them: ", 1)[1]
    ran = subprocess.run(["bash", "-c", command], capture_output=True, text=True, check=False)
    assert ran.returncode == 0, ran.stderr
    for name in ("left1", "left2", "was-running"):
        assert (await wait_terminal(workspace, name, 15))["status"] == "succeeded", name


async def test_a_drain_s_raised_during_a_drain_gives_its_running_task_longer(
    workspace: Workspace, serve: Any
) -> None:
    """A spec edit drains the replica a long task runs on, drain_s 1; raised to 30 while
    the drain waits, it lets the task finish, as the hint of a task cut short by a drain
    ("raise timeouts.drain_s") promises."""
    cfg = config()
    cfg["timeouts"]["drain_s"] = 1
    cfg["pools"][0].update(slots=1, sim={"tokens_per_s": 20, "load_s": 0.0})
    workspace.write_config(cfg)
    await serve()
    workspace.submit("long.task.yaml", task("long", max_tokens=50))
    await wait_for(lambda: (workspace.result("long") or {}).get("status") == "running", 10)
    cfg["pools"][0]["ctx"] = 1024  # a new spec: the replica the task runs on drains
    workspace.write_config(cfg)
    await asyncio.sleep(0.3)
    cfg["timeouts"]["drain_s"] = 30
    workspace.write_config(cfg)
    done = await wait_terminal(workspace, "long", 15)
    assert done["status"] == "succeeded" and done["tokens_out"] == 50, done
