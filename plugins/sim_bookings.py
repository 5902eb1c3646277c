"""VRAM bookings on simulated GPUs: the files a sim replica writes and the observer sums.

A booking is `<state_dir>/simgpu/<gpu-index>/<pid>.json` holding
`{"pid", "used_mib", "replica_id"}`, written atomically. It counts only while its process is
alive (`plugins.liveness.running`: a zombie is dead), so a crashed engine frees its memory the
way a real one does, and only under its own pid's name.

Who calls it:
- the sim child (`plugins.sim_server`): `book` once its model is "loaded", which also simulates
  the out-of-memory failure of a GPU without room, and `unbook` when it stops;
- the sim engine (`plugins.engine_sim`): `footprint_mib` as its VRAM estimate, `path_for` and
  `used_mib` to measure a replica, `remove` for the bookings of a child killed before it
  could remove them itself;
- the simulated GPU observer (`plugins.gpu_simulated`): `folder`, `entries` and `write`/`remove`
  (it validates each file against its pydantic model and reports the broken ones).

Standard library only: the sim child imports it and runs without site-packages (`python -S`).
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import math
import os
import re
from collections.abc import Sequence
from pathlib import Path

from plugins import liveness

# The simulated footprint of one replica, booked by the child and estimated by the engine:
# weights + KV cache for ctx × slots tokens at 64 KiB/token (between a 1B and an 8B llama in
# f16) + a fixed 700 MiB for the CUDA context and compute buffers (what llama-server showed on
# an H200, see /work/shared/fixtures/README.md).
KV_MIB_PER_TOKEN = 0.0625
OVERHEAD_MIB = 700

_NAME = re.compile(r"^([0-9]+)\.json$")  # not the temporary files of atomic writes


class OutOfMemory(Exception):
    """A GPU of the mask has no room: the message reads like llama-server's CUDA error."""


def footprint_mib(model_size_mib: int, ctx: int, slots: int) -> int:
    """VRAM of one sim replica: weights + ctx×slots KV at KV_MIB_PER_TOKEN + OVERHEAD_MIB."""
    return model_size_mib + math.ceil(ctx * slots * KV_MIB_PER_TOKEN) + OVERHEAD_MIB


def split_mib(total_mib: int, parts: int) -> list[int]:
    """Split evenly over the GPUs of a mask; the first GPUs take the remainder."""
    share, rest = divmod(total_mib, parts)
    return [share + (1 if i < rest else 0) for i in range(parts)]


def folder(state_dir: Path, gpu: int) -> Path:
    return state_dir / "simgpu" / str(gpu)


def path_for(state_dir: Path, gpu: int, pid: int) -> Path:
    return folder(state_dir, gpu) / f"{pid}.json"


def entries(gpu_folder: Path) -> list[tuple[int, Path]]:
    """(pid from the file name, path) of every booking file in a GPU's folder, by pid.
    No folder, no bookings; another OSError (unreadable folder) is raised."""
    try:
        names = os.listdir(gpu_folder)
    except FileNotFoundError:
        return []
    found = [(m, name) for name in names if (m := _NAME.match(name)) is not None]
    found.sort(key=lambda pair: (len(pair[1]), pair[1]))
    return [(int(m.group(1)), gpu_folder / name) for m, name in found]


def used_mib(path: Path, *, pid: int | None = None) -> int | None:
    """The MiB a booking file holds, or None when it is missing, unreadable or (with `pid`)
    names another process."""
    try:
        booking = json.loads(path.read_bytes())
        owner, mib = int(booking["pid"]), int(booking["used_mib"])
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return None if pid is not None and owner != pid else mib


def live_mib(gpu_folder: Path, *, own_pid: int) -> int:
    """What the live processes other than `own_pid` have booked on one GPU. Lenient: a file
    that cannot be read books nothing (the observer is the one that reports it)."""
    try:
        found = entries(gpu_folder)
    except OSError:
        return 0
    used = 0
    for pid, path in found:
        if pid == own_pid or not liveness.running(pid):
            continue
        used += used_mib(path, pid=pid) or 0
    return used


def write(state_dir: Path, gpu: int, *, pid: int, used_mib: int, replica_id: str) -> Path:
    """Write one booking atomically (never half-read); not fsynced: it dies with the machine."""
    path = path_for(state_dir, gpu, pid)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps({"pid": pid, "used_mib": used_mib, "replica_id": replica_id}))
    os.replace(tmp, path)
    return path


def remove(state_dir: Path, gpu: int, pid: int) -> None:
    """Idempotent."""
    path_for(state_dir, gpu, pid).unlink(missing_ok=True)


def book(
    state_dir: Path,
    *,
    gpus: Sequence[int],
    need_mib: int,
    totals: Sequence[int] | None,
    replica_id: str,
    pid: int,
    fail: bool = False,
) -> list[Path]:
    """Book `need_mib` split over `gpus` for `pid`; return the files written.

    With `totals` (room per GPU of the mask; the last one repeats), a GPU whose live bookings
    leave less than its share raises OutOfMemory and nothing is booked; `fail` (the
    `oom_at_load` fault) raises it on the first GPU whatever the room. A lock file serialises
    replicas loading at the same time, so two of them never both fit into the same room.
    """
    shares = split_mib(need_mib, len(gpus))
    state_dir.mkdir(parents=True, exist_ok=True)
    with open(state_dir / "simgpu.lock", "a+") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        for i, (gpu, need) in enumerate(zip(gpus, shares, strict=True)):
            if fail:
                raise OutOfMemory(_oom_message(gpu, need, "fault oom_at_load"))
            if totals is None:
                continue
            total = totals[min(i, len(totals) - 1)]
            free = total - live_mib(folder(state_dir, gpu), own_pid=pid)
            if free < need:
                raise OutOfMemory(
                    _oom_message(gpu, need, f"{max(free, 0)} MiB free of {total} MiB")
                )
        booked: list[Path] = []
        try:
            for gpu, need in zip(gpus, shares, strict=True):
                booked.append(write(state_dir, gpu, pid=pid, used_mib=need, replica_id=replica_id))
        except BaseException:  # all or nothing: no half-booked mask
            unbook(booked)
            raise
        return booked


def unbook(paths: Sequence[Path]) -> None:
    """Remove the files `book` wrote (already gone is fine)."""
    for path in paths:
        with contextlib.suppress(FileNotFoundError):
            path.unlink()


def _oom_message(gpu: int, need: int, why: str) -> str:
    return (
        f"ggml_backend_cuda_buffer_type_alloc_buffer: allocating {need} MiB on device {gpu}: "
        f"cudaMalloc failed: out of memory ({why})\n"
        f"CUDA error: out of memory\n  current device: {gpu}"
    )
