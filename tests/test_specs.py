"""The VRAM arithmetic of `reconciler.specs` that status and the estimate warning read:
per-process measures summed per replica, and when an estimate counts as off."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from reconciler import specs
from state import observed


def gpu(index: int, processes: dict[int, int]) -> observed.Gpu:
    return observed.Gpu(
        index=index,
        uuid=f"GPU-{index}",
        name="NVIDIA H200",
        vram_total_mib=143155,
        vram_used_mib=sum(processes.values()),
        vram_free_mib=143155 - sum(processes.values()),
        processes=tuple(observed.GpuProcess(pid, mib) for pid, mib in processes.items()),
    )


def test_a_replica_on_two_gpus_is_measured_as_the_sum_of_both() -> None:
    snapshot = observed.GpuSnapshot(
        gpus=(gpu(0, {10: 2000, 11: 700}), gpu(1, {10: 1500})), simulated=True
    )
    assert specs.measured_by_pid(snapshot) == {10: 3500, 11: 700}
    assert specs.measured_by_pid(None) == {}


def test_an_estimate_is_off_beyond_fifteen_percent_either_way() -> None:
    assert specs.vram_off(2771, 2746) is None  # the H200 sample: 1 % over
    assert specs.vram_off(1000, 1150) is None
    assert specs.vram_off(1000, 1151) == 0.151
    assert specs.vram_off(1000, 849) == -0.151
    assert specs.vram_off(1000, None) is None  # not measured (yet, or no NVML)


@given(st.integers(1, 10**6), st.integers(0, 10**6))
def test_vram_off_is_the_relative_difference_whenever_it_speaks(estimated: int, used: int) -> None:
    off = specs.vram_off(estimated, used)
    relative = (used - estimated) / estimated
    assert off == (relative if abs(relative) > specs.VRAM_TOLERANCE else None)
