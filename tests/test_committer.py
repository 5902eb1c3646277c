"""The commit helper process (state/committer.py): a group it commits ends as one committed
in the daemon's own thread would, its failpoints are the daemon's, it keeps the daemon's
folder locks while it lives, and it never outlives the daemon."""

from __future__ import annotations

import errno
import fcntl
import os
import signal
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from state import atomic, committer, failpoints
from tests.conftest import assert_helper_dies_with_daemon


@pytest.fixture
def helper() -> Iterator[committer.Committer]:
    c = committer.Committer()
    c.start()
    yield c
    c.close()


def _group(writes: list[tuple[str, Path, bytes]]) -> atomic.Group:
    """A group begun for a later commit, as the daemon's loop collects one."""
    group = atomic.begin()
    for unit, path, data in writes:
        with atomic.group(), atomic.unit(unit):
            atomic.write_bytes(path, data, kind="result")
    atomic.hand_off(group)
    return group


def _commit_armed(
    tmp_path: Path, helper: committer.Committer, spec: str, trace: Path
) -> atomic.GroupFailed:
    """Commit the results of a and b through `helper` with the failpoints `spec` armed."""
    failpoints.configure(spec, trace=str(trace))
    try:
        group = _group([("a", tmp_path / "a.json", b"a"), ("b", tmp_path / "b.json", b"b")])
        with pytest.raises(atomic.GroupFailed) as failed:
            atomic.commit(group, helper.commit)
    finally:
        failpoints.configure("")
    return failed.value


def test_a_group_committed_by_the_helper_appears_whole_and_in_order(
    tmp_path: Path, helper: committer.Committer
) -> None:
    (tmp_path / "b.json").mkdir()  # a folder where b's result goes: b fails, alone
    group = _group(
        [
            ("a", tmp_path / "a.json", b"a-1"),
            ("b", tmp_path / "b.json", b"b-1"),
            ("a", tmp_path / "a2.json", b"a-2"),
            ("c", tmp_path / "c.json", b"c-1"),
        ]
    )
    assert not (tmp_path / "a.json").exists()  # nothing before the commit
    with pytest.raises(atomic.GroupFailed) as failed:
        atomic.commit(group, helper.commit)
    assert set(failed.value.failures) == {"b"}
    assert failed.value.failures["b"].errno == errno.EISDIR
    assert [(tmp_path / n).read_bytes() for n in ("a.json", "a2.json", "c.json")] == [
        b"a-1",
        b"a-2",
        b"c-1",
    ]
    assert (tmp_path / "b.json").is_dir()
    assert not [p.name for p in tmp_path.iterdir() if p.name.endswith(".tmp")]
    assert group.landed.is_set()


def test_a_failpoint_in_the_helper_is_the_daemons(
    tmp_path: Path, helper: committer.Committer, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Counted, traced and acted on in the daemon's process: `result_write=enospc@2` fails
    the second result written in the helper as a full disk would, naming the daemon's pid."""
    trace = tmp_path / "trace"
    failed = _commit_armed(tmp_path, helper, "result_write=enospc@2", trace)
    assert set(failed.failures) == {"b"}
    assert failed.failures["b"].errno == errno.ENOSPC
    assert (tmp_path / "a.json").read_bytes() == b"a" and not (tmp_path / "b.json").exists()
    lines = trace.read_text().splitlines()
    assert f"{os.getpid()} fire result_write 2 enospc" in lines


def test_a_helper_that_dies_mid_commit_fails_its_group_and_the_next_gets_a_new_one(
    tmp_path: Path, helper: committer.Committer, monkeypatch: pytest.MonkeyPatch
) -> None:
    pid = helper.pid
    assert pid is not None
    real_hit = failpoints.hit

    def hit(name: str) -> None:
        if name == "before_group_sync":
            os.kill(pid, signal.SIGKILL)  # dies waiting for this answer
        real_hit(name)

    monkeypatch.setattr(failpoints, "hit", hit)
    failed = _commit_armed(tmp_path, helper, "", tmp_path / "trace")  # armed: asked here
    assert set(failed.failures) == {"a", "b"}
    assert isinstance(failed.failures["a"], committer.HelperDied)
    group = _group([("a", tmp_path / "a.json", b"again")])
    atomic.commit(group, helper.commit)  # a new helper
    assert (tmp_path / "a.json").read_bytes() == b"again"
    assert helper.pid is not None and helper.pid != pid


def test_the_helper_keeps_the_daemons_lock_while_it_lives(tmp_path: Path) -> None:
    """A restarted daemon cannot lock the folder while a commit of the old one may still
    be renaming files."""
    lock_path = tmp_path / "daemon.lock"
    fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o644)
    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    c = committer.Committer(keep_fds=[fd])
    c.start()
    os.close(fd)  # the daemon let go of its own descriptor
    other = os.open(lock_path, os.O_RDWR)
    try:
        with pytest.raises(BlockingIOError):
            fcntl.flock(other, fcntl.LOCK_EX | fcntl.LOCK_NB)
        c.close()
        fcntl.flock(other, fcntl.LOCK_EX | fcntl.LOCK_NB)  # free once the helper is gone
    finally:
        os.close(other)


def test_the_helper_never_outlives_the_daemon(tmp_path: Path) -> None:
    """Killed with it even while its pipe stays open (here another process holds the
    daemon's end, as a commit in flight would keep the helper from reading its end)."""
    assert_helper_dies_with_daemon(
        """
        from state import committer
        c = committer.Committer()
        c.start()
        h = c._helper
        """
    )


def test_signals_meant_for_the_daemon_leave_the_helper_committing(
    tmp_path: Path, helper: committer.Committer
) -> None:
    """A Ctrl-C (the terminal's process group) or a service stop (SIGTERM to every
    process of the unit) stops the daemon, which drains first: its helper must not die
    mid-commit meanwhile."""
    atomic.commit(_group([("a", tmp_path / "a.json", b"first")]), helper.commit)  # ready
    pid = helper.pid
    assert pid is not None and os.getpgid(pid) != os.getpgid(0)
    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        os.kill(pid, sig)
    time.sleep(0.1)
    atomic.commit(_group([("a", tmp_path / "a.json", b"a")]), helper.commit)
    assert (tmp_path / "a.json").read_bytes() == b"a" and helper.pid == pid


def test_a_module_of_the_working_folder_never_stands_in_for_the_helper(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (tmp_path / "state.py").write_text("raise SystemExit(3)\n")
    monkeypatch.chdir(tmp_path)
    c = committer.Committer()
    c.start()
    try:
        assert c.pid is not None
        atomic.commit(_group([("a", tmp_path / "a.json", b"a")]), c.commit)
        assert (tmp_path / "a.json").read_bytes() == b"a" and c.pid is not None
    finally:
        c.close()


def test_a_failpoint_that_fails_otherwise_keeps_the_helper_in_step(
    tmp_path: Path, helper: committer.Committer, monkeypatch: pytest.MonkeyPatch
) -> None:
    def hit(name: str) -> None:
        raise KeyError(name)

    monkeypatch.setattr(failpoints, "hit", hit)
    failpoints.configure("", trace=str(tmp_path / "trace"))
    try:
        with pytest.raises(RuntimeError, match="KeyError"):
            atomic.commit(_group([("a", tmp_path / "a.json", b"a")]), helper.commit)
    finally:
        failpoints.configure("")
        monkeypatch.undo()
    pid = helper.pid
    atomic.commit(_group([("b", tmp_path / "b.json", b"b")]), helper.commit)
    assert (tmp_path / "b.json").read_bytes() == b"b" and helper.pid == pid


def test_a_committer_closed_commits_in_the_callers_thread(tmp_path: Path) -> None:
    c = committer.Committer()
    c.start()
    c.close()
    group: Any = _group([("a", tmp_path / "a.json", b"a")])
    atomic.commit(group, c.commit)
    assert (tmp_path / "a.json").read_bytes() == b"a" and c.pid is None


def test_where_no_helper_can_start_the_commit_runs_in_the_callers_thread(
    tmp_path: Path, helpers_cannot_start: str
) -> None:
    c = committer.Committer()
    c.start()
    atomic.commit(_group([("a", tmp_path / "a.json", b"a")]), c.commit)
    assert (tmp_path / "a.json").read_bytes() == b"a" and c.pid is None
    c.close()


async def test_a_clean_stop_leaves_no_temporary_file_of_a_commit_helper_killed_before(
    workspace: Any, serve: Any
) -> None:
    """The spares a killed commit helper kept (the files its rewrites displaced, under this
    daemon's temporary names) are not the next helper's to remove: the daemon removes them
    as it stops, as it does its own."""
    import os
    import signal

    from tests.conftest import task, wait_terminal

    running = await serve()
    for i in range(4):  # queued, running, terminal: each rewrite displaces a file, kept
        workspace.submit(f"s{i}.task.yaml", task(f"s{i}", max_tokens=2))
    for i in range(4):
        await wait_terminal(workspace, f"s{i}")
    results_dir = workspace.root / "results"
    assert [p for p in results_dir.iterdir() if p.name.endswith(".tmp")], "no spare was kept"
    pid = running.daemon.committer.pid
    assert pid is not None
    os.kill(pid, signal.SIGKILL)
    workspace.submit("after.task.yaml", task("after", max_tokens=2))  # a new helper commits
    assert (await wait_terminal(workspace, "after"))["status"] == "succeeded"
    await running.stop()
    assert sorted(p.name for p in results_dir.iterdir() if p.name.startswith(".")) == []


@pytest.mark.parametrize("module", ["state.committer", "state.traces"])
def test_a_helper_whose_daemon_is_gone_as_it_starts_ends_quietly(module: str) -> None:
    """A daemon killed while its helper starts: the helper's `ready` meets a broken pipe.
    It ends at once, and without a traceback among the daemon's log lines."""
    import os
    import subprocess
    import sys

    down_r, down_w = os.pipe()
    up_r, up_w = os.pipe()
    os.close(up_r)  # the daemon's end: gone
    try:
        ran = subprocess.run(
            [sys.executable, "-P", "-m", module, str(os.getpid()), str(down_r), str(up_w)],
            pass_fds=(down_r, up_w),
            capture_output=True,
            timeout=30,
            cwd=Path(__file__).resolve().parent.parent,
        )
    finally:
        for fd in (down_r, down_w, up_w):
            os.close(fd)
    assert (ran.returncode, ran.stderr) == (0, b"")
