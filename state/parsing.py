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

import json
import re
import reprlib
from dataclasses import dataclass
from typing import Any

import yaml

MAX_DEPTH = 32  # nested mappings and lists; orch.yaml needs 4, a task file 3
MAX_VALUES = 10_000  # keys, values and list items; a 50-pool orch.yaml has about 1,000
MAX_NUMBER_CHARS = 100  # no field takes a longer number; int() refuses 4,300 digits anyway
MAX_PROBLEMS = 20  # problems listed per file; the rest are counted in one last line


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
        problem = exc.problem or exc.context or "invalid syntax"
        return (
            None,
            None,
            [
                _at(
                    shown,
                    mark,
                    f"is not valid YAML/JSON: {problem}",
                    "check indentation, colons and quotes near this line",
                )
            ],
        )
    except yaml.YAMLError as exc:
        return None, None, [LoadError(shown, None, None, None, f"is not valid YAML/JSON: {exc}")]
    return data, node, []


def _at(shown: str, mark: Any, message: str, hint: str, field: str | None = None) -> LoadError:
    line = mark.line + 1 if mark else None
    column = mark.column + 1 if mark else None
    return LoadError(shown, line, column, field, message, hint)


class _Unreadable(yaml.constructor.ConstructorError):
    """A value the parser accepted but no Python value can be built from."""


class _Checked(yaml.constructor.SafeConstructor):
    """SafeConstructor whose failure on one value names that value's line instead of escaping
    as a Python error (`2024-13-01` is a timestamp the calendar refuses)."""

    def construct_object(self, node: yaml.Node, deep: bool = False) -> Any:
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


def _check_tree(root: yaml.Node, shown: str) -> list[LoadError]:
    """What the parser accepts but building a dict would silently lose or choke on: a key
    given twice (the last value would win), a merge key (its keys may be overridden unseen),
    a number too long to convert. Sorted by line, at most MAX_PROBLEMS and a count."""
    keys = yaml.constructor.SafeConstructor()
    problems: list[LoadError] = []
    stack: list[tuple[yaml.Node, tuple[Any, ...]]] = [(root, ())]
    while stack:
        node, loc = stack.pop()
        field = dotted(loc) or None
        if isinstance(node, yaml.ScalarNode):
            if _long_number(node):
                problems.append(_at(shown, node.start_mark, *_too_long(len(node.value)), field))
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


def parse_json_document(text: str, shown: str) -> tuple[Any, yaml.Node | None, list[LoadError]]:
    """Parse JSON with the json module (its numbers and escapes, not YAML's), under the same
    bounds and checks as YAML; the YAML node tree of the same text gives the locations."""
    seen = _JsonSeen()
    try:
        data = json.loads(
            text,
            object_pairs_hook=seen.pairs,
            parse_int=seen.integer,
            parse_float=seen.real,
        )
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
    except RecursionError:  # the json module's own limit, near 1,000 levels
        data, seen.problems = None, [_TOO_DEEP]
    seen.walk(data)
    node, problems = _json_nodes(text, shown)
    if seen.problems:
        # the same problem, located, when the text also reads as YAML; else as found
        if not problems and node is not None:
            problems = _check_tree(node, shown)
        if not problems:
            problems = [_json_at(text, shown, problem) for problem in seen.problems]
        return None, None, capped(problems, shown)
    return data, node, []


def _json_nodes(text: str, shown: str) -> tuple[yaml.Node | None, list[LoadError]]:
    """The YAML node tree of a JSON text, for locations; None where YAML reads it otherwise."""
    try:
        problems = _scan(text, shown)
        if problems:
            return None, problems
        loader = _Loader(text)
        try:
            return loader.get_single_node(), []
        finally:
            loader.dispose()
    except yaml.YAMLError:
        return None, []


class _JsonSeen:
    """Hooks for json.loads, and a bounded walk of its result, collecting what YAML's
    `_scan` and `_check_tree` would refuse (as messages without a location)."""

    def __init__(self) -> None:
        self.problems: list[tuple[str, str]] = []

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
        return float(digits) if self._short_number(digits) else 0.0

    def _short_number(self, digits: str) -> bool:
        if len(digits) <= MAX_NUMBER_CHARS:
            return True
        self.problems.append(_too_long(len(digits)))
        return False

    def walk(self, data: Any) -> None:
        """Depth and size; stops at MAX_VALUES values, so it is bounded too."""
        stack: list[tuple[Any, int]] = [(data, 0)]
        values = 0
        while stack and not self.problems:
            value, depth = stack.pop()
            values += 1
            if values > MAX_VALUES:
                self.problems.append(_TOO_MANY)
            elif isinstance(value, dict | list) and depth >= MAX_DEPTH:
                self.problems.append(_TOO_DEEP)
            elif isinstance(value, dict):
                stack.extend((k, depth + 1) for k in value)
                stack.extend((v, depth + 1) for v in value.values())
            elif isinstance(value, list):
                stack.extend((v, depth + 1) for v in value)


_JSON_TOKEN = re.compile(r'"(?:[^"\\]|\\.)*+"|[\[\]{}]')


def _json_at(text: str, shown: str, problem: tuple[str, str]) -> LoadError:
    """Locate a JSON problem the YAML reading could not; only depth can be found in the text:
    the bracket one level too deep. The strings scanned before it are ones json.loads already
    read, so the scan is linear and stops there."""
    offset: int | None = None
    if problem == _TOO_DEEP:
        depth = 0
        for token in _JSON_TOKEN.finditer(text):
            if token[0] in "[{":
                depth += 1
                if depth > MAX_DEPTH:
                    offset = token.start()
                    break
            elif token[0] in "]}":
                depth -= 1
    if offset is None:
        return LoadError(shown, None, None, None, *problem)
    line = text.count("\n", 0, offset) + 1
    return LoadError(shown, line, offset - text.rfind("\n", 0, offset), None, *problem)


def dotted(loc: tuple[Any, ...]) -> str:
    text = ""
    for part in loc:
        if isinstance(part, int):
            text += f"[{part}]"
        else:
            text += f".{part}" if text else str(part)
    return text


def short(value: Any) -> str:
    # reprlib bounds depth and length: repr() of a YAML alias bomb would never finish
    return _REPR.repr(value)


_REPR = reprlib.Repr()
_REPR.maxstring = 60
_REPR.maxother = 60
_REPR.maxlevel = 3
