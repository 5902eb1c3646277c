"""VRAM bookings on simulated GPUs as the sim child makes them: room, out of memory, liveness."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path

import pytest

from plugins import sim_bookings

# Booking for a pid above the kernel's largest pid_max: no process can ever hold it.
NEW_PID = 2**22 + 1


def on_gpu(state_dir: Path, gpu: int) -> dict[str, int]:
    return {
        path.name: json.loads(path.read_text())["used_mib"]
        for path in sorted(sim_bookings.folder(state_dir, gpu).glob("*.json"))
    }


def book(
    state_dir: Path,
    *,
    gpus: Sequence[int] = (0,),
    need_mib: int = 1000,
    totals: Sequence[int] | None = (1500,),
    fail: bool = False,
) -> list[Path]:
    """What the sim child does once loaded, as process NEW_PID."""
    return sim_bookings.book(
        state_dir,
        gpus=gpus,
        need_mib=need_mib,
        totals=totals,
        replica_id="new-0",
        pid=NEW_PID,
        fail=fail,
    )


def test_a_booking_by_a_dead_or_zombie_process_takes_no_room(
    tmp_path: Path, zombie_pid: int
) -> None:
    finished = subprocess.Popen([sys.executable, "-S", "-c", ""])
    finished.wait()
    sim_bookings.write(tmp_path, 0, pid=zombie_pid, used_mib=1400, replica_id="zombie-0")
    sim_bookings.write(tmp_path, 0, pid=finished.pid, used_mib=1400, replica_id="gone-0")

    assert sim_bookings.live_mib(sim_bookings.folder(tmp_path, 0), own_pid=NEW_PID) == 0
    booked = book(tmp_path)

    assert booked == [sim_bookings.path_for(tmp_path, 0, NEW_PID)]
    assert on_gpu(tmp_path, 0)[f"{NEW_PID}.json"] == 1000


def test_a_booking_by_a_live_process_takes_room_and_loading_fails_out_of_memory(
    tmp_path: Path,
) -> None:
    sim_bookings.write(tmp_path, 0, pid=os.getpid(), used_mib=800, replica_id="live-0")

    with pytest.raises(sim_bookings.OutOfMemory) as caught:
        book(tmp_path)

    assert str(caught.value).splitlines() == [
        "ggml_backend_cuda_buffer_type_alloc_buffer: allocating 1000 MiB on device 0: "
        "cudaMalloc failed: out of memory (700 MiB free of 1500 MiB)",
        "CUDA error: out of memory",
        "  current device: 0",
    ]
    assert on_gpu(tmp_path, 0) == {f"{os.getpid()}.json": 800}


def test_a_mask_is_booked_in_shares_or_not_at_all(tmp_path: Path) -> None:
    sim_bookings.write(tmp_path, 1, pid=os.getpid(), used_mib=800, replica_id="live-0")

    with pytest.raises(sim_bookings.OutOfMemory, match="on device 1"):
        book(tmp_path, gpus=[0, 1], need_mib=1001, totals=[1000])
    assert on_gpu(tmp_path, 0) == {}

    paths = book(tmp_path, gpus=[0, 1], need_mib=1001, totals=[1000, 1301])
    assert on_gpu(tmp_path, 0) == {f"{NEW_PID}.json": 501}
    assert on_gpu(tmp_path, 1)[f"{NEW_PID}.json"] == 500
    sim_bookings.unbook(paths)
    sim_bookings.unbook(paths)  # already gone is fine
    assert on_gpu(tmp_path, 0) == {} and NEW_PID not in on_gpu(tmp_path, 1)


def test_the_oom_at_load_fault_fails_whatever_the_room(tmp_path: Path) -> None:
    with pytest.raises(sim_bookings.OutOfMemory, match=r"\(fault oom_at_load\)"):
        book(tmp_path, totals=None, fail=True)
    assert on_gpu(tmp_path, 0) == {}


def test_a_booking_counts_only_under_its_own_pids_name(tmp_path: Path) -> None:
    folder = sim_bookings.folder(tmp_path, 0)
    folder.mkdir(parents=True)
    (folder / f"{os.getpid()}.json").write_text(
        json.dumps({"pid": NEW_PID, "used_mib": 900, "replica_id": "x"})
    )
    (folder / f".{os.getpid()}.json.tmp").write_text("half-written")
    (folder / "notes.json").write_text("{}")

    assert sim_bookings.entries(folder) == [(os.getpid(), folder / f"{os.getpid()}.json")]
    assert sim_bookings.live_mib(folder, own_pid=NEW_PID) == 0


def test_the_footprint_is_split_over_the_mask_first_gpus_taking_the_remainder() -> None:
    assert sim_bookings.footprint_mib(100, 512, 2) == 100 + 64 + sim_bookings.OVERHEAD_MIB
    assert sim_bookings.split_mib(1001, 3) == [334, 334, 333]
