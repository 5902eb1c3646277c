"""Atomic file writes: a reader sees the old file or the new one, never a partial one.

Write to a temporary name in the same folder, fsync it, rename over the target, fsync the
folder (fsync of the file alone does not persist the rename). Each write names its `kind`
(results, sessions, …) so a crash test can fail it at its failpoints (state/failpoints.py):
before anything is written, with the temporary file complete, and just after the rename.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
from pathlib import Path
from typing import Any

from state import failpoints


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
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        failpoints.hit(f"{kind}_write")
        if mode is not None:
            os.fchmod(fd, mode)
        view = memoryview(data)
        while view:
            written = os.write(fd, view)
            view = view[written:]
        if durable:
            os.fsync(fd)
    except BaseException:
        os.close(fd)
        tmp.unlink(missing_ok=True)
        raise
    os.close(fd)
    try:
        failpoints.hit(f"before_{kind}_rename")
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    failpoints.hit(f"after_{kind}_rename")
    if durable:
        fsync_dir(path.parent)


def create_bytes(path: Path, data: bytes) -> bool:
    """Write `path` whole, only if it does not exist yet: a file already there is never
    replaced (content-addressed stores). False when it existed. Safe for concurrent writers
    of one path, in threads or processes: each writes its own temporary file and `link`, unlike
    rename, fails rather than replace."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}-{secrets.token_hex(4)}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view) :]
        os.fsync(fd)
    except BaseException:
        os.close(fd)
        tmp.unlink(missing_ok=True)
        raise
    os.close(fd)
    try:
        os.link(tmp, path)
    except FileExistsError:
        return False
    finally:
        tmp.unlink(missing_ok=True)
    fsync_dir(path.parent)
    return True


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
    """Rename and persist both folders' entries (same filesystem, so atomic)."""
    os.rename(src, dst)
    fsync_dir(dst.parent)
    if src.parent != dst.parent:
        fsync_dir(src.parent)


def sweep_leftovers(folder: Path) -> list[str]:
    """Remove the temporary files (`.<name>.<pid>.tmp`) that writers killed between write and
    rename left in `folder`; returns their names. Only for folders a single writer owns and
    only while no write is in flight there: the daemon calls it at startup, under its lock."""
    removed: list[str] = []
    try:
        entries = list(os.scandir(folder))
    except OSError:
        return removed
    for entry in entries:
        name = entry.name
        if name.startswith(".") and name.endswith(".tmp") and entry.is_file(follow_symlinks=False):
            with contextlib.suppress(FileNotFoundError):
                os.unlink(entry.path)
                removed.append(name)
    return removed
