"""The artifact registry on disk (HME-022): plans, diffs, traces and summaries, content-addressed.

The HTTP face stores what clients POST to /v1/artifacts and `reconciler.tracing` stores every
finished task's transcript (`ArtifactStore.put`; the daemon's own traces, built from its
event logs, through `put_json_many`: the same ids and files, without validating again what it
wrote). Rules:
- An artifact's id is `sha256:` + the hex sha256 of its document in canonical JSON (keys
  sorted, no spaces, UTF-8, defaults filled in), so the same document always gets the same id
  and anyone can check a download: the sha256 of `canonical(document)` is the id.
- One file per artifact, `<root>/<hex>.json`, holding the id, when it was first stored and the
  document. It is created once, atomically, and never rewritten: storing a document again
  returns the first record.
- A document over MAX_DOCUMENT_BYTES, a non-finite number or a lone surrogate is refused
  (`ArtifactProblem`), naming the field.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, JsonValue, ValidationError

from state import atomic

ArtifactKind = Literal["plan", "diff", "trace", "summary", "other"]
ID_PATTERN = r"^sha256:[0-9a-f]{64}$"
MAX_DOCUMENT_BYTES = 16 * 1024 * 1024  # canonical JSON; HTTP bodies stop at 1 MiB before this
MAX_TAGS = 64
_ID = re.compile(r"(?:sha256:)?([0-9a-f]{64})")

Tag = Annotated[
    str, Field(min_length=1, max_length=200, pattern=r"^[^\x00-\x1f\x7f-\x9f\u2028\u2029]+$")
]


class ArtifactProblem(ValueError):
    """A document that cannot be stored; the message names the field."""


class Artifact(BaseModel):
    """An artifact's document: what POST /v1/artifacts takes and GET /v1/artifacts/{id} gives."""

    model_config = ConfigDict(extra="forbid", strict=True)

    kind: ArtifactKind = Field(description="plan | diff | trace | summary | other")
    content: JsonValue = Field(description="any JSON value")
    tags: list[Tag] = Field(default_factory=list, max_length=MAX_TAGS)
    parent: str | None = Field(
        None, pattern=ID_PATTERN, description="the id of an artifact stored before this one"
    )
    metadata: dict[str, JsonValue] = Field(default_factory=dict)


class StoredArtifact(BaseModel):
    """`artifacts/<hex>.json`: one stored artifact, written once."""

    model_config = ConfigDict(extra="forbid")

    id: str = Field(pattern=ID_PATTERN)
    created_at: str = Field(description="RFC 3339, when the document was first stored")
    size_bytes: int = Field(ge=0, description="length of the canonical document")
    document: Artifact


def canonical(document: Artifact) -> bytes:
    """The document as canonical JSON: keys sorted, no spaces, UTF-8, defaults filled in."""
    return _canonical_json(document.model_dump(mode="json"))


def _storable(value: Any) -> bytes:
    """`value`'s canonical JSON, or ArtifactProblem when it is too big to store."""
    data = _canonical_json(value)
    if len(data) > MAX_DOCUMENT_BYTES:
        raise ArtifactProblem(
            f"the document is {len(data)} bytes as canonical JSON; at most "
            f"{MAX_DOCUMENT_BYTES} are stored"
        )
    return data


def _canonical_json(value: Any) -> bytes:
    try:
        return json.dumps(
            value, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False
        ).encode("utf-8")
    except UnicodeEncodeError:  # (a ValueError too)
        raise ArtifactProblem("the document holds a lone surrogate (\\ud800-\\udfff)") from None
    except ValueError:  # NaN and Infinity have no JSON spelling
        where = _non_finite(value) or "the document"
        raise ArtifactProblem(
            f"{where}: a number JSON cannot carry (NaN, Infinity, or beyond ±1.8e308); "
            "send a finite number, or the value as text"
        ) from None


def _non_finite(value: Any, path: str = "") -> str | None:
    """The dotted path of the first NaN or infinite number in `value` (bounded nesting)."""
    if isinstance(value, float):
        return None if math.isfinite(value) else path
    items = (
        value.items()
        if isinstance(value, dict)
        else enumerate(value)
        if isinstance(value, list)
        else ()
    )
    for key, item in items:
        here = f"{path}[{key}]" if isinstance(key, int) else f"{path}.{key}" if path else str(key)
        found = _non_finite(item, here)
        if found is not None:
            return found
    return None


def id_of(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def parse_id(text: str) -> str | None:
    """`sha256:<hex>` for an id given with or without its prefix, else None."""
    match = _ID.fullmatch(text)
    return f"sha256:{match.group(1)}" if match else None


class ArtifactStore:
    """The artifacts folder (`paths.artifacts`). The daemon writes; anyone may read."""

    def __init__(self, root: Path) -> None:
        self.root = root
        # per artifact id, its kind and tags: a record never changes (its id is its content's
        # digest), so a listing filtered by them reads each file once, not at every listing
        self._labels: dict[str, tuple[str, frozenset[str]]] = {}

    def path(self, artifact_id: str) -> Path:
        parsed = parse_id(artifact_id)
        if parsed is None:
            raise ValueError(f"{artifact_id!r} is not an artifact id (sha256:<64 hex>)")
        return self.root / f"{parsed.removeprefix('sha256:')}.json"

    def exists(self, artifact_id: str) -> bool:
        return self.path(artifact_id).is_file()

    def put(self, document: Artifact, *, created_at: str) -> tuple[StoredArtifact, bool]:
        """Store `document` unless it is stored already; (the record, True when new).
        Raises ArtifactProblem for a document that cannot be stored."""
        record = self._record(document, created_at)
        existing = self.get(record.id)
        if existing is not None:
            return existing, False
        self._folder()
        if atomic.create_bytes(self.path(record.id), encode(record)):
            return record, True
        # another writer stored the same document a moment ago: theirs is the record
        existing = self._kept_or_replaced(record.id, encode(record))
        return (existing, False) if existing is not None else (record, True)

    def _kept_or_replaced(self, artifact_id: str, raw: bytes) -> StoredArtifact | None:
        """After a create found the file there: the record it holds, or, when it does not
        check out (torn, tampered), None once the file is replaced by `raw`."""
        existing = self.get(artifact_id)
        if existing is None:
            atomic.write_bytes(self.path(artifact_id), raw)
        return existing

    def _folder(self) -> None:
        """The folder, made if missing; an OSError naming it when something else is there."""
        try:
            self.root.mkdir(parents=True, exist_ok=True)
        except FileExistsError:
            raise NotADirectoryError(
                20, "is not a folder (paths.artifacts must name a folder)", str(self.root)
            ) from None

    def put_json_many(
        self, documents: list[dict[str, Any]], *, created_at: str
    ) -> list[tuple[str, bool] | ArtifactProblem]:
        """`put` for several documents of plain JSON values that the daemon built itself
        from what it wrote (a task's trace, from its own event log; kind, tags and parent
        valid), made durable together (`atomic.create_many`: two syncs for the batch). The
        same canonical JSON, id and record file as `put`, without pydantic's validation and
        serialization of any-JSON content, which cost most of a trace's time and held the
        interpreter lock from the event loop. Per document its (id, new: False when stored
        before) or the problem that kept it out; an OSError (a full disk) is raised for the
        whole batch."""
        out: list[tuple[str, bool] | ArtifactProblem] = []
        fresh: list[tuple[int, str, bytes]] = []
        for document in documents:
            try:
                data = _storable({"parent": None, "tags": [], "metadata": {}} | document)
            except ArtifactProblem as problem:
                out.append(problem)
                continue
            artifact_id = id_of(data)
            out.append((artifact_id, True))
            fresh.append((len(out) - 1, artifact_id, _record_bytes(artifact_id, created_at, data)))
        if fresh:
            self._folder()
            created = atomic.create_many([(self.path(i), raw) for _, i, raw in fresh])
            for (index, artifact_id, raw), new in zip(fresh, created, strict=True):
                if not new and self._kept_or_replaced(artifact_id, raw) is not None:
                    out[index] = (artifact_id, False)  # stored before: its first record stays
        return out

    def _record(self, document: Artifact, created_at: str) -> StoredArtifact:
        data = _storable(document.model_dump(mode="json"))
        return StoredArtifact(
            id=id_of(data), created_at=created_at, size_bytes=len(data), document=document
        )

    def get(self, artifact_id: str) -> StoredArtifact | None:
        """The stored record, or None when there is none (or its file does not check out)."""
        try:
            record = StoredArtifact.model_validate_json(self.path(artifact_id).read_bytes())
        except (OSError, ValidationError, ValueError):
            return None
        if id_of(canonical(record.document)) != record.id:
            return None
        return record

    def newest(
        self, *, kind: str | None = None, tags: frozenset[str] = frozenset()
    ) -> Iterator[StoredArtifact]:
        """Every stored artifact (of `kind`, holding all of `tags`), most recently written
        first (a scan of the folder; files whose kind and tags were read once and do not
        match are not read again)."""
        try:
            entries = [p for p in self.root.glob("*.json") if _ID.fullmatch(p.stem)]
        except OSError:
            return
        stamped = []
        for path in entries:
            try:
                stamped.append((path.stat().st_mtime_ns, path.name, path))
            except OSError:
                continue
        for _, _, path in sorted(stamped, reverse=True):
            labels = self._labels.get(path.stem)
            if labels is not None and not _labelled(labels, kind, tags):
                continue
            record = self.get(path.stem)
            if record is None:
                continue
            labels = (record.document.kind, frozenset(record.document.tags))
            if len(self._labels) >= LABELS_KEPT:
                self._labels.clear()
            self._labels[path.stem] = labels
            if _labelled(labels, kind, tags):
                yield record


LABELS_KEPT = 200_000  # artifacts whose kind and tags are remembered (a few MB)


def _labelled(labels: tuple[str, frozenset[str]], kind: str | None, tags: frozenset[str]) -> bool:
    return (kind is None or labels[0] == kind) and tags <= labels[1]


def _record_bytes(artifact_id: str, created_at: str, document: bytes) -> bytes:
    """A record file as `encode` lays it out, with the document as its canonical JSON."""
    head = (
        f'{{\n  "id": {json.dumps(artifact_id)},\n  "created_at": {json.dumps(created_at)},\n'
        f'  "size_bytes": {len(document)},\n  "document": '
    )
    return head.encode() + document + b"\n}\n"


def encode(record: StoredArtifact) -> bytes:
    # pydantic's encoder: json.dumps with an indent runs in pure Python, several times slower
    # (the document is canonical already, so no lone surrogate or NaN reaches here)
    return record.model_dump_json(indent=2).encode("utf-8") + b"\n"
