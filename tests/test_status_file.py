"""`.orch/status.json` as users and tools read it: it matches its published schema while the
daemon runs and after it stops, and `orchctl status` renders it as plain text."""

from __future__ import annotations

import contextlib
import io
import json
from pathlib import Path
from typing import Any

import jsonschema
import pytest

from reconciler import cli
from tests.conftest import Workspace, task, wait_terminal

pytestmark = pytest.mark.slow

SCHEMA = json.loads((Path(__file__).parent.parent / "schemas" / "status.schema.json").read_text())


def _orchctl_status(ws: Workspace) -> tuple[int, str]:
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        code = cli.main(["status", "--config", str(ws.config_path)])
    return code, out.getvalue()


async def test_status_json_matches_its_schema_while_running_and_after_stop(
    workspace: Workspace, serve: Any
) -> None:
    running = await serve()
    workspace.submit("a.task.yaml", task("a"))
    await wait_terminal(workspace, "a")
    live = workspace.status()
    jsonschema.validate(live, SCHEMA)
    assert live["daemon"]["state"] == "running" and live["daemon"]["stopped_at"] is None
    assert live["daemon"]["version"] == "0.1.0"  # from the package metadata
    code, text = _orchctl_status(workspace)
    assert code == 0 and "p1" in text and "Ready" in text
    assert "None" not in text and "{'" not in text
    await running.stop()
    stopped = workspace.status()
    jsonschema.validate(stopped, SCHEMA)
    assert stopped["daemon"]["state"] == "stopped" and stopped["daemon"]["stopped_at"]
    assert [p["state"] for p in stopped["pools"]] == ["Stopped"]
