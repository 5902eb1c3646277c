#!/usr/bin/env bash
# The GPU smoke: llama-orch home end to end on this machine's NVIDIA GPUs, offline.
#
#   scripts/gpu-smoke.sh LLAMA_CPP_SOURCE.tar.xz [--work DIR] [--report FILE] [--jobs N]
#
# Builds llama-server from the pruned llama.cpp source tarball through the provisioner
# (CUDA, for the GPUs NVML reports), writes a ~1 GiB and a tiny random-weight GGUF, serves two
# pools, streams, cancels, checks seeds and VRAM estimates, and writes a JSON report
# (default gpu-smoke-run/report.json). Target: under 8 minutes on 16 cores. Exit 0 when every
# check passed, 1 when one failed, 2 for bad arguments, 3 when this machine cannot run it.
# The work happens in benchmarks/gpu_smoke.py; this wrapper finds Python and fails early.
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"

usage() {
    echo "usage: scripts/gpu-smoke.sh LLAMA_CPP_SOURCE.tar.xz [--work DIR] [--report FILE] [--jobs N]" >&2
}

if [[ $# -lt 1 || "$1" == "-h" || "$1" == "--help" ]]; then
    usage
    [[ $# -ge 1 ]] && exit 0 || exit 2
fi

if ! command -v nvidia-smi >/dev/null 2>&1; then
    echo "gpu-smoke: nvidia-smi not found: the GPU smoke needs a machine with NVIDIA GPUs and" >&2
    echo "their driver. Install the driver (see docs/quickstart.md), or try the simulated" >&2
    echo "workstation instead: orchctl up --simulate" >&2
    exit 3
fi

if [[ ! -f "$1" ]]; then
    echo "gpu-smoke: $1: no such file (give the llama.cpp source tarball)" >&2
    usage
    exit 2
fi

python="${PYTHON:-}"
if [[ -z "$python" ]]; then
    if [[ -x "$here/.venv/bin/python" ]]; then
        python="$here/.venv/bin/python"
    else
        python="$(command -v python3 || true)"
    fi
fi
if [[ -z "$python" ]]; then
    echo "gpu-smoke: no Python found: run 'make .venv/.installed' in $here first" >&2
    exit 3
fi

export PYTHONPATH="$here${PYTHONPATH:+:$PYTHONPATH}"
exec "$python" -m benchmarks.gpu_smoke "$@"
