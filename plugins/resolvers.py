"""Model resolvers: turn a model `ref` from orch.yaml into a file the engine can load.

Built-in, registered through `orch_register_model_resolvers`:

    file:models/x.gguf                   a path, relative to orch.yaml's folder
    hf:org/repo/file.gguf                a file of a Hugging Face hub repository, at `main`
    hf:org/repo@REVISION/file.gguf       … at a branch, tag or commit
    https://host/path/file.gguf          any URL (`http://` too: pin a digest for it)

A resolver is called as `resolver(ref, base) -> ResolvedModel` and never touches the network:
for `hf:` and `https:` the path is where the file will be in the model cache
(`~/.cache/llama-orch/models/`, or `$LLAMA_ORCH_MODELS`). Those resolvers have
`downloadable = True` and a blocking `fetch(ref, digest=…, progress=…, cancel=…)` that
`plugins.downloads` carries out (resumable, verified, renamed into place); the daemon runs it
in a worker thread (`reconciler.fetching`) and shows the pool Progressing meanwhile. The hub
is `$HF_ENDPOINT` (default https://huggingface.co), files at
`/{org}/{repo}/resolve/{revision}/{file}`, with `$HF_TOKEN` sent for gated repositories.
`check(ref)` says what is wrong with a ref that cannot be downloaded at all.

The pool runtime calls the resolver when it builds a replica's spec, and `verify` before it
starts an engine on a file with a pinned digest. A ref with a scheme nobody registered is
reported on its pool.
"""

from __future__ import annotations

import hashlib
import os
import re
import threading
import urllib.parse
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from plugins import downloads, hookspecs
from state import desired

MODELS_ENV = "LLAMA_ORCH_MODELS"  # the model cache folder (tests point it elsewhere)
HF_DEFAULT = "https://huggingface.co"
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")


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


def model_cache() -> Path:
    """Where downloaded models live: $LLAMA_ORCH_MODELS, else ~/.cache/llama-orch/models."""
    configured = os.environ.get(MODELS_ENV)
    if configured:
        return Path(configured).expanduser()
    return Path.home() / ".cache" / "llama-orch" / "models"


@dataclass(frozen=True)
class Remote:
    """Where a downloadable ref comes from and goes to."""

    url: str
    path: Path
    headers: dict[str, str]


class _Downloading:
    """What the hub and URL resolvers share: a local path, and fetching the file to it."""

    downloadable = True

    def remote(self, ref: str) -> Remote:
        raise NotImplementedError

    def __call__(self, ref: str, base: Path) -> ResolvedModel:
        try:
            path = self.remote(ref).path
        except ValueError:
            return ResolvedModel(None, None)  # `check` explains; nothing to load
        try:
            size = max(1, path.stat().st_size // (1024 * 1024))
        except OSError:
            size = None
        return ResolvedModel(path, size)

    def check(self, ref: str) -> str | None:
        try:
            self.remote(ref)
        except ValueError as exc:
            return str(exc)
        return None

    def fetch(
        self,
        ref: str,
        *,
        digest: str | None = None,
        progress: downloads.Progress | None = None,
        cancel: threading.Event | None = None,
    ) -> Path:
        """Download the file (blocking; resumes a part left earlier); raises DownloadError."""
        remote = self.remote(ref)
        path = downloads.download(
            remote.url,
            remote.path,
            digest=digest,
            headers=remote.headers,
            progress=progress,
            cancel=cancel,
        )
        if digest is not None:
            remember_digest(path, digest)  # verified while downloading: no second read
        return path


class HubResolver(_Downloading):
    """`hf:org/repo[@revision]/path/in/repo.gguf` from the Hugging Face hub."""

    scheme = "hf"

    def remote(self, ref: str) -> Remote:
        body = ref.removeprefix("hf:").strip("/")
        parts = body.split("/")
        if len(parts) < 3:
            raise ValueError(
                f"{ref!r}: a hub ref is hf:ORG/REPO/FILE, e.g. "
                "hf:Qwen/Qwen2.5-0.5B-Instruct-GGUF/qwen2.5-0.5b-instruct-q4_k_m.gguf"
            )
        org, repo, files = parts[0], parts[1], parts[2:]
        repo, _, revision = repo.partition("@")
        revision = revision or "main"
        for name in (org, repo, revision, *files):
            _safe_name(name, ref)
        endpoint = os.environ.get("HF_ENDPOINT", HF_DEFAULT).rstrip("/")
        file = "/".join(urllib.parse.quote(f) for f in files)
        url = f"{endpoint}/{org}/{repo}/resolve/{urllib.parse.quote(revision)}/{file}"
        headers = {}
        if token := os.environ.get("HF_TOKEN"):
            headers["Authorization"] = f"Bearer {token}"
        path = model_cache() / "hf" / org / repo / revision / Path(*files)
        return Remote(url, path, headers)


class UrlResolver(_Downloading):
    """`https://…` (and `http://…`): the file at that URL."""

    def __init__(self, scheme: str) -> None:
        self.scheme = scheme

    def remote(self, ref: str) -> Remote:
        split = urllib.parse.urlsplit(ref)
        if split.scheme != self.scheme or not split.hostname:
            raise ValueError(f"{ref!r} is not a {self.scheme}:// URL with a host")
        name = split.path.rstrip("/").rsplit("/", 1)[-1] or "model.gguf"
        name = re.sub(r"[^A-Za-z0-9._-]", "_", urllib.parse.unquote(name)).lstrip(".")
        tag = hashlib.sha256(ref.encode()).hexdigest()[:16]  # two URLs never share a file
        path = model_cache() / "url" / split.hostname / tag / (name or "model.gguf")
        return Remote(ref, path, {})


def _safe_name(name: str, ref: str) -> None:
    if not _NAME.fullmatch(name) or name in (".", ".."):
        raise ValueError(
            f"{ref!r}: {name!r} is not a plain name (letters, digits, '.', '_', '-'); "
            "a hub ref is hf:ORG/REPO/FILE"
        )


_digests: dict[tuple[str, int, int, int, int, int], str] = {}


def _identity(path: Path) -> tuple[str, int, int, int, int, int]:
    """What changes whenever a file's bytes may have: a file renamed over it (another inode),
    or rewritten in place, even to the same size with its mtime set back (`touch -r`, `cp -p`):
    its ctime then moves all the same, and that no tool can set back."""
    st = path.stat()
    return (str(path), st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)


def remember_digest(path: Path, digest: str) -> None:
    """A digest computed while the file was written, so `verify` need not read it again."""
    _digests[_identity(path)] = digest


def file_digest(path: Path) -> str:
    """sha256 of a model file, cached by its identity (`_identity`): files are GBs, hash
    them once, and again only when they may have changed."""
    key = _identity(path)
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
        register("hf", HubResolver())
        register("https", UrlResolver("https"))
        register("http", UrlResolver("http"))


plugin = _Plugin()
