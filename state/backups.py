"""Backups of a workstation's catalog, artifacts and results (HME-051): the manifest and the
file copies. `reconciler.cli_backup` runs `orchctl backup` and `orchctl restore` with these.

A backup is a folder: one copy of each file under its *logical* path (`artifacts/<hex>.json`,
`results/<id>.json`, `catalog/...`, `state/verifications.json`, `orch/last-good.yaml`), and
`manifest.json`, written last, listing every file with its size and sha256. Logical paths
keep a backup independent of where `paths:` put the folders, so it restores into another
layout. A folder without a manifest is an unfinished backup.
"""

from __future__ import annotations

import hashlib
import os
import stat
from pathlib import Path, PurePosixPath
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from state import atomic

MANIFEST = "manifest.json"
ROOTS = ("catalog", "artifacts", "results", "state", "orch")
CHUNK = 1 << 20


class BackupFile(BaseModel):
    model_config = ConfigDict(extra="forbid")

    path: str = Field(description="logical path, e.g. results/t1.json")
    size_bytes: int = Field(ge=0)
    sha256: str = Field(pattern=r"^[0-9a-f]{64}$")

    @field_validator("path")
    @classmethod
    def _safe(cls, value: str) -> str:
        if not safe_path(value):
            raise ValueError(f"{value!r} is not a path inside the backup ({', '.join(ROOTS)})")
        return value


class Manifest(BaseModel):
    """`DIR/manifest.json`."""

    model_config = ConfigDict(extra="forbid")

    format: Literal[1] = 1
    created_at: str
    source: str = Field(description="the orch.yaml whose folders were backed up")
    version: str = Field(description="orchctl's version")
    files: list[BackupFile]


def safe_path(value: str) -> bool:
    """A relative path under one of ROOTS, with no `..`, empty or hidden part."""
    if "\\" in value or "\0" in value:
        return False
    parts = PurePosixPath(value).parts
    return (
        len(parts) >= 2
        and parts[0] in ROOTS
        and not PurePosixPath(value).is_absolute()
        and all(p not in ("", ".", "..") and not p.startswith(".") for p in parts)
    )


def copy(source: Path, target: Path, *, whole_lines: bool = False) -> tuple[str, int] | None:
    """Copy `source` to `target` (temporary file, fsync, rename) and return the sha256 hex and
    size of what was written, so the manifest describes the copy whatever happens to the
    source meanwhile. With `whole_lines`, a torn last line (a log being appended) is left out.
    None when the source is gone or is not a regular file (links are not followed)."""
    try:
        fd = os.open(source, os.O_RDONLY | os.O_NOFOLLOW)
    except OSError:
        return None
    with os.fdopen(fd, "rb") as fh:
        st = os.fstat(fh.fileno())
        if not stat.S_ISREG(st.st_mode):
            return None
        target.parent.mkdir(parents=True, exist_ok=True)
        if whole_lines:
            data = fh.read()
            data = data[: data.rfind(b"\n") + 1]
            atomic.write_bytes(target, data)
            _keep_time(target, st)
            return hashlib.sha256(data).hexdigest(), len(data)
        h = hashlib.sha256()
        size = 0
        tmp = target.with_name(f".{target.name}.{os.getpid()}.tmp")
        with tmp.open("wb") as out:
            for chunk in iter(lambda: fh.read(CHUNK), b""):
                h.update(chunk)
                out.write(chunk)
                size += len(chunk)
            out.flush()
            os.fsync(out.fileno())
        os.replace(tmp, target)
        _keep_time(target, st)
        atomic.fsync_dir(target.parent)
        return h.hexdigest(), size


def _keep_time(target: Path, source: os.stat_result) -> None:
    """The copy keeps its source's modification time: `orchctl tasks` lists the newest first
    by it, and a restored folder must list as the one backed up did."""
    os.utime(target, ns=(source.st_atime_ns, source.st_mtime_ns), follow_symlinks=False)


def digest(path: Path) -> tuple[str, int] | None:
    """(sha256 hex, size) of a regular file, or None when there is none."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW)
    except OSError:
        return None
    with os.fdopen(fd, "rb") as fh:
        if not stat.S_ISREG(os.fstat(fh.fileno()).st_mode):
            return None
        h = hashlib.sha256()
        size = 0
        for chunk in iter(lambda: fh.read(CHUNK), b""):
            h.update(chunk)
            size += len(chunk)
    return h.hexdigest(), size
