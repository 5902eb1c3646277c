"""`orchctl init` writes a starter orch.yaml that validates, for the GPUs NVML sees or for a
simulated workstation that `orchctl serve` runs at once; it never overwrites unasked."""

from __future__ import annotations

import json
from pathlib import Path

import jsonschema
import pytest
import yaml

import schemas
from plugins import gpu_nvml
from tests import fake_pynvml
from tests.orchctl_support import orchctl, orchctl_process

SCHEMA_LINE = f"# yaml-language-server: $schema={schemas.DIR}/desired-state.schema.json"


def use_nvml(monkeypatch: pytest.MonkeyPatch, nvml: fake_pynvml.FakeNvml) -> None:
    real = gpu_nvml.open_nvml
    monkeypatch.setattr(gpu_nvml, "open_nvml", lambda module=None: real(nvml))


def test_init_simulate_writes_a_workstation_that_validates(tmp_path: Path) -> None:
    ran = orchctl("init", "--simulate", cwd=tmp_path)
    assert ran.code == 0, ran.err
    assert ran.out_lines[:4] == [
        "wrote orch.yaml for a simulated 24 GB + 12 GB workstation",
        "wrote inventory.yaml",
        "wrote hello.task.yaml",
        "wrote models/starter.gguf (a stub: the sim engine does not read it)",
    ]
    text = (tmp_path / "orch.yaml").read_text()
    assert text.splitlines()[0] == SCHEMA_LINE
    assert (schemas.DIR / "desired-state.schema.json").is_file()
    schema = json.loads((schemas.DIR / "desired-state.schema.json").read_text())
    jsonschema.validate(yaml.safe_load(text), schema)
    checked = orchctl("validate", "orch.yaml", "inventory.yaml", "hello.task.yaml", cwd=tmp_path)
    assert checked.code == 0, checked.out
    assert checked.out_lines == ["orch.yaml: ok", "inventory.yaml: ok", "hello.task.yaml: ok"]


def test_the_simulated_workstation_serves_a_task_right_away(tmp_path: Path) -> None:
    assert orchctl("init", "--simulate", cwd=tmp_path).code == 0
    config = tmp_path / "orch.yaml"  # any free port: tests run side by side
    config.write_text(config.read_text().replace("127.0.0.1:8080", "127.0.0.1:0"))
    assert orchctl("submit", "hello.task.yaml", cwd=tmp_path).code == 0
    served = orchctl_process("serve", "--exit-when-idle", "--duration", "30", cwd=tmp_path)
    assert served.code == 0, served.err
    first = json.loads(served.err_lines[0])  # not a terminal: JSON Lines
    assert {"ts", "level", "event", "human"} <= set(first)
    result = json.loads((tmp_path / "results" / "hello.json").read_text())
    assert result["status"] == "succeeded" and result["tokens_out"] == 32


def test_the_next_steps_can_be_pasted_into_a_shell_when_the_path_has_a_space(
    tmp_path: Path,
) -> None:
    import shlex

    ran = orchctl("init", "--simulate", "--config", "my dir/orch.yaml", cwd=tmp_path)
    assert ran.code == 0, ran.err
    steps = ran.out_lines[ran.out_lines.index("next:") + 1 :]
    validate = shlex.split(steps[0])
    assert validate[:3] == ["orchctl", "validate", "--config"]
    assert validate[3:] == ["my dir/orch.yaml", "my dir/hello.task.yaml"], steps
    checked = orchctl(*validate[1:], cwd=tmp_path)
    assert checked.code == 0, checked.out


def test_init_refuses_to_overwrite_without_force(tmp_path: Path) -> None:
    (tmp_path / "orch.yaml").write_text("# mine\n")
    ran = orchctl("init", "--simulate", cwd=tmp_path)
    assert ran.code == 2
    assert ran.err_lines == [
        "orchctl: orch.yaml already exists; nothing was written",
        "hint: pass --force to overwrite orch.yaml, or --config PATH to write elsewhere",
    ]
    assert (tmp_path / "orch.yaml").read_text() == "# mine\n"
    assert not (tmp_path / "inventory.yaml").exists()
    assert orchctl("init", "--simulate", "--force", cwd=tmp_path).code == 0
    assert (tmp_path / "orch.yaml").read_text().startswith(SCHEMA_LINE)


def test_init_describes_the_gpus_nvml_sees(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    use_nvml(monkeypatch, fake_pynvml.FakeNvml())
    target = tmp_path / "cfg" / "orch.yaml"
    ran = orchctl("init", "--config", target)
    assert ran.code == 0, ran.err
    assert ran.out_lines[0] == f"wrote {target} for 1 GPU: 0 NVIDIA H200 (143771 MiB)"
    text = target.read_text()
    assert text.splitlines()[0] == SCHEMA_LINE
    assert "#   0: NVIDIA H200, 143771 MiB, PCI " in text
    assert "engine: llamacpp" in text
    checked = orchctl("validate", target)
    assert checked.code == 0, checked.out
    assert checked.out_lines[-1].startswith(f"{target}: ok (")  # warnings: no model file yet
    assert "does not exist: pool main cannot start until it is a model file" in checked.out


def test_init_without_a_driver_exits_3_with_the_fix(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    use_nvml(monkeypatch, fake_pynvml.FakeNvml().library_missing())
    ran = orchctl("init", cwd=tmp_path)
    assert ran.code == 3
    assert ran.err_lines[0] == (
        "orchctl: the NVIDIA driver is not installed: NVML (libnvidia-ml.so.1) was not found"
    )
    assert "nvidia-smi" in ran.err and "--simulate" in ran.err
    assert not (tmp_path / "orch.yaml").exists()
    # an orch.yaml already there is the first thing to say: no driver would change that
    (tmp_path / "orch.yaml").write_text("# mine\n")
    again = orchctl("init", cwd=tmp_path)
    assert again.code == 2 and "orch.yaml already exists" in again.err, again.err


def test_init_given_a_folder_says_to_name_the_file_and_writes_nothing(tmp_path: Path) -> None:
    ran = orchctl("init", "--simulate", "--force", "--config", tmp_path)
    assert ran.code == 2 and f"--config {tmp_path} is a folder" in ran.err, ran.err
    assert f"pass --config {tmp_path / 'orch.yaml'}" in ran.err
    assert list(tmp_path.iterdir()) == [] and not list(tmp_path.parent.glob(".*.tmp"))
