"""Typed ids used across rooms, so a reader sees which kind of id a function takes."""

from __future__ import annotations

import re
from typing import NewType

TaskId = NewType("TaskId", str)
SessionId = NewType("SessionId", str)
PoolId = NewType("PoolId", str)
ReplicaId = NewType("ReplicaId", str)
ModelId = NewType("ModelId", str)
GpuUuid = NewType("GpuUuid", str)

# Ids become file names (results/<task_id>.json), so they may hold no path separators,
# no "..", no NUL or newline: only this conservative alphabet.
ID_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$"
_SAFE_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")


def check_safe_id(value: str) -> str:
    """A pydantic validator: ids become file names, so `..` is refused as well."""
    if not is_safe_id(value):
        raise ValueError(f"{value!r} is not a safe id (letters, digits, '.', '_', '-'; no '..')")
    return value


def is_safe_id(value: str) -> bool:
    """True when `value` can be used as a file name component without any path trick."""
    # fullmatch, not match with `$`: `$` also matches before a trailing newline
    return _SAFE_RE.fullmatch(value) is not None and ".." not in value


def quoted(value: str) -> str:
    """A user-given name or id for a message: quoted, its length bounded, and every character
    that does not print (a control character, a byte of a name that is not UTF-8) escaped;
    letters of any script are shown as they are."""
    return "'" + shown(value, 80).replace("'", "\\'") + "'"


def shown(value: str, limit: int) -> str:
    """`value` bounded to `limit` characters, every character that does not print escaped
    (as `quoted`, without the quotes)."""
    cut = value if len(value) <= limit else value[: limit - 3] + "..."
    return "".join(_shown(c) for c in cut)


def _shown(c: str) -> str:
    """One character of a message: as it is when it prints; a byte of a name that is not
    UTF-8 (which arrives as a lone surrogate) as that byte, \\xff; any other as its escape."""
    if c.isprintable():
        return c
    if 0xDC80 <= ord(c) <= 0xDCFF:
        return f"\\x{ord(c) - 0xDC00:02x}"
    return c.encode("unicode_escape", "backslashreplace").decode("ascii")
