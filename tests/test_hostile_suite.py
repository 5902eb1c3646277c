"""The hostile-input suite: generated and hand-picked bad task files, orch.yaml edits and
inventories (tests/hostile.py) against the functions the daemon reads them with, then a mixed
batch of them, with good tasks among them, dropped into a running daemon.

What every input must get: the value, or errors that each name the file, a line where the
problem is in the text, and a hint; no other exception; milliseconds, not seconds. What the
daemon must keep: it stays up, every good task succeeds, every bad entry lands in spool/failed/
beside an error file saying why, and nothing outside the project folder is touched.

Fast in `make test`; `ORCH_PROOF=1` (`make proof-hostile`) tries over 1,000 inputs and the
run ends with one summary line (tests/conftest.py prints `hostile.TALLY`).
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import time
import tracemalloc
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import yaml
from hypothesis import HealthCheck, Phase, example, given, settings
from hypothesis import strategies as st

from plugins import gpu_simulated
from reconciler import clocks, configuring, intake
from reconciler import daemon as daemons
from state import loading, results
from tests import hostile
from tests.conftest import INVENTORY, Workspace, config, task, wait_for

pytestmark = pytest.mark.hostile

MAX_SECONDS = 2.0  # per input; a hostile file takes milliseconds, so this is only a ceiling
MAX_MESSAGE = 2000  # characters in one located error: a 1 MiB key must not be echoed whole
# problems about the file itself, not its text: no line to name
_FILE_LEVEL = (
    "over the limit of",
    "the file name",
    "is not a task file",
    "more problem",
    "symbolic link",
    "not a regular file",
    "could not be claimed",
    "cannot be read",
)


def _settings(fast: int, proof: int) -> settings:
    return settings(
        max_examples=hostile.examples(fast, proof),
        deadline=None,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
        phases=[Phase.explicit, Phase.reuse, Phase.generate, Phase.shrink],
    )


def _unclear(error: loading.LoadError) -> str | None:
    """Why a person could not act on `error`, or None when it is clear."""
    if not error.path:
        return "names no file"
    if not error.hint:
        return "gives no hint"
    if len(str(error)) > MAX_MESSAGE:
        return f"is {len(str(error)):,} characters long"
    if error.line is None and not any(what in error.message for what in _FILE_LEVEL):
        return "names no line"
    return None


def _judge(what: str, call: Callable[[], list[loading.LoadError]]) -> list[loading.LoadError]:
    """Run one load, counting it in the tally; fail on a crash, an unclear error or a slow one."""
    hostile.TALLY.tried += 1
    began = time.perf_counter()
    try:
        found = call()
    except Exception as exc:
        hostile.TALLY.crashes.append(f"{what}: {type(exc).__name__}: {exc}"[:300])
        raise
    took = time.perf_counter() - began
    hostile.TALLY.slowest_s = max(hostile.TALLY.slowest_s, took)
    for error in found:
        why = _unclear(error)
        if why is not None:
            hostile.TALLY.unclear.append(f"{what}: {why}: {str(error)[:200]}")
        assert why is None, f"{what}: the error {why}: {str(error)[:500]}"
    assert took < MAX_SECONDS, f"{what}: took {took:.2f} s"
    return found


def _task_errors(folder: Path, raw: bytes, suffix: str) -> list[loading.LoadError]:
    path = folder / f"t{suffix}"
    path.write_bytes(raw)
    parsed = intake.parse_claimed(path)  # what the daemon calls on a claimed file
    return parsed if isinstance(parsed, list) else []


def _config_errors(folder: Path, raw: bytes) -> list[loading.LoadError]:
    (folder / "inventory.yaml").write_text(yaml.safe_dump(INVENTORY))
    path = folder / "orch.yaml"
    path.write_bytes(raw)
    applied = configuring.AppliedConfig(path, {"sim"}, clocks.FakeClock())
    applied.refresh(settle=False)  # what the daemon calls on every pass
    return applied.errors


def _inventory_errors(folder: Path, raw: bytes) -> list[loading.LoadError]:
    path = folder / "inventory.yaml"
    path.write_bytes(raw)
    try:
        gpu_simulated.load_inventory(path)  # what `build` calls for the simulated observer
    except gpu_simulated.InventoryError as exc:
        return exc.errors
    return []


# -- parser level: the functions the daemon reads files with ------------------------------------


@_settings(fast=150, proof=1200)
@given(raw=hostile.task_files(), as_json=st.booleans())
# each a defect this suite found, kept as it was found
@example(raw=b"model: m1\nprompt: hi\nmax_tokens: 1\nint: 1\n", as_json=False)  # IndexError
@example(raw=b'{"model": "m1", "max_tokens": 1, "list": {}, "str": 0}', as_json=True)
@example(raw=b"model: m1\nprompt: a\x00b\nmax_tokens: 1\n", as_json=False)  # no line, no hint
@example(raw=b"prompt: !!python/object/apply:os.system [true]\n", as_json=False)  # wrong hint
@example(raw=b'\xef\xbb\xbf{"model": "m1", "prompt": "a", "max_tokens": 1}', as_json=True)
@example(raw=hostile.HAND_PICKED["huge-key.task.json"], as_json=True)  # 2 s, 1.8 MB message
@example(raw=hostile.HAND_PICKED["lone-surrogate.task.json"], as_json=True)  # no line
@example(raw=b"model: m1\nprompt: hi\nmax_tokens: 1\ntask_id: ../x\n", as_json=False)  # no hint
@example(raw=b'{"\x01": 1}', as_json=True)  # JSONDecodeError from the locator
def test_any_task_file_gets_a_task_or_located_errors_with_a_hint(
    tmp_path_factory: pytest.TempPathFactory, raw: bytes, as_json: bool
) -> None:
    folder = tmp_path_factory.mktemp("task")
    suffix = ".task.json" if as_json else ".task.yaml"
    _judge(f"task {raw[:60]!r}", lambda: _task_errors(folder, raw, suffix))


@_settings(fast=60, proof=500)
@given(raw=hostile.config_files())
@example(raw=hostile.config_with(pool_id="p1", model_id="y" * 3000))  # a 6,000-character error
@example(raw=hostile.config_with(pool_id="p1", model_id="int"))
def test_any_orch_yaml_edit_is_applied_or_refused_with_located_errors(
    tmp_path_factory: pytest.TempPathFactory, raw: bytes
) -> None:
    folder = tmp_path_factory.mktemp("config")
    _judge(f"orch.yaml {raw[:60]!r}", lambda: _config_errors(folder, raw))


@_settings(fast=40, proof=300)
@given(raw=hostile.inventory_files())
@example(raw=b"gpus: []\n")  # "lists no GPUs" named no line (found by make proof)
def test_any_inventory_is_loaded_or_refused_with_located_errors(
    tmp_path_factory: pytest.TempPathFactory, raw: bytes
) -> None:
    folder = tmp_path_factory.mktemp("inventory")
    _judge(f"inventory {raw[:60]!r}", lambda: _inventory_errors(folder, raw))


@pytest.mark.parametrize("name", sorted(hostile.HAND_PICKED))
def test_every_hand_picked_task_file_is_refused_clearly_in_bounded_memory(
    tmp_path: Path, name: str
) -> None:
    raw = hostile.HAND_PICKED[name]
    suffix = ".task.json" if name.endswith(".json") else ".task.yaml"
    tracemalloc.start()
    try:
        found = _judge(name, lambda: _task_errors(tmp_path, raw, suffix))
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert found, f"{name} was accepted"
    assert peak < 64 * len(raw) + (32 << 20), f"{name}: {peak / 2**20:.0f} MiB at peak"


@pytest.mark.parametrize("name", sorted(hostile.CONFIG_HAND_PICKED))
def test_every_hand_picked_orch_yaml_edit_is_refused_clearly(tmp_path: Path, name: str) -> None:
    raw = hostile.CONFIG_HAND_PICKED[name]
    if name == "bom":  # an editor's byte-order mark is harmless: the config is simply read
        assert _judge(name, lambda: _config_errors(tmp_path, raw)) == []
        return
    assert _judge(name, lambda: _config_errors(tmp_path, raw)), f"{name} was accepted"


# -- files that change while they are read ----------------------------------------------------


def test_a_task_file_that_grows_past_the_limit_while_read_is_refused_as_too_large(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "grows.task.yaml"
    path.write_bytes(hostile._task_text())
    real_fstat = os.fstat

    def growing(fd: int) -> os.stat_result:  # the writer appends right after the fstat
        found = real_fstat(fd)
        with open(path, "ab") as fh:
            fh.write(b"# " + b"x" * loading.MAX_FILE_BYTES + b"\n")
        monkeypatch.setattr(os, "fstat", real_fstat)
        return found

    monkeypatch.setattr(os, "fstat", growing)
    [error] = _judge("grows", lambda: _task_errors_in_place(path))
    assert "grew while being read, over the limit" in error.message


def _task_errors_in_place(path: Path) -> list[loading.LoadError]:
    parsed = intake.parse_claimed(path)
    return parsed if isinstance(parsed, list) else []


def test_orch_yaml_replaced_right_after_it_is_read_is_applied_as_read(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The digest, the applied state and .orch/last-good.yaml all come from one read: an edit
    saved just after it (here a broken one) is judged on the next pass, on its own bytes."""
    (tmp_path / "inventory.yaml").write_text(yaml.safe_dump(INVENTORY))
    path = tmp_path / "orch.yaml"
    first = yaml.safe_dump(config()).encode()
    path.write_bytes(first)
    broken = tmp_path / "broken.yaml"
    broken.write_bytes(hostile.CONFIG_HAND_PICKED["laughs"])

    def replace_after(real: Callable[..., Any]) -> Callable[..., Any]:
        def call(target: Any, *args: Any, **kwargs: Any) -> Any:
            out = real(target, *args, **kwargs)
            if Path(target) == path and broken.exists():
                broken.replace(path)  # an editor's atomic save, just after the read began
            return out

        return call

    monkeypatch.setattr(os, "open", replace_after(os.open))
    monkeypatch.setattr(Path, "read_bytes", replace_after(Path.read_bytes))
    applied = configuring.AppliedConfig(path, {"sim"}, clocks.FakeClock())
    applied.refresh(settle=False)
    monkeypatch.undo()
    assert applied.errors == [] and applied.state is not None
    assert (tmp_path / configuring.LAST_GOOD).read_bytes() == first
    applied.refresh(settle=False)  # the next pass reads the broken edit and keeps the state
    assert applied.errors and applied.errors[0].line and applied.state is not None


# -- daemon level: a mixed batch in a running daemon ------------------------------------------

GOOD_TASKS = 4


def _snapshot(folder: Path) -> dict[str, tuple[str, int]]:
    out = {}
    for path in sorted(folder.rglob("*")):
        if path.is_file() and not path.is_symlink():
            out[str(path)] = (
                hashlib.sha256(path.read_bytes()).hexdigest(),
                path.stat().st_mtime_ns,
            )
    return out


def _place_entries(ws: Workspace, outside: Path, batch: list[tuple[bytes, bytes]]) -> int:
    """Hostile entries written straight into incoming/ (as a careless producer would); returns
    how many entries were put there."""
    incoming = os.fsencode(ws.spool.incoming)
    an_hour_ago = time.time() - 3600
    for name, raw in batch:
        path = incoming + b"/" + name
        with open(path, "wb") as fh:
            fh.write(raw)
        if name.startswith(b"."):  # hidden: claimed once it has sat (HIDDEN_GRACE_S)
            os.utime(path, (an_hour_ago, an_hour_ago))
    special = ws.spool.incoming
    os.mkfifo(special / "fifo.task.yaml")
    (special / "folder.task.yaml").mkdir()
    (special / "link-out.task.yaml").symlink_to(outside / "secret.task.yaml")
    (special / "link-zero.task.yaml").symlink_to("/dev/zero")
    (special / "link-dots.task.yaml").symlink_to("../../../../../../etc/passwd")
    os.link(outside / "secret.task.yaml", special / "hard-out.task.yaml")
    return len(batch) + 6


def _churn(ws: Workspace, count: int) -> list[str]:
    """Task files written in place, in two halves, while the daemon may claim them: each is
    read whole or cut short, never lost."""
    text = hostile._task_text(task_id=None)
    ids = [f"churn-{i}" for i in range(count)]
    for task_id in ids:
        with open(ws.spool.incoming / f"{task_id}.task.yaml", "wb") as fh:
            fh.write(text[: len(text) // 2])
            fh.flush()
            time.sleep(0.05)
            fh.write(text[len(text) // 2 :])
    return ids


async def _serve_batch(ws: Workspace, outside: Path, batch: list[tuple[bytes, bytes]]) -> None:
    before = _snapshot(outside)
    escapes = [Path("/tmp/escape"), Path("/tmp/pwned"), ws.root.parent / "escape"]
    existed = {p: p.exists() for p in escapes}
    d = daemons.build(daemons.Options(config_path=ws.config_path, resync_s=0.2))
    job = asyncio.get_running_loop().create_task(d.run())
    try:
        await wait_for(lambda: _ready(ws) or job.done(), 20, "pools Ready")
        placed = _place_entries(ws, outside, batch)
        good = [f"ok-{i}" for i in range(GOOD_TASKS)]
        for task_id in good[:2]:
            ws.submit(f"{task_id}.task.yaml", task(task_id))
        churned = await asyncio.to_thread(_churn, ws, 3)
        # a hostile orch.yaml edit while all this is in flight: refused, last good kept
        ws.config_path.write_bytes(hostile.CONFIG_HAND_PICKED["laughs"])
        await wait_for(lambda: ws.status()["config"]["errors"], 10, "the bad edit reported")
        [reported] = ws.status()["config"]["errors"][:1]
        assert reported["line"] and reported["hint"], reported
        for task_id in good[2:]:
            ws.submit(f"{task_id}.task.yaml", task(task_id))
        for task_id in good:
            result = await wait_for(lambda t=task_id: _terminal(ws, t), 30, f"{task_id} done")
            assert result["status"] == "succeeded", result
        ws.write_config(config())
        await wait_for(lambda: not ws.status()["config"]["errors"], 10, "the fix applied")
        await wait_for(lambda: _settled(ws), 30, "incoming/ and active/ empty")
        for task_id in churned:
            result = await wait_for(lambda t=task_id: _terminal(ws, t), 30, f"{task_id} done")
            assert result["status"] in ("succeeded", "rejected"), result
        assert not job.done(), "the daemon stopped"
    finally:
        d.stop()
        code = await asyncio.wait_for(job, 30)
    hostile.TALLY.tried += placed
    assert code == 0
    _check_outcomes(ws, placed + GOOD_TASKS + len(churned))
    assert _snapshot(outside) == before, "a file outside the project folder changed"
    assert {p: p.exists() for p in escapes} == existed, "a file was created outside"


def _ready(ws: Workspace) -> bool:
    pools = ws.status()["pools"]
    return bool(pools) and all(p["state"] == "Ready" for p in pools)


def _terminal(ws: Workspace, task_id: str) -> dict[str, Any] | None:
    found = ws.result(task_id)
    return found if found and found["status"] in results.TERMINAL else None


def _settled(ws: Workspace) -> bool:
    return not any(ws.spool.incoming.iterdir()) and not any(ws.spool.active.iterdir())


def _check_outcomes(ws: Workspace, delivered: int) -> None:
    """Every entry is in done/ or failed/, every quarantined one beside a clear error file,
    every result terminal and named as an id may be."""
    failed = list(ws.spool.failed.iterdir())
    records = [p for p in failed if p.name.endswith(".error.json")]
    kept = [p for p in failed if not p.name.endswith(".error.json")]
    kept += list(ws.spool.done.iterdir())
    assert len(kept) == delivered, f"{delivered} entries delivered, {len(kept)} accounted for"
    for path in records:
        record = json.loads(path.read_text())
        first = record["problems"][0] if record.get("problems") else record
        error = loading.LoadError(
            record["path"] or "", first.get("line"), None, None, first["message"], record["hint"]
        )
        why = _unclear(error) if record["code"] == "INVALID_TASK_FILE" else None
        if why is not None:
            hostile.TALLY.unclear.append(f"{path.name}: {why}")
        assert why is None, f"{path.name}: {why}: {record}"
    for path in (ws.root / "results").iterdir():
        assert path.parent == ws.root / "results"
        if path.name.endswith(".json"):
            assert json.loads(path.read_text())["status"] in results.TERMINAL, path.name


_names = hostile.entry_names() | st.sampled_from([b"h.task.yaml", b"h.task.json"])


@settings(
    max_examples=hostile.examples(1, 3),
    deadline=None,
    suppress_health_check=list(HealthCheck),
    phases=[Phase.explicit, Phase.generate],  # a daemon per example: no shrinking
)
@given(
    batch=st.lists(
        st.tuples(_names, hostile.task_files()),
        min_size=hostile.examples(25, 120),
        max_size=hostile.examples(25, 120),
        unique_by=lambda entry: entry[0],
    )
)
@example(batch=[(name.encode(), raw) for name, raw in hostile.HAND_PICKED.items()])
def test_a_running_daemon_survives_a_mixed_batch_and_loses_nothing(
    tmp_path_factory: pytest.TempPathFactory, batch: list[tuple[bytes, bytes]]
) -> None:
    ws = Workspace(tmp_path_factory.mktemp("project"))
    (ws.root / "inventory.yaml").write_text(yaml.safe_dump(INVENTORY))
    ws.write_config(config())
    outside = tmp_path_factory.mktemp("outside")
    (outside / "secret.task.yaml").write_bytes(hostile._task_text(task_id="outside"))
    (outside / "secret.txt").write_text("do not touch")
    asyncio.run(_serve_batch(ws, outside, batch))
