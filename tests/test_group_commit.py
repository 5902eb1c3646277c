"""Group commit (state/atomic.py `group`): the durable writes of a batch cost a few syncs in
all, and lose none of the single-write guarantees: a file appears only whole and only at the
commit, after its data is synced; renames keep the order they were asked in; what the block
wrote is visible to itself before the commit; a block that raises still commits."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import pytest
import yaml

from state import atomic, committer, results, sessions, spool
from tests.conftest import Workspace, config, task, wait_terminal


@pytest.fixture
def syncs(monkeypatch: pytest.MonkeyPatch) -> dict[str, int]:
    """Counts fsync calls and filesystem syncs."""
    counts = {"fsync": 0, "syncfs": 0}
    real_fsync = os.fsync

    def fsync(fd: int) -> None:
        counts["fsync"] += 1
        real_fsync(fd)

    def syncfs(fd: int) -> int:
        counts["syncfs"] += 1
        return 0

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(atomic, "_syncfs", syncfs)
    monkeypatch.setattr(atomic, "_dirty_bytes", lambda: 0)  # nothing else to write back
    return counts


@pytest.fixture
def busy_disk(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """A gigabyte of other data waiting to be written back (a model download): records what
    is fsynced, by path, and fails the test on any filesystem sync."""
    synced: list[str] = []
    real_fsync = os.fsync

    def fsync(fd: int) -> None:
        synced.append(os.readlink(f"/proc/self/fd/{fd}"))
        real_fsync(fd)

    def syncfs(fd: int) -> int:
        raise AssertionError("syncfs with a gigabyte dirty: every commit would wait for it")

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(atomic, "_syncfs", syncfs)
    monkeypatch.setattr(atomic, "_dirty_bytes", lambda: 1 << 30)
    return synced


def test_a_batch_of_writes_costs_two_syncs_and_appears_only_at_the_commit(
    tmp_path: Path, syncs: dict[str, int]
) -> None:
    targets = [tmp_path / f"r{i}.json" for i in range(50)]
    with atomic.group() as batch:
        for i, path in enumerate(targets):
            atomic.write_bytes(path, f"{i}\n".encode())
        assert not any(p.exists() for p in targets)  # nothing visible before the commit
        assert all(atomic.exists(p) for p in targets)  # but the block sees its own writes
        assert atomic.read_bytes(targets[7]) == b"7\n"
    assert [p.read_text() for p in targets] == [f"{i}\n" for i in range(50)]
    assert syncs == {"fsync": 0, "syncfs": 2} and batch.syncs == 2
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(p.name for p in targets)


def test_writes_outside_a_group_are_fsynced_one_by_one(
    tmp_path: Path, syncs: dict[str, int]
) -> None:
    atomic.write_bytes(tmp_path / "a.json", b"a")
    assert syncs == {"fsync": 2, "syncfs": 0}  # the file, then its folder


def test_with_a_busy_disk_a_batch_fsyncs_its_own_files_and_folders_not_the_filesystem(
    tmp_path: Path, busy_disk: list[str]
) -> None:
    from state import events

    res, active, done = (tmp_path / d for d in ("results", "active", "done"))
    for folder in (res, active, done):
        folder.mkdir()
    (active / "a.task.yaml").write_text("prompt: hi\n")
    log = events.EventLog(res / "a.events.jsonl")
    with atomic.group() as batch:
        log.extend("end", [{"tokens_out": 1}], ts="t")  # terminal: synced by the commit
        atomic.write_bytes(res / "a.json", b"{}")
        atomic.write_bytes(res / "b.json", b"[]")
        atomic.rename_durable(active / "a.task.yaml", done / "a.task.yaml")
        assert busy_disk == []  # nothing synced before the commit
    data, folders = busy_disk[:3], busy_disk[3:]
    assert sorted(Path(p).name for p in data[:2]) == sorted(
        [
            f".a.json.{os.getpid()}.g{batch.serial}.0.tmp",
            f".b.json.{os.getpid()}.g{batch.serial}.1.tmp",
        ]
    )  # each temporary file's data, before its rename
    assert data[2] == str(res / "a.events.jsonl")  # the terminal frame, before the result
    assert sorted(folders) == sorted(map(str, (res, active, done)))  # then the renames
    assert batch.syncs == 2
    assert (res / "a.json").read_bytes() == b"{}" and (done / "a.task.yaml").exists()


def test_with_a_busy_disk_created_files_are_fsynced_one_by_one(
    tmp_path: Path, busy_disk: list[str]
) -> None:
    created = atomic.create_many([(tmp_path / "x", b"1"), (tmp_path / "y", b"2")])
    assert created == [True, True] and (tmp_path / "y").read_bytes() == b"2"
    assert [Path(p).parent for p in busy_disk] == [tmp_path, tmp_path, tmp_path.parent]
    assert busy_disk[2] == str(tmp_path)  # the links, after both files' data


def test_the_filesystem_sync_is_chosen_only_while_little_else_is_dirty(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    dirty = atomic._dirty_bytes()
    assert isinstance(dirty, int) and dirty >= 0  # read from /proc/meminfo
    monkeypatch.setattr(atomic, "_syncfs", lambda fd: 0)
    for amount, files, cheap in [(0, 1, True), (64 << 20, 1, False), (64 << 20, 1000, True)]:
        monkeypatch.setattr(atomic, "_dirty_bytes", lambda amount=amount: amount)
        assert atomic._syncfs_is_cheap(files) is cheap
    monkeypatch.setattr(atomic, "_dirty_bytes", lambda: None)  # unknown: one file at a time
    assert not atomic._syncfs_is_cheap(1)


def test_renames_run_in_the_order_asked_so_a_task_file_moves_after_its_result(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    the_spool = spool.Spool(tmp_path / "spool").ensure()
    store = results.ResultStore(tmp_path / "results")
    (the_spool.active / "t.task.json").write_text("{}")
    order: list[str] = []
    real_replace = os.replace

    def replace(src: object, dst: object) -> None:
        order.append(Path(str(dst)).parent.name)
        real_replace(src, dst)  # type: ignore[arg-type]

    monkeypatch.setattr(os, "replace", replace)
    with atomic.group():
        store.write(results.Result(task_id="t", status="succeeded"))
        spool.finish(the_spool, "t.task.json")
        assert (the_spool.active / "t.task.json").exists()  # still there until the commit
    assert order == ["results", "done"]
    assert (the_spool.done / "t.task.json").exists()
    assert store.read("t") is not None and store.read("t").status == "succeeded"  # type: ignore[union-attr]


def test_a_file_written_twice_in_a_batch_ends_with_the_last_data(tmp_path: Path) -> None:
    store = results.ResultStore(tmp_path / "results")
    with atomic.group():
        store.write(results.Result(task_id="t", status="queued"))
        assert store.read("t").status == "queued"  # type: ignore[union-attr]
        store.write(results.Result(task_id="t", status="rejected"))
        assert store.read("t").status == "rejected"  # type: ignore[union-attr]
    assert json.loads(store.path("t").read_text())["status"] == "rejected"
    atomic.release_spares()  # the file the second write displaced: kept while the process runs
    assert [p.name for p in store.root.iterdir()] == ["t.json"]


def test_two_files_moved_to_one_name_in_a_batch_both_keep_their_own(tmp_path: Path) -> None:
    the_spool = spool.Spool(tmp_path / "spool").ensure()
    (the_spool.active / "a.task.json").write_text("first")
    (the_spool.incoming / "a.task.json").write_text("second")
    with atomic.group():
        spool.finish(the_spool, "a.task.json", failed=True)
        spool.quarantine(the_spool, the_spool.incoming / "a.task.json", {"why": "test"})
    kept = sorted(p.read_text() for p in the_spool.failed.iterdir() if "error" not in p.name)
    assert kept == ["first", "second"]


def test_a_session_turn_counted_in_the_batch_is_seen_by_the_next_task_of_the_batch(
    tmp_path: Path,
) -> None:
    store = sessions.SessionStore(tmp_path / "sessions")
    with atomic.group():
        sessions.count_turn(store, "s1", "t1", now=100.0)
        sessions.count_turn(store, "s1", "t2", now=101.0)
        assert not store._path("s1").exists()
    got = store.get("s1")
    assert got is not None and got.turns == 2


def test_a_session_forgotten_while_its_turn_commits_stays_forgotten(
    tmp_path: Path, held_commits: Any
) -> None:
    """DELETE /v1/sessions/{id} just after a task of the session ended: the turn's update of
    the session, still in the commit thread, must not bring the session back."""
    import threading

    store = sessions.SessionStore(tmp_path / "sessions")
    with atomic.group():
        sessions.count_turn(store, "s1", "t1", now=100.0)
        group = atomic.begin()
    atomic.hand_off(group)
    committing = threading.Thread(target=atomic.commit, args=(group,), daemon=True)
    committing.start()
    threading.Timer(0.3, held_commits.set).start()
    store.remove("s1")  # waits for the turn's commit, then removes the file
    committing.join(5)
    assert store.get("s1") is None and not store._path("s1").exists()


def test_a_failed_write_skips_the_rest_of_its_unit_and_no_other(tmp_path: Path) -> None:
    """One task's result path blocked (a folder where its file goes): its later operations
    (its task file's move) do not happen, the other task's all do, and the failure names
    the task whose write failed."""
    (tmp_path / "a.json").mkdir()
    (tmp_path / "a.task").write_text("a")
    (tmp_path / "b.task").write_text("b")
    (tmp_path / "done").mkdir()
    with pytest.raises(atomic.GroupFailed) as failed, atomic.group():
        with atomic.unit("a"):
            atomic.write_bytes(tmp_path / "a.json", b"{}")
            atomic.rename_durable(tmp_path / "a.task", tmp_path / "done" / "a.task")
        with atomic.unit("b"):
            atomic.write_bytes(tmp_path / "b.json", b"{}")
            atomic.rename_durable(tmp_path / "b.task", tmp_path / "done" / "b.task")
    assert set(failed.value.failures) == {"a"}
    assert failed.value.errno == 21  # raised as the write's own error: EISDIR
    assert (tmp_path / "b.json").read_bytes() == b"{}"
    assert sorted(p.name for p in (tmp_path / "done").iterdir()) == ["b.task"]
    assert (tmp_path / "a.task").exists() and (tmp_path / "a.json").is_dir()
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]


async def test_a_task_whose_result_path_is_blocked_holds_up_no_other_task(
    workspace: Workspace, serve: Any
) -> None:
    """A folder put where one task's result file goes (by hand, by a tool): the tasks
    committed in the same groups run and end as usual, and that task ends too, with its
    files in agreement, once the folder is gone."""
    import asyncio

    from tests.conftest import wait_for

    cfg = config()
    cfg["pools"][0] |= {"slots": 5, "sim": {"tokens_per_s": 40, "load_s": 0.0}}
    workspace.write_config(cfg)
    await serve()
    for name in ("v", "b1", "b2", "b3"):
        workspace.submit(f"{name}.task.yaml", task(name, max_tokens=40, prompt="same"))
    # a task naming its pool, not its model: its rebuilt result still names both, and the engine
    workspace.submit("w.task.yaml", task("w", model=None, pool="p1", max_tokens=40, prompt="x"))
    for name in ("v", "w"):
        await wait_for(
            lambda name=name: (workspace.result(name) or {}).get("status") == "running", 10, name
        )
    blocked, blocked_w = (workspace.root / "results" / f"{name}.json" for name in ("v", "w"))
    for folder in (blocked, blocked_w):
        folder.unlink()
        folder.mkdir()
    for name in ("b1", "b2", "b3"):
        result = await wait_terminal(workspace, name, 20)
        assert result["status"] == "succeeded", result
        assert result["source_file"] == f"spool/done/{name}.task.yaml"
        filed = workspace.spool.done / f"{name}.task.yaml"  # moved last, just after the result
        await wait_for(filed.exists, 5, f"{name}.task.yaml in spool/done")
    await asyncio.sleep(1.0)
    assert (workspace.spool.active / "v.task.yaml").exists()  # not filed without its result
    blocked.rmdir()
    blocked_w.rmdir()
    v = await wait_terminal(workspace, "v", 20)  # the 5 s recovery writes it from its log
    assert v["status"] == "succeeded" and v["tokens_out"] == 40, v
    assert v["source_file"] == "spool/done/v.task.yaml" and v["pool_id"] == "p1"
    w = await wait_terminal(workspace, "w", 20)
    assert w["status"] == "succeeded" and w["pool_id"] == "p1", w
    assert (w["model"], w["engine"]) == ("m1", "sim"), w
    await wait_for(lambda: (workspace.spool.done / "v.task.yaml").exists(), 10, "v filed")


def test_a_unit_that_failed_in_a_group_in_flight_is_skipped_in_the_next_one(
    tmp_path: Path,
) -> None:
    """A task's canceled result, in a group another thread commits, fails (a full disk, a
    folder in its way); the next group, built while that one was in flight, consumes the
    task's cancel request because its result was pending: that removal never happens (a
    restart would run the task again with no cancel left), another task's operations in it
    do, and the failure names the task. Once the failed group is behind, the task's writes
    are its own again (the retry of a failed write is not refused)."""
    import contextlib
    import threading

    result, request, other = tmp_path / "t.json", tmp_path / "t.cancel", tmp_path / "u.cancel"
    result.mkdir()  # the result's rename fails
    request.write_text("")
    other.write_text("")
    flying = atomic.begin()
    with atomic.group(), atomic.unit("t"):
        atomic.write_bytes(result, b'{"status": "canceled"}')
    atomic.hand_off(flying)
    assert atomic.read_bytes(result) == b'{"status": "canceled"}'  # what the next pass sees

    def commit_flying() -> None:
        with contextlib.suppress(atomic.GroupFailed):
            atomic.commit(flying)

    committing = threading.Thread(target=commit_flying, daemon=True)
    with pytest.raises(atomic.GroupFailed) as failed, atomic.group():
        with atomic.unit("t"):
            atomic.remove(request)
        with atomic.unit("u"):
            atomic.remove(other)
        committing.start()  # lands (failed) before this block's commit, or while it waits
    committing.join(5)
    assert set(flying.failures) == {"t"} and failed.value.errno == 21  # EISDIR
    assert set(failed.value.failures) == {"t"} and failed.value.repeated == {"t"}
    assert request.exists() and not other.exists()
    result.rmdir()
    with atomic.group(), atomic.unit("t"):  # the retry
        atomic.write_bytes(result, b'{"status": "canceled"}')
        atomic.remove(request)
    assert json.loads(result.read_bytes()) == {"status": "canceled"} and not request.exists()


def test_a_block_that_raises_still_commits_what_it_wrote(tmp_path: Path) -> None:
    path = tmp_path / "r.json"
    with pytest.raises(RuntimeError), atomic.group():
        atomic.write_bytes(path, b"kept")
        raise RuntimeError("a bug after the write")
    assert path.read_bytes() == b"kept"


def test_a_nested_block_joins_the_outer_one(tmp_path: Path, syncs: dict[str, int]) -> None:
    with atomic.group():
        atomic.write_bytes(tmp_path / "a", b"a")
        with atomic.group():
            atomic.write_bytes(tmp_path / "b", b"b")
        assert not (tmp_path / "b").exists()
    assert syncs["syncfs"] == 2 and (tmp_path / "a").exists() and (tmp_path / "b").exists()


def test_claiming_a_batch_syncs_each_spool_folder_once(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    the_spool = spool.Spool(tmp_path / "spool").ensure()
    names = [f"t{i}.task.json" for i in range(20)]
    for name in names:
        spool.deliver(the_spool, b"{}", name=name)
    synced: list[str] = []
    monkeypatch.setattr(atomic, "fsync_dir", lambda folder: synced.append(Path(folder).name))
    claimed = spool.claim_all(the_spool, [*names, "gone.task.json"])
    assert claimed == [the_spool.active / n for n in names] + [None]
    assert synced == ["active", "incoming"]  # active/ holds every file before incoming/ lets go
    assert os.listdir(the_spool.incoming) == []


async def test_a_burst_of_task_files_is_queued_in_one_group_commit(
    workspace: Workspace, serve: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Forty task files dropped at once: one pass claims and queues them all, and their
    queued results reach the disk in one commit (two syncs), not eighty fsyncs; every task
    still runs to its end with its files in order."""
    commits: list[list[str]] = []
    real_commit = atomic.commit

    def commit(group: atomic.Group, via: Any = None) -> None:
        commits.append([dst.name for _, dst, _ in group.ops if dst is not None])
        real_commit(group, via)

    monkeypatch.setattr(atomic, "commit", commit)
    workspace.write_config(config(queue={"capacity": 64, "full_policy": "reject"}))
    await serve()
    ids = [f"b{i:02d}" for i in range(40)]
    for task_id in ids:
        body = yaml.safe_dump(task(task_id, max_tokens=2))
        (workspace.spool.tmp / f"{task_id}.task.yaml").write_text(body)
    for task_id in ids:  # all land at once, as a burst does
        os.rename(
            workspace.spool.tmp / f"{task_id}.task.yaml",
            workspace.spool.incoming / f"{task_id}.task.yaml",
        )
    finished = [await wait_terminal(workspace, t, 30) for t in ids]
    assert {r["status"] for r in finished} == {"succeeded"}, [
        r["error"] for r in finished if r.get("error")
    ]
    # distinct names: the same commit may also hold the running result of a task started
    queued_together = max(len({f"{t}.json" for t in ids} & set(names)) for names in commits)
    assert queued_together == len(ids)
    for task_id in ids:
        assert [f.event for f in workspace.frames(task_id)][:2] == ["queued", "started"]
        assert (workspace.spool.done / f"{task_id}.task.yaml").exists()


def test_a_task_file_whose_move_is_pending_is_no_longer_listed_as_active(tmp_path: Path) -> None:
    """A recovery that runs in the same pass as a task's filing must not take the task file a
    second time (it was quarantined twice, with two error records, before this)."""
    the_spool = spool.Spool(tmp_path / "spool").ensure()
    (the_spool.active / "a.task.json").write_text("{}")
    (the_spool.active / "b.task.json").write_text("{}")
    with atomic.group():
        spool.finish(the_spool, "a.task.json", failed=True)
        assert spool.active_names(the_spool) == ["b.task.json"]
    assert spool.active_names(the_spool) == ["b.task.json"]


def test_a_flushed_group_is_not_committed_again(tmp_path: Path) -> None:
    """The daemon flushes its pending group when it stops; the commit already scheduled for
    that group must then do nothing (it would replay renames and removals by name)."""
    the_spool = spool.Spool(tmp_path / "spool").ensure()
    group = atomic.begin()
    with atomic.group():
        spool.consume_cancel(the_spool, "t1")
    atomic.commit(group)
    (the_spool.cancel / "t1").write_text("")  # a new request under the same id
    atomic.commit(group)  # the scheduled commit, after the flush
    assert (the_spool.cancel / "t1").exists()


def test_an_error_record_never_lands_on_an_entry_already_in_failed(tmp_path: Path) -> None:
    the_spool = spool.Spool(tmp_path / "spool").ensure()
    (the_spool.failed / "a.task.yaml.error.json").mkdir()  # a quarantined folder of that name
    (the_spool.incoming / "a.task.yaml").write_text("oops")
    with atomic.group():
        moved = spool.quarantine(the_spool, the_spool.incoming / "a.task.yaml", {"why": "x"})
    assert moved.read_text() == "oops"
    assert json.loads((the_spool.failed / f"{moved.name}.error.json").read_text()) == {"why": "x"}
    assert (the_spool.failed / "a.task.yaml.error.json").is_dir()


async def test_a_burst_is_listed_once_and_claimed_in_batches_oldest_first(
    workspace: Workspace, serve: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """150 task files at once: the claimer lists incoming/ once for the whole burst (each
    listing stats every waiting file) and takes it INTAKE_PER_PASS at a time, oldest first."""
    from reconciler import taking

    listings: list[int] = []
    real_names = spool.incoming_names

    def counted(the_spool: spool.Spool, **kw: Any) -> list[str]:
        names = real_names(the_spool, **kw)
        listings.append(len(names))
        return names

    monkeypatch.setattr(taking.spool, "incoming_names", counted)
    workspace.write_config(config(queue={"capacity": 200, "full_policy": "reject"}))
    await serve()
    ids = [f"q{i:03d}" for i in range(150)]
    for n, task_id in enumerate(ids):
        part = workspace.spool.tmp / f"{task_id}.task.yaml"
        part.write_text(yaml.safe_dump(task(task_id, max_tokens=1)))
        os.utime(part, ns=(10**18 + n, 10**18 + n))  # the order they were written in
    listings.clear()
    for task_id in ids:
        os.rename(
            workspace.spool.tmp / f"{task_id}.task.yaml",
            workspace.spool.incoming / f"{task_id}.task.yaml",
        )
    finished = [await wait_terminal(workspace, t, 30) for t in ids]
    assert {r["status"] for r in finished} == {"succeeded"}
    big = [n for n in listings if n > taking.INTAKE_PER_PASS]
    assert len(big) == 1, listings  # one listing saw more than one batch: the burst's
    accepted = [r["timings"]["accepted_at"] for r in finished]
    assert accepted == sorted(accepted)  # claimed oldest first, batch after batch


async def test_no_task_is_started_before_its_queued_result_is_on_disk(
    workspace: Workspace, serve: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The `started` frame goes to the event log at once; the queued result waits for its
    group commit. Were a task started before that commit, a crash in between would leave a
    started task with no result, re-run as attempt 1 a second time (the fault suite found
    this). So every `started` frame must find the task's result already on disk."""
    from state import events

    early: list[str] = []
    real_extend = events.EventLog.extend

    def extend(log: events.EventLog, event: Any, items: Any, *, ts: str, **kw: Any) -> Any:
        if (
            event == "started"
            and not log.path.with_name(log.path.name.replace(".events.jsonl", ".json")).exists()
        ):
            early.append(log.path.name)
        return real_extend(log, event, items, ts=ts, **kw)

    monkeypatch.setattr(events.EventLog, "extend", extend)
    await serve()
    ids = [f"o{i:02d}" for i in range(12)]
    for task_id in ids:
        workspace.submit(f"{task_id}.task.yaml", task(task_id, max_tokens=2))
    for task_id in ids:
        assert (await wait_terminal(workspace, task_id, 30))["status"] == "succeeded"
    assert early == []


async def test_a_task_its_files_cannot_be_written_for_waits_and_runs_once_they_can(
    workspace: Workspace, serve: Any
) -> None:
    """A folder where the task's event log goes (so results/ cannot take its file, as with
    permissions taken away): the task is not refused as a bug; it waits in spool/active/,
    and runs once the path is writable again."""
    from tests.conftest import wait_for

    await serve()
    blocker = workspace.root / "results" / "stuck.events.jsonl"
    blocker.mkdir(parents=True)
    workspace.submit("stuck.task.yaml", task("stuck", max_tokens=3))
    await wait_for(lambda: (workspace.spool.active / "stuck.task.yaml").exists(), 10, "claimed")
    import asyncio

    await asyncio.sleep(1.0)
    assert list(workspace.spool.failed.iterdir()) == []  # never quarantined
    assert (workspace.spool.active / "stuck.task.yaml").exists()
    blocker.rmdir()
    result = await wait_terminal(workspace, "stuck", 20)  # taken again by the 5 s recovery
    assert result["status"] == "succeeded", result


async def test_a_folder_in_a_tasks_way_at_startup_never_stops_the_daemon(
    workspace: Workspace, serve: Any
) -> None:
    """A task left in active/ whose result path holds a folder (and another whose event
    log's does): the daemon starts and serves the rest; those two wait, and run or are
    filed once the folders are gone."""
    from tests.conftest import wait_for

    results_dir = workspace.root / "results"
    results_dir.mkdir(exist_ok=True)
    workspace.spool.ensure()
    for name in ("res", "log"):
        (workspace.spool.active / f"{name}.task.yaml").write_text(
            yaml.safe_dump(task(name, max_tokens=3))
        )
    (results_dir / "res.json").mkdir()
    (results_dir / "log.events.jsonl").mkdir()
    await serve()
    workspace.submit("other.task.yaml", task("other", max_tokens=3))
    assert (await wait_terminal(workspace, "other", 15))["status"] == "succeeded"
    assert (workspace.spool.active / "res.task.yaml").exists()
    (results_dir / "res.json").rmdir()
    (results_dir / "log.events.jsonl").rmdir()
    for name in ("res", "log"):
        result = await wait_terminal(workspace, name, 20)
        assert result["status"] == "succeeded", result
    await wait_for(lambda: not list(workspace.spool.active.iterdir()), 10, "active/ empty")


async def test_a_folder_where_a_queued_tasks_result_goes_holds_it_back_not_fails_it(
    workspace: Workspace, serve: Any
) -> None:
    """The folder appears while the task waits; when its turn comes its running result
    cannot be written: it is not failed for that, it waits and runs once the folder goes."""
    import asyncio

    from tests.conftest import wait_for

    cfg = config()
    cfg["pools"][0] |= {"slots": 1, "sim": {"tokens_per_s": 20, "load_s": 0.0}}
    workspace.write_config(cfg)
    await serve()
    workspace.submit("first.task.yaml", task("first", max_tokens=20))
    await wait_for(lambda: (workspace.result("first") or {}).get("status") == "running", 10, "run")
    workspace.submit("next.task.yaml", task("next", max_tokens=3))
    await wait_for(lambda: (workspace.result("next") or {}).get("status") == "queued", 10, "q")
    blocked = workspace.root / "results" / "next.json"
    blocked.unlink()
    blocked.mkdir()
    assert (await wait_terminal(workspace, "first", 15))["status"] == "succeeded"
    await asyncio.sleep(1.0)
    assert (workspace.spool.active / "next.task.yaml").exists()
    blocked.rmdir()
    result = await wait_terminal(workspace, "next", 20)
    assert result["status"] == "succeeded", result


def _books(tmp_path: Path) -> tuple[Any, Any]:
    """Books over a fresh folder, and a factory of its task records."""
    from reconciler import clocks, fanout, tasking
    from state import tasks

    store = results.ResultStore(tmp_path / "results")
    books = tasking.Books(
        spool.Spool(tmp_path / "spool").ensure(), store, fanout.Hub(), clocks.RealClock()
    )

    def run(task_id: str) -> tasking.TaskRun:
        body = tasks.TaskFile.model_validate(task(task_id))
        return tasking.new_run(
            task_id,
            body,
            f"{task_id}.task.json",
            store=store,
            revision=None,
            clock=clocks.RealClock(),
        )

    return books, run


@pytest.fixture
def held_commits(monkeypatch: pytest.MonkeyPatch) -> Any:
    """Every group commit waits at its first sync until the test lets it go."""
    import threading

    gate = threading.Event()
    real = atomic._sync_files

    def sync_files(files: Any, **kw: Any) -> None:
        gate.wait(10)
        real(files, **kw)

    monkeypatch.setattr(atomic, "_sync_files", sync_files)
    yield gate
    gate.set()


async def test_a_slow_commit_never_holds_up_the_event_loop(
    tmp_path: Path, held_commits: Any
) -> None:
    """The syncs and renames run in the commit thread: while the disk takes its time, the loop
    keeps serving (streams, HTTP answers), and the result appears once the commit lands."""
    import asyncio

    books, new = _books(tmp_path)
    run = new("t1")
    books.save(run)
    ticks = 0

    async def ticking() -> None:
        nonlocal ticks
        while True:
            await asyncio.sleep(0.01)
            ticks += 1

    ticker = asyncio.create_task(ticking())
    settled = asyncio.create_task(books.settled("t1"))
    await asyncio.sleep(0.3)  # the commit is held at its sync all this while
    assert ticks >= 10 and not settled.done()
    assert not books.results.path("t1").exists()  # nothing visible before the commit
    held_commits.set()
    await asyncio.wait_for(settled, 5)
    ticker.cancel()
    assert json.loads(books.results.path("t1").read_text())["status"] == "queued"
    books.flush()


async def test_what_a_commit_in_flight_will_write_is_seen_by_the_loop_and_kept_in_order(
    tmp_path: Path, held_commits: Any
) -> None:
    """While a group is being committed by the commit thread, the loop reads what it will
    write; a later group commits after it; a write outside any group to one of its paths waits
    for it, so the older commit can never undo the newer write."""
    import asyncio
    import threading

    books, new = _books(tmp_path)
    first, second = new("t1"), new("t2")
    books.save(first)
    await asyncio.sleep(0.05)  # handed to the commit thread, held at its sync
    assert books.results.read("t1") is not None  # seen through the commit in flight
    assert not books.results.path("t1").exists()
    second.result.status = "running"
    books.save(second)  # the next group, committed after the first
    first.result.status = "running"
    path = books.results.path("t1")
    threading.Timer(0.2, held_commits.set).start()
    atomic.write_bytes(path, results.encode(first.result))  # waits for the commit in flight
    await asyncio.wait_for(books.settled(), 5)
    assert json.loads(path.read_text())["status"] == "running"  # not undone by the older commit
    assert json.loads(books.results.path("t2").read_text())["status"] == "running"
    assert not [p.name for p in path.parent.iterdir() if p.name.endswith(".tmp")]
    books.flush()


async def test_a_task_waits_for_its_own_writes_only(tmp_path: Path, held_commits: Any) -> None:
    """A task about to start waits for its own queued result, not for a commit of other
    tasks' writes that the disk is slow to finish."""
    import asyncio

    books, new = _books(tmp_path)
    books.save(new("t1"))
    await asyncio.sleep(0.05)  # in the commit thread, held at its sync
    await asyncio.wait_for(books.settled("t2"), 1)  # t2 wrote nothing since: no wait
    mine = asyncio.create_task(books.settled("t1"))
    await asyncio.sleep(0.1)
    assert not mine.done()
    held_commits.set()
    await asyncio.wait_for(mine, 5)
    books.flush()


async def test_a_task_whose_write_failed_at_a_commit_writes_nothing_in_the_next(
    tmp_path: Path, held_commits: Any
) -> None:
    """A task's queued frame and result fail at their commit (a full disk) while its next
    writes collect in the group behind it: those are not carried out either (its log would
    go on after a frame that was never written), its waiters fail, and the taker is told."""
    import asyncio

    from state import failpoints

    books, new = _books(tmp_path)
    told: list[str] = []
    books.write_failed = lambda task_id, exc: told.append(task_id)
    run, other = new("t1"), new("t2")
    failpoints.configure("frame_write=enospc@1")
    try:
        books.queued(run, position=0, predicted_start_ms=None, on_time_probability=None)
        await asyncio.sleep(0.05)  # in the commit thread, held
        books.queued(other, position=1, predicted_start_ms=None, on_time_probability=None)
        books.finish(run, "canceled", finish_reason="canceled")  # behind the failed group
        mine = asyncio.create_task(books.settled("t1"))
        held_commits.set()
        with pytest.raises(OSError, match="No space"):
            await asyncio.wait_for(mine, 5)
        await asyncio.wait_for(books.settled("t2"), 5)
    finally:
        failpoints.configure("")
    assert told == ["t1"]
    assert not books.results.path("t1").exists()
    log = books.results.events_path("t1")  # created by the failed append, and empty: not an
    assert not log.exists() or log.read_bytes() == b""  # `error` frame where no `queued` is
    assert json.loads(books.results.path("t2").read_text())["status"] == "queued"
    books.flush()


async def test_a_cancel_request_is_consumed_only_once_the_canceled_result_is_on_disk(
    tmp_path: Path, held_commits: Any
) -> None:
    """A canceled result still in the commit thread (the disk slow) is already seen by the
    next pass, which consumes the cancel request in a group of its own: that group lands
    after the one in flight, so the request never leaves the disk before the result that
    answers it (a power loss in between would lose the cancel)."""
    import asyncio
    import threading
    import types

    from reconciler import cancelling, clocks

    books, new = _books(tmp_path)
    run = new("x")
    (books.spool.active / run.file_name).write_text("{}")
    spool.request_cancel(books.spool, "x")
    run.cancel_requested = True
    books.finish(run, "canceled", finish_reason="canceled")
    await asyncio.sleep(0.05)  # handed to the commit thread, held at its sync
    threading.Timer(0.3, held_commits.set).start()
    with atomic.group():  # the next pass: nothing of it goes through Books
        cancelling.apply(
            the_spool=books.spool,
            store=books.results,
            dispatcher=types.SimpleNamespace(runs={}),
            clock=clocks.RealClock(),
        )
    assert not (books.spool.cancel / "x").exists()
    assert json.loads(books.results.path("x").read_text())["status"] == "canceled"
    books.flush()


async def test_a_cancel_request_for_a_finished_task_is_dropped_once(
    tmp_path: Path, held_commits: Any, caplog: pytest.LogCaptureFixture
) -> None:
    """A request for a task that had already succeeded is dropped, and said so, once: the
    passes that run while its removal is still in the commit thread do not see it again."""
    import asyncio
    import threading
    import types

    from reconciler import cancelling, clocks

    books, new = _books(tmp_path)
    run = new("x")
    (books.spool.active / run.file_name).write_text("{}")
    held_commits.set()
    books.finish(run, "succeeded", finish_reason="stop")
    books.flush()
    spool.request_cancel(books.spool, "x")
    held_commits.clear()
    caplog.set_level("INFO", logger="llama_orch")
    passes = 3
    for _ in range(passes):  # each pass's group handed off, its commit held
        with atomic.group():
            cancelling.apply(
                the_spool=books.spool,
                store=books.results,
                dispatcher=types.SimpleNamespace(runs={}),
                clock=clocks.RealClock(),
            )
            group = atomic.begin()
        atomic.hand_off(group)
        threading.Thread(target=atomic.commit, args=(group,), daemon=True).start()
        await asyncio.sleep(0.01)
    held_commits.set()
    told = [r for r in caplog.records if getattr(r, "orch_event", "") == "task.cancel_dropped"]
    assert len(told) == 1, [r.getMessage() for r in told]
    books.flush()


async def test_a_cancel_request_stays_when_the_canceled_result_cannot_be_written(
    tmp_path: Path,
) -> None:
    """A queued task is canceled, and its canceled result fails at the commit (a full disk):
    the cancel request is one of the task's own writes, so it is not consumed either; the
    task waits in active/ and the request is applied again once the disk has room."""
    import asyncio

    from reconciler import cancelling, clocks
    from state import failpoints

    books, new = _books(tmp_path)
    run = new("x")
    (books.spool.active / run.file_name).write_text("{}")
    books.queued(run, position=0, predicted_start_ms=None, on_time_probability=None)
    await asyncio.wait_for(books.settled("x"), 5)
    spool.request_cancel(books.spool, "x")

    class Dispatcher:
        def __init__(self) -> None:
            self.runs = {"x": run}

        def cancel(self, task_id: str) -> bool:
            run.cancel_requested = True
            books.finish(run, "canceled", finish_reason="canceled")
            return True

    failpoints.configure("result_write=enospc@1")
    try:
        with atomic.group():  # a pass
            cancelling.apply(
                the_spool=books.spool,
                store=books.results,
                dispatcher=Dispatcher(),  # type: ignore[arg-type]
                clock=clocks.RealClock(),
            )
        with pytest.raises(OSError, match="No space"):
            await asyncio.wait_for(books.settled("x"), 5)
    finally:
        failpoints.configure("")
    assert json.loads(books.results.path("x").read_text())["status"] == "queued"
    assert (books.spool.cancel / "x").exists()  # still asked for
    assert (books.spool.active / run.file_name).exists()
    books.flush()


def test_a_write_replaced_in_the_same_commit_is_never_written(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A task whose end is written in the commit that also holds its running result: that
    result is replaced before anything is written (one file created, not two); the write of
    another unit, or one the path was moved away from in between, is still carried out."""
    filled: list[bytes] = []
    real_fill = atomic._fill

    def fill(tmp: Path, data: bytes, **kw: Any) -> None:
        filled.append(data)
        real_fill(tmp, data, **kw)

    monkeypatch.setattr(atomic, "_fill", fill)
    a, b, moved = tmp_path / "a.json", tmp_path / "b.json", tmp_path / "moved.json"
    group = atomic.begin()
    for unit, path, data in [("t", a, b"running"), ("t", b, b"b-1"), ("t", a, b"succeeded")]:
        with atomic.group(), atomic.unit(unit):
            atomic.write_bytes(path, data)
    with atomic.group(), atomic.unit("u"):  # another task's write to b: not replaced
        atomic.write_bytes(b, b"b-2")
    with atomic.group(), atomic.unit("t"):
        atomic.rename_durable(b, moved)  # b moved away: the next write of b is its own
        atomic.write_bytes(b, b"b-3")
    assert atomic.read_bytes(a) == b"succeeded" and not a.exists()  # only at the commit
    atomic.commit(group)
    assert a.read_bytes() == b"succeeded"
    assert moved.read_bytes() == b"b-2" and b.read_bytes() == b"b-3"
    assert sorted(filled) == sorted([b"succeeded", b"b-1", b"b-2", b"b-3"])  # no b"running"
    atomic.release_spares()  # b-1, displaced by b-2: kept for a later write while we run
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.json", "b.json", "moved.json"]


async def test_an_engine_that_ends_before_the_running_result_lands_frees_its_slot_at_once(
    workspace: Workspace, serve: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The engine is asked while the running result commits. One that ends first (a short
    answer, a slow disk) hands its slot to the next task at once, but nothing of its tokens
    is seen (log, SSE) before the running result is on disk: its frames are held for the
    commit after it, and published once that has landed."""
    import asyncio
    import threading

    from tests.conftest import wait_for

    gate = threading.Event()
    real_sync = atomic._sync_files

    def sync_files(files: Any, **kw: Any) -> None:  # holds the commit of a's running result
        for path in files:
            if path.name.startswith(".a.json.") and b'"running"' in path.read_bytes():
                gate.wait(20)
        real_sync(files, **kw)

    monkeypatch.setattr(atomic, "_sync_files", sync_files)
    # the daemon's commits in its commit thread, where this test can hold them
    monkeypatch.setattr(committer.Committer, "start", lambda self: None)
    monkeypatch.setattr(committer.Committer, "commit", lambda self, group: atomic._commit(group))
    cfg = config()
    cfg["pools"][0] |= {"slots": 1, "sim": {"tokens_per_s": 2000, "load_s": 0.0}}
    workspace.write_config(cfg)
    running = await serve()
    sub = running.daemon.books.hub.subscribe("a", workspace.root / "results" / "a.events.jsonl")
    seen: list[str] = []

    async def read() -> None:
        async for frame in sub.frames():
            seen.append(frame.event)

    reader = asyncio.create_task(read())
    workspace.submit("a.task.yaml", task("a", max_tokens=4))
    workspace.submit("b.task.yaml", task("b", max_tokens=4))
    logs = workspace.root / "results"

    def events_of(task_id: str) -> list[str]:
        path = logs / f"{task_id}.events.jsonl"
        return [json.loads(line)["event"] for line in path.read_text().splitlines()]

    # the one slot went on to b while a's running result is still held at its commit
    await wait_for(lambda: "started" in events_of("b"), 10, "b started")
    assert "token" not in events_of("a") and "end" not in events_of("a")
    assert json.loads((logs / "a.json").read_text())["status"] == "queued"
    assert "token" not in seen and "end" not in seen
    gate.set()
    a = await wait_terminal(workspace, "a", 10)
    assert a["status"] == "succeeded" and a["tokens_out"] == 4
    assert (await wait_terminal(workspace, "b", 10))["status"] == "succeeded"
    frames = [json.loads(line) for line in (logs / "a.events.jsonl").read_text().splitlines()]
    assert [f["id"] for f in frames] == list(range(1, len(frames) + 1))
    assert [f["event"] for f in frames if f["event"] != "metrics"] == [
        "queued",
        "started",
        "token",
        "token",
        "token",
        "token",
        "end",
    ]
    await asyncio.wait_for(reader, 5)
    assert seen[-1] == "end" and seen.count("token") == 4


def test_frames_held_for_a_commit_are_appended_in_one_write_and_in_order(tmp_path: Path) -> None:
    """A task's frames held for the commit go to its log in one append per run of frames,
    in order with its other writes: the frames before its result, the result after them."""
    log, result = tmp_path / "t.events.jsonl", tmp_path / "t.json"
    log.write_bytes(b"1\n")
    group = atomic.begin()
    with atomic.group(), atomic.unit("t"):
        assert atomic.append(log, b"2\n", new=False, held=True)
        assert atomic.append(log, b"3\n", new=False, held=True)
        atomic.write_bytes(result, b"{}")
        assert atomic.append(log, b"4\n", new=False, held=True)
    assert [kind for _, _, kind in group.ops] == ["append", "file", "append"]
    assert log.read_bytes() == b"1\n"  # nothing before the commit
    atomic.commit(group)
    assert log.read_bytes() == b"1\n2\n3\n4\n" and result.read_bytes() == b"{}"


async def test_held_frames_in_the_log_are_sent_even_where_the_tasks_result_failed(
    tmp_path: Path,
) -> None:
    """A task's held frames are appended before its result is renamed: where that rename
    fails (a folder in the way, a full disk), the frames its log now has still reach the
    SSE readers, so one waiting for the end is not left waiting (the recovery pass finishes
    the task from its log)."""
    import asyncio

    books, new = _books(tmp_path)
    run = new("t")
    (books.spool.active / "t.task.json").write_text("{}")
    books.queued(run, position=1, predicted_start_ms=None, on_time_probability=None)
    await books.settled("t")
    seen: list[str] = []

    async def read() -> None:
        async for frame in books.hub.subscribe("t", run.log.path).frames():
            seen.append(frame.event)

    reader = asyncio.create_task(read())
    await asyncio.sleep(0.05)  # it has read the log (queued) and waits for live frames
    books.results.path("t").unlink()
    books.results.path("t").mkdir()
    run.held = []
    books.frames(run, "token", [{"t": "a", "i": 0}])
    books.finish(run, "succeeded", finish_reason="stop")
    await asyncio.wait_for(reader, 5)
    assert seen == ["queued", "token", "end"]
    assert [f["event"] for f in map(json.loads, run.log.path.read_text().splitlines())] == seen
    books.flush()
