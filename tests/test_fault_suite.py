"""The fault suite: a real `orchctl serve` killed at random failpoints, again and again, while
the workload of tests/faults.py runs; then the invariants (tests/faults.py) are checked.

Each round arms one fault, chosen with a seeded generator from every point
`state.failpoints.POINTS` lists (so points added later are covered without a list here),
preferring points the workload is known to reach (from the failpoint trace) and not yet fired:

- a kill at the Nth hit of a point (`after_token=kill@3`);
- the seeded random mode (`ORCH_FAILPOINTS_RANDOM`): any hit of any point may kill;
- a full disk at the Nth hit of a write point (`result_write=enospc@2`): the daemon must stay
  up, and the task it hit end in a terminal state;
- a SIGKILL at a random moment.

Fast by default (a dozen kills, part of `make test`); `ORCH_PROOF=1` runs at least 200 kill
points (`make proof-faults`). Either way one summary line is printed (run with -s to see it):
kill points, invariant violations and which points fired. `ORCH_FAULT_SEED` replays a run.
"""

from __future__ import annotations

import collections
import os
import random
import time
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from state import failpoints
from tests import faults
from tests.conftest import Workspace

pytestmark = pytest.mark.slow

PROOF = os.environ.get("ORCH_PROOF") == "1"
KILLS = 200 if PROOF else 8
BUDGET_S = 3000.0 if PROOF else 45.0
ROUND_S = 4.0  # how long a round waits for its fault before it kills at a random moment
VERBOSE = bool(os.environ.get("ORCH_FAULT_VERBOSE"))
WRITE_POINTS = sorted(p for p in failpoints.POINTS if p.endswith("_write"))


@dataclass
class Tally:
    kills: collections.Counter[str] = field(default_factory=collections.Counter)
    disk_full: collections.Counter[str] = field(default_factory=collections.Counter)
    armed: collections.Counter[str] = field(default_factory=collections.Counter)
    reached: set[str] = field(default_factory=set)
    violations: list[str] = field(default_factory=list)

    @property
    def kill_count(self) -> int:
        return sum(self.kills.values())

    def read_trace(self, trace: Path) -> list[tuple[str, str]]:
        """(point, action) of each point that fired; the points passed go to `reached`."""
        fired = []
        for line in trace.read_text().splitlines() if trace.exists() else ():
            words = line.split()
            if words[1] == "hit":
                self.reached.add(words[2])
            elif words[1] == "fire":
                fired.append((words[2], words[4]))
        return fired

    def summary(self, why: str, seconds: float) -> str:
        fired = ", ".join(f"{p}×{n}" for p, n in sorted(self.kills.items()))
        full = ", ".join(f"{p}×{n}" for p, n in sorted(self.disk_full.items())) or "none"
        never = sorted(self.reached - set(self.kills) - {"timer"})
        unreached = sorted(set(failpoints.POINTS) - self.reached)
        return (
            f"fault suite: kill points={self.kill_count} "
            f"invariant violations={len(self.violations)} in {seconds:.0f} s; "
            f"killed at: {fired}; disk full at: {full}; "
            f"reached, not killed at: {', '.join(never) or 'none'}; "
            f"not reached: {', '.join(unreached) or 'none'} {why}"
        )


def _choose_point(rng: random.Random, tally: Tally, among: list[str]) -> str:
    """A point to arm: one the workload reaches and that was never armed, else now and then
    one never seen reached, else a reached one, the less often armed the likelier (a point the
    workload reaches rarely must not take every round)."""
    reached = [p for p in among if p in tally.reached]
    fresh = [p for p in reached if not tally.armed[p]]
    unseen = [p for p in among if p not in tally.reached]
    if fresh:
        point = rng.choice(fresh)
    elif unseen and (not reached or rng.random() < 0.2):
        point = rng.choice(unseen)
    else:
        point = rng.choices(reached, [1.0 / (1 + tally.armed[p]) for p in reached])[0]
    tally.armed[point] += 1
    return point


def _check(tally: Tally, what: str, check: object, *args: object) -> None:
    try:
        check(*args)  # type: ignore[operator]
    except AssertionError as exc:
        tally.violations.append(f"{what}: {exc}")


@pytest.mark.timeout(3600 if PROOF else 240)
def test_kills_at_random_failpoints_never_break_the_invariants(workspace: Workspace) -> None:
    rng, work, ledger, why = faults.begin(workspace, "ORCH_FAULT_SEED")
    tally = Tally()
    logs: list[Path] = []
    begin = time.monotonic()
    round_no = 0
    while tally.kill_count < KILLS and time.monotonic() - begin < BUDGET_S * 0.8:
        round_no += 1
        trace = workspace.root / f"trace-{round_no}"
        logs.append(workspace.root / f"daemon-{round_no}.log")
        roll, arm = rng.random(), dict[str, str]()
        if roll < 0.6:
            point = _choose_point(rng, tally, sorted(failpoints.POINTS))
            arm["failpoints"] = f"{point}=kill@{1 + min(int(rng.expovariate(0.4)), 8)}"
        elif roll < 0.75:
            arm["random_spec"] = f"{rng.randrange(1 << 30)}:0.01"
        elif roll < 0.9:
            point = _choose_point(rng, tally, WRITE_POINTS)
            arm["failpoints"] = f"{point}=enospc@{1 + min(int(rng.expovariate(0.5)), 5)}"
        if not (workspace.root / ".orch" / "last-good.yaml").exists():
            work.settle()  # a daemon refuses to start on a broken orch.yaml with no last good
        daemon = faults.serve(workspace, logs[-1], trace=trace, **arm)
        # an armed round waits for its fault; an unarmed one is killed at a random moment
        until = time.monotonic() + (ROUND_S if arm else rng.uniform(0.5, 3.0))
        while daemon.poll() is None and time.monotonic() < until:
            work.step()
            time.sleep(rng.uniform(0.05, 0.3))
        alive = daemon.poll() is None
        faults.kill(daemon)
        fired = tally.read_trace(trace)
        kills = [p for p, action in fired if action == "kill"]
        for point, action in fired:
            if action == "enospc":
                tally.disk_full[point] += 1
        if kills:
            tally.kills[kills[0]] += 1
        elif alive:
            tally.kills["timer"] += 1  # a disk-full round ends so too: it must have stayed up
        else:
            stderr = logs[-1].with_suffix(".stderr").read_text()[-500:]
            tally.violations.append(f"round {round_no} {arm}: exited {daemon.returncode} {stderr}")
        if VERBOSE:
            outcome = fired or ("alive" if alive else daemon.returncode)
            print(f"round {round_no}: {arm or 'timer'} -> {outcome}")
        _check(tally, f"round {round_no} {arm}", ledger.observe, workspace, why)
        if rng.random() < 0.5:
            work.settle()
    work.settle()
    logs.append(workspace.root / "daemon-final.log")
    task_ids = [*work.submitted, *work.invalid]
    _check(tally, "convergence", faults.converge, workspace, logs[-1], task_ids, why)
    _check(
        tally, "final", ledger.check_final, workspace, work, faults.acknowledged_cancels(logs), why
    )
    print("\n" + tally.summary(why, time.monotonic() - begin))
    assert tally.violations == [], "\n".join(tally.violations[:5])
    assert tally.kill_count >= KILLS or not PROOF, tally.summary(why, 0)
