"""Random SIGKILLs while tasks, cancels and replica replacements flow (about a minute).

A real `orchctl serve` is killed at random moments, again and again, while the workload of
tests/faults.py delivers tasks (some invalid, some in sessions), cancels some and edits
orch.yaml so replicas are replaced; then a last daemon runs until everything has converged
and stops. The invariants of tests/faults.py must hold whatever the kill points were; the
files a reader sees are checked after every kill. `ORCH_KILL_SEED` replays a run.
(tests/test_fault_suite.py kills at the failpoints instead of at random moments.)
"""

from __future__ import annotations

import time

import pytest

from tests import faults
from tests.conftest import Workspace

pytestmark = pytest.mark.slow

ROUNDS = 25
BUDGET_S = 60.0


def test_random_kills_never_break_the_invariants(workspace: Workspace) -> None:
    rng, work, ledger, why = faults.begin(workspace, "ORCH_KILL_SEED")
    logs = []
    begin = time.monotonic()
    for round_no in range(ROUNDS):
        if time.monotonic() - begin > BUDGET_S * 0.7:
            break
        logs.append(workspace.root / f"daemon-{round_no}.log")
        daemon = faults.serve(workspace, logs[-1])
        until = time.monotonic() + rng.uniform(0.3, 2.0)
        while time.monotonic() < until:
            work.step()
            time.sleep(rng.uniform(0.0, 0.15))
        faults.kill(daemon)
        ledger.observe(workspace, why)
        work.settle()

    logs.append(workspace.root / "daemon-final.log")
    faults.converge(workspace, logs[-1], [*work.submitted, *work.invalid], why)
    ledger.check_final(workspace, work, faults.acknowledged_cancels(logs), why)
