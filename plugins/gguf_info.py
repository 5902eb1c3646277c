"""GGUF inspection: a model file's geometry and weight bytes, read from its header alone.

The `llamacpp` engine calls `inspect` for every pool with a local model file (its estimate,
`plugins.llamacpp_vram`, sizes the KV cache and the weights from it) and before starting a
replica, so a bad file is refused with a clear reason instead of a crashing engine. The file is
memory-mapped and only the header, the metadata and the tensor infos are touched: the weights
are never read, so a 1 GB file takes milliseconds. The format's constants (value types, tensor
types and their block sizes) are those of the `gguf` package, llama.cpp's own Python library.

Rules it keeps:
- A file that is not GGUF, has an unknown version, is cut short anywhere (header, metadata,
  tensor infos or tensor data), or lacks a key the geometry needs raises `GgufError`, which
  names the file and what is wrong. Sizes in the file are checked against the file's length
  before they are believed, so a hostile header cannot make it loop or allocate.
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

import functools
import mmap
import os
import struct
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any

MAGIC = b"GGUF"
VERSIONS = (2, 3)
MAX_DIMS = 4  # GGML_MAX_DIMS
KEPT_ARRAY_ITEMS = 4096  # per-layer arrays are kept; token lists and the like are only counted
DEFAULT_ALIGNMENT = 32
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


def _gguf() -> ModuleType:
    """The gguf package, imported on first use: with numpy it takes ~0.3 s, and every orchctl
    command imports this module (through the engine), most of them never reading a GGUF."""
    import gguf

    return gguf


@functools.cache
def _scalar_formats() -> dict[int, str]:
    """struct formats of the GGUF scalar value types, by type number."""
    t = _gguf().GGUFValueType
    return {
        t.UINT8: "<B",
        t.INT8: "<b",
        t.UINT16: "<H",
        t.INT16: "<h",
        t.UINT32: "<I",
        t.INT32: "<i",
        t.FLOAT32: "<f",
        t.BOOL: "<?",
        t.UINT64: "<Q",
        t.INT64: "<q",
        t.FLOAT64: "<d",
    }


class GgufError(ValueError):
    """The file cannot be read as a GGUF model; the message says which file and why."""


@dataclass(frozen=True)
class Counted:
    """A long array (a token list, say) that was counted, not kept."""

    length: int


@dataclass(frozen=True)
class Tensor:
    name: str
    shape: tuple[int, ...]  # ggml order: ne[0] first
    type_name: str
    offset: int  # from the start of the tensor data
    nbytes: int


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
    tensors: tuple[Tensor, ...]
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


def type_bytes(type_name: str) -> float | None:
    """Bytes per element of a ggml type by its name (f16 2, q8_0 34/32, q4_0 18/32), None
    when unknown."""
    gguf = _gguf()
    try:
        kind = gguf.GGMLQuantizationType[type_name.upper()]
    except KeyError:
        return None
    block, size = gguf.GGML_QUANT_SIZES[kind]
    return float(size) / float(block)


class _Reader:
    """Little-endian reads from a mapped file, each checked against its length."""

    def __init__(self, data: mmap.mmap, path: Path) -> None:
        self.data, self.path, self.pos = data, path, 0
        self.section = "header"

    def fail(self, what: str) -> GgufError:
        return GgufError(f"{self.path}: {what}")

    def need(self, n: int) -> None:
        if n < 0 or self.pos + n > len(self.data):
            raise self.fail(
                f"cut short in the {self.section} at byte {self.pos} (needs {n} more bytes, "
                f"the file has {len(self.data)}): an incomplete download or copy?"
            )

    def scalar(self, fmt: str) -> Any:
        size = struct.calcsize(fmt)
        self.need(size)
        (value,) = struct.unpack_from(fmt, self.data, self.pos)
        self.pos += size
        return value

    def string(self) -> str:
        n = self.scalar("<Q")
        self.need(n)
        raw = self.data[self.pos : self.pos + n]
        self.pos += n
        return raw.decode("utf-8", errors="replace")

    def skip_string(self) -> None:
        n = self.scalar("<Q")
        self.need(n)
        self.pos += n

    def value(self, vtype: int) -> Any:
        scalars = _scalar_formats()
        if vtype in scalars:
            return self.scalar(scalars[vtype])
        if vtype == _gguf().GGUFValueType.STRING:
            return self.string()
        if vtype == _gguf().GGUFValueType.ARRAY:
            return self.array()
        raise self.fail(f"unknown value type {vtype} in the {self.section} at byte {self.pos}")

    def array(self) -> list[Any] | Counted:
        itype, n = self.scalar("<I"), self.scalar("<Q")
        scalars = _scalar_formats()
        if itype in scalars:
            size = struct.calcsize(scalars[itype])
            self.need(n * size)
            if n > KEPT_ARRAY_ITEMS:
                self.pos += n * size
                return Counted(n)
            fmt = "<" + scalars[itype][1] * n
            values = list(struct.unpack_from(fmt, self.data, self.pos))
            self.pos += n * size
            return values
        if itype == _gguf().GGUFValueType.STRING:
            self.need(n * 8)  # every string has at least its length
            if n > KEPT_ARRAY_ITEMS:
                for _ in range(n):
                    self.skip_string()
                return Counted(n)
            return [self.string() for _ in range(n)]
        if itype == _gguf().GGUFValueType.ARRAY:
            self.need(n * 12)
            return [self.array() for _ in range(n)]
        raise self.fail(f"unknown array item type {itype} in the {self.section}")


def _tensor(r: _Reader) -> Tensor:
    name = r.string()
    n_dims = r.scalar("<I")
    if not 0 < n_dims <= MAX_DIMS:
        raise r.fail(f"tensor {name!r} has {n_dims} dimensions (at most {MAX_DIMS})")
    shape = tuple(r.scalar("<Q") for _ in range(n_dims))
    type_id, offset = r.scalar("<I"), r.scalar("<Q")
    gguf = _gguf()
    try:
        kind = gguf.GGMLQuantizationType(type_id)
        block, size = gguf.GGML_QUANT_SIZES[kind]
    except (ValueError, KeyError):
        raise r.fail(
            f"tensor {name!r} has type {type_id}, unknown to gguf {_gguf_version()}: a newer "
            "quantization? Update llama-orch (its gguf package) and llama.cpp"
        ) from None
    elements = 1
    for dim in shape:
        elements *= dim
    if elements % block:
        raise r.fail(f"tensor {name!r} has {elements} elements, not a multiple of {block}")
    return Tensor(name, shape, kind.name, offset, elements // block * size)


def _gguf_version() -> str:
    try:
        from importlib.metadata import version

        return version("gguf")
    except Exception:  # pragma: no cover - metadata missing in an odd install
        return "(unknown version)"


def read(path: Path) -> tuple[dict[str, Any], tuple[Tensor, ...]]:
    """The metadata and tensor infos of a GGUF file (GgufError when it is not a usable one)."""
    path = Path(path)
    try:
        with open(path, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            if size < 24:
                head = f.read(4)
                if head != MAGIC:
                    raise GgufError(f"{path}: not a GGUF file (it starts with {head!r})")
                raise GgufError(f"{path}: cut short in the header ({size} bytes)")
            data = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
    except OSError as e:
        raise GgufError(f"{path}: cannot read: {e.strerror or e}") from e
    with data:
        return _parse(_Reader(data, path))


def _parse(r: _Reader) -> tuple[dict[str, Any], tuple[Tensor, ...]]:
    magic = bytes(r.data[:4])
    if magic != MAGIC:
        raise r.fail(f"not a GGUF file (it starts with {magic!r})")
    r.pos = 4
    version = r.scalar("<I")
    if version not in VERSIONS:
        swapped = int.from_bytes(version.to_bytes(4, "little"), "big")
        if swapped in VERSIONS:
            raise r.fail("a big-endian GGUF: llama.cpp on this machine needs a little-endian one")
        raise r.fail(f"GGUF version {version} is not supported (known: 2, 3)")
    n_tensors, n_kv = r.scalar("<Q"), r.scalar("<Q")
    if n_tensors * 24 + n_kv * 12 > len(r.data):  # the smallest possible entries
        raise r.fail(
            f"cut short in the header or corrupt: it claims {n_tensors} tensors and {n_kv} "
            f"keys, more than {len(r.data)} bytes can hold"
        )
    r.section = "metadata"
    metadata: dict[str, Any] = {}
    for _ in range(n_kv):
        key = r.string()
        metadata[key] = r.value(r.scalar("<I"))
    r.section = "tensor infos"
    tensors = tuple(_tensor(r) for _ in range(n_tensors))
    alignment = metadata.get("general.alignment", DEFAULT_ALIGNMENT)
    if not isinstance(alignment, int) or alignment <= 0 or alignment % 8:
        raise r.fail(f"general.alignment is {alignment!r} (a positive multiple of 8)")
    start = -(-r.pos // alignment) * alignment
    end = max((t.offset + t.nbytes for t in tensors), default=0)
    if tensors and start + end > len(r.data):
        raise r.fail(
            f"cut short in the tensor data: the tensors need {start + end} bytes, the file has "
            f"{len(r.data)}: an incomplete download or copy?"
        )
    return metadata, tensors


def _per_layer(metadata: dict[str, Any], key: str, n_layer: int, default: int | None) -> list[int]:
    """One value per layer: the array as it is, or the scalar repeated."""
    value = metadata.get(key, default)
    if value is None:
        raise GgufError(f"missing key {key}")
    if isinstance(value, list):
        if len(value) != n_layer:
            raise GgufError(f"{key} has {len(value)} values for {n_layer} layers")
        return [int(v) for v in value]
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise GgufError(f"{key} is {value!r}, not a number")
    return [int(value)] * n_layer


def _sliding(metadata: dict[str, Any], arch: str, n_layer: int) -> tuple[list[bool], int | None]:
    window = metadata.get(f"{arch}.attention.sliding_window", DEFAULT_WINDOWS.get(arch))
    if not isinstance(window, int) or window <= 0:
        return [False] * n_layer, None
    pattern = metadata.get(f"{arch}.attention.sliding_window_pattern", SWA_PERIODS.get(arch))
    if isinstance(pattern, list):
        if len(pattern) != n_layer:
            raise GgufError(
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


def _vocabulary(metadata: dict[str, Any], tensors: tuple[Tensor, ...], arch: str) -> int:
    """Rows of the token embedding, else the tokenizer's list, else `vocab_size`, else 0."""
    embd = next((t for t in tensors if t.name == "token_embd.weight"), None)
    if embd is not None and len(embd.shape) > 1:
        return embd.shape[1]
    tokens = metadata.get("tokenizer.ggml.tokens")
    if isinstance(tokens, Counted):
        return tokens.length
    if isinstance(tokens, list):
        return len(tokens)
    size = metadata.get(f"{arch}.vocab_size")
    return size if isinstance(size, int) else 0


def geometry(metadata: dict[str, Any], tensors: tuple[Tensor, ...]) -> ModelInfo:
    """The model's shape from its metadata (GgufError without the keys it needs)."""
    arch = metadata.get("general.architecture")
    if not isinstance(arch, str) or not arch:
        raise GgufError("missing key general.architecture")

    def number(key: str, default: int | None = None) -> int:
        value = metadata.get(key, default)
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise GgufError(f"missing key {key}" if value is None else f"{key} is {value!r}")
        return int(value)

    n_layer = number(f"{arch}.block_count")
    if not 0 < n_layer <= 100_000:
        raise GgufError(f"{arch}.block_count is {n_layer}")
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
    metadata, tensors = read(path)
    try:
        return geometry(metadata, tensors)
    except GgufError as e:
        raise GgufError(f"{path}: {e}") from None
