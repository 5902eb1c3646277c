"""The published JSON Schemas match the models, and the examples validate against them."""

from __future__ import annotations

import json
from pathlib import Path

import jsonschema
import yaml

import schemas
from plugins import registry
from state import contracts

ROOT = Path(__file__).resolve().parents[1]


def test_committed_schemas_match_what_the_models_generate() -> None:
    engines = sorted(registry.load().engines)
    assert contracts.check(schemas.DIR, engines=engines) == [], "run `make schemas` and commit"


def test_a_schema_that_drifts_is_detected(tmp_path: Path) -> None:
    contracts.write(tmp_path)
    path = tmp_path / "task.schema.json"
    data = json.loads(path.read_text())
    data["properties"].pop("priority")
    path.write_text(json.dumps(data))
    assert contracts.check(tmp_path) == ["task.schema.json"]


def _validator(name: str) -> jsonschema.Draft202012Validator:
    schema = contracts.load(name, schemas.DIR)
    jsonschema.Draft202012Validator.check_schema(schema)
    return jsonschema.Draft202012Validator(schema)


def test_every_example_task_file_validates_against_the_task_schema() -> None:
    validator = _validator("task.schema.json")
    files = sorted(ROOT.glob("examples/*/tasks/*.task.*"))
    assert files
    for path in files:
        data = (
            json.loads(path.read_text())
            if path.suffix == ".json"
            else yaml.safe_load(path.read_text())
        )
        errors = [e.message for e in validator.iter_errors(data)]
        assert errors == [], path


def test_every_example_orch_yaml_validates_against_the_desired_state_schema() -> None:
    validator = _validator("desired-state.schema.json")
    files = sorted(ROOT.glob("examples/*/orch.yaml"))
    assert files
    for path in files:
        assert [e.message for e in validator.iter_errors(yaml.safe_load(path.read_text()))] == []


def test_the_schema_rejects_an_unknown_key_like_the_loader_does() -> None:
    validator = _validator("task.schema.json")
    bad = {"model": "m", "prompt": "p", "max_tokens": 1, "max_tokns": 2}
    assert any("max_tokns" in e.message for e in validator.iter_errors(bad))


def test_a_pools_engine_is_an_enum_of_the_installed_engines() -> None:
    schema = contracts.load("desired-state.schema.json", schemas.DIR)
    engine = schema["$defs"]["PoolSpec"]["properties"]["engine"]
    assert engine["enum"] == sorted(registry.load().engines) == ["llamacpp", "sim"]
    assert schema["$id"].endswith("/desired-state.schema.json")
