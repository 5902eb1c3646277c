"""The spool protocol: atomic delivery, exclusive claims, quarantine, cancel, tmp sweeping."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from state import spool


@pytest.fixture
def the_spool(tmp_path: Path) -> spool.Spool:
    return spool.Spool(tmp_path / "spool").ensure()


def test_delivery_lands_a_complete_file_in_incoming_and_leaves_tmp_empty(
    the_spool: spool.Spool,
) -> None:
    path = spool.deliver(the_spool, b"prompt: hi\n", name="a.task.yaml")
    assert path == the_spool.incoming / "a.task.yaml"
    assert path.read_bytes() == b"prompt: hi\n"
    assert os.listdir(the_spool.tmp) == []


def test_delivery_never_overwrites_a_waiting_file_of_the_same_name(the_spool: spool.Spool) -> None:
    first = spool.deliver(the_spool, b"one", name="a.task.yaml")
    second = spool.deliver(the_spool, b"two", name="a.task.yaml")
    assert first != second
    assert first.read_bytes() == b"one" and second.read_bytes() == b"two"


def test_delivery_refuses_names_that_are_not_task_files(the_spool: spool.Spool) -> None:
    for name in ("../x.task.yaml", "notes.txt", "a/b.task.json"):
        with pytest.raises(ValueError):
            spool.deliver(the_spool, b"x", name=name)


def test_delivery_refuses_names_the_spool_could_not_keep(the_spool: spool.Spool) -> None:
    for name in (".hidden.task.yaml", "a" * 200 + ".task.yaml", "tab\t.task.yaml"):
        with pytest.raises(ValueError, match="task file name"):
            spool.deliver(the_spool, b"x", name=name)
    assert list(the_spool.incoming.iterdir()) == []


# any name os.listdir can return: text, with undecodable bytes as lone surrogates
NAMES = st.binary(min_size=1, max_size=255).filter(lambda b: b"/" not in b and b"\0" not in b)


@given(NAMES.map(os.fsdecode))
def test_every_name_has_a_safe_name_and_a_printable_form(name: str) -> None:
    safe = spool.safe_name(name)
    assert spool.name_problem(safe) is None
    assert len((safe + ".error.json").encode()) + 20 <= 255  # a `<time_ns>-` prefix fits too
    assert spool.shown(name).isprintable() and spool.shown(name).encode("utf-8")
    if spool.name_problem(name) is None:
        assert safe == name


@given(NAMES.map(os.fsdecode), NAMES.map(os.fsdecode))
def test_two_bad_names_never_share_a_safe_name(a: str, b: str) -> None:
    if a != b and spool.name_problem(a) and spool.name_problem(b):
        assert spool.safe_name(a) != spool.safe_name(b)


def test_a_hidden_entry_is_listed_only_once_it_has_sat_unchanged(the_spool: spool.Spool) -> None:
    hidden = the_spool.incoming / ".x.task.yaml"
    hidden.write_bytes(b"x")
    now = hidden.stat().st_mtime
    assert spool.incoming_names(the_spool, now=now) == []
    later = now + spool.HIDDEN_GRACE_S + 1
    assert spool.incoming_names(the_spool, now=later) == [".x.task.yaml"]


def test_a_folder_is_claimed_by_rename_and_quarantined_whole(the_spool: spool.Spool) -> None:
    (the_spool.incoming / "d.task.yaml").mkdir()
    (the_spool.incoming / "d.task.yaml" / "inner").write_bytes(b"x")
    path = spool.claim(the_spool, "d.task.yaml")
    assert path == the_spool.active / "d.task.yaml" and path.is_dir()
    spool.quarantine(the_spool, path, {"code": "INVALID_TASK_FILE"})
    assert (the_spool.failed / "d.task.yaml" / "inner").read_bytes() == b"x"


def test_a_folder_never_replaces_a_live_file_of_the_same_name(the_spool: spool.Spool) -> None:
    (the_spool.active / "d.task.yaml").write_bytes(b"live")
    (the_spool.incoming / "d.task.yaml").mkdir()
    assert spool.claim(the_spool, "d.task.yaml") is None
    assert (the_spool.active / "d.task.yaml").read_bytes() == b"live"


def test_only_one_claimer_wins(the_spool: spool.Spool) -> None:
    spool.deliver(the_spool, b"x", name="a.task.yaml")
    assert spool.claim(the_spool, "a.task.yaml") == the_spool.active / "a.task.yaml"
    assert spool.claim(the_spool, "a.task.yaml") is None


def test_a_file_renamed_onto_a_name_being_claimed_is_left_for_the_next_claim(
    the_spool: spool.Spool, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Between linking a burst into active/ and removing the incoming names, a producer
    renames a new file onto one of them: the new file is not the one claimed, so it must not
    be removed with the old name."""
    spool.deliver(the_spool, b"old", name="a.task.yaml")
    real_fsync_dir = spool.atomic.fsync_dir

    def producer_renames(folder: Path) -> None:
        real_fsync_dir(folder)
        if folder == the_spool.active:
            fresh = the_spool.tmp / "a.part"
            fresh.write_bytes(b"new")
            os.rename(fresh, the_spool.incoming / "a.task.yaml")

    monkeypatch.setattr(spool.atomic, "fsync_dir", producer_renames)
    [claimed] = spool.claim_all(the_spool, ["a.task.yaml"])
    monkeypatch.undo()
    assert claimed == the_spool.active / "a.task.yaml"
    assert claimed.read_bytes() == b"old"
    assert (the_spool.incoming / "a.task.yaml").read_bytes() == b"new"


def test_incoming_is_listed_oldest_first(the_spool: spool.Spool) -> None:
    for i, name in enumerate(("b.task.yaml", "a.task.yaml", "c.task.yaml")):
        path = spool.deliver(the_spool, b"x", name=name)
        os.utime(path, ns=(10**18 + i, 10**18 + i))
    assert spool.incoming_names(the_spool) == ["b.task.yaml", "a.task.yaml", "c.task.yaml"]


def test_quarantine_moves_the_file_and_writes_why(the_spool: spool.Spool) -> None:
    spool.deliver(the_spool, b"x", name="bad.task.yaml")
    path = spool.claim(the_spool, "bad.task.yaml")
    assert path is not None
    spool.quarantine(the_spool, path, {"code": "INVALID_TASK_FILE", "line": 3})
    assert (the_spool.failed / "bad.task.yaml").exists()
    error = json.loads((the_spool.failed / "bad.task.yaml.error.json").read_text())
    assert error == {"code": "INVALID_TASK_FILE", "line": 3}
    assert not path.exists()


def test_finish_files_a_task_under_done_or_failed(the_spool: spool.Spool) -> None:
    spool.deliver(the_spool, b"x", name="a.task.yaml")
    spool.claim(the_spool, "a.task.yaml")
    assert spool.finish(the_spool, "a.task.yaml") == the_spool.done / "a.task.yaml"
    assert spool.finish(the_spool, "a.task.yaml") is None


def test_indexed_done_and_failed_names_are_never_reused_and_free_ones_are_not_looked_up(
    the_spool: spool.Spool, monkeypatch: pytest.MonkeyPatch
) -> None:
    (the_spool.done / "a.task.yaml").write_text("before the index")
    (the_spool.failed / "q.task.yaml.error.json").write_text("{}")
    the_spool.index_filed()
    looked: list[str] = []
    exists = spool.atomic.exists
    monkeypatch.setattr(spool.atomic, "exists", lambda p, **kw: looked.append(p.name) or exists(p))
    # a name there at the index is looked up, and taken: the task is filed under another
    taken = spool.filed_path(the_spool, "a.task.yaml")
    assert taken.name != "a.task.yaml" and taken.name.endswith("-a.task.yaml")
    assert looked == ["a.task.yaml"]
    looked.clear()
    # a free name is not looked up, and joins the index: the next task of that name moves on
    first = spool.filed_path(the_spool, "b.task.yaml")
    assert first.name == "b.task.yaml" and looked == []
    spool.deliver(the_spool, b"x", name="b.task.yaml")
    spool.claim(the_spool, "b.task.yaml")
    assert spool.finish(the_spool, "b.task.yaml", target=first) == first
    second = spool.filed_path(the_spool, "b.task.yaml")
    assert second != first and looked == ["b.task.yaml"]
    # a quarantined entry's record name counts too
    (the_spool.incoming / "q.task.yaml").write_text("x")
    moved = spool.quarantine(the_spool, the_spool.incoming / "q.task.yaml", {"error": "bad"})
    assert moved.name != "q.task.yaml" and (the_spool.failed / f"{moved.name}.error.json").exists()
    # a name removed by hand is free again
    (the_spool.done / "a.task.yaml").unlink()
    assert spool.filed_path(the_spool, "a.task.yaml").name == "a.task.yaml"


def test_cancel_requests_ignore_and_remove_unsafe_names(the_spool: spool.Spool) -> None:
    spool.request_cancel(the_spool, "task-1")
    (the_spool.cancel / "x..evil").write_text("")
    assert spool.cancel_requests(the_spool) == ["task-1"]
    assert not (the_spool.cancel / "x..evil").exists()
    with pytest.raises(ValueError):
        spool.request_cancel(the_spool, "../x")


def test_sweep_removes_only_tmp_files_older_than_the_limit(the_spool: spool.Spool) -> None:
    old, young = the_spool.tmp / "old.part", the_spool.tmp / "young.part"
    old.write_text("x")
    young.write_text("y")
    now = 2_000_000_000.0
    os.utime(old, (now - spool.TMP_MAX_AGE_S - 1, now - spool.TMP_MAX_AGE_S - 1))
    os.utime(young, (now - 60, now - 60))
    assert spool.sweep_tmp(the_spool, now=now) == ["old.part"]
    assert young.exists() and not old.exists()


def test_hidden_entries_age_by_their_change_and_hidden_cancel_names_are_looked_at(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A hidden file copied into incoming/ with a time far in the future (`cp -p` from a
    machine with a wrong clock) still ages, by its inode's change time, and gets its
    outcome; a hidden name in cancel/ is looked at too (removed and said when it is no
    task id) instead of lying there for ever."""
    import os
    import time

    monkeypatch.setattr(spool, "HIDDEN_GRACE_S", 0.0)
    the_spool = spool.Spool(tmp_path / "spool").ensure()
    hidden = the_spool.incoming / ".hid.task.yaml"
    hidden.write_text("model: m1\n")
    future = 4102444800  # 2100-01-01
    os.utime(hidden, (future, future))
    (the_spool.cancel / "..x").write_text("")
    time.sleep(0.05)
    assert ".hid.task.yaml" in spool.incoming_names(the_spool, now=time.time())
    dropped: list[str] = []
    assert spool.cancel_requests(the_spool, dropped) == []
    assert dropped == ["..x"] and not (the_spool.cancel / "..x").exists()
