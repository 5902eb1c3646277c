"""`make demo`: the reconciler on a simulated 24 GB + 12 GB workstation with example tasks.

Copies this example into ./demo-run/, starts `orchctl serve` on it, submits the example task
files through the spool (as an agent would, with `orchctl submit`), follows one task's stream,
prints every result and the status table, then stops the daemon with Ctrl-C (SIGINT) and
checks that it exited cleanly.
"""

from __future__ import annotations

import json
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
RUN = ROOT / "demo-run"
BIN = Path(sys.executable).parent
ORCHCTL = [str(BIN / "orchctl")]


def main() -> int:
    shutil.rmtree(RUN, ignore_errors=True)
    RUN.mkdir()
    for name in ("orch.yaml", "inventory.yaml"):
        shutil.copy(HERE / name, RUN / name)
    config = RUN / "orch.yaml"
    log_path = RUN / "daemon.log.jsonl"
    print(f"== starting the reconciler on a SIMULATED workstation ({config})")
    daemon = subprocess.Popen(
        [*ORCHCTL, "serve", "--config", str(config), "--log-format", "pretty",
         "--log-file", str(log_path)], cwd=RUN)
    try:
        if not _wait(lambda: _pools_ready(RUN), 30):
            print("pools did not become Ready in 30 s", file=sys.stderr)
            return 1
        print("\n== status once the pools are Ready")
        subprocess.run([*ORCHCTL, "status", "--config", str(config)], check=False)
        tasks = sorted((HERE / "tasks").glob("*.task.*"))
        print(f"\n== submitting {len(tasks)} task files through the spool")
        for task in tasks:
            subprocess.run([*ORCHCTL, "submit", str(task), "--config", str(config)], check=True)
        print("\n== following refactor-parser's event stream (orchctl watch)")
        subprocess.run([*ORCHCTL, "watch", "refactor-parser", "--config", str(config)],
                       check=False, timeout=60)
        ids = [_task_id(t) for t in tasks]
        if not _wait(lambda: all(_terminal(RUN, i) for i in ids), 60):
            print("not every task finished in 60 s", file=sys.stderr)
            return 1
        print("\n== results")
        ok = True
        for task_id in ids:
            result = json.loads((RUN / "results" / f"{task_id}.json").read_text())
            ok &= result["status"] == "succeeded"
            gpu = result.get("gpu") or {}
            print(f"{task_id:<18} {result['status']:<10} pool={result.get('pool_id')} "
                  f"replica={result.get('replica_id')} gpu={gpu.get('index')} "
                  f"queue_position={result.get('queue_position')} "
                  f"predicted_start_ms={result.get('predicted_start_ms')} "
                  f"tokens={result['tokens_out']}")
            print(f"{'':<18} text: {result['text'][:90]!r}")
        print("\n== final status")
        subprocess.run([*ORCHCTL, "status", "--config", str(config)], check=False)
    finally:
        daemon.send_signal(signal.SIGINT)
        try:
            code = daemon.wait(timeout=30)
        except subprocess.TimeoutExpired:
            daemon.kill()
            code = -9
    print(f"\n== daemon stopped with exit code {code}; logs (JSON Lines) in {log_path}")
    return 0 if ok and code == 0 else 1


def _task_id(path: Path) -> str:
    import yaml

    data = yaml.safe_load(path.read_text())
    return str(data.get("task_id") or path.name.split(".task.")[0])


def _terminal(run: Path, task_id: str) -> bool:
    try:
        status = json.loads((run / "results" / f"{task_id}.json").read_text())["status"]
    except (OSError, ValueError, KeyError):
        return False
    return status in ("succeeded", "failed", "canceled", "rejected")


def _pools_ready(run: Path) -> bool:
    try:
        data = json.loads((run / ".orch" / "status.json").read_text())
    except (OSError, ValueError):
        return False
    pools = data.get("pools", [])
    return bool(pools) and all(p["state"] == "Ready" and not p.get("reason") for p in pools)


def _wait(check, timeout: float) -> bool:  # type: ignore[no-untyped-def]
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if check():
            return True
        time.sleep(0.1)
    return False


if __name__ == "__main__":
    raise SystemExit(main())
