"""The `llamacpp` engine's VRAM estimate for one replica: pure arithmetic over the model's
geometry (`plugins.gguf_info`, read from the GGUF) and the pool's flags.

`engine_llamacpp.LlamaCppEngine.estimate_vram_mib` calls `estimate_mib`; planning places
replicas by it and status shows it beside what NVML measures. Checked against every row of
/work/shared/fixtures/llama-server/vram-h200-sample.jsonl (within 1 %, and what llama.cpp logs
for the KV cache to the MiB). The formula, per replica of `slots` slots of `ctx` tokens:

  weights         the GGUF's tensor bytes ("CUDA0 model buffer size"); while the file is not
                  there, models.<id>.size_mib
+ KV cache        2 × layers × cells × kv_heads × head_dim × bytes per element, where cells
                  is slots × pad256(ctx) (llama.cpp pads each sequence's context to 256
                  cells; pad256(ctx × slots) with --kv-unified)
                  (K and V each: f16 2 bytes, q8_0 34/32, q4_0 18/32, … as llama.cpp's block
                  sizes, from -ctk/--cache-type-k and -ctv/--cache-type-v; f16 by default),
                  summed layer by layer with each layer's own KV heads and head sizes;
                  a sliding-window layer holds per slot only pad256(min(ctx, window + ubatch))
                  cells (with --kv-unified pad256(min(ctx×slots, window×slots + ubatch)),
                  with --swa-full all of them), as llama_kv_cache_iswa sizes it
+ compute buffer  flash attention on (llama-server's default on CUDA):
                    activations + the f16 mask, 2 × ubatch × n_kv, + 1 MiB
                  off (-fa off): the f32 scores and mask of every head at once,
                    max(activations, 4 × ubatch × n_kv × (heads + 1) + 20 × ubatch × n_embd)
                    + 1 MiB
                  where activations = 4 × ubatch × max(vocab, 3 × (n_ff + n_embd)) bytes,
                  n_kv is the cells one slot sees (ctx; ctx × slots with --kv-unified) and
                  ubatch is -ub/--ubatch-size (512)
+ process         720 MiB (CUDA context and cuBLAS; the H200 samples measured 697–707 MiB
                  per process after the first request)

Without a file to read, the geometry is an 8B llama 3's (`DEFAULT_GEOMETRY`: 32 layers, 8 KV
heads of 128, 0.125 MiB of f16 KV per token, vocabulary 128256).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

from plugins import gguf_info, gguf_reading

PROCESS_OVERHEAD_MIB = 720
UBATCH = 512
SWA_PAD = 256  # llama.cpp pads the sliding-window cache to 256 cells
COMPUTE_MISC_BYTES = 1 * 1024 * 1024  # positions, norms, the output ids: ~0.01 MiB measured
F16_BYTES = 2.0
_MIB = 1024 * 1024
DEFAULT_GEOMETRY = gguf_info.ModelInfo(
    architecture="llama",
    context_length=8192,
    n_embd=4096,
    n_ff=14336,
    n_vocab=128256,
    layers=tuple(gguf_info.Layer(32, 8, 128, 128, sliding=False) for _ in range(32)),
    sliding_window=None,
    weight_bytes=0,
    tensors=(),
    metadata={},
)


@dataclass(frozen=True)
class Settings:
    """What the pool's flags change about llama-server's memory."""

    flash_attention: bool = True
    type_k: str = "f16"
    type_v: str = "f16"
    ubatch: int = UBATCH
    kv_unified: bool = False
    swa_full: bool = False


def _value(flags: Sequence[str], names: tuple[str, ...]) -> str | None:
    """The last value given to any of `names`, as `-x v` or `--xx=v`."""
    found = None
    for i, flag in enumerate(flags):
        name, eq, value = flag.partition("=")
        if name in names:
            found = value if eq else (flags[i + 1] if i + 1 < len(flags) else None)
    return found


def _switch(flags: Sequence[str], on: tuple[str, ...], off: tuple[str, ...]) -> bool | None:
    last = None
    for flag in flags:
        if flag in on:
            last = True
        elif flag in off:
            last = False
    return last


def flash_attention(flags: Sequence[str]) -> bool:
    """Whether the pool's flags leave flash attention on (llama-server's `auto` is on on CUDA)."""
    on = True
    for i, flag in enumerate(flags):
        name, eq, value = flag.partition("=")
        if name in ("-fa", "--flash-attn"):
            if not eq:
                value = flags[i + 1] if i + 1 < len(flags) else "on"
            on = value.lower() not in ("off", "0", "false", "disabled")
        elif name == "--no-flash-attn":
            on = False
    return on


def _positive(text: str | None, default: int) -> int:
    try:
        value = int(text) if text is not None else default
    except ValueError:
        return default
    return value if value > 0 else default


def settings(flags: Sequence[str]) -> Settings:
    """The memory-relevant settings the pool's `flags` give llama-server."""
    ubatch = _positive(_value(flags, ("-ub", "--ubatch-size")), UBATCH)
    batch = _positive(_value(flags, ("-b", "--batch-size")), 2048)
    return Settings(
        flash_attention=flash_attention(flags),
        type_k=(_value(flags, ("-ctk", "--cache-type-k")) or "f16").lower(),
        type_v=(_value(flags, ("-ctv", "--cache-type-v")) or "f16").lower(),
        ubatch=min(ubatch, batch),
        kv_unified=bool(_switch(flags, ("-kvu", "--kv-unified"), ("-no-kvu", "--no-kv-unified"))),
        swa_full=bool(_switch(flags, ("--swa-full",), ())),
    )


def element_bytes(type_name: str) -> float:
    """Bytes per cached element of a KV cache type; an unknown name counts as f16 (llama-server
    refuses it at start anyway)."""
    found = gguf_reading.type_bytes(type_name)
    return found if found is not None else F16_BYTES


def _pad(n: int, to: int) -> int:
    return -(-n // to) * to


def sliding_cells(model: gguf_info.ModelInfo, s: Settings, *, ctx: int, slots: int) -> int:
    """The cells a sliding-window layer holds for all slots together."""
    window = model.sliding_window or 0
    if s.swa_full or window <= 0:
        return ctx * slots
    if s.kv_unified:
        return _pad(min(ctx * slots, window * slots + s.ubatch), SWA_PAD)
    return slots * _pad(min(ctx, window + s.ubatch), SWA_PAD)


def full_cells(s: Settings, *, ctx: int, slots: int) -> int:
    """The cells a full-attention layer holds for all slots together: llama.cpp pads each
    sequence's context (the whole context with --kv-unified) up to a multiple of 256 (`-c 128`
    holds 256 cells; `-c 300 -np 3`, 768)."""
    if s.kv_unified:
        return _pad(ctx * slots, SWA_PAD)
    return slots * _pad(ctx, SWA_PAD)


def kv_cache_bytes(model: gguf_info.ModelInfo, s: Settings, *, ctx: int, slots: int) -> float:
    """K and V of every layer that has them, each layer for the cells it holds."""
    full, sliding = (
        full_cells(s, ctx=ctx, slots=slots),
        sliding_cells(model, s, ctx=ctx, slots=slots),
    )
    k_bytes, v_bytes = element_bytes(s.type_k), element_bytes(s.type_v)
    return sum(
        (sliding if layer.sliding else full)
        * layer.n_head_kv
        * (layer.head_dim_k * k_bytes + layer.head_dim_v * v_bytes)
        for layer in model.layers
    )


def compute_buffer_bytes(model: gguf_info.ModelInfo, s: Settings, *, ctx: int, slots: int) -> int:
    """The scheduler's compute buffer, reserved for a full ubatch."""
    u = s.ubatch
    n_kv = ctx * slots if s.kv_unified else ctx  # the cells one stream's attention reads
    activations = 4 * u * max(model.n_vocab, 3 * (model.n_ff + model.n_embd))
    if s.flash_attention:
        masks = 2 * u * n_kv
        if any(layer.sliding for layer in model.layers):
            per_stream = slots if s.kv_unified else 1
            masks += 2 * u * sliding_cells(model, s, ctx=ctx, slots=per_stream)
        return activations + masks + COMPUTE_MISC_BYTES
    scores = 4 * u * n_kv * (model.n_head + 1) + 20 * u * model.n_embd
    return max(activations, scores) + COMPUTE_MISC_BYTES


def estimate_mib(
    model: gguf_info.ModelInfo | None,
    flags: Sequence[str],
    *,
    ctx: int,
    slots: int,
    size_mib: int,
) -> int:
    """Weights + KV cache + compute buffer + process overhead of one replica, in MiB.
    `model` None (no file to read yet): DEFAULT_GEOMETRY and `size_mib` for the weights."""
    s = settings(flags)
    geometry = model or DEFAULT_GEOMETRY
    weights = math.ceil(model.weight_bytes / _MIB) if model is not None else size_mib
    return (
        weights
        + math.ceil(kv_cache_bytes(geometry, s, ctx=ctx, slots=slots) / _MIB)
        + math.ceil(compute_buffer_bytes(geometry, s, ctx=ctx, slots=slots) / _MIB)
        + PROCESS_OVERHEAD_MIB
    )
