"""Fake build tools on a PATH of their own, for tests of the provisioner and `orchctl doctor`.

`toolbox(folder)` writes executables that answer `--version` like the real ones; the fake
`cmake` records every argv as a JSON line in `cmake.log` beside it, prints ninja-style steps
while "building" and writes a `bin/llama-server` into the build folder: a script that answers
`--version` and `--list-devices` like a CUDA build and serves a model through the sim
engine's server. `FAKE_CMAKE_FAIL=configure|build` makes it fail. No real compiler runs.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
FAKE_CMAKE = """#!{python}
import json, os, sys
from pathlib import Path
here = Path(__file__).resolve().parent
with open(here / "cmake.log", "a") as log:
    log.write(json.dumps(sys.argv[1:]) + "\\n")
args = sys.argv[1:]
if args[:1] == ["--version"]:
    print("cmake version 3.31.6")
    sys.exit(0)
fail = os.environ.get("FAKE_CMAKE_FAIL")
if args[:1] == ["-S"]:
    src, build = Path(args[1]), Path(args[3])
    if not (src / "CMakeLists.txt").is_file():
        print("CMake Error: no CMakeLists.txt in", src)
        sys.exit(1)
    print("-- The C compiler identification is GNU 14.2.0")
    if fail == "configure":
        print("CMake Error at ggml/CMakeLists.txt:1: CUDA toolkit not found")
        sys.exit(1)
    build.mkdir(parents=True, exist_ok=True)
    (build / "CMakeCache.txt").write_text("\\n".join(args[4:]))
    print("-- Build files have been written to:", build)
    sys.exit(0)
if args[:1] == ["--build"]:
    build = Path(args[1])
    FAKE_SERVER = (here / "llama-server.fake").read_text()
    for i in range(1, 21):
        print(f"[{{i}}/20] Building CXX object ggml/src/part{{i}}.o", flush=True)
        if fail == "build" and i == 7:
            print("ggml/src/part7.cu(12): error: identifier \\"boom\\" is undefined")
            print("ninja: build stopped: subcommand failed.")
            sys.exit(1)
    binary = build / "bin" / "llama-server"
    binary.parent.mkdir(parents=True, exist_ok=True)
    binary.write_text(FAKE_SERVER)
    binary.chmod(0o755)
    sys.exit(0)
print("fake cmake: unexpected", args)
sys.exit(2)
"""

# What the fake build makes: a llama-server that answers --version and --list-devices like a
# CUDA build and serves through the sim engine's server (same HTTP subset), so a daemon can
# run it as a llamacpp replica on a machine without a GPU.
FAKE_SERVER = """#!{python}
import sys
args = sys.argv[1:]
if args[:1] == ["--version"]:
    print("version: 6500 (fake123)", file=sys.stderr)
    sys.exit(0)
if args[:1] == ["--list-devices"]:
    print("Available devices:")
    print("  CUDA0: NVIDIA fake (24576 MiB, 24000 MiB free)")
    sys.exit(0)
sys.path.insert(0, {root!r})
from plugins import sim_server
opt = {{args[i]: args[i + 1] for i in range(len(args) - 1) if args[i].startswith("-")}}
slots = int(opt.get("-np", "1"))
sys.exit(sim_server.main([
    "--port", opt["--port"], "--replica-id", "fake-llama-server", "--model", opt["-m"],
    "--model-size-mib", "1", "--ctx", str(int(opt.get("-c", "4096")) // slots),
    "--slots", str(slots), "--gpu", "0", "--state-dir", {state!r},
    "--options-json", '{{"tokens_per_s": 400}}',
]))
"""

VERSIONS = {
    "g++": "g++ (GCC) 14.2.1 20250207",
    "c++": "c++ (GCC) 14.2.1 20250207",
    "ninja": "1.12.1",
    "nvcc": "nvcc: NVIDIA (R) Cuda compiler driver\nCuda compilation tools, release {cuda}, "
    "V{cuda}.88",
}


def write_tool(folder: Path, name: str, script: str) -> Path:
    path = folder / name
    path.write_text(script)
    path.chmod(0o755)
    return path


def toolbox(
    folder: Path,
    *,
    cmake: bool = True,
    compiler: bool = True,
    ninja: bool = True,
    nvcc: str | None = "13.0",
    git: bool = True,
) -> Path:
    """A folder of fake tools to put alone on PATH (git is the real one, linked in)."""
    folder.mkdir(parents=True, exist_ok=True)
    if cmake:
        write_tool(folder, "cmake", FAKE_CMAKE.format(python=sys.executable))
        server = FAKE_SERVER.format(python=sys.executable, root=str(ROOT), state=str(folder))
        (folder / "llama-server.fake").write_text(server)
    names = (["g++", "c++"] if compiler else []) + (["ninja"] if ninja else [])
    for name in names:
        write_tool(folder, name, f"#!/bin/sh\necho '{VERSIONS[name]}'\n")
    if nvcc is not None:
        text = VERSIONS["nvcc"].format(cuda=nvcc)
        write_tool(folder, "nvcc", f"#!/bin/sh\nprintf '%s\\n' '{text}'\n")
    real_git = shutil.which("git")
    if git and real_git:
        os.symlink(real_git, folder / "git")
    return folder


def cmake_calls(folder: Path) -> list[list[str]]:
    log = folder / "cmake.log"
    if not log.exists():
        return []
    calls: list[list[str]] = [json.loads(line) for line in log.read_text().splitlines()]
    return calls


def llama_cpp_tree(folder: Path, *, marker: str = "") -> Path:
    """The top of a llama.cpp source tree, as far as the provisioner looks."""
    (folder / "ggml").mkdir(parents=True, exist_ok=True)
    (folder / "CMakeLists.txt").write_text(f"project(llama.cpp) # {marker}\n")
    (folder / "ggml" / "CMakeLists.txt").write_text("project(ggml)\n")
    return folder


def flags_of(call: list[str]) -> dict[str, Any]:
    """-DNAME=VALUE options of a configure call, as a dict."""
    return dict(a[2:].split("=", 1) for a in call if a.startswith("-D"))
