"""Steps that talk to the daemon's HTTP face, at the URL it wrote into .orch/status.json
(`daemon.url`): artifacts, the catalog, drain and reload. Plain urllib, as a script would."""

from __future__ import annotations

import difflib
import hashlib
import json
import urllib.error
import urllib.request
from typing import Any

from behave import given, step, then, when
from orch_support import config_path, pool_status, status, wait_for


def _base(context: Any) -> str:
    def url() -> str | None:
        data = status(context)
        return data["daemon"].get("url") if data else None

    found: str = wait_for(context, url, "the daemon's URL in .orch/status.json")
    return found


def _call(context: Any, method: str, path: str, body: Any = None) -> None:
    """Send one request; keep the status, headers, raw body and parsed JSON on `context`."""
    data = None if body is None else json.dumps(body).encode()
    request = urllib.request.Request(
        _base(context) + path,
        data=data,
        method=method,
        headers={"Content-Type": "application/json"} if data is not None else {},
    )
    try:
        with urllib.request.urlopen(request, timeout=60) as response:
            context.http_status, raw = response.status, response.read()
    except urllib.error.HTTPError as error:
        context.http_status, raw = error.code, error.read()
    context.http_raw = raw
    context.http_json = json.loads(raw) if raw else None
    context.http_said = f"{method} {path} → {context.http_status}: {raw[:600]!r}"


# -- requests -------------------------------------------------------------------------------


@when('I POST to "{path}" the JSON')
def post_json(context: Any, path: str) -> None:
    _call(context, "POST", path, json.loads(context.text))


@when('I POST to "{path}"')
def post_empty(context: Any, path: str) -> None:
    _call(context, "POST", path, {})


@when('I GET "{path}"')
def get(context: Any, path: str) -> None:
    _call(context, "GET", path)


@when("I upload the artifact")
def upload(context: Any) -> None:
    context.document = json.loads(context.text)
    _call(context, "POST", "/v1/artifacts", context.document)
    context.uploads = [*getattr(context, "uploads", []), context.http_json]


@when("I upload the same artifact again")
def upload_again(context: Any) -> None:
    _call(context, "POST", "/v1/artifacts", context.document)
    context.uploads.append(context.http_json)


@when("I upload a diff whose parent is that artifact")
def upload_child(context: Any) -> None:
    parent = context.uploads[-1]["id"]
    _call(context, "POST", "/v1/artifacts", {"kind": "diff", "content": "+x", "parent": parent})


@when("I download it from its url")
def download(context: Any) -> None:
    ref = context.uploads[-1]
    url = ref["url"]
    base = _base(context)
    assert url.startswith(base), f"url {url} is not on {base}"
    _call(context, "GET", url.removeprefix(base))


@when('I POST a task "{task_id}" for model "{model_id}"')
def post_task(context: Any, task_id: str, model_id: str) -> None:
    body = {"task_id": task_id, "model": model_id, "prompt": "hello", "max_tokens": 4}
    _call(context, "POST", "/v1/tasks", body)


# -- answers ----------------------------------------------------------------------------------


@then("the answer is {code:d}")
def answer_is(context: Any, code: int) -> None:
    assert context.http_status == code, context.http_said


@then("the answer is {code:d} with {error:Code}")
def answer_is_error(context: Any, code: int, error: str) -> None:
    answer_is(context, code)
    body = context.http_json
    assert body["code"] == error, context.http_said
    assert body["message"] and body["hint"] and "retriable" in body, context.http_said


@then('the answer says "{text}"')
def answer_says(context: Any, text: str) -> None:
    assert text in context.http_raw.decode(), context.http_said


@then('the answer\'s "{field}" is "{value}"')
def answer_field(context: Any, field: str, value: str) -> None:
    assert str(context.http_json.get(field)) == value, context.http_said


@then("both uploads got the same id")
def same_id(context: Any) -> None:
    first, second = context.uploads[-2:]
    assert first["id"] == second["id"] and first["created_at"] == second["created_at"], (
        first,
        second,
    )


@then("the body is the document I uploaded, and its sha256 is the id")
def body_is_document(context: Any) -> None:
    assert context.http_status == 200, context.http_said
    expected = {"tags": [], "parent": None, "metadata": {}} | context.document
    assert json.loads(context.http_raw) == expected, context.http_said
    digest = "sha256:" + hashlib.sha256(context.http_raw).hexdigest()
    assert digest == context.uploads[-1]["id"], (digest, context.uploads[-1])


@then("{n:d} artifact file is stored")
@then("{n:d} artifact files are stored")
def files_stored(context: Any, n: int) -> None:
    found = sorted((context.root / "artifacts").glob("*.json"))
    assert len(found) == n, [p.name for p in found]


@then('task "{task_id}" has a trace artifact ending with an {event} frame')
def has_trace(context: Any, task_id: str, event: str) -> None:
    def listed() -> list[dict[str, Any]]:
        _call(context, "GET", f"/v1/artifacts?tag=task:{task_id}&kind=trace")
        found: list[dict[str, Any]] = context.http_json["artifacts"]
        return found

    [ref] = wait_for(context, listed, f"the trace artifact of task {task_id!r}")
    assert "sse" in ref["tags"], ref
    _call(context, "GET", f"/v1/artifacts/{ref['id']}")
    trace = context.http_json
    assert trace["content"]["frames"][-1]["event"] == event, context.http_said
    context.trace = trace


@then('the trace says pool "{pool_id}" and engine "{engine}"')
def trace_meta(context: Any, pool_id: str, engine: str) -> None:
    meta = context.trace["metadata"]
    assert meta["pool"] == pool_id and meta["engine"] == engine, meta


# -- files and the catalog ------------------------------------------------------------------


@given('a model file "{name}" holding "{text}"')
@when('the model file "{name}" now holds "{text}"')
def model_file(context: Any, name: str, text: str) -> None:
    (context.root / name).write_text(text + "\n")


@then('the catalog lists model "{model_id}" with its file of {size:d} bytes')
def catalog_lists(context: Any, model_id: str, size: int) -> None:
    _call(context, "GET", "/v1/catalog/models")
    rows = {m["id"]: m for m in context.http_json["models"]}
    row = rows[model_id]
    assert row["exists"] and row["size_bytes"] == size, row
    assert row["local_path"] == str(context.root / row["ref"].removeprefix("file:")), row


@when('I verify model "{model_id}"')
def verify(context: Any, model_id: str) -> None:
    _call(context, "POST", f"/v1/catalog/models/{model_id}/verify")
    assert context.http_status == 200, context.http_said


@then('the verification is "{outcome}"')
def verification_is(context: Any, outcome: str) -> None:
    assert context.http_json["status"] == outcome, context.http_said


@given("I keep a copy of orch.yaml")
@when("I keep a copy of orch.yaml")
def keep_copy(context: Any) -> None:
    context.kept_config = config_path(context).read_bytes()


@then("orch.yaml is byte for byte the copy")
def same_bytes(context: Any) -> None:
    assert config_path(context).read_bytes() == context.kept_config


@then('orch.yaml differs from the copy only in the line with "{text}"')
def one_line(context: Any, text: str) -> None:
    before = context.kept_config.decode().splitlines()
    after = config_path(context).read_text().splitlines()
    changed = [
        line
        for line in difflib.unified_diff(before, after, lineterm="", n=0)
        if line[:1] in "+-" and not line.startswith(("+++", "---"))
    ]
    assert len(changed) == 2 and text in changed[1], changed
    kept = [line for line in before if line.lstrip().startswith("#")]
    assert all(line in after for line in kept), "a comment was lost"


@step('pool "{pool_id}" is drained')
def pool_drained(context: Any, pool_id: str) -> None:
    def drained() -> bool:
        pool = pool_status(context, pool_id)
        return bool(pool and pool["state"] == "Stopped" and not pool["replicas"])

    wait_for(
        context,
        drained,
        lambda: f"pool {pool_id!r} drained (last seen: {pool_status(context, pool_id)})",
    )
