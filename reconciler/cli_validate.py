"""`orchctl validate FILES... [--config orch.yaml]`: say now what would fail later.

Each file is checked as what it is: a task file (by its name), a simulated GPU inventory (a
mapping with only `gpus:`), or an orch.yaml. An orch.yaml gets its schema and everything
`serve` would check (`preflight`), in one round. A task file gets its schema, the id its name
implies, and, when a config is known (`--config`, or the one orch.yaml among FILES), what the
daemon's admission would refuse (`admission.resolve` and `admission.check` against pools
assumed Ready). Errors exit 2; warnings are printed and exit 0.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from plugins import gpu_simulated, registry
from reconciler import admission, api_auth, cli_common, preflight
from reconciler.cli_common import EXIT_OK, EXIT_USAGE, Refused
from state import desired, errors, loading, parsing, tasks
from state.errors import ErrorEnvelope

Finding = preflight.Finding


@dataclass(frozen=True)
class Config:
    """The orch.yaml tasks are checked against."""

    path: Path
    state: desired.DesiredState
    engines: frozenset[str]


def cmd_validate(args: argparse.Namespace) -> int:
    reg = registry.load()
    files: list[Path] = list(args.files)
    if not files and args.config is None:
        if not Path("orch.yaml").exists():
            raise Refused(
                EXIT_USAGE,
                "nothing to check: no FILE given and no orch.yaml in this folder",
                hint="name the files: orchctl validate orch.yaml tasks/*.task.yaml",
            )
        files = [Path("orch.yaml")]
    if args.config is not None and args.config.is_file() and _kind(args.config) != "config":
        raise Refused(
            EXIT_USAGE,
            f"--config {args.config} is {_kind(args.config)} file, not an orch.yaml",
            hint="give --config the orch.yaml the task files should be checked against",
        )
    if args.config is not None and all(p.resolve() != args.config.resolve() for p in files):
        files.insert(0, args.config)  # the config tasks are checked against is checked too
    config_path = args.config or _the_one_config(files)
    config = None
    if config_path is not None:
        loaded = desired.load_desired(config_path, known_engines=set(reg.engines))
        if loaded.value is not None:
            config = Config(config_path, loaded.value, frozenset(reg.engines))
    failures = 0
    for path in files:
        findings = check_file(path, reg, config)
        for finding in findings:
            print(cli_common.plain_error(finding.error, warning=finding.warning))
        warnings = sum(f.warning for f in findings)
        if warnings < len(findings):
            failures += 1
            continue
        notes = [f"{warnings} warning{'s' if warnings > 1 else ''}"] if warnings else []
        if path.name.endswith(tasks.TASK_SUFFIXES) and config is None:
            notes.append(
                f"not checked against {config_path}, which has errors"
                if config_path is not None
                else "not checked against an orch.yaml: add --config orch.yaml"
            )
        print(cli_common.one_line(f"{path}: ok" + (f" ({'; '.join(notes)})" if notes else "")))
    return EXIT_USAGE if failures else EXIT_OK


def _the_one_config(files: list[Path]) -> Path | None:
    configs = [p for p in files if _kind(p) == "config"]
    return configs[0] if len(configs) == 1 else None


def _kind(path: Path) -> str:
    if path.name.endswith(tasks.TASK_SUFFIXES):
        return "a task"
    data, _ = _parse(path)
    # an inventory is a list of GPUs under `gpus:`; in orch.yaml `gpus:` is a mapping
    inventory = isinstance(data, dict) and set(data) == {"gpus"} and isinstance(data["gpus"], list)
    if inventory:
        return "an inventory"
    if isinstance(data, dict) and data and set(data) <= TASK_KEYS and "version" not in data:
        return "a misnamed task"  # only a task's keys: checked as one, and told its name
    return "config"


# the keys of a task file (an orch.yaml has none of them but `model`-less `models:`)
TASK_KEYS = frozenset(tasks.TaskFile.model_fields)


def _parse(path: Path) -> tuple[Any, yaml.Node | None]:
    text, problems = loading.read_text(path)
    if text is None or problems:
        return None, None
    parse = loading.parse_json_document if path.suffix == ".json" else loading.parse_document
    data, node, problems = parse(text, str(path))
    return (None, None) if problems else (data, node)


def check_file(path: Path, reg: registry.Registry, config: Config | None) -> list[Finding]:
    kind = _kind(path)
    if kind == "a task":
        return check_task(path, config)
    if kind == "a misnamed task":
        suffix = ".task.json" if path.suffix == ".json" else ".task.yaml"
        stem = path.name.split(".", 1)[0] or "task"
        named = loading.LoadError(
            str(path),
            None,
            None,
            None,
            "this is a task file (its keys are a task's), but a task file's name ends in "
            ".task.yaml or .task.json: dropped into spool/incoming/ as it is named, it is "
            "refused as no task file",
            f"rename it to {stem}{suffix} (`orchctl submit` names the copy it delivers so)",
        )
        return [Finding(named), *check_task(path, config)]
    if kind == "an inventory":
        try:
            gpu_simulated.load_inventory(path)
        except gpu_simulated.InventoryError as exc:
            return [Finding(e) for e in exc.errors]
        return []
    return check_config(path, reg)


def check_config(path: Path, reg: registry.Registry) -> list[Finding]:
    loaded = desired.load_desired(path, known_engines=set(reg.engines))
    if loaded.value is None and loaded.data is None:  # unreadable or not YAML: nothing more
        return [Finding(e) for e in loaded.errors]
    _, node = _parse(path)
    found = preflight.check(path, loaded.data, node, reg)
    if loaded.value is not None:
        found += preflight.fits(path, loaded.value, node, reg)
        found += _listening(path, loaded.value, node)
    mine = [f.error.field for f in found if not f.warning and f.error.field]
    schema = [
        Finding(e)
        for e in loaded.errors
        if not (e.field and any(m == e.field or m.startswith(e.field + "[") for m in mine))
    ]
    return sorted([*schema, *found], key=lambda f: (f.error.line or 0, f.error.column or 0))


def _listening(path: Path, state: desired.DesiredState, node: yaml.Node | None) -> list[Finding]:
    """What `serve` refuses, or warns of, as it starts to listen (`api_auth.load`, with this
    shell's environment): a network bind without a token, a token file it cannot read or
    that others may, a token HTTP clients cannot send."""
    host = state.server.bind.rpartition(":")[0].strip("[]")
    try:
        auth = api_auth.load(state, path.resolve().parent, bind_host=host)
    except api_auth.Refused as exc:
        return [_at(path, node, exc.field, exc.problem, hint=exc.fix)]
    except errors.ConfigProblem as exc:
        return [_at(path, node, "auth", str(exc))]
    # each warning starts with the field it is about (auth.token_file, paths.results …)
    found = []
    for warning in auth.warnings:
        field, _, text = warning.partition(" ")
        found.append(_at(path, node, field, text, warning=True))
    return found


def _at(
    path: Path,
    node: yaml.Node | None,
    field: str,
    message: str,
    *,
    hint: str | None = None,
    warning: bool = False,
) -> Finding:
    """A finding about `field`, at its line, or at no line when the file does not write it
    (a default, such as auth.token_env's AUTH_TOKEN: the problem is not on any line)."""
    loc = tuple(field.split("."))
    line, column = (
        loading.locate(node, loc) if loading.node_at(node, loc) is not None else (None, None)
    )
    return Finding(loading.LoadError(str(path), line, column, field, message, hint), warning)


def check_task(path: Path, config: Config | None) -> list[Finding]:
    loaded = loading.load_model(path, tasks.TaskFile)
    if loaded.value is None:
        return [Finding(e) for e in loaded.errors]
    task = loaded.value
    found = []
    if task.task_id is None:
        unsafe = tasks.implied_id_problem(str(path), path.name)
        if unsafe is not None:
            found.append(Finding(unsafe))
    if config is not None:
        _, node = _parse(path)
        found += against(task, config, shown=str(path), node=node)
    return found


def against(
    task: tasks.TaskFile, config: Config, *, shown: str, node: yaml.Node | None
) -> list[Finding]:
    """What admission would say about `task` under `config`, every pool assumed Ready."""
    state, name = config.state, config.path
    found: list[Finding] = []

    def report(loc: tuple[Any, ...], message: str, hint: str, *, warning: bool = False) -> None:
        line, column = loading.locate(node, loc)
        error = loading.LoadError(shown, line, column, parsing.dotted(loc), message, hint)
        found.append(Finding(error, warning))

    pool_ids = [p.id for p in state.pools]
    listed = ", ".join(pool_ids) or "none defined"
    if task.model is not None and task.model not in state.models:
        report(
            ("model",),
            f"unknown model {task.model!r}; {name} has: "
            f"{', '.join(sorted(state.models)) or 'no models'}",
            "name one of those models, or add it under models: in orch.yaml",
        )
    if task.pool is not None and state.pool(task.pool) is None:
        report(
            ("pool",),
            f"unknown pool {task.pool!r}; {name} has pools: {listed}",
            "name one of those pools, or name a model instead",
        )
    placement = task.placement
    if placement.mode == "pin" and state.pool(placement.pin_pool or "") is None:
        report(
            ("placement", "pin_pool"),
            f"pinned pool {placement.pin_pool!r} is not in {name} (pools: {listed})",
            "a pin never falls back: pin one of those pools, or use mode: prefer",
        )
    for key in ("prefer_pools", "avoid_pools"):
        for k, pool_id in enumerate(getattr(placement, key)):
            if state.pool(pool_id) is None:
                report(
                    ("placement", key, k),
                    f"pool {pool_id!r} is not in {name} (pools: {listed})",
                    "it is ignored; name one of those pools",
                    warning=True,
                )
    if found and not all(f.warning for f in found):
        return found
    refusal = _admission(task, state, config.engines)
    if refusal is not None:
        field, sep, rest = refusal.message.partition(": ")
        loc: tuple[Any, ...] = tuple(field.split(".")) if sep and " " not in field else ()
        message = rest if loc else refusal.message
        report(
            loc,
            f"{message} — the daemon would refuse it ({refusal.code})",
            refusal.hint or "see docs/contracts.md for this code",
        )
    return found


def _admission(
    task: tasks.TaskFile, state: desired.DesiredState, engines: frozenset[str]
) -> ErrorEnvelope | None:
    target = admission.resolve(task, state)
    if isinstance(target, ErrorEnvelope):
        return target
    views = {
        p.id: admission.PoolView(
            pool_id=p.id,
            model_id=p.model,
            state="Ready" if p.engine in engines else "Failed",
            reason=None if p.engine in engines else f"engine {p.engine!r} is not installed",
            ctx=p.ctx,
            max_tokens=p.max_tokens,
        )
        for p in state.pools
    }
    return admission.check(task, target, state=state, pools=views)
