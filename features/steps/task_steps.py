"""Steps about tasks: dropping task files, their results, spool folders, event logs, orchctl."""

from __future__ import annotations

import json
from typing import Any

import yaml
from behave import given, step, then, when
from orch_support import (
    TERMINAL,
    deliver,
    describe_command,
    frames,
    orchctl,
    result,
    task_text,
    the_spool,
    wait_for,
    wait_terminal,
)


def _remember(context: Any, task_id: str, found: dict[str, Any]) -> None:
    if not hasattr(context, "results"):
        context.results = {}
    context.results[task_id] = found


def _terminal(context: Any, task_id: str) -> dict[str, Any]:
    found = wait_terminal(context, task_id)
    _remember(context, task_id, found)
    return found


def _error(context: Any, task_id: str) -> dict[str, Any]:
    found = context.results.get(task_id) if hasattr(context, "results") else None
    found = found or _terminal(context, task_id)
    error: dict[str, Any] | None = found.get("error")
    assert error, f"task {task_id!r} has no error: {found}"
    return error


# -- dropping task files ----------------------------------------------------------------------


@step('I drop the task file "{name}"')
def drop_file(context: Any, name: str) -> None:
    deliver(context, name, context.text + "\n")


@step('I drop a task "{task_id:Id}"')
def drop_task(context: Any, task_id: str) -> None:
    deliver(context, f"{task_id}.task.yaml", task_text(task_id))


@step('I drop a task "{task_id:Id}" with max_tokens {max_tokens:d}')
def drop_task_tokens(context: Any, task_id: str, max_tokens: int) -> None:
    deliver(context, f"{task_id}.task.yaml", task_text(task_id, max_tokens=max_tokens))


@step('I drop a task "{task_id:Id}" for model "{model_id:Id}"')
def drop_task_model(context: Any, task_id: str, model_id: str) -> None:
    deliver(context, f"{task_id}.task.yaml", task_text(task_id, model=model_id))


@step('I drop a task "{task_id:Id}" for pool "{pool_id:Id}"')
def drop_task_pool(context: Any, task_id: str, pool_id: str) -> None:
    deliver(context, f"{task_id}.task.yaml", task_text(task_id, pool=pool_id))


@step('I drop a task "{task_id:Id}" in session "{session_id:Id}"')
def drop_task_session(context: Any, task_id: str, session_id: str) -> None:
    deliver(context, f"{task_id}.task.yaml", task_text(task_id, session_id=session_id))


@given('a task file "{name}" in my working folder')
def task_file_here(context: Any, name: str) -> None:
    assert isinstance(yaml.safe_load(context.text), dict)
    (context.root / name).write_text(context.text + "\n")


# -- results ----------------------------------------------------------------------------------


@step('task "{task_id:Id}" succeeds')
def task_succeeds(context: Any, task_id: str) -> None:
    found = _terminal(context, task_id)
    assert found["status"] == "succeeded", f"task {task_id!r}: {json.dumps(found, indent=2)}"
    assert found["tokens_out"] > 0 and found["text"], found


@step('task "{task_id:Id}" is {state:Status}')
def task_is(context: Any, task_id: str, state: str) -> None:
    if state in TERMINAL:
        found = _terminal(context, task_id)
        assert found["status"] == state, f"task {task_id!r}: {json.dumps(found, indent=2)}"
        return

    def reached() -> dict[str, Any] | None:
        found = result(context, task_id)
        if found and found["status"] in TERMINAL:
            raise AssertionError(f"task {task_id!r} ended while we waited for {state}: {found}")
        return found if found and found["status"] == state else None

    wait_for(
        context,
        reached,
        lambda: f"task {task_id!r} to be {state} (last seen: {result(context, task_id)})",
    )


@then('task "{task_id:Id}" is {state:Status} with {code:Code}')
def task_is_with(context: Any, task_id: str, state: str, code: str) -> None:
    found = _terminal(context, task_id)
    assert found["status"] == state, f"task {task_id!r}: {json.dumps(found, indent=2)}"
    assert found["error"] and found["error"]["code"] == code, found["error"]


@then('the error of task "{task_id:Id}" is retriable')
def error_retriable(context: Any, task_id: str) -> None:
    assert _error(context, task_id)["retriable"] is True


@then('the error of task "{task_id:Id}" is retriable, with retry_after_ms set')
def error_retry_after(context: Any, task_id: str) -> None:
    error = _error(context, task_id)
    assert error["retriable"] is True, error
    assert isinstance(error["retry_after_ms"], int) and error["retry_after_ms"] > 0, error


@then('the error of task "{task_id:Id}" has a hint saying "{text}"')
def error_hint(context: Any, task_id: str, text: str) -> None:
    error = _error(context, task_id)
    assert text in (error["hint"] or ""), error


@then('the error message of task "{task_id:Id}" mentions "{text}"')
def error_message(context: Any, task_id: str, text: str) -> None:
    error = _error(context, task_id)
    assert text in error["message"], error


@then('the error of task "{task_id:Id}" has the policy label "{label}"')
def error_policy(context: Any, task_id: str, label: str) -> None:
    assert _error(context, task_id)["policy_label"] == label


@then('task "{task_id:Id}" still has its first result')
def first_result_kept(context: Any, task_id: str) -> None:
    assert result(context, task_id) == context.results[task_id]


@then('task "{task_id:Id}" ran on pool "{pool_id:Id}"')
def ran_on(context: Any, task_id: str, pool_id: str) -> None:
    found = _terminal(context, task_id)
    assert found["pool_id"] == pool_id, found


@then('task "{task_id:Id}" produced fewer than {n:d} tokens')
def fewer_tokens(context: Any, task_id: str, n: int) -> None:
    found = _terminal(context, task_id)
    assert found["tokens_out"] < n, found


# -- the spool --------------------------------------------------------------------------------


@then('"{name}" is filed in spool/{folder:w}')
def filed_in(context: Any, name: str, folder: str) -> None:
    path = the_spool(context).root / folder / name
    wait_for(context, path.exists, f"spool/{folder}/{name}")


@then('"{name}" is quarantined in spool/failed with {code:Code}')
def quarantined(context: Any, name: str, code: str) -> None:
    failed = the_spool(context).failed
    error_path = failed / f"{name}.error.json"
    wait_for(context, error_path.exists, f"spool/failed/{name}.error.json")
    assert (failed / name).exists(), f"spool/failed/{name} is missing"
    context.error_file = json.loads(error_path.read_text())
    assert context.error_file["code"] == code, context.error_file


@then('the error file points at line {line:d}, field "{field}"')
def error_file_line(context: Any, line: int, field: str) -> None:
    error = context.error_file
    assert (error["line"], error["field"]) == (line, field), error
    assert f":{line}:" in error["message"], error["message"]


@then("the error file points at line {line:d}")
def error_file_line_only(context: Any, line: int) -> None:
    error = context.error_file
    assert error["line"] == line, error
    assert f":{line}:" in error["message"], error["message"]


@then('the error file has a hint saying "{text}"')
def error_file_hint(context: Any, text: str) -> None:
    assert text in (context.error_file["hint"] or ""), context.error_file


@then('the error file message mentions "{text}"')
def error_file_message(context: Any, text: str) -> None:
    assert text in context.error_file["message"], context.error_file


@then("nothing is left in spool/incoming or spool/active")
def spool_drained(context: Any) -> None:
    s = the_spool(context)
    left = [*s.incoming.iterdir(), *s.active.iterdir()]
    assert not left, left


# -- event logs -------------------------------------------------------------------------------


@step('task "{task_id:Id}" has streamed at least {n:d} tokens')
def streamed(context: Any, task_id: str, n: int) -> None:
    def enough() -> bool:
        return sum(f.event == "token" for f in frames(context, task_id)) >= n

    wait_for(context, enough, f"{n} token frames of task {task_id!r}")


def _last_frame(context: Any, task_id: str) -> Any:
    log = frames(context, task_id)
    assert log, f"task {task_id!r} has an empty event log"
    assert [f.id for f in log] == list(range(1, len(log) + 1)), [f.id for f in log]
    terminal = [i for i, f in enumerate(log) if f.event in ("end", "error")]
    assert terminal == [len(log) - 1], f"one terminal frame, last: {[f.event for f in log]}"
    return log[-1]


@then('the event log of task "{task_id:Id}" ends with an error frame of {code:Code}')
def log_ends_error(context: Any, task_id: str, code: str) -> None:
    last = _last_frame(context, task_id)
    assert last.event == "error" and last.data["code"] == code, last


@then('the event log of task "{task_id:Id}" ends with an end frame, finish_reason "{reason}"')
def log_ends_end(context: Any, task_id: str, reason: str) -> None:
    last = _last_frame(context, task_id)
    assert last.event == "end" and last.data["finish_reason"] == reason, last


@then('the event log of task "{task_id:Id}" has no "{event}" frame')
def log_lacks(context: Any, task_id: str, event: str) -> None:
    names = [f.event for f in frames(context, task_id)]
    assert event not in names, names


@then('no token frame follows the end frame of task "{task_id:Id}"')
def nothing_after_end(context: Any, task_id: str) -> None:
    log = frames(context, task_id)
    ends = [i for i, f in enumerate(log) if f.event == "end"]
    assert len(ends) == 1, [f.event for f in log]
    after = [f.event for f in log[ends[0] + 1 :]]
    assert "token" not in after and not after, after


# -- orchctl ----------------------------------------------------------------------------------


@when('I run "orchctl {args}"')
def run_orchctl(context: Any, args: str) -> None:
    orchctl(context, args)


@then("the command exits with {code:d}")
def exits_with(context: Any, code: int) -> None:
    assert context.command.returncode == code, describe_command(context)


@then('its output contains "{text}"')
def output_contains(context: Any, text: str) -> None:
    assert text in context.command.stdout, describe_command(context)


@then('its output contains the text of task "{task_id:Id}"')
def output_has_text(context: Any, task_id: str) -> None:
    found = _terminal(context, task_id)
    assert found["text"], found
    assert found["text"] in context.command.stdout, (
        f"text {found['text']!r} not printed\n{describe_command(context)}"
    )
