"""Where llama.cpp's source (or a ready binary) comes from, for the llama.cpp provisioner.

`provision_llamacpp.ensure` calls `parse` on the source a user names and `fetch` to put the
tree on disk. Four kinds, written as one string (engines.llamacpp.provision.ref in orch.yaml,
`--source` on the command line):

    pypi:0.3.36                  the llama-cpp-python sdist from PyPI (vendor/llama.cpp); a
                                 bare version (`0.3.36`) means the same
    path:/src/llama.cpp          a local checkout or an unpacked source tarball, built in place
    git+https://host/repo@REF    a git URL at a pinned ref (a tag or a commit; `git+file://`
                                 works too); the commit it resolved to is recorded
    binary:/opt/llama-server     an existing llama-server: nothing is built

`identity` is the part of the cache key that names the source: the PyPI sdist adds nothing
(so today's `0.3.36-cpu` cache folder keeps its name), the others a short hash of where they
come from, so two checkouts never share a build.
"""

from __future__ import annotations

import hashlib
import re
import shutil
import subprocess
import sys
import tarfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from plugins import interfaces

DEFAULT_VERSION = "0.3.36"  # llama-cpp-python release whose vendor/llama.cpp is built
Kind = Literal["pypi", "path", "git", "binary"]
_SAFE = re.compile(r"[^A-Za-z0-9._-]+")


@dataclass(frozen=True)
class Source:
    kind: Kind
    location: str  # the version (pypi), a folder (path), a URL (git) or a file (binary)
    ref: str | None = None  # git only

    def __str__(self) -> str:
        if self.kind == "git":
            return f"git+{self.location}@{self.ref}"
        return f"{self.kind}:{self.location}"

    @property
    def version(self) -> str:
        """The version part of the cache key: the PyPI version, the git ref, or `local`."""
        if self.kind == "pypi":
            return self.location
        if self.kind == "git":
            return _SAFE.sub("_", self.ref or "")[:40]
        return "local"

    @property
    def identity(self) -> str | None:
        """What tells this source from others of its kind, for the cache key (None: PyPI)."""
        if self.kind == "pypi":
            return None
        digest = hashlib.sha256(str(self).encode()).hexdigest()[:10]
        return f"{self.kind}.{digest}"


def parse(text: str) -> Source:
    """A source string as documented above; ValueError names what is wrong."""
    text = text.strip()
    if not text:
        raise ValueError("the llama.cpp source is empty")
    if text.startswith("git+"):
        url, at, ref = text[4:].rpartition("@")
        _, sep, rest = url.partition("://")
        if not at or not ref or not sep or "/" not in rest:  # ssh://git@host/r has no ref
            raise ValueError(
                f"{text!r}: a git source is git+URL@REF with a pinned ref (a tag or a "
                "commit), e.g. git+https://github.com/ggml-org/llama.cpp@b6500"
            )
        return Source("git", url, ref)
    scheme, colon, rest = text.partition(":")
    if colon and scheme in ("path", "binary"):
        if not rest:
            raise ValueError(f"{text!r}: {scheme}: needs a path after the colon")
        return Source(scheme, str(Path(rest).expanduser().resolve()))  # type: ignore[arg-type]
    if colon and scheme == "pypi":
        return Source("pypi", _pypi_version(rest or DEFAULT_VERSION, text))
    if colon:
        raise ValueError(
            f"{text!r}: unknown llama.cpp source {scheme}: (pypi:VERSION, path:DIR, "
            "git+URL@REF or binary:FILE)"
        )
    return Source("pypi", _pypi_version(text, text))


def _pypi_version(version: str, text: str) -> str:
    if not re.fullmatch(r"[0-9][0-9A-Za-z.+-]*", version):
        raise ValueError(f"{text!r}: {version!r} is not a llama-cpp-python version")
    return version


@dataclass(frozen=True)
class Fetched:
    tree: Path  # the folder with llama.cpp's top CMakeLists.txt
    commit: str | None  # the git commit built, when known


Run = Callable[[list[str], Path | None], str]  # argv, cwd → stdout; raises on failure


def run(argv: list[str], cwd: Path | None = None) -> str:
    proc = subprocess.run(argv, cwd=cwd, capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        tail = "\n".join((proc.stdout + proc.stderr).strip().splitlines()[-15:])
        raise RuntimeError(f"`{' '.join(argv[:4])}` failed ({proc.returncode}):\n{tail}")
    return proc.stdout


def fetch(
    source: Source,
    work: Path,
    *,
    sdists: Path,
    progress: Callable[[str], None],
    run: Run = run,
) -> Fetched:
    """The source tree of `source`, unpacked or cloned under `work` (path: is used in place).
    PyPI sdists are kept in `sdists`, so a rebuild for other GPUs downloads nothing."""
    if source.kind == "path":
        tree = Path(source.location)
        check_tree(tree, str(source))
        commit = None
        if (tree / ".git").exists():
            try:
                commit = run(["git", "-C", str(tree), "rev-parse", "HEAD"], None).strip()
            except (RuntimeError, OSError):
                commit = None  # git missing or a broken checkout: build what is there
        return Fetched(tree, commit)
    if source.kind == "git":
        return _clone(source, work / "src", progress=progress, run=run)
    if source.kind == "pypi":
        return Fetched(_unpack_sdist(source.location, work, sdists, progress, run), None)
    raise ValueError(f"{source} is a binary, not a source to build")


def check_tree(tree: Path, what: str) -> None:
    if not (tree / "CMakeLists.txt").is_file() or not (tree / "ggml").is_dir():
        raise interfaces.EnvironmentMissing(
            f"{what} is not a llama.cpp source tree (no CMakeLists.txt and ggml/ in {tree})",
            "point path: at the top folder of a llama.cpp checkout or unpacked source tarball",
        )


def _clone(source: Source, dest: Path, *, progress: Callable[[str], None], run: Run) -> Fetched:
    assert source.ref is not None
    progress(f"fetching {source.location} at {source.ref} with git")
    if dest.exists():
        _remove_tree(dest)
    dest.mkdir(parents=True)
    run(["git", "init", "-q", str(dest)], None)
    run(["git", "-C", str(dest), "remote", "add", "origin", source.location], None)
    try:  # one commit deep: a full llama.cpp history is hundreds of MB
        run(["git", "-C", str(dest), "fetch", "-q", "--depth", "1", "origin", source.ref], None)
    except RuntimeError:  # a server that refuses shallow fetches of this ref: take it all
        run(["git", "-C", str(dest), "fetch", "-q", "--tags", "origin"], None)
        run(["git", "-C", str(dest), "fetch", "-q", "origin", source.ref], None)
    run(["git", "-C", str(dest), "checkout", "-q", "--detach", "FETCH_HEAD"], None)
    commit = run(["git", "-C", str(dest), "rev-parse", "HEAD"], None).strip()
    check_tree(dest, str(source))
    return Fetched(dest, commit)


def _unpack_sdist(
    version: str, work: Path, sdists: Path, progress: Callable[[str], None], run: Run
) -> Path:
    sdists.mkdir(parents=True, exist_ok=True)
    found = sorted(sdists.glob(f"llama_cpp_python-{version}.tar.gz"))
    if not found:
        progress(f"downloading llama-cpp-python=={version} source from PyPI")
        run(
            [
                sys.executable,
                "-m",
                "pip",
                "download",
                "--no-deps",
                "--no-binary",
                ":all:",
                f"llama-cpp-python=={version}",
                "-d",
                str(sdists),
            ],
            None,
        )
        found = sorted(sdists.glob(f"llama_cpp_python-{version}.tar.gz"))
        if not found:
            raise RuntimeError(f"pip downloaded no llama_cpp_python-{version}.tar.gz")
    progress(f"unpacking {found[0].name}")
    with tarfile.open(found[0]) as tar:
        tar.extractall(work, filter="data")
    tree = work / f"llama_cpp_python-{version}" / "vendor" / "llama.cpp"
    check_tree(tree, f"pypi:{version}")
    return tree


def _remove_tree(path: Path) -> None:
    shutil.rmtree(path, ignore_errors=True)
