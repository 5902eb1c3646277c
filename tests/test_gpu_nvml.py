"""The NVML observer, against a fake pynvml built from readings of a real idle H200."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pluggy
import pytest

from plugins import gpu_nvml, hookspecs, interfaces
from state import desired, observed
from tests import fake_pynvml

MIB = 1024 * 1024
LLAMA_SERVER_BYTES = 729808896  # a llama-server with a tiny model, as NVML listed it


def observe(nvml: fake_pynvml.FakeNvml) -> observed.GpuSnapshot:
    observer = gpu_nvml.open_nvml(nvml)
    try:
        return observer.observe()
    finally:
        observer.close()


def test_the_recorded_h200_reads_as_recorded() -> None:
    snapshot = observe(fake_pynvml.FakeNvml())

    assert snapshot.simulated is False
    assert snapshot.errors == ()
    (gpu,) = snapshot.gpus
    assert gpu.index == 0
    assert gpu.name == "NVIDIA H200"
    assert gpu.uuid == "GPU-9ee83bfe-8e73-ff99-ed65-23d0163f6beb"
    assert gpu.pci_bus_id == "00000000:00:06.0"
    assert gpu.vram_total_mib == 150754820096 // MIB == 143771
    assert gpu.vram_used_mib == 616  # 615.06 MiB, rounded up
    assert gpu.vram_free_mib == 150109880320 // MIB == 143155  # rounded down
    assert gpu.utilization_pct == 0
    assert gpu.temperature_c == 32
    assert gpu.power_mw == 77266
    assert gpu.mig_enabled is False
    assert gpu.processes == ()
    assert gpu.simulated is False
    assert gpu.error is None


def test_a_running_engine_is_listed_with_its_memory() -> None:
    nvml = fake_pynvml.FakeNvml()
    nvml.add_process(0, pid=4242, used_bytes=LLAMA_SERVER_BYTES)

    (gpu,) = observe(nvml).gpus

    assert gpu.processes == (observed.GpuProcess(pid=4242, used_mib=696),)
    assert gpu.vram_used_mib == 616 + 696
    assert gpu.vram_free_mib == 143155 - 696


def test_a_process_whose_memory_the_driver_cannot_tell_counts_zero() -> None:
    nvml = fake_pynvml.FakeNvml()
    nvml.add_process(0, pid=7, used_bytes=None)

    (gpu,) = observe(nvml).gpus

    assert gpu.processes == (observed.GpuProcess(pid=7, used_mib=0),)


def test_a_second_gpu_is_reported_under_its_own_index() -> None:
    nvml = fake_pynvml.FakeNvml()
    nvml.add_gpu(
        name="NVIDIA GeForce RTX 3060",
        mem_total=12 * 1024 * MIB,
        mem_used=300 * MIB,
        mem_free=(12 * 1024 - 300) * MIB,
        temp=45,
        mig=[1, 1],
    )

    snapshot = observe(nvml)

    assert [g.index for g in snapshot.gpus] == [0, 1]
    second = snapshot.by_index(1)
    assert second is not None
    assert second.name == "NVIDIA GeForce RTX 3060"
    assert second.uuid == "GPU-fake-0001"
    assert (second.vram_total_mib, second.vram_used_mib, second.vram_free_mib) == (
        12288,
        300,
        11988,
    )
    assert second.temperature_c == 45
    assert second.mig_enabled is True


def test_a_failing_reading_is_reported_on_that_gpu_and_the_rest_still_read() -> None:
    nvml = fake_pynvml.FakeNvml()
    nvml.add_gpu()
    nvml.fail(1, "nvmlDeviceGetPowerUsage", fake_pynvml.NVMLError_Unknown)

    snapshot = observe(nvml)

    first, second = snapshot.gpus
    assert first.error is None and first.power_mw == 77266
    assert second.power_mw is None
    assert second.error == "power: Unknown Error"
    assert second.temperature_c == 32 and second.vram_free_mib == 143155
    assert snapshot.errors == ("GPU 1: power: Unknown Error",)


def test_a_reading_the_card_does_not_support_is_left_empty_without_an_error() -> None:
    nvml = fake_pynvml.FakeNvml()
    nvml.fail(0, "nvmlDeviceGetMigMode", fake_pynvml.NVMLError_NotSupported)  # GeForce cards
    nvml.fail(0, "nvmlDeviceGetPowerUsage", fake_pynvml.NVMLError_NotSupported)

    snapshot = observe(nvml)

    (gpu,) = snapshot.gpus
    assert gpu.mig_enabled is False and gpu.power_mw is None
    assert gpu.error is None and snapshot.errors == ()


def test_unreadable_memory_offers_no_room_to_place_a_replica() -> None:
    nvml = fake_pynvml.FakeNvml()
    observer = gpu_nvml.open_nvml(nvml)
    observer.observe()
    nvml.fail(0, "nvmlDeviceGetMemoryInfo", fake_pynvml.NVMLError_Timeout)

    (gpu,) = observer.observe().gpus

    assert gpu.vram_free_mib == 0
    assert gpu.vram_used_mib == gpu.vram_total_mib == 143771
    assert gpu.error == "memory: Timeout"


def test_a_gpu_lost_after_start_is_reported_under_its_last_known_identity() -> None:
    nvml = fake_pynvml.FakeNvml()
    nvml.add_gpu()
    observer = gpu_nvml.open_nvml(nvml)
    assert all(g.error is None for g in observer.observe().gpus)

    nvml.lose(1)
    snapshot = observer.observe()

    first, lost = snapshot.gpus
    assert first.error is None
    assert lost.uuid == "GPU-fake-0001" and lost.name == "NVIDIA H200"
    assert lost.vram_free_mib == 0
    assert lost.error is not None and lost.error.startswith("GPU is lost")
    assert "nvidia-smi" in lost.error
    assert len(snapshot.errors) == 1 and snapshot.errors[0].startswith("GPU 1: GPU is lost")


def test_a_gpu_lost_before_its_first_reading_is_still_reported() -> None:
    nvml = fake_pynvml.FakeNvml()
    nvml.add_gpu()
    nvml.lose(1, handle_too=True)

    snapshot = observe(nvml)

    lost = snapshot.by_index(1)
    assert lost is not None and lost.uuid == "" and lost.vram_free_mib == 0
    assert lost.error is not None and lost.error.startswith("GPU is lost")
    assert snapshot.by_index(0) == observe(fake_pynvml.FakeNvml()).gpus[0]


def test_counting_gpus_failing_mid_run_is_reported_not_raised() -> None:
    nvml = fake_pynvml.FakeNvml()
    observer = gpu_nvml.open_nvml(nvml)
    observer.observe()
    nvml.count_error = fake_pynvml.NVMLError_Unknown

    snapshot = observer.observe()

    assert snapshot.errors[0] == "NVML cannot count the GPUs: Unknown Error"
    assert [g.index for g in snapshot.gpus] == [0]  # the known GPU is still read


def test_a_missing_driver_explains_how_to_install_it_and_how_to_simulate() -> None:
    with pytest.raises(interfaces.EnvironmentMissing) as caught:
        gpu_nvml.open_nvml(fake_pynvml.FakeNvml().library_missing())

    missing = caught.value
    assert "NVIDIA driver is not installed" in missing.what
    assert "libnvidia-ml.so.1" in missing.what
    for step in (
        "sudo pacman -S nvidia-open nvidia-utils",
        "nvidia-open",
        "ubuntu-drivers",
        "apt install nvidia-driver",
        "reboot",
        "nvidia-smi",
        "orchctl init --simulate && orchctl serve",
    ):
        assert step in missing.fix


@pytest.mark.parametrize(
    ("error", "said"),
    [
        (fake_pynvml.NVMLError_DriverNotLoaded, "kernel module is not loaded"),
        (fake_pynvml.NVMLError_LibRmVersionMismatch, "different versions"),
        (fake_pynvml.NVMLError_NoPermission, "insufficient permissions"),
        (fake_pynvml.NVMLError_Unknown, "NVML could not start: Unknown Error"),
    ],
)
def test_other_start_failures_say_what_is_wrong(error: type[Exception], said: str) -> None:
    nvml = fake_pynvml.FakeNvml()
    nvml.init_error = error

    with pytest.raises(interfaces.EnvironmentMissing) as caught:
        gpu_nvml.open_nvml(nvml)

    assert said in caught.value.what
    assert "orchctl init --simulate" in caught.value.fix


def test_a_driver_with_no_gpus_is_an_environment_problem_and_nvml_is_shut_down() -> None:
    nvml = fake_pynvml.FakeNvml()
    nvml.gpus.clear()

    with pytest.raises(interfaces.EnvironmentMissing) as caught:
        gpu_nvml.open_nvml(nvml)

    assert "reports no GPUs" in caught.value.what
    assert nvml.initialised == 0 and nvml.shutdowns == 1


def test_close_shuts_nvml_down_once() -> None:
    nvml = fake_pynvml.FakeNvml()
    observer = gpu_nvml.open_nvml(nvml)

    observer.close()
    observer.close()

    assert nvml.initialised == 0 and nvml.shutdowns == 1


def test_the_real_module_on_a_machine_without_a_driver_is_an_environment_problem() -> None:
    try:
        observer = gpu_nvml.open_nvml()
    except interfaces.EnvironmentMissing as missing:
        assert missing.fix  # this machine has no driver: the explanation is what we test
    else:  # pragma: no cover - only on a machine with an NVIDIA driver
        try:
            assert observer.observe().gpus
        finally:
            observer.close()


def test_the_plugin_registers_the_nvml_observer() -> None:
    pm = pluggy.PluginManager(hookspecs.PROJECT)
    pm.add_hookspecs(hookspecs)
    pm.register(gpu_nvml.plugin)
    registered: dict[str, Any] = {}

    pm.hook.orch_register_gpu_observers(register=registered.__setitem__)

    assert list(registered) == ["nvml"]
    try:
        observer = registered["nvml"](desired.DesiredState(), Path("."))
    except interfaces.EnvironmentMissing as missing:  # no driver on this machine
        assert "orchctl init --simulate" in missing.fix
    else:  # pragma: no cover - only on a machine with an NVIDIA driver
        assert observer.name == "nvml"
        observer.close()


def test_facts_name_the_drivers_cuda_version_and_each_gpus_compute_capability() -> None:
    nvml = fake_pynvml.FakeNvml()
    nvml.add_gpu(name="NVIDIA GeForce RTX 4060 Ti", cc=[8, 9])
    nvml.add_gpu(name="NVIDIA GeForce RTX 3090", cc=[8, 6])
    facts = gpu_nvml.read_facts(nvml)
    assert facts.driver == "580.159.04" and facts.cuda == (13, 0)
    assert [g.compute_capability for g in facts.gpus] == [(9, 0), (8, 9), (8, 6)]
    assert gpu_nvml.cuda_archs(facts.gpus) == ("86", "89", "90")
    assert nvml.initialised == 0  # NVML is shut down again


def test_facts_of_a_lost_gpu_leave_its_compute_capability_unknown() -> None:
    nvml = fake_pynvml.FakeNvml()
    nvml.add_gpu(cc=[8, 6])
    nvml.lose(1)
    facts = gpu_nvml.read_facts(nvml)
    assert facts.gpus[1].compute_capability is None and facts.gpus[1].error
    assert gpu_nvml.cuda_archs(facts.gpus) == ("90",)
