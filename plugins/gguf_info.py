"""GGUF inspection: a model file's geometry and weight bytes, from its header alone.

The `llamacpp` engine calls `inspect` for every pool with a local model file (its estimate,
`plugins.llamacpp_vram`, sizes the KV cache and the weights from it) and before starting a
replica, so a bad file is refused with a clear reason instead of a crashing engine. The
header is read by `gguf_reading`; this module turns its metadata into a `ModelInfo`.

Rules it keeps:
- A file `gguf_reading` refuses, or one that lacks a key the geometry needs, raises
  `gguf_reading.GgufError`, which names the file and what is wrong.
- Per layer: `head_count`, `head_count_kv` and `feed_forward_length` may be arrays with one
  value per layer (OpenELM; hybrid models put 0 KV heads on their recurrent layers); a scalar
  applies to every layer. Layers past `n_layer - shared_kv_layers` reuse an earlier layer's KV
  cache (gemma3n) and hold none of their own.
- Head sizes are `attention.key_length` / `value_length` (`_swa` variants on sliding layers),
  else embedding_length / head_count, as llama.cpp defaults them.
- Sliding-window layers hold only the window's tokens. Which layers slide: the file's
  `attention.sliding_window_pattern` (a period, or one bool per layer), else the period
  llama.cpp's loader sets for the architecture (`SWA_PERIODS`: in each group of `period`
  layers, the last one attends to everything). Other architectures attend fully everywhere.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from plugins import gguf_reading

# The sliding-window period llama.cpp's loader sets per architecture when the file has no
# pattern (llama-model.cpp, `hparams.set_swa_pattern(n)`), and llama4's fixed chunk size.
SWA_PERIODS = {
    "gemma2": 2,
    "gemma3": 6,
    "gemma3n": 5,
    "gemma-embedding": 6,
    "cohere2": 4,
    "exaone4": 4,
    "gpt-oss": 2,
    "llama4": 4,
}
DEFAULT_WINDOWS = {"llama4": 8192}


@dataclass(frozen=True)
class Layer:
    n_head: int
    n_head_kv: int  # 0: the layer keeps no KV cache of its own
    head_dim_k: int
    head_dim_v: int
    sliding: bool  # holds only the window's tokens


@dataclass(frozen=True)
class ModelInfo:
    architecture: str
    context_length: int | None  # trained context
    n_embd: int
    n_ff: int  # the widest feed-forward of any layer (MoE: experts used × expert width)
    n_vocab: int
    layers: tuple[Layer, ...]
    sliding_window: int | None  # tokens; None when no layer slides
    weight_bytes: int  # sum of the tensor sizes
    tensors: tuple[gguf_reading.Tensor, ...]
    metadata: dict[str, Any]

    @property
    def n_layers(self) -> int:
        return len(self.layers)

    @property
    def n_head(self) -> int:
        return max((layer.n_head for layer in self.layers), default=0)

    @property
    def n_head_kv(self) -> int:
        return max((layer.n_head_kv for layer in self.layers), default=0)


def _per_layer(metadata: dict[str, Any], key: str, n_layer: int, default: int | None) -> list[int]:
    """One value per layer: the array as it is, or the scalar repeated."""
    value = metadata.get(key, default)
    if value is None:
        raise gguf_reading.GgufError(f"missing key {key}")
    if isinstance(value, list):
        if len(value) != n_layer:
            raise gguf_reading.GgufError(f"{key} has {len(value)} values for {n_layer} layers")
        return [int(v) for v in value]
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise gguf_reading.GgufError(f"{key} is {value!r}, not a number")
    return [int(value)] * n_layer


def _sliding(metadata: dict[str, Any], arch: str, n_layer: int) -> tuple[list[bool], int | None]:
    window = metadata.get(f"{arch}.attention.sliding_window", DEFAULT_WINDOWS.get(arch))
    if not isinstance(window, int) or window <= 0:
        return [False] * n_layer, None
    pattern = metadata.get(f"{arch}.attention.sliding_window_pattern", SWA_PERIODS.get(arch))
    if isinstance(pattern, list):
        if len(pattern) != n_layer:
            raise gguf_reading.GgufError(
                f"{arch}.attention.sliding_window_pattern has {len(pattern)} values for "
                f"{n_layer} layers"
            )
        flags = [bool(v) for v in pattern]
    elif isinstance(pattern, int) and not isinstance(pattern, bool):
        # llama.cpp's set_swa_pattern: 0 slides everywhere; else the last of each period is full
        flags = [pattern == 0 or i % pattern < pattern - 1 for i in range(n_layer)]
    else:
        return [False] * n_layer, None
    return flags, window if any(flags) else None


def _vocabulary(
    metadata: dict[str, Any], tensors: tuple[gguf_reading.Tensor, ...], arch: str
) -> int:
    """Rows of the token embedding, else the tokenizer's list, else `vocab_size`, else 0."""
    embd = next((t for t in tensors if t.name == "token_embd.weight"), None)
    if embd is not None and len(embd.shape) > 1:
        return embd.shape[1]
    tokens = metadata.get("tokenizer.ggml.tokens")
    if isinstance(tokens, gguf_reading.Counted):
        return tokens.length
    if isinstance(tokens, list):
        return len(tokens)
    size = metadata.get(f"{arch}.vocab_size")
    return size if isinstance(size, int) else 0


def geometry(metadata: dict[str, Any], tensors: tuple[gguf_reading.Tensor, ...]) -> ModelInfo:
    """The model's shape from its metadata (GgufError without the keys it needs)."""
    arch = metadata.get("general.architecture")
    if not isinstance(arch, str) or not arch:
        raise gguf_reading.GgufError("missing key general.architecture")

    def number(key: str, default: int | None = None) -> int:
        value = metadata.get(key, default)
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise gguf_reading.GgufError(
                f"missing key {key}" if value is None else f"{key} is {value!r}"
            )
        return int(value)

    n_layer = number(f"{arch}.block_count")
    if not 0 < n_layer <= 100_000:
        raise gguf_reading.GgufError(f"{arch}.block_count is {n_layer}")
    n_embd = number(f"{arch}.embedding_length")
    attn = f"{arch}.attention"
    heads = _per_layer(metadata, f"{attn}.head_count", n_layer, 0)
    kv_heads = (
        _per_layer(metadata, f"{attn}.head_count_kv", n_layer, None)
        if f"{attn}.head_count_kv" in metadata
        else list(heads)  # no GQA: a KV head per head
    )
    default_dim = n_embd // max(heads) if max(heads) else 0
    dim_k = number(f"{attn}.key_length", default_dim)
    dim_v = number(f"{attn}.value_length", default_dim)
    dim_k_swa = number(f"{attn}.key_length_swa", dim_k)
    dim_v_swa = number(f"{attn}.value_length_swa", dim_v)
    shared = number(f"{attn}.shared_kv_layers", 0)
    sliding, window = _sliding(metadata, arch, n_layer)
    layers = tuple(
        Layer(
            n_head=heads[i],
            n_head_kv=kv_heads[i] if i < n_layer - shared else 0,
            head_dim_k=dim_k_swa if sliding[i] else dim_k,
            head_dim_v=dim_v_swa if sliding[i] else dim_v,
            sliding=sliding[i],
        )
        for i in range(n_layer)
    )
    n_ff = max(_per_layer(metadata, f"{arch}.feed_forward_length", n_layer, 0))
    experts_used = number(f"{arch}.expert_used_count", 0)
    n_ff = max(n_ff, experts_used * number(f"{arch}.expert_feed_forward_length", 0))
    context = metadata.get(f"{arch}.context_length")
    return ModelInfo(
        architecture=arch,
        context_length=int(context) if isinstance(context, int) else None,
        n_embd=n_embd,
        n_ff=n_ff,
        n_vocab=_vocabulary(metadata, tensors, arch),
        layers=layers,
        sliding_window=window,
        weight_bytes=sum(t.nbytes for t in tensors),
        tensors=tensors,
        metadata=metadata,
    )


def inspect(path: Path) -> ModelInfo:
    """Architecture, context length, per-layer attention geometry and weight bytes of the GGUF
    at `path`, from its header alone. Raises GgufError for a file that is not a usable GGUF."""
    metadata, tensors = gguf_reading.read(path)
    try:
        return geometry(metadata, tensors)
    except gguf_reading.GgufError as e:
        raise gguf_reading.GgufError(f"{path}: {e}") from None
