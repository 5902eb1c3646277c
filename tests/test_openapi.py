"""schemas/openapi.yaml describes every route the daemon serves (no more, no fewer), is what
the code builds, and a live daemon answers as it says: schemathesis finds no server error and
no answer outside the schema, over a bounded number of generated requests."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import yaml

import schemas
from reconciler import openapi
from tests.conftest import Workspace

pytestmark = pytest.mark.slow


def test_the_committed_document_is_what_the_code_builds() -> None:
    committed = (schemas.DIR / openapi.NAME).read_text(encoding="utf-8")
    assert committed == openapi.render(), "run `make schemas` and commit the result"
    assert yaml.safe_load(committed)["openapi"].startswith("3.")


async def test_every_route_is_described_and_every_description_is_a_route(
    workspace: Workspace, serve: Any
) -> None:
    running = await serve()
    server = running.daemon.server
    assert server is not None
    served = openapi.routes_of(server.runner.app)
    assert served - openapi.described() == set(), "routes missing from openapi.PATHS"
    assert openapi.described() - served == set(), "described routes the app does not serve"


def test_schemathesis_finds_no_server_error_and_no_answer_outside_the_schema(
    workspace: Workspace,
) -> None:
    tool = shutil.which("schemathesis") or str(Path(sys.executable).parent / "schemathesis")
    if not Path(tool).exists():
        pytest.skip("schemathesis is not installed (make test installs the dev extras)")
    env = {k: v for k, v in os.environ.items() if k not in ("ORCH_FAILPOINTS", "AUTH_TOKEN")}
    argv = [sys.executable, "-m", "reconciler.cli", "serve", "--config", str(workspace.config_path)]
    with open(workspace.root / "serve.out", "wb") as out:
        daemon = subprocess.Popen(argv, env=env, stdout=out, stderr=subprocess.STDOUT)
    try:
        url = _wait_url(workspace)
        args = [
            tool,
            "run",
            str(schemas.DIR / openapi.NAME),
            "--url",
            url,
            "--max-examples",
            "8",
            "--checks",
            "not_a_server_error,response_schema_conformance,status_code_conformance,content_type_conformance",
            "--phases",
            "examples,coverage,fuzzing",
            "--exclude-path",
            "/v1/status/events",  # never ends: a live feed
            "--exclude-path-regex",
            "^/v1/pools/.*/reload$",  # edits orch.yaml
            "--request-timeout",
            "20",
            "--seed",
            "1",
        ]  # fmt: skip
        ran = subprocess.run(
            args,
            capture_output=True,
            text=True,
            timeout=600,
            env=env,
            check=False,
        )
        assert ran.returncode == 0, ran.stdout[-6000:] + ran.stderr[-2000:]
        assert daemon.poll() is None, "the daemon died under schemathesis"
    finally:
        daemon.send_signal(signal.SIGTERM)
        daemon.wait(timeout=30)


def _wait_url(ws: Workspace) -> str:
    end = time.monotonic() + 30
    while time.monotonic() < end:
        try:
            url = json.loads((ws.root / ".orch" / "status.json").read_text())["daemon"]["url"]
            if url:
                return str(url)
        except (OSError, ValueError, KeyError):
            pass
        time.sleep(0.1)
    raise AssertionError("the daemon never wrote its URL")


async def test_answers_a_route_gives_are_in_the_document(workspace: Workspace, serve: Any) -> None:
    """Answers schemathesis rarely provokes, each checked against the document: a resume
    past the end (204), an unchanged artifact (304), OpenMetrics on request, another method
    (405), a drain without a body; and the query parameters the stream routes take."""
    import aiohttp

    from tests.conftest import task, wait_terminal

    doc = openapi.document()
    running = await serve()
    base = str(running.daemon.server.url).rstrip("/")

    def documented(path: str, method: str, status: int, content_type: str | None) -> None:
        answers = doc["paths"][path][method]["responses"]
        assert str(status) in answers, (path, method, status)
        if content_type and "content" in answers[str(status)]:
            assert content_type.split(";")[0] in answers[str(status)]["content"], content_type

    workspace.submit("d1.task.yaml", task("d1", max_tokens=2))
    await wait_terminal(workspace, "d1")
    async with aiohttp.ClientSession() as s:
        async with s.get(f"{base}/v1/tasks/d1/events?last_event_id=999") as r:
            documented("/v1/tasks/{task_id}/events", "get", r.status, None)
            assert r.status == 204
        async with s.post(f"{base}/v1/artifacts", json={"kind": "other", "content": "x"}) as r:
            where = r.headers["Location"]
        async with s.get(f"{base}{where}") as r:
            etag = r.headers["ETag"]
        async with s.get(f"{base}{where}", headers={"If-None-Match": etag}) as r:
            documented("/v1/artifacts/{artifact_id}", "get", r.status, None)
            assert r.status == 304
        accept = {"Accept": "application/openmetrics-text; version=1.0.0"}
        async with s.get(f"{base}/metrics", headers=accept) as r:
            documented("/metrics", "get", r.status, r.headers["Content-Type"])
        async with s.put(f"{base}/v1/tasks") as r:
            documented("/v1/tasks", "post", r.status, r.headers["Content-Type"])
            assert r.status == 405
        async with s.get(f"{base}/v1/capabilities?bogus=1") as r:  # a route with no query
            documented("/v1/capabilities", "get", r.status, r.headers["Content-Type"])
            assert r.status == 400
        async with s.get(f"{base}/v1/models", headers={"X-Session-Id": "\u00e9"}) as r:
            documented("/v1/models", "get", r.status, None)
        async with s.get(f"{base}/v1/status?" + "x" * 9000) as r:  # a request line too long
            documented("/v1/status", "get", r.status, None)
            assert r.status == 414
        async with s.post(f"{base}/v1/pools/p1/drain") as r:  # no body
            assert r.status == 202
            assert (
                doc["paths"]["/v1/pools/{pool_id}/drain"]["post"]["requestBody"]["required"]
                is False
            )
    stream = doc["paths"]["/v1/tasks/{task_id}/events"]["get"]["parameters"]
    assert {"last_event_id", "cancel_on_disconnect"} <= {p["name"] for p in stream}
