"""Parsing YAML and JSON text into data and a node tree, bounded against hostile input.

`loading` calls it for every file a user writes (task files, orch.yaml, inventories). The
daemon reads task files inline, so one hostile file must cost milliseconds, never seconds:

- `_scan` walks the parse events before anything is built and stops at the first alias, at
  nesting deeper than MAX_DEPTH, or past MAX_VALUES values;
- `_check_tree` refuses what a dict would silently lose or choke on: a key given twice (the
  error names both lines), a merge key, a number over MAX_NUMBER_CHARS characters;
- a value the constructor cannot build (`2024-13-45`) is an error at its line, not a crash;
- at most MAX_PROBLEMS problems are reported (`capped`), then one line counting the rest.

JSON is read by the json module (its numbers and escapes, not YAML's) under the same bounds;
the YAML node tree of the same text gives the locations.
"""

from __future__ import annotations

import contextlib
import json
import math
import re
import reprlib
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import yaml

MAX_DEPTH = 32  # nested mappings and lists; orch.yaml needs 4, a task file 3
MAX_VALUES = 10_000  # keys, values and list items; a 50-pool orch.yaml has about 1,000
MAX_NUMBER_CHARS = 100  # no field takes a longer number; int() refuses 4,300 digits anyway
MAX_PROBLEMS = 20  # problems listed per file; the rest are counted in one last line


class Hinted(ValueError):
    """A model validator's refusal with its own fix: the loader shows `hint` beside the
    message instead of the generic schema hint (pydantic keeps the exception in the error's
    context)."""

    def __init__(self, message: str, hint: str) -> None:
        super().__init__(message)
        self.hint = hint


@dataclass(frozen=True)
class LoadError:
    """One problem in one file, located as precisely as the parser allows."""

    path: str
    line: int | None
    column: int | None
    field: str | None
    message: str
    hint: str | None = None

    def __str__(self) -> str:
        where = self.path
        if self.line is not None:
            where += f":{self.line}"
            if self.column is not None:
                where += f":{self.column}"
        text = f"{where}: "
        if self.field:
            text += f"{self.field}: "
        text += self.message
        if self.hint:
            text += f" (hint: {self.hint})"
        return text

    def as_dict(self) -> dict[str, Any]:
        return {
            "path": self.path,
            "line": self.line,
            "column": self.column,
            "field": self.field,
            "message": self.message,
            "hint": self.hint,
        }


def parse_document(text: str, shown: str) -> tuple[Any, yaml.Node | None, list[LoadError]]:
    """Parse YAML (JSON is accepted as YAML); return the data and its node tree for locations.

    Bounded before anything is built (`_scan`), then checked for what a dict would silently
    lose (`_check_tree`), then built from that same node tree.
    """
    try:
        problems = _scan(text, shown)
        if problems:
            return None, None, problems
        loader = _Loader(text)
        try:
            node = loader.get_single_node()
            if node is None:
                return None, None, []
            problems = _check_tree(node, shown)
            if problems:
                return None, None, problems
            data = loader.construct_document(node)
        finally:
            loader.dispose()
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        if exc.problem == "exceeded maximum nesting depth":  # libyaml's own limit, 1,000 levels
            return None, None, [_at(shown, mark, *_TOO_DEEP)]
        if isinstance(exc, _Unreadable):
            return (
                None,
                None,
                [_at(shown, mark, str(exc.problem), "quote it if it is meant as text")],
            )
        if (
            isinstance(exc, yaml.constructor.ConstructorError)
            and exc.problem
            and ("constructor for the tag" in exc.problem)
        ):
            # `!!python/object…` and other tags: nothing but plain data is ever built
            tag = exc.problem.rpartition("tag ")[2].strip("'").replace(_YAML_TAG, "!!")
            return (
                None,
                None,
                [
                    _at(
                        shown,
                        mark,
                        f"uses the YAML tag {short(tag)}, which is not accepted",
                        "remove the tag: only plain text, numbers, lists and mappings are read",
                    )
                ],
            )
        return None, None, [_syntax_error(text, shown, exc)]
    except yaml.reader.ReaderError as exc:
        return None, None, [_unreadable_character(text, shown, exc)]
    except yaml.YAMLError as exc:  # no other kind is raised; should one appear, say so clearly
        return None, None, [LoadError(shown, 1, 1, None, f"is not valid YAML/JSON: {exc}", _SYNTAX)]
    return data, node, []


_SYNTAX = "check indentation, colons and quotes near this line"


def _syntax_error(text: str, shown: str, exc: yaml.MarkedYAMLError) -> LoadError:
    """A YAML syntax error where the user can find it: a tab named as one; one found at the
    end of the file (an unclosed bracket or quote) placed where what is unclosed began, not
    on a line past the last."""
    mark, context = exc.problem_mark, exc.context_mark
    problem = exc.problem or exc.context or "invalid syntax"
    if mark is not None and 0 <= mark.index < len(text) and text[mark.index] == "\t":
        return _at(
            shown,
            mark,
            "is not valid YAML/JSON: a tab, which YAML does not accept where it indents or "
            "separates",
            "use spaces instead of tabs",
        )
    lines = text.count("\n") + (0 if text.endswith("\n") or not text else 1)
    what = (exc.context or "").removeprefix("while parsing a ").removeprefix("while scanning a ")
    if mark is not None and mark.line + 1 > lines:  # the end of the file came first
        opener: tuple[Any, str] | None = None
        if context is not None and context.line + 1 <= lines:
            opener = context, _UNCLOSED.get(what, what or "part")
        elif (found := _unclosed(text)) is not None:  # PyYAML names no opener in the text
            opener = found[0], _UNCLOSED[_OPENERS[found[1]]]
        if opener is None:
            return _at(
                shown,
                _last_line(text),
                f"is not valid YAML/JSON: the file ends before it is complete ({problem})",
                _SYNTAX,
            )
        where, kind = opener
        return _at(
            shown,
            where,
            f"is not valid YAML/JSON: the file ends before the {kind} opened at line "
            f"{where.line + 1}, column {where.column + 1} is closed",
            "close it, or remove what opened it",
        )
    closable = what in ("flow sequence", "flow mapping", "quoted scalar")
    if mark is not None and context is not None and closable and context.line != mark.line:
        # the mistake is the bracket or quote left open, lines before where YAML noticed it
        return _at(
            shown,
            context,
            f"is not valid YAML/JSON: the {_UNCLOSED[what]} opened here is not closed (YAML "
            f"noticed at line {mark.line + 1}, column {mark.column + 1}: {problem})",
            "close it where it ends, or remove what opened it",
        )
    return _at(shown, mark or context, f"is not valid YAML/JSON: {problem}", _SYNTAX)


_UNCLOSED = {
    "flow sequence": "[ list",
    "flow mapping": "{ mapping",
    "quoted scalar": "quoted string",
    "block collection": "block",
    "block mapping": "mapping",
}


_OPENERS = {"[": "flow sequence", "{": "flow mapping"}  # as PyYAML names them


def _unclosed(text: str) -> tuple[_Mark, str] | None:
    """The last [ or { left open at the end of `text` (quotes and comments skipped), with
    where it is; a rough reading, for the message only."""
    stack: list[tuple[_Mark, str]] = []
    quote: str | None = None
    line = column = 0
    previous = "\n"
    in_comment = False
    for char in text:
        if char == "\n":
            line, column, in_comment, previous = line + 1, 0, False, char
            continue
        if in_comment:
            column += 1
            continue
        if quote is not None:
            if char == quote and not (quote == '"' and previous == "\\"):
                quote = None
        elif char == "#" and previous in " \t\n":
            in_comment = True
        elif char in "'\"" and previous in " \t\n[{,:":
            quote = char
        elif char in _OPENERS:
            stack.append((_Mark(line, column), char))
        elif char in "]}" and stack:
            stack.pop()
        previous = char
        column += 1
    return stack[-1] if stack and quote is None else None


@dataclass(frozen=True)
class _Mark:
    line: int
    column: int


def _last_line(text: str) -> _Mark:
    """The start of the file's last line that holds anything."""
    kept = text.rstrip().splitlines()
    return _Mark(max(0, len(kept) - 1), 0)


def _unreadable_character(text: str, shown: str, exc: yaml.reader.ReaderError) -> LoadError:
    """YAML refuses control characters (NUL, ESC, DEL …) and U+FFFE/U+FFFF anywhere in the
    text; its error gives only an offset (in bytes, which differ from characters), so the
    character itself is looked up for its line and column."""
    char = chr(exc.character) if isinstance(exc.character, int) else str(exc.character)
    offset = text.find(char)
    line = column = None
    if offset >= 0:
        line = text.count("\n", 0, offset) + 1
        column = offset - text.rfind("\n", 0, offset)
    return LoadError(
        shown,
        line,
        column,
        None,
        f"contains the character U+{ord(char):04X}, which YAML does not accept in a file",
        f'remove it; inside a double-quoted string write it as "{_escaped(char)}"',
    )


def _escaped(char: str) -> str:
    return char.encode("unicode_escape").decode("ascii")


def _at(shown: str, mark: Any, message: str, hint: str, field: str | None = None) -> LoadError:
    line = mark.line + 1 if mark else None
    column = mark.column + 1 if mark else None
    return LoadError(shown, line, column, field, message, hint)


# SafeConstructor builds these, but only for an explicit tag: bytes, sets and pair lists are
# not the plain text, numbers, lists and mappings a file is read as
_NOT_PLAIN = frozenset(f"tag:yaml.org,2002:{kind}" for kind in ("binary", "set", "omap", "pairs"))


class _Unreadable(yaml.constructor.ConstructorError):
    """A value the parser accepted but no Python value can be built from."""


class _Checked(yaml.constructor.SafeConstructor):
    """SafeConstructor whose failure on one value names that value's line instead of escaping
    as a Python error (`2024-13-01` is a timestamp the calendar refuses)."""

    def construct_object(self, node: yaml.Node, deep: bool = False) -> Any:
        if node.tag in _NOT_PLAIN:  # only ever given explicitly: `!!binary`, `!!set`, …
            raise yaml.constructor.ConstructorError(
                None, None, f"no constructor for the tag {node.tag!r}", node.start_mark
            )
        try:
            return super().construct_object(node, deep)
        except yaml.YAMLError:
            raise
        except Exception as exc:
            kind = str(node.tag).rsplit(":", 1)[-1]
            raise _Unreadable(None, None, f"is not a valid {kind}: {exc}", node.start_mark) from exc


# libyaml when PyYAML was built with it (the wheels are): parsing 1 MiB in C takes
# milliseconds, in Python seconds. Both give the same events, nodes and marks.
_Loader: Any = type(
    "_Loader", (_Checked, yaml.CSafeLoader if yaml.__with_libyaml__ else yaml.SafeLoader), {}
)


def _scan(text: str, shown: str) -> list[LoadError]:
    """Walk the parse events without building anything and refuse, at the first event that
    shows it, input that would make building slow or unbounded: aliases, nesting deeper than
    MAX_DEPTH, more than MAX_VALUES values. A hostile file therefore costs little to refuse."""
    loader = _Loader(text)
    depth = values = 0
    try:
        while loader.check_event():
            event = loader.get_event()
            if isinstance(event, yaml.AliasEvent):
                # aliases let a 1 KiB file expand into gigabytes ("billion laughs")
                return [
                    _at(
                        shown,
                        event.start_mark,
                        f"uses the YAML alias *{event.anchor}, which is not accepted",
                        "write the value out instead of referring to an anchor",
                    )
                ]
            if isinstance(event, yaml.NodeEvent):
                values += 1
                if values > MAX_VALUES:
                    return [_at(shown, event.start_mark, *_TOO_MANY)]
            if isinstance(event, yaml.CollectionStartEvent):
                depth += 1
                if depth > MAX_DEPTH:
                    return [_at(shown, event.start_mark, *_TOO_DEEP)]
            elif isinstance(event, yaml.CollectionEndEvent):
                depth -= 1
    finally:
        loader.dispose()
    return []


_INT, _FLOAT, _MERGE = (f"tag:yaml.org,2002:{kind}" for kind in ("int", "float", "merge"))
# (message, hint) of the problems found both in YAML and, without a location, in JSON
_TOO_MANY = (
    f"has more than {MAX_VALUES:,} keys, values and list items",
    "no file needs that many; put bulk data in a file the prompt names",
)
_TOO_DEEP = (
    f"nests lists and mappings more than {MAX_DEPTH} levels deep",
    "no field nests that deep; look for unbalanced brackets near here",
)


def _not_a_number(word: str) -> tuple[str, str]:
    """NaN, Infinity, -Infinity, or a literal too large for a double (1e400)."""
    if word in ("NaN", "Infinity", "-Infinity"):
        message = f"{word} is not a JSON number (JSON has no NaN or Infinity)"
    elif float(word) == 0.0:
        message = f"{shortened(word, 30)} is too small to be told from 0 (below a double's range)"
    else:
        message = f"{shortened(word, 30)} is beyond the range of a number"
    return message, "write a finite number, or null"


def _too_long(chars: int) -> tuple[str, str]:
    return (
        f"has a number {chars:,} characters long; no field takes one over {MAX_NUMBER_CHARS}",
        "quote it if it is meant as text",
    )


def _repeated(name: str, first_line: int | None) -> tuple[str, str]:
    where = f" of line {first_line}" if first_line else ""
    return (
        f"repeats the key {short(name)}{where}; the later value would silently replace "
        "the earlier one",
        "keep one of the two",
    )


def _check_tree(root: yaml.Node, shown: str, *, json_text: bool = False) -> list[LoadError]:
    """What the parser accepts but building a dict would silently lose or choke on: a key
    given twice (the last value would win), a merge key (its keys may be overridden unseen),
    a number too long to convert; in JSON (`json_text`) NaN, Infinity and a number beyond a
    double's range. Sorted by line, at most MAX_PROBLEMS and a count."""
    keys = yaml.constructor.SafeConstructor()
    problems: list[LoadError] = []
    stack: list[tuple[yaml.Node, tuple[Any, ...]]] = [(root, ())]
    while stack:
        node, loc = stack.pop()
        field = dotted(loc) or None
        if isinstance(node, yaml.ScalarNode):
            if _long_number(node):
                problems.append(_at(shown, node.start_mark, *_too_long(len(node.value)), field))
            elif json_text and not node.style and _not_finite(node.value):
                problems.append(_at(shown, node.start_mark, *_not_a_number(node.value), field))
            elif not json_text and (converted := _converted_number(keys, node)) is not None:
                problems.append(_at(shown, node.start_mark, *converted, field))
        elif isinstance(node, yaml.SequenceNode):
            stack.extend((child, (*loc, i)) for i, child in enumerate(node.value))
        elif isinstance(node, yaml.MappingNode):
            seen: dict[Any, yaml.Node] = {}
            for key, value in node.value:
                name = key.value if isinstance(key, yaml.ScalarNode) else "?"
                if key.tag == _MERGE:
                    problems.append(
                        _at(
                            shown,
                            key.start_mark,
                            "uses the YAML merge key <<, which is not accepted",
                            "write the keys out in this mapping",
                            field,
                        )
                    )
                elif isinstance(key, yaml.ScalarNode):
                    first = seen.setdefault(_identity(keys, key), key)
                    if first is not key:
                        again = _repeated(name, first.start_mark.line + 1)
                        problems.append(_at(shown, key.start_mark, *again, dotted((*loc, name))))
                stack.append((value, (*loc, name)))
                stack.append((key, loc))
    problems.sort(key=lambda p: (p.line or 0, p.column or 0))
    return capped(problems, shown)


# the numbers YAML writes as they read: other forms it takes (YAML 1.1's) are converted
_PLAIN_INT = re.compile(r"[-+]?(0|[1-9][0-9]*)")
_CONVERTING_FLOAT = re.compile(r"[^:_]*[:_].*")  # 1_000.5, 1:30.0 (base 60)


def _converted_number(
    constructor: yaml.constructor.SafeConstructor, node: yaml.ScalarNode
) -> tuple[str, str] | None:
    """(message, hint) for a plain number whose value is not what it reads as to a person
    or to YAML 1.2: `010` is 8 (octal), `1:00` is 60 (base 60), `0x10` is 16, `1_000` is
    1000; None for any other scalar. Files promise values taken as written."""
    if node.style or len(node.value) > MAX_NUMBER_CHARS:  # quoted (plain: None, or "")
        return None
    word = node.value
    if node.tag == _INT and not _PLAIN_INT.fullmatch(word):
        value: Any = constructor.construct_yaml_int(node)
    elif node.tag == _FLOAT and _CONVERTING_FLOAT.fullmatch(word):
        value = constructor.construct_yaml_float(node)
    else:
        return None
    digits = word.lstrip("+-")
    if ":" in word:
        form, hint = "a base-60 number (YAML 1.1)", f"write {value!r}, or quote it as text"
    elif digits[:2].lower() in ("0x", "0b"):
        form = "a hexadecimal number" if digits[1] in "xX" else "a binary number"
        hint = f"write {value!r}"
    elif "_" in word:
        form, hint = "a number with _ separators", f"write {value!r}, without separators"
    else:
        decimal = word[: len(word) - len(digits)] + (digits.lstrip("0") or "0")
        if int(decimal) == value:  # 00, -0: the same number either way
            return None
        form = "an octal number (YAML 1.1: a leading zero)"
        hint = f"write {decimal}, without the leading zero (or {value!r}, if octal was meant)"
    return f"{shortened(word, 30)} is read as {form}, {value!r}, not as written", hint


def _not_finite(word: str) -> bool:
    """A bare JSON word Python's json reads as a number no JSON can hold (or as 0 when it is
    not: below the smallest double)."""
    if word in ("NaN", "Infinity", "-Infinity"):
        return True
    try:
        value = float(word)
    except ValueError:
        return False
    return math.isinf(value) or _underflows(word, value)


def _underflows(digits: str, value: float) -> bool:
    """A literal with a non-zero digit that reads as 0.0 (1e-400)."""
    mantissa = digits.lower().split("e", 1)[0]
    return value == 0.0 and any(c in "123456789" for c in mantissa)


def _long_number(node: yaml.ScalarNode) -> bool:
    return node.tag in (_INT, _FLOAT) and len(node.value) > MAX_NUMBER_CHARS


def _identity(keys: yaml.constructor.SafeConstructor, key: yaml.ScalarNode) -> Any:
    """What the key becomes in the dict: `1`, `0x1` and `1.0` are one key there."""
    if _long_number(key):  # `1:59:59:…` would take quadratic time to convert
        return (key.tag, key.value)
    try:
        value = keys.construct_object(key, deep=True)
        hash(value)
    except Exception:  # refused later, with its line, when the document is built
        return (key.tag, key.value)
    return value


def capped(problems: list[LoadError], shown: str, *, total: int | None = None) -> list[LoadError]:
    """At most MAX_PROBLEMS problems, then one line counting the rest (of `total`, where the
    caller only located the first ones): a file with 10,000 errors must not cost 10,000
    located messages, and nobody reads past the first few."""
    total = len(problems) if total is None else total
    if total <= MAX_PROBLEMS:
        return problems
    rest = total - MAX_PROBLEMS
    return [
        *problems[:MAX_PROBLEMS],
        LoadError(
            shown,
            None,
            None,
            None,
            f"and {rest:,} more problem{'s' if rest > 1 else ''} not listed",
            "fix the ones listed, then check again with `orchctl validate FILE`",
        ),
    ]


def parse_json_document(
    text: str, shown: str, *, tree: bool = True
) -> tuple[Any, yaml.Node | None, list[LoadError]]:
    """Parse JSON with the json module (its numbers and escapes, not YAML's), under the same
    bounds and checks as YAML; `_json_tree` gives the locations (YAML cannot read every JSON
    text: keys over 1,024 characters, escaped lone surrogates).

    `tree=False`: a text that surely stays within the bounds is parsed without its node tree
    first, and returned with None for it when it is clean (the caller builds the tree with
    `json_tree` should it find a problem of its own to locate); a text with any problem takes
    the whole way below, so each problem is the same, and located the same, either way."""
    text = text.removeprefix("\ufeff")  # a byte-order mark some editors write: not content
    if not tree and _within_bounds(text):
        seen = _JsonSeen()
        with contextlib.suppress(json.JSONDecodeError, RecursionError):
            data = seen.loads(text)
            if not seen.problems:
                return data, None, []
    # bounds first, on the tokens: json.loads would build all of 500,000 items before any
    # check could count them
    node, problems = _json_tree(text, shown)
    if problems:  # too deep or too many values, located where the limit was passed
        return None, None, problems
    seen = _JsonSeen()
    try:
        data = seen.loads(text)
    except json.JSONDecodeError as exc:
        return (
            None,
            None,
            [
                LoadError(
                    shown,
                    exc.lineno,
                    exc.colno,
                    None,
                    f"is not valid JSON: {exc.msg}",
                    "check commas, quotes and brackets near this line",
                )
            ],
        )
    except RecursionError:  # the json module's own limit, should the token count miss it
        return None, None, [LoadError(shown, 1, 1, None, *_TOO_DEEP)]
    if seen.problems:
        # a repeated key or a long number: the node tree has them, with their lines
        problems = _check_tree(node, shown, json_text=True) if node is not None else []
        if not problems:
            problems = [LoadError(shown, 1, 1, None, *problem) for problem in seen.problems]
        return None, None, capped(problems, shown)
    return data, node, []


def _within_bounds(text: str) -> bool:
    """Whether `text` surely stays within MAX_DEPTH and MAX_VALUES, counted from above: each
    collection opens with a bracket, and in JSON that json.loads accepts each value but the
    first follows a comma, a colon or an opening bracket (such characters inside strings only
    add to the counts)."""
    opening = text.count("{") + text.count("[")
    return opening <= MAX_DEPTH and opening + text.count(",") + text.count(":") < MAX_VALUES


def json_tree(text: str, shown: str) -> yaml.Node | None:
    """The located node tree of a JSON text that `parse_json_document` accepted."""
    return _json_tree(text.removeprefix("\ufeff"), shown)[0]


class _JsonSeen:
    """Hooks for json.loads collecting what `_check_tree` reports with a location: a key given
    twice (a dict keeps only the last) and numbers too long to convert."""

    def __init__(self) -> None:
        self.problems: list[tuple[str, str]] = []

    def loads(self, text: str) -> Any:
        return json.loads(
            text,
            object_pairs_hook=self.pairs,
            parse_int=self.integer,
            parse_float=self.real,
            parse_constant=self.constant,
        )

    def constant(self, word: str) -> None:
        """NaN, Infinity, -Infinity: Python's json takes them, JSON has no such numbers (and
        a task written back out would say null where the writer meant them)."""
        self.problems.append(_not_a_number(word))

    def pairs(self, pairs: list[tuple[str, Any]]) -> dict[str, Any]:
        data = dict(pairs)
        if len(data) < len(pairs):
            names: set[str] = set()
            for name, _ in pairs:
                if name in names:
                    self.problems.append(_repeated(name, None))
                    break
                names.add(name)
        return data

    def integer(self, digits: str) -> int:
        return int(digits) if self._short_number(digits) else 0

    def real(self, digits: str) -> float:
        if not self._short_number(digits):
            return 0.0
        value = float(digits)
        if math.isinf(value) or _underflows(digits, value):
            # 1e400: beyond a double, so it could only become null; 1e-400: below the
            # smallest one, it would be read as 0, a value the sender never sent
            self.problems.append(_not_a_number(digits))
            return 0.0
        return value

    def _short_number(self, digits: str) -> bool:
        if len(digits) <= MAX_NUMBER_CHARS:
            return True
        self.problems.append(_too_long(len(digits)))
        return False


# strings (unrolled, so linear), punctuation, and the bare words: numbers, true, false, null
_JSON_TOKEN = re.compile(r'"[^"\\]*+(?:\\.[^"\\]*+)*+"|[\[\]{}:,]|[^\s\[\]{}:,"]++')
_JSON_TAGS = {"true": "bool", "false": "bool", "null": "null"}
_YAML_TAG = "tag:yaml.org,2002:"


def _json_tree(text: str, shown: str) -> tuple[yaml.Node | None, list[LoadError]]:
    """The YAML node tree of a JSON text, each node marked with its line and column:
    `loading.locate` and `_check_tree` work on it as on YAML's. Stops, located, at nesting
    deeper than MAX_DEPTH or past MAX_VALUES values, as `_scan` does for YAML. On text that
    is not JSON the tree means nothing (json.loads then says what is wrong)."""
    root: yaml.Node | None = None
    stack: list[tuple[yaml.Node, list[yaml.Node]]] = []  # open collections, a key waiting
    line, line_start, counted_to, values = 0, 0, 0, 0
    for token in _JSON_TOKEN.finditer(text):
        first = token[0][0]
        if first in ",:":
            continue
        start = token.start()
        breaks = text.count("\n", counted_to, start)
        if breaks:  # only this stretch is searched: the scan stays linear on one long line
            line += breaks
            line_start = text.rfind("\n", counted_to, start) + 1
        counted_to = start
        mark = yaml.Mark(shown, start, line, start - line_start, None, None)  # type: ignore[arg-type]
        if first in "]}":
            if not stack:
                return None, []
            done, _ = stack.pop()
            done.end_mark = mark
            node = done
        else:
            values += 1
            if values > MAX_VALUES:
                return None, [_at(shown, mark, *_TOO_MANY)]
            if first in "[{":
                if len(stack) >= MAX_DEPTH:
                    return None, [_at(shown, mark, *_TOO_DEEP)]
                kind = yaml.MappingNode if first == "{" else yaml.SequenceNode
                stack.append((kind(_YAML_TAG + ("map" if first == "{" else "seq"), [], mark), []))
                continue
            node = _json_scalar(token[0], mark, key=_expects_key(stack))
        if not stack:
            root = node
            continue
        parent, waiting = stack[-1]
        if isinstance(parent, yaml.SequenceNode):
            parent.value.append(node)
        elif not waiting:
            waiting.append(node)
        else:
            parent.value.append((waiting.pop(), node))
    return root, []


def _expects_key(stack: list[tuple[yaml.Node, list[yaml.Node]]]) -> bool:
    return bool(stack) and isinstance(stack[-1][0], yaml.MappingNode) and not stack[-1][1]


def _json_scalar(token: str, mark: yaml.Mark, *, key: bool) -> yaml.ScalarNode:
    if token[0] == '"':
        # keys are decoded (they are compared and looked up); values only need their place
        value = token
        if key:
            try:
                value = json.loads(token)
            except ValueError:  # a control character: json.loads will say where, next
                value = token[1:-1]
        return yaml.ScalarNode(_YAML_TAG + "str", value, mark, mark, style='"')
    kind = _JSON_TAGS.get(token) or ("int" if token.lstrip("-").isdigit() else "float")
    return yaml.ScalarNode(_YAML_TAG + kind, token, mark, mark)


def dotted(loc: tuple[Any, ...]) -> str:
    """`pools[0].env.NAME`; a key over 60 characters is shortened (`kkk…kkk`): a field name
    that echoes a 1 MiB key would make every error line as long."""
    text = ""
    for part in loc:
        if isinstance(part, int):
            text += f"[{part}]"
        else:
            name = shortened(str(part), _REPR.maxstring - 3)
            text += f".{name}" if text else name
    return text


def shortened(text: str, limit: int) -> str:
    """`text` itself when it has at most `limit` characters, else its start and end."""
    if len(text) <= limit:
        return text
    half = (limit - 1) // 2
    return f"{text[:half]}…{text[-half:]}"


def some_of(names: Iterable[str], budget: int = 200, each: int = 40) -> str:
    """`'a', 'b', 'c'`: the names quoted, each cut in its middle past `each` characters, as
    many as `budget` characters hold, then `and N more` for the rest (never a cut name)."""
    items = list(names)
    shown: list[str] = []
    used = 0
    for name in items:
        text = repr(shortened(name, each))
        if shown and used + len(text) + 2 > budget:
            break
        shown.append(text)
        used += len(text) + 2
    left = len(items) - len(shown)
    return ", ".join(shown) + (f" and {left} more" if left else "") if items else "none"


def as_written(value: Any) -> str:
    """`value` as YAML and JSON spell it where that differs from Python: null, true, false;
    anything else as `short` shows it."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    return short(value)


def kind_of(value: Any) -> str:
    """What a YAML or JSON reader calls `value`'s type: "a text", "a number", "a list" …"""
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, int | float):
        return "a number"
    if isinstance(value, str):
        return "a text"
    if isinstance(value, list | tuple):
        return "a list"
    if isinstance(value, dict):
        return "a mapping"
    return "a date" if hasattr(value, "isoformat") else f"a {type(value).__name__}"


def short(value: Any) -> str:
    # reprlib bounds depth and length: repr() of a YAML alias bomb would never finish
    return _REPR.repr(value)


_REPR = reprlib.Repr()
_REPR.maxstring = 60
_REPR.maxother = 60
_REPR.maxlevel = 3
