"""Event logs: strictly increasing ids, nothing after a terminal frame, recovery after a crash."""

from __future__ import annotations

from pathlib import Path

import pytest

from state import events


def test_ids_increase_from_one_and_a_reopened_log_continues(tmp_path: Path) -> None:
    path = tmp_path / "t.events.jsonl"
    log = events.EventLog(path)
    log.append("queued", {"queue_position": 0}, ts="t")
    log.append("token", {"t": "a", "i": 0}, ts="t")
    again = events.EventLog(path)
    frame = again.append("token", {"t": "b", "i": 1}, ts="t")
    assert frame.id == 3
    assert [f.id for f in events.read(path)] == [1, 2, 3]
    assert [f.id for f in events.read(path, after=2)] == [3]


def test_a_torn_last_line_is_cut_and_its_id_is_reused_by_nobody_else(tmp_path: Path) -> None:
    path = tmp_path / "t.events.jsonl"
    log = events.EventLog(path)
    log.append("token", {"t": "a", "i": 0}, ts="t")
    with path.open("ab") as fh:
        fh.write(b'{"id": 2, "event": "tok')  # a crash mid-write
    assert [f.id for f in events.read(path)] == [1]
    again = events.EventLog(path)
    assert again.append("token", {"t": "b", "i": 1}, ts="t").id == 2
    assert [f.data["t"] for f in events.read(path)] == ["a", "b"]


def test_nothing_follows_a_terminal_frame(tmp_path: Path) -> None:
    log = events.EventLog(tmp_path / "t.events.jsonl")
    log.append("end", {"finish_reason": "length"}, ts="t")
    with pytest.raises(RuntimeError):
        log.append("token", {"t": "late", "i": 9}, ts="t")
    assert events.EventLog(tmp_path / "t.events.jsonl").terminal
