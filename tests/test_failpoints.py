"""Failpoints themselves (state/failpoints.py): the syntax, the countdown, the seeded random
mode, and the list of points agreeing with the calls in the source. Also what a failed write
leaves behind at the two lowest write paths (atomic replace, event append)."""

from __future__ import annotations

import errno
import os
import re
from collections.abc import Iterator
from pathlib import Path

import pytest

from state import atomic, events, failpoints

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture
def armed() -> Iterator[None]:
    yield
    failpoints.configure()  # disarmed again for the other tests of this process


def test_every_point_listed_is_called_somewhere_and_every_call_is_listed() -> None:
    source = "\n".join(
        p.read_text()
        for room in ("state", "reconciler", "plugins")
        for p in (ROOT / room).glob("*.py")
    )
    called = set(re.findall(r'failpoints\.hit\("([a-z_]+)"\)', source))
    writes = re.findall(r"atomic\.write_(?:bytes|json)\((?:[^()]|\([^()]*\))*\)", source)
    kinds = {m for w in writes for m in re.findall(r'kind="([a-z_]+)"', w)} | {"file"}
    derived = {
        name
        for kind in kinds
        for name in (f"{kind}_write", f"before_{kind}_rename", f"after_{kind}_rename")
    }
    assert called - set(failpoints.POINTS) == set(), "hit() of a point POINTS does not list"
    assert kinds - set(failpoints.WRITE_KINDS) == set(), "a write kind WRITE_KINDS lacks"
    assert set(failpoints.POINTS) - called - derived == set(), "a listed point nobody hits"


@pytest.mark.parametrize(
    ("spec", "fires_at"),
    [
        ("after_token=enospc", [1, 2, 3, 4, 5, 6]),
        ("after_token=enospc@3", [3]),
        ("after_token=enospc@3-", [3, 4, 5, 6]),
        ("after_token=enospc@2-4", [2, 3, 4]),
    ],
)
def test_a_countdown_fires_at_the_hits_it_names(
    armed: None, spec: str, fires_at: list[int]
) -> None:
    failpoints.configure(spec)
    fired = []
    for n in range(1, 7):
        try:
            failpoints.hit("after_token")
        except OSError as exc:
            assert exc.errno == errno.ENOSPC and "after_token" in str(exc)
            fired.append(n)
    assert fired == fires_at
    failpoints.hit("after_claim")  # other points are untouched


@pytest.mark.parametrize(
    "spec", ["after_tokn=kill", "after_token", "after_token=explode", "after_token=kill@x"]
)
def test_a_misspelt_failpoint_is_refused_rather_than_never_firing(spec: str) -> None:
    with pytest.raises(ValueError, match="failpoint"):
        failpoints.parse(spec)


def test_the_random_mode_replays_the_same_choices_for_the_same_seed(
    armed: None, tmp_path: Path
) -> None:
    def run(seed: int) -> list[int]:
        failpoints.configure(random_spec=f"{seed}:0.2:eio", trace=str(tmp_path / f"{seed}.trace"))
        fired = []
        for n in range(200):
            try:
                failpoints.hit("frame_write")
            except OSError as exc:
                assert exc.errno == errno.EIO
                fired.append(n)
        return fired

    first = run(7)
    assert first == run(7) and first != run(8)
    assert 20 < len(first) < 60
    lines = (tmp_path / "7.trace").read_text().splitlines()
    assert lines[0].endswith(" hit frame_write") and lines[1].split()[1:3] == [
        "fire",
        "frame_write",
    ]


def test_a_full_disk_during_an_atomic_write_keeps_the_old_file_and_leaves_no_temporary(
    armed: None, tmp_path: Path
) -> None:
    target = tmp_path / "x.json"
    atomic.write_bytes(target, b"old", kind="result")
    for point in ("result_write", "before_result_rename"):
        failpoints.configure(f"{point}=enospc")
        with pytest.raises(OSError) as caught:
            atomic.write_bytes(target, b"new", kind="result")
        assert caught.value.errno == errno.ENOSPC
        assert target.read_bytes() == b"old"
        assert sorted(p.name for p in tmp_path.iterdir()) == ["x.json"]


def test_a_frame_cut_short_by_a_full_disk_is_cut_off_so_the_next_frame_starts_a_line(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    log = events.EventLog(tmp_path / "t.events.jsonl")
    log.append("queued", {"queue_position": 0}, ts="t0")
    real_write = os.write
    calls = []

    def full_disk(fd: int, data: bytes | memoryview) -> int:
        calls.append(len(data))
        if len(calls) == 1:
            return real_write(fd, bytes(data)[: len(data) // 2])  # what fitted
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "write", full_disk)
    with pytest.raises(OSError):
        log.append("started", {"attempt": 1}, ts="t1")
    monkeypatch.setattr(os, "write", real_write)
    log.append("started", {"attempt": 1}, ts="t2")  # the disk has room again
    frames = list(events.read(log.path))
    assert [(f.id, f.event, f.ts) for f in frames] == [(1, "queued", "t0"), (2, "started", "t2")]
