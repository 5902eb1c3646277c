"""The layering of the rooms, checked on the source (run by `make lint`):

- `state/` imports neither `plugins/` nor `reconciler/`: it is data and files only;
- `plugins/` never imports `reconciler/`: plugins see the loop only through their hooks;
- the pure modules of `reconciler/` import no I/O: no event loop, process, socket, GPU or
  file-watching library, and none of the loop's I/O modules;
- no import circle among the project's modules (imports under TYPE_CHECKING excluded).
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
ROOMS = ("state", "plugins", "reconciler", "schemas")

PURE = {
    "reconciler.admission",
    "reconciler.determinism",
    "reconciler.determinism_report",
    "reconciler.editing",
    "reconciler.estimates",
    "reconciler.openai_chunks",
    "reconciler.openai_requests",
    "reconciler.placement",
    "reconciler.planning",
    "reconciler.queues",
    "reconciler.rates",
    "reconciler.specs",
    "reconciler.supervision",
}
IO_LIBRARIES = {
    "asyncio",
    "subprocess",
    "socket",
    "shutil",
    "aiohttp",
    "aiohttp_sse",
    "watchdog",
    "pynvml",
    "prometheus_client",
}
IO_MODULES = {
    "reconciler.adoption",
    "reconciler.admitting",
    "reconciler.cancelling",
    "reconciler.booting",
    "reconciler.api",
    "reconciler.api_auth",
    "reconciler.api_client",
    "reconciler.api_metrics",
    "reconciler.api_openai",
    "reconciler.api_page",
    "reconciler.api_tasks",
    "reconciler.cli_sse",
    "reconciler.openapi",
    "reconciler.api_artifacts",
    "reconciler.api_catalog",
    "reconciler.api_pools",
    "reconciler.api_routes",
    "reconciler.cataloging",
    "reconciler.cli",
    "reconciler.cli_backup",
    "reconciler.cli_common",
    "reconciler.cli_determinism",
    "reconciler.cli_doctor",
    "reconciler.cli_init",
    "reconciler.cli_smoke",
    "reconciler.cli_status",
    "reconciler.cli_tasks",
    "reconciler.cli_up",
    "reconciler.cli_validate",
    "reconciler.cli_watch",
    "reconciler.configuring",
    "reconciler.daemon",
    "reconciler.diagnosing",
    "reconciler.dispatch",
    "reconciler.early_signals",
    "reconciler.entry",
    "reconciler.fanout",
    "reconciler.fetching",
    "reconciler.intake",
    "reconciler.launching",
    "reconciler.metrics",
    "reconciler.pools",
    "reconciler.preflight",
    "reconciler.probing",
    "reconciler.recovery",
    "reconciler.reloading",
    "reconciler.resolving",
    "reconciler.smoke_checks",
    "reconciler.smoke_harness",
    "reconciler.smoking",
    "reconciler.streaming",
    "reconciler.taking",
    "reconciler.tasking",
    "reconciler.tracing",
    "reconciler.toolchain_checks",
}
PURE_MAY_USE_FROM_PLUGINS = {"plugins.interfaces"}  # data shapes only


def _modules() -> dict[str, Path]:
    return {
        f"{room}.{path.stem}": path
        for room in ROOMS
        for path in sorted((ROOT / room).glob("*.py"))
        if path.stem != "__init__"
    }


def _imports(path: Path, *, runtime_only: bool) -> set[str]:
    """Every module `path` imports (for `from a import b`, `a.b` when it is a module)."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    skipped: set[int] = set()
    if runtime_only:
        for node in ast.walk(tree):
            if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
                skipped.update(id(n) for child in node.body for n in ast.walk(child))
    found: set[str] = set()
    modules = _modules()
    for node in ast.walk(tree):
        if id(node) in skipped:
            continue
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module)
            for alias in node.names:
                if f"{node.module}.{alias.name}" in modules:
                    found.add(f"{node.module}.{alias.name}")
    return found


def _room(module: str) -> str:
    return module.split(".")[0]


@pytest.mark.parametrize("module", [m for m in _modules() if _room(m) == "state"])
def test_state_imports_neither_plugins_nor_the_loop(module: str) -> None:
    bad = {
        m
        for m in _imports(_modules()[module], runtime_only=False)
        if _room(m) in ("plugins", "reconciler")
    }
    assert not bad, f"{module} imports {sorted(bad)}"


@pytest.mark.parametrize("module", [m for m in _modules() if _room(m) == "plugins"])
def test_plugins_never_import_the_loop(module: str) -> None:
    bad = {m for m in _imports(_modules()[module], runtime_only=False) if _room(m) == "reconciler"}
    assert not bad, f"{module} imports {sorted(bad)}"


@pytest.mark.parametrize("module", sorted(PURE))
def test_pure_modules_import_no_io(module: str) -> None:
    imported = _imports(_modules()[module], runtime_only=False)
    bad = {
        m
        for m in imported
        if m.split(".")[0] in IO_LIBRARIES
        or m in IO_MODULES
        or (_room(m) == "plugins" and m != "plugins" and m not in PURE_MAY_USE_FROM_PLUGINS)
    }
    assert not bad, f"{module} is pure but imports {sorted(bad)}"


def test_there_is_no_import_circle() -> None:
    modules = _modules()
    graph = {
        name: {m for m in _imports(path, runtime_only=True) if m in modules and m != name}
        for name, path in modules.items()
    }
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    circles: list[list[str]] = []

    def visit(name: str, path: list[str]) -> None:
        state[name] = 1
        for nxt in sorted(graph[name]):
            if state.get(nxt) == 1:
                circles.append([*path[path.index(nxt) :], nxt])
            elif nxt not in state:
                visit(nxt, [*path, nxt])
        state[name] = 2

    for name in sorted(graph):
        if name not in state:
            visit(name, [name])
    assert not circles, "import circles: " + "; ".join(" -> ".join(c) for c in circles)
