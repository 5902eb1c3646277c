"""No input, however hostile, makes `orchctl` print a traceback, a Python repr or a missing
value; every option says what it does and what its default is; the logs suit the reader."""

from __future__ import annotations

import argparse
import io
import json
import logging
import os
import subprocess
from pathlib import Path

import pytest

from reconciler import cli, cli_tasks, logs
from tests.conftest import Workspace, task
from tests.orchctl_support import ORCHCTL, orchctl, orchctl_process

GARBAGE = b"\x00\xff\xfe{[: \x85 task_id: *x\n\t- - ]"


@pytest.fixture
def hostile(workspace: Workspace) -> Workspace:
    """A folder with every kind of bad file where orchctl looks."""
    root = workspace.root
    (root / "garbage.task.yaml").write_bytes(GARBAGE)
    (root / "folder.task.yaml").mkdir()
    os.mkfifo(root / "fifo.task.yaml")
    (root / "zero.task.yaml").symlink_to("/dev/zero")
    (root / "bomb.task.yaml").write_text(
        'a: &a ["x", "x"]\nb: &b [*a, *a]\nc: &c [*b, *b]\nmodel: m1\nprompt: *c\nmax_tokens: 1\n'
    )
    (root / "list.task.json").write_text("[1, 2]")
    (root / "huge.task.yaml").write_bytes(b"prompt: " + b"x" * (2 << 20))
    (root / "empty.task.yaml").write_text("")
    (root / "badid.task.yaml").write_text(
        "task_id: ../../etc\nmodel: m1\nprompt: a\nmax_tokens: 1\n"
    )
    (root / "dict-prompt.task.yaml").write_text("prompt: {a: 1}\nmodel: m1\nmax_tokens: x\n")
    (root / "garbage.yaml").write_bytes(GARBAGE)
    incoming = workspace.spool.incoming
    (incoming / "junk.task.yaml").write_bytes(GARBAGE)
    (incoming / "dir.task.yaml").mkdir()
    os.mkfifo(incoming / "pipe.task.yaml")
    results_dir = root / "results"
    results_dir.mkdir(exist_ok=True)
    (results_dir / "broken.json").write_bytes(GARBAGE)
    (results_dir / "wrong-shape.json").write_text('{"task_id": "wrong-shape", "status": "odd"}')
    (results_dir / "dir.json").mkdir()
    (results_dir / "broken.events.jsonl").write_bytes(GARBAGE + b"\n{}\n")
    return workspace


FILES = [
    "garbage.task.yaml",
    "folder.task.yaml",
    "fifo.task.yaml",
    "zero.task.yaml",
    "bomb.task.yaml",
    "list.task.json",
    "huge.task.yaml",
    "empty.task.yaml",
    "badid.task.yaml",
    "dict-prompt.task.yaml",
    "garbage.yaml",
    "missing.task.yaml",
    "/dev/zero",
    ".",
]
IDS = ["", "..", "../x", "a/b", "x\ny", "x" * 500, "tâche", "ok-id", "broken", "wrong-shape"]


def commands(ws: Workspace) -> list[list[str]]:
    cfg = ["--config", str(ws.config_path)]
    out: list[list[str]] = [[], ["nonsense"], ["--config"], ["tasks", "--limit", "x"]]
    out += [["validate", f] for f in FILES]
    out += [["validate", "--config", f, "ok.task.yaml"] for f in FILES]
    out += [["submit", f, *cfg] for f in FILES]
    for task_id in IDS:
        out += [["watch", task_id, "--timeout", "1", *cfg], ["cancel", task_id, *cfg]]
    for bad_config in ("garbage.yaml", "missing.yaml", ".", "/dev/zero", "fifo.task.yaml"):
        for verb in (["status"], ["tasks"], ["cancel", "x"], ["watch", "x"], ["submit", "-"]):
            out.append([*verb, "--config", bad_config])
        out.append(["serve", "--config", bad_config, "--duration", "0.1"])
    out += [
        ["status", *cfg],
        ["status", "--json", *cfg],
        ["tasks", *cfg],
        ["tasks", "--json", *cfg],
    ]
    out += [["init", "--config", "garbage.yaml/orch.yaml", "--simulate"]]
    out += [["init", "--config", "garbage.yaml", "--simulate"]]
    return out


def test_no_command_prints_a_traceback_or_a_repr_whatever_it_is_given(hostile: Workspace) -> None:
    (hostile.root / "ok.task.yaml").write_text("model: m1\nprompt: hi\nmax_tokens: 2\n")
    state = hostile.root / ".orch"
    state.mkdir()
    (state / "status.json").write_bytes(GARBAGE)
    for args in commands(hostile):
        ran = orchctl(*args, cwd=hostile.root, stdin=GARBAGE)  # asserts the output is clean
        assert ran.code in (0, 1, 2, 3), (args, ran)
    for body in (b"", b"[]", b'{"daemon": {"pid": -1}}', GARBAGE):
        (state / "status.json").write_bytes(body)
        assert orchctl("status", cwd=hostile.root).code == 1


@pytest.mark.parametrize(
    "stdin",
    [b"", GARBAGE, b"[1, 2]", b"task_id: a/b\nmodel: m1\nprompt: x\nmax_tokens: 1\n", b"{"],
)
def test_submit_from_hostile_standard_input_is_refused_with_exit_2(
    workspace: Workspace, stdin: bytes
) -> None:
    ran = orchctl("submit", "-", "--config", workspace.config_path, stdin=stdin)
    assert ran.code == 2, ran
    assert not any(workspace.spool.incoming.iterdir())


def test_a_status_pid_that_is_no_process_is_simply_not_running(workspace: Workspace) -> None:
    for pid in (-1, 0, 2**22 + 1):
        status = {
            "daemon": {
                "pid": pid,
                "started_at": "garbage",
                "version": "x",
                "simulated": False,
                "state": "running",
            },
            "config": {"path": "orch.yaml", "revision": None, "applied_at": None},
            "queue": {
                "depth": 0,
                "by_priority": {},
                "capacity": 1,
                "full_policy": "reject",
                "running": 0,
            },
        }
        (workspace.root / ".orch").mkdir(exist_ok=True)
        (workspace.root / ".orch" / "status.json").write_text(json.dumps(status))
        ran = orchctl("status", "--config", workspace.config_path)
        assert ran.code == 0 and "NOT RUNNING" in ran.out_lines[0]
        assert "revision" not in ran.out_lines[1]  # no "revision None"


def test_a_bug_in_a_verb_is_one_plain_line_and_exit_1(
    workspace: Workspace, monkeypatch: pytest.MonkeyPatch
) -> None:
    def broken(args: argparse.Namespace) -> int:
        raise RuntimeError("boom {'key': 1}\nsecond line")

    monkeypatch.setattr(cli_tasks, "cmd_tasks", broken)
    ran = orchctl("tasks", "--config", workspace.config_path)
    assert ran.code == 1
    assert ran.err_lines == [
        "orchctl: tasks stopped on an unexpected RuntimeError: boom {key': 1} second line "
        "(this is a bug; please report it, and ORCHCTL_DEBUG=1 shows the traceback)"
    ]


def test_a_submitted_task_with_a_weird_but_safe_id_round_trips(workspace: Workspace) -> None:
    workspace.submit("x.task.yaml", task("A.b_c-9"))
    assert orchctl("cancel", "A.b_c-9", "--config", workspace.config_path).code == 0


# -- help, version, logs ---------------------------------------------------------------------


def test_every_option_of_every_verb_has_help_and_shows_its_default() -> None:
    parser = cli._parser()
    verbs = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    assert set(verbs.choices) >= {
        "serve", "validate", "submit", "watch", "cancel", "tasks", "status", "init", "plugins",
    }  # fmt: skip
    for name, sub in verbs.choices.items():
        for action in sub._actions:
            if not isinstance(action, argparse._HelpAction):
                assert action.help, f"orchctl {name} {action.option_strings or action.dest}"
    shown = orchctl("submit", "--help").out
    assert "(default: 600.0)" in shown and "(default: orch.yaml)" in shown
    assert "(default: auto)" in orchctl("serve", "--help").out


def test_version_comes_from_the_package_metadata() -> None:
    ran = orchctl_process("--version")
    assert (ran.code, ran.out_lines) == (0, ["orchctl 0.1.0"])


class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


@pytest.mark.parametrize(("stream", "pretty"), [(_Terminal(), True), (io.StringIO(), False)])
def test_auto_log_format_is_pretty_on_a_terminal_and_json_lines_otherwise(
    stream: io.StringIO, pretty: bool
) -> None:
    loggers = [logging.getLogger(name) for name in logs.CONFIGURED]
    saved = [(lg.handlers[:], lg.level, lg.propagate) for lg in loggers]
    try:
        logs.setup(fmt="auto", stream=stream)
        logs.emit(logs.get("test"), "test.event", "A sentence.", task_id="t1")
    finally:
        for lg, (handlers, level, propagate) in zip(loggers, saved, strict=True):
            lg.handlers[:], lg.level, lg.propagate = handlers, level, propagate
    line = stream.getvalue().strip()
    if pretty:
        assert line.endswith("INFO A sentence.  [task=t1]")
    else:
        assert json.loads(line)["human"] == "A sentence."


@pytest.mark.parametrize(
    "argv",
    [
        ["serve", "--resync", "0"],
        ["serve", "--resync", "-1"],
        ["serve", "--resync", "nan"],
        ["serve", "--duration", "-1"],
        ["serve", "--duration", "inf"],
        ["submit", "x.task.yaml", "--wait", "--timeout", "-5"],
        ["watch", "t1", "--timeout", "nan"],
        ["tasks", "--limit", "-1"],
        ["tasks", "--limit", "9" * 400],
        ["up", "--simulate", "--smoke-s", "-1"],
        ["determinism", "--seeds", "0"],
        ["determinism", "--max-tokens", "-3"],
        ["smoke", "--determinism-seeds", "0"],
    ],
)
def test_a_number_an_option_cannot_mean_is_a_usage_error_naming_it(
    tmp_path: Path, argv: list[str]
) -> None:
    ran = orchctl(*argv, cwd=tmp_path)
    assert ran.code == 2, ran
    option = next(a for a in argv if a.startswith("--") and a not in ("--wait", "--simulate"))
    assert f"argument {option}" in ran.err, ran.err
    assert "is not" in ran.err or "is too large" in ran.err, ran.err


def test_a_misspelt_failpoint_variable_is_one_line_and_exit_2_not_a_traceback(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """ORCH_FAILPOINTS arms the crash tests' failpoints; set wrong, every orchctl command
    printed a 20-line traceback from the import."""
    from tests.orchctl_support import orchctl_process

    monkeypatch.setenv("ORCH_FAILPOINTS", "after_claim")  # no =ACTION
    ran = orchctl_process("status", "--config", tmp_path / "orch.yaml")
    assert ran.code == 2, ran
    assert (
        ran.err_lines[0]
        == "orchctl: ORCH_FAILPOINTS: failpoint 'after_claim': expected NAME=ACTION"
    )
    assert ran.err_lines[1].startswith("hint: unset the ORCH_FAILPOINTS* variables")


@pytest.mark.parametrize("verb", ["submit", "status", "cancel", "validate"])
def test_an_extra_argument_is_refused_with_the_verbs_own_usage(tmp_path: Path, verb: str) -> None:
    """`orchctl submit a b` printed orchctl's top-level usage, which does not say what
    submit takes."""
    args = {"submit": ["a", "b"], "status": ["--bogus"], "cancel": ["x", "y"]}.get(verb)
    ran = orchctl(verb, *(args or ["--nope"]), cwd=tmp_path)
    assert ran.code == 2
    assert ran.err_lines[0].startswith(f"usage: orchctl {verb} "), ran.err
    assert f"orchctl {verb}: error: unrecognized arguments" in ran.err, ran.err


@pytest.mark.parametrize("args", [["validate", ""], ["status", "--config", ""], ["backup", ""]])
def test_an_empty_path_argument_is_refused_not_taken_for_the_current_folder(
    tmp_path: Path, args: list[str]
) -> None:
    ran = orchctl(*args, cwd=tmp_path)
    assert ran.code == 2
    assert "an empty path names no file or folder" in ran.err, ran.err


@pytest.mark.skipif(not Path("/dev/full").exists(), reason="no /dev/full on this system")
@pytest.mark.parametrize("argv", [["tasks"], ["validate", "orch.yaml"], ["plugins"]])
def test_output_that_cannot_be_written_is_said_plainly_not_as_a_bug(
    workspace: Workspace, argv: list[str]
) -> None:
    """`orchctl tasks > /dev/full`: the output cannot be written (a full disk); that is said
    as it is, exit 1, never reported as a bug of orchctl."""
    config = ["--config", str(workspace.config_path)] if argv[0] == "tasks" else []
    done = _to_dev_full([*argv, *config], workspace.root)
    err = done.stderr.decode()
    assert done.returncode == 1, err
    assert f"orchctl: {argv[0]}: cannot write to standard output: No space left on device" in err
    assert "bug" not in err and "Traceback" not in err


def test_submit_shows_a_file_name_that_is_not_utf8_with_its_bytes(workspace: Workspace) -> None:
    name = os.fsdecode(b"caf\xe9.task.yaml")
    (workspace.root / name).write_text("prompt: hi\n")
    ran = orchctl("submit", name, "--config", workspace.config_path, cwd=workspace.root)
    assert ran.code == 2
    assert ran.err.startswith("caf\\xe9.task.yaml:1:1: max_tokens: "), ran.err


@pytest.mark.parametrize("argv", [["status"], ["tasks"], ["submit", "-"]])
def test_a_closed_standard_output_is_said_and_nothing_is_done(
    workspace: Workspace, argv: list[str]
) -> None:
    """`orchctl submit - >&-`: with standard output closed, what a verb did could not be
    told (a retrying script would submit twice), so nothing is done, and that is said."""
    done = subprocess.run(
        [str(ORCHCTL), *argv, "--config", str(workspace.config_path)],
        input=b"prompt: hi\nmodel: m1\n",
        stdout=None,
        stderr=subprocess.PIPE,
        cwd=workspace.root,
        timeout=60,
        check=False,
        preexec_fn=lambda: os.close(1),
    )
    err = done.stderr.decode()
    assert done.returncode == 1, err
    assert f"orchctl: {argv[0]}: standard output is closed, so nothing was done" in err, err
    assert "bug" not in err and "Traceback" not in err
    assert not os.listdir(workspace.spool.incoming)


@pytest.mark.parametrize(
    ("given", "said"),
    [
        ("sub/", "names a folder; give the file, e.g. sub/orch.yaml"),
        ("o\udcff.yaml", "'o\\xff.yaml' is not valid UTF-8"),
    ],
)
def test_a_config_path_that_names_a_folder_or_is_not_utf8_is_refused_before_init_writes(
    tmp_path: Path, given: str, said: str
) -> None:
    """`init --config DIR/` wrote a file named DIR and put the starter's other files beside
    it, in the parent folder; a name that is not UTF-8 stopped init as a bug."""
    ran = orchctl("init", "--simulate", "--config", given, cwd=tmp_path)
    assert ran.code == 2 and "argument --config:" in ran.err and said in ran.err, ran
    assert list(tmp_path.iterdir()) == []


def test_small_cli_messages_say_what_is_wrong(workspace: Workspace) -> None:
    """An empty file argument names nothing (not the current folder); a number too long is
    too large (it is a whole number)."""
    ran = orchctl("submit", "", "--config", workspace.config_path)
    assert ran.code == 2 and "argument file: an empty path names no file or folder" in ran.err
    ran = orchctl("tasks", "--limit", "9" * 25, "--config", workspace.config_path)
    assert ran.code == 2 and "is too large (over 20 digits): give a whole number" in ran.err


@pytest.mark.skipif(not Path("/dev/full").exists(), reason="no /dev/full on this system")
def test_a_submit_whose_output_fails_says_the_task_was_delivered(workspace: Workspace) -> None:
    """`orchctl submit t.task.yaml > /dev/full`: the task is delivered before its line is
    printed; the failure says so, or a retry would meet its own task's id."""
    (workspace.root / "t.task.yaml").write_text("model: m1\nprompt: hi\nmax_tokens: 3\n")
    done = _to_dev_full(
        ["submit", "t.task.yaml", "--config", str(workspace.config_path)], workspace.root
    )
    err = done.stderr.decode()
    assert done.returncode == 1, err
    assert "cannot write to standard output" in err, err
    assert "(done already: t is delivered to spool/incoming/t.task.yaml)" in err, err


@pytest.mark.skipif(not Path("/dev/full").exists(), reason="no /dev/full on this system")
@pytest.mark.parametrize("argv", [["--version"], ["--help"], ["status", "--help"]])
def test_a_help_or_version_that_cannot_be_written_is_not_exit_0(
    workspace: Workspace, argv: list[str]
) -> None:
    """argparse drops the error of a help it cannot write: `orchctl --version > /dev/full`
    exited 0 having printed nothing."""
    done = _to_dev_full(argv, workspace.root)
    err = done.stderr.decode()
    assert done.returncode == 1, err
    assert "cannot write to standard output: No space left on device" in err, err


def _to_dev_full(argv: list[str], cwd: Path) -> subprocess.CompletedProcess[bytes]:
    """`orchctl ARGV > /dev/full`: its standard output a disk that is full."""
    with open("/dev/full", "w") as full:
        return subprocess.run(
            [str(ORCHCTL), *argv],
            stdout=full,
            stderr=subprocess.PIPE,
            cwd=cwd,
            timeout=60,
            check=False,
        )
