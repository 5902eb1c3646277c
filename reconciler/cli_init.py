"""`orchctl init [--simulate] [--force] [--config PATH]`: write a commented starter orch.yaml.

Without `--simulate` it describes the GPUs NVML sees (exit 3 with the driver fix when there
is none) and one llama.cpp pool whose model file the user still has to supply. With
`--simulate` it writes a simulated 24 GB + 12 GB workstation that `orchctl serve` runs at
once: orch.yaml, inventory.yaml, a stub model file the `sim` engine never reads, and a task
file to submit. Both configs start with a `yaml-language-server` line naming the schema, and
pass `orchctl validate` (the NVML one with warnings until the model file exists). Nothing is
overwritten without `--force`.
"""

from __future__ import annotations

import argparse
import os
import shlex
import struct
from collections.abc import Sequence
from pathlib import Path

import schemas
from plugins import gpu_nvml
from reconciler.cli_common import EXIT_OK, EXIT_USAGE, Refused
from state import atomic, observed

# An empty but well-formed GGUF file: magic, version 3, no tensors, no metadata.
STUB_GGUF = b"GGUF" + struct.pack("<IQQ", 3, 0, 0)


def cmd_init(args: argparse.Namespace) -> int:
    config: Path = args.config
    if config.is_dir():  # `--config DIR`: the file goes in it, but say so rather than guess
        raise Refused(
            EXIT_USAGE,
            f"--config {config} is a folder; it names the orch.yaml to write",
            hint=f"pass --config {config / 'orch.yaml'}",
        )
    folder = config.parent
    if not args.force and (config.exists() or config.is_symlink()):
        _refuse_clash([config])  # before asking the driver: its absence is not the issue
    if args.simulate:
        files = {
            config: simulated_config(schema_line("desired-state"), config.name),
            folder / "inventory.yaml": SIMULATED_INVENTORY,
            folder / "hello.task.yaml": hello_task(schema_line("task")),
        }
        what = "a simulated 24 GB + 12 GB workstation"
    else:
        gpus = _nvml_gpus()  # raises EnvironmentMissing (exit 3) with the fix
        files = {config: nvml_config(schema_line("desired-state"), config.name, gpus)}
        what = f"{len(gpus)} GPU{'s' if len(gpus) != 1 else ''}: " + ", ".join(
            f"{g.index} {g.name} ({g.vram_total_mib} MiB)" for g in gpus
        )
    clash = [p for p in files if p.exists() or p.is_symlink()]
    if clash and not args.force:
        _refuse_clash(clash)
    try:
        folder.mkdir(parents=True, exist_ok=True)
        for path, text in files.items():
            atomic.write_bytes(path, text.encode(), durable=False)
    except OSError as exc:
        where = exc.filename or folder
        raise Refused(EXIT_USAGE, f"cannot write {where}: {exc.strerror or exc}") from None
    print(f"wrote {_shown(config)} for {what}")
    for path in list(files)[1:]:
        print(f"wrote {_shown(path)}")
    if args.simulate:
        stub = folder / "models" / "starter.gguf"
        if not stub.exists():  # never replace a file someone put there
            stub.parent.mkdir(parents=True, exist_ok=True)
            atomic.write_bytes(stub, STUB_GGUF, durable=False)
            print(f"wrote {_shown(stub)} (a stub: the sim engine does not read it)")
        hello, cfg = _arg(folder / "hello.task.yaml"), _arg(config)
        steps = [
            f"orchctl validate --config {cfg} {hello}",
            f"orchctl serve --config {cfg} &",
            f"orchctl submit {hello} --config {cfg} --wait",
        ]
    else:
        steps = [
            f"put a GGUF model at {_shown(folder / 'models' / 'my-model.gguf')} "
            "(or change models.my-model.ref)",
            f"orchctl validate {_arg(config)}",
            f"orchctl serve --config {_arg(config)}",
        ]
    print("next:\n" + "\n".join(f"  {step}" for step in steps))
    return EXIT_OK


def _shown(path: Path) -> str:
    try:
        return os.path.relpath(path) if not path.is_absolute() else str(path)
    except ValueError:
        return str(path)


def _arg(path: Path) -> str:
    """`path` as a shell argument: the "next:" lines are copied into a shell as they are."""
    return shlex.quote(_shown(path))


def _refuse_clash(clash: list[Path]) -> None:
    raise Refused(
        EXIT_USAGE,
        f"{_shown(clash[0])} already exists; nothing was written",
        hint="pass --force to overwrite "
        + ", ".join(_shown(p) for p in clash)
        + ", or --config PATH to write elsewhere",
    )


def _nvml_gpus() -> list[observed.Gpu]:
    observer = gpu_nvml.open_nvml()
    try:
        return sorted(observer.observe().gpus, key=lambda g: g.index)
    finally:
        observer.close()


def schema_line(name: str) -> str:
    """The modeline editors with yaml-language-server read: the installed schema's path."""
    return f"# yaml-language-server: $schema={schemas.DIR / f'{name}.schema.json'}"


DEFAULT_BIND = "127.0.0.1:8080"
_PREAMBLE = """\
{schema}
# llama-orch home: the desired state of this workstation, written by `orchctl {writer}`.
# Check it with `orchctl validate {name}`. `orchctl serve --config {name}` makes the
# running engines match it, and applies your edits while it runs. Relative paths (models,
# inventory, spool, results) resolve from this file's folder, not from where orchctl runs.
version: 1
server:
  bind: "{bind}"   # the HTTP API (docs/http.md); loopback needs no token
paths: {{spool: spool, results: results, state: .orch}}
"""

_QUEUE = """\
queue: {capacity: 256, full_policy: reject}   # when full: reject | drop-lru
sessions: {ttl_s: 600, max_turns: 8}
"""


def simulated_config(schema: str, name: str, bind: str = DEFAULT_BIND) -> str:
    return (
        _PREAMBLE.format(schema=schema, name=name, bind=bind, writer="init")
        + """\
gpus:
  observer: simulated       # GPUs from inventory.yaml; everything shown is marked SIMULATED
  inventory: inventory.yaml # switch to `observer: nvml` on a machine with NVIDIA GPUs
  reserve_mib: 512          # VRAM kept free on every GPU
"""
        + _QUEUE
        + """\
models:
  starter:
    ref: "file:models/starter.gguf"   # a stub; a real GGUF file for the llamacpp engine
    size_mib: 2000                    # the weights' size, for VRAM planning
pools:
  - id: chat
    engine: sim             # simulated llama-server processes; `llamacpp` on real GPUs
    model: starter
    devices: auto           # the GPU with the most free VRAM that fits; or [0], or [0, 1]
    replicas: 1
    ctx: 4096               # context tokens per slot
    slots: 2                # concurrent sequences per replica
    sim: {tokens_per_s: 200, load_s: 0.2}
"""
    )


def nvml_config(schema: str, name: str, gpus: list[observed.Gpu]) -> str:
    seen = "\n".join(
        f"#   {g.index}: {g.name}, {g.vram_total_mib} MiB"
        + (f", PCI {g.pci_bus_id}" if g.pci_bus_id else "")
        for g in gpus
    )
    return (
        _PREAMBLE.format(schema=schema, name=name, bind=DEFAULT_BIND, writer="init")
        + f"""\
gpus:
  observer: nvml            # the real GPUs, through the NVIDIA driver
  reserve_mib: 512          # VRAM kept free on every GPU (the desktop, other programs)
# The GPUs NVML saw when this file was written. Indices are in PCI bus order, as nvidia-smi
# shows them (engines are started with CUDA_DEVICE_ORDER=PCI_BUS_ID):
{seen}
"""
        + _QUEUE
        + """\
models:
  my-model:
    ref: "file:models/my-model.gguf"  # put a GGUF file here (relative to this file's folder)
pools:
  - id: main
    engine: llamacpp        # llama.cpp's llama-server, on the GPU only (`orchctl plugins`)
    model: my-model
    devices: auto           # the GPU with the most free VRAM that fits; or [0], or [0, 1]
    replicas: 1
    ctx: 8192               # context tokens per slot
    slots: 2                # concurrent sequences per replica
"""
    )


def up_config(
    schema: str,
    name: str,
    gpus: Sequence[gpu_nvml.GpuFacts],
    *,
    model_ref: str,
    engine: Path | None,
    source: str | None = None,
    bind: str = DEFAULT_BIND,
) -> str:
    """The orch.yaml `orchctl up` writes: the model it fetched, one pool per GPU it saw."""
    pools = []
    for g in gpus:
        cc = g.compute_capability
        about = f"{g.name}, {g.vram_total_mib} MiB" + (
            f", compute capability {cc[0]}.{cc[1]}" if cc else ""
        )
        pools.append(
            f"""\
  # GPU {g.index}: {about}
  - id: chat-{g.index}
    engine: llamacpp        # llama.cpp's llama-server, on this GPU only
    model: starter
    devices: [{g.index}]            # pinned; `devices: auto` lets llama-orch pick the GPU
    replicas: 1
    ctx: 4096               # context tokens per slot
    slots: 2                # concurrent sequences per replica
"""
        )
    if source:  # the build `orchctl up` made, found again by its source
        engine_section = f'  llamacpp:\n    provision: {{mode: source, ref: "{source}"}}\n'
    else:  # the newest CUDA build under ~/.cache/llama-orch/llama.cpp
        engine_section = "  llamacpp: {}\n"
    if engine:
        engine_section += f"  # built at {engine}\n"
    return (
        _PREAMBLE.format(schema=schema, name=name, bind=bind, writer="up")
        + """\
gpus:
  observer: nvml            # the real GPUs, through the NVIDIA driver
  reserve_mib: 512          # VRAM kept free on every GPU (the desktop, other programs)
"""
        + _QUEUE
        + f"""\
models:
  starter:
    ref: "{model_ref}"
    # downloaded into ~/.cache/llama-orch/models by `orchctl up` (or by `serve` when missing);
    # pin its digest with `digest: sha256:<hex>` so a changed file is refused
engines:
{engine_section}# one pool per GPU seen when this was written, in PCI bus order (as in nvidia-smi)
pools:
"""
        + "".join(pools)
    )


SIMULATED_INVENTORY = """\
# A simulated workstation: a 24 GB and a 12 GB card, indexed as nvidia-smi would list them.
# Everything the simulated GPUs show is labelled SIMULATED.
gpus:
  - index: 0
    name: NVIDIA GeForce RTX 3090
    uuid: GPU-51a1a7ed-0000-4000-8000-000000003090
    vram_total_mib: 24576
    vram_used_mib: 420      # the desktop session's share
  - index: 1
    name: NVIDIA GeForce RTX 3060
    uuid: GPU-51a1a7ed-0000-4000-8000-000000003060
    vram_total_mib: 12288
"""


def hello_task(schema: str) -> str:
    return f"""\
{schema}
# A task file: `orchctl submit hello.task.yaml --wait`, or drop it into spool/incoming/.
task_id: hello
model: starter              # a model from orch.yaml (or: pool: chat)
prompt: "Say hello to the workstation."
max_tokens: 32
priority: interactive       # interactive | batch
"""
