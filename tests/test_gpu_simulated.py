"""The simulated GPU observer: inventory files, bookings of live engines, the plugin factory."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pluggy
import pytest

from plugins import gpu_simulated, hookspecs
from state import desired, observed

WORKSTATION = """\
gpus:
  - index: 0
    name: NVIDIA GeForce RTX 4090
    uuid: GPU-sim-4090
    vram_total_mib: 24576
    vram_used_mib: 400
    utilization_pct: 3
    temperature_c: 41
  - index: 1
    name: NVIDIA GeForce RTX 3060
    uuid: GPU-sim-3060
    vram_total_mib: 12288
"""


@pytest.fixture
def inventory(tmp_path: Path) -> Path:
    path = tmp_path / "inventory.yaml"
    path.write_text(WORKSTATION)
    return path


def observer_for(
    inventory: Path, state_dir: Path, alive: set[int] | None = None
) -> gpu_simulated.SimulatedObserver:
    loaded = gpu_simulated.load_inventory(inventory)
    if alive is None:
        return gpu_simulated.SimulatedObserver(loaded, state_dir=state_dir)
    return gpu_simulated.SimulatedObserver(loaded, state_dir=state_dir, is_alive=alive.__contains__)


def book(state_dir: Path, gpu: int, pid: int, used_mib: int, replica_id: str) -> None:
    gpu_simulated.write_booking(
        state_dir, gpu, gpu_simulated.Booking(pid=pid, used_mib=used_mib, replica_id=replica_id)
    )


def test_inventory_gpus_are_reported_as_unmistakably_simulated(
    inventory: Path, tmp_path: Path
) -> None:
    snapshot = observer_for(inventory, tmp_path / ".orch").observe()

    assert snapshot.simulated is True and snapshot.errors == ()
    first, second = snapshot.gpus
    assert first.name == "SIMULATED NVIDIA GeForce RTX 4090"
    assert second.name == "SIMULATED NVIDIA GeForce RTX 3060"
    assert all(g.simulated for g in snapshot.gpus)
    assert (first.index, first.uuid) == (0, "GPU-sim-4090")
    assert (first.vram_total_mib, first.vram_used_mib, first.vram_free_mib) == (24576, 400, 24176)
    assert (first.utilization_pct, first.temperature_c) == (3, 41)
    assert (second.vram_total_mib, second.vram_used_mib, second.vram_free_mib) == (12288, 0, 12288)
    assert first.processes == () and first.error is None


def test_a_name_already_marked_simulated_is_not_marked_twice(tmp_path: Path) -> None:
    path = tmp_path / "inv.yaml"
    path.write_text("gpus: [{index: 0, name: SIMULATED Test GPU, uuid: u, vram_total_mib: 10}]\n")

    (gpu,) = observer_for(path, tmp_path).observe().gpus

    assert gpu.name == "SIMULATED Test GPU"


def test_bookings_of_live_engines_use_memory_and_show_as_processes(
    inventory: Path, tmp_path: Path
) -> None:
    state = tmp_path / ".orch"
    book(state, 0, 101, 8000, "chat-0")
    book(state, 0, 102, 2000, "small-0")
    book(state, 1, 102, 2000, "small-0")  # one replica split over two GPUs

    snapshot = observer_for(inventory, state, alive={101, 102}).observe()

    first, second = snapshot.gpus
    assert first.vram_used_mib == 400 + 8000 + 2000
    assert first.vram_free_mib == 24576 - 10400
    assert first.processes == (observed.GpuProcess(101, 8000), observed.GpuProcess(102, 2000))
    assert second.processes == (observed.GpuProcess(102, 2000),)
    assert second.vram_free_mib == 12288 - 2000


def test_a_booking_whose_process_died_frees_its_memory(inventory: Path, tmp_path: Path) -> None:
    state = tmp_path / ".orch"
    book(state, 1, 101, 8000, "chat-0")
    observer = observer_for(inventory, state, alive={101})
    assert observer.observe().gpus[1].vram_free_mib == 4288

    observer = observer_for(inventory, state, alive=set())

    gpu = observer.observe().gpus[1]
    assert gpu.vram_free_mib == 12288 and gpu.processes == ()
    # and its file goes: were the pid reused by another process, it would count again
    assert not (state / "simgpu" / "1" / "101.json").exists()
    assert observer_for(inventory, state, alive={101}).observe().gpus[1].vram_free_mib == 12288


def test_liveness_is_checked_against_real_processes(inventory: Path, tmp_path: Path) -> None:
    state = tmp_path / ".orch"
    finished = subprocess.Popen([sys.executable, "-c", "pass"])
    finished.wait()
    book(state, 0, os.getpid(), 1000, "alive-0")
    book(state, 0, finished.pid, 5000, "gone-0")

    gpu = observer_for(inventory, state).observe().gpus[0]

    assert gpu.processes == (observed.GpuProcess(os.getpid(), 1000),)


def test_a_booking_by_a_zombie_process_frees_its_memory(
    inventory: Path, tmp_path: Path, zombie_pid: int
) -> None:
    state = tmp_path / ".orch"
    book(state, 0, zombie_pid, 5000, "zombie-0")  # exited, its parent has not reaped it yet

    gpu = observer_for(inventory, state).observe().gpus[0]

    assert gpu.vram_used_mib == 400 and gpu.processes == ()


def test_removing_a_booking_frees_its_memory(inventory: Path, tmp_path: Path) -> None:
    state = tmp_path / ".orch"
    book(state, 0, 101, 8000, "chat-0")

    gpu_simulated.remove_booking(state, 0, 101)
    gpu_simulated.remove_booking(state, 0, 101)  # idempotent

    assert observer_for(inventory, state, alive={101}).observe().gpus[0].vram_used_mib == 400


def test_a_broken_booking_is_reported_and_ignored(inventory: Path, tmp_path: Path) -> None:
    state = tmp_path / ".orch"
    book(state, 0, 101, 8000, "chat-0")
    folder = state / "simgpu" / "0"
    (folder / "102.json").write_text("{not json")
    (folder / "103.json").write_text(json.dumps({"pid": 999, "used_mib": 1, "replica_id": "x"}))
    (folder / ".104.json.77.tmp").write_text("half-written")

    snapshot = observer_for(inventory, state, alive={101, 102, 103, 999}).observe()

    assert snapshot.gpus[0].vram_used_mib == 400 + 8000
    assert len(snapshot.errors) == 2
    assert "102.json is unreadable" in snapshot.errors[0]
    assert "names pid 999" in snapshot.errors[1]


def test_bookings_beyond_the_gpu_are_reported_as_out_of_memory(
    inventory: Path, tmp_path: Path
) -> None:
    state = tmp_path / ".orch"
    book(state, 1, 101, 8000, "a-0")
    book(state, 1, 102, 8000, "b-0")

    snapshot = observer_for(inventory, state, alive={101, 102}).observe()

    gpu = snapshot.gpus[1]
    assert gpu.vram_free_mib == 0 and gpu.vram_used_mib == 12288
    assert gpu.error is not None and "16000 MiB" in gpu.error and "a-0, b-0" in gpu.error
    assert snapshot.errors == (f"simulated GPU 1: {gpu.error}",)


def test_a_bad_inventory_lists_every_problem_with_its_line(tmp_path: Path) -> None:
    path = tmp_path / "inventory.yaml"
    path.write_text("gpus:\n  - index: 0\n    name: A\n    uuid: a\n    vram_total_mb: 10\n")

    with pytest.raises(gpu_simulated.InventoryError) as caught:
        gpu_simulated.load_inventory(path)

    text = str(caught.value)
    assert f"{path}:5:5: gpus[0].vram_total_mb: unknown key" in text
    assert "did you mean 'vram_total_mib'?" in text
    assert f"{path}:2:5: gpus[0].vram_total_mib: Field required" in text
    assert len(caught.value.errors) == 2


def test_an_inventory_with_a_gpu_index_twice_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "inventory.yaml"
    path.write_text(WORKSTATION.replace("index: 1", "index: 0"))

    with pytest.raises(gpu_simulated.InventoryError) as caught:
        gpu_simulated.load_inventory(path)

    (error,) = caught.value.errors
    assert (error.line, error.field) == (9, "gpus[1].index")
    assert "GPU index 0 is already used by gpus[0]" in error.message


def test_an_inventory_without_gpus_or_file_is_refused(tmp_path: Path) -> None:
    empty = tmp_path / "empty.yaml"
    empty.write_text("gpus: []\n")

    with pytest.raises(gpu_simulated.InventoryError, match="lists no GPUs"):
        gpu_simulated.load_inventory(empty)
    with pytest.raises(gpu_simulated.InventoryError, match="cannot be read"):
        gpu_simulated.load_inventory(tmp_path / "missing.yaml")


def test_the_plugin_factory_resolves_paths_against_the_config_folder(
    inventory: Path, tmp_path: Path
) -> None:
    pm = pluggy.PluginManager(hookspecs.PROJECT)
    pm.add_hookspecs(hookspecs)
    pm.register(gpu_simulated.plugin)
    registered: dict[str, Any] = {}
    pm.hook.orch_register_gpu_observers(register=registered.__setitem__)
    config = desired.DesiredState.model_validate(
        {
            "gpus": {"observer": "simulated", "inventory": "inventory.yaml"},
            "paths": {"state": "var/state"},
        }
    )
    book(tmp_path / "var/state", 0, os.getpid(), 1234, "chat-0")

    observer = registered["simulated"](config, tmp_path)

    assert list(registered) == ["simulated"]
    assert (observer.name, observer.simulated) == ("simulated", True)
    snapshot = observer.observe()
    assert snapshot.gpus[0].vram_used_mib == 400 + 1234
    observer.close()


def test_the_factory_without_an_inventory_says_what_to_set(tmp_path: Path) -> None:
    with pytest.raises(gpu_simulated.InventoryError, match=r"gpus\.inventory"):
        gpu_simulated.open_simulated(desired.DesiredState(), tmp_path)
