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
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import signal
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from plugins import downloads, gpu_nvml, registry
from reconciler import (
    cli_doctor,
    cli_init,
    daemon,
    diagnosing,
    fetching,
    logs,
    probing,
    smoking,
)
from reconciler.cli_common import EXIT_ENV, EXIT_FAILED, EXIT_OK, EXIT_USAGE, Refused
from state import atomic, desired, errors

DEFAULT_MODEL = "hf:Qwen/Qwen2.5-0.5B-Instruct-GGUF/qwen2.5-0.5b-instruct-q4_k_m.gguf"
UNSCHEDULABLE_GRACE_S = 10.0


@dataclass
class Plan:
    """What `up` found or made, for the report."""

    config: Path
    wrote_config: bool = False
    engine: str = "the sim engine (simulated GPUs)"
    model: str = ""
    model_id: str = "starter"
    source: str | None = None  # the llama.cpp source asked for (None: the default)
    notes: list[str] = field(default_factory=list)


def cmd_up(args: argparse.Namespace) -> int:
    config: Path = args.config
    plan = Plan(config)
    reg = registry.load()
    state = _existing(config, args)
    if state is not None:
        _not_served_already(config, state)
    inventory = _inventory(config, state) if args.simulate else None
    step("checking this machine (orchctl doctor)")
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
    return asyncio.run(_serve(args, plan))


def step(text: str) -> None:
    print(f"==> {text}", flush=True)


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
    plan: Plan,
) -> Path | None:
    engine = state.engines.get("llamacpp") if state else None
    if engine is not None and engine.binary:
        plan.engine = f"{engine.binary} (engines.llamacpp.binary)"
        return None
    source = args.source or (engine.provision.ref if engine and engine.provision else None)
    archs = gpu_nvml.cuda_archs(found.facts.gpus) if found.facts else None
    step("llama.cpp engine")
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
    plan: Plan,
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
    step(f"model {ref}")
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
    plan: Plan,
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
    step(f"wrote {config} (a commented starter: edit it while serving)")


def _smoke_model(state: desired.DesiredState) -> str:
    serving = [p for p in state.pools if p.replicas > 0] or state.pools
    return serving[0].model


# -- serving and the smoke -------------------------------------------------------------------


async def _serve(args: argparse.Namespace, plan: Plan) -> int:
    handler = _quiet_logs()
    try:
        d = daemon.build(daemon.Options(config_path=plan.config))
    except BaseException:
        _close(handler)
        raise
    handler = _log_file(handler, d.state_dir / "up.log")
    loop = asyncio.get_running_loop()
    interrupted = threading.Event()

    def on_signal(name: str) -> None:
        interrupted.set()
        d.stop(name)

    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        loop.add_signal_handler(sig, on_signal, sig.name)
    job = loop.create_task(d.run())
    step(f"serving {plan.config}")
    try:
        problem = await _until_ready(d, job)
        if job.done() or interrupted.is_set():
            return 130 if interrupted.is_set() else EXIT_FAILED
        if problem is not None:
            print(f"    {problem}")
            return EXIT_FAILED
        step(f"smoke test ({args.smoke_s:.0f} s at most)")
        smoke = smoking.Smoke(d.spool, d.results, plan.model_id, budget_s=args.smoke_s)
        run = loop.create_task(smoke.run())
        await asyncio.wait([run, job], return_when=asyncio.FIRST_COMPLETED)
        if not run.done():
            run.cancel()
            return 130
        outcomes = run.result()
        print(report(plan, d, outcomes))
        if not all(o.ok for o in outcomes):
            return EXIT_FAILED
        if args.stop_after_smoke:
            return EXIT_OK
        print("serving until Ctrl-C", flush=True)
        await job
        return EXIT_OK
    finally:
        if not job.done():
            d.stop("orchctl up ending")
        await asyncio.wait_for(job, 60)
        for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
            loop.remove_signal_handler(sig)
        step("stopped: engines stopped, nothing left running")
        _close(handler)


async def _until_ready(d: daemon.Daemon, job: asyncio.Task[int]) -> str | None:
    """Wait until every pool is Ready, printing what changes; the problem when one cannot be."""
    shown: dict[str, tuple[str, str | None, float]] = {}
    stuck_since: dict[str, float] = {}
    state = d.config.state
    limit = (state.timeouts.ready_s if state else 120.0) + 60.0
    last_change = time.monotonic()
    while not job.done():
        pools = d.status().pools
        now = time.monotonic()
        for p in pools:
            before = shown.get(p.id)
            moved = before is None or before[:2] != (p.state, p.reason)
            if moved and (before is None or before[0] != p.state or now - before[2] >= 2.0):
                print(
                    f"    pool {p.id}: {p.state}" + (f" ({p.reason})" if p.reason else ""),
                    flush=True,
                )
                shown[p.id] = (p.state, p.reason, now)
                last_change = now
            if p.state == "Failed":
                return f"pool {p.id} failed: {p.reason}"
            if p.state == "Unschedulable":
                if now - stuck_since.setdefault(p.id, now) > UNSCHEDULABLE_GRACE_S:
                    return f"pool {p.id} cannot be placed: {p.reason}"
            else:
                stuck_since.pop(p.id, None)
        if pools and all(p.state in ("Ready", "Stopped") and not p.reason for p in pools):
            return None
        if now - last_change > limit:
            return f"the pools did not become Ready within {limit:.0f} s"
        await asyncio.sleep(0.2)
    return None


def report(plan: Plan, d: daemon.Daemon, outcomes: list[smoking.Outcome]) -> str:
    passed = sum(o.ok for o in outcomes)
    status = d.status()
    pools = ", ".join(
        f"{p.id} {p.state}"
        + (f" on GPU {','.join(map(str, p.replicas[0].gpu))}" if p.replicas else "")
        for p in status.pools
    )
    lines = [
        "",
        "llama-orch is up" if passed == len(outcomes) else "llama-orch is up, but the smoke failed",
        f"  config   {plan.config}" + (" (written now)" if plan.wrote_config else ""),
        f"  engine   {plan.engine}",
        *([f"  model    {plan.model}"] if plan.model else []),
        f"  pools    {pools}",
        f"  API      {status.daemon.url}",
        f"  smoke    {passed} of {len(outcomes)} checks passed",
        *(f"    {'ok  ' if o.ok else 'FAIL'}  {o.name}: {o.detail}" for o in outcomes),
        *(f"  note     {n}" for n in plan.notes),
        "",
        f"next, from another terminal: orchctl submit {_task_file(plan)} "
        f"--config {plan.config} --wait",
    ]
    return "\n".join(lines)


def _task_file(plan: Plan) -> str:
    hello = plan.config.parent / "hello.task.yaml"
    return str(hello) if hello.is_file() else "TASK.task.yaml"


def _quiet_logs() -> logging.Handler | None:
    """Warnings on the terminal; the daemon's whole log goes to <state>/up.log."""
    logs.setup(fmt="pretty", level="info", stream=sys.stderr)
    for h in logging.getLogger(logs.ROOT).handlers:
        h.setLevel(logging.WARNING)
    return None


def _log_file(handler: logging.Handler | None, path: Path) -> logging.Handler | None:
    try:
        with_file = logging.FileHandler(path, encoding="utf-8")
    except OSError:
        return handler
    with_file.setFormatter(logs.JsonLinesFormatter())
    logging.getLogger(logs.ROOT).addHandler(with_file)
    return with_file


def _close(handler: logging.Handler | None) -> None:
    if handler is not None:
        logging.getLogger(logs.ROOT).removeHandler(handler)
        handler.close()
