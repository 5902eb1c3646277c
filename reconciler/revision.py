"""The config revision: the git commit of orch.yaml when it is tracked (with a dirty flag),
else a hash of its content. Shown in status and stamped on every result."""

from __future__ import annotations

import subprocess
from pathlib import Path

from state import desired


def of(path: Path, content: bytes) -> str:
    try:
        head = _git(path, "log", "-n1", "--format=%h", "--", path.name)
        if head:
            dirty = _git(path, "status", "--porcelain", "--", path.name)
            return f"git:{head}" + ("+dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        pass
    return desired.revision_hash(content)


def _git(path: Path, *args: str) -> str:
    proc = subprocess.run(
        ["git", "-C", str(path.parent), *args],
        capture_output=True,
        text=True,
        timeout=5,
        check=False,
    )
    return proc.stdout.strip() if proc.returncode == 0 else ""
