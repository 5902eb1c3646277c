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
            "not_a_server_error,response_schema_conformance",
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
