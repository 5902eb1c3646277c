"""Loading plugins: the pluggy manager, the built-ins, and third-party entry points.

`load()` is called once by `orchctl`; the result is passed explicitly to whoever needs it.
Built-in plugins are registered through the same hooks as third-party ones, which are found
in the `llama_orch` entry-point group.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pluggy

from plugins import hookspecs, interfaces
from state import desired, errors

BUILTINS = (
    "plugins.gpu_nvml",
    "plugins.gpu_simulated",
    "plugins.engine_sim",
    "plugins.engine_llamacpp",
    "plugins.resolvers",
    "plugins.provision_llamacpp",
)


@dataclass
class Registry:
    manager: pluggy.PluginManager
    engines: dict[str, interfaces.Engine] = field(default_factory=dict)
    observers: dict[str, Any] = field(default_factory=dict)
    resolvers: dict[str, Any] = field(default_factory=dict)
    provisioners: dict[str, Any] = field(default_factory=dict)
    sources: dict[str, str] = field(default_factory=dict)  # "engine:sim" → plugin name

    def observer(
        self, state: desired.DesiredState, base: Path, *, simulate: Path | None = None
    ) -> interfaces.GpuObserver:
        """The configured GPU observer; `--simulate FILE` swaps in the simulated workstation."""
        if simulate is not None:
            state = state.model_copy(
                update={
                    "gpus": state.gpus.model_copy(
                        update={"observer": "simulated", "inventory": str(simulate.resolve())}
                    )
                }
            )
        factory = self.observers[state.gpus.observer]
        observer: interfaces.GpuObserver = factory(state, base)
        return observer

    def describe(self) -> list[tuple[str, str, str]]:
        """(kind, name, plugin) rows for `orchctl plugins`."""
        rows = []
        for kind, table in (
            ("gpu-observer", self.observers),
            ("engine", self.engines),
            ("model-resolver", self.resolvers),
            ("provisioner", self.provisioners),
        ):
            for name in sorted(table):
                rows.append((kind, name, self.sources.get(f"{kind}:{name}", "?")))
        return rows


def load(*, extra: list[Any] | None = None, entry_points: bool = True) -> Registry:
    manager = pluggy.PluginManager(hookspecs.PROJECT)
    manager.add_hookspecs(hookspecs)
    for module_name in BUILTINS:
        module = importlib.import_module(module_name)
        manager.register(module.plugin, name=module_name)
    if entry_points:
        manager.load_setuptools_entrypoints(hookspecs.PROJECT)
    for plugin in extra or []:
        manager.register(plugin)
    try:
        manager.check_pending()  # a hook implementation no spec knows is a misspelt hook
    except pluggy.PluginValidationError as exc:
        raise errors.ConfigProblem(
            f"plugin {exc.plugin!r} implements a hook llama-orch does not have: {exc}; "
            f"the hooks are {', '.join(sorted(HOOKS))}"
        ) from exc
    reg = Registry(manager)
    tables = {
        "orch_register_gpu_observers": ("gpu-observer", reg.observers),
        "orch_register_engines": ("engine", reg.engines),
        "orch_register_model_resolvers": ("model-resolver", reg.resolvers),
        "orch_register_provisioners": ("provisioner", reg.provisioners),
    }
    plugins = manager.get_plugins()
    for hook_name, (kind, table) in tables.items():
        for impl in getattr(manager.hook, hook_name).get_hookimpls():
            # through pluggy, one plugin at a time, so a clash names both plugins
            others = [p for p in plugins if p is not impl.plugin]
            call = manager.subset_hook_caller(hook_name, remove_plugins=others)
            call(register=_registrar(reg, table, kind, impl.plugin_name))
    return reg


HOOKS = (
    "orch_register_gpu_observers",
    "orch_register_engines",
    "orch_register_model_resolvers",
    "orch_register_provisioners",
)


def _registrar(
    reg: Registry, table: dict[str, Any], kind: str, plugin_name: str
) -> Callable[[str, Any], None]:
    def register(name: str, obj: Any) -> None:
        if name in table:
            raise ValueError(
                f"{kind} {name!r} is registered twice "
                f"({reg.sources[f'{kind}:{name}']} and {plugin_name})"
            )
        table[name] = obj
        reg.sources[f"{kind}:{name}"] = plugin_name

    return register
