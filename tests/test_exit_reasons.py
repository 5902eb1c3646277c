"""Why an engine ended, read from recorded-style llama.cpp log tails: CUDA out of memory,
other CUDA errors, a model that would not load, a crash by signal, and plain exits; each class
with its fix, as status shows it in `last_error`."""

from __future__ import annotations

import signal
from pathlib import Path

import pytest

from plugins import exit_reasons, processes, sim_bookings
from reconciler import supervision

# Tails as llama-server (llama.cpp b6xxx, `-lv 4`) writes them, timestamps and all.
OOM_AT_LOAD = """\
0.00.512.301 I llama_context: n_ctx_seq             = 131072
0.00.530.113 E ggml_backend_cuda_buffer_type_alloc_buffer: allocating 16384.00 MiB on device 0: \
cudaMalloc failed: out of memory
0.00.530.120 E alloc_tensor_range: failed to allocate CUDA0 buffer of size 17179869184
0.00.530.411 E llama_init_from_model: failed to initialize the context: failed to allocate \
buffer for kv cache
0.00.530.500 E common_init_from_params: failed to create context with model \
'/models/llama-3.1-8b-q4_k_m.gguf'
0.00.530.610 E srv    load_model: failed to load model, '/models/llama-3.1-8b-q4_k_m.gguf'
0.00.531.150 E main: exiting due to model loading error
"""
OOM_WHILE_SERVING = """\
0.41.002.713 I slot update_slots: id  0 | task 812 | prompt processing progress, n_tokens = 4096
CUDA error: out of memory
  current device: 0, in function ggml_backend_cuda_graph_compute at \
/src/llama.cpp/ggml/src/ggml-cuda/ggml-cuda.cu:2779
  cudaGraphInstantiate(&cuda_ctx->cuda_graph->instance, cuda_ctx->cuda_graph->graph, NULL, NULL, 0)
/src/llama.cpp/ggml/src/ggml-cuda/ggml-cuda.cu:88: CUDA error
"""
ILLEGAL_ACCESS = """\
0.12.771.020 I slot update_slots: id  1 | task 40 | n_tokens = 512, memory_seq_rm [512, end)
CUDA error: an illegal memory access was encountered
  current device: 0, in function ggml_backend_cuda_synchronize at \
/src/llama.cpp/ggml/src/ggml-cuda/ggml-cuda.cu:2628
  cudaStreamSynchronize(cuda_ctx->stream())
/src/llama.cpp/ggml/src/ggml-cuda/ggml-cuda.cu:88: CUDA error
"""
OLD_DRIVER = """\
ggml_cuda_init: failed to initialize CUDA: CUDA driver version is insufficient for CUDA runtime \
version
0.00.004.410 E main: no usable GPU found
"""
UNKNOWN_ARCH = """\
0.00.041.882 E llama_model_load: error loading model: error loading model architecture: unknown \
model architecture: 'qwen9'
0.00.041.901 E llama_model_load_from_file_impl: failed to load model
0.00.041.950 E common_init_from_params: failed to load model '/models/qwen9-7b.gguf'
0.00.042.001 E srv    load_model: failed to load model, '/models/qwen9-7b.gguf'
0.00.042.310 E main: exiting due to model loading error
"""
TRUNCATED = """\
0.00.010.440 E gguf_init_from_file_impl: tensor 'blk.31.ffn_down.weight' data is not within \
the file bounds, model is corrupted or incomplete
0.00.010.452 E gguf_init_from_file_impl: failed to read tensor data
0.00.010.460 E llama_model_load: error loading model: llama_model_loader: failed to load model \
from /models/half-downloaded.gguf
0.00.010.470 E srv    load_model: failed to load model, '/models/half-downloaded.gguf'
"""
SERVING = """\
0.03.117.004 I slot launch_slot_: id  0 | task 77 | processing task, is_child = 0
0.03.117.090 I slot update_slots: id  0 | task 77 | new prompt, n_ctx_slot = 8192, n_keep = 0
"""


def lines(text: str) -> list[str]:
    return [line.strip() for line in text.splitlines() if line.strip()]


@pytest.mark.parametrize(
    ("tail", "returncode", "kind", "label", "quoted", "fix_mentions"),
    [
        (OOM_AT_LOAD, 1, "oom", "CUDA out of memory", "allocating 16384.00 MiB on", "q8_0"),
        (OOM_WHILE_SERVING, -6, "oom", "CUDA out of memory", "CUDA error: out of memory", "ctx"),
        (ILLEGAL_ACCESS, -6, "cuda", "CUDA error", "illegal memory access", "provision.ref"),
        (OLD_DRIVER, 1, "cuda", "CUDA error", "driver version is insufficient", "nvidia-smi"),
        (UNKNOWN_ARCH, 1, "load", "model load failed", "unknown model architecture", "orchctl up"),
        (TRUNCATED, 1, "load", "model load failed", "not within the file bounds", "digest"),
    ],
    ids=["oom-at-load", "oom-serving", "illegal-access", "old-driver", "unknown-arch", "truncated"],
)
def test_a_recorded_tail_is_classified_with_its_cause_and_a_fix(
    tail: str, returncode: int, kind: str, label: str, quoted: str, fix_mentions: str
) -> None:
    info = exit_reasons.classify(returncode, lines(tail))
    assert info.kind == kind
    assert info.oom == (kind == "oom")
    assert info.reason.startswith(f"{label}: ")
    assert quoted in info.reason
    assert info.fix is not None and fix_mentions in info.fix
    assert info.reason.endswith(f"Fix: {info.fix}.")
    status = "exit code 1" if returncode == 1 else "killed by SIGABRT"
    assert f"({status})" in info.reason


def test_a_signal_nobody_sent_is_a_crash_with_the_last_line_and_a_fix() -> None:
    info = exit_reasons.classify(-signal.SIGSEGV, lines(SERVING))
    assert (info.kind, info.signal, info.code) == ("crash", signal.SIGSEGV, None)
    # the last line is what it was doing, not said to be the cause (a kill leaves none)
    assert info.reason.startswith("crashed, killed by SIGSEGV (its log's last line: ")
    assert "new prompt, n_ctx_slot = 8192, n_keep = 0)" in info.reason
    assert info.fix is not None and "OOM killer" in info.fix


def test_a_signal_the_daemon_sent_is_a_plain_stop() -> None:
    info = exit_reasons.classify(-signal.SIGTERM, lines(SERVING), stopped=True)
    assert (info.kind, info.reason, info.fix) == ("exit", "killed by SIGTERM", None)


def test_any_other_exit_gives_its_code_and_the_logs_last_line() -> None:
    info = exit_reasons.classify(2, ["error: invalid argument: --frobnicate"])
    assert (info.kind, info.code) == ("exit", 2)
    assert info.reason == "exit code 2: error: invalid argument: --frobnicate"
    assert exit_reasons.classify(0, lines(SERVING)).reason == "exit code 0"


def test_the_sims_imitation_of_a_cuda_oom_is_classified_as_one() -> None:
    message = sim_bookings._oom_message(0, 9000, "1200 MiB free of 24576 MiB")
    info = exit_reasons.classify(1, lines(message))
    assert info.kind == "oom" and "allocating 9000 MiB on device 0" in info.reason


@pytest.mark.parametrize("tail", [OOM_AT_LOAD, ILLEGAL_ACCESS, TRUNCATED, SERVING])
def test_every_reason_with_its_fix_fits_in_status_whole(tail: str) -> None:
    long_tail = [*lines(tail), "x" * 300]  # the log tail keeps lines of up to 300 characters
    reason = exit_reasons.classify(-6, long_tail).reason
    policy = supervision.RestartPolicy()
    assert len(reason) <= policy.reason_max_chars


def test_exit_info_reads_the_tail_of_the_engines_log(tmp_path: Path) -> None:
    log = tmp_path / "chat-0.log"
    log.write_text("# llama-orch: llama-server -m x.gguf\n" + "filler line\n" * 2000 + OOM_AT_LOAD)
    info = processes.exit_info(1, log)
    assert info.kind == "oom" and "cudaMalloc failed" in info.reason


def test_a_crash_of_another_engine_gets_no_llama_cpp_advice_and_names_its_log() -> None:
    log = Path("/tmp/x/.orch/engines/p1-0.log")
    sim = exit_reasons.classify(-9, [], engine="sim", log_path=log)
    assert sim.kind == "crash" and "provision.ref" not in sim.reason, sim
    assert "did not send" in sim.reason and str(log) in sim.reason
    real = exit_reasons.classify(-11, [], engine="llamacpp", log_path=log)
    assert "provision.ref" in real.reason and str(log) in real.reason


def test_network_errors_are_said_in_words_not_reprs() -> None:
    import aiohttp

    from plugins import llama_server

    broken = aiohttp.ClientPayloadError(
        "Response payload is not completed: <TransferEncodingError>"
    )
    for error in (broken, ConnectionResetError(104, "Connection reset by peer")):
        text = llama_server.said(error)
        assert "Error" not in text and "<" not in text, text
    assert "stopped midway" in llama_server.said(broken)


def test_a_load_failure_names_the_model_whose_digest_catches_a_bad_copy() -> None:
    info = exit_reasons.classify(1, lines(UNKNOWN_ARCH), model="qwen9")
    assert info.fix is not None and "models.qwen9.digest catches a bad copy" in info.fix
    assert "<id>" not in info.reason
