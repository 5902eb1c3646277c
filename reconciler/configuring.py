"""The applied desired state: orch.yaml re-read when it changes, last good kept on errors.

An invalid edit never tears anything down: `refresh` keeps the last good state applied and
records the errors, which status.json, `orchctl status` and the log show.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from pathlib import Path

from reconciler import clocks, logs, revision
from state import desired, loading

log = logs.get("config")


@dataclass
class AppliedConfig:
    path: Path
    known_engines: set[str]
    clock: clocks.Clock
    state: desired.DesiredState | None = None
    revision: str | None = None
    applied_at: str | None = None
    errors: list[loading.LoadError] = field(default_factory=list)
    _digest: str | None = None

    @property
    def base(self) -> Path:
        return self.path.parent

    def refresh(self) -> bool:
        """Re-read the file if its bytes changed; True when a new state was applied."""
        try:
            content = self.path.read_bytes()
        except OSError as exc:
            self._fail(
                [
                    loading.LoadError(
                        str(self.path), None, None, None, f"cannot be read: {exc.strerror}"
                    )
                ],
                None,
            )
            return False
        digest = hashlib.sha256(content).hexdigest()
        if digest == self._digest:
            return False
        self._digest = digest
        loaded = desired.load_desired(self.path, known_engines=self.known_engines)
        if loaded.value is None:
            self._fail(loaded.errors, digest)
            return False
        self.state = loaded.value
        self.errors = []
        self.revision = revision.of(self.path, content)
        self.applied_at = clocks.rfc3339(self.clock.now())
        logs.emit(
            log,
            "config.applied",
            f"Applied {self.path.name} revision {self.revision}: "
            f"{len(self.state.pools)} pool(s), {len(self.state.models)} model(s).",
            revision=self.revision,
        )
        return True

    def _fail(self, errors: list[loading.LoadError], digest: str | None) -> None:
        self.errors = errors
        kept = f"keeping revision {self.revision}" if self.state else "nothing applied yet"
        for error in errors:
            logs.emit(
                log,
                "config.invalid",
                f"{error} ({kept}).",
                level=40,
                path=error.path,
                line=error.line,
                field=error.field,
            )
        del digest
