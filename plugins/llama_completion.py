"""llama-server's /completion endpoint: the request body, and one streamed answer's frames
folded into Tokens, then one Done (`plugins.llama_server.Client` speaks it for a request
without `chat`; `plugins.llama_chat` is the chat endpoint's counterpart)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from plugins import interfaces


def body(request: interfaces.GenerateRequest, *, stream: bool) -> dict[str, Any]:
    body: dict[str, Any] = {
        "prompt": request.prompt,
        "n_predict": request.max_tokens,
        "seed": request.seed,
        "temperature": request.temperature,
        "top_p": request.top_p,
        "stream": stream,
        "cache_prompt": request.reuse_cache,
    }
    if request.top_k is not None:
        body["top_k"] = request.top_k
    if request.stop:
        body["stop"] = list(request.stop)
    return body


class Fold:
    """The state of one streamed /completion answer: Tokens, then Done at the `stop` frame."""

    def __init__(self) -> None:
        self.index = 0

    def feed(self, frame: Mapping[str, Any]) -> list[interfaces.Token | interfaces.Done]:
        items: list[interfaces.Token | interfaces.Done] = []
        if content := frame.get("content"):
            items.append(interfaces.Token(str(content), self.index))
            self.index += 1
        if frame.get("stop"):
            items.append(done_from(frame))
        return items

    def end(self) -> interfaces.Done | None:
        return None  # the `stop` frame is the only end


def done_from(frame: Mapping[str, Any]) -> interfaces.Done:
    """The `Done` of a final frame (stream) or a whole non-streamed answer."""
    limit = frame.get("stop_type") == "limit" or bool(frame.get("stopped_limit"))
    timings = frame.get("timings") or {}
    prompt = frame.get("tokens_evaluated")
    return interfaces.Done(
        tokens_out=int(frame.get("tokens_predicted", 0)),
        finish_reason="length" if limit else "stop",
        timings={
            k: float(v)
            for k, v in timings.items()
            if isinstance(v, int | float) and not isinstance(v, bool)
        },
        prompt_tokens=prompt if isinstance(prompt, int) else None,
        truncated=frame.get("truncated") is True,
    )
