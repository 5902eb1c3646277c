"""The benchmark report: the change against the previous bench.json, bench.md, and what
`python -m benchmarks` does with the previous results file (kept, compared, or reported when
it is broken). No daemon runs: the benchmarks are replaced by ready-made results."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from benchmarks import __main__ as bench_main
from benchmarks import harness, report


def results(
    *metrics: tuple[str, str, float | None], error: str | None = None
) -> list[report.BenchResult]:
    """BenchResults from (bench, metric, value) triples, in order."""
    benches: dict[str, report.BenchResult] = {}
    for bench, name, value in metrics:
        target = report.Target("<", 1000.0) if name == "8 pools: median" else None
        benches.setdefault(bench, report.BenchResult(bench)).add(name, value, "ms", target)
    out = list(benches.values())
    if error:
        out[0].error = error
    return out


def bench_json(rows: list[tuple[str, str, float | None]], **extra: Any) -> dict[str, Any]:
    """A results file as `python -m benchmarks` writes it (only what the comparison reads)."""
    return {
        "environment": {"git_commit": "4eeeac3", "date": "2025-01-02T03:04:05+00:00"},
        "options": {"quick": True, "only": ["converge"]},
        "table": [{"bench": b, "metric": m, "value": v, "unit": "ms"} for b, m, v in rows],
        **extra,
    }


PREVIOUS = report.parse_previous(
    bench_json(
        [
            ("converge", "8 pools: median", 400.0),
            ("converge", "32 pools: median", 2000.0),
            ("calibration", "predicted start: MAE", 0.0),
            ("converge", "1 pools: median", None),
        ]
    )
)


def test_a_metric_in_both_runs_shows_the_previous_value_and_the_change() -> None:
    c = report.change(500.0, 400.0)
    assert c == report.Change(previous=400.0, delta=100.0, percent=25.0)
    assert c.text() == "+100 (+25.0 %)"
    assert report.change(300.0, 400.0) == report.Change(400.0, -100.0, -25.0)
    assert report.Change(400.0, -100.0, -25.0).text() == "-100 (-25.0 %)"
    assert report.Change(0.5, -0.25, -50.0).text() == "-0.2500 (-50.0 %)"


def test_an_unchanged_metric_shows_a_zero_change_without_a_sign() -> None:
    c = report.change(400.0, 400.0)
    assert c is not None and c.text() == "0 (0.0 %)"
    assert report.Change(400.0, -0.01, -0.0025).text() == "-0.0100 (0.0 %)"


def test_a_change_from_zero_has_no_percentage() -> None:
    c = report.change(3.0, 0.0)
    assert c == report.Change(0.0, 3.0, None)
    assert c.text() == "+3 (n/a)"


def test_a_missing_value_on_either_side_has_no_change() -> None:
    assert report.change(None, 400.0) is None
    assert report.change(400.0, None) is None
    m = report.Metric("converge", "1 pools: median", 12.0, "ms")
    assert report.compared_cells(m, PREVIOUS) == ("-", "-")


def test_a_metric_the_previous_run_did_not_have_is_marked_new() -> None:
    m = report.Metric("converge", "8 pools: reconciler's own share, median", 40.0, "ms")
    assert report.compared_cells(m, PREVIOUS) == ("", "new")


def test_metrics_are_matched_by_benchmark_and_name() -> None:
    other_bench = report.Metric("latency", "8 pools: median", 400.0, "ms")
    assert report.compared_cells(other_bench, PREVIOUS) == ("", "new")
    same = report.Metric("converge", "8 pools: median", 440.0, "ms")
    assert report.compared_cells(same, PREVIOUS) == ("400", "+40 (+10.0 %)")


def test_metrics_gone_since_the_previous_run_are_listed_only_for_benchmarks_that_ran() -> None:
    now = results(("converge", "8 pools: median", 410.0))
    assert report.dropped(now, PREVIOUS) == [
        ("converge", "32 pools: median"),
        ("converge", "1 pools: median"),
    ]  # calibration was not run (--only), so its MAE is not missing
    assert report.dropped(now, None) == []


def test_the_printed_table_gains_previous_and_change_columns_only_with_previous_results() -> None:
    now = results(("converge", "8 pools: median", 420.0), ("converge", "new one", 1.5))
    plain = report.table(now).splitlines()
    assert plain[0].split() == ["benchmark", "metric", "value", "target", "pass", "unit"]
    compared = report.table(now, PREVIOUS).splitlines()
    assert compared[0].split()[-2:] == ["previous", "change"]
    assert compared[2].split() == [
        *("converge", "8", "pools:", "median", "420", "<", "1000", "ms", "PASS", "ms"),
        *("400", "+20", "(+5.0", "%)"),
    ]
    assert compared[3].split()[-1] == "new"


def test_a_failed_benchmark_keeps_its_error_row_in_the_compared_table() -> None:
    now = results(("converge", "8 pools: median", 420.0), error="BenchError: timed out")
    last = report.table(now, PREVIOUS).splitlines()[-1]
    assert last.split()[:4] == ["converge", "ERROR", "-", "FAIL"]


def test_bench_md_is_a_markdown_table_with_the_comparison_and_the_missing_metrics() -> None:
    now = results(("converge", "8 pools: median", 420.0))
    md = report.markdown(now, PREVIOUS, caption=["run today", "compared with 4eeeac3"])
    lines = md.splitlines()
    assert lines[0] == "# Benchmark results"
    assert "- compared with 4eeeac3" in lines
    head = lines.index(
        "| benchmark | metric | value | target | pass/fail | unit | previous | change |"
    )
    assert lines[head + 1] == "| --- | --- | ---: | --- | --- | --- | ---: | ---: |"
    assert lines[head + 2] == (
        "| converge | 8 pools: median | 420 | < 1000 ms | PASS | ms | 400 | +20 (+5.0 %) |"
    )
    assert "- converge: 32 pools: median" in lines
    assert md.endswith("\n")


def test_bench_md_without_previous_results_has_the_six_columns_and_escapes_pipes() -> None:
    now = results(("converge", "a | b", 1.0))
    lines = report.markdown(now, None, caption=[]).splitlines()
    assert "| benchmark | metric | value | target | pass/fail | unit |" in lines
    assert "| converge | a \\| b | 1 |  |  | ms |" in lines


def test_the_previous_file_says_which_commit_and_date_it_came_from() -> None:
    assert PREVIOUS.source() == "commit 4eeeac3, 2025-01-02T03:04:05+00:00 (--quick)"
    assert report.comparison_note(PREVIOUS, None).endswith(PREVIOUS.source())
    bare = report.parse_previous({"table": []})
    assert bare.source() == "commit unknown, date unknown"


def test_no_previous_file_is_no_comparison_and_no_complaint(tmp_path: Path) -> None:
    assert report.read_previous(tmp_path / "bench.json") == (None, None)
    assert report.comparison_note(None, None) == "no previous results: nothing to compare"


def test_a_previous_file_written_by_this_version_is_read_back(tmp_path: Path) -> None:
    path = tmp_path / "bench.json"
    now = results(("converge", "8 pools: median", 420.0))
    report.write_json(path, {"table": [m.as_dict() for b in now for m in b.metrics]})
    previous, problem = report.read_previous(path)
    assert problem is None and previous is not None
    assert previous.values == {("converge", "8 pools: median"): 420.0}


@pytest.mark.parametrize(
    ("content", "why"),
    [
        (b'{"table": [{"bench": "converge", "metr', "is not a results file"),
        (b"\xff\xfe not text", "is not a results file"),
        (b"[1, 2]", "not a JSON object"),
        (json.dumps({"results": {"converge": {}}}).encode(), "no 'table' list"),
        (json.dumps({"table": [{"bench": "converge"}]}).encode(), "row 0 has no"),
        (json.dumps({"table": ["converge"]}).encode(), "row 0 has no"),
        (
            json.dumps({"table": [{"bench": "c", "metric": "m", "value": "fast"}]}).encode(),
            "no number",
        ),
        (
            json.dumps({"table": [{"bench": "c", "metric": "m", "value": True}]}).encode(),
            "no number",
        ),
    ],
)
def test_a_broken_or_old_format_previous_file_is_reported_and_ignored(
    tmp_path: Path, content: bytes, why: str
) -> None:
    path = tmp_path / "bench.json"
    path.write_bytes(content)
    previous, problem = report.read_previous(path)
    assert previous is None
    assert problem is not None and why in problem and str(path) in problem
    assert report.comparison_note(None, problem) == problem


def test_an_unreadable_previous_file_is_reported_and_ignored(tmp_path: Path) -> None:
    (tmp_path / "bench.json").mkdir()  # a folder where the file should be
    previous, problem = report.read_previous(tmp_path / "bench.json")
    assert previous is None and problem is not None and "cannot be read" in problem


def run_main(
    monkeypatch: pytest.MonkeyPatch, out: Path, value: float, *, quick: bool = True
) -> int:
    """`python -m benchmarks --only converge --out OUT` with converge's run replaced by one
    that reports `value`."""

    def run_one(name: str, *, quick: bool, out: Path) -> report.BenchResult:
        bench = report.BenchResult(name)
        bench.add("8 pools: median", value, "ms", report.Target("<", 1000.0))
        return bench

    monkeypatch.setattr(bench_main, "run_one", run_one)
    argv = ["--only", "converge", "--out", str(out)] + (["--quick"] if quick else [])
    return bench_main.main(argv)


def test_a_second_run_compares_with_the_first_and_keeps_it_as_bench_previous(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert run_main(monkeypatch, tmp_path, 400.0) == 0
    first = (tmp_path / "bench.json").read_text()
    assert "no previous results" in capsys.readouterr().out
    assert not (tmp_path / "bench-previous.json").exists()
    assert "| converge | 8 pools: median | 400 |" in (tmp_path / "bench.md").read_text()

    assert run_main(monkeypatch, tmp_path, 500.0) == 0
    printed = capsys.readouterr().out
    assert "+100 (+25.0 %)" in printed
    assert "change against the previous results" in printed
    assert (tmp_path / "bench-previous.json").read_text() == first
    md = (tmp_path / "bench.md").read_text()
    assert (
        "| converge | 8 pools: median | 500 | < 1000 ms | PASS | ms | 400 | +100 (+25.0 %) |" in md
    )
    compared = json.loads((tmp_path / "bench.json").read_text())["compared_with"]
    assert compared["file"] == "bench-previous.json" and compared["quick"] is True


def test_a_broken_previous_file_is_reported_kept_and_replaced(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    (tmp_path / "bench.json").write_text("{ half a file")
    assert run_main(monkeypatch, tmp_path, 400.0) == 0
    printed = capsys.readouterr().out
    assert "previous results not compared" in printed
    assert (tmp_path / "bench-previous.json").read_text() == "{ half a file"
    fresh = json.loads((tmp_path / "bench.json").read_text())
    assert fresh["compared_with"]["file"] is None
    assert "not a results file" in fresh["compared_with"]["problem"]
    assert "previous results not compared" in (tmp_path / "bench.md").read_text()


def test_workspaces_made_in_a_run_are_removed_at_its_end_not_at_each_benchmarks_end(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(harness.tempfile, "tempdir", str(tmp_path))
    config = harness.base_config(models={}, pools=[])
    with harness.removals_deferred():
        with harness.workspace(config) as first:
            pass
        with harness.workspace(config) as second:
            pass
        assert first.root.is_dir() and second.root.is_dir()
    assert not first.root.exists() and not second.root.exists()
    with harness.workspace(config) as alone:  # outside a run: removed at once, as before
        pass
    assert not alone.root.exists()
