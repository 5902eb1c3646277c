"""Loading plugins: the pluggy manager, the built-ins, and third-party entry points.

`load()` is called once by `orchctl`; the result is passed explicitly to whoever needs it.
Built-in plugins are registered through the same hooks as third-party ones, which are found
in the `llama_orch` entry-point group.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pluggy

from plugins import hookspecs, interfaces
from state import desired

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
    reg = Registry(manager)
    for kind, hook, table in (
        ("gpu-observer", manager.hook.orch_register_gpu_observers, reg.observers),
        ("engine", manager.hook.orch_register_engines, reg.engines),
        ("model-resolver", manager.hook.orch_register_model_resolvers, reg.resolvers),
        ("provisioner", manager.hook.orch_register_provisioners, reg.provisioners),
    ):
        for impl in hook.get_hookimpls():

            def register(
                name: str,
                obj: Any,
                *,
                _t: dict[str, Any] = table,
                _k: str = kind,
                _p: str = impl.plugin_name,
            ) -> None:
                if name in _t:
                    raise ValueError(
                        f"{_k} {name!r} is registered twice "
                        f"({reg.sources[f'{_k}:{name}']} and {_p})"
                    )
                _t[name] = obj
                reg.sources[f"{_k}:{name}"] = _p

            getattr(impl.plugin, impl.function.__name__)(register=register)
    return reg
