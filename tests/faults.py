"""What the crash tests share: a real `orchctl serve` subprocess with failpoints armed, a
random workload, and the invariants a user relies on whatever the kill points were.

Used by tests/test_random_kills.py (kills at random moments), tests/test_fault_suite.py
(kills at random failpoints, disk errors, lost events) and tests/test_fault_machine.py (a
hypothesis state machine). The invariants:

- visible files are never partial: every results/<id>.json parses, every event log is whole
  lines with ids 1, 2, 3 … and nothing after a terminal frame (`check_visible`, after each kill);
- a finished task never runs again: once its result is terminal, its log never grows
  (`Ledger.observe`);
- every task ends in exactly one terminal state, its task file in done/ or failed/ only,
  attempts numbered 1, 2, 3 … by `started` frame, an acknowledged cancel never re-run
  (`Ledger.check_final`);
- no temporary file left, no engine process outliving the last daemon, status converged
  (`check_no_leftovers`, `check_no_engines`, `converge`).
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from plugins import processes
from state import events, results, spool
from tests.conftest import Workspace, config, task

FAILPOINT_ENV = ("ORCH_FAILPOINTS", "ORCH_FAILPOINTS_RANDOM", "ORCH_FAILPOINTS_TRACE")
TERMINAL = ("succeeded", "canceled", "failed", "rejected")


def serve(
    ws: Workspace,
    log: Path,
    *extra: str,
    failpoints: str | None = None,
    random_spec: str | None = None,
    trace: Path | None = None,
) -> subprocess.Popen[bytes]:
    """`orchctl serve` on the workspace, its log in `log`, failpoints armed as given."""
    env = {k: v for k, v in os.environ.items() if k not in FAILPOINT_ENV}
    if failpoints:
        env["ORCH_FAILPOINTS"] = failpoints
    if random_spec:
        env["ORCH_FAILPOINTS_RANDOM"] = random_spec
    if trace is not None:
        env["ORCH_FAILPOINTS_TRACE"] = str(trace)
    argv = [sys.executable, "-m", "reconciler.cli", "serve", "--config", str(ws.config_path)]
    argv += ["--resync", "0.2", "--log-file", str(log), *extra]
    with log.with_suffix(".stderr").open("ab") as stderr:  # a refusal to start says why there
        return subprocess.Popen(argv, env=env, stdout=subprocess.DEVNULL, stderr=stderr)


def kill(daemon: subprocess.Popen[bytes]) -> None:
    with contextlib.suppress(ProcessLookupError):
        daemon.send_signal(signal.SIGKILL)
    daemon.wait(timeout=30)


def pool_config(ctx: int = 2048, **sim: Any) -> dict[str, Any]:
    """The crash tests' orch.yaml: one sim pool of two slots; `ctx` varies to replace it."""
    cfg = config()
    cfg["pools"][0].update(ctx=ctx, slots=2, sim={"tokens_per_s": 150, "load_s": 0.1, **sim})
    cfg["sessions"] = {"max_turns": 1000}
    return cfg


@dataclass
class Workload:
    """Random operator actions on a workspace: deliver tasks (some in a session, some
    invalid), request cancels, edit orch.yaml (valid edits that replace the replica, and now
    and then an invalid one). Tracks what it did for the final checks."""

    ws: Workspace
    rng: random.Random
    submitted: list[str] = field(default_factory=list)
    invalid: list[str] = field(default_factory=list)
    cancels: set[str] = field(default_factory=set)
    ctx: int = 2048

    def step(self) -> str:
        roll = self.rng.random()
        if roll < 0.5:
            self.submit()
            return "submit"
        if roll < 0.6:
            task_id = f"bad{len(self.invalid):03d}"
            self.ws.submit(f"{task_id}.task.yaml", task(task_id, max_tokens=0))
            self.invalid.append(task_id)
            return "invalid"
        if roll < 0.75 and self.submitted:
            # mostly a recent task, which may still be queued or running
            recent = self.submitted[-4:] if self.rng.random() < 0.7 else self.submitted
            self.cancel(self.rng.choice(recent))
            return "cancel"
        if roll < 0.83:
            self.edit()
            return "edit"
        if roll < 0.86 and (self.ws.root / ".orch" / "last-good.yaml").exists():
            # (with no last good copy yet a daemon rightly refuses to start on it)
            self.ws.config_path.write_text("pools: [ {id: p1, engine: nope\n")  # half-saved
            return "broken edit"
        return "wait"

    def submit(self, **fields: Any) -> str:
        task_id = f"t{len(self.submitted):03d}"
        if self.rng.random() < 0.2:
            fields.setdefault("session_id", f"s{self.rng.randrange(3)}")
        fields.setdefault("max_tokens", self.rng.randint(2, 40))
        self.ws.submit(f"{task_id}.task.yaml", task(task_id, **fields))
        self.submitted.append(task_id)
        return task_id

    def cancel(self, task_id: str) -> None:
        spool.request_cancel(self.ws.spool, task_id)
        self.cancels.add(task_id)

    def edit(self) -> None:
        self.ctx = self.rng.choice((1024, 2048, 4096))
        self.ws.write_config(pool_config(self.ctx))

    def settle(self) -> None:
        """A valid orch.yaml again (the last edit may have been a broken one)."""
        self.ws.write_config(pool_config(self.ctx))


def begin(ws: Workspace, seed_env: str) -> tuple[random.Random, Workload, Ledger, str]:
    """A harness's start: its generator seeded from `seed_env` (or at random), the crash
    tests' orch.yaml, a workload, a ledger, and the words that say how to replay the run."""
    seed = int(os.environ.get(seed_env, random.randrange(1 << 30)))
    rng = random.Random(seed)
    ws.write_config(pool_config())
    return rng, Workload(ws, rng), Ledger(), f"(replay with {seed_env}={seed})"


def check_visible(ws: Workspace, why: str = "") -> None:
    """What a reader may see at any moment: complete result files, whole-line logs with ids
    1, 2, 3 … and nothing after a terminal frame."""
    folder = ws.root / "results"
    for path in folder.glob("*.json"):
        if path.name.startswith("."):
            continue
        raw = path.read_bytes()
        try:
            results.Result.model_validate_json(raw)
        except ValueError as exc:
            raise AssertionError(f"{path.name} is not a whole result: {raw[:80]!r} {why}") from exc
    for path in folder.glob("*.events.jsonl"):
        raw = path.read_bytes()
        assert raw == b"" or raw.endswith(b"\n"), f"{path.name}: a torn frame {why}"
        frames = list(events.read(path))
        # from 1, or after the ids of the task whose id this one took over (docs/contracts.md)
        first = frames[0].id if frames else 1
        assert [f.id for f in frames] == list(range(first, first + len(frames))), (
            f"{path.name} {why}"
        )
        terminal = [i for i, f in enumerate(frames) if f.terminal]
        assert terminal in ([], [len(frames) - 1]), f"{path.name}: frames after the end {why}"


@dataclass
class Ledger:
    """Across kills: the log of a task once seen terminal, which must never grow again."""

    finished_logs: dict[str, bytes] = field(default_factory=dict)

    def observe(self, ws: Workspace, why: str = "") -> None:
        check_visible(ws, why)
        folder = ws.root / "results"
        for task_id, seen in self.finished_logs.items():
            now = (folder / f"{task_id}.events.jsonl").read_bytes()
            assert now == seen, f"{task_id} ran again after it finished {why}"
        for task_id in results.ResultStore(folder).task_ids():
            if task_id in self.finished_logs:
                continue
            result = ws.result(task_id)
            if result is not None and result["status"] in TERMINAL:
                log = folder / f"{task_id}.events.jsonl"
                self.finished_logs[task_id] = log.read_bytes() if log.exists() else b""

    def check_final(
        self, ws: Workspace, work: Workload, acknowledged: set[str], why: str = ""
    ) -> None:
        self.observe(ws, why)
        for task_id in [*work.submitted, *work.invalid]:
            result = ws.result(task_id)
            status = result and result["status"]
            assert status in TERMINAL, f"{task_id}: {status} {why}"
            if task_id in work.invalid:
                assert status == "rejected", f"{task_id}: {status} {why}"
            frames = list(events.read(ws.root / "results" / f"{task_id}.events.jsonl"))
            assert frames and frames[-1].terminal, f"{task_id}: no terminal frame {why}"
            attempts = [f.data["attempt"] for f in frames if f.event == "started"]
            assert attempts == list(range(1, len(attempts) + 1)), f"{task_id}: {attempts} {why}"
            if task_id in acknowledged:
                assert status == "canceled", f"{task_id} re-ran after its cancel {why}"
            homes = [
                folder.name
                for folder in (ws.spool.incoming, ws.spool.active, ws.spool.done, ws.spool.failed)
                for name in os.listdir(folder)
                if name == f"{task_id}.task.yaml" or name.endswith(f"-{task_id}.task.yaml")
            ]
            assert homes in (["done"], ["failed"]), f"{task_id} filed in {homes} {why}"


def acknowledged_cancels(logs: list[Path]) -> set[str]:
    """Task ids whose cancel a daemon acknowledged (`task.cancel` in its log)."""
    found: set[str] = set()
    for log in logs:
        for line in log.read_text().splitlines() if log.exists() else ():
            with contextlib.suppress(ValueError):
                record = json.loads(line)
                if record.get("event") == "task.cancel":
                    found.add(str(record.get("task_id")))
    return found


def check_no_leftovers(ws: Workspace, why: str = "") -> None:
    """No temporary file of an interrupted write, in any folder the daemon writes."""
    folders = ["results", ".orch", ".orch/engines", ".orch/sessions"]
    folders += [f"spool/{name}" for name in ("incoming", "active", "done", "failed")]
    leftovers = [
        str(p.relative_to(ws.root)) for name in folders for p in (ws.root / name).glob(".*.tmp")
    ]
    assert leftovers == [], f"{leftovers} {why}"


def check_no_engines(ws: Workspace, why: str = "") -> None:
    """No engine process of this folder survives its daemon, and no record says one does."""
    deadline = time.monotonic() + 5
    while processes.find_marked(ws.root / ".orch") and time.monotonic() < deadline:
        time.sleep(0.05)  # a process group SIGKILLed a moment ago is still being torn down
    assert processes.find_marked(ws.root / ".orch") == {}, why
    assert list((ws.root / ".orch" / "engines").glob("*.json")) == [], why


def converge(
    ws: Workspace, log: Path, task_ids: list[str], why: str = "", timeout: float = 90
) -> None:
    """A last daemon, unarmed, until every task is terminal, the spool is empty and status
    shows the config applied with every replica Ready; then a clean stop (SIGTERM, exit 0)
    that leaves no engine behind."""
    daemon = serve(ws, log)
    want = {
        p["id"]: p.get("replicas", 1) for p in yaml.safe_load(ws.config_path.read_text())["pools"]
    }
    end = time.monotonic() + timeout
    seen: Any = None
    try:
        while time.monotonic() < end:
            assert daemon.poll() is None, f"the last daemon exited {daemon.returncode} {why}"
            seen = _converged(ws, task_ids, want, daemon.pid)
            if seen is True:
                break
            time.sleep(0.1)
        else:
            raise AssertionError(f"status never converged: {seen} {why}")
    finally:
        daemon.send_signal(signal.SIGTERM)
        code = daemon.wait(timeout=60)
    assert code == 0, f"the last daemon stopped with {code} {why}"
    assert ws.status()["daemon"]["state"] == "stopped", why
    check_no_leftovers(ws, why)
    check_no_engines(ws, why)


def _converged(ws: Workspace, task_ids: list[str], want: dict[str, int], pid: int) -> Any:
    """True when converged, else what is still missing (for the failure message)."""
    pending = [t for t in task_ids if (ws.result(t) or {}).get("status") not in TERMINAL]
    if pending:
        return f"not terminal: {pending[:5]}"
    waiting = os.listdir(ws.spool.incoming) + os.listdir(ws.spool.active)
    if waiting:
        return f"left in the spool: {waiting[:5]}"
    try:
        status = ws.status()
    except (OSError, ValueError):
        return "no status.json"
    if status["daemon"]["pid"] != pid:
        return "status.json is still the previous daemon's"
    if status["config"]["errors"]:
        return f"config errors: {status['config']['errors']}"
    ready = {
        p["id"]: sum(r["state"] == "Ready" for r in p["replicas"])
        for p in status["pools"]
        if p["state"] == "Ready"
    }
    return True if ready == want else f"pools: {ready} want {want}"
