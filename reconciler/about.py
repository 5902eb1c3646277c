"""What this program is: its version, from the installed package metadata (pyproject.toml),
for `orchctl --version` and status.json."""

from __future__ import annotations

import functools
from importlib import metadata


@functools.cache  # reading package metadata parses files: once per process is enough
def version() -> str:
    try:
        return metadata.version("llama-orch-home")
    except metadata.PackageNotFoundError:  # run from a checkout that was never installed
        return "0+unknown"
