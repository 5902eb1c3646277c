"""Steps for the reports `orchctl smoke` writes (smoke_report.md, environment.md)."""

from __future__ import annotations

from typing import Any

from behave import then
from orch_support import describe_command


def _read(context: Any, path: str) -> str:
    file = context.root / path
    assert file.is_file(), f"no {path}\n{describe_command(context)}"
    return file.read_text()


@then('"{path}" shows these checks')
def shows_checks(context: Any, path: str) -> None:
    found = []
    for line in _read(context, path).splitlines():
        cells = [c.strip() for c in line.strip("|").split(" | ")]
        if len(cells) == 4 and cells[1] in ("passed", "failed", "not run"):
            found.append((cells[0], cells[1], cells[3]))
    got = [(name, result) for name, result, _ in found]
    want = [(row["check"], row["result"]) for row in context.table]
    assert got == want, "\n".join(f"{n}: {r} ({why})" for n, r, why in found)


@then('"{path}" says "{text}"')
def says(context: Any, path: str, text: str) -> None:
    body = _read(context, path)
    assert text in body, body
