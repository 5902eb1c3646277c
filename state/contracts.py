"""The published contract: JSON Schemas generated from the pydantic models.

`make schemas` writes them into schemas/; a test fails when a committed schema differs from
what the models generate, so the contract editors and agents use never drifts silently.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from pydantic import BaseModel

from state import (
    artifacts,
    backups,
    desired,
    errors,
    events,
    results,
    statusfile,
    tasks,
    verifications,
)

SCHEMAS: dict[str, tuple[type[BaseModel], str]] = {
    "desired-state.schema.json": (desired.DesiredState, "orch.yaml: the desired state"),
    "task.schema.json": (tasks.TaskFile, "A task file in spool/incoming/"),
    "result.schema.json": (results.Result, "results/<task_id>.json"),
    "event-frame.schema.json": (events.EventFrame, "One line of results/<task_id>.events.jsonl"),
    "error-envelope.schema.json": (errors.ErrorEnvelope, "The error envelope"),
    "inventory.schema.json": (desired.SimulatedInventory, "A simulated GPU inventory"),
    "status.schema.json": (statusfile.StatusFile, ".orch/status.json: the observed state"),
    "artifact.schema.json": (artifacts.Artifact, "An artifact document (POST /v1/artifacts)"),
    "stored-artifact.schema.json": (
        artifacts.StoredArtifact,
        "artifacts/<hex>.json: one stored artifact",
    ),
    "verifications.schema.json": (
        verifications.VerificationBook,
        ".orch/verifications.json: the last digest check of each model",
    ),
    "backup-manifest.schema.json": (backups.Manifest, "manifest.json of `orchctl backup`"),
}


def render(model: type[BaseModel], title: str, name: str, engines: list[str] | None = None) -> str:
    schema: dict[str, Any] = model.model_json_schema()
    pool = schema.get("$defs", {}).get("PoolSpec", {}).get("properties", {})
    if engines and "engine" in pool:  # editors then offer the installed engines
        pool["engine"] = dict(pool["engine"], enum=sorted(engines))
    schema = {
        "$schema": "https://json-schema.org/draft/2020-12/schema",
        "$id": f"https://llama-orch.home/schemas/{name}",
        "title": title,
        **{k: v for k, v in schema.items() if k != "title"},
    }
    return json.dumps(schema, indent=2, sort_keys=True) + "\n"


def write(out: Path, *, engines: list[str] | None = None) -> list[str]:
    """Write every schema; `engines` (the installed engine names) become the enum of a
    pool's `engine`."""
    out.mkdir(parents=True, exist_ok=True)
    for name, (model, title) in SCHEMAS.items():
        (out / name).write_text(render(model, title, name, engines), encoding="utf-8")
    return list(SCHEMAS)


def check(out: Path, *, engines: list[str] | None = None) -> list[str]:
    """Names of committed schemas that differ from what the models generate."""
    drift = []
    for name, (model, title) in SCHEMAS.items():
        path = out / name
        expected = render(model, title, name, engines)
        if not path.exists() or path.read_text(encoding="utf-8") != expected:
            drift.append(name)
    return drift


def load(name: str, folder: Path) -> dict[str, Any]:
    data: dict[str, Any] = json.loads((folder / name).read_text(encoding="utf-8"))
    return data
