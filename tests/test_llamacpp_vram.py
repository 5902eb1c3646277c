"""The llamacpp VRAM estimate: every recorded H200 row within 10 % (in fact 1 %), the KV cache
as llama.cpp sizes it for each cache type, sliding windows, flash attention, and the flags
that change them."""

from __future__ import annotations

import json
import math
import re
from pathlib import Path
from typing import Any

import pytest

from plugins import engine_llamacpp, gguf_info, interfaces, llamacpp_vram
from tests import tiny_gguf

FIXTURES = Path("/work/shared/fixtures/llama-server")
if not FIXTURES.is_dir():  # the shared folder beside this checkout
    FIXTURES = Path(__file__).resolve().parents[2] / "shared/fixtures/llama-server"
MIB = 1024 * 1024


def vram_samples() -> list[dict[str, Any]]:
    lines = (FIXTURES / "vram-h200-sample.jsonl").read_text().splitlines()
    return [json.loads(line) for line in lines if line.strip()]


def logged_mib(row: dict[str, Any], pattern: str) -> float:
    for line in row["buffers"]:
        if m := re.search(pattern + r"\s*=\s*([0-9.]+) MiB", line):
            return float(m.group(1))
    raise AssertionError(f"no {pattern!r} in the sample")


def sample_geometry(row: dict[str, Any]) -> dict[str, int]:
    """The rows record no GGUF, only the file size and llama.cpp's buffer lines, so the model's
    shape is derived from what they have, with the fixture README's "2048 wide, 8 KV heads of
    64" for what they do not:
    - layers: the KV line ("16 layers"); KV width = KV bytes / (2 × layers × cells × 2 bytes)
      = 512 = 8 heads × 64, so 32 heads of 64 across 2048;
    - vocabulary: token_embd stays on the CPU (the "CPU_Mapped model buffer", 1.01 MiB) and is
      vocab × 2048 × 2 bytes: 259 rows;
    - feed-forward width: what the file size leaves for 16 × 3 F16 matrices of 2048 × n_ff,
      rounded to 256: 8192.
    The test then checks that a file of that shape has the recorded size, to 0.01 %."""
    n_embd, head_dim = 2048, 64
    kv_line = next(line for line in row["buffers"] if "cells," in line)
    layers = int(re.search(r"(\d+) layers", kv_line).group(1))  # type: ignore[union-attr]
    cells = int(re.search(r"(\d+) cells", kv_line).group(1))  # type: ignore[union-attr]
    kv_width = logged_mib(row, "CUDA0 KV buffer size") * MIB / (2 * layers * cells * 2)
    n_vocab = round(logged_mib(row, "CPU_Mapped model buffer size") * MIB / (n_embd * 2))
    attention = 2 * (2 * n_embd * n_embd + 2 * n_embd * kv_width) + 2 * 4 * n_embd
    rest = row["size_bytes"] - 2 * n_vocab * n_embd * 2 - layers * attention
    n_ff = round(rest / (layers * 3 * n_embd * 2) / 256) * 256
    return {
        "n_layer": layers,
        "n_embd": n_embd,
        "n_head": n_embd // head_dim,
        "n_head_kv": int(kv_width) // head_dim,
        "n_ff": n_ff,
        "n_vocab": n_vocab,
    }


def spec(
    model_path: Path | None, *, ctx: int, slots: int = 1, flags: tuple[str, ...] = (), size: int = 1
) -> interfaces.ReplicaSpec:
    return interfaces.ReplicaSpec(
        replica_id="chat-0",
        pool_id="chat",
        engine="llamacpp",
        model_id="m",
        model_ref="file:m.gguf",
        model_path=model_path,
        model_size_mib=size,
        model_digest=None,
        devices=(0,),
        ctx=ctx,
        slots=slots,
        spec_hash="h",
        state_dir=Path("/nonexistent"),
        flags=flags,
    )


@pytest.mark.parametrize("row", vram_samples(), ids=lambda r: f"ctx{r['ctx']}-fa-{r['fa']}")
def test_every_h200_sample_is_estimated_within_ten_percent_from_the_gguf(
    tmp_path: Path, row: dict[str, Any]
) -> None:
    model = tiny_gguf.write_shaped(tmp_path / "m1b.gguf", **sample_geometry(row))
    assert model.stat().st_size == pytest.approx(row["size_bytes"], rel=1e-4)
    replica = spec(model, ctx=row["ctx"], slots=row["slots"], flags=("-fa", row["fa"]))
    estimate = engine_llamacpp.LlamaCppEngine().estimate_vram_mib(replica)
    measured = row["nvml_after_request"] / MIB
    assert abs(estimate - measured) <= 0.10 * measured
    assert measured <= estimate <= measured * 1.02  # in fact: never under, at most 2 % over

    info = gguf_info.inspect(model)
    s = llamacpp_vram.settings(replica.flags)
    kv = llamacpp_vram.kv_cache_bytes(info, s, ctx=row["ctx"], slots=row["slots"]) / MIB
    assert kv == logged_mib(row, "CUDA0 KV buffer size")
    compute = llamacpp_vram.compute_buffer_bytes(info, s, ctx=row["ctx"], slots=row["slots"])
    logged = logged_mib(row, "CUDA0 compute buffer size")
    assert logged <= math.ceil(compute / MIB) <= logged + 3
    weights = logged_mib(row, "CUDA0 model buffer size") + logged_mib(
        row, "CPU_Mapped model buffer size"
    )
    assert info.weight_bytes / MIB == pytest.approx(weights, abs=0.02)


@pytest.fixture(scope="module")
def m8b(tmp_path_factory: pytest.TempPathFactory) -> gguf_info.ModelInfo:
    """An 8B llama 3 shape: 32 layers, 8 KV heads of 128."""
    path = tiny_gguf.write_shaped(
        tmp_path_factory.mktemp("m8b") / "m8b.gguf", n_layer=32, n_embd=4096, n_head=32,
        n_head_kv=8, n_ff=14336, n_vocab=128256,
    )  # fmt: skip
    return gguf_info.inspect(path)


@pytest.mark.parametrize(
    ("flags", "bytes_per_element"),
    [
        ((), 2.0),
        (("-ctk", "q8_0", "-ctv", "q8_0"), 34 / 32),
        (("--cache-type-k=q4_0", "--cache-type-v=q4_0"), 18 / 32),
    ],
)
def test_the_kv_cache_is_two_times_layers_cells_kv_heads_head_dim_and_element_bytes(
    m8b: gguf_info.ModelInfo, flags: tuple[str, ...], bytes_per_element: float
) -> None:
    s = llamacpp_vram.settings(flags)
    got = llamacpp_vram.kv_cache_bytes(m8b, s, ctx=8192, slots=4)
    assert got == 2 * 32 * (8192 * 4) * 8 * 128 * bytes_per_element


def test_k_and_v_types_are_counted_separately(m8b: gguf_info.ModelInfo) -> None:
    s = llamacpp_vram.settings(("-ctk", "q8_0"))
    got = llamacpp_vram.kv_cache_bytes(m8b, s, ctx=1024, slots=1)
    assert got == 32 * 1024 * 8 * 128 * (34 / 32 + 2)


def test_sliding_window_layers_hold_only_window_and_ubatch_cells_per_slot(tmp_path: Path) -> None:
    path = tiny_gguf.write_shaped(
        tmp_path / "gemma3.gguf", arch="gemma3", n_layer=12, n_embd=1024, n_head=8,
        n_head_kv=2, n_ff=2048, n_vocab=1000, head_dim=128,
        keys={"{arch}.attention.sliding_window": 1024, "{arch}.attention.key_length": 128,
              "{arch}.attention.value_length": 128},
    )  # fmt: skip
    info = gguf_info.inspect(path)
    per_cell_layer = 2 * 2 * 128 * 2  # K and V, 2 KV heads of 128, f16
    s = llamacpp_vram.settings(())
    got = llamacpp_vram.kv_cache_bytes(info, s, ctx=32768, slots=2)
    # 2 full layers of 65536 cells; 10 sliding ones of 2 × pad256(1024 + 512) = 3072 cells
    assert got == per_cell_layer * (2 * 65536 + 10 * 3072)
    unified = llamacpp_vram.settings(("--kv-unified",))
    got = llamacpp_vram.kv_cache_bytes(info, unified, ctx=32768, slots=2)
    assert got == per_cell_layer * (2 * 65536 + 10 * 2560)  # pad256(1024 × 2 + 512)
    full = llamacpp_vram.settings(("--swa-full",))
    assert llamacpp_vram.kv_cache_bytes(info, full, ctx=32768, slots=2) == (
        per_cell_layer * 12 * 65536
    )
    small = llamacpp_vram.kv_cache_bytes(info, s, ctx=512, slots=1)
    assert small == per_cell_layer * 12 * 512  # a window wider than ctx changes nothing


def test_layers_without_kv_heads_hold_no_cache(tmp_path: Path) -> None:
    path = tiny_gguf.write_shaped(
        tmp_path / "hybrid.gguf", n_layer=4, n_embd=256, n_head=4, n_head_kv=[2, 0, 0, 2],
        n_ff=512, n_vocab=300,
    )  # fmt: skip
    info = gguf_info.inspect(path)
    got = llamacpp_vram.kv_cache_bytes(info, llamacpp_vram.settings(()), ctx=1000, slots=1)
    assert got == 2 * 2 * 1024 * 2 * 64 * 2  # ctx 1000 holds 1024 cells (padded to 256)


def test_a_context_is_counted_as_the_cells_llama_cpp_pads_it_to() -> None:
    """Seen on llama-server: `-c 128` holds 256 cells, `-c 300 -np 3` 768 (100 a slot, each
    padded to 256): the estimate counts those, never fewer."""
    plain = llamacpp_vram.settings(())
    assert llamacpp_vram.full_cells(plain, ctx=128, slots=1) == 256
    assert llamacpp_vram.full_cells(plain, ctx=100, slots=3) == 768
    assert llamacpp_vram.full_cells(plain, ctx=4096, slots=2) == 8192  # no change
    unified = llamacpp_vram.settings(("--kv-unified",))
    assert llamacpp_vram.full_cells(unified, ctx=100, slots=3) == 512


def test_flash_attention_off_reserves_every_heads_scores(m8b: gguf_info.ModelInfo) -> None:
    on = llamacpp_vram.compute_buffer_bytes(m8b, llamacpp_vram.settings(()), ctx=8192, slots=1)
    off_settings = llamacpp_vram.settings(("-fa", "off"))
    off = llamacpp_vram.compute_buffer_bytes(m8b, off_settings, ctx=8192, slots=1)
    # llama.cpp logs 258.5 MiB (fa on) and 560 MiB (fa off) for this shape at 8192 cells
    assert on / MIB == pytest.approx(258.5, abs=1)
    assert off / MIB == pytest.approx(560, rel=0.03)
    # each slot's attention reads only its own cells (llama-server's default split cache)
    four = llamacpp_vram.compute_buffer_bytes(m8b, off_settings, ctx=8192, slots=4)
    assert four == off


def test_a_smaller_ubatch_shrinks_the_compute_buffer(m8b: gguf_info.ModelInfo) -> None:
    full = llamacpp_vram.compute_buffer_bytes(m8b, llamacpp_vram.settings(()), ctx=4096, slots=1)
    half = llamacpp_vram.settings(("-ub", "256"))
    assert half.ubatch == 256
    misc = llamacpp_vram.COMPUTE_MISC_BYTES
    got = llamacpp_vram.compute_buffer_bytes(m8b, half, ctx=4096, slots=1)
    assert got == (full - misc) // 2 + misc


@pytest.mark.parametrize(
    ("flags", "expected"),
    [
        ((), llamacpp_vram.Settings()),
        (("-fa", "off"), llamacpp_vram.Settings(flash_attention=False)),
        (("--flash-attn=off",), llamacpp_vram.Settings(flash_attention=False)),
        (("-fa", "auto"), llamacpp_vram.Settings()),
        (("-ctk", "Q8_0", "-ctv", "q4_0"), llamacpp_vram.Settings(type_k="q8_0", type_v="q4_0")),
        (("-ub", "128", "-b", "64"), llamacpp_vram.Settings(ubatch=64)),
        (("-ub", "lots"), llamacpp_vram.Settings()),
        (("-kvu", "--swa-full"), llamacpp_vram.Settings(kv_unified=True, swa_full=True)),
        (("-kvu", "-no-kvu"), llamacpp_vram.Settings()),
    ],
)
def test_the_pools_flags_are_read_as_llama_server_reads_them(
    flags: tuple[str, ...], expected: llamacpp_vram.Settings
) -> None:
    assert llamacpp_vram.settings(flags) == expected


def test_without_a_file_the_estimate_uses_size_mib_and_an_8b_llamas_geometry(
    tmp_path: Path, m8b: gguf_info.ModelInfo
) -> None:
    engine = engine_llamacpp.LlamaCppEngine()
    missing = engine.estimate_vram_mib(spec(tmp_path / "not-yet.gguf", ctx=4096, size=4500))
    assert missing == engine.estimate_vram_mib(spec(None, ctx=4096, size=4500))
    s = llamacpp_vram.settings(())
    kv = llamacpp_vram.kv_cache_bytes(llamacpp_vram.DEFAULT_GEOMETRY, s, ctx=4096, slots=1)
    assert kv / MIB == 4096 * 0.125
    fetched = llamacpp_vram.estimate_mib(m8b, (), ctx=4096, slots=1, size_mib=4500)
    assert missing - 4500 == fetched - math.ceil(m8b.weight_bytes / MIB)


def test_a_file_that_is_not_gguf_falls_back_to_size_mib_for_the_estimate(tmp_path: Path) -> None:
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"not a model at all, just some bytes" * 4)
    engine = engine_llamacpp.LlamaCppEngine()
    assert engine.estimate_vram_mib(spec(bad, ctx=4096, size=4500)) == engine.estimate_vram_mib(
        spec(None, ctx=4096, size=4500)
    )


def test_the_engine_reads_a_file_again_only_when_it_changes(tmp_path: Path) -> None:
    path = tiny_gguf.write_shaped(
        tmp_path / "m.gguf", n_layer=2, n_embd=256, n_head=4, n_head_kv=2, n_ff=512, n_vocab=300
    )
    engine = engine_llamacpp.LlamaCppEngine()
    first = engine.estimate_vram_mib(spec(path, ctx=65536))
    assert engine.model_info(path) is engine.model_info(path)
    tiny_gguf.write_shaped(
        path, n_layer=8, n_embd=256, n_head=4, n_head_kv=2, n_ff=512, n_vocab=300
    )  # a new version of the file: 4 times the layers, 4 times the KV cache
    assert engine.estimate_vram_mib(spec(path, ctx=65536)) > first
