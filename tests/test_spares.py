"""Spare files (state/atomic.py `_Spares`): a group's rewrite swaps the new file into place
and keeps the one it displaced, to be written over by a later group's write in that folder,
instead of freeing an inode and creating another. A reader still sees the old file or the new
one whole, never a mix: a spare someone has open, a young one, or one with another name is
never written over."""

from __future__ import annotations

import errno
import fcntl
import os
import stat
from collections.abc import Iterator
from pathlib import Path

import pytest

from state import atomic


@pytest.fixture(autouse=True)
def no_spares_left() -> Iterator[None]:
    atomic.release_spares()
    yield
    atomic.release_spares()


@pytest.fixture
def no_wait(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(atomic, "SPARE_AGE_S", 0.0)


def rewrite(path: Path, data: bytes) -> None:
    """One write as the daemon's loop makes it: in a group whose temporary files the
    commit writes (`begin`), committed by the caller."""
    group = atomic.begin()
    with atomic.group():
        atomic.write_bytes(path, data, kind="result")
    atomic.commit(group)


def hidden(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name.startswith("."))


@pytest.mark.usefixtures("no_wait")
def test_a_rewrite_writes_over_the_file_an_earlier_rewrite_displaced(tmp_path: Path) -> None:
    path = tmp_path / "t.json"
    rewrite(path, b"queued, and a little longer than what follows\n")
    first = path.stat().st_ino
    rewrite(path, b"running\n")
    assert path.read_bytes() == b"running\n"
    assert len(hidden(tmp_path)) == 1  # the queued file, kept under a temporary name
    rewrite(path, b"done\n")
    assert path.read_bytes() == b"done\n"  # cut to its own length: nothing of the longer one
    assert path.stat().st_ino == first  # no inode created for it
    assert stat.S_IMODE(path.stat().st_mode) == 0o644
    atomic.release_spares()
    assert [p.name for p in tmp_path.iterdir()] == ["t.json"]


@pytest.mark.usefixtures("no_wait")
def test_a_spare_someone_has_open_is_never_written_over(tmp_path: Path) -> None:
    path = tmp_path / "t.json"
    rewrite(path, b'{"status": "queued"}\n')
    with path.open("rb") as reader:  # opened before the swap: it holds the queued file
        rewrite(path, b'{"status": "running"}\n')
        rewrite(path, b'{"status": "succeeded"}\n')
        assert reader.read() == b'{"status": "queued"}\n'
        assert os.fstat(reader.fileno()).st_ino != path.stat().st_ino
    assert path.read_bytes() == b'{"status": "succeeded"}\n'


def test_a_spare_is_not_written_over_until_it_is_old_enough(tmp_path: Path) -> None:
    path = tmp_path / "t.json"
    rewrite(path, b"one\n")
    first = path.stat().st_ino
    rewrite(path, b"two\n")
    rewrite(path, b"three\n")  # at once: SPARE_AGE_S has not passed
    assert path.stat().st_ino != first
    assert path.read_bytes() == b"three\n"
    assert len(hidden(tmp_path)) == 2  # both displaced files kept, none freed


@pytest.mark.usefixtures("no_wait")
def test_a_file_with_another_name_or_a_link_is_replaced_not_kept(tmp_path: Path) -> None:
    linked, other = tmp_path / "linked.json", tmp_path / "elsewhere.json"
    rewrite(linked, b"old\n")
    os.link(linked, other)  # a second name: writing over it would change that file too
    rewrite(linked, b"new\n")
    assert other.read_bytes() == b"old\n"
    target, link = tmp_path / "target.json", tmp_path / "link.json"
    target.write_bytes(b"target\n")
    link.symlink_to(target)
    rewrite(link, b"a file now\n")
    assert target.read_bytes() == b"target\n"
    assert not link.is_symlink() and link.read_bytes() == b"a file now\n"
    assert hidden(tmp_path) == []


@pytest.mark.usefixtures("no_wait")
def test_without_leases_a_rewrite_renames_over_as_before(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    real = fcntl.fcntl

    def no_leases(fd: int, cmd: int, arg: int = 0) -> int:
        if cmd == fcntl.F_SETLEASE:
            raise OSError(errno.EINVAL, "leases are not supported here")
        return real(fd, cmd, arg)

    monkeypatch.setattr(atomic.fcntl, "fcntl", no_leases)
    monkeypatch.setattr(atomic._spares, "leases", True)
    path = tmp_path / "t.json"
    for n in range(4):
        rewrite(path, f"{n}\n".encode())
        assert path.read_bytes() == f"{n}\n".encode()
    assert atomic._spares.leases is False
    assert hidden(tmp_path) == []  # the one spare tried was removed; none kept since


@pytest.mark.usefixtures("no_wait")
def test_spares_a_crash_left_are_swept_at_startup(tmp_path: Path) -> None:
    path = tmp_path / "t.json"
    rewrite(path, b"one\n")
    rewrite(path, b"two\n")
    left = hidden(tmp_path)
    assert len(left) == 1 and left[0].endswith(".tmp")
    assert atomic.sweep_leftovers(tmp_path) == left
    assert [p.name for p in tmp_path.iterdir()] == ["t.json"]
    rewrite(path, b"three\n")  # the pool's entry is gone: a new file, no error
    assert path.read_bytes() == b"three\n"
