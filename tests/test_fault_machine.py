"""A hypothesis state machine over a real `orchctl serve`: orch.yaml edits, task drops,
cancels, engine kills and daemon restarts (SIGKILL, now and then at a failpoint) in any
order hypothesis picks. The visible files are checked after every step, and at the end a
last daemon must converge with every invariant of tests/faults.py holding.

Bounded: a few short examples in `make test`; `ORCH_PROOF=1` runs more and longer ones.
"""

from __future__ import annotations

import contextlib
import os
import random
import shutil
import signal
import subprocess
import tempfile
import time
from pathlib import Path

import pytest
import yaml
from hypothesis import HealthCheck, Phase, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, rule

from plugins import processes
from state import failpoints
from tests import faults
from tests.conftest import INVENTORY, Workspace

pytestmark = pytest.mark.slow

PROOF = os.environ.get("ORCH_PROOF") == "1"
KILL_POINTS = sorted(p for p in failpoints.POINTS if not p.startswith("file"))


class DaemonMachine(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.root = Path(tempfile.mkdtemp(prefix="fault-machine-"))
        self.ws = Workspace(self.root)
        (self.root / "inventory.yaml").write_text(yaml.safe_dump(INVENTORY))
        self.ws.write_config(faults.pool_config())
        self.work = faults.Workload(self.ws, random.Random(0))
        self.ledger = faults.Ledger()
        self.logs: list[Path] = []
        self.daemon: subprocess.Popen[bytes] | None = None

    @initialize()
    def start(self) -> None:
        self._serve()

    def _serve(self, failpoint: str | None = None) -> None:
        self.logs.append(self.root / f"daemon-{len(self.logs)}.log")
        self.daemon = faults.serve(self.ws, self.logs[-1], failpoints=failpoint)

    @rule(max_tokens=st.integers(1, 30), in_session=st.booleans())
    def drop_task(self, max_tokens: int, in_session: bool) -> None:
        extra = {"session_id": "s1"} if in_session else {}
        self.work.submit(max_tokens=max_tokens, **extra)

    @rule(data=st.data())
    def cancel(self, data: st.DataObject) -> None:
        if self.work.submitted:
            self.work.cancel(data.draw(st.sampled_from(self.work.submitted)))

    @rule(ctx=st.sampled_from([1024, 2048, 4096]))
    def edit_config(self, ctx: int) -> None:
        self.work.ctx = ctx
        self.work.settle()

    @rule()
    def kill_engines(self) -> None:
        for pid in processes.find_marked(self.root / ".orch"):
            with contextlib.suppress(ProcessLookupError):
                os.killpg(pid, signal.SIGKILL)

    @rule(point=st.sampled_from(KILL_POINTS), nth=st.integers(1, 4))
    def restart_daemon(self, point: str, nth: int) -> None:
        """SIGKILL the daemon, start a new one armed to die at the nth hit of `point`."""
        assert self.daemon is not None
        faults.kill(self.daemon)
        self._serve(f"{point}=kill@{nth}")

    @rule(seconds=st.floats(0.1, 1.5))
    def wait(self, seconds: float) -> None:
        time.sleep(seconds)
        assert self.daemon is not None
        if self.daemon.poll() is not None:  # died at its failpoint: the next one takes over
            assert self.daemon.returncode == -signal.SIGKILL, self.daemon.returncode
            self._serve()

    @invariant()
    def visible_files_are_whole(self) -> None:
        self.ledger.observe(self.ws)

    def teardown(self) -> None:
        if os.environ.get("ORCH_FAULT_VERBOSE"):
            print(f"example: {len(self.logs)} daemons, {len(self.work.submitted)} tasks")
        try:
            if self.daemon is not None:
                faults.kill(self.daemon)
            if self.logs:
                self.logs.append(self.root / "daemon-final.log")
                task_ids = [*self.work.submitted, *self.work.invalid]
                faults.converge(self.ws, self.logs[-1], task_ids)
                acknowledged = faults.acknowledged_cancels(self.logs)
                self.ledger.check_final(self.ws, self.work, acknowledged)
        finally:
            for pid in processes.find_marked(self.root / ".orch"):  # never leak, even failing
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(pid, signal.SIGKILL)
            shutil.rmtree(self.root, ignore_errors=True)


DaemonMachine.TestCase.settings = settings(
    max_examples=15 if PROOF else 5,
    stateful_step_count=25 if PROOF else 10,
    deadline=None,
    database=None,  # new sequences each run; a failure prints its steps to replay by hand
    phases=[Phase.generate, Phase.shrink] if PROOF else [Phase.generate],
    suppress_health_check=list(HealthCheck),
)
test_daemon_machine = pytest.mark.timeout(1800 if PROOF else 240)(DaemonMachine.TestCase)
