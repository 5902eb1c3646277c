"""Task files dropped into a running daemon: good ones run, bad ones are explained, none lost."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import yaml

from state import errors, results
from state.errors import ErrorCode
from tests.conftest import Workspace, config, task, wait_for, wait_terminal


async def test_a_task_file_runs_and_its_result_and_event_log_agree(
    workspace: Workspace, serve: Any
) -> None:
    await serve()
    workspace.submit("t1.task.yaml", task("t1", seed=3, max_tokens=6))
    result = await wait_terminal(workspace, "t1")
    assert result["status"] == "succeeded"
    assert result["tokens_out"] == 6 and result["pool_id"] == "p1"
    assert result["gpu"]["simulated"] is True
    assert result["queue_position"] == 0 and result["predicted_start_ms"] is not None
    frames = workspace.frames("t1")
    names = [f.event for f in frames]
    assert names[0] == "queued" and names[1] == "started" and names[-1] == "end"
    assert [f.id for f in frames] == list(range(1, len(frames) + 1))
    tokens = [f.data for f in frames if f.event == "token"]
    assert [t["i"] for t in tokens] == list(range(6))
    assert "".join(t["t"] for t in tokens) == result["text"]
    assert any(
        f.event == "metrics" and "queue_depth" in f.data and "on_time_probability" in f.data
        for f in frames
    )
    assert (workspace.spool.done / "t1.task.yaml").exists()


async def test_the_same_seed_gives_the_same_text(workspace: Workspace, serve: Any) -> None:
    await serve()
    workspace.submit("a.task.yaml", task("a", seed=11))
    workspace.submit("b.task.yaml", task("b", seed=11))
    workspace.submit("c.task.yaml", task("c", seed=12))
    a, b, c = [await wait_terminal(workspace, t) for t in "abc"]
    assert a["text"] == b["text"] != c["text"]


BAD_INPUTS: dict[str, tuple[bytes, str]] = {
    "syntax.task.yaml": (b"model: m1\nprompt: [oops\nmax_tokens: 3\n", "not valid YAML"),
    "typo.task.yaml": (b"model: m1\nprompt: hi\nmax_tokns: 3\n", "unknown key"),
    "type.task.json": (b'{"model": "m1", "prompt": "hi",\n "max_tokens": "many"}', "integer"),
    "utf8.task.yaml": (b"model: m1\nprompt: caf\xe9\nmax_tokens: 3\n", "not valid UTF-8"),
    "empty.task.yaml": (b"", "must be a mapping"),
    "huge.task.yaml": (b"prompt: " + b"x" * (1024 * 1024 + 1) + b"\n", "over the limit"),
    "trick.task.yaml": (
        b"task_id: ../../etc/passwd\nmodel: m1\nprompt: hi\nmax_tokens: 3\n",
        "task_id",
    ),
    "notes.txt": (b"hello", "not a task file"),
}


async def test_every_kind_of_bad_input_is_quarantined_with_its_location(
    workspace: Workspace, serve: Any
) -> None:
    await serve()
    for name, (raw, _) in BAD_INPUTS.items():
        (workspace.spool.incoming / name).write_bytes(raw)
    (workspace.spool.incoming / "link.task.yaml").symlink_to(workspace.root / "orch.yaml")
    workspace.submit("good.task.yaml", task("good"))
    assert (await wait_terminal(workspace, "good"))["status"] == "succeeded"
    for name, (_, expected) in BAD_INPUTS.items():
        error_file = workspace.spool.failed / f"{name}.error.json"
        # an empty file just written may be one still being written: refused a pass later
        await wait_for(error_file.exists, 10, f"{name} refused")
        error = json.loads(error_file.read_text())
        assert error["code"] == "INVALID_TASK_FILE", name
        assert expected in error["message"], (name, error["message"])
        assert error["hint"], name
        assert error["hint"] not in error["message"], name  # said once, in its own field
        assert (workspace.spool.failed / name).exists()
    typo = json.loads((workspace.spool.failed / "typo.task.yaml.error.json").read_text())
    assert (typo["line"], typo["field"]) == (3, "max_tokns")
    assert "did you mean 'max_tokens'" in typo["hint"]
    assert json.loads((workspace.spool.failed / "link.task.yaml.error.json").read_text())
    assert list(workspace.spool.incoming.iterdir()) == []
    assert list(workspace.spool.active.iterdir()) == []


async def test_an_invalid_file_with_a_known_task_id_gets_a_rejected_result(
    workspace: Workspace, serve: Any
) -> None:
    await serve()
    workspace.submit("typo.task.yaml", "model: m1\nprompt: hi\nmax_tokns: 3\n")
    result = await wait_terminal(workspace, "typo")
    assert result["status"] == "rejected"
    assert result["error"]["code"] == "INVALID_TASK_FILE"
    assert "typo.task.yaml:3:1" in result["error"]["message"]
    assert [f.event for f in workspace.frames("typo")] == ["error"]


async def test_a_refused_files_record_and_result_name_it_where_it_lies_in_failed(
    workspace: Workspace, serve: Any
) -> None:
    """They named spool/active/, where it was read, and no longer is; a second file of one
    name lies in failed/ under a time-stamped name."""
    await serve()
    for turn in (1, 2):
        workspace.submit("typo.task.yaml", f"model: m1\nprompt: hi{turn}\nmax_tokns: 3\n")
        await wait_for(lambda t=turn: len(list(workspace.spool.failed.glob("*.error.json"))) == t)
    for record_file in workspace.spool.failed.glob("*.error.json"):
        record = json.loads(record_file.read_text())
        where = f"spool/failed/{record_file.name.removesuffix('.error.json')}"
        assert (workspace.root / where).is_file()
        assert record["path"] == where and record["problems"][0]["path"] == where
        assert record["message"].startswith(f"{where}:3:1: "), record["message"]
    result = await wait_terminal(workspace, "typo")
    assert result["error"]["message"].startswith(f"{result['source_file']}:3:1: "), result


async def test_a_duplicate_task_id_is_refused_and_the_first_result_is_kept(
    workspace: Workspace, serve: Any
) -> None:
    await serve()
    workspace.submit("d.task.yaml", task("dup"))
    first = await wait_terminal(workspace, "dup")
    workspace.submit("d2.task.yaml", task("dup", prompt="something else"))
    await wait_for(lambda: (workspace.spool.failed / "d2.task.yaml.error.json").exists())
    error = json.loads((workspace.spool.failed / "d2.task.yaml.error.json").read_text())
    assert error["code"] == "DUPLICATE_TASK_ID"
    assert workspace.result("dup") == first
    assert error["field"] == "task_id" and error["line"] and error["column"], error  # located


async def test_rejections_name_their_code_and_a_hint(workspace: Workspace, serve: Any) -> None:
    await serve()
    workspace.submit("u.task.yaml", task("u", model="nope"))
    workspace.submit("r.task.yaml", task("r", model="old"))
    workspace.submit("big.task.yaml", task("big", max_tokens=5000))
    workspace.submit("pin.task.yaml", task("pin", placement={"mode": "pin", "pin_pool": "zz"}))
    codes = {t: (await wait_terminal(workspace, t))["error"] for t in ("u", "r", "big", "pin")}
    assert codes["u"]["code"] == "MODEL_UNKNOWN" and "m1" in codes["u"]["hint"]
    assert codes["r"]["code"] == "MODEL_RETIRED" and "Active" in codes["r"]["hint"]
    assert codes["big"]["code"] == "INVALID_PARAMS" and "max_tokens" in codes["big"]["message"]
    assert codes["pin"]["code"] == "INVALID_PARAMS"  # no such pool: the task is wrong
    for error in codes.values():
        assert error["hint"] and isinstance(error["retriable"], bool)


async def test_without_watchdog_the_resync_still_delivers_every_task(
    workspace: Workspace, serve: Any
) -> None:
    await serve(watch=False, resync_s=0.2)
    for i in range(5):
        workspace.submit(f"n{i}.task.yaml", task(f"n{i}"))
    for i in range(5):
        assert (await wait_terminal(workspace, f"n{i}"))["status"] == "succeeded"


async def test_a_burst_is_estimated_as_a_whole_so_a_later_interactive_task_counts_as_ahead(
    workspace: Workspace, serve: Any
) -> None:
    """Three batch tasks and one interactive task land together: the interactive one is
    dispatched first, so every batch task's `queued` frame already counts it as ahead (each
    estimated alone, as it was taken, the first batch task was told it starts at once)."""
    await serve()
    for name in ("b1", "b2", "b3"):
        workspace.submit(f"{name}.task.yaml", task(name, max_tokens=8))
    workspace.submit("i1.task.yaml", task("i1", max_tokens=8, priority="interactive"))
    for name in ("b1", "b2", "b3", "i1"):
        await wait_terminal(workspace, name)
    queued = {
        name: next(f.data for f in workspace.frames(name) if f.event == "queued")
        for name in ("i1", "b1", "b2", "b3")
    }
    # i1 and b1 start at once on the two idle slots (no place in the queue: 0); b2 is the
    # first to wait, b3 the second
    assert [queued[n]["queue_position"] for n in ("i1", "b1", "b2", "b3")] == [0, 0, 0, 1]
    starts = [queued[n]["predicted_start_ms"] for n in ("i1", "b1", "b2", "b3")]
    # two slots: the interactive task and the first batch task start at once, the next two
    # wait for one of them, the last for the second of them too
    assert starts[0] == 0 and starts[1] == 0
    assert 0 < starts[2] <= starts[3]


async def test_a_drop_folder_wakes_the_loop_on_arrivals_and_not_on_the_daemons_own_claims(
    tmp_path: Any,
) -> None:
    """The watcher wakes the loop for a file renamed into incoming/, and does not wake it
    (nor spend its threads) for what claiming that file does there: a link and an unlink."""
    import asyncio
    import os

    from reconciler import watching

    drop, active = tmp_path / "incoming", tmp_path / "active"
    drop.mkdir()
    active.mkdir()
    woke = asyncio.Event()
    observer = watching.start(asyncio.get_running_loop(), woke, [], drops=[drop])
    try:
        (tmp_path / "a.part").write_text("{}")
        os.rename(tmp_path / "a.part", drop / "a.task.json")
        await asyncio.wait_for(woke.wait(), 5)
        await asyncio.sleep(0.3)  # anything else the arrival caused
        woke.clear()
        os.link(drop / "a.task.json", active / "a.task.json")
        os.unlink(drop / "a.task.json")
        await asyncio.sleep(0.5)
        assert not woke.is_set()
    finally:
        observer.stop()
        observer.join(5)


async def test_only_orch_yaml_wakes_the_loop_not_a_log_written_beside_it(tmp_path: Any) -> None:
    """`orchctl serve > serve.log` in orch.yaml's folder: each log line must not wake a pass
    (a line a pass logs would wake the next, back to back). orch.yaml edited in place, and a
    file renamed onto it, do wake it, and the rename is noted."""
    import asyncio
    import os

    from reconciler import watching

    config = tmp_path / "orch.yaml"
    config.write_text("version: 1\n")
    woke = asyncio.Event()
    renamed: dict[str, float] = {}
    observer = watching.start(asyncio.get_running_loop(), woke, [config], renamed)
    try:
        await asyncio.sleep(0.2)
        with (tmp_path / "serve.log").open("a") as log:
            for n in range(20):
                log.write(f"line {n}\n")
                log.flush()
        (tmp_path / "notes.txt").write_text("x")
        await asyncio.sleep(0.5)
        assert not woke.is_set()
        with config.open("a") as f:
            f.write("# edited\n")
        await asyncio.wait_for(woke.wait(), 5)
        woke.clear()
        (tmp_path / ".orch.yaml.swp").write_text("version: 1\n")
        os.rename(tmp_path / ".orch.yaml.swp", config)
        await asyncio.wait_for(woke.wait(), 5)
        for _ in range(250):  # (the wake may be the in-place edit's last event, a moment late)
            if str(config) in renamed:
                break
            await asyncio.sleep(0.02)
        assert str(config) in renamed
    finally:
        observer.stop()
        observer.join(5)


async def test_a_log_written_beside_orch_yaml_does_not_drive_passes(
    workspace: Workspace, serve: Any, monkeypatch: Any
) -> None:
    """The daemon's log in orch.yaml's folder (`orchctl serve > serve.log`): a pass per log
    line would be a busy loop as soon as every pass logs a line (a status.json it cannot
    write, a pass that fails)."""
    import asyncio

    from reconciler import daemon as daemons

    await serve()
    passes = 0
    real = daemons.Daemon.pass_once

    async def counted(self: Any, **kwargs: Any) -> None:
        nonlocal passes
        passes += 1
        await real(self, **kwargs)

    monkeypatch.setattr(daemons.Daemon, "pass_once", counted)
    with (workspace.root / "serve.log").open("a") as log:
        for n in range(100):
            log.write(f"line {n}\n")
            log.flush()
            await asyncio.sleep(0.01)
    assert passes <= 10, passes  # the resync's, every 0.5 s here, and the GPU polls


async def test_a_fault_in_the_estimates_queues_the_burst_without_predictions(
    workspace: Workspace, serve: Any, monkeypatch: Any
) -> None:
    """An error in the batch estimate (a bug) must not stop the loop nor strand the batch:
    the tasks are queued with their places and no predicted start, and they run."""
    from reconciler import rates

    def broken(*args: Any, **kwargs: Any) -> Any:
        raise ZeroDivisionError("a bug in the arithmetic")

    monkeypatch.setattr(rates.Rates, "predict_queued", broken)
    running = await serve()
    for name in ("e1", "e2", "e3"):
        workspace.submit(f"{name}.task.yaml", task(name, max_tokens=2))
    for name in ("e1", "e2", "e3"):
        assert (await wait_terminal(workspace, name))["status"] == "succeeded"
        queued = next(f.data for f in workspace.frames(name) if f.event == "queued")
        assert queued["predicted_start_ms"] is None and queued["queue_position"] is not None
    assert not running.job.done()


async def test_a_finished_tasks_result_names_where_its_file_was_filed(
    workspace: Workspace, serve: Any
) -> None:
    await serve()
    workspace.submit("filed.task.yaml", task("filed"))
    workspace.submit("nope.task.yaml", task("nope", model="ghost"))
    for task_id, folder in (("filed", "done"), ("nope", "failed")):
        result = await wait_terminal(workspace, task_id)
        assert result["source_file"] == f"spool/{folder}/{task_id}.task.yaml", result
        assert (workspace.root / result["source_file"]).is_file()


async def test_a_task_file_written_in_place_is_taken_whole_once_its_writer_closes_it(
    workspace: Workspace, serve: Any, caplog: Any
) -> None:
    """A task file written straight into incoming/ over time (`cat >`, a script that writes
    its parts one after another): its first part is often a whole valid task without what
    follows (the rest of the prompt, its labels, its priority). While a writer holds it
    open it is not taken; once closed it is, whole (the daemon logs how to drop files)."""
    import asyncio

    caplog.set_level("INFO", logger="llama_orch")
    running = await serve()
    first = "task_id: inplace\nmodel: m1\nmax_tokens: 4\nprompt: |\n  first line\n"
    rest = "  second line\nlabels: {run: '42'}\npriority: interactive\n"
    with open(workspace.spool.incoming / "inplace.task.yaml", "w") as fh:
        fh.write(first)
        fh.flush()
        await asyncio.sleep(0.6)  # passes came (the create woke one); the file waits
        assert (workspace.spool.incoming / "inplace.task.yaml").exists()
        assert workspace.result("inplace") is None
        fh.write(rest)
    result = await wait_terminal(workspace, "inplace", timeout=15)
    assert result["status"] == "succeeded", result
    assert result["labels"] == {"run": "42"}
    frames = workspace.frames("inplace")
    assert frames[0].event == "queued"
    said = [r for r in caplog.records if getattr(r, "orch_event", "") == "task.writer_open"]
    assert len(said) == 1 and "still open for writing" in said[0].getMessage()
    assert running.daemon.taker.writers_seen == set()


async def test_a_task_file_cut_at_a_line_end_inside_a_quoted_string_is_put_off_not_refused(
    workspace: Workspace, serve: Any
) -> None:
    """A writer that closes the file between its parts, caught after one ending at a line's
    end inside a multi-line quoted string (or a list, or a JSON object): the parser ran into
    the end of the text, so it is put off like one cut mid-line, and read again whole.
    (With inotify on, a file written in place waits in incoming/ until it is still: this is
    what is left when the watcher did not see it written, here with watching off.)"""
    import asyncio

    running = await serve(watch=False, resync_s=0.2)
    first = 'task_id: quoted\nmodel: m1\nmax_tokens: 4\nprompt: "first line\n'
    (workspace.spool.incoming / "quoted.task.yaml").write_text(first)
    await wait_for(lambda: not any(workspace.spool.incoming.iterdir()), 5, "the claim")
    await asyncio.sleep(0.3)  # read, found cut short, put off
    assert not any(workspace.spool.failed.iterdir())
    with open(workspace.spool.active / "quoted.task.yaml", "a") as fh:  # where it went
        fh.write('  second line"\n')
    result = await wait_terminal(workspace, "quoted", timeout=15)
    assert result["status"] == "succeeded", result
    assert running.daemon.taker.half_read == {}  # nothing kept of it once whole


async def test_a_cancel_is_logged_as_requested_before_the_task_is_logged_canceled(
    workspace: Workspace, serve: Any, caplog: Any
) -> None:
    """The daemon's log tells a cancel in the order it happened: requested, then canceled,
    and the request once, however many passes see its file before the task has ended."""
    from state import spool

    caplog.set_level("INFO", logger="llama_orch")
    await serve()
    for name in ("hog1", "hog2", "waits"):  # two slots busy: the third task stays queued
        workspace.submit(f"{name}.task.yaml", task(name, max_tokens=400))
    await wait_for(lambda: (workspace.result("waits") or {}).get("status") == "queued", 10, "q")
    for task_id in ("waits", "hog1"):  # a queued task, then a running one
        spool.request_cancel(workspace.spool, task_id)
        assert (await wait_terminal(workspace, task_id))["status"] == "canceled"
        events = [
            e
            for r in caplog.records
            if (e := getattr(r, "orch_event", "")) in ("task.cancel", "task.canceled")
            and getattr(r, "orch_fields", {}).get("task_id") == task_id
        ]
        assert events[:2] == ["task.cancel", "task.canceled"], (task_id, events)
        assert events.count("task.cancel") == 1, (task_id, events)


async def test_ids_used_before_the_daemon_started_stay_used_and_freed_ones_are_free(
    workspace: Workspace, serve: Any
) -> None:
    """The daemon knows which ids results/ holds from one listing at its start (new ids are
    then checked without a lookup): an id whose result or event log was there before it
    started is refused, dots in the id included; one whose files were removed by hand while
    it runs is free again."""
    first = await serve()
    for task_id in ("fix.v2", "gone", "log.only"):
        workspace.submit(f"{task_id}.task.yaml", task(task_id))
        await wait_terminal(workspace, task_id)
    assert await first.stop() == 0
    (workspace.root / "results" / "log.only.json").unlink()  # its log stays: the id is used
    await serve()
    for task_id in ("fix.v2", "log.only"):
        workspace.submit(f"again-{task_id}.task.yaml", task(task_id, prompt="other"))
    for task_id in ("fix.v2", "log.only"):
        record = workspace.spool.failed / f"again-{task_id}.task.yaml.error.json"
        await wait_for(record.exists, what=f"the refusal of the second {task_id}")
        assert json.loads(record.read_text())["code"] == "DUPLICATE_TASK_ID"
    kept = workspace.result("fix.v2")
    assert kept is not None and kept["status"] == "succeeded"  # the first task's result
    # removed by hand, result and log, while the daemon runs: the id may be used again
    for name in ("gone.json", "gone.events.jsonl"):
        (workspace.root / "results" / name).unlink()
    workspace.submit("gone-again.task.yaml", task("gone", prompt="new"))
    again = await wait_terminal(workspace, "gone")
    assert again["status"] == "succeeded" and again["source_file"].endswith("gone-again.task.yaml")


def test_the_result_index_answers_only_for_ids_it_knows_to_have_no_files(tmp_path: Path) -> None:
    store = results.ResultStore(tmp_path)
    (tmp_path / "a.b.json").write_text("{}")
    (tmp_path / "c.events.jsonl").write_text("")
    assert not store.holds_nothing("zzz")  # not indexed yet: every id is looked up
    store.index()
    assert store.holds_nothing("zzz") and store.holds_nothing("a.b.c")
    assert not store.holds_nothing("a.b") and not store.holds_nothing("c")
    assert not store.holds_nothing("a")  # a prefix before a dot: looked up, never wrong
    assert not store.exists("zzz")
    store.path("zzz")  # a writer asks for the path first: from then on it is looked up
    assert not store.holds_nothing("zzz")
    (tmp_path / "zzz.json").write_text("{}")
    assert store.exists("zzz")
    store.events_path("yyy")
    assert not store.holds_nothing("yyy")


def test_a_half_written_file_read_again_at_once_is_put_off_again_not_refused(
    tmp_path: Path, monkeypatch: Any
) -> None:
    """The recovery pass may read a put-off file a moment after it was put off: it is put
    off again while it is young, and refused only once it has stayed the same for the grace
    period (a clock that says it was written in the future included)."""
    import os
    import time

    from reconciler import clocks, taking
    from state import spool

    the_spool = spool.Spool(tmp_path / "spool").ensure()
    taker = taking.Taker(
        the_spool,
        results.ResultStore(tmp_path / "results"),
        None,  # type: ignore[arg-type]
        None,  # type: ignore[arg-type]
        clocks.RealClock(),
        lambda: None,
    )
    path = the_spool.active / "half.task.yaml"
    path.write_text("task_id: half\nmodel: m1\nprom")
    assert taker._half_written(path) and taker._half_written(path)  # at once: put off again
    now = time.monotonic()
    monkeypatch.setattr(taking.time, "monotonic", lambda: now + taking.IN_PLACE_GRACE_S + 0.1)
    future = time.time() + 3600
    os.utime(path, (future, future))  # changed (its time): put off, since now
    assert taker._half_written(path)
    monkeypatch.setattr(taking.time, "monotonic", lambda: now + 2 * taking.IN_PLACE_GRACE_S + 1)
    assert not taker._half_written(path)  # the same for longer than the grace: meant
    assert taker.half_read == {}


async def test_task_files_renamed_into_incoming_leave_nothing_behind_in_the_daemon(
    workspace: Workspace, serve: Any
) -> None:
    """The watcher notes renames onto orch.yaml (an atomic save is applied at once); the
    task files renamed into incoming/ are not noted: kept, they grew the map by one entry
    per task for the daemon's whole life."""
    import os

    import yaml

    running = await serve()
    for i in range(5):  # as rsync and many tools save: a hidden temporary file beside it
        part = workspace.spool.incoming / f".r{i}.task.yaml.tmp"
        part.write_text(yaml.safe_dump(task(f"r{i}", max_tokens=2)))
        os.rename(part, workspace.spool.incoming / f"r{i}.task.yaml")
    for i in range(5):
        assert (await wait_terminal(workspace, f"r{i}"))["status"] == "succeeded"
    spool_root = str(workspace.spool.root)
    assert [p for p in running.daemon.config.renamed if p.startswith(spool_root)] == []


async def test_a_task_whose_file_was_removed_from_active_names_no_file_in_its_result(
    workspace: Workspace, serve: Any, caplog: Any
) -> None:
    """Someone removed a running task's file from spool/active/: the task ends, but its
    result must not name a file in spool/done/ that is not there; the log says what went."""
    caplog.set_level("INFO", logger="llama_orch")
    cfg = config()
    cfg["pools"][0]["sim"] = {"tokens_per_s": 40}
    workspace.write_config(cfg)
    await serve()
    workspace.submit("gone.task.yaml", task("gone", max_tokens=20))
    await wait_for(lambda: (workspace.result("gone") or {}).get("status") == "running", 10)
    (workspace.spool.active / "gone.task.yaml").unlink()
    result = await wait_terminal(workspace, "gone", 15)
    assert result["status"] == "succeeded" and result["source_file"] is None, result
    said = [r for r in caplog.records if getattr(r, "orch_event", "") == "task.file_gone"]
    assert len(said) == 1 and "spool/active/gone.task.yaml was removed" in said[0].getMessage()
    assert list(workspace.spool.done.iterdir()) == []


async def test_a_task_file_written_in_two_shell_steps_runs_once_whole(
    workspace: Workspace, serve: Any
) -> None:
    """`>` then `>>` (or `echo >>` in a loop): the writer closes the file between its parts
    and opens it again by name. Claimed after the first, the second would land in a new
    file of its own, and both halves be refused: a file written in place is taken only once
    it has been still for the grace period (one renamed or linked in whole, at once)."""
    import asyncio
    import time

    await serve()
    incoming = workspace.spool.incoming
    parts = {
        "split1.task.json": ('{"model": "m1", "max_tokens": 4,\n', '"prompt": "split json"}\n'),
        "split2.task.yaml": ("model: m1\nmax_tokens: 4\n", 'prompt: "split yaml"\n'),
    }
    for name, (first, _) in parts.items():
        with open(incoming / name, "w") as fh:  # `>`
            fh.write(first)
    await asyncio.sleep(0.7)
    for name, (_, rest) in parts.items():
        with open(incoming / name, "a") as fh:  # `>>`, 0.7 s later
            fh.write(rest)
    began = time.monotonic()
    for task_id in ("split1", "split2"):
        result = await wait_terminal(workspace, task_id, 15)
        assert result["status"] == "succeeded", result
    assert time.monotonic() - began < 10
    assert list(workspace.spool.failed.iterdir()) == []
    renamed = workspace.spool.tmp / "whole.part"  # and a file renamed in: at once
    renamed.write_text(yaml.safe_dump(task("whole", max_tokens=2)))
    began = time.monotonic()
    renamed.rename(incoming / "whole.task.yaml")
    assert (await wait_terminal(workspace, "whole"))["status"] == "succeeded"
    assert time.monotonic() - began < 1.5


async def test_a_cancelled_running_task_is_logged_canceled_once_with_its_correlation_id(
    workspace: Workspace, serve: Any, caplog: Any
) -> None:
    """`grep '"correlation_id": "X"'` follows a task through the daemon (HME-030): the line
    saying its cancel request was consumed carried the task id instead, and was a second
    `task.canceled`, so counting those counted each cancel twice."""
    from state import spool

    caplog.set_level("INFO", logger="llama_orch")
    cfg = config()
    cfg["pools"][0]["sim"] = {"tokens_per_s": 20}
    workspace.write_config(cfg)
    await serve()
    workspace.submit("c1.task.yaml", task("c1", max_tokens=200, correlation_id="corr-c1"))
    await wait_for(lambda: (workspace.result("c1") or {}).get("status") == "running", 10)
    spool.request_cancel(workspace.spool, "c1")
    assert (await wait_terminal(workspace, "c1"))["status"] == "canceled"
    await wait_for(lambda: not any(workspace.spool.cancel.iterdir()), 10, "consumed")
    mine = [r for r in caplog.records if getattr(r, "orch_fields", {}).get("task_id") == "c1"]
    assert {r.orch_fields["correlation_id"] for r in mine} == {"corr-c1"}, [
        (r.orch_event, r.getMessage()) for r in mine if r.orch_fields["correlation_id"] != "corr-c1"
    ]  # type: ignore[attr-defined]
    said = [getattr(r, "orch_event", "") for r in mine]
    assert said.count("task.canceled") == 1, said


async def test_a_result_keeps_the_position_and_start_admission_predicted(
    workspace: Workspace, serve: Any
) -> None:
    """The pair in the result is one moment, the admission's answer (its `queued` frame):
    the position was set to 0 at the start while the predicted start stayed, a pair that
    described no moment of the task."""
    cfg = config()
    cfg["pools"][0].update(slots=1, sim={"tokens_per_s": 100, "load_s": 0.0})
    workspace.write_config(cfg)
    await serve()
    workspace.submit("first.task.yaml", task("first", max_tokens=40))
    await wait_for(lambda: (workspace.result("first") or {}).get("status") == "running", 10)
    for name in ("second", "third"):
        workspace.submit(f"{name}.task.yaml", task(name, max_tokens=4))
    result = await wait_terminal(workspace, "third", 15)
    queued = next(f.data for f in workspace.frames("third") if f.event == "queued")
    assert queued["queue_position"] == 1 and queued["predicted_start_ms"] > 0, queued
    assert result["status"] == "succeeded"
    assert (result["queue_position"], result["predicted_start_ms"]) == (
        queued["queue_position"],
        queued["predicted_start_ms"],
    )


async def test_the_stop_line_says_how_many_task_files_are_left_for_the_next_start(
    workspace: Workspace, serve: Any, caplog: Any
) -> None:
    """It said "tasks left resumable" also when every task had ended."""
    caplog.set_level("INFO", logger="llama_orch")
    running = await serve()
    workspace.submit("done1.task.yaml", task("done1", max_tokens=2))
    await wait_terminal(workspace, "done1")
    assert await running.stop() == 0
    [stopped] = [r for r in caplog.records if getattr(r, "orch_event", "") == "daemon.stopped"]
    assert stopped.orch_fields["tasks_left"] == 0  # type: ignore[attr-defined]
    assert stopped.getMessage().endswith("no task left waiting.")


def test_a_file_is_leased_only_where_a_broken_lease_cannot_end_the_process(
    tmp_path: Path,
) -> None:
    """A writer opening the file during the read lease makes the kernel signal SIGIO, whose
    default action ends the process: without SIGIO ignored, no lease is asked (the file is
    read as it is); the daemon ignores it at its start (`spool.quiet_lease_breaks`)."""
    import signal

    from state import spool

    path = tmp_path / "open.task.yaml"
    before = signal.getsignal(signal.SIGIO)
    try:
        with open(path, "w") as writer:
            writer.write("model: m1\n")
            signal.signal(signal.SIGIO, signal.SIG_DFL)
            assert not spool.being_written(path)
            spool.quiet_lease_breaks()
            assert spool.being_written(path)
        assert not spool.being_written(path)  # closed
    finally:
        signal.signal(signal.SIGIO, before)


async def test_a_refusal_cut_short_by_a_crash_is_not_written_again_at_recovery(
    workspace: Workspace, serve: Any
) -> None:
    """A crash between a refused file's result and its move to failed/ leaves the file in
    active/ beside its own refusal: recovery refuses it again, and must keep that result
    (a finished task's result written anew reads as the task ending twice); only a file
    just claimed from incoming/ takes a refused id over."""
    from reconciler import clocks, intake

    bad = "task_id: cut1\nmodel: m1\nprompt: 5\nmax_tokens: 4\n"
    workspace.spool.ensure()
    (workspace.spool.active / "cut1.task.yaml").write_text(bad)
    parsed = intake.parse_claimed(workspace.spool.active / "cut1.task.yaml")
    assert isinstance(parsed, list)
    envelope = errors.envelope(ErrorCode.INVALID_TASK_FILE, str(parsed[0]))
    intake.write_rejection(
        store=workspace.results,
        task_id="cut1",
        error=envelope,
        clock=clocks.RealClock(),
        source="spool/failed/cut1.task.yaml",
        revision=None,
    )
    before = (workspace.results.path("cut1").read_bytes(), workspace.frames("cut1"))
    await serve()
    await wait_for(lambda: not any(workspace.spool.active.iterdir()), 10, "recovered")
    assert (workspace.spool.failed / "cut1.task.yaml").is_file()
    assert (workspace.results.path("cut1").read_bytes(), workspace.frames("cut1")) == before
