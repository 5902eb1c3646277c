"""Model verification records (`<state>/verifications.json`): the last digest check of each
model's file, kept across daemon restarts.

`reconciler.cataloging` writes a record for every POST /v1/catalog/models/{id}/verify; the
dispatcher asks `blocking` which models admission must refuse. Rules (ORCH-3097):
- `pass`: the file's sha256 matches the declared `digest`; `warn`: no digest is declared, so
  there is nothing to compare ("proceeding with warnings"); `fail`: a mismatch, or no file.
- A `fail` blocks admission of the model (UNTRUSTED_ARTIFACT) for as long as the model's `ref`
  and `digest` in orch.yaml are the ones that were checked: a later verify that passes, or an
  edit of the digest or the ref (another file), lifts it.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from state import atomic, desired

FILE_NAME = "verifications.json"
Outcome = Literal["pass", "warn", "fail"]


class Verification(BaseModel):
    model_config = ConfigDict(extra="forbid")

    model: str
    ref: str = Field(description="the model's ref when it was checked")
    path: str | None = Field(description="the local file that was read, when the ref has one")
    declared_digest: str | None = Field(description="orch.yaml's digest when it was checked")
    actual_digest: str | None = Field(description="sha256 of the file; null when none was read")
    size_bytes: int | None = None
    file_id: str | None = Field(
        None,
        description="the file's identity when it was read (device, inode, size, mtime and "
        "ctime in ns): another one there means the file changed since, and the record is "
        "no longer about it",
    )
    status: Outcome
    message: str
    checked_at: str = Field(description="RFC 3339")
    took_ms: int = Field(0, ge=0)


class VerificationBook(BaseModel):
    """The whole file: the latest record per model id."""

    model_config = ConfigDict(extra="forbid")

    models: dict[str, Verification] = Field(default_factory=dict)


def path_in(state_dir: Path) -> Path:
    return state_dir / FILE_NAME


def load(path: Path) -> VerificationBook:
    """The book, or an empty one when the file is missing or unreadable: a lost record only
    means a model must be verified again."""
    return load_checked(path)[0]


def load_checked(path: Path) -> tuple[VerificationBook, str | None]:
    """The book and, when a file is there but cannot be used, why (the caller says so: a
    lost `fail` record lifts a block)."""
    try:
        return VerificationBook.model_validate_json(path.read_bytes()), None
    except FileNotFoundError:
        return VerificationBook(), None
    except OSError as exc:
        return VerificationBook(), f"cannot be read ({exc.strerror or exc})"
    except (ValidationError, ValueError) as exc:
        return VerificationBook(), f"is not a verification record ({type(exc).__name__})"


def save(path: Path, book: VerificationBook) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic.write_json(path, json.loads(book.model_dump_json()))


def still_applies(record: Verification, model: desired.ModelSpec) -> bool:
    """The record is about the model as orch.yaml declares it now (same ref and digest)."""
    return record.ref == model.ref and record.declared_digest == model.digest


def file_id(info: os.stat_result) -> str:
    """What tells one version of a file from another without reading it: replaced (a new
    inode), rewritten in place (size, mtime) or touched back to its old mtime (ctime)."""
    return f"{info.st_dev}:{info.st_ino}:{info.st_size}:{info.st_mtime_ns}:{info.st_ctime_ns}"


def same_file(record: Verification, path: Path | None) -> bool:
    """Whether the file the record read is still the one at `path` (a record of no file, or
    of a model without a local one, is about no file that could change)."""
    if record.path is None or path is None:
        return True
    try:
        info = path.stat()
    except OSError:
        return False
    if record.file_id is None:  # written before identities were kept: its size at least
        return record.size_bytes is None or record.size_bytes == info.st_size
    return record.file_id == file_id(info)


def blocking(
    book: VerificationBook, models: Mapping[str, desired.ModelSpec]
) -> dict[str, Verification]:
    """The failed verifications that block admission now, by model id."""
    return {
        model_id: record
        for model_id, record in book.models.items()
        if record.status == "fail"
        and model_id in models
        and still_applies(record, models[model_id])
        and not replaced(record)
    }


def replaced(record: Verification) -> bool:
    """Whether another file is at the path the record read (put back, downloaded again):
    a failed check of the old one no longer says anything of it. A file gone is no other
    file: the failure stands until one is there."""
    if record.path is None:
        return False
    path = Path(record.path)
    return path.exists() and not same_file(record, path)
