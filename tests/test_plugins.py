"""Plugins register through the same hooks as the built-ins; clashes are refused loudly."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pluggy
import pytest

from plugins import hookspecs, registry
from state import errors


class ThirdParty:
    @hookspecs.hookimpl
    def orch_register_engines(self, register: Callable[[str, Any], None]) -> None:
        register("vllm-lite", object())


class Clashing:
    @hookspecs.hookimpl
    def orch_register_engines(self, register: Callable[[str, Any], None]) -> None:
        register("sim", object())


def test_the_built_ins_are_registered_as_ordinary_plugins() -> None:
    reg = registry.load(entry_points=False)
    rows = {(kind, name): source for kind, name, source in reg.describe()}
    assert rows[("engine", "sim")] == "plugins.engine_sim"
    assert rows[("engine", "llamacpp")] == "plugins.engine_llamacpp"
    assert rows[("gpu-observer", "nvml")] == "plugins.gpu_nvml"
    assert rows[("gpu-observer", "simulated")] == "plugins.gpu_simulated"
    assert rows[("model-resolver", "file")] == "plugins.resolvers"


def test_a_third_party_plugin_adds_an_engine() -> None:
    reg = registry.load(extra=[ThirdParty()], entry_points=False)
    assert "vllm-lite" in reg.engines and "sim" in reg.engines


def test_registering_a_name_twice_names_both_plugins() -> None:
    with pytest.raises(ValueError, match="'sim' is registered twice"):
        registry.load(extra=[Clashing()], entry_points=False)


def test_a_plugin_with_a_misspelt_hook_is_refused_naming_it() -> None:
    class Misspelt:
        @pluggy.HookimplMarker(hookspecs.PROJECT)
        def orch_register_engine(self, register: Any) -> None:  # the spec is ..._engines
            register("x", object())

    with pytest.raises(errors.ConfigProblem, match="orch_register_engine"):
        registry.load(extra=[Misspelt()], entry_points=False)
