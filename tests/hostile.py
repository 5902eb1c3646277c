"""Hostile inputs for the loaders and the daemon: hypothesis strategies and hand-picked cases.

Used by tests/test_hostile_suite.py (and open to any test that wants a bad file). Three kinds of
file are attacked, each from a good example outward, so most inputs get past the first check
and reach the deeper ones:

- task files (`task_files`): a good task with hostile values in its fields (path tricks in
  every id, huge strings and keys, NULs, look-alikes), or its text cut, spliced with hostile
  fragments (NUL, BOM, bytes that are not UTF-8, anchors and aliases, `!!python/object` tags,
  repeated keys, deep nesting, long numbers), or raw bytes;
- orch.yaml edits (`config_files`) and inventories (`inventory_files`), the same way;
- names for entries in spool/incoming/ (`entry_names`): `../`, NUL-free control characters,
  bytes that are not UTF-8, very long names, look-alikes.

`HAND_PICKED` holds the cases a person writes first (billion laughs, a 1 MiB key, a BOM, …);
`Tally` counts what a run tried and what went wrong, for the proof summary line.

`ORCH_PROOF=1` raises the number of generated examples (`examples`) for `make proof`.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from typing import Any

import yaml
from hypothesis import strategies as st

PROOF = os.environ.get("ORCH_PROOF", "") not in ("", "0")


def examples(fast: int, proof: int) -> int:
    """Examples per property: `fast` in `make test`, `proof` under ORCH_PROOF=1."""
    return proof if PROOF else fast


# -- the good files every mutation starts from -------------------------------------------------

GOOD_TASK: dict[str, Any] = {
    "task_id": "good-1",
    "session_id": "s-1",
    "model": "m1",
    "prompt": "hello there",
    "max_tokens": 4,
    "seed": 7,
    "priority": "batch",
    "sampling": {"temperature": 0.0, "top_p": 1.0},
    "placement": {"mode": "auto"},
    "labels": {"team": "a"},
}

GOOD_INVENTORY: dict[str, Any] = {
    "gpus": [
        {"index": 0, "name": "NVIDIA GeForce RTX 3090", "uuid": "GPU-0", "vram_total_mib": 24576},
        {"index": 1, "name": "NVIDIA GeForce RTX 3060", "uuid": "GPU-1", "vram_total_mib": 12288},
    ]
}


def good_config() -> dict[str, Any]:
    from tests.conftest import config  # the same desired state the daemon tests serve

    return config()


# -- hostile pieces ------------------------------------------------------------------------------

# ids become file names (results/<id>.json, .orch/sessions/<id>.json): every trick a path has
PATH_TRICKS = [
    "../x",
    "../../../../etc/passwd",
    "/etc/passwd",
    "/tmp/escape",
    "a/b",
    "a\\b",
    "..",
    ".",
    "",
    "a\x00b",
    "x\n",
    "\nx",
    "a b",
    "-rf",
    ".hidden",
    "x" * 129,
    "x" * 5000,
    "tаsk",  # a Cyrillic а
    "ｔａｓｋ",  # full-width letters
    "task\u202egpj",  # right-to-left override
    "task\u200b",  # zero-width space
    "con",
    "x:y",
    "~/x",
    "$HOME",
    "%2e%2e%2fx",
    "..\u2215x",  # division slash
    "a" * 128,  # the longest id allowed: fine
]

_LOOKALIKES = "аеорсхуіј０１ａｂ\u2024\u2215\u2044\uff0e\uff0f"

# text spliced into a good file at a random place
FRAGMENTS: list[bytes] = [
    b"\x00",
    b"\xef\xbb\xbf",  # a UTF-8 BOM
    b"\xff\xfe",  # a UTF-16 BOM: not UTF-8
    b"\xc0\xaf",  # an overlong '/'
    b"\xed\xa0\x80",  # an encoded surrogate
    b"\x01\x7f\x1b[31m",
    "\u0085\u2028\u2029\ufeff\ufffe".encode(),
    b"\r",
    b"\t",
    b"\n---\n",
    b"\n...\n",
    b"%YAML 1.1\n---\n",
    b"&a ",
    b"*a",
    b"<<: *a\n",
    b"<<: {a: 1}\n",
    b"!!python/object/apply:os.system ['touch /tmp/pwned']",
    b"!!python/object:__main__.X {}",
    b"!!python/name:os.system",
    b"!!binary AAAA",
    b"!!set {a, b}",
    b"!!timestamp 2024-13-45",
    b"!custom x",
    b"2024-13-45",
    b"9" * 200,
    b"1e99999",
    b"0x" + b"f" * 150,
    b".nan",
    b"NaN",
    b"Infinity",
    b"[" * 40,
    b"{" * 40,
    b"]" * 40,
    b"[" * 2000 + b"]" * 2000,
    b"? [a, b]\n: 1\n",
    b"task_id: again\n",
    b'"task_id": "again",',
    b"model: m1\n",
    b"x" * 70_000,
    b"\\u0000",
    b"\\ud800",
    b'"',
    b"'",
    b"#",
    b": ",
    b"- ",
]

HUGE_KEY = "k" * 900_000


def billion_laughs(levels: int = 9) -> bytes:
    lines = ['a0: &a0 ["lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol"]']
    for i in range(1, levels):
        refs = ", ".join([f"*a{i - 1}"] * 9)
        lines.append(f"a{i}: &a{i} [{refs}]")
    lines += ["model: m1", f"prompt: *a{levels - 1}", "max_tokens: 1"]
    return ("\n".join(lines) + "\n").encode()


def _yaml(data: Any) -> bytes:
    return yaml.safe_dump(data, sort_keys=False, allow_unicode=True).encode()


def _task_text(**changes: Any) -> bytes:
    return _yaml({**GOOD_TASK, **changes})


# name → bytes: the cases a person writes first; each must be refused with a clear error
HAND_PICKED: dict[str, bytes] = {
    "laughs.task.yaml": billion_laughs(),
    "laughs-keys.task.yaml": b"a: &a {x: 1}\nb: {<<: *a, model: m1}\n",
    "python-object.task.yaml": b"model: m1\nprompt: !!python/object/apply:os.system ['true']\n",
    "python-name.task.yaml": b"!!python/name:os.system\n",
    "nul.task.yaml": b"model: m1\nprompt: a\x00b\nmax_tokens: 1\n",
    "nul.task.json": b'{"model": "m1", "prompt": "a\x00b", "max_tokens": 1}',
    "control.task.yaml": b"model: m1\nprompt: a\x1bb\nmax_tokens: 1\n",
    "nonchar.task.yaml": "model: m1\nprompt: a\ufffeb\nmax_tokens: 1\n".encode(),
    "latin1.task.yaml": "model: m1\nprompt: café\nmax_tokens: 1\n".encode("latin-1"),
    "utf16.task.yaml": "model: m1\nprompt: a\nmax_tokens: 1\n".encode("utf-16"),
    "truncated.task.json": b'{"model": "m1", "prompt": "hel',
    "truncated.task.yaml": b'model: m1\nprompt: "hel',
    "twice.task.yaml": b"task_id: a\nmodel: m1\nprompt: hi\nmax_tokens: 1\ntask_id: b\n",
    "twice.task.json": b'{"model": "m1", "prompt": "hi", "max_tokens": 1, "max_tokens": 2}',
    "deep.task.json": b"[" * 5000 + b"]" * 5000,
    "deep.task.yaml": b"prompt: " + b"{a: " * 500 + b"1" + b"}" * 500 + b"\n",
    "long-number.task.yaml": b"model: m1\nprompt: hi\nmax_tokens: " + b"9" * 5000 + b"\n",
    "huge-key.task.yaml": b"model: m1\nprompt: hi\nmax_tokens: 1\n" + HUGE_KEY.encode() + b": 1\n",
    "huge-key.task.json": json.dumps({"model": "m1", "max_tokens": 1, HUGE_KEY: 1}).encode(),
    "huge-label.task.json": json.dumps(
        {"model": "m1", "prompt": "hi", "max_tokens": 1, "labels": {HUGE_KEY: "v"}}
    ).encode(),
    "huge-prompt.task.yaml": b"model: m1\nmax_tokens: 1\nprompt: " + b"x" * 1_000_000 + b"\n",
    "too-big.task.yaml": b"model: m1\nmax_tokens: 1\nprompt: " + b"x" * (1 << 21) + b"\n",
    "many-keys.task.yaml": b"".join(b"k%d: 1\n" % i for i in range(20_000)),
    "lone-surrogate.task.json": b'{"model": "m1", "prompt": "\\ud800", "max_tokens": 1}',
    "nan.task.json": b'{"model": "m1", "prompt": "hi", "max_tokens": NaN}',
    "bad-date.task.yaml": b"model: m1\nprompt: hi\nmax_tokens: 1\nseed: 2024-13-45\n",
    "two-documents.task.yaml": b"model: m1\n---\nmodel: m2\n",
    "unhashable-key.task.yaml": b"? [a, b]\n: 1\nmodel: m1\n",
    "empty.task.yaml": b"",
    "list.task.json": b"[1, 2, 3]",
    "id-dotdot.task.yaml": _task_text(task_id="../../escape"),
    "id-absolute.task.yaml": _task_text(task_id="/tmp/escape"),
    "id-lookalike.task.yaml": _task_text(task_id="tаsk"),
    "id-long.task.yaml": _task_text(task_id="x" * 300),
    "id-newline.task.yaml": _task_text(task_id="x\n"),
    "session-escape.task.yaml": _task_text(session_id="../../escape"),
    "pin-escape.task.yaml": _task_text(placement={"mode": "pin", "pin_pool": "../p1"}),
}

# a good file's text, cut: every prefix shorter than the whole is a truncated read
TRUNCATE_AT = (1, 7, 20, 45, 80)


# -- strategies ------------------------------------------------------------------------------------


def hostile_text() -> st.SearchStrategy[str]:
    """Strings a field may be given: path tricks, look-alikes, controls, huge ones."""
    return st.one_of(
        st.sampled_from(PATH_TRICKS),
        st.text(alphabet=st.sampled_from("a.-_/\\\x00\n " + _LOOKALIKES), max_size=40),
        st.text(max_size=30),
        st.integers(min_value=1, max_value=300_000).map(lambda n: "y" * n),
    )


_scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(),
    st.floats(allow_nan=True, allow_infinity=True),
    hostile_text(),
)


def _values() -> st.SearchStrategy[Any]:
    return st.recursive(
        _scalars,
        lambda inner: (
            st.lists(inner, max_size=4) | st.dictionaries(hostile_text(), inner, max_size=4)
        ),
        max_leaves=12,
    )


def _documents(good: dict[str, Any], paths: list[tuple[Any, ...]]) -> st.SearchStrategy[Any]:
    """`good` with hostile values at some of `paths`, and perhaps hostile extra keys."""

    @st.composite
    def build(draw: st.DrawFn) -> Any:
        doc = json.loads(json.dumps(good))
        for path in draw(st.lists(st.sampled_from(paths), max_size=3)):
            _set(doc, path, draw(st.one_of(hostile_text(), _values())))
        if draw(st.booleans()):
            doc[draw(hostile_text())] = draw(_values())
        return doc

    return build()


def _set(doc: Any, path: tuple[Any, ...], value: Any) -> None:
    """Put `value` at `path`, where an earlier change has not already replaced the way there."""
    for part in path[:-1]:
        try:
            doc = doc[part]
        except (KeyError, IndexError, TypeError):
            return
    if isinstance(doc, dict) or (
        isinstance(doc, list) and isinstance(path[-1], int) and path[-1] < len(doc)
    ):
        doc[path[-1]] = value


def _serialized(documents: st.SearchStrategy[Any]) -> st.SearchStrategy[bytes]:
    def dump(doc: Any, as_json: bool) -> bytes:
        if as_json:
            return json.dumps(doc, ensure_ascii=False).encode("utf-8", "surrogatepass")
        try:
            return yaml.safe_dump(doc, allow_unicode=True).encode("utf-8", "surrogatepass")
        except yaml.YAMLError:  # a float key YAML cannot write: JSON can
            return json.dumps(doc).encode()

    return st.builds(dump, documents, st.booleans())


@st.composite
def _spliced(draw: st.DrawFn, goods: st.SearchStrategy[bytes]) -> bytes:
    """A good text cut short, or with hostile fragments put in (or put over) at random places."""
    text = draw(goods)
    if draw(st.integers(0, 4)) == 0:
        return text[: draw(st.integers(0, max(0, len(text) - 1)))]
    for _ in range(draw(st.integers(1, 3))):
        at = draw(st.integers(0, len(text)))
        cut = draw(st.integers(0, 3))
        piece = draw(st.sampled_from(FRAGMENTS) | st.binary(max_size=8))
        text = text[:at] + piece + text[at + cut :]
    return text


_TASK_PATHS: list[tuple[Any, ...]] = [
    ("task_id",),
    ("session_id",),
    ("model",),
    ("prompt",),
    ("max_tokens",),
    ("seed",),
    ("priority",),
    ("sampling", "temperature"),
    ("placement",),
    ("placement", "mode"),
    ("labels",),
    ("labels", "team"),
]


def task_files() -> st.SearchStrategy[bytes]:
    """Bytes of a task file: mostly a good task gone bad in one of the ways above."""
    documents = _serialized(_documents(GOOD_TASK, _TASK_PATHS))
    return st.one_of(
        documents,
        _spliced(st.sampled_from([_yaml(GOOD_TASK), json.dumps(GOOD_TASK).encode()]) | documents),
        st.sampled_from(list(HAND_PICKED.values())),
        st.binary(max_size=200),
    )


_CONFIG_PATHS: list[tuple[Any, ...]] = [
    ("version",),
    ("server",),
    ("server", "bind"),
    ("paths",),
    ("gpus", "inventory"),
    ("gpus", "reserve_mib"),
    ("queue", "capacity"),
    ("queue", "full_policy"),
    ("models",),
    ("models", "m1", "ref"),
    ("models", "m1", "size_mib"),
    ("pools", 0, "id"),
    ("pools", 0, "model"),
    ("pools", 0, "devices"),
    ("pools", 0, "replicas"),
    ("pools", 0, "env"),
    ("pools", 0, "flags"),
    ("pools", 0, "sim"),
]


def config_files() -> st.SearchStrategy[bytes]:
    """Bytes of an orch.yaml edit: the tests' good config gone bad."""
    good = good_config()
    documents = _serialized(_documents(good, _CONFIG_PATHS))
    hostile_ids = st.builds(config_with, pool_id=hostile_text(), model_id=hostile_text())
    return st.one_of(
        documents,
        hostile_ids,
        _spliced(st.just(_yaml(good)) | documents),
        st.sampled_from(list(CONFIG_HAND_PICKED.values())),
    )


def config_with(*, pool_id: str, model_id: str) -> bytes:
    """The tests' good config with its pool and model renamed."""
    good = good_config()
    return _yaml(
        {
            **good,
            "models": {model_id: good["models"]["m1"]},
            "pools": [{**good["pools"][0], "id": pool_id, "model": model_id}],
        }
    )


_INVENTORY_PATHS: list[tuple[Any, ...]] = [
    ("gpus",),
    ("gpus", 0),
    ("gpus", 0, "index"),
    ("gpus", 0, "name"),
    ("gpus", 0, "uuid"),
    ("gpus", 0, "vram_total_mib"),
    ("gpus", 1, "index"),
]


def inventory_files() -> st.SearchStrategy[bytes]:
    documents = _serialized(_documents(GOOD_INVENTORY, _INVENTORY_PATHS))
    return st.one_of(documents, _spliced(st.just(_yaml(GOOD_INVENTORY)) | documents))


def entry_names() -> st.SearchStrategy[bytes]:
    """Names (as bytes: a file name need not be UTF-8) for entries in spool/incoming/; never
    with '/' or NUL, which no file name can hold: those tricks are tried on ids instead."""
    parts = st.sampled_from(
        [b"..", b".", b"x", b"-", b"\n", b"\x1b", b"\xe9", b"\xff", "а".encode(), b" ", b"~"]
    )
    stems = st.one_of(
        st.lists(parts, min_size=1, max_size=6).map(b"".join),
        st.integers(150, 250).map(lambda n: b"n" * n),
        st.sampled_from([t.encode() for t in PATH_TRICKS if t and "/" not in t and "\0" not in t]),
    )
    suffixes = st.sampled_from([b".task.yaml", b".task.json", b".task.yml", b".yaml", b""])
    return st.builds(lambda s, x: (s + x)[:255], stems, suffixes).filter(
        lambda n: n not in (b"", b".", b"..")
    )


CONFIG_HAND_PICKED: dict[str, bytes] = {
    "laughs": billion_laughs().replace(b"model: m1\n", b"version: 1\n"),
    "python-object": b"version: 1\nserver: !!python/object/apply:os.system ['true']\n",
    "nul": b"version: 1\nmodels: {}\x00\n",
    "bom": b"\xef\xbb\xbfversion: 1\npools: []\n",
    "not-utf8": b"version: 1\nmodels: {caf\xe9: {ref: 'file:x'}}\n",
    "twice": b"version: 1\npools: []\npools: []\n",
    "deep": b"version: 1\nserver: " + b"[" * 3000 + b"]" * 3000 + b"\n",
    "huge-key": b"version: 1\n" + HUGE_KEY.encode() + b": 1\n",
    "pool-escape": b"version: 1\npools: [{id: ../../p, model: m1, engine: sim}]\n",
    "model-escape": b"version: 1\nmodels: {'../m': {ref: 'file:m.gguf'}}\n",
}


# -- counting, for the proof summary line -------------------------------------------------------


@dataclass
class Tally:
    """Inputs tried, crashes (an exception no caller expects, a daemon that stopped) and
    unclear errors (no file, line or hint where one is due, or an unbounded message)."""

    tried: int = 0
    crashes: list[str] = field(default_factory=list)
    unclear: list[str] = field(default_factory=list)
    slowest_s: float = 0.0

    def line(self) -> str:
        return (
            f"hostile-input suite: {self.tried} inputs tried, {len(self.crashes)} crashes, "
            f"{len(self.unclear)} unclear errors, slowest {self.slowest_s * 1000:.0f} ms"
            + (" (ORCH_PROOF=1)" if PROOF else "")
        )


TALLY = Tally()
