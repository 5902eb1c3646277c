"""`orchctl watch` and `submit --wait` read the daemon's SSE endpoint when it is up, resume
with Last-Event-ID, and fall back to the files when the API cannot be reached."""

from __future__ import annotations

import asyncio
import contextlib
import io
import time
from typing import Any

import pytest
import yaml

from reconciler import cli, cli_sse
from tests.conftest import Workspace, config, task, wait_for, wait_terminal

pytestmark = pytest.mark.slow


def _orchctl(*args: str) -> tuple[int, str]:
    out = io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(out):
        code = cli.main(list(args))
    return code, out.getvalue()


async def test_the_sse_client_yields_the_logs_frames_and_resumes_after_an_id(
    workspace: Workspace, serve: Any
) -> None:
    running = await serve()
    url = running.daemon.server.url
    workspace.submit("w1.task.yaml", task("w1", max_tokens=5))
    await wait_terminal(workspace, "w1")
    whole = await asyncio.to_thread(lambda: list(cli_sse.frames(url, "w1")))
    logged = workspace.frames("w1")
    assert [(f.id, f.event, f.data) for f in whole] == [(f.id, f.event, f.data) for f in logged]
    rest = await asyncio.to_thread(lambda: list(cli_sse.frames(url, "w1", after=3)))
    assert [f.id for f in rest] == [f.id for f in logged[3:]]


async def test_watch_streams_over_the_api_and_falls_back_to_the_files(
    workspace: Workspace, serve: Any
) -> None:
    await serve()
    workspace.submit("w2.task.yaml", task("w2", max_tokens=6))
    result = await wait_terminal(workspace, "w2")
    config = str(workspace.config_path)
    code, out = await asyncio.to_thread(_orchctl, "watch", "w2", "--config", config)
    assert code == 0 and result["text"] in out and "[end: length, 6 tokens]" in out
    code, out = await asyncio.to_thread(
        _orchctl, "watch", "w2", "--config", config, "--url", "notaurl"
    )
    assert code == 2 and "argument --url: 'notaurl' is not an http:// URL" in out, out
    dead = "http://127.0.0.1:9"  # nothing listens: the files are read instead
    code, out = await asyncio.to_thread(_orchctl, "watch", "w2", "--config", config, "--url", dead)
    assert code == 0 and result["text"] in out and out.count("[end: length") == 1
    with pytest.raises(cli_sse.Unavailable):
        await asyncio.to_thread(lambda: list(cli_sse.frames(dead, "w2")))


async def test_watch_and_submit_wait_give_up_at_their_timeout_over_the_api_too(
    workspace: Workspace, serve: Any
) -> None:
    cfg = config()
    cfg["pools"][0]["sim"] = {"tokens_per_s": 10, "load_s": 0.0}  # 60 tokens: about 6 s
    workspace.write_config(cfg)
    await serve()
    workspace.submit("slow.task.yaml", task("slow", max_tokens=60))
    await wait_for(lambda: (workspace.result("slow") or {}).get("status") == "running", 10)
    cfg_path = str(workspace.config_path)
    t0 = time.monotonic()
    code, out = await asyncio.to_thread(
        _orchctl, "watch", "slow", "--config", cfg_path, "--timeout", "1"
    )
    assert time.monotonic() - t0 < 3, out
    assert code == 1 and "no result after 1 s; task slow is" in out, out
    code, out = await asyncio.to_thread(
        _orchctl, "watch", "slow", "--config", cfg_path, "--timeout", "0.5"
    )
    assert code == 1 and "no result after 0.5 s" in out, out  # not rounded to "0 s"
    new = workspace.root / "other.task.yaml"
    new.write_text(yaml.safe_dump(task("other", max_tokens=60)))
    t0 = time.monotonic()
    code, out = await asyncio.to_thread(
        _orchctl, "submit", str(new), "--wait", "--timeout", "1", "--config", cfg_path
    )
    assert time.monotonic() - t0 < 3, out
    assert code == 1 and "no result after 1 s; task other is" in out, out
    await wait_terminal(workspace, "slow", 30)
    await wait_terminal(workspace, "other", 30)


async def test_a_task_whose_result_file_is_damaged_is_watched_and_cancelled_by_what_is_known(
    workspace: Workspace, serve: Any
) -> None:
    """A result file changed by hand: watch and cancel tell from the event log and the
    daemon whether the task has ended, rather than waiting for ever or asking for a cancel
    that can do nothing."""
    cfg = config()
    cfg["pools"][0]["sim"] = {"tokens_per_s": 20, "load_s": 0.0}
    workspace.write_config(cfg)
    await serve()
    cfg_path = str(workspace.config_path)
    cancels = workspace.spool.root / "cancel"
    # live: its result damaged while it runs; the daemon holds it, so the cancel applies
    workspace.submit("live.task.yaml", task("live", max_tokens=200))
    await wait_for(lambda: (workspace.result("live") or {}).get("status") == "running", 10)
    (workspace.root / "results" / "live.json").write_text("{not json")
    code, out = await asyncio.to_thread(_orchctl, "cancel", "live", "--config", cfg_path)
    assert code == 0 and "cancel requested for live" in out, out
    assert (await wait_terminal(workspace, "live"))["status"] == "canceled"
    # ended: the log's terminal frame says so
    workspace.submit("done.task.yaml", task("done", max_tokens=3))
    await wait_terminal(workspace, "done")
    result_file = workspace.root / "results" / "done.json"
    result_file.write_text("{not json")
    code, out = await asyncio.to_thread(_orchctl, "cancel", "done", "--config", cfg_path)
    assert code == 0 and "already ended (end in its event log" in out, out
    assert "unreadable (the file: Invalid JSON" in out
    # ended, and its log cut too: the daemon holds no such task
    log_file = workspace.root / "results" / "done.events.jsonl"
    log_file.write_text("".join(log_file.read_text().splitlines(True)[:-1]))
    code, out = await asyncio.to_thread(_orchctl, "cancel", "done", "--config", cfg_path)
    assert code == 1 and "neither queued nor running" in out, out
    assert "remove it and done.events.jsonl" in out
    t0 = time.monotonic()
    code, out = await asyncio.to_thread(_orchctl, "watch", "done", "--config", cfg_path)
    assert time.monotonic() - t0 < 5, out
    assert code == 1 and "ended without a terminal frame in its event log" in out, out
    assert "results/done.json is unreadable" in out
    assert not cancels.exists() or sorted(p.name for p in cancels.iterdir()) == []
