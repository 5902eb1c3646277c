"""Reading YAML/JSON files into pydantic models, with errors that name file, line and field.

Every file a user writes (orch.yaml, task files, inventories) goes through `load_model`, which
never raises on bad input: it returns either the model or a list of `LoadError`s, each saying
where the problem is and how to fix it. `orchctl validate`, the spool and the config watcher
all call it.

Parsing the text, bounded against hostile input, is `parsing`'s job; this module reads the
bytes (refusing links, FIFOs, huge files and invalid UTF-8) and validates the data against the
model, locating at most `parsing.MAX_PROBLEMS` schema errors with a nearest-key hint.
"""

from __future__ import annotations

import difflib
import os
import stat
import types
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Generic, TypeVar

import pydantic
import yaml

from state import parsing

MAX_FILE_BYTES = 1024 * 1024

M = TypeVar("M", bound=pydantic.BaseModel)
T = TypeVar("T")

# one problem in one file; defined beside the parser, which reports most of them
LoadError = parsing.LoadError


@dataclass(frozen=True)
class Loaded(Generic[T]):
    """The outcome of a load: a value, or the errors that stopped it (never both)."""

    value: T | None
    errors: list[LoadError]
    data: Any = None
    node: yaml.Node | None = None  # the YAML node tree, for locating later checks


def read_text(path: Path, *, max_bytes: int = MAX_FILE_BYTES) -> tuple[str | None, list[LoadError]]:
    """Read a user file as UTF-8, refusing links, huge files and invalid bytes with a location."""
    shown = str(path)
    try:
        if path.is_symlink():
            return None, [
                LoadError(
                    shown,
                    None,
                    None,
                    None,
                    "is a symbolic link, which is not accepted",
                    "copy the file itself into place instead of linking it",
                )
            ]
        # O_NONBLOCK|O_NOFOLLOW and fstat on the open descriptor: a FIFO or device must not
        # block the daemon, and a link swapped in after the check above is refused too
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_NOFOLLOW)
        try:
            st = os.fstat(fd)
            if not stat.S_ISREG(st.st_mode):
                kind = _KINDS.get(stat.S_IFMT(st.st_mode), "something else")
                return None, [
                    LoadError(
                        shown,
                        None,
                        None,
                        None,
                        f"is {kind}, not a regular file",
                        "write task files as plain files",
                    )
                ]
            size = st.st_size
            if size > max_bytes:
                return None, [
                    LoadError(
                        shown,
                        None,
                        None,
                        None,
                        f"is {size} bytes, over the limit of {max_bytes} bytes",
                        "keep task files small; put large inputs in a file the prompt names",
                    )
                ]
            with os.fdopen(os.dup(fd), "rb") as fh:
                raw = fh.read(max_bytes + 1)
        finally:
            os.close(fd)
    except OSError as exc:
        try:  # a socket cannot even be opened: say what it is rather than ENXIO
            what = _KINDS.get(stat.S_IFMT(os.lstat(path).st_mode))
        except OSError:
            what = None
        message = f"is {what}, not a regular file" if what else f"cannot be read: {exc.strerror}"
        hint = "write task files as plain files" if what else "check its owner and permissions"
        return None, [LoadError(shown, None, None, None, message, hint)]
    return decode_utf8(raw, shown)


_KINDS = {
    stat.S_IFDIR: "a folder",
    stat.S_IFIFO: "a FIFO (named pipe)",
    stat.S_IFSOCK: "a socket",
    stat.S_IFCHR: "a character device",
    stat.S_IFBLK: "a block device",
}


def decode_utf8(raw: bytes, shown: str) -> tuple[str | None, list[LoadError]]:
    try:
        return raw.decode("utf-8"), []
    except UnicodeDecodeError as exc:
        line = raw.count(b"\n", 0, exc.start) + 1
        column = exc.start - (raw.rfind(b"\n", 0, exc.start) + 1) + 1
        return None, [
            LoadError(
                shown,
                line,
                column,
                None,
                f"is not valid UTF-8 (byte 0x{raw[exc.start]:02x} at offset {exc.start})",
                "save the file as UTF-8",
            )
        ]


parse_document = parsing.parse_document
parse_json_document = parsing.parse_json_document


def load_model(
    path: Path, model: type[M], *, max_bytes: int = MAX_FILE_BYTES, shown: str | None = None
) -> Loaded[M]:
    """Read, parse and validate `path` as `model`; errors carry file, line, column and field."""
    label = shown or str(path)
    text, errors = read_text(path, max_bytes=max_bytes)
    if text is None:
        return Loaded(None, [_relabel(e, label) for e in errors])
    return validate_text(text, model, shown=label, is_json=path.suffix == ".json")


def validate_text(text: str, model: type[M], *, shown: str, is_json: bool = False) -> Loaded[M]:
    parse = parse_json_document if is_json else parse_document
    data, node, errors = parse(text, shown)
    if errors:
        return Loaded(None, errors)
    if not isinstance(data, dict):
        kind = "empty" if data is None else f"a {type(data).__name__}"
        return Loaded(
            None,
            [
                LoadError(
                    shown,
                    1,
                    1,
                    None,
                    f"must be a mapping of keys to values, but is {kind}",
                    f"start from an example; fields are: {', '.join(model.model_fields)}",
                )
            ],
            data,
        )
    try:
        return Loaded(model.model_validate(data), [], data, node)
    except pydantic.ValidationError as exc:
        return Loaded(None, validation_errors(exc, model, node, shown), data, node)


def validation_errors(
    exc: pydantic.ValidationError,
    model: type[pydantic.BaseModel],
    node: yaml.Node | None,
    shown: str,
) -> list[LoadError]:
    out = []
    # Unknown keys first: a typo usually also makes a required field "missing", and the typo
    # is the line the user has to fix.
    found = sorted(
        plain_errors(exc.errors(include_url=False)), key=lambda e: e["type"] != "extra_forbidden"
    )
    # only the listed ones are located and hinted: each costs a walk of its mapping
    for err in found[: parsing.MAX_PROBLEMS]:
        loc = tuple(err["loc"])
        line, column = locate(node, loc, key=err["type"] == "extra_forbidden")
        hint = None
        message = err["msg"]
        if err["type"] == "extra_forbidden":
            allowed = fields_at(model, loc[:-1])
            message = f"unknown key {loc[-1]!r}"
            close = difflib.get_close_matches(str(loc[-1]), allowed, n=1, cutoff=0.6)
            if close:
                hint = f"did you mean {close[0]!r}?"
            elif allowed:
                hint = f"valid keys here: {', '.join(sorted(allowed))}"
        elif err["type"] == "missing":
            hint = f"add {loc[-1]!r}" if loc else None
        elif "input" in err and err["type"] not in ("model_type", "dict_type", "value_error"):
            message = f"{message} (got {parsing.short(err['input'])})"
        out.append(LoadError(shown, line, column, parsing.dotted(loc) or None, message, hint))
    return parsing.capped(out, shown, total=len(found))


# pydantic names the member of a union it tried in the error's location (`literal['auto']`,
# `list[constrained-int]`, `function-after[...]`, `int`): not a key the user wrote
_UNION_TAGS = frozenset({"int", "str", "float", "bool", "list", "dict", "none", "literal"})
_TAG_PREFIXES = ("function-", "constrained-", "lax-", "json-")
_WORDING = (
    ("Value error, ", ""),
    ("Input should be", "should be"),
    (", unable to parse string as an integer", ""),
    (", unable to parse string as a number", ""),
    ("String should", "should"),
    ("List should", "should"),
    ("Dictionary should", "should"),
)


def plain_errors(found: list[Any]) -> list[dict[str, Any]]:
    """pydantic's errors in the user's terms, the one place its wording is translated: union
    member tags are dropped from locations; of the members of one union, only those that got
    furthest into the value are reported, and members that failed at the same place are
    merged into one message ("should be 'auto' or a valid list")."""
    cleaned: list[dict[str, Any]] = []
    for err in found:
        loc = tuple(err["loc"])
        kept = tuple(p for p in loc if not _is_union_tag(p))
        message = str(err["msg"])
        for old, new in _WORDING:
            message = message.replace(old, new)
        cleaned.append(dict(err, loc=kept, msg=message, union=kept != loc))
    out: list[dict[str, Any]] = []
    for err in cleaned:
        if err["union"]:
            deeper = any(
                o["union"]
                and len(o["loc"]) > len(err["loc"])
                and o["loc"][: len(err["loc"])] == err["loc"]
                for o in cleaned
            )
            if deeper:
                continue  # another member of the union matched the value's shape
            twin = next((o for o in out if o["union"] and o["loc"] == err["loc"]), None)
            if twin is not None:
                twin["msg"] = f"{twin['msg']} or {err['msg'].removeprefix('should be ')}"
                continue
        out.append(err)
    return out


def _is_union_tag(part: Any) -> bool:
    return isinstance(part, str) and (
        "[" in part or part in _UNION_TAGS or part.startswith(_TAG_PREFIXES)
    )


def locate(
    node: yaml.Node | None, loc: tuple[Any, ...], *, key: bool = False
) -> tuple[int | None, int | None]:
    """Line and column (1-based) of the value at `loc`; of its key when `key` is true."""
    if node is None:
        return None, None
    best: yaml.Node = node
    key_node: yaml.Node | None = None
    for part in loc:
        child, key_node = _child(best, part)
        if child is None:
            break
        best = child
    else:
        if key and key_node is not None:
            best = key_node
    return best.start_mark.line + 1, best.start_mark.column + 1


def _child(node: yaml.Node, part: Any) -> tuple[yaml.Node | None, yaml.Node | None]:
    if isinstance(node, yaml.MappingNode):
        for k, v in node.value:
            if str(k.value) == str(part):
                return v, k
    if isinstance(node, yaml.SequenceNode) and isinstance(part, int) and part < len(node.value):
        return node.value[part], None
    return None, None


def fields_at(model: type[pydantic.BaseModel], loc: tuple[Any, ...]) -> list[str]:
    """The field names valid at `loc` inside `model`, following nested models, lists and dicts."""
    current: Any = model
    for part in loc:
        current = _step(current, part)
        if current is None:
            return []
    inner = _model_in(current)
    return list(inner.model_fields) if inner else []


def _step(tp: Any, part: Any) -> Any:
    inner = _model_in(tp)
    if inner is not None and isinstance(part, str) and part in inner.model_fields:
        return inner.model_fields[part].annotation
    for arg in _args(tp):
        if (
            isinstance(part, int)
            or _model_in(arg) is not None
            or typing.get_origin(arg) in (list, dict)
        ):
            origin = typing.get_origin(arg)
            if origin is list and isinstance(part, int):
                return typing.get_args(arg)[0]
            if origin is dict and isinstance(part, str):
                return typing.get_args(arg)[1]
    origin = typing.get_origin(tp)
    if origin is list and isinstance(part, int):
        return typing.get_args(tp)[0]
    if origin is dict:
        return typing.get_args(tp)[1]
    return None


def _args(tp: Any) -> tuple[Any, ...]:
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        return typing.get_args(tp)
    return ()


def _model_in(tp: Any) -> type[pydantic.BaseModel] | None:
    if isinstance(tp, type) and issubclass(tp, pydantic.BaseModel):
        return tp
    for arg in _args(tp):
        found = _model_in(arg)
        if found is not None:
            return found
    return None


def _relabel(error: LoadError, label: str) -> LoadError:
    return LoadError(label, error.line, error.column, error.field, error.message, error.hint)
