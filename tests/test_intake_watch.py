"""The intake benchmark's watcher process (`benchmarks.intake_watch`): it counts what a user
would see appear (result files, task files filed in done/ or failed/) from inotify, and says
when all N were there."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _start(
    tmp_path: Path, n: int, staged: tuple[str, ...] = ()
) -> tuple[subprocess.Popen[str], dict[str, Path]]:
    names = ("results", "done", "failed", "tmp", "incoming")
    folders = {name: tmp_path / name for name in names}
    for folder in folders.values():
        folder.mkdir()
    for name in staged:
        (folders["tmp"] / name).write_text("{}")
    proc = subprocess.Popen(
        [sys.executable, "-m", "benchmarks.intake_watch", str(n)]
        + [str(folders[name]) for name in ("results", "done", "failed")]
        + ["20", str(folders["tmp"]), str(folders["incoming"])],
        cwd=ROOT,
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    assert proc.stdout is not None and proc.stdin is not None
    assert proc.stdout.readline().strip() == "watching"
    proc.stdin.write("drop\n")
    proc.stdin.flush()
    return proc, folders


def test_drops_the_staged_task_files_into_incoming_and_times_from_the_first_rename(
    tmp_path: Path,
) -> None:
    """The watcher is the user's writer too: the renames run in its process, not the
    daemon's, and its clock starts before the first one."""
    before = time.monotonic()
    proc, folders = _start(tmp_path, 1, staged=("b.task.json.part", "a.task.json.part", "x.tmp"))
    time.sleep(0.1)
    assert sorted(os.listdir(folders["incoming"])) == ["a.task.json", "b.task.json"]
    assert os.listdir(folders["tmp"]) == ["x.tmp"]  # not staged by the benchmark: left
    _put(folders["results"], "a.json")
    _put(folders["done"], "a.task.json")
    out, _ = proc.communicate(timeout=30)
    seen = json.loads(out)
    assert before < seen["t0"] < time.monotonic()
    assert 0 <= seen["drop_ms"] < 10_000
    assert seen["terminal_s"] is not None


def _put(folder: Path, name: str) -> None:
    tmp = folder / f".{name}.123.tmp"
    tmp.write_text("{}")
    os.rename(tmp, folder / name)


def test_counts_results_and_filed_tasks_once_each_not_logs_or_temporary_files(
    tmp_path: Path,
) -> None:
    proc, folders = _start(tmp_path, 3)
    for i in range(3):
        _put(folders["results"], f"t{i}.json")
        _put(folders["results"], f"t{i}.json")  # a result rewritten counts once
        (folders["results"] / f"t{i}.events.jsonl").write_text("")
    time.sleep(0.1)
    _put(folders["done"], "t0.task.json")
    _put(folders["failed"], "t1.task.json")
    os.link(folders["done"] / "t0.task.json", folders["done"] / "x.other")
    time.sleep(0.1)
    _put(folders["done"], "t2.task.json")
    out, _ = proc.communicate(timeout=30)
    seen = json.loads(out)
    assert proc.returncode == 0
    assert seen["admitted_s"] is not None and seen["terminal_s"] is not None
    assert seen["admitted_s"] < seen["terminal_s"]
    assert seen["progress"][-1][1:] == [3, 3]
    assert [row[1:] for row in seen["progress"]].count([3, 2]) == 1  # t2 came last


def test_a_result_removed_again_is_not_counted(tmp_path: Path) -> None:
    """The end is checked against a listing: a name that appeared and went is not there."""
    proc, folders = _start(tmp_path, 2)
    _put(folders["results"], "a.json")
    _put(folders["results"], "b.json")
    (folders["results"] / "b.json").unlink()
    time.sleep(0.2)
    assert proc.poll() is None  # not all there: still watching
    _put(folders["results"], "c.json")
    for name in ("a", "c"):
        _put(folders["done"], f"{name}.task.json")
    out, _ = proc.communicate(timeout=30)
    seen = json.loads(out)
    assert seen["admitted_s"] is not None and seen["terminal_s"] is not None
