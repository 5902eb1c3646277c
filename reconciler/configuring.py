"""The applied desired state: orch.yaml re-read when it changes, last good kept on errors.

The daemon calls `refresh` on every pass (and `start` once at startup). Rules:
- An invalid edit never tears anything down: the last good state stays applied and the
  errors are recorded (status.json, `orchctl status`, the log). Device indices are checked
  against the GPUs the observer sees, so `devices: [7]` on a two-GPU machine is such an error.
- An edit is applied once the file has been still for `SETTLE_S` (its mtime that old), so a
  non-atomic save (an editor writing in two steps) is never applied half-written; `wake_in_s`
  says when to look again (the first part of a file saved in steps is often a valid file
  without what follows the cut, which would fail the tasks waiting for it). A file
  renamed into place (an atomic save, `orchctl`, a tool that writes a temporary file first)
  is whole the moment it appears: when the watcher saw that rename after the file's last
  change (`renamed`), the edit is applied at once.
- A file that cannot be read (deleted, replaced by a directory or a symlink) is an error like
  any other; restoring it, even byte for byte, clears the error.
- Every applied config is kept in `.orch/last-good.yaml` beside orch.yaml (with its revision),
  and a daemon that starts while orch.yaml is invalid serves that copy, loudly, until the file
  is fixed.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import stat
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from reconciler import clocks, logs, revision
from state import atomic, desired, failpoints, loading

log = logs.get("config")

# How long orch.yaml written in place must be unchanged before an edit is applied (one renamed
# into place whole is applied at once). The first part of a file saved in several steps is
# often a whole valid file lacking what follows the cut (a pool, the sessions block, a digit
# of `ctx: 4096`): applied, it could fail every task waiting for what it lacks, or restart a
# replica; saves seconds apart are what this waits out.
SETTLE_S = 2.0
LAST_GOOD = Path(".orch") / "last-good.yaml"


@dataclass
class AppliedConfig:
    path: Path
    known_engines: set[str]
    clock: clocks.Clock
    gpu_indices: Callable[[], set[int] | None] = lambda: None  # None: not observed yet
    state: desired.DesiredState | None = None
    revision: str | None = None
    applied_at: str | None = None
    errors: list[loading.LoadError] = field(default_factory=list)
    from_last_good: bool = False  # serving .orch/last-good.yaml because orch.yaml is invalid
    # model id -> when a config naming it was first applied (and it stayed named since): the
    # `created` of /v1/models, which an edit of anything else leaves alone
    models_since: dict[str, str] = field(default_factory=dict)
    gpus_from_option: bool = False  # `serve --simulate FILE`: orch.yaml's gpus: observer unused
    # .orch/last-good.yaml is written only by the daemon that holds the folder's lock: one
    # refused by it (another daemon serves there) must not replace the one serving's copy;
    # until `keep_last_good()`, the applied bytes wait in `_unkept`
    keeping: bool = True
    _unkept: bytes | None = None
    # and what it would log meanwhile waits too: a daemon refused by the lock says only that
    _unsaid: list[tuple[str, str, dict[str, Any]]] = field(default_factory=list)
    applied_digest: str | None = None  # sha256 hex of the orch.yaml bytes applied last
    # path → wall-clock time the watcher last saw a file renamed onto it (watching.start)
    renamed: dict[str, float] = field(default_factory=dict)
    _digest: str | None = None
    _wake_in_s: float | None = None

    @property
    def base(self) -> Path:
        return self.path.parent

    @property
    def last_good_path(self) -> Path:
        return self.base / LAST_GOOD

    def start(self) -> bool:
        """The first read at startup: no settle time. When orch.yaml is invalid and a last
        good copy exists, that copy is applied and the errors are kept for everyone to see."""
        if self.refresh(settle=False):
            return True
        if self.state is not None or not self.last_good_path.is_file():
            return self.state is not None
        errors = list(self.errors)
        loaded = desired.load_desired(self.last_good_path, known_engines=self.known_engines)
        if loaded.value is None:
            return False
        meta = _read_meta(self.last_good_path)
        self.state = loaded.value
        self.revision = str(meta.get("revision") or "last-good")
        self.applied_at = clocks.rfc3339(self.clock.now())
        self._note_models()
        self.errors = errors
        self.from_last_good = True
        self._say(
            "config.last_good",
            f"{self.path.name} is invalid; serving the last good revision {self.revision} "
            f"(applied {meta.get('applied_at', 'earlier')}) from {self.last_good_path} until "
            "it is fixed.",
            level=40,
            revision=self.revision,
        )
        return True

    def wake_in_s(self) -> float | None:
        """When a pending edit will have settled (the loop should look again then)."""
        return self._wake_in_s

    def refresh(self, *, settle: bool = True) -> bool:
        """Re-read the file if its bytes changed; True when a new state was applied."""
        self._wake_in_s = None
        content, problem, age, mtime = self._read()
        if content is None:
            self._digest = None  # whatever comes back, even the same bytes, is read afresh
            hint = (
                f"put a regular orch.yaml back (`git checkout {self.path.name}`, or copy "
                f"{LAST_GOOD}, the config served until then); it is applied once it is valid"
            )
            self._fail([loading.LoadError(str(self.path), None, None, None, problem, hint)])
            return False
        digest = hashlib.sha256(content).hexdigest()
        if digest == self._digest:
            return False
        whole = self.renamed.get(str(self.path), 0.0) >= mtime  # renamed in, not changed since
        if settle and age < SETTLE_S and not whole:  # still being written: look again later
            self._wake_in_s = SETTLE_S - age
            return False
        self._digest = digest
        # the bytes just read, not the file again: it may have been replaced meanwhile, and
        # the state applied must be the one the digest and revision name
        loaded = desired.load_desired(self.path, known_engines=self.known_engines, content=content)
        errors = loaded.errors
        if loaded.value is not None:
            errors = self.device_errors(loaded.value, node=loaded.node)
            errors += self.restart_errors(loaded.value, node=loaded.node)
        elif loaded.data is not None and loaded.node is not None:
            absent = self._raw_device_errors(loaded.data, loaded.node)
            errors = sorted([*errors, *absent], key=lambda e: (e.line or 0, e.column or 0))
        if loaded.value is None or errors:
            self._fail(errors)
            return False
        self.state = loaded.value
        self.errors = []
        self.from_last_good = False
        self.applied_digest = digest
        self.revision = revision.of(self.path, content)
        self.applied_at = clocks.rfc3339(self.clock.now())
        self._note_models()
        self._keep_last_good(content)
        failpoints.hit("after_config_applied")
        self._say(
            "config.applied",
            f"Applied {self.path.name} revision {self.revision}: "
            f"{len(self.state.pools)} pool(s), {len(self.state.models)} model(s).",
            revision=self.revision,
        )
        return True

    def _read(self) -> tuple[bytes | None, str, float, float]:
        """(content, why it cannot be used, seconds since it last changed, its mtime)."""
        try:
            info = os.lstat(self.path)
            if stat.S_ISLNK(info.st_mode):
                return None, "is a symlink; orch.yaml must be a regular file (copy it)", 0.0, 0.0
            if not stat.S_ISREG(info.st_mode):
                return None, "is not a regular file", 0.0, 0.0
        except OSError as exc:
            return None, f"cannot be read: {exc.strerror or exc}", 0.0, 0.0
        # never following a link, never blocking on a FIFO swapped in since the lstat above,
        # never reading more than a config can be
        content, problems, opened = loading.read_bytes(self.path)
        if content is None or opened is None:
            return None, problems[0].message if problems else "cannot be read", 0.0, 0.0
        return content, "", max(0.0, self.clock.now() - opened.st_mtime), opened.st_mtime

    def device_errors(
        self, state: desired.DesiredState, *, node: yaml.Node | None = None
    ) -> list[loading.LoadError]:
        """Explicit device indices that no observed GPU has (none before the first look);
        located in `node`, the tree `state` was built from (else orch.yaml read again)."""
        return self._absent_devices([pool.devices for pool in state.pools], node)

    def _raw_device_errors(self, data: Any, node: yaml.Node | None) -> list[loading.LoadError]:
        """The same for a file the schema refused: its other errors come with these, as
        `orchctl validate` reports them, not one round of fixes after another."""
        pools = data.get("pools") if isinstance(data, dict) else None
        if not isinstance(pools, list):
            return []
        return self._absent_devices(
            [p.get("devices") if isinstance(p, dict) else None for p in pools], node
        )

    def _absent_devices(self, lists: list[Any], node: yaml.Node | None) -> list[loading.LoadError]:
        present = self.gpu_indices()
        if present is None:
            return []
        errors = []
        for i, devices in enumerate(lists):
            if not isinstance(devices, list):
                continue
            for j, index in enumerate(devices):
                if (
                    isinstance(index, int)
                    and not isinstance(index, bool)
                    and index >= 0
                    and index not in present
                ):
                    if node is None:
                        node = _node(self.path)
                    line, col = loading.locate(node, ("pools", i, "devices", j))
                    shown = ", ".join(map(str, sorted(present))) or "none"
                    errors.append(
                        loading.LoadError(
                            str(self.path),
                            line,
                            col,
                            f"pools[{i}].devices[{j}]",
                            f"GPU {index} does not exist on this machine (GPUs: {shown})",
                            "use an index nvidia-smi lists (PCI bus order), or devices: auto",
                        )
                    )
        return errors

    def restart_errors(
        self, state: desired.DesiredState, *, node: yaml.Node | None = None
    ) -> list[loading.LoadError]:
        """Fields the daemon reads once, at its start (its folders, its HTTP bind), changed
        in an edit while it runs: the edit waits for a restart rather than being reported
        applied while the daemon went on using the old folders and address."""
        if self.state is None:
            return []
        gpus = not self.gpus_from_option
        running, wanted = _read_at_start(self.state, gpus), _read_at_start(state, gpus)
        errors = []
        for where, old in running.items():
            new = wanted[where]
            if new == old:
                continue
            if node is None:
                node = _node(self.path)
            line, col = loading.locate(node, where)
            errors.append(
                loading.LoadError(
                    str(self.path),
                    line,
                    col,
                    ".".join(map(str, where)),
                    f"changed from {_as_yaml(old)} to {_as_yaml(new)} while the daemon runs; "
                    "it is read only "
                    "when the daemon starts",
                    "restart the daemon (stop it, then `orchctl serve`) to apply this edit, "
                    "or put the old value back",
                )
            )
        return errors

    def _say(self, event: str, human: str, **fields: Any) -> None:
        if self.keeping:
            logs.emit(log, event, human, **fields)
        else:
            self._unsaid.append((event, human, fields))

    def keep_last_good(self) -> None:
        """From now on keep .orch/last-good.yaml (the daemon took the folder's lock), starting
        with what was applied before, and log what was held back until then."""
        self.keeping = True
        said, self._unsaid = self._unsaid, []
        for event, human, fields in said:
            logs.emit(log, event, human, **fields)
        if self._unkept is not None:
            content, self._unkept = self._unkept, None
            self._keep_last_good(content)

    def _note_models(self) -> None:
        assert self.state is not None and self.applied_at is not None
        named = set(self.state.models)
        for gone in set(self.models_since) - named:
            del self.models_since[gone]
        for model_id in named - set(self.models_since):
            self.models_since[model_id] = self.applied_at

    def _keep_last_good(self, content: bytes) -> None:
        if not self.keeping:
            self._unkept = content
            return
        try:
            self.last_good_path.parent.mkdir(parents=True, exist_ok=True)
            atomic.write_bytes(self.last_good_path, content, kind="last_good")
            meta = {"revision": self.revision, "applied_at": self.applied_at}
            atomic.write_json(_meta_path(self.last_good_path), meta, kind="last_good")
        except OSError as exc:  # a fallback, never a reason not to serve: but said plainly
            with contextlib.suppress(OSError):  # a record of a copy that is not there
                atomic.remove(_meta_path(self.last_good_path))
            logs.emit(
                log,
                "config.last_good_unwritable",
                f"Could not keep {LAST_GOOD}: {exc}. The daemon serves on, but a bad edit of "
                f"{self.path.name} at its next start would have no last good config to fall "
                f"back to: remove what is in the way at {self.last_good_path}, or let the "
                "daemon's user write there.",
                level=30,
            )

    def _fail(self, errors: list[loading.LoadError]) -> None:
        if [str(e) for e in errors] == [str(e) for e in self.errors]:
            return  # reported already; a pass per second would flood the log
        self.errors = errors
        kept = f"keeping revision {self.revision}" if self.state else "nothing applied yet"
        for error in errors:
            self._say("config.invalid", f"{error} ({kept}).", **invalid_fields(error))


def invalid_fields(error: loading.LoadError) -> dict[str, Any]:
    """The fields of a `config.invalid` log event (an error, located)."""
    return {"level": 40, "path": error.path, "line": error.line, "field": error.field}


def _meta_path(path: Path) -> Path:
    return path.with_name(path.name + ".json")


def _read_at_start(state: desired.DesiredState, gpus: bool) -> dict[tuple[str, str], object]:
    """The values the daemon takes once, at its start, by where they are in orch.yaml: its
    folders, its HTTP server and its token (`auth:`: a token required by an edit must not be
    reported applied while the API stays open), and (unless `serve --simulate` chose them)
    its GPU observer with the simulated inventory file it reads."""
    values: dict[tuple[str, str], object] = {}
    for section, model in (("server", state.server), ("auth", state.auth), ("paths", state.paths)):
        for name, value in model.model_dump().items():
            values[(section, name)] = value
    if gpus:
        values[("gpus", "observer")] = state.gpus.observer
        values[("gpus", "inventory")] = state.gpus.inventory
    return values


def _read_meta(path: Path) -> dict[str, object]:
    try:
        data = json.loads(_meta_path(path).read_text())
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def _node(path: Path) -> yaml.Node | None:
    text, _ = loading.read_text(path)
    if text is None:
        return None
    _, node, _ = loading.parse_document(text, str(path))
    return node


def _as_yaml(value: Any) -> str:
    """A value as orch.yaml spells it (true, null, "text", [0, 1]), not as Python does."""
    if isinstance(value, str):
        return json.dumps(value)
    return (
        yaml.safe_dump(value, default_flow_style=True, width=10_000).strip().removesuffix("\n...")
    )
