"""The daemon SIGKILLed at each commit point, then restarted: every task ends in exactly one
terminal state, in order, with no partial file visible and no engine left behind."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from state import events, spool
from tests.conftest import Workspace, config, task

pytestmark = pytest.mark.slow

TASKS = [f"job{i}" for i in range(4)]


def _serve(
    ws: Workspace, *, failpoint: str | None, exit_when_idle: bool
) -> subprocess.Popen[bytes]:
    env = dict(os.environ)
    env.pop("ORCH_FAILPOINTS", None)
    if failpoint:
        env["ORCH_FAILPOINTS"] = f"{failpoint}=kill"
    argv = [
        sys.executable,
        "-m",
        "reconciler.cli",
        "serve",
        "--config",
        str(ws.config_path),
        "--resync",
        "0.2",
        "--log-file",
        str(ws.root / "daemon.log"),
    ]
    if exit_when_idle:
        argv.append("--exit-when-idle")
    return subprocess.Popen(argv, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:  # a zombie is not holding anything
        return Path(f"/proc/{pid}/stat").read_text().split(") ")[1][0] != "Z"
    except (OSError, IndexError):
        return False


@pytest.mark.parametrize("failpoint", ["after_claim", "after_started", "after_token"])
def test_a_killed_daemon_restarts_and_finishes_every_task_exactly_once(
    workspace: Workspace, failpoint: str
) -> None:
    cfg = config()
    cfg["pools"][0]["slots"] = 1
    cfg["pools"][0]["sim"] = {"tokens_per_s": 100, "load_s": 0.0}
    workspace.write_config(cfg)
    for i, task_id in enumerate(TASKS):
        path = workspace.submit(f"{task_id}.task.yaml", task(task_id, max_tokens=10, seed=i))
        os.utime(path, ns=(10**18 + i, 10**18 + i))  # a definite arrival order

    first = _serve(workspace, failpoint=failpoint, exit_when_idle=False)
    assert first.wait(timeout=30) == -signal.SIGKILL
    left_behind = [
        json.loads(p.read_text())["pid"]
        for p in (workspace.root / ".orch" / "engines").glob("*.json")
    ]

    second = _serve(workspace, failpoint=None, exit_when_idle=True)
    assert second.wait(timeout=60) == 0

    for task_id in TASKS:
        result = workspace.result(task_id)
        assert result is not None and result["status"] == "succeeded", task_id
        assert result["engine_version"], task_id  # also on the engine the restart adopted
        homes = [
            folder.name
            for folder in (
                workspace.spool.incoming,
                workspace.spool.active,
                workspace.spool.done,
                workspace.spool.failed,
            )
            if (folder / f"{task_id}.task.yaml").exists()
        ]
        assert homes == ["done"], task_id
        frames = list(events.read(workspace.root / "results" / f"{task_id}.events.jsonl"))
        assert [f.id for f in frames] == list(range(1, len(frames) + 1)), task_id
        assert [f.terminal for f in frames].count(True) == 1 and frames[-1].event == "end"
        # a re-run (same seed) produces the text the interrupted run had started
        tokens = [f.data["t"] for f in frames if f.event == "token"]
        assert "".join(tokens).endswith(result["text"])
    started = [workspace.result(t)["timings"]["started_at"] for t in TASKS]  # type: ignore[index]
    assert started == sorted(started), "tasks ran out of order after the restart"
    assert not [p.name for p in (workspace.root / "results").iterdir() if p.name.startswith(".")]
    time.sleep(0.2)
    assert [pid for pid in left_behind if _alive(pid)] == []
    assert list((workspace.root / ".orch" / "engines").glob("*.json")) == []


def test_a_restart_after_a_power_loss_reruns_every_kind_of_task(workspace: Workspace) -> None:
    """Daemon and engines killed together: nothing can be adopted, so recovered tasks wait
    for replicas that are still loading, as queued tasks do, and end as they would have."""
    cfg = config()
    cfg["pools"][0]["slots"] = 1
    cfg["pools"][0]["sim"] = {"tokens_per_s": 100, "load_s": 0.8}
    workspace.write_config(cfg)
    kinds = {
        "pinned": {"placement": {"mode": "pin", "pin_pool": "p1"}},
        "deadlined": {"deadline_ms": 60000},
        "in-session": {"session_id": "agent-1"},
        "doomed": {},
        "plain": {},
    }
    for i, (task_id, extra) in enumerate(kinds.items()):
        path = workspace.submit(
            f"{task_id}.task.yaml", task(task_id, max_tokens=10, seed=i, **extra)
        )
        os.utime(path, ns=(10**18 + i, 10**18 + i))

    first = _serve(workspace, failpoint="after_started", exit_when_idle=False)
    assert first.wait(timeout=30) == -signal.SIGKILL
    for record in (workspace.root / ".orch" / "engines").glob("*.json"):
        with contextlib.suppress(ProcessLookupError):  # the power goes for the engines too
            os.killpg(json.loads(record.read_text())["pid"], signal.SIGKILL)
    assert sorted(p.name for p in workspace.spool.active.iterdir()) == sorted(
        f"{t}.task.yaml" for t in kinds
    )
    spool.request_cancel(workspace.spool, "doomed")
    workspace.submit(
        "waiting.task.yaml", task("waiting", placement={"mode": "pin", "pin_pool": "p1"})
    )

    second = _serve(workspace, failpoint=None, exit_when_idle=True)
    assert second.wait(timeout=60) == 0
    outcomes = {t: workspace.result(t)["status"] for t in [*kinds, "waiting"]}  # type: ignore[index]
    assert outcomes == {
        "pinned": "succeeded",
        "deadlined": "succeeded",
        "in-session": "succeeded",
        "doomed": "canceled",
        "plain": "succeeded",
        "waiting": "succeeded",
    }
    session = json.loads((workspace.root / ".orch" / "sessions" / "agent-1.json").read_text())
    assert session["turns"] == 1  # the re-run is the same turn, not a second one


def test_tasks_accepted_into_a_full_queue_are_not_refused_by_it_after_a_power_loss(
    workspace: Workspace,
) -> None:
    """Every task accepted before the power went is queued again at once at the restart,
    while the replica loads: those over the queue's capacity were accepted, not refused,
    and are owed their place (they failed ADMISSION_REJECT)."""
    _four_accepted_then_power_loss(workspace, "reject", "full")
    accepted = [f"full{i}" for i in range(4) if workspace.result(f"full{i}") is not None]
    assert len(accepted) == 4, accepted
    second = _serve(workspace, failpoint=None, exit_when_idle=True)
    assert second.wait(timeout=60) == 0
    outcomes = {t: (workspace.result(t) or {}).get("status") for t in accepted}
    assert outcomes == dict.fromkeys(accepted, "succeeded"), [workspace.result(t) for t in accepted]


def test_under_drop_lru_a_newcomer_after_a_power_loss_evicts_no_recovered_task(
    workspace: Workspace,
) -> None:
    """drop-lru evicts the oldest batch task for a newcomer: after a restart those are the
    recovered ones (one of them was running), which were accepted, and are owed their run.
    The newcomer is refused instead (retriable), saying why."""
    _four_accepted_then_power_loss(workspace, "drop-lru", "owed")
    workspace.submit("late.task.yaml", task("late", max_tokens=2))  # arrives with recovery
    second = _serve(workspace, failpoint=None, exit_when_idle=True)
    assert second.wait(timeout=60) == 0
    outcomes = {f"owed{i}": (workspace.result(f"owed{i}") or {}).get("status") for i in range(4)}
    assert outcomes == {f"owed{i}": "succeeded" for i in range(4)}, outcomes
    late = workspace.result("late") or {}
    assert late.get("status") in ("succeeded", "rejected"), late
    if late.get("status") == "rejected":
        assert "accepted before the daemon restarted" in late["error"]["message"], late


def _four_accepted_then_power_loss(ws: Workspace, policy: str, prefix: str) -> None:
    """A queue of 2 and two idle slots: four tasks `<prefix>0..3` land at once (two start,
    two wait: all accepted), the daemon is killed as the first starts, its engines too."""
    cfg = config(queue={"capacity": 2, "full_policy": policy})
    cfg["pools"][0]["slots"] = 2
    cfg["pools"][0]["sim"] = {"tokens_per_s": 100, "load_s": 0.8}
    ws.write_config(cfg)
    first = _serve(ws, failpoint="after_started", exit_when_idle=False)
    deadline = time.monotonic() + 30
    while not _ready(ws):
        assert time.monotonic() < deadline and first.poll() is None, "the pool never got Ready"
        time.sleep(0.05)
    staged = []
    for i in range(4):
        staged.append(ws.spool.tmp / f"{prefix}{i}.task.yaml")
        staged[-1].write_text(json.dumps(task(f"{prefix}{i}", max_tokens=10, seed=i)))
    for path in staged:
        path.rename(ws.spool.incoming / path.name)
    assert first.wait(timeout=30) == -signal.SIGKILL
    for record in (ws.root / ".orch" / "engines").glob("*.json"):
        with contextlib.suppress(ProcessLookupError):  # the power goes for the engines too
            os.killpg(json.loads(record.read_text())["pid"], signal.SIGKILL)


def _ready(ws: Workspace) -> bool:
    with contextlib.suppress(OSError, ValueError, KeyError, TypeError):
        return all(p["state"] == "Ready" for p in ws.status()["pools"]) and bool(
            ws.status()["pools"]
        )
    return False


def test_a_rerun_after_a_kill_at_start_counts_its_attempt_and_leftover_temp_files_go(
    workspace: Workspace,
) -> None:
    cfg = config()
    cfg["pools"][0]["sim"] = {"tokens_per_s": 100, "load_s": 0.0}
    workspace.write_config(cfg)
    workspace.submit("once.task.yaml", task("once", max_tokens=5))
    first = _serve(workspace, failpoint="after_started_frame", exit_when_idle=False)
    assert first.wait(timeout=30) == -signal.SIGKILL
    results_dir = workspace.root / "results"
    leftovers = [
        results_dir / ".once.json.4242.tmp",
        workspace.root / ".orch" / ".status.json.4242.tmp",
        workspace.root / ".orch" / "sessions" / ".s.json.4242.tmp",
        workspace.spool.failed / ".bad.task.yaml.error.json.4242.tmp",  # a quarantine's record
    ]
    for path in leftovers:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text('{"status": "running"')  # a write cut short
    second = _serve(workspace, failpoint=None, exit_when_idle=True)
    assert second.wait(timeout=60) == 0
    frames = list(events.read(results_dir / "once.events.jsonl"))
    attempts = [f.data["attempt"] for f in frames if f.event == "started"]
    assert attempts == [1, 2]
    assert workspace.result("once")["attempts"] == 2  # type: ignore[index]
    assert [p for p in leftovers if p.exists()] == []


def test_a_result_rebuilt_from_the_log_after_a_kill_says_where_the_task_ran_and_is_filed(
    workspace: Workspace,
) -> None:
    """Killed after the terminal frame, before the result: the restart writes the result
    from the log, with what the log knows (attempt, pool, replica, tokens) and the place
    the task file is filed, and files it there."""
    workspace.submit("logged.task.yaml", task("logged", max_tokens=5))
    first = _serve(workspace, failpoint="after_terminal_frame", exit_when_idle=False)
    assert first.wait(timeout=30) == -signal.SIGKILL
    second = _serve(workspace, failpoint=None, exit_when_idle=True)
    assert second.wait(timeout=60) == 0
    result = workspace.result("logged")
    assert result is not None and result["status"] == "succeeded"
    assert result["source_file"] == "spool/done/logged.task.yaml"
    assert (workspace.spool.done / "logged.task.yaml").exists()
    assert (result["attempts"], result["pool_id"], result["tokens_out"]) == (1, "p1", 5)
    assert result["replica_id"] and result["prompt_tokens"] is not None
    assert result["gpu"] is not None and result["kv_warmth"] is not None


def test_a_kill_after_a_session_turn_is_counted_does_not_count_it_twice(
    workspace: Workspace,
) -> None:
    workspace.submit("turn.task.yaml", task("turn", session_id="agent-2"))
    first = _serve(workspace, failpoint="after_session_turn", exit_when_idle=False)
    assert first.wait(timeout=30) == -signal.SIGKILL
    second = _serve(workspace, failpoint=None, exit_when_idle=True)
    assert second.wait(timeout=60) == 0
    assert workspace.result("turn")["status"] == "succeeded"  # type: ignore[index]
    session = json.loads((workspace.root / ".orch" / "sessions" / "agent-2.json").read_text())
    assert session["turns"] == 1


def test_an_engine_started_but_never_recorded_is_stopped_by_the_next_daemon(
    workspace: Workspace,
) -> None:
    first = _serve(workspace, failpoint=None, exit_when_idle=False)
    try:
        records = workspace.root / ".orch" / "engines"
        _wait_for_records(records)
        pid = json.loads(next(records.glob("*.json")).read_text())["pid"]
    finally:
        first.send_signal(signal.SIGKILL)
        first.wait(timeout=30)
    for path in records.glob("*.json"):  # as if the kill came before the record was written
        path.unlink()
    assert _alive(pid)
    second = _serve(workspace, failpoint=None, exit_when_idle=True)
    assert second.wait(timeout=60) == 0
    time.sleep(0.2)
    assert not _alive(pid)
    log = (workspace.root / "daemon.log").read_text()
    assert "that a previous daemon started but never recorded" in log


def _wait_for_records(folder: Path, timeout: float = 15.0) -> None:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if list(folder.glob("*.json")):
            return
        time.sleep(0.05)
    raise AssertionError("no engine record appeared")


def test_a_claim_cut_between_link_and_unlink_runs_the_task_once_and_refuses_nothing(
    workspace: Workspace,
) -> None:
    """A kill after claim's link and before its unlink leaves one file under two names; the
    restarted daemon runs the task from active/ and drops the incoming leftover."""
    path = workspace.submit("cut.task.yaml", task("cut", max_tokens=4))
    os.link(path, workspace.spool.active / path.name)  # as the claim left it
    second = _serve(workspace, failpoint=None, exit_when_idle=True)
    assert second.wait(timeout=60) == 0
    result = workspace.result("cut")
    assert result is not None and result["status"] == "succeeded"
    assert list(workspace.spool.incoming.iterdir()) == []
    assert list(workspace.spool.failed.iterdir()) == []  # no DUPLICATE_TASK_ID
    frames = list(events.read(workspace.root / "results" / "cut.events.jsonl"))
    assert [f.event for f in frames].count("started") == 1


def test_a_cut_claim_of_a_task_filed_at_once_is_not_claimed_again_as_a_duplicate(
    workspace: Workspace,
) -> None:
    """Found by the fault suite: recovery filed the active/ copy of a task that is refused at
    once (here an unknown model), then intake claimed the incoming/ leftover of the cut claim
    as a second task and refused it as DUPLICATE_TASK_ID: one task filed twice."""
    path = workspace.submit("cut2.task.yaml", task("cut2", model="nope"))
    os.link(path, workspace.spool.active / path.name)  # as the claim left it
    second = _serve(workspace, failpoint=None, exit_when_idle=True)
    assert second.wait(timeout=60) == 0
    assert workspace.result("cut2")["status"] == "rejected"  # type: ignore[index]
    assert sorted(os.listdir(workspace.spool.failed)) == ["cut2.task.yaml"]
    assert list(workspace.spool.incoming.iterdir()) == []


def test_recovery_log_lines_carry_the_requests_correlation_id(
    workspace: Workspace, caplog: pytest.LogCaptureFixture
) -> None:
    from reconciler import recovery
    from state import results as results_mod

    caplog.set_level("INFO", logger="llama_orch")
    body = task("corr", correlation_id="req-42")
    workspace.spool.ensure()
    (workspace.spool.active / "corr.task.json").write_text(json.dumps(body))
    workspace.results.write(results_mod.Result(task_id="corr", status="running"))
    taken: list[str] = []
    recovery.recover(
        the_spool=workspace.spool,
        store=workspace.results,
        take=lambda path, existing: taken.append(path.name),
        refuse_duplicate=lambda path, task_id: None,
        revision=None,
    )
    assert taken == ["corr.task.json"]
    [line] = [r for r in caplog.records if getattr(r, "orch_event", "") == "task.recovered"]
    assert line.orch_fields["correlation_id"] == "req-42"  # type: ignore[attr-defined]
