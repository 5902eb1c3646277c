"""`state.pending`: the task id a waiting spool file claims is the one intake will give it."""

from __future__ import annotations

from pathlib import Path

import pytest

from state import pending, spool


@pytest.mark.parametrize(
    ("name", "body", "claims"),
    [
        ("by-name.task.yaml", "model: m\nprompt: p\nmax_tokens: 1\n", "by-name"),
        ("file.task.yaml", "task_id: inside\nmodel: m\n", "inside"),
        ("file.task.json", '{"task_id": "in-json", "model": "m"}', "in-json"),
        ("file.task.yaml", "task_id: ../escape\n", None),  # a named unsafe id claims nothing
        ("file.task.yaml", "task_id: 42\n", "file"),  # not a string: the name's stem
        ("my task.task.yaml", "model: m\n", None),
        ("bomb.task.yaml", "a: &a [x]\ntask_id: *a\n", "bomb"),
        ("broken.task.yaml", "task_id: [unclosed\n", "broken"),
    ],
)
def test_a_waiting_file_claims_the_id_intake_would_give_it(
    tmp_path: Path, name: str, body: str, claims: str | None
) -> None:
    the_spool = spool.Spool(tmp_path).ensure()
    (the_spool.incoming / name).write_text(body)
    [found] = pending.waiting(the_spool)
    assert (found.task_id, found.folder, found.name) == (claims, "incoming", name)
    assert pending.find(the_spool, claims or "nothing") == (found if claims else None)


def test_claimed_files_in_active_are_found_too(tmp_path: Path) -> None:
    the_spool = spool.Spool(tmp_path).ensure()
    (the_spool.active / "run.task.yaml").write_text("task_id: running-one\n")
    found = pending.find(the_spool, "running-one")
    assert found is not None and found.folder == "active"
