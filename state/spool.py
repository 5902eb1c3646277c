"""The spool: a maildir-style folder through which task files arrive and are accounted for.

    tmp/ → incoming/ → active/ → done/ | failed/        cancel/<task_id> requests a cancel

Writers create files in tmp/ and rename them into incoming/ (`deliver`), so the reconciler never
sees a partial file. The reconciler claims a file by renaming it into active/ (`claim`): rename
is atomic, so exactly one claimer wins. Input that cannot be accepted goes to failed/ beside a
`<name>.error.json` saying why (`quarantine`). Every rename is made durable by an fsync of
its folder (for a batch claimed together, one per folder: `claim_all`; for a finish or a
quarantine inside a group commit, the commit's sync), so a claim or a finish survives a crash.

Anyone who can write to incoming/ can put anything there: folders, FIFOs, names that are not
UTF-8, hidden or too long for `.error.json` to fit beside them. Each such entry is claimed
like a file and quarantined under a name that is safe to write and show (`safe_name`), with
its own name escaped in the error file (`shown`).
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import functools
import hashlib
import os
import re
import secrets
import signal
import socket
import stat
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from state import atomic, failpoints, ids, tasks

TMP_MAX_AGE_S = 36 * 3600  # as maildir: a tmp/ file untouched this long is a dead delivery
# A hidden entry in incoming/ is taken for a tool writing in place (rsync, an editor) until it
# has not changed for this long; then it is claimed and refused like any other bad entry.
HIDDEN_GRACE_S = 60.0
# Room left in a 255-byte name for the `<time_ns>-` of a namesake, `.error.json` and the
# `.<name>.<pid>.tmp` of an atomic write.
MAX_NAME_BYTES = 200


# the spool's folders, each read by the daemon (or its users) name by name
FOLDERS = ("tmp", "incoming", "active", "done", "failed", "cancel")


@dataclass(frozen=True)
class Spool:
    root: Path

    @functools.cached_property
    def tmp(self) -> Path:
        return self.root / "tmp"

    @functools.cached_property
    def incoming(self) -> Path:
        return self.root / "incoming"

    @functools.cached_property
    def active(self) -> Path:
        return self.root / "active"

    @functools.cached_property
    def done(self) -> Path:
        return self.root / "done"

    @functools.cached_property
    def failed(self) -> Path:
        return self.root / "failed"

    @functools.cached_property
    def cancel(self) -> Path:
        return self.root / "cancel"

    @functools.cached_property
    def filed(self) -> dict[Path, set[str]]:
        """Per folder of done/ and failed/ once `index_filed` listed it: every name there
        then, and every name chosen since (`filed_path`, `quarantine`). A name not in it is
        free without a lookup: looked up, each task's filing cost a lookup in a folder the
        commit helper renames into at the same time, which waits for its renames there. A
        name removed by hand is still looked up; one put there by hand is not seen."""
        return {}

    def index_filed(self) -> None:
        """List done/ and failed/ once (the daemon, before it files any task)."""
        for folder in (self.done, self.failed):
            try:
                self.filed[folder] = set(os.listdir(folder))
            except OSError:  # not listable now: its names are looked up, as before
                self.filed.pop(folder, None)

    def ensure(self) -> Spool:
        for name in FOLDERS:
            (self.root / name).mkdir(parents=True, exist_ok=True)
        return self


_counter = 0


def unique_name(stem_hint: str = "task") -> str:
    global _counter
    _counter += 1
    return f"{time.time_ns()}.{os.getpid()}_{_counter}.{socket.gethostname()}.{stem_hint}"


def deliver(spool: Spool, data: bytes, *, name: str, exact: bool = False) -> Path:
    """Write `data` into tmp/, fsync it, and link it into incoming/ under `name`.

    `name` must end in .task.yaml/.task.yml/.task.json. An existing incoming file of the same
    name is never overwritten: the new file gets a unique prefix instead, or, with `exact`
    (the name is the task's id: a file without `task_id:`), FileExistsError is raised and
    nothing is delivered.
    """
    return deliver_file(spool, data, name=name, exact=exact)[0]


def deliver_file(
    spool: Spool, data: bytes, *, name: str, exact: bool = False
) -> tuple[Path, tuple[int, int]]:
    """`deliver`, also returning the file's identity (st_dev, st_ino): the daemon links and
    renames the very file (incoming/, active/, then done/ or failed/), so a submitter can
    tell its own file from another file of the same task id or name wherever it lies."""
    if "/" in name or "\0" in name or not name.endswith(tasks.TASK_SUFFIXES):
        raise ValueError(
            f"task file name {name!r} must be a plain name ending in .task.yaml or .task.json"
        )
    problem = name_problem(name)
    if problem is not None:
        raise ValueError(f"task file name {shown(name)!r} {problem}")
    spool.ensure()
    part = spool.tmp / (unique_name() + ".part")
    atomic_file = os.open(part, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
    try:
        try:
            atomic.write_all(atomic_file, data)
            os.fsync(atomic_file)
            st = os.fstat(atomic_file)
        finally:
            os.close(atomic_file)
        target = spool.incoming / name
        try:
            os.link(part, target)  # link, unlike rename, fails instead of replacing a namesake
        except FileExistsError:
            if exact:
                raise
            target = spool.incoming / f"{time.time_ns()}-{name}"
            os.link(part, target)
    except BaseException:  # a full disk, say: nothing delivered, and no part file left
        with contextlib.suppress(OSError):
            os.unlink(part)
        raise
    os.unlink(part)
    atomic.fsync_dir(spool.incoming)
    return target, (st.st_dev, st.st_ino)


def incoming_names(spool: Spool, *, now: float | None = None) -> list[str]:
    """Entries waiting in incoming/, oldest first (by modification time, then name); hidden
    ones only once they are HIDDEN_GRACE_S old (see there)."""
    now = time.time() if now is None else now
    return _listing(spool.incoming, hidden_before=now - HIDDEN_GRACE_S)


def being_written(path: Path) -> bool:
    """Whether some process holds the file at `path` open for writing (a writer filling it in
    place: `cat >`, a script that writes its parts over time, an editor mid-save): taken now,
    its first part, often a whole valid task without what follows (the rest of a prompt, its
    labels), would run. The kernel refuses a read lease on a file open for writing anywhere;
    where leases cannot be had (a file of another user, a filesystem without them), or
    `path` is no regular file, it says no: the file is read as it is.

    A writer opening the file while the lease is held (microseconds) makes the kernel send
    this process SIGIO, whose default action ends it: the lease is only asked where SIGIO
    is ignored (`quiet_lease_breaks`, which the daemon calls at its start)."""
    if signal.getsignal(signal.SIGIO) is not signal.SIG_IGN:
        return False
    try:
        if not stat.S_ISREG(os.lstat(path).st_mode):  # opening a device may do something
            return False
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_NOFOLLOW | os.O_NOCTTY)
    except OSError:
        return False
    try:
        fcntl.fcntl(fd, fcntl.F_SETLEASE, fcntl.F_RDLCK)
    except OSError as exc:
        return exc.errno == errno.EAGAIN
    else:
        with contextlib.suppress(OSError):
            fcntl.fcntl(fd, fcntl.F_SETLEASE, fcntl.F_UNLCK)
        return False
    finally:
        os.close(fd)


def quiet_lease_breaks() -> None:
    """Ignore SIGIO in this process (call from the main thread): `being_written`'s read
    lease, broken by a writer that opens the file meanwhile, is signalled with it, and the
    daemon uses no other SIGIO."""
    signal.signal(signal.SIGIO, signal.SIG_IGN)


def active_names(spool: Spool) -> list[str]:
    """The task files in active/ as they will be once this thread's pending group commit is
    done: a file whose move to done/ or failed/ is pending is not listed (else a recovery in
    the same pass would take it a second time). Hidden ones too: only a claim puts anything
    here, so a hidden name was claimed."""
    names = _listing(spool.active, hidden_before=float("inf"))
    return [name for name in names if atomic.exists(spool.active / name)]


def _listing(folder: Path, *, hidden_before: float | None = None) -> list[str]:
    """Names in `folder`, oldest first; hidden ones only if modified before `hidden_before`."""
    entries = []
    try:
        with os.scandir(folder) as it:
            for entry in it:
                hidden = entry.name.startswith(".")
                if hidden and hidden_before is None:
                    continue
                try:
                    st = entry.stat(follow_symlinks=False)
                except FileNotFoundError:
                    continue
                mtime = st.st_mtime_ns
                # its last change: its mtime, but never later than the inode's ctime, which no
                # writer can set (a copy with `cp -p` can give a file an mtime far in the
                # future, and it would never age)
                changed = min(st.st_mtime, st.st_ctime)
                if hidden and hidden_before is not None and changed >= hidden_before:
                    continue
                entries.append((mtime, entry.name))
    except FileNotFoundError:
        return []
    return [name for _, name in sorted(entries)]


def claim(spool: Spool, name: str) -> Path | None:
    """Move incoming/`name` to active/; None when another claimer got it first, or when a
    live task's file of the same name is still in active/ (it waits; never replaces it).

    Raises OSError when the entry can be neither linked nor renamed: the caller quarantines
    it where it is (`quarantine` takes any path).
    """
    claimed = claim_all(spool, [name])[0]
    if isinstance(claimed, OSError):
        raise claimed
    return claimed


def claim_all(spool: Spool, names: list[str]) -> list[Path | OSError | None]:
    """`claim` for entries that arrived together, with one fsync of active/ and one of
    incoming/ for all of them: every entry is linked into active/, active/ is synced, then
    the incoming names are removed and incoming/ is synced. A kill in between leaves both
    names of a file, which the next claim settles (`_same_file`). Per name: the new path,
    None, or the OSError that kept it from being claimed."""
    out: list[Path | OSError | None] = []
    linked: list[Path] = []
    changed = False
    for name in names:
        try:
            target, moved = _link(spool.incoming / name, spool.active / name, linked)
        except OSError as exc:
            out.append(exc)
            continue
        out.append(target)
        changed = changed or moved
    if changed:
        atomic.fsync_dir(spool.active)
        for source in linked:
            # a producer may have renamed a new file onto this name since it was linked:
            # that one is not claimed, so it stays for the next pass (a race of the width
            # of this check remains: a rename between the lstat and the unlink)
            if _same_file(source, spool.active / source.name):
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(source)
        atomic.fsync_dir(spool.incoming)
    return out


def _link(source: Path, target: Path, linked: list[Path]) -> tuple[Path | None, bool]:
    """Put `source` into active/ as `target` (a hard link is added to `linked`: its incoming
    name is removed once active/ is synced; a folder or another user's file is renamed).
    Returns the claimed path or None, and whether either folder changed."""
    try:
        os.link(source, target, follow_symlinks=False)  # unlike rename, never replaces
    except FileNotFoundError:
        return None, False
    except FileExistsError:
        if not _same_file(source, target):
            return None, False
        # a claim cut short between link and unlink (the daemon was killed): active/
        # already holds this very file, so the incoming name is only a leftover
        with contextlib.suppress(FileNotFoundError):
            os.unlink(source)
        return None, True
    except OSError:
        # A folder cannot be hard-linked, nor (fs.protected_hardlinks) another user's file.
        # Rename instead, once the name is known to be free: rename would replace a file.
        if os.path.lexists(target):
            return None, False
        try:
            os.rename(source, target)
        except FileNotFoundError:
            return None, False
        return target, True
    linked.append(source)
    failpoints.hit("after_claim_link")
    return target, True


def complete_cut_claims(spool: Spool) -> list[str]:
    """Remove the incoming/ names of claims a crash cut between link and unlink (the same file
    is in active/); returns them. Called before recovery files anything out of active/: once
    the active/ name is gone, the leftover would be claimed again as a second task."""
    cut = [
        name
        for name in _listing(spool.incoming, hidden_before=float("inf"))
        if _same_file(spool.incoming / name, spool.active / name)
    ]
    for name in cut:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(spool.incoming / name)
    if cut:
        atomic.fsync_dir(spool.incoming)
    return cut


def _same_file(a: Path, b: Path) -> bool:
    try:
        sa, sb = os.lstat(a), os.lstat(b)
    except OSError:
        return False
    return (sa.st_dev, sa.st_ino) == (sb.st_dev, sb.st_ino)


def filed_path(spool: Spool, name: str, *, failed: bool = False) -> Path:
    """Where `finish` will move active/`name`: done/ (or failed/), under a free name."""
    folder = spool.failed if failed else spool.done
    return _free_name(folder, name, known=spool.filed.get(folder))


def finish(
    spool: Spool, name: str, *, failed: bool = False, target: Path | None = None
) -> Path | None:
    """Move active/`name` to done/ (or failed/), or to `target` (`filed_path`, when the
    caller named it in the result first); returns the new path, None if it was gone."""
    target = target or filed_path(spool, name, failed=failed)
    try:
        atomic.rename_durable(spool.active / name, target)
    except FileNotFoundError:
        return None
    return target


def quarantine(
    spool: Spool,
    source: Path,
    error: dict[str, Any] | Callable[[Path], dict[str, Any]],
    *,
    before_move: Callable[[Path], None] | None = None,
) -> Path:
    """Move an entry that cannot be accepted (a file, a folder, anything) into failed/, under
    `safe_name`, with `<that name>.error.json` beside it (`error`, or `error(target)`: an
    explanation naming where the entry will be). The explanation is written first,
    then `before_move(target)` (the caller's rejected result), and the entry moves last: a
    crash in between leaves the entry where it was, to be refused again, and never a refused
    entry in failed/ that nobody explained."""
    target = _free_name(
        spool.failed,
        safe_name(source.name),
        also=".error.json",
        known=spool.filed.get(spool.failed),
    )
    record = error(target) if callable(error) else error
    atomic.write_json(spool.failed / f"{target.name}.error.json", record, kind="error_record")
    if before_move is not None:
        before_move(target)
    failpoints.hit("before_quarantine_move")
    with contextlib.suppress(FileNotFoundError):  # already moved by an earlier attempt
        atomic.rename_durable(source, target)
    failpoints.hit("after_quarantine_move")
    return target


def _free_name(
    folder: Path, name: str, *, also: str | None = None, known: set[str] | None = None
) -> Path:
    """`folder/name`, or a time-stamped variant when that is taken; with `also`, the name
    with that suffix must be free too (an error record beside the entry never lands on
    something already there, such as a quarantined folder of that name). `known`: the
    folder's index (`Spool.filed`), which the chosen names join."""

    def free(candidate: str) -> bool:
        if known is not None and candidate not in known:
            return True
        return not atomic.exists(folder / candidate)

    for candidate in (name, f"{time.time_ns()}-{name}"):
        if free(candidate) and (also is None or free(candidate + also)):
            break
    else:
        candidate = f"{time.time_ns()}-{secrets.token_hex(4)}-{name}"
    if known is not None:
        known.update((candidate, candidate + also) if also is not None else (candidate,))
    return folder / candidate


def name_problem(name: str) -> str | None:
    """Why `name` cannot be kept as it is in done/ or failed/, results and logs; None if it can.
    (Names come from os.listdir: bytes that are not UTF-8 arrive as lone surrogates.)"""
    try:
        size = len(name.encode("utf-8"))
    except UnicodeEncodeError:
        return "is not valid UTF-8"
    if name.startswith("."):
        return "starts with '.', which hides it (tools use such names while they write)"
    if not name.isprintable():
        return "contains a character that cannot be shown (a control character such as a newline)"
    if size > MAX_NAME_BYTES:
        return f"is {size} bytes long; names up to {MAX_NAME_BYTES} bytes are accepted"
    return None


def shown(name: str) -> str:
    """`name` as a person can read and a JSON or log line can hold: bytes that are not UTF-8
    as `\\xe9`, characters that do not print (controls, bidi overrides) as `\\n`, `\\u202e`."""
    text = _bytes(name).decode("utf-8", "backslashreplace")
    if text.isprintable():
        return text
    return "".join(c if c.isprintable() else c.encode("unicode_escape").decode() for c in text)


def _bytes(name: str) -> bytes:
    try:
        return name.encode("utf-8", "surrogateescape")  # the bytes os.listdir decoded
    except UnicodeEncodeError:  # a surrogate no file name decodes to (from text, not a listing)
        return name.encode("utf-8", "backslashreplace")


def safe_name(name: str) -> str:
    """`name` itself when it can be kept; else a name made of its readable part and a digest
    of its bytes (so two bad names never collide), e.g. `caf_xe9-1f2e3d4c5b6a.task.yaml`."""
    if name_problem(name) is None:
        return name
    digest = hashlib.sha256(_bytes(name)).hexdigest()[:12]
    suffix = next((s for s in tasks.TASK_SUFFIXES if name.endswith(s)), "")
    stem = shown(name)[: -len(suffix) or None]
    readable = re.sub(r"[^A-Za-z0-9._-]+", "_", stem).lstrip("._")[:80]
    return f"{readable or 'unnamed'}-{digest}{suffix}"


def request_cancel(spool: Spool, task_id: str) -> Path:
    if not ids.is_safe_id(task_id):
        raise ValueError(f"{task_id!r} is not a valid task id")
    spool.ensure()
    path = spool.cancel / task_id
    atomic.write_bytes(path, b"")
    return path


def cancel_requests(
    spool: Spool, dropped: list[str] | None = None, ignored: list[str] | None = None
) -> list[str]:
    """Task ids with a pending cancel request; files whose names are no task id are removed
    (and listed in `dropped`, for the caller to say so); folders, links and the like are
    left (listed in `ignored`)."""
    out = []
    # hidden names too, once a writer's temporary file would have been renamed: a request
    # named after an id that starts with '.', or no request, which is removed and said
    for name in _listing(spool.cancel, hidden_before=time.time() - HIDDEN_GRACE_S):
        path = spool.cancel / name
        if not path.is_file() or path.is_symlink():
            if ignored is not None:
                ignored.append(name)
            continue  # a folder or a link is not a request; leave it for the user to see
        if ids.is_safe_id(name):
            out.append(name)
        else:
            path.unlink(missing_ok=True)
            if dropped is not None:
                dropped.append(name)
    return out


def consume_cancel(spool: Spool, task_id: str) -> None:
    """Remove a cancel request; in a group commit, after the terminal result it waited for."""
    atomic.remove(spool.cancel / task_id)


def sweep_tmp(spool: Spool, *, now: float, max_age_s: float = TMP_MAX_AGE_S) -> list[str]:
    """Remove tmp/ leftovers of deliveries that died; returns the names removed."""
    removed = []
    for name in _listing(spool.tmp):
        path = spool.tmp / name
        try:
            age = now - path.lstat().st_mtime
        except FileNotFoundError:
            continue
        if age > max_age_s:  # older than the limit, never younger: see the maildir anchor
            path.unlink(missing_ok=True)
            removed.append(name)
    return removed
