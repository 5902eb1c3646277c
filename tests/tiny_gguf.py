"""GGUF files for tests: a tiny random-weight llama for the real `llama-server` (no download
needed), and header-only files of real model shapes for the VRAM estimate.

`write`: 2 layers, 64 wide, a 267-token byte-level SPM vocabulary, as in the recorded
fixtures. The text it generates is gibberish, but deterministic for a seed, which is what the
tests check. `write_shaped`: any geometry (per-layer KV heads, sliding windows), weights as a
sparse hole, so a 2 GB model costs a few KB of disk and milliseconds.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np


def write(
    path: Path,
    *,
    seed: int = 0,
    n_embd: int = 64,
    n_layer: int = 2,
    n_head: int = 4,
    n_head_kv: int = 2,
    n_ff: int = 128,
    n_ctx: int = 2048,
) -> Path:
    import gguf

    rng = np.random.default_rng(seed)
    tokens: list[bytes] = [b"<unk>", b"<s>", b"</s>"]
    types = [gguf.TokenType.UNKNOWN, gguf.TokenType.CONTROL, gguf.TokenType.CONTROL]
    for byte in range(256):
        tokens.append(f"<0x{byte:02X}>".encode())
        types.append(gguf.TokenType.BYTE)
    for word in (
        b"\xe2\x96\x81the",
        b"\xe2\x96\x81a",
        b"\xe2\x96\x81and",
        b"\xe2\x96\x81of",
        b"\xe2\x96\x81to",
        b"\xe2\x96\x81in",
        b"\xe2\x96\x81is",
        b"\xe2\x96\x81it",
    ):
        tokens.append(word)
        types.append(gguf.TokenType.NORMAL)
    n_vocab = len(tokens)
    head_dim = n_embd // n_head

    w = gguf.GGUFWriter(str(path), "llama")
    w.add_name("tiny-test")
    w.add_context_length(n_ctx)
    w.add_embedding_length(n_embd)
    w.add_block_count(n_layer)
    w.add_feed_forward_length(n_ff)
    w.add_head_count(n_head)
    w.add_head_count_kv(n_head_kv)
    w.add_rope_dimension_count(head_dim)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_file_type(gguf.LlamaFileType.ALL_F32)
    w.add_tokenizer_model("llama")
    w.add_token_list(tokens)
    w.add_token_scores([0.0] * 3 + [-1000.0] * 256 + [-float(i) for i in range(n_vocab - 259)])
    w.add_token_types(types)
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    w.add_unk_token_id(0)
    w.add_add_bos_token(True)

    def t(name: str, *shape: int) -> None:
        w.add_tensor(name, (rng.standard_normal(shape) * 0.2).astype(np.float32))

    t("token_embd.weight", n_vocab, n_embd)
    w.add_tensor("output_norm.weight", np.ones(n_embd, dtype=np.float32))
    t("output.weight", n_vocab, n_embd)
    kv = n_head_kv * head_dim
    for i in range(n_layer):
        w.add_tensor(f"blk.{i}.attn_norm.weight", np.ones(n_embd, dtype=np.float32))
        t(f"blk.{i}.attn_q.weight", n_embd, n_embd)
        t(f"blk.{i}.attn_k.weight", kv, n_embd)
        t(f"blk.{i}.attn_v.weight", kv, n_embd)
        t(f"blk.{i}.attn_output.weight", n_embd, n_embd)
        w.add_tensor(f"blk.{i}.ffn_norm.weight", np.ones(n_embd, dtype=np.float32))
        t(f"blk.{i}.ffn_gate.weight", n_ff, n_embd)
        t(f"blk.{i}.ffn_up.weight", n_ff, n_embd)
        t(f"blk.{i}.ffn_down.weight", n_embd, n_ff)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def write_shaped(
    path: Path,
    *,
    arch: str = "llama",
    n_layer: int,
    n_embd: int,
    n_head: int,
    n_head_kv: int | list[int],
    n_ff: int,
    n_vocab: int,
    head_dim: int | None = None,
    n_ctx: int = 4096,
    keys: dict[str, Any] | None = None,
) -> Path:
    """A GGUF with a real model's shape whose weights are a hole: the header, metadata and
    tensor infos are real, the tensor data is a sparse stretch of zeros that takes no disk.
    Weights are F16 and norms F32, as in the recorded H200 samples. `keys` adds metadata
    (`{arch}` in a key is the architecture; a list value becomes an array)."""
    import gguf

    head_dim = head_dim or n_embd // n_head
    kv_heads = n_head_kv if isinstance(n_head_kv, list) else [n_head_kv] * n_layer
    w = gguf.GGUFWriter(str(path), arch)
    w.add_name(f"{arch}-shaped-test")
    w.add_context_length(n_ctx)
    w.add_embedding_length(n_embd)
    w.add_block_count(n_layer)
    w.add_feed_forward_length(n_ff)
    w.add_head_count(n_head)
    w.add_head_count_kv(n_head_kv)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_file_type(gguf.LlamaFileType.MOSTLY_F16)
    for key, value in (keys or {}).items():
        key = key.format(arch=arch)
        if isinstance(value, list):
            w.add_array(key, value)
        elif isinstance(value, bool):
            w.add_bool(key, value)
        else:
            w.add_uint32(key, value)
    sizes: list[int] = []

    def info(name: str, *shape: int, f32: bool = False) -> None:
        elements = 1
        for dim in shape:
            elements *= dim
        nbytes = elements * (4 if f32 else 2)
        dtype = np.float32 if f32 else np.float16
        raw = gguf.GGMLQuantizationType.F32 if f32 else gguf.GGMLQuantizationType.F16
        w.add_tensor_info(name, shape, np.dtype(dtype), nbytes, raw_dtype=raw)
        sizes.append(nbytes)

    info("token_embd.weight", n_vocab, n_embd)
    info("output_norm.weight", n_embd, f32=True)
    info("output.weight", n_vocab, n_embd)
    for i in range(n_layer):
        kv = kv_heads[i] * head_dim
        info(f"blk.{i}.attn_norm.weight", n_embd, f32=True)
        info(f"blk.{i}.attn_q.weight", n_head * head_dim, n_embd)
        if kv:
            info(f"blk.{i}.attn_k.weight", kv, n_embd)
            info(f"blk.{i}.attn_v.weight", kv, n_embd)
        info(f"blk.{i}.attn_output.weight", n_embd, n_head * head_dim)
        info(f"blk.{i}.ffn_norm.weight", n_embd, f32=True)
        info(f"blk.{i}.ffn_gate.weight", n_ff, n_embd)
        info(f"blk.{i}.ffn_up.weight", n_ff, n_embd)
        info(f"blk.{i}.ffn_down.weight", n_embd, n_ff)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_ti_data_to_file()
    w.close()
    align = 32
    start = -(-path.stat().st_size // align) * align
    os.truncate(path, start + sum(-(-n // align) * align for n in sizes))
    return path
