"""GGUF reading: a model file's metadata and tensor infos, read from its header alone.

`gguf_info.inspect` calls `read` and turns what it returns into a model's geometry;
`llamacpp_vram` asks `type_bytes` what an element of a ggml type (a KV cache type) weighs.
The file is memory-mapped and only the header, the metadata and the tensor infos are
touched: the weights are never read, so a 1 GB file takes milliseconds. The format's
constants (value types, tensor types and their block sizes) are those of the `gguf` package,
llama.cpp's own Python library.

Rules it keeps:
- A file that is not GGUF, has an unknown version, or is cut short anywhere (header,
  metadata, tensor infos or tensor data) raises `GgufError`, which names the file and what is
  wrong. Sizes in the file are checked against the file's length before they are believed, so
  a hostile header cannot make it loop or allocate.
- Arrays of up to `KEPT_ARRAY_ITEMS` items (per-layer values) are kept; longer ones (token
  lists) are skipped over and kept only as their length (`Counted`).
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
