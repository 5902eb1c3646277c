"""Running `orchctl` in tests, and the rule every run is held to: no output may contain a
Python repr, a missing value or a traceback (`BANNED`).

`orchctl(...)` runs `reconciler.cli.main` in this process (fast; stdout, stderr and stdin
swapped); `orchctl_process(...)` runs the command as a user does, in a subprocess. Both
return a `Ran` and fail the test when the output breaks the rule. `fake_daemon_status` writes
the `.orch/status.json` a daemon would, so the CLI's daemon checks can be driven without one.
"""

from __future__ import annotations

import contextlib
import io
import os
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from reconciler import cli, clocks
from state import atomic, statusfile

BANNED = ("{'", "None ms", "pid None", "Traceback", "Value error,")
ORCHCTL = Path(sys.executable).parent / "orchctl"  # the console script pip installed


@dataclass(frozen=True)
class Ran:
    code: int
    out: str
    err: str

    @property
    def out_lines(self) -> list[str]:
        return self.out.splitlines()

    @property
    def err_lines(self) -> list[str]:
        return self.err.splitlines()


def assert_clean(text: str) -> None:
    for banned in BANNED:
        assert banned not in text, f"orchctl printed {banned!r}:\n{text}"


def orchctl(*args: str | Path, cwd: Path | None = None, stdin: bytes = b"") -> Ran:
    """`orchctl ARGS` through `cli.main`, in this process."""
    out, err = io.StringIO(), io.StringIO()
    fake_stdin = io.TextIOWrapper(io.BytesIO(stdin), encoding="utf-8")
    saved_stdin = sys.stdin
    sys.stdin = fake_stdin
    try:
        with (
            contextlib.chdir(cwd or Path.cwd()),
            contextlib.redirect_stdout(out),
            contextlib.redirect_stderr(err),
        ):
            code = cli.main([str(a) for a in args])
    finally:
        sys.stdin = saved_stdin
    ran = Ran(code, out.getvalue(), err.getvalue())
    assert_clean(ran.out + ran.err)
    return ran


def orchctl_process(
    *args: str | Path, cwd: Path | None = None, stdin: bytes = b"", timeout: float = 60
) -> Ran:
    """`orchctl ARGS` as a user runs it: the console script, in a subprocess."""
    done = subprocess.run(
        [str(ORCHCTL), *map(str, args)],
        input=stdin,
        capture_output=True,
        timeout=timeout,
        cwd=cwd,
        check=False,
    )
    ran = Ran(done.returncode, done.stdout.decode(), done.stderr.decode())
    assert_clean(ran.out + ran.err)
    return ran


def fake_daemon_status(
    state_dir: Path,
    *,
    pid: int | None = None,
    state: statusfile.DaemonState = "running",
    started_at: float | None = None,
    stopped_at: float | None = None,
    written_at: float | None = None,
    simulated: bool = True,
    paths: dict[str, str] | None = None,
) -> Path:
    """The status.json a daemon with `pid` (default: this process) would have written."""
    now = time.time()
    data = statusfile.StatusFile(
        daemon=statusfile.DaemonRow(
            pid=os.getpid() if pid is None else pid,
            started_at=clocks.rfc3339(now if started_at is None else started_at),
            version="0.1.0",
            simulated=simulated,
            state=state,
            stopped_at=clocks.rfc3339(stopped_at) if stopped_at is not None else None,
            paths=paths,
        ),
        config=statusfile.ConfigRow(
            path="orch.yaml", revision="sha256:0123456789ab", applied_at=clocks.rfc3339(now)
        ),
        gpus=[
            statusfile.GpuRow(
                index=0,
                uuid="GPU-test-0",
                name="SIMULATED NVIDIA GeForce RTX 3090",
                vram_total_mib=24576,
                vram_used_mib=2000,
                vram_free_mib=22576,
                simulated=True,
            )
        ],
        pools=[],
        queue=statusfile.QueueRow(
            depth=0, by_priority={}, capacity=16, full_policy="reject", running=0
        ),
    )
    state_dir.mkdir(parents=True, exist_ok=True)
    path = state_dir / "status.json"
    atomic.write_json(path, data.model_dump(mode="json"), durable=False)
    if written_at is not None:
        os.utime(path, (written_at, written_at))
    return path


def dead_pid() -> int:
    """The pid of a process that has exited and been reaped."""
    child = subprocess.Popen([sys.executable, "-S", "-c", ""])
    child.wait()
    return child.pid
