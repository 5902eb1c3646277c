"""Atomic file writes: a reader sees the old file or the new one, never a partial one.

Write to a temporary name in the same folder, fsync it, rename over the target, fsync the
folder (fsync of the file alone does not persist the rename).

Group commit: inside `with group():` (one thread's batch of work, e.g. the tasks a pass
claims together) durable writes and renames are deferred, not weakened. Each write goes to
its temporary file at once (in a group `begin` opened, at the commit, by the thread that commits
it); at the end of the block one sync of the filesystem makes every
temporary file (and every other write of the block, such as a terminal event frame) durable,
then the renames run in the order they were asked for, then one more sync makes them durable.
A sync is one `syncfs` of the filesystem while the system has little else waiting to be
written back, else fsyncs of exactly the group's files, then of its folders: `syncfs` writes
back every dirty page of the filesystem, which costs about a second while a model download or a
build has a gigabyte in flight there, and would hold every task's commit (and the event loop)
that long; a file's own fsync does not wait for the rest.
So a reader still sees a file only whole, only once its data is on disk, and a task's files
still appear in their order (frame, result, task file moved last), for a whole batch at the
cost of a few syncs instead of two fsyncs per write. `exists`/`read_bytes` let the thread see
what its pending group will write; `begin`/`commit` keep a group open past one block (the
event loop commits once a turn). `hand_off` lets another thread commit a group (the event loop's
writer thread, so that no loop turn waits on a sync or a rename): until it has landed, this
thread still sees what it will write, a later group commits after it, and a write outside a
group to one of its paths waits for it. Writes from other threads are not affected.

Each write names its `kind` (results, sessions, …) so a crash test can fail it at its
failpoints (state/failpoints.py): before anything is written, with the temporary file
complete, and just after the rename (in a group, the rename at the commit).
"""

from __future__ import annotations

import collections
import contextlib
import ctypes
import errno
import fcntl
import itertools
import json
import os
import re
import secrets
import stat
import sys
import threading
import time
from collections.abc import Callable, Collection, Hashable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from state import daemon_lock, failpoints

_serials = itertools.count()


@dataclass
class Group:
    """A group commit's pending operations, in order: (source, target) renames, target None
    for a removal; `data` is the latest content per target (None: moved or removed)."""

    ops: list[tuple[Path, Path | None, str]] = field(default_factory=list)  # + failpoint kind
    # per op, the unit of work it belongs to (`unit()`: a task's writes), None for the rest
    units: list[Hashable] = field(default_factory=list)
    # per path touched: bytes (what it will hold), a Path (the file now there that will be
    # renamed to it, or appended to) or None (it will be gone)
    data: dict[Path, bytes | Path | None] = field(default_factory=dict)
    # files written in the group other than through `write_bytes` (an event log's terminal
    # frame), made durable by the commit's first sync
    written: set[Path] = field(default_factory=set)
    # writes whose temporary file the commit writes (a group `begin` opened, committed by
    # another thread: the thread that asks for them never waits on a file's creation)
    unwritten: dict[Path, tuple[bytes, int | None]] = field(default_factory=dict)
    appends: dict[int, bytes] = field(default_factory=dict)  # per APPEND op: its bytes
    # per path: the index of a write to it whose temporary file the commit writes, while no
    # later op has touched the path: a later write of the same unit replaces it (`write_bytes`)
    replaceable: dict[Path, int] = field(default_factory=dict)
    # per path: the index of the APPEND op to it that later appends of the same unit extend,
    # while it is that unit's last op and no other op touched the path since
    extendable: dict[Path, int] = field(default_factory=dict)
    unit_last: dict[Hashable, int] = field(default_factory=dict)  # per unit: its last op
    # units a write of which failed in the group committed before this one: none of their
    # operations here is carried out (each would follow a write that never happened)
    poisoned: dict[Hashable, OSError] = field(default_factory=dict)
    # per unit: the groups handed off before it and still in flight when the unit's first op
    # here was asked for, which hold ops of that unit too (what was decided here may rest on
    # what they will write): a unit that fails in one of them is poisoned here at the commit
    after: dict[Hashable, list[Group]] = field(default_factory=dict)
    # per unit, the error its operations failed with at this group's commit (set before
    # `landed`): none of them, a unit's later operations in later groups are skipped too
    failures: dict[Hashable, OSError] = field(default_factory=dict)
    later: bool = False  # committed by whoever called `begin`, not at the end of a block
    committed: bool = False  # a second commit (a flush, then the scheduled one) is a no-op
    syncs: int = 0
    # temporary names are unique across groups: one handed off may still hold its own
    serial: int = field(default_factory=lambda: next(_serials))
    landed: threading.Event = field(default_factory=threading.Event)  # its commit has ended


_local = threading.local()


def _group() -> Group | None:
    return getattr(_local, "group", None)


def _flight() -> list[Group]:
    """This thread's groups handed off to another thread and not known to have landed."""
    flight: list[Group] | None = getattr(_local, "flight", None)
    if flight is None:
        flight = _local.flight = []
    flight[:] = [g for g in flight if not g.landed.is_set()]
    return flight


_ABSENT = object()


def _planned(path: Path) -> Any:
    """What `path` will be once this thread's pending and handed-off groups land: bytes, a
    Path (the file now there that will be moved to it), None (gone), or _ABSENT (the groups
    leave it alone: the disk says)."""
    current = _group()
    if current is not None and path in current.data:
        return current.data[path]
    for flying in reversed(_flight()):
        if path in flying.data:
            return flying.data[path]
    return _ABSENT


def hand_off(current: Group) -> None:
    """`current`, this thread's pending group, is to be committed by another thread (one at
    a time, in the order handed off): this thread opens a new group for its next writes, and
    sees what `current` will write until it has landed."""
    if _group() is current:
        _local.group = None
    _flight().append(current)


def _await_landing(paths: Sequence[Path]) -> None:
    """Before a write outside a group: wait for the handed-off groups that touch `paths`, so
    that their commit cannot undo it; raise where the write's unit failed in one of them."""
    unit = getattr(_local, "unit", None)
    for flying in _flight():
        if any(p in flying.data for p in paths) or (unit is not None and unit in flying.unit_last):
            flying.landed.wait()
            if unit is not None and unit in flying.failures:
                failed = flying.failures[unit]
                raise OSError(failed.errno, failed.strerror, failed.filename)


class GroupFailed(OSError):
    """Some units' operations failed at a group's commit (`failures`: unit → error); every
    other unit's were carried out. Raised like the first failure, whose errno it keeps."""

    def __init__(self, failures: dict[Hashable, OSError]) -> None:
        first = next(iter(failures.values()))
        super().__init__(first.errno, first.strerror, first.filename, None, first.filename2)
        self.failures = failures
        # the units that failed in an earlier group (`Group.poisoned`): told of already
        self.repeated: frozenset[Hashable] = frozenset()


@contextlib.contextmanager
def unit(key: Hashable) -> Iterator[None]:
    """The durable operations of this thread inside the block belong to `key` (one task's
    writes): at a group's commit, an operation that fails skips the later operations of its
    own unit only (a task's files keep their order: nothing after its failed write appears),
    and the other units' are carried out (one task's broken result file does not fail the
    tasks committed with it)."""
    before = getattr(_local, "unit", None)
    _local.unit = key
    try:
        yield
    finally:
        _local.unit = before


def _append(current: Group, op: tuple[Path, Path | None, str]) -> None:
    for path in (op[0], op[1]):
        if path is not None:
            current.replaceable.pop(path, None)
            current.extendable.pop(path, None)
    unit = getattr(_local, "unit", None)
    if unit is not None and unit not in current.unit_last:
        before = [
            flying
            for flying in getattr(_local, "flight", ())
            if flying is not current and unit in flying.unit_last and not flying.landed.is_set()
        ]
        if before:
            current.after[unit] = before
    current.unit_last[unit] = len(current.ops)
    current.ops.append(op)
    current.units.append(unit)


def _defer(*paths: Path) -> Group | None:
    """The group a durable operation on `paths` joins: this thread's pending group when a
    `group()` block is open, or when the group already holds one of the paths (so the
    operations on one file keep their order). Done at once instead, it first waits for the
    handed-off groups holding one of them."""
    current = _group()
    if current is not None and (
        getattr(_local, "depth", 0) > 0 or any(p in current.data for p in paths)
    ):
        return current
    _await_landing(paths)
    return None


@contextlib.contextmanager
def group() -> Iterator[Group]:
    """Defer this thread's durable writes, renames and removals inside the block to one
    commit (also when the block raises: what it did is committed, as it would have been one
    by one). A block opened while a group is pending joins it; the outermost block commits
    at its end unless someone `begin`s the group for a later commit."""
    current = _group()
    owner = current is None
    if current is None:
        current = _local.group = Group()
    _local.depth = getattr(_local, "depth", 0) + 1
    try:
        yield current
    finally:
        _local.depth -= 1
        if owner and not current.later:
            commit(current)


def begin() -> Group:
    """This thread's pending group, opened if there is none, to be committed by the caller's
    own `commit` (an event loop commits once a turn, for every task that wrote in it)."""
    current = _group()
    if current is None:
        current = _local.group = Group()
    current.later = True
    return current


def commit(current: Group, via: Callable[[Group], None] | None = None) -> None:
    """Sync the data the group wrote, run its renames and removals in order, sync again.
    An operation that fails skips the rest of its unit (`unit()`), not the others': they
    are carried out and synced, then GroupFailed names the units that failed. `via` does
    that instead of this thread (the daemon's commit helper, state/committer.py)."""
    if _group() is current:
        _local.group = None
    try:
        if current.ops and not current.committed:  # committed here: after those handed off
            for flying in _flight():
                if flying is not current:
                    flying.landed.wait()
            _poison(current)
        (via or _commit)(current)
    except GroupFailed as exc:
        current.failures = dict(exc.failures)
        exc.repeated = frozenset(current.poisoned)
        raise
    except BaseException as exc:  # nothing of the group is known to be done
        error = exc if isinstance(exc, OSError) else OSError(f"the group commit failed: {exc!r}")
        current.failures = dict.fromkeys(current.units, error)
        raise
    finally:
        current.landed.set()


def _poison(current: Group) -> None:
    """Skip the units of `current` a write of which failed in a group committed before it,
    once those have landed (a task's later operations rest on its earlier ones: a cancel
    request consumed because the task's canceled result was pending must stay when that
    result never lands)."""
    for unit, before in current.after.items():
        for earlier in before:
            earlier.landed.wait()
            if unit in earlier.failures and unit not in current.poisoned:
                current.poisoned[unit] = earlier.failures[unit]


def _commit(current: Group) -> None:
    if current.committed or not current.ops:
        return
    current.committed = True
    failed: dict[Hashable, OSError] = dict(current.poisoned)
    applied: list[tuple[Path, Path | None, str]] = []
    displaced: list[Path] = []  # the files the group's writes displaced: spares once synced
    done = 0
    try:
        # the writes left for the commit (a group committed by another thread): each to its
        # temporary file, each append to its file, in order; one that fails (a full disk)
        # fails its unit where it stands, and nothing later of that unit is written
        broken = _write_deferred(current, set(failed))
        failpoints.hit("before_group_sync")
        # every temporary file's data (and the block's other writes) on disk
        current.syncs += 1
        # the write-back waiting, read once for both syncs (/proc/meminfo costs ~0.1 ms)
        dirty = _dirty_bytes()
        _sync_files(
            [
                src
                for n, (src, dst, kind) in enumerate(current.ops)
                if dst is not None and kind and kind != REPLACED and n not in broken
            ]
            + sorted(current.written),
            dirty=dirty,
        )
        for n, ((src, dst, kind), key) in enumerate(zip(current.ops, current.units, strict=True)):
            done += 1
            if key in failed:  # after a failed write of its unit: never appears
                _drop_tmp(src, dst)
                continue
            if n in broken:
                failed[key] = broken[n]
                continue
            if kind == REPLACED:
                continue
            try:
                if _apply(src, dst, kind):
                    displaced.append(src)
            except OSError as exc:
                failed[key] = exc
                _drop_tmp(src, dst)
                continue
            applied.append((src, dst, kind))
        current.syncs += 1
        _sync_folders(_folders(applied), dirty=dirty)  # the renames themselves
    except BaseException:
        for src, dst, _ in current.ops[done:]:  # what will not be renamed leaves no file
            _drop_tmp(src, dst)
        _spares.discard(displaced)
        raise
    # written over only in a later commit: what displaced them is durable in its place now
    _spares.keep(displaced)
    if failed:
        raise GroupFailed(failed)


def _write_deferred(current: Group, gone: set[Hashable]) -> dict[int, OSError]:
    """Write what the group's writes and appends left for the commit, in order (nothing
    synced), but none of the units `gone` (they grow by each unit a write of which fails);
    per op index, the error of each that failed."""
    broken: dict[int, OSError] = {}
    for n, ((src, _, kind), key) in enumerate(zip(current.ops, current.units, strict=True)):
        if key in gone or not (kind == APPEND or src in current.unwritten):
            continue
        if kind == APPEND and not current.appends[n]:  # its path removed since (`remove_log`)
            continue
        try:
            if kind == APPEND:
                append_whole(src, current.appends[n])
            else:
                data, mode = current.unwritten[src]
                spare = _spares.take(src.parent)
                if spare is None:
                    _fill(src, data, mode=mode, kind=kind, sync=False)
                else:  # the file a rewrite displaced earlier, written over: no new inode
                    _fill(spare[0], data, mode=mode, kind=kind, sync=False, fd=spare[1])
                    current.ops[n] = (spare[0], current.ops[n][1], kind)
        except OSError as exc:
            broken[n] = exc
            gone.add(key)
    return broken


def append_whole(
    path: Path, data: bytes, *, fd: int | None = None, size: int | None = None, sync: bool = False
) -> None:
    """Append `data` to `path` (created if need be; or to the open `fd`, whose file's `size`
    its only writer may know) entirely or not at all: a write cut short (a full disk writes
    what fits, then fails) is cut back off, so the next append never lands on half of one."""
    own = fd is None
    if fd is None:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    try:
        if size is None:
            size = os.fstat(fd).st_size
        try:
            failpoints.hit("frame_write")
            write_all(fd, data)
            if sync:
                os.fsync(fd)
        except BaseException:
            with contextlib.suppress(OSError):
                os.ftruncate(fd, size)
            raise
    finally:
        if own:
            os.close(fd)


def _fill(
    tmp: Path,
    data: bytes,
    *,
    mode: int | None,
    kind: str | None,
    sync: bool,
    new: bool = False,
    fd: int | None = None,
) -> None:
    """Write `tmp` whole (fsynced when `sync`; `new`: it must not exist yet; `fd`: it is a
    spare file, open there, written over and cut to `data`'s length), hitting the
    `<kind>_write` failpoint; on any error it is removed."""
    spare = fd is not None
    if fd is None:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | (os.O_EXCL if new else os.O_TRUNC), 0o644)
    try:
        if kind is not None:
            failpoints.hit(f"{kind}_write")
        if mode is not None or spare:
            os.fchmod(fd, 0o644 if mode is None else mode)
        write_all(fd, data)
        if spare:  # after the write: a spare cut to nothing first would free its block
            os.ftruncate(fd, len(data))
        if sync:
            os.fsync(fd)
    except BaseException:
        os.close(fd)
        tmp.unlink(missing_ok=True)
        raise
    os.close(fd)


def _apply(src: Path, dst: Path | None, kind: str) -> bool:
    """Carry out one op; True when it was a write that displaced a file now at `src` (a
    spare, `_Spares.swap`)."""
    if kind == APPEND:  # written before the first sync, in order with the temporary files
        return False
    if dst is None:  # a removal: gone already, or not ours, is fine (as one by one)
        with contextlib.suppress(FileNotFoundError, IsADirectoryError, PermissionError):
            os.unlink(src)
        return False
    if not kind:  # a move: an entry gone already is fine, as rename_durable's callers
        with contextlib.suppress(FileNotFoundError):
            os.replace(src, dst)
        return False
    # a write: any failure is raised, as a write outside a group would be
    failpoints.hit(f"before_{kind}_rename")
    displaced = _spares.swap(src, dst)
    failpoints.hit(f"after_{kind}_rename")
    return displaced


def _drop_tmp(src: Path, dst: Path | None) -> None:
    """Remove a write's temporary file that will not be renamed."""
    if dst is not None and src.name.endswith(".tmp"):
        with contextlib.suppress(OSError):
            os.unlink(src)


_AT_FDCWD = -100
_RENAME_EXCHANGE = 2
SPARES_PER_FOLDER = 2048  # more displaced files than this in one folder are removed
SPARE_AGE_S = 2.0  # a displaced file is written over no sooner than this after the swap


class _Spares:
    """Files a group's rewrites displaced, kept per folder (under their temporary names) and
    written over as a later group's temporary files, instead of each rewrite freeing an inode
    and the next write creating one. On ext4 without a journal, creating a file walks past
    every inode of its block group freed in the last minutes: with a task's result rewritten
    twice, creations grew slower the longer a burst of tasks ran. A rewrite swaps the new file
    into place with renameat2(RENAME_EXCHANGE): a reader sees the old file or the new one, as
    with a rename.

    A spare is written over only when the commit that displaced it has synced (a crash before
    finds the old file in place, intact), SPARE_AGE_S after that (a reader between its lookup
    of the name and its open, which no lease shows, would have to stall that long), while
    nobody has it open (a write lease can be taken: no other descriptor of it exists; a
    reader that opened the old file before the swap reads it whole), and while it is a
    regular file with this one name. Where renameat2 or leases are unavailable, writes
    rename over as before. Spares are removed when the process stops (`release`); a crash
    leaves them as temporary files the startup sweep removes."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._kept: dict[Path, collections.deque[tuple[float, Path]]] = {}
        self._renameat2 = _load_libc("renameat2")
        self.leases = True  # turned off at the first error saying leases are unavailable

    def swap(self, src: Path, dst: Path) -> bool:
        """Put the file at `src` in `dst`'s place. True when `dst` was a regular file with
        one name and it is now at `src` (a spare once `keep` is called); False after a plain
        rename (nothing there, something else there, or no exchange here)."""
        if self._renameat2 is not None and self.leases:
            try:
                st = os.lstat(dst)
            except FileNotFoundError:
                st = None
            if st is not None and stat.S_ISREG(st.st_mode) and st.st_nlink == 1:
                args = (_AT_FDCWD, os.fsencode(src), _AT_FDCWD, os.fsencode(dst))
                if self._renameat2(*args, _RENAME_EXCHANGE) == 0:
                    return True
                code = ctypes.get_errno()
                if code in (errno.EINVAL, errno.ENOSYS):  # not on this filesystem or kernel
                    self._renameat2 = None
                elif code != errno.ENOENT:  # gone meanwhile: renamed into place below
                    raise OSError(code, os.strerror(code), str(src), None, str(dst))
        os.replace(src, dst)
        return False

    def keep(self, paths: Sequence[Path]) -> None:
        extra: list[Path] = []
        now = time.monotonic()
        with self._lock:
            for path in paths:
                kept = self._kept.setdefault(path.parent, collections.deque())
                if len(kept) < SPARES_PER_FOLDER:
                    kept.append((now, path))
                else:
                    extra.append(path)
        self.discard(extra)

    def take(self, folder: Path) -> tuple[Path, int] | None:
        """The oldest spare of `folder` old enough, with a descriptor open on it for
        writing, or None."""
        while True:
            with self._lock:
                kept = self._kept.get(folder)
                if not kept or time.monotonic() - kept[0][0] < SPARE_AGE_S:
                    return None
                path = kept.popleft()[1]
            fd = self._usable(path)
            if fd is not None:
                return path, fd
            self.discard([path])

    def _usable(self, path: Path) -> int | None:
        try:  # never through a link, never blocking on a FIFO put in its place
            fd = os.open(path, os.O_WRONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
        except OSError:
            return None
        with contextlib.suppress(OSError):
            st = os.fstat(fd)
            if stat.S_ISREG(st.st_mode) and st.st_nlink == 1 and self._unused(fd):
                return fd
        os.close(fd)
        return None

    def _unused(self, fd: int) -> bool:
        """Whether no other descriptor of the file is open anywhere (a write lease)."""
        try:
            fcntl.fcntl(fd, fcntl.F_SETLEASE, fcntl.F_WRLCK)
        except OSError as exc:
            if exc.errno not in (errno.EAGAIN, errno.EBUSY):
                self.leases = False  # not allowed here (no lease support, not the owner)
            return False
        fcntl.fcntl(fd, fcntl.F_SETLEASE, fcntl.F_UNLCK)
        return True

    def discard(self, paths: Sequence[Path]) -> None:
        for path in paths:
            with contextlib.suppress(OSError):
                os.unlink(path)

    def release(self) -> None:
        """Remove every spare (the process is stopping)."""
        with self._lock:
            kept, self._kept = self._kept, {}
        for spares in kept.values():
            self.discard([path for _, path in spares])


def release_spares() -> None:
    """Remove this process's spare files (`_Spares`): at a clean stop."""
    _spares.release()


def _folders(ops: Sequence[tuple[Path, Path | None, str]]) -> set[Path]:
    """The folders whose entries a group's renames, moves and removals changed."""
    folders = set()
    for src, dst, kind in ops:
        if dst is not None:
            folders.add(dst.parent)
        if dst is None or not kind:  # a removal or a move: its source's folder changed too
            folders.add(src.parent)
    return folders


# A filesystem sync costs what the whole filesystem has waiting to be written back; fsyncs cost
# per file. One `syncfs` is used while the system's dirty and in-writeback pages are at most
# this much, plus this much per file the sync stands for (about what writing them back costs).
SYNCFS_DIRTY_BASE = 4 << 20
SYNCFS_DIRTY_PER_FILE = 64 << 10


def _dirty_bytes() -> int | None:
    """The system's dirty and in-writeback page cache (/proc/meminfo), None where unknown."""
    try:
        with open("/proc/meminfo", "rb") as f:
            text = f.read()
    except OSError:
        return None
    total, found = 0, 0
    for line in text.splitlines():
        if line.startswith((b"Dirty:", b"Writeback:")):
            total += int(line.split()[1]) * 1024
            found += 1
    return total if found == 2 else None


_READ = -1  # `dirty` not given: read it now


def _syncfs_is_cheap(files: int, dirty: int | None = _READ) -> bool:
    """Whether one `syncfs` costs no more than fsyncs of `files` files would, with `dirty`
    bytes waiting to be written back (read from /proc/meminfo unless given)."""
    if _syncfs is None:
        return False
    if dirty == _READ:
        dirty = _dirty_bytes()
    return dirty is not None and dirty <= SYNCFS_DIRTY_BASE + files * SYNCFS_DIRTY_PER_FILE


def _sync_files(files: Sequence[Path], *, dirty: int | None = _READ) -> None:
    """Make the data of `files` durable (a file gone since is fine: a later write of the
    group replaced it)."""
    _sync_paths(files, {path.parent for path in files}, dirty=dirty)


def _sync_folders(folders: set[Path], *, dirty: int | None = _READ) -> None:
    """Make the entries of `folders` durable."""
    _sync_paths(folders, folders, dirty=dirty)


def _sync_paths(paths: Collection[Path], folders: set[Path], *, dirty: int | None = _READ) -> None:
    """One syncfs per filesystem holding `folders` while that is cheap, else an fsync of
    each of `paths` (files or folders; one gone since is skipped)."""
    if not paths:
        return
    if _syncfs_is_cheap(len(paths), dirty):
        _syncfs_all(folders)
        return
    for path in paths:
        try:
            fd = os.open(path, os.O_RDONLY)
        except FileNotFoundError:
            continue
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def _syncfs_all(folders: set[Path]) -> None:
    """One syncfs per filesystem holding one of `folders` (`sync` if it fails)."""
    devices: dict[int, Path] = {}
    for folder in folders:
        with contextlib.suppress(OSError):
            devices.setdefault(os.stat(folder).st_dev, folder)
    for folder in devices.values():
        fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY)
        try:
            if _syncfs is None or _syncfs(fd) != 0:
                os.sync()
        finally:
            os.close(fd)


def _load_libc(name: str) -> Any:
    if not sys.platform.startswith("linux"):
        return None
    try:
        return getattr(ctypes.CDLL(None, use_errno=True), name)
    except (OSError, AttributeError):
        return None


_syncfs = _load_libc("syncfs")
_spares = _Spares()


def exists(path: Path, *, folder: bool = True) -> bool:
    """Whether `path` will be there once this thread's pending group commits (a folder
    there counts unless `folder` is False)."""
    planned = _planned(path)
    if planned is not _ABSENT:
        return planned is not None
    try:
        mode = os.lstat(path).st_mode
    except OSError:
        return False
    return folder or not stat.S_ISDIR(mode)


def read_bytes(path: Path) -> bytes:
    """`path`'s content as this thread will see it once its pending group commits."""
    data = _planned(path)
    if data is _ABSENT:
        return path.read_bytes()
    if data is None:
        raise FileNotFoundError(2, "No such file or directory", str(path))
    if isinstance(data, bytes):
        return data
    try:
        return bytes(data.read_bytes())  # (`_planned` is untyped: a Path here)
    except FileNotFoundError:  # moved by a handed-off group meanwhile: it is there now
        return path.read_bytes()


def written(path: Path) -> None:
    """`path` was written (appended to) in this thread's open group other than through this
    module, and must be durable once the group commits (an event log's terminal frame)."""
    current = _group()
    if current is None:
        raise RuntimeError("atomic.written() outside a group")
    current.written.add(path)


APPEND = "append"  # an op's kind: bytes appended to its file (`append`)
REPLACED = "replaced"  # an op's kind: a write that a later one replaced before its commit


def append(path: Path, data: bytes, *, new: bool, held: bool = False) -> bool:
    """Leave the append of `data` to `path` (an event log) to this thread's pending group
    commit, in order with its other writes, when that group is committed by another thread
    (`begin`) and either `path` is `new` (its creation is then the commit thread's wait, not
    this one's), or the group already holds an append to it, or the caller `held` the data
    back for the commit (frames that must not be seen before the group's other writes are
    durable): True, the caller writes nothing. Otherwise False, once any handed-off group
    holding `path` has landed: the caller appends it itself, after them."""
    current = _group()
    if (
        current is not None
        and current.later
        and (getattr(_local, "depth", 0) > 0 or path in current.data)
    ):
        planned = _planned(path)
        if new or held or planned is not _ABSENT:
            last = current.extendable.get(path)
            if last is not None and current.unit_last.get(getattr(_local, "unit", None)) == last:
                current.appends[last] += data  # one append of the frames in a row: one write
            else:
                _append(current, (path, path, APPEND))
                current.appends[len(current.ops) - 1] = data
                current.extendable[path] = len(current.ops) - 1
            if isinstance(planned, bytes):
                current.data[path] = planned + data
            elif new or planned is None:  # a new file: it holds only this
                current.data[path] = data
            else:  # appended to the file there: readers read it from disk
                current.data[path] = path
            return True
    _await_landing([path])
    return False


def deferring() -> bool:
    """Whether an fsync asked for now may wait for this thread's group commit (a `group()`
    block is open: the commit syncs everything written before it)."""
    return getattr(_local, "depth", 0) > 0


def remove_log(path: Path) -> None:
    """Remove an append-only file (an event log) now, with the appends to it that this
    thread's pending group holds: a group's appends are written before its renames and
    removals, so a removal left to the group would also take what is appended to the path
    after it there. Waits first for the groups in flight that hold it (their appends would
    make it again after the removal)."""
    current = _group()
    if current is not None and path in current.data:
        for n, (src, _, kind) in enumerate(current.ops):
            if kind == APPEND and src == path:
                current.appends[n] = b""  # nothing left to append: skipped at the commit
        del current.data[path]
        current.extendable.pop(path, None)
        current.written.discard(path)
    _await_landing([path])
    with contextlib.suppress(FileNotFoundError):
        os.unlink(path)


def remove(path: Path) -> None:
    """Remove `path` (gone already is fine); in a group, at the commit, in order."""
    current = _defer(path)
    if current is not None:
        _append(current, (path, None, "file"))
        current.data[path] = None
        return
    with contextlib.suppress(FileNotFoundError, IsADirectoryError, PermissionError):
        os.unlink(path)


def write_bytes(
    path: Path,
    data: bytes,
    *,
    durable: bool = True,
    mode: int | None = None,
    kind: str = "file",
) -> None:
    """Replace `path` with `data`; `mode` sets the new file's permission bits exactly (umask
    aside), e.g. to keep those of the file it replaces. On any error (a full disk) the old
    file stays as it was and no temporary file is left."""
    current = _defer(path) if durable else None
    # in a group each write has its own temporary file: the commit renames them in order;
    # outside one, each thread its own (two threads of a server writing one file at once,
    # such as two cancels of one task, must not write and rename one temporary file)
    unique = (
        f".{threading.get_native_id()}"
        if current is None
        else f".g{current.serial}.{len(current.ops)}"
    )
    tmp = path.with_name(f".{path.name}.{os.getpid()}{unique}.tmp")
    if current is not None and current.later:  # written, renamed and synced at the commit
        _replace(current, path)
        _append(current, (tmp, path, kind))
        current.data[path] = data
        current.unwritten[tmp] = (data, mode)
        current.replaceable[path] = len(current.ops) - 1
        return
    _fill(tmp, data, mode=mode, kind=kind, sync=durable and current is None)
    if current is not None:  # renamed at the group's commit, after one sync for all
        _append(current, (tmp, path, kind))
        current.data[path] = data
        return
    try:
        failpoints.hit(f"before_{kind}_rename")
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    failpoints.hit(f"after_{kind}_rename")
    if durable:
        fsync_dir(path.parent)


def _replace(current: Group, path: Path) -> None:
    """A write to `path` replaces the group's earlier write to it, where that one's temporary
    file is not written yet, nothing else touched the path since, and it is of the same unit:
    the earlier content is never written (a task ending before its running result's commit:
    one file created and one replaced instead of two). A reader could not tell: the earlier
    file would have been replaced within the same commit. The later write appears at its own
    place in the order, after every operation asked for in between."""
    earlier = current.replaceable.pop(path, None)
    if earlier is None or current.units[earlier] != getattr(_local, "unit", None):
        return
    tmp = current.ops[earlier][0]
    current.unwritten.pop(tmp, None)
    current.ops[earlier] = (tmp, path, REPLACED)


def create_bytes(path: Path, data: bytes) -> bool:
    """Write `path` whole, only if it does not exist yet: a file already there is never
    replaced (content-addressed stores). False when it existed. Safe for concurrent writers
    of one path, in threads or processes: each writes its own temporary file and `link`, unlike
    rename, fails rather than replace."""
    tmp = _new_tmp(path, data, sync=True)
    try:
        os.link(tmp, path)
    except FileExistsError:
        return False
    finally:
        tmp.unlink(missing_ok=True)
    fsync_dir(path.parent)
    return True


def create_many(items: Sequence[tuple[Path, bytes]]) -> list[bool]:
    """`create_bytes` for several files at the cost of two syncs for all of them (one
    makes every temporary file's data durable, then each is linked into place, then one
    makes the links durable), not two fsyncs each; per item, False when it existed (also a
    path repeated in `items`: the first wins). A file appears only whole and durable; on an
    error no temporary file is left, and what was linked before it stays."""
    tmps: list[Path] = []
    try:
        for path, data in items:
            tmps.append(_new_tmp(path, data, sync=False))
        _sync_files(tmps)
        created = []
        for (path, _), tmp in zip(items, tmps, strict=True):
            try:
                os.link(tmp, path)
                created.append(True)
            except FileExistsError:
                created.append(False)
        _sync_folders({path.parent for path, _ in items})
        return created
    finally:
        for tmp in tmps:
            tmp.unlink(missing_ok=True)


def _new_tmp(path: Path, data: bytes, *, sync: bool) -> Path:
    """A new temporary file beside `path` holding `data` (fsynced when `sync`)."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}-{secrets.token_hex(4)}.tmp")
    _fill(tmp, data, mode=None, kind=None, sync=sync, new=True)
    return tmp


def write_all(fd: int, data: bytes) -> None:
    """Write all of `data` to `fd` (os.write may write less than it was given)."""
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]


def write_json(path: Path, value: Any, *, durable: bool = True, kind: str = "file") -> None:
    text = json.dumps(value, indent=2, ensure_ascii=False) + "\n"
    # a lone surrogate (a file name that is not UTF-8) is written as its JSON escape \udcxx
    write_bytes(path, text.encode("utf-8", "backslashreplace"), durable=durable, kind=kind)


def fsync_dir(folder: Path) -> None:
    fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def rename_durable(src: Path, dst: Path) -> None:
    """Rename and persist both folders' entries (same filesystem, so atomic). In a group the
    rename waits for the commit, after the writes asked for before it."""
    current = _defer(src, dst)
    if current is not None:
        planned = _planned(src)
        content = src if planned is _ABSENT else planned
        if content is None or (content is src and not os.path.lexists(src)):
            raise FileNotFoundError(2, "No such file or directory", str(src))
        _append(current, (src, dst, ""))  # a move: its failpoints are its caller's
        current.data[dst], current.data[src] = content, None
        return
    os.rename(src, dst)
    fsync_dir(dst.parent)
    if src.parent != dst.parent:
        fsync_dir(src.parent)


# the writer's pid in a temporary file's name: `.<name>.<pid>.<thread>.tmp` (a write alone),
# `.<name>.<pid>.g<group>.<op>.tmp` (in a group), `.<name>.<pid>-<8 hex>.tmp` (create_many)
_TMP_PID = re.compile(r"\.(\d+)(?:\.\d+|\.g\d+\.\d+|-[0-9a-f]{8})\.tmp$")


def sweep_leftovers(folder: Path, *, pid: int | None = None, shared: bool = False) -> list[str]:
    """Remove the temporary files (`.<name>.<pid>...tmp`) that writers killed between write
    and rename left in `folder`; returns their names. For folders a single writer owns, and
    only while no write is in flight there: the daemon calls it at startup, under its lock.
    With `pid`: only those of that (dead) process. `shared`: a folder other daemons may write
    too (paths.artifacts named by several configs): only those of processes that are gone."""
    removed: list[str] = []
    try:
        entries = list(os.scandir(folder))
    except OSError:
        return removed
    for entry in entries:
        name = entry.name
        if not (name.startswith(".") and name.endswith(".tmp")):
            continue
        match = _TMP_PID.search(name)
        writer = int(match.group(1)) if match else None
        if pid is not None and writer != pid:
            continue
        if shared and (writer is None or not daemon_lock.pid_gone(writer)):
            continue
        if entry.is_file(follow_symlinks=False):
            with contextlib.suppress(FileNotFoundError):
                os.unlink(entry.path)
                removed.append(name)
    return removed
