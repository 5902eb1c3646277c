"""What `orchctl serve` would find wrong with an orch.yaml beyond its schema, found without
starting anything. `orchctl validate` calls `check` on every orch.yaml it is given.

It works on the raw parsed data, so it reports alongside the schema's own errors, in one
round, even when the schema refuses the file: pools naming a model, engine or pool id that is
not there (the schema stops at the first), GPUs listed twice in a pool or missing from the
workstation, model refs whose scheme no installed resolver handles or that name no file it
could download (`hf:org/repo` without a file), `file:` models that do
not exist yet (resolved from orch.yaml's folder, as the daemon resolves them), a missing
llama-server binary, and a GPU observer that cannot start here. What the daemon would refuse
is an error; what only stops a pool until the machine changes is a warning.
"""

from __future__ import annotations

import dataclasses
import os
import stat
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from plugins import (
    engine_llamacpp,
    gguf_info,
    gguf_reading,
    gpu_nvml,
    gpu_simulated,
    llamacpp_builds,
    registry,
)
from reconciler import resolving, specs
from state import desired, errors, loading, parsing, spool

# Engines that load the model file themselves; the `sim` engine only simulates one.
SIMULATED_ENGINES = frozenset({"sim"})
# Engines whose model file is a GGUF they read before starting (its header is checked here)
GGUF_ENGINES = frozenset({"llamacpp"})


@dataclass(frozen=True)
class Finding:
    error: loading.LoadError
    warning: bool = False


Report = Callable[..., None]  # report(loc, message, hint=None, *, warning=False)


def check(path: Path, data: Any, node: yaml.Node | None, reg: registry.Registry) -> list[Finding]:
    """Every problem found in orch.yaml's parsed `data` (`node` locates them)."""
    found: list[Finding] = []

    def report(
        loc: tuple[Any, ...], message: str, hint: str | None = None, *, warning: bool = False
    ) -> None:
        line, column = loading.locate(node, loc)
        field = parsing.dotted(loc) or None
        found.append(
            Finding(loading.LoadError(str(path), line, column, field, message, hint), warning)
        )

    if not isinstance(data, dict):
        return found
    base = path.resolve().parent
    raw_models, raw_pools = data.get("models"), data.get("pools")
    models: dict[str, Any] = raw_models if isinstance(raw_models, dict) else {}
    pools: list[dict[str, Any]] = []
    if isinstance(raw_pools, list):
        pools = [p if isinstance(p, dict) else {} for p in raw_pools]
    _pool_references(pools, models, reg, report)
    _models(models, pools, base, reg, report)
    gpu_indices = _gpus(data.get("gpus"), base, report)
    _devices(pools, gpu_indices, report)
    _engines(pools, data.get("engines"), report)
    _paths(data.get("paths"), base, report)
    return found


# the folders `serve` makes inside those of `paths:`
SUBFOLDERS = {"spool": spool.FOLDERS, "state": ("sessions", "engines")}


def _paths(paths: Any, base: Path, report: Report) -> None:
    """Each folder of `paths:` as `serve` will need it: a folder, or one that can be made
    (the nearest existing folder on the way is writable); a file in the way is an error."""
    given = paths if isinstance(paths, dict) else {}
    for key, default in desired.PathsConfig().model_dump().items():
        value = given.get(key, default)
        if not isinstance(value, str) or not value:
            continue  # the schema says what is wrong with it
        folder = desired.resolve(base, value)
        where = ("paths", key) if key in given else ("paths",) if given else ()
        # the folder, then those `serve` makes in it (a file where one goes stops it too)
        for needed in (folder, *(folder / sub for sub in SUBFOLDERS.get(key, ()))):
            problem = _folder_problem(needed)
            if problem is not None:
                report(where, f"{needed} {problem[0]}", problem[1])
                break


def _folder_problem(folder: Path) -> tuple[str, str] | None:
    """(what is wrong, the fix) when `folder` can be neither used nor made; else None."""
    try:
        info = folder.stat()
    except (FileNotFoundError, NotADirectoryError):  # to be made: what is on the way?
        pass
    except OSError as exc:
        return f"cannot be used: {exc.strerror or exc}", "choose a folder the daemon can use"
    else:
        if not stat.S_ISDIR(info.st_mode):
            return "is a file, not a folder", "choose another path, or move the file away"
        if not os.access(folder, os.W_OK | os.X_OK):
            return "is a folder the daemon may not write", "give its user write access"
        return None
    ancestor = folder.parent
    while not ancestor.exists() and ancestor != ancestor.parent:
        ancestor = ancestor.parent
    if not ancestor.is_dir():
        return (
            f"cannot be made: {ancestor} on the way to it is a file",
            "choose another path, or move that file away",
        )
    if not os.access(ancestor, os.W_OK | os.X_OK):
        return (
            f"cannot be made: {ancestor}, on the way to it, may not be written",
            "choose a path under a folder the daemon's user may write",
        )
    return None


def _pool_references(
    pools: list[dict[str, Any]], models: dict[str, Any], reg: registry.Registry, report: Report
) -> None:
    first: dict[str, int] = {}
    for i, pool in enumerate(pools):
        pool_id, model, engine = pool.get("id"), pool.get("model"), pool.get("engine")
        if isinstance(pool_id, str):
            if pool_id in first:
                report(
                    ("pools", i, "id"),
                    f"pool id {pool_id!r} is used twice (first by pools[{first[pool_id]}])",
                    "give every pool its own id",
                )
            first.setdefault(pool_id, i)
        if isinstance(model, str) and model not in models:
            known = ", ".join(sorted(map(str, models))) or "none defined"
            report(
                ("pools", i, "model"),
                f"{model!r} is not under models: (known: {known})",
                "add it under models:, or name one of those",
            )
        if isinstance(engine, str) and engine not in reg.engines:
            report(
                ("pools", i, "engine"),
                f"unknown engine {engine!r}",
                f"installed engines: {', '.join(sorted(reg.engines))} (`orchctl plugins`)",
            )


def _models(
    models: dict[str, Any],
    pools: list[dict[str, Any]],
    base: Path,
    reg: registry.Registry,
    report: Report,
) -> None:
    for name, spec in models.items():
        ref = spec.get("ref") if isinstance(spec, dict) else None
        if not isinstance(ref, str):
            continue
        users = [p for p in pools if p.get("model") == name]
        scheme = resolving.scheme_of(ref)  # as the pool runtime reads it
        if scheme not in reg.resolvers:
            installed = ", ".join(f"{s}:" for s in sorted(reg.resolvers))
            report(
                ("models", name, "ref"),
                f"no model resolver for {scheme}: refs is installed (installed: {installed})"
                + ("" if users else "; no pool uses this model yet"),
                'download the file and use ref: "file:<path>" (relative paths resolve from '
                f"orch.yaml's folder), or install a plugin that resolves {scheme}: refs",
                warning=not users,
            )
            continue
        loaders = sorted({str(p.get("id")) for p in users} - _simulated_pools(users))
        check = getattr(reg.resolvers[scheme], "check", None)
        if callable(check) and (problem := check(ref)):
            report(("models", name, "ref"), problem, warning=not loaders)
            continue
        if scheme != "file" or not loaders:
            continue  # other resolvers download when `serve` needs the file: never here
        resolved = reg.resolvers["file"](ref, base)
        if resolved.path is not None and not resolved.path.is_file():
            what = "is a folder, not a model file" if resolved.path.is_dir() else "does not exist"
            report(
                ("models", name, "ref"),
                f"{resolved.path} {what}: pool {', '.join(loaders)} cannot start until it is "
                "a model file",
                f"relative paths resolve from orch.yaml's folder ({base}); put the model file "
                "there or fix the path",
                warning=True,
            )
            continue
        ggufs = sorted(str(p.get("id")) for p in users if p.get("engine") in GGUF_ENGINES)
        if resolved.path is not None and ggufs:
            try:
                gguf_info.inspect(resolved.path)  # what the engine checks before it starts
            except (gguf_reading.GgufError, OSError) as exc:
                report(
                    ("models", name, "ref"),
                    f"{resolved.path} is not a usable GGUF ({exc}): pool {', '.join(ggufs)} "
                    "cannot start until it is",
                    "fetch the file again (set its digest: to catch a bad copy), or point ref "
                    "at a GGUF file",
                    warning=True,
                )


def _simulated_pools(pools: list[dict[str, Any]]) -> set[str]:
    return {str(p.get("id")) for p in pools if p.get("engine") in SIMULATED_ENGINES}


def _gpus(gpus: Any, base: Path, report: Report) -> set[int] | None:
    """The GPU indices `serve` would see, or None when they cannot be known here."""
    gpus = gpus if isinstance(gpus, dict) else {}
    observer = gpus.get("observer", "nvml")
    if observer == "simulated" and isinstance(gpus.get("inventory"), str):
        inventory = desired.resolve(base, gpus["inventory"])
        try:
            loaded = gpu_simulated.load_inventory(inventory)
        except gpu_simulated.InventoryError as exc:
            for problem in exc.errors:
                alone = dataclasses.replace(problem, hint=None)  # one hint, both fixes in it
                fixes = [problem.hint, "relative paths resolve from orch.yaml's folder"]
                report(
                    ("gpus", "inventory"),
                    f"the inventory cannot be used: {alone}",
                    "; ".join(f for f in fixes if f),
                )
            return None
        return {g.index for g in loaded.gpus}
    if observer == "nvml":
        try:
            nvml = gpu_nvml.open_nvml()
        except errors.EnvironmentMissing as exc:
            report(
                ("gpus", "observer"),
                f"{exc.what}, so `orchctl serve` exits 3 on this machine",
                "without a GPU, run the simulated workstation: `orchctl init --simulate`",
                warning=True,
            )
            return None
        try:
            return {g.index for g in nvml.observe().gpus}
        finally:
            nvml.close()
    return None


def _devices(pools: list[dict[str, Any]], present: set[int] | None, report: Report) -> None:
    for i, pool in enumerate(pools):
        devices = pool.get("devices")
        if not isinstance(devices, list):
            continue
        seen: set[int] = set()
        for k, index in enumerate(devices):
            if not isinstance(index, int) or isinstance(index, bool):
                continue
            if index in seen:
                report(
                    ("pools", i, "devices", k),
                    f"GPU {index} is listed twice",
                    "list each GPU index once, e.g. [0, 1]",
                )
            elif present is not None and index not in present:
                have = ", ".join(map(str, sorted(present))) or "none"
                report(  # worded as the daemon words it (reconciler.configuring)
                    ("pools", i, "devices", k),
                    f"GPU {index} does not exist on this machine (GPUs: {have})",
                    "use an index nvidia-smi lists (PCI bus order), or devices: auto",
                )
            seen.add(index)


def _engines(pools: list[dict[str, Any]], engines: Any, report: Report) -> None:
    for i, pool in enumerate(pools):  # what the pool's engine never reads: said, not ignored
        engine = pool.get("engine")
        if pool.get("sim") is not None and engine != "sim" and isinstance(engine, str):
            report(
                ("pools", i, "sim"),
                f"sim: holds options of the sim engine; this pool runs {engine!r}, which "
                "ignores them",
                "remove sim:, or set engine: sim to simulate this pool",
                warning=True,
            )
        if pool.get("flags") and engine in SIMULATED_ENGINES:
            report(
                ("pools", i, "flags"),
                f"flags: the {engine} engine takes no command-line flags; they are ignored",
                "remove flags:, or set the pool's engine to one that takes them (llamacpp)",
                warning=True,
            )
    users = [i for i, p in enumerate(pools) if p.get("engine") == "llamacpp"]
    if not users:
        return
    config = engines.get("llamacpp") if isinstance(engines, dict) else None
    try:
        found = engine_llamacpp.find_binary({"engine": config if isinstance(config, dict) else {}})
    except errors.EnvironmentMissing as exc:
        explicit = isinstance(config, dict) and config.get("binary")
        loc = ("engines", "llamacpp", "binary") if explicit else ("pools", users[0], "engine")
        report(
            loc,
            f"{exc.what}: llamacpp pools cannot start until it is there",
            " ".join(exc.fix.split()),
            warning=True,
        )
        return
    if llamacpp_builds.cpu_only(found) and not engine_llamacpp.cpu_inference_allowed():
        report(
            ("pools", users[0], "engine"),
            f"the only llama-server here is a CPU-only build ({found}): llamacpp pools refuse "
            "it (they run on GPUs only) and cannot start",
            "run `orchctl up` to build llama.cpp with CUDA, or set engines.llamacpp.binary in "
            "orch.yaml to a CUDA build of llama-server",
            warning=True,
        )


def fits(
    path: Path, state: desired.DesiredState, node: yaml.Node | None, reg: registry.Registry
) -> list[Finding]:
    """Pools whose replica could not start even on empty GPUs of this machine (or the
    simulated inventory): the engine's own VRAM estimate, as the daemon plans with it, above
    what the pool's GPUs hold after the reserve and their other users. A warning: the pool
    waits, Unschedulable, until the config or the machine changes."""
    base = path.resolve().parent
    try:
        observer = reg.observer(state, base)
    except Exception:  # no driver, bad inventory: reported by `check` already
        return []
    try:
        snapshot = observer.observe()
    finally:
        observer.close()
    indices = [g.index for g in snapshot.gpus]
    rooms = specs.engine_room_mib(snapshot, indices)  # keyed by the index as text
    room = {i: rooms[str(i)] - state.gpus.reserve_mib for i in indices}
    if not room:
        return []
    found = []
    for i, pool in enumerate(state.pools):
        engine = reg.engines.get(pool.engine)
        if engine is None or pool.model not in state.models:
            continue
        pinned = tuple(pool.devices) if isinstance(pool.devices, list) else None
        if pinned is not None and any(d not in room for d in pinned):
            continue  # a missing GPU is `check`'s error
        probe = _probe(pool, state, base, reg, pinned or (0,))
        if pool.engine in GGUF_ENGINES and probe.model_path is not None:
            try:  # a file that is no usable GGUF is `check`'s warning; it sizes nothing
                gguf_info.inspect(probe.model_path)
            except (gguf_reading.GgufError, OSError):
                continue
        need = engine.estimate_vram_mib(probe)
        problem = _no_room(pool, need, pinned, room, state.gpus.reserve_mib)
        if problem is None:
            continue
        message, hint = problem
        loc: tuple[Any, ...] = ("pools", i, "devices" if pinned else "model")
        line, column = loading.locate(node, loc)
        error = loading.LoadError(str(path), line, column, parsing.dotted(loc), message, hint)
        found.append(Finding(error, warning=True))
    return found


def _probe(
    pool: desired.PoolSpec,
    state: desired.DesiredState,
    base: Path,
    reg: registry.Registry,
    devices: tuple[int, ...],
) -> Any:
    """The spec the daemon would size one replica of `pool` with."""
    ref = state.models[pool.model].ref
    resolver = reg.resolvers.get(resolving.scheme_of(ref))
    found = None
    if resolver is not None:
        try:
            found = resolver(ref, base)
        except Exception:  # the download resolver may refuse a ref: sized from size_mib
            found = None
    return specs.replica_spec(
        pool,
        state,
        replica_id=f"{pool.id}-probe",
        devices=devices,
        model_path=found.path if found else None,
        file_size_mib=found.size_mib if found else None,
        snapshot=None,
        state_dir=base / state.paths.state,
    )


def _split_that_fits(need: int, room: dict[int, int]) -> list[int] | None:
    """The fewest GPUs (most room first) whose even shares of `need` MiB each fit, or None
    when no split does (a hint never suggests a split that validate would refuse)."""
    by_room = sorted(room, key=lambda i: (-room[i], i))
    for n in range(2, len(by_room) + 1):
        chosen = by_room[:n]
        if all(room[i] >= -(-need // n) for i in chosen):
            return sorted(chosen)
    return None


def _no_room(
    pool: desired.PoolSpec,
    need: int,
    pinned: tuple[int, ...] | None,
    room: dict[int, int],
    reserve_mib: int,
) -> tuple[str, str] | None:
    """(message, hint) when one replica of `pool`, needing `need` MiB, fits nowhere it may go."""
    sizing = f"model {pool.model}, ctx {pool.ctx} × {pool.slots} slots"
    if pinned is None:
        best = min(room, key=lambda i: (-room[i], i))
        if need <= room[best]:
            return None
        split = _split_that_fits(need, room)
        return (
            f"pool {pool.id} can never start here: one replica needs about {need:,} MiB "
            f"({sizing}) and the largest GPU, GPU {best}, has {max(room[best], 0):,} MiB for "
            f"engines after the {reserve_mib} MiB reserve",
            "lower ctx or slots, or choose a smaller model file"
            + (
                f", or split the model over GPUs with devices: [{', '.join(map(str, split))}]"
                if split
                else " (split over every GPU it would still not fit)"
            ),
        )
    share = -(-need // len(pinned))
    short = [d for d in pinned if room[d] < share]
    if not short:
        return None
    d = short[0]
    each = "" if len(pinned) == 1 else f" on each of its {len(pinned)} GPUs"
    elsewhere = [i for i in sorted(room) if i not in pinned and room[i] >= need]
    return (
        f"pool {pool.id} can never start here: one replica needs about {share:,} MiB{each} "
        f"({sizing}) and GPU {d} has {max(room[d], 0):,} MiB for engines after the "
        f"{reserve_mib} MiB reserve",
        (
            f"pin GPU {elsewhere[0]}, which can hold it, or use devices: auto; or "
            if elsewhere
            else ""
        )
        + "lower ctx or slots, or choose a smaller model file",
    )
