"""Steps for "A first hour with orchctl": the exact lines a newcomer sees."""

from __future__ import annotations

import json
import signal
import subprocess
from typing import Any

from behave import step, then, when
from orch_support import config_path, describe_command, write_atomically

FORBIDDEN = ("{'", "None ms", "pid None", "Traceback", "Value error,")


def _seen(context: Any) -> subprocess.CompletedProcess[str]:
    done: subprocess.CompletedProcess[str] = context.command
    if not hasattr(context, "outputs"):
        context.outputs = []
    context.outputs.append((context.command_line, done.stdout + done.stderr))
    return done


def _lines(text: str) -> list[str]:
    return [line.rstrip() for line in text.splitlines()]


def _starts_with(got: str, expected: str) -> bool:
    want = _lines(expected)
    return _lines(got)[: len(want)] == want


@step("I make the HTTP API pick a free port")
def free_port(context: Any) -> None:
    path = config_path(context)
    text = path.read_text()
    assert "127.0.0.1:8080" in text, text
    write_atomically(path, text.replace("127.0.0.1:8080", "127.0.0.1:0"))


@when('I write the task file "{name}"')
def write_task_file(context: Any, name: str) -> None:
    (context.root / name).write_text(context.text + "\n")


@then("it exits {code:d} and prints")
def exits_and_prints(context: Any, code: int) -> None:
    done = _seen(context)
    assert done.returncode == code and _starts_with(done.stdout, context.text), describe_command(
        context
    )


@then("it exits {code:d} and its errors say")
def exits_and_says(context: Any, code: int) -> None:
    done = _seen(context)
    assert done.returncode == code and _starts_with(done.stderr, context.text), describe_command(
        context
    )


@then('it exits {code:d} and its errors mention "{first}" and "{second}"')
def exits_and_mentions(context: Any, code: int, first: str, second: str) -> None:
    done = _seen(context)
    assert done.returncode == code, describe_command(context)
    assert first in done.stderr and second in done.stderr, describe_command(context)


@then('it exits {code:d} and its last line starts with "{text}"')
def last_line_starts(context: Any, code: int, text: str) -> None:
    done = _seen(context)
    lines = _lines(done.stdout)
    assert done.returncode == code and lines and lines[-1].startswith(text), describe_command(
        context
    )


@then('it exits {code:d} and its last line is "{text}"')
def last_line_is(context: Any, code: int, text: str) -> None:
    done = _seen(context)
    lines = _lines(done.stdout)
    assert done.returncode == code and lines and lines[-1] == text, describe_command(context)


@then('it exits {code:d} and its first line mentions "{text}"')
def first_line_mentions(context: Any, code: int, text: str) -> None:
    done = _seen(context)
    lines = _lines(done.stdout)
    assert done.returncode == code and lines and text in lines[0], describe_command(context)


@when("I press Ctrl-C on the daemon")
def ctrl_c(context: Any) -> None:
    context.daemon.send_signal(signal.SIGINT)


@then('the daemon exits {code:d} and its log says "{text}"')
def daemon_exits(context: Any, code: int, text: str) -> None:
    assert context.daemon.wait(30) == code
    humans = [
        json.loads(line).get("human", "")
        for line in (context.root / "daemon.log.jsonl").read_text().splitlines()
    ]
    assert text in humans, humans[-10:]
    out = (context.root / "daemon.out").read_text(errors="replace")
    context.outputs = [*getattr(context, "outputs", []), ("orchctl serve", out)]


@then('no output of this scenario contains "{a}", "{b}", "{c}", "{d}" or "{e}"')
def no_internals(context: Any, a: str, b: str, c: str, d: str, e: str) -> None:
    assert {a, b, c, d, e} == set(FORBIDDEN)
    for command, text in getattr(context, "outputs", []):
        bad = [word for word in FORBIDDEN if word in text]
        assert not bad, f"`{command}` printed {bad}:\n{text}"
