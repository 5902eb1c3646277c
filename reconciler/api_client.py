"""A small client of the daemon's HTTP API for the suites that drive a running daemon:
`orchctl determinism` (`cli_determinism`) and `orchctl smoke` (`smoke_checks`).

Standard library only (http.client), one connection per request, so lanes running in
threads share nothing. `call` answers every HTTP status as an `Answer` (a 429 is a result the
smoke looks for, not an error); only a daemon that cannot be reached raises `Unreachable`.
Task events come from `cli_sse.frames`, the reader `orchctl watch` uses. The token is read
from the environment variable the caller names, never from the command line.
"""

from __future__ import annotations

import http.client
import json
import time
import urllib.parse
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import yaml

from reconciler import cli_sse
from state import events

TIMEOUT_S = 60.0


class Unreachable(Exception):
    """No HTTP answer from the daemon (refused, reset, timed out, not an http:// URL)."""


@dataclass(frozen=True)
class Answer:
    status: int
    headers: dict[str, str]
    raw: bytes
    took_ms: float

    @property
    def json(self) -> Any:
        try:
            return json.loads(self.raw) if self.raw else None
        except ValueError:
            return None

    @property
    def code(self) -> str | None:
        """The error envelope's code, when the body is one."""
        body = self.json
        return body.get("code") if isinstance(body, dict) else None

    def said(self) -> str:
        """The status and the error's code and message (or the start of the body), for a
        report line."""
        body = self.json
        if isinstance(body, dict) and isinstance(body.get("message"), str):
            return f"{self.status} {body.get('code') or 'error'}: {body['message']}"
        text = self.raw[:300].decode("utf-8", errors="replace").replace("\n", " ")
        return f"{self.status} {text}"


@dataclass
class Client:
    base_url: str
    token: str | None = None
    timeout_s: float = TIMEOUT_S
    _split: urllib.parse.SplitResult = field(init=False, repr=False)

    def __post_init__(self) -> None:
        self.base_url = self.base_url.rstrip("/")
        self._split = urllib.parse.urlsplit(self.base_url)
        if self._split.scheme != "http" or not self._split.hostname:
            raise Unreachable(f"{self.base_url} is not an http:// URL")

    @property
    def host(self) -> str:
        return self._split.hostname or ""

    def call(
        self, method: str, path: str, body: Any = None, *, timeout_s: float | None = None
    ) -> Answer:
        data = None if body is None else json.dumps(body).encode()
        headers = {"Accept": "application/json"}
        if data is not None:
            headers["Content-Type"] = "application/json"
        if self.token:
            headers["Authorization"] = f"Bearer {self.token}"
        conn = http.client.HTTPConnection(
            self.host, self._split.port or 80, timeout=timeout_s or self.timeout_s
        )
        began = time.monotonic()
        try:
            conn.request(method, self._split.path + path, body=data, headers=headers)
            response = conn.getresponse()
            raw = response.read()
        except (OSError, http.client.HTTPException) as exc:
            raise Unreachable(f"{method} {self.base_url}{path}: {exc}") from None
        finally:
            conn.close()
        return Answer(
            status=response.status,
            headers={k.lower(): v for k, v in response.getheaders()},
            raw=raw,
            took_ms=(time.monotonic() - began) * 1000,
        )

    def get(self, path: str) -> Answer:
        return self.call("GET", path)

    def post(self, path: str, body: Any = None, *, timeout_s: float | None = None) -> Answer:
        return self.call("POST", path, {} if body is None else body, timeout_s=timeout_s)

    def frames(self, task_id: str) -> Iterator[events.EventFrame]:
        """The task's frames from the SSE endpoint, through the terminal one."""
        try:
            yield from cli_sse.frames(self.base_url, task_id, token=self.token)
        except cli_sse.Unavailable as exc:
            raise Unreachable(str(exc)) from None

    def offered(self) -> set[tuple[str, str]] | None:
        """The (METHOD, path template) pairs the daemon's /openapi.yaml lists; None when it
        serves no OpenAPI document (an older daemon: the caller tries the routes instead)."""
        answer = self.get("/openapi.yaml")
        if answer.status != 200:
            return None
        try:
            doc = yaml.safe_load(answer.raw)
        except yaml.YAMLError:
            return None
        paths = doc.get("paths") if isinstance(doc, dict) else None
        if not isinstance(paths, dict):
            return None
        return {
            (method.upper(), str(path))
            for path, ops in paths.items()
            if isinstance(ops, dict)
            for method in ops
        }
