"""Model resolvers: turn a model `ref` from orch.yaml into a file the engine can load.

Built-in: `file:` (a path, relative to orch.yaml's folder). Resolvers for `hf:` and `https:`
(download into the catalog) come with the catalog work; a ref with a scheme nobody registered
is reported on its pool. The pool runtime calls `resolve` when it builds a replica's spec and
`verify` before it starts an engine on a file with a pinned digest.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from plugins import hookspecs
from state import desired


@dataclass(frozen=True)
class ResolvedModel:
    path: Path | None
    size_mib: int | None  # None when the file is not there (yet)


class FileResolver:
    scheme = "file"

    def __call__(self, ref: str, base: Path) -> ResolvedModel:
        path = desired.resolve(base, ref.removeprefix("file:"))
        try:
            size = max(1, path.stat().st_size // (1024 * 1024))
        except OSError:
            size = None
        return ResolvedModel(path, size)


_digests: dict[tuple[str, int, int], str] = {}


def file_digest(path: Path) -> str:
    """sha256 of a model file, cached by (path, size, mtime): files are GBs, hash them once."""
    st = path.stat()
    key = (str(path), st.st_size, st.st_mtime_ns)
    if key not in _digests:
        h = hashlib.sha256()
        with path.open("rb") as fh:
            for chunk in iter(lambda: fh.read(1 << 20), b""):
                h.update(chunk)
        _digests[key] = "sha256:" + h.hexdigest()
    return _digests[key]


def verify(path: Path | None, digest: str | None) -> str | None:
    """None when the file matches its pinned digest (or none is pinned); else the problem."""
    if digest is None or path is None or not path.exists():
        return None
    actual = file_digest(path)
    if actual != digest:
        return f"UNTRUSTED_ARTIFACT: {path.name} has digest {actual}, orch.yaml pins {digest}"
    return None


class _Plugin:
    @hookspecs.hookimpl
    def orch_register_model_resolvers(self, register: Callable[[str, Any], None]) -> None:
        register("file", FileResolver())


plugin = _Plugin()
