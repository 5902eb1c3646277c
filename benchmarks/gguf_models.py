"""Random-weight llama GGUFs of a chosen size, for the GPU smoke (`benchmarks.gpu_smoke`).

No download is needed: the files are written with the `gguf` package (what llama.cpp's own
converters use), with a 267-token byte-level SPM vocabulary like the recorded fixtures. The
text they generate is gibberish, but deterministic for a seed, and their VRAM use is real:
weights in F16, so the file size is what the GPU holds. `Shape.gib(1.0)` picks a 2048-wide
shape of about 1 GiB.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

N_VOCAB = 3 + 256 + 8  # <unk> <s> </s>, the 256 bytes, 8 words


@dataclass(frozen=True)
class Shape:
    n_embd: int = 64
    n_layer: int = 2
    n_head: int = 4
    n_head_kv: int = 2
    n_ff: int = 128
    n_ctx: int = 4096
    f16: bool = False  # matrices in F16 (else F32); norms stay F32 as llama.cpp expects

    @property
    def head_dim(self) -> int:
        return self.n_embd // self.n_head

    def params(self) -> int:
        kv = self.n_head_kv * self.head_dim
        per_layer = 2 * self.n_embd * self.n_embd + 2 * kv * self.n_embd
        per_layer += 3 * self.n_ff * self.n_embd + 2 * self.n_embd
        return 2 * N_VOCAB * self.n_embd + self.n_embd + self.n_layer * per_layer

    def weight_bytes(self) -> int:
        """Roughly the file's size: every matrix at 2 (F16) or 4 bytes a weight."""
        return self.params() * (2 if self.f16 else 4)

    @classmethod
    def gib(cls, size_gib: float) -> Shape:
        """A 2048-wide llama (32 heads, 8 KV heads) with as many layers as make `size_gib`."""
        one = cls(n_embd=2048, n_layer=1, n_head=32, n_head_kv=8, n_ff=5632, f16=True)
        per_layer = cls(**{**asdict(one), "n_layer": 2}).weight_bytes() - one.weight_bytes()
        layers = max(1, round(size_gib * (1 << 30) / per_layer))
        return cls(**{**asdict(one), "n_layer": layers})


def write(path: Path, shape: Shape, *, seed: int = 0) -> Path:
    """Write the GGUF (skipped when one of this shape and seed is already there)."""
    import gguf
    import numpy as np

    stamp = path.with_name(path.name + ".shape.json")
    wanted = json.dumps({**asdict(shape), "seed": seed}, sort_keys=True)
    if path.is_file() and stamp.is_file() and stamp.read_text() == wanted:
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    dtype = np.float16 if shape.f16 else np.float32
    tokens: list[bytes] = [b"<unk>", b"<s>", b"</s>"]
    types = [gguf.TokenType.UNKNOWN, gguf.TokenType.CONTROL, gguf.TokenType.CONTROL]
    for byte in range(256):
        tokens.append(f"<0x{byte:02X}>".encode())
        types.append(gguf.TokenType.BYTE)
    for word in ("the", "a", "and", "of", "to", "in", "is", "it"):
        tokens.append(("\u2581" + word).encode())
        types.append(gguf.TokenType.NORMAL)
    tmp = path.with_name(f".{path.name}.tmp")
    w = gguf.GGUFWriter(str(tmp), "llama")
    w.add_name(f"random-{shape.params() // 1_000_000}M")
    w.add_context_length(shape.n_ctx)
    w.add_embedding_length(shape.n_embd)
    w.add_block_count(shape.n_layer)
    w.add_feed_forward_length(shape.n_ff)
    w.add_head_count(shape.n_head)
    w.add_head_count_kv(shape.n_head_kv)
    w.add_rope_dimension_count(shape.head_dim)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_file_type(gguf.LlamaFileType.MOSTLY_F16 if shape.f16 else gguf.LlamaFileType.ALL_F32)
    w.add_tokenizer_model("llama")
    w.add_token_list(tokens)
    w.add_token_scores([0.0] * 3 + [-1000.0] * 256 + [-float(i) for i in range(N_VOCAB - 259)])
    w.add_token_types(types)
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    w.add_unk_token_id(0)
    w.add_add_bos_token(True)

    def matrix(name: str, rows: int, cols: int) -> None:
        w.add_tensor(
            name, (rng.standard_normal((rows, cols), dtype=np.float32) * 0.02).astype(dtype)
        )

    def norm(name: str) -> None:
        w.add_tensor(name, np.ones(shape.n_embd, dtype=np.float32))

    kv = shape.n_head_kv * shape.head_dim
    matrix("token_embd.weight", N_VOCAB, shape.n_embd)
    norm("output_norm.weight")
    matrix("output.weight", N_VOCAB, shape.n_embd)
    for i in range(shape.n_layer):
        norm(f"blk.{i}.attn_norm.weight")
        matrix(f"blk.{i}.attn_q.weight", shape.n_embd, shape.n_embd)
        matrix(f"blk.{i}.attn_k.weight", kv, shape.n_embd)
        matrix(f"blk.{i}.attn_v.weight", kv, shape.n_embd)
        matrix(f"blk.{i}.attn_output.weight", shape.n_embd, shape.n_embd)
        norm(f"blk.{i}.ffn_norm.weight")
        matrix(f"blk.{i}.ffn_gate.weight", shape.n_ff, shape.n_embd)
        matrix(f"blk.{i}.ffn_up.weight", shape.n_ff, shape.n_embd)
        matrix(f"blk.{i}.ffn_down.weight", shape.n_embd, shape.n_ff)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    tmp.replace(path)
    stamp.write_text(wanted)
    return path
