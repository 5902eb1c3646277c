"""Task files: what a user or agent drops into spool/incoming/ (YAML or JSON).

A task is a completion of `prompt`, or a chat turn over `messages` (with the chat options of
`state.chats`), which the engine renders with the model's own chat template.
"""

from __future__ import annotations

import hashlib
import re
import unicodedata
from collections.abc import Iterable
from typing import Annotated, Any, Literal

from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    field_validator,
    model_validator,
)

from state import chats, ids, parsing
from state.parsing import Hinted, LoadError

Id = Annotated[str, Field(pattern=ids.ID_PATTERN), AfterValidator(ids.check_safe_id)]


# strict: a number given as text ("4") or as a boolean is refused, as a YAML or JSON reader
# would expect, not converted (the chat options of state.chats follow OpenAI's own types)
_STRICT = ConfigDict(extra="forbid", strict=True)


class Sampling(BaseModel):
    model_config = _STRICT

    temperature: float = Field(0.0, ge=0, le=5)
    top_p: float = Field(1.0, gt=0, le=1)
    top_k: int | None = Field(None, ge=0, le=2**31 - 1)  # the engine reads a 32-bit int


class Placement(BaseModel):
    """Placement overrides: pin to one pool (never falls back), prefer, or avoid pools."""

    model_config = _STRICT

    mode: Literal["auto", "pin", "prefer"] = "auto"
    pin_pool: Id | None = None
    prefer_pools: list[Id] = Field(default_factory=list)
    avoid_pools: list[Id] = Field(default_factory=list)
    allow_fallback: bool = True

    def leaves(self, pool_ids: Iterable[str]) -> list[str]:
        """Of `pool_ids`, those the prefer and avoid lists leave the task when it may not
        fall back (the only ones it may ever run on then): not avoided, and preferred when
        it prefers any."""
        kept = [p for p in pool_ids if p not in self.avoid_pools]
        return [p for p in kept if p in self.prefer_pools] if self.prefer_pools else kept

    @model_validator(mode="after")
    def _pin_names_pool(self) -> Placement:
        if self.pin_pool and "mode" not in self.model_fields_set:
            self.mode = "pin"  # `placement: {pin_pool: p}` says what it means
        if self.mode == "pin" and not self.pin_pool:
            raise Hinted(
                "placement mode 'pin' needs 'pin_pool: <pool id>'",
                "add pin_pool: <a pool id `orchctl status` lists>, or use mode: prefer",
            )
        if self.mode != "pin" and self.pin_pool:  # it would be ignored without a word
            raise Hinted(
                f"placement pin_pool is used only with mode: pin, not mode: {self.mode}",
                "set mode: pin (or leave mode out) to pin the task, or remove pin_pool",
            )
        if self.mode == "prefer" and not (self.prefer_pools or self.avoid_pools):
            raise Hinted(
                "placement mode 'prefer' needs 'prefer_pools: [<pool id>, ...]' (or avoid_pools)",
                "add prefer_pools: [<a pool id `orchctl status` lists>], or use mode: auto",
            )
        return self


class TaskFile(BaseModel):
    model_config = _STRICT

    task_id: Id | None = Field(None, description="default: the file name's stem")
    session_id: Id | None = None
    model: Id | None = Field(None, description="a model id from orch.yaml")
    pool: Id | None = Field(None, description="or a pool id (the task runs on that pool)")
    prompt: str | None = Field(
        None, min_length=1, max_length=512 * 1024, description="text to complete (or: messages)"
    )
    messages: list[chats.ChatMessage] | None = Field(
        None,
        min_length=1,
        max_length=4096,
        description="a chat conversation, rendered by the model's chat template (or: prompt)",
    )
    tools: list[chats.Tool] | None = Field(
        None, min_length=1, max_length=128, description="chat only: functions the model may call"
    )
    tool_choice: chats.ToolChoice | None = Field(None, description="chat only; default auto")
    parallel_tool_calls: bool | None = Field(None, description="chat only")
    response_format: chats.ResponseFormat | None = Field(
        None, description="chat only: text, json_object or json_schema"
    )
    stop: list[Annotated[str, Field(min_length=1, max_length=256)]] = Field(
        default_factory=list, max_length=16, description="generation ends before any of these"
    )
    max_tokens: int = Field(ge=1, le=1_000_000)
    seed: int | None = Field(None, ge=0, le=2**31 - 1)
    priority: Literal["interactive", "batch"] = "batch"
    deadline_ms: int | None = Field(None, ge=1, description="relative to acceptance")
    sampling: Sampling = Field(default_factory=Sampling)
    placement: Placement = Field(default_factory=Placement)
    correlation_id: str | None = Field(
        None,
        max_length=128,
        pattern=r"^[A-Za-z0-9._:-]+$",
        description="set by the HTTP face from X-Correlation-Id; log lines of the task carry it",
    )
    labels: dict[Annotated[str, Field(max_length=128)], Annotated[str, Field(max_length=1024)]] = (
        Field(default_factory=dict, max_length=64)
    )

    @field_validator("labels")
    @classmethod
    def _named_labels(cls, labels: dict[str, str]) -> dict[str, str]:
        if "" in labels:
            raise Hinted("a label's name is empty", "name every label, e.g. team: backend")
        return labels

    @model_validator(mode="after")
    def _model_or_pool(self) -> TaskFile:
        if not self.model and not self.pool:
            raise Hinted(
                "a task names 'model: <model id>' or 'pool: <pool id>'",
                "add model: <one of the models in orch.yaml> (`orchctl status` lists them)",
            )
        return self

    @model_validator(mode="after")
    def _prompt_or_messages(self) -> TaskFile:
        if self.prompt is not None and self.messages is not None:
            raise Hinted(
                "a task gives either 'prompt: <text>' or 'messages: [...]', not both",
                "keep one of them: prompt for plain text, messages for a chat",
            )
        if self.prompt is None and self.messages is None:
            raise Hinted(
                "a task gives 'prompt: <text>' or 'messages: [...]'; this has neither",
                "add prompt: <text>, or messages: [{role: user, content: <text>}]",
            )
        if self.messages is None:
            chat_only = [name for name in _CHAT_OPTIONS if getattr(self, name) is not None]
            if chat_only:
                raise Hinted(
                    f"'{chat_only[0]}' needs 'messages' (it is a chat option)",
                    f"write the prompt as messages: [{{role: user, content: ...}}], or remove "
                    f"'{chat_only[0]}'",
                )
        elif chats.size_bytes(self.messages, self.tools) > chats.MAX_CHAT_BYTES:
            raise Hinted(
                "messages and tools hold over 512 KiB of text",
                "shorten the conversation (drop or summarize early turns) or the tools",
            )
        return self

    @model_validator(mode="after")
    def _tools_and_calls_hold_together(self) -> TaskFile:
        """Tools of one name twice (the engine could not tell which is called), and a tool
        message answering no call, are refused here, as OpenAI refuses them, not failed by
        the engine once the task ran."""
        seen: set[str] = set()
        for tool in self.tools or ():
            if tool.function.name in seen:
                raise Hinted(
                    f"tools: two tools are named {tool.function.name!r}",
                    "give each tool a name of its own",
                )
            seen.add(tool.function.name)
        problem = chats.conversation_problem(self.messages or [])
        if problem is not None:
            raise Hinted(*problem)
        return self

    @model_validator(mode="after")
    def _tool_choice_names_a_tool(self) -> TaskFile:
        """A choice the engine could not honour (no tool to call, or one not given) is
        refused here, as the OpenAI route refuses it, not ignored or failed at run time."""
        named = sorted(t.function.name for t in self.tools or ())
        if self.tool_choice == "required" and not named:
            raise Hinted(
                "tool_choice 'required' needs at least one tool in tools",
                "add tools: [...], or use tool_choice: auto",
            )
        if isinstance(self.tool_choice, chats.NamedToolChoice):
            wanted = self.tool_choice.function.name
            if wanted not in named:
                raise Hinted(
                    f"tool_choice names the tool {parsing.shortened(wanted, 60)!r}, which is "
                    f"not in tools (given: {parsing.some_of(named)})",
                    "name one of the tools, or add that tool to tools",
                )
        return self

    @property
    def chat(self) -> bool:
        return self.messages is not None

    def chat_json(self) -> dict[str, Any]:
        """The chat part as the plain JSON an engine sends on (none: a prompt task)."""
        sent = self.model_dump(mode="json", include={"messages", *_CHAT_OPTIONS}, exclude_none=True)
        for message in sent.get("messages", ()):
            for call in message.get("tool_calls", ()):
                function = call["function"]
                function["arguments"] = chats.engine_arguments(function["arguments"])
        return sent


_CHAT_OPTIONS = ("tools", "tool_choice", "parallel_tool_calls", "response_format")

# labels: {max_tokens: context}: max_tokens is only a ceiling (the OpenAI routes set it when
# the client gave none), so a context that fills first ends the task as finish_reason length,
# not as a failure to fit
UP_TO_CONTEXT = ("max_tokens", "context")


def up_to_context(task: TaskFile) -> bool:
    """Whether `task`'s max_tokens is only a ceiling, the context's end its real limit."""
    return task.labels.get(UP_TO_CONTEXT[0]) == UP_TO_CONTEXT[1]


# labels the OpenAI-compatible routes set on the tasks they make, never a client of
# POST /v1/tasks: `api` (the task answers one HTTP connection: a daemon that restarts after
# a crash cancels it, as its client is gone) and `session_from` (its session comes from
# the `user` field, so it starts over instead of being refused at its limits)
API_LABEL = "api"
SESSION_FROM_LABEL, SESSION_FROM_USER = "session_from", "openai.user"
RESERVED_LABELS = (API_LABEL, SESSION_FROM_LABEL)


def connection_bound(task: TaskFile) -> bool:
    """Whether `task` answers one HTTP connection of the OpenAI-compatible routes."""
    return task.labels.get(API_LABEL, "").startswith("openai.")


def default_seed(task_id: str) -> int:
    """A seed derived from the task id, so a retried task produces the same text."""
    return int.from_bytes(hashlib.sha256(task_id.encode()).digest()[:4], "big") & 0x7FFFFFFF


TASK_SUFFIXES = (".task.yaml", ".task.yml", ".task.json")


def stem(file_name: str) -> str:
    """The task id a file name implies: `fix-bug.task.yaml` → `fix-bug`."""
    for suffix in TASK_SUFFIXES:
        if file_name.endswith(suffix):
            return file_name[: -len(suffix)]
    return file_name.rsplit(".", 1)[0]


def implied_id_problem(shown: str, file_name: str) -> LoadError | None:
    """A task file without `task_id:` takes its name's stem as its id; when that stem is not a
    safe id, the error the daemon, `orchctl validate` and `orchctl submit` all give, with an id
    made of the name's letters (accents dropped) to use instead."""
    name_stem = stem(file_name)
    if ids.is_safe_id(name_stem):
        return None
    plain = unicodedata.normalize("NFKD", name_stem).encode("ascii", "ignore").decode()
    suggestion = re.sub(r"[^A-Za-z0-9._-]+", "-", plain).replace("..", ".").strip("-._")[:100]
    suggestion = suggestion or "my-task"
    return LoadError(
        shown,
        None,
        None,
        "task_id",
        f"the file name implies task id {ids.quoted(name_stem)}, which is not a task id "
        + (
            f"(it is {len(name_stem)} characters; at most 128)"
            if len(name_stem) > 128 and ids.is_safe_id(name_stem[:128])
            else "(letters, digits, '.', '_' and '-' only)"
        ),
        f"rename the file to {suggestion}{file_name[len(name_stem) :]}, or add "
        f"`task_id: {suggestion}`",
    )
