"""`orchctl up [--model REF] [--simulate]`: from a bare workstation to a served, smoke-tested
model in one command.

    doctor → engine (built for these GPUs, skipped when cached) → model (downloaded, resumed)
    → orch.yaml (a commented starter when there is none) → serve → 60-second smoke → report

then it keeps serving in the foreground until Ctrl-C (`--stop-after-smoke` stops at once).
`--simulate` does the same on the simulated 24 GB + 12 GB workstation with the `sim` engine:
nothing is built or downloaded. Ctrl-C stops cleanly at every step: a build's compiler is
killed, a download keeps its part file (the next `up` resumes it), and the daemon stops its
engines. Exit 0 when the smoke passed, 1 when a check failed, 2 for a config or usage
problem, 3 when the machine cannot serve (the doctor's report says why), 130 interrupted.

This module checks the folder and the machine and brings the engine, the model and the
orch.yaml to hand; `launching` serves them, runs the smoke and prints the report.
"""

from __future__ import annotations

import argparse
import asyncio
import time
from pathlib import Path

from plugins import downloads, gpu_nvml, registry
from reconciler import (
    cli_doctor,
    cli_init,
    diagnosing,
    fetching,
    launching,
    probing,
)
from reconciler.cli_common import EXIT_ENV, EXIT_FAILED, EXIT_USAGE, Refused
from state import atomic, desired, errors

DEFAULT_MODEL = "hf:Qwen/Qwen2.5-0.5B-Instruct-GGUF/qwen2.5-0.5b-instruct-q4_k_m.gguf"


def cmd_up(args: argparse.Namespace) -> int:
    config: Path = args.config
    plan = launching.Plan(config)
    reg = registry.load()
    state = _existing(config, args)
    if state is not None:
        _not_served_already(config, state)
    inventory = _inventory(config, state) if args.simulate else None
    launching.step("checking this machine (orchctl doctor)")
    found = cli_doctor.run(config=config, simulate=inventory, bind=args.bind)
    print(indent(cli_doctor.report(found, verdict=False)))
    if not found.can_serve:
        print(cli_doctor.report(found).splitlines()[-1])
        return EXIT_ENV
    engine_binary = None
    if not args.simulate:
        engine_binary = _engine(args, reg, found, state, plan)
        _model(args, reg, state, plan)
    if state is None:
        _write_config(args, found, plan, engine_binary)
    else:
        plan.model_id = _smoke_model(state)
        if args.simulate:  # its pools say which engines serve, not --simulate
            plan.engine = _engines_of(state, config)
    return asyncio.run(launching.serve(args, plan))


def _engines_of(state: desired.DesiredState, config: Path) -> str:
    """The engines an existing orch.yaml's pools run, for the report."""
    engines = sorted({pool.engine for pool in state.pools})
    if engines == ["sim"]:
        return launching.Plan(config).engine
    return f"{', '.join(engines)} (the engines of the pools in {config.name}; GPUs simulated)"


def indent(text: str) -> str:
    return "\n".join(f"    {line}" if line else "" for line in text.splitlines())


def _existing(config: Path, args: argparse.Namespace) -> desired.DesiredState | None:
    """The orch.yaml there is (None: `up` writes one); refuses one that cannot be served."""
    if not config.exists():
        return None
    loaded = desired.load_desired(config)
    if loaded.value is None:
        raise errors.ConfigProblem(
            f"{config} is not a valid config:\n"
            + "\n".join(f"  {e}" for e in loaded.errors)
            + f"\nrun `orchctl validate {config}` and fix the lines shown"
        )
    if args.model:
        raise Refused(
            EXIT_USAGE,
            f"--model is for the starter orch.yaml, and {config} exists",
            hint="put the ref under models: in it, or pass --config NEW.yaml",
        )
    if args.simulate and loaded.value.gpus.observer != "simulated":
        raise Refused(
            EXIT_USAGE,
            f"{config} serves real GPUs (gpus.observer: nvml); --simulate needs a simulated one",
            hint="pass --config sim/orch.yaml to write a simulated workstation elsewhere",
        )
    if not loaded.value.pools:
        raise Refused(EXIT_USAGE, f"{config} has no pools to serve", hint="add one under pools:")
    return loaded.value


def _not_served_already(config: Path, state: desired.DesiredState) -> None:
    seen = probing.probe(desired.resolve(config.resolve().parent, state.paths.state))
    if seen.serving and seen.status is not None:
        raise Refused(
            EXIT_USAGE,
            f"a daemon (pid {seen.status.daemon.pid}) already serves {config}: it is up",
            hint="`orchctl status` shows it; stop it (Ctrl-C in its terminal) to run up again",
        )


def _inventory(config: Path, state: desired.DesiredState | None) -> Path:
    if state is not None and state.gpus.inventory:
        return desired.resolve(config.resolve().parent, state.gpus.inventory)
    inventory = config.parent / "inventory.yaml"
    if not inventory.exists():
        config.parent.mkdir(parents=True, exist_ok=True)
        atomic.write_bytes(inventory, cli_init.SIMULATED_INVENTORY.encode(), durable=False)
    return inventory


def _engine(
    args: argparse.Namespace,
    reg: registry.Registry,
    found: diagnosing.Diagnosis,
    state: desired.DesiredState | None,
    plan: launching.Plan,
) -> Path | None:
    engine = state.engines.get("llamacpp") if state else None
    if engine is not None and engine.binary:
        plan.engine = f"{engine.binary} (engines.llamacpp.binary)"
        return None
    source = args.source or (engine.provision.ref if engine and engine.provision else None)
    archs = gpu_nvml.cuda_archs(found.facts.gpus) if found.facts else None
    launching.step("llama.cpp engine")
    plan.source = source
    fitting = [b for b in found.builds if archs and set(archs) <= set(b.cuda_archs)]
    if source is None and fitting:  # no source asked for: any build for these GPUs will do
        plan.engine = f"llama-server {fitting[0].path} ({fitting[0].source})"
        print(f"    {fitting[0].path} (cached, from {fitting[0].source})")
        return Path(fitting[0].path)
    began = time.monotonic()
    provisioner = reg.provisioners["llamacpp"]
    said: list[str] = []

    def progress(line: str) -> None:
        said.append(line)
        print(f"    {line}", flush=True)

    try:
        binary: Path = provisioner.ensure(
            *([source] if source else []), archs=archs, progress=progress
        )
    except ValueError as exc:  # a source string that names nothing buildable
        raise Refused(EXIT_USAGE, str(exc)) from None
    except errors.EnvironmentMissing:
        if not found.builds:
            raise
        binary = Path(found.builds[0].path)  # cannot build for these GPUs: use what there is
        plan.notes.append(f"could not build for all GPUs here; using {binary}")
    built = any(line.startswith("installed ") for line in said)
    took = time.monotonic() - began
    plan.engine = f"llama-server {binary}" + (f" (built in {took:.0f} s)" if built else "")
    if not built:
        print(f"    {binary} (cached)")
    return binary


def _model(
    args: argparse.Namespace,
    reg: registry.Registry,
    state: desired.DesiredState | None,
    plan: launching.Plan,
) -> None:
    """Download the model now, with progress, so the smoke starts on a served pool."""
    if state is not None:
        model_id = _smoke_model(state)
        ref = state.models[model_id].ref
        digest = state.models[model_id].digest
    else:
        ref, digest = args.model or DEFAULT_MODEL, None
    scheme = ref.split(":", 1)[0] if ":" in ref else "file"
    resolver = reg.resolvers.get(scheme)
    if resolver is None:
        raise Refused(EXIT_USAGE, f"no model resolver for {scheme}: refs ({ref})")
    launching.step(f"model {ref}")
    base = plan.config.resolve().parent
    if not getattr(resolver, "downloadable", False):
        path = resolver(ref, base).path
        if path is None or not path.is_file():
            raise Refused(EXIT_USAGE, f"{path} does not exist", hint="fix the model ref")
    else:
        if problem := resolver.check(ref):
            raise Refused(EXIT_USAGE, problem)
        path = resolver(ref, base).path
        if not path.is_file():
            path = _download(resolver, ref, digest)
    plan.model = f"{ref} → {path} ({path.stat().st_size / (1 << 20):.0f} MiB)"
    print(f"    {path}")


def _download(resolver: object, ref: str, digest: str | None) -> Path:
    shown = {"pct": -5, "at": 0.0}

    def progress(done: int, total: int | None) -> None:
        now = time.monotonic()
        pct = 100 * done // total if total else -1
        if (total and pct >= shown["pct"] + 5) or now - shown["at"] >= 10:
            shown["pct"], shown["at"] = pct, now
            if total:
                shown_size = f"{fetching.size_text(done)} of {fetching.size_text(total)}"
                print(f"    downloading: {pct}% ({shown_size})", flush=True)
            else:
                print(f"    downloading: {fetching.size_text(done)} so far", flush=True)

    try:
        path: Path = resolver.fetch(ref, digest=digest, progress=progress)  # type: ignore[attr-defined]
    except downloads.DownloadError as exc:
        if exc.permanent:
            raise Refused(
                EXIT_USAGE if isinstance(exc, downloads.NotFound) else EXIT_FAILED, exc.message
            ) from None
        raise Refused(EXIT_FAILED, exc.message, hint="run `orchctl up` again: it resumes") from None
    except KeyboardInterrupt:
        print("    stopped; the next `orchctl up` resumes the download", flush=True)
        raise
    return path


def _write_config(
    args: argparse.Namespace,
    found: diagnosing.Diagnosis,
    plan: launching.Plan,
    engine_binary: Path | None,
) -> None:
    config = plan.config
    schema = cli_init.schema_line("desired-state")
    folder = config.parent
    if args.simulate:
        text = cli_init.simulated_config(schema, config.name, bind=args.bind)
        stub = folder / "models" / "starter.gguf"
        if not stub.exists():
            stub.parent.mkdir(parents=True, exist_ok=True)
            atomic.write_bytes(stub, cli_init.STUB_GGUF, durable=False)
    else:
        gpus = list(found.facts.gpus) if found.facts else []
        text = cli_init.up_config(
            schema,
            config.name,
            gpus,
            model_ref=args.model or DEFAULT_MODEL,
            engine=engine_binary,
            source=plan.source,
            bind=args.bind,
        )
    hello = folder / "hello.task.yaml"
    folder.mkdir(parents=True, exist_ok=True)
    atomic.write_bytes(config, text.encode(), durable=False)
    if not hello.exists():
        atomic.write_bytes(
            hello, cli_init.hello_task(cli_init.schema_line("task")).encode(), durable=False
        )
    plan.wrote_config = True
    launching.step(f"wrote {config} (a commented starter: edit it while serving)")


def _smoke_model(state: desired.DesiredState) -> str:
    serving = [p for p in state.pools if p.replicas > 0] or state.pools
    return serving[0].model
