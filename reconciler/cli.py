"""`orchctl`: the command line. Exit codes: 0 ok, 1 the task or check failed, 2 usage or
config error (file:line printed), 3 environment missing (the fix printed), 130 interrupted.

This module parses the command line and runs one verb: `serve`, `plugins` and `schemas` here;
`submit`, `cancel` and `tasks` in `cli_tasks`; `watch` in `cli_watch`; `validate` in
`cli_validate`; `status` in `cli_status`; `init` in `cli_init`; `backup` and `restore` in
`cli_backup`; `doctor` in `cli_doctor`; `up` in `cli_up`; `determinism` in `cli_determinism`;
`smoke` in `cli_smoke`. `run` turns whatever a verb raises
into one plain line on standard error and an exit code: no input, however hostile, makes
orchctl print a traceback (set ORCHCTL_DEBUG=1 to see one for a bug).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import sys
import traceback
from pathlib import Path
from typing import Any, TextIO, cast

from plugins import registry
from reconciler import (
    about,
    cli_backup,
    cli_common,
    cli_determinism,
    cli_doctor,
    cli_init,
    cli_smoke,
    cli_status,
    cli_tasks,
    cli_up,
    cli_validate,
    cli_watch,
    configuring,
    early_signals,
    logs,
    openapi,
)
from reconciler.cli_common import (
    EXIT_ENV,
    EXIT_FAILED,
    EXIT_INTERRUPTED,
    EXIT_OK,
    EXIT_USAGE,
    Refused,
)
from state import desired, errors, failpoints

__all__ = ["EXIT_ENV", "EXIT_FAILED", "EXIT_OK", "EXIT_USAGE", "main", "run"]


def main(argv: list[str] | None = None) -> int:
    parser = _parser()
    try:
        args, extra = parser.parse_known_args(argv)
        if extra:  # said with the verb's own usage, not orchctl's
            verb = _verbs(parser).get(getattr(args, "command", None) or "", parser)
            verb.error(f"unrecognized arguments: {' '.join(extra)}")
    except SystemExit as exc:  # --help, --version, or a usage error argparse has explained
        return exc.code if isinstance(exc.code, int) else EXIT_USAGE
    except OSError as err:  # the help or version could not be written (`_Parser`)
        _drop_output()
        print(f"orchctl: cannot write to standard output: {err.strerror or err}", file=sys.stderr)
        return EXIT_FAILED
    if not getattr(args, "func", None):
        parser.print_help(sys.stderr)
        return EXIT_USAGE
    return run(args)


def run(args: argparse.Namespace) -> int:
    """Run the verb `args.func`; every way it can end becomes an exit code."""
    cli_common.DONE.clear()  # this command's own (tests run several in one process)
    if failpoints.ENV_PROBLEM is not None:  # a crash test's variable, set wrong
        print(
            f"orchctl: ORCH_FAILPOINTS: {failpoints.ENV_PROBLEM}\n"
            "hint: unset the ORCH_FAILPOINTS* variables (they arm the crash tests' failpoints), "
            "or give them as NAME=ACTION[,NAME=ACTION...]",
            file=sys.stderr,
        )
        return EXIT_USAGE
    try:
        if getattr(args, "command", None) not in ("serve", "up"):
            # only a daemon stops cleanly on a signal that came this early; any other verb
            # gets it now (Ctrl-C: KeyboardInterrupt, below: exit 130, no traceback)
            early_signals.release()
        if sys.stdout is None:  # started with standard output closed (`>&-`)
            if args.command not in ("serve", "up"):  # nothing done: a retry cannot repeat it
                print(
                    f"orchctl: {args.command}: standard output is closed, so nothing was done "
                    "(what it did could not be told); run it with `> /dev/null` to discard "
                    "what it prints",
                    file=sys.stderr,
                )
                return EXIT_FAILED
            sys.stdout = open(os.devnull, "w")  # noqa: SIM115 (kept for the daemon's life)
        saved, sys.stdout = sys.stdout, cast(TextIO, _GuardedOutput(sys.stdout))
        try:
            code: int = args.func(args)
            sys.stdout.flush()
        finally:
            sys.stdout = saved
        return code
    except Refused as exc:
        for line in exc.lines():
            print(line, file=sys.stderr)
        return exc.code
    except errors.EnvironmentMissing as exc:
        print(f"orchctl: {exc.what}\n\n{exc.fix}", file=sys.stderr)
        return EXIT_ENV
    except errors.ConfigProblem as exc:
        print(f"orchctl: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        return EXIT_INTERRUPTED
    except BrokenPipeError:  # `orchctl tasks | head`: the reader left; so do we, quietly
        _drop_output()
        return EXIT_FAILED
    except OSError as exc:
        if isinstance(exc, _OutputFailed):  # `> /dev/full`, a disk gone: no bug
            _drop_output()
            done = f" (done already: {'; '.join(cli_common.DONE)})" if cli_common.DONE else ""
            print(
                f"orchctl: {args.command}: cannot write to standard output: "
                f"{exc.strerror or exc}{done}",
                file=sys.stderr,
            )
            return EXIT_FAILED
        if exc.filename is None or os.environ.get("ORCHCTL_DEBUG") == "1":
            return _bug(args, exc)
        # a path this run was given or needs, refused by the system: the user's to fix
        shown = cli_common.plain_text(os.fsdecode(exc.filename))
        print(
            f"orchctl: {args.command}: {shown}: {exc.strerror or type(exc).__name__}\n"
            f"  hint: {_PATH_HINTS.get(type(exc), _PATH_HINT)}",
            file=sys.stderr,
        )
        return EXIT_USAGE
    except Exception as exc:
        return _bug(args, exc)


def _drop_output() -> None:
    """Send what is left of standard output nowhere (its reader left, or it cannot be
    written), so the interpreter's last flush at exit does not fail again."""
    with contextlib.suppress(OSError, ValueError):
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())


class _OutputFailed(OSError):
    """Standard output could not be written (not a path of the user's, not a bug)."""


class _GuardedOutput:
    """Standard output for the verb's run: a failed write (a full disk, `> /dev/full`)
    raises `_OutputFailed`, told apart from any other OSError; a reader that left still
    raises BrokenPipeError."""

    def __init__(self, inner: Any) -> None:
        self._inner = inner

    def write(self, text: str) -> int:
        try:
            return int(self._inner.write(text))
        except BrokenPipeError:
            raise
        except OSError as exc:
            raise _OutputFailed(exc.errno, exc.strerror) from None

    def flush(self) -> None:
        try:
            self._inner.flush()
        except BrokenPipeError:
            raise
        except OSError as exc:
            raise _OutputFailed(exc.errno, exc.strerror) from None

    def __getattr__(self, name: str) -> Any:
        return getattr(self._inner, name)


_PATH_HINT = "check the path: that it exists where a file or folder is read, and may be written"
_PATH_HINTS: dict[type[OSError], str] = {
    FileNotFoundError: "check the path: a folder on the way to it does not exist",
    NotADirectoryError: "a part of the path is a file where a folder is needed; choose another",
    FileExistsError: "a file is in the way where a folder is needed; choose another path",
    IsADirectoryError: "a folder is where a file is needed; choose another path",
    PermissionError: "this user may not read or write there: choose a path you own, or fix "
    "its permissions",
}


def _bug(args: argparse.Namespace, exc: Exception) -> int:
    if os.environ.get("ORCHCTL_DEBUG") == "1":
        raise exc
    print(
        f"orchctl: {args.command} stopped on an unexpected {type(exc).__name__}"
        f"{_where(exc)}: {cli_common.plain_text(str(exc))} (this is a bug; please report "
        "it, and ORCHCTL_DEBUG=1 shows the traceback)",
        file=sys.stderr,
    )
    return EXIT_FAILED


def _where(exc: BaseException) -> str:
    """ " at file:line" of the innermost frame of the project's own code, for a bug report."""
    found = ""
    for frame in traceback.extract_tb(exc.__traceback__)[1:]:  # [0] is `run` itself
        path = Path(frame.filename)
        if path.parent.name in ("reconciler", "state", "plugins"):
            found = f" at {path.parent.name}/{path.name}:{frame.lineno}"
    return found


class _Help(argparse.ArgumentDefaultsHelpFormatter):
    """Shows every option's default, except for flags and options without one."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        if action.default is None or action.default is False:
            return action.help
        return super()._get_help_string(action)


def _verbs(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    """Each verb's own parser, by name."""
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            return dict(action.choices)
    return {}


class _Parser(argparse.ArgumentParser):
    """argparse's parser, but a help or version it cannot write is an error: argparse
    drops the OSError (`> /dev/full`), and the command exited 0 having printed nothing."""

    def _print_message(self, message: str, file: Any = None) -> None:
        if message:
            (file or sys.stderr).write(message)


def _parser() -> argparse.ArgumentParser:
    p = _Parser(
        prog="orchctl",
        description="llama-orch home: serve local LLMs "
        "on this workstation's GPUs from a desired-state file.",
        epilog="Exit codes: 0 ok, 1 the task or check failed, 2 usage or config error, "
        "3 environment missing (the fix is printed), 130 interrupted. See docs/cli.md.",
        formatter_class=_Help,
    )
    p.add_argument(
        "--version",
        action="version",
        version=f"orchctl {about.version()}",
        help="print the version",
    )
    sub = p.add_subparsers(metavar="COMMAND", dest="command")

    def verb(name: str, func: Any, help_text: str) -> argparse.ArgumentParser:
        parser = sub.add_parser(name, help=help_text, description=help_text, formatter_class=_Help)
        parser.set_defaults(func=func)
        return parser

    s = verb("serve", cmd_serve, "run the reconciler in the foreground")
    _config(s, "the desired state to serve")
    s.add_argument(
        "--simulate",
        type=cli_common.path_arg,
        metavar="INVENTORY",
        help="use simulated GPUs from this inventory file instead of NVML",
    )
    s.add_argument(
        "--duration",
        type=cli_common.seconds,
        metavar="SECONDS",
        help="stop after this long (default: never)",
    )
    s.add_argument(
        "--exit-when-idle",
        action="store_true",
        help="stop once the spool is empty and no task runs",
    )
    s.add_argument(
        "--resync",
        type=cli_common.seconds,
        default=2.0,
        metavar="SECONDS",
        help="re-read everything at least this often, events or not",
    )
    s.add_argument("--no-watch", action="store_true", help="no inotify; rely on the resync")
    s.add_argument(
        "--log-format",
        choices=["auto", "json", "pretty"],
        default="auto",
        help="auto: pretty on a terminal, JSON Lines otherwise",
    )
    s.add_argument(
        "--log-level",
        choices=["debug", "info", "warning", "error"],
        default="info",
        help="log lines this severe and worse",
    )
    s.add_argument(
        "--log-file", type=cli_common.path_arg, help="also write JSON Lines to this file"
    )

    v = verb("validate", cli_validate.cmd_validate, "check orch.yaml, task and inventory files")
    v.add_argument(
        "files",
        nargs="*",
        type=cli_common.path_arg,
        metavar="FILE",
        help="orch.yaml, *.task.yaml, inventory (default: --config, else ./orch.yaml)",
    )
    v.add_argument(
        "--config",
        type=cli_common.config_arg,
        help="check task files against this orch.yaml (default: the one orch.yaml among FILE)",
    )

    sm = verb("submit", cli_tasks.cmd_submit, "deliver a task file into the spool (atomically)")
    sm.add_argument(
        "file", type=cli_common.file_or_stdin, help="task file, or - for standard input"
    )
    _config(sm)
    sm.add_argument(
        "--wait", action="store_true", help="stream the text, then print a summary of the result"
    )
    sm.add_argument(
        "--timeout",
        type=cli_common.seconds_or_zero,
        default=600.0,
        help="seconds --wait waits at most",
    )
    sm.add_argument(
        "--json", action="store_true", help="print JSON (with --wait: the whole result file)"
    )
    sm.add_argument("--watch", dest="wait", action="store_true", help="the same as --wait")
    _api(sm)

    w = verb("watch", cli_watch.cmd_watch, "follow a task's events until it ends")
    w.add_argument("task_id", help="the task's id (results/<task_id>.json)")
    _config(w)
    w.add_argument("--json", action="store_true", help="print frames as JSON lines")
    w.add_argument(
        "--timeout", type=cli_common.seconds_or_zero, default=600.0, help="seconds to wait at most"
    )
    _api(w)

    c = verb("cancel", cli_tasks.cmd_cancel, "cancel a queued or running task")
    c.add_argument("task_id", help="the task's id")
    _config(c)
    _api(c)

    t = verb("tasks", cli_tasks.cmd_tasks, "list recent and live tasks, newest first")
    _config(t)
    t.add_argument(
        "--status",
        action="extend",
        nargs="+",
        choices=cli_tasks.STATUSES,
        metavar="STATUS",
        help=f"only tasks in these states ({', '.join(cli_tasks.STATUSES)})",
    )
    t.add_argument(
        "--limit", type=cli_common.count, default=20, help="show at most this many (0: all)"
    )
    t.add_argument("--json", action="store_true", help="print a JSON list")

    st = verb("status", cli_status.cmd_status, "show the daemon, GPUs, pools and the queue")
    _config(st)
    st.add_argument("--json", action="store_true", help="print .orch/status.json as it is")

    i = verb("init", cli_init.cmd_init, "write a commented starter orch.yaml")
    i.add_argument(
        "--config",
        type=cli_common.config_arg,
        default=Path("orch.yaml"),
        help="where to write it (inventory.yaml, models/ and hello.task.yaml go beside it)",
    )
    i.add_argument(
        "--simulate",
        action="store_true",
        help="a simulated 24 GB + 12 GB workstation that runs without a GPU",
    )
    i.add_argument("--force", action="store_true", help="overwrite files that exist")

    cli_backup.add_verbs(verb, _config)

    dr = verb("doctor", cli_doctor.cmd_doctor, "check that this machine can serve (exit 3: not)")
    dr.add_argument(
        "--config",
        type=cli_common.config_arg,
        default=Path("orch.yaml"),
        help="orch.yaml whose server.bind is checked (the default address when absent)",
    )
    dr.add_argument(
        "--simulate",
        type=cli_common.path_arg,
        nargs="?",
        const=Path(),  # no file named: orch.yaml's gpus.inventory, else inventory.yaml beside it
        metavar="INVENTORY",
        help="check for the simulated workstation in this inventory instead of NVML "
        "(default: orch.yaml's gpus.inventory, else inventory.yaml beside it)",
    )
    dr.add_argument("--json", action="store_true", help="print the checks as JSON")

    u = verb(
        "up",
        cli_up.cmd_up,
        "doctor, build llama.cpp, fetch a model, serve and smoke-test, in one command",
    )
    u.add_argument(
        "--config",
        type=cli_common.config_arg,
        default=Path("orch.yaml"),
        help="the orch.yaml to serve; a commented starter is written there when absent",
    )
    u.add_argument(
        "--model",
        metavar="REF",
        help=f"the model of the starter orch.yaml (default: {cli_up.DEFAULT_MODEL})",
    )
    u.add_argument(
        "--simulate",
        action="store_true",
        help="the simulated 24 GB + 12 GB workstation and the sim engine: no build, no download",
    )
    u.add_argument(
        "--source",
        help="where llama.cpp comes from: pypi:VERSION, path:DIR, git+URL@REF or binary:FILE "
        "(default: engines.llamacpp.provision.ref, else the pinned PyPI release)",
    )
    u.add_argument(
        "--bind",
        type=cli_common.bind_arg,
        default=cli_init.DEFAULT_BIND,
        help="server.bind of the starter orch.yaml",
    )
    u.add_argument(
        "--smoke-s",
        type=cli_common.seconds,
        default=60.0,
        metavar="SECONDS",
        help="the smoke's time limit",
    )
    u.add_argument(
        "--stop-after-smoke",
        action="store_true",
        help="stop serving after the report (default: serve until Ctrl-C)",
    )

    cli_determinism.add_verb(verb, _config)
    cli_smoke.add_verb(verb, _config)

    verb("plugins", cmd_plugins, "list loaded plugins")

    sc = verb("schemas", cmd_schemas, "write (or --check) the JSON Schemas")
    sc.add_argument("--check", action="store_true", help="only report schemas that differ")
    sc.add_argument(
        "--out", type=cli_common.path_arg, help="the folder (default: the package's schemas/)"
    )
    return p


def _api(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--url",
        type=cli_common.http_url,
        help="the daemon's HTTP API to read events from "
        "(default: the address in .orch/status.json; the files when it cannot be reached)",
    )
    parser.add_argument(
        "--token-env",
        default="AUTH_TOKEN",
        help="environment variable holding the API token, when the API needs one",
    )


def _config(p: argparse.ArgumentParser, help_text: str | None = None) -> None:
    p.add_argument(
        "--config",
        type=cli_common.config_arg,
        default=Path("orch.yaml"),
        help=help_text or "orch.yaml, which names the spool, results and state folders",
    )


def cmd_serve(args: argparse.Namespace) -> int:
    from reconciler import daemon

    try:  # (a log file's folder is never made: a typo would make folders anywhere)
        logs.setup(fmt=args.log_format, level=args.log_level, log_file=args.log_file)
    except OSError as exc:
        raise Refused(
            EXIT_USAGE,
            f"--log-file {cli_common.printable(str(args.log_file))}: it cannot be opened: "
            f"{exc.strerror or exc}",
            hint="name a file in a folder that exists and that you may write to",
        ) from None
    loaded = desired.load_desired(args.config)
    # an edit broken while the daemon was down must not keep it down: the daemon serves the
    # last applied config, loudly (it logs each error itself), until the file is fixed
    if loaded.value is None and not (args.config.parent / configuring.LAST_GOOD).is_file():
        for err in loaded.errors:
            # in the log's own format and places, as every other reason not to serve: JSON
            # lines on a stderr that is no terminal (`> serve.log 2>&1`), the log file too
            logs.emit(
                logs.get("config"),
                "config.invalid",
                f"{cli_common.plain_error(err)} (nothing served).",
                **configuring.invalid_fields(err),
            )
        return EXIT_USAGE
    options = daemon.Options(
        config_path=args.config,
        simulate=args.simulate,
        duration_s=args.duration,
        resync_s=args.resync,
        watch=not args.no_watch,
        exit_when_idle=args.exit_when_idle,
    )

    async def serve() -> int:
        d = daemon.build(options)
        loop = asyncio.get_running_loop()
        # closing the terminal (SIGHUP) stops as cleanly as Ctrl-C and SIGTERM
        for sig in early_signals.STOPS:
            loop.add_signal_handler(sig, d.stop, sig.name)
        for name in early_signals.take():  # sent while orchctl was still loading
            d.stop(name)
        return await d.run()

    try:
        return asyncio.run(serve())
    except (errors.ConfigProblem, errors.EnvironmentMissing) as exc:
        # why the daemon did not serve, in the log's own format and places (the log file
        # too), not a bare line among JSON records
        missing = isinstance(exc, errors.EnvironmentMissing)
        why = f"{exc.what}\n\n{exc.fix}" if isinstance(exc, errors.EnvironmentMissing) else str(exc)
        logs.emit(logs.get("daemon"), "daemon.failed", why, level=40, lines=True)
        return EXIT_ENV if missing else EXIT_USAGE
    except OSError as exc:
        if exc.filename is None or os.environ.get("ORCHCTL_DEBUG") == "1":
            raise  # a bug: `run` shows it as one
        # a folder of paths: (or a file it needs) the system refuses: said in the log's
        # format, naming the path, as the other reasons not to serve are
        shown = cli_common.plain_text(os.fsdecode(exc.filename))
        fix = _PATH_HINTS.get(type(exc), _PATH_HINT)
        logs.emit(
            logs.get("daemon"),
            "daemon.failed",
            f"{shown}: {exc.strerror or type(exc).__name__}\n\n{fix} "
            "(`orchctl validate` checks the folders of paths: in orch.yaml)",
            level=40,
        )
        return EXIT_USAGE


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
        drift = contracts.check(out, engines=sorted(registry.load().engines))
        if (out / openapi.NAME).read_text(encoding="utf-8") != openapi.render():
            drift.append(openapi.NAME)
        for name in drift:
            print(
                f"{out / name} differs from the models; write them anew with: "
                f"orchctl schemas{' --out ' + str(args.out) if args.out else ''}",
                file=sys.stderr,
            )
        return EXIT_FAILED if drift else EXIT_OK
    for name in contracts.write(out, engines=sorted(registry.load().engines)):
        print(f"wrote {out / name}")
    print(f"wrote {openapi.write(out)}")
    return EXIT_OK


if __name__ == "__main__":
    raise SystemExit(main())
