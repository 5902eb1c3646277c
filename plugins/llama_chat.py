"""llama-server's chat endpoint (`POST /v1/chat/completions`): the request body, and the fold
of its streamed chunks into `Token`s and one `Done`.

`plugins.llama_server.Client.generate` uses this for a request with `chat` (a task with
`messages`), so the model's own chat template renders the conversation and llama-server's
tool-call parser reads the answer. Shapes follow llama-server's OpenAI-compatible answers:

- every chunk is `{"choices": [{"index": 0, "delta": {...}, "finish_reason": null}], ...}`;
  `delta` holds `content`, `reasoning_content` (a thinking model's thoughts) or `tool_calls`
  (OpenAI's deltas: `{index, id?, type?, function: {name?, arguments?}}`);
- the chunk with a `finish_reason` (`stop`, `length`, `tool_calls`) carries `timings`;
- with `stream_options.include_usage`, a last chunk with no choices carries `usage`;
- then `data: [DONE]`.

The sim engine's chat endpoint (`plugins.sim_chat`) answers in the same shapes.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from plugins import interfaces

PATH = "/v1/chat/completions"


def chat_body(request: interfaces.GenerateRequest, *, stream: bool) -> dict[str, Any]:
    """The JSON body for `request` (which has `chat`): the conversation and chat options as
    given, the sampling settings, and `cache_prompt` (`reuse_cache`) so the next turn of a
    conversation reuses the slot's KV cache."""
    assert request.chat is not None
    body: dict[str, Any] = dict(request.chat)
    body.update(
        {
            "max_tokens": request.max_tokens,
            "seed": request.seed,
            "temperature": request.temperature,
            "top_p": request.top_p,
            "stream": stream,
            "cache_prompt": request.reuse_cache,
        }
    )
    if stream:
        body["stream_options"] = {"include_usage": True}
    if request.top_k is not None:
        body["top_k"] = request.top_k
    if request.stop:
        body["stop"] = list(request.stop)
    return body


def _finish(reason: Any) -> interfaces.FinishReason:
    if reason == "length":
        return "length"
    if reason == "tool_calls":
        return "tool_calls"
    return "stop"


class Fold:
    """The state of one streamed chat answer: feed it each chunk, then `end` at `[DONE]`."""

    def __init__(self) -> None:
        self.index = 0
        self.finish: interfaces.FinishReason | None = None
        self.usage: Mapping[str, Any] = {}
        self.timings: Mapping[str, Any] = {}

    def feed(self, frame: Mapping[str, Any]) -> list[interfaces.Token | interfaces.Done]:
        items: list[interfaces.Token | interfaces.Done] = []
        for choice in frame.get("choices") or ():
            if not isinstance(choice, Mapping):
                continue
            delta = choice.get("delta") or {}
            text = delta.get("content") or ""
            thought = delta.get("reasoning_content") or ""
            calls = delta.get("tool_calls") or ()
            if text or thought or calls:
                items.append(
                    interfaces.Token(
                        str(text),
                        self.index,
                        tool_calls=tuple(c for c in calls if isinstance(c, Mapping)),
                        reasoning=str(thought),
                    )
                )
                self.index += 1
            if choice.get("finish_reason"):
                self.finish = _finish(choice["finish_reason"])
        if isinstance(frame.get("usage"), Mapping):
            self.usage = frame["usage"]
        if isinstance(frame.get("timings"), Mapping):
            self.timings = frame["timings"]
        return items

    def end(self) -> interfaces.Done | None:
        """The Done of the answer, or None when no chunk gave a finish_reason."""
        if self.finish is None:
            return None
        timings = {
            k: float(v)
            for k, v in self.timings.items()
            if isinstance(v, int | float) and not isinstance(v, bool)
        }
        tokens = self.usage.get("completion_tokens", timings.get("predicted_n", self.index))
        prompt = self.usage.get("prompt_tokens")
        if prompt is None and "prompt_n" in timings:
            prompt = timings["prompt_n"] + timings.get("cache_n", 0)
        return interfaces.Done(
            tokens_out=int(tokens),
            finish_reason=self.finish,
            timings=timings,
            prompt_tokens=None if prompt is None else int(prompt),
        )
