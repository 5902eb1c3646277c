"""Pool control: draining a pool on request (kept across restarts, lifted by a reload or a
config change) and reloading it onto another model by editing orch.yaml in place, with the
old file put back byte for byte when the new replica does not become Ready."""

from __future__ import annotations

import asyncio
import difflib
import hashlib
import json
import time
from typing import Any

import aiohttp
import pytest
import yaml

from reconciler import editing, specs
from state import desired, drains
from tests.conftest import Workspace, config, task, wait_for, wait_terminal

GOOD = b"GGUF weights, version 1"
DIGEST = "sha256:" + hashlib.sha256(GOOD).hexdigest()

ORCH_YAML = """\
# The test workstation. The daemon edits this file on reload; keep the comments.
version: 1
server: {bind: "127.0.0.1:0"}   # any free port
gpus: {observer: simulated, inventory: inventory.yaml, reserve_mib: 512}
queue: {capacity: 16, full_policy: reject}
timeouts: {ready_s: 10, drain_s: 5, stop_grace_s: 2}

models:
  m1:
    ref: "file:m1.gguf"     # the first weights
    size_mib: 1000
  m2: {ref: "file:m2.gguf", size_mib: 1000}   # another model

pools:
  - id: p1
    engine: sim
    model: m1               # what a reload changes
    ctx: 2048
    slots: 2
    sim: {tokens_per_s: 400, load_s: 0}
"""


# -- editing orch.yaml ----------------------------------------------------------------------


def _changed(old: str, new: str) -> list[str]:
    return [
        line
        for line in difflib.unified_diff(old.splitlines(), new.splitlines(), lineterm="", n=0)
        if line[:1] in "+-" and not line.startswith(("+++", "---"))
    ]


def test_an_edit_changes_one_line_and_keeps_comments_quotes_and_layout() -> None:
    new = editing.set_model_ref(ORCH_YAML, "m1", "file:m1-v2.gguf")
    assert _changed(ORCH_YAML, new) == [
        '-    ref: "file:m1.gguf"     # the first weights',
        '+    ref: "file:m1-v2.gguf"  # the first weights',
    ]
    flow = editing.set_model_ref(ORCH_YAML, "m2", "file:m2-v2.gguf")
    assert [line[:1] for line in _changed(ORCH_YAML, flow)] == ["-", "+"]
    assert '  m2: {ref: "file:m2-v2.gguf", size_mib: 1000}' in flow
    model = editing.set_pool_model(ORCH_YAML, "p1", "m2")
    assert _changed(ORCH_YAML, model)[1].startswith("+    model: m2")
    assert editing.set_pool_model(ORCH_YAML, "p1", "m1") == ORCH_YAML  # nothing to change


@pytest.mark.parametrize(
    "text",
    [
        "version: 1\nmodels:\n    m1:\n        ref: a\npools:\n    -   id: p\n        model: m1\n",
        "version: 1\nmodels:\n  m1: {ref: a}\npools:\n- id: p\n  model: m1\n",
    ],
)
def test_other_common_layouts_are_kept_too(text: str) -> None:
    new = editing.set_model_ref(text, "m1", "b")
    assert len(_changed(text, new)) == 2 and new.replace("ref: b", "ref: a") == text


@pytest.mark.parametrize(
    ("ref", "shown"),
    [
        ('file:models/a"b.gguf', 'ref: "file:models/a\\"b.gguf"'),
        ("file:it's.gguf", 'ref: "file:it\'s.gguf"'),
    ],
)
def test_a_ref_that_needs_escaping_is_written_escaped(ref: str, shown: str) -> None:
    new = editing.set_model_ref(ORCH_YAML, "m1", ref)
    assert len(_changed(ORCH_YAML, new)) == 2 and shown in new
    assert yaml.safe_load(new)["models"]["m1"]["ref"] == ref
    single = ORCH_YAML.replace('ref: "file:m1.gguf"', "ref: 'file:m1.gguf'")
    new = editing.set_model_ref(single, "m1", ref)
    assert yaml.safe_load(new)["models"]["m1"]["ref"] == ref


def test_an_edit_that_would_reformat_the_file_is_refused() -> None:
    with pytest.raises(editing.EditRefused, match="by hand"):
        editing.set_model_ref(ORCH_YAML.replace("\n", "\r\n"), "m1", "file:x.gguf")
    with pytest.raises(editing.EditRefused, match="no pool 'p9'"):
        editing.set_pool_model(ORCH_YAML, "p9", "m2")


@pytest.mark.parametrize("indent", [2, 4, None])
def test_an_orch_yaml_written_as_json_is_edited_as_json_in_its_layout(indent: int | None) -> None:
    data = yaml.safe_load(ORCH_YAML)
    text = json.dumps(data, indent=indent) + "\n"
    new = editing.set_pool_model(text, "p1", "m2")
    assert json.loads(new)["pools"][0]["model"] == "m2"
    assert new.replace('"model": "m2"', '"model": "m1"') == text  # that value, nothing else
    hand = text.replace('"version": 1', '"version":   1')  # no json.dumps layout
    with pytest.raises(editing.EditRefused, match="JSON in a layout"):
        editing.set_pool_model(hand, "p1", "m2")


def test_a_drained_pool_is_stopped_whatever_its_replicas_do() -> None:
    pool = desired.PoolSpec(id="p1", engine="sim", model="m1")
    brief = specs.ReplicaBrief("p1-0", "Ready", None)
    state, reason = specs.pool_condition(
        pool, [brief], problem=None, unschedulable=None, waiting=False, drained="on request"
    )
    assert (state, reason) == ("Stopped", "on request")


def test_a_failed_pool_whose_replica_gave_no_error_says_so_not_none() -> None:
    pool = desired.PoolSpec(id="p1", engine="sim", model="m1")
    brief = specs.ReplicaBrief("p1-0", "Failed", None, restarts=3)
    state, reason = specs.pool_condition(
        pool, [brief], problem=None, unschedulable=None, waiting=False
    )
    assert state == "Failed" and reason is not None
    assert reason.startswith("replica p1-0 failed; it failed too often to be restarted")


def test_a_replica_given_up_at_once_is_not_said_to_have_failed_too_often() -> None:
    """A wrong digest (or a missing binary) fails the replica without a restart: its pool's
    reason must not claim a circuit breaker tripped by failures it never had."""
    pool = desired.PoolSpec(id="p1", engine="sim", model="m1")
    why = "UNTRUSTED_ARTIFACT: m1.gguf has digest sha256:ab, orch.yaml pins sha256:cd"
    brief = specs.ReplicaBrief("p1-0", "Failed", why, restarts=0)
    _, reason = specs.pool_condition(pool, [brief], problem=None, unschedulable=None, waiting=False)
    assert reason is not None and "failed too often" not in reason
    assert reason.startswith(f"{why}; it is not restarted, as restarting cannot fix this")


# -- over HTTP -------------------------------------------------------------------------------


def _url(running: Any) -> str:
    return str(running.daemon.server.url)


def _pool(ws: Workspace, pool_id: str = "p1") -> dict[str, Any]:
    found: dict[str, Any] = next(p for p in ws.status()["pools"] if p["id"] == pool_id)
    return found


def _ready(ws: Workspace) -> bool:
    pool = _pool(ws)
    return (
        pool["state"] == "Ready"
        and not pool["reason"]
        and bool(pool["replicas"])
        and all(r["state"] == "Ready" for r in pool["replicas"])
    )


async def _fill_both_slots(ws: Workspace) -> None:
    """Two 40-token tasks running on p1's two slots: what is sent next waits in the queue."""
    for name in ("busy-1", "busy-2"):
        ws.submit(f"{name}.task.yaml", task(name, max_tokens=40))
    await wait_for(
        lambda: all((ws.result(n) or {}).get("status") == "running" for n in ("busy-1", "busy-2")),
        10,
        "both slots busy",
    )


def _ready_pool(ws: Workspace, pool_id: str) -> bool:
    pool = _pool(ws, pool_id)
    return pool["state"] == "Ready" and all(r["state"] == "Ready" for r in pool["replicas"])


def _stopped(ws: Workspace) -> bool:
    pool = _pool(ws)
    return pool["state"] == "Stopped" and not pool["replicas"]


@pytest.mark.slow
async def _draining_with_a_long_task(workspace: Workspace, serve: Any, *, deadline_ms: int) -> Any:
    """A daemon running task `long` (about 20 s) on pool p1, which is being drained."""
    workspace.config_path.write_text(ORCH_YAML.replace("tokens_per_s: 400", "tokens_per_s: 10"))
    running = await serve()
    workspace.submit("long.task.yaml", task("long", max_tokens=200))
    await wait_for(lambda: (workspace.result("long") or {}).get("status") == "running", 10)
    async with (
        aiohttp.ClientSession() as session,
        session.post(f"{_url(running)}/v1/pools/p1/drain", json={"deadline_ms": deadline_ms}) as r,
    ):
        assert r.status == 202
    return running


async def test_a_task_outlasting_its_replicas_drain_fails_at_once_saying_so(
    workspace: Workspace, serve: Any
) -> None:
    """A drain gives running tasks its deadline, then stops the replica. A task still
    running then ends at once as WORKER_RESET naming the drain, not after a minute of
    silence as a stalled engine (closing the connections left its read blocked)."""
    await _draining_with_a_long_task(workspace, serve, deadline_ms=300)
    result = await wait_terminal(workspace, "long", 10)
    assert result["status"] == "failed" and result["error"]["code"] == "WORKER_RESET"
    assert "was stopped while the task ran" in result["error"]["message"]
    assert "drained" in result["error"]["hint"] and result["error"]["retriable"]


@pytest.mark.slow
async def test_a_task_running_when_the_daemon_died_mid_drain_ends_retriable(
    workspace: Workspace, serve: Any, tmp_path_factory: pytest.TempPathFactory
) -> None:
    """The daemon killed while a drain let a task finish: the restarted daemon cannot run
    it on the drained pool again, and ends it as the drain would have (WORKER_RESET, send
    it again), not as a task the pool refused (POOL_UNAVAILABLE)."""
    import shutil

    running = await _draining_with_a_long_task(workspace, serve, deadline_ms=20000)
    await asyncio.sleep(0.3)
    # what a SIGKILL leaves now: the files as they are (no engine of the copy's own)
    crashed = Workspace(tmp_path_factory.mktemp("crashed"))
    shutil.copytree(workspace.root, crashed.root, dirs_exist_ok=True)
    shutil.rmtree(crashed.root / ".orch" / "engines", ignore_errors=True)
    (crashed.root / ".orch" / "status.json").unlink(missing_ok=True)
    assert (crashed.root / "spool" / "active" / "long.task.yaml").exists()
    assert set(drains.load(crashed.root / ".orch")) == {"p1"}
    running.daemon.hurry_event.set()
    await running.stop()
    from reconciler import daemon as daemons

    restarted = daemons.build(daemons.Options(config_path=crashed.config_path, resync_s=0.5))
    job = asyncio.get_running_loop().create_task(restarted.run())
    try:
        ended = await wait_terminal(crashed, "long", 15)
    finally:
        restarted.stop()
        await asyncio.wait_for(job, 20)
    assert ended["status"] == "failed" and ended["error"]["code"] == "WORKER_RESET", ended
    assert ended["error"]["retriable"] and "drained on request" in ended["error"]["message"]
    assert ended["error"]["hint"] == (
        "submit it again; POST /v1/pools/p1/reload serves the pool again"
    )


@pytest.mark.slow
async def test_a_drained_pool_stays_down_across_restarts_until_a_reload(
    workspace: Workspace, serve: Any
) -> None:
    running = await serve()
    base = _url(running)
    async with aiohttp.ClientSession() as session:
        url = f"{base}/v1/pools/p1/drain"
        async with session.post(url, json={"deadline_ms": 1000}) as response:
            assert response.status == 202
            answer = await response.json()
        assert answer["pool_id"] == "p1" and answer["deadline_ms"] == 1000
        assert answer["replicas"] == ["p1-0"]
        await wait_for(lambda: _stopped(workspace), 10, "p1 drained")
        assert "drained on request" in _pool(workspace)["reason"]
        async with session.post(url, json={"deadline_ms": 5}) as response:
            assert response.status == 200  # drained already: the first request stands
            assert (await response.json())["deadline_ms"] == 1000
        async with session.post(f"{base}/v1/tasks", json=task("while-drained")) as response:
            body = await response.json()
            assert response.status == 503 and body["code"] == "POOL_UNAVAILABLE"
        assert "drained on request" in body["message"]
        assert body["hint"] == "bring it back with POST /v1/pools/p1/reload (no body needed)"
        for path, payload, status in [
            ("/v1/pools/p9/drain", {}, 404),
            ("/v1/pools/p1/drain", {"deadline_ms": -1}, 400),
            ("/v1/pools/p1/drain", {"deadline": 5}, 400),
        ]:
            async with session.post(base + path, json=payload) as response:
                assert response.status == status
    assert set(drains.load(workspace.root / ".orch")) == {"p1"}

    await running.stop()  # a restarted daemon keeps the pool drained
    running = await serve(ready=False)
    await wait_for(lambda: workspace.status()["daemon"]["url"], 10, "the new daemon")
    await wait_for(lambda: _pool(workspace)["state"] == "Stopped", 10, "p1 still drained")
    base = _url(running)
    async with aiohttp.ClientSession() as session:
        async with session.post(f"{base}/v1/pools/p1/reload", json={}) as response:
            answer = await response.json()
            assert response.status == 200, answer
        assert answer["changed"] is False and answer["replicas"] == ["p1-0"]
        assert _ready(workspace)
        async with session.post(f"{base}/v1/tasks", json=task("after")) as response:
            assert response.status == 202
    await wait_terminal(workspace, "after")
    assert drains.load(workspace.root / ".orch") == {}


@pytest.mark.slow
async def test_a_config_change_of_the_pool_lifts_its_drain(
    workspace: Workspace, serve: Any
) -> None:
    base = _url(await serve())
    async with (
        aiohttp.ClientSession() as session,
        session.post(f"{base}/v1/pools/p1/drain") as response,
    ):
        assert response.status == 202
    await wait_for(lambda: _stopped(workspace), 10, "p1 drained")
    cfg = config()
    cfg["pools"][0]["ctx"] = 4096
    workspace.write_config(cfg)
    await wait_for(lambda: _ready(workspace), 10, "p1 back on its new config")
    assert drains.load(workspace.root / ".orch") == {}


@pytest.mark.slow
async def test_a_reload_edits_only_the_ref_line_and_waits_for_the_new_replica(
    workspace: Workspace, serve: Any
) -> None:
    workspace.config_path.write_text(ORCH_YAML)
    base = _url(await serve())
    old_pid = _pool(workspace)["replicas"][0]["pid"]
    async with aiohttp.ClientSession() as session:
        url = f"{base}/v1/pools/p1/reload"
        async with session.post(url, json={"model_ref": "file:m1-v2.gguf"}) as response:
            answer = await response.json()
            assert response.status == 200, answer
    text = workspace.config_path.read_text()
    assert _changed(ORCH_YAML, text) == [
        '-    ref: "file:m1.gguf"     # the first weights',
        '+    ref: "file:m1-v2.gguf"  # the first weights',
    ]
    assert answer["revision"] == desired.revision_hash(text.encode())
    assert answer["previous_revision"] == desired.revision_hash(ORCH_YAML.encode())
    assert answer["model_ref"] == "file:m1-v2.gguf" and answer["changed"] is True
    assert answer["took_ms"] < 10_000  # HME-031
    pool = _pool(workspace)
    [ready] = [r for r in pool["replicas"] if r["state"] == "Ready"]
    assert ready["id"] in answer["replicas"] and ready["pid"] != old_pid

    async with (
        aiohttp.ClientSession() as session,
        session.post(f"{base}/v1/pools/p1/reload", json={"model": "m2"}) as response,
    ):
        answer = await response.json()
        assert response.status == 200, answer
    assert answer["model"] == "m2"
    assert yaml.safe_load(workspace.config_path.read_text())["pools"][0]["model"] == "m2"
    assert "# what a reload changes" in workspace.config_path.read_text()


@pytest.mark.slow
async def test_a_reload_that_never_gets_ready_puts_the_old_file_back_and_answers_409(
    workspace: Workspace, serve: Any
) -> None:
    (workspace.root / "m1.gguf").write_bytes(GOOD)
    (workspace.root / "tampered.gguf").write_bytes(b"GGUF weights, not the pinned ones")
    original = ORCH_YAML.replace(
        "    size_mib: 1000\n", f"    size_mib: 1000\n    digest: {DIGEST}\n", 1
    ).encode()
    workspace.config_path.write_bytes(original)
    workspace.config_path.chmod(0o640)
    base = _url(await serve())
    async with aiohttp.ClientSession() as session:
        url = f"{base}/v1/pools/p1/reload"
        async with session.post(url, json={"model_ref": "file:tampered.gguf"}) as response:
            answer = await response.json()
        assert response.status == 409 and answer["code"] == "RELOAD_FAILED", answer
        assert "failed" in answer["message"] and "UNTRUSTED_ARTIFACT" in answer["message"]
        assert "restored byte for byte" in answer["message"]
        assert "within" not in answer["message"]  # it failed, it did not time out
        assert answer["hint"].startswith("The old orch.yaml is back in place")
        assert workspace.config_path.read_bytes() == original
        assert workspace.config_path.stat().st_mode & 0o777 == 0o640
        await wait_for(lambda: _ready(workspace), 10, "p1 back on the old spec")

        refused = [
            ({"model_ref": "ftp://x/y.gguf"}, 400, "INVALID_PARAMS"),  # no resolver reads it
            ({"model_ref": "file:a\u2028b.gguf"}, 400, "INVALID_PARAMS"),  # a YAML line break
            ({"model": "nope"}, 400, "INVALID_PARAMS"),
            ({"model": "m2", "model_ref": "file:x"}, 400, "INVALID_PARAMS"),
            ({"model_ref": "file:x", "timeout_s": 0}, 400, "INVALID_PARAMS"),
            ({"model_ref": "file:x", "timeout_s": "5"}, 400, "INVALID_PARAMS"),  # as written
        ]
        for payload, status, code in refused:
            async with session.post(url, json=payload) as response:
                body = await response.json()
                assert (response.status, body["code"]) == (status, code), body
        async with session.post(f"{base}/v1/pools/p9/reload", json={}) as response:
            assert response.status == 404
    assert workspace.config_path.read_bytes() == original


async def test_a_reload_onto_a_retired_model_is_refused_at_once_and_writes_nothing(
    workspace: Workspace, serve: Any
) -> None:
    """A Retired model's pools are unloaded: a reload onto it (or of a pool of it) would wait
    its whole timeout for a Ready that never comes, then blame the file."""
    (workspace.root / "m1.gguf").write_bytes(GOOD)
    (workspace.root / "m2.gguf").write_bytes(GOOD)
    original = ORCH_YAML.replace(
        'm2: {ref: "file:m2.gguf", size_mib: 1000}',
        'm2: {ref: "file:m2.gguf", size_mib: 1000, state: Retired}',
    ).encode()
    assert original != ORCH_YAML.encode()
    workspace.config_path.write_bytes(original)
    base = _url(await serve())
    async with aiohttp.ClientSession() as session:
        t0 = time.monotonic()
        async with session.post(f"{base}/v1/pools/p1/reload", json={"model": "m2"}) as r:
            answer = await r.json()
        assert time.monotonic() - t0 < 3
        assert r.status == 409 and answer["code"] == "RELOAD_FAILED", answer
        assert "model 'm2' is Retired in orch.yaml" in answer["message"], answer
        assert "nothing was changed" in answer["message"]
        assert "models.m2.state: Active" in answer["hint"]
    assert workspace.config_path.read_bytes() == original
    assert _ready(workspace)


@pytest.mark.slow
async def test_a_task_waiting_through_a_failed_reload_runs_on_the_old_spec(
    workspace: Workspace, serve: Any
) -> None:
    """The new replica fails (its file is not the pinned one) and the reload is undone: a
    task sent meanwhile waits for the pool and runs, instead of failing POOL_UNAVAILABLE."""
    (workspace.root / "tampered.gguf").write_bytes(b"GGUF weights, not the pinned ones")
    workspace.config_path.write_text(
        ORCH_YAML.replace("    size_mib: 1000\n", f"    size_mib: 1000\n    digest: {DIGEST}\n", 1)
    )
    base = _url(await serve())
    async with aiohttp.ClientSession() as session:
        url = f"{base}/v1/pools/p1/reload"
        reload = asyncio.ensure_future(session.post(url, json={"model_ref": "file:tampered.gguf"}))
        await wait_for(lambda: "tampered" in workspace.config_path.read_text(), 10, "written")
        workspace.submit("during.task.yaml", task("during"))
        async with await reload as response:
            assert response.status == 409
    assert (await wait_terminal(workspace, "during", 20))["status"] == "succeeded"


async def test_tasks_queued_before_a_failed_reload_wait_it_out_and_run_on_the_old_spec(
    workspace: Workspace, serve: Any
) -> None:
    """A reload onto a model that cannot be placed fails and puts orch.yaml back byte for
    byte: the tasks queued for the pool's old model before it (by model, and by pool) must
    not be failed by the edit it made meanwhile; they run once the old spec is back."""
    (workspace.root / "m1.gguf").write_bytes(GOOD)
    (workspace.root / "m2.gguf").write_bytes(GOOD)
    text = ORCH_YAML.replace(
        'm2: {ref: "file:m2.gguf", size_mib: 1000}', 'm2: {ref: "file:m2.gguf", size_mib: 90000}'
    ).replace("sim: {tokens_per_s: 400, load_s: 0}", "sim: {tokens_per_s: 40, load_s: 0}")
    workspace.config_path.write_text(text)
    base = _url(await serve())
    queued = {"by-model": {"model": "m1"}, "by-pool": {"pool": "p1"}}
    await _fill_both_slots(workspace)
    for name, target in queued.items():
        fields = task(name, max_tokens=4)
        fields.pop("model")
        workspace.submit(f"{name}.task.yaml", fields | target)
    await wait_for(
        lambda: all((workspace.result(n) or {}).get("status") == "queued" for n in queued),
        10,
        "both queued",
    )
    async with aiohttp.ClientSession() as session:
        url = f"{base}/v1/pools/p1/reload"
        async with session.post(url, json={"model": "m2", "timeout_s": 3}) as response:
            answer = await response.json()
        assert response.status == 409 and answer["code"] == "RELOAD_FAILED", answer
    assert workspace.config_path.read_text() == text
    for name in queued:
        ended = await wait_terminal(workspace, name, 20)
        assert ended["status"] == "succeeded", ended


@pytest.mark.parametrize(
    "target",
    [{"model": "m1"}, {"pool": "p1"}, {"pool": "p1", "model": "m1"}],
    ids=["by-model", "by-pool", "by-pool-and-model"],
)
async def test_a_task_sent_during_a_failed_reload_onto_another_model_waits_and_runs(
    workspace: Workspace, serve: Any, target: dict[str, str]
) -> None:
    """Sent while the reload's edit has taken the pool off its model, a task for that model
    was refused POOL_UNAVAILABLE (one naming the pool and its model INVALID_PARAMS, one
    naming the pool alone was bound to the new model and failed after the rollback),
    though the reload failed and the model was served again half a second later."""
    (workspace.root / "m1.gguf").write_bytes(GOOD)
    (workspace.root / "m2.gguf").write_bytes(GOOD)
    text = ORCH_YAML.replace(
        'm2: {ref: "file:m2.gguf", size_mib: 1000}', 'm2: {ref: "file:m2.gguf", size_mib: 90000}'
    )
    workspace.config_path.write_text(text)
    base = _url(await serve())
    async with aiohttp.ClientSession() as session:
        url = f"{base}/v1/pools/p1/reload"
        reload = asyncio.ensure_future(session.post(url, json={"model": "m2", "timeout_s": 3}))
        await wait_for(lambda: "model: m2" in workspace.config_path.read_text(), 10, "written")
        fields = task("sent", max_tokens=4)
        fields.pop("model")
        workspace.submit("sent.task.yaml", fields | target)
        async with await reload as response:
            assert response.status == 409
    ended = await wait_terminal(workspace, "sent", 20)
    assert (ended["status"], ended["model"]) == ("succeeded", "m1"), ended


@pytest.mark.slow
async def test_a_reload_overtaken_by_another_edit_answers_at_once_and_leaves_it(
    workspace: Workspace, serve: Any
) -> None:
    (workspace.root / "m1-v2.gguf").write_bytes(b"GGUF weights, version 2")
    cfg = ORCH_YAML.replace("tokens_per_s: 400, load_s: 0", "tokens_per_s: 400, load_s: 3")
    workspace.config_path.write_text(cfg)
    base = _url(await serve())
    async with aiohttp.ClientSession() as session:
        url = f"{base}/v1/pools/p1/reload"
        t0 = time.monotonic()
        reload = asyncio.ensure_future(session.post(url, json={"model_ref": "file:m1-v2.gguf"}))
        await wait_for(lambda: "m1-v2" in workspace.config_path.read_text(), 10, "written")
        by_hand = workspace.config_path.read_text().replace("ctx: 2048", "ctx: 1024")
        workspace.config_path.write_text(by_hand)  # the pool itself changed by hand
        async with await reload as response:
            answer = await response.json()
        assert time.monotonic() - t0 < 8  # not the 10 s ready_s timeout
        assert response.status == 409 and "changed by another edit" in answer["message"]
        assert "left as is" in answer["message"] and "other edit" in answer["hint"]
    assert workspace.config_path.read_text() == by_hand


async def test_a_reload_outlives_an_edit_that_keeps_its_pool_on_the_new_spec(
    workspace: Workspace, serve: Any
) -> None:
    """An edit made by hand on top of the reload's, not touching the pool (a comment, the
    queue's capacity), keeps the pool on the new spec: the reload waits it out and
    answers 200 once the pool is Ready there, not a 409 for a change it did not fail."""
    (workspace.root / "m1-v2.gguf").write_bytes(b"GGUF weights, version 2")
    cfg = ORCH_YAML.replace("tokens_per_s: 400, load_s: 0", "tokens_per_s: 400, load_s: 2")
    workspace.config_path.write_text(cfg)
    base = _url(await serve())
    async with aiohttp.ClientSession() as session:
        url = f"{base}/v1/pools/p1/reload"
        reload = asyncio.ensure_future(session.post(url, json={"model_ref": "file:m1-v2.gguf"}))
        await wait_for(lambda: "m1-v2" in workspace.config_path.read_text(), 10, "written")
        by_hand = workspace.config_path.read_text().replace("capacity: 16", "capacity: 12")
        workspace.config_path.write_text(by_hand + "# and a comment\n")
        async with await reload as response:
            answer = await response.json()
    assert response.status == 200, answer
    assert answer["model_ref"] == "file:m1-v2.gguf" and answer["replicas"], answer
    assert workspace.config_path.read_text() == by_hand + "# and a comment\n"


@pytest.mark.parametrize("pool", ["p1", "p2"])
async def test_a_reload_while_a_save_is_still_being_written_changes_nothing(
    workspace: Workspace, serve: Any, pool: str
) -> None:
    """An editor has written the first part of orch.yaml in place (a valid file without
    what follows the cut: pool p2) and writes the rest a moment later. A reload meanwhile
    is refused: applied at once, the half file would end p2 and its tasks, and the editor's
    second write would go to the file the reload renamed away."""
    whole = (
        ORCH_YAML
        + """  - id: p2
    engine: sim
    model: m2
    ctx: 2048
    slots: 1
    sim: {tokens_per_s: 400, load_s: 0}
"""
    )
    (workspace.root / "m2.gguf").write_bytes(b"GGUF other weights")
    workspace.config_path.write_text(whole)
    base = _url(await serve())
    await wait_for(lambda: _ready_pool(workspace, "p2"), 10, "p2 Ready")
    first, rest = whole.split("  - id: p2\n")
    with workspace.config_path.open("r+") as editor:
        editor.truncate(0)
        editor.write(first)
        editor.flush()
        async with (
            aiohttp.ClientSession() as session,
            session.post(f"{base}/v1/pools/{pool}/reload", json={}) as response,
        ):
            answer = await response.json()
        editor.write("  - id: p2\n" + rest)
    assert response.status == 409 and answer["code"] == "RELOAD_FAILED", answer
    assert "an edit the daemon has not applied yet" in answer["message"], answer
    assert workspace.config_path.read_text() == whole  # the editor's save, whole
    await asyncio.sleep(2.5)  # the save settles: nothing of p2 was ever taken away
    assert _ready_pool(workspace, "p2")


@pytest.mark.parametrize(
    ("ref", "said"),
    [
        ("file:/etc/passwd", "outside the folders a reload may name"),
        ("file:../../../etc/passwd", "outside the folders a reload may name"),
        ("http://169.254.169.254/m.gguf", "plain http: ref is not taken over the API"),
    ],
)
async def test_a_reload_may_not_point_a_model_at_any_file_or_address(
    workspace: Workspace, serve: Any, ref: str, said: str
) -> None:
    """Any API caller may reload: its model_ref is held to the folders a model file may
    be in (else a verify would tell the size and digest of any file the daemon can read),
    and to downloads over https; orch.yaml is not touched."""
    workspace.config_path.write_text(ORCH_YAML)
    base = _url(await serve())
    async with (
        aiohttp.ClientSession() as session,
        session.post(f"{base}/v1/pools/p1/reload", json={"model_ref": ref}) as response,
    ):
        answer = await response.json()
    assert response.status == 400 and answer["code"] == "INVALID_PARAMS", answer
    assert said in answer["message"], answer
    assert workspace.config_path.read_text() == ORCH_YAML


async def test_a_reload_cut_short_by_the_daemons_death_is_undone_at_the_next_start(
    workspace: Workspace, serve: Any
) -> None:
    """Killed while a reload waited for the new replica: nobody was told the reload worked,
    so the next daemon puts the old orch.yaml back before it starts anything on the edit,
    as a failed reload does; an edit made by hand since is left alone."""
    from reconciler import reloading

    (workspace.root / "m1.gguf").write_bytes(GOOD)
    (workspace.root / "m1-v2.gguf").write_bytes(b"GGUF weights, version 2")
    workspace.config_path.write_text(ORCH_YAML)
    state_dir = workspace.root / ".orch"
    state_dir.mkdir(exist_ok=True)
    edited = editing.set_model_ref(ORCH_YAML, "m1", "file:m1-v2.gguf")
    # what the killed daemon left: its journal, then the edited file
    reloading._journal(state_dir, "p1", ORCH_YAML.encode(), edited.encode())
    workspace.config_path.write_text(edited)
    running = await serve()
    assert workspace.config_path.read_text() == ORCH_YAML  # byte for byte
    assert not (state_dir / reloading.JOURNAL).exists()
    assert running.daemon.config.state.models["m1"].ref == "file:m1.gguf"  # type: ignore[union-attr]
    await running.stop()
    # a hand edit made after the reload's: left as it is
    reloading._journal(state_dir, "p1", ORCH_YAML.encode(), edited.encode())
    by_hand = edited + "# and an edit by hand\n"
    workspace.config_path.write_text(by_hand)
    running = await serve()
    assert workspace.config_path.read_text() == by_hand
    assert not (state_dir / reloading.JOURNAL).exists()


async def test_a_reload_waiting_when_the_daemon_stops_is_answered_and_undone(
    workspace: Workspace, serve: Any
) -> None:
    """The daemon stops (a first SIGTERM) while a reload waits for its new replica: the
    client is answered 503 DAEMON_STOPPING, not hung up on, and orch.yaml is put back at
    once, as a failed reload's is."""
    from reconciler import reloading

    (workspace.root / "m1-v2.gguf").write_bytes(b"GGUF weights, version 2")
    cfg = ORCH_YAML.replace("tokens_per_s: 400, load_s: 0", "tokens_per_s: 400, load_s: 3")
    workspace.config_path.write_text(cfg)
    running = await serve()
    base = _url(running)
    async with aiohttp.ClientSession() as session:
        url = f"{base}/v1/pools/p1/reload"
        reload = asyncio.ensure_future(session.post(url, json={"model_ref": "file:m1-v2.gguf"}))
        await wait_for(lambda: "m1-v2" in workspace.config_path.read_text(), 10, "written")
        stopped = asyncio.ensure_future(running.stop())
        async with await reload as response:
            answer = await response.json()
        await stopped
    assert response.status == 503 and answer["code"] == "DAEMON_STOPPING", answer
    assert "the daemon is stopping" in answer["message"] and "restored" in answer["message"]
    assert workspace.config_path.read_text() == cfg  # byte for byte, before the next start
    assert not (workspace.root / ".orch" / reloading.JOURNAL).exists()


async def test_a_reload_that_answered_leaves_no_journal(workspace: Workspace, serve: Any) -> None:
    from reconciler import reloading

    (workspace.root / "m1.gguf").write_bytes(GOOD)
    (workspace.root / "m1-v2.gguf").write_bytes(b"GGUF weights, version 2")
    workspace.config_path.write_text(ORCH_YAML)
    base = _url(await serve())
    async with (
        aiohttp.ClientSession() as session,
        session.post(f"{base}/v1/pools/p1/reload", json={"model_ref": "file:m1-v2.gguf"}) as r,
    ):
        assert r.status == 200, await r.json()
    assert not (workspace.root / ".orch" / reloading.JOURNAL).exists()
    assert "m1-v2" in workspace.config_path.read_text()


async def test_a_failed_reload_leaves_the_old_replica_serving_its_running_task(
    workspace: Workspace, serve: Any, caplog: pytest.LogCaptureFixture
) -> None:
    """The new model fits only where the old replica is, so it waits for that replica's
    drain, which waits for its running task; the reload times out and orch.yaml is put
    back. The old replica, still draining, must serve again: its task runs to its end (not
    WORKER_RESET at the drain deadline) and its engine is not restarted."""
    (workspace.root / "m1.gguf").write_bytes(GOOD)
    (workspace.root / "m2.gguf").write_bytes(GOOD)
    text = (
        ORCH_YAML.replace(
            'm2: {ref: "file:m2.gguf", size_mib: 1000}',
            'm2: {ref: "file:m2.gguf", size_mib: 22500}',  # fits GPU 0 once m1 left it
        )
        .replace("sim: {tokens_per_s: 400, load_s: 0}", "sim: {tokens_per_s: 20, load_s: 0}")
        .replace("drain_s: 5", "drain_s: 4")
        .replace("    slots: 2\n", "    slots: 2\n    devices: [0]\n")
    )
    workspace.config_path.write_text(text)
    caplog.set_level("INFO", logger="llama_orch")
    base = _url(await serve())
    await wait_for(lambda: _ready(workspace), 10, "p1 Ready")
    pid = _pool(workspace)["replicas"][0]["pid"]
    workspace.submit("long.task.yaml", task("long", max_tokens=120))  # about 6 s
    await wait_for(lambda: (workspace.result("long") or {}).get("status") == "running", 10)
    async with aiohttp.ClientSession() as session:
        began = time.monotonic()
        url = f"{base}/v1/pools/p1/reload"
        async with session.post(url, json={"model": "m2", "timeout_s": 1.5}) as response:
            answer = await response.json()
        took = time.monotonic() - began
        assert response.status == 409 and answer["code"] == "RELOAD_FAILED", answer
        assert took < 3.0, f"the 409 came {took:.1f} s after a reload given 1.5 s"
        assert "within 1.5 s: not Ready in time" in answer["message"], answer
    assert workspace.config_path.read_text() == text
    await wait_for(lambda: _ready(workspace), 5, "p1 serving again")
    ended = await wait_terminal(workspace, "long", 20)
    assert ended["status"] == "succeeded", ended
    assert _pool(workspace)["replicas"][0]["pid"] == pid  # the same engine, never restarted
    events = [getattr(r, "orch_event", "") for r in caplog.records]
    assert "replica.reclaimed" in events and "replica.stopped" not in events


async def test_a_task_naming_only_its_pool_follows_the_pool_onto_its_new_model(
    workspace: Workspace, serve: Any
) -> None:
    """Queued before a reload onto another model, a task that named only the pool runs on
    the model the pool serves now (as one sent after the reload does); one that named the old
    model fails, as after any edit that leaves its model served by no pool."""
    (workspace.root / "m1.gguf").write_bytes(GOOD)
    (workspace.root / "m2.gguf").write_bytes(GOOD)
    text = ORCH_YAML.replace("sim: {tokens_per_s: 400, load_s: 0}", "sim: {tokens_per_s: 40}")
    workspace.config_path.write_text(text)
    base = _url(await serve())
    await _fill_both_slots(workspace)
    by_pool = task("by-pool", max_tokens=4)
    by_pool.pop("model")
    workspace.submit("by-pool.task.yaml", by_pool | {"pool": "p1"})
    workspace.submit("by-model.task.yaml", task("by-model", model="m1", max_tokens=4))
    await wait_for(
        lambda: (workspace.result("by-pool") or {}).get("status") == "queued", 10, "queued"
    )
    async with aiohttp.ClientSession() as session:
        url = f"{base}/v1/pools/p1/reload"
        async with session.post(url, json={"model": "m2", "timeout_s": 10}) as response:
            assert response.status == 200, await response.text()
    followed = await wait_terminal(workspace, "by-pool", 20)
    assert (followed["status"], followed["model"]) == ("succeeded", "m2"), followed
    left = await wait_terminal(workspace, "by-model", 20)
    assert left["status"] == "failed" and left["error"]["code"] == "POOL_UNAVAILABLE", left


async def test_a_task_follows_its_pool_while_another_pools_reload_is_under_way(
    workspace: Workspace, serve: Any
) -> None:
    """p1 is reloaded onto m2 while p2's reload (a slow start) still runs: the tasks that
    named only p1 follow it onto m2 at once, not fail because a reload was still going on."""
    (workspace.root / "m1.gguf").write_bytes(GOOD)
    (workspace.root / "m2.gguf").write_bytes(GOOD)
    (workspace.root / "m3.gguf").write_bytes(b"GGUF weights, the third")
    text = ORCH_YAML.replace("sim: {tokens_per_s: 400, load_s: 0}", "sim: {tokens_per_s: 40}")
    text += """  - id: p2
    engine: sim
    model: m3
    ctx: 2048
    slots: 1
    sim: {tokens_per_s: 400, load_s: 2}
"""
    text = text.replace(
        '  m2: {ref: "file:m2.gguf", size_mib: 1000}   # another model\n',
        '  m2: {ref: "file:m2.gguf", size_mib: 1000}   # another model\n'
        '  m3: {ref: "file:m3.gguf", size_mib: 1000}\n',
    )
    workspace.config_path.write_text(text)
    base = _url(await serve())
    await _fill_both_slots(workspace)
    for name in ("f1", "f2"):
        by_pool = task(name, max_tokens=4)
        by_pool.pop("model")
        workspace.submit(f"{name}.task.yaml", by_pool | {"pool": "p1"})
    await wait_for(lambda: (workspace.result("f2") or {}).get("status") == "queued", 10)
    (workspace.root / "m3-v2.gguf").write_bytes(b"GGUF weights, the third, again")
    async with aiohttp.ClientSession() as session:
        # one reload at a time: p2's runs (its replica starting for 2 s) right after p1's
        first = asyncio.ensure_future(
            session.post(f"{base}/v1/pools/p1/reload", json={"model": "m2"})
        )
        await asyncio.sleep(0.05)
        other = asyncio.ensure_future(
            session.post(f"{base}/v1/pools/p2/reload", json={"model_ref": "file:m3-v2.gguf"})
        )
        async with await first as response:
            assert response.status == 200, await response.text()
        for name in ("f1", "f2"):
            followed = await wait_terminal(workspace, name, 20)
            assert (followed["status"], followed["model"]) == ("succeeded", "m2"), followed
        async with await other as response:
            assert response.status == 200, await response.text()


async def test_a_failed_reload_keeps_the_drain_of_another_pool_of_its_model(
    workspace: Workspace, serve: Any
) -> None:
    """p2 serves m1 too and is drained; a reload of p1 onto another file of m1 changes
    p2's spec as well, then fails: orch.yaml is put back, and p2 stays drained, as it
    was, rather than lifted for a change that did not last."""
    (workspace.root / "m1.gguf").write_bytes(GOOD)
    (workspace.root / "tampered.gguf").write_bytes(b"GGUF weights, not the pinned ones")
    text = ORCH_YAML.replace(
        "    size_mib: 1000\n", f"    size_mib: 1000\n    digest: {DIGEST}\n", 1
    )
    text += """  - id: p2
    engine: sim
    model: m1
    ctx: 2048
    slots: 1
    sim: {tokens_per_s: 400, load_s: 0}
"""
    workspace.config_path.write_text(text)
    base = _url(await serve())
    async with aiohttp.ClientSession() as session:
        async with session.post(f"{base}/v1/pools/p2/drain", json={}) as response:
            assert response.status in (200, 202), await response.text()
        await wait_for(lambda: _pool(workspace, "p2")["state"] == "Stopped", 10, "p2 drained")
        url = f"{base}/v1/pools/p1/reload"
        async with session.post(url, json={"model_ref": "file:tampered.gguf"}) as response:
            assert response.status == 409, await response.text()
    assert workspace.config_path.read_text() == text
    await asyncio.sleep(1.0)  # passes on the restored file
    assert list(drains.load(workspace.root / ".orch")) == ["p2"]
    assert _pool(workspace, "p2")["state"] == "Stopped"


async def test_a_reload_of_one_pool_holds_up_only_the_tasks_it_touches(
    workspace: Workspace, serve: Any
) -> None:
    """While p1 reloads (waiting for its old replica's memory), p2 is drained on request:
    the task queued for p2's model fails at once, as without a reload; it waited for the
    unrelated reload to end."""
    for name in ("m1", "m2", "m3"):
        (workspace.root / f"{name}.gguf").write_bytes(GOOD)
    text = (
        ORCH_YAML.replace(
            'm2: {ref: "file:m2.gguf", size_mib: 1000}   # another model',
            'm2: {ref: "file:m2.gguf", size_mib: 1000}\n'
            '  m3: {ref: "file:m3.gguf", size_mib: 22500}   # fits GPU 0 once m1 left it',
        )
        .replace("sim: {tokens_per_s: 400, load_s: 0}", "sim: {tokens_per_s: 20, load_s: 0}")
        .replace("    slots: 2\n", "    slots: 2\n    devices: [0]\n")
        + "  - {id: p2, engine: sim, model: m2, devices: [1], ctx: 2048, slots: 1,"
        " sim: {tokens_per_s: 20, load_s: 0}}\n"
    )
    workspace.config_path.write_text(text)
    base = _url(await serve())
    await wait_for(lambda: _ready(workspace) and _ready_pool(workspace, "p2"), 10, "Ready")
    workspace.submit("long.task.yaml", task("long", max_tokens=120))  # on p1, about 6 s
    workspace.submit("busy.task.yaml", task("busy", model="m2", max_tokens=120))
    await wait_for(
        lambda: all(
            (workspace.result(n) or {}).get("status") == "running" for n in ("long", "busy")
        ),
        10,
        "both running",
    )
    workspace.submit("later.task.yaml", task("later", model="m2", max_tokens=2))
    await wait_for(lambda: (workspace.result("later") or {}).get("status") == "queued", 10)
    async with aiohttp.ClientSession() as session:
        url = f"{base}/v1/pools/p1/reload"
        reload = asyncio.ensure_future(session.post(url, json={"model": "m3", "timeout_s": 6}))
        await wait_for(lambda: "model: m3" in workspace.config_path.read_text(), 10, "written")
        async with session.post(f"{base}/v1/pools/p2/drain", json={"deadline_ms": 30000}) as r:
            assert r.status == 202
        began = time.monotonic()
        ended = await wait_terminal(workspace, "later", 10)
        assert time.monotonic() - began < 3 and not reload.done()
        assert ended["status"] == "failed" and ended["error"]["code"] == "POOL_UNAVAILABLE", ended
        async with await reload as response:
            assert response.status in (200, 409)  # whichever: the point was not to wait


async def test_a_failed_reload_of_a_drained_pool_leaves_it_drained_without_a_reclaim(
    workspace: Workspace, serve: Any, caplog: pytest.LogCaptureFixture
) -> None:
    """The reload lifts the drain and puts it back when it fails: it is put back before
    the old orch.yaml, so the draining replica is not reclaimed for a moment in between."""
    (workspace.root / "m1.gguf").write_bytes(GOOD)
    (workspace.root / "m2.gguf").write_bytes(GOOD)
    text = ORCH_YAML.replace(
        'm2: {ref: "file:m2.gguf", size_mib: 1000}', 'm2: {ref: "file:m2.gguf", size_mib: 90000}'
    ).replace("sim: {tokens_per_s: 400, load_s: 0}", "sim: {tokens_per_s: 20, load_s: 0}")
    workspace.config_path.write_text(text)
    caplog.set_level("INFO", logger="llama_orch")
    base = _url(await serve())
    workspace.submit("long.task.yaml", task("long", max_tokens=100))
    await wait_for(lambda: (workspace.result("long") or {}).get("status") == "running", 10)
    async with aiohttp.ClientSession() as session:
        async with session.post(f"{base}/v1/pools/p1/drain", json={"deadline_ms": 30000}) as r:
            assert r.status == 202
        url = f"{base}/v1/pools/p1/reload"
        async with session.post(url, json={"model": "m2", "timeout_s": 3}) as response:
            assert response.status == 409
    await asyncio.sleep(0.5)
    events = [getattr(r, "orch_event", "") for r in caplog.records]
    assert "replica.reclaimed" not in events, events
    assert _pool(workspace)["replicas"][0]["state"] == "Draining"


async def test_a_drain_requested_during_a_reload_ends_it_at_once_and_outlasts_its_rollback(
    workspace: Workspace, serve: Any
) -> None:
    """The operator drains a pool while a reload of it waits for its new replica: the reload
    can never become Ready, so it fails at once saying why (not after its whole timeout,
    blaming a replica), puts the old orch.yaml back, and the drain stays: the pool serves
    nothing until a reload brings it back."""
    (workspace.root / "m1.gguf").write_bytes(GOOD)
    (workspace.root / "m2.gguf").write_bytes(GOOD)
    original = ORCH_YAML.replace("load_s: 0}", "load_s: 1.5}").encode()
    workspace.config_path.write_bytes(original)
    base = _url(await serve())
    async with aiohttp.ClientSession() as session:

        async def reload() -> tuple[int, dict[str, Any]]:
            url = f"{base}/v1/pools/p1/reload"
            async with session.post(url, json={"model": "m2", "timeout_s": 20}) as response:
                return response.status, await response.json()

        began = time.monotonic()
        reloading = asyncio.create_task(reload())
        await asyncio.sleep(0.5)
        async with session.post(f"{base}/v1/pools/p1/drain", json={"deadline_ms": 100}) as r:
            assert r.status == 202, await r.text()
        status, answer = await reloading
        took = time.monotonic() - began
    assert status == 409 and answer["code"] == "RELOAD_FAILED", answer
    assert took < 10, took  # not the 20 s timeout
    assert "drained on request during the reload" in answer["message"], answer
    assert "restored byte for byte" in answer["message"]
    assert "pool p1 stays drained as requested" in answer["hint"], answer
    assert workspace.config_path.read_bytes() == original
    await wait_for(lambda: _stopped(workspace), 10, "p1 drained on the old spec")
    await asyncio.sleep(1.0)  # a few passes: nothing lifts the drain
    assert _stopped(workspace) and "p1" in drains.load(workspace.root / ".orch")
    workspace.submit("after.task.yaml", task("after", max_tokens=2))
    refused = await wait_terminal(workspace, "after")
    assert refused["status"] == "rejected" and refused["error"]["code"] == "POOL_UNAVAILABLE"


def test_a_reload_waiting_on_its_models_download_says_how_the_download_goes() -> None:
    """A reload onto an hf: ref whose download keeps failing timed out saying only "no
    replica started yet"; the download's own state (interrupted, and why) is the cause."""
    import types

    from reconciler import reloading

    runtime = types.SimpleNamespace(
        problems={},
        unschedulable={},
        replicas={},
        downloading={
            "q": "downloading model 'm' (hf:o/r/f.gguf): 0 B so far; interrupted (cannot "
            "connect to huggingface.co), resuming in 4 s"
        },
    )
    reloader = reloading.Reloader(
        config=types.SimpleNamespace(),  # type: ignore[arg-type]
        runtime=runtime,  # type: ignore[arg-type]
        clock=types.SimpleNamespace(),  # type: ignore[arg-type]
        wake=lambda: None,
    )
    failed, progress, ready = reloader._judge("q", "hash", 1)
    assert failed is None and ready is None
    assert "no replica started yet; its model file: downloading" in progress
    assert "cannot connect to huggingface.co" in progress
