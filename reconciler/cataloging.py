"""The model catalog: the models of orch.yaml with their files, and verifying those files
against their declared digests (ORCH-3037, ORCH-3097).

`daemon.build` opens one `Catalog` over `<state>/verifications.json`; the HTTP face calls
`rows` (GET /v1/catalog/models) and `verify` (POST /v1/catalog/models/{id}/verify); the
dispatcher calls `blocked` before every admission, so a model whose file failed its check is
refused with UNTRUSTED_ARTIFACT until a later check passes, its ref or digest changes, or
another file is in the place of the one that failed (`state.verifications` has the rules).
Verifying always reads the whole file afresh, in a worker thread: a file that rotted in
place keeps its size and mtime, so no cache may answer.
"""

from __future__ import annotations

import asyncio
import hashlib
import stat
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from reconciler import clocks, logs
from state import desired, verifications

log = logs.get("catalog")

CHUNK = 1 << 20


def hash_file(path: Path) -> tuple[str, int]:
    """`sha256:<hex>` of the file and its size, read in full."""
    h = hashlib.sha256()
    size = 0
    with path.open("rb") as fh:
        for chunk in iter(lambda: fh.read(CHUNK), b""):
            h.update(chunk)
            size += len(chunk)
    return "sha256:" + h.hexdigest(), size


@dataclass
class Catalog:
    records_path: Path
    resolvers: Mapping[str, Any]
    clock: clocks.Clock
    book: verifications.VerificationBook = field(default_factory=verifications.VerificationBook)
    _lock: asyncio.Lock = field(default_factory=asyncio.Lock)

    @classmethod
    def open(cls, state_dir: Path, resolvers: Mapping[str, Any], clock: clocks.Clock) -> Catalog:
        path = verifications.path_in(state_dir)
        book, problem = verifications.load_checked(path)
        if problem is not None:
            logs.emit(
                log,
                "catalog.records_lost",
                f"{path} {problem}: the model checks it held are lost (a failed check no longer "
                "blocks its model); verify the models again with POST "
                "/v1/catalog/models/{id}/verify.",
                level=30,
                path=str(path),
            )
        return cls(path, resolvers, clock, book)

    # -- what admission reads -----------------------------------------------------------------

    def blocked(self, state: desired.DesiredState | None) -> dict[str, str]:
        """Model id → why admission refuses it (a failed check of its file as declared now)."""
        if state is None:
            return {}
        return {
            model_id: f"{record.message} (checked {record.checked_at})"
            for model_id, record in verifications.blocking(self.book, state.models).items()
        }

    # -- files --------------------------------------------------------------------------------

    def locate(self, ref: str, base: Path) -> tuple[Path | None, str | None]:
        """The local file a ref names, or why there is none."""
        scheme = ref.split(":", 1)[0] if ":" in ref else "file"
        resolver = self.resolvers.get(scheme)
        if resolver is None:
            return None, f"no resolver for {scheme}: refs is installed, so there is no file"
        found = resolver(ref, base)
        if found.path is None:
            return None, f"{ref} has no local file yet"
        return Path(found.path), None

    def rows(self, state: desired.DesiredState, base: Path) -> list[dict[str, Any]]:
        """GET /v1/catalog/models: every model with its file and its last check (stats files:
        call it in a worker thread)."""
        blocked = self.blocked(state)
        out = []
        for model_id, model in sorted(state.models.items()):
            path, _ = self.locate(model.ref, base)
            size = None
            if path is not None:
                try:
                    size = path.stat().st_size if path.is_file() else None
                except OSError:
                    size = None
            record = self.book.models.get(model_id)
            # about the model as declared, and the very file there now: one replaced or
            # rewritten since was never checked (its digest is not the one recorded)
            current = (
                record is not None
                and verifications.still_applies(record, model)
                and verifications.same_file(record, path)
            )
            out.append(
                {
                    "id": model_id,
                    "ref": model.ref,
                    "digest": model.digest,
                    "state": model.state,
                    "local_path": str(path) if path is not None else None,
                    "exists": size is not None,
                    "size_bytes": size,
                    "size_mib": model.size_mib,
                    "pools": [p.id for p in state.pools if p.model == model_id],
                    "last_verification": record.model_dump(mode="json") if record else None,
                    "verification_current": current,
                    "blocked": model_id in blocked,
                }
            )
        return out

    # -- verifying ----------------------------------------------------------------------------

    async def verify(
        self, model_id: str, state: desired.DesiredState, base: Path
    ) -> verifications.Verification:
        """Check the model's file against its declared digest and record the outcome."""
        model = state.models[model_id]
        async with self._lock:  # one check at a time: they read whole model files
            began = self.clock.monotonic()
            path, problem = self.locate(model.ref, base)
            actual: str | None = None
            size: int | None = None
            identity: str | None = None
            status: verifications.Outcome
            if path is None:
                status, message = "fail", f"model {model_id!r}: {problem}"
            elif not path.is_file():
                status = "fail"
                message = f"model {model_id!r}: {path} {_not_a_file(path)}"
            else:
                try:
                    before = path.stat()
                    digest, size = await asyncio.to_thread(hash_file, path)
                    after = path.stat()
                except OSError as exc:
                    status = "fail"
                    message = f"model {model_id!r}: {path} cannot be read ({exc.strerror or exc})"
                else:
                    actual = digest
                    status, message = _judge(model_id, path, model.digest, digest)
                    loaders = sorted(
                        p.id for p in state.pools if p.model == model_id and p.engine == "llamacpp"
                    )
                    if loaders and status != "fail" and not _gguf(path):
                        # a digest declares which file, not that it can be loaded: a file
                        # that is no GGUF fails the pools that load it, whatever its digest
                        status = "fail"
                        message = (
                            f"model {model_id!r}: {path.name} is not a GGUF file (it does not "
                            f"start with GGUF), so pool{'s' if len(loaders) > 1 else ''} "
                            f"{', '.join(loaders)} (llamacpp) cannot load it; put the model's "
                            ".gguf file there"
                        )
                    # changed while it was read: the digest is of no one version of it
                    identity = verifications.file_id(after)
                    if identity != verifications.file_id(before):
                        identity = None
                        status = "fail"
                        message = (
                            f"model {model_id!r}: {path} changed while it was read; verify "
                            "again once it is whole"
                        )
            record = verifications.Verification(
                model=model_id,
                ref=model.ref,
                path=str(path) if path is not None else None,
                declared_digest=model.digest,
                actual_digest=actual,
                size_bytes=size,
                file_id=identity,
                status=status,
                message=message,
                checked_at=clocks.rfc3339(self.clock.now()),
                took_ms=round((self.clock.monotonic() - began) * 1000),
            )
            self.book.models[model_id] = record
            await asyncio.to_thread(verifications.save, self.records_path, self.book)
        logs.emit(
            log,
            f"catalog.verify_{status}",
            f"Verified model {model_id}: {status}: {message}.",
            level=40 if status == "fail" else 20 if status == "pass" else 30,
            model=model_id,
            status=status,
        )
        return record


def _gguf(path: Path) -> bool:
    """Whether the file starts with GGUF's magic (unreadable: said by the hash before)."""
    try:
        with path.open("rb") as f:
            return f.read(4) == b"GGUF"
    except OSError:
        return True


def _not_a_file(path: Path) -> str:
    """Why `path` (not a regular file, following links) cannot be the model's file."""
    try:
        mode = path.stat().st_mode
    except FileNotFoundError:
        return "does not exist" if not path.is_symlink() else "is a symlink to nothing"
    except OSError as exc:
        return f"cannot be reached ({exc.strerror or exc})"  # a symlink loop, a permission
    if stat.S_ISDIR(mode):
        return "is a folder, not a model file"
    return "is not a regular file (a FIFO, socket or device)"


def _judge(
    model_id: str, path: Path, declared: str | None, actual: str
) -> tuple[verifications.Outcome, str]:
    if declared is None:
        return "warn", (
            f"model {model_id!r}: no digest is declared, proceeding with warnings; pin the "
            f"file with `digest: {actual}` under models.{model_id}"
        )
    if actual == declared:
        return "pass", f"model {model_id!r}: {path.name} matches its digest"
    return "fail", (
        f"model {model_id!r}: {path.name} has digest {actual}, but orch.yaml declares {declared}"
    )
