"""GGUF inspection: geometry and weight bytes from the header alone, per-layer details, sliding
windows, and a clear error for every way a file can be wrong."""

from __future__ import annotations

import time
from pathlib import Path

import gguf
import pytest

from plugins import gguf_info, gguf_reading
from tests import tiny_gguf


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tiny_gguf.write(tmp_path_factory.mktemp("gguf") / "tiny.gguf")


def test_the_tiny_models_geometry_and_weight_bytes_match_ggufs_own_reader(tiny: Path) -> None:
    info = gguf_info.inspect(tiny)
    reader = gguf.GGUFReader(str(tiny))
    assert info.weight_bytes == sum(int(t.n_bytes) for t in reader.tensors)
    assert len(info.tensors) == len(reader.tensors)
    assert (info.architecture, info.context_length, info.n_layers) == ("llama", 2048, 2)
    assert (info.n_embd, info.n_ff, info.n_vocab) == (64, 128, 267)
    assert info.layers == (gguf_info.Layer(4, 2, 16, 16, sliding=False),) * 2
    assert info.sliding_window is None


def test_a_one_gigabyte_file_is_read_from_its_header_in_milliseconds(tmp_path: Path) -> None:
    path = tiny_gguf.write_shaped(
        tmp_path / "m1b.gguf", n_layer=16, n_embd=2048, n_head=32, n_head_kv=8, n_ff=8192,
        n_vocab=32000,
    )  # fmt: skip
    assert path.stat().st_size > 1 << 30
    began = time.perf_counter()
    info = gguf_info.inspect(path)
    assert time.perf_counter() - began < 0.5
    assert info.weight_bytes > 1 << 30 and info.n_vocab == 32000
    assert info.layers[0] == gguf_info.Layer(32, 8, 64, 64, sliding=False)


def test_key_and_value_head_sizes_come_from_their_keys_when_the_file_has_them(
    tmp_path: Path,
) -> None:
    path = tiny_gguf.write_shaped(
        tmp_path / "m.gguf", n_layer=2, n_embd=256, n_head=4, n_head_kv=2, n_ff=512, n_vocab=300,
        head_dim=128,
        keys={"{arch}.attention.key_length": 128, "{arch}.attention.value_length": 96},
    )  # fmt: skip
    layer = gguf_info.inspect(path).layers[0]
    assert (layer.head_dim_k, layer.head_dim_v) == (128, 96)  # not 256 / 4


def test_per_layer_kv_head_counts_are_kept_layer_by_layer(tmp_path: Path) -> None:
    path = tiny_gguf.write_shaped(
        tmp_path / "hybrid.gguf", n_layer=4, n_embd=256, n_head=4, n_head_kv=[2, 0, 4, 1],
        n_ff=512, n_vocab=300,
    )  # fmt: skip
    info = gguf_info.inspect(path)
    assert [layer.n_head_kv for layer in info.layers] == [2, 0, 4, 1]
    assert info.n_head_kv == 4


def test_gemma3_slides_five_layers_in_six_as_llama_cpp_does(tmp_path: Path) -> None:
    path = tiny_gguf.write_shaped(
        tmp_path / "gemma3.gguf", arch="gemma3", n_layer=12, n_embd=256, n_head=4,
        n_head_kv=1, n_ff=512, n_vocab=300, head_dim=256,
        keys={"{arch}.attention.sliding_window": 1024, "{arch}.attention.key_length": 256,
              "{arch}.attention.value_length": 256},
    )  # fmt: skip
    info = gguf_info.inspect(path)
    assert [layer.sliding for layer in info.layers] == ([True] * 5 + [False]) * 2
    assert info.sliding_window == 1024


def test_a_sliding_window_pattern_in_the_file_wins_over_the_architectures(tmp_path: Path) -> None:
    pattern = [True, False, False, True]
    path = tiny_gguf.write_shaped(
        tmp_path / "p.gguf", arch="gemma3", n_layer=4, n_embd=256, n_head=4, n_head_kv=1,
        n_ff=512, n_vocab=300,
        keys={"{arch}.attention.sliding_window": 512,
              "{arch}.attention.sliding_window_pattern": pattern},
    )  # fmt: skip
    assert [layer.sliding for layer in gguf_info.inspect(path).layers] == pattern
    period = tiny_gguf.write_shaped(
        tmp_path / "q.gguf", arch="gemma2", n_layer=4, n_embd=256, n_head=4, n_head_kv=1,
        n_ff=512, n_vocab=300,
        keys={"{arch}.attention.sliding_window": 512,
              "{arch}.attention.sliding_window_pattern": 4},
    )  # fmt: skip
    assert [layer.sliding for layer in gguf_info.inspect(period).layers] == [True] * 3 + [False]


def test_a_window_on_an_architecture_llama_cpp_runs_in_full_slides_nothing(
    tmp_path: Path,
) -> None:
    path = tiny_gguf.write_shaped(
        tmp_path / "mistral.gguf", n_layer=2, n_embd=256, n_head=4, n_head_kv=1, n_ff=512,
        n_vocab=300, keys={"{arch}.attention.sliding_window": 4096},
    )  # fmt: skip
    info = gguf_info.inspect(path)
    assert not any(layer.sliding for layer in info.layers) and info.sliding_window is None


def test_shared_kv_layers_keep_no_cache_of_their_own(tmp_path: Path) -> None:
    path = tiny_gguf.write_shaped(
        tmp_path / "g3n.gguf", arch="gemma3n", n_layer=5, n_embd=256, n_head=4, n_head_kv=2,
        n_ff=512, n_vocab=300, keys={"{arch}.attention.shared_kv_layers": 2},
    )  # fmt: skip
    assert [layer.n_head_kv for layer in gguf_info.inspect(path).layers] == [2, 2, 2, 0, 0]


def test_kv_cache_types_have_llama_cpps_block_sizes() -> None:
    assert gguf_reading.type_bytes("f16") == 2
    assert gguf_reading.type_bytes("q8_0") == 34 / 32
    assert gguf_reading.type_bytes("Q4_0") == 18 / 32
    assert gguf_reading.type_bytes("f32") == 4
    assert gguf_reading.type_bytes("nonsense") is None


def test_a_file_that_is_not_gguf_is_refused_with_what_it_starts_with(tmp_path: Path) -> None:
    path = tmp_path / "model.safetensors"
    path.write_bytes(b'{"__metadata__": {}}' + b"\0" * 64)
    with pytest.raises(gguf_reading.GgufError, match=r"model\.safetensors: not a GGUF file"):
        gguf_info.inspect(path)
    empty = tmp_path / "empty.gguf"
    empty.write_bytes(b"")
    with pytest.raises(gguf_reading.GgufError, match="not a GGUF file"):
        gguf_info.inspect(empty)


@pytest.mark.parametrize(
    ("keep", "section"),
    [
        (30, "header"),  # its counts promise more than 30 bytes hold
        (2000, "metadata"),  # inside the token list
        (-100, "tensor data"),  # the weights are short by 100 bytes
    ],
)
def test_a_truncated_file_says_where_it_was_cut(
    tiny: Path, tmp_path: Path, keep: int, section: str
) -> None:
    data = tiny.read_bytes()
    cut = tmp_path / "cut.gguf"
    cut.write_bytes(data[:keep])
    with pytest.raises(gguf_reading.GgufError, match=f"cut.gguf: cut short in the {section}") as e:
        gguf_info.inspect(cut)
    assert "incomplete download or copy" in str(e.value) or "corrupt" in str(e.value)


def test_a_file_cut_in_its_tensor_infos_is_refused(tiny: Path, tmp_path: Path) -> None:
    data = tiny.read_bytes()
    start = data.index(b"blk.1.ffn_down.weight")  # the last tensor info
    cut = tmp_path / "cut.gguf"
    cut.write_bytes(data[: start + 5])
    with pytest.raises(gguf_reading.GgufError, match="cut short in the tensor infos"):
        gguf_info.inspect(cut)


def test_an_unknown_version_and_an_absurd_count_are_refused(tiny: Path, tmp_path: Path) -> None:
    data = bytearray(tiny.read_bytes())
    data[4:8] = (9).to_bytes(4, "little")
    bad = tmp_path / "v9.gguf"
    bad.write_bytes(bytes(data))
    with pytest.raises(gguf_reading.GgufError, match="GGUF version 9 is not supported"):
        gguf_info.inspect(bad)
    data[4:8] = (3).to_bytes(4, "little")
    data[8:16] = (2**60).to_bytes(8, "little")  # tensors
    bad.write_bytes(bytes(data))
    with pytest.raises(gguf_reading.GgufError, match="claims 1152921504606846976 tensors"):
        gguf_info.inspect(bad)


def test_a_file_without_its_architecture_keys_names_the_missing_key(tmp_path: Path) -> None:
    path = tmp_path / "bare.gguf"
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_embedding_length(64)  # no block_count
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_ti_data_to_file()
    w.close()
    with pytest.raises(gguf_reading.GgufError, match=r"bare\.gguf: missing key llama\.block_count"):
        gguf_info.inspect(path)
