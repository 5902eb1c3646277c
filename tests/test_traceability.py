"""requirements/home_profile.yaml stays true: every HME requirement of the home-profile overlay
has an entry, every entry's proofs exist, and docs/traceability.md shows the current table.

- ids are unique, well formed (HME-0xx) and numbered as the spec numbers them: within each
  section (the tens digit) 1, 2, 3… for H1 and x0, x1, x2… for the others, without a gap;
- a `built` or `partial` entry cites at least one proof, and a `partial` or `not_built` one
  has notes saying what is missing;
- a proof is a pytest node id (`tests/test_x.py::test_name`, `::TestClass::test_name`,
  parameters in `[...]` ignored) naming a test function or class found by `ast` in that
  file, or a behave reference (`features/x.feature: Scenario name`) naming a `Scenario:` or
  `Scenario Outline:` of that file;
- when the spec is on this machine (shared/reference/home-profile-overlay.md beside the
  repository), its ids and the file's are the same set. CI has only the repository: then that
  one check is skipped, with the reason.

After editing the YAML, rewrite the table in docs/traceability.md with
`.venv/bin/python -m tests.test_traceability`.
"""

from __future__ import annotations

import ast
import re
import sys
from collections import Counter
from functools import cache
from pathlib import Path
from typing import Any

import pytest
import yaml

ROOT = Path(__file__).resolve().parent.parent
REQUIREMENTS = ROOT / "requirements" / "home_profile.yaml"
DOC = ROOT / "docs" / "traceability.md"
SPEC_NAME = Path("shared") / "reference" / "home-profile-overlay.md"
SPEC_CANDIDATES = (Path("/work") / SPEC_NAME, ROOT.parent / SPEC_NAME)
STATUSES = ("built", "partial", "not_built")
KEYS = {"id", "text", "status", "proofs", "notes"}
ID = re.compile(r"HME-0(\d)(\d)")
SPEC_ID = re.compile(r"\[(HME-\d+)\]")
SCENARIO = re.compile(r"^\s*Scenario(?: Outline)?:\s*(.+?)\s*$")
TABLE_START = "<!-- table: generated from requirements/home_profile.yaml -->"
TABLE_END = "<!-- end of table -->"


def load() -> list[dict[str, Any]]:
    data = yaml.safe_load(REQUIREMENTS.read_text(encoding="utf-8"))
    assert isinstance(data, dict) and isinstance(data.get("requirements"), list), (
        f"{REQUIREMENTS.relative_to(ROOT)} must be a mapping with a `requirements:` list"
    )
    return data["requirements"]


@pytest.fixture(scope="module")
def entries() -> list[dict[str, Any]]:
    return load()


def test_every_entry_has_its_fields_and_a_known_status(entries: list[dict[str, Any]]) -> None:
    problems = []
    for n, entry in enumerate(entries):
        name = entry.get("id", f"entry {n + 1}") if isinstance(entry, dict) else f"entry {n + 1}"
        if not isinstance(entry, dict):
            problems.append(f"{name}: not a mapping")
            continue
        if missing := {"id", "text", "status", "proofs"} - entry.keys():
            problems.append(f"{name}: missing {sorted(missing)}")
        if unknown := entry.keys() - KEYS:
            problems.append(f"{name}: unknown keys {sorted(unknown)}")
        if not isinstance(entry.get("text"), str) or not entry.get("text", "").strip():
            problems.append(f"{name}: `text` must be the requirement's text")
        if entry.get("status") not in STATUSES:
            problems.append(f"{name}: status {entry.get('status')!r} is not one of {STATUSES}")
        proofs = entry.get("proofs")
        if not isinstance(proofs, list) or not all(isinstance(p, str) for p in proofs):
            problems.append(f"{name}: `proofs` must be a list of strings")
    assert not problems, "\n".join(problems)


def test_ids_are_unique_well_formed_and_numbered_as_the_spec_numbers_them(
    entries: list[dict[str, Any]],
) -> None:
    ids = [str(e.get("id")) for e in entries]
    assert not (twice := [i for i, c in Counter(ids).items() if c > 1]), f"listed twice: {twice}"
    assert not (bad := [i for i in ids if not ID.fullmatch(i)]), f"not HME-0xx: {bad}"
    assert ids == sorted(ids), "list the requirements in the spec's order (by id)"
    sections: dict[int, list[int]] = {}
    for i in ids:
        match = ID.fullmatch(i)
        assert match
        sections.setdefault(int(match[1]), []).append(int(match[2]))
    for tens, units in sections.items():
        first = 1 if tens == 0 else 0  # H1 starts at HME-001, the others at HME-0x0
        expected = list(range(first, first + len(units)))
        assert units == expected, (
            f"section HME-0{tens}x is numbered {units}, the spec numbers it {expected}: "
            "an id is missing or mistyped"
        )


def test_built_and_partial_entries_cite_a_proof_and_the_others_say_what_is_missing(
    entries: list[dict[str, Any]],
) -> None:
    problems = []
    for entry in entries:
        if entry["status"] != "not_built" and not entry["proofs"]:
            problems.append(f"{entry['id']} is {entry['status']} but cites no proof")
        if entry["status"] != "built" and not str(entry.get("notes") or "").strip():
            problems.append(f"{entry['id']} is {entry['status']}: say what is missing in notes")
    assert not problems, "\n".join(problems)


def test_every_proof_names_a_test_or_scenario_that_exists(entries: list[dict[str, Any]]) -> None:
    problems = [
        f"{entry['id']}: {proof!r}: {why}"
        for entry in entries
        for proof in entry["proofs"]
        if (why := proof_problem(proof))
    ]
    assert not problems, "\n".join(problems)


def test_the_proof_checker_refuses_what_does_not_exist() -> None:
    this = "tests/test_traceability.py"
    assert proof_problem(f"{this}::test_the_proof_checker_refuses_what_does_not_exist") is None
    assert proof_problem(f"{this}::test_the_proof_checker_refuses_what_does_not_exist[x-1]") is None
    assert "no test" in str(proof_problem(f"{this}::test_that_was_never_written"))
    assert "no test" in str(proof_problem(f"{this}::load"))  # a helper is not a test
    assert "no such file" in str(proof_problem("tests/test_gone.py::test_x"))
    assert "no scenario" in str(proof_problem("features/cancel.feature: Canceling nothing"))
    assert "neither" in str(proof_problem("tests/test_traceability.py"))


def test_the_spec_and_the_file_list_the_same_ids(entries: list[dict[str, Any]]) -> None:
    spec = next((p for p in SPEC_CANDIDATES if p.is_file()), None)
    if spec is None:
        pytest.skip(
            "the home-profile overlay is not on this machine (looked for "
            + ", ".join(str(p) for p in SPEC_CANDIDATES)
            + "): the ids are checked against the spec only where it is"
        )
    in_spec = set(SPEC_ID.findall(spec.read_text(encoding="utf-8")))
    listed = {str(e["id"]) for e in entries}
    assert in_spec, f"{spec} names no [HME-…] requirement: has its format changed?"
    assert not (missing := sorted(in_spec - listed)), f"in {spec} but not in the file: {missing}"
    assert not (extra := sorted(listed - in_spec)), f"in the file but not in {spec}: {extra}"


def test_the_table_in_the_docs_is_the_table_of_the_file(entries: list[dict[str, Any]]) -> None:
    assert table_in_doc(DOC.read_text(encoding="utf-8")) == table(entries), (
        "docs/traceability.md's table is out of date: "
        "run `.venv/bin/python -m tests.test_traceability` to rewrite it"
    )


# -- proofs ----------------------------------------------------------------------------------


def proof_problem(proof: str) -> str | None:
    """Why `proof` names nothing that exists, or None when it does."""
    if "::" in proof:
        path, *names = proof.split("::")
        if not path.endswith(".py"):
            return "a pytest node id names a .py file"
        if not (ROOT / path).is_file():
            return f"no such file {path}"
        names[-1] = names[-1].split("[", 1)[0]  # parametrized: test_x[case]
        if tuple(names) not in collected_in(path):
            return f"no test {'::'.join(names)} in {path}"
        return None
    if ": " in proof:
        path, name = proof.split(": ", 1)
        if not path.endswith(".feature"):
            return "a behave reference names a .feature file"
        if not (ROOT / path).is_file():
            return f"no such file {path}"
        if name.strip() not in scenarios_in(path):
            return f"no scenario {name.strip()!r} in {path}"
        return None
    return "neither `tests/x.py::test_name` nor `features/x.feature: Scenario name`"


@cache
def collected_in(path: str) -> frozenset[tuple[str, ...]]:
    """The node names pytest collects from `path`: test functions, Test classes and their test
    methods, found on the source without importing it."""
    tree = ast.parse((ROOT / path).read_text(encoding="utf-8"))
    found: set[tuple[str, ...]] = set()
    for node in tree.body:
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef) and node.name.startswith(
            "test"
        ):
            found.add((node.name,))
        elif isinstance(node, ast.ClassDef) and node.name.startswith("Test"):
            found.add((node.name,))
            for item in node.body:
                if isinstance(item, ast.FunctionDef | ast.AsyncFunctionDef) and (
                    item.name.startswith("test")
                ):
                    found.add((node.name, item.name))
    return frozenset(found)


@cache
def scenarios_in(path: str) -> frozenset[str]:
    lines = (ROOT / path).read_text(encoding="utf-8").splitlines()
    return frozenset(m[1] for line in lines if (m := SCENARIO.match(line)))


# -- the table in docs/traceability.md -------------------------------------------------------


def table(entries: list[dict[str, Any]]) -> str:
    counts = Counter(str(e["status"]) for e in entries)
    rows = [
        "| id | status | proofs |",
        "|---|---|---|",
        *(f"| {e['id']} | {e['status']} | {len(e['proofs'])} |" for e in entries),
    ]
    summary = ", ".join(f"{counts[s]} {s}" for s in STATUSES)
    return "\n".join([*rows, "", f"{len(entries)} requirements: {summary}."])


def table_in_doc(text: str) -> str:
    start, end = text.find(TABLE_START), text.find(TABLE_END)
    assert 0 <= start < end, f"docs/traceability.md lacks the markers {TABLE_START} … {TABLE_END}"
    return text[start + len(TABLE_START) : end].strip()


def write_table() -> None:
    text = DOC.read_text(encoding="utf-8")
    old = table_in_doc(text)
    start = text.find(TABLE_START) + len(TABLE_START)
    end = text.find(TABLE_END)
    DOC.write_text(text[:start] + "\n" + table(load()) + "\n" + text[end:], encoding="utf-8")
    print("docs/traceability.md: " + ("unchanged" if old == table(load()) else "table rewritten"))


if __name__ == "__main__":
    write_table()
    sys.exit(0)
