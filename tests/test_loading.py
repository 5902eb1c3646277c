"""Every class of bad input gets an error naming the file, line and field, and a fix."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
from hypothesis import example, given, settings

from plugins import gpu_simulated
from reconciler import clocks, configuring
from state import desired, loading, parsing, tasks
from tests import hostile

GOOD_TASK = "task_id: t1\nmodel: m\nprompt: hi\nmax_tokens: 4\n"


def _task(
    tmp_path: Path, text: str | bytes, name: str = "t.task.yaml"
) -> loading.Loaded[tasks.TaskFile]:
    path = tmp_path / name
    path.write_bytes(text.encode() if isinstance(text, str) else text)
    return loading.load_model(path, tasks.TaskFile)


def test_a_good_task_file_loads(tmp_path: Path) -> None:
    loaded = _task(tmp_path, GOOD_TASK)
    assert loaded.value is not None and loaded.errors == []
    assert loaded.value.priority == "batch"


def test_an_unknown_key_names_its_line_and_suggests_the_nearest_key(tmp_path: Path) -> None:
    loaded = _task(tmp_path, GOOD_TASK + "max_tokns: 5\n")
    [err] = loaded.errors
    assert (err.line, err.column, err.field) == (5, 1, "max_tokns")
    assert "unknown key" in err.message
    assert err.hint == "did you mean 'max_tokens'?"
    assert str(err).startswith(f"{tmp_path / 't.task.yaml'}:5:1: max_tokns: unknown key")


def test_a_wrong_type_names_the_field_and_the_value(tmp_path: Path) -> None:
    loaded = _task(tmp_path, "model: m\nprompt: hi\nmax_tokens: lots\n")
    [err] = loaded.errors
    assert err.field == "max_tokens" and err.line == 3
    assert "'lots'" in err.message


@pytest.mark.parametrize(
    ("text", "words", "never"),
    [
        ("just a string\n", "must be a mapping of keys to values, but is a text", "str"),
        ("42\n", "must be a mapping of keys to values, but is a number", "int"),
        (GOOD_TASK + "priority: null\n", "(got null)", "None"),
        (GOOD_TASK + f"stop: {list(map(str, range(17)))}\n", "at most 16 items, not 17", "after"),
    ],
)
def test_messages_speak_yaml_not_python(tmp_path: Path, text: str, words: str, never: str) -> None:
    """A user writes YAML: "a text", "a number" and null, not str, int and None, and no
    "after validation", a step of the validator's own."""
    [err] = _task(tmp_path, text).errors
    assert words in err.message and never not in err.message, err.message


@pytest.mark.parametrize(
    ("text", "line", "column", "words"),
    [
        (
            "model: m\nprompt: [hi, there\n",
            2,
            9,
            "ends before the [ list opened at line 2, column 9",
        ),
        ("model: m\nlabels: {a: b\n\n\n", 2, 9, "the { mapping opened at line 2, column 9"),
        ('model: m\nprompt: "hi\n', 2, 9, "the quoted string opened at line 2, column 9"),
        ("model: m\nprompt: [hi", 2, 9, "the [ list opened"),  # no newline at the end
        ("model: [\n", 1, 8, "the [ list opened at line 1, column 8"),  # nothing after it
    ],
)
def test_an_unclosed_bracket_or_quote_is_placed_where_it_opened_not_past_the_end(
    tmp_path: Path, text: str, line: int, column: int, words: str
) -> None:
    [err] = _task(tmp_path, text).errors
    lines = text.count("\n") + (0 if text.endswith("\n") else 1)
    assert (err.line, err.column) == (line, column) and err.line <= lines, err
    assert words in err.message and err.hint == "close it, or remove what opened it", err


def test_a_tab_is_named_as_one(tmp_path: Path) -> None:
    [err] = _task(tmp_path, "model: m\nlabels:\n\ta: b\n").errors
    assert (err.line, err.column) == (3, 1)
    assert "a tab, which YAML does not accept" in err.message and "spaces" in (err.hint or "")


@pytest.mark.parametrize(
    ("text", "field", "kind"),
    [
        ('version: "1"\n', "version", "number"),
        ("version: 1\nqueue: {capacity: '64'}\n", "queue.capacity", "number"),
        (
            'version: 1\nauth: {optional_on_loopback: "false"}\n',
            "auth.optional_on_loopback",
            "true/false",
        ),
    ],
)
def test_a_quoted_number_or_flag_says_the_quotes_made_it_text(
    tmp_path: Path, text: str, field: str, kind: str
) -> None:
    path = tmp_path / "orch.yaml"
    path.write_text(text)
    errors = desired.load_desired(path).errors
    [err] = [e for e in errors if e.field == field] or [None]
    assert err is not None, errors
    assert f"quoted, so not a {kind})" in err.message, err
    assert err.hint == "write it without the quotes"


def test_malformed_yaml_reports_the_line(tmp_path: Path) -> None:
    loaded = _task(tmp_path, "model: m\nprompt: [unclosed\nmax_tokens: 3\n")
    [err] = loaded.errors
    assert err.line is not None and err.line >= 2
    assert "not valid YAML" in err.message


def test_malformed_json_reports_line_and_column(tmp_path: Path) -> None:
    loaded = _task(tmp_path, '{"model": "m",\n "prompt": "x",,\n}', name="t.task.json")
    [err] = loaded.errors
    assert err.line == 2 and "not valid JSON" in err.message


def test_invalid_utf8_reports_the_line_of_the_bad_byte(tmp_path: Path) -> None:
    loaded = _task(tmp_path, b"model: m\nprompt: caf\xe9\nmax_tokens: 3\n")
    [err] = loaded.errors
    assert err.line == 2 and "not valid UTF-8" in err.message
    assert err.hint == "save the file as UTF-8"


def test_a_huge_file_is_refused_without_reading_it(tmp_path: Path) -> None:
    loaded = _task(tmp_path, "prompt: " + "x" * (loading.MAX_FILE_BYTES + 10) + "\n")
    [err] = loaded.errors
    assert "over the limit" in err.message


def test_a_symlink_is_refused(tmp_path: Path) -> None:
    real = tmp_path / "real.yaml"
    real.write_text(GOOD_TASK)
    (tmp_path / "link.task.yaml").symlink_to(real)
    loaded = loading.load_model(tmp_path / "link.task.yaml", tasks.TaskFile)
    assert "symbolic link" in loaded.errors[0].message


def test_a_task_id_with_path_tricks_is_refused(tmp_path: Path) -> None:
    for bad in ("../../etc/passwd", "a/b", "..", "x\ny"):
        loaded = _task(tmp_path, f"task_id: {bad!r}\nmodel: m\nprompt: hi\nmax_tokens: 1\n")
        assert loaded.value is None and loaded.errors[0].field == "task_id", bad


def test_an_empty_file_says_what_it_should_contain(tmp_path: Path) -> None:
    [err] = _task(tmp_path, "").errors
    assert "must be a mapping" in err.message and "prompt" in (err.hint or "")


def test_a_task_needs_a_model_or_a_pool(tmp_path: Path) -> None:
    [err] = _task(tmp_path, "prompt: hi\nmax_tokens: 2\n").errors
    assert "model" in err.message


CONFIG = """\
version: 1
models:
  m1: {ref: "file:m1.gguf", size_mib: 100}
pools:
  - id: p1
    engine: sim
    model: m1
    replicas: 1
"""


def test_a_typo_in_orch_yaml_names_the_line_and_the_nearest_key(tmp_path: Path) -> None:
    path = tmp_path / "orch.yaml"
    path.write_text(CONFIG.replace("    replicas: 1", "    replcas: 1"))
    [err] = desired.load_desired(path).errors
    assert (err.line, err.field) == (8, "pools[0].replcas")
    assert err.hint == "did you mean 'replicas'?"


def test_a_pool_naming_an_unknown_model_is_located(tmp_path: Path) -> None:
    path = tmp_path / "orch.yaml"
    path.write_text(CONFIG.replace("model: m1", "model: m2"))
    [err] = desired.load_desired(path).errors
    assert err.field == "pools[0].model" and err.line == 7
    assert "'m2'" in err.message and "m1" in err.message


def test_an_unknown_engine_is_reported_with_the_installed_ones(tmp_path: Path) -> None:
    path = tmp_path / "orch.yaml"
    path.write_text(CONFIG.replace("engine: sim", "engine: vllm"))
    [err] = desired.load_desired(path, known_engines={"sim", "llamacpp"}).errors
    assert err.field == "pools[0].engine" and err.line == 6
    assert "llamacpp, sim" in (err.hint or "")


def test_simulated_observer_needs_an_inventory(tmp_path: Path) -> None:
    path = tmp_path / "orch.yaml"
    path.write_text(CONFIG + "gpus: {observer: simulated}\n")
    [err] = desired.load_desired(path).errors
    assert "inventory" in err.message


# -- hostile input: bounded, located, never a Python error ----------------------------------


HOSTILE_SMALL = {
    "deep.task.json": "[" * 900 + "]" * 900,
    "deeper.task.json": "[" * 100_000 + "]" * 100_000,
    "flow.task.yaml": "prompt: " + "[" * 3000 + "]" * 3000 + "\n",
    "indented.task.yaml": "".join(f"{' ' * i}k{i}:\n" for i in range(700)),
    "digits.task.yaml": "model: m\nprompt: hi\nmax_tokens: " + "9" * 5000 + "\n",
    "digits.task.json": '{"model": "m", "prompt": "hi",\n "max_tokens": ' + "9" * 5000 + "}",
    "sexagesimal.task.yaml": "model: m\nprompt: hi\nmax_tokens: 1" + ":59" * 50_000 + "\n",
    "date.task.yaml": "model: m\nprompt: hi\nmax_tokens: 3\nseed: 2024-13-45\n",
}


@pytest.mark.parametrize("name", sorted(HOSTILE_SMALL))
def test_hostile_nesting_and_numbers_are_invalid_with_a_line_and_a_hint(
    tmp_path: Path, name: str
) -> None:
    loaded = _task(tmp_path, HOSTILE_SMALL[name], name=name)
    assert loaded.value is None and loaded.errors
    first = loaded.errors[0]
    assert first.line is not None and first.hint, first
    assert "Error" not in first.message, first  # not a Python exception's text


def test_a_too_deep_file_says_how_deep_is_allowed(tmp_path: Path) -> None:
    [err] = _task(tmp_path, "prompt: " + "[" * 40 + "]" * 40 + "\n").errors
    assert (err.line, err.column) == (1, 8 + parsing.MAX_DEPTH)  # the root mapping is one
    assert f"more than {parsing.MAX_DEPTH} levels deep" in err.message


def test_a_repeated_key_names_both_lines(tmp_path: Path) -> None:
    text = "task_id: a\nmodel: m\nprompt: hi\nmax_tokens: 4\ntask_id: a-second\nmax_tokens: 5\n"
    first, second = _task(tmp_path, text).errors
    assert (first.line, first.field) == (5, "task_id") and "of line 1" in first.message
    assert (second.line, second.field) == (6, "max_tokens") and "of line 4" in second.message
    assert "repeats the key" in first.message and first.hint


def test_a_repeated_key_in_json_names_both_lines(tmp_path: Path) -> None:
    text = '{"task_id": "j",\n "model": "m", "prompt": "hi", "max_tokens": 2,\n "task_id": "k"}'
    [err] = _task(tmp_path, text, name="t.task.json").errors
    assert (err.line, err.field) == (3, "task_id") and "of line 1" in err.message


def test_keys_that_become_one_dict_key_are_repeated_keys(tmp_path: Path) -> None:
    text = "model: m\nprompt: hi\nmax_tokens: 4\nlabels:\n  1: a\n  0x1: b\n"
    repeated, converted = _task(tmp_path, text).errors  # (0x1 is 1: hexadecimal, too)
    assert (repeated.line, repeated.field) == (6, "labels.0x1") and "of line 5" in repeated.message
    assert converted.line == 6 and "0x1 is read as a hexadecimal number, 1" in converted.message


def test_a_merge_key_is_refused(tmp_path: Path) -> None:
    [err] = _task(tmp_path, "model: m\nprompt: hi\n<<: {max_tokens: 4}\nmax_tokens: 5\n").errors
    assert err.line == 3 and "merge key" in err.message


def test_a_pool_key_given_twice_in_orch_yaml_keeps_the_last_good_config(tmp_path: Path) -> None:
    path = tmp_path / "orch.yaml"
    path.write_text(CONFIG)
    applied = configuring.AppliedConfig(path, {"sim"}, clocks.FakeClock())
    assert applied.refresh(settle=False) and applied.state is not None
    path.write_text(CONFIG.replace("    replicas: 1\n", "    replicas: 1\n    replicas: 0\n"))

    assert applied.refresh(settle=False) is False
    assert applied.state.pools[0].replicas == 1
    [err] = applied.errors
    assert (err.line, err.field) == (9, "pools[0].replicas") and "of line 8" in err.message


def test_a_key_given_twice_in_an_inventory_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "inventory.yaml"
    path.write_text("gpus:\n  - index: 0\n    name: A\n    uuid: a\n    vram_total_mib: 10\n")
    path.write_text(path.read_text() + "    vram_total_mib: 20\n")
    with pytest.raises(gpu_simulated.InventoryError) as caught:
        gpu_simulated.load_inventory(path)
    [err] = caught.value.errors
    assert (err.line, err.field) == (6, "gpus[0].vram_total_mib") and "of line 5" in err.message


def test_thousands_of_problems_are_listed_as_twenty_and_a_count(tmp_path: Path) -> None:
    keys = "".join(f"k{i}: 1\n" for i in range(4000))
    errors = _task(tmp_path, GOOD_TASK + keys).errors
    assert len(errors) == parsing.MAX_PROBLEMS + 1
    assert errors[0].line == 5 and errors[0].hint
    assert errors[-1].message == f"and {4000 - parsing.MAX_PROBLEMS:,} more problems not listed"


MIB = 1024 * 1024 - 64
HOSTILE = {
    "brackets.task.yaml": "[" * MIB,
    "keys.task.yaml": "".join(f"k{i:07d}: 1\n" for i in range(MIB // 12)),
    "some-keys.task.yaml": GOOD_TASK + "".join(f"k{i}: 1\n" for i in range(4900)),
    "items.task.yaml": GOOD_TASK + "labels: [" + "0," * (MIB // 2 - 10) + "0]\n",
    "items.task.json": '{"labels": [' + '"a",' * (MIB // 4 - 10) + '"a"]}',
    "keys.task.json": "{" + "".join(f'"k{i:07d}": 1,' for i in range(MIB // 14)) + '"k": 1}',
    "repeats.task.json": '{"max_tokens": 1' + ', "max_tokens": 1' * (MIB // 17 - 1) + "}",
    "numbers.task.yaml": GOOD_TASK + "x: 1" + ":59" * (MIB // 3 - 20) + "\n",
}


@pytest.mark.parametrize("name", sorted(HOSTILE))
def test_a_hostile_mebibyte_is_refused_in_well_under_a_second(tmp_path: Path, name: str) -> None:
    began = time.perf_counter()
    loaded = _task(tmp_path, HOSTILE[name], name=name)
    elapsed = time.perf_counter() - began
    assert loaded.value is None and loaded.errors[0].hint
    assert elapsed < 1.0, f"{name}: {elapsed:.2f} s"


@pytest.mark.parametrize(
    ("devices", "expected"),
    [
        ("banana", "pools[0].devices: should be 'auto' or a valid list (got 'banana')"),
        ("[0, x]", "pools[0].devices[1]: should be a valid integer (got 'x')"),
    ],
)
def test_union_errors_read_as_one_plain_sentence(
    tmp_path: Path, devices: str, expected: str
) -> None:
    path = tmp_path / "orch.yaml"
    path.write_text(
        "version: 1\nmodels: {m: {ref: 'file:m.gguf'}}\n"
        f"pools:\n  - id: p\n    engine: sim\n    model: m\n    devices: {devices}\n"
    )
    loaded = desired.load_desired(path, known_engines={"sim"})
    texts = [str(e) for e in loaded.errors]
    assert len(texts) == 1 and f"{expected} (hint: " in texts[0], texts
    assert not any(w in texts[0] for w in ("literal[", "Input should", "unable to parse"))


def test_a_model_level_error_is_plain_and_shows_no_repr(tmp_path: Path) -> None:
    loaded = _task(tmp_path, "prompt: hi\nmax_tokens: 2\n")
    [error] = loaded.errors
    assert "Value error" not in str(error) and "got a mapping" not in str(error)
    assert "a task names 'model: <model id>' or 'pool: <pool id>'" in str(error)


@settings(max_examples=hostile.examples(300, 3000), deadline=None)
@given(raw=hostile.task_files())
@example(raw=b'{"model": "m", "prompt": "a", "model": "n"}')  # repeated key: json keeps one
@example(raw=b'{"model": "m", "prompt": "a", "max_tokens": 1' + b"0" * 200 + b"}")
@example(raw=b'{"model": "m", "prompt": "a"} {}')  # extra data
@example(raw=b"[" * 40 + b"]" * 40)
def test_a_task_file_parsed_without_its_tree_loads_and_fails_the_same(raw: bytes) -> None:
    # the daemon parses task files with tree=False (the node tree only where it is needed);
    # a hostile file must get the same value, or the same located problems, as with the tree
    text = raw.decode("utf-8", errors="replace")
    whole = loading.validate_text(text, tasks.TaskFile, shown="t.task.json", is_json=True)
    lazy = loading.validate_text(
        text, tasks.TaskFile, shown="t.task.json", is_json=True, tree=False
    )
    assert [e.as_dict() for e in lazy.errors] == [e.as_dict() for e in whole.errors]
    assert lazy.value == whole.value


def test_a_clean_small_task_file_is_parsed_without_building_its_tree(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    built: list[str] = []
    real = parsing._json_tree
    monkeypatch.setattr(parsing, "_json_tree", lambda t, s: built.append(s) or real(t, s))
    good = json.dumps(hostile.GOOD_TASK)
    loaded = loading.validate_text(good, tasks.TaskFile, shown="a", is_json=True, tree=False)
    assert loaded.value is not None and built == []
    # one with a problem of its own is located from the tree, built for it
    bad = good.replace('"max_tokens": 4', '"max_tokens": "four"')
    loaded = loading.validate_text(bad, tasks.TaskFile, shown="b", is_json=True, tree=False)
    assert built == ["b"]
    assert [(e.line, e.field) for e in loaded.errors] == [(1, "max_tokens")]


@pytest.mark.parametrize(
    ("value", "shown"), [('"4"', "'4'"), ("true", "(got true)"), ("4.0", "4.0"), ('"8k"', "'8k'")]
)
def test_a_number_given_as_text_or_a_boolean_is_refused_not_converted(
    tmp_path: Path, value: str, shown: str
) -> None:
    loaded = _task(tmp_path, f"model: m\nprompt: hi\nmax_tokens: {value}\n")
    assert loaded.value is None
    first = loaded.errors[0]
    assert (first.line, first.field) == (3, "max_tokens") and shown in first.message, first


@pytest.mark.parametrize(
    ("bind", "said"),
    [
        ("127.0.0.1:99999", "over 65535"),
        ("garbage", "is not host:port"),
        ("127.0.0.1:-1", "is not host:port"),
        (":8080", "is not host:port"),
        ("127.0.0.1:８０", "is not host:port"),
    ],
)
def test_a_server_bind_serve_could_not_listen_on_is_located(
    tmp_path: Path, bind: str, said: str
) -> None:
    path = tmp_path / "orch.yaml"
    path.write_text(f"server:\n  bind: {json.dumps(bind)}\n" + CONFIG)
    [err] = desired.load_desired(path).errors
    assert (err.line, err.field) == (2, "server.bind") and said in err.message, err
    assert "127.0.0.1:8080" in err.message


@pytest.mark.parametrize("bind", ["127.0.0.1:0", "[::1]:8080", "0.0.0.0:65535", "localhost:80"])
def test_a_good_server_bind_loads(tmp_path: Path, bind: str) -> None:
    path = tmp_path / "orch.yaml"
    path.write_text(f"server:\n  bind: {json.dumps(bind)}\n" + CONFIG)
    assert desired.load_desired(path).errors == []


@pytest.mark.parametrize(
    ("text", "line", "said"),
    [
        ("model: m\nprompt: !!binary aGVsbG8=\nmax_tokens: 2\n", 2, "'!!binary'"),
        ("model: m\nprompt: hi\nmax_tokens: 2\nstop: !!set {a, b}\n", 4, "'!!set'"),
        ("model: m\nprompt: hi\nmax_tokens: 2\nlabels: !!omap [{a: b}]\n", 4, "'!!omap'"),
        ("model: m\nmax_tokens: 2\n", 1, "this has neither"),
        (
            "model: m\nprompt: hi\nmessages: [{role: user, content: x}]\nmax_tokens: 2\n",
            1,
            "not both",
        ),
    ],
)
def test_values_that_are_not_plain_data_or_missing_say_exactly_that(
    tmp_path: Path, text: str, line: int, said: str
) -> None:
    [err] = _task(tmp_path, text).errors
    assert err.line == line and said in err.message, err


def test_a_missing_file_and_a_folder_get_hints_that_fit_them(tmp_path: Path) -> None:
    [missing] = loading.load_model(tmp_path / "nope.yaml", tasks.TaskFile).errors
    assert (
        "No such file" in missing.message
        and missing.hint == "check the path: no file has that name"
    )
    (tmp_path / "d.yaml").mkdir()
    [folder] = loading.load_model(tmp_path / "d.yaml", tasks.TaskFile).errors
    assert "is a folder" in folder.message and "not a folder" in (folder.hint or "")


CHAT = "task_id: c1\nmodel: m\nmax_tokens: 4\nmessages: [{role: user, content: hi}]\n"
TOOL = "tools: [{type: function, function: {name: get_weather}}]\n"


@pytest.mark.parametrize(
    ("extra", "field", "words"),
    [
        ("tool_choice: required\n", "tool_choice", "'required' needs at least one tool"),
        (
            TOOL + "tool_choice: {type: function, function: {name: nope}}\n",
            "tool_choice",
            "names the tool 'nope', which is not in tools (given: 'get_weather')",
        ),
    ],
)
def test_a_tool_choice_no_tool_can_meet_is_refused_in_a_task_file_too(
    tmp_path: Path, extra: str, field: str, words: str
) -> None:
    """As on the OpenAI route: not accepted, then ignored (or failed) at run time."""
    errors = _task(tmp_path, CHAT + extra).errors
    assert errors and words in errors[0].message, errors
    assert _task(tmp_path, CHAT + TOOL + "tool_choice: required\n").errors == []


def test_tool_call_arguments_that_are_not_json_are_kept_and_sent_on_as_json_text(
    tmp_path: Path,
) -> None:
    """A call cut by max_tokens mid-arguments comes back in the next turn as it was given:
    accepted, kept word for word, and sent on as a JSON string of the text (the engine's
    template parses earlier calls' arguments and fails on text that is not JSON)."""
    text = (
        "task_id: c2\nmodel: m\nmax_tokens: 4\nmessages:\n"
        "  - {role: user, content: hi}\n"
        "  - role: assistant\n"
        '    tool_calls: [{id: c1, function: {name: w, arguments: \'{"city": "Os\'}}]\n'
        "  - {role: tool, tool_call_id: c1, content: rain}\n"
    )
    loaded = _task(tmp_path, text)
    assert loaded.errors == [] and loaded.value is not None
    [message] = [m for m in loaded.value.messages or [] if m.tool_calls]
    assert message.tool_calls is not None
    assert message.tool_calls[0].function.arguments == '{"city": "Os'
    [sent] = [m for m in loaded.value.chat_json()["messages"] if "tool_calls" in m]
    assert json.loads(sent["tool_calls"][0]["function"]["arguments"]) == '{"city": "Os'
    whole = _task(tmp_path, text.replace('\'{"city": "Os\'', '\'{"city": "Oslo"}\''))
    assert whole.value is not None
    [sent] = [m for m in whole.value.chat_json()["messages"] if "tool_calls" in m]
    assert sent["tool_calls"][0]["function"]["arguments"] == '{"city": "Oslo"}'


def test_a_file_name_too_long_for_a_task_id_says_so_not_that_its_letters_are_wrong(
    tmp_path: Path,
) -> None:
    err = tasks.implied_id_problem("x.task.yaml", "a" * 130 + ".task.yaml")
    assert err is not None and "(it is 130 characters; at most 128)" in err.message, err
    other = tasks.implied_id_problem("x.task.yaml", "a b.task.yaml")
    assert other is not None and "letters, digits" in other.message


def test_an_unclosed_bracket_noticed_lines_later_is_placed_where_it_opened(
    tmp_path: Path,
) -> None:
    [err] = _task(tmp_path, "model: m\nprompt: [hi\nmax_tokens: 8\n").errors
    assert (err.line, err.column) == (2, 9), err
    assert "the [ list opened here is not closed (YAML noticed at line 3" in err.message
