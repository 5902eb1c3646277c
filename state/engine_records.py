"""Engine records: `<state>/engines/<replica_id>.json`, one per engine process the daemon
started, so a restarted daemon adopts it or stops it and no engine is left holding VRAM.

The pool runtime writes a record when an engine process has started, forgets it when the
process is stopped or gone, and reads them all at startup (`read_all`). A record that cannot
be read is reported by path, so the caller can remove it.
"""

from __future__ import annotations

from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from state import atomic


class EngineRecord(BaseModel):
    model_config = ConfigDict(extra="ignore", frozen=True)  # older daemons wrote more

    replica_id: str
    pool_id: str
    engine: str
    spec_hash: str
    pid: int
    port: int
    started_at: float = Field(description="process start time, to tell a reused pid apart")
    log_path: str
    devices: list[int] = Field(default_factory=list)
    vram_mib: int = 0


def folder(state_dir: Path) -> Path:
    path = state_dir / "engines"
    path.mkdir(parents=True, exist_ok=True)
    return path


def write(state_dir: Path, record: EngineRecord) -> None:
    path = folder(state_dir) / f"{record.replica_id}.json"
    atomic.write_json(path, record.model_dump(), kind="engine_record")


def forget(state_dir: Path, replica_id: str) -> None:
    (folder(state_dir) / f"{replica_id}.json").unlink(missing_ok=True)


def read_all(state_dir: Path) -> tuple[list[EngineRecord], list[Path]]:
    """Every readable record, and the paths of those that are not."""
    good, bad = [], []
    for path in sorted(folder(state_dir).glob("*.json")):
        try:
            good.append(EngineRecord.model_validate_json(path.read_bytes()))
        except (OSError, ValidationError):
            bad.append(path)
    return good, bad
