"""Fault injection for the sim child: the ways a real llama-server fails, on demand.

`plugins.sim_server` reads them from `--options-json` "faults" (the fields of
`state.desired.SimFaults`, which the engine has validated) and asks here at each point where a
fault can strike; `plugins.sim_protocol` asks while generating. Each fault announces itself on
the child's log, so a test or a person reading the replica's log sees it was injected:

- crash_at_start: exit 1 before listening (`crash_at_start`);
- hang_before_ready: load, book VRAM, then never answer /health 200 (`hang_before_ready`);
- oom_at_load: loading fails with a CUDA-style out-of-memory error (`sim_bookings.book(fail=)`);
- die_after_tokens: exit 134 abruptly once that many tokens went out, with no goodbye and no
  unbooking, like a crashed CUDA kernel (`after_tokens`);
- ignore_sigterm: SIGTERM does nothing, so only the stopper's SIGKILL ends it (`on_sigterm`);
- leave_child: start a helper process in the engine's process group that ignores SIGTERM, as
  a real engine's compiler or download helper may, so stopping the engine alone leaves it
  running (`leave_child`);
- extra_vram_mib: book that much more VRAM than the engine's estimate, as a real engine does
  when the estimate is wrong (`sim_server.book`).

Standard library only: the sim child runs without site-packages (`python -S`).
"""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class Faults:
    crash_at_start: bool = False
    hang_before_ready: bool = False
    die_after_tokens: int | None = None
    oom_at_load: bool = False
    ignore_sigterm: bool = False
    leave_child: bool = False
    extra_vram_mib: int = 0


def parse(raw: Mapping[str, Any] | None) -> Faults:
    """The faults of an options object; absent or falsy ones are off, unknown ones ignored."""
    raw = raw or {}
    die_after = raw.get("die_after_tokens")
    return Faults(
        crash_at_start=bool(raw.get("crash_at_start")),
        hang_before_ready=bool(raw.get("hang_before_ready")),
        die_after_tokens=None if die_after is None else int(die_after),
        oom_at_load=bool(raw.get("oom_at_load")),
        ignore_sigterm=bool(raw.get("ignore_sigterm")),
        leave_child=bool(raw.get("leave_child")),
        extra_vram_mib=int(raw.get("extra_vram_mib") or 0),
    )


def crash_at_start(faults: Faults) -> bool:
    """True (after saying so on stderr) when the child must exit 1 before listening."""
    if faults.crash_at_start:
        _say("sim: fault crash_at_start: simulated crash during start-up", err=True)
    return faults.crash_at_start


def hang_before_ready(faults: Faults) -> bool:
    """True (after saying so) when the loaded child must never become ready."""
    if faults.hang_before_ready:
        _say("sim: fault hang_before_ready: loaded, never becoming ready")
    return faults.hang_before_ready


def on_sigterm(faults: Faults, loop: asyncio.AbstractEventLoop, stop: Callable[[], None]) -> None:
    """Make SIGTERM call `stop`, or be ignored under ignore_sigterm."""
    if faults.ignore_sigterm:
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
    else:
        loop.add_signal_handler(signal.SIGTERM, stop)


def leave_child(faults: Faults) -> None:
    """Under leave_child, start a helper in this process group that ignores SIGTERM and lives
    on its own; only a SIGKILL of the whole group ends it."""
    if faults.leave_child:
        code = (
            "import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); time.sleep(3600)"
        )
        subprocess.Popen([sys.executable, "-S", "-c", code], start_new_session=False)
        _say("sim: fault leave_child: started a helper that ignores SIGTERM")


def after_tokens(faults: Faults, produced: int) -> None:
    """Die abruptly once `produced` tokens went out under die_after_tokens. Called before the
    first token (produced=0, so die_after_tokens=0 dies before answering) and after each."""
    limit = faults.die_after_tokens
    if limit is not None and produced >= limit:
        _say(f"sim: fault die_after_tokens: dying abruptly after {produced} tokens", err=True)
        os._exit(134)


def _say(line: str, *, err: bool = False) -> None:
    print(line, file=sys.stderr if err else sys.stdout, flush=True)
