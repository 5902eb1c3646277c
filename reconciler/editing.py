"""Editing orch.yaml the way a careful person would: one value changed in place, every comment,
key order, quote style, flow mapping and indentation kept, so `git diff` shows only that line.

`reloading` calls `set_pool_model` and `set_model_ref` for POST /v1/pools/{id}/reload. The text
goes through ruamel.yaml in round-trip mode. ruamel keeps comments and styles but writes one
indentation for the whole file, so the edit is dumped with each common layout in turn (2 or 4
spaces, list dashes flush or indented) and the first dump in which no line changed except the
one that carries the new value is the answer. A file that no layout reproduces (mixed
indentation, CRLF line ends, tabs) is refused with `EditRefused` rather than reformatted.
An orch.yaml written as JSON is edited as JSON, in the layout json.dumps gave it.
Pure: text in, text out.
"""

from __future__ import annotations

import io
import json
from collections.abc import Callable
from typing import Any

from ruamel.yaml import YAML
from ruamel.yaml.error import YAMLError
from ruamel.yaml.scalarstring import ScalarString

# (mapping indent, sequence indent, dash offset), the most common first
_LAYOUTS: tuple[tuple[int, int, int], ...] = tuple(
    dict.fromkeys(
        (mapping, offset + gap, offset)
        for mapping in (2, 4, 3)
        for offset in (2, 0, mapping)
        for gap in (2, mapping)  # "- key" or "-   key"
    )
)


class EditRefused(Exception):
    """The edit cannot be made without changing more of the file than the one value."""


def set_pool_model(text: str, pool_id: str, model_id: str) -> str:
    """`text` with pool `pool_id`'s `model:` set to `model_id` (unchanged if it is already)."""

    def change(data: Any) -> list[str]:
        pool = _pool(data, pool_id)
        if "model" not in pool:
            raise EditRefused(f"pool {pool_id!r} has no model: key to change")
        if pool["model"] == model_id:
            return []
        pool["model"] = _like(pool["model"], model_id)
        return [model_id]

    return _edit(text, change)


def set_model_ref(text: str, model_id: str, ref: str) -> str:
    """`text` with `models.<model_id>.ref` set to `ref` (unchanged if it is already)."""

    def change(data: Any) -> list[str]:
        models: Any = data.get("models") if hasattr(data, "get") else None
        model: Any = models.get(model_id) if hasattr(models, "get") else None
        if not hasattr(model, "get") or "ref" not in model:
            raise EditRefused(f"orch.yaml has no models.{model_id}.ref to change")
        if model["ref"] == ref:
            return []
        model["ref"] = _like(model["ref"], ref)
        return [ref]

    return _edit(text, change)


def _pool(data: Any, pool_id: str) -> Any:
    pools = data.get("pools") if hasattr(data, "get") else None
    for pool in pools if isinstance(pools, list) else ():
        if hasattr(pool, "get") and pool.get("id") == pool_id:
            return pool
    raise EditRefused(f"orch.yaml has no pool {pool_id!r}")


def _like(old: Any, new: str) -> Any:
    """`new` in the quote style of `old` ("…", '…', or plain)."""
    return type(old)(new) if isinstance(old, ScalarString) else new


def _edit(text: str, change: Callable[[Any], list[str]]) -> str:
    if text.lstrip().startswith("{") and _json(text) is not None:
        return _edit_json(text, change)  # JSON (YAML's subset): its own layouts, not YAML's
    for mapping, sequence, offset in _LAYOUTS:
        yaml = YAML(typ="rt")
        yaml.preserve_quotes = True
        yaml.width = 4096  # never fold a long line
        yaml.indent(mapping=mapping, sequence=sequence, offset=offset)
        yaml.explicit_start = text.startswith("---")
        try:
            data = yaml.load(text)
        except YAMLError as exc:
            raise EditRefused(f"orch.yaml cannot be read for editing: {exc}") from None
        values = change(data)
        if not values:
            return text
        out = io.StringIO()
        yaml.dump(data, out)
        if _only_lines_with(text, out.getvalue(), values):
            return out.getvalue()
    raise EditRefused(
        "orch.yaml's layout (its indentation or line ends) cannot be kept by an automatic "
        "edit, so it was left as it is; make the change by hand"
    )


def _edit_json(text: str, change: Callable[[Any], list[str]]) -> str:
    """The edit of an orch.yaml written as JSON, in the layout it was written in (as
    json.dumps writes it: indented by 2 or 4 spaces or a tab, or on one line)."""
    data = _json(text)
    trail = text[len(text.rstrip()) :]
    for indent in (2, 4, "\t", None):
        for ascii_only in (False, True):
            if json.dumps(data, indent=indent, ensure_ascii=ascii_only) + trail != text:
                continue
            values = change(data)
            if not values:
                return text
            return json.dumps(data, indent=indent, ensure_ascii=ascii_only) + trail
    raise EditRefused(
        "orch.yaml is JSON in a layout an automatic edit cannot keep (not as json.dumps "
        "writes it, indented by 2 or 4 spaces, a tab, or on one line), so it was left as it "
        "is; make the change by hand"
    )


def _json(text: str) -> Any:
    try:
        return json.loads(text)
    except ValueError:
        return None


def _only_lines_with(old: str, new: str, values: list[str]) -> bool:
    """True when `new` differs from `old` in exactly one line per value, each holding it."""
    before, after = old.splitlines(keepends=True), new.splitlines(keepends=True)
    if len(before) != len(after):
        return False
    changed = [i for i, (a, b) in enumerate(zip(before, after, strict=True)) if a != b]
    return len(changed) == len(values) and all(
        any(spelled in after[i] for v in values for spelled in _spellings(v)) for i in changed
    )


def _spellings(value: str) -> set[str]:
    """How `value` may appear on its line: as is (plain), escaped in double quotes, or with
    its quotes doubled in single quotes."""
    return {value, json.dumps(value, ensure_ascii=False)[1:-1], value.replace("'", "''")}
