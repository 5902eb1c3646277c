"""Metrics, the one table printed at the end, and bench-results/bench.json."""

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


def table(benches: Sequence[BenchResult]) -> str:
    header = ("benchmark", "metric", "value", "target", "pass", "unit")
    rows: list[tuple[str, ...]] = []
    for b in benches:
        for m in b.metrics:
            passed = "" if m.passed is None else ("PASS" if m.passed else "FAIL")
            target = m.target.text(m.unit) if m.target else ""
            rows.append((b.name, m.name, _fmt(m.value), target, passed, m.unit))
        if b.error:
            rows.append((b.name, "ERROR", "-", "", "FAIL", b.error[:60]))
    widths = [max(len(r[i]) for r in (header, *rows)) for i in range(len(header))]
    right = {2}  # numbers right-aligned

    def line(cells: tuple[str, ...]) -> str:
        return "  ".join(
            c.rjust(w) if i in right else c.ljust(w)
            for i, (c, w) in enumerate(zip(cells, widths, strict=True))
        ).rstrip()

    rule = "  ".join("-" * w for w in widths)
    return "\n".join([line(header), rule, *(line(r) for r in rows)])


def write_json(path: Path, data: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(data, indent=2, sort_keys=False, default=str) + "\n")
    tmp.replace(path)
