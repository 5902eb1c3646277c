"""Random SIGKILLs while tasks, cancels and replica replacements flow (about a minute).

A real `orchctl serve` is killed at random moments, again and again, while tasks are
delivered, some are canceled and orch.yaml is edited so replicas are replaced; then a last
daemon runs until idle and stops. The invariants a user relies on must hold whatever the kill
points were: one terminal state per task, event ids strictly increasing with the terminal frame
last, attempts numbered 1, 2, 3 … by `started` frame, an acknowledged cancel never re-run, no
temporary file left, no engine process outliving the daemon. `ORCH_KILL_SEED` replays a run.
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from plugins import processes
from state import events, spool
from tests.conftest import Workspace, config, task

pytestmark = pytest.mark.slow

ROUNDS = 25
BUDGET_S = 60.0


def _serve(ws: Workspace, log: Path, *extra: str) -> subprocess.Popen[bytes]:
    env = {k: v for k, v in os.environ.items() if k != "ORCH_FAILPOINTS"}
    argv = [sys.executable, "-m", "reconciler.cli", "serve", "--config", str(ws.config_path)]
    argv += ["--resync", "0.2", "--log-file", str(log), *extra]
    return subprocess.Popen(argv, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def _config(ctx: int) -> dict[str, object]:
    cfg = config()
    pool = cfg["pools"][0]
    pool.update(ctx=ctx, slots=2, sim={"tokens_per_s": 150, "load_s": 0.1})
    return cfg


def test_random_kills_never_break_the_invariants(workspace: Workspace) -> None:
    seed = int(os.environ.get("ORCH_KILL_SEED", random.randrange(1 << 30)))
    rng = random.Random(seed)
    why = f"(replay with ORCH_KILL_SEED={seed})"
    submitted: list[str] = []
    canceled_requests: set[str] = set()
    logs: list[Path] = []
    begin = time.monotonic()
    for round_no in range(ROUNDS):
        if time.monotonic() - begin > BUDGET_S * 0.7:
            break
        log = workspace.root / f"daemon-{round_no}.log"
        logs.append(log)
        daemon = _serve(workspace, log)
        until = time.monotonic() + rng.uniform(0.3, 2.0)
        while time.monotonic() < until:
            action = rng.random()
            if action < 0.55:
                task_id = f"t{len(submitted):03d}"
                workspace.submit(
                    f"{task_id}.task.yaml", task(task_id, max_tokens=rng.randint(2, 40))
                )
                submitted.append(task_id)
            elif action < 0.75 and submitted:
                victim = rng.choice(submitted)
                spool.request_cancel(workspace.spool, victim)
                canceled_requests.add(victim)
            elif action < 0.85:
                workspace.write_config(_config(rng.choice((1024, 2048, 4096))))
            time.sleep(rng.uniform(0.0, 0.15))
        daemon.send_signal(signal.SIGKILL)
        daemon.wait(timeout=30)

    final_log = workspace.root / "daemon-final.log"
    logs.append(final_log)
    final = _serve(workspace, final_log, "--exit-when-idle")
    assert final.wait(timeout=90) == 0, why

    acknowledged: set[str] = set()
    for log in logs:
        for line in log.read_text().splitlines() if log.exists() else ():
            record = json.loads(line)
            if record.get("event") == "task.cancel":
                acknowledged.add(str(record.get("task_id")))

    for task_id in submitted:
        result = workspace.result(task_id)
        assert result is not None and result["status"] in (
            "succeeded",
            "canceled",
            "failed",
            "rejected",
        ), f"{task_id}: {result and result['status']} {why}"
        frames = list(events.read(workspace.root / "results" / f"{task_id}.events.jsonl"))
        assert [f.id for f in frames] == list(range(1, len(frames) + 1)), f"{task_id} {why}"
        assert [f.terminal for f in frames].count(True) == 1 and frames[-1].terminal, task_id
        attempts = [f.data["attempt"] for f in frames if f.event == "started"]
        assert attempts == list(range(1, len(attempts) + 1)), f"{task_id}: {attempts} {why}"
        if task_id in acknowledged:
            assert result["status"] == "canceled", f"{task_id} re-ran after its cancel {why}"
        homes = [
            folder.name
            for folder in (workspace.spool.incoming, workspace.spool.active)
            if (folder / f"{task_id}.task.yaml").exists()
        ]
        assert homes == [], f"{task_id} left in {homes} {why}"

    leftovers = [
        str(p.relative_to(workspace.root))
        for folder in ("results", ".orch", ".orch/engines", ".orch/sessions")
        for p in (workspace.root / folder).glob(".*.tmp")
    ]
    assert leftovers == [], f"{leftovers} {why}"
    time.sleep(0.3)
    assert processes.find_marked(workspace.root / ".orch") == {}, why
    assert list((workspace.root / ".orch" / "engines").glob("*.json")) == [], why
    applied = yaml.safe_load(workspace.config_path.read_text())
    assert applied["pools"][0]["slots"] == 2
