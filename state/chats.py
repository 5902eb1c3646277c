"""Chat messages and the chat options of a task file (`messages`, `tools`, `tool_choice`,
`response_format`): the shapes of OpenAI's chat API, which llama-server's chat endpoint takes.

`state.tasks.TaskFile` holds them; the HTTP face's OpenAI routes fill them from a request, and
`reconciler.streaming` hands them to the engine as plain JSON, so the model's own chat template
turns them into its prompt. Only what an engine can act on is modelled: text content (parts of
type `text`), assistant tool calls and tool results; anything else is refused by name.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from typing import Annotated, Any, Literal
from urllib.parse import unquote

from pydantic import BaseModel, ConfigDict, Field, model_validator

from state.parsing import Hinted

MAX_CHAT_BYTES = 512 * 1024  # the same room a `prompt` has
ToolName = Annotated[str, Field(pattern=r"^[A-Za-z0-9_.-]{1,64}$")]
ShortText = Annotated[str, Field(max_length=256)]


class TextPart(BaseModel):
    """One part of a message's content given as a list; only text parts are served."""

    model_config = ConfigDict(extra="forbid")

    type: Literal["text"]
    text: str


class CalledFunction(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: ToolName
    arguments: str = Field(description="the arguments as the model wrote them (JSON, as a rule)")


def engine_arguments(text: str) -> str:
    """`arguments` as sent on to the engine: JSON text as it is; anything else (a call cut by
    max_tokens mid-arguments, as this server itself returns it) as a JSON string of the text.
    llama-server parses the arguments of earlier calls for templates that take them as an
    object and fails the whole request on text that is not JSON, while an agent sends back
    what it was given: the call stays in the conversation, word for word."""
    try:
        json.loads(text)
    except ValueError:
        return json.dumps(text, ensure_ascii=False)
    return text


class ToolCall(BaseModel):
    """A tool call an assistant message made (sent back in later turns of the conversation)."""

    model_config = ConfigDict(extra="forbid")

    id: ShortText
    type: Literal["function"] = "function"
    function: CalledFunction


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="forbid")

    role: Literal["system", "user", "assistant", "tool"]
    content: str | list[TextPart] | None = None
    name: ShortText | None = None
    tool_calls: list[ToolCall] | None = Field(None, max_length=128)
    tool_call_id: ShortText | None = Field(None, description="role tool: the call it answers")

    @model_validator(mode="after")
    def _consistent(self) -> ChatMessage:
        if self.role == "tool" and not self.tool_call_id:
            raise Hinted(
                "a message with role 'tool' needs 'tool_call_id'",
                "add tool_call_id: the id of the assistant's tool call it answers",
            )
        if self.tool_call_id is not None and self.role != "tool":  # it would be dropped
            raise Hinted(
                f"only a 'tool' message may carry 'tool_call_id' (this one is {self.role!r})",
                "remove tool_call_id, or give the message role: tool",
            )
        if self.tool_calls and self.role != "assistant":
            raise Hinted(
                "only an 'assistant' message may carry 'tool_calls'",
                "move tool_calls to the assistant message that made the calls",
            )
        if self.content is None and not (self.role == "assistant" and self.tool_calls):
            raise Hinted(
                f"a message with role {self.role!r} needs 'content'", "add content: <text>"
            )
        return self

    def text(self) -> str:
        """The content as one string (text parts joined)."""
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        return "".join(part.text for part in self.content)


class ToolFunction(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: ToolName
    description: str | None = Field(None, max_length=16 * 1024)
    parameters: dict[str, Any] | None = Field(None, description="a JSON Schema of the arguments")
    strict: bool | None = None

    @model_validator(mode="after")
    def _parameters_a_schema(self) -> ToolFunction:
        if self.parameters is not None:
            check_schema(self.parameters, f"the parameters of tool {self.name!r}")
        return self


class Tool(BaseModel):
    model_config = ConfigDict(extra="forbid")

    type: Literal["function"]
    function: ToolFunction


class ChosenFunction(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: ToolName


class NamedToolChoice(BaseModel):
    """`tool_choice` naming the one function the model must call."""

    model_config = ConfigDict(extra="forbid")

    type: Literal["function"]
    function: ChosenFunction


ToolChoice = Literal["none", "auto", "required"] | NamedToolChoice


class ResponseFormat(BaseModel):
    """`text`, `json_object` (any JSON object) or `json_schema` (`{name, schema, strict?,
    description?}`): llama-server turns the last two into a grammar."""

    model_config = ConfigDict(extra="forbid")

    type: Literal["text", "json_object", "json_schema"]
    json_schema: dict[str, Any] | None = None

    @model_validator(mode="after")
    def _schema_given(self) -> ResponseFormat:
        if self.type == "json_schema":
            given = self.json_schema or {}
            schema = given.get("schema", {})
            if not isinstance(schema, dict):
                kind = "a boolean" if isinstance(schema, bool) else type(schema).__name__
                raise Hinted(
                    f"response_format.json_schema.schema: must be a JSON object, not {kind} "
                    "(a schema of true or false constrains nothing a grammar can make)",
                    'give the schema as an object, e.g. {"type": "object"}',
                )
            if not given.get("name"):
                raise Hinted(
                    "response_format type 'json_schema' needs json_schema: {name, schema}",
                    "add json_schema: {name: <a name>, schema: {...}}",
                )
            unknown = sorted(set(given) - _JSON_SCHEMA_KEYS)
            if unknown:
                raise Hinted(
                    f"response_format.json_schema.{str(unknown[0])[:60]}: unsupported key",
                    f"keep only {', '.join(sorted(_JSON_SCHEMA_KEYS))}",
                )
            name = given.get("name")
            if not (isinstance(name, str) and _SCHEMA_NAME.fullmatch(name)):
                raise Hinted(
                    "response_format.json_schema.name: 1 to 64 letters, digits, '_' or '-'",
                    'name the schema as OpenAI takes it, e.g. "answer"',
                )
            check_schema(given.get("schema", {}), "response_format.json_schema.schema")
        elif self.json_schema is not None:
            raise Hinted(
                f"response_format type {self.type!r} takes no json_schema",
                "remove json_schema, or use type: json_schema",
            )
        return self


_JSON_SCHEMA_KEYS = frozenset({"name", "schema", "strict", "description"})
_SCHEMA_NAME = re.compile(r"[A-Za-z0-9_-]{1,64}")


def check_schema(schema: dict[str, Any], what: str) -> None:
    """Refuse a schema that is not one (`{"type": "nonsense"}`), or whose `$ref`s point
    outside it or nowhere in it: checked against its own JSON Schema draft's metaschema, and
    each reference looked up, as llama-server would fail to make a grammar of it only once
    the task ran. `what` names the schema in the message."""
    import jsonschema  # here: its import costs every command's start ~0.1 s otherwise

    try:
        jsonschema.validators.validator_for(schema).check_schema(schema)
    except jsonschema.SchemaError as exc:
        where = "/".join(str(p) for p in exc.path)
        raise Hinted(
            f"{what}: not a valid JSON Schema"
            + (f" (at {where[:80]})" if where else "")
            + f": {exc.message[:200]}",
            "fix the schema (https://json-schema.org/understanding-json-schema/)",
        ) from None
    embedded = next(_keyword(schema, "$id", depth=0), None) is not None  # refs may name those
    for ref in _keyword(schema, "$ref", depth=0):
        pointer = ref == "#" or ref.startswith("#/")
        # a pointer must resolve; an anchor, or a resource the schema embeds, is let be
        if _resolves(schema, ref) if pointer else (ref.startswith("#") or embedded):
            continue
        raise Hinted(
            f"{what}: $ref {ref[:80]!r} points nowhere in the schema",
            "refer only to the schema's own parts, e.g. '#/$defs/<name>' with that "
            "name under $defs (references to other documents are not fetched)",
        )


# keywords whose values are instance data, not schemas: a "$ref" key in them is data
_DATA_KEYWORDS = frozenset({"const", "enum", "default", "examples", "example"})


def _keyword(node: Any, keyword: str, *, depth: int) -> Iterator[str]:
    """Every string value of `keyword` in the schema `node`, outside instance data (bounded:
    the body's nesting is bounded)."""
    if depth > 256:
        return
    if isinstance(node, dict):
        value = node.get(keyword)
        if isinstance(value, str):
            yield value
        for key, child in node.items():
            if key not in _DATA_KEYWORDS:
                yield from _keyword(child, keyword, depth=depth + 1)
    elif isinstance(node, list):
        for child in node:
            yield from _keyword(child, keyword, depth=depth + 1)


def _resolves(schema: dict[str, Any], ref: str) -> bool:
    """Whether the JSON pointer `ref` into `schema` itself ('#', '#/a/0/b') exists."""
    node: Any = schema
    for raw in ref[1:].split("/")[1:]:
        key = unquote(raw).replace("~1", "/").replace("~0", "~")
        if isinstance(node, dict) and key in node:
            node = node[key]
        elif (
            isinstance(node, list)
            and key.isascii()
            and key.isdigit()
            and (key == "0" or not key.startswith("0"))  # RFC 6901: no leading zero
            and int(key) < len(node)
        ):
            node = node[int(key)]
        else:
            return False
    return True


def conversation_problem(messages: list[ChatMessage]) -> tuple[str, str] | None:
    """(message, hint) for a conversation the engine would refuse: a tool message that
    answers no call an assistant message before it made; None when it holds together."""
    called: set[str] = set()
    answered: set[str] = set()
    for n, message in enumerate(messages):
        for call in message.tool_calls or ():
            if call.id in called:
                return (
                    f"messages[{n}]: the tool call id {call.id!r} is used twice",
                    "give each tool call an id of its own",
                )
            called.add(call.id)
        if message.role != "tool":
            continue
        if message.tool_call_id in answered:
            return (
                f"messages[{n}]: the tool call {message.tool_call_id!r} is answered twice",
                "send one tool message per call",
            )
        answered.add(str(message.tool_call_id))
        if message.tool_call_id not in called:
            return (
                f"messages[{n}]: its tool_call_id {message.tool_call_id!r} answers no call "
                "of an assistant message before it",
                "give the id of one of the tool_calls of an earlier assistant message (or "
                "put that assistant message, with its tool_calls, before this one)",
            )
    return None


def size_bytes(messages: list[ChatMessage], tools: list[Tool] | None) -> int:
    """How many bytes of text the conversation and its tool definitions hold."""
    total = 0
    for message in messages:
        total += len(message.text().encode())
        for call in message.tool_calls or ():
            total += len(call.function.name) + len(call.function.arguments.encode())
    for tool in tools or ():
        total += len(tool.model_dump_json(exclude_none=True))
    return total


def merge_tool_calls(calls: list[dict[str, Any]], deltas: Any) -> None:
    """Fold streamed tool-call deltas (OpenAI's `delta.tool_calls` items) into whole calls
    `{id, type, function: {name, arguments}}`, in place: a delta with a new `index` starts a
    call, the others append to its name and arguments."""
    for delta in deltas:
        index = delta.get("index", len(calls) - 1 if calls else 0)
        while len(calls) <= index:
            calls.append({"id": "", "type": "function", "function": {"name": "", "arguments": ""}})
        call, function = calls[index], delta.get("function") or {}
        if delta.get("id"):
            call["id"] = delta["id"]
        call["function"]["name"] += function.get("name") or ""
        call["function"]["arguments"] += function.get("arguments") or ""
