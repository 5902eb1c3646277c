"""`orchctl`: the command line. Exit codes: 0 ok, 1 the task or check failed, 2 usage or
config error (file:line printed), 3 environment missing (the fix printed)."""

from __future__ import annotations

import argparse
import asyncio
import json
import signal
import sys
import time
from pathlib import Path
from typing import Any

import pydantic
import yaml

from plugins import registry
from reconciler import logs, status
from state import desired, errors, events, loading, results, spool, statusfile, tasks

EXIT_OK, EXIT_FAILED, EXIT_USAGE, EXIT_ENV = 0, 1, 2, 3


def main(argv: list[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return EXIT_USAGE
    try:
        code: int = args.func(args)
    except errors.EnvironmentMissing as exc:
        print(f"orchctl: {exc.what}\n\n{exc.fix}", file=sys.stderr)
        return EXIT_ENV
    except errors.ConfigProblem as exc:
        print(f"orchctl: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        return 130
    return code


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="orchctl",
        description="llama-orch home: serve local LLMs "
        "on this workstation's GPUs from a desired-state file.",
    )
    sub = p.add_subparsers(metavar="COMMAND")

    s = sub.add_parser("serve", help="run the reconciler")
    s.add_argument("--config", type=Path, default=Path("orch.yaml"))
    s.add_argument(
        "--simulate",
        type=Path,
        metavar="INVENTORY",
        help="use simulated GPUs from this inventory file instead of NVML",
    )
    s.add_argument("--duration", type=float, metavar="SECONDS", help="stop after this long")
    s.add_argument(
        "--exit-when-idle",
        action="store_true",
        help="stop once the spool is empty and no task runs",
    )
    s.add_argument("--resync", type=float, default=2.0, metavar="SECONDS")
    s.add_argument("--no-watch", action="store_true", help="no inotify; rely on the resync")
    _log_args(s)
    s.set_defaults(func=cmd_serve)

    v = sub.add_parser("validate", help="check orch.yaml, task and inventory files")
    v.add_argument("files", nargs="+", type=Path)
    v.set_defaults(func=cmd_validate)

    sm = sub.add_parser("submit", help="deliver a task file into the spool (atomically)")
    sm.add_argument("file", help="task file, or - for standard input")
    _where(sm)
    sm.add_argument("--wait", action="store_true", help="wait for the result and print it")
    sm.add_argument("--timeout", type=float, default=600.0)
    sm.set_defaults(func=cmd_submit)

    w = sub.add_parser("watch", help="follow a task's events until it ends")
    w.add_argument("task_id")
    _where(w)
    w.add_argument("--json", action="store_true", help="print frames as JSON lines")
    w.add_argument("--timeout", type=float, default=600.0)
    w.set_defaults(func=cmd_watch)

    c = sub.add_parser("cancel", help="cancel a queued or running task")
    c.add_argument("task_id")
    _where(c)
    c.set_defaults(func=cmd_cancel)

    st = sub.add_parser("status", help="show GPUs, pools, replicas and the queue")
    _where(st)
    st.add_argument("--json", action="store_true")
    st.set_defaults(func=cmd_status)

    pl = sub.add_parser("plugins", help="list loaded plugins")
    pl.set_defaults(func=cmd_plugins)

    sc = sub.add_parser("schemas", help="write (or --check) the JSON Schemas in schemas/")
    sc.add_argument("--check", action="store_true")
    sc.add_argument("--out", type=Path, default=None)
    sc.set_defaults(func=cmd_schemas)
    return p


def _log_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--log-format", choices=["json", "pretty"], default="json")
    p.add_argument("--log-level", default="info")
    p.add_argument("--log-file", type=Path)


def _where(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--config",
        type=Path,
        default=Path("orch.yaml"),
        help="orch.yaml, to find the spool and results folders",
    )


def _paths(config_path: Path) -> tuple[spool.Spool, results.ResultStore, Path]:
    """The folders named by orch.yaml. A broken orch.yaml must not lock the operator out
    (the daemon keeps serving the last good one): fall back to its raw `paths:`, or the
    defaults, and say so."""
    if not config_path.exists():
        print(f"orchctl: {config_path} not found (use --config PATH)", file=sys.stderr)
        raise SystemExit(EXIT_USAGE)
    loaded = desired.load_desired(config_path)
    if loaded.value is not None:
        paths = loaded.value.paths
    else:
        print(
            f"orchctl: warning: {config_path} has errors (the daemon keeps the last good "
            "config); `orchctl validate` shows them",
            file=sys.stderr,
        )
        raw = loaded.data.get("paths") if isinstance(loaded.data, dict) else None
        known = desired.PathsConfig.model_fields
        try:
            paths = desired.PathsConfig.model_validate(
                {k: v for k, v in raw.items() if k in known} if isinstance(raw, dict) else {}
            )
        except ValueError:
            paths = desired.PathsConfig()
    base = config_path.resolve().parent
    return (
        spool.Spool(desired.resolve(base, paths.spool)),
        results.ResultStore(desired.resolve(base, paths.results)),
        desired.resolve(base, paths.state),
    )


def cmd_serve(args: argparse.Namespace) -> int:
    from reconciler import daemon

    logs.setup(fmt=args.log_format, level=args.log_level, log_file=args.log_file)
    loaded = desired.load_desired(args.config)
    if loaded.value is None:
        for err in loaded.errors:
            print(err, file=sys.stderr)
        return EXIT_USAGE
    options = daemon.Options(
        config_path=args.config,
        simulate=args.simulate,
        duration_s=args.duration,
        resync_s=args.resync,
        watch=not args.no_watch,
        exit_when_idle=args.exit_when_idle,
    )

    async def run() -> int:
        d = daemon.build(options)
        loop = asyncio.get_running_loop()
        # closing the terminal (SIGHUP) stops as cleanly as Ctrl-C and SIGTERM
        for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
            loop.add_signal_handler(sig, d.stop, sig.name)
        return await d.run()

    return asyncio.run(run())


def cmd_validate(args: argparse.Namespace) -> int:
    failures = 0
    engines = set(registry.load().engines)
    for path in args.files:
        errors = validate_file(path, engines)
        if errors:
            failures += 1
            for err in errors:
                print(err)
        else:
            print(f"{path}: ok")
    return EXIT_USAGE if failures else EXIT_OK


def validate_file(path: Path, engines: set[str]) -> list[loading.LoadError]:
    name = path.name
    if name.endswith(tasks.TASK_SUFFIXES):
        return loading.load_model(path, tasks.TaskFile).errors
    text, errs = loading.read_text(path)
    if text is None:
        return errs
    data, _, errs = loading.parse_document(text, str(path))
    if errs:
        return errs
    if isinstance(data, dict) and set(data) == {"gpus"}:
        return loading.load_model(path, desired.SimulatedInventory).errors
    return desired.load_desired(path, known_engines=engines).errors


def cmd_submit(args: argparse.Namespace) -> int:
    the_spool, store, _ = _paths(args.config)
    if args.file == "-":
        data = sys.stdin.buffer.read()
        shown, is_json = "<stdin>", data.lstrip().startswith(b"{")
    else:
        path = Path(args.file)
        data = path.read_bytes()
        shown, is_json = str(path), path.suffix == ".json"
    text, errs = loading.decode_utf8(data, shown)
    checked = (
        loading.validate_text(text, tasks.TaskFile, shown=shown, is_json=is_json)
        if text is not None
        else loading.Loaded(None, errs)
    )
    if checked.value is None:
        for err in checked.errors:
            print(err, file=sys.stderr)
        return EXIT_USAGE
    task = checked.value
    suffix = ".task.json" if is_json else ".task.yaml"
    if args.file == "-":
        task_id = task.task_id or spool.unique_name("stdin").replace(".", "-")[:100]
        if task.task_id is None:
            assert text is not None
            parsed = json.loads(text) if is_json else yaml.safe_load(text)
            parsed["task_id"] = task_id
            data = json.dumps(parsed).encode()
            suffix = ".task.json"
    else:
        task_id = task.task_id or tasks.stem(Path(args.file).name)
    try:
        target = spool.deliver(the_spool, data, name=f"{task_id}{suffix}")
    except ValueError as exc:  # a name the spool would refuse (too long, hidden, …)
        print(f"orchctl: {exc}; set task_id: in the file", file=sys.stderr)
        return EXIT_USAGE
    print(f"submitted {task_id} → {target}")
    print(f"result: {store.path(task_id)}")
    if not args.wait:
        return EXIT_OK
    result = _wait_result(store, task_id, args.timeout)
    if result is None:
        print(f"no result after {args.timeout:.0f} s", file=sys.stderr)
        return EXIT_FAILED
    print(json.dumps(result.model_dump(mode="json"), indent=2))
    return EXIT_OK if result.status == "succeeded" else EXIT_FAILED


def _wait_result(store: results.ResultStore, task_id: str, timeout: float) -> results.Result | None:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        result = store.read(task_id)
        if result is not None and result.terminal:
            return result
        time.sleep(0.1)
    return None


def cmd_watch(args: argparse.Namespace) -> int:
    _, store, _ = _paths(args.config)
    log_path = store.events_path(args.task_id)
    after, end = 0, time.monotonic() + args.timeout
    while time.monotonic() < end:
        for frame in events.read(log_path, after=after):
            after = frame.id
            _print_frame(frame, as_json=args.json)
            if frame.terminal:
                if not args.json:
                    print()
                return (
                    EXIT_OK
                    if frame.event == "end" and frame.data.get("finish_reason") != "canceled"
                    else EXIT_FAILED
                )
        time.sleep(0.05)
    print(f"\nno terminal frame after {args.timeout:.0f} s", file=sys.stderr)
    return EXIT_FAILED


def _print_frame(frame: events.EventFrame, *, as_json: bool) -> None:
    if as_json:
        print(json.dumps(frame.model_dump(mode="json")), flush=True)
        return
    d: dict[str, Any] = frame.data
    if frame.event == "token":
        print(d.get("t", ""), end="", flush=True)
    elif frame.event == "queued":
        print(
            f"[queued at position {d.get('queue_position')}, predicted start "
            f"{d.get('predicted_start_ms')} ms]",
            flush=True,
        )
    elif frame.event == "started":
        print(f"[started on {d.get('replica_id')} (pool {d.get('pool_id')})]", flush=True)
    elif frame.event == "end":
        print(f"\n[end: {d.get('finish_reason')}, {d.get('tokens_out')} tokens]", end="")
    elif frame.event == "error":
        print(f"\n[error {d.get('code')}: {d.get('message')} — {d.get('hint')}]", end="")


def cmd_cancel(args: argparse.Namespace) -> int:
    the_spool, store, _ = _paths(args.config)
    try:
        spool.request_cancel(the_spool, args.task_id)
    except ValueError as exc:
        print(f"orchctl: {exc}", file=sys.stderr)
        return EXIT_USAGE
    print(f"cancel requested for {args.task_id} (see {store.path(args.task_id)})")
    return EXIT_OK


def cmd_status(args: argparse.Namespace) -> int:
    _, _, state_dir = _paths(args.config)
    path = state_dir / "status.json"
    try:
        raw = path.read_bytes()
    except OSError:
        print(f"no status at {path}: is `orchctl serve` running?", file=sys.stderr)
        return EXIT_FAILED
    try:
        data = statusfile.StatusFile.model_validate_json(raw)
    except pydantic.ValidationError:
        print(f"{path} is not a status file this orchctl can read", file=sys.stderr)
        return EXIT_FAILED
    print(data.model_dump_json(indent=2) if args.json else status.table(data))
    return EXIT_OK


def cmd_plugins(args: argparse.Namespace) -> int:
    reg = registry.load()
    print(f"{'KIND':<16}{'NAME':<14}PLUGIN")
    for kind, name, source in reg.describe():
        print(f"{kind:<16}{name:<14}{source}")
    return EXIT_OK


def cmd_schemas(args: argparse.Namespace) -> int:
    import schemas
    from state import contracts

    out = args.out or schemas.DIR
    if args.check:
        drift = contracts.check(out)
        for name in drift:
            print(f"{out / name} differs from the models; run `make schemas`", file=sys.stderr)
        return EXIT_FAILED if drift else EXIT_OK
    for name in contracts.write(out):
        print(f"wrote {out / name}")
    return EXIT_OK


if __name__ == "__main__":
    raise SystemExit(main())
