"""`orchctl validate` says now what would fail later: tasks against the orch.yaml they will
meet, and an orch.yaml against what `serve` checks on this machine, all in one round."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from tests.orchctl_support import orchctl, orchctl_process

ROOT = Path(__file__).resolve().parents[1]
EXAMPLE = ROOT / "examples" / "01-simulated-workstation"
INVENTORY = EXAMPLE / "inventory.yaml"

CONFIG = f"""\
version: 1
gpus: {{observer: simulated, inventory: {INVENTORY}}}
models:
  m1: {{ref: "file:m1.gguf", size_mib: 1000}}
  m2: {{ref: "file:m2.gguf", size_mib: 1000}}
pools:
  - {{id: p1, engine: sim, model: m1, max_tokens: 100}}
  - {{id: p2, engine: sim, model: m2}}
"""


@pytest.fixture
def config(tmp_path: Path) -> Path:
    path = tmp_path / "orch.yaml"
    path.write_text(CONFIG)
    return path


def task_file(folder: Path, text: str, name: str = "t.task.yaml") -> Path:
    path = folder / name
    path.write_text(text)
    return path


def test_the_examples_validate_together_and_each_task_against_their_orch_yaml() -> None:
    files = [EXAMPLE / "orch.yaml", INVENTORY, *sorted((EXAMPLE / "tasks").glob("*"))]
    ran = orchctl("validate", *files)
    assert ran.code == 0, ran.out
    assert ran.out_lines == [f"{f}: ok" for f in files]


def test_a_task_naming_a_model_the_config_lacks_is_an_error_naming_the_models(
    config: Path,
) -> None:
    t = task_file(config.parent, "model: nope\nprompt: hi\nmax_tokens: 5\n")
    ran = orchctl("validate", "--config", config, t)
    assert ran.code == 2
    assert ran.out_lines == [
        f"{config}: ok",
        f"{t}:1:8: model: unknown model 'nope'; {config} has: m1, m2 "
        "(hint: name one of those models, or add it under models: in orch.yaml)",
    ]


def test_a_task_naming_an_unknown_pool_or_pinning_one_is_an_error(config: Path) -> None:
    t = task_file(
        config.parent,
        "pool: nope\nprompt: hi\nmax_tokens: 5\n"
        "placement: {mode: pin, pin_pool: gone, prefer_pools: [p9]}\n",
    )
    ran = orchctl("validate", "--config", config, t)
    assert ran.code == 2
    assert ran.out_lines[1:] == [
        f"{t}:1:7: pool: unknown pool 'nope'; {config} has pools: p1, p2 "
        "(hint: name one of those pools, or name a model instead)",
        f"{t}:4:34: placement.pin_pool: pinned pool 'gone' is not in {config} (pools: p1, p2) "
        "(hint: a pin never falls back: pin one of those pools, or use mode: prefer)",
        f"{t}:4:55: warning: placement.prefer_pools[0]: pool 'p9' is not in {config} "
        "(pools: p1, p2) (hint: it is ignored; name one of those pools)",
    ]


def test_a_pin_pool_pins_without_a_mode_and_is_refused_with_another(config: Path) -> None:
    """`placement: {pin_pool: x}` alone pins (a pin to a pool not there is an error); with
    mode auto or prefer it would be ignored without a word, so it is refused."""
    alone = task_file(
        config.parent,
        "model: m1\nprompt: hi\nmax_tokens: 5\nplacement: {pin_pool: gone}\n",
        name="alone.task.yaml",
    )
    ran = orchctl("validate", "--config", config, alone)
    assert ran.code == 2
    assert "placement.pin_pool: pinned pool 'gone' is not in" in ran.out, ran.out
    for mode in ("auto", "prefer"):
        t = task_file(
            config.parent,
            f"model: m1\nprompt: hi\nmax_tokens: 5\nplacement: {{mode: {mode}, pin_pool: p1}}\n",
            name=f"{mode}.task.yaml",
        )
        ran = orchctl("validate", "--config", config, t)
        assert ran.code == 2, ran.out
        assert f"pin_pool is used only with mode: pin, not mode: {mode}" in ran.out, ran.out
        assert "set mode: pin (or leave mode out)" in ran.out


def test_a_task_over_its_pools_limit_is_refused_as_admission_would(config: Path) -> None:
    t = task_file(config.parent, "model: m1\nprompt: hi\nmax_tokens: 500\n")
    ran = orchctl("validate", "--config", config, t)
    assert ran.code == 2
    assert ran.out_lines[1] == (
        f"{t}:3:13: max_tokens: 500 is over the pool limit 100 — the daemon would refuse it "
        "(INVALID_PARAMS) (hint: ask for at most 100 tokens)"
    )


def test_the_one_orch_yaml_among_the_files_is_the_config_tasks_are_checked_against(
    config: Path,
) -> None:
    t = task_file(config.parent, "model: nope\nprompt: hi\nmax_tokens: 5\n")
    ran = orchctl("validate", config, t)
    assert ran.code == 2 and "unknown model 'nope'" in ran.out
    alone = orchctl("validate", t)
    assert alone.out_lines == [
        f"{t}: ok (not checked against an orch.yaml: add --config orch.yaml)"
    ]


def test_an_orch_yaml_gets_every_problem_serve_would_meet_in_one_round(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (tmp_path / "orch.yaml").write_text(
        f"""\
version: 1
gpus: {{observer: simulated, inventory: {INVENTORY}}}
queue: {{capacty: 3}}
models:
  hub: {{ref: "s3://bucket/model.gguf"}}
  local: {{ref: "file:models/local.gguf"}}
pools:
  - {{id: a, engine: sim, model: hub}}
  - {{id: b, engine: llamacpp, model: local, devices: [1, 1]}}
  - {{id: c, engine: sim, model: nothing, devices: [7]}}
"""
    )
    monkeypatch.setenv("PATH", str(tmp_path))  # no llama-server on PATH,
    monkeypatch.setenv("HOME", str(tmp_path))  # nor a provisioned one under ~/.cache
    ran = orchctl("validate", tmp_path / "orch.yaml")
    p = tmp_path / "orch.yaml"
    assert ran.code == 2
    lines = ran.out_lines
    assert (
        lines[0]
        == f"{p}:3:9: queue.capacty: unknown key 'capacty' (hint: did you mean 'capacity'?)"
    )
    assert lines[1] == (
        f"{p}:5:14: models.hub.ref: no model resolver for s3: refs is installed (installed: "
        'file:, hf:, http:, https:) (hint: download the file and use ref: "file:<path>" '
        "(relative paths resolve from orch.yaml's folder), or install a plugin that resolves "
        "s3: refs)"
    )
    assert lines[2] == (
        f"{p}:6:16: warning: models.local.ref: {tmp_path}/models/local.gguf does not exist: "
        "pool b cannot start until it is a model file (hint: relative paths resolve from "
        f"orch.yaml's folder ({tmp_path}); put the model file there or fix the path)"
    )
    assert lines[3].startswith(
        f"{p}:9:21: warning: pools[1].engine: llama-server not found (engines.llamacpp.binary "
        "unset, nothing under"
    )
    assert lines[4] == (
        f"{p}:9:58: pools[1].devices[1]: GPU 1 is listed twice "
        "(hint: list each GPU index once, e.g. [0, 1])"
    )
    assert lines[5] == (
        f"{p}:10:33: pools[2].model: 'nothing' is not under models: (known: hub, local) "
        "(hint: add it under models:, or name one of those)"
    )
    assert lines[6] == (
        f"{p}:10:52: pools[2].devices[0]: GPU 7 does not exist on this machine (GPUs: 0, 1) "
        "(hint: use an index nvidia-smi lists (PCI bus order), or devices: auto)"
    )
    assert len(lines) == 7


def test_a_cpu_only_build_is_no_engine_for_llamacpp_pools(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A CPU-only llama-server (the tests' build) was taken by validate as the engine, while
    the daemon refuses it (GPU-only) and doctor does not count it."""
    from plugins import llamacpp_builds

    monkeypatch.setenv("PATH", str(tmp_path))
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.delenv("LLAMA_ORCH_TEST_ALLOW_CPU_INFERENCE", raising=False)
    binary = tmp_path / ".cache/llama-orch/llama.cpp/0.3.36-cpu/bin/llama-server"
    binary.parent.mkdir(parents=True)
    binary.write_text("#!/bin/sh\n")
    binary.chmod(0o755)
    record = llamacpp_builds.EngineBuild(
        key="0.3.36-cpu",
        version="0.3.36",
        source="pypi:0.3.36",
        backend="cpu",
        cuda_archs=[],
        path=str(binary),
        built_at="2026-01-02T03:04:05+00:00",
    )
    (binary.parent / "engine.json").write_text(record.model_dump_json())
    p = tmp_path / "orch.yaml"
    p.write_text(
        "version: 1\ngpus: {observer: simulated, inventory: inventory.yaml}\n"
        "models: {m: {ref: 'file:m.gguf', size_mib: 100}}\n"
        "pools: [{id: p, engine: llamacpp, model: m}]\n"
    )
    (tmp_path / "inventory.yaml").write_text("gpus: [{index: 0, name: X, vram_total_mib: 24000}]\n")
    ran = orchctl("validate", p)
    said = [ln for ln in ran.out_lines if "pools[0].engine" in ln]
    assert said and "is a CPU-only build" in said[0] and "orchctl up" in said[0], ran.out


def test_an_unused_model_with_no_resolver_is_only_a_warning(tmp_path: Path) -> None:
    p = tmp_path / "orch.yaml"
    p.write_text(
        f"gpus: {{observer: simulated, inventory: {INVENTORY}}}\n"
        'models: {later: {ref: "s3://bucket/x.gguf"}}\n'
    )
    ran = orchctl("validate", p)
    assert ran.code == 0
    assert ran.out_lines[-1] == f"{p}: ok (1 warning)"
    assert "warning: models.later.ref: no model resolver for s3:" in ran.out_lines[0]


def test_a_hub_ref_that_names_no_file_is_an_error_where_a_pool_loads_it(tmp_path: Path) -> None:
    p = tmp_path / "orch.yaml"
    p.write_text(
        f"gpus: {{observer: simulated, inventory: {INVENTORY}}}\n"
        'models: {hub: {ref: "hf:org/repo"}}\n'
        "pools: [{id: a, engine: llamacpp, model: hub}]\n"
    )
    ran = orchctl("validate", p)
    assert ran.code == 2
    assert ran.out_lines[0].startswith(
        f"{p}:2:21: models.hub.ref: 'hf:org/repo': a hub ref is hf:ORG/REPO/FILE"
    )


def test_a_missing_inventory_is_an_error_located_at_its_key(tmp_path: Path) -> None:
    p = tmp_path / "orch.yaml"
    p.write_text("gpus: {observer: simulated, inventory: gone.yaml}\n")
    ran = orchctl("validate", p)
    assert ran.code == 2
    assert ran.out_lines[0].startswith(
        f"{p}:1:40: gpus.inventory: the inventory cannot be used: {tmp_path}/gone.yaml: "
        "cannot be read"
    )
    assert ran.out_lines[0].count("(hint: ") == 1, ran.out_lines[0]  # one hint, both fixes
    assert "no file has that name; relative paths resolve" in ran.out_lines[0]


def test_validate_never_prints_python_reprs(tmp_path: Path) -> None:
    t = task_file(tmp_path, "prompt: {a: 1}\nmax_tokens: [1]\nmodel: m\nsampling: 3\n")
    ran = orchctl("validate", t)  # orchctl() itself fails on "{'" and "Value error,"
    assert ran.code == 2
    prompt = f"{t}:1:9: prompt: should be a valid string (got a mapping) (hint: "
    assert any(line.startswith(prompt) for line in ran.out_lines), ran.out_lines


def test_a_string_holding_a_bracket_is_shown_as_given_not_called_a_list(tmp_path: Path) -> None:
    t = task_file(tmp_path, 'model: "a[b"\nprompt: hi\nmax_tokens: 2\n')
    ran = orchctl("validate", t)
    assert ran.code == 2
    assert "(got 'a[b')" in ran.out and "a list" not in ran.out, ran.out


def test_a_config_option_naming_a_task_or_inventory_file_is_refused(tmp_path: Path) -> None:
    (tmp_path / "a.task.yaml").write_text("model: m1\nprompt: hi\nmax_tokens: 2\n")
    (tmp_path / "gpus.yaml").write_text("gpus:\n  - {index: 0, name: x, vram_total_mib: 100}\n")
    for config, kind in (("a.task.yaml", "a task"), ("gpus.yaml", "an inventory")):
        ran = orchctl("validate", "--config", tmp_path / config, tmp_path / "a.task.yaml")
        assert ran.code == 2 and f"is {kind} file, not an orch.yaml" in ran.err, ran.err


def test_a_task_checked_against_a_broken_config_says_so(tmp_path: Path) -> None:
    (tmp_path / "a.task.yaml").write_text("model: m1\nprompt: hi\nmax_tokens: 2\n")
    (tmp_path / "bad.yaml").write_text("version: 1\nbogus: 1\n")
    ran = orchctl("validate", "--config", tmp_path / "bad.yaml", tmp_path / "a.task.yaml")
    assert ran.code == 2
    assert f"a.task.yaml: ok (not checked against {tmp_path / 'bad.yaml'}, which has errors)" in (
        ran.out
    )


def test_a_verb_given_an_unreadable_or_wrong_config_names_the_problem(tmp_path: Path) -> None:
    (tmp_path / "huge.yaml").write_bytes(b"#" * (2 << 20))
    ran = orchctl("status", "--config", tmp_path / "huge.yaml")
    assert ran.code == 2 and "huge.yaml is 2097152 bytes, over the limit" in ran.err, ran.err
    (tmp_path / "a.task.yaml").write_text("model: m1\nprompt: hi\nmax_tokens: 2\n")
    ran = orchctl("status", "--config", tmp_path / "a.task.yaml")
    assert "a.task.yaml:1:1: model: unknown key 'model'" in ran.err, ran.err
    assert "(and 2 more)" in ran.err and "`orchctl validate" in ran.err


def test_with_no_file_it_checks_the_orch_yaml_of_this_folder(config: Path) -> None:
    ran = orchctl("validate", cwd=config.parent)
    assert ran.code == 0, ran.out + ran.err
    assert ran.out_lines == ["orch.yaml: ok"]
    config.write_text(CONFIG.replace("max_tokens: 100", "max_tokens: lots"))
    ran = orchctl("validate", cwd=config.parent)
    assert ran.code == 2
    assert ran.out.startswith("orch.yaml:") and "max_tokens" in ran.out


def test_with_no_file_and_no_orch_yaml_here_it_says_what_to_name(tmp_path: Path) -> None:
    ran = orchctl("validate", cwd=tmp_path)
    assert ran.code == 2
    assert "no FILE given and no orch.yaml in this folder" in ran.err
    assert "orchctl validate orch.yaml" in ran.err


def _sized(tmp_path: Path, size_mib: int, devices: str) -> Path:
    path = tmp_path / "orch.yaml"
    path.write_text(
        "version: 1\n"
        f"gpus: {{observer: simulated, inventory: {INVENTORY}, reserve_mib: 512}}\n"
        f'models:\n  big: {{ref: "file:big.gguf", size_mib: {size_mib}}}\n'
        "pools:\n"
        f"  - {{id: p1, engine: sim, model: big, devices: {devices}, ctx: 4096, slots: 2}}\n"
    )
    return path


@pytest.mark.parametrize(
    ("size_mib", "devices", "expected"),
    [
        (
            14000,
            "[1]",
            ":6:48: warning: pools[0].devices: pool p1 can never start here: one replica needs "
            "about 15,212 MiB (model big, ctx 4096 × 2 slots) and GPU 1 has 11,776 MiB for "
            "engines after the 512 MiB reserve (hint: pin GPU 0, which can hold it, or use "
            "devices: auto; or lower ctx or slots, or choose a smaller model file)",
        ),
        (
            40000,
            "auto",
            ":6:34: warning: pools[0].model: pool p1 can never start here: one replica needs "
            "about 41,212 MiB (model big, ctx 4096 × 2 slots) and the largest GPU, GPU 0, has "
            "23,644 MiB for engines after the 512 MiB reserve (hint: lower ctx or slots, or "
            "choose a smaller model file (split over every GPU it would still not fit))",
        ),
        (
            30000,
            "[0, 1]",
            ":6:48: warning: pools[0].devices: pool p1 can never start here: one replica needs "
            "about 15,606 MiB on each of its 2 GPUs (model big, ctx 4096 × 2 slots) and GPU 1 "
            "has 11,776 MiB for engines after the 512 MiB reserve (hint: lower ctx or slots, or "
            "choose a smaller model file)",
        ),
    ],
)
def test_a_pool_that_cannot_fit_even_on_empty_gpus_is_a_warning_naming_the_numbers(
    tmp_path: Path, size_mib: int, devices: str, expected: str
) -> None:
    config = _sized(tmp_path, size_mib, devices)
    ran = orchctl("validate", config)
    assert ran.code == 0, ran.out
    assert ran.out_lines == [f"{config}{expected}", f"{config}: ok (1 warning)"]


@pytest.mark.parametrize(
    ("size_mib", "devices"), [(14000, "[0]"), (20000, "auto"), (20000, "[0, 1]")]
)
def test_a_pool_that_fits_its_gpus_gets_no_warning(
    tmp_path: Path, size_mib: int, devices: str
) -> None:
    config = _sized(tmp_path, size_mib, devices)
    ran = orchctl("validate", config)
    assert ran.out_lines == [f"{config}: ok"], ran.out


def test_a_model_file_that_is_not_a_usable_gguf_is_a_warning_for_its_llamacpp_pool(
    tmp_path: Path,
) -> None:
    from tests import tiny_gguf

    good = tiny_gguf.write(tmp_path / "good.gguf")
    (tmp_path / "cut.gguf").write_bytes(good.read_bytes()[:2000])  # a download cut short
    config = tmp_path / "orch.yaml"
    config.write_text(
        "version: 1\n"
        f"gpus: {{observer: simulated, inventory: {INVENTORY}}}\n"
        "engines: {llamacpp: {binary: /bin/true}}\n"
        'models: {good: {ref: "file:good.gguf"}, cut: {ref: "file:cut.gguf"}}\n'
        "pools:\n"
        "  - {id: a, engine: llamacpp, model: good}\n"
        "  - {id: b, engine: llamacpp, model: cut}\n"
    )
    ran = orchctl("validate", config)
    assert ran.code == 0, ran.out
    problems = [line for line in ran.out_lines if "not a usable GGUF" in line]
    assert len(problems) == 1 and "cut.gguf is not a usable GGUF" in problems[0], ran.out
    assert "warning: models.cut.ref" in problems[0] and "pool b cannot start" in problems[0]
    assert "fetch the file again" in problems[0]


@pytest.mark.parametrize(
    ("paths", "field", "said"),
    [
        # the probe that found it: the daemon quarantined its own results, without end
        ("{results: spool/incoming}", "paths.results", "is the spool/incoming folder"),
        ("{results: spool/active/r}", "paths.results", "lies in the spool/active folder"),
        ("{state: results/.orch}", "paths.state", "lies in the results folder"),
        ("{spool: results/spool}", "paths.spool", "lies in the results folder"),
        # a result named like a state file (drains.json) was overwritten by it
        ("{results: .orch}", "paths.results", "is the folder of paths.state too"),
        ("{results: x, state: x}", "paths.state", "is the folder of paths.results too"),
        ("{artifacts: results}", "paths.artifacts", "is the folder of paths.results too"),
        ("{results: ./other/../.orch}", "paths.results", "is the folder of paths.state too"),
    ],
)
def test_folders_that_overlap_are_refused_naming_the_path_to_move(
    config: Path, paths: str, field: str, said: str
) -> None:
    config.write_text(CONFIG + f"paths: {paths}\n")
    ran = orchctl("validate", config)
    assert ran.code == 2, ran.out
    problem = next(line for line in ran.out_lines if f": {field}: " in line)
    assert problem.startswith(f"{config}:{len(CONFIG.splitlines()) + 1}:")
    assert said in problem and "(hint: " in problem, problem


def test_folders_side_by_side_or_in_the_state_folder_are_fine(config: Path) -> None:
    for paths in ("{spool: ., results: results}", "{results: .orch/results}", "{state: ./s}"):
        config.write_text(CONFIG + f"paths: {paths}\n")
        ran = orchctl("validate", config)
        assert (ran.code, ran.out_lines) == (0, [f"{config}: ok"]), (paths, ran.out)


def test_a_link_to_another_paths_folder_is_the_same_folder(config: Path) -> None:
    (config.parent / "results").mkdir()
    (config.parent / "also").symlink_to(config.parent / "results")
    config.write_text(CONFIG + "paths: {state: also}\n")
    ran = orchctl("validate", config)
    assert ran.code == 2 and "is the folder of paths.results too" in ran.out, ran.out


@pytest.mark.parametrize(
    ("written", "said", "hint"),
    [
        ("010", "010 is read as an octal number (YAML 1.1: a leading zero), 8", "write 10"),
        ("1:00", "1:00 is read as a base-60 number (YAML 1.1), 60", "write 60"),
        ("0x10", "0x10 is read as a hexadecimal number, 16", "write 16"),
        ("0b11", "0b11 is read as a binary number, 3", "write 3"),
        ("1_000", "1_000 is read as a number with _ separators, 1000", "write 1000"),
    ],
)
def test_numbers_yaml_would_convert_are_refused_not_taken_as_another_number(
    config: Path, written: str, said: str, hint: str
) -> None:
    """Values are taken as written: a zero-padded seed was silently another seed."""
    t = task_file(config.parent, f"model: m1\nprompt: hi\nmax_tokens: 5\nseed: {written}\n")
    ran = orchctl("validate", "--config", config, t)
    assert ran.code == 2
    assert ran.out_lines[1].startswith(f"{t}:4:7: seed: {said}, not as written (hint: {hint}")
    config.write_text(
        CONFIG.replace("observer: simulated", f"observer: simulated, poll_s: {written}")
    )
    ran = orchctl("validate", config)
    assert ran.code == 2 and f"gpus.poll_s: {said}" in ran.out, ran.out


def test_plain_numbers_and_quoted_text_are_as_before(config: Path) -> None:
    for seed in ("0", "10", "-3", "00", "1.5e3"):
        t = task_file(config.parent, f"model: m1\nprompt: hi\nmax_tokens: 5\nseed: {seed}\n")
        ran = orchctl("validate", "--config", config, t)
        assert "not as written" not in ran.out, (seed, ran.out)
    t = task_file(config.parent, "model: m1\nprompt: hi\nmax_tokens: '010'\n")
    ran = orchctl("validate", "--config", config, t)
    assert "(got the text '010': quoted, so not a number) (hint: write it without" in ran.out


def test_an_unquoted_value_yaml_reads_as_text_or_a_date_is_said_so_not_called_quoted(
    config: Path,
) -> None:
    t = task_file(config.parent, "model: m1\nprompt: hi\nmax_tokens: 1e3\n")
    ran = orchctl("validate", "--config", config, t)
    assert ran.out_lines[1] == (
        f"{t}:3:13: max_tokens: should be a valid integer (got '1e3', which YAML reads as "
        "text, not a number) (hint: write it as a plain whole number: 1000)"
    )
    # the form offered for a decimal is one YAML 1.1 reads as a number: a dot, a signed exponent
    t = task_file(config.parent, "model: m1\nprompt: hi\nmax_tokens: 4\nsampling: {top_p: 5e-1}\n")
    ran = orchctl("validate", "--config", config, t)
    assert ran.out_lines[1].endswith(
        "(hint: write it with a dot and a signed exponent (5.0e-01) or plainly (0.5))"
    ), ran.out
    t = task_file(
        config.parent, "model: m1\nprompt: hi\nmax_tokens: 4\nsampling: {top_p: 5.0e-01}\n"
    )
    assert orchctl("validate", "--config", config, t).code == 0
    t = task_file(config.parent, "task_id: 2024-01-01\nmodel: m1\nprompt: hi\nmax_tokens: 5\n")
    ran = orchctl("validate", "--config", config, t)
    assert ran.out_lines[1] == (
        f"{t}:1:10: task_id: should be a valid string (got 2024-01-01, which YAML reads as a "
        'date) (hint: quote it to keep it as text: "2024-01-01")'
    )


def test_a_yes_or_on_yaml_reads_as_a_boolean_is_said_so_not_shown_as_true(config: Path) -> None:
    """YAML 1.1 reads yes/no/on/off as booleans: `max_tokens: on` was 'got True' with a hint
    that did not apply."""
    t = task_file(config.parent, "model: m1\nprompt: hi\nmax_tokens: on\n")
    ran = orchctl("validate", "--config", config, t)
    assert ran.out_lines[1] == (
        f"{t}:3:13: max_tokens: should be a valid integer (got on, which YAML reads as the "
        "boolean true) (hint: write a whole number)"
    )
    t = task_file(config.parent, "task_id: no\nmodel: m1\nprompt: hi\nmax_tokens: 5\n")
    ran = orchctl("validate", "--config", config, t)
    assert ran.out_lines[1] == (
        f"{t}:1:10: task_id: should be a valid string (got no, which YAML reads as the "
        'boolean false) (hint: quote it to keep it as text: "no")'
    )


def test_a_network_bind_without_a_token_fails_validate_as_it_fails_serve(
    config: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("AUTH_TOKEN", raising=False)
    config.write_text(CONFIG + 'server: {bind: "0.0.0.0:8080"}\n')
    ran = orchctl("validate", config)
    assert ran.code == 2
    assert ran.out_lines == [
        f"{config}:{len(CONFIG.splitlines()) + 1}:16: server.bind: 0.0.0.0 is reachable from "
        "the network, but no API token is set (hint: export AUTH_TOKEN=$(openssl rand -hex 24) "
        "(or set auth.token_file), or bind 127.0.0.1 and use an SSH tunnel (docs/security.md))"
    ]
    monkeypatch.setenv("AUTH_TOKEN", "0123456789abcdef0123")
    assert orchctl("validate", config).out_lines == [f"{config}: ok"]
    # a token too short names where it came from, and how to make one
    monkeypatch.setenv("AUTH_TOKEN", "short")
    config.write_text(CONFIG + 'server: {bind: "0.0.0.0:8080"}\nauth: {token_env: AUTH_TOKEN}\n')
    ran = orchctl("validate", config)
    assert ran.code == 2
    assert ran.out_lines == [
        f"{config}:{len(CONFIG.splitlines()) + 2}:19: auth.token_env: the API token in "
        "$AUTH_TOKEN is 5 characters: it must be at least 16 printable ASCII characters "
        "without spaces (HTTP clients send no other) (hint: make one with `openssl rand -hex 24`)"
    ]
    # with no auth: section at all, no line of the file is at fault: none is named
    config.write_text(CONFIG + 'server: {bind: "0.0.0.0:8080"}\n')
    ran = orchctl("validate", config)
    assert ran.code == 2 and ran.out_lines[0].startswith(
        f"{config}: auth.token_env: the API token in $AUTH_TOKEN is 5 characters"
    ), ran.out_lines


def test_the_rename_hint_keeps_the_files_own_suffix(config: Path) -> None:
    t = task_file(
        config.parent, '{"model": "m1", "prompt": "hi", "max_tokens": 5}', "sp ace.task.json"
    )
    ran = orchctl("validate", "--config", config, t)
    assert ran.code == 2
    assert "(hint: rename the file to sp-ace.task.json, or add `task_id: sp-ace`)" in ran.out


def test_a_split_is_suggested_only_over_gpus_whose_shares_fit() -> None:
    from reconciler import preflight

    room = {0: 23644, 1: 11776, 2: 23644}
    assert preflight._split_that_fits(40000, room) == [0, 2]  # 20,000 each: not GPU 1
    even = {0: 20000, 1: 20000, 2: 20000}
    assert preflight._split_that_fits(50000, even) == [0, 1, 2]  # two would need 25,000
    assert preflight._split_that_fits(30000, {0: 23644, 1: 11776}) is None


def test_a_folder_of_paths_that_serve_could_not_use_is_an_error_at_its_key(
    tmp_path: Path,
) -> None:
    """validate said ok to `results:` naming a file; serve then stopped with a bare
    'File exists' naming no key of orch.yaml."""
    (tmp_path / "afile").write_text("x")
    p = tmp_path / "orch.yaml"
    p.write_text(CONFIG + "paths: {results: afile, spool: afile/below}\n")
    ran = orchctl("validate", p)
    assert ran.code == 2, ran.out
    assert (
        f"{p}:9:18: paths.results: {tmp_path}/afile is a file, not a folder "
        "(hint: choose another path, or move the file away)"
    ) in ran.out_lines, ran.out
    assert (
        f"{p}:9:32: paths.spool: {tmp_path}/afile/below cannot be made: {tmp_path}/afile on "
        "the way to it is a file (hint: choose another path, or move that file away)"
    ) in ran.out_lines, ran.out


def test_a_file_where_serve_makes_a_spool_or_state_folder_is_an_error(tmp_path: Path) -> None:
    """validate said ok with spool/incoming a file; serve then refused to start."""
    p = tmp_path / "orch.yaml"
    p.write_text(CONFIG)
    (tmp_path / "spool").mkdir()
    (tmp_path / "spool" / "incoming").write_text("x")
    (tmp_path / ".orch").mkdir()
    (tmp_path / ".orch" / "sessions").write_text("x")
    ran = orchctl("validate", p)
    assert ran.code == 2, ran.out
    assert f"{tmp_path}/spool/incoming is a file, not a folder" in ran.out, ran.out
    assert f"{tmp_path}/.orch/sessions is a file, not a folder" in ran.out, ran.out


@pytest.mark.parametrize(
    ("flags", "named", "fix"),
    [
        ('["-np", "4"]', "'-np'", "set the pool's slots:"),
        ('["--host", "0.0.0.0"]', "'--host'", "loopback port"),
        ('["--port=1"]', "'--port=1'", "loopback port"),
        ('["-fa", "on", "-ngl", "0"]', "'-ngl'", "GPUs only"),
        ('["-c", "8192"]', "'-c'", "set the pool's ctx:"),
        # several at once: all named in one round, each fix once
        ('["-m", "x.gguf", "-ngl", "10"]', "s '-m', '-ngl'", "GPUs only"),
    ],
)
def test_a_llamacpp_flag_the_daemon_sets_itself_is_refused(
    tmp_path: Path, flags: str, named: str, fix: str
) -> None:
    """Given again in flags: it would win (llama-server takes the last value): an engine
    listening on the network, or more slots and less context than the daemon plans for."""
    p = tmp_path / "orch.yaml"
    p.write_text(
        CONFIG.replace(
            "engine: sim, model: m1, max_tokens: 100",
            f"engine: llamacpp, model: m1, flags: {flags}",
        )
    )
    ran = orchctl("validate", p)
    assert ran.code == 2, ran.out
    line = next(x for x in ran.out_lines if "pools[0].flags" in x)
    single = f"flag {named} is one llama-orch sets itself"
    several = f"flag{named} are ones llama-orch sets itself"
    assert (single in line or several in line) and fix in line, line


def test_engine_options_the_pools_engine_never_reads_are_warned_of(tmp_path: Path) -> None:
    p = tmp_path / "orch.yaml"
    p.write_text(
        CONFIG.replace(
            "engine: sim, model: m1, max_tokens: 100", "engine: llamacpp, model: m1, sim: {}"
        ).replace("engine: sim, model: m2", 'engine: sim, model: m2, flags: ["-fa", "on"]')
    )
    ran = orchctl("validate", p)
    assert "warning: pools[0].sim: sim: holds options of the sim engine; this pool runs " in ran.out
    assert "warning: pools[1].flags: flags: the sim engine takes no command-line flags" in ran.out


def test_an_empty_ref_is_an_error_and_a_folder_ref_is_said_to_be_a_folder(tmp_path: Path) -> None:
    (tmp_path / "models").mkdir()
    p = tmp_path / "orch.yaml"
    p.write_text(
        f"gpus: {{observer: simulated, inventory: {INVENTORY}}}\n"
        'models:\n  a: {ref: ""}\n  b: {ref: "file:models"}\n  c: {ref: "file:"}\n'
        "pools:\n  - {id: pb, engine: llamacpp, model: b}\n"
    )
    ran = orchctl("validate", p)
    assert ran.code == 2
    assert any(":3:12: models.a.ref: should have at least 1 character" in x for x in ran.out_lines)
    assert any(":5:12: models.c.ref: 'file:' names no file after file:" in x for x in ran.out_lines)
    assert any(
        f"models.b.ref: {tmp_path}/models is a folder, not a model file" in x for x in ran.out_lines
    ), ran.out


def test_a_task_file_not_named_as_one_is_told_its_name_not_checked_as_an_orch_yaml(
    config: Path,
) -> None:
    """plain.yaml holding a task: checked as the task it is (not as an orch.yaml, "unknown
    key 'model'"), and told that dropped as it is named it would be refused."""
    plain = config.parent / "plain.yaml"
    plain.write_text("model: m1\nprompt: hi\nmax_tokens: 3\n")
    ran = orchctl("validate", "--config", config, plain)
    assert ran.code == 2
    [line] = [x for x in ran.out_lines if x.startswith(f"{plain}:")]
    assert "this is a task file" in line and "rename it to plain.task.yaml" in line, line
    assert "unknown key" not in ran.out
    plain.write_text("model: m1\nprompt: hi\nmax_tokens: nine\n")  # its task errors too
    ran = orchctl("validate", "--config", config, plain)
    assert "max_tokens: should be a valid integer" in ran.out, ran.out


def test_data_folders_others_may_read_are_warned_of_when_a_token_guards_the_api(
    config: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The token keeps task prompts and answers from other callers; folders other users may
    read give them away all the same (umask 022 makes them so)."""
    monkeypatch.setenv("AUTH_TOKEN", "0123456789abcdef0123")
    results_dir = config.parent / "results"
    results_dir.mkdir(exist_ok=True)
    results_dir.chmod(0o755)
    ran = orchctl("validate", config)
    assert ran.code == 0, ran.out
    assert f"warning: paths.results: {results_dir} may be read by other users (mode 755)" in (
        ran.out
    ), ran.out
    results_dir.chmod(0o750)
    assert "paths.results" not in orchctl("validate", config).out


def test_a_file_name_that_is_not_utf8_is_printed_escaped_on_every_line(tmp_path: Path) -> None:
    """The path before the message carried the raw byte (a UTF-8 reader of the output
    fails on it) while the id in the same line was escaped; `\\xe9` everywhere now."""
    folder = os.fsencode(tmp_path)
    bad = os.fsdecode(folder + b"/caf\xe9.task.yaml")
    good = os.fsdecode(folder + b"/\xe9t\xe9.task.yaml")
    Path(bad).write_text('task_id: cafe\nmodel: m1\nprompt: "x"\nmax_tokens: 4\nextra: 1\n')
    Path(good).write_text('task_id: ete\nmodel: m1\nprompt: "x"\nmax_tokens: 4\n')
    for path, code in ((bad, 2), (good, 0)):
        ran = orchctl_process("validate", path)
        assert ran.code == code, ran.out + ran.err
        assert "\ufffd" not in ran.out and "\\xe9" in ran.out, ran.out
