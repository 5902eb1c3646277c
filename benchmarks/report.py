"""Metrics, the one table printed at the end, bench-results/bench.json and bench.md, and the
comparison with the previous bench.json.

`__main__` builds the `BenchResult`s, reads the previous results file with `read_previous`
(a missing file is no comparison; an unreadable or old-format one is reported and ignored)
and hands both to `table` and `markdown`. Everything here but `read_previous` and
`write_json` is a pure function over plain data, so tests/test_bench_report.py runs without
a daemon.
"""

from __future__ import annotations

import json
import operator
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

_OPS: dict[str, Callable[[float, float], bool]] = {
    "<": operator.lt,
    "<=": operator.le,
    ">": operator.gt,
    ">=": operator.ge,
}


@dataclass(frozen=True)
class Target:
    op: str  # one of _OPS
    value: float
    ref: str | None = None  # the requirement it comes from, e.g. HME-031

    def met(self, value: float) -> bool:
        return _OPS[self.op](value, self.value)

    def text(self, unit: str) -> str:
        return f"{self.op} {_fmt(self.value)} {unit}".strip()


@dataclass(frozen=True)
class Metric:
    bench: str
    name: str
    value: float | None
    unit: str
    target: Target | None = None
    note: str = ""

    @property
    def passed(self) -> bool | None:
        if self.target is None:
            return None
        if self.value is None:
            return False
        return self.target.met(self.value)

    def as_dict(self) -> dict[str, Any]:
        return {
            "bench": self.bench,
            "metric": self.name,
            "value": self.value,
            "unit": self.unit,
            "target": (
                None
                if self.target is None
                else {"op": self.target.op, "value": self.target.value, "ref": self.target.ref}
            ),
            "pass": self.passed,
            "note": self.note,
        }


@dataclass
class BenchResult:
    name: str
    metrics: list[Metric] = field(default_factory=list)
    details: dict[str, Any] = field(default_factory=dict)
    wall_s: float = 0.0
    error: str | None = None

    def add(
        self,
        name: str,
        value: float | None,
        unit: str,
        target: Target | None = None,
        note: str = "",
    ) -> None:
        self.metrics.append(Metric(self.name, name, value, unit, target, note))

    def as_dict(self) -> dict[str, Any]:
        return {
            "wall_s": round(self.wall_s, 3),
            "error": self.error,
            "metrics": [m.as_dict() for m in self.metrics],
            "details": self.details,
        }


def _fmt(value: float | None) -> str:
    if value is None:
        return "-"
    if value == int(value) and abs(value) < 1e9:
        return str(int(value))
    if abs(value) >= 100:
        return f"{value:.1f}"
    if abs(value) >= 1:
        return f"{value:.2f}"
    return f"{value:.4f}"


@dataclass(frozen=True)
class Previous:
    """The numbers of an earlier bench.json, keyed by (benchmark, metric), and where they
    came from."""

    values: dict[tuple[str, str], float | None]
    commit: str | None = None
    date: str | None = None
    quick: bool | None = None

    def source(self) -> str:
        """`commit 4eeeac3, 2025-01-01T10:00:00+00:00 (--quick)`, for the table's caption."""
        where = f"commit {self.commit or 'unknown'}, {self.date or 'date unknown'}"
        return where + (" (--quick)" if self.quick else "")


def parse_previous(data: object) -> Previous:
    """The `Previous` of a decoded bench.json; ValueError saying what is wrong when `data` is
    not one this version wrote (no `table` list, a row without bench/metric/number)."""
    if not isinstance(data, dict):
        raise ValueError("not a JSON object")
    rows = data.get("table")
    if not isinstance(rows, list):
        raise ValueError("no 'table' list: not a bench.json of this version")
    values: dict[tuple[str, str], float | None] = {}
    for n, row in enumerate(rows):
        bench = row.get("bench") if isinstance(row, dict) else None
        metric = row.get("metric") if isinstance(row, dict) else None
        value = row.get("value") if isinstance(row, dict) else None
        if not isinstance(bench, str) or not isinstance(metric, str):
            raise ValueError(f"table row {n} has no 'bench' and 'metric' names")
        if value is not None and (isinstance(value, bool) or not isinstance(value, int | float)):
            raise ValueError(f"table row {n} ({bench}: {metric}) has a value that is no number")
        values[(bench, metric)] = None if value is None else float(value)
    env = data.get("environment")
    env = env if isinstance(env, dict) else {}
    options = data.get("options")
    quick = options.get("quick") if isinstance(options, dict) else None
    return Previous(
        values,
        commit=env.get("git_commit") if isinstance(env.get("git_commit"), str) else None,
        date=env.get("date") if isinstance(env.get("date"), str) else None,
        quick=quick if isinstance(quick, bool) else None,
    )


def read_previous(path: Path) -> tuple[Previous | None, str | None]:
    """(the previous results, None); (None, None) when there is no file; (None, why) when it
    cannot be read or is not a results file: reported by the caller, never fatal."""
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        return None, None
    except OSError as exc:
        return None, f"previous results not compared: {path} cannot be read ({exc.strerror})"
    try:
        return parse_previous(json.loads(raw)), None
    except ValueError as exc:  # json.JSONDecodeError and UnicodeDecodeError included
        return None, f"previous results not compared: {path} is not a results file ({exc})"


@dataclass(frozen=True)
class Change:
    previous: float
    delta: float
    percent: float | None  # None when the previous value was 0

    def text(self) -> str:
        """`+12.0 (+5.0 %)`, `-0.0100 (-50.0 %)`, `0 (0.0 %)`."""
        sign = "+" if self.delta > 0 else ""
        if self.percent is None:
            pct = "n/a"
        elif round(self.percent, 1) == 0:
            pct = "0.0 %"
        else:
            pct = f"{self.percent:+.1f} %"
        return f"{sign}{_fmt(self.delta)} ({pct})"


def change(current: float | None, previous: float | None) -> Change | None:
    """How `current` moved from `previous`; None when either is missing."""
    if current is None or previous is None:
        return None
    delta = current - previous
    percent = None if previous == 0 else delta / abs(previous) * 100.0
    return Change(previous, delta, percent)


def compared_cells(m: Metric, previous: Previous | None) -> tuple[str, str]:
    """The previous value and the change of `m`: `new` for a metric the previous results
    did not have, `-` when either value is missing."""
    if previous is None:
        return "", ""
    key = (m.bench, m.name)
    if key not in previous.values:
        return "", "new"
    c = change(m.value, previous.values[key])
    return _fmt(previous.values[key]), "-" if c is None else c.text()


def dropped(benches: Sequence[BenchResult], previous: Previous | None) -> list[tuple[str, str]]:
    """Metrics the previous results had, of benchmarks run now, that this run did not report
    (a benchmark left out with --only is not counted)."""
    if previous is None:
        return []
    ran = {b.name for b in benches}
    now = {(m.bench, m.name) for b in benches for m in b.metrics}
    return [k for k in previous.values if k[0] in ran and k not in now]


HEADER = ("benchmark", "metric", "value", "target", "pass", "unit")
COMPARED = ("previous", "change")


def rows(benches: Sequence[BenchResult], previous: Previous | None) -> list[tuple[str, ...]]:
    """One row per metric (and per benchmark that failed), the columns of `HEADER`, then
    those of `COMPARED` when there are previous results."""
    out: list[tuple[str, ...]] = []
    extra = ("", "") if previous is not None else ()
    for b in benches:
        for m in b.metrics:
            passed = "" if m.passed is None else ("PASS" if m.passed else "FAIL")
            target = m.target.text(m.unit) if m.target else ""
            cells = (b.name, m.name, _fmt(m.value), target, passed, m.unit)
            out.append(cells + (compared_cells(m, previous) if previous is not None else ()))
        if b.error:
            out.append((b.name, "ERROR", "-", "", "FAIL", b.error[:60], *extra))
    return out


def table(benches: Sequence[BenchResult], previous: Previous | None = None) -> str:
    """The table printed on stdout: aligned columns, numbers right-aligned."""
    header = HEADER + (COMPARED if previous is not None else ())
    body = rows(benches, previous)
    widths = [max(len(r[i]) for r in (header, *body)) for i in range(len(header))]
    right = {2, 6}  # value and previous

    def line(cells: tuple[str, ...]) -> str:
        return "  ".join(
            c.rjust(w) if i in right else c.ljust(w)
            for i, (c, w) in enumerate(zip(cells, widths, strict=True))
        ).rstrip()

    rule = "  ".join("-" * w for w in widths)
    return "\n".join([line(header), rule, *(line(r) for r in body)])


def comparison_note(previous: Previous | None, problem: str | None) -> str:
    """One line under the table: what the change column compares against."""
    if problem:
        return problem
    if previous is None:
        return "no previous results: nothing to compare"
    return f"change against the previous results (now bench-previous.json): {previous.source()}"


def markdown(
    benches: Sequence[BenchResult],
    previous: Previous | None,
    *,
    caption: Sequence[str],
) -> str:
    """bench.md: the same rows as `table` as a markdown table, below `caption` lines (when
    and where it ran, what it compares against) and above the metrics that went missing."""
    header: tuple[str, ...] = ("benchmark", "metric", "value", "target", "pass/fail", "unit")
    header += ("previous", "change") if previous is not None else ()
    align = ("---", "---", "---:", "---", "---", "---") + (
        ("---:", "---:") if previous is not None else ()
    )

    def line(cells: Sequence[str]) -> str:
        return "| " + " | ".join(c.replace("|", "\\|") for c in cells) + " |"

    out = ["# Benchmark results", "", *(f"- {c}" for c in caption), ""]
    out += [line(header), line(align), *(line(r) for r in rows(benches, previous))]
    gone = dropped(benches, previous)
    if gone:
        out += ["", "Not reported this time (were in the previous results):", ""]
        out += [f"- {b}: {m}" for b, m in gone]
    return "\n".join(out) + "\n"


def write_text(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    tmp.replace(path)


def write_json(path: Path, data: dict[str, Any]) -> None:
    write_text(path, json.dumps(data, indent=2, sort_keys=False, default=str) + "\n")
