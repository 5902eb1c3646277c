"""Hook specifications (pluggy). Only specs live here; built-ins implement them like anyone else.

Hooks are synchronous and cheap: each *registers* objects through the `register` callable it is
given. The registered objects carry the (async) behaviour. Third-party plugins are found through
the `llama_orch` entry-point group.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pluggy

PROJECT = "llama_orch"
hookspec = pluggy.HookspecMarker(PROJECT)
hookimpl = pluggy.HookimplMarker(PROJECT)


@hookspec
def orch_register_gpu_observers(register: Callable[[str, Any], None]) -> None:
    """Called once at start-up. Call `register(name, factory)` for each GPU observer.

    `factory(config: DesiredState, base: Path) -> GpuObserver`. Not firstresult: every plugin
    may register several; a later registration of the same name is an error.
    """


@hookspec
def orch_register_engines(register: Callable[[str, Any], None]) -> None:
    """Called once at start-up. Call `register(name, engine)` for each engine adapter.

    `engine` implements `plugins.interfaces.Engine`. Pools name engines in orch.yaml.
    """


@hookspec
def orch_register_model_resolvers(register: Callable[[str, Any], None]) -> None:
    """Called once at start-up. Call `register(scheme, resolver)` for each model ref scheme
    (`file`, `hf`, `https`). `resolver(ref: str, base: Path) -> ResolvedModel` (`base`:
    orch.yaml's folder) never touches the network. A resolver whose files are downloaded
    also has `downloadable = True`, `check(ref) -> str | None` (what is wrong with the ref)
    and a blocking `fetch(ref, *, digest, progress, cancel) -> Path`, which the daemon runs in
    a worker thread (see `plugins.resolvers`).
    """


@hookspec
def orch_register_provisioners(register: Callable[[str, Any], None]) -> None:
    """Called once at start-up. Call `register(engine_name, provisioner)` for each engine that
    can be built or installed (`orchctl up`, `orchctl doctor`): `provisioner.ensure(source,
    **options) -> Path` returns the engine binary, building it when it is not cached, and
    `provisioner.builds() -> list` the cached builds' records.
    """
