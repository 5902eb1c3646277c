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

import datetime
import difflib
import os
import re
import stat
import types
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Generic, TypeVar

import pydantic
import yaml

from state import ids, parsing
from state.errors import exhausted

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
    raw, errors, _ = read_bytes(path, max_bytes=max_bytes)
    if raw is None:
        return None, errors
    return decode_utf8(raw, str(path))


def read_bytes(
    path: Path, *, max_bytes: int = MAX_FILE_BYTES
) -> tuple[bytes | None, list[LoadError], os.stat_result | None]:
    """The bytes of a user file, read once (callers parse these bytes, never the file again:
    it may be replaced meanwhile) and its stat; links, FIFOs, devices and files over
    `max_bytes` (also one that grows past it while read) are refused with the reason."""
    shown = str(path)
    try:
        # O_NOFOLLOW: a symbolic link (also one swapped in at any moment) fails the open
        # (ELOOP, told apart below); O_NONBLOCK and fstat on the open descriptor: a FIFO or
        # device must not block the daemon
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_NOFOLLOW)
        try:
            st = os.fstat(fd)
            if not stat.S_ISREG(st.st_mode):
                kind = _KINDS.get(stat.S_IFMT(st.st_mode), "something else")
                return _refused(shown, f"is {kind}, not a regular file", _PLAIN)
            if st.st_size > max_bytes:
                return _refused(shown, f"is {st.st_size} bytes, {_OVER}{max_bytes} bytes", _BIG)
            raw = _read_up_to(fd, max_bytes + 1, st.st_size)
            if len(raw) > max_bytes:  # it grew after the fstat above: refused all the same
                return _refused(shown, f"grew while being read, {_OVER}{max_bytes} bytes", _BIG)
        finally:
            os.close(fd)
    except OSError as exc:
        if exhausted(exc):  # the daemon's state, not the file's: the caller retries
            raise
        try:  # a socket cannot even be opened: say what it is rather than ENXIO
            mode = os.lstat(path).st_mode
        except OSError:
            mode = 0
        if stat.S_ISLNK(mode):
            return _refused(
                shown,
                "is a symbolic link, which is not accepted",
                "copy the file itself into place instead of linking it",
            )
        what = _KINDS.get(stat.S_IFMT(mode)) if mode else None
        message = (
            f"is {what}, not a regular file" if what else f"cannot be read: {exc.strerror or exc}"
        )
        if what:
            hint = _PLAIN
        elif isinstance(exc, FileNotFoundError):
            hint = "check the path: no file has that name"
        else:
            hint = "check its owner and permissions"
        return _refused(shown, message, hint)
    return raw, [], st


def _read_up_to(fd: int, limit: int, size_hint: int) -> bytes:
    """At most `limit` bytes from `fd`, to its end (one read for a file that did not grow)."""
    chunks, total = [], 0
    want = min(limit, max(size_hint + 1, 4096))
    while total < limit:
        chunk = os.read(fd, min(want, limit - total))
        if not chunk:
            break
        chunks.append(chunk)
        total += len(chunk)
    return b"".join(chunks)


_OVER = "over the limit of "
_PLAIN = "give a regular file here, not a folder, link, FIFO or device"
_BIG = "make the file smaller than the limit (a task's large inputs go in a file its prompt names)"


def _refused(shown: str, message: str, hint: str) -> tuple[None, list[LoadError], None]:
    return None, [LoadError(shown, None, None, None, message, hint)], None


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
    path: Path,
    model: type[M],
    *,
    max_bytes: int = MAX_FILE_BYTES,
    shown: str | None = None,
    content: bytes | None = None,
    tree: bool = True,
) -> Loaded[M]:
    """Read, parse and validate `path` as `model`; errors carry file, line, column and field.
    `content`: the file's bytes, already read by the caller (`read_bytes`). `tree=False`: the
    caller does not need the node tree of a file that loads cleanly (`Loaded.node` may then
    be None): a JSON file's is built only to locate its problems."""
    label = shown or str(path)
    if content is None:
        text, errors = read_text(path, max_bytes=max_bytes)
    else:
        text, errors = decode_utf8(content, label)
    if text is None:
        return Loaded(None, [_relabel(e, label) for e in errors])
    return validate_text(text, model, shown=label, is_json=path.suffix == ".json", tree=tree)


def validate_text(
    text: str, model: type[M], *, shown: str, is_json: bool = False, tree: bool = True
) -> Loaded[M]:
    if is_json:
        data, node, errors = parse_json_document(text, shown, tree=tree)
    else:
        data, node, errors = parse_document(text, shown)
    if errors:
        return Loaded(None, errors)
    if not isinstance(data, dict):
        kind = "empty" if data is None else parsing.kind_of(data)
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
        if node is None and is_json:  # parsed without its tree: built now, to locate
            node = parsing.json_tree(text, shown)
        return Loaded(None, validation_errors(exc, model, node, shown, data), data, node)


def validation_errors(
    exc: pydantic.ValidationError,
    model: type[pydantic.BaseModel],
    node: yaml.Node | None,
    shown: str,
    data: Any = None,
) -> list[LoadError]:
    """pydantic's errors located in `node` (the tree `data` was built from) and hinted."""
    out = []
    # Unknown keys first: a typo usually also makes a required field "missing", and the typo
    # is the line the user has to fix.
    found = sorted(
        plain_errors(exc.errors(include_url=False), data),
        key=lambda e: e["type"] != "extra_forbidden",
    )
    # only the listed ones are located and hinted: each costs a walk of its mapping
    for err in found[: parsing.MAX_PROBLEMS]:
        loc = tuple(err["loc"])
        line, column = locate(node, loc, key=err["type"] == "extra_forbidden")
        hint = _HINTS.get(err["type"], _ANY_HINT)
        cause = err.get("ctx", {}).get("error")
        if isinstance(cause, parsing.Hinted):
            hint = cause.hint
        message = err["msg"]
        if err.get("ctx", {}).get("pattern") == ids.ID_PATTERN:
            hint = _ID_HINT
        if err["type"] == "extra_forbidden":
            allowed = fields_at(model, loc[:-1])
            message = f"unknown key {parsing.short(loc[-1])}"
            # difflib's cost grows with the key: a 1 MiB key would take seconds, and no
            # field name is over 40 characters, so a long key is no typo of one
            name = str(loc[-1])
            close = (
                difflib.get_close_matches(name, allowed, n=1, cutoff=0.6) if len(name) <= 80 else []
            )
            if close:
                hint = f"did you mean {close[0]!r}?"
            elif allowed:
                hint = f"valid keys here: {', '.join(sorted(allowed))}"
        elif err["type"] == "missing":
            hint = f"add {loc[-1]!r}" if loc else hint
        elif _quoted_scalar(err):
            kind = "true/false" if err["input"].strip().lower() in ("true", "false") else "number"
            scalar = node_at(node, loc)
            if isinstance(scalar, yaml.ScalarNode) and not scalar.style:  # plain: None or ""
                # not quoted: a form YAML 1.1 reads as text (`1e3`: its floats need a dot)
                message = (
                    f"{message} (got {parsing.short(err['input'])}, which YAML reads as text, "
                    f"not a {kind})"
                )
                hint = _number_hint(str(err["input"]), whole="int" in err["type"])
            else:  # `version: "1"`: the quotes made it text
                message = (
                    f"{message} (got the text {parsing.short(err['input'])}: quoted, so not a "
                    f"{kind})"
                )
                hint = "write it without the quotes"
        elif isinstance(err.get("input"), datetime.date):  # YAML reads 2024-01-01 as a date
            scalar = node_at(node, loc)  # as written: a datetime's isoformat adds a T
            written = scalar.value if isinstance(scalar, yaml.ScalarNode) else None
            given = parsing.shortened(str(written or err["input"].isoformat()), 40)
            message = f"{message} (got {given}, which YAML reads as a date)"
            hint = f'quote it to keep it as text: "{given}"'
        elif isinstance(err.get("input"), bool) and err["type"] != "bool_type":
            # YAML 1.1 reads yes/no/on/off (and y/n) as true/false, where no boolean is meant
            scalar = node_at(node, loc)
            written = scalar.value if isinstance(scalar, yaml.ScalarNode) else None
            shown_as = str(err["input"]).lower()
            if written is not None and written.lower() != shown_as:
                given = parsing.shortened(written, 40)
                message = f"{message} (got {given}, which YAML reads as the boolean {shown_as})"
                if err["type"] == "string_type":
                    hint = f'quote it to keep it as text: "{given}"'
                elif err["type"] in ("int_type", "int_parsing"):
                    hint = "write a whole number"
                else:
                    hint = "write a value this field takes (not yes/no/on/off)"
            else:
                message = f"{message} (got {shown_as})"
        elif "input" in err and err["type"] not in ("model_type", "dict_type", "value_error"):
            message = f"{message} (got {parsing.as_written(err['input'])})"
        # a validator's message may quote the user's value whole (a 100,000-character id)
        message = parsing.shortened(message, 300)
        out.append(LoadError(shown, line, column, parsing.dotted(loc) or None, message, hint))
    return parsing.capped(out, shown, total=len(found))


_NUMBER_OR_FLAG = re.compile(r"[-+]?(\d[\d_]*(\.\d*)?([eE][-+]?\d+)?|\.\d+)|true|false", re.I)


def _number_hint(text: str, *, whole: bool) -> str:
    """How to write `text` (`1e3`, a number YAML 1.1 reads as text: its floats need a dot
    and a signed exponent) so it is read as the number meant."""
    try:
        value = float(text.replace("_", ""))
    except ValueError:
        return "write a plain number (1000), or a decimal one with a dot (1.5, 1.0e+3)"
    plain = value.is_integer() and abs(value) < 1e15
    if plain:
        return f"write it as a plain whole number: {int(value)}"
    if whole:
        return "write a plain whole number"
    return f"write it with a dot and a signed exponent ({value:.1e}) or plainly ({value!r})"


def _quoted_scalar(err: Any) -> bool:
    """Whether a value of the wrong type is text that reads as a number or true/false, as
    quotes around one make it (strict fields convert nothing)."""
    given = err.get("input")
    return (
        err["type"] in ("literal_error", "int_type", "float_type", "bool_type", "int_parsing")
        and isinstance(given, str)
        and len(given) <= 40
        and _NUMBER_OR_FLAG.fullmatch(given.strip()) is not None
    )


# every schema error gets a hint; the message already names the limit or the type wanted
_ANY_HINT = "see this field in docs/contracts.md; `orchctl schemas` writes the JSON Schemas"
_ID_HINT = "use letters, digits, '.', '_' and '-' only (up to 128, starting with a letter or digit)"
_TYPE_HINT = "write a value of the type named: quote text; numbers and true/false go unquoted"
_HINTS = {
    **dict.fromkeys(
        ("greater_than", "greater_than_equal", "less_than", "less_than_equal", "multiple_of"),
        "use a number within the limit named",
    ),
    **dict.fromkeys(("string_too_long", "too_long"), "shorten it to the limit named"),
    **dict.fromkeys(("string_too_short", "too_short"), "lengthen it to the limit named"),
    **dict.fromkeys(("literal_error", "enum"), "use one of the values named"),
    "finite_number": "write a finite number (NaN and Infinity are not accepted)",
    "string_pattern_mismatch": "write it in the form the pattern allows",
    "string_unicode": "write plain text: no escaped lone surrogates such as \\ud800",
    "int_from_float": "write a whole number, without a fraction",
}
for _kind in ("int", "float", "bool", "string", "dict", "list", "model", "none", "tuple"):
    _HINTS.setdefault(f"{_kind}_type", _TYPE_HINT)
    _HINTS.setdefault(f"{_kind}_parsing", _TYPE_HINT)


# pydantic names the member of a union it tried in the error's location (`literal['auto']`,
# `list[constrained-int]`, `function-after[...]`, `int`): not a key the user wrote
_UNION_TAGS = frozenset({"int", "str", "float", "bool", "list", "dict", "none", "literal"})
_TAG_PREFIXES = ("function-", "constrained-", "lax-", "json-")
_INSTANCE_OF = re.compile(r"a valid dictionary or instance of \w+")
_WORDING = (
    ("Value error, ", ""),
    ("Input should be", "should be"),
    (", unable to parse string as an integer", ""),
    (", unable to parse string as a number", ""),
    ("String should", "should"),
    ("List should", "should"),
    ("Dictionary should", "should"),
    (" after validation", ""),  # pydantic's own steps: the user sent one value
)


def plain_errors(found: list[Any], data: Any = None) -> list[dict[str, Any]]:
    """pydantic's errors in the user's terms, the one place its wording is translated: union
    member tags are dropped from locations (never a key the user wrote, `int: 1` included:
    see `_user_loc`); of the members of one union, only those that got furthest into the
    value are reported, and members that failed at the same place are merged into one
    message ("should be 'auto' or a valid list")."""
    cleaned: list[dict[str, Any]] = []
    for err in found:
        loc = tuple(err["loc"])
        kept = _user_loc(loc, data, extra=err["type"] == "extra_forbidden")
        message = str(err["msg"])
        for old, new in _WORDING:
            message = message.replace(old, new)
        # pydantic names its own classes ("instance of ChatMessage"): the user wrote a value
        message = _INSTANCE_OF.sub("an object (a mapping of keys to values)", message)
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


def _user_loc(loc: tuple[Any, ...], data: Any, *, extra: bool) -> tuple[Any, ...]:
    """`loc` without pydantic's union member tags. A part that is a key or index of the
    validated `data` (when given) is the user's, whatever its name; so is the last part of
    an unknown-key error, which pydantic puts there as written."""
    kept: list[Any] = []
    current, known = data, data is not None
    for i, part in enumerate(loc):
        if known and _has(current, part):
            current = current[part]
        elif _is_union_tag(part) and not (extra and i == len(loc) - 1):
            continue
        else:
            known = False
        kept.append(part)
    return tuple(kept)


def _has(container: Any, part: Any) -> bool:
    if isinstance(container, dict):
        return part in container
    return isinstance(container, list) and isinstance(part, int) and 0 <= part < len(container)


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
    best, _ = _nearest(node, loc, key=key)
    return best.start_mark.line + 1, best.start_mark.column + 1


def node_at(node: yaml.Node | None, loc: tuple[Any, ...]) -> yaml.Node | None:
    """The node of the value at `loc`, None where there is none (JSON, or no such value)."""
    if node is None:
        return None
    best, found = _nearest(node, loc, key=False)
    return best if found else None


def _nearest(node: yaml.Node, loc: tuple[Any, ...], *, key: bool) -> tuple[yaml.Node, bool]:
    """The node at `loc` (its key's, with `key`), or the deepest one on the way there; and
    whether it is the one at `loc`."""
    best: yaml.Node = node
    key_node: yaml.Node | None = None
    for part in loc:
        child, key_node = _child(best, part)
        if child is None:
            return best, False
        best = child
    if key and key_node is not None:
        best = key_node
    return best, True


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
