"""The daemon's HTTP face put together: one `api.Backend` over the daemon's stores and every
group of routes (tasks and SSE, metrics, the status page, the OpenAPI document, the OpenAI
routes, artifacts, catalog and pool control), started on `server.bind` (docs/http.md).

`Daemon` calls `start(daemon)` once, after adoption and recovery and before its first pass;
the routes run in the daemon's event loop and read and write the same files the loop does.
"""

from __future__ import annotations

import contextlib
from typing import TYPE_CHECKING

from reconciler import (
    admitting,
    api,
    api_artifacts,
    api_catalog,
    api_metrics,
    api_openai,
    api_page,
    api_pools,
    api_tasks,
    logs,
    openapi,
    reloading,
)
from state import ids

if TYPE_CHECKING:
    from reconciler import daemon

log = logs.get("daemon")


async def start(d: daemon.Daemon) -> api.Server:
    """The HTTP face of `d` on server.bind, listening."""
    state = d.config.state
    assert state is not None

    def queue_position(task_id: ids.TaskId) -> int | None:
        """The task's place in the queue now (0: next to start), None when it is not queued."""
        queue = d.dispatcher.queue
        return queue.position(task_id) if task_id in queue else None

    async def settled() -> None:
        """The pending task writes on disk; a commit the disk refused is not the HTTP
        client's error (the task is retried by recovery): answer as before, without waiting."""
        with contextlib.suppress(Exception):
            await d.books.settled()

    backend = api.Backend(
        spool=d.spool,
        results=d.results,
        sessions=d.sessions,
        hub=d.hub,
        config=d.config,
        status=d.status,
        live=lambda task_id: task_id in d.dispatcher.runs,
        wake=d.wake,
        metrics=d.metrics,
        queue_position=queue_position,
        settled=settled,
        stopping=lambda: d.dispatcher.stopping,
        blocked=lambda: d.catalog.blocked(d.config.state),
        session_tokens_left=lambda sid: admitting.session_tokens_left(d.dispatcher, sid),
        live_result=lambda task_id: (
            run.result if (run := d.dispatcher.runs.get(task_id)) is not None else None
        ),
    )
    routes = [
        api_tasks.add_routes,
        api_metrics.add_routes,
        api_page.add_routes,
        openapi.add_routes,
        api_openai.add_routes,
        api_artifacts.routes(d.artifacts),
        api_catalog.routes(d.catalog, d.pools.retry_model),
        api_pools.routes(
            d.pools,
            reloading.Reloader(
                d.config, d.pools, d.clock, d.wake, stopping=lambda: d.dispatcher.stopping
            ),
        ),
    ]
    server = await api.start(backend, bind=state.server.bind, base=d.config.base, routes=routes)
    auth = server.auth
    if auth.token is None:
        who = "loopback only, no token"
    elif auth.optional_on_loopback:
        who = "token required, but of callers on this machine asking for 127.0.0.1 or localhost"
    else:
        who = "token required of every caller"
    logs.emit(log, "http.listening", f"HTTP API on {server.url} ({who}).", url=server.url)
    for warning in auth.warnings:
        logs.emit(log, "http.auth_warning", warning + ".", level=30)
    return server
