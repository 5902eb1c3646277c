"""`orchctl doctor [--config orch.yaml] [--simulate INVENTORY] [--json]`: can this machine serve?

Prints one line per check (`reconciler.diagnosing`) with a copy-paste fix for Arch/CachyOS
and Debian/Ubuntu under each one that failed or warns, then a verdict. Exit 0 when serving
is possible, 3 when not (the environment is missing something). `orchctl up` prints the same
report before it builds anything.
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

from plugins import llamacpp_builds, resolvers
from reconciler import cli_common, configuring, diagnosing
from reconciler.cli_common import EXIT_ENV, EXIT_OK
from state import desired

LABEL = {"ok": "ok  ", "warn": "warn", "fail": "FAIL"}


def cmd_doctor(args: argparse.Namespace) -> int:
    if args.simulate == Path():  # --simulate with no file
        args.simulate = _folder_inventory(*_readable(args.config, say=False))
    found = run(config=args.config, simulate=args.simulate)
    if args.json:
        print(json.dumps(as_json(found), indent=2))
    else:
        print(report(found, simulate=args.simulate is not None))
    return EXIT_OK if found.can_serve else EXIT_ENV


def _readable(config: Path, *, say: bool = True) -> tuple[Path, Path]:
    """The config to read for `config` and the folder it is relative to: orch.yaml itself,
    or, while it is gone, a folder or a symbolic link (which orch.yaml may not be), the last
    config a daemon applied in its folder, with a warning (as every verb reads it)."""
    base = Path(os.path.abspath(config)).parent  # a link's own folder, not its target's
    last_good = base / configuring.LAST_GOOD
    if (config.is_symlink() or not config.is_file()) and last_good.is_file():
        if say:
            what = "a symbolic link" if config.is_symlink() else "not a file"
            cli_common.warn(
                f"warning: {config} is {what if config.exists() else 'not found'}; checking the "
                f"last config a daemon applied here ({last_good}); put orch.yaml back "
                f"(`git checkout {config.name}`, or copy {configuring.LAST_GOOD})"
            )
        return last_good, base
    return config, base


def _folder_inventory(config: Path, base: Path) -> Path:
    """The inventory of the simulated workstation orch.yaml names (gpus.inventory), else
    inventory.yaml beside it (what `orchctl init --simulate` writes)."""
    loaded = desired.load_desired(config) if config.is_file() else None
    gpus = loaded.value.gpus if loaded is not None and loaded.value is not None else None
    if gpus is not None and gpus.inventory:
        return desired.resolve(base, gpus.inventory)
    return base / "inventory.yaml"


def run(*, config: Path, simulate: Path | None, bind: str | None = None) -> diagnosing.Diagnosis:
    """The checks for serving `config` (its server.bind, else `bind`, else the default)."""
    machine = diagnosing.Machine(
        engine_cache=llamacpp_builds.default_cache(), model_cache=resolvers.model_cache()
    )
    config, base = _readable(config)
    if config.exists() or bind is None:
        bind = diagnosing.bind_of(config)
    binary = diagnosing.engine_binary_of(config) if config.exists() else None
    own_lock = diagnosing.state_lock_of(config, base)
    return diagnosing.diagnose(
        machine,
        bind=bind,
        simulate=simulate,
        binary=binary,
        own_lock=own_lock,
        llamacpp_pools=config.exists() and diagnosing.llamacpp_pools_of(config),
    )


def report(found: diagnosing.Diagnosis, *, verdict: bool = True, simulate: bool = False) -> str:
    width = max((len(c.name) for c in found.checks), default=0) + 2
    lines = []
    for check in found.checks:
        lines.append(f"{LABEL[check.status]}  {check.name:<{width}}{check.detail}")
        fix = check.fix_text() if check.status != "ok" else None
        if fix:
            lines.append("      fix:")
            lines.extend(f"      {line}" for line in fix.splitlines())
    if verdict:
        lines.append("")
        failed = [c for c in found.checks if c.status == "fail"]
        if failed:
            lines.append(
                f"serving is not possible here: {len(failed)} check"
                f"{'s' if len(failed) != 1 else ''} failed ({', '.join(c.name for c in failed)}); "
                f"fix {'them' if len(failed) != 1 else 'it'} and run `orchctl doctor` again"
            )
        else:
            warned = sum(c.status == "warn" for c in found.checks)
            extra = f" ({warned} warning{'s' if warned != 1 else ''})" if warned else ""
            if found.serving_pid is not None:  # `up` would only meet the daemon there
                lines.append(
                    f"serving is possible here{extra}, and this folder's daemon (pid "
                    f"{found.serving_pid}) serves it now: next, `orchctl submit TASK_FILE` "
                    "or `orchctl status`"
                )
            else:
                up = "orchctl up --simulate" if simulate else "orchctl up"
                lines.append(f"serving is possible here{extra}: next, `{up}`")
    return "\n".join(lines)


def as_json(found: diagnosing.Diagnosis) -> dict[str, object]:
    return {
        "can_serve": found.can_serve,
        "checks": [
            {"name": c.name, "status": c.status, "detail": c.detail, "fix": c.fix_text()}
            for c in found.checks
        ],
    }
